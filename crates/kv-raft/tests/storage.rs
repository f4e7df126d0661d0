//! The durable storage under real openraft: three in-process nodes, each
//! with its own data dir (a real kv-store WAL) and a loopback HTTP server
//! for `/-/raft/...`, four groups each. A node "dies" by shutting its
//! groups down, stopping its server and dropping its store; it comes back
//! by reopening the same dir on the same port. Every wait is bounded;
//! nothing sleeps to synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::{agreed_leader, serve};
use support::{store_options, BOUND};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kv_raft::{
    raft_config, Command, GroupId, GroupLog, Groups, Network, NodeId, NodeStorage, Outcome,
    ShardRaft, ShardSm, StorageError, Timeouts,
};
use kv_store::hooks::Event;
use kv_store::{FsyncPolicy, Store, StoreError, StoreOptions};
use openraft::async_runtime::WatchReceiver;
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::{BasicNode, Raft, ReadPolicy};
use tokio::task::{JoinHandle, JoinSet};

const GROUPS: u32 = 4;

/// One running node: its store, storage, groups and server.
struct Running {
    store: Arc<Store>,
    groups: Arc<Groups<ShardSm>>,
    sms: HashMap<GroupId, ShardSm>,
    logs: HashMap<GroupId, GroupLog>,
    server: JoinHandle<()>,
}

struct Node {
    id: NodeId,
    dir: PathBuf,
    port: u16,
    running: Option<Running>,
}

/// Opens the node's store and storage on `dir` and creates its groups
/// (none initialised here).
async fn open_groups(
    id: NodeId,
    dir: &Path,
    groups: Arc<Groups<ShardSm>>,
    members: &BTreeMap<NodeId, SocketAddr>,
) -> Result<
    (
        Arc<Store>,
        HashMap<GroupId, ShardSm>,
        HashMap<GroupId, GroupLog>,
    ),
    StorageError,
> {
    let store = Arc::new(Store::open(dir, store_options(FsyncPolicy::Never)).unwrap());
    let storage = NodeStorage::open(Arc::clone(&store), dir)?;
    let network = Network::new();
    for (peer, addr) in members {
        network.set_route(*peer, addr.to_string());
    }
    let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
    let mut sms = HashMap::new();
    let mut logs = HashMap::new();
    for group in 0..GROUPS {
        let (log, sm) = storage.group(group)?;
        let raft: ShardRaft = Raft::new(
            id,
            Arc::clone(&config),
            network.factory(group),
            log.clone(),
            sm.clone(),
        )
        .await
        .unwrap();
        groups.insert(group, raft);
        sms.insert(group, sm);
        logs.insert(group, log);
    }
    Ok((store, sms, logs))
}

impl Node {
    fn running(&self) -> &Running {
        self.running.as_ref().expect("node is running")
    }

    fn raft(&self, group: GroupId) -> ShardRaft {
        self.running().groups.get(group).unwrap()
    }

    fn sm(&self, group: GroupId) -> &ShardSm {
        &self.running().sms[&group]
    }

    /// Reopens the node's dir on its port.
    async fn start(&mut self, members: &BTreeMap<NodeId, SocketAddr>) {
        let groups = Arc::new(Groups::default());
        let (store, sms, logs) = open_groups(self.id, &self.dir, Arc::clone(&groups), members)
            .await
            .unwrap();
        let (port, server) = serve(self.port, Arc::clone(&groups)).await;
        assert_eq!(port, self.port);
        self.running = Some(Running {
            store,
            groups,
            sms,
            logs,
            server,
        });
    }

    /// The node dies: groups stop, server stops, the store is dropped.
    async fn stop(&mut self) {
        let running = self.running.take().expect("node is running");
        running.server.abort();
        for group in 0..GROUPS {
            if let Some(raft) = running.groups.remove(group) {
                raft.shutdown().await.unwrap();
            }
        }
        drop(running.sms);
        drop(running.logs);
        // openraft's tasks drop their log handles as they wind down; the
        // store (and its directory lock) goes with the last one. Closing
        // it commits what is queued, as writes already handed to the
        // kernel survive a kill -9.
        release(running.store).await;
    }
}

/// Drops the last handle of `store` once openraft's winding-down tasks
/// dropped theirs (bounded): the directory's lock goes with it.
async fn release(store: Arc<Store>) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while Arc::strong_count(&store) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "store still referenced"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(store);
}

