//! The transport over real loopback HTTP: three in-process nodes, each a
//! hyper server on port 0 served with kv-http's accept loop, several Raft
//! groups each (in-memory storage), all node-to-node traffic over
//! `/-/raft/...`. Every wait is bounded; nothing sleeps to synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use kv_cluster::{placement, preferred_leaders, ClusterSpec};
use kv_http::server::{Admission, ConnectionLimits};
use kv_raft::mem::{MemLog, MemSm};
use kv_raft::{
    handle_raft, raft_config, Command, GroupId, Groups, Network, NodeId, Outcome, Raft, Timeouts,
};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ReadPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};

/// Bound on every wait (elections, replication): generous for a loaded
/// machine; the tests assert outcomes, never speed.
const BOUND: Duration = Duration::from_secs(10);

struct Node {
    id: NodeId,
    addr: SocketAddr,
    groups: Arc<Groups<MemSm>>,
    network: Network,
    sms: HashMap<GroupId, MemSm>,
    server: Option<JoinHandle<()>>,
}

impl Node {
    /// Node `id` hosting nothing yet, serving `/-/raft/...` on a free port.
    async fn started(id: NodeId) -> Node {
        let mut node = Node {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            groups: Arc::new(Groups::default()),
            network: Network::new(),
            sms: HashMap::new(),
            server: None,
        };
        node.serve(0).await;
        node
    }

    /// Serves `/-/raft/...` on `addr` (port 0 = any) until stopped.
    async fn serve(&mut self, port: u16) {
        let listener = kv_http::server::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
            .await
            .unwrap();
        self.addr = listener.local_addr().unwrap();
        let groups = Arc::clone(&self.groups);
        self.server = Some(tokio::spawn(async move {
            let admission = Admission::new(64);
            let limits = ConnectionLimits {
                max_connections: 64,
                header_timeout: Duration::from_secs(5),
                shutdown_timeout: Duration::from_secs(1),
            };
            let builder = limits.http1();
            // Dropped with this task: stopping the server closes every
            // connection, as a dead node would.
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
        }));
    }

    /// Stops serving: peers now find the port closed.
    fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    fn raft(&self, group: GroupId) -> Raft<MemSm> {
        self.groups.get(group).unwrap()
    }
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    groups: Vec<GroupId>,
    /// Per group, the node that initialised it (kv-cluster's preferred leader).
    preferred: Vec<NodeId>,
}

impl Cluster {
    /// Three nodes hosting `groups` groups placed by kv-cluster (3 replicas
    /// each, so every node hosts every group), each initialised once by its
    /// preferred leader.
    async fn start(groups: u32) -> Cluster {
        Self::start_with(groups, |_, _| ()).await
    }

    /// As [`Cluster::start`]; `adjust` may change a member's advertised
    /// address and the nodes' networks before any group exists.
    async fn start_with(
        groups: u32,
        adjust: impl Fn(&mut BTreeMap<u64, String>, &BTreeMap<NodeId, Node>),
    ) -> Cluster {
        let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
        let mut nodes = BTreeMap::new();
        for id in 1..=3 {
            nodes.insert(id, Node::started(id).await);
        }
        let mut members: BTreeMap<u64, String> = nodes
            .iter()
            .map(|(id, node)| (*id, node.addr.to_string()))
            .collect();
        adjust(&mut members, &nodes);
        let spec = ClusterSpec {
            node_id: 1,
            shards: groups,
            replicas: 3,
            members: members.clone(),
        };
        spec.validate().unwrap();
        let placed = placement(&spec);
        let preferred = preferred_leaders(&placed);
        for node in nodes.values_mut() {
            for group in 0..groups {
                let sm = MemSm::default();
                let raft = Raft::new(
                    node.id,
                    Arc::clone(&config),
                    node.network.factory(group),
                    MemLog::default(),
                    sm.clone(),
                )
                .await
                .unwrap();
                node.groups.insert(group, raft);
                node.sms.insert(group, sm);
            }
        }
        for group in 0..groups {
            let voters: BTreeMap<u64, BasicNode> = placed[group as usize]
                .iter()
                .map(|id| (*id, BasicNode::new(members[id].clone())))
                .collect();
            let initialiser = &nodes[&preferred[group as usize]];
            let raft = initialiser.raft(group);
            raft.initialize(voters.clone()).await.unwrap();
            // Exactly once: openraft refuses a second initialisation.
            assert!(raft.initialize(voters).await.is_err());
        }
        Cluster {
            preferred,
            nodes,
            groups: (0..groups).collect(),
        }
    }

