//! Token authentication and protected mode (issue 14), with the real
//! binaries: the 401/200 matrix on a node and on the proxy in front of it,
//! the open health probe, metrics closed unless opened, protected mode
//! refusing to start, and a replicated cluster with a token end to end
//! (and a member started with the wrong one refused by its peers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{binary, exchange, Cluster, ClusterOpts, Process, Response};

const TOKEN: &str = "0123456789abcdef-test-token";

fn token_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A standalone kv-node on port 0, its data in `dir/data`, requiring the
/// token in `file`; `extra` flags appended.
fn node_with_token(dir: &Path, file: &Path, extra: &[&str]) -> Process {
    let data = dir.join("data");
    let mut args = vec![
        "--port",
        "0",
        "--data-dir",
        data.to_str().unwrap(),
        "--auth-token-file",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Process::spawn(&binary("kv-node"), &args)
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    send(addr, "GET", path, &headers, None).unwrap()
}

fn put(addr: SocketAddr, path: &str, auth: Option<&str>, value: &str) -> Response {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    let body = format!("{{\"value\": \"{value}\"}}");
    send(addr, "PUT", path, &headers, Some(&body)).unwrap()
}

fn assert_401(what: &str, response: &Response) {
    assert_eq!(response.status, 401, "{what}: {response:?}");
    assert_eq!(
        response.header("www-authenticate"),
        Some("Bearer realm=\"kv\""),
        "{what}: {response:?}"
    );
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Unauthorized")),
        "{what}: {json}"
    );
}

/// Every case of the matrix on one server (a node, or the proxy).
fn check_matrix(layer: &str, addr: SocketAddr) {
    let right = bearer();
    let key = format!("/auth-{layer}");
    assert_401(
        &format!("{layer}: PUT without"),
        &put(addr, &key, None, "x"),
    );
    assert_401(&format!("{layer}: GET without"), &get(addr, &key, None));
    assert_401(
        &format!("{layer}: wrong token"),
        &get(addr, &key, Some("Bearer not-the-token")),
    );
    assert_401(
        &format!("{layer}: a prefix of the token"),
        &get(addr, &key, Some(&right[..right.len() - 1])),
    );
    assert_401(
        &format!("{layer}: Basic"),
        &get(addr, &key, Some(&format!("Basic {TOKEN}"))),
    );
    assert_401(
        &format!("{layer}: no scheme"),
        &get(addr, &key, Some(TOKEN)),
    );
    // The right token: served, and the scheme in any case (RFC 9110 §11.1).
    assert_eq!(put(addr, &key, Some(&right), "v").status, 200, "{layer}");
    let read = get(addr, &key, Some(&format!("bearer {TOKEN}")));
    assert_eq!(read.status, 200, "{layer}: {read:?}");
    assert_eq!(read.text(), "{\"value\":\"v\"}\n", "{layer}");
    // Nothing was stored by the refused PUT: only the accepted one.
    // The health probe is open, metrics and the other admin paths are not.
    assert_eq!(get(addr, "/-/health", None).status, 200, "{layer}");
    assert_401(&format!("{layer}: metrics"), &get(addr, "/-/metrics", None));
    assert_401(&format!("{layer}: ready"), &get(addr, "/-/ready", None));
    assert_eq!(get(addr, "/-/metrics", Some(&right)).status, 200, "{layer}");
    // A header too large for the server's buffer: the JSON 431, not a
    // panic and not a 401.
    let huge = format!(
        "GET {key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    let response = exchange(addr, huge.as_bytes()).unwrap();
    assert_eq!(response.status, 431, "{layer}: {response:?}");
    let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert!(json["error"].is_string(), "{layer}: {json}");
    // And the server still serves.
    assert_eq!(get(addr, &key, Some(&right)).status, 200, "{layer}");
}

#[test]
fn node_and_proxy_refuse_requests_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = token_file(dir.path(), "token", &format!("{TOKEN}\n"));
    let file = file.to_str().unwrap();
    let node = node_with_token(dir.path(), file.as_ref(), &[]);
    let nodes = node.addr.to_string();
    let proxy = Process::spawn(
        &binary("kv-proxy"),
        &["--port", "0", "--nodes", &nodes, "--auth-token-file", file],
    );
    check_matrix("node", node.addr);
    check_matrix("proxy", proxy.addr);
    // The proxy sends its own token to the node, not the client's header.
    assert!(!proxy.log().contains("refused the proxy's token"));
}

