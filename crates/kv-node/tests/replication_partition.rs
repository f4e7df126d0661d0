//! Issue 12, test 4: partition (design §14.4).
//!
//! Every node-to-node link (Raft traffic and forwarded client requests)
//! goes through its own test-controlled [`kv_testkit::Relay`]. One cluster,
//! `KV_PARTITION_RUNS` runs (default 20 with lease reads, the default
//! policy, and a quarter of that with read-index). In each run nine clients
//! (three on each node, no `X-Kv-Route: direct`, so nodes
//! forward) do GET/PUT/DELETE on a fresh key per shard while the node
//! leading the most shards is cut off from both peers (every link to and
//! from it black-holed: bytes held, no error) until the other two have
//! elected leaders for every shard and served more operations; then the
//! links heal and every shard has one agreed leader again. Per run:
//! * the cut-off node acknowledges nothing and serves no linearizable read
//!   while it is cut off: no operation sent to it after the cut and
//!   answered before the heal has an `ok` outcome (its answers are
//!   421/503/504 only);
//! * every key's history is linearizable (kv-bench's checker, the one
//!   `kv-bench check-history` runs).
//!
//! `scripts/partition-soak.sh` runs this with many more runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kv_bench::history::now_ns;
use kv_bench::linearizability::Input;
use kv_testkit::cluster::BOUND;
use kv_testkit::{Cluster, ClusterOpts};
use support::{key_per_shard, Answer, History, Load};

const CLIENTS: usize = 9;

/// `(node, invoke, return, answer, is a read)` of every operation.
type Sent = Arc<Mutex<Vec<(u64, u64, u64, Answer, bool)>>>;

/// With `--read-policy read-index` (the opt-in without a clock
/// assumption): a quarter of the runs, as the default policy gets them all.
#[test]
fn a_node_cut_off_from_its_peers_acknowledges_nothing_and_histories_stay_linearizable() {
    let runs: u32 = std::env::var("KV_PARTITION_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(5, |runs: u32| runs.div_ceil(4));
    partition_runs("read-index", runs);
}

/// The same with `--read-policy lease`: the cut-off leader may still answer
/// reads while its lease holds (no other leader can be elected before it
/// lapses), so the check on it is that it acknowledges no write; the
/// histories must stay linearizable all the same. Lease reads are the
/// default (and most are served off the leader's published Raft metrics),
/// so this policy gets the 20 runs.
#[test]
fn with_lease_reads_a_cut_off_leader_acknowledges_no_write_and_histories_stay_linearizable() {
    let runs: u32 = std::env::var("KV_PARTITION_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    partition_runs("lease", runs);
}

fn partition_runs(read_policy: &str, runs: u32) {
    let started = Instant::now();
    let opts = ClusterOpts {
        relays: true,
        // --leader-wait 0s: the cut-off node answers its clients at once
        // (what it answers is the point; waiting would only slow each run).
        extra: vec![
            "--raft-write-timeout".into(),
            "1s".into(),
            "--leader-wait".into(),
            "0s".into(),
            "--read-policy".into(),
            read_policy.into(),
        ],
        ..ClusterOpts::default()
    };
    let shards = opts.shards;
    let cluster = Cluster::start(3, 3, opts);
    let members = cluster.members();
    let values = Arc::new(AtomicU32::new(1));
    let (mut total_ops, mut total_victim) = (0, 0);

    for run in 0..runs {
        let run_started = Instant::now();
        let history = History::new();
        let keys = key_per_shard(&format!("p{run}"), shards);
        let sent: Sent = Arc::default();
        let load = {
            let history = history.clone();
            let sent = sent.clone();
            let values = values.clone();
            let nodes: Vec<(u64, std::net::SocketAddr)> =
                members.iter().map(|id| (*id, cluster.addr(*id))).collect();
            Load::start(CLIENTS, move |i, stop| {
                let mut client = history.client();
                let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ ((run as u64) << 32 | i as u64);
                // Each client sticks to one node, so that clients of the
                // majority are not held up by the cut-off node's slow
                // answers.
                let (node, addr) = nodes[i % nodes.len()];
                while !stop.load(Ordering::SeqCst) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let key = &keys[(rng % keys.len() as u64) as usize];
                    let input = match (rng >> 16) % 10 {
                        0..=4 => Input::Get,
                        5..=8 => Input::Put(values.fetch_add(1, Ordering::SeqCst)),
                        _ => Input::Delete,
                    };
                    let read = matches!(input, Input::Get);
                    let (answer, invoke, ret) = client.timed(addr, key, input);
                    sent.lock().unwrap().push((node, invoke, ret, answer, read));
                }
            })
        };
        let before = history.acknowledged();
        kv_testkit::cluster::wait_until("the clients are answered", BOUND, || {
            history.acknowledged() >= before + 50
        });

        let loaded = run_started.elapsed();
        let victim = cluster.leader_of_most_shards();
        let majority: Vec<u64> = members.iter().copied().filter(|id| *id != victim).collect();
        cluster.partition(victim);
        let cut = now_ns();
        cluster.wait_for_leaders_among(&majority, BOUND);
        let elected = now_ns();
        let before = history.acknowledged();
        kv_testkit::cluster::wait_until("the majority serves clients", BOUND, || {
            history.acknowledged() >= before + 50
        });
        let phases = format!(
            "loaded in {loaded:?}, leaders elected {:?} after the cut, majority served {:?} after",
            std::time::Duration::from_nanos(elected - cut),
            std::time::Duration::from_nanos(now_ns() - elected)
        );
        let heal = now_ns();
        cluster.heal();
        cluster.wait_for_leaders(BOUND);
        load.stop();

        let sent = sent.lock().unwrap().clone();
        if std::env::var("KV_PARTITION_DEBUG").is_ok() {
            for (node, invoke, ret, answer, _) in sent.iter().filter(|s| s.0 == victim && s.2 > cut)
            {
                eprintln!(
                    "  node {node}: {:?} after the cut, took {:?}: {answer:?}",
                    std::time::Duration::from_nanos(invoke.saturating_sub(cut)),
                    std::time::Duration::from_nanos(ret - invoke)
                );
            }
        }
        let to_victim: Vec<_> = sent
            .iter()
            .filter(|(node, invoke, ret, _, _)| *node == victim && *invoke > cut && *ret < heal)
            .collect();
        for (_, invoke, ret, answer, read) in &to_victim {
            if read_policy == "lease" && *read {
                continue;
            }
            assert!(
                !matches!(answer, Answer::Ok(_)),
                "run {run}: node {victim}, cut off, answered {answer:?} to an operation at {invoke}..{ret} (cut at {cut}, healed at {heal})"
            );
        }
        history
            .check_linearizable()
            .unwrap_or_else(|e| panic!("run {run} (node {victim} cut off): {e}"));
        eprintln!(
            "run {run}: node {victim} cut off; {} operations, {} acknowledged, {} sent to it while cut off; {phases}; {:?}",
            sent.len(),
            history.acknowledged(),
            to_victim.len(),
            run_started.elapsed()
        );
        total_ops += sent.len();
        total_victim += to_victim.len();
    }
    eprintln!(
        "{read_policy}: {runs} partition runs, {total_ops} operations ({total_victim} to a cut-off node), 0 violations, in {:?}",
        started.elapsed()
    );
    assert!(
        runs == 0 || total_victim > 0,
        "no operation reached a cut-off node"
    );
}
