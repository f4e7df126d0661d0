//! The metadata group on this node (`docs/membership.md` §3.2-§3.4).
//!
//! Every member of a cluster with `--replicas 2` or more hosts group
//! [`METADATA_GROUP`]: its state machine holds the replicated
//! [`ClusterState`] (members, placement, moves, version). Here:
//!
//! * **Bootstrap** ([`initialise`], [`follow`]): the lowest member id of
//!   `cluster.json` (a founding member, not one that joined later)
//!   initialises the group with [`meta_voters`] of the founding members, and
//!   then proposes `Bootstrap` from `cluster.json` until a state is applied.
//!   `Bootstrap` of a non-empty state changes nothing, so a restart, or a
//!   crash between `initialize` and the proposal, simply repeats it. The
//!   other members wait to be replicated to (voters) or added as learners.
//! * **Following** ([`follow`]): a task per node watches the group's applied
//!   index; on each new state it creates (uninitialised) the groups of the
//!   shards this node now hosts (a leader's `add_learner` then finds them
//!   ready) and swaps the node's [`Layout`] whole. Idempotent: a restart
//!   diffs against nothing.
//! * **Leading** (the scheduler, design §4.3): while this node leads the
//!   metadata group, every [`LEAD_EVERY`] it adds every member that is not
//!   removed as a learner of the group (a joining node then catches up on
//!   the state) and proposes everything [`kv_cluster::schedule`] returns:
//!   `Activate` for caught-up joiners, `Admit` for planned moves within
//!   `--max-moves` into members heard from within the leader lease (the
//!   group's heartbeat acks), `Forget` for leaving members that hold
//!   nothing. Then the group's own voters follow [`meta_voters`] of the
//!   state (a leaving voter swapped out), and removed members leave the
//!   group once they applied their removal (bounded wait). Moves themselves
//!   are executed by each shard's leader ([`super::moves`]).
//!   It also drops replicas the new state no longer places here
//!   and, on a node that sees itself removed, leaves for good
//!   ([`super::moves`]); removed members are forgotten by the transport
//!   only once the metadata group no longer lists them (the leader must
//!   still tell them they were removed).
//! * **Proposals from any node** ([`ClusterNode::propose`]): `client_write`
//!   here when this node leads; else forwarded once to the leader's
//!   `POST /-/meta/propose` (a JSON [`MetaCommand`]), which answers the
//!   [`meta::Outcome`] or a typed refusal. 503 when there is no leader or
//!   quorum (nothing proposed), 504 when the outcome is unknown.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use kv_cluster::meta::{self, ClusterId, ClusterState, MemberState, MetaCommand, Refusal};
use kv_cluster::{meta_voters, LiveInfo, Settings};
use kv_raft::types::METADATA_GROUP;
use kv_raft::{Command, NodeId, Outcome, Raft};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, InitializeError, RaftError};
use openraft::raft::Precondition;
use openraft::{BasicNode, ServerState};

use super::forward::ForwardError;
use super::layout::Layout;
use super::request::{ReadGate, FORWARDED_BY_HEADER};
use super::{storage, watch, ClusterNode, Hosted};
use crate::error::MembershipError;

/// How often the follower looks at the group (a poll of two atomics; the
/// state is decoded only when the applied index moved).
const POLL: Duration = Duration::from_millis(100);
/// How often the leader re-checks learners and joiners.
const LEAD_EVERY: Duration = Duration::from_millis(500);
/// How long the metadata leader waits for a removed member to apply its
/// removal before taking it out of the group anyway (design §4.5).
const FORGET_WAIT: Duration = Duration::from_secs(10);
/// The path proposals are forwarded to.
pub(crate) const PROPOSE_PATH: &str = "/-/meta/propose";

impl ClusterNode {
    /// The metadata group's replica here (`None` with `--replicas 1`).
    pub(crate) fn meta(&self) -> Option<&Arc<Hosted>> {
        self.meta.as_ref()
    }

    /// The cluster state this node applied last (`None` before the first).
    pub(crate) fn cluster_state(&self) -> Option<Arc<ClusterState>> {
        self.layout().state.clone()
    }

