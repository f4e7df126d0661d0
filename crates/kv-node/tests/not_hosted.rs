//! Found by the issue-12 review, which saw it fail every time before the fix.
//!
//! With more members than replicas (4 nodes, `--replicas 3`), some node does
//! not host some shard. Such a node answers that shard's keys by forwarding
//! to the leader it cached (or the shard's preferred leader). When that
//! leader dies, the node keeps answering every key of the shard with
//! `503 {"error": "shard S: leader L at ... is unreachable: ... Connection
//! refused"}` for as long as the leader stays dead, although the surviving
//! replicas elected a new leader within a second. Now an unreachable cached
//! leader moves the cache to the next replica, which serves or names the
//! leader, and the client's request waits that out (`--leader-wait`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_testkit::cluster::{send, BOUND};
use kv_testkit::{Cluster, ClusterOpts};

#[test]
fn a_node_not_hosting_a_shard_reaches_its_new_leader_after_the_old_one_dies() {
    let opts = ClusterOpts::default();
    let shards = opts.shards;
    let mut cluster = Cluster::start(4, 3, opts);
    let leaders = cluster.wait_for_leaders(BOUND);

    // A node that does not host a shard, and that shard's leader.
    let mut found = None;
    'search: for observer in 1..=4u64 {
        let view = cluster.shards(observer).expect("GET /-/shards");
        for group in view.groups.iter().filter(|g| !g.hosted) {
            let leader = leaders[group.shard as usize];
            if leader != observer {
                found = Some((observer, group.shard, leader));
                break 'search;
            }
        }
    }
    let (observer, shard, leader) =
        found.expect("with 4 members and 3 replicas some node does not host some shard");
    let key = (0u32..)
        .map(|n| format!("not-hosted-{n}"))
        .find(|k| kv_cluster::shard_of(k.as_bytes(), shards) == shard)
        .unwrap();
    let path = format!("/{key}");

    // Through the observer (no routing header, as the seed's clients send).
    let put = send(
        cluster.addr(observer),
        "PUT",
        &path,
        &[],
        Some(r#"{"value": 1}"#),
    )
    .unwrap();
    assert_eq!(put.status, 200, "PUT through node {observer}");

    cluster.kill9(leader);
    let rest: Vec<u64> = (1..=4).filter(|id| *id != leader).collect();
    cluster.wait_for_leaders_among(&rest, BOUND);

    // One GET, no retries by the test: the node finds the new leader
    // itself, within its --leader-wait.
    let got = send(cluster.addr(observer), "GET", &path, &[], None).unwrap();
    assert_eq!(
        (got.status, String::from_utf8_lossy(&got.body).into_owned()),
        (200, "{\"value\":1}\n".to_owned()),
        "GET {path} through node {observer} (not hosting shard {shard}) after its leader \
         {leader} was killed and the others elected a new one"
    );
    let put = send(
        cluster.addr(observer),
        "PUT",
        &path,
        &[],
        Some(r#"{"value": 2}"#),
    )
    .unwrap();
    assert_eq!(
        put.status, 200,
        "PUT through node {observer} after the kill"
    );
}
