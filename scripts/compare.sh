#!/usr/bin/env bash
# The peer comparison of issue 5: kv measured beside its peers, in one run, on
# this machine, everything on 127.0.0.1.
#
#   1. kv-node vs Redis: the same set/get mix, value size and connection count
#      (kv-bench drives kv-node, redis-benchmark drives Redis).
#   2. kv-bench (with each of its two HTTP clients) vs wrk as load generators
#      against the same kv-node (GETs), with each generator's CPU per request.
#   3. kv-node with `kv-bench --workload seed` (the Flask tool's exact
#      sequence) vs the Flask store's published figures.
#   4. kv-proxy vs nginx `hash $request_uri consistent` over the same 3 nodes
#      (kv-proxy only if target/release/kv-proxy exists; skipped visibly
#      otherwise).
#
# Installs wrk, redis-server, redis-tools, nginx-light and curl from Debian's
# packages when missing, builds the release binaries, stops everything it
# started on exit, prints a side-by-side table and writes it as JSON.
#
# Settings (environment): DURATION (5s per measured run), ROUNDS (3: the
# two sides of a row run alternately ROUNDS times and the medians are
# reported, so a burst of load elsewhere does not decide a ratio), CONNS (64),
# VALUE_SIZE (100), KEYS (10000), REDIS_REQUESTS (200000 per redis-benchmark
# test), BASE_PORT (18081: nodes on BASE_PORT..+2, proxies and Redis above),
# OUT (bench-results/compare.json).
#
# Figures taken while other work runs on the machine are noisy: compare the
# ratios, which are measured side by side.
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE

cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
VALUE_SIZE=${VALUE_SIZE:-100}
KEYS=${KEYS:-10000}
REDIS_REQUESTS=${REDIS_REQUESTS:-200000}
BASE_PORT=${BASE_PORT:-18081}
OUT=${OUT:-bench-results/compare.json}
BIN=$ROOT/target/release

NODE_PORTS=("$BASE_PORT" "$((BASE_PORT + 1))" "$((BASE_PORT + 2))")
PROXY_PORT=$((BASE_PORT + 10))
NGINX_PORT=$((BASE_PORT + 11))
REDIS_PORT=$((BASE_PORT + 12))

log() { printf '== %s\n' "$*" >&2; }

# --- packages -----------------------------------------------------------------
install() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" ||
        { "${sudo[@]}" apt-get update && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"; }
}
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    install "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# --- build --------------------------------------------------------------------
log "building release binaries"
cargo build --release --quiet -p kv-node -p kv-bench
HAVE_PROXY=0
[ -x "$BIN/kv-proxy" ] && HAVE_PROXY=1

# --- processes ----------------------------------------------------------------
TMP=$(mktemp -d)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # URL: wait until it answers (bounded)
    for _ in $(seq 1 500); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.02
    done
    echo "nothing answers at $1" >&2
    return 1
}

start_node() { # PORT
    "$BIN/kv-node" --port "$1" --data-dir "$TMP/node-$1" 2>"$TMP/node-$1.log" &
    PIDS+=($!)
    wait_for "http://127.0.0.1:$1/-/health"
}

stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

# field NAME FILE [LINE]: a number from kv-bench's JSON lines (line 1 default)
field() {
    sed -n "${3:-1}p" "$2" | grep -o "\"$1\":[0-9.e+-]*" | head -1 | cut -d: -f2
}
# p99 (ms) of a kv-bench run
p99() {
    sed -n "${2:-1}p" "$1" | grep -o '"latency_ms":{[^}]*}' | grep -o '"p99":[0-9.]*' | cut -d: -f2
}
errors() { field errors_total "$1" "${2:-1}"; }
# checked FILE OUTPUT: stop if a kv-bench run saw any error (a wrong answer
# makes every figure of the run meaningless)
checked() {
    if grep -q '"errors_total":[1-9]' "$1"; then
        cat "$2" >&2
        echo "kv-bench saw errors in $1" >&2
        exit 1
    fi
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
round() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }

# --allow-errors: `checked` below shows the run's output and stops instead.
KVB=("$BIN/kv-bench" --quiet --allow-errors --concurrency "$CONNS" --value-size "$VALUE_SIZE" --keys "$KEYS")
ROWS=()   # "what|kv|peer|ratio" lines for the table
JSON=()   # JSON objects

