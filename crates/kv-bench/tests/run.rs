#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `kv-bench` binary against real `kv-node` processes, and against
//! fake servers that answer wrongly or not at all.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;

use kv_testkit::{request, Process};
use serde_json::Value;

mod common;
use common::{bench, binary, explain, lines};

fn node(dir: &Path) -> Process {
    Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", dir.to_str().unwrap()],
    )
}

/// The runs `--json` wrote.
fn runs(json: &Path) -> Vec<Value> {
    lines(json)
}

#[test]
fn runs_against_two_nodes_with_checked_answers_and_cleans_up() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let nodes = [node(dirs[0].path()), node(dirs[1].path())];
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("runs.json");
    let urls = format!("{},{}", nodes[0].url(), nodes[1].url());
    let output = bench(&[
        "--urls",
        &urls,
        "--requests",
        "3000",
        "--concurrency",
        "8",
        "--keys",
        "200",
        "--mix",
        "set=2,get=2,delete=1",
        "--prefix",
        "itest",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Final Results:"), "{stdout}");
    assert!(
        stdout.contains("Nodes: 2, Total operations: 3000"),
        "{stdout}"
    );

    let runs = runs(&json);
    assert_eq!(runs.len(), 2, "one object per run");
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run["nodes"], i + 1);
        assert_eq!(run["operations"], 3000);
        assert_eq!(run["errors_total"], 0, "{run}");
        assert!(run["gets"].as_u64().unwrap() > 0);
        let per_node: u64 = run["node_requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(per_node, 3000);
        assert_eq!(run["ring_share"].as_array().unwrap().len(), i + 1);
        assert!(run["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    }
    // Both nodes served the 2-node run.
    assert!(runs[1]["node_requests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n.as_u64().unwrap() > 0));
    assert!(runs[1]["speedup_vs_1_node"].as_f64().is_some());

    // Cleanup: none of the 1-node run's keys is left on the node.
    for i in 0..200 {
        let response = request(nodes[0].addr, "GET", &format!("/itestn1_{i}"), None).unwrap();
        assert_eq!(response.status, 404, "itestn1_{i} left behind");
    }
}

#[test]
fn spawn_flag_runs_the_seed_workload_standalone() {
    // --spawn starts the kv-node found next to kv-bench.
    binary("kv-node");
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("seed.json");
    let output = bench(&[
        "--spawn",
        "--nodes",
        "2",
        "--workload",
        "seed",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let runs = runs(&json);
    assert_eq!(runs.len(), 2);
    for run in &runs {
        assert_eq!(run["workload"], "seed");
        assert_eq!(run["concurrency"], 250);
        assert_eq!(
            (&run["sets"], &run["gets"], &run["deletes"]),
            (&Value::from(200), &Value::from(200), &Value::from(200))
        );
        assert_eq!(run["errors_total"], 0, "{run}");
    }
}

/// A server that speaks HTTP/1.1 keep-alive and answers every request with
/// `answer(method)`; `None` never answers.
fn fake_server(answer: fn(&str) -> Option<&'static str>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || serve(stream, answer));
        }
    });
    addr
}

fn serve(stream: TcpStream, answer: fn(&str) -> Option<&'static str>) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut method = String::new();
        let mut content_length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if first {
                method = line.split(' ').next().unwrap_or("").to_owned();
                first = false;
            } else if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let Some(reply) = answer(&method) else {
            // Hold the connection open without answering.
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
            return;
        };
        // "404 " in front of a reply: answer 404 and close the connection
        // after it, as a server at its keep-alive limit does.
        let (status, reply, close) = match reply.strip_prefix("404 ") {
            Some(reply) => ("404 Not Found", reply, "connection: close\r\n"),
            None => ("200 OK", reply, ""),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{close}content-length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if writer.write_all(response.as_bytes()).is_err() || !close.is_empty() {
            return;
        }
    }
}

fn wrong_values(method: &str) -> Option<&'static str> {
    Some(match method {
        "GET" => "{\"value\":\"not what you stored\"}\n",
        "DELETE" => "{\"message\":\"Key deleted successfully\"}\n",
        _ => "{\"message\":\"Value stored successfully\"}\n",
    })
}

#[test]
fn wrong_values_are_caught_and_fail_the_run() {
    let addr = fake_server(wrong_values);
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("wrong.json");
    let url = format!("http://{addr}");
    let args = [
        "--urls",
        &url,
        "--requests",
        "300",
        "--concurrency",
        "4",
        "--keys",
        "50",
        "--mix",
        "set=1,get=1",
        "--json",
        json.to_str().unwrap(),
    ];
    let output = bench(&args);
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("wrong_value"), "{stdout}");
    let run = &runs(&json)[0];
    assert!(run["errors"]["wrong_value"].as_u64().unwrap() > 0, "{run}");
    assert_eq!(run["errors_total"], run["errors"]["wrong_value"]);

    // --allow-errors reports the same errors but exits 0.
    let mut allowed = args.to_vec();
    allowed.push("--allow-errors");
    let output = bench(&allowed);
    assert!(output.status.success(), "{}", explain(&output));
    // --json appends: this run is the second line.
    let all = runs(&json);
    assert_eq!(all.len(), 2);
    assert!(all[1]["errors"]["wrong_value"].as_u64().unwrap() > 0);
}

#[test]
fn a_node_that_never_answers_counts_timeouts() {
    let addr = fake_server(|_| None);
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("stalled.json");
    let url = format!("http://{addr}");
    let output = bench(&[
        "--urls",
        &url,
        "--requests",
        "3",
        "--concurrency",
        "1",
        "--keys",
        "5",
        "--timeout",
        "200ms",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    let run = &runs(&json)[0];
    assert!(run["errors"]["timeout"].as_u64().unwrap() >= 3, "{run}");
}

#[test]
fn an_unreachable_node_is_a_clear_setup_error() {
    // A port nothing listens on: bind one, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = bench(&["--base-port", &port.to_string(), "--requests", "10"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(stderr.contains("--spawn"), "{stderr}");
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let output = bench(&["--mix", "set=1,fly=2"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown operation"));
    let output = bench(&["--requests", "10", "--duration", "1s"]);
    assert_eq!(output.status.code(), Some(2));
    let output = bench(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("KV_BENCH_CONCURRENCY"), "{help}");
    assert!(help.contains("[default: set=1,get=1,delete=1]"), "{help}");
    assert!(help.contains("--only-max"), "{help}");
}

#[test]
fn a_server_that_closes_after_each_answer_is_followed_without_errors() {
    // Every key is absent, so 404 is the right answer to each GET; the
    // server closes the connection after each one and kv-bench reconnects.
    let addr = fake_server(|_| Some("404 {\"error\":\"Key not found\"}\n"));
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("close.json");
    let url = format!("http://{addr}");
    let output = bench(&[
        "--urls",
        &url,
        "--requests",
        "200",
        "--concurrency",
        "4",
        "--keys",
        "40",
        "--mix",
        "get=1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let run = &runs(&json)[0];
    assert_eq!(run["operations"], 200);
    assert_eq!(run["errors_total"], 0, "{run}");
}

#[test]
fn seed_batches_that_race_are_checked_and_leave_nothing_behind() {
    // 30 requests in one batch of 100: each key's SET, GET and DELETE race.
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("race.json");
    let url = node.url();
    let output = bench(&[
        "--urls",
        &url,
        "--workload",
        "seed",
        "--requests",
        "30",
        "--concurrency",
        "100",
        "--prefix",
        "race",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let run = &runs(&json)[0];
    assert_eq!(run["operations"], 30);
    assert_eq!(run["errors_total"], 0, "{run}");
    for i in 0..10 {
        let response = request(node.addr, "GET", &format!("/racen1_key_{i}"), None).unwrap();
        assert_eq!(response.status, 404, "racen1_key_{i} left behind");
    }
}

#[test]
fn the_hyper_client_checks_answers_like_the_lean_default() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("hyper.json");
    let common = |url: &str, mix: &'static str| {
        vec![
            "--client".to_owned(),
            "hyper".to_owned(),
            "--urls".to_owned(),
            url.to_owned(),
            "--requests".to_owned(),
            "2000".to_owned(),
            "--concurrency".to_owned(),
            "4".to_owned(),
            "--keys".to_owned(),
            "40".to_owned(),
            "--mix".to_owned(),
            mix.to_owned(),
            "--json".to_owned(),
            json.to_str().unwrap().to_owned(),
        ]
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    // A real node: every answer right.
    let real = common(&node.url(), "set=2,get=2,delete=1");
    let output = bench(&args(&real));
    assert!(output.status.success(), "{}", explain(&output));
    let run = &runs(&json)[0];
    assert_eq!(run["operations"], 2000);
    assert_eq!(run["errors_total"], 0, "{run}");

    // Wrong values are caught.
    let fake = format!("http://{}", fake_server(wrong_values));
    let output = bench(&args(&common(&fake, "set=1,get=1")));
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    // --json appends: this run is the second line.
    let all = runs(&json);
    assert_eq!(all.len(), 2);
    assert!(all[1]["errors"]["wrong_value"].as_u64().unwrap() > 0);

    // A server that closes after each answer is followed.
    let closing = format!(
        "http://{}",
        fake_server(|_| Some("404 {\"error\":\"Key not found\"}\n"))
    );
    let output = bench(&args(&common(&closing, "get=1")));
    assert!(output.status.success(), "{}", explain(&output));
    assert_eq!(runs(&json)[2]["errors_total"], 0);
}

#[test]
fn open_loop_reports_corrected_latency_and_warmup_is_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("rate.json");
    let url = node.url();
    let output = bench(&[
        "--urls",
        &url,
        "--rate",
        "1000",
        "--requests",
        "400",
        "--warmup",
        "100ms",
        "--concurrency",
        "4",
        "--keys",
        "40",
        "--mix",
        "set=1,get=3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let run = &runs(&json)[0];
    assert_eq!(run["operations"], 400, "warmup requests are not counted");
    assert_eq!(run["errors_total"], 0, "{run}");
    assert_eq!(run["rate"], 1000.0);
    // 400 requests on a 1000/s schedule cannot be done much before 0.4 s
    // (a lower bound set by the schedule, not a speed threshold).
    assert!(run["seconds"].as_f64().unwrap() >= 0.35, "{run}");
    // Each request's corrected latency (from when it was due) is at least
    // its raw latency (from when it left), so every percentile is too.
    let raw = &run["latency_ms"];
    let corrected = &run["corrected_latency_ms"];
    for q in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            corrected[q].as_f64().unwrap() >= raw[q].as_f64().unwrap(),
            "{q}: {run}"
        );
    }
    // The summary row shows the corrected figures, labelled, not the raw
    // ones (which hide a server stall).
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row = stdout
        .lines()
        .skip_while(|line| !line.starts_with("Final Results"))
        .find(|line| line.starts_with("Nodes: 1"))
        .unwrap_or_else(|| panic!("no summary row: {stdout}"));
    let expected = format!(
        "corrected latency: p50 {:.3} ms, p99 {:.3} ms",
        corrected["p50"].as_f64().unwrap(),
        corrected["p99"].as_f64().unwrap()
    );
    assert!(row.contains(&expected), "{row}\nexpected {expected}");

    // A sweep: a second run with the same --json keeps the first.
    let output = bench(&[
        "--urls",
        &url,
        "--rate",
        "500",
        "--requests",
        "50",
        "--concurrency",
        "2",
        "--keys",
        "10",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let rates: Vec<f64> = runs(&json)
        .iter()
        .map(|run| run["rate"].as_f64().unwrap())
        .collect();
    assert_eq!(rates, [1000.0, 500.0]);
}

/// The kv-node processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        if head.ends_with("(kv-node") && fields[0] != "Z" && fields[1] == parent.to_string() {
            found.push(pid);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

fn node_dirs(temp: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(temp)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kv-bench-node-")
        })
        .map(|e| e.path())
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Starts `kv-bench --spawn --nodes 2` for a long run with its temp dir in
/// `temp`, and returns once both nodes serve and the run has begun.
fn long_spawned_run(temp: &Path) -> (std::process::Child, Vec<u32>) {
    let mut child = Command::new(binary("kv-bench"))
        .args([
            "--spawn",
            "--nodes",
            "2",
            "--only-max",
            "-d",
            "60s",
            "--quiet",
        ])
        .env("TMPDIR", temp)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("Run:") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("kv-bench started its run");
    let nodes = children(child.id());
    assert_eq!(nodes.len(), 2, "two spawned kv-nodes");
    assert_eq!(node_dirs(temp).len(), 2);
    (child, nodes)
}

#[test]
fn spawned_nodes_and_their_data_go_when_kv_bench_is_stopped() {
    for (signal, code) in [("-TERM", 143), ("-INT", 130)] {
        let temp = tempfile::tempdir().unwrap();
        let (mut child, nodes) = long_spawned_run(temp.path());
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{signal}");
        for pid in nodes {
            wait_until(&format!("node {pid} stops after {signal}"), || !alive(pid));
        }
        assert_eq!(node_dirs(temp.path()), Vec::<std::path::PathBuf>::new());
    }
}

#[test]
fn spawned_nodes_stop_when_kv_bench_is_killed_and_the_next_run_removes_their_data() {
    let temp = tempfile::tempdir().unwrap();
    let (mut child, nodes) = long_spawned_run(temp.path());
    child.kill().unwrap(); // SIGKILL: no handler runs in kv-bench
    child.wait().unwrap();
    for pid in nodes {
        wait_until(&format!("node {pid} stops with its parent"), || !alive(pid));
    }
    assert_eq!(node_dirs(temp.path()).len(), 2, "left for the next run");
    let output = Command::new(binary("kv-bench"))
        .args(["--spawn", "--nodes", "1", "--requests", "50", "--quiet"])
        .env("TMPDIR", temp.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", explain(&output));
    assert_eq!(node_dirs(temp.path()), Vec::<std::path::PathBuf>::new());
}

/// Kills the child when dropped, so a failed assertion does not leave a
/// 10-minute run behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn keep_keys_leaves_a_data_set_for_later_runs_and_a_stop_file_ends_a_run_early() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("runs.json");
    let json_arg = json.to_str().unwrap();
    let url = node.url();
    let common = [
        "--urls",
        &url,
        "--concurrency",
        "4",
        "--keys",
        "100",
        "--prefix",
        "keep",
        "--quiet",
    ];
    let run = |extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend_from_slice(extra);
        bench(&args)
    };
    let all_present = || {
        (0..100).all(|i| {
            request(node.addr, "GET", &format!("/keepn1_{i}"), None)
                .unwrap()
                .status
                == 200
        })
    };

    // The load: every key set once, and left there at the end.
    let output = run(&[
        "--preload",
        "--keep-keys",
        "-n",
        "50",
        "--mix",
        "get=1",
        "--json",
        json_arg,
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    assert!(all_present(), "the preloaded keys stay");

    // A later run reads values it did not write, and leaves them too.
    let output = run(&[
        "--keep-keys",
        "-n",
        "400",
        "--mix",
        "get=3,set=1",
        "--json",
        json_arg,
    ]);
    assert!(output.status.success(), "{}", explain(&output));
    let second = &runs(&json)[1];
    assert_eq!(second["errors_total"], 0, "{second}");
    assert!(second["gets"].as_u64().unwrap() > 0, "{second}");
    assert!(all_present(), "nothing cleaned up");

    // Without the flag the same run expects the keys absent: the loaded
    // values count as wrong answers.
    let output = run(&["-n", "40", "--mix", "get=1"]);
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));

    // --stop-file ends a 10-minute run once the file appears, with the
    // usual report: here once the run has written (key 0 exists).
    let stop = out.path().join("stop");
    let stopped_json = out.path().join("stopped.json");
    let child = Command::new(binary("kv-bench"))
        .args([
            "--urls",
            &url,
            "--concurrency",
            "2",
            "--keys",
            "2",
            "--prefix",
            "stopped",
            "--mix",
            "set=1",
            "--rate",
            "200",
            "-d",
            "10m",
            "--quiet",
            "--keep-keys",
            "--stop-file",
            stop.to_str().unwrap(),
            "--json",
            stopped_json.to_str().unwrap(),
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    wait_until("the run writes key 0", || {
        request(node.addr, "GET", "/stoppedn1_0", None)
            .unwrap()
            .status
            == 200
    });
    std::fs::write(&stop, b"").unwrap();
    let mut status = None;
    wait_until("kv-bench ends once the stop file exists", || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    let stopped = &runs(&stopped_json)[0];
    assert!(stopped["sets"].as_u64().unwrap() > 0, "{stopped}");
    assert_eq!(stopped["errors_total"], 0, "{stopped}");
}
