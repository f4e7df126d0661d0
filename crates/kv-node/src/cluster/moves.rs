//! Executing moves, dropping replicas that left, and leaving the cluster
//! for good (issue 13, `docs/membership.md` §4.4, §4.5, §5).
//!
//! * **The executor** ([`execute`]): one task per node scans the shards it
//!   hosts every [`TICK`]. For each shard this node leads it builds the pure
//!   executor's inputs from the applied cluster state and the group's
//!   metrics ([`kv_cluster::next_step`]: `ShardWork`, `GroupMembership`,
//!   `Replication`) and performs the one step returned, in a task of its own
//!   bounded by [`STEP_BOUND`] (one at a time per shard: a shard whose step
//!   is still running is skipped). Nothing is remembered between steps but
//!   counters and the progress shown by `GET /-/cluster`: a restarted node,
//!   or the next leader, resumes from what the group's log and the metadata
//!   state say. Polling (rather than waking on every metrics change) keeps
//!   one cheap look per shard per tick, whatever the write load.
//! * **Drops** ([`ClusterNode::drop_unplaced`], §5): run by the metadata task
//!   right after it applied a state (so a replica it just created for a new
//!   move is never dropped from an older view): a hosted replica that
//!   [`kv_cluster::may_drop`] allows is removed from the transport's groups,
//!   its slot emptied (requests for the shard then take the not-hosted path:
//!   forwarded, or 421, never a stale copy), its Raft shut down, and its
//!   storage dropped (`NodeStorage::drop_group`).
//! * **Removal** ([`ClusterNode::leave_for_good`], §4.5): a node that sees
//!   itself `Removed` writes the [`REMOVED_MARKER`] file in its data dir
//!   (which refuses any later start there), drops every group it hosts, and
//!   asks the server to stop: the process exits 0. A node removed while it
//!   was down is no longer in the metadata group to hear it: on a restart
//!   it asks the members' `GET /-/cluster` in the background
//!   ([`ask_if_removed`]) and leaves the same way.
//!
//! The failpoint `--move-pause-joint-shard S` (tests): once this process
//! appended the joint membership of shard `S`, its executor stops working
//! on `S` for the rest of the process's life, so a test can kill the leader
//! between the joint and the uniform entries.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kv_cluster::meta::{ClusterState, MemberState, MetaCommand, Outcome};
use kv_cluster::{
    next_step, GroupMembership, MoveProgress, ReplicaView, Replication, ShardWork, Step, Wait,
};
use kv_raft::{Command, NodeId};
use openraft::async_runtime::WatchReceiver;
use openraft::raft::Precondition;
use openraft::{BasicNode, ChangeMembers, EntryPayload, Membership, ServerState};

use super::{ClusterNode, Hosted};

/// How often the executor looks at every hosted shard.
const TICK: Duration = Duration::from_millis(200);
/// How long one step may take (a snapshot, a membership change committing).
const STEP_BOUND: Duration = Duration::from_secs(10);
/// How long a step waits for this node to apply the state it reported.
const APPLIED_BOUND: Duration = Duration::from_secs(2);
/// A move waiting this long for the same reason is shown as stalled.
const STALLED_AFTER: Duration = Duration::from_secs(30);
/// The key of the no-op a purge step writes (a DELETE of a key no client
/// can name: paths under `/-/` are the API's), so that each snapshot it
/// triggers has a new index and a new generation (kv-raft purges only up to
/// the older of the two generations it keeps).
const NO_OP_KEY: &str = "-/moves/no-op";
/// The file whose presence refuses a start on a removed node's data dir.
pub(crate) const REMOVED_MARKER: &str = "removed";

/// A removed node's data dir: the start is refused (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RemovedNode(pub String);

/// The executor's settings and what it counts (module docs).
pub(crate) struct Moves {
    /// `--max-moves`: applied by this node while it leads the metadata group.
    pub(crate) max_moves: u32,
    /// `--move-pause-joint-shard`.
    pause_joint_shard: Option<u32>,
    /// The failpoint fired.
    paused: AtomicBool,
    /// Shards whose step is running.
    busy: Mutex<BTreeSet<u32>>,
    /// Per shard led here with an admitted move: what `GET /-/cluster` shows.
    progress: Mutex<BTreeMap<u32, Progress>>,
    /// Steps performed here (not waits).
    pub(crate) steps: AtomicU64,
    /// Moves this node's executor finished (its `Done` changed the state).
    pub(crate) finished: AtomicU64,
    /// Replicas this node dropped.
    pub(crate) dropped: AtomicU64,
    /// The node is leaving the cluster for good.
    exiting: AtomicBool,
    /// Told once the node is removed and has dropped its groups.
    removed: tokio::sync::Notify,
    /// Metadata leader: removed members still in the metadata group, with
    /// when they were first seen removed and the leader's last log index then.
    pub(crate) forgetting: Mutex<BTreeMap<NodeId, (Instant, u64)>>,
    /// Removed members the transport forgot.
    pub(crate) forgotten: Mutex<BTreeSet<NodeId>>,
}

