//! Durability through the real `kv-node` binary: crash loops with `kill -9`,
//! a corrupt log, a locked data dir, a disk error, the Flask import.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kv_store::journal::{record, segment, segment_name};
use kv_testkit::{binary, request, Process};
use serde_json::value::RawValue;

fn node_args<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--port", "0", "--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    args
}

fn put(addr: std::net::SocketAddr, key: &str, json: &str) -> u16 {
    let body = format!("{{\"value\": {json}}}");
    request(addr, "PUT", &format!("/{key}"), Some(body.as_bytes()))
        .unwrap()
        .status
}

fn get(addr: std::net::SocketAddr, key: &str) -> (u16, String) {
    let response = request(addr, "GET", &format!("/{key}"), None).unwrap();
    (response.status, response.text())
}

/// Runs the binary until it exits (bounded); its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(binary("kv-node"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kv-node {args:?} did not exit");
        }
        // Polling for the child's exit, bounded by the deadline.
        thread::sleep(Duration::from_millis(10));
    };
    (status.code(), reader.join().unwrap())
}

/// What a key should hold after a crash: the last acknowledged state, or the
/// state of a write in flight when the process died.
#[derive(Clone, Debug, Default)]
struct Expect {
    /// `None` before any acknowledged write; `Some(None)` acknowledged deleted.
    acked: Option<Option<String>>,
    in_flight: Option<Option<String>>,
}

/// Counts acknowledged writes and wakes the killer.
#[derive(Default)]
struct Acks {
    count: Mutex<usize>,
    changed: Condvar,
}

const WRITERS: usize = 8;
const KEYS_PER_WRITER: usize = 16;

/// Writers, each owning its keys (so each key's writes are sequential and at
/// most one is in flight), until the node stops answering.
fn write_until_killed(
    addr: std::net::SocketAddr,
    cycle: usize,
    model: &Arc<Mutex<HashMap<String, Expect>>>,
    acks: &Arc<Acks>,
) -> Vec<thread::JoinHandle<()>> {
    (0..WRITERS)
        .map(|writer| {
            let model = model.clone();
            let acks = acks.clone();
            thread::spawn(move || {
                for n in 0.. {
                    let key = format!("w{writer}_k{}", (n * 7 + cycle) % KEYS_PER_WRITER);
                    let delete = n % 10 == 9;
                    let value = (!delete).then(|| format!("\"c{cycle}_w{writer}_n{n}\""));
                    model
                        .lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_default()
                        .in_flight = Some(value.clone());
                    let response = match &value {
                        Some(json) => {
                            let body = format!("{{\"value\": {json}}}");
                            request(addr, "PUT", &format!("/{key}"), Some(body.as_bytes()))
                        }
                        None => request(addr, "DELETE", &format!("/{key}"), None),
                    };
                    let acknowledged = match &response {
                        Ok(r) if r.status == 200 => true,
                        // Deleting a key that is absent: the state is known.
                        Ok(r) if r.status == 404 && delete => true,
                        _ => false,
                    };
                    if !acknowledged {
                        // Killed mid-request (or refusing): the outcome is unknown.
                        return;
                    }
                    let mut model = model.lock().unwrap();
                    let expect = model.get_mut(&key).unwrap();
                    expect.acked = Some(value);
                    expect.in_flight = None;
                    drop(model);
                    *acks.count.lock().unwrap() += 1;
                    acks.changed.notify_all();
                }
            })
        })
        .collect()
}

/// Checks every key against the model and settles it on what was found.
fn verify(
    addr: std::net::SocketAddr,
    model: &Mutex<HashMap<String, Expect>>,
    cycle: usize,
) -> usize {
    let mut model = model.lock().unwrap();
    let mut checked = 0;
    for (key, expect) in model.iter_mut() {
        let (status, body) = get(addr, key);
        let found = match status {
            200 => Some(
                body.strip_prefix("{\"value\":")
                    .and_then(|b| b.strip_suffix("}\n"))
                    .unwrap_or_else(|| panic!("odd body {body:?}"))
                    .to_owned(),
            ),
            404 => None,
            other => panic!("GET {key}: status {other}"),
        };
        let acked_ok = match &expect.acked {
            Some(state) => state == &found,
            // Never acknowledged: anything it was written with, or nothing.
            None => true,
        };
        let in_flight_ok = expect.in_flight.as_ref() == Some(&found);
        assert!(
            acked_ok || in_flight_ok,
            "cycle {cycle}: LOST WRITE: key {key} holds {found:?}, acknowledged {:?}, in flight {:?}",
            expect.acked,
            expect.in_flight
        );
        expect.acked = Some(found);
        expect.in_flight = None;
        checked += 1;
    }
    checked
}

