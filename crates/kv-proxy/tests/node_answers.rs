//! How the proxy reads a node's answer and writes its request (its own
//! HTTP/1.1 exchange, `exchange.rs`), against a scripted fake node: the
//! real kv-proxy binary in front of it, talked to over HTTP. kv-node itself
//! always answers with a `Content-Length`; the other framings are what any
//! HTTP/1.1 server may send, so the proxy must relay them whole or answer
//! JSON 502, and go on serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use kv_testkit::{binary, request, Process};

const HEALTHY: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";
/// kv-node's answer to `GET /-/shards` when it is not in a cluster.
const STANDALONE: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 30\r\nconnection: close\r\n\r\n{\"error\":\"Unknown admin path\"}";

/// Length of the long body `/big` answers with: over the proxy's 64 KiB
/// read-whole limit, so it streams.
const BIG: usize = 300_000;

/// What the scripted node answers to a request for `path`, given the
/// request's head and body; `true` to close the connection after it.
fn script(path: &str, head: &str, body: &[u8]) -> (Vec<u8>, bool) {
    let fixed = |text: &str| (text.as_bytes().to_vec(), false);
    match path {
        "/chunked" => fixed(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
        ),
        "/interim" => fixed(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
             HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        ),
        "/unframed" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the close".to_vec(),
            true,
        ),
        "/hop" => fixed(
            "HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\n\
             x-end: 2\r\ncontent-length: 2\r\n\r\nok",
        ),
        "/big" => {
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
            answer.extend((0..BIG).map(|i| b'a' + (i % 26) as u8));
            (answer, false)
        }
        "/stall" => {
            // A third of a long body, then silence (a stalled node that
            // keeps its connection open), then the close.
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
            answer.extend(std::iter::repeat_n(b's', BIG / 3));
            (answer, true)
        }
        "/hugechunk" => fixed(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\nffffffffffffffff\r\nx\r\n0\r\n\r\n",
        ),
        "/garbage" => (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), true),
        "/short" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this".to_vec(),
            true,
        ),
        "/bigcut" => {
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
            answer.extend(std::iter::repeat_n(b'z', 100_000));
            (answer, true)
        }
        // The request as the node got it, head and body.
        _ => {
            let mut echoed = head.as_bytes().to_vec();
            echoed.extend_from_slice(b"\r\n\r\n");
            echoed.extend_from_slice(body);
            let mut answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                echoed.len()
            )
            .into_bytes();
            answer.extend(echoed);
            (answer, false)
        }
    }
}

/// A node answering by [`script`], one thread per connection.
fn scripted_node() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buffer = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let read = stream.read(&mut chunk).unwrap_or(0);
                    if read == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                        let length = content_length(&head);
                        if buffer.len() < end + 4 + length {
                            break;
                        }
                        let body = buffer[end + 4..end + 4 + length].to_vec();
                        buffer.drain(..end + 4 + length);
                        if head.contains("kv-health-probe") {
                            let _ = stream.write_all(HEALTHY);
                            return;
                        }
                        if head.starts_with("GET /-/shards ") {
                            let _ = stream.write_all(STANDALONE);
                            return;
                        }
                        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                        let (answer, close) = script(&path, &head, &body);
                        if stream.write_all(&answer).is_err() || close {
                            if path == "/stall" {
                                // Holds the connection open, silent, far
                                // past the proxy's timeout.
                                thread::sleep(Duration::from_secs(30));
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| value.trim().parse().unwrap())
}

fn start_proxy(node: SocketAddr) -> Process {
    start_proxy_with(node, &[])
}

fn start_proxy_with(node: SocketAddr, extra: &[&str]) -> Process {
    let node = node.to_string();
    let mut args = vec![
        "--port",
        "0",
        "--nodes",
        &node,
        "--health-interval",
        "1h",
        "--workers",
        "1",
    ];
    args.extend_from_slice(extra);
    Process::spawn(&binary("kv-proxy"), &args)
}

/// A raw exchange with the proxy: the whole answer as text, or what the
/// read ended with.
fn raw(proxy: SocketAddr, request: &str) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let ended = stream.read_to_end(&mut answer).err().map(|e| e.kind());
    (answer, ended)
}

