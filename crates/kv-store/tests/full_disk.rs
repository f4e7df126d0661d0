//! A full disk (`ENOSPC`, staged with the log thread's test hook) passes:
//! plain writes are refused meanwhile and never applied, Raft group
//! records are held and retried, not failed (a failure would stop the
//! group for good), and once there is room again the held records are
//! written in order and the store takes writes again without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_store::hooks::Event;
use kv_store::{FsyncPolicy, GroupRecord, Store, StoreError, StoreOptions};

const WAIT: Duration = Duration::from_secs(30);

fn open(dir: &std::path::Path) -> Store {
    let options = StoreOptions {
        fsync: FsyncPolicy::Always,
        snapshot_interval: Duration::from_secs(3600),
        wal_max_bytes: u64::MAX,
        repair: false,
    };
    Store::open(dir, options).unwrap()
}

/// Waits (bounded) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A hook that answers every write `ENOSPC` while `full` is set, counting
/// the tries.
fn no_room_while(store: &Store) -> (Arc<AtomicBool>, Arc<AtomicUsize>) {
    let full = Arc::new(AtomicBool::new(false));
    let tries = Arc::new(AtomicUsize::new(0));
    let (hook_full, hook_tries) = (Arc::clone(&full), Arc::clone(&tries));
    store.set_log_hook(Box::new(move |event| {
        if event == Event::BeforeWrite && hook_full.load(Ordering::SeqCst) {
            hook_tries.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }));
    (full, tries)
}

type Completions = mpsc::Receiver<(&'static str, Result<(), StoreError>)>;

fn submit(
    store: &Store,
    tx: &mpsc::Sender<(&'static str, Result<(), StoreError>)>,
    name: &'static str,
    group: u32,
    record: GroupRecord,
) {
    let tx = tx.clone();
    store.submit_group(
        group,
        record,
        Box::new(move |result| {
            let _ = tx.send((name, result));
        }),
    );
}

fn entry(first_index: u64, body: &'static str) -> GroupRecord {
    GroupRecord::Entries {
        first_index,
        entries: vec![Bytes::from_static(body.as_bytes())],
    }
}

fn is_full(result: &Result<(), StoreError>) -> bool {
    matches!(result, Err(StoreError::DiskFull { .. }))
}

#[test]
fn group_records_wait_for_room_and_plain_writes_resume_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime
        .block_on(store.put("before", Bytes::from_static(b"1")))
        .unwrap();
    let (full, tries) = no_room_while(&store);
    let (tx, done): (_, Completions) = mpsc::channel();

    full.store(true, Ordering::SeqCst);
    submit(&store, &tx, "entry 1", 0, entry(1, "e1"));
    wait_until("the store says the disk is full", || {
        is_full(&store.writable())
    });
    // Held, not failed: it can only complete once a write succeeds.
    assert!(done.try_recv().is_err(), "a record completed without room");

    let refused = runtime.block_on(store.put("refused", Bytes::from_static(b"2")));
    assert!(
        matches!(refused, Err(StoreError::DiskFull { .. })),
        "{refused:?}"
    );
    let message = refused.unwrap_err().to_string();
    assert!(
        message.starts_with("disk full appending to ") && message.contains("resume"),
        "{message}"
    );
    // More records queue behind the held one, in order; a rotation is
    // refused meanwhile, and the store is not failed by it.
    submit(&store, &tx, "entry 2", 0, entry(2, "e2"));
    submit(
        &store,
        &tx,
        "vote",
        1,
        GroupRecord::Vote(Bytes::from_static(b"v")),
    );
    let snapshot = store.snapshot_now();
    assert!(
        snapshot
            .as_ref()
            .is_err_and(|why| why.to_string().contains("disk full")),
        "{snapshot:?}"
    );
    wait_until("the log thread tried again", || {
        tries.load(Ordering::SeqCst) >= 3
    });
    assert!(done.try_recv().is_err(), "a record completed without room");

    full.store(false, Ordering::SeqCst);
    let mut order = Vec::new();
    for _ in 0..3 {
        let (name, result) = done
            .recv_timeout(WAIT)
            .expect("a held record never completed");
        assert!(result.is_ok(), "{name}: {result:?}");
        order.push(name);
    }
    assert_eq!(order, ["entry 1", "entry 2", "vote"]);
    wait_until("the store takes writes again", || store.writable().is_ok());
    runtime
        .block_on(store.put("after", Bytes::from_static(b"3")))
        .unwrap();
    store.snapshot_now().unwrap();
    assert_eq!(store.get("refused"), None);

    drop(store);
    let store = open(dir.path());
    assert_eq!(&store.get("before").unwrap()[..], b"1");
    assert_eq!(&store.get("after").unwrap()[..], b"3");
    assert_eq!(store.get("refused"), None, "a refused write came back");
    let groups = store.take_recovered_groups();
    let indexes: Vec<u64> = groups[&0].entries.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, [1, 2]);
    assert_eq!(groups[&1].vote.as_deref(), Some(&b"v"[..]));
}

/// Closing while records wait for room does not hang: they fail (they
/// were never acknowledged), and the store opens again without them.
#[test]
fn closing_while_waiting_for_room_fails_the_held_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (full, _) = no_room_while(&store);
    let (tx, done): (_, Completions) = mpsc::channel();
    submit(&store, &tx, "kept", 0, entry(1, "e1"));
    assert!(done.recv_timeout(WAIT).unwrap().1.is_ok());

    full.store(true, Ordering::SeqCst);
    submit(&store, &tx, "held", 0, entry(2, "e2"));
    wait_until("the store says the disk is full", || {
        is_full(&store.writable())
    });
    submit(&store, &tx, "queued", 0, entry(3, "e3"));
    drop(store);
    for _ in 0..2 {
        let (name, result) = done.recv_timeout(WAIT).unwrap();
        assert!(is_full(&result), "{name}: {result:?}");
    }

    let store = open(dir.path());
    let groups = store.take_recovered_groups();
    let indexes: Vec<u64> = groups[&0].entries.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, [1]);
}
