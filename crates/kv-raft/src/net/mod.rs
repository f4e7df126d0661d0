//! The node-to-node transport: HTTP/1.1 under `/-/raft/...` on the node's own
//! port, postcard bodies, many groups' appends to one peer batched into one
//! request (design `docs/replication.md` §7).
//!
//! - [`wire`]: routes, body types, limits;
//! - [`client`]: openraft's network factory and per-(peer, group) client,
//!   the per-peer append batcher and connection pool;
//! - [`throttle`]: the node's snapshot send throttle and counters;
//! - [`server`]: [`handle_raft`], which a node mounts for `/-/raft/...`;
//! - `catch_up`: the catch-up guard of a repaired node's groups (no vote,
//!   no campaign until caught up).

mod catch_up;
pub mod client;
pub mod refusals;
pub mod server;
pub mod throttle;
pub mod wire;

pub use client::{NetFactory, Network, PeerClient, TransportStats};
pub use refusals::Refusals;
pub use server::{handle_raft, Groups, RaftHttpError};
pub use throttle::SnapshotThrottle;
pub use wire::{WireError, MAX_KEY_BYTES, MAX_RPC_BODY, MAX_SNAPSHOT_BODY};
