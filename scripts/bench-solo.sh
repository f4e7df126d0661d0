#!/usr/bin/env bash
# `--replicas 1` (solo shards, no Raft) against standalone nodes, side by side
# in one run on loopback (docs/replication.md §10).
#
#   scripts/bench-solo.sh [seconds] [rounds]     (default 5 s per run, 3 rounds)
#
# Pair 1: one standalone kv-node vs a one-node cluster (--peers, --replicas 1,
# 64 shards), kv-bench straight at each. Pair 2: three standalone nodes behind
# kv-proxy vs a three-node --replicas 1 cluster behind kv-proxy. Each round
# runs PUT then GET against both sides of a pair, alternating which goes
# first; kv-bench with 64 connections, 100-byte values, --fsync everysec.
# Prints every run and the per-round ratios (cluster / standalone), and the
# requests the solo cluster's nodes forwarded (0 when the proxy routes every
# key to its shard's owner, which needs kv-proxy's cluster routing: PROXY_BIN
# may name such a binary; NO_BUILD=1 uses target/release as it is).
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE
cd "$(dirname "$0")/.."
. scripts/lib.sh

SECS=${1:-5}
ROUNDS=${2:-3}
BASE=${BASE_PORT:-19100}

ensure_packages curl python3
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p kv-node -p kv-proxy -p kv-bench
PROXY_BIN=${PROXY_BIN:-target/release/kv-proxy}

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

node() { # name port [args...]
  local name=$1 port=$2
  shift 2
  RUST_LOG=warn timeout 3600 target/release/kv-node --port "$port" --data-dir "$work/$name" \
    --fsync everysec "$@" &
  pids+=($!)
}

# Pair 1.
node alone "$BASE"
node solo1 $((BASE + 1)) --node-id 1 --peers "1=127.0.0.1:$((BASE + 1))" --replicas 1
# Pair 2: standalone trio, solo trio, a proxy in front of each.
peers="1=127.0.0.1:$((BASE + 21)),2=127.0.0.1:$((BASE + 22)),3=127.0.0.1:$((BASE + 23))"
for i in 1 2 3; do
  node "trio$i" $((BASE + 10 + i))
  node "solo3-$i" $((BASE + 20 + i)) --node-id "$i" --peers "$peers" --replicas 1
done
for port in $BASE $((BASE + 1)) $((BASE + 11)) $((BASE + 12)) $((BASE + 13)) \
  $((BASE + 21)) $((BASE + 22)) $((BASE + 23)); do
  wait_healthy "127.0.0.1:$port"
done
# A proxy decides ring vs cluster routing once, at start: after the nodes.
RUST_LOG=warn timeout 3600 "$PROXY_BIN" --port $((BASE + 30)) \
  --nodes "127.0.0.1:$((BASE + 11)),127.0.0.1:$((BASE + 12)),127.0.0.1:$((BASE + 13))" &
pids+=($!)
RUST_LOG=warn timeout 3600 "$PROXY_BIN" --port $((BASE + 31)) \
  --nodes "127.0.0.1:$((BASE + 21)),127.0.0.1:$((BASE + 22)),127.0.0.1:$((BASE + 23))" &
pids+=($!)
wait_healthy "127.0.0.1:$((BASE + 30))"
wait_healthy "127.0.0.1:$((BASE + 31))"

json="$work/runs.jsonl"
bench() { # label put|get target-args...
  local label=$1 op=$2
  shift 2
  local mix=set=1,get=0,delete=0 extra=()
  [ "$op" = get ] && mix=set=0,get=1,delete=0 && extra=(--preload)
  timeout 120 target/release/kv-bench "$@" -c 64 --value-size 100 --keys 10000 \
    -d "${SECS}s" --mix "$mix" "${extra[@]}" --prefix "$label-$op-$RANDOM" -q \
    --json "$work/one.json" >/dev/null
  python3 - "$label" "$op" "$work/one.json" >>"$json" <<'PY'
import json, sys
label, op, path = sys.argv[1:]
run = [json.loads(l) for l in open(path) if l.strip()][-1]
print(json.dumps({"label": label, "op": op, "ops": run["ops_per_sec"],
                  "errors": run["errors_total"], "p50": run["latency_ms"].get("p50")}))
PY
  rm -f "$work/one.json"
}

for round in $(seq "$ROUNDS"); do
  for op in put get; do
    if [ $((round % 2)) -eq 1 ]; then order="alone solo1"; else order="solo1 alone"; fi
    for side in $order; do
      case $side in
        alone) bench "r$round-alone" "$op" --urls "http://127.0.0.1:$BASE" ;;
        solo1) bench "r$round-solo1" "$op" --urls "http://127.0.0.1:$((BASE + 1))" ;;
      esac
    done
    if [ $((round % 2)) -eq 1 ]; then order="trio solo3"; else order="solo3 trio"; fi
    for side in $order; do
      case $side in
        trio) bench "r$round-trio" "$op" --proxy "http://127.0.0.1:$((BASE + 30))" ;;
        solo3) bench "r$round-solo3" "$op" --proxy "http://127.0.0.1:$((BASE + 31))" ;;
      esac
    done
  done
done

for i in 1 2 3; do
  curl -fsS "http://127.0.0.1:$((BASE + 20 + i))/-/metrics" |
    awk -v n="$i" '/^kv_raft_forwarded_total/ {printf "solo node %s forwarded %s %s\n", n, $1, $2}'
done
python3 - "$json" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["label"], r["op"]): r for r in runs}
for r in runs:
    print(f'{r["label"]:>12} {r["op"]:>3} {r["ops"]:>10.0f}/s  p50 {r["p50"]} ms  errors {r["errors"]}')
rounds = sorted({r["label"].split("-")[0] for r in runs})
for pair, base, test in (("1 node", "alone", "solo1"), ("3 nodes + proxy", "trio", "solo3")):
    for op in ("put", "get"):
        ratios = []
        for rd in rounds:
            a, b = by.get((f"{rd}-{base}", op)), by.get((f"{rd}-{test}", op))
            if a and b and a["ops"] > 0:
                ratios.append(b["ops"] / a["ops"])
        if ratios:
            ratios.sort()
            med = ratios[len(ratios) // 2]
            print(f'{pair:>16} {op}: --replicas 1 / standalone = {med:.2f} '
                  f'(per round {", ".join(f"{x:.2f}" for x in ratios)})')
PY
