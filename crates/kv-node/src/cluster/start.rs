//! Starting and stopping a clustered node (design §8).
//!
//! * **Flags vs `cluster.json`**: a data dir with `cluster.json` belongs to
//!   that cluster; flags that contradict it are refused with kv-cluster's
//!   messages, which say what to type instead.
//! * **First start** (no `cluster.json`): every reachable peer is asked for
//!   its `GET /-/raft/cluster`. A peer describing another cluster, or one
//!   that has already exchanged Raft traffic with this node (so this node's
//!   data was lost: it could vote twice in one term), is a refusal.
//!   Unreachable peers are skipped: they have not started yet. Then
//!   `cluster.json` is written, before any Raft traffic.
//! * **Groups**: one per shard placed here with more than one replica;
//!   each is initialised by its preferred leader only, so exactly once
//!   whatever the start order. A shard with one replica is a *solo* shard:
//!   no group, its owner serves it from the store (see the parent module).
//! * **Stop**: leaderships are handed to caught-up replicas (bounded), so a
//!   rolling restart costs no election timeout; then every group shuts down.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use kv_cluster::{
    check_flags, check_flags_with_peer, cluster_file, decode_cluster, parse_peers, read_cluster,
    write_cluster, ClusterSpec, Flags, StoredCluster,
};
use kv_raft::types::METADATA_GROUP;
use kv_raft::{raft_config, Groups, Network, NodeId, Raft, MAX_REPLICATED_VALUE};
use kv_store::Store;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{InitializeError, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::runtime::Handle;

use super::forward::Forwarder;
use super::layout::{HostedSlots, Layout, LayoutCell};
use super::request::ReadGate;
use super::storage;
use super::{join, meta, watch, ClusterNode, Hosted, PathStats, ShardStats};
use crate::Config;

/// How long the first-start guard waits for each peer.
const GUARD_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stop spends handing leaderships away.
const TRANSFER_BOUND: Duration = Duration::from_secs(1);

fn refuse(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

/// Refuses a standalone start (no `--peers`) on a data dir that belongs to
/// a cluster: it would serve an empty store.
pub fn check_standalone(data_dir: &Path) -> io::Result<()> {
    match read_cluster(data_dir) {
        Ok(None) => Ok(()),
        Ok(Some(stored)) => {
            let flags = Flags {
                node_id: stored.spec.node_id,
                members: None,
                shards: None,
                replicas: None,
            };
            match check_flags(&stored.spec, &flags) {
                Ok(()) => Ok(()),
                Err(mismatch) => Err(refuse(mismatch.to_string())),
            }
        }
        Err(error) => Err(refuse(error.to_string())),
    }
}

/// Starts cluster mode on an opened store: checks, `cluster.json`, groups.
pub async fn start(
    config: &Config,
    store: Arc<Store>,
    data_dir: &Path,
    tls: Option<Arc<kv_http::tls::Tls>>,
) -> io::Result<Arc<ClusterNode>> {
    let peers = config.peers.as_deref().unwrap_or_default();
    let node_id = config.node_id.ok_or_else(|| {
        refuse("--peers and --join need --node-id: which of the members is this node?")
    })?;
    if config.max_value_bytes > MAX_REPLICATED_VALUE {
        return Err(refuse(format!(
            "--max-value-bytes {} is more than a replicated write can carry; in cluster mode the most is {MAX_REPLICATED_VALUE}",
            config.max_value_bytes
        )));
    }
    if config.import.is_some() {
        return Err(refuse(
            "--import loads a standalone node; it cannot be used with --peers",
        ));
    }
    let members = match &config.peers {
        Some(peers) => {
            Some(parse_peers(peers).map_err(|error| refuse(format!("--peers: {error}")))?)
        }
        // --join: the members are learnt (and --peers refused by the flags).
        None => None,
    };
    let flags = Flags {
        node_id,
        members,
        shards: config.shards,
        replicas: config.replicas,
    };
    // Created first: the forwarder shares its record of peers refusing us.
    let network = Network::new();
    // The cluster token (issue 14): on every node-to-node request.
    let authorization = config
        .auth
        .token()
        .map_err(|error| refuse(error.to_string()))?
        .map(|token| token.authorization());
    if let Some(authorization) = &authorization {
        network.set_authorization(authorization.clone());
    }
    // TLS to peers (issue 14): raft traffic and forwards alike.
    if let Some(tls) = &tls {
        network.set_tls(Arc::clone(tls));
    }
    let forwarder = Forwarder::new(node_id, Arc::clone(network.refusals()), authorization, tls);
    let routes: std::collections::HashMap<NodeId, String> =
        config.raft_routes.iter().cloned().collect();
    let (mut stored, first_start) = match read_cluster(data_dir) {
        Ok(Some(stored)) => {
            let mut flags = flags;
            if config.join.is_some() {
                // The members were learnt, not given: nothing to compare.
                flags.members = Some(stored.spec.members.clone());
            }
            check_flags(&stored.spec, &flags).map_err(|mismatch| {
                refuse(format!("{}: {mismatch}", cluster_file(data_dir).display()))
            })?;
            if config.join.is_some() {
                log::info!(
                    "--join ignored: {} says which cluster this node belongs to",
                    cluster_file(data_dir).display()
                );
            }
            (stored, false)
        }
        Ok(None) if config.join.is_some() => {
            let seeds = config.join.as_deref().unwrap_or_default();
            let stored = join::learn(config, node_id, seeds, &forwarder).await?;
            write_cluster(data_dir, &stored).map_err(|error| refuse(error.to_string()))?;
            (stored, true)
        }
        Ok(None) => {
            let spec = ClusterSpec::new(node_id, peers, config.shards, config.replicas)
                .map_err(|error| refuse(error.to_string()))?;
            let ids = first_start_guard(&spec, &routes, &forwarder, data_dir).await?;
            let stored = StoredCluster {
                cluster_id: choose_cluster_id(&spec, &ids, true),
                spec,
                seen: BTreeSet::new(),
                joined: false,
            };
            write_cluster(data_dir, &stored).map_err(|error| refuse(error.to_string()))?;
            (stored, true)
        }
        Err(error) => return Err(refuse(error.to_string())),
    };
    if stored.cluster_id.is_none() && !first_start {
        // A data dir from before cluster ids: take the cluster's (§8).
        let ids = peer_cluster_ids(&stored.spec, &routes, &forwarder).await;
        if let Some(id) = choose_cluster_id(&stored.spec, &ids, false) {
            stored.cluster_id = Some(id);
            write_cluster(data_dir, &stored).map_err(|error| refuse(error.to_string()))?;
        }
    }
    if let Some(id) = &stored.cluster_id {
        forwarder.set_cluster_id(id);
    }
    let spec = stored.spec.clone();
    let timeouts = config.raft_timeouts();
    let raft_config = raft_config(timeouts, config.max_value_bytes)
        .map_err(|error| refuse(format!("raft timeouts: {error}")))?;
    network.set_node_id(node_id);
    network
        .refusals()
        .set_others(spec.members.len().saturating_sub(1));
    if let Some(id) = &stored.cluster_id {
        network.set_cluster_id(id);
    }
    for (id, addr) in &routes {
        network.set_route(*id, addr.clone());
    }
    network
        .snapshot_throttle()
        .set_rate(config.move_bytes_per_sec);
    let fixed = if stored.joined {
        Layout::joined(&spec)
    } else {
        Layout::from_spec(&spec)
    };
    // Recovering the groups reads snapshot files: off the async workers.
    let dir = data_dir.to_path_buf();
    let owned_solo: Vec<u32> = (0..spec.shards)
        .filter(|shard| fixed.solo_owner(*shard) == Some(node_id))
        .collect();
    let group_store = Arc::clone(&store);
    let node_storage = Arc::new(
        tokio::task::spawn_blocking(move || storage::open(group_store, &dir))
            .await
            .map_err(io::Error::other)??,
    );
    // What --repair cut, set aside or went on without: every group here may
    // lack entries it acknowledged, so each is hosted catching up (kv-raft's
    // catch-up guard): created with elections off, no vote until caught up.
    // The guard outlives a restart: a second start finds nothing to repair,
    // but its groups may still lack those entries.
    let mut repaired = store
        .recovery()
        .map(|report| report.repaired.clone())
        .unwrap_or_default();
    let marker = data_dir.join(CATCHING_UP_FILE);
    if repaired.is_empty() && marker.exists() {
        repaired.push(format!(
            "{} says an earlier start repaired it and its groups had not all caught up",
            marker.display()
        ));
    } else if !repaired.is_empty() {
        write_marker(&marker, &repaired)?;
    }
    let group_config = if repaired.is_empty() {
        Arc::clone(&raft_config)
    } else {
        Arc::new(openraft::Config {
            enable_elect: false,
            ..(*raft_config).clone()
        })
    };
    // The metadata group first (issue 13): the state it applied before this
    // start says which shards live here, when it has one.
    let meta = if spec.replicas >= 2 {
        Some(Arc::new(
            meta::open(node_id, &node_storage, &group_config, &network).await?,
        ))
    } else {
        None
    };
    let layout = match meta.as_ref().map(|meta| meta.sm.cluster_state()) {
        Some(Ok(Some(state))) if !state.is_empty() => Layout::from_state(state),
        Some(Err(error)) => {
            return Err(refuse(format!(
                "{}: the metadata group's cluster state is unreadable: {error}",
                data_dir.display()
            )))
        }
        _ => fixed,
    };
    let here = layout.groups_of(node_id);
    let dir = data_dir.to_path_buf();
    let opening = Arc::clone(&node_storage);
    let mut opened = tokio::task::spawn_blocking(move || {
        let node_storage = &*opening;
        // A Raft log of a shard now served solo would be ignored: its
        // writes would vanish. Only a data dir written before solo shards
        // existed can hold one.
        let known = node_storage.known_groups();
        if let Some(shard) = owned_solo.iter().find(|shard| known.contains(shard)) {
            return Err(refuse(format!(
                "{}: shard {shard} has one replica, so it is served without Raft, but this data \
                 dir holds a Raft log for it (written by an older kv-node); start that version \
                 to export the keys, or start with an empty data dir",
                dir.display()
            )));
        }
        let mut opened = std::collections::HashMap::new();
        for shard in here {
            opened.insert(shard, storage::group(node_storage, shard)?);
        }
        Ok::<_, io::Error>(opened)
    })
    .await
    .map_err(io::Error::other)??;
    let groups = Arc::new(Groups::default());
    let host = |group, raft| {
        if repaired.is_empty() {
            groups.insert(group, raft);
        } else {
            groups.insert_catching_up(group, raft);
        }
    };
    if let Some(meta) = &meta {
        host(METADATA_GROUP, meta.raft.clone());
    }
    let hosted = HostedSlots::new(spec.shards);
    for shard in 0..spec.shards {
        let Some((log, sm)) = opened.remove(&shard) else {
            continue;
        };
        let raft = Raft::new(
            node_id,
            Arc::clone(&group_config),
            network.factory(shard),
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|error| io::Error::other(format!("shard {shard}: {error}")))?;
        host(shard, raft.clone());
        hosted.fill(
            shard,
            Hosted {
                raft,
                log,
                sm,
                gate: Arc::new(ReadGate::default()),
            },
        );
    }
    if !repaired.is_empty() {
        log::warn!(
            "catch-up guard: recovery repaired this node's log ({}), so its {} Raft groups may \
             lack entries they acknowledged; they neither vote nor stand for election until \
             each has caught up with its leader (a shard whose leader is down meanwhile has no \
             quorum and answers 503)",
            repaired.join("; "),
            groups.catching_up()
        );
    }
    let node = Arc::new(ClusterNode {
        layout: LayoutCell::new(layout),
        hosted,
        store,
        groups,
        routes,
        write_timeout: config.raft_write_timeout,
        read_policy: config.read_policy,
        leader_wait: config.leader_wait,
        timeouts,
        leader_cache: Mutex::new(vec![None; spec.shards as usize]),
        forwarder,
        runtime: Handle::current(),
        shard_stats: (0..spec.shards).map(|_| ShardStats::default()).collect(),
        path_stats: PathStats::default(),
        recovered: Mutex::new(BTreeSet::new()),
        stopping: AtomicBool::new(false),
        cluster_id: stored
            .cluster_id
            .clone()
            .map_or_else(OnceLock::new, OnceLock::from),
        other_clusters: Mutex::new(BTreeSet::new()),
        stored: Mutex::new(stored),
        data_dir: data_dir.to_path_buf(),
        tasks: Mutex::new(Vec::new()),
        network,
        storage: node_storage,
        raft_config,
        meta,
        moves: super::moves::Moves::new(config.max_moves, config.move_pause_joint_shard),
        spec,
    });
    for shard in node.group_ids() {
        watch::follow(&node, shard);
    }
    initialise(&node, first_start).await?;
    meta::initialise(&node).await?;
    meta::follow(&node);
    super::moves::execute(&node);
    if !first_start {
        super::moves::ask_if_removed(&node);
    }
    join::ask(&node);
    if config.leader_balance {
        watch::balance(&node);
    }
    watch::snapshots(&node, config.raft_log_max_bytes);
    watch::disk(&node);
    watch::check_quorum(&node);
    if node.cluster_id.get().is_none() {
        adopt_cluster_id_later(&node);
    }
    if node.groups.catching_up() > 0 {
        forget_marker_once_caught_up(&node, marker);
    }
    log::info!(
        "cluster mode: node {node_id} of {} members, {} shards x {} replicas, hosting {} ({} solo) ({})",
        node.spec.members.len(),
        node.spec.shards,
        node.spec.replicas,
        node.shards_hosted(),
        node.solo_owned().len(),
        if first_start {
            "first start"
        } else {
            "restart"
        }
    );
    Ok(node)
}

/// In the data dir while a repaired node's groups catch up (kv-raft's
/// catch-up guard): a restart before they have caught up hosts them catching
/// up again. Deleting it (node stopped) gives up the guard: see the README
/// (`--repair`) for when an operator does that.
pub const CATCHING_UP_FILE: &str = "CATCHING_UP";

/// Writes `marker` (what was repaired, one line each), durably.
fn write_marker(marker: &Path, repaired: &[String]) -> io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(marker)?;
    for line in repaired {
        writeln!(file, "{line}")?;
    }
    file.sync_all()?;
    if let Some(dir) = marker.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Deletes `marker` once no group of `node` is catching up (checked every
/// 200 ms; the guard releases the groups, this only records it).
fn forget_marker_once_caught_up(node: &Arc<ClusterNode>, marker: std::path::PathBuf) {
    let weak = Arc::downgrade(node);
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(200));
        loop {
            ticks.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if node.groups.catching_up() > 0 {
                continue;
            }
            match std::fs::remove_file(&marker) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    log::warn!("cannot delete {}: {error}", marker.display());
                }
            }
            return;
        }
    });
    node.keep_task(task);
}

