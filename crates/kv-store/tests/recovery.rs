//! Recovery of a data directory after crashes and damage, in-process (fast
//! enough to try every byte offset).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use kv_store::journal::{record, segment, segment_name, snapshot_name};
use kv_store::{FsyncPolicy, OpenError, Store, StoreOptions};

fn options(fsync: FsyncPolicy) -> StoreOptions {
    StoreOptions {
        fsync,
        snapshot_interval: Duration::from_secs(3600),
        wal_max_bytes: u64::MAX,
        repair: false,
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, options(FsyncPolicy::Never)).unwrap()
}

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// A change and the state it leaves.
#[derive(Clone)]
enum Change {
    Put(String, Vec<u8>),
    Delete(String),
}

fn apply(store: &Store, changes: &[Change]) {
    block(async {
        for change in changes {
            match change {
                Change::Put(key, value) => {
                    store.put(key, Bytes::from(value.clone())).await.unwrap()
                }
                Change::Delete(key) => assert!(store.delete(key).await.unwrap()),
            }
        }
    });
}

/// The map `changes` leave, sorted.
fn expected(changes: &[Change]) -> Vec<(String, Vec<u8>)> {
    let mut map = std::collections::BTreeMap::new();
    for change in changes {
        match change {
            Change::Put(key, value) => {
                map.insert(key.clone(), value.clone());
            }
            Change::Delete(key) => {
                map.remove(key);
            }
        }
    }
    map.into_iter().collect()
}

fn assert_state(store: &Store, want: &[(String, Vec<u8>)], keys: &[String], context: &str) {
    for key in keys {
        let have = store.get(key).map(|b| b.to_vec());
        let should = want.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(have, should, "key {key} ({context})");
    }
    assert_eq!(store.len(), want.len(), "key count ({context})");
}

fn sample_changes() -> Vec<Change> {
    let mut changes: Vec<Change> = (0..8)
        .map(|i| {
            Change::Put(
                format!("key_{i}"),
                format!("{{\"value\":{}}}\n", "x".repeat(i * 3)).into_bytes(),
            )
        })
        .collect();
    changes.push(Change::Put("key_2".into(), b"overwritten".to_vec()));
    changes.push(Change::Delete("key_3".into()));
    changes.push(Change::Put("ключ".into(), "значение".as_bytes().to_vec()));
    changes
}

fn all_keys(changes: &[Change]) -> Vec<String> {
    let mut keys: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Put(k, _) | Change::Delete(k) => k.clone(),
        })
        .collect();
    keys.push("after".into());
    keys.sort();
    keys.dedup();
    keys
}

/// Writes `changes` into a fresh directory and returns it with its only
/// non-empty log segment's path.
fn written(changes: &[Change]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    apply(&store, changes);
    drop(store);
    let segment = dir.path().join(segment_name(1));
    (dir, segment)
}

/// Start offsets of the records in a segment (after its header), plus its
/// length.
fn record_bounds(bytes: &[u8]) -> Vec<usize> {
    assert_eq!(&bytes[..8], segment::MAGIC);
    let mut pos = segment::HEADER_LEN as usize;
    let mut bounds = vec![pos];
    while let Some(rec) = record::decode(&bytes[pos..]).unwrap() {
        pos += rec.framed_len;
        bounds.push(pos);
    }
    assert_eq!(pos, bytes.len());
    bounds
}

/// Opens a directory whose log is `log`, checks it holds `want`, writes a key,
/// reopens and checks again.
fn recovers_to(log: &[u8], want: &[(String, Vec<u8>)], keys: &[String], context: &str) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(segment_name(1)), log).unwrap();
    let store = open(dir.path());
    assert_state(&store, want, keys, context);
    // A torn or garbage tail was never acknowledged: not a repair.
    let repaired = &store.recovery().unwrap().repaired;
    assert!(repaired.is_empty(), "{context}: {repaired:?}");
    block(store.put("after", Bytes::from_static(b"new"))).unwrap();
    drop(store);
    let mut want = want.to_vec();
    want.push(("after".into(), b"new".to_vec()));
    want.sort();
    let store = open(dir.path());
    assert_state(&store, &want, keys, &format!("{context}, after restart"));
}

