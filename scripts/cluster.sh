#!/usr/bin/env bash
# A local 3-node replicated cluster behind kv-proxy, in one command.
#
#   scripts/cluster.sh up       build (release), start kv-node on 8081-8083 (every
#                               key on all three, KV_REPLICAS to change) and kv-proxy
#                               on 8080, wait until healthy, show it working: write,
#                               kill -9 one node, read and write every key, restart it;
#                               on a running cluster, starts only what is missing
#   scripts/cluster.sh status   what is running, and each server's health
#   scripts/cluster.sh bench    kv-bench over 1, 2 and 3 nodes, then through the proxy
#   scripts/cluster.sh add-node [ID]
#                               start node ID (default: the next free id) on
#                               BASE+ID with --join, and show the moves that give
#                               it its share of the shards until the layout settles
#   scripts/cluster.sh remove-node ID
#                               DELETE /-/cluster/members/ID: its replicas move to
#                               the others (progress shown until settled), then
#                               the node exits by itself
#   scripts/cluster.sh down     stop what `up` and add-node started (by their pid files)
#
# Data, logs and pid files live under ./data (KV_DATA to move it). KV_BASE_PORT
# moves the ports (proxy on BASE, nodes on BASE+1..BASE+3; default 8080), and
# KV_BUILD_PROFILE=debug uses debug builds (the test suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DATA=${KV_DATA:-./data}
BASE=${KV_BASE_PORT:-8080}
PROFILE=${KV_BUILD_PROFILE:-release}
REPLICAS=${KV_REPLICAS:-3}

# KV_AUTH_TOKEN, when set, is the token of every node and the proxy (they
# read it from the environment they inherit, kv-bench too), and every curl
# here sends it; the header goes through a file descriptor, not argv, so
# `ps` does not show it.
#
# KV_TLS_DIR, when set, names a directory with ca.pem, node.pem and
# node-key.pem (see the README's TLS section for the openssl commands): every
# node and the proxy serve TLS with node.pem, and nodes use mutual TLS
# between them (the servers read KV_TLS_CERT/KEY/CA from their environment,
# kv-bench KV_TLS_CA); URLs are https:// and every curl verifies with ca.pem.
if [ -n "${KV_TLS_DIR:-}" ]; then
  for f in ca.pem node.pem node-key.pem; do
    [ -r "$KV_TLS_DIR/$f" ] || { echo "error: KV_TLS_DIR=$KV_TLS_DIR has no readable $f" >&2; exit 2; }
  done
  export KV_TLS_CERT=$KV_TLS_DIR/node.pem KV_TLS_KEY=$KV_TLS_DIR/node-key.pem KV_TLS_CA=$KV_TLS_DIR/ca.pem
  export KV_SCHEME=https
  TLS_CURL=(--cacert "$KV_TLS_DIR/ca.pem")
else
  KV_SCHEME=http
  TLS_CURL=()
fi
kvcurl() {
  if [ -n "${KV_AUTH_TOKEN:-}" ]; then
    curl "${TLS_CURL[@]}" -H @<(printf 'Authorization: Bearer %s\n' "$KV_AUTH_TOKEN") "$@"
  else
    curl "${TLS_CURL[@]}" "$@"
  fi
}
PROXY_PORT=$BASE
# The founding members, ids 1-3, on BASE+1..BASE+3 (their --peers list).
FOUNDING_PORTS=($((BASE + 1)) $((BASE + 2)) $((BASE + 3)))
# The members this script runs: the founding ones that remove-node did not
# take out (a removed node leaves a `removed` file in its data dir and is
# refused a restart), and the ones add-node started (node id N on BASE+N),
# found by their data dirs.
NODE_PORTS=()
for port in "${FOUNDING_PORTS[@]}" $(ls "$DATA" 2>/dev/null | sed -n 's/^node-\([0-9]*\)$/\1/p' | sort -n); do
  [[ " ${NODE_PORTS[*]} " == *" $port "* ]] && continue
  [ -e "$DATA/node-$port/removed" ] && continue
  if [[ " ${FOUNDING_PORTS[*]} " != *" $port "* ]] && [ ! -e "$DATA/node-$port/cluster.json" ]; then
    continue
  fi
  NODE_PORTS+=("$port")
