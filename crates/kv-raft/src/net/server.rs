//! The server side of `/-/raft/...`: one function, [`handle_raft`], that a
//! node mounts on its port, over the node's [`Groups`].
//!
//! Everything arriving here comes from the network: bodies are read under a
//! size limit and decoded without trusting them; a body that does not decode
//! is a 400 and an unknown group a 404, both as JSON `{"error": ...}` like
//! every other error kv answers. Inside an append batch an unknown group is
//! answered per item instead, so one group that is not hosted (yet) does not
//! fail the other groups' heartbeats.
//!
//! Decoding is not enough: openraft asserts on messages no protocol-following
//! leader sends (entries that do not follow `prev_log_id`, log ids from
//! beyond the sender's vote), and a failed assertion kills that group's core
//! task. Such appends and snapshots are refused before openraft sees them
//! (400, or `WireError::Malformed` per item in a batch). This is a guard
//! against bugs and garbage, not against a lying peer: authenticating peers
//! is issue 14's.
//!
//! **Restart guard.** openraft refuses votes while the leader lease
//! (`election_timeout_max`) of the last leader this replica heard from
//! holds, and `--read-policy lease` relies on it: a leader serves reads from
//! a quorum acknowledgement younger than the lease because that quorum will
//! elect nobody else before it ends. But openraft keeps the lease only in
//! memory: a replica restarted inside a leader's lease loads its vote with a
//! zero lease and would vote at once, so a new leader could commit writes
//! while the old one still serves lease reads. So a group's vote and
//! pre-vote requests are refused for one lease after it is hosted here (in
//! this process), answered as openraft answers inside a lease: not granted,
//! with this replica's vote and last log id. Requests with
//! `leadership_transfer` pass, as they pass openraft's own lease check: the
//! leader that starts a transfer marks itself transferring, which makes it
//! refuse new read linearizers (`ensure_leader_handler`, reason
//! `LeadershipTransfer`), and disables its own lease before it sends the
//! transfer (`LeaderHandler::transfer_leader`), so no lease read of the old
//! leader is served once a transfer election can begin (a transfer goes
//! straight to a vote; openraft never sets the flag on a pre-vote). The
//! guard reads the lease from the group's own config, as openraft does:
//! every node of a cluster runs the same timeouts. The cost: a fresh
//! cluster's first election and a restarted replica's vote wait one lease.
//!
//! **Catch-up guard** (`super::catch_up`): a group hosted with
//! [`Groups::insert_catching_up`] (every group of a node whose recovery
//! repaired something) refuses every vote and pre-vote, transfer or not,
//! with the restart guard's answer, and stands for no election, until its
//! committed index reaches its leader's; appends set and check that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use openraft::alias::SnapshotOf;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::storage::RaftStateMachine;

use crate::net::catch_up::Election;
use crate::net::wire::{self, WireError};
use crate::types::{GroupId, KvRaft, Raft, SnapshotData};

/// The response body type of [`handle_raft`] (kv-http's).
pub type Body = Full<Bytes>;

/// The groups a node hosts: group id → its `Raft` handle, when an append
/// from the group's leader was last accepted here, when it was hosted
/// (the restart guard's start), and its election switches (the catch-up
/// guard's state).
pub struct Groups<SM: RaftStateMachine<KvRaft>> {
    inner: RwLock<HashMap<GroupId, Hosted<SM>>>,
    /// Vote and pre-vote requests refused by the restart guard.
    restart_refusals: AtomicU64,
    /// Vote and pre-vote requests refused by the catch-up guard.
    catch_up_refusals: AtomicU64,
    /// Groups catching up now; shared with their release watchers.
    catching_up: Arc<AtomicUsize>,
}

/// One hosted group: its handle, its leader contact time, when it was
/// hosted in this process, and its election switches.
struct Hosted<SM: RaftStateMachine<KvRaft>> {
    raft: Raft<SM>,
    contact: Arc<Contact>,
    hosted_at: Instant,
    election: Arc<Election>,
}

