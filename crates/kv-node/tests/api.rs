//! The HTTP API of an in-process kv-node on port 0, driven over real sockets.
//!
//! The API tests run twice (design §14, test 6): against a standalone node
//! and against a one-node cluster (`--peers` with `--replicas 1`), whose
//! answers must be the same byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

/// How the node under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No `--peers`: today's single-node store.
    Standalone,
    /// `--node-id 1 --peers 1=<its address> --replicas 1`.
    OneNodeCluster,
}

impl Server {
    async fn start_with(adjust: impl FnOnce(&mut kv_node::Config)) -> Server {
        Self::start_in(Mode::Standalone, adjust).await
    }

    async fn start_in(mode: Mode, adjust: impl FnOnce(&mut kv_node::Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut config = kv_node::Config::for_tests(dir.path().to_path_buf());
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        if mode == Mode::OneNodeCluster {
            config.node_id = Some(1);
            config.peers = Some(format!("1={addr}"));
            config.replicas = Some(1);
            config.shards = Some(8);
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kv_node::run(listener, config, async {
            let _ = stopped.await;
        }));
        let server = Server {
            addr,
            stop: Some(stop),
            task,
            _dir: dir,
        };
        if mode == Mode::OneNodeCluster {
            server.wait_for_leaders().await;
        }
        server
    }

    /// Waits (bounded) until every shard's group has elected this node.
    async fn wait_for_leaders(&self) {
        let client = Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = client.get(self.url("/-/shards")).send().await {
                if let Ok(view) = response.json::<Value>().await {
                    let groups = view["groups"].as_array().cloned().unwrap_or_default();
                    if !groups.is_empty() && groups.iter().all(|g| g["leader"] == 1) {
                        return;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the one-node cluster elected no leaders"
            );
            // Polling a condition, not synchronising on time.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn send(
    client: &Client,
    method: Method,
    url: &str,
    body: Option<&str>,
) -> (StatusCode, String) {
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

/// Sends raw bytes on a fresh connection and returns everything the server
/// wrote before closing (bounded by a generous deadline).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out));
    let _ = read.await.expect("the server closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

async fn every_api_row(mode: Mode) {
    let server = Server::start_in(mode, |_| {}).await;
    let client = Client::new();
    let url = server.url("/key_1");

    for method in [Method::PUT, Method::POST] {
        let (status, body) = send(&client, method, &url, Some(r#"{"value": "value_1"}"#)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "{\"message\":\"Value stored successfully\"}\n");
    }

    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.text().await.unwrap(), "{\"value\":\"value_1\"}\n");

    let head = client.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], "20");
    assert_eq!(head.text().await.unwrap(), "");

    let (status, body) = send(&client, Method::DELETE, &url, None).await;
    assert_eq!(
        (status, body.as_str()),
        (
            StatusCode::OK,
            "{\"message\":\"Key deleted successfully\"}\n"
        )
    );

    for method in [Method::GET, Method::DELETE] {
        let (status, body) = send(&client, method, &url, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, "{\"error\":\"Key not found\"}\n");
    }
    let head = client.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);

    let health = client.get(server.url("/-/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["keys"], 0);
    server.stop().await;
}

async fn every_json_value_type_round_trips_exactly(mode: Mode) {
    let server = Server::start_in(mode, |_| {}).await;
    let client = Client::new();
    let values = [
        r#""text with \"quotes\" and \u00e9""#,
        "42",
        "-1.50e3",
        "true",
        "false",
        "null",
        r#"[1, "two", [3], {"four": 4}]"#,
        r#"{"nested": {"a": [true, null]}, "b": 1.0}"#,
        r#""""#,
    ];
    for (i, value) in values.iter().enumerate() {
        let url = server.url(&format!("/type_{i}"));
        let (status, _) = send(
            &client,
            Method::PUT,
            &url,
            Some(&format!(r#"{{"value": {value}}}"#)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{value}");
        let (status, body) = send(&client, Method::GET, &url, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!("{{\"value\":{value}}}\n"),
            "exact text comes back"
        );
        // And it is the same JSON value.
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            parsed["value"],
            serde_json::from_str::<Value>(value).unwrap()
        );
    }
    server.stop().await;
}

async fn unicode_and_percent_encoded_keys(mode: Mode) {
    let server = Server::start_in(mode, |_| {}).await;
    let client = Client::new();
    // reqwest percent-encodes the non-ASCII path; the node decodes it.
    let (status, _) = send(
        &client,
        Method::PUT,
        &server.url("/café-日本"),
        Some(r#"{"value": 1}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(
        &client,
        Method::GET,
        &server.url("/caf%C3%A9-%E6%97%A5%E6%9C%AC"),
        None,
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"value\":1}\n"));
    // An encoded slash is part of one segment.
    let (status, _) = send(
        &client,
        Method::PUT,
        &server.url("/a%2Fb"),
        Some(r#"{"value": 2}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(&client, Method::GET, &server.url("/a%2Fb"), None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"value\":2}\n"));
    // %20 and a literal-safe equivalent are the same key.
    send(
        &client,
        Method::PUT,
        &server.url("/a%20b"),
        Some(r#"{"value": 3}"#),
    )
    .await;
    let (_, body) = send(&client, Method::GET, &server.url("/a%20b"), None).await;
    assert_eq!(body, "{\"value\":3}\n");
    let longest = "k".repeat(1024);
    let (status, _) = send(
        &client,
        Method::PUT,
        &server.url(&format!("/{longest}")),
        Some(r#"{"value": 4}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

fn error_of(body: &str) -> String {
    let parsed: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    parsed["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
        .to_owned()
}

async fn bad_input_matrix_then_still_serving(mode: Mode) {
    let server = Server::start_in(mode, |c| c.max_value_bytes = 1000).await;
    let client = Client::new();
    let url = server.url("/k");

    // Malformed JSON, missing value, wrong shape.
    for (body, expect) in [
        ("{", "Malformed JSON"),
        ("", "Malformed JSON"),
        ("not json", "Malformed JSON"),
        (r#"{"value": 1} trailing"#, "Malformed JSON"),
        ("{}", "'value'"),
        (r#"{"val": 1}"#, "'value'"),
        ("[1, 2]", "'value'"),
        (r#""just a string""#, "'value'"),
    ] {
        let (status, text) = send(&client, Method::PUT, &url, Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        assert!(error_of(&text).contains(expect), "{body:?} -> {text}");
    }

    // Bad keys.
    for path in ["/", "/a/b", "/%FF%FE", &format!("/{}", "k".repeat(1025))] {
        let (status, text) = send(&client, Method::GET, &server.url(path), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(error_of(&text).starts_with("Invalid key"), "{text}");
    }

    // Unknown methods get 405 with Allow.
    let response = client.patch(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response.headers()["allow"],
        "GET, HEAD, PUT, POST, DELETE, OPTIONS"
    );
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(error_of(&response.text().await.unwrap()).contains("not allowed"));
    let response = client.delete(server.url("/-/health")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "GET, HEAD, OPTIONS");
    if mode == Mode::OneNodeCluster {
        // Node-to-node routes take POST only; OPTIONS says so, as on every
        // other path (it was a 405).
        let response = client
            .request(Method::OPTIONS, server.url("/-/raft/append"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(response.headers()["allow"], "POST");
        let response = client
            .get(server.url("/-/raft/append"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()["allow"], "POST");
    }

    // Unknown admin path.
    let (status, text) = send(&client, Method::GET, &server.url("/-/nope"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&text), "Unknown admin path");

    // Oversized body, declared by Content-Length...
    let big = format!(r#"{{"value": "{}"}}"#, "x".repeat(2000));
    let (status, text) = send(&client, Method::PUT, &url, Some(&big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error_of(&text).contains("1000 bytes"));
    // ...and chunked, with no length up front.
    let chunked = format!(
        "PUT /k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let answer = raw_exchange(server.addr, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:.80}");

    // Oversized URI and headers, as hyper answers them.
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(70_000));
    let answer = raw_exchange(server.addr, long_uri.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 414") || answer.starts_with("HTTP/1.1 431"),
        "{answer:.80}"
    );
    // More headers than hyper takes (100). (A head over hyper's buffer
    // size is refused only when it arrives in more reads than it takes to
    // fill the buffer, which depends on timing.)
    let long_header = format!(
        "GET /k HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-Many: h\r\n".repeat(150)
    );
    let answer = raw_exchange(server.addr, long_header.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    // One header of 100 KB: over the 32 KiB head limit, under hyper's
    // default (~408 KiB), which let each connection hold that much.
    let big_header = format!(
        "GET /k HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let answer = raw_exchange(server.addr, big_header.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    assert!(answer.contains("application/json"), "{answer:.200}");
    // Garbage instead of HTTP.
    let answer = raw_exchange(server.addr, b"\x16\x03\x01 hello not http\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:.80}");

    // Nothing above stored anything, and the server still answers correctly.
    let (status, _) = send(&client, Method::GET, &url, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(&client, Method::PUT, &url, Some(r#"{"value": "ok"}"#)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = send(&client, Method::GET, &url, None).await;
    assert_eq!(body, "{\"value\":\"ok\"}\n");
    server.stop().await;
}

#[tokio::test]
async fn half_requests_and_idle_clients_are_cut_off() {
    let server = Server::start_with(|c| {
        c.header_timeout = Duration::from_millis(300);
        c.body_timeout = Duration::from_millis(300);
    })
    .await;

    // Half a request head, then silence: hyper's header timeout closes it.
    let mut stuck = TcpStream::connect(server.addr).await.unwrap();
    stuck
        .write_all(b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Le")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stuck.read_to_end(&mut out))
        .await
        .expect("a stuck header is cut off")
        .unwrap();

    // A full head promising a body that never comes: 408, then closed.
    let answer = raw_exchange(
        server.addr,
        b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"value\"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("Timed out waiting for the request body"));

    // A keep-alive connection left idle is closed too.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /-/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut out))
        .await
        .expect("an idle keep-alive connection is closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));

    // Meanwhile, and after, the server answers.
    let client = Client::new();
    let (status, _) = send(
        &client,
        Method::PUT,
        &server.url("/k"),
        Some(r#"{"value": 1}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_fast() {
    let server = Server::start_with(|c| c.max_connections = 2).await;
    // Two connections that each complete a request hold both permits.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /-/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(stream);
    }
    // Over the cap, a key is refused (health and readiness are not: see
    // kv-proxy's tests/contract.rs).
    let answer = raw_exchange(server.addr, b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Too many connections"));
    // Freeing one lets the next client in.
    drop(held.pop());
    let client = Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = client.get(server.url("/-/health")).send().await.unwrap();
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed permit was never reused"
        );
        tokio::task::yield_now().await;
    }
    server.stop().await;
}

async fn keep_alive_serves_many_requests_on_one_connection(mode: Mode) {
    let server = Server::start_in(mode, |_| {}).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut pipeline = Vec::new();
    for i in 0..10 {
        let body = format!(r#"{{"value": {i}}}"#);
        pipeline.extend_from_slice(
            format!(
                "PUT /ka HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    pipeline.extend_from_slice(b"GET /ka HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(&pipeline).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert_eq!(out.matches("HTTP/1.1 200").count(), 11);
    assert!(out.ends_with("{\"value\":9}\n"), "{out}");
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let server = Server::start_with(|c| c.body_timeout = Duration::from_secs(20)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let body = br#"{"value": "late"}"#;
    // `Expect: 100-continue` makes hyper say "100 Continue" when the handler
    // starts reading the body: then we know the request is in flight.
    let head = format!(
        "PUT /late HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut continue_line = [0u8; 25];
    stream.read_exact(&mut continue_line).await.unwrap();
    assert_eq!(&continue_line, b"HTTP/1.1 100 Continue\r\n\r\n");

    let addr = server.addr;
    let stop = tokio::spawn(server.stop());
    stream.write_all(body).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    stop.await.unwrap();
    // The listener is gone once run() returned.
    assert!(TcpStream::connect(addr).await.is_err());
}

async fn concurrent_writers_leave_a_state_some_order_explains(mode: Mode) {
    let server = Server::start_in(mode, |_| {}).await;
    let client = Client::new();
    const TASKS: usize = 16;
    const ROUNDS: usize = 40;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = client.clone();
        let base = server.url("");
        tasks.push(tokio::spawn(async move {
            let mut last_shared = None;
            for r in 0..ROUNDS {
                // A large value, so a torn write would show as a mix.
                let value = format!("t{t}r{r}-{}", "x".repeat(4096));
                let body = format!(r#"{{"value": "{value}"}}"#);
                let (status, _) =
                    send(&client, Method::PUT, &format!("{base}/shared"), Some(&body)).await;
                assert_eq!(status, StatusCode::OK);
                last_shared = Some(value.clone());
                let own = format!("{base}/own_{t}_{}", r % 5);
                let (status, _) = send(&client, Method::PUT, &own, Some(&body)).await;
                assert_eq!(status, StatusCode::OK);
                if r % 7 == 0 {
                    let (status, _) = send(&client, Method::DELETE, &own, None).await;
                    assert_eq!(status, StatusCode::OK);
                }
                // Reads of the shared key always see a whole written value.
                let (status, body) =
                    send(&client, Method::GET, &format!("{base}/shared"), None).await;
                assert_eq!(status, StatusCode::OK);
                let seen: Value = serde_json::from_str(&body).unwrap();
                let seen = seen["value"].as_str().unwrap();
                assert!(
                    seen.ends_with(&"x".repeat(4096)) && seen.starts_with('t'),
                    "torn: {seen:.40}"
                );
            }
            last_shared
        }));
    }
    let mut lasts = Vec::new();
    for task in tasks {
        lasts.push(task.await.unwrap().unwrap());
    }
    // The final shared value is the last write of one of the tasks.
    let (_, body) = send(&client, Method::GET, &server.url("/shared"), None).await;
    let final_value: Value = serde_json::from_str(&body).unwrap();
    let final_value = final_value["value"].as_str().unwrap();
    assert!(
        lasts.iter().any(|v| v == final_value),
        "{final_value:.40} was no task's last write"
    );
    // Each task's own keys hold exactly its last write (or are deleted).
    for t in 0..TASKS {
        for slot in 0..5 {
            let last_round = (0..ROUNDS).filter(|r| r % 5 == slot).max().unwrap();
            let (status, body) = send(
                &client,
                Method::GET,
                &server.url(&format!("/own_{t}_{slot}")),
                None,
            )
            .await;
            if last_round % 7 == 0 {
                assert_eq!(status, StatusCode::NOT_FOUND);
            } else {
                let value: Value = serde_json::from_str(&body).unwrap();
                assert!(value["value"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("t{t}r{last_round}-")));
            }
        }
    }
    server.stop().await;
}

/// Each API test, once per [`Mode`].
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Mode::Standalone).await;
                }
            )*
        }
        mod one_node_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Mode::OneNodeCluster).await;
                }
            )*
        }
    };
}

in_both_modes!(
    every_api_row,
    every_json_value_type_round_trips_exactly,
    unicode_and_percent_encoded_keys,
    bad_input_matrix_then_still_serving,
    keep_alive_serves_many_requests_on_one_connection,
    concurrent_writers_leave_a_state_some_order_explains,
);
