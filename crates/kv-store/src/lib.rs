//! The storage engine behind `kv-node`: keys (UTF-8 strings) mapped to opaque
//! byte values, with no HTTP in it.
//!
//! # Design
//!
//! The Flask store guarded its dict with per-key locks. Here the map is split
//! into [`SHARD_COUNT`] shards, each a `parking_lot::RwLock<HashMap>`; a key's
//! shard is picked by its xxh3 hash. Writers to different keys rarely touch
//! the same lock, readers of one shard share it, and no lock is ever held for
//! longer than one map operation (never across an `.await`).
//!
//! Values are [`Bytes`], so a read is a reference-count increment, not a copy:
//! `kv-node` stores the exact response body a `GET` returns and serves it
//! without re-serialising anything.
//!
//! Writes are `async` because they are durable only once the write-ahead log
//! says so (see the durability work): the caller awaits the write and replies
//! after it resolves.

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::RwLock;

mod error;

pub use error::StoreError;

/// How many shards the map is split into. A power of two, so a shard is picked
/// with a mask; 64 is far more than the cores that contend for them.
pub const SHARD_COUNT: usize = 64;

type Shard = RwLock<HashMap<Box<str>, Bytes>>;

/// A thread-safe map of keys to values, shared by every connection.
pub struct Store {
    shards: Box<[Shard]>,
}

impl Default for Store {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl Store {
    /// A store that lives only in memory.
    pub fn in_memory() -> Self {
        let shards = (0..SHARD_COUNT)
            .map(|_| RwLock::new(HashMap::new()))
            .collect();
        Self { shards }
    }

    fn shard(&self, key: &str) -> &Shard {
        // The low bits of xxh3 are well mixed; SHARD_COUNT is a power of two.
        let index = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize & (SHARD_COUNT - 1);
        &self.shards[index]
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.shard(key).read().get(key).cloned()
    }

    /// Stores `value` under `key`, replacing any earlier value.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        let mut shard = self.shard(key).write();
        match shard.get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                shard.insert(Box::from(key), value);
            }
        }
        Ok(())
    }

    /// Removes `key`; `Ok(false)` if it was not there.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.shard(key).write().remove(key).is_some())
    }

    /// How many keys the store holds.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().len()).sum()
    }

    /// Whether the store holds no keys.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|shard| shard.read().is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_round_trip() {
        let store = Store::in_memory();
        assert_eq!(store.get("a"), None);
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(store.get("a"), Some(Bytes::from_static(b"1")));
        store.put("a", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(store.get("a"), Some(Bytes::from_static(b"2")));
        assert_eq!(store.len(), 1);
        assert!(store.delete("a").await.unwrap());
        assert!(!store.delete("a").await.unwrap());
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn keys_spread_over_shards() {
        let store = Store::in_memory();
        for i in 0..10_000 {
            store
                .put(&format!("key_{i}"), Bytes::from_static(b"v"))
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 10_000);
        let busiest = store.shards.iter().map(|s| s.read().len()).max().unwrap();
        // A uniform spread puts ~156 keys in each shard.
        assert!(busiest < 300, "busiest shard holds {busiest} keys");
    }
}
