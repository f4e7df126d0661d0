//! `--spawn`: start local kv-node processes, so `kv-bench --nodes 3 --spawn`
//! works on its own (and scripts and tests need no cluster set-up).
//!
//! Each node gets `--port 0` and a temporary data directory; its address is
//! read from its log line "listening on http://ADDR", then `GET /-/health`
//! is polled until it answers 200. Nodes are killed, and their directories
//! removed, when the [`LocalNode`]s are dropped, which kv-bench also does on
//! SIGINT and SIGTERM.
//!
//! A kv-bench killed outright (SIGKILL) runs no drop: its nodes are started
//! with `--exit-with-parent`, so they stop by themselves within a fraction of
//! a second, and their directories (named `kv-bench-node-<kv-bench pid>-*`)
//! are removed by the next `--spawn` once no process holds their lock.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a node gets to start and become healthy.
const STARTUP: Duration = Duration::from_secs(30);

/// A kv-node child process.
pub struct LocalNode {
    child: Child,
    pub addr: SocketAddr,
    _data_dir: tempfile::TempDir,
}

impl LocalNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kv-node binary: `explicit`, or `kv-node` next to this executable.
pub fn node_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find kv-bench's own path: {e}"))?
            .with_file_name(format!("kv-node{}", std::env::consts::EXE_SUFFIX)),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "--spawn: no kv-node binary at {} (build it with `cargo build --release -p kv-node`, or pass --node-bin)",
            path.display()
        ))
    }
}

/// Prefix of the spawned nodes' data directories in the temp dir.
const DIR_PREFIX: &str = "kv-bench-node-";

/// Starts `count` nodes and waits until each is healthy.
pub fn spawn_nodes(binary: &Path, count: usize) -> Result<Vec<LocalNode>, String> {
    remove_stale_dirs(&std::env::temp_dir());
    (0..count).map(|_| spawn_node(binary)).collect()
}

/// Removes the data directories of nodes spawned by a kv-bench that is gone
/// (killed before it could clean up), unless a node still holds one's lock.
pub fn remove_stale_dirs(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let dir = entry.path();
        // A node that has not finished stopping still holds the lock.
        let in_use = std::fs::File::open(dir.join("LOCK"))
            .map(|lock| lock.try_lock().is_err())
            .unwrap_or(false);
        if !in_use && std::fs::remove_dir_all(&dir).is_ok() {
            log::info!("removed {} (left by kv-bench pid {owner})", dir.display());
        }
    }
}

fn spawn_node(binary: &Path) -> Result<LocalNode, String> {
    let data_dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|e| format!("cannot create a data directory: {e}"))?;
    let mut child = Command::new(binary)
        .arg("--port")
        .arg("0")
        .arg("--data-dir")
        .arg(data_dir.path())
        .arg("--exit-with-parent")
        // The address is read from the info-level log line.
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let Some(stderr) = child.stderr.take() else {
        let _ = child.kill();
        return Err("kv-node's stderr is not piped".into());
    };
    let (tx, rx) = mpsc::channel();
    // Keeps reading after the address line, so the node never blocks on a
    // full pipe.
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(addr) = listening_addr(&line) {
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
            log::debug!("kv-node: {line}");
        }
    });
    let addr = match rx.recv_timeout(STARTUP) {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} did not log its address within {STARTUP:?}",
                binary.display()
            ));
        }
    };
    let node = LocalNode {
        child,
        addr,
        _data_dir: data_dir,
    };
    wait_healthy(addr)?;
    Ok(node)
}

/// Finds `ADDR` in "... listening on http://ADDR ...".
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let rest = rest.strip_prefix("http://").unwrap_or(rest);
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn wait_healthy(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP;
    while Instant::now() < deadline {
        if kv_http::probe::check(&addr.to_string(), Duration::from_secs(2)).is_ok() {
            return Ok(());
        }
        // Polling a socket for readiness, bounded by the deadline.
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("kv-node on {addr} never answered /-/health"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_address_from_the_log() {
        let line =
            "[2026 INFO kv_node] kv-node 0.1.0 listening on http://127.0.0.1:40123 (data dir x)";
        assert_eq!(
            listening_addr(line),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(listening_addr("starting"), None);
    }
}