#[test]
fn metrics_open_opens_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = token_file(dir.path(), "token", TOKEN);
    let node = node_with_token(dir.path(), file.as_ref(), &["--metrics-open"]);
    assert_eq!(get(node.addr, "/-/metrics", None).status, 200);
    assert_401("ready", &get(node.addr, "/-/ready", None));
    assert_401("key", &get(node.addr, "/k", None));
}

#[test]
fn a_proxy_with_the_wrong_node_token_answers_502_and_logs_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = token_file(dir.path(), "token", TOKEN);
    let wrong = token_file(dir.path(), "wrong", "another-token");
    let node = node_with_token(dir.path(), file.as_ref(), &[]);
    let nodes = node.addr.to_string();
    let proxy = Process::spawn(
        &binary("kv-proxy"),
        &[
            "--port",
            "0",
            "--nodes",
            &nodes,
            "--auth-token-file",
            file.to_str().unwrap(),
            "--node-token-file",
            wrong.to_str().unwrap(),
        ],
    );
    for _ in 0..3 {
        let response = get(proxy.addr, "/k", Some(&bearer()));
        assert_eq!(response.status, 502, "{response:?}");
        assert!(response.text().contains("refused the proxy's node token"));
    }
    let log = proxy.log();
    assert_eq!(log.matches("refused the proxy's token").count(), 1, "{log}");
}

/// Runs `program` with `args` to its exit (bounded); its code and stderr.
fn run_to_exit(program: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove("KV_AUTH_TOKEN")
        .env_remove("KV_AUTH_TOKEN_FILE")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            return (
                status.code(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{} {args:?} did not exit within {BOUND:?}",
                program.display()
            );
        }
        // Polling for the exit, not synchronising on time.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn protected_mode_refuses_other_addresses_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let empty = token_file(dir.path(), "empty", "\n");
    for (program, base) in [
        ("kv-node", vec!["--port", "0", "--data-dir", data]),
        ("kv-proxy", vec!["--port", "0", "--nodes", "127.0.0.1:1"]),
    ] {
        let program = binary(program);
        for bind in ["0.0.0.0", "::", "192.0.2.1"] {
            let mut args = base.clone();
            args.extend(["--bind", bind]);
            let (code, log) = run_to_exit(&program, &args, &[]);
            assert_eq!(code, Some(2), "{} --bind {bind}: {log}", program.display());
            assert!(log.contains("protected mode"), "{log}");
            assert!(log.contains("--auth-token-file"), "{log}");
            assert!(log.contains("--insecure-no-auth"), "{log}");
        }
        // An empty or missing token file is refused at start too.
        let mut args = base.clone();
        args.extend(["--auth-token-file", empty.to_str().unwrap()]);
        let (code, log) = run_to_exit(&program, &args, &[]);
        assert_eq!(code, Some(2), "{log}");
        assert!(log.contains("is empty"), "{log}");
        let mut args = base.clone();
        args.extend(["--auth-token-file", "/nonexistent/token"]);
        let (code, log) = run_to_exit(&program, &args, &[]);
        assert_eq!(code, Some(2), "{log}");
        assert!(log.contains("cannot read the auth token file"), "{log}");
    }
    // With --insecure-no-auth, or a token (here from KV_AUTH_TOKEN), it
    // starts on 0.0.0.0.
    let open = Process::spawn(
        &binary("kv-node"),
        &[
            "--port",
            "0",
            "--data-dir",
            data,
            "--bind",
            "0.0.0.0",
            "--insecure-no-auth",
        ],
    );
    let local = SocketAddr::from(([127, 0, 0, 1], open.addr.port()));
    assert_eq!(put(local, "/k", None, "open").status, 200);
    assert!(open.log_shows("--insecure-no-auth"));
    drop(open);
    let (code, log) = run_to_exit(
        &binary("kv-node"),
        &[
            "--port",
            "0",
            "--data-dir",
            data,
            "--bind",
            "0.0.0.0",
            "--insecure-no-auth",
        ],
        &[("KV_AUTH_TOKEN", TOKEN)],
    );
    assert_eq!(
        code,
        Some(2),
        "a token and --insecure-no-auth contradict: {log}"
    );
}

