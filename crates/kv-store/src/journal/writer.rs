//! The writer thread: appends records to the active log segment, fsyncs them
//! according to the [`FsyncPolicy`], and completes each writer's future.
//!
//! # Group commit
//!
//! Writers (tokio tasks) apply their change to the map and queue an [`Op`]
//! over a channel under the key's shard lock, then await a oneshot. The
//! thread takes every queued op (up to [`MAX_BATCH`] or [`MAX_BATCH_BYTES`]),
//! frames them into one buffer, issues one `write`, then (for `always`) one
//! `fdatasync`, and only then completes the batch's oneshots. While it waits
//! on the disk, new writes queue up and form the next batch, so 64 concurrent
//! writers share each `fdatasync` instead of paying one each.
//!
//! File I/O never runs on the async workers: this is a plain `std` thread.
//! For `everysec` a second thread fdatasyncs the active segment once a second
//! when anything was written, so appends never wait for that sync (as
//! Redis's background fsync); `never` leaves flushing to the kernel. Under
//! every policy a write is acknowledged only after its `write` to the file,
//! so killing the process loses nothing acknowledged.
//!
//! # Preallocation
//!
//! A segment is filled with zeros a chunk (up to [`PREALLOC_CHUNK`]) ahead of the
//! records, and records overwrite those zeros in place. An `fdatasync` after
//! appending to a file must also commit the new file size through the
//! filesystem journal, which is shared with every other process's metadata
//! changes; one after overwriting already-allocated blocks only flushes the
//! data. That is what makes `always` cheap (PostgreSQL pre-zeroes its WAL
//! segments for the same reason). A sealed segment is truncated to its
//! records; recovery treats an all-zero tail as the unused preallocation.
//!
//! # Failures
//!
//! Once a `write` or `fdatasync` fails, the thread stops writing for good:
//! after a failed fsync Linux may have dropped the dirty pages, so a retry
//! that "succeeds" proves nothing. Every queued and later write is answered
//! [`StoreError::Unavailable`]; reads keep working from memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::record::{self, Kind};
use super::segment::{self, zero_fill};
use super::segment_name;
use crate::entry::Entry;
use crate::{FsyncPolicy, StoreError};

/// Most ops framed into one write.
pub const MAX_BATCH: usize = 4096;
/// Most bytes framed into one write (a batch may exceed it by one record).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// How often `everysec`'s syncer thread syncs.
const EVERYSEC: Duration = Duration::from_secs(1);

/// A change to log.
pub enum Op {
    /// The entry's key now holds the entry's value.
    Put(Entry),
    /// The key is gone.
    Delete(Box<[u8]>),
}

type Done = oneshot::Sender<Result<(), StoreError>>;

/// What a writer awaits for its submitted op.
pub type Submitted = oneshot::Receiver<Result<(), StoreError>>;

enum Msg {
    /// `ticket`: this write's place in the log, 1, 2, 3... in channel order.
    Write {
        op: Op,
        done: Done,
        ticket: u64,
    },
    /// Switch to `next` (segment `seq`, created by the caller); the reply
    /// is the segment left behind, for the caller to seal.
    Rotate {
        next: File,
        seq: u64,
        reply: mpsc::Sender<Result<Retired, String>>,
    },
    Close,
}

/// Whether the store may acknowledge writes, shared by everything that
/// writes to disk.
#[derive(Default)]
pub struct Health {
    failed: AtomicBool,
    reason: Mutex<String>,
    /// Records appended since open (the snapshot thread skips a timed
    /// snapshot when nothing changed).
    appended: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    /// Time spent in log fdatasyncs, for the mean sync latency.
    sync_nanos: AtomicU64,
    /// Bytes in the active log segment.
    active_log_bytes: AtomicU64,
    /// The newest snapshot: size, when (Unix seconds), and how many so far.
    snapshot_bytes: AtomicU64,
    snapshot_unix_secs: AtomicU64,
    snapshots: AtomicU64,
    /// Told of each snapshot written (keys, bytes), e.g. for the op log.
    on_snapshot: Mutex<Option<SnapshotObserver>>,
    /// The newest write ticket as durable as the policy promises (written;
    /// for `always`, synced too). Every lower ticket is as well.
    durable: AtomicU64,
    /// Wakes readers waiting for `durable` to pass their ticket.
    durable_changed: tokio::sync::Notify,
}

