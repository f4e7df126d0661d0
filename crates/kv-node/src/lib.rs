//! `kv-node`: one node of the key-value store, served over HTTP/1.1.
//!
//! The crate is a library with a thin binary (`main.rs` parses flags, sets up
//! logging, binds and calls [`run`]), so tests can start a real server
//! in-process on port 0 or spawn the binary as a process.
//!
//! Modules, one concern each:
//! * [`config`]: flags and environment variables.
//! * [`key`]: path → key decoding and validation.
//! * [`api`]: routing and the JSON request/response shapes.
//! * [`error`]: every failure, mapped to a status in one place.
//! * [`metrics`]: counters and histograms for `GET /-/metrics`.
//! * [`oplog`]: the Flask-format operation log, written off the request path.
//! * [`server`]: the accept loop, connection limits, graceful shutdown.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use kv_store::Store;
use tokio::net::TcpListener;

pub mod api;
pub mod config;
pub mod error;
pub mod key;
pub mod metrics;
pub mod oplog;
pub mod server;

pub use config::Config;

/// Serves the store on an already-bound `listener` until `shutdown`
/// resolves, then finishes in-flight requests (bounded) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot create data dir {}: {error}", data_dir.display()),
        )
    })?;
    let store = Store::in_memory();
    log::info!(
        "kv-node {} listening on http://{} (data dir {})",
        env!("CARGO_PKG_VERSION"),
        listener.local_addr()?,
        data_dir.display()
    );
    let op_log = match &config.op_log {
        Some(path) => {
            log::info!("operation log: {}", path.display());
            Some(oplog::OpLog::start(path.clone(), config.op_log_buffer)?)
        }
        None => None,
    };
    let app = Arc::new(api::App {
        store,
        metrics: metrics::Metrics::default(),
        op_log,
        max_value_bytes: config.max_value_bytes,
        body_timeout: config.body_timeout,
        started: Instant::now(),
    });
    let limits = server::ConnectionLimits {
        max_connections: config.max_connections,
        header_timeout: config.header_timeout,
        shutdown_timeout: config.shutdown_timeout,
    };
    server::serve(listener, app, limits, shutdown).await?;
    log::info!("kv-node stopped");
    Ok(())
}

/// Raises the soft open-file limit toward `wanted` (connections plus files),
/// up to the hard limit, so `--max-connections` is not silently capped by a
/// default `ulimit -n` of 1024. Logs a warning when it cannot be reached.
pub fn raise_fd_limit(wanted: usize) {
    let wanted = u64::try_from(wanted).unwrap_or(u64::MAX);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => log::warn!(
            "open-file limit is {got}, below the {wanted} needed for --max-connections; \
             connections past it will fail to be accepted"
        ),
        Ok(_) => {}
        Err(error) => log::warn!("cannot raise the open-file limit: {error}"),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            log::error!("cannot listen for SIGINT: {error}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                log::error!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => log::info!("received SIGINT"),
        () = terminate => log::info!("received SIGTERM"),
    }
}