/// The cluster id a node takes (design §8), from the ids of the peers that
/// answered (`theirs`): the lowest-id member's that has one (they all
/// should agree; a disagreement is logged); with none, a new random one if
/// this node is the lowest-id member (the creator), else none yet — the
/// node asks again in the background ([`adopt_cluster_id_later`]).
///
/// The trade-off of this rule: no coordination beyond the GETs the
/// first-start guard makes anyway, and one creator, so two ids for one
/// cluster need the creator's data dir lost while nobody has seen it; but
/// until the lowest-id member has started once, the others run without an
/// id and without the check (as data dirs from before ids do).
fn choose_cluster_id(
    spec: &ClusterSpec,
    theirs: &BTreeMap<NodeId, String>,
    first_start: bool,
) -> Option<String> {
    let distinct: BTreeSet<&String> = theirs.values().collect();
    if distinct.len() > 1 {
        log::warn!(
            "peers disagree on the cluster id ({theirs:?}): one of them was started on another \
             cluster's data dir; taking the lowest-id member's"
        );
    }
    if let Some((peer, id)) = theirs.iter().next() {
        log::info!("cluster id {id}, adopted from node {peer}");
        return Some(id.clone());
    }
    let lowest = spec.members.keys().next().copied();
    if lowest == Some(spec.node_id) {
        let id = uuid::Uuid::new_v4().to_string();
        log::info!(
            "cluster id {id}, created here: this node has the lowest member id and no peer \
             that answered has one{}",
            if first_start {
                ""
            } else {
                " (a data dir from before cluster ids)"
            }
        );
        return Some(id);
    }
    log::info!(
        "no cluster id yet: node {} (the lowest member id) creates it; asking the peers again \
         every second",
        lowest.unwrap_or_default()
    );
    None
}

