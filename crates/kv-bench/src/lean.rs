//! `--client lean`: a minimal HTTP/1.1 client for the generator's hot path.
//!
//! hyper's client spends most of kv-bench's user CPU per request on its
//! dispatch machinery (a channel per connection, a oneshot per request,
//! request and response objects with header maps). A load generator that
//! sends one request at a time per connection needs none of it, which is
//! what wrk exploits. This client writes the request head and body from a
//! reused buffer in one `write`, reads into a reused buffer, parses the head
//! with `httparse` (the parser hyper itself uses) and hands the body out as a
//! zero-copy slice of the read buffer: no allocation per request in steady
//! state.
//!
//! It accepts exactly what the checks need and refuses the rest loudly:
//! bodies framed by `Content-Length` (kv-node, nginx and hyper-based proxies
//! send that for these small answers); a `Transfer-Encoding` answer is
//! counted as a connection error naming the cause (use `--client hyper`);
//! `Connection: close` is honoured by reconnecting.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use kv_http::tls::ClientStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Sleep;

use crate::check::{ErrorKind, Failure};
use crate::client::{Answer, Endpoint};

/// Most response headers parsed; kv-node sends 3, proxies a few more.
const MAX_HEADERS: usize = 32;
/// Initial read buffer; grows for larger answers.
const READ_BUFFER: usize = 16 * 1024;

/// An open keep-alive connection and its reused buffers.
pub struct LeanConn {
    stream: ClientStream,
    read: BytesMut,
    write: Vec<u8>,
    timer: Pin<Box<Sleep>>,
    alive: bool,
}

impl LeanConn {
    pub fn is_alive(&self) -> bool {
        self.alive
    }
}

/// Opens a connection to `endpoint` within `timeout`.
pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<LeanConn, Failure> {
    let stream = crate::client::connect_tcp(endpoint, timeout).await?;
    Ok(LeanConn {
        stream,
        read: BytesMut::with_capacity(READ_BUFFER),
        write: Vec::with_capacity(1024),
        timer: Box::pin(tokio::time::sleep(timeout)),
        alive: true,
    })
}

/// Sends `method path` (and `body`, as JSON) and reads the answer within
/// `timeout`.
pub async fn send(
    conn: &mut LeanConn,
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    let out = &mut conn.write;
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(endpoint.authority.as_bytes());
    if let Some(authorization) = &endpoint.authorization {
        out.extend_from_slice(b"\r\nauthorization: ");
        out.extend_from_slice(authorization.as_bytes());
    }
    if endpoint.direct {
        out.extend_from_slice(b"\r\nx-kv-route: direct");
    }
    match body {
        Some(body) => {
            out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
            push_decimal(out, body.len());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(body);
        }
        None => out.extend_from_slice(b"\r\n\r\n"),
    }
    conn.timer
        .as_mut()
        .reset(tokio::time::Instant::now() + timeout);
    let result = {
        let exchange = exchange(
            &mut conn.stream,
            &mut conn.read,
            &conn.write,
            &mut conn.alive,
        );
        let mut exchange = std::pin::pin!(exchange);
        let timer = &mut conn.timer;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = exchange.as_mut().poll(cx) {
                return Poll::Ready(result);
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
    };
    if result.is_err() {
        conn.alive = false;
    }
    result
}

async fn exchange(
    stream: &mut ClientStream,
    read: &mut BytesMut,
    request: &[u8],
    alive: &mut bool,
) -> Result<Answer, Failure> {
    let broken = |why: String| Failure::new(ErrorKind::Connection, why);
    // Anything unread is a protocol error: one request at a time.
    read.clear();
    stream
        .write_all(request)
        .await
        .map_err(|e| broken(format!("send: {e}")))?;
    loop {
        if let Some(head) = parse_head(read).map_err(broken)? {
            let total = head.length + head.content_length;
            while read.len() < total {
                read.reserve(total - read.len());
                if stream
                    .read_buf(read)
                    .await
                    .map_err(|e| broken(format!("receive: {e}")))?
                    == 0
                {
                    return Err(broken("the server closed the connection mid-answer".into()));
                }
            }
            let mut message = read.split_to(total);
            let body = message.split_off(head.length).freeze();
            if head.close {
                *alive = false;
            }
            return Ok(Answer {
                status: head.status,
                body,
                placement_version: head.placement_version,
            });
        }
        if read.capacity() - read.len() < 1024 {
            read.reserve(READ_BUFFER);
        }
        if stream
            .read_buf(read)
            .await
            .map_err(|e| broken(format!("receive: {e}")))?
            == 0
        {
            return Err(broken("the server closed the connection".into()));
        }
    }
}

/// A parsed response head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Bytes of the head, blank line included.
    length: usize,
    content_length: usize,
    /// `Connection: close`: the server ends the connection after this answer.
    close: bool,
    /// `X-Kv-Placement-Version`, from a cluster node.
    placement_version: Option<u64>,
}

/// Parses a response head at the start of `buffer`: `Ok(None)` if more bytes
/// are needed. A 1xx interim answer is skipped.
fn parse_head(buffer: &mut BytesMut) -> Result<Option<Head>, String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let length = match response.parse(buffer) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(error) => return Err(format!("bad response head: {error}")),
        };
        let status = response.code.unwrap_or(0);
        if (100..200).contains(&status) {
            let _ = buffer.split_to(length);
            continue;
        }
        let mut content_length = None;
        let mut close = response.version == Some(0);
        let mut placement_version = None;
        for header in response.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| "bad content-length".to_owned())?;
                content_length = Some(value);
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(
                    "transfer-encoding answers are not supported by --client lean (use --client hyper)"
                        .into(),
                );
            } else if header.name.eq_ignore_ascii_case("connection") {
                close = header.value.eq_ignore_ascii_case(b"close");
            } else if header
                .name
                .eq_ignore_ascii_case(kv_cluster::PLACEMENT_VERSION_HEADER)
            {
                placement_version = crate::client::parse_version(header.value);
            }
        }
        let content_length = match (content_length, status) {
            (Some(n), _) => n,
            (None, 204 | 304) => 0,
            (None, _) => return Err("an answer without content-length".into()),
        };
        return Ok(Some(Head {
            status,
            length,
            content_length,
            close,
            placement_version,
        }));
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    // Filled from the end; 20 digits hold any `usize`.
    let mut digits = [0u8; 20];
    let mut used = 0;
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
        used += 1;
        if n == 0 {
            break;
        }
    }
    // `used` is at most 20, so the `get` never misses.
    out.extend_from_slice(digits.get(digits.len() - used..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8]) -> Result<Option<Head>, String> {
        parse_head(&mut BytesMut::from(raw))
    }

    #[test]
    fn parses_heads() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"value\":\"abc\"}\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.content_length, h.close), (200, 17, false));
        assert_eq!(h.length, 71);
        let h = head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.content_length, h.close), (404, 0, true));
        assert_eq!(head(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(), None);
        let h = head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.content_length), (204, 0));
        assert!(
            head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap_err()
                .contains("--client hyper")
        );
        assert!(head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(head(b"garbage\r\n\r\n").is_err());
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.close, "HTTP/1.0 closes unless told otherwise");
    }

    #[test]
    fn writes_decimals() {
        for n in [0usize, 7, 10, 1234567890] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
