#!/usr/bin/env bash
# Where a replicated PUT's CPU goes: per-write costs of 3-node clusters,
# configurations side by side in the same minutes (docs/replication.md §15.2).
#
#   scripts/profile-replication.sh [seconds] [rounds]   (default 6 s, 2 rounds)
#
# Each run starts 3 kv-nodes (--peers, --fsync everysec, 64 shards unless the
# configuration says otherwise), waits for a leader of every shard, warms up
# 2 s, then drives PUTs of 100-byte values with kv-bench (64 connections,
# routed client-side to each shard's leader: no proxy, no forwarding) and
# prints, per acknowledged write:
#   - the nodes' CPU (utime + stime from /proc, each node and the sum; the
#     load generator is not counted);
#   - the nodes' counter deltas from /-/metrics, summed over the three nodes
#     (kv_raft_append_posts_total = node-to-node POST /-/raft/append,
#     kv_raft_append_rpcs_total = openraft appends and heartbeats they carry,
#     kv_wal_records_total, kv_wal_writes_total);
#   - with STAT=1, syscalls and context switches (perf stat on the nodes);
#   - with PERF=1, a `perf record -g` per node is kept in the work dir
#     (KEEP_WORK=1 keeps it; PERF_ARGS overrides `-F 499 -g`, e.g.
#     "-F 199 --call-graph dwarf,16384" for full Rust stacks).
# CONFIGS (default "r1 r3 r3s8"): rN = --replicas N; a suffix sM = --shards M.
# Rounds alternate the configurations, so a loaded machine hits all alike.
# BIN=dir runs prebuilt kv-node and kv-bench from dir (default: build them).
set -euo pipefail
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE
cd "$(dirname "$0")/.."
. scripts/lib.sh

SECS=${1:-6}
ROUNDS=${2:-2}
BASE=${BASE_PORT:-31000}
CONFIGS=${CONFIGS:-r1 r3 r3s8}
ensure_packages curl python3
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p kv-node -p kv-bench
    BIN=${CARGO_TARGET_DIR:-target}/release
fi
if [ -n "${PERF:-}${STAT:-}" ] && ! command -v perf >/dev/null; then
    echo "PERF/STAT need perf (linux-perf)" >&2
    exit 2
fi
PORTS=($((BASE + 1)) $((BASE + 2)) $((BASE + 3)))
for port in "${PORTS[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use; set BASE_PORT" >&2
        exit 1
    fi
done
PEERS="1=127.0.0.1:${PORTS[0]},2=127.0.0.1:${PORTS[1]},3=127.0.0.1:${PORTS[2]}"
WORK=$(mktemp -d -t kv-profile-replication.XXXXXX)
PIDS=()
stop_nodes() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_nodes
    if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

