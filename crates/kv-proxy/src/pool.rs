//! Keep-alive connections to one node, pooled per worker thread.
//!
//! Each worker has one [`NodePool`] per node, so a request, its forward and
//! the connection it borrows all stay on one thread (the lock is never
//! contended; it is there because hyper's services must be `Send`).
//!
//! A pooled [`Connection`] is the socket itself and its read buffer, driven
//! by the request that borrowed it ([`crate::exchange`]): no task per
//! connection and no channel between the request and its connection, which
//! is what hyper's client costs (about 3 µs of the proxy's ~7 µs of user CPU
//! per GET, measured with `scripts/bench-proxy.sh` on 2026-11-30).
//!
//! * The idle stack is LIFO: the most recently used connection is the
//!   warmest and the least likely to have been closed by the node.
//! * A connection goes back as soon as the node's answer has been read in
//!   full, before the client has received it. One whose answer was not read
//!   to the end (the client went away mid-body) is dropped, which closes it:
//!   its next bytes would be the old answer's.
//! * A connection idle longer than `--pool-idle-timeout` is never reused and
//!   is closed by [`NodePool::evict_idle`], which each worker runs every
//!   second. That timeout is below kv-node's idle timeout, so the proxy does
//!   not send on a connection the node is closing at that moment.
//! * Before reuse, an idle connection is checked without waiting
//!   ([`Connection::is_reusable`]): one the node has closed (or that holds
//!   bytes nobody asked for) is dropped, and the request goes on another,
//!   whatever its method, since nothing was sent on the closed one.

use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kv_http::tls::{ClientStream, Tls};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};

/// How connections to nodes are made and kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Longest wait for a TCP connection to a node.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed, not reused.
    pub idle_timeout: Duration,
    /// Most idle connections kept per node; more are closed on return.
    pub max_idle: usize,
    /// Longest silence of a node in the middle of a long (streamed) answer
    /// body (`--request-timeout`); past it the answer is cut off.
    pub read_timeout: Duration,
}

/// One HTTP/1.1 connection to a node: the stream and the bytes read from it
/// that no answer has consumed yet.
pub struct Connection {
    pub(crate) stream: ClientStream,
    pub(crate) buf: BytesMut,
    /// The request being written, kept for the next one's head.
    pub(crate) out: Vec<u8>,
}

/// Read buffer size: a GET's whole answer fits, and a larger body is read
/// in steps of this.
pub(crate) const READ_BUFFER: usize = 16 * 1024;

impl Connection {
    fn new(stream: ClientStream) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            out: Vec::with_capacity(512),
        }
    }

    /// Whether an idle connection can carry a request: nothing left unread,
    /// and a read that does not wait finds neither the node's close (EOF)
    /// nor bytes nobody asked for. Never waits.
    pub(crate) fn is_reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut read = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        // Ready means EOF, unasked-for bytes, or an error (a reset).
        std::pin::Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut read)
            .is_pending()
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
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
    connection: Connection,
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
    /// still open and fresh (`true`: reused), or else a new one (`false`).
    /// The error says why a new connection could not be made; it counts
    /// against the node's health.
    pub async fn checkout(&self) -> Result<(Connection, bool), String> {
        loop {
            let popped = self.idle.lock().pop();
            let Some(mut idle) = popped else {
                return self.connect().await.map(|connection| (connection, false));
            };
            if idle.since.elapsed() < self.settings.idle_timeout && idle.connection.is_reusable() {
                return Ok((idle.connection, true));
            }
            // Closed or stale: dropping it closes it.
        }
    }

    /// A new connection, not taken from the pool.
    pub async fn connect(&self) -> Result<Connection, String> {
        // TCP (no delay: small request/response pairs) and the TLS
        // handshake, if any, within the connect timeout.
        let connecting = Tls::connect(crate::node_auth::tls(), self.target.as_str());
        match tokio::time::timeout(self.settings.connect_timeout, connecting).await {
            Ok(Ok(stream)) => Ok(Connection::new(stream)),
            Ok(Err(error)) => Err(format!("connect: {error}")),
            Err(_) => Err(format!(
                "connect: no connection within {:?}",
                self.settings.connect_timeout
            )),
        }
    }

    /// Takes back a connection whose exchange is over (its answer read to
    /// the end, and the node did not say it would close).
    pub(crate) fn put(&self, connection: Connection) {
        let mut idle = self.idle.lock();
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                connection,
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
            .retain_mut(|idle| idle.since.elapsed() < timeout && idle.connection.is_reusable());
    }

    /// The longest a node may be silent mid-body.
    pub(crate) fn read_timeout(&self) -> Duration {
        self.settings.read_timeout
    }

    /// How many idle connections the pool holds (for tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}
