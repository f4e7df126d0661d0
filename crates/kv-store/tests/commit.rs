//! The write path: a write is applied to the map only once committed, in log
//! order. Readers never wait; a write the disk refused is never visible, not
//! even through a snapshot; a DELETE's outcome follows the log order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::pin;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use kv_store::hooks::Event;
use kv_store::{FsyncPolicy, Store, StoreError, StoreOptions};

fn options(fsync: FsyncPolicy) -> StoreOptions {
    StoreOptions {
        fsync,
        // Snapshots only when a test asks for one.
        snapshot_interval: Duration::from_secs(3600),
        wal_max_bytes: u64::MAX,
        repair: false,
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, options(FsyncPolicy::Always)).unwrap()
}

/// The old read path waited for the write it would show with
/// `tokio::time::timeout`, which panics in a runtime built without timers
/// as soon as a GET races a PUT still in flight. Reads are plain lookups now.
#[test]
fn reads_race_writes_in_a_runtime_without_timers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    // No `enable_time`: no time driver.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let writer = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in 0..300u32 {
                    let value = Bytes::from(i.to_string());
                    store.put("k", value).await.unwrap();
                }
            })
        };
        let mut seen = 0u32;
        while !writer.is_finished() {
            if let Some(value) = store.get("k") {
                let value: u32 = std::str::from_utf8(&value).unwrap().parse().unwrap();
                // Values only move forward: each seen one was committed.
                assert!(value >= seen, "saw {value} after {seen}");
                seen = value;
            }
            tokio::task::yield_now().await;
        }
        writer.await.unwrap();
    });
    assert_eq!(&store.get("k").unwrap()[..], b"299");
}

/// Polls `future` once; it must not be done yet.
fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(future.poll(&mut cx).is_pending());
}

/// The old code put a write in the map before logging it: a snapshot copied
/// in between kept it even when its log write then failed, and it came back
/// after a restart although its writer was told it failed. Staged exactly:
/// the log thread is held right after the snapshot's rotation, the PUT is
/// submitted, the snapshot goes on, and the PUT's write fails as a full disk.
#[test]
fn a_put_refused_by_the_disk_does_not_come_back_through_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime
        .block_on(store.put("kept", Bytes::from_static(b"1")))
        .unwrap();

    let (rotated_tx, rotated) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let rotated_tx = Mutex::new(rotated_tx);
    store.set_log_hook(Box::new(move |event| match event {
        Event::Rotated => {
            rotated_tx.lock().unwrap().send(()).unwrap();
            released.lock().unwrap().recv().unwrap();
            Ok(())
        }
        Event::BeforeWrite => Err(io::Error::from_raw_os_error(28)), // ENOSPC
    }));

    let snapshot = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.snapshot_now())
    };
    rotated.recv_timeout(Duration::from_secs(30)).unwrap();
    // Segment S has started; the snapshot thread waits for the log thread.
    let refused = {
        let mut put = pin!(store.put("refused", Bytes::from_static(b"2")));
        poll_once(put.as_mut());
        release.send(()).unwrap();
        runtime.block_on(put)
    };
    assert!(
        matches!(refused, Err(StoreError::DiskFull { .. })),
        "{refused:?}"
    );
    let snapshot = snapshot.join().unwrap();
    assert!(snapshot.is_ok(), "{snapshot:?}");
    assert_eq!(store.get("refused"), None);
    assert!(store.writable().is_err());

    drop(Arc::into_inner(store).unwrap());
    let store = open(dir.path());
    assert_eq!(store.get("refused"), None, "a refused write came back");
    assert_eq!(&store.get("kept").unwrap()[..], b"1");
}

/// Rounds of one PUT racing two DELETEs of a key absent at the start of the
/// round. Whatever the order, a serial history of those three ops allows
/// only: both DELETEs 404 and the value stays, or exactly one DELETE 200
/// and the key is gone. Then the state must be the same after a restart.
#[test]
fn delete_outcomes_follow_the_log_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), options(FsyncPolicy::Never)).unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    const KEYS: usize = 16;
    const ROUNDS: usize = 100;
    let finals = runtime.block_on(async {
        let groups = (0..KEYS).map(|k| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let key = format!("k{k}");
                let mut deleted_rounds = 0;
                for round in 0..ROUNDS {
                    // Start absent (a sequential DELETE, its outcome irrelevant).
                    store.delete(&key).await.unwrap();
                    let value = Bytes::from(format!("{k}:{round}"));
                    let put = tokio::spawn({
                        let (store, key, value) = (Arc::clone(&store), key.clone(), value.clone());
                        async move { store.put(&key, value).await }
                    });
                    let deletes: Vec<_> = (0..2)
                        .map(|_| {
                            let (store, key) = (Arc::clone(&store), key.clone());
                            tokio::spawn(async move { store.delete(&key).await })
                        })
                        .collect();
                    put.await.unwrap().unwrap();
                    let mut found = 0;
                    for delete in deletes {
                        found += usize::from(delete.await.unwrap().unwrap());
                    }
                    let now = store.get(&key);
                    match found {
                        0 => {
                            assert_eq!(now, Some(value), "{key} round {round}: no DELETE found it")
                        }
                        1 => {
                            assert_eq!(now, None, "{key} round {round}: a DELETE found it");
                            deleted_rounds += 1;
                        }
                        _ => panic!("{key} round {round}: two DELETEs found one PUT"),
                    }
                }
                (key.clone(), store.get(&key), deleted_rounds)
            })
        });
        let mut finals = Vec::new();
        for group in groups.collect::<Vec<_>>() {
            finals.push(group.await.unwrap());
        }
        finals
    });
    drop(runtime);
    drop(Arc::into_inner(store).unwrap());
    let store = Store::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    for (key, before, _) in &finals {
        assert_eq!(&store.get(key), before, "{key} changed across a restart");
    }
}

/// The log frames at most `record::MAX_PAYLOAD` bytes per record; the old
/// code acknowledged a longer value and recovery then dropped it as damage.
#[test]
fn a_value_the_log_cannot_frame_is_refused_before_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let max = kv_store::journal::record::MAX_PAYLOAD - 1 - 2 - 3;
    let value = Bytes::from(vec![b'x'; max + 1]);
    let refused = runtime.block_on(store.put("big", value));
    match refused {
        Err(StoreError::TooLarge { len, max: said }) => {
            assert_eq!((len, said), (max + 1, max));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get("big"), None);
    assert_eq!(store.log_stats().unwrap().records, 0, "it reached the log");
    assert!(
        store.writable().is_ok(),
        "one bad value refuses nothing else"
    );
    // Every key length leaves room for this many bytes.
    assert!(kv_store::MAX_VALUE_BYTES < max);
    runtime
        .block_on(store.put("small", Bytes::from_static(b"ok")))
        .unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.get("big"), None);
    assert_eq!(&store.get("small").unwrap()[..], b"ok");
}

/// In memory the same rules hold, with no log: writes apply at once.
#[test]
fn an_in_memory_store_applies_at_once() {
    let store = Store::in_memory();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        assert!(!store.delete("a").await.unwrap());
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(&store.get("a").unwrap()[..], b"1");
        assert!(store.delete("a").await.unwrap());
        assert_eq!(store.get("a"), None);
    });
    // Polling a ready write once completes it.
    let mut put = pin!(store.put("b", Bytes::from_static(b"2")));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(put.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
}
