//! Routing: admin paths are answered here, every key path is forwarded to
//! its owner.
//!
//! | request               | answer                                                  |
//! |-----------------------|---------------------------------------------------------|
//! | `<any> /<key>`        | the owner node's answer, plus `X-Kv-Node: <owner>`      |
//! | `GET /-/health`       | 200 `{"status": "ok", "nodes": N, "nodes_up": M, ...}`; `"degraded"` (still 200) with `"nodes_down"` named when any node is down, and `"nodes_unchecked"` when no check has answered for some yet |
//! | `GET /-/ready`        | 200 while some node is up (cluster mode: some shard has a leader that is up with most of its replicas); else 503; up means answered ([`crate::health::NodeHealth::is_known_up`]) |
//! | `OPTIONS *`, `OPTIONS /-/...` | 204 with `Allow` (`OPTIONS /<key>` is forwarded) |
//! | `GET /-/ring`         | nodes, their health, vnodes, each node's share          |
//! | `GET /-/owner/<key>`  | `{"key": ..., "owner": ..., "up": ...}`                 |
//! | `GET /-/proxy/shards` | cluster mode: the shard table ([`kv_cluster::TableView`]: placement version, members, each shard's leader); 404 in ring mode |
//!
//! In cluster mode the nodes of `/-/health`, `/-/ready`, `/-/ring` and
//! `/-/metrics` are the cluster's members as the proxy knows them now
//! (they change as members join and leave), not `--nodes`.
//!
//! The key is decoded with kv-http's [`key::parse`], as kv-node does, and the
//! ring hashes the decoded bytes, as kv-bench does, so `/caf%C3%A9` and
//! `/café` go to the same node. A path kv-node would refuse is refused here
//! with kv-node's own error, without bothering a node.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use kv_http::metrics::{Metrics, Operation, Scrape};
use kv_http::request::{check_head, close_after, declared_length, discard_body};
use kv_http::server::Reserve;
use kv_http::{json_response, key, ApiError};
use kv_ring::Ring;

use crate::cluster::{self, ClusterWorker};
use crate::error::ProxyError;
use crate::exchange::PooledBody;
use crate::pool::NodePool;
use crate::upstream::{self, Node, Outcome};

/// The response body: a node's streamed answer, or one made here.
pub type Body = Either<PooledBody, Full<Bytes>>;

const ADMIN_METHODS: &str = "GET, HEAD, OPTIONS";
const KEY_METHODS: &str = "GET, HEAD, PUT, POST, DELETE, OPTIONS";

/// What every request handler shares.
pub struct Proxy {
    pub ring: Ring,
    /// In ring order: `nodes[ring.owner_index(key)]` is the owner.
    pub nodes: Box<[Node]>,
    pub shares: Vec<f64>,
    /// This worker's connections to each node, in the same order.
    pub pools: Box<[Arc<NodePool>]>,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub started: Instant,
    /// Requests by operation and status, and latency; shared by the workers.
    pub metrics: Arc<Metrics>,
    /// The routing mode ([`crate::cluster`]): in cluster mode keys go to
    /// their shard's leader among the cluster's members instead of their
    /// ring owner among `nodes`. Ring mode may turn into cluster mode while
    /// the proxy runs, never back.
    pub cluster: ClusterWorker,
    /// The token clients must send (kv-http's one check), shared by the
    /// workers.
    pub auth: Arc<kv_http::auth::Auth>,
}

impl Proxy {
    /// The nodes requests go to: the cluster's members (and leaders) in
    /// cluster mode, `--nodes` in ring mode.
    pub fn current_nodes(&self) -> Vec<Node> {
        match self.cluster.get() {
            Some(cluster) => cluster.nodes().iter().map(|n| Node::clone(n)).collect(),
            None => self.nodes.to_vec(),
        }
    }

    /// Closes idle pooled connections, and the pools of nodes no longer
    /// routed to; each worker runs it every second.
    pub fn evict_idle(&self) {
        for pool in self.pools.iter() {
            pool.evict_idle();
        }
        self.cluster.evict();
    }
}

/// Runs [`Proxy::evict_idle`] every second, forever.
pub async fn evict_idle_forever(proxy: Arc<Proxy>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        proxy.evict_idle();
    }
}

