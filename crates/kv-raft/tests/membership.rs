//! Issue 13's openraft calls, over the real storage and HTTP transport
//! (design `docs/membership.md` §2.3): a fourth node added as a learner
//! gets a snapshot, a voter is replaced through joint consensus after its
//! leadership was handed over, a leader that dies in the joint config is
//! finished by the next one, and a removed leader steps down by itself.
//!
//! Each node is in-process with its own data dir (a real kv-store WAL,
//! kv-raft's `NodeStorage`) and a loopback HTTP server for `/-/raft/...`;
//! one group (shard 0). Every wait is bounded; nothing sleeps to
//! synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::{agreed_leader, serve};
use support::{store_options, BOUND};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kv_raft::{
    raft_config, Command, GroupLog, Groups, Network, NodeId, NodeStorage, ShardRaft, ShardSm,
    Timeouts,
};
use kv_store::{FsyncPolicy, Store};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::raft::Precondition;
use openraft::storage::RaftLogReader;
use openraft::{BasicNode, EntryPayload, Membership, Raft, ServerState};
use tokio::task::JoinHandle;

const GROUP: u32 = 0;

/// One running node: its store, the group's handles, its server.
struct Node {
    id: NodeId,
    dir: PathBuf,
    port: u16,
    store: Arc<Store>,
    raft: ShardRaft,
    sm: ShardSm,
    log: GroupLog,
    server: JoinHandle<()>,
}

impl Node {
    /// Opens `dir` (empty or not) and serves group 0, uninitialised unless
    /// its log says otherwise, on `port` (0: any).
    async fn start(id: NodeId, dir: &Path, port: u16) -> Node {
        let groups = Arc::new(Groups::default());
        let (port, server) = serve(port, Arc::clone(&groups)).await;
        let store = Arc::new(Store::open(dir, store_options(FsyncPolicy::Never)).unwrap());
        let storage = NodeStorage::open(Arc::clone(&store), dir).unwrap();
        let (log, sm) = storage.group(GROUP).unwrap();
        let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
        // Peers' addresses come from the group's membership (BasicNode):
        // no route table is needed, which is what lets a fourth node be
        // reached the moment it is added.
        let raft: ShardRaft = Raft::new(
            id,
            config,
            Network::new().factory(GROUP),
            log.clone(),
            sm.clone(),
        )
        .await
        .unwrap();
        groups.insert(GROUP, raft.clone());
        Node {
            id,
            dir: dir.to_path_buf(),
            port,
            store,
            raft,
            sm,
            log,
            server,
        }
    }

    fn addr(&self) -> BasicNode {
        BasicNode::new(format!("127.0.0.1:{}", self.port))
    }

    /// The node dies (as far as the others can tell, a kill): its group
    /// and server stop and its store is released; the dir stays.
    async fn stop(self) -> (NodeId, PathBuf, u16) {
        self.server.abort();
        self.raft.shutdown().await.unwrap();
        let Node {
            id,
            dir,
            port,
            store,
            raft,
            sm,
            log,
            ..
        } = self;
        drop((raft, sm, log));
        let deadline = tokio::time::Instant::now() + BOUND;
        while Arc::strong_count(&store) > 1 {
            assert!(tokio::time::Instant::now() < deadline, "store still held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(store);
        (id, dir, port)
    }

    fn state(&self) -> ServerState {
        self.raft.metrics().borrow_watched().state
    }

    fn membership(&self) -> Membership<NodeId, BasicNode> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .clone()
    }
}

struct Cluster {
    _dirs: tempfile::TempDir,
    nodes: BTreeMap<NodeId, Node>,
}

impl Cluster {
    /// Nodes 1-4 running; group 0 initialised on node 1 with voters 1-3.
    /// Node 4 runs the group uninitialised: it knows nothing yet.
    async fn start() -> Cluster {
        let dirs = tempfile::tempdir().unwrap();
        let mut nodes = BTreeMap::new();
        for id in 1..=4 {
            let dir = dirs.path().join(format!("node{id}"));
            nodes.insert(id, Node::start(id, &dir, 0).await);
        }
        let voters: BTreeMap<NodeId, BasicNode> =
            (1..=3).map(|id| (id, nodes[&id].addr())).collect();
        nodes[&1].raft.initialize(voters).await.unwrap();
        Cluster { _dirs: dirs, nodes }
    }

    fn raft(&self, id: NodeId) -> &ShardRaft {
        &self.nodes[&id].raft
    }

