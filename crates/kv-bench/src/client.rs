//! The HTTP/1.1 client: one hyper connection per worker and node.
//!
//! Deliberately the low-level `hyper::client::conn::http1` API, not a pooled
//! client: a worker has at most one request in flight, so it owns its
//! connections outright — no pool lookups, no locks, no per-request
//! allocation beyond the request head's header map and the response body.
//! A connection that fails or times out is dropped (its state is unknown)
//! and reopened on the next request to that node.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::check::{ErrorKind, Failure};

/// Where a node (or proxy) listens.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// As given, normalised to `http://host:port`.
    pub url: String,
    /// `host:port`: what the ring hashes nodes by, and what we connect to.
    pub authority: String,
    host_header: HeaderValue,
}

impl Endpoint {
    /// Parses `http://host:port`, or `host:port`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let with_scheme = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("`{url}`: only http:// is supported"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!("`{url}`: a node URL has no path"));
        }
        let host = uri.host().ok_or_else(|| format!("`{url}` has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let authority = format!("{host}:{port}");
        let host_header =
            HeaderValue::from_str(&authority).map_err(|_| format!("`{url}`: bad host"))?;
        Ok(Endpoint {
            url: format!("http://{authority}"),
            authority,
            host_header,
        })
    }
}

/// An open keep-alive connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Opens a connection to `endpoint` within `timeout`.
pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Conn, Failure> {
    let open = async {
        let stream = TcpStream::connect(&endpoint.authority).await?;
        // Small requests, one at a time: send each at once.
        stream.set_nodelay(true)?;
        hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)
    };
    let (sender, connection) = match tokio::time::timeout(timeout, open).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            return Err(Failure::new(
                ErrorKind::Connect,
                format!("{}: {error}", endpoint.url),
            ))
        }
        Err(_) => {
            return Err(Failure::new(
                ErrorKind::Connect,
                format!("{}: no connection within {timeout:?}", endpoint.url),
            ))
        }
    };
    let driver = tokio::spawn(async move {
        if let Err(error) = connection.await {
            log::debug!("connection ended: {error}");
        }
    });
    Ok(Conn { sender, driver })
}

/// A response: status and whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Builds a request. `uri` is a path (`/key`); cloning it only bumps a
/// reference count.
#[inline]
pub fn request(
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
    if has_body {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    request
}

/// Sends `request` on `conn` and reads the whole answer within `timeout`.
pub async fn send(
    conn: &mut Conn,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    let exchange = async {
        conn.sender.ready().await?;
        let response = conn.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>(Answer { status, body })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(Failure::new(ErrorKind::Connection, error.to_string())),
        Err(_) => Err(Failure::new(
            ErrorKind::Timeout,
            format!("no answer within {timeout:?}"),
        )),
    }
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
        assert!(Endpoint::parse("https://127.0.0.1:1").is_err());
        assert!(Endpoint::parse("http://127.0.0.1:1/x").is_err());
        assert!(Endpoint::parse("http://").is_err());
    }
}