#[test]
fn every_framing_a_node_may_answer_with_is_relayed_whole() {
    let proxy = start_proxy(scripted_node());
    let chunked = request(proxy.addr, "GET", "/chunked", None).unwrap();
    assert_eq!(
        (chunked.status, chunked.text()),
        (200, "hello world".into())
    );
    assert_eq!(chunked.header("content-type"), Some("text/plain"));
    assert_eq!(chunked.header("x-trailer"), None, "trailers are dropped");

    let interim = request(proxy.addr, "GET", "/interim", None).unwrap();
    assert_eq!((interim.status, interim.text()), (201, "ok".into()));

    let unframed = request(proxy.addr, "GET", "/unframed", None).unwrap();
    assert_eq!(
        (unframed.status, unframed.text()),
        (200, "until the close".into())
    );

    let hop = request(proxy.addr, "GET", "/hop", None).unwrap();
    assert_eq!(hop.status, 200);
    assert_eq!(
        hop.header("x-secret"),
        None,
        "named in Connection: hop-by-hop"
    );
    assert_eq!(hop.header("keep-alive"), None);
    assert_eq!(hop.header("x-end"), Some("2"));

    let big = request(proxy.addr, "GET", "/big", None).unwrap();
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), BIG);
    assert!(big
        .body
        .iter()
        .enumerate()
        .all(|(i, &b)| b == b'a' + (i % 26) as u8));
    // The node answers for itself, on a connection the pool kept.
    for _ in 0..3 {
        let again = request(proxy.addr, "GET", "/big", None).unwrap();
        assert_eq!(again.body.len(), BIG);
        assert!(again.header("x-kv-node").is_some());
    }
}

#[test]
fn a_broken_answer_is_a_json_502_and_the_proxy_goes_on() {
    let proxy = start_proxy(scripted_node());
    for path in ["/garbage", "/short", "/hugechunk"] {
        let got = request(proxy.addr, "GET", path, None).unwrap();
        assert_eq!(got.status, 502, "{path}: {}", got.text());
        assert_eq!(got.header("content-type"), Some("application/json"));
        let error: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        assert!(error["error"].is_string(), "{path}: {}", got.text());
    }
    // A long answer cut off after its head went out: the client's answer
    // is not complete (the connection ends short of the length it was
    // given), never a complete-looking one.
    let (answer, _) = raw(proxy.addr, "GET /bigcut HTTP/1.1\r\nHost: kv\r\n\r\n");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        &text[..text.len().min(200)]
    );
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        answer.len() - head_end < BIG,
        "a cut answer must not arrive whole"
    );
    let fine = request(proxy.addr, "GET", "/chunked", None).unwrap();
    assert_eq!((fine.status, fine.text()), (200, "hello world".into()));
}

#[test]
fn the_request_reaches_the_node_with_its_own_framing_and_no_hop_by_hop_headers() {
    let proxy = start_proxy(scripted_node());
    // A chunked upload with hop-by-hop headers and Expect: the node gets a
    // Content-Length, the body whole, and none of those headers.
    let (answer, _) = raw(
        proxy.addr,
        "PUT /echo?x=1 HTTP/1.1\r\nHost: kv\r\nConnection: close, x-hop\r\nX-Hop: 1\r\nTE: trailers\r\n\
         X-End: 2\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"v\r\n6\r\nalue\":\r\n2\r\n1}\r\n0\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&answer).to_lowercase();
    let echoed = &text[text.find("\r\n\r\n").unwrap() + 4..];
    assert!(echoed.starts_with("put /echo?x=1 http/1.1\r\n"), "{echoed}");
    assert!(echoed.contains("\r\ncontent-length: 11\r\n"), "{echoed}");
    assert!(echoed.ends_with("\r\n\r\n{\"value\":1}"), "{echoed}");
    assert!(echoed.contains("\r\nhost: kv\r\n"), "{echoed}");
    assert!(echoed.contains("\r\nx-end: 2\r\n"), "{echoed}");
    for hop in ["transfer-encoding", "x-hop", "\r\nte:", "connection"] {
        assert!(!echoed.contains(hop), "{hop} reached the node: {echoed}");
    }
    // HTTP/1.0 without Host: the node gets HTTP/1.1 and a Host.
    let (answer, _) = raw(proxy.addr, "GET /echo HTTP/1.0\r\n\r\n");
    let text = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(text.starts_with("http/1.0 200 ok\r\n"), "{text}");
    assert!(
        text.contains("get /echo http/1.1\r\nhost: 127.0.0.1:"),
        "{text}"
    );
}

#[test]
fn a_node_silent_mid_body_gets_its_answer_cut_off_after_the_request_timeout() {
    let proxy = start_proxy_with(scripted_node(), &["--request-timeout", "500ms"]);
    // The node sends the head and a third of a long body, then nothing for
    // 30 s. The proxy cuts the answer off after 500 ms of silence: the
    // client's read ends short (EOF or reset) well before its own 10 s
    // read timeout, which is what it hit before (the answer hung).
    let (answer, ended) = raw(proxy.addr, "GET /stall HTTP/1.1\r\nHost: kv\r\n\r\n");
    assert!(
        !matches!(
            ended,
            Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        ),
        "the client waited out its own read timeout: the proxy kept the stalled answer open"
    );
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        answer.len() - head_end,
        BIG / 3,
        "what the node sent, and no more"
    );
    // The proxy goes on serving.
    let fine = request(proxy.addr, "GET", "/chunked", None).unwrap();
    assert_eq!((fine.status, fine.text()), (200, "hello world".into()));
}
