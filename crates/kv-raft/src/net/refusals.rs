//! Whether this node's peers refuse it as another cluster's (design §8).
//!
//! A node restarted on another cluster's data dir keeps that cluster's id
//! and data. Its peers answer its node-to-node requests 409, naming their
//! cluster id. Every exchange with a peer leaves a verdict here: refused
//! (a 409 naming another cluster) or accepted (any answer that passed the
//! peer's id check). When a **majority of the other members** refuse it,
//! this node is the minority: its data is the foreign one, and it must
//! serve no client request on keys (not even a stale read). A node refused
//! by a minority keeps serving: the refusing peer is the foreign one.
//!
//! The raft transport ([`crate::Network`]) and the node's forwarder report
//! the answers to this node's requests here; the node also reports the
//! requests it receives (a mismatch is symmetric: a peer whose request
//! carries another cluster's id is one this node's requests would be
//! refused by), so it learns at its peers' first heartbeat. The request
//! path reads one atomic flag; an accepted exchange with no refusal on
//! record costs one atomic load too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};

/// The latest verdict of each peer (by address) and the outcome.
#[derive(Debug, Default)]
pub struct Refusals {
    state: Mutex<State>,
    /// A majority of the other members refuse us: read on every request.
    foreign: AtomicBool,
    /// Some peer's refusal is on record (else `accepted` has nothing to do).
    any: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Members other than this node (0: never foreign).
    others: usize,
    /// Peers whose latest answer refused us, with the cluster id they named.
    refused: HashMap<String, String>,
}

impl Refusals {
    /// Sets how many other members the cluster has (the majority's base).
    pub fn set_others(&self, others: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.others = others;
        self.update(&state);
    }

    /// The peer at `addr` refused us as another cluster's; it is `theirs`.
    pub fn refused(&self, addr: &str, theirs: &str) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.refused.get(addr).map(String::as_str) != Some(theirs) {
            state.refused.insert(addr.to_owned(), theirs.to_owned());
            self.update(&state);
        }
    }

    /// The peer at `addr` accepted our cluster id.
    pub fn accepted(&self, addr: &str) {
        if !self.has_refusals() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.refused.remove(addr).is_some() {
            self.update(&state);
        }
    }

    /// Whether any peer's refusal is on record (one atomic load).
    #[inline]
    pub fn has_refusals(&self) -> bool {
        self.any.load(Relaxed)
    }

    /// Whether a majority of the other members refuse us (one atomic load).
    #[inline]
    pub fn is_foreign(&self) -> bool {
        self.foreign.load(Relaxed)
    }

    /// The cluster id the refusing majority named, while it refuses us.
    pub fn foreign(&self) -> Option<String> {
        if !self.is_foreign() {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        majority_id(&state)
    }

    /// Recomputes the flag; logs each change (at error when it sets).
    fn update(&self, state: &State) {
        self.any.store(!state.refused.is_empty(), Relaxed);
        let now = majority_id(state);
        let was = self.foreign.swap(now.is_some(), Relaxed);
        match (&now, was) {
            (Some(theirs), false) => log::error!(
                "{} of {} other members refuse this node: they belong to cluster {theirs}, \
                 this node's data dir to another cluster; it serves no key until they accept it \
                 (start it on its own data dir)",
                state.refused.len(),
                state.others
            ),
            (None, true) => log::warn!("the other members accept this node again: serving"),
            _ => {}
        }
    }
}

/// The id named by the refusing peers when they are a strict majority of
/// the other members (a minority refusing us: we are not the foreign one).
fn majority_id(state: &State) -> Option<String> {
    if state.others == 0 || state.refused.len() * 2 <= state.others {
        return None;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in state.refused.values() {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(id, _)| id.to_owned())
}

/// The cluster id a 409 other-cluster answer names (kv-node's body
/// `{"error", "cluster_id", "peer_cluster_id"}`), or `None` for any other
/// 409 body.
pub fn other_cluster_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("peer_cluster_id")?;
    value.get("cluster_id")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_of_the_others_makes_this_node_foreign_and_one_acceptance_ends_it() {
        let refusals = Refusals::default();
        refusals.set_others(2);
        refusals.refused("a:1", "A");
        assert!(!refusals.is_foreign(), "one of two others is no majority");
        refusals.refused("b:1", "A");
        assert_eq!(refusals.foreign().as_deref(), Some("A"));
        refusals.accepted("b:1");
        assert!(!refusals.is_foreign());
        assert_eq!(refusals.foreign(), None);
    }

    #[test]
    fn a_single_node_cluster_is_never_foreign() {
        let refusals = Refusals::default();
        refusals.refused("a:1", "A");
        assert!(!refusals.is_foreign());
    }

    #[test]
    fn only_an_other_cluster_body_names_an_id() {
        let body = br#"{"error":"x","cluster_id":"A","peer_cluster_id":"B"}"#;
        assert_eq!(other_cluster_id(body).as_deref(), Some("A"));
        assert_eq!(other_cluster_id(br#"{"error":"x"}"#), None);
        assert_eq!(other_cluster_id(b"not json"), None);
    }
}
