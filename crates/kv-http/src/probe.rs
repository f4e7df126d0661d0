//! The one `GET /-/health` probe: healthy means the answer's status is 200.
//!
//! Blocking and std only (a thread and a socket), so the tiny `kv-health`
//! binary, kv-bench's `--spawn` and the test kit use it without a runtime;
//! kv-proxy's health checks run it on tokio's blocking pool. Each probe is
//! a fresh connection (never a pooled one), so it sees what a new client
//! would: a restarted or firewalled server. Only the status line is read.
//! With a CA ([`check_with`]), the probe speaks TLS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::tls::Tls;

/// The probe's request.
pub const REQUEST: &[u8] =
    b"GET /-/health HTTP/1.1\r\nHost: kv\r\nUser-Agent: kv-health-probe\r\nConnection: close\r\n\r\n";

/// Probes `addr` (`host:port`): `Ok` if `GET /-/health` answers 200 within
/// `timeout` in all (resolve, connect, answer), else what went wrong.
pub fn check(addr: &str, timeout: Duration) -> Result<(), String> {
    check_with(addr, timeout, None)
}

/// [`check`], in TLS when `tls` has a CA (rustls' blocking stream: the
/// handshake happens within the first write and read, under the same
/// deadline).
pub fn check_with(addr: &str, timeout: Duration, tls: Option<&Tls>) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let target: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {addr}: no address"))?;
    let left = |what: &str| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {timeout:?} ({what})"))
    };
    let stream = TcpStream::connect_timeout(&target, left("connect")?)
        .map_err(|e| format!("connect: {e}"))?;
    // The same socket, to set its timeouts while a TLS stream owns it.
    let control = stream.try_clone().map_err(|e| format!("connect: {e}"))?;
    control
        .set_write_timeout(Some(left("write")?))
        .map_err(|e| format!("write: {e}"))?;
    match tls.and_then(Tls::client_config) {
        None => exchange(stream, &control, timeout, &left),
        Some(config) => {
            let name = crate::tls::server_name(addr).map_err(|e| format!("TLS: {e}"))?;
            let connection =
                rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
            exchange(
                rustls::StreamOwned::new(connection, stream),
                &control,
                timeout,
                &left,
            )
        }
    }
}

/// Sends the probe on `stream` and reads its status line.
fn exchange(
    mut stream: impl Read + Write,
    control: &TcpStream,
    timeout: Duration,
    left: &dyn Fn(&str) -> Result<Duration, String>,
) -> Result<(), String> {
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("write: {e}"))?;
    let mut head = [0u8; 64];
    let mut filled = 0;
    // `read` returns at most the room it was given, so `filled` stays at most
    // `head.len()` and the `get`s never miss.
    while filled < head.len() && !head.get(..filled).unwrap_or_default().contains(&b'\n') {
        control
            .set_read_timeout(Some(left("read")?))
            .map_err(|e| format!("read: {e}"))?;
        let read = stream
            .read(head.get_mut(filled..).unwrap_or_default())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no answer within {timeout:?}")
                }
                _ => format!("read: {e}"),
            })?;
        if read == 0 {
            return Err("closed before answering".to_owned());
        }
        filled += read;
    }
    let line = String::from_utf8_lossy(head.get(..filled).unwrap_or_default());
    let line = line.lines().next().unwrap_or("");
    match status_of(line) {
        Some(200) => Ok(()),
        _ => Err(format!("answered {line:?}")),
    }
}

/// The status code in an HTTP/1.x status line.
fn status_of(line: &str) -> Option<u16> {
    let mut words = line.split(' ');
    words.next().filter(|v| v.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_of("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_of("HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_of("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_of(""), None);
    }

    #[test]
    fn fails_on_a_closed_port_a_silent_server_and_a_503() {
        use std::net::TcpListener;
        // A port nothing listens on (bound, then released).
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(check(&addr, Duration::from_secs(2)).is_err());

        // Accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let why = check(&addr, Duration::from_millis(200)).unwrap_err();
        assert!(why.contains("no answer"), "{why}");

        // Answers 503, then 200.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let answers = std::thread::spawn(move || {
            for status in ["503 Service Unavailable", "200 OK"] {
                let (mut stream, _) = server.accept().unwrap();
                let mut buf = [0u8; 256];
                let _ = stream.read(&mut buf).unwrap();
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        assert!(check(&addr, Duration::from_secs(5))
            .unwrap_err()
            .contains("503"));
        assert!(check(&addr, Duration::from_secs(5)).is_ok());
        answers.join().unwrap();
        drop(silent);
    }
}