    /// The metadata group's leader as this node knows it.
    pub(crate) fn meta_leader(&self) -> Option<NodeId> {
        self.meta()?.raft.metrics().borrow_watched().current_leader
    }

    /// The metadata group's voters in the membership this node knows.
    pub(crate) fn meta_voters_now(&self) -> Option<std::collections::BTreeSet<NodeId>> {
        let metrics = self.meta()?.raft.metrics();
        let m = metrics.borrow_watched();
        Some(m.membership_config.membership().voter_ids().collect())
    }

    /// Whether this node leads the metadata group without a quorum ack
    /// within the leader lease (as [`ClusterNode::unavailable`] judges a
    /// shard's leader).
    fn leads_without_quorum(&self, meta: &Hosted) -> bool {
        let lease = Duration::from_millis(self.timeouts.election_max_ms);
        let metrics = meta.raft.metrics();
        let m = metrics.borrow_watched();
        m.state == ServerState::Leader
            && m.last_quorum_acked
                .as_ref()
                .is_none_or(|at| openraft::Instant::elapsed(&**at) >= lease)
    }

    /// Whether this node founded the cluster's metadata group: the lowest
    /// member id of `cluster.json`, created with `--peers` (not `--join`).
    fn founder(&self) -> bool {
        let stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        !stored.joined && stored.spec.members.keys().next() == Some(&self.id())
    }

    /// `Bootstrap` from `cluster.json` (design §3.3), once the cluster id is
    /// known (the founder always knows it: it created it).
    fn bootstrap_command(&self) -> Option<MetaCommand> {
        let cluster_id: ClusterId = self.cluster_id.get()?.parse().ok()?;
        Some(MetaCommand::Bootstrap {
            cluster_id,
            shards: self.spec.shards,
            replicas: self.spec.replicas,
            members: self.spec.members.clone(),
        })
    }

    /// Proposes `cmd` to the metadata group: here when this node leads it,
    /// else at its leader, once (module docs). `forwarded`: the request came
    /// from another node, so it is not forwarded again.
    pub(crate) async fn propose(
        &self,
        cmd: MetaCommand,
        forwarded: bool,
    ) -> Result<meta::Outcome, MembershipError> {
        let meta = self
            .meta()
            .ok_or(MembershipError::Refused(Refusal::SingleReplica))?;
        if self.leads_without_quorum(meta) {
            // It would append and wait out the timeout: 504 for a command
            // that cannot commit. Refused before proposing instead.
            return Err(MembershipError::NoLeader);
        }
        let written = tokio::time::timeout(
            self.write_timeout,
            meta.raft.client_write(Command::Meta(cmd.clone())),
        )
        .await;
        let forward = match written {
            Err(_) => {
                return Err(MembershipError::Unknown(format!(
                    "not committed within {:?}",
                    self.write_timeout
                )))
            }
            Ok(Ok(response)) => {
                return match response.data {
                    Outcome::Meta(Ok(outcome)) => Ok(outcome),
                    Outcome::Meta(Err(refusal)) => Err(MembershipError::Refused(refusal)),
                    other => Err(MembershipError::Unknown(format!(
                        "the metadata group answered {other:?}"
                    ))),
                }
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => forward,
            Ok(Err(RaftError::APIError(error))) => {
                log::debug!("metadata proposal not confirmed: {error}");
                return Err(MembershipError::Unknown(
                    "the metadata leader changed before the change was confirmed".into(),
                ));
            }
            Ok(Err(RaftError::Fatal(error))) => {
                log::warn!("metadata group: {error}");
                return Err(MembershipError::NoLeader);
            }
        };
        let leader = match forward.leader_id {
            Some(leader) if leader != self.id() && !forwarded => leader,
            _ => return Err(MembershipError::NoLeader),
        };
        let addr = self
            .peer_addr(leader)
            .or_else(|| forward.leader_node.map(|node| node.addr))
            .ok_or(MembershipError::NoLeader)?;
        let body = serde_json::to_vec(&cmd)
            .map_err(|error| MembershipError::BadRequest(error.to_string()))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(PROPOSE_PATH)
            .header(FORWARDED_BY_HEADER, self.id())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| MembershipError::BadRequest(error.to_string()))?;
        let answer = self
            .forwarder
            .send(&addr, request, self.write_timeout + Duration::from_secs(1))
            .await;
        match answer {
            Ok(answer) => proposal_answer(answer.status, &answer.body),
            Err(ForwardError::NotSent(why) | ForwardError::OtherCluster { theirs: why, .. }) => {
                log::debug!("metadata proposal not sent to node {leader} at {addr}: {why}");
                Err(MembershipError::NoLeader)
            }
            Err(ForwardError::Lost(why)) => Err(MembershipError::Unknown(format!(
                "forwarded to the metadata leader, node {leader}: {why}"
            ))),
        }
    }
}

