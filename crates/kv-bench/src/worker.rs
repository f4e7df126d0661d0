//! One worker: a task with at most one request in flight, its own keys, its
//! own connections (one per node, opened before the clock starts) and its
//! own statistics (an HDR histogram, counters, error counts), merged by the
//! run once every worker is done. Nothing is shared per request except a
//! relaxed store into the worker's own progress slot.
//!
//! Closed loop (the default): the next request leaves when the previous
//! answer is in. Open loop (`--rate`): request i of a worker is due at
//! `start + offset + i·interval`; it leaves at that time or, when the worker
//! is behind, at once. The raw latency is measured from when it left, the
//! corrected one from when it was due whenever the worker was behind
//! (wrk2's correction for coordinated omission: a stalled server cannot
//! hide the requests it delayed). When the worker was ahead and slept, the
//! server delayed nothing and both figures start when the request left, so
//! the timer's own wake-up lag is not charged to the server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hyper::{Method, Uri};
use kv_ring::Ring;
use tokio::sync::{watch, Barrier};

use crate::check::{check, ErrorCounts, ErrorKind, Failure};
use crate::client::{self, Answer, ClientKind, Conn, Endpoint};
use crate::cluster::{self, BenchCluster};
use crate::config::{Plan, Stop};
use crate::history::{self, Recorder, Value};
use crate::workload::{
    global_key, keys_of_worker, requests_of_worker, Expect, KeyPicker, OpKind, OpPicker, Rng,
    SeedOp,
};

/// Highest latency the histograms hold, in microseconds (larger ones are
/// clamped; the request timeout is far below it).
const MAX_LATENCY_US: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // Bounds and precision are constants known to be valid.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
    })
}

#[inline]
fn micros(d: Duration) -> u64 {
    (d.as_nanos() / 1000).max(1) as u64
}

/// A worker's live counters, on their own cache line so the progress reader
/// never contends with other workers.
#[derive(Default)]
#[repr(align(128))]
pub struct Live {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
}

/// What every worker of a run shares (read-only).
pub struct RunShared {
    pub plan: Plan,
    pub endpoints: Vec<Endpoint>,
    pub workers: usize,
    /// Released when every worker has connected (and preloaded).
    pub ready: Barrier,
    /// Seed workload: the end of a batch (every worker, not the run).
    pub batch: Barrier,
    /// The instant the run starts (warmup first), sent once all are ready.
    pub start: watch::Receiver<Option<Instant>>,
    pub live: Vec<Live>,
    pub seed_ops: Vec<SeedOp>,
    pub prefix: String,
    /// Against a replicated cluster: keys go to their shard's leader
    /// ([`crate::cluster`]); `endpoints` are its members.
    pub cluster: Option<Arc<BenchCluster>>,
    /// Set on SIGINT/SIGTERM: mixed-workload workers stop after the request
    /// in flight, skip their cleanup, and hand in what they recorded (so
    /// `--history` keeps an interrupted run's operations).
    pub stop: Arc<AtomicBool>,
    /// Set when `--stop-file` appears: the measurement ends after the
    /// request in flight, and the run cleans up and reports as usual.
    pub end: Arc<AtomicBool>,
}

/// A worker's results.
pub struct WorkerStats {
    pub latency: Histogram<u64>,
    pub corrected: Option<Histogram<u64>>,
    /// Measured operations by kind: set, get, delete.
    pub ops: [u64; 3],
    pub node_requests: Vec<u64>,
    pub errors: ErrorCounts,
    /// Cluster mode: 421s followed to the leader they named (nothing was
    /// proposed; routing, not errors), preload and cleanup included as
    /// errors are.
    pub redirects: u64,
    /// When its last measured request finished.
    pub finished: Option<Instant>,
    /// Set if the worker could not start (no connection to a node).
    pub setup_failure: Option<Failure>,
    /// Every operation, with `--history`.
    pub history: Option<Recorder>,
}

impl WorkerStats {
    fn new(nodes: usize, open_loop: bool) -> Self {
        WorkerStats {
            latency: new_histogram(),
            corrected: open_loop.then(new_histogram),
            ops: [0; 3],
            node_requests: vec![0; nodes],
            errors: ErrorCounts::default(),
            redirects: 0,
            finished: None,
            setup_failure: None,
            history: None,
        }
    }
}

/// What the worker knows about one of its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Absent,
    /// Holds the value written with this sequence number.
    Present(u64),
    /// A write failed mid-way: it may or may not have been applied.
    Unknown,
}

