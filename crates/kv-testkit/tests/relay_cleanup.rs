//! A relay leaves nothing behind: after `close` (or drop) every thread it
//! started has exited and every socket it opened is closed. Alone in its
//! test binary, so the process's thread and descriptor counts are its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kv_testkit::Relay;

const BOUND: Duration = Duration::from_secs(10);

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Waits (bounded) until the process has `threads` threads and `fds`
/// descriptors: a joined thread leaves /proc a moment after join returns.
fn wait_for_counts(threads: usize, fds: usize) {
    let deadline = Instant::now() + BOUND;
    loop {
        let now = (count("/proc/self/task"), count("/proc/self/fd"));
        if now == (threads, fds) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "threads and descriptors {now:?}, expected {:?}",
            (threads, fds)
        );
        std::thread::yield_now();
    }
}

#[test]
fn close_and_drop_join_every_thread_and_close_every_socket() {
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));

    for close_explicitly in [true, false] {
        let relay = Relay::start(target.local_addr().unwrap()).unwrap();
        let relay_addr = relay.addr();
        // Two connections that forwarded bytes both ways, one held in a
        // black hole.
        let mut clients = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..2 {
            let mut client = TcpStream::connect(relay.addr()).unwrap();
            client.set_read_timeout(Some(BOUND)).unwrap();
            client.write_all(b"ping").unwrap();
            let (mut upstream, _) = target.accept().unwrap();
            upstream.set_read_timeout(Some(BOUND)).unwrap();
            let mut got = [0u8; 4];
            upstream.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            upstream.write_all(b"pong").unwrap();
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"pong");
            clients.push(client);
            accepted.push(upstream);
        }
        relay.blackhole();
        let mut held = TcpStream::connect(relay.addr()).unwrap();
        held.write_all(b"held").unwrap();
        let counters = relay.wait_for(BOUND, |c| c.connections == 3);
        assert_eq!((counters.connections, counters.open), (3, 3));
        // accept + 2 × 2 pumps + 1 connection waiting for the link.
        assert_eq!(counters.threads, 6, "{counters:?}");

        if close_explicitly {
            let last = relay.close();
            assert_eq!((last.open, last.threads), (0, 0), "{last:?}");
        } else {
            drop(relay);
        }
        // Every connection was closed on both sides, and the port is shut.
        for mut socket in clients.into_iter().chain(accepted).chain([held]) {
            socket.set_read_timeout(Some(BOUND)).unwrap();
            let mut rest = Vec::new();
            let end = socket.read_to_end(&mut rest);
            assert!(
                !matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut),
                "still open: {end:?}"
            );
        }
        assert!(TcpStream::connect(relay_addr).is_err());
        wait_for_counts(threads, fds);
    }
}
