//! The proxy's keep-alive connections to nodes, seen from a fake node that
//! counts the connections it is given: the real kv-proxy binary in front of
//! it, talked to over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kv_testkit::{binary, request, Process};

const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"value\":\"ok\"}\n";

/// kv-node's answer to `GET /-/shards` when it is not in a cluster.
const STANDALONE: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 30\r\nconnection: close\r\n\r\n{\"error\":\"Unknown admin path\"}";

/// What the fake node has seen (health checks left out).
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    closed: AtomicUsize,
    requests: AtomicUsize,
}

/// A node answering every request head with `ANSWER`, keeping the
/// connection open unless `close_after_answer`.
fn counting_node(close_after_answer: bool) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counters = seen.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let seen = counters.clone();
            thread::spawn(move || {
                let mut buffer = Vec::new();
                let mut counted = false;
                loop {
                    let mut chunk = [0u8; 4096];
                    let read = stream.read(&mut chunk).unwrap_or(0);
                    if read == 0 {
                        break;
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                    // A request is its head and `content-length` bytes.
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                        let length = content_length(&head);
                        if buffer.len() < end + 4 + length {
                            break;
                        }
                        buffer.drain(..end + 4 + length);
                        if head.contains("kv-health-probe") {
                            let _ = stream.write_all(ANSWER);
                            return;
                        }
                        // The proxy asks at start whether this is a cluster
                        // member; a standalone node says no (not counted).
                        if head.starts_with("GET /-/shards ") {
                            let _ = stream.write_all(STANDALONE);
                            return;
                        }
                        if !counted {
                            counted = true;
                            seen.connections.fetch_add(1, Ordering::SeqCst);
                        }
                        seen.requests.fetch_add(1, Ordering::SeqCst);
                        if stream.write_all(ANSWER).is_err() || close_after_answer {
                            seen.closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
                if counted {
                    seen.closed.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, seen)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| value.trim().parse().unwrap())
}

fn start_proxy(node: SocketAddr, extra: &[&str]) -> Process {
    let node = node.to_string();
    let mut args = vec!["--port", "0", "--nodes", &node, "--health-interval", "1h"];
    args.extend_from_slice(extra);
    Process::spawn(&binary("kv-proxy"), &args)
}

/// Polls `check` every 20 ms until it holds, or panics after 5 s.
fn wait_for(what: &str, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn node_connections_are_kept_alive_and_reused() {
    let (node, seen) = counting_node(false);
    let proxy = start_proxy(node, &["--workers", "2"]);
    for i in 0..20 {
        // A new client connection each time, handed to either worker.
        let got = request(proxy.addr, "GET", &format!("/k{i}"), None).unwrap();
        assert_eq!(
            (got.status, got.text()),
            (200, "{\"value\":\"ok\"}\n".into())
        );
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 20);
    let connections = seen.connections.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&connections),
        "20 requests took {connections} node connections; want one per worker at most"
    );
}

#[test]
fn idle_node_connections_are_closed_after_the_pool_idle_timeout() {
    let (node, seen) = counting_node(false);
    let proxy = start_proxy(node, &["--workers", "1", "--pool-idle-timeout", "300ms"]);
    assert_eq!(request(proxy.addr, "GET", "/a", None).unwrap().status, 200);
    wait_for("the idle connection was never closed", || {
        seen.closed.load(Ordering::SeqCst) == 1
    });
    // The next request gets a new connection and is answered.
    assert_eq!(request(proxy.addr, "GET", "/b", None).unwrap().status, 200);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2);
}

#[test]
fn a_node_closing_after_each_answer_costs_clients_nothing() {
    let (node, seen) = counting_node(true);
    let proxy = start_proxy(node, &["--workers", "1"]);
    for i in 0..10 {
        let got = request(proxy.addr, "GET", &format!("/k{i}"), None).unwrap();
        assert_eq!(got.status, 200, "{}", got.text());
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 10);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 10);
}

/// A connection the node closed while it sat idle in the pool must not be
/// handed to the next request. PUTs, since a write that reached the node on
/// a dead connection is not retried (a GET would hide the fault behind its
/// one retry): each would answer 502.
#[test]
fn a_connection_the_node_closed_while_idle_is_not_reused() {
    let (node, seen) = counting_node(true);
    let proxy = start_proxy(node, &["--workers", "1"]);
    for i in 0..10 {
        let got = request(
            proxy.addr,
            "PUT",
            &format!("/k{i}"),
            Some(b"{\"value\": 1}".as_slice()),
        )
        .unwrap();
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
        // The node has closed the connection before the next request comes.
        wait_for("the node never closed its connection", || {
            seen.closed.load(Ordering::SeqCst) == i + 1
        });
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 10);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 10);
}
