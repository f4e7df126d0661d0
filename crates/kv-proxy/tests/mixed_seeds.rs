//! Review R1: a seed list that mixes a standalone node and cluster nodes.
//!
//! The proxy goes to cluster mode (a cluster node answered `/-/shards`)
//! and never routes to the standalone node, which is right; it says so once
//! at warn. It used to say so again at every refresh (once a second,
//! forever), drowning the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_testkit::cluster::{wait_until, BOUND};
use kv_testkit::{binary, request, FakeCluster, Process};

#[test]
fn a_standalone_seed_is_reported_once_not_every_refresh() {
    let fake = FakeCluster::start(4);
    fake.set(|s| s.version = Some(1));
    let dir = tempfile::tempdir().unwrap();
    let standalone = Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", dir.path().to_str().unwrap()],
    );
    let seeds = format!("{},{}", standalone.addr, fake.addrs[0]);
    let proxy = Process::spawn(&binary("kv-proxy"), &["--port", "0", "--nodes", &seeds]);
    let health = request(proxy.addr, "GET", "/-/health", None)
        .unwrap()
        .text();
    assert!(health.contains("\"mode\":\"cluster\""), "{health}");
    let asked = fake.get(|s| s.views_by.get(&1).copied().unwrap_or(0));
    wait_until("four more refreshes", BOUND, || {
        fake.get(|s| s.views_by.get(&1).copied().unwrap_or(0)) >= asked + 4
    });
    let log = proxy.log();
    let warned = log
        .lines()
        .filter(|line| line.contains("answers /-/shards with 404"))
        .count();
    assert!(warned <= 1, "warned {warned} times:\n{log}");
}