impl<SM: RaftStateMachine<KvRaft>> Clone for Hosted<SM> {
    fn clone(&self) -> Self {
        Self {
            raft: self.raft.clone(),
            contact: Arc::clone(&self.contact),
            hosted_at: self.hosted_at,
            election: Arc::clone(&self.election),
        }
    }
}

/// When this replica last accepted an append or heartbeat from its group's
/// leader (one that did not answer "higher vote"): a follower's evidence
/// that it has a live leader, which openraft's metrics do not carry (a
/// follower keeps naming its last leader however long it is silent).
/// Milliseconds since [`epoch`], 0 for never: one relaxed store per append.
#[derive(Default)]
struct Contact(AtomicU64);

/// The base of [`Contact`]'s clock.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Contact {
    fn touch(&self) {
        let millis = epoch().elapsed().as_millis() as u64;
        // 0 means never: the first millisecond counts as 1.
        self.0.store(millis.max(1), Ordering::Relaxed);
    }

    fn last(&self) -> Option<Instant> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            millis => Some(epoch() + Duration::from_millis(millis)),
        }
    }
}

impl<SM: RaftStateMachine<KvRaft>> Default for Groups<SM> {
    fn default() -> Self {
        Self {
            inner: RwLock::new(HashMap::new()),
            restart_refusals: AtomicU64::new(0),
            catch_up_refusals: AtomicU64::new(0),
            catching_up: Arc::default(),
        }
    }
}

impl<SM: RaftStateMachine<KvRaft>> Groups<SM> {
    /// Hosts `raft` as group `group` (replacing any earlier handle). The
    /// restart guard refuses the group's votes for one lease from now.
    pub fn insert(&self, group: GroupId, raft: Raft<SM>) {
        self.host(group, raft, Arc::new(Election::new(false)));
    }

    /// Hosts `raft` as group `group` catching up (module docs, catch-up
    /// guard): no vote and no campaign until its committed index reaches
    /// its leader's. Create `raft` with elections off (openraft's
    /// `Config::enable_elect`), so that it never campaigns before this;
    /// they are switched off here too. Spawns the task that releases the
    /// group when its metrics say it caught up (also as a leader, which
    /// gets no appends); appends check too. Call from within tokio.
    pub fn insert_catching_up(&self, group: GroupId, raft: Raft<SM>) {
        raft.runtime_config().elect(false);
        let election = Arc::new(Election::new(true));
        self.catching_up.fetch_add(1, Ordering::Relaxed);
        self.host(group, raft.clone(), Arc::clone(&election));
        let catching_up = Arc::clone(&self.catching_up);
        let mut metrics = raft.metrics();
        tokio::spawn(async move {
            loop {
                if !election.is_catching_up() {
                    return;
                }
                if election.release_if_caught_up(&raft) {
                    released(group, &catching_up);
                    return;
                }
                // Ends when the group shuts down.
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    fn host(&self, group: GroupId, raft: Raft<SM>, election: Arc<Election>) {
        let hosted = Hosted {
            raft,
            contact: Arc::default(),
            hosted_at: Instant::now(),
            election,
        };
        let old = self
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group, hosted);
        if let Some(old) = old {
            self.forget(group, &old);
        }
    }

    fn forget(&self, group: GroupId, hosted: &Hosted<SM>) {
        if hosted.election.forget() {
            released(group, &self.catching_up);
        }
    }

    /// Stops hosting `group`; returns its handle.
    pub fn remove(&self, group: GroupId) -> Option<Raft<SM>> {
        let hosted = self
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&group)?;
        self.forget(group, &hosted);
        Some(hosted.raft)
    }

    /// Group `group`'s handle, if hosted.
    pub fn get(&self, group: GroupId) -> Option<Raft<SM>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .map(|hosted| hosted.raft.clone())
    }

    /// When this replica of `group` last accepted an append or heartbeat
    /// from the group's leader; `None` if never since it was hosted.
    pub fn last_leader_contact(&self, group: GroupId) -> Option<Instant> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .and_then(|hosted| hosted.contact.last())
    }

