#![allow(clippy::unwrap_used, clippy::expect_used)]
//! kv-bench against a replicated cluster: three fake nodes (kv-testkit's
//! [`FakeCluster`], hyper servers in this process) that serve `/-/shards`
//! and answer 421/503/504 as each test scripts them. The real kv-bench
//! binary routes to the leader; its `--history` says how each operation
//! ended.

use std::collections::BTreeMap;

use kv_testkit::fake_cluster::Fault;
use kv_testkit::FakeCluster;

mod common;
use common::{bench, explain, lines};

fn run(fake: &FakeCluster, history: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let urls = fake.node_list();
    let mut args = vec![
        "--urls",
        &urls,
        "--history",
        history.to_str().unwrap(),
        "--concurrency",
        "4",
        "--keys",
        "16",
        "--value-size",
        "20",
        "--prefix",
        "lead",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    bench(&args)
}

fn outcomes(ops: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for op in ops {
        *counts
            .entry(format!(
                "{} {}",
                op["op"].as_str().unwrap(),
                op["outcome"].as_str().unwrap()
            ))
            .or_insert(0) += 1;
    }
    counts
}

#[test]
fn kv_bench_follows_421s_to_the_leader_and_every_operation_is_ok() {
    let fake = FakeCluster::start(8);
    // Every view names node 1 (term 1); node 2 leads, in term 2.
    fake.set(|s| {
        s.actual = Some(2);
        s.actual_term = 2;
    });
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("h.jsonl");
    let json = dir.path().join("runs.jsonl");
    let output = run(
        &fake,
        &history,
        &[
            "--requests",
            "400",
            "--mix",
            "set=2,get=2,delete=1",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("cluster of 3"), "{stdout}");
    // The 421s followed are routing, reported as redirects, never errors.
    let report = &lines(&json)[0];
    assert_eq!(report["errors_total"], 0, "{report}");
    assert_eq!(report["errors"]["unexpected_status"], 0, "{report}");
    let redirects = report["redirects"].as_u64().unwrap();
    assert!((1..=8 * 4).contains(&redirects), "{report}");
    assert!(
        stdout.contains(&format!("redirects {redirects}")),
        "{stdout}"
    );
    let ops = lines(&history);
    assert!(ops.len() >= 400, "{} lines", ops.len());
    for op in &ops {
        assert_eq!(op["outcome"], "ok", "{op}");
    }
    // The workers learn the leader from a 421 per shard: node 1 saw at
    // most one request per shard and worker, node 2 all the rest; every
    // one asked for 421s.
    let at_1: usize = ["PUT", "GET", "DELETE"]
        .iter()
        .map(|m| fake.count(1, m))
        .sum();
    let at_2: usize = ["PUT", "GET", "DELETE"]
        .iter()
        .map(|m| fake.count(2, m))
        .sum();
    assert!((1..=8 * 4).contains(&at_1), "node 1 got {at_1}");
    assert_eq!(redirects as usize, at_1, "one redirect per 421");
    assert!(at_2 >= 400, "node 2 got {at_2}");
    assert_eq!(fake.count(3, "PUT") + fake.count(3, "GET"), 0);
    assert!(fake.get(|s| s.seen.iter().all(|seen| seen.direct)));

    let output = bench(&["check-history", history.to_str().unwrap()]);
    assert!(output.status.success(), "{}", explain(&output));
}

#[test]
fn without_a_leader_operations_fail_after_the_wait_and_504s_are_unknown() {
    let fake = FakeCluster::start(4);
    fake.set(|s| {
        s.advertised = None;
        s.actual = None;
    });
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("h.jsonl");
    let output = run(
        &fake,
        &history,
        &[
            "--requests",
            "8",
            "--leader-wait",
            "200ms",
            "--allow-errors",
        ],
    );
    assert!(output.status.success(), "{}", explain(&output));
    let ops = lines(&history);
    assert!(ops.len() >= 8, "{} lines", ops.len());
    for op in &ops {
        // Refused before proposing: definitely not applied.
        assert_eq!(op["outcome"], "fail", "{op}");
        assert_eq!(op["status"], 503, "{op}");
    }
    assert_eq!(fake.get(|s| s.seen.len()), 0, "nothing to send to");
    assert!(fake.get(|s| s.data.is_empty()));

    // The leader's writes time out after proposing: 504, never retried.
    fake.set(|s| {
        s.advertised = Some(3);
        s.advertised_term = 2;
        s.actual = Some(3);
        s.actual_term = 2;
        s.fault = Fault::Status504;
    });
    let output = run(
        &fake,
        &history,
        &["--requests", "60", "--mix", "set=1", "--allow-errors"],
    );
    assert!(output.status.success(), "{}", explain(&output));
    let ops = lines(&history);
    let counts = outcomes(&ops);
    let puts = ops.iter().filter(|op| op["op"] == "put").count();
    assert_eq!(counts.get("put unknown"), Some(&puts), "{counts:?}");
    assert_eq!(fake.count(3, "PUT"), puts, "a 504 write was retried");
}

#[test]
fn a_member_down_at_the_start_does_not_stop_the_run() {
    let fake = FakeCluster::start(4);
    // Member 4 is down (nothing listens); node 1 leads every shard.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    fake.set(|s| {
        s.members.insert(4, dead_addr);
    });
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("h.jsonl");
    let output = run(&fake, &history, &["--requests", "99", "--workload", "seed"]);
    assert!(output.status.success(), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("cluster of 4"), "{stdout}");
    let ops = lines(&history);
    assert!(ops.len() >= 99, "{} lines", ops.len());
    assert!(ops.iter().all(|op| op["outcome"] == "ok"));
}

#[test]
fn a_cluster_whose_every_view_is_invalid_is_refused_not_run_as_standalone_nodes() {
    // Every node's /-/shards names a member whose address is not HOST:PORT:
    // the answers are refused (as one naming a non-member leader is), and
    // without one usable answer kv-bench must not treat the nodes as
    // standalone stores (ring mode, no leader routing).
    let fake = FakeCluster::start(4);
    fake.set(|s| {
        s.members.insert(9, "nowhere".to_string());
    });
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("h.jsonl");
    let output = run(&fake, &history, &["--requests", "10"]);
    assert!(!output.status.success(), "{}", explain(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no node gave a usable /-/shards answer") && stderr.contains("nowhere"),
        "{stderr}"
    );
    assert_eq!(
        fake.count(1, "PUT") + fake.count(2, "PUT") + fake.count(3, "PUT"),
        0
    );
}