fn crash_loop(fsync: &str, cycles: usize, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = node_args(dir.path(), &["--fsync", fsync]);
    args.extend_from_slice(extra);
    let mut node = Process::spawn(&binary("kv-node"), &args);
    let model: Arc<Mutex<HashMap<String, Expect>>> = Arc::default();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id());
    let mut total_acks = 0;
    for cycle in 0..cycles {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Kill after a random number of acknowledged writes (while writes
        // keep flowing, so some are in flight).
        let kill_after = 5 + (seed % 120) as usize;
        let acks = Arc::new(Acks::default());
        let writers = write_until_killed(node.addr, cycle, &model, &acks);
        let mut count = acks.count.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while *count < kill_after {
            assert!(
                Instant::now() < deadline,
                "writers stalled; log:\n{}",
                node.log()
            );
            count = acks
                .changed
                .wait_timeout(count, Duration::from_secs(1))
                .unwrap()
                .0;
        }
        total_acks += *count;
        drop(count);
        node.kill9();
        for writer in writers {
            writer.join().unwrap();
        }
        node.restart();
        let checked = verify(node.addr, &model, cycle);
        assert!(checked > 0);
    }
    assert!(total_acks >= cycles * 5);
    assert!(
        node.log_shows("recovered"),
        "recovery is logged:\n{}",
        node.log()
    );
}

#[test]
fn crash_loop_fsync_always_loses_no_acknowledged_write() {
    // A small --wal-max-bytes makes snapshots (and log retirement) happen
    // during the loop, so kills also land mid-snapshot.
    crash_loop("always", 24, &["--wal-max-bytes", "16384"]);
}

#[test]
fn crash_loop_fsync_everysec_loses_no_acknowledged_write() {
    crash_loop(
        "everysec",
        10,
        &["--wal-max-bytes", "8192", "--snapshot-interval", "20ms"],
    );
}

#[test]
fn crash_loop_fsync_never_loses_nothing_on_a_process_crash() {
    crash_loop("never", 4, &[]);
}

/// Record start offsets in a log segment (after its header).
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut pos = segment::HEADER_LEN as usize;
    while let Some(rec) = record::decode(&bytes[pos..]).unwrap() {
        starts.push(pos);
        pos += rec.framed_len;
    }
    starts
}

#[test]
fn a_flipped_byte_mid_log_refuses_to_start_and_repair_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Process::spawn(
        &binary("kv-node"),
        &node_args(dir.path(), &["--fsync", "always"]),
    );
    for i in 0..10 {
        assert_eq!(put(node.addr, &format!("k{i}"), &format!("\"v{i}\"")), 200);
    }
    assert_eq!(node.terminate(), Some(0));
    let segment = dir.path().join(segment_name(1));
    let mut bytes = std::fs::read(&segment).unwrap();
    let starts = record_starts(&bytes);
    assert_eq!(starts.len(), 10);
    let offset = starts[5];
    bytes[offset + record::HEADER_LEN + 3] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();

    let (code, log) = run_to_exit(&node_args(dir.path(), &[]));
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains(&segment.display().to_string()),
        "names the file:\n{log}"
    );
    assert!(
        log.contains(&format!("offset {offset}")),
        "names the offset:\n{log}"
    );
    assert!(log.contains("--repair"), "{log}");

    let node = Process::spawn(&binary("kv-node"), &node_args(dir.path(), &["--repair"]));
    assert!(node.log_shows("repair"), "{}", node.log());
    for i in 0..5 {
        assert_eq!(
            get(node.addr, &format!("k{i}")),
            (200, format!("{{\"value\":\"v{i}\"}}\n"))
        );
    }
    assert_eq!(get(node.addr, "k7").0, 404);
    assert_eq!(put(node.addr, "k7", "\"again\""), 200);
    let side = PathBuf::from(format!("{}.corrupt-{offset}", segment.display()));
    assert_eq!(std::fs::read(side).unwrap(), &bytes[offset..]);
}

#[test]
fn a_second_node_on_the_same_data_dir_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Process::spawn(&binary("kv-node"), &node_args(dir.path(), &[]));
    let (code, log) = run_to_exit(&node_args(dir.path(), &[]));
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("in use by another process"), "{log}");
    // The first node is unharmed.
    assert_eq!(put(node.addr, "k", "1"), 200);
}

