//! The accept loop: binding, connection limits, per-connection timeouts,
//! graceful shutdown and signals, around hyper's HTTP/1.1 connection driver.
//!
//! * A semaphore caps concurrent connections (`--max-connections`). Past
//!   the cap, a small reserve ([`PROBE_RESERVE`] connections) is still
//!   served, but only for `/-/health` and `/-/ready` (anything else gets the
//!   JSON 503 "Too many connections"), one request each with a short header
//!   timeout: a health checker must not mark a merely busy server down.
//!   Past the reserve too, a connection is answered with a canned JSON 503
//!   and closed at once, so a flood is refused fast instead of queueing
//!   without bound. Refusals (these, and reserve connections asking for
//!   more than a probe) are counted, and logged at most once a second with
//!   the count, so a flood cannot flood the log too.
//! * hyper's header-read timeout closes clients that dribble their headers,
//!   and because it starts whenever hyper waits for a request head, it also
//!   closes keep-alive connections left idle. The body timeout lives with
//!   the service, where the body is read.
//! * With TLS ([`crate::tls`]), the handshake runs on the worker that
//!   serves the connection, bounded by the header timeout.
//! * Every connection's socket is wrapped in [`JsonErrors`], so hyper's own
//!   answers keep the JSON contract.
//! * On shutdown the listener is dropped (no new connections), every
//!   connection is told to finish its in-flight request and close, and the
//!   wait for them is bounded by `--shutdown-timeout`.

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::{Body as HttpBody, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::canned::JsonErrors;
use crate::error::ApiError;
use crate::tls::ClientCert;

/// Connections past `--max-connections` still served for health and
/// readiness probes.
pub const PROBE_RESERVE: usize = 16;
/// The header timeout of a reserve connection: a probe sends its request at
/// once, and the reserve must not be held by idle sockets.
pub(crate) const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one "refused" warning per this long.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(1);

/// Limits applied to every connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// The largest request head (request line and headers) a connection
/// buffers; a longer one is answered 431. hyper's default, ~408 KiB, let
/// every one of `--max-connections` clients hold that much with an
/// unfinished head until the header timeout, before any token is checked
/// (1,000 such connections: 9 MB -> 399 MB resident, break session
/// 2026-11-30). 32 KiB is nginx's default ceiling (`large_client_header_buffers
/// 4 8k`) and far above a kv request's (a key is at most 1 KiB, 3 KiB
/// percent-encoded). It also bounds each read of a body, which costs a
/// 1 MiB value 32 reads instead of fewer.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

impl ConnectionLimits {
    /// hyper's HTTP/1.1 connection settings for these limits (header-read
    /// timeout, which also closes idle keep-alive connections; a head of at
    /// most [`MAX_HEAD_BYTES`]).
    pub fn http1(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        builder
    }

    /// Settings for a reserve connection: one request, a short head timeout.
    pub fn http1_probe(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(PROBE_HEADER_TIMEOUT.min(self.header_timeout))
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(false);
        builder
    }
}

/// Who gets a connection slot: the cap and the probe reserve.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    refusals: Arc<Refusals>,
}

/// Connections refused since the last warning, and when that was.
#[derive(Debug)]
struct Refusals {
    max_connections: usize,
    count: AtomicU64,
    last_warning: std::sync::Mutex<Option<Instant>>,
}

impl Admission {
    pub fn new(max_connections: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            reserve: Arc::new(Semaphore::new(PROBE_RESERVE)),
            refusals: Arc::new(Refusals {
                max_connections,
                count: AtomicU64::new(0),
                last_warning: std::sync::Mutex::new(None),
            }),
        }
    }
}

impl Refusals {
    /// Counts a refused connection; warns with the count at most once per
    /// [`REFUSED_LOG_EVERY`] (a flood must not flood the log too).
    fn count(&self) {
        self.count.fetch_add(1, Relaxed);
        let Ok(mut last) = self.last_warning.try_lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < REFUSED_LOG_EVERY) {
            return;
        }
        let since = last.map(|at| now.duration_since(at));
        *last = Some(now);
        let count = self.count.swap(0, Relaxed);
        match since {
            Some(since) => log::warn!(
                "refused {count} connections in the last {:.1}s: over --max-connections ({})",
                since.as_secs_f64(),
                self.max_connections
            ),
            None => log::warn!(
                "refused {count} connection: over --max-connections ({}); \
                 further refusals are counted and logged at most once a second",
                self.max_connections
            ),
        }
    }
}

/// A connection's slot: under the cap, or one of the probe reserve.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    reserve: Reserve,
}

impl Slot {
    /// What the connection's requests are admitted to (see [`Reserve`]).
    pub fn reserve(&self) -> Reserve {
        self.reserve.clone()
    }
}

/// What a connection's requests are admitted to: whether it is one of the
/// probe reserve, where only `/-/health` and `/-/ready` are served (every
/// service checks each request with [`Reserve::admit`]), and what its
/// client proved with a TLS certificate (see [`crate::tls`]).
#[derive(Debug, Clone, Default)]
pub struct Reserve(Option<Arc<Refusals>>, ClientCert);

