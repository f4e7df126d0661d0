//! The client side: openraft's [`RaftNetworkFactory`] and [`RaftNetworkV2`]
//! over HTTP/1.1 keep-alive connections to each peer's `/-/raft/...`.
//!
//! One [`Network`] per node, shared by all its groups, keeps one `Peer` per
//! member. A peer has
//! - an **append batcher**: a task owning one connection. Appends and
//!   heartbeats of every group to that peer go into its queue; the task takes
//!   everything queued (any groups) into one `POST /-/raft/append` and hands
//!   each group its answer. A request arriving while a batch is in flight
//!   waits for the next one; one arriving on an idle peer is sent at once.
//!   So there is no linger: batching happens exactly when several are
//!   pending (design §7).
//!
//!   Measured (`measure_append_batching` in `tests/transport.rs`, release,
//!   3 in-process nodes × 64 groups, loopback, 3 runs on the shared 2-core
//!   machine): under 256 concurrent writers a POST carried 10.4-10.5 appends
//!   (≈ 10,000 appends in ≈ 960 POSTs); idle, heartbeats alone, 1.05-1.08
//!   (≈ 370 POSTs/s per node): each group's heartbeat timer runs on its own,
//!   so idle heartbeats rarely meet in a queue. Aligning them would need a
//!   linger on heartbeat-only batches, which would also delay read-index
//!   confirmations; not done.
//! - a small **pool** of keep-alive connections for votes, pre-votes,
//!   leadership transfers and snapshots, so a snapshot never delays
//!   heartbeats.
//!
//! Snapshots are paced by the node's [`SnapshotThrottle`] (bytes/s, one for
//! every peer and group) and counted per peer.
//!
//! A member removed for good (issue 13) is [`Network::forget`]-ed: its
//! batcher stops, its pooled connections close, and its clients that
//! openraft still holds answer `Unreachable` from then on.
//!
//! Failures: a connection that cannot be made, breaks, or does not answer
//! within the RPC's `hard_ttl` is `Unreachable` (openraft backs off); an
//! answer that does not decode is a `Network` error. A peer's 409 naming
//! another cluster (design §8) is `Unreachable` to openraft too, but is
//! also recorded in the node's [`Refusals`], as is every accepted answer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use kv_http::tls::Tls;
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload, OptionalSend};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::net::refusals::{other_cluster_id, Refusals};
use crate::net::throttle::SnapshotThrottle;
use crate::net::wire::{self, WireError};
use crate::types::{Command, GroupId, KvRaft, NodeId, SnapshotData, ENTRY_OVERHEAD};

/// Most appends put in one batch (bounds one request's size with
/// `max_payload_entries` per append).
const MAX_BATCH: usize = 256;
/// Most estimated bytes one `POST /-/raft/append` carries: half the peer's
/// body limit. One group's append stays under a quarter of it
/// ([`crate::types::APPEND_BUDGET`] sizes `max_payload_entries`), so a batch
/// never reaches the limit.
const BATCH_BUDGET: usize = wire::MAX_RPC_BODY / 2;
/// Idle pooled connections kept per peer.
const MAX_IDLE: usize = 4;

/// Why one RPC failed, before it becomes openraft's error type.
#[derive(Debug, Clone, thiserror::Error)]
enum CallError {
    /// No answer: no connection, a broken one, a timeout, or the peer's
    /// group is absent or failed.
    #[error("{0}")]
    Unreachable(String),
    /// An answer that is not what the protocol says.
    #[error("{0}")]
    Protocol(String),
    /// The peer refused us as another cluster's (409): no answer, as
    /// `Unreachable`, but recorded in [`Refusals`].
    #[error("{0}")]
    OtherCluster(String),
}

impl CallError {
    fn rpc(self) -> RPCError<KvRaft> {
        match self {
            CallError::Unreachable(message) | CallError::OtherCluster(message) => {
                RPCError::Unreachable(Unreachable::from_string(message))
            }
            CallError::Protocol(message) => RPCError::Network(NetworkError::from_string(message)),
        }
    }

