//! Cluster mode: each key goes to its shard's Raft leader (design §12).
//!
//! **Which mode.** At start the proxy asks every `--nodes` entry for
//! `GET /-/shards` ([`discover`]). A node in a replicated cluster answers
//! 200 with a [`ShardsView`]; a standalone kv-node answers 404. Any 200 →
//! cluster mode, routed by a [`ShardTable`]; otherwise (404s, nodes down,
//! anything else) → today's ring routing, unchanged. Each node gets
//! `--health-timeout` to answer, all at once, so a silent node delays the
//! start by at most that.
//!
//! **Switching later.** A proxy in ring mode keeps asking
//! ([`rediscover`]): every `--rediscover-every` (10 s; one small GET per
//! node), and at once when a node's answer is one only a cluster node gives
//! (a 421, an `X-Kv-Leader-Id` header: [`Mode::hint`]), so a proxy started
//! long before its nodes does not route by the ring forever. Once a node
//! shows a cluster whose members are all among `--nodes`, the proxy
//! switches to cluster mode for good and logs it once at info. Members at
//! other addresses (`localhost` in `--peers`, `127.0.0.1` in `--nodes`)
//! cannot be routed to without a pool and health checker each, so that is
//! a warning and the proxy stays in ring mode (which still works: the nodes
//! forward to their leaders). Standalone nodes answer 404 and nothing
//! changes for them.
//!
//! **Routing.** A key's request goes to its shard's leader with
//! `X-Kv-Route: direct`, so a node that is not the leader answers 421
//! naming it instead of forwarding. What each answer means is
//! [`kv_cluster::Routing`]'s, shared with kv-bench: follow a 421 (three hops
//! at once, then paced by table refreshes up to `--leader-wait`), wait out a 503 or a refused connection by refreshing the
//! table every 50 ms until a leader appears or `--leader-wait` passes (then
//! 503), and never retry a write that got a 504, timed out or whose
//! exchange broke (504: the outcome is unknown). A read has no side effect:
//! one that timed out, broke or got a 504 waits for a leader like a refused
//! connection, and one still unanswered after `READ_PATIENCE` (500 ms) is
//! sent to the new leader as soon as the other replicas name one, so a
//! frozen leader (SIGSTOP) costs reads an election's latency, not a 504.
//! The request body is read in full first (bodies are bounded by
//! `--max-body-bytes`), so a retry can send it again.
//!
//! **Stale reads.** A GET or HEAD with `X-Kv-Consistency: stale` may be
//! answered by any replica of its shard (design §6.3): the first try goes to
//! the shard's replicas in turn, spreading them; if that one cannot be
//! reached, the leader rules take over. The header goes on to the node.
//!
//! **The table** is shared by the workers behind a read-write lock that a
//! request holds only to look up an address. It is refreshed every second
//! in the background and whenever a request waits for a leader; waiting
//! requests share one refresh at a time (single flight), which asks every
//! member at once and merges every answer by term, so an answer from a
//! node that is down or cut off never holds the others up.
//!
//! A HEAD's 421 has no body to name the leader: it is treated as "no
//! leader named", so the request waits for one refresh of the table.
//!
//! Members are the ones of the first `/-/shards` answer: each has a pool
//! per worker and a health checker, as ring-mode nodes do. A leader at an
//! address that is not a member (membership changes, issue 13) is not
//! routed to until the proxy restarts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, HOST};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use kv_cluster::{
    wants_stale, Attempt, Next, Routing, ShardTable, ShardsView, BACKGROUND_REFRESH,
    CONSISTENCY_HEADER, REFRESH_EVERY, ROUTE_DIRECT, ROUTE_HEADER,
};
use kv_http::request::discard;
use kv_http::ApiError;
use parking_lot::RwLock;
use tokio::net::TcpStream;

use crate::api::{Body, Proxy};
use crate::error::ProxyError;
use crate::pool::PooledBody;
use crate::request_body::UpstreamBody;
use crate::upstream::{self, Node};

/// Largest 421 body read to learn the leader (they are ~100 bytes).
const MAX_NOT_LEADER_BODY: usize = 64 * 1024;

