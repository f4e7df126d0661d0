//! Issue 13, found by hand (break session): after a member is removed, a
//! node that does not host a shard the removed member led must not name the
//! removed member as that shard's leader in `GET /-/shards`.
//!
//! A node keeps, for each shard it does not host, the leader it last
//! forwarded a request to (its leader cache). That cache is not pruned when
//! the member leaves, so `/-/shards` keeps naming a leader that is not among
//! its `members`: `ShardsView::check` (kv-proxy, kv-bench) refuses the whole
//! answer, and `kv-bench --urls <that node>` then runs as if the node were
//! a standalone store (one node, ring mode) instead of routing to leaders.
//!
//! Every wait is for a condition, bounded (kv-testkit's `BOUND`, or the
//! settle bound of `wait_settled`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use kv_cluster::{placement_over, ShardsView};
use kv_testkit::cluster::send;
use kv_testkit::{Cluster, ClusterOpts};
use support::key_per_shard;
use support::membership::{retried, shards_view, wait_agreed, wait_settled};

const SHARDS: u32 = 8;

/// `GET /-/shards` of `addr`, unchecked: the test asserts on its check.
fn raw_shards(addr: SocketAddr) -> ShardsView {
    let response = send(addr, "GET", "/-/shards", &[], None).expect("GET /-/shards");
    assert_eq!(response.status, 200, "{}", response.text());
    serde_json::from_slice(&response.body).expect("a /-/shards body")
}

#[test]
fn a_removed_leader_is_not_named_by_a_node_that_does_not_host_its_shard() {
    let opts = ClusterOpts {
        shards: SHARDS,
        ..ClusterOpts::default()
    };
    let cluster = Cluster::start(5, 3, opts);
    let ids: Vec<u64> = (1..=5).collect();
    let addrs: Vec<SocketAddr> = ids.iter().map(|id| cluster.addr(*id)).collect();
    wait_agreed(&addrs, &ids);
    let keys = key_per_shard("stale", SHARDS);

    // Each node's view of who leads the shards it hosts.
    let leader_of = |shard: u32| -> Option<u64> {
        addrs.iter().find_map(|addr| {
            let view = shards_view(*addr);
            let group = &view.groups[shard as usize];
            if group.hosted {
                group.leader
            } else {
                None
            }
        })
    };
    // A (leaving member, shard it leads, node that hosts that shard
    // neither now nor after the removal): through that node, a request for
    // the shard is forwarded to the leader and the node caches it.
    let mut chosen = None;
    'search: for shard in 0..SHARDS {
        let Some(leader) = leader_of(shard) else {
            continue;
        };
        let rest: Vec<u64> = ids.iter().copied().filter(|id| *id != leader).collect();
        let after = placement_over(rest.iter().copied(), SHARDS, 3);
        for (index, addr) in addrs.iter().enumerate() {
            let node = ids[index];
            let view = shards_view(*addr);
            let group = &view.groups[shard as usize];
            if node != leader && !group.hosted && !after[shard as usize].contains(&node) {
                chosen = Some((leader, shard, node, *addr, rest));
                break 'search;
            }
        }
    }
    let (leader, shard, node, via, rest) =
        chosen.expect("a shard, its leader and a node that hosts it neither before nor after");
    let key = &keys[shard as usize];
    let body = r#"{"value": 1}"#;
    let status = retried(|| {
        send(via, "PUT", &format!("/{key}"), &[], Some(body))
            .map(|r| r.status)
            .unwrap_or(0)
    });
    assert_eq!(status, 200, "PUT {key} through node {node}");
    let cached = raw_shards(via).groups[shard as usize].leader;
    eprintln!("node {node} caches leader {cached:?} of shard {shard}; removing node {leader}");

    let leave = send(
        addrs[0],
        "DELETE",
        &format!("/-/cluster/members/{leader}"),
        &[],
        None,
    )
    .unwrap();
    assert!(
        leave.status == 202 || leave.status == 200,
        "{}",
        leave.text()
    );
    let left: Vec<SocketAddr> = rest.iter().map(|id| cluster.addr(*id)).collect();
    let logs = || String::new();
    wait_settled(&left, &rest, &logs);

    // Every remaining node's answer must be one a client can route by.
    for (id, addr) in rest.iter().zip(&left) {
        let view = raw_shards(*addr);
        if let Err(error) = view.check() {
            panic!("node {id}'s GET /-/shards is refused by clients: {error}");
        }
    }
}
