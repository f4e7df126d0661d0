//! The storage engine behind `kv-node`: keys (UTF-8 strings) mapped to opaque
//! byte values, kept in memory and made durable by a write-ahead log and
//! snapshots. No HTTP in it.
//!
//! # Design
//!
//! * `map`: the sharded in-memory map (64 `parking_lot::RwLock`ed hash
//!   tables); a read is a lookup and a reference-count increment.
//! * `entry`: a key and its value in one allocation, to keep memory per
//!   key low.
//! * `apply`: the state machine, applying committed operations to the map
//!   in log order (the one thing replication's Raft state machine will do).
//! * [`journal`]: the write-ahead log (the log thread with group commit and
//!   the fsync policies), snapshots and recovery; also the records of the
//!   Raft groups a node hosts ([`Store::submit_group`], [`journal::group`]),
//!   which share the log and its group commit but never touch the map.
//!
//! # Log, commit, apply, publish
//!
//! A write ([`Store::put`], [`Store::delete`]) submits an operation to the
//! log thread and awaits it. The thread writes a batch of operations with
//! one `write`, commits it ([`FsyncPolicy::Always`]: an `fdatasync`;
//! `everysec` and `never`: the `write` itself, which survives `kill -9`),
//! and only then applies the batch to the map in log order and wakes its
//! writers with their outcome. A DELETE learns whether it found its key at
//! that point, in log order.
//!
//! So the map holds committed writes only. A read ([`Store::get`]) is a
//! plain lookup that never waits, and never shows a write that a crash
//! (with `always`, a power cut) could take back; Redis gives the same by
//! replying after its event loop's write. The cost: a write becomes visible
//! only after its group commit, not at once, which is also when its writer
//! hears back.
//!
//! A write the disk refuses is never applied: its writers get an error, no
//! reader and no snapshot ever sees it, and reads keep working. A full disk
//! ([`StoreError::DiskFull`]) refuses writes only until space is freed: the
//! log thread retries and the store takes writes again by itself. Any other
//! disk error ([`StoreError::DiskFailed`]) refuses every write from then on.

// Input from disk (log records, snapshots) must never panic the node: an
// index out of range is a panic, so indexing is `get` and checked slicing.
#![deny(clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

mod apply;
mod entry;
mod error;
pub mod journal;
mod map;
mod options;

pub use error::{is_no_room, OpenError, StoreError};
pub use journal::group::{GroupDone, GroupRecord, RecoveredGroup};
pub use journal::recovery::RecoveryReport;
#[cfg(feature = "test-hooks")]
pub use journal::writer::hooks;
pub use journal::writer::LogStats;
pub use options::{FsyncPolicy, StoreOptions};

use apply::Op;
use journal::snapshot::Snapshotter;
use journal::writer::{self, Journal, WriterConfig};

/// The largest value the log can frame in one record with any key up to
/// the longest one ([`MAX_KEY_BYTES`]); a value under a shorter key may be
/// a little larger ([`StoreError::TooLarge`] says exactly).
pub const MAX_VALUE_BYTES: usize = journal::record::MAX_PAYLOAD - 1 - 2 - MAX_KEY_BYTES;

pub use entry::{Entry, MAX_KEY_BYTES};
pub use map::Map;

/// A thread-safe map of keys to values, shared by every connection.
pub struct Store {
    map: Arc<Map>,
    durable: Option<Durable>,
}

/// What a store backed by a data directory has besides its map.
struct Durable {
    journal: Arc<Journal>,
    snapshotter: Snapshotter,
    dir: PathBuf,
    report: RecoveryReport,
    /// The Raft groups' logs as recovered, until taken.
    groups: parking_lot::Mutex<BTreeMap<u32, RecoveredGroup>>,
    /// Holds the directory's `flock` for as long as the store lives.
    _lock: File,
}

impl Default for Store {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl Store {
    /// A store that lives only in memory.
    pub fn in_memory() -> Self {
        Self {
            map: Arc::new(Map::new()),
            durable: None,
        }
    }