row() { # NAME KV_LABEL KV_OPS KV_P99 PEER_LABEL PEER_OPS PEER_P99 NOTE
    local r kp pp
    r=$(ratio "$3" "$6")
    kp=${4:+p99 $4 ms}
    pp=${7:+p99 $7 ms}
    ROWS+=("$1|$2: $(round "$3") ops/s${kp:+, $kp}|$5: $(round "$6") ops/s${pp:+, $pp}|${r}x")
    JSON+=("{\"comparison\":\"$1\",\"kv\":\"$2\",\"kv_ops_per_sec\":$3,\"kv_p99_ms\":${4:-null},\"peer\":\"$5\",\"peer_ops_per_sec\":$6,\"peer_p99_ms\":${7:-null},\"ratio\":${r/n\/a/null},\"note\":\"$8\"}")
}

# --- 1. kv-node vs Redis --------------------------------------------------------
log "1/4 kv-node vs Redis (set=1,get=1, ${VALUE_SIZE}-byte values, $CONNS connections, $ROUNDS rounds)"
start_node "${NODE_PORTS[0]}"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$TMP" --daemonize no >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 500); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.02; done
# CSV: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
redis_col() { grep "^\"$1\"" "$TMP/redis.csv" | tr -d '"' | cut -d, -f"$2"; }
KV_OPS=(); KV_P99=(); REDIS_OPS=(); REDIS_P99=(); REDIS_NOTE=()
for round in $(seq 1 "$ROUNDS"); do
    "${KVB[@]}" --urls "127.0.0.1:${NODE_PORTS[0]}" --mix set=1,get=1 --preload \
        --duration "$DURATION" --json "$TMP/kv-mix.json" >"$TMP/kv-mix.out"
    checked "$TMP/kv-mix.json" "$TMP/kv-mix.out"
    KV_OPS+=("$(field ops_per_sec "$TMP/kv-mix.json")"); KV_P99+=("$(p99 "$TMP/kv-mix.json")")
    redis-benchmark -p "$REDIS_PORT" -t set,get -c "$CONNS" -d "$VALUE_SIZE" -r "$KEYS" \
        -n "$REDIS_REQUESTS" --csv >"$TMP/redis.csv" 2>/dev/null
    SET_RPS=$(redis_col SET 2); GET_RPS=$(redis_col GET 2)
    # Half sets, half gets: the mixed rate is the harmonic mean of the two.
    REDIS_OPS+=("$(awk -v s="$SET_RPS" -v g="$GET_RPS" 'BEGIN { printf "%.1f", 2 / (1 / s + 1 / g) }')")
    REDIS_P99+=("$(awk -v s="$(redis_col SET 7)" -v g="$(redis_col GET 7)" 'BEGIN { print (s > g ? s : g) }')")
    REDIS_NOTE+=("SET $SET_RPS GET $GET_RPS")
    log "  round $round: kv-node ${KV_OPS[-1]} ops/s, Redis ${REDIS_OPS[-1]} ops/s (${REDIS_NOTE[-1]})"
done
stop_all
row "kv-node vs Redis (set/get 1:1)" "kv-node (kv-bench)" "$(median "${KV_OPS[@]}")" "$(median "${KV_P99[@]}")" \
    "Redis (redis-benchmark)" "$(median "${REDIS_OPS[@]}")" "$(median "${REDIS_P99[@]}")" \
    "medians of $ROUNDS alternating rounds; Redis runs SET and GET as separate tests (per round: ${REDIS_NOTE[*]}), mixed = their harmonic mean, p99 = the worse of the two"

# --- 2. kv-bench vs wrk ---------------------------------------------------------
log "2/4 kv-bench vs wrk against the same kv-node (GET, $CONNS connections, $ROUNDS rounds)"
start_node "${NODE_PORTS[0]}"
VALUE=$(head -c "$VALUE_SIZE" </dev/zero | tr '\0' x)
curl -sf -X PUT -H 'content-type: application/json' \
    --data "{\"value\":\"$VALUE\"}" "http://127.0.0.1:${NODE_PORTS[0]}/wrk-key" >/dev/null
