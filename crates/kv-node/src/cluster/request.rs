//! The request path of cluster mode (design §6): where a key's request is
//! served, and what the client is told when it is not.
//!
//! * **Writes** (PUT/POST/DELETE) go to `client_write` of the key's group
//!   here; openraft refuses before appending when this node does not lead
//!   (`ForwardToLeader`), and that refusal is what decides between serving,
//!   a 421, forwarding and a 503. After proposing, only the outcome or 504.
//! * **Linearizable reads** (GET/HEAD, the default) pass the shard's
//!   [`ReadGate`]: one read-index confirmation (a quorum acknowledges this
//!   leader *after* the read arrived) serves every read that arrived before
//!   it started, then each waits for its replica to apply up to the read
//!   index. A deposed leader cannot be confirmed and never answers stale.
//!   With `--read-policy lease` (the default) a confirmation may reuse a
//!   quorum acknowledgement younger than the shortest election timeout
//!   instead of a new round: the acknowledging followers refuse votes for
//!   the longest one (openraft's lease; kv-raft's restart guard after a
//!   restart), and the difference is the margin for clock-rate drift.
//!   A lease read whose conditions the group's published metrics already
//!   show is served without asking the group at all
//!   ([`ReadGate::lease_ready`]): most reads then cost a metrics borrow.
//! * **Stale reads** (`X-Kv-Consistency: stale`) answer from the local
//!   replica with `X-Kv-Applied-Index`.
//! * **Not leader**: with `X-Kv-Route: direct`, or on a request already
//!   forwarded once, 421 naming the leader; otherwise the request is
//!   forwarded to the leader and its answer relayed with `X-Kv-Leader-Id`,
//!   retried once at the leader a 421 names.
//! * **Full disk** (design §6.7): a node that cannot persist proposes and
//!   confirms nothing itself; writes and linearizable reads go to the
//!   shard's leader elsewhere ([`ClusterNode::around_full_disk`]), stale
//!   reads are answered here as always.
//!
//! Client-visible errors are in our words: openraft's error text (which
//! names its internals) goes to the log, never into an answer.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use kv_cluster::{
    NotLeader, LEADER_ID_HEADER, READ_PATIENCE, ROUTE_DIRECT, ROUTE_HEADER, WAIT_BUDGET_HEADER,
};
use kv_http::{json_response, ApiError, Body};
use kv_raft::{Command, KvRaft, NodeId, Outcome};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{
    ClientWriteError, ForwardReason, ForwardToLeader, LinearizableReadError, RaftError,
};
use openraft::raft::linearizable_read::Linearizer;
use openraft::{LinearizerOption, ReadPolicy, ServerState};
use tokio::sync::watch;

use super::forward::{ForwardError, Forwarded};
use super::storage::{self, ShardRaft};
use super::ClusterNode;
use crate::error::{ClusterError, NodeError};

/// Request header asking for a possibly stale read from any replica.
pub const CONSISTENCY_HEADER: &str = "x-kv-consistency";
/// Its value for a stale read (the default is `linearizable`).
pub const CONSISTENCY_STALE: &str = "stale";
/// Response header of a stale read: the replica's applied index.
pub const APPLIED_INDEX_HEADER: &str = "x-kv-applied-index";
/// Request header marking a request forwarded by a node (its id): never
/// forwarded again.
pub const FORWARDED_BY_HEADER: &str = "x-kv-forwarded-by";

pub(crate) const STORED: &[u8] = b"{\"message\":\"Value stored successfully\"}\n";
pub(crate) const DELETED: &[u8] = b"{\"message\":\"Key deleted successfully\"}\n";

/// Where the leader of a shard is, as learnt from a refusal.
#[derive(Debug, Clone)]
pub(crate) struct LeaderAt {
    id: NodeId,
    addr: String,
    term: u64,
}

impl LeaderAt {
    pub(crate) fn id(&self) -> NodeId {
        self.id
    }
}

/// Why a read was not confirmed; cloned to every read waiting on one
/// confirmation.
#[derive(Debug, Clone)]
pub(crate) enum ReadFail {
    NotLeader(LeaderAt),
    NoLeader,
    NoQuorum,
    Failed(String),
}

type Confirmation = Result<Linearizer<KvRaft>, ReadFail>;

