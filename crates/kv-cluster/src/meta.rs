//! The replicated cluster state of issue 13 and the commands that change it
//! (`docs/membership.md` §3.1, §3.3, §4.5).
//!
//! The metadata Raft group (group `u32::MAX`, on every member) applies
//! [`MetaCommand`]s with [`apply`], a pure function: no clock, no randomness,
//! no I/O, so every replica that applies the same commands in the same order
//! holds the same [`ClusterState`], including after a replay from its WAL.
//! `apply` validates before it changes anything: a refused command leaves
//! the state as it was (version included) and tells the proposer why with a
//! typed [`Refusal`]. Commands are idempotent where a retry is natural (the
//! same `AddMember` twice, `Admit` of an admitted move, `Leave` of a leaving
//! member): the repeat answers [`Outcome::Unchanged`] and bumps nothing.
//!
//! **Version.** Every command that changes the state increases
//! [`ClusterState::version`] by exactly one. It is the placement version that
//! `/-/shards`, `GET /-/cluster` and the `X-Kv-Placement-Version` header carry.
//!
//! **Placement is stored.** [`ClusterState::placement`] is the target (the ring
//! over the `Active` members, recomputed only by a command that changes who is
//! active, see [`crate::plan`]); [`ClusterState::current`] is what each shard's
//! Raft group was last seen to have finished with. They differ while moves are
//! open. A replay recomputes placement with [`crate::placement_over`], whose
//! output is pinned (`placement::tests::pinned_placement`): changing the ring
//! changes the meaning of logs already written.
//!
//! **Encoding, kept stable.** The state is stored as JSON (serde_json,
//! [`ClusterState::to_json`]) under one reserved key of the metadata group's
//! state machine, so it lands in that group's snapshots as JSON too; field
//! names and the lowercase enum names are the format. Fields added later must
//! be `#[serde(default)]`. A [`MetaCommand`] travels inside kv-raft's
//! `Command`, which is postcard in the WAL: postcard encodes an enum variant by
//! its index and a struct by field position, so variants and fields are only
//! ever **appended**, never reordered or removed. That is also why
//! [`MetaCommand::Bootstrap`] carries the spec (members, shard and replica
//! counts) rather than a whole `ClusterState`: a state struct that gains a
//! field would no longer decode from an old WAL record.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::shard::MAX_SHARDS;
use crate::spec::{check_addr, AddrProblem, ClusterSpec};

/// A member's id (`--node-id`), the same number as its Raft node id.
pub type NodeId = u64;

/// Metadata voters when there are fewer than five active members (or all of
/// them when fewer than three): tolerates one failure, like a 3-replica shard.
pub const META_VOTERS: usize = 3;
/// Metadata voters from five active members on: tolerates two failures.
pub const META_VOTERS_LARGE: usize = 5;

/// A cluster's identity, random when the cluster is created, checked when a
/// node joins so a node cannot be joined into the wrong cluster. One format
/// everywhere (`cluster.json`, the `X-Kv-Cluster-Id` header, the metadata
/// state, `GET /-/cluster`): a UUID written as 8-4-4-4-12 lowercase hex digits
/// (`5f0c1e2a-...`), which is how kv-node has always written the v4 UUID it
/// creates (JSON has no 128-bit integers). Parsing also takes the 32 digits
/// without hyphens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(pub u128);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }
}

/// Why a cluster id string was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a cluster id is a UUID: 32 hexadecimal digits, as 8-4-4-4-12 with hyphens")]
pub struct BadClusterId;

impl FromStr for ClusterId {
    type Err = BadClusterId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let digits: String = if text.len() == 36 {
            let hyphens_in_place = text
                .char_indices()
                .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
            if !hyphens_in_place {
                return Err(BadClusterId);
            }
            text.chars().filter(|c| *c != '-').collect()
        } else {
            text.to_owned()
        };
        if digits.len() != 32 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadClusterId);
        }
        u128::from_str_radix(&digits, 16)
            .map(ClusterId)
            .map_err(|_| BadClusterId)
    }
}

impl Serialize for ClusterId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a member is in its life (§4.1, §4.5). Ids are never reused: a
/// `Removed` member stays in the state forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Added; catching up on the metadata group; holds no shard yet.
    Joining,
    /// In the placement.
    Active,
    /// Out of the placement; its replicas are moving away.
    Leaving,
    /// Gone for good; its id cannot be added again.
    Removed,
}

