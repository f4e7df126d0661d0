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
//! load size the tables once instead of growing them.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::record::{self, Kind};
use super::writer::Journal;
use super::{classify, snapshot_name, sync_dir, FileKind};
use crate::entry::{self, Entry};
use crate::map::{Change, Map, Recovered};

const MAGIC: &[u8; 8] = b"KVSNAP1\n";
const PREAMBLE: usize = 16;

/// Writes `entries` as the snapshot covering segments below `seq`: temp file,
/// fsync, rename, fsync the directory. Returns the file's size.
pub fn write(dir: &Path, seq: u64, entries: &[Entry]) -> io::Result<u64> {
    let path = dir.join(snapshot_name(seq));
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = write_file(&tmp, entries).and_then(|size| {
        fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        Ok(size)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_file(tmp: &Path, entries: &[Entry]) -> io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
    let count = (entries.len() as u64).to_le_bytes();
    out.write_all(MAGIC)?;
    out.write_all(&count)?;
    let mut buf = Vec::with_capacity(4096);
    let mut size = PREAMBLE as u64;
    for entry in entries {
        record::encode(&mut buf, Kind::Put, entry);
        if buf.len() >= 64 << 10 {
            out.write_all(&buf)?;
            size += buf.len() as u64;
            buf.clear();
        }
    }
    record::encode(&mut buf, Kind::End, &count);
    out.write_all(&buf)?;
    size += buf.len() as u64;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    Ok(size)
}

/// Checks a snapshot read into `buf` and decodes its entries (all distinct
/// keys): the entries, or the offset and reason it is damaged.
pub fn decode(buf: &[u8]) -> Result<Vec<Recovered<'_>>, (u64, String)> {
    let mut entries = Vec::new();
    scan(buf, Some(&mut entries))?;
    Ok(entries)
}

/// Checks a snapshot read into `buf`: its entry count, or the offset and
/// reason it is damaged.
pub fn check(buf: &[u8]) -> Result<usize, (u64, String)> {
    scan(buf, None)
}

/// Checks every record of a snapshot, collecting its entries into `sink` if
/// given; the entry count.
fn scan<'a>(
    buf: &'a [u8],
    mut sink: Option<&mut Vec<Recovered<'a>>>,
) -> Result<usize, (u64, String)> {
    if buf.len() < PREAMBLE || &buf[..8] != MAGIC {
        return Err((0, "not a snapshot file (bad magic)".into()));
    }
    let mut count_bytes = [0; 8];
    count_bytes.copy_from_slice(&buf[8..16]);
    let count = u64::from_le_bytes(count_bytes);
    // Trust the count only as far as the file could hold that many records.
    let plausible = (buf.len() / record::HEADER_LEN) as u64;
    if let Some(sink) = sink.as_deref_mut() {
        sink.reserve_exact(count.min(plausible) as usize);
    }
    let mut seen = 0u64;
    let mut pos = PREAMBLE;
    loop {
        let rec = match record::decode(&buf[pos..]) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Err((pos as u64, "snapshot ends without its end record".into())),
            Err(damage) => return Err((pos as u64, damage.describe().into())),
        };
        match rec.kind {
            Kind::Put if entry::is_well_formed(rec.body) => {
                if let Some(sink) = sink.as_deref_mut() {
                    sink.push(Recovered::new(Change::PutNew(rec.body)));
                }
                seen += 1;
            }
            Kind::End if rec.body == count_bytes && seen == count => {
                if pos + rec.framed_len != buf.len() {
                    return Err((
                        (pos + rec.framed_len) as u64,
                        "bytes after the end record".into(),
                    ));
                }
                return Ok(seen as usize);
            }
            Kind::End => {
                return Err((
                    pos as u64,
                    format!("end record does not match the {seen} entries read"),
                ))
            }
            _ => return Err((pos as u64, "unexpected record in a snapshot".into())),
        }
        pos += rec.framed_len;
    }
}

/// Takes a snapshot now: rotate the log, copy the map, write, retire.
pub fn take(map: &Map, journal: &Journal, dir: &Path) -> Result<(), String> {
    let started = Instant::now();
    let seq = journal.rotate()?;
    let entries = map.entries();
    let keys = entries.len();
    let size = write(dir, seq, &entries)
        .map_err(|e| format!("cannot write snapshot {}: {e}", snapshot_name(seq)))?;
    drop(entries);
    let retired = retire(dir, seq).map_err(|e| {
        format!(
            "snapshot {} written, but retiring older files failed: {e}",
            snapshot_name(seq)
        )
    })?;
    log::info!(
        "snapshot {}: {keys} keys, {size} bytes in {:.0?}; retired {retired} older files",
        snapshot_name(seq),
        started.elapsed()
    );
    journal.health.snapshot_written(keys, size);
    Ok(())
}

/// Deletes what snapshot `seq` makes unneeded, keeping one generation back:
/// the previous snapshot and every log segment since it stay, so that if
/// snapshot `seq` turns out damaged, `--repair` falls back to the previous
/// one and replays the log after it, losing nothing. Older files go.
pub fn retire(dir: &Path, seq: u64) -> io::Result<usize> {
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
    let mut retired = 0;
    for (kind, path) in &files {
        let old = match kind {
            FileKind::Segment(s) | FileKind::Snapshot(s) => *s < keep_from,
            _ => false,
        };
        if old {
            fs::remove_file(path)?;
            retired += 1;
        }
    }
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
