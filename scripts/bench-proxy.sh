#!/usr/bin/env bash
# kv-proxy against nginx's consistent-hash proxying, in one run on this machine.
#
# Starts 3 release kv-nodes, kv-proxy in front of them, and nginx in front of
# the same nodes (`hash $request_uri consistent;`, upstream keepalive 64,
# HTTP/1.1 upstream), then runs the same wrk load (64 connections, GETs of
# existing keys spread over many keys) direct to a node, through kv-proxy and
# through nginx, and prints requests/s, kv-proxy ÷ nginx, and the latency each
# proxy adds over going direct.
#
# nginx's hash places keys differently from kv-ring, so every key is preloaded
# on all three nodes: each request then finds its key (200, same body) however
# it is routed, and all three runs do the same work.
#
# The proxies are measured in ROUNDS rounds, kv-proxy then nginx in each,
# so both see the machine's changing load alike; each round's ratio and the
# median are printed (single runs here swing ±10-15%, see ../shared/peers.md).
#
# Usage: scripts/bench-proxy.sh            (env: DURATION=10s CONNECTIONS=64
#        THREADS=2 KEYS=10000 ROUNDS=3 BASE_PORT=28080 PROXY_BIN=<kv-proxy>
#        STAT=1 to count each proxy's syscalls and context switches per
#        request with perf stat, which costs the proxies some speed)
# PROXY_BIN runs another kv-proxy binary (say, a copy built from an older
# commit) against the same nodes, to compare two builds run after run.
# Everything started here is stopped on exit (trap).
set -euo pipefail
# Benchmarks measure the path without tokens: a KV_AUTH_TOKEN exported in
# the shell would reach the nodes started here but not this script's clients.
unset KV_AUTH_TOKEN KV_AUTH_TOKEN_FILE

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
KEYS=${KEYS:-10000}
ROUNDS=${ROUNDS:-3}
BASE_PORT=${BASE_PORT:-28080}
PROXY_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 10))
NODE_PORTS=($((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)))

cd "$(dirname "$0")/.."

need() { # command, Debian package
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "== installing $2" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y "$2" >/dev/null 2>&1 ||
        { $sudo apt-get update >/dev/null && $sudo apt-get install -y "$2" >/dev/null; }
}
need wrk wrk
need curl curl
need python3 python3
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need nginx nginx-light
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

WORK=$(mktemp -d -t kv-bench-proxy.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

for port in "$PROXY_PORT" "$NGINX_PORT" "${NODE_PORTS[@]}"; do
    if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
        echo "port $port is in use; set BASE_PORT" >&2
        exit 1
    fi
done

echo "== building release binaries" >&2
cargo build --release --quiet --bin kv-node --bin kv-proxy
BIN=target/release
PROXY_BIN=${PROXY_BIN:-$BIN/kv-proxy}

wait_healthy() { # port, name
    for _ in $(seq 1 500); do
        curl -sf -o /dev/null "http://127.0.0.1:$1/-/health" && return 0
        sleep 0.02
    done
    echo "$2 on port $1 never became healthy" >&2
    exit 1
}

NODES=""
for port in "${NODE_PORTS[@]}"; do
    RUST_LOG=warn "$BIN/kv-node" --port "$port" --data-dir "$WORK/data/$port" 2>"$WORK/node-$port.log" &
    PIDS+=($!)
    NODES="${NODES:+$NODES,}127.0.0.1:$port"
done
for port in "${NODE_PORTS[@]}"; do wait_healthy "$port" kv-node; done

RUST_LOG=warn "$PROXY_BIN" --port "$PROXY_PORT" --nodes "$NODES" 2>"$WORK/proxy.log" &
PROXY_PID=$!
PIDS+=($PROXY_PID)
wait_healthy "$PROXY_PORT" kv-proxy

. scripts/nginx-hash.sh
nginx_hash_conf "$WORK/nginx" "$NGINX_PORT" "${NODE_PORTS[@]}"
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx/stderr.log" &
NGINX_PID=$!
PIDS+=($NGINX_PID)
for _ in $(seq 1 500); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_PORT/-/health")" = 200 ] && break
    sleep 0.02
done

echo "== preloading $KEYS keys on every node" >&2
python3 - "$KEYS" "${NODE_PORTS[@]}" <<'PY'
import http.client, sys
keys, ports = int(sys.argv[1]), sys.argv[2:]
for port in ports:
    conn = http.client.HTTPConnection("127.0.0.1", int(port))
    for i in range(keys):
        body = '{"value": {"id": %d, "name": "bench_%d", "tags": ["a", "b"]}}' % (i, i)
        conn.request("PUT", "/bench_%d" % i, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            sys.exit("preload PUT bench_%d on %s: %d" % (i, port, response.status))
    conn.close()
PY
for target in "$PROXY_PORT" "$NGINX_PORT"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$target/bench_$((KEYS - 1))")
    [ "$code" = 200 ] || { echo "GET through port $target answered $code" >&2; exit 1; }
done

cat >"$WORK/get.lua" <<LUA
-- GETs of existing keys, each thread walking the key space from its own offset.
local keys = $KEYS
local threads = 0
function setup(thread)
    thread:set("offset", threads * 7919)
    threads = threads + 1
end
function init(args)
    i = (offset or 0) % keys
end
function request()
    i = i + 1
    if i >= keys then i = 0 end
    return wrk.format("GET", "/bench_" .. i)
end
LUA

# wrk prints latencies as 512.00us / 1.20ms / 1.01s: convert to µs.
to_us() { awk '{ v = $1 + 0; if ($1 ~ /us$/) print v; else if ($1 ~ /ms$/) print v * 1000; else if ($1 ~ /s$/) print v * 1000000; else print v }'; }

# CPU time (user + system, in clock ticks) used so far by the given processes.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total"
}

