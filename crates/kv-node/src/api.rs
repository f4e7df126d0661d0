//! The HTTP API: routing a request to the store and shaping the answer.
//!
//! | request                               | answer                                      |
//! |---------------------------------------|---------------------------------------------|
//! | `PUT`/`POST /<key>` `{"value": <json>}` | 200 `{"message": "Value stored successfully"}` |
//! | `GET /<key>`                          | 200 `{"value": <json>}` or 404              |
//! | `HEAD /<key>`                         | as `GET`, without the body                  |
//! | `DELETE /<key>`                       | 200 `{"message": "Key deleted successfully"}` or 404 |
//! | `GET /-/health`                       | 200 `{"status": "ok", ...}`                 |
//! | `OPTIONS /<key>`, `OPTIONS *`         | 204 with `Allow`                            |
//!
//! A PUT body is read as Python's `json` read it for the Flask store: a
//! UTF-8 byte-order mark before it is skipped, and when `value` appears more
//! than once the last one wins (its text is stored byte for byte).
//!
//! The store holds, for each key, the exact body a `GET` answers with
//! (`{"value":<the JSON text the client sent>}`), so a read copies nothing and
//! serialises nothing. Bodies end in a newline, as Flask's `jsonify` does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use kv_http::metrics::{Metrics, Operation, Scrape};
use kv_http::request::{check_head, close_after, declared_length, discard_body};
use kv_http::server::Reserve;
use kv_http::{json_response, key};
use kv_store::Store;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiError, NodeError};
use crate::oplog::{Entry, OpLog};

pub use kv_http::Body;

use crate::cluster::request::{is_forwarded, DELETED, STORED};
use crate::cluster::{ClusterNode, NotReady, Unavailable};
const KEY_METHODS: &str = "GET, HEAD, PUT, POST, DELETE, OPTIONS";
const ADMIN_METHODS: &str = "GET, HEAD, OPTIONS";
/// What a stored body looks like around the value's JSON text.
const VALUE_PREFIX: &[u8] = b"{\"value\":";
const VALUE_SUFFIX: &[u8] = b"}\n";

/// What every request handler shares.
pub struct App {
    pub store: Arc<Store>,
    pub metrics: Metrics,
    pub op_log: Option<Arc<OpLog>>,
    pub max_value_bytes: usize,
    pub body_timeout: std::time::Duration,
    pub started: Instant,
    /// Cluster mode (`--peers`); `None` for a standalone node.
    pub cluster: Option<Arc<ClusterNode>>,
    /// The token every request but `/-/health` needs, if one is set.
    pub auth: kv_http::auth::Auth,
}

/// What each worker thread serves with: the shared [`App`].
pub struct NodeWorker(pub Arc<App>);

impl kv_http::workers::Worker for NodeWorker {
    type Body = Body;

    fn service(
        &self,
        reserve: Reserve,
    ) -> impl hyper::service::HttpService<
        Incoming,
        ResBody = Body,
        Future: Send + 'static,
        Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    > + Send
           + 'static {
        let app = Arc::clone(&self.0);
        hyper::service::service_fn(move |request| {
            handle(Arc::clone(&app), reserve.clone(), request)
        })
    }
}

/// The service function: every request gets an answer, errors included.
/// A connection in the probe reserve (over `--max-connections`) is served
/// `/-/health` and `/-/ready` only.
pub async fn handle(
    app: Arc<App>,
    reserve: Reserve,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let operation = Operation::of(request.method(), request.uri().path());
    // Split so the key can borrow from the URI while the body is consumed:
    // the common, undecoded key is never copied.
    let (parts, body) = request.into_parts();
    let mut body = Some(body);
    let mut response = route(&app, &reserve, &parts, &mut body, started)
        .await
        .unwrap_or_else(NodeError::into_response);
    if let Some(cluster) = &app.cluster {
        // Every answer of a cluster node says which placement it routed by
        // (issue 13): a client holding an older one refreshes.
        let version = cluster.layout().version;
        if version > 0 {
            response.headers_mut().insert(
                HeaderName::from_static(kv_cluster::PLACEMENT_VERSION_HEADER),
                HeaderValue::from(version),
            );
        }
    }
    // Answered without reading the body (a bad key, a refused method, a GET
    // that carried one): hyper closes such a connection, so say so.
    if body.is_some_and(|body| !body.is_end_stream()) {
        close_after(&mut response);
    }
    app.metrics
        .record(operation, response.status().as_u16(), started.elapsed());
    Ok(response)
}

