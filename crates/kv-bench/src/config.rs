//! Command-line and environment configuration.
//!
//! Every flag has an environment variable and its default in `--help`. A few
//! defaults depend on the workload (`--workload seed` reproduces the Flask
//! benchmark: 600 requests at concurrency 250), so those flags are `Option`s
//! resolved by [`Config::plan`] into a [`Plan`] the rest of the crate uses.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::client::ClientKind;

/// Load generator for kv: runs a set/get/delete workload against 1, then 2,
/// ... up to --nodes nodes (routing each key with the ring, as kv-proxy
/// does), checks every answer, and reports throughput, latency, errors and
/// each node's share of the requests.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "kv-bench",
    version,
    about,
    long_about = None,
    after_help = "Exit status: 0 when every answer was right; 1 when any request failed or got a wrong \
answer (unless --allow-errors); 2 on bad flags or when a node cannot be reached.\n\n\
Examples:\n  kv-bench --nodes 3                      # 1, 2, then 3 nodes on 127.0.0.1:8081..8083\n  \
kv-bench --nodes 3 --spawn              # the same, starting the nodes itself\n  \
kv-bench --workload seed --nodes 3      # the Flask benchmark's sequence\n  \
kv-bench --proxy http://127.0.0.1:8080 --mix set=1,get=8 --distribution zipf\n  \
kv-bench --rate 20000 --duration 30s    # open loop, latency corrected for coordinated omission\n  \
kv-bench --history h.jsonl -d 5s && kv-bench check-history h.jsonl   # linearizability, per key"
)]
pub struct Config {
    /// Run against 1 node, then 2, ... up to this many [default: 1, or the
    /// number of --urls].
    #[arg(long, env = "KV_BENCH_NODES")]
    pub nodes: Option<usize>,

    /// Port of the first node; node i is on base-port + i.
    #[arg(long, env = "KV_BENCH_BASE_PORT", default_value_t = 8081)]
    pub base_port: u16,

    /// Host of the nodes addressed by --base-port.
    #[arg(long, env = "KV_BENCH_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Explicit node URLs, comma-separated (instead of --host/--base-port);
    /// --nodes defaults to their count. Against a replicated cluster these
    /// are seeds: the members are learnt from GET /-/shards (one member's
    /// URL is enough) and followed as they join or leave.
    #[arg(long, env = "KV_BENCH_URLS", value_delimiter = ',', conflicts_with_all = ["proxy", "spawn"])]
    pub urls: Vec<String>,

    /// Only the run with all the nodes, not 1, 2, ... first.
    #[arg(long, env = "KV_BENCH_ONLY_MAX")]
    pub only_max: bool,

    /// Send every request through this proxy instead of routing client-side
    /// (one run).
    #[arg(long, env = "KV_BENCH_PROXY", conflicts_with = "spawn")]
    pub proxy: Option<String>,

    /// Start --nodes local kv-node processes (free ports, temporary data
    /// directories) and stop them when done.
    #[arg(long, env = "KV_BENCH_SPAWN")]
    pub spawn: bool,

    /// The kv-node binary --spawn starts [default: kv-node next to kv-bench].
    #[arg(long, env = "KV_BENCH_NODE_BIN")]
    pub node_bin: Option<PathBuf>,

    /// Send `Authorization: Bearer <token>` on every request, with the token
    /// in this file (one line), for nodes and proxies started with a token.
    /// The environment variable KV_AUTH_TOKEN may hold the token itself
    /// instead. Nodes started by --spawn inherit KV_AUTH_TOKEN.
    #[arg(long, env = "KV_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,

    /// Verify `https://` servers against this CA (PEM); scheme-less
    /// addresses (the members a cluster reports) are then `https://` too.
    #[arg(long, env = "KV_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,

    /// `mix`: random operations from --mix over --keys; `seed`: the Flask
    /// benchmark's exact sequence (N/3 sets, N/3 gets, N/3 deletes, in
    /// batches of --concurrency).
    #[arg(long, env = "KV_BENCH_WORKLOAD", value_enum, default_value_t = WorkloadKind::Mix)]
    pub workload: WorkloadKind,

