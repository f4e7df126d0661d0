#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kv-bench --history` against real `kv-node` processes, then
//! `kv-bench check-history` on what it wrote (and on corrupted copies).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

mod common;
use common::{bench, binary, explain, lines};

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_recorded_run_checks_linearizable_and_a_planted_stale_read_does_not() {
    binary("kv-node");
    let out = tempfile::tempdir().unwrap();
    let history = out.path().join("h.jsonl");
    let output = bench(&[
        "--spawn",
        "--nodes",
        "1",
        "--history",
        history.to_str().unwrap(),
        "--requests",
        "3000",
        "--concurrency",
        "8",
        "--keys",
        "40",
        "--mix",
        "set=2,get=2,delete=1",
        "--value-size",
        "24",
        "--prefix",
        "hist",
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let ops = lines(&history);
    // Every measured request, plus the cleanup's deletes.
    assert!(ops.len() >= 3000, "{} lines", ops.len());
    let keys: BTreeSet<&str> = ops.iter().map(|op| op["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 40);
    let clients: BTreeSet<u64> = ops
        .iter()
        .map(|op| op["client"].as_u64().unwrap())
        .collect();
    assert_eq!(clients.len(), 8);
    for op in &ops {
        assert_eq!(op["outcome"], "ok", "{op}");
        assert!(op["invoke"].as_u64() <= op["return"].as_u64(), "{op}");
        match op["op"].as_str().unwrap() {
            "put" => assert_eq!(op["value"].as_str().unwrap().len(), 24, "{op}"),
            "get" if op["found"] == true => assert!(op["value"].is_string(), "{op}"),
            "get" | "delete" => assert!(op["found"].is_boolean(), "{op}"),
            other => panic!("op {other}"),
        }
    }

    let output = bench(&["check-history", history.to_str().unwrap()]);
    assert!(output.status.success(), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.ends_with("40 keys checked, 0 violations\n"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(": OK (").count(), 40, "{stdout}");

    // Plant a stale read: a GET that found a value now returns the value
    // its key held before (a put acknowledged before this one).
    let mut planted = ops.clone();
    let (get, stale) = (0..planted.len())
        .find_map(|i| {
            let op = &planted[i];
            if op["op"] != "get" || op["found"] != true {
                return None;
            }
            // An earlier put of the same key with another value.
            planted[..i]
                .iter()
                .rev()
                .find(|p| p["op"] == "put" && p["key"] == op["key"] && p["value"] != op["value"])
                .map(|p| (i, p["value"].clone()))
        })
        .expect("some get follows two puts of its key");
    planted[get]["value"] = stale.clone();
    let corrupted = out.path().join("stale.jsonl");
    write_lines(&corrupted, &planted);
    let output = bench(&["check-history", "--quiet", corrupted.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let key = planted[get]["key"].as_str().unwrap();
    assert!(stdout.contains(&format!("{key}: violation")), "{stdout}");
    assert!(stdout.contains(&format!("returned {stale}")), "{stdout}");
    assert!(stdout.contains("before it began"), "{stdout}");
    assert!(
        stdout.ends_with("40 keys checked, 1 violations\n"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(": OK"),
        "--quiet prints only what failed: {stdout}"
    );
}

#[test]
fn the_seed_workload_records_its_racing_batches_too() {
    binary("kv-node");
    let out = tempfile::tempdir().unwrap();
    let history = out.path().join("seed.jsonl");
    let output = bench(&[
        "--spawn",
        "--nodes",
        "2",
        "--only-max",
        "--workload",
        "seed",
        "--requests",
        "300",
        "--concurrency",
        "50",
        "--history",
        history.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let ops = lines(&history);
    assert!(ops.len() >= 300, "{} lines", ops.len());
    assert!(ops.iter().any(|op| op["op"] == "put"
        && op["value"]
            .as_str()
            .is_some_and(|v| v.starts_with("value_"))));
    let output = bench(&["check-history", history.to_str().unwrap()]);
    assert!(output.status.success(), "{}", explain(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("100 keys checked, 0 violations"));
}

#[test]
fn an_unreadable_or_malformed_history_is_a_clear_error() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("missing.jsonl");
    let output = bench(&["check-history", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read"));

    let bad = out.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"client\":1,\"op\":\"get\",\"key\":\"k\",\"invoke\":1,\"return\":2,\"outcome\":\"ok\",\"found\":false}\n{\"client\":1,\"op\":\"get\"\n",
    )
    .unwrap();
    let output = bench(&["check-history", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2: not a JSON object"), "{stderr}");
}

/// SIGINT during a timed run still leaves the run's operations in the
/// history file (they used to be buffered and lost), and they check.
#[test]
fn an_interrupted_run_keeps_its_history() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("data");
    let node = kv_testkit::Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", data.to_str().unwrap()],
    );
    let url = node.url();
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let history = out.path().join("h.jsonl");
    let mut child = std::process::Command::new(binary("kv-bench"))
        .args([
            "--urls",
            url.as_str(),
            "--history",
            history.to_str().unwrap(),
            "-d",
            "120s",
            "--concurrency",
            "4",
            "--keys",
            "20",
            "--quiet",
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        // Drain, so kv-bench never blocks on a full pipe.
        for _ in BufReader::new(stdout).lines().map_while(Result::ok) {}
    });
    // Interrupt only once the node has answered measured requests, so
    // there is something to keep.
    let served = || {
        let Ok(metrics) = kv_testkit::request(addr, "GET", "/-/metrics", None) else {
            return 0.0;
        };
        metrics
            .text()
            .lines()
            .filter(|l| l.starts_with("kv_requests_total{op=\"get\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while served() < 100.0 {
        assert!(Instant::now() < deadline, "kv-bench never sent its GETs");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kv-bench exits after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    let ops = lines(&history);
    assert!(
        ops.len() >= 100,
        "the interrupted run's operations are kept: {}",
        ops.len()
    );
    for op in &ops {
        assert!(op["invoke"].as_u64() <= op["return"].as_u64(), "{op}");
    }
    let output = bench(&["check-history", history.to_str().unwrap()]);
    assert!(output.status.success(), "{}", explain(&output));
}