struct Key {
    path: Uri,
    /// Ring mode: the owner's index in the endpoints. Cluster mode: the
    /// key's shard (its leader is looked up per request).
    node: u32,
    state: State,
}

/// A value body `{"value":"<16 hex digits><padding>"}`, rewritten in place.
struct ValueTemplate {
    bytes: Vec<u8>,
}

const BODY_PREFIX: &[u8] = b"{\"value\":\"";
const HEX: &[u8; 16] = b"0123456789abcdef";

impl ValueTemplate {
    fn new(value_size: usize) -> Self {
        let mut bytes = Vec::with_capacity(value_size + 12);
        bytes.extend_from_slice(BODY_PREFIX);
        bytes.resize(BODY_PREFIX.len() + value_size, b'x');
        bytes.extend_from_slice(b"\"}");
        ValueTemplate { bytes }
    }

    /// Writes `seq` into the value; returns the whole PUT body.
    #[inline]
    fn render(&mut self, seq: u64) -> &[u8] {
        // `new` made room for the 16 digits (a value is at least 16 bytes),
        // and a nibble indexes `HEX`: neither `get` misses.
        let digits = self
            .bytes
            .get_mut(BODY_PREFIX.len()..BODY_PREFIX.len() + 16)
            .unwrap_or_default();
        for (i, digit) in digits.iter_mut().enumerate() {
            let nibble = ((seq >> (60 - 4 * i)) & 0xf) as usize;
            *digit = HEX.get(nibble).copied().unwrap_or(b'0');
        }
        &self.bytes
    }

    /// The JSON text of the value with `seq` (what a GET must return).
    #[inline]
    fn value(&mut self, seq: u64) -> &[u8] {
        // Between the prefix's opening quote and the closing brace.
        self.render(seq)
            .get(BODY_PREFIX.len() - 1..)
            .and_then(|rest| rest.strip_suffix(b"}"))
            .unwrap_or_default()
    }
}

/// A worker of the `mix` workload.
pub struct MixWorker {
    id: usize,
    shared: Arc<RunShared>,
    conns: Vec<Option<Conn>>,
    keys: Vec<Key>,
    put: ValueTemplate,
    expected: ValueTemplate,
    next_seq: u64,
    history: Option<Recorder>,
    /// 421s followed in cluster mode (see [`WorkerStats::redirects`]).
    redirects: u64,
    /// Cluster mode: members' departures dealt with (see
    /// [`BenchCluster::close_departed`]).
    departures: u64,
}

impl MixWorker {
    /// Worker `id`: builds its keys' paths and owners once, up front.
    pub fn new(id: usize, shared: Arc<RunShared>, ring: Option<&Ring>) -> Self {
        let plan = &shared.plan;
        let count = keys_of_worker(plan.keys, shared.workers, id);
        let keys: Vec<Key> = (0..count)
            .map(|local| {
                let name = format!("{}{}", shared.prefix, global_key(local, shared.workers, id));
                Key {
                    node: match &shared.cluster {
                        Some(cluster) => cluster.shard_of(name.as_bytes()),
                        None => ring.map_or(0, |r| r.owner_index(name.as_bytes()) as u32),
                    },
                    path: path_of(&name),
                    // --keep-keys: an earlier run may have left a value.
                    state: if plan.keep_keys {
                        State::Unknown
                    } else {
                        State::Absent
                    },
                }
            })
            .collect();
        let history = plan.history.then(|| {
            let names = keys
                .iter()
                .map(|k: &Key| k.path.path().trim_start_matches('/').to_owned())
                .collect();
            Recorder::new(id as u64, plan.value_size, names)
        });
        MixWorker {
            id,
            conns: (0..shared.endpoints.len()).map(|_| None).collect(),
            keys,
            history,
            put: ValueTemplate::new(plan.value_size),
            expected: ValueTemplate::new(plan.value_size),
            next_seq: (id as u64) << 40,
            redirects: 0,
            departures: 0,
            shared,
        }
    }

