//! The real binaries: three kv-nodes and kv-proxy, each a process on a free
//! port, talked to over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kv_ring::Ring;
use kv_testkit::{binary, request, Process, Response};
use tempfile::TempDir;

/// Started nodes and the proxy in front of them.
struct Cluster {
    nodes: Vec<Process>,
    proxy: Process,
    ring: Ring,
    _dirs: Vec<TempDir>,
}

fn start_node(dir: &TempDir) -> Process {
    Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", dir.path().to_str().unwrap()],
    )
}

fn start_proxy(names: &[String], extra: &[&str]) -> Process {
    let nodes = names.join(",");
    let mut args = vec!["--port", "0", "--nodes", &nodes];
    args.extend_from_slice(extra);
    Process::spawn(&binary("kv-proxy"), &args)
}

fn cluster(extra: &[&str]) -> Cluster {
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Process> = dirs.iter().map(start_node).collect();
    let names: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let proxy = start_proxy(&names, extra);
    let ring = Ring::new(names, kv_ring::DEFAULT_VNODES).unwrap();
    Cluster {
        nodes,
        proxy,
        ring,
        _dirs: dirs,
    }
}

impl Cluster {
    fn owner_of(&self, key: &str) -> usize {
        self.ring.owner_index(key.as_bytes())
    }
}