struct Cluster {
    _dirs: tempfile::TempDir,
    nodes: BTreeMap<NodeId, Node>,
    members: BTreeMap<NodeId, SocketAddr>,
}

impl Cluster {
    /// Three nodes, four groups, each group's voters all three nodes,
    /// group `g` initialised on node `g % 3 + 1`.
    async fn start() -> Cluster {
        let dirs = tempfile::tempdir().unwrap();
        let mut nodes = BTreeMap::new();
        let mut members = BTreeMap::new();
        // Ports first (servers bound on port 0), then the groups.
        let mut pending = Vec::new();
        for id in 1..=3u64 {
            let groups = Arc::new(Groups::default());
            let (port, server) = serve(0, Arc::clone(&groups)).await;
            members.insert(id, SocketAddr::from(([127, 0, 0, 1], port)));
            pending.push((id, port, groups, server));
        }
        for (id, port, groups, server) in pending {
            let dir = dirs.path().join(format!("node{id}"));
            let (store, sms, logs) = open_groups(id, &dir, Arc::clone(&groups), &members)
                .await
                .unwrap();
            nodes.insert(
                id,
                Node {
                    id,
                    dir,
                    port,
                    running: Some(Running {
                        store,
                        groups,
                        sms,
                        logs,
                        server,
                    }),
                },
            );
        }
        let voters: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr.to_string())))
            .collect();
        for group in 0..GROUPS {
            let initialiser = u64::from(group % 3 + 1);
            nodes[&initialiser]
                .raft(group)
                .initialize(voters.clone())
                .await
                .unwrap();
        }
        Cluster {
            _dirs: dirs,
            nodes,
            members,
        }
    }

    fn node(&mut self, id: NodeId) -> &mut Node {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Waits (bounded) until the running nodes agree on a leader of
    /// `group` that a quorum acknowledged; returns it.
    async fn leader(&self, group: GroupId) -> NodeId {
        let rafts: Vec<(NodeId, ShardRaft)> = self
            .nodes
            .values()
            .filter(|n| n.running.is_some())
            .map(|n| (n.id, n.raft(group)))
            .collect();
        agreed_leader(&rafts).await
    }

    /// Writes `count` keys `<prefix>-<group>-<i>` to every group through
    /// its leader; the last index acknowledged per group.
    async fn write(&self, prefix: &str, count: usize) -> BTreeMap<GroupId, u64> {
        let mut last = BTreeMap::new();
        for group in 0..GROUPS {
            let leader = self.nodes[&self.leader(group).await].raft(group);
            for i in 0..count {
                let written = leader
                    .client_write(Command::Put {
                        key: format!("{prefix}-{group}-{i}"),
                        value: format!("value {prefix} {i}").into_bytes(),
                    })
                    .await
                    .unwrap();
                assert_eq!(written.data, Outcome::Stored);
                last.insert(group, written.log_id.index);
            }
        }
        last
    }

    /// Waits until every running node applied `last` of each group.
    async fn applied(&self, last: &BTreeMap<GroupId, u64>) {
        for node in self.nodes.values().filter(|n| n.running.is_some()) {
            for (group, index) in last {
                node.raft(*group)
                    .wait(Some(BOUND))
                    .applied_index_at_least(Some(*index), "applied")
                    .await
                    .unwrap();
            }
        }
    }

    /// Every running replica of every group holds `prefix`'s keys and the
    /// same digest.
    fn assert_replicas_hold(&self, prefix: &str, count: usize) {
        for group in 0..GROUPS {
            let mut digests = Vec::new();
            for node in self.nodes.values().filter(|n| n.running.is_some()) {
                let sm = node.sm(group);
                for i in 0..count {
                    assert_eq!(
                        sm.get(format!("{prefix}-{group}-{i}").as_bytes())
                            .as_deref(),
                        Some(format!("value {prefix} {i}").as_bytes()),
                        "node {} group {group} key {i}",
                        node.id
                    );
                }
                digests.push((node.id, sm.digest()));
            }
            assert!(
                digests.windows(2).all(|w| w[0].1 == w[1].1),
                "group {group}: {digests:?}"
            );
        }
    }

    async fn shutdown(mut self) {
        for node in self.nodes.values_mut() {
            if node.running.is_some() {
                node.stop().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_commit_everywhere_and_a_restarted_node_recovers_and_catches_up() {
    let mut cluster = Cluster::start().await;
    let last = cluster.write("a", 20).await;
    cluster.applied(&last).await;
    cluster.assert_replicas_hold("a", 20);
    // Deletes are decided in log order, through the WAL-backed log too.
    let leader = cluster.nodes[&cluster.leader(0).await].raft(0);
    let deleted = leader
        .client_write(Command::Delete {
            key: "a-0-0".into(),
        })
        .await
        .unwrap();
    assert_eq!(deleted.data, Outcome::Deleted { found: true });
    let again = leader
        .client_write(Command::Delete {
            key: "a-0-0".into(),
        })
        .await
        .unwrap();
    assert_eq!(again.data, Outcome::Deleted { found: false });
    leader
        .client_write(Command::Put {
            key: "a-0-0".into(),
            value: b"value a 0".to_vec(),
        })
        .await
        .unwrap();

    // Node 2 dies; what it had durably is noted first.
    // (From the log, not the metrics: metrics may show a vote whose save
    // was still in flight, which nothing acted on yet.)
    let mut before = BTreeMap::new();
    for group in 0..GROUPS {
        let mut log = cluster.nodes[&2].running().logs[&group].clone();
        let vote = log.read_vote().await.unwrap().unwrap();
        let last = log
            .get_log_state()
            .await
            .unwrap()
            .last_log_id
            .map(|id| id.index);
        before.insert(group, (vote.leader_id().term, last));
    }
    cluster.node(2).stop().await;
    let while_down = cluster.write("b", 10).await;

    // Back from its dir: the vote and log it had are there at once,
    // before any leader talks to it.
    let members = cluster.members.clone();
    cluster.node(2).start(&members).await;
    for group in 0..GROUPS {
        let mut log = cluster.nodes[&2].running().logs[&group].clone();
        let vote = log.read_vote().await.unwrap().unwrap();
        let last = log
            .get_log_state()
            .await
            .unwrap()
            .last_log_id
            .map(|id| id.index);
        let (term, last_index) = before[&group];
        assert!(vote.leader_id().term >= term, "group {group}: vote");
        assert!(last >= last_index, "group {group}: log");
        // openraft started from them.
        cluster.nodes[&2]
            .raft(group)
            .wait(Some(BOUND))
            .metrics(
                |m| m.vote.leader_id().term >= term && m.last_log_index >= last_index,
                "recovered vote and log",
            )
            .await
            .unwrap();
        assert!(
            cluster.nodes[&2].running().logs[&group].log_entries() > 0,
            "group {group}: log entries recovered"
        );
    }
    cluster.applied(&while_down).await;
    cluster.assert_replicas_hold("a", 20);
    cluster.assert_replicas_hold("b", 10);
    cluster.shutdown().await;
}

/// A node whose disk is full (every log write answered `ENOSPC` through
/// the store's test hook) keeps its groups alive: openraft sees a slow
/// log, not a storage error. It acknowledges nothing it did not persist
/// (the leaders' matched index for it stays where it was), the other two
/// commit without it, and once there is room its held records are written
/// and it catches up, also across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_full_disk_lags_without_failing_and_catches_up() {
    const FULL: NodeId = 3;
    let mut cluster = Cluster::start().await;
    let before = cluster.write("a", 5).await;
    cluster.applied(&before).await;

    let no_room = Arc::new(AtomicBool::new(true));
    let hook_no_room = Arc::clone(&no_room);
    cluster.nodes[&FULL]
        .running()
        .store
        .set_log_hook(Box::new(move |event| {
            if event == Event::BeforeWrite && hook_no_room.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            Ok(())
        }));
    let last = cluster.write("b", 10).await;
    // Writing made the full node's log thread meet the disk.
    let store = Arc::clone(&cluster.nodes[&FULL].running().store);
    let deadline = tokio::time::Instant::now() + BOUND;
    while !matches!(store.writable(), Err(StoreError::DiskFull { .. })) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            store.writable()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for group in 0..GROUPS {
        let raft = cluster.nodes[&FULL].raft(group);
        let metrics = raft.metrics();
        let running = metrics.borrow_watched().running_state.clone();
        assert!(running.is_ok(), "group {group} stopped: {running:?}");
        let leader = cluster.leader(group).await;
        if leader == FULL {
            continue;
        }
        let metrics = cluster.nodes[&leader].raft(group).metrics();
        let matched = metrics
            .borrow_watched()
            .replication
            .as_ref()
            .and_then(|r| r.get(&FULL).cloned())
            .flatten()
            .map(|l| l.index);
        assert!(
            matched < Some(last[&group]),
            "group {group}: node {FULL} acknowledged {matched:?} without room to persist it"
        );
    }

    no_room.store(false, Ordering::SeqCst);
    cluster.applied(&last).await;
    cluster.assert_replicas_hold("b", 10);
    assert!(store.writable().is_ok());
    drop(store);

    // Persisted once room returned: a restart of the node has it all.
    let members = cluster.members.clone();
    cluster.node(FULL).stop().await;
    let more = cluster.write("c", 3).await;
    cluster.node(FULL).start(&members).await;
    cluster.applied(&more).await;
    cluster.assert_replicas_hold("b", 10);
    cluster.assert_replicas_hold("c", 3);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start().await;
    // Concurrent writers on every group; record what was acknowledged.
    let mut writers = JoinSet::new();
    for group in 0..GROUPS {
        let leader = cluster.nodes[&cluster.leader(group).await].raft(group);
        for writer in 0..4 {
            let raft = leader.clone();
            writers.spawn(async move {
                let mut acked = Vec::new();
                for i in 0..25 {
                    let key = format!("w-{group}-{writer}-{i}");
                    let value = format!("{writer}/{i}").into_bytes();
                    raft.client_write(Command::Put {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .await
                    .unwrap();
                    acked.push((group, key, value));
                }
                acked
            });
        }
    }
    let mut acked = Vec::new();
    while let Some(done) = writers.join_next().await {
        acked.extend(done.unwrap());
    }
    assert_eq!(acked.len(), GROUPS as usize * 4 * 25);

    for id in 1..=3 {
        cluster.node(id).stop().await;
    }
    let members = cluster.members.clone();
    for id in [3, 1, 2] {
        cluster.node(id).start(&members).await;
    }
    for group in 0..GROUPS {
        let leader_id = cluster.leader(group).await;
        let leader = cluster.nodes[&leader_id].raft(group);
        // A read-index read: the leader has applied everything committed.
        leader
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .unwrap();
        for (g, key, value) in acked.iter().filter(|(g, _, _)| *g == group) {
            assert_eq!(
                cluster.nodes[&leader_id]
                    .sm(*g)
                    .get(key.as_bytes())
                    .as_deref(),
                Some(value.as_slice()),
                "group {g} key {key} lost"
            );
        }
    }
    // And it still takes writes, replicated everywhere.
    let last = cluster.write("after", 5).await;
    cluster.applied(&last).await;
    cluster.assert_replicas_hold("after", 5);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_receives_a_snapshot_and_ends_identical() {
    let mut cluster = Cluster::start().await;
    let first = cluster.write("a", 10).await;
    cluster.applied(&first).await;
    cluster.node(3).stop().await;

    // The others go on, snapshot and purge the log node 3 would need.
    let last = cluster.write("b", 30).await;
    for group in 0..GROUPS {
        let leader = cluster.nodes[&cluster.leader(group).await].raft(group);
        let index = last[&group];
        leader.trigger().snapshot().await.unwrap();
        leader
            .wait(Some(BOUND))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= index), "snapshot")
            .await
            .unwrap();
        leader.trigger().purge_log(index).await.unwrap();
        leader
            .wait(Some(BOUND))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= index), "purged")
            .await
            .unwrap();
    }

    let members = cluster.members.clone();
    cluster.node(3).start(&members).await;
    cluster.applied(&last).await;
    for group in 0..GROUPS {
        assert!(
            cluster.nodes[&3].sm(group).snapshot_installs() >= 1,
            "group {group}: caught up without a snapshot"
        );
        // The installed snapshot is a file of its own.
        assert!(cluster.nodes[&3].sm(group).snapshot_index() >= Some(last[&group]));
    }
    cluster.assert_replicas_hold("a", 10);
    cluster.assert_replicas_hold("b", 30);

    // Restarted again, node 3 starts from the installed snapshot file.
    cluster.node(3).stop().await;
    cluster.node(3).start(&members).await;
    for group in 0..GROUPS {
        let sm = cluster.nodes[&3].sm(group);
        assert!(sm.applied_index() >= Some(last[&group]), "group {group}");
        assert_eq!(sm.snapshot_installs(), 0);
    }
    cluster.assert_replicas_hold("b", 30);
    cluster.shutdown().await;
}

/// One node, one single-voter group: writes, two snapshots, more writes.
async fn solo(dir: &Path) -> Result<(ShardRaft, ShardSm, GroupLog, Arc<Store>), StorageError> {
    let store = Arc::new(Store::open(dir, store_options(FsyncPolicy::Never)).unwrap());
    let storage = NodeStorage::open(Arc::clone(&store), dir)?;
    let (log, sm) = storage.group(7)?;
    let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
    let raft: ShardRaft = Raft::new(
        1,
        config,
        Network::new().factory(7),
        log.clone(),
        sm.clone(),
    )
    .await
    .unwrap();
    Ok((raft, sm, log, store))
}

async fn put_n(raft: &ShardRaft, from: usize, to: usize) -> u64 {
    let mut last = 0;
    for i in from..to {
        last = raft
            .client_write(Command::Put {
                key: format!("k{i}"),
                value: format!("v{i}").into_bytes(),
            })
            .await
            .unwrap()
            .log_id
            .index;
    }
    last
}

async fn snapshot(raft: &ShardRaft, index: u64) {
    raft.trigger().snapshot().await.unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= index), "snapshot")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_newest_snapshot_falls_back_to_the_previous_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, sm, log, store) = solo(dir.path()).await.unwrap();
    raft.initialize(BTreeMap::from([(1, BasicNode::default())]))
        .await
        .unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.state.is_leader(), "leader")
        .await
        .unwrap();
    let first = put_n(&raft, 0, 20).await;
    snapshot(&raft, first).await;
    let second = put_n(&raft, 20, 40).await;
    snapshot(&raft, second).await;
    // openraft may purge up to the newest snapshot; the log keeps what
    // follows the previous generation.
    raft.trigger().purge_log(second).await.unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= second), "purged")
        .await
        .unwrap();
    assert_eq!(log.purged_index(), Some(first));
    put_n(&raft, 40, 50).await;
    let snaps: Vec<_> = std::fs::read_dir(sm.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    raft.shutdown().await.unwrap();
    drop((raft, sm, log));
    release(store).await;

    // Damage the newest file (a flipped byte in its last record).
    let shard_dir = dir.path().join("shards").join("7");
    let newest = shard_dir.join(format!("snap-1-{second}.snap"));
    let mut bytes = std::fs::read(&newest).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0xff;
    std::fs::write(&newest, &bytes).unwrap();

    let (raft, sm, log, store) = solo(dir.path()).await.unwrap();
    // The newest file was skipped; openraft re-applied the log after the
    // previous one.
    assert_eq!(sm.snapshot_index(), Some(first), "fell back one generation");
    assert!(sm.applied_index() > Some(second));
    raft.wait(Some(BOUND))
        .metrics(|m| m.state.is_leader(), "leader")
        .await
        .unwrap();
    raft.ensure_linearizable(ReadPolicy::ReadIndex)
        .await
        .unwrap();
    for i in 0..50 {
        assert_eq!(
            sm.get(format!("k{i}").as_bytes()).as_deref(),
            Some(format!("v{i}").as_bytes()),
            "k{i}"
        );
    }
    raft.shutdown().await.unwrap();
    drop((raft, sm, log));
    release(store).await;

    // Both generations damaged: a clear error, no silent empty shard.
    for entry in std::fs::read_dir(&shard_dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::write(&path, b"KVSHARD1 torn").unwrap();
    }
    match solo(dir.path()).await {
        Err(error @ StorageError::SnapshotUnusable { .. }) => {
            let message = error.to_string();
            assert!(message.contains("shard 7"), "{message}");
            assert!(
                message.contains("bad magic") || message.contains("truncated"),
                "{message}"
            );
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("opened a shard whose snapshots are all damaged"),
    }
}

mod suite {
    //! openraft's own storage test suite against GroupLog + ShardSm.
    use super::*;
    use openraft::testing::log::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<kv_raft::KvRaft, GroupLog, ShardSm, (tempfile::TempDir, Arc<Store>)> for Builder {
        async fn build(
            &self,
        ) -> Result<
            ((tempfile::TempDir, Arc<Store>), GroupLog, ShardSm),
            openraft::StorageError<kv_raft::KvRaft>,
        > {
            let dir = tempfile::tempdir().unwrap();
            let store =
                Arc::new(Store::open(dir.path(), store_options(FsyncPolicy::Never)).unwrap());
            let storage = NodeStorage::open(Arc::clone(&store), dir.path()).unwrap();
            let (log, sm) = storage.group(0).unwrap();
            Ok(((dir, store), log, sm))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite_passes() {
        Suite::test_all(Builder).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_snapshots_a_group_whose_log_passes_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, sm, log, store) = solo(dir.path()).await.unwrap();
    raft.initialize(BTreeMap::from([(1, BasicNode::default())]))
        .await
        .unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.state.is_leader(), "leader")
        .await
        .unwrap();
    let groups = vec![(log.clone(), sm.clone(), raft.clone())];
    let scheduler = kv_raft::SnapshotScheduler::new(1 << 10);
    // Under the bound: nothing to do.
    put_n(&raft, 0, 5).await;
    assert_eq!(scheduler.tick(&groups).await, None);
    // Over it: this group, whose snapshot then covers everything applied.
    let last = put_n(&raft, 5, 200).await;
    assert!(log.log_bytes() > 1 << 10);
    assert_eq!(scheduler.tick(&groups).await, Some(7));
    assert!(sm.snapshot_index() >= Some(last));
    // Nothing new since: under the bound again.
    assert_eq!(scheduler.tick(&groups).await, None);
    raft.shutdown().await.unwrap();
    drop((raft, sm, log, groups));
    release(store).await;
}

mod log_recovery {
    //! GroupLog straight over the WAL, without openraft's core: every
    //! call's effect is what a reopened store hands back.
    use super::*;
    use openraft::alias::{EntryOf, LogIdOf, VoteOf};
    use openraft::storage::{IOFlushed, RaftSnapshotBuilder, RaftStateMachine};
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::{RaftLeaderId, RaftLeaderIdExt, RaftVote};
    use openraft::EntryPayload;

    fn log_id(term: u64, index: u64) -> LogIdOf<kv_raft::KvRaft> {
        LogIdOf::<kv_raft::KvRaft>::new(
            <kv_raft::KvRaft as openraft::RaftTypeConfig>::LeaderId::new_committed(term, 1),
            index,
        )
    }

    fn entry(term: u64, index: u64) -> EntryOf<kv_raft::KvRaft> {
        EntryOf::<kv_raft::KvRaft> {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Command::Put {
                key: format!("k{index}"),
                value: vec![b'x'; index as usize],
            }),
        }
    }

    async fn append(log: &mut GroupLog, entries: Vec<EntryOf<kv_raft::KvRaft>>) {
        let (tx, rx) = kv_raft::KvRaft::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    async fn open(dir: &Path) -> (GroupLog, ShardSm, Arc<Store>) {
        let store = Arc::new(Store::open(dir, store_options(FsyncPolicy::Never)).unwrap());
        let storage = NodeStorage::open(Arc::clone(&store), dir).unwrap();
        let (log, sm) = storage.group(3).unwrap();
        (log, sm, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reopened_store_gives_back_vote_committed_purge_and_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut sm, store) = open(dir.path()).await;
        append(&mut log, (1..=5).map(|i| entry(1, i)).collect()).await;
        // The state machine applies and snapshots up to 3 (a purge needs
        // a snapshot below it, or a restart could not replay).
        let applied = (1..=3).map(|i| Ok((entry(1, i), None)));
        sm.apply(futures_util::stream::iter(applied)).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        append(&mut log, (6..=10).map(|i| entry(1, i)).collect()).await;
        // A new leader overwrites the suffix after 7.
        log.truncate_after(Some(log_id(1, 7))).await.unwrap();
        append(&mut log, (8..=9).map(|i| entry(2, i)).collect()).await;
        log.purge(log_id(1, 3)).await.unwrap();
        let vote = VoteOf::<kv_raft::KvRaft>::from_leader_id(
            <kv_raft::KvRaft as openraft::RaftTypeConfig>::LeaderId::new(2, 1),
            true,
        );
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(log_id(2, 8))).await.unwrap();
        let bytes = log.log_bytes();
        assert!(bytes > 0);
        drop((log, sm));
        store.close();
        drop(store);

        let (mut log, sm, store) = open(dir.path()).await;
        assert_eq!(sm.applied_index(), Some(3));
        assert_eq!(sm.get(b"k2").as_deref(), Some(&b"xx"[..]));
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 8)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
        assert_eq!(state.last_log_id, Some(log_id(2, 9)));
        let entries = log.try_get_log_entries(0..100).await.unwrap();
        let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
        let mut expected: Vec<_> = (4..=7).map(|i| log_id(1, i)).collect();
        expected.extend((8..=9).map(|i| log_id(2, i)));
        assert_eq!(ids, expected);
        assert_eq!(entries, {
            let mut e: Vec<_> = (4..=7).map(|i| entry(1, i)).collect();
            e.extend((8..=9).map(|i| entry(2, i)));
            e
        });
        assert_eq!(log.log_bytes(), bytes);
        drop((log, sm));
        store.close();
    }
}

