//! Thread per core, as nginx's worker processes: `--workers` threads, each
//! with its own single-threaded tokio runtime and I/O driver. The accept
//! loop hands each new connection to the next worker, and from then on a
//! request, everything it waits for and its answer run on that one thread,
//! with no hand-off between threads.
//!
//! Measured against tokio's work-stealing runtime (`scripts/bench-proxy.sh`,
//! `scripts/bench-node.sh`): one request at a time both were as fast as
//! nginx; with 64 connections the shared runtime fell behind, its workers
//! parking and waking each other (context switches were the largest single
//! cost in a profile of kv-node) and one driver discovering many sockets'
//! readiness in turn.
//!
//! Connection limits, the probe reserve, timeouts, hyper's answers in the
//! JSON contract and the bounded drain are [`crate::server`]'s.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use hyper::body::{Body as HttpBody, Incoming};
use hyper::service::HttpService;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::server::{
    drain, next_connection, serve_connection, Admission, ConnectionLimits, Reserve, Slot,
    PROBE_HEADER_TIMEOUT,
};
use crate::tls::{Accepted, ClientCert, Tls};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed future a worker runs beside its connections.
pub type Background = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What one worker thread serves with (each has its own value, so state
/// such as a connection pool need not be shared between threads).
pub trait Worker: Send + 'static {
    /// The response body.
    type Body: HttpBody<Data: Send, Error: Into<BoxError>> + Send + 'static;

    /// The service for one connection; `reserve` says whether it is a
    /// probe-only one (check each request with [`Reserve::admit`]).
    fn service(
        &self,
        reserve: Reserve,
    ) -> impl HttpService<
        Incoming,
        ResBody = Self::Body,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
           + 'static;

    /// Housekeeping run on the worker's runtime while it serves (stopped
    /// after its drain), such as evicting idle pooled connections.
    fn background(&self) -> Option<Background> {
        None
    }
}

/// A connection handed to a worker, with its slot under the cap.
type Handoff = (std::net::TcpStream, Slot);

/// Serves on `listener` with one thread per element of `workers` until
/// `shutdown` resolves, then drains every worker (bounded by
/// `limits.shutdown_timeout`) and returns once their threads have ended.
pub async fn serve<W: Worker>(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
    workers: Vec<W>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    // A process with only a CA (its clients speak TLS) serves plain HTTP.
    let tls = tls.filter(|tls| tls.serves());
    let admission = Admission::new(limits.max_connections);
    let mut senders: Vec<UnboundedSender<Handoff>> = Vec::with_capacity(workers.len());
    let mut threads = Vec::with_capacity(workers.len());
    for (index, worker) in workers.into_iter().enumerate() {
        let (sender, receiver) = unbounded_channel();
        senders.push(sender);
        let limits = limits.clone();
        let tls = tls.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("kv-worker-{index}"))
            .spawn(move || runtime.block_on(run_worker(receiver, worker, limits, tls)))?;
        threads.push(thread);
    }
    if senders.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "at least one worker is needed",
        ));
    }
    tokio::pin!(shutdown);

    let mut next = 0;
    loop {
        let (stream, slot) = tokio::select! {
            accepted = next_connection(&listener, &admission) => accepted,
            () = &mut shutdown => break,
        };
        // Deregistered here, registered again with the worker's driver.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                log::warn!("cannot hand a connection to a worker: {error}");
                continue;
            }
        };
        // Round robin: connections are long-lived and alike.
        next = (next + 1) % senders.len();
        if senders
            .get(next)
            .is_none_or(|sender| sender.send((stream, slot)).is_err())
        {
            log::error!("worker {next} has stopped");
        }
    }

    drop(listener);
    log::info!("shutting down: no new connections, finishing in-flight requests");
    // Closing the channels tells each worker to drain and return.
    drop(senders);
    let joined = tokio::task::spawn_blocking(move || {
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
    });
    if joined.await.is_err() {
        log::error!("cannot wait for the worker threads");
    }
    Ok(())
}

/// A TLS connection whose handshake is done, back to its worker.
type Shaken = (
    Box<tokio_rustls::server::TlsStream<TcpStream>>,
    ClientCert,
    Slot,
);

/// One worker: serves the connections it is handed until the accept loop
/// closes its channel, then finishes its in-flight requests (bounded).
///
/// With TLS, each handshake runs in a task of its own (a slow client delays
/// no other, and it is bounded by the header timeout), which hands the
/// connection back here to be served: the service is made by the worker,
/// told what the client's certificate proved.
async fn run_worker<W: Worker>(
    mut connections: UnboundedReceiver<Handoff>,
    worker: W,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
) {
    let graceful = GracefulShutdown::new();
    let builder = limits.http1();
    let probe_builder = limits.http1_probe();
    let background = worker.background().map(tokio::spawn);
    let (shaken_sender, mut shaken) = unbounded_channel::<Shaken>();
    loop {
        let (stream, slot) = tokio::select! {
            handed = connections.recv() => match handed {
                Some(handed) => handed,
                None => break,
            },
            Some((stream, cert, slot)) = shaken.recv() => {
                let reserve = slot.reserve().with_client_cert(cert);
                let builder = if reserve.is_probe_only() { &probe_builder } else { &builder };
                spawn_served(&graceful, builder, *stream, worker.service(reserve), slot);
                continue;
            }
        };
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(error) => {
                log::warn!("cannot register a connection: {error}");
                continue;
            }
        };
        match &tls {
            None => {
                let reserve = slot.reserve();
                let builder = if reserve.is_probe_only() {
                    &probe_builder
                } else {
                    &builder
                };
                spawn_served(&graceful, builder, stream, worker.service(reserve), slot);
            }
            Some(tls) => {
                let tls = Arc::clone(tls);
                // A reserve connection's handshake is bounded as its request
                // head is: the reserve must not be held by idle sockets.
                let timeout = if slot.reserve().is_probe_only() {
                    PROBE_HEADER_TIMEOUT.min(limits.header_timeout)
                } else {
                    limits.header_timeout
                };
                let back = shaken_sender.clone();
                tokio::spawn(async move {
                    if let Accepted::Tls(stream, cert) = tls.accept(stream, timeout).await {
                        // The worker is draining: the connection is dropped.
                        let _ = back.send((stream, cert, slot));
                    }
                });
            }
        }
    }
    drain(graceful, limits.shutdown_timeout).await;
    if let Some(background) = background {
        background.abort();
    }
}

/// Serves `stream` in a task of its own, watched for the drain; the slot is
/// freed when it ends.
fn spawn_served<T, S>(
    graceful: &GracefulShutdown,
    builder: &hyper::server::conn::http1::Builder,
    stream: T,
    service: S,
    slot: Slot,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, Error: Into<BoxError>, Future: Send + 'static> + Send + 'static,
    S::ResBody: HttpBody<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    let connection = graceful.watch(serve_connection(builder, stream, service));
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            log::debug!("connection ended with an error: {error}");
        }
        drop(slot);
    });
}