impl App {
    /// Hands an entry to the operation log, if there is one; builds it only then.
    fn log_op(&self, entry: impl FnOnce() -> Entry) {
        if let Some(op_log) = &self.op_log {
            op_log.record(entry());
        }
    }
}

async fn route(
    app: &App,
    reserve: &Reserve,
    parts: &Parts,
    body: &mut Option<Incoming>,
    arrived: Instant,
) -> Result<Response<Body>, NodeError> {
    let path = parts.uri.path();
    reserve.admit(path)?;
    // Before anything else, node-to-node traffic included: a peer that
    // says which member it is gets its refusal logged once.
    app.auth
        .check(&parts.method, path, &parts.headers, || peer_name(parts))?;
    // Mutual TLS (kv-http's `tls`): on a port that asks for client
    // certificates, node-to-node requests need one signed by the CA; other
    // clients (curl with the CA only) need none.
    if node_to_node(path, &parts.headers) {
        reserve.client_cert().require()?;
    }
    if let Some(cluster) = &app.cluster {
        // Node-to-node traffic: kv-raft answers it, errors included.
        if path.starts_with("/-/raft/") && path != "/-/raft/cluster" {
            // From a node of another cluster: 409, before anything is read.
            cluster.check_cluster_id(&parts.headers)?;
            // A node that cannot persist takes no leadership (its election
            // would wait on the disk while the old leader stays silent):
            // the sender sees 503, as from an unreachable node.
            if path == "/-/raft/transfer-leader" {
                if let Some(full) = cluster.disk_full() {
                    return Err(full.into());
                }
            }
            if let Some(body) = body.take() {
                let mut request = Request::new(body);
                *request.method_mut() = parts.method.clone();
                *request.uri_mut() = parts.uri.clone();
                return Ok(kv_raft::handle_raft(request, &cluster.groups).await);
            }
        }
    }
    check_head(parts.version, &parts.headers)?;
    if parts.method == Method::OPTIONS {
        return options(app, path);
    }
    if let Some(cluster) = &app.cluster {
        // The members API and forwarded metadata proposals (issue 13).
        if path.starts_with("/-/cluster") || path.starts_with("/-/meta/") {
            if let Some(answer) = crate::cluster::members::route(cluster, parts, body).await {
                return answer;
            }
        }
    }
    if let Some(admin) = path.strip_prefix("/-/") {
        return admin_route(app, &parts.method, admin);
    }
    if !path.starts_with('/') {
        // `*` (asterisk form) is for OPTIONS only.
        return Err(ApiError::InvalidKey("the request target is not a path").into());
    }
    let key = key::parse(path)?;
    if let Some(cluster) = &app.cluster {
        return cluster_key(app, cluster, parts, &key, body, arrived).await;
    }
    local_key(app, parts, &key, body, true).await
}

/// Whether only another node sends this request: Raft traffic, forwarded
/// metadata proposals, and forwarded key requests.
fn node_to_node(path: &str, headers: &HeaderMap) -> bool {
    path.starts_with("/-/raft/") || path.starts_with("/-/meta/") || is_forwarded(headers)
}

/// Who sent a request, when it says it is a member (`X-Kv-Node-Id` on
/// node-to-node traffic, `X-Kv-Forwarded-By` on a forwarded request).
fn peer_name(parts: &Parts) -> Option<String> {
    [
        kv_cluster::NODE_ID_HEADER,
        crate::cluster::request::FORWARDED_BY_HEADER,
    ]
    .into_iter()
    .find_map(|name| parts.headers.get(name))
    .map(|id| format!("node {}", String::from_utf8_lossy(id.as_bytes())))
}

/// A key request served by this node's store: a standalone node's every
/// key, and in cluster mode the keys of the solo shards this node owns
/// (the same path, so the same durability and speed). `logged`: whether
/// the op log records it (not for a request another node forwarded).
async fn local_key(
    app: &App,
    parts: &Parts,
    key: &str,
    body: &mut Option<Incoming>,
    logged: bool,
) -> Result<Response<Body>, NodeError> {
    match parts.method {
        Method::GET | Method::HEAD => get(app, key, logged).await,
        Method::PUT | Method::POST => match body.take() {
            Some(body) => put(app, key, &parts.headers, body, logged).await,
            None => Err(ApiError::BodyRead("the body was already read".into()).into()),
        },
        Method::DELETE => delete(app, key, logged).await,
        _ => Err(ApiError::MethodNotAllowed { allow: KEY_METHODS }.into()),
    }
}

