//! The log thread: frames a batch of operations, writes it to the active
//! segment, commits it according to the [`FsyncPolicy`], then has the batch
//! applied to the map in log order and wakes each writer with its outcome.
//!
//! # Log, commit, apply, publish
//!
//! A writer (a tokio task) submits an [`Op`] over a channel and awaits a
//! oneshot; it touches neither the map nor any lock. The thread takes every
//! queued op (up to [`MAX_BATCH`] or [`MAX_BATCH_BYTES`]), frames them into
//! one buffer and issues one `write`; for `always` one `fdatasync` follows.
//! That is the batch's commit point: for `everysec` and `never` the `write`
//! alone, since a write in the page cache survives `kill -9` of the process.
//! Only after the commit does the thread hand the batch to the [`Apply`]
//! (the map), which applies it in log order and returns each op's outcome
//! (whether its key was there: a DELETE's 200 or 404 is decided here, in
//! log order); then the oneshots complete. So the map holds committed writes
//! only, and a reader, who only ever reads the map, never sees a write a
//! crash could take back and never waits. While the thread waits on the
//! disk, new ops queue up and form the next batch, so 64 concurrent writers
//! share each `fdatasync` instead of paying one each.
//!
//! The apply runs on this thread, right after the commit, not on a separate
//! applier thread pipelined with the next batch's I/O. Measured with 64
//! writers and `never` on 2 cores: this thread, apply included, uses ~6% of
//! a core at ~59k PUTs/s, while the HTTP workers use the rest; a pipelined
//! applier thread (tried) used ~9.5% for the two threads, for no more
//! throughput, since it adds a wake-up and a hand-off per batch. Applying
//! here also keeps rotation simple: [`Journal::rotate`] is handled between
//! batches, so every write before the new segment is in the map already.
//! Should the apply ever become the bottleneck, it can be split per shard,
//! each shard's ops still in log order.
//!
//! File I/O never runs on the async workers: this is a plain `std` thread.
//! For `everysec` a second thread fdatasyncs the active segment once a second
//! when anything was written, so appends never wait for that sync (as
//! Redis's background fsync); `never` leaves flushing to the kernel.
//!
//! # Raft groups' records
//!
//! A group record ([`super::group`], submitted with
//! [`Journal::submit_group`]) rides in the same batches as puts and deletes
//! and is framed into the same `write`, so one commit (one `fdatasync` under
//! `always`) covers every group's appends in the batch and the plain writes
//! with them. It is never applied to the map; its completion closure runs
//! after the batch's commit, right after the batch's plain writes were
//! applied and answered. Order: the log holds messages in the order the
//! channel delivered them, so one group's records (submitted one call at a
//! time, in order, by its Raft core) are logged in that order, and a plain
//! write and a group record submitted by one thread keep their order too;
//! between different submitters the batch order is whatever the channel
//! gave, as for plain writes today. A batch that fails on disk completes
//! its group records with the error, like its writers.
//!
//! # Committed indexes ride along
//!
//! A group's committed log id is the one record nobody waits for and that
//! may be lost (openraft re-learns an older committed from the leader; it
//! only must never be *ahead* of the entries durable before it). Sending it
//! on the channel like the rest cost a wake-up of the parked thread per
//! commit-index advance (§15.2 of `docs/replication.md`: 1.5 such records
//! per replicated write, the futex wake ~6% of a node's CPU). So
//! [`Journal::submit_committed`] only overwrites the group's slot in
//! [`LazyCommitted`], and this thread frames the slots' newest values into
//! the next batch it writes for any other reason, into a batch of their
//! own at its periodic tick ([`COMMITTED_TICK`]: an idle node gets its
//! last committed written within about that), and at close.
//!
//! **Never ahead of the entries.** A group's Raft core submits the entries
//! covering a committed index (`append`) before it stores that index in the
//! slot (`save_committed`): the entries message is on the channel before
//! the slot holds the index. The thread takes the slots *before* it polls
//! the channel for the rest of the batch, and frames what it took at the
//! batch's end only if that poll ended on an empty channel (and backlog):
//! since the channel is FIFO, an empty channel after the take means every
//! message sent before the take, so every entries record a taken index
//! covers, is in this batch (framed before) or in an earlier one (written
//! before). A poll cut short (batch limits, a rotation, close) keeps what
//! it took for a later batch that does drain the channel; a newer slot
//! value replaces a kept one. A torn write cuts a suffix of the batch, so
//! it can drop a committed record but never keep one without what it
//! covers. A group's drop (or an eager `Committed` record through
//! [`Journal::submit_group`]) clears its slot and what the thread kept, so
//! an old incarnation's index never lands after its drop.
//!
//! Each rotation starts the new segment with the groups' checkpoint and
//! syncs it (one extra `fdatasync` per rotation, only once a group record
//! was ever logged), so retirement can delete older segments by the groups'
//! purges alone ([`super::group`] explains the rule).
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
//! Once an `fdatasync` fails, or a `write` fails for any reason but a full
//! disk, the thread stops writing for good: after a failed fsync Linux may
//! have dropped the dirty pages, so a retry that "succeeds" proves nothing.
//! The failed batch is dropped, never applied: its writers get
//! [`StoreError::DiskFailed`] and no reader or snapshot ever sees it. Every
//! later write gets the same error; reads keep working from memory.
//!
//! # Full disk
//!
//! A `write` refused for want of room (`ENOSPC`, `EDQUOT`: the zero-filling
//! of a new chunk, or on a copy-on-write filesystem the batch's own write)
//! is different: nothing was synced or acknowledged, no dirty page was
//! dropped, and a retry writes the same bytes at the same offsets. So the
//! thread *waits for room* instead of stopping ([`Writer::wait_for_room`]):
//! - the batch's plain writes are refused at once with
//!   [`StoreError::DiskFull`] (never applied; a standalone client gets its
//!   503 now rather than a hang), and so is every plain write submitted
//!   until room returns ([`Health::check`]);
//! - the batch's Raft group records are kept and retried with a backoff,
//!   and group records submitted meanwhile queue behind them, in order. A
//!   group's `append` callback, or `save_vote`, completes only once its
//!   record is written: openraft sees a slow disk, not a failed one (a
//!   storage error would stop the group for good), a follower does not
//!   acknowledge entries it did not persist, and a vote is not granted
//!   before it is durable;
//! - rotations are refused meanwhile (the snapshot thread retries later);
//! - once a retry succeeds, the store takes writes again without a restart.
//!
//! A failed `fdatasync` stays fatal even when it says `ENOSPC`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::group::{Checkpoint, GroupBook, GroupDone, GroupRecord, GROUPS_FILE};
use super::record::{self, Kind};
use super::segment::{self, zero_fill};
use super::segment_name;
use crate::apply::{Apply, Op};
use crate::error::is_no_room;
use crate::{FsyncPolicy, StoreError};

