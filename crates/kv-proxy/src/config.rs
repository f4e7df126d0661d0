//! Command-line and environment configuration of the proxy.
//!
//! The struct lives in the library so tests can build one with
//! `Config::parse_from`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Routes each key to the kv-node that owns it on a consistent-hash ring.
#[derive(Parser, Debug, Clone)]
#[command(name = "kv-proxy", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "KV_PROXY_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "KV_PROXY_PORT", default_value_t = 8080)]
    pub port: u16,

    /// The kv-nodes, as comma-separated host:port. Standalone nodes: the
    /// nodes of the ring, and every proxy in front of them must be given the
    /// same list. A replicated cluster: seeds only; the proxy learns the
    /// members and their addresses from any seed's GET /-/shards and
    /// follows members that join or leave, so one member's address is
    /// enough.
    #[arg(
        long,
        env = "KV_PROXY_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:8081,127.0.0.1:8082,127.0.0.1:8083"
    )]
    pub nodes: Vec<String>,

    /// Virtual nodes per node on the ring.
    #[arg(long, env = "KV_PROXY_VNODES", default_value_t = kv_ring::DEFAULT_VNODES)]
    pub vnodes: u32,

    /// Worker threads serving connections, each with its own event loop
    /// and node connection pool [default: the number of CPUs].
    #[arg(long, env = "KV_PROXY_WORKERS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub workers: Option<usize>,

    /// Largest request body forwarded, in bytes; a larger one gets kv-node's
    /// own 413 from the proxy (a declared Content-Length at once, a chunked
    /// body when it crosses the limit; bodies are read whole before they are
    /// forwarded, so the node never sees it). Keep it no larger than the
    /// nodes' --max-value-bytes.
    #[arg(long, env = "KV_PROXY_MAX_BODY_BYTES", default_value_t = 1024 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_body_bytes: usize,

    /// Time to open a TCP connection to a node; past it the request gets 503.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_PROXY_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Time a node has to answer (until its response headers), counted from
    /// when the request (its body read whole first) is sent on; past it the
    /// request gets 504. A client that stops sending its body for this long
    /// gets 408; a node that stops sending a long answer for this long has
    /// the answer cut off.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_PROXY_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Cluster mode: how long a request waits for its shard to have a
    /// leader (an election, a node restarting) before the proxy answers 503.
    /// While waiting it refreshes the shard table from GET /-/shards every
    /// 50ms. Takes a duration such as 500ms, 3s or 1m.
    #[arg(long, env = "KV_PROXY_LEADER_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub leader_wait: Duration,

    /// At start, how long to keep asking the nodes for GET /-/shards when
    /// none answers yet (nodes still starting): the first node that answers
    /// decides the mode (200: cluster mode, 404: ring mode). If none answers
    /// within this, the proxy starts in ring mode and says so, and keeps
    /// asking in the background (switching once a node shows a cluster).
    /// Takes a duration such as 500ms, 10s or 1m.
    #[arg(long, env = "KV_PROXY_DISCOVER_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub discover_wait: Duration,

    /// In ring mode, how often to ask the nodes for GET /-/shards again, in
    /// case they were started (or restarted) as a replicated cluster after
    /// the proxy: the proxy then switches to cluster mode, once. An answer
    /// only a cluster node gives (a 421, an X-Kv-Leader-Id header) asks at
    /// once. Hidden: for tests.
    #[arg(long, env = "KV_PROXY_REDISCOVER_EVERY", default_value = "10s", value_parser = humantime::parse_duration, hide = true)]
    pub rediscover_every: Duration,

    /// Cluster mode: how often the shard table is refreshed from the
    /// members' GET /-/shards when nothing else asks for it (a newer
    /// placement version in an answer, a 421 naming an unknown address, a
    /// request waiting for a leader). Hidden: tests set it long to see the
    /// other triggers alone.
    #[arg(long, env = "KV_PROXY_REFRESH_EVERY", default_value = "1s", value_parser = humantime::parse_duration, hide = true)]
    pub refresh_every: Duration,

    /// Time between active health checks of each node (GET /-/health).
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_PROXY_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Time one health check may take before it counts as a failure.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_PROXY_HEALTH_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Idle pooled connections to nodes are closed after this long. Keep it
    /// below kv-node's --header-timeout (30s), so the proxy closes an idle
    /// connection before the node does and never reuses one being closed.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_PROXY_POOL_IDLE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub pool_idle_timeout: Duration,

    /// Most idle pooled connections kept per node.
    #[arg(long, env = "KV_PROXY_POOL_MAX_IDLE", default_value_t = 256)]
    pub pool_max_idle: usize,

    /// Most client connections served at once; more are answered 503 and closed.
    #[arg(long, env = "KV_PROXY_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,

    /// Time a client has to send a request's headers; it also closes
    /// keep-alive client connections idle for that long.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_PROXY_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// On SIGINT/SIGTERM, how long in-flight requests get to finish.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_PROXY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Bearer tokens and protected mode, as kv-node has them.
    #[command(flatten)]
    pub auth: kv_http::auth::AuthArgs,

    /// The token the proxy sends to the nodes, in this file (one line), when
    /// it is not the proxy's own (--auth-token-file / KV_AUTH_TOKEN, the
    /// default). Without either, clients' Authorization headers go to the
    /// nodes as they came.
    #[arg(long, env = "KV_PROXY_NODE_TOKEN_FILE", value_name = "PATH")]
    pub node_token_file: Option<PathBuf>,

    /// TLS on the port (--tls-cert/--tls-key) and to the nodes (--tls-ca),
    /// as kv-node has them.
    #[command(flatten)]
    pub tls: kv_http::tls::TlsArgs,
}

impl Config {
    /// What clients must send, or the refusal to start (protected mode, an
    /// unusable token).
    pub fn auth(&self, bind: &IpAddr) -> Result<kv_http::auth::Auth, kv_http::auth::AuthError> {
        self.auth.resolve(*bind, "kv-proxy")
    }

    /// The token sent to the nodes: `--node-token-file`, else the proxy's.
    pub fn node_token(&self) -> Result<Option<kv_http::auth::Token>, kv_http::auth::AuthError> {
        match &self.node_token_file {
            Some(path) => kv_http::auth::Token::from_file(path).map(Some),
            None => self.auth.token(),
        }
    }

    /// `--workers`, or one per CPU.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}
