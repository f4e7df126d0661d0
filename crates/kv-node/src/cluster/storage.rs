//! The seam between cluster mode and Raft storage: what a group's log and
//! state machine are, how they are opened, and how the request path reads a
//! replica.
//!
//! **Today this is kv-raft's in-memory storage** (`mem::{MemLog, MemSm}`):
//! task C of issue 12 is writing the durable `kv_raft::NodeStorage` over
//! kv-store's write-ahead log in parallel. Until it lands a node keeps its
//! groups' logs and maps in memory only, so a restarted node comes back
//! empty and catches up from its peers (a whole-cluster restart loses
//! everything). Switching is this file: the type aliases, [`open`],
//! [`NodeStorage::group`] and [`DURABLE`].

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use kv_raft::mem::{MemLog, MemSm};
use kv_raft::GroupId;
use kv_store::Store;
use xxhash_rust::xxh3::xxh3_64;

/// One group's log storage.
pub(crate) type GroupLog = MemLog;
/// One group's state machine (a shard's map).
pub(crate) type ShardSm = MemSm;
/// One group's handle.
pub(crate) type ShardRaft = kv_raft::Raft<ShardSm>;

/// Whether a group's log survives a restart. With durable storage an
/// uninitialised group on its preferred leader is initialised on every
/// start (covering a crash between `cluster.json` and `initialize`); with
/// memory storage only on the first start, since after a restart an empty
/// log means "lost", not "never initialised".
pub(crate) const DURABLE: bool = false;

/// Adjusts the openraft config to the storage: a memory log comes back
/// empty after a restart, which a leader would otherwise take for a bug
/// (openraft asserts a follower's log never goes backward); durable
/// storage keeps that check.
pub(crate) fn adjust_config(config: Arc<openraft::Config>) -> Arc<openraft::Config> {
    if DURABLE {
        return config;
    }
    let mut config = (*config).clone();
    config.allow_log_reversion = Some(true);
    Arc::new(config)
}

/// The node's storage for all its groups.
pub(crate) struct NodeStorage {
    // Held so the data dir stays locked and open while groups run; the
    // durable storage writes through it.
    _store: Arc<Store>,
}

/// Opens the storage of every group on this node.
pub(crate) fn open(store: Arc<Store>, _dir: &Path) -> io::Result<NodeStorage> {
    Ok(NodeStorage { _store: store })
}

impl NodeStorage {
    /// Group `group`'s log and state machine, recovered.
    pub(crate) fn group(&self, _group: GroupId) -> io::Result<(GroupLog, ShardSm)> {
        Ok((GroupLog::default(), ShardSm::default()))
    }
}

/// The stored body of `key` on this replica (what a GET answers).
pub(crate) fn read(sm: &ShardSm, key: &str) -> Option<Bytes> {
    sm.get(key).map(Bytes::from)
}

/// Keys on this replica.
pub(crate) fn len(sm: &ShardSm) -> usize {
    sm.contents().len()
}

/// Key count and an order-independent digest of every (key, value) on this
/// replica, to compare replicas.
pub(crate) fn digest(sm: &ShardSm) -> (u64, u64) {
    let contents = sm.contents();
    let mut sum = 0u64;
    for (key, value) in &contents {
        let mut item = Vec::with_capacity(key.len() + value.len() + 8);
        item.extend_from_slice(&(key.len() as u64).to_le_bytes());
        item.extend_from_slice(key.as_bytes());
        item.extend_from_slice(value);
        sum = sum.wrapping_add(xxh3_64(&item));
    }
    (contents.len() as u64, sum)
}
