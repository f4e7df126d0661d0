//! Shared by the `membership_*` tests: reading `GET /-/cluster`, waiting
//! until nodes agree on the members or settle after a change, starting a
//! node with `--join`, reads and retried writes of single keys, node
//! metrics, and the end check of a change ([`assert_placed`]: every shard's
//! replicas where the ring puts them, and equal on every replica).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kv_cluster::{ClusterView, MemberState, ShardsView};
use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{binary, Process};

/// A whole rebalance (several moves, each a snapshot, a catch-up and two
/// membership changes) on a shared 2-core machine running debug builds.
pub const SETTLE: Duration = Duration::from_secs(120);

/// `GET /-/cluster` of the node at `addr`, when it answers 200.
pub fn view(addr: SocketAddr) -> Option<ClusterView> {
    let response = send(addr, "GET", "/-/cluster", &[], None).ok()?;
    if response.status != 200 {
        return None;
    }
    serde_json::from_slice(&response.body).ok()
}

/// Waits until every node in `addrs` shows the same version with exactly
/// `ids` as members, all active; returns one of the views.
pub fn wait_agreed(addrs: &[SocketAddr], ids: &[u64]) -> ClusterView {
    let mut last = None;
    wait_until(
        &format!("nodes {addrs:?} agree on a cluster state with members {ids:?} all active"),
        BOUND,
        || {
            let views: Option<Vec<ClusterView>> = addrs.iter().map(|a| view(*a)).collect();
            let Some(views) = views else { return false };
            let first = &views[0];
            let agreed = views.iter().all(|v| {
                v.version == first.version
                    && v.cluster_id == first.cluster_id
                    && v.members.iter().map(|m| m.id).collect::<Vec<_>>() == ids
                    && v.members.iter().all(|m| m.state == MemberState::Active)
            });
            if agreed {
                last = Some(first.clone());
            }
            agreed
        },
    );
    last.expect("a view")
}

/// The flags of a node `id` on `port` joining through `seeds`.
pub fn join_args(id: u64, port: u16, data: &Path, seeds: &str, advertise: &str) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--data-dir",
        &data.to_string_lossy(),
        "--node-id",
        &id.to_string(),
        "--join",
        seeds,
        "--advertise",
        advertise,
        "--exit-with-parent",
        "--workers",
        "2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Starts node `id` with `--join seeds`, advertising `127.0.0.1:port`.
