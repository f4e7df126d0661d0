//! The accept loop and the workers that serve connections.
//!
//! Thread per core, as nginx's worker processes: `--workers` threads, each
//! with its own single-threaded tokio runtime, its own I/O driver and its
//! own pool of connections to the nodes. The accept loop hands each new
//! connection to the next worker, and from then on a request, its forward
//! to the node and the answer all run on that one thread, with no hand-off
//! between threads. Measured against tokio's work-stealing runtime (see
//! `scripts/bench-proxy.sh`): one request at a time, both were as fast as
//! nginx; with 8 and 64 connections the shared runtime fell behind, the
//! single driver discovering many sockets' readiness in turn.
//!
//! Otherwise as kv-node's accept loop (both are kv-http's
//! [`kv_http::server`]): a cap on concurrent client connections (past it a
//! small reserve for health and readiness probes, then a canned JSON 503,
//! closed at once; the accept step is [`next_connection`]), hyper's
//! header-read timeout against dribbling or idle clients, hyper's own
//! answers in the JSON contract, and graceful shutdown bounded by
//! `--shutdown-timeout`.

use std::future::Future;
use std::io;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::server::graceful::GracefulShutdown;
use kv_http::server::{
    drain, next_connection, serve_connection, Admission, ConnectionLimits, Slot,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::api::{self, Proxy};
use crate::pool;

/// A connection handed to a worker, with its slot under the cap.
type Handoff = (std::net::TcpStream, Slot);

/// Serves on `listener` with one worker thread per element of `workers`
/// until `shutdown` resolves, then drains every worker.
pub async fn serve(
    listener: TcpListener,
    workers: Vec<Arc<Proxy>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let admission = Admission::new(limits.max_connections);
    let mut senders: Vec<UnboundedSender<Handoff>> = Vec::with_capacity(workers.len());
    let mut threads = Vec::with_capacity(workers.len());
    for (index, proxy) in workers.into_iter().enumerate() {
        let (sender, receiver) = unbounded_channel();
        senders.push(sender);
        let limits = limits.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("kv-proxy-worker-{index}"))
            .spawn(move || runtime.block_on(worker(receiver, proxy, limits)))?;
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
        if senders[next].send((stream, slot)).is_err() {
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

/// One worker: serves the connections it is handed until the accept loop
/// closes its channel, then finishes its in-flight requests (bounded).
async fn worker(
    mut connections: UnboundedReceiver<Handoff>,
    proxy: Arc<Proxy>,
    limits: ConnectionLimits,
) {
    let graceful = GracefulShutdown::new();
    let builder = limits.http1();
    let probe_builder = limits.http1_probe();
    let evictor = tokio::spawn(pool::evict_idle_forever(proxy.pools.to_vec()));
    while let Some((stream, slot)) = connections.recv().await {
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(error) => {
                log::warn!("cannot register a connection: {error}");
                continue;
            }
        };
        let proxy = proxy.clone();
        let reserve = slot.reserve();
        let builder = if reserve.is_probe_only() {
            &probe_builder
        } else {
            &builder
        };
        let service =
            service_fn(move |request| api::handle(proxy.clone(), reserve.clone(), request));
        let connection = graceful.watch(serve_connection(builder, stream, service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                log::debug!("connection ended with an error: {error}");
            }
            drop(slot);
        });
    }
    drain(graceful, limits.shutdown_timeout).await;
    evictor.abort();
}