    /// How many vote and pre-vote requests the restart guard refused (all
    /// groups, since this `Groups` was made).
    pub fn restart_vote_refusals(&self) -> u64 {
        self.restart_refusals.load(Ordering::Relaxed)
    }

    /// How many vote and pre-vote requests the catch-up guard refused (all
    /// groups, since this `Groups` was made).
    pub fn catch_up_vote_refusals(&self) -> u64 {
        self.catch_up_refusals.load(Ordering::Relaxed)
    }

    /// How many hosted groups are catching up (module docs): they neither
    /// vote nor stand for election.
    pub fn catching_up(&self) -> usize {
        self.catching_up.load(Ordering::Relaxed)
    }

    /// Whether group `group` is hosted and catching up.
    pub fn is_catching_up(&self, group: GroupId) -> bool {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .is_some_and(|hosted| hosted.election.is_catching_up())
    }

    /// Holds group `group`'s elections for the node (`held`: a full disk)
    /// or lets them go again; a group catching up stands for none either
    /// way until released. Instead of openraft's `runtime_config().elect`,
    /// which would undo the catch-up guard.
    pub fn hold_elections(&self, group: GroupId, held: bool) {
        if let Some(hosted) = self.get_with_contact(group) {
            hosted.election.hold(&hosted.raft, held);
        }
    }

    fn get_with_contact(&self, group: GroupId) -> Option<Hosted<SM>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .cloned()
    }
}

