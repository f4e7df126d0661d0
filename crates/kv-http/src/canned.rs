//! hyper's own answers, in the JSON contract.
//!
//! When hyper cannot parse a request head it answers by itself, before any
//! service runs: 400 (a broken line, two differing `Content-Length`s), 414
//! (a request target over its limit), 431 (a head over its buffer), with an
//! empty body and no `Content-Type`. hyper offers no hook for those, so
//! [`JsonErrors`] wraps the connection's socket and recognises them on the
//! way out: a response head with a 4xx/5xx status and no `content-type`
//! header (every answer the services make has one) is replaced, whole, by
//! the same status in the JSON contract ([`ApiError::to_wire`]). hyper
//! closes the connection after such an answer, and so does ours.
//!
//! On the hot path this costs one comparison of the status line's first
//! digit per write; only error heads are searched for `content-type`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;

/// A socket whose writes are watched for hyper's bodiless error answers.
#[derive(Debug)]
pub struct JsonErrors<T> {
    inner: T,
    /// A replacement being written: the bytes, how many are out, and how
    /// many of hyper's bytes it stands for (reported once it is all out).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> JsonErrors<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

/// The JSON answer standing in for `head`, if `head` is one of hyper's
/// canned error answers.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    // "HTTP/1.1 4xx ..." or "HTTP/1.1 5xx ...": one byte decides on the
    // hot path, where answers are 200.
    if !matches!(head.get(9), Some(b'4' | b'5')) || !head.starts_with(b"HTTP/1.") {
        return None;
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = head.get(..end)?;
    if head.split(|&b| b == b'\n').any(|line| {
        line.get(..13)
            .is_some_and(|name| name.eq_ignore_ascii_case(b"content-type:"))
    }) {
        return None;
    }
    let code = std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()?;
    let error = match StatusCode::from_u16(code).ok()? {
        StatusCode::URI_TOO_LONG => ApiError::UriTooLong,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadersTooLarge,
        StatusCode::BAD_REQUEST => {
            ApiError::BadRequest("the request could not be parsed as HTTP/1.1")
        }
        other => {
            log::debug!("an answer {other} without content-type passed through");
            return None;
        }
    };
    Some(error.to_wire())
}

impl<T: AsyncWrite + Unpin> JsonErrors<T> {
    /// Writes the pending replacement; ready with the count of hyper's bytes
    /// it stands for once all of it is out.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, written, _)) = &mut self.pending {
            if *written == bytes.len() {
                break;
            }
            // `written` stays at most `bytes.len()` (the loop stops there), so
            // the slice is never the empty default.
            let rest = bytes.get(*written..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let stands_for = self.pending.take().map_or(0, |(_, _, len)| len);
        Poll::Ready(Ok(stands_for))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_none() {
            match replacement(buf) {
                Some(bytes) => self.pending = Some((bytes, 0, buf.len())),
                None => return Pin::new(&mut self.inner).poll_write(cx, buf),
            }
        }
        self.poll_pending(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_none() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            match replacement(first) {
                // hyper's canned answers are a head alone: that buffer is
                // all it is writing.
                Some(bytes) => self.pending = Some((bytes, 0, first.len())),
                None => return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            }
        }
        self.poll_pending(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrors<T> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodiless_error_heads_are_replaced() {
        let canned = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let json = replacement(canned).unwrap();
        assert!(json.starts_with(b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json"));
        assert!(replacement(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n").is_some());
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\n\r\n").is_some());
        // Ours, with a content-type, whatever the case.
        assert!(
            replacement(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n{}")
                .is_none()
        );
        assert!(replacement(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        assert!(replacement(b"HTTP/1.1 100 Continue\r\n\r\n").is_none());
        // Not a head (a body, or half a head).
        assert!(replacement(b"{\"value\":\"HTTP/1.1 400\"}").is_none());
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\n").is_none());
    }

    #[tokio::test]
    async fn a_replacement_is_written_whole_and_stands_for_the_original() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(8);
        let mut wrapped = JsonErrors::new(server);
        let canned = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            out
        });
        let n = wrapped.write(canned).await.unwrap();
        assert_eq!(n, canned.len());
        wrapped.shutdown().await.unwrap();
        drop(wrapped);
        let out = reader.await.unwrap();
        assert_eq!(out, ApiError::HeadersTooLarge.to_wire());
    }
}