/// Most ops framed into one write.
pub const MAX_BATCH: usize = 4096;
/// Most bytes framed into one write (a batch may exceed it by one record).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// How often `everysec`'s syncer thread syncs.
const EVERYSEC: Duration = Duration::from_secs(1);

/// How long the log thread sleeps at most when nothing arrives, so that
/// committed indexes left in their slots by an idle node reach the disk
/// (a wake-up a second; one `write`, and with `always` one `fdatasync`,
/// only when a slot holds something).
pub(crate) const COMMITTED_TICK: Duration = Duration::from_secs(1);

/// The newest committed log id of each group not yet taken by the log
/// thread, overwritten per group (see "Committed indexes ride along").
pub(crate) type LazyCommitted = Arc<Mutex<HashMap<u32, Bytes>>>;

/// What a writer is told once its op is applied: whether its key was
/// there (see [`Apply`]), or why it was not logged.
pub(crate) type Outcome = Result<bool, StoreError>;

type Done = oneshot::Sender<Outcome>;

/// What a writer awaits for its submitted op.
pub(crate) type Submitted = oneshot::Receiver<Outcome>;

enum Msg {
    Write(Op, Done),
    /// A Raft group's record: logged, never applied; `done` is called once
    /// its batch is committed.
    Group {
        group: u32,
        record: GroupRecord,
        done: Pending,
    },
    /// Switch to `next` (segment `seq`, created by the caller) once every
    /// batch before it is committed and applied; the reply is the segment
    /// left behind, for the caller to seal.
    Rotate {
        next: File,
        seq: u64,
        reply: mpsc::Sender<Result<Retired, String>>,
    },
    Close,
}

/// A group record's completion, called exactly once: by the log thread
/// after the commit, or with [`StoreError::Closed`] if it is dropped
/// uncalled (the thread stopped with the record still queued).
pub(crate) struct Pending(Option<GroupDone>);

impl Pending {
    fn complete(mut self, result: Result<(), StoreError>) {
        if let Some(done) = self.0.take() {
            done(result);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(StoreError::Closed));
        }
    }
}

