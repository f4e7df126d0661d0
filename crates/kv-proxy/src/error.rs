//! Every way the proxy can fail a request, and the one place that maps each
//! to an HTTP status and a `{"error": "..."}\n` body (kv-node's shape).
//!
//! Errors kv-node itself would give for the same request (a bad key, an
//! unknown admin path) are kv-node's own [`ApiError`], answered exactly as a
//! node would, so a client cannot tell the proxy from a node.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use kv_node::error::ApiError;

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
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Api(error) => error.status(),
            ProxyError::NodeDown { .. } | ProxyError::Connect { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The message that goes in `{"error": ...}`.
    pub fn message(&self) -> String {
        match self {
            ProxyError::Api(error) => error.message(),
            // One wording for both: to the client the node is unavailable,
            // whether health checks or this very request found it so.
            ProxyError::NodeDown { node } | ProxyError::Connect { node, .. } => {
                format!("node {node} unavailable")
            }
            ProxyError::Timeout { node, after } => {
                format!("node {node} did not answer within {after:?}")
            }
            ProxyError::Upstream { node, why } => format!("node {node} failed: {why}"),
        }
    }

    /// The node the error concerns, if any (sent as `X-Kv-Node`).
    fn node(&self) -> Option<&str> {
        match self {
            ProxyError::Api(_) => None,
            ProxyError::NodeDown { node }
            | ProxyError::Connect { node, .. }
            | ProxyError::Timeout { node, .. }
            | ProxyError::Upstream { node, .. } => Some(node),
        }
    }

    /// The full HTTP response for this error.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        if let ProxyError::Api(error) = self {
            return error.into_response();
        }
        let body = serde_json::json!({ "error": self.message() });
        let mut bytes = body.to_string().into_bytes();
        bytes.push(b'\n');
        let mut response = kv_node::api::json_response(self.status(), Bytes::from(bytes));
        let headers = response.headers_mut();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            // Health checks run every second or so: try again soon.
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(value) = self.node().and_then(|n| HeaderValue::from_str(n).ok()) {
            headers.insert(X_KV_NODE, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn timeouts_are_504_and_api_errors_keep_their_status() {
        let timeout = ProxyError::Timeout {
            node: "n".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        let api = ProxyError::from(ApiError::UnknownAdminPath);
        assert_eq!(api.status(), StatusCode::NOT_FOUND);
    }
}
