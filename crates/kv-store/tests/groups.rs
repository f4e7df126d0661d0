//! Raft groups' records in the one write-ahead log: many groups append
//! concurrently and share each commit; a process killed with SIGKILL
//! recovers every acknowledged record of every group; damage is refused
//! with a typed error; segments a group still needs are not retired.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_store::hooks::Event;
use kv_store::{FsyncPolicy, GroupRecord, OpenError, RecoveredGroup, Store, StoreError};

mod support;
use support::{log, options, WAIT};

fn recovered(dir: &Path) -> BTreeMap<u32, RecoveredGroup> {
    let store = Store::open(dir, options(FsyncPolicy::Never, u64::MAX)).unwrap();
    store.take_recovered_groups()
}

/// A group's log as the test expects it, kept independently of kv-store's
/// replay code.
#[derive(Clone, Debug, Default)]
struct Model {
    entries: Vec<(u64, Bytes)>,
    purged: Option<(u64, Bytes)>,
    vote: Option<Bytes>,
    committed: Option<Bytes>,
    /// The last record was a drop.
    dropped: bool,
}

impl Model {
    fn last(&self) -> Option<u64> {
        self.entries
            .last()
            .map(|e| e.0)
            .or(self.purged.as_ref().map(|p| p.0))
    }

    fn apply(&mut self, record: &GroupRecord) {
        self.dropped = false;
        match record {
            GroupRecord::Drop => {
                *self = Model {
                    dropped: true,
                    ..Model::default()
                }
            }
            GroupRecord::Entries {
                first_index,
                entries,
            } => {
                self.entries.retain(|(i, _)| i < first_index);
                for (n, entry) in entries.iter().enumerate() {
                    self.entries.push((first_index + n as u64, entry.clone()));
                }
            }
            GroupRecord::Vote(v) => self.vote = Some(v.clone()),
            GroupRecord::Committed(c) => self.committed = Some(c.clone()),
            GroupRecord::TruncateAfter(after) => {
                self.entries.retain(|(i, _)| after.is_some_and(|a| *i <= a));
            }
            GroupRecord::Purge { upto, log_id } => {
                self.entries.retain(|(i, _)| i > upto);
                self.purged = Some((*upto, log_id.clone()));
            }
        }
    }

    /// The `k`th operation of group `g`, chosen from the state so far: a mix
    /// of appends, overwrites, truncations, votes, commits and purges, and
    /// now and then a drop (the replica leaves, then comes back).
    fn op(&self, g: u32, k: u64) -> GroupRecord {
        let next = self.last().map_or(1, |l| l + 1);
        let entries = |first: u64, n: u64| GroupRecord::Entries {
            first_index: first,
            entries: (0..n)
                .map(|i| Bytes::from(format!("g{g}k{k}i{i}-{}", "x".repeat((k % 7) as usize))))
                .collect(),
        };
        let floor = self.purged.as_ref().map_or(0, |p| p.0);
        if k % 211 == 210 {
            return GroupRecord::Drop;
        }
        match k % 10 {
            0..=4 => entries(next, 1 + k % 3),
            5 if self.entries.len() > 1 => entries(next - 1, 2),
            6 => GroupRecord::Vote(Bytes::from(format!("v{g}-{k}"))),
            7 if next > floor + 3 => GroupRecord::TruncateAfter(Some(next - 2)),
            9 if self.entries.len() > 6 => {
                let upto = self.entries[self.entries.len() - 5].0;
                GroupRecord::Purge {
                    upto,
                    log_id: Bytes::from(format!("p{g}-{upto}")),
                }
            }
            _ => GroupRecord::Committed(Bytes::from(format!("c{g}-{k}"))),
        }
    }

    /// The state after ops `0..n` of group `g`.
    fn after(g: u32, n: u64) -> Model {
        let mut model = Model::default();
        for k in 0..n {
            let op = model.op(g, k);
            model.apply(&op);
        }
        model
    }

    fn matches(&self, got: &RecoveredGroup) -> bool {
        let entries: Vec<_> = got.entries.iter().cloned().collect();
        self.entries == entries
            && self.purged == got.purged
            && self.vote == got.vote
            && self.committed == got.committed
            && self.dropped == got.dropped
    }
}

const GROUPS: u32 = 4;
const CHILD_ENV: &str = "KV_STORE_GROUPS_CHILD_DIR";