/// Every answering peer's cluster id, from `GET /-/raft/cluster`.
async fn peer_cluster_ids(
    spec: &ClusterSpec,
    routes: &std::collections::HashMap<NodeId, String>,
    forwarder: &Forwarder,
) -> BTreeMap<NodeId, String> {
    let mut ids = BTreeMap::new();
    for (&peer, advertised) in &spec.members {
        if peer == spec.node_id {
            continue;
        }
        let addr = routes.get(&peer).unwrap_or(advertised);
        let Ok(request) = Request::get("/-/raft/cluster").body(Full::new(Bytes::new())) else {
            continue;
        };
        let Ok(answer) = forwarder.send(addr, request, GUARD_TIMEOUT).await else {
            continue;
        };
        if answer.status != StatusCode::OK {
            continue;
        }
        let path = format!("node {peer}'s cluster.json");
        if let Ok(theirs) = decode_cluster(Path::new(&path), &answer.body) {
            if let Some(id) = theirs.cluster_id {
                ids.insert(peer, id);
            }
        }
    }
    ids
}

/// A node without a cluster id asks its peers every second until the
/// lowest-id member that has one answers, then takes it: stored in
/// `cluster.json`, sent and checked from then on.
fn adopt_cluster_id_later(node: &Arc<ClusterNode>) {
    let weak = Arc::downgrade(node);
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(node) = weak.upgrade() else { return };
            let ids = peer_cluster_ids(&node.spec, &node.routes, &node.forwarder).await;
            let Some((peer, id)) = ids.into_iter().next() else {
                continue;
            };
            node.adopt_cluster_id(peer, id);
            return;
        }
    });
    node.keep_task(task);
}