    /// Opens (creating if needed) the data directory `dir`: takes its lock,
    /// recovers its snapshot and log, and starts the log writer and snapshot
    /// threads. Blocking: call it off the async workers.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, OpenError> {
        fs::create_dir_all(dir).map_err(|e| OpenError::io("create data dir", dir, e))?;
        let lock_path = dir.join(journal::LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| OpenError::io("open lock file", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(OpenError::Locked {
                    dir: dir.to_path_buf(),
                })
            }
            Err(TryLockError::Error(e)) => return Err(OpenError::io("lock", &lock_path, e)),
        }

        let map = Arc::new(Map::new());
        let mut found = journal::recovery::GroupsFound::default();
        let report = journal::recovery::recover(dir, &map, options.repair, &mut found)?;
        let checkpoints = found
            .groups
            .iter()
            .map(|(id, group)| (*id, group.checkpoint()))
            .collect();
        let segment =
            writer::create_segment(dir, report.next_segment, report.follows).map_err(|e| {
                OpenError::io(
                    "create log segment",
                    dir.join(journal::segment_name(report.next_segment)),
                    e,
                )
            })?;
        let (signal, inbox) = Snapshotter::channel();
        let signal = Arc::new(signal);
        let on_full = {
            let signal = Arc::clone(&signal);
            Box::new(move || signal.wal_full())
        };
        let applier: Arc<dyn apply::Apply> = Arc::clone(&map) as _;
        let journal = Journal::start(
            segment,
            WriterConfig {
                dir: dir.to_path_buf(),
                seq: report.next_segment,
                policy: options.fsync,
                wal_max_bytes: options.wal_max_bytes,
                on_full,
                checkpoints,
                groups_marked: found.marked,
            },
            applier,
            found.book,
        )
        .map_err(|e| OpenError::io("start the log writer for", dir, e))?;
        let journal = Arc::new(journal);
        let snapshotter = Snapshotter::start(
            &signal,
            inbox,
            Arc::clone(&map),
            Arc::clone(&journal),
            dir.to_path_buf(),
            options.snapshot_interval,
        )
        .map_err(|e| OpenError::io("start the snapshot thread for", dir, e))?;
        Ok(Store {
            map,
            durable: Some(Durable {
                journal,
                snapshotter,
                dir: dir.to_path_buf(),
                report,
                groups: parking_lot::Mutex::new(found.groups),
                _lock: lock,
            }),
        })
    }

    /// What recovery did when the store was opened (`None` in memory).
    pub fn recovery(&self) -> Option<&RecoveryReport> {
        self.durable.as_ref().map(|d| &d.report)
    }

    /// The data directory (`None` in memory).
    pub fn dir(&self) -> Option<&Path> {
        self.durable.as_ref().map(|d| d.dir.as_path())
    }