done
# cargo builds into $CARGO_TARGET_DIR when it is set.
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE
PIDS=$DATA/pids
LOGS=$DATA/logs

# --peers: node N (1-3) is 127.0.0.1:BASE+N.
peer_list() { local IFS=,; local list=() p; for p in "${FOUNDING_PORTS[@]}"; do list+=("$((p - BASE))=127.0.0.1:$p"); done; echo "${list[*]}"; }
node_list() { local IFS=,; local list=(); for p in "${NODE_PORTS[@]}"; do list+=("127.0.0.1:$p"); done; echo "${list[*]}"; }
founding_list() { local IFS=,; local list=(); for p in "${FOUNDING_PORTS[@]}"; do list+=("127.0.0.1:$p"); done; echo "${list[*]}"; }

# Is process $1 running? An exited child of a script that has gone is a
# zombie until init reaps it (some inits take seconds): that counts as gone.
running() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# Is the process in pid file $1 alive and one of ours?
alive() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && running "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kv-'
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The process a pid file names is ours and still being torn down: not
# `alive` (killed, a zombie), but still in /proc.
exiting() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && ! alive "$1"
}

start() { # name port command...
  local name=$1 port=$2
  shift 2
  # Appended, so a restart keeps the log of what happened before it.
  nohup "$@" >>"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  # Not this shell's job any more: the demo's kill -9 prints no "Killed".
  disown $!
}

# Starts the member on port $1 (node id $1 - BASE).
start_node() {
  local port=$1
  if [[ " ${FOUNDING_PORTS[*]} " == *" $port "* ]]; then
    start "node-$port" "$port" "$BIN/kv-node" --port "$port" --data-dir "$DATA/node-$port" \
      --node-id $((port - BASE)) --peers "$(peer_list)" --replicas "$REPLICAS"
  else
    # A member add-node started: its data dir knows the cluster (--join is
    # only used on a first start).
    start "node-$port" "$port" "$BIN/kv-node" --port "$port" --data-dir "$DATA/node-$port" \
      --node-id $((port - BASE)) --join "$(founding_list)"
  fi
}

