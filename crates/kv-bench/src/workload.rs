//! What to send: operation choice, key choice, and the seed (Flask) sequence.
//!
//! Everything here is pure and deterministic from a seed, so the tests can
//! check the exact sequences and distributions without a server.
//!
//! Key ownership: worker `w` of `C` owns the global keys `w, w + C, w + 2C,
//! ...`, and no other worker ever touches them. That is what makes every
//! answer checkable exactly under concurrency: a worker has at most one
//! request in flight, so for each of its keys it knows the state the store
//! must be in. A zipf distribution therefore ranks each worker's own keys
//! (local rank r is global key `r*C + w`): the C hottest keys are the local
//! rank-0 keys, and popularity over the global key index is a zipf staircase.

use crate::config::{Distribution, Mix};

/// The three operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Set,
    Get,
    Delete,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Set => "set",
            OpKind::Get => "get",
            OpKind::Delete => "delete",
        }
    }
}

/// splitmix64: tiny, fast, and good enough to choose operations and keys
/// (no cryptographic needs, and a dependency-free generator keeps the
/// sequence stable across versions of any `rand` crate).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A generator for one worker, independent of the others.
    pub fn for_worker(seed: u64, worker: usize) -> Self {
        let mut rng = Rng(seed ^ (worker as u64).wrapping_mul(0xA076_1D64_78BD_642F));
        rng.next_u64();
        rng
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n) (n > 0), by multiply-shift (no modulo bias worth
    /// mentioning for n far below 2^64).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Chooses operations by weight.
#[derive(Debug, Clone, Copy)]
pub struct OpPicker {
    set: u64,
    get: u64,
    total: u64,
}

impl OpPicker {
    pub fn new(mix: Mix) -> Self {
        OpPicker {
            set: u64::from(mix.set),
            get: u64::from(mix.set) + u64::from(mix.get),
            total: u64::from(mix.total()),
        }
    }

    #[inline]
    pub fn pick(&self, rng: &mut Rng) -> OpKind {
        let x = rng.below(self.total);
        if x < self.set {
            OpKind::Set
        } else if x < self.get {
            OpKind::Get
        } else {
            OpKind::Delete
        }
    }
}

/// Chooses a rank in `0..n` by a distribution.
#[derive(Debug, Clone)]
pub enum KeyPicker {
    Uniform(u64),
    /// Cumulative weights, normalised to end at 1.0; a sample is a binary
    /// search. Exact for any exponent, and n·8 bytes of memory.
    Zipf(Box<[f64]>),
}

impl KeyPicker {
    /// A picker over `n > 0` ranks.
    pub fn new(distribution: Distribution, n: u64) -> Self {
        match distribution {
            Distribution::Uniform => KeyPicker::Uniform(n),
            Distribution::Zipf(s) => {
                let mut cdf = Vec::with_capacity(n as usize);
                let mut sum = 0.0;
                for rank in 0..n {
                    sum += 1.0 / ((rank + 1) as f64).powf(s);
                    cdf.push(sum);
                }
                for c in &mut cdf {
                    *c /= sum;
                }
                KeyPicker::Zipf(cdf.into_boxed_slice())
            }
        }
    }

    #[inline]
    pub fn pick(&self, rng: &mut Rng) -> u64 {
        match self {
            KeyPicker::Uniform(n) => rng.below(*n),
            KeyPicker::Zipf(cdf) => {
                let x = rng.next_f64();
                let rank = cdf.partition_point(|&c| c <= x);
                rank.min(cdf.len().saturating_sub(1)) as u64
            }
        }
    }
}

/// Number of keys worker `worker` of `workers` owns out of `keys`.
pub fn keys_of_worker(keys: u64, workers: usize, worker: usize) -> u64 {
    let workers = workers as u64;
    keys / workers + u64::from((worker as u64) < keys % workers)
}

/// Global key index of a worker's local key.
#[inline]
pub fn global_key(local: u64, workers: usize, worker: usize) -> u64 {
    local * workers as u64 + worker as u64
}

/// Requests worker `worker` of `workers` sends out of `total`.
pub fn requests_of_worker(total: u64, workers: usize, worker: usize) -> u64 {
    keys_of_worker(total, workers, worker)
}

/// What an answer must be, given what this run knows about the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A PUT: 200.
    Stored,
    /// A GET of a key set to a known value: 200 with exactly that value.
    Value,
    /// A GET or DELETE of a key that is absent: 404.
    Missing,
    /// A DELETE of a key that holds a value: 200.
    Deleted,
    /// A GET racing a PUT or DELETE of the same key (seed batches): 404, or
    /// 200 with exactly the value.
    ValueOrMissing,
    /// A DELETE racing the PUT of the same key (seed batches), or of a key in
    /// an unknown state: 200 or 404.
    DeletedOrMissing,
    /// A GET of a key in an unknown state (after a failed request): 200 with
    /// any value, or 404.
    Anything,
}

/// One operation of the seed workload: `key_<index>` / `value_<index>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedOp {
    pub kind: OpKind,
    pub index: u64,
    pub expect: Expect,
}

