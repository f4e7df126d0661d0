//! A consistent-hash ring with virtual nodes, hashed with xxh3.
//!
//! Each node is placed on a 64-bit ring at `vnodes` points, the xxh3 hashes of
//! `"<node>#<i>"`. A key belongs to the node of the first point at or after the
//! key's own xxh3 hash, wrapping around past the top. The points are sorted
//! once into a boxed slice and searched by binary search, as pingora's
//! load-balancing ring does, narrowed first by a bucket index on the hash's
//! top bits (so a lookup touches one or two points, not ~12 spread over
//! 48 KiB); health is kept elsewhere (in the proxy), so the
//! ring stays pure: the same node list gives the same owners in every process
//! and every version, whatever order the list is given in.
//!
//! Adding a node moves only the keys that the new node's points take over;
//! removing it gives them back to exactly their old owners.

#![deny(clippy::indexing_slicing)]

use std::fmt;

use xxhash_rust::xxh3::xxh3_64;

/// Virtual nodes per node unless told otherwise, chosen from measurement
/// (`cargo run --release -p kv-ring --example balance`): the most-loaded of 3
/// nodes' share of the hash space ÷ the mean share, over 300 random node lists
/// and for the default list 127.0.0.1:8081-8083:
///
/// | vnodes | average | worst  | 8081-8083 |
/// |-------:|--------:|-------:|----------:|
/// |    160 |  1.0657 | 1.2187 |    1.0542 |
/// |    250 |  1.0532 | 1.1901 |    1.0572 |
/// |    500 |  1.0394 | 1.1109 |    1.0363 |
/// |   1000 |  1.0276 | 1.0853 |    1.0265 |
/// |   2000 |  1.0186 | 1.0590 |    1.0310 |
///
/// 500 is the smallest count that meets the 1.05 target on both; 1000 meets it
/// with a margin (a random list is rarely worse than 1.09) and still costs
/// only 3,000 points (48 KiB, plus a 16 KiB bucket index) and one or two
/// comparisons a lookup with 3 nodes.
pub const DEFAULT_VNODES: u32 = 1000;

/// Why a ring could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// No nodes were given.
    Empty,
    /// `vnodes` was zero.
    NoVirtualNodes,
    /// The same node was named twice.
    DuplicateNode(String),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Empty => write!(f, "a ring needs at least one node"),
            RingError::NoVirtualNodes => {
                write!(f, "a ring needs at least one virtual node per node")
            }
            RingError::DuplicateNode(node) => write!(f, "node {node} is listed twice"),
        }
    }
}

impl std::error::Error for RingError {}

#[derive(Debug, Clone, Copy)]
struct Point {
    hash: u64,
    node: u32,
}

/// Top bits of a hash that pick its bucket: at least as many buckets as
/// points, so a bucket holds about one point or fewer.
fn bucket_bits(points: usize) -> u32 {
    // 2^bits >= points, at least 2^4, at most 2^20 (4 MiB of index).
    points.next_power_of_two().trailing_zeros().clamp(4, 20)
}

/// An immutable consistent-hash ring.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Box<[Point]>,
    /// `buckets[b]` is the index of the first point whose hash is at or
    /// above `b << (64 - bits)`, for `b` in `0..=2^bits` (the last entry is
    /// `points.len()`): a hash in bucket `b` is owned by a point in
    /// `buckets[b]..=buckets[b + 1]` (the next one, if none in the bucket).
    buckets: Box<[u32]>,
    bits: u32,
    nodes: Box<[String]>,
    vnodes: u32,
}

/// The hash a key is placed by.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

