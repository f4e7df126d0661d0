//! Every way the proxy can fail a request. The status and body of each are
//! kv-http's one map ([`ApiError`], shared with kv-node), so a proxy 502 or
//! 504 is counted by name and a client cannot tell the proxy's refusal of a
//! bad key from a node's.
//!
//! The variants stay apart here (down, connect, timeout, upstream) for the
//! per-node counters in `/-/metrics`; to the client, "down" and "connect"
//! are one answer: the node is unavailable.

use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::Response;
use kv_http::{ApiError, Body};

use crate::upstream::X_KV_NODE;

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
}

impl From<ApiError> for ProxyError {
    fn from(error: ApiError) -> Self {
        ProxyError::Api(error)
    }
}

impl ProxyError {
    /// The API error this is to the client, and the node it concerns.
    pub fn into_api(self) -> (ApiError, Option<String>) {
        match self {
            ProxyError::Api(error) => (error, None),
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
        let (error, node) = self.into_api();
        let mut response = error.into_response();
        if let Some(value) = node.and_then(|n| HeaderValue::from_str(&n).ok()) {
            response.headers_mut().insert(X_KV_NODE, value);
        }
        response
    }
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
}
