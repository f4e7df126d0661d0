//! The HTTP/1.1 client: one hyper connection per worker and node.
//!
//! Deliberately the low-level `hyper::client::conn::http1` API, not a pooled
//! client: a worker has at most one request in flight, so it owns its
//! connections outright — no pool lookups, no locks, no per-request
//! allocation beyond the request head's header map and the response body.
//! The connection's driver future is polled by the worker itself, beside the
//! request (not spawned as its own task), so a request costs no cross-task
//! wake-up. A connection that fails or times out is dropped (its state is
//! unknown) and reopened on the next request to that node.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use kv_http::tls::{ClientStream, Tls};
use tokio::time::Sleep;

use crate::check::{ErrorKind, Failure};

/// Where a node (or proxy) listens.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// As given, normalised to `http://host:port`.
    pub url: String,
    /// `host:port`: what the ring hashes nodes by, and what we connect to.
    pub authority: String,
    host_header: HeaderValue,
    /// Cluster mode: ask for a 421 naming the leader (`X-Kv-Route:
    /// direct`) instead of the node forwarding to it, so the client learns
    /// where the leader is (design §12).
    pub direct: bool,
    /// `Bearer <token>` sent on every request (`--auth-token-file`).
    pub authorization: Option<HeaderValue>,
    /// `https://`: connect in TLS, verified against `--tls-ca`.
    pub tls: bool,
}

/// The TLS settings (`--tls-ca`), process-wide: set once at start, read by
/// every connection to an `https://` endpoint. A scheme-less address (a
/// cluster member's, as the nodes report it) is `https://` once set.
static TLS: std::sync::OnceLock<Arc<Tls>> = std::sync::OnceLock::new();

/// Connects to `https://` endpoints (and scheme-less addresses) with `tls`
/// from now on. Set once; a second call is ignored.
pub fn set_tls(tls: Arc<Tls>) {
    let _ = TLS.set(tls);
}

impl Endpoint {
    /// Parses `http://host:port`, `https://host:port`, or `host:port`
    /// (`https` when `--tls-ca` is set, see [`set_tls`]).
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let with_scheme = if url.contains("://") {
            url.to_owned()
        } else if TLS.get().is_some() {
            format!("https://{url}")
        } else {
            format!("http://{url}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("`{url}`: only http:// and https:// are supported")),
        };
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!("`{url}`: a node URL has no path"));
        }
        let host = uri.host().ok_or_else(|| format!("`{url}` has no host"))?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = format!("{host}:{port}");
        let host_header =
            HeaderValue::from_str(&authority).map_err(|_| format!("`{url}`: bad host"))?;
        Ok(Endpoint {
            url: format!("{}://{authority}", if tls { "https" } else { "http" }),
            authority,
            host_header,
            direct: false,
            authorization: None,
            tls,
        })
    }
}

/// Which HTTP client the workers use.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// hyper's `client::conn::http1`.
    Hyper,
    /// The minimal client of kv-bench's own (the `lean` module).
    Lean,
}

/// An open keep-alive connection of either client.
pub enum Conn {
    Hyper(HyperConn),
    Lean(crate::lean::LeanConn),
}

impl Conn {
    /// False once the connection must not be used again.
    pub fn is_alive(&self) -> bool {
        match self {
            Conn::Hyper(conn) => conn.alive,
            Conn::Lean(conn) => conn.is_alive(),
        }
    }
}

/// Opens a connection of the `kind` client.
pub async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
    kind: ClientKind,
) -> Result<Conn, Failure> {
    Ok(match kind {
        ClientKind::Hyper => Conn::Hyper(connect_hyper(endpoint, timeout).await?),
        ClientKind::Lean => Conn::Lean(crate::lean::connect(endpoint, timeout).await?),
    })
}

/// Sends `method uri` with an optional JSON `body` and reads the whole answer
/// within `timeout`.
pub async fn send(
    conn: &mut Conn,
    endpoint: &Endpoint,
    method: Method,
    uri: &Uri,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    match conn {
        Conn::Hyper(conn) => {
            let request = request(endpoint, method, uri, body.map(Bytes::copy_from_slice));
            send_hyper(conn, request, timeout).await
        }
        Conn::Lean(conn) => {
            crate::lean::send(conn, endpoint, method.as_str(), uri.path(), body, timeout).await
        }
    }
}