/// What the workers share in cluster mode.
pub struct Cluster {
    shards: u32,
    table: RwLock<ShardTable>,
    /// Where refreshes ask: the members, then any `--nodes` entry that is
    /// not one (deduplicated).
    sources: Vec<String>,
    /// When the last completed refresh started. Held across a refresh, so
    /// requests waiting at once share one.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// `--leader-wait`.
    pub leader_wait: Duration,
    /// Bound on one `/-/shards` fetch.
    fetch_timeout: Duration,
    pub stats: ClusterStats,
}

/// Counters for `/-/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// 421 answers followed.
    pub not_leader: AtomicU64,
    /// Requests that had to wait for a leader (once each).
    pub waited: AtomicU64,
    /// Requests refused with 503 after the wait or too many hops.
    pub no_leader: AtomicU64,
    /// Requests answered 504 (outcome unknown), relayed or the proxy's.
    pub unknown: AtomicU64,
    /// Refreshes of the table from `/-/shards`.
    pub refreshes: AtomicU64,
    /// Reads given up on at a leader that stopped answering and sent to
    /// the new one.
    pub abandoned: AtomicU64,
}

/// The proxy's routing mode, shared by the workers: ring until a node shows
/// a cluster, then cluster mode for good (set once, never unset).
#[derive(Default)]
pub struct Mode {
    cluster: OnceLock<Arc<Cluster>>,
    /// Wakes [`rediscover`] when a ring-mode answer looks like a cluster
    /// node's.
    hint: tokio::sync::Notify,
}

impl Mode {
    /// Cluster mode from the start.
    pub fn cluster(cluster: Arc<Cluster>) -> Self {
        let mode = Self::default();
        let _ = mode.cluster.set(cluster);
        mode
    }

    /// The cluster, once in cluster mode.
    #[inline]
    pub fn get(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// A node answered in ring mode as only a cluster member does: ask the
    /// nodes for `/-/shards` now rather than at the next period. Cheap (a
    /// stored permit), so every such answer may call it.
    pub fn hint(&self) {
        self.hint.notify_one();
    }
}

/// Whether a node's answer in ring mode is one only a cluster member gives:
/// a 421 (not the leader), or a header of the replicated path.
pub fn looks_clustered(status: StatusCode, headers: &hyper::HeaderMap) -> bool {
    status == StatusCode::MISDIRECTED_REQUEST
        || headers.contains_key(kv_cluster::LEADER_ID_HEADER)
        || headers.contains_key(kv_cluster::LEADER_HEADER)
}

/// One worker's view of the mode: the shared cluster (once there is one),
/// and its own turn for spreading stale reads over replicas.
pub struct ClusterWorker {
    pub mode: Arc<Mode>,
    stale_turn: AtomicUsize,
}

impl ClusterWorker {
    pub fn new(mode: Arc<Mode>) -> Self {
        Self {
            mode,
            stale_turn: AtomicUsize::new(0),
        }
    }

