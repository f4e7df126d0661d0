//! Against a replicated cluster: each key goes to its shard's leader, by
//! the same table and retry rules as kv-proxy (design §12).
//!
//! Before the runs, kv-bench asks its nodes for `GET /-/shards`
//! ([`discover`]). Standalone nodes answer 404 and kv-bench routes by the
//! ring as before. A 200 means one replicated cluster: kv-bench makes one
//! run over all its members (a run over "the first n nodes" means nothing
//! when every key is on every replica), with `X-Kv-Route: direct` on every
//! request, and [`routed`] applies [`kv_cluster::Routing`]: a 421 is
//! followed to the named leader (three hops at once, then paced by table
//! refreshes up to `--leader-wait`; counted as
//! `redirects`, not as errors), a 503 or a refused connection is waited out
//! (the table refreshed every 50 ms) up to `--leader-wait`, and a write
//! that got a 504, timed out or whose connection broke is never retried. A
//! read is: after a 504, a timeout or a broken connection it waits for a
//! leader, and one unanswered after `READ_PATIENCE` moves to the new leader
//! as soon as the others name one (a frozen leader).
//!
//! **`--nodes` are seeds** (issue 13, `docs/membership.md` §6): the members
//! are the ones a node's `/-/shards` names, so one member's URL is enough,
//! and kv-bench follows members that join or leave during a run. The table
//! is kv-proxy's, merged by the same [`ShardTable::merge`]: its layout is
//! keyed by cluster id and placement version, taken from an answer of its
//! version or newer, rebuilt from another cluster's answer once no source
//! shows its own cluster (a cluster created again at the same addresses),
//! and given up for the newest layout shown once no source shows its
//! version (one node said `u64::MAX` once); a source that does not answer
//! is forgotten until it does. It is refreshed when an answer's
//! `X-Kv-Placement-Version` is newer than its own (a hint only: a refresh
//! that does not reach it doubles the pause before the next, up to 1 s,
//! [`HintBackoff`]) or a 421 names a leader at an address that is not a
//! member's (by the worker that saw it, before its next request), and every
//! second. `/-/shards` bodies are read up to [`MAX_SHARDS_BODY`]. A newly
//! learnt address gets the next endpoint index (indexes never change, so
//! per-node counts stay put); workers open connections to it on first use
//! and close theirs to members that left.
//!
//! What each operation finally came to is what `--history` records: a
//! request that ended on 503 (or on no connection at all, or on a 421
//! after too many hops, reported as 503) was never proposed and records as
//! `fail`; one that ended on 504, a timeout or a broken write records as
//! `unknown` (see [`crate::history`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, Uri};
use kv_cluster::{
    is_final, Attempt, HintBackoff, Next, NotLeader, Placement, Routing, ShardTable, ShardsView,
    TableError, Taken, BACKGROUND_REFRESH, NOT_LEADER_STATUS, REFRESH_EVERY,
};

/// Largest `/-/shards` body read (kv-proxy's bound): 4096 shards of three
/// replicas take about 1 MiB.
pub const MAX_SHARDS_BODY: usize = 4 << 20;

use crate::check::{ErrorKind, Failure};
use crate::client::{self, Answer, ClientKind, Conn, Endpoint};