/// A callback told of each snapshot written: its key count and size.
pub type SnapshotObserver = Box<dyn Fn(usize, u64) + Send>;

impl Health {
    /// `Err` once the disk failed or the store closed.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            Err(StoreError::Unavailable(self.reason.lock().clone()))
        } else {
            Ok(())
        }
    }

    /// Stops acknowledging writes, for `reason`; the first reason sticks.
    pub fn fail(&self, reason: String, is_error: bool) {
        let mut current = self.reason.lock();
        if !self.failed.load(Ordering::Acquire) {
            if is_error {
                log::error!("{reason}; refusing writes from now on (reads keep working)");
            }
            *current = reason;
            self.failed.store(true, Ordering::Release);
        }
        drop(current);
        // Readers waiting for a write that will never be durable stop
        // waiting (and see what memory holds).
        self.durable_changed.notify_waiters();
    }

    /// Waits until write `ticket` is as durable as the policy promises
    /// (`true`), or the log has failed or closed first (`false`: it never
    /// will be).
    pub async fn wait_durable(&self, ticket: u64) -> bool {
        loop {
            let changed = self.durable_changed.notified();
            tokio::pin!(changed);
            // Registered before checking, so a change in between still wakes us.
            changed.as_mut().enable();
            if self.is_durable(ticket) {
                return true;
            }
            if self.failed.load(Ordering::Acquire) {
                // A last commit may have landed just before the failure.
                return self.is_durable(ticket);
            }
            changed.await;
        }
    }

    /// Whether write `ticket` is durable already (the fast path of a read).
    #[inline]
    pub fn is_durable(&self, ticket: u64) -> bool {
        self.durable.load(Ordering::Acquire) >= ticket
    }

    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// The writer's counters so far.
    pub fn stats(&self) -> LogStats {
        LogStats {
            records: self.appended(),
            writes: self.writes.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            sync_nanos: self.sync_nanos.load(Ordering::Relaxed),
            active_log_bytes: self.active_log_bytes.load(Ordering::Relaxed),
            snapshot_bytes: self.snapshot_bytes.load(Ordering::Relaxed),
            snapshot_unix_secs: self.snapshot_unix_secs.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
        }
    }

    /// An fdatasync of the log, counted and timed.
    pub fn sync(&self, file: &File) -> io::Result<()> {
        let started = Instant::now();
        file.sync_data()?;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.sync_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records a snapshot just written and tells the observer.
    pub fn snapshot_written(&self, keys: usize, bytes: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.snapshot_bytes.store(bytes, Ordering::Relaxed);
        self.snapshot_unix_secs.store(now, Ordering::Relaxed);
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = self.on_snapshot.lock().as_ref() {
            observer(keys, bytes);
        }
    }

    /// Sets the callback told of each snapshot written.
    pub fn set_snapshot_observer(&self, observer: SnapshotObserver) {
        *self.on_snapshot.lock() = Some(observer);
    }
}

/// The handle writers and the snapshot thread use to reach the writer thread.
pub struct Journal {
    tx: Sender<Msg>,
    /// The last write ticket handed out; held while sending, so tickets
    /// enter the channel in order.
    last_ticket: Mutex<u64>,
    pub health: Arc<Health>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// `everysec`'s syncer: its stop signal and thread.
    syncer: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// The data directory and the number of the active segment (changed
    /// only by [`Journal::rotate`]).
    dir: PathBuf,
    active_seq: Mutex<u64>,
}

/// A segment the writer has rotated away from: no longer written to, not
/// yet synced or trimmed to its records.
pub struct Retired {
    file: Arc<File>,
    len: u64,
    path: PathBuf,
}

impl Retired {
    /// Syncs the segment and cuts its unused preallocation.
    fn seal(&self) -> io::Result<()> {
        self.file.sync_data()?;
        self.file.set_len(self.len)?;
        self.file.sync_all()
    }
}

/// The segment being appended to, shared with the `everysec` syncer.
type Active = Arc<Mutex<(Arc<File>, PathBuf)>>;

