#!/usr/bin/env bash
# Adding a node to a loaded cluster: issue 13's figures (docs/membership.md §10).
#
# What it does: 3 kv-nodes (--replicas 3, 64 shards, --fsync everysec and the
# default --max-moves / --move-bytes-per-sec unless MOVE_FLAGS says otherwise)
# behind kv-proxy; loads KEYS keys with 100-byte values through the proxy
# (kv-bench --preload --keep-keys); then, all through the proxy with kv-bench
# (MIX, CONCURRENCY connections, the same keys):
#   1. max:    a closed-loop run of DURATION: the most the cluster serves now;
#   2. before: an open-loop run (kv-bench --rate) at RATE_FRACTION of max for
#              DURATION;
#   3. during: the same open-loop run, started just before node 4 is started
#              with --join and ended (kv-bench --stop-file) as soon as
#              `kv-bench cluster-watch` sees the layout settled.
#
# How the figures are defined:
#   wall time        node 4's start (--join) to the first settled view of a
#                    newer placement version (cluster-watch, polled every 250 ms).
#   bytes moved      the growth of kv_raft_snapshot_bytes_sent_total (every
#                    peer, summed over the 4 nodes) across the add: the
#                    snapshots the moves sent, plus any sent to a lagging
#                    replica meanwhile. Log catch-up after a snapshot is not
#                    counted (no counter; it is bounded by
#                    --raft-log-max-bytes per shard).
#   ideal            one copy of the data x replicas x the fraction of replicas
#                    the ring diff moves (= data x moved / shards), where one
#                    copy of the data is what the keys and values weigh (key
#                    + value JSON text, no framing), and "moved" is node 4's
#                    shards once settled (each move swaps one replica into
#                    it). The 1/(N+1) ideal, shards x replicas / 4 replicas,
#                    is printed beside it.
#   throughput       completed requests / the window's length; "during" over
#                    "before" (target >= 0.7). With an open loop, a cluster
#                    that keeps up serves the rate in both windows, so the
#                    ratio is below 1 only when it fell behind.
#   p99              kv-bench's latency corrected for coordinated omission
#                    (from each request's due time); "during" over "before"
#                    (target <= 2).
#   also shown        421s the proxy followed, its waits for a leader and its
#                    503s, and the leader changes the nodes' groups saw
#                    (kv_raft_leader_changes_total, summed over replicas), over
#                    the add and, for comparison, over the "before" window; the
#                    seconds snapshot sends waited for the throttle.
#
# Usage: scripts/bench-membership.sh [--json FILE]
#   env: KEYS=1000000 (KEYS=50000 for a quick run)  DURATION=20s
#        RATE_FRACTION=0.5  MIX=get=9,set=1  CONCURRENCY=64  BASE_PORT=29180
#        MOVE_TIMEOUT=20m (bound on the add)  MOVE_FLAGS="--max-moves 4 ..."
#        (extra kv-node flags, to compare throttles)  BIN=dir (prebuilt
#        kv-node, kv-proxy, kv-bench)  KEEP_WORK=1 (keep logs and data)
# Everything started here is stopped on exit (trap); data lives in a temp dir.
set -euo pipefail
# Benchmarks measure the path without tokens.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE
cd "$(dirname "$0")/.."
. scripts/lib.sh

