//! Shared by the `membership_*` tests: reading `GET /-/cluster`, waiting
//! until nodes agree on the members, starting a node with `--join`, and
//! reads and retried writes of single keys.

use std::net::SocketAddr;
use std::path::Path;

use kv_cluster::{ClusterView, MemberState};
use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{binary, Process};

/// `GET /-/cluster` of the node at `addr`, when it answers 200.
pub fn view(addr: SocketAddr) -> Option<ClusterView> {
    let response = send(addr, "GET", "/-/cluster", &[], None).ok()?;
    if response.status != 200 {
        return None;
    }
    serde_json::from_slice(&response.body).ok()
}

/// Waits until every node in `addrs` shows the same version with exactly
/// `ids` as members, all active; returns one of the views.
pub fn wait_agreed(addrs: &[SocketAddr], ids: &[u64]) -> ClusterView {
    let mut last = None;
    wait_until(
        &format!("nodes {addrs:?} agree on a cluster state with members {ids:?} all active"),
        BOUND,
        || {
            let views: Option<Vec<ClusterView>> = addrs.iter().map(|a| view(*a)).collect();
            let Some(views) = views else { return false };
            let first = &views[0];
            let agreed = views.iter().all(|v| {
                v.version == first.version
                    && v.cluster_id == first.cluster_id
                    && v.members.iter().map(|m| m.id).collect::<Vec<_>>() == ids
                    && v.members.iter().all(|m| m.state == MemberState::Active)
            });
            if agreed {
                last = Some(first.clone());
            }
            agreed
        },
    );
    last.expect("a view")
}

/// The flags of a node `id` on `port` joining through `seeds`.
pub fn join_args(id: u64, port: u16, data: &Path, seeds: &str, advertise: &str) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--data-dir",
        &data.to_string_lossy(),
        "--node-id",
        &id.to_string(),
        "--join",
        seeds,
        "--advertise",
        advertise,
        "--exit-with-parent",
        "--workers",
        "2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Starts node `id` with `--join seeds`, advertising `127.0.0.1:port`.
pub fn join(id: u64, port: u16, data: &Path, seeds: &str) -> Process {
    let args = join_args(id, port, data, seeds, &format!("127.0.0.1:{port}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::spawn(&binary("kv-node"), &args)
}

/// `GET /<key>` on `addr`: status (0 for no answer) and body.
pub fn get(addr: SocketAddr, key: &str) -> (u16, String) {
    send(addr, "GET", &format!("/{key}"), &[], None)
        .map(|r| (r.status, r.text()))
        .unwrap_or((0, String::new()))
}

/// Sends until the answer is not a safe-to-retry one (as kv-proxy's safe
/// retries: 503 and 421 were not proposed; a PUT that got 504, or no answer
/// within the client's 10 s, is sent again, as a client that must know
/// does, the value being the same), for at most `BOUND`; returns the last
/// status.
pub fn retried(mut attempt: impl FnMut() -> u16) -> u16 {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let status = attempt();
        if !matches!(status, 0 | 503 | 504 | 421) || std::time::Instant::now() >= deadline {
            return status;
        }
        RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Answers [`retried`] sent again (reported, not asserted: how often depends
/// on the machine's load).
pub static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
