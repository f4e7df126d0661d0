//! Putting a data directory back into memory on open.
//!
//! 1. Remove `snap-*.snap.tmp` files: a crash mid-snapshot left them, and the
//!    segments they would have covered are all still there.
//! 2. Load the newest snapshot. A damaged one refuses to open (naming file
//!    and offset) unless `repair`, which sets it aside as `*.corrupt` and
//!    falls back to the next older snapshot, whose log is still there.
//! 3. Skip segments the snapshot covers (the previous generation, kept for
//!    a fallback until the next snapshot retires it), then read the rest in
//!    order, the last one allowing a torn tail ([`super::reader`]).
//!    Segments with no records (every start opens one) are deleted.
//! 4. Apply: the snapshot's entries for keys the log does not touch, then the
//!    last change the log holds for each key it touches. That ends in the
//!    state a full replay would, without allocating values that a later
//!    record frees (resident heap holes), and on every core
//!    ([`Map::apply_recovered`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

use super::{classify, reader, snapshot, FileKind};
use crate::map::{Map, Recovered};
use crate::OpenError;

/// What recovery found and did; `kv-node` logs it.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Keys in the map after recovery.
    pub keys: usize,
    /// The snapshot loaded and the keys it held.
    pub snapshot: Option<(PathBuf, usize)>,
    /// Log segments replayed and their records.
    pub segments: usize,
    pub records: u64,
    /// Bytes cut from torn tails or by repair.
    pub cut_bytes: u64,
    pub elapsed: Duration,
    /// The number of the segment to append to next.
    pub next_segment: u64,
}

/// Recovers `dir` into `map` (empty).
pub fn recover(dir: &Path, map: &Map, repair: bool) -> Result<RecoveryReport, OpenError> {
    let started = Instant::now();
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    let listing = fs::read_dir(dir).map_err(|e| OpenError::io("list data dir", dir, e))?;
    for item in listing {
        let item = item.map_err(|e| OpenError::io("list data dir", dir, e))?;
        let path = item.path();
        match classify(&item.file_name().to_string_lossy()) {
            FileKind::Segment(seq) => segments.push((seq, path)),
            FileKind::Snapshot(seq) => snapshots.push((seq, path)),
            FileKind::Temp => {
                log::warn!(
                    "removing {}: a snapshot left unfinished by a crash",
                    path.display()
                );
                fs::remove_file(&path)
                    .map_err(|e| OpenError::io("remove unfinished snapshot", &path, e))?;
            }
            FileKind::Other => {}
        }
    }
    segments.sort_unstable();
    snapshots.sort_unstable();

    let mut report = RecoveryReport::default();
    let mut base = 0;
    let mut snapshot_buf = Vec::new();
    while let Some((seq, path)) = snapshots.pop() {
        let buf = fs::read(&path).map_err(|e| OpenError::io("read snapshot", &path, e))?;
        match snapshot::check(&buf) {
            Ok(count) => {
                report.snapshot = Some((path, count));
                base = seq;
                snapshot_buf = buf;
                break;
            }
            Err((offset, reason)) if repair => {
                let mut aside = path.as_os_str().to_owned();
                aside.push(".corrupt");
                log::warn!(
                    "repair: snapshot {} is corrupt at offset {offset} ({reason}); moved it to {} \
                     and falling back to the previous snapshot and the log since it",
                    path.display(),
                    Path::new(&aside).display()
                );
                fs::rename(&path, &aside)
                    .map_err(|e| OpenError::io("move aside corrupt snapshot", &path, e))?;
            }
            Err((offset, reason)) => {
                return Err(OpenError::Corrupt {
                    file: path,
                    offset,
                    reason,
                })
            }
        }
    }

    let mut next = base.max(1);
    // Segments the snapshot covers are not read. They stay (the previous
    // generation, for a fallback) until the next snapshot retires them.
    let live: Vec<_> = segments
        .into_iter()
        .filter(|(seq, _)| *seq >= base)
        .collect();
    let mut log_bufs = Vec::with_capacity(live.len());
    for (index, (seq, path)) in live.iter().enumerate() {
        let is_last = index + 1 == live.len();
        let (buf, cut_bytes) = reader::read_segment(path, is_last, repair)?;
        report.cut_bytes += cut_bytes;
        // Numbers are never reused, even those of segments removed below.
        next = next.max(seq + 1);
        if buf.is_empty() {
            // Each start opens a new segment; one that got no records (a
            // restart without writes, or a kill right after one) would
            // otherwise pile up until the next snapshot. Best effort: a
            // leftover empty segment is harmless.
            if let Err(error) = fs::remove_file(path) {
                log::warn!("cannot remove empty segment {}: {error}", path.display());
            }
            continue;
        }
        log_bufs.push(buf);
        report.segments += 1;
    }

    // The snapshot was checked above and the segments cut to their usable
    // bytes, so decoding them again finds no damage.
    let mut entries = match (&report.snapshot, snapshot::decode(&snapshot_buf)) {
        (None, _) => Vec::new(),
        (Some(_), Ok(entries)) => entries,
        (Some((path, _)), Err((offset, reason))) => {
            return Err(OpenError::Corrupt {
                file: path.clone(),
                offset,
                reason,
            })
        }
    };
    let mut changes = Vec::new();
    for buf in &log_bufs {
        changes.extend(reader::decode_changes(buf).0);
    }
    report.records = changes.len() as u64;
    let changes = last_change_per_key(changes);
    if !changes.is_empty() {
        // A key the log changes ends as the log says: skip its snapshot entry
        // instead of allocating it only to free it.
        let mut touched: HashTable<usize> = HashTable::with_capacity(changes.len());
        for (index, change) in changes.iter().enumerate() {
            touched.insert_unique(change.hash, index, |&i| changes[i].hash);
        }
        entries.retain(|entry| {
            touched
                .find(entry.hash, |&i| changes[i].key() == entry.key())
                .is_none()
        });
    }
    map.reserve(entries.len() + changes.len());
    map.apply_recovered(&entries);
    drop(entries);
    drop(snapshot_buf);
    map.apply_recovered(&changes);
    report.keys = map.len();
    report.next_segment = next;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Only the last change of each key, in log order: applying them ends in the
/// same state as applying all, without allocating entries that a later
/// change would free (freed chunks stay resident as heap holes).
fn last_change_per_key(changes: Vec<Recovered<'_>>) -> Vec<Recovered<'_>> {
    let mut last: HashTable<usize> = HashTable::with_capacity(changes.len());
    for (index, change) in changes.iter().enumerate() {
        match last.find_mut(change.hash, |&i| changes[i].key() == change.key()) {
            Some(slot) => *slot = index,
            None => {
                last.insert_unique(change.hash, index, |&i| changes[i].hash);
            }
        }
    }
    let mut keep = vec![false; changes.len()];
    for &index in last.iter() {
        keep[index] = true;
    }
    changes
        .into_iter()
        .zip(keep)
        .filter_map(|(change, keep)| keep.then_some(change))
        .collect()
}
