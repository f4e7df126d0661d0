#!/usr/bin/env bash
# Replicated kv against etcd, and against itself with one copy, in one run.
#
# What it measures (issue 12's figures; each system runs alone, one after the
# other, for ROUNDS rounds, and the medians are compared):
#   1. writes: kv with 3 replicas (--fsync always) through kv-proxy, vs a
#      3-member etcd cluster (Debian's etcd-server) over its HTTP/JSON gateway
#      (POST /v3/kv/put), vs kv with --replicas 1 (--fsync always) through
#      kv-proxy;
#   2. linearizable reads of existing keys: kv GET (--read-policy read-index;
#      and lease, the default since 2026-11-30; both passed explicitly),
#      etcd POST /v3/kv/range (linearizable, its default), kv --replicas 1 GET;
#   3. failover: KILLS times, kill -9 the node leading the most shards and time
#      each of its shards from the kill to the first acknowledged write of a
#      key in that shard, through the proxy; then restart it and wait until
#      every shard has a leader (not until leaders are back on their
#      preferred nodes: the next victim, whoever leads most, may lead 40).
# The same client drives every system: wrk, THREADS threads, CONNECTIONS
# connections, 100-byte values, KEYS distinct keys.
#
# Usage: scripts/bench-replication.sh   (env: DURATION=8s ROUNDS=3 KILLS=20
#        CONNECTIONS=64 THREADS=2 KEYS=10000 BASE_PORT=29080 SKIP_ETCD=1
#        KEEP_WORK=1 to keep the nodes' logs and data; REPLICAS="3 3lease 1"
#        the kv configurations to run, "3lease" being 3 replicas with
#        --read-policy lease; BIN=dir to run prebuilt kv-node and
#        kv-proxy from dir instead of building them, for A/B runs of two
#        builds side by side)
# Installs wrk, etcd-server and python3's xxhash module when missing.
# Everything started here is stopped on exit (trap); data lives in a temp dir.
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE
cd "$(dirname "$0")/.."
. scripts/lib.sh

DURATION=${DURATION:-8s}
ROUNDS=${ROUNDS:-3}
KILLS=${KILLS:-20}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
KEYS=${KEYS:-10000}
BASE_PORT=${BASE_PORT:-29080}
PROXY_PORT=$BASE_PORT
NODE_PORTS=($((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)))
ETCD_CLIENT=($((BASE_PORT + 11)) $((BASE_PORT + 12)) $((BASE_PORT + 13)))
ETCD_PEER=($((BASE_PORT + 21)) $((BASE_PORT + 22)) $((BASE_PORT + 23)))

ensure_packages wrk curl python3
[ -n "${SKIP_ETCD:-}" ] || ensure_packages etcd-server
python3 -c 'import xxhash' 2>/dev/null || python3 -m pip install --quiet xxhash