    /// The cluster, once in cluster mode.
    #[inline]
    pub fn get(&self) -> Option<&Arc<Cluster>> {
        self.mode.get()
    }
}

/// Ring mode's background task: asks `names` (the `--nodes`, which have
/// pools and health checkers) for `/-/shards` every `every` and whenever
/// [`Mode::hint`] wakes it (at most once a second), and switches to
/// cluster mode once a node shows a cluster whose members are all among
/// `names`; then keeps its table fresh ([`Cluster::refresh_forever`]).
pub async fn rediscover(
    mode: Arc<Mode>,
    names: Vec<String>,
    every: Duration,
    timeout: Duration,
    leader_wait: Duration,
) {
    const MIN_GAP: Duration = Duration::from_secs(1);
    let mut warned = false;
    let mut last = Instant::now();
    let cluster = loop {
        tokio::select! {
            () = tokio::time::sleep_until((last + every).into()) => {}
            () = mode.hint.notified() => {
                // Pacing: a burst of 421s asks once.
                tokio::time::sleep_until((last + MIN_GAP).into()).await;
            }
        }
        last = Instant::now();
        let Round::Cluster(table) = discover_once(&names, timeout).await else {
            continue;
        };
        let outside: Vec<&String> = table
            .members()
            .values()
            .filter(|addr| !names.contains(addr))
            .collect();
        if !outside.is_empty() {
            if !warned {
                log::warn!(
                    "the nodes form a replicated cluster, but members {outside:?} are not among \
                     --nodes {names:?}: staying in ring mode (the nodes forward to their leaders); \
                     give --nodes the members' addresses as --peers does and restart the proxy"
                );
                warned = true;
            }
            continue;
        }
        break Arc::new(Cluster::new(table, &names, leader_wait, timeout));
    };
    log::info!(
        "a node answered GET /-/shards as a cluster member: switching to cluster mode: {} \
         shards, routed to their leaders; leader wait {}",
        cluster.shards(),
        humantime::format_duration(leader_wait)
    );
    let _ = mode.cluster.set(Arc::clone(&cluster));
    cluster.refresh_forever().await;
}

/// What a node said to `GET /-/shards`.
#[derive(Debug)]
pub enum Discovered {
    /// A cluster member: its view.
    Cluster(ShardsView),
    /// 404: a standalone node.
    Standalone,
}

/// Asks every node in `nodes` for `/-/shards` at once, each within
/// `timeout`, and again every 100 ms while none has answered, for up to
/// `wait`. `Some` with a table merged from every answer of the round in
/// which any node said it is in a cluster; `None` for ring mode (a node
/// answered 404, or none answered within `wait`).
///
/// Why wait: nodes started together with the proxy may not serve yet, and
/// a proxy that guessed ring mode in front of a cluster would relay every
/// election's 503s instead of waiting them out.
pub async fn discover(nodes: &[String], timeout: Duration, wait: Duration) -> Option<ShardTable> {
    let deadline = Instant::now() + wait;
    loop {
        match discover_once(nodes, timeout).await {
            Round::Cluster(table) => return Some(table),
            Round::Standalone => return None,
            Round::NoAnswer => {}
        }
        if Instant::now() >= deadline {
            log::warn!(
                "no node answered GET /-/shards within {}: starting in ring mode; asking again \
                 in the background, to switch to cluster mode if they form a replicated cluster",
                humantime::format_duration(wait)
            );
            return None;
        }
        // Pacing between rounds of asking, not synchronisation.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one round of asking every node found.
enum Round {
    Cluster(ShardTable),
    Standalone,
    NoAnswer,
}

async fn discover_once(nodes: &[String], timeout: Duration) -> Round {
    let mut tasks = tokio::task::JoinSet::new();
    for node in nodes {
        let node = node.clone();
        tasks.spawn(async move {
            let found = fetch_view(&node, timeout).await;
            (node, found)
        });
    }
    let mut table: Option<ShardTable> = None;
    let mut standalone = false;
    while let Some(joined) = tasks.join_next().await {
        let Ok((node, found)) = joined else { continue };
        match found {
            Ok(Discovered::Cluster(view)) => match &mut table {
                Some(table) => {
                    if let Err(error) = table.refresh(view) {
                        log::warn!("node {node}: {error}");
                    }
                }
                None => match ShardTable::from_view(view) {
                    Ok(first) => table = Some(first),
                    Err(error) => log::warn!("node {node}: {error}"),
                },
            },
            Ok(Discovered::Standalone) => {
                log::debug!("node {node} is standalone");
                standalone = true;
            }
            Err(error) => log::debug!("node {node}: no /-/shards answer yet: {error}"),
        }
    }
    match (table, standalone) {
        (Some(table), _) => Round::Cluster(table),
        (None, true) => Round::Standalone,
        (None, false) => Round::NoAnswer,
    }
}

/// `GET /-/shards` from `node` on a fresh connection, within `timeout`.
pub async fn fetch_view(node: &str, timeout: Duration) -> Result<Discovered, String> {
    let (status, body) = tokio::time::timeout(timeout, get(node, "/-/shards"))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    match status {
        200 => ShardsView::parse(&body)
            .map(Discovered::Cluster)
            .map_err(|e| e.to_string()),
        404 => Ok(Discovered::Standalone),
        other => Err(format!("answered {other}")),
    }
}

/// One GET on a fresh connection: status and whole body.
async fn get(node: &str, path: &'static str) -> Result<(u16, Bytes), String> {
    let stream = TcpStream::connect(node)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let driver = tokio::spawn(connection);
    let host = HeaderValue::from_str(node).map_err(|e| format!("host: {e}"))?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = Uri::from_static(path);
    request.headers_mut().insert(HOST, host);
    crate::node_auth::mark(request.headers_mut());
    let answer = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| upstream::error_chain(&e))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| upstream::error_chain(&e))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    answer
}

impl Cluster {
    /// Cluster state from the table [`discover`] built. `nodes` are the
    /// `--nodes` entries, asked too when refreshing.
    pub fn new(
        table: ShardTable,
        nodes: &[String],
        leader_wait: Duration,
        fetch_timeout: Duration,
    ) -> Self {
        let mut sources: Vec<String> = table.members().values().cloned().collect();
        for node in nodes {
            if !sources.contains(node) {
                sources.push(node.clone());
            }
        }
        Self {
            shards: table.shards(),
            table: RwLock::new(table),
            sources,
            refreshed: tokio::sync::Mutex::new(None),
            leader_wait,
            fetch_timeout,
            stats: ClusterStats::default(),
        }
    }

