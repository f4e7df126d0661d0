//! The storage engine behind `kv-node`: keys (UTF-8 strings) mapped to opaque
//! byte values, kept in memory and made durable by a write-ahead log and
//! snapshots. No HTTP in it.
//!
//! # Design
//!
//! * [`map`]: the sharded in-memory map (64 `parking_lot::RwLock`ed hash
//!   tables); a read is a lookup and a reference-count increment.
//! * [`entry`]: a key and its value in one allocation, to keep memory per
//!   key low.
//! * [`journal`]: the write-ahead log (writer thread with group commit,
//!   fsync policies), snapshots and recovery.
//!
//! A write ([`Store::put`], [`Store::delete`]) takes its key's shard lock,
//! changes the map and queues the change to the log writer *under that
//! lock*, so the log holds each key's changes in the order the map saw them.
//! It then awaits the writer thread's answer (after the `write`, and for
//! [`FsyncPolicy::Always`] after an `fdatasync`) and only then returns `Ok`.
//! It is acknowledged to its writer only once it is durable.
//!
//! Readers see only durable data too. Each write gets a ticket (its place in
//! the log), noted in the map beside its key's slot under the same lock; a
//! read that finds its slot's ticket not yet durable waits for the writer
//! thread to pass it (usually one group commit). So no client, writer or
//! reader, can see a value that `kill -9` (or, with `always`, a power cut)
//! would take back. Redis gives the same with `appendfsync always` by
//! sending every reply after its event loop's fsync. A write is queued to
//! the log before it changes the map, so a write the log refuses is never
//! seen; one whose log write then fails, or that is not durable within
//! [`READ_WAIT_LIMIT`] (a stalled disk), makes reads of its slot answer
//! [`StoreError::Unavailable`] rather than show it.
//!
//! Once a log write or sync fails, writes answer [`StoreError::Unavailable`]
//! and reads keep working.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

pub mod entry;
mod error;
pub mod journal;
pub mod map;
mod options;

pub use error::{OpenError, StoreError};
pub use journal::recovery::RecoveryReport;
pub use journal::writer::LogStats;
pub use map::SHARD_COUNT;
pub use options::{FsyncPolicy, StoreOptions};

use journal::snapshot::Snapshotter;
use journal::writer::{self, Journal, Op, WriterConfig};
use map::Map;

