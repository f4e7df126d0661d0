#!/usr/bin/env bash
# Failover time through kv-proxy: kill -9 the node leading the most shards,
# then PUT (through the proxy) one key of each shard it led, every key in its
# own loop, and report how long after the kill each key's first 200 came.
#
#   scripts/break-failover.sh [KILLS]    ports 26900-26903, data /tmp/kvbreak/failover
set -uo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-4}
BIN=target/release
BASE=26900
D=/tmp/kvbreak/failover
rm -rf "$D"; mkdir -p "$D/logs"
PEERS="1=127.0.0.1:$((BASE + 1)),2=127.0.0.1:$((BASE + 2)),3=127.0.0.1:$((BASE + 3))"
declare -A PID
start_node() {
  "$BIN/kv-node" --port $((BASE + $1)) --node-id "$1" --peers "$PEERS" --fsync always \
    --data-dir "$D/node-$1" >>"$D/logs/node-$1.log" 2>&1 &
  PID[$1]=$!
}
wait_ready() {
  local t=0
  until curl -sf -o /dev/null "http://127.0.0.1:$((BASE + $1))/-/ready"; do
    t=$((t + 1)); [ $t -gt 600 ] && { echo "node $1 not ready"; return 1; }; sleep 0.1
  done
}
for i in 1 2 3; do start_node $i; done
for i in 1 2 3; do wait_ready $i || exit 3; done
"$BIN/kv-proxy" --port $BASE --nodes "127.0.0.1:$((BASE + 1)),127.0.0.1:$((BASE + 2)),127.0.0.1:$((BASE + 3))" >"$D/logs/proxy.log" 2>&1 &
PROXY=$!
until curl -sf -o /dev/null "http://127.0.0.1:$BASE/-/health"; do sleep 0.1; done
# A key per shard: 400 candidate keys cover the 64 shards.
declare -A KEY_OF
for k in $(seq 1 400); do
  s=$(curl -s "http://127.0.0.1:$BASE/-/owner/fo-$k" | sed -n 's/.*"shard":\([0-9]*\).*/\1/p')
  [ -n "$s" ] && [ -z "${KEY_OF[$s]:-}" ] && KEY_OF[$s]=fo-$k
done
echo "keys for ${#KEY_OF[@]} shards"
for kill in $(seq 1 "$KILLS"); do
  sleep 3 # let leader balancing settle after the previous restart
  best=1; bestn=-1
  for i in 1 2 3; do
    n=$(curl -s "http://127.0.0.1:$((BASE + i))/-/health" | sed -n 's/.*"shards_led":\([0-9]*\).*/\1/p')
    [ "${n:-0}" -gt "$bestn" ] && { best=$i; bestn=$n; }
  done
  # The victim's shards, from its own view.
  shards=$(curl -s "http://127.0.0.1:$((BASE + best))/-/shards" | tr '{' '\n' | sed -n "s/.*\"leader\":$best,.*\"shard\":\([0-9]*\),.*/\1/p")
  keys=(); for s in $shards; do [ -n "${KEY_OF[$s]:-}" ] && keys+=("${KEY_OF[$s]}"); done
  t0=$(date +%s%N)
  kill -9 "${PID[$best]}"; wait "${PID[$best]}" 2>/dev/null
  loops=()
  for k in "${keys[@]}"; do
    (
      while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X PUT "http://127.0.0.1:$BASE/$k" -d '{"value":"x"}')
        if [ "$code" = 200 ]; then echo $((($(date +%s%N) - t0) / 1000000)); break; fi
        [ $((($(date +%s%N) - t0) / 1000000000)) -gt 20 ] && { echo "timeout"; break; }
      done
    ) >"$D/t-$kill-$k" &
    loops+=($!)
  done
  wait "${loops[@]}"
  ms=$(cat "$D"/t-"$kill"-* | sort -n)
  echo "kill $kill: node $best (led $bestn), ${#keys[@]} shards' keys; ms to first 200: min $(echo "$ms" | head -1) median $(echo "$ms" | sed -n "$(( (${#keys[@]} + 1) / 2 ))p") max $(echo "$ms" | tail -1)"
  start_node "$best"; wait_ready "$best"
done
kill $PROXY; for i in 1 2 3; do kill "${PID[$i]}"; done; wait 2>/dev/null
