//! Operating a node: Prometheus metrics and the Flask-format operation log,
//! through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kv_testkit::{binary, request, Process};

/// The kv-node binary on a free port, its data under `dir/data`, plus `extra` flags.
fn start_node(dir: &std::path::Path, extra: &[&str]) -> Process {
    let data = dir.join("data");
    let mut args = vec!["--port", "0", "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    Process::spawn(&binary("kv-node"), &args)
}

/// Parses Prometheus text exposition into `series -> value`, failing on any
/// line that is not a comment, blank, or `name{labels} value`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut series = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let metric = name.split('{').next().unwrap();
        assert!(
            !metric.is_empty()
                && metric
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = name.strip_prefix(metric) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line:?}"
            );
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        series.insert(name.to_owned(), value);
    }
    series
}

fn metrics(node: &Process) -> HashMap<String, f64> {
    let response = request(node.addr, "GET", "/-/metrics", None).unwrap();
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    parse_prometheus(&response.text())
}

#[test]
fn metrics_parse_and_move_with_requests() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let before = metrics(&node);
    let put_200 = "kv_requests_total{op=\"put\",status=\"200\"}";
    let get_404 = "kv_requests_total{op=\"get\",status=\"404\"}";
    assert_eq!(before.get(put_200), None);
    for i in 0..7 {
        let r = request(
            node.addr,
            "PUT",
            &format!("/m{i}"),
            Some(br#"{"value": 1}"#),
        )
        .unwrap();
        assert_eq!(r.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(
            request(node.addr, "GET", "/absent", None).unwrap().status,
            404
        );
    }
    let after = metrics(&node);
    assert_eq!(after[put_200], 7.0);
    assert_eq!(after[get_404], 3.0);
    assert_eq!(after["kv_keys"], 7.0);
    assert_eq!(after["kv_request_duration_seconds_count{op=\"put\"}"], 7.0);
    assert_eq!(
        after["kv_request_duration_seconds_bucket{op=\"put\",le=\"+Inf\"}"],
        7.0
    );
    assert_eq!(after["kv_wal_records_total"], 7.0);
    assert!(after["kv_wal_active_bytes"] > 7.0 * 20.0, "{after:?}");
    assert!(after["kv_wal_writes_total"] >= 1.0);
    assert_eq!(after["kv_writable"], 1.0);
    let ready = request(node.addr, "GET", "/-/ready", None).unwrap();
    assert_eq!(ready.status, 200);
}

/// Waits until `path` holds at least `lines` lines, or the deadline passes.
fn wait_for_lines(path: &std::path::Path, lines: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn op_log_has_flask_format_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("kv_store.log");
    let node = start_node(dir.path(), &["--op-log", log_path.to_str().unwrap()]);
    request(node.addr, "PUT", "/key_1", Some(br#"{"value": "value_1"}"#)).unwrap();
    request(node.addr, "GET", "/key_1", None).unwrap();
    request(node.addr, "DELETE", "/key_1", None).unwrap();
    let text = wait_for_lines(&log_path, 3);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let ops = [
        "PUT - Key: key_1, Value: value_1",
        "GET - Key: key_1",
        "DELETE - Key: key_1",
    ];
    for (line, op) in lines.iter().zip(ops) {
        // "2024-10-07 14:07:10 - " then the operation.
        let (stamp, rest) = line.split_at(19);
        assert!(
            stamp.as_bytes()[4] == b'-'
                && stamp.as_bytes()[10] == b' '
                && stamp.as_bytes()[13] == b':',
            "{line}"
        );
        assert_eq!(rest, format!(" - {op}"), "{line}");
    }
}

#[test]
fn a_key_or_value_with_line_breaks_cannot_forge_op_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("kv_store.log");
    let mut node = start_node(dir.path(), &["--op-log", log_path.to_str().unwrap()]);
    let forged = "/a%0A2000-01-01%2000:00:00%20-%20DELETE%20-%20Key:%20victim";
    request(node.addr, "GET", forged, None).unwrap();
    request(node.addr, "DELETE", "/b%0D%0Ac%00", None).unwrap();
    let value = br#"{"value": "v\n2000-01-01 00:00:00 - DELETE - Key: victim"}"#;
    let put = request(node.addr, "PUT", "/k", Some(value)).unwrap();
    assert_eq!(put.status, 200);
    assert_eq!(node.terminate(), Some(0));
    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "one operation, one line:\n{text}");
    assert!(!text.contains('\r'), "{text}");
    assert!(
        lines[0].ends_with(" - GET - Key: a\\n2000-01-01 00:00:00 - DELETE - Key: victim"),
        "{text}"
    );
    assert!(
        lines[1].ends_with(" - DELETE - Key: b\\r\\nc\\u{0000}"),
        "{text}"
    );
    assert!(
        lines[2]
            .ends_with(" - PUT - Key: k, Value: v\\n2000-01-01 00:00:00 - DELETE - Key: victim"),
        "{text}"
    );
}

#[test]
fn every_op_log_line_is_written_by_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("kv_store.log");
    let mut node = start_node(dir.path(), &["--op-log", log_path.to_str().unwrap()]);
    for i in 0..300 {
        request(node.addr, "GET", &format!("/k{i}"), None).unwrap();
    }
    // Stopped at once: lines still queued must be written before exit.
    assert_eq!(node.terminate(), Some(0));
    let text = std::fs::read_to_string(&log_path).unwrap();
    let gets = text
        .lines()
        .filter(|l| l.contains(" - GET - Key: k"))
        .count();
    assert_eq!(gets, 300, "{text}");
}

#[test]
fn a_stuck_op_log_never_blocks_requests() {
    let dir = tempfile::tempdir().unwrap();
    // A FIFO nobody reads: opening it for writing blocks forever, so the log
    // writer is stuck and the buffer fills.
    let fifo = dir.path().join("stuck.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let node = start_node(
        dir.path(),
        &["--op-log", fifo.to_str().unwrap(), "--op-log-buffer", "4"],
    );
    for i in 0..100 {
        let r = request(
            node.addr,
            "PUT",
            &format!("/f{i}"),
            Some(br#"{"value": true}"#),
        )
        .unwrap();
        assert_eq!(r.status, 200, "request {i} was held up by the op log");
    }
    let m = metrics(&node);
    assert_eq!(m["kv_op_log_dropped_total"], 96.0);
    assert_eq!(m["kv_op_log_written_total"], 0.0);
    assert!(node.log_shows("op log cannot keep up"), "{}", node.log());
}

#[test]
fn snapshots_show_in_the_op_log_and_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("kv_store.log");
    let node = start_node(
        dir.path(),
        &[
            "--op-log",
            log_path.to_str().unwrap(),
            "--snapshot-interval",
            "100ms",
        ],
    );
    request(node.addr, "PUT", "/saved", Some(br#"{"value": 1}"#)).unwrap();
    // The PUT, then the SAVE of the snapshot that follows it.
    let text = wait_for_lines(&log_path, 2);
    let save = text
        .lines()
        .find(|l| l.contains(" - SAVE: Snapshot of 1 keys written ("))
        .unwrap_or_else(|| panic!("no SAVE line in:\n{text}"));
    assert_eq!(save.find(" - SAVE"), Some(19), "{save}");
    let m = metrics(&node);
    assert!(m["kv_snapshots_total"] >= 1.0, "{m:?}");
    assert!(m["kv_snapshot_bytes"] > 0.0);
    assert!(m["kv_snapshot_last_unix_seconds"] > 1.7e9);
}
