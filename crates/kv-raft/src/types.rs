//! The Raft type declarations every group shares, and the openraft
//! [`Config`] kv runs with (design `docs/replication.md` §9.1).
//!
//! A group replicates [`Command`]s (a PUT or a DELETE of one key in a shard
//! group; a [`MetaCommand`] in the metadata group, `docs/membership.md` §3.1)
//! and answers each with an [`Outcome`] decided in log order. Node ids are `u64` (the
//! `--node-id` of a member), nodes are [`BasicNode`]s whose `addr` is the
//! member's `host:port`: clients and peers share one port.

use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use kv_cluster::meta::{self, MetaCommand, Refusal};
use openraft::{BasicNode, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};

/// A Raft group's id: the shard number (`u32::MAX` is reserved for issue
/// 13's metadata group).
pub type GroupId = u32;

/// The group id reserved for issue 13's metadata group; never a shard.
pub const METADATA_GROUP: GroupId = u32::MAX;

/// A member's id (`--node-id`).
pub type NodeId = u64;

/// What a group replicates: one write of one key, or (metadata group only)
/// one change of the cluster state.
///
/// Postcard-encoded in the WAL and on the wire, which writes a variant as
/// its index: variants are only ever **appended**, never reordered or
/// removed, so records written by an older build still decode
/// (`tests::old_records_still_decode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store `value` under `key`.
    Put { key: String, value: Vec<u8> },
    /// Remove `key`.
    Delete { key: String },
    /// Change the cluster state with [`kv_cluster::meta::apply`]; proposed
    /// to [`METADATA_GROUP`] only, never to a shard group.
    Meta(MetaCommand),
}

/// openraft logs entries with `Display`; keep values out of the logs.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Put { key, value } => write!(f, "put {key:?} ({} bytes)", value.len()),
            Command::Delete { key } => write!(f, "delete {key:?}"),
            Command::Meta(cmd) => write!(f, "meta {cmd:?}"),
        }
    }
}

/// How a command was applied, decided in log order on every replica.
/// Variants are only appended, as for [`Command`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A PUT was applied (also the answer to entries that carry no command).
    #[default]
    Stored,
    /// A DELETE was applied; `found` says whether the key existed.
    Deleted { found: bool },
    /// A [`Command::Meta`] was applied (the state's version after it) or
    /// refused (the state is unchanged).
    Meta(Result<meta::Outcome, Refusal>),
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
///
/// A follower that stops hearing from its leader stands for election
/// `election_max_ms` (openraft's leader lease, during which it refuses
/// votes) plus a random `election_min_ms..election_max_ms` after the last
/// heartbeat, so a failover takes about 600-800 ms with these defaults
/// (300/600 took 0.9-1.2 s: p50 1.01 s against issue 12's 1 s target;
/// 200/400 measured p50 0.66 s, max 0.82 s over 8 kills, and no election
/// under a 20 s PUT load at load average 6).
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
            election_min_ms: 200,
            election_max_ms: 400,
        }
    }
}

/// Most bytes of entries one append RPC of one group carries (estimated
/// as key + value + [`ENTRY_OVERHEAD`] per entry): a quarter of the
/// transport's [`MAX_RPC_BODY`](crate::net::MAX_RPC_BODY), so a batch of
/// several groups' appends fits under it too.
pub const APPEND_BUDGET: usize = crate::net::MAX_RPC_BODY / 4;

/// Estimated bytes per entry besides its key and value (log id, framing).
pub const ENTRY_OVERHEAD: usize = 64;

/// The largest value a clustered node can replicate: one entry must fit in
/// one append ([`APPEND_BUDGET`]). kv-node must refuse a larger
/// `--max-value-bytes` in cluster mode.
pub const MAX_REPLICATED_VALUE: usize = APPEND_BUDGET - ENTRY_OVERHEAD - crate::net::MAX_KEY_BYTES;