/// Whether the store may acknowledge writes, shared by everything that
/// writes to disk.
#[derive(Default)]
pub(crate) struct Health {
    failed: AtomicBool,
    /// Why writes are refused, once `failed`.
    error: Mutex<Option<StoreError>>,
    /// The log thread is waiting for room (see "Full disk" above), and why.
    full: AtomicBool,
    full_error: Mutex<Option<StoreError>>,
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
}

/// A callback told of each snapshot written: its key count and size.
pub(crate) type SnapshotObserver = Box<dyn Fn(usize, u64) + Send>;

impl Health {
    /// `Err` while new plain writes are refused: once the disk failed or
    /// the store closed, and while the disk is full.
    pub fn check(&self) -> Result<(), StoreError> {
        self.broken()?;
        if self.full.load(Ordering::Acquire) {
            if let Some(full) = self.full_error.lock().clone() {
                return Err(full);
            }
        }
        Ok(())
    }

    /// `Err` once the disk failed or the store closed, for good (a full
    /// disk is not: group records still queue, and the log still syncs).
    pub fn broken(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            Err(self.error.lock().clone().unwrap_or(StoreError::Closed))
        } else {
            Ok(())
        }
    }

    /// The log thread waits for room: plain writes are refused with `full`.
    fn set_full(&self, full: StoreError) {
        let mut current = self.full_error.lock();
        if !self.full.load(Ordering::Acquire) {
            log::warn!("{full} (writes refused, Raft records held and retried; reads go on)");
        }
        *current = Some(full);
        self.full.store(true, Ordering::Release);
    }

    /// A retry found room: writes are taken again.
    fn clear_full(&self) {
        let mut current = self.full_error.lock();
        if self.full.swap(false, Ordering::AcqRel) {
            log::info!("the disk has room again: taking writes");
        }
        *current = None;
    }

    /// Stops accepting writes, for `error`; the first error sticks.
    pub fn fail(&self, error: StoreError) {
        let mut current = self.error.lock();
        if current.is_none() {
            if !matches!(error, StoreError::Closed) {
                log::error!("{error}; refusing writes from now on (reads keep working)");
            }
            *current = Some(error);
            self.failed.store(true, Ordering::Release);
        }
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
pub(crate) struct Journal {
    tx: Sender<Msg>,
    pub health: Arc<Health>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// `everysec`'s syncer: its stop signal and thread.
    syncer: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    #[cfg(feature = "test-hooks")]
    hook: hooks::Slot,
    /// The data directory and the number of the active segment (changed
    /// only by [`Journal::rotate`]).
    dir: PathBuf,
    active_seq: Mutex<u64>,
    /// Which segments the Raft groups still need (read by retirement).
    pub book: Arc<Mutex<GroupBook>>,
    /// Committed indexes waiting for the log thread's next batch.
    lazy: LazyCommitted,
}

/// A segment the writer has rotated away from: no longer written to, not
/// yet synced or trimmed to its records.
pub(crate) struct Retired {
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
pub(crate) struct WriterConfig {
    pub dir: PathBuf,
    pub seq: u64,
    pub policy: FsyncPolicy,
    pub wal_max_bytes: u64,
    /// Told when the active segment passes `wal_max_bytes`.
    pub on_full: Box<dyn Fn() + Send>,
    /// The groups' state as recovered: each one's checkpoint, and whether
    /// the directory is marked as holding group records.
    pub checkpoints: BTreeMap<u32, Checkpoint>,
    pub groups_marked: bool,
}

/// Segments grow in zero-filled chunks ahead of the records: the first is
/// this size, each next one as large as the segment so far, up to
/// [`PREALLOC_CHUNK`] (small segments stay small, busy ones extend rarely).
pub const FIRST_CHUNK: u64 = 64 << 10;
/// The largest zero-filled extension.
pub const PREALLOC_CHUNK: u64 = 4 << 20;

/// Creates log segment `seq` (its header says it follows segment `follows`)
/// with its first zero-filled chunk and makes its directory entry durable.
pub(crate) fn create_segment(dir: &Path, seq: u64, follows: u64) -> io::Result<File> {
    segment::create(dir, seq, follows, FIRST_CHUNK)
}

impl Journal {
    /// Starts the log thread appending to the freshly created `file` and
    /// applying each committed batch to `applier`.
    pub fn start(
        file: File,
        mut config: WriterConfig,
        applier: Arc<dyn Apply>,
        book: GroupBook,
    ) -> io::Result<Journal> {
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
        let book = Arc::new(Mutex::new(book));
        let lazy = LazyCommitted::default();
        let writer = Writer {
            lazy: Arc::clone(&lazy),
            held: BTreeMap::new(),
            group_dones: Vec::new(),
            purges: Vec::new(),
            records: Vec::new(),
            backlog: VecDeque::new(),
            closing: false,
            checkpoints: std::mem::take(&mut config.checkpoints),
            marked: config.groups_marked,
            book: Arc::clone(&book),
            file,
            segment_bytes: segment::HEADER_LEN,
            allocated: FIRST_CHUNK,
            active,
            dirty,
            asked_snapshot: false,
            buf: Vec::with_capacity(64 << 10),
            ops: Vec::new(),
            waiters: Vec::new(),
            outcomes: Vec::new(),
            applier,
            health: health.clone(),
            config,
            #[cfg(feature = "test-hooks")]
            hook: hooks::Slot::default(),
        };
        #[cfg(feature = "test-hooks")]
        let hook = writer.hook.clone();
        let thread = std::thread::Builder::new()
            .name("kv-wal-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Journal {
            tx,
            health,
            thread: Mutex::new(Some(thread)),
            syncer: Mutex::new(syncer),
            #[cfg(feature = "test-hooks")]
            hook,
            dir,
            active_seq,
            book,
            lazy,
        })
    }

    /// Queues a Raft group's record; `done` is called once the batch holding
    /// it is committed (see the module docs), or with the reason it never
    /// will be (a record too large to frame, a failed disk, closing).
    pub fn submit_group(&self, group: u32, record: GroupRecord, done: GroupDone) {
        let done = Pending(Some(done));
        // While the disk is full, group records queue (see "Full disk").
        if let Err(error) = record.check_size().and_then(|()| self.health.broken()) {
            done.complete(Err(error));
            return;
        }
        if matches!(record, GroupRecord::Drop | GroupRecord::Committed(_)) {
            // Nothing older of the group may be framed after this record
            // (the thread also forgets what it took, when it takes it).
            self.lazy.lock().remove(&group);
        }
        // A send that fails drops the message, and `Pending` answers Closed.
        let _ = self.tx.send(Msg::Group {
            group,
            record,
            done,
        });
    }

    /// Leaves `committed` (a group's committed log id) for the log thread to
    /// write with its next batch, without waking it (see "Committed indexes
    /// ride along"); a newer call for the group before then replaces it.
    /// Nobody is told when it is written: it may be lost in a crash, never
    /// written ahead of the entries the group submitted before this call.
    pub fn submit_committed(&self, group: u32, committed: Bytes) -> Result<(), StoreError> {
        GroupRecord::Committed(committed.clone()).check_size()?;
        self.health.broken()?;
        self.lazy.lock().insert(group, committed);
        Ok(())
    }

    /// Queues `op`; the receiver completes once it is committed and
    /// applied, with its outcome.
    pub fn submit(&self, op: Op) -> Result<Submitted, StoreError> {
        self.health.check()?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Write(op, done))
            .map_err(|_| StoreError::Closed)?;
        Ok(wait)
    }

    /// Lets a test fail or pause the thread's disk I/O.
    #[cfg(feature = "test-hooks")]
    pub fn set_hook(&self, hook: hooks::Hook) {
        *self.hook.lock() = Some(hook);
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
            if is_no_room(&error) {
                // Nothing written to the log: the rotation waits for room.
                return StoreError::full("starting log segment", path.clone(), error).to_string();
            }
            let failed = StoreError::disk("starting log segment", path.clone(), error);
            self.health.fail(failed.clone());
            failed.to_string()
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
            let failed = StoreError::disk("sealing", retired.path.clone(), error);
            self.health.fail(failed.clone());
            failed.to_string()
        })?;
        Ok(seq)
    }

    /// Commits, applies and syncs what is queued, then stops the thread.
    /// Later writes get [`StoreError::Closed`].
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
        self.health.fail(StoreError::Closed);
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
            // A full disk still syncs what was written before it filled.
            if !dirty.swap(false, Ordering::AcqRel) || health.broken().is_err() {
                continue;
            }
            let (file, path) = active.lock().clone();
            match health.sync(&file) {
                Ok(()) => {}
                Err(error) => health.fail(StoreError::disk("syncing", path, error)),
            }
        })?;
    Ok((stop, thread))
}