/// Why a `/-/raft/...` request was refused: the one place mapping each case
/// to a status.
#[derive(Debug, thiserror::Error)]
pub enum RaftHttpError {
    /// No such route under `/-/raft/`.
    #[error("Unknown raft path")]
    UnknownPath,
    /// Every route is a POST.
    #[error("Method not allowed; this path accepts POST")]
    MethodNotAllowed,
    /// The body names a group this node does not host.
    #[error("Unknown raft group {0}")]
    UnknownGroup(GroupId),
    /// The body is not a valid message for the route.
    #[error("Undecodable raft message: {0}")]
    Undecodable(#[source] postcard::Error),
    /// The message decodes but no protocol-following leader sends it
    /// (openraft asserts on such messages and its group would die).
    #[error("Malformed raft message: {0}")]
    Malformed(String),
    /// The body is over the route's limit.
    #[error("Raft message too large: the limit is {limit} bytes")]
    TooLarge { limit: usize },
    /// The body could not be read (the peer went away).
    #[error("Could not read the raft message: {0}")]
    BodyRead(String),
    /// The group refused fatally (shutting down, storage error).
    #[error("Raft group {group} failed: {message}")]
    Fatal { group: GroupId, message: String },
    /// The answer could not be encoded (never expected).
    #[error("Could not encode the raft answer: {0}")]
    Encode(#[source] postcard::Error),
}

impl RaftHttpError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            RaftHttpError::UnknownPath | RaftHttpError::UnknownGroup(_) => StatusCode::NOT_FOUND,
            RaftHttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RaftHttpError::Undecodable(_)
            | RaftHttpError::Malformed(_)
            | RaftHttpError::BodyRead(_) => StatusCode::BAD_REQUEST,
            RaftHttpError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RaftHttpError::Fatal { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RaftHttpError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": self.to_string() }).to_string() + "\n";
        let mut response = kv_http::json_response(self.status(), Bytes::from(body));
        if self.status() == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// Serves one `/-/raft/...` request against the node's groups. Never
/// panics on what the peer sent; every failure is a JSON error.
pub async fn handle_raft<B, SM>(request: Request<B>, groups: &Groups<SM>) -> Response<Body>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    SM: RaftStateMachine<KvRaft, SnapshotData = SnapshotData>,
{
    // OPTIONS on a route: 204 with `Allow`, as on every other path
    // (RFC 9110 §9.3.7).
    if request.method() == Method::OPTIONS && route_of(request.uri().path()).is_some() {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    match serve(request, groups).await {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(wire::CONTENT_TYPE));
            response
        }
        Err(error) => {
            if !matches!(error, RaftHttpError::Fatal { .. }) {
                log::debug!("refused a raft request: {error}");
            }
            error.into_response()
        }
    }
}

async fn serve<B, SM>(request: Request<B>, groups: &Groups<SM>) -> Result<Vec<u8>, RaftHttpError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    SM: RaftStateMachine<KvRaft, SnapshotData = SnapshotData>,
{
    let route = route_of(request.uri().path()).ok_or(RaftHttpError::UnknownPath)?;
    if request.method() != Method::POST {
        return Err(RaftHttpError::MethodNotAllowed);
    }
    let limit = if route == wire::SNAPSHOT {
        wire::MAX_SNAPSHOT_BODY
    } else {
        wire::MAX_RPC_BODY
    };
    let body = read_body(request.into_body(), limit).await?;
    match route {
        wire::APPEND => {
            let batch: wire::AppendBatch =
                wire::decode(&body).map_err(RaftHttpError::Undecodable)?;
            let replies: wire::AppendReplies =
                futures_util::future::join_all(batch.into_iter().map(|(group, rpc)| async move {
                    let reply = match (groups.get_with_contact(group), check_append(&rpc)) {
                        (None, _) => Err(WireError::UnknownGroup(group)),
                        (Some(_), Err(message)) => Err(WireError::Malformed { group, message }),
                        (Some(hosted), Ok(())) => {
                            // The catch-up target (`catch_up` docs): the
                            // sender's commit, when of its own term.
                            let own_term_commit = rpc
                                .leader_commit
                                .as_ref()
                                .filter(|commit| commit.leader_id == rpc.vote.leader_id)
                                .map(|commit| commit.index);
                            let reply = hosted.raft.append_entries(rpc).await.map_err(|error| {
                                WireError::Fatal {
                                    group,
                                    message: error.to_string(),
                                }
                            });
                            // Any answer but "higher vote" accepted the sender
                            // as leader.
                            if matches!(&reply, Ok(answer) if !matches!(answer, AppendEntriesResponse::HigherVote(_)))
                            {
                                hosted.contact.touch();
                                if hosted.election.is_catching_up() {
                                    hosted.election.note_append(own_term_commit);
                                    // Also here: an idle group's metrics may
                                    // not change again once caught up.
                                    if hosted.election.release_if_caught_up(&hosted.raft) {
                                        released(group, &groups.catching_up);
                                    }
                                }
                            }
                            reply
                        }
                    };
                    (group, reply)
                }))
                .await;
            wire::encode(&replies).map_err(RaftHttpError::Encode)
        }
        wire::VOTE | wire::PRE_VOTE => {
            let (group, rpc): wire::VoteBody =
                wire::decode(&body).map_err(RaftHttpError::Undecodable)?;
            let Hosted {
                raft,
                hosted_at,
                election,
                ..
            } = groups
                .get_with_contact(group)
                .ok_or(RaftHttpError::UnknownGroup(group))?;
            if election.is_catching_up() {
                groups.catch_up_refusals.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "group {group}: refused {} {rpc}: catching up after a repair",
                    if route == wire::VOTE {
                        "vote"
                    } else {
                        "pre-vote"
                    }
                );
                return wire::encode(&refusal(&raft)).map_err(RaftHttpError::Encode);
            }
            if let Some(refusal) = restart_guard(&raft, hosted_at, &rpc) {
                groups.restart_refusals.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "group {group}: refused {} {rpc}: hosted {:?} ago, inside one leader lease",
                    if route == wire::VOTE {
                        "vote"
                    } else {
                        "pre-vote"
                    },
                    hosted_at.elapsed()
                );
                return wire::encode(&refusal).map_err(RaftHttpError::Encode);
            }
            let reply = if route == wire::VOTE {
                raft.vote(rpc).await
            } else {
                raft.pre_vote(rpc).await
            };
            let reply: wire::VoteReply = reply.map_err(|error| fatal(group, &error))?;
            wire::encode(&reply).map_err(RaftHttpError::Encode)
        }
        wire::TRANSFER_LEADER => {
            let (group, rpc): wire::TransferBody =
                wire::decode(&body).map_err(RaftHttpError::Undecodable)?;
            let raft = groups
                .get(group)
                .ok_or(RaftHttpError::UnknownGroup(group))?;
            let reply: wire::TransferReply = raft
                .handle_transfer_leader(rpc)
                .await
                .map_err(|error| fatal(group, &error))?;
            wire::encode(&reply).map_err(RaftHttpError::Encode)
        }
        _ => {
            let (group, vote, meta, data): wire::SnapshotBody =
                wire::decode(&body).map_err(RaftHttpError::Undecodable)?;
            let raft = groups
                .get(group)
                .ok_or(RaftHttpError::UnknownGroup(group))?;
            if let Some(last) = &meta.last_log_id {
                if last.leader_id > vote.leader_id {
                    return Err(RaftHttpError::Malformed(format!(
                        "snapshot up to {last} is beyond its sender's vote {vote}"
                    )));
                }
            }
            let snapshot = SnapshotOf::<KvRaft, SnapshotData> {
                meta,
                snapshot: SnapshotData::new(data),
            };
            let reply: wire::SnapshotReply = raft
                .install_full_snapshot(vote, snapshot)
                .await
                .map_err(|error| fatal(group, &error))?;
            wire::encode(&reply).map_err(RaftHttpError::Encode)
        }
    }
}

