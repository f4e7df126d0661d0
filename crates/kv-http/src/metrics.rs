//! Request metrics, exposed at `GET /-/metrics` in the Prometheus text format.
//!
//! The hot path only does relaxed atomic adds into fixed arrays: a request
//! counter per (operation, status) and a latency histogram per operation with
//! fixed buckets. Nothing is allocated or locked per request. The text is
//! built when Prometheus scrapes, by `prometheus-client`'s encoder over a
//! [`Scrape`] of those counters (and of whatever else the server adds):
//! the encoder takes care of the format (names, escaping, `_total`, `le`),
//! our atomics of the hot path, whose cost prometheus-client's own metric
//! types (one shared atomic each, a lock per labelled family) would raise.
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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use hyper::Method;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Scrape::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

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
pub const STATUSES: [u16; 18] = [
    200, 204, 400, 401, 404, 405, 408, 411, 413, 414, 417, 431, 500, 501, 502, 503, 504, 0,
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
    fn total(&self, counter: impl Fn(&Shard) -> Option<&AtomicU64>) -> u64 {
        self.shards
            .iter()
            .filter_map(|shard| counter(shard).map(|counter| counter.load(Relaxed)))
            .sum()
    }

    /// Records one answered request.
    #[inline]
    pub fn record(&self, operation: Operation, status: u16, elapsed: Duration) {
        // Every index is in range by construction (a slot modulo the shard
        // count, an `Operation` into arrays of `Operation::ALL.len()`, a
        // status or bucket position into arrays sized for their tables), so
        // no `get` misses; each costs the bounds check an index would.
        let op = operation as usize;
        let Some(shard) = self.shards.get(thread_slot() % self.shards.len()) else {
            return;
        };
        if let Some(count) = shard
            .requests
            .get(op)
            .and_then(|row| row.get(status_index(status)))
        {
            count.fetch_add(1, Relaxed);
        }
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        if let Some(histogram) = shard.latency.get(op) {
            if let Some(count) = histogram.buckets.get(bucket) {
                count.fetch_add(1, Relaxed);
            }
            histogram.sum_nanos.fetch_add(
                u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
                Relaxed,
            );
        }
    }

    /// What the counters hold now, summed over the shards.
    fn snapshot(&self) -> RequestSeries {
        let mut requests = Vec::new();
        let mut latency = Vec::new();
        for operation in Operation::ALL {
            let op = operation as usize;
            for (i, &status) in STATUSES.iter().enumerate() {
                let count = self.total(|shard| shard.requests.get(op)?.get(i));
                if count > 0 {
                    let status = if status == 0 {
                        "other".to_owned()
                    } else {
                        status.to_string()
                    };
                    requests.push((operation.label(), status, count));
                }
            }
            // Per bucket, not cumulative: the encoder sums them up.
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .chain([f64::INFINITY].iter())
                .enumerate()
                .map(|(i, &bound)| {
                    (
                        bound,
                        self.total(|shard| shard.latency.get(op)?.buckets.get(i)),
                    )
                })
                .collect();
            let count = buckets.iter().map(|(_, n)| n).sum();
            let sum = self.total(|shard| Some(&shard.latency.get(op)?.sum_nanos)) as f64 / 1e9;
            latency.push(Latency {
                op: operation.label(),
                sum,
                count,
                buckets,
            });
        }
        RequestSeries { requests, latency }
    }
}

