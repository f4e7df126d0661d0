#!/usr/bin/env bash
# The storage engine's figures, *before* (a git ref) and *after* (the working
# tree) side by side in one run, with Redis as the peer where it has one (a
# benchmark, not a test; loopback only):
#
#  1. Snapshot stalls: set/get 1:1 (100-byte values) over N keys at half the
#     lower of the two binaries' closed-loop maxima, open loop (kv-bench --rate: latency from
#     each request's due time), with --snapshot-interval 2s vs snapshots off;
#     p99 / p99.9 of each and their ratio (target <= 1.5). Peak RSS during
#     the snapshot run against the same run with snapshots off (the data
#     set plus serving it; target <= 1.5).
#  2. Recovery: N keys imported (16-byte keys, 100-byte values), 3 s of
#     overwrites, kill -9, restart; peak RSS of the restarted process
#     (VmHWM) against the RSS before the kill (target <= 1.25).
#  3. Memory, same node: bytes per key against redis-server holding the same
#     keys; RSS after 10,000 connections opened and closed (target within
#     10% of before); RSS 30 s after deleting every key (target <= 0.4x;
#     Redis: FLUSHALL).
#  4. Throughput, 64 connections, closed loop: set/get 1:1 and PUT-only for
#     each --fsync policy.
#
# Usage: scripts/bench-engine.sh [--full] [--before REF] [--before-bin PATH]
#   --full         1,000,000 keys instead of 300,000 (longer)
#   --before REF   the git ref built as "before" (default 4301b7a, main when
#                  issue 10 started); built once in a scratch copy under
#                  ~/.cache/kv-bench-engine with its own target dir, reused
#   --before-bin   a kv-node binary to use as "before" instead
#   --only-after   skip the before binary (quick iterations)
#   --only-memory  only sections 2 and 3 (e.g. to compare allocators: build
#                  kv-node with other features and pass it as --before-bin)
#   --only-snapshots  only section 1 (repeat it: it is the noisiest; on a
#                  machine shared with other work, run it under nice -n -10)
# RATE_DIV=4 runs section 1 at a quarter of the maximum instead of half.
# Writes bench-results/engine.json. Takes ~6-8 min (300k keys) plus builds.
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=lib.sh
source "$ROOT/scripts/lib.sh"

KEYS=300000
BEFORE_REF=4301b7a
BEFORE_BIN=""
ONLY_AFTER=0
RUN_SNAPSHOTS=1
RUN_MEMORY=1
RUN_THROUGHPUT=1
while (($#)); do
    case "$1" in
        --full) KEYS=1000000 ;;
        --before) BEFORE_REF="$2"; shift ;;
        --before-bin) BEFORE_BIN="$2"; shift ;;
        --only-after) ONLY_AFTER=1 ;;
        --only-memory) RUN_SNAPSHOTS=0; RUN_THROUGHPUT=0 ;;
        --only-snapshots) RUN_MEMORY=0; RUN_THROUGHPUT=0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

ensure_packages redis-server redis-tools wrk python3 curl

WORK="$(mktemp -d /tmp/kv-bench-engine.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "building the after binaries (release)..." >&2
(cd "$ROOT" && cargo build --release --quiet -p kv-node -p kv-bench)
BENCH="$ROOT/target/release/kv-bench"
declare -A BIN=([after]="$ROOT/target/release/kv-node")
SIDES=(after)
if ((ONLY_AFTER == 0)); then
    if [[ -z "$BEFORE_BIN" ]]; then
        sha="$(git -C "$ROOT" rev-parse --short=7 "$BEFORE_REF")"
        cache="${XDG_CACHE_HOME:-$HOME/.cache}/kv-bench-engine"
        src="$cache/$sha"
        if [[ ! -f "$src/Cargo.toml" ]]; then
            mkdir -p "$src"
            git -C "$ROOT" archive "$sha" | tar -x -C "$src"
        fi
        echo "building the before binary ($BEFORE_REF = $sha, cached in $cache)..." >&2
        (cd "$src" && CARGO_TARGET_DIR="$cache/target-$sha" cargo build --release --quiet -p kv-node)
        BEFORE_BIN="$cache/target-$sha/release/kv-node"
    else
        BEFORE_REF="$BEFORE_BIN"
    fi
    BIN[before]="$BEFORE_BIN"
    SIDES=(before after)
