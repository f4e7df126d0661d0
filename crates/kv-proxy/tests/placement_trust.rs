//! Review R1: one bad answer must not decide a proxy's shard table for good.
//!
//! The table takes members only from an answer whose placement version is
//! at least its own, and leaders only from a newer term. Both orders are
//! right for one honest cluster, but they used to be unbounded: one answer
//! with an absurd version (a buggy or foreign node) pinned the members
//! forever, and a cluster that was wiped and created again (versions and
//! terms restart at 1) was never followed by a proxy that outlived it. Now
//! the version is keyed by the cluster id `/-/shards` shows, and trusted
//! only while some node shows it (`kv_cluster::ShardTable::merge`). Against
//! kv-testkit's [`FakeCluster`], and the last test against real nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_cluster::{ClusterId, ClusterView, TableView};
use kv_testkit::cluster::{wait_until, Cluster, ClusterOpts, BOUND};
use kv_testkit::fake_cluster::Lagging;
use kv_testkit::{binary, request, FakeCluster, Process};

const SHARDS: u32 = 4;

fn proxy(nodes: &str) -> Process {
    Process::spawn(&binary("kv-proxy"), &["--port", "0", "--nodes", nodes])
}

fn table(proxy: &Process) -> TableView {
    let answer = request(proxy.addr, "GET", "/-/proxy/shards", None).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    serde_json::from_slice(&answer.body).unwrap()
}

fn put(proxy: &Process, key: &str) -> kv_testkit::Response {
    request(
        proxy.addr,
        "PUT",
        &format!("/{key}"),
        Some(b"{\"value\": 1}"),
    )
    .unwrap()
}

/// Node 3 answers `/-/shards` once with placement version `u64::MAX`
/// (its members otherwise the real ones), then behaves. The cluster then
/// really changes: node 4 joins at version 2 and leads shard 2. The proxy
/// must follow that change: once node 3 too shows version 2, no node shows
/// `u64::MAX` and the newest layout shown is taken.
#[test]
fn one_absurd_placement_version_does_not_pin_the_members_forever() {
    let fake = FakeCluster::start_with(SHARDS, 4);
    fake.set(|s| {
        s.version = Some(1);
        let members = s.members.clone();
        s.lagging.insert(
            3,
            Lagging {
                version: u64::MAX,
                members,
            },
        );
    });
    let proxy = proxy(&fake.node_list());
    wait_until("the proxy saw node 3's answer", BOUND, || {
        fake.get(|s| s.views_by.get(&3).copied().unwrap_or(0)) >= 1
    });
    // Node 3 is fixed; the cluster moves on to version 2 with node 4.
    fake.set(|s| {
        s.lagging.remove(&3);
    });
    fake.add_member(4, &[2]);
    wait_until(
        "the proxy takes version 2's members (node 4 leads shard 2)",
        BOUND,
        || {
            let table = table(&proxy);
            table.members.contains_key(&4) && table.groups[2].leader == Some(4)
        },
    );
    assert_eq!(table(&proxy).version, 2);
    assert!(
        proxy.log_shows("no node shows placement version 18446744073709551615 any more"),
        "{}",
        proxy.log()
    );
}

/// The cluster behind a long-running proxy is wiped and created again at
/// the same addresses (`scripts/cluster.sh down`, `rm -rf data`, `up` with
/// a proxy of its own left running): a new cluster id, its versions and
/// terms start again at 1. The old cluster's leader of every shard was
/// node 1 in term 50 at version 5; the new one's is node 2 in term 1, and
/// node 1 says so in its 421s. The proxy must serve the new cluster: every
/// node answers for the new id, so none vouches for the old one any more,
/// and the table is rebuilt from the new cluster's answers instead of
/// comparing its versions and terms with the old one's.
#[test]
fn a_cluster_created_again_at_the_same_addresses_is_followed() {
    let (old, new) = (ClusterId(0xa), ClusterId(0xb));
    let fake = FakeCluster::start(SHARDS);
    fake.set(|s| {
        s.cluster_id = Some(old);
        s.version = Some(5);
        s.advertised_term = 50;
        s.actual_term = 50;
    });
    let proxy = proxy(&fake.node_list());
    let key = fake.key_in(0);
    assert_eq!(put(&proxy, &key).status, 200);
    assert_eq!(table(&proxy).cluster_id, Some(old));
    fake.set(|s| {
        s.data.clear();
        s.cluster_id = Some(new);
        s.version = Some(1);
        s.advertised = Some(2);
        s.advertised_term = 1;
        s.actual = Some(2);
        s.actual_term = 1;
    });
    wait_until("a write through the proxy succeeds again", BOUND, || {
        put(&proxy, &key).status == 200
    });
    let table = table(&proxy);
    assert_eq!(table.cluster_id, Some(new));
    assert_eq!(table.version, 1);
    assert_eq!(fake.get(|s| s.data.len()), 1, "written to the new cluster");
    assert!(
        proxy.log_shows(&format!("cluster id changed from {old} to {new}")),
        "{}",
        proxy.log()
    );
}

