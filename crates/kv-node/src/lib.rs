//! `kv-node`: one node of the key-value store, served over HTTP/1.1.
//!
//! The crate is a library with a thin binary (`main.rs` parses flags, sets up
//! logging, binds and calls [`run`]), so tests can start a real server
//! in-process on port 0 or spawn the binary as a process.
//!
//! Modules, one concern each:
//! * [`config`]: flags and environment variables.
//! * [`api`]: routing and the JSON request/response shapes.
//! * [`error`]: which API error each storage failure becomes.
//! * [`oplog`]: the Flask-format operation log, written off the request path.
//! * [`import`]: loading a Flask store's `kv_store.json` dump.
//! * [`cluster`]: cluster mode (`--peers`): a Raft group per shard, the
//!   replicated request path, forwarding, `/-/shards` (issue 12).
//!
//! What kv-node shares with kv-proxy is the `kv-http` crate: the accept loop
//! with its connection limits and graceful shutdown, key parsing, the error
//! → status map and JSON error bodies, the metrics and their text.
//!
//! Storage (the map, write-ahead log, snapshots, recovery) is the `kv-store`
//! crate; [`run`] opens it on the data dir before accepting connections and
//! closes it (flushing the log) after the last request.

// Requests, peers' answers and files are input: indexing is `get` and
// checked slicing, never a panic.
#![deny(clippy::indexing_slicing)]

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use kv_store::Store;
use tokio::net::TcpListener;

pub mod api;
pub mod cluster;
pub mod config;
pub mod error;
pub mod import;
pub mod oplog;

pub use cluster::moves::RemovedNode;
pub use config::Config;
pub use kv_http::server::{bind, shutdown_signal};

