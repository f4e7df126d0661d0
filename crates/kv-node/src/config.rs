//! Command-line and environment configuration of a node.
//!
//! The struct lives in the library (not in `main.rs`) so tests can build a
//! configuration in-process with [`Config::for_tests`] or `Config::parse_from`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kv_store::{FsyncPolicy, StoreOptions};

/// One node of the key-value store, serving it over HTTP/1.1.
#[derive(Parser, Debug, Clone)]
#[command(name = "kv-node", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "KV_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "KV_PORT", default_value_t = 8081)]
    pub port: u16,

    /// Directory that holds this node's data [default: ./data/<port>].
    #[arg(long, env = "KV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Largest request body accepted, in bytes; larger ones get 413. At most
    /// what one log record can hold (256 MiB less a few KiB).
    #[arg(long, env = "KV_MAX_VALUE_BYTES", default_value_t = 1024 * 1024, value_parser = parse_max_value_bytes)]
    pub max_value_bytes: usize,

    /// Worker threads serving connections, each with its own event loop
    /// [default: the number of CPUs].
    #[arg(long, env = "KV_WORKERS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub workers: Option<usize>,

    /// Most connections served at once; more are answered 503 and closed.
    #[arg(long, env = "KV_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,

    /// Time a client has to send a request's headers; it also closes
    /// keep-alive connections idle for that long.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Time a client has to send a request's body once its headers arrived.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// Write one line per operation to this file, in the Flask store's
    /// format ("2024-10-07 14:07:10 - PUT - Key: k, Value: v"), UTC.
    #[arg(long, env = "KV_OP_LOG")]
    pub op_log: Option<PathBuf>,

    /// Operation-log lines buffered in memory; when the file cannot keep up,
    /// further lines are dropped and counted rather than slowing requests.
    /// The writer drains it every 5 ms, so keep it above 5 ms of requests.
    #[arg(long, env = "KV_OP_LOG_BUFFER", default_value_t = 65_536)]
    pub op_log_buffer: usize,

    /// On SIGINT/SIGTERM, how long in-flight requests get to finish.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// When the write-ahead log is fsynced: `always` (a write is acknowledged
    /// after an fdatasync covers it; concurrent writers share one), `everysec`
    /// (once a second: a machine crash loses at most ~1 s, a process crash
    /// nothing) or `never` (left to the kernel).
    #[arg(long, env = "KV_FSYNC", default_value = "everysec", value_parser = parse_fsync)]
    pub fsync: FsyncPolicy,

    /// Take a snapshot of the map this often (when anything changed), then
    /// delete the log it covers.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_SNAPSHOT_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub snapshot_interval: Duration,

    /// Also take a snapshot when the active log segment grows past this many
    /// bytes.
    #[arg(long, env = "KV_WAL_MAX_BYTES", default_value_t = 64 << 20)]
    pub wal_max_bytes: u64,

    /// Start even if the log is corrupt before its tail (cut it at the damage
    /// and keep the cut bytes in a `*.corrupt-<offset>` side file), the newest
    /// snapshot is damaged (set it aside, start from the previous one) or a
    /// log segment is missing (go on without it, logging what is lost). In a
    /// cluster, the shards' leaders send a repaired replica what was cut
    /// [default: off].
    #[arg(long, env = "KV_REPAIR")]
    pub repair: bool,

    /// Load a Flask store's dump (`kv_store.json`, a JSON object of key to
    /// value) into the (empty) data dir before serving [default: none].
    #[arg(long = "import", env = "KV_IMPORT", value_name = "KV_STORE_JSON")]
    pub import: Option<PathBuf>,

    /// Stop (cleanly, as on SIGTERM) when the process that started this one
    /// exits, even by SIGKILL: for tools that spawn throwaway nodes, such as
    /// `kv-bench --spawn`. Checked every 200 ms.
    #[arg(long, env = "KV_EXIT_WITH_PARENT")]
    pub exit_with_parent: bool,

    /// Bearer tokens and protected mode (kv-http's `auth`): the token is
    /// also the cluster token this node sends to its peers.
    #[command(flatten)]
    pub auth: kv_http::auth::AuthArgs,

    /// TLS on the port, to peers, and mutual TLS between nodes (kv-http's
    /// `tls`).
    #[command(flatten)]
    pub tls: kv_http::tls::TlsArgs,

    /// Cluster mode: this node's member id (with `--peers`).
    #[arg(long, env = "KV_NODE_ID")]
    pub node_id: Option<u64>,

    /// Cluster mode: every member as `ID=HOST:PORT`, comma-separated, this
    /// node included (`1=127.0.0.1:8081,2=127.0.0.1:8082,3=127.0.0.1:8083`).
    /// Without it the node is a standalone store.
    #[arg(long, env = "KV_PEERS")]
    pub peers: Option<String>,

    /// Cluster mode: join a running cluster through any of these members
    /// (`HOST:PORT`, comma-separated) instead of `--peers`: with an empty
    /// data dir the node learns the cluster from the first that answers,
    /// writes `cluster.json` and asks to be added as `--node-id` at
    /// `--advertise`. A restart (its data dir has `cluster.json`) ignores it.
    #[arg(long, env = "KV_JOIN", value_name = "SEED[,SEED..]", conflicts_with_all = ["peers", "shards", "replicas"])]
    pub join: Option<String>,

    /// Cluster mode (`--join`): the `HOST:PORT` other members and clients
    /// reach this node at [default: --bind:--port, refused when --bind is
    /// unspecified].
    #[arg(long, env = "KV_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// Cluster mode: moves copying at a time, cluster-wide (the metadata
    /// leader's value applies).
    #[arg(long, env = "KV_MAX_MOVES", default_value_t = kv_cluster::DEFAULT_MAX_MOVES)]
    pub max_moves: u32,

    /// Cluster mode: snapshot bytes per second this node sends to other
    /// replicas (moves and lagging replicas alike); 0 is unbounded.
    #[arg(long, env = "KV_MOVE_BYTES_PER_SEC", default_value_t = 32 << 20)]
    pub move_bytes_per_sec: u64,

    /// Cluster mode (tests): stop moving shard S at its joint step, once.
    #[arg(long, env = "KV_MOVE_PAUSE_JOINT_SHARD", hide = true)]
    pub move_pause_joint_shard: Option<u32>,

    /// Cluster mode: number of shards, fixed when the cluster is created
    /// [default: 64].
    #[arg(long, env = "KV_SHARDS")]
    pub shards: Option<u32>,

    /// Cluster mode: copies of each shard [default: 3].
    #[arg(long, env = "KV_REPLICAS")]
    pub replicas: Option<u32>,

    /// Cluster mode: how long a write may wait to be committed and applied
    /// before the client is answered 504 (outcome unknown).
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_RAFT_WRITE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub raft_write_timeout: Duration,

    /// Cluster mode: how a leader confirms it still leads before a
    /// linearizable read. `lease` (the default): a quorum acknowledgement
    /// younger than the shortest election timeout (200 ms) is reused, so
    /// most reads need no round trip; the followers that gave it refuse
    /// votes for the longest election timeout (400 ms) after receiving it,
    /// and a restarted node for 400 ms after it starts. It assumes the
    /// nodes' clock *rates* differ by less than that margin (200 of 400 ms),
    /// not that their clocks agree. `read-index`: a quorum acknowledges a
    /// heartbeat sent after the read arrived (one round per batch of reads;
    /// no clock assumption).
    #[arg(long, env = "KV_READ_POLICY", value_enum, default_value = "lease")]
    pub read_policy: ReadPolicy,

    /// Cluster mode: how long a client's request (one without
    /// `X-Kv-Route: direct`) waits for its shard to have a leader with a
    /// quorum (an election, a leader just restarted) before the node answers
    /// 503; only requests that were not proposed are retried, so nothing is
    /// applied twice. 0s answers at once. Takes a duration such as 500ms, 3s
    /// or 1m.
    #[arg(long, env = "KV_LEADER_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub leader_wait: Duration,

    /// Cluster mode: hand leaderships back to their preferred leaders once
    /// those are caught up, so leaders stay spread (`on` or `off`).
    #[arg(long, env = "KV_LEADER_BALANCE", default_value = "on", action = clap::ArgAction::Set, value_name = "on|off", value_parser = parse_on_off)]
    pub leader_balance: bool,

    /// Cluster mode: snapshot a shard (and let its log and the write-ahead
    /// log segments it pins go) once its log since the last snapshot holds
    /// more than this many bytes. Bounds memory too: each shard keeps its
    /// log since the snapshot in memory.
    #[arg(long, env = "KV_RAFT_LOG_MAX_BYTES", default_value_t = 8 << 20)]
    pub raft_log_max_bytes: u64,

    /// Cluster mode (tests): the leaders' heartbeat interval [default: 100ms].
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_RAFT_HEARTBEAT", hide = true, value_parser = humantime::parse_duration)]
    pub raft_heartbeat: Option<Duration>,

    /// Cluster mode (tests): the shortest election timeout; the longest is
    /// twice it [default: 200ms].
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_RAFT_ELECTION_TIMEOUT", hide = true, value_parser = humantime::parse_duration)]
    pub raft_election_timeout: Option<Duration>,

    /// Cluster mode (tests): send node-to-node traffic for member ID to
    /// HOST:PORT instead of its `--peers` address (a fault-injecting relay).
    /// Repeatable.
    #[arg(long = "raft-route", env = "KV_RAFT_ROUTE", hide = true, value_delimiter = ',', value_parser = parse_route)]
    pub raft_routes: Vec<(u64, String)>,
}