/// What the leader's `POST /-/meta/propose` answer means (see
/// [`MembershipError::into_response`] for its shape).
fn proposal_answer(status: StatusCode, body: &[u8]) -> Result<meta::Outcome, MembershipError> {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if status == StatusCode::OK {
        return serde_json::from_value(json.get("outcome").cloned().unwrap_or_default()).map_err(
            |error| {
                MembershipError::Unknown(format!(
                    "the metadata leader's answer is unreadable: {error}"
                ))
            },
        );
    }
    if let Ok(refusal) =
        serde_json::from_value::<Refusal>(json.get("refusal").cloned().unwrap_or_default())
    {
        return Err(MembershipError::Refused(refusal));
    }
    match status {
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::MISDIRECTED_REQUEST => {
            Err(MembershipError::NoLeader)
        }
        _ => Err(MembershipError::Unknown(format!(
            "the metadata leader answered {status}: {}",
            json.get("error").and_then(|e| e.as_str()).unwrap_or("")
        ))),
    }
}

/// What the metadata leader's round reads from the group's metrics.
struct MetaObserved {
    /// Every node of the group's membership (voters and learners).
    known: BTreeSet<NodeId>,
    voters: BTreeSet<NodeId>,
    joint: bool,
    log_id: Option<openraft::alias::LogIdOf<kv_raft::KvRaft>>,
    committed: bool,
    last: u64,
    matched: BTreeMap<NodeId, Option<u64>>,
    caught_up: BTreeSet<NodeId>,
    live: BTreeSet<NodeId>,
}

/// Initialises the metadata group on the founder when it is not (design
/// §3.3): voters [`meta_voters`] of the founding members, the others added as
/// learners by the leader later.
pub(crate) async fn initialise(node: &ClusterNode) -> io::Result<()> {
    let Some(meta) = node.meta() else {
        return Ok(());
    };
    if !node.founder() {
        return Ok(());
    }
    let initialized = meta
        .raft
        .is_initialized()
        .await
        .map_err(|error| io::Error::other(format!("metadata group: {error}")))?;
    if initialized {
        return Ok(());
    }
    let founding = ClusterState::from_spec(&node.spec, ClusterId::default());
    let voters: BTreeMap<NodeId, BasicNode> = meta_voters(&founding)
        .into_iter()
        .map(|id| {
            let addr = node.spec.members.get(&id).cloned().unwrap_or_default();
            (id, BasicNode::new(addr))
        })
        .collect();
    log::info!(
        "metadata group: initialised with voters {:?} (this node has the lowest member id)",
        voters.keys().collect::<Vec<_>>()
    );
    match meta.raft.initialize(voters).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(error) => Err(io::Error::other(format!(
            "initialising the metadata group: {error}"
        ))),
    }
}

