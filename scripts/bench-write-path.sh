#!/usr/bin/env bash
# Write-path throughput of two kv-node binaries side by side (a benchmark,
# not a test): set/get 1:1 and PUT-only, for --fsync always, everysec and
# never, 64 connections, 100-byte values, with kv-bench --spawn. Each round
# runs every case on both binaries back to back, alternating which goes
# first; the table gives each binary's median over the rounds and the ratio.
#
# Usage: scripts/bench-write-path.sh OLD_KV_NODE NEW_KV_NODE [seconds per run, default 5] [rounds, default 3]
# e.g. build main in a scratch worktree, then
#   scripts/bench-write-path.sh /tmp/main/target/release/kv-node target/release/kv-node
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE

OLD="${1:?usage: $0 OLD_KV_NODE NEW_KV_NODE [seconds] [rounds]}"
NEW="${2:?usage: $0 OLD_KV_NODE NEW_KV_NODE [seconds] [rounds]}"
SECONDS_PER_RUN="${3:-5}"
ROUNDS="${4:-3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/kv-bench-write-path.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

(cd "$ROOT" && cargo build --release --quiet -p kv-bench)
BENCH="$ROOT/target/release/kv-bench"

run() { # binary label fsync mix
    KV_FSYNC="$3" timeout 120 "$BENCH" --spawn --node-bin "$1" -c 64 --value-size 100 \
        --mix "$4" -d "${SECONDS_PER_RUN}s" --warmup 1s --quiet \
        --json "$WORK/$2.json" >/dev/null 2>&1 || echo "run $2 $3 $4 failed" >&2
}

for round in $(seq 1 "$ROUNDS"); do
    for fsync in always everysec never; do
        for mix in set=1,get=1 set=1; do
            name="${fsync}_${mix//[=,]/_}"
            if ((round % 2)); then order=(old new); else order=(new old); fi
            for which in "${order[@]}"; do
                if [[ $which == old ]]; then bin="$OLD"; else bin="$NEW"; fi
                run "$bin" "${which}_${name}_r${round}" "$fsync" "$mix"
            done
        done
    done
    echo "round $round done" >&2
done

python3 - "$WORK" <<'EOF'
import json, statistics, sys, glob, os
work = sys.argv[1]
rows = {}
for path in glob.glob(os.path.join(work, "*.json")):
    which, name = os.path.basename(path)[:-5].split("_", 1)
    name = name.rsplit("_r", 1)[0]
    runs = [json.loads(line) for line in open(path) if line.strip()][-1:]
    ops, p99, bad = rows.setdefault(name, {}).setdefault(which, ([], [], [0]))
    ops += [r["ops_per_sec"] for r in runs]
    p99 += [r["latency_ms"]["p99"] for r in runs]
    bad[0] += sum(r["errors_total"] for r in runs)
print(f"{'case':<22} {'old ops/s':>10} {'new ops/s':>10} {'new/old':>8} {'old p99':>8} {'new p99':>8}  runs")
for name in sorted(rows):
    old, new = rows[name].get("old"), rows[name].get("new")
    if not old or not new:
        print(f"{name:<22} missing runs"); continue
    o, n = statistics.median(old[0]), statistics.median(new[0])
    print(f"{name:<22} {o:>10.0f} {n:>10.0f} {n/o:>7.2f}x {statistics.median(old[1]):>7.1f}ms "
          f"{statistics.median(new[1]):>7.1f}ms  {len(old[0])}+{len(new[0])}"
          + (f"  ERRORS old {old[2][0]} new {new[2][0]}" if old[2][0] or new[2][0] else ""))
EOF
