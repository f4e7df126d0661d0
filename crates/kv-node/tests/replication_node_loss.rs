//! Issue 12, test 1: node loss under load (design §14.1).
//!
//! Three nodes, three replicas, a kv-proxy in front. 16 writers (each its
//! own key, increasing values) and 16 readers run through the proxy while
//! the node leading the most shards is killed with SIGKILL; within 10 s
//! every shard has a leader again and takes a PUT and a GET. The node is
//! restarted and catches up; then another node is killed, with the same
//! checks. At the end:
//! * no acknowledged write is lost: every key reads its last acknowledged
//!   value or a later one;
//! * no read returned a value older than the last write acknowledged before
//!   the read began (per key);
//! * every key's whole history is linearizable (kv-bench's checker).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_bench::linearizability::{Input, Op, Output};
use kv_testkit::cluster::{wait_until, BOUND};
use kv_testkit::{Cluster, ClusterOpts};
use support::{key_per_shard, Answer, History, Load};

/// The bound for "every key readable and writable again".
const FAILOVER_BOUND: Duration = Duration::from_secs(10);
const WRITERS: usize = 16;
const READERS: usize = 16;

fn writer_key(i: usize) -> String {
    format!("w{i}")
}

#[test]
fn losing_a_node_under_load_loses_no_acknowledged_write() {
    let started = Instant::now();
    let opts = ClusterOpts {
        proxy: Some(Vec::new()),
        ..ClusterOpts::default()
    };
    let shards = opts.shards;
    let mut cluster = Cluster::start(3, 3, opts);
    let proxy = cluster.proxy_addr().unwrap();
    let history = History::new();

    let writers = {
        let history = history.clone();
        Load::start(WRITERS, move |i, stop| {
            let key = writer_key(i);
            let mut client = history.client();
            let mut value = 0;
            while !stop.load(Ordering::SeqCst) {
                value += 1;
                client.put(proxy, &key, value);
            }
        })
    };
    let readers = {
        let history = history.clone();
        Load::start(READERS, move |i, stop| {
            let mut client = history.client();
            let mut n = i;
            while !stop.load(Ordering::SeqCst) {
                client.get(proxy, &writer_key(n % WRITERS));
                n += 1;
            }
        })
    };
    wait_until("the load is running", BOUND, || {
        history.acknowledged() >= 200
    });

    let first = cluster.leader_of_most_shards();
    lose(&mut cluster, first, &history, shards, "a");
    eprintln!(
        "killed node {first}: recovered ({:?} in)",
        started.elapsed()
    );

    cluster.restart(first);
    cluster.wait_caught_up(first, BOUND);
    let leaders = cluster.wait_for_leaders(BOUND);
    let second = cluster
        .members()
        .into_iter()
        .filter(|id| *id != first)
        .max_by_key(|id| leaders.iter().filter(|l| *l == id).count())
        .unwrap();
    lose(&mut cluster, second, &history, shards, "b");
    eprintln!(
        "killed node {second}: recovered ({:?} in)",
        started.elapsed()
    );

    writers.stop();
    readers.stop();

    // Every key's last acknowledged value, or a later one, is there.
    let ops = history.ops();
    let mut final_reads = history.client();
    for i in 0..WRITERS {
        let key = writer_key(i);
        let last_acked = last_acknowledged(&ops[&key]);
        let answer = final_reads.get(proxy, &key);
        let Answer::Ok(Output::Read(read)) = answer else {
            panic!("final GET {key}: {answer:?}");
        };
        assert!(
            read >= last_acked,
            "{key}: acknowledged write {last_acked:?} lost, read {read:?}"
        );
    }
    // No read older than the last write acknowledged before it began.
    let ops = history.ops();
    let mut reads = 0;
    for i in 0..WRITERS {
        let key = writer_key(i);
        let ops = &ops[&key];
        for read in ops.iter().filter(|op| op.input == Input::Get) {
            let Output::Read(seen) = read.output else {
                continue;
            };
            reads += 1;
            let floor = ops
                .iter()
                .filter(|w| w.output == Output::Stored && w.ret.is_some_and(|r| r < read.invoke))
                .filter_map(|w| match w.input {
                    Input::Put(v) => Some(v),
                    _ => None,
                })
                .max();
            assert!(
                seen >= floor,
                "{key}: a read at {} saw {seen:?}, but {floor:?} was acknowledged before it began",
                read.invoke
            );
        }
    }
    let keys = history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} operations acknowledged, {reads} reads checked, {keys} keys linearizable; {:?} in all",
        history.acknowledged(),
        started.elapsed()
    );
    assert!(reads > 0);
}

/// The highest acknowledged value of a key written by one writer with
/// increasing values.
fn last_acknowledged(ops: &[Op]) -> Option<u32> {
    ops.iter()
        .filter(|op| op.output == Output::Stored)
        .filter_map(|op| match op.input {
            Input::Put(v) => Some(v),
            _ => None,
        })
        .max()
}

/// Kill -9 `victim`; within [`FAILOVER_BOUND`] every shard has a leader
/// among the others and takes a PUT then a GET through the proxy; then the
/// load makes progress again.
fn lose(cluster: &mut Cluster, victim: u64, history: &Arc<History>, shards: u32, probe: &str) {
    let proxy = cluster.proxy_addr().unwrap();
    cluster.kill9(victim);
    let killed = Instant::now();
    cluster.wait_for_leaders(FAILOVER_BOUND);
    let mut client = history.client();
    let probes = key_per_shard(&format!("probe-{probe}"), shards);
    let mut written: BTreeMap<&str, u32> = BTreeMap::new();
    let mut value = 1_000_000;
    wait_until(
        &format!("every shard writable and readable after node {victim} was killed"),
        FAILOVER_BOUND.saturating_sub(killed.elapsed()),
        || {
            for key in &probes {
                if !written.contains_key(key.as_str()) {
                    value += 1;
                    if client.put(proxy, key, value) != Answer::Ok(Output::Stored) {
                        return false;
                    }
                    written.insert(key, value);
                }
            }
            probes.iter().all(|key| {
                client.get(proxy, key) == Answer::Ok(Output::Read(Some(written[key.as_str()])))
            })
        },
    );
    eprintln!(
        "node {victim} killed: every shard written and read in {:?}",
        killed.elapsed()
    );
    let before = history.acknowledged();
    wait_until("the load makes progress again", BOUND, || {
        history.acknowledged() >= before + 200
    });
}