    /// Waits (bounded) until every running node agrees on a leader of
    /// `group` other than `not`, and returns it.
    async fn leader(&self, group: GroupId, not: Option<NodeId>) -> NodeId {
        let mut leader = None;
        for node in self.nodes.values().filter(|node| node.server.is_some()) {
            let metrics = node
                .raft(group)
                .wait(Some(BOUND))
                .metrics(
                    |m| {
                        m.current_leader.is_some()
                            && m.current_leader != not
                            && (leader.is_none() || m.current_leader == leader)
                    },
                    "a leader",
                )
                .await
                .unwrap();
            leader = metrics.current_leader;
        }
        let leader = leader.unwrap();
        // The leader itself knows it leads, and a quorum acknowledged it:
        // until then openraft refuses writes (`ForwardReason::LeaseExpired`).
        self.nodes[&leader]
            .raft(group)
            .wait(Some(BOUND))
            .metrics(
                |m| m.state.is_leader() && m.last_quorum_acked.is_some(),
                "leading",
            )
            .await
            .unwrap();
        leader
    }

    /// Waits (bounded) until `node` applied at least `index` of `group`.
    async fn applied(&self, node: NodeId, group: GroupId, index: u64) {
        self.nodes[&node]
            .raft(group)
            .wait(Some(BOUND))
            .applied_index_at_least(Some(index), "applied")
            .await
            .unwrap();
    }

    async fn shutdown(mut self) {
        for node in self.nodes.values_mut() {
            node.stop_server();
            for group in &self.groups {
                let _ = node.raft(*group).shutdown().await;
            }
        }
    }
}