    /// Sends one operation on local key `local` and checks the answer.
    async fn execute(&mut self, kind: OpKind, local: usize) -> (Result<(), Failure>, usize) {
        // why: `local` is below `keys.len()`: the key picker draws below it
        // and preload and cleanup walk `0..keys.len()`.
        #[allow(clippy::indexing_slicing)]
        let key = &self.keys[local];
        let node = key.node as usize;
        let timeout = self.shared.plan.timeout;
        let mut seq = 0;
        let (method, body, expect) = match kind {
            OpKind::Set => {
                self.next_seq += 1;
                seq = self.next_seq;
                self.put.render(seq);
                (Method::PUT, true, Expect::Stored)
            }
            OpKind::Get => (
                Method::GET,
                false,
                match key.state {
                    State::Absent => Expect::Missing,
                    State::Present(_) => Expect::Value,
                    State::Unknown => Expect::Anything,
                },
            ),
            OpKind::Delete => (
                Method::DELETE,
                false,
                match key.state {
                    State::Absent => Expect::Missing,
                    State::Present(_) => Expect::Deleted,
                    State::Unknown => Expect::DeletedOrMissing,
                },
            ),
        };
        let body = body.then_some(self.put.bytes.as_slice());
        let client = self.shared.plan.client;
        let invoked = if self.history.is_some() {
            history::now_ns()
        } else {
            0
        };
        let (answer, node) = match self.shared.cluster.as_ref() {
            Some(cluster) => {
                let routed = cluster::routed(
                    cluster,
                    &mut self.conns,
                    &mut self.departures,
                    key.node,
                    method,
                    &key.path,
                    body,
                    timeout,
                    client,
                )
                .await;
                self.redirects += u64::from(routed.redirects);
                (routed.result, routed.node)
            }
            None => {
                // A key's node is an index of the endpoints, each with a
                // connection slot, so the `_` arm is never taken.
                let answer = match (self.conns.get_mut(node), self.shared.endpoints.get(node)) {
                    (Some(slot), Some(endpoint)) => {
                        exchange(slot, endpoint, client, method, &key.path, body, timeout).await
                    }
                    _ => Err(no_endpoint(node)),
                };
                (answer, node)
            }
        };
        if let Some(recorder) = self.history.as_mut() {
            let answer = answer.as_ref().map(|a| (a.status, &a.body[..]));
            recorder.record(local as u32, kind, Value::Seq(seq), invoked, answer);
        }
        // why: as above, `local` is below `keys.len()`.
        #[allow(clippy::indexing_slicing)]
        let key = &mut self.keys[local];
        let verdict = match answer {
            Ok(Answer { status, body, .. }) => {
                let value = match (kind, key.state) {
                    (OpKind::Get, State::Present(seq)) => self.expected.value(seq),
                    _ => &[],
                };
                let verdict = check(expect, status, &body, value, key.path.path());
                key.state = match (kind, status) {
                    (OpKind::Set, 200) => State::Present(seq),
                    (OpKind::Set, _) => State::Unknown,
                    (OpKind::Delete, 200 | 404) => State::Absent,
                    (OpKind::Delete, _) => State::Unknown,
                    (OpKind::Get, _) => key.state,
                };
                verdict
            }
            Err(failure) => {
                if kind != OpKind::Get {
                    key.state = State::Unknown;
                }
                Err(failure)
            }
        };
        (verdict, node)
    }

