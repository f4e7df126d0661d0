//! kv-node's failures. Every one is a [`kv_http::ApiError`], whose status
//! and JSON body are chosen in kv-http's one map (shared with kv-proxy, so
//! a client cannot tell which refused it); this module says which API error
//! each storage failure becomes.

use hyper::Response;
use kv_http::Body;
use kv_store::StoreError;

pub use kv_http::ApiError;

/// A request's failure in kv-node: an [`ApiError`], which the store's
/// errors convert into (so handlers can `?` a store call).
#[derive(Debug)]
pub struct NodeError(pub ApiError);

impl From<ApiError> for NodeError {
    fn from(error: ApiError) -> Self {
        NodeError(error)
    }
}

impl From<StoreError> for NodeError {
    fn from(error: StoreError) -> Self {
        NodeError(match error {
            // A value the log cannot frame: refused before anything was
            // acknowledged, as an oversized body is.
            StoreError::TooLarge { max, .. } => ApiError::BodyTooLarge { limit: max },
            // `key::parse` caps keys far below the store's limit; kept total anyway.
            StoreError::KeyTooLong(_) => {
                ApiError::InvalidKey("the key is longer than the store accepts")
            }
            error @ (StoreError::DiskFailed { .. }
            | StoreError::Closed
            | StoreError::Snapshot(_)) => ApiError::Unavailable(error.to_string()),
        })
    }
}

impl NodeError {
    /// The full HTTP response for this error.
    pub fn into_response(self) -> Response<Body> {
        self.0.into_response()
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
            let NodeError(error) = NodeError::from(error);
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert!(error.message().starts_with(message), "{}", error.message());
            let response = error.into_response();
            assert_eq!(response.headers().contains_key(RETRY_AFTER), status == 503);
        }
    }
}