/// The table every worker routes by, and how it is refreshed.
pub struct BenchCluster {
    table: RwLock<ShardTable>,
    /// Every address routed to so far, members first: `endpoints[i]` is
    /// worker connection `i`. Only ever appended to.
    endpoints: RwLock<Vec<Endpoint>>,
    /// The `--nodes` entries: asked when no member answers.
    seeds: Vec<Endpoint>,
    /// The `Authorization` every member is sent (the seeds').
    authorization: Option<HeaderValue>,
    /// Bumped whenever a member leaves, so workers know to close their
    /// connections to it ([`BenchCluster::close_departed`]).
    departures: AtomicU64,
    /// A background refresh ([`BenchCluster::refresh_soon`]) is under way.
    refreshing_soon: AtomicBool,
    /// The newest `X-Kv-Placement-Version` an answer showed since the last
    /// background refresh.
    hinted: AtomicU64,
    /// The pause after a background refresh, by whether it reached `hinted`.
    backoff: std::sync::Mutex<HintBackoff>,
    /// That refresh's task, awaited by [`BenchCluster::settle`].
    soon: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When the last completed refresh started (single flight: workers
    /// waiting at once share one).
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    pub leader_wait: Duration,
    timeout: Duration,
}

/// How [`fetch_view`]'s error starts when the node answered 200 with a
/// shards view that does not hold together (it is in a cluster), rather
/// than not at all or with something that is no shards view.
const INVALID_VIEW: &str = "invalid /-/shards answer: ";

/// `GET /-/shards` from `endpoint` on a fresh connection (the body read up
/// to [`MAX_SHARDS_BODY`]), with the cluster id and placement version it
/// shows: `Ok(None)` for a standalone node (404).
pub async fn fetch_view(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<Option<(ShardsView, Placement)>, String> {
    let answer = client::get_bounded(endpoint, "/-/shards", timeout, MAX_SHARDS_BODY).await?;
    match answer.status {
        200 => match ShardsView::parse(&answer.body) {
            Ok(view) => Ok(Some((view, Placement::of(&answer.body)))),
            // Not a shards view at all (another store answering every
            // path, such as the Flask store with a key named "-/shards"):
            // not a node of a cluster.
            Err(e @ TableError::Json(_)) => Err(e.to_string()),
            // A shards view that does not hold together: a cluster node.
            Err(e) => Err(format!("{INVALID_VIEW}{e}")),
        },
        404 => Ok(None),
        other => Err(format!("/-/shards answered {other}")),
    }
}

/// Logs what [`ShardTable::merge`] did that a user should know.
fn report(source: &str, taken: Taken) {
    match taken {
        Taken::NewCluster { from, to } => log::warn!(
            "cluster id changed from {from} to {to}: following the new cluster ({source} \
             answers for it, and no node answers for the old one any more)"
        ),
        Taken::WentBack { from, to } => log::warn!(
            "no node shows placement version {from} any more: taking version {to}, the newest \
             shown (from {source})"
        ),
        Taken::OtherCluster { theirs, ours } => log::debug!(
            "{source} answers for cluster {theirs}, not {ours} which other nodes still answer \
             for: ignored"
        ),
        Taken::Layout | Taken::Leaders => {}
    }
}

/// Asks each of `endpoints` for `/-/shards`; a table merged from every
/// cluster answer (the newest placement version's members), or `None`
/// when no node is in a cluster.
pub async fn discover(
    endpoints: &[Endpoint],
    timeout: Duration,
) -> Result<Option<ShardTable>, String> {
    let mut table: Option<ShardTable> = None;
    // A node that answered 200 with a view that does not hold together: it
    // is in a cluster, so running as if it were standalone would be wrong.
    let mut invalid: Option<String> = None;
    for endpoint in endpoints {
        let source = endpoint.authority.as_str();
        match fetch_view(endpoint, timeout).await {
            Ok(Some((view, placement))) => match &mut table {
                Some(table) => {
                    let merged = table
                        .merge(source, view, placement)
                        .map_err(|e| format!("{}: {e}", endpoint.url))?;
                    report(source, merged.taken);
                }
                None => {
                    table = Some(
                        ShardTable::from_answer(source, view, placement)
                            .map_err(|e| format!("{}: {e}", endpoint.url))?,
                    )
                }
            },
            Ok(None) => {}
            // A node that is down now is the run's concern, not discovery's.
            Err(why) if why.starts_with(INVALID_VIEW) => {
                log::warn!("{}: {why}: ignored", endpoint.url);
                invalid.get_or_insert(format!("{}: {why}", endpoint.url));
            }
            Err(why) => log::debug!("{}: no /-/shards answer: {why}", endpoint.url),
        }
    }
    match (table, invalid) {
        (None, Some(why)) => Err(format!(
            "no node gave a usable /-/shards answer (not running as standalone nodes): {why}"
        )),
        (table, _) => Ok(table),
    }
}

/// A member at `addr`, asked directly (no forwarding), with the run's
/// `Authorization` header.
fn direct_endpoint(addr: &str, authorization: Option<&HeaderValue>) -> Result<Endpoint, String> {
    Endpoint::parse(addr).map(|mut endpoint| {
        endpoint.direct = true;
        endpoint.authorization = authorization.cloned();
        endpoint
    })
}

impl BenchCluster {
    /// Routes by `table`, over its members; `seeds` are the `--nodes`.
    pub fn new(
        table: ShardTable,
        seeds: &[Endpoint],
        leader_wait: Duration,
        timeout: Duration,
    ) -> Result<Self, String> {
        // Every seed carries the same token (`--auth-token-file`).
        let authorization = seeds.first().and_then(|seed| seed.authorization.clone());
        let endpoints = table
            .members()
            .values()
            .map(|addr| direct_endpoint(addr, authorization.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            table: RwLock::new(table),
            endpoints: RwLock::new(endpoints),
            seeds: seeds.to_vec(),
            authorization,
            departures: AtomicU64::new(0),
            refreshing_soon: AtomicBool::new(false),
            hinted: AtomicU64::new(0),
            backoff: std::sync::Mutex::new(HintBackoff::default()),
            soon: std::sync::Mutex::new(None),
            refreshed: tokio::sync::Mutex::new(None),
            leader_wait,
            timeout,
        })
    }

    /// `key`'s shard.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        self.read_table().shard_of(key)
    }

    fn read_table(&self) -> RwLockReadGuard<'_, ShardTable> {
        // A worker that panicked holding the lock left a table that is
        // still a table: keep routing by it.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn read_endpoints(&self) -> RwLockReadGuard<'_, Vec<Endpoint>> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every address routed to so far, by index.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.read_endpoints().clone()
    }

