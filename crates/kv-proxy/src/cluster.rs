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
//! shows a cluster, the proxy switches to cluster mode for good and logs it
//! once at info. Standalone nodes answer 404 and nothing changes for them.
//!
//! **`--nodes` are seeds** in cluster mode (issue 13, `docs/membership.md`
//! §6): the members and their addresses are the ones the nodes' `/-/shards`
//! name, so a proxy given one node's address finds the whole cluster, and
//! every proxy follows members that join or leave without a restart. Each
//! member address has a health checker (on the proxy's main runtime) and,
//! in each worker, a connection pool, both created when the address is
//! first learnt (a refresh, or a 421 naming a leader at an address not
//! known yet) and dropped once it is neither a member nor a shard's leader
//! in the table ([`Cluster::sync_nodes`], the workers' once-a-second
//! [`ClusterWorker::evict`]). Refreshes ask the members, and the seeds
//! that are not members as a fallback.
//!
//! **Placement versions, and which to trust.** The table holds the cluster
//! id and placement version of its layout ([`kv_cluster::Placement`]) and
//! merges each source's answer by [`ShardTable::merge`]: members and
//! replicas from an answer of its version or newer; another cluster's
//! answer (a cluster created again at the same addresses) rebuilds it once
//! no source shows the old cluster any more (logged once at warn: "cluster
//! id changed from X to Y: following the new cluster"), and is ignored
//! while one does (logged once per source); a layout no source shows any
//! more (one node said `u64::MAX` once, then thought better of it, or went
//! away) gives way to the newest layout the sources show. A source that
//! does not answer is forgotten until it does. The table is refreshed
//! every second, when a 421 names a leader at an address that is not a
//! member's, and when an answer carries an `X-Kv-Placement-Version` newer
//! than its own; the last two in the background
//! ([`Cluster::refresh_soon`]), so the request that noticed does not wait
//! for it. The header is only a hint: a refresh that does not reach the
//! version it showed doubles the pause before the next hinted one, up to the
//! 1 s period ([`kv_cluster::HintBackoff`]). A `/-/shards` body is read up
//! to [`MAX_SHARDS_BODY`]; a longer one is an error (logged at warn, the
//! table kept).
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
//! **One wait per request.** `--leader-wait` counts from when the request
//! arrived, first try included, and every try carries what is left of it
//! (`X-Kv-Wait-Budget-Ms`): the node cuts its own wait for a quorum there,
//! so a leader that cannot confirm a read costs the rest of the budget, not
//! another `--raft-write-timeout` on top of the proxy's wait. The waits end
//! [`kv_cluster::answer_margin`] (50 ms) before the bound, so the 503 is
//! given within it, and says how long the request took (`waited 2s 958ms`).
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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use kv_cluster::{
    wants_stale, Attempt, HintBackoff, Merge, Next, NotLeader, Placement, Routing, ShardTable,
    ShardsView, TableView, Taken, CONSISTENCY_HEADER, PLACEMENT_VERSION_HEADER, REFRESH_EVERY,
    ROUTE_DIRECT, ROUTE_HEADER, WAIT_BUDGET_HEADER,
};
use kv_http::tls::Tls;
use parking_lot::{Mutex, RwLock};
use tokio::task::JoinHandle;

use crate::api::{Body, Proxy};
use crate::error::ProxyError;
use crate::exchange::PooledBody;
use crate::health;
use crate::pool::{NodePool, PoolSettings};
use crate::upstream::{self, Node};

/// Largest 421 body read to learn the leader (they are ~100 bytes).
const MAX_NOT_LEADER_BODY: usize = 64 * 1024;
/// Largest `/-/shards` body read: 4096 shards (the most there can be) of
/// three replicas take about 1 MiB.
pub const MAX_SHARDS_BODY: usize = 4 << 20;

/// How the cluster mode's fetches and health checks are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ClusterSettings {
    /// `--leader-wait`.
    pub leader_wait: Duration,
    /// Bound on one `/-/shards` fetch.
    pub fetch_timeout: Duration,
    /// `--health-interval` of each member's checker.
    pub health_interval: Duration,
    /// `--health-timeout` of one check.
    pub health_timeout: Duration,
    /// How often the table is refreshed in the background
    /// ([`kv_cluster::BACKGROUND_REFRESH`] unless a test says otherwise).
    pub refresh_every: Duration,
}

