//! Durability: the write-ahead log, snapshots and recovery.
//!
//! Split like fjall's journal, one concern per module:
//! * [`record`]: framing (length, header check, xxh3 checksum) shared by log
//!   segments and snapshots.
//! * `writer`: the log thread; group commit, the fsync policies, and the
//!   hand-off of each committed batch to the applier (`crate::apply`).
//! * [`group`]: Raft groups' records in the same log (entries, votes,
//!   truncations, purges), their replay, and which segments they pin.
//! * [`segment`]: the header linking each log segment to the one before.
//! * `reader`: streaming log segments and snapshots; torn tails and
//!   corruption.
//! * `snapshot`: writing and loading snapshots, the snapshot thread.
//! * `recovery`: putting a data directory back into memory on open.
//!
//! # Files in a data directory
//!
//! | file | what |
//! |---|---|
//! | `LOCK` | held (`flock`) by the process that owns the directory |
//! | `GROUPS` | present once a Raft group's record was logged ([`group`]) |
//! | `wal-<seq>.log` | log segments (a header, then records); the highest is the one being appended to |
//! | `snap-<seq>.snap` | a snapshot holding every write of the segments below `<seq>` |
//! | `snap-<seq>.snap.tmp` | a snapshot being written; removed on start if a crash left it |
//! | `*.corrupt-<offset>` | bytes `--repair` cut from a damaged segment |
//!
//! # Why a snapshot holds every committed write and nothing else
//!
//! The map holds committed writes only: the log thread applies a batch to it
//! right after the batch's commit, and never applies a batch the disk
//! refused. Snapshots need nothing more than that:
//!
//! 1. The log rotates to segment `S`: the snapshot thread creates it (synced,
//!    with its directory entry), the log thread switches to it between two
//!    batches, after applying the earlier one (only that, so writes never
//!    wait for these fsyncs), then the snapshot thread fsyncs the old
//!    segment and trims its preallocation. Every write in segments `< S` is
//!    in the map by then.
//! 2. The map is copied one shard at a time (reference-count increments under
//!    a read lock) and each shard written to `snap-S.snap.tmp` by the
//!    snapshot thread before the next is copied, while writers go on
//!    appending to segment `S`. The copy may hold some of their writes, each
//!    one already committed to segment `S`; it cannot hold a write that
//!    failed on disk, since such a write never reaches the map.
//! 3. The temp file is fsynced, renamed to `snap-S.snap`, the directory is
//!    fsynced. Only then are the segments `< S` and older snapshots deleted.
//!
//! A crash before 3 leaves a temp file (ignored) and every segment; a crash
//! after it leaves a complete snapshot and, at worst, segments it covers
//! (deleted on start). Recovery replays segment `S` over the snapshot: the
//! writes the copy already holds (a shard copied later holds more of them)
//! are repeated in log order, which ends in the same state for every key.
//!
//! # Why a lost file is noticed
//!
//! Each segment's header names the segment it follows ([`segment`]), so
//! recovery can tell a deleted middle segment, or a snapshot and the
//! segments it covered both gone, from numbers that merely skip.

use std::fs::File;
use std::io;
use std::path::Path;

pub mod group;
pub(crate) mod reader;
pub mod record;
pub(crate) mod recovery;
pub mod segment;
pub(crate) mod snapshot;
pub(crate) mod writer;

/// The lock file in a data directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// File name of log segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("wal-{seq:020}.log")
}

/// File name of the snapshot that covers the segments below `seq`.
pub fn snapshot_name(seq: u64) -> String {
    format!("snap-{seq:020}.snap")
}

/// What a file in the data directory is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    Segment(u64),
    Snapshot(u64),
    /// An unfinished snapshot.
    Temp,
    Other,
}

/// Classifies a data-directory file by its name.
pub(crate) fn classify(name: &str) -> FileKind {
    let seq = |s: &str| (s.len() == 20).then(|| s.parse::<u64>().ok()).flatten();
    if let Some(seq) = name
        .strip_prefix("wal-")
        .and_then(|s| s.strip_suffix(".log"))
        .and_then(seq)
    {
        return FileKind::Segment(seq);
    }
    if let Some(seq) = name
        .strip_prefix("snap-")
        .and_then(|s| s.strip_suffix(".snap"))
        .and_then(seq)
    {
        return FileKind::Snapshot(seq);
    }
    if name.starts_with("snap-") && name.ends_with(".snap.tmp") {
        return FileKind::Temp;
    }
    FileKind::Other
}

/// Makes renames, creations and deletions in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify_back() {
        assert_eq!(classify(&segment_name(7)), FileKind::Segment(7));
        assert_eq!(classify(&snapshot_name(9)), FileKind::Snapshot(9));
        assert_eq!(
            classify(&format!("{}.tmp", snapshot_name(9))),
            FileKind::Temp
        );
        assert_eq!(classify("wal-1.log"), FileKind::Other);
        assert_eq!(classify("LOCK"), FileKind::Other);
        assert_eq!(
            classify(&format!("{}.corrupt-12", segment_name(3))),
            FileKind::Other
        );
    }
}