/// What the writer thread needs besides its channel.
pub struct WriterConfig {
    pub dir: PathBuf,
    pub seq: u64,
    pub policy: FsyncPolicy,
    pub wal_max_bytes: u64,
    /// Told when the active segment passes `wal_max_bytes`.
    pub on_full: Box<dyn Fn() + Send>,
}

/// Segments grow in zero-filled chunks ahead of the records: the first is
/// this size, each next one as large as the segment so far, up to
/// [`PREALLOC_CHUNK`] (small segments stay small, busy ones extend rarely).
pub const FIRST_CHUNK: u64 = 64 << 10;
/// The largest zero-filled extension.
pub const PREALLOC_CHUNK: u64 = 4 << 20;

/// Creates log segment `seq` (its header says it follows segment `follows`)
/// with its first zero-filled chunk and makes its directory entry durable.
pub fn create_segment(dir: &Path, seq: u64, follows: u64) -> io::Result<File> {
    segment::create(dir, seq, follows, FIRST_CHUNK)
}

impl Journal {
    /// Starts the writer thread appending to the freshly created `file`.
    pub fn start(file: File, config: WriterConfig) -> io::Result<Journal> {
        let (tx, rx) = mpsc::channel();
        let health = Arc::new(Health::default());
        let file = Arc::new(file);
        let dirty = Arc::new(AtomicBool::new(false));
        let (active, syncer) = if config.policy == FsyncPolicy::EverySec {
            let path = config.dir.join(segment_name(config.seq));
            let active: Active = Arc::new(Mutex::new((Arc::clone(&file), path)));
            let syncer =
                spawn_syncer(Arc::clone(&active), Arc::clone(&dirty), Arc::clone(&health))?;
            (Some(active), Some(syncer))
        } else {
            (None, None)
        };
        let dir = config.dir.clone();
        let active_seq = Mutex::new(config.seq);
        let writer = Writer {
            file,
            segment_bytes: segment::HEADER_LEN,
            allocated: FIRST_CHUNK,
            active,
            dirty,
            asked_snapshot: false,
            buf: Vec::with_capacity(64 << 10),
            pending: Vec::new(),
            batch_ticket: 0,
            health: health.clone(),
            config,
        };
        let thread = std::thread::Builder::new()
            .name("kv-wal-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Journal {
            tx,
            last_ticket: Mutex::new(0),
            health,
            thread: Mutex::new(Some(thread)),
            syncer: Mutex::new(syncer),
            dir,
            active_seq,
        })
    }

    /// Queues `op`; the receiver completes once the policy says it is
    /// durable, and the ticket tells readers what to wait for
    /// ([`Health::wait_durable`]). Call under the key's shard lock so log
    /// order is map order.
    pub fn submit(&self, op: Op) -> Result<(Submitted, u64), StoreError> {
        self.health.check()?;
        let (done, wait) = oneshot::channel();
        let mut last = self.last_ticket.lock();
        let ticket = *last + 1;
        self.tx
            .send(Msg::Write { op, done, ticket })
            .map_err(|_| closed())?;
        *last = ticket;
        Ok((wait, ticket))
    }

    /// Starts the next segment and seals the one before (fsynced, trimmed);
    /// the new segment's number. The files are created and synced here, on
    /// the caller's thread: the writer thread only switches files, so
    /// writes never wait for a rotation's fsyncs.
    pub fn rotate(&self) -> Result<u64, String> {
        let mut active = self.active_seq.lock();
        self.health.check().map_err(|e| e.to_string())?;
        let seq = *active + 1;
        let path = self.dir.join(segment_name(seq));
        let next = create_segment(&self.dir, seq, *active).map_err(|error| {
            let _ = std::fs::remove_file(&path);
            let reason = format!(
                "disk error starting log segment {}: {error}",
                path.display()
            );
            self.health.fail(reason.clone(), true);
            reason
        })?;
        let (reply, wait) = mpsc::channel();
        let switched = self
            .tx
            .send(Msg::Rotate { next, seq, reply })
            .map_err(|_| "the log writer has stopped".to_owned())
            .and_then(|()| {
                wait.recv()
                    .map_err(|_| "the log writer has stopped".to_owned())?
            });
        let retired = match switched {
            Ok(retired) => retired,
            Err(why) => {
                // Never switched to: remove it, so the next try can create it.
                let _ = std::fs::remove_file(&path);
                return Err(why);
            }
        };
        *active = seq;
        retired.seal().map_err(|error| {
            let reason = format!("disk error sealing {}: {error}", retired.path.display());
            self.health.fail(reason.clone(), true);
            reason
        })?;
        Ok(seq)
    }

    /// Flushes and syncs what is queued, then stops the thread. Later writes
    /// answer `Unavailable`.
    pub fn close(&self) {
        if let Some((stop, thread)) = self.syncer.lock().take() {
            let _ = stop.send(());
            if thread.join().is_err() {
                log::error!("the log syncer thread panicked");
            }
        }
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        let _ = self.tx.send(Msg::Close);
        if thread.join().is_err() {
            log::error!("the log writer thread panicked");
        }
        self.health.fail("the store is shutting down".into(), false);
    }
}