/// The request series at one scrape.
#[derive(Debug)]
struct RequestSeries {
    /// (op, status, count)
    requests: Vec<(&'static str, String, u64)>,
    latency: Vec<Latency>,
}

/// One operation's latency histogram at one scrape.
#[derive(Debug)]
struct Latency {
    op: &'static str,
    /// In seconds.
    sum: f64,
    count: u64,
    /// (upper bound, count) per bucket, not cumulative.
    buckets: Vec<(f64, u64)>,
}

impl Collector for RequestSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "kv_requests",
            "Requests answered, by operation and status.",
            None,
            MetricType::Counter,
        )?;
        for (op, status, count) in &self.requests {
            let labels = [("op", *op), ("status", status.as_str())];
            ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "kv_request_duration_seconds",
            "Time from request head to response, by operation.",
            None,
            MetricType::Histogram,
        )?;
        for latency in &self.latency {
            family
                .encode_family(&[("op", latency.op)])?
                .encode_histogram::<NoLabelSet>(
                    latency.sum,
                    latency.count,
                    &latency.buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

/// A metric family with labelled series, for [`Scrape::family`].
#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricType,
    series: Vec<(Vec<(&'static str, String)>, u64)>,
}

impl Collector for Family {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(&self.name, &self.help, None, self.kind)?;
        for (labels, value) in &self.series {
            let series = family.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(*value).encode(series)?,
                _ => ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(series)?,
            }
        }
        Ok(())
    }
}

/// One `GET /-/metrics` answer being put together: the request series,
/// then whatever the server adds, encoded by prometheus-client.
#[derive(Debug)]
pub struct Scrape {
    registry: Registry,
}

/// prometheus-client ends every HELP text with a period itself.
fn help(text: &str) -> &str {
    text.trim_end_matches('.')
}

impl Scrape {
    /// A scrape starting with `metrics`' request counters and histograms.
    pub fn new(metrics: &Metrics) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(metrics.snapshot()));
        Self { registry }
    }

    /// A counter; `name` ends in `_total`, as exposed.
    pub fn counter(&mut self, name: &str, help_text: &str, value: f64) {
        let name = name.strip_suffix("_total").unwrap_or(name);
        self.registry
            .register(name, help(help_text), ConstCounter::new(value));
    }

    /// A whole-number counter (exact beyond 2^53); `name` ends in `_total`.
    pub fn counter_u64(&mut self, name: &str, help_text: &str, value: u64) {
        let name = name.strip_suffix("_total").unwrap_or(name);
        self.registry
            .register(name, help(help_text), ConstCounter::new(value));
    }

    /// A gauge.
    pub fn gauge(&mut self, name: &str, help_text: &str, value: f64) {
        self.registry
            .register(name, help(help_text), ConstGauge::new(value));
    }

    /// A whole-number gauge.
    pub fn gauge_u64(&mut self, name: &str, help_text: &str, value: u64) {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        self.registry
            .register(name, help(help_text), ConstGauge::new(value));
    }

    /// A family of labelled series: counters (`name` ending in `_total`)
    /// when `counter`, else gauges.
    pub fn family(
        &mut self,
        name: &str,
        help_text: &str,
        counter: bool,
        series: Vec<(Vec<(&'static str, String)>, u64)>,
    ) {
        let (name, kind) = match name.strip_suffix("_total") {
            Some(name) if counter => (name, MetricType::Counter),
            _ => (name, MetricType::Gauge),
        };
        self.registry.register_collector(Box::new(Family {
            name: name.to_owned(),
            help: help_text.to_owned(),
            kind,
            series,
        }));
    }

    /// The text, in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
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
            ApiError::TransferCodingNotImplemented,
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
            ApiError::Internal("x"),
            ApiError::Unauthorized("x"),
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
        let out = Scrape::new(&metrics).encode();
        let total = (SHARDS + 3) * 100;
        assert!(
            out.contains(&format!(
                "kv_requests_total{{op=\"put\",status=\"200\"}} {total}\n"
            )),
            "{out}"
        );
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"put\",le=\"5e-05\"} 0\n"));
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
        let out = Scrape::new(&metrics).encode();
        assert!(out.contains("kv_requests_total{op=\"get\",status=\"200\"} 1\n"));
        assert!(out.contains("kv_requests_total{op=\"get\",status=\"404\"} 1\n"));
        assert!(out.contains("kv_requests_total{op=\"put\",status=\"other\"} 1\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"get\",le=\"5e-05\"} 1\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"get\",le=\"0.005\"} 2\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"put\",le=\"5\"} 0\n"));
        assert!(out.contains("kv_request_duration_seconds_bucket{op=\"put\",le=\"+Inf\"} 1\n"));
        assert!(out.contains("kv_request_duration_seconds_count{op=\"get\"} 2\n"));
    }
}
