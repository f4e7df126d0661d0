//! One HTTP/1.1 exchange with a node, on a pooled [`Connection`]: the
//! request written, the answer's head parsed, its body framed.
//!
//! Why not hyper's client: it drives each connection on a task of its own
//! and passes every request and answer through channels to it, which cost
//! the proxy ~3 µs of CPU per GET (7.0 -> 4.0 µs of user CPU, nginx 4.0, in
//! `scripts/bench-proxy.sh` runs of 2026-11-30). Here the request's own task
//! writes the request and reads the answer. The client side stays on hyper.
//!
//! What is written: the request line in origin form, the client's headers
//! minus the hop-by-hop ones (the caller strips them) and its framing
//! headers, `Host` when the client sent none, and the body whole (the proxy
//! reads a request body in full before forwarding it, as nginx does by
//! default, so a retry can send it again) with its `Content-Length`.
//!
//! How the answer is framed (RFC 9112 §6.3): no body after HEAD or a
//! 1xx/204/304; else `Transfer-Encoding: chunked`, decoded; else
//! `Content-Length`; else the body runs to the close. Interim 1xx answers
//! are skipped, 101 is refused. A body of up to [`WHOLE_BODY`] bytes with a
//! length is read before the answer is handed on, and the connection goes
//! back to the pool at once; a longer one streams ([`PooledBody`]) and the
//! connection goes back when it has been read to its end. A chunked or
//! close-delimited body (kv-node sends neither) is read whole, up to
//! [`MAX_UNFRAMED_BODY`]. A connection whose answer said `Connection: close`
//! (or was HTTP/1.0) is not reused.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pool::{Connection, NodePool, READ_BUFFER};

/// The largest answer head read from a node (kv-node's are ~200 bytes).
pub const MAX_HEAD: usize = 64 * 1024;
/// Bodies up to this long are read before the answer is handed on.
pub const WHOLE_BODY: u64 = 64 * 1024;
/// The largest chunked or close-delimited body taken from a node.
pub const MAX_UNFRAMED_BODY: usize = 64 << 20;
/// The most write-buffer capacity a pooled connection keeps between requests.
const KEPT_WRITE_BUFFER: usize = 4096;
/// Headers an answer may have (kv-node's have 4-6).
const MAX_HEADERS: usize = 64;

