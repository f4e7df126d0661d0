//! Cluster mode: the real kv-proxy binary in front of three fake cluster
//! nodes (kv-testkit's [`FakeCluster`]: hyper servers on port 0 in this
//! process) that serve `/-/shards` and answer key requests 200/421/503/504
//! as each test scripts them, and count what they are sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_cluster::shard_of;
use kv_testkit::fake_cluster::Fault;
use kv_testkit::{binary, request, FakeCluster, Process};

const SHARDS: u32 = 4;

fn start() -> FakeCluster {
    FakeCluster::start(SHARDS)
}

fn proxy(fake: &FakeCluster, extra: &[&str]) -> Process {
    let nodes = fake.node_list();
    let mut args = vec!["--port", "0", "--nodes", &nodes];
    args.extend_from_slice(extra);
    Process::spawn(&binary("kv-proxy"), &args)
}

/// Calls `check` until it returns true, or panics after `limit`. The pause
/// between tries is polling, not synchronisation.
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let from = Instant::now();
    while !check() {
        assert!(from.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn put(proxy: &Process, key: &str, value: &str) -> kv_testkit::Response {
    let body = format!("{{\"value\": \"{value}\"}}");
    request(proxy.addr, "PUT", &format!("/{key}"), Some(body.as_bytes())).unwrap()
}

#[test]
fn a_421_is_followed_to_the_named_leader_and_the_client_sees_200() {
    let fake = start();
    // Every node says node 1 leads (term 1); node 2 does, in term 2.
    fake.set(|s| {
        s.actual = Some(2);
        s.actual_term = 2;
    });
    let proxy = proxy(&fake, &[]);
    let log = proxy.log();
    assert!(log.contains("cluster mode: 4 shards"), "{log}");

    let got = put(&proxy, "k1", "one");
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        got.header("x-kv-node"),
        Some(fake.addrs[1].to_string().as_str())
    );
    assert_eq!(fake.count(1, "PUT"), 1, "node 1 answered 421 once");
    assert_eq!(fake.count(2, "PUT"), 1, "node 2 took it");
    // The body was sent again, whole, and every request asked for 421s.
    fake.get(|s| {
        for seen in &s.seen {
            assert_eq!(&seen.body[..], b"{\"value\": \"one\"}");
            assert!(seen.direct, "X-Kv-Route: direct missing");
        }
    });
    // The table learned: the next request goes straight to node 2.
    let got = request(proxy.addr, "GET", "/k1", None).unwrap();
    assert_eq!(
        (got.status, got.text()),
        (200, "{\"value\":\"one\"}\n".into())
    );
    assert_eq!(fake.count(1, "GET"), 0);
    assert_eq!(fake.count(2, "GET"), 1);

    // A chunked body is buffered and resent the same way.
    fake.set(|s| {
        s.actual = Some(3);
        s.actual_term = 3;
    });
    let mut stream = std::net::TcpStream::connect(proxy.addr).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"PUT /k1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\n{\"valu\r\n8\r\ne\": \"two\r\n2\r\n\"}\r\n0\r\n\r\n",
    )
    .unwrap();
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut stream, &mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(fake.count(2, "PUT"), 2, "node 2 answered 421");
    assert_eq!(fake.count(3, "PUT"), 1);
    assert_eq!(
        fake.get(|s| s.data["k1"].clone()),
        Bytes::from("{\"value\":\"two\"}\n")
    );

    let metrics = request(proxy.addr, "GET", "/-/metrics", None)
        .unwrap()
        .text();
    assert!(
        metrics.contains("kv_proxy_not_leader_total 2\n"),
        "{metrics}"
    );
}

