//! kv-node's failures, and the one place that maps each to a status.
//!
//! Most are a [`kv_http::ApiError`], whose status and JSON body are chosen
//! in kv-http's one map (shared with kv-proxy, so a client cannot tell which
//! refused it); this module says which API error each storage failure
//! becomes. Cluster mode adds [`ClusterError`]: the answers of the
//! replicated request path (design `docs/replication.md` §6.1), whose rule
//! every client relies on: **421 and 503 mean the write was not proposed
//! and never will be applied; only 504 means the outcome is unknown.**

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use kv_cluster::{NotLeader, Refusal, LEADER_HEADER};
use kv_http::{json_response, Body};
use kv_store::StoreError;

pub use kv_http::ApiError;

/// A request's failure in kv-node: an [`ApiError`] (which the store's
/// errors convert into, so handlers can `?` a store call) or a failure of
/// the replicated path.
#[derive(Debug)]
pub enum NodeError {
    /// The failures kv-node shares with kv-proxy.
    Api(ApiError),
    /// Cluster mode's own answers.
    Cluster(ClusterError),
    /// The members API and metadata proposals (issue 13).
    Membership(MembershipError),
}

/// Why a change of the cluster's members (or any proposal to the metadata
/// group) was not made, `docs/membership.md` §4.1. Like the key path's
/// rule: **503 means nothing was proposed; only 504 leaves the outcome
/// unknown** (the caller reads `GET /-/cluster` to learn it).
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The body or path does not say what to do (400).
    #[error("{0}")]
    BadRequest(String),
    /// The body is longer than the members API reads (413).
    #[error("body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The metadata group refused the command (404 for an unknown member,
    /// 503 before the state is bootstrapped, 409 otherwise).
    #[error("{0}")]
    Refused(Refusal),
    /// The address given for a new member does not answer as that member
    /// of this cluster (409): nothing was proposed.
    #[error("nothing at {addr} answers as node {id} of this cluster ({why}); start it there first: kv-node --node-id {id} --join <a member's address> --advertise {addr}")]
    NotThere { id: u64, addr: String, why: String },
    /// The metadata group has no leader, or its leader no quorum (503).
    #[error("the cluster's metadata group has no leader with a quorum now; nothing was proposed, try again")]
    NoLeader,
    /// Proposed (or maybe), and no answer came (504).
    #[error("outcome unknown: {0}; GET /-/cluster says whether it was applied")]
    Unknown(String),
}