impl ClusterNode {
    /// Takes `id` as the cluster's (learnt from node `peer`): stored, sent
    /// on node-to-node requests and checked from now on.
    fn adopt_cluster_id(&self, peer: NodeId, id: String) {
        if self.cluster_id.set(id.clone()).is_err() {
            return;
        }
        self.network.set_cluster_id(&id);
        self.forwarder.set_cluster_id(&id);
        let mut stored = self
            .stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stored.cluster_id = Some(id.clone());
        if let Err(error) = write_cluster(&self.data_dir, &stored) {
            log::warn!("cannot store the cluster id {id}: {error}");
        }
        log::info!("cluster id {id}, adopted from node {peer}");
    }
}

/// Asks every peer for its `cluster.json` (design §8); returns the cluster
/// ids of those that have one.
async fn first_start_guard(
    spec: &ClusterSpec,
    routes: &std::collections::HashMap<NodeId, String>,
    forwarder: &Forwarder,
    data_dir: &Path,
) -> io::Result<BTreeMap<NodeId, String>> {
    let mut ids = BTreeMap::new();
    for (&peer, advertised) in &spec.members {
        if peer == spec.node_id {
            continue;
        }
        let addr = routes.get(&peer).unwrap_or(advertised);
        let request = Request::get("/-/raft/cluster")
            .body(Full::new(Bytes::new()))
            .map_err(io::Error::other)?;
        let answer = match forwarder.send(addr, request, GUARD_TIMEOUT).await {
            Ok(answer) => answer,
            Err(why) => {
                log::warn!("first start: node {peer} at {addr} did not answer ({why}); going on without it");
                continue;
            }
        };
        if answer.status == StatusCode::NOT_FOUND {
            log::warn!(
                "first start: node {peer} at {addr} is not a cluster node; going on without it"
            );
            continue;
        }
        if answer.status != StatusCode::OK {
            log::warn!(
                "first start: node {peer} at {addr} answered {}; going on without it",
                answer.status
            );
            continue;
        }
        let theirs = decode_cluster(
            Path::new(&format!("node {peer}'s cluster.json")),
            &answer.body,
        )
        .map_err(|error| refuse(error.to_string()))?;
        let flags = Flags {
            node_id: spec.node_id,
            members: Some(spec.members.clone()),
            shards: Some(spec.shards),
            replicas: Some(spec.replicas),
        };
        if let Err(mismatch) = check_flags_with_peer(&theirs.spec, &flags, peer) {
            return Err(refuse(format!(
                "node {peer} at {addr} belongs to a different cluster than these flags describe: {mismatch}"
            )));
        }
        if let Some(id) = theirs.cluster_id {
            ids.insert(peer, id);
        }
        if theirs.seen.contains(&spec.node_id) {
            return Err(refuse(format!(
                "data dir {} is empty but node {peer} has exchanged raft traffic with node {} before: \
                 this node's data was lost; restore it, or remove and re-add the node",
                data_dir.display(),
                spec.node_id
            )));
        }
    }
    Ok(ids)
}