#[test]
fn truncation_at_every_offset_of_the_last_three_records() {
    let changes = sample_changes();
    let keys = all_keys(&changes);
    let (_dir, segment) = written(&changes);
    let bytes = fs::read(&segment).unwrap();
    let bounds = record_bounds(&bytes);
    assert_eq!(bounds.len(), changes.len() + 1);
    let first_cut = bounds[bounds.len() - 4];
    for cut in first_cut..=bytes.len() {
        let complete = bounds.iter().filter(|&&b| b <= cut).count() - 1;
        let want = expected(&changes[..complete]);
        recovers_to(&bytes[..cut], &want, &keys, &format!("cut at {cut}"));
    }
}

#[test]
fn garbage_appended_is_cut() {
    let changes = sample_changes();
    let keys = all_keys(&changes);
    let (_dir, segment) = written(&changes);
    let bytes = fs::read(&segment).unwrap();
    let want = expected(&changes);
    let mut noise = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..5000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push(x as u8);
    }
    let mut half_record = Vec::new();
    record::encode(&mut half_record, record::Kind::Put, b"\x01\x00kvalue");
    half_record.truncate(20);
    let tails: Vec<(&str, Vec<u8>)> = vec![
        ("one byte", vec![0x42]),
        ("zeros", vec![0; 4096]),
        ("ones", vec![0xff; 100]),
        ("random", noise),
        ("half a record", half_record),
    ];
    for (name, tail) in tails {
        let mut log = bytes.clone();
        log.extend_from_slice(&tail);
        recovers_to(&log, &want, &keys, name);
    }
}

#[test]
fn a_flipped_byte_mid_log_refuses_and_repair_cuts() {
    let changes = sample_changes();
    let keys = all_keys(&changes);
    let (dir, segment) = written(&changes);
    let original = fs::read(&segment).unwrap();
    let bounds = record_bounds(&original);
    for (what, at) in [("body", bounds[4] + 20), ("length", bounds[4] + 1)] {
        let mut damaged = original.clone();
        damaged[at] ^= 0x10;
        fs::write(&segment, &damaged).unwrap();
        let error = Store::open(dir.path(), options(FsyncPolicy::Never))
            .err()
            .expect("opening a corrupt log must fail");
        match &error {
            OpenError::Corrupt { file, offset, .. } => {
                assert_eq!(file, &segment, "{what}");
                assert_eq!(*offset, bounds[4] as u64, "{what}");
            }
            other => panic!("{what}: expected Corrupt, got {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(&segment.display().to_string()),
            "{message}"
        );
        assert!(
            message.contains(&format!("offset {}", bounds[4])),
            "{message}"
        );
        assert!(message.contains("--repair"), "{message}");
        // Nothing was changed by the refusal.
        assert_eq!(fs::read(&segment).unwrap(), damaged);
    }
    let damaged = fs::read(&segment).unwrap();
    let mut repair = options(FsyncPolicy::Never);
    repair.repair = true;
    let store = Store::open(dir.path(), repair).unwrap();
    assert_state(&store, &expected(&changes[..4]), &keys, "repaired");
    let repaired = store.recovery().unwrap().repaired.clone();
    assert_eq!(repaired.len(), 1, "{repaired:?}");
    assert!(
        repaired[0].contains(&format!("offset {}", bounds[4])),
        "{repaired:?}"
    );
    drop(store);
    let side = dir
        .path()
        .join(format!("{}.corrupt-{}", segment_name(1), bounds[4]));
    assert_eq!(fs::read(side).unwrap(), &damaged[bounds[4]..]);
    let store = open(dir.path());
    assert_state(&store, &expected(&changes[..4]), &keys, "after repair");
    // The next start has nothing to repair.
    assert!(store.recovery().unwrap().repaired.is_empty());
}

#[test]
fn snapshot_then_log_recovers_and_retires_covered_files() {
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<Change> = (0..200)
        .map(|i| Change::Put(format!("k{i}"), format!("v{i}").into_bytes()))
        .collect();
    let mut second: Vec<Change> = (0..50).map(|i| Change::Delete(format!("k{i}"))).collect();
    second.extend((150..250).map(|i| Change::Put(format!("k{i}"), format!("w{i}").into_bytes())));
    // Deleted then written again, and written twice: the last change wins.
    second.extend((0..5).map(|i| Change::Put(format!("k{i}"), b"again".to_vec())));
    second.extend((150..155).map(|i| Change::Put(format!("k{i}"), b"twice".to_vec())));
    second.push(Change::Delete("k151".into()));
    let store = open(dir.path());
    apply(&store, &first);
    store.snapshot_now().unwrap();
    apply(&store, &second);
    drop(store);
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&snapshot_name(2)), "{names:?}");
    // The segment snapshot 2 covers stays, as the fallback generation.
    assert!(names.contains(&segment_name(1)), "{names:?}");
    // A covered segment is never read on open (its content here would be
    // corruption if replayed).
    fs::write(
        dir.path().join(segment_name(1)),
        b"stale, covered by the snapshot",
    )
    .unwrap();
    let mut all = first.clone();
    all.extend(second);
    let keys = all_keys(&all);
    let store = open(dir.path());
    let report = store.recovery().unwrap().clone();
    assert_eq!(report.snapshot.as_ref().unwrap().1, 200);
    assert_state(&store, &expected(&all), &keys, "snapshot + log");
    // Each snapshot keeps one generation back and retires the one before.
    store.snapshot_now().unwrap();
    let seqs = |kind: &str| -> Vec<u64> {
        let mut seqs: Vec<u64> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(kind))
            .map(|name| name[kind.len()..kind.len() + 20].parse().unwrap())
            .collect();
        seqs.sort_unstable();
        seqs
    };
    let newest = *seqs("snap-").last().unwrap();
    assert_eq!(seqs("snap-"), vec![2, newest]);
    assert!(seqs("wal-").iter().all(|&s| s >= 2), "{:?}", seqs("wal-"));
    store.snapshot_now().unwrap();
    assert_eq!(seqs("snap-").len(), 2);
    assert!(seqs("wal-").iter().all(|&s| s >= newest));
    drop(store);
}

