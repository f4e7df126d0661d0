//! `kv-bench`: the load generator for the key-value store.
//!
//! `kv-bench --nodes 3` runs the workload against 1 node, then 2, then 3,
//! routing each key to its owner with the same ring as kv-proxy (so every
//! GET reaches the node that took the PUT), checks every answer, and prints
//! the Flask tool's "Final Results" rows with latency percentiles, errors by
//! kind, each node's share of the requests beside the ring's prediction,
//! and the speed-up over one node. The binary (`main.rs`) only parses flags
//! and maps the [`Outcome`] to an exit code.
//!
//! Modules, one concern each:
//! * [`config`]: flags, environment variables, resolved into a [`config::Plan`].
//! * [`workload`]: operation and key choice, the seed (Flask) sequence.
//! * [`check`]: what each answer must be; failures counted by kind.
//! * [`client`]: one HTTP/1.1 connection per worker and node (hyper's, or
//!   [`lean`]'s minimal one).
//! * [`cluster`]: against a replicated cluster, routing each key to its
//!   shard's leader with kv-proxy's retry rules.
//! * [`worker`]: the closed- and open-loop request loops.
//! * [`report`]: merging, printing and JSON.
//! * [`spawn`]: `--spawn`, local kv-node processes.
//! * [`progress`]: the live line on a terminal.
//! * [`cluster_watch`]: `cluster-watch`, a layout change's progress until it settles.
//! * [`history`]: `--history` recording and `check-history`, over
//!   [`linearizability`]'s checker.

#![deny(clippy::indexing_slicing)]

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kv_ring::Ring;
use tokio::sync::{watch, Barrier};

pub mod check;
pub mod client;
pub mod cluster;
pub mod cluster_watch;
pub mod config;
pub mod history;
pub mod lean;
pub mod linearizability;
pub mod progress;
pub mod report;
pub mod spawn;
pub mod worker;
pub mod workload;

pub use config::Config;

use client::Endpoint;
use config::{Plan, Stop, Target, WorkloadKind};
use report::RunReport;
use worker::{Live, MixWorker, RunShared, SeedWorker, WorkerStats};

/// Why kv-bench could not run (as opposed to a run that found errors).
#[derive(Debug)]
pub enum BenchError {
    /// Inconsistent flags.
    Config(String),
    /// --spawn could not start the nodes.
    Spawn(String),
    /// A node or proxy could not be reached before the run started.
    Unreachable(String),
    /// SIGINT or SIGTERM stopped the runs (spawned nodes were stopped and
    /// their data removed); the signal's number.
    Interrupted(i32),
    /// Anything else: runtime, output file.
    Other(String),
}

