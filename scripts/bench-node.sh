#!/usr/bin/env bash
# kv-node against nginx, side by side in one run, on loopback.
#
#   scripts/bench-node.sh [seconds]      (default 10 s per run)
#
# GET run: wrk, 64 keep-alive connections, GETs of 10,000 existing keys, against
# kv-node and against nginx answering a fixed JSON body with `return 200` (the
# HTTP ceiling: a server that does no work at all). PUT run: the same against
# kv-node with PUTs of a 64-byte value, and nginx `return 200` on PUT.
# The same two runs against a node with --op-log show what the operation log
# costs. Prints the figures and the ratios. Installs wrk and nginx when missing.
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE
cd "$(dirname "$0")/.."
. scripts/lib.sh

SECS=${1:-10}
NODE_PORT=${NODE_PORT:-18081}
OPLOG_PORT=${OPLOG_PORT:-18082}
NGINX_PORT=${NGINX_PORT:-18090}
KEYS=10000

ensure_packages wrk nginx-light curl python3
cargo build --release -q -p kv-node

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=warn target/release/kv-node --port "$NODE_PORT" --data-dir "$work/node" &
pids+=($!)
# The same node with --op-log, to measure what the operation log costs.
RUST_LOG=warn target/release/kv-node --port "$OPLOG_PORT" --data-dir "$work/node-oplog" --op-log "$work/ops.log" &
pids+=($!)

body='{"value":"'$(printf 'v%.0s' $(seq 64))'"}'
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / { default_type application/json; return 200 '$body\n'; }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work"

wait_healthy "127.0.0.1:$NODE_PORT"
wait_healthy "127.0.0.1:$OPLOG_PORT"
wait_port "$NGINX_PORT"
preload_keys "127.0.0.1:$NODE_PORT" "$KEYS"
preload_keys "127.0.0.1:$OPLOG_PORT" "$KEYS"

cat > "$work/get.lua" <<LUA
request = function() return wrk.format("GET", "/bench_" .. math.random($KEYS)) end
LUA
cat > "$work/put.lua" <<LUA
local body = '{"value": "' .. string.rep("v", 64) .. '"}'
local headers = { ["Content-Type"] = "application/json" }
request = function() return wrk.format("PUT", "/bench_" .. math.random($KEYS), headers, body) end
LUA

run() { # name url script
  local out
  out=$(wrk -t2 -c64 -d"${SECS}s" --latency -s "$3" "$2")
  if echo "$out" | grep -q "Non-2xx"; then
    echo "error: $1 answered non-2xx:" >&2
    echo "$out" >&2
    exit 1
  fi
  printf '%s %s %s %s\n' "$1" "$(echo "$out" | wrk_rps)" "$(echo "$out" | wrk_latency 50%)" "$(echo "$out" | wrk_latency 99%)"
}

echo "wrk -t2 -c64 -d${SECS}s, $(nproc) cores, $(date -u +%Y-%m-%d)"
results=$(
  run "kv-node-GET" "http://127.0.0.1:$NODE_PORT" "$work/get.lua"
  run "nginx-return200-GET" "http://127.0.0.1:$NGINX_PORT" "$work/get.lua"
  run "kv-node-PUT" "http://127.0.0.1:$NODE_PORT" "$work/put.lua"
  run "nginx-return200-PUT" "http://127.0.0.1:$NGINX_PORT" "$work/put.lua"
  run "kv-node+oplog-GET" "http://127.0.0.1:$OPLOG_PORT" "$work/get.lua"
  run "kv-node+oplog-PUT" "http://127.0.0.1:$OPLOG_PORT" "$work/put.lua"
)
printf '%-22s %12s %10s %10s\n' "server" "requests/s" "p50" "p99"
echo "$results" | while read -r name rps p50 p99; do
  printf '%-22s %12s %10s %10s\n' "$name" "$rps" "$p50" "$p99"
done
echo "$results" | awk '
  {rps[$1] = $2}
  END {
    printf "kv-node / nginx, GET: %.2fx\n", rps["kv-node-GET"] / rps["nginx-return200-GET"]
    printf "kv-node / nginx, PUT: %.2fx\n", rps["kv-node-PUT"] / rps["nginx-return200-PUT"]
    printf "with --op-log / without, GET: %.2fx, PUT: %.2fx\n", rps["kv-node+oplog-GET"] / rps["kv-node-GET"], rps["kv-node+oplog-PUT"] / rps["kv-node-PUT"]
  }'
curl -s "http://127.0.0.1:$OPLOG_PORT/-/metrics" | awk '/^kv_op_log_(written|dropped)_total/ {printf "%s %s\n", $1, $2}'