#[test]
fn the_proxy_waits_through_503s_until_a_leader_appears() {
    let fake = start();
    fake.set(|s| {
        s.advertised = None;
        s.advertised_term = 3;
        s.actual = None;
    });
    // A bound far above what the test needs: it ends by a leader appearing.
    let proxy = proxy(&fake, &["--leader-wait", "60s"]);
    let health = request(proxy.addr, "GET", "/-/health", None).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["shards_without_leader"].as_array().unwrap().len(), 4);

    let addr = proxy.addr;
    let client = thread::spawn(move || {
        request(addr, "PUT", "/waiting", Some(b"{\"value\": \"w\"}")).unwrap()
    });
    // The proxy refreshes its table while it waits (every 50 ms).
    let views = fake.get(|s| s.views);
    wait_until(
        Duration::from_secs(30),
        "no refreshes while waiting",
        || fake.get(|s| s.views) >= views + 3,
    );
    assert!(!client.is_finished(), "answered without a leader");
    // An election ends: node 3 leads in term 4.
    fake.set(|s| {
        s.advertised = Some(3);
        s.advertised_term = 4;
        s.actual = Some(3);
        s.actual_term = 4;
    });
    let got = client.join().unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(fake.count(3, "PUT"), 1, "applied once, by the leader");
    assert!(fake.get(|s| s.data.contains_key("waiting")));
    // Health follows the table.
    wait_until(Duration::from_secs(30), "health still degraded", || {
        let health = request(addr, "GET", "/-/health", None).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
        body["status"] == "ok"
    });
}

#[test]
fn no_leader_within_the_bound_is_503_and_nothing_is_applied() {
    let fake = start();
    fake.set(|s| {
        s.advertised = None;
        s.actual = None;
    });
    let proxy = proxy(&fake, &["--leader-wait", "300ms"]);
    let views = fake.get(|s| s.views);
    let got = put(&proxy, "nope", "x");
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(got.header("retry-after"), Some("1"));
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("has no leader (waited"), "{error}");
    assert!(fake.get(|s| s.views) > views, "it refreshed while waiting");
    assert!(
        fake.get(|s| s.data.is_empty()),
        "a refused write was applied"
    );
    // Nodes that said 503 are asked again only through the table: with no
    // leader known, nothing is sent at all.
    assert_eq!(
        fake.get(|s| s.seen.len()),
        0,
        "{:?}",
        fake.get(|s| s.seen.len())
    );
}

#[test]
fn a_503_from_the_leader_is_waited_out_then_refused() {
    let fake = start();
    // Node 2 is advertised but says 503 (it lost its quorum).
    fake.set(|s| {
        s.advertised = Some(2);
        s.advertised_term = 5;
        s.actual = None;
    });
    let proxy = proxy(&fake, &["--leader-wait", "300ms"]);
    let got = put(&proxy, "q", "x");
    assert_eq!(got.status, 503, "{}", got.text());
    assert!(fake.count(2, "PUT") >= 2, "retried while waiting");
    assert!(fake.get(|s| s.data.is_empty()));
}

#[test]
fn a_504_is_relayed_and_a_write_is_never_retried() {
    let fake = start();
    fake.set(|s| s.fault = Fault::Status504);
    let proxy = proxy(&fake, &[]);
    let got = put(&proxy, "u", "x");
    assert_eq!(got.status, 504, "{}", got.text());
    assert!(got.text().contains("outcome unknown"), "{}", got.text());
    assert_eq!(fake.count(1, "PUT"), 1, "a 504 write was retried");

    // A connection that breaks after the write went out: 504 too, once.
    fake.set(|s| s.fault = Fault::Close);
    let got = put(&proxy, "u", "y");
    assert_eq!(got.status, 504, "{}", got.text());
    assert!(got.text().contains("outcome unknown"), "{}", got.text());
    assert_eq!(fake.count(1, "PUT"), 2, "a broken write was retried");
    let got = request(proxy.addr, "DELETE", "/u", None).unwrap();
    assert_eq!(got.status, 504, "{}", got.text());
    assert_eq!(fake.count(1, "DELETE"), 1);

    let metrics = request(proxy.addr, "GET", "/-/metrics", None)
        .unwrap()
        .text();
    assert!(
        metrics.contains("kv_proxy_outcome_unknown_total 3\n"),
        "{metrics}"
    );
}

