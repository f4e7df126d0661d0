//! The sharded in-memory map.
//!
//! The Flask store guarded its dict with per-key locks. Here the map is split
//! into [`SHARD_COUNT`] shards, each a `parking_lot::RwLock` around a
//! `hashbrown::HashTable` of [`Entry`]s; a key's shard is picked by its xxh3
//! hash. Writers to different keys rarely touch the same lock, readers of one
//! shard share it, and no lock is held across an `.await`.
//!
//! The shard is chosen from bits 32.. of the hash, while the table uses the
//! low bits (bucket index) and the top 7 bits (control tag): reusing the same
//! bits would leave all keys of a shard sharing their home buckets or tags.

use hashbrown::HashTable;
use parking_lot::{RwLock, RwLockWriteGuard};

use crate::entry::{self, Entry};

/// How many shards the map is split into. A power of two, so a shard is picked
/// with a mask; 64 is far more than the cores that contend for them.
pub const SHARD_COUNT: usize = 64;

/// One shard's table.
pub type Table = HashTable<Entry>;

/// The map: shards of entries. A [`crate::Store`]'s map holds committed
/// writes only: the log thread changes it through the applier (`apply`)
/// after each commit (recovery before the store opens), so readers just
/// read. kv-raft's state machine owns maps of its own and applies
/// committed Raft entries to them with [`Map::insert`] and [`Map::remove`].
pub struct Map {
    /// Exactly [`SHARD_COUNT`] of them; reached through [`Map::shard`].
    shards: Box<[RwLock<Table>; SHARD_COUNT]>,
}

/// A change read back from a snapshot or the log.
#[derive(Clone, Copy)]
pub enum Change<'a> {
    /// Store this entry (`[key len][key][value]`).
    Put(&'a [u8]),
    /// Store this entry, whose key is not in the map (a snapshot's).
    PutNew(&'a [u8]),
    /// Remove this key.
    Delete(&'a [u8]),
}

/// A [`Change`] with its key's hash, computed while reading.
pub struct Recovered<'a> {
    pub hash: u64,
    pub what: Change<'a>,
}

impl<'a> Recovered<'a> {
    /// `body` must be a well-formed entry.
    pub fn new(what: Change<'a>) -> Self {
        let mut change = Self { hash: 0, what };
        change.hash = hash(change.key());
        change
    }

    /// The key the change is about.
    pub fn key(&self) -> &'a [u8] {
        match self.what {
            Change::Put(body) | Change::PutNew(body) => entry::key(body),
            Change::Delete(key) => key,
        }
    }
}

/// The hash every table and the shard choice use.
///
/// Seeded once per process at random: keys come from the network, and with a
/// fixed hash a client could pick keys that all land in one shard and one
/// probe sequence (hash flooding). Nothing on disk depends on this hash.
pub fn hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, seed())
}

fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        use std::hash::BuildHasher;
        // std's RandomState is seeded from the OS's randomness.
        std::collections::hash_map::RandomState::new().hash_one(0x6b76_u64)
    })
}

fn entry_hash(entry: &Entry) -> u64 {
    hash(entry::key(entry))
}

impl Default for Map {
    fn default() -> Self {
        Self::new()
    }
}

impl Map {
    pub fn new() -> Self {
        let shards = Box::new(std::array::from_fn(|_| RwLock::new(HashTable::new())));
        Self { shards }
    }

    /// The shard of a key whose hash is `hash`.
    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<Table> {
        self.shard_at(Self::shard_index(hash))
    }

    /// Shard `index`, which [`Map::shard_index`] keeps below [`SHARD_COUNT`].
    #[inline]
    #[allow(clippy::indexing_slicing)] // why: masked to SHARD_COUNT - 1, the array's length
    fn shard_at(&self, index: usize) -> &RwLock<Table> {
        &self.shards[index & (SHARD_COUNT - 1)]
    }

    fn shard_index(hash: u64) -> usize {
        (hash >> 32) as usize & (SHARD_COUNT - 1)
    }

    /// The write lock of `key`'s shard, and the key's hash.
    pub(crate) fn lock(&self, key: &[u8]) -> (RwLockWriteGuard<'_, Table>, u64) {
        let hash = hash(key);
        (self.shard(hash).write(), hash)
    }

    /// The entry stored under `key`.
    pub(crate) fn get_entry(&self, key: &[u8]) -> Option<Entry> {
        let hash = hash(key);
        self.shard(hash)
            .read()
            .find(hash, |e| entry::key(e) == key)
            .cloned()
    }

