//! The HTTP contract at every layer: each check runs against a kv-node and
//! against kv-proxy in front of it (real binaries), which must answer alike.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kv_testkit::{binary, exchange, exchange_then_closed, request, Process, Response};
use tempfile::TempDir;

struct Layers {
    node: Process,
    proxy: Process,
    _dir: TempDir,
}

fn layers(node_args: &[&str], proxy_args: &[&str]) -> Layers {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--port", "0", "--data-dir", dir.path().to_str().unwrap()];
    args.extend_from_slice(node_args);
    let node = Process::spawn(&binary("kv-node"), &args);
    let name = node.addr.to_string();
    let mut args = vec!["--port", "0", "--nodes", &name];
    args.extend_from_slice(proxy_args);
    let proxy = Process::spawn(&binary("kv-proxy"), &args);
    Layers {
        node,
        proxy,
        _dir: dir,
    }
}

impl Layers {
    fn both(&self) -> [(&'static str, SocketAddr); 2] {
        [("node", self.node.addr), ("proxy", self.proxy.addr)]
    }
}

/// The answer is JSON with an `error` member.
fn assert_json_error(layer: &str, what: &str, response: &Response) {
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{layer}, {what}: {response:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("{layer}, {what}: not JSON ({e}): {response:?}"));
    assert!(json["error"].is_string(), "{layer}, {what}: {json}");
}

#[test]
fn answers_from_hypers_parser_keep_the_json_contract() {
    let layers = layers(&[], &[]);
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(70_000));
    // More headers than hyper takes (a head over its buffer size is
    // refused only when it takes more reads than filling the buffer).
    let long_header = format!(
        "GET /k HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-Many: h\r\n".repeat(150)
    );
    let cases: [(&str, &[u8], &[u16]); 5] = [
        // 414 from hyper's URI check, or 431 once the head passes kv-http's
        // 32 KiB head limit first (a 70 KB request line does).
        ("over-long URI", long_uri.as_bytes(), &[414, 431]),
        ("header overflow", long_header.as_bytes(), &[431]),
        ("garbage", b"\x16\x03\x01 hello not http\r\n\r\n", &[400]),
        (
            "two differing Content-Lengths",
            b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            &[400],
        ),
        (
            "Transfer-Encoding not chunked",
            b"PUT /k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            &[400],
        ),
    ];
    for (layer, addr) in layers.both() {
        for (what, bytes, statuses) in cases {
            let (response, closed) = exchange_then_closed(addr, bytes).unwrap();
            assert!(
                statuses.contains(&response.status),
                "{layer}, {what}: {response:?}, expected one of {statuses:?}"
            );
            assert_json_error(layer, what, &response);
            assert!(closed, "{layer}, {what}: the connection stays open");
        }
    }
}

#[test]
fn expect_100_continue_is_refused_from_the_head_alone() {
    let layers = layers(
        &["--max-value-bytes", "1000"],
        &["--max-body-bytes", "1000"],
    );
    for (layer, addr) in layers.both() {
        // Declared too large: 413 at once, no "100 Continue", no body read.
        let head = b"PUT /k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 50000000\r\n\r\n";
        let (response, closed) = exchange_then_closed(addr, head).unwrap();
        assert_eq!(response.status, 413, "{layer}: {response:?}");
        assert_json_error(layer, "oversized", &response);
        assert!(closed, "{layer}: a refused upload's connection stays open");
        // A bad key or method is decided by the head too.
        for head in [
            &b"PUT /a/b HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
                [..],
            b"PATCH /k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        ] {
            let response = exchange(addr, head).unwrap();
            assert!(
                response.status == 400 || response.status == 405,
                "{layer}: {response:?}"
            );
        }
        // A body within the limit still gets its "100 Continue".
        let response = exchange(
            addr,
            b"PUT /k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 12\r\n\r\n",
        )
        .unwrap();
        assert_eq!(response.status, 100, "{layer}: {response:?}");
    }
}