    /// `endpoints[index]`.
    pub fn endpoint(&self, index: usize) -> Option<Endpoint> {
        self.read_endpoints().get(index).cloned()
    }

    /// The placement version of the table's layout.
    pub fn version(&self) -> u64 {
        self.read_table().version()
    }

    /// The index of the endpoint at `addr`, appended if it is new.
    fn endpoint_index(&self, addr: &str) -> Option<usize> {
        if let Some(index) = self
            .read_endpoints()
            .iter()
            .position(|e| e.authority == addr)
        {
            return Some(index);
        }
        let endpoint = direct_endpoint(addr, self.authorization.as_ref()).ok()?;
        let mut endpoints = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        if let Some(index) = endpoints.iter().position(|e| e.authority == addr) {
            return Some(index);
        }
        log::info!("routing to {} from now on", endpoint.url);
        endpoints.push(endpoint);
        Some(endpoints.len() - 1)
    }

    /// The index in [`BenchCluster::endpoints`] of `shard`'s leader.
    pub fn leader_index(&self, shard: u32) -> Option<usize> {
        let addr = self.read_table().leader(shard)?.addr.clone();
        self.endpoint_index(&addr)
    }

    /// Whether `addr` is a member's address.
    fn is_member(&self, addr: &str) -> bool {
        self.read_table()
            .members()
            .values()
            .any(|known| known == addr)
    }

    /// Closes a worker's connections to members that left (cheap when
    /// none has: one atomic load). `seen` is the worker's count of
    /// departures dealt with.
    pub fn close_departed(&self, conns: &mut [Option<Conn>], seen: &mut u64) {
        let departures = self.departures.load(Ordering::Acquire);
        if departures == *seen {
            return;
        }
        *seen = departures;
        let table = self.read_table();
        let endpoints = self.read_endpoints();
        for (slot, endpoint) in conns.iter_mut().zip(endpoints.iter()) {
            if slot.is_some() && !table.members().values().any(|a| *a == endpoint.authority) {
                *slot = None;
            }
        }
    }

    /// Merges `source`'s answer ([`ShardTable::merge`]); what it took, if
    /// it was usable.
    fn merge(&self, source: &str, view: ShardsView, placement: Placement) -> Option<Taken> {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let before: Vec<String> = table.members().values().cloned().collect();
        let taken = match table.merge(source, view, placement) {
            Ok(merged) => merged.taken,
            Err(error) => {
                log::warn!("{source}: {error}");
                return None;
            }
        };
        let version = table.version();
        let after: Vec<String> = table.members().values().cloned().collect();
        drop(table);
        report(source, taken);
        if before != after {
            for addr in &after {
                self.endpoint_index(addr);
            }
            if before.iter().any(|addr| !after.contains(addr)) {
                self.departures.fetch_add(1, Ordering::AcqRel);
            }
            log::info!(
                "cluster members now (version {version}): {}",
                after.join(", ")
            );
        }
        Some(taken)
    }

