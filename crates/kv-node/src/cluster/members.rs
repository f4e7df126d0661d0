//! The cluster's HTTP API of issue 13 (`docs/membership.md` §4.1, §4.5, §8):
//!
//! | request | answer |
//! |---|---|
//! | `GET /-/cluster` | [`ClusterView`]: members, version, move counts, each admitted move's progress (asked of its shard's leader); `?local`: this node's executors' [`LocalProgress`] |
//! | `POST /-/cluster/members {"id", "addr"}` | 202 `{"id", "addr", "state": "joining", "version"}`; 200 when already a member at that address |
//! | `DELETE /-/cluster/members/<id>` | 202 `{"id", "state": "leaving", "version"}`; 200 when already leaving or removed |
//! | `POST /-/meta/propose` (JSON [`MetaCommand`]) | 200 `{"outcome": ..., "version": N}`: a proposal forwarded by another node |
//!
//! Every change is a proposal to the metadata group ([`ClusterNode::propose`]):
//! it is first applied to a copy of this node's state (a dry run with the
//! same pure [`kv_cluster::apply`]), so a refusal the state already decides
//! (unknown id 404, taken id or address 409, too few members left 409,
//! `--replicas 1` 409) is answered without a round trip and proposes
//! nothing; the metadata group applies it again for real, so a decision made
//! on a stale copy is refused there, never harmful. A new member's address
//! must answer `GET /-/raft/cluster` as that id of no or this cluster before
//! it is proposed. Errors are [`MembershipError`]s (one status map).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use kv_cluster::meta::{self, ClusterId, ClusterState, MemberState, MetaCommand, Refusal};
use kv_cluster::{
    decode_cluster, ClusterView, LocalProgress, MoveProgress, NodeKnowledge, Phase, PlacementFields,
};
use kv_http::{json_response, ApiError, Body};
use kv_raft::NodeId;
use serde::Deserialize;

use super::meta::PROPOSE_PATH;
use super::request::is_forwarded;
use super::ClusterNode;
use crate::error::{MembershipError, NodeError};

/// Largest body of a members request or a forwarded proposal.
const MAX_BODY: usize = 64 << 10;
/// How long the new member's address gets to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const MEMBERS_PATH: &str = "/-/cluster/members";
/// How long each shard leader gets to answer `GET /-/cluster?local`.
const PROGRESS_TIMEOUT: Duration = Duration::from_millis(500);

/// The methods a path of the module table takes (`Allow`, for OPTIONS and
/// 405); `None` for any other path.
pub(crate) fn allow(path: &str) -> Option<&'static str> {
    match path {
        "/-/cluster" => Some("GET, HEAD, OPTIONS"),
        PROPOSE_PATH | MEMBERS_PATH => Some("POST, OPTIONS"),
        _ => path
            .strip_prefix(MEMBERS_PATH)?
            .strip_prefix('/')
            .map(|_| "DELETE, OPTIONS"),
    }
}

/// Answers the paths of the module table; `None` for any other path.
pub(crate) async fn route(
    node: &ClusterNode,
    parts: &Parts,
    body: &mut Option<Incoming>,
) -> Option<Result<Response<Body>, NodeError>> {
    let path = parts.uri.path();
    let allow = allow(path)?;
    Some(match (&parts.method, path) {
        (&Method::GET | &Method::HEAD, "/-/cluster") => node.cluster_view(parts.uri.query()).await,
        (&Method::POST, PROPOSE_PATH) => forwarded_proposal(node, parts, body).await,
        (&Method::POST, MEMBERS_PATH) => add_member(node, body).await,
        (&Method::DELETE, _) if allow.starts_with("DELETE") => {
            let id = path.strip_prefix(MEMBERS_PATH)?.strip_prefix('/')?;
            remove_member(node, id).await
        }
        _ => Err(ApiError::MethodNotAllowed { allow }.into()),
    })
}

/// A JSON answer with a trailing newline.
fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    json_response(status, Bytes::from(bytes))
}

async fn read_body(body: &mut Option<Incoming>) -> Result<Bytes, MembershipError> {
    let Some(body) = body.take() else {
        return Ok(Bytes::new());
    };
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                MembershipError::BodyTooLarge { limit: MAX_BODY }
            } else {
                MembershipError::BadRequest(format!("cannot read the body: {error}"))
            }
        })
}

impl ClusterNode {
    /// The state this node applied, or the one its `--replicas 1` cluster
    /// implies (no metadata group: members never change, so version 1).
    fn state_or_static(&self) -> Result<std::sync::Arc<ClusterState>, MembershipError> {
        if let Some(state) = self.cluster_state() {
            return Ok(state);
        }
        if self.meta().is_none() {
            let id = self
                .cluster_id
                .get()
                .and_then(|id| id.parse::<ClusterId>().ok())
                .unwrap_or_default();
            return Ok(std::sync::Arc::new(ClusterState::from_spec(&self.spec, id)));
        }
        Err(MembershipError::Refused(Refusal::NotBootstrapped))
    }

