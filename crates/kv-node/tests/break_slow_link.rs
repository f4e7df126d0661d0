//! Break session (fresh eyes): a slow link to one node.
//!
//! Every node-to-node link goes through a [`kv_testkit::Relay`]; the links
//! to and from the node leading the most shards are slowed (each chunk held
//! `delay` in each direction, so a request and its answer take `2 * delay`
//! more). Nothing is lost and nothing is cut: the other two replicas of
//! every shard still talk at loopback speed, so each shard keeps a quorum
//! that can elect and commit.
//!
//! Expected: within an election's time (the bound here is the testkit's
//! generous 20 s), every shard takes writes and serves linearizable reads
//! again through a healthy node, the slow node's shards included (either
//! the slow leader commits, slowly, or the two fast replicas elect one of
//! themselves).
//!
//! What happens with 50 ms each way (a 100 ms round trip, half the 200 ms
//! lease): the slow node stays leader of its shards for good, its
//! `/-/ready` says "no quorum (this node leads; last quorum ack 28957 ms
//! ago)", its followers never elect, and every request for those shards
//! through any node gets `503 shard N has no leader (election in progress)`
//! after the 3 s leader wait. The cause, as far as read: openraft
//! 0.10.0-alpha.37 gives every append and heartbeat RPC a hard TTL of
//! `heartbeat_interval` (100 ms here; `replication/mod.rs`,
//! `core/heartbeat/worker.rs`), which kv-raft's transport enforces
//! (`net/client.rs`: `option.hard_ttl()`). With a round trip over 100 ms
//! the leader abandons every RPC before its answer, so it never sees an
//! ack (no commit, no lease), while the follower still receives each
//! heartbeat, resets its election timer and refuses votes: nobody takes
//! over. By hand (release, 64 shards, delaying relays in a netns): the same
//! at 50, 100, 150 and 300 ms each way, for as long as it was watched
//! (up to 115 s); at 30 ms each way shards serve (PUT mean 0.52 s).

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
