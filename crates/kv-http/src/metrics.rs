//! Request metrics, exposed at `GET /-/metrics` in the Prometheus text format.
//!
//! The hot path only does relaxed atomic adds into fixed arrays: a request
//! counter per (operation, status) and a latency histogram per operation with
//! fixed buckets. Nothing is allocated or locked per request; the text is
//! built when Prometheus scrapes.
//!
//! The arrays are sharded by thread ([`thread_slot`]), each shard on its own
//! cache lines ([`CachePadded`]): worker threads adding to one shared counter
//! would pass its cache line back and forth between cores on every request.
//! A scrape sums the shards.
//!
//! Every status either server answers with has its own label (the proxy's
//! 502 and 504 included); a status missing from [`STATUSES`] would be
//! counted as `status="other"`, and a test keeps the list and
//! [`crate::ApiError::status`] in step.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use hyper::Method;

/// What a request did, for labelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Get,
    Head,
    Put,
    Delete,
    Admin,
    Other,
}

impl Operation {
    const ALL: [Operation; 6] = [
        Operation::Get,
        Operation::Head,
        Operation::Put,
        Operation::Delete,
        Operation::Admin,
        Operation::Other,
    ];

    /// The operation a request asks for, from its method and path.
    pub fn of(method: &Method, path: &str) -> Operation {
        if path.starts_with("/-/") {
            return Operation::Admin;
        }
        match *method {
            Method::GET => Operation::Get,
            Method::HEAD => Operation::Head,
            Method::PUT | Method::POST => Operation::Put,
            Method::DELETE => Operation::Delete,
            _ => Operation::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Head => "head",
            Operation::Put => "put",
            Operation::Delete => "delete",
            Operation::Admin => "admin",
            Operation::Other => "other",
        }
    }
}

/// The statuses kv-node and kv-proxy answer with; anything else counts as
/// "other" (the trailing 0).
pub const STATUSES: [u16; 17] = [
    200, 204, 400, 404, 405, 408, 411, 413, 414, 417, 431, 500, 501, 502, 503, 504, 0,
];

fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len() - 1)
}

/// Upper bounds of the latency buckets, in seconds (the last is +Inf).
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// How many shards per-thread counters are split into.
pub const SHARDS: usize = 16;

/// A small number for the calling thread, given on its first call: threads
/// counting at once use different shards (`thread_slot() % SHARDS`).
#[inline]
pub fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Relaxed);
    }
    SLOT.with(|slot| *slot)
}

pub use crossbeam_utils::CachePadded;

#[derive(Default)]
struct Shard {
    requests: [[AtomicU64; STATUSES.len()]; Operation::ALL.len()],
    latency: [Histogram; Operation::ALL.len()],
}

/// Counters shared by every connection.
pub struct Metrics {
    shards: Box<[CachePadded<Shard>]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| CachePadded::default()).collect(),
        }
    }
}

impl Metrics {
    /// The sum of one counter over all shards.
    fn total(&self, counter: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|shard| counter(shard).load(Relaxed))
            .sum()
    }

    /// Records one answered request.
    #[inline]
    pub fn record(&self, operation: Operation, status: u16, elapsed: Duration) {
        let op = operation as usize;
        let shard = &self.shards[thread_slot() % self.shards.len()];
        shard.requests[op][status_index(status)].fetch_add(1, Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        let histogram = &shard.latency[op];
        histogram.buckets[bucket].fetch_add(1, Relaxed);
        histogram.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    /// Appends the request counters and latency histograms to `out`.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP kv_requests_total Requests answered, by operation and status.\n");
        out.push_str("# TYPE kv_requests_total counter\n");
        for operation in Operation::ALL {
            for (i, &status) in STATUSES.iter().enumerate() {
                let count = self.total(|shard| &shard.requests[operation as usize][i]);
                if count > 0 {
                    let status = if status == 0 {
                        "other".to_owned()
                    } else {
                        status.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "kv_requests_total{{op=\"{}\",status=\"{status}\"}} {count}",
                        operation.label()
                    );
                }
            }
        }
        out.push_str("# HELP kv_request_duration_seconds Time from request head to response, by operation.\n");
        out.push_str("# TYPE kv_request_duration_seconds histogram\n");
        for operation in Operation::ALL {
            let op = operation as usize;
            let label = operation.label();
            let mut cumulative = 0;
            for i in 0..=BUCKETS.len() {
                cumulative += self.total(|shard| &shard.latency[op].buckets[i]);
                let le = BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
                let _ = writeln!(
                    out,
                    "kv_request_duration_seconds_bucket{{op=\"{label}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = self.total(|shard| &shard.latency[op].sum_nanos) as f64 / 1e9;
            let _ = writeln!(
                out,
                "kv_request_duration_seconds_sum{{op=\"{label}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "kv_request_duration_seconds_count{{op=\"{label}\"}} {cumulative}"
            );
        }
    }
}

/// Appends one gauge or counter with its HELP and TYPE lines.
pub fn write_metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_status_has_its_own_label() {
        use crate::ApiError;
        let errors = [
            ApiError::BadRequest("x"),
            ApiError::ExpectationFailed,
            ApiError::UriTooLong,
            ApiError::HeadersTooLarge,
            ApiError::BodyTimeout,
            ApiError::BodyTooLarge { limit: 1 },
            ApiError::MethodNotAllowed { allow: "GET" },
            ApiError::KeyNotFound,
            ApiError::TooManyConnections,
            ApiError::NodeFailed {
                node: "n".into(),
                why: "x".into(),
            },
            ApiError::NodeTimeout {
                node: "n".into(),
                after: Duration::from_secs(1),
            },
        ];
        for error in errors {
            let status = error.status().as_u16();
            assert_ne!(status_index(status), STATUSES.len() - 1, "{status}");
        }
    }

    #[test]
    fn records_from_many_threads_are_summed() {
        let metrics = std::sync::Arc::new(Metrics::default());
        let threads: Vec<_> = (0..SHARDS + 3)
            .map(|_| {
                let metrics = metrics.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        metrics.record(Operation::Put, 200, Duration::from_micros(70));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let mut out = String::new();
        metrics.render(&mut out);
        let total = (SHARDS + 3) * 100;
        assert!(
            out.contains(&format!(
                "kv_requests_total{{op=\"put\",status=\"200\"}} {total}\n"
            )),
            "{out}"
        );
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"put\",le=\"0.00005\"} 0\n"));
        assert!(out.contains(&format!(
            "kv_request_duration_seconds_bucket{{op=\"put\",le=\"0.0001\"}} {total}\n"
        )));
    }

    #[test]
    fn records_land_in_the_right_series() {
        let metrics = Metrics::default();
        metrics.record(Operation::Get, 200, Duration::from_micros(30));
        metrics.record(Operation::Get, 404, Duration::from_millis(3));
        metrics.record(Operation::Put, 299, Duration::from_secs(9));
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains("kv_requests_total{op=\"get\",status=\"200\"} 1\n"));
        assert!(out.contains("kv_requests_total{op=\"get\",status=\"404\"} 1\n"));
        assert!(out.contains("kv_requests_total{op=\"put\",status=\"other\"} 1\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"get\",le=\"0.00005\"} 1\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"get\",le=\"0.005\"} 2\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"put\",le=\"5\"} 0\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"put\",le=\"+Inf\"} 1\n"));
        assert!(out.contains("kv_request_duration_seconds_count{op=\"get\"} 2\n"));
    }
}
