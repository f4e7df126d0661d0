//! Solo shards end to end: three real `kv-node` processes with `--peers`
//! and `--replicas 1`, so every shard has one replica and no Raft group; its
//! owner serves it from its store and the other nodes treat the owner as
//! the shard's leader (design `docs/replication.md` §10). Every wait is for
//! a condition, bounded; nothing sleeps to synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kv_cluster::{NotLeader, ShardTable, ShardsView};
use kv_testkit::cluster::{free_ports, send};
use kv_testkit::{binary, Process, Response};

/// Bound on every wait: generous for a loaded 2-core machine; the tests
/// assert outcomes, never speed.
const BOUND: Duration = Duration::from_secs(20);
const SHARDS: u32 = 8;
const STORED: &str = "{\"message\":\"Value stored successfully\"}\n";
const DELETED: &str = "{\"message\":\"Key deleted successfully\"}\n";
const NOT_FOUND: &str = "{\"error\":\"Key not found\"}\n";

/// Polls `condition` until it holds or `bound` passes.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {BOUND:?}: {what}");
        // Polling a condition, not synchronising on time.
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn put(addr: SocketAddr, key: &str, value: &str) -> Response {
    send(
        addr,
        "PUT",
        &format!("/{key}"),
        &[],
        Some(&format!("{{\"value\": {value}}}")),
    )
    .unwrap()
}

fn get(addr: SocketAddr, key: &str) -> Response {
    send(addr, "GET", &format!("/{key}"), &[], None).unwrap()
}

fn json(response: &Response) -> serde_json::Value {
    serde_json::from_str(&response.text()).unwrap()
}

/// Three members, `--replicas 1`, every node started.
struct Solo {
    dir: tempfile::TempDir,
    ports: BTreeMap<u64, u16>,
    nodes: BTreeMap<u64, Process>,
}

impl Solo {
    fn start() -> Solo {
        let ports: BTreeMap<u64, u16> = (1..=3).zip(free_ports(3)).collect();
        let mut solo = Solo {
            dir: tempfile::tempdir().unwrap(),
            ports,
            nodes: BTreeMap::new(),
        };
        for id in 1..=3 {
            let node = Process::spawn(
                &binary("kv-node"),
                &solo.args(id).iter().map(String::as_str).collect::<Vec<_>>(),
            );
            solo.nodes.insert(id, node);
        }
        solo
    }