/// The openraft configuration every group of a node runs with, validated.
///
/// `max_value_bytes` (kv-node's `--max-value-bytes`, at most
/// [`MAX_REPLICATED_VALUE`]) sizes `max_payload_entries`: openraft bounds an
/// append by entry count only, and 1000 entries of 1 MiB values would be a
/// 1 GB request that the peer refuses (413) forever.
///
/// - pre-vote on, so a node back from a partition does not depose a healthy
///   leader (our transport implements `pre_vote`; openraft's default grants
///   every pre-vote, which would make this setting a no-op);
/// - `SnapshotPolicy::Never`: the node's scheduler triggers snapshots by log
///   size and WAL pressure (§4.3), not openraft's entry count;
/// - a short log tail kept after a snapshot, so a briefly lagging follower
///   catches up from the log rather than a snapshot;
/// - `api_channel_size` 1024 per group instead of 65536: 64 groups per node;
/// - a follower's log may revert (`allow_log_reversion`, below).
pub fn raft_config(
    timeouts: Timeouts,
    max_value_bytes: usize,
) -> Result<Arc<Config>, openraft::ConfigError> {
    let per_entry = max_value_bytes
        .saturating_add(crate::net::MAX_KEY_BYTES)
        .saturating_add(ENTRY_OVERHEAD);
    let max_payload_entries = (APPEND_BUDGET / per_entry).clamp(1, 1000) as u64;
    let config = Config {
        cluster_name: "kv".to_string(),
        heartbeat_interval: timeouts.heartbeat_ms,
        election_timeout_min: timeouts.election_min_ms,
        election_timeout_max: timeouts.election_max_ms,
        enable_pre_vote: Some(true),
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 1000,
        replication_lag_threshold: 5000,
        max_payload_entries,
        install_snapshot_timeout: 2000,
        api_channel_size: Some(1024),
        // A leader restarted by kill -9 must win a new election, never take
        // up its old term again: it may send entries to followers before its
        // own WAL has them (openraft reads them from the in-memory log), so
        // after a crash it can come back in the same term without an entry
        // a follower kept, then propose a different entry at that index
        // with the same log id; the follower keeps its own (same log id,
        // so no conflict) and the replicas diverge for good (seen with all
        // three nodes killed during writes: one replica's digest differed
        // at the same applied index). A new term's blank entry truncates
        // such leftovers. The price: after a restart of the whole cluster
        // every shard elects (after the restart guard's lease).
        enable_leader_restore: Some(false),
        // A follower's log can come back shorter than its leader last saw
        // it acknowledge: `--repair` cuts a damaged log, and with
        // `--fsync everysec` a machine crash loses the last unsynced second.
        // With this off, the leader's next heartbeat finds the acknowledged
        // entry missing and openraft asserts (debug builds: the leader's
        // group core panics) or keeps replicating from where the follower
        // was (release: the follower never catches up while that leader
        // lasts). On, the leader searches the follower's log again from the
        // start and resends what is missing; the quorum's committed index
        // never goes back (`VecProgress::reset_entry_with`).
        allow_log_reversion: Some(true),
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
        let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
        assert_eq!(config.enable_pre_vote, Some(true));
        assert_eq!(config.election_timeout_max, 400);
        assert!(matches!(config.snapshot_policy, SnapshotPolicy::Never));
        assert_eq!(
            config.enable_leader_restore,
            Some(false),
            "a restarted leader must be elected again"
        );
        assert_eq!(
            config.allow_log_reversion,
            Some(true),
            "a repaired follower must be caught up again"
        );
    }

    #[test]
    fn inverted_election_timeouts_are_refused() {
        let timeouts = Timeouts {
            heartbeat_ms: 100,
            election_min_ms: 600,
            election_max_ms: 300,
        };
        assert!(raft_config(timeouts, 1 << 20).is_err());
    }

    #[test]
    fn an_append_of_the_largest_values_fits_the_budget() {
        for max_value in [0, 100, 1 << 20, 8 << 20, MAX_REPLICATED_VALUE] {
            let config = raft_config(Timeouts::default(), max_value).unwrap();
            let entries = config.max_payload_entries as usize;
            assert!(entries >= 1);
            if entries > 1 {
                let per_entry = max_value + crate::net::MAX_KEY_BYTES + ENTRY_OVERHEAD;
                assert!(
                    entries * per_entry <= APPEND_BUDGET,
                    "{max_value}: {entries}"
                );
            }
        }
        assert_eq!(
            raft_config(Timeouts::default(), 100)
                .unwrap()
                .max_payload_entries,
            1000
        );
        assert_eq!(
            raft_config(Timeouts::default(), MAX_REPLICATED_VALUE)
                .unwrap()
                .max_payload_entries,
            1
        );
    }

    /// Bytes as the build before `Command::Meta` wrote them (postcard:
    /// variant index, then fields; strings and byte vectors length-prefixed).
    #[test]
    fn old_records_still_decode() {
        let put: Command = postcard::from_bytes(&[0, 1, b'k', 2, b'v', b'w']).unwrap();
        assert_eq!(
            put,
            Command::Put {
                key: "k".into(),
                value: b"vw".to_vec()
            }
        );
        let delete: Command = postcard::from_bytes(&[1, 1, b'k']).unwrap();
        assert_eq!(delete, Command::Delete { key: "k".into() });
        // And today's encoding of them is still those bytes.
        assert_eq!(
            postcard::to_stdvec(&put).unwrap(),
            [0, 1, b'k', 2, b'v', b'w']
        );
        assert_eq!(postcard::to_stdvec(&delete).unwrap(), [1, 1, b'k']);
        let stored: Outcome = postcard::from_bytes(&[0]).unwrap();
        assert_eq!(stored, Outcome::Stored);
        let deleted: Outcome = postcard::from_bytes(&[1, 1]).unwrap();
        assert_eq!(deleted, Outcome::Deleted { found: true });
    }

    #[test]
    fn meta_commands_and_outcomes_round_trip() {
        let commands = [
            Command::Meta(MetaCommand::AddMember {
                id: 4,
                addr: "127.0.0.1:8084".into(),
            }),
            Command::Meta(MetaCommand::Done {
                shard: 3,
                move_id: 9,
                voters: vec![1, 2, 4],
                membership_log_index: 77,
            }),
        ];
        for command in commands {
            let bytes = postcard::to_stdvec(&command).unwrap();
            assert_eq!(bytes[0], 2, "Meta is the third variant");
            assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), command);
        }
        for outcome in [
            Outcome::Meta(Ok(meta::Outcome::Changed { version: 5 })),
            Outcome::Meta(Err(Refusal::NotBootstrapped)),
        ] {
            let bytes = postcard::to_stdvec(&outcome).unwrap();
            assert_eq!(postcard::from_bytes::<Outcome>(&bytes).unwrap(), outcome);
        }
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
