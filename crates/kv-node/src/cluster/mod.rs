//! Cluster mode (`--peers`): every shard is a Raft group replicated on
//! `--replicas` members, and any node answers any key (design
//! `docs/replication.md` §6-§11).
//!
//! Modules, one concern each:
//! * [`start`]: flags against `cluster.json`, the first-start guard,
//!   creating and initialising the groups placed here (§8), and the stop
//!   (leaderships handed away, groups shut down).
//! * [`request`]: the request path (§6): writes through `client_write` on
//!   the leader, linearizable reads through a per-shard read gate, stale
//!   reads from the local replica, 421 / forwarding / 503 / 504.
//! * [`forward`]: the HTTP client that relays a request to its leader.
//! * [`watch`]: per group, a task following its metrics (the one info line
//!   per leader change, elections, members seen, recovery), the leader
//!   balancer (§9), and what the node does while its disk is full (§6.7).
//! * [`storage`]: the seam to Raft storage (kv-raft's durable storage).
//! * [`meta`], [`members`], [`join`], [`layout`], [`moves`]: issue 13's
//!   metadata group, members API, `--join`, run-time layout, and the move
//!   executor with replica drops and a removed node's exit.
//!
//! **Solo shards.** A shard placed on exactly one member (`--replicas 1`)
//! gets no Raft group (design §10, §17 q7): its owner serves its keys
//! through the node's [`Store`] exactly as a standalone node does (same
//! WAL, commit-then-apply, snapshots, recovery), so `--replicas 1` keeps
//! standalone speed. Every other node treats the owner as the shard's
//! leader, always known, in term 0: 421 naming it, or forward and relay.
//! The store's own map holds only solo shards' keys (Raft groups' state
//! machines are maps of their own), so digests and key counts read it.
//!
//! This module holds [`ClusterNode`], what they share, and the read-only
//! views: `GET /-/shards` (§11), the digest of a shard, health and
//! readiness fields, and the per-shard metrics.

pub(crate) mod forward;
pub(crate) mod join;
pub(crate) mod layout;
pub(crate) mod members;
pub(crate) mod meta;
pub(crate) mod moves;
pub(crate) mod request;
pub(crate) mod start;
pub(crate) mod storage;
pub(crate) mod watch;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use hyper::HeaderMap;
use kv_cluster::{
    encode_cluster, write_cluster, ClusterSpec, GroupView, ShardsView, StoredCluster,
    CLUSTER_ID_HEADER, NODE_ID_HEADER,
};
use kv_http::metrics::{thread_slot, CachePadded, Scrape, SHARDS};
use kv_raft::{GroupId, Groups, Network, NodeId, Timeouts};
use kv_store::{Store, StoreError};
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use self::forward::Forwarder;
use self::layout::{HostedSlots, Layout, LayoutCell};
use self::request::ReadGate;
use self::storage::{GroupLog, NodeStorage, ShardRaft, ShardSm};
use crate::error::ClusterError;

pub use start::start;

/// Counters of one shard, kept by its watcher.
#[derive(Default)]
pub(crate) struct ShardStats {
    /// Times this node became a candidate.
    elections: AtomicU64,
    /// Leader changes seen here.
    leader_changes: AtomicU64,
    /// When the leader last changed, for the balancer's settling time.
    last_change: Mutex<Option<Instant>>,
}

/// Per node counters of the request path.
#[derive(Default)]
pub(crate) struct PathStats {
    forwarded_reads: AtomicU64,
    forwarded_writes: AtomicU64,
    not_leader: AtomicU64,
    outcome_unknown: AtomicU64,
    /// Lease reads served off the published metrics, without asking the
    /// group ([`ReadGate::lease_ready`]); per thread slot, as this is on
    /// the read path of every core.
    lease_local_reads: [CachePadded<AtomicU64>; SHARDS],
}

impl PathStats {
    pub(crate) fn count_lease_local_read(&self) {
        if let Some(slot) = self.lease_local_reads.get(thread_slot() % SHARDS) {
            slot.fetch_add(1, Relaxed);
        }
    }
}

/// One hosted group: its handle, its state machine, its read gate.
pub(crate) struct Hosted {
    pub(crate) raft: ShardRaft,
    pub(crate) log: GroupLog,
    pub(crate) sm: ShardSm,
    pub(crate) gate: Arc<ReadGate>,
}

impl Hosted {
    /// Hands the group's leadership to `to`. Every transfer kv starts goes
    /// through here: the read gate must hear of it first
    /// ([`ReadGate::before_transfer`]). openraft's own step-down transfer of
    /// a removed leader is covered by [`ReadGate::lease_ready`]'s
    /// membership check instead.
    pub(crate) async fn transfer_leader(
        &self,
        to: NodeId,
    ) -> Result<(), openraft::errors::Fatal<kv_raft::KvRaft>> {
        transfer_leader(&self.gate, &self.raft, to).await
    }
}

