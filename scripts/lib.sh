# Shared helpers for the scripts in this folder (source it, don't run it).

# Installs Debian packages that are missing (the scripts run as root on CI).
ensure_packages() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]} from Debian's packages..." >&2
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { $sudo apt-get update -qq >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# Waits (up to $2 seconds, default 30) until http://$1/-/health answers 200
# (https://, verified against $KV_TLS_DIR/ca.pem, when KV_TLS_DIR is set).
wait_healthy() {
  local addr=$1 deadline=$((SECONDS + ${2:-30})) tls=()
  [ -n "${KV_TLS_DIR:-}" ] && tls=(--cacert "$KV_TLS_DIR/ca.pem")
  until curl -fsS -o /dev/null "${tls[@]}" "${KV_SCHEME:-http}://$addr/-/health" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: $addr did not become healthy" >&2
      return 1
    fi
    sleep 0.05
  done
}

# Waits until something accepts TCP connections on 127.0.0.1:$1.
wait_port() {
  local port=$1 deadline=$((SECONDS + ${2:-30}))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: nothing listens on port $port" >&2
      return 1
    fi
    sleep 0.05
  done
}

# Waits until nothing accepts TCP connections on any of the given ports of
# 127.0.0.1, within 30 s in all: processes that were sent SIGTERM (kv-node
# hands its leaderships over first) may still hold them, and the next start
# would fail.
wait_ports_free() {
  local port deadline=$((SECONDS + 30))
  for port in "$@"; do
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        echo "error: port $port still in use 30 s after stopping" >&2
        return 1
      fi
      sleep 0.05
    done
  done
}

# Prints the Requests/sec figure of a wrk report on stdin.
wrk_rps() { awk '/^Requests\/sec:/ {print $2}'; }
# Prints the 50% / 99% latency lines of `wrk --latency` output on stdin.
wrk_latency() { awk -v p="$1" '$1 == p {print $2}'; }

# Writes N keys bench_1..bench_N with a small JSON value, over one keep-alive
# connection, to the node at $1 (host:port).
preload_keys() {
  python3 - "$1" "$2" <<'PY'
import http.client, sys
host, port = sys.argv[1].split(":")
n = int(sys.argv[2])
conn = http.client.HTTPConnection(host, int(port))
body = b'{"value": "' + b"v" * 64 + b'"}'
for i in range(1, n + 1):
    conn.request("PUT", f"/bench_{i}", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"preload failed at bench_{i}: {r.status}")
PY
}

# Writes the same N keys (key_000000000000.., 100-byte JSON string values) as
# a Flask dump DIR/kv_store.json (for kv-node --import) and as Redis SET
# commands DIR/redis.resp (for redis-cli --pipe), so both stores load
# identical data.  Usage: write_dataset DIR N
write_dataset() {
  python3 - "$1" "$2" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
value = "v" * 98  # the JSON text "vvv..." is 100 bytes; Redis holds the same 100 bytes
with open(f"{work}/kv_store.json", "w") as dump, open(f"{work}/redis.resp", "w") as resp:
    dump.write("{")
    for i in range(n):
        key = f"key_{i:012d}"
        dump.write(("," if i else "") + f'"{key}": "{value}"')
        val = '"' + value + '"'
        resp.write(f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n${len(val)}\r\n{val}\r\n")
    dump.write("}")
PY
}