    fn streaming(self) -> StreamingError<KvRaft> {
        match self {
            CallError::Unreachable(message) | CallError::OtherCluster(message) => {
                StreamingError::Unreachable(Unreachable::from_string(message))
            }
            CallError::Protocol(message) => {
                StreamingError::Network(NetworkError::from_string(message))
            }
        }
    }
}

impl From<WireError> for CallError {
    fn from(error: WireError) -> Self {
        match error {
            // We sent something no leader should: a bug, not a fault.
            WireError::Malformed { .. } => CallError::Protocol(error.to_string()),
            WireError::UnknownGroup(_) | WireError::Fatal { .. } => {
                CallError::Unreachable(error.to_string())
            }
        }
    }
}

/// Counters of the append path, summed over peers: how well batching works.
#[derive(Debug, Default)]
struct Counters {
    appends: AtomicU64,
    posts: AtomicU64,
}

/// What the append path did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportStats {
    /// Append/heartbeat RPCs openraft made (all groups, all peers).
    pub appends: u64,
    /// `POST /-/raft/append` requests that carried them.
    pub posts: u64,
}

/// Peers by (id, address): an address change (issue 13) makes a new peer.
type PeerMap = HashMap<(NodeId, String), Arc<Peer>>;

/// Who sends node-to-node traffic: header values set once by the node,
/// and what the peers said of its cluster id.
#[derive(Default)]
struct Identity {
    node: OnceLock<HeaderValue>,
    cluster: OnceLock<HeaderValue>,
    /// `Bearer <cluster token>` (issue 14), when the node has one.
    authorization: OnceLock<HeaderValue>,
    refusals: Arc<Refusals>,
    /// Peers that refused our token (401), each logged once.
    unauthorized: Mutex<std::collections::HashSet<String>>,
    /// TLS to peers (`--tls-ca`), with the node's client certificate.
    tls: OnceLock<Arc<Tls>>,
}

impl Identity {
    /// A peer answered 401: our cluster token is not its. Logged once per
    /// peer (openraft retries every heartbeat).
    fn refused_token(&self, addr: &str) {
        let first = self
            .unauthorized
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.to_owned());
        if first {
            log::warn!(
                "peer {addr} refused this node's cluster token (401): every member must be \
                 started with the same --auth-token-file / KV_AUTH_TOKEN (logged once per peer)"
            );
        }
    }

    fn mark(&self, headers: &mut hyper::HeaderMap) {
        if let Some(authorization) = self.authorization.get() {
            headers.insert(hyper::header::AUTHORIZATION, authorization.clone());
        }
        if let Some(node) = self.node.get() {
            headers.insert(kv_cluster_headers::NODE_ID, node.clone());
        }
        if let Some(cluster) = self.cluster.get() {
            headers.insert(kv_cluster_headers::CLUSTER_ID, cluster.clone());
        }
    }
}

/// The identity headers' names: kv-cluster's own constants, so they
/// cannot drift.
mod kv_cluster_headers {
    use hyper::header::HeaderName;
    pub const NODE_ID: HeaderName = HeaderName::from_static(kv_cluster::NODE_ID_HEADER);
    pub const CLUSTER_ID: HeaderName = HeaderName::from_static(kv_cluster::CLUSTER_ID_HEADER);
}

/// A node's client side of the transport, shared by all its groups.
#[derive(Clone, Default)]
pub struct Network {
    peers: Arc<Mutex<PeerMap>>,
    /// Who sends: headers on every request (design §8's cluster id).
    identity: Arc<Identity>,
    /// Addresses that override a member's advertised one (`--raft-route`).
    routes: Arc<Mutex<HashMap<NodeId, String>>>,
    counters: Arc<Counters>,
    snapshots: SnapshotThrottle,
}

impl Network {
    /// A transport with no connections yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The factory for group `group`'s `Raft::new`.
    pub fn factory(&self, group: GroupId) -> NetFactory {
        NetFactory {
            group,
            network: self.clone(),
        }
    }