    /// Waits until every node of `among` names the same leader, one of
    /// `among`, and that leader has a quorum's acknowledgement.
    async fn leader(&self, among: &[NodeId]) -> NodeId {
        let rafts: Vec<(NodeId, ShardRaft)> = among
            .iter()
            .map(|id| (*id, self.raft(*id).clone()))
            .collect();
        agreed_leader(&rafts).await
    }

    /// Writes keys `<prefix>-<i>` through `leader`; the last index.
    async fn write(&self, leader: NodeId, prefix: &str, count: usize) -> u64 {
        let mut last = 0;
        for i in 0..count {
            let written = self
                .raft(leader)
                .client_write(Command::Put {
                    key: format!("{prefix}-{i}"),
                    value: format!("value {prefix} {i}").into_bytes(),
                })
                .await
                .unwrap();
            last = written.log_id.index;
        }
        last
    }

    /// Waits until each of `ids` applied `index`, then checks they hold
    /// `prefix`'s keys and agree on the digest.
    async fn holds(&self, ids: &[NodeId], index: u64, prefix: &str, count: usize) {
        let mut digests = Vec::new();
        for id in ids {
            self.raft(*id)
                .wait(Some(BOUND))
                .applied_index_at_least(Some(index), "applied")
                .await
                .unwrap();
            let sm = &self.nodes[id].sm;
            for i in 0..count {
                assert_eq!(
                    sm.get(format!("{prefix}-{i}").as_bytes()).as_deref(),
                    Some(format!("value {prefix} {i}").as_bytes()),
                    "node {id} key {prefix}-{i}"
                );
            }
            digests.push((*id, sm.applied_index(), sm.digest()));
        }
        assert!(
            digests.windows(2).all(|w| w[0].2 == w[1].2),
            "digests differ: {digests:?}"
        );
    }

    /// Snapshot on `leader` and purge its log up to `index`: a node added
    /// from now on can only be brought up to date by a snapshot.
    async fn snapshot_and_purge(&self, leader: NodeId, index: u64) {
        let raft = self.raft(leader);
        raft.trigger().snapshot().await.unwrap();
        raft.wait(Some(BOUND))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= index), "snapshot")
            .await
            .unwrap();
        raft.trigger().purge_log(index).await.unwrap();
        raft.wait(Some(BOUND))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= index), "purged")
            .await
            .unwrap();
    }

    /// Adds node 4 as a learner through `leader` and waits until the
    /// leader's replication to it has matched the leader's last log entry.
    async fn add_learner_4(&self, leader: NodeId) {
        let added = self
            .raft(leader)
            .add_learner(4, self.nodes[&4].addr(), false)
            .await
            .unwrap();
        let membership = added.membership.expect("a membership entry");
        assert_eq!(membership.learner_ids().collect::<Vec<_>>(), vec![4]);
        assert_eq!(voters(&membership), BTreeSet::from([1, 2, 3]));
        self.raft(leader)
            .wait(Some(BOUND))
            .metrics(
                |m| {
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&4).cloned().flatten())
                        .map(|id| id.index);
                    matched.is_some() && matched == m.last_log_index
                },
                "learner 4 caught up",
            )
            .await
            .unwrap();
        assert_eq!(self.nodes[&4].state(), ServerState::Learner);
    }

    async fn shutdown(self) {
        for (_, node) in self.nodes {
            node.stop().await;
        }
    }
}

/// Waits until `raft` (a leader) has committed its effective membership.
/// A leader elected or transferred to may still hold an uncommitted
/// membership entry of its predecessor (the spike met one): a change
/// proposed before it commits is refused with `InProgress`.
async fn membership_committed(raft: &ShardRaft) {
    raft.wait(Some(BOUND))
        .metrics(
            |m| {
                m.membership_config.log_id().as_ref().map(|l| l.index)
                    <= m.local_committed.as_ref().map(|l| l.index)
            },
            "membership committed",
        )
        .await
        .unwrap();
}

fn voters(membership: &Membership<NodeId, BasicNode>) -> BTreeSet<NodeId> {
    membership.voter_ids().collect()
}