#[test]
fn rfc_9110_and_9112_musts() {
    let layers = layers(&[], &[]);
    let put = request(layers.node.addr, "PUT", "/k", Some(br#"{"value": "abc"}"#)).unwrap();
    assert_eq!(put.status, 200);
    for (layer, addr) in layers.both() {
        // Host: required once in HTTP/1.1 (RFC 9112 §3.2), optional in 1.0.
        let r = exchange(addr, b"GET /k HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.status, 400, "{layer}: no Host: {r:?}");
        assert_json_error(layer, "no Host", &r);
        let r = exchange(addr, b"GET /k HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").unwrap();
        assert_eq!(r.status, 400, "{layer}: two Hosts: {r:?}");
        let r = exchange(addr, b"GET /k HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.status, 200, "{layer}: HTTP/1.0 without Host: {r:?}");

        // An unknown expectation: 417 (RFC 9110 §10.1.1).
        let r = exchange(
            addr,
            b"GET /k HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 417, "{layer}: {r:?}");
        assert_json_error(layer, "Expect", &r);

        // HEAD: GET's headers, Content-Length included, and no body.
        let get = exchange(addr, b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let head = exchange(addr, b"HEAD /k HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(head.status, 200, "{layer}");
        assert_eq!(
            head.header("content-length"),
            Some(get.body.len().to_string().as_str()),
            "{layer}: {head:?}"
        );
        assert!(head.body.is_empty());

        // 405 names what is allowed.
        let r = exchange(addr, b"PATCH /k HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(r.status, 405, "{layer}");
        assert!(r.header("allow").unwrap().contains("GET"), "{layer}: {r:?}");
        let r = exchange(addr, b"DELETE /-/health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(r.status, 405, "{layer}");
        assert!(r.header("allow").unwrap().contains("GET"), "{layer}: {r:?}");
        // An unknown admin path is 404 whatever the method.
        for method in ["GET", "DELETE", "POST"] {
            let bytes =
                format!("{method} /-/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
            let r = exchange(addr, bytes.as_bytes()).unwrap();
            assert_eq!(r.status, 404, "{layer}: {method} /-/nope: {r:?}");
            assert_json_error(layer, "Unknown admin path", &r);
        }

        // OPTIONS: 204 with Allow, for a key, an admin path and `*`.
        for target in ["/k", "/-/health", "*"] {
            let bytes = format!("OPTIONS {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            let r = exchange(addr, bytes.as_bytes()).unwrap();
            assert_eq!(r.status, 204, "{layer}: OPTIONS {target}: {r:?}");
            assert!(r.header("allow").unwrap().contains("GET"), "{layer}: {r:?}");
        }
        // `*` is for OPTIONS only.
        let r = exchange(addr, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(r.status, 400, "{layer}: GET *: {r:?}");

        // The absolute form names the same resource (RFC 9112 §3.2.2).
        let r = exchange(addr, b"GET http://x/k HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(r.status, 200, "{layer}: absolute form: {r:?}");
        assert_eq!(r.body, get.body);

        // Connection: close is honoured.
        let (r, closed) = exchange_then_closed(
            addr,
            b"GET /k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert!(closed, "{layer}: Connection: close was not honoured");

        // Content-Length with Transfer-Encoding: the body is read as chunked
        // and the connection closed after the answer (RFC 9112 §6.1).
        let smuggle = b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"value\": \"cte\"}\r\n0\r\n\r\n";
        let (r, closed) = exchange_then_closed(addr, smuggle).unwrap();
        assert_eq!(r.status, 200, "{layer}: {r:?}");
        assert!(closed, "{layer}: CL + TE must close the connection");
        let put = request(addr, "PUT", "/k", Some(br#"{"value": "abc"}"#)).unwrap();
        assert_eq!(put.status, 200);
    }
}

#[test]
fn put_bodies_are_read_as_pythons_json_read_them() {
    let layers = layers(&[], &[]);
    for (layer, addr) in layers.both() {
        // Duplicate members: the last one wins, its text kept exactly.
        let r = request(
            addr,
            "PUT",
            "/dup",
            Some(br#"{"value": 1, "value": [2, 3.50]}"#),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{layer}: {}", r.text());
        let r = request(addr, "GET", "/dup", None).unwrap();
        assert_eq!(r.text(), "{\"value\":[2, 3.50]}\n", "{layer}");
        // A UTF-8 byte-order mark before the body.
        let r = request(addr, "PUT", "/bom", Some(b"\xEF\xBB\xBF{\"value\": \"b\"}")).unwrap();
        assert_eq!(r.status, 200, "{layer}: {}", r.text());
        let r = request(addr, "GET", "/bom", None).unwrap();
        assert_eq!(r.text(), "{\"value\":\"b\"}\n", "{layer}");
    }
}

#[test]
fn at_the_connection_cap_health_and_readiness_still_answer() {
    let layers = layers(&["--max-connections", "2"], &["--max-connections", "2"]);
    for (layer, addr) in layers.both() {
        // Two idle keep-alive connections hold the cap: each has had a key
        // answered (404), which a reserve connection would refuse (503), so
        // each holds a slot under the cap. (A slot the last test's
        // connection still held for a moment is waited out.)
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while held.len() < 2 {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut stream, b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = [0u8; 12];
            std::io::Read::read_exact(&mut stream, &mut buf).unwrap();
            match &buf {
                b"HTTP/1.1 404" => held.push(stream),
                b"HTTP/1.1 503" => assert!(Instant::now() < deadline, "no slot freed"),
                other => panic!("{layer}: {}", String::from_utf8_lossy(other)),
            }
        }
        for path in ["/-/health", "/-/ready"] {
            let r = request(addr, "GET", path, None).unwrap();
            assert_eq!(r.status, 200, "{layer}: {path} at the cap: {}", r.text());
        }
        let r = request(addr, "GET", "/k", None).unwrap();
        assert_eq!(r.status, 503, "{layer}: {}", r.text());
        assert_json_error(layer, "over the cap", &r);
        assert!(r.text().contains("Too many connections"));
        drop(held);
    }
}

#[test]
fn refused_connections_are_logged_with_a_count_not_one_line_each() {
    let layers = layers(&["--max-connections", "1"], &[]);
    let addr = layers.node.addr;
    // One keep-alive connection holds the cap. It asks for a key: a 404
    // proves it holds the slot under the cap (a reserve connection, taken
    // while the proxy's health probe held the slot, would be refused 503
    // and closed), so retry until it does.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut stream, b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 12];
        std::io::Read::read_exact(&mut stream, &mut buf).unwrap();
        match &buf {
            b"HTTP/1.1 404" => break stream,
            b"HTTP/1.1 503" => assert!(Instant::now() < deadline, "no slot freed"),
            other => panic!("{}", String::from_utf8_lossy(other)),
        }
    };
    let started = Instant::now();
    let mut refused = 0;
    // Refuse until a second warning (with its count) shows, bounded.
    loop {
        for _ in 0..50 {
            let r = request(addr, "GET", "/k", None).unwrap();
            assert_eq!(r.status, 503, "{}", r.text());
            refused += 1;
        }
        let log = layers.node.log();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
        let seconds = started.elapsed().as_secs() + 2;
        assert!(
            warnings.len() as u64 <= seconds,
            "{} warnings for {refused} refusals in {seconds} s:\n{log}",
            warnings.len()
        );
        if let Some(line) = warnings.get(1) {
            assert!(line.contains("connections in the last"), "{line}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no second warning after {refused} refusals:\n{log}"
        );
    }
    drop(held);
}

#[test]
fn proxy_health_says_degraded_and_names_the_nodes_down() {
    let mut layers = layers(&[], &["--health-interval", "100ms"]);
    let health = |layers: &Layers| {
        let r = request(layers.proxy.addr, "GET", "/-/health", None).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
    };
    // "ok" once the first check has answered (a node no check has heard
    // from yet is named in "nodes_unchecked", never in "nodes_down").
    let deadline = Instant::now() + Duration::from_secs(30);
    let json = loop {
        let json = health(&layers);
        assert_eq!(json["nodes_down"], serde_json::json!([]), "{json}");
        if json["status"] == "ok" {
            break json;
        }
        assert_eq!(
            json["nodes_unchecked"].as_array().map(Vec::len),
            Some(1),
            "{json}"
        );
        assert!(Instant::now() < deadline, "never ok: {json}");
        // Polling for the first check to answer; not synchronisation.
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(json["nodes_unchecked"], serde_json::json!([]), "{json}");
    let ready = request(layers.proxy.addr, "GET", "/-/ready", None).unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    let name = layers.node.addr.to_string();
    layers.node.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    let json = loop {
        let json = health(&layers);
        if json["status"] != "ok" {
            break json;
        }
        assert!(Instant::now() < deadline, "never degraded: {json}");
        // Polling for the health checks to notice; not synchronisation.
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(json["status"], "degraded", "{json}");
    assert_eq!(json["nodes_down"], serde_json::json!([name]), "{json}");
    assert_eq!(json["nodes_up"], 0, "{json}");
    // Its only node is down: the proxy serves no key, so it is not ready.
    let ready = request(layers.proxy.addr, "GET", "/-/ready", None).unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_json_error("proxy", "/-/ready", &ready);
}

/// A request answered before its body was read (the body is still on its
/// way) must not have its connection closed silently: a keep-alive client
/// would send its next request into a closed socket (a broken pipe, and for
/// a PUT no way to know whether it was applied). Either the answer says
/// `Connection: close` or the connection stays open.
fn assert_no_silent_close(layer: &str, addr: SocketAddr, head: &str) {
    let (response, closed) = exchange_then_closed(addr, head.as_bytes()).unwrap();
    assert_json_error(layer, head, &response);
    assert!(
        !closed || response.header("connection") == Some("close"),
        "{layer}: closed without `Connection: close` after {head:?}: {response:?}"
    );
}

#[test]
fn an_answer_before_the_body_never_closes_silently() {
    let layers = layers(&[], &[]);
    for (layer, addr) in layers.both() {
        for head in [
            "PUT /%FF HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
            "PATCH /k HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
            "PUT /-/health HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
            "DELETE /missing HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
            "GET /missing HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_no_silent_close(layer, addr, head);
        }
    }
    // The proxy's own refusal when the key's node is unreachable.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let proxy = Process::spawn(
        &binary("kv-proxy"),
        &[
            "--port",
            "0",
            "--nodes",
            &dead_addr,
            "--discover-wait",
            "100ms",
        ],
    );
    for _ in 0..3 {
        assert_no_silent_close(
            "proxy, node down",
            proxy.addr,
            "PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
        );
    }
}

#[test]
fn a_transfer_coding_other_than_chunked_is_501_and_stores_nothing() {
    let layers = layers(&[], &[]);
    for (layer, addr) in layers.both() {
        for coding in ["gzip, chunked", "deflate,chunked", "x-custom, chunked"] {
            // Not gzip at all: a server that ignored the coding would store it.
            let bytes = format!(
                "PUT /coded HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n\
                 b\r\n{{\"value\":1}}\r\n0\r\n\r\n"
            );
            let response = exchange(addr, bytes.as_bytes()).unwrap();
            assert_eq!(response.status, 501, "{layer}, {coding}: {response:?}");
            assert_json_error(layer, coding, &response);
            let get = request(addr, "GET", "/coded", None).unwrap();
            assert_eq!(get.status, 404, "{layer}, {coding}: stored: {}", get.text());
        }
        // Plain chunked still works.
        let bytes = "PUT /coded HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\
                     Connection: close\r\n\r\nb\r\n{\"value\":1}\r\n0\r\n\r\n";
        let response = exchange(addr, bytes.as_bytes()).unwrap();
        assert_eq!(response.status, 200, "{layer}: {response:?}");
        let delete = request(addr, "DELETE", "/coded", None).unwrap();
        assert_eq!(delete.status, 200, "{layer}: {}", delete.text());
    }
}