/// An open keep-alive hyper connection: the request handle and the driver
/// that moves bytes, both owned (and polled) by the worker.
pub struct HyperConn {
    sender: SendRequest<Full<Bytes>>,
    driver: Pin<Box<Connection<TokioIo<ClientStream>, Full<Bytes>>>>,
    /// The request timeout, reused: moving a registered tokio timer to a
    /// later deadline is one atomic store, where a fresh `timeout()` per
    /// request registers and deregisters a timer under the driver's lock.
    timer: Pin<Box<Sleep>>,
    /// False once the driver has finished (the server closed, or an error):
    /// the connection must not be used, nor its driver polled, again.
    alive: bool,
}

/// Opens a connection to `endpoint` within `timeout` (TCP with Nagle off:
/// small requests, one at a time, send each at once; then TLS for an
/// `https://` one, the handshake within the same bound). Both clients use
/// it.
pub(crate) async fn connect_tcp(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<ClientStream, Failure> {
    let failure =
        |why: String| Failure::new(ErrorKind::Connect, format!("{}: {why}", endpoint.url));
    let tls = match (endpoint.tls, TLS.get()) {
        (false, _) => None,
        (true, Some(tls)) if tls.connects() => Some(&**tls),
        (true, _) => return Err(failure("https:// needs --tls-ca".to_owned())),
    };
    match tokio::time::timeout(timeout, Tls::connect(tls, &endpoint.authority)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(failure(error.to_string())),
        Err(_) => Err(failure(format!("no connection within {timeout:?}"))),
    }
}

/// Opens a hyper connection to `endpoint` within `timeout`.
async fn connect_hyper(endpoint: &Endpoint, timeout: Duration) -> Result<HyperConn, Failure> {
    let stream = connect_tcp(endpoint, timeout).await?;
    // An HTTP/1 handshake does no I/O: it only sets up the connection state.
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| Failure::new(ErrorKind::Connect, format!("{}: {error}", endpoint.url)))?;
    Ok(HyperConn {
        sender,
        driver: Box::pin(connection),
        timer: Box::pin(tokio::time::sleep(timeout)),
        alive: true,
    })
}

/// A response: status and whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    /// Its `X-Kv-Placement-Version`, if any: a cluster node's layout
    /// version, which tells cluster mode to refresh a table that is older.
    pub placement_version: Option<u64>,
}

/// The value of an `X-Kv-Placement-Version` header.
pub(crate) fn parse_version(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Builds a request. `uri` is a path (`/key`); cloning it only bumps a
/// reference count.
#[inline]
fn request(
    endpoint: &Endpoint,
    method: Method,
    uri: &Uri,
    body: Option<Bytes>,
) -> Request<Full<Bytes>> {
    let has_body = body.is_some();
    let mut request = Request::new(Full::new(body.unwrap_or_default()));
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    headers.insert(HOST, endpoint.host_header.clone());
    if let Some(authorization) = &endpoint.authorization {
        headers.insert(AUTHORIZATION, authorization.clone());
    }
    if endpoint.direct {
        headers.insert(
            kv_cluster::ROUTE_HEADER,
            HeaderValue::from_static(kv_cluster::ROUTE_DIRECT),
        );
    }
    if has_body {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    request
}

/// Sends `request` on `conn` and reads the whole answer within `timeout`.
async fn send_hyper(
    conn: &mut HyperConn,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    conn.timer
        .as_mut()
        .reset(tokio::time::Instant::now() + timeout);
    let sender = &mut conn.sender;
    let exchange = async {
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let placement_version = response
            .headers()
            .get(kv_cluster::PLACEMENT_VERSION_HEADER)
            .and_then(|value| parse_version(value.as_bytes()));
        let body = read_body(response.into_body()).await?;
        Ok::<_, hyper::Error>(Answer {
            status,
            body,
            placement_version,
        })
    };
    let mut exchange = std::pin::pin!(exchange);
    let driver = &mut conn.driver;
    let timer = &mut conn.timer;
    let alive = &mut conn.alive;
    std::future::poll_fn(|cx| {
        // The driver first: in the poll where it reads the answer it hands
        // it over, and the exchange below picks it up at once instead of on
        // one more wake-up of this task.
        if *alive {
            if let Poll::Ready(ended) = driver.as_mut().poll(cx) {
                *alive = false;
                if let Poll::Ready(answer) = exchange.as_mut().poll(cx) {
                    return Poll::Ready(answer.map_err(connection_failure));
                }
                return Poll::Ready(Err(Failure::new(
                    ErrorKind::Connection,
                    match ended {
                        Ok(()) => "the server closed the connection".to_owned(),
                        Err(error) => error.to_string(),
                    },
                )));
            }
        }
        if let Poll::Ready(answer) = exchange.as_mut().poll(cx) {
            return Poll::Ready(answer.map_err(connection_failure));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Failure::new(
                ErrorKind::Timeout,
                format!("no answer within {timeout:?}"),
            )));
        }
        Poll::Pending
    })
    .await
}

