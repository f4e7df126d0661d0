//! Raft groups' records in the one write-ahead log.
//!
//! A node hosts many Raft groups (one per shard it replicates) and they all
//! append through this store's single log, so one group commit (one
//! `fdatasync` under `always`) makes many groups' appends durable at once.
//! kv-store knows nothing of Raft: entries, votes and log ids are opaque
//! bytes (kv-raft encodes them), and group records never touch the map
//! (the Raft state machine applies committed entries itself, later).
//!
//! # Records
//!
//! Every body starts with the group id (`u32 LE`); framing and checksums are
//! the log's own ([`super::record`]), so a torn tail cuts a suffix of whole
//! records: a group loses a suffix of its log, never a middle, and never
//! half of one [`GroupRecord`].
//!
//! | kind | body after the group id |
//! |---|---|
//! | `GroupEntries = 4` | `first_index u64`, `count u32`, `count × [len u32][entry]` (consecutive indexes) |
//! | `GroupVote = 5` | vote bytes |
//! | `GroupCommitted = 6` | log-id bytes |
//! | `GroupTruncate = 7` | `after u64` (`u64::MAX`: drop everything) |
//! | `GroupPurge = 8` | `upto u64`, log-id bytes |
//! | `GroupDrop = 9` | nothing (`docs/membership.md` §5) |
//!
//! # Replay
//!
//! Recovery reads the log in order and keeps, per group, the last vote,
//! committed and purge record, and the entries after the purge:
//! * entries at `first_index` first drop every entry `≥ first_index` (a new
//!   leader overwriting a suffix), then append; entries at or below the
//!   purged index are skipped.
//! * entries that start past the last entry (or the purged index) leave a
//!   hole: the segments that held the missing entries were retired because
//!   a *later* purge covers them. The entries before the hole are dropped,
//!   and a purge read later must cover the hole; one still open at the end
//!   of the log is damage ([`crate::OpenError::Gap`]), not a state Raft can
//!   produce.
//! * a truncate drops the entries after `after`; a purge drops those at or
//!   below `upto`.
//! * a drop forgets everything recovered so far for the group (the replica
//!   left this node); records after it are a new incarnation (the node was
//!   added back). A group whose last record is a drop is reported with
//!   [`RecoveredGroup::dropped`] set, so its owner deletes leftover files
//!   rather than load them.
//!
//! # Which segments stay
//!
//! Each new segment starts with a **checkpoint**: the writer writes again the
//! last vote, committed and purge record of every group it knows, and syncs
//! it, before any other record goes there. So a segment older than the
//! active one is needed only for the group *entries* it holds. The writer
//! keeps, per segment, the highest entry index each group wrote into it
//! (`GroupBook`); a segment may be deleted only if every segment before it
//! may be, and each of them holds only entries at or below its group's
//! purged index (the purge counts once its record is committed). Deleting
//! a prefix of whole segments keeps replay exact: every record after the
//! first segment kept is still read, and what the deleted prefix held is
//! either purged or restated by a later checkpoint.
//!
//! A dropped group's entries before its drop no longer count (the drop,
//! once committed, removes them from the book), and its checkpoint restates
//! only the drop itself (one empty record per segment) until the group is
//! written again: so its old entries stop pinning segments, and a
//! recovery never sees the old incarnation without the drop after it, even
//! once the drop's own segment is retired.
//!
//! A data directory where a group record was ever written holds the file
//! [`GROUPS_FILE`]; only then does recovery read the segments a snapshot of
//! the map covers (for their group records), so a standalone store's start
//! reads exactly what it read before groups existed.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;

use super::record::{self, Kind};
use crate::StoreError;

/// Marks a data directory whose log holds group records.
pub const GROUPS_FILE: &str = "GROUPS";