/// The largest `--max-value-bytes`: a stored value is the body less its
/// whitespace plus a newline, so a body of this size always fits one log
/// record with the longest key.
pub const MAX_VALUE_BYTES_LIMIT: usize = kv_store::MAX_VALUE_BYTES - 1;

fn parse_max_value_bytes(value: &str) -> Result<usize, String> {
    let bytes: usize = value
        .parse()
        .map_err(|e| format!("not a number of bytes: {e}"))?;
    if bytes == 0 {
        return Err("0 would refuse every PUT; give at least 1".into());
    }
    if bytes > MAX_VALUE_BYTES_LIMIT {
        return Err(format!(
            "{bytes} is more than the log can hold in one record; the most is {MAX_VALUE_BYTES_LIMIT}"
        ));
    }
    Ok(bytes)
}

fn parse_on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{value:?} is neither on nor off")),
    }
}

/// `ID=HOST:PORT` of `--raft-route`.
fn parse_route(value: &str) -> Result<(u64, String), String> {
    let (id, addr) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not ID=HOST:PORT"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|e| format!("{id:?} is not a member id: {e}"))?;
    let addr = addr.trim();
    if addr
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(format!("{addr:?} is not HOST:PORT"));
    }
    Ok((id, addr.to_owned()))
}

/// `--read-policy`: how linearizable reads confirm leadership.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPolicy {
    /// A quorum round after the read arrived (openraft's `ReadIndex`): no
    /// clock assumption.
    ReadIndex,
    /// Reuse a quorum acknowledgement younger than the shortest election
    /// timeout (not the whole leader lease), heartbeating only when it is
    /// older (openraft's lease read, waiting instead of failing when the
    /// lease lapsed). Assumes bounded clock-rate differences (see
    /// `--read-policy`); the default.
    #[default]
    Lease,
}

