#!/usr/bin/env bash
# Tests the Docker image and the compose cluster for real, on a machine that
# cannot pull images.
#
# It builds the binaries here and makes a small base image locally with
# scripts/docker-offline.sh (the route the README gives users without a
# registry), builds docker/Dockerfile on it through docker/docker-compose.yml (the same
# files users run), then: writes and reads keys through the proxy of the
# replicated cluster, kills one node's container (kill -9), checks every key
# stays readable and writable, restarts it and checks its own copy catches
# up on what it missed, and takes it all down, removing the images it made.
# Exit 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

if ! docker info >/dev/null 2>&1; then
  echo "docker-test: SKIPPED (no Docker engine reachable)"
  exit 0
fi
ensure_packages curl
compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi
}

export KV_PROXY_PORT=${KV_PROXY_PORT:-18180}
export KV_NODE1_PORT=$((KV_PROXY_PORT + 1)) KV_NODE2_PORT=$((KV_PROXY_PORT + 2)) KV_NODE3_PORT=$((KV_PROXY_PORT + 3))
# Images of this run's own, so a user's kv:local and kv-local/base are never
# touched, and all of them are removed at the end (KV_KEEP_IMAGES=1 keeps
# them for a look).
run_tag=$$
export KV_BASE_IMAGE=kv-test/base:$run_tag KV_IMAGE=kv-test/kv:$run_tag
export KV_BUILD_IMAGE=$KV_BASE_IMAGE KV_RUNTIME_IMAGE=$KV_BASE_IMAGE
PROJECT=kvdockertest
FILE=docker/docker-compose.yml
work=$(mktemp -d)
made_env=
cleanup() {
  compose -p "$PROJECT" -f "$FILE" down -v --remove-orphans >/dev/null 2>&1 || true
  if [ "${KV_KEEP_IMAGES:-0}" != 1 ]; then
    docker rmi -f "$KV_IMAGE" "$KV_BASE_IMAGE" >/dev/null 2>&1 || true
    # The build stage's image is left untagged: remove it by its label.
    docker image prune -f --filter label=kv.stage=build >/dev/null 2>&1 || true
  fi
  rm -rf "$work" docker/prebuilt
  [ -z "$made_env" ] || rm -f docker/kv.env
}
trap cleanup EXIT

# The cluster's token (protected mode: the containers listen on 0.0.0.0):
# the user's docker/kv.env if there is one, else one made for this run.
[ -s docker/kv.env ] || made_env=1
scripts/docker-token.sh >/dev/null
token=$(sed -n 's/^KV_AUTH_TOKEN=//p' docker/kv.env)
[ -n "$token" ] || { echo "FAIL: docker/kv.env has no KV_AUTH_TOKEN" >&2; exit 1; }
printf 'Authorization: Bearer %s\n' "$token" >"$work/auth"

scripts/docker-offline.sh

echo "== building the image and starting the cluster"
compose -p "$PROJECT" -f "$FILE" up -d --build >"$work/up.log" 2>&1 || { cat "$work/up.log"; exit 1; }
proxy=127.0.0.1:$KV_PROXY_PORT
wait_healthy "$proxy" 60
for port in $KV_NODE1_PORT $KV_NODE2_PORT $KV_NODE3_PORT; do wait_healthy "127.0.0.1:$port" 60; done

fail() { echo "FAIL: $*" >&2; compose -p "$PROJECT" -f "$FILE" logs --tail 30 >&2 || true; exit 1; }
# Every request but /-/health carries the token (from a file: not in argv).
kvcurl() { curl -H @"$work/auth" "$@"; }
status_of() { kvcurl -s -o /dev/null -w '%{http_code}' "$@"; }

echo "== waiting for the cluster's first leaders"
deadline=$((SECONDS + 60))
until [ "$(status_of -X PUT "http://$proxy/dk_0" -H 'Content-Type: application/json' -d '{"value": 0}')" = 200 ]; do
  [ $SECONDS -lt $deadline ] || fail "no write succeeded within 60 s of the cluster starting"
  sleep 0.2
done

echo "== writing 60 keys through the proxy"
for i in $(seq 1 60); do
  code=$(status_of -X PUT "http://$proxy/dk_$i" -H 'Content-Type: application/json' -d "{\"value\": $i}")
  [ "$code" = 200 ] || fail "PUT dk_$i answered $code"
done
for i in $(seq 1 60); do
  body=$(kvcurl -s "http://$proxy/dk_$i")
  [ "$body" = "{\"value\":$i}" ] || fail "GET dk_$i answered $body"
done

echo "== killing node2 (kill -9): every key stays readable and writable"
compose -p "$PROJECT" -f "$FILE" kill -s SIGKILL node2 >/dev/null 2>&1
# A shard node2 led elects a new leader; the proxy waits for it (up to 3 s),
# and this loop gives each key 15 s in all.
for i in $(seq 1 60); do
  deadline=$((SECONDS + 15))
  until [ "$(kvcurl -s "http://$proxy/dk_$i")" = "{\"value\":$i}" ]; do
    [ $SECONDS -lt $deadline ] || fail "dk_$i unreadable with node2 down"
    sleep 0.1
  done
  code=$(status_of -X PUT "http://$proxy/dk_$i" -H 'Content-Type: application/json' -d "{\"value\": $((i + 100))}")
  [ "$code" = 200 ] || fail "PUT dk_$i answered $code with node2 down"
done
echo "all 60 keys read and rewritten with node2 down"

echo "== restarting node2: it catches up from its volume and its peers"
compose -p "$PROJECT" -f "$FILE" start node2 >/dev/null 2>&1
wait_healthy "127.0.0.1:$KV_NODE2_PORT" 60
# node2's own copy (a stale read answers from the local replica): every
# write it missed arrives, bounded.
for i in $(seq 1 60); do
  deadline=$((SECONDS + 30))
  until [ "$(kvcurl -s -H 'X-Kv-Consistency: stale' "http://127.0.0.1:$KV_NODE2_PORT/dk_$i")" = "{\"value\":$((i + 100))}" ]; do
    [ $SECONDS -lt $deadline ] || fail "node2's copy of dk_$i never caught up"
    sleep 0.1
  done
done
echo "node2's copy of every key caught up"

echo "== without the token: 401"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$proxy/dk_1")
[ "$code" = 401 ] || fail "GET without a token answered $code, not 401"

echo "== health as Docker sees it"
compose -p "$PROJECT" -f "$FILE" ps
echo "docker-test: PASSED"
