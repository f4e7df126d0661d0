//! Forwarding a client's request to the leader of its shard, and asking
//! peers for their `cluster.json` at first start (design §6.4, §8).
//!
//! A small HTTP/1.1 client with a keep-alive pool per peer address **per
//! thread**: kv-http's workers each run their own single-threaded runtime,
//! so a worker's forwards use connections driven by that same runtime and
//! never hop threads (measured: a pool on the main runtime cost one
//! cross-thread hop each way per forward).
//!
//! What the caller learns matters more than the bytes: [`Forwarded::Sent`]
//! carries the leader's whole answer, [`ForwardError::NotSent`] means the
//! request never left (safe to retry or refuse), [`ForwardError::Lost`]
//! means it was written and no answer came (a write's outcome is unknown),
//! [`ForwardError::OtherCluster`] means the peer refused us as another
//! cluster's (409, design §8; nothing done). Each key request's verdict
//! (refused or accepted) goes to the node's [`Refusals`], shared with the
//! raft transport.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use kv_cluster::{CLUSTER_ID_HEADER, NODE_ID_HEADER};
use kv_http::tls::Tls;
use kv_raft::net::refusals::other_cluster_id;
use kv_raft::Refusals;

/// Largest answer relayed (a GET of the largest value, with room).
const MAX_ANSWER: usize = 256 << 20;
/// Idle connections kept per peer.
const MAX_IDLE: usize = 16;

/// A leader's answer, whole.
#[derive(Debug)]
pub(crate) struct Forwarded {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    /// The request was never written: nothing was proposed.
    #[error("{0}")]
    NotSent(String),
    /// The request was written; no (whole) answer came.
    #[error("{0}")]
    Lost(String),
    /// The peer answered 409: it belongs to cluster `theirs`, not ours.
    /// Nothing was done there.
    #[error("{addr} belongs to cluster {theirs}, not to this node's")]
    OtherCluster { addr: String, theirs: String },
}

/// Idle keep-alive connections by peer address.
type Idle = HashMap<String, Vec<SendRequest<Full<Bytes>>>>;

thread_local! {
    /// This thread's idle connections (driven by this thread's runtime).
    static IDLE: RefCell<Idle> = RefCell::new(HashMap::new());
}

/// The client (its pools are per thread), and who it sends as: every
/// request carries `X-Kv-Node-Id` and, once known, `X-Kv-Cluster-Id`
/// (design §8), so a node of another cluster refuses it.
pub(crate) struct Forwarder {
    node: HeaderValue,
    cluster: OnceLock<HeaderValue>,
    /// `Bearer <cluster token>` (issue 14), when the node has one.
    authorization: Option<HeaderValue>,
    refusals: Arc<Refusals>,
    /// Peers that refused our token (401), each logged once.
    unauthorized: std::sync::Mutex<std::collections::HashSet<String>>,
    /// TLS to peers (`--tls-ca`), with this node's client certificate.
    tls: Option<Arc<Tls>>,
}

impl Forwarder {
    pub(crate) fn new(
        node: u64,
        refusals: Arc<Refusals>,
        authorization: Option<HeaderValue>,
        tls: Option<Arc<Tls>>,
    ) -> Self {
        Self {
            node: HeaderValue::from(node),
            cluster: OnceLock::new(),
            authorization,
            refusals,
            unauthorized: Default::default(),
            tls,
        }
    }

    /// Marks requests from now on with the cluster id (once; it never
    /// changes).
    pub(crate) fn set_cluster_id(&self, id: &str) {
        if let Ok(value) = HeaderValue::from_str(id) {
            let _ = self.cluster.set(value);
        }
    }