    /// The member addresses, in member id order: the nodes requests go to.
    pub fn members(&self) -> Vec<String> {
        self.table.read().members().values().cloned().collect()
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shards whose leader is not known right now.
    pub fn without_leader(&self) -> Vec<u32> {
        let table = self.table.read();
        (0..self.shards)
            .filter(|&shard| table.leader(shard).is_none())
            .collect()
    }

    /// `key`'s shard and its leader's address, if known.
    pub fn leader_of(&self, key: &[u8]) -> (u32, Option<String>) {
        let shard = kv_cluster::shard_of(key, self.shards);
        let leader = self.table.read().leader(shard).map(|l| l.addr.clone());
        (shard, leader)
    }

    /// Refreshes the table from every source at once unless a refresh that
    /// started at or after `wanted` has completed meanwhile. Returns when
    /// one answer was merged, or every source failed (each within the
    /// fetch bound); the others still merge when they arrive.
    pub async fn refresh(self: &Arc<Self>, wanted: Instant) {
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|last| last >= wanted) {
            return;
        }
        let started = Instant::now();
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(self.sources.len().max(1));
        for source in &self.sources {
            let (cluster, source, done) = (Arc::clone(self), source.clone(), done_tx.clone());
            tokio::spawn(async move {
                let merged = cluster.refresh_from(&source).await;
                let _ = done.send(merged).await;
            });
        }
        drop(done_tx);
        while let Some(merged) = done_rx.recv().await {
            if merged {
                break;
            }
        }
        *last = Some(started);
    }

    async fn refresh_from(&self, source: &str) -> bool {
        match fetch_view(source, self.fetch_timeout).await {
            Ok(Discovered::Cluster(view)) => match self.table.write().refresh(view) {
                Ok(changed) => {
                    if changed > 0 {
                        log::debug!("{changed} shard leaders learned from {source}");
                    }
                    true
                }
                Err(error) => {
                    log::warn!("node {source}: {error}");
                    false
                }
            },
            Ok(Discovered::Standalone) => {
                log::warn!("node {source} answers /-/shards with 404: not in the cluster");
                false
            }
            Err(error) => {
                log::debug!("refresh from {source}: {error}");
                false
            }
        }
    }

    /// Resolves once the table names another leader for `routing`'s shard
    /// than the one at `sent_to` (or none): after `patience`, refreshing
    /// the table every [`REFRESH_EVERY`] (shared with every request waiting
    /// at once). Pending forever while `sent_to` stays the leader, so a
    /// slow but healthy leader keeps its read.
    async fn leader_moved(self: &Arc<Self>, routing: &Routing, sent_to: &str, patience: Duration) {
        tokio::time::sleep(patience).await;
        loop {
            let asked = Instant::now();
            self.refresh(asked).await;
            if routing.moved(&self.table.read(), sent_to) {
                return;
            }
            tokio::time::sleep_until((asked + REFRESH_EVERY).into()).await;
        }
    }

