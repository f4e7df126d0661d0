//! Background work per group: following its metrics, and the balancer.
//!
//! [`follow`] watches one group's metrics: it logs each leader change once
//! at info (`shard 17: leader 2 -> 3 (term 6)`), counts elections, records members this node exchanged Raft traffic with in
//! `cluster.json` (the first-start guard, design §8), and marks the group
//! recovered once its replica applied what was committed before the start
//! (`/-/ready` counts the recovered groups among those hosted now, so a
//! replica a move dropped no longer counts).
//!
//! [`snapshots`] (design §4.3): once a second, kv-raft's snapshot scheduler
//! snapshots the one shard whose log since its last snapshot is largest,
//! when over `--raft-log-max-bytes` (one at a time, so snapshots are
//! staggered); openraft then purges the log behind it, which lets the
//! write-ahead log retire its segments.
//!
//! [`balance`] (design §9): every 2 s, for each shard this node leads whose
//! preferred leader is another replica that is caught up (its matched index
//! equals the leader's last log index) and answered a heartbeat within a
//! lease, hand leadership over; at most 4 per
//! round, and not while the shard's leadership changed within the settling
//! time. Nodes only give away their own leaderships, so there is nothing
//! to coordinate and nothing oscillates.
//!
//! [`check_quorum`]: a leader (of a shard or of the metadata group) that
//! has gone [`quorum_lost_after`] without a quorum's acknowledgement hands
//! its leadership to another replica. A
//! leader whose links are slower than openraft's RPC timeout (which is the
//! heartbeat interval) never sees an answer, so it can neither commit nor
//! serve reads, yet its heartbeats still arrive and keep its followers from
//! electing anyone: without this the shard stays down as long as the link
//! stays slow. Handing over stops its heartbeats, so the replicas that
//! reach each other elect (Raft's "check quorum", which openraft does not
//! do itself).
//!
//! [`disk`] (design §6.7): while the store cannot persist (a full disk),
//! this node stands for no election and hands every leadership it holds to
//! another replica; once the store takes writes again, elections are
//! allowed again (the balancers hand preferred leaderships back once this
//! node has caught up).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use kv_raft::NodeId;
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use super::ClusterNode;

/// Leadership transfers per balancer round.
const TRANSFERS_PER_ROUND: usize = 4;
/// Time between balancer rounds.
const ROUND: Duration = Duration::from_secs(2);