impl MemberState {
    /// The JSON name (`"active"`, ...), for messages and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Active => "active",
            Self::Leaving => "leaving",
            Self::Removed => "removed",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` clients and peers reach it at.
    pub addr: String,
    /// Where it is in its life.
    pub state: MemberState,
    /// The version at which it entered `state`.
    pub since: u64,
}

/// How far an open move got (§4.4). `Done` is not a phase: it closes the move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Planned; waits for the scheduler's admission (the throttle).
    Planned,
    /// Admitted: the shard's leader adds the learner and waits for it to
    /// catch up. Until the joint step it can still be cancelled by a replan.
    Copying,
    /// The leader reported the joint step: the group's membership is joint
    /// or already the goal. From here the move only goes forward.
    Joint,
}

impl Phase {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Copying => "copying",
            Self::Joint => "joint",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An open move of one shard: one voter swap (§4.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The version that planned it; names it in every later command (unique
    /// per shard: a replanned move gets the newer version).
    pub id: u64,
    /// The member that gains a replica (a learner first).
    pub add: NodeId,
    /// The member that loses its replica.
    pub remove: NodeId,
    /// `current[shard]` with `remove` replaced by `add`.
    pub goal: Vec<NodeId>,
    /// How far it got.
    pub phase: Phase,
}

/// The replicated cluster state (§3.1). [`ClusterState::default`] is the empty
/// state of a metadata group nobody bootstrapped yet (version 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Random at bootstrap; checked on join.
    pub cluster_id: ClusterId,
    /// The placement version: 0 before bootstrap, 1 for today's placement,
    /// +1 per applied change.
    pub version: u64,
    /// Number of shards (fixed).
    pub shards: u32,
    /// Replicas per shard (fixed).
    pub replicas: u32,
    /// Every id ever used, `Removed` ones included.
    pub members: BTreeMap<NodeId, Member>,
    /// Per shard: the target voters, in ring order (the ring over the
    /// `Active` members).
    pub placement: Vec<Vec<NodeId>>,
    /// Per shard: the voters of the group's membership when its last move
    /// finished (at bootstrap: the placement).
    pub current: Vec<Vec<NodeId>>,
    /// Per shard: the Raft log index of the membership entry that made
    /// `current` (0 at bootstrap). A replica that left drops its copy only if
    /// its own last membership is not newer (§5).
    pub current_log_index: Vec<u64>,
    /// At most one open move per shard.
    pub moves: BTreeMap<u32, Move>,
    /// Moves finished since bootstrap (monotone).
    pub moves_done: u64,
    /// `moves_done` when the state was last settled: progress counts from it.
    pub moves_base: u64,
}

/// A change to the cluster state, proposed to the metadata group.
///
/// Postcard-encoded inside kv-raft's `Command`: append variants, never
/// reorder (module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Version 1 from today's `cluster.json` (§3.3). A no-op unless the state
    /// is empty, so the lowest member may propose it after every restart.
    Bootstrap {
        /// The new cluster's id.
        cluster_id: ClusterId,
        /// Shards.
        shards: u32,
        /// Replicas per shard.
        replicas: u32,
        /// Id → address.
        members: BTreeMap<NodeId, String>,
    },
    /// A new member, `Joining`.
    AddMember {
        /// Its id (never used before).
        id: NodeId,
        /// Its address.
        addr: String,
    },
    /// `Joining` → `Active` (its metadata replica caught up); replans.
    Activate {
        /// The member.
        id: NodeId,
    },
    /// `Active` → `Leaving` (replans), or `Joining` → `Removed`.
    Leave {
        /// The member.
        id: NodeId,
    },
    /// `Leaving` → `Removed`, once it holds nothing.
    Forget {
        /// The member.
        id: NodeId,
    },
    /// `Planned` → `Copying`: the scheduler admits a move (the throttle).
    Admit {
        /// The shard.
        shard: u32,
        /// The move's id.
        move_id: u64,
    },
    /// A phase reported by the executor; only `Copying` → `Joint` exists.
    Phase {
        /// The shard.
        shard: u32,
        /// The move's id.
        move_id: u64,
        /// The new phase.
        phase: Phase,
    },
    /// The group's membership is the goal, committed: the move is closed,
    /// `current[shard] = voters`; replans that shard.
    Done {
        /// The shard.
        shard: u32,
        /// The move's id.
        move_id: u64,
        /// The group's voters now (must equal the goal as a set).
        voters: Vec<NodeId>,
        /// Log index of the membership entry holding them.
        membership_log_index: u64,
    },
    /// The group removed learners no open move wants (a cancelled move's):
    /// its membership is `current[shard]` again, at a newer log index, which
    /// becomes `current_log_index[shard]` so the removed learner may drop its
    /// copy (§5). Refused while a move of the shard is copying or joint.
    LearnersRemoved {
        /// The shard.
        shard: u32,
        /// The group's voters (must equal `current[shard]` as a set).
        voters: Vec<NodeId>,
        /// Log index of the membership entry without the learners.
        membership_log_index: u64,
    },
}

/// What an applied command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The state changed; this is its new version.
    Changed {
        /// The new version.
        version: u64,
    },
    /// Nothing to do (a repeat, or `Bootstrap` of a bootstrapped state).
    Unchanged {
        /// The version, as it was.
        version: u64,
    },
}

impl Outcome {
    /// The state's version after the command.
    pub fn version(self) -> u64 {
        match self {
            Self::Changed { version } | Self::Unchanged { version } => version,
        }
    }
}

/// What is wrong with a `Bootstrap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum BootstrapProblem {
    /// No members.
    #[error("it has no members")]
    NoMembers,
    /// Shards outside 1..=MAX_SHARDS.
    #[error("its shard count is not in 1..={MAX_SHARDS}")]
    Shards,
    /// Replicas outside 1..=members.
    #[error("its replica count is not between 1 and its number of members")]
    Replicas,
    /// An address that is not `host:port`.
    #[error("member {id}'s address {reason}")]
    Addr {
        /// The member.
        id: NodeId,
        /// What is wrong with it.
        reason: AddrProblem,
    },
    /// Two members at one address.
    #[error("member {id} has the address of another member")]
    DuplicateAddr {
        /// The second of the two.
        id: NodeId,
    },
}

/// Why [`apply`] refused a command. Nothing changed. Copy and string-free, so
/// kv-raft's `Outcome` stays `Copy`; kv-node maps each to an HTTP status
/// (`UnknownMember` 404, `NotBootstrapped` 503, every other one 409).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    /// A command other than `Bootstrap` before bootstrap.
    #[error("the cluster state is not bootstrapped yet")]
    NotBootstrapped,
    /// A `Bootstrap` that describes no valid cluster.
    #[error("bootstrap refused: {problem}")]
    BadBootstrap {
        /// What is wrong.
        problem: BootstrapProblem,
    },
    /// Membership change with one replica per shard (`docs/membership.md` §7).
    #[error("membership change needs --replicas 2 or more: shards with one replica are served without Raft (docs/replication.md §10.1) and cannot be moved live; see docs/membership.md §7")]
    SingleReplica,
    /// No member with this id.
    #[error("node {id} is not a member")]
    UnknownMember {
        /// The id.
        id: NodeId,
    },
    /// The id is a member at another address.
    #[error("node {id} is already a member at another address; ids are never reused: choose a new --node-id")]
    IdTaken {
        /// The id.
        id: NodeId,
    },
    /// The id was removed.
    #[error(
        "node {id} was removed from the cluster; ids are never reused: choose a new --node-id"
    )]
    IdRemoved {
        /// The id.
        id: NodeId,
    },
    /// Another member has this address.
    #[error("node {by} already uses the address given for node {id}")]
    AddrTaken {
        /// The id being added.
        id: NodeId,
        /// The member that has the address.
        by: NodeId,
    },
    /// Not `host:port`.
    #[error("the address given for node {id} {reason}")]
    BadAddr {
        /// The id being added.
        id: NodeId,
        /// What is wrong with it.
        reason: AddrProblem,
    },
    /// The command does not apply to a member in this state.
    #[error("node {id} is {state}")]
    WrongState {
        /// The member.
        id: NodeId,
        /// Its state.
        state: MemberState,
    },
    /// Removing it would leave fewer active members than replicas.
    #[error("removing node {id} would leave {left} active members for {replicas} replicas per shard; add a node first")]
    TooFewMembers {
        /// The member.
        id: NodeId,
        /// Active members that would remain.
        left: u32,
        /// Replicas per shard.
        replicas: u32,
    },
    /// `Forget` of a member still holding a replica.
    #[error("node {id} still holds a replica of shard {shard}")]
    StillHolds {
        /// The member.
        id: NodeId,
        /// A shard it holds.
        shard: u32,
    },
    /// No such shard.
    #[error("there is no shard {shard}")]
    NoSuchShard {
        /// The shard.
        shard: u32,
    },
    /// No open move with this id on the shard (finished or replanned).
    #[error("move {move_id} of shard {shard} is not open")]
    StaleMove {
        /// The shard.
        shard: u32,
        /// The move's id.
        move_id: u64,
    },
    /// A phase change that is not `Copying` → `Joint`, or `Done` before
    /// `Joint`.
    #[error("move of shard {shard} cannot go from {from} to {to}")]
    BadPhase {
        /// The shard.
        shard: u32,
        /// Its phase.
        from: Phase,
        /// The phase asked for (`Joint` for a `Done`).
        to: Phase,
    },
    /// `LearnersRemoved` while a move of the shard is copying or joint (its
    /// learner is wanted).
    #[error("shard {shard} has a move in phase {phase}")]
    MoveInProgress {
        /// The shard.
        shard: u32,
        /// The move's phase.
        phase: Phase,
    },
    /// `Done` with voters that are not the move's goal.
    #[error("the voters reported for shard {shard} are not its move's goal")]
    WrongVoters {
        /// The shard.
        shard: u32,
    },
}