/// Initialises the groups this node is the preferred leader of, when they
/// are not (design §8: the only initialiser, so exactly once).
async fn initialise(node: &ClusterNode, first_start: bool) -> io::Result<()> {
    if !first_start && !storage::DURABLE {
        return Ok(());
    }
    let me = node.id();
    let layout = node.layout();
    let mut initialised = 0;
    let mut waiting: BTreeSet<NodeId> = BTreeSet::new();
    for shard in node.group_ids() {
        // A shard a move changed is never initialised again: its replicas
        // here are made by its leader (a learner first).
        if !layout.never_moved(shard) {
            continue;
        }
        let preferred = layout.preferred(shard);
        if preferred != me {
            waiting.insert(preferred);
            continue;
        }
        let Some(hosted) = node.hosted(shard) else {
            continue;
        };
        let initialized = hosted
            .raft
            .is_initialized()
            .await
            .map_err(|error| io::Error::other(format!("shard {shard}: {error}")))?;
        if initialized {
            continue;
        }
        let voters: BTreeMap<NodeId, BasicNode> = layout
            .replicas(shard)
            .iter()
            .map(|id| {
                (
                    *id,
                    BasicNode::new(layout.members.get(id).cloned().unwrap_or_default()),
                )
            })
            .collect();
        match hosted.raft.initialize(voters).await {
            Ok(()) => initialised += 1,
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(error) => {
                return Err(io::Error::other(format!(
                    "initialising shard {shard}: {error}"
                )))
            }
        }
    }
    if waiting.is_empty() {
        log::info!("initialised {initialised} shards led first by this node");
    } else {
        log::info!(
            "initialised {initialised} shards led first by this node; the others are initialised by nodes {waiting:?}"
        );
    }
    Ok(())
}