/// The membership entries in `log` from `from` on, as their voter sets.
async fn membership_entries(log: &GroupLog, from: u64) -> Vec<Vec<BTreeSet<NodeId>>> {
    let mut log = log.clone();
    let entries = log.try_get_log_entries(from..u64::MAX).await.unwrap();
    entries
        .into_iter()
        .filter_map(|entry| match entry.payload {
            EntryPayload::Membership(m) => Some(m.get_joint_config().clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_gets_a_snapshot_then_replaces_the_leader_through_joint_consensus() {
    let cluster = Cluster::start().await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let last = cluster.write(leader, "a", 300).await;
    cluster.snapshot_and_purge(leader, last).await;

    // Learner add: the log before `last` is gone, so node 4 can only have
    // caught up through a snapshot.
    cluster.add_learner_4(leader).await;
    assert!(
        cluster.nodes[&4].sm.snapshot_installs() >= 1,
        "node 4 caught up without a snapshot"
    );
    cluster.holds(&[1, 2, 3, 4], last, "a", 300).await;

    // Adding it again is harmless: openraft re-adds it (a new membership
    // entry, same membership), so a resumed move may repeat the call.
    let before = cluster
        .raft(leader)
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let again = cluster
        .raft(leader)
        .add_learner(4, cluster.nodes[&4].addr(), false)
        .await
        .unwrap();
    assert_eq!(again.membership.as_ref(), Some(before.membership()));
    assert!(Some(&again.log_id) > before.log_id().as_ref());

    // The leader is the replica leaving: it hands leadership to a replica
    // that stays (caught up: it applied everything above) before the
    // change.
    let target: NodeId = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    cluster
        .raft(leader)
        .trigger()
        .transfer_leader(target)
        .await
        .unwrap();
    cluster
        .raft(target)
        .wait(Some(BOUND))
        .metrics(
            |m| m.state.is_leader() && m.last_quorum_acked.is_some(),
            "the transfer target leads",
        )
        .await
        .unwrap();
    // (Not `leader()`: a node that has not yet heard from the target
    // still names the old leader, and `leader()` would follow it.)
    let new_leader = target;
    for id in [1, 2, 3] {
        cluster
            .raft(id)
            .wait(Some(BOUND))
            .metrics(
                |m| m.current_leader == Some(target),
                "every voter follows the transfer target",
            )
            .await
            .unwrap();
    }

    // The change, compare-and-set on the membership the decision was
    // based on. {1,2,3} -> {1,2,3} - {old leader} + {4}.
    membership_committed(cluster.raft(new_leader)).await;
    let observed = cluster
        .raft(new_leader)
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let goal: BTreeSet<NodeId> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let changed = cluster
        .raft(new_leader)
        .change_membership_if(
            goal.clone(),
            false,
            [Precondition::LastMembershipLogId {
                last_membership_log_id: *observed.log_id(),
            }],
        )
        .await
        .unwrap();
    let uniform = changed.membership.expect("a membership entry");
    assert_eq!(uniform.get_joint_config(), &vec![goal.clone()]);
    assert!(
        uniform.get_node(&leader).is_none(),
        "retain=false forgets the removed voter"
    );

    // It went through joint consensus: the log holds the joint config
    // [{1,2,3}, goal] and then the uniform one.
    let from = observed.log_id().as_ref().unwrap().index + 1;
    let changes = membership_entries(&cluster.nodes[&new_leader].log, from).await;
    assert_eq!(
        changes,
        vec![
            vec![BTreeSet::from([1, 2, 3]), goal.clone()],
            vec![goal.clone()]
        ],
        "joint, then uniform"
    );

    // A second change based on the stale observation writes nothing.
    let stale = cluster
        .raft(new_leader)
        .change_membership_if(
            BTreeSet::from([1, 2, 3]),
            false,
            [Precondition::LastMembershipLogId {
                last_membership_log_id: *observed.log_id(),
            }],
        )
        .await;
    assert!(
        matches!(
            stale,
            Err(RaftError::APIError(ClientWriteError::PreconditionFailed(_)))
        ),
        "{stale:?}"
    );

    // The group goes on with the new voters; node 4 votes now (once the
    // uniform entry reached it: the commit may not have needed it).
    cluster
        .raft(4)
        .wait(Some(BOUND))
        .metrics(|m| m.state == ServerState::Follower, "node 4 a voter")
        .await
        .unwrap();
    let stayed: Vec<NodeId> = goal.iter().copied().collect();
    let after = cluster.write(new_leader, "b", 50).await;
    cluster.holds(&stayed, after, "b", 50).await;

    // The removed node is not told: the leader stopped replicating to it
    // as soon as it appended the uniform config, so its own view still
    // makes it a voter and it never receives the writes made since. It
    // cannot decide by itself to delete its copy, and must not serve from
    // it: kv-node drops it when the metadata group says the move is done.
    let removed = &cluster.nodes[&leader];
    assert!(
        removed.membership().voter_ids().any(|id| id == leader),
        "the removed node sees itself as a voter: {:?}",
        removed.membership()
    );
    assert!(removed.sm.applied_index() < Some(after));
    assert!(removed.sm.get(b"b-49").is_none());
    assert!(!cluster
        .raft(new_leader)
        .metrics()
        .borrow_watched()
        .replication
        .as_ref()
        .unwrap()
        .contains_key(&leader));
    eprintln!(
        "removed node {leader}: state {:?}, membership {}",
        removed.state(),
        removed.membership()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_in_the_joint_config_is_finished_by_the_next_leader() {
    let mut cluster = Cluster::start().await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let last = cluster.write(leader, "a", 100).await;
    cluster.add_learner_4(leader).await;
    cluster.holds(&[4], last, "a", 100).await;

    // The leader writes the joint config itself (append_membership: one
    // entry, exactly this membership) and dies before the uniform one:
    // the state a kill -9 between the two steps leaves.
    let goal: BTreeSet<NodeId> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let observed = cluster.nodes[&leader]
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let nodes: BTreeMap<NodeId, BasicNode> = observed
        .membership()
        .nodes()
        .map(|(id, node)| (*id, node.clone()))
        .collect();
    let joint = Membership::new(vec![BTreeSet::from([1, 2, 3]), goal.clone()], nodes).unwrap();
    cluster
        .raft(leader)
        .append_membership(
            joint,
            EntryPayload::Blank,
            [Precondition::LastMembershipLogId {
                last_membership_log_id: *observed.log_id(),
            }],
        )
        .await
        .unwrap();
    let (id, dir, port) = cluster.nodes.remove(&leader).unwrap().stop().await;

    // An election in the joint config needs a majority of both {1,2,3}
    // (the two left) and of the goal (all three live).
    let others: Vec<NodeId> = goal.iter().copied().collect();
    let next = cluster.leader(&others).await;
    assert_eq!(
        cluster.nodes[&next].membership().get_joint_config().len(),
        2,
        "the new leader is in the joint config"
    );
    // Writes commit in the joint config with one old voter down.
    let during = cluster.write(next, "b", 20).await;
    cluster.holds(&others, during, "b", 20).await;

    // The next leader finishes the change by asking for the goal again:
    // from a joint config openraft goes straight to the uniform goal.
    membership_committed(cluster.raft(next)).await;
    let observed = cluster.nodes[&next]
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let finished = cluster
        .raft(next)
        .change_membership_if(
            goal.clone(),
            false,
            [Precondition::LastMembershipLogId {
                last_membership_log_id: *observed.log_id(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        finished.membership.unwrap().get_joint_config(),
        &vec![goal.clone()]
    );
    let changes = membership_entries(
        &cluster.nodes[&next].log,
        observed.log_id().as_ref().unwrap().index + 1,
    )
    .await;
    assert_eq!(changes, vec![vec![goal.clone()]], "one step, no new joint");

    // The removed leader restarts from its dir: its log ends in the joint
    // config, so it believes it is a voter, but nobody replicates to it
    // and it cannot disturb the group (pre-vote): the group keeps its
    // leader and term while taking writes.
    let term = cluster.raft(next).metrics().borrow_watched().current_term;
    let back = Node::start(id, &dir, port).await;
    back.raft
        .wait(Some(BOUND))
        .metrics(
            |m| m.membership_config.membership().get_joint_config().len() == 2,
            "the restarted node's log ends in the joint config",
        )
        .await
        .unwrap();
    cluster.nodes.insert(id, back);
    let after = cluster.write(next, "c", 200).await;
    cluster.holds(&others, after, "c", 200).await;
    let metrics = cluster.raft(next).metrics().borrow_watched().clone();
    assert_eq!(metrics.current_leader, Some(next));
    assert_eq!(metrics.current_term, term);
    assert!(cluster.nodes[&id].sm.get(b"c-199").is_none());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_removes_itself_steps_down_by_itself() {
    // The safety net under the hand-over: openraft's
    // `removed_leader_step_down` (default After(150 ms)) makes a leader
    // that committed a membership without itself give leadership to an
    // up-to-date voter and become a learner.
    let cluster = Cluster::start().await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    cluster.write(leader, "a", 20).await;
    cluster.add_learner_4(leader).await;
    let goal: BTreeSet<NodeId> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster
        .raft(leader)
        .change_membership(goal.clone(), false)
        .await
        .unwrap();
    let others: Vec<NodeId> = goal.iter().copied().collect();
    let next = cluster.leader(&others).await;
    assert_ne!(next, leader);
    cluster.nodes[&leader]
        .raft
        .wait(Some(BOUND))
        .metrics(
            |m| m.state == ServerState::Learner,
            "the removed leader stepped down to a learner",
        )
        .await
        .unwrap();
    let after = cluster.write(next, "b", 20).await;
    cluster.holds(&others, after, "b", 20).await;
    cluster.shutdown().await;
}