/// [`Hosted::transfer_leader`] for a task that holds clones, not the
/// `Hosted`.
pub(crate) async fn transfer_leader(
    gate: &ReadGate,
    raft: &ShardRaft,
    to: NodeId,
) -> Result<(), openraft::errors::Fatal<kv_raft::KvRaft>> {
    gate.before_transfer(raft);
    raft.trigger().transfer_leader(to).await
}

/// Why `/-/ready` says no: the message, and the shards that cannot serve
/// linearizable requests (empty for a reason that is not per shard).
#[derive(Debug)]
pub struct NotReady {
    pub error: String,
    pub shards: Vec<Unavailable>,
}

/// A hosted shard that cannot serve a linearizable request now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub shard: u32,
    pub reason: Reason,
}

/// Why a shard cannot serve (see [`ClusterNode::unavailable`]).
#[derive(Debug, Clone, Copy)]
pub enum Reason {
    /// No leader known, or (`silent`) the one named has not been heard from
    /// for this long (`None`: not since this node started).
    NoLeader {
        silent: Option<(NodeId, Option<Duration>)>,
    },
    /// This node leads without a quorum ack for this long (`None`: none yet).
    NoQuorum { acked: Option<Duration> },
}

impl Reason {
    /// `"no leader"` or `"no quorum"`.
    pub fn name(&self) -> &'static str {
        match self {
            Reason::NoLeader { .. } => "no leader",
            Reason::NoQuorum { .. } => "no quorum",
        }
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = |age: &Option<Duration>| {
            age.map_or_else(
                || "never".to_owned(),
                |age| format!("{} ms ago", age.as_millis()),
            )
        };
        write!(f, "shard {}: {}", self.shard, self.reason.name())?;
        match &self.reason {
            Reason::NoLeader { silent: None } => Ok(()),
            Reason::NoLeader {
                silent: Some((leader, heard)),
            } => write!(f, " (node {leader} last heard {})", ago(heard)),
            Reason::NoQuorum { acked } => {
                write!(f, " (this node leads; last quorum ack {})", ago(acked))
            }
        }
    }
}

impl Unavailable {
    /// `[{"shard": 3, ...}, ...]`: [`Unavailable::to_json`] of each.
    pub fn list_json(list: &[Unavailable]) -> serde_json::Value {
        list.iter().map(Unavailable::to_json).collect()
    }

    /// `{"shard": 3, "reason": "no quorum", "detail": "..."}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "shard": self.shard,
            "reason": self.reason.name(),
            "detail": self.to_string(),
        })
    }
}

/// Everything cluster mode shares between requests and background tasks.
pub struct ClusterNode {
    /// `cluster.json`'s spec: this node's id, the shard and replica
    /// counts (fixed), and the members it was created with.
    pub(crate) spec: ClusterSpec,
    /// Where shards live now: swapped whole when the metadata group applies
    /// a new state (see [`layout`]).
    pub(crate) layout: LayoutCell,
    /// Per shard, this node's replica in a Raft group, when it holds one.
    pub(crate) hosted: HostedSlots,
    /// The node's store: its WAL carries the groups' logs, its map the
    /// solo shards' keys.
    pub(crate) store: Arc<Store>,
    /// The same handles, as kv-raft's server wants them.
    pub(crate) groups: Arc<Groups<ShardSm>>,
    /// Node-to-node address overrides (`--raft-route`), for forwarding too.
    pub(crate) routes: HashMap<NodeId, String>,
    pub(crate) write_timeout: Duration,
    /// `--read-policy`: what a linearizable read's leadership check accepts.
    pub(crate) read_policy: crate::config::ReadPolicy,
    /// `--leader-wait`: how long a client's request waits out an election.
    pub(crate) leader_wait: Duration,
    pub(crate) timeouts: Timeouts,
    /// For shards not hosted here: the leader last learnt.
    pub(crate) leader_cache: Mutex<Vec<Option<NodeId>>>,
    pub(crate) forwarder: Forwarder,
    pub(crate) runtime: Handle,
    pub(crate) shard_stats: Vec<ShardStats>,
    pub(crate) path_stats: PathStats,
    /// Hosted groups whose state machine has caught up with what was
    /// committed before the start (or before the replica was created): a
    /// set rather than a count, so that a replica a move drops leaves it
    /// ([`ClusterNode::forget_recovered`]) and readiness counts only the
    /// groups hosted now.
    pub(crate) recovered: Mutex<BTreeSet<u32>>,
    pub(crate) stopping: AtomicBool,
    /// The cluster's id (design §8), once known: sent on every node-to-node
    /// request and checked on every one received.
    pub(crate) cluster_id: OnceLock<String>,
    /// Peers already warned about for being of another cluster (once each).
    pub(crate) other_clusters: Mutex<BTreeSet<String>>,
    /// `cluster.json` as last written (its `seen` grows).
    pub(crate) stored: Mutex<StoredCluster>,
    pub(crate) data_dir: PathBuf,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) network: Network,
    pub(crate) storage: Arc<NodeStorage>,
    /// The openraft config every group runs with (groups are created at
    /// run time too, see [`meta`]).
    pub(crate) raft_config: Arc<openraft::Config>,
    /// The metadata group's replica (issue 13; `None` with `--replicas 1`,
    /// whose shards cannot move).
    pub(crate) meta: Option<Arc<Hosted>>,
    /// The move executor's settings, counters and progress (issue 13).
    pub(crate) moves: moves::Moves,
}