#[test]
fn stale_reads_are_spread_over_the_replicas() {
    let fake = start();
    // One worker: its turn goes round the replicas in order.
    let proxy = proxy(&fake, &["--workers", "1"]);
    assert_eq!(put(&proxy, "s", "v").status, 200);
    for _ in 0..6 {
        let mut stream = std::net::TcpStream::connect(proxy.addr).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET /s HTTP/1.1\r\nHost: x\r\nX-Kv-Consistency: stale\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut raw = String::new();
        std::io::Read::read_to_string(&mut stream, &mut raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(raw.ends_with("{\"value\":\"v\"}\n"), "{raw}");
    }
    // Every replica served some; the header went on to them.
    for id in 1..=3 {
        assert!(fake.count(id, "GET") >= 1, "replica {id} got no stale read");
    }
    fake.get(|s| {
        for seen in &s.seen {
            if seen.method == "GET" {
                assert_eq!(seen.consistency.as_deref(), Some("stale"));
            }
        }
    });
    // Without the header, reads go to the leader only.
    let before: Vec<usize> = (1..=3).map(|id| fake.count(id, "GET")).collect();
    for _ in 0..3 {
        assert_eq!(request(proxy.addr, "GET", "/s", None).unwrap().status, 200);
    }
    assert_eq!(fake.count(1, "GET"), before[0] + 3);
    assert_eq!(fake.count(2, "GET"), before[1]);
    assert_eq!(fake.count(3, "GET"), before[2]);
}

#[test]
fn owner_names_the_shard_and_its_leader() {
    let fake = start();
    let proxy = proxy(&fake, &[]);
    let got = request(proxy.addr, "GET", "/-/owner/abc", None).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["shard"], shard_of(b"abc", SHARDS));
    assert_eq!(body["owner"], fake.addrs[0].to_string());
    assert_eq!(body["up"], true);
}

#[test]
fn a_leader_that_refuses_connections_is_waited_out_until_a_new_one_is_named() {
    let fake = start();
    // Member 4 leads in every view, but nothing listens at its address
    // (killed); node 2 has taken over in term 2, which no view says yet.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    fake.set(|s| {
        s.members.insert(4, dead_addr.clone());
        s.advertised = Some(4);
        s.actual = Some(2);
        s.actual_term = 2;
    });
    let proxy = proxy(&fake, &["--leader-wait", "60s"]);
    let addr = proxy.addr;
    let client =
        thread::spawn(move || request(addr, "PUT", "/moved", Some(b"{\"value\": \"m\"}")).unwrap());
    let views = fake.get(|s| s.views);
    wait_until(
        Duration::from_secs(30),
        "no refreshes while waiting",
        || fake.get(|s| s.views) >= views + 3,
    );
    assert!(!client.is_finished(), "answered without a reachable leader");
    fake.set(|s| {
        s.advertised = Some(2);
        s.advertised_term = 2;
    });
    let got = client.join().unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(fake.count(2, "PUT"), 1);
    assert!(fake.get(|s| s.data.contains_key("moved")));
}

#[test]
fn standalone_nodes_keep_ring_routing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", dir.path().to_str().unwrap()],
    );
    // The node answers /-/shards with 404: it is not in a cluster.
    assert_eq!(
        request(node.addr, "GET", "/-/shards", None).unwrap().status,
        404
    );
    let name = node.addr.to_string();
    let proxy = Process::spawn(&binary("kv-proxy"), &["--port", "0", "--nodes", &name]);
    assert!(proxy.log_shows("ring mode"), "{}", proxy.log());
    let health = request(proxy.addr, "GET", "/-/health", None).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    assert_eq!(body["mode"], "ring", "{body}");
    assert!(body.get("shards_without_leader").is_none(), "{body}");
    let got = request(proxy.addr, "PUT", "/r", Some(b"{\"value\": 1}")).unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-kv-node"), Some(name.as_str()));
}

#[test]
fn a_leader_that_keeps_moving_is_followed_until_the_wait_bound_then_503() {
    let fake = start();
    fake.set(|s| s.bounce = true);
    let proxy = proxy(&fake, &["--leader-wait", "1s"]);
    let got = put(&proxy, "b", "x");
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(got.header("retry-after"), Some("1"));
    assert!(got.text().contains("changed leader"), "{}", got.text());
    // The first try, three hops at once, then more after table refreshes
    // until the bound; nothing applied.
    assert!(
        fake.get(|s| s.seen.len()) > 4,
        "{}",
        fake.get(|s| s.seen.len())
    );
    assert!(fake.get(|s| s.data.is_empty()));
}

