//! The Raft type declarations every group shares, and the openraft
//! [`Config`] kv runs with (design `docs/replication.md` §9.1).
//!
//! A group replicates [`Command`]s (a PUT or a DELETE of one key) and answers
//! each with an [`Outcome`] decided in log order. Node ids are `u64` (the
//! `--node-id` of a member), nodes are [`BasicNode`]s whose `addr` is the
//! member's `host:port`: clients and peers share one port.

use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use openraft::{BasicNode, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};

/// A Raft group's id: the shard number (`u32::MAX` is reserved for issue
/// 13's metadata group).
pub type GroupId = u32;

/// The group id reserved for issue 13's metadata group; never a shard.
pub const METADATA_GROUP: GroupId = u32::MAX;

/// A member's id (`--node-id`).
pub type NodeId = u64;

/// What a group replicates: one write of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store `value` under `key`.
    Put { key: String, value: Vec<u8> },
    /// Remove `key`.
    Delete { key: String },
}

/// openraft logs entries with `Display`; keep values out of the logs.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Put { key, value } => write!(f, "put {key:?} ({} bytes)", value.len()),
            Command::Delete { key } => write!(f, "delete {key:?}"),
        }
    }
}

/// How a command was applied, decided in log order on every replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A PUT was applied (also the answer to entries that carry no command).
    #[default]
    Stored,
    /// A DELETE was applied; `found` says whether the key existed.
    Deleted { found: bool },
}

openraft::declare_raft_types!(
    /// kv's Raft type configuration: `NodeId = u64`, `Term = u64`, tokio.
    pub KvRaft:
        D = Command,
        R = Outcome,
        Node = BasicNode,
);

/// A snapshot's bytes as they travel and as the test state machine keeps
/// them. Task C's state machine keeps the same type until snapshots are
/// streamed from files (design §5, open question 5).
pub type SnapshotData = Cursor<Vec<u8>>;

/// One group's handle, over the state machine type `SM`.
pub type Raft<SM> = openraft::Raft<KvRaft, SM>;

/// The timeouts a node may override (hidden flags, for tests), in
/// milliseconds. The defaults are the design's (§9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How often a leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// Shortest election timeout; also the shortest leader lease.
    pub election_min_ms: u64,
    /// Longest election timeout; the leader lease (a deposed leader stops
    /// serving linearizable reads this long after its last quorum ack).
    pub election_max_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 300,
            election_max_ms: 600,
        }
    }
}

/// The openraft configuration every group of a node runs with, validated.
///
/// - pre-vote on, so a node back from a partition does not depose a healthy
///   leader (our transport implements `pre_vote`; openraft's default grants
///   every pre-vote, which would make this setting a no-op);
/// - `SnapshotPolicy::Never`: the node's scheduler triggers snapshots by log
///   size and WAL pressure (§4.3), not openraft's entry count;
/// - a short log tail kept after a snapshot, so a briefly lagging follower
///   catches up from the log rather than a snapshot;
/// - `api_channel_size` 1024 per group instead of 65536: 64 groups per node.
pub fn raft_config(timeouts: Timeouts) -> Result<Arc<Config>, openraft::ConfigError> {
    let config = Config {
        cluster_name: "kv".to_string(),
        heartbeat_interval: timeouts.heartbeat_ms,
        election_timeout_min: timeouts.election_min_ms,
        election_timeout_max: timeouts.election_max_ms,
        enable_pre_vote: Some(true),
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 1000,
        replication_lag_threshold: 5000,
        max_payload_entries: 1000,
        install_snapshot_timeout: 2000,
        api_channel_size: Some(1024),
        ..Default::default()
    };
    Ok(Arc::new(config.validate()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_config_is_valid_and_has_pre_vote() {
        let config = raft_config(Timeouts::default()).unwrap();
        assert_eq!(config.enable_pre_vote, Some(true));
        assert_eq!(config.election_timeout_max, 600);
        assert!(matches!(config.snapshot_policy, SnapshotPolicy::Never));
    }

    #[test]
    fn inverted_election_timeouts_are_refused() {
        let timeouts = Timeouts {
            heartbeat_ms: 100,
            election_min_ms: 600,
            election_max_ms: 300,
        };
        assert!(raft_config(timeouts).is_err());
    }

    #[test]
    fn command_display_hides_the_value() {
        let put = Command::Put {
            key: "k".into(),
            value: b"secret".to_vec(),
        };
        assert_eq!(put.to_string(), "put \"k\" (6 bytes)");
    }
}