    fn forget(&self, source: &str) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.source_failed(source);
    }

    /// Refreshes the table from the members, then the seeds (the first
    /// answer of the table's version or newer is merged) unless a refresh
    /// that started at or after `wanted` completed.
    pub async fn refresh(&self, wanted: Instant) {
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|last| last >= wanted) {
            return;
        }
        let started = Instant::now();
        // Short per node, so a node that is down or cut off costs little.
        let each = self.timeout.min(Duration::from_millis(500));
        let mut sources: Vec<Endpoint> = {
            let table = self.read_table();
            self.endpoints()
                .into_iter()
                .filter(|e| table.members().values().any(|a| *a == e.authority))
                .collect()
        };
        sources.extend(self.seeds.iter().cloned());
        {
            // A source no longer asked (a member that left) backs no layout.
            let names: Vec<String> = sources.iter().map(|e| e.authority.clone()).collect();
            let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
            table.keep_sources(&names);
        }
        for endpoint in &sources {
            let source = endpoint.authority.as_str();
            match fetch_view(endpoint, each).await {
                Ok(Some((view, placement))) => {
                    // An older layout's answer still merges leaders; go on
                    // to the next node for the layout itself.
                    let taken = self.merge(source, view, placement);
                    if matches!(
                        taken,
                        Some(Taken::Layout | Taken::WentBack { .. } | Taken::NewCluster { .. })
                    ) {
                        break;
                    }
                }
                // It no longer vouches for any layout.
                Ok(None) => self.forget(source),
                Err(why) => {
                    log::debug!("{source}: no /-/shards answer: {why}");
                    self.forget(source);
                }
            }
        }
        *last = Some(started);
    }

    /// Whether `answer` says the table is out of date: a newer placement
    /// version, or a 421 naming a leader at an address that is no member's.
    fn outdated_by(&self, answer: &Answer) -> bool {
        if let Some(version) = answer
            .placement_version
            .filter(|&version| version > self.version())
        {
            self.hinted.fetch_max(version, Ordering::AcqRel);
            return true;
        }
        answer.status == NOT_LEADER_STATUS
            && serde_json::from_slice::<NotLeader>(&answer.body)
                .is_ok_and(|not_leader| !self.is_member(&not_leader.leader_addr))
    }

    /// A refresh in the background unless one is under way, so the
    /// request that noticed the table is out of date does not wait for it.
    pub fn refresh_soon(self: &Arc<Self>) {
        if self.refreshing_soon.swap(true, Ordering::AcqRel) {
            return;
        }
        let cluster = Arc::clone(self);
        let task = tokio::spawn(async move {
            cluster.refresh(Instant::now()).await;
            // Pacing: 50 ms once the table holds the newest version a
            // header showed, doubling up to 1 s while no /-/shards bears
            // it out (`HintBackoff`).
            // The hints seen up to now are judged by this refresh; later
            // ones (a header still showing a version no /-/shards has) by
            // the next.
            let hinted = cluster.hinted.swap(0, Ordering::AcqRel);
            let reached = cluster.version() >= hinted;
            let pause = cluster
                .backoff
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .after(reached);
            tokio::time::sleep(pause).await;
            cluster.refreshing_soon.store(false, Ordering::Release);
        });
        *self.soon.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Waits for the refresh [`BenchCluster::refresh_soon`] started, if
    /// any, so a run's report names every member its answers showed.
    pub async fn settle(&self) {
        let task = self.soon.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Refreshes the table every second until the returned task is aborted.
    pub fn refresh_in_background(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(BACKGROUND_REFRESH);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                cluster.refresh(Instant::now()).await;
            }
        })
    }

    /// Resolves once the table names another leader for `routing`'s shard
    /// than `addr` (or none): after `patience`, refreshing every
    /// [`REFRESH_EVERY`]; pending while it stays the leader.
    async fn leader_moved(&self, routing: &Routing, addr: &str, patience: Duration) {
        tokio::time::sleep(patience).await;
        loop {
            let asked = Instant::now();
            self.refresh(asked).await;
            if routing.moved(&self.read_table(), addr) {
                return;
            }
            tokio::time::sleep_until((asked + REFRESH_EVERY).into()).await;
        }
    }
}

/// What [`routed`] came to.
pub struct Routed {
    /// The final answer (or failure).
    pub result: Result<Answer, Failure>,
    /// The node that gave it.
    pub node: usize,
    /// 421s followed to the leader they named: routing, not errors.
    pub redirects: u32,
}