fi

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# start_node SIDE DIR [flags...]: sets NODE_PID, NODE_ADDR, NODE_LOG.
start_node() {
    local side="$1" dir="$2"; shift 2
    NODE_LOG="$WORK/node-$side-$RANDOM.log"
    RUST_LOG=info "${BIN[$side]}" --port 0 --data-dir "$dir" --max-connections 20000 "$@" 2>"$NODE_LOG" &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    NODE_ADDR=""
    local deadline=$((SECONDS + 120))
    until [[ -n "$NODE_ADDR" ]] && curl -fsS -o /dev/null "http://$NODE_ADDR/-/health" 2>/dev/null; do
        NODE_ADDR="$(grep -so 'listening on http://[0-9.:]*' "$NODE_LOG" | head -1 | sed 's#.*http://##')" || true
        if ! kill -0 "$NODE_PID" 2>/dev/null || ((SECONDS > deadline)); then
            cat "$NODE_LOG" >&2; echo "kv-node ($side) did not start" >&2; exit 1
        fi
        sleep 0.05
    done
}

stop_node() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# Samples $1's RSS every 50 ms into $2 (max, kB) until $1 exits or $3 exists.
sample_peak() {
    local pid=$1 out=$2 stop=$3 peak=0 now
    while kill -0 "$pid" 2>/dev/null && [[ ! -e "$stop" ]]; do
        now=$(rss_kb "$pid" 2>/dev/null || echo 0)
        ((now > peak)) && peak=$now && echo "$peak" >"$out"
        sleep 0.05
    done
}

# JSON results, one "key value" per line, turned into JSON at the end.
RESULTS="$WORK/results"
: >"$RESULTS"
put() { echo "$1 $2" >>"$RESULTS"; }

bench() { # addr json-file args...: runs kv-bench, one node, quiet
    local addr=$1 json=$2; shift 2
    "$BENCH" --urls "http://$addr" --quiet --allow-errors --json "$json" "$@" >/dev/null
}
field() { # json-file python-expression-on-r
    python3 -c "import json,sys; r=json.loads(open(sys.argv[1]).readlines()[-1]); print($2)" "$1"
}

PREFIX="eng"
# Each section runs over these sides (none when skipped).
sides_if() { if (($1)); then echo "${SIDES[@]}"; fi; }
echo "== 1. snapshot stalls, $KEYS keys, set/get 1:1 at half the max rate ==" >&2
# Closed-loop maximum of each side, snapshots off; both sides then get the
# same offered load: half the lower maximum (RATE_DIV=4: a quarter).
RATE_DIV="${RATE_DIV:-2}"
rate=""
for side in $(sides_if $RUN_SNAPSHOTS); do
    start_node "$side" "$WORK/max-$side" --snapshot-interval 1h --wal-max-bytes 100000000000
    bench "$NODE_ADDR" "$WORK/max-$side.json" --keys "$KEYS" --preload --prefix "$PREFIX" \
        --mix set=1,get=1 -d 6s -c 64
    stop_node "$NODE_PID"
    rm -rf "$WORK/max-$side"
    max=$(field "$WORK/max-$side.json" 'round(r["ops_per_sec"])')
    put "$side.max_ops" "$max"
    if [[ -z "$rate" || $((max / RATE_DIV)) -lt "$rate" ]]; then rate=$((max / RATE_DIV)); fi
    echo "$side: closed-loop max $max ops/s" >&2