/// Batches read-index confirmations of one shard: a read arriving when none
/// is in flight starts one; reads arriving while one is in flight wait for
/// the *next* (a confirmation only serves reads that arrived before it
/// started).
#[derive(Default)]
pub(crate) struct ReadGate {
    inner: Mutex<GateInner>,
    /// The term in which this node last started handing the shard's
    /// leadership away (0: never). A transfer's vote is granted inside the
    /// lease, so from then on the term's lease proves nothing:
    /// [`Self::lease_ready`] refuses while the metrics show this term or an
    /// older one. Set by [`Self::before_transfer`].
    transfer_term: AtomicU64,
}

#[derive(Default)]
struct GateInner {
    running: bool,
    next: Option<watch::Sender<Option<Confirmation>>>,
}

impl ReadGate {
    /// Call right before `trigger().transfer_leader(..)` of this shard's
    /// group (no await in between): lease reads stop taking
    /// [`Self::lease_ready`]'s shortcut for the current term. openraft
    /// itself refuses new read linearizers once a transfer started, so the
    /// slow path stays right.
    ///
    /// The term is read from the metrics, published after every turn of
    /// the group's core loop, so it is the term the transfer will run in:
    /// changing term *and* leading again takes several turns (a step down,
    /// then an election's vote answers).
    pub(crate) fn before_transfer(&self, raft: &ShardRaft) {
        let term = raft.metrics().borrow_watched().current_term;
        self.transfer_term.fetch_max(term, SeqCst);
    }

    /// Whether a lease read of this shard may be served from the local
    /// replica right now without asking the group: what openraft's
    /// `get_read_linearizer` with a lease of `election_timeout_min` checks,
    /// read off the metrics it publishes after every core-loop turn, plus
    /// the state machine's own applied index:
    ///
    /// - this node leads with a committed vote, and no leadership transfer
    ///   started in its term (a transfer's election ignores the lease);
    /// - this node is a voter of its effective membership: openraft's
    ///   step-down watcher (`removed_leader_step_down`, on by default) hands
    ///   the leadership of a leader its committed membership removed to
    ///   another voter by itself, never through [`Self::before_transfer`],
    ///   so such a leader's lease proves nothing (openraft lets a caught-up
    ///   node that is no voter win a transfer's election, e.g. the leaving
    ///   replica of a move whose goal membership is appended but not yet
    ///   committed);
    /// - its committed log id is of its own term, so the leader's first
    ///   (blank) entry, and every entry of earlier leaders, is committed;
    /// - a quorum acknowledged a heartbeat *sent* less than
    ///   `election_timeout_min` ago (the followers that acknowledged it
    ///   refuse votes for `election_timeout_max` after receiving it, so no
    ///   other leader exists yet, as on the slow path);
    /// - the state machine has applied the committed index in the metrics.
    ///   The read index is then that index or the state machine's applied
    ///   index, whichever is higher: a write acknowledged to a client was
    ///   applied here first, even if the metrics were published before its
    ///   commit, so the read sees it.
    ///
    /// `false` only means "ask the group" (the read-index or lease path).
    pub(crate) fn lease_ready(&self, raft: &ShardRaft, sm: &super::storage::ShardSm) -> bool {
        let lease = Duration::from_millis(raft.config().election_timeout_min);
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader
            || m.current_leader != Some(m.id)
            || !m.vote.is_committed()
            || m.current_term <= self.transfer_term.load(SeqCst)
            || !m
                .membership_config
                .membership()
                .get_joint_config()
                .iter()
                .any(|voters| voters.contains(&m.id))
        {
            return false;
        }
        let Some(committed) = m.local_committed.as_ref() else {
            return false;
        };
        if committed.leader_id.term != m.current_term {
            return false;
        }
        let Some(acked) = m.last_quorum_acked.as_ref() else {
            return false;
        };
        let now = <openraft::alias::InstantOf<KvRaft> as openraft::Instant>::now();
        let fresh = now < **acked + lease;
        fresh
            && sm
                .applied_index()
                .is_some_and(|applied| applied >= committed.index)
    }