    /// Requests per run [default: 600 with --workload seed; otherwise the
    /// run lasts --duration].
    #[arg(
        long,
        short = 'n',
        env = "KV_BENCH_REQUESTS",
        conflicts_with = "duration"
    )]
    pub requests: Option<u64>,

    /// Length of each run, e.g. 10s [default: 10s].
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, short = 'd', env = "KV_BENCH_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Requests in flight at once: one closed-loop worker each, with one
    /// keep-alive connection per node [default: 64; 250 with --workload seed].
    #[arg(long, short = 'c', env = "KV_BENCH_CONCURRENCY")]
    pub concurrency: Option<usize>,

    /// Operation weights, e.g. set=1,get=8 (names: set|put, get, delete|del).
    #[arg(long, env = "KV_BENCH_MIX", default_value = "set=1,get=1,delete=1")]
    pub mix: Mix,

    /// Number of distinct keys (the key space); each worker owns keys/concurrency of them.
    #[arg(long, env = "KV_BENCH_KEYS", default_value_t = 10_000)]
    pub keys: u64,

    /// Length of each value in bytes (a JSON string of this many characters).
    #[arg(long, env = "KV_BENCH_VALUE_SIZE", default_value_t = 100)]
    pub value_size: usize,

    /// Key popularity: uniform, or zipf[:s] (default s=0.99).
    #[arg(long, env = "KV_BENCH_DISTRIBUTION", default_value = "uniform")]
    pub distribution: Distribution,

    /// Run the workload this long before measuring (not counted).
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_BENCH_WARMUP", default_value = "0s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Set every key once before measuring, so GETs find values.
    #[arg(long, env = "KV_BENCH_PRELOAD")]
    pub preload: bool,

    /// The keys outlive the run: no clean-up at its end, and a key this run
    /// has not written yet may hold a value from an earlier run (a GET of
    /// it accepts any value, or 404). For a data set loaded once
    /// (`--preload --keep-keys`) and read by later runs given the same
    /// --prefix and --keys (any --concurrency).
    #[arg(long, env = "KV_BENCH_KEEP_KEYS")]
    pub keep_keys: bool,

    /// End the measurement early, and report it as usual, once this file
    /// exists (looked for every 50 ms; --duration or --requests still bound
    /// the run). For scripts that measure "until something happened", such
    /// as a layout change settling. A file there at the start ends the run
    /// at once.
    #[arg(long, env = "KV_BENCH_STOP_FILE")]
    pub stop_file: Option<PathBuf>,

    /// Open loop: send this many requests per second in total, on a fixed
    /// schedule, and report latency corrected for coordinated omission
    /// beside the raw figures.
    #[arg(long, env = "KV_BENCH_RATE")]
    pub rate: Option<f64>,

    /// A request that takes longer than this counts as a timeout.
    /// Takes a duration such as 500ms, 30s or 2m.
    #[arg(long, env = "KV_BENCH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Against a replicated cluster (nodes that answer GET /-/shards): how
    /// long a request waits for its shard to have a leader before it counts
    /// as failed (503). Meanwhile the shard table is refreshed every 50ms.
    /// Takes a duration such as 500ms, 3s or 1m.
    #[arg(long, env = "KV_BENCH_LEADER_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub leader_wait: Duration,

    /// Append every figure to FILE as JSON, one object per run and line
    /// (earlier lines are kept: delete the file to start afresh).
    #[arg(long, env = "KV_BENCH_JSON")]
    pub json: Option<PathBuf>,

    /// Exit 0 even when answers were wrong or requests failed.
    #[arg(long, env = "KV_BENCH_ALLOW_ERRORS")]
    pub allow_errors: bool,

    /// Key prefix; each run adds its own suffix [default: kvb<random>].
    #[arg(long, env = "KV_BENCH_PREFIX")]
    pub prefix: Option<String>,

    /// Seed of the operation and key choices (same seed, same sequence).
    #[arg(long, env = "KV_BENCH_RNG_SEED", default_value_t = 1)]
    pub rng_seed: u64,

    /// HTTP client: `lean`, a minimal HTTP/1.1 client that allocates
    /// nothing per request and costs less CPU per request than wrk
    /// (Content-Length-framed answers only, which kv-node, kv-proxy and
    /// nginx give), or `hyper`, hyper's client::conn (any framing, ~40% more
    /// CPU per request).
    #[arg(long, env = "KV_BENCH_CLIENT", value_enum, default_value_t = ClientKind::Lean)]
    pub client: ClientKind,

    /// Runtime worker threads [default: one per CPU].
    #[arg(long, env = "KV_BENCH_THREADS")]
    pub threads: Option<usize>,

    /// No live progress line (it is shown only on a terminal anyway).
    #[arg(long, short = 'q', env = "KV_BENCH_QUIET")]
    pub quiet: bool,

    /// Record every operation (client, op, key, value, invoke and return
    /// times in ns, outcome ok|fail|unknown) to FILE as JSON lines, for
    /// `kv-bench check-history FILE`. The file is emptied first; each run's
    /// operations are buffered (48 bytes each) and appended when it ends,
    /// or when SIGINT/SIGTERM stops it (requests in flight finish first).
    #[arg(long, env = "KV_BENCH_HISTORY")]
    pub history: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands; without one, kv-bench runs the benchmark.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Check a --history file for linearizability, key by key, against a
    /// register with delete; exit 0 when every key is linearizable, 1 when
    /// any is not (or is too large to check), 2 when the file is unreadable.
    CheckHistory(CheckHistoryArgs),
    /// Watch a cluster's layout change (`GET /-/cluster`) until it settles:
    /// a progress bar on a terminal, a line per change otherwise. Exit 0
    /// when settled, 1 naming the open moves at --timeout, 2 when no node
    /// answers with the cluster's state.
    ClusterWatch(ClusterWatchArgs),
}

