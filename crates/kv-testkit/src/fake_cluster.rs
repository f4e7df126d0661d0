//! A fake replicated cluster for testing clients that route to shard
//! leaders (kv-proxy, kv-bench): three hyper servers on port 0 in this
//! process that serve `GET /-/shards` and answer key requests 200, 421,
//! 503 or 504 as the test scripts them, and record what they are sent.
//!
//! The script is [`FakeState`]: every node's `/-/shards` names the
//! `advertised` leader and term for every shard; the `actual` leader is the
//! one node that serves keys (a map shared by all three, as if replicated);
//! the others answer 421 naming it (kv-node's [`NotLeader`] body and
//! `X-Kv-Leader` header), or 503 with `Retry-After: 1` when there is none.
//! A GET with `X-Kv-Consistency: stale` is answered by any node. `fault`
//! makes the leader answer writes 504, or close without answering;
//! `bounce` makes every node answer 421 naming the next one.
//! `unconfirmed` makes every node hold each key request, then answer 503
//! "no quorum", as a kv-node leader that lost its quorum holds a read while
//! it tries to confirm it: for that long, or for the milliseconds the
//! request's `X-Kv-Wait-Budget-Ms` leaves, whichever is shorter (as
//! kv-node does); `held` records each hold.
//!
//! Issue 13 (membership change): [`FakeCluster::start_with`] starts spare
//! nodes beyond the three members, which a test makes members by editing
//! `members`; `version` is the placement version every node shows (in
//! `/-/shards` as kv-cluster's [`PlacementFields`], and in the
//! `X-Kv-Placement-Version` header of every answer; `None` for a node that
//! predates issue 13); `cluster_id` the cluster id every node shows beside
//! it (`None`: none, as from a node that does not know it yet); `leaders`
//! gives single shards their own leader and term; `lagging` makes a node
//! keep showing an older layout.
//!
//! `GET /-/cluster` (for `kv-bench cluster-watch`): `cluster_views` is a
//! scripted sequence of [`ClusterView`]s, one per request whichever node is
//! asked, the last repeated (none: 404, as from a node that predates issue
//! 13); `cluster_silent` makes a node close `/-/cluster` requests without an
//! answer once that many views were served, as a node that went down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kv_cluster::{
    shard_of, shards_body, ClusterId, ClusterView, GroupView, MemberState, MemberView, MetaRole,
    MoveCounts, MoveView, NotLeader, PlacementFields, ShardsView, PLACEMENT_VERSION_HEADER,
};

/// How the leader answers writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It applies them.
    None,
    /// 504 "outcome unknown" (a timeout after proposing).
    Status504,
    /// It reads the request, then closes the connection without answering.
    Close,
}

/// One key request a fake node was sent.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The node's member id (1, 2, 3).
    pub node: u64,
    pub method: String,
    pub path: String,
    pub body: Bytes,
    /// Whether it carried `X-Kv-Route: direct`.
    pub direct: bool,
    /// Its `X-Kv-Consistency`, if any.
    pub consistency: Option<String>,
    /// Its `X-Kv-Wait-Budget-Ms`, if any.
    pub budget_ms: Option<u64>,
}

/// A node that has not applied the newest layout yet: what it still shows.
#[derive(Debug, Clone)]
pub struct Lagging {
    /// Its placement version.
    pub version: u64,
    /// Its members.
    pub members: BTreeMap<u64, String>,
}