#[test]
fn a_disk_error_answers_503_to_writes_and_reads_keep_working() {
    // A file-size limit makes log appends fail with EFBIG, as a full disk would.
    let dir = tempfile::tempdir().unwrap();
    let kv_node = binary("kv-node");
    let mut args = vec!["--fsize=65536", "--", kv_node.to_str().unwrap()];
    args.extend(node_args(dir.path(), &["--fsync", "always"]));
    let node = Process::spawn(Path::new("prlimit"), &args);
    let value = format!("\"{}\"", "x".repeat(1000));
    let mut stored = Vec::new();
    let refused = loop {
        let key = format!("k{}", stored.len());
        match put(node.addr, &key, &value) {
            200 => stored.push(key),
            status => break status,
        }
        assert!(stored.len() < 1000, "the file-size limit never hit");
    };
    assert_eq!(refused, 503);
    let response = request(node.addr, "PUT", "/other", Some(b"{\"value\": 1}")).unwrap();
    assert_eq!(response.status, 503);
    assert!(
        response.text().starts_with("{\"error\":"),
        "{}",
        response.text()
    );
    assert!(
        response.text().contains("disk error"),
        "{}",
        response.text()
    );
    for key in &stored {
        assert_eq!(
            get(node.addr, key),
            (200, format!("{{\"value\":{value}}}\n"))
        );
    }
    // The write that hit the error was never applied: no reader is shown
    // it (a restart would take it back), nor one refused up front.
    let failed = format!("k{}", stored.len());
    assert_eq!(get(node.addr, &failed).0, 404);
    assert_eq!(get(node.addr, "other").0, 404);
    let health = request(node.addr, "GET", "/-/health", None).unwrap();
    assert!(
        health.text().contains("\"writable\":false"),
        "{}",
        health.text()
    );
    let ready = request(node.addr, "GET", "/-/ready", None).unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("disk error"), "{}", ready.text());
    assert!(node.log_shows("disk error"), "{}", node.log());
}

const FLASK_DUMP: &str = r#"{
  "string": "value_1",
  "empty string": "",
  "unicode ключ ☃": "héllo wörld 🎉",
  "escapes": "quote \" backslash \\ newline \n tab \t \u00e9",
  "int": 42,
  "negative": -17,
  "float": 3.14159,
  "exponent": 1.5e+300,
  "big": 12345678901234567890,
  "true": true,
  "false": false,
  "null": null,
  "array": [1, "two", null, [3.0, {"four": 4}]],
  "empty array": [],
  "object": {"nested": {"deep": [true, false]}, "n": 1},
  "empty object": {}
}"#;

fn encode_path(key: &str) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn flask_import_with_every_json_value_type() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("kv_store.json");
    std::fs::write(&dump, FLASK_DUMP).unwrap();
    let data = dir.path().join("data");
    let expected: BTreeMap<String, Box<RawValue>> = serde_json::from_str(FLASK_DUMP).unwrap();
    let check = |node: &Process| {
        for (key, raw) in &expected {
            let (status, body) = get(node.addr, &encode_path(key));
            assert_eq!(status, 200, "{key}");
            assert_eq!(body, format!("{{\"value\":{}}}\n", raw.get()), "{key}");
            let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
            let want: serde_json::Value = serde_json::from_str(raw.get()).unwrap();
            assert_eq!(parsed["value"], want, "{key}");
        }
    };
    let mut node = Process::spawn(
        &binary("kv-node"),
        &node_args(&data, &["--import", dump.to_str().unwrap()]),
    );
    assert!(
        node.log()
            .contains(&format!("imported {} keys", expected.len())),
        "{}",
        node.log()
    );
    check(&node);
    // Durable: a crash right after the import loses nothing.
    node.kill9();
    let node = Process::spawn(&binary("kv-node"), &node_args(&data, &[]));
    check(&node);
    drop(node);
    // Importing again over data refuses rather than overwrite newer writes.
    let (code, log) = run_to_exit(&node_args(&data, &["--import", dump.to_str().unwrap()]));
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("refusing to import"), "{log}");
    // A file that is not a dump is refused with the reason.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[1, 2, 3]").unwrap();
    let (code, log) = run_to_exit(&node_args(
        &dir.path().join("fresh"),
        &["--import", bad.to_str().unwrap()],
    ));
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("is not a Flask kv_store.json dump"), "{log}");
}

#[test]
fn recovery_time_and_key_count_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Process::spawn(&binary("kv-node"), &node_args(dir.path(), &[]));
    for i in 0..20 {
        assert_eq!(put(node.addr, &format!("k{i}"), "true"), 200);
    }
    node.restart();
    let log = node.log();
    assert!(log.contains("recovered 20 keys in"), "{log}");
}

/// The log frames at most 256 MiB per record: a larger `--max-value-bytes`
/// would let a PUT be acknowledged and then dropped by recovery as damage.
#[test]
fn a_max_value_bytes_the_log_cannot_frame_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let too_large = (300usize << 20).to_string();
    let (code, log) = run_to_exit(&node_args(dir.path(), &["--max-value-bytes", &too_large]));
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("--max-value-bytes"), "{log}");
    assert!(
        log.contains("more than the log can hold in one record"),
        "{log}"
    );
    // The largest accepted one starts.
    let most = kv_node::config::MAX_VALUE_BYTES_LIMIT.to_string();
    let node = Process::spawn(
        &binary("kv-node"),
        &node_args(dir.path(), &["--max-value-bytes", &most]),
    );
    assert_eq!(put(node.addr, "k", "1"), 200);
}
