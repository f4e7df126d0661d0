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
//! What each operation finally came to is what `--history` records: a
//! request that ended on 503 (or on no connection at all, or on a 421
//! after too many hops, reported as 503) was never proposed and records as
//! `fail`; one that ended on 504, a timeout or a broken write records as
//! `unknown` (see [`crate::history`]).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, Uri};
use kv_cluster::{
    is_final, Attempt, Next, Routing, ShardTable, ShardsView, BACKGROUND_REFRESH,
    NOT_LEADER_STATUS, REFRESH_EVERY,
};

use crate::check::{ErrorKind, Failure};
use crate::client::{self, Answer, ClientKind, Conn, Endpoint};

/// The table every worker routes by, and how it is refreshed.
pub struct BenchCluster {
    table: RwLock<ShardTable>,
    /// The members, in id order: `endpoints[i]` is worker connection `i`.
    pub endpoints: Vec<Endpoint>,
    /// When the last completed refresh started (single flight: workers
    /// waiting at once share one).
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    pub leader_wait: Duration,
    timeout: Duration,
    client: ClientKind,
}

/// `GET /-/shards` from `endpoint` on a fresh connection: `Ok(None)` for a
/// standalone node (404).
pub async fn fetch_view(
    endpoint: &Endpoint,
    timeout: Duration,
    kind: ClientKind,
) -> Result<Option<ShardsView>, String> {
    let mut conn = client::connect(endpoint, timeout, kind)
        .await
        .map_err(|f| f.detail)?;
    let uri = Uri::from_static("/-/shards");
    let answer = client::send(&mut conn, endpoint, Method::GET, &uri, None, timeout)
        .await
        .map_err(|f| f.detail)?;
    match answer.status {
        200 => ShardsView::parse(&answer.body)
            .map(Some)
            .map_err(|e| e.to_string()),
        404 => Ok(None),
        other => Err(format!("/-/shards answered {other}")),
    }
}

/// Asks each of `endpoints` for `/-/shards`; a table merged from every
/// cluster answer, or `None` when no node is in a cluster.
pub async fn discover(
    endpoints: &[Endpoint],
    timeout: Duration,
    kind: ClientKind,
) -> Result<Option<ShardTable>, String> {
    let mut table: Option<ShardTable> = None;
    for endpoint in endpoints {
        match fetch_view(endpoint, timeout, kind).await {
            Ok(Some(view)) => match &mut table {
                Some(table) => {
                    table
                        .refresh(view)
                        .map_err(|e| format!("{}: {e}", endpoint.url))?;
                }
                None => {
                    table = Some(
                        ShardTable::from_view(view)
                            .map_err(|e| format!("{}: {e}", endpoint.url))?,
                    )
                }
            },
            Ok(None) => {}
            // A node that is down now is the run's concern, not discovery's.
            Err(why) => log::debug!("{}: no /-/shards answer: {why}", endpoint.url),
        }
    }
    Ok(table)
}

impl BenchCluster {
    /// Routes by `table`, over its members.
    pub fn new(
        table: ShardTable,
        leader_wait: Duration,
        timeout: Duration,
        client: ClientKind,
    ) -> Result<Self, String> {
        let endpoints = table
            .members()
            .values()
            .map(|addr| {
                Endpoint::parse(addr).map(|mut endpoint| {
                    endpoint.direct = true;
                    endpoint
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            table: RwLock::new(table),
            endpoints,
            refreshed: tokio::sync::Mutex::new(None),
            leader_wait,
            timeout,
            client,
        })
    }

    /// `key`'s shard.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        self.read_table().shard_of(key)
    }

    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, ShardTable> {
        // A worker that panicked holding the lock left a table that is
        // still a table: keep routing by it.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The index in [`BenchCluster::endpoints`] of `shard`'s leader.
    pub fn leader_index(&self, shard: u32) -> Option<usize> {
        let table = self.read_table();
        let leader = table.leader(shard)?;
        self.endpoints
            .iter()
            .position(|e| e.authority == leader.addr)
    }

    /// Refreshes the table from the members (the first answer is merged)
    /// unless a refresh that started at or after `wanted` completed.
    pub async fn refresh(&self, wanted: Instant) {
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|last| last >= wanted) {
            return;
        }
        let started = Instant::now();
        // Short per node, so a node that is down or cut off costs little.
        let each = self.timeout.min(Duration::from_millis(500));
        for endpoint in &self.endpoints {
            if let Ok(Some(view)) = fetch_view(endpoint, each, self.client).await {
                let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
                if table.refresh(view).is_ok() {
                    break;
                }
            }
        }
        *last = Some(started);
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
    /// than `endpoints[sent_to]` (or none): after `patience`, refreshing
    /// every [`REFRESH_EVERY`]; pending while it stays the leader.
    async fn leader_moved(&self, routing: &Routing, sent_to: usize, patience: Duration) {
        tokio::time::sleep(patience).await;
        let addr = &self.endpoints[sent_to].authority;
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
/// connections (`conns[i]` to `cluster.endpoints[i]`), following the rules
/// in the module docs. A read still unanswered after
/// [`kv_cluster::READ_PATIENCE`] is abandoned (its connection dropped) and
/// sent again once the refreshed table names another leader.
#[allow(clippy::too_many_arguments)]
pub async fn routed(
    cluster: &BenchCluster,
    conns: &mut [Option<Conn>],
    shard: u32,
    method: Method,
    uri: &Uri,
    body: Option<&[u8]>,
    timeout: Duration,
    client: ClientKind,
) -> Routed {
    let read = matches!(method, Method::GET | Method::HEAD);
    let mut routing = Routing::new(shard, read, cluster.leader_wait);
    let mut last_node = 0;
    let mut redirects = 0;
    loop {
        let target = cluster.leader_index(shard);
        let mut abandoned = false;
        let result = match target {
            Some(node) => {
                last_node = node;
                let exchange = crate::worker::exchange(
                    &mut conns[node],
                    &cluster.endpoints[node],
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
                            () = cluster.leader_moved(&routing, node, patience) => {
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
        if abandoned {
            // Dropped mid-exchange: the connection's state is unknown.
            conns[last_node] = None;
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
                        status: 503,
                        body: Bytes::from(format!(
                            "{{\"error\":\"shard {shard} has no leader (waited {:?}): {}\"}}",
                            routing.waited(now),
                            failure.detail
                        )),
                    }),
                    Ok(answer) if answer.status == NOT_LEADER_STATUS => Ok(Answer {
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