/// One move's progress as its executor sees it.
#[derive(Debug, Clone)]
struct Progress {
    move_id: u64,
    add: NodeId,
    /// Snapshot bytes sent to `add` before the learner was added.
    baseline: Option<u64>,
    /// The current wait as a reason (what `stalled` says), since when it
    /// has not changed, and what shows progress within it.
    waiting: Option<Waiting>,
}

/// A wait the executor keeps seeing ([`ClusterNode::note_progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    /// The reason, in words without the figures that change as it goes on
    /// (a learner's catch-up target grows with every write).
    reason: String,
    /// The reason as shown, with its latest figures.
    shown: String,
    /// What changes when the move advances within the same reason (a
    /// learner's matched index, and the snapshot bytes sent to it while it
    /// answers): a change restarts the clock, so a slow but live copy is
    /// not stalled.
    advance: (Option<u64>, u64),
    since: Instant,
}

impl Moves {
    pub(crate) fn new(max_moves: u32, pause_joint_shard: Option<u32>) -> Self {
        Self {
            max_moves,
            pause_joint_shard,
            paused: AtomicBool::new(false),
            busy: Mutex::new(BTreeSet::new()),
            progress: Mutex::new(BTreeMap::new()),
            steps: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            exiting: AtomicBool::new(false),
            removed: tokio::sync::Notify::new(),
            forgetting: Mutex::new(BTreeMap::new()),
            forgotten: Mutex::new(BTreeSet::new()),
        }
    }
}

/// What the executor reads from one group's metrics.
struct Observed {
    membership: GroupMembership,
    replication: Replication,
    /// The effective membership's log id (the precondition of changes).
    log_id: Option<openraft::alias::LogIdOf<kv_raft::KvRaft>>,
    /// Every node of the effective membership with its address.
    nodes: BTreeMap<NodeId, BasicNode>,
}

/// The targets a leader heard from (an acknowledged heartbeat) within
/// `lease`; empty on a node that does not lead.
pub(crate) fn heard_within(
    m: &openraft::RaftMetrics<kv_raft::KvRaft>,
    lease: Duration,
) -> BTreeSet<NodeId> {
    m.heartbeat
        .as_ref()
        .map(|heartbeat| {
            heartbeat
                .iter()
                .filter(|(_, at)| {
                    at.as_ref()
                        .is_some_and(|at| openraft::Instant::elapsed(&**at) < lease)
                })
                .map(|(id, _)| *id)
                .collect()
        })
        .unwrap_or_default()
}

fn observe(hosted: &Hosted, lease: Duration) -> Observed {
    let metrics = hosted.raft.metrics();
    let m = metrics.borrow_watched();
    let stored = &m.membership_config;
    let log_id = *stored.log_id();
    let index = log_id.as_ref().map(|l| l.index);
    let membership = stored.membership();
    let matched = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    let live = heard_within(&m, lease);
    Observed {
        membership: GroupMembership {
            log_index: index.unwrap_or(0),
            committed: index <= m.local_committed.as_ref().map(|l| l.index),
            configs: membership.get_joint_config().clone(),
            learners: membership.learner_ids().collect(),
        },
        replication: Replication {
            leading: m.state == ServerState::Leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            purged: m.purged.as_ref().map(|l| l.index),
            matched,
            live,
        },
        log_id,
        nodes: membership
            .nodes()
            .map(|(id, node)| (*id, node.clone()))
            .collect(),
    }
}

/// Starts the executor (module docs).
pub(crate) fn execute(node: &Arc<ClusterNode>) {
    if node.meta().is_none() {
        return;
    }
    let weak = Arc::downgrade(node);
    let task = node.runtime.spawn(async move {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if node.stopping.load(Relaxed) || node.moves.exiting.load(Relaxed) {
                return;
            }
            let Some(state) = node.cluster_state() else {
                continue;
            };
            node.scan(&state);
        }
    });
    node.keep_task(task);
}

