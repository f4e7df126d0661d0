//! The real `kv-node` binary, started as a process on a free port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_testkit::{binary, request, Process};

fn start(dir: &tempfile::TempDir) -> Process {
    Process::spawn(
        &binary("kv-node"),
        &["--port", "0", "--data-dir", dir.path().to_str().unwrap()],
    )
}

#[test]
fn api_rows_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir);
    for method in ["POST", "PUT"] {
        let put = request(
            node.addr,
            method,
            "/key_1",
            Some(br#"{"value": "value_1"}"#),
        )
        .unwrap();
        assert_eq!(put.status, 200);
        assert_eq!(put.text(), "{\"message\":\"Value stored successfully\"}\n");
    }
    let head = request(node.addr, "HEAD", "/key_1", None).unwrap();
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("20"))
    );
    let health = request(node.addr, "GET", "/-/health", None).unwrap();
    assert_eq!(health.status, 200);
    assert!(
        health.text().contains("\"status\":\"ok\""),
        "{}",
        health.text()
    );
    let get = request(node.addr, "GET", "/key_1", None).unwrap();
    assert_eq!(
        (get.status, get.text().as_str()),
        (200, "{\"value\":\"value_1\"}\n")
    );
    assert_eq!(get.header("content-type"), Some("application/json"));
    let delete = request(node.addr, "DELETE", "/key_1", None).unwrap();
    assert_eq!(
        delete.text(),
        "{\"message\":\"Key deleted successfully\"}\n"
    );
    let missing = request(node.addr, "GET", "/key_1", None).unwrap();
    assert_eq!(
        (missing.status, missing.text().as_str()),
        (404, "{\"error\":\"Key not found\"}\n")
    );
}

#[test]
fn sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(&dir);
    assert_eq!(node.terminate(), Some(0));
    assert!(node.log().contains("kv-node stopped"), "{}", node.log());
}

#[test]
fn kv_health_probe_tells_up_from_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(&dir);
    let probe = |addr: String| {
        std::process::Command::new(binary("kv-health"))
            .arg(addr)
            .output()
            .unwrap()
    };
    assert!(probe(node.addr.to_string()).status.success());
    node.kill9();
    let down = probe(node.addr.to_string());
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));
}

#[test]
fn an_oversized_upload_reads_its_413() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir);
    // A client that writes its whole 12 MiB body (more than loopback buffers
    // hold) before reading: without the
    // server draining it, the close would reset the connection and lose the 413.
    let big = format!(r#"{{"value": "{}"}}"#, "x".repeat(12 << 20));
    for _ in 0..3 {
        let response = request(node.addr, "PUT", "/big", Some(big.as_bytes())).unwrap();
        assert_eq!(response.status, 413);
        assert!(
            response.text().contains("Request body too large"),
            "{}",
            response.text()
        );
    }
    assert_eq!(request(node.addr, "GET", "/big", None).unwrap().status, 404);
}
