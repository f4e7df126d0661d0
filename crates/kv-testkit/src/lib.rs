//! Test support shared by the workspace's integration tests: start the real
//! `kv-node` / `kv-proxy` binaries as child processes and talk to them.
//!
//! * [`binary`] finds a workspace binary, building it first with the same
//!   cargo that runs the tests (so `cargo test -p kv-proxy` works on its own).
//! * [`Process::spawn`] starts a binary with `--port 0`, reads the port it
//!   logged ("listening on http://ADDR"), then waits until `GET /-/health`
//!   answers 200 (kv-http's probe, the one the servers' health checks use).
//!   No sleeps: every wait is for an event, bounded by a deadline.
//! * [`Process`] kills its child on drop; [`Process::kill9`] is a crash,
//!   [`Process::freeze`] a hang (SIGSTOP).
//! * [`FakeCluster`] is three fake replicated nodes on port 0 that serve
//!   `/-/shards` and answer 421/503/504 as a test scripts them, for testing
//!   leader routing in kv-proxy and kv-bench (see [`fake_cluster`]).
//! * [`Cluster`] is a real replicated cluster: `kv-node`s with `--peers`,
//!   optionally a proxy and a relay on every node-to-node link, with
//!   kill -9, restart, partitions and per-shard views (see [`cluster`]).
//! * [`Relay`] is a TCP relay a test can black-hole or reset while it runs,
//!   for partition tests (see [`relay`]).
//! * [`Tmpfs`] is a small tmpfs to fill, then grow, for full-disk tests
//!   (needs root; see [`tmpfs`]).
//!
//! HTTP here is a tiny blocking HTTP/1.1 client over `std::net` on purpose:
//! readiness checks must not depend on the code under test.

#![deny(clippy::indexing_slicing)]
// Test support: a panic is how it reports a failed setup to the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod cluster;
pub mod fake_cluster;
pub mod relay;
pub mod tmpfs;
pub use cluster::{Cluster, ClusterOpts};
pub use fake_cluster::FakeCluster;
pub use relay::Relay;
pub use tmpfs::Tmpfs;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long a process gets to report its port and become healthy.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// The workspace's target directory (the tests run from `target/<profile>/deps`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path to the workspace binary `name` (`kv-node`, `kv-proxy`, `kv-bench`),
/// built on first use in this test process.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|poison| poison.into_inner());
    let dir = profile_dir();
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        // `--workspace`: tests run in their own package's directory, where cargo
        // would only see that package's binaries.
        command.args(["build", "--quiet", "--workspace", "--bin", name]);
        if dir.file_name().is_some_and(|p| p == "release") {
            command.arg("--release");
        }
        let status = command.status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "cargo build --bin {name} failed: {status:?}"
        );
        built.push(name.to_owned());
    }
    dir.join(name)
}

/// A child process running one of the workspace's servers.
pub struct Process {
    child: Child,
    pub addr: SocketAddr,
    /// Everything the child wrote to stderr so far (its log).
    log: Arc<Mutex<String>>,
    /// Signalled by the log reader when the child's stderr reaches end of
    /// file, so a log read after the child exited holds its last lines.
    log_closed: Mutex<mpsc::Receiver<()>>,
    program: PathBuf,
    args: Vec<String>,
}

impl Process {
    /// Starts `program` with `args` (which should include `--port 0`, or a
    /// fixed port), waits for it to log its address and to answer
    /// `GET /-/health` with 200.
    pub fn spawn(program: &Path, args: &[&str]) -> Process {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Self::start(program.to_path_buf(), args)
    }