    /// Sends node-to-node traffic for member `target` to `addr` instead of
    /// the address in its membership (`--raft-route`: tests put a
    /// fault-injecting relay there, design §7). Applies to clients openraft
    /// creates from now on.
    pub fn set_route(&self, target: NodeId, addr: String) {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(target, addr);
    }

    /// Marks every request from now on with `X-Kv-Node-Id: node`.
    pub fn set_node_id(&self, node: NodeId) {
        let _ = self.identity.node.set(HeaderValue::from(node));
    }

    /// Marks every request from now on with `X-Kv-Cluster-Id: id`, so a
    /// node of another cluster refuses it (409). Set once: a cluster id
    /// never changes; a second call is ignored.
    pub fn set_cluster_id(&self, id: &str) {
        if let Ok(value) = HeaderValue::from_str(id) {
            let _ = self.identity.cluster.set(value);
        }
    }

    /// Sends `authorization` (`Bearer <cluster token>`) on every request
    /// from now on. Set once, before the groups start; a second call is
    /// ignored.
    pub fn set_authorization(&self, authorization: HeaderValue) {
        let _ = self.identity.authorization.set(authorization);
    }

    /// Speaks TLS to every peer from now on (kv-http's [`Tls`]: verified
    /// against `--tls-ca`, presenting the node's certificate). Set once,
    /// before the groups start; a second call is ignored.
    pub fn set_tls(&self, tls: Arc<Tls>) {
        let _ = self.identity.tls.set(tls);
    }

    /// Which peers refuse this node as another cluster's (shared with the
    /// node's forwarder; the node reads it on every client request).
    pub fn refusals(&self) -> &Arc<Refusals> {
        &self.identity.refusals
    }

    /// The node's snapshot send throttle and its counters (rate 0,
    /// unbounded, until [`SnapshotThrottle::set_rate`]).
    pub fn snapshot_throttle(&self) -> &SnapshotThrottle {
        &self.snapshots
    }

    /// Drops member `target` for good (it was removed; ids are never
    /// reused): its append batcher stops, its idle connections close, its
    /// route override goes, and every client openraft still holds for it
    /// answers `Unreachable` (a group that still lists it as a member keeps
    /// trying, harmlessly, until its membership no longer does). A later
    /// client for the id, if any, starts a new peer.
    pub fn forget(&self, target: NodeId) {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&target);
        let forgotten: Vec<Arc<Peer>> = {
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            let keys: Vec<_> = peers
                .keys()
                .filter(|(id, _)| *id == target)
                .cloned()
                .collect();
            keys.iter().filter_map(|key| peers.remove(key)).collect()
        };
        for peer in forgotten {
            peer.stop();
        }
    }

    /// How many peers the transport keeps (each with a batcher task).
    pub fn peer_count(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// What the append path did so far.
    pub fn stats(&self) -> TransportStats {
        TransportStats {
            appends: self.counters.appends.load(Relaxed),
            posts: self.counters.posts.load(Relaxed),
        }
    }

    fn peer(&self, target: NodeId, advertised: &str) -> Arc<Peer> {
        let route = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&target)
            .cloned();
        let addr = route.as_deref().unwrap_or(advertised);
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = peers.entry((target, addr.to_string())).or_insert_with(|| {
            Peer::start(
                addr.to_string(),
                Arc::clone(&self.counters),
                Arc::clone(&self.identity),
            )
        });
        Arc::clone(peer)
    }
}

/// openraft's network factory for one group.
pub struct NetFactory {
    group: GroupId,
    network: Network,
}

impl RaftNetworkFactory<KvRaft> for NetFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            group: self.group,
            target,
            peer: self.network.peer(target, &node.addr),
            throttle: self.network.snapshots.clone(),
        }
    }
}

