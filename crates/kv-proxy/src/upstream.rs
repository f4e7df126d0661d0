//! Forwarding a request to the node that owns its key.
//!
//! * Connections come from the worker's keep-alive pool for the node
//!   ([`crate::pool`]), so a request costs no TCP connect; the exchange on
//!   it is [`crate::exchange`]'s.
//! * The client's body is read in full first ([`read_body`], as nginx's
//!   default `proxy_request_buffering on`): a node never sees an oversized
//!   or half-sent body, and a slow upload is the client's time (408), not
//!   the node's. The node's answer streams back when it is long.
//! * The request goes on as the client sent it: its own path and query
//!   (moved, not copied), its headers minus the hop-by-hop ones. The
//!   `X-Kv-Node` header value is built once at start-up; per request no
//!   string is formatted.
//! * Connect errors count against the node's health (passive marking) and
//!   answer 503 at once (a refused connect is not retried: the next health
//!   check decides). No answer within `--request-timeout` answers 504. A GET
//!   or HEAD without a body is retried once after an exchange broke, since
//!   it cannot have changed anything; other requests are sent again only
//!   when a reused connection could not take them (the node never saw them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, Uri, Version};

use kv_http::metrics::{thread_slot, CachePadded, SHARDS};
use kv_http::request::discard;
use kv_http::ApiError;

use crate::error::ProxyError;
use crate::exchange::{exchange, ExchangeError, PooledBody};
use crate::health::NodeHealth;
use crate::pool::NodePool;

/// The header naming the node that answered (or should have).
pub const X_KV_NODE: HeaderName = HeaderName::from_static("x-kv-node");

/// Headers that describe one hop's connection, not the message: never
/// forwarded (RFC 9110 §7.6.1). Each hop frames its bodies itself.
const HOP_BY_HOP: [HeaderName; 6] = [
    hyper::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::TE,
    hyper::header::TRANSFER_ENCODING,
    hyper::header::UPGRADE,
];

/// One node, as the forwarding path needs it. Each worker has its own
/// copy; the health is shared.
#[derive(Debug, Clone)]
pub struct Node {
    /// The name on the ring (`host:port`), as given in `--nodes`.
    pub name: String,
    /// `X-Kv-Node: <name>` (and `Host` when the client sent none), built once.
    pub header: HeaderValue,
    pub health: Arc<NodeHealth>,
    /// Forwarding counters, shared by every worker.
    pub stats: Arc<NodeStats>,
}

/// What became of one forwarding attempt, for `/-/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node answered (any status).
    Forwarded,
    /// Refused because the node was marked down.
    Down,
    /// The connection to the node failed.
    Connect,
    /// The node did not answer in time.
    Timeout,
    /// The node broke off mid-exchange.
    Upstream,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Forwarded,
        Outcome::Down,
        Outcome::Connect,
        Outcome::Timeout,
        Outcome::Upstream,
    ];

    fn of<T>(result: &Result<T, ProxyError>) -> Option<Outcome> {
        Some(match result {
            Ok(_) => Outcome::Forwarded,
            Err(ProxyError::NodeDown { .. }) => Outcome::Down,
            Err(ProxyError::Connect { .. }) => Outcome::Connect,
            Err(ProxyError::Timeout { .. }) => Outcome::Timeout,
            Err(ProxyError::Upstream { .. } | ProxyError::OutcomeUnknown { .. }) => {
                Outcome::Upstream
            }
            Err(
                ProxyError::Api(_)
                | ProxyError::NoLeader { .. }
                | ProxyError::LeaderMoving { .. }
                | ProxyError::NotClustered,
            ) => return None,
        })
    }
}

/// Per-node counters for `/-/metrics`: relaxed atomic adds, no lock, one
/// shard per thread (as [`Metrics`](kv_http::metrics::Metrics)),
/// so workers do not pass a cache line back and forth per request.
#[derive(Debug)]
pub struct NodeStats {
    shards: Box<[CachePadded<[AtomicU64; Outcome::ALL.len()]>]>,
}

impl Default for NodeStats {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| CachePadded::default()).collect(),
        }
    }
}

