//! A run's figures: merged from the workers, printed for people (the Flask
//! tool's "Final Results" rows and more), and written as JSON for machines.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::check::ErrorCounts;
use crate::config::{Plan, Stop, WorkloadKind};
use crate::worker::{new_histogram, WorkerStats};

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

/// Everything measured in one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `nodes` (client-side routing) or `proxy`.
    pub target: &'static str,
    pub nodes: usize,
    pub urls: Vec<String>,
    pub workload: WorkloadKind,
    pub mix: String,
    pub distribution: String,
    pub concurrency: usize,
    pub keys: u64,
    pub value_size: usize,
    pub requests: Option<u64>,
    pub duration_s: Option<f64>,
    pub warmup_s: f64,
    pub preload: bool,
    pub rate: Option<f64>,
    pub prefix: String,
    /// Measured operations (warmup, preload and cleanup excluded).
    pub operations: u64,
    pub sets: u64,
    pub gets: u64,
    pub deletes: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    /// Latency from when each request left.
    pub latency_ms: Latency,
    /// With --rate: latency from when each request was due.
    pub corrected_latency_ms: Option<Latency>,
    pub errors_total: u64,
    pub errors: ErrorCounts,
    /// Cluster mode: 421s followed to the leader they named. A routing
    /// answer (nothing was proposed), so not an error; many of them mean
    /// leaders moved during the run.
    pub redirects: u64,
    pub node_requests: Vec<u64>,
    pub node_share: Vec<f64>,
    /// The ring's share of the hash space per node (client-side routing).
    pub ring_share: Option<Vec<f64>>,
    /// ops/s over the 1-node run's ops/s.
    pub speedup_vs_1_node: Option<f64>,
    /// Unix time the run started.
    pub started_at: u64,
}

/// Merges the workers' statistics into a report.
#[allow(clippy::too_many_arguments)]
pub fn build(
    plan: &Plan,
    target: &'static str,
    urls: Vec<String>,
    prefix: String,
    ring_share: Option<Vec<f64>>,
    measure_start: Instant,
    started_at: u64,
    workers: Vec<WorkerStats>,
) -> RunReport {
    let nodes = urls.len();
    let mut latency = new_histogram();
    let mut corrected = plan.rate.map(|_| new_histogram());
    let mut ops = [0u64; 3];
    let mut node_requests = vec![0u64; nodes];
    let mut errors = ErrorCounts::default();
    let mut redirects = 0;
    let mut finished = measure_start;
    for worker in &workers {
        let _ = latency.add(&worker.latency);
        if let (Some(all), Some(mine)) = (corrected.as_mut(), worker.corrected.as_ref()) {
            let _ = all.add(mine);
        }
        for (total, mine) in ops.iter_mut().zip(worker.ops) {
            *total += mine;
        }
        for (total, mine) in node_requests.iter_mut().zip(&worker.node_requests) {
            *total += mine;
        }
        errors.merge(&worker.errors);
        redirects += worker.redirects;
        if let Some(done) = worker.finished {
            finished = finished.max(done);
        }
    }
    let operations: u64 = ops.iter().sum();
    let seconds = (finished - measure_start).as_secs_f64();
    let total_requests: u64 = node_requests.iter().sum();
    RunReport {
        target,
        nodes,
        urls,
        workload: plan.workload,
        mix: match plan.workload {
            WorkloadKind::Mix => plan.mix.to_string(),
            WorkloadKind::Seed => "seed".into(),
        },
        distribution: plan.distribution.to_string(),
        concurrency: plan.concurrency,
        keys: plan.keys,
        value_size: plan.value_size,
        requests: match plan.stop {
            Stop::Requests(n) => Some(n),
            Stop::Duration(_) => None,
        },
        duration_s: match plan.stop {
            Stop::Duration(d) => Some(d.as_secs_f64()),
            Stop::Requests(_) => None,
        },
        warmup_s: plan.warmup.as_secs_f64(),
        preload: plan.preload,
        rate: plan.rate,
        prefix,
        operations,
        sets: ops[0],
        gets: ops[1],
        deletes: ops[2],
        seconds,
        ops_per_sec: if seconds > 0.0 {
            operations as f64 / seconds
        } else {
            0.0
        },
        latency_ms: Latency::of(&latency),
        corrected_latency_ms: corrected.as_ref().map(Latency::of),
        errors_total: errors.total(),
        errors,
        redirects,
        node_share: node_requests
            .iter()
            .map(|&n| {
                if total_requests == 0 {
                    0.0
                } else {
                    n as f64 / total_requests as f64
                }
            })
            .collect(),
        node_requests,
        ring_share,
        speedup_vs_1_node: None,
        started_at,
    }
}