/// Why a stored state could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not the JSON of a [`ClusterState`].
    #[error("cluster state is not valid JSON of its format: {0}")]
    Json(#[from] serde_json::Error),
    /// Decoded, but inconsistent (per-shard rows missing, ...).
    #[error("cluster state is inconsistent: {0}")]
    Inconsistent(&'static str),
}

impl ClusterState {
    /// Version 1 from today's spec (§3.3): every member `Active`, placement and
    /// current both today's [`crate::placement`], so no group moves.
    pub fn from_spec(spec: &ClusterSpec, cluster_id: ClusterId) -> Self {
        let mut state = Self::default();
        bootstrap(
            &mut state,
            cluster_id,
            spec.shards,
            spec.replicas,
            &spec.members,
        );
        state
    }

    /// No `Bootstrap` applied yet.
    pub fn is_empty(&self) -> bool {
        self.version == 0
    }

    /// No open move and nobody joining or leaving (§8).
    pub fn settled(&self) -> bool {
        self.moves.is_empty()
            && self
                .members
                .values()
                .all(|m| matches!(m.state, MemberState::Active | MemberState::Removed))
    }

    /// The `Active` members' ids, ascending.
    pub fn active(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.with_state(MemberState::Active)
    }

    /// Ids of the members in `state`, ascending.
    pub fn with_state(&self, state: MemberState) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .filter(move |(_, m)| m.state == state)
            .map(|(&id, _)| id)
    }

    /// Member id → address for every member that may hold or lead a replica
    /// (joining, active, leaving): what clients route by.
    pub fn addresses(&self) -> BTreeMap<NodeId, String> {
        self.members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Removed)
            .map(|(&id, m)| (id, m.addr.clone()))
            .collect()
    }

    /// A shard `id` holds a replica of or is moving into/out of, if any: a
    /// member for which this is `None` can be forgotten.
    pub fn holds(&self, id: NodeId) -> Option<u32> {
        let in_current = self
            .current
            .iter()
            .position(|row| row.contains(&id))
            .map(|shard| shard as u32);
        let in_move = self
            .moves
            .iter()
            .find(|(_, mv)| mv.add == id || mv.remove == id)
            .map(|(&shard, _)| shard);
        match (in_current, in_move) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The members that should host a replica of `shard` right now: its
    /// current voters plus the open move's `add` (§3.4 "hosting").
    pub fn hosts(&self, shard: u32) -> BTreeSet<NodeId> {
        let mut hosts: BTreeSet<NodeId> = self
            .current
            .get(shard as usize)
            .map(|row| row.iter().copied().collect())
            .unwrap_or_default();
        if let Some(mv) = self.moves.get(&shard) {
            hosts.insert(mv.add);
        }
        hosts
    }

    /// The JSON stored under the metadata group's reserved key.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of maps with integer keys, strings and numbers: cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads [`ClusterState::to_json`] back, checking its shape.
    pub fn from_json(bytes: &[u8]) -> Result<Self, StateError> {
        let state: Self = serde_json::from_slice(bytes)?;
        state.check()?;
        Ok(state)
    }

    /// The per-shard rows agree with the shard count and moves name real
    /// shards; members named by rows exist.
    pub fn check(&self) -> Result<(), StateError> {
        if self.is_empty() {
            return Ok(());
        }
        let shards = self.shards as usize;
        if self.placement.len() != shards
            || self.current.len() != shards
            || self.current_log_index.len() != shards
        {
            return Err(StateError::Inconsistent(
                "per-shard rows do not match the shard count",
            ));
        }
        if self.moves.keys().any(|&shard| shard >= self.shards) {
            return Err(StateError::Inconsistent(
                "a move names a shard that does not exist",
            ));
        }
        let known = |id: &NodeId| self.members.contains_key(id);
        if !self.current.iter().flatten().all(known)
            || !self.placement.iter().flatten().all(known)
            || !self
                .moves
                .values()
                .all(|mv| known(&mv.add) && known(&mv.remove))
        {
            return Err(StateError::Inconsistent("a shard names an unknown member"));
        }
        if self.moves_base > self.moves_done {
            return Err(StateError::Inconsistent("moves_base is above moves_done"));
        }
        Ok(())
    }
}

