//! Issue 13's "under load" tests (`docs/membership.md` §4, §6, §8, §9): a
//! node added to, then a node removed from, a live 3-replica cluster while
//! concurrent clients go through a `kv-proxy` started before the change,
//! every answer checked.
//!
//! The clients (`support`'s recording [`Client`]s) do GET/PUT/DELETE on
//! four keys per shard through the proxy; every operation goes into a
//! [`History`]. Each test asserts:
//! * **no failed request**: the proxy retries what is safe to retry (a 421
//!   or 503 given before anything was proposed) within its `--leader-wait`,
//!   so a client sees only 200/404, or a 504 (outcome unknown, recorded as
//!   such in the history; counted and printed);
//! * **no acknowledged write lost and linearizable histories**: after the
//!   change a final read of every key joins the history, and kv-bench's
//!   checker decides every key; keys written before the change read back on
//!   every node and through the proxy;
//! * **the moves are the ring's diff**: `kv_cluster_moves_done` on every
//!   node equals `replicas_to_move(placement_over(before),
//!   placement_over(after))`, each move finished once and each replaced
//!   replica dropped once;
//! * **progress is monotone** ([`Poller`]): a thread polling `GET
//!   /-/cluster` on one node that stays sees the version never decrease,
//!   `kv_cluster_moves_done` never decrease, `moves.done` never decrease
//!   within the change, a move never go back a phase nor come back once
//!   done, and a move's `bytes` and `percent` never decrease while it is
//!   copying under one executor (they live in the executing leader's memory
//!   and restart with a new leader, §4.6);
//! * **every shard ends with `replicas` copies on the ring's placement**:
//!   every node's voters of every shard, hosting and digests
//!   ([`assert_placed`]);
//! * **the proxy follows without a restart**: its `/-/proxy/shards` shows
//!   the new layout's version and members, and (add) requests reach node 4
//!   through it (`kv_proxy_forwarded_total{node=...}`).
//!
//! The add test also starts a second proxy after the change, given only node
//! 4's address: it serves every key and names the same leader for every
//! shard as the first (`crates/kv-proxy/tests/seed.rs` checks two proxies
//! on a cluster that never changed). The remove test removes the node
//! leading the most shards, which must hand every leadership over, and
//! expects it to exit 0 by itself.
//!
//! Snapshots are paced (`--move-bytes-per-sec`) so that copies last long
//! enough for the poller to see their progress. Every wait is for a
//! condition with a bound (`BOUND`, or `SETTLE` for a whole rebalance).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kv_bench::linearizability::Input;
use kv_cluster::{placement_over, ClusterView, MemberState, Phase, TableView};
use kv_testkit::cluster::{free_ports, send, wait_until, BOUND};
use kv_testkit::{binary, Cluster, ClusterOpts, Process};
use support::membership::{
    assert_dropped, assert_moves_finished, assert_placed, assert_readable, join, metric, view,
    wait_agreed, wait_settled, write_keys,
};
use support::{key_per_shard, Answer, History, Load};

const SHARDS: u32 = 8;
/// Concurrent clients through the proxy.
const CLIENTS: usize = 6;
/// Keys per shard the clients work on: few enough that each key's history
/// has many overlapping operations, enough to spread over every shard.
const KEYS_PER_SHARD: usize = 4;

/// The node flags: snapshots sent at 20 kB/s per node, so that a shard's
/// copy (the preloaded 25 kB or so) takes about a second.
fn opts() -> ClusterOpts {
    ClusterOpts {
        shards: SHARDS,
        extra: vec!["--move-bytes-per-sec".into(), "20000".into()],
        proxy: Some(Vec::new()),
        ..ClusterOpts::default()
    }
}

/// What the clients were answered, besides the history.
#[derive(Default)]
struct Tally {
    /// Requests that failed: refused (4xx other than 404, 421, 503) or, for
    /// a read, not answered.
    failed: Mutex<Vec<String>>,
    /// Unknown outcomes by status (0: the connection broke).
    unknown: Mutex<BTreeMap<u16, u64>>,
    /// Answers of each status.
    statuses: Mutex<BTreeMap<u16, u64>>,
}