/// Why an exchange failed after a connection was had.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("sending the request: {0}")]
    Write(#[source] io::Error),
    #[error("reading the answer: {0}")]
    Read(#[source] io::Error),
    #[error("the node closed the connection before its answer was complete")]
    Closed,
    #[error("the node's answer is not valid HTTP/1.1: {0}")]
    Malformed(String),
    #[error("the node's answer head is longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the node's chunked or unframed answer body is longer than {MAX_UNFRAMED_BODY} bytes")]
    BodyTooLarge,
}

impl ExchangeError {
    /// Whether the request cannot have reached the node whole (so any
    /// method may be sent again on another connection).
    pub fn unsent(&self) -> bool {
        matches!(self, ExchangeError::Write(_))
    }
}

/// The request line and headers for `parts` with a body of `body_len`
/// bytes, `host` added when the client sent no `Host`.
fn encode_head(
    parts: &Parts,
    host: &HeaderValue,
    extra: Option<&(HeaderName, HeaderValue)>,
    body: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(HOST) {
        header(out, HOST.as_str(), host.as_bytes());
    }
    for (name, value) in &parts.headers {
        // The framing is this hop's own, written below.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        header(out, name.as_str(), value.as_bytes());
    }
    if let Some((name, value)) = extra {
        header(out, name.as_str(), value.as_bytes());
    }
    if !body.is_empty() || matches!(parts.method, Method::PUT | Method::POST | Method::PATCH) {
        let mut digits = itoa::Buffer::new();
        header(
            out,
            CONTENT_LENGTH.as_str(),
            digits.format(body.len()).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
}

fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Sends `parts` and `body` on `connection` and reads the answer's head
/// (and a short body). `node` is the `X-Kv-Node` value added to the answer
/// (and the `Host` sent when the client sent none).
pub async fn exchange(
    pool: &Arc<NodePool>,
    mut connection: Connection,
    parts: &Parts,
    body: &Bytes,
    node: &HeaderValue,
    extra: Option<&(HeaderName, HeaderValue)>,
) -> Result<Response<PooledBody>, ExchangeError> {
    // The connection's own write buffer, kept between its requests.
    let mut out = std::mem::take(&mut connection.out);
    out.clear();
    encode_head(parts, node, extra, body, &mut out);
    // One write for the usual small request; a long body after its head.
    if body.len() as u64 <= WHOLE_BODY {
        out.extend_from_slice(body);
        connection
            .stream
            .write_all(&out)
            .await
            .map_err(ExchangeError::Write)?;
    } else {
        connection
            .stream
            .write_all(&out)
            .await
            .map_err(ExchangeError::Write)?;
        connection
            .stream
            .write_all(body)
            .await
            .map_err(ExchangeError::Write)?;
    }
    connection
        .stream
        .flush()
        .await
        .map_err(ExchangeError::Write)?;
    // A long body's copy is not kept for the connection's idle life.
    if out.capacity() > KEPT_WRITE_BUFFER {
        out = Vec::new();
    }
    connection.out = out;

    let head = read_head(&mut connection).await?;
    let Head {
        status,
        mut headers,
        keep_alive,
        framing,
    } = head;
    let no_body = parts.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = if no_body {
        finish(pool, connection, keep_alive);
        PooledBody::whole(Bytes::new())
    } else {
        match framing {
            Framing::Length(length) if length <= WHOLE_BODY => {
                let length = length as usize;
                fill(&mut connection, length).await?;
                let bytes = connection.buf.split_to(length).freeze();
                finish(pool, connection, keep_alive);
                PooledBody::whole(bytes)
            }
            Framing::Length(length) => {
                PooledBody::stream(connection, length, Arc::clone(pool), keep_alive)
            }
            Framing::Chunked => {
                let bytes = read_chunked(&mut connection).await?;
                finish(pool, connection, keep_alive);
                PooledBody::whole(bytes)
            }
            Framing::Close => PooledBody::whole(read_to_close(&mut connection).await?),
        }
    };
    headers.insert(crate::upstream::X_KV_NODE, node.clone());
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Gives a connection whose answer has been read to its end back to the
/// pool, unless the node said it would close it or sent more than asked.
fn finish(pool: &NodePool, connection: Connection, keep_alive: bool) {
    if keep_alive && connection.buf.is_empty() {
        pool.put(connection);
    }
}

/// How an answer's body ends.
enum Framing {
    Length(u64),
    Chunked,
    Close,
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    keep_alive: bool,
    framing: Framing,
}

/// Reads and parses an answer head (skipping interim 1xx answers), leaving
/// the bytes after it in the connection's buffer.
async fn read_head(connection: &mut Connection) -> Result<Head, ExchangeError> {
    loop {
        if let Some(head) = parse_head(&mut connection.buf)? {
            return Ok(head);
        }
        if connection.buf.len() >= MAX_HEAD {
            return Err(ExchangeError::HeadTooLarge);
        }
        read_more(connection).await?;
    }
}

/// Reads more bytes into the buffer; EOF is [`ExchangeError::Closed`].
async fn read_more(connection: &mut Connection) -> Result<(), ExchangeError> {
    connection.buf.reserve(READ_BUFFER);
    match connection.stream.read_buf(&mut connection.buf).await {
        Ok(0) => Err(ExchangeError::Closed),
        Ok(_) => Ok(()),
        Err(error) => Err(ExchangeError::Read(error)),
    }
}

/// Reads until the buffer holds at least `length` bytes.
async fn fill(connection: &mut Connection, length: usize) -> Result<(), ExchangeError> {
    while connection.buf.len() < length {
        read_more(connection).await?;
    }
    Ok(())
}

/// A complete head at the start of `buf`, taken off it; `None` if more
/// bytes are needed. Interim answers (1xx but 101) are dropped.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut slots);
        let length = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(error) => return Err(ExchangeError::Malformed(error.to_string())),
        };
        let code = parsed.code.unwrap_or(0);
        if code == 101 {
            return Err(ExchangeError::Malformed("101 Switching Protocols".into()));
        }
        if (100..200).contains(&code) {
            let _ = buf.split_to(length);
            continue;
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| ExchangeError::Malformed(format!("status {code}")))?;
        let http10 = parsed.version == Some(0);
        // Where each header's name and value lie in the head, to slice the
        // values out of it without copying once it is split off (offsets on
        // the stack: no allocation per answer).
        let base = buf.as_ptr() as usize;
        let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
        let count = parsed.headers.len();
        for (span, header) in spans.iter_mut().zip(parsed.headers.iter()) {
            let name = header.name.as_ptr() as usize - base;
            let value = header.value.as_ptr() as usize - base;
            *span = (
                name,
                name + header.name.len(),
                value,
                value + header.value.len(),
            );
        }
        let head = buf.split_to(length).freeze();
        let mut headers = HeaderMap::with_capacity(count + 1);
        let mut keep_alive = !http10;
        let mut length_header: Option<u64> = None;
        let mut chunked = false;
        let mut hop_named: Vec<HeaderName> = Vec::new();
        for &(name_start, name_end, start, end) in spans.iter().take(count) {
            let name = head
                .get(name_start..name_end)
                .and_then(|name| HeaderName::from_bytes(name).ok())
                .ok_or_else(|| ExchangeError::Malformed("a header name".into()))?;
            let value = head.slice(start..end);
            if name == hyper::header::CONNECTION {
                for option in String::from_utf8_lossy(&value).split(',') {
                    let option = option.trim();
                    if option.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if option.eq_ignore_ascii_case("keep-alive") {
                        // HTTP/1.0 closes unless the answer asks to keep it.
                        keep_alive |= http10;
                    } else if let Ok(named) = HeaderName::from_bytes(option.as_bytes()) {
                        hop_named.push(named);
                    }
                }
                continue;
            }
            if name == TRANSFER_ENCODING {
                // Chunked is the last coding when present (RFC 9112 §6.1);
                // any other coding is not one kv-node uses.
                let text = String::from_utf8_lossy(&value);
                let last = text.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") {
                    return Err(ExchangeError::Malformed(format!(
                        "transfer-encoding {text}"
                    )));
                }
                chunked = true;
                continue;
            }
            if name == CONTENT_LENGTH {
                let parsed = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|text| text.trim().parse::<u64>().ok())
                    .ok_or_else(|| ExchangeError::Malformed("content-length".into()))?;
                if length_header.is_some_and(|seen| seen != parsed) {
                    return Err(ExchangeError::Malformed("two content-lengths".into()));
                }
                length_header = Some(parsed);
            }
            if crate::upstream::is_hop_by_hop(&name) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| ExchangeError::Malformed(format!("value of {name}")))?;
            headers.append(name, value);
        }
        for name in hop_named {
            headers.remove(name);
        }
        let framing = match (chunked, length_header) {
            // Chunked wins over a length (RFC 9112 §6.3), which is dropped.
            (true, _) => {
                headers.remove(CONTENT_LENGTH);
                Framing::Chunked
            }
            (false, Some(length)) => Framing::Length(length),
            (false, None) => Framing::Close,
        };
        if matches!(framing, Framing::Close) {
            keep_alive = false;
        }
        return Ok(Some(Head {
            status,
            headers,
            keep_alive,
            framing,
        }));
    }
}

