#!/usr/bin/env bash
# Partition soak: issue 12's test 4 with many more runs than the suite's 20.
#
#   scripts/partition-soak.sh [RUNS]     default 200 runs (~2.3 s each in debug)
#
# Each run cuts the node leading the most shards off from its peers (every
# node-to-node link black-holed through a test-controlled relay) while nine
# clients keep working on all three nodes, heals, and checks every key's
# history for linearizability with kv-bench's checker, and that the cut-off
# node acknowledged nothing while cut off. The first failing run stops the
# soak and prints the violation. KV_BUILD_PROFILE=release runs release builds;
# KV_PARTITION_DEBUG=1 prints every answer of the cut-off node.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-200}
PROFILE_FLAG=()
if [ "${KV_BUILD_PROFILE:-debug}" = release ]; then PROFILE_FLAG=(--release); fi

# Bounded: a stuck run must not hang the soak forever (~10 s per run is far
# above what a run takes).
KV_PARTITION_RUNS=$RUNS timeout $((120 + RUNS * 10)) \
  cargo test "${PROFILE_FLAG[@]}" -p kv-node --test replication_partition -- --nocapture