    fn start(program: PathBuf, args: Vec<String>) -> Process {
        let mut child = Command::new(&program)
            .args(&args)
            // A token in the developer's environment must not turn every
            // test server into a protected one: tests give tokens by flag.
            .env_remove("KV_AUTH_TOKEN")
            .env_remove("KV_AUTH_TOKEN_FILE")
            .env_remove("KV_PROXY_NODE_TOKEN_FILE")
            .env_remove("KV_TLS_CERT")
            .env_remove("KV_TLS_KEY")
            .env_remove("KV_TLS_CA")
            .env(
                "RUST_LOG",
                std::env::var("KV_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        let log_writer = log.clone();
        let (closed_tx, log_closed) = mpsc::channel();
        thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Logged before the address is announced, so a test that
                // reads the log once the process is up sees the line.
                if let Ok(mut log) = log_writer.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
                if !sent {
                    if let Some(addr) = parse_listening(&line) {
                        let _ = addr_tx.send(addr);
                        sent = true;
                    }
                }
            }
            let _ = closed_tx.send(());
        });
        let addr = match addr_rx.recv_timeout(STARTUP_DEADLINE) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = log.lock().map(|l| l.clone()).unwrap_or_default();
                panic!(
                    "{} {args:?} never logged its address; log:\n{log}",
                    program.display()
                );
            }
        };
        let process = Process {
            child,
            addr,
            log,
            log_closed: Mutex::new(log_closed),
            program,
            args,
        };
        process.wait_healthy();
        process
    }

    /// Waits until `GET /-/health` answers 200, or panics with the log. A
    /// server started with `--tls-cert` is probed in TLS, verified against
    /// its `--tls-ca`.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let tls = self.probe_tls();
        while Instant::now() < deadline {
            let addr = self.addr.to_string();
            if kv_http::probe::check_with(&addr, Duration::from_secs(5), tls.as_deref()).is_ok() {
                return;
            }
            // Polling a socket for readiness; not a synchronisation sleep.
            thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "{} never became healthy; log:\n{}",
            self.program.display(),
            self.log()
        );
    }

    /// What to probe a TLS port with: its own `--tls-ca`.
    fn probe_tls(&self) -> Option<Arc<kv_http::tls::Tls>> {
        let flag = |name: &str| {
            let at = self.args.iter().position(|a| a == name)?;
            self.args.get(at + 1).map(PathBuf::from)
        };
        flag("--tls-cert")?;
        let args = kv_http::tls::TlsArgs {
            tls_ca: Some(flag("--tls-ca")?),
            ..Default::default()
        };
        args.load().ok().flatten()
    }

    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The child's stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether the child's stderr shows `needle`, waiting up to 10 s for it:
    /// a line the child wrote may still be in the pipe or the reader thread
    /// when the caller looks (asserting on [`Process::log`] at once raced).
    pub fn log_shows(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // Polling the reader thread's buffer; not a synchronisation sleep.
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGKILL (a crash) and waits for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.wait_log_closed();
    }

    /// Once the child has exited, waits (bounded) until its whole stderr is
    /// in [`Process::log`]: the reader thread may still hold its last lines.
    fn wait_log_closed(&self) {
        if let Ok(closed) = self.log_closed.lock() {
            let _ = closed.recv_timeout(Duration::from_secs(5));
        }
    }

    /// Sends SIGSTOP: the process stops answering but its sockets stay
    /// open (the kernel still accepts connections), as a hung process
    /// would. [`Process::thaw`] resumes it; a kill works either way.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Sends SIGCONT to a frozen process.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Sends SIGHUP (kv-node and kv-proxy reload their TLS certificates).
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "kill {signal} {}: {status:?}",
            self.child.id()
        );
    }

    /// Sends SIGTERM and waits for the exit code (None if killed by a signal).
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let code = self.child.wait().ok().and_then(|s| s.code());
        self.wait_log_closed();
        code
    }

    /// Whether the child has exited, and with what code.
    pub fn try_exit_code(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Starts the same program with the same arguments again, on the same
    /// port it had (so clients and proxies find it where it was).
    pub fn restart(&mut self) {
        self.kill9();
        let port = self.addr.port().to_string();
        let mut args = self.args.clone();
        let value = args
            .iter()
            .position(|a| a == "--port")
            .and_then(|i| args.get_mut(i + 1));
        match value {
            Some(value) => *value = port,
            None => args.extend(["--port".to_owned(), port]),
        }
        let fresh = Self::start(self.program.clone(), args);
        *self = fresh;
    }

    /// PID of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds `http://ADDR` (or `https://ADDR`) after "listening on " in a log
/// line.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let rest = rest
        .strip_prefix("http://")
        .or_else(|| rest.strip_prefix("https://"))
        .unwrap_or(rest);
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A response read by [`request`].
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), with a
/// 10 s I/O timeout.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

/// Sends `bytes` exactly as given on a fresh connection and reads the
/// first answer (its head, and the body its `Content-Length` announces,
/// none for a `HEAD` request), with a 10 s I/O timeout.
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Response> {
    exchange_inner(addr, bytes, false).map(|(response, _)| response)
}

/// As [`exchange`], and says whether the server then closed the connection
/// (waiting at most 5 s to see).
pub fn exchange_then_closed(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<(Response, bool)> {
    exchange_inner(addr, bytes, true)
}

fn exchange_inner(
    addr: SocketAddr,
    bytes: &[u8],
    see_close: bool,
) -> std::io::Result<(Response, bool)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    // The server may answer (and close) before all of it is written.
    let _ = stream.write_all(bytes);
    let head_only = bytes.starts_with(b"HEAD ");
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let complete = |raw: &[u8]| -> Option<usize> {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let response = parse_response(raw.get(..split + 4)?, true).ok()?;
        let length = if head_only || response.status / 100 == 1 {
            0
        } else {
            response
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
        };
        (raw.len() >= split + 4 + length).then_some(split + 4 + length)
    };
    let end = loop {
        if let Some(end) = complete(&raw) {
            break end;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed mid-answer: {:?}", String::from_utf8_lossy(&raw)),
            ));
        }
        // `read` returned at most the buffer's length.
        raw.extend_from_slice(buf.get(..n).unwrap_or_default());
    };
    // `complete` found `end` within `raw`.
    let response = parse_response(raw.get(..end).unwrap_or_default(), head_only)?;
    let closed = if !see_close || raw.len() > end {
        false
    } else {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        match stream.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            // A reset is a close too; a timeout is an open connection.
            Err(error) => !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    Ok((response, closed))
}

fn parse_response(raw: &[u8], head_only: bool) -> std::io::Result<Response> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let (head, rest) = raw
        .split_at_checked(split)
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(head).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = rest.get(4..).unwrap_or_default().to_vec();
    if head_only {
        body.clear();
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The wait a 503's error text reports, as kv-node and kv-proxy word it:
/// "...; waited 953ms" or "(waited 1s 953ms)". Panics (a test helper) when
/// the text reports none.
#[allow(clippy::panic)]
pub fn reported_wait(error: &str) -> Duration {
    let after = error
        .rsplit("waited ")
        .next()
        .filter(|after| *after != error)
        .unwrap_or_else(|| panic!("no wait reported: {error}"));
    let figure = after.split(')').next().unwrap_or(after);
    humantime::parse_duration(figure).unwrap_or_else(|e| panic!("{figure:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_listening_address() {
        let line = "[2026-01-01T00:00:00Z INFO  kv_node] kv-node 0.1.0 listening on http://127.0.0.1:40123 (data dir x)";
        assert_eq!(
            parse_listening(line),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(parse_listening("nothing here"), None);
    }

    #[test]
    fn parses_a_response() {
        let raw = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let response = parse_response(raw, false).unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        assert_eq!(response.body, b"{}");
    }
}