/// The log segment files in `dir`.
fn segments_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("wal-"))
        .collect();
    names.sort();
    names
}

#[test]
fn restarts_without_writes_do_not_pile_up_segments() {
    let dir = tempfile::tempdir().unwrap();
    let changes = sample_changes();
    let store = open(dir.path());
    apply(&store, &changes);
    drop(store);
    let after_writes = segments_in(dir.path());
    assert_eq!(after_writes.len(), 1, "{after_writes:?}");
    // Restarts without writes, and what a kill -9 right after a start
    // leaves: a new segment that is only zero-filled preallocation (as an
    // older version, without a header, left it; that start removed the
    // previous start's empty segment first).
    for _ in 0..5 {
        drop(open(dir.path()));
    }
    let last = segments_in(dir.path()).last().unwrap().clone();
    assert_ne!(last, after_writes[0]);
    fs::remove_file(dir.path().join(&last)).unwrap();
    let killed_seq: u64 = last[4..24].parse::<u64>().unwrap() + 1;
    fs::write(
        dir.path().join(segment_name(killed_seq)),
        vec![0u8; 64 << 10],
    )
    .unwrap();
    let store = open(dir.path());
    assert_state(
        &store,
        &expected(&changes),
        &all_keys(&changes),
        "after restarts",
    );
    let report = store.recovery().unwrap().clone();
    assert_eq!(report.segments, 1, "{report:?}");
    // The next segment is numbered past every one seen, removed or not.
    assert!(report.next_segment > killed_seq, "{report:?}");
    drop(store);
    let now = segments_in(dir.path());
    assert!(now.len() <= 2, "segments piled up: {now:?}");
    assert!(now.contains(&after_writes[0]), "{now:?}");
}