/// Called once the batch holding a group record is committed (for `always`,
/// after its `fdatasync`), or with why it never will be.
pub type GroupDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One call of a Raft group's log storage, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupRecord {
    /// Entries at consecutive indexes from `first_index`.
    Entries {
        first_index: u64,
        entries: Vec<Bytes>,
    },
    /// The group's vote (durable before `save_vote` returns).
    Vote(Bytes),
    /// The group's committed log id.
    Committed(Bytes),
    /// Drop the entries after this index (`None`: all of them).
    TruncateAfter(Option<u64>),
    /// Drop the entries at or below `upto`, whose log id is `log_id`.
    Purge { upto: u64, log_id: Bytes },
    /// The group's replica left this node: everything logged for it before
    /// is forgotten. The caller writes nothing else for the group until
    /// this record's `done` ran (its Raft is shut down first).
    Drop,
}

impl GroupRecord {
    fn kind(&self) -> Kind {
        match self {
            GroupRecord::Entries { .. } => Kind::GroupEntries,
            GroupRecord::Vote(_) => Kind::GroupVote,
            GroupRecord::Committed(_) => Kind::GroupCommitted,
            GroupRecord::TruncateAfter(_) => Kind::GroupTruncate,
            GroupRecord::Purge { .. } => Kind::GroupPurge,
            GroupRecord::Drop => Kind::GroupDrop,
        }
    }

    /// The framed body's length (kind byte included).
    fn payload_len(&self) -> usize {
        1 + 4
            + match self {
                GroupRecord::Entries { entries, .. } => {
                    12 + entries.iter().map(|e| 4 + e.len()).sum::<usize>()
                }
                GroupRecord::Vote(b) | GroupRecord::Committed(b) => b.len(),
                GroupRecord::TruncateAfter(_) => 8,
                GroupRecord::Purge { log_id, .. } => 8 + log_id.len(),
                GroupRecord::Drop => 0,
            }
    }

    /// Refuses what one log record cannot frame (split larger appends).
    pub(crate) fn check_size(&self) -> Result<(), StoreError> {
        let len = self.payload_len();
        let too_long_entry = match self {
            GroupRecord::Entries { entries, .. } => {
                entries.len() > u32::MAX as usize
                    || entries.iter().any(|e| e.len() > u32::MAX as usize)
            }
            _ => false,
        };
        if len > record::MAX_PAYLOAD || too_long_entry {
            return Err(StoreError::TooLarge {
                len,
                max: record::MAX_PAYLOAD,
            });
        }
        Ok(())
    }

    /// Frames the record for `group` onto `out`.
    pub(crate) fn encode(&self, group: u32, out: &mut Vec<u8>) {
        let mut body = Vec::with_capacity(self.payload_len());
        body.extend_from_slice(&group.to_le_bytes());
        match self {
            GroupRecord::Entries {
                first_index,
                entries,
            } => {
                body.extend_from_slice(&first_index.to_le_bytes());
                body.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for entry in entries {
                    body.extend_from_slice(&(entry.len() as u32).to_le_bytes());
                    body.extend_from_slice(entry);
                }
            }
            GroupRecord::Vote(b) | GroupRecord::Committed(b) => body.extend_from_slice(b),
            GroupRecord::TruncateAfter(after) => {
                body.extend_from_slice(&after.unwrap_or(u64::MAX).to_le_bytes());
            }
            GroupRecord::Purge { upto, log_id } => {
                body.extend_from_slice(&upto.to_le_bytes());
                body.extend_from_slice(log_id);
            }
            GroupRecord::Drop => {}
        }
        record::encode(out, self.kind(), &body);
    }

    /// The last entry index this record writes, if it writes entries.
    pub(crate) fn last_index(&self) -> Option<u64> {
        match self {
            GroupRecord::Entries {
                first_index,
                entries,
            } if !entries.is_empty() => Some(first_index + entries.len() as u64 - 1),
            _ => None,
        }
    }
}

