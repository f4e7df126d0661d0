//! A fresh proxy is not ready before it knows its nodes (found by a break
//! session: started while every node was down, `/-/ready` said 200 for
//! 1-2 s, until two health checks had failed, so a load balancer sent
//! traffic to a proxy that could serve nothing). A node counts as up for
//! `/-/ready` and `/-/health` only once it has answered; the first checks
//! run at once, so a proxy whose nodes are up is ready after one check.
//!
//! Before the fix the first poll, right after the proxy answered its first
//! `/-/health`, got 200 `{"ready": true}`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_testkit::cluster::{free_ports, wait_until, BOUND};
use kv_testkit::{binary, request, Process};
use serde_json::Value;

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let answer = request(addr, "GET", path, None).unwrap();
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{path}"
    );
    let body = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", answer.text()));
    (answer.status, body)
}

fn start_proxy(nodes: &str) -> Process {
    Process::spawn(
        &binary("kv-proxy"),
        &[
            "--port",
            "0",
            "--nodes",
            nodes,
            "--discover-wait",
            "200ms",
            "--health-interval",
            "1s",
        ],
    )
}

#[test]
fn a_proxy_started_with_its_nodes_down_is_never_ready_until_one_answers() {
    let ports = free_ports(2);
    let nodes = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    // Nothing listens on either port.
    let proxy = start_proxy(&nodes);

    // From the first moment it answers until its checks have marked both
    // nodes down (two failed checks each), and a while after: never 200.
    let mut polls = 0;
    let mut down_polls = 0;
    wait_until("both nodes are marked down", BOUND, || {
        polls += 1;
        let (status, ready) = get(proxy.addr, "/-/ready");
        assert_eq!(status, 503, "poll {polls}: {ready}");
        assert_eq!(ready["ready"], false, "{ready}");
        assert!(ready["error"].is_string(), "{ready}");
        let (status, health) = get(proxy.addr, "/-/health");
        assert_eq!(status, 200, "the proxy itself serves: {health}");
        assert_eq!(health["status"], "degraded", "poll {polls}: {health}");
        assert_eq!(health["nodes_up"], 0, "poll {polls}: {health}");
        let down = health["nodes_down"].as_array().map_or(0, Vec::len);
        if down == 2 {
            down_polls += 1;
        }
        down_polls >= 5
    });
    assert!(
        polls > down_polls,
        "polled before the nodes were marked down"
    );

    // A node comes up: the proxy is ready once its check answers.
    let dir = tempfile::tempdir().unwrap();
    let port = ports[0].to_string();
    let data = dir.path().join("n1");
    let data = data.to_str().unwrap();
    let _node = Process::spawn(
        &binary("kv-node"),
        &["--port", &port, "--data-dir", data, "--exit-with-parent"],
    );
    wait_until("ready once a node answers", BOUND, || {
        get(proxy.addr, "/-/ready").0 == 200
    });
    let (_, health) = get(proxy.addr, "/-/health");
    assert_eq!(health["nodes_up"], 1, "{health}");
    assert_eq!(
        health["nodes_down"].as_array().map(Vec::len),
        Some(1),
        "{health}"
    );

    // A proxy started while its node is up is ready within one check,
    // with no fixed delay; its node is not reported down meanwhile.
    let only = format!("127.0.0.1:{port}");
    let fresh = start_proxy(&only);
    wait_until(
        "a fresh proxy in front of a live node is ready",
        BOUND,
        || {
            let (status, health) = get(fresh.addr, "/-/health");
            assert_eq!(
                health["nodes_down"].as_array().map(Vec::len),
                Some(0),
                "{health}"
            );
            status == 200 && get(fresh.addr, "/-/ready").0 == 200
        },
    );
}