/// The WAL segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("wal-") && n.ends_with(".log"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_entries_let_wal_segments_go_and_a_restart_still_has_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        wal_max_bytes: 64 << 10,
        ..store_options(FsyncPolicy::Never)
    };
    let store = Arc::new(Store::open(dir.path(), options.clone()).unwrap());
    let storage = NodeStorage::open(Arc::clone(&store), dir.path()).unwrap();
    let (log, sm) = storage.group(0).unwrap();
    drop(storage);
    let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
    let raft: ShardRaft = Raft::new(1, config, Network::new().factory(0), log.clone(), sm)
        .await
        .unwrap();
    raft.initialize(BTreeMap::from([(1, BasicNode::default())]))
        .await
        .unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.state.is_leader(), "leader")
        .await
        .unwrap();
    let write = |from: usize, to: usize| {
        let raft = raft.clone();
        async move {
            let mut last = 0;
            for i in from..to {
                last = raft
                    .client_write(Command::Put {
                        key: format!("k{i}"),
                        value: vec![(i % 251) as u8; 1024],
                    })
                    .await
                    .unwrap()
                    .log_id
                    .index;
            }
            last
        }
    };
    write(0, 300).await;
    let first = write(300, 310).await;
    snapshot(&raft, first).await;
    let second = write(310, 320).await;
    snapshot(&raft, second).await;
    raft.trigger().purge_log(second).await.unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= second), "purged")
        .await
        .unwrap();
    assert_eq!(log.purged_index(), Some(first));
    let before = segments(dir.path());
    assert!(before.len() > 2, "{before:?}");
    // The store's next rotation retires what only purged entries pin.
    let s = Arc::clone(&store);
    tokio::task::spawn_blocking(move || s.snapshot_now())
        .await
        .unwrap()
        .unwrap();
    let after = segments(dir.path());
    assert!(
        after.first() > before.first() && after.len() < before.len(),
        "before {before:?}, after {after:?}"
    );
    raft.shutdown().await.unwrap();
    drop((raft, log));
    release(store).await;

    // Nothing a reader needs went with them.
    let (raft, sm, log, store) = solo_at(dir.path(), 0, options).await;
    raft.wait(Some(BOUND))
        .metrics(|m| m.state.is_leader(), "leader")
        .await
        .unwrap();
    raft.ensure_linearizable(ReadPolicy::ReadIndex)
        .await
        .unwrap();
    assert_eq!(sm.len(), 320);
    for i in 0..320 {
        assert_eq!(
            sm.get(format!("k{i}").as_bytes()).as_deref(),
            Some(&vec![(i % 251) as u8; 1024][..]),
            "k{i}"
        );
    }
    raft.shutdown().await.unwrap();
    drop((raft, sm, log));
    release(store).await;
}

async fn solo_at(
    dir: &Path,
    group: GroupId,
    options: StoreOptions,
) -> (ShardRaft, ShardSm, GroupLog, Arc<Store>) {
    let store = Arc::new(Store::open(dir, options).unwrap());
    let storage = NodeStorage::open(Arc::clone(&store), dir).unwrap();
    let (log, sm) = storage.group(group).unwrap();
    let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
    let raft: ShardRaft = Raft::new(
        1,
        config,
        Network::new().factory(group),
        log.clone(),
        sm.clone(),
    )
    .await
    .unwrap();
    (raft, sm, log, store)
}