/// Calls `check` until it returns `Some`, or panics once `limit` has passed
/// since `from`. The pause between tries is polling, not synchronisation.
fn poll_until<T>(
    from: Instant,
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(from.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn body(value: &str) -> Vec<u8> {
    format!("{{\"value\": {value}}}").into_bytes()
}

#[test]
fn keys_live_on_their_owner_and_nowhere_else() {
    let cluster = cluster(&[]);
    let keys: Vec<String> = (0..3000).map(|i| format!("spread_{i}")).collect();
    let proxy = cluster.proxy.addr;
    // Eight writers: each request is its own connection, so this is mostly
    // waiting on the loopback.
    thread::scope(|scope| {
        for chunk in keys.chunks(keys.len() / 8) {
            let cluster = &cluster;
            scope.spawn(move || {
                for key in chunk {
                    let put = request(
                        proxy,
                        "PUT",
                        &format!("/{key}"),
                        Some(&body(&format!("\"{key}\""))),
                    )
                    .unwrap();
                    assert_eq!(put.status, 200, "{key}: {}", put.text());
                    let owner = cluster.owner_of(key);
                    assert_eq!(
                        put.header("x-kv-node"),
                        Some(cluster.nodes[owner].addr.to_string().as_str()),
                        "{key}"
                    );
                }
            });
        }
    });
    let counts: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
    thread::scope(|scope| {
        for chunk in keys.chunks(keys.len() / 8) {
            let (cluster, counts) = (&cluster, &counts);
            scope.spawn(move || {
                for key in chunk {
                    let owner = cluster.owner_of(key);
                    for (index, node) in cluster.nodes.iter().enumerate() {
                        let got = request(node.addr, "GET", &format!("/{key}"), None).unwrap();
                        if index == owner {
                            assert_eq!(got.status, 200, "{key} missing on its owner");
                            assert_eq!(got.text(), format!("{{\"value\":\"{key}\"}}\n"));
                            counts[index].fetch_add(1, Ordering::Relaxed);
                        } else {
                            assert_eq!(got.status, 404, "{key} also on node {index}");
                        }
                    }
                }
            });
        }
    });
    let shares = cluster.ring.shares();
    for (index, count) in counts.iter().enumerate() {
        let count = count.load(Ordering::Relaxed) as f64;
        let expected = shares[index] * keys.len() as f64;
        assert!(
            (count - expected).abs() <= 0.10 * expected,
            "node {index}: {count} keys, expected {expected:.0} ± 10%"
        );
    }
    // The proxy's own view agrees with the ring kv-bench will use.
    for key in keys.iter().take(50) {
        let owner = request(proxy, "GET", &format!("/-/owner/{key}"), None).unwrap();
        let expected = cluster.nodes[cluster.owner_of(key)].addr.to_string();
        assert!(
            owner.text().contains(&format!("\"owner\":\"{expected}\"")),
            "{}",
            owner.text()
        );
    }
}

/// One API row: method, path, body.
type Row = (&'static str, String, Option<Vec<u8>>);

fn api_rows() -> Vec<Row> {
    let mut rows: Vec<Row> = vec![
        ("PUT", "/key_1".into(), Some(body("\"value_1\""))),
        ("GET", "/key_1".into(), None),
        ("HEAD", "/key_1".into(), None),
        (
            "POST",
            "/key_2".into(),
            Some(body(r#"{"nested": [1, 2.50, null, true, "x"]}"#)),
        ),
        ("GET", "/key_2".into(), None),
        ("PUT", "/n".into(), Some(body("-12.5e3"))),
        ("GET", "/n".into(), None),
        ("PUT", "/null".into(), Some(body("null"))),
        ("GET", "/null".into(), None),
        ("PUT", "/arr".into(), Some(body("[1, [2], {}]"))),
        ("GET", "/arr".into(), None),
        ("PUT", "/b".into(), Some(body("false"))),
        ("GET", "/b".into(), None),
        ("DELETE", "/key_1".into(), None),
        ("GET", "/key_1".into(), None),
        ("HEAD", "/key_1".into(), None),
        ("DELETE", "/key_1".into(), None),
        // Bad input.
        ("PUT", "/bad".into(), Some(b"{".to_vec())),
        ("PUT", "/bad".into(), Some(b"{}".to_vec())),
        ("PUT", "/bad".into(), Some(b"[1]".to_vec())),
        ("PUT", "/bad".into(), Some(Vec::new())),
        ("GET", "/bad".into(), None),
        ("PATCH", "/key_2".into(), Some(body("1"))),
        ("OPTIONS", "/key_2".into(), None),
        // A large body under the limit streams through; over it, 413 is
        // tested apart (see `oversize_bodies_get_413_as_direct`).
        (
            "PUT",
            "/big".into(),
            Some(body(&format!("\"{}\"", "x".repeat(1000 * 1024)))),
        ),
        ("GET", "/big".into(), None),
        ("GET", "/".into(), None),
        ("GET", "/a/b".into(), None),
        ("GET", "/%FF".into(), None),
        ("GET", format!("/{}", "k".repeat(1025)), None),
        ("PUT", format!("/{}", "k".repeat(1024)), Some(body("1"))),
        ("GET", format!("/{}", "k".repeat(1024)), None),
        // Unicode and percent-encoded keys: the same key however spelt.
        (
            "PUT",
            "/caf%C3%A9".into(),
            Some(body("\"\u{e9}t\u{e9} \u{1F600}\"")),
        ),
        ("GET", "/caf%C3%A9".into(), None),
        ("GET", "/caf%c3%a9".into(), None),
        ("PUT", "/a%2Fb%20c".into(), Some(body("1"))),
        ("GET", "/a%2Fb%20c".into(), None),
        ("GET", "/key_2?ignored=1".into(), None),
        // Admin paths the proxy shares with kv-node.
        ("GET", "/-/nope".into(), None),
        ("PUT", "/-/health".into(), Some(body("1"))),
    ];
    for i in 0..30 {
        rows.push(("PUT", format!("/row_{i}"), Some(body(&i.to_string()))));
        rows.push(("GET", format!("/row_{i}"), None));
    }
    rows
}

fn same(direct: &Response, proxied: &Response) -> bool {
    direct.status == proxied.status
        && direct.body == proxied.body
        && direct.header("content-type") == proxied.header("content-type")
        && direct.header("allow") == proxied.header("allow")
        && direct.header("content-length") == proxied.header("content-length")
}

#[test]
fn every_api_row_answers_as_a_node_would() {
    let cluster = cluster(&[]);
    // The same rows against one standalone node: each key lives on exactly
    // one node of the cluster, so the answers must be identical.
    let dir = tempfile::tempdir().unwrap();
    let lone = start_node(&dir);
    for (method, path, body) in api_rows() {
        let direct = request(lone.addr, method, &path, body.as_deref()).unwrap();
        let proxied = request(cluster.proxy.addr, method, &path, body.as_deref()).unwrap();
        assert!(
            same(&direct, &proxied),
            "{method} {path}: direct {} {:?} {:?}, proxied {} {:?} {:?}",
            direct.status,
            direct.text(),
            direct.headers,
            proxied.status,
            proxied.text(),
            proxied.headers
        );
        // Forwarded answers name their node (a bad key or method is
        // refused by the proxy itself, as the node would).
        if !path.starts_with("/-/") && !matches!(proxied.status, 400 | 405) {
            assert!(proxied.header("x-kv-node").is_some(), "{method} {path}");
        }
    }
}

/// Sends only the head of a PUT declaring `length` body bytes and reads the
/// answer. kv-node refuses an oversize body from its declared length, before
/// reading it; sending the body too would race the node's close against our
/// write (a reset can discard the 413 before it is read), directly or not.
fn put_declaring(addr: SocketAddr, path: &str, length: usize) -> (u16, String, bool) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: kv\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let forwarded = head.to_ascii_lowercase().contains("x-kv-node:");
    (status, body.to_owned(), forwarded)
}

#[test]
fn oversize_bodies_get_413_as_direct() {
    let cluster = cluster(&[]);
    let direct = put_declaring(cluster.nodes[0].addr, "/big", 2 * 1024 * 1024);
    assert_eq!(direct.0, 413, "{direct:?}");
    let proxied = put_declaring(cluster.proxy.addr, "/big", 2 * 1024 * 1024);
    assert_eq!((proxied.0, &proxied.1), (direct.0, &direct.1));
    // Refused by the proxy itself (no X-Kv-Node): a node refusing mid-upload
    // closes the connection, and its 413 could be lost to the reset.
    assert!(!proxied.2, "forwarded to a node");
    // Exactly at the limit is not too large.
    let limit = 1024 * 1024;
    let exact = body(&format!("\"{}\"", "x".repeat(limit - 13)));
    assert_eq!(exact.len(), limit);
    let got = request(cluster.proxy.addr, "PUT", "/big", Some(&exact)).unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
}

/// PUTs `body` with chunked framing (no declared length), in 64 KiB
/// chunks, and reads the whole answer: (status, body).
fn put_chunked(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: kv\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    for chunk in body.chunks(64 * 1024) {
        write!(stream, "{:x}\r\n", chunk.len()).unwrap();
        stream.write_all(chunk).unwrap();
        stream.write_all(b"\r\n").unwrap();
    }
    stream.write_all(b"0\r\n\r\n").unwrap();
    read_answer(&mut stream)
}

/// Reads one answer with a Content-Length body: (status, body).
fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if rest.len() >= length {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return (status, rest[..length].to_owned());
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => panic!("connection ended before a whole answer: {text:?}"),
            Ok(read) => raw.extend_from_slice(&buf[..read]),
        }
    }
}

#[test]
fn a_broken_chunked_body_is_the_clients_error_as_direct() {
    let cluster = cluster(&[]);
    let owner = cluster.owner_of("broken");
    let send = |addr: SocketAddr| {
        let mut stream = TcpStream::connect(addr).unwrap();
        // A chunk-size line that is not hex.
        stream
            .write_all(b"PUT /broken HTTP/1.1\r\nHost: kv\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"val\r\nzz\r\n")
            .unwrap();
        read_answer(&mut stream)
    };
    let direct = send(cluster.nodes[owner].addr);
    assert_eq!(direct.0, 400, "{direct:?}");
    let proxied = send(cluster.proxy.addr);
    assert_eq!(proxied, direct);
    // Not counted against the node.
    let metrics = request(cluster.proxy.addr, "GET", "/-/metrics", None).unwrap();
    assert!(
        !metrics.text().contains("kind=\"upstream\"} 1"),
        "{}",
        metrics.text()
    );
}

#[test]
fn the_request_timeout_counts_from_the_end_of_the_upload() {
    let cluster = cluster(&["--request-timeout", "400ms"]);
    let head = |length: usize| {
        format!("PUT /slow HTTP/1.1\r\nHost: kv\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
    };
    // A slow client: its body comes in pieces over three times the
    // timeout. The node answers once it has it all, and that is in time.
    let value = body("\"slow\"");
    let mut stream = TcpStream::connect(cluster.proxy.addr).unwrap();
    stream.write_all(head(value.len()).as_bytes()).unwrap();
    for piece in value.chunks(value.len() / 6 + 1) {
        thread::sleep(Duration::from_millis(200));
        stream.write_all(piece).unwrap();
    }
    let answer = read_answer(&mut stream);
    assert_eq!(answer.0, 200, "{answer:?}");
    // A client that stops mid-body: 408 in kv-node's words once it has
    // been silent for the timeout, and nothing is written.
    let other = body("\"stalled\"");
    let mut stalled = TcpStream::connect(cluster.proxy.addr).unwrap();
    stalled.write_all(head(other.len()).as_bytes()).unwrap();
    stalled.write_all(&other[..other.len() - 3]).unwrap();
    let started = Instant::now();
    let answer = read_answer(&mut stalled);
    assert_eq!(
        answer,
        (
            408,
            "{\"error\":\"Timed out waiting for the request body\"}\n".to_owned()
        )
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let got = request(cluster.proxy.addr, "GET", "/slow", None).unwrap();
    assert_eq!(got.text(), "{\"value\":\"slow\"}\n");
}

#[test]
fn chunked_bodies_are_held_to_the_proxy_limit() {
    // A proxy limit below the nodes' (1 MiB): only the proxy can refuse.
    let cluster = cluster(&["--max-body-bytes", "4096"]);
    let owner = cluster.owner_of("chunky");
    // With no declared length, the body is counted as it passes, cut off at
    // the limit, and answered 413 in kv-node's words; nothing is stored.
    let big = body(&format!("\"{}\"", "x".repeat(10_000)));
    let proxied = put_chunked(cluster.proxy.addr, "/chunky", &big);
    assert_eq!(
        proxied,
        (
            413,
            "{\"error\":\"Request body too large: the limit is 4096 bytes\"}\n".to_owned()
        )
    );
    let get = request(cluster.nodes[owner].addr, "GET", "/chunky", None).unwrap();
    assert_eq!(get.status, 404, "{}", get.text());
    // Under the limit, chunked bodies pass through whole.
    let fits = body(&format!("\"{}\"", "y".repeat(4000)));
    let put = put_chunked(cluster.proxy.addr, "/chunky", &fits);
    assert_eq!(put.0, 200, "{put:?}");
    let get = request(cluster.nodes[owner].addr, "GET", "/chunky", None).unwrap();
    assert_eq!(get.status, 200);
    assert_eq!(get.body.len(), fits.len(), "stored whole");
}

#[test]
fn a_lost_node_fails_closed_and_comes_back() {
    let mut cluster = cluster(&[]);
    let proxy = cluster.proxy.addr;
    let keys: Vec<String> = (0..150).map(|i| format!("loss_{i}")).collect();
    for key in &keys {
        let put = request(
            proxy,
            "PUT",
            &format!("/{key}"),
            Some(&body(&format!("\"{key}\""))),
        )
        .unwrap();
        assert_eq!(put.status, 200);
    }
    let lost = 1;
    let lost_name = cluster.nodes[lost].addr.to_string();
    assert!(keys.iter().any(|k| cluster.owner_of(k) == lost));

    cluster.nodes[lost].kill9();
    let killed = Instant::now();
    poll_until(
        killed,
        Duration::from_secs(3),
        "lost keys 503, others 200",
        || {
            for key in &keys {
                let got = request(proxy, "GET", &format!("/{key}"), None).unwrap();
                if cluster.owner_of(key) == lost {
                    if got.status != 503 {
                        return None;
                    }
                    assert_eq!(
                        got.text(),
                        format!("{{\"error\":\"node {lost_name} unavailable\"}}\n")
                    );
                    assert!(got.header("retry-after").is_some());
                } else {
                    // Never affected, not even while the loss is being noticed.
                    assert_eq!(got.status, 200, "{key}: {}", got.text());
                    assert_eq!(got.text(), format!("{{\"value\":\"{key}\"}}\n"));
                }
            }
            Some(())
        },
    );
    // Writes to its keys fail closed too; nothing is remapped.
    let lost_key = keys.iter().find(|k| cluster.owner_of(k) == lost).unwrap();
    let put = request(proxy, "PUT", &format!("/{lost_key}"), Some(&body("2"))).unwrap();
    assert_eq!(put.status, 503);
    for (index, node) in cluster.nodes.iter().enumerate() {
        if index != lost {
            assert_eq!(
                request(node.addr, "GET", &format!("/{lost_key}"), None)
                    .unwrap()
                    .status,
                404
            );
        }
    }
    let ring = request(proxy, "GET", "/-/ring", None).unwrap().text();
    assert!(
        ring.contains(&format!("\"node\":\"{lost_name}\",\"share\"")),
        "{ring}"
    );
    let health = request(proxy, "GET", "/-/health", None).unwrap();
    assert_eq!(health.status, 200);
    assert!(
        health.text().contains("\"nodes_up\":2"),
        "{}",
        health.text()
    );

    cluster.nodes[lost].restart();
    let restarted = Instant::now();
    poll_until(
        restarted,
        Duration::from_secs(3),
        "lost keys answer again",
        || {
            keys.iter()
                .filter(|k| cluster.owner_of(k) == lost)
                .all(|key| {
                    let proxied = request(proxy, "GET", &format!("/{key}"), None).unwrap();
                    // The node recovered its data from disk: the original value.
                    proxied.status == 200 && proxied.text() == format!("{{\"value\":\"{key}\"}}\n")
                })
                .then_some(())
        },
    );
    // And it takes writes again, on the same node.
    let put = request(
        proxy,
        "PUT",
        &format!("/{lost_key}"),
        Some(&body("\"back\"")),
    )
    .unwrap();
    assert_eq!(put.status, 200);
    let direct = request(
        cluster.nodes[lost].addr,
        "GET",
        &format!("/{lost_key}"),
        None,
    )
    .unwrap();
    assert_eq!(direct.text(), "{\"value\":\"back\"}\n");

    // Each state change was logged once.
    let log = cluster.proxy.log();
    assert_eq!(
        log.matches(&format!("node {lost_name} is down")).count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("node {lost_name} is up")).count(),
        1,
        "{log}"
    );
}

/// A fake node on a std listener: `answer` decides what each connection
/// gets; health checks (which say who they are) are counted apart.
struct FakeNode {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

fn fake_node(answer: fn(TcpStream)) -> FakeNode {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counter = counter.clone();
            thread::spawn(move || {
                let mut head = [0u8; 1024];
                let read = stream.read(&mut head).unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..read]);
                // The proxy asks at start whether this is a cluster member;
                // a standalone node says no (not counted).
                if head.starts_with("GET /-/shards ") {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 30\r\nconnection: close\r\n\r\n{\"error\":\"Unknown admin path\"}",
                    );
                    return;
                }
                if !head.contains("kv-health-probe") {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                answer(stream);
            });
        }
    });
    FakeNode { addr, requests }
}

#[test]
fn a_silent_node_gives_504_and_the_others_keep_serving() {
    // Accepts and holds every connection, never answering.
    let silent = fake_node(|stream| {
        thread::sleep(Duration::from_secs(120));
        drop(stream);
    });
    let dirs: Vec<TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Process> = dirs.iter().map(start_node).collect();
    let mut names: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    names.push(silent.addr.to_string());
    // Health checks every hour: only the first one runs, and one failure
    // does not mark a node down, so the timeout itself is what is tested.
    let proxy = start_proxy(
        &names,
        &["--request-timeout", "500ms", "--health-interval", "1h"],
    );
    let ring = Ring::new(names.clone(), kv_ring::DEFAULT_VNODES).unwrap();
    let key_of = |owner: usize| {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| ring.owner_index(k.as_bytes()) == owner)
            .unwrap()
    };
    let stuck_key = key_of(2);

    let proxy_addr = proxy.addr;
    let stuck = thread::spawn(move || {
        let started = Instant::now();
        let got = request(proxy_addr, "GET", &format!("/{stuck_key}"), None).unwrap();
        (got, started.elapsed())
    });
    // While that request hangs, the other nodes' keys are served.
    for (owner, name) in names.iter().enumerate().take(2) {
        let key = key_of(owner);
        let put = request(proxy.addr, "PUT", &format!("/{key}"), Some(&body("1"))).unwrap();
        assert_eq!(
            (put.status, put.header("x-kv-node")),
            (200, Some(name.as_str()))
        );
        assert_eq!(
            request(proxy.addr, "GET", &format!("/{key}"), None)
                .unwrap()
                .status,
            200
        );
    }
    let (got, waited) = stuck.join().unwrap();
    assert_eq!(got.status, 504, "{}", got.text());
    assert!(
        waited >= Duration::from_millis(500),
        "answered before the timeout: {waited:?}"
    );
    assert_eq!(
        got.text(),
        format!(
            "{{\"error\":\"node {} did not answer within 500ms\"}}\n",
            silent.addr
        )
    );
    assert_eq!(got.header("x-kv-node"), Some(names[2].as_str()));
    // A write to the silent node times out too.
    let put = request(
        proxy.addr,
        "PUT",
        &format!("/{}", key_of(2)),
        Some(&body("1")),
    )
    .unwrap();
    assert_eq!(put.status, 504);
    // So does a GET with a chunked body: hyper sends GETs without one, so
    // its upload never "finishes", yet the client is not what it waits for.
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    write!(
        stream,
        "GET /{} HTTP/1.1\r\nHost: kv\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        key_of(2)
    )
    .unwrap();
    assert_eq!(read_answer(&mut stream).0, 504);
}

