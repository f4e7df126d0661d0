//! Joining a running cluster: `kv-node --node-id 4 --join SEED[,SEED..]
//! [--advertise HOST:PORT]` (`docs/membership.md` §4.1).
//!
//! 1. **First start** ([`learn`], empty data dir): ask the seeds, in turn,
//!    for `GET /-/cluster`; refuse at once what the answer already decides
//!    (`--replicas 1`, the id removed or used at another address, the address
//!    used by another member), then write `cluster.json` (the cluster's id,
//!    shard and replica counts, its members and this node, `joined`) before
//!    any Raft traffic, as a founding member does.
//! 2. **Serve**, with the metadata group created uninitialised: a joined
//!    node never initialises anything; it hosts no shard until the metadata
//!    state it is replicated says so.
//! 3. **Ask** ([`ask`], in the background once serving, since the member
//!    that handles the request checks this node's address answers as this
//!    id): `POST /-/cluster/members {"id", "addr"}` to a member, in turn,
//!    until one accepts (202, or 200: already a member). The metadata leader
//!    then adds this node as a learner of the metadata group and activates it
//!    once caught up. A restart asks again until the applied state names this
//!    node, so a crash between 1 and 3 is harmless.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use kv_cluster::meta::{MemberState, Refusal};
use kv_cluster::{ClusterSpec, ClusterView, StoredCluster};
use kv_raft::NodeId;

use super::forward::Forwarder;
use super::ClusterNode;
use crate::Config;

/// How long each seed gets to answer.
const SEED_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `--join` waits for a seed that answers 503 (a cluster whose
/// metadata group has not bootstrapped yet), asking every [`SEED_RETRY`].
const SEED_WAIT: Duration = Duration::from_secs(30);
const SEED_RETRY: Duration = Duration::from_millis(500);
/// Pause between rounds of asking to be added.
const ASK_AGAIN: Duration = Duration::from_secs(1);

fn refuse(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

/// The address this node tells the cluster: `--advertise`, or
/// `--bind:--port` when `--bind` names one host.
pub(crate) fn advertise(config: &Config) -> io::Result<String> {
    if let Some(addr) = &config.advertise {
        return Ok(addr.clone());
    }
    if config.bind.is_unspecified() {
        return Err(refuse(format!(
            "--join with --bind {} needs --advertise HOST:PORT: the address other members and \
             clients reach this node at",
            config.bind
        )));
    }
    if config.port == 0 {
        return Err(refuse(
            "--join with --port 0 needs --advertise HOST:PORT: the port is not known yet",
        ));
    }
    Ok(std::net::SocketAddr::new(config.bind, config.port).to_string())
}

/// Step 1 of the module docs: the `cluster.json` a joining node starts with.
pub(crate) async fn learn(
    config: &Config,
    node_id: NodeId,
    seeds: &str,
    forwarder: &Forwarder,
) -> io::Result<StoredCluster> {
    let addr = advertise(config)?;
    let mut tried = Vec::new();
    let mut found = None;
    // A cluster started moments ago answers 503 until its metadata group
    // has bootstrapped: only that is waited out (bounded), not a refusal.
    let deadline = tokio::time::Instant::now() + SEED_WAIT;
    'rounds: loop {
        tried.clear();
        let mut unavailable = false;
        for seed in seeds.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let request = Request::get("/-/cluster")
                .body(Full::new(Bytes::new()))
                .map_err(io::Error::other)?;
            match forwarder.send(seed, request, SEED_TIMEOUT).await {
                Ok(answer) if answer.status == StatusCode::OK => {
                    match serde_json::from_slice::<ClusterView>(&answer.body) {
                        Ok(view) => {
                            found = Some(view);
                            break 'rounds;
                        }
                        Err(error) => tried.push(format!("{seed}: unreadable answer ({error})")),
                    }
                }
                Ok(answer) => {
                    unavailable |= answer.status == StatusCode::SERVICE_UNAVAILABLE;
                    tried.push(format!("{seed}: answered {}", answer.status));
                }
                Err(error) => tried.push(format!("{seed}: {error}")),
            }
        }
        if !unavailable || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(SEED_RETRY).await;
    }
    let Some(view) = found else {
        return Err(refuse(format!(
            "--join: no seed answered GET /-/cluster ({})",
            tried.join("; ")
        )));
    };
    if view.replicas < 2 {
        return Err(refuse(format!("--join: {}", Refusal::SingleReplica)));
    }
    if let Some(member) = view.members.iter().find(|m| m.id == node_id) {
        if member.state == MemberState::Removed {
            return Err(refuse(format!(
                "--join: {}",
                Refusal::IdRemoved { id: node_id }
            )));
        }
        if member.addr != addr {
            return Err(refuse(format!(
                "--join: {}",
                Refusal::IdTaken { id: node_id }
            )));
        }
    }
    if let Some(other) = view
        .members
        .iter()
        .find(|m| m.id != node_id && m.addr == addr && m.state != MemberState::Removed)
    {
        return Err(refuse(format!(
            "--join: {}",
            Refusal::AddrTaken {
                id: node_id,
                by: other.id
            }
        )));
    }
    let mut members: std::collections::BTreeMap<NodeId, String> = view
        .members
        .iter()
        .filter(|m| m.state != MemberState::Removed)
        .map(|m| (m.id, m.addr.clone()))
        .collect();
    members.insert(node_id, addr);
    let spec = ClusterSpec {
        node_id,
        shards: view.shards,
        replicas: view.replicas,
        members,
    };
    spec.validate()
        .map_err(|error| refuse(format!("--join: the cluster the seed describes: {error}")))?;
    log::info!(
        "joining cluster {} (version {}, {} members, {} shards x {} replicas) as node {node_id}",
        view.cluster_id,
        view.version,
        view.members.len(),
        view.shards,
        view.replicas
    );
    Ok(StoredCluster {
        spec,
        seen: BTreeSet::new(),
        cluster_id: Some(view.cluster_id.to_string()),
        joined: true,
    })
}

