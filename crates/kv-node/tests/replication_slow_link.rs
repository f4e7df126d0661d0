//! A slow link to one node (found by the 2026-11-30 break session).
//!
//! Every node-to-node link goes through a [`kv_testkit::Relay`]; the links
//! to and from the node leading the most shards are slowed (each chunk held
//! `delay` in each direction, so a request and its answer take `2 * delay`
//! more). Nothing is lost and nothing is cut: the other two replicas of
//! every shard still talk at loopback speed, so each shard keeps a quorum
//! that can elect and commit.
//!
//! Expected: within the testkit's bound, every shard takes writes and
//! serves linearizable reads again through a healthy node, the slow node's
//! shards included.
//!
//! What happened before `watch::check_quorum`, with 50 ms each way (a
//! 100 ms round trip): openraft 0.10.0-alpha.37 gives every append and
//! heartbeat RPC a timeout of `heartbeat_interval` (100 ms;
//! `replication/mod.rs`, `core/heartbeat/worker.rs`), so the slow leader
//! abandoned every RPC before its answer and never saw an acknowledgement
//! (no commit, no lease), while its heartbeats still arrived and kept its
//! followers from electing: its shards answered 503 for as long as the
//! link stayed slow (up to 115 s watched by hand, at 50-300 ms each way).
//! Now a leader without a quorum's acknowledgement for four leases hands
//! its leadership over, and the balancer does not hand it back to a
//! preferred leader it has not heard from within a lease.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kv_testkit::cluster::{send, BOUND};
use kv_testkit::{Cluster, ClusterOpts};
use support::key_per_shard;

const SHARDS: u32 = 8;

#[test]
fn a_slow_link_to_one_node_does_not_take_down_the_shards_it_leads() {
    slow_link(Duration::from_millis(50));
}

/// The control: the same with 10 ms each way (a 20 ms round trip) passes,
/// so the relay's delay itself is sound.
#[test]
fn control_a_link_slowed_under_the_lease_keeps_every_shard_writable() {
    slow_link(Duration::from_millis(10));
}

fn slow_link(delay: Duration) {
    let cluster = Cluster::start(
        3,
        3,
        ClusterOpts {
            shards: SHARDS,
            relays: true,
            ..ClusterOpts::default()
        },
    );
    let leaders = cluster.wait_for_leaders(BOUND);
    let led = |id: u64| leaders.iter().filter(|l| **l == id).count();
    let slow = (1..=3u64).max_by_key(|id| led(*id)).expect("three members");
    let healthy = (1..=3u64).find(|id| *id != slow).expect("another member");
    let slow_shards: Vec<usize> = (0..leaders.len()).filter(|s| leaders[*s] == slow).collect();
    assert!(
        !slow_shards.is_empty(),
        "node {slow} leads no shard: {leaders:?}"
    );
    let keys = key_per_shard("slow-link", SHARDS);

    cluster.delay_links(slow, delay);

    // Every shard must take a PUT and answer a GET with it through a
    // healthy node, without X-Kv-Route: direct (the node waits up to its
    // --leader-wait for a leader itself).
    let addr = cluster.addr(healthy);
    let mut pending: BTreeMap<usize, String> = (0..SHARDS as usize)
        .map(|s| (s, "not tried".to_string()))
        .collect();
    let deadline = Instant::now() + BOUND;
    let mut round = 0u32;
    while !pending.is_empty() && Instant::now() < deadline {
        round += 1;
        for shard in pending.keys().copied().collect::<Vec<_>>() {
            let key = &keys[shard];
            let value = format!("{{\"value\": {round}}}");
            let put = send(addr, "PUT", &format!("/{key}"), &[], Some(&value));
            let outcome = match put {
                Ok(r) if r.status == 200 => {
                    match send(addr, "GET", &format!("/{key}"), &[], None) {
                        Ok(g) if g.status == 200 && g.text().contains(&format!("{round}")) => None,
                        Ok(g) => Some(format!("GET {} {}", g.status, g.text().trim())),
                        Err(e) => Some(format!("GET failed: {e}")),
                    }
                }
                Ok(r) => Some(format!("PUT {} {}", r.status, r.text().trim())),
                Err(e) => Some(format!("PUT failed: {e}")),
            };
            match outcome {
                None => {
                    pending.remove(&shard);
                }
                Some(why) => {
                    pending.insert(shard, why);
                }
            }
        }
    }
    let ready = cluster.addr(slow);
    let slow_ready = send(ready, "GET", "/-/ready", &[], None)
        .map(|r| r.text())
        .unwrap_or_default();
    assert!(
        pending.is_empty(),
        "with node {slow}'s links slowed to {delay:?} each way (it led shards \
         {slow_shards:?}), these shards took no write through node {healthy} \
         within {BOUND:?} ({round} rounds), though the other two replicas \
         are a healthy quorum: {pending:#?}\nnode {slow}'s /-/ready: {slow_ready}"
    );
    cluster.delay_links(slow, Duration::ZERO);
}
