//! A real replicated cluster for integration tests: `kv-node` processes
//! started with `--peers` on loopback ports, optionally a `kv-proxy` in
//! front, optionally a [`Relay`] on every node-to-node link.
//!
//! [`Cluster::start`] picks the members' ports first (bind `127.0.0.1:0`,
//! read the port, close; every node must know every peer's address before
//! any starts), starts every node, and waits until every shard has a leader
//! that every running node hosting it agrees on (`GET /-/shards`, bounded by
//! [`BOUND`]). Ports stay the same across [`Cluster::kill9`] and
//! [`Cluster::restart`], so peers, relays and the proxy find a restarted node
//! where it was.
//!
//! **Relays** (`ClusterOpts::relays`): node `a`'s traffic to peer `b` (Raft
//! messages and forwarded client requests alike) goes through its own relay
//! `(a, b)`, given to `a` as `--raft-route b=RELAY`. [`Cluster::partition`]
//! black-holes every link to and from one node (clients still reach it on
//! its own port); [`Cluster::heal`] lets everything pass again.
//!
//! Every wait is for a condition with a bound ([`wait_until`]); nothing
//! sleeps to synchronise. Processes are killed when the cluster is dropped.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kv_cluster::ShardsView;

use crate::{binary, exchange, Process, Relay, Response};

/// Bound on every wait here (elections, catching up): generous for a
/// loaded 2-core machine running debug builds; tests assert outcomes, and
/// this only turns a hang into a failure.
pub const BOUND: Duration = Duration::from_secs(20);

/// How a test cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// `--shards`: few, so that every node leads some and waits stay short.
    pub shards: u32,
    /// Extra `kv-node` arguments for every node.
    pub extra: Vec<String>,
    /// Route every node-to-node link through its own [`Relay`].
    pub relays: bool,
    /// Start a `kv-proxy` in front of the nodes, with these extra arguments.
    pub proxy: Option<Vec<String>>,
    /// The members' ports, in id order, instead of fresh ones: a second
    /// cluster on another's ports has the same member ids and addresses
    /// (the first must be stopped), for data-dir swap tests.
    pub ports: Option<Vec<u16>>,
    /// A cluster token (issue 14): written to [`Cluster::token_file`] and
    /// given to every node and the proxy with `--auth-token-file`; the
    /// cluster's own requests (`/-/shards`) carry it.
    pub token: Option<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            shards: 8,
            extra: Vec::new(),
            relays: false,
            proxy: None,
            ports: None,
            token: None,
        }
    }
}

/// A running test cluster; see the module docs.
pub struct Cluster {
    dir: tempfile::TempDir,
    replicas: usize,
    opts: ClusterOpts,
    ports: BTreeMap<u64, u16>,
    nodes: BTreeMap<u64, Option<Process>>,
    /// `(from, to)` → the relay `from` sends to `to` through.
    relays: BTreeMap<(u64, u64), Relay>,
    proxy: Option<Process>,
}

/// Polls `condition` until it holds, panicking after `bound`.
pub fn wait_until(what: &str, bound: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {bound:?}: {what}");
        // Polling a condition, not synchronising on time.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request with extra headers on a fresh connection (`Connection:
/// close`), 10 s I/O timeout.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<Response> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    raw.push_str("\r\n");
    raw.push_str(body.unwrap_or(""));
    exchange(addr, raw.as_bytes())
}

/// Ports that were free a moment ago (bound, then released): any the
/// system picks (port 0), or, with `KV_TEST_PORTS=LOW-HIGH` set (a machine
/// shared by test runs that were each given a range), ones in that range.
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = match std::env::var("KV_TEST_PORTS") {
        Ok(range) => ports_in(&range, count),
        Err(_) => (0..count)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
            .collect(),
    };
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// `count` listeners on free ports of `range` (`LOW-HIGH`), tried from a
/// point that differs per process and per call, so concurrent tests rarely
/// race for the same port.
fn ports_in(range: &str, count: usize) -> Vec<TcpListener> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let (low, high) = range
        .split_once('-')
        .and_then(|(low, high)| {
            Some((
                low.trim().parse::<u16>().ok()?,
                high.trim().parse::<u16>().ok()?,
            ))
        })
        .filter(|(low, high)| low <= high)
        .unwrap_or_else(|| panic!("KV_TEST_PORTS={range}: expected LOW-HIGH"));
    let span = u32::from(high - low) + 1;
    let start = std::process::id().wrapping_mul(7919)
        + CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(97);
    let listeners: Vec<TcpListener> = (0..span)
        .filter_map(|i| {
            let port = low + ((start.wrapping_add(i)) % span) as u16;
            TcpListener::bind(("127.0.0.1", port)).ok()
        })
        .take(count)
        .collect();
    assert_eq!(
        listeners.len(),
        count,
        "KV_TEST_PORTS={range}: not {count} free ports"
    );
    listeners
}