#[test]
fn nodes_not_serving_yet_at_start_are_asked_again_until_one_answers() {
    let fake = start();
    // Nodes still starting: the first rounds of /-/shards are refused
    // (3 nodes per round, so this spans several rounds).
    fake.set(|s| s.views_refused = 7);
    let proxy = proxy(&fake, &[]);
    let log = proxy.log();
    assert!(log.contains("cluster mode: 4 shards"), "{log}");
    assert!(fake.get(|s| s.views) > 7, "asked again after the refusals");
    assert_eq!(put(&proxy, "k", "v").status, 200);
}

#[test]
fn no_answer_within_the_discover_wait_is_ring_mode_and_says_so() {
    let fake = start();
    fake.set(|s| s.views_refused = usize::MAX);
    let proxy = proxy(&fake, &["--discover-wait", "300ms"]);
    let log = proxy.log();
    assert!(log.contains("ring mode"), "{log}");
    assert!(
        log.contains("no node answered GET /-/shards within 300ms"),
        "{log}"
    );
}

/// The proxy's `/-/health` `mode`.
fn mode(proxy: &Process) -> String {
    let health = request(proxy.addr, "GET", "/-/health", None).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    body["mode"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_proxy_started_before_its_cluster_switches_to_leader_routing_once_it_shows() {
    let fake = start();
    // No node answers /-/shards while the proxy starts: ring mode.
    fake.set(|s| s.views_refused = usize::MAX);
    let proxy = proxy(
        &fake,
        &["--discover-wait", "300ms", "--rediscover-every", "200ms"],
    );
    assert!(proxy.log_shows("ring mode"), "{}", proxy.log());
    assert_eq!(mode(&proxy), "ring");
    // The nodes come up as a cluster: the periodic check finds it.
    fake.set(|s| {
        s.views_refused = 0;
        s.actual = Some(2);
        s.actual_term = 2;
    });
    wait_until(Duration::from_secs(20), "cluster mode", || {
        mode(&proxy) == "cluster"
    });
    // Now routed to the leader, as the direct route, after one 421.
    let got = put(&proxy, "late", "v");
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(fake.get(|s| s.data.contains_key("late")));
    assert!(fake.get(|s| s.seen.last().is_some_and(|seen| seen.direct)));
    // The line reaches the captured log through a pipe: wait for it.
    wait_until(Duration::from_secs(20), "the switch logged", || {
        proxy.log_shows("switching to cluster mode")
    });
    let log = proxy.log();
    assert_eq!(log.matches("switching to cluster mode").count(), 1, "{log}");
}

#[test]
fn a_cluster_answer_in_ring_mode_makes_the_proxy_ask_at_once() {
    let fake = start();
    fake.set(|s| s.views_refused = usize::MAX);
    // The periodic check is out of the picture: only an answer can wake it.
    let proxy = proxy(
        &fake,
        &["--discover-wait", "300ms", "--rediscover-every", "1h"],
    );
    assert_eq!(mode(&proxy), "ring");
    fake.set(|s| {
        s.views_refused = 0;
        s.actual = Some(2);
        s.actual_term = 2;
    });
    // In ring mode a key owned by node 1 or 3 gets their 421 (relayed as
    // ring mode relays everything); the 421 says "cluster".
    let mut sent = 0;
    wait_until(Duration::from_secs(20), "cluster mode after a 421", || {
        sent += 1;
        let _ = put(&proxy, &format!("k{sent}"), "v");
        mode(&proxy) == "cluster"
    });
    assert!(fake.count(1, "PUT") + fake.count(3, "PUT") >= 1);
    // The line reaches the captured log through a pipe: wait for it.
    wait_until(Duration::from_secs(20), "the switch logged", || {
        proxy.log_shows("switching to cluster mode")
    });
    let log = proxy.log();
    assert_eq!(log.matches("switching to cluster mode").count(), 1, "{log}");
}
