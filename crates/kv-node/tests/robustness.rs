//! What a new user finds with kill -9, SIGSTOP and cut links (issue 12's
//! robustness review): reads ride out a frozen leader, readiness tells the
//! truth about shards that lost their leader or quorum.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{Cluster, ClusterOpts, Response};
use support::key_per_shard;

const SHARDS: u32 = 8;

fn put(addr: SocketAddr, key: &str, value: &str) -> Response {
    let body = format!("{{\"value\": \"{value}\"}}");
    send(addr, "PUT", &format!("/{key}"), &[], Some(&body)).unwrap()
}

fn get(addr: SocketAddr, key: &str) -> Response {
    send(addr, "GET", &format!("/{key}"), &[], None).unwrap()
}

fn json(response: &Response) -> serde_json::Value {
    serde_json::from_slice(&response.body).unwrap()
}

/// The shards `id` leads in the agreed `leaders`.
fn led_by(leaders: &[u64], id: u64) -> Vec<usize> {
    (0..leaders.len()).filter(|s| leaders[*s] == id).collect()
}

#[test]
fn reads_ride_out_a_frozen_leader_through_the_proxy_and_through_a_node() {
    let cluster = Cluster::start(
        3,
        3,
        ClusterOpts {
            proxy: Some(Vec::new()),
            ..ClusterOpts::default()
        },
    );
    let proxy = cluster.proxy_addr().unwrap();
    let keys = key_per_shard("frozen", SHARDS);
    for key in &keys {
        let stored = put(proxy, key, key);
        assert_eq!(stored.status, 200, "{}", stored.text());
    }
    let frozen = cluster.leader_of_most_shards();
    let led = led_by(&cluster.wait_for_leaders(BOUND), frozen);
    assert!(!led.is_empty());

    // SIGSTOP: its sockets still accept, nothing answers. A read sent there
    // must move to the new leader once the others elect one: 200, not the
    // proxy's 504 after its request timeout.
    cluster.freeze(frozen);
    for shard in &led {
        let key = &keys[*shard];
        let read = get(proxy, key);
        assert_eq!(
            (read.status, read.text()),
            (200, format!("{{\"value\":\"{key}\"}}\n")),
            "shard {shard} through the proxy"
        );
    }
    cluster.thaw(frozen);

    // The same through a node that forwards a client's read: it gives the
    // frozen leader up when its group elects another, then serves.
    wait_until("the thawed node leads some shards again", BOUND, || {
        cluster
            .leaders()
            .is_some_and(|leaders| !led_by(&leaders, frozen).is_empty())
    });
    let led = led_by(&cluster.wait_for_leaders(BOUND), frozen);
    let via = if frozen == 1 { 2 } else { 1 };
    cluster.freeze(frozen);
    for shard in &led {
        let key = &keys[*shard];
        let read = get(cluster.addr(via), key);
        assert_eq!(
            (read.status, read.text()),
            (200, format!("{{\"value\":\"{key}\"}}\n")),
            "shard {shard} through node {via}"
        );
    }
    cluster.thaw(frozen);
}

/// Node `id`'s `/-/ready` status and body.
fn ready(cluster: &Cluster, id: u64) -> (u16, serde_json::Value) {
    let response = send(cluster.addr(id), "GET", "/-/ready", &[], None).unwrap();
    let body = json(&response);
    (response.status, body)
}

