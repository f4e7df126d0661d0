#!/usr/bin/env bash
# Fault soak for linearizable reads (issue 12, the lease-read shortcut):
# 3 kv-nodes (--fsync always) + kv-proxy, kv-bench recording a history over a
# few keys while this script kill -9s / SIGTERMs nodes and restarts them at
# once, then kv-bench check-history on the history.
#
#   scripts/fault-soak.sh MODE RUN [DURATION_S]
#     MODE: leader9 (kill -9 the node leading most shards, restart at once, x3),
#           term (SIGTERM a node, restart), follower9 (kill -9 the node
#           leading fewest shards, restart), mixed (all three in turn)
#     RUN: a number; ports 26000+10*RUN to +3 (RUN 0-89), data in
#          /tmp/kv-fault-soak/run-RUN
# Env: KV_SOAK_ROUTE=proxy|direct (kv-bench through kv-proxy, or client-side)
#      or conflict (scripts/fault-soak-conflict.py: 8 clients racing on 2 keys through
#      the proxy and every node; keep DURATION_S <= 20 so check-history can
#      check the whole history).
# Prints: ops, history verdict, kv_raft_lease_local_reads_total summed over
# every node incarnation (the counter restarts with the process). Exits with
# check-history's status: 0 when every key is linearizable, 1 when not.
# Builds the release binaries first; everything started here is stopped on
# exit (trap); the data and logs stay in the run's directory.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
MODE=${1:?mode}
RUN=${2:?run}
DUR=${3:-30}
ROUTE=${KV_SOAK_ROUTE:-proxy}
BIN=${CARGO_TARGET_DIR:-target}/release
cargo build --release --quiet --bin kv-node --bin kv-proxy --bin kv-bench || exit 2
BASE=$((26000 + 10 * RUN))
D=/tmp/kv-fault-soak/run-$RUN
rm -rf "$D"
mkdir -p "$D/logs"
PEERS="1=127.0.0.1:$((BASE + 1)),2=127.0.0.1:$((BASE + 2)),3=127.0.0.1:$((BASE + 3))"
declare -A PID
LEASE_TOTAL=0
PROXY=""
BENCH=""
cleanup() {
  local pid
  for pid in "${PID[@]}" $PROXY $BENCH; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_node() {
  local i=$1
  "$BIN/kv-node" --port $((BASE + i)) --node-id "$i" --peers "$PEERS" --fsync always \
    --data-dir "$D/node-$i" >>"$D/logs/node-$i.log" 2>&1 &
  PID[$i]=$!
}
# Bounded wait for a node's /-/ready.
wait_ready() {
  local i=$1 t=0
  until curl -sf -o /dev/null "http://127.0.0.1:$((BASE + i))/-/ready"; do
    t=$((t + 1))
    [ $t -gt 600 ] && { echo "node $i not ready after 60 s"; return 1; }
    sleep 0.1
  done
}
lease_reads() {
  curl -s "http://127.0.0.1:$((BASE + $1))/-/metrics" | awk '/^kv_raft_lease_local_reads_total/ {print $2}'
}
led() {
  curl -s "http://127.0.0.1:$((BASE + $1))/-/health" | sed -n 's/.*"shards_led":\([0-9]*\).*/\1/p'
}
# Node leading the most (most=1) or fewest (most=0) shards.
pick() {
  local best="" bestn=-1 i n
  for i in 1 2 3; do
    n=$(led "$i"); n=${n:-0}
    if [ "$1" = 1 ]; then
      if [ "$n" -gt "$bestn" ]; then best=$i; bestn=$n; fi
    else
      if [ "$bestn" = -1 ] || [ "$n" -lt "$bestn" ]; then best=$i; bestn=$n; fi
    fi
  done
  echo "$best"
}
count_lease() {
  local v
  v=$(lease_reads "$1"); v=${v:-0}
  LEASE_TOTAL=$((LEASE_TOTAL + v))
}
# sig: KILL or TERM
fault() {
  local i=$1 sig=$2
  count_lease "$i"
  echo "  $(date +%T.%N | cut -c1-12) $sig node $i (led $(led "$i"))"
  kill -"$sig" "${PID[$i]}"
  # SIGTERM: bounded wait for the graceful exit (it hands leaderships away).
  local t=0
  while kill -0 "${PID[$i]}" 2>/dev/null; do
    t=$((t + 1)); [ $t -gt 300 ] && { echo "  node $i still alive after 30 s"; kill -9 "${PID[$i]}"; }
    sleep 0.1
  done
  wait "${PID[$i]}" 2>/dev/null
  start_node "$i"
  wait_ready "$i"
}

for i in 1 2 3; do start_node $i; done
for i in 1 2 3; do wait_ready $i || exit 3; done
"$BIN/kv-proxy" --port "$BASE" --nodes "127.0.0.1:$((BASE + 1)),127.0.0.1:$((BASE + 2)),127.0.0.1:$((BASE + 3))" \
  >"$D/logs/proxy.log" 2>&1 &
PROXY=$!
wait_healthy "127.0.0.1:$BASE" 30 || exit 3

if [ "$ROUTE" = conflict ]; then
  # Clients racing on the same 2 keys through the proxy and every node (a
  # non-leader forwards): kv-bench's workers each own their keys.
  python3 "scripts/fault-soak-conflict.py" "$D/h.jsonl" "$DUR" 2 8 \
    "127.0.0.1:$BASE,127.0.0.1:$((BASE + 1)),127.0.0.1:$((BASE + 2)),127.0.0.1:$((BASE + 3))" >"$D/bench.out" 2>&1 &
else
  if [ "$ROUTE" = proxy ]; then TARGET=(--proxy "http://127.0.0.1:$BASE"); else TARGET=(--urls "http://127.0.0.1:$((BASE + 1))" --only-max); fi
  "$BIN/kv-bench" "${TARGET[@]}" -c 8 --keys 8 --mix set=1,get=2,delete=1 -d "${DUR}s" \
    --history "$D/h.jsonl" --allow-errors --quiet --timeout 5s >"$D/bench.out" 2>&1 &
fi
BENCH=$!
sleep 2 # let the load start before the first fault (not synchronisation of results)

case $MODE in
  leader9) for _ in 1 2 3; do fault "$(pick 1)" KILL; sleep 2; done ;;
  term) for _ in 1 2; do fault "$(pick 1)" TERM; sleep 2; done ;;
  follower9) for _ in 1 2; do fault "$(pick 0)" KILL; sleep 2; done ;;
  mixed) fault "$(pick 1)" KILL; sleep 2; fault "$(pick 1)" TERM; sleep 2; fault "$(pick 0)" KILL; sleep 2; fault "$(pick 1)" KILL ;;
esac
wait $BENCH
for i in 1 2 3; do count_lease $i; done
echo "lease_local_reads=$LEASE_TOTAL"
grep -E "ops|error|timeout|wrong|fail" "$D/bench.out" | head -8
echo "history_lines=$(wc -l <"$D/h.jsonl")"
"$BIN/kv-bench" check-history --quiet "$D/h.jsonl" >"$D/check.out" 2>&1
verdict=$?
tail -5 "$D/check.out"
exit $verdict
