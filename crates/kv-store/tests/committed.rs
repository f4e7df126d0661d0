//! Committed indexes submitted lazily ([`Store::submit_committed`]): they
//! wake nobody, yet reach the disk with the next batch written for any
//! other reason, at the log thread's tick when the store is idle, and at
//! close; and in no crash-like cut of the log is a group's committed index
//! ahead of the entries logged before it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_store::hooks::Event;
use kv_store::{FsyncPolicy, GroupRecord, RecoveredGroup, Store, StoreError};

mod support;
use support::{log, options, WAIT};

/// One entry per index in `range`, in one record.
fn entries(range: std::ops::RangeInclusive<u64>) -> GroupRecord {
    GroupRecord::Entries {
        first_index: *range.start(),
        entries: range.map(|i| Bytes::from(format!("e{i}"))).collect(),
    }
}

/// Submits `record` without waiting for it.
fn submit(store: &Store, group: u32, record: GroupRecord) {
    store.submit_group(group, record, Box::new(|result| result.unwrap()));
}

/// A copy of every file in `dir`: what a crash at this moment would leave
/// (every `write` so far is in the page cache, which a killed process
/// keeps).
fn copy_dir(dir: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in std::fs::read_dir(dir).unwrap() {
        let file = file.unwrap();
        if file.file_type().unwrap().is_file() {
            std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
        }
    }
}

fn recovered(dir: &Path) -> BTreeMap<u32, RecoveredGroup> {
    let store = Store::open(dir, options(FsyncPolicy::Never, u64::MAX)).unwrap();
    store.take_recovered_groups()
}

/// What a crash now would give back.
fn recovered_now(dir: &Path, scratch: &Path) -> BTreeMap<u32, RecoveredGroup> {
    copy_dir(dir, scratch);
    recovered(scratch)
}

/// The committed index the tests encode as its decimal digits.
fn committed_index(group: &RecoveredGroup) -> Option<u64> {
    group
        .committed
        .as_ref()
        .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
}

#[test]
fn a_lazy_committed_is_on_disk_once_the_next_record_is() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    log(&store, 0, entries(1..=3)).unwrap();
    store.submit_committed(0, Bytes::from("2")).unwrap();
    // A newer index replaces the slot's value.
    store.submit_committed(0, Bytes::from("3")).unwrap();
    // Another group's record: its batch carries group 0's committed.
    log(&store, 1, entries(1..=1)).unwrap();
    let groups = recovered_now(dir.path(), &scratch.path().join("a"));
    assert_eq!(committed_index(&groups[&0]), Some(3));
    assert_eq!(groups[&0].entries.len(), 3);
    assert_eq!(groups[&1].committed, None);
    drop(store);
}

#[test]
fn a_lazy_committed_is_written_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Always, u64::MAX)).unwrap();
    log(&store, 0, entries(1..=5)).unwrap();
    log(&store, 1, entries(1..=2)).unwrap();
    store.submit_committed(0, Bytes::from("4")).unwrap();
    store.submit_committed(1, Bytes::from("1")).unwrap();
    store.submit_committed(0, Bytes::from("5")).unwrap();
    store.close();
    assert!(matches!(
        store.submit_committed(0, Bytes::from("5")),
        Err(StoreError::Closed)
    ));
    drop(store);
    let groups = recovered(dir.path());
    assert_eq!(committed_index(&groups[&0]), Some(5));
    assert_eq!(committed_index(&groups[&1]), Some(1));
}

/// An idle store writes the slot's value on its own, at the log thread's
/// tick (with `always`, which has no syncer thread to wake it).
#[test]
fn an_idle_store_writes_a_lazy_committed_at_its_tick() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Always, u64::MAX)).unwrap();
    log(&store, 7, entries(1..=2)).unwrap();
    let before = store.log_stats().unwrap();
    store.submit_committed(7, Bytes::from("2")).unwrap();
    let started = Instant::now();
    while store.log_stats().unwrap().records == before.records {
        assert!(
            started.elapsed() < WAIT,
            "the committed index was never written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = store.log_stats().unwrap();
    assert_eq!(after.records, before.records + 1);
    assert_eq!(after.syncs, before.syncs + 1, "one fdatasync for it");
    let groups = recovered_now(dir.path(), &scratch.path().join("a"));
    assert_eq!(committed_index(&groups[&7]), Some(2));
    drop(store);
}

/// A drop clears the group's slot: the old incarnation's index does not
/// land after the drop.
#[test]
fn a_drop_discards_the_groups_lazy_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    log(&store, 0, entries(1..=3)).unwrap();
    store.submit_committed(0, Bytes::from("3")).unwrap();
    log(&store, 0, GroupRecord::Drop).unwrap();
    store.close();
    drop(store);
    let groups = recovered(dir.path());
    assert!(groups[&0].dropped, "{:?}", groups[&0]);
    assert_eq!(groups[&0].committed, None);
}

