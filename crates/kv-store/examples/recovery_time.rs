//! Times `Store::open` of a data dir holding N keys in a snapshot plus a log
//! on top of it (16-byte keys, 100-byte values by default).
//!
//! `cargo run --release -p kv-store --example recovery_time -- [keys] [dir] [keep]`
//! (`keep` leaves the data dir behind, e.g. to time `kv-node` on it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_store::{FsyncPolicy, Store, StoreOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let keys: usize = args.next().map_or(1_000_000, |a| a.parse().unwrap());
    let dir = args.next().map_or_else(
        || std::env::temp_dir().join("kv-recovery-time"),
        std::path::PathBuf::from,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let options = StoreOptions {
        fsync: FsyncPolicy::Never,
        snapshot_interval: Duration::from_secs(3600),
        wal_max_bytes: u64::MAX,
        repair: false,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let value = Bytes::from(vec![b'v'; 100]);
    {
        let store = Store::open(&dir, options.clone()).unwrap();
        let items = (0..keys).map(|i| (format!("key_{i:012}"), value.clone()));
        runtime.block_on(store.put_all(items)).unwrap();
        store.snapshot_now().unwrap();
        // A log on top of the snapshot: overwrite a tenth of the keys.
        let items = (0..keys / 10).map(|i| (format!("key_{:012}", i * 10), value.clone()));
        runtime.block_on(store.put_all(items)).unwrap();
    }
    let started = Instant::now();
    let store = Store::open(&dir, options).unwrap();
    let elapsed = started.elapsed();
    let report = store.recovery().unwrap();
    println!(
        "recovered {} keys ({} log records) in {elapsed:.2?}: {:.0} keys/s",
        store.len(),
        report.records,
        store.len() as f64 / elapsed.as_secs_f64()
    );
    drop(store);
    if args.next().as_deref() != Some("keep") {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