/// The route `path` names, if any.
fn route_of(path: &str) -> Option<&'static str> {
    Some(match path {
        wire::APPEND => wire::APPEND,
        wire::VOTE => wire::VOTE,
        wire::PRE_VOTE => wire::PRE_VOTE,
        wire::TRANSFER_LEADER => wire::TRANSFER_LEADER,
        wire::SNAPSHOT => wire::SNAPSHOT,
        _ => return None,
    })
}

/// The restart guard (module docs): within one leader lease
/// (`election_timeout_max`, openraft's `leader_lease`) of `hosted_at`, the
/// answer to a vote or pre-vote request without `leadership_transfer`:
/// what openraft answers inside a lease (`Engine::handle_vote_req`), not
/// granted, with this replica's vote and last log id, so the candidate
/// treats it as any refusal (it adopts a higher term, non-committed, and
/// notes a longer log). Read from the group's metrics, which may trail the
/// core by an instant: both fields only inform the candidate.
fn restart_guard<SM: RaftStateMachine<KvRaft>>(
    raft: &Raft<SM>,
    hosted_at: Instant,
    rpc: &VoteRequest<KvRaft>,
) -> Option<VoteResponse<KvRaft>> {
    if rpc.leadership_transfer {
        return None;
    }
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    if hosted_at.elapsed() >= lease {
        return None;
    }
    Some(refusal(raft))
}

/// The refusal both guards answer: what openraft answers inside a lease,
/// not granted, with this replica's vote and last log id.
fn refusal<SM: RaftStateMachine<KvRaft>>(raft: &Raft<SM>) -> VoteResponse<KvRaft> {
    let vote = raft.server_metrics().borrow_watched().vote;
    let last_log_id = raft.data_metrics().borrow_watched().last_log;
    VoteResponse::new(vote, last_log_id, false)
}

/// Counts a group released by the catch-up guard (or no longer hosted while
/// catching up); logs once when none is left.
fn released(group: GroupId, catching_up: &AtomicUsize) {
    let left = catching_up
        .fetch_sub(1, Ordering::Relaxed)
        .saturating_sub(1);
    log::debug!("group {group}: no longer catching up after the repair");
    if left == 0 {
        log::info!(
            "catch-up guard: every group of this node has caught up after the repair; they vote \
             and stand for election again"
        );
    }
}

