//! The state machine: applies committed operations to the map, in log order.
//!
//! The log thread ([`crate::journal::writer`]) calls [`Apply::apply`] with
//! each batch right after the batch is committed (written, and for `always`
//! fdatasynced), and never with a batch the disk refused. The interface is
//! kept to that one call, "apply this batch of committed operations, return
//! each one's outcome", because it is exactly what a Raft state machine is
//! asked to do with committed log entries: replication will make the
//! applier the state machine of openraft without changing the map or the
//! read path.
//!
//! Two promises follow from applying only here, in log order:
//! * the map holds committed writes only, so a reader (who only reads the
//!   map) never sees a write a crash could take back, and a snapshot (a copy
//!   of the map) never holds one either;
//! * an op's outcome (did its key exist?) is decided in log order, so a
//!   DELETE's 200 or 404 matches the order a restart replays.

use crate::entry::{self, Entry};
use crate::map::Map;

/// A change to the store, as logged and applied.
pub(crate) enum Op {
    /// The entry's key now holds the entry's value.
    Put(Entry),
    /// The key is gone.
    Delete(Box<[u8]>),
}

/// Applies batches of committed operations.
pub(crate) trait Apply: Send + Sync {
    /// Applies every op of `batch` in order, draining it, and pushes one
    /// outcome per op onto `outcomes`: whether the op's key held a value
    /// just before it (a PUT replaced one; a DELETE found its key).
    fn apply(&self, batch: &mut Vec<Op>, outcomes: &mut Vec<bool>);
}

impl Apply for Map {
    fn apply(&self, batch: &mut Vec<Op>, outcomes: &mut Vec<bool>) {
        outcomes.reserve(batch.len());
        for op in batch.drain(..) {
            outcomes.push(self.apply_one(op));
        }
    }
}

impl Map {
    /// Applies one op under its shard's write lock; whether its key was there.
    pub(crate) fn apply_one(&self, op: Op) -> bool {
        match op {
            Op::Put(new) => {
                let (mut table, hash) = self.lock(entry::key(&new));
                Map::insert_in(&mut table, hash, new)
            }
            Op::Delete(key) => {
                let (mut table, hash) = self.lock(&key);
                Map::remove_in(&mut table, hash, &key)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_batch_order() {
        let map = Map::new();
        let put = |value: &[u8]| Op::Put(entry::new(b"k", value).unwrap_or_else(|| unreachable!()));
        let mut batch = vec![
            Op::Delete(b"k".as_slice().into()),
            put(b"1"),
            put(b"2"),
            Op::Delete(b"k".as_slice().into()),
            Op::Delete(b"k".as_slice().into()),
        ];
        let mut outcomes = Vec::new();
        map.apply(&mut batch, &mut outcomes);
        assert!(batch.is_empty());
        assert_eq!(outcomes, [false, false, true, true, false]);
        assert!(map.is_empty());
    }
}