/// The service function: every request gets an answer, errors included.
/// A connection in the probe reserve (over `--max-connections`) is served
/// `/-/health` and `/-/ready` only.
pub async fn handle(
    proxy: Arc<Proxy>,
    reserve: Reserve,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let operation = Operation::of(request.method(), request.uri().path());
    let has_body = !request.body().is_end_stream();
    let mut forwarded = false;
    let mut response = match route(&proxy, &reserve, request, &mut forwarded).await {
        // A node refused the proxy's own token: the proxy's fault, not the
        // client's (whose token the proxy accepted), so not a 401. Without
        // a token of its own the proxy passed the client's header on, and
        // the node's 401 is relayed as it is.
        Ok(response)
            if forwarded
                && response.status() == StatusCode::UNAUTHORIZED
                && crate::node_auth::is_set() =>
        {
            let node = response
                .headers()
                .get(upstream::X_KV_NODE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            crate::node_auth::refused_by(&node);
            let mut refused = ProxyError::from(ApiError::NodeFailed {
                node,
                why: "it refused the proxy's node token".into(),
            })
            .into_response()
            .map(Either::Right);
            if has_body {
                // The node answered before reading the body, if at all.
                close_after(&mut refused);
            }
            refused
        }
        Ok(response) => response,
        Err(error) => error.into_response().map(Either::Right),
    };
    // Answered here (a bad key, a refused method, the node down) before the
    // body was read: hyper closes such a connection, so say so.
    if has_body && !forwarded {
        close_after(&mut response);
    }
    // Time to the response head: the body streams on after this.
    proxy
        .metrics
        .record(operation, response.status().as_u16(), started.elapsed());
    Ok(response)
}

/// Never seen: the ring is built from the proxy's node list.
const UNKNOWN_OWNER: &str = "the ring named a node the proxy does not know";

async fn route(
    proxy: &Proxy,
    reserve: &Reserve,
    request: Request<Incoming>,
    forwarded: &mut bool,
) -> Result<Response<Body>, ProxyError> {
    let path = request.uri().path();
    reserve.admit(path)?;
    proxy
        .auth
        .check(request.method(), path, request.headers(), || None)?;
    check_head(request.version(), request.headers())?;
    if let Some(admin) = path.strip_prefix("/-/") {
        return admin_route(proxy, request.method(), admin).map(|r| r.map(Either::Right));
    }
    if !path.starts_with('/') {
        if path == "*" && request.method() == Method::OPTIONS {
            return Ok(allow(KEY_METHODS).map(Either::Right));
        }
        // `*` (asterisk form) is for OPTIONS only.
        return Err(ApiError::InvalidKey("the request target is not a path").into());
    }
    let key = key::parse(path)?;
    // Cluster mode hashes the key to its shard; the ring path is as it was.
    let cluster = proxy.cluster.get();
    let (owner, shard) = match cluster {
        Some(cluster) => (0, kv_cluster::shard_of(key.as_bytes(), cluster.shards())),
        None => (proxy.ring.owner_index(key.as_bytes()), 0),
    };
    // A method the node would refuse is refused here, before the body is
    // read: reading it would send `100 Continue` to a client that asked.
    if !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::PUT | Method::POST | Method::DELETE | Method::OPTIONS
    ) {
        return Err(ApiError::MethodNotAllowed { allow: KEY_METHODS }.into());
    }
    // Refused here, from the declared length, as kv-node would: a node that
    // refuses mid-upload closes on us and its answer can be lost.
    let declared = declared_length(request.headers());
    if declared.is_some_and(|length| length > proxy.max_body_bytes as u64) {
        // Read and discarded first, as kv-node does, so the 413 is not
        // lost to a reset.
        let (parts, mut body) = request.into_parts();
        discard_body(&parts.headers, &mut body).await;
        return Err(ApiError::BodyTooLarge {
            limit: proxy.max_body_bytes,
        }
        .into());
    }
    if let Some(cluster) = cluster {
        // The body is read in full before anything is sent (a retry sends
        // it again), so the client's connection can stay open whatever the
        // answer; the body errors that must close say so themselves.
        *forwarded = true;
        return cluster::forward(proxy, &proxy.cluster, cluster, request, shard).await;
    }
    // The ring was built from `nodes`, and `pools` has one per node: the
    // owner is in range of both.
    let (Some(node), Some(pool)) = (proxy.nodes.get(owner), proxy.pools.get(owner)) else {
        return Err(ApiError::Internal(UNKNOWN_OWNER).into());
    };
    let result = upstream::forward(
        pool,
        node,
        request,
        proxy.request_timeout,
        proxy.max_body_bytes,
    )
    .await;
    node.stats.record(&result);
    let response = result?;
    // Nodes started (or restarted) as a cluster after the proxy chose ring
    // mode: ask them now (see `cluster::rediscover`).
    if cluster::looks_clustered(response.status(), response.headers()) {
        proxy.cluster.mode.hint();
    }
    // The node answered, so the client's body was read whole.
    *forwarded = true;
    Ok(response.map(Either::Left))
}