impl ClusterNode {
    /// This node's member id.
    pub fn id(&self) -> NodeId {
        self.spec.node_id
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.spec.shards
    }

    /// The key's shard.
    pub(crate) fn shard_of(&self, key: &str) -> u32 {
        kv_cluster::shard_of(key.as_bytes(), self.spec.shards)
    }

    /// The store's "disk full" error while this node cannot persist: its
    /// groups then propose, confirm and lead nothing (design §6.7).
    pub(crate) fn disk_full(&self) -> Option<StoreError> {
        match self.store.writable() {
            Err(full @ StoreError::DiskFull { .. }) => Some(full),
            _ => None,
        }
    }

    /// This node's replica of `shard`, when it hosts one.
    #[inline]
    pub(crate) fn hosted(&self, shard: u32) -> Option<Arc<Hosted>> {
        self.hosted.get(shard)
    }

    /// This node's replica of `shard` when it serves it: hosted here *and* a
    /// voter of the shard's current membership. A replica that is only a
    /// move's learner (created before its leader adds it, issue 13) knows no
    /// leader and holds nothing yet: requests for its shard are routed as
    /// for a shard not hosted here.
    #[inline]
    pub(crate) fn serving(&self, shard: u32) -> Option<Arc<Hosted>> {
        let hosted = self.hosted(shard)?;
        self.layout()
            .replicas(shard)
            .contains(&self.id())
            .then_some(hosted)
    }

    /// The layout now (one read per request: see [`layout`]).
    #[inline]
    pub(crate) fn layout(&self) -> Arc<Layout> {
        self.layout.get()
    }

    /// The owner of `shard` when it is a solo shard (one replica, no Raft).
    #[inline]
    pub(crate) fn solo_owner(&self, shard: u32) -> Option<NodeId> {
        self.layout().solo_owner(shard)
    }

    /// Solo shards this node owns.
    fn solo_owned(&self) -> Vec<u32> {
        let me = self.id();
        let layout = self.layout();
        (0..self.spec.shards)
            .filter(|shard| layout.solo_owner(*shard) == Some(me))
            .collect()
    }

    /// Where node-to-node traffic (and forwarding) for `id` goes: a
    /// `--raft-route` override, else its address in the layout, else in
    /// `cluster.json`.
    pub(crate) fn peer_addr(&self, id: NodeId) -> Option<String> {
        if let Some(route) = self.routes.get(&id) {
            return Some(route.clone());
        }
        self.layout()
            .members
            .get(&id)
            .or_else(|| self.spec.members.get(&id))
            .cloned()
    }

    /// Remembers that this node exchanged Raft traffic with `peer`
    /// (design §8's first-start guard), writing `cluster.json` when new.
    pub(crate) fn note_seen(&self, peer: NodeId) {
        if peer == self.id() || !self.spec.members.contains_key(&peer) {
            return;
        }
        let mut stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        if stored.seen.insert(peer) {
            if let Err(error) = write_cluster(&self.data_dir, &stored) {
                log::warn!("cannot record node {peer} as seen: {error}");
            }
        }
    }