#[test]
fn a_half_written_snapshot_temp_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let changes: Vec<Change> = (0..100)
        .map(|i| Change::Put(format!("k{i}"), vec![b'v'; i]))
        .collect();
    let store = open(dir.path());
    apply(&store, &changes[..50]);
    store.snapshot_now().unwrap();
    apply(&store, &changes[50..]);
    drop(store);
    // What a crash mid-snapshot leaves: the next snapshot's temp file, half written.
    let full = fs::read(dir.path().join(snapshot_name(2))).unwrap();
    let tmp = dir.path().join(format!("{}.tmp", snapshot_name(3)));
    fs::write(&tmp, &full[..full.len() / 2]).unwrap();
    let store = open(dir.path());
    assert_state(
        &store,
        &expected(&changes),
        &all_keys(&changes),
        "with temp file",
    );
    assert!(!tmp.exists());
}

#[test]
fn a_damaged_snapshot_refuses_and_repair_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let changes = vec![
        Change::Put("a".into(), b"1".to_vec()),
        Change::Put("b".into(), b"2".to_vec()),
        Change::Put("a".into(), b"3".to_vec()),
        Change::Put("c".into(), b"4".to_vec()),
    ];
    apply(&store, &changes[..1]);
    store.snapshot_now().unwrap();
    apply(&store, &changes[1..3]);
    store.snapshot_now().unwrap();
    apply(&store, &changes[3..]);
    drop(store);
    let newest = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "snap"))
        .max()
        .unwrap();
    let path = newest;
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let error = Store::open(dir.path(), options(FsyncPolicy::Never))
        .err()
        .unwrap();
    assert!(
        matches!(&error, OpenError::Corrupt { file, .. } if file == &path),
        "{error}"
    );
    // The message says what --repair would do with a snapshot.
    assert!(
        error
            .to_string()
            .contains("start from the previous snapshot"),
        "{error}"
    );
    let mut repair = options(FsyncPolicy::Never);
    repair.repair = true;
    let store = Store::open(dir.path(), repair).unwrap();
    // Back to the previous snapshot plus the log since it: nothing lost.
    let report = store.recovery().unwrap().clone();
    assert_eq!(report.snapshot.as_ref().unwrap().1, 1, "{report:?}");
    assert_eq!(report.repaired.len(), 1, "{report:?}");
    assert!(report.repaired[0].contains("set aside"), "{report:?}");
    assert_state(&store, &expected(&changes), &all_keys(&changes), "fallback");
    let mut aside = path.into_os_string();
    aside.push(".corrupt");
    assert!(std::path::Path::new(&aside).exists());
}

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let error = Store::open(dir.path(), options(FsyncPolicy::Never))
        .err()
        .unwrap();
    assert!(matches!(error, OpenError::Locked { .. }), "{error}");
    assert!(
        error.to_string().contains("in use by another process"),
        "{error}"
    );
    drop(store);
    open(dir.path());
}

#[test]
fn the_log_passing_its_limit_triggers_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(FsyncPolicy::Never);
    opts.wal_max_bytes = 2000;
    let store = Store::open(dir.path(), opts).unwrap();
    let changes: Vec<Change> = (0..100)
        .map(|i| Change::Put(format!("k{i}"), vec![b'v'; 50]))
        .collect();
    apply(&store, &changes);
    // The snapshot is asynchronous: wait for its file (an event), bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let snapshot_exists = || {
        fs::read_dir(dir.path())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".snap"))
    };
    while !snapshot_exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot was taken"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(store);
    let store = open(dir.path());
    assert_state(
        &store,
        &expected(&changes),
        &all_keys(&changes),
        "after auto snapshot",
    );
}

#[test]
fn concurrent_writers_under_always_are_all_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(dir.path(), options(FsyncPolicy::Always)).unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for writer in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    store
                        .put(
                            &format!("w{writer}_{i}"),
                            Bytes::from(format!("{writer}:{i}")),
                        )
                        .await
                        .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    drop(runtime);
    // Group commit: 64 writers that queued while a sync ran shared it.
    eprintln!("group commit: {:?}", store.log_stats());
    let stats = store.log_stats().unwrap();
    assert_eq!(stats.records, 64 * 20);
    assert!(
        stats.syncs < stats.records,
        "every write paid its own fdatasync: {stats:?}"
    );
    drop(std::sync::Arc::try_unwrap(store).ok().unwrap());
    let store = open(dir.path());
    assert_eq!(store.len(), 64 * 20);
    assert_eq!(&store.get("w63_19").unwrap()[..], b"63:19");
}

