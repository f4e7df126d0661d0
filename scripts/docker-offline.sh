#!/usr/bin/env bash
# Makes what docker/docker-compose.yml needs on a machine that cannot pull
# images (no network, or a registry that is out of reach):
#
#   1. builds kv-node, kv-proxy and kv-health here (release) and puts them in
#      docker/prebuilt/, which the Dockerfile's build stage copies instead of
#      running cargo;
#   2. imports a small local base image (busybox for a shell, plus the C
#      libraries the binaries load, copied from this machine).
#
# Then start the cluster with that image in place of the rust and debian ones:
#
#   scripts/docker-offline.sh
#   KV_BUILD_IMAGE=kv-local/base:latest KV_RUNTIME_IMAGE=kv-local/base:latest \
#     docker compose -f docker/docker-compose.yml up --build -d
#
# KV_BASE_IMAGE names the base image (default kv-local/base:latest). Needs
# Debian's busybox-static (installed when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

base_image=${KV_BASE_IMAGE:-kv-local/base:latest}
ensure_packages busybox-static

echo "== building the binaries (release)"
cargo build --release -q --bin kv-node --bin kv-proxy --bin kv-health
mkdir -p docker/prebuilt
cp target/release/kv-node target/release/kv-proxy target/release/kv-health docker/prebuilt/

echo "== making the local base image $base_image"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for tool in sh cp mkdir ls cat; do ln -s busybox "$root/bin/$tool"; done
for lib in $(ldd docker/prebuilt/* | awk '/=>/ {print $3} /ld-linux/ {print $1}' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo "kv:x:10001:10001::/data:/bin/sh" >"$root/etc/passwd"
chmod 1777 "$root/tmp"
tar -C "$root" -c . | docker import -c 'ENV PATH=/usr/local/bin:/bin' - "$base_image" >/dev/null
echo "ready: KV_BUILD_IMAGE=$base_image KV_RUNTIME_IMAGE=$base_image docker compose -f docker/docker-compose.yml up --build -d"