/// `kv-bench cluster-watch`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterWatchArgs {
    /// Any member, HOST:PORT (or a URL); the others, learnt from its
    /// answer, are asked when it stops answering.
    #[arg(long, env = "KV_WATCH_NODE")]
    pub node: String,

    /// Give up (exit 1, naming the open moves) when not settled by then.
    #[arg(long, env = "KV_WATCH_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Settled counts only at this placement version or newer: for a
    /// watch started before the change it follows is applied (the version
    /// a POST or DELETE /-/cluster/members answered).
    #[arg(long, env = "KV_WATCH_MIN_VERSION", default_value_t = 0)]
    pub min_version: u64,

    /// How often to ask.
    #[arg(long, env = "KV_WATCH_EVERY", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub every: Duration,
}

/// `kv-bench check-history`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckHistoryArgs {
    /// The history (JSON lines, as --history writes them).
    pub file: PathBuf,

    /// Search steps allowed per key; a key that needs more is reported
    /// "too large to check", as is one whose search would take more than
    /// 1 GiB (up to ~100 bytes plus a bit per operation of the key per step).
    #[arg(long, env = "KV_BENCH_MAX_STEPS", default_value_t = 1_000_000)]
    pub max_steps: u64,

    /// Print only the keys that are not linearizable, and the summary.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Which operation sequence a run sends.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Mix,
    Seed,
}

/// Operation weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mix {
    pub set: u32,
    pub get: u32,
    pub delete: u32,
}

impl Mix {
    pub fn total(&self) -> u32 {
        self.set + self.get + self.delete
    }
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut mix = Mix {
            set: 0,
            get: 0,
            delete: 0,
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not name=weight"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("weight of `{name}` is not a whole number: `{weight}`"))?;
            let slot = match name.trim().to_ascii_lowercase().as_str() {
                "set" | "put" => &mut mix.set,
                "get" => &mut mix.get,
                "delete" | "del" => &mut mix.delete,
                other => return Err(format!("unknown operation `{other}` (set, get, delete)")),
            };
            *slot = weight;
        }
        if mix.total() == 0 {
            return Err("the mix needs at least one operation with a weight above 0".into());
        }
        if u64::from(mix.set) + u64::from(mix.get) + u64::from(mix.delete) > u64::from(u32::MAX) {
            return Err("weights are too large".into());
        }
        Ok(mix)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "set={},get={},delete={}",
            self.set, self.get, self.delete
        )
    }
}