impl RunReport {
    /// The Flask tool's row: `Nodes: 1, Total operations: 600, Total time:
    /// 0.38 seconds, Throughput: 1569.28 ops/sec`.
    pub fn flask_row(&self) -> String {
        let who = if self.target == "proxy" {
            "Proxy".to_owned()
        } else {
            format!("Nodes: {}", self.nodes)
        };
        format!(
            "{who}, Total operations: {}, Total time: {:.2} seconds, Throughput: {:.2} ops/sec",
            self.operations, self.seconds, self.ops_per_sec
        )
    }

    /// The full human-readable block for one run.
    pub fn details(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.flask_row());
        match &self.corrected_latency_ms {
            Some(corrected) => {
                let _ = writeln!(
                    out,
                    "  corrected latency ms: {} (from each request's due time at {:.0} req/s)",
                    corrected.line(),
                    self.rate.unwrap_or_default()
                );
                let _ = writeln!(out, "  uncorrected (from send): {}", self.latency_ms.line());
            }
            None => {
                let _ = writeln!(out, "  latency ms: {}", self.latency_ms.line());
            }
        }
        let _ = writeln!(
            out,
            "  operations: set {}, get {}, delete {}",
            self.sets, self.gets, self.deletes
        );
        let _ = writeln!(out, "  errors: {}", self.errors.summary());
        for sample in &self.errors.samples {
            let _ = writeln!(out, "    e.g. {sample}");
        }
        if self.redirects > 0 {
            let _ = writeln!(
                out,
                "  redirects: {} (421s followed to the named leader; not errors)",
                self.redirects
            );
        }
        let share = |i: usize| self.node_share.get(i).copied().unwrap_or_default();
        let shares: Vec<String> = self
            .urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let url = url.trim_start_matches("http://");
                match &self.ring_share {
                    Some(ring) => format!(
                        "{url} {:.1}% (ring {:.1}%)",
                        share(i) * 100.0,
                        ring.get(i).copied().unwrap_or_default() * 100.0
                    ),
                    None => format!("{url} {:.1}%", share(i) * 100.0),
                }
            })
            .collect();
        let _ = writeln!(out, "  requests per node: {}", shares.join(", "));
        out
    }
}

/// Fills in each run's speed-up over the 1-node run.
pub fn set_speedups(reports: &mut [RunReport]) {
    let base = reports
        .iter()
        .find(|r| r.target == "nodes" && r.nodes == 1)
        .map(|r| r.ops_per_sec);
    for report in reports.iter_mut() {
        if report.target == "nodes" {
            report.speedup_vs_1_node = base.filter(|b| *b > 0.0).map(|b| report.ops_per_sec / b);
        }
    }
}

/// The summary printed after the last run. In rate mode (open loop) the
/// latency figures are the corrected ones, measured from each request's due
/// time, and labelled so: the uncorrected figures hide a server stall
/// (requests not sent while it lasts are never timed).
pub fn final_results(reports: &[RunReport]) -> String {
    let mut out = String::from("\nFinal Results:\n");
    for report in reports {
        let (label, latency) = match &report.corrected_latency_ms {
            Some(corrected) => ("corrected latency: ", corrected),
            None => ("", &report.latency_ms),
        };
        let _ = writeln!(
            out,
            "{}, {label}p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, errors {}{}",
            report.flask_row(),
            latency.p50,
            latency.p99,
            latency.p999,
            latency.max,
            report.errors_total,
            if report.redirects > 0 {
                format!(", redirects {}", report.redirects)
            } else {
                String::new()
            }
        );
    }
    let speedups: Vec<String> = reports
        .iter()
        .filter(|r| r.nodes > 1)
        .filter_map(|r| {
            r.speedup_vs_1_node
                .map(|s| format!("{} nodes {:.2}x", r.nodes, s))
        })
        .collect();
    if !speedups.is_empty() {
        let _ = writeln!(out, "Speed-up over 1 node: {}", speedups.join(", "));
    }
    out
}

/// Appends `report` to `path` as one JSON object on one line, so every run
/// of a sweep (several runs here, or several kv-bench invocations) is kept.
pub fn append_json(path: &std::path::Path, report: &RunReport) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(report)?;
    line.push(b'\n');
    // One write of the whole line, in append mode: lines of runs written
    // at once by several processes never interleave.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&line)
}
