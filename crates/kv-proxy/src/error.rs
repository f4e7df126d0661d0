//! Every way the proxy can fail a request. The status and body of each are
//! kv-http's one map ([`ApiError`], shared with kv-node), so a proxy 502 or
//! 504 is counted by name and a client cannot tell the proxy's refusal of a
//! bad key from a node's.
//!
//! The variants stay apart here (down, connect, timeout, upstream) for the
//! per-node counters in `/-/metrics`; to the client, "down" and "connect"
//! are one answer: the node is unavailable.
//!
//! Cluster mode (design §6.1, §12) adds the leader-routing outcomes: a shard
//! with no leader within `--leader-wait`, or a leader that kept moving, is
//! 503 with `Retry-After` (nothing was proposed: safe to retry); a write
//! whose exchange broke after it was sent is 504 (outcome unknown: never
//! retried, by the proxy or by a client that trusts it).

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use kv_http::{json_response, ApiError, Body};

use crate::upstream::X_KV_NODE;

/// Header naming the shard of a cluster-mode refusal, for whoever debugs it.
pub const X_KV_SHARD: &str = "x-kv-shard";

/// Why a request was not forwarded, or not answered by its node.
#[derive(Debug)]
pub enum ProxyError {
    /// What a node would answer itself (bad key, unknown admin path, 405).
    Api(ApiError),
    /// The owner is marked down by health checks: fail closed, don't remap.
    NodeDown { node: String },
    /// The owner refused the connection or did not accept it in time.
    Connect { node: String, why: String },
    /// The owner accepted but did not answer within `--request-timeout`.
    Timeout { node: String, after: Duration },
    /// The owner broke the exchange (reset or closed mid-answer).
    Upstream { node: String, why: String },
    /// Cluster mode: no leader of `shard` answered within `--leader-wait`;
    /// `waited` is the time since the request arrived (every try counted).
    NoLeader { shard: u32, waited: Duration },
    /// Cluster mode: the leader of `shard` moved more than `hops` times
    /// while the request followed it, until `--leader-wait` was over
    /// (`waited`: since the request arrived).
    LeaderMoving {
        shard: u32,
        hops: u32,
        waited: Duration,
    },
    /// Cluster mode: a write reached `node` and then the exchange broke, so
    /// whether it was applied is unknown (504, never retried).
    OutcomeUnknown { node: String, why: String },
    /// `GET /-/proxy/shards` in ring mode: there is no shard table.
    NotClustered,
}

/// The body of [`ProxyError::NotClustered`]'s 404.
const NOT_CLUSTERED: &str =
    "ring mode: the nodes are standalone (they answer GET /-/shards with 404), so there is no shard table";

impl From<ApiError> for ProxyError {
    fn from(error: ApiError) -> Self {
        ProxyError::Api(error)
    }
}

impl ProxyError {
    /// The API error this is to the client, and the node it concerns.
    pub fn into_api(self) -> (ApiError, Option<String>) {
        match self {
            ProxyError::NoLeader { shard, waited } => (
                ApiError::Unavailable(format!(
                    "shard {shard} has no leader (waited {})",
                    humantime::format_duration(whole_ms(waited))
                )),
                None,
            ),
            ProxyError::LeaderMoving {
                shard,
                hops,
                waited,
            } => (
                ApiError::Unavailable(format!(
                    "shard {shard} changed leader {hops} times during the request \
                     (waited {}); retry",
                    humantime::format_duration(whole_ms(waited))
                )),
                None,
            ),
            // Not kv-http's: its 504 says "did not answer within"; this
            // one answered nothing after the write went out.
            ProxyError::OutcomeUnknown { node, why } => (
                ApiError::NodeFailed {
                    node: node.clone(),
                    why,
                },
                Some(node),
            ),
            ProxyError::Api(error) => (error, None),
            ProxyError::NotClustered => (ApiError::UnknownAdminPath, None),
            ProxyError::NodeDown { node } | ProxyError::Connect { node, .. } => {
                (ApiError::NodeUnavailable { node: node.clone() }, Some(node))
            }
            ProxyError::Timeout { node, after } => (
                ApiError::NodeTimeout {
                    node: node.clone(),
                    after,
                },
                Some(node),
            ),
            ProxyError::Upstream { node, why } => (
                ApiError::NodeFailed {
                    node: node.clone(),
                    why,
                },
                Some(node),
            ),
        }
    }

