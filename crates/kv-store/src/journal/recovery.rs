//! Putting a data directory back into memory on open.
//!
//! 1. Remove `snap-*.snap.tmp` files: a crash mid-snapshot left them, and the
//!    segments they would have covered are all still there.
//! 2. Load the newest snapshot. A damaged one refuses to open (naming file
//!    and offset) unless `repair`, which sets it aside as `*.corrupt` and
//!    falls back to the next older snapshot.
//! 3. Delete segments the snapshot covers (a crash between a snapshot's
//!    rename and its retiring of old segments leaves them), then replay the
//!    rest in order, the last one allowing a torn tail ([`super::reader`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::reader::replay_segment;
use super::{classify, snapshot, FileKind};
use crate::map::Map;
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
    while let Some((seq, path)) = snapshots.pop() {
        let loaded =
            snapshot::load(&path, map).map_err(|e| OpenError::io("read snapshot", &path, e))?;
        match loaded {
            Ok(keys) => {
                base = seq;
                report.snapshot = Some((path, keys));
                break;
            }
            Err((offset, reason)) if repair => {
                map.clear();
                let mut aside = path.as_os_str().to_owned();
                aside.push(".corrupt");
                log::warn!(
                    "repair: snapshot {} is corrupt at offset {offset} ({reason}); moved it to {} \
                     and falling back to an older snapshot: writes it alone held are lost",
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
    let live: Vec<_> = segments
        .into_iter()
        .filter(|(seq, path)| {
            if *seq < base {
                // Covered by the snapshot; best effort, replaying it would be harmless too.
                if let Err(error) = fs::remove_file(path) {
                    log::warn!("cannot remove covered segment {}: {error}", path.display());
                }
                false
            } else {
                true
            }
        })
        .collect();
    for (index, (seq, path)) in live.iter().enumerate() {
        let is_last = index + 1 == live.len();
        let replay = replay_segment(path, is_last, repair, map)?;
        report.segments += 1;
        report.records += replay.records;
        report.cut_bytes += replay.cut_bytes;
        next = next.max(seq + 1);
    }
    report.keys = map.len();
    report.next_segment = next;
    report.elapsed = started.elapsed();
    Ok(report)
}
