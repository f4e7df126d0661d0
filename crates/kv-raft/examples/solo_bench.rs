//! `--replicas 1` cost (design §10, open question 7): PUTs through
//! single-voter Raft groups over the real WAL, against the same PUTs through
//! today's engine (`Store::put`), in one process, runs interleaved A/B.
//!
//! ```text
//! cargo run --release -p kv-raft --example solo_bench -- [runs] [secs] [writers] [groups] [fsync]
//! ```
//!
//! Defaults: 5 runs of each, 3 s each, 64 closed-loop writers, 64 groups,
//! `everysec`; 100-byte values, a fresh data dir (under the system temp
//! dir) per run. Prints writes/s per run, the medians and their ratio. No
//! HTTP on either side: this is the storage + Raft path alone, so the
//! ratio is a lower bound on kv-node's (HTTP adds the same cost to both).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_raft::{raft_config, Command, Network, NodeStorage, ShardRaft, Timeouts};
use kv_store::{FsyncPolicy, Store, StoreOptions};
use openraft::{BasicNode, Raft};

struct Args {
    runs: usize,
    secs: u64,
    writers: usize,
    groups: u32,
    fsync: FsyncPolicy,
}

fn args() -> Args {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: u64| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    Args {
        runs: get(0, 5) as usize,
        secs: get(1, 3),
        writers: get(2, 64) as usize,
        groups: get(3, 64) as u32,
        fsync: a
            .get(4)
            .map(|s| s.parse().unwrap())
            .unwrap_or(FsyncPolicy::EverySec),
    }
}

fn options(fsync: FsyncPolicy) -> StoreOptions {
    StoreOptions {
        fsync,
        ..StoreOptions::default()
    }
}

/// Runs `writers` closed-loop writers for `secs`; writes per second.
async fn drive<F, Fut>(writers: usize, secs: u64, write: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let write = Arc::new(write);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (write, stop, done) = (Arc::clone(&write), Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                write(w, i).await;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let count = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    count as f64 / elapsed.as_secs_f64()
}

async fn engine(args: &Args) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), options(args.fsync)).unwrap());
    let value = Bytes::from(vec![b'v'; 100]);
    let s = Arc::clone(&store);
    let rate = drive(args.writers, args.secs, move |w, i| {
        let (s, value) = (Arc::clone(&s), value.clone());
        async move {
            s.put(&format!("key-{w}-{}", i % 1000), value)
                .await
                .unwrap();
        }
    })
    .await;
    store.close();
    rate
}

async fn raft(args: &Args) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), options(args.fsync)).unwrap());
    let storage = NodeStorage::open(Arc::clone(&store), dir.path()).unwrap();
    let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
    let network = Network::new();
    let mut rafts: Vec<ShardRaft> = Vec::new();
    for group in 0..args.groups {
        let (log, sm) = storage.group(group).unwrap();
        let raft: ShardRaft = Raft::new(1, Arc::clone(&config), network.factory(group), log, sm)
            .await
            .unwrap();
        raft.initialize(BTreeMap::from([(1, BasicNode::default())]))
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.state.is_leader() && m.last_quorum_acked.is_some(),
                "leader",
            )
            .await
            .unwrap();
        rafts.push(raft);
    }
    let rafts = Arc::new(rafts);
    let r = Arc::clone(&rafts);
    let groups = args.groups as usize;
    let rate = drive(args.writers, args.secs, move |w, i| {
        let r = Arc::clone(&r);
        async move {
            // Writer w's keys spread over the groups as a key hash would.
            let group = (w + i as usize) % groups;
            r[group]
                .client_write(Command::Put {
                    key: format!("key-{w}-{}", i % 1000),
                    value: vec![b'v'; 100],
                })
                .await
                .unwrap();
        }
    })
    .await;
    for raft in rafts.iter() {
        raft.shutdown().await.unwrap();
    }
    store.close();
    rate
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    println!(
        "{} runs x {} s, {} writers, {} groups, fsync {}",
        args.runs, args.secs, args.writers, args.groups, args.fsync
    );
    // For profiling one side alone: SOLO_BENCH_ONLY=raft (or engine).
    if let Ok(only) = std::env::var("SOLO_BENCH_ONLY") {
        let rate = if only == "raft" {
            raft(&args).await
        } else {
            engine(&args).await
        };
        println!("{only}: {rate:.0}/s");
        return;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        // Alternate which goes first, so drift in the machine's load does
        // not favour one side.
        let (x, y) = if run % 2 == 0 {
            let x = engine(&args).await;
            (x, raft(&args).await)
        } else {
            let y = raft(&args).await;
            (engine(&args).await, y)
        };
        println!(
            "run {run}: engine {x:>9.0}/s  raft {y:>9.0}/s  ratio {:.2}  (load {})",
            y / x,
            load()
        );
        a.push(x);
        b.push(y);
    }
    let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| y / x).collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let (ma, mb) = (median(&mut a), median(&mut b));
    println!(
        "median: engine {ma:.0}/s  raft {mb:.0}/s  ratio {:.2} (per-run ratios {lo:.2}..{hi:.2})",
        mb / ma
    );
}