/// One queued append, waiting for its batch.
struct Pending {
    group: GroupId,
    rpc: AppendEntriesRequest<KvRaft>,
    ttl: Duration,
    reply: oneshot::Sender<Result<AppendEntriesResponse<KvRaft>, CallError>>,
}

/// One member as seen from here: its batcher and its connection pool.
struct Peer {
    addr: String,
    identity: Arc<Identity>,
    appends: mpsc::UnboundedSender<Pending>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    /// Stops the batcher ([`Peer::stop`]); taken once.
    stop_batcher: Mutex<Option<oneshot::Sender<()>>>,
    /// Forgotten: no new connections.
    stopped: AtomicBool,
}

impl Peer {
    fn start(addr: String, counters: Arc<Counters>, identity: Arc<Identity>) -> Arc<Peer> {
        let (appends, queue) = mpsc::unbounded_channel();
        let (stop_batcher, stop) = oneshot::channel();
        tokio::spawn(batcher(
            addr.clone(),
            queue,
            stop,
            counters,
            Arc::clone(&identity),
        ));
        Arc::new(Peer {
            addr,
            identity,
            appends,
            idle: Mutex::new(Vec::new()),
            stop_batcher: Mutex::new(Some(stop_batcher)),
            stopped: AtomicBool::new(false),
        })
    }

    /// The member was removed: stop the batcher (its queued appends fail),
    /// close idle connections (dropping a `SendRequest` ends its
    /// connection), refuse new calls.
    fn stop(&self) {
        self.stopped.store(true, Relaxed);
        let stop = self
            .stop_batcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// One request on a pooled connection (a new one if none is idle).
    async fn call(
        &self,
        path: &str,
        body: Vec<u8>,
        ttl: Duration,
        limit: usize,
    ) -> Result<Bytes, CallError> {
        if self.stopped.load(Relaxed) {
            return Err(CallError::Unreachable(format!(
                "{}: the member was removed",
                self.addr
            )));
        }
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut sender = match idle {
            Some(sender) if !sender.is_closed() => sender,
            _ => connect(&self.addr, ttl, self.identity.tls.get()).await?,
        };
        let answer = exchange(
            &mut sender,
            &self.addr,
            &self.identity,
            path,
            body,
            ttl,
            limit,
        )
        .await;
        if answer.is_ok() && !self.stopped.load(Relaxed) {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
        }
        answer
    }

    async fn call_decode<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        ttl: Duration,
        limit: usize,
    ) -> Result<T, CallError> {
        let bytes = self.call(path, body, ttl, limit).await?;
        wire::decode(&bytes).map_err(|error| {
            CallError::Protocol(format!("undecodable answer from {}: {error}", self.addr))
        })
    }
}