fn admin_route(
    proxy: &Proxy,
    method: &Method,
    path: &str,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    if *method == Method::OPTIONS {
        // Known admin paths only, as GET would.
        admin_route(proxy, &Method::HEAD, path)?;
        return Ok(allow(ADMIN_METHODS));
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        // An unknown admin path is 404 whatever the method (as on kv-node).
        admin_route(proxy, &Method::HEAD, path)?;
        return Err(ApiError::MethodNotAllowed {
            allow: ADMIN_METHODS,
        }
        .into());
    }
    if path == "metrics" {
        let mut response = Response::new(Full::new(Bytes::from(render_metrics(proxy))));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(kv_http::metrics::CONTENT_TYPE),
        );
        return Ok(response);
    }
    if path == "proxy/shards" {
        let Some(cluster) = proxy.cluster.get() else {
            return Err(ProxyError::NotClustered);
        };
        let mut bytes = serde_json::to_vec(&cluster.table_view()).unwrap_or_default();
        bytes.push(b'\n');
        return Ok(json_response(StatusCode::OK, Bytes::from(bytes)));
    }
    let nodes = proxy.current_nodes();
    let body = match path {
        // Ready while any node is up: the keys of the nodes that are up
        // are answered. With every node down, nothing is, so a load
        // balancer should look elsewhere (the node's /-/ready shape). In
        // cluster mode the same holds per shard: ready while any shard has
        // a leader that is up with most of its replicas, naming the shards
        // that have none. Up means answered (`NodeHealth::is_known_up`): a
        // proxy whose first checks have not come back yet knows of nothing
        // it can serve.
        "ready" if nodes.iter().all(|n| !n.health.is_known_up()) => {
            let unchecked: Vec<&str> = nodes
                .iter()
                .filter(|n| n.health.is_unchecked())
                .map(|n| n.name.as_str())
                .collect();
            let error = if unchecked.is_empty() {
                "no node is up"
            } else {
                "no node is up: waiting for the first health checks"
            };
            let body = serde_json::json!({
                "ready": false,
                "error": error,
                "nodes_unchecked": unchecked,
            });
            let mut bytes = body.to_string().into_bytes();
            bytes.push(b'\n');
            return Ok(json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from(bytes),
            ));
        }
        // Cluster mode: ready while any shard has a live leader (its keys
        // are answered); the others are named. None: nothing is served.
        "ready" => match proxy.cluster.get() {
            Some(cluster) => {
                let leaderless = cluster.without_leader();
                if leaderless.len() >= cluster.shards() as usize {
                    let body = serde_json::json!({
                        "ready": false,
                        "error": "no shard has a leader that is up with a quorum of its replicas up",
                        "shards_without_leader": leaderless,
                    });
                    let mut bytes = body.to_string().into_bytes();
                    bytes.push(b'\n');
                    return Ok(json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Bytes::from(bytes),
                    ));
                }
                serde_json::json!({ "ready": true, "shards_without_leader": leaderless })
            }
            None => serde_json::json!({ "ready": true }),
        },
        "health" => {
            let down: Vec<&str> = nodes
                .iter()
                .filter(|n| !n.health.is_up())
                .map(|n| n.name.as_str())
                .collect();
            // Not checked yet (the proxy just started, or the node was just
            // learnt): neither up nor down.
            let unchecked: Vec<&str> = nodes
                .iter()
                .filter(|n| n.health.is_unchecked())
                .map(|n| n.name.as_str())
                .collect();
            // Still 200: the proxy itself serves, and the keys of the
            // nodes that are up are answered. Which nodes are down is here
            // for whoever looks.
            let mut health = serde_json::json!({
                "status": if down.is_empty() && unchecked.is_empty() { "ok" } else { "degraded" },
                "role": "proxy",
                "mode": if proxy.cluster.get().is_some() { "cluster" } else { "ring" },
                "nodes": nodes.len(),
                "nodes_up": nodes.len() - down.len() - unchecked.len(),
                "nodes_down": down,
                "nodes_unchecked": unchecked,
                "uptime_seconds": proxy.started.elapsed().as_secs(),
                "version": env!("CARGO_PKG_VERSION"),
            });
            // Cluster mode: a shard without a known leader is answered only
            // after a wait, or 503: degraded too.
            if let Some(cluster) = proxy.cluster.get() {
                let leaderless = cluster.without_leader();
                // `json!({...})` above is an object: always `Some`.
                if let Some(fields) = health.as_object_mut() {
                    if !leaderless.is_empty() {
                        fields.insert("status".to_owned(), "degraded".into());
                    }
                    fields.insert("shards".to_owned(), cluster.shards().into());
                    fields.insert("placement_version".to_owned(), cluster.version().into());
                    fields.insert("shards_without_leader".to_owned(), leaderless.into());
                }
            }
            health
        }
        // Cluster mode routes by the shard table: no ring shares.
        "ring" if proxy.cluster.get().is_some() => serde_json::json!({
            "mode": "cluster",
            "nodes": nodes.iter().map(|node| {
                serde_json::json!({ "node": node.name, "up": node.health.is_up() })
            }).collect::<Vec<_>>(),
        }),
        "ring" => serde_json::json!({
            "vnodes": proxy.ring.vnodes(),
            "nodes": proxy.nodes.iter().zip(&proxy.shares).map(|(node, share)| {
                serde_json::json!({
                    "node": node.name,
                    "up": node.health.is_up(),
                    "share": share,
                })
            }).collect::<Vec<_>>(),
        }),
        _ => match path.strip_prefix("owner/") {
            Some(encoded) if proxy.cluster.get().is_some() => {
                let key = key::parse(encoded)?;
                let Some(cluster) = proxy.cluster.get() else {
                    return Err(ApiError::UnknownAdminPath.into());
                };
                let (shard, leader) = cluster.leader_of(key.as_bytes());
                let up = leader
                    .as_deref()
                    .is_some_and(|addr| nodes.iter().any(|n| n.name == addr && n.health.is_up()));
                serde_json::json!({
                    "key": key,
                    "shard": shard,
                    "owner": leader,
                    "up": up,
                })
            }
            Some(encoded) => {
                let key = key::parse(encoded)?;
                let node = proxy
                    .nodes
                    .get(proxy.ring.owner_index(key.as_bytes()))
                    .ok_or(ApiError::Internal(UNKNOWN_OWNER))?;
                serde_json::json!({
                    "key": key,
                    "owner": node.name,
                    "up": node.health.is_up(),
                })
            }
            None => return Err(ApiError::UnknownAdminPath.into()),
        },
    };
    let mut bytes = body.to_string().into_bytes();
    bytes.push(b'\n');
    Ok(json_response(StatusCode::OK, Bytes::from(bytes)))
}

