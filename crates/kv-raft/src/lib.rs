//! kv's replication on openraft: the only crate that depends on it.
//!
//! Design: `docs/replication.md` (issue 12). Every shard is one Raft group
//! (group id = shard number, [`types::GroupId`]); a node hosts every group
//! placed on it, all sharing one transport:
//!
//! - [`types`]: `declare_raft_types!` ([`KvRaft`]: a [`Command`] is a PUT or
//!   DELETE of one key, answered with an [`Outcome`]), and the openraft
//!   [`raft_config`] every group runs with (§9.1);
//! - [`meta`]: how the metadata group's state machine applies a
//!   [`Command::Meta`] (issue 13, `docs/membership.md` §3.1);
//! - [`net`]: node-to-node traffic over HTTP/1.1 under `/-/raft/...` on the
//!   node's own port, postcard bodies, many groups' appends and heartbeats
//!   to one peer batched into one request (§7). The client side is
//!   [`Network`] (openraft's `RaftNetworkFactory`/`RaftNetworkV2`), the
//!   server side [`handle_raft`] over the node's [`Groups`];
//! - [`storage`]: each group's log over the node's one write-ahead log
//!   ([`GroupLog`]), each shard's state machine over a kv-store map with
//!   snapshot files ([`ShardSm`]), opened per node by [`NodeStorage`]
//!   (design §4-5);
//! - `mem` (feature `mem`, tests only): an in-memory log store and state
//!   machine, as openraft's `log-mem`/`sm-mem` examples, used by the
//!   transport's tests.
//!
//! openraft is pinned to `=0.10.0-alpha.37` (design §2.1: 0.9 cannot
//! transfer leadership); keeping it inside this crate keeps an alpha's API
//! changes in one place.

// Snapshots and RPC bodies come from disk and the network: indexing is
// `get` and checked slicing, never a panic.
#![deny(clippy::indexing_slicing)]

pub mod meta;
pub mod net;
pub mod storage;
pub mod types;

#[cfg(feature = "mem")]
pub mod mem;

pub use net::{handle_raft, Groups, Network, RaftHttpError, Refusals, SnapshotThrottle};
pub use storage::{
    digest_entries, GroupLog, NodeStorage, ShardRaft, ShardSm, SnapshotScheduler, StorageError,
};
pub use types::{
    raft_config, Command, GroupId, KvRaft, NodeId, Outcome, Raft, SnapshotData, Timeouts,
    MAX_REPLICATED_VALUE,
};
