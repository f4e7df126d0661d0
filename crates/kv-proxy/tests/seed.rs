//! `--nodes` as a seed list, and a proxy that follows the cluster's layout
//! (issue 13, `docs/membership.md` §6).
//!
//! Against a real 3-node cluster (kv-testkit's [`Cluster`]): a proxy given
//! one node's address serves every shard, and a second one given another
//! node agrees with it on every leader (`GET /-/proxy/shards`). Against
//! kv-testkit's [`FakeCluster`] (which can bump the placement version, add
//! and remove members, and keep one node on an older layout): a new
//! member's shards are routed to it without a restart, whichever of the
//! three triggers (an answer's `X-Kv-Placement-Version`, the periodic
//! check, a 421 naming an unknown address) notices first, and an older
//! version never replaces a newer one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_cluster::TableView;
use kv_testkit::cluster::{wait_until, Cluster, ClusterOpts, BOUND};
use kv_testkit::{binary, request, FakeCluster, Process};

const SHARDS: u32 = 4;

fn proxy(nodes: &str, extra: &[&str]) -> Process {
    let mut args = vec!["--port", "0", "--nodes", nodes];
    args.extend_from_slice(extra);
    Process::spawn(&binary("kv-proxy"), &args)
}

/// The proxy's shard table.
fn table(proxy: &Process) -> TableView {
    let answer = request(proxy.addr, "GET", "/-/proxy/shards", None).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    serde_json::from_slice(&answer.body).unwrap()
}

fn put(proxy: &Process, key: &str, value: &str) -> kv_testkit::Response {
    let body = format!("{{\"value\": \"{value}\"}}");
    request(proxy.addr, "PUT", &format!("/{key}"), Some(body.as_bytes())).unwrap()
}

#[test]
fn a_proxy_given_one_node_serves_every_shard_and_a_later_one_agrees() {
    let cluster = Cluster::start(3, 3, ClusterOpts::default());
    let shards = cluster.shards(1).unwrap().shards;
    let a = proxy(&cluster.addr(2).to_string(), &[]);
    // Every member was learnt from node 2 alone.
    let members = table(&a).members;
    let expected: Vec<String> = (1..=3).map(|id| cluster.addr(id).to_string()).collect();
    assert_eq!(members.values().cloned().collect::<Vec<_>>(), expected);
    for shard in 0..shards {
        let key = (0..)
            .map(|i| format!("seed_{i}"))
            .find(|key| kv_cluster::shard_of(key.as_bytes(), shards) == shard)
            .unwrap();
        let stored = put(&a, &key, &format!("v{shard}"));
        assert_eq!(stored.status, 200, "shard {shard}: {}", stored.text());
        let got = request(a.addr, "GET", &format!("/{key}"), None).unwrap();
        assert_eq!(
            (got.status, got.text()),
            (200, format!("{{\"value\":\"v{shard}\"}}\n")),
            "shard {shard}"
        );
    }

    // A second proxy, started later, knows only node 3.
    let b = proxy(&cluster.addr(3).to_string(), &[]);
    wait_until(
        "both proxies name the same leader for every shard, the one the nodes name",
        BOUND,
        || {
            let (ta, tb) = (table(&a), table(&b));
            let leaders: Option<Vec<u64>> = ta.groups.iter().map(|g| g.leader).collect();
            ta.version == tb.version
                && ta.members == tb.members
                && ta
                    .groups
                    .iter()
                    .zip(&tb.groups)
                    .all(|(x, y)| (x.leader, &x.leader_addr) == (y.leader, &y.leader_addr))
                && leaders.is_some()
                && leaders == cluster.leaders()
        },
    );
}

/// A fake cluster of 4 nodes (node 4 not a member yet) at version 1.
fn fake() -> FakeCluster {
    let fake = FakeCluster::start_with(SHARDS, 4);
    fake.set(|s| s.version = Some(1));
    fake
}