/// A group record read from the log, borrowing the read buffer.
#[derive(Debug)]
pub enum GroupRef<'a> {
    /// Entries from `first_index`: the raw `[len u32][entry]` list (checked).
    Entries {
        first_index: u64,
        count: u32,
        list: &'a [u8],
    },
    Vote(&'a [u8]),
    Committed(&'a [u8]),
    TruncateAfter(Option<u64>),
    Purge {
        upto: u64,
        log_id: &'a [u8],
    },
    Drop,
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let mut out = [0; 8];
    out.copy_from_slice(bytes.get(at..at + 8)?);
    Some(u64::from_le_bytes(out))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let mut out = [0; 4];
    out.copy_from_slice(bytes.get(at..at + 4)?);
    Some(u32::from_le_bytes(out))
}

/// Decodes a group record's body: its group and what it says; `Err` says
/// why a well-checksummed record makes no sense.
pub(crate) fn decode(kind: Kind, body: &[u8]) -> Result<(u32, GroupRef<'_>), &'static str> {
    let group = u32_at(body, 0).ok_or("group record without a group id")?;
    let rest = body.get(4..).unwrap_or_default();
    let what = match kind {
        Kind::GroupEntries => {
            let first_index = u64_at(rest, 0).ok_or("malformed group entries record")?;
            let count = u32_at(rest, 8).ok_or("malformed group entries record")?;
            let list = rest.get(12..).unwrap_or_default();
            // Walk the list once so replay can trust it.
            let mut at = 0usize;
            for _ in 0..count {
                let len = u32_at(list, at).ok_or("malformed group entries record")? as usize;
                at = at
                    .checked_add(4 + len)
                    .filter(|&end| end <= list.len())
                    .ok_or("malformed group entries record")?;
            }
            if at != list.len() {
                return Err("malformed group entries record");
            }
            if first_index.checked_add(u64::from(count)).is_none() {
                return Err("group entries past the largest index");
            }
            GroupRef::Entries {
                first_index,
                count,
                list,
            }
        }
        Kind::GroupVote => GroupRef::Vote(rest),
        Kind::GroupCommitted => GroupRef::Committed(rest),
        Kind::GroupTruncate => {
            let after = u64_at(rest, 0)
                .filter(|_| rest.len() == 8)
                .ok_or("malformed group truncate record")?;
            GroupRef::TruncateAfter((after != u64::MAX).then_some(after))
        }
        Kind::GroupPurge => GroupRef::Purge {
            upto: u64_at(rest, 0).ok_or("malformed group purge record")?,
            log_id: rest.get(8..).unwrap_or_default(),
        },
        Kind::GroupDrop if rest.is_empty() => GroupRef::Drop,
        Kind::GroupDrop => return Err("malformed group drop record"),
        Kind::Put | Kind::Delete | Kind::End => return Err("not a group record"),
    };
    Ok((group, what))
}

/// What recovery found for one group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveredGroup {
    pub vote: Option<Bytes>,
    pub committed: Option<Bytes>,
    /// The purged index and its log id.
    pub purged: Option<(u64, Bytes)>,
    /// The entries after `purged`, at consecutive indexes.
    pub entries: VecDeque<(u64, Bytes)>,
    /// The last record is a drop: the replica left this node, nothing
    /// above is set, and files it left behind are to be deleted.
    pub dropped: bool,
    /// While replaying: the index a later purge must reach to cover a hole.
    pub(crate) hole_upto: Option<u64>,
}

impl RecoveredGroup {
    fn last_index(&self) -> Option<u64> {
        self.entries
            .back()
            .map(|(i, _)| *i)
            .or(self.purged.as_ref().map(|(i, _)| *i))
    }

    /// Replays one record (`Err`: it makes no sense here; none does yet,
    /// since a hole is judged only at the end of the log).
    pub(crate) fn replay(&mut self, what: GroupRef<'_>) -> Result<(), &'static str> {
        // Any record after a drop starts a new incarnation.
        self.dropped = false;
        match what {
            GroupRef::Entries {
                first_index,
                count,
                list,
            } => {
                while self.entries.back().is_some_and(|(i, _)| *i >= first_index) {
                    self.entries.pop_back();
                }
                if count > 0 {
                    if let Some(last) = self.last_index() {
                        if first_index > last + 1 {
                            // Retired segments held the missing entries;
                            // a later purge must say they were not needed.
                            self.entries.clear();
                            let upto = first_index - 1;
                            self.hole_upto = Some(self.hole_upto.map_or(upto, |h| h.max(upto)));
                        }
                    }
                }
                let purged = self.purged.as_ref().map(|(i, _)| *i);
                let mut at = 0usize;
                for n in 0..u64::from(count) {
                    // Lengths were checked by `decode`.
                    let len = u32_at(list, at).unwrap_or(0) as usize;
                    let index = first_index + n;
                    if purged.is_none_or(|p| index > p) {
                        let Some(entry) = list.get(at + 4..at + 4 + len) else {
                            break;
                        };
                        self.entries
                            .push_back((index, Bytes::copy_from_slice(entry)));
                    }
                    at += 4 + len;
                }
            }
            GroupRef::Vote(v) => self.vote = Some(Bytes::copy_from_slice(v)),
            GroupRef::Committed(c) => self.committed = Some(Bytes::copy_from_slice(c)),
            GroupRef::TruncateAfter(after) => match after {
                None => self.entries.clear(),
                Some(after) => {
                    while self.entries.back().is_some_and(|(i, _)| *i > after) {
                        self.entries.pop_back();
                    }
                }
            },
            GroupRef::Purge { upto, log_id } => {
                while self.entries.front().is_some_and(|(i, _)| *i <= upto) {
                    self.entries.pop_front();
                }
                if self.purged.as_ref().is_none_or(|(p, _)| *p <= upto) {
                    self.purged = Some((upto, Bytes::copy_from_slice(log_id)));
                }
                if self.hole_upto.is_some_and(|h| h <= upto) {
                    self.hole_upto = None;
                }
            }
            // A hole in the dropped incarnation needs no purge any more.
            GroupRef::Drop => {
                *self = RecoveredGroup {
                    dropped: true,
                    ..RecoveredGroup::default()
                }
            }
        }
        Ok(())
    }

    /// The records restating this group's vote, committed and purge, for a
    /// segment's checkpoint.
    pub(crate) fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            dropped: self.dropped,
            vote: self.vote.clone().map(GroupRecord::Vote),
            committed: self.committed.clone().map(GroupRecord::Committed),
            purge: self
                .purged
                .clone()
                .map(|(upto, log_id)| GroupRecord::Purge { upto, log_id }),
        }
    }
}

