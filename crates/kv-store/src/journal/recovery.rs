//! Putting a data directory back into memory on open.
//!
//! 1. Remove `snap-*.snap.tmp` files: a crash mid-snapshot left them, and the
//!    segments they would have covered are all still there.
//! 2. Load the newest snapshot. A damaged one refuses to open (naming file
//!    and offset) unless `repair`, which sets it aside as `*.corrupt` and
//!    falls back to the next older snapshot, whose log is still there.
//! 3. Skip segments the snapshot covers (the previous generation, kept for
//!    a fallback until the next snapshot retires it), then replay the rest in
//!    order, the last one allowing a torn tail ([`super::reader`]). The last
//!    segment is deleted if it holds no records (every start opens one).
//! 4. Check the chain of segments ([`super::segment`]): the first one read
//!    must follow a segment the snapshot covers (or none, without a
//!    snapshot), and each next one the one before it. A missing segment (or
//!    snapshot) refuses to open, naming it, unless `repair`, which goes on
//!    and logs exactly which writes it gives up. Legacy segments (no header)
//!    cannot be checked and are noted.
//!
//! Group records ([`super::group`]) are replayed per group as they are
//! read, in the same pass; in a directory that ever logged one, segments the
//! snapshot covers are read too, for their group records only.
//!
//! Everything is streamed: files are read a few MiB at a time and their
//! records applied to the map in file order as they come ([`Map::apply_recovered`],
//! on every core), so recovery needs the map plus a few MiB, not the map
//! plus every file. Replaying a put or delete in log order over a state that
//! already holds it ends in the same state, so the order of a snapshot and
//! the log written after it is all that matters.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::group::{GroupBook, GroupRef, RecoveredGroup, GROUPS_FILE};
use super::segment::Header;
use super::{classify, reader, segment_name, snapshot, snapshot_name, FileKind};
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
    /// The segment the next one follows (its header's link).
    pub follows: u64,
    /// Segments without a header (written by an older version).
    pub legacy_segments: usize,
    /// What `repair` went on without: each missing piece of the log.
    pub gaps: Vec<String>,
    /// Everything `repair` cut, set aside or went on without (damage cut
    /// from a log, a snapshot set aside, a segment header it could not
    /// check, and every gap): the writes there may have been acknowledged,
    /// so in a cluster this node's replicas may lack entries they once
    /// acknowledged and must not vote until caught up (kv-raft's catch-up
    /// guard). A torn last record is not here: it was never acknowledged.
    pub repaired: Vec<String>,
    /// Raft groups whose records the log holds.
    pub groups: usize,
}

/// What recovery found for the Raft groups ([`super::group`]).
#[derive(Debug, Default)]
pub(crate) struct GroupsFound {
    pub groups: BTreeMap<u32, RecoveredGroup>,
    /// Which segments hold entries the groups still need.
    pub book: GroupBook,
    /// The directory holds [`GROUPS_FILE`].
    pub marked: bool,
}