/// What the workers share in cluster mode.
pub struct Cluster {
    table: RwLock<ShardTable>,
    /// `--nodes`: asked at start, and by refreshes when they are not
    /// members (a fallback when no member answers).
    seeds: Vec<String>,
    /// Address → the node there, for every member and every leader the
    /// table names ([`Cluster::sync_nodes`]).
    nodes: RwLock<HashMap<String, Member>>,
    /// Where health checkers run: the runtime that built the cluster (the
    /// proxy's main one), not the worker that happens to learn an address.
    runtime: Option<tokio::runtime::Handle>,
    /// When the last completed refresh started. Held across a refresh, so
    /// requests waiting at once share one.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// A background refresh ([`Cluster::refresh_soon`]) is under way.
    refreshing_soon: AtomicBool,
    /// The newest `X-Kv-Placement-Version` an answer showed since the last
    /// background refresh.
    hinted: AtomicU64,
    /// The pause after a background refresh, by whether it reached `hinted`.
    backoff: Mutex<HintBackoff>,
    /// Sources already reported as standalone (404 to `/-/shards`).
    standalone_warned: Mutex<HashSet<String>>,
    /// Sources already reported as answering for another cluster.
    other_cluster_warned: Mutex<HashSet<String>>,
    pub leader_wait: Duration,
    settings: ClusterSettings,
    pub stats: ClusterStats,
}

/// A member's node and its health checker, stopped when it is dropped.
struct Member {
    node: Arc<Node>,
    checker: Option<JoinHandle<()>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(checker) = self.checker.take() {
            checker.abort();
        }
    }
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
/// a 421 (not the leader), a header of the replicated path, or the
/// placement version every answer of a cluster node carries (issue 13).
pub fn looks_clustered(status: StatusCode, headers: &hyper::HeaderMap) -> bool {
    status == StatusCode::MISDIRECTED_REQUEST
        || headers.contains_key(kv_cluster::LEADER_ID_HEADER)
        || headers.contains_key(kv_cluster::LEADER_HEADER)
        || headers.contains_key(PLACEMENT_VERSION_HEADER)
}

/// One worker's view of the mode: the shared cluster (once there is one),
/// its own connection pools to the cluster's nodes, and its own turn for
/// spreading stale reads over replicas.
pub struct ClusterWorker {
    pub mode: Arc<Mode>,
    /// Address → this worker's pool, created on first use.
    pools: Mutex<HashMap<String, Arc<NodePool>>>,
    pool_settings: PoolSettings,
    stale_turn: AtomicUsize,
}

impl ClusterWorker {
    pub fn new(mode: Arc<Mode>, pool_settings: PoolSettings) -> Self {
        Self {
            mode,
            pools: Mutex::new(HashMap::new()),
            pool_settings,
            stale_turn: AtomicUsize::new(0),
        }
    }

    /// The cluster, once in cluster mode.
    #[inline]
    pub fn get(&self) -> Option<&Arc<Cluster>> {
        self.mode.get()
    }

    /// This worker's pool for `addr`, made on first use.
    fn pool(&self, addr: &str) -> Arc<NodePool> {
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get(addr) {
            return Arc::clone(pool);
        }
        let pool = Arc::new(NodePool::new(addr, self.pool_settings));
        pools.insert(addr.to_owned(), Arc::clone(&pool));
        pool
    }

    /// Closes idle connections, and drops the pools of addresses the
    /// cluster no longer routes to (their connections close).
    pub fn evict(&self) {
        let Some(cluster) = self.get() else {
            return;
        };
        let mut pools = self.pools.lock();
        pools.retain(|addr, _| cluster.has_node(addr));
        for pool in pools.values() {
            pool.evict_idle();
        }
    }
}