    /// Refuses a node-to-node request from a node of another cluster
    /// (design §8): its `X-Kv-Cluster-Id` differs from ours. A request
    /// without one (a node that has not learnt the id yet, an older build)
    /// and any request before this node knows its own id pass. Logged once
    /// per peer at warn. The verdict (same id or not) also goes to the
    /// node's `Refusals`, as the answers to its own requests do.
    pub(crate) fn check_cluster_id(&self, headers: &HeaderMap) -> Result<(), ClusterError> {
        let (Some(ours), Some(theirs)) = (self.cluster_id.get(), headers.get(CLUSTER_ID_HEADER))
        else {
            return Ok(());
        };
        // The sender's verdict on us too (see `kv_raft::Refusals`), by its
        // address as the transport's and the forwarder's are; looked up
        // only when there is something to record.
        let sender = || {
            headers
                .get(NODE_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<NodeId>().ok())
                .filter(|id| *id != self.id())
                .and_then(|id| self.peer_addr(id))
        };
        let refusals = self.network.refusals();
        if theirs.as_bytes() == ours.as_bytes() {
            if refusals.has_refusals() {
                if let Some(addr) = sender() {
                    refusals.accepted(&addr);
                }
            }
            return Ok(());
        }
        if let (Some(addr), Ok(id)) = (sender(), theirs.to_str()) {
            refusals.refused(&addr, id);
        }
        let peer = headers
            .get(NODE_ID_HEADER)
            .or_else(|| headers.get(request::FORWARDED_BY_HEADER))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        let error = ClusterError::OtherCluster {
            ours: ours.clone(),
            theirs: String::from_utf8_lossy(theirs.as_bytes()).into_owned(),
            peer: peer.clone(),
        };
        let first = self
            .other_clusters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer);
        if first {
            log::warn!("{error}");
        }
        Err(error)
    }

    /// Whether every other replica of `shard` is recorded as seen (its
    /// group has nothing more for [`note_seen`](Self::note_seen) to learn).
    pub(crate) fn seen_all(&self, shard: u32) -> bool {
        let me = self.id();
        let layout = self.layout();
        let stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        layout
            .replicas(shard)
            .iter()
            .all(|member| *member == me || stored.seen.contains(member))
    }

    /// `GET /-/raft/cluster`: this node's `cluster.json`.
    pub fn cluster_json(&self) -> Vec<u8> {
        let stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        encode_cluster(&stored).unwrap_or_default()
    }

    /// `GET /-/shards` (design §11), from the groups' metrics watches: no
    /// Raft round trip.
    pub fn shards_view(&self) -> ShardsView {
        let cache = self
            .leader_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let layout = self.layout();
        let (me, now) = (self.id(), Instant::now());
        let lease = Duration::from_millis(self.timeouts.election_max_ms);
        let groups = (0..self.spec.shards)
            .map(|shard| {
                let index = shard as usize;
                let mut view = GroupView {
                    shard,
                    replicas: layout.replicas(shard).to_vec(),
                    preferred_leader: layout.preferred(shard),
                    // A cached leader that left the cluster is not named
                    // (clients refuse a view naming a non-member).
                    leader: cache
                        .get(index)
                        .copied()
                        .flatten()
                        .filter(|id| layout.members.contains_key(id)),
                    term: None,
                    committed: None,
                    applied: None,
                    snapshot: None,
                    purged: None,
                    hosted: false,
                };
                if let Some(owner) = layout.solo_owner(shard) {
                    // Its owner leads it, always, in term 0 (no election
                    // ever runs); no Raft log, so no indexes: null.
                    view.leader = Some(owner);
                    view.term = Some(0);
                    view.hosted = owner == self.id();
                } else if let Some(hosted) = self.serving(shard) {
                    let metrics = hosted.raft.metrics();
                    let m = metrics.borrow_watched();
                    view.hosted = true;
                    // A follower names its leader only while it hears from
                    // it (within the lease, as `unavailable` judges):
                    // openraft keeps naming a silent leader, which clients
                    // would route to. Found with the catch-up guard: the
                    // third replica kept naming the held one, its leader
                    // before a crash, while no shard could elect.
                    view.leader = match m.current_leader {
                        Some(leader) if leader != me => self
                            .groups
                            .last_leader_contact(shard)
                            .is_some_and(|at| now.saturating_duration_since(at) < lease)
                            .then_some(leader),
                        other => other,
                    };
                    view.term = Some(m.current_term);
                    view.committed = m.local_committed.as_ref().map(|l| l.index);
                    view.applied = m.last_applied.as_ref().map(|l| l.index);
                    view.snapshot = m.snapshot.as_ref().map(|l| l.index);
                    view.purged = m.purged.as_ref().map(|l| l.index);
                    // During a move the group's voters differ from the
                    // state's `current` (design §6): show the group's.
                    let voters: BTreeSet<NodeId> =
                        m.membership_config.membership().voter_ids().collect();
                    if !voters.is_empty()
                        && voters != view.replicas.iter().copied().collect::<BTreeSet<_>>()
                    {
                        view.replicas = voters.into_iter().collect();
                    }
                }
                view
            })
            .collect();
        ShardsView {
            shards: self.spec.shards,
            replicas: self.spec.replicas,
            node_id: self.id(),
            members: layout.members.clone(),
            groups,
        }
    }

    /// `GET /-/shards/<s>/digest`: key count and an order-independent
    /// digest of this replica of `shard`, at its applied index; `None` when
    /// not hosted here.
    pub fn digest(&self, shard: u32) -> Option<serde_json::Value> {
        if let Some(owner) = self.solo_owner(shard) {
            return (owner == self.id()).then(|| self.solo_digest(shard));
        }
        let hosted = self.hosted(shard)?;
        let applied = hosted
            .raft
            .metrics()
            .borrow_watched()
            .last_applied
            .as_ref()
            .map(|l| l.index);
        let (keys, digest) = storage::digest(&hosted.sm);
        Some(serde_json::json!({
            "shard": shard,
            "keys": keys,
            "digest": format!("{digest:016x}"),
            "applied": applied,
        }))
    }

    /// A solo shard's digest: its keys in the store's map, hashed as a
    /// group's state machine hashes its own (`applied` is null: no log).
    fn solo_digest(&self, shard: u32) -> serde_json::Value {
        let entries: Vec<kv_store::Entry> = self
            .store
            .entries()
            .into_iter()
            .filter(|entry| kv_cluster::shard_of(entry.key(), self.spec.shards) == shard)
            .collect();
        let (keys, digest) = kv_raft::digest_entries(&entries);
        serde_json::json!({
            "shard": shard,
            "keys": keys,
            "digest": format!("{digest:016x}"),
            "applied": null,
        })
    }

    fn hosted_iter(&self) -> Vec<(u32, Arc<Hosted>)> {
        self.hosted.all()
    }

    /// Shards this node holds a replica of (solo shards it owns included).
    pub fn shards_hosted(&self) -> usize {
        self.hosted.count() + self.solo_owned().len()
    }

    /// Shards this node leads now (a solo shard's owner always leads it).
    pub fn shards_led(&self) -> usize {
        self.hosted_iter()
            .iter()
            .filter(|(_, hosted)| {
                hosted.raft.metrics().borrow_watched().state == ServerState::Leader
            })
            .count()
            + self.solo_owned().len()
    }

    /// Keys on this node's replicas: the groups' maps and the store's map
    /// (which holds the solo shards' keys only).
    pub fn keys(&self) -> usize {
        self.hosted_iter()
            .iter()
            .map(|(_, hosted)| storage::len(&hosted.sm))
            .sum::<usize>()
            + self.store.len()
    }

    /// The refusal of every key request while a majority of the other
    /// members refuse this node as another cluster's (design §8): one
    /// atomic load when they do not.
    #[inline]
    pub(crate) fn foreign_data_dir(&self) -> Option<ClusterError> {
        let refusals = self.network.refusals();
        if !refusals.is_foreign() {
            return None;
        }
        Some(ClusterError::ForeignDataDir {
            ours: self.cluster_id.get().cloned().unwrap_or_else(|| "?".into()),
            theirs: refusals.foreign()?,
        })
    }

    /// How many Raft groups here (shards and the metadata group) are
    /// catching up after a repair: they neither vote nor stand for election
    /// (`/-/health`, kv-raft's catch-up guard).
    pub fn groups_catching_up(&self) -> usize {
        self.groups.catching_up()
    }

    /// How many of the groups hosted now have recovered, and how many are
    /// hosted (`/-/ready`, `/-/health`).
    pub fn recovered_of_hosted(&self) -> (usize, usize) {
        let recovered = self
            .recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let hosted = self.hosted.all();
        let done = hosted
            .iter()
            .filter(|(shard, _)| recovered.contains(shard))
            .count();
        (done, hosted.len())
    }

    /// Marks `shard` recovered if `replica` is still the one hosted (a
    /// dropped replica's follower may see its last metrics after the drop).
    pub(crate) fn mark_recovered(&self, shard: u32, replica: &std::sync::Weak<Hosted>) {
        let mut recovered = self
            .recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self
            .hosted(shard)
            .is_some_and(|hosted| std::ptr::eq(Arc::as_ptr(&hosted), replica.as_ptr()));
        if current {
            recovered.insert(shard);
        }
    }

    /// `shard`'s replica was dropped (its slot already emptied): a replica
    /// hosted again later recovers afresh.
    pub(crate) fn forget_recovered(&self, shard: u32) {
        self.recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&shard);
    }

    /// `/-/ready`: every hosted group has recovered, none has failed, and
    /// each can serve linearizable requests now ([`ClusterNode::unavailable`]).
    pub fn ready(&self) -> Result<(), NotReady> {
        let not_ready = |error: String| NotReady {
            error,
            shards: Vec::new(),
        };
        if self.stopping.load(Relaxed) {
            return Err(not_ready("the node is stopping".into()));
        }
        if let Some(foreign) = self.foreign_data_dir() {
            return Err(not_ready(foreign.to_string()));
        }
        for (shard, hosted) in self.hosted_iter() {
            if hosted
                .raft
                .metrics()
                .borrow_watched()
                .running_state
                .is_err()
            {
                return Err(not_ready(format!("shard {shard} {}", request::STOPPED)));
            }
        }
        // Groups only: a solo shard has nothing to recover past the store,
        // whose writability the caller checks.
        let (recovered, hosted) = self.recovered_of_hosted();
        if recovered < hosted {
            return Err(not_ready(format!(
                "{recovered} of {hosted} shards recovered"
            )));
        }
        let shards = self.unavailable();
        if !shards.is_empty() {
            let list: Vec<String> = shards.iter().map(ToString::to_string).collect();
            return Err(NotReady {
                error: format!(
                    "{} of {hosted} hosted shards cannot serve linearizable requests: {}",
                    shards.len(),
                    list.join(", ")
                ),
                shards,
            });
        }
        Ok(())
    }

    /// The hosted shards that cannot serve a linearizable request now, from
    /// the groups' metrics and the transport's contact times (no Raft round
    /// trip, so a probe costs a few reads per shard):
    /// * a leader whose last quorum ack is older than the leader lease
    ///   (`--raft-election-timeout` × 2): cut off from its peers, it cannot
    ///   commit nor confirm a read (openraft refuses both): **no quorum**;
    /// * a replica that knows no leader (an election, or it lost quorum
    ///   and stands for election in vain): **no leader**;
    /// * a follower that has not heard from the leader it names for longer
    ///   than the lease (openraft keeps naming a silent leader): **no
    ///   leader** too, as it can neither forward nor be served.
    ///
    /// A follower of a live leader elsewhere is fine: it forwards.
    pub fn unavailable(&self) -> Vec<Unavailable> {
        let lease = Duration::from_millis(self.timeouts.election_max_ms);
        let now = Instant::now();
        let me = self.id();
        let age = |at: Option<Instant>| at.map(|at| now.saturating_duration_since(at));
        let layout = self.layout();
        let mut out = Vec::new();
        for (shard, hosted) in self.hosted_iter() {
            // A move's learner, created ahead of its `add_learner`, knows no
            // leader until the move copies; it serves nothing
            // ([`ClusterNode::serving`]), so it cannot make the node unready.
            if !layout.replicas(shard).contains(&me) {
                continue;
            }
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            let reason = match m.current_leader {
                None => Some(Reason::NoLeader { silent: None }),
                Some(leader) if leader == me => {
                    let acked = m
                        .last_quorum_acked
                        .as_ref()
                        .map(|at| openraft::Instant::elapsed(&**at));
                    match acked {
                        Some(acked) if acked < lease => None,
                        _ => Some(Reason::NoQuorum { acked }),
                    }
                }
                Some(leader) => match age(self.groups.last_leader_contact(shard)) {
                    Some(heard) if heard < lease => None,
                    heard => Some(Reason::NoLeader {
                        silent: Some((leader, heard)),
                    }),
                },
            };
            if let Some(reason) = reason {
                out.push(Unavailable { shard, reason });
            }
        }
        out
    }

    /// The per-shard and per-node series of design §11.
    pub fn add_metrics(&self, scrape: &mut Scrape) {
        type Series = Vec<(Vec<(&'static str, String)>, u64)>;
        let (mut term, mut is_leader, mut leader_id) =
            (Series::new(), Series::new(), Series::new());
        let (mut committed, mut applied, mut lag) = (Series::new(), Series::new(), Series::new());
        let (mut elections, mut changes, mut snapshots, mut installs) =
            (Series::new(), Series::new(), Series::new(), Series::new());
        for (shard, hosted) in self.hosted_iter() {
            let label = || vec![("shard", shard.to_string())];
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            term.push((label(), m.current_term));
            is_leader.push((label(), u64::from(m.state == ServerState::Leader)));
            if let Some(leader) = m.current_leader {
                leader_id.push((label(), leader));
            }
            committed.push((label(), m.local_committed.as_ref().map_or(0, |l| l.index)));
            applied.push((label(), m.last_applied.as_ref().map_or(0, |l| l.index)));
            if let (Some(replication), Some(last)) = (&m.replication, m.last_log_index) {
                for (peer, matched) in replication {
                    if *peer == self.id() {
                        continue;
                    }
                    let matched = matched.as_ref().map_or(0, |l| l.index + 1);
                    lag.push((
                        vec![("shard", shard.to_string()), ("peer", peer.to_string())],
                        (last + 1).saturating_sub(matched),
                    ));
                }
            }
            snapshots.push((label(), hosted.sm.snapshots_built()));
            installs.push((label(), hosted.sm.snapshot_installs()));
        }
        // The node's own counters outlive a replica moved away (issue 13):
        // a counter series that vanished and came back at 0 would read as a
        // reset, so every shard this node ever counted for keeps its series.
        for (shard, stats) in self.shard_stats.iter().enumerate() {
            let (stood, seen) = (
                stats.elections.load(Relaxed),
                stats.leader_changes.load(Relaxed),
            );
            if stood == 0 && seen == 0 && self.hosted(shard as u32).is_none() {
                continue;
            }
            elections.push((vec![("shard", shard.to_string())], stood));
            changes.push((vec![("shard", shard.to_string())], seen));
        }
        // Solo shards owned here: led by this node in term 0, no log.
        for shard in self.solo_owned() {
            let label = || vec![("shard", shard.to_string())];
            term.push((label(), 0));
            is_leader.push((label(), 1));
            leader_id.push((label(), self.id()));
        }
        scrape.family(
            "kv_raft_term",
            "Current Raft term of the shard's group here.",
            false,
            term,
        );
        scrape.family(
            "kv_raft_is_leader",
            "1 when this node leads the shard.",
            false,
            is_leader,
        );
        scrape.family(
            "kv_raft_leader_id",
            "The shard's leader as known here.",
            false,
            leader_id,
        );
        scrape.family(
            "kv_raft_committed_index",
            "Highest index known committed on this replica.",
            false,
            committed,
        );
        scrape.family(
            "kv_raft_applied_index",
            "Highest index applied on this replica.",
            false,
            applied,
        );
        scrape.family(
            "kv_raft_follower_lag_entries",
            "Entries a follower lacks (leader only).",
            false,
            lag,
        );
        scrape.family(
            "kv_raft_elections_total",
            "Times this node stood for election in the shard.",
            true,
            elections,
        );
        scrape.family(
            "kv_raft_leader_changes_total",
            "Leader changes of the shard seen here.",
            true,
            changes,
        );
        scrape.family(
            "kv_raft_snapshots_total",
            "Snapshots this replica built.",
            true,
            snapshots,
        );
        scrape.family(
            "kv_raft_snapshot_installs_total",
            "Snapshots installed from a leader.",
            true,
            installs,
        );
        let stats = &self.path_stats;
        scrape.family(
            "kv_raft_forwarded_total",
            "Requests forwarded to a shard's leader.",
            true,
            vec![
                (
                    vec![("op", "read".to_owned())],
                    stats.forwarded_reads.load(Relaxed),
                ),
                (
                    vec![("op", "write".to_owned())],
                    stats.forwarded_writes.load(Relaxed),
                ),
            ],
        );
        let transport = self.network.stats();
        scrape.counter_u64(
            "kv_raft_append_rpcs_total",
            "Append and heartbeat RPCs this node's groups sent.",
            transport.appends,
        );
        scrape.counter_u64(
            "kv_raft_append_posts_total",
            "POST /-/raft/append requests that carried them (batched per peer).",
            transport.posts,
        );
        scrape.counter_u64(
            "kv_raft_restart_vote_refusals_total",
            "Vote and pre-vote requests refused because their group was hosted less than one leader lease ago (the restart guard).",
            self.groups.restart_vote_refusals(),
        );
        scrape.counter_u64(
            "kv_raft_catch_up_vote_refusals_total",
            "Vote and pre-vote requests refused because their group was catching up after a repair (the catch-up guard).",
            self.groups.catch_up_vote_refusals(),
        );
        scrape.gauge_u64(
            "kv_raft_groups_catching_up",
            "Raft groups here (shards and the metadata group) catching up after a repair: they neither vote nor stand for election until their committed index reaches their leader's.",
            self.groups.catching_up() as u64,
        );
        scrape.counter_u64(
            "kv_raft_lease_local_reads_total",
            "Linearizable reads a leader served on its lease as its published Raft metrics showed it, without a round through the group.",
            stats
                .lease_local_reads
                .iter()
                .map(|slot| slot.load(Relaxed))
                .sum(),
        );
        scrape.counter_u64(
            "kv_raft_not_leader_total",
            "421 answers given.",
            stats.not_leader.load(Relaxed),
        );
        scrape.counter_u64(
            "kv_raft_outcome_unknown_total",
            "504 answers given (outcome unknown).",
            stats.outcome_unknown.load(Relaxed),
        );
        scrape.gauge_u64(
            "kv_solo_shards",
            "Solo shards (one replica, no Raft group) this node owns and serves from its store.",
            self.solo_owned().len() as u64,
        );
        self.add_meta_metrics(scrape);
    }

    /// The metadata group's series (design §8): the applied placement
    /// version, members by state, whether this node leads the group.
    fn add_meta_metrics(&self, scrape: &mut Scrape) {
        let Some(state) = self.cluster_state() else {
            return;
        };
        scrape.gauge_u64(
            "kv_cluster_version",
            "Placement version of the cluster state this node applied.",
            state.version,
        );
        let members = [
            kv_cluster::MemberState::Joining,
            kv_cluster::MemberState::Active,
            kv_cluster::MemberState::Leaving,
            kv_cluster::MemberState::Removed,
        ]
        .into_iter()
        .map(|member_state| {
            let count = state.with_state(member_state).count() as u64;
            (vec![("state", member_state.as_str().to_owned())], count)
        })
        .collect();
        scrape.family(
            "kv_cluster_members",
            "Members of the cluster by state.",
            false,
            members,
        );
        let leads = self
            .meta()
            .is_some_and(|meta| meta.raft.metrics().borrow_watched().state == ServerState::Leader);
        scrape.gauge_u64(
            "kv_cluster_is_meta_leader",
            "1 when this node leads the metadata group.",
            u64::from(leads),
        );
        let phases = [
            kv_cluster::Phase::Planned,
            kv_cluster::Phase::Copying,
            kv_cluster::Phase::Joint,
        ]
        .into_iter()
        .map(|phase| {
            let count = state.moves.values().filter(|mv| mv.phase == phase).count() as u64;
            (vec![("phase", phase.as_str().to_owned())], count)
        })
        .collect();
        scrape.family(
            "kv_cluster_moves",
            "Open moves of the cluster by phase.",
            false,
            phases,
        );
        scrape.gauge_u64(
            "kv_cluster_moves_done",
            "Moves finished since the cluster was created (cluster-wide, monotone).",
            state.moves_done,
        );
        let moves = &self.moves;
        scrape.counter_u64(
            "kv_cluster_moves_finished_total",
            "Moves this node's executor finished (it led the shard at its last step).",
            moves.finished.load(Relaxed),
        );
        scrape.counter_u64(
            "kv_cluster_move_steps_total",
            "Move steps this node's executor performed (waits not counted).",
            moves.steps.load(Relaxed),
        );
        scrape.counter_u64(
            "kv_cluster_replicas_dropped_total",
            "Replicas this node dropped after they left their group.",
            moves.dropped.load(Relaxed),
        );
        let throttle = self.network.snapshot_throttle();
        let sent = throttle
            .bytes_sent()
            .into_iter()
            .map(|(peer, bytes)| (vec![("peer", peer.to_string())], bytes))
            .collect();
        scrape.family(
            "kv_raft_snapshot_bytes_sent_total",
            "Snapshot bytes this node sent, per peer (moves' learners and lagging replicas).",
            true,
            sent,
        );
        scrape.counter(
            "kv_raft_snapshot_throttled_seconds_total",
            "Time snapshot sends waited for --move-bytes-per-sec.",
            throttle.throttled().as_secs_f64(),
        );
    }

    /// The leader of `shard` as this node knows it now: its group's view
    /// when hosted, the owner of a solo shard, else the cached (or
    /// preferred) leader, where a request for it would be forwarded.
    pub(crate) fn leader_now(&self, shard: u32) -> Option<NodeId> {
        if let Some(owner) = self.solo_owner(shard) {
            return Some(owner);
        }
        if let Some(hosted) = self.serving(shard) {
            return hosted.raft.metrics().borrow_watched().current_leader;
        }
        Some(self.cached_leader(shard).id())
    }

    /// Resolves once this node no longer sees `from` as `shard`'s leader:
    /// checked every 50 ms after [`kv_cluster::READ_PATIENCE`] (a forwarded
    /// read waiting at a frozen leader gives up when the group elects
    /// another). Pending while `from` stays the leader, so a slow leader
    /// keeps its read; a shard not hosted here only learns of a new leader
    /// from other requests' answers.
    pub(crate) async fn leader_moved(&self, shard: u32, from: NodeId) {
        tokio::time::sleep(kv_cluster::READ_PATIENCE).await;
        while self.leader_now(shard) == Some(from) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Keeps a background task to stop with the node.
    pub(crate) fn keep_task(&self, task: JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
    }

    /// The shards hosted here, in order.
    pub(crate) fn group_ids(&self) -> Vec<GroupId> {
        self.hosted_iter()
            .into_iter()
            .map(|(shard, _)| shard)
            .collect()
    }
}