fn addr(fake: &FakeCluster, id: u64) -> String {
    fake.addrs[(id - 1) as usize].to_string()
}

/// Node 4 joins and leads shard 2: a request for another shard brings back
/// the newer version in its header, and that alone refreshes the table
/// (the periodic check is an hour away).
#[test]
fn a_newer_version_in_an_answer_routes_a_new_members_shards_to_it() {
    let fake = fake();
    let proxy = proxy(&addr(&fake, 1), &["--refresh-every", "1h"]);
    assert_eq!(table(&proxy).version, 1);
    fake.add_member(4, &[2]);
    let other = fake.key_in(0);
    assert_eq!(put(&proxy, &other, "x").status, 200);
    wait_until("the table takes version 2", BOUND, || {
        let table = table(&proxy);
        table.version == 2 && table.groups[2].leader == Some(4)
    });
    let moved = fake.key_in(2);
    let stored = put(&proxy, &moved, "y");
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert_eq!(stored.header("x-kv-node"), Some(addr(&fake, 4).as_str()));
    assert_eq!(fake.count_path(1, &format!("/{moved}")), 0, "straight to 4");
    let health = request(proxy.addr, "GET", "/-/health", None)
        .unwrap()
        .text();
    assert!(health.contains("\"nodes\":4"), "{health}");
    assert!(health.contains("\"placement_version\":2"), "{health}");
}

/// The same with no request at all: the periodic check finds it. Then node
/// 4 leaves again: its shard goes back to node 1 and the proxy drops it.
#[test]
fn the_periodic_check_follows_members_joining_and_leaving() {
    let fake = fake();
    let proxy = proxy(&addr(&fake, 2), &[]);
    fake.add_member(4, &[1, 3]);
    wait_until("the periodic refresh takes version 2", BOUND, || {
        let table = table(&proxy);
        table.version == 2 && table.members.contains_key(&4)
    });
    for shard in [1, 3] {
        let key = fake.key_in(shard);
        assert_eq!(put(&proxy, &key, "z").status, 200);
        assert_eq!(fake.count_path(4, &format!("/{key}")), 1);
        assert_eq!(fake.count_path(1, &format!("/{key}")), 0);
    }

    fake.remove_member(4);
    wait_until("node 4 is dropped", BOUND, || {
        let table = table(&proxy);
        let health = request(proxy.addr, "GET", "/-/health", None)
            .unwrap()
            .text();
        table.version == 3
            && !table.members.contains_key(&4)
            && table.groups[1].leader == Some(1)
            && health.contains("\"nodes\":3")
    });
    let key = fake.key_in(1);
    assert_eq!(put(&proxy, &key, "w").status, 200);
    assert_eq!(fake.count_path(1, &format!("/{key}")), 1);
    let metrics = request(proxy.addr, "GET", "/-/metrics", None)
        .unwrap()
        .text();
    assert!(
        metrics.contains("kv_proxy_placement_version 3"),
        "{metrics}"
    );
    assert!(!metrics.contains(&addr(&fake, 4)), "{metrics}");
}

/// Nodes that show no version (version 0 throughout): a 421 naming a
/// leader at an address the proxy does not know is followed, and refreshes
/// the table, which then has the new member.
#[test]
fn a_421_naming_an_unknown_address_is_followed_and_refreshes_the_table() {
    let fake = FakeCluster::start_with(SHARDS, 4);
    let proxy = proxy(&addr(&fake, 3), &["--refresh-every", "1h"]);
    fake.set(|s| {
        s.members.insert(4, s.addrs[3].clone());
        // Node 4 leads shard 0. The proxy does not ask /-/shards again for
        // an hour: only node 1's 421 tells it.
        s.leaders.insert(0, (4, 2));
    });
    let key = fake.key_in(0);
    let stored = put(&proxy, &key, "v");
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert_eq!(stored.header("x-kv-node"), Some(addr(&fake, 4).as_str()));
    assert_eq!(fake.count_path(1, &format!("/{key}")), 1, "the 421");
    wait_until("the 421 refreshed the table", BOUND, || {
        table(&proxy).members.contains_key(&4)
    });
    assert_eq!(table(&proxy).version, 0);
}

