//! The documented leader wait holds end to end, on a node and through the
//! proxy (a break session measured 503s after 3.1-3.3 s on a node and up to
//! 5.66 s through the proxy, behind 3 s waits): with two of three nodes
//! killed no shard can elect or confirm, and every request to the survivor,
//! direct or through kv-proxy, answers 503 JSON whose error names how long
//! the request waited, from its arrival, every try included: never more
//! than `--leader-wait`.
//!
//! No timing thresholds: the test checks the *reported* wait against the
//! bound (the code measures it from the request's arrival) and against
//! the time the client saw (a truthful report is never more).
//!
//! Before the fix the node's 503 named no wait at all ("shard 3 has no
//! quorum"), and the proxy's counted from the first failed try.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{reported_wait, Cluster, ClusterOpts};

const LEADER_WAIT: Duration = Duration::from_secs(1);

/// A key in each of `shards` shards.
fn key_per_shard(shards: u32) -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; shards as usize];
    let mut n = 0u32;
    while keys.iter().any(Option::is_none) {
        let key = format!("w-{n}");
        let shard = kv_cluster::shard_of(key.as_bytes(), shards) as usize;
        if let Some(slot @ None) = keys.get_mut(shard) {
            *slot = Some(key);
        }
        n += 1;
    }
    keys.into_iter().flatten().collect()
}

#[test]
fn without_a_quorum_503s_come_within_the_leader_wait_direct_and_through_the_proxy() {
    let opts = ClusterOpts {
        extra: vec!["--leader-wait".into(), "1s".into()],
        proxy: Some(vec!["--leader-wait".into(), "1s".into()]),
        ..ClusterOpts::default()
    };
    let shards = opts.shards;
    let mut cluster = Cluster::start(3, 3, opts);
    let proxy = cluster.proxy_addr().unwrap();
    let node = cluster.addr(1);
    let keys = key_per_shard(shards);
    for key in &keys {
        wait_until(&format!("PUT {key}"), BOUND, || {
            send(
                proxy,
                "PUT",
                &format!("/{key}"),
                &[],
                Some("{\"value\": 1}"),
            )
            .is_ok_and(|answer| answer.status == 200)
        });
    }

    cluster.kill9(2);
    cluster.kill9(3);
    // Every lease has run out once the survivor says no shard is ready:
    // from then on nothing can be proposed, so writes are refused (503),
    // not timed out (504).
    wait_until("the survivor has no shard ready", BOUND, || {
        let answer = send(node, "GET", "/-/ready", &[], None).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        answer.status == 503 && body["shards"].as_array().map_or(0, Vec::len) >= shards as usize
    });

    for key in &keys {
        for (way, addr) in [("direct", node), ("proxy", proxy)] {
            for (method, body) in [("GET", None), ("PUT", Some("{\"value\": 2}"))] {
                let sent = Instant::now();
                let answer = send(addr, method, &format!("/{key}"), &[], body).unwrap();
                let elapsed = sent.elapsed();
                let what = format!("{method} /{key} {way}");
                assert_eq!(answer.status, 503, "{what}: {}", answer.text());
                assert_eq!(answer.header("retry-after"), Some("1"), "{what}");
                assert_eq!(
                    answer.header("content-type"),
                    Some("application/json"),
                    "{what}"
                );
                let body: serde_json::Value = serde_json::from_slice(&answer.body)
                    .unwrap_or_else(|e| panic!("{what}: {e}: {}", answer.text()));
                let error = body["error"].as_str().unwrap();
                let waited = reported_wait(error);
                assert!(
                    waited <= LEADER_WAIT,
                    "{what}: reported {waited:?}, over the {LEADER_WAIT:?} wait: {error}"
                );
                assert!(
                    waited <= elapsed,
                    "{what}: reported {waited:?}, the client saw {elapsed:?}: {error}"
                );
            }
        }
    }
}
