//! The pure part of kv's replication: shards, where their replicas live, who
//! should lead them, the leaders' table clients route by, and the cluster
//! spec a node stores in its data dir. No async, no HTTP, no openraft: kv-node,
//! kv-proxy and kv-bench all compute the same answers from the same inputs.
//!
//! The design is `docs/replication.md`; each module cites its section:
//!
//! - [`spec`](ClusterSpec): `--node-id`, `--peers`, `--shards`, `--replicas`,
//!   parsed and validated with errors that name the bad part (§8).
//! - [`shard_of`]: a key's shard, a fixed seeded xxh3 that is part of the
//!   on-disk format (§3).
//! - [`placement`] and [`preferred_leaders`]: each shard's replicas, the first
//!   `replicas` members clockwise on a kv-ring over member ids, and a
//!   deterministic leader per shard spread evenly over its replicas (§3, §9).
//! - [`ShardTable`]: the `GET /-/shards` answer ([`ShardsView`]) as key →
//!   shard → leader address, updated from 421 answers ([`NotLeader`]) only
//!   when they carry a newer term (§6.1, §11, §12), its layout keyed by
//!   cluster id and placement version and trusted only while a node shows
//!   it ([`Placement`], [`ShardTable::merge`]).
//! - [`Routing`]: what a client does with each answer of a shard's leader
//!   (follow a 421, wait out a 503, never retry a 504), shared by kv-proxy
//!   and kv-bench (§12).
//! - [`read_cluster`], [`write_cluster`] and [`check_flags`]:
//!   `<data-dir>/cluster.json`, written atomically and checksummed, and the
//!   refusal of restart flags that contradict it, with the fix in the
//!   message (§8).
//!
//! Issue 13 (live membership change, `docs/membership.md`) adds the pure
//! logic of the metadata group:
//!
//! - [`meta`]: the replicated [`ClusterState`], its [`MetaCommand`]s and
//!   [`apply`] with typed [`Refusal`]s; [`meta_voters`] (§3).
//! - [`plan`]: placement over the active members, one-swap moves, and the
//!   metadata leader's [`schedule`] (§4.2, §4.3).
//! - [`exec`]: a shard leader's [`next_step`] in a move and [`may_drop`]
//!   (§4.4, §5).
//! - [`view`]: the `GET /-/cluster` JSON ([`ClusterView`]) and the
//!   `/-/shards` additions ([`PlacementFields`]) (§6, §8).
//!
//! Everything here is deterministic and order-independent: two processes
//! given the same members in any order agree on every shard's replicas and
//! preferred leader, which is what lets a fresh cluster initialise each Raft
//! group exactly once (§8).

#![deny(clippy::indexing_slicing)]

pub mod exec;
mod file;
pub mod meta;
mod placement;
pub mod plan;
mod route;
mod shard;
mod spec;
mod table;
pub mod view;

pub use exec::{
    may_drop, next_step, GroupMembership, ReplicaView, Replication, ShardWork, Step, Wait,
    CATCH_UP_SLACK,
};
pub use file::{
    check_flags, check_flags_with_peer, cluster_file, decode_cluster, encode_cluster, read_cluster,
    write_cluster, ClusterFileError, Difference, Flags, Mismatch, StoredCluster, Whose,
    CLUSTER_FILE, CLUSTER_FORMAT,
};
pub use meta::{
    apply, meta_learners, meta_voters, BootstrapProblem, ClusterId, ClusterState, Member,
    MemberState, MetaCommand, Move, NodeId, Outcome, Phase, Refusal, StateError,
};
pub use placement::{
    placement, placement_over, preferred_leaders, preferred_leaders_toward, shard_point, NO_LEADER,
    PLACEMENT_VNODES,
};
pub use plan::{
    next_swap, replicas_to_move, schedule, target_placement, LiveInfo, Settings,
    DEFAULT_MAX_INCOMING, DEFAULT_MAX_MOVES,
};
pub use route::{
    answer_margin, is_final, wait_deadline, wants_stale, Attempt, HintBackoff, Next, Routing,
    BACKGROUND_REFRESH, CONSISTENCY_HEADER, CONSISTENCY_STALE, DEFAULT_LEADER_WAIT, MAX_HOPS,
    READ_PATIENCE, REFRESH_EVERY, WAIT_BUDGET_HEADER,
};
pub use shard::{shard_of, MAX_SHARDS, SHARD_SEED};
pub use spec::{
    format_peers, parse_peers, AddrProblem, ClusterSpec, PeersError, SpecError, DEFAULT_REPLICAS,
    DEFAULT_SHARDS,
};
pub use table::{
    placement_version, GroupView, Leader, Merge, NotLeader, Placement, ShardTable, ShardsView,
    TableError, TableGroup, TableView, Taken, CLUSTER_ID_HEADER, LEADER_HEADER, LEADER_ID_HEADER,
    NODE_ID_HEADER, NOT_LEADER_ERROR, NOT_LEADER_STATUS, ROUTE_DIRECT, ROUTE_HEADER,
};
pub use view::{
    shards_body, ClusterView, LocalProgress, MemberView, MetaRole, MoveCounts, MoveProgress,
    MoveView, Moving, NodeKnowledge, PlacementFields, PLACEMENT_VERSION_HEADER,
};
