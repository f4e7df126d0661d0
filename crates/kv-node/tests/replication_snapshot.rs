//! Issue 12, test 5: a lagging replica gets a snapshot (design §14.5).
//!
//! Three nodes with `--raft-log-max-bytes 64KiB`, two shards. Node 3 is killed; the
//! others take writes until, for every shard, the leader's `/-/shards`
//! shows its log purged past everything node 3 could have had (so the log
//! it needs is gone and only a snapshot can bring it back). Node 3 restarts;
//! once it has applied what every leader has, the three replicas of every
//! shard hold identical data (`GET /-/shards/<s>/digest`: key count and an
//! order-independent digest), and node 3 counts installed snapshots
//! (`kv_raft_snapshot_installs_total` > 0).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{Cluster, ClusterOpts};
use support::Load;

const LAGGARD: u64 = 3;

#[test]
fn a_replica_back_after_the_log_was_purged_gets_a_snapshot_and_ends_identical() {
    let started = Instant::now();
    let opts = ClusterOpts {
        // A log is purged only 1000 entries behind its snapshot (kv-raft's
        // `max_in_snapshot_log_to_keep`), so every shard needs over a
        // thousand writes: few shards keep that short.
        shards: 2,
        extra: vec!["--raft-log-max-bytes".into(), "65536".into()],
        ..ClusterOpts::default()
    };
    let shards = opts.shards;
    let mut cluster = Cluster::start(3, 3, opts);
    let value = format!("{{\"value\": \"{}\"}}", "x".repeat(200));

    // Some data on all three first, then node 3 goes away with it.
    for i in 0..32 {
        let response = send(
            cluster.addr(1),
            "PUT",
            &format!("/early-{i}"),
            &[],
            Some(&value),
        )
        .unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
    }
    cluster.wait_caught_up(LAGGARD, BOUND);
    // What node 3 could have had: at most what any node has committed now
    // that nothing is in flight.
    let had: Vec<u64> = (0..shards)
        .map(|s| {
            cluster
                .members()
                .iter()
                .filter_map(|id| cluster.shards(*id)?.groups.get(s as usize)?.committed)
                .max()
                .unwrap_or(0)
        })
        .collect();
    cluster.kill9(LAGGARD);

    let written = Arc::new(AtomicU64::new(0));
    let writers = {
        let addrs = [cluster.addr(1), cluster.addr(2)];
        let written = written.clone();
        let value = value.clone();
        Load::start(6, move |i, stop| {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let key = format!("late-{i}-{}", n % 50);
                if let Ok(r) = send(addrs[n % 2], "PUT", &format!("/{key}"), &[], Some(&value)) {
                    if r.status == 200 {
                        written.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };
    wait_until(
        "every shard's leader purged its log past what node 3 had",
        BOUND * 3,
        || {
            let Some(leaders) = cluster.leaders() else {
                return false;
            };
            (0..shards as usize).all(|s| {
                cluster
                    .shards(leaders[s])
                    .and_then(|view| view.groups.get(s)?.purged)
                    .is_some_and(|purged| purged > had[s])
            })
        },
    );
    writers.stop();
    eprintln!(
        "{} writes while node {LAGGARD} was down; logs purged at {:?}",
        written.load(Ordering::SeqCst),
        started.elapsed()
    );

    cluster.restart(LAGGARD);
    let leaders = cluster.wait_for_leaders(BOUND);
    // Writes have stopped: "caught up" is "applied what the leader applied".
    wait_until(
        &format!("node {LAGGARD} applied what every leader did"),
        BOUND,
        || {
            let Some(mine) = cluster.shards(LAGGARD) else {
                return false;
            };
            (0..shards as usize).all(|s| {
                let theirs = cluster
                    .shards(leaders[s])
                    .and_then(|view| view.groups.get(s)?.applied);
                mine.groups.get(s).and_then(|g| g.applied) == theirs && theirs.is_some()
            })
        },
    );
    for shard in 0..shards {
        let mut digests = Vec::new();
        wait_until(&format!("shard {shard}'s replicas agree"), BOUND, || {
            digests = cluster.digests(shard);
            digests.len() == 3
                && digests
                    .iter()
                    .all(|d| (&d.1, &d.2) == (&digests[0].1, &digests[0].2))
        });
        assert!(
            digests[0].1.as_u64().is_some_and(|keys| keys > 0),
            "shard {shard}: {digests:?}"
        );
    }
    let installs = cluster.metric_sum(LAGGARD, "kv_raft_snapshot_installs_total");
    assert!(installs > 0, "node {LAGGARD} installed no snapshot");
    eprintln!(
        "node {LAGGARD} installed {installs} snapshots; every shard identical on all three; {:?} in all",
        started.elapsed()
    );
}