    /// Sends one request to `addr` and reads its whole answer, within
    /// `timeout`.
    pub(crate) async fn send(
        &self,
        addr: &str,
        mut request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Forwarded, ForwardError> {
        let headers = request.headers_mut();
        headers.insert(NODE_ID_HEADER, self.node.clone());
        if let Some(authorization) = &self.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        let marked = match self.cluster.get() {
            Some(cluster) => {
                headers.insert(CLUSTER_ID_HEADER, cluster.clone());
                true
            }
            None => false,
        };
        // Only a key request is checked against our id by the peer (its
        // `/-/` admin answers say nothing about us).
        let checked = marked && !request.uri().path().starts_with("/-/");
        let answer =
            match tokio::time::timeout(timeout, exchange(addr, request, self.tls.as_deref())).await
            {
                Ok(result) => result?,
                Err(_) => {
                    return Err(ForwardError::Lost(format!(
                        "{addr} did not answer within {timeout:?}"
                    )))
                }
            };
        if answer.status == StatusCode::UNAUTHORIZED {
            // Our cluster token is not the peer's: nothing was done there
            // (the check comes first), and the client is not to blame.
            let first = self
                .unauthorized
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(addr.to_owned());
            if first {
                log::warn!(
                    "peer {addr} refused this node's cluster token (401): every member must be \
                     started with the same --auth-token-file / KV_AUTH_TOKEN (logged once per peer)"
                );
            }
            return Err(ForwardError::NotSent(format!(
                "{addr} refused this node's cluster token"
            )));
        }
        if !checked {
            return Ok(answer);
        }
        match answer.status {
            StatusCode::CONFLICT => {
                if let Some(theirs) = other_cluster_id(&answer.body) {
                    self.refusals.refused(addr, &theirs);
                    return Err(ForwardError::OtherCluster {
                        addr: addr.to_owned(),
                        theirs,
                    });
                }
            }
            // Refused before the id check (overload), or no verdict.
            StatusCode::SERVICE_UNAVAILABLE => {}
            _ => self.refusals.accepted(addr),
        }
        Ok(answer)
    }
}

fn take_idle(addr: &str) -> Option<SendRequest<Full<Bytes>>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(addr)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    })
}

fn put_idle(addr: &str, sender: SendRequest<Full<Bytes>>) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(addr.to_owned()).or_default();
        if list.len() < MAX_IDLE && !sender.is_closed() {
            list.push(sender);
        }
    });
}

async fn connect(addr: &str, tls: Option<&Tls>) -> Result<SendRequest<Full<Bytes>>, ForwardError> {
    let stream = Tls::connect(tls, addr)
        .await
        .map_err(|error| ForwardError::NotSent(format!("cannot connect to {addr}: {error}")))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| ForwardError::NotSent(format!("cannot talk HTTP to {addr}: {error}")))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            log::debug!("forwarding connection closed: {error}");
        }
    });
    Ok(sender)
}

async fn exchange(
    addr: &str,
    mut request: Request<Full<Bytes>>,
    tls: Option<&Tls>,
) -> Result<Forwarded, ForwardError> {
    if let Ok(host) = HeaderValue::from_str(addr) {
        request.headers_mut().insert(HOST, host);
    }
    let head_only = request.method() == Method::HEAD;
    // A pooled connection may have been closed by the peer since: if
    // sending on it fails before anything was written, retry on a fresh one.
    let mut sender = match take_idle(addr) {
        Some(sender) => sender,
        None => connect(addr, tls).await?,
    };
    if sender.ready().await.is_err() {
        sender = connect(addr, tls).await?;
        sender
            .ready()
            .await
            .map_err(|error| ForwardError::NotSent(format!("{addr}: {error}")))?;
    }
    let response = sender.send_request(request).await.map_err(|error| {
        // hyper hands a request back unsent when the connection was already
        // closed; anything else may have reached the peer.
        if error.is_canceled() {
            ForwardError::NotSent(format!("{addr}: {error}"))
        } else {
            ForwardError::Lost(format!("{addr}: {error}"))
        }
    })?;
    let (parts, body) = response.into_parts();
    let body = if head_only {
        Bytes::new()
    } else {
        Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map_err(|error| ForwardError::Lost(format!("{addr}: reading the answer: {error}")))?
            .to_bytes()
    };
    put_idle(addr, sender);
    Ok(Forwarded {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