impl Cluster {
    /// Starts members `1..=members` with `--replicas replicas`, then the
    /// proxy if asked, and waits for every shard to have an agreed leader.
    pub fn start(members: u64, replicas: usize, opts: ClusterOpts) -> Cluster {
        let mut cluster = Cluster::create(members, replicas, opts);
        cluster.start_all();
        cluster
    }

    /// Members on fresh ports (and their relays), none started yet: a test
    /// may prepare a member's data dir ([`Cluster::data_dir`], e.g. mount a
    /// small filesystem there) before [`Cluster::start_all`].
    pub fn create(members: u64, replicas: usize, opts: ClusterOpts) -> Cluster {
        Cluster::new(members, replicas, opts)
    }

    /// Starts every member, waits for every shard to have an agreed
    /// leader, then starts the proxy if asked.
    pub fn start_all(&mut self) {
        let cluster = self;
        for id in cluster.members() {
            cluster.restart(id);
        }
        cluster.wait_for_leaders(BOUND);
        if let Some(extra) = cluster.opts.proxy.clone() {
            let nodes = cluster
                .ports
                .values()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut args = vec![
                "--port".to_owned(),
                "0".to_owned(),
                "--nodes".to_owned(),
                nodes,
            ];
            args.extend(cluster.token_args());
            args.extend(extra);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.proxy = Some(Process::spawn(&binary("kv-proxy"), &args));
        }
    }