/// Reads a chunked body whole (its trailers are dropped).
async fn read_chunked(connection: &mut Connection) -> Result<Bytes, ExchangeError> {
    let mut body = BytesMut::new();
    loop {
        // The chunk-size line.
        let line = loop {
            if let Some(end) = find_crlf(&connection.buf) {
                break connection.buf.split_to(end + 2);
            }
            if connection.buf.len() > MAX_HEAD {
                return Err(ExchangeError::Malformed("chunk size line".into()));
            }
            read_more(connection).await?;
        };
        let text = std::str::from_utf8(line.get(..line.len() - 2).unwrap_or_default())
            .map_err(|_| ExchangeError::Malformed("chunk size".into()))?;
        let digits = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(digits, 16)
            .map_err(|_| ExchangeError::Malformed(format!("chunk size {digits:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                if let Some(end) = find_crlf(&connection.buf) {
                    let _ = connection.buf.split_to(end + 2);
                    if end == 0 {
                        return Ok(body.freeze());
                    }
                    continue;
                }
                if connection.buf.len() > MAX_HEAD {
                    return Err(ExchangeError::Malformed("trailers".into()));
                }
                read_more(connection).await?;
            }
        }
        // Compared without adding: a node's size may be near usize::MAX.
        if size > MAX_UNFRAMED_BODY.saturating_sub(body.len()) {
            return Err(ExchangeError::BodyTooLarge);
        }
        fill(connection, size + 2).await?;
        body.extend_from_slice(&connection.buf.split_to(size));
        if connection.buf.split_to(2).as_ref() != b"\r\n" {
            return Err(ExchangeError::Malformed(
                "chunk not followed by CRLF".into(),
            ));
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|pair| pair == b"\r\n")
}

/// Reads a body that ends with the connection.
async fn read_to_close(connection: &mut Connection) -> Result<Bytes, ExchangeError> {
    loop {
        if connection.buf.len() > MAX_UNFRAMED_BODY {
            return Err(ExchangeError::BodyTooLarge);
        }
        connection.buf.reserve(READ_BUFFER);
        match connection.stream.read_buf(&mut connection.buf).await {
            Ok(0) => return Ok(connection.buf.split().freeze()),
            Ok(_) => {}
            Err(error) => return Err(ExchangeError::Read(error)),
        }
    }
}

/// A node's answer body: read already, or streaming off its connection,
/// which goes back to the pool once the body has been read to its end.
/// Dropped before that (the client went away), the connection is closed.
pub struct PooledBody(Inner);

enum Inner {
    Whole(Option<Bytes>),
    Stream(Stream),
}

struct Stream {
    /// Body bytes not yet handed on.
    remaining: u64,
    state: StreamState,
    pool: Arc<NodePool>,
    keep_alive: bool,
}

/// A read in progress owns the connection, and gives it back with its result.
type Reading = Pin<Box<dyn Future<Output = (Connection, io::Result<usize>)> + Send>>;

enum StreamState {
    Ready(Connection),
    Reading(Reading),
    Done,
}

impl PooledBody {
    /// A body already read.
    pub fn whole(bytes: Bytes) -> Self {
        PooledBody(Inner::Whole((!bytes.is_empty()).then_some(bytes)))
    }

    fn stream(connection: Connection, length: u64, pool: Arc<NodePool>, keep_alive: bool) -> Self {
        PooledBody(Inner::Stream(Stream {
            remaining: length,
            state: StreamState::Ready(connection),
            pool,
            keep_alive,
        }))
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        match &mut self.get_mut().0 {
            Inner::Whole(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            Inner::Stream(stream) => stream.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Whole(bytes) => bytes.is_none(),
            Inner::Stream(stream) => stream.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream(stream) => SizeHint::with_exact(stream.remaining),
        }
    }
}

impl Stream {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        loop {
            match std::mem::replace(&mut self.state, StreamState::Done) {
                StreamState::Done => return Poll::Ready(None),
                StreamState::Ready(mut connection) => {
                    if self.remaining == 0 {
                        finish(&self.pool, connection, self.keep_alive);
                        return Poll::Ready(None);
                    }
                    if connection.buf.is_empty() {
                        connection.buf.reserve(READ_BUFFER);
                        // A node silent mid-body for the request timeout
                        // cuts the answer off, as nginx's proxy_read_timeout.
                        let patience = self.pool.read_timeout();
                        self.state = StreamState::Reading(Box::pin(async move {
                            let read = connection.stream.read_buf(&mut connection.buf);
                            let read = match tokio::time::timeout(patience, read).await {
                                Ok(read) => read,
                                Err(_) => Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("the node sent nothing for {patience:?} mid-body"),
                                )),
                            };
                            (connection, read)
                        }));
                        continue;
                    }
                    let take = (connection.buf.len() as u64).min(self.remaining) as usize;
                    let chunk = connection.buf.split_to(take).freeze();
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        finish(&self.pool, connection, self.keep_alive);
                    } else {
                        self.state = StreamState::Ready(connection);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                StreamState::Reading(mut reading) => match reading.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.state = StreamState::Reading(reading);
                        return Poll::Pending;
                    }
                    // The connection is dropped (closed) with the error.
                    Poll::Ready((_, Ok(0))) => {
                        return Poll::Ready(Some(Err(ExchangeError::Closed)))
                    }
                    Poll::Ready((_, Err(error))) => {
                        return Poll::Ready(Some(Err(ExchangeError::Read(error))))
                    }
                    Poll::Ready((connection, Ok(_))) => self.state = StreamState::Ready(connection),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<Option<Head>, ExchangeError> {
        parse_head(&mut BytesMut::from(text))
    }

    #[test]
    fn heads_are_framed_by_their_headers() {
        let head =
            parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: application/json\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.keep_alive);
        assert!(matches!(head.framing, Framing::Length(5)));
        assert_eq!(head.headers.len(), 2);

        let head =
            parse("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(matches!(head.framing, Framing::Chunked));
        assert!(!head.headers.contains_key(CONTENT_LENGTH));

        let head =
            parse("HTTP/1.1 200 OK\r\nconnection: close, x-hop\r\nx-hop: 1\r\nx-end: 2\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(!head.keep_alive);
        assert!(matches!(head.framing, Framing::Close));
        assert!(!head.headers.contains_key("x-hop"));
        assert!(head.headers.contains_key("x-end"));

        let head = parse("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
    }

    #[test]
    fn interim_answers_are_skipped_and_partial_heads_wait() {
        let head =
            parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-len").unwrap().is_none());
    }

    #[test]
    fn broken_heads_are_refused() {
        assert!(
            parse("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n").is_err()
        );
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        assert!(parse("garbage\r\n\r\n").is_err());
    }

    #[test]
    fn the_request_head_carries_host_and_length() {
        let (mut parts, ()) = hyper::Request::builder()
            .method(Method::PUT)
            .uri("/key?x=1")
            .header("content-type", "application/json")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        encode_head(
            &parts,
            &HeaderValue::from_static("n1:8081"),
            None,
            b"{}",
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "PUT /key?x=1 HTTP/1.1\r\nhost: n1:8081\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        );
        parts.method = Method::GET;
        parts
            .headers
            .insert(HOST, HeaderValue::from_static("client"));
        let mut out = Vec::new();
        let extra = (
            HeaderName::from_static("x-extra"),
            HeaderValue::from_static("7"),
        );
        encode_head(
            &parts,
            &HeaderValue::from_static("n1:8081"),
            Some(&extra),
            b"",
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /key?x=1 HTTP/1.1\r\ncontent-type: application/json\r\nhost: client\r\nx-extra: 7\r\n\r\n"
        );
    }
}