/// Ring mode's background task: asks `names` (the `--nodes`) for
/// `/-/shards` every `every` and whenever [`Mode::hint`] wakes it (at most
/// once a second), and switches to cluster mode once a node shows a
/// cluster; then keeps its table fresh ([`Cluster::refresh_forever`]).
pub async fn rediscover(
    mode: Arc<Mode>,
    names: Vec<String>,
    every: Duration,
    settings: ClusterSettings,
) {
    const MIN_GAP: Duration = Duration::from_secs(1);
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
        if let Round::Cluster(table) = discover_once(&names, settings.fetch_timeout).await {
            break Cluster::new(table, &names, settings);
        }
    };
    log::info!(
        "a node answered GET /-/shards as a cluster member: switching to cluster mode: {} \
         shards, routed to their leaders; leader wait {}; members {}",
        cluster.shards(),
        humantime::format_duration(settings.leader_wait),
        cluster.members().join(", ")
    );
    let _ = mode.cluster.set(Arc::clone(&cluster));
    cluster.refresh_forever().await;
}

/// What a node said to `GET /-/shards`.
#[derive(Debug)]
pub enum Discovered {
    /// A cluster member: its view, and the cluster id and placement version
    /// it shows.
    Cluster(ShardsView, Placement),
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
            Ok(Discovered::Cluster(view, placement)) => match &mut table {
                Some(table) => match table.merge(&node, view, placement) {
                    Ok(merged) => report_merge(&node, &merged),
                    Err(error) => log::warn!("node {node}: {error}"),
                },
                None => match ShardTable::from_answer(&node, view, placement) {
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

/// Why a `GET /-/shards` gave nothing to route by.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No answer (down, refused, timed out, cut off): common, said at debug.
    #[error("{0}")]
    NoAnswer(String),
    /// A status other than 200 and 404.
    #[error("answered {0}")]
    Status(u16),
    /// A body past [`MAX_SHARDS_BODY`]: not read further.
    #[error("its /-/shards body is over {limit} bytes: not read (the table is kept)")]
    TooLarge {
        /// The bound.
        limit: usize,
    },
    /// A body that is no [`ShardsView`].
    #[error("{0}")]
    Invalid(#[from] kv_cluster::TableError),
}

impl FetchError {
    /// Worth a warning: the node answered, wrongly (a refusal or silence
    /// is the usual life of a node that is down or starting).
    fn is_wrong_answer(&self) -> bool {
        matches!(self, FetchError::TooLarge { .. } | FetchError::Invalid(_))
    }
}

/// `GET /-/shards` from `node` on a fresh connection, within `timeout`,
/// the body read up to [`MAX_SHARDS_BODY`].
pub async fn fetch_view(node: &str, timeout: Duration) -> Result<Discovered, FetchError> {
    let (status, body) = tokio::time::timeout(timeout, get(node, "/-/shards"))
        .await
        .map_err(|_| FetchError::NoAnswer(format!("no answer within {timeout:?}")))??;
    match status {
        200 => Ok(Discovered::Cluster(
            ShardsView::parse(&body)?,
            Placement::of(&body),
        )),
        404 => Ok(Discovered::Standalone),
        other => Err(FetchError::Status(other)),
    }
}

/// Logs what [`ShardTable::merge`] did that an operator should know: the
/// cluster followed changed, or a layout was given up for an older one (a
/// source answering for another cluster is the caller's to say, once).
fn report_merge(source: &str, merged: &Merge) {
    match merged.taken {
        Taken::NewCluster { from, to } => {
            log::warn!(
                "cluster id changed from {from} to {to}: following the new cluster (node \
                 {source} answers for it, and no node answers for the old one any more)"
            );
        }
        Taken::WentBack { from, to } => {
            log::warn!(
                "no node shows placement version {from} any more: taking version {to}, the \
                 newest shown (from node {source})"
            );
        }
        Taken::OtherCluster { .. } | Taken::Layout | Taken::Leaders => {}
    }
}

/// One GET on a fresh connection: status and body (at most
/// [`MAX_SHARDS_BODY`] bytes).
async fn get(node: &str, path: &'static str) -> Result<(u16, Bytes), FetchError> {
    let no_answer = FetchError::NoAnswer;
    let stream = Tls::connect(crate::node_auth::tls(), node)
        .await
        .map_err(|e| no_answer(format!("connect: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| no_answer(format!("handshake: {e}")))?;
    let driver = tokio::spawn(connection);
    let host = HeaderValue::from_str(node).map_err(|e| no_answer(format!("host: {e}")))?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = Uri::from_static(path);
    request.headers_mut().insert(HOST, host);
    crate::node_auth::mark(request.headers_mut());
    let answer = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| no_answer(upstream::error_chain(&e)))?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), MAX_SHARDS_BODY)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge {
                        limit: MAX_SHARDS_BODY,
                    }
                } else {
                    no_answer(error.to_string())
                }
            })?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    answer
}