/// A key request in cluster mode: validated here exactly as standalone
/// (400/405/413 before anything else), then the replicated path, or for a
/// solo shard the owner's store (here, or forwarded to the owner).
/// `arrived` is when the request came in: its wait for a leader counts
/// from there.
async fn cluster_key(
    app: &App,
    cluster: &ClusterNode,
    parts: &Parts,
    key: &str,
    body: &mut Option<Incoming>,
    arrived: Instant,
) -> Result<Response<Body>, NodeError> {
    let shard = cluster.shard_of(key);
    let logged = !is_forwarded(&parts.headers);
    if !logged {
        // Forwarded by a node of another cluster: 409, nothing done.
        cluster.check_cluster_id(&parts.headers)?;
    }
    // This node's data dir is another cluster's (its peers refuse it): it
    // must not answer from it, not even a stale read.
    if let Some(foreign) = cluster.foreign_data_dir() {
        return Err(foreign.into());
    }
    let solo = cluster.solo_owner(shard);
    if solo == Some(cluster.id()) {
        return local_key(app, parts, key, body, logged).await;
    }
    let request = cluster.key_request(parts, key, shard, arrived);
    match parts.method {
        Method::GET | Method::HEAD => {
            if logged {
                app.log_op(|| Entry::Get(key.into()));
            }
            match solo {
                Some(owner) => cluster.to_owner(&request, owner, Bytes::new()).await,
                None => cluster.read(&request).await,
            }
        }
        Method::PUT | Method::POST => {
            let Some(body) = body.take() else {
                return Err(ApiError::BodyRead("the body was already read".into()).into());
            };
            let raw = read_body(app, &parts.headers, body).await?;
            let stored = stored_body(&raw)?;
            if logged {
                app.log_op(|| Entry::Put(key.into(), stored.clone()));
            }
            if let Some(owner) = solo {
                return cluster.to_owner(&request, owner, raw).await;
            }
            let command = kv_raft::Command::Put {
                key: key.to_owned(),
                value: stored.to_vec(),
            };
            cluster.write(&request, command, raw).await
        }
        Method::DELETE => {
            if logged {
                app.log_op(|| Entry::Delete(key.into()));
            }
            if let Some(owner) = solo {
                return cluster.to_owner(&request, owner, Bytes::new()).await;
            }
            let command = kv_raft::Command::Delete {
                key: key.to_owned(),
            };
            cluster.write(&request, command, Bytes::new()).await
        }
        _ => Err(ApiError::MethodNotAllowed { allow: KEY_METHODS }.into()),
    }
}

/// `OPTIONS`: 204 with the methods the path takes (RFC 9110 §9.3.7).
fn options(app: &App, path: &str) -> Result<Response<Body>, NodeError> {
    let allow = if path == "*" {
        KEY_METHODS
    } else if let Some(allow) = app
        .cluster
        .as_ref()
        .and_then(|_| crate::cluster::members::allow(path))
    {
        allow
    } else if let Some(admin) = path.strip_prefix("/-/") {
        // Known admin paths only, as GET would.
        admin_route(app, &Method::HEAD, admin)?;
        ADMIN_METHODS
    } else {
        key::parse(path)?;
        KEY_METHODS
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    Ok(response)
}

async fn get(app: &App, key: &str, logged: bool) -> Result<Response<Body>, NodeError> {
    log::debug!("GET - Key: {key}");
    if logged {
        app.log_op(|| Entry::Get(key.into()));
    }
    let body = app.store.get(key).ok_or(ApiError::KeyNotFound)?;
    Ok(json_response(StatusCode::OK, body))
}

async fn put(
    app: &App,
    key: &str,
    headers: &HeaderMap,
    body: Incoming,
    logged: bool,
) -> Result<Response<Body>, NodeError> {
    let raw = read_body(app, headers, body).await?;
    let stored = stored_body(&raw)?;
    log::debug!("PUT - Key: {key}");
    if logged {
        app.log_op(|| Entry::Put(key.into(), stored.clone()));
    }
    app.store.put(key, stored).await?;
    Ok(json_response(StatusCode::OK, Bytes::from_static(STORED)))
}

async fn delete(app: &App, key: &str, logged: bool) -> Result<Response<Body>, NodeError> {
    log::debug!("DELETE - Key: {key}");
    if logged {
        app.log_op(|| Entry::Delete(key.into()));
    }
    if app.store.delete(key).await? {
        Ok(json_response(StatusCode::OK, Bytes::from_static(DELETED)))
    } else {
        Err(ApiError::KeyNotFound.into())
    }
}

/// Reads the whole request body, refusing more than `max_value_bytes` and a
/// client that stalls for longer than `body_timeout`. A declared length over
/// the limit is refused from the head alone (without `100 Continue`).
async fn read_body(app: &App, headers: &HeaderMap, mut body: Incoming) -> Result<Bytes, ApiError> {
    let limit = app.max_value_bytes;
    if declared_length(headers).is_some_and(|len| len > limit as u64) {
        discard_body(headers, &mut body).await;
        return Err(ApiError::BodyTooLarge { limit });
    }
    let collect = Limited::new(&mut body, limit).collect();
    match tokio::time::timeout(app.body_timeout, collect).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => {
            discard_body(headers, &mut body).await;
            Err(ApiError::BodyTooLarge { limit })
        }
        Ok(Err(error)) => Err(ApiError::BodyRead(error.to_string())),
    }
}