/// Starts following shard `shard`'s metrics.
///
/// openraft publishes the full metrics after every turn of a group's core
/// loop (they carry `millis_since_quorum_ack`, which always changes), so a
/// task waiting on them wakes several times per write. Only recovery and
/// the members seen need the data half; once the group has recovered and
/// every other replica of the shard has been seen, the task waits on the server metrics
/// instead, which change only with the leader, state, vote or membership.
pub(crate) fn follow(node: &Arc<ClusterNode>, shard: u32) {
    let Some(hosted) = node.hosted(shard) else {
        return;
    };
    let mut metrics = hosted.raft.metrics();
    let mut server = hosted.raft.server_metrics();
    // Which replica this task follows: a move may drop it and host a new
    // one of the same shard, which has its own task.
    let replica = Arc::downgrade(&hosted);
    let weak = Arc::downgrade(node);
    let task = node.runtime.spawn(async move {
        let mut seen_leader = LeaderSeen::default();
        let mut recovered = false;
        let mut stopped = false;
        loop {
            let Some(node) = weak.upgrade() else { return };
            let mut seen = Vec::new();
            {
                let m = metrics.borrow_watched();
                let me = m.id;
                if let (Err(fatal), false) = (&m.running_state, stopped) {
                    // Clients are told in our words (request::STOPPED).
                    stopped = true;
                    // A replica dropped after a move (its slot emptied
                    // first) stops on purpose.
                    if !node.stopping.load(Relaxed) && node.hosted(shard).is_some() {
                        log::error!("shard {shard}: the Raft group stopped on this node: {fatal}");
                    }
                }
                if let Some(new) =
                    seen_leader.observe(&node, shard, m.current_leader, m.current_term, m.state)
                {
                    if new != me {
                        seen.push(new);
                    }
                }
                if let Some(replication) = &m.replication {
                    seen.extend(
                        replication
                            .iter()
                            .filter(|(peer, matched)| **peer != me && matched.is_some())
                            .map(|(peer, _)| *peer),
                    );
                }
                if !recovered {
                    let committed = m.cluster_committed.as_ref().map(|l| l.index);
                    let applied = m.last_applied.as_ref().map(|l| l.index);
                    if m.last_log_index.is_none()
                        || (committed >= m.last_log_index && applied >= committed)
                    {
                        recovered = true;
                        node.mark_recovered(shard, &replica);
                    }
                }
            }
            for peer in seen {
                node.note_seen(peer);
            }
            let quiet = recovered && node.seen_all(shard);
            drop(node);
            if quiet {
                break;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
        loop {
            let Some(node) = weak.upgrade() else { return };
            let new = {
                let m = server.borrow_watched();
                let term = m.vote.leader_id().term;
                let new = seen_leader.observe(&node, shard, m.current_leader, term, m.state);
                new.filter(|new| *new != m.id)
            };
            if let Some(new) = new {
                node.note_seen(new);
            }
            drop(node);
            if server.changed().await.is_err() {
                // The group's core is gone: say why once, if it failed.
                if let (Some(node), Err(fatal)) =
                    (weak.upgrade(), &metrics.borrow_watched().running_state)
                {
                    if !stopped && !node.stopping.load(Relaxed) && node.hosted(shard).is_some() {
                        log::error!("shard {shard}: the Raft group stopped on this node: {fatal}");
                    }
                }
                return;
            }
        }
    });
    node.keep_task(task);
}

/// What [`follow`] last saw of a group's leadership.
struct LeaderSeen {
    leader: Option<NodeId>,
    state: ServerState,
}

impl Default for LeaderSeen {
    fn default() -> Self {
        Self {
            leader: None,
            state: ServerState::Learner,
        }
    }
}

impl LeaderSeen {
    /// Logs and counts a leader change and the start of an election;
    /// returns the new leader when it changed.
    fn observe(
        &mut self,
        node: &ClusterNode,
        shard: u32,
        leader: Option<NodeId>,
        term: u64,
        state: ServerState,
    ) -> Option<NodeId> {
        // One per shard of the cluster: always there for a hosted shard.
        let stats = node.shard_stats.get(shard as usize);
        if state == ServerState::Candidate && self.state != ServerState::Candidate {
            if let Some(stats) = stats {
                stats.elections.fetch_add(1, Relaxed);
            }
        }
        self.state = state;
        if leader == self.leader {
            return None;
        }
        let old = self.leader;
        self.leader = leader;
        let new = leader?;
        let old = old.map_or_else(|| "none".to_owned(), |l| l.to_string());
        log::info!("shard {shard}: leader {old} -> {new} (term {term})");
        if let Some(stats) = stats {
            stats.leader_changes.fetch_add(1, Relaxed);
            *stats
                .last_change
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
        Some(new)
    }
}

/// Starts the leader balancer.
pub(crate) fn balance(node: &Arc<ClusterNode>) {
    let weak = Arc::downgrade(node);
    let settle = Duration::from_millis(2 * node.timeouts.election_max_ms);
    let lease = Duration::from_millis(node.timeouts.election_max_ms);
    let task = node.runtime.spawn(async move {
        let mut rounds = tokio::time::interval(ROUND);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            rounds.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if node.stopping.load(Relaxed) {
                return;
            }
            let mut moved = 0;
            let layout = node.layout();
            for shard in node.group_ids() {
                if moved >= TRANSFERS_PER_ROUND {
                    break;
                }
                let preferred = layout.preferred(shard);
                if preferred == node.id() {
                    continue;
                }
                // A move hands leadership away from the replica it removes
                // (issue 13): never back to it.
                let leaving = layout.state.as_ref().is_some_and(|state| {
                    state.moves.get(&shard).is_some_and(|mv| {
                        mv.phase != kv_cluster::Phase::Planned && mv.remove == preferred
                    })
                });
                if leaving {
                    continue;
                }
                let Some(hosted) = node.hosted(shard) else {
                    continue;
                };
                let settled = since_leader_change(&node, shard).is_none_or(|age| age >= settle);
                if !settled {
                    continue;
                }
                let caught_up = {
                    let metrics = hosted.raft.metrics();
                    let m = metrics.borrow_watched();
                    // Heard from within a lease: a preferred leader behind
                    // a link slower than the RPC timeout would lose the
                    // quorum's answers as soon as it led ([`check_quorum`]).
                    let heard = super::moves::heard_within(&m, lease).contains(&preferred);
                    m.state == ServerState::Leader
                        && heard
                        && m.last_log_index.is_some()
                        && m.replication
                            .as_ref()
                            .and_then(|r| r.get(&preferred))
                            .and_then(|matched| matched.as_ref())
                            .map(|l| l.index)
                            == m.last_log_index
                };
                if caught_up && hosted.transfer_leader(preferred).await.is_ok() {
                    log::debug!(
                        "shard {shard}: handing leadership back to preferred leader {preferred}"
                    );
                    moved += 1;
                }
            }
        }
    });
    node.keep_task(task);
}

/// Starts the snapshot scheduler.
pub(crate) fn snapshots(node: &Arc<ClusterNode>, max_log_bytes: u64) {
    let weak = Arc::downgrade(node);
    let scheduler = kv_raft::SnapshotScheduler::new(max_log_bytes);
    let task = node.runtime.spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let groups: Vec<_> = {
                let Some(node) = weak.upgrade() else { return };
                if node.stopping.load(Relaxed) {
                    return;
                }
                // No room for a snapshot file: it would only wait for room.
                if node.disk_full().is_some() {
                    continue;
                }
                // The metadata group too: its log would otherwise only grow.
                node.hosted
                    .all()
                    .into_iter()
                    .map(|(_, hosted)| hosted)
                    .chain(node.meta().cloned())
                    .map(|hosted| (hosted.log.clone(), hosted.sm.clone(), hosted.raft.clone()))
                    .collect()
            };
            if let Some(shard) = scheduler.tick(&groups).await {
                log::debug!("shard {shard}: snapshot taken (log over {max_log_bytes} bytes)");
            }
        }
    });
    node.keep_task(task);
}