    /// Waits (at most `bound`) for a confirmation that started after this
    /// call, and returns it.
    async fn confirm(
        self: &Arc<Self>,
        raft: &ShardRaft,
        bound: Duration,
        policy: crate::config::ReadPolicy,
    ) -> Confirmation {
        let mut receiver = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if inner.running {
                match &inner.next {
                    Some(sender) => sender.subscribe(),
                    None => {
                        let (sender, receiver) = watch::channel(None);
                        inner.next = Some(sender);
                        receiver
                    }
                }
            } else {
                inner.running = true;
                let (sender, receiver) = watch::channel(None);
                // On this worker's own runtime: one thread hop fewer than
                // the main runtime (reads are hop-bound). If the worker
                // stops, the sender drops and waiting reads get 503.
                tokio::spawn(drive(Arc::clone(self), raft.clone(), sender, bound, policy));
                receiver
            }
        };
        let waited = tokio::time::timeout(bound, async {
            receiver
                .wait_for(Option::is_some)
                .await
                .map(|confirmation| confirmation.clone())
        })
        .await;
        match waited {
            Ok(Ok(confirmation)) => {
                confirmation.unwrap_or_else(|| Err(ReadFail::Failed("no confirmation".into())))
            }
            Ok(Err(_)) => Err(ReadFail::Failed("the confirmation was dropped".into())),
            Err(_) => Err(ReadFail::NoQuorum),
        }
    }
}

/// Runs confirmations one after another while reads keep queueing.
async fn drive(
    gate: Arc<ReadGate>,
    raft: ShardRaft,
    mut sender: watch::Sender<Option<Confirmation>>,
    bound: Duration,
    policy: crate::config::ReadPolicy,
) {
    let option = match policy {
        crate::config::ReadPolicy::ReadIndex => LinearizerOption::from(ReadPolicy::ReadIndex),
        // A quorum acknowledgement is reused for the *shortest* election
        // timeout after its heartbeat was sent, while the acknowledging
        // followers refuse votes for the longest one after they received it
        // (openraft's lease; kv-raft's restart guard after a restart): the
        // difference (200 of 400 ms by default) is the margin by which clock
        // rates may differ. openraft's default (`None`) would reuse it for
        // the whole longest timeout, leaving only the message delay as
        // margin. Heartbeats go every 100 ms, so a busy shard's last
        // acknowledgement is younger than either. openraft's own `LeaseRead`
        // fails at once when the lease lapsed (an idle shard); this one
        // heartbeats and waits instead, as read-index does, so an idle
        // shard's first read is not a 503.
        crate::config::ReadPolicy::Lease => LinearizerOption::new(
            Some(Duration::from_millis(raft.config().election_timeout_min)),
            true,
        ),
    };
    loop {
        let confirmation =
            match tokio::time::timeout(bound, raft.get_read_linearizer(option.clone())).await {
                Err(_) => Err(ReadFail::NoQuorum),
                Ok(Ok(linearizer)) => Ok(linearizer),
                Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward)))) => {
                    Err(match leader_of(&raft, &forward) {
                        Ok(leader) => ReadFail::NotLeader(leader),
                        Err(()) if forward.reason == ForwardReason::LeaseExpired => {
                            ReadFail::NoQuorum
                        }
                        Err(()) => ReadFail::NoLeader,
                    })
                }
                Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)))) => {
                    Err(ReadFail::NoQuorum)
                }
                Ok(Err(RaftError::Fatal(_))) => Err(ReadFail::Failed(STOPPED.into())),
            };
        sender.send_replace(Some(confirmation));
        let mut inner = gate.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.next.take() {
            Some(next) => sender = next,
            None => {
                inner.running = false;
                return;
            }
        }
    }
}

/// The leader a refusal names, when it is another node.
fn leader_of(raft: &ShardRaft, forward: &ForwardToLeader<KvRaft>) -> Result<LeaderAt, ()> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    match forward.leader_id {
        Some(id) if id != m.id => Ok(LeaderAt {
            id,
            // Empty when openraft does not know the node: filled from the
            // members before anyone sees it.
            addr: forward
                .leader_node
                .as_ref()
                .map(|node| node.addr.clone())
                .unwrap_or_default(),
            term: m.current_term,
        }),
        _ => Err(()),
    }
}

fn header_is(headers: &HeaderMap, name: &str, value: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// A key request as the request path needs it ([`ClusterNode::key_request`]).
pub(crate) struct KeyRequest<'a> {
    pub parts: &'a Parts,
    pub key: &'a str,
    /// The key's shard, computed once by the caller.
    pub shard: u32,
    /// When the request arrived: its wait for a leader counts from here.
    arrived: Instant,
    /// When every wait for a leader or a quorum of this request ends: this
    /// node's own `--leader-wait` deadline for a request it waits out
    /// ([`ClusterNode::with_leader_wait`]), the sender's
    /// [`WAIT_BUDGET_HEADER`] for one it does not (kv-proxy's, a forwarded
    /// one), the earlier of both when both apply; `None`: only the node's
    /// own bounds (`--raft-write-timeout`).
    until: Option<Instant>,
}

