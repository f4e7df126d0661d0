//! Findings of a new user's review of issue 12's replication (the
//! "breaker" session) about a node started on another cluster's data dir,
//! each as a test through the real binaries. Its peers refuse it (409), and
//! kv-proxy still takes its `GET /-/shards` into its table and sends it
//! clients: stale reads through the proxy answered the other cluster's
//! values. Now the node, refused by a majority of the other members, serves
//! no key at all (design §8): 503 in its own words, `/-/ready` 503 and
//! `/-/health` "degraded" with the reason.
//!
//! (The review's tests that do not concern a foreign node are not here.)

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

/// Cluster A (with a proxy) whose node 2 runs on cluster B's node 2 data
/// dir (same member ids and addresses), once nodes 1 and 3 lead every
/// shard among themselves. Returns A, B (kept so its temp dir lives), A's
/// keys (value "a") and B's keys (value "b", written only to B).
fn a_with_bs_node_2() -> (Cluster, Cluster, Vec<String>, Vec<String>) {
    let mut b = Cluster::start(3, 3, ClusterOpts::default());
    let b_keys = key_per_shard("b", SHARDS);
    for key in &b_keys {
        assert_eq!(put(b.addr(1), key, "b").status, 200);
    }
    b.wait_caught_up(2, BOUND);
    for id in 1..=3 {
        b.kill9(id);
    }
    let mut a = Cluster::start(
        3,
        3,
        ClusterOpts {
            ports: Some(b.ports()),
            proxy: Some(Vec::new()),
            ..ClusterOpts::default()
        },
    );
    let a_keys = key_per_shard("a", SHARDS);
    for key in &a_keys {
        assert_eq!(put(a.addr(1), key, "a").status, 200);
    }
    a.kill9(2);
    std::fs::remove_dir_all(a.data_dir(2)).unwrap();
    std::fs::rename(b.data_dir(2), a.data_dir(2)).unwrap();
    a.restart(2);
    wait_until("node 1 refuses node 2", BOUND, || {
        a.log(1).contains("node 2 belongs to cluster")
    });
    a.wait_for_leaders_among(&[1, 3], BOUND);
    (a, b, a_keys, b_keys)
}

#[test]
fn a_foreign_node_serves_no_stale_read_through_the_proxy() {
    let (a, _b, _a_keys, b_keys) = a_with_bs_node_2();
    let proxy = a.proxy_addr().unwrap();
    // The proxy spreads stale reads over a shard's replicas: enough tries
    // to reach each of the three several times.
    let stale = [("X-Kv-Consistency", "stale")];
    let mut foreign = Vec::new();
    for key in &b_keys {
        for _ in 0..9 {
            let read = send(proxy, "GET", &format!("/{key}"), &stale, None).unwrap();
            if read.status != 404 {
                foreign.push(format!("{key}: {} {}", read.status, read.text().trim_end()));
            }
        }
    }
    // B's keys were never written to cluster A: A has none of them.
    assert!(
        foreign.is_empty(),
        "stale reads through A's proxy answered cluster B's data: {foreign:#?}"
    );
}

