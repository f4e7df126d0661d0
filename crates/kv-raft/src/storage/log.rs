//! [`GroupLog`]: one Raft group's log, in memory and durable through the
//! node's one write-ahead log (kv-store's [`Store::submit_group`]); design
//! `docs/replication.md` §4.2.
//!
//! The unpurged entries, the vote, the committed log id and the purged log
//! id live in memory (reads never touch the disk); every change is also
//! submitted to the store's log thread as a [`GroupRecord`], where it shares
//! a group commit (one `fdatasync` under `--fsync always`) with every other
//! group's records. Entries, votes and log ids are postcard-encoded
//! openraft types: kv-store sees opaque bytes.
//!
//! What each call waits for, as openraft's contract asks:
//! - `append`: entries are readable on return; the [`IOFlushed`] callback
//!   is completed from the log thread once the record is committed (the
//!   `done` closure only sends on openraft's channel);
//! - `save_vote`: returns once the vote is durable (awaited);
//! - `truncate_after`, `purge`: not awaited. The log is sequential, so a
//!   later record that survives a crash implies these did; losing one alone
//!   equals crashing just before it, a state Raft handles (an older purge
//!   keeps more).
//! - `save_committed`: not even sent. [`Store::submit_committed`] leaves
//!   the newest committed log id in a per-group slot that the log thread
//!   writes with its next batch (or at its one-second tick, or at close),
//!   so commit-index advances never wake it; it is never written ahead of
//!   the entries appended before it, and a crash may lose the last ones (an
//!   older committed, re-learned from the leader; kv-node's readiness waits
//!   for the cluster's commit, not for this one).
//!
//! **A full disk is a slow disk here.** The store holds group records that
//! found no room and writes them once there is room again (kv-store's
//! `journal::writer`, "Full disk"), so an `append` callback or a
//! `save_vote` simply completes later: a follower does not acknowledge
//! entries it has not persisted and grants no vote before it is durable,
//! and the group never sees a storage error (which would stop it for good).
//! Only a real disk failure completes them with an error.
//!
//! **Purges keep one snapshot generation back.** openraft purges up to its
//! newest snapshot (minus `max_in_snapshot_log_to_keep`); this log purges
//! no further than the *previous* snapshot generation the shard keeps
//! ([`PurgeFloor`]), so when a restart finds the newest snapshot file
//! damaged and falls back to the previous one, the entries after it are
//! still here to re-apply. The cost is memory and WAL: up to two
//! snapshots' worth of log per group.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use kv_store::{GroupRecord, RecoveredGroup, Store, StoreError};
use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use parking_lot::Mutex;

use super::StorageError;
use crate::types::{GroupId, KvRaft};

/// Most bytes of entries in one WAL record: an `append` larger than this
/// (many large values) is split into consecutive records, far below
/// kv-store's 256 MiB record limit.
const RECORD_BUDGET: usize = 32 << 20;

/// The lowest index the log may purge up to, shared with the shard's state
/// machine: the last index of the oldest snapshot generation it keeps
/// (`u64::MAX` until a snapshot exists: only openraft's own bound applies
/// then, since without a snapshot openraft purges nothing).
#[derive(Debug, Clone)]
pub(crate) struct PurgeFloor(Arc<AtomicU64>);

impl PurgeFloor {
    pub(crate) fn new() -> Self {
        Self(Arc::new(AtomicU64::new(u64::MAX)))
    }

    pub(crate) fn set(&self, index: u64) {
        self.0.store(index, Ordering::Release);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct Mem {
    /// Entry and its encoded size, by index.
    entries: BTreeMap<u64, (EntryOf<KvRaft>, usize)>,
    bytes: usize,
    vote: Option<VoteOf<KvRaft>>,
    committed: Option<LogIdOf<KvRaft>>,
    purged: Option<LogIdOf<KvRaft>>,
}

impl Mem {
    fn drop_from(&mut self, index: u64) {
        // The common append extends the log: nothing to split off.
        if self
            .entries
            .last_key_value()
            .is_none_or(|(last, _)| *last < index)
        {
            return;
        }
        for (_, (_, size)) in self.entries.split_off(&index) {
            self.bytes -= size;
        }
    }

    fn drop_upto(&mut self, index: u64) {
        let keep = match index.checked_add(1) {
            Some(from) => self.entries.split_off(&from),
            None => BTreeMap::new(),
        };
        let dropped = std::mem::replace(&mut self.entries, keep);
        for (_, (_, size)) in dropped {
            self.bytes -= size;
        }
    }
}

struct Shared {
    group: GroupId,
    store: Arc<Store>,
    mem: Mutex<Mem>,
    floor: PurgeFloor,
}

/// One group's log storage (openraft's `RaftLogStorage` and
/// `RaftLogReader`); clones share it.
#[derive(Clone)]
pub struct GroupLog(Arc<Shared>);

impl Debug for GroupLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLog")
            .field("group", &self.0.group)
            .finish_non_exhaustive()
    }
}