/// Longest a read waits for the write it would show to become durable
/// before answering [`StoreError::Unavailable`] (the disk is stalled).
pub const READ_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

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
        let report = journal::recovery::recover(dir, &map, options.repair)?;
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
        let journal = Journal::start(
            segment,
            WriterConfig {
                dir: dir.to_path_buf(),
                seq: report.next_segment,
                policy: options.fsync,
                wal_max_bytes: options.wal_max_bytes,
                on_full,
            },
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

    /// The value stored under `key`, if any, once the write that stored it
    /// (or removed it) is durable; at once in the usual case. `Err` when that
    /// write failed, or is not durable within [`READ_WAIT_LIMIT`] (a stalled
    /// disk): showing it could show what a crash takes back.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let (entry, ticket) = self.map.get_with_ticket(key.as_bytes());
        self.wait_durable(ticket).await?;
        Ok(entry.map(|e| entry::value_bytes(&e)))
    }

    /// Waits until log write `ticket` is durable (see [`Store::get`]).
    async fn wait_durable(&self, ticket: u64) -> Result<(), StoreError> {
        let Some(durable) = &self.durable else {
            return Ok(());
        };
        let health = &durable.journal.health;
        if health.is_durable(ticket) {
            return Ok(());
        }
        match tokio::time::timeout(READ_WAIT_LIMIT, health.wait_durable(ticket)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(health.check().err().unwrap_or_else(|| {
                StoreError::Unavailable("the last write to this key was not logged".into())
            })),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the last write to this key is not durable after {READ_WAIT_LIMIT:?} (slow disk)"
            ))),
        }
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

    /// Applies `entry` to the map and queues it to the log, under the shard
    /// lock; the receiver to await, if durable.
    fn apply_put(&self, entry: entry::Entry) -> Result<Option<writer::Submitted>, StoreError> {
        let (mut table, hash) = self.map.lock(entry::key(&entry));
        match &self.durable {
            None => {
                Map::insert(&mut table, hash, entry);
                Ok(None)
            }
            Some(durable) => {
                // Logged first: a change the log refuses never reaches the map.
                let (wait, ticket) = durable.journal.submit(Op::Put(entry.clone()))?;
                Map::insert(&mut table, hash, entry);
                self.map.mark_written(hash, ticket);
                Ok(Some(wait))
            }
        }
    }

    /// Stores `value` under `key`, replacing any earlier value; `Ok` once the
    /// write is as durable as the fsync policy promises.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        let entry = entry::new(key.as_bytes(), &value).ok_or(StoreError::KeyTooLong(key.len()))?;
        match self.apply_put(entry)? {
            Some(wait) => writer::wait(wait).await,
            None => Ok(()),
        }
    }

    /// Stores many keys at once (an import): every write is queued before the
    /// first is awaited, so they share log writes and fsyncs.
    pub async fn put_all(
        &self,
        items: impl IntoIterator<Item = (String, Bytes)>,
    ) -> Result<usize, StoreError> {
        let mut waits = Vec::new();
        let mut count = 0;
        for (key, value) in items {
            let entry =
                entry::new(key.as_bytes(), &value).ok_or(StoreError::KeyTooLong(key.len()))?;
            waits.extend(self.apply_put(entry)?);
            count += 1;
        }
        for wait in waits {
            writer::wait(wait).await?;
        }
        Ok(count)
    }

    /// Removes `key`; `Ok(false)` if it was not there.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        enum Outcome {
            Deleted(Option<writer::Submitted>),
            /// Not there: as of log write `ticket` (a delete may be in flight).
            Absent(u64),
        }
        let key = key.as_bytes();
        let outcome = {
            let (mut table, hash) = self.map.lock(key);
            match &self.durable {
                None => match Map::remove(&mut table, hash, key) {
                    true => Outcome::Deleted(None),
                    false => Outcome::Absent(0),
                },
                Some(_) if !Map::contains(&table, hash, key) => {
                    Outcome::Absent(self.map.ticket(hash))
                }
                Some(durable) => {
                    // Logged first: a change the log refuses never reaches the map.
                    let (wait, ticket) = durable.journal.submit(Op::Delete(key.into()))?;
                    Map::remove(&mut table, hash, key);
                    self.map.mark_written(hash, ticket);
                    Outcome::Deleted(Some(wait))
                }
            }
        };
        match outcome {
            Outcome::Deleted(Some(wait)) => writer::wait(wait).await.map(|()| true),
            Outcome::Deleted(None) => Ok(true),
            // A 404 is a read: only once the delete it reflects is durable.
            Outcome::Absent(ticket) => self.wait_durable(ticket).await.map(|()| false),
        }
    }

    /// Writes a snapshot now and retires the log it covers; blocking (call
    /// it off the async workers). A no-op in memory.
    pub fn snapshot_now(&self) -> Result<(), StoreError> {
        match &self.durable {
            Some(durable) => durable
                .snapshotter
                .snapshot_now()
                .map_err(StoreError::Unavailable),
            None => Ok(()),
        }
    }

    /// Stops the snapshot and log threads after making every queued write
    /// durable; later writes answer `Unavailable`. Blocking; idempotent.
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
        assert_eq!(store.get("a").await.unwrap(), None);
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(
            store.get("a").await.unwrap(),
            Some(Bytes::from_static(b"1"))
        );
        store.put("a", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(
            store.get("a").await.unwrap(),
            Some(Bytes::from_static(b"2"))
        );
        assert_eq!(store.len(), 1);
        assert!(store.delete("a").await.unwrap());
        assert!(!store.delete("a").await.unwrap());
        assert!(store.is_empty());
    }

    /// A reader must never see a write the log does not hold yet: the
    /// moment a GET finds the new value, the writer thread has written it.
    /// Without the wait, the GET finds it right after the map insert, tens
    /// of microseconds before the writer thread wakes up.
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
            while store.get(&key).await.unwrap().is_none() {
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