    /// `GET /-/cluster` (design §8); `?local`: this node's executors only.
    async fn cluster_view(&self, query: Option<&str>) -> Result<Response<Body>, NodeError> {
        let state = self.state_or_static()?;
        if query.is_some_and(|q| q.split('&').any(|p| p == "local")) {
            let local = LocalProgress {
                node_id: self.id(),
                version: state.version,
                moves: self.local_progress(),
            };
            return Ok(json(
                StatusCode::OK,
                &serde_json::to_value(local).unwrap_or_default(),
            ));
        }
        let leaders: Vec<Option<NodeId>> = (0..self.spec.shards)
            .map(|shard| self.leader_now(shard))
            .collect();
        let known = NodeKnowledge {
            node_id: self.id(),
            meta_leader: self.meta_leader(),
            progress: self.progress(&state, &leaders).await,
            leaders,
            meta_voters: self.meta_voters_now(),
        };
        let view = ClusterView::new(&state, &known);
        Ok(json(
            StatusCode::OK,
            &serde_json::to_value(view).unwrap_or_default(),
        ))
    }

    /// Bytes and percent of the admitted moves: this node's executors', and
    /// those of each other shard leader that executes one, from its
    /// `GET /-/cluster?local` (bounded by [`PROGRESS_TIMEOUT`] each; a
    /// leader that does not answer leaves its moves' progress null).
    async fn progress(
        &self,
        state: &ClusterState,
        leaders: &[Option<NodeId>],
    ) -> Vec<MoveProgress> {
        let mut progress = self.local_progress();
        let me = self.id();
        let executors: std::collections::BTreeSet<NodeId> = state
            .moves
            .iter()
            .filter(|(_, mv)| mv.phase != Phase::Planned)
            .filter_map(|(shard, _)| leaders.get(*shard as usize).copied().flatten())
            .filter(|leader| *leader != me)
            .collect();
        for leader in executors {
            let Some(addr) = self.peer_addr(leader) else {
                continue;
            };
            let Ok(request) = Request::get("/-/cluster?local").body(Full::new(Bytes::new())) else {
                continue;
            };
            let Ok(answer) = self.forwarder.send(&addr, request, PROGRESS_TIMEOUT).await else {
                continue;
            };
            if answer.status != StatusCode::OK {
                continue;
            }
            if let Ok(local) = serde_json::from_slice::<LocalProgress>(&answer.body) {
                progress.extend(local.moves);
            }
        }
        progress
    }

    /// `GET /-/shards`: issue 12's view, plus the placement fields once a
    /// cluster state is applied (`kv_cluster::shards_body`), and the
    /// cluster id (`cluster.json`'s) as soon as this node knows it, so a
    /// client can tell this cluster from one that had its addresses before
    /// (`kv_cluster::ShardTable::merge`).
    pub fn shards_json(&self) -> Vec<u8> {
        let view = self.shards_view();
        let stored_id = self
            .cluster_id
            .get()
            .and_then(|id| id.parse::<ClusterId>().ok());
        let mut fields = match self.cluster_state() {
            Some(state) => PlacementFields::new(&state),
            None => PlacementFields::default(),
        };
        fields.cluster_id = stored_id.or(fields.cluster_id);
        if fields == PlacementFields::default() {
            // Nothing to add: issue 12's body, as before.
            return serde_json::to_vec(&view).unwrap_or_default();
        }
        kv_cluster::shards_body(&view, &fields)
    }

    /// Applies `cmd` to a copy of this node's state: the refusal or outcome
    /// the metadata group would give now, and the state after it.
    fn dry_run(&self, cmd: &MetaCommand) -> Result<(meta::Outcome, ClusterState), MembershipError> {
        if self.meta().is_none() {
            return Err(MembershipError::Refused(Refusal::SingleReplica));
        }
        let mut state = (*self.state_or_static()?).clone();
        let outcome = kv_cluster::apply(&mut state, cmd).map_err(MembershipError::Refused)?;
        Ok((outcome, state))
    }

    /// Whether `addr` answers as member `id` of no cluster yet or of ours.
    async fn probe(&self, id: u64, addr: &str) -> Result<(), MembershipError> {
        let not_there = |why: String| MembershipError::NotThere {
            id,
            addr: addr.to_owned(),
            why,
        };
        let request = Request::get("/-/raft/cluster")
            .body(Full::new(Bytes::new()))
            .map_err(|error| not_there(error.to_string()))?;
        let answer = self
            .forwarder
            .send(addr, request, PROBE_TIMEOUT)
            .await
            .map_err(|error| not_there(error.to_string()))?;
        if answer.status != StatusCode::OK {
            return Err(not_there(format!(
                "GET /-/raft/cluster answered {}",
                answer.status
            )));
        }
        let path = format!("{addr}'s cluster.json");
        let theirs = decode_cluster(std::path::Path::new(&path), &answer.body)
            .map_err(|error| not_there(error.to_string()))?;
        if theirs.spec.node_id != id {
            return Err(not_there(format!("it is node {}", theirs.spec.node_id)));
        }
        match (&theirs.cluster_id, self.cluster_id.get()) {
            (Some(theirs), Some(ours)) if theirs != ours => {
                Err(not_there(format!("it belongs to cluster {theirs}")))
            }
            _ => Ok(()),
        }
    }
}

