//! What the group-record tests share: store options and a bounded wait for
//! one record's completion.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use kv_store::{FsyncPolicy, GroupRecord, Store, StoreError, StoreOptions};

/// Longest wait for a record's completion.
pub const WAIT: Duration = Duration::from_secs(30);

/// No timed snapshots; rotation at `wal_max_bytes`.
pub fn options(fsync: FsyncPolicy, wal_max_bytes: u64) -> StoreOptions {
    StoreOptions {
        fsync,
        snapshot_interval: Duration::from_secs(3600),
        wal_max_bytes,
        repair: false,
    }
}

/// Submits `record` and waits (bounded) for its completion.
pub fn log(store: &Store, group: u32, record: GroupRecord) -> Result<(), StoreError> {
    let (tx, rx) = mpsc::channel();
    store.submit_group(
        group,
        record,
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
    );
    rx.recv_timeout(WAIT).expect("completion never called")
}