/// The metadata group's voters (§3.2): the lowest three `Active` ids, the
/// lowest five from five active members on, all of them when fewer than
/// three.
pub fn meta_voters(state: &ClusterState) -> BTreeSet<NodeId> {
    let active = state.active().count();
    let want = if active >= META_VOTERS_LARGE {
        META_VOTERS_LARGE
    } else {
        META_VOTERS
    };
    state.active().take(want).collect()
}

/// The metadata group's learners: every member that is not removed and not
/// a voter (joining and leaving members included, so they keep applying).
pub fn meta_learners(state: &ClusterState) -> BTreeSet<NodeId> {
    let voters = meta_voters(state);
    state
        .members
        .iter()
        .filter(|(id, m)| m.state != MemberState::Removed && !voters.contains(id))
        .map(|(&id, _)| id)
        .collect()
}

/// Applies `cmd` to `state` (module docs): deterministic; a change bumps the
/// version by one; a refusal changes nothing.
pub fn apply(state: &mut ClusterState, cmd: &MetaCommand) -> Result<Outcome, Refusal> {
    if let MetaCommand::Bootstrap {
        cluster_id,
        shards,
        replicas,
        members,
    } = cmd
    {
        if !state.is_empty() {
            return Ok(Outcome::Unchanged {
                version: state.version,
            });
        }
        check_bootstrap(*shards, *replicas, members)?;
        bootstrap(state, *cluster_id, *shards, *replicas, members);
        return Ok(Outcome::Changed {
            version: state.version,
        });
    }
    if state.is_empty() {
        return Err(Refusal::NotBootstrapped);
    }
    let unchanged = Ok(Outcome::Unchanged {
        version: state.version,
    });
    match cmd {
        MetaCommand::Bootstrap { .. } => unchanged,
        MetaCommand::AddMember { id, addr } => {
            let id = *id;
            if state.replicas < 2 {
                return Err(Refusal::SingleReplica);
            }
            if let Some(member) = state.members.get(&id) {
                return match member.state {
                    MemberState::Removed => Err(Refusal::IdRemoved { id }),
                    _ if member.addr == *addr => unchanged,
                    _ => Err(Refusal::IdTaken { id }),
                };
            }
            check_addr(addr).map_err(|reason| Refusal::BadAddr { id, reason })?;
            if let Some((&by, _)) = state
                .members
                .iter()
                .find(|(_, m)| m.state != MemberState::Removed && m.addr == *addr)
            {
                return Err(Refusal::AddrTaken { id, by });
            }
            let version = bump(state);
            state.members.insert(
                id,
                Member {
                    addr: addr.clone(),
                    state: MemberState::Joining,
                    since: version,
                },
            );
            finish(state)
        }
        MetaCommand::Activate { id } => {
            let id = *id;
            match member_state(state, id)? {
                MemberState::Active => unchanged,
                MemberState::Joining => {
                    set_state(state, id, MemberState::Active);
                    crate::plan::replan(state);
                    finish(state)
                }
                other => Err(Refusal::WrongState { id, state: other }),
            }
        }
        MetaCommand::Leave { id } => {
            let id = *id;
            match member_state(state, id)? {
                MemberState::Leaving | MemberState::Removed => unchanged,
                MemberState::Joining => {
                    // It holds nothing yet (only active members are placed).
                    set_state(state, id, MemberState::Removed);
                    finish(state)
                }
                MemberState::Active => {
                    if state.replicas < 2 {
                        return Err(Refusal::SingleReplica);
                    }
                    let left = state.active().filter(|&other| other != id).count() as u32;
                    if left < state.replicas {
                        return Err(Refusal::TooFewMembers {
                            id,
                            left,
                            replicas: state.replicas,
                        });
                    }
                    set_state(state, id, MemberState::Leaving);
                    crate::plan::replan(state);
                    finish(state)
                }
            }
        }
        MetaCommand::Forget { id } => {
            let id = *id;
            match member_state(state, id)? {
                MemberState::Removed => unchanged,
                MemberState::Leaving => {
                    if let Some(shard) = state.holds(id) {
                        return Err(Refusal::StillHolds { id, shard });
                    }
                    set_state(state, id, MemberState::Removed);
                    finish(state)
                }
                other => Err(Refusal::WrongState { id, state: other }),
            }
        }
        MetaCommand::Admit { shard, move_id } => {
            let mv = open_move(state, *shard, *move_id)?;
            if mv.phase != Phase::Planned {
                return unchanged;
            }
            bump(state);
            if let Some(mv) = state.moves.get_mut(shard) {
                mv.phase = Phase::Copying;
            }
            finish(state)
        }
        MetaCommand::Phase {
            shard,
            move_id,
            phase,
        } => {
            let mv = open_move(state, *shard, *move_id)?;
            match (mv.phase, *phase) {
                (from, to) if from == to => unchanged,
                (Phase::Copying, Phase::Joint) => {
                    bump(state);
                    if let Some(mv) = state.moves.get_mut(shard) {
                        mv.phase = Phase::Joint;
                    }
                    finish(state)
                }
                (from, to) => Err(Refusal::BadPhase {
                    shard: *shard,
                    from,
                    to,
                }),
            }
        }
        MetaCommand::Done {
            shard,
            move_id,
            voters,
            membership_log_index,
        } => {
            let mv = open_move(state, *shard, *move_id)?;
            if mv.phase != Phase::Joint {
                return Err(Refusal::BadPhase {
                    shard: *shard,
                    from: mv.phase,
                    to: Phase::Joint,
                });
            }
            let reported: BTreeSet<NodeId> = voters.iter().copied().collect();
            let goal: BTreeSet<NodeId> = mv.goal.iter().copied().collect();
            if reported != goal || reported.len() != voters.len() {
                return Err(Refusal::WrongVoters { shard: *shard });
            }
            // `open_move` checked `shard < shards`, and `ClusterState::check`
            // that both per-shard vectors have `shards` rows: never refused.
            let s = *shard as usize;
            if s >= state.current.len() || s >= state.current_log_index.len() {
                return Err(Refusal::NoSuchShard { shard: *shard });
            }
            bump(state);
            let goal = state.moves.remove(shard).map(|mv| mv.goal);
            if let (Some(current), Some(goal)) = (state.current.get_mut(s), goal) {
                *current = goal;
            }
            if let Some(log_index) = state.current_log_index.get_mut(s) {
                *log_index = *membership_log_index;
            }
            state.moves_done += 1;
            crate::plan::replan(state);
            finish(state)
        }
        MetaCommand::LearnersRemoved {
            shard,
            voters,
            membership_log_index,
        } => {
            if *shard >= state.shards {
                return Err(Refusal::NoSuchShard { shard: *shard });
            }
            let s = *shard as usize;
            // In range for a checked state (`ClusterState::check`).
            let (Some(current), Some(&applied)) =
                (state.current.get(s), state.current_log_index.get(s))
            else {
                return Err(Refusal::NoSuchShard { shard: *shard });
            };
            if let Some(mv) = state
                .moves
                .get(shard)
                .filter(|mv| mv.phase != Phase::Planned)
            {
                return Err(Refusal::MoveInProgress {
                    shard: *shard,
                    phase: mv.phase,
                });
            }
            let reported: BTreeSet<NodeId> = voters.iter().copied().collect();
            let current: BTreeSet<NodeId> = current.iter().copied().collect();
            if reported != current || reported.len() != voters.len() {
                return Err(Refusal::WrongVoters { shard: *shard });
            }
            if *membership_log_index <= applied {
                return unchanged;
            }
            bump(state);
            if let Some(log_index) = state.current_log_index.get_mut(s) {
                *log_index = *membership_log_index;
            }
            finish(state)
        }
    }
}

