//! `scripts/cluster.sh`, run as a user runs it: up, a write through the
//! proxy, status, up again, down, and nothing left running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A base port whose next three ports are free too.
fn free_base_port() -> u16 {
    for _ in 0..50 {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if base < 65000 && (0..4).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no four consecutive free ports");
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

    let up = cluster(data.path(), base, "up");
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("kv cluster is up"), "{}", text(&up));
    let started = pids(data.path());
    assert_eq!(started.len(), 4, "{}", text(&up));

    let proxy: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    let put =
        kv_testkit::request(proxy, "PUT", "/cluster_key", Some(br#"{"value": [1, 2]}"#)).unwrap();
    assert_eq!(put.status, 200);
    let get = kv_testkit::request(proxy, "GET", "/cluster_key", None).unwrap();
    assert_eq!(get.text(), "{\"value\":[1, 2]}\n");

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