pub fn join(id: u64, port: u16, data: &Path, seeds: &str) -> Process {
    let args = join_args(id, port, data, seeds, &format!("127.0.0.1:{port}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::spawn(&binary("kv-node"), &args)
}

/// `GET /<key>` on `addr`: status (0 for no answer) and body.
pub fn get(addr: SocketAddr, key: &str) -> (u16, String) {
    send(addr, "GET", &format!("/{key}"), &[], None)
        .map(|r| (r.status, r.text()))
        .unwrap_or((0, String::new()))
}

/// Sends until the answer is not a safe-to-retry one (as kv-proxy's safe
/// retries: 503 and 421 were not proposed; a PUT that got 504, or no answer
/// within the client's 10 s, is sent again, as a client that must know
/// does, the value being the same), for at most `BOUND`; returns the last
/// status.
pub fn retried(mut attempt: impl FnMut() -> u16) -> u16 {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let status = attempt();
        if !matches!(status, 0 | 503 | 504 | 421) || std::time::Instant::now() >= deadline {
            return status;
        }
        RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Answers [`retried`] sent again (reported, not asserted: how often depends
/// on the machine's load).
pub static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `PUT /<key>` of a string value on `addr`: the status (0 for no answer).
pub fn put(addr: SocketAddr, key: &str, value: &str) -> u16 {
    let body = format!(r#"{{"value": "{value}"}}"#);
    send(addr, "PUT", &format!("/{key}"), &[], Some(&body))
        .map(|r| r.status)
        .unwrap_or(0)
}

/// Writes `count` keys of `size`-byte values through `addrs` in turn.
pub fn write_keys(
    addrs: &[SocketAddr],
    prefix: &str,
    count: usize,
    size: usize,
) -> Vec<(String, String)> {
    (0..count)
        .map(|n| {
            let key = format!("{prefix}-{n}");
            let value = format!("{n:0size$}");
            let addr = addrs[n % addrs.len()];
            let body = format!(r#"{{"value": "{value}"}}"#);
            let mut last = String::new();
            let status = retried(|| {
                let answer = send(addr, "PUT", &format!("/{key}"), &[], Some(&body));
                last = answer.as_ref().map_or_else(|e| e.to_string(), |r| r.text());
                answer.map_or(0, |r| r.status)
            });
            assert_eq!(status, 200, "PUT {key} via {addr}: {last}");
            (key, value)
        })
        .collect()
}

/// Every key reads back its value through every node of `addrs`.
pub fn assert_readable(addrs: &[SocketAddr], keys: &[(String, String)]) {
    for addr in addrs {
        for (key, value) in keys {
            let mut got = (0, String::new());
            retried(|| {
                got = get(*addr, key);
                got.0
            });
            assert_eq!(
                got,
                (200, format!("{{\"value\":\"{value}\"}}\n")),
                // What the node knows of the shards, for the message.
                "GET {key} via {addr}; its /-/shards: {}",
                send(*addr, "GET", "/-/shards", &[], None)
                    .map_or_else(|e| e.to_string(), |r| r.text())
            );
        }
    }
}

/// Waits until every node of `addrs` shows one settled state (no open
/// move, every member active or removed) at one version whose non-removed
/// members are `ids`; returns it.
pub fn wait_settled(addrs: &[SocketAddr], ids: &[u64], logs: &dyn Fn() -> String) -> ClusterView {
    let mut last = None;
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let views: Option<Vec<ClusterView>> = addrs.iter().map(|a| view(*a)).collect();
        if let Some(views) = views {
            let first = &views[0];
            seen = format!(
                "versions {:?}, moves {:?}",
                views.iter().map(|v| v.version).collect::<Vec<_>>(),
                first.moves
            );
            let settled = views.iter().all(|v| {
                v.version == first.version
                    && v.settled
                    && v.members
                        .iter()
                        .filter(|m| m.state != MemberState::Removed)
                        .map(|m| m.id)
                        .collect::<Vec<_>>()
                        == ids
            });
            if settled {
                last = Some(first.clone());
            }
        }
        if last.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nodes {addrs:?} did not settle with members {ids:?} within {SETTLE:?} ({seen})\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    last.expect("a view")
}

pub fn shards_view(addr: SocketAddr) -> ShardsView {
    let response = send(addr, "GET", "/-/shards", &[], None).expect("GET /-/shards");
    assert_eq!(response.status, 200, "{}", response.text());
    ShardsView::parse(&response.body).expect("a shards view")
}

pub fn digest(addr: SocketAddr, shard: u32) -> Option<serde_json::Value> {
    let response = send(addr, "GET", &format!("/-/shards/{shard}/digest"), &[], None).ok()?;
    assert_eq!(response.status, 200, "{}", response.text());
    let json: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON");
    // `{"shard": s, "hosted": false}` when this node holds no replica.
    json.get("keys").is_some().then_some(json)
}

/// The value of `name` (summed over its series) in node `addr`'s metrics.
pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let response = send(addr, "GET", "/-/metrics", &[], None).expect("GET /-/metrics");
    response
        .text()
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Each node in `nodes` (id, address) hosts exactly the shards `placement`
/// (one row per shard) puts on it; every shard's group has exactly those voters, the same
/// leader everywhere, and the same keys and digest on every replica (once
/// followers applied what the leader did: waited for, bounded); a node not
/// placed has dropped its replica (no digest).
pub fn assert_placed(nodes: &[(u64, SocketAddr)], placement: &[Vec<u64>]) {
    for shard in 0..placement.len() as u32 {
        let placed: BTreeSet<u64> = placement[shard as usize].iter().copied().collect();
        let mut digests = Vec::new();
        let mut agree = || {
            digests = nodes
                .iter()
                .filter_map(|(id, addr)| {
                    let digest = digest(*addr, shard)?;
                    Some((*id, digest["keys"].clone(), digest["digest"].clone()))
                })
                .collect::<Vec<_>>();
            digests
                .windows(2)
                .all(|w| (&w[0].1, &w[0].2) == (&w[1].1, &w[1].2))
        };
        let deadline = std::time::Instant::now() + BOUND;
        while !agree() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !agree() {
            // A replica behind (lower applied index) or a real divergence
            // (same applied index, different digest): say which.
            let applied: Vec<(u64, serde_json::Value)> = nodes
                .iter()
                .filter_map(|(id, addr)| Some((*id, digest(*addr, shard)?["applied"].clone())))
                .collect();
            panic!(
                "shard {shard}: replicas differ: {digests:?}; applied indexes {applied:?}; \
                 leader seen by each: {:?}",
                nodes
                    .iter()
                    .map(|(id, addr)| (*id, shards_view(*addr).groups[shard as usize].leader))
                    .collect::<Vec<_>>()
            );
        }
        for (id, addr) in nodes {
            let group = shards_view(*addr).groups[shard as usize].clone();
            let replicas: BTreeSet<u64> = group.replicas.iter().copied().collect();
            assert_eq!(replicas, placed, "shard {shard} on node {id}: {group:?}");
            assert_eq!(
                group.hosted,
                placed.contains(id),
                "shard {shard} on node {id}"
            );
            assert_eq!(
                digest(*addr, shard).is_some(),
                placed.contains(id),
                "shard {shard} on node {id}: a replica {}",
                if placed.contains(id) {
                    "is missing"
                } else {
                    "was not dropped"
                }
            );
        }
    }
}

/// The moves from the ring's placement over `from` to the one over `to`
/// (replicas 3) are the ring's diff: every node of `addrs` counts them done,
/// and each was finished by exactly one executor among them. Returns how
/// many moves that is (more than zero).
pub fn assert_moves_finished(addrs: &[SocketAddr], from: &[u64], to: &[u64], shards: u32) -> u64 {
    let before = kv_cluster::placement_over(from.iter().copied(), shards, 3);
    let after = kv_cluster::placement_over(to.iter().copied(), shards, 3);
    let expected = kv_cluster::replicas_to_move(&before, &after) as u64;
    assert!(expected > 0);
    for addr in addrs {
        assert_eq!(metric(*addr, "kv_cluster_moves_done"), expected, "{addr}");
    }
    let finished: u64 = addrs
        .iter()
        .map(|addr| metric(*addr, "kv_cluster_moves_finished_total"))
        .sum();
    assert_eq!(finished, expected, "each move finished by one executor");
    expected
}

/// Exactly `expected` replicas are dropped across `addrs`, once each node
/// applied its moves' `Done` (waited for, bounded).
pub fn assert_dropped(addrs: &[SocketAddr], expected: u64) {
    let dropped = || -> u64 {
        addrs
            .iter()
            .map(|addr| metric(*addr, "kv_cluster_replicas_dropped_total"))
            .sum()
    };
    wait_until("each replaced replica dropped", BOUND, || {
        dropped() >= expected
    });
    assert_eq!(dropped(), expected, "only replaced replicas dropped");
}