/// Creates [`GROUPS_FILE`] (durably) before the first group record is
/// written, so recovery knows to read the group records of segments a
/// snapshot covers.
fn mark_groups(dir: &Path) -> io::Result<()> {
    File::create(dir.join(GROUPS_FILE))?.sync_all()?;
    super::sync_dir(dir)
}

/// Awaits a submitted op.
pub(crate) async fn wait(rx: Submitted) -> Outcome {
    rx.await.unwrap_or(Err(StoreError::Closed))
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
    /// The batch: its framed records, its ops and their writers.
    buf: Vec<u8>,
    ops: Vec<Op>,
    waiters: Vec<Done>,
    /// The batch's group records' completions, and the purges (`Some`)
    /// and drops (`None`) among them, in order (counted in the book once
    /// committed).
    group_dones: Vec<Pending>,
    purges: Vec<(u32, Option<u64>)>,
    /// The batch's group records, kept until its commit: a batch held for
    /// room is framed again without its refused plain writes.
    records: Vec<(u32, GroupRecord)>,
    /// Messages taken off the channel while waiting for room, handled (in
    /// order) before anything newer.
    backlog: VecDeque<Msg>,
    /// Close arrived while waiting for room: no more waiting.
    closing: bool,
    /// Per group, what the next segment's checkpoint restates.
    checkpoints: BTreeMap<u32, Checkpoint>,
    /// The groups' slots, and what this thread took from them and has not
    /// framed yet (framed only at the end of a batch that drained the
    /// channel: see "Committed indexes ride along").
    lazy: LazyCommitted,
    held: BTreeMap<u32, Bytes>,
    /// The directory holds [`GROUPS_FILE`].
    marked: bool,
    book: Arc<Mutex<GroupBook>>,
    outcomes: Vec<bool>,
    applier: Arc<dyn Apply>,
    health: Arc<Health>,
    config: WriterConfig,
    #[cfg(feature = "test-hooks")]
    hook: hooks::Slot,
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

/// How a batch's I/O failed.
enum Failure {
    /// A `write` found no room (`ENOSPC`, `EDQUOT`): nothing was synced or
    /// acknowledged, so the batch may wait and be written again.
    NoRoom(io::Error),
    /// Anything else, and any failed `fdatasync`: the log stops for good.
    Broken(io::Error),
}

impl Failure {
    /// A failed `write`: no room, or broken.
    fn of_write(error: io::Error) -> Failure {
        if is_no_room(&error) {
            Failure::NoRoom(error)
        } else {
            Failure::Broken(error)
        }
    }
}

/// What the log thread's wait for a message ended with.
enum Next {
    Msg(Msg),
    /// A [`COMMITTED_TICK`] passed without a message.
    Idle,
    /// Every handle is gone.
    Gone,
}

/// First pause between tries for room, doubled after each failed try.
const FIRST_ROOM_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause between tries for room: how late writes resume after
/// space is freed, at worst.
const MAX_ROOM_PAUSE: Duration = Duration::from_millis(500);

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let first = match self.next(&rx) {
                Next::Msg(msg) => Some(msg),
                // A tick with nothing queued: a batch of the slots alone.
                Next::Idle => None,
                Next::Gone => break,
            };
            // Before the poll (see "Committed indexes ride along").
            self.take_lazy();
            if first.is_none() && self.held.is_empty() {
                continue;
            }
            let mut control = None;
            if let Some(first) = first {
                self.take(first, &mut control);
            }
            let mut drained = false;
            while control.is_none()
                && self.ops.len() + self.group_dones.len() < MAX_BATCH
                && self.buf.len() < MAX_BATCH_BYTES
            {
                match self.poll(&rx) {
                    Some(msg) => self.take(msg, &mut control),
                    None => {
                        drained = true;
                        break;
                    }
                }
            }
            if drained {
                self.frame_held();
            }
            self.commit(&rx);
            match control {
                Some(Msg::Rotate { next, seq, reply }) => {
                    let rotated = self.rotate(next, seq);
                    #[cfg(feature = "test-hooks")]
                    let _ = self.hook(hooks::Event::Rotated);
                    let _ = reply.send(rotated);
                }
                Some(Msg::Close) => break,
                _ => {}
            }
            if self.segment_bytes >= self.config.wal_max_bytes && !self.asked_snapshot {
                self.asked_snapshot = true;
                (self.config.on_full)();
            }
        }
        // Closing (or every handle dropped): make everything written durable
        // (also when the disk is full: what was written before must be synced).
        if self.health.broken().is_ok() {
            // The slots' last values, by the same rule as a batch: only if
            // nothing is queued after the take. A message racing with close
            // is dropped unlogged (as it always was: its sender hears
            // `Closed`), and then the committed indexes are left out.
            self.take_lazy();
            if !self.held.is_empty() && self.poll(&rx).is_none() {
                self.frame_held();
                self.commit(&rx);
            }
            if let Err(error) = self.seal() {
                let path = self.segment_path();
                self.health.fail(StoreError::disk("sealing", path, error));
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

    /// The next message (the backlog first), waiting at most a
    /// [`COMMITTED_TICK`].
    fn next(&mut self, rx: &Receiver<Msg>) -> Next {
        if let Some(msg) = self.backlog.pop_front() {
            return Next::Msg(msg);
        }
        match rx.recv_timeout(COMMITTED_TICK) {
            Ok(msg) => Next::Msg(msg),
            Err(RecvTimeoutError::Timeout) => Next::Idle,
            Err(RecvTimeoutError::Disconnected) => Next::Gone,
        }
    }

    /// Moves the slots' values into `held` (newer replace older).
    fn take_lazy(&mut self) {
        let mut slots = self.lazy.lock();
        if !slots.is_empty() {
            self.held.extend(slots.drain());
        }
    }

    /// Frames every held committed index at the end of the batch; only
    /// once the batch's poll found the channel empty after the take (see
    /// "Committed indexes ride along").
    fn frame_held(&mut self) {
        for (group, committed) in std::mem::take(&mut self.held) {
            let record = GroupRecord::Committed(committed);
            record.encode(group, &mut self.buf);
            self.checkpoints.entry(group).or_default().note(&record);
            self.records.push((group, record));
        }
    }

    /// The next message if one is waiting (the backlog first).
    fn poll(&mut self, rx: &Receiver<Msg>) -> Option<Msg> {
        self.backlog.pop_front().or_else(|| rx.try_recv().ok())
    }

    fn take(&mut self, msg: Msg, control: &mut Option<Msg>) {
        match msg {
            Msg::Write(op, done) => {
                match &op {
                    Op::Put(entry) => record::encode(&mut self.buf, Kind::Put, entry),
                    Op::Delete(key) => record::encode(&mut self.buf, Kind::Delete, key),
                }
                self.ops.push(op);
                self.waiters.push(done);
            }
            Msg::Group {
                group,
                record,
                done,
            } => {
                record.encode(group, &mut self.buf);
                if let Some(last) = record.last_index() {
                    self.book.lock().wrote(self.config.seq, group, last);
                }
                match &record {
                    GroupRecord::Purge { upto, .. } => self.purges.push((group, Some(*upto))),
                    GroupRecord::Drop => self.purges.push((group, None)),
                    _ => {}
                }
                if matches!(record, GroupRecord::Drop | GroupRecord::Committed(_)) {
                    // An index taken earlier must not follow this record.
                    self.held.remove(&group);
                }
                self.checkpoints.entry(group).or_default().note(&record);
                self.group_dones.push(done);
                self.records.push((group, record));
            }
            other => *control = Some(other),
        }
    }

    /// Writes the batch and commits it (syncs it if the policy says so),
    /// then applies it and answers its writers; a batch that fails on disk
    /// is dropped unapplied. A batch without room waits for it
    /// ([`Writer::wait_for_room`]).
    fn commit(&mut self, rx: &Receiver<Msg>) {
        if self.waiters.is_empty() && self.records.is_empty() {
            return;
        }
        let committed = self
            .health
            .broken()
            .and_then(|()| match self.write_batch() {
                Ok(()) => Ok(()),
                Err(Failure::NoRoom(error)) => self.wait_for_room(rx, error),
                Err(Failure::Broken(error)) => Err(self.broken(error)),
            });
        self.buf.clear();
        self.records.clear();
        match committed {
            Ok(()) => {
                self.outcomes.clear();
                self.applier.apply(&mut self.ops, &mut self.outcomes);
                debug_assert_eq!(self.outcomes.len(), self.waiters.len());
                for (done, &found) in self.waiters.drain(..).zip(&self.outcomes) {
                    let _ = done.send(Ok(found));
                }
                if !self.purges.is_empty() {
                    let mut book = self.book.lock();
                    for (group, upto) in self.purges.drain(..) {
                        match upto {
                            Some(upto) => book.purged(group, upto),
                            None => book.dropped(group),
                        }
                    }
                }
                for done in self.group_dones.drain(..) {
                    done.complete(Ok(()));
                }
            }
            Err(error) => {
                self.ops.clear();
                self.purges.clear();
                for done in self.waiters.drain(..) {
                    let _ = done.send(Err(error.clone()));
                }
                for done in self.group_dones.drain(..) {
                    done.complete(Err(error.clone()));
                }
            }
        }
        // An applier that answered short must not leave a writer hanging.
        for done in self.waiters.drain(..) {
            let _ = done.send(Err(StoreError::Closed));
        }
    }

    /// Stops the log for good after `error` (see "Failures").
    fn broken(&self, error: io::Error) -> StoreError {
        let failed = StoreError::disk("appending to", self.segment_path(), error);
        self.health.fail(failed.clone());
        failed
    }

    /// The batch found no room (see "Full disk" in the module docs): refuse
    /// its plain writes, keep its group records, and try again with a
    /// backoff until a try succeeds (`Ok`: commit the batch), the disk
    /// fails otherwise, or the store closes (`Err`: fail what is held).
    /// Messages arriving meanwhile are answered (plain writes refused,
    /// rotations refused) or kept in order in the backlog (group records).
    fn wait_for_room(&mut self, rx: &Receiver<Msg>, error: io::Error) -> Result<(), StoreError> {
        let full = StoreError::full("appending to", self.segment_path(), error);
        self.health.set_full(full.clone());
        // With no group record held, a try only asks for the room the whole
        // batch needed, so that plain writes are taken again once it is there.
        let needed = self.segment_bytes + self.buf.len() as u64;
        if !self.waiters.is_empty() {
            // Refused, never applied: their writers hear it now.
            for done in self.waiters.drain(..) {
                let _ = done.send(Err(full.clone()));
            }
            self.ops.clear();
            self.buf.clear();
            for (group, record) in &self.records {
                record.encode(*group, &mut self.buf);
            }
        }
        let mut pause = FIRST_ROOM_PAUSE;
        let mut next_try = Instant::now() + pause;
        loop {
            if self.closing {
                return Err(full);
            }
            let wait = next_try.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Write(_, done)) => {
                    let _ = done.send(Err(full.clone()));
                    continue;
                }
                Ok(group @ Msg::Group { .. }) => {
                    self.backlog.push_back(group);
                    continue;
                }
                // Dropping `next` leaves the file to the caller, who removes it.
                Ok(Msg::Rotate { reply, .. }) => {
                    let _ = reply.send(Err(full.to_string()));
                    continue;
                }
                Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => {
                    // What is held fails; then the thread stops.
                    self.closing = true;
                    for msg in self.backlog.drain(..) {
                        if let Msg::Group { done, .. } = msg {
                            done.complete(Err(full.clone()));
                        }
                    }
                    self.backlog.push_back(Msg::Close);
                    return Err(full);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let tried = if self.records.is_empty() {
                self.try_room(needed)
            } else {
                self.write_batch()
            };
            match tried {
                Ok(()) => {
                    self.health.clear_full();
                    return Ok(());
                }
                Err(Failure::NoRoom(_)) => {
                    pause = (pause * 2).min(MAX_ROOM_PAUSE);
                    next_try = Instant::now() + pause;
                }
                Err(Failure::Broken(error)) => return Err(self.broken(error)),
            }
        }
    }

    /// Whether the segment now has room up to `end` (allocating it).
    fn try_room(&mut self, end: u64) -> Result<(), Failure> {
        #[cfg(feature = "test-hooks")]
        self.hook(hooks::Event::BeforeWrite)
            .map_err(Failure::of_write)?;
        self.allocate(end)
    }

    /// The batch's `write` and, for `always`, its `fdatasync`.
    fn write_batch(&mut self) -> Result<(), Failure> {
        #[cfg(feature = "test-hooks")]
        self.hook(hooks::Event::BeforeWrite)
            .map_err(Failure::of_write)?;
        if !self.marked && !self.records.is_empty() {
            // An empty file: creating it again after no room is harmless.
            mark_groups(&self.config.dir).map_err(Failure::of_write)?;
            self.marked = true;
        }
        let end = self.segment_bytes + self.buf.len() as u64;
        self.allocate(end)?;
        self.file
            .write_all_at(&self.buf, self.segment_bytes)
            .map_err(Failure::of_write)?;
        if self.config.policy == FsyncPolicy::Always {
            self.health.sync(&self.file).map_err(Failure::Broken)?;
        }
        self.health.writes.fetch_add(1, Ordering::Relaxed);
        self.segment_bytes += self.buf.len() as u64;
        self.health
            .active_log_bytes
            .store(self.segment_bytes, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Release);
        let records = self.ops.len() + self.records.len();
        self.health
            .appended
            .fetch_add(records as u64, Ordering::Relaxed);
        Ok(())
    }

    #[cfg(feature = "test-hooks")]
    fn hook(&self, event: hooks::Event) -> io::Result<()> {
        match self.hook.lock().as_ref() {
            Some(hook) => hook(event),
            None => Ok(()),
        }
    }

    /// Zero-fills chunks until the segment is allocated up to `end`, and
    /// makes the new size durable once, so batch syncs need not. A fill
    /// without room is retried from the same offset: it only ever writes
    /// zeros past the records.
    fn allocate(&mut self, end: u64) -> Result<(), Failure> {
        if end <= self.allocated {
            return Ok(());
        }
        let step = self.allocated.clamp(FIRST_CHUNK, PREALLOC_CHUNK);
        let target = end.max(self.allocated + step);
        zero_fill(&self.file, self.allocated, target).map_err(Failure::of_write)?;
        self.file.sync_data().map_err(Failure::Broken)?;
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
    /// [`Journal::rotate`]) and hands back the segment left behind. Without
    /// room for the groups' checkpoint the switch is undone (the caller
    /// removes `next`) and the rotation waits for a later try.
    fn rotate(&mut self, next: File, seq: u64) -> Result<Retired, String> {
        self.health.check().map_err(|e| e.to_string())?;
        let before = (
            std::mem::replace(&mut self.file, Arc::new(next)),
            self.config.seq,
            self.segment_bytes,
            self.allocated,
        );
        self.config.seq = seq;
        self.segment_bytes = segment::HEADER_LEN;
        self.allocated = FIRST_CHUNK;
        match self.write_checkpoint() {
            Ok(()) => {}
            Err(Failure::NoRoom(error)) => {
                self.buf.clear();
                let full = StoreError::full("checkpointing groups in", self.segment_path(), error);
                (
                    self.file,
                    self.config.seq,
                    self.segment_bytes,
                    self.allocated,
                ) = before;
                return Err(full.to_string());
            }
            Err(Failure::Broken(error)) => {
                let failed =
                    StoreError::disk("checkpointing groups in", self.segment_path(), error);
                self.health.fail(failed.clone());
                return Err(failed.to_string());
            }
        }
        let (file, old_seq, len, _) = before;
        let retired = Retired {
            file,
            len,
            path: self.segment_path_for(old_seq),
        };
        if let Some(active) = &self.active {
            *active.lock() = (Arc::clone(&self.file), self.segment_path_for(seq));
        }
        self.health
            .active_log_bytes
            .store(self.segment_bytes, Ordering::Relaxed);
        self.asked_snapshot = false;
        Ok(retired)
    }

    /// Starts the new segment with every group's checkpoint (see
    /// [`super::group`]), synced before anything else goes there, so older
    /// segments hold nothing a group needs but entries. Nothing to do (and
    /// no sync) for a store without groups.
    fn write_checkpoint(&mut self) -> Result<(), Failure> {
        if self.checkpoints.is_empty() {
            return Ok(());
        }
        let mut records = 0;
        for (group, checkpoint) in &self.checkpoints {
            records += checkpoint.encode(*group, &mut self.buf);
        }
        let end = self.segment_bytes + self.buf.len() as u64;
        self.allocate(end)?;
        self.file
            .write_all_at(&self.buf, self.segment_bytes)
            .map_err(Failure::of_write)?;
        self.health.sync(&self.file).map_err(Failure::Broken)?;
        self.segment_bytes = end;
        self.buf.clear();
        self.health.appended.fetch_add(records, Ordering::Relaxed);
        Ok(())
    }
}

/// Test hooks (feature `test-hooks`, enabled only by dev-dependencies): a
/// test fails or pauses the log thread at chosen points to stage a disk
/// failure at an exact moment.
#[cfg(feature = "test-hooks")]
pub mod hooks {
    use std::io;
    use std::sync::Arc;

    use parking_lot::Mutex;

    /// Where the log thread calls the hook.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Event {
        /// Before a batch's `write`; an `Err` fails it as the disk would.
        BeforeWrite,
        /// After a rotation, before its caller (a snapshot) is answered.
        Rotated,
    }

    /// Called on the log thread; may block it.
    pub type Hook = Box<dyn Fn(Event) -> io::Result<()> + Send>;

    pub(crate) type Slot = Arc<Mutex<Option<Hook>>>;
}
