//! Snapshots: writing one without stopping writers, loading one, and the
//! thread that takes them on a timer or when the log grows too long.
//!
//! A snapshot file is
//!
//! ```text
//! "KVSNAP1\n" [entry count: u64 LE] Put record * count, End record(count)
//! ```
//!
//! with records framed as in the log ([`super::record`]), so a damaged or
//! incomplete snapshot is detected the same way. The count up front lets a
//! load size the tables once instead of growing them; it is written last
//! (the file is streamed out before the count is known).
//!
//! # Not stalling requests
//!
//! A snapshot runs beside live traffic on a machine that may have two cores
//! and one disk, so it is written to disturb them as little as possible:
//! * the map is copied and written one shard at a time (a shard's entries
//!   are reference-count increments under its read lock), so no copy of the
//!   whole map is ever held, and a value overwritten meanwhile is freed
//!   soon, not kept alive until the end;
//! * the thread runs at a lower CPU priority (`nice` [`NICE`]), so request
//!   handling wins the cores;
//! * every [`WRITEBACK_EVERY`] bytes, what was written is synced
//!   (`fdatasync`), so the snapshot never has more than that much dirty in
//!   the page cache. On ext4 (`data=ordered`) a journal commit, which every
//!   `fdatasync` of the log that extends it needs, first writes out the
//!   dirty data of every file: with a whole snapshot dirty, the log's sync
//!   (and with it every write) waits for all of it. Redis's
//!   `rdb-save-incremental-fsync` does the same. The synced pages are then
//!   dropped from the page cache (`posix_fadvise(DONTNEED)`): the data is
//!   in memory already.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::group::GroupBook;
use super::reader::{self, Item};
use super::record::{self, Kind, Record};
use super::writer::Journal;
use super::{classify, snapshot_name, sync_dir, FileKind};
use crate::entry;
use crate::map::{Change, Map, Recovered, SHARD_COUNT};

const MAGIC: &[u8; 8] = b"KVSNAP1\n";
const PREAMBLE: usize = 16;

/// The snapshot thread's `nice` value (0 is normal, 19 the lowest).
pub const NICE: i32 = 10;

/// Bytes written between two syncs.
pub const WRITEBACK_EVERY: u64 = 4 << 20;

/// Bytes gathered before each `write`.
const WRITE_BUF: usize = 256 << 10;