/// Key popularity.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    /// Zipf with exponent `s`: rank r is chosen with weight 1/(r+1)^s.
    Zipf(f64),
}

/// The exponent `zipf` means without one (YCSB's default).
pub const DEFAULT_ZIPF_S: f64 = 0.99;

impl FromStr for Distribution {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        if text == "uniform" {
            return Ok(Distribution::Uniform);
        }
        let Some(rest) = text.strip_prefix("zipf") else {
            return Err(format!("unknown distribution `{text}` (uniform, zipf[:s])"));
        };
        if rest.is_empty() {
            return Ok(Distribution::Zipf(DEFAULT_ZIPF_S));
        }
        let s = rest
            .strip_prefix(':')
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| format!("zipf exponent must be a positive number: `{text}`"))?;
        Ok(Distribution::Zipf(s))
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distribution::Uniform => write!(f, "uniform"),
            Distribution::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Requests(u64),
    Duration(Duration),
}

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Route client-side over these nodes; run with 1, 2, ... `nodes.len()` of them.
    Nodes(Vec<String>),
    /// Spawn this many local nodes, then as `Nodes`.
    Spawn(usize),
    /// Everything through one proxy.
    Proxy(String),
}

/// The configuration with every default resolved and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub workload: WorkloadKind,
    pub stop: Stop,
    pub concurrency: usize,
    pub mix: Mix,
    pub keys: u64,
    pub value_size: usize,
    pub distribution: Distribution,
    pub warmup: Duration,
    pub preload: bool,
    /// `--keep-keys`.
    pub keep_keys: bool,
    pub rate: Option<f64>,
    pub timeout: Duration,
    /// `--leader-wait`.
    pub leader_wait: Duration,
    pub rng_seed: u64,
    pub client: ClientKind,
    /// Record every operation (`--history`).
    pub history: bool,
}

/// Smallest value: 16 hex digits of the write's sequence number.
pub const MIN_VALUE_SIZE: usize = 16;

impl Config {
    /// Resolves workload-dependent defaults and rejects inconsistent flags.
    /// `Bearer <token>` for every request, from --auth-token-file or
    /// KV_AUTH_TOKEN, if either is set.
    pub fn authorization(&self) -> Result<Option<hyper::header::HeaderValue>, String> {
        let args = kv_http::auth::AuthArgs {
            auth_token_file: self.auth_token_file.clone(),
            ..Default::default()
        };
        args.token()
            .map(|token| token.map(|t| t.authorization()))
            .map_err(|e| e.to_string())
    }

    /// Loads --tls-ca, and makes it what `https://` endpoints connect with.
    pub fn install_tls(&self) -> Result<(), String> {
        let args = kv_http::tls::TlsArgs {
            tls_ca: self.tls_ca.clone(),
            ..Default::default()
        };
        if let Some(tls) = args.load().map_err(|e| e.to_string())? {
            crate::client::set_tls(tls);
        }
        Ok(())
    }