done
for side in $(sides_if $RUN_SNAPSHOTS); do
    put "$side.half_rate" "$rate"
    echo "$side: open loop at $rate ops/s" >&2
    for mode in off on; do
        interval=1h
        [[ $mode == on ]] && interval=2s
        # Only the timer snapshots: the log never fills up here.
        start_node "$side" "$WORK/lat-$side-$mode" --snapshot-interval "$interval" \
            --wal-max-bytes 100000000000
        rm -f "$WORK/stop"
        sample_peak "$NODE_PID" "$WORK/peak-$side-$mode" "$WORK/stop" &
        sampler=$!
        # Preload (every key set once), 20 s measured, then kv-bench deletes
        # its keys: the peak is sampled over all of it, the same way for
        # both modes.
        bench "$NODE_ADDR" "$WORK/lat-$side-$mode.json" --keys "$KEYS" --preload --prefix "$PREFIX" \
            --mix set=1,get=1 -d 20s -c 64 --rate "$rate" --timeout 10s
        touch "$WORK/stop"; wait "$sampler" 2>/dev/null || true
        peak=$(cat "$WORK/peak-$side-$mode" 2>/dev/null || echo 0)
        snaps=$(grep -c 'snapshot snap-' "$NODE_LOG" || true)
        p99=$(field "$WORK/lat-$side-$mode.json" 'r["corrected_latency_ms"]["p99"]')
        p999=$(field "$WORK/lat-$side-$mode.json" 'r["corrected_latency_ms"]["p999"]')
        pmax=$(field "$WORK/lat-$side-$mode.json" 'r["corrected_latency_ms"]["max"]')
        ops=$(field "$WORK/lat-$side-$mode.json" 'round(r["ops_per_sec"])')
        errs=$(field "$WORK/lat-$side-$mode.json" 'r["errors_total"]')
        for k in p99 p999 pmax ops errs peak snaps; do put "$side.snap_$mode.$k" "${!k}"; done
        echo "$side snapshots $mode: $ops ops/s, corrected p99 $p99 ms, p99.9 $p999 ms, max $pmax ms," \
            "errors $errs; peak RSS $((peak / 1024)) MiB; $snaps snapshots" >&2
        stop_node "$NODE_PID"
        rm -rf "$WORK/lat-$side-$mode"
    done
done

if ((RUN_MEMORY)); then
echo "== 2+3. memory and recovery: $KEYS imported keys, overwrites, kill -9, 10k connections, delete all ==" >&2
write_dataset "$WORK" "$KEYS"
cat >"$WORK/put.lua" <<LUA
-- PUT {"value":"<98 x>"} to random keys among the imported ones.
local body = '{"value":"' .. string.rep("x", 98) .. '"}'
local headers = { ["Content-Type"] = "application/json" }
function setup(thread) thread:set("id", math.random(1, 1000000)) end
function init(args) math.randomseed(id) end
function request()
    return wrk.format("PUT", string.format("/key_%012d", math.random(0, $KEYS - 1)), headers, body)
end
LUA
cat >"$WORK/del.lua" <<LUA
-- DELETE key_0 .. key_N-1 once each, split over the threads.
-- (tid is the global setup() gives each thread: no local may shadow it.)
local n, threads, counter = $KEYS, 2, 0
local count = 0
function setup(thread) thread:set("tid", count); count = count + 1 end
function init(args) counter = tid end
function request()
    local i = counter
    counter = counter + threads
    if i >= n then i = n - 1 end
    return wrk.format("DELETE", string.format("/key_%012d", i))
end
LUA
# 10,000 connections opened (each sends one GET and reads the answer), then closed.
cat >"$WORK/spike.py" <<'PY'
import resource, socket, sys
host, port = sys.argv[1].split(":")
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
socks = []
for i in range(10000):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /key_000000000001 HTTP/1.1\r\nHost: x\r\n\r\n")
    socks.append(s)
ok = 0
for s in socks:
    s.settimeout(10)
    try:
        if s.recv(4096).startswith(b"HTTP/1.1 200"):
            ok += 1
    except OSError:
        pass
for s in socks:
    s.close()