/// The child process of [`groups_survive_sigkill_with_every_acknowledged_record`]:
/// one thread per group logging its operations one after another, plus a
/// thread of plain PUTs, each acknowledgement printed once its completion
/// ran. Runs until killed; not a test of its own.
#[test]
#[ignore = "run by groups_survive_sigkill_with_every_acknowledged_record"]
fn child_writes_groups_until_killed() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    // A small log: it rotates, snapshots and retires segments while groups
    // append and purge.
    let store = Store::open(Path::new(&dir), options(FsyncPolicy::Never, 32 << 10)).unwrap();
    let out = Mutex::new(std::io::stdout());
    let say = |line: String| {
        let mut out = out.lock().unwrap();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    std::thread::scope(|scope| {
        for g in 0..GROUPS {
            let (store, say) = (&store, &say);
            scope.spawn(move || {
                let mut model = Model::default();
                for k in 0.. {
                    let op = model.op(g, k);
                    log(store, g, op.clone()).unwrap();
                    model.apply(&op);
                    say(format!("g {g} {k}"));
                }
            });
        }
        let (store, say) = (&store, &say);
        scope.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            for n in 0u64.. {
                runtime
                    .block_on(store.put(&format!("p{n}"), Bytes::from(n.to_string())))
                    .unwrap();
                say(format!("p {n}"));
            }
        });
    });
}

/// Several groups log concurrently (and plain PUTs with them) in a process
/// killed with SIGKILL: on recovery every group holds at least everything
/// acknowledged (at most the one record in flight more), with overwrites,
/// truncations and purges applied, and every acknowledged PUT is there.
#[test]
fn groups_survive_sigkill_with_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..2 {
        let round_dir = dir.path().join(format!("round{round}"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_writes_groups_until_killed",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &round_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = BTreeMap::<u32, u64>::new();
        let mut puts = Vec::new();
        let mut count = 0;
        let started = Instant::now();
        // Kill after a round-dependent number of acknowledgements, and once
        // the log has rotated and a snapshot retired segments (bounded in time).
        let mut snapshotted = false;
        while (count < 6000 + round * 3000 || !snapshotted)
            && started.elapsed() < Duration::from_secs(120)
        {
            if count % 500 == 0 && !snapshotted {
                snapshotted = snapshots_in(&round_dir) >= 2;
            }
            let Some(line) = lines.next() else { break };
            let line = line.unwrap();
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("g"), Some(g), Some(k)) => {
                    acked.insert(g.parse().unwrap(), k.parse().unwrap());
                    count += 1;
                }
                (Some("p"), Some(n), None) => puts.push(n.parse::<u64>().unwrap()),
                _ => {} // the test harness's own output
            }
        }
        child.kill().unwrap();
        // Acknowledgements printed before the kill still count.
        for line in lines {
            let line = line.unwrap();
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("g"), Some(g), Some(k)) => {
                    acked.insert(g.parse().unwrap(), k.parse().unwrap());
                }
                (Some("p"), Some(n), None) => puts.push(n.parse::<u64>().unwrap()),
                _ => {}
            }
        }
        child.wait().unwrap();
        assert_eq!(
            acked.len(),
            GROUPS as usize,
            "every group got acknowledgements"
        );

        let store = Store::open(&round_dir, options(FsyncPolicy::Never, u64::MAX)).unwrap();
        let groups = store.take_recovered_groups();
        for (g, k) in &acked {
            let got = groups.get(g).expect("group recovered");
            let acked_state = Model::after(*g, k + 1);
            let with_in_flight = Model::after(*g, k + 2);
            assert!(
                acked_state.matches(got) || with_in_flight.matches(got),
                "round {round}, group {g} acknowledged through op {k}: recovered {got:?}, \
                 expected {acked_state:?}"
            );
        }
        for n in puts {
            assert_eq!(
                store.get(&format!("p{n}")),
                Some(Bytes::from(n.to_string())),
                "acknowledged put p{n} lost"
            );
        }
        assert!(
            store.recovery().unwrap().snapshot.is_some(),
            "the log was meant to rotate and snapshot during the run ({count} acks): {:?}",
            std::fs::read_dir(&round_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
    }
}