fn connection_failure(error: hyper::Error) -> Failure {
    Failure::new(ErrorKind::Connection, error.to_string())
}

/// `GET path` from `endpoint` on a fresh hyper connection (whichever
/// client the workers use: this is the cluster's bookkeeping, not the
/// measured load), the whole exchange within `timeout` and the body read up
/// to `limit` bytes: a longer one is an error, not read further.
pub async fn get_bounded(
    endpoint: &Endpoint,
    path: &'static str,
    timeout: Duration,
    limit: usize,
) -> Result<Answer, String> {
    let exchange = async {
        let stream = connect_tcp(endpoint, timeout).await.map_err(|f| f.detail)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| error.to_string())?;
        let driver = tokio::spawn(connection);
        let answer = async {
            let request = request(endpoint, Method::GET, &Uri::from_static(path), None);
            let response = sender
                .send_request(request)
                .await
                .map_err(|error| error.to_string())?;
            let status = response.status().as_u16();
            let placement_version = response
                .headers()
                .get(kv_cluster::PLACEMENT_VERSION_HEADER)
                .and_then(|value| parse_version(value.as_bytes()));
            let body = http_body_util::Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|error| {
                    if error.is::<http_body_util::LengthLimitError>() {
                        format!("{path}: the body is over {limit} bytes: not read")
                    } else {
                        error.to_string()
                    }
                })?
                .to_bytes();
            Ok(Answer {
                status,
                body,
                placement_version,
            })
        }
        .await;
        driver.abort();
        answer
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Reads a whole body; a body of one chunk (every small answer) is kept
/// as it came, without `collect()`'s buffer list.
async fn read_body(mut body: Incoming) -> Result<Bytes, hyper::Error> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        match (&mut first, &mut rest) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut joined = BytesMut::with_capacity(head.len() + data.len());
                joined.extend_from_slice(head);
                joined.extend_from_slice(&data);
                rest = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&data),
        }
    }
    Ok(match (first, rest) {
        (_, Some(joined)) => joined.freeze(),
        (Some(head), None) => head,
        (None, None) => Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_urls() {
        let e = Endpoint::parse("http://127.0.0.1:8081/").unwrap();
        assert_eq!(e.authority, "127.0.0.1:8081");
        assert_eq!(e.url, "http://127.0.0.1:8081");
        assert_eq!(
            Endpoint::parse("localhost:9000").unwrap().authority,
            "localhost:9000"
        );
        assert_eq!(
            Endpoint::parse("http://example").unwrap().authority,
            "example:80"
        );
        let e = Endpoint::parse("https://127.0.0.1:1").unwrap();
        assert!(e.tls);
        assert_eq!(e.url, "https://127.0.0.1:1");
        assert_eq!(
            Endpoint::parse("https://example").unwrap().authority,
            "example:443"
        );
        assert!(Endpoint::parse("ftp://127.0.0.1:1").is_err());
        assert!(Endpoint::parse("http://127.0.0.1:1/x").is_err());
        assert!(Endpoint::parse("http://").is_err());
    }
}