/// `CLIENTS` recording clients through `proxy` on `keys` until stopped:
/// half reads, 40% writes of unique values, 10% deletes.
fn start_load(
    proxy: SocketAddr,
    keys: Arc<Vec<String>>,
    history: Arc<History>,
    tally: Arc<Tally>,
) -> Load {
    let values = Arc::new(AtomicU32::new(1));
    Load::start(CLIENTS, move |i, stop| {
        let mut client = history.client();
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ (i as u64 + 1);
        while !stop.load(Ordering::SeqCst) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let key = &keys[(rng % keys.len() as u64) as usize];
            let input = match (rng >> 16) % 10 {
                0..=4 => Input::Get,
                5..=8 => Input::Put(values.fetch_add(1, Ordering::SeqCst)),
                _ => Input::Delete,
            };
            let (answer, _, _) = client.timed(proxy, key, input);
            *tally
                .statuses
                .lock()
                .unwrap()
                .entry(client.last_status)
                .or_default() += 1;
            match answer {
                Answer::Ok(_) => {}
                Answer::Fail(status) => tally
                    .failed
                    .lock()
                    .unwrap()
                    .push(format!("{input:?} {key}: {status}")),
                Answer::Unknown => {
                    *tally
                        .unknown
                        .lock()
                        .unwrap()
                        .entry(client.last_status)
                        .or_default() += 1;
                }
            }
        }
    })
}

/// Stops the load, reads every key once more through `proxy` into the
/// history (so a lost acknowledged write shows as a violation), and checks
/// every key's history; returns a summary to print.
fn finish_load(
    load: Load,
    cluster: &Cluster,
    keys: &[String],
    history: &Arc<History>,
    tally: &Tally,
) -> String {
    load.stop();
    let proxy = cluster.proxy_addr().expect("a proxy");
    // What went wrong where, for a failure message.
    let trouble = || {
        let proxy_log: String = cluster
            .proxy_log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(|l| format!("proxy: {l}\n"))
            .collect();
        format!("{proxy_log}{}", cluster.trouble())
    };
    let mut reader = history.client();
    for key in keys {
        let answer = reader.get(proxy, key);
        assert!(
            matches!(answer, Answer::Ok(_)),
            "final GET {key} via the proxy: {answer:?} ({})\n{}",
            reader.last_status,
            trouble()
        );
    }
    let failed = tally.failed.lock().unwrap().clone();
    let unknown = tally.unknown.lock().unwrap().clone();
    let statuses = tally.statuses.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} requests failed through the proxy (answers by status {statuses:?}): {:#?}\n{}",
        failed.len(),
        &failed[..failed.len().min(20)],
        trouble()
    );
    let checked = history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("histories not linearizable: {e}\n{}", trouble()));
    // How much the proxy's safe retries had to do (reported: how often
    // depends on timing).
    let retries: Vec<String> = [
        "kv_proxy_not_leader_total",
        "kv_proxy_leader_waits_total",
        "kv_proxy_no_leader_total",
        "kv_proxy_outcome_unknown_total",
    ]
    .iter()
    .map(|name| format!("{name} {}", metric(proxy, name)))
    .collect();
    format!(
        "{} operations acknowledged on {checked} keys, answers by status {statuses:?}, \
         unknown outcomes by status {unknown:?} (0: connection broke); proxy: {}",
        history.acknowledged(),
        retries.join(", ")
    )
}

/// `KEYS_PER_SHARD` keys in every shard.
fn load_keys(prefix: &str) -> Arc<Vec<String>> {
    Arc::new(
        (0..KEYS_PER_SHARD)
            .flat_map(|k| key_per_shard(&format!("{prefix}{k}"), SHARDS))
            .collect(),
    )
}

/// One poll of the node watched by a [`Poller`].
#[derive(Debug, Clone)]
struct Sample {
    view: ClusterView,
    /// The node's `kv_cluster_moves_done` (moves finished since bootstrap).
    done: u64,
}

/// A thread polling `GET /-/cluster` and `kv_cluster_moves_done` on one
/// node (every 100 ms: a poll, not a synchronisation) until stopped.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Poller {
    fn start(addr: SocketAddr) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                // Metric first: a view read after it can only show as many
                // finished moves or more.
                let done = metric(addr, "kv_cluster_moves_done");
                if let Some(view) = view(addr) {
                    samples.push(Sample { view, done });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Poller { stop, thread }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the poller panicked")
    }
}