fn encode<T: serde::Serialize>(value: &T) -> io::Result<Bytes> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(io::Error::other)
}

fn to_io(error: StoreError) -> io::Error {
    io::Error::other(error)
}

impl GroupLog {
    /// The log of `group`, from what recovery found in the WAL (an empty
    /// default if the group never logged anything here).
    pub(crate) fn recover(
        group: GroupId,
        store: Arc<Store>,
        recovered: RecoveredGroup,
        floor: PurgeFloor,
    ) -> Result<GroupLog, StorageError> {
        let undecodable = |what: &'static str, e: postcard::Error| StorageError::Undecodable {
            group,
            what,
            reason: e.to_string(),
        };
        let mut mem = Mem {
            vote: recovered
                .vote
                .map(|v| postcard::from_bytes(&v))
                .transpose()
                .map_err(|e| undecodable("vote", e))?,
            committed: recovered
                .committed
                .map(|c| postcard::from_bytes(&c))
                .transpose()
                .map_err(|e| undecodable("committed log id", e))?,
            purged: recovered
                .purged
                .map(|(_, p)| postcard::from_bytes(&p))
                .transpose()
                .map_err(|e| undecodable("purged log id", e))?,
            ..Mem::default()
        };
        for (index, bytes) in recovered.entries {
            let entry: EntryOf<KvRaft> =
                postcard::from_bytes(&bytes).map_err(|e| undecodable("log entry", e))?;
            if entry.log_id.index != index {
                return Err(StorageError::Undecodable {
                    group,
                    what: "log entry",
                    reason: format!(
                        "entry logged at index {index} says index {}",
                        entry.log_id.index
                    ),
                });
            }
            mem.bytes += bytes.len();
            mem.entries.insert(index, (entry, bytes.len()));
        }
        Ok(GroupLog(Arc::new(Shared {
            group,
            store,
            mem: Mutex::new(mem),
            floor,
        })))
    }

    /// The group this log belongs to.
    pub fn group(&self) -> GroupId {
        self.0.group
    }

    /// Bytes of (encoded) entries held in memory: the node's snapshot
    /// scheduler triggers a snapshot of the group when this passes its
    /// bound, so memory stays bounded and WAL segments can be retired.
    pub fn log_bytes(&self) -> u64 {
        self.0.mem.lock().bytes as u64
    }

    /// Bytes of (encoded) entries after `index` (all of them for `None`):
    /// the log a snapshot at `index` does not cover yet.
    pub fn bytes_after(&self, index: Option<u64>) -> u64 {
        let mem = self.0.mem.lock();
        let from = index.map_or(0, |i| i.saturating_add(1));
        mem.entries
            .range(from..)
            .map(|(_, (_, size))| *size as u64)
            .sum()
    }

    /// How many entries are held in memory.
    pub fn log_entries(&self) -> usize {
        self.0.mem.lock().entries.len()
    }

    /// The last purged log index here (`None`: nothing purged).
    pub fn purged_index(&self) -> Option<u64> {
        self.0.mem.lock().purged.as_ref().map(|p| p.index)
    }

    /// Submits `record` without waiting; a failure is logged, and also
    /// surfaces to openraft through the next awaited write (the store
    /// refuses every write after a disk error; a full disk only delays it).
    fn submit(&self, record: GroupRecord) {
        let group = self.0.group;
        self.0.store.submit_group(
            group,
            record,
            Box::new(move |result| {
                if let Err(error) = result {
                    log::error!("shard {group}: log record not written: {error}");
                }
            }),
        );
    }
}