    /// Runs the worker: connect, preload, wait for the start, loop, clean up.
    pub async fn run(mut self) -> WorkerStats {
        let shared = self.shared.clone();
        let plan = &shared.plan;
        let mut stats = WorkerStats::new(shared.endpoints.len(), plan.rate.is_some());
        let setup = self.connect_all().await;
        let setup = match setup {
            Ok(()) if plan.preload => self.preload(&mut stats.errors).await,
            other => other,
        };
        // Every worker reaches the barrier, even a failed one, so the others
        // are not left waiting; a failed worker then sends nothing.
        shared.ready.wait().await;
        let Some(start) = wait_start(shared.start.clone()).await else {
            return stats;
        };
        if let Err(failure) = setup {
            stats.setup_failure = Some(failure);
            shared.batch.wait().await;
            return stats;
        }

        let measure_start = start + plan.warmup;
        let deadline = match plan.stop {
            Stop::Duration(d) => Some(measure_start + d),
            Stop::Requests(_) => None,
        };
        let mut remaining = match plan.stop {
            Stop::Requests(n) => requests_of_worker(n, shared.workers, self.id),
            Stop::Duration(_) => u64::MAX,
        };
        let interval = plan
            .rate
            .map(|rate| Duration::from_secs_f64(shared.workers as f64 / rate));
        // Spread the workers' schedules evenly over one interval.
        let mut due = start
            + interval.map_or(Duration::ZERO, |i| {
                i.mul_f64(self.id as f64 / shared.workers as f64)
            });
        let ops = OpPicker::new(plan.mix);
        let picker = KeyPicker::new(plan.distribution, self.keys.len() as u64);
        let mut rng = Rng::for_worker(plan.rng_seed, self.id);
        // why: `live` has one entry per worker, and ids are `0..workers`.
        #[allow(clippy::indexing_slicing)]
        let live = &shared.live[self.id];
        let (mut done, mut failed) = (0u64, 0u64);

        while remaining > 0
            && !shared.stop.load(Ordering::Relaxed)
            && !shared.end.load(Ordering::Relaxed)
        {
            let intended = match interval {
                Some(interval) => {
                    let this = due;
                    due += interval;
                    if deadline.is_some_and(|d| this >= d) {
                        break;
                    }
                    if Instant::now() < this {
                        // Ahead of schedule: the server delayed nothing, so
                        // the corrected latency starts when the request
                        // leaves, which keeps the timer's own lag (tokio's
                        // 1 ms resolution) out of the figure.
                        tokio::time::sleep_until(this.into()).await;
                        None
                    } else {
                        Some(this)
                    }
                }
                None => None,
            };
            let kind = ops.pick(&mut rng);
            let local = picker.pick(&mut rng) as usize;
            let sent = Instant::now();
            if interval.is_none() && deadline.is_some_and(|d| sent >= d) {
                break;
            }
            let (verdict, node) = self.execute(kind, local).await;
            let finished = Instant::now();
            // Behind schedule, the request was due before it could leave.
            let due_at = intended.unwrap_or(sent);
            if due_at >= measure_start {
                let _ = stats.latency.record(micros(finished - sent));
                if let Some(corrected) = stats.corrected.as_mut() {
                    let _ = corrected.record(micros(finished - due_at));
                }
                if let Some(ops) = stats.ops.get_mut(kind as usize) {
                    *ops += 1;
                }
                count_node(&mut stats.node_requests, node);
                stats.finished = Some(finished);
                remaining -= 1;
            }
            done += 1;
            if let Err(failure) = verdict {
                failed += 1;
                live.errors.store(failed, Ordering::Relaxed);
                back_off(&failure).await;
                stats.errors.record(failure);
            }
            live.ops.store(done, Ordering::Relaxed);
        }
        // Clean up only once every worker is done measuring, so cleanup
        // traffic never overlaps the measured tail of slower workers.
        shared.batch.wait().await;
        if !shared.stop.load(Ordering::Relaxed) && !plan.keep_keys {
            self.cleanup(&mut stats.errors).await;
        }
        stats.history = self.history.take();
        stats.redirects = self.redirects;
        stats
    }

    async fn connect_all(&mut self) -> Result<(), Failure> {
        let plan = &self.shared.plan;
        if self.shared.cluster.is_some() {
            connect_members(&mut self.conns, &self.shared.endpoints, plan).await;
            return Ok(());
        }
        // One slot per endpoint (`new`).
        let slots = self.conns.iter_mut();
        for ((node, endpoint), slot) in self.shared.endpoints.iter().enumerate().zip(slots) {
            if self.keys.iter().any(|k| k.node as usize == node) {
                *slot = Some(client::connect(endpoint, plan.timeout, plan.client).await?);
            }
        }
        Ok(())
    }

    /// Sets every key once (not measured), so GETs find values.
    async fn preload(&mut self, errors: &mut ErrorCounts) -> Result<(), Failure> {
        for local in 0..self.keys.len() {
            if let (Err(failure), _) = self.execute(OpKind::Set, local).await {
                errors.record(failure);
            }
        }
        Ok(())
    }

    /// Deletes every key that may hold a value (not measured; answers are
    /// still checked).
    async fn cleanup(&mut self, errors: &mut ErrorCounts) {
        for local in 0..self.keys.len() {
            if self
                .keys
                .get(local)
                .is_some_and(|key| key.state != State::Absent)
            {
                if let (Err(failure), _) = self.execute(OpKind::Delete, local).await {
                    errors.record(failure);
                }
            }
        }
    }
}