/// A move: its shard and id (the version that planned it, unique per shard
/// only).
type MoveId = (u32, u64);

/// Checks that `samples` (one node's, in order) show monotone progress
/// (module docs); returns a summary to print.
fn assert_monotone(samples: &[Sample]) -> String {
    assert!(
        samples.iter().any(|s| !s.view.settled),
        "the poller never saw the change in progress: {samples:?}"
    );
    let phase_rank = |phase: Phase| match phase {
        Phase::Planned => 0,
        Phase::Copying => 1,
        Phase::Joint => 2,
    };
    // Each move's highest phase so far; moves seen active, then gone
    // (done).
    let mut phases: BTreeMap<MoveId, u8> = BTreeMap::new();
    let mut finished: BTreeSet<MoveId> = BTreeSet::new();
    // (move, executor) → the highest bytes and percent seen copying.
    let mut progress: BTreeMap<(MoveId, Option<u64>), (u64, u8)> = BTreeMap::new();
    let mut with_bytes = 0usize;
    let mut executors = BTreeMap::<MoveId, BTreeSet<u64>>::new();
    for pair in samples.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            after.view.version >= before.view.version,
            "the version went back: {before:?} then {after:?}"
        );
        assert!(
            after.done >= before.done,
            "kv_cluster_moves_done went back: {before:?} then {after:?}"
        );
        if !before.view.settled && !after.view.settled {
            assert!(
                after.view.moves.done >= before.view.moves.done,
                "moves.done went back within the change: {before:?} then {after:?}"
            );
        }
    }
    for sample in samples {
        let active: BTreeSet<MoveId> = sample
            .view
            .active
            .iter()
            .map(|m| (m.shard, m.move_id))
            .collect();
        for gone in phases.keys().filter(|id| !active.contains(id)) {
            finished.insert(*gone);
        }
        for mv in &sample.view.active {
            let id = (mv.shard, mv.move_id);
            assert!(
                !finished.contains(&id),
                "move {id:?} (shard, id) came back after it was done: {sample:?}"
            );
            let rank = phase_rank(mv.phase);
            let highest = phases.entry(id).or_insert(rank);
            assert!(
                rank >= *highest,
                "move {id:?} (shard, id) went back to {:?}: {sample:?}",
                mv.phase
            );
            *highest = rank;
            if let Some(leader) = mv.leader {
                executors.entry(id).or_default().insert(leader);
            }
            if mv.phase != Phase::Copying {
                continue;
            }
            if let (Some(bytes), Some(percent)) = (mv.bytes, mv.percent) {
                with_bytes += usize::from(bytes > 0);
                let seen = progress.entry((id, mv.leader)).or_insert((0, 0));
                assert!(
                    bytes >= seen.0 && percent >= seen.1,
                    "move {id:?} (shard, id) went back from {} bytes ({}%) to {bytes} \
                     ({percent}%) under executor {:?}: {sample:?}",
                    seen.0,
                    seen.1,
                    mv.leader
                );
                *seen = (bytes, percent);
            }
        }
    }
    assert!(
        with_bytes > 0,
        "no copying move ever showed bytes sent: the progress check checked nothing"
    );
    let changed_executor = executors.values().filter(|e| e.len() > 1).count();
    format!(
        "{} polls, versions {}..{}, {} moves seen, {with_bytes} polls of a copy with bytes, \
         {changed_executor} moves that changed leader while open",
        samples.len(),
        samples[0].view.version,
        samples[samples.len() - 1].view.version,
        phases.len()
    )
}

/// The proxy's shard table, once it answers 200.
fn table(proxy: SocketAddr) -> Option<TableView> {
    let response = send(proxy, "GET", "/-/proxy/shards", &[], None).ok()?;
    (response.status == 200)
        .then(|| serde_json::from_slice(&response.body).ok())
        .flatten()
}