/// The last vote, committed and purge record of a group, written again at
/// the start of each new segment.
#[derive(Clone, Debug, Default)]
pub(crate) struct Checkpoint {
    /// The group's last record is a drop: restate only that.
    dropped: bool,
    vote: Option<GroupRecord>,
    committed: Option<GroupRecord>,
    purge: Option<GroupRecord>,
}

impl Checkpoint {
    /// Notes `record` if it is one a checkpoint restates.
    pub(crate) fn note(&mut self, record: &GroupRecord) {
        self.dropped = false;
        match record {
            GroupRecord::Drop => {
                *self = Checkpoint {
                    dropped: true,
                    ..Checkpoint::default()
                }
            }
            GroupRecord::Vote(_) => self.vote = Some(record.clone()),
            GroupRecord::Committed(_) => self.committed = Some(record.clone()),
            GroupRecord::Purge { upto, .. } => {
                let newer = match &self.purge {
                    Some(GroupRecord::Purge { upto: old, .. }) => upto >= old,
                    _ => true,
                };
                if newer {
                    self.purge = Some(record.clone());
                }
            }
            GroupRecord::Entries { .. } | GroupRecord::TruncateAfter(_) => {}
        }
    }

    /// Frames the checkpoint of `group` onto `out`; how many records.
    pub(crate) fn encode(&self, group: u32, out: &mut Vec<u8>) -> u64 {
        if self.dropped {
            GroupRecord::Drop.encode(group, out);
            return 1;
        }
        let mut count = 0;
        for record in [&self.vote, &self.committed, &self.purge]
            .into_iter()
            .flatten()
        {
            record.encode(group, out);
            count += 1;
        }
        count
    }
}

/// Which segments hold group entries a group still needs (see the module
/// docs), shared by the log thread (which writes it) and the snapshot
/// thread (which retires segments by it).
#[derive(Debug, Default)]
pub(crate) struct GroupBook {
    /// Per segment, the highest entry index each group wrote into it.
    segments: BTreeMap<u64, HashMap<u32, u64>>,
    /// Per group, the highest committed purge.
    purged: HashMap<u32, u64>,
}

