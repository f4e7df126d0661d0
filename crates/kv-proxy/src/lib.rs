//! `kv-proxy`: sends every request for a key to the one kv-node that owns it
//! on the consistent-hash ring ([`kv_ring`]), so a client sees one store.
//! In front of a replicated cluster (nodes that answer `GET /-/shards`) it
//! sends each key to its shard's leader instead ([`cluster`]).
//!
//! The crate is a library with a thin binary, as kv-node is. Modules, one
//! concern each:
//! * [`config`]: flags and environment variables.
//! * [`cluster`]: cluster mode: the shard table, leader routing and its
//!   retry rules.
//! * [`api`]: routing, admin endpoints (`/-/health`, `/-/ready`, `/-/ring`,
//!   `/-/owner/<key>`, `/-/metrics`).
//! * [`upstream`]: forwarding (the body read first, retries, timeouts).
//! * [`exchange`]: one HTTP/1.1 exchange with a node on a pooled connection.
//! * [`pool`]: each worker's keep-alive connections to the nodes.
//! * [`health`]: active and passive health of each node; fail closed.
//! * [`error`]: every failure, mapped to a status in one place.
//! * [`node_auth`]: the token the proxy sends to the nodes.
//! * [`server`]: what each worker thread serves with (kv-http's thread per
//!   core, one single-threaded runtime and node connection pool each, as
//!   nginx's worker processes).

#![deny(clippy::indexing_slicing)]

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use kv_ring::Ring;
use tokio::net::TcpListener;

pub mod api;
pub mod cluster;
pub mod config;
pub mod error;
pub mod exchange;
pub mod health;
pub mod node_auth;
pub mod pool;
pub mod server;
pub mod upstream;

pub use config::Config;
pub use kv_http::server::{bind, shutdown_signal};

/// Serves the proxy on an already-bound `listener` until `shutdown`
/// resolves, then finishes in-flight requests (bounded) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let settings = cluster::ClusterSettings {
        leader_wait: config.leader_wait,
        fetch_timeout: config.health_timeout,
        health_interval: config.health_interval,
        health_timeout: config.health_timeout,
        refresh_every: config.refresh_every,
    };
    let auth = Arc::new(
        config
            .auth(&config.bind)
            .map_err(|e| invalid(e.to_string()))?,
    );
    if let Some(token) = config.node_token().map_err(|e| invalid(e.to_string()))? {
        node_auth::set(token.authorization());
    }
    let tls = config.tls.load().map_err(|e| invalid(e.to_string()))?;
    if let Some(tls) = &tls {
        node_auth::set_tls(Arc::clone(tls));
    }
    tokio::spawn(kv_http::tls::reload_on_sighup(tls.clone()));
    // Replicated nodes answer /-/shards; standalone ones 404 (ring mode).
    // In cluster mode `--nodes` are seeds: the members come from the
    // answers, each with its own health checker (`cluster::Cluster`).
    let cluster = cluster::discover(&config.nodes, config.health_timeout, config.discover_wait)
        .await
        .map(|table| cluster::Cluster::new(table, &config.nodes, settings));
    let mode = Arc::new(match &cluster {
        Some(cluster) => cluster::Mode::cluster(Arc::clone(cluster)),
        None => cluster::Mode::default(),
    });
    // The ring routes ring mode only; in cluster mode it is unused.
    let names: Vec<String> = config.nodes.clone();
    let ring = Ring::new(names.iter().map(String::as_str), config.vnodes)
        .map_err(|e| invalid(format!("cannot build the ring: {e}")))?;
    let nodes = ring
        .nodes()
        .iter()
        .map(|name| upstream::Node::new(name))
        .collect::<Result<Box<[_]>, _>>()
        .map_err(invalid)?;
    let shares = ring.shares();
    let health: Vec<_> = nodes.iter().map(|n| n.health.clone()).collect();
    let started = Instant::now();
    let pool_settings = pool::PoolSettings {
        connect_timeout: config.connect_timeout,
        idle_timeout: config.pool_idle_timeout,
        max_idle: config.pool_max_idle,
        read_timeout: config.request_timeout,
    };
    let metrics = Arc::new(kv_http::metrics::Metrics::default());
    // One copy per worker thread, each with its own connection pool; the
    // nodes' health is shared through `Arc`s.
    let workers: Vec<Arc<api::Proxy>> = (0..config.workers())
        .map(|_| {
            Arc::new(api::Proxy {
                ring: ring.clone(),
                nodes: nodes.clone(),
                shares: shares.clone(),
                pools: nodes
                    .iter()
                    .map(|node| Arc::new(pool::NodePool::new(&node.name, pool_settings)))
                    .collect(),
                request_timeout: config.request_timeout,
                max_body_bytes: config.max_body_bytes,
                started,
                metrics: Arc::clone(&metrics),
                cluster: cluster::ClusterWorker::new(Arc::clone(&mode), pool_settings),
                auth: Arc::clone(&auth),
            })
        })
        .collect();
    let described = match &cluster {
        Some(cluster) => format!(
            "cluster mode: {} shards, routed to their leaders; leader wait {}; seeds {}; \
             members {}, placement version {}",
            cluster.shards(),
            humantime::format_duration(config.leader_wait),
            names.join(", "),
            cluster.members().join(", "),
            cluster.version()
        ),
        None => format!(
            "nodes {}; ring mode: {} vnodes each",
            names.join(", "),
            config.vnodes
        ),
    };
    let (scheme, tls_described) = match &tls {
        Some(tls) if tls.serves() => ("https", tls.describe()),
        Some(tls) => ("http", tls.describe()),
        None => ("http", "plain HTTP"),
    };
    log::info!(
        "kv-proxy {} listening on {scheme}://{} ({tls_described}; {described}; {} workers)",
        env!("CARGO_PKG_VERSION"),
        listener.local_addr()?,
        workers.len()
    );
    let mut checkers = Vec::new();
    match &cluster {
        // The members' checkers are the cluster's own.
        Some(cluster) => checkers.push(tokio::spawn(Arc::clone(cluster).refresh_forever())),
        None => {
            checkers =
                health::spawn_checkers(&health, config.health_interval, config.health_timeout);
            // Nodes may show a cluster later (started after the proxy).
            checkers.push(tokio::spawn(cluster::rediscover(
                mode,
                names.clone(),
                config.rediscover_every,
                settings,
            )));
        }
    }
    let limits = kv_http::server::ConnectionLimits {
        max_connections: config.max_connections,
        header_timeout: config.header_timeout,
        shutdown_timeout: config.shutdown_timeout,
    };
    let workers = workers.into_iter().map(server::ProxyWorker).collect();
    let served = kv_http::workers::serve(listener, limits, tls, workers, shutdown).await;
    for checker in checkers {
        checker.abort();
    }
    served?;
    log::info!("kv-proxy stopped");
    Ok(())
}
