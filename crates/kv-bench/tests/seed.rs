#![allow(clippy::unwrap_used, clippy::expect_used)]
//! kv-bench's `--urls` as seeds of a replicated cluster (issue 13,
//! `docs/membership.md` §6), against kv-testkit's [`FakeCluster`]: one
//! node's URL finds every member, and a member that joins during the run
//! (scripted to happen after a number of requests, not at a time) is routed
//! to without a restart, the table taking the newer placement version.

use std::process::Command;

use kv_testkit::fake_cluster::Lagging;
use kv_testkit::FakeCluster;

mod common;
use common::{binary, explain, lines};

fn args<'a>(urls: &'a str, history: &'a str, json: &'a str, requests: &'a str) -> Vec<&'a str> {
    vec![
        "--urls",
        urls,
        "--history",
        history,
        "--json",
        json,
        "--concurrency",
        "4",
        "--keys",
        "32",
        "--value-size",
        "20",
        "--prefix",
        "seed",
        "--requests",
        requests,
        "--mix",
        "set=2,get=2,delete=1",
        "--quiet",
    ]
}

#[test]
fn one_seed_finds_every_member_and_a_member_that_joins_mid_run_is_routed_to() {
    let fake = FakeCluster::start_with(8, 4);
    fake.set(|s| {
        s.version = Some(1);
        // After 300 key requests node 4 joins and leads shards 0-3.
        s.join_after = Some((300, 4, vec![0, 1, 2, 3]));
    });
    let (_dir, history, json, output) = run_2000(&fake.addrs[1].to_string());
    assert!(output.status.success(), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("cluster of 3"), "{stdout}");
    // The newer version was taken: the first answer carrying it started a
    // refresh, which the run waits for before its report.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cluster members now (version 2)"),
        "{stderr}"
    );
    let report = &lines(&json)[0];
    assert_eq!(report["errors_total"], 0, "{report}");
    let urls: Vec<String> = report["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    let node4 = format!("http://{}", fake.addrs[3]);
    let at = urls
        .iter()
        .position(|u| *u == node4)
        .expect("node 4 in urls");
    assert!(
        report["node_requests"][at].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(fake.get(|s| s.seen.iter().filter(|seen| seen.node == 4).count()) > 0);
    for op in &lines(&history) {
        assert_eq!(op["outcome"], "ok", "{op}");
    }
    let check = Command::new(binary("kv-bench"))
        .args(["check-history", history.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", explain(&check));
}

/// Review R1 in kv-bench (it merges by kv-cluster's `ShardTable::merge`,
/// as kv-proxy does): node 2's first `/-/shards` answer shows placement
/// version `u64::MAX`, which the table takes at discovery; node 2 then
/// behaves. When node 4 joins mid-run at version 2, no node shows
/// `u64::MAX` any more and the run follows the join: node 4 is routed to
/// and nothing fails.
#[test]
fn one_absurd_placement_version_does_not_pin_the_runs_members() {
    let fake = FakeCluster::start_with(8, 4);
    fake.set(|s| {
        s.version = Some(1);
        let members = s.members.clone();
        s.lagging.insert(
            2,
            Lagging {
                version: u64::MAX,
                members,
            },
        );
        s.lagging_views.insert(2, 1);
        s.join_after = Some((300, 4, vec![0, 1, 2, 3]));
    });
    let (_dir, _history, json, output) = run_2000(&fake.node_list());
    assert!(output.status.success(), "{}", explain(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no node shows placement version 18446744073709551615 any more"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cluster members now (version 2)"),
        "{stderr}"
    );
    let report = &lines(&json)[0];
    assert_eq!(report["errors_total"], 0, "{report}");
    assert!(fake.get(|s| s.seen.iter().filter(|seen| seen.node == 4).count()) > 0);
}

/// 2,000 requests from kv-bench seeded with `seeds`, recording its history
/// and JSON report in a temporary directory (kept alive by the first value).
fn run_2000(
    seeds: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::process::Output,
) {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("h.jsonl");
    let json = dir.path().join("runs.jsonl");
    let output = Command::new(binary("kv-bench"))
        .args(args(
            seeds,
            history.to_str().unwrap(),
            json.to_str().unwrap(),
            "2000",
        ))
        .env("RUST_LOG", "kv_bench=info")
        .output()
        .unwrap();
    (dir, history, json, output)
}