impl ClusterNode {
    /// Hands every leadership this node holds to a caught-up replica
    /// (preferring the preferred leader), waiting at most `bound` overall.
    pub async fn transfer_away(&self, bound: Duration) {
        self.stopping.store(true, Relaxed);
        let deadline = Instant::now() + bound;
        let me = self.id();
        let mut moving = Vec::new();
        let layout = self.layout();
        for shard in self.group_ids() {
            let Some(hosted) = self.hosted(shard) else {
                continue;
            };
            let target = {
                let metrics = hosted.raft.metrics();
                let m = metrics.borrow_watched();
                if m.state != ServerState::Leader {
                    continue;
                }
                let caught_up = |id: &NodeId| {
                    *id != me
                        && m.replication
                            .as_ref()
                            .and_then(|r| r.get(id))
                            .and_then(|matched| matched.as_ref())
                            .map(|l| l.index)
                            == m.last_log_index
                };
                let preferred = layout.preferred(shard);
                if caught_up(&preferred) {
                    Some(preferred)
                } else {
                    layout.replicas(shard).iter().copied().find(caught_up)
                }
            };
            if let Some(target) = target {
                if hosted.transfer_leader(target).await.is_ok() {
                    moving.push(shard);
                }
            }
        }
        self.hand_meta_leadership_away().await;
        if moving.is_empty() {
            return;
        }
        log::info!(
            "stopping: handing {} leaderships to other replicas",
            moving.len()
        );
        let mut handed = 0;
        let count = moving.len();
        for shard in moving {
            let Some(hosted) = self.hosted(shard) else {
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let waited = hosted
                .raft
                .wait(Some(left))
                .metrics(
                    |m| m.current_leader.is_some_and(|l| l != me),
                    "leadership handed away",
                )
                .await;
            if waited.is_ok() {
                handed += 1;
            }
        }
        log::info!("stopping: {handed} of {count} leaderships handed over within {bound:?}");
    }

    /// The metadata group's leadership, when this node holds it, goes to
    /// a caught-up voter (not waited for: proposals retry on 503 meanwhile).
    async fn hand_meta_leadership_away(&self) {
        let Some(meta) = self.meta() else { return };
        let me = self.id();
        let target = {
            let metrics = meta.raft.metrics();
            let m = metrics.borrow_watched();
            if m.state != ServerState::Leader {
                return;
            }
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            voters.into_iter().find(|id| {
                *id != me
                    && m.replication
                        .as_ref()
                        .and_then(|r| r.get(id))
                        .and_then(|matched| matched.as_ref())
                        .map(|l| l.index)
                        == m.last_log_index
            })
        };
        if let Some(target) = target {
            if meta.transfer_leader(target).await.is_ok() {
                log::info!("stopping: handing the metadata group's leadership to node {target}");
            }
        }
    }

    /// Stops background tasks and shuts every group down.
    pub async fn shutdown(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
        for shard in self.group_ids() {
            if let Some(hosted) = self.hosted(shard) {
                if tokio::time::timeout(Duration::from_secs(5), hosted.raft.shutdown())
                    .await
                    .is_err()
                {
                    log::warn!("shard {shard}: did not shut down within 5 s");
                }
            }
        }
        if let Some(meta) = self.meta() {
            if tokio::time::timeout(Duration::from_secs(5), meta.raft.shutdown())
                .await
                .is_err()
            {
                log::warn!("the metadata group did not shut down within 5 s");
            }
        }
    }

    /// The bound for handing leaderships away at stop.
    pub fn transfer_bound(&self) -> Duration {
        TRANSFER_BOUND
    }
}