    /// The value stored under `key`, if any: a plain lookup that never
    /// waits, since the map holds committed writes only.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.map.get(key.as_bytes())
    }

    /// Logs a Raft group's record through the store's one log, sharing its
    /// group commit with every other group and with plain writes: `done` is
    /// called (on the log thread: keep it short, e.g. a channel send) once
    /// the batch holding the record is committed, for `always` after the
    /// batch's one `fdatasync`; or with the reason it never will be.
    ///
    /// Group records are never applied to the map. Records of one group are
    /// logged in the order submitted (and of one caller thread, across
    /// groups and plain writes); within a batch, the plain writes are applied
    /// and answered before the group records' `done`s run, all after the
    /// same commit. In memory there is nothing to log: `done(Ok)` at once.
    pub fn submit_group(&self, group: u32, record: GroupRecord, done: GroupDone) {
        match &self.durable {
            Some(durable) => durable.journal.submit_group(group, record, done),
            None => done(record.check_size()),
        }
    }

    /// Leaves a Raft group's committed log id for the log thread to write
    /// with its next batch, without waking it; a newer one for the group
    /// replaces it until then (`journal::writer`, "Committed indexes ride
    /// along"). Never written ahead of the entries the group submitted
    /// before this call, but a crash may lose it (recovery then gives back
    /// an older committed), since nobody waits for it: an idle store writes
    /// it within about a second, and [`Store::close`] writes it. In memory
    /// there is nothing to log.
    pub fn submit_committed(&self, group: u32, committed: Bytes) -> Result<(), StoreError> {
        match &self.durable {
            Some(durable) => durable.journal.submit_committed(group, committed),
            None => GroupRecord::Committed(committed).check_size(),
        }
    }

    /// The Raft groups' logs as recovery found them (per group: the last
    /// vote, committed and purge, and the entries after the purge; or,
    /// for a group whose last record is a drop, nothing but `dropped`),
    /// handed over once: later calls, and a store in memory, get an empty
    /// map.
    pub fn take_recovered_groups(&self) -> BTreeMap<u32, RecoveredGroup> {
        self.durable
            .as_ref()
            .map(|d| std::mem::take(&mut *d.groups.lock()))
            .unwrap_or_default()
    }

    /// A copy of every entry the map holds (reference-count increments, no
    /// value copied), one lock stripe at a time: what kv-node's cluster mode
    /// digests for its solo shards, whose keys live in this map. Not one
    /// consistent cut while writers run.
    pub fn entries(&self) -> Vec<Entry> {
        self.map.copy_all()
    }

    /// How well the log writer batched so far (`None` in memory).
    pub fn log_stats(&self) -> Option<LogStats> {
        self.durable.as_ref().map(|d| d.journal.health.stats())
    }

    /// Calls `observer(keys, bytes)` after each snapshot is written (from
    /// the snapshot thread; keep it short). A no-op in memory.
    pub fn on_snapshot(&self, observer: impl Fn(usize, u64) + Send + 'static) {
        if let Some(durable) = &self.durable {
            durable
                .journal
                .health
                .set_snapshot_observer(Box::new(observer));
        }
    }

    /// `Err` when writes are refused (disk failed, or closing).
    pub fn writable(&self) -> Result<(), StoreError> {
        match &self.durable {
            Some(durable) => durable.journal.health.check(),
            None => Ok(()),
        }
    }

    /// Hands `op` to the log thread (or, in memory, applies it at once);
    /// what to await for its outcome.
    fn submit(&self, op: Op) -> Result<Submitted, StoreError> {
        match &self.durable {
            None => Ok(Submitted::Applied(self.map.apply_one(op))),
            Some(durable) => durable.journal.submit(op).map(Submitted::Queued),
        }
    }

    /// Stores `value` under `key`, replacing any earlier value; `Ok` once the
    /// write is committed (as durable as the fsync policy promises) and
    /// visible to readers.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        let entry = new_entry(key, &value)?;
        self.submit(Op::Put(entry))?.outcome().await.map(drop)
    }

    /// Stores many keys at once (an import): every write is queued before the
    /// first is awaited, so they share log writes and fsyncs.
    pub async fn put_all(
        &self,
        items: impl IntoIterator<Item = (String, Bytes)>,
    ) -> Result<usize, StoreError> {
        let mut waits = Vec::new();
        for (key, value) in items {
            let entry = new_entry(&key, &value)?;
            waits.push(self.submit(Op::Put(entry))?);
        }
        let count = waits.len();
        for wait in waits {
            wait.outcome().await?;
        }
        Ok(count)
    }

    /// Removes `key`; `Ok(false)` if it was not there, decided in log order.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        // Absent from the map means absent as of the last committed write:
        // answering so is a read, and needs no log record (Redis logs a DEL
        // only when it removed something).
        if self.map.get_entry(key.as_bytes()).is_none() {
            return Ok(false);
        }
        // A concurrent DELETE may still win: the log order decides.
        self.submit(Op::Delete(key.as_bytes().into()))?
            .outcome()
            .await
    }

    /// Writes a snapshot now and retires the log it covers; blocking (call
    /// it off the async workers). A no-op in memory.
    pub fn snapshot_now(&self) -> Result<(), StoreError> {
        match &self.durable {
            Some(durable) => durable
                .snapshotter
                .snapshot_now()
                .map_err(StoreError::Snapshot),
            None => Ok(()),
        }
    }

    /// Stops the snapshot and log threads after committing and applying
    /// every queued write; later writes get [`StoreError::Closed`].
    /// Blocking; idempotent.
    pub fn close(&self) {
        if let Some(durable) = &self.durable {
            durable.snapshotter.close();
            durable.journal.close();
        }
    }

    /// How many keys the store holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Builds the entry for a PUT, refusing what the log could not frame.