/// A PUT body: `value`'s JSON text, borrowed from the request. Written by
/// hand rather than derived because derive refuses a member given twice,
/// where Python's `json` (the Flask store's parser) keeps the last one.
struct PutBody<'a> {
    value: &'a RawValue,
}

impl<'de> Deserialize<'de> for PutBody<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PutBodyVisitor)
    }
}

struct PutBodyVisitor;

impl<'de> Visitor<'de> for PutBodyVisitor {
    type Value = PutBody<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object with a 'value' field")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut value = None;
        while let Some(is_value) = map.next_key_seed(IsValue)? {
            if is_value {
                // The last one wins, as in Python.
                value = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        value
            .map(|value| PutBody { value })
            .ok_or_else(|| de::Error::missing_field("value"))
    }
}

/// A member name, compared with `value` once unescaped, not kept.
struct IsValue;

impl<'de> de::DeserializeSeed<'de> for IsValue {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for IsValue {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<bool, E> {
        Ok(name == "value")
    }
}

/// The UTF-8 byte-order mark, which Flask's JSON reading skipped.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Validates a PUT body and builds the body a later GET will answer with.
pub fn stored_body(raw: &[u8]) -> Result<Bytes, ApiError> {
    let raw = raw.strip_prefix(BOM).unwrap_or(raw);
    // serde would also accept `[<value>]` for a one-field struct: only a JSON
    // object is a valid body.
    if raw.trim_ascii_start().first() != Some(&b'{') {
        return Err(match serde_json::from_slice::<IgnoredAny>(raw) {
            Ok(_) => ApiError::MissingValue,
            Err(error) => ApiError::MalformedJson(error.to_string()),
        });
    }
    let parsed: PutBody<'_> = serde_json::from_slice(raw).map_err(|error| {
        if error.is_data() {
            ApiError::MissingValue
        } else {
            ApiError::MalformedJson(error.to_string())
        }
    })?;
    Ok(value_body(parsed.value.get().as_bytes()))
}

/// `{"value":<json>}\n` around a value's JSON text.
pub fn value_body(json: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(VALUE_PREFIX.len() + json.len() + VALUE_SUFFIX.len());
    body.put_slice(VALUE_PREFIX);
    body.put_slice(json);
    body.put_slice(VALUE_SUFFIX);
    body.freeze()
}

