//! Review R2 of issue 13's M3a (the metadata group, the members API,
//! `--join`): each test reproduces one defect found by trying the landed
//! build as a user, on real `kv-node` processes. Every wait is for a
//! condition, bounded by kv-testkit's `BOUND`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use kv_cluster::MetaRole;
use kv_testkit::cluster::{free_ports, send, wait_until, BOUND};
use kv_testkit::{Cluster, ClusterOpts};
use support::membership::{join, view, wait_agreed};

/// A node that joined holds, ahead of M3b's executor, an uninitialised
/// learner replica of every shard planned to move into it. Those replicas
/// do not serve (`ClusterNode::serving`) and `/-/shards` shows them as not
/// hosted, but `/-/ready` and `/-/health` counted them as hosted shards
/// with "no leader": the joined node answered 503 not ready, and health
/// "degraded", for as long as the moves stayed planned (in M3a: forever),
/// although it serves every key by forwarding.
#[test]
fn a_joined_node_with_moves_planned_into_it_is_ready_and_healthy() {
    let opts = ClusterOpts {
        shards: 4,
        ..ClusterOpts::default()
    };
    let cluster = Cluster::start(3, 3, opts);
    let addrs: Vec<SocketAddr> = (1..=3).map(|id| cluster.addr(id)).collect();
    wait_agreed(&addrs, &[1, 2, 3]);
    let port = free_ports(1)[0];
    let dir = tempfile::tempdir().unwrap();
    let seeds = format!("{},{}", addrs[0], addrs[1]);
    let node4 = join(4, port, &dir.path().join("node4"), &seeds);
    let addr4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut all = addrs.clone();
    all.push(addr4);
    let after = wait_agreed(&all, &[1, 2, 3, 4]);
    assert!(after.moves.planned > 0, "{after:?}");
    wait_until("node 4 answers /-/ready 200", BOUND, || {
        send(addr4, "GET", "/-/ready", &[], None).is_ok_and(|ready| ready.status == 200)
    });
    let health = send(addr4, "GET", "/-/health", &[], None).unwrap();
    assert!(
        health.text().contains(r#""status":"ok""#),
        "{}\nnode 4: {}",
        health.text(),
        node4.log()
    );
}

/// The members API's dry run runs on the receiving node's own applied
/// state, and its refusals are final: a node whose metadata replica lags
/// (here: cut off from its peers) answers `DELETE` of a member that the
/// cluster added 404 "not a member" (and a repeated `POST` 200 "already a
/// member" for one the cluster removed). An answer decided on a stale state
/// must not be a definite one: the node should ask the metadata leader, or
/// answer 503 when it cannot.
#[test]
fn a_lagging_node_does_not_answer_404_for_a_member_the_cluster_has() {
    let opts = ClusterOpts {
        shards: 4,
        relays: true,
        ..ClusterOpts::default()
    };
    let cluster = Cluster::start(3, 3, opts);
    let addrs: Vec<SocketAddr> = (1..=3).map(|id| cluster.addr(id)).collect();
    let before = wait_agreed(&addrs, &[1, 2, 3]);
    cluster.partition(3);
    // Added through the operator's endpoint, which does not probe the
    // address (the members API would refuse an address nobody answers at).
    let add = format!(
        r#"{{"AddMember": {{"id": 9, "addr": "127.0.0.1:{}"}}}}"#,
        free_ports(1)[0]
    );
    wait_until("the cluster adds node 9 without node 3", BOUND, || {
        [addrs[0], addrs[1]].iter().any(|addr| {
            send(*addr, "POST", "/-/meta/propose", &[], Some(&add)).is_ok_and(|r| r.status == 200)
        })
    });
    wait_until("nodes 1 and 2 show node 9", BOUND, || {
        [addrs[0], addrs[1]].iter().all(|addr| {
            view(*addr).is_some_and(|v| v.version > before.version && v.members.len() == 4)
        })
    });
    let delete = send(addrs[2], "DELETE", "/-/cluster/members/9", &[], None).unwrap();
    assert_ne!(
        delete.status,
        404,
        "node 3 (cut off, still at version {}) answered: {}",
        before.version,
        delete.text()
    );
    cluster.heal();
    wait_until("node 3 removes node 9 once healed", BOUND, || {
        send(addrs[2], "DELETE", "/-/cluster/members/9", &[], None)
            .is_ok_and(|r| matches!(r.status, 200 | 202) && r.text().contains("removed"))
    });
}

/// `GET /-/cluster` names each member's role in the metadata group from
/// `meta_voters(state)` (the lowest 5 active ids once 5 are active), but M3a
/// never changes the metadata group's voters after its bootstrap: with 5
/// active members the view shows 5 voters while the group still has the 3
/// founding ones. Killing 2 founding nodes then leaves 3 of the 5 "voters"
/// running and no quorum: every membership change is refused 503. The view
/// must name the group's actual voters (or the group must have them).
#[test]
fn the_metadata_voters_shown_by_the_cluster_view_make_a_quorum() {
    let opts = ClusterOpts {
        shards: 2,
        ..ClusterOpts::default()
    };
    let mut cluster = Cluster::start(3, 3, opts);
    let addrs: Vec<SocketAddr> = (1..=3).map(|id| cluster.addr(id)).collect();
    wait_agreed(&addrs, &[1, 2, 3]);
    let dir = tempfile::tempdir().unwrap();
    let seeds = format!("{},{}", addrs[0], addrs[2]);
    let ports = free_ports(2);
    let node4 = join(4, ports[0], &dir.path().join("node4"), &seeds);
    let node5 = join(5, ports[1], &dir.path().join("node5"), &seeds);
    let addr4: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    let addr5: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
    let mut all = addrs.clone();
    all.extend([addr4, addr5]);
    let agreed = wait_agreed(&all, &[1, 2, 3, 4, 5]);
    let shown: Vec<u64> = agreed
        .members
        .iter()
        .filter(|m| m.meta == MetaRole::Voter)
        .map(|m| m.id)
        .collect();
    // A minority of the shown voters down (the lowest ids: founding
    // nodes, never node 3) must leave a quorum.
    let down = (shown.len() - 1) / 2;
    assert!(down <= 2 && shown.len() >= 3, "{shown:?}");
    for id in &shown[..down] {
        cluster.kill9(*id);
    }
    let up = shown.len() - down;
    let survivor = addrs[2];
    let mut last = String::new();
    wait_until(
        &format!(
            "a membership change with {up} of the {} shown metadata voters ({shown:?}) up",
            shown.len()
        ),
        BOUND,
        || {
            let Ok(answer) = send(survivor, "DELETE", "/-/cluster/members/5", &[], None) else {
                return false;
            };
            last = format!("{} {}", answer.status, answer.text());
            answer.status != 503
        },
    );
    assert!(
        last.starts_with("202") || last.starts_with("200"),
        "{last}\nnode 4: {}\nnode 5: {}",
        node4.log(),
        node5.log()
    );
}
