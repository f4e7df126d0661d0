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
//! dir) per run. Prints writes/s per run, the medians and their ratio.
//!
//! Without `SOLO_BENCH_HTTP=1` there is no HTTP on either side: the storage
//! and Raft path alone, so the ratio is a lower bound on kv-node's. With it,
//! each write is an HTTP/1.1 `PUT` over one of `writers` keep-alive loopback
//! connections to a hyper server (kv-http's accept loop) in the same
//! process, which answers after the write, as kv-node does: the ratio a
//! client would see, load generator included on the same cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use kv_raft::{raft_config, Command, Network, NodeStorage, ShardRaft, Timeouts};
use kv_store::{FsyncPolicy, Store, StoreOptions};
use openraft::{BasicNode, Raft};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// One side of the comparison: writes a key, `Ok` once durable and applied.
#[derive(Clone)]
enum Target {
    Engine(Arc<Store>),
    Raft(Arc<Vec<ShardRaft>>),
}

impl Target {
    async fn write(&self, key: String, value: Bytes) {
        match self {
            Target::Engine(store) => store.put(&key, value).await.unwrap(),
            Target::Raft(rafts) => {
                // Keys spread over the groups as a key hash would.
                let group = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize % rafts.len();
                rafts[group]
                    .client_write(Command::Put {
                        key,
                        value: value.to_vec(),
                    })
                    .await
                    .unwrap();
            }
        }
    }
}

/// Runs the writers against `target`, directly or over HTTP.
async fn measure(args: &Args, target: Target) -> f64 {
    let value = Bytes::from(vec![b'v'; 100]);
    if !http() {
        return drive(args.writers, args.secs, move |w, i| {
            let (target, value) = (target.clone(), value.clone());
            async move { target.write(format!("key-{w}-{}", i % 1000), value).await }
        })
        .await;
    }
    let (addr, server) = serve(target).await;
    let mut connections = Vec::new();
    for _ in 0..args.writers {
        connections.push(Arc::new(tokio::sync::Mutex::new(
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        )));
    }
    let connections = Arc::new(connections);
    let rate = drive(args.writers, args.secs, move |w, i| {
        let (connections, value) = (Arc::clone(&connections), value.clone());
        async move {
            let mut stream = connections[w].lock().await;
            put(&mut stream, &format!("key-{w}-{}", i % 1000), &value).await;
        }
    })
    .await;
    server.abort();
    rate
}

fn http() -> bool {
    std::env::var("SOLO_BENCH_HTTP").is_ok_and(|v| v == "1")
}

/// A minimal kv-node: `PUT /<key>` writes the body, answers 200 after.
async fn serve(target: Target) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = kv_http::server::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let admission = kv_http::server::Admission::new(1024);
        let limits = kv_http::server::ConnectionLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(1),
        };
        let builder = limits.http1();
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, slot) = kv_http::server::next_connection(&listener, &admission).await;
            let target = target.clone();
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let target = target.clone();
                async move {
                    let key = request.uri().path().trim_start_matches('/').to_owned();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    target.write(key, body).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"{\"message\": \"Value stored successfully\"}",
                    ))))
                }
            });
            let connection = kv_http::server::serve_connection(&builder, stream, service);
            connections.spawn(async move {
                let _slot = slot;
                let _ = connection.await;
            });
        }
    });
    (addr, server)
}

/// One keep-alive `PUT`, response read to its end.
async fn put(stream: &mut tokio::net::TcpStream, key: &str, value: &[u8]) {
    let head = format!(
        "PUT /{key} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
        value.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(value);
    stream.write_all(&request).await.unwrap();
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end])
            .unwrap()
            .to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if buf.len() >= end + 4 + length {
            return;
        }
    }
}

async fn engine(args: &Args) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), options(args.fsync)).unwrap());
    let rate = measure(args, Target::Engine(Arc::clone(&store))).await;
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
    let rate = measure(args, Target::Raft(Arc::clone(&rafts))).await;
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
        "{} runs x {} s, {} writers, {} groups, fsync {}, {}",
        args.runs,
        args.secs,
        args.writers,
        args.groups,
        args.fsync,
        if http() { "over HTTP" } else { "no HTTP" }
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