# Waits (bounded) until node 1's /-/shards names a leader for every shard.
wait_leaders() {
    local deadline=$((SECONDS + 60))
    until curl -fsS --max-time 1 "http://127.0.0.1:${PORTS[0]}/-/shards" 2>/dev/null |
        python3 -c 'import json,sys; v=json.load(sys.stdin); g=v.get("groups") or []; sys.exit(0 if all(x.get("leader") for x in g) else 1)'; do
        if [ $SECONDS -ge $deadline ]; then
            echo "error: no leader for every shard within 60 s" >&2
            exit 1
        fi
        sleep 0.1
    done
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # configuration, output directory
    local config=$1 out=$2 replicas shards=64 i
    replicas=${config#r}
    replicas=${replicas%%s*}
    [[ $config == *s* ]] && shards=${config##*s}
    mkdir -p "$out"
    for i in 0 1 2; do
        RUST_LOG=warn "$BIN/kv-node" --port "${PORTS[$i]}" --data-dir "$out/node-$((i + 1))" \
            --node-id $((i + 1)) --peers "$PEERS" --replicas "$replicas" --shards "$shards" \
            --fsync everysec 2>>"$out/node-$((i + 1)).log" &
        PIDS+=($!)
    done
    for i in 0 1 2; do wait_healthy "127.0.0.1:${PORTS[$i]}" 60; done
    wait_leaders
    local bench=("$BIN/kv-bench" --urls "http://127.0.0.1:${PORTS[0]}" --only-max --mix set=1
        --keep-keys -q --allow-errors)
    timeout 60 "${bench[@]}" -d 2s >/dev/null
    for i in 0 1 2; do curl -fsS "http://127.0.0.1:${PORTS[$i]}/-/metrics" >"$out/before-$i"; done
    local before=() after=() watchers=()
    for i in 0 1 2; do before+=("$(cpu_ticks "${PIDS[$i]}")"); done
    for i in 0 1 2; do
        if [ -n "${STAT:-}" ]; then
            perf stat -e raw_syscalls:sys_enter,context-switches,syscalls:sys_enter_futex \
                -p "${PIDS[$i]}" -o "$out/stat-$i" -- sleep "$SECS" >/dev/null 2>&1 &
            watchers+=($!)
        fi
        if [ -n "${PERF:-}" ]; then
            # shellcheck disable=SC2086 # PERF_ARGS is a list of flags
            perf record ${PERF_ARGS:--F 499 -g} -p "${PIDS[$i]}" -o "$out/perf-$i.data" \
                -- sleep "$SECS" >/dev/null 2>&1 &
            watchers+=($!)
        fi
    done
    timeout $((SECS + 60)) "${bench[@]}" -d "${SECS}s" --json "$out/bench.json" >"$out/bench.out"
    for i in 0 1 2; do after+=("$(cpu_ticks "${PIDS[$i]}")"); done
    for i in "${watchers[@]}"; do wait "$i" || true; done
    for i in 0 1 2; do curl -fsS "http://127.0.0.1:${PORTS[$i]}/-/metrics" >"$out/after-$i"; done
    stop_nodes
    rm -rf "$out"/node-?
    python3 - "$config" "$out" "${before[@]}" "${after[@]}" <<'PY'
import json, os, re, sys
config, out = sys.argv[1], sys.argv[2]
before, after = [int(x) for x in sys.argv[3:6]], [int(x) for x in sys.argv[6:9]]
run = [json.loads(line) for line in open(f"{out}/bench.json")][-1]
n = run["operations"]
tick = os.sysconf("SC_CLK_TCK")
cpu = [(a - b) / tick * 1e6 / n for a, b in zip(after, before)]
def metrics(path):
    values = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[re.sub(r"\{.*\}", "", name)] = values.get(re.sub(r"\{.*\}", "", name), 0) + float(value)
        except ValueError:
            pass
    return values
delta = {}
for i in range(3):
    a, b = metrics(f"{out}/after-{i}"), metrics(f"{out}/before-{i}")
    for k in ("kv_raft_append_posts_total", "kv_raft_append_rpcs_total",
              "kv_wal_records_total", "kv_wal_writes_total"):
        delta[k] = delta.get(k, 0) + a.get(k, 0) - b.get(k, 0)
stat = {}
for i in range(3):
    path = f"{out}/stat-{i}"
    if os.path.exists(path):
        for line in open(path):
            f = line.split()
            if len(f) >= 2 and f[0].replace(",", "").isdigit():
                stat[f[1]] = stat.get(f[1], 0) + int(f[0].replace(",", ""))
short = {"kv_raft_append_posts_total": "posts", "kv_raft_append_rpcs_total": "appends",
         "kv_wal_records_total": "wal-records", "kv_wal_writes_total": "wal-writes",
         "raw_syscalls:sys_enter": "syscalls", "context-switches": "cs",
         "syscalls:sys_enter_futex": "futex"}
per = " ".join(f"{short[k]} {v / n:.2f}" for k, v in list(delta.items()) + list(stat.items()))
print(f"  {config:6} {run['ops_per_sec']:8.0f} PUT/s  errors {run['errors_total']}  "
      f"CPU/write {sum(cpu):4.0f} us ({'/'.join(f'{c:.0f}' for c in cpu)})  per write: {per}")
with open(f"{out}/../results", "a") as f:
    f.write(f"{config} {run['ops_per_sec']} {sum(cpu)}\n")
PY
}

echo "== $ROUNDS rounds of ${SECS}s PUT runs, 64 connections; load: $(uptime | sed 's/.*load/load/')"
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round"
    for config in $CONFIGS; do run "$config" "$WORK/$config-$round"; done
done
echo "== load: $(uptime | sed 's/.*load/load/')"
python3 - "$WORK/results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    config, rps, cpu = line.split()
    runs.setdefault(config, []).append((float(rps), float(cpu)))
print("== medians")
for config, xs in runs.items():
    print(f"  {config:6} {statistics.median(x[0] for x in xs):8.0f} PUT/s  "
          f"CPU/write {statistics.median(x[1] for x in xs):4.0f} us")
PY