/// Whether a members API answer refuses for good.
fn is_final(status: StatusCode, body: &[u8]) -> bool {
    let refused = serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|json| json.get("refusal").is_some());
    match status {
        StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => true,
        StatusCode::CONFLICT => refused,
        _ => false,
    }
}

/// Step 3 of the module docs, for a node that joined: asks until a member
/// accepts, or the applied state names this node, or one refuses for good.
pub(crate) fn ask(node: &Arc<ClusterNode>) {
    let (me, addr, seeds) = {
        let stored = node.stored.lock().unwrap_or_else(|p| p.into_inner());
        if !stored.joined {
            return;
        }
        let me = stored.spec.node_id;
        let Some(addr) = stored.spec.members.get(&me).cloned() else {
            return;
        };
        let seeds: Vec<String> = stored
            .spec
            .members
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(_, addr)| addr.clone())
            .collect();
        (me, addr, seeds)
    };
    let weak = Arc::downgrade(node);
    let task = node.runtime.spawn(async move {
        let body = serde_json::json!({ "id": me, "addr": addr }).to_string();
        loop {
            let Some(node) = weak.upgrade() else { return };
            let named = node
                .cluster_state()
                .is_some_and(|state| state.members.contains_key(&me));
            if named {
                return;
            }
            for seed in &seeds {
                let Ok(request) = Request::builder()
                    .method(Method::POST)
                    .uri("/-/cluster/members")
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body.clone())))
                else {
                    return;
                };
                let timeout = node.write_timeout + SEED_TIMEOUT;
                match node.forwarder.send(seed, request, timeout).await {
                    Ok(answer) if answer.status.is_success() => {
                        log::info!(
                            "asked {seed} to add this node: {}",
                            String::from_utf8_lossy(&answer.body).trim()
                        );
                        return;
                    }
                    // A refusal the cluster state decided (a typed refusal,
                    // or a bad request) is final; "nothing answers as node
                    // N at ADDR" may be this node not serving yet: again.
                    Ok(answer) if is_final(answer.status, &answer.body) => {
                        log::error!(
                            "{seed} refused to add this node ({}): {}",
                            answer.status,
                            String::from_utf8_lossy(&answer.body).trim()
                        );
                        return;
                    }
                    Ok(answer) => log::info!(
                        "asking {seed} to add this node: {} (asking again)",
                        answer.status
                    ),
                    Err(error) => log::info!("asking {seed} to add this node: {error}"),
                }
            }
            drop(node);
            tokio::time::sleep(ASK_AGAIN).await;
        }
    });
    node.keep_task(task);
}