impl MembershipError {
    /// The HTTP status: the one map of the members API.
    pub fn status(&self) -> StatusCode {
        match self {
            MembershipError::BadRequest(_) | MembershipError::Refused(Refusal::BadAddr { .. }) => {
                StatusCode::BAD_REQUEST
            }
            MembershipError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            MembershipError::Refused(Refusal::UnknownMember { .. }) => StatusCode::NOT_FOUND,
            MembershipError::Refused(Refusal::NotBootstrapped) | MembershipError::NoLeader => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            MembershipError::Refused(_) | MembershipError::NotThere { .. } => StatusCode::CONFLICT,
            MembershipError::Unknown(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// `{"error": ...}` (with `"refusal"`, the typed reason, when the
    /// metadata group refused: a forwarding node rebuilds the error from
    /// it); a 503 says `Retry-After: 1`.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let (MembershipError::Refused(refusal), Some(fields)) = (&self, body.as_object_mut()) {
            fields.insert(
                "refusal".into(),
                serde_json::to_value(refusal).unwrap_or_default(),
            );
        }
        let mut bytes = body.to_string().into_bytes();
        bytes.push(b'\n');
        let mut response = json_response(status, Bytes::from(bytes));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<MembershipError> for NodeError {
    fn from(error: MembershipError) -> Self {
        NodeError::Membership(error)
    }
}

/// Why the replicated request path did not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// This node does not lead the key's shard and the client asked for a
    /// direct answer (`X-Kv-Route: direct`), or the request was already
    /// forwarded once. Given before anything was proposed: safe to retry at
    /// the leader it names.
    #[error("not leader")]
    NotLeader(NotLeader),
    /// No leader is known (an election is in progress). Not proposed.
    #[error("shard {shard} has no leader (election in progress)")]
    NoLeader { shard: u32 },
    /// The leader has no recent quorum acknowledgement (it may be cut off,
    /// or was just elected): refused before proposing.
    #[error("shard {shard} has no quorum")]
    NoQuorum { shard: u32 },
    /// The leader could not be reached to forward a request to, before the
    /// request was sent. Not proposed.
    #[error("shard {shard}: leader {leader} at {addr} is unreachable: {why}")]
    LeaderUnreachable {
        shard: u32,
        leader: u64,
        addr: String,
        why: String,
    },
    /// A client's request that waited out this node's `--leader-wait` for
    /// one of [`ClusterError::NoLeader`], [`ClusterError::NoQuorum`] or
    /// [`ClusterError::LeaderUnreachable`] (`last`, the reason at the end):
    /// its answer, with how long the request took from its arrival, every
    /// try included, to the millisecond. Not proposed.
    #[error("{last}; waited {}", humantime::format_duration(whole_ms(*waited)))]
    Waited {
        last: Box<ClusterError>,
        waited: Duration,
    },
    /// The write was proposed (or may have been) and no answer came: it may
    /// still commit. Never retried by anyone.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A node-to-node request (Raft traffic, a forwarded request) from a
    /// node of another cluster (design §8's cluster id): refused, nothing
    /// done.
    #[error("node {peer} belongs to cluster {theirs} but this node belongs to cluster {ours}: it was started on another cluster's data dir; refused")]
    OtherCluster {
        ours: String,
        theirs: String,
        peer: String,
    },
    /// A majority of the other members refuse this node as another
    /// cluster's: its data dir is the foreign one, so it serves no key (not
    /// even a stale read) until they accept it.
    #[error("Service unavailable: this node's data dir belongs to cluster {ours}, its peers are cluster {theirs}; start it on its own data dir")]
    ForeignDataDir { ours: String, theirs: String },
}

impl ClusterError {
    /// The HTTP status: the one map of the replicated path.
    pub fn status(&self) -> StatusCode {
        match self {
            ClusterError::NotLeader(_) => StatusCode::MISDIRECTED_REQUEST,
            ClusterError::NoLeader { .. }
            | ClusterError::NoQuorum { .. }
            | ClusterError::LeaderUnreachable { .. }
            | ClusterError::ForeignDataDir { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ClusterError::Waited { last, .. } => last.status(),
            ClusterError::OutcomeUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
            ClusterError::OtherCluster { .. } => StatusCode::CONFLICT,
        }
    }

    /// The full HTTP response: a 421 carries the [`NotLeader`] body and the
    /// leader's address in `X-Kv-Leader`; a 503 says `Retry-After: 1`.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = match &self {
            ClusterError::NotLeader(not_leader) => serde_json::to_vec(not_leader)
                .unwrap_or_else(|_| b"{\"error\":\"not leader\"}".to_vec()),
            ClusterError::OtherCluster { ours, theirs, .. } => serde_json::json!({
                "error": self.to_string(),
                "cluster_id": ours,
                "peer_cluster_id": theirs,
            })
            .to_string()
            .into_bytes(),
            other => serde_json::json!({ "error": other.to_string() })
                .to_string()
                .into_bytes(),
        };
        let mut body = body;
        body.push(b'\n');
        let mut response = json_response(status, Bytes::from(body));
        let headers = response.headers_mut();
        if let ClusterError::NotLeader(not_leader) = &self {
            if let Ok(addr) = HeaderValue::from_str(&not_leader.leader_addr) {
                headers.insert(HeaderName::from_static(LEADER_HEADER), addr);
            }
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A wait as it was, to the millisecond ("2s 953ms"): not rounded to a
/// figure that looks like the bound.
fn whole_ms(waited: Duration) -> Duration {
    Duration::from_millis(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX))
}

impl From<ApiError> for NodeError {
    fn from(error: ApiError) -> Self {
        NodeError::Api(error)
    }
}

impl From<ClusterError> for NodeError {
    fn from(error: ClusterError) -> Self {
        NodeError::Cluster(error)
    }
}

impl From<StoreError> for NodeError {
    fn from(error: StoreError) -> Self {
        NodeError::Api(match error {
            // A value the log cannot frame: refused before anything was
            // acknowledged, as an oversized body is.
            StoreError::TooLarge { max, .. } => ApiError::BodyTooLarge { limit: max },
            // `key::parse` caps keys far below the store's limit; kept total anyway.
            StoreError::KeyTooLong(_) => {
                ApiError::InvalidKey("the key is longer than the store accepts")
            }
            // The store's own words: "disk full appending to ...; writes
            // resume once space is freed" or "disk error ...".
            error @ (StoreError::DiskFull { .. }
            | StoreError::DiskFailed { .. }
            | StoreError::Closed
            | StoreError::Snapshot(_)) => ApiError::Unavailable(error.to_string()),
        })
    }
}

impl NodeError {
    /// The full HTTP response for this error.
    pub fn into_response(self) -> Response<Body> {
        match self {
            NodeError::Api(error) => error.into_response(),
            NodeError::Cluster(error) => error.into_response(),
            NodeError::Membership(error) => error.into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::RETRY_AFTER;

    #[test]
    fn store_errors_map_to_their_statuses() {
        let disk = StoreError::DiskFailed {
            action: "appending to",
            path: "data/wal-1.log".into(),
            source: std::sync::Arc::new(std::io::Error::from_raw_os_error(28)),
        };
        let cases = [
            (
                disk,
                503,
                "Service unavailable: disk error appending to data/wal-1.log: ",
            ),
            (
                StoreError::DiskFull {
                    action: "appending to",
                    path: "data/wal-1.log".into(),
                    source: std::sync::Arc::new(std::io::Error::from_raw_os_error(28)),
                },
                503,
                "Service unavailable: disk full appending to data/wal-1.log: ",
            ),
            (
                StoreError::Closed,
                503,
                "Service unavailable: the store is shutting down",
            ),
            (
                StoreError::TooLarge { len: 10, max: 5 },
                413,
                "Request body too large: the limit is 5 bytes",
            ),
            (StoreError::KeyTooLong(70_000), 400, "Invalid key: "),
        ];
        for (error, status, message) in cases {
            let NodeError::Api(error) = NodeError::from(error) else {
                panic!("a store error is an API error");
            };
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert!(error.message().starts_with(message), "{}", error.message());
            let response = error.into_response();
            assert_eq!(response.headers().contains_key(RETRY_AFTER), status == 503);
        }
    }

    #[test]
    fn cluster_errors_map_to_their_statuses() {
        let not_leader = ClusterError::NotLeader(NotLeader::new(17, 2, "127.0.0.1:8082", 5));
        let response = not_leader.into_response();
        assert_eq!(response.status().as_u16(), 421);
        assert_eq!(response.headers()[LEADER_HEADER], "127.0.0.1:8082");
        for (error, status) in [
            (ClusterError::NoLeader { shard: 1 }, 503),
            (ClusterError::NoQuorum { shard: 1 }, 503),
            (ClusterError::OutcomeUnknown("timed out".into()), 504),
            (
                ClusterError::Waited {
                    last: Box::new(ClusterError::NoQuorum { shard: 1 }),
                    waited: Duration::from_millis(2_950),
                },
                503,
            ),
        ] {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers().contains_key(RETRY_AFTER), status == 503);
        }
        let waited = ClusterError::Waited {
            last: Box::new(ClusterError::NoLeader { shard: 17 }),
            waited: Duration::from_micros(2_953_700),
        };
        assert_eq!(
            waited.to_string(),
            "shard 17 has no leader (election in progress); waited 2s 953ms"
        );
    }

    #[test]
    fn membership_errors_map_to_their_statuses() {
        let not_there = MembershipError::NotThere {
            id: 4,
            addr: "127.0.0.1:8084".into(),
            why: "connection refused".into(),
        };
        for (error, status) in [
            (MembershipError::BadRequest("no id".into()), 400),
            (
                MembershipError::Refused(Refusal::UnknownMember { id: 9 }),
                404,
            ),
            (MembershipError::Refused(Refusal::IdTaken { id: 2 }), 409),
            (MembershipError::Refused(Refusal::SingleReplica), 409),
            (MembershipError::Refused(Refusal::NotBootstrapped), 503),
            (not_there, 409),
            (MembershipError::BodyTooLarge { limit: 65536 }, 413),
            (MembershipError::NoLeader, 503),
            (MembershipError::Unknown("timed out".into()), 504),
        ] {
            let refused = matches!(error, MembershipError::Refused(_));
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers().contains_key(RETRY_AFTER), status == 503);
            let body = futures_body(response);
            assert!(body["error"].is_string(), "{body}");
            assert_eq!(body.get("refusal").is_some(), refused, "{body}");
        }
    }

    fn futures_body(response: Response<Body>) -> serde_json::Value {
        use http_body_util::BodyExt;
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(response.into_body().collect())
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }
}
