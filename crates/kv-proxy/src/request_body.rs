//! The request body sent on to a node: the size limit on bodies whose
//! length the client did not declare, and the clock of the upload.
//!
//! A declared `Content-Length` over `--max-body-bytes` is refused before any
//! node is asked (see [`crate::api`]). A chunked body has no declared
//! length, so it is counted as it streams through: [`ClientBody`] stops at
//! the limit without passing on the byte that crosses it, so the node never
//! sees an oversized body (it would refuse mid-upload and close, and the
//! client could get a 502 instead of its 413). The client's body is handed
//! back through the [`Upload`] handle, so the proxy can read and discard the
//! rest before answering 413, as kv-node does (a close with unread bytes
//! resets the connection, and the client may lose the answer).
//!
//! The body also notes when it last passed bytes on, and whether it is
//! waiting for the client ([`Upload`]): the node's time to answer
//! (`--request-timeout`) counts from the end of the upload, not from its
//! start, so a slow client's large upload is not taken for a slow node, and
//! a stall is blamed on the client (408) only when the client is what the
//! upload waits for. A client's broken body (a bad chunk) is the client's
//! error (400), not the node's.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use parking_lot::Mutex;
use tokio::time::Instant;

/// An error from a request body, as hyper's client takes it.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What is sent to a node as the request body.
pub enum UpstreamBody {
    /// The client's body, counted against the limit as it passes.
    Client(ClientBody),
    /// No body (a GET, or a retried one).
    Empty,
    /// A body read in full before sending (cluster mode, so a retry at
    /// another node can send it again); `None` once sent.
    Buffered(Option<Bytes>),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Client(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Buffered(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(body) => body.body.as_ref().is_none_or(Body::is_end_stream),
            UpstreamBody::Empty => true,
            UpstreamBody::Buffered(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(body) => body
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The error a [`ClientBody`] ends with at the limit.
#[derive(Debug)]
pub struct TooLarge;

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body is over the size limit")
    }
}

impl StdError for TooLarge {}

/// What the forwarding side can learn of a body while hyper sends it.
#[derive(Debug)]
pub struct Upload {
    started: Instant,
    /// When bytes last went on, in microseconds after `started`.
    last_progress: AtomicU64,
    finished: AtomicBool,
    /// Whether hyper's last poll found no bytes from the client yet (as
    /// opposed to hyper not asking: the node is not reading).
    waiting_on_client: AtomicBool,
    /// The client's body, left here when it crosses the limit.
    overflow: Mutex<Option<Incoming>>,
    /// Why reading the client's body failed (a bad chunk, the client gone).
    client_error: Mutex<Option<String>>,
}

impl Upload {
    /// When the node's time to answer starts: the last time bytes went on.
    pub fn last_progress(&self) -> Instant {
        self.started + Duration::from_micros(self.last_progress.load(Ordering::Relaxed))
    }

    /// Whether the whole body has been handed to the node.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    /// Whether the upload is stalled on the client: it has not finished, and
    /// the node side last asked for bytes the client has not sent.
    pub fn stalled_on_client(&self) -> bool {
        !self.finished() && self.waiting_on_client.load(Ordering::Relaxed)
    }

    /// Why the client's body could not be read, if it could not (once).
    pub fn take_client_error(&self) -> Option<String> {
        self.client_error.lock().take()
    }

    /// The client's body, if it crossed the limit (once).
    pub fn take_overflow(&self) -> Option<Incoming> {
        self.overflow.lock().take()
    }

    fn progressed(&self) {
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_progress.store(micros, Ordering::Relaxed);
    }
}

/// A client body passed on until `limit` bytes, then cut off.
pub struct ClientBody {
    body: Option<Incoming>,
    left: usize,
    upload: Arc<Upload>,
}

impl ClientBody {
    /// Wraps `body`; the returned handle follows the upload.
    pub fn new(body: Incoming, limit: usize) -> (Self, Arc<Upload>) {
        let upload = Arc::new(Upload {
            started: Instant::now(),
            last_progress: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            waiting_on_client: AtomicBool::new(false),
            overflow: Mutex::new(None),
            client_error: Mutex::new(None),
        });
        let client = Self {
            body: Some(body),
            left: limit,
            upload: upload.clone(),
        };
        (client, upload)
    }
}

impl Body for ClientBody {
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
        let polled = Pin::new(body).poll_frame(cx);
        this.upload
            .waiting_on_client
            .store(polled.is_pending(), Ordering::Relaxed);
        let frame = match polled {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => {
                *this.upload.client_error.lock() = Some(error.to_string());
                return Poll::Ready(Some(Err(error.into())));
            }
            Poll::Ready(None) => {
                this.upload.progressed();
                this.upload.finished.store(true, Ordering::Relaxed);
                return Poll::Ready(None);
            }
            Poll::Pending => return Poll::Pending,
        };
        let len = frame.data_ref().map_or(0, Bytes::len);
        if len > this.left {
            *this.upload.overflow.lock() = this.body.take();
            return Poll::Ready(Some(Err(Box::new(TooLarge))));
        }
        this.left -= len;
        this.upload.progressed();
        if this.body.as_ref().is_some_and(Body::is_end_stream) {
            // hyper stops polling a body of known length at its end.
            this.upload.finished.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Some(Ok(frame)))
    }
}