/// Copies the data directory before each of the log thread's writes (the
/// thread is held in its hook meanwhile, so each copy is exactly the log
/// up to a batch boundary, as a crash there would leave it); the first
/// write is also held until `release` says so. Returns the copies'
/// parent and the signal that the first write was reached.
fn copy_before_each_write(
    store: &Store,
    dir: &Path,
    copies: &Path,
    most: usize,
) -> (mpsc::Receiver<()>, mpsc::Sender<()>, Arc<AtomicUsize>) {
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let gate = Mutex::new(Some((entered_tx, released)));
    let count = Arc::new(AtomicUsize::new(0));
    let (dir, copies, counted) = (dir.to_owned(), copies.to_owned(), Arc::clone(&count));
    store.set_log_hook(Box::new(move |event| {
        if event != Event::BeforeWrite {
            return Ok(());
        }
        let n = counted.fetch_add(1, Ordering::SeqCst);
        if n < most {
            copy_dir(&dir, &copies.join(format!("{n:04}")));
        }
        if let Some((entered, released)) = gate.lock().unwrap().take() {
            entered.send(()).unwrap();
            released.recv().unwrap();
        }
        Ok(())
    }));
    (entered, release, count)
}

/// Asserts that in every copy, each group's committed index is covered
/// by its entries (or its purge).
fn assert_never_ahead(copies: &Path) {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(copies)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        for (g, group) in recovered(&path) {
            let Some(committed) = committed_index(&group) else {
                continue;
            };
            let last = group
                .entries
                .back()
                .map(|e| e.0)
                .or(group.purged.as_ref().map(|p| p.0));
            assert!(
                last.is_some_and(|l| l >= committed),
                "{}: group {g} committed {committed} ahead of its log (last {last:?})",
                path.display()
            );
        }
    }
}

/// More records queue than one batch takes (`MAX_BATCH`), then the
/// committed index of the last: the batch that took the slot was cut short
/// with entries still queued, so it must not write the index; the batch
/// that drains the queue does.
#[test]
fn a_committed_index_is_never_written_ahead_of_queued_entries() {
    const LAST: u64 = 6000;
    let dir = tempfile::tempdir().unwrap();
    let copies = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    let (entered, release, writes) = copy_before_each_write(&store, dir.path(), copies.path(), 64);
    submit(&store, 0, entries(1..=1));
    entered.recv_timeout(WAIT).unwrap();
    for i in 2..=LAST {
        submit(&store, 0, entries(i..=i));
    }
    store
        .submit_committed(0, Bytes::from(LAST.to_string()))
        .unwrap();
    release.send(()).unwrap();
    // The last entry's record completes with the batch that drains the queue.
    log(&store, 1, entries(1..=1)).unwrap();
    assert!(
        writes.load(Ordering::SeqCst) >= 3,
        "the queue took more than one batch"
    );
    store.close();
    drop(store);
    assert_never_ahead(copies.path());
    let groups = recovered(dir.path());
    assert_eq!(committed_index(&groups[&0]), Some(LAST));
    assert_eq!(groups[&0].entries.len(), LAST as usize);
}

/// Several groups append and advance their committed index concurrently
/// from their own threads, each slot overwritten while the log thread
/// batches: no batch boundary shows an index ahead of its group's entries.
/// (No rotations here: a snapshot deleting files would race the copies.)
#[test]
fn concurrent_groups_never_log_a_committed_index_ahead_of_their_entries() {
    const GROUPS: u32 = 4;
    const PER_GROUP: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let copies = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    let (entered, release, writes) = copy_before_each_write(&store, dir.path(), copies.path(), 40);
    submit(&store, GROUPS, entries(1..=1));
    entered.recv_timeout(WAIT).unwrap();
    release.send(()).unwrap();
    std::thread::scope(|scope| {
        for g in 0..GROUPS {
            let store = &store;
            scope.spawn(move || {
                let mut i = 1;
                while i <= PER_GROUP {
                    // Runs of 1-3 entries, each covered by the index after it.
                    let last = (i + u64::from(g) % 3).min(PER_GROUP);
                    submit(store, g, entries(i..=last));
                    store
                        .submit_committed(g, Bytes::from(last.to_string()))
                        .unwrap();
                    i = last + 1;
                }
            });
        }
    });
    log(&store, GROUPS, entries(2..=2)).unwrap();
    assert!(writes.load(Ordering::SeqCst) > 2);
    store.close();
    drop(store);
    // Whether a copy caught an index depends on the batching (a batch cut
    // short by `MAX_BATCH` writes none): the rule is checked on all of them.
    assert_never_ahead(copies.path());
    let groups = recovered(dir.path());
    for g in 0..GROUPS {
        assert_eq!(committed_index(&groups[&g]), Some(PER_GROUP), "group {g}");
    }
}