/// Sends one operation on `shard` to its leader over the worker's
/// connections (`conns[i]` to `cluster.endpoints()[i]`, grown as addresses
/// are learnt), following the rules in the module docs. A read still
/// unanswered after [`kv_cluster::READ_PATIENCE`] is abandoned (its
/// connection dropped) and sent again once the refreshed table names
/// another leader. `departures` is the worker's own count for
/// [`BenchCluster::close_departed`].
#[allow(clippy::too_many_arguments)]
pub async fn routed(
    cluster: &Arc<BenchCluster>,
    conns: &mut Vec<Option<Conn>>,
    departures: &mut u64,
    shard: u32,
    method: Method,
    uri: &Uri,
    body: Option<&[u8]>,
    timeout: Duration,
    client: ClientKind,
) -> Routed {
    cluster.close_departed(conns, departures);
    let read = matches!(method, Method::GET | Method::HEAD);
    let mut routing = Routing::new(shard, read, cluster.leader_wait, Instant::now());
    let mut last_node = 0;
    let mut redirects = 0;
    loop {
        let target = cluster
            .leader_index(shard)
            .and_then(|node| cluster.endpoint(node).map(|endpoint| (node, endpoint)));
        let mut abandoned = false;
        let result = match &target {
            Some((node, endpoint)) => {
                let node = *node;
                last_node = node;
                if conns.len() <= node {
                    conns.resize_with(node + 1, || None);
                }
                // why: resized just above to hold `node`.
                #[allow(clippy::indexing_slicing)]
                let exchange = crate::worker::exchange(
                    &mut conns[node],
                    endpoint,
                    client,
                    method.clone(),
                    uri,
                    body,
                    timeout,
                );
                match routing.patience() {
                    Some(patience) => {
                        tokio::select! {
                            result = exchange => result,
                            () = cluster.leader_moved(&routing, &endpoint.authority, patience) => {
                                abandoned = true;
                                Err(Failure::new(
                                    ErrorKind::Timeout,
                                    format!("shard {shard}: read abandoned, the leader moved"),
                                ))
                            }
                        }
                    }
                    None => exchange.await,
                }
            }
            None => Err(Failure::new(
                ErrorKind::Connect,
                format!("shard {shard}: no leader known"),
            )),
        };
        if let Ok(answer) = &result {
            if cluster.outdated_by(answer) {
                cluster.refresh_soon();
            }
        }
        if abandoned {
            // Dropped mid-exchange: the connection's state is unknown.
            if let Some(slot) = conns.get_mut(last_node) {
                *slot = None;
            }
        }
        let attempt = match &result {
            Ok(answer) if is_final(answer.status) => {
                return Routed {
                    result,
                    node: last_node,
                    redirects,
                }
            }
            _ if abandoned => Attempt::Abandoned,
            Ok(answer) => Attempt::Answered {
                status: answer.status,
                body: &answer.body,
            },
            // No connection: nothing was sent.
            Err(failure) if failure.kind == ErrorKind::Connect => Attempt::NotSent,
            Err(failure) if failure.kind == ErrorKind::Timeout => Attempt::TimedOut,
            Err(_) => Attempt::Lost,
        };
        let not_leader = matches!(&result, Ok(answer) if answer.status == NOT_LEADER_STATUS);
        let now = Instant::now();
        let next = {
            let mut table = cluster.table.write().unwrap_or_else(|e| e.into_inner());
            routing.next(&mut table, attempt, now)
        };
        if not_leader && matches!(next, Next::Retry | Next::WaitForLeader) {
            redirects += 1;
        }
        match next {
            Next::Retry => {}
            Next::WaitForLeader => {
                let at = routing.refresh_at(now);
                tokio::time::sleep_until(at.into()).await;
                cluster.refresh(at).await;
                routing.refreshed(Instant::now());
            }
            // Given up: the last answer is the outcome (a 503: not proposed;
            // a 504, timeout or broken write: unknown). With no leader ever
            // known, or a 421 after too many hops (not proposed either), say
            // so as kv-proxy would: 503. A 421 is a routing answer, never an
            // operation's result.
            Next::Deliver | Next::NoLeader | Next::TooManyHops | Next::Unknown => {
                let result = match result {
                    Err(failure) if target.is_none() => Ok(Answer {
                        placement_version: None,
                        status: 503,
                        body: Bytes::from(format!(
                            "{{\"error\":\"shard {shard} has no leader (waited {:?}): {}\"}}",
                            routing.waited(now),
                            failure.detail
                        )),
                    }),
                    Ok(answer) if answer.status == NOT_LEADER_STATUS => Ok(Answer {
                        placement_version: answer.placement_version,
                        status: 503,
                        body: Bytes::from(format!(
                            "{{\"error\":\"shard {shard}: the leader moved {} times during the request\"}}",
                            routing.hops()
                        )),
                    }),
                    other => other,
                };
                return Routed {
                    result,
                    node: last_node,
                    redirects,
                };
            }
        }
    }
}
