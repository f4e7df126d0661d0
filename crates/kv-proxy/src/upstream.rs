//! Forwarding a request to the node that owns its key.
//!
//! * Connections come from the worker's keep-alive pool for the node
//!   ([`crate::pool`]), so a request costs no TCP connect.
//! * Bodies stream both ways: the client's body is handed to the node as it
//!   arrives, the node's answer is handed back the same way. Nothing is
//!   buffered in full.
//! * The request goes on as the client sent it: its own path and query
//!   (moved, not copied), its headers minus the hop-by-hop ones. The
//!   `X-Kv-Node` header value is built once at start-up; per request no
//!   string is formatted.
//! * Connect errors count against the node's health (passive marking) and
//!   answer 503 at once (a refused connect is not retried: the next health
//!   check decides). No answer within `--request-timeout` answers 504. A GET
//!   or HEAD without a body is retried once after an exchange broke, since
//!   it cannot have changed anything; writes are retried only when hyper
//!   hands them back unsent (the node never saw them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, Uri, Version};
use tokio::time::Instant;

use kv_http::metrics::{thread_slot, CachePadded, SHARDS};
use kv_http::request::discard;
use kv_http::ApiError;

use crate::error::ProxyError;
use crate::health::NodeHealth;
use crate::pool::{NodePool, PooledBody};
use crate::request_body::{ClientBody, UpstreamBody};

/// The header naming the node that answered (or should have).
pub const X_KV_NODE: HeaderName = HeaderName::from_static("x-kv-node");

/// Headers that describe one hop's connection, not the message: never
/// forwarded (RFC 9110 §7.6.1). hyper re-frames bodies itself.
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

/// Marks a node's answer that closed its connection (`Connection: close`,
/// which is hop-by-hop and so not forwarded): the node may have answered
/// before reading all of the body, and then so must the client's connection
/// close (see [`kv_http::request::close_after`]).
#[derive(Debug, Clone, Copy)]
pub struct NodeClosed;

pub(crate) fn says_close(headers: &HeaderMap) -> bool {
    headers.get(hyper::header::CONNECTION).is_some_and(|value| {
        value
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|option| option.trim().eq_ignore_ascii_case("close"))
    })
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
/// answer, streaming, with `X-Kv-Node` added.
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
    // Origin form (`/key?query`) to the node, even if the client sent the
    // absolute form.
    if parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    }
    // Speak HTTP/1.1 with the node whatever the client spoke, so the pooled
    // connection stays alive; hyper answers the client in its own version.
    parts.version = Version::HTTP_11;
    parts.extensions = Default::default();
    strip_hop_by_hop(&mut parts.headers);
    // HTTP/1.1 requires one; an HTTP/1.0 client may not have sent it.
    if !parts.headers.contains_key(HOST) {
        parts.headers.insert(HOST, node.header.clone());
    }

    // What a retry needs, kept only for requests that may be retried.
    let retry =
        (matches!(parts.method, Method::GET | Method::HEAD) && body.is_end_stream()).then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });

    // A declared length was checked against the limit already; a chunked
    // body is counted as it goes. A request without a body (a GET) costs
    // no allocation here.
    let (body, upload) = if body.is_end_stream() {
        (UpstreamBody::Empty, None)
    } else {
        let (client, upload) = ClientBody::new(body, max_body_bytes);
        (UpstreamBody::Client(client), Some(upload))
    };
    let request = Request::from_parts(parts, body);
    let exchange = async {
        let error = match send(pool, node, request).await? {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        let Some((method, uri, headers)) = retry else {
            return Err(upstream_error(node, &error));
        };
        log::debug!("retrying {method} {uri} once after: {error}");
        let mut again = Request::new(UpstreamBody::Empty);
        *again.method_mut() = method;
        *again.uri_mut() = uri;
        *again.headers_mut() = headers;
        match send(pool, node, again).await? {
            Ok(response) => Ok(response),
            Err(error) => Err(upstream_error(node, &error)),
        }
    };
    tokio::pin!(exchange);
    let mut deadline = Instant::now() + request_timeout;
    let result = loop {
        if let Ok(result) = tokio::time::timeout_at(deadline, &mut exchange).await {
            break result;
        }
        // The node's time counts from the last byte of the upload: a client
        // still sending (slowly) is not the node's fault.
        let Some(upload) = &upload else {
            break Err(node_timeout(node, request_timeout));
        };
        let later = upload.last_progress() + request_timeout;
        if later > deadline {
            deadline = later;
        } else if upload.stalled_on_client() {
            // The client stopped sending its body: kv-node's own answer.
            break Err(ApiError::BodyTimeout.into());
        } else {
            // Sent, or the node stopped reading it.
            break Err(node_timeout(node, request_timeout));
        }
    };
    if result.is_err() {
        let client_error = upload
            .as_ref()
            .and_then(|upload| upload.take_client_error());
        if let Some(why) = client_error {
            // The client's body broke, not the node: kv-node's own answer.
            return Err(ApiError::BodyRead(why).into());
        }
        // Failed because the body crossed the limit: the node got no more
        // than the limit and will discard it; the client gets kv-node's 413.
        let oversized = upload.and_then(|upload| upload.take_overflow());
        if let Some(mut body) = oversized {
            discard(&mut body).await;
            return Err(ApiError::BodyTooLarge {
                limit: max_body_bytes,
            }
            .into());
        }
    }
    result
}

fn node_timeout(node: &Node, after: Duration) -> ProxyError {
    ProxyError::Timeout {
        node: node.name.clone(),
        after,
    }
}

/// One exchange. The outer error is final (no connection could be made);
/// the inner one is a failure after the request may have reached the node,
/// which the caller may retry.
pub(crate) async fn send(
    pool: &Arc<NodePool>,
    node: &Node,
    mut request: Request<UpstreamBody>,
) -> Result<Result<Response<PooledBody>, hyper::Error>, ProxyError> {
    let mut fresh = false;
    loop {
        let checked_out = if fresh {
            pool.connect().await
        } else {
            pool.checkout().await
        };
        let mut sender = checked_out.map_err(|why| {
            node.health.record_failure(&why);
            ProxyError::Connect {
                node: node.name.clone(),
                why,
            }
        })?;
        crate::node_auth::mark(request.headers_mut());
        match sender.try_send_request(request).await {
            Ok(response) => {
                node.health.record_success();
                let (mut parts, body) = response.into_parts();
                if says_close(&parts.headers) {
                    parts.extensions.insert(NodeClosed);
                }
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.insert(X_KV_NODE, node.header.clone());
                let body = PooledBody::new(body, sender, Arc::clone(pool));
                return Ok(Ok(Response::from_parts(parts, body)));
            }
            Err(mut error) => match error.take_message() {
                // The connection could not take it (closed meanwhile): the
                // node never saw it, so any method may go again, once, on
                // a new connection.
                Some(unsent) if !fresh => {
                    log::debug!(
                        "pooled connection to {} unusable: {}",
                        node.name,
                        error.error()
                    );
                    request = unsent;
                    fresh = true;
                }
                _ => return Ok(Err(error.into_error())),
            },
        }
    }
}

fn upstream_error(node: &Node, error: &hyper::Error) -> ProxyError {
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