fn put(key: &str, value: &str) -> Command {
    Command::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_elect_replicate_read_refuse_on_followers_and_transfer() {
    let cluster = Cluster::start(4).await;
    for &group in &cluster.groups {
        let leader_id = cluster.leader(group, None).await;
        // The initialiser is the first leader: first leaders are spread
        // as kv-cluster prefers (design §8-9).
        assert_eq!(
            leader_id, cluster.preferred[group as usize],
            "group {group}"
        );
        let leader = cluster.nodes[&leader_id].raft(group);

        // A write on the leader commits on a majority, applies everywhere.
        let key = format!("key-{group}");
        let written = leader.client_write(put(&key, "v1")).await.unwrap();
        assert_eq!(written.data, Outcome::Stored);
        for id in cluster.nodes.keys() {
            cluster.applied(*id, group, written.log_id.index).await;
            assert_eq!(
                cluster.nodes[id].sms[&group].get(&key),
                Some(b"v1".to_vec()),
                "node {id} group {group}"
            );
        }

        // A read-index read on the leader confirms leadership with a quorum.
        leader
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .unwrap();
        assert_eq!(
            cluster.nodes[&leader_id].sms[&group].get(&key),
            Some(b"v1".to_vec())
        );

        // A follower refuses, naming the leader, before proposing anything.
        let follower_id = *cluster.nodes.keys().find(|id| **id != leader_id).unwrap();
        let follower = cluster.nodes[&follower_id].raft(group);
        let last_before = follower.metrics().borrow_watched().last_log_index;
        match follower
            .client_write(Command::Delete { key: key.clone() })
            .await
        {
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                assert_eq!(forward.leader_id, Some(leader_id));
            }
            other => panic!("follower write: {other:?}"),
        }
        assert_eq!(
            follower.metrics().borrow_watched().last_log_index,
            last_before
        );
        assert!(follower
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .is_err());
        assert_eq!(
            cluster.nodes[&follower_id].sms[&group].get(&key),
            Some(b"v1".to_vec())
        );

        // A delete is decided in log order.
        let deleted = leader
            .client_write(Command::Delete { key: key.clone() })
            .await
            .unwrap();
        assert_eq!(deleted.data, Outcome::Deleted { found: true });

        // Leadership moves where it is sent.
        leader.trigger().transfer_leader(follower_id).await.unwrap();
        let new_leader = cluster.leader(group, Some(leader_id)).await;
        assert_eq!(new_leader, follower_id);
        let again = cluster.nodes[&new_leader]
            .raft(group)
            .client_write(put(&key, "v2"))
            .await
            .unwrap();
        cluster.applied(leader_id, group, again.log_id.index).await;
        assert_eq!(
            cluster.nodes[&leader_id].sms[&group].get(&key),
            Some(b"v2".to_vec())
        );
    }
    for node in cluster.nodes.values() {
        let stats = node.network.stats();
        eprintln!(
            "node {}: {} appends in {} POSTs",
            node.id, stats.appends, stats.posts
        );
        assert!(stats.posts > 0 && stats.posts <= stats.appends, "{stats:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_leader_is_replaced() {
    let mut cluster = Cluster::start(3).await;
    let group = 0;
    let old = cluster.leader(group, None).await;
    let written = cluster.nodes[&old]
        .raft(group)
        .client_write(put("k", "before"))
        .await
        .unwrap();
    for id in cluster.nodes.keys() {
        cluster.applied(*id, group, written.log_id.index).await;
    }

    // The leader's node dies: its server stops and its groups stop.
    let dead = cluster.nodes.get_mut(&old).unwrap();
    dead.stop_server();
    for group in cluster.groups.clone() {
        dead.raft(group).shutdown().await.unwrap();
    }

    // The others elect a new leader (bounded wait) that serves writes and reads.
    let new = cluster.leader(group, Some(old)).await;
    assert_ne!(new, old);
    let raft = cluster.nodes[&new].raft(group);
    raft.client_write(put("k", "after")).await.unwrap();
    raft.ensure_linearizable(ReadPolicy::ReadIndex)
        .await
        .unwrap();
    assert_eq!(
        cluster.nodes[&new].sms[&group].get("k"),
        Some(b"after".to_vec())
    );
    cluster.nodes.remove(&old);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_gets_a_snapshot_after_the_leader_purges() {
    let mut cluster = Cluster::start(2).await;
    for node in cluster.nodes.values() {
        // Throttled (well above this snapshot's size: the test asserts what
        // is counted, never how long it took).
        node.network.snapshot_throttle().set_rate(32 << 20);
    }
    let group = 1;
    let leader_id = cluster.leader(group, None).await;
    let lagging = *cluster.nodes.keys().find(|id| **id != leader_id).unwrap();
    let port = cluster.nodes[&lagging].addr.port();
    cluster.nodes.get_mut(&lagging).unwrap().stop_server();

    // The others commit without it, snapshot and purge the log it would need.
    let leader = cluster.nodes[&leader_id].raft(group);
    let mut last = 0;
    for i in 0..50 {
        last = leader
            .client_write(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .unwrap()
            .log_id
            .index;
    }
    leader.trigger().snapshot().await.unwrap();
    leader
        .wait(Some(BOUND))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= last), "snapshot")
        .await
        .unwrap();
    leader.trigger().purge_log(last).await.unwrap();
    leader
        .wait(Some(BOUND))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "purged")
        .await
        .unwrap();

    // Back on the same port: it can only catch up from the snapshot.
    cluster.nodes.get_mut(&lagging).unwrap().serve(port).await;
    cluster.applied(lagging, group, last).await;
    let replica = &cluster.nodes[&lagging].sms[&group];
    assert!(replica.snapshot_installs() >= 1);
    assert_eq!(
        replica.contents(),
        cluster.nodes[&leader_id].sms[&group].contents()
    );
    assert_eq!(replica.get("k49"), Some(b"v49".to_vec()));
    // The leader counted the snapshot bytes it sent, against the lagging peer.
    let throttle = cluster.nodes[&leader_id].network.snapshot_throttle();
    assert_eq!(throttle.rate(), 32 << 20);
    let sent = throttle.bytes_sent();
    assert!(
        sent.get(&lagging).is_some_and(|bytes| *bytes > 50 * 4),
        "{sent:?}"
    );
    assert_eq!(throttle.total_bytes_sent(), sent.values().sum::<u64>());
    cluster.shutdown().await;
}

/// A forgotten member's peer is dropped (batcher stopped, connections
/// closed) and the others go on committing without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_member_is_dropped_from_the_transport() {
    let cluster = Cluster::start(1).await;
    let group = 0;
    let leader_id = cluster.leader(group, None).await;
    let leader = cluster.nodes[&leader_id].raft(group);
    leader.client_write(put("a", "1")).await.unwrap();
    let network = &cluster.nodes[&leader_id].network;
    assert_eq!(network.peer_count(), 2, "one peer per other member");
    let followers: Vec<NodeId> = cluster
        .nodes
        .keys()
        .copied()
        .filter(|id| *id != leader_id)
        .collect();
    let (gone, kept) = (followers[0], followers[1]);
    network.forget(gone);
    assert_eq!(network.peer_count(), 1);
    // Quorum without it: the write commits and the kept follower applies it.
    let index = leader
        .client_write(put("b", "2"))
        .await
        .unwrap()
        .log_id
        .index;
    cluster.applied(kept, group, index).await;
    assert_eq!(
        cluster.nodes[&kept].sms[&group].get("b"),
        Some(b"2".to_vec())
    );
    // Forgetting an unknown id is harmless.
    network.forget(99);
    cluster.shutdown().await;
}

