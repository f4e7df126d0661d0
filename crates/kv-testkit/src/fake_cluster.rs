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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kv_cluster::{shard_of, GroupView, NotLeader, ShardsView};

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
}

/// What the fake cluster believes, and what it has seen.
#[derive(Debug)]
pub struct FakeState {
    /// Number of shards in `/-/shards`.
    pub shards: u32,
    /// Member id → address; ids 1-3 are the fake nodes. A test may add
    /// members at addresses where nothing listens (a killed node).
    pub members: BTreeMap<u64, String>,
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
}

/// Three fake nodes; dropping it stops them.
pub struct FakeCluster {
    state: Arc<Mutex<FakeState>>,
    /// The nodes' addresses; `addrs[i]` is member `i + 1`.
    pub addrs: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeCluster {
    /// Starts three nodes; node 1 leads every shard in term 1, and says so.
    pub fn start(shards: u32) -> FakeCluster {
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let state = Arc::new(Mutex::new(FakeState {
            shards,
            members: addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| (i as u64 + 1, addr.to_string()))
                .collect(),
            advertised: Some(1),
            advertised_term: 1,
            actual: Some(1),
            actual_term: 1,
            fault: Fault::None,
            bounce: false,
            data: BTreeMap::new(),
            seen: Vec::new(),
            views: 0,
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

    /// `host:port,host:port,host:port`, for `--nodes`.
    pub fn node_list(&self) -> String {
        self.addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
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

/// Node `id`'s answer. An `Err` makes hyper close the connection without
/// answering.
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
    let path = parts.uri.path().to_owned();
    let mut s = state.lock().unwrap();
    if path == "/-/health" {
        return Ok(json(200, "{\"status\":\"ok\"}\n".into()));
    }
    if path == "/-/shards" {
        s.views += 1;
        let view = ShardsView {
            shards: s.shards,
            replicas: 3,
            node_id: id,
            members: s.members.clone(),
            groups: (0..s.shards)
                .map(|shard| GroupView {
                    shard,
                    replicas: vec![1, 2, 3],
                    preferred_leader: 1,
                    leader: s.advertised,
                    term: Some(s.advertised_term),
                    committed: None,
                    applied: None,
                    snapshot: None,
                    purged: None,
                    hosted: true,
                })
                .collect(),
        };
        return Ok(json(200, serde_json::to_string(&view).unwrap()));
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
    });
    let key = path.trim_start_matches('/').to_owned();
    let shard = shard_of(key.as_bytes(), s.shards);
    if s.bounce {
        s.actual_term += 1;
        let next = id % 3 + 1;
        let addr = s.members[&next].clone();
        let not_leader = NotLeader::new(shard, next, &addr, s.actual_term);
        return Ok(json(421, serde_json::to_string(&not_leader).unwrap()));
    }
    let stale_read = method == "GET" && consistency.as_deref() == Some("stale");
    if s.actual != Some(id) && !stale_read {
        return Ok(match s.actual {
            Some(leader) => {
                let addr = s.members[&leader].clone();
                let not_leader = NotLeader::new(shard, leader, &addr, s.actual_term);
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
                s.data.insert(
                    key,
                    Bytes::from(format!("{{\"value\":{}}}\n", value["value"])),
                );
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