/// Writes the map as the snapshot covering segments below `seq`: temp file,
/// fsync, rename, fsync the directory. Returns its key count and size.
pub fn write(dir: &Path, seq: u64, map: &Map) -> io::Result<(usize, u64)> {
    let path = dir.join(snapshot_name(seq));
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = write_file(&tmp, map).and_then(|written| {
        fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        Ok(written)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Streams the map into `tmp` shard by shard (see the module docs).
fn write_file(tmp: &Path, map: &Map) -> io::Result<(usize, u64)> {
    let mut out = File::create(tmp)?;
    let mut buf = Vec::with_capacity(WRITE_BUF + (64 << 10));
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&[0; 8]);
    let mut written = 0u64;
    let mut flushed_to = 0u64;
    let mut count = 0u64;
    let mut shard = Vec::new();
    for index in 0..SHARD_COUNT {
        map.copy_shard(index, &mut shard);
        for entry in shard.drain(..) {
            record::encode(&mut buf, Kind::Put, &entry);
            count += 1;
            if buf.len() >= WRITE_BUF {
                write_out(&mut out, &mut buf, &mut written, &mut flushed_to)?;
            }
        }
    }
    let count_bytes = count.to_le_bytes();
    record::encode(&mut buf, Kind::End, &count_bytes);
    write_out(&mut out, &mut buf, &mut written, &mut flushed_to)?;
    out.write_all_at(&count_bytes, 8)?;
    out.sync_all()?;
    let _ = rustix::fs::fadvise(&out, 0, None, rustix::fs::Advice::DontNeed);
    Ok((count as usize, written))
}

/// Writes `buf` out, and syncs every [`WRITEBACK_EVERY`] bytes.
fn write_out(
    out: &mut File,
    buf: &mut Vec<u8>,
    written: &mut u64,
    flushed_to: &mut u64,
) -> io::Result<()> {
    out.write_all(buf)?;
    *written += buf.len() as u64;
    buf.clear();
    if *written - *flushed_to >= WRITEBACK_EVERY {
        out.sync_data()?;
        let len = std::num::NonZeroU64::new(*written - *flushed_to);
        // Advice only: clean pages left in the cache cost nothing but memory.
        let _ = rustix::fs::fadvise(&*out, *flushed_to, len, rustix::fs::Advice::DontNeed);
        *flushed_to = *written;
    }
    Ok(())
}

/// Loads the snapshot at `path` into `map` (empty), streaming it: its entry
/// count, or `Err((offset, reason))` where it is damaged (`map` then holds
/// part of it). `Ok(Err(_))` is damage, `Err(_)` a failure to read.
pub fn load(path: &Path, map: &Map) -> io::Result<Result<usize, (u64, String)>> {
    let mut file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut preamble = Vec::with_capacity(PREAMBLE);
    Read::take(&mut file, PREAMBLE as u64).read_to_end(&mut preamble)?;
    let count_bytes: Option<[u8; 8]> = preamble.get(8..16).and_then(|b| b.try_into().ok());
    let (true, Some(count_bytes)) = (preamble.starts_with(MAGIC), count_bytes) else {
        return Ok(Err((0, "not a snapshot file (bad magic)".into())));
    };
    let count = u64::from_le_bytes(count_bytes);
    // Trust the count only as far as the file could hold that many records.
    map.reserve(count.min(file_len / record::HEADER_LEN as u64) as usize);
    let convert = reader::converter(move |rec: &Record<'_>| match rec.kind {
        Kind::Put if entry::is_well_formed(rec.body) => {
            Ok(Item::Change(Recovered::new(Change::PutNew(rec.body))))
        }
        Kind::End if rec.body == count_bytes => Ok(Item::Stop),
        Kind::End => Err("end record does not match the count in the preamble"),
        _ => Err("unexpected record in a snapshot"),
    });
    let mut seen = 0u64;
    let streamed = reader::stream(&mut file, PREAMBLE as u64, convert, |batch| {
        seen += batch.len() as u64;
        map.apply_recovered(batch);
    })?;
    Ok(match streamed {
        reader::Streamed {
            damage: Some(found),
            ..
        } => Err((found.offset, found.reason.into())),
        reader::Streamed {
            stopped: false,
            end,
            ..
        } => Err((end, "snapshot ends without its end record".into())),
        reader::Streamed { end, .. } if seen != count => Err((
            end,
            format!("end record does not match the {seen} entries read"),
        )),
        reader::Streamed { end, .. } if end != file_len => {
            Err((end, "bytes after the end record".into()))
        }
        reader::Streamed { .. } => Ok(seen as usize),
    })
}

/// Takes a snapshot now: rotate the log, copy the map, write, retire.
pub fn take(map: &Map, journal: &Journal, dir: &Path) -> Result<(), String> {
    let started = Instant::now();
    let seq = journal.rotate()?;
    let rotated = started.elapsed();
    let (keys, size) = write(dir, seq, map)
        .map_err(|e| format!("cannot write snapshot {}: {e}", snapshot_name(seq)))?;
    let retired = retire(dir, seq, &journal.book).map_err(|e| {
        format!(
            "snapshot {} written, but retiring older files failed: {e}",
            snapshot_name(seq)
        )
    })?;
    log::info!(
        "snapshot {}: {keys} keys, {size} bytes in {:.0?} (log rotation {rotated:.1?}); \
         retired {retired} older files",
        snapshot_name(seq),
        started.elapsed()
    );
    journal.health.snapshot_written(keys, size);
    Ok(())
}

/// Deletes what snapshot `seq` makes unneeded, keeping one generation back:
/// the previous snapshot and every log segment since it stay, so that if
/// snapshot `seq` turns out damaged, `--repair` falls back to the previous
/// one and replays the log after it, losing nothing. Older files go, except
/// log segments holding entries a Raft group has not purged yet: segments
/// go only from the first one the groups still need
/// ([`GroupBook::keep_from`], see [`super::group`]) down.
pub fn retire(dir: &Path, seq: u64, book: &Mutex<GroupBook>) -> io::Result<usize> {
    let mut files = Vec::new();
    for item in fs::read_dir(dir)? {
        let item = item?;
        files.push((classify(&item.file_name().to_string_lossy()), item.path()));
    }
    let keep_from = files
        .iter()
        .filter_map(|(kind, _)| match kind {
            FileKind::Snapshot(s) if *s < seq => Some(*s),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    // Read once (the log thread writes only to the active segment, above
    // it): a purge committed meanwhile only frees more next time.
    let groups_from = book.lock().keep_from();
    let segments_from = groups_from.map_or(keep_from, |g| g.min(keep_from));
    let mut retired = 0;
    for (kind, path) in &files {
        let old = match kind {
            FileKind::Segment(s) => *s < segments_from,
            FileKind::Snapshot(s) => *s < keep_from,
            _ => false,
        };
        if old {
            fs::remove_file(path)?;
            retired += 1;
        }
    }
    book.lock().forget_below(segments_from);
    if retired > 0 {
        sync_dir(dir)?;
    }
    Ok(retired)
}

enum Msg {
    /// The active segment passed `--wal-max-bytes`.
    WalFull,
    /// Snapshot now and say how it went.
    Now(Sender<Result<(), String>>),
    Close,
}

/// The snapshot thread's handle.
pub struct Snapshotter {
    tx: Mutex<Sender<Msg>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Snapshotter {
    /// A channel for the writer thread's "log is full" signal, made before the
    /// writer starts; [`Snapshotter::start`] takes the receiving end.
    pub fn channel() -> (SnapshotSignal, SnapshotInbox) {
        let (tx, rx) = mpsc::channel();
        (SnapshotSignal(Mutex::new(tx)), SnapshotInbox(rx))
    }

    pub fn start(
        signal: &SnapshotSignal,
        inbox: SnapshotInbox,
        map: Arc<Map>,
        journal: Arc<Journal>,
        dir: PathBuf,
        interval: Duration,
    ) -> io::Result<Snapshotter> {
        let tx = signal.0.lock().clone();
        // Read before the thread starts: writes may begin as soon as `open`
        // returns, and a late-starting thread would count them as covered.
        let snapshotted_at = journal.health.appended();
        let thread = std::thread::Builder::new()
            .name("kv-snapshot".into())
            .spawn(move || run(inbox.0, &map, &journal, &dir, interval, snapshotted_at))?;
        Ok(Snapshotter {
            tx: Mutex::new(tx),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Takes a snapshot now (blocking until it is durable).
    pub fn snapshot_now(&self) -> Result<(), String> {
        let (reply, wait) = mpsc::channel();
        self.tx
            .lock()
            .send(Msg::Now(reply))
            .map_err(|_| "the snapshot thread has stopped".to_owned())?;
        wait.recv()
            .map_err(|_| "the snapshot thread has stopped".to_owned())?
    }

    /// Stops the thread (after the snapshot in progress, if any).
    pub fn close(&self) {
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        let _ = self.tx.lock().send(Msg::Close);
        if thread.join().is_err() {
            log::error!("the snapshot thread panicked");
        }
    }
}

/// The writer thread's way to ask for a snapshot.
pub struct SnapshotSignal(Mutex<Sender<Msg>>);

impl SnapshotSignal {
    pub fn wal_full(&self) {
        let _ = self.0.lock().send(Msg::WalFull);
    }
}

/// The receiving end, handed to [`Snapshotter::start`].
pub struct SnapshotInbox(Receiver<Msg>);

fn run(
    rx: Receiver<Msg>,
    map: &Map,
    journal: &Journal,
    dir: &Path,
    interval: Duration,
    mut snapshotted_at: u64,
) {
    // Best effort: at normal priority a snapshot only competes harder.
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE) {
        log::debug!("cannot lower the snapshot thread's priority: {error}");
    }
    let mut due = Instant::now() + interval;
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        // A full log always gets its snapshot; a timer tick only when
        // something was written since the last one.
        let (reply, wal_full) = match rx.recv_timeout(wait) {
            Ok(Msg::WalFull) => (None, true),
            Err(RecvTimeoutError::Timeout) => (None, false),
            Ok(Msg::Now(reply)) => (Some(reply), false),
            Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => return,
        };
        let appended = journal.health.appended();
        let unchanged = appended == snapshotted_at && !wal_full;
        if reply.is_none() && (unchanged || journal.health.check().is_err()) {
            due = Instant::now() + interval;
            continue;
        }
        let result = take(map, journal, dir);
        match &result {
            Ok(()) => snapshotted_at = appended,
            Err(why) => log::error!("{why}; the log still holds every write, retrying later"),
        }
        due = Instant::now() + interval;
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}
