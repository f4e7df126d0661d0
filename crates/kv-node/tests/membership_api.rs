//! Issue 13, M3a: the metadata group, `GET /-/cluster`, the members API and
//! `--join`, on real `kv-node` processes (`docs/membership.md` §3, §4.1,
//! §4.5, §7, §8). After an add, the new member is active everywhere and
//! the moves (executed since M3b, see `membership_moves.rs`) are exactly
//! the ring's placement diff.
//!
//! Every wait is for a condition, bounded by kv-testkit's `BOUND`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kv_cluster::{
    placement_over, replicas_to_move, MemberState, PlacementFields, PLACEMENT_VERSION_HEADER,
};
use kv_testkit::cluster::{free_ports, send, wait_until, BOUND};
use kv_testkit::{binary, Cluster, ClusterOpts, Process};
use support::membership::{get, join_args, retried, view, wait_agreed, RETRIES};

fn put(addr: SocketAddr, key: &str, value: u64) -> u16 {
    let body = format!(r#"{{"value": {value}}}"#);
    send(addr, "PUT", &format!("/{key}"), &[], Some(&body))
        .map(|r| r.status)
        .unwrap_or(0)
}

/// A client writing and reading back keys through each of `addrs` in turn
/// until stopped; every write must be acknowledged and read back, through
/// the same node, with the value just written (after safe retries).
struct Traffic {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(addrs: Vec<SocketAddr>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let addrs = Arc::new(Mutex::new(addrs));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, ops, addrs, failures) =
                (stop.clone(), ops.clone(), addrs.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let targets = addrs.lock().unwrap().clone();
                    for addr in targets {
                        n += 1;
                        let key = format!("traffic-{}", n % 200);
                        let mut failed = Vec::new();
                        let status = retried(|| put(addr, &key, n));
                        if status != 200 {
                            failed.push(format!("PUT {key} via {addr}: {status}"));
                        }
                        let mut got = (0, String::new());
                        retried(|| {
                            got = get(addr, &key);
                            got.0
                        });
                        if got != (200, format!("{{\"value\":{n}}}\n")) {
                            failed.push(format!("GET {key} via {addr}: {got:?}, wanted {n}"));
                        }
                        failures.lock().unwrap().extend(failed);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Traffic {
            stop,
            ops,
            addrs,
            failures,
            thread: Some(thread),
        }
    }

    fn set(&self, addrs: &[SocketAddr]) {
        *self.addrs.lock().unwrap() = addrs.to_vec();
    }

    /// Waits for one more round, so every node served traffic since now.
    /// Bounded by 3 x `BOUND`: one round is a write and a read through each
    /// node, each of which may wait out a `BOUND` of safe retries.
    fn more_rounds(&self) {
        let from = self.ops.load(Ordering::Relaxed);
        let round = self.addrs.lock().unwrap().len() as u64;
        let deadline = std::time::Instant::now() + 3 * BOUND;
        while self.ops.load(Ordering::Relaxed) < from + round + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "no round of traffic within {:?} (ops {from} -> {}, thread finished: {:?}, \
                 failures so far: {:?})",
                3 * BOUND,
                self.ops.load(Ordering::Relaxed),
                self.thread.as_ref().map(|t| t.is_finished()),
                self.failures.lock().unwrap_or_else(|p| p.into_inner())
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let failures = self.failures.lock().unwrap();
        assert!(failures.is_empty(), "failed key requests: {failures:#?}");
    }
}

fn cluster_json_id(addr: SocketAddr) -> String {
    let response = send(addr, "GET", "/-/raft/cluster", &[], None).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    json["cluster_id"].as_str().unwrap().to_owned()
}

#[test]
fn the_metadata_group_bootstraps_and_survives_kill9_of_every_node() {
    let opts = ClusterOpts {
        shards: 8,
        ..ClusterOpts::default()
    };
    let mut cluster = Cluster::start(3, 3, opts);
    let addrs: Vec<SocketAddr> = (1..=3).map(|id| cluster.addr(id)).collect();
    let first = wait_agreed(&addrs, &[1, 2, 3]);
    assert_eq!(first.version, 1, "bootstrap is version 1: {first:?}");
    assert!(first.settled);
    assert_eq!((first.shards, first.replicas), (8, 3));
    assert_eq!(first.moves.total, 0);
    // One cluster id format: the metadata state's is cluster.json's.
    for addr in &addrs {
        assert_eq!(first.cluster_id.to_string(), cluster_json_id(*addr));
    }
    assert!(first.meta_leader.is_some_and(|l| (1..=3).contains(&l)));
    assert_eq!(
        first.members.iter().map(|m| m.shards_hosted).sum::<u32>(),
        8 * 3
    );

    for id in 1..=3 {
        assert_eq!(cluster.metric_sum(id, "kv_cluster_version"), 1);
        assert_eq!(cluster.metric_sum(id, "kv_cluster_members"), 3);
    }
    wait_until("one node says it leads the metadata group", BOUND, || {
        (1..=3)
            .map(|id| cluster.metric_sum(id, "kv_cluster_is_meta_leader"))
            .sum::<u64>()
            == 1
    });
    for (n, addr) in addrs.iter().enumerate() {
        assert_eq!(put(*addr, &format!("boot-{n}"), n as u64), 200);
        // Every answer names the placement version.
        let response = send(*addr, "GET", &format!("/boot-{n}"), &[], None).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header(PLACEMENT_VERSION_HEADER), Some("1"));
        let shards = send(*addr, "GET", "/-/shards", &[], None).unwrap();
        let fields = PlacementFields::parse(&shards.body).unwrap();
        assert_eq!(fields.version, Some(1));
        assert_eq!(fields.member_states.len(), 3);
        assert!(fields.moving.is_empty());
        kv_cluster::ShardsView::parse(&shards.body).expect("issue-12 readers still read it");
    }

    // A proposal on any node reaches the metadata leader (forwarded once
    // by a follower); a repeat changes nothing.
    let harmless = r#"{"Activate": {"id": 1}}"#;
    for addr in &addrs {
        let response = send(*addr, "POST", "/-/meta/propose", &[], Some(harmless)).unwrap();
        assert_eq!(response.status, 200, "{addr}: {}", response.text());
        let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(
            json["outcome"],
            serde_json::json!({"Unchanged": {"version": 1}})
        );
        let bad = send(*addr, "POST", "/-/meta/propose", &[], Some("{}")).unwrap();
        assert_eq!(bad.status, 400, "{}", bad.text());
    }

    // Without a quorum of the metadata group a proposal is refused, not
    // left unknown: 503 + Retry-After once node 1 knows it is alone (a 504
    // before that is allowed, for a command that changes nothing anyway).
    cluster.kill9(2);
    cluster.kill9(3);
    wait_until("a proposal on node 1 alone answers 503", BOUND, || {
        let response = send(addrs[0], "POST", "/-/meta/propose", &[], Some(harmless)).unwrap();
        assert!(
            [200, 503, 504].contains(&response.status),
            "{}",
            response.text()
        );
        response.status == 503
            && response.header("retry-after") == Some("1")
            && response.text().contains("no leader with a quorum")
    });
    cluster.kill9(1);
    for id in 1..=3 {
        cluster.restart(id);
    }
    cluster.wait_for_leaders(BOUND);
    let again = wait_agreed(&addrs, &[1, 2, 3]);
    assert_eq!(
        (again.version, again.cluster_id),
        (first.version, first.cluster_id),
        "a restart bootstraps nothing again"
    );
    for (n, addr) in addrs.iter().enumerate() {
        assert_eq!(
            get(*addr, &format!("boot-{n}")),
            (200, format!("{{\"value\":{n}}}\n"))
        );
    }
}

#[test]
fn a_node_joins_every_node_sees_it_active_with_the_planned_moves() {
    // 16 by default: 64 groups a node (the design's figure) on a shared
    // 2-core machine running debug builds do not commit a first write in
    // every shard within a bound (measured on the main branch's binary too);
    // `KV_MEMBERSHIP_SHARDS=64` runs the design's case, 47 moves.
    let shards: u32 = std::env::var("KV_MEMBERSHIP_SHARDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    // 64 groups a node on a shared 2-core machine running debug builds:
    // longer election and write timeouts keep a busy moment from deposing
    // leaders or timing writes out.
    let slow = [
        "--raft-election-timeout",
        "1s",
        "--raft-write-timeout",
        "5s",
    ];
    let opts = ClusterOpts {
        shards,
        extra: slow.iter().map(|s| (*s).to_owned()).collect(),
        ..ClusterOpts::default()
    };
    let cluster = Cluster::start(3, 3, opts);
    let addrs: Vec<SocketAddr> = (1..=3).map(|id| cluster.addr(id)).collect();
    let before = wait_agreed(&addrs, &[1, 2, 3]);
    // Every group has committed a write before the traffic starts: right
    // after a start, 192 replicas on a loaded machine take a while to
    // commit their first entries, which is not what this test is about.
    for shard in 0..shards {
        let key = (0u64..)
            .map(|n| format!("warm-{n}"))
            .find(|k| kv_cluster::shard_of(k.as_bytes(), shards) == shard)
            .unwrap();
        assert_eq!(retried(|| put(addrs[0], &key, 0)), 200, "shard {shard}");
    }
    let traffic = Traffic::start(addrs.clone());

    // Refusals, each before anything is proposed.
    let members = |method, path: &str, body: Option<&str>| {
        let response = send(addrs[1], method, path, &[], body).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&response.body)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {}", response.text()));
        assert!(json["error"].is_string(), "{method} {path}: {json}");
        (response.status, json["error"].as_str().unwrap().to_owned())
    };
    let (status, error) = members("DELETE", "/-/cluster/members/2", None);
    assert_eq!(status, 409, "{error}");
    assert!(error.contains("would leave 2 active members"), "{error}");
    assert_eq!(members("DELETE", "/-/cluster/members/9", None).0, 404);
    assert_eq!(members("DELETE", "/-/cluster/members/x", None).0, 400);
    assert_eq!(members("PUT", "/-/cluster/members", Some("{}")).0, 405);
    let options = send(addrs[1], "OPTIONS", "/-/cluster/members/4", &[], None).unwrap();
    assert_eq!(options.status, 204);
    assert_eq!(options.header("allow"), Some("DELETE, OPTIONS"));
    for bad in [
        r#"{"id": "four"}"#,
        r#"{"id": 4}"#,
        "not json",
        r#"{"id": 4, "addr": "no-port"}"#,
    ] {
        assert_eq!(
            members("POST", "/-/cluster/members", Some(bad)).0,
            400,
            "{bad}"
        );
    }
    // A body over the members API's limit is 413, like an oversized value.
    let huge = format!(r#"{{"id": 4, "addr": "{}"}}"#, "a".repeat(100 << 10));
    assert_eq!(members("POST", "/-/cluster/members", Some(&huge)).0, 413);
    let taken_id = r#"{"id": 2, "addr": "127.0.0.1:1"}"#;
    let (status, error) = members("POST", "/-/cluster/members", Some(taken_id));
    assert_eq!(status, 409, "{error}");
    assert!(error.contains("ids are never reused"), "{error}");
    let taken_addr = format!(r#"{{"id": 5, "addr": "{}"}}"#, addrs[0]);
    let (status, error) = members("POST", "/-/cluster/members", Some(&taken_addr));
    assert_eq!(status, 409, "{error}");
    assert!(error.contains("node 1 already uses"), "{error}");
    let nobody = format!(r#"{{"id": 6, "addr": "127.0.0.1:{}"}}"#, free_ports(1)[0]);
    let (status, error) = members("POST", "/-/cluster/members", Some(&nobody));
    assert_eq!(status, 409, "{error}");
    assert!(error.contains("answers as node 6"), "{error}");
    let unchanged = wait_agreed(&addrs, &[1, 2, 3]);
    assert_eq!(unchanged.version, before.version, "refusals change nothing");

    // Node 4 joins through a seed list.
    let port = free_ports(1)[0];
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node4");
    let seeds = format!("{},{}", addrs[1], addrs[2]);
    let advertise = format!("127.0.0.1:{port}");
    let mut args = join_args(4, port, &data, &seeds, &advertise);
    args.extend(slow.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut node4 = Process::spawn(&binary("kv-node"), &args);
    let addr4: SocketAddr = advertise.parse().unwrap();
    let mut all = addrs.clone();
    all.push(addr4);
    let after = wait_agreed(&all, &[1, 2, 3, 4]);
    assert!(after.version > before.version);
    assert_eq!(after.members[3].addr, advertise);

    // The moves are the exact diff of the ring's placements (executed as
    // they are admitted: some may be done already, all of them once settled).
    let from = placement_over([1, 2, 3], shards, 3);
    let to = placement_over([1, 2, 3, 4], shards, 3);
    let expected = replicas_to_move(&from, &to) as u64;
    if shards == 64 {
        assert_eq!(expected, 47, "docs/membership.md §4.2");
    }
    assert!(expected > 0);
    assert!(after.moves.total == expected || after.settled, "{after:?}");
    for addr in &all {
        let shards_body = send(*addr, "GET", "/-/shards", &[], None).unwrap();
        let fields = PlacementFields::parse(&shards_body.body).unwrap();
        assert_eq!(fields.version, Some(after.version), "{addr}");
        assert!(fields.moving.len() as u64 <= expected, "{addr}");
        for (shard, moving) in &fields.moving {
            let s = *shard as usize;
            assert!(to[s].contains(&moving.add) && !from[s].contains(&moving.add));
            assert!(from[s].contains(&moving.remove) && !to[s].contains(&moving.remove));
        }
    }

    // Keys read and write through node 4 too.
    traffic.set(&all);
    let rounds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| traffic.more_rounds()));
    assert!(rounds.is_ok(), "node 4's log:\n{}", node4.log());
    for n in 0..64 {
        let key = format!("via-4-{n}");
        let status = retried(|| put(addr4, &key, n));
        assert_eq!(status, 200, "PUT {key} via node 4");
        assert_eq!(retried(|| get(addrs[n as usize % 3], &key).0), 200);
    }

    // Asking again is harmless; a restart of node 4 ignores --join.
    let again = format!(r#"{{"id": 4, "addr": "{advertise}"}}"#);
    let response = send(addrs[0], "POST", "/-/cluster/members", &[], Some(&again)).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    traffic.set(&addrs);
    node4.kill9();
    drop(node4);
    let node4 = Process::spawn(&binary("kv-node"), &args);
    wait_until("node 4 says it ignores --join", BOUND, || {
        node4.log_shows("--join ignored")
    });
    let restarted = wait_agreed(&all, &[1, 2, 3, 4]);
    assert!(restarted.version >= after.version, "moves go on meanwhile");
    traffic.set(&all);
    let rounds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| traffic.more_rounds()));
    assert!(rounds.is_ok(), "node 4's log:\n{}", node4.log());

    // Removing it again: leaving (then removed once its replicas moved
    // away, when it exits by itself), on every node. A repeat is a 200.
    traffic.set(&addrs);
    let leave = send(addrs[2], "DELETE", "/-/cluster/members/4", &[], None).unwrap();
    assert_eq!(leave.status, 202, "{}", leave.text());
    assert!(
        leave.text().contains(r#""state":"leaving""#),
        "{}",
        leave.text()
    );
    wait_until("every node shows node 4 leaving or removed", BOUND, || {
        addrs.iter().all(|addr| {
            view(*addr).is_some_and(|v| {
                matches!(
                    v.members[3].state,
                    MemberState::Leaving | MemberState::Removed
                ) && v.version > after.version
            })
        })
    });
    let again = send(addrs[0], "DELETE", "/-/cluster/members/4", &[], None).unwrap();
    assert_eq!(again.status, 200, "{}", again.text());
    traffic.more_rounds();
    traffic.finish();
    eprintln!(
        "answers sent again after a 503/504/421 or a client timeout: {}",
        RETRIES.load(Ordering::Relaxed)
    );
}

#[test]
fn a_single_replica_cluster_refuses_membership_changes() {
    let opts = ClusterOpts {
        shards: 4,
        ..ClusterOpts::default()
    };
    let cluster = Cluster::start(2, 1, opts);
    let addr = cluster.addr(1);
    let state = view(addr).expect("GET /-/cluster of a --replicas 1 cluster");
    assert_eq!((state.version, state.replicas), (1, 1));
    let message = "membership change needs --replicas 2 or more";
    let body = format!(r#"{{"id": 3, "addr": "127.0.0.1:{}"}}"#, free_ports(1)[0]);
    for (method, path, body) in [
        ("POST", "/-/cluster/members", Some(body.as_str())),
        ("DELETE", "/-/cluster/members/2", None),
    ] {
        let response = send(addr, method, path, &[], body).unwrap();
        assert_eq!(response.status, 409, "{method} {path}: {}", response.text());
        assert!(response.text().contains(message), "{}", response.text());
    }

    // --join against it is refused before anything is written.
    let port = free_ports(1)[0];
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node3");
    let args = join_args(
        3,
        port,
        &data,
        &addr.to_string(),
        &format!("127.0.0.1:{port}"),
    );
    let output = std::process::Command::new(binary("kv-node"))
        .args(&args)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(message), "{stderr}");
    assert!(!data.join("cluster.json").exists());
}