/// `everysec`: a thread that fdatasyncs the active segment once a second if
/// anything was written, so appends never wait for a sync (as Redis's
/// background fsync).
fn spawn_syncer(
    active: Active,
    dirty: Arc<AtomicBool>,
    health: Arc<Health>,
) -> io::Result<(Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("kv-wal-syncer".into())
        .spawn(move || loop {
            match stopped.recv_timeout(EVERYSEC) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            // Swapped before syncing: a write after this point sets it again.
            if !dirty.swap(false, Ordering::AcqRel) || health.check().is_err() {
                continue;
            }
            let (file, path) = active.lock().clone();
            match health.sync(&file) {
                Ok(()) => {}
                Err(error) => health.fail(
                    format!("disk error syncing {}: {error}", path.display()),
                    true,
                ),
            }
        })?;
    Ok((stop, thread))
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is shutting down".into())
}

/// Awaits a submitted op.
pub async fn wait(rx: oneshot::Receiver<Result<(), StoreError>>) -> Result<(), StoreError> {
    rx.await.unwrap_or_else(|_| Err(closed()))
}

struct Writer {
    file: Arc<File>,
    /// Where the next record goes: the bytes of records in the segment.
    segment_bytes: u64,
    /// The end of the zero-filled part of the segment.
    allocated: u64,
    /// `everysec`: the segment the syncer syncs, and whether it has unsynced
    /// writes.
    active: Option<Active>,
    dirty: Arc<AtomicBool>,
    asked_snapshot: bool,
    buf: Vec<u8>,
    pending: Vec<Done>,
    /// The highest ticket in `pending`.
    batch_ticket: u64,
    health: Arc<Health>,
    config: WriterConfig,
}