/// The append batcher of one peer (see the module docs). Ends when the peer
/// is dropped or stopped ([`Network::forget`]).
async fn batcher(
    addr: String,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    mut stop: oneshot::Receiver<()>,
    counters: Arc<Counters>,
    identity: Arc<Identity>,
) {
    let mut connection: Option<SendRequest<Full<Bytes>>> = None;
    let mut carry = None;
    loop {
        let first = match carry.take() {
            Some(pending) => pending,
            None => tokio::select! {
                biased;
                // Stopped (or the peer dropped its sender): end.
                _ = &mut stop => break,
                next = queue.recv() => match next {
                    Some(pending) => pending,
                    None => break,
                },
            },
        };
        let mut batch = form_batch(first, &mut queue, &mut carry);
        // Callers that gave up (timed out) need no answer.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let ttl = batch
            .iter()
            .map(|pending| pending.ttl)
            .max()
            .unwrap_or_default();
        counters.posts.fetch_add(1, Relaxed);
        counters.appends.fetch_add(batch.len() as u64, Relaxed);
        let (replies, rpcs): (Vec<_>, wire::AppendBatch) = batch
            .into_iter()
            .map(|pending| ((pending.group, pending.reply), (pending.group, pending.rpc)))
            .unzip();
        let answer = send_batch(&mut connection, &addr, &identity, &rpcs, ttl).await;
        match answer {
            Ok(answers) if answers.len() == replies.len() => {
                for ((group, reply), (answered, result)) in replies.into_iter().zip(answers) {
                    let result = if answered == group {
                        result.map_err(CallError::from)
                    } else {
                        Err(CallError::Protocol(format!(
                            "{addr} answered group {answered} for group {group}"
                        )))
                    };
                    let _ = reply.send(result);
                }
            }
            Ok(answers) => {
                let error = CallError::Protocol(format!(
                    "{addr} answered {} appends to a batch of {}",
                    answers.len(),
                    replies.len()
                ));
                for (_, reply) in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
            Err(error) => {
                connection = None;
                for (_, reply) in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// `first` and what else is queued, up to [`MAX_BATCH`] appends and
/// [`BATCH_BUDGET`] estimated bytes; the first one over the budget is left
/// in `carry` for the next batch.
fn form_batch(
    first: Pending,
    queue: &mut mpsc::UnboundedReceiver<Pending>,
    carry: &mut Option<Pending>,
) -> Vec<Pending> {
    let mut bytes = estimated_bytes(&first.rpc);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        let Ok(next) = queue.try_recv() else {
            break;
        };
        let size = estimated_bytes(&next.rpc);
        if bytes + size > BATCH_BUDGET {
            *carry = Some(next);
            break;
        }
        bytes += size;
        batch.push(next);
    }
    batch
}

/// An append's encoded size, roughly: keys and values plus a fixed
/// overhead per entry (a membership entry lists every member).
fn estimated_bytes(rpc: &AppendEntriesRequest<KvRaft>) -> usize {
    let entries: usize = rpc
        .entries
        .iter()
        .map(|entry| {
            ENTRY_OVERHEAD
                + match &entry.payload {
                    EntryPayload::Normal(Command::Put { key, value }) => key.len() + value.len(),
                    EntryPayload::Normal(Command::Delete { key }) => key.len(),
                    // Rare and small (a Bootstrap lists the members): measure.
                    EntryPayload::Normal(Command::Meta(cmd)) => {
                        postcard::to_stdvec(cmd).map_or(0, |bytes| bytes.len())
                    }
                    EntryPayload::Membership(membership) => membership
                        .nodes()
                        .map(|(_, node)| node.addr.len() + 32)
                        .sum(),
                    EntryPayload::Blank => 0,
                }
        })
        .sum();
    ENTRY_OVERHEAD + entries
}

async fn send_batch(
    connection: &mut Option<SendRequest<Full<Bytes>>>,
    addr: &str,
    identity: &Identity,
    rpcs: &wire::AppendBatch,
    ttl: Duration,
) -> Result<wire::AppendReplies, CallError> {
    let body = wire::encode(rpcs).map_err(|error| CallError::Protocol(error.to_string()))?;
    let sender = match connection {
        Some(sender) if !sender.is_closed() => sender,
        _ => connection.insert(connect(addr, ttl, identity.tls.get()).await?),
    };
    let bytes = exchange(
        sender,
        addr,
        identity,
        wire::APPEND,
        body,
        ttl,
        wire::MAX_RPC_BODY,
    )
    .await?;
    wire::decode(&bytes)
        .map_err(|error| CallError::Protocol(format!("undecodable answer from {addr}: {error}")))
}

async fn connect(
    addr: &str,
    ttl: Duration,
    tls: Option<&Arc<Tls>>,
) -> Result<SendRequest<Full<Bytes>>, CallError> {
    let unreachable = |what: &str, error: &dyn std::fmt::Display| {
        CallError::Unreachable(format!("{what} {addr}: {error}"))
    };
    // TCP (no delay: small messages, votes and heartbeats, go at once) and
    // the TLS handshake, if any, within the one bound.
    let stream = tokio::time::timeout(ttl, Tls::connect(tls.map(|tls| &**tls), addr))
        .await
        .map_err(|_| {
            CallError::Unreachable(format!("connecting to {addr} timed out after {ttl:?}"))
        })?
        .map_err(|error| unreachable("cannot connect to", &error))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| unreachable("cannot talk HTTP to", &error))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            log::debug!("raft connection closed: {error}");
        }
    });
    Ok(sender)
}