#[test]
fn everysec_syncs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::EverySec)).unwrap();
    apply(&store, &[Change::Put("a".into(), b"1".to_vec())]);
    assert_eq!(store.log_stats().unwrap().records, 1);
    // The syncer runs once a second; wait for its first sync (an event), bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.log_stats().unwrap().syncs == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "everysec never synced"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(store);
    assert_eq!(&open(dir.path()).get("a").unwrap()[..], b"1");
}

/// Three starts, each writing its own keys: segments 1, 2 and 3 (no
/// snapshot). Returns the dir and each start's changes.
fn three_segments() -> (tempfile::TempDir, Vec<Vec<Change>>) {
    let dir = tempfile::tempdir().unwrap();
    let starts: Vec<Vec<Change>> = (0..3)
        .map(|start| {
            (0..20)
                .map(|i| Change::Put(format!("s{start}k{i}"), format!("v{start}").into_bytes()))
                .collect()
        })
        .collect();
    for changes in &starts {
        let store = open(dir.path());
        apply(&store, changes);
        drop(store);
    }
    assert_eq!(
        segments_in(dir.path()),
        vec![segment_name(1), segment_name(2), segment_name(3)]
    );
    (dir, starts)
}

#[test]
fn a_missing_middle_segment_refuses_and_repair_says_what_is_lost() {
    let (dir, starts) = three_segments();
    fs::remove_file(dir.path().join(segment_name(2))).unwrap();
    let error = Store::open(dir.path(), options(FsyncPolicy::Never))
        .err()
        .expect("a missing segment must refuse to open");
    assert!(matches!(error, OpenError::Gap { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&segment_name(2)), "{message}");
    assert!(message.contains(&segment_name(3)), "{message}");
    assert!(message.contains("--repair"), "{message}");
    let mut repair = options(FsyncPolicy::Never);
    repair.repair = true;
    let store = Store::open(dir.path(), repair).unwrap();
    let report = store.recovery().unwrap().clone();
    assert_eq!(report.gaps.len(), 1, "{report:?}");
    assert!(report.gaps[0].contains(&segment_name(2)), "{report:?}");
    assert_eq!(report.repaired, report.gaps, "a gap is a repair");
    // What is left: the first and last starts' keys.
    let mut kept = starts[0].clone();
    kept.extend(starts[2].clone());
    let mut keys = all_keys(&kept);
    keys.extend(all_keys(&starts[1]));
    assert_state(&store, &expected(&kept), &keys, "repaired");
    drop(store);
    // Repaired for good: the chain goes on from what is there.
    let store = open(dir.path());
    assert_state(&store, &expected(&kept), &keys, "after repair");
}

#[test]
fn a_renamed_segment_is_noticed() {
    let (dir, _) = three_segments();
    fs::rename(
        dir.path().join(segment_name(3)),
        dir.path().join(segment_name(9)),
    )
    .unwrap();
    let error = Store::open(dir.path(), options(FsyncPolicy::Never))
        .err()
        .expect("a renamed segment must refuse to open");
    assert!(
        matches!(&error, OpenError::Corrupt { file, .. } if file.ends_with(segment_name(9))),
        "{error}"
    );
}

/// Two snapshots (2 and 3) and the log since the older one.
fn two_snapshots() -> (tempfile::TempDir, Vec<Change>) {
    let dir = tempfile::tempdir().unwrap();
    let changes: Vec<Change> = (0..30)
        .map(|i| Change::Put(format!("k{i}"), format!("v{i}").into_bytes()))
        .collect();
    let store = open(dir.path());
    apply(&store, &changes[..10]);
    store.snapshot_now().unwrap();
    apply(&store, &changes[10..20]);
    store.snapshot_now().unwrap();
    apply(&store, &changes[20..]);
    drop(store);
    assert!(dir.path().join(snapshot_name(2)).exists());
    assert!(dir.path().join(snapshot_name(3)).exists());
    assert!(!dir.path().join(segment_name(1)).exists());
    (dir, changes)
}

#[test]
fn both_snapshots_gone_refuses_to_start() {
    let (dir, _) = two_snapshots();
    fs::remove_file(dir.path().join(snapshot_name(2))).unwrap();
    fs::remove_file(dir.path().join(snapshot_name(3))).unwrap();
    let error = Store::open(dir.path(), options(FsyncPolicy::Never))
        .err()
        .expect("the log before the segments left is gone");
    assert!(matches!(error, OpenError::Gap { .. }), "{error}");
    assert!(error.to_string().contains(&segment_name(1)), "{error}");
}

#[test]
fn both_snapshots_damaged_under_repair_says_what_is_lost() {
    let (dir, changes) = two_snapshots();
    for seq in [2, 3] {
        let path = dir.path().join(snapshot_name(seq));
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        fs::write(&path, &bytes).unwrap();
    }
    let mut repair = options(FsyncPolicy::Never);
    repair.repair = true;
    let store = Store::open(dir.path(), repair).unwrap();
    let report = store.recovery().unwrap().clone();
    assert!(report.snapshot.is_none(), "{report:?}");
    assert_eq!(report.gaps.len(), 1, "{report:?}");
    let gap = &report.gaps[0];
    assert!(gap.contains(&segment_name(1)), "{gap}");
    assert!(gap.contains(".corrupt"), "{gap}");
    // What the log after the first snapshot holds is back.
    assert_state(
        &store,
        &expected(&changes[10..]),
        &all_keys(&changes),
        "from the log alone",
    );
}

#[test]
fn a_legacy_segment_without_header_still_opens() {
    let changes = sample_changes();
    let keys = all_keys(&changes);
    let (_dir, segment) = written(&changes);
    let bytes = fs::read(&segment).unwrap();
    // What an older version wrote: the same records, no header, a zero tail.
    let mut legacy = bytes[segment::HEADER_LEN as usize..].to_vec();
    legacy.extend_from_slice(&[0; 4096]);
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(segment_name(1)), &legacy).unwrap();
    let store = open(dir.path());
    assert_eq!(store.recovery().unwrap().legacy_segments, 1);
    assert_state(&store, &expected(&changes), &keys, "legacy");
    block(store.put("after", Bytes::from_static(b"new"))).unwrap();
    drop(store);
    // The next segment links to the legacy one: a restart checks it.
    let store = open(dir.path());
    let mut want = expected(&changes);
    want.push(("after".into(), b"new".to_vec()));
    want.sort();
    assert_state(&store, &want, &keys, "after upgrade");
    assert!(store.recovery().unwrap().gaps.is_empty());
}

#[test]
fn records_across_read_chunks_and_larger_than_one_recover() {
    let dir = tempfile::tempdir().unwrap();
    // More than a few read chunks of small records, then one record larger
    // than a chunk, then small ones again, in the log and in a snapshot.
    let mut changes: Vec<Change> = (0..60_000)
        .map(|i| Change::Put(format!("small{i}"), vec![b'a' + (i % 26) as u8; 100]))
        .collect();
    changes.push(Change::Put("big".into(), vec![b'b'; 9 << 20]));
    changes.extend((0..100).map(|i| Change::Delete(format!("small{i}"))));
    let keys: Vec<String> = ["big", "small0", "small99", "small100", "small59999"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    let store = open(dir.path());
    apply(&store, &changes);
    drop(store);
    let store = open(dir.path());
    assert_state(&store, &expected(&changes), &keys, "from the log");
    store.snapshot_now().unwrap();
    drop(store);
    let store = open(dir.path());
    assert!(store.recovery().unwrap().snapshot.is_some());
    assert_state(&store, &expected(&changes), &keys, "from the snapshot");
}