/// `POST /-/meta/propose`: a proposal another node forwarded here (or an
/// operator's raw command): proposed here, never forwarded again when it
/// was forwarded already.
async fn forwarded_proposal(
    node: &ClusterNode,
    parts: &Parts,
    body: &mut Option<Incoming>,
) -> Result<Response<Body>, NodeError> {
    let forwarded = is_forwarded(&parts.headers);
    if forwarded {
        node.check_cluster_id(&parts.headers)?;
    }
    let bytes = read_body(body).await?;
    let cmd: MetaCommand = serde_json::from_slice(&bytes).map_err(|error| {
        MembershipError::BadRequest(format!("the body is not a metadata command: {error}"))
    })?;
    let outcome = node.propose(cmd, forwarded).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "outcome": outcome, "version": outcome.version() }),
    ))
}

/// The body of `POST /-/cluster/members`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    id: u64,
    addr: String,
}

async fn add_member(
    node: &ClusterNode,
    body: &mut Option<Incoming>,
) -> Result<Response<Body>, NodeError> {
    let bytes = read_body(body).await?;
    let NewMember { id, addr } = serde_json::from_slice(&bytes).map_err(|error| {
        MembershipError::BadRequest(format!(
            "the body must be {{\"id\": <member id>, \"addr\": \"HOST:PORT\"}}: {error}"
        ))
    })?;
    if id == 0 {
        return Err(MembershipError::BadRequest("member ids start at 1".into()).into());
    }
    let cmd = MetaCommand::AddMember {
        id,
        addr: addr.clone(),
    };
    let answer = |status, state: MemberState, version| {
        json(
            status,
            &serde_json::json!({ "id": id, "addr": addr, "state": state, "version": version }),
        )
    };
    let (outcome, after) = node.dry_run(&cmd)?;
    if let meta::Outcome::Unchanged { .. } = outcome {
        // Already a member with this address here; this node's state may
        // lag (the id removed since), so the leader confirms. No probe is
        // needed: ids are never forgotten, so the leader answers unchanged
        // or "removed", never adds.
        let outcome = node.propose(cmd, false).await?;
        let state = after
            .members
            .get(&id)
            .map_or(MemberState::Joining, |m| m.state);
        return Ok(answer(StatusCode::OK, state, outcome.version()));
    }
    node.probe(id, &addr).await?;
    let outcome = node.propose(cmd, false).await?;
    log::info!(
        "node {id} at {addr} added (joining) at version {}",
        outcome.version()
    );
    let status = match outcome {
        meta::Outcome::Changed { .. } => StatusCode::ACCEPTED,
        meta::Outcome::Unchanged { .. } => StatusCode::OK,
    };
    Ok(answer(status, MemberState::Joining, outcome.version()))
}

async fn remove_member(node: &ClusterNode, id: &str) -> Result<Response<Body>, NodeError> {
    let id: u64 = id
        .parse()
        .map_err(|_| MembershipError::BadRequest(format!("{id:?} is not a member id")))?;
    let cmd = MetaCommand::Leave { id };
    // The dry run decides on this node's applied state, which may lag the
    // metadata leader's: a refusal that a later change lifts (the member
    // was added since, more members became active) is not final here, so
    // the leader, which applies the command again, decides it.
    let dry = match node.dry_run(&cmd) {
        Ok(dry) => Some(dry),
        Err(MembershipError::Refused(
            Refusal::UnknownMember { .. } | Refusal::TooFewMembers { .. },
        )) => None,
        Err(error) => return Err(error.into()),
    };
    let outcome = match &dry {
        Some((outcome @ meta::Outcome::Unchanged { .. }, _)) => *outcome,
        _ => node.propose(cmd, false).await?,
    };
    let state = dry
        .map(|(_, after)| after)
        .or_else(|| node.cluster_state().map(|state| (*state).clone()))
        .and_then(|after| after.members.get(&id).map(|m| m.state))
        .unwrap_or(MemberState::Leaving);
    let status = match outcome {
        meta::Outcome::Changed { version } => {
            log::info!("node {id} is {state} at version {version}");
            StatusCode::ACCEPTED
        }
        meta::Outcome::Unchanged { .. } => StatusCode::OK,
    };
    Ok(json(
        status,
        &serde_json::json!({ "id": id, "state": state, "version": outcome.version() }),
    ))
}