/// Starts the metadata task (module docs).
pub(crate) fn follow(node: &Arc<ClusterNode>) {
    if node.meta().is_none() {
        return;
    }
    let weak = Arc::downgrade(node);
    let task = node.runtime.spawn(async move {
        let mut ticks = tokio::time::interval(POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_applied = None;
        let mut bad_state_logged = false;
        let mut last_lead = None::<Instant>;
        loop {
            ticks.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if node.stopping.load(Relaxed) {
                return;
            }
            let Some(meta) = node.meta().cloned() else {
                return;
            };
            let applied = meta.sm.applied_index();
            if applied != seen_applied {
                seen_applied = applied;
                match meta.sm.cluster_state() {
                    Ok(Some(state)) if !state.is_empty() => {
                        let removed = node.removed_in(&state);
                        if removed {
                            node.leave_for_good(state.version).await;
                            return;
                        }
                        if !node.apply_state(state).await {
                            // A replica could not be hosted: again next tick.
                            seen_applied = None;
                        }
                        // In this task, after the hosting: a replica just
                        // created for a move is never dropped from an
                        // older view.
                        node.drop_unplaced().await;
                    }
                    Ok(_) => {}
                    Err(error) if !bad_state_logged => {
                        bad_state_logged = true;
                        log::error!(
                            "metadata group: the applied cluster state is unreadable: {error}"
                        );
                    }
                    Err(_) => {}
                }
            }
            if last_lead.is_none_or(|at| at.elapsed() >= LEAD_EVERY) {
                last_lead = Some(Instant::now());
                node.bootstrap_if_empty().await;
                node.lead(&meta).await;
                node.forget_removed(&meta);
            }
        }
    });
    node.keep_task(task);
}

impl ClusterNode {
    /// The founder proposes `Bootstrap` while no state is applied (design
    /// §3.3); a repeat is a no-op, a failure is tried again next round.
    async fn bootstrap_if_empty(&self) {
        if self.cluster_state().is_some() || !self.founder() {
            return;
        }
        let Some(cmd) = self.bootstrap_command() else {
            return;
        };
        match self.propose(cmd, false).await {
            Ok(outcome) => log::info!(
                "metadata group: bootstrapped from cluster.json (version {})",
                outcome.version()
            ),
            Err(error) => log::debug!("metadata group: bootstrap not applied yet: {error}"),
        }
    }

    /// This node's round as the metadata leader (module docs); nothing when
    /// it does not lead.
    async fn lead(&self, meta: &Hosted) {
        let Some(state) = self.cluster_state() else {
            return;
        };
        let lease = Duration::from_millis(self.timeouts.election_max_ms);
        let me = self.id();
        let observed = {
            let metrics = meta.raft.metrics();
            let m = metrics.borrow_watched();
            if m.state != ServerState::Leader {
                return;
            }
            let last = m.last_log_index;
            let matched: BTreeMap<NodeId, Option<u64>> = m
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .map(|(id, matched)| (*id, matched.as_ref().map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default();
            let caught_up: BTreeSet<NodeId> = matched
                .iter()
                .filter(|(_, matched)| **matched >= last)
                .map(|(id, _)| *id)
                .collect();
            // Heard from within the leader lease: a move into any other
            // member would hold a slot of the throttle copying to nobody.
            let mut live = super::moves::heard_within(&m, lease);
            live.insert(me);
            let membership = m.membership_config.membership();
            MetaObserved {
                known: membership.nodes().map(|(id, _)| *id).collect(),
                voters: membership.voter_ids().collect(),
                joint: membership.get_joint_config().len() > 1,
                log_id: *m.membership_config.log_id(),
                committed: m.membership_config.log_id().as_ref().map(|l| l.index)
                    <= m.local_committed.as_ref().map(|l| l.index),
                last: last.unwrap_or(0),
                matched,
                caught_up,
                live,
            }
        };
        // Every member that applies the state and is not in the group yet
        // (a new one): a learner, so it catches up on the state.
        for (&id, member) in &state.members {
            if member.state == MemberState::Removed || observed.known.contains(&id) {
                continue;
            }
            let added = tokio::time::timeout(
                self.write_timeout,
                meta.raft
                    .add_learner(id, BasicNode::new(member.addr.clone()), false),
            )
            .await;
            match added {
                Ok(Ok(_)) => log::info!(
                    "metadata group: node {id} at {} added as a learner",
                    member.addr
                ),
                Ok(Err(error)) => log::debug!("metadata group: adding learner {id}: {error}"),
                Err(_) => log::debug!("metadata group: adding learner {id} timed out"),
            }
        }
        let live = LiveInfo {
            meta_caught_up: observed.caught_up.clone(),
            live: observed.live.clone(),
        };
        let settings = Settings {
            max_moves: self.moves.max_moves,
            ..Settings::default()
        };
        for cmd in kv_cluster::schedule(&state, settings, &live) {
            let what = match &cmd {
                MetaCommand::Activate { id } => {
                    format!("node {id} caught up on the metadata group: active")
                }
                MetaCommand::Admit { shard, move_id } => {
                    let mv = state.moves.get(shard);
                    format!(
                        "shard {shard}: move {move_id} admitted (node {} in, node {} out)",
                        mv.map_or(0, |mv| mv.add),
                        mv.map_or(0, |mv| mv.remove)
                    )
                }
                MetaCommand::Forget { id } => format!("node {id} holds nothing any more: removed"),
                other => format!("{other:?}"),
            };
            match self.propose(cmd, false).await {
                Ok(outcome @ meta::Outcome::Changed { .. }) => {
                    log::info!("{what} at version {}", outcome.version())
                }
                Ok(_) => {}
                Err(error) => log::debug!("{what}: not applied: {error}"),
            }
        }
        self.change_meta_voters(meta, &state, &observed).await;
        self.remove_forgotten(meta, &state, &observed).await;
    }

    /// The metadata group's own voters follow [`meta_voters`] of the state
    /// (design §4.5: a leaving voter is swapped out, an active member takes
    /// its seat). Every voter-to-be is a caught-up learner first (the round
    /// adds every member as one); a leader that is not among them hands its
    /// leadership to one that is, which then makes the change. The removed
    /// voters stay learners (`retain`) until they are forgotten.
    async fn change_meta_voters(
        &self,
        meta: &Hosted,
        state: &ClusterState,
        observed: &MetaObserved,
    ) {
        let want = meta_voters(state);
        if want.is_empty() || want == observed.voters || observed.joint || !observed.committed {
            return;
        }
        let me = self.id();
        if !want
            .iter()
            .all(|id| *id == me || observed.caught_up.contains(id))
        {
            return;
        }
        if !want.contains(&me) {
            let target = want
                .iter()
                .copied()
                .find(|id| observed.voters.contains(id) && observed.live.contains(id))
                .or_else(|| want.iter().copied().find(|id| observed.live.contains(id)));
            if let Some(target) = target {
                if meta.transfer_leader(target).await.is_ok() {
                    log::info!(
                        "metadata group: this node is no voter of {want:?}; handing leadership \
                         to node {target}"
                    );
                }
            }
            return;
        }
        let changed = tokio::time::timeout(
            self.write_timeout,
            meta.raft.change_membership_if(
                want.clone(),
                true,
                [Precondition::LastMembershipLogId {
                    last_membership_log_id: observed.log_id,
                }],
            ),
        )
        .await;
        match changed {
            Ok(Ok(_)) => log::info!("metadata group: voters {:?} -> {want:?}", observed.voters),
            Ok(Err(error)) => log::debug!("metadata group: changing voters to {want:?}: {error}"),
            Err(_) => log::debug!("metadata group: changing voters to {want:?} timed out"),
        }
    }

    /// Removed members leave the metadata group (design §4.5) once they
    /// applied their removal (their replica matched the leader's last index
    /// when the removal was first seen here), or after [`FORGET_WAIT`]: a
    /// removed node that is down would hold them forever.
    async fn remove_forgotten(&self, meta: &Hosted, state: &ClusterState, observed: &MetaObserved) {
        let removed: Vec<NodeId> = state
            .with_state(MemberState::Removed)
            .filter(|id| observed.known.contains(id) && !observed.voters.contains(id))
            .collect();
        let ready: BTreeSet<NodeId> = {
            let mut forgetting = self
                .moves
                .forgetting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            forgetting.retain(|id, _| removed.contains(id));
            removed
                .iter()
                .copied()
                .filter(|id| {
                    let (since, index) = *forgetting
                        .entry(*id)
                        .or_insert((Instant::now(), observed.last));
                    observed.matched.get(id).copied().flatten() >= Some(index)
                        || since.elapsed() >= FORGET_WAIT
                })
                .collect()
        };
        if ready.is_empty() || observed.joint || !observed.committed {
            return;
        }
        let changed = tokio::time::timeout(
            self.write_timeout,
            meta.raft.change_membership_if(
                openraft::ChangeMembers::RemoveNodes(ready.clone()),
                false,
                [Precondition::LastMembershipLogId {
                    last_membership_log_id: observed.log_id,
                }],
            ),
        )
        .await;
        match changed {
            Ok(Ok(_)) => {
                log::info!("metadata group: removed nodes {ready:?} left the group");
                for id in ready {
                    self.forget_peer(id);
                }
            }
            Ok(Err(error)) => log::debug!("metadata group: removing {ready:?}: {error}"),
            Err(_) => log::debug!("metadata group: removing {ready:?} timed out"),
        }
    }

    /// The transport drops removed member `id` (once).
    fn forget_peer(&self, id: NodeId) {
        let first = self
            .moves
            .forgotten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
        if first && id != self.id() {
            self.network.forget(id);
        }
    }

    /// Removed members the transport still knows, that the metadata group
    /// no longer lists (so nothing here needs to reach them any more), are
    /// forgotten. Not before: the metadata leader must still replicate their
    /// removal to them, so they learn it and exit.
    fn forget_removed(&self, meta: &Hosted) {
        let Some(state) = self.cluster_state() else {
            return;
        };
        let known: BTreeSet<NodeId> = {
            let metrics = meta.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect()
        };
        for id in state.with_state(MemberState::Removed) {
            if !known.contains(&id) {
                self.forget_peer(id);
            }
        }
    }

    /// Follows an applied state (module docs): hosts the groups it places
    /// here, and when it is newer than the layout, forgets removed members
    /// and swaps the layout. Returns whether every replica it places here
    /// is hosted (else the caller tries again).
    pub(crate) async fn apply_state(self: &Arc<Self>, state: ClusterState) -> bool {
        let old = self.layout();
        let layout = Layout::from_state(state);
        let me = self.id();
        let mut complete = true;
        for shard in layout.groups_of(me) {
            if self.hosted(shard).is_some() {
                continue;
            }
            match self.host_group(shard).await {
                Ok(()) => log::info!(
                    "shard {shard}: hosting a replica from placement version {}",
                    layout.version
                ),
                Err(error) => {
                    complete = false;
                    log::error!("shard {shard}: cannot host a replica: {error}");
                }
            }
        }
        if layout.version <= old.version {
            return complete;
        }
        // Removed members are forgotten by the transport once the metadata
        // group no longer lists them ([`ClusterNode::forget_removed`]).
        if let Some(new) = &layout.state {
            self.network
                .refusals()
                .set_others(new.addresses().len().saturating_sub(1));
        }
        let version = layout.version;
        let members = layout.members.len();
        if self.layout.swap_if_newer(layout) {
            log::info!("placement version {version}: {members} members");
        }
        complete
    }

    /// Creates this node's (uninitialised) replica of `shard`, recovered
    /// from disk if it has one: its leader adds it as a learner.
    async fn host_group(self: &Arc<Self>, shard: u32) -> io::Result<()> {
        let node_storage = Arc::clone(&self.storage);
        let (log, sm) = tokio::task::spawn_blocking(move || storage::group(&node_storage, shard))
            .await
            .map_err(io::Error::other)??;
        let raft = Raft::new(
            self.id(),
            Arc::clone(&self.raft_config),
            self.network.factory(shard),
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|error| io::Error::other(format!("shard {shard}: {error}")))?;
        self.groups.insert(shard, raft.clone());
        self.hosted.fill(
            shard,
            Hosted {
                raft,
                log,
                sm,
                gate: Arc::new(ReadGate::default()),
            },
        );
        watch::follow(self, shard);
        Ok(())
    }
}

/// Opens the metadata group's replica (after the node's storage is open).
pub(crate) async fn open(
    node_id: NodeId,
    node_storage: &Arc<storage::NodeStorage>,
    raft_config: &Arc<openraft::Config>,
    network: &kv_raft::Network,
) -> io::Result<Hosted> {
    let opened = Arc::clone(node_storage);
    let (log, sm) = tokio::task::spawn_blocking(move || storage::group(&opened, METADATA_GROUP))
        .await
        .map_err(io::Error::other)??;
    let raft = Raft::new(
        node_id,
        Arc::clone(raft_config),
        network.factory(METADATA_GROUP),
        log.clone(),
        sm.clone(),
    )
    .await
    .map_err(|error| io::Error::other(format!("metadata group: {error}")))?;
    Ok(Hosted {
        raft,
        log,
        sm,
        gate: Arc::new(ReadGate::default()),
    })
}