fn parse_fsync(value: &str) -> Result<FsyncPolicy, String> {
    value.parse()
}

impl Config {
    /// The data directory: `--data-dir`, or `./data/<port>`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("data").join(self.port.to_string()))
    }

    /// `--workers`, or one per CPU.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }

    /// The storage engine's options.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            fsync: self.fsync,
            snapshot_interval: self.snapshot_interval,
            wal_max_bytes: self.wal_max_bytes,
            repair: self.repair,
        }
    }

    /// Whether `--peers` or `--join` puts this node in cluster mode.
    pub fn cluster_mode(&self) -> bool {
        self.peers.is_some() || self.join.is_some()
    }

    /// The openraft timeouts: the defaults, or the hidden test flags.
    pub fn raft_timeouts(&self) -> kv_raft::Timeouts {
        let mut timeouts = kv_raft::Timeouts::default();
        if let Some(heartbeat) = self.raft_heartbeat {
            timeouts.heartbeat_ms = heartbeat.as_millis().max(1) as u64;
        }
        if let Some(election) = self.raft_election_timeout {
            timeouts.election_min_ms = election.as_millis().max(1) as u64;
            timeouts.election_max_ms = timeouts.election_min_ms * 2;
        }
        timeouts
    }

    /// Defaults with the given data directory, for in-process servers.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        Self::parse_from([
            "kv-node",
            "--port",
            "0",
            "--data-dir",
            &data_dir.to_string_lossy(),
        ])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cluster_flags_default_to_not_given() {
        let config = Config::parse_from(["kv-node"]);
        assert!(!config.cluster_mode());
        assert_eq!(
            (config.node_id, config.shards, config.replicas),
            (None, None, None)
        );
        assert!(config.leader_balance);
        assert_eq!((&config.join, &config.advertise), (&None, &None));
        assert_eq!(config.max_moves, 2);
        assert_eq!(config.move_bytes_per_sec, 32 << 20);
        assert_eq!(config.raft_write_timeout, Duration::from_secs(2));
        assert_eq!(config.raft_timeouts(), kv_raft::Timeouts::default());
    }

    #[test]
    fn reads_default_to_the_lease_and_read_index_stays_selectable() {
        assert_eq!(
            Config::parse_from(["kv-node"]).read_policy,
            ReadPolicy::Lease
        );
        assert_eq!(ReadPolicy::default(), ReadPolicy::Lease);
        let config = Config::parse_from(["kv-node", "--read-policy", "read-index"]);
        assert_eq!(config.read_policy, ReadPolicy::ReadIndex);
    }

    #[test]
    fn cluster_flags_parse() {
        let config = Config::parse_from([
            "kv-node",
            "--node-id",
            "2",
            "--peers",
            "1=a:1,2=b:2",
            "--leader-balance",
            "off",
            "--raft-route",
            "1=127.0.0.1:9000",
            "--raft-route",
            "3=h:1",
            "--raft-election-timeout",
            "200ms",
        ]);
        assert!(config.cluster_mode());
        assert!(!config.leader_balance);
        assert_eq!(
            config.raft_routes,
            vec![(1, "127.0.0.1:9000".to_owned()), (3, "h:1".to_owned())]
        );
        let timeouts = config.raft_timeouts();
        assert_eq!(
            (timeouts.election_min_ms, timeouts.election_max_ms),
            (200, 400)
        );
        let joining = Config::parse_from([
            "kv-node",
            "--node-id",
            "4",
            "--join",
            "127.0.0.1:8081,127.0.0.1:8082",
            "--advertise",
            "127.0.0.1:8084",
        ]);
        assert!(joining.cluster_mode());
        assert!(
            Config::try_parse_from(["kv-node", "--join", "a:1", "--peers", "1=a:1"]).is_err(),
            "--join learns the members"
        );
        for bad in [
            ["--raft-route", "x"],
            ["--raft-route", "1=nohostport"],
            ["--leader-balance", "maybe"],
        ] {
            assert!(
                Config::try_parse_from(["kv-node", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }
}