/// What the fake cluster believes, and what it has seen.
#[derive(Debug)]
pub struct FakeState {
    /// Number of shards in `/-/shards`.
    pub shards: u32,
    /// Member id → address; ids 1-3 are the fake nodes (and 4.. the spare
    /// ones of [`FakeCluster::start_with`]). A test may add members at
    /// addresses where nothing listens (a killed node).
    pub members: BTreeMap<u64, String>,
    /// The placement version every node shows; `None`: no version at all,
    /// as from a node that predates issue 13.
    pub version: Option<u64>,
    /// The cluster id every node shows in `/-/shards`; `None`: none.
    pub cluster_id: Option<ClusterId>,
    /// Shard → its own leader and term, both advertised and actual,
    /// instead of `advertised`/`actual`.
    pub leaders: BTreeMap<u32, (u64, u64)>,
    /// Node id → the older layout it still shows in `/-/shards` (and the
    /// version in its header).
    pub lagging: BTreeMap<u64, Lagging>,
    /// Node id → how many `/-/shards` answers it shows its `lagging` layout
    /// in; after that its `lagging` entry is dropped (a node that said
    /// something wrong a set number of times, then behaves).
    pub lagging_views: BTreeMap<u64, usize>,
    /// Every node's address, members or not; `addrs[i]` is node `i + 1`.
    pub addrs: Vec<String>,
    /// The leader every node's `/-/shards` names for every shard.
    pub advertised: Option<u64>,
    pub advertised_term: u64,
    /// The node that really leads: it serves keys; the others say 421.
    pub actual: Option<u64>,
    pub actual_term: u64,
    pub fault: Fault,
    /// Leadership moving faster than a client can follow: every key
    /// request is answered 421 naming the next node, in a newer term each
    /// time.
    pub bounce: bool,
    /// The replicated map: key → the GET answer body.
    pub data: BTreeMap<String, Bytes>,
    /// Every key request, in order.
    pub seen: Vec<Seen>,
    /// `/-/shards` requests served.
    pub views: usize,
    /// `/-/shards` requests served, by node id.
    pub views_by: BTreeMap<u64, usize>,
    /// This many more `/-/shards` requests are answered 503, as by a node
    /// that is still starting.
    pub views_refused: usize,
    /// Node id → bytes of padding (a `"pad"` string field) added to its
    /// `/-/shards` body: an answer too long to read.
    pub shards_pad: BTreeMap<u64, usize>,
    /// Once this many key requests were seen, node `.1` joins and leads
    /// shards `.2` ([`FakeState::join`]): a layout change in the middle of a
    /// client's run, at a point set by requests rather than time.
    pub join_after: Option<(usize, u64, Vec<u32>)>,
    /// What `GET /-/cluster` answers, in turn (the last repeated); empty:
    /// 404.
    pub cluster_views: Vec<ClusterView>,
    /// `GET /-/cluster` answers served so far, by all nodes.
    pub cluster_served: usize,
    /// Node id → once this many views were served, the node closes
    /// `/-/cluster` requests without answering.
    pub cluster_silent: BTreeMap<u64, usize>,
    /// Every key request is held this long (or its wait budget, if
    /// shorter), then answered 503 "no quorum" (see the module docs).
    pub unconfirmed: Option<Duration>,
    /// How long each key request was held for `unconfirmed`, in order.
    pub held: Vec<Duration>,
}

impl FakeState {
    /// Makes node `id` (a spare one) a member at its address, bumps the
    /// version and gives it the leadership of `shards` in a newer term.
    pub fn join(&mut self, id: u64, shards: &[u32]) {
        let addr = self
            .addrs
            .get((id - 1) as usize)
            .cloned()
            .unwrap_or_else(|| panic!("node {id} is not one of the fake's nodes"));
        self.members.insert(id, addr);
        self.version = Some(self.version.unwrap_or(0) + 1);
        let term = self.actual_term.max(self.advertised_term) + 1;
        for &shard in shards {
            self.leaders.insert(shard, (id, term));
        }
    }
}