/// Node 2 keeps showing version 1 after node 4 joined: the proxy keeps
/// version 2's members and routes by them, however often it asks node 2;
/// and a proxy seeded with node 2 alone catches up from the others.
#[test]
fn an_older_version_never_replaces_a_newer_one() {
    let fake = fake();
    let first = proxy(&fake.node_list(), &[]);
    let old_members = fake.get(|s| s.members.clone());
    fake.add_member(4, &[2]);
    fake.set(|s| {
        s.lagging.insert(
            2,
            kv_testkit::fake_cluster::Lagging {
                version: 1,
                members: old_members,
            },
        );
    });
    wait_until("version 2", BOUND, || table(&first).version == 2);
    let asked = fake.get(|s| s.views_by.get(&2).copied().unwrap_or(0));
    wait_until("node 2 asked 3 more times", BOUND, || {
        fake.get(|s| s.views_by.get(&2).copied().unwrap_or(0)) >= asked + 3
    });
    let kept = table(&first);
    assert_eq!(kept.version, 2);
    assert!(kept.members.contains_key(&4), "{kept:?}");
    assert_eq!(kept.groups[2].leader, Some(4));
    // Answers from node 2 carry version 1: nothing to refresh for.
    let key = fake.key_in(2);
    assert_eq!(put(&first, &key, "n").status, 200);
    assert_eq!(fake.count_path(4, &format!("/{key}")), 1);

    // Its first table is node 2's version 1.
    let late = proxy(&addr(&fake, 2), &[]);
    wait_until("the late proxy catches up", BOUND, || {
        let table = table(&late);
        table.version == 2 && table.groups[2].leader == Some(4)
    });
}

#[test]
fn ring_mode_has_no_shard_table() {
    let dir = tempfile::tempdir().unwrap();
    let node = Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", dir.path().to_str().unwrap()],
    );
    let proxy = proxy(&node.addr.to_string(), &[]);
    let answer = request(proxy.addr, "GET", "/-/proxy/shards", None).unwrap();
    assert_eq!(answer.status, 404);
    assert!(answer.text().contains("ring mode"), "{}", answer.text());
}

/// A proxy that started in ring mode (no node answered `/-/shards` yet)
/// switches as soon as an answer carries a placement version, even a 200
/// from the leader: only cluster nodes send that header.
#[test]
fn a_placement_version_in_a_ring_mode_answer_makes_the_proxy_ask_at_once() {
    let fake = fake();
    fake.set(|s| s.views_refused = usize::MAX);
    // The periodic check is out of the picture: only an answer can wake it.
    let proxy = proxy(
        &fake.node_list(),
        &["--discover-wait", "300ms", "--rediscover-every", "1h"],
    );
    let mode = |proxy: &Process| {
        let health = request(proxy.addr, "GET", "/-/health", None).unwrap();
        let health: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
        health["mode"].as_str().unwrap().to_owned()
    };
    assert_eq!(mode(&proxy), "ring");
    fake.set(|s| s.views_refused = 0);
    // Keys the ring gives node 1, the leader: answered 200, never 421.
    let names: Vec<String> = fake.addrs.iter().take(3).map(ToString::to_string).collect();
    let ring = kv_ring::Ring::new(names, kv_ring::DEFAULT_VNODES).unwrap();
    let mut keys = (0..)
        .map(|i| format!("ring_{i}"))
        .filter(|key| ring.owner_index(key.as_bytes()) == 0);
    wait_until("cluster mode after a 200 with a version", BOUND, || {
        let key = keys.next().unwrap();
        assert_eq!(put(&proxy, &key, "v").status, 200);
        mode(&proxy) == "cluster"
    });
    assert_eq!(fake.count(2, "PUT") + fake.count(3, "PUT"), 0, "no 421");
}
