//! Keep-alive connections to one node, pooled per worker thread.
//!
//! Each worker has one [`NodePool`] per node, so a request, its forward and
//! the connection it borrows all stay on one thread (the lock is never
//! contended; it is there because hyper's services must be `Send`).
//!
//! Why not hyper-util's pooled client, which this replaced: per request it
//! hashed a `(scheme, authority)` key with SipHash, went through a checkout
//! future with a oneshot, rebuilt the URI, and for HTTP/1 spawned a task to
//! wait for the connection to be ready again. Here a request pops a ready
//! connection off a stack and pushes it back when the node's answer has been
//! read to its end; `scripts/bench-proxy.sh` measures the difference.
//!
//! * The idle stack is LIFO: the most recently used connection is the
//!   warmest and the least likely to have been closed by the node.
//! * A connection goes back as soon as the node's answer has been read in
//!   full ([`PooledBody`]), before the client has received it. One whose
//!   answer was not read to the end (the client went away mid-body) is
//!   dropped, which closes it: its next bytes would be the old answer's.
//! * A connection idle longer than `--pool-idle-timeout` is never reused and
//!   is closed by [`NodePool::evict_idle`], which each worker runs every
//!   second. That timeout is below kv-node's idle timeout, so the proxy does
//!   not send on a connection the node is closing at that moment.
//! * A request that a pooled connection turns out unable to take (it was
//!   closed) comes back unsent from hyper and is sent on a fresh connection,
//!   whatever its method: the node never saw it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use kv_http::tls::Tls;
use parking_lot::Mutex;

use crate::request_body::UpstreamBody;

/// The sending half of one connection to a node.
pub type Sender = SendRequest<UpstreamBody>;

/// How connections to nodes are made and kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Longest wait for a TCP connection to a node.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed, not reused.
    pub idle_timeout: Duration,
    /// Most idle connections kept per node; more are closed on return.
    pub max_idle: usize,
}

/// The idle connections of one worker to one node.
#[derive(Debug)]
pub struct NodePool {
    /// `host:port`, as given in `--nodes`.
    target: String,
    settings: PoolSettings,
    /// Most recently returned last.
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl NodePool {
    pub fn new(target: &str, settings: PoolSettings) -> Self {
        Self {
            target: target.to_owned(),
            settings,
            idle: Mutex::new(Vec::with_capacity(settings.max_idle.min(1024))),
        }
    }

    /// A connection ready for a request: the most recent idle one that is
    /// still open and fresh, or else a new one. The error says why a new
    /// connection could not be made; it counts against the node's health.
    pub async fn checkout(&self) -> Result<Sender, String> {
        loop {
            let popped = self.idle.lock().pop();
            let Some(idle) = popped else {
                return self.connect().await;
            };
            if idle.sender.is_ready() && idle.since.elapsed() < self.settings.idle_timeout {
                return Ok(idle.sender);
            }
            // Closed, stale or (rarely) still busy: dropping it closes it.
        }
    }

    /// A new connection, not taken from the pool.
    pub async fn connect(&self) -> Result<Sender, String> {
        // TCP (no delay: small request/response pairs) and the TLS
        // handshake, if any, within the connect timeout.
        let connecting = Tls::connect(crate::node_auth::tls(), self.target.as_str());
        let stream = match tokio::time::timeout(self.settings.connect_timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(format!("connect: {error}")),
            Err(_) => {
                return Err(format!(
                    "connect: no connection within {:?}",
                    self.settings.connect_timeout
                ))
            }
        };
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("connect: handshake: {e}"))?;
        let target = self.target.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                log::debug!("connection to node {target} ended: {error}");
            }
        });
        Ok(sender)
    }

    /// Takes back a connection whose exchange is over. One not ready yet
    /// (hyper has not yet noticed the end of the exchange) is waited for on
    /// its own task, so the caller never waits.
    fn put(self: Arc<Self>, mut sender: Sender) {
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            self.push(sender);
            return;
        }
        // A body can be dropped as the worker's runtime shuts down, outside
        // it: then the connection just closes.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let idle_timeout = self.settings.idle_timeout;
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(idle_timeout, sender.ready()).await {
                self.push(sender);
            }
        });
    }

    fn push(&self, sender: Sender) {
        let mut idle = self.idle.lock();
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle longer than the idle timeout, and those
    /// the node has closed.
    pub fn evict_idle(&self) {
        let timeout = self.settings.idle_timeout;
        self.idle
            .lock()
            .retain(|idle| !idle.sender.is_closed() && idle.since.elapsed() < timeout);
    }

    /// How many idle connections the pool holds (for tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A node's answer body, holding the connection it arrives on until it
/// has been read to its end, then returning it to the pool.
pub struct PooledBody {
    body: Incoming,
    connection: Option<(Sender, Arc<NodePool>)>,
}

impl PooledBody {
    pub fn new(body: Incoming, sender: Sender, pool: Arc<NodePool>) -> Self {
        Self {
            body,
            connection: Some((sender, pool)),
        }
    }

    fn release(&mut self) {
        if let Some((sender, pool)) = self.connection.take() {
            pool.put(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            // A broken answer: the connection is not reusable.
            Poll::Ready(Some(Err(_))) => this.connection = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper's server drops a body it has sent in full without polling
        // it again; an empty one (HEAD, 204) is never polled at all.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