    fn args(&self, id: u64) -> Vec<String> {
        let peers = self
            .ports
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let dir: PathBuf = self.dir.path().join(format!("node{id}"));
        [
            "--port",
            &self.ports[&id].to_string(),
            "--data-dir",
            &dir.to_string_lossy(),
            "--node-id",
            &id.to_string(),
            "--peers",
            &peers,
            "--shards",
            &SHARDS.to_string(),
            "--replicas",
            "1",
            "--exit-with-parent",
            "--workers",
            "2",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    fn addr(&self, id: u64) -> SocketAddr {
        self.nodes[&id].addr
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.values().map(|node| node.addr).collect()
    }

    fn view(&self, id: u64) -> ShardsView {
        let answer = send(self.addr(id), "GET", "/-/shards", &[], None).unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        ShardsView::parse(answer.text().as_bytes()).unwrap()
    }

    /// The owner of `key`'s shard, by the placement every node computes.
    fn owner(&self, key: &str) -> u64 {
        let view = self.view(1);
        let shard = kv_cluster::shard_of(key.as_bytes(), SHARDS);
        view.groups[shard as usize].replicas[0]
    }
}

/// Keys spread over every shard (so over every owner).
fn keys(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("solo_key_{i}")).collect()
}

#[test]
fn every_node_serves_every_key_and_names_the_owner() {
    let solo = Solo::start();
    // `/-/shards`: one replica per shard, led by it in term 0, from every
    // node alike (so kv-proxy and kv-bench route straight to the owner).
    let view = solo.view(1);
    let mut owners = std::collections::BTreeSet::new();
    for group in &view.groups {
        assert_eq!(group.replicas.len(), 1, "{group:?}");
        assert_eq!(group.leader, Some(group.replicas[0]), "{group:?}");
        assert_eq!(group.term, Some(0), "{group:?}");
        owners.insert(group.replicas[0]);
    }
    assert_eq!(owners.len(), 3, "every node owns some shard: {view:?}");
    for id in [2, 3] {
        let other = solo.view(id);
        for (a, b) in view.groups.iter().zip(&other.groups) {
            assert_eq!((a.leader, a.term), (b.leader, b.term));
            assert_eq!(b.hosted, b.leader == Some(id));
        }
    }
    // Health and metrics count owned solo shards as led.
    let led: u64 = (1..=3)
        .map(|id| {
            let health = json(&send(solo.addr(id), "GET", "/-/health", &[], None).unwrap());
            assert_eq!(health["shards_led"], health["shards_hosted"], "{health}");
            health["shards_led"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(led, u64::from(SHARDS));
    // Writes through every node, each key through a different one.
    let keys = keys(60);
    let addrs = solo.addrs();
    for (i, key) in keys.iter().enumerate() {
        let answer = put(addrs[i % 3], key, &format!("\"v{i}\""));
        assert_eq!((answer.status, answer.text().as_str()), (200, STORED));
    }
    // Every key from every node: the owner answers, others forward.
    for (i, key) in keys.iter().enumerate() {
        for &addr in &addrs {
            let answer = get(addr, key);
            assert_eq!(
                (answer.status, answer.text()),
                (200, format!("{{\"value\":\"v{i}\"}}\n")),
                "{key} from {addr}"
            );
        }
    }
    // With X-Kv-Route: direct a non-owner answers 421 naming the owner,
    // proposes nothing, and the owner serves the request.
    let table = ShardTable::from_view(view.clone()).unwrap();
    for (i, key) in keys.iter().enumerate().take(12) {
        let owner = solo.owner(key);
        let owner_addr = format!("127.0.0.1:{}", solo.ports[&owner]);
        assert_eq!(table.leader_addr(key.as_bytes()), Some(owner_addr.as_str()));
        for id in (1..=3).filter(|id| *id != owner) {
            let answer = send(
                solo.addr(id),
                "PUT",
                &format!("/{key}"),
                &[("X-Kv-Route", "direct")],
                Some("{\"value\": \"refused\"}"),
            )
            .unwrap();
            assert_eq!(answer.status, 421, "{}", answer.text());
            let named: NotLeader = serde_json::from_str(&answer.text()).unwrap();
            assert_eq!((named.leader, named.term), (owner, 0));
            assert_eq!(named.leader_addr, owner_addr);
            assert_eq!(answer.header("x-kv-leader"), Some(owner_addr.as_str()));
        }
        let direct = send(
            solo.addr(owner),
            "GET",
            &format!("/{key}"),
            &[("X-Kv-Route", "direct")],
            None,
        )
        .unwrap();
        assert_eq!(
            (direct.status, direct.text()),
            (200, format!("{{\"value\":\"v{i}\"}}\n")),
            "the refused PUT was not applied"
        );
    }
    // Delete through a non-owner, then 404 everywhere.
    let key = &keys[0];
    let other = (1..=3).find(|id| *id != solo.owner(key)).unwrap();
    let deleted = send(solo.addr(other), "DELETE", &format!("/{key}"), &[], None).unwrap();
    assert_eq!((deleted.status, deleted.text().as_str()), (200, DELETED));
    for &addr in &addrs {
        let answer = get(addr, key);
        assert_eq!((answer.status, answer.text().as_str()), (404, NOT_FOUND));
    }
    // Digests: the owner hashes the shard's keys, the others host nothing.
    let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
    for key in &keys[1..] {
        *expected
            .entry(kv_cluster::shard_of(key.as_bytes(), SHARDS))
            .or_default() += 1;
    }
    for group in &view.groups {
        for id in 1..=3 {
            let path = format!("/-/shards/{}/digest", group.shard);
            let digest = json(&send(solo.addr(id), "GET", &path, &[], None).unwrap());
            if group.leader == Some(id) {
                let keys = expected.get(&group.shard).copied().unwrap_or(0);
                assert_eq!(digest["keys"], keys, "{digest}");
                assert!(digest["digest"].is_string(), "{digest}");
            } else {
                assert_eq!(digest["hosted"], false, "{digest}");
            }
        }
    }
}

#[test]
fn kill_9_and_restart_loses_no_acknowledged_write() {
    let mut solo = Solo::start();
    let keys = keys(48);
    let addrs = solo.addrs();
    // Written through node 1 (forwarded to the owners), then overwritten
    // through the owner's neighbour: only acknowledged values count.
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    for (round, addr) in [addrs[0], addrs[1]].into_iter().enumerate() {
        for (i, key) in keys.iter().enumerate() {
            let value = format!("\"r{round}-{i}\"");
            let answer = put(addr, key, &value);
            assert_eq!((answer.status, answer.text().as_str()), (200, STORED));
            acknowledged.insert(key.clone(), value);
        }
    }
    let victim = 2;
    let victims: Vec<&String> = keys.iter().filter(|k| solo.owner(k) == victim).collect();
    assert!(!victims.is_empty(), "node {victim} owns some keys");
    solo.nodes.get_mut(&victim).unwrap().kill9();
    // Its shards: the owner is unreachable before anything was sent, so a
    // read and a write both answer 503 (never applied elsewhere).
    let key = victims[0];
    let read = get(solo.addr(1), key);
    assert_eq!(read.status, 503, "{}", read.text());
    assert!(json(&read)["error"].is_string());
    let write = put(solo.addr(1), key, "\"while down\"");
    assert_eq!(write.status, 503, "{}", write.text());
    // The other nodes' shards still work.
    let alive = keys.iter().find(|k| solo.owner(k) != victim).unwrap();
    assert_eq!(get(solo.addr(3), alive).status, 200);
    // Restart from its own WAL and snapshot: every acknowledged value is
    // back, from every node, and the refused write was never applied.
    solo.nodes.get_mut(&victim).unwrap().restart();
    let addrs = solo.addrs();
    wait_until("the restarted node serves its keys", || {
        get(addrs[0], key).status == 200
    });
    for (key, value) in &acknowledged {
        for &addr in &addrs {
            let answer = get(addr, key);
            assert_eq!(
                (answer.status, answer.text()),
                (200, format!("{{\"value\":{value}}}\n")),
                "{key} from {addr}"
            );
        }
    }
    let log = solo.nodes[&victim].log();
    assert!(log.contains("restart"), "{log}");
}

#[test]
fn a_proxy_in_front_serves_every_key() {
    let solo = Solo::start();
    let names: Vec<String> = solo.addrs().iter().map(ToString::to_string).collect();
    let proxy = Process::spawn(
        &binary("kv-proxy"),
        &["--port", "0", "--nodes", &names.join(",")],
    );
    let keys = keys(40);
    for (i, key) in keys.iter().enumerate() {
        let answer = put(proxy.addr, key, &i.to_string());
        assert_eq!((answer.status, answer.text().as_str()), (200, STORED));
    }
    for (i, key) in keys.iter().enumerate() {
        let answer = get(proxy.addr, key);
        assert_eq!(
            (answer.status, answer.text()),
            (200, format!("{{\"value\":{i}}}\n"))
        );
        // Stored once, by its owner: the owner's digest counts it.
        let owner = solo.owner(key);
        let direct = send(
            solo.addr(owner),
            "GET",
            &format!("/{key}"),
            &[("X-Kv-Route", "direct")],
            None,
        )
        .unwrap();
        assert_eq!(direct.status, 200);
    }
    let total: u64 = (1..=3)
        .map(|id| {
            json(&send(solo.addr(id), "GET", "/-/health", &[], None).unwrap())["keys"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(total, keys.len() as u64, "each key on exactly one node");
}
