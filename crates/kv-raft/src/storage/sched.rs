//! Snapshot scheduling by log size (design `docs/replication.md` §4.3).
//!
//! Groups run with `SnapshotPolicy::Never`; openraft's own policy counts
//! entries, not bytes, and would never snapshot a group that stopped
//! writing while its entries pin WAL segments. The node instead calls
//! [`SnapshotScheduler::tick`] every second or so: the group whose log
//! since its newest snapshot is largest, if over the bound, gets a snapshot
//! (one group per tick, so snapshots are staggered and never stall every
//! shard at once). Once the snapshot is written openraft purges the log
//! behind it ([`super::GroupLog`] keeps one generation back), the WAL
//! segments holding only purged entries are retired by the store's next
//! rotation.
//!
//! Left to kv-node: calling `tick` on a timer with its groups, the flag for
//! the bound (`--raft-log-max-bytes`), and triggering on WAL pressure (a
//! group pinning the oldest segment when the WAL passes `--wal-max-bytes`).

use std::time::Duration;

use super::{GroupLog, ShardRaft, ShardSm};
use crate::types::GroupId;

/// Picks and triggers one group's snapshot per tick.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotScheduler {
    /// Trigger a group's snapshot when its log since its newest snapshot
    /// holds more than this many (encoded) bytes.
    pub max_log_bytes: u64,
    /// How long a tick waits for the triggered snapshot to be written.
    pub wait: Duration,
}

impl SnapshotScheduler {
    /// A scheduler with the byte bound `max_log_bytes`.
    pub fn new(max_log_bytes: u64) -> Self {
        Self {
            max_log_bytes,
            wait: Duration::from_secs(30),
        }
    }

    /// The group to snapshot now: the largest log since its snapshot, if
    /// over the bound.
    pub fn pick<'a>(
        &self,
        groups: impl IntoIterator<Item = (&'a GroupLog, &'a ShardSm)>,
    ) -> Option<GroupId> {
        groups
            .into_iter()
            .map(|(log, sm)| (log.bytes_after(sm.snapshot_index()), log.group()))
            .filter(|(bytes, _)| *bytes > self.max_log_bytes)
            .max()
            .map(|(_, group)| group)
    }

    /// Triggers the snapshot of the group [`pick`](Self::pick) chooses, and
    /// waits (bounded) until openraft reports it; the group, if any.
    pub async fn tick(&self, groups: &[(GroupLog, ShardSm, ShardRaft)]) -> Option<GroupId> {
        let group = self.pick(groups.iter().map(|(log, sm, _)| (log, sm)))?;
        let (_, sm, raft) = groups.iter().find(|(log, _, _)| log.group() == group)?;
        let applied = sm.applied_index();
        if let Err(error) = raft.trigger().snapshot().await {
            log::warn!("shard {group}: cannot trigger a snapshot: {error}");
            return None;
        }
        let written = raft
            .wait(Some(self.wait))
            .metrics(
                |m| m.snapshot.map(|s| s.index) >= applied,
                "snapshot written",
            )
            .await;
        if let Err(error) = written {
            log::warn!("shard {group}: snapshot not reported: {error}");
        }
        Some(group)
    }
}