    /// Refreshes the table every [`BACKGROUND_REFRESH`], forever.
    pub async fn refresh_forever(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(BACKGROUND_REFRESH);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.refresh(Instant::now()).await;
        }
    }

    /// The index in `nodes` of the node at `addr`.
    fn node_index(nodes: &[Node], addr: &str) -> Option<usize> {
        nodes.iter().position(|node| node.name == addr)
    }

    /// Where to send `shard`'s next attempt: its leader, as a node index.
    fn leader_index(&self, nodes: &[Node], shard: u32) -> Option<usize> {
        let table = self.table.read();
        let leader = table.leader(shard)?;
        Self::node_index(nodes, &leader.addr)
    }

    /// A replica of `shard` for a stale read: the `turn`-th, in turn.
    fn replica_index(&self, nodes: &[Node], shard: u32, turn: usize) -> Option<usize> {
        let table = self.table.read();
        let replicas = table.replicas(shard);
        if replicas.is_empty() {
            return None;
        }
        let id = replicas[turn % replicas.len()];
        Self::node_index(nodes, table.members().get(&id)?)
    }
}

/// Forwards a key's `request` to the leader of its `shard` by the rules in
/// the module docs.
pub async fn forward(
    proxy: &Proxy,
    worker: &ClusterWorker,
    cluster: &Arc<Cluster>,
    request: Request<Incoming>,
    shard: u32,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    let body = read_body(body, proxy.max_body_bytes, proxy.request_timeout).await?;
    prepare(&mut parts);
    let read = matches!(parts.method, Method::GET | Method::HEAD);
    let stale = read
        && parts
            .headers
            .get(CONSISTENCY_HEADER)
            .is_some_and(|value| wants_stale(value.as_bytes()));
    let mut routing = Routing::new(shard, read, cluster.leader_wait);
    let mut first = stale
        .then(|| {
            let turn = worker.stale_turn.fetch_add(1, Ordering::Relaxed);
            cluster.replica_index(&proxy.nodes, shard, turn)
        })
        .flatten();
    loop {
        let replica = first.take();
        let target = replica.or_else(|| cluster.leader_index(&proxy.nodes, shard));
        let (tried, index) = match (target, routing.patience()) {
            // A read at the leader: abandoned if the leader moves while it
            // waits (a frozen leader), see `kv_cluster::Routing::moved`.
            (Some(index), Some(patience)) if replica.is_none() => {
                let send = attempt(proxy, index, &parts, &body);
                let moved = cluster.leader_moved(&routing, &proxy.nodes[index].name, patience);
                let tried = tokio::select! {
                    tried = send => tried,
                    () = moved => Tried::Abandoned,
                };
                (tried, Some(index))
            }
            (Some(index), _) => (attempt(proxy, index, &parts, &body).await, Some(index)),
            (None, _) => (Tried::NotSent, None),
        };
        // The common case, decided without the table's lock.
        let tried = match tried {
            Tried::Answered(response) if kv_cluster::is_final(response.status().as_u16()) => {
                return Ok(response.map(Either::Left));
            }
            // A node's own 504 to a write: relayed, never retried. A read's
            // goes by the rules below (it may be sent again).
            Tried::Answered(response) if !read => return relay_unknown(cluster, response),
            other => other,
        };
        // A replica picked for a stale read could not be reached: that says
        // nothing about the leader, so go to it without touching the table.
        if replica.is_some() && matches!(tried, Tried::NotSent) {
            continue;
        }
        let now = Instant::now();
        let next = {
            let mut table = cluster.table.write();
            let seen = match &tried {
                Tried::Answered(response) => Attempt::Answered {
                    status: response.status().as_u16(),
                    body: &[],
                },
                Tried::Abandoned => Attempt::Abandoned,
                Tried::NotLeader(body) => Attempt::Answered {
                    status: kv_cluster::NOT_LEADER_STATUS,
                    body,
                },
                Tried::Unavailable => Attempt::Answered {
                    status: 503,
                    body: &[],
                },
                Tried::NotSent => Attempt::NotSent,
                Tried::Lost(_) => Attempt::Lost,
                Tried::TimedOut(_) => Attempt::TimedOut,
            };
            routing.next(&mut table, seen, now)
        };
        match next {
            // The rules deliver answers only, handled above.
            Next::Deliver => return Err(no_leader(cluster, &routing, now)),
            Next::Retry => {
                let counter = match tried {
                    Tried::Abandoned => &cluster.stats.abandoned,
                    _ => &cluster.stats.not_leader,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Next::WaitForLeader => {
                if routing.waited(now).is_zero() {
                    cluster.stats.waited.fetch_add(1, Ordering::Relaxed);
                }
                if let Tried::NotLeader(_) = tried {
                    cluster.stats.not_leader.fetch_add(1, Ordering::Relaxed);
                }
                let at = routing.refresh_at(now);
                tokio::time::sleep_until(at.into()).await;
                cluster.refresh(at).await;
                routing.refreshed(Instant::now());
            }
            Next::NoLeader => return Err(no_leader(cluster, &routing, now)),
            Next::TooManyHops => {
                cluster.stats.no_leader.fetch_add(1, Ordering::Relaxed);
                return Err(ProxyError::LeaderMoving {
                    shard,
                    hops: routing.hops() - 1,
                });
            }
            Next::Unknown => {
                cluster.stats.unknown.fetch_add(1, Ordering::Relaxed);
                let node = index.map_or_else(String::new, |i| proxy.nodes[i].name.clone());
                return match tried {
                    Tried::TimedOut(after) => Err(ProxyError::Timeout { node, after }),
                    Tried::Lost(why) => Err(ProxyError::OutcomeUnknown { node, why }),
                    _ => Err(ProxyError::OutcomeUnknown {
                        node,
                        why: "no answer".into(),
                    }),
                };
            }
        }
    }
}

/// A node's own 504 (a timeout after proposing): relayed as it said it,
/// never retried.
fn relay_unknown(
    cluster: &Cluster,
    response: Response<PooledBody>,
) -> Result<Response<Body>, ProxyError> {
    cluster.stats.unknown.fetch_add(1, Ordering::Relaxed);
    Ok(response.map(Either::Left))
}

fn no_leader(cluster: &Cluster, routing: &Routing, now: Instant) -> ProxyError {
    cluster.stats.no_leader.fetch_add(1, Ordering::Relaxed);
    ProxyError::NoLeader {
        shard: routing.shard(),
        waited: routing.waited(now),
    }
}

/// What one attempt came to, with what the caller needs of it.
enum Tried {
    /// An answer to hand on (or to judge by its status).
    Answered(Response<PooledBody>),
    /// A 421, its body read.
    NotLeader(Bytes),
    /// A 503 (no leader or no quorum there), its body read and dropped.
    Unavailable,
    NotSent,
    /// Sent, then the exchange broke: why.
    Lost(String),
    /// No answer within the request timeout.
    TimedOut(Duration),
    /// A read given up on: the leader moved while it waited.
    Abandoned,
}

/// One attempt at `nodes[index]`: everything about the node is in
/// [`Tried`].
async fn attempt(proxy: &Proxy, index: usize, parts: &Parts, body: &Bytes) -> Tried {
    let node = &proxy.nodes[index];
    if !node.health.is_up() {
        node.stats.record::<()>(&Err(ProxyError::NodeDown {
            node: node.name.clone(),
        }));
        return Tried::NotSent;
    }
    let mut request = Request::new(UpstreamBody::Buffered(Some(body.clone())));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.headers_mut() = parts.headers.clone();
    if !request.headers().contains_key(HOST) {
        request.headers_mut().insert(HOST, node.header.clone());
    }
    let timeout = proxy.request_timeout;
    let sent =
        tokio::time::timeout(timeout, upstream::send(&proxy.pools[index], node, request)).await;
    let tried = match sent {
        Err(_) => Tried::TimedOut(timeout),
        Ok(Err(error)) => {
            // Could not connect: nothing was sent.
            node.stats.record::<()>(&Err(error));
            return Tried::NotSent;
        }
        Ok(Ok(Err(error))) => Tried::Lost(upstream::error_chain(&error)),
        Ok(Ok(Ok(response))) => {
            if response.status() == StatusCode::UNAUTHORIZED && crate::node_auth::is_set() {
                // The node refused the proxy's token before doing anything
                // (a member started with another token): as a node that
                // cannot be reached, so the request waits for a leader the
                // proxy can use instead of failing.
                let _ = read_small(response, timeout).await;
                crate::node_auth::refused_by(&node.name);
                return Tried::NotSent;
            }
            if response.status() == StatusCode::MISDIRECTED_REQUEST {
                match read_small(response, timeout).await {
                    Some(body) => Tried::NotLeader(body),
                    // A 421 is given before proposing, whatever became of
                    // its body: safe to treat as "no leader named".
                    None => Tried::NotLeader(Bytes::new()),
                }
            } else {
                if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                    // Read to the end so the connection goes back to the
                    // pool; the body is not needed.
                    let _ = read_small(response, timeout).await;
                    node.stats.record::<()>(&Ok(()));
                    return Tried::Unavailable;
                }
                Tried::Answered(response)
            }
        }
    };
    let counted: Result<(), ProxyError> = match &tried {
        Tried::TimedOut(after) => Err(ProxyError::Timeout {
            node: node.name.clone(),
            after: *after,
        }),
        Tried::Lost(why) => Err(ProxyError::Upstream {
            node: node.name.clone(),
            why: why.clone(),
        }),
        _ => Ok(()),
    };
    node.stats.record(&counted);
    tried
}

/// Reads a small answer body in full (at most [`MAX_NOT_LEADER_BODY`]).
async fn read_small(response: Response<PooledBody>, timeout: Duration) -> Option<Bytes> {
    let body = http_body_util::Limited::new(response.into_body(), MAX_NOT_LEADER_BODY);
    match tokio::time::timeout(timeout, body.collect()).await {
        Ok(Ok(collected)) => Some(collected.to_bytes()),
        _ => None,
    }
}

/// Origin-form URI, HTTP/1.1, no hop-by-hop headers, `X-Kv-Route: direct`.
fn prepare(parts: &mut Parts) {
    if parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    }
    parts.version = Version::HTTP_11;
    parts.extensions = Default::default();
    upstream::strip_hop_by_hop(&mut parts.headers);
    // The client's framing no longer applies: the buffered body is sent
    // with its exact length.
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    // The body is here already: the node has nothing to say before it.
    parts.headers.remove(hyper::header::EXPECT);
    parts
        .headers
        .insert(ROUTE_HEADER, HeaderValue::from_static(ROUTE_DIRECT));
}

/// The whole request body, at most `limit` bytes (413 past it, after
/// discarding the rest as kv-node does), within `timeout` (408).
async fn read_body(
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ProxyError> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let read = async {
        let mut first: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::BodyRead(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            total += data.len();
            if total > limit {
                discard(&mut body).await;
                return Err(ApiError::BodyTooLarge { limit });
            }
            match (&mut first, &mut joined) {
                (None, _) => first = Some(data),
                (Some(head), None) => {
                    let mut all = BytesMut::with_capacity(head.len() + data.len());
                    all.extend_from_slice(head);
                    all.extend_from_slice(&data);
                    joined = Some(all);
                }
                (Some(_), Some(all)) => all.extend_from_slice(&data),
            }
        }
        Ok(match (first, joined) {
            (_, Some(all)) => all.freeze(),
            (Some(one), None) => one,
            (None, None) => Bytes::new(),
        })
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result.map_err(ProxyError::Api),
        Err(_) => Err(ApiError::BodyTimeout.into()),
    }
}