/// Group commit across groups: while the log thread is held in one batch,
/// eight groups' appends queue up; all eight complete after one more write
/// and one more fdatasync, not eight.
#[test]
fn one_fdatasync_completes_appends_of_several_groups() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Always, u64::MAX)).unwrap();
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let hook = Mutex::new((entered_tx, released, true));
    store.set_log_hook(Box::new(move |event| {
        let mut hook = hook.lock().unwrap();
        if event == Event::BeforeWrite && hook.2 {
            hook.2 = false;
            hook.0.send(()).unwrap();
            hook.1.recv().unwrap();
        }
        Ok(())
    }));
    let before = store.log_stats().unwrap();
    let (done_tx, done) = mpsc::channel();
    let submit = |group: u32| {
        let done_tx = done_tx.clone();
        store.submit_group(
            group,
            GroupRecord::Entries {
                first_index: 1,
                entries: vec![Bytes::from(format!("entry of {group}"))],
            },
            Box::new(move |result| done_tx.send((group, result)).unwrap()),
        );
    };
    // The first batch holds the log thread in the hook...
    submit(0);
    entered.recv_timeout(WAIT).unwrap();
    // ...while eight more groups queue up behind it.
    for group in 1..=8 {
        submit(group);
    }
    release.send(()).unwrap();
    let mut completed = Vec::new();
    for _ in 0..=8 {
        let (group, result) = done.recv_timeout(WAIT).unwrap();
        result.unwrap();
        completed.push(group);
    }
    completed.sort_unstable();
    assert_eq!(completed, (0..=8).collect::<Vec<_>>());
    let after = store.log_stats().unwrap();
    assert_eq!(after.records - before.records, 9);
    assert_eq!(after.writes - before.writes, 2, "{before:?} -> {after:?}");
    assert_eq!(after.syncs - before.syncs, 2, "{before:?} -> {after:?}");
    assert!(
        store.is_empty(),
        "group records are never applied to the map"
    );
    drop(store);
    let groups = recovered(dir.path());
    assert_eq!(groups.len(), 9);
}

/// Writes `n` entries one record each for groups 0 and 1, alternating;
/// returns the segment's path.
fn two_groups(dir: &Path, n: u64) -> std::path::PathBuf {
    let store = Store::open(dir, options(FsyncPolicy::Never, u64::MAX)).unwrap();
    for i in 1..=n {
        for group in 0..2 {
            let record = GroupRecord::Entries {
                first_index: i,
                entries: vec![Bytes::from(format!("{group}:{i}"))],
            };
            log(&store, group, record).unwrap();
        }
    }
    drop(store);
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > 32)
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

fn indexes(group: &RecoveredGroup) -> Vec<u64> {
    group.entries.iter().map(|e| e.0).collect()
}

/// A flipped byte inside a group record, with valid records after it, is
/// corruption: refused with the file and offset; `--repair` cuts the log
/// there, so each group keeps a prefix of its entries, never a hole.
#[test]
fn a_flipped_byte_in_a_group_record_refuses_and_repair_keeps_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let segment = two_groups(dir.path(), 10);
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();

    match Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)) {
        Err(OpenError::Corrupt { file, offset, .. }) => {
            assert_eq!(file, segment);
            assert!(offset > 0 && offset <= middle as u64, "offset {offset}");
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("a corrupt group record was read as valid"),
    }
    let mut repair = options(FsyncPolicy::Never, u64::MAX);
    repair.repair = true;
    let store = Store::open(dir.path(), repair).unwrap();
    let groups = store.take_recovered_groups();
    for group in groups.values() {
        let got = indexes(group);
        assert!(got.len() < 10, "the cut lost nothing? {got:?}");
        assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
    }
}

/// A torn last record (the process died mid-write) is cut: the group it
/// belonged to loses that record only.
#[test]
fn a_torn_group_record_at_the_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let segment = two_groups(dir.path(), 5);
    let len = std::fs::metadata(&segment).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len(len - 3).unwrap();
    drop(file);
    let groups = recovered(dir.path());
    assert_eq!(indexes(&groups[&0]), [1, 2, 3, 4, 5]);
    assert_eq!(indexes(&groups[&1]), [1, 2, 3, 4]);
}

fn snapshots_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |list| {
        list.filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("snap-") && name.ends_with(".snap")
        })
        .count()
    })
}

fn segment_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("wal-")
        })
        .count()
}