/// What every append from a protocol-following leader satisfies and
/// openraft asserts (a failed assertion kills the group's core task):
/// entries follow `prev_log_id` at consecutive indexes, log ids increase,
/// and none is from a leader later than the sender's vote.
fn check_append(rpc: &AppendEntriesRequest<KvRaft>) -> Result<(), String> {
    let mut previous = rpc.prev_log_id;
    if let Some(prev) = &rpc.prev_log_id {
        if prev.leader_id > rpc.vote.leader_id {
            return Err(format!(
                "prev_log_id {prev} is beyond the sender's vote {}",
                rpc.vote
            ));
        }
    }
    let first_index = rpc.prev_log_id.map_or(0, |log_id| log_id.index + 1);
    for (due, entry) in (first_index..).zip(&rpc.entries) {
        let log_id = entry.log_id;
        if log_id.index != due {
            return Err(format!("entry {log_id} where index {due} was due"));
        }
        if previous.is_some_and(|previous| previous.leader_id > log_id.leader_id) {
            return Err(format!(
                "entry {log_id} is from an earlier leader than the one before it"
            ));
        }
        if log_id.leader_id > rpc.vote.leader_id {
            return Err(format!(
                "entry {log_id} is beyond the sender's vote {}",
                rpc.vote
            ));
        }
        previous = Some(log_id);
    }
    Ok(())
}

fn fatal(group: GroupId, error: &dyn std::fmt::Display) -> RaftHttpError {
    RaftHttpError::Fatal {
        group,
        message: error.to_string(),
    }
}

async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, RaftHttpError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => match error.downcast::<http_body_util::LengthLimitError>() {
            Ok(_) => Err(RaftHttpError::TooLarge { limit }),
            Err(error) => Err(RaftHttpError::BodyRead(error.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn answer(path: &str, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
        let groups = Groups::<crate::mem::MemSm>::default();
        let request = Request::post(path)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = handle_raft(request, &groups).await;
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn an_oversized_append_is_413_json() {
        let (status, json) = answer(wire::APPEND, vec![0; wire::MAX_RPC_BODY + 1]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            json["error"],
            format!(
                "Raft message too large: the limit is {} bytes",
                wire::MAX_RPC_BODY
            )
        );
    }

    #[tokio::test]
    async fn every_truncation_of_a_vote_is_a_400_json() {
        let vote = openraft::raft::VoteRequest::<KvRaft>::new(openraft::Vote::new(7, 2), None);
        let bytes = wire::encode(&(3u32, vote)).unwrap();
        for cut in 0..bytes.len() {
            let (status, json) = answer(wire::VOTE, bytes[..cut].to_vec()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "cut at {cut}");
            assert!(json["error"].as_str().unwrap().starts_with("Undecodable"));
        }
        // Whole, it decodes: the group is simply not hosted.
        let (status, _) = answer(wire::VOTE, bytes).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    fn append(
        vote_term: u64,
        prev: Option<(u64, u64)>,
        entries: &[(u64, u64)],
    ) -> AppendEntriesRequest<KvRaft> {
        let log_id = |(term, index)| openraft::testing::log_id::<KvRaft>(term, 2, index);
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(vote_term, 2),
            prev_log_id: prev.map(log_id),
            entries: entries
                .iter()
                .map(|at| openraft::alias::EntryOf::<KvRaft> {
                    log_id: log_id(*at),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
            leader_commit: None,
        }
    }

    #[test]
    fn appends_a_leader_could_send_pass_the_check() {
        assert!(check_append(&append(3, None, &[])).is_ok());
        assert!(check_append(&append(3, Some((1, 4)), &[])).is_ok());
        assert!(check_append(&append(3, None, &[(1, 0), (1, 1), (3, 2)])).is_ok());
        assert!(check_append(&append(3, Some((2, 4)), &[(2, 5), (3, 6)])).is_ok());
    }

    #[test]
    fn appends_no_leader_sends_fail_the_check() {
        // A gap, a repeat, and not following prev_log_id.
        assert!(check_append(&append(3, None, &[(1, 0), (1, 2)])).is_err());
        assert!(check_append(&append(3, None, &[(1, 0), (1, 0)])).is_err());
        assert!(check_append(&append(3, Some((1, 4)), &[(1, 4)])).is_err());
        // A later entry from an earlier leader.
        assert!(check_append(&append(3, None, &[(2, 0), (1, 1)])).is_err());
        // Entries or prev from beyond the sender's own vote.
        assert!(check_append(&append(3, None, &[(4, 0)])).is_err());
        assert!(check_append(&append(3, Some((5, 1)), &[])).is_err());
    }
}