impl NodeStats {
    /// Counts one forwarding attempt's outcome.
    #[inline]
    pub fn record<T>(&self, result: &Result<T, ProxyError>) {
        if let Some(outcome) = Outcome::of(result) {
            // A slot modulo the shard count and an `Outcome` into an array of
            // `Outcome::ALL.len()`: in range, so the `get`s never miss.
            if let Some(count) = self
                .shards
                .get(thread_slot() % self.shards.len())
                .and_then(|shard| shard.get(outcome as usize))
            {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How many attempts had `outcome`, over all threads.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.shards
            .iter()
            .filter_map(|shard| shard.get(outcome as usize))
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }
}

impl Node {
    /// Parses `name` (`host:port`); an error says what is wrong with it.
    pub fn new(name: &str) -> Result<Self, String> {
        let authority: Authority = name
            .parse()
            .map_err(|e| format!("node {name:?} is not host:port: {e}"))?;
        if authority.port_u16().is_none() || name.contains('@') {
            return Err(format!("node {name:?} is not host:port"));
        }
        let header = HeaderValue::from_maybe_shared(Bytes::from(name.to_owned()))
            .map_err(|e| format!("node {name:?} cannot be a header value: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            header,
            health: Arc::new(NodeHealth::new(name)),
            stats: Arc::new(NodeStats::default()),
        })
    }
}

/// Whether `name` is one of the hop-by-hop headers (not counting those a
/// `Connection` header names).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass of cheap comparisons first: requests and answers almost never
    // carry these, and six hashed removals per message would cost more.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too. Rare; only then
    // does this allocate.
    if let Some(connection) = headers.get(hyper::header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Sends `request` to `node` over a connection from `pool` and returns its
/// answer, with `X-Kv-Node` added. The body is read in full first (see
/// [`read_body`]).
pub async fn forward(
    pool: &Arc<NodePool>,
    node: &Node,
    request: Request<Incoming>,
    request_timeout: Duration,
    max_body_bytes: usize,
) -> Result<Response<PooledBody>, ProxyError> {
    if !node.health.is_up() {
        return Err(ProxyError::NodeDown {
            node: node.name.clone(),
        });
    }
    let (mut parts, body) = request.into_parts();
    let body = read_body(body, max_body_bytes, request_timeout).await?;
    prepare(&mut parts);
    // A GET or HEAD cannot have changed anything: after a broken exchange
    // it goes once more, on a new connection.
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD) && body.is_empty();
    let exchange = async {
        let error = match send(pool, node, &parts, &body, None).await? {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        if !idempotent {
            return Err(upstream_error(node, &error));
        }
        log::debug!(
            "retrying {} {} once after: {error}",
            parts.method,
            parts.uri
        );
        match send(pool, node, &parts, &body, None).await? {
            Ok(response) => Ok(response),
            Err(error) => Err(upstream_error(node, &error)),
        }
    };
    match tokio::time::timeout(request_timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout {
            node: node.name.clone(),
            after: request_timeout,
        }),
    }
}

/// Origin-form target, HTTP/1.1, no hop-by-hop headers, no `Expect` (the
/// body is here already), and the proxy's node token if it has one.
pub(crate) fn prepare(parts: &mut Parts) {
    if parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    }
    parts.version = Version::HTTP_11;
    parts.extensions = Default::default();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(hyper::header::EXPECT);
    crate::node_auth::mark(&mut parts.headers);
}

/// One exchange, with `extra` (one header of this attempt's own) added to
/// the request. The outer error is final (no connection could be made);
/// the inner one is a failure after the request may have reached the node,
/// which the caller may retry.
pub(crate) async fn send(
    pool: &Arc<NodePool>,
    node: &Node,
    parts: &Parts,
    body: &Bytes,
    extra: Option<&(HeaderName, HeaderValue)>,
) -> Result<Result<Response<PooledBody>, ExchangeError>, ProxyError> {
    let mut fresh = false;
    loop {
        let checked_out = if fresh {
            pool.connect().await.map(|connection| (connection, false))
        } else {
            pool.checkout().await
        };
        let (connection, reused) = checked_out.map_err(|why| {
            node.health.record_failure(&why);
            ProxyError::Connect {
                node: node.name.clone(),
                why,
            }
        })?;
        match exchange(pool, connection, parts, body, &node.header, extra).await {
            Ok(response) => {
                node.health.record_success();
                return Ok(Ok(response));
            }
            // A reused connection that could not take the request (the node
            // closed it meanwhile): the node never saw it whole, so any
            // method may go again, once, on a new connection.
            Err(error) if reused && error.unsent() => {
                log::debug!("pooled connection to {} unusable: {error}", node.name);
                fresh = true;
            }
            Err(error) => return Ok(Err(error)),
        }
    }
}

/// The whole request body, at most `limit` bytes (413 past it, after
/// discarding the rest as kv-node does). Read before anything is sent, as
/// nginx does by default: a retry can send it again, a node never sees an
/// oversized or half-sent body, and a slow upload is the client's time, not
/// the node's. A client silent for `timeout` mid-body gets kv-node's 408; a
/// slow one that keeps sending is waited for.
pub(crate) async fn read_body(
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ProxyError> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(ApiError::BodyTimeout.into()),
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(|e| ApiError::BodyRead(e.to_string()))?,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len();
        if total > limit {
            discard(&mut body).await;
            return Err(ApiError::BodyTooLarge { limit }.into());
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
}

fn upstream_error(node: &Node, error: &ExchangeError) -> ProxyError {
    ProxyError::Upstream {
        node: node.name.clone(),
        why: error_chain(error),
    }
}

/// `error: source: source`, since hyper's top-level messages are vague.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_must_be_host_and_port() {
        assert!(Node::new("127.0.0.1:8081").is_ok());
        assert!(Node::new("node-1:8081").is_ok());
        assert!(Node::new("127.0.0.1").is_err());
        assert!(Node::new("http://127.0.0.1:8081").is_err());
        assert!(Node::new("user@host:1").is_err());
        assert!(Node::new("").is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("content-type"));
        // TE alone is found and dropped; end-to-end headers stay.
        let mut headers = HeaderMap::new();
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-end-to-end"));
    }
}