fn new_entry(key: &str, value: &[u8]) -> Result<entry::Entry, StoreError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::KeyTooLong(key.len()));
    }
    // The record's payload: kind byte, key length, key, value.
    let max = journal::record::MAX_PAYLOAD - 1 - 2 - key.len();
    if value.len() > max {
        return Err(StoreError::TooLarge {
            len: value.len(),
            max,
        });
    }
    entry::new(key.as_bytes(), value).ok_or(StoreError::KeyTooLong(key.len()))
}

/// What a writer awaits.
enum Submitted {
    /// In memory: applied already; whether its key was there.
    Applied(bool),
    /// Queued to the log thread.
    Queued(writer::Submitted),
}

impl Submitted {
    async fn outcome(self) -> Result<bool, StoreError> {
        match self {
            Submitted::Applied(found) => Ok(found),
            Submitted::Queued(wait) => writer::wait(wait).await,
        }
    }
}

#[cfg(feature = "test-hooks")]
impl Store {
    /// Test hook: `hook` is called on the log thread at each
    /// [`hooks::Event`]; it may block the thread or fail a write.
    pub fn set_log_hook(&self, hook: hooks::Hook) {
        if let Some(durable) = &self.durable {
            durable.journal.set_hook(hook);
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_round_trip() {
        let store = Store::in_memory();
        assert_eq!(store.get("a"), None);
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(store.get("a"), Some(Bytes::from_static(b"1")));
        store.put("a", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(store.get("a"), Some(Bytes::from_static(b"2")));
        assert_eq!(store.len(), 1);
        assert!(store.delete("a").await.unwrap());
        assert!(!store.delete("a").await.unwrap());
        assert!(store.is_empty());
    }

    /// A reader must never see a write the log does not hold yet: the
    /// moment a GET finds the new value, the log thread has written it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_see_only_written_values() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            fsync: FsyncPolicy::Never,
            snapshot_interval: std::time::Duration::from_secs(3600),
            wal_max_bytes: u64::MAX,
            repair: false,
        };
        let store = Arc::new(Store::open(dir.path(), options).unwrap());
        for i in 0..200u64 {
            let key = format!("seen{i}");
            let writer = {
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move { store.put(&key, Bytes::from_static(b"v")).await })
            };
            // Deletes go in the log too (awaited: they count below).
            if i > 0 {
                assert!(store.delete(&format!("seen{}", i - 1)).await.unwrap());
            }
            while store.get(&key).is_none() {
                tokio::task::yield_now().await;
            }
            let written = store.log_stats().unwrap().records;
            // Puts 0..=i and deletes 0..i.
            assert!(
                written > 2 * i,
                "read #{i} saw a value before the log had it ({written} records)"
            );
            writer.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn keys_spread_over_shards() {
        let store = Store::in_memory();
        for i in 0..10_000 {
            store
                .put(&format!("key_{i}"), Bytes::from_static(b"v"))
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 10_000);
        let busiest = store.map.busiest_shard();
        // A uniform spread puts ~156 keys in each shard.
        assert!(busiest < 300, "busiest shard holds {busiest} keys");
    }
}
