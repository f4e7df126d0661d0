//! The proxy's view of shards that cannot be served (a review finding of
//! issue 12): with two of three nodes killed, the survivor's `/-/shards`
//! still names the dead nodes as leaders at the same term (pre-vote keeps
//! it from raising its term), so a table-only check found every shard led.
//! A shard whose known leader is at a node the health checker sees down,
//! or most of whose replicas are, counts as without a leader in
//! `/-/health`, `/-/ready` and `kv_proxy_shards_without_leader`.
//!
//! Against a real 3-node cluster (kv-testkit's [`Cluster`]) and a real proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use kv_testkit::cluster::{wait_until, Cluster, ClusterOpts, BOUND};
use kv_testkit::request;
use serde_json::Value;

fn get_json(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let answer = request(addr, "GET", path, None).unwrap();
    let body = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", answer.text()));
    (answer.status, body)
}

fn shard_set(value: &Value) -> BTreeSet<u64> {
    value
        .as_array()
        .map(|shards| shards.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn metric(addr: std::net::SocketAddr, name: &str) -> Option<u64> {
    let answer = request(addr, "GET", "/-/metrics", None).unwrap();
    answer
        .text()
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

#[test]
fn shards_led_by_dead_nodes_are_without_leader_until_they_come_back() {
    let mut cluster = Cluster::start(
        3,
        3,
        ClusterOpts {
            proxy: Some(vec!["--health-interval".into(), "200ms".into()]),
            ..ClusterOpts::default()
        },
    );
    let proxy = cluster.proxy_addr().unwrap();
    wait_until("the proxy's health is ok", BOUND, || {
        let (_, health) = get_json(proxy, "/-/health");
        health["status"] == "ok"
    });
    let leaders = cluster.wait_for_leaders(BOUND);
    let dead_led: BTreeSet<u64> = leaders
        .iter()
        .enumerate()
        .filter(|(_, leader)| **leader != 1)
        .map(|(shard, _)| shard as u64)
        .collect();
    assert!(
        !dead_led.is_empty(),
        "nodes 2 and 3 lead some shard: {leaders:?}"
    );

    cluster.kill9(2);
    cluster.kill9(3);
    wait_until(
        "the proxy's health names the dead leaders' shards and says degraded",
        BOUND,
        || {
            let (status, health) = get_json(proxy, "/-/health");
            status == 200
                && health["status"] == "degraded"
                && shard_set(&health["shards_without_leader"]).is_superset(&dead_led)
        },
    );
    // Node 1 leads some shards, but with two of three replicas down none
    // of them has a quorum: nothing is served, so every shard counts and
    // the proxy is not ready (review R1: it used to count node 1's).
    wait_until("every shard counts as without a leader", BOUND, || {
        let (_, health) = get_json(proxy, "/-/health");
        shard_set(&health["shards_without_leader"]).len() == leaders.len()
    });
    let (status, ready) = get_json(proxy, "/-/ready");
    assert_eq!(
        (status, &ready["ready"]),
        (503, &Value::Bool(false)),
        "{ready}"
    );
    assert!(
        shard_set(&ready["shards_without_leader"]).is_superset(&dead_led),
        "{status} {ready}"
    );
    let counted = metric(proxy, "kv_proxy_shards_without_leader").unwrap();
    assert_eq!(counted, leaders.len() as u64);

    cluster.restart(2);
    cluster.restart(3);
    wait_until("the proxy's health is ok again", BOUND * 2, || {
        let (_, health) = get_json(proxy, "/-/health");
        health["status"] == "ok" && shard_set(&health["shards_without_leader"]).is_empty()
    });
    let (status, ready) = get_json(proxy, "/-/ready");
    assert_eq!(status, 200, "{ready}");
    assert!(
        shard_set(&ready["shards_without_leader"]).is_empty(),
        "{ready}"
    );
    assert_eq!(metric(proxy, "kv_proxy_shards_without_leader"), Some(0));
}