fn check_bootstrap(
    shards: u32,
    replicas: u32,
    members: &BTreeMap<NodeId, String>,
) -> Result<(), Refusal> {
    let bad = |problem| Err(Refusal::BadBootstrap { problem });
    if members.is_empty() {
        return bad(BootstrapProblem::NoMembers);
    }
    if shards == 0 || shards > MAX_SHARDS {
        return bad(BootstrapProblem::Shards);
    }
    if replicas == 0 || replicas as usize > members.len() {
        return bad(BootstrapProblem::Replicas);
    }
    for (&id, addr) in members {
        if let Err(reason) = check_addr(addr) {
            return bad(BootstrapProblem::Addr { id, reason });
        }
        if members.range(..id).any(|(_, other)| other == addr) {
            return bad(BootstrapProblem::DuplicateAddr { id });
        }
    }
    Ok(())
}

fn bootstrap(
    state: &mut ClusterState,
    cluster_id: ClusterId,
    shards: u32,
    replicas: u32,
    members: &BTreeMap<NodeId, String>,
) {
    let placement = crate::placement::placement_over(members.keys().copied(), shards, replicas);
    *state = ClusterState {
        cluster_id,
        version: 1,
        shards,
        replicas,
        members: members
            .iter()
            .map(|(&id, addr)| {
                let member = Member {
                    addr: addr.clone(),
                    state: MemberState::Active,
                    since: 1,
                };
                (id, member)
            })
            .collect(),
        current: placement.clone(),
        placement,
        current_log_index: vec![0; shards as usize],
        moves: BTreeMap::new(),
        moves_done: 0,
        moves_base: 0,
    };
}

