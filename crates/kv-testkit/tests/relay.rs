//! The fault-injecting relay in front of a real kv-node.
//!
//! The short client timeouts below are bounds on how long a test waits to
//! see that nothing comes back (a black-holed request gets no answer at all,
//! however long one waits), not claims about speed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kv_testkit::relay::Mode;
use kv_testkit::{binary, request, Process, Relay};

/// How long a client waits before deciding a black-holed request got no answer.
const NO_ANSWER: Duration = Duration::from_millis(300);
/// How long a client waits for an answer that must come.
const ANSWER: Duration = Duration::from_secs(10);
/// `GET /k` after `PUT /k {"value": 1}` (and 2).
const ONE: &str = "{\"value\":1}\n";
const TWO: &str = "{\"value\":2}\n";

fn start_node(dir: &tempfile::TempDir) -> Process {
    Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", dir.path().to_str().unwrap()],
    )
}

/// A keep-alive HTTP/1.1 connection with a per-read timeout.
struct Client {
    stream: TcpStream,
    unread: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, ANSWER).unwrap();
        stream.set_write_timeout(Some(ANSWER)).unwrap();
        Client {
            stream,
            unread: Vec::new(),
        }
    }

    fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> io::Result<()> {
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(head.as_bytes())
    }

    /// Reads one answer: (status, body). A timeout is an `Err` of kind
    /// `WouldBlock`/`TimedOut`; the connection stays usable after it.
    fn answer(&mut self, timeout: Duration) -> io::Result<(u16, String)> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(split) = self.unread.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.unread[..split]).to_lowercase();
                let status = head[9..12].parse().unwrap();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if self.unread.len() >= split + 4 + length {
                    let body = String::from_utf8_lossy(&self.unread[split + 4..split + 4 + length])
                        .into_owned();
                    self.unread.drain(..split + 4 + length);
                    return Ok((status, body));
                }
            }
            let n = self.stream.read(&mut buffer)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.unread.extend_from_slice(&buffer[..n]);
        }
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> io::Result<(u16, String)> {
        self.send(method, path, body)?;
        self.answer(ANSWER)
    }
}