# Each generator's own CPU (user + system seconds, bash's `time`) per request.
TIMEFORMAT='%U %S'
cpu_per_request() { awk -v n="$2" '{ printf "%.1f", ($1 + $2) * 1e6 / n }' "$1"; }
WRK_RPS=(); WRK_P99=(); WRK_CPU=()
declare -A KVG_OPS=() KVG_P99=() KVB_CPU=()
for round in $(seq 1 "$ROUNDS"); do
    { time wrk -t2 -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:${NODE_PORTS[0]}/wrk-key" >"$TMP/wrk.out"; } 2>"$TMP/wrk.time"
    WRK_RPS+=("$(awk '/^Requests\/sec:/ { print $2 }' "$TMP/wrk.out")")
    # wrk prints "99%  1.23ms" (or us / s)
    WRK_P99+=("$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } print v }' "$TMP/wrk.out")")
    WRK_CPU+=("$(cpu_per_request "$TMP/wrk.time" "$(awk '/requests in/ { print $1 }' "$TMP/wrk.out")")")
    line="wrk ${WRK_RPS[-1]} req/s (${WRK_CPU[-1]} us CPU/req)"
    for client in hyper lean; do
        # No --preload here (its SETs would cost CPU without counting as
        # requests): every GET of a never-set key must answer 404, checked too.
        { time "${KVB[@]}" --client "$client" --urls "127.0.0.1:${NODE_PORTS[0]}" --mix get=1 \
            --duration "$DURATION" --json "$TMP/kv-get.json" >"$TMP/kv-get.out"; } 2>"$TMP/kvb.time"
        checked "$TMP/kv-get.json" "$TMP/kv-get.out"
        ops=$(field ops_per_sec "$TMP/kv-get.json")
        cpu=$(cpu_per_request "$TMP/kvb.time" "$(field operations "$TMP/kv-get.json")")
        KVG_OPS[$client]+="$ops "; KVG_P99[$client]+="$(p99 "$TMP/kv-get.json") "; KVB_CPU[$client]+="$cpu "
        line="$line, kv-bench --client $client $ops ops/s ($cpu us CPU/req)"
    done
    log "  round $round: $line"
done
stop_all
for client in hyper lean; do
    # shellcheck disable=SC2086 # the per-round figures are space-separated
    row "kv-bench --client $client vs wrk (GET, same kv-node)" "kv-bench --client $client" \
        "$(median ${KVG_OPS[$client]})" "$(median ${KVG_P99[$client]})" \
        "wrk -t2" "$(median "${WRK_RPS[@]}")" "$(median "${WRK_P99[@]}")" \
        "medians of $ROUNDS alternating rounds; generator CPU per request: kv-bench $(median ${KVB_CPU[$client]}) us, wrk $(median "${WRK_CPU[@]}") us; wrk GETs one key and checks nothing, kv-bench GETs $KEYS keys and checks every answer"
done

# --- 3. seed workload vs the Flask store ----------------------------------------
log "3/4 --workload seed over 1, 2, 3 kv-nodes vs the Flask store's published figures"
for p in "${NODE_PORTS[@]}"; do start_node "$p"; done
for round in $(seq 1 "$ROUNDS"); do
    "$BIN/kv-bench" --quiet --allow-errors --workload seed --nodes 3 --base-port "$BASE_PORT" \
        --json "$TMP/seed-$round.json" >"$TMP/seed.out"
    checked "$TMP/seed-$round.json" "$TMP/seed.out"
done
stop_all
FLASK=(1100 1700 2000)
for n in 1 2 3; do
    SEED_OPS=(); SEED_P99=()
    for round in $(seq 1 "$ROUNDS"); do
        SEED_OPS+=("$(field ops_per_sec "$TMP/seed-$round.json" "$n")")
        SEED_P99+=("$(p99 "$TMP/seed-$round.json" "$n")")
    done
    row "seed workload, $n node(s), vs Flask" "kv-node" "$(median "${SEED_OPS[@]}")" \
        "$(median "${SEED_P99[@]}")" "Flask (published)" "${FLASK[$((n - 1))]}" "" \
        "600 ops at concurrency 250 as the Flask tool, median of $ROUNDS; Flask figure from its README, not measured here"
done

# --- 4. kv-proxy vs nginx -------------------------------------------------------
log "4/4 proxies over 3 kv-nodes (set=1,get=1, $CONNS connections)"
for p in "${NODE_PORTS[@]}"; do start_node "$p"; done
. scripts/nginx-hash.sh
nginx_hash_conf "$TMP/nginx" "$NGINX_PORT" "${NODE_PORTS[@]}"
"$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/stdout.log" 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$NGINX_PORT/-/health"
if [ "$HAVE_PROXY" = 1 ]; then
    "$BIN/kv-proxy" --port "$PROXY_PORT" \
        --nodes "127.0.0.1:${NODE_PORTS[0]},127.0.0.1:${NODE_PORTS[1]},127.0.0.1:${NODE_PORTS[2]}" \
        2>"$TMP/proxy.log" &
    PIDS+=($!)
    wait_for "http://127.0.0.1:$PROXY_PORT/-/health"
fi
NGINX_OPS=(); NGINX_P99=(); PROXY_OPS=(); PROXY_P99=()
for round in $(seq 1 "$ROUNDS"); do
    "${KVB[@]}" --proxy "http://127.0.0.1:$NGINX_PORT" --mix set=1,get=1 --preload \
        --duration "$DURATION" --json "$TMP/nginx.json" >"$TMP/nginx-bench.out"
    checked "$TMP/nginx.json" "$TMP/nginx-bench.out"
    NGINX_OPS+=("$(field ops_per_sec "$TMP/nginx.json")"); NGINX_P99+=("$(p99 "$TMP/nginx.json")")
    if [ "$HAVE_PROXY" = 1 ]; then
        "${KVB[@]}" --proxy "http://127.0.0.1:$PROXY_PORT" --mix set=1,get=1 --preload \
            --duration "$DURATION" --json "$TMP/proxy.json" >"$TMP/proxy-bench.out"
        checked "$TMP/proxy.json" "$TMP/proxy-bench.out"
        PROXY_OPS+=("$(field ops_per_sec "$TMP/proxy.json")"); PROXY_P99+=("$(p99 "$TMP/proxy.json")")
        log "  round $round: kv-proxy ${PROXY_OPS[-1]} ops/s, nginx ${NGINX_OPS[-1]} ops/s"
    else
        log "  round $round: nginx ${NGINX_OPS[-1]} ops/s"
    fi
done
stop_all
if [ "$HAVE_PROXY" = 1 ]; then
    row "kv-proxy vs nginx (3 nodes, set/get 1:1)" "kv-proxy" "$(median "${PROXY_OPS[@]}")" \
        "$(median "${PROXY_P99[@]}")" "nginx hash consistent" "$(median "${NGINX_OPS[@]}")" "$(median "${NGINX_P99[@]}")" \
        "medians of $ROUNDS alternating rounds; both driven by kv-bench --proxy, every answer checked"
else
    log "kv-proxy vs nginx: SKIPPED kv-proxy (no $BIN/kv-proxy on this branch); nginx measured alone"
    N_OPS=$(median "${NGINX_OPS[@]}"); N_P99=$(median "${NGINX_P99[@]}")
    ROWS+=("kv-proxy vs nginx (3 nodes, set/get 1:1)|kv-proxy: SKIPPED (not built)|nginx hash consistent: $(round "$N_OPS") ops/s, p99 $N_P99 ms|n/a")
    JSON+=("{\"comparison\":\"kv-proxy vs nginx (3 nodes, set/get 1:1)\",\"kv\":\"kv-proxy\",\"kv_ops_per_sec\":null,\"kv_p99_ms\":null,\"peer\":\"nginx hash consistent\",\"peer_ops_per_sec\":$N_OPS,\"peer_p99_ms\":$N_P99,\"ratio\":null,\"note\":\"skipped: target/release/kv-proxy not built\"}")
fi

# --- report ---------------------------------------------------------------------
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
CPU=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || uname -m)
CORES=$(nproc)
MACHINE="$CPU, $CORES cores, $(uname -sr)"
echo
echo "kv peer comparison — $DATE — $MACHINE"
echo "(medians of $ROUNDS alternating ${DURATION} rounds, $CONNS connections, ${VALUE_SIZE}-byte values, $KEYS keys; all on 127.0.0.1, client and server sharing the cores)"
echo
{
    echo "comparison|kv|peer|kv / peer"
    echo "---|---|---|---"
    printf '%s\n' "${ROWS[@]}"
} | awk -F'|' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'

mkdir -p "$(dirname "$OUT")"
{
    printf '{"date":"%s","machine":"%s","duration":"%s","rounds":%s,"connections":%s,"value_size":%s,"keys":%s,"rows":[' \
        "$DATE" "$MACHINE" "$DURATION" "$ROUNDS" "$CONNS" "$VALUE_SIZE" "$KEYS"
    (IFS=,; printf '%s' "${JSON[*]}")
    printf ']}\n'
} >"$OUT"
echo
echo "written to $OUT"