/// Serves the store on an already-bound `listener` until `shutdown`
/// resolves, then finishes in-flight requests (bounded) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let data_dir = config.data_dir();
    let auth = config
        .auth
        .resolve(config.bind, "kv-node")
        .map_err(io::Error::other)?;
    let tls = config.tls.load().map_err(io::Error::other)?;
    tokio::spawn(kv_http::tls::reload_on_sighup(tls.clone()));
    survive_file_size_limit();
    // A node removed from its cluster never serves from its data dir again,
    // whatever the flags (checked first: without --peers the refusal would
    // otherwise be about the missing flag).
    cluster::moves::check_not_removed(&data_dir)?;
    if !config.cluster_mode() {
        cluster::start::check_standalone(&data_dir)?;
    }
    let store = Arc::new(open_store(&config, &data_dir).await?);
    let cluster = if config.cluster_mode() {
        Some(cluster::start(&config, Arc::clone(&store), &data_dir, tls.clone()).await?)
    } else {
        None
    };
    if let Some(dump) = config.import.clone() {
        let started = Instant::now();
        let count = import::import(Arc::clone(&store), dump.clone())
            .await
            .map_err(io::Error::other)?;
        log::info!(
            "imported {count} keys from {} in {:.0?}",
            dump.display(),
            started.elapsed()
        );
    }
    let (scheme, described) = match &tls {
        Some(tls) if tls.serves() => ("https", tls.describe()),
        Some(tls) => ("http", tls.describe()),
        None => ("http", "plain HTTP"),
    };
    log::info!(
        "kv-node {} listening on {scheme}://{} ({described}; data dir {}, fsync {})",
        env!("CARGO_PKG_VERSION"),
        listener.local_addr()?,
        data_dir.display(),
        config.fsync
    );
    let op_log = match &config.op_log {
        Some(path) => {
            log::info!("operation log: {}", path.display());
            let op_log = Arc::new(oplog::OpLog::start(path.clone(), config.op_log_buffer)?);
            let saves = Arc::clone(&op_log);
            store.on_snapshot(move |keys, bytes| {
                saves.record(oplog::Entry::Save(format!(
                    "Snapshot of {keys} keys written ({bytes} bytes)"
                )));
            });
            Some(op_log)
        }
        None => None,
    };
    let op_log_at_exit = op_log.clone();
    let app = Arc::new(api::App {
        store: Arc::clone(&store),
        metrics: kv_http::metrics::Metrics::default(),
        op_log,
        max_value_bytes: config.max_value_bytes,
        body_timeout: config.body_timeout,
        started: Instant::now(),
        cluster: cluster.clone(),
        auth,
    });
    let limits = kv_http::server::ConnectionLimits {
        max_connections: config.max_connections,
        header_timeout: config.header_timeout,
        shutdown_timeout: config.shutdown_timeout,
    };
    // Thread per core (kv-http's workers); the store is shared.
    let workers = (0..config.workers())
        .map(|_| api::NodeWorker(Arc::clone(&app)))
        .collect();
    // A clustered node hands its leaderships away while it still serves
    // (the new leaders' elections need its answers), then stops accepting.
    let stopping = cluster.clone();
    let removed = cluster.clone();
    let shutdown = async move {
        // A node removed from the cluster stops by itself (exit 0).
        let removed = async {
            match &removed {
                Some(cluster) => cluster.removed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown => {}
            () = removed => {}
        }
        if let Some(cluster) = stopping {
            cluster.transfer_away(cluster.transfer_bound()).await;
        }
    };
    let served = kv_http::workers::serve(listener, limits, tls, workers, shutdown).await;
    if let Some(cluster) = &cluster {
        cluster.shutdown().await;
    }
    // Flush and sync the log even if serving failed; blocking, so off the workers.
    // Then the op log's last lines (the snapshot at close included).
    let _ = tokio::task::spawn_blocking(move || {
        store.close();
        if let Some(op_log) = op_log_at_exit {
            op_log.close();
        }
    })
    .await;
    served?;
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

/// A process over its file-size limit (`RLIMIT_FSIZE`) gets SIGXFSZ, whose
/// default action kills it. Listening for the signal turns that into the
/// write failing with EFBIG, which the store treats as a failed disk: writers
/// get 503, reads go on (until a restart; unlike a full disk, which passes).
fn survive_file_size_limit() {
    #[cfg(target_os = "linux")]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            Ok(mut stream) => {
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        log::warn!("SIGXFSZ: a write went past the process's file-size limit");
                    }
                });
            }
            Err(error) => log::warn!("cannot listen for SIGXFSZ: {error}"),
        }
    }
}

/// Opens the data dir (recovering it) off the async workers, and logs what
/// recovery did.
async fn open_store(config: &Config, data_dir: &std::path::Path) -> io::Result<Store> {
    let options = config.store_options();
    let dir = data_dir.to_path_buf();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir, options))
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::other)?;
    if let Some(report) = store.recovery() {
        let seconds = report.elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            (report.keys as f64 / seconds) as u64
        } else {
            0
        };
        let snapshot = match &report.snapshot {
            Some((path, keys)) => format!("snapshot {} ({keys} keys)", path.display()),
            None => "no snapshot".to_owned(),
        };
        log::info!(
            "recovered {} keys in {:.1} ms ({rate} keys/s) from {snapshot} + {} log records in {} segments{}",
            report.keys,
            seconds * 1000.0,
            report.records,
            report.segments,
            if report.cut_bytes > 0 {
                format!(" ({} damaged bytes cut, see warnings)", report.cut_bytes)
            } else {
                String::new()
            }
        );
    }
    Ok(store)
}

/// Resolves once this process's parent has exited (it was re-parented to
/// init or a subreaper), polling every 200 ms: Linux offers no signal for it
/// that a child can ask for without `unsafe` (`PR_SET_PDEATHSIG` must be set
/// between fork and exec, by the parent).
pub async fn parent_exited() {
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if std::os::unix::process::parent_id() != parent {
            log::info!("parent process {parent} exited; stopping");
            return;
        }
    }
}