up() {
  mkdir -p "$PIDS" "$LOGS"
  # Members already running are left alone (no second set); missing ones
  # (never started, or killed) are started, so `up` also repairs a cluster.
  local missing=() port
  for port in "${NODE_PORTS[@]}"; do
    alive "$PIDS/node-$port.pid" || missing+=("node-$port")
  done
  alive "$PIDS/proxy.pid" || missing+=(proxy)
  if [ ${#missing[@]} -eq 0 ]; then
    echo "The cluster is already running; not starting a second set."
    status
    return 0
  fi
  for name in "${missing[@]}"; do
    port=${name#node-}
    [ "$name" = proxy ] && port=$PROXY_PORT
    # A member killed a moment ago may still hold its port: after kill -9
    # its main thread shows as a zombie before its other threads have
    # exited and closed its sockets (seen under load). Wait for our own
    # exiting process, bounded; anything else on the port is an error.
    if port_in_use "$port" && exiting "$PIDS/$name.pid"; then
      wait_ports_free "$port" || true
    fi
    if port_in_use "$port"; then
      echo "error: port $port is already in use by another program; stop it or set KV_BASE_PORT" >&2
      exit 1
    fi
  done
  local flags=(--bin kv-node --bin kv-proxy --bin kv-bench)
  [ "$PROFILE" = release ] && flags+=(--release)
  # cargo prints its own progress; a first release build takes 3-5 minutes
  # on 2 cores, later ones a few seconds.
  if [ ! -x "$BIN/kv-node" ]; then
    echo "building ($PROFILE); the first build takes 3-5 minutes on 2 cores..."
  fi
  cargo build "${flags[@]}"
  # Nodes first; the proxy once they serve, so it finds the cluster's
  # shard table (GET /-/shards) at its start.
  for name in "${missing[@]}"; do
    [ "$name" = proxy ] && continue
    start_node "${name#node-}"
    echo "started $name"
  done
  for port in "${NODE_PORTS[@]}"; do
    wait_node "$port" 30 || { echo "see the logs in $LOGS" >&2; down; exit 1; }
  done
  if ! wait_leaders 30; then
    echo "see the logs in $LOGS" >&2
    # Tear down only what this `up` started whole; a cluster it repaired
    # keeps serving with the members that were running.
    [ ${#missing[@]} -eq $((${#NODE_PORTS[@]} + 1)) ] && down
    exit 1
  fi
  if [[ " ${missing[*]} " == *" proxy "* ]]; then
    start proxy "$PROXY_PORT" "$BIN/kv-proxy" --port "$PROXY_PORT" --nodes "$(node_list)"
    echo "started proxy"
  fi
  wait_healthy "127.0.0.1:$PROXY_PORT" 30 || { echo "see the logs in $LOGS" >&2; down; exit 1; }
  local proxy=$KV_SCHEME://127.0.0.1:$PROXY_PORT
  # A restarted node is back for clients once the proxy's health check has
  # seen it (within --health-interval, 1 s): wait for that, not the caller.
  local deadline=$((SECONDS + 10))
  local health
  while :; do
    health=$(kvcurl -fsS --max-time 1 "$proxy/-/health" 2>&1 || true)
    [[ $health == *"\"nodes_up\":${#NODE_PORTS[@]},"* ]] && break
    if [ $SECONDS -ge $deadline ]; then
      echo "warning: the proxy does not see every node up yet: $health" >&2
      break
    fi
    sleep 0.05
  done
  # Up is not serving: each node's /-/ready is 200 only once every shard it
  # hosts has a leader with a quorum. On a loaded machine elections take
  # seconds, and a demo started before them shows 503s ("no leader").
  deadline=$((SECONDS + 30))
  for port in "${NODE_PORTS[@]}"; do
    until kvcurl -fsS -o /dev/null --max-time 1 "$KV_SCHEME://127.0.0.1:$port/-/ready" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        echo "warning: node $port is not ready yet: $(kvcurl -s --max-time 1 "$KV_SCHEME://127.0.0.1:$port/-/ready" | head -c 300)" >&2
        break
      fi
      sleep 0.1
    done
  done
  echo
  echo "kv cluster is up: proxy $proxy, nodes $(node_list)"
  echo "data in $DATA/node-*, logs in $LOGS"
  if [ -n "${KV_AUTH_TOKEN:-}" ]; then
    echo "every request but /-/health needs the token: curl -H \"Authorization: Bearer \$KV_AUTH_TOKEN\" ..."
  fi
  echo
  # The demo uses a key of its own and deletes it, so `up` never touches
  # data a user stored.
  local key=cluster-demo-$$
  echo "\$ curl -X PUT $proxy/$key -H 'Content-Type: application/json' -d '{\"value\": \"world\"}'"
  kvcurl -sS -X PUT "$proxy/$key" -H 'Content-Type: application/json' -d '{"value": "world"}'
  echo "\$ curl -i $proxy/$key"
  kvcurl -sS -i "$proxy/$key"
  echo "\$ curl -X DELETE $proxy/$key"
  kvcurl -sS -X DELETE "$proxy/$key"
  echo
  # The failover demo kills a node: only on a cluster this `up` started
  # whole, never on one it repaired (whose nodes may be serving clients).
  if [ "$REPLICAS" -ge 2 ] && [ ${#NODE_PORTS[@]} -ge 3 ] && [ ${#missing[@]} -eq $((${#NODE_PORTS[@]} + 1)) ]; then
    demo_failover "$proxy"
  fi
  # Say the settings this cluster was started with, so `status` and `down`
  # find it when they were not the defaults.
  local env=""
  [ -n "${KV_BASE_PORT:-}" ] && env+="KV_BASE_PORT=$KV_BASE_PORT "
  [ -n "${KV_DATA:-}" ] && env+="KV_DATA=$KV_DATA "
  echo "Try: curl -X PUT $proxy/hello -d '{\"value\": 1}' ; curl $proxy/-/owner/hello ; curl $KV_SCHEME://127.0.0.1:${NODE_PORTS[0]}/-/shards ; ${env}scripts/cluster.sh status ; ${env}scripts/cluster.sh down"
}

# Writes a few keys, kills one node with SIGKILL, shows every key still
# readable and writable through the proxy, restarts the node and shows it
# caught up; deletes its keys at the end.
# PUTs $2 to the URL $1 for the demo. A 504 (the write's outcome unknown
# within --raft-write-timeout, seen on a loaded machine with debug builds)
# or a 503 is tried again, a few times: putting the same value twice is
# harmless. Any other failure is shown and fails the demo.
demo_put() {
  local code try
  for try in 1 2 3 4 5; do
    code=$(kvcurl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X PUT "$1" -d "$2") || code=000
    case $code in
      2??) return 0 ;;
      503 | 504) sleep 0.2 ;;
      *) break ;;
    esac
  done
  echo "error: PUT $1 answered $code" >&2
  return 1
}

demo_failover() {
  local proxy=$1 i code codes victim=${NODE_PORTS[2]} keys=()
  for i in 1 2 3 4 5 6; do keys+=("failover-demo-$$-$i"); done
  echo
  echo "Every key lives on $REPLICAS nodes. Writing ${#keys[@]} keys, then: kill -9 node-$victim"
  for key in "${keys[@]}"; do
    demo_put "$proxy/$key" '{"value": "before"}' || return 1
  done
  local pid
  pid=$(cat "$PIDS/node-$victim.pid")
  kill -KILL "$pid"
  while running "$pid"; do sleep 0.05; done
  codes=""
  for key in "${keys[@]}"; do
    code=$(kvcurl -sS -o /dev/null -w '%{http_code}' --max-time 10 "$proxy/$key")
    codes+=" $code"
  done
  echo "  GET of each key with node-$victim dead:$codes"
  codes=""
  for key in "${keys[@]}"; do
    code=$(kvcurl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X PUT "$proxy/$key" -d '{"value": "after"}')
    codes+=" $code"
  done
  echo "  PUT of each key with node-$victim dead:$codes"
  start_node "$victim"
  wait_healthy "127.0.0.1:$victim" 30 || return 1
  # Its own copy (a stale read answers from the local replica) catches up.
  local last=${keys[-1]} deadline=$((SECONDS + 15)) seen
  until seen=$(kvcurl -fsS --max-time 1 -H 'X-Kv-Consistency: stale' "$KV_SCHEME://127.0.0.1:$victim/$last" 2>/dev/null) &&
    [[ $seen == *after* ]]; do
    [ $SECONDS -ge $deadline ] && { echo "  node-$victim has not caught up yet: $seen"; break; }
    sleep 0.05
  done
  echo "  restarted node-$victim; its own replica of $last now reads: $seen"
  for key in "${keys[@]}"; do kvcurl -fsS -o /dev/null -X DELETE "$proxy/$key" || true; done
}

# Waits (up to $2 seconds) until the node on port $1 is healthy; if it
# exits first (say, flags that contradict its data dir), shows why at once.
wait_node() {
  local port=$1 deadline=$((SECONDS + $2))
  until kvcurl -fsS -o /dev/null --max-time 1 "$KV_SCHEME://127.0.0.1:$port/-/health" 2>/dev/null; do
    if ! alive "$PIDS/node-$port.pid"; then
      echo "error: node-$port exited; the end of its log ($LOGS/node-$port.log):" >&2
      tail -n 5 "$LOGS/node-$port.log" >&2
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "error: node-$port did not become healthy within $2 s" >&2
      return 1
    fi
    sleep 0.05
  done
}

# Waits (up to $1 seconds) until every node's GET /-/ready is 200: each
# shard it hosts has a leader with a quorum (elections after a start take a
# moment). Not "/-/shards names a leader for every shard": once add-node
# has run, a node hosts only its share and knows no leader for the rest.
wait_leaders() {
  local deadline=$((SECONDS + $1)) port
  for port in "${NODE_PORTS[@]}"; do
    until kvcurl -fsS -o /dev/null --max-time 1 "$KV_SCHEME://127.0.0.1:$port/-/ready" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        echo "error: node on port $port is not ready (a shard it hosts has no leader with a quorum): $(kvcurl -s --max-time 1 "$KV_SCHEME://127.0.0.1:$port/-/ready" | head -c 300)" >&2
        return 1
      fi
      sleep 0.05
    done
  done
}

status() {
  local f name any=0
  mkdir -p "$PIDS"
  local ports=("${NODE_PORTS[@]}") extra
  # Nodes add-node started (pid files beyond the three base ports).
  for extra in $(ls "$PIDS" 2>/dev/null | sed -n 's/^node-\([0-9]*\)\.pid$/\1/p' | sort -n); do
    [[ " ${ports[*]} " == *" $extra "* ]] || ports+=("$extra")
  done
  for port in "${ports[@]}" proxy; do
    name=node-$port
    [ "$port" = proxy ] && name=proxy
    f=$PIDS/$name.pid
    if alive "$f"; then
      any=1
      local addr_port=$port
      [ "$port" = proxy ] && addr_port=$PROXY_PORT
      printf '%-11s pid %-7s %s://127.0.0.1:%-5s %s\n' "$name" "$(cat "$f")" "$KV_SCHEME" "$addr_port" \
        "$(kvcurl -s --max-time 2 "$KV_SCHEME://127.0.0.1:$addr_port/-/health" || echo unreachable)"
    else
      printf '%-11s stopped\n' "$name"
    fi
  done
  [ $any -eq 1 ] || echo "(nothing running; start it with scripts/cluster.sh up)"
}

down() {
  mkdir -p "$PIDS"
  # The proxy first (so no client is sent to a node that is stopping), then
  # every node at once: each drains its own connections in parallel.
  stop_all "$PIDS/proxy.pid"
  stop_all "$PIDS"/node-*.pid
}

# Sends SIGTERM to every live process named by the pid files given, then
# waits for them all (SIGKILL after 15 s), and removes the pid files.
stop_all() {
  local f pid pids=() names=() deadline=$((SECONDS + 15)) i
  for f in "$@"; do
    [ -f "$f" ] || continue
    if alive "$f"; then
      pid=$(cat "$f")
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      names+=("$(basename "$f" .pid)")
    fi
    rm -f "$f"
  done
  for i in "${!pids[@]}"; do
    while running "${pids[$i]}"; do
      if [ $SECONDS -ge $deadline ]; then kill -KILL "${pids[$i]}" 2>/dev/null || true; fi
      sleep 0.05
    done
    echo "stopped ${names[$i]} (pid ${pids[$i]})"
  done
}

# The first base node that answers: the seed add-node and remove-node ask.
seed_port() {
  local port
  for port in "${NODE_PORTS[@]}" $(ls "$PIDS" 2>/dev/null | sed -n 's/^node-\([0-9]*\)\.pid$/\1/p'); do
    if kvcurl -fsS -o /dev/null --max-time 1 "$KV_SCHEME://127.0.0.1:$port/-/cluster" 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "error: no node of the cluster answers GET /-/cluster (start it with scripts/cluster.sh up)" >&2
  return 1
}

# The placement version of node $1's GET /-/cluster (its first "version").
cluster_version() {
  kvcurl -fsS --max-time 2 "$KV_SCHEME://127.0.0.1:$1/-/cluster" | grep -o '"version":[0-9]*' | head -n 1 | cut -d: -f2
}

# Follows the layout from node $1 until it settles at version $2 or newer:
# kv-bench cluster-watch draws the progress bar (a line per change when
# the output is not a terminal).
watch_layout() {
  local port=$1 version=$2
  local watch=("$BIN/kv-bench" cluster-watch --node "$KV_SCHEME://127.0.0.1:$port" --min-version "$version"
    --timeout "${KV_WATCH_TIMEOUT:-30m}")
  "${watch[@]}"
}

add_node() {
  mkdir -p "$PIDS" "$LOGS"
  local seed id port version view
  seed=$(seed_port) || exit 1
  view=$(kvcurl -fsS --max-time 2 "$KV_SCHEME://127.0.0.1:$seed/-/cluster")
  if [ -n "${1:-}" ]; then
    id=$1
    [[ $id =~ ^[1-9][0-9]*$ ]] || { echo "error: the node id must be a positive integer, not '$id'" >&2; exit 2; }
  else
    # Ids are never reused: one past the highest ever used, removed ones included.
    id=$(grep -o '"id":[0-9]*' <<<"$view" | cut -d: -f2 | sort -n | tail -n 1)
    id=$((id + 1))
  fi
  port=$((BASE + id))
  if alive "$PIDS/node-$port.pid"; then
    echo "node-$port (id $id) is already running" >&2
    exit 1
  fi
  if port_in_use "$port"; then
    echo "error: port $port (node id $id is served on KV_BASE_PORT + id) is in use by another program" >&2
    exit 1
  fi
  local flags=(--bin kv-node --bin kv-bench)
  [ "$PROFILE" = release ] && flags+=(--release)
  cargo build "${flags[@]}"
  version=$(cluster_version "$seed")
  start "node-$port" "$port" "$BIN/kv-node" --port "$port" --data-dir "$DATA/node-$port" \
    --node-id "$id" --join "127.0.0.1:$seed"
  echo "started node-$port (id $id), joining through 127.0.0.1:$seed; its log: $LOGS/node-$port.log"
  wait_node "$port" 60 || exit 1
  # The join is a change once the seed applied it: version + 1 or newer.
  watch_layout "$seed" $((version + 1))
  echo "node $id serves on $KV_SCHEME://127.0.0.1:$port; proxies and kv-bench find it by themselves"
}

remove_node() {
  local id=${1:-} seed answer version port
  [[ $id =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 remove-node ID (a member id, as GET /-/cluster lists them)" >&2; exit 2; }
  port=$((BASE + id))
  # Ask a node other than the one leaving.
  local saved=("${NODE_PORTS[@]}")
  NODE_PORTS=()
  for p in "${saved[@]}"; do [ "$p" = "$port" ] || NODE_PORTS+=("$p"); done
  seed=$(seed_port) || exit 1
  NODE_PORTS=("${saved[@]}")
  answer=$(kvcurl -sS --max-time 10 -w '\n%{http_code}' -X DELETE "$KV_SCHEME://127.0.0.1:$seed/-/cluster/members/$id")
  local code=${answer##*$'\n'} body=${answer%$'\n'*}
  case "$code" in
    200|202) echo "node $id is leaving: $body" ;;
    *) echo "error: removing node $id was refused ($code): $body" >&2; exit 1 ;;
  esac
  version=$(grep -o '"version":[0-9]*' <<<"$body" | head -n 1 | cut -d: -f2)
  [ -x "$BIN/kv-bench" ] || cargo build $([ "$PROFILE" = release ] && echo --release) --bin kv-bench
  watch_layout "$seed" "${version:-0}"
  # The node exits by itself once it applied its removal.
  if [ -f "$PIDS/node-$port.pid" ]; then
    local pid deadline=$((SECONDS + 30))
    pid=$(cat "$PIDS/node-$port.pid")
    while running "$pid"; do
      if [ $SECONDS -ge $deadline ]; then
        echo "warning: node-$port (pid $pid) has not exited 30 s after the layout settled; see $LOGS/node-$port.log" >&2
        return 0
      fi
      sleep 0.1
    done
    rm -f "$PIDS/node-$port.pid"
    echo "node-$port exited: $(grep -o 'node [0-9]* was removed.*' "$LOGS/node-$port.log" | tail -n 1)"
  fi
  echo "its data dir $DATA/node-$port is no longer needed (a restart on it is refused): remove it when you like"
}

bench() {
  [ -x "$BIN/kv-bench" ] || cargo build -q $([ "$PROFILE" = release ] && echo --release) --bin kv-bench
  "$BIN/kv-bench" --nodes 3 --base-port "${NODE_PORTS[0]}" "$@"
  "$BIN/kv-bench" --proxy "$KV_SCHEME://127.0.0.1:$PROXY_PORT" "$@"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  bench) shift; bench "$@" ;;
  add-node) shift; add_node "$@" ;;
  remove-node) shift; remove_node "$@" ;;
  *) echo "usage: $0 up|status|bench|add-node [ID]|remove-node ID|down" >&2; exit 2 ;;
esac
