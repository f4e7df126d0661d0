//! `scripts/cluster.sh`, run as a user runs it: up, a write through the
//! proxy, status, up again, down, and nothing left running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A base port whose next three ports are free too, below the kernel's
/// ephemeral range: the test kills a node and runs `up` again on its port,
/// and a port from the ephemeral range may meanwhile be taken as the local
/// end of some outgoing connection (one CI run saw `up` refuse it as "in
/// use by another program").
fn free_base_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(8).max(10_100));
    // Spread concurrent runs apart: the tests of this process (a call
    // counter) and other processes (the pid).
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = u32::from(high - low);
    let spread = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(call * 1009);
    let mut candidate = low + (spread % span) as u16;
    for _ in 0..500 {
        if (0..4).all(|i| TcpListener::bind(("127.0.0.1", candidate + i)).is_ok()) {
            return candidate;
        }
        candidate = if candidate + 13 >= high {
            low
        } else {
            candidate + 13
        };
    }
    panic!("no four consecutive free ports below {high}");
}

fn cluster(data: &Path, base: u16, command: &str) -> Output {
    let output = Command::new("bash")
        .arg(workspace().join("scripts/cluster.sh"))
        .arg(command)
        .env("KV_DATA", data)
        .env("KV_BASE_PORT", base.to_string())
        .env("KV_BUILD_PROFILE", "debug")
        .output()
        .unwrap();
    output
}

/// A PUT through the proxy, sent again (bounded, 30 s) while it answers
/// 503 or 504: on a machine loaded by other builds a debug cluster's write
/// can miss its 2 s commit bound (504, outcome unknown); the same PUT again
/// is safe (it writes the same value), and this test is about the script.
fn put_until_answered(
    proxy: std::net::SocketAddr,
    path: &str,
    body: &[u8],
) -> kv_testkit::Response {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let put = kv_testkit::request(proxy, "PUT", path, Some(body)).unwrap();
        if !matches!(put.status, 503 | 504) || std::time::Instant::now() > deadline {
            return put;
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn pids(data: &Path) -> Vec<u32> {
    std::fs::read_dir(data.join("pids"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .filter_map(|s| s.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `cluster.sh down` when dropped, so a failed assertion does not leave
/// a cluster running on the machine.
struct DownOnDrop<'a>(&'a Path, u16);

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        let _ = cluster(self.0, self.1, "down");
    }
}

fn is_running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn up_write_status_down() {
    let data = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let _down = DownOnDrop(data.path(), base);

    let up = cluster(data.path(), base, "up");
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("kv cluster is up"), "{}", text(&up));
    let started = pids(data.path());
    assert_eq!(started.len(), 4, "{}", text(&up));
    // The demo showed a key round trip and deleted its key: `up` leaves no
    // data of its own behind (it used to overwrite `hello`).
    assert!(text(&up).contains("{\"value\":\"world\"}"), "{}", text(&up));
    // The failover demo: with one node killed every key still reads and
    // writes through the proxy.
    for op in ["GET", "PUT"] {
        let line = text(&up)
            .lines()
            .find(|l| l.contains(&format!("{op} of each key with node-")))
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(
            line.ends_with("dead: 200 200 200 200 200 200"),
            "{op}: {}",
            text(&up)
        );
    }
    // Every replica applies the demo's deletes (a follower a moment after
    // the leader answered).
    for port in base + 1..=base + 3 {
        let node: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let health = kv_testkit::request(node, "GET", "/-/health", None).unwrap();
            if health.text().contains("\"keys\":0,") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {port} keeps demo keys: {}",
                health.text()
            );
            // Polling the node's state; not synchronisation.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    let proxy: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    let put = put_until_answered(proxy, "/cluster_key", br#"{"value": [1, 2]}"#);
    assert_eq!(put.status, 200);
    let get = kv_testkit::request(proxy, "GET", "/cluster_key", None).unwrap();
    assert_eq!(get.text(), "{\"value\":[1, 2]}\n");

    // Enough keys that every node owns some.
    for i in 0..30 {
        let body = format!("{{\"value\": {i}}}");
        let put = put_until_answered(proxy, &format!("/ck_{i}"), body.as_bytes());
        assert_eq!(put.status, 200);
    }

    let status = cluster(data.path(), base, "status");
    assert!(status.status.success());
    assert_eq!(
        text(&status).matches(" pid ").count(),
        4,
        "{}",
        text(&status)
    );

    let again = cluster(data.path(), base, "up");
    assert!(again.status.success());
    assert!(text(&again).contains("already running"), "{}", text(&again));
    assert_eq!(
        pids(data.path()),
        started,
        "a second up must not start a second set"
    );

    // kill -9 one node: `up` starts just that one again, and its data is back.
    let victim_file = data.path().join(format!("pids/node-{}.pid", base + 1));
    let victim: u32 = std::fs::read_to_string(&victim_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_running(victim) {
        assert!(std::time::Instant::now() < deadline, "kill -9 did not take");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let repair = cluster(data.path(), base, "up");
    assert!(repair.status.success(), "{}", text(&repair));
    assert!(
        text(&repair).contains(&format!("started node-{}", base + 1)),
        "{}",
        text(&repair)
    );
    assert_eq!(
        text(&repair).matches("started ").count(),
        1,
        "{}",
        text(&repair)
    );
    let mut now = pids(data.path());
    now.sort_unstable();
    let mut expected: Vec<u32> = started.iter().copied().filter(|&p| p != victim).collect();
    let restarted: u32 = std::fs::read_to_string(&victim_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    expected.push(restarted);
    expected.sort_unstable();
    assert_eq!(now, expected, "only the killed node was started again");
    // Every key, whichever node owns it, answers with its value (the proxy
    // notices the node is back within a health-check interval).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for i in 0..30 {
        loop {
            let get = kv_testkit::request(proxy, "GET", &format!("/ck_{i}"), None).unwrap();
            if get.status == 200 {
                assert_eq!(get.text(), format!("{{\"value\":{i}}}\n"));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ck_{i}: {}",
                get.status
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let started = pids(data.path());

    let down = cluster(data.path(), base, "down");
    assert!(down.status.success(), "{}", text(&down));
    for pid in started {
        assert!(!is_running(pid), "pid {pid} still running after down");
    }
    let status = cluster(data.path(), base, "status");
    assert!(
        text(&status).contains("nothing running"),
        "{}",
        text(&status)
    );
}

#[test]
fn a_taken_port_is_reported() {
    let data = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let _squatter = TcpListener::bind(("127.0.0.1", base + 2)).unwrap();
    let up = cluster(data.path(), base, "up");
    assert!(!up.status.success());
    assert!(
        text(&up).contains(&format!("port {} is already in use", base + 2)),
        "{}",
        text(&up)
    );
    assert!(pids(data.path()).is_empty());
}
