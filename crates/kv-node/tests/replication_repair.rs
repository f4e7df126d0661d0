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
    let segment = cluster.wal_segments(DAMAGED).pop().expect("a log segment");
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
    // The catch-up guard held the repaired node's groups, and released
    // every one once caught up.
    assert!(
        cluster
            .log(DAMAGED)
            .contains("catch-up guard: recovery repaired"),
        "the guard starts on a repaired node: {}",
        cluster.log(DAMAGED)
    );
    wait_until(
        "every group of the repaired node is released by the catch-up guard",
        BOUND,
        || cluster.metric_sum(DAMAGED, "kv_raft_groups_catching_up") == 0,
    );
    assert!(cluster
        .log(DAMAGED)
        .contains("every group of this node has caught up"));
    let marker = cluster.data_dir(DAMAGED).join("CATCHING_UP");
    wait_until("the catch-up mark is deleted", BOUND, || !marker.exists());
}

/// PUT `value` (JSON text) to `key` on node `id` until it answers 200,
/// retrying 503/504 as [`put`] does.
fn put_on(cluster: &Cluster, id: u64, key: &str, value: &str) {
    let body = format!("{{\"value\": {value}}}");
    wait_until(
        &format!("PUT {key} on node {id} answers 200"),
        BOUND,
        || match send(
            cluster.addr(id),
            "PUT",
            &format!("/{key}"),
            &[],
            Some(&body),
        ) {
            Ok(response) if response.status == 200 => true,
            Ok(response) => {
                assert!(
                    matches!(response.status, 503 | 504),
                    "PUT {key}: {} {}",
                    response.status,
                    response.text()
                );
                false
            }
            Err(error) => panic!("PUT {key}: {error}"),
        },
    );
}

/// Where `needle` first occurs in node `id`'s log segments: (segment, offset).
fn find_in_log(cluster: &Cluster, id: u64, needle: &[u8]) -> Option<(PathBuf, usize)> {
    cluster.wal_segments(id).into_iter().find_map(|segment| {
        let bytes = std::fs::read(&segment).unwrap();
        bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|at| (segment, at))
    })
}

/// No acknowledged write is lost to a repair: a replica whose log was cut
/// before entries it acknowledged neither votes nor campaigns until it has
/// them back (the catch-up guard, design §4.4).
///
/// Three nodes, 3 replicas, 2 shards. W's shard is led by L; R and F are
/// its other replicas. F is killed; P and then W (a new value of a key all
/// three held) are written through L, so L and R acknowledged them and F
/// lacks them. R is killed and a byte inside P's record in its log flipped;
/// L is killed. F starts, and R with `--repair`, which cuts its log at P:
/// now neither R nor F holds P or W. While L is down, W's shard must have
/// no leader: every linearizable read of W answers 503 (R refuses F's
/// votes). Once L is back, P and W read back with their values, and the
/// shard's three replicas hold equal data. R restarted meanwhile (without
/// `--repair`: nothing is left to cut) stays guarded. Before the guard R and F elected
/// one of themselves and W read back its old value (or P 404): acknowledged
/// writes lost.
#[test]
fn a_replica_repaired_before_acknowledged_entries_does_not_elect_without_them() {
    let opts = ClusterOpts {
        shards: 2,
        extra: vec!["--leader-wait".into(), "1s".into()],
        ..ClusterOpts::default()
    };
    let shards = opts.shards;
    let extra = opts.extra.clone();
    let mut cluster = Cluster::start(3, 3, opts);

    let w = "w-key";
    let shard = kv_cluster::shard_of(w.as_bytes(), shards);
    let p = (0..)
        .map(|n| format!("p-key-{n}"))
        .find(|key| kv_cluster::shard_of(key.as_bytes(), shards) == shard)
        .unwrap();
    let l = cluster.leader_of_most_shards();
    let l = cluster
        .wait_for_leaders(BOUND)
        .get(shard as usize)
        .copied()
        .unwrap_or(l);
    let others: Vec<u64> = cluster
        .members()
        .into_iter()
        .filter(|id| *id != l)
        .collect();
    let (f, r) = (others[0], others[1]);

    put_on(&cluster, l, w, "\"old\"");
    cluster.wait_caught_up(f, BOUND);
    cluster.kill9(f);
    // With F down, L's acknowledgement needed R's: both hold P and W.
    const P_MARK: &str = "p-marker-acknowledged-by-l-and-r";
    const W_MARK: &str = "w-marker-acknowledged-by-l-and-r";
    put_on(&cluster, l, &p, &format!("\"{P_MARK}\""));
    put_on(&cluster, l, w, &format!("\"{W_MARK}\""));
    cluster.kill9(r);

    // Damage R's log inside P's record: the cut there takes P and W.
    let (segment, p_at) = find_in_log(&cluster, r, P_MARK.as_bytes()).expect("P in R's log");
    let (w_segment, w_at) = find_in_log(&cluster, r, W_MARK.as_bytes()).expect("W in R's log");
    assert!(
        w_segment == segment && w_at > p_at,
        "W follows P in one segment of R's log"
    );
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[p_at + P_MARK.len() / 2] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    cluster.kill9(l);

    cluster.restart(f);
    let mut repair = extra.iter().map(String::as_str).collect::<Vec<_>>();
    repair.push("--repair");
    cluster.set_extra(&repair);
    cluster.restart(r);
    wait_until("R says what the repair cut", BOUND, || {
        cluster.log(r).contains("repair:")
    });

    // While L is down: no leader for W's shard, reads of W refused.
    let refused_while_l_is_down = |cluster: &Cluster| {
        wait_until(
            "R refused F's votes a few times while W's shard stayed without a leader",
            BOUND,
            || {
                for id in [f, r] {
                    let response =
                        send(cluster.addr(id), "GET", &format!("/{w}"), &[], None).unwrap();
                    assert_eq!(
                        response.status,
                        503,
                        "GET {w} on node {id} while its leader is down must be refused: got {} \
                         {} (the acknowledged write is lost)",
                        response.status,
                        response.text()
                    );
                }
                cluster.metric_sum(r, "kv_raft_catch_up_vote_refusals_total") >= 3
            },
        );
        assert!(cluster.metric_sum(r, "kv_raft_groups_catching_up") > 0);
    };
    refused_while_l_is_down(&cluster);
    // The guard outlives a restart of R (its log has nothing left to
    // repair, but still lacks P and W).
    let marker = cluster.data_dir(r).join("CATCHING_UP");
    assert!(marker.exists(), "R's data dir marks the guard");
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    cluster.set_extra(&extra);
    cluster.restart(r);
    refused_while_l_is_down(&cluster);

    // L back: it leads again, catches R up, and nothing was lost.
    cluster.restart(l);
    for (key, mark) in [(w, W_MARK), (p.as_str(), P_MARK)] {
        for id in [f, r] {
            wait_until(&format!("{key} reads back on node {id}"), BOUND, || {
                let response =
                    send(cluster.addr(id), "GET", &format!("/{key}"), &[], None).unwrap();
                if response.status == 503 {
                    return false;
                }
                assert_eq!(response.status, 200, "{key}: {}", response.text());
                let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
                assert_eq!(body["value"], mark, "{key} on node {id}");
                true
            });
        }
    }
    wait_until("the shard's three replicas hold equal data", BOUND, || {
        let digests = cluster.digests(shard);
        digests.len() == 3
            && digests
                .windows(2)
                .all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2)
    });
    wait_until("R's groups are released and the mark gone", BOUND, || {
        cluster.metric_sum(r, "kv_raft_groups_catching_up") == 0 && !marker.exists()
    });
}