    /// Members on fresh ports (and their relays), none started yet.
    fn new(members: u64, replicas: usize, opts: ClusterOpts) -> Cluster {
        let ports = opts
            .ports
            .clone()
            .unwrap_or_else(|| free_ports(members as usize));
        let ports: BTreeMap<u64, u16> = (1..=members).zip(ports).collect();
        let mut relays = BTreeMap::new();
        if opts.relays {
            for from in 1..=members {
                for to in (1..=members).filter(|to| *to != from) {
                    let port = ports.get(&to).copied().expect("every member has a port");
                    let target = SocketAddr::from(([127, 0, 0, 1], port));
                    relays.insert((from, to), Relay::start(target).expect("start a relay"));
                }
            }
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        if let Some(token) = &opts.token {
            std::fs::write(dir.path().join("token"), format!("{token}\n"))
                .expect("write the token");
        }
        Cluster {
            dir,
            replicas,
            opts,
            nodes: (1..=members).map(|id| (id, None)).collect(),
            ports,
            relays,
            proxy: None,
        }
    }

    /// The members' ports, in id order (see [`ClusterOpts::ports`]).
    pub fn ports(&self) -> Vec<u16> {
        self.ports.values().copied().collect()
    }

    /// Member ids.
    pub fn members(&self) -> Vec<u64> {
        self.ports.keys().copied().collect()
    }

    /// `--peers` for every node.
    pub fn peers(&self) -> String {
        self.ports
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    /// Node `id`'s write-ahead log segments (`wal-*.log`), oldest first,
    /// for tests that damage them.
    pub fn wal_segments(&self, id: u64) -> Vec<PathBuf> {
        let mut segments: Vec<PathBuf> = std::fs::read_dir(self.data_dir(id))
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                    .filter(|path| {
                        path.file_name()
                            .map(|name| name.to_string_lossy())
                            .is_some_and(|name| name.starts_with("wal-") && name.ends_with(".log"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        segments.sort();
        segments
    }

    /// The file holding [`ClusterOpts::token`], read by each server when it
    /// starts (a test may rewrite it to start one node with another token).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// `--auth-token-file FILE` when the cluster has a token.
    fn token_args(&self) -> Vec<String> {
        match &self.opts.token {
            Some(_) => vec![
                "--auth-token-file".into(),
                self.token_file().to_string_lossy().into_owned(),
            ],
            None => Vec::new(),
        }
    }

    /// `Authorization: Bearer <token>` when the cluster has a token.
    pub fn auth_header(&self) -> Vec<(&'static str, String)> {
        self.opts
            .token
            .iter()
            .map(|token| ("Authorization", format!("Bearer {token}")))
            .collect()
    }

    /// The arguments node `id` is started with.
    pub fn args(&self, id: u64) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.addr(id).port().to_string(),
            "--data-dir".into(),
            self.data_dir(id).to_string_lossy().into_owned(),
            "--node-id".into(),
            id.to_string(),
            "--peers".into(),
            self.peers(),
            "--shards".into(),
            self.opts.shards.to_string(),
            "--replicas".into(),
            self.replicas.to_string(),
            "--exit-with-parent".into(),
            "--workers".into(),
            "2".into(),
        ];
        for ((from, to), relay) in &self.relays {
            if *from == id {
                args.push("--raft-route".into());
                args.push(format!("{to}={}", relay.addr()));
            }
        }
        args.extend(self.token_args());
        args.extend(self.opts.extra.iter().cloned());
        args
    }

    /// Replaces the extra `kv-node` arguments for nodes started from now on.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.opts.extra = extra.iter().map(|s| (*s).to_owned()).collect();
    }

    /// Starts node `id` (kill -9 first if it runs), on its port, with what
    /// its data dir holds; returns once it answers `/-/health`.
    pub fn restart(&mut self, id: u64) {
        self.kill9(id);
        let args = self.args(id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::spawn(&binary("kv-node"), &args);
        self.nodes.insert(id, Some(process));
    }

    /// Kill -9 node `id` (a crash), if it runs.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut process) = self.nodes.insert(id, None).flatten() {
            process.kill9();
        }
    }

    /// Whether node `id` exited by itself, and with what code (`None`: it
    /// runs, or was never started; `Some(None)`: killed by a signal).
    pub fn exit_code(&mut self, id: u64) -> Option<Option<i32>> {
        self.nodes.get_mut(&id)?.as_mut()?.try_exit_code()
    }

    /// Freezes node `id` (SIGSTOP): it stops answering anyone, its
    /// connections stay open. [`Cluster::thaw`] resumes it.
    pub fn freeze(&self, id: u64) {
        self.process(id).freeze();
    }

    /// Resumes a frozen node (SIGCONT).
    pub fn thaw(&self, id: u64) {
        self.process(id).thaw();
    }

    fn process(&self, id: u64) -> &Process {
        self.nodes
            .get(&id)
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("node {id} does not run"))
    }

    /// Node `id`'s client address (its own port, never a relay).
    pub fn addr(&self, id: u64) -> SocketAddr {
        let port = self
            .ports
            .get(&id)
            .copied()
            .unwrap_or_else(|| panic!("node {id} is not a member"));
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The proxy's address, when one was started.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy.as_ref().map(|p| p.addr)
    }

    /// The proxy's log so far (empty when none was started).
    pub fn proxy_log(&self) -> String {
        self.proxy.as_ref().map(Process::log).unwrap_or_default()
    }

    /// The ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, p)| p.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Node `id`'s log so far (empty when it does not run).
    pub fn log(&self, id: u64) -> String {
        self.nodes
            .get(&id)
            .and_then(Option::as_ref)
            .map(Process::log)
            .unwrap_or_default()
    }

    /// Node `id`'s `GET /-/shards`, `None` when it does not answer 200.
    pub fn shards(&self, id: u64) -> Option<ShardsView> {
        let auth = self.auth_header();
        let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let response = send(self.addr(id), "GET", "/-/shards", &headers, None).ok()?;
        if response.status != 200 {
            return None;
        }
        serde_json::from_slice(&response.body).ok()
    }

    /// Per shard, the leader that every node in `among` hosting it agrees
    /// on, once they all do and it is one of them.
    pub fn leaders_among(&self, among: &[u64]) -> Option<Vec<u64>> {
        let mut agreed: Vec<Option<u64>> = Vec::new();
        for id in among {
            let view = self.shards(*id)?;
            agreed.resize(view.groups.len(), None);
            for group in view.groups.iter().filter(|g| g.hosted) {
                let leader = group.leader?;
                if !among.contains(&leader) {
                    return None;
                }
                let slot = agreed.get_mut(group.shard as usize)?;
                match slot {
                    Some(other) if *other != leader => return None,
                    _ => *slot = Some(leader),
                }
            }
        }
        agreed.into_iter().collect()
    }

    /// [`Cluster::leaders_among`] the running nodes.
    pub fn leaders(&self) -> Option<Vec<u64>> {
        self.leaders_among(&self.running())
    }

    /// Waits (at most `bound`) until [`Cluster::leaders`] agree; returns them.
    pub fn wait_for_leaders(&self, bound: Duration) -> Vec<u64> {
        self.wait_for_leaders_among(&self.running(), bound)
    }

    /// Waits (at most `bound`) until [`Cluster::leaders_among`] agree.
    pub fn wait_for_leaders_among(&self, among: &[u64], bound: Duration) -> Vec<u64> {
        let mut found = None;
        wait_until(
            &format!("every shard has a leader among {among:?} that they agree on"),
            bound,
            || {
                found = self.leaders_among(among);
                found.is_some()
            },
        );
        found.unwrap_or_default()
    }

    /// The running node leading the most shards now (agreed leaders,
    /// waited for within [`BOUND`]; the lowest id on a tie).
    pub fn leader_of_most_shards(&self) -> u64 {
        let leaders = self.wait_for_leaders(BOUND);
        let running = self.running();
        let mut best = (0, 0);
        for id in running {
            let led = leaders.iter().filter(|l| **l == id).count();
            if led > best.1 || best.0 == 0 {
                best = (id, led);
            }
        }
        best.0
    }

    /// Waits until node `id`'s replica of every shard has applied at least
    /// what the shard's leader had committed when this was called.
    pub fn wait_caught_up(&self, id: u64, bound: Duration) {
        let leaders = self.wait_for_leaders(bound);
        let target: Vec<u64> = leaders
            .iter()
            .enumerate()
            .map(|(shard, leader)| {
                let view = self.shards(*leader).expect("the leader answers /-/shards");
                view.groups
                    .get(shard)
                    .and_then(|g| g.committed)
                    .unwrap_or(0)
            })
            .collect();
        wait_until(
            &format!("node {id} applied what the leaders had committed ({target:?})"),
            bound,
            || {
                self.shards(id).is_some_and(|view| {
                    view.groups.iter().filter(|g| g.hosted).all(|g| {
                        let committed = target
                            .get(g.shard as usize)
                            .expect("a shard the leaders were asked about");
                        g.applied.unwrap_or(0) >= *committed
                    })
                })
            },
        );
    }

    /// `GET /-/shards/<shard>/digest` on every running node hosting it:
    /// `(node, keys, digest)`.
    pub fn digests(&self, shard: u32) -> Vec<(u64, serde_json::Value, serde_json::Value)> {
        let path = format!("/-/shards/{shard}/digest");
        self.running()
            .into_iter()
            .filter_map(|id| {
                let auth = self.auth_header();
                let headers: Vec<(&str, &str)> =
                    auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let response = send(self.addr(id), "GET", &path, &headers, None).ok()?;
                if response.status != 200 {
                    return None;
                }
                let json: serde_json::Value = serde_json::from_slice(&response.body).ok()?;
                let field = |name| json.get(name).cloned().unwrap_or_default();
                Some((id, field("keys"), field("digest")))
            })
            .collect()
    }

    /// The sum over all label sets of metric `name` on node `id`.
    pub fn metric_sum(&self, id: u64, name: &str) -> u64 {
        let auth = self.auth_header();
        let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let Ok(response) = send(self.addr(id), "GET", "/-/metrics", &headers, None) else {
            return 0;
        };
        response
            .text()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Cuts node `id` off from its peers: every link to and from it is
    /// black-holed (bytes held, nothing delivered, no error). Clients still
    /// reach it. Needs `relays`.
    pub fn partition(&self, id: u64) {
        assert!(
            !self.relays.is_empty(),
            "partition needs ClusterOpts::relays"
        );
        for ((from, to), relay) in &self.relays {
            if *from == id || *to == id {
                relay.blackhole();
            }
        }
    }

    /// Slows every link to and from node `id`: each chunk is held `delay`
    /// in each direction (a request to or from it and its answer take
    /// `2 * delay` more). Clients still reach it directly. Needs `relays`.
    pub fn delay_links(&self, id: u64, delay: Duration) {
        assert!(
            !self.relays.is_empty(),
            "delay_links needs ClusterOpts::relays"
        );
        for ((from, to), relay) in &self.relays {
            if *from == id || *to == id {
                relay.set_delay(delay);
            }
        }
    }

    /// Every link passes again (held bytes go on).
    pub fn heal(&self) {
        for relay in self.relays.values() {
            relay.pass();
        }
    }

    /// Lines of every running node's log that look like trouble, for a
    /// failure message.
    pub fn trouble(&self) -> String {
        let mut out = String::new();
        for id in self.running() {
            for line in self
                .log(id)
                .lines()
                .filter(|l| l.contains("panick") || l.contains("ERROR") || l.contains("WARN"))
            {
                out.push_str(&format!("node {id}: {line}\n"));
            }
        }
        out
    }
}
