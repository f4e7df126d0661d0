#!/usr/bin/env bash
# Makes docker/kv.env, the env file docker/docker-compose.yml reads the
# cluster's token from (KV_AUTH_TOKEN=<64 hex digits>), unless it exists.
# The containers listen on 0.0.0.0, which kv-node and kv-proxy refuse to do
# without a token (protected mode); the nodes and the proxy share this one.
# Readable by its owner only; git ignores it. Prints the file's path.
set -euo pipefail
cd "$(dirname "$0")/.."
file=docker/kv.env
if [ ! -s "$file" ]; then
  umask 077
  token=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  printf '# The token every request to the compose cluster needs (but /-/health):\n' >"$file"
  printf '#   curl -H "Authorization: Bearer $KV_AUTH_TOKEN" ...\n' >>"$file"
  printf 'KV_AUTH_TOKEN=%s\n' "$token" >>"$file"
  echo "generated $file" >&2
fi
echo "$file"
