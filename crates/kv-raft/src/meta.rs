//! The metadata group's state machine step (`docs/membership.md` §3.1):
//! the cluster state lives as JSON under one reserved key of the group's
//! ordinary state machine, and each [`Command::Meta`](crate::Command::Meta)
//! rewrites it whole through the pure [`kv_cluster::meta::apply`].
//!
//! Why the shard state machine and not a second type: `Groups<SM>`, the
//! server and the per-peer batch are generic over one `SM`, and the state
//! is one small JSON value. Snapshots, WAL records and transport are then
//! the shards' own, unchanged. Only the metadata group is proposed such
//! commands (kv-node's doing), and it is never proposed a PUT or DELETE, so
//! the reserved key meets no user key.

use std::io;

use kv_cluster::meta::{self, ClusterState, MetaCommand, StateError};

use crate::types::Outcome;

/// The reserved key holding the metadata group's [`ClusterState`] (JSON).
/// Reserved in the metadata group only, which holds no user key; a client
/// can send `%00meta` to a shard, where it is an ordinary key.
pub const META_KEY: &str = "\0meta";

/// Reads the state stored under [`META_KEY`] (`None`: nothing stored yet,
/// the empty state before `Bootstrap`).
pub fn decode_state(stored: Option<&[u8]>) -> Result<Option<ClusterState>, StateError> {
    stored.map(ClusterState::from_json).transpose()
}

/// Applies `cmd` to the state stored under [`META_KEY`]: the outcome for
/// the proposer and, when the state changed, the JSON to store. A refusal
/// stores nothing. A stored state that does not decode is an error (the
/// group stops rather than rewrite the cluster from an empty state).
pub(crate) fn apply_meta(
    stored: Option<&[u8]>,
    cmd: &MetaCommand,
) -> io::Result<(Outcome, Option<Vec<u8>>)> {
    let mut state = decode_state(stored)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        .unwrap_or_default();
    Ok(match meta::apply(&mut state, cmd) {
        Ok(outcome @ meta::Outcome::Changed { .. }) => {
            (Outcome::Meta(Ok(outcome)), Some(state.to_json()))
        }
        Ok(outcome @ meta::Outcome::Unchanged { .. }) => (Outcome::Meta(Ok(outcome)), None),
        Err(refusal) => (Outcome::Meta(Err(refusal)), None),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kv_cluster::meta::{ClusterId, Refusal};

    use super::*;

    fn bootstrap() -> MetaCommand {
        MetaCommand::Bootstrap {
            cluster_id: ClusterId(7),
            shards: 4,
            replicas: 2,
            members: BTreeMap::from([
                (1, "127.0.0.1:8081".to_owned()),
                (2, "127.0.0.1:8082".to_owned()),
            ]),
        }
    }

    #[test]
    fn a_change_is_stored_a_repeat_or_refusal_is_not() {
        let add = MetaCommand::AddMember {
            id: 3,
            addr: "127.0.0.1:8083".into(),
        };
        let (outcome, stored) = apply_meta(None, &add).unwrap();
        assert_eq!(outcome, Outcome::Meta(Err(Refusal::NotBootstrapped)));
        assert!(stored.is_none());

        let (outcome, stored) = apply_meta(None, &bootstrap()).unwrap();
        assert_eq!(
            outcome,
            Outcome::Meta(Ok(meta::Outcome::Changed { version: 1 }))
        );
        let stored = stored.unwrap();
        let (outcome, again) = apply_meta(Some(&stored), &bootstrap()).unwrap();
        assert_eq!(
            outcome,
            Outcome::Meta(Ok(meta::Outcome::Unchanged { version: 1 }))
        );
        assert!(again.is_none());

        let (outcome, next) = apply_meta(Some(&stored), &add).unwrap();
        assert_eq!(
            outcome,
            Outcome::Meta(Ok(meta::Outcome::Changed { version: 2 }))
        );
        let state = decode_state(next.as_deref()).unwrap().unwrap();
        assert_eq!(state.version, 2);
        assert!(state.members.contains_key(&3));
    }

    #[test]
    fn a_damaged_state_is_an_error_not_a_fresh_cluster() {
        let error = apply_meta(Some(b"{not json"), &bootstrap()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
