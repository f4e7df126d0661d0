#!/usr/bin/env bash
# What `kv-bench --history` costs, and how long `check-history` takes on it.
#
#   scripts/bench-history.sh [seconds] [pairs]    (default 5 s per run, 5 pairs)
#
# One kv-node; kv-bench against it (default mix, 32 connections),
# alternating a run without --history and one with it, `pairs` times, so
# both see the same machine. Prints each run's ops/s and kv-bench's own CPU
# time per operation (user + system: what recording costs the generator,
# and much less sensitive than ops/s to other load on the machine), the
# ratios per pair, the history's size, and how long check-history takes on
# the last history.
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE
cd "$(dirname "$0")/.."

SECS=${1:-5}
PAIRS=${2:-5}
PORT=${PORT:-18181}
cargo build --release -q -p kv-node -p kv-bench
work=$(mktemp -d)
RUST_LOG=warn target/release/kv-node --port "$PORT" --data-dir "$work/node" &
node=$!
trap 'kill $node 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done

# Runs kv-bench with the given extra flags; prints "ops/s cpu-us-per-op".
run() {
  python3 - "$work" "$PORT" "$SECS" "$@" <<'PY'
import json, resource, subprocess, sys
work, port, secs, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
before = resource.getrusage(resource.RUSAGE_CHILDREN)
subprocess.run(["target/release/kv-bench", "--urls", f"http://127.0.0.1:{port}", "-c", "32",
                "-d", f"{secs}s", "-q", "--json", f"{work}/runs.json", *extra],
               check=True, stdout=subprocess.DEVNULL)
after = resource.getrusage(resource.RUSAGE_CHILDREN)
run = json.loads(open(f"{work}/runs.json").readlines()[-1])
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(round(run["ops_per_sec"]), round(cpu / run["operations"] * 1e6, 2))
PY
}
for pair in $(seq "$PAIRS"); do
  read -r off_rate off_cpu < <(run)
  read -r on_rate on_cpu < <(run --history "$work/h.jsonl")
  python3 -c 'import sys; a,b,c,d=map(float,sys.argv[1:]); print(f"off {a:.0f} ops/s {b} us CPU/op | on {c:.0f} ops/s {d} us CPU/op | on/off ops/s {c/a:.3f}, CPU/op {d/b:.3f}")' \
    "$off_rate" "$off_cpu" "$on_rate" "$on_cpu"
done
lines=$(wc -l <"$work/h.jsonl"); bytes=$(stat -c %s "$work/h.jsonl")
echo "last history: $lines operations, $((bytes / lines)) bytes per line in the file"
start=$(date +%s.%N)
target/release/kv-bench check-history --quiet "$work/h.jsonl"
echo "check-history: $(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$start" "$(date +%s.%N)") s"