/// One raw HTTP/1.1 exchange (`Connection: close`): status line and body.
async fn raw(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// A POST whose answer body is binary: status and raw body.
async fn raw_bytes(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let status = String::from_utf8_lossy(&answer[9..12]).parse().unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (status, answer[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_raft_requests_get_json_errors() {
    let cluster = Cluster::start(1).await;
    let addr = cluster.nodes[&1].addr;
    let error = |body: &str| -> String {
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        json["error"].as_str().unwrap().to_string()
    };

    let (status, body) = raw(
        addr,
        "POST",
        "/-/raft/append",
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error(&body).starts_with("Undecodable raft message"),
        "{body}"
    );

    // A valid vote for a group this node does not host.
    let vote = openraft::raft::VoteRequest::<kv_raft::KvRaft>::new(openraft::Vote::new(1, 2), None);
    let bytes = postcard::to_stdvec(&(999u32, vote)).unwrap();
    let (status, body) = raw(addr, "POST", "/-/raft/vote", &bytes).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(error(&body), "Unknown raft group 999");

    let (status, body) = raw(addr, "GET", "/-/raft/append", b"").await;
    assert_eq!(status, 405, "{body}");
    let (status, body) = raw(addr, "POST", "/-/raft/nope", b"").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(error(&body), "Unknown raft path");

    // Decodable but inconsistent (out of order, a gap): openraft would
    // assert on it and its group would die; refused per item instead.
    let log_id = |index| openraft::testing::log_id::<kv_raft::KvRaft>(1, 2, index);
    let blank = |index| openraft::alias::EntryOf::<kv_raft::KvRaft> {
        log_id: log_id(index),
        payload: openraft::EntryPayload::Blank,
    };
    let rpc = openraft::raft::AppendEntriesRequest::<kv_raft::KvRaft> {
        vote: openraft::Vote::new_committed(1, 2),
        prev_log_id: None,
        entries: vec![blank(9), blank(3)],
        leader_commit: Some(log_id(9)),
    };
    let bytes = postcard::to_stdvec(&vec![(0u32, rpc)]).unwrap();
    for node in cluster.nodes.values() {
        let (status, body) = raw_bytes(node.addr, "/-/raft/append", &bytes).await;
        assert_eq!(status, 200);
        let replies: Vec<(
            u32,
            Result<openraft::raft::AppendEntriesResponse<kv_raft::KvRaft>, kv_raft::net::WireError>,
        )> = postcard::from_bytes(&body).unwrap();
        assert!(
            matches!(
                &replies[..],
                [(0, Err(kv_raft::net::WireError::Malformed { group: 0, .. }))]
            ),
            "{replies:?}"
        );
    }

    // The group still works after all that, on every node.
    let leader = cluster.leader(0, None).await;
    let written = cluster.nodes[&leader]
        .raft(0)
        .client_write(put("k", "v"))
        .await
        .unwrap();
    for id in cluster.nodes.keys() {
        cluster.applied(*id, 0, written.log_id.index).await;
    }
    cluster.shutdown().await;
}

/// Not a test: how many appends one `POST /-/raft/append` carries, idle
/// (heartbeats only) and under concurrent writes to every group. Run with
/// `cargo test -p kv-raft --release --test transport -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, printed; run by hand"]
async fn measure_append_batching() {
    let groups = 64;
    let cluster = Cluster::start(groups).await;
    for group in 0..groups {
        cluster.leader(group, None).await;
    }
    let totals = |cluster: &Cluster| {
        cluster
            .nodes
            .values()
            .fold((0, 0), |(appends, posts), node| {
                let stats = node.network.stats();
                (appends + stats.appends, posts + stats.posts)
            })
    };
    let window = Duration::from_secs(3);
    let before = totals(&cluster);
    // A measurement window, not synchronisation.
    tokio::time::sleep(window).await;
    let after = totals(&cluster);
    let (appends, posts) = (after.0 - before.0, after.1 - before.1);
    eprintln!(
        "idle, {groups} groups, {window:?}: {appends} appends in {posts} POSTs ({:.2} per POST, {:.0} POSTs/s per node)",
        appends as f64 / posts as f64,
        posts as f64 / window.as_secs_f64() / 3.0
    );

    let before = totals(&cluster);
    let started = std::time::Instant::now();
    let mut writers = JoinSet::new();
    for group in 0..groups {
        let leader = cluster.leader(group, None).await;
        for writer in 0..4 {
            let raft = cluster.nodes[&leader].raft(group);
            writers.spawn(async move {
                for i in 0..50 {
                    raft.client_write(put(&format!("w{writer}-{i}"), "value"))
                        .await
                        .unwrap();
                }
            });
        }
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed();
    let after = totals(&cluster);
    let (appends, posts) = (after.0 - before.0, after.1 - before.1);
    eprintln!(
        "{} concurrent writers, {} writes in {elapsed:?}: {appends} appends in {posts} POSTs ({:.2} per POST)",
        groups * 4,
        groups * 200,
        appends as f64 / posts as f64
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_overrides_the_advertised_address() {
    // Node 3 advertises a port nobody listens on (bound, then closed); the
    // others reach it only through the route to its real address.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let cluster = Cluster::start_with(1, |members, nodes| {
        let real = members[&3].clone();
        members.insert(3, dead.clone());
        for node in nodes.values() {
            node.network.set_route(3, real.clone());
        }
    })
    .await;
    let leader = cluster.leader(0, None).await;
    let written = cluster.nodes[&leader]
        .raft(0)
        .client_write(put("k", "routed"))
        .await
        .unwrap();
    cluster.applied(3, 0, written.log_id.index).await;
    assert_eq!(cluster.nodes[&3].sms[&0].get("k"), Some(b"routed".to_vec()));
    let membership = cluster.nodes[&3]
        .raft(0)
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    assert_eq!(membership.membership().get_node(&3).unwrap().addr, dead);
    cluster.shutdown().await;
}

/// One vote (`/-/raft/vote`) or pre-vote (`/-/raft/pre-vote`) request of
/// candidate `candidate` at `term` for group 0, empty log, over HTTP.
async fn ask_vote(
    addr: SocketAddr,
    path: &str,
    term: u64,
    candidate: NodeId,
    leadership_transfer: bool,
) -> openraft::raft::VoteResponse<kv_raft::KvRaft> {
    let mut rpc = openraft::raft::VoteRequest::<kv_raft::KvRaft>::new(
        openraft::Vote::new(term, candidate),
        None,
    );
    rpc.leadership_transfer = leadership_transfer;
    let bytes = postcard::to_stdvec(&(0u32, rpc)).unwrap();
    let (status, body) = raw_bytes(addr, path, &bytes).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    postcard::from_bytes(&body).unwrap()
}

/// The restart guard (`net::server`): a group grants no vote or pre-vote
/// for one leader lease after it is hosted, so a replica restarted inside
/// a leader's lease cannot help elect another leader while the old one
/// still serves lease reads; a leadership transfer passes, and once the
/// lease has run out the same requests are granted. Without the guard
/// openraft grants the first vote at once (a fresh replica has no lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_grants_no_vote_for_one_lease_after_it_is_hosted() {
    // A lease long enough that the requests sent right after hosting
    // arrive inside it, short enough that the test waits it out.
    let timeouts = Timeouts {
        heartbeat_ms: 500,
        election_min_ms: 4_000,
        election_max_ms: 5_000,
    };
    let config = raft_config(timeouts, 1 << 20).unwrap();
    let mut node = Node::started(1).await;
    let raft = Raft::new(
        node.id,
        config,
        node.network.factory(0),
        MemLog::default(),
        MemSm::default(),
    )
    .await
    .unwrap();
    node.groups.insert(0, raft);
    let addr = node.addr;

    // Inside the lease: refused as openraft refuses inside one (not
    // granted, this replica's vote, which is not the candidate's).
    let pre = ask_vote(addr, "/-/raft/pre-vote", 1, 2, false).await;
    assert!(!pre.vote_granted, "{pre}");
    let vote = ask_vote(addr, "/-/raft/vote", 1, 2, false).await;
    assert!(!vote.vote_granted, "{vote}");
    assert!(!vote.is_granted_to(&openraft::Vote::new(1, 2)), "{vote}");
    assert_eq!(node.groups.restart_vote_refusals(), 2);

    // A leadership transfer passes the guard, as it passes openraft's lease.
    let transfer = ask_vote(addr, "/-/raft/vote", 1, 3, true).await;
    assert!(transfer.vote_granted, "{transfer}");
    assert!(transfer.is_granted_to(&openraft::Vote::new(1, 3)));
    assert_eq!(node.groups.restart_vote_refusals(), 2);

    // Once the lease has run out, a pre-vote is granted (polled: the
    // condition, not a duration, ends the wait)...
    tokio::time::timeout(Duration::from_secs(60), async {
        while !ask_vote(addr, "/-/raft/pre-vote", 2, 2, false)
            .await
            .vote_granted
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a pre-vote granted once the lease ran out");
    // ... and so is the vote.
    let vote = ask_vote(addr, "/-/raft/vote", 2, 2, false).await;
    assert!(vote.vote_granted, "{vote}");
    assert!(vote.is_granted_to(&openraft::Vote::new(2, 2)), "{vote}");

    node.stop_server();
    let _ = node.raft(0).shutdown().await;
}