    /// Stores `entry` in its (locked) shard, replacing any entry of its
    /// key; whether there was one.
    pub(crate) fn insert_in(table: &mut Table, hash: u64, entry: Entry) -> bool {
        let key = entry::key(&entry);
        match table.find_mut(hash, |e| entry::key(e) == key) {
            Some(slot) => {
                *slot = entry;
                true
            }
            None => {
                table.insert_unique(hash, entry, entry_hash);
                false
            }
        }
    }

    /// Removes `key` from its (locked) shard; whether it was there.
    pub(crate) fn remove_in(table: &mut Table, hash: u64, key: &[u8]) -> bool {
        match table.find_entry(hash, |e| entry::key(e) == key) {
            Ok(found) => {
                found.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Applies recovered changes, in order per key, using every core: each
    /// thread owns a disjoint set of shards (all of a key's changes are in
    /// its shard, so their order holds) and no lock is ever contended.
    pub(crate) fn apply_recovered(&self, changes: &[Recovered<'_>]) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let run = |part: usize, parts: usize| {
            for change in changes {
                let index = Self::shard_index(change.hash);
                if index % parts != part {
                    continue;
                }
                let mut table = self.shard_at(index).write();
                match change.what {
                    Change::Put(body) => {
                        Self::insert_in(&mut table, change.hash, Entry::from(body));
                    }
                    Change::PutNew(body) => {
                        table.insert_unique(change.hash, Entry::from(body), entry_hash);
                    }
                    Change::Delete(key) => {
                        Self::remove_in(&mut table, change.hash, key);
                    }
                }
            }
        };
        if threads == 1 || changes.len() < 10_000 {
            run(0, 1);
        } else {
            std::thread::scope(|scope| {
                for part in 0..threads {
                    scope.spawn(move || run(part, threads));
                }
            });
        }
    }

    /// Makes room for about `keys` keys spread over the shards.
    pub(crate) fn reserve(&self, keys: usize) {
        let per_shard = keys / SHARD_COUNT + keys / SHARD_COUNT / 8 + 1;
        for shard in self.shards.iter() {
            shard.write().reserve(per_shard, entry_hash);
        }
    }

    /// Replaces `out`'s contents with a copy of shard `index`'s entries
    /// (reference-count increments under its read lock): a snapshot copies
    /// and writes one shard at a time.
    pub(crate) fn copy_shard(&self, index: usize, out: &mut Vec<Entry>) {
        out.clear();
        if let Some(shard) = self.shards.get(index) {
            let table = shard.read();
            out.reserve(table.len());
            out.extend(table.iter().cloned());
        }
    }

    /// Empties the map (recovery falling back to an older snapshot).
    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            shard.write().clear();
        }
    }

    /// The value stored under `key`, sharing the entry's allocation: a
    /// lookup under a read lock that never waits for a writer for long.
    pub fn get(&self, key: &[u8]) -> Option<bytes::Bytes> {
        self.get_entry(key).map(|e| entry::value_bytes(&e))
    }

    /// Stores `value` under `key`, replacing any earlier value; whether
    /// there was one. Refuses a key longer than [`entry::MAX_KEY_BYTES`].
    ///
    /// For a caller that applies committed writes itself (kv-raft's state
    /// machine); a [`crate::Store`]'s own map changes only through its log.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<bool, crate::StoreError> {
        let new = entry::new(key, value).ok_or(crate::StoreError::KeyTooLong(key.len()))?;
        let (mut table, hash) = self.lock(key);
        Ok(Self::insert_in(&mut table, hash, new))
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: &[u8]) -> bool {
        let (mut table, hash) = self.lock(key);
        Self::remove_in(&mut table, hash, key)
    }

    /// A copy of every entry (reference-count increments, one lock stripe
    /// at a time): a consistent copy when no writer runs meanwhile, e.g.
    /// taken between two applied batches of a Raft state machine.
    pub fn copy_all(&self) -> Vec<Entry> {
        let mut all = Vec::with_capacity(self.len());
        let mut stripe = Vec::new();
        for index in 0..SHARD_COUNT {
            self.copy_shard(index, &mut stripe);
            all.append(&mut stripe);
        }
        all
    }

    /// How many keys the map holds.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().len()).sum()
    }

    /// Whether the map holds no keys.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|shard| shard.read().is_empty())
    }

    /// Keys in the busiest shard (tests check the spread).
    #[cfg(test)]
    pub fn busiest_shard(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().len())
            .max()
            .unwrap_or(0)
    }
}