/// How long since this node saw `shard`'s leader change (`None`: never).
fn since_leader_change(node: &ClusterNode, shard: u32) -> Option<Duration> {
    node.shard_stats.get(shard as usize).and_then(|stats| {
        stats
            .last_change
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|at| at.elapsed())
    })
}

/// Spawns a transfer of `shard`'s leadership to `target`, bounded by
/// [`HAND_AGAIN`] so a group waiting on its disk holds nothing up; logs
/// `why` at info once the transfer is under way.
fn spawn_transfer(
    node: &ClusterNode,
    hosted: &super::Hosted,
    shard: u32,
    target: NodeId,
    why: Option<&'static str>,
) {
    let raft = hosted.raft.clone();
    let gate = Arc::clone(&hosted.gate);
    node.runtime.spawn(async move {
        let transfer = super::transfer_leader(&gate, &raft, target);
        match tokio::time::timeout(HAND_AGAIN, transfer).await {
            Ok(Ok(())) => {
                if let Some(why) = why {
                    log::info!("shard {shard}: {why}, handing leadership to node {target}");
                }
            }
            _ => log::debug!("shard {shard}: leadership transfer to {target} not started"),
        }
    });
}

/// How often [`check_quorum`] looks at the groups this node leads.
const QUORUM_CHECK: Duration = Duration::from_millis(200);

/// How long a leader may go without a quorum's acknowledgement before it
/// hands its leadership away: four leases, so a merely slow or stalled
/// machine (acknowledgements late, not missing) is not taken for a lost
/// quorum, while a shard behind a slow link serves again within about
/// 2 s (this plus an election), under the proxy's 3 s leader wait.
fn quorum_lost_after(timeouts: &kv_raft::Timeouts) -> Duration {
    Duration::from_millis(4 * timeouts.election_max_ms)
}