impl BenchError {
    /// The exit status: 2, or 128 + the signal's number when interrupted.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Interrupted(signal) => u8::try_from(128 + signal).unwrap_or(2),
            _ => 2,
        }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Config(why) => write!(f, "{why}"),
            BenchError::Spawn(why) => write!(f, "{why}"),
            BenchError::Unreachable(why) => write!(
                f,
                "{why}\n(start the nodes first, e.g. `kv-node --port 8081`, or pass --spawn)"
            ),
            BenchError::Interrupted(signal) => write!(f, "interrupted by signal {signal}"),
            BenchError::Other(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for BenchError {}

/// What the runs found.
#[derive(Debug)]
pub struct Outcome {
    pub reports: Vec<RunReport>,
    /// Failed or wrong requests over all runs.
    pub errors: u64,
    pub allow_errors: bool,
}

impl Outcome {
    /// Whether the exit code should say so.
    pub fn failed(&self) -> bool {
        self.errors > 0 && !self.allow_errors
    }
}

/// Runs everything the configuration asks for, printing to stdout.
pub fn run(config: Config) -> Result<Outcome, BenchError> {
    let plan = config.plan().map_err(BenchError::Config)?;
    let prefix = match &config.prefix {
        Some(prefix) => {
            if prefix.is_empty()
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
            {
                return Err(BenchError::Config(
                    "--prefix may only hold letters, digits and - _ . ~".into(),
                ));
            }
            prefix.clone()
        }
        None => random_prefix(),
    };
    if let Some(path) = &config.history {
        history::create(path)
            .map_err(|e| BenchError::Other(format!("cannot write {}: {e}", path.display())))?;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = config.threads.filter(|&t| t > 0) {
        builder.worker_threads(threads);
    }
    let runtime = builder
        .build()
        .map_err(|e| BenchError::Other(format!("cannot start the async runtime: {e}")))?;
    // From here on SIGINT and SIGTERM end the runs through the normal
    // return path, so spawned nodes are stopped and their data removed.
    let mut interrupted = {
        let _entered = runtime.enter();
        Interrupts::new()
            .map_err(|e| BenchError::Other(format!("cannot listen for signals: {e}")))?
    };
    // Spawned nodes live until the end of this function.
    let mut _spawned = Vec::new();
    let (target, urls) = match &plan.target {
        Target::Nodes(urls) => ("nodes", urls.clone()),
        Target::Spawn(count) => {
            let binary =
                spawn::node_binary(config.node_bin.as_deref()).map_err(BenchError::Spawn)?;
            _spawned = spawn::spawn_nodes(&binary, *count).map_err(BenchError::Spawn)?;
            (
                "nodes",
                _spawned.iter().map(spawn::LocalNode::url).collect(),
            )
        }
        Target::Proxy(url) => ("proxy", vec![url.clone()]),
    };
    let authorization = config.authorization().map_err(BenchError::Config)?;
    config.install_tls().map_err(BenchError::Config)?;
    let mut endpoints = urls
        .iter()
        .map(|url| {
            Endpoint::parse(url).map(|mut endpoint| {
                endpoint.authorization = authorization.clone();
                endpoint
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(BenchError::Config)?;
    // Nodes of a replicated cluster answer /-/shards; standalone ones 404.
    let mut target = target;
    let cluster = if target == "nodes" {
        let found = runtime
            .block_on(cluster::discover(&endpoints, plan.timeout))
            .map_err(BenchError::Unreachable)?;
        match found {
            Some(table) => {
                // `--nodes` were seeds: the run goes over the members, each
                // sent the seeds' token.
                let cluster =
                    cluster::BenchCluster::new(table, &endpoints, plan.leader_wait, plan.timeout)
                        .map_err(BenchError::Config)?;
                endpoints = cluster.endpoints();
                target = "cluster";
                Some(Arc::new(cluster))
            }
            None => None,
        }
    } else {
        None
    };

    let show_progress = progress::wanted(config.quiet);
    let node_counts: Vec<usize> = if target == "proxy" {
        vec![1]
    } else if target == "cluster" || config.only_max {
        vec![endpoints.len()]
    } else {
        (1..=endpoints.len()).collect()
    };
    let mut reports = Vec::new();
    for count in node_counts {
        let run_prefix = if target == "proxy" {
            format!("{prefix}p_")
        } else if target == "cluster" {
            format!("{prefix}c_")
        } else {
            format!("{prefix}n{count}_")
        };
        // `count` is at most `endpoints.len()` (`node_counts`).
        let nodes: Vec<_> = endpoints.iter().take(count).cloned().collect();
        println!("{}", describe(&plan, target, &nodes));
        let stop = Arc::new(AtomicBool::new(false));
        let end = Arc::new(AtomicBool::new(false));
        // Polled rather than watched (inotify): one stat every 50 ms costs
        // nothing next to the run, and works on any file system.
        let stop_file = config.stop_file.clone().map(|path| {
            let end = end.clone();
            runtime.spawn(async move {
                while !path.exists() {
                    tokio::time::sleep(STOP_FILE_POLL).await;
                }
                end.store(true, Ordering::Relaxed);
            })
        });
        let report = runtime.block_on(async {
            let run = run_once(
                &plan,
                target,
                nodes,
                run_prefix,
                RunOptions {
                    show_progress,
                    history: config.history.as_deref(),
                    stop: stop.clone(),
                    end,
                },
                cluster.clone(),
            );
            tokio::pin!(run);
            tokio::select! {
                report = &mut run => report,
                signal = interrupted.recv() => {
                    if plan.workload == WorkloadKind::Mix {
                        // Let the requests in flight finish (each is bounded
                        // by --timeout) so the history file holds them; a
                        // second signal quits at once.
                        stop.store(true, Ordering::Relaxed);
                        eprintln!("kv-bench: interrupted; finishing the requests in flight (signal again to quit at once)");
                        tokio::select! {
                            _ = &mut run => {}
                            _ = interrupted.recv() => {}
                            () = tokio::time::sleep(plan.timeout + STOP_GRACE) => {}
                        }
                    }
                    Err(BenchError::Interrupted(signal))
                }
            }
        });
        if let Some(watch) = stop_file {
            watch.abort();
        }
        let report = report?;
        println!("{}", report.details());
        reports.push(report);
        report::set_speedups(&mut reports);
        if let (Some(path), Some(last)) = (&config.json, reports.last()) {
            report::append_json(path, last)
                .map_err(|e| BenchError::Other(format!("cannot write {}: {e}", path.display())))?;
        }
    }
    print!("{}", report::final_results(&reports));
    let _ = std::io::stdout().flush();
    let errors = reports.iter().map(|r| r.errors_total).sum();
    Ok(Outcome {
        reports,
        errors,
        allow_errors: config.allow_errors,
    })
}

/// One line saying what a run is about to do.
fn describe(plan: &Plan, target: &str, nodes: &[Endpoint]) -> String {
    let who = if target == "proxy" {
        format!(
            "proxy {}",
            nodes.iter().map(|e| e.url.as_str()).collect::<String>()
        )
    } else if target == "cluster" {
        let list: Vec<&str> = nodes.iter().map(|e| e.authority.as_str()).collect();
        format!(
            "cluster of {} ({}), each key at its shard's leader",
            nodes.len(),
            list.join(", ")
        )
    } else {
        let list: Vec<&str> = nodes.iter().map(|e| e.authority.as_str()).collect();
        format!(
            "{} node{} ({})",
            nodes.len(),
            if nodes.len() == 1 { "" } else { "s" },
            list.join(", ")
        )
    };
    let what = match plan.workload {
        WorkloadKind::Seed => "seed workload (Flask benchmark sequence)".to_owned(),
        WorkloadKind::Mix => format!(
            "mix {}, {} over {} keys, {}-byte values{}",
            plan.mix,
            plan.distribution,
            plan.keys,
            plan.value_size,
            if plan.preload { ", preloaded" } else { "" }
        ),
    };
    let stop = match plan.stop {
        Stop::Requests(n) => format!("{n} requests"),
        Stop::Duration(d) => format!("{}", humantime::format_duration(d)),
    };
    let pace = match plan.rate {
        Some(rate) => format!(", open loop at {rate} req/s"),
        None => String::new(),
    };
    format!(
        "Run: {who}: {what}, concurrency {}, {stop}{pace}",
        plan.concurrency
    )
}

/// How often `--stop-file` is looked for.
const STOP_FILE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// After a signal, how much longer than one request's `--timeout` the
/// workers get to stop and hand in their history.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// SIGINT and SIGTERM, caught instead of killing the process.
struct Interrupts {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Needs to be called inside the runtime.
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal's number (a signal that came before this call
    /// counts).
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => 2,
            _ = self.terminate.recv() => 15,
        }
    }
}

/// How one run reports and stops.
struct RunOptions<'a> {
    /// Draw the live progress line.
    show_progress: bool,
    /// Append every operation to this file (`--history`).
    history: Option<&'a std::path::Path>,
    /// Set on SIGINT/SIGTERM (see [`worker::RunShared::stop`]).
    stop: Arc<AtomicBool>,
    /// Set when `--stop-file` appears (see [`worker::RunShared::end`]).
    end: Arc<AtomicBool>,
}

/// One run over `endpoints`.
async fn run_once(
    plan: &Plan,
    target: &'static str,
    endpoints: Vec<Endpoint>,
    prefix: String,
    options: RunOptions<'_>,
    cluster: Option<Arc<cluster::BenchCluster>>,
) -> Result<RunReport, BenchError> {
    let RunOptions {
        show_progress,
        history,
        stop,
        end,
    } = options;
    let refresher = cluster
        .as_ref()
        .map(cluster::BenchCluster::refresh_in_background);
    // Cluster mode learns members during the run: the report names them all.
    let learnt = cluster.clone();
    let ring = if target == "nodes" {
        let ring = Ring::new(
            endpoints.iter().map(|e| e.authority.clone()),
            kv_ring::DEFAULT_VNODES,
        )
        .map_err(|e| BenchError::Config(format!("node list: {e}")))?;
        Some(ring)
    } else {
        None
    };
    let workers = plan.concurrency;
    let urls: Vec<String> = endpoints.iter().map(|e| e.url.clone()).collect();
    let (start_tx, start_rx) = watch::channel(None);
    let seed_ops = match (plan.workload, plan.stop) {
        (WorkloadKind::Seed, Stop::Requests(n)) => workload::seed_ops(n, workers),
        _ => Vec::new(),
    };
    let shared = Arc::new(RunShared {
        plan: plan.clone(),
        endpoints,
        workers,
        ready: Barrier::new(workers + 1),
        batch: Barrier::new(workers),
        start: start_rx,
        live: (0..workers).map(|_| Live::default()).collect(),
        seed_ops,
        prefix: prefix.clone(),
        cluster,
        stop,
        end,
    });
    let handles: Vec<_> = (0..workers)
        .map(|id| match plan.workload {
            WorkloadKind::Mix => {
                tokio::spawn(MixWorker::new(id, shared.clone(), ring.as_ref()).run())
            }
            WorkloadKind::Seed => {
                tokio::spawn(SeedWorker::new(id, shared.clone(), ring.clone()).run())
            }
        })
        .collect();
    // Every worker has connected (and preloaded): start the clock.
    shared.ready.wait().await;
    let start = Instant::now();
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = start_tx.send(Some(start));
    let measure_start = match plan.workload {
        WorkloadKind::Mix => start + plan.warmup,
        WorkloadKind::Seed => start,
    };
    let progress = show_progress.then(|| {
        let ends = match plan.stop {
            Stop::Duration(d) => Some(measure_start + d),
            Stop::Requests(_) => None,
        };
        let total = match plan.stop {
            Stop::Requests(n) => Some(n),
            Stop::Duration(_) => None,
        };
        progress::start(
            format!("{} node(s)", urls.len()),
            shared.clone(),
            start,
            ends,
            total,
        )
    });
    let mut stats: Vec<WorkerStats> = Vec::with_capacity(workers);
    let mut panicked = None;
    for handle in handles {
        match handle.await {
            Ok(s) => stats.push(s),
            Err(error) => panicked = Some(error),
        }
    }
    if let Some(progress) = progress {
        progress::stop(progress);
    }
    if let Some(refresher) = refresher {
        refresher.abort();
    }
    if let Some(error) = panicked {
        return Err(BenchError::Other(format!("a worker failed: {error}")));
    }
    if let Some(path) = history {
        let recorders: Vec<_> = stats.iter_mut().filter_map(|s| s.history.take()).collect();
        history::append(path, &recorders)
            .map_err(|e| BenchError::Other(format!("cannot write {}: {e}", path.display())))?;
    }
    if let Some(failure) = stats.iter().find_map(|s| s.setup_failure.as_ref()) {
        return Err(BenchError::Unreachable(format!(
            "cannot connect before the run: {}",
            failure.detail
        )));
    }
    let urls = match learnt {
        Some(cluster) => {
            cluster.settle().await;
            cluster.endpoints().iter().map(|e| e.url.clone()).collect()
        }
        None => urls,
    };
    Ok(report::build(
        plan,
        target,
        urls,
        prefix,
        ring.as_ref().map(Ring::shares),
        measure_start,
        started_at,
        stats,
    ))
}

/// `kvb` and 8 hex digits from the time and pid, so concurrent or repeated
/// invocations use different keys.
fn random_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = workload::Rng::new(nanos ^ (u64::from(std::process::id()) << 32));
    format!("kvb{:08x}", rng.next_u64() as u32)
}
