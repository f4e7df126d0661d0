//! What RFC 9110/9112 require a server to check in every request head, and
//! how a refused body is discarded.
//!
//! hyper already refuses what its parser can see (two differing
//! `Content-Length`s, a `Transfer-Encoding` that is not chunked, a broken
//! line: see [`crate::canned`] for how those answers keep the JSON
//! contract), and it honours `Connection: close`. With both
//! `Content-Length` and `Transfer-Encoding`, hyper reads the body by
//! `Transfer-Encoding` alone and closes the connection after answering,
//! which RFC 9112 §6.1 allows. What is left for the service is here.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING,
};
use hyper::{Response, Version};

use crate::error::ApiError;

/// Checks every request head, before routing:
/// * HTTP/1.1 without exactly one `Host` → 400 (RFC 9112 §3.2);
/// * an `Expect` other than `100-continue` → 417 (RFC 9110 §10.1.1);
/// * a transfer coding other than `chunked` → 501 (RFC 9112 §6.1): hyper
///   decodes only the chunking and would hand on the coded bytes as if
///   they were the body.
#[inline]
pub fn check_head(version: Version, headers: &HeaderMap) -> Result<(), ApiError> {
    if version == Version::HTTP_11 {
        let mut hosts = headers.get_all(HOST).iter();
        if hosts.next().is_none() {
            return Err(ApiError::BadRequest(
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        if hosts.next().is_some() {
            return Err(ApiError::BadRequest("more than one Host header"));
        }
    }
    if let Some(expect) = headers.get(EXPECT) {
        if !expect.as_bytes().eq_ignore_ascii_case(b"100-continue") {
            return Err(ApiError::ExpectationFailed);
        }
    }
    for value in headers.get_all(TRANSFER_ENCODING) {
        let only_chunked = value.to_str().is_ok_and(|codings| {
            codings
                .split(',')
                .all(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
        });
        if !only_chunked {
            return Err(ApiError::TransferCodingNotImplemented);
        }
    }
    Ok(())
}

/// Whether the client waits for `100 Continue` before sending its body.
/// hyper sends that the first time the body is read, so a request refused
/// from its head alone must not be read at all.
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The declared `Content-Length`, if there is one and it parses.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// How much of a refused body is read and thrown away before answering.
const DRAIN_MAX_BYTES: usize = 16 << 20;
/// How long that may take.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(2);

/// Reads and discards the rest of a refused body (up to a bound), so the
/// answer reaches the client: closing a socket with unread bytes makes the
/// kernel send a reset, which destroys a response the client has not read
/// yet (nginx calls this lingering close). Past the bound we answer anyway.
///
/// A client that sent `Expect: 100-continue` has sent no body yet: reading
/// would invite it (hyper answers `100 Continue` on the first read), so it
/// is left unread and the answer closes the connection instead.
pub async fn discard_body(headers: &HeaderMap, body: &mut Incoming) {
    if !expects_continue(headers) {
        discard(body).await;
    }
}

/// Marks `response` as the last on its connection (`Connection: close`).
/// For an answer given before the request's body was read: hyper closes
/// such a connection after the answer, and a keep-alive client that was
/// not told would send its next request into a closed socket.
pub fn close_after<B>(response: &mut Response<B>) {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
}

/// Reads and discards the rest of a body already being read, up to a bound
/// (see [`discard_body`]).
pub async fn discard(body: &mut Incoming) {
    let discard = async {
        let mut left = DRAIN_MAX_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let len = frame.data_ref().map_or(0, Bytes::len);
            if len > left {
                return;
            }
            left -= len;
        }
    };
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, discard).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn host_is_required_once_in_http_11() {
        let mut headers = HeaderMap::new();
        assert!(check_head(Version::HTTP_11, &headers).is_err());
        assert!(check_head(Version::HTTP_10, &headers).is_ok());
        headers.insert(HOST, HeaderValue::from_static("a"));
        assert!(check_head(Version::HTTP_11, &headers).is_ok());
        headers.append(HOST, HeaderValue::from_static("b"));
        assert!(check_head(Version::HTTP_11, &headers).is_err());
    }

    #[test]
    fn only_100_continue_is_expected() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("a"));
        headers.insert(EXPECT, HeaderValue::from_static("100-Continue"));
        assert!(check_head(Version::HTTP_11, &headers).is_ok());
        assert!(expects_continue(&headers));
        headers.insert(EXPECT, HeaderValue::from_static("200-ok"));
        assert!(matches!(
            check_head(Version::HTTP_11, &headers),
            Err(ApiError::ExpectationFailed)
        ));
    }
}
