//! kv-node's failures. Every one is a [`kv_http::ApiError`], whose status
//! and JSON body are chosen in kv-http's one map (shared with kv-proxy, so
//! a client cannot tell which refused it); this module says which API error
//! each storage failure becomes.

use hyper::Response;
use kv_http::Body;

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

impl From<kv_store::StoreError> for NodeError {
    fn from(error: kv_store::StoreError) -> Self {
        NodeError(match error {
            kv_store::StoreError::Unavailable(why) => ApiError::Unavailable(why),
            // `key::parse` caps keys far below the store's limit; kept total anyway.
            kv_store::StoreError::KeyTooLong(_) => {
                ApiError::InvalidKey("the key is longer than the store accepts")
            }
        })
    }
}

impl NodeError {
    /// The full HTTP response for this error.
    pub fn into_response(self) -> Response<Body> {
        self.0.into_response()
    }
}