/// How well group commit batched: records written, in how many writes, with
/// how many fdatasyncs (since open).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub records: u64,
    pub writes: u64,
    pub syncs: u64,
    /// Total time spent in those fdatasyncs.
    pub sync_nanos: u64,
    /// Bytes in the active log segment.
    pub active_log_bytes: u64,
    /// Size of the newest snapshot written since open (0 if none).
    pub snapshot_bytes: u64,
    /// When it was written, in Unix seconds (0 if none).
    pub snapshot_unix_secs: u64,
    /// Snapshots written since open.
    pub snapshots: u64,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Some(first) = self.next(&rx) {
            let mut control = None;
            self.take(first, &mut control);
            while control.is_none()
                && self.pending.len() < MAX_BATCH
                && self.buf.len() < MAX_BATCH_BYTES
            {
                match rx.try_recv() {
                    Ok(msg) => self.take(msg, &mut control),
                    Err(_) => break,
                }
            }
            self.commit();
            match control {
                Some(Msg::Rotate { next, seq, reply }) => {
                    let _ = reply.send(self.rotate(next, seq));
                }
                Some(Msg::Close) => break,
                _ => {}
            }
            if self.segment_bytes >= self.config.wal_max_bytes && !self.asked_snapshot {
                self.asked_snapshot = true;
                (self.config.on_full)();
            }
        }
        // Closing (or every handle dropped): make everything written durable.
        if self.health.check().is_ok() {
            if let Err(error) = self.seal() {
                self.health.fail(
                    format!(
                        "disk error sealing {}: {error}",
                        self.segment_path().display()
                    ),
                    true,
                );
            }
        }
        let stats = self.health.stats();
        log::info!(
            "log writer stopped: {} records in {} writes, {} fdatasyncs (fsync {})",
            stats.records,
            stats.writes,
            stats.syncs,
            self.config.policy
        );
    }

    /// The next message; `None` once every handle is gone.
    fn next(&mut self, rx: &Receiver<Msg>) -> Option<Msg> {
        rx.recv().ok()
    }

    fn take(&mut self, msg: Msg, control: &mut Option<Msg>) {
        match msg {
            Msg::Write { op, done, ticket } => {
                match &op {
                    Op::Put(entry) => record::encode(&mut self.buf, Kind::Put, entry),
                    Op::Delete(key) => record::encode(&mut self.buf, Kind::Delete, key),
                }
                self.pending.push(done);
                self.batch_ticket = ticket;
            }
            other => *control = Some(other),
        }
    }

    /// Writes the batch, syncs it if the policy says so, answers its writers.
    fn commit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let result = if let Err(why) = self.health.check() {
            Err(why)
        } else {
            let end = self.segment_bytes + self.buf.len() as u64;
            let written = self
                .allocate(end)
                .and_then(|()| self.file.write_all_at(&self.buf, self.segment_bytes))
                .and_then(|()| {
                    if self.config.policy == FsyncPolicy::Always {
                        self.health.sync(&self.file)
                    } else {
                        Ok(())
                    }
                });
            match written {
                Ok(()) => {
                    self.health.writes.fetch_add(1, Ordering::Relaxed);
                    self.segment_bytes += self.buf.len() as u64;
                    self.health
                        .active_log_bytes
                        .store(self.segment_bytes, Ordering::Relaxed);
                    self.dirty.store(true, Ordering::Release);
                    self.health
                        .appended
                        .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
                    self.health
                        .durable
                        .store(self.batch_ticket, Ordering::Release);
                    self.health.durable_changed.notify_waiters();
                    Ok(())
                }
                Err(error) => {
                    let reason = format!(
                        "disk error appending to {}: {error}",
                        self.segment_path().display()
                    );
                    self.health.fail(reason.clone(), true);
                    Err(StoreError::Unavailable(reason))
                }
            }
        };
        for done in self.pending.drain(..) {
            let _ = done.send(result.clone());
        }
        self.buf.clear();
    }

    /// Zero-fills chunks until the segment is allocated up to `end`, and
    /// makes the new size durable once, so batch syncs need not.
    fn allocate(&mut self, end: u64) -> io::Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let step = self.allocated.clamp(FIRST_CHUNK, PREALLOC_CHUNK);
        let target = end.max(self.allocated + step);
        zero_fill(&self.file, self.allocated, target)?;
        self.file.sync_data()?;
        self.allocated = target;
        Ok(())
    }

    /// Syncs the segment and cuts its unused preallocation.
    fn seal(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.file.set_len(self.segment_bytes)?;
        self.file.sync_all()?;
        Ok(())
    }

    fn segment_path_for(&self, seq: u64) -> PathBuf {
        self.config.dir.join(segment_name(seq))
    }

    fn segment_path(&self) -> PathBuf {
        self.config.dir.join(segment_name(self.config.seq))
    }

    /// Switches to segment `seq` (`next`, created and synced by
    /// [`Journal::rotate`]) and hands back the segment left behind.
    fn rotate(&mut self, next: File, seq: u64) -> Result<Retired, String> {
        self.health.check().map_err(|e| e.to_string())?;
        let retired = Retired {
            file: std::mem::replace(&mut self.file, Arc::new(next)),
            len: self.segment_bytes,
            path: self.segment_path(),
        };
        if let Some(active) = &self.active {
            *active.lock() = (Arc::clone(&self.file), self.segment_path_for(seq));
        }
        self.config.seq = seq;
        self.segment_bytes = segment::HEADER_LEN;
        self.health
            .active_log_bytes
            .store(self.segment_bytes, Ordering::Relaxed);
        self.allocated = FIRST_CHUNK;
        self.asked_snapshot = false;
        Ok(retired)
    }
}