impl KeyRequest<'_> {
    /// How long a wait may last from `now`: at most `bound`, and never past
    /// [`KeyRequest::until`].
    fn bounded(&self, bound: Duration, now: Instant) -> Duration {
        self.until.map_or(bound, |until| {
            bound.min(until.saturating_duration_since(now))
        })
    }

    fn direct(&self) -> bool {
        header_is(&self.parts.headers, ROUTE_HEADER, ROUTE_DIRECT)
    }

    fn forwarded(&self) -> bool {
        self.parts.headers.contains_key(FORWARDED_BY_HEADER)
    }

    fn stale(&self) -> bool {
        header_is(&self.parts.headers, CONSISTENCY_HEADER, CONSISTENCY_STALE)
    }

    fn is_write(&self) -> bool {
        !matches!(self.parts.method, Method::GET | Method::HEAD)
    }
}

/// Whether a request is one a node forwarded (the op log skips those).
pub(crate) fn is_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED_BY_HEADER)
}

/// What a client is told about a group whose Raft core stopped here (a
/// storage failure; openraft's own text, which names its internals, goes
/// to the log from the group's watcher).
pub(crate) const STOPPED: &str = "stopped on this node after a storage failure (see its log)";

/// Pause between tries while a request waits for its shard's leader:
/// pacing of retries, not synchronisation (each try re-reads the state).
const LEADER_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The deadline a sender's [`WAIT_BUDGET_HEADER`] sets for a request that
/// `arrived`: `None` without one (or one that is not a number).
fn budget_deadline(headers: &HeaderMap, arrived: Instant) -> Option<Instant> {
    let ms = headers
        .get(WAIT_BUDGET_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    arrived.checked_add(Duration::from_millis(ms))
}

impl ClusterNode {
    /// `parts` as a key request of `shard`, with the deadline of its waits
    /// (see [`KeyRequest::until`]).
    pub(crate) fn key_request<'a>(
        &self,
        parts: &'a Parts,
        key: &'a str,
        shard: u32,
        arrived: Instant,
    ) -> KeyRequest<'a> {
        let mut request = KeyRequest {
            parts,
            key,
            shard,
            arrived,
            until: budget_deadline(&parts.headers, arrived),
        };
        if self.may_wait(&request) {
            let own = kv_cluster::wait_deadline(arrived, self.leader_wait);
            request.until = Some(request.until.map_or(own, |theirs| theirs.min(own)));
        }
        request
    }

    /// A PUT or DELETE of `request.key`, waiting out an election (see
    /// [`ClusterNode::with_leader_wait`]).
    pub(crate) async fn write(
        &self,
        request: &KeyRequest<'_>,
        command: Command,
        raw: Bytes,
    ) -> Result<Response<Body>, NodeError> {
        // Requests that never wait (kv-proxy's, forwarded ones, or with
        // --leader-wait 0s) are tried once without copying the value: only a
        // request that may be tried again needs its command kept.
        if !self.may_wait(request) {
            return self.write_once(request, command, raw).await;
        }
        self.with_leader_wait(request, || {
            self.write_once(request, command.clone(), raw.clone())
        })
        .await
    }

    /// Whether a request waits out an election (see
    /// [`ClusterNode::with_leader_wait`]).
    fn may_wait(&self, request: &KeyRequest<'_>) -> bool {
        !self.leader_wait.is_zero() && !request.direct() && !request.forwarded()
    }

    /// A linearizable or stale GET/HEAD, waiting out an election.
    pub(crate) async fn read(&self, request: &KeyRequest<'_>) -> Result<Response<Body>, NodeError> {
        if !self.may_wait(request) {
            return self.read_once(request).await;
        }
        self.with_leader_wait(request, || self.read_once(request))
            .await
    }

    /// Runs `attempt` until it answers something other than "not proposed:
    /// no leader / no quorum / leader unreachable", or `--leader-wait`
    /// passes: so a client talking to a node, as the seed's clients do, sees
    /// a failover as latency rather than 503s, as it would through kv-proxy.
    /// Callers skip it for requests from kv-proxy or kv-bench (`X-Kv-Route:
    /// direct`) and forwarded ones ([`ClusterNode::may_wait`]): their sender
    /// waits itself.
    ///
    /// One deadline for the whole request ([`KeyRequest::until`]): it counts
    /// from the request's arrival, every try's own wait for a quorum (a
    /// read's confirmation, a forwarded request's at its leader) ends there
    /// too, and it is [`kv_cluster::answer_margin`] short of `--leader-wait`,
    /// so the 503 is given within `--leader-wait` and says how long the
    /// request waited ([`ClusterError::Waited`]).
    async fn with_leader_wait<F, Fut>(
        &self,
        request: &KeyRequest<'_>,
        mut attempt: F,
    ) -> Result<Response<Body>, NodeError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Response<Body>, NodeError>>,
    {
        let deadline = request.until.unwrap_or(request.arrived);
        loop {
            let answer = attempt().await;
            let last = match answer {
                Err(NodeError::Cluster(
                    last @ (ClusterError::NoLeader { .. }
                    | ClusterError::NoQuorum { .. }
                    | ClusterError::LeaderUnreachable { .. }),
                )) => last,
                answer => return answer,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ClusterError::Waited {
                    last: Box::new(last),
                    waited: now.saturating_duration_since(request.arrived),
                }
                .into());
            }
            // The last try is made at the deadline, not skipped before it.
            tokio::time::sleep_until((now + LEADER_RETRY_PAUSE).min(deadline).into()).await;
        }
    }

    /// One try of a PUT or DELETE of `request.key`; `raw` is the request
    /// body as received (what a forward sends on).
    async fn write_once(
        &self,
        request: &KeyRequest<'_>,
        command: Command,
        raw: Bytes,
    ) -> Result<Response<Body>, NodeError> {
        let shard = request.shard;
        let leader = match self.serving(shard) {
            Some(hosted) => {
                if let Some(full) = self.disk_full() {
                    return self.around_full_disk(request, &hosted, raw, full).await;
                }
                if hosted
                    .raft
                    .metrics()
                    .borrow_watched()
                    .running_state
                    .is_err()
                {
                    return Err(ApiError::Unavailable(format!("shard {shard} {STOPPED}")).into());
                }
                let written =
                    tokio::time::timeout(self.write_timeout, hosted.raft.client_write(command))
                        .await;
                match written {
                    Ok(Ok(response)) => return Ok(outcome_response(response.data)),
                    Err(_) => {
                        return Err(self.unknown(format!(
                            "shard {shard}: not committed within {:?}; it may still be",
                            self.write_timeout
                        )))
                    }
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                        match leader_of(&hosted.raft, &forward) {
                            Ok(leader) => leader,
                            Err(()) if forward.reason == ForwardReason::LeaseExpired => {
                                return Err(ClusterError::NoQuorum { shard }.into())
                            }
                            Err(()) => return Err(ClusterError::NoLeader { shard }.into()),
                        }
                    }
                    Ok(Err(RaftError::APIError(error))) => {
                        log::debug!("shard {shard}: write not confirmed: {error}");
                        return Err(self.unknown(format!(
                            "shard {shard}: the leader changed before the write was confirmed"
                        )));
                    }
                    Ok(Err(RaftError::Fatal(_))) => {
                        return Err(self.unknown(format!(
                            "shard {shard} {STOPPED} after the write was proposed"
                        )))
                    }
                }
            }
            None => self.cached_leader(shard),
        };
        self.redirect(request, shard, leader, raw).await
    }

    /// One try of a GET or HEAD of `request.key`.
    async fn read_once(&self, request: &KeyRequest<'_>) -> Result<Response<Body>, NodeError> {
        let shard = request.shard;
        let Some(hosted) = self.serving(shard) else {
            let leader = self.cached_leader(shard);
            return self.redirect(request, shard, leader, Bytes::new()).await;
        };
        if request.stale() && self.leaving_in_joint(shard) {
            // This replica is the one its shard's move removes, and the
            // move reached its joint step: the group stops replicating to
            // it at any moment, so even a stale read goes to the leader
            // (docs/membership.md §6).
            let leader = hosted.raft.metrics().borrow_watched().current_leader;
            let leader = match leader {
                Some(id) if id != self.id() => LeaderAt {
                    id,
                    addr: String::new(),
                    term: 0,
                },
                _ => self.cached_leader(shard),
            };
            return self.redirect(request, shard, leader, Bytes::new()).await;
        }
        if request.stale() {
            let applied = hosted
                .raft
                .metrics()
                .borrow_watched()
                .last_applied
                .as_ref()
                .map_or(0, |l| l.index);
            let mut response = read_response(storage::read(&hosted.sm, request.key))?;
            response.headers_mut().insert(
                HeaderName::from_static(APPLIED_INDEX_HEADER),
                HeaderValue::from(applied),
            );
            return Ok(response);
        }
        if let Some(full) = self.disk_full() {
            return self
                .around_full_disk(request, &hosted, Bytes::new(), full)
                .await;
        }
        if self.read_policy == crate::config::ReadPolicy::Lease
            && hosted.gate.lease_ready(&hosted.raft, &hosted.sm)
        {
            self.path_stats.count_lease_local_read();
            return read_response(storage::read(&hosted.sm, request.key));
        }
        let started = Instant::now();
        // A confirmation waits for a quorum: never past the request's
        // deadline (its sender would have given up by then).
        let bound = request.bounded(self.write_timeout, started);
        match hosted
            .gate
            .confirm(&hosted.raft, bound, self.read_policy)
            .await
        {
            Ok(linearizer) => {
                let left = bound.saturating_sub(started.elapsed());
                match linearizer.try_await_ready(&hosted.raft, Some(left)).await {
                    Ok(Ok(_)) => read_response(storage::read(&hosted.sm, request.key)),
                    Ok(Err(_)) => Err(ClusterError::NoQuorum { shard }.into()),
                    Err(_) => Err(ApiError::Unavailable(format!("shard {shard} {STOPPED}")).into()),
                }
            }
            Err(ReadFail::NotLeader(leader)) => {
                self.redirect(request, shard, leader, Bytes::new()).await
            }
            Err(ReadFail::NoLeader) => Err(ClusterError::NoLeader { shard }.into()),
            Err(ReadFail::NoQuorum) => Err(ClusterError::NoQuorum { shard }.into()),
            Err(ReadFail::Failed(why)) => {
                Err(ApiError::Unavailable(format!("shard {shard} {why}")).into())
            }
        }
    }

    /// A write or linearizable read of a hosted shard while this node
    /// cannot persist (`full`): nothing is proposed or confirmed here. Its
    /// groups hand their leaderships away (`watch::disk`), and a group may
    /// be waiting on the disk to save a vote, so its metrics may still say
    /// it leads. The request goes to the leader when another node is known
    /// to lead; else a client's request goes to another replica, which
    /// serves it or names the leader (a 421 naming this node is "no leader
    /// yet", which [`ClusterNode::with_leader_wait`] waits out); a request
    /// that may not be forwarded (direct, or forwarded already) gets the
    /// store's 503 "disk full" answer, the one a standalone node gives.
    async fn around_full_disk(
        &self,
        request: &KeyRequest<'_>,
        hosted: &super::Hosted,
        raw: Bytes,
        full: kv_store::StoreError,
    ) -> Result<Response<Body>, NodeError> {
        let shard = request.shard;
        let me = self.id();
        let (leader, term) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            (m.current_leader, m.current_term)
        };
        let target = match leader.filter(|l| *l != me) {
            Some(id) => LeaderAt {
                id,
                addr: String::new(),
                term,
            },
            None if request.direct() || request.forwarded() => return Err(full.into()),
            None => {
                let other = self
                    .layout()
                    .replicas(shard)
                    .iter()
                    .copied()
                    .find(|id| *id != me);
                let Some(id) = other else {
                    return Err(full.into());
                };
                LeaderAt {
                    id,
                    addr: String::new(),
                    term: 0,
                }
            }
        };
        self.redirect(request, shard, target, raw).await
    }

    /// A key of a solo shard that `owner`, not this node, serves: treated
    /// as a Raft shard whose leader is the owner (always known, term 0), so
    /// 421 naming it with `X-Kv-Route: direct`, else forwarded once and
    /// relayed (503 if the owner cannot be reached before the request was
    /// sent, 504 for a write lost after).
    pub(crate) async fn to_owner(
        &self,
        request: &KeyRequest<'_>,
        owner: NodeId,
        raw: Bytes,
    ) -> Result<Response<Body>, NodeError> {
        let leader = LeaderAt {
            id: owner,
            addr: String::new(),
            term: 0,
        };
        self.redirect(request, request.shard, leader, raw).await
    }

    fn unknown(&self, why: String) -> NodeError {
        self.path_stats.outcome_unknown.fetch_add(1, Relaxed);
        ClusterError::OutcomeUnknown(why).into()
    }

    /// For a shard not hosted here: the leader last learnt, else its
    /// preferred leader (a 421 corrects a wrong guess).
    /// Whether this node is the replica an open move of `shard` removes,
    /// in its joint phase or later.
    fn leaving_in_joint(&self, shard: u32) -> bool {
        self.layout().state.as_ref().is_some_and(|state| {
            state
                .moves
                .get(&shard)
                .is_some_and(|mv| mv.phase == kv_cluster::Phase::Joint && mv.remove == self.id())
        })
    }

    pub(super) fn cached_leader(&self, shard: u32) -> LeaderAt {
        let cached = self
            .leader_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(shard as usize)
            .copied()
            .flatten();
        let layout = self.layout();
        // A cached leader that has since been removed is forgotten: the
        // preferred leader (a current replica) is asked instead.
        let id = cached
            .filter(|id| layout.members.contains_key(id))
            .unwrap_or_else(|| layout.preferred(shard));
        LeaderAt {
            id,
            addr: layout.members.get(&id).cloned().unwrap_or_default(),
            term: 0,
        }
    }

    /// A shard not hosted here whose cached leader `dead` could not be
    /// reached: next time ask the replica after it in placement order (it
    /// serves, or its 421 names the leader). Without this the cache would
    /// keep naming a dead node until a request happened to learn better.
    fn forget_leader(&self, shard: u32, dead: NodeId) {
        if self.serving(shard).is_some() {
            return;
        }
        let layout = self.layout();
        let replicas = layout.replicas(shard);
        if replicas.is_empty() {
            return;
        }
        let next = replicas
            .iter()
            .position(|id| *id == dead)
            .map_or(0, |i| (i + 1) % replicas.len().max(1));
        if let (Some(next), Some(slot)) = (
            replicas.get(next),
            self.leader_cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(shard as usize),
        ) {
            *slot = Some(*next);
        }
    }

    fn learn_leader(&self, shard: u32, leader: NodeId) {
        if self.serving(shard).is_none() {
            if let Some(slot) = self
                .leader_cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(shard as usize)
            {
                *slot = Some(leader);
            }
        }
    }

    /// Not the leader here: a 421, or forward to `leader` (once more at the
    /// leader its 421 names).
    async fn redirect(
        &self,
        request: &KeyRequest<'_>,
        shard: u32,
        leader: LeaderAt,
        raw: Bytes,
    ) -> Result<Response<Body>, NodeError> {
        let mut leader = leader;
        if leader.addr.is_empty() {
            leader.addr = self
                .layout()
                .members
                .get(&leader.id)
                .cloned()
                .unwrap_or_default();
        }
        if request.direct() || request.forwarded() {
            self.path_stats.not_leader.fetch_add(1, Relaxed);
            return Err(ClusterError::NotLeader(NotLeader::new(
                shard,
                leader.id,
                leader.addr,
                leader.term,
            ))
            .into());
        }
        let write = request.is_write();
        if write {
            self.path_stats.forwarded_writes.fetch_add(1, Relaxed);
        } else {
            self.path_stats.forwarded_reads.fetch_add(1, Relaxed);
        }
        let mut target = leader;
        for attempt in 0..2 {
            let addr = self
                .peer_addr(target.id)
                .unwrap_or_else(|| target.addr.clone());
            let send = self.forwarder.send(
                &addr,
                self.forward_request(request, raw.clone())?,
                self.write_timeout + Duration::from_secs(1),
            );
            // A read at a leader that stopped answering (frozen, cut off) is
            // given up once this node sees another leader (or none), and
            // waited out like an unreachable leader: safe, a read changes
            // nothing. A write in flight may be applied: never given up.
            let forwarded = if write {
                send.await
            } else {
                tokio::select! {
                    forwarded = send => forwarded,
                    () = self.leader_moved(shard, target.id) => Err(ForwardError::Lost(format!(
                        "no answer within {READ_PATIENCE:?}, and shard {shard} has another leader now"
                    ))),
                }
            };
            match forwarded {
                Ok(answer) if answer.status == StatusCode::MISDIRECTED_REQUEST => {
                    // Not proposed there: safe to try the leader it names, once.
                    match serde_json::from_slice::<NotLeader>(&answer.body) {
                        Ok(named)
                            if attempt == 0
                                && named.leader != target.id
                                && named.leader != self.id() =>
                        {
                            self.learn_leader(shard, named.leader);
                            target = LeaderAt {
                                id: named.leader,
                                addr: named.leader_addr,
                                term: named.term,
                            };
                        }
                        _ => return Err(ClusterError::NoLeader { shard }.into()),
                    }
                }
                Ok(answer) if answer.status == StatusCode::SERVICE_UNAVAILABLE => {
                    // The target has no leader or quorum either (not
                    // proposed): a client's request waits for one
                    // (`with_leader_wait`) rather than relaying the 503.
                    self.forget_leader(shard, target.id);
                    return Err(ClusterError::NoLeader { shard }.into());
                }
                Err(ForwardError::OtherCluster { theirs, .. }) => {
                    // The target belongs to another cluster (design §8): it
                    // refused before doing anything, so as an unreachable
                    // leader (waited out, then 503, in our words), never
                    // relayed.
                    self.forget_leader(shard, target.id);
                    return Err(ClusterError::LeaderUnreachable {
                        shard,
                        leader: target.id,
                        addr,
                        why: format!(
                            "it belongs to cluster {theirs}, this node to cluster {}",
                            self.cluster_id.get().map_or("?", String::as_str)
                        ),
                    }
                    .into());
                }
                Ok(answer) => {
                    self.learn_leader(shard, target.id);
                    return Ok(relay(answer, target.id));
                }
                Err(ForwardError::Lost(why)) if write => {
                    return Err(self.unknown(format!(
                        "shard {shard}: forwarded to node {}: {why}",
                        target.id
                    )))
                }
                // Not sent, or a read lost on the way: nothing was proposed.
                Err(ForwardError::NotSent(why) | ForwardError::Lost(why)) => {
                    self.forget_leader(shard, target.id);
                    return Err(ClusterError::LeaderUnreachable {
                        shard,
                        leader: target.id,
                        addr,
                        why,
                    }
                    .into());
                }
            }
        }
        Err(ClusterError::NoLeader { shard }.into())
    }

    /// The request as forwarded: same method (a HEAD goes as GET, so this
    /// node's answer keeps the leader's `Content-Length`), path and body,
    /// marked with this node's id.
    fn forward_request(
        &self,
        request: &KeyRequest<'_>,
        raw: Bytes,
    ) -> Result<Request<Full<Bytes>>, NodeError> {
        let parts = request.parts;
        let method = if parts.method == Method::HEAD {
            Method::GET
        } else {
            parts.method.clone()
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(FORWARDED_BY_HEADER, self.id());
        if let Some(until) = request.until {
            // The leader cuts its wait for a quorum where this request's
            // wait ends.
            let left = until.saturating_duration_since(Instant::now());
            builder = builder.header(
                WAIT_BUDGET_HEADER,
                u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            );
        }
        for name in [CONTENT_TYPE.as_str(), CONSISTENCY_HEADER] {
            if let Some(value) = parts.headers.get(name) {
                builder = builder.header(name, value);
            }
        }
        builder
            .body(Full::new(raw))
            .map_err(|error| NodeError::from(ApiError::BadRequest(leak_reason(&error))))
    }
}

