//! The token the proxy sends to the nodes (issue 14): `--node-token-file`,
//! or by default the proxy's own token (a cluster usually has one).
//!
//! Every request the proxy sends a node (forwarded keys, `GET /-/shards`)
//! carries `Authorization: Bearer <node token>` in place of the client's:
//! the client proved itself to the proxy, the proxy proves itself to the
//! node. A proxy without any token passes the client's header on as it
//! came (so a loopback proxy in front of token-protected nodes still works
//! for clients that have the token).
//!
//! A node that refuses the proxy's token (401) is a misconfiguration, not
//! the client's fault: the client gets 502 naming the node, and the
//! refusal is logged once per node.
//!
//! TLS to the nodes (`--tls-ca`) is held here too ([`set_tls`], [`tls`]):
//! the pools, the shard table's fetches and the health checks connect with
//! it.
//!
//! Held process-wide (set once at start): the proxy binary runs one proxy,
//! and the header is needed on paths that know no proxy state (the shard
//! table's refresh).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use kv_http::tls::Tls;

static NODE_AUTHORIZATION: OnceLock<HeaderValue> = OnceLock::new();
static NODE_TLS: OnceLock<Arc<Tls>> = OnceLock::new();
static REFUSED_BY: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Sends `authorization` (`Bearer <token>`) to the nodes from now on. Set
/// once; a second call is ignored.
pub fn set(authorization: HeaderValue) {
    let _ = NODE_AUTHORIZATION.set(authorization);
}

/// Connects to the nodes with `tls` from now on (TLS when it has a CA).
/// Set once; a second call is ignored.
pub fn set_tls(tls: Arc<Tls>) {
    let _ = NODE_TLS.set(tls);
}

/// What the proxy connects to the nodes with, if TLS is configured.
#[inline]
pub fn tls() -> Option<&'static Tls> {
    NODE_TLS.get().map(|tls| &**tls)
}

/// Whether the proxy sends a token of its own: then a node's 401 is about
/// it, not about the client (whose header is passed on otherwise).
#[inline]
pub fn is_set() -> bool {
    NODE_AUTHORIZATION.get().is_some()
}

/// Puts the node token on a request to a node, when there is one.
#[inline]
pub fn mark(headers: &mut HeaderMap) {
    if let Some(authorization) = NODE_AUTHORIZATION.get() {
        headers.insert(AUTHORIZATION, authorization.clone());
    }
}

/// `node` answered 401: logs it, once per node.
pub fn refused_by(node: &str) {
    let first = REFUSED_BY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashSet::new)
        .insert(node.to_owned());
    if first {
        log::warn!(
            "node {node} refused the proxy's token (401): start the proxy with the nodes' token \
             (--node-token-file, or the same --auth-token-file / KV_AUTH_TOKEN as the nodes); \
             logged once per node"
        );
    }
}