impl Ring {
    /// Builds a ring of `nodes` (for example `"127.0.0.1:8081"`), each with
    /// `vnodes` points.
    pub fn new<I, S>(nodes: I, vnodes: u32) -> Result<Self, RingError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        if nodes.is_empty() {
            return Err(RingError::Empty);
        }
        if vnodes == 0 {
            return Err(RingError::NoVirtualNodes);
        }
        for (i, node) in nodes.iter().enumerate() {
            if nodes.iter().take(i).any(|earlier| earlier == node) {
                return Err(RingError::DuplicateNode(node.clone()));
            }
        }
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        let mut label = String::new();
        for (index, node) in nodes.iter().enumerate() {
            for i in 0..vnodes {
                label.clear();
                label.push_str(node);
                label.push('#');
                label.push_str(&i.to_string());
                points.push(Point {
                    hash: xxh3_64(label.as_bytes()),
                    node: index as u32,
                });
            }
        }
        // Ties (vanishingly rare) are broken by node name, not list order, so
        // the ring does not depend on the order the nodes were given in.
        points.sort_unstable_by(|a, b| {
            a.hash
                .cmp(&b.hash)
                .then_with(|| nodes.get(a.node as usize).cmp(&nodes.get(b.node as usize)))
        });
        let bits = bucket_bits(points.len());
        let buckets = (0..=(1u64 << bits))
            .map(|b| {
                // The last bound is past the top of the ring: every point.
                let bound = b.checked_shl(64 - bits).filter(|_| b < (1u64 << bits));
                let first = match bound {
                    Some(bound) => points.partition_point(|point| point.hash < bound),
                    None => points.len(),
                };
                first as u32
            })
            .collect();
        Ok(Self {
            points: points.into_boxed_slice(),
            buckets,
            bits,
            nodes: nodes.into_boxed_slice(),
            vnodes,
        })
    }

    /// The nodes, in the order they were given.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Virtual nodes per node.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// Index of the point that owns `hash`.
    #[inline]
    fn point_index(&self, hash: u64) -> usize {
        // The bucket's bounds narrow the search to its own points; a hash
        // above all of them is owned by the first point after the bucket.
        let bucket = (hash >> (64 - self.bits)) as usize;
        let start = self.buckets.get(bucket).copied().unwrap_or(0) as usize;
        let end = self
            .buckets
            .get(bucket + 1)
            .map_or(self.points.len(), |&end| end as usize);
        let within = self
            .points
            .get(start..end)
            .unwrap_or_default()
            .partition_point(|point| point.hash < hash);
        let index = start + within;
        if index == self.points.len() {
            0
        } else {
            index
        }
    }

    /// Index (into [`Ring::nodes`]) of the node that owns `key`.
    #[inline]
    pub fn owner_index(&self, key: &[u8]) -> usize {
        // `point_index` is always below `points.len()` (the ring is never
        // empty), so the fallback is never taken; `get` costs the same bounds
        // check an index would.
        self.points
            .get(self.point_index(key_hash(key)))
            .map_or(0, |point| point.node as usize)
    }

    /// The node that owns `key`.
    #[inline]
    // why: `owner_index` returns a point's `node`, which `Ring::new` set to an
    // index of `nodes` (never empty), so the index is always in range.
    #[allow(clippy::indexing_slicing)]
    pub fn owner(&self, key: &[u8]) -> &str {
        &self.nodes[self.owner_index(key)]
    }

    /// The distinct nodes after `key` on the ring, its owner first: the order
    /// replicas or fallbacks would be chosen in.
    pub fn successors(&self, key: &[u8]) -> Successors<'_> {
        Successors {
            indices: self.successor_indices(key),
        }
    }

    /// [`Ring::successors`] as indexes into [`Ring::nodes`], for callers that
    /// keep their own per-node data (kv-cluster maps them back to member ids).
    pub fn successor_indices(&self, key: &[u8]) -> SuccessorIndices<'_> {
        SuccessorIndices {
            ring: self,
            next: self.point_index(key_hash(key)),
            walked: 0,
            seen: vec![false; self.nodes.len()],
            found: 0,
        }
    }

    /// The fraction of the hash space each node owns, in node order.
    pub fn shares(&self) -> Vec<f64> {
        let mut owned = vec![0u128; self.nodes.len()];
        let mut previous = match self.points.last() {
            Some(last) => last.hash,
            None => return Vec::new(),
        };
        for point in self.points.iter() {
            // A point owns the arc from the previous point (exclusive) to
            // itself (inclusive); the first point's arc wraps past zero.
            if let Some(arc) = owned.get_mut(point.node as usize) {
                *arc += u128::from(point.hash.wrapping_sub(previous));
            }
            previous = point.hash;
        }
        if self.nodes.len() == 1 {
            return vec![1.0];
        }
        let total = (u128::from(u64::MAX) + 1) as f64;
        owned.iter().map(|&arc| arc as f64 / total).collect()
    }
}

