//! What travels between nodes: the routes, the bodies (postcard over
//! openraft's serde types) and the limits on them.
//!
//! postcard, not JSON: openraft's messages carry values as byte vectors,
//! which JSON spells as arrays of numbers (the design's spike: an append of
//! a membership entry, a 100-byte put and a blank entry is 182 bytes in
//! postcard, 988 in JSON; a vote request 8 vs 151). Here: a batch of two
//! appends, each a 100-byte put and a blank entry, is 263 bytes in postcard
//! and 1590 in JSON (`append_batch_round_trips_and_is_smaller_than_json`).

use openraft::alias::{SnapshotMetaOf, VoteOf};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::types::{GroupId, KvRaft};

/// Many groups' appends and heartbeats to one peer, in one request.
pub(crate) const APPEND: &str = "/-/raft/append";
/// One group's vote request.
pub(crate) const VOTE: &str = "/-/raft/vote";
/// One group's pre-vote request.
pub(crate) const PRE_VOTE: &str = "/-/raft/pre-vote";
/// One group's whole snapshot.
pub(crate) const SNAPSHOT: &str = "/-/raft/snapshot";
/// One group's leadership transfer.
pub(crate) const TRANSFER_LEADER: &str = "/-/raft/transfer-leader";

/// The media type of every `/-/raft/...` body that is not an error.
pub(crate) const CONTENT_TYPE: &str = "application/x-postcard";

/// Largest request or answer body of an append batch, a vote or a transfer.
pub const MAX_RPC_BODY: usize = 64 << 20;
/// Longest key a command carries (kv-http's limit), for size estimates.
pub const MAX_KEY_BYTES: usize = kv_http::key::MAX_KEY_BYTES;
/// Largest snapshot body. Snapshots travel whole, in memory, until task C
/// streams them from files (design §5, open question 5).
pub const MAX_SNAPSHOT_BODY: usize = 1 << 30;

/// Why a peer did not answer one group's request. Per item in an append
/// batch (one unknown group must not fail the others' heartbeats), else
/// carried by the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    /// The peer hosts no such group (not created yet, or dropped).
    #[error("group {0} is not hosted there")]
    UnknownGroup(GroupId),
    /// The message decodes but breaks what every leader's append satisfies.
    #[error("group {group}: malformed append: {message}")]
    Malformed { group: GroupId, message: String },
    /// The peer's group refused fatally (shutting down, storage error).
    #[error("group {group}: {message}")]
    Fatal { group: GroupId, message: String },
}

/// `POST /-/raft/append` body.
pub(crate) type AppendBatch = Vec<(GroupId, AppendEntriesRequest<KvRaft>)>;
/// `POST /-/raft/append` answer, in the batch's order.
pub(crate) type AppendReplies = Vec<(GroupId, Result<AppendEntriesResponse<KvRaft>, WireError>)>;
/// `POST /-/raft/vote` and `/-/raft/pre-vote` body.
pub(crate) type VoteBody = (GroupId, VoteRequest<KvRaft>);
pub(crate) type VoteReply = VoteResponse<KvRaft>;
/// `POST /-/raft/transfer-leader` body.
pub(crate) type TransferBody = (GroupId, TransferLeaderRequest<KvRaft>);
pub(crate) type TransferReply = TransferLeaderResponse<KvRaft>;
/// `POST /-/raft/snapshot` body: the sender's vote, the meta and the bytes.
pub(crate) type SnapshotBody = (GroupId, VoteOf<KvRaft>, SnapshotMetaOf<KvRaft>, Vec<u8>);
pub(crate) type SnapshotReply = SnapshotResponse<KvRaft>;

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use openraft::alias::EntryOf;
    use openraft::{EntryPayload, Vote};

    use crate::types::Command;

    fn append() -> AppendEntriesRequest<KvRaft> {
        let log_id = |index| openraft::testing::log_id::<KvRaft>(3, 1, index);
        let put = EntryOf::<KvRaft> {
            log_id: log_id(7),
            payload: EntryPayload::Normal(Command::Put {
                key: "user:42".into(),
                value: vec![b'x'; 100],
            }),
        };
        let blank = EntryOf::<KvRaft> {
            log_id: log_id(8),
            payload: EntryPayload::Blank,
        };
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(6)),
            entries: vec![put, blank],
            leader_commit: Some(log_id(6)),
        }
    }

    #[test]
    fn append_batch_round_trips_and_is_smaller_than_json() {
        let batch: AppendBatch = vec![(0, append()), (17, append())];
        let bytes = encode(&batch).unwrap();
        let back: AppendBatch = decode(&bytes).unwrap();
        // No PartialEq on openraft's requests: compare re-encodings.
        assert_eq!(encode(&back).unwrap(), bytes);
        assert_eq!(format!("{back:?}"), format!("{batch:?}"));
        let json = serde_json::to_vec(&batch).unwrap();
        eprintln!(
            "append batch of 2: postcard {} bytes, json {}",
            bytes.len(),
            json.len()
        );
        assert!(
            bytes.len() * 3 < json.len(),
            "postcard {} bytes, json {} bytes",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn truncated_or_garbage_bodies_are_errors_not_panics() {
        let bytes = encode(&vec![(5u32, append())]).unwrap();
        for cut in 0..bytes.len() {
            let _ = decode::<AppendBatch>(&bytes[..cut]);
        }
        assert!(decode::<AppendBatch>(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode::<VoteBody>(b"\xff\xff\xff\xff\xff\xff").is_err());
    }
}