/// `ApiError::BadRequest` takes a static reason; a request that cannot be
/// rebuilt is a bug, named generically.
fn leak_reason(_error: &hyper::http::Error) -> &'static str {
    "the request cannot be forwarded"
}

/// The leader's answer as this node's, with `X-Kv-Leader-Id`.
fn relay(answer: Forwarded, leader: NodeId) -> Response<Body> {
    let mut response = json_response(answer.status, answer.body);
    let headers = response.headers_mut();
    for name in [
        CONTENT_TYPE.as_str(),
        RETRY_AFTER.as_str(),
        APPLIED_INDEX_HEADER,
    ] {
        if let Some(value) = answer.headers.get(name) {
            headers.insert(HeaderName::from_static(name), value.clone());
        }
    }
    headers.insert(
        HeaderName::from_static(LEADER_ID_HEADER),
        HeaderValue::from(leader),
    );
    response
}

fn outcome_response(outcome: Outcome) -> Response<Body> {
    match outcome {
        Outcome::Stored => json_response(StatusCode::OK, Bytes::from_static(STORED)),
        Outcome::Deleted { found: true } => {
            json_response(StatusCode::OK, Bytes::from_static(DELETED))
        }
        Outcome::Deleted { found: false } => ApiError::KeyNotFound.into_response(),
        // Metadata commands go to the metadata group only (issue 13), never
        // through a shard's client path.
        Outcome::Meta(_) => {
            ApiError::Internal("a shard answered with a metadata outcome").into_response()
        }
    }
}

fn read_response(body: Option<Bytes>) -> Result<Response<Body>, NodeError> {
    match body {
        Some(body) => Ok(json_response(StatusCode::OK, body)),
        None => Err(ApiError::KeyNotFound.into()),
    }
}