#[test]
fn gets_are_retried_once_on_a_broken_connection_and_writes_never() {
    // Reads the request, then closes without answering.
    let breaking = fake_node(drop);
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir);
    let names = vec![node.addr.to_string(), breaking.addr.to_string()];
    let proxy = start_proxy(&names, &["--health-interval", "1h"]);
    let ring = Ring::new(names, kv_ring::DEFAULT_VNODES).unwrap();
    let key = (0..)
        .map(|i| format!("r{i}"))
        .find(|k| ring.owner_index(k.as_bytes()) == 1)
        .unwrap();

    let get = request(proxy.addr, "GET", &format!("/{key}"), None).unwrap();
    assert_eq!(get.status, 502, "{}", get.text());
    assert_eq!(
        breaking.requests.load(Ordering::SeqCst),
        2,
        "a GET is tried twice"
    );

    let put = request(proxy.addr, "PUT", &format!("/{key}"), Some(&body("1"))).unwrap();
    assert_eq!(put.status, 502, "{}", put.text());
    assert_eq!(
        breaking.requests.load(Ordering::SeqCst),
        3,
        "a PUT is tried once"
    );
    // Counted by name, not as "other".
    let metrics = request(proxy.addr, "GET", "/-/metrics", None)
        .unwrap()
        .text();
    for op in ["get", "put"] {
        let series = format!("kv_requests_total{{op=\"{op}\",status=\"502\"}} 1\n");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
}