WORK=$(mktemp -d -t kv-bench-replication.XXXXXX)
PIDS=()
stop_pids() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    # Nodes are disowned, so `wait` returns before they have exited.
    wait_ports_free "$PROXY_PORT" "${NODE_PORTS[@]}" "${ETCD_CLIENT[@]}"
}
cleanup() {
    stop_pids
    if [ -n "${KEEP_WORK:-}" ]; then
        echo "logs and data kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT INT TERM

for port in "$PROXY_PORT" "${NODE_PORTS[@]}" "${ETCD_CLIENT[@]}" "${ETCD_PEER[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use; set BASE_PORT" >&2
        exit 1
    fi
done

if [ -z "${BIN:-}" ]; then
    echo "== building release binaries" >&2
    cargo build --release --quiet --bin kv-node --bin kv-proxy
    BIN=${CARGO_TARGET_DIR:-target}/release
fi
REPLICAS=${REPLICAS:-3 3lease 1}
PEERS="1=127.0.0.1:${NODE_PORTS[0]},2=127.0.0.1:${NODE_PORTS[1]},3=127.0.0.1:${NODE_PORTS[2]}"
NODE_PIDS=()

start_node() { # index (0-2), configuration (3, 3lease or 1), data dir
    local i=$1 replicas=${2%lease} dir=$3 policy=read-index
    [ "$2" = "$replicas" ] || policy=lease
    RUST_LOG=warn "$BIN/kv-node" --port "${NODE_PORTS[$i]}" --data-dir "$dir/node-$((i + 1))" \
        --node-id $((i + 1)) --peers "$PEERS" --replicas "$replicas" --fsync always \
        --read-policy "$policy" 2>>"$WORK/node-$((i + 1)).log" &
    NODE_PIDS[$i]=$!
    PIDS+=($!)
    disown $! 2>/dev/null || true
}

# Waits (bounded) until node $1's /-/shards shows a leader for every shard.
wait_leaders() {
    local port=$1 deadline=$((SECONDS + 60))
    until curl -fsS --max-time 1 "http://127.0.0.1:$port/-/shards" 2>/dev/null |
        python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if all(g.get("leader") for g in v["groups"]) else 1)'; do
        if [ $SECONDS -ge $deadline ]; then
            echo "error: node on port $port never saw a leader for every shard" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# Starts a kv cluster (3 nodes, configuration $1) and the proxy in front of it.
start_kv() {
    local replicas=$1 dir=$WORK/kv-r$1-$RANDOM i
    KV_DIR=$dir
    for i in 0 1 2; do start_node "$i" "$replicas" "$dir"; done
    for i in 0 1 2; do wait_healthy "127.0.0.1:${NODE_PORTS[$i]}" 60; done
    for i in 0 1 2; do wait_leaders "${NODE_PORTS[$i]}"; done
    RUST_LOG=warn "$BIN/kv-proxy" --port "$PROXY_PORT" \
        --nodes "127.0.0.1:${NODE_PORTS[0]},127.0.0.1:${NODE_PORTS[1]},127.0.0.1:${NODE_PORTS[2]}" \
        2>>"$WORK/proxy.log" &
    PIDS+=($!)
    wait_healthy "127.0.0.1:$PROXY_PORT" 30
}

start_etcd() {
    local dir=$WORK/etcd-$RANDOM i cluster=""
    for i in 0 1 2; do cluster="${cluster:+$cluster,}e$i=http://127.0.0.1:${ETCD_PEER[$i]}"; done
    for i in 0 1 2; do
        etcd --name "e$i" --data-dir "$dir/e$i" \
            --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
            --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
            --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token kv-bench --log-level error 2>>"$WORK/etcd-$i.log" &
        PIDS+=($!)
    done
    local deadline=$((SECONDS + 60))
    until curl -fsS --max-time 1 -X POST -d '{"key":"cHJvYmU=","value":"MQ=="}' \
        "http://127.0.0.1:${ETCD_CLIENT[0]}/v3/kv/put" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then echo "error: etcd never accepted a put" >&2; exit 1; fi
        sleep 0.1
    done
}

# The wrk scripts: the same keys and 100-byte values for every system.
python3 - "$KEYS" "$WORK" <<'PY'
import base64, sys
keys, work = int(sys.argv[1]), sys.argv[2]
value = "v" * 98  # the JSON string "vvv...v" is 100 bytes
b64 = lambda s: base64.b64encode(s.encode()).decode()
common = """
local n = %d
local threads = 0
function setup(thread) thread:set("offset", threads * 7919); threads = threads + 1 end
function init(args) i = (offset or 0) %% n end
local function next_i() i = i + 1; if i >= n then i = 0 end; return i end
""" % keys
with open(f"{work}/kv-put.lua", "w") as f:
    f.write(common + 'local body = \'{"value": "%s"}\'\n' % value +
            'wrk.headers["Content-Type"] = "application/json"\n'
            'function request() return wrk.format("PUT", "/bench_" .. next_i(), nil, body) end\n')
with open(f"{work}/kv-get.lua", "w") as f:
    f.write(common + 'function request() return wrk.format("GET", "/bench_" .. next_i()) end\n')
for name, path, with_value in (("etcd-put", "/v3/kv/put", True), ("etcd-get", "/v3/kv/range", False)):
    with open(f"{work}/{name}.lua", "w") as f:
        f.write(common + "local bodies = {}\n")
        for k in range(keys):
            body = '{"key":"%s"%s}' % (b64(f"bench_{k}"), ',"value":"%s"' % b64('"' + value + '"') if with_value else "")
            f.write("bodies[%d] = '%s'\n" % (k, body))
        f.write('function request() return wrk.format("POST", "%s", nil, bodies[next_i()]) end\n' % path)
PY

RESULTS=$WORK/results
: >"$RESULTS"
run_wrk() { # label, url, lua
    local label=$1 url=$2 lua=$3 out=$WORK/$1.$RANDOM.wrk
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$lua" "$url" >/dev/null # warm-up, not measured
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$lua" "$url" >"$out"
    local rps p99 errors
    rps=$(wrk_rps <"$out")
    p99=$(wrk_latency 99% <"$out")
    errors=$(awk '/Non-2xx|Socket errors/' "$out" | tr '\n' ' ')
    echo "$label $rps" >>"$RESULTS"
    printf '  %-12s %9.0f req/s  p99 %-9s %s\n' "$label" "$rps" "$p99" "$errors"
}

echo "== $ROUNDS rounds; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $KEYS keys, 100-byte values; $(nproc) cores shared with the client"
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round"
    for replicas in $REPLICAS; do
        start_kv "$replicas"
        run_wrk "kv-r$replicas-put" "http://127.0.0.1:$PROXY_PORT" "$WORK/kv-put.lua"
        run_wrk "kv-r$replicas-get" "http://127.0.0.1:$PROXY_PORT" "$WORK/kv-get.lua"
        stop_pids
    done
    if [ -z "${SKIP_ETCD:-}" ]; then
        start_etcd
        run_wrk etcd-put "http://127.0.0.1:${ETCD_CLIENT[0]}" "$WORK/etcd-put.lua"
        run_wrk etcd-get "http://127.0.0.1:${ETCD_CLIENT[0]}" "$WORK/etcd-get.lua"
        stop_pids
    fi
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, rps = line.split()
    runs.setdefault(label, []).append(float(rps))
med = {k: statistics.median(v) for k, v in runs.items()}
print("== medians (req/s)")
for k in sorted(med):
    print(f"  {k:12} {med[k]:9.0f}   runs: {', '.join(f'{x:.0f}' for x in runs[k])}")
def ratio(a, b, target):
    if a in med and b in med and med[b]:
        print(f"  {a} / {b}: {med[a] / med[b]:.2f}x  (target {target})")
print("== ratios")
ratio("kv-r3-put", "etcd-put", ">= 3x")
ratio("kv-r3-get", "etcd-get", "(reads, for reference)")
ratio("kv-r3-put", "kv-r1-put", ">= 0.5x")
ratio("kv-r3-get", "kv-r1-get", ">= 0.7x")
ratio("kv-r3lease-get", "kv-r1-get", ">= 0.7x, --read-policy lease")
ratio("kv-r3lease-get", "kv-r3-get", "lease vs read-index")
PY

[ "$KILLS" -gt 0 ] || exit 0
echo "== failover: $KILLS kills of the node leading the most shards (kill -9 to each of its shards' first acknowledged write)"
start_kv 3
FAILOVER_DIR=$KV_DIR
for kill in $(seq 1 "$KILLS"); do
    # Every node up and every shard led (leaders may not be balanced yet).
    for i in 0 1 2; do wait_leaders "${NODE_PORTS[$i]}"; done
    python3 - "$kill" "$PROXY_PORT" "$WORK/failover" "${NODE_PORTS[@]}" "${NODE_PIDS[@]}" <<'PY'
import http.client, json, os, signal, sys, threading, time, xxhash
kill_no, proxy, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ports, pids = [int(p) for p in sys.argv[4:7]], [int(p) for p in sys.argv[7:10]]
SEED = 0x6B762D7368617264  # kv-cluster's SHARD_SEED ("kv-shard")
def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()
view = json.loads(get(ports[0], "/-/shards")[1])
shards = view["shards"]
led = {}
for g in view["groups"]:
    led.setdefault(g["leader"], []).append(g["shard"])
victim = max(led, key=lambda n: len(led[n]))
victim_shards = led[victim]
keys = {}
i = 0
while len(keys) < len(victim_shards):
    key = f"failover_{i}"
    s = xxhash.xxh3_64_intdigest(key.encode(), seed=SEED) % shards
    if s in victim_shards and s not in keys:
        keys[s] = key
    i += 1
took = {}
def probe(shard, key, t0):
    body = json.dumps({"value": kill_no})
    while time.monotonic() - t0 < 30:
        try:
            c = http.client.HTTPConnection("127.0.0.1", proxy, timeout=5)
            c.request("PUT", "/" + key, body, {"Content-Type": "application/json"})
            r = c.getresponse(); r.read()
            if r.status == 200:
                took[shard] = time.monotonic() - t0
                return
        except OSError:
            pass
        time.sleep(0.005)  # a retry pace, not synchronisation
t0 = time.monotonic()
os.kill(pids[victim - 1], signal.SIGKILL)
threads = [threading.Thread(target=probe, args=(s, k, t0)) for s, k in keys.items()]
for t in threads: t.start()
for t in threads: t.join()
with open(out, "a") as f:
    for s in victim_shards:
        f.write(f"{took.get(s, 'inf')}\n")
print(f"  kill {kill_no}: node {victim} led {len(victim_shards)} shards; "
      f"first write after {min(took.values(), default=float('inf')):.2f}-{max(took.values(), default=float('inf')):.2f} s"
      + ("" if len(took) == len(victim_shards) else f"; {len(victim_shards) - len(took)} shards never answered in 30 s"))
print(victim, file=open(out + ".victim", "w"))
PY
    victim=$(cat "$WORK/failover.victim")
    wait "${NODE_PIDS[$((victim - 1))]}" 2>/dev/null || true
    start_node $((victim - 1)) 3 "$FAILOVER_DIR"
    wait_healthy "127.0.0.1:${NODE_PORTS[$((victim - 1))]}" 60
done
python3 - "$WORK/failover" <<'PY'
import statistics, sys
xs = sorted(float(l) for l in open(sys.argv[1]))
print(f"== failover over {len(xs)} shard recoveries: p50 {statistics.median(xs):.2f} s, "
      f"p99 {xs[min(len(xs) - 1, int(len(xs) * 0.99))]:.2f} s, max {xs[-1]:.2f} s  (targets: p50 <= 1 s, max <= 3 s)")
PY