run() { # name, port, pids whose CPU time is the proxy's
    local name=$1 port=$2
    shift 2
    # A short warm-up fills connection pools and caches; it is not measured.
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$WORK/get.lua" "http://127.0.0.1:$port" >/dev/null
    local before after requests cpu_us=-
    local stat_pid=""
    if [ -n "${STAT:-}" ] && [ $# -gt 0 ]; then
        # Syscalls and context switches of the proxy's processes over the run.
        local pids
        pids=$(IFS=,; echo "$*")
        perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pids" -o "$WORK/$name.stat" &
        stat_pid=$!
    fi
    before=$(cpu_ticks "$@")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/get.lua" "http://127.0.0.1:$port" >"$WORK/$name.wrk"
    after=$(cpu_ticks "$@")
    requests=$(awk '/requests in/ { print $1 }' "$WORK/$name.wrk")
    local stat_line=""
    if [ -n "$stat_pid" ]; then
        kill -INT "$stat_pid" 2>/dev/null || true
        wait "$stat_pid" 2>/dev/null || true
        stat_line=$(awk -F, -v n="$requests" '
            /raw_syscalls:sys_enter/ { sc = $1 } /context-switches/ { cs = $1 }
            END { printf "   syscalls %.2f, context switches %.2f per request", sc / n, cs / n }' "$WORK/$name.stat")
    fi
    if [ $# -gt 0 ]; then
        cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    fi
    set -- "$name" "$port"
    local rps avg p50 p99 errors
    rps=$(awk '/^Requests\/sec/ { print $2 }' "$WORK/$1.wrk")
    avg=$(awk '$1 == "Latency" { print $2; exit }' "$WORK/$1.wrk" | to_us)
    p50=$(awk '$1 == "50%" { print $2 }' "$WORK/$1.wrk" | to_us)
    p99=$(awk '$1 == "99%" { print $2 }' "$WORK/$1.wrk" | to_us)
    errors=$(awk '/Non-2xx|Socket errors/' "$WORK/$1.wrk")
    [ -z "$errors" ] || echo "   $1: $errors" >&2
    echo "$1 $rps $avg $p50 $p99 $cpu_us" >>"$WORK/results"
    printf '%-11s %9.0f req/s   latency avg %7.0f us  p50 %7.0f us  p99 %7.0f us   proxy CPU %5s us/request\n' \
        "$1" "$rps" "$avg" "$p50" "$p99" "$cpu_us"
    [ -z "$stat_line" ] || echo "$stat_line"
}

echo "== wrk: $THREADS threads, $CONNECTIONS connections, $DURATION, GETs over $KEYS keys, $ROUNDS rounds ($(nproc) cores, shared)"
run direct "${NODE_PORTS[0]}"
for round in $(seq 1 "$ROUNDS"); do
    run "kv-proxy#$round" "$PROXY_PORT" "$PROXY_PID"
    # shellcheck disable=SC2046 # the master and its workers, one word each
    run "nginx#$round" "$NGINX_PORT" "$NGINX_PID" $(pgrep -P "$NGINX_PID")
done

awk '
    function median(values, n,    i, j, t) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
            if (values[j] < values[i]) { t = values[i]; values[i] = values[j]; values[j] = t }
        return n % 2 ? values[(n + 1) / 2] : (values[n / 2] + values[n / 2 + 1]) / 2
    }
    { split($1, name, "#"); kind = name[1]; round = name[2]
      rps[kind, round] = $2; avg[kind] += $3; p50[kind] += $4; p99[kind] += $5; cpu[kind, round] = $6; runs[kind]++ }
    END {
        n = 0
        for (r = 1; ("kv-proxy", r) in rps; r++) {
            n++
            ratio[n] = rps["kv-proxy", r] / rps["nginx", r]
            cratio[n] = cpu["kv-proxy", r] / cpu["nginx", r]
            printf "round %d: kv-proxy / nginx requests/s %.2f, CPU per request %.2f\n", r, ratio[n], cratio[n]
        }
        printf "kv-proxy / nginx requests/s: median %.2f over %d rounds\n", median(ratio, n), n
        printf "kv-proxy / nginx CPU per request: median %.2f (lower is better)\n", median(cratio, n)
        for (kind in runs) if (kind != "direct")
            printf "%-9s adds over direct (mean of rounds): avg %+.0f us, p50 %+.0f us, p99 %+.0f us\n",
                kind, avg[kind] / runs[kind] - avg["direct"], p50[kind] / runs[kind] - p50["direct"],
                p99[kind] / runs[kind] - p99["direct"]
    }' "$WORK/results"