impl Reserve {
    /// A connection under the cap: everything is admitted.
    pub fn none() -> Self {
        Self(None, ClientCert::NotAsked)
    }

    /// Whether this is a probe-only connection.
    pub fn is_probe_only(&self) -> bool {
        self.0.is_some()
    }

    /// This connection, with what its TLS handshake proved.
    pub fn with_client_cert(self, cert: ClientCert) -> Self {
        Self(self.0, cert)
    }

    /// What the client proved with a TLS certificate.
    pub fn client_cert(&self) -> ClientCert {
        self.1
    }

    /// The 503 for anything but a probe on a reserve connection (counted
    /// with the refused connections).
    #[inline]
    pub fn admit(&self, path: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(refusals) if !matches!(path, "/-/health" | "/-/ready") => {
                refusals.count();
                Err(ApiError::TooManyConnections)
            }
            _ => Ok(()),
        }
    }
}

/// Binds a listener on `ip:port`, with an error that names the address (a
/// taken port is the common startup failure).
pub async fn bind(ip: IpAddr, port: u16) -> io::Result<TcpListener> {
    TcpListener::bind((ip, port)).await.map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot listen on {ip}:{port}: {error}"),
        )
    })
}

/// A future that resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are
/// installed by this call, not when the future is first polled: a signal
/// that arrives while the server starts is then a clean stop, not the
/// default action (death by signal). Call it inside the runtime, before
/// announcing readiness.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let next = |stream: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
            match stream {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(error) => {
                    log::error!("cannot listen for {name}: {error}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = next(interrupt, "SIGINT") => log::info!("received SIGINT"),
            () = next(terminate, "SIGTERM") => log::info!("received SIGTERM"),
        }
    }
}

/// The next connection to serve, with its slot. Connections over the cap
/// and the reserve are answered 503 and closed here; accept errors are
/// logged and paused on. Cancel-safe (for `select!` against a shutdown
/// signal).
pub async fn next_connection(listener: &TcpListener, admission: &Admission) -> (TcpStream, Slot) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let slot = match admission.permits.clone().try_acquire_owned() {
                    Ok(permit) => Some(Slot {
                        _permit: permit,
                        reserve: Reserve::none(),
                    }),
                    Err(_) => admission
                        .reserve
                        .clone()
                        .try_acquire_owned()
                        .ok()
                        .map(|permit| Slot {
                            _permit: permit,
                            reserve: Reserve(
                                Some(Arc::clone(&admission.refusals)),
                                ClientCert::NotAsked,
                            ),
                        }),
                };
                match slot {
                    Some(slot) => {
                        // Small request/response pairs: send each answer at once.
                        let _ = stream.set_nodelay(true);
                        return (stream, slot);
                    }
                    None => {
                        admission.refusals.count();
                        tokio::spawn(refuse(stream));
                    }
                }
            }
            Err(error) => accept_error_pause(&error).await,
        }
    }
}

/// Serves one connection with `service`, on `builder`'s settings (see
/// [`ConnectionLimits::http1`]), hyper's own answers in the JSON contract.
pub fn serve_connection<T, S, B>(
    builder: &http1::Builder,
    stream: T,
    service: S,
) -> http1::Connection<TokioIo<JsonErrors<T>>, S>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    builder.serve_connection(TokioIo::new(JsonErrors::new(stream)), service)
}

/// Lets the watched connections finish their in-flight requests and close,
/// for at most `timeout`.
pub async fn drain(graceful: GracefulShutdown, timeout: Duration) {
    tokio::select! {
        () = graceful.shutdown() => log::info!("all connections closed"),
        () = tokio::time::sleep(timeout) => {
            log::warn!("shutdown timeout ({timeout:?}) passed with connections still open");
        }
    }
}

/// Answers a connection over the cap and the reserve with a 503 and closes it.
///
/// The request is drained (briefly) before the socket is dropped: closing a
/// socket with unread bytes makes the kernel send a reset, which can destroy
/// the 503 before the client reads it.
async fn refuse(mut stream: TcpStream) {
    let answer = async {
        stream
            .write_all(&ApiError::TooManyConnections.to_wire())
            .await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// Accept fails when the process is out of file descriptors (EMFILE) or the
/// peer reset before we got to it. Back off briefly so an fd shortage does
/// not spin the loop; the connections in flight will free descriptors.
async fn accept_error_pause(error: &io::Error) {
    log::warn!("accept failed: {error}");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_probes_pass_the_reserve_and_the_rest_is_counted() {
        let admission = Admission::new(1);
        let reserve = Reserve(Some(Arc::clone(&admission.refusals)), ClientCert::NotAsked);
        assert!(reserve.admit("/-/health").is_ok());
        assert!(reserve.admit("/-/ready").is_ok());
        assert!(Reserve::none().admit("/key").is_ok());
        // The first refusal is logged at once; the next are counted for
        // the next warning, due a second later.
        assert!(reserve.admit("/key").is_err());
        assert!(reserve.admit("/-/metrics").is_err());
        admission.refusals.count();
        assert_eq!(admission.refusals.count.load(Relaxed), 2);
    }
}
