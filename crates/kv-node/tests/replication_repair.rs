//! A replica whose log was damaged, started with `--repair`, gets back
//! from the other replicas what the cut took, and ends identical to them.
//!
//! Three nodes, 3 replicas. Node 3 applies 120 writes and is
//! killed; a byte in the middle of its write-ahead log is flipped (a
//! damaged disk). A start without `--repair` is refused and names the
//! flag. With `--repair` the node cuts its log at the damage, so every
//! shard's log there reverts to an earlier index than the leaders last
//! saw it acknowledge. The leaders must notice (their next heartbeat finds
//! the acknowledged entry missing) and send the entries again: with no
//! further writes, every shard's three replicas end with equal digests.
//! Before the fix (openraft's `allow_log_reversion` off) a debug build's
//! leader panicked in that shard's core on the conflict, and a release
//! build kept replicating from where node 3 had been: it stayed behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{binary, Cluster, ClusterOpts};

const DAMAGED: u64 = 3;
const KEYS: u64 = 120;

/// PUT `/k<i>` = `i` through node 1 until it answers 200: a 504 (outcome
/// unknown) or 503 on a loaded machine is retried, which is safe for a PUT
/// of the same value.
fn put(cluster: &Cluster, i: u64) {
    let body = format!("{{\"value\": {i}}}");
    wait_until(&format!("PUT /k{i} answers 200"), BOUND, || {
        match send(cluster.addr(1), "PUT", &format!("/k{i}"), &[], Some(&body)) {
            Ok(response) if response.status == 200 => true,
            Ok(response) => {
                assert!(
                    matches!(response.status, 503 | 504),
                    "PUT /k{i}: {} {}",
                    response.status,
                    response.text()
                );
                false
            }
            Err(error) => panic!("PUT /k{i}: {error}"),
        }
    });
}

/// Node `id`'s log segments, oldest first.
fn segments(cluster: &Cluster, id: u64) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(cluster.data_dir(id))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("wal-") && name.ends_with(".log")
        })
        .collect();
    segments.sort();
    segments
}

#[test]
fn a_replica_repaired_after_log_damage_gets_the_cut_entries_back_from_its_peers() {
    let opts = ClusterOpts {
        shards: 4,
        ..ClusterOpts::default()
    };
    let shards = opts.shards;
    let mut cluster = Cluster::start(3, 3, opts);

    for i in 0..KEYS {
        put(&cluster, i);
    }
    cluster.wait_caught_up(DAMAGED, BOUND);
    cluster.kill9(DAMAGED);

    // Flip one byte half-way through the written part of the newest
    // segment (segments are preallocated: the tail is zeros).
    let segment = segments(&cluster, DAMAGED).pop().expect("a log segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let written = bytes
        .iter()
        .rposition(|b| *b != 0)
        .expect("a written segment")
        + 1;
    let at = written / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    // Without --repair: refused, and the message says what to do.
    let mut refused = Command::new(binary("kv-node"))
        .args(cluster.args(DAMAGED))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until("the damaged node exits", BOUND, || {
        status = refused.try_wait().unwrap();
        status.is_some()
    });
    let mut log = String::new();
    refused
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        !status.unwrap().success(),
        "a damaged log must not start: {log}"
    );
    assert!(
        log.contains("--repair"),
        "the refusal names --repair: {log}"
    );

    // With --repair: it cuts the log there...
    cluster.set_extra(&["--repair"]);
    cluster.restart(DAMAGED);
    wait_until("the repaired node says what it cut", BOUND, || {
        cluster.log(DAMAGED).contains("repair:")
    });
    let applied_after_cut = |cluster: &Cluster| -> Vec<Option<u64>> {
        cluster
            .shards(DAMAGED)
            .map(|view| view.groups.iter().map(|g| g.applied).collect())
            .unwrap_or_default()
    };
    // ...and, with no further writes, every shard's replicas agree again.
    wait_until(
        "every shard's three replicas hold equal data",
        BOUND,
        || {
            (0..shards).all(|shard| {
                let digests = cluster.digests(shard);
                digests.len() == 3
                    && digests
                        .windows(2)
                        .all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2)
            })
        },
    );
    for id in cluster.members() {
        let log = cluster.log(id);
        assert!(
            !log.contains("panicked"),
            "node {id} panicked (openraft asserts a follower's log never reverts): {log}"
        );
    }
    let keys: u64 = (0..shards)
        .map(|shard| cluster.digests(shard)[0].1.as_u64().unwrap())
        .sum();
    assert_eq!(
        keys,
        KEYS,
        "every acknowledged key is still there; node {DAMAGED} applied {:?}",
        applied_after_cut(&cluster)
    );
    for i in (0..KEYS).step_by(7) {
        let response = send(cluster.addr(DAMAGED), "GET", &format!("/k{i}"), &[], None).unwrap();
        assert_eq!(response.status, 200, "k{i}: {}", response.text());
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["value"], i, "k{i} on the repaired node");
    }
}