/// The shards a 503 `/-/ready` names, with their reasons.
fn unready_shards(body: &serde_json::Value) -> Vec<(u64, String)> {
    body["shards"]
        .as_array()
        .map(|shards| {
            shards
                .iter()
                .map(|s| {
                    (
                        s["shard"].as_u64().unwrap(),
                        s["reason"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn readiness_names_the_shards_that_lost_their_leader_or_quorum() {
    let mut cluster = Cluster::start(
        3,
        3,
        ClusterOpts {
            relays: true,
            ..ClusterOpts::default()
        },
    );
    // Healthy: every node is ready, though each leads only some shards
    // and follows leaders elsewhere for the rest.
    for id in 1..=3 {
        wait_until(&format!("node {id} ready"), BOUND, || {
            ready(&cluster, id).0 == 200
        });
    }

    // The leader of the most shards, cut off: its leaderships have no
    // quorum, its other replicas no leader it hears from.
    let cut = cluster.leader_of_most_shards();
    let led = led_by(&cluster.wait_for_leaders(BOUND), cut);
    cluster.partition(cut);
    let mut last = serde_json::Value::Null;
    wait_until(
        &format!("node {cut} not ready, naming all {SHARDS} shards"),
        BOUND,
        || {
            let (status, body) = ready(&cluster, cut);
            let ok = status == 503 && unready_shards(&body).len() == SHARDS as usize;
            last = body;
            ok
        },
    );
    let named = unready_shards(&last);
    for shard in &led {
        assert!(
            named.contains(&(*shard as u64, "no quorum".to_owned())),
            "shard {shard} led by the cut-off node: {last}"
        );
    }
    assert!(named.iter().any(|(_, why)| why == "no leader"), "{last}");
    assert_eq!(last["ready"], false);
    assert!(
        last["error"].as_str().unwrap().contains("no quorum"),
        "{last}"
    );
    // Health: still 200 (the process serves), but degraded, naming them.
    let health = send(cluster.addr(cut), "GET", "/-/health", &[], None).unwrap();
    assert_eq!(health.status, 200);
    let health = json(&health);
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(
        health["shards_unavailable"].as_array().unwrap().len(),
        SHARDS as usize,
        "{health}"
    );
    // The majority side elects and is ready.
    for id in (1..=3).filter(|id| *id != cut) {
        wait_until(
            &format!("node {id} ready on the majority side"),
            BOUND,
            || ready(&cluster, id).0 == 200,
        );
        let health = json(&send(cluster.addr(id), "GET", "/-/health", &[], None).unwrap());
        assert_eq!(health["status"], "ok", "{health}");
    }
    cluster.heal();
    for id in 1..=3 {
        wait_until(&format!("node {id} ready after the heal"), BOUND, || {
            ready(&cluster, id).0 == 200
        });
    }

    // Two of three gone: the survivor's shards have no quorum to elect.
    let survivor = 1;
    cluster.kill9(2);
    cluster.kill9(3);
    wait_until("the survivor not ready, naming every shard", BOUND, || {
        let (status, body) = ready(&cluster, survivor);
        status == 503 && unready_shards(&body).len() == SHARDS as usize
    });
}

/// The `cluster_id` in a data dir's `cluster.json`.
fn cluster_id_in(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(dir.join("cluster.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cluster_id"].as_str().unwrap().to_owned()
}

#[test]
fn a_node_started_on_another_clusters_data_dir_is_refused_by_its_peers() {
    // Cluster B: written to, then stopped; its data dirs stay.
    let mut b = Cluster::start(3, 3, ClusterOpts::default());
    let b_keys = key_per_shard("b", SHARDS);
    for key in &b_keys {
        assert_eq!(put(b.addr(1), key, "b").status, 200);
    }
    b.wait_caught_up(2, BOUND);
    for id in 1..=3 {
        b.kill9(id);
    }
    // Cluster A: the same member ids and addresses, its own data.
    let mut a = Cluster::start(
        3,
        3,
        ClusterOpts {
            ports: Some(b.ports()),
            ..ClusterOpts::default()
        },
    );
    let a_keys = key_per_shard("a", SHARDS);
    for key in &a_keys {
        assert_eq!(put(a.addr(1), key, "a").status, 200);
    }
    let (a_id, b_id) = (cluster_id_in(&a.data_dir(1)), cluster_id_in(&b.data_dir(2)));
    assert_ne!(a_id, b_id, "each cluster chose its own id");
    assert_eq!(cluster_id_in(&a.data_dir(3)), a_id, "agreed by all members");

    // A's node 2 started on B's node 2 data dir: same flags, same address.
    a.kill9(2);
    std::fs::remove_dir_all(a.data_dir(2)).unwrap();
    std::fs::rename(b.data_dir(2), a.data_dir(2)).unwrap();
    a.restart(2);
    for id in [1, 3] {
        wait_until(&format!("node {id} refuses node 2"), BOUND, || {
            a.log(id).contains(&format!(
                "node 2 belongs to cluster {b_id} but this node belongs to cluster {a_id}"
            ))
        });
    }
    wait_until("node 2 refuses its peers", BOUND, || {
        a.log(2).contains(&format!(
            "belongs to cluster {a_id} but this node belongs to cluster {b_id}"
        ))
    });
    // A refusal is a 409 naming both ids.
    let refused = send(
        a.addr(1),
        "POST",
        "/-/raft/vote",
        &[("X-Kv-Cluster-Id", &b_id), ("X-Kv-Node-Id", "2")],
        Some("{}"),
    )
    .unwrap();
    assert_eq!(refused.status, 409, "{}", refused.text());
    let body = json(&refused);
    assert_eq!(body["cluster_id"], a_id.as_str(), "{body}");
    assert_eq!(body["peer_cluster_id"], b_id.as_str(), "{body}");
    // The other shards keep serving: every key of A, through nodes 1 and 3,
    // once they elected leaders among themselves.
    a.wait_for_leaders_among(&[1, 3], BOUND);
    for key in &a_keys {
        let read = get(a.addr(3), key);
        assert_eq!(read.text(), "{\"value\":\"a\"}\n", "{key}");
        assert_eq!(put(a.addr(1), key, "a2").status, 200, "{key}");
    }
    // Node 2, refused by both other members, serves none of its (B's)
    // keys, not even a stale read: 503 naming both ids.
    let stale = [("X-Kv-Consistency", "stale")];
    wait_until("node 2 refuses stale reads", BOUND, || {
        send(a.addr(2), "GET", &format!("/{}", b_keys[0]), &stale, None)
            .is_ok_and(|read| read.status == 503)
    });
    for key in a_keys.iter().chain(&b_keys) {
        let read = send(a.addr(2), "GET", &format!("/{key}"), &stale, None).unwrap();
        assert_eq!(read.status, 503, "{key}: {}", read.text());
        let error = json(&read)["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains(&format!(
                "this node's data dir belongs to cluster {b_id}, its peers are cluster {a_id}"
            )),
            "{key}: {error}"
        );
    }
    // Logged once per peer.
    let log = a.log(1);
    assert_eq!(
        log.matches(&format!("node 2 belongs to cluster {b_id}"))
            .count(),
        1,
        "{log}"
    );
    // Node 2's replicas were neither joined nor overwritten: back in
    // cluster B (A stopped: same ports), they hold B's keys and none of A's.
    for id in 1..=3 {
        a.kill9(id);
    }
    std::fs::rename(a.data_dir(2), b.data_dir(2)).unwrap();
    for id in 1..=3 {
        b.restart(id);
    }
    // A stale read answers from what the replica has applied, and a replica
    // restarted by kill -9 may have lost its last committed-index records
    // (they ride the WAL's next batch): it re-learns them from the leader.
    // Ready means every shard applied the cluster's commit.
    wait_until("node 2 of cluster B is ready", BOUND, || {
        send(b.addr(2), "GET", "/-/ready", &[], None).is_ok_and(|ready| ready.status == 200)
    });
    for (a_key, b_key) in a_keys.iter().zip(&b_keys) {
        let theirs = send(b.addr(2), "GET", &format!("/{b_key}"), &stale, None).unwrap();
        assert_eq!(theirs.text(), "{\"value\":\"b\"}\n", "{b_key}");
        let ours = send(b.addr(2), "GET", &format!("/{a_key}"), &stale, None).unwrap();
        assert_eq!(ours.status, 404, "{a_key}: {}", ours.text());
    }
}