    /// The full HTTP response for this error, with `X-Kv-Node` naming the
    /// node it concerns.
    pub fn into_response(self) -> Response<Body> {
        let shard = match &self {
            ProxyError::NoLeader { shard, .. } | ProxyError::LeaderMoving { shard, .. } => {
                Some(*shard)
            }
            _ => None,
        };
        if let ProxyError::NotClustered = &self {
            let mut bytes = serde_json::json!({ "error": NOT_CLUSTERED })
                .to_string()
                .into_bytes();
            bytes.push(b'\n');
            return json_response(StatusCode::NOT_FOUND, Bytes::from(bytes));
        }
        if let ProxyError::OutcomeUnknown { node, why } = &self {
            let message =
                format!("outcome unknown: node {node} failed after the request was sent: {why}");
            let mut bytes = serde_json::json!({ "error": message })
                .to_string()
                .into_bytes();
            bytes.push(b'\n');
            let mut response = json_response(StatusCode::GATEWAY_TIMEOUT, Bytes::from(bytes));
            if let Ok(value) = HeaderValue::from_str(node) {
                response.headers_mut().insert(X_KV_NODE, value);
            }
            return response;
        }
        let (error, node) = self.into_api();
        let mut response = error.into_response();
        if let Some(value) = node.and_then(|n| HeaderValue::from_str(&n).ok()) {
            response.headers_mut().insert(X_KV_NODE, value);
        }
        if let Some(shard) = shard {
            response
                .headers_mut()
                .insert(X_KV_SHARD, HeaderValue::from(shard));
            debug_assert!(response.headers().contains_key(RETRY_AFTER));
        }
        response
    }
}

/// A wait as it was, to the millisecond ("2s 953ms"): not rounded to a
/// figure that looks like the bound, which once hid waits of 5 s behind
/// "waited 3s".
fn whole_ms(waited: Duration) -> Duration {
    Duration::from_millis(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::RETRY_AFTER;
    use hyper::StatusCode;

    #[test]
    fn node_down_is_503_with_retry_after() {
        let response = ProxyError::NodeDown {
            node: "127.0.0.1:8082".into(),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(response.headers()[X_KV_NODE], "127.0.0.1:8082");
    }

    #[test]
    fn timeouts_are_504_upstream_502_and_api_errors_keep_their_status() {
        let timeout = ProxyError::Timeout {
            node: "n".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(
            timeout.into_response().status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        let upstream = ProxyError::Upstream {
            node: "n".into(),
            why: "reset".into(),
        };
        assert_eq!(upstream.into_response().status(), StatusCode::BAD_GATEWAY);
        let api = ProxyError::from(ApiError::UnknownAdminPath);
        assert_eq!(api.into_response().status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn cluster_refusals_are_503_with_retry_after_and_unknown_is_504() {
        let (api, _) = ProxyError::NoLeader {
            shard: 17,
            waited: Duration::from_micros(2_953_700),
        }
        .into_api();
        assert_eq!(
            api.message(),
            "Service unavailable: shard 17 has no leader (waited 2s 953ms)"
        );
        let response = ProxyError::NoLeader {
            shard: 17,
            waited: Duration::from_micros(3_000_400),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(response.headers()[X_KV_SHARD], "17");
        let moving = || ProxyError::LeaderMoving {
            shard: 2,
            hops: 3,
            waited: Duration::from_millis(2_950),
        };
        assert_eq!(
            moving().into_api().0.message(),
            "Service unavailable: shard 2 changed leader 3 times during the request \
             (waited 2s 950ms); retry"
        );
        let moving = moving().into_response();
        assert_eq!(moving.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(moving.headers()[RETRY_AFTER], "1");
        let unknown = ProxyError::OutcomeUnknown {
            node: "127.0.0.1:1".into(),
            why: "reset".into(),
        }
        .into_response();
        assert_eq!(unknown.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(unknown.headers()[X_KV_NODE], "127.0.0.1:1");
    }
}