#[test]
fn a_replicated_cluster_with_a_token_works_and_refuses_a_member_with_another() {
    let opts = ClusterOpts {
        shards: 4,
        proxy: Some(Vec::new()),
        token: Some(TOKEN.to_owned()),
        ..ClusterOpts::default()
    };
    let mut cluster = Cluster::start(3, 3, opts);
    let proxy = cluster.proxy_addr().unwrap();
    let right = bearer();
    // End to end through the proxy, and through every node (a node that
    // does not lead a key's shard forwards it with the cluster token).
    let keys: Vec<String> = (0..12).map(|i| format!("/tok-{i}")).collect();
    for key in &keys {
        assert_eq!(put(proxy, key, Some(&right), "p").status, 200, "{key}");
    }
    for id in 1..=3 {
        for key in &keys {
            let read = get(cluster.addr(id), key, Some(&right));
            assert_eq!(read.status, 200, "node {id} {key}: {read:?}");
            assert_eq!(read.text(), "{\"value\":\"p\"}\n");
        }
        assert_401("node /-/shards", &get(cluster.addr(id), "/-/shards", None));
        // Raft traffic without the token is refused before it is read.
        let forged = send(
            cluster.addr(id),
            "POST",
            "/-/raft/vote",
            &[("X-Kv-Node-Id", "9")],
            Some("{}"),
        )
        .unwrap();
        assert_401("forged raft", &forged);
    }
    assert_401("proxy", &get(proxy, &keys[0], None));

    // Node 3 restarted with another token: its peers refuse it, logged
    // once per peer, and it refuses theirs; the others keep serving.
    cluster.kill9(3);
    std::fs::write(cluster.token_file(), "a-wrong-cluster-token\n").unwrap();
    cluster.restart(3);
    std::fs::write(cluster.token_file(), format!("{TOKEN}\n")).unwrap();
    for id in [1, 2] {
        wait_until(&format!("node {id} refuses node 3"), BOUND, || {
            cluster.log(id).contains("refused node 3's requests")
        });
    }
    wait_until("node 3 is refused by its peers", BOUND, || {
        cluster.log(3).contains("refused this node's cluster token")
    });
    cluster.wait_for_leaders_among(&[1, 2], BOUND);
    for key in &keys {
        assert_eq!(put(proxy, key, Some(&right), "q").status, 200, "{key}");
        let read = get(proxy, key, Some(&right));
        assert_eq!(read.text(), "{\"value\":\"q\"}\n", "{key}");
    }
    // Node 3's groups did not accept it: its replicas did not get the new
    // values (a stale read answers from its own copy).
    let wrong = "Bearer a-wrong-cluster-token";
    for key in &keys {
        let read = send(
            cluster.addr(3),
            "GET",
            key,
            &[("Authorization", wrong), ("X-Kv-Consistency", "stale")],
            None,
        )
        .unwrap();
        assert_ne!(read.text(), "{\"value\":\"q\"}\n", "{key}: {read:?}");
    }
    // Logged once per peer, not per request.
    for id in [1, 2] {
        let log = cluster.log(id);
        assert_eq!(
            log.matches("refused node 3's requests").count(),
            1,
            "node {id}: {log}"
        );
    }
}

#[test]
fn a_proxy_without_a_token_passes_the_clients_header_on() {
    let dir = tempfile::tempdir().unwrap();
    let file = token_file(dir.path(), "token", TOKEN);
    let node = node_with_token(dir.path(), file.as_ref(), &[]);
    let nodes = node.addr.to_string();
    let proxy = Process::spawn(&binary("kv-proxy"), &["--port", "0", "--nodes", &nodes]);
    // The node's own 401, relayed: the client is the one without a token.
    assert_401("through a tokenless proxy", &get(proxy.addr, "/k", None));
    assert_eq!(put(proxy.addr, "/k", Some(&bearer()), "v").status, 200);
    assert_eq!(get(proxy.addr, "/k", Some(&bearer())).status, 200);
}
