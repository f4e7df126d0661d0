//! Every way a request can fail, and the one place that maps each to an HTTP
//! status and a JSON `{"error": "..."}\n` body, for kv-node and kv-proxy
//! alike (a client cannot tell which one refused it).
//!
//! The messages are the `Display` text ([`thiserror`]); the node's wording
//! for the errors the Flask store had ("Key not found") is kept exactly.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

/// The response body type of every answer made here.
pub type Body = Full<Bytes>;

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The key is not in the store (the Flask store's wording).
    #[error("Key not found")]
    KeyNotFound,
    /// The path is not a valid key.
    #[error("Invalid key: {0}")]
    InvalidKey(&'static str),
    /// The body is not JSON.
    #[error("Malformed JSON body: {0}")]
    MalformedJson(String),
    /// The body is JSON but has no `value` field, or is not an object.
    #[error("Request body must be a JSON object with a 'value' field")]
    MissingValue,
    /// The body is larger than the limit.
    #[error("Request body too large: the limit is {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The client stopped sending its body.
    #[error("Timed out waiting for the request body")]
    BodyTimeout,
    /// The body could not be read (the client went away mid-body).
    #[error("Could not read the request body: {0}")]
    BodyRead(String),
    /// The method is not served on this path.
    #[error("Method not allowed; this path accepts {allow}")]
    MethodNotAllowed { allow: &'static str },
    /// An admin path (`/-/...`) that does not exist.
    #[error("Unknown admin path")]
    UnknownAdminPath,
    /// The request head breaks HTTP/1.1 (no `Host`, two of them, a line
    /// hyper cannot parse).
    #[error("Bad request: {0}")]
    BadRequest(&'static str),
    /// An `Expect` other than `100-continue` (RFC 9110 §10.1.1).
    #[error("Expectation failed: only 'Expect: 100-continue' is supported")]
    ExpectationFailed,
    /// A transfer coding other than `chunked` (RFC 9112 §6.1): the body
    /// cannot be decoded, and read as if plain it would be stored wrong.
    #[error("Not implemented: only the 'chunked' transfer coding is supported")]
    TransferCodingNotImplemented,
    /// No valid `Authorization: Bearer <token>` (see [`crate::auth`]).
    #[error("Unauthorized: {0}")]
    Unauthorized(&'static str),
    /// Plain HTTP on a port that speaks TLS (see [`crate::tls`]): answered
    /// in plain text, then the connection is closed.
    #[error("Bad request: this port speaks TLS; use https://")]
    TlsRequired,
    /// A node-to-node path asked for on a port with mutual TLS, without a
    /// client certificate signed by the cluster's CA (see [`crate::tls`]).
    #[error("Forbidden: {0}")]
    ClientCertRequired(&'static str),
    /// The request target is longer than hyper parses.
    #[error("URI too long")]
    UriTooLong,
    /// The request head is larger than hyper buffers.
    #[error("Request header fields too large")]
    HeadersTooLarge,
    /// Over `--max-connections` (a reserve connection asking for more than a
    /// health or readiness probe).
    #[error("Too many connections")]
    TooManyConnections,
    /// The node cannot take writes right now (for example a disk error).
    #[error("Service unavailable: {0}")]
    Unavailable(String),
    /// The proxy: the key's node is down or refused the connection.
    #[error("node {node} unavailable")]
    NodeUnavailable { node: String },
    /// The proxy: the key's node did not answer in time.
    #[error("node {node} did not answer within {after:?}")]
    NodeTimeout { node: String, after: Duration },
    /// The proxy: the key's node broke the exchange.
    #[error("node {node} failed: {why}")]
    NodeFailed { node: String, why: String },
    /// A state the code rules out was reached (a bug, not bad input): the
    /// request is refused rather than the process stopped.
    #[error("Internal error: {0}")]
    Internal(&'static str),
}

impl ApiError {
    /// The HTTP status for this error: the one map.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::KeyNotFound | ApiError::UnknownAdminPath => StatusCode::NOT_FOUND,
            ApiError::InvalidKey(_)
            | ApiError::MalformedJson(_)
            | ApiError::MissingValue
            | ApiError::BodyRead(_)
            | ApiError::BadRequest(_)
            | ApiError::TlsRequired => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ClientCertRequired(_) => StatusCode::FORBIDDEN,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::ExpectationFailed => StatusCode::EXPECTATION_FAILED,
            ApiError::TransferCodingNotImplemented => StatusCode::NOT_IMPLEMENTED,
            ApiError::UriTooLong => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::TooManyConnections
            | ApiError::Unavailable(_)
            | ApiError::NodeUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NodeTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::NodeFailed { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The human-readable message that goes in `{"error": ...}`.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// `{"error":"<message>"}\n`
    pub fn body(&self) -> Bytes {
        let mut bytes = serde_json::json!({ "error": self.message() })
            .to_string()
            .into_bytes();
        bytes.push(b'\n');
        Bytes::from(bytes)
    }

    /// Whether the connection must close after this answer: the rest of the
    /// body may still be on its way (or never come), or the head itself was
    /// broken, so the next request cannot be found.
    pub fn closes(&self) -> bool {
        matches!(
            self,
            ApiError::BodyTooLarge { .. }
                | ApiError::BodyTimeout
                | ApiError::BodyRead(_)
                | ApiError::BadRequest(_)
                | ApiError::TlsRequired
                | ApiError::TransferCodingNotImplemented
                | ApiError::UriTooLong
                | ApiError::HeadersTooLarge
                | ApiError::TooManyConnections
        )
    }

    /// The full HTTP response for this error.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json_response(self.status(), self.body());
        let headers = response.headers_mut();
        if let ApiError::MethodNotAllowed { allow } = self {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        if let ApiError::Unauthorized(_) = self {
            // RFC 9110 §11.6.1: a 401 names the scheme that would pass.
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"kv\""),
            );
        }
        if self.closes() {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            // Health checks and disk retries run every second or so.
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        debug_assert!(response.headers().contains_key(CONTENT_TYPE));
        response
    }

    /// The whole answer as bytes on the wire, for the places that write
    /// without hyper (the connection cap, [`crate::canned`]).
    pub fn to_wire(&self) -> Vec<u8> {
        let status = self.status();
        let body = self.body();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            out.push_str("retry-after: 1\r\n");
        }
        out.push_str(&format!(
            "connection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        ));
        let mut out = out.into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn proxy_errors_have_gateway_statuses() {
        let timeout = ApiError::NodeTimeout {
            node: "n".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        let failed = ApiError::NodeFailed {
            node: "n".into(),
            why: "reset".into(),
        };
        assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
        let down = ApiError::NodeUnavailable { node: "n".into() }.into_response();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn wire_answers_are_complete_json() {
        for error in [
            ApiError::TooManyConnections,
            ApiError::UriTooLong,
            ApiError::HeadersTooLarge,
            ApiError::BadRequest("x"),
            ApiError::TlsRequired,
        ] {
            let wire = error.to_wire();
            let text = std::str::from_utf8(&wire).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {} ", error.status().as_u16())));
            assert!(head.contains(&format!("content-length: {}", body.len())));
            assert!(head.contains("content-type: application/json"));
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["error"], error.message());
        }
    }
}
