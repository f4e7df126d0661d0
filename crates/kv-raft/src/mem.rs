//! An in-memory log store and state machine (as openraft's `log-mem` and
//! `sm-mem` examples), so the transport can be tested before the real
//! storage adapter over kv-store's WAL exists (task C of issue 12). Behind
//! the `mem` feature; never used by a node.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::{Stream, TryStreamExt};
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::{EntryPayload, OptionalSend};

use crate::types::{Command, KvRaft, Outcome, SnapshotData};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct LogInner {
    log: BTreeMap<u64, EntryOf<KvRaft>>,
    vote: Option<VoteOf<KvRaft>>,
    committed: Option<LogIdOf<KvRaft>>,
    purged: Option<LogIdOf<KvRaft>>,
}

/// One group's log, in memory; clones share it (so a test can restart a
/// group over the same log).
#[derive(Debug, Clone, Default)]
pub struct MemLog(Arc<Mutex<LogInner>>);

impl RaftLogReader<KvRaft> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<KvRaft>>, io::Error> {
        Ok(lock(&self.0)
            .log
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<KvRaft>>, io::Error> {
        Ok(lock(&self.0).vote)
    }
}

impl RaftLogStorage<KvRaft> for MemLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<KvRaft>, io::Error> {
        let inner = lock(&self.0);
        let last = inner
            .log
            .values()
            .next_back()
            .map(|entry| entry.log_id)
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<KvRaft>) -> Result<(), io::Error> {
        lock(&self.0).vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<KvRaft>>,
    ) -> Result<(), io::Error> {
        lock(&self.0).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<KvRaft>>, io::Error> {
        Ok(lock(&self.0).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<KvRaft>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<KvRaft>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = lock(&self.0);
            for entry in entries {
                inner.log.insert(entry.log_id.index, entry);
            }
        }
        // Memory is "durable" at once.
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<KvRaft>>) -> Result<(), io::Error> {
        let from = last.map_or(0, |log_id| log_id.index + 1);
        lock(&self.0).log.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<KvRaft>) -> Result<(), io::Error> {
        let mut inner = lock(&self.0);
        inner.log = inner.log.split_off(&(log_id.index + 1));
        inner.purged = Some(log_id);
        Ok(())
    }
}

#[derive(Debug, Default)]
struct SmInner {
    map: BTreeMap<String, Vec<u8>>,
    applied: Option<LogIdOf<KvRaft>>,
    membership: StoredMembershipOf<KvRaft>,
    snapshot: Option<(SnapshotMetaOf<KvRaft>, Vec<u8>)>,
    installs: u64,
}

/// One group's state machine: a `BTreeMap`, snapshots as postcard bytes.
/// Clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemSm(Arc<Mutex<SmInner>>);

impl MemSm {
    /// The value of `key` as applied here.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.0).map.get(key).cloned()
    }

    /// How many snapshots were installed from a leader.
    pub fn snapshot_installs(&self) -> u64 {
        lock(&self.0).installs
    }

    /// Every key and value applied here (to compare replicas).
    pub fn contents(&self) -> BTreeMap<String, Vec<u8>> {
        lock(&self.0).map.clone()
    }
}

impl RaftSnapshotBuilder<KvRaft> for MemSm {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<KvRaft, SnapshotData>, io::Error> {
        let mut inner = lock(&self.0);
        let data = postcard::to_stdvec(&inner.map).map_err(io::Error::other)?;
        let meta = SnapshotMetaOf::<KvRaft> {
            last_log_id: inner.applied,
            last_membership: inner.membership.clone(),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(SnapshotOf::<KvRaft, SnapshotData> {
            meta,
            snapshot: SnapshotData::new(data),
        })
    }
}

impl RaftStateMachine<KvRaft> for MemSm {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<KvRaft>>, StoredMembershipOf<KvRaft>), io::Error> {
        let inner = lock(&self.0);
        Ok((inner.applied, inner.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<KvRaft>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let outcome = {
                let mut inner = lock(&self.0);
                inner.applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Outcome::Stored,
                    EntryPayload::Normal(Command::Put { key, value }) => {
                        inner.map.insert(key, value);
                        Outcome::Stored
                    }
                    EntryPayload::Normal(Command::Delete { key }) => Outcome::Deleted {
                        found: inner.map.remove(&key).is_some(),
                    },
                    EntryPayload::Normal(Command::Meta(cmd)) => {
                        let stored = inner.map.get(crate::meta::META_KEY);
                        let (outcome, state) =
                            crate::meta::apply_meta(stored.map(|v| &v[..]), &cmd)?;
                        if let Some(state) = state {
                            inner.map.insert(crate::meta::META_KEY.to_owned(), state);
                        }
                        outcome
                    }
                    EntryPayload::Membership(membership) => {
                        inner.membership =
                            StoredMembershipOf::<KvRaft>::new(Some(entry.log_id), membership);
                        Outcome::Stored
                    }
                }
            };
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<KvRaft>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let bytes = snapshot.into_inner();
        let map = postcard::from_bytes(&bytes).map_err(io::Error::other)?;
        let mut inner = lock(&self.0);
        inner.map = map;
        inner.applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), bytes));
        inner.installs += 1;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<KvRaft, SnapshotData>>, io::Error> {
        Ok(lock(&self.0)
            .snapshot
            .clone()
            .map(|(meta, data)| SnapshotOf::<KvRaft, SnapshotData> {
                meta,
                snapshot: SnapshotData::new(data),
            }))
    }
}