/// Waits until `proxy`'s table is at `version` with members `ids` and a
/// leader for every shard; returns it.
fn wait_table(proxy: SocketAddr, version: u64, ids: &[u64]) -> TableView {
    let mut last = None;
    wait_until(
        &format!("the proxy at {proxy} shows version {version} with members {ids:?}"),
        BOUND,
        || {
            last = table(proxy);
            last.as_ref().is_some_and(|t| {
                t.version == version
                    && t.members.keys().copied().collect::<Vec<_>>() == ids
                    && t.groups.iter().all(|g| g.leader.is_some())
            })
        },
    );
    last.expect("a table")
}

/// The proxy's `kv_proxy_forwarded_total` for node `node`.
fn forwarded_to(proxy: SocketAddr, node: SocketAddr) -> u64 {
    let Ok(response) = send(proxy, "GET", "/-/metrics", &[], None) else {
        return 0;
    };
    let series = format!("kv_proxy_forwarded_total{{node=\"{node}\"}} ");
    response
        .text()
        .lines()
        .filter_map(|line| line.strip_prefix(&series)?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn a_node_added_under_load_through_the_proxy_loses_nothing_and_the_proxy_follows() {
    let started = Instant::now();
    let cluster = Cluster::start(3, 3, opts());
    let proxy = cluster.proxy_addr().expect("a proxy");
    let addrs: Vec<SocketAddr> = (1..=3).map(|id| cluster.addr(id)).collect();
    let before = wait_agreed(&addrs, &[1, 2, 3]);
    wait_table(proxy, before.version, &[1, 2, 3]);
    let preloaded = write_keys(&addrs, "pre", 200, 1000);
    let keys = load_keys("add");
    let history = History::new();
    let tally = Arc::new(Tally::default());
    let load = start_load(proxy, keys.clone(), history.clone(), tally.clone());
    wait_until("the clients are answered", BOUND, || {
        history.acknowledged() >= 100
    });
    let poller = Poller::start(addrs[0]);

    let port = free_ports(1)[0];
    let dir = tempfile::tempdir().unwrap();
    let (change, acked) = (Instant::now(), history.acknowledged());
    let node4 = join(4, port, &dir.path().join("node4"), &addrs[1].to_string());
    let addr4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut all = addrs.clone();
    all.push(addr4);
    let logs = || format!("node 4's log:\n{}", node4.log());
    let added = wait_settled(&all, &[1, 2, 3, 4], &logs);
    let settled_in = change.elapsed();
    let during = history.acknowledged() - acked;
    let samples = poller.finish();
    let progress = assert_monotone(&samples);

    // The moves made are the ring's diff, each finished and dropped once.
    let expected = assert_moves_finished(&all, &[1, 2, 3], &[1, 2, 3, 4], SHARDS);
    assert_dropped(&all, expected);
    let to = placement_over([1, 2, 3, 4], SHARDS, 3);

    // The proxy, started before node 4 existed, routes to it: its table
    // has the new layout, and requests through it reach node 4 (which
    // leads some shards once the balancer gave it its share) while the
    // clients still run.
    let first = wait_table(proxy, added.version, &[1, 2, 3, 4]);
    assert_eq!(first.members[&4], addr4.to_string());
    wait_until(
        "the proxy names node 4 the leader of a shard and sends it requests",
        BOUND,
        || {
            table(proxy).is_some_and(|t| t.groups.iter().any(|g| g.leader == Some(4)))
                && forwarded_to(proxy, addr4) > 0
        },
    );
    let summary = finish_load(load, &cluster, &keys, &history, &tally);

    let nodes: Vec<(u64, SocketAddr)> = (1..=4).zip(all.iter().copied()).collect();
    assert_placed(&nodes, &to);
    let mut readers = all.clone();
    readers.push(proxy);
    assert_readable(&readers, &preloaded);

    // A second proxy, started now with node 4's address alone, finds the
    // whole cluster, names the same leaders as the first, and serves
    // every key with the same answers.
    let second = Process::spawn(
        &binary("kv-proxy"),
        &["--port", "0", "--nodes", &addr4.to_string()],
    );
    wait_until(
        "the two proxies name the same leader for every shard at the same version",
        BOUND,
        || match (table(proxy), table(second.addr)) {
            (Some(a), Some(b)) => {
                a.version == added.version
                    && (a.version, &a.members) == (b.version, &b.members)
                    && a.groups.iter().zip(&b.groups).all(|(x, y)| {
                        x.leader.is_some()
                            && (x.leader, &x.leader_addr) == (y.leader, &y.leader_addr)
                    })
            }
            _ => false,
        },
    );
    assert_readable(&[second.addr], &preloaded);
    for key in keys.iter() {
        let path = format!("/{key}");
        let a = send(proxy, "GET", &path, &[], None).unwrap();
        let b = send(second.addr, "GET", &path, &[], None).unwrap();
        assert_eq!(
            (a.status, a.text()),
            (b.status, b.text()),
            "GET {key}: the first proxy vs the second"
        );
    }
    eprintln!(
        "add: settled in {settled_in:?} ({expected} moves, {during} operations acknowledged meanwhile); {summary}; progress: {progress}; \
         whole test {:?}",
        started.elapsed()
    );
}

#[test]
fn a_node_removed_under_load_through_the_proxy_loses_nothing_and_exits() {
    let started = Instant::now();
    let mut cluster = Cluster::start(4, 3, opts());
    let proxy = cluster.proxy_addr().expect("a proxy");
    let addrs: Vec<SocketAddr> = (1..=4).map(|id| cluster.addr(id)).collect();
    let before = wait_agreed(&addrs, &[1, 2, 3, 4]);
    wait_table(proxy, before.version, &[1, 2, 3, 4]);
    let preloaded = write_keys(&addrs, "pre", 200, 1000);
    let keys = load_keys("remove");
    let history = History::new();
    let tally = Arc::new(Tally::default());
    let load = start_load(proxy, keys.clone(), history.clone(), tally.clone());
    wait_until("the clients are answered", BOUND, || {
        history.acknowledged() >= 100
    });
    // The node leading the most shards leaves: it hands every leadership
    // over under load.
    let victim = cluster.leader_of_most_shards();
    let stay: Vec<u64> = (1..=4).filter(|id| *id != victim).collect();
    let left: Vec<SocketAddr> = stay.iter().map(|id| cluster.addr(*id)).collect();
    let poller = Poller::start(left[0]);

    let (change, acked) = (Instant::now(), history.acknowledged());
    let leave = send(
        addrs[0],
        "DELETE",
        &format!("/-/cluster/members/{victim}"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(leave.status, 202, "{}", leave.text());
    let logs = || format!("node {victim}'s log:\n{}", cluster.log(victim));
    let removed = wait_settled(&left, &stay, &logs);
    let settled_in = change.elapsed();
    let during = history.acknowledged() - acked;
    assert_eq!(
        removed.members[victim as usize - 1].state,
        MemberState::Removed,
        "{removed:?}"
    );
    wait_until(&format!("node {victim} exits by itself"), BOUND, || {
        cluster.exit_code(victim).is_some()
    });
    assert_eq!(
        cluster.exit_code(victim),
        Some(Some(0)),
        "{}",
        cluster.log(victim)
    );
    let samples = poller.finish();
    let progress = assert_monotone(&samples);

    // The leaving node never finishes a move: it is every move's `remove`
    // and hands the leadership over before the joint step.
    let expected = assert_moves_finished(&left, &[1, 2, 3, 4], &stay, SHARDS);
    let to = placement_over(stay.iter().copied(), SHARDS, 3);

    // The proxy drops the removed member without a restart.
    wait_table(proxy, removed.version, &stay);
    let summary = finish_load(load, &cluster, &keys, &history, &tally);

    let nodes: Vec<(u64, SocketAddr)> = stay.iter().copied().zip(left.iter().copied()).collect();
    wait_until(
        "the remaining nodes dropped what they no longer hold",
        BOUND,
        || {
            (0..SHARDS).all(|shard| {
                nodes.iter().all(|(id, addr)| {
                    support::membership::digest(*addr, shard).is_some()
                        == to[shard as usize].contains(id)
                })
            })
        },
    );
    assert_placed(&nodes, &to);
    let mut readers = left.clone();
    readers.push(proxy);
    assert_readable(&readers, &preloaded);
    eprintln!(
        "remove node {victim}: settled in {settled_in:?} ({expected} moves, {during} operations acknowledged meanwhile); {summary}; \
         progress: {progress}; whole test {:?}",
        started.elapsed()
    );
}
