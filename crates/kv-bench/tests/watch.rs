#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kv-bench cluster-watch` (issue 13, `docs/membership.md` §8) against
//! kv-testkit's [`FakeCluster`] serving a scripted sequence of `GET
//! /-/cluster` views: it exits 0 once a view is settled, printing a line per
//! change (stdout is a pipe here, so no bar) with `done/total` never going
//! back, and keeps going through another member when the node it was given
//! stops answering; a settled layout older than `--min-version` is not the
//! end; it exits 1 at `--timeout` naming the open move, and 2 when the node
//! answers 404 (a build without live membership) or nothing.

use std::process::{Command, Output};

use kv_cluster::{MoveView, Phase};
use kv_testkit::FakeCluster;

mod common;
use common::{binary, explain};

fn watch(node: &str, timeout: &str) -> Output {
    Command::new(binary("kv-bench"))
        .args([
            "cluster-watch",
            "--node",
            node,
            "--every",
            "10ms",
            "--timeout",
            timeout,
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn copying(shard: u32, add: u64, bytes: u64, stalled: Option<&str>) -> MoveView {
    MoveView {
        shard,
        move_id: u64::from(shard) + 100,
        add,
        remove: 3,
        phase: Phase::Copying,
        leader: Some(1),
        bytes: Some(bytes),
        total_bytes: Some(2_000_000),
        percent: Some((bytes * 100 / 2_000_000) as u8),
        stalled: stalled.map(str::to_owned),
    }
}

/// `(done, total)` of a `version V  [...]  D/T moves  ...` line.
fn counts(line: &str) -> (u64, u64) {
    let field = line
        .split_whitespace()
        .find(|w| w.contains('/') && w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| panic!("no done/total in {line:?}"));
    let (done, total) = field.split_once('/').unwrap();
    (done.parse().unwrap(), total.parse().unwrap())
}

#[test]
fn exits_0_when_settled_with_monotone_lines_through_another_member() {
    let fake = FakeCluster::start(8);
    let views = vec![
        fake.cluster_view(9, 0, 3, vec![]),
        fake.cluster_view(9, 0, 3, vec![copying(5, 2, 500_000, None)]),
        fake.cluster_view(9, 1, 3, vec![copying(5, 2, 1_000_000, None)]),
        fake.cluster_view(9, 1, 3, vec![copying(6, 2, 2_000_000, None)]),
        fake.cluster_view(9, 2, 3, vec![copying(7, 2, 300_000, None)]),
        fake.cluster_view(9, 3, 3, vec![]),
    ];
    fake.set(|s| {
        s.cluster_views = views;
        // The node the watch is given goes down after two views: the rest
        // come from the other members its first answer named.
        s.cluster_silent.insert(1, 2);
    });
    let output = watch(&fake.addrs[0].to_string(), "1m");
    assert!(output.status.success(), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("version 9  settled: 3/3 moves done"),
        "{stdout}"
    );
    // 0.5 (shard 5, largest seen 1.0) + 2.0 (shard 6) + 0.3 (shard 7).
    assert!(last.contains("3.3 MB moved"), "{stdout}");
    let progress: Vec<(u64, u64)> = lines[..lines.len() - 1]
        .iter()
        .filter(|line| !line.starts_with("no member answers"))
        .map(|line| counts(line))
        .collect();
    assert!(progress.len() >= 2, "{stdout}");
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "progress went back: {progress:?}\n{stdout}"
    );
    assert!(
        stdout.contains("shard 5 -> node 2 25%"),
        "the first active move, with its percent: {stdout}"
    );
    // Each change is one line: no line repeats.
    let mut seen = lines.clone();
    seen.dedup();
    assert_eq!(seen.len(), lines.len(), "{stdout}");
    // Views came from nodes 2 or 3 once node 1 went silent.
    assert!(fake.get(|s| s.cluster_served) >= 6);
}

#[test]
fn a_settled_layout_older_than_min_version_is_not_the_end() {
    let fake = FakeCluster::start(8);
    let views = vec![
        // Before the join is applied: settled, at the old version.
        fake.cluster_view(8, 0, 0, vec![]),
        fake.cluster_view(9, 0, 1, vec![copying(2, 4, 1_000_000, None)]),
        fake.cluster_view(9, 1, 1, vec![]),
    ];
    fake.set(|s| s.cluster_views = views);
    let output = Command::new(binary("kv-bench"))
        .args(["cluster-watch", "--node", &fake.addrs[0].to_string()])
        .args(["--every", "10ms", "--timeout", "1m", "--min-version", "9"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("version 8 "), "{stdout}");
    assert!(lines[0].contains("waiting for the change"), "{stdout}");
    assert!(
        lines[lines.len() - 1].starts_with("version 9  settled: 1/1 moves done"),
        "{stdout}"
    );
}

#[test]
fn exits_1_at_the_timeout_naming_the_open_move() {
    let fake = FakeCluster::start(8);
    let view = fake.cluster_view(
        4,
        1,
        3,
        vec![copying(5, 4, 400_000, Some("learner 4 not answering"))],
    );
    fake.set(|s| s.cluster_views = vec![view]);
    let output = watch(&fake.addrs[1].to_string(), "300ms");
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not settled after 300ms"), "{stderr}");
    assert!(
        stderr.contains("open: shard 5 node 3 -> node 4 20%, stalled: learner 4 not answering"),
        "{stderr}"
    );
    assert!(
        stderr.contains("planned, not started: 1 move(s)"),
        "{stderr}"
    );
}

#[test]
fn exits_2_on_a_404_and_on_no_answer() {
    // The fake's nodes have no views scripted: 404, as a node of a build
    // before live membership.
    let fake = FakeCluster::start(8);
    let output = watch(&fake.addrs[0].to_string(), "1m");
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("answered GET /-/cluster with 404"),
        "{stderr}"
    );
    assert!(stderr.contains("built before live membership"), "{stderr}");

    // Nothing listens there (bound, then released).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let output = watch(&addr, "1m");
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{addr} does not answer")),
        "{stderr}"
    );
}

/// Review R1: a node's text (a move's `stalled` reason) is shown with its
/// control characters escaped, on stdout's lines and in the timeout's
/// message alike: an answer cannot clear the watcher's screen, retitle its
/// window or colour its log.
#[test]
fn a_nodes_text_writes_no_terminal_escapes() {
    let fake = FakeCluster::start(8);
    let view = fake.cluster_view(
        4,
        1,
        3,
        vec![copying(
            5,
            4,
            400_000,
            Some("\u{1b}[2J\u{1b}]0;pwned\u{7}slow"),
        )],
    );
    fake.set(|s| s.cluster_views = vec![view]);
    let output = watch(&fake.addrs[0].to_string(), "300ms");
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    for (name, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        let text = String::from_utf8_lossy(text);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{name}: {text:?}"
        );
        assert!(text.contains("\\u{1b}[2J"), "{name}: {text:?}");
    }
}
