//! The seam between cluster mode and Raft storage: what a group's log and
//! state machine are, how they are opened, and how the request path reads a
//! replica.
//!
//! The storage is kv-raft's durable [`kv_raft::NodeStorage`] (task C of
//! issue 12): every group's log goes through the node's one write-ahead log
//! (one group commit for all groups), every shard's state machine is a
//! kv-store map with snapshot files under `<data-dir>/shards/`. A restarted
//! node recovers its votes, logs and maps from disk and rejoins with them.

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use kv_store::Store;

pub(crate) use kv_raft::{GroupLog, NodeStorage, ShardRaft, ShardSm};

/// Whether a group's log survives a restart. With durable storage an
/// uninitialised group on its preferred leader is initialised on every
/// start (covering a crash between `cluster.json` and `initialize`); an
/// initialised one has its membership in the log and is left alone.
pub(crate) const DURABLE: bool = true;

/// Opens the storage of every group on this node (blocking: reads the
/// groups the store recovered).
pub(crate) fn open(store: Arc<Store>, dir: &Path) -> io::Result<NodeStorage> {
    NodeStorage::open(store, dir).map_err(|error| io::Error::other(error.to_string()))
}

/// Group `group`'s log and state machine, recovered (blocking).
pub(crate) fn group(storage: &NodeStorage, group: u32) -> io::Result<(GroupLog, ShardSm)> {
    storage
        .group(group)
        .map_err(|error| io::Error::other(error.to_string()))
}

/// The stored body of `key` on this replica (what a GET answers).
pub(crate) fn read(sm: &ShardSm, key: &str) -> Option<Bytes> {
    sm.get(key.as_bytes())
}

/// Keys on this replica.
pub(crate) fn len(sm: &ShardSm) -> usize {
    sm.len()
}

/// Key count and an order-independent digest of every (key, value) on this
/// replica, to compare replicas.
pub(crate) fn digest(sm: &ShardSm) -> (u64, u64) {
    sm.digest()
}