/// Three fake nodes (and any spare ones); dropping it stops them.
pub struct FakeCluster {
    state: Arc<Mutex<FakeState>>,
    /// The nodes' addresses; `addrs[i]` is node `i + 1`.
    pub addrs: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeCluster {
    /// Starts three nodes; node 1 leads every shard in term 1, and says so.
    pub fn start(shards: u32) -> FakeCluster {
        Self::start_with(shards, 3)
    }

    /// Starts `nodes` nodes (at least 3) of which 1-3 are members; the
    /// others serve like any fake node and become members when a test
    /// adds them to `members`.
    pub fn start_with(shards: u32, nodes: usize) -> FakeCluster {
        let listeners: Vec<std::net::TcpListener> = (0..nodes.max(3))
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let state = Arc::new(Mutex::new(FakeState {
            shards,
            members: addrs
                .iter()
                .take(3)
                .enumerate()
                .map(|(i, addr)| (i as u64 + 1, addr.to_string()))
                .collect(),
            version: None,
            cluster_id: None,
            leaders: BTreeMap::new(),
            lagging: BTreeMap::new(),
            lagging_views: BTreeMap::new(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
            advertised: Some(1),
            advertised_term: 1,
            actual: Some(1),
            actual_term: 1,
            fault: Fault::None,
            bounce: false,
            data: BTreeMap::new(),
            seen: Vec::new(),
            views: 0,
            views_by: BTreeMap::new(),
            views_refused: 0,
            shards_pad: BTreeMap::new(),
            join_after: None,
            cluster_views: Vec::new(),
            cluster_served: 0,
            cluster_silent: BTreeMap::new(),
            unconfirmed: None,
            held: Vec::new(),
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                for (i, listener) in listeners.into_iter().enumerate() {
                    listener.set_nonblocking(true).unwrap();
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::spawn(serve(listener, i as u64 + 1, shared.clone()));
                }
                let _ = stopped.await;
            });
        });
        FakeCluster {
            state,
            addrs,
            stop: Some(stop),
        }
    }

    /// Changes the script.
    pub fn set(&self, change: impl FnOnce(&mut FakeState)) {
        change(&mut self.state.lock().unwrap());
    }

    /// Reads the state.
    pub fn get<T>(&self, read: impl FnOnce(&FakeState) -> T) -> T {
        read(&self.state.lock().unwrap())
    }

    /// Key requests node `id` was sent with `method`.
    pub fn count(&self, id: u64, method: &str) -> usize {
        self.get(|s| {
            s.seen
                .iter()
                .filter(|seen| seen.node == id && seen.method == method)
                .count()
        })
    }

    /// `host:port,host:port,host:port` of the three members, for `--nodes`.
    pub fn node_list(&self) -> String {
        self.addrs
            .iter()
            .take(3)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Makes node `id` (a spare one) a member at its address, bumps the
    /// version and gives it the leadership of `shards` in a newer term.
    pub fn add_member(&self, id: u64, shards: &[u32]) {
        self.set(|s| s.join(id, shards));
    }

    /// Takes member `id` out, bumps the version and gives the shards it led
    /// back to node 1 in a newer term.
    pub fn remove_member(&self, id: u64) {
        self.set(|s| {
            s.members.remove(&id);
            s.version = Some(s.version.unwrap_or(0) + 1);
            let term = s.leaders.values().map(|&(_, term)| term).max().unwrap_or(0) + 1;
            for (leader, led) in s.leaders.values_mut() {
                if *leader == id {
                    *leader = 1;
                    *led = term;
                }
            }
        });
    }

    /// A key (`key_N`) of `shard`.
    pub fn key_in(&self, shard: u32) -> String {
        let shards = self.get(|s| s.shards);
        (0..)
            .map(|i| format!("key_{i}"))
            .find(|key| shard_of(key.as_bytes(), shards) == shard)
            .unwrap_or_default()
    }

    /// A `GET /-/cluster` body for the script: the members as they are
    /// now (active voters), `done` of `total` moves, `active` open (copying
    /// or joint, the rest planned); settled when `done == total`.
    pub fn cluster_view(
        &self,
        version: u64,
        done: u64,
        total: u64,
        active: Vec<MoveView>,
    ) -> ClusterView {
        let (shards, members) = self.get(|s| (s.shards, s.members.clone()));
        let copying = active
            .iter()
            .filter(|m| m.phase != kv_cluster::Phase::Joint)
            .count() as u64;
        let joint = active.len() as u64 - copying;
        ClusterView {
            cluster_id: ClusterId(0x5f0c),
            version,
            node_id: 1,
            meta_leader: Some(1),
            shards,
            replicas: 3,
            settled: done >= total,
            members: members
                .into_iter()
                .map(|(id, addr)| MemberView {
                    id,
                    addr,
                    state: MemberState::Active,
                    meta: MetaRole::Voter,
                    shards_hosted: shards,
                    shards_led: 0,
                })
                .collect(),
            moves: MoveCounts {
                total,
                done,
                copying,
                joint,
                planned: total.saturating_sub(done + copying + joint),
            },
            active,
        }
    }

    /// Key requests node `id` was sent for `path`.
    pub fn count_path(&self, id: u64, path: &str) -> usize {
        self.get(|s| {
            s.seen
                .iter()
                .filter(|seen| seen.node == id && seen.path == path)
                .count()
        })
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, id: u64, state: Arc<Mutex<FakeState>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { answer(id, &state, request).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// Node `id`'s answer, with its placement version header. An `Err` makes
/// hyper close the connection without answering.
async fn answer(
    id: u64,
    state: &Mutex<FakeState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let budget_ms = budget_of(&parts.headers);
    let hold = {
        let s = state.lock().unwrap();
        s.unconfirmed
            .filter(|_| !parts.uri.path().starts_with("/-/"))
            .map(|hold| budget_ms.map_or(hold, |ms| hold.min(Duration::from_millis(ms))))
    };
    if let Some(hold) = hold {
        // A leader trying to confirm a request without a quorum.
        let started = Instant::now();
        tokio::time::sleep(hold).await;
        let held = started.elapsed();
        let mut s = state.lock().unwrap();
        let path = parts.uri.path().to_owned();
        s.seen.push(Seen {
            node: id,
            method: parts.method.as_str().to_owned(),
            path: path.clone(),
            body,
            direct: true,
            consistency: None,
            budget_ms,
        });
        s.held.push(held);
        let shard = shard_of(path.trim_start_matches('/').as_bytes(), s.shards);
        let mut response = json(
            503,
            format!("{{\"error\":\"shard {shard} has no quorum\"}}\n"),
        );
        response
            .headers_mut()
            .insert("retry-after", "1".parse().unwrap());
        return Ok(response);
    }
    let mut s = state.lock().unwrap();
    let version = match s.lagging.get(&id) {
        Some(lagging) => Some(lagging.version),
        None => s.version,
    };
    let mut response = answer_locked(id, &mut s, parts, body)?;
    if let Some(version) = version {
        response
            .headers_mut()
            .insert(PLACEMENT_VERSION_HEADER, version.into());
    }
    Ok(response)
}

/// A request's `X-Kv-Wait-Budget-Ms`.
fn budget_of(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get("x-kv-wait-budget-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Node `id`'s `/-/shards` body: the layout it shows (its own if lagging).
fn shards_answer(id: u64, s: &FakeState) -> Vec<u8> {
    let (version, members) = match s.lagging.get(&id) {
        Some(lagging) => (Some(lagging.version), lagging.members.clone()),
        None => (s.version, s.members.clone()),
    };
    let ids: Vec<u64> = members.keys().copied().collect();
    let view = ShardsView {
        shards: s.shards,
        replicas: 3,
        node_id: id,
        groups: (0..s.shards)
            .map(|shard| {
                let (leader, term) = match s.leaders.get(&shard) {
                    Some(&(leader, term)) => (Some(leader), term),
                    None => (s.advertised, s.advertised_term),
                };
                GroupView {
                    shard,
                    replicas: ids.clone(),
                    preferred_leader: ids.first().copied().unwrap_or(1),
                    // A leader the node does not know as a member is not
                    // named (kv-node cannot give its address).
                    leader: leader.filter(|leader| members.contains_key(leader)),
                    term: Some(term),
                    committed: None,
                    applied: None,
                    snapshot: None,
                    purged: None,
                    hosted: true,
                }
            })
            .collect(),
        members,
    };
    match (version, s.cluster_id) {
        (None, None) => serde_json::to_vec(&view).unwrap(),
        (version, cluster_id) => {
            let fields = PlacementFields {
                cluster_id,
                version,
                member_states: view
                    .members
                    .keys()
                    .map(|&id| (id, MemberState::Active))
                    .collect(),
                moving: BTreeMap::new(),
            };
            shards_body(&view, &fields)
        }
    }
}

fn answer_locked(
    id: u64,
    s: &mut FakeState,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let path = parts.uri.path().to_owned();
    if path == "/-/health" {
        return Ok(json(200, "{\"status\":\"ok\"}\n".into()));
    }
    if path == "/-/cluster" {
        if s.cluster_silent
            .get(&id)
            .is_some_and(|&after| s.cluster_served >= after)
        {
            return Err(std::io::Error::other("down: closing without an answer"));
        }
        // The next view in turn, then the last one again and again.
        let Some(mut view) = s
            .cluster_views
            .get(s.cluster_served)
            .or(s.cluster_views.last())
            .cloned()
        else {
            return Ok(json(404, "{\"error\":\"Not found\"}\n".into()));
        };
        s.cluster_served += 1;
        view.node_id = id;
        return Ok(json(200, serde_json::to_string(&view).unwrap()));
    }
    if path == "/-/shards" {
        s.views += 1;
        *s.views_by.entry(id).or_default() += 1;
        if s.views_refused > 0 {
            s.views_refused -= 1;
            return Ok(json(503, "{\"error\":\"starting\"}\n".into()));
        }
        if let Some(left) = s.lagging_views.get_mut(&id) {
            if *left == 0 {
                s.lagging_views.remove(&id);
                s.lagging.remove(&id);
            } else {
                *left -= 1;
            }
        }
        let mut body = shards_answer(id, s);
        if let Some(&pad) = s.shards_pad.get(&id) {
            let mut object: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if let Some(fields) = object.as_object_mut() {
                fields.insert("pad".to_owned(), "x".repeat(pad).into());
            }
            body = serde_json::to_vec(&object).unwrap();
        }
        return Ok(json(200, String::from_utf8(body).unwrap()));
    }
    let method = parts.method.as_str().to_owned();
    let direct = parts
        .headers
        .get("x-kv-route")
        .is_some_and(|v| v == "direct");
    let consistency = parts
        .headers
        .get("x-kv-consistency")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    s.seen.push(Seen {
        node: id,
        method: method.clone(),
        path: path.clone(),
        body: body.clone(),
        direct,
        consistency: consistency.clone(),
        budget_ms: budget_of(&parts.headers),
    });
    if s.join_after
        .as_ref()
        .is_some_and(|(after, _, _)| s.seen.len() >= *after)
    {
        if let Some((_, joining, shards)) = s.join_after.take() {
            s.join(joining, &shards);
        }
    }
    let key = path.trim_start_matches('/').to_owned();
    let shard = shard_of(key.as_bytes(), s.shards);
    if s.bounce {
        s.actual_term += 1;
        let next = id % 3 + 1;
        let addr = s
            .members
            .get(&next)
            .cloned()
            .expect("a bouncing fake has members 1, 2 and 3");
        let not_leader = NotLeader::new(shard, next, &addr, s.actual_term);
        return Ok(json(421, serde_json::to_string(&not_leader).unwrap()));
    }
    let stale_read = method == "GET" && consistency.as_deref() == Some("stale");
    let (actual, actual_term) = match s.leaders.get(&shard) {
        Some(&(leader, term)) => (Some(leader), term),
        None => (s.actual, s.actual_term),
    };
    if actual != Some(id) && !stale_read {
        return Ok(match actual {
            Some(leader) => {
                // A leader that is not a member yet is still at its address.
                let addr = s.members.get(&leader).cloned().unwrap_or_else(|| {
                    s.addrs
                        .get((leader as usize).wrapping_sub(1))
                        .cloned()
                        .unwrap_or_default()
                });
                let not_leader = NotLeader::new(shard, leader, &addr, actual_term);
                let mut response = json(421, serde_json::to_string(&not_leader).unwrap());
                response
                    .headers_mut()
                    .insert("x-kv-leader", addr.parse().unwrap());
                response
            }
            None => {
                let mut response = json(
                    503,
                    format!(
                        "{{\"error\":\"shard {shard} has no leader (election in progress)\"}}\n"
                    ),
                );
                response
                    .headers_mut()
                    .insert("retry-after", "1".parse().unwrap());
                response
            }
        });
    }
    if matches!(method.as_str(), "PUT" | "POST" | "DELETE") {
        match s.fault {
            Fault::None => {}
            Fault::Status504 => {
                return Ok(json(
                    504,
                    "{\"error\":\"outcome unknown: timeout after proposing\"}\n".into(),
                ))
            }
            Fault::Close => return Err(std::io::Error::other("closing without an answer")),
        }
    }
    Ok(match method.as_str() {
        "PUT" | "POST" => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(value) if value.get("value").is_some() => {
                let value = value.get("value").unwrap_or(&serde_json::Value::Null);
                s.data
                    .insert(key, Bytes::from(format!("{{\"value\":{value}}}\n")));
                json(200, "{\"message\":\"Value stored successfully\"}\n".into())
            }
            _ => json(400, "{\"error\":\"Malformed JSON body\"}\n".into()),
        },
        "GET" => match s.data.get(&key) {
            Some(value) => json(200, String::from_utf8_lossy(value).into_owned()),
            None => json(404, "{\"error\":\"Key not found\"}\n".into()),
        },
        "DELETE" => match s.data.remove(&key) {
            Some(_) => json(200, "{\"message\":\"Key deleted successfully\"}\n".into()),
            None => json(404, "{\"error\":\"Key not found\"}\n".into()),
        },
        _ => json(405, "{\"error\":\"Method not allowed\"}\n".into()),
    })
}