print(ok)
PY
ulimit -n 65536 2>/dev/null || true
start_node after "$WORK/empty" --snapshot-interval 1h
EMPTY_KB=$(rss_kb "$NODE_PID"); stop_node "$NODE_PID"
declare -A MEM_PID MEM_ADDR
for side in "${SIDES[@]}"; do
    dir="$WORK/mem-$side"
    start_node "$side" "$dir" --import "$WORK/kv_store.json" --snapshot-interval 1h --wal-max-bytes 1000000000
    stop_node "$NODE_PID"
    # Memory per key: a node that recovered the keys (the import's own
    # garbage is not the data set's).
    start_node "$side" "$dir" --snapshot-interval 1h --wal-max-bytes 1000000000
    sleep 2
    loaded=$(rss_kb "$NODE_PID")
    put "$side.mem.loaded_kb" "$loaded"
    put "$side.mem.bytes_per_key" "$(((loaded - EMPTY_KB) * 1024 / KEYS))"
    echo "$side: $KEYS keys RSS $((loaded / 1024)) MiB ($(((loaded - EMPTY_KB) * 1024 / KEYS)) B/key over an empty node)" >&2
    # A log on top of the snapshot (steady state under overwrites), then a
    # crash and a restart.
    wrk -t 2 -c 64 -d 3s -s "$WORK/put.lua" "http://$NODE_ADDR" >/dev/null 2>&1
    sleep 2
    before_kill=$(rss_kb "$NODE_PID")
    kill -9 "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true
    start_node "$side" "$dir" --snapshot-interval 1h --wal-max-bytes 1000000000
    hwm=$(hwm_kb "$NODE_PID")
    rec_line="$(grep -o 'recovered.*' "$NODE_LOG" | head -1)"
    put "$side.recovery.before_kill_kb" "$before_kill"
    put "$side.recovery.hwm_kb" "$hwm"
    echo "$side recovery: RSS before kill -9 $((before_kill / 1024)) MiB, restarted peak (VmHWM) $((hwm / 1024)) MiB; $rec_line" >&2
    MEM_PID[$side]=$NODE_PID; MEM_ADDR[$side]=$NODE_ADDR
    before_spike=$(rss_kb "$NODE_PID")
    ok=$(python3 "$WORK/spike.py" "$NODE_ADDR")
    # Give an allocator's background purge its chance (bounded).
    sleep 10
    after_spike=$(rss_kb "$NODE_PID")
    put "$side.mem.before_spike_kb" "$before_spike"
    put "$side.mem.after_spike_kb" "$after_spike"
    echo "$side: 10k connections ($ok answered) opened and closed: RSS $((before_spike / 1024)) -> $((after_spike / 1024)) MiB" >&2
done
# Below the ephemeral port range, where no client socket can hold it.
REDIS_PORT=$((15000 + RANDOM % 5000))
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save '' --appendonly no \
    --daemonize no --logfile "$WORK/redis/log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" || { cat "$WORK/redis/log" >&2; exit 1; }
R0=$(rss_kb "$REDIS_PID")
redis-cli -p "$REDIS_PORT" --pipe <"$WORK/redis.resp" >/dev/null
R1=$(rss_kb "$REDIS_PID")
put redis.mem.loaded_kb "$R1"
put redis.mem.bytes_per_key "$(((R1 - R0) * 1024 / KEYS))"
echo "redis $(redis-server --version | grep -o 'v=[0-9.]*'): $KEYS keys RSS $((R1 / 1024)) MiB ($(((R1 - R0) * 1024 / KEYS)) B/key)" >&2
# Delete everything everywhere at once, then watch 30 s.
DELETERS=()
for side in "${SIDES[@]}"; do
    put "$side.mem.before_delete_kb" "$(rss_kb "${MEM_PID[$side]}")"
    wrk -t 2 -c 32 -d "$((KEYS / 15000 + 3))s" -s "$WORK/del.lua" "http://${MEM_ADDR[$side]}" >/dev/null 2>&1 &
    DELETERS+=($!)
done
redis-cli -p "$REDIS_PORT" flushall >/dev/null
wait "${DELETERS[@]}" 2>/dev/null || true
sleep 30
for side in "${SIDES[@]}"; do
    keys=$(curl -s "http://${MEM_ADDR[$side]}/-/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"])')
    now=$(rss_kb "${MEM_PID[$side]}")
    put "$side.mem.after_delete_kb" "$now"
    put "$side.mem.keys_left" "$keys"
    echo "$side: 30 s after deleting every key ($keys left): $((now / 1024)) MiB" >&2
    stop_node "${MEM_PID[$side]}"
done
R2=$(rss_kb "$REDIS_PID")
put redis.mem.after_delete_kb "$R2"
echo "redis: 30 s after FLUSHALL: $((R2 / 1024)) MiB" >&2
kill -TERM "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true
fi