/// Recovers `dir` into `map` (empty), and the groups' logs into `found`.
pub fn recover(
    dir: &Path,
    map: &Map,
    repair: bool,
    found: &mut GroupsFound,
) -> Result<RecoveryReport, OpenError> {
    let started = Instant::now();
    found.marked = dir.join(GROUPS_FILE).exists();
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
    let mut set_aside = Vec::new();
    while let Some((seq, path)) = snapshots.pop() {
        let loaded =
            snapshot::load(&path, map).map_err(|e| OpenError::io("read snapshot", &path, e))?;
        match loaded {
            Ok(count) => {
                report.snapshot = Some((path, count));
                base = seq;
                break;
            }
            Err((offset, reason)) if repair => {
                map.clear();
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
                report.repaired.push(format!(
                    "snapshot {} set aside (corrupt at offset {offset})",
                    path.display()
                ));
                set_aside.push(PathBuf::from(aside));
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
    // Segments the snapshot covers are not read, unless groups were ever
    // logged: then they are read for their group records only. They stay
    // (the previous generation, for a fallback; or entries a group still
    // needs) until a later snapshot retires them.
    let marked = found.marked;
    let live: Vec<_> = segments
        .into_iter()
        .filter(|(seq, _)| marked || *seq >= base)
        .collect();
    // The segment read before the current one, and what the next segment
    // created will follow.
    let mut previous: Option<u64> = None;
    report.follows = base.saturating_sub(1);
    for (index, (seq, path)) in live.iter().enumerate() {
        let is_last = index + 1 == live.len();
        let groups = &mut found.groups;
        let book = &mut found.book;
        let read = reader::read_segment(
            path,
            is_last,
            repair,
            *seq >= base,
            |batch| map.apply_recovered(batch),
            |id, what| {
                match what {
                    GroupRef::Entries {
                        first_index, count, ..
                    } if count > 0 => {
                        book.wrote(*seq, id, first_index + u64::from(count) - 1);
                    }
                    GroupRef::Drop => book.dropped(id),
                    _ => {}
                }
                groups.entry(id).or_default().replay(what)
            },
        )?;
        report.cut_bytes += read.cut_bytes;
        report.records += read.records;
        report.repaired.extend(read.repaired);
        // Numbers are never reused, even those of segments removed below.
        next = next.max(seq + 1);
        check_link(
            *seq,
            path,
            read.header,
            previous,
            base,
            repair,
            &set_aside,
            &mut report,
        )?;
        if read.records == 0 && is_last {
            // Each start opens a new segment; one that got no records (a
            // restart without writes, or a kill right after one) would
            // otherwise pile up until the next snapshot. Only the last: the
            // next segment's link skips it, while a segment after an empty
            // one links to it. Best effort: a leftover empty segment is
            // harmless.
            if let Header::Linked { follows, .. } = read.header {
                report.follows = previous.unwrap_or(follows);
            }
            if let Err(error) = fs::remove_file(path) {
                log::warn!("cannot remove empty segment {}: {error}", path.display());
            }
            continue;
        }
        report.follows = *seq;
        previous = Some(*seq);
        report.segments += 1;
    }
    if report.legacy_segments > 0 {
        log::info!(
            "{} log segments have no header (written by an older version): read as before, \
             without checking that none is missing before them; segments written from now on \
             are checked",
            report.legacy_segments
        );
    }
    for (id, group) in &mut found.groups {
        if let Some((upto, _)) = &group.purged {
            found.book.purged(*id, *upto);
        }
        if let Some(hole) = group.hole_upto.take() {
            let missing = format!(
                "Raft group {id}'s log is missing entries up to index {hole}: the log \
                 continues after them, and no purge covers them"
            );
            if !repair {
                return Err(OpenError::Gap { reason: missing });
            }
            log::warn!(
                "repair: {missing}; going on with the entries after them (the group's peers \
                 hold the missing ones if a majority of them still has them)"
            );
            report.repaired.push(missing.clone());
            report.gaps.push(missing);
        }
    }
    report.groups = found.groups.len();
    report.keys = map.len();
    report.next_segment = next;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Checks that segment `seq` follows what was read before it (see the
/// module docs); a gap refuses to open, or under `repair` is noted in the
/// report and logged.
#[allow(clippy::too_many_arguments)]
fn check_link(
    seq: u64,
    path: &Path,
    header: Header,
    previous: Option<u64>,
    base: u64,
    repair: bool,
    set_aside: &[PathBuf],
    report: &mut RecoveryReport,
) -> Result<(), OpenError> {
    let follows = match header {
        Header::Legacy => {
            report.legacy_segments += 1;
            return Ok(());
        }
        Header::Damaged if repair => {
            log::warn!(
                "repair: {} has a damaged header; its records are read, but whether a \
                 segment before it is missing cannot be checked",
                path.display()
            );
            report.repaired.push(format!(
                "{} has a damaged header (a missing segment before it cannot be ruled out)",
                path.display()
            ));
            return Ok(());
        }
        Header::Damaged => {
            return Err(OpenError::Corrupt {
                file: path.to_path_buf(),
                offset: 0,
                reason: "damaged segment header".into(),
            })
        }
        Header::Linked { seq: named, .. } if named != seq => {
            return Err(OpenError::Corrupt {
                file: path.to_path_buf(),
                offset: 0,
                reason: format!("its header names segment {named}: a renamed file?"),
            })
        }
        Header::Linked { follows, .. } => follows,
    };
    let missing = match previous {
        Some(previous) if follows != previous => format!(
            "log segment {} is missing: {} follows it, but the segment before it here is {}",
            segment_name(follows),
            path.display(),
            segment_name(previous)
        ),
        None if base > 0 && follows >= base => format!(
            "log segment {} is missing: {} follows it, and snapshot {} covers only the \
             segments before {}",
            segment_name(follows),
            path.display(),
            snapshot_name(base),
            segment_name(base)
        ),
        None if base == 0 && follows != 0 => {
            let snapshots = if set_aside.is_empty() {
                "no snapshot is there to cover them".to_owned()
            } else {
                let names: Vec<_> = set_aside.iter().map(|p| p.display().to_string()).collect();
                format!(
                    "the snapshots that covered them were set aside as {}",
                    names.join(", ")
                )
            };
            format!(
                "the log before {} is missing: it follows {}, which is gone, and {snapshots}",
                path.display(),
                segment_name(follows)
            )
        }
        _ => return Ok(()),
    };
    if !repair {
        return Err(OpenError::Gap { reason: missing });
    }
    let relinked = previous.unwrap_or(base.saturating_sub(1));
    super::segment::relink(path, seq, relinked)
        .map_err(|e| OpenError::io("relink log segment", path, e))?;
    log::warn!(
        "repair: {missing}; going on without it: the writes it held are lost (the keys keep \
         their older values, or are absent). {} now follows {}",
        path.display(),
        segment_name(relinked)
    );
    report.repaired.push(missing.clone());
    report.gaps.push(missing);
    Ok(())
}