fn member_state(state: &ClusterState, id: NodeId) -> Result<MemberState, Refusal> {
    state
        .members
        .get(&id)
        .map(|m| m.state)
        .ok_or(Refusal::UnknownMember { id })
}

fn open_move(state: &ClusterState, shard: u32, move_id: u64) -> Result<&Move, Refusal> {
    if shard >= state.shards {
        return Err(Refusal::NoSuchShard { shard });
    }
    state
        .moves
        .get(&shard)
        .filter(|mv| mv.id == move_id)
        .ok_or(Refusal::StaleMove { shard, move_id })
}

/// Starts a change: the new version, which moves planned by it take as id.
fn bump(state: &mut ClusterState) -> u64 {
    state.version += 1;
    state.version
}

/// Sets a member's state at a new version.
fn set_state(state: &mut ClusterState, id: NodeId, to: MemberState) {
    let version = bump(state);
    if let Some(member) = state.members.get_mut(&id) {
        member.state = to;
        member.since = version;
    }
}

/// Ends a change: progress restarts from here once settled.
fn finish(state: &mut ClusterState) -> Result<Outcome, Refusal> {
    if state.settled() {
        state.moves_base = state.moves_done;
    }
    Ok(Outcome::Changed {
        version: state.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_is_a_uuid_in_one_format() {
        // What kv-node's uuid crate writes into cluster.json.
        let written = "5f0c1e2a-9b3d-4c7e-8f01-23456789abcd";
        let id: ClusterId = written.parse().unwrap();
        assert_eq!(id.to_string(), written);
        assert_eq!(id.0, 0x5f0c1e2a_9b3d_4c7e_8f01_23456789abcd);
        let bare: ClusterId = "5f0c1e2a9b3d4c7e8f0123456789abcd".parse().unwrap();
        assert_eq!(bare, id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{written}\""));
        assert_eq!(serde_json::from_str::<ClusterId>(&json).unwrap(), id);
        for bad in [
            "",
            "5f0c1e2a-9b3d-4c7e-8f01-23456789abc",
            "5f0c1e2a9-b3d-4c7e-8f01-23456789abcd",
            "5f0c1e2a-9b3d-4c7e-8f01-23456789abcg",
            "+f0c1e2a9b3d4c7e8f0123456789abcd",
        ] {
            assert_eq!(bad.parse::<ClusterId>(), Err(BadClusterId), "{bad:?}");
        }
    }
}