#[test]
fn a_foreign_node_costs_no_errors_through_the_proxy() {
    let (a, _b, a_keys, _b_keys) = a_with_bs_node_2();
    let proxy = a.proxy_addr().unwrap();
    // Nodes 1 and 3 lead every shard and are a majority of each: every
    // request through the proxy can be served.
    let mut refused = Vec::new();
    for round in 0..10 {
        for key in &a_keys {
            let stored = put(proxy, key, &format!("a{round}"));
            if stored.status != 200 {
                refused.push(format!(
                    "{key}: {} {}",
                    stored.status,
                    stored.text().trim_end()
                ));
            }
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {} writes through the proxy refused while nodes 1 and 3 serve every shard: {refused:#?}",
        refused.len(),
        10 * a_keys.len()
    );
}

/// Node 2 itself, asked directly: refused by both other members, it
/// answers every key request 503 in its own words (a stale read of B's key
/// included, never B's value), and says why on `/-/ready` and `/-/health`.
#[test]
fn a_foreign_node_refuses_every_key_request_and_says_why() {
    let (a, _b, a_keys, b_keys) = a_with_bs_node_2();
    let node2 = a.addr(2);
    let reason = "this node's data dir belongs to cluster";
    // Node 2 learns it from the 409s its own Raft traffic receives.
    wait_until("node 2's /-/ready names the other cluster", BOUND, || {
        send(node2, "GET", "/-/ready", &[], None)
            .is_ok_and(|ready| ready.status == 503 && ready.text().contains(reason))
    });
    let stale = [("X-Kv-Consistency", "stale")];
    for key in b_keys.iter().chain(&a_keys) {
        for (method, headers, body) in [
            ("GET", &stale[..], None),
            ("GET", &[][..], None),
            ("PUT", &[][..], Some("{\"value\": \"x\"}")),
            ("DELETE", &[][..], None),
        ] {
            let answer = send(node2, method, &format!("/{key}"), headers, body).unwrap();
            let text = answer.text();
            assert_eq!(answer.status, 503, "{method} /{key}: {text}");
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let error = json["error"].as_str().unwrap();
            assert!(
                error.starts_with("Service unavailable: ") && error.contains(reason),
                "{method} /{key}: {error}"
            );
            assert!(
                !text.contains("\"b\""),
                "{method} /{key} answered B's value: {text}"
            );
        }
    }
    let health = send(node2, "GET", "/-/health", &[], None).unwrap();
    let health: serde_json::Value = serde_json::from_str(&health.text()).unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["error"].as_str().is_some_and(|e| e.contains(reason)),
        "{health}"
    );
    // Nodes 1 and 3 are refused by node 2 only, a minority of their other
    // members: they keep serving, and A's keys read "a" through them.
    for id in [1, 3] {
        let read = send(a.addr(id), "GET", &format!("/{}", a_keys[0]), &stale, None).unwrap();
        assert_eq!(read.status, 200, "node {id}: {}", read.text());
        let ready = send(a.addr(id), "GET", "/-/ready", &[], None).unwrap();
        assert!(
            !ready.text().contains(reason),
            "node {id}: {}",
            ready.text()
        );
    }
    assert_eq!(
        a.log(2).matches("other members refuse this node").count(),
        1,
        "logged once: {}",
        a.log(2)
    );
}

/// The refusal lasts only while the peers refuse: once nodes 1 and 3 are
/// restarted on B's data dirs too, node 2 (not restarted) is accepted by
/// them and serves B's keys again.
#[test]
fn a_foreign_node_serves_again_once_its_peers_accept_it() {
    let (mut a, b, _a_keys, b_keys) = a_with_bs_node_2();
    let node2 = a.addr(2);
    let stale = [("X-Kv-Consistency", "stale")];
    let read_b = |key: &str| send(node2, "GET", &format!("/{key}"), &stale, None).unwrap();
    wait_until("node 2 refuses stale reads", BOUND, || {
        read_b(&b_keys[0]).status == 503
    });
    for id in [1, 3] {
        a.kill9(id);
        std::fs::remove_dir_all(a.data_dir(id)).unwrap();
        std::fs::rename(b.data_dir(id), a.data_dir(id)).unwrap();
        a.restart(id);
    }
    wait_until("node 2 serves B's keys again", BOUND, || {
        read_b(&b_keys[0]).status == 200
    });
    // Ready first: a stale read answers from what node 2 has applied, and
    // B's kill -9 may have cost it its last committed-index records (they
    // ride the WAL's next batch) until the leader re-teaches the commit.
    wait_until("node 2 is ready", BOUND, || {
        send(node2, "GET", "/-/ready", &[], None).is_ok_and(|ready| ready.status == 200)
    });
    for key in &b_keys {
        let read = read_b(key);
        assert_eq!(read.text(), "{\"value\":\"b\"}\n", "{key}");
    }
    assert!(a.log(2).contains("accept this node again"), "{}", a.log(2));
}