/// Iterator returned by [`Ring::successors`].
pub struct Successors<'a> {
    indices: SuccessorIndices<'a>,
}

impl<'a> Iterator for Successors<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let index = self.indices.next()?;
        self.indices.ring.nodes.get(index).map(String::as_str)
    }
}

/// Iterator returned by [`Ring::successor_indices`]: walks the points
/// clockwise from the key's hash, yielding each node the first time one of its
/// points is passed, and stops once every node was yielded or the whole ring
/// was walked.
pub struct SuccessorIndices<'a> {
    ring: &'a Ring,
    next: usize,
    walked: usize,
    seen: Vec<bool>,
    found: usize,
}

impl Iterator for SuccessorIndices<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let points = &self.ring.points;
        while self.found < self.seen.len() && self.walked < points.len() {
            // `next` stays below `points.len()` and a point's node below
            // `seen.len()` (one flag per node), so neither `?` ends the walk.
            let node = points.get(self.next)?.node as usize;
            self.next = (self.next + 1) % points.len();
            self.walked += 1;
            let seen = self.seen.get_mut(node)?;
            if !*seen {
                *seen = true;
                self.found += 1;
                return Some(node);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner by a plain binary search over every point, as the ring
    /// searched before its bucket index.
    fn plain_point_index(ring: &Ring, hash: u64) -> usize {
        let index = ring.points.partition_point(|point| point.hash < hash);
        if index == ring.points.len() {
            0
        } else {
            index
        }
    }

    #[test]
    fn the_bucket_index_finds_the_same_point_as_a_full_search() {
        for (nodes, vnodes) in [(1, 1), (1, 3), (2, 7), (3, 1000), (5, 40), (17, 1000)] {
            let names: Vec<String> = (0..nodes).map(|i| format!("10.0.0.{i}:8081")).collect();
            let Ok(ring) = Ring::new(names, vnodes) else {
                panic!("ring of {nodes} nodes must build");
            };
            // Every point's own hash, its neighbours, each bucket's bounds,
            // the ends of the ring and many keys' hashes.
            let mut hashes = vec![0, 1, u64::MAX, u64::MAX - 1];
            for point in ring.points.iter() {
                hashes.extend([
                    point.hash,
                    point.hash.wrapping_sub(1),
                    point.hash.wrapping_add(1),
                ]);
            }
            for b in 0..(1u64 << ring.bits) {
                let bound = b << (64 - ring.bits);
                hashes.extend([bound, bound.wrapping_sub(1)]);
            }
            hashes.extend((0..20_000).map(|i| key_hash(format!("key_{i}").as_bytes())));
            for hash in hashes {
                assert_eq!(
                    ring.point_index(hash),
                    plain_point_index(&ring, hash),
                    "hash {hash:#x} on {nodes} nodes × {vnodes} vnodes"
                );
            }
        }
    }

    fn three() -> Ring {
        Ring::new(
            ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"],
            DEFAULT_VNODES,
        )
        .unwrap()
    }

    #[test]
    fn empty_ring_is_an_error() {
        assert_eq!(
            Ring::new(Vec::<String>::new(), 10).unwrap_err(),
            RingError::Empty
        );
        assert_eq!(Ring::new(["a"], 0).unwrap_err(), RingError::NoVirtualNodes);
        assert_eq!(
            Ring::new(["a", "a"], 10).unwrap_err(),
            RingError::DuplicateNode("a".into())
        );
    }

    #[test]
    fn single_node_owns_everything() {
        let ring = Ring::new(["only"], 7).unwrap();
        for i in 0..1000 {
            assert_eq!(ring.owner(format!("k{i}").as_bytes()), "only");
        }
        assert_eq!(ring.shares(), vec![1.0]);
        assert_eq!(ring.successors(b"x").collect::<Vec<_>>(), vec!["only"]);
    }

    #[test]
    fn shares_add_up_to_one() {
        let total: f64 = three().shares().iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn order_of_nodes_does_not_matter() {
        let a = three();
        let b = Ring::new(
            ["127.0.0.1:8083", "127.0.0.1:8081", "127.0.0.1:8082"],
            DEFAULT_VNODES,
        )
        .unwrap();
        for i in 0..10_000 {
            let key = format!("key_{i}");
            assert_eq!(a.owner(key.as_bytes()), b.owner(key.as_bytes()));
        }
    }

    #[test]
    fn successors_are_distinct_and_start_with_the_owner() {
        let ring = three();
        for i in 0..1000 {
            let key = format!("key_{i}");
            let successors: Vec<&str> = ring.successors(key.as_bytes()).collect();
            assert_eq!(successors.len(), 3);
            assert_eq!(successors[0], ring.owner(key.as_bytes()));
            let mut sorted = successors.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 3);
        }
    }

    #[test]
    fn successor_indices_match_successors_and_walk_clockwise() {
        let ring = three();
        for i in 0..1000 {
            let key = format!("key_{i}");
            let names: Vec<&str> = ring.successors(key.as_bytes()).collect();
            let indices: Vec<usize> = ring.successor_indices(key.as_bytes()).collect();
            let by_index: Vec<&str> = indices.iter().map(|&n| ring.nodes()[n].as_str()).collect();
            assert_eq!(names, by_index, "{key}");
            assert_eq!(indices[0], ring.owner_index(key.as_bytes()));
        }
        // Walked by hand: the node of each point at or after the key's hash,
        // in ring order, first sightings only.
        let key = b"shard-7";
        let start = ring.point_index(key_hash(key));
        let mut expected = Vec::new();
        for step in 0..ring.points.len() {
            let node = ring.points[(start + step) % ring.points.len()].node as usize;
            if !expected.contains(&node) {
                expected.push(node);
            }
        }
        assert_eq!(ring.successor_indices(key).collect::<Vec<_>>(), expected);
        // A one-point ring yields its node once and stops.
        let single = Ring::new(["only"], 1).unwrap();
        assert_eq!(single.successor_indices(b"k").collect::<Vec<_>>(), vec![0]);
    }

    /// Keys → owners (and their xxh3) for the default list, computed once.
    /// If this fails, hashing or placement changed, and every deployed ring
    /// (proxy and kv-bench alike) would send keys to nodes that don't hold
    /// them: that needs a migration, not a new vector.
    #[test]
    fn pinned_owners_for_the_default_list() {
        const VECTOR: &[(&str, &str, u64)] = &[
            ("key_0", "127.0.0.1:8081", 0x14165d09991825ad),
            ("key_1", "127.0.0.1:8082", 0x4edd791a342b7c51),
            ("key_2", "127.0.0.1:8082", 0x9386493410e58b0f),
            ("key_3", "127.0.0.1:8081", 0xc8513e2f7186f146),
            ("key_42", "127.0.0.1:8083", 0x78056e32530a4c0b),
            ("key_999", "127.0.0.1:8081", 0xcb4400ceb6be47e9),
            ("hello", "127.0.0.1:8081", 0x9555e8555c62dcfd),
            ("caf\u{e9}", "127.0.0.1:8082", 0x4c83dbd5f29d367f),
            ("a/b", "127.0.0.1:8081", 0x48f71e9475860604),
            ("user:1001", "127.0.0.1:8082", 0x783864580ee66e90),
            ("", "127.0.0.1:8081", 0x2d06800538d394c2),
            ("x", "127.0.0.1:8081", 0xeaf06c6480b2cd11),
            ("0123456789abcdef", "127.0.0.1:8081", 0x64439946d8fa212d),
        ];
        let ring = three();
        for &(key, owner, hash) in VECTOR {
            assert_eq!(key_hash(key.as_bytes()), hash, "hash of {key:?}");
            assert_eq!(ring.owner(key.as_bytes()), owner, "owner of {key:?}");
        }
        // And a fingerprint of 10,000 owners, so a change anywhere shows.
        let mut counts = [0usize; 3];
        let mut fold: u64 = 0;
        for i in 0..10_000 {
            let owner = ring.owner_index(format!("key_{i}").as_bytes());
            counts[owner] += 1;
            fold = fold.wrapping_mul(31).wrapping_add(owner as u64);
        }
        assert_eq!(counts, [3308, 3454, 3238]);
        assert_eq!(fold, 0x49b6e552df655776);
    }

    fn max_over_mean(ring: &Ring) -> f64 {
        let shares = ring.shares();
        let mean = 1.0 / shares.len() as f64;
        shares.iter().copied().fold(0.0, f64::max) / mean
    }

    #[test]
    fn default_vnodes_balance_within_five_percent() {
        assert!(max_over_mean(&three()) <= 1.05, "{:?}", three().shares());
        // Many other 3-node lists, on average (deterministic node names).
        let lists = 100;
        let total: f64 = (0..lists)
            .map(|i| {
                let nodes = (0..3).map(|n| format!("10.0.{i}.{n}:{}", 7000 + i * 3 + n));
                max_over_mean(&Ring::new(nodes, DEFAULT_VNODES).unwrap())
            })
            .sum();
        let average = total / f64::from(lists);
        assert!(average <= 1.05, "average max/mean {average}");
    }

    #[test]
    fn a_fourth_node_takes_only_its_quarter() {
        let before = three();
        let after = Ring::new(
            [
                "127.0.0.1:8081",
                "127.0.0.1:8082",
                "127.0.0.1:8083",
                "127.0.0.1:8084",
            ],
            DEFAULT_VNODES,
        )
        .unwrap();
        let keys = 100_000;
        let mut moved = 0;
        for i in 0..keys {
            let key = format!("key_{i}");
            let (old, new) = (before.owner(key.as_bytes()), after.owner(key.as_bytes()));
            if old != new {
                assert_eq!(new, "127.0.0.1:8084", "{key} moved between old nodes");
                moved += 1;
            }
        }
        let fraction = f64::from(moved) / f64::from(keys);
        assert!((0.23..=0.27).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn removing_a_node_restores_the_old_owners() {
        let four = Ring::new(
            [
                "127.0.0.1:8081",
                "127.0.0.1:8082",
                "127.0.0.1:8083",
                "127.0.0.1:8084",
            ],
            DEFAULT_VNODES,
        )
        .unwrap();
        // The same three nodes, rebuilt after the 4th is gone.
        let three_again = Ring::new(
            ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"],
            DEFAULT_VNODES,
        )
        .unwrap();
        let original = three();
        for i in 0..50_000 {
            let key = format!("key_{i}");
            let owner = original.owner(key.as_bytes());
            assert_eq!(three_again.owner(key.as_bytes()), owner);
            let with_four = four.owner(key.as_bytes());
            // Keys the 4th node did not take never moved at all.
            if with_four != "127.0.0.1:8084" {
                assert_eq!(with_four, owner, "{key}");
            }
        }
    }

    #[test]
    fn lookups_wrap_around_the_top_of_the_ring() {
        let ring = three();
        // A hash beyond the last point belongs to the first point's node.
        assert_eq!(ring.point_index(u64::MAX), 0);
        assert_eq!(ring.point_index(0), 0);
        let first = ring.points[0].hash;
        assert_eq!(ring.point_index(first), 0);
        assert_eq!(ring.point_index(first + 1), 1);
    }
}