impl GroupBook {
    /// Segment `seq` holds entries of `group` up to `last`.
    pub(crate) fn wrote(&mut self, seq: u64, group: u32, last: u64) {
        let top = self
            .segments
            .entry(seq)
            .or_default()
            .entry(group)
            .or_insert(0);
        *top = (*top).max(last);
    }

    /// `group` purged up to `upto` (committed).
    pub(crate) fn purged(&mut self, group: u32, upto: u64) {
        let purged = self.purged.entry(group).or_insert(0);
        *purged = (*purged).max(upto);
    }

    /// `group` was dropped (committed): the entries it wrote so far are
    /// needed no more, and a new incarnation starts unpurged.
    pub(crate) fn dropped(&mut self, group: u32) {
        for tops in self.segments.values_mut() {
            tops.remove(&group);
        }
        self.purged.remove(&group);
    }

    /// The first segment that must stay for the groups' sake (`None`:
    /// none must).
    pub(crate) fn keep_from(&self) -> Option<u64> {
        self.segments
            .iter()
            .find(|(_, tops)| {
                tops.iter()
                    .any(|(group, top)| self.purged.get(group).is_none_or(|p| top > p))
            })
            .map(|(seq, _)| *seq)
    }

    /// Forgets segments below `seq` (deleted).
    pub(crate) fn forget_below(&mut self, seq: u64) {
        self.segments = self.segments.split_off(&seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay_all(records: &[GroupRecord]) -> Result<BTreeMap<u32, RecoveredGroup>, &'static str> {
        let mut buf = Vec::new();
        for (n, r) in records.iter().enumerate() {
            r.encode(n as u32 % 2, &mut buf);
        }
        let mut groups = BTreeMap::<u32, RecoveredGroup>::new();
        let mut at = 0;
        while let Some(rec) = record::decode(&buf[at..]).map_err(|d| d.describe())? {
            let (group, what) = decode(rec.kind, rec.body)?;
            groups.entry(group).or_default().replay(what)?;
            at += rec.framed_len;
        }
        Ok(groups)
    }

    fn entries(first_index: u64, n: u64) -> GroupRecord {
        GroupRecord::Entries {
            first_index,
            entries: (first_index..first_index + n)
                .map(|i| Bytes::from(format!("e{i}")))
                .collect(),
        }
    }

    #[test]
    fn replay_applies_overwrites_truncates_and_purges() {
        // Records alternate between groups 0 and 1 (see `replay_all`).
        let groups = replay_all(&[
            entries(1, 5),                        // g0: 1..=5
            GroupRecord::Vote(Bytes::from("v1")), // g1
            entries(3, 2),                        // g0: 1, 2, then 3, 4 again
            GroupRecord::Vote(Bytes::from("v2")), // g1
            GroupRecord::TruncateAfter(Some(3)),  // g0: 1..=3
            entries(1, 3),                        // g1: 1..=3
            GroupRecord::Purge {
                upto: 2,
                log_id: Bytes::from("l2"),
            }, // g0: 3
            GroupRecord::TruncateAfter(None),     // g1: nothing
            entries(4, 1),                        // g0: 3, 4
        ])
        .unwrap();
        let g0 = &groups[&0];
        assert_eq!(
            g0.entries.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(g0.purged, Some((2, Bytes::from("l2"))));
        let g1 = &groups[&1];
        assert_eq!(g1.vote, Some(Bytes::from("v2")));
        assert!(g1.entries.is_empty());
    }

    #[test]
    fn a_hole_stays_open_until_a_later_purge_covers_it() {
        let groups = replay_all(&[
            entries(1, 2),
            GroupRecord::Vote(Bytes::new()),
            entries(5, 1),
        ])
        .unwrap();
        assert_eq!(groups[&0].hole_upto, Some(4));
        let groups = replay_all(&[
            entries(1, 2),
            GroupRecord::Vote(Bytes::new()),
            entries(5, 2),
            GroupRecord::Vote(Bytes::new()),
            GroupRecord::Purge {
                upto: 5,
                log_id: Bytes::new(),
            },
        ])
        .unwrap();
        assert_eq!(groups[&0].hole_upto, None);
        assert_eq!(
            groups[&0].entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            [6]
        );
    }

    #[test]
    fn a_drop_forgets_the_group_and_a_later_record_starts_anew() {
        // Records alternate between groups 0 and 1 (see `replay_all`).
        let groups = replay_all(&[
            entries(1, 3),                        // g0
            GroupRecord::Vote(Bytes::from("v1")), // g1
            GroupRecord::Vote(Bytes::from("v0")), // g0
            entries(1, 1),                        // g1
            GroupRecord::Drop,                    // g0
            GroupRecord::Drop,                    // g1
        ])
        .unwrap();
        for id in [0, 1] {
            assert_eq!(
                groups[&id],
                RecoveredGroup {
                    dropped: true,
                    ..RecoveredGroup::default()
                }
            );
        }
        let groups = replay_all(&[
            entries(1, 3),     // g0
            entries(1, 3),     // g1
            GroupRecord::Drop, // g0
            entries(9, 1),     // g1: a hole
            GroupRecord::Purge {
                upto: 10,
                log_id: Bytes::from("l10"),
            }, // g0: added back, from a snapshot at 10
            GroupRecord::Drop, // g1: the hole goes with the rest
            entries(11, 2),    // g0
        ])
        .unwrap();
        let g0 = &groups[&0];
        assert!(!g0.dropped);
        assert_eq!(g0.purged, Some((10, Bytes::from("l10"))));
        assert_eq!(
            g0.entries.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [11, 12]
        );
        assert!(groups[&1].dropped);
        assert_eq!(groups[&1].hole_upto, None);
    }

    #[test]
    fn a_dropped_checkpoint_restates_only_the_drop() {
        let mut checkpoint = Checkpoint::default();
        checkpoint.note(&GroupRecord::Vote(Bytes::from("v")));
        checkpoint.note(&GroupRecord::Drop);
        let mut buf = Vec::new();
        assert_eq!(checkpoint.encode(3, &mut buf), 1);
        let rec = record::decode(&buf).unwrap().unwrap();
        assert_eq!(rec.framed_len, buf.len());
        assert!(matches!(
            decode(rec.kind, rec.body),
            Ok((3, GroupRef::Drop))
        ));
        checkpoint.note(&GroupRecord::Committed(Bytes::from("c")));
        buf.clear();
        assert_eq!(checkpoint.encode(3, &mut buf), 1);
        let rec = record::decode(&buf).unwrap().unwrap();
        assert_eq!(rec.kind, Kind::GroupCommitted);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let mut buf = Vec::new();
        entries(1, 2).encode(7, &mut buf);
        let rec = record::decode(&buf).unwrap().unwrap();
        let (group, _) = decode(rec.kind, rec.body).unwrap();
        assert_eq!(group, 7);
        for cut in 0..rec.body.len() {
            assert!(decode(rec.kind, &rec.body[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn the_book_keeps_a_prefix_until_purged() {
        let mut book = GroupBook::default();
        book.wrote(1, 0, 10);
        book.wrote(2, 1, 5);
        book.wrote(3, 0, 20);
        assert_eq!(book.keep_from(), Some(1));
        book.purged(0, 10);
        assert_eq!(book.keep_from(), Some(2));
        book.purged(1, 5);
        assert_eq!(book.keep_from(), Some(3));
        book.purged(0, 25);
        assert_eq!(book.keep_from(), None);
        book.forget_below(3);
        assert_eq!(book.segments.len(), 1);
    }

    #[test]
    fn a_drop_unpins_the_groups_segments_and_a_new_incarnation_pins_again() {
        let mut book = GroupBook::default();
        book.wrote(1, 0, 10);
        book.wrote(2, 1, 5);
        book.purged(0, 4);
        assert_eq!(book.keep_from(), Some(1));
        book.dropped(0);
        assert_eq!(book.keep_from(), Some(2));
        book.dropped(1);
        assert_eq!(book.keep_from(), None);
        // Added back: its entries count again, from no purge.
        book.wrote(3, 0, 2);
        assert_eq!(book.keep_from(), Some(3));
    }
}