    pub fn plan(&self) -> Result<Plan, String> {
        let seed = self.workload == WorkloadKind::Seed;
        let concurrency = self.concurrency.unwrap_or(if seed { 250 } else { 64 });
        if concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        let stop = match (self.requests, self.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, Some(d)) => Stop::Duration(d),
            (None, None) if seed => Stop::Requests(600),
            (None, None) => Stop::Duration(Duration::from_secs(10)),
        };
        if seed {
            if matches!(stop, Stop::Duration(_)) {
                return Err(
                    "--workload seed runs a number of requests (--requests), not a duration".into(),
                );
            }
            if self.rate.is_some() {
                return Err("--workload seed runs in batches; --rate needs --workload mix".into());
            }
            if self.stop_file.is_some() {
                return Err(
                    "--stop-file needs --workload mix (the seed workload runs in batches)".into(),
                );
            }
            if self.keep_keys {
                return Err(
                    "--keep-keys needs --workload mix (the seed workload deletes its keys itself)"
                        .into(),
                );
            }
        }
        if self.keep_keys && self.history.is_some() {
            // check-history assumes every key starts absent.
            return Err(
                "--history assumes the keys start absent; it cannot be used with --keep-keys"
                    .into(),
            );
        }
        if stop == Stop::Requests(0) {
            return Err("--requests must be at least 1".into());
        }
        if !seed && self.keys < concurrency as u64 {
            return Err(format!(
                "--keys ({}) must be at least --concurrency ({concurrency}): each worker owns its own keys so every answer can be checked exactly",
                self.keys
            ));
        }
        if self.value_size < MIN_VALUE_SIZE {
            return Err(format!("--value-size must be at least {MIN_VALUE_SIZE}"));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("--rate must be a positive number of requests per second".into());
            }
        }
        let target = if let Some(proxy) = &self.proxy {
            Target::Proxy(proxy.clone())
        } else if self.spawn {
            let nodes = self.nodes.unwrap_or(1);
            if nodes == 0 {
                return Err("--nodes must be at least 1".into());
            }
            Target::Spawn(nodes)
        } else if !self.urls.is_empty() {
            let mut urls: Vec<String> = self.urls.iter().map(|u| u.trim().to_owned()).collect();
            // --nodes may pick a prefix of --urls; it defaults to all of them.
            let nodes = self.nodes.unwrap_or(urls.len());
            if nodes == 0 || nodes > urls.len() {
                return Err(format!("--nodes {nodes} but {} --urls given", urls.len()));
            }
            urls.truncate(nodes);
            Target::Nodes(urls)
        } else {
            let nodes = self.nodes.unwrap_or(1);
            if nodes == 0 {
                return Err("--nodes must be at least 1".into());
            }
            let last = u32::from(self.base_port) as u64 + nodes as u64 - 1;
            if last > u64::from(u16::MAX) {
                return Err("--base-port + --nodes goes past port 65535".into());
            }
            Target::Nodes(
                (0..nodes)
                    .map(|i| {
                        // https:// when the nodes' CA is given (--tls-ca).
                        let scheme = if self.tls_ca.is_some() {
                            "https"
                        } else {
                            "http"
                        };
                        format!("{scheme}://{}:{}", self.host, self.base_port as usize + i)
                    })
                    .collect(),
            )
        };
        Ok(Plan {
            target,
            workload: self.workload,
            stop,
            concurrency,
            mix: self.mix,
            keys: self.keys,
            value_size: self.value_size,
            distribution: self.distribution,
            warmup: self.warmup,
            preload: self.preload,
            keep_keys: self.keep_keys,
            rate: self.rate,
            timeout: self.timeout,
            leader_wait: self.leader_wait,
            rng_seed: self.rng_seed,
            client: self.client,
            history: self.history.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut argv = vec!["kv-bench"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .plan()
    }

    #[test]
    fn defaults() {
        let p = plan(&[]).unwrap();
        assert_eq!(
            p.target,
            Target::Nodes(vec!["http://127.0.0.1:8081".into()])
        );
        assert_eq!(p.stop, Stop::Duration(Duration::from_secs(10)));
        assert_eq!(p.concurrency, 64);
        assert_eq!(
            p.mix,
            Mix {
                set: 1,
                get: 1,
                delete: 1
            }
        );
        assert_eq!((p.keys, p.value_size), (10_000, 100));
        assert_eq!(p.distribution, Distribution::Uniform);
        assert_eq!(p.rate, None);
    }

    #[test]
    fn nodes_and_ports() {
        let p = plan(&["--nodes", "3", "--base-port", "9000"]).unwrap();
        assert_eq!(
            p.target,
            Target::Nodes(vec![
                "http://127.0.0.1:9000".into(),
                "http://127.0.0.1:9001".into(),
                "http://127.0.0.1:9002".into()
            ])
        );
        let p = plan(&["--urls", "a:1,b:2,c:3"]).unwrap();
        assert_eq!(
            p.target,
            Target::Nodes(vec!["a:1".into(), "b:2".into(), "c:3".into()])
        );
        let p = plan(&["--urls", "a:1,b:2,c:3", "--nodes", "2"]).unwrap();
        assert_eq!(p.target, Target::Nodes(vec!["a:1".into(), "b:2".into()]));
        assert!(plan(&["--urls", "a:1", "--nodes", "2"]).is_err());
        assert!(plan(&["--nodes", "0"]).is_err());
        assert!(plan(&["--base-port", "65535", "--nodes", "2"]).is_err());
        assert_eq!(
            plan(&["--proxy", "http://127.0.0.1:8080"]).unwrap().target,
            Target::Proxy("http://127.0.0.1:8080".into())
        );
        assert_eq!(
            plan(&["--spawn", "--nodes", "3"]).unwrap().target,
            Target::Spawn(3)
        );
        assert!(plan(&["--spawn", "--proxy", "x:1"]).is_err());
        assert!(plan(&["--urls", "a:1", "--proxy", "x:1"]).is_err());
    }

    #[test]
    fn seed_has_the_flask_defaults() {
        let p = plan(&["--workload", "seed"]).unwrap();
        assert_eq!(p.stop, Stop::Requests(600));
        assert_eq!(p.concurrency, 250);
        let p = plan(&["--workload", "seed", "-n", "3000", "-c", "10"]).unwrap();
        assert_eq!((p.stop, p.concurrency), (Stop::Requests(3000), 10));
        assert!(plan(&["--workload", "seed", "--duration", "1s"]).is_err());
        assert!(plan(&["--workload", "seed", "--rate", "100"]).is_err());
    }

    #[test]
    fn workload_flags() {
        let p = plan(&[
            "-n",
            "500",
            "-c",
            "4",
            "--mix",
            "put=3, get=5",
            "--keys",
            "40",
            "--value-size",
            "1000",
            "--distribution",
            "zipf:1.2",
            "--warmup",
            "2s",
            "--rate",
            "1500",
            "--preload",
            "--timeout",
            "250ms",
        ])
        .unwrap();
        assert_eq!(p.stop, Stop::Requests(500));
        assert_eq!(
            p.mix,
            Mix {
                set: 3,
                get: 5,
                delete: 0
            }
        );
        assert_eq!(p.distribution, Distribution::Zipf(1.2));
        assert_eq!(p.warmup, Duration::from_secs(2));
        assert_eq!(p.rate, Some(1500.0));
        assert!(p.preload);
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert_eq!(
            plan(&["-d", "1m"]).unwrap().stop,
            Stop::Duration(Duration::from_secs(60))
        );
        assert_eq!(
            plan(&["--distribution", "zipf"]).unwrap().distribution,
            Distribution::Zipf(DEFAULT_ZIPF_S)
        );
    }

    #[test]
    fn bad_workload_flags() {
        assert!(plan(&["-n", "10", "-d", "1s"]).is_err());
        assert!(plan(&["-n", "0"]).is_err());
        assert!(plan(&["-c", "0"]).is_err());
        assert!(plan(&["--keys", "10", "-c", "64"]).is_err());
        assert!(plan(&["--value-size", "3"]).is_err());
        assert!(plan(&["--rate", "0"]).is_err());
        assert!(plan(&["--rate", "-5"]).is_err());
        assert!(plan(&["--mix", "get=0"]).is_err());
        assert!(plan(&["--mix", "get"]).is_err());
        assert!(plan(&["--mix", "jump=1"]).is_err());
        assert!(plan(&["--mix", "get=x"]).is_err());
        assert!(plan(&["--distribution", "pareto"]).is_err());
        // Kept keys may hold values the history checker cannot know of.
        assert!(plan(&["--keep-keys", "--history", "h.jsonl"]).is_err());
        assert!(plan(&["--keep-keys", "--workload", "seed"]).is_err());
        assert!(plan(&["--keep-keys", "--preload"]).unwrap().keep_keys);
        assert!(!plan(&[]).unwrap().keep_keys);
        assert!(plan(&["--distribution", "zipf:-1"]).is_err());
        assert!(plan(&["--workload", "other"]).is_err());
    }

    #[test]
    fn environment_variables_are_read() {
        // Parsed from an explicit environment-free argv plus clap's env
        // lookup is process-global, so only check the flag is declared.
        let command = <Config as clap::CommandFactory>::command();
        let concurrency = command
            .get_arguments()
            .find(|a| a.get_id() == "concurrency")
            .unwrap();
        assert_eq!(
            concurrency.get_env().and_then(|e| e.to_str()),
            Some("KV_BENCH_CONCURRENCY")
        );
    }
}