/// The Flask benchmark's operations for `n` requests at `concurrency`: n/3
/// sets of `key_i = value_i`, then n/3 gets, then n/3 deletes of the same
/// keys, cut into batches of `concurrency` that each run all at once (the
/// next batch starts when the whole batch has answered).
///
/// Because a batch can hold both the PUT and the GET (or DELETE) of a key,
/// racing each other, the expectation of each op depends on whether the op
/// it depends on is in an earlier batch (then its effect is certain) or the
/// same one (then either outcome is right).
pub fn seed_ops(n: u64, concurrency: usize) -> Vec<SeedOp> {
    let third = n / 3;
    let batch = |position: u64| position / concurrency as u64;
    let mut ops = Vec::with_capacity((third * 3) as usize);
    for i in 0..third {
        ops.push(SeedOp {
            kind: OpKind::Set,
            index: i,
            expect: Expect::Stored,
        });
    }
    for i in 0..third {
        let (set, get, delete) = (batch(i), batch(third + i), batch(2 * third + i));
        let expect = if set < get && delete > get {
            Expect::Value
        } else {
            Expect::ValueOrMissing
        };
        ops.push(SeedOp {
            kind: OpKind::Get,
            index: i,
            expect,
        });
    }
    for i in 0..third {
        let expect = if batch(i) < batch(2 * third + i) {
            Expect::Deleted
        } else {
            Expect::DeletedOrMissing
        };
        ops.push(SeedOp {
            kind: OpKind::Delete,
            index: i,
            expect,
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_sequence_is_the_flask_one() {
        let ops = seed_ops(600, 250);
        assert_eq!(ops.len(), 600);
        for (i, op) in ops[..200].iter().enumerate() {
            assert_eq!((op.kind, op.index), (OpKind::Set, i as u64));
        }
        for (i, op) in ops[200..400].iter().enumerate() {
            assert_eq!((op.kind, op.index), (OpKind::Get, i as u64));
        }
        for (i, op) in ops[400..].iter().enumerate() {
            assert_eq!((op.kind, op.index), (OpKind::Delete, i as u64));
        }
        // Batch 0 is positions 0..250: sets 0..200 and gets of keys 0..50,
        // which race their own sets.
        assert!(ops[200..250]
            .iter()
            .all(|op| op.expect == Expect::ValueOrMissing));
        // Gets at positions 250..400 (keys 50..200): set in batch 0, deleted
        // in batch 1 (positions 400..500, keys 0..100) or batch 2.
        // Key 50's get is at 250 (batch 1), its delete at 450 (batch 1): a race.
        assert_eq!(ops[250].expect, Expect::ValueOrMissing);
        // Key 100: get at 300 (batch 1), delete at 500 (batch 2): certain.
        assert_eq!(ops[300].expect, Expect::Value);
        // Every delete's set is in an earlier batch here.
        assert!(ops[400..].iter().all(|op| op.expect == Expect::Deleted));
    }

    #[test]
    fn seed_with_small_batches_is_all_certain() {
        let ops = seed_ops(30, 1);
        assert!(ops[10..20].iter().all(|op| op.expect == Expect::Value));
        assert!(ops[20..].iter().all(|op| op.expect == Expect::Deleted));
    }

    #[test]
    fn seed_with_one_batch_races_everything() {
        let ops = seed_ops(9, 100);
        assert_eq!(ops.len(), 9);
        assert!(ops[3..6]
            .iter()
            .all(|op| op.expect == Expect::ValueOrMissing));
        assert!(ops[6..]
            .iter()
            .all(|op| op.expect == Expect::DeletedOrMissing));
    }

    #[test]
    fn seed_drops_the_remainder_like_flask() {
        assert_eq!(seed_ops(601, 250).len(), 600);
        assert_eq!(seed_ops(2, 250).len(), 0);
    }

    #[test]
    fn mix_follows_its_weights() {
        let picker = OpPicker::new(Mix {
            set: 1,
            get: 8,
            delete: 1,
        });
        let mut rng = Rng::new(7);
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[picker.pick(&mut rng) as usize] += 1;
        }
        // Expected 10k / 80k / 10k; a binomial's sd here is ~95 and ~126.
        assert!((9_500..10_500).contains(&counts[0]), "{counts:?}");
        assert!((79_000..81_000).contains(&counts[1]), "{counts:?}");
        assert!((9_500..10_500).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn a_zero_weight_is_never_chosen() {
        let picker = OpPicker::new(Mix {
            set: 1,
            get: 0,
            delete: 3,
        });
        let mut rng = Rng::new(3);
        assert!((0..10_000).all(|_| picker.pick(&mut rng) != OpKind::Get));
    }

    #[test]
    fn zipf_head_is_hot() {
        let n = 1000;
        let picker = KeyPicker::new(Distribution::Zipf(1.0), n);
        let mut rng = Rng::new(11);
        let mut counts = vec![0u32; n as usize];
        let samples = 200_000;
        for _ in 0..samples {
            counts[picker.pick(&mut rng) as usize] += 1;
        }
        // P(rank 0) = 1/H(1000) ≈ 0.1336; the top 10 hold H(10)/H(1000) ≈ 0.39.
        let first = f64::from(counts[0]) / samples as f64;
        assert!((0.128..0.139).contains(&first), "rank 0 share {first}");
        let top10: u32 = counts[..10].iter().sum();
        let top10 = f64::from(top10) / samples as f64;
        assert!((0.38..0.40).contains(&top10), "top-10 share {top10}");
        assert!(counts[0] > 5 * counts[9]);
        // The tail still gets picked: every rank is reachable.
        assert!(counts[500..].iter().sum::<u32>() > 0);
    }

    #[test]
    fn uniform_is_flat() {
        let picker = KeyPicker::new(Distribution::Uniform, 10);
        let mut rng = Rng::new(5);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[picker.pick(&mut rng) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn workers_partition_the_key_space() {
        let (keys, workers) = (10u64, 4usize);
        let mut seen = Vec::new();
        for w in 0..workers {
            for local in 0..keys_of_worker(keys, workers, w) {
                seen.push(global_key(local, workers, w));
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..keys).collect::<Vec<_>>());
        assert_eq!(
            (0..workers)
                .map(|w| requests_of_worker(1001, workers, w))
                .sum::<u64>(),
            1001
        );
    }
}
