//! Every way a request can fail, and the one place that maps each to an HTTP
//! status and a JSON `{"error": "..."}` body.

use bytes::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use kv_store::StoreError;

use crate::api::{json_response, Body};

/// Why a request was not served.
#[derive(Debug)]
pub enum ApiError {
    /// The key is not in the store (the Flask store's wording).
    KeyNotFound,
    /// The path is not a valid key.
    InvalidKey(&'static str),
    /// The body is not JSON.
    MalformedJson(String),
    /// The body is JSON but has no `value` field, or is not an object.
    MissingValue,
    /// The body is larger than `--max-value-bytes`.
    BodyTooLarge { limit: usize },
    /// The client stopped sending its body.
    BodyTimeout,
    /// The body could not be read (the client went away mid-body).
    BodyRead(String),
    /// The method is not served on this path.
    MethodNotAllowed { allow: &'static str },
    /// An admin path (`/-/...`) that does not exist.
    UnknownAdminPath,
    /// The store refused the operation (a disk error, closing, too large).
    Store(kv_store::StoreError),
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::KeyNotFound | ApiError::UnknownAdminPath => StatusCode::NOT_FOUND,
            ApiError::InvalidKey(_)
            | ApiError::MalformedJson(_)
            | ApiError::MissingValue
            | ApiError::BodyRead(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Store(error) => match error {
                StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                // `key::parse` caps keys far below the store's limit; kept total anyway.
                StoreError::KeyTooLong(_) => StatusCode::BAD_REQUEST,
                StoreError::DiskFailed { .. } | StoreError::Closed | StoreError::Snapshot(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            },
        }
    }

    /// The human-readable message that goes in `{"error": ...}`.
    pub fn message(&self) -> String {
        match self {
            ApiError::KeyNotFound => "Key not found".to_owned(),
            ApiError::InvalidKey(why) => format!("Invalid key: {why}"),
            ApiError::MalformedJson(why) => format!("Malformed JSON body: {why}"),
            ApiError::MissingValue => {
                "Request body must be a JSON object with a 'value' field".to_owned()
            }
            ApiError::BodyTooLarge { limit } => {
                format!("Request body too large: the limit is {limit} bytes")
            }
            ApiError::BodyTimeout => "Timed out waiting for the request body".to_owned(),
            ApiError::BodyRead(why) => format!("Could not read the request body: {why}"),
            ApiError::MethodNotAllowed { allow } => {
                format!("Method not allowed; this path accepts {allow}")
            }
            ApiError::UnknownAdminPath => "Unknown admin path".to_owned(),
            ApiError::Store(error @ StoreError::TooLarge { .. }) => {
                format!("Request body too large: {error}")
            }
            ApiError::Store(error @ StoreError::KeyTooLong(_)) => format!("Invalid key: {error}"),
            ApiError::Store(error) => format!("Service unavailable: {error}"),
        }
    }

    /// The full HTTP response for this error.
    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": self.message() });
        let mut bytes = body.to_string().into_bytes();
        bytes.push(b'\n');
        let mut response = json_response(self.status(), Bytes::from(bytes));
        match self {
            ApiError::MethodNotAllowed { allow } => {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            // The rest of the body may still be on its way (or never come):
            // close rather than read it to find the next request.
            ApiError::BodyTooLarge { .. } | ApiError::BodyTimeout | ApiError::BodyRead(_) => {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        debug_assert!(response.headers().contains_key(CONTENT_TYPE));
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::Store(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                "Request body too large: value of 10 bytes",
            ),
            (
                StoreError::KeyTooLong(70_000),
                400,
                "Invalid key: key of 70000 bytes",
            ),
        ];
        for (error, status, message) in cases {
            let error = ApiError::from(error);
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert!(error.message().starts_with(message), "{}", error.message());
            let response = error.into_response();
            assert_eq!(response.headers().contains_key(RETRY_AFTER), status == 503);
        }
    }
}
