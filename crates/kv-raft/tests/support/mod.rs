//! What the in-process cluster tests share: the `/-/raft/*` server over
//! kv-http's accept loop, the store options, the wait bound.
#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use kv_http::server::{Admission, ConnectionLimits};
use kv_raft::{handle_raft, Groups, NodeId, ShardRaft, ShardSm};
use kv_store::{FsyncPolicy, StoreOptions};
use openraft::async_runtime::WatchReceiver;
use tokio::task::{JoinHandle, JoinSet};

/// How long a test waits for a condition before failing.
pub const BOUND: Duration = Duration::from_secs(20);

/// A store that snapshots only when told and syncs as `fsync` says.
pub fn store_options(fsync: FsyncPolicy) -> StoreOptions {
    StoreOptions {
        fsync,
        snapshot_interval: Duration::from_secs(3600),
        wal_max_bytes: 64 << 20,
        repair: false,
    }
}

/// Serves `groups`' `/-/raft/*` routes on 127.0.0.1:`port` (0: any);
/// returns the port and the server task.
pub async fn serve(port: u16, groups: Arc<Groups<ShardSm>>) -> (u16, JoinHandle<()>) {
    let listener = kv_http::server::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let admission = Admission::new(64);
        let limits = ConnectionLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(1),
        };
        let builder = limits.http1();
        let mut connections = JoinSet::new();
        loop {
            let (stream, slot) = kv_http::server::next_connection(&listener, &admission).await;
            let groups = Arc::clone(&groups);
            let service = service_fn(move |request| {
                let groups = Arc::clone(&groups);
                async move { Ok::<_, Infallible>(handle_raft(request, &groups).await) }
            });
            let connection = kv_http::server::serve_connection(&builder, stream, service);
            connections.spawn(async move {
                let _slot = slot;
                let _ = connection.await;
            });
        }
    });
    (port, server)
}

/// Waits (bounded) until every raft of `among` names the same leader, one
/// of `among`, and that leader has a quorum's acknowledgement; returns it.
/// All are read together each time round: after a restart, elections may
/// still move the leadership after one raft has named a leader.
pub async fn agreed_leader(among: &[(NodeId, ShardRaft)]) -> NodeId {
    let ids: Vec<NodeId> = among.iter().map(|(id, _)| *id).collect();
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let named: Vec<Option<NodeId>> = among
            .iter()
            .map(|(_, raft)| raft.metrics().borrow_watched().current_leader)
            .collect();
        let agreed = match named.first() {
            Some(Some(first)) if ids.contains(first) => {
                named.iter().all(|n| *n == Some(*first)).then_some(*first)
            }
            _ => None,
        };
        let leading = agreed.and_then(|leader| {
            let (_, raft) = among.iter().find(|(id, _)| *id == leader)?;
            let m = raft.metrics().borrow_watched().clone();
            (m.state.is_leader() && m.last_quorum_acked.is_some()).then_some(leader)
        });
        if let Some(leader) = leading {
            return leader;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader with a quorum within {BOUND:?}: leaders named {named:?}"
        );
        // Polling a condition, bounded; not synchronising on time.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