impl Cluster {
    /// Cluster state from the table [`discover`] built. `seeds` are the
    /// `--nodes` entries, asked too when refreshing. Starts a health
    /// checker per member on the current runtime, if there is one.
    pub fn new(table: ShardTable, seeds: &[String], settings: ClusterSettings) -> Arc<Self> {
        let cluster = Arc::new(Self {
            table: RwLock::new(table),
            seeds: seeds.to_vec(),
            nodes: RwLock::new(HashMap::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
            refreshed: tokio::sync::Mutex::new(None),
            refreshing_soon: AtomicBool::new(false),
            hinted: AtomicU64::new(0),
            backoff: Mutex::new(HintBackoff::default()),
            standalone_warned: Mutex::new(HashSet::new()),
            other_cluster_warned: Mutex::new(HashSet::new()),
            leader_wait: settings.leader_wait,
            settings,
            stats: ClusterStats::default(),
        });
        cluster.sync_nodes();
        cluster
    }

    /// The member addresses, in member id order.
    pub fn members(&self) -> Vec<String> {
        self.table.read().members().values().cloned().collect()
    }

    /// The nodes requests may go to (members and leaders), by address.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        let nodes = self.nodes.read();
        let mut list: Vec<Arc<Node>> = nodes.values().map(|m| Arc::clone(&m.node)).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Whether `addr` has a node (a member's or a leader's).
    pub fn has_node(&self, addr: &str) -> bool {
        self.nodes.read().contains_key(addr)
    }

    /// The node at `addr`, made (with a health checker) if it is new: a
    /// 421 may name a leader at an address no refresh has shown yet.
    fn node(&self, addr: &str) -> Result<Arc<Node>, ProxyError> {
        if let Some(member) = self.nodes.read().get(addr) {
            return Ok(Arc::clone(&member.node));
        }
        let mut nodes = self.nodes.write();
        if let Some(member) = nodes.get(addr) {
            return Ok(Arc::clone(&member.node));
        }
        let member = self.member(addr).map_err(|why| ProxyError::Connect {
            node: addr.to_owned(),
            why,
        })?;
        let node = Arc::clone(&member.node);
        nodes.insert(addr.to_owned(), member);
        Ok(node)
    }

    fn member(&self, addr: &str) -> Result<Member, String> {
        let node = Arc::new(Node::new(addr)?);
        let checker = self.runtime.as_ref().map(|runtime| {
            health::spawn_checker(
                runtime,
                Arc::clone(&node.health),
                self.settings.health_interval,
                self.settings.health_timeout,
            )
        });
        log::debug!("routing to node {addr} from now on");
        Ok(Member { node, checker })
    }

    /// Makes the nodes those of the table: a node (and checker) for every
    /// member address and leader address, none for any other. Workers drop
    /// their pools of the addresses dropped here ([`ClusterWorker::evict`]).
    pub fn sync_nodes(&self) {
        let wanted: Vec<String> = {
            let table = self.table.read();
            let mut wanted: Vec<String> = table.members().values().cloned().collect();
            for shard in 0..table.shards() {
                if let Some(leader) = table.leader(shard) {
                    wanted.push(leader.addr.clone());
                }
            }
            wanted.sort();
            wanted.dedup();
            wanted
        };
        {
            let nodes = self.nodes.read();
            if nodes.len() == wanted.len() && wanted.iter().all(|addr| nodes.contains_key(addr)) {
                return;
            }
        }
        let mut nodes = self.nodes.write();
        // The first members are in the start line; later ones are news.
        let first = nodes.is_empty();
        nodes.retain(|addr, _| {
            let keep = wanted.binary_search(addr).is_ok();
            if !keep {
                log::info!("node {addr} is no longer a member: its connections are closed");
            }
            keep
        });
        for addr in wanted {
            if nodes.contains_key(&addr) {
                continue;
            }
            match self.member(&addr) {
                Ok(member) => {
                    if !first {
                        log::info!("node {addr} learnt from the cluster: routing to it");
                    }
                    nodes.insert(addr, member);
                }
                Err(why) => log::warn!("cannot route to {addr}: {why}"),
            }
        }
    }

    /// Number of shards (of the cluster followed now: a cluster created
    /// again may have another count).
    pub fn shards(&self) -> u32 {
        self.table.read().shards()
    }

    /// The placement version of the table's layout.
    pub fn version(&self) -> u64 {
        self.table.read().version()
    }

    /// The table, as `GET /-/proxy/shards` shows it.
    pub fn table_view(&self) -> TableView {
        self.table.read().view()
    }

    /// The shards without a leader that can serve them right now: none is
    /// known, the one the table names is at a node its health checker
    /// sees down (or has not heard from yet), or most of the shard's
    /// replicas are at such nodes (no quorum is possible, so the leader named, alive or not, can
    /// neither commit a write nor serve a linearizable read). The second
    /// and third matter when a quorum is lost: the survivors keep naming
    /// their leaders at the same term (pre-vote keeps them from raising
    /// it), so the table never learns the shard has none.
    pub fn without_leader(&self) -> Vec<u32> {
        let shards: Vec<(Option<String>, Vec<String>)> = {
            let table = self.table.read();
            let members = table.members();
            (0..table.shards())
                .map(|shard| {
                    let leader = table.leader(shard).map(|l| l.addr.clone());
                    let replicas = table
                        .replicas(shard)
                        .iter()
                        .filter_map(|id| members.get(id).cloned())
                        .collect();
                    (leader, replicas)
                })
                .collect()
        };
        // One lock at a time: never the nodes' while holding the table's.
        let nodes = self.nodes.read();
        // An address without a node (not learnt yet) is not known down; a
        // node whose first check has not answered yet is not known up
        // either (a fresh proxy is not ready before its checks say so).
        let down = |addr: &String| {
            nodes
                .get(addr)
                .is_some_and(|member| !member.node.health.is_known_up())
        };
        (0..)
            .zip(shards)
            .filter(|(_, (leader, replicas))| {
                let up = replicas.iter().filter(|addr| !down(addr)).count();
                // No majority up (an empty replica list says nothing).
                let no_quorum = up < replicas.len() && up * 2 <= replicas.len();
                leader.as_ref().is_none_or(down) || no_quorum
            })
            .map(|(shard, _)| shard)
            .collect()
    }

    /// `key`'s shard and its leader's address, if known.
    pub fn leader_of(&self, key: &[u8]) -> (u32, Option<String>) {
        let table = self.table.read();
        let shard = table.shard_of(key);
        let leader = table.leader(shard).map(|l| l.addr.clone());
        (shard, leader)
    }

    /// Where refreshes ask: the members, then the seeds that are not.
    fn sources(&self) -> Vec<String> {
        let mut sources = self.members();
        for seed in &self.seeds {
            if !sources.contains(seed) {
                sources.push(seed.clone());
            }
        }
        sources
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
        let sources = self.sources();
        // A source no longer asked (a member that left) backs no layout.
        self.table.write().keep_sources(&sources);
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(sources.len().max(1));
        for source in sources {
            let (cluster, done) = (Arc::clone(self), done_tx.clone());
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

    /// A refresh in the background, unless one is under way: for an answer
    /// that showed a newer layout, which need not wait for it. The next one
    /// waits [`HintBackoff`]'s pause: 50 ms once the table holds the newest
    /// version a header showed, doubling up to 1 s while it does not.
    pub fn refresh_soon(self: &Arc<Self>) {
        if self.refreshing_soon.swap(true, Ordering::AcqRel) {
            return;
        }
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            cluster.refresh(Instant::now()).await;
            // The hints seen up to now are judged by this refresh; later
            // ones (a header still showing a version no /-/shards has) by
            // the next.
            let hinted = cluster.hinted.swap(0, Ordering::AcqRel);
            let reached = cluster.version() >= hinted;
            let pause = cluster.backoff.lock().after(reached);
            if !reached {
                log::debug!(
                    "a node showed placement version {hinted} in a header, which no \
                     /-/shards answer bears out: next hinted refresh in {pause:?}"
                );
            }
            tokio::time::sleep(pause).await;
            cluster.refreshing_soon.store(false, Ordering::Release);
        });
    }

    /// An answer's `X-Kv-Placement-Version`: a newer one than the table's
    /// refreshes it in the background (a hint: [`Cluster::refresh_soon`]).
    fn saw_version(self: &Arc<Self>, headers: &hyper::HeaderMap) {
        let Some(version) = headers
            .get(PLACEMENT_VERSION_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
        else {
            return;
        };
        if version > self.version() {
            log::debug!("a node shows placement version {version}: refreshing the table");
            self.hinted.fetch_max(version, Ordering::AcqRel);
            self.refresh_soon();
        }
    }

    /// A 421 naming a leader at an address that is not a member's: the
    /// layout changed, so refresh it in the background.
    fn saw_not_leader(self: &Arc<Self>, body: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<NotLeader>(body) else {
            return;
        };
        let known = self
            .table
            .read()
            .members()
            .values()
            .any(|addr| *addr == answer.leader_addr);
        if !known {
            self.refresh_soon();
        }
    }

    async fn refresh_from(&self, source: &str) -> bool {
        match fetch_view(source, self.settings.fetch_timeout).await {
            Ok(Discovered::Cluster(view, placement)) => {
                let merged = self.table.write().merge(source, view, placement);
                match merged {
                    Ok(merged) => {
                        if merged.changed > 0 {
                            log::debug!("{} shard leaders learned from {source}", merged.changed);
                        }
                        if let Taken::OtherCluster { theirs, ours } = merged.taken {
                            // Said once per address, like a standalone seed.
                            if self.other_cluster_warned.lock().insert(source.to_owned()) {
                                log::warn!(
                                    "node {source} answers for cluster {theirs}, not {ours} \
                                     which other nodes still answer for: not routed to (said \
                                     once)"
                                );
                            }
                            return false;
                        }
                        report_merge(source, &merged);
                        if let Taken::NewCluster { .. } = merged.taken {
                            // The old cluster's nodes may be the others now.
                            self.other_cluster_warned.lock().clear();
                        }
                        self.sync_nodes();
                        true
                    }
                    Err(error) => {
                        log::warn!("node {source}: {error}");
                        false
                    }
                }
            }
            Ok(Discovered::Standalone) => {
                self.table.write().source_failed(source);
                // Said once per address: a standalone seed is asked at
                // every refresh (once a second), and stays what it is.
                if self.standalone_warned.lock().insert(source.to_owned()) {
                    log::warn!(
                        "node {source} answers /-/shards with 404: not in the cluster; \
                         not routed to (said once)"
                    );
                } else {
                    log::debug!("node {source} answers /-/shards with 404");
                }
                false
            }
            Err(error) => {
                // It no longer vouches for any layout.
                self.table.write().source_failed(source);
                if error.is_wrong_answer() {
                    log::warn!("refresh from {source}: {error}");
                } else {
                    log::debug!("refresh from {source}: {error}");
                }
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

    /// Refreshes the table every `refresh_every` ([`kv_cluster::BACKGROUND_REFRESH`]),
    /// forever.
    pub async fn refresh_forever(self: Arc<Self>) {
        // The table was just built: the first refresh is one period away.
        let every = self.settings.refresh_every;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.refresh(Instant::now()).await;
        }
    }

    /// Where to send `shard`'s next attempt: its leader's address.
    fn leader_addr(&self, shard: u32) -> Option<String> {
        self.table
            .read()
            .leader(shard)
            .map(|leader| leader.addr.clone())
    }

    /// A replica of `shard` for a stale read: the `turn`-th, in turn.
    fn replica_addr(&self, shard: u32, turn: usize) -> Option<String> {
        let table = self.table.read();
        let replicas = table.replicas(shard);
        if replicas.is_empty() {
            return None;
        }
        let id = replicas.get(turn % replicas.len())?;
        table.members().get(id).cloned()
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
    // The request's one budget for a leader counts from here, whatever its
    // first try costs (module docs).
    let arrived = Instant::now();
    let (mut parts, body) = request.into_parts();
    let body = upstream::read_body(body, proxy.max_body_bytes, proxy.request_timeout).await?;
    prepare(&mut parts);
    let read = matches!(parts.method, Method::GET | Method::HEAD);
    let stale = read
        && parts
            .headers
            .get(CONSISTENCY_HEADER)
            .is_some_and(|value| wants_stale(value.as_bytes()));
    let mut routing = Routing::new(shard, read, cluster.leader_wait, arrived);
    let mut first = stale
        .then(|| {
            let turn = worker.stale_turn.fetch_add(1, Ordering::Relaxed);
            cluster.replica_addr(shard, turn)
        })
        .flatten();
    loop {
        let replica = first.take();
        let stale_try = replica.is_some();
        let target = replica.or_else(|| cluster.leader_addr(shard));
        let tried = match (&target, routing.patience()) {
            // A read at the leader: abandoned if the leader moves while it
            // waits (a frozen leader), see `kv_cluster::Routing::moved`.
            (Some(addr), Some(patience)) if !stale_try => {
                let budget = routing.budget(Instant::now());
                let send = attempt(proxy, worker, cluster, addr, &parts, &body, budget);
                let moved = cluster.leader_moved(&routing, addr, patience);
                tokio::select! {
                    tried = send => tried,
                    () = moved => Tried::Abandoned,
                }
            }
            (Some(addr), _) => {
                let budget = routing.budget(Instant::now());
                attempt(proxy, worker, cluster, addr, &parts, &body, budget).await
            }
            (None, _) => Tried::NotSent,
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
        if stale_try && matches!(tried, Tried::NotSent) {
            continue;
        }
        let now = Instant::now();
        let waited_before = routing.has_waited();
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
                if !waited_before {
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
                    waited: routing.waited(now),
                });
            }
            Next::Unknown => {
                cluster.stats.unknown.fetch_add(1, Ordering::Relaxed);
                let node = target.unwrap_or_default();
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

/// One attempt at the node at `addr`: everything about the node is in
/// [`Tried`]. An answer showing a newer placement version, or a 421 naming
/// an unknown address, refreshes the table in the background. `budget` is
/// what is left of the request's wait for a leader, sent on so the node
/// stops waiting for a quorum when the proxy would stop waiting for it.
async fn attempt(
    proxy: &Proxy,
    worker: &ClusterWorker,
    cluster: &Arc<Cluster>,
    addr: &str,
    parts: &Parts,
    body: &Bytes,
    budget: Option<Duration>,
) -> Tried {
    let node = match cluster.node(addr) {
        Ok(node) => node,
        Err(error) => {
            log::warn!("{}", error.into_api().0);
            return Tried::NotSent;
        }
    };
    if !node.health.is_up() {
        node.stats.record::<()>(&Err(ProxyError::NodeDown {
            node: node.name.clone(),
        }));
        return Tried::NotSent;
    }
    // What is left of the wait, sent on as a header of this attempt only.
    let budget = budget.map(|budget| {
        let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        (
            HeaderName::from_static(WAIT_BUDGET_HEADER),
            HeaderValue::from(ms),
        )
    });
    let timeout = proxy.request_timeout;
    let pool = worker.pool(addr);
    let sent = tokio::time::timeout(
        timeout,
        upstream::send(&pool, &node, parts, body, budget.as_ref()),
    )
    .await;
    if let Ok(Ok(Ok(response))) = &sent {
        cluster.saw_version(response.headers());
    }
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
                    Some(body) => {
                        cluster.saw_not_leader(&body);
                        Tried::NotLeader(body)
                    }
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

/// [`upstream::prepare`], and `X-Kv-Route: direct`.
fn prepare(parts: &mut Parts) {
    upstream::prepare(parts);
    parts
        .headers
        .insert(ROUTE_HEADER, HeaderValue::from_static(ROUTE_DIRECT));
    // The budget sent on is the proxy's own (`attempt`), never a client's.
    parts.headers.remove(WAIT_BUDGET_HEADER);
}