/// After a failure, a short pause so a dead node is not hammered with
/// connection attempts in a tight loop.
async fn back_off(failure: &Failure) {
    if failure.kind == crate::check::ErrorKind::Connect {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends on the node's connection, opening it first if needed; a connection
/// that failed is dropped (its state is unknown).
pub(crate) async fn exchange(
    slot: &mut Option<Conn>,
    endpoint: &Endpoint,
    client: ClientKind,
    method: Method,
    uri: &Uri,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    let conn = match slot {
        Some(conn) => conn,
        // Boxed: the connect future is large and rarely used; inline, it
        // would make every request's future that much bigger to move.
        None => slot.insert(Box::pin(client::connect(endpoint, timeout, client)).await?),
    };
    let result = client::send(conn, endpoint, method, uri, body, timeout).await;
    if result.is_err() || !conn.is_alive() {
        *slot = None;
    }
    result
}

/// Cluster mode: opens a connection to every member that takes one. Any
/// member may lead any shard, and one that is down now (a failover test
/// may start that way) is the routing rules' concern, not a setup failure:
/// its connection is opened when a request needs it.
async fn connect_members(conns: &mut [Option<Conn>], endpoints: &[Endpoint], plan: &Plan) {
    for (slot, endpoint) in conns.iter_mut().zip(endpoints) {
        match client::connect(endpoint, plan.timeout, plan.client).await {
            Ok(conn) => *slot = Some(conn),
            Err(failure) => log::debug!("{}: {}", endpoint.url, failure.detail),
        }
    }
}

/// The failure for a node with no endpoint: never made, as nodes are indices
/// of the endpoints.
fn no_endpoint(node: usize) -> Failure {
    Failure::new(ErrorKind::Connect, format!("node {node} has no endpoint"))
}

/// One more request answered by `node`; cluster mode learns nodes during a
/// run, so the counts grow with them.
fn count_node(counts: &mut Vec<u64>, node: usize) {
    if counts.len() <= node {
        counts.resize(node + 1, 0);
    }
    if let Some(count) = counts.get_mut(node) {
        *count += 1;
    }
}

async fn wait_start(mut start: watch::Receiver<Option<Instant>>) -> Option<Instant> {
    start.wait_for(Option::is_some).await.ok().and_then(|s| *s)
}

/// `/<name>`: keys in the default workloads need no percent-encoding.
pub fn path_of(name: &str) -> Uri {
    Uri::try_from(format!("/{name}")).unwrap_or_else(|_| Uri::from_static("/"))
}

/// A worker of the `seed` workload: op `b·C + id` of each batch `b`.
pub struct SeedWorker {
    id: usize,
    shared: Arc<RunShared>,
    ring: Option<Ring>,
    conns: Vec<Option<Conn>>,
    /// Keys a DELETE may not have removed.
    leftovers: Vec<u64>,
    history: Option<Recorder>,
    /// 421s followed in cluster mode (see [`WorkerStats::redirects`]).
    redirects: u64,
    /// Cluster mode: members' departures dealt with (see
    /// [`BenchCluster::close_departed`]).
    departures: u64,
}

impl SeedWorker {
    pub fn new(id: usize, shared: Arc<RunShared>, ring: Option<Ring>) -> Self {
        let history = shared
            .plan
            .history
            .then(|| Recorder::new(id as u64, shared.plan.value_size, Vec::new()));
        SeedWorker {
            id,
            conns: (0..shared.endpoints.len()).map(|_| None).collect(),
            shared,
            ring,
            leftovers: Vec::new(),
            history,
            redirects: 0,
            departures: 0,
        }
    }

    fn node_of(&self, name: &str) -> usize {
        self.ring
            .as_ref()
            .map_or(0, |r| r.owner_index(name.as_bytes()))
    }

    async fn execute(&mut self, op: SeedOp) -> (Result<(), Failure>, usize) {
        let name = format!("{}key_{}", self.shared.prefix, op.index);
        let value = format!("\"value_{}\"", op.index);
        let node = self.node_of(&name);
        let (method, body) = match op.kind {
            // The Flask client POSTs `{"value": "value_i"}`.
            OpKind::Set => (Method::POST, Some(format!("{{\"value\": {value}}}"))),
            OpKind::Get => (Method::GET, None),
            OpKind::Delete => (Method::DELETE, None),
        };
        let invoked = if self.history.is_some() {
            history::now_ns()
        } else {
            0
        };
        let path = path_of(&name);
        let (answer, node) = match self.shared.cluster.as_ref() {
            Some(cluster) => {
                let routed = cluster::routed(
                    cluster,
                    &mut self.conns,
                    &mut self.departures,
                    cluster.shard_of(name.as_bytes()),
                    method,
                    &path,
                    body.as_deref().map(str::as_bytes),
                    self.shared.plan.timeout,
                    self.shared.plan.client,
                )
                .await;
                self.redirects += u64::from(routed.redirects);
                (routed.result, routed.node)
            }
            None => {
                // `node_of` gives an index of the endpoints, each with a
                // connection slot, so the `_` arm is never taken.
                let answer = match (self.conns.get_mut(node), self.shared.endpoints.get(node)) {
                    (Some(slot), Some(endpoint)) => {
                        exchange(
                            slot,
                            endpoint,
                            self.shared.plan.client,
                            method,
                            &path,
                            body.as_deref().map(str::as_bytes),
                            self.shared.plan.timeout,
                        )
                        .await
                    }
                    _ => Err(no_endpoint(node)),
                };
                (answer, node)
            }
        };
        if let Some(recorder) = self.history.as_mut() {
            let key = recorder.add_key(name.clone());
            let put = if op.kind == OpKind::Set {
                recorder.add_value(value.clone())
            } else {
                Value::None
            };
            let answer = answer.as_ref().map(|a| (a.status, &a.body[..]));
            recorder.record(key, op.kind, put, invoked, answer);
        }
        let verdict = match answer {
            Ok(answer) => {
                // A DELETE that found nothing raced its key's SET, which may
                // land after it: delete that key again once the run is over.
                if op.kind == OpKind::Delete && answer.status != 200 {
                    self.leftovers.push(op.index);
                }
                check(
                    op.expect,
                    answer.status,
                    &answer.body,
                    value.as_bytes(),
                    &name,
                )
            }
            Err(failure) => {
                if op.kind == OpKind::Delete {
                    self.leftovers.push(op.index);
                }
                Err(failure)
            }
        };
        (verdict, node)
    }

    /// Deletes the keys whose DELETE may have left them (not measured; 200
    /// and 404 are both right).
    async fn cleanup(&mut self, errors: &mut ErrorCounts) {
        for index in std::mem::take(&mut self.leftovers) {
            let op = SeedOp {
                kind: OpKind::Delete,
                index,
                expect: Expect::DeletedOrMissing,
            };
            if let (Err(failure), _) = self.execute(op).await {
                errors.record(failure);
            }
        }
        self.leftovers.clear();
    }

    pub async fn run(mut self) -> WorkerStats {
        let shared = self.shared.clone();
        let mut stats = WorkerStats::new(shared.endpoints.len(), false);
        let mut setup = Ok(());
        if shared.cluster.is_some() {
            connect_members(&mut self.conns, &shared.endpoints, &shared.plan).await;
        } else {
            // One slot per endpoint (`new`).
            for (endpoint, slot) in shared.endpoints.iter().zip(self.conns.iter_mut()) {
                match client::connect(endpoint, shared.plan.timeout, shared.plan.client).await {
                    Ok(conn) => *slot = Some(conn),
                    Err(failure) => {
                        setup = Err(failure);
                        break;
                    }
                }
            }
        }
        shared.ready.wait().await;
        if wait_start(shared.start.clone()).await.is_none() {
            return stats;
        }
        if let Err(failure) = setup {
            stats.setup_failure = Some(failure);
        }
        let workers = shared.workers;
        let batches = shared.seed_ops.len().div_ceil(workers);
        // why: `live` has one entry per worker, and ids are `0..workers`.
        #[allow(clippy::indexing_slicing)]
        let live = &shared.live[self.id];
        let (mut done, mut failed) = (0u64, 0u64);
        for batch in 0..batches {
            if let Some(&op) = shared.seed_ops.get(batch * workers + self.id) {
                if stats.setup_failure.is_none() {
                    let sent = Instant::now();
                    let (verdict, node) = self.execute(op).await;
                    let finished = Instant::now();
                    let _ = stats.latency.record(micros(finished - sent));
                    if let Some(ops) = stats.ops.get_mut(op.kind as usize) {
                        *ops += 1;
                    }
                    count_node(&mut stats.node_requests, node);
                    stats.finished = Some(finished);
                    done += 1;
                    if let Err(failure) = verdict {
                        failed += 1;
                        live.errors.store(failed, Ordering::Relaxed);
                        stats.errors.record(failure);
                    }
                    live.ops.store(done, Ordering::Relaxed);
                }
            }
            // The next batch starts when the whole batch has answered; every
            // worker takes part in every barrier, even with nothing to send.
            shared.batch.wait().await;
        }
        self.cleanup(&mut stats.errors).await;
        stats.history = self.history.take();
        stats.redirects = self.redirects;
        stats
    }
}
