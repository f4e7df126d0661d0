//! The accept loop: connection limits, per-connection timeouts and graceful
//! shutdown around hyper's HTTP/1.1 connection driver.
//!
//! * A semaphore caps concurrent connections. A connection over the cap is
//!   answered with a canned 503 and closed at once, so a flood is refused
//!   fast instead of queueing without bound.
//! * hyper's header-read timeout closes clients that dribble their headers,
//!   and because it starts whenever hyper waits for a request head, it also
//!   closes keep-alive connections left idle. The body timeout lives in the
//!   API layer, where the body is read.
//! * On shutdown the listener is dropped (no new connections), every
//!   connection is told to finish its in-flight request and close, and the
//!   wait for them is bounded by `--shutdown-timeout`.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{self, App};

/// Limits applied to every connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
}

const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 33\r\n\r\n\
{\"error\":\"Too many connections\"}\n";

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let builder = limits.http1();
    tokio::pin!(shutdown);

    loop {
        let (stream, permit) = tokio::select! {
            next = next_connection(&listener, &permits) => next,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = service_fn(move |request| api::handle(app.clone(), request));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                log::debug!("connection ended with an error: {error}");
            }
            drop(permit);
        });
    }

    drop(listener);
    log::info!("shutting down: no new connections, finishing in-flight requests");
    drain(graceful, limits.shutdown_timeout).await;
    Ok(())
}

impl ConnectionLimits {
    /// hyper's HTTP/1.1 connection settings for these limits (header-read
    /// timeout, which also closes idle keep-alive connections). Shared by
    /// kv-node and kv-proxy so both treat clients alike.
    pub fn http1(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .keep_alive(true);
        builder
    }
}

/// Lets the watched connections finish their in-flight requests and close,
/// for at most `timeout`.
pub async fn drain(graceful: GracefulShutdown, timeout: Duration) {
    tokio::select! {
        () = graceful.shutdown() => log::info!("all connections closed"),
        () = tokio::time::sleep(timeout) => {
            log::warn!("shutdown timeout ({timeout:?}) passed with connections still open");
        }
    }
}

/// The next connection to serve, with its slot under the cap. Connections
/// over the cap are answered 503 and closed here; accept errors are logged
/// and paused on. Cancel-safe (for `select!` against a shutdown signal).
/// Shared with kv-proxy's accept loop.
pub async fn next_connection(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> (TcpStream, OwnedSemaphorePermit) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    // Small request/response pairs: send each answer at once.
                    let _ = stream.set_nodelay(true);
                    return (stream, permit);
                }
                Err(_) => {
                    tokio::spawn(refuse(stream));
                }
            },
            Err(error) => accept_error_pause(&error).await,
        }
    }
}

/// Answers a connection over the cap with a 503 and closes it.
///
/// The request is drained (briefly) before the socket is dropped: closing a
/// socket with unread bytes makes the kernel send a reset, which can destroy
/// the 503 before the client reads it.
async fn refuse(mut stream: TcpStream) {
    log::warn!("connection refused: too many connections");
    let answer = async {
        stream.write_all(TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// Accept fails when the process is out of file descriptors (EMFILE) or the
/// peer reset before we got to it. Back off briefly so an fd shortage does
/// not spin the loop; the connections in flight will free descriptors.
async fn accept_error_pause(error: &io::Error) {
    log::warn!("accept failed: {error}");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_503_has_the_right_length() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