/// A seed list that names a node of another, live cluster beside this
/// cluster's nodes: that node's answers are ignored whole (no member, no
/// leader taken from it), the table stays on the cluster it found first,
/// and the proxy says so once.
#[test]
fn a_seed_of_another_live_cluster_is_ignored() {
    let ours = FakeCluster::start(SHARDS);
    let theirs = FakeCluster::start(SHARDS);
    ours.set(|s| {
        s.cluster_id = Some(ClusterId(0xa));
        s.version = Some(1);
    });
    theirs.set(|s| {
        s.cluster_id = Some(ClusterId(0xb));
        s.version = Some(9);
    });
    let seeds = format!("{},{}", ours.node_list(), theirs.addrs[0]);
    let proxy = proxy(&seeds);
    let first = table(&proxy).cluster_id;
    let (followed, other) = match first {
        Some(ClusterId(0xa)) => (&ours, &theirs),
        _ => (&theirs, &ours),
    };
    let asked = other.get(|s| s.views_by.get(&1).copied().unwrap_or(0));
    wait_until(
        "four more refreshes ask the other cluster's seed",
        BOUND,
        || other.get(|s| s.views_by.get(&1).copied().unwrap_or(0)) >= asked + 4,
    );
    let table = table(&proxy);
    assert_eq!(table.cluster_id, first, "no flapping between the two");
    let members: Vec<String> = followed.get(|s| s.members.values().cloned().collect());
    assert_eq!(table.members.values().cloned().collect::<Vec<_>>(), members);
    let key = followed.key_in(0);
    assert_eq!(put(&proxy, &key).status, 200);
    assert_eq!(followed.get(|s| s.data.len()), 1);
    assert_eq!(other.get(|s| s.data.len()), 0);
    if first == Some(ClusterId(0xa)) {
        let log = proxy.log();
        let warned = log
            .lines()
            .filter(|line| line.contains("answers for cluster"))
            .count();
        assert_eq!(warned, 1, "said once:\n{log}");
    }
}

/// A `/-/shards` body past the proxy's 4 MiB bound is not read on: the
/// error is logged at warn and the table is kept, still routing.
#[test]
fn an_oversized_shards_body_is_refused_and_the_table_kept() {
    let fake = FakeCluster::start(SHARDS);
    fake.set(|s| s.version = Some(1));
    let proxy = proxy(&fake.node_list());
    let key = fake.key_in(1);
    assert_eq!(put(&proxy, &key).status, 200);
    fake.set(|s| {
        for id in 1..=3 {
            s.shards_pad.insert(id, 5 << 20);
        }
    });
    wait_until("the proxy says the body is too long", BOUND, || {
        proxy.log_shows("over 4194304 bytes")
    });
    let table = table(&proxy);
    assert_eq!(table.members.len(), 3, "the table is kept");
    assert_eq!(table.groups[1].leader, Some(1));
    assert_eq!(put(&proxy, &key).status, 200);
}

/// The id `GET /-/cluster` of `node` shows, once its metadata state is
/// bootstrapped (503 before).
fn cluster_id(node: std::net::SocketAddr) -> ClusterId {
    let mut id = None;
    wait_until("GET /-/cluster answers", BOUND, || {
        let answer = request(node, "GET", "/-/cluster", None).unwrap();
        if answer.status == 200 {
            id = serde_json::from_slice::<ClusterView>(&answer.body)
                .ok()
                .map(|view| view.cluster_id);
        }
        id.is_some()
    });
    id.unwrap()
}

/// The real binaries: a proxy following cluster A keeps serving after A is
/// torn down and a new cluster B is created on the same ports with new data
/// dirs. A's terms are raised first (its busiest leader is killed, so the
/// others elect in term 2 or later), so B's term-1 leaders can never win a
/// comparison by term: only the cluster id tells the proxy to start again.
#[test]
fn a_proxy_follows_a_real_cluster_created_again_on_the_same_ports() {
    let opts = ClusterOpts {
        shards: SHARDS,
        ..ClusterOpts::default()
    };
    let mut a = Cluster::start(3, 3, opts.clone());
    let ports = a.ports();
    let nodes = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let proxy = proxy(&nodes);
    // Before any node is killed: the founder (node 1) bootstraps the
    // metadata state, which a node needs to show /-/cluster.
    let old = cluster_id(a.addr(1));
    let busiest = a.leader_of_most_shards();
    a.kill9(busiest);
    let others: Vec<u64> = a
        .members()
        .into_iter()
        .filter(|&id| id != busiest)
        .collect();
    a.wait_for_leaders_among(&others, BOUND);
    let keys: Vec<String> = (0..SHARDS)
        .map(|shard| {
            (0..)
                .map(|i| format!("key_{i}"))
                .find(|key| kv_cluster::shard_of(key.as_bytes(), SHARDS) == shard)
                .unwrap()
        })
        .collect();
    for key in &keys {
        wait_until(&format!("PUT {key} to cluster A"), BOUND, || {
            put(&proxy, key).status == 200
        });
    }
    assert_eq!(table(&proxy).cluster_id, Some(old));
    assert!(
        table(&proxy).groups.iter().any(|g| g.term >= Some(2)),
        "A's terms were raised: {:?}",
        table(&proxy)
    );
    drop(a);

    let b = Cluster::start(
        3,
        3,
        ClusterOpts {
            ports: Some(ports),
            ..opts
        },
    );
    let new = cluster_id(b.addr(1));
    assert_ne!(new, old, "a new cluster");
    for key in &keys {
        wait_until(&format!("PUT {key} to cluster B"), BOUND, || {
            request(
                proxy.addr,
                "PUT",
                &format!("/{key}"),
                Some(b"{\"value\": 2}"),
            )
            .unwrap()
            .status
                == 200
        });
        let got = request(proxy.addr, "GET", &format!("/{key}"), None).unwrap();
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.text().trim(), "{\"value\":2}");
    }
    assert_eq!(table(&proxy).cluster_id, Some(new));
    wait_until("the proxy names B's leaders", BOUND, || {
        let named: Vec<Option<u64>> = table(&proxy).groups.iter().map(|g| g.leader).collect();
        b.leaders()
            .is_some_and(|leaders| leaders.into_iter().map(Some).collect::<Vec<_>>() == named)
    });
    assert!(
        proxy.log_shows(&format!("cluster id changed from {old} to {new}")),
        "{}",
        proxy.log()
    );
}
