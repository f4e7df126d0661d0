//! The request body sent on to a node, and the size limit on bodies whose
//! length the client did not declare.
//!
//! A declared `Content-Length` over `--max-body-bytes` is refused before any
//! node is asked (see [`crate::api`]). A chunked body has no declared
//! length, so it is counted as it streams through: [`CappedBody`] stops at
//! the limit without passing on the byte that crosses it, so the node never
//! sees an oversized body (it would refuse mid-upload and close, and the
//! client could get a 502 instead of its 413). The client's body is handed
//! back through an [`Overflow`] slot, so the proxy can read and discard the
//! rest before answering 413, as kv-node does (a close with unread bytes
//! resets the connection, and the client may lose the answer).

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use parking_lot::Mutex;

/// An error from a request body, as hyper's client takes it.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What is sent to a node as the request body.
pub enum UpstreamBody {
    /// The client's body; its declared length (if any) is within the limit
    /// and hyper enforces it.
    Client(Incoming),
    /// The client's body of undeclared length, counted against the limit.
    Capped(CappedBody),
    /// No body (a retried GET or HEAD).
    Empty,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Client(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|result| result.map_err(Into::into))),
            UpstreamBody::Capped(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(body) => body.is_end_stream(),
            UpstreamBody::Capped(body) => body.body.as_ref().is_none_or(Body::is_end_stream),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(body) => body.size_hint(),
            UpstreamBody::Capped(body) => body
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Where a [`CappedBody`] leaves the client's body when it crosses the
/// limit.
pub type Overflow = Arc<Mutex<Option<Incoming>>>;

/// The error a [`CappedBody`] ends with at the limit.
#[derive(Debug)]
pub struct TooLarge;

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body is over the size limit")
    }
}

impl StdError for TooLarge {}

/// A client body passed on until `limit` bytes, then cut off.
pub struct CappedBody {
    body: Option<Incoming>,
    left: usize,
    overflow: Overflow,
}

impl CappedBody {
    /// Wraps `body`; the returned slot holds it once it crosses `limit`.
    pub fn new(body: Incoming, limit: usize) -> (Self, Overflow) {
        let overflow = Overflow::default();
        let capped = Self {
            body: Some(body),
            left: limit,
            overflow: overflow.clone(),
        };
        (capped, overflow)
    }
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(TooLarge))));
        };
        let frame = match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let len = frame.data_ref().map_or(0, Bytes::len);
        if len > this.left {
            *this.overflow.lock() = this.body.take();
            return Poll::Ready(Some(Err(Box::new(TooLarge))));
        }
        this.left -= len;
        Poll::Ready(Some(Ok(frame)))
    }
}