#[test]
fn sigterm_exits_zero() {
    let cluster = cluster(&[]);
    let mut proxy = cluster.proxy;
    assert_eq!(proxy.terminate(), Some(0));
    assert!(proxy.log().contains("kv-proxy stopped"), "{}", proxy.log());
}

#[test]
fn help_documents_flags_env_and_defaults() {
    let output = std::process::Command::new(binary("kv-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "--port",
        "[env: KV_PROXY_PORT=]",
        "[default: 8080]",
        "--nodes",
        "--vnodes",
        "[default: 1000]",
        "--connect-timeout",
        "--request-timeout",
        "[default: 5s]",
        "--health-interval",
        "[default: 1s]",
        "--bind",
    ] {
        assert!(help.contains(expected), "{expected} missing from:\n{help}");
    }
    let bad = std::process::Command::new(binary("kv-proxy"))
        .args(["--port", "0", "--nodes", "not-a-node"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not host:port"));
}

#[test]
fn admin_endpoints_describe_the_ring() {
    let cluster = cluster(&["--vnodes", "500"]);
    let proxy = cluster.proxy.addr;
    let ring = Ring::new(cluster.nodes.iter().map(|n| n.addr.to_string()), 500).unwrap();

    let answer = request(proxy, "GET", "/-/ring", None).unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let text = answer.text();
    assert!(text.contains("\"vnodes\":500"), "{text}");
    for (node, share) in cluster.nodes.iter().zip(ring.shares()) {
        let entry = format!(
            "{{\"node\":\"{}\",\"share\":{share},\"up\":true}}",
            node.addr
        );
        assert!(text.contains(&entry), "{entry} not in {text}");
    }

    let owner = request(proxy, "GET", "/-/owner/caf%C3%A9", None).unwrap();
    let expected = ring.owner("caf\u{e9}".as_bytes());
    assert_eq!(
        owner.text(),
        format!("{{\"key\":\"caf\u{e9}\",\"owner\":\"{expected}\",\"up\":true}}\n")
    );
    // The owner it names is the node a write lands on.
    let put = request(proxy, "PUT", "/caf%C3%A9", Some(&body("1"))).unwrap();
    assert_eq!(put.header("x-kv-node"), Some(expected));

    let empty = request(proxy, "GET", "/-/owner/", None).unwrap();
    assert_eq!(empty.status, 400, "{}", empty.text());
    let health = request(proxy, "HEAD", "/-/health", None).unwrap();
    assert_eq!((health.status, health.body.len()), (200, 0));
    let wrong = request(proxy, "DELETE", "/-/ring", None).unwrap();
    assert_eq!(
        (wrong.status, wrong.header("allow")),
        (405, Some("GET, HEAD, OPTIONS"))
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let silent = fake_node(|stream| {
        thread::sleep(Duration::from_secs(120));
        drop(stream);
    });
    let names = vec![silent.addr.to_string()];
    let mut proxy = start_proxy(
        &names,
        &["--request-timeout", "1s", "--health-interval", "1h"],
    );
    let addr = proxy.addr;
    let in_flight = thread::spawn(move || request(addr, "GET", "/k", None).unwrap());
    // Wait until the request has reached the node, i.e. is in flight.
    poll_until(
        Instant::now(),
        Duration::from_secs(10),
        "request in flight",
        || (silent.requests.load(Ordering::SeqCst) >= 1).then_some(()),
    );
    assert_eq!(proxy.terminate(), Some(0));
    // The request was answered (504 once its timeout passed), not dropped.
    let answer = in_flight.join().unwrap();
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert!(proxy.log().contains("kv-proxy stopped"), "{}", proxy.log());
}

/// `name{labels} value` lines of a Prometheus text page, checked for shape.
fn prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            (
                series.to_owned(),
                value.parse().unwrap_or_else(|_| panic!("{l:?}")),
            )
        })
        .collect()
}

#[test]
fn metrics_count_forwarding_per_node_and_node_health() {
    let mut cluster = cluster(&["--health-interval", "100ms"]);
    let proxy = cluster.proxy.addr;
    let mut per_node = [0u32; 3];
    for i in 0..30 {
        let key = format!("metric_{i}");
        per_node[cluster.owner_of(&key)] += 1;
        assert_eq!(
            request(proxy, "PUT", &format!("/{key}"), Some(&body("1")))
                .unwrap()
                .status,
            200
        );
    }
    let page = request(proxy, "GET", "/-/metrics", None).unwrap();
    assert_eq!(page.status, 200);
    let metrics = prometheus(&page.text());
    assert_eq!(
        metrics["kv_requests_total{op=\"put\",status=\"200\"}"],
        30.0
    );
    for (index, node) in cluster.nodes.iter().enumerate() {
        let forwarded = format!("kv_proxy_forwarded_total{{node=\"{}\"}}", node.addr);
        assert_eq!(metrics[&forwarded], f64::from(per_node[index]));
        assert_eq!(
            metrics[&format!("kv_proxy_node_up{{node=\"{}\"}}", node.addr)],
            1.0
        );
    }

    let lost = cluster.owner_of("metric_0");
    let lost_name = cluster.nodes[lost].addr.to_string();
    cluster.nodes[lost].kill9();
    let up = format!("kv_proxy_node_up{{node=\"{lost_name}\"}}");
    poll_until(
        Instant::now(),
        Duration::from_secs(5),
        "node_up drops to 0",
        || {
            let page = request(proxy, "GET", "/-/metrics", None).unwrap();
            (prometheus(&page.text())[&up] == 0.0).then_some(())
        },
    );
    assert_eq!(
        request(proxy, "GET", "/metric_0", None).unwrap().status,
        503
    );
    let metrics = prometheus(&request(proxy, "GET", "/-/metrics", None).unwrap().text());
    assert!(
        metrics[&format!("kv_proxy_errors_total{{node=\"{lost_name}\",kind=\"down\"}}")] >= 1.0
    );
    assert_eq!(metrics["kv_requests_total{op=\"get\",status=\"503\"}"], 1.0);
}