/// Segment retirement keeps the segments holding entries a group has not
/// purged, however many snapshots retire the rest; once the group purges
/// them they go, and what only they held (the vote) survives through the
/// checkpoints of later segments.
#[test]
fn segments_holding_unpurged_group_entries_are_not_retired() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    log(&store, 7, GroupRecord::Vote(Bytes::from_static(b"vote-7"))).unwrap();
    log(
        &store,
        7,
        GroupRecord::Entries {
            first_index: 1,
            entries: vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")],
        },
    )
    .unwrap();
    // Other groups and plain writes go on over several snapshots.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for round in 0..4u64 {
        log(
            &store,
            8,
            GroupRecord::Entries {
                first_index: round + 1,
                entries: vec![Bytes::from(format!("r{round}"))],
            },
        )
        .unwrap();
        log(
            &store,
            8,
            GroupRecord::Purge {
                upto: round + 1,
                log_id: Bytes::from(format!("l{round}")),
            },
        )
        .unwrap();
        runtime
            .block_on(store.put(&format!("k{round}"), Bytes::from_static(b"v")))
            .unwrap();
        store.snapshot_now().unwrap();
    }
    let pinned = segment_count(dir.path());
    // Without groups, two snapshots keep one generation: two segments.
    assert!(
        pinned >= 5,
        "group 7's first segment was retired ({pinned} left)"
    );
    drop(store);
    let groups = recovered(dir.path());
    assert_eq!(indexes(&groups[&7]), [1, 2]);
    assert_eq!(groups[&7].vote, Some(Bytes::from_static(b"vote-7")));
    assert_eq!(groups[&8].purged.as_ref().map(|p| p.0), Some(4));
    assert!(groups[&8].entries.is_empty());

    // Group 7 purges: the old segments go at the next snapshots.
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    log(
        &store,
        7,
        GroupRecord::Purge {
            upto: 2,
            log_id: Bytes::from_static(b"l7"),
        },
    )
    .unwrap();
    store.snapshot_now().unwrap();
    store.snapshot_now().unwrap();
    let left = segment_count(dir.path());
    assert!(left < pinned, "{left} segments left of {pinned}");
    assert!(left <= 3, "{left} segments left");
    drop(store);
    let groups = recovered(dir.path());
    assert!(groups[&7].entries.is_empty());
    assert_eq!(groups[&7].purged.as_ref().map(|p| p.0), Some(2));
    // Its only record was in a retired segment: a checkpoint restated it.
    assert_eq!(groups[&7].vote, Some(Bytes::from_static(b"vote-7")));
    assert_eq!(groups[&8].purged.as_ref().map(|p| p.0), Some(4));
}

/// A dropped group's entries pin no segment: they are retired by the next
/// snapshots although never purged, and the drop itself survives them (the
/// checkpoints restate it), so recovery reports the group dropped rather
/// than resurrect a log whose start is gone. Written again, the group
/// starts a new incarnation whose entries pin segments as before.
#[test]
fn a_dropped_groups_segments_retire_and_the_drop_survives() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    log(&store, 7, GroupRecord::Vote(Bytes::from_static(b"vote-7"))).unwrap();
    log(
        &store,
        7,
        GroupRecord::Entries {
            first_index: 1,
            entries: vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")],
        },
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let snapshots = |store: &Store, rounds: u64| {
        for round in 0..rounds {
            runtime
                .block_on(store.put(&format!("k{round}"), Bytes::from_static(b"v")))
                .unwrap();
            store.snapshot_now().unwrap();
        }
    };
    snapshots(&store, 4);
    let pinned = segment_count(dir.path());
    assert!(
        pinned >= 5,
        "group 7's entries pin its first segment ({pinned})"
    );

    log(&store, 7, GroupRecord::Drop).unwrap();
    snapshots(&store, 3);
    let left = segment_count(dir.path());
    assert!(left <= 3, "{left} segments left of {pinned} after the drop");
    drop(store);
    let groups = recovered(dir.path());
    let g7 = &groups[&7];
    assert!(g7.dropped);
    assert!(g7.entries.is_empty() && g7.vote.is_none() && g7.purged.is_none());

    // Added back: a new incarnation, from a snapshot at 10.
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    log(
        &store,
        7,
        GroupRecord::Purge {
            upto: 10,
            log_id: Bytes::from_static(b"l10"),
        },
    )
    .unwrap();
    log(
        &store,
        7,
        GroupRecord::Entries {
            first_index: 11,
            entries: vec![Bytes::from_static(b"eleven")],
        },
    )
    .unwrap();
    snapshots(&store, 4);
    drop(store);
    let groups = recovered(dir.path());
    assert!(!groups[&7].dropped);
    assert_eq!(indexes(&groups[&7]), [11]);
    assert_eq!(groups[&7].purged.as_ref().map(|p| p.0), Some(10));
    assert_eq!(groups[&7].vote, None, "the old incarnation's vote is gone");
}

/// A record the log cannot frame is refused through its completion, before
/// anything is logged; a store in memory completes at once.
#[test]
fn oversized_records_are_refused_and_memory_completes_at_once() {
    let store = Store::in_memory();
    assert!(log(&store, 1, GroupRecord::Vote(Bytes::from_static(b"v"))).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(FsyncPolicy::Never, u64::MAX)).unwrap();
    let huge = Bytes::from(vec![0u8; kv_store::journal::record::MAX_PAYLOAD]);
    let refused = log(&store, 1, GroupRecord::Vote(huge));
    assert!(
        matches!(refused, Err(StoreError::TooLarge { .. })),
        "{refused:?}"
    );
    assert_eq!(store.log_stats().unwrap().records, 0);
}
