//! Against a replicated cluster: each key goes to its shard's leader, by
//! the same table and retry rules as kv-proxy (design §12).
//!
//! Before the runs, kv-bench asks its nodes for `GET /-/shards`
//! ([`discover`]). Standalone nodes answer 404 and kv-bench routes by the
//! ring as before. A 200 means one replicated cluster: kv-bench makes one
//! run over all its members (a run over "the first n nodes" means nothing
//! when every key is on every replica), with `X-Kv-Route: direct` on every
//! request, and [`routed`] applies [`kv_cluster::Routing`]: a 421 is
//! followed to the named leader (at most three hops), a 503 or a refused
//! connection is waited out (the table refreshed every 50 ms) up to
//! `--leader-wait`, and a 504, a timeout or a write whose connection broke
//! is never retried.
//!
//! What each operation finally came to is what `--history` records: a
//! request that ended on 421 or 503 (or on no connection at all) was never
//! proposed and records as `fail`; one that ended on 504, a timeout or a
//! broken write records as `unknown` (see [`crate::history`]).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, Uri};
use kv_cluster::{is_final, Attempt, Next, Routing, ShardTable, ShardsView, BACKGROUND_REFRESH};

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
}

/// Sends one operation on `shard` to its leader over the worker's
/// connections (`conns[i]` to `cluster.endpoints[i]`), following the rules
/// in the module docs. Returns the final answer (or failure) and the node
/// that gave it.
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
) -> (Result<Answer, Failure>, usize) {
    let read = matches!(method, Method::GET | Method::HEAD);
    let mut routing = Routing::new(shard, read, cluster.leader_wait);
    let mut last_node = 0;
    loop {
        let target = cluster.leader_index(shard);
        let result = match target {
            Some(node) => {
                last_node = node;
                crate::worker::exchange(
                    &mut conns[node],
                    &cluster.endpoints[node],
                    client,
                    method.clone(),
                    uri,
                    body,
                    timeout,
                )
                .await
            }
            None => Err(Failure::new(
                ErrorKind::Connect,
                format!("shard {shard}: no leader known"),
            )),
        };
        let attempt = match &result {
            Ok(answer) if is_final(answer.status) => return (result, last_node),
            Ok(answer) => Attempt::Answered {
                status: answer.status,
                body: &answer.body,
            },
            // No connection: nothing was sent.
            Err(failure) if failure.kind == ErrorKind::Connect => Attempt::NotSent,
            Err(failure) if failure.kind == ErrorKind::Timeout => Attempt::TimedOut,
            Err(_) => Attempt::Lost,
        };
        let now = Instant::now();
        let next = {
            let mut table = cluster.table.write().unwrap_or_else(|e| e.into_inner());
            routing.next(&mut table, attempt, now)
        };
        match next {
            Next::Retry => {}
            Next::WaitForLeader => {
                let at = routing.refresh_at(now);
                tokio::time::sleep_until(at.into()).await;
                cluster.refresh(at).await;
                routing.refreshed(Instant::now());
            }
            // Given up: the last answer is the outcome (a 421 or 503: not
            // proposed; a 504, timeout or broken write: unknown). With no
            // leader ever known, say so as a node would: 503.
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
                    other => other,
                };
                return (result, last_node);
            }
        }
    }
}
