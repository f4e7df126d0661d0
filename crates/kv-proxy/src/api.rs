//! Routing: admin paths are answered here, every key path is forwarded to
//! its owner.
//!
//! | request               | answer                                                  |
//! |-----------------------|---------------------------------------------------------|
//! | `<any> /<key>`        | the owner node's answer, plus `X-Kv-Node: <owner>`      |
//! | `GET /-/health`       | 200 `{"status": "ok", "nodes": N, "nodes_up": M, ...}`  |
//! | `GET /-/ring`         | nodes, their health, vnodes, each node's share          |
//! | `GET /-/owner/<key>`  | `{"key": ..., "owner": ..., "up": ...}`                 |
//!
//! The key is decoded with kv-node's own [`kv_node::key::parse`] and the
//! ring hashes the decoded bytes, as kv-bench does, so `/caf%C3%A9` and
//! `/café` go to the same node. A path kv-node would refuse is refused here
//! with kv-node's own error, without bothering a node.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use kv_node::error::ApiError;
use kv_node::key;
use kv_node::metrics::{Metrics, Operation};
use kv_ring::Ring;

use crate::error::ProxyError;
use crate::pool::{NodePool, PooledBody};
use crate::upstream::{self, Node, Outcome};

/// The response body: a node's streamed answer, or one made here.
pub type Body = Either<PooledBody, Full<Bytes>>;

const ADMIN_METHODS: &str = "GET, HEAD";

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
}

/// The service function: every request gets an answer, errors included.
pub async fn handle(
    proxy: Arc<Proxy>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let operation = Operation::of(request.method(), request.uri().path());
    let response = match route(&proxy, request).await {
        Ok(response) => response,
        Err(error) => error.into_response().map(Either::Right),
    };
    // Time to the response head: the body streams on after this.
    proxy
        .metrics
        .record(operation, response.status().as_u16(), started.elapsed());
    Ok(response)
}

async fn route(proxy: &Proxy, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
    let path = request.uri().path();
    if let Some(admin) = path.strip_prefix("/-/") {
        return admin_route(proxy, request.method(), admin).map(|r| r.map(Either::Right));
    }
    let owner = proxy.ring.owner_index(key::parse(path)?.as_bytes());
    // Refused here, from the declared length, as kv-node would: a node that
    // refuses mid-upload closes on us and its answer can be lost.
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > proxy.max_body_bytes as u64) {
        // Read and discarded first, as kv-node does, so the 413 is not
        // lost to a reset.
        kv_node::api::drain(&mut request.into_body()).await;
        return Err(ApiError::BodyTooLarge {
            limit: proxy.max_body_bytes,
        }
        .into());
    }
    let node = &proxy.nodes[owner];
    let result = upstream::forward(
        &proxy.pools[owner],
        node,
        request,
        proxy.request_timeout,
        proxy.max_body_bytes,
    )
    .await;
    node.stats.record(&result);
    Ok(result?.map(Either::Left))
}

fn admin_route(
    proxy: &Proxy,
    method: &Method,
    path: &str,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Err(ApiError::MethodNotAllowed {
            allow: ADMIN_METHODS,
        }
        .into());
    }
    if path == "metrics" {
        let mut response = Response::new(Full::new(Bytes::from(render_metrics(proxy))));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return Ok(response);
    }
    let body = match path {
        "ready" => serde_json::json!({ "ready": true }),
        "health" => serde_json::json!({
            "status": "ok",
            "role": "proxy",
            "nodes": proxy.nodes.len(),
            "nodes_up": proxy.nodes.iter().filter(|n| n.health.is_up()).count(),
            "uptime_seconds": proxy.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
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
            Some(encoded) => {
                let key = key::parse(encoded)?;
                let node = &proxy.nodes[proxy.ring.owner_index(key.as_bytes())];
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
    Ok(kv_node::api::json_response(
        StatusCode::OK,
        Bytes::from(bytes),
    ))
}

/// The proxy's metrics in the Prometheus text format.
fn render_metrics(proxy: &Proxy) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(8192);
    proxy.metrics.render(&mut out);
    out.push_str("# HELP kv_proxy_node_up Whether health checks consider the node up.\n");
    out.push_str("# TYPE kv_proxy_node_up gauge\n");
    for node in proxy.nodes.iter() {
        let up = u8::from(node.health.is_up());
        let _ = writeln!(out, "kv_proxy_node_up{{node=\"{}\"}} {up}", node.name);
    }
    out.push_str("# HELP kv_proxy_forwarded_total Requests a node answered (any status).\n");
    out.push_str("# TYPE kv_proxy_forwarded_total counter\n");
    for node in proxy.nodes.iter() {
        let count = node.stats.count(Outcome::Forwarded);
        let _ = writeln!(
            out,
            "kv_proxy_forwarded_total{{node=\"{}\"}} {count}",
            node.name
        );
    }
    out.push_str("# HELP kv_proxy_errors_total Requests not answered by their node, by reason.\n");
    out.push_str("# TYPE kv_proxy_errors_total counter\n");
    for node in proxy.nodes.iter() {
        for (kind, outcome) in [
            ("down", Outcome::Down),
            ("connect", Outcome::Connect),
            ("timeout", Outcome::Timeout),
            ("upstream", Outcome::Upstream),
        ] {
            let _ = writeln!(
                out,
                "kv_proxy_errors_total{{node=\"{}\",kind=\"{kind}\"}} {}",
                node.name,
                node.stats.count(outcome)
            );
        }
    }
    out
}
