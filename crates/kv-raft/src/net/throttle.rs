//! [`SnapshotThrottle`]: the bound on the bytes/s of snapshots one node
//! sends (`--move-bytes-per-sec`, `docs/membership.md` §4.6 and §8), and
//! the counters of what it sent.
//!
//! A snapshot travels as one whole body (`docs/replication.md` §5: it is
//! built in memory), so the throttle paces whole bodies, not chunks: a
//! virtual-clock token bucket (GCRA) with no burst beyond one body. Each
//! body is scheduled to start when the bytes scheduled before it have
//! drained at the rate, then advances that point by its own size / rate.
//! The first body after a quiet spell starts at once; back-to-back bodies
//! (several moves, several learners) are spaced so that, over any run of
//! them, the node sends at most the rate plus one body. One bucket per
//! node, shared by every group and peer: the bound is on what the node
//! puts on the wire, whoever receives it. The wait is before the request,
//! outside the RPC's TTL, so a slow rate cannot time a send out; a
//! replication that is cancelled while waiting stops waiting.
//!
//! Counters: bytes sent per peer (each body counted when its request
//! starts) and the total time bodies spent waiting.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::types::NodeId;

#[derive(Debug, Default)]
struct Inner {
    /// Bytes per second; 0: unbounded.
    rate: AtomicU64,
    /// When the bytes scheduled so far will have drained.
    drained_at: Mutex<Option<Instant>>,
    sent: Mutex<BTreeMap<NodeId, u64>>,
    throttled_nanos: AtomicU64,
}

/// A node's snapshot send throttle and counters; a cheap `Clone` handle
/// (the node's [`Network`](super::Network) holds one, every group's
/// clients share it).
#[derive(Debug, Clone, Default)]
pub struct SnapshotThrottle(Arc<Inner>);

impl SnapshotThrottle {
    /// A throttle at `bytes_per_sec` (0: unbounded).
    pub fn new(bytes_per_sec: u64) -> Self {
        let throttle = Self::default();
        throttle.set_rate(bytes_per_sec);
        throttle
    }

    /// Changes the rate for bodies scheduled from now on (0: unbounded).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.0.rate.store(bytes_per_sec, Relaxed);
    }

    /// The rate in bytes/s (0: unbounded).
    pub fn rate(&self) -> u64 {
        self.0.rate.load(Relaxed)
    }

    /// Snapshot bytes sent to each peer since start (monotone; a removed
    /// member's count stays).
    pub fn bytes_sent(&self) -> BTreeMap<NodeId, u64> {
        self.0.sent.lock().clone()
    }

    /// Snapshot bytes sent to all peers since start.
    pub fn total_bytes_sent(&self) -> u64 {
        self.0.sent.lock().values().sum()
    }

    /// Time snapshot bodies spent waiting for the throttle, summed.
    pub fn throttled(&self) -> Duration {
        Duration::from_nanos(self.0.throttled_nanos.load(Relaxed))
    }

    /// When a body of `bytes` scheduled at `now` may start, and the new
    /// drain point (the GCRA step of the module docs; pure, for tests).
    fn schedule(
        drained_at: Option<Instant>,
        rate: u64,
        now: Instant,
        bytes: u64,
    ) -> (Instant, Option<Instant>) {
        if rate == 0 {
            return (now, None);
        }
        let start = drained_at.map_or(now, |at| at.max(now));
        let takes = Duration::from_secs_f64(bytes as f64 / rate as f64);
        (start, Some(start + takes))
    }

    /// Waits until a body of `bytes` for `peer` may go, then counts it.
    pub(crate) async fn send(&self, peer: NodeId, bytes: u64) {
        let now = Instant::now();
        let start = {
            let mut drained_at = self.0.drained_at.lock();
            let (start, next) = Self::schedule(*drained_at, self.rate(), now, bytes);
            *drained_at = next;
            start
        };
        if start > now {
            tokio::time::sleep_until(start).await;
            let waited = u64::try_from((start - now).as_nanos()).unwrap_or(u64::MAX);
            self.0.throttled_nanos.fetch_add(waited, Relaxed);
        }
        *self.0.sent.lock().entry(peer).or_insert(0) += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn back_to_back_bodies_are_spaced_by_size_over_rate() {
        let t0 = Instant::now();
        let rate = 4 * MB;
        // First body: at once; drains after 0.5 s.
        let (start, drained) = SnapshotThrottle::schedule(None, rate, t0, 2 * MB);
        assert_eq!(start, t0);
        assert_eq!(drained, Some(t0 + Duration::from_millis(500)));
        // A second at once waits for the first to drain.
        let (start, drained) = SnapshotThrottle::schedule(drained, rate, t0, MB);
        assert_eq!(start, t0 + Duration::from_millis(500));
        assert_eq!(drained, Some(t0 + Duration::from_millis(750)));
        // After a quiet spell: at once again, no credit saved up.
        let later = t0 + Duration::from_secs(10);
        let (start, drained) = SnapshotThrottle::schedule(drained, rate, later, MB);
        assert_eq!(start, later);
        assert_eq!(drained, Some(later + Duration::from_millis(250)));
    }

    #[test]
    fn rate_zero_is_unbounded() {
        let t0 = Instant::now();
        let (start, drained) =
            SnapshotThrottle::schedule(Some(t0 + Duration::from_secs(9)), 0, t0, 100 * MB);
        assert_eq!((start, drained), (t0, None));
    }

    #[tokio::test]
    async fn sends_are_counted_per_peer() {
        let throttle = SnapshotThrottle::new(0);
        throttle.send(2, 100).await;
        throttle.send(3, 50).await;
        throttle.send(2, 1).await;
        assert_eq!(throttle.bytes_sent(), BTreeMap::from([(2, 101), (3, 50)]));
        assert_eq!(throttle.total_bytes_sent(), 151);
        assert_eq!(throttle.throttled(), Duration::ZERO);
    }
}
