//! A key's shard (design §3).
//!
//! `shard = xxh3_64_with_seed(key, SHARD_SEED) % shards`. The function is part
//! of the on-disk format: a shard's Raft group holds exactly the keys that
//! hash to it, so changing the hash, the seed or the reduction would leave
//! every stored key in a shard that no longer owns it. It must never change;
//! `pinned_shards` below fails if it does.
//!
//! The seed keeps shard numbers independent of kv-ring's unseeded `xxh3_64`,
//! which places keys on nodes in standalone mode: keys that share a ring node
//! do not also cluster in one shard. The modulo bias of a 64-bit hash reduced
//! to at most 4096 shards is below 2⁻⁵², far below anything measurable.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The seed of the shard hash: `"kv-shard"` in ASCII. Part of the on-disk
/// format; never change it.
pub const SHARD_SEED: u64 = 0x6b76_2d73_6861_7264;

/// Most shards a cluster may have. Each shard is a Raft group with its own
/// timers and log, so far more than a node's cores times a few hundred only
/// costs memory and heartbeats; 4096 leaves room for very large clusters.
pub const MAX_SHARDS: u32 = 4096;

/// The shard (`0..shards`) that `key` belongs to. `shards` comes from a
/// validated spec (≥ 1); 0 is treated as 1 rather than dividing by zero.
#[inline]
pub fn shard_of(key: &[u8], shards: u32) -> u32 {
    let shards = u64::from(shards.max(1));
    // The remainder is < shards ≤ u32::MAX, so the cast never truncates.
    (xxh3_64_with_seed(key, SHARD_SEED) % shards) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_spells_kv_shard() {
        assert_eq!(SHARD_SEED.to_be_bytes(), *b"kv-shard");
    }

    /// Computed once from the definition. If this fails, the shard function
    /// changed and every data dir would hold keys in the wrong shard: that
    /// needs a migration, not a new vector.
    #[test]
    fn pinned_shards() {
        const VECTOR: &[(&[u8], u64, u32, u32)] = &[
            // key, xxh3 with SHARD_SEED, shard of 64, shard of 4096
            (b"", 0x9b1dcb4d9b5fe0b5, 53, 181),
            (b"key_0", 0x37218eb40d893a42, 2, 2626),
            (b"key_1", 0x82488588d914d65e, 30, 1630),
            (b"hello", 0x4608ce6bc03c35bd, 61, 1469),
            (b"user:1001", 0x88cf93bcc7911f2d, 45, 3885),
            ("caf\u{e9}".as_bytes(), 0xbd20242806db4bdb, 27, 3035),
            (b"0123456789abcdef", 0xb64e41e5d5f8c883, 3, 2179),
        ];
        for &(key, hash, of64, of4096) in VECTOR {
            assert_eq!(xxh3_64_with_seed(key, SHARD_SEED), hash, "hash of {key:?}");
            assert_eq!(shard_of(key, 64), of64, "{key:?} of 64");
            assert_eq!(shard_of(key, 4096), of4096, "{key:?} of 4096");
        }
        // And a fingerprint of 10,000 keys' shards, so a change anywhere shows.
        let mut fold: u64 = 0;
        for i in 0..10_000 {
            let shard = shard_of(format!("key_{i}").as_bytes(), 64);
            fold = fold.wrapping_mul(31).wrapping_add(u64::from(shard));
        }
        assert_eq!(fold, 0xeb74d6ffa8bc3d80);
    }

    #[test]
    fn shards_are_in_range_and_even() {
        assert_eq!(shard_of(b"anything", 1), 0);
        assert_eq!(shard_of(b"anything", 0), 0);
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            let shard = shard_of(format!("user:{i}").as_bytes(), 64);
            counts[shard as usize] += 1;
        }
        // 1,000 expected per shard; a binomial sd of ~31, so ±20% is > 6 sd:
        // a failure here means a broken hash, not bad luck (the inputs are
        // fixed, so this is deterministic anyway).
        for (shard, &count) in counts.iter().enumerate() {
            assert!((800..=1200).contains(&count), "shard {shard}: {count}");
        }
    }
}