echo "== 4. throughput, 64 connections, closed loop, 5 s each ==" >&2
for policy in $(if ((RUN_THROUGHPUT)); then echo never everysec always; fi); do
    for side in "${SIDES[@]}"; do
        start_node "$side" "$WORK/tp-$side-$policy" --fsync "$policy"
        for mix in set=1,get=1 set=1; do
            bench "$NODE_ADDR" "$WORK/tp.json" --keys 10000 --preload --mix "$mix" -d 5s -c 64
            ops=$(field "$WORK/tp.json" 'round(r["ops_per_sec"])')
            name=${mix//[=,]/_}
            put "$side.tp.$policy.$name" "$ops"
            echo "$side --fsync $policy $mix: $ops ops/s" >&2
        done
        stop_node "$NODE_PID"
        rm -rf "$WORK/tp-$side-$policy"
    done
done

mkdir -p "$ROOT/bench-results"
python3 - "$RESULTS" "$ROOT/bench-results/engine.json" "$KEYS" "$BEFORE_REF" <<'PY'
import json, sys
results, out, keys, ref = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
r = {}
for line in open(results):
    k, v = line.split()
    r[k] = float(v)
sides = [s for s in ("before", "after") if any(k.startswith(s + ".") for k in r)]
def g(s, k): return r.get(f"{s}.{k}", float("nan"))
rows = []
def row(name, fn, target=""):
    rows.append((name, [fn(s) for s in sides], target))
row("closed-loop max, set/get 1:1 (ops/s)", lambda s: f"{g(s,'max_ops'):.0f}")
row("p99 snapshots every 2 s / off (ms)", lambda s: f"{g(s,'snap_on.p99'):.2f} / {g(s,'snap_off.p99'):.2f} = {g(s,'snap_on.p99')/g(s,'snap_off.p99'):.2f}x", "<= 1.5x")
row("p99.9 snapshots every 2 s / off (ms)", lambda s: f"{g(s,'snap_on.p999'):.2f} / {g(s,'snap_off.p999'):.2f} = {g(s,'snap_on.p999')/g(s,'snap_off.p999'):.2f}x", "<= 1.5x")
row("max latency snapshots on / off (ms)", lambda s: f"{g(s,'snap_on.pmax'):.1f} / {g(s,'snap_off.pmax'):.1f}")
row("peak RSS snapshots every 2 s / off", lambda s: f"{g(s,'snap_on.peak')/1024:.0f} / {g(s,'snap_off.peak')/1024:.0f} MiB = {g(s,'snap_on.peak')/g(s,'snap_off.peak'):.2f}x", "<= 1.5x")
row("recovery peak (VmHWM) / RSS before kill -9", lambda s: f"{g(s,'recovery.hwm_kb')/1024:.0f} / {g(s,'recovery.before_kill_kb')/1024:.0f} MiB = {g(s,'recovery.hwm_kb')/g(s,'recovery.before_kill_kb'):.2f}x", "<= 1.25x")
redis_bpk = r.get("redis.mem.bytes_per_key", float("nan"))
row(f"bytes per key ({keys} keys; Redis {redis_bpk:.0f})", lambda s: f"{g(s,'mem.bytes_per_key'):.0f} = {g(s,'mem.bytes_per_key')/redis_bpk:.2f}x Redis", "<= 1.0x")
row("RSS after 10k connections / before", lambda s: f"{g(s,'mem.after_spike_kb')/1024:.0f} / {g(s,'mem.before_spike_kb')/1024:.0f} MiB = {g(s,'mem.after_spike_kb')/g(s,'mem.before_spike_kb'):.2f}x", "<= 1.10x")
rr = r.get("redis.mem.after_delete_kb", float("nan")) / r.get("redis.mem.loaded_kb", float("nan"))
row(f"RSS 30 s after deleting all / before (Redis {rr:.2f}x)", lambda s: f"{g(s,'mem.after_delete_kb')/1024:.0f} / {g(s,'mem.before_delete_kb')/1024:.0f} MiB = {g(s,'mem.after_delete_kb')/g(s,'mem.before_delete_kb'):.2f}x", "<= 0.4x")
for policy in ("never", "everysec", "always"):
    row(f"--fsync {policy}: set/get 1:1 | PUT-only (ops/s)", lambda s, p=policy: f"{g(s,f'tp.{p}.set_1_get_1'):.0f} | {g(s,f'tp.{p}.set_1'):.0f}")
width = max(len(n) for n, _, _ in rows)
cols = [f"before ({ref})" if s == "before" else "after (working tree)" for s in sides]
cw = max(44, *(len(v) for _, vs, _ in rows for v in vs))
print(f"{'':{width}}  " + "  ".join(f"{c:{cw}}" for c in cols) + "  target")
for name, vs, target in rows:
    print(f"{name:{width}}  " + "  ".join(f"{v:{cw}}" for v in vs) + f"  {target}")
json.dump({"keys": keys, "before_ref": ref, "figures": r,
           "table": [{"what": n, **dict(zip(sides, vs)), "target": t} for n, vs, t in rows]},
          open(out, "w"), indent=1)
print(f"written to {out}")
PY