fn admin_route(app: &App, method: &Method, path: &str) -> Result<Response<Body>, NodeError> {
    match path {
        "health" => {
            only_get(method)?;
            let mut body = serde_json::json!({
                "status": "ok",
                "keys": app.cluster.as_ref().map_or_else(|| app.store.len(), |c| c.keys()),
                // false while the disk is full and once a disk error stopped
                // writes (reads still work).
                "writable": app.store.writable().is_ok(),
                "uptime_seconds": app.started.elapsed().as_secs(),
                "version": env!("CARGO_PKG_VERSION"),
            });
            if let (Some(cluster), Some(fields)) = (&app.cluster, body.as_object_mut()) {
                fields.insert("node_id".into(), cluster.id().into());
                fields.insert("shards_led".into(), cluster.shards_led().into());
                fields.insert("shards_hosted".into(), cluster.shards_hosted().into());
                // Of the Raft groups hosted now (solo shards excluded), how
                // many recovered: what `/-/ready` waits for.
                let (recovered, groups) = cluster.recovered_of_hosted();
                fields.insert("groups_hosted".into(), groups.into());
                fields.insert("groups_recovered".into(), recovered.into());
                // Groups that neither vote nor campaign until caught up
                // after a repair (kv-raft's catch-up guard).
                fields.insert(
                    "groups_catching_up".into(),
                    cluster.groups_catching_up().into(),
                );
                // Still 200 (the process serves), but say which shards
                // cannot serve linearizable requests, as kv-proxy's health
                // names the nodes that are down.
                let unavailable = cluster.unavailable();
                if !unavailable.is_empty() {
                    fields.insert("status".into(), "degraded".into());
                }
                if let Some(foreign) = cluster.foreign_data_dir() {
                    fields.insert("status".into(), "degraded".into());
                    fields.insert("error".into(), foreign.to_string().into());
                }
                fields.insert(
                    "shards_unavailable".into(),
                    Unavailable::list_json(&unavailable),
                );
            }
            let mut bytes = body.to_string().into_bytes();
            bytes.push(b'\n');
            Ok(json_response(StatusCode::OK, Bytes::from(bytes)))
        }
        "ready" => {
            only_get(method)?;
            // The listener opens only after recovery, so "ready" means the
            // store still accepts writes (no disk failure, not closing); in
            // cluster mode also that every hosted group recovered and can
            // serve linearizable requests (a leader or quorum lost: 503
            // naming the shards).
            let ready = app
                .store
                .writable()
                .map_err(|error| NotReady {
                    error: error.to_string(),
                    shards: Vec::new(),
                })
                .and_then(|()| {
                    app.cluster
                        .as_ref()
                        .map_or(Ok(()), |cluster| cluster.ready())
                });
            match ready {
                Ok(()) => Ok(json_response(
                    StatusCode::OK,
                    Bytes::from_static(b"{\"ready\":true}\n"),
                )),
                Err(NotReady { error, shards }) => {
                    let mut body = serde_json::json!({ "ready": false, "error": error });
                    if let (false, Some(fields)) = (shards.is_empty(), body.as_object_mut()) {
                        fields.insert("shards".into(), Unavailable::list_json(&shards));
                    }
                    let mut bytes = body.to_string().into_bytes();
                    bytes.push(b'\n');
                    Ok(json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Bytes::from(bytes),
                    ))
                }
            }
        }
        "metrics" => {
            only_get(method)?;
            let mut response = Response::new(Full::new(Bytes::from(render_metrics(app))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(kv_http::metrics::CONTENT_TYPE),
            );
            Ok(response)
        }
        "shards" | "raft/cluster" => {
            only_get(method)?;
            let cluster = app.cluster.as_ref().ok_or(ApiError::UnknownAdminPath)?;
            let mut bytes = if path == "shards" {
                cluster.shards_json()
            } else {
                cluster.cluster_json()
            };
            if bytes.last() != Some(&b'\n') {
                bytes.push(b'\n');
            }
            Ok(json_response(StatusCode::OK, Bytes::from(bytes)))
        }
        _ => {
            // `shards/<s>/digest`: this replica's keys and digest (tests).
            let shard = path
                .strip_prefix("shards/")
                .and_then(|rest| rest.strip_suffix("/digest"))
                .and_then(|shard| shard.parse::<u32>().ok());
            match (shard, &app.cluster) {
                (Some(shard), Some(cluster)) => {
                    only_get(method)?;
                    if shard >= cluster.shards() {
                        return Err(ApiError::UnknownAdminPath.into());
                    }
                    let body = cluster
                        .digest(shard)
                        .unwrap_or_else(|| serde_json::json!({ "shard": shard, "hosted": false }));
                    let mut bytes = body.to_string().into_bytes();
                    bytes.push(b'\n');
                    Ok(json_response(StatusCode::OK, Bytes::from(bytes)))
                }
                _ => Err(ApiError::UnknownAdminPath.into()),
            }
        }
    }
}

fn only_get(method: &Method) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD) {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed {
            allow: ADMIN_METHODS,
        })
    }
}