fn is_timeout(result: &io::Result<(u16, String)>) -> bool {
    matches!(result, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

fn get(addr: SocketAddr, key: &str) -> String {
    let response = request(addr, "GET", &format!("/{key}"), None).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    response.text()
}

#[test]
fn requests_pass_through_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir);
    let relay = Relay::start(node.addr).unwrap();
    assert_eq!(relay.target(), node.addr);
    assert_eq!(relay.mode(), Mode::Pass);

    let put = request(relay.addr(), "PUT", "/k", Some(br#"{"value": 1}"#)).unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    // Through the relay, and on the node itself: it went there.
    assert_eq!(get(relay.addr(), "k"), ONE);
    assert_eq!(get(node.addr, "k"), ONE);

    let counters = relay.counters();
    assert_eq!(counters.connections, 2);
    assert_eq!(counters.refused, 0);
    assert!(counters.bytes_to_target > 0, "{counters:?}");
    assert!(counters.bytes_from_target > 0, "{counters:?}");
    let closed = relay.close();
    assert_eq!((closed.open, closed.threads), (0, 0), "{closed:?}");
}

#[test]
fn blackhole_stalls_old_and_new_connections_until_pass() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir);
    let relay = Relay::start(node.addr).unwrap();
    let mut old = Client::connect(relay.addr());
    assert_eq!(
        old.call("PUT", "/k", Some(r#"{"value": 1}"#)).unwrap().0,
        200
    );

    relay.blackhole();
    let before = relay.counters();
    // An existing connection: the request goes out, no answer comes back.
    old.send("GET", "/k", None).unwrap();
    assert!(is_timeout(&old.answer(NO_ANSWER)));
    // A new connection is accepted, and its write goes nowhere either.
    let mut new = Client::connect(relay.addr());
    new.send("PUT", "/k", Some(r#"{"value": 2}"#)).unwrap();
    assert!(is_timeout(&new.answer(NO_ANSWER)));
    // The node is fine and still serves direct clients; the write did not
    // reach it.
    assert_eq!(get(node.addr, "k"), ONE);
    let during = relay.wait_for(ANSWER, |c| c.connections == before.connections + 1);
    assert_eq!(during.bytes_to_target, before.bytes_to_target);
    assert_eq!(during.bytes_from_target, before.bytes_from_target);
    assert_eq!(during.connections, before.connections + 1);
    assert_eq!(relay.mode(), Mode::Blackhole);

    // Healed: the held requests go on, as TCP would retransmit them. The
    // two connections race each other, so the GET may see either value.
    relay.pass();
    let (status, body) = old.answer(ANSWER).unwrap();
    assert_eq!(status, 200);
    assert!(body == ONE || body == TWO, "{body:?}");
    assert_eq!(new.answer(ANSWER).unwrap().0, 200);
    assert_eq!(get(relay.addr(), "k"), TWO);
    assert_eq!(old.call("GET", "/k", None).unwrap().1, TWO);
}

#[test]
fn reset_closes_connections_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir);
    let relay = Relay::start(node.addr).unwrap();
    let mut old = Client::connect(relay.addr());
    assert_eq!(
        old.call("PUT", "/k", Some(r#"{"value": 1}"#)).unwrap().0,
        200
    );

    relay.reset();
    // The open connection is closed at once, without the client sending
    // anything: it reads an end or an error, not a timeout.
    let result = old.answer(ANSWER);
    assert!(result.is_err() && !is_timeout(&result), "{result:?}");
    // A new one is reset.
    let result = request(relay.addr(), "GET", "/k", None);
    assert!(result.is_err(), "{result:?}");
    let counters = relay.wait_for(ANSWER, |c| c.open == 0);
    assert_eq!(counters.open, 0, "{counters:?}");
    assert!(counters.refused >= 1, "{counters:?}");
    // The node itself is fine.
    assert_eq!(get(node.addr, "k"), ONE);

    relay.pass();
    assert_eq!(get(relay.addr(), "k"), ONE);
}

#[test]
fn reset_releases_black_holed_connections() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir);
    let relay = Relay::start(node.addr).unwrap();
    relay.blackhole();
    let mut held = Client::connect(relay.addr());
    held.send("GET", "/k", None).unwrap();
    assert!(is_timeout(&held.answer(NO_ANSWER)));
    relay.reset();
    let result = held.answer(ANSWER);
    assert!(result.is_err() && !is_timeout(&result), "{result:?}");
}

#[test]
fn connections_over_the_bound_are_refused() {
    // Nothing listens behind a black hole: no connection gets that far.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::start(target.local_addr().unwrap()).unwrap();
    relay.blackhole();
    let max = kv_testkit::relay::MAX_CONNECTIONS as u64;
    let held: Vec<TcpStream> = (0..max)
        .map(|_| TcpStream::connect(relay.addr()).unwrap())
        .collect();
    let counters = relay.wait_for(ANSWER, |c| c.connections == max);
    assert_eq!((counters.connections, counters.refused), (max, 0));

    // Reset on accept, so even setting a timeout may fail: any error but a
    // timeout, or an end of stream, is the refusal.
    let mut over = TcpStream::connect(relay.addr()).unwrap();
    let counters = relay.wait_for(ANSWER, |c| c.refused == 1);
    assert_eq!((counters.connections, counters.refused), (max, 1));
    let result = over
        .set_read_timeout(Some(ANSWER))
        .and_then(|()| over.read(&mut [0u8; 1]));
    let refused = match &result {
        Ok(n) => *n == 0,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    };
    assert!(refused, "{result:?}");

    let last = relay.close();
    assert_eq!((last.open, last.threads), (0, 0), "{last:?}");
    drop(held);
}
