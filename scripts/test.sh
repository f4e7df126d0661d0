#!/usr/bin/env bash
# Every test: the workspace's tests, then the Docker cluster test (which says
# SKIPPED, and passes, where no Docker engine is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
scripts/docker-test.sh