/// Starts the check-quorum watcher (module docs).
pub(crate) fn check_quorum(node: &Arc<ClusterNode>) {
    let weak = Arc::downgrade(node);
    let lost_after = quorum_lost_after(&node.timeouts);
    let task = node.runtime.spawn(async move {
        let mut ticks = tokio::time::interval(QUORUM_CHECK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut handed: HashMap<u32, Instant> = HashMap::new();
        loop {
            ticks.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if node.stopping.load(Relaxed) {
                return;
            }
            // The shards and the metadata group (a stuck one stalls
            // membership changes).
            let groups = node.hosted.all().into_iter().chain(
                node.meta()
                    .map(|meta| (kv_raft::types::METADATA_GROUP, Arc::clone(meta))),
            );
            for (shard, hosted) in groups {
                if handed
                    .get(&shard)
                    .is_some_and(|at| at.elapsed() < HAND_AGAIN)
                {
                    continue;
                }
                // A leader elected a moment ago may not have an
                // acknowledgement yet: count from its election too (the
                // metadata group keeps no such time; it waits for a first
                // acknowledgement, below).
                if since_leader_change(&node, shard).is_some_and(|led| led < lost_after) {
                    continue;
                }
                let (silent, target) = {
                    let metrics = hosted.raft.metrics();
                    let m = metrics.borrow_watched();
                    if m.state != ServerState::Leader {
                        continue;
                    }
                    let silent = m
                        .last_quorum_acked
                        .as_ref()
                        .map(|at| openraft::Instant::elapsed(&**at));
                    let is_meta = shard == kv_raft::types::METADATA_GROUP;
                    if silent.is_some_and(|silent| silent < lost_after)
                        || (is_meta && silent.is_none())
                    {
                        continue;
                    }
                    // The voter this leader heard from last, else the one
                    // with the most of its log.
                    let me = node.id();
                    let voters: Vec<u64> = m
                        .membership_config
                        .membership()
                        .voter_ids()
                        .filter(|id| *id != me)
                        .collect();
                    let heard = |id: &u64| {
                        m.heartbeat
                            .as_ref()
                            .and_then(|h| h.get(id))
                            .and_then(|at| at.as_ref())
                            .map(|at| std::cmp::Reverse(openraft::Instant::elapsed(&**at)))
                    };
                    let matched = |id: &u64| {
                        m.replication
                            .as_ref()
                            .and_then(|r| r.get(id))
                            .and_then(|l| l.as_ref().map(|l| l.index))
                    };
                    let target = voters
                        .iter()
                        .copied()
                        .max_by_key(|id| (heard(id), matched(id)));
                    (silent, target)
                };
                let Some(target) = target else {
                    continue;
                };
                handed.insert(shard, Instant::now());
                let group = if shard == kv_raft::types::METADATA_GROUP {
                    "metadata group".to_owned()
                } else {
                    format!("shard {shard}")
                };
                log::warn!(
                    "{group}: no quorum acknowledgement for {} while leading; handing \
                     leadership to node {target} so the replicas that reach each other can elect",
                    silent.map_or_else(
                        || "as long as this node has led it".to_owned(),
                        |silent| format!("{} ms", silent.as_millis())
                    )
                );
                spawn_transfer(&node, &hosted, shard, target, None);
            }
        }
    });
    node.keep_task(task);
}

/// How often the disk watcher looks at the store.
const DISK_CHECK: Duration = Duration::from_millis(100);
/// How long a leadership handed away may take before it is handed again.
const HAND_AGAIN: Duration = Duration::from_secs(2);

/// Starts the disk watcher (design §6.7). While the store refuses writes
/// for want of room, every hosted group has elections disabled (a
/// candidate must save its vote first, which would only wait for the disk)
/// and each group this node leads is handed to another replica, again
/// every [`HAND_AGAIN`] while it still leads. The request path meanwhile
/// proposes nothing here (`request::around_full_disk`). When the store
/// takes writes again, elections are enabled again.
pub(crate) fn disk(node: &Arc<ClusterNode>) {
    let weak = Arc::downgrade(node);
    let task = node.runtime.spawn(async move {
        let mut ticks = tokio::time::interval(DISK_CHECK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full = false;
        let mut handed: HashMap<u32, Instant> = HashMap::new();
        loop {
            ticks.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if node.stopping.load(Relaxed) {
                return;
            }
            let now_full = node.disk_full();
            if now_full.is_some() != full {
                full = now_full.is_some();
                // Through `Groups`: a group catching up after a repair
                // stays out of elections whatever the disk.
                for shard in node.group_ids() {
                    node.groups.hold_elections(shard, full);
                }
                if full {
                    log::warn!(
                        "disk full: this node proposes nothing, stands for no election and \
                         hands its leaderships away until the store takes writes again"
                    );
                } else {
                    handed.clear();
                    log::info!("the store takes writes again: this node stands for elections");
                }
            }
            if full {
                hand_leaderships_away(&node, &mut handed);
            }
        }
    });
    node.keep_task(task);
}

/// Asks each group this node leads (as its metrics say) to transfer its
/// leadership, at most once per [`HAND_AGAIN`] per shard. The transfer is
/// spawned and bounded: a group waiting on the disk does not hold the
/// watcher up.
fn hand_leaderships_away(node: &Arc<ClusterNode>, handed: &mut HashMap<u32, Instant>) {
    let me = node.id();
    let layout = node.layout();
    for shard in node.group_ids() {
        let Some(hosted) = node.hosted(shard) else {
            continue;
        };
        if handed
            .get(&shard)
            .is_some_and(|at| at.elapsed() < HAND_AGAIN)
        {
            continue;
        }
        let target = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            if m.state != ServerState::Leader {
                continue;
            }
            // The most advanced other replica (openraft's target ignores a
            // transfer when its log is behind; the followers then elect).
            let matched = |id: &u64| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .and_then(|l| l.as_ref().map(|l| l.index))
            };
            let preferred = layout.preferred(shard);
            layout
                .replicas(shard)
                .iter()
                .copied()
                .filter(|id| *id != me)
                .max_by_key(|id| (matched(id), *id == preferred))
        };
        let Some(target) = target else {
            continue;
        };
        handed.insert(shard, Instant::now());
        spawn_transfer(node, &hosted, shard, target, Some("disk full"));
    }
}