fn render_metrics(app: &App) -> String {
    let mut scrape = Scrape::new(&app.metrics);
    scrape.gauge_u64("kv_keys", "Keys held by this node.", app.store.len() as u64);
    scrape.gauge_u64(
        "kv_uptime_seconds",
        "Seconds since the node started.",
        app.started.elapsed().as_secs(),
    );
    if let Some(log) = app.store.log_stats() {
        scrape.counter_u64(
            "kv_wal_records_total",
            "Records appended to the write-ahead log since start.",
            log.records,
        );
        scrape.counter_u64(
            "kv_wal_writes_total",
            "Batched writes to the log (group commit: many records each).",
            log.writes,
        );
        scrape.counter_u64(
            "kv_wal_fsyncs_total",
            "fdatasyncs of the log since start.",
            log.syncs,
        );
        scrape.counter(
            "kv_wal_fsync_seconds_total",
            "Time spent in log fdatasyncs (divide by kv_wal_fsyncs_total for the mean).",
            log.sync_nanos as f64 / 1e9,
        );
        scrape.gauge_u64(
            "kv_wal_active_bytes",
            "Bytes in the active log segment.",
            log.active_log_bytes,
        );
        scrape.counter_u64(
            "kv_snapshots_total",
            "Snapshots written since start.",
            log.snapshots,
        );
        scrape.gauge_u64(
            "kv_snapshot_bytes",
            "Size of the newest snapshot written since start (0 if none).",
            log.snapshot_bytes,
        );
        scrape.gauge_u64(
            "kv_snapshot_last_unix_seconds",
            "When the newest snapshot was written (0 if none since start).",
            log.snapshot_unix_secs,
        );
        scrape.gauge_u64(
            "kv_writable",
            "1 while the node accepts writes, 0 while its disk is full or after a disk error.",
            u64::from(app.store.writable().is_ok()),
        );
    }
    if let Some(cluster) = &app.cluster {
        cluster.add_metrics(&mut scrape);
    }
    if let Some(op_log) = &app.op_log {
        scrape.counter_u64(
            "kv_op_log_written_total",
            "Operation log lines written.",
            op_log.written(),
        );
        scrape.counter_u64(
            "kv_op_log_dropped_total",
            "Operation log lines dropped because the writer could not keep up.",
            op_log.dropped(),
        );
    }
    scrape.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_body_keeps_the_value_text() {
        let body = stored_body(br#"{"value": {"b": [1, 2.50, null]}}"#).unwrap();
        assert_eq!(&body[..], b"{\"value\":{\"b\": [1, 2.50, null]}}\n");
    }

    #[test]
    fn stored_body_rejects_bad_input() {
        assert!(matches!(stored_body(b"{"), Err(ApiError::MalformedJson(_))));
        assert!(matches!(stored_body(b""), Err(ApiError::MalformedJson(_))));
        assert!(matches!(stored_body(b"{}"), Err(ApiError::MissingValue)));
        assert!(matches!(stored_body(b"[1]"), Err(ApiError::MissingValue)));
        assert!(matches!(
            stored_body(br#"{"value": 1} x"#),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            stored_body(br#"{"value": 1,}"#),
            Err(ApiError::MalformedJson(_))
        ));
        // A BOM anywhere but first is not skipped.
        assert!(stored_body(b" \xEF\xBB\xBF{\"value\":1}").is_err());
    }

    #[test]
    fn a_duplicate_value_member_keeps_the_last_one_exactly() {
        let body = stored_body(br#"{"value": 1, "value": {"a": 2.50}}"#).unwrap();
        assert_eq!(&body[..], b"{\"value\":{\"a\": 2.50}}\n");
        // Other members, duplicated or not, are ignored; an escaped name counts.
        let body = stored_body(br#"{"x": 1, "x": 2, "\u0076alue": "v"}"#).unwrap();
        assert_eq!(&body[..], b"{\"value\":\"v\"}\n");
    }

    #[test]
    fn a_leading_utf8_bom_is_skipped() {
        let body = stored_body(b"\xEF\xBB\xBF{\"value\": 1}").unwrap();
        assert_eq!(&body[..], b"{\"value\":1}\n");
    }

    #[test]
    fn null_is_a_value() {
        assert_eq!(
            &stored_body(br#"{"value":null}"#).unwrap()[..],
            b"{\"value\":null}\n"
        );
    }
}
