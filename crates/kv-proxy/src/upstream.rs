//! Forwarding a request to the node that owns its key.
//!
//! * A hyper-util legacy [`Client`] per worker thread holds a keep-alive pool
//!   per node, so a request costs no TCP connect. Idle pooled connections are closed after
//!   `--pool-idle-timeout`, which is shorter than kv-node's idle timeout, so
//!   the proxy never picks a connection the node is closing.
//! * Bodies stream both ways: the client's body is handed to the node as it
//!   arrives, the node's answer is handed back the same way. Nothing is
//!   buffered in full.
//! * Each node's URI authority and `X-Kv-Node` header value are parsed once at
//!   start-up; per request, the URI is rebuilt from parts (the client's own
//!   path and query, moved, not copied) and no string is formatted.
//! * Connect errors count against the node's health (passive marking) and
//!   answer 503; no answer within `--request-timeout` answers 504. A GET or
//!   HEAD without a body is retried once after a connection error, since it
//!   cannot have changed anything; writes are never retried.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Method, Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::health::NodeHealth;

/// The header naming the node that answered (or should have).
pub const X_KV_NODE: HeaderName = HeaderName::from_static("x-kv-node");

/// The body sent to a node: the client's, or none for a retried GET.
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// The pooled client shared by all requests.
pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

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
    /// `host:port`, parsed once for building upstream URIs.
    pub authority: Authority,
    /// `X-Kv-Node: <name>`, built once.
    pub header: HeaderValue,
    pub health: Arc<NodeHealth>,
    /// Forwarding counters, shared by every worker.
    pub stats: Arc<NodeStats>,
}

/// Per-node counters for `/-/metrics`: relaxed atomic adds, no lock.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Requests the node answered (any status).
    pub forwarded: AtomicU64,
    /// Requests refused because the node was marked down.
    pub down: AtomicU64,
    /// Requests whose connection to the node failed.
    pub connect: AtomicU64,
    /// Requests the node did not answer in time.
    pub timeout: AtomicU64,
    /// Requests the node broke off mid-exchange.
    pub upstream: AtomicU64,
}

impl NodeStats {
    /// Counts one forwarding attempt's outcome.
    #[inline]
    pub fn record<T>(&self, result: &Result<T, ProxyError>) {
        let counter = match result {
            Ok(_) => &self.forwarded,
            Err(ProxyError::NodeDown { .. }) => &self.down,
            Err(ProxyError::Connect { .. }) => &self.connect,
            Err(ProxyError::Timeout { .. }) => &self.timeout,
            Err(ProxyError::Upstream { .. }) => &self.upstream,
            Err(ProxyError::Api(_)) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
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
            authority,
            header,
            health: Arc::new(NodeHealth::new(name)),
            stats: Arc::new(NodeStats::default()),
        })
    }
}

/// Builds the pooled client.
pub fn client(
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    // Small request/response pairs: send each at once.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_max_idle_per_host(pool_max_idle)
        .build(connector)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// Sends `request` to `node` and returns its answer, streaming, with
/// `X-Kv-Node` added.
pub async fn forward(
    client: &UpstreamClient,
    node: &Node,
    request: Request<Incoming>,
    request_timeout: Duration,
) -> Result<Response<Incoming>, ProxyError> {
    if !node.health.is_up() {
        return Err(ProxyError::NodeDown {
            node: node.name.clone(),
        });
    }
    let deadline = Instant::now() + request_timeout;
    let (mut parts, body) = request.into_parts();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(node.authority.clone());
    parts.uri = Uri::from_parts(uri)
        .map_err(|_| kv_node::error::ApiError::InvalidKey("the path is not a valid URI"))?;
    // Speak HTTP/1.1 with the node whatever the client spoke, so the pooled
    // connection stays alive; hyper answers the client in its own version.
    parts.version = Version::HTTP_11;
    parts.extensions = Default::default();
    strip_hop_by_hop(&mut parts.headers);

    // What a retry needs, kept only for requests that may be retried.
    let retry =
        (matches!(parts.method, Method::GET | Method::HEAD) && body.is_end_stream()).then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });

    let first = Request::from_parts(parts, Either::Left(body));
    let error = match send(client, node, first, deadline, request_timeout).await? {
        Ok(response) => return Ok(finish(node, response)),
        Err(error) => error,
    };
    let Some((method, uri, headers)) = retry else {
        return Err(classify(node, error));
    };
    log::debug!("retrying {method} {uri} once after: {error}");
    let mut again = Request::new(Either::Right(Empty::new()));
    *again.method_mut() = method;
    *again.uri_mut() = uri;
    *again.headers_mut() = headers;
    match send(client, node, again, deadline, request_timeout).await? {
        Ok(response) => Ok(finish(node, response)),
        Err(error) => Err(classify(node, error)),
    }
}

/// One attempt. The outer error is the deadline (final); the inner one a
/// failed exchange (maybe retried).
async fn send(
    client: &UpstreamClient,
    node: &Node,
    request: Request<UpstreamBody>,
    deadline: Instant,
    request_timeout: Duration,
) -> Result<Result<Response<Incoming>, hyper_util::client::legacy::Error>, ProxyError> {
    match tokio::time::timeout_at(deadline, client.request(request)).await {
        Ok(Ok(response)) => {
            node.health.record_success();
            Ok(Ok(response))
        }
        Ok(Err(error)) => {
            if error.is_connect() {
                node.health.record_failure(&error_chain(&error));
            }
            Ok(Err(error))
        }
        Err(_) => Err(ProxyError::Timeout {
            node: node.name.clone(),
            after: request_timeout,
        }),
    }
}

fn classify(node: &Node, error: hyper_util::client::legacy::Error) -> ProxyError {
    let node_name = node.name.clone();
    if error.is_connect() {
        ProxyError::Connect {
            node: node_name,
            why: error_chain(&error),
        }
    } else {
        ProxyError::Upstream {
            node: node_name,
            why: error_chain(&error),
        }
    }
}

/// `error: source: source`, since hyper's top-level messages are vague.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn finish(node: &Node, response: Response<Incoming>) -> Response<Incoming> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(X_KV_NODE, node.header.clone());
    Response::from_parts(parts, body)
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