JSON_OUT=""
while [ $# -gt 0 ]; do
    case $1 in
        --json) JSON_OUT=${2:?--json needs a file}; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $JSON_OUT in "" | /*) ;; *) JSON_OUT=$PWD/$JSON_OUT ;; esac

KEYS=${KEYS:-1000000}
DURATION=${DURATION:-20s}
RATE_FRACTION=${RATE_FRACTION:-0.5}
MIX=${MIX:-get=9,set=1}
CONCURRENCY=${CONCURRENCY:-64}
BASE_PORT=${BASE_PORT:-29180}
MOVE_TIMEOUT=${MOVE_TIMEOUT:-20m}
MOVE_FLAGS=${MOVE_FLAGS:-}
SHARDS=64
REPLICAS=3
PREFIX=mb
PROXY_PORT=$BASE_PORT
NODE_PORTS=($((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)) $((BASE_PORT + 4)))

ensure_packages curl python3

WORK=$(mktemp -d -t kv-bench-membership.XXXXXX)
PIDS=()
stop_pids() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    # Nodes are disowned, so `wait` returns before they have exited.
    wait_ports_free "$PROXY_PORT" "${NODE_PORTS[@]}"
}
cleanup() {
    stop_pids || true
    if [ -n "${KEEP_WORK:-}" ]; then
        echo "logs and data kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT INT TERM

for port in "$PROXY_PORT" "${NODE_PORTS[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use; set BASE_PORT" >&2
        exit 1
    fi
done

if [ -z "${BIN:-}" ]; then
    echo "== building release binaries" >&2
    cargo build --release --quiet -p kv-node -p kv-proxy -p kv-bench
    BIN=${CARGO_TARGET_DIR:-target}/release
fi

PEERS="1=127.0.0.1:${NODE_PORTS[0]},2=127.0.0.1:${NODE_PORTS[1]},3=127.0.0.1:${NODE_PORTS[2]}"
# $MOVE_FLAGS is split on purpose: several flags in one variable.
# shellcheck disable=SC2086
start_node() { # id (1-4)
    local id=$1 cluster_flags
    if [ "$id" -le 3 ]; then
        cluster_flags=(--peers "$PEERS" --replicas "$REPLICAS" --shards "$SHARDS")
    else
        cluster_flags=(--join "127.0.0.1:${NODE_PORTS[0]}" --advertise "127.0.0.1:${NODE_PORTS[$((id - 1))]}")
    fi
    RUST_LOG=warn "$BIN/kv-node" --port "${NODE_PORTS[$((id - 1))]}" --data-dir "$WORK/node-$id" \
        --node-id "$id" "${cluster_flags[@]}" $MOVE_FLAGS 2>>"$WORK/node-$id.log" &
    PIDS+=($!)
    disown $! 2>/dev/null || true
}

# Waits (bounded) until node $1 (1-4) answers /-/ready: every shard it hosts
# has a leader with a quorum.
wait_ready() {
    local port=${NODE_PORTS[$(($1 - 1))]} deadline=$((SECONDS + 120))
    until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/-/ready" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            echo "error: node $1 not ready after 120 s: $(curl -s --max-time 1 "http://127.0.0.1:$port/-/ready" | head -c 300)" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# Sum of a metric family (every label set) over the nodes given (1-4).
metric_sum() { # name node...
    local name=$1 id
    shift
    for id in "$@"; do
        curl -fsS --max-time 5 "http://127.0.0.1:${NODE_PORTS[$((id - 1))]}/-/metrics"
    done | awk -v n="$name" '$1 == n || index($1, n "{") == 1 {s += $2} END {printf "%.3f\n", s}'
}

# The figure FIELD (a dotted path) of the last run in kv-bench's JSON file.
run_field() { # file field
    python3 - "$1" "$2" <<'PY'
import json, sys
run = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][-1]
v = run
for k in sys.argv[2].split("."):
    v = v[k]
print(v)
PY
}

PROXY_URL=http://127.0.0.1:$PROXY_PORT
# The same keys in every run (prefix, count); any concurrency.
BENCH=("$BIN/kv-bench" --proxy "$PROXY_URL" --keys "$KEYS" --prefix "$PREFIX" --keep-keys --quiet)

echo "== $KEYS keys, 100-byte values; 3 nodes x $SHARDS shards x $REPLICAS replicas; $(nproc) cores shared with the client; load: $(uptime | sed 's/.*load average/load average/')"
for id in 1 2 3; do start_node "$id"; done
for id in 1 2 3; do wait_healthy "127.0.0.1:${NODE_PORTS[$((id - 1))]}" 60; done
for id in 1 2 3; do wait_ready "$id"; done
RUST_LOG=warn "$BIN/kv-proxy" --port "$PROXY_PORT" \
    --nodes "127.0.0.1:${NODE_PORTS[0]},127.0.0.1:${NODE_PORTS[1]},127.0.0.1:${NODE_PORTS[2]}" \
    2>>"$WORK/proxy.log" &
PIDS+=($!)
wait_healthy "127.0.0.1:$PROXY_PORT" 30

echo "== loading $KEYS keys through the proxy"
load_start=$SECONDS
# Bounded: 1M keys load in a few minutes even on a loaded machine.
timeout 1800 "${BENCH[@]}" --preload --mix get=1 -n "$CONCURRENCY" -c "$CONCURRENCY" \
    --json "$WORK/load.json" >"$WORK/load.out"
echo "   loaded in $((SECONDS - load_start)) s"

echo "== max: closed loop, $MIX, $CONCURRENCY connections, $DURATION"
timeout 600 "${BENCH[@]}" --mix "$MIX" -c "$CONCURRENCY" -d "$DURATION" --json "$WORK/max.json" >"$WORK/max.out"
MAX=$(run_field "$WORK/max.json" ops_per_sec)
RATE=$(python3 -c "print(max(1, round($MAX * $RATE_FRACTION)))")
printf '   %.0f req/s; the open-loop runs send %s req/s (%s of it)\n' "$MAX" "$RATE" "$RATE_FRACTION"

proxy_metrics() {
    curl -fsS --max-time 5 "$PROXY_URL/-/metrics" | awk '
        $1 ~ /^kv_proxy_not_leader_total/ {nl += $2}
        $1 ~ /^kv_proxy_leader_waits_total/ {lw += $2}
        $1 ~ /^kv_proxy_no_leader_total/ {no += $2}
        END {printf "%d %d %d\n", nl, lw, no}'
}
# The same counts over the "before" window: what the load alone causes
# (elections of a starved node, say), to compare with the add's.
PROXY_BASE=$(proxy_metrics)
LEADER_CHANGES_BASE=$(metric_sum kv_raft_leader_changes_total 1 2 3)
echo "== before: open loop at $RATE req/s, $DURATION"
timeout 600 "${BENCH[@]}" --mix "$MIX" -c "$CONCURRENCY" -d "$DURATION" --rate "$RATE" \
    --json "$WORK/before.json" >"$WORK/before.out"

VERSION=$(curl -fsS --max-time 5 "http://127.0.0.1:${NODE_PORTS[0]}/-/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
SNAP_BEFORE=$(metric_sum kv_raft_snapshot_bytes_sent_total 1 2 3)
PROXY_BEFORE=$(proxy_metrics)
LEADER_CHANGES_BEFORE=$(metric_sum kv_raft_leader_changes_total 1 2 3)
THROTTLED_BEFORE=$(metric_sum kv_raft_snapshot_throttled_seconds_total 1 2 3)

echo "== during: the same load while node 4 joins (placement version $VERSION before)"
# The run's bound is the add's bound plus a margin; the stop file ends it.
timeout_s=$(python3 -c "
import re
m = re.fullmatch(r'(\d+)(ms|s|m|h)?', '$MOVE_TIMEOUT')
print(int(m.group(1)) * {'ms': 0.001, 's': 1, 'm': 60, 'h': 3600, None: 1}[m.group(2)])")
"${BENCH[@]}" --mix "$MIX" -c "$CONCURRENCY" -d "$((timeout_s + 60))s" --rate "$RATE" \
    --stop-file "$WORK/settled" --allow-errors --json "$WORK/during.json" >"$WORK/during.out" 2>&1 &
DURING_PID=$!
PIDS+=($DURING_PID)
# Its "Run:" line comes once it is about to connect: the load is on.
deadline=$((SECONDS + 30))
until grep -q '^Run:' "$WORK/during.out" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "error: kv-bench did not start" >&2; exit 1; }
    sleep 0.05
done
t0=$(date +%s.%N)
start_node 4
watch_rc=0
"$BIN/kv-bench" cluster-watch --node "127.0.0.1:${NODE_PORTS[0]}" --min-version $((VERSION + 1)) \
    --timeout "$MOVE_TIMEOUT" >"$WORK/watch.out" 2>&1 || watch_rc=$?
t1=$(date +%s.%N)
touch "$WORK/settled"
deadline=$((SECONDS + 60))
while kill -0 "$DURING_PID" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "error: kv-bench did not stop after the stop file" >&2; exit 1; }
    sleep 0.1
done
wait "$DURING_PID" || { echo "error: the during run failed:" >&2; tail -20 "$WORK/during.out" >&2; exit 1; }
if [ "$watch_rc" -ne 0 ]; then
    echo "error: the layout did not settle within $MOVE_TIMEOUT (cluster-watch exit $watch_rc):" >&2
    tail -5 "$WORK/watch.out" >&2
    exit 1
fi
tail -1 "$WORK/watch.out" | sed 's/^/   /'

SNAP_AFTER=$(metric_sum kv_raft_snapshot_bytes_sent_total 1 2 3 4)
THROTTLED_AFTER=$(metric_sum kv_raft_snapshot_throttled_seconds_total 1 2 3 4)
PROXY_AFTER=$(proxy_metrics)
# Node 4's own count starts at its start: its changes are all during the add.
LEADER_CHANGES_AFTER=$(metric_sum kv_raft_leader_changes_total 1 2 3 4)
curl -fsS --max-time 5 "http://127.0.0.1:${NODE_PORTS[0]}/-/cluster" >"$WORK/cluster-after.json"
for id in 1 2 3 4; do
    curl -fsS --max-time 5 "http://127.0.0.1:${NODE_PORTS[$((id - 1))]}/-/metrics" >"$WORK/metrics-$id.txt" || true
done

echo "== machine load at the end: $(uptime | sed 's/.*load average/load average/')"
python3 - "$WORK" "$t0" "$t1" "$SNAP_BEFORE" "$SNAP_AFTER" "$THROTTLED_BEFORE" "$THROTTLED_AFTER" \
    "$KEYS" "$PREFIX" "$SHARDS" "$REPLICAS" "$RATE" "$MAX" "$(uptime)" "$JSON_OUT" "$MOVE_FLAGS" \
    "$PROXY_BASE" "$PROXY_BEFORE" "$PROXY_AFTER" "$LEADER_CHANGES_BASE" "$LEADER_CHANGES_BEFORE" "$LEADER_CHANGES_AFTER" <<'PY'
import json, sys
(work, t0, t1, snap0, snap1, thr0, thr1, keys, prefix, shards, replicas, rate, top,
 uptime, json_out, move_flags, proxyb, proxy0, proxy1, lcb, lc0, lc1) = sys.argv[1:]
keys, shards, replicas = int(keys), int(shards), int(replicas)
last = lambda name: [json.loads(l) for l in open(f"{work}/{name}.json") if l.strip()][-1]
before, during = last("before"), last("during")
cluster = json.load(open(f"{work}/cluster-after.json"))
moved = next(m["shards_hosted"] for m in cluster["members"] if m["id"] == 4)
wall = float(t1) - float(t0)
moved_bytes = round(float(snap1) - float(snap0))
# One copy of the data: every key (kv-bench's "<prefix>p_<i>") and its value
# as stored, the JSON text of a 100-character string (102 bytes).
value_bytes = before["value_size"] + 2
data = sum(len(f"{prefix}p_{i}") for i in range(keys)) + keys * value_bytes
ideal = data * replicas * moved / (shards * replicas)
ideal_n1 = data * replicas / 4
p99 = lambda run: run["corrected_latency_ms"]["p99"]
tput = during["ops_per_sec"] / before["ops_per_sec"]
lat = p99(during) / p99(before)
figures = {
    "keys": keys, "value_bytes": before["value_size"], "shards": shards, "replicas": replicas,
    "move_flags": move_flags,
    "max_ops_per_sec": float(top), "rate": float(rate),
    "wall_s": round(wall, 2), "moves": moved, "moves_ideal": shards * replicas / 4,
    "bytes_moved": moved_bytes, "bytes_ideal": round(ideal), "bytes_ideal_1_over_n1": round(ideal_n1),
    "data_bytes_one_copy": data,
    "throttled_s": round(float(thr1) - float(thr0), 2),
    "before": {"ops_per_sec": before["ops_per_sec"], "p99_ms": p99(before),
               "p50_ms": before["corrected_latency_ms"]["p50"], "errors": before["errors_total"]},
    "during": {"ops_per_sec": during["ops_per_sec"], "p99_ms": p99(during),
               "p50_ms": during["corrected_latency_ms"]["p50"], "errors": during["errors_total"],
               "seconds": during["seconds"]},
    "throughput_ratio": round(tput, 3), "throughput_target": 0.7, "throughput_pass": tput >= 0.7,
    "p99_ratio": round(lat, 3), "p99_target": 2.0, "p99_pass": lat <= 2.0,
    "uptime": uptime.strip(),
    # What the proxy met during the add: 421s followed (a shard's leader
    # moved), waits for a leader, 503s for want of one.
    "proxy_not_leader": int(proxy1.split()[0]) - int(proxy0.split()[0]),
    "proxy_leader_waits": int(proxy1.split()[1]) - int(proxy0.split()[1]),
    "proxy_no_leader": int(proxy1.split()[2]) - int(proxy0.split()[2]),
    "leader_changes_seen": round(float(lc1) - float(lc0)),
    "before_proxy_not_leader": int(proxy0.split()[0]) - int(proxyb.split()[0]),
    "before_proxy_leader_waits": int(proxy0.split()[1]) - int(proxyb.split()[1]),
    "before_leader_changes_seen": round(float(lc0) - float(lcb)),
}
mb = lambda b: f"{b / 1e6:.1f} MB"
verdict = lambda ok: "PASS" if ok else "MISS"
print(f"== adding node 4 to 3 nodes holding {keys:,} keys ({mb(data)} a copy)")
rows = [
    ("wall time (join -> settled)", f"{wall:.1f} s", f"{moved} moves (ideal {shards * replicas // 4})", ""),
    ("bytes moved (snapshots sent)", mb(moved_bytes),
     f"{moved_bytes / ideal:.2f}x the ideal {mb(ideal)} ({mb(ideal_n1)} at 1/(N+1))", ""),
    ("throughput before / during", f"{before['ops_per_sec']:.0f} / {during['ops_per_sec']:.0f} req/s",
     f"{tput:.2f}x (target >= 0.7x)", verdict(tput >= 0.7)),
    ("p99 before / during (corrected)", f"{p99(before):.2f} / {p99(during):.2f} ms",
     f"{lat:.2f}x (target <= 2x)", verdict(lat <= 2.0)),
    ("errors before / during", f"{before['errors_total']} / {during['errors_total']}", "", ""),
]
for name, value, ratio, ok in rows:
    print(f"  {name:32} {value:26} {ratio:44} {ok}")
print(f"  (during the add: {figures['proxy_not_leader']} 421s followed and {figures['proxy_leader_waits']} "
      f"leader waits at the proxy, {figures['proxy_no_leader']} 503s; {figures['leader_changes_seen']} leader "
      f"changes seen by the nodes' groups; {wall / max(moved, 1):.2f} s per move;\n"
      f"   before it: {figures['before_proxy_not_leader']} 421s, {figures['before_proxy_leader_waits']} waits, "
      f"{figures['before_leader_changes_seen']} leader changes)")
print(f"  (open loop at {float(rate):.0f} req/s = {float(rate) / float(top):.2f} of the closed-loop "
      f"{float(top):.0f} req/s; snapshot sends waited {figures['throttled_s']} s for the throttle)")
if json_out:
    with open(json_out, "w") as f:
        json.dump(figures, f, indent=1)
        f.write("\n")
    print(f"  figures written to {json_out}")
PY