/// 204 with `Allow: <methods>` (RFC 9110 §9.3.7).
fn allow(methods: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
        .headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(methods));
    response
}

/// The proxy's metrics in the Prometheus text format.
fn render_metrics(proxy: &Proxy) -> String {
    let mut scrape = Scrape::new(&proxy.metrics);
    let nodes = proxy.current_nodes();
    let node = |node: &upstream::Node| vec![("node", node.name.clone())];
    scrape.family(
        "kv_proxy_node_up",
        "Whether health checks consider the node up.",
        false,
        nodes
            .iter()
            .map(|n| (node(n), u64::from(n.health.is_up())))
            .collect(),
    );
    scrape.family(
        "kv_proxy_forwarded_total",
        "Requests a node answered (any status).",
        true,
        nodes
            .iter()
            .map(|n| (node(n), n.stats.count(Outcome::Forwarded)))
            .collect(),
    );
    let mut errors = Vec::new();
    for n in &nodes {
        for (kind, outcome) in [
            ("down", Outcome::Down),
            ("connect", Outcome::Connect),
            ("timeout", Outcome::Timeout),
            ("upstream", Outcome::Upstream),
        ] {
            let labels = vec![("node", n.name.clone()), ("kind", kind.to_owned())];
            errors.push((labels, n.stats.count(outcome)));
        }
    }
    scrape.family(
        "kv_proxy_errors_total",
        "Requests not answered by their node, by reason.",
        true,
        errors,
    );
    if let Some(cluster) = proxy.cluster.get() {
        let stats = &cluster.stats;
        let count = |counter: &std::sync::atomic::AtomicU64| {
            vec![(
                Vec::new(),
                counter.load(std::sync::atomic::Ordering::Relaxed),
            )]
        };
        scrape.family(
            "kv_proxy_not_leader_total",
            "421 answers followed to the named leader.",
            true,
            count(&stats.not_leader),
        );
        scrape.family(
            "kv_proxy_leader_waits_total",
            "Requests that waited for their shard to have a leader.",
            true,
            count(&stats.waited),
        );
        scrape.family(
            "kv_proxy_no_leader_total",
            "Requests answered 503: no leader within --leader-wait, or it kept moving.",
            true,
            count(&stats.no_leader),
        );
        scrape.family(
            "kv_proxy_outcome_unknown_total",
            "Requests answered 504: the outcome of a write is unknown.",
            true,
            count(&stats.unknown),
        );
        scrape.family(
            "kv_proxy_reads_abandoned_total",
            "Reads given up on at a leader that stopped answering and sent to the new leader.",
            true,
            count(&stats.abandoned),
        );
        scrape.family(
            "kv_proxy_table_refreshes_total",
            "Refreshes of the shard table from GET /-/shards.",
            true,
            count(&stats.refreshes),
        );
        scrape.family(
            "kv_proxy_placement_version",
            "The placement version of the shard table's members and replicas.",
            false,
            vec![(Vec::new(), cluster.version())],
        );
        scrape.family(
            "kv_proxy_shards_without_leader",
            "Shards without a leader that can serve them: none known, or the known one is at a node that is down.",
            false,
            vec![(Vec::new(), cluster.without_leader().len() as u64)],
        );
    }
    scrape.encode()
}