impl RaftLogReader<KvRaft> for GroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<KvRaft>>, io::Error> {
        Ok(self
            .0
            .mem
            .lock()
            .entries
            .range(range)
            .map(|(_, (entry, _))| entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<KvRaft>>, io::Error> {
        Ok(self.0.mem.lock().vote)
    }
}

/// Completes one `append`'s callback once every record it was split into
/// is committed (with the first error, if any).
struct Pending {
    left: usize,
    error: Option<io::Error>,
    callback: Option<IOFlushed<KvRaft>>,
}

impl RaftLogStorage<KvRaft> for GroupLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<KvRaft>, io::Error> {
        let mem = self.0.mem.lock();
        let last = mem
            .entries
            .values()
            .next_back()
            .map(|(entry, _)| entry.log_id)
            .or(mem.purged);
        Ok(LogState {
            last_purged_log_id: mem.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<KvRaft>) -> Result<(), io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.store.submit_group(
            self.0.group,
            GroupRecord::Vote(encode(vote)?),
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await
            .map_err(|_| io::Error::other("the log thread dropped a vote"))?
            .map_err(to_io)?;
        self.0.mem.lock().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<KvRaft>>,
    ) -> Result<(), io::Error> {
        if let Some(id) = &committed {
            // Rides with the log thread's next batch instead of waking it
            // (a wake-up per commit-index advance was ~6% of a node's CPU):
            // never written before the entries appended before this call,
            // possibly lost in a crash (module docs).
            if let Err(error) = self.0.store.submit_committed(self.0.group, encode(id)?) {
                log::error!(
                    "shard {}: committed log id not logged: {error}",
                    self.0.group
                );
            }
        }
        self.0.mem.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<KvRaft>>, io::Error> {
        Ok(self.0.mem.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<KvRaft>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<KvRaft>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Runs of consecutive indexes, each under the record budget.
        let mut records: Vec<GroupRecord> = Vec::new();
        let mut run_bytes = 0usize;
        {
            let mut mem = self.0.mem.lock();
            for entry in entries {
                let bytes = encode(&entry)?;
                let index = entry.log_id.index;
                let extends = match records.last() {
                    Some(GroupRecord::Entries {
                        first_index,
                        entries,
                    }) => {
                        *first_index + entries.len() as u64 == index
                            && run_bytes + bytes.len() <= RECORD_BUDGET
                    }
                    _ => false,
                };
                if !extends {
                    // An append at `index` replaces anything from there on,
                    // as WAL replay does.
                    mem.drop_from(index);
                    records.push(GroupRecord::Entries {
                        first_index: index,
                        entries: Vec::new(),
                    });
                    run_bytes = 0;
                }
                run_bytes += bytes.len();
                mem.bytes += bytes.len();
                if let Some((_, old)) = mem.entries.insert(index, (entry, bytes.len())) {
                    mem.bytes -= old;
                }
                if let Some(GroupRecord::Entries { entries, .. }) = records.last_mut() {
                    entries.push(bytes);
                }
            }
        }
        if records.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        let group = self.0.group;
        if records.len() == 1 {
            if let Some(record) = records.pop() {
                self.0.store.submit_group(
                    group,
                    record,
                    Box::new(move |result| callback.io_completed(result.map_err(to_io))),
                );
            }
            return Ok(());
        }
        let pending = Arc::new(Mutex::new(Pending {
            left: records.len(),
            error: None,
            callback: Some(callback),
        }));
        for record in records {
            let pending = Arc::clone(&pending);
            self.0.store.submit_group(
                group,
                record,
                Box::new(move |result| {
                    let mut pending = pending.lock();
                    if let Err(error) = result {
                        pending.error.get_or_insert(to_io(error));
                    }
                    pending.left -= 1;
                    if pending.left == 0 {
                        if let Some(callback) = pending.callback.take() {
                            let result = pending.error.take().map_or(Ok(()), Err);
                            callback.io_completed(result);
                        }
                    }
                }),
            );
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<KvRaft>>) -> Result<(), io::Error> {
        let after = last.map(|id| id.index);
        self.0
            .mem
            .lock()
            .drop_from(after.map_or(0, |a| a.saturating_add(1)));
        self.submit(GroupRecord::TruncateAfter(after));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<KvRaft>) -> Result<(), io::Error> {
        // Keep the entries after the previous snapshot generation (module
        // docs): purge up to the floor at most, by the log id held there.
        let upto = {
            let mut mem = self.0.mem.lock();
            let floor = self.0.floor.get();
            let target = if log_id.index <= floor {
                log_id
            } else if mem.entries.contains_key(&log_id.index) {
                // A snapshot built from this log: keep what follows the
                // floor. Purged exactly to the floor already: keep the
                // rest. Purged past it (or never holding it): a fallback
                // could not be replayed from here anyway, so purge.
                match mem.entries.get(&floor) {
                    Some((at_floor, _)) => at_floor.log_id,
                    None if mem.purged.is_some_and(|p| p.index == floor) => return Ok(()),
                    None => log_id,
                }
            } else {
                // After an installed snapshot the entries up to it were
                // never here: purge all the way, leaving no hole.
                log_id
            };
            if mem.purged.is_some_and(|p| p.index >= target.index) {
                return Ok(());
            }
            mem.drop_upto(target.index);
            mem.purged = Some(target);
            target
        };
        self.submit(GroupRecord::Purge {
            upto: upto.index,
            log_id: encode(&upto)?,
        });
        Ok(())
    }
}