impl ClusterNode {
    /// One look at every hosted shard: starts the step of each shard this
    /// node leads that has one and none running.
    fn scan(self: &Arc<Self>, state: &Arc<ClusterState>) {
        let lease = Duration::from_millis(self.timeouts.election_max_ms);
        let me = self.id();
        let mut led = BTreeSet::new();
        for (shard, hosted) in self.hosted.all() {
            if self.moves.paused.load(Relaxed) && self.moves.pause_joint_shard == Some(shard) {
                continue;
            }
            let Some(work) = state.work(shard) else {
                continue;
            };
            let observed = observe(&hosted, lease);
            if !observed.replication.leading {
                continue;
            }
            led.insert(shard);
            let step = next_step(&work, &observed.membership, &observed.replication, me);
            self.note_progress(&work, &step, &observed.replication.live);
            match step {
                Step::Idle => {}
                Step::Wait(wait) => {
                    log::debug!("shard {shard}: move waits: {wait:?}");
                }
                step => {
                    if !self
                        .moves
                        .busy
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(shard)
                    {
                        continue;
                    }
                    let move_id = work.open.map_or(0, |mv| mv.id);
                    let node = Arc::clone(self);
                    let state = Arc::clone(state);
                    self.runtime.spawn(async move {
                        let performed = tokio::time::timeout(
                            STEP_BOUND,
                            node.perform(shard, move_id, &hosted, &state, step.clone(), observed),
                        )
                        .await;
                        match performed {
                            Ok(Ok(())) => {}
                            Ok(Err(why)) => {
                                log::info!("shard {shard}: move {move_id}: {step:?} failed: {why}")
                            }
                            Err(_) => log::info!(
                                "shard {shard}: move {move_id}: {step:?} not done within {STEP_BOUND:?}"
                            ),
                        }
                        node.moves
                            .busy
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&shard);
                    });
                }
            }
        }
        // Progress is shown by the shard's leader only.
        self.moves
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|shard, _| led.contains(shard));
    }

    /// Keeps the progress of `work`'s move (module docs): the wait `step`
    /// is, if any, with `live` (the targets heard within the lease) telling
    /// a learner that is down from one that is copying.
    fn note_progress(&self, work: &ShardWork<'_>, step: &Step, live: &BTreeSet<NodeId>) {
        let sent = self.network.snapshot_throttle().bytes_sent();
        let mut progress = self
            .moves
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(mv) = work
            .open
            .filter(|mv| mv.phase != kv_cluster::Phase::Planned)
        else {
            progress.remove(&work.shard);
            return;
        };
        let entry = progress.entry(work.shard).or_insert_with(|| Progress {
            move_id: mv.id,
            add: mv.add,
            baseline: None,
            waiting: None,
        });
        if entry.move_id != mv.id {
            *entry = Progress {
                move_id: mv.id,
                add: mv.add,
                baseline: None,
                waiting: None,
            };
        }
        match step {
            Step::Wait(wait) => {
                let (reason, shown, advance) = match *wait {
                    Wait::CatchUp { id, matched, .. } => {
                        if live.contains(&id) {
                            let advance = (matched, sent.get(&id).copied().unwrap_or(0));
                            (format!("learner {id} catching up"), describe(wait), advance)
                        } else {
                            // Bytes are counted as a snapshot is sent, so
                            // openraft's retries to a node that is down
                            // would look like progress.
                            let reason = format!("learner {id} unreachable");
                            (reason.clone(), reason, (matched, 0))
                        }
                    }
                    _ => (describe(wait), describe(wait), (None, 0)),
                };
                match &mut entry.waiting {
                    Some(was) if was.reason == reason && was.advance == advance => {
                        was.shown = shown;
                    }
                    waiting => {
                        *waiting = Some(Waiting {
                            reason,
                            shown,
                            advance,
                            since: Instant::now(),
                        });
                    }
                }
            }
            _ => entry.waiting = None,
        }
    }

    /// The moves this node executes, for `GET /-/cluster` (module docs).
    pub(crate) fn local_progress(&self) -> Vec<MoveProgress> {
        let progress = self
            .moves
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let sent = self.network.snapshot_throttle().bytes_sent();
        progress
            .into_iter()
            .map(|(shard, p)| {
                let bytes = p
                    .baseline
                    .map(|base| sent.get(&p.add).copied().unwrap_or(0).saturating_sub(base));
                let total_bytes = self
                    .hosted(shard)
                    .and_then(|hosted| newest_snapshot_size(hosted.sm.dir()));
                MoveProgress {
                    shard,
                    move_id: p.move_id,
                    bytes,
                    total_bytes: bytes.and(total_bytes),
                    stalled: p.waiting.and_then(|waiting| {
                        let waited = waiting.since.elapsed();
                        (waited >= STALLED_AFTER)
                            .then(|| format!("{} for {}s", waiting.shown, waited.as_secs()))
                    }),
                }
            })
            .collect()
    }

    /// Performs one step of `shard`'s move (module docs).
    async fn perform(
        self: &Arc<Self>,
        shard: u32,
        move_id: u64,
        hosted: &Hosted,
        state: &ClusterState,
        step: Step,
        observed: Observed,
    ) -> Result<(), String> {
        let raft = &hosted.raft;
        let precondition = || Precondition::LastMembershipLogId {
            last_membership_log_id: observed.log_id,
        };
        self.moves.steps.fetch_add(1, Relaxed);
        match step {
            Step::Idle | Step::Wait(_) => {}
            Step::RemoveLearners { ids } => {
                log::info!("shard {shard}: removing learners {ids:?} no move wants");
                raft.change_membership_if(ChangeMembers::RemoveNodes(ids), false, [precondition()])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Step::Propose(cmd) => {
                let done = matches!(cmd, MetaCommand::Done { .. });
                log::info!("shard {shard}: move {move_id}: reporting {cmd:?}");
                let outcome = self.propose(cmd, false).await.map_err(|e| e.to_string())?;
                self.applied(outcome.version()).await;
                if done && matches!(outcome, Outcome::Changed { .. }) {
                    self.moves.finished.fetch_add(1, Relaxed);
                    log::info!(
                        "shard {shard}: move {move_id} done at version {}",
                        outcome.version()
                    );
                }
            }
            Step::PurgeLog { through } => {
                // A snapshot that already covers `through` was built by an
                // earlier round whose purge openraft has not done yet (it
                // waits while a follower, perhaps a down one, still
                // replicates those entries): ask again for the same purge,
                // which openraft treats as already scheduled. A new snapshot
                // now would make openraft schedule its own purge (snapshot
                // minus `max_in_snapshot_log_to_keep`) below the pending
                // one, which trips its `update_purge_upto` debug assertion
                // and kills the group's Raft core in debug builds.
                let built = raft.metrics().borrow_watched().snapshot.map(|s| s.index);
                if let Some(index) = built.filter(|index| *index >= through) {
                    // Asked again every round until openraft purges: once
                    // at info (below) is enough.
                    log::debug!("shard {shard}: move {move_id}: purge through {index} asked again");
                    raft.trigger()
                        .purge_log(index)
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(());
                }
                log::info!(
                    "shard {shard}: move {move_id}: snapshot and purge the log through {through} \
                     before adding the learner"
                );
                // A new index first, so the snapshot is a new generation.
                raft.client_write(Command::Delete {
                    key: NO_OP_KEY.to_owned(),
                })
                .await
                .map_err(|e| e.to_string())?;
                let applied = hosted.sm.applied_index().unwrap_or(0);
                raft.trigger().snapshot().await.map_err(|e| e.to_string())?;
                let snapshot = raft
                    .wait(Some(STEP_BOUND / 2))
                    .metrics(
                        |m| m.snapshot.is_some_and(|s| s.index >= applied),
                        "snapshot built",
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .snapshot
                    .map_or(0, |s| s.index);
                raft.trigger()
                    .purge_log(snapshot)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Step::AddLearner { id } => {
                let addr = state
                    .members
                    .get(&id)
                    .map(|m| m.addr.clone())
                    .ok_or_else(|| format!("node {id} is not a member"))?;
                log::info!("shard {shard}: move {move_id}: adding node {id} as a learner");
                let sent = self
                    .network
                    .snapshot_throttle()
                    .bytes_sent()
                    .get(&id)
                    .copied()
                    .unwrap_or(0);
                if let Some(progress) = self
                    .moves
                    .progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_mut(&shard)
                {
                    progress.baseline = Some(sent);
                }
                raft.add_learner(id, BasicNode::new(addr), false)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Step::HandOver { to } => {
                log::info!(
                    "shard {shard}: move {move_id}: this node leaves the group; handing \
                     leadership to node {to}"
                );
                hosted
                    .transfer_leader(to)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Step::Joint { command, old, new } => {
                // Gated: appended only if the metadata group applied the
                // phase for this very move (exec module docs).
                let outcome = self
                    .propose(command, false)
                    .await
                    .map_err(|e| format!("the joint phase was not accepted: {e}"))?;
                self.applied(outcome.version()).await;
                log::info!("shard {shard}: move {move_id}: joint membership {old:?} + {new:?}");
                let configs = vec![
                    old.iter().copied().collect::<BTreeSet<_>>(),
                    new.iter().copied().collect::<BTreeSet<_>>(),
                ];
                let joint = Membership::new(configs, observed.nodes).map_err(|e| e.to_string())?;
                raft.append_membership(joint, EntryPayload::Blank, [precondition()])
                    .await
                    .map_err(|e| e.to_string())?;
                if self.moves.pause_joint_shard == Some(shard) {
                    self.moves.paused.store(true, Relaxed);
                    log::warn!(
                        "shard {shard}: --move-pause-joint-shard: the executor stops here for \
                         this shard"
                    );
                }
            }
            Step::ToGoal { goal } => {
                log::info!("shard {shard}: move {move_id}: membership to the goal {goal:?}");
                let goal: BTreeSet<NodeId> = goal.into_iter().collect();
                raft.change_membership_if(goal, false, [precondition()])
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Waits (bounded) until this node applied cluster state `version`, so
    /// the next step is decided from a state that has the report just made
    /// (else the same report would be made again, and refused).
    async fn applied(&self, version: u64) {
        let deadline = Instant::now() + APPLIED_BOUND;
        while self
            .cluster_state()
            .is_none_or(|state| state.version < version)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drops every hosted replica the applied state no longer places here
    /// (module docs). Run by the metadata task after it applied a state.
    pub(crate) async fn drop_unplaced(&self) {
        let Some(state) = self.cluster_state() else {
            return;
        };
        let me = self.id();
        for (shard, hosted) in self.hosted.all() {
            let view = {
                let metrics = hosted.raft.metrics();
                let m = metrics.borrow_watched();
                ReplicaView {
                    membership_log_index: m
                        .membership_config
                        .log_id()
                        .as_ref()
                        .map_or(0, |l| l.index),
                    leading: m.state == ServerState::Leader,
                }
            };
            if kv_cluster::may_drop(&state, shard, me, view) {
                self.drop_replica(
                    shard,
                    &format!("not placed here at version {}", state.version),
                )
                .await;
            }
        }
    }

    /// Stops hosting `shard` and deletes its replica.
    async fn drop_replica(&self, shard: u32, why: &str) {
        let Some(hosted) = self.hosted.empty(shard) else {
            return;
        };
        self.forget_recovered(shard);
        self.groups.remove(shard);
        if tokio::time::timeout(Duration::from_secs(5), hosted.raft.shutdown())
            .await
            .is_err()
        {
            log::warn!("shard {shard}: the dropped replica did not shut down within 5 s");
        }
        match self.storage.drop_group(shard).await {
            Ok(()) => {
                self.moves.dropped.fetch_add(1, Relaxed);
                log::info!("shard {shard}: replica dropped ({why})");
            }
            Err(error) => log::error!("shard {shard}: dropping the replica: {error}"),
        }
    }

    /// Whether `state` says this node was removed.
    pub(crate) fn removed_in(&self, state: &ClusterState) -> bool {
        state
            .members
            .get(&self.id())
            .is_some_and(|m| m.state == MemberState::Removed)
    }

    /// This node was removed at `version` (module docs): marker, drops,
    /// stop.
    pub(crate) async fn leave_for_good(&self, version: u64) {
        if self.moves.exiting.swap(true, Relaxed) {
            return;
        }
        let message = format!(
            "node {} was removed from the cluster at version {version}",
            self.id(),
        );
        log::info!("{message}; exiting");
        let dir = self.data_dir.clone();
        let marker = message.clone();
        let written = tokio::task::spawn_blocking(move || write_marker(&dir, &marker)).await;
        if !matches!(written, Ok(Ok(()))) {
            log::error!("cannot write {REMOVED_MARKER} in the data dir: {written:?}");
        }
        for shard in self.group_ids() {
            self.drop_replica(shard, "this node was removed").await;
        }
        self.moves.removed.notify_one();
    }

    /// Resolves once this node was removed and is ready to exit.
    pub async fn removed(&self) {
        self.moves.removed.notified().await;
    }
}

/// How long a restarted node keeps asking the members whether it was
/// removed while it was down, and how often.
const ASK_REMOVED_FOR: Duration = Duration::from_secs(60);
const ASK_REMOVED_EVERY: Duration = Duration::from_secs(2);

/// A node removed while it was down never hears of it from the metadata
/// group (the leader took it out of the group): at start, it asks the
/// members' `GET /-/cluster` in the background until one answers, and
/// leaves for good if that view says it was removed (design §4.5; in the
/// background rather than before serving, so a restart of the whole
/// cluster does not wait on members that are down too).
pub(crate) fn ask_if_removed(node: &Arc<ClusterNode>) {
    if node.meta().is_none() {
        return;
    }
    let weak = Arc::downgrade(node);
    let task = node.runtime.spawn(async move {
        let deadline = Instant::now() + ASK_REMOVED_FOR;
        while Instant::now() < deadline {
            let Some(node) = weak.upgrade() else { return };
            if node.stopping.load(Relaxed) || node.moves.exiting.load(Relaxed) {
                return;
            }
            let me = node.id();
            let members: Vec<(NodeId, String)> = node
                .layout()
                .members
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, _)| (*id, node.peer_addr(*id).unwrap_or_default()))
                .collect();
            for (peer, addr) in members {
                let Ok(request) = hyper::Request::get("/-/cluster")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                else {
                    return;
                };
                let Ok(answer) = node
                    .forwarder
                    .send(&addr, request, Duration::from_secs(1))
                    .await
                else {
                    continue;
                };
                if answer.status != hyper::StatusCode::OK {
                    continue;
                }
                let Ok(view) = serde_json::from_slice::<kv_cluster::ClusterView>(&answer.body)
                else {
                    continue;
                };
                let removed = view
                    .members
                    .iter()
                    .any(|m| m.id == me && m.state == MemberState::Removed);
                if removed {
                    log::info!("node {peer} says this node was removed while it was down");
                    node.leave_for_good(view.version).await;
                }
                // One member's view settles it.
                return;
            }
            drop(node);
            tokio::time::sleep(ASK_REMOVED_EVERY).await;
        }
    });
    node.keep_task(task);
}

/// Writes the removal marker durably (file, then directory).
fn write_marker(dir: &Path, message: &str) -> io::Result<()> {
    let path = dir.join(REMOVED_MARKER);
    let tmp = dir.join(format!("{REMOVED_MARKER}.tmp"));
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(message.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Refuses a start on the data dir of a removed node.
pub(crate) fn check_not_removed(dir: &Path) -> io::Result<()> {
    match std::fs::read_to_string(dir.join(REMOVED_MARKER)) {
        Ok(message) => Err(io::Error::other(RemovedNode(format!(
            "{}; ids are never reused: start a new node with a new --node-id and an empty \
             data dir (this one is {})",
            message.trim(),
            dir.display()
        )))),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// Size of the newest snapshot file (`snap-<term>-<index>.snap`) in a
/// shard's directory.
fn newest_snapshot_size(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|item| {
            let name = item.file_name().to_string_lossy().into_owned();
            let (term, index) = name
                .strip_prefix("snap-")?
                .strip_suffix(".snap")?
                .split_once('-')?;
            let position = (term.parse::<u64>().ok()?, index.parse::<u64>().ok()?);
            Some((position, item.metadata().ok()?.len()))
        })
        .max()
        .map(|(_, len)| len)
}

/// A wait, in words (the `stalled` field).
fn describe(wait: &Wait) -> String {
    match wait {
        Wait::NotLeader => "no leader".into(),
        Wait::Committed => "membership not committed".into(),
        Wait::Admission => "not admitted".into(),
        Wait::CatchUp {
            id,
            matched,
            target,
        } => format!(
            "learner {id} catching up (matched {}, needs {target})",
            matched.map_or_else(|| "nothing".to_owned(), |m| m.to_string())
        ),
        Wait::HandOverTarget => "no caught-up voter to hand leadership to".into(),
        Wait::LiveCopies { live, needed } => {
            format!("{live} live copies in the goal, {needed} needed")
        }
        Wait::Membership => "the group's membership is not the state's".into(),
    }
}