/// One POST and its whole answer, within `ttl`.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: &str,
    identity: &Identity,
    path: &str,
    body: Vec<u8>,
    ttl: Duration,
    limit: usize,
) -> Result<Bytes, CallError> {
    let mut request = Request::post(path)
        .header(HOST, addr)
        .header(CONTENT_TYPE, wire::CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .map_err(|error| CallError::Protocol(error.to_string()))?;
    identity.mark(request.headers_mut());
    let round_trip = async {
        sender
            .ready()
            .await
            .map_err(|error| CallError::Unreachable(format!("{addr}: {error}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| CallError::Unreachable(format!("{addr}: {error}")))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|error| {
                CallError::Unreachable(format!("{addr}: reading the answer: {error}"))
            })?
            .to_bytes();
        match status {
            StatusCode::OK => {
                identity.refusals.accepted(addr);
                Ok(bytes)
            }
            StatusCode::CONFLICT => match other_cluster_id(&bytes) {
                Some(theirs) => {
                    identity.refusals.refused(addr, &theirs);
                    Err(CallError::OtherCluster(format!(
                        "{addr} refused {path}: it belongs to cluster {theirs}, not ours"
                    )))
                }
                None => Err(CallError::Unreachable(format!(
                    "{addr} answered {path} with {status} {}",
                    String::from_utf8_lossy(&bytes).trim_end()
                ))),
            },
            // Our token is not the peer's: no answer, as from an
            // unreachable peer (openraft backs off), logged once.
            StatusCode::UNAUTHORIZED => {
                identity.refused_token(addr);
                Err(CallError::Unreachable(format!(
                    "{addr} refused {path}: 401, this node's cluster token is not its"
                )))
            }
            // Our own request was refused as malformed: a bug, not a network fault.
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {
                Err(CallError::Protocol(format!(
                    "{addr} refused {path}: {status} {}",
                    String::from_utf8_lossy(&bytes).trim_end()
                )))
            }
            _ => Err(CallError::Unreachable(format!(
                "{addr} answered {path} with {status} {}",
                String::from_utf8_lossy(&bytes).trim_end()
            ))),
        }
    };
    tokio::time::timeout(ttl, round_trip)
        .await
        .map_err(|_| CallError::Unreachable(format!("{addr}: {path} timed out after {ttl:?}")))?
}

/// openraft's client for one (peer, group).
pub struct PeerClient {
    group: GroupId,
    target: NodeId,
    peer: Arc<Peer>,
    throttle: SnapshotThrottle,
}

impl PeerClient {
    fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Vec<u8>, CallError> {
        wire::encode(value).map_err(|error| CallError::Protocol(error.to_string()))
    }
}

impl RaftNetworkV2<KvRaft> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<KvRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<KvRaft>, RPCError<KvRaft>> {
        let ttl = option.hard_ttl();
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            group: self.group,
            rpc,
            ttl,
            reply,
        };
        if self.peer.appends.send(pending).is_err() {
            return Err(CallError::Unreachable("transport stopped".into()).rpc());
        }
        // The batcher bounds the POST by the batch's ttl; this bounds the
        // wait for a batch slot too.
        match tokio::time::timeout(ttl, answer).await {
            Ok(Ok(result)) => result.map_err(CallError::rpc),
            Ok(Err(_)) => Err(CallError::Unreachable("transport stopped".into()).rpc()),
            Err(_) => Err(CallError::Unreachable(format!(
                "{}: append timed out after {ttl:?}",
                self.peer.addr
            ))
            .rpc()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<KvRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<KvRaft>, RPCError<KvRaft>> {
        let body = self.encode(&(self.group, rpc)).map_err(CallError::rpc)?;
        self.peer
            .call_decode(wire::VOTE, body, option.hard_ttl(), wire::MAX_RPC_BODY)
            .await
            .map_err(CallError::rpc)
    }

    /// Asks the peer's `Raft::pre_vote` (openraft's default grants every
    /// pre-vote, which would silently disable `enable_pre_vote`).
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<KvRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<KvRaft>, RPCError<KvRaft>> {
        let body = self.encode(&(self.group, rpc)).map_err(CallError::rpc)?;
        self.peer
            .call_decode(wire::PRE_VOTE, body, option.hard_ttl(), wire::MAX_RPC_BODY)
            .await
            .map_err(CallError::rpc)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<KvRaft>,
        snapshot: SnapshotOf<KvRaft, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<KvRaft>, StreamingError<KvRaft>> {
        let body: wire::SnapshotBody = (
            self.group,
            vote,
            snapshot.meta,
            snapshot.snapshot.into_inner(),
        );
        let body = self.encode(&body).map_err(CallError::streaming)?;
        // openraft passes `install_snapshot_timeout` as the TTL; a whole
        // snapshot in one request gets it as a whole (design open question
        // 5). The throttle's wait comes first, outside that TTL.
        let (peer, throttle, target) = (Arc::clone(&self.peer), self.throttle.clone(), self.target);
        let send = async move {
            throttle.send(target, body.len() as u64).await;
            peer.call_decode(wire::SNAPSHOT, body, option.hard_ttl(), wire::MAX_RPC_BODY)
                .await
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            answer = send => answer.map_err(CallError::streaming),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<KvRaft>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<KvRaft>, RPCError<KvRaft>> {
        let body = self.encode(&(self.group, req)).map_err(CallError::rpc)?;
        self.peer
            .call_decode(
                wire::TRANSFER_LEADER,
                body,
                option.hard_ttl(),
                wire::MAX_RPC_BODY,
            )
            .await
            .map_err(CallError::rpc)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pending(
        value_bytes: usize,
    ) -> (
        Pending,
        oneshot::Receiver<Result<AppendEntriesResponse<KvRaft>, CallError>>,
    ) {
        let (reply, answer) = oneshot::channel();
        let entry = openraft::alias::EntryOf::<KvRaft> {
            log_id: openraft::testing::log_id::<KvRaft>(1, 1, 1),
            payload: EntryPayload::Normal(Command::Put {
                key: "k".into(),
                value: vec![0; value_bytes],
            }),
        };
        let rpc = AppendEntriesRequest {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: Some(openraft::testing::log_id::<KvRaft>(1, 1, 0)),
            entries: vec![entry],
            leader_commit: None,
        };
        let pending = Pending {
            group: value_bytes as GroupId,
            rpc,
            ttl: Duration::from_secs(1),
            reply,
        };
        (pending, answer)
    }

    #[test]
    fn batches_stay_under_the_byte_budget_and_keep_order() {
        let (queue_tx, mut queue) = mpsc::unbounded_channel();
        let big = BATCH_BUDGET / 3;
        let sizes = [10, big, big, 20, big, big, big, 30, 40];
        let mut answers = Vec::new();
        let mut first = None;
        for size in sizes {
            let (pending, answer) = pending(size);
            answers.push(answer);
            match first {
                None => first = Some(pending),
                Some(_) => queue_tx.send(pending).unwrap(),
            }
        }
        let mut carry = None;
        let mut next = first;
        let mut seen = Vec::new();
        let mut batches = 0;
        while let Some(first) = next.take().or_else(|| carry.take()) {
            let batch = form_batch(first, &mut queue, &mut carry);
            let bytes: usize = batch.iter().map(|p| estimated_bytes(&p.rpc)).sum();
            assert!(bytes <= BATCH_BUDGET || batch.len() == 1, "{bytes}");
            seen.extend(batch.iter().map(|p| p.group as usize));
            batches += 1;
        }
        assert_eq!(seen, sizes);
        assert_eq!(batches, 3);
    }
}
