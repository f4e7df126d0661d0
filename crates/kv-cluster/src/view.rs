//! The JSON a node shows of the cluster state (`docs/membership.md` §6, §8):
//! `GET /-/cluster` ([`ClusterView`]), its `?local` fan-out answer
//! ([`LocalProgress`]), and the issue-13 fields of `GET /-/shards`
//! ([`PlacementFields`]) with the `X-Kv-Placement-Version` header's name.
//!
//! Like [`crate::ShardsView`], these live here because node, proxy, bench
//! and the test harness must agree on them field for field. Optional fields
//! are `null` when unknown, never absent, and every field a later build adds
//! must be `#[serde(default)]` so older readers and newer writers get along.
//!
//! `/-/shards` keeps its [`crate::ShardsView`] shape; a node that runs the
//! metadata group adds the [`PlacementFields`] (`version`, `member_states`,
//! `moving`) to the same JSON object with [`shards_body`], and a client reads
//! them with [`PlacementFields::parse`] from the same body. They are not
//! fields of `ShardsView` yet only so that crates building a `ShardsView`
//! literal (kv-node, kv-testkit) compile unchanged while issue 13 is built in
//! parallel; `#[serde(flatten)]` is not used because serde's flatten cannot
//! read `ShardsView`'s integer map keys back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{meta_voters, ClusterId, ClusterState, MemberState, NodeId, Phase};
use crate::table::ShardsView;

/// Response header carrying the answering node's placement version: a client
/// holding an older one refreshes its table (§6).
pub const PLACEMENT_VERSION_HEADER: &str = "x-kv-placement-version";

/// The body of `GET /-/cluster` (§8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The cluster's id.
    pub cluster_id: ClusterId,
    /// The placement version of the answering node's applied state.
    pub version: u64,
    /// The answering node.
    pub node_id: NodeId,
    /// The metadata group's leader, if known.
    pub meta_leader: Option<NodeId>,
    /// Shards.
    pub shards: u32,
    /// Replicas per shard.
    pub replicas: u32,
    /// No open move, nobody joining or leaving.
    pub settled: bool,
    /// Every member, removed ones included, by id.
    pub members: Vec<MemberView>,
    /// Move counts since the last settled state.
    pub moves: MoveCounts,
    /// The moves being copied or in their joint step, by shard.
    pub active: Vec<MoveView>,
}

/// A member in a [`ClusterView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Its id.
    pub id: NodeId,
    /// Its address.
    pub addr: String,
    /// Where it is in its life.
    pub state: MemberState,
    /// Its role in the metadata group.
    pub meta: MetaRole,
    /// Shards it holds or is receiving (current voter or a move's `add`).
    pub shards_hosted: u32,
    /// Shards it leads, as far as the answering node knows.
    pub shards_led: u32,
}

/// A member's role in the metadata group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetaRole {
    /// One of [`meta_voters`].
    Voter,
    /// Applies the state without voting.
    Learner,
    /// Removed.
    None,
}

/// Progress counts (§8): `done / total` is monotone within one change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveCounts {
    /// Moves finished plus open since the state was last settled.
    pub total: u64,
    /// Finished since then.
    pub done: u64,
    /// Open, copying.
    pub copying: u64,
    /// Open, in the joint step.
    pub joint: u64,
    /// Open, waiting for admission.
    pub planned: u64,
}

/// An admitted move in a [`ClusterView`], with its executor's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveView {
    /// The shard.
    pub shard: u32,
    /// The move's id.
    pub move_id: u64,
    /// The member gaining the replica.
    pub add: NodeId,
    /// The member losing it.
    pub remove: NodeId,
    /// `copying` or `joint`.
    pub phase: Phase,
    /// The shard's leader (the executor), if known.
    pub leader: Option<NodeId>,
    /// Bytes sent to the learner so far.
    pub bytes: Option<u64>,
    /// Bytes to send (the snapshot's size).
    pub total_bytes: Option<u64>,
    /// `bytes / total_bytes` in whole percent, at most 100.
    pub percent: Option<u8>,
    /// Why it has not advanced for a while, if it has not.
    pub stalled: Option<String>,
}

/// One move's progress as its executor knows it: the `GET /-/cluster?local`
/// answer is a list of these, merged into [`MoveView`]s by the node that
/// answers the full view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveProgress {
    /// The shard.
    pub shard: u32,
    /// The move's id.
    pub move_id: u64,
    /// Bytes sent to the learner so far.
    pub bytes: Option<u64>,
    /// Bytes to send.
    pub total_bytes: Option<u64>,
    /// Why it waits, if it has waited long.
    pub stalled: Option<String>,
}

/// The body of `GET /-/cluster?local`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalProgress {
    /// The answering node.
    pub node_id: NodeId,
    /// Its applied placement version.
    pub version: u64,
    /// The moves it executes (it leads their shards).
    pub moves: Vec<MoveProgress>,
}

/// What the answering node knows besides the state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeKnowledge {
    /// The answering node.
    pub node_id: NodeId,
    /// The metadata group's leader.
    pub meta_leader: Option<NodeId>,
    /// Per shard, its leader if known (missing or short: unknown).
    pub leaders: Vec<Option<NodeId>>,
    /// Executors' progress, from `?local` answers.
    pub progress: Vec<MoveProgress>,
    /// The metadata group's voters in the membership the answering node
    /// knows; `None` shows [`meta_voters`] of the state. The two differ
    /// until the metadata leader changes its own group's voters (not done
    /// in M3a), and a view must not claim voters that cannot vote.
    pub meta_voters: Option<std::collections::BTreeSet<NodeId>>,
}

impl ClusterView {
    /// The view of `state` from a node that knows `known`.
    pub fn new(state: &ClusterState, known: &NodeKnowledge) -> Self {
        let voters = known
            .meta_voters
            .clone()
            .unwrap_or_else(|| meta_voters(state));
        let leader_of = |shard: u32| known.leaders.get(shard as usize).copied().flatten();
        let members = state
            .members
            .iter()
            .map(|(&id, member)| MemberView {
                id,
                addr: member.addr.clone(),
                state: member.state,
                meta: if voters.contains(&id) {
                    MetaRole::Voter
                } else if member.state == MemberState::Removed {
                    MetaRole::None
                } else {
                    MetaRole::Learner
                },
                shards_hosted: (0..state.shards)
                    .filter(|&shard| state.hosts(shard).contains(&id))
                    .count() as u32,
                shards_led: (0..state.shards)
                    .filter(|&shard| leader_of(shard) == Some(id))
                    .count() as u32,
            })
            .collect();
        let mut moves = MoveCounts {
            done: state.moves_done.saturating_sub(state.moves_base),
            ..MoveCounts::default()
        };
        let mut active = Vec::new();
        for (&shard, mv) in &state.moves {
            match mv.phase {
                Phase::Planned => moves.planned += 1,
                Phase::Copying => moves.copying += 1,
                Phase::Joint => moves.joint += 1,
            }
            if mv.phase == Phase::Planned {
                continue;
            }
            let progress = known
                .progress
                .iter()
                .find(|p| p.shard == shard && p.move_id == mv.id);
            let bytes = progress.and_then(|p| p.bytes);
            let total_bytes = progress.and_then(|p| p.total_bytes);
            active.push(MoveView {
                shard,
                move_id: mv.id,
                add: mv.add,
                remove: mv.remove,
                phase: mv.phase,
                leader: leader_of(shard),
                bytes,
                total_bytes,
                percent: percent(bytes, total_bytes),
                stalled: progress.and_then(|p| p.stalled.clone()),
            });
        }
        moves.total = moves.done + moves.planned + moves.copying + moves.joint;
        Self {
            cluster_id: state.cluster_id,
            version: state.version,
            node_id: known.node_id,
            meta_leader: known.meta_leader,
            shards: state.shards,
            replicas: state.replicas,
            settled: state.settled(),
            members,
            moves,
            active,
        }
    }
}

fn percent(bytes: Option<u64>, total: Option<u64>) -> Option<u8> {
    match (bytes, total) {
        (Some(bytes), Some(total)) if total > 0 => {
            Some((u128::from(bytes.min(total)) * 100 / u128::from(total)) as u8)
        }
        (Some(_), Some(_)) => Some(100),
        _ => None,
    }
}

/// The issue-13 fields of `GET /-/shards` (§6), in the same JSON object as
/// the [`ShardsView`] (module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementFields {
    /// The cluster's id (`null` from a node that does not know it yet, or
    /// predates it): a client keys the version by it, so a cluster created
    /// again at the same addresses (versions restart at 1) is told apart
    /// from the one it replaced (`crate::ShardTable::merge`).
    #[serde(default)]
    pub cluster_id: Option<ClusterId>,
    /// The placement version (`null` from a node that predates issue 13).
    #[serde(default)]
    pub version: Option<u64>,
    /// Member id → state, for the members listed in `members`.
    #[serde(default)]
    pub member_states: BTreeMap<NodeId, MemberState>,
    /// Shard → its open move (JSON keys are the shard numbers as strings).
    #[serde(default)]
    pub moving: BTreeMap<u32, Moving>,
}

/// A shard's open move as `/-/shards` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moving {
    /// The member gaining a replica.
    pub add: NodeId,
    /// The member losing one.
    pub remove: NodeId,
    /// How far it got.
    pub phase: Phase,
}

impl PlacementFields {
    /// The fields of `state`: its version, the states of the members clients
    /// may route to, and the open moves.
    pub fn new(state: &ClusterState) -> Self {
        Self {
            cluster_id: (!state.is_empty()).then_some(state.cluster_id),
            version: (!state.is_empty()).then_some(state.version),
            member_states: state
                .members
                .iter()
                .filter(|(_, m)| m.state != MemberState::Removed)
                .map(|(&id, m)| (id, m.state))
                .collect(),
            moving: state
                .moves
                .iter()
                .map(|(&shard, mv)| {
                    let moving = Moving {
                        add: mv.add,
                        remove: mv.remove,
                        phase: mv.phase,
                    };
                    (shard, moving)
                })
                .collect(),
        }
    }

    /// Reads the fields from a `/-/shards` body (absent ones default).
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// The `/-/shards` body: `view`'s JSON object with `placement`'s fields
/// added. Old clients parse it as a [`ShardsView`] and ignore the rest.
pub fn shards_body(view: &ShardsView, placement: &PlacementFields) -> Vec<u8> {
    let mut object = match serde_json::to_value(view) {
        Ok(serde_json::Value::Object(object)) => object,
        // A struct always serialises to an object.
        _ => serde_json::Map::new(),
    };
    if let Ok(serde_json::Value::Object(extra)) = serde_json::to_value(placement) {
        object.extend(extra);
    }
    serde_json::to_vec(&object).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{apply, MetaCommand};
    use crate::spec::ClusterSpec;
    use crate::table::GroupView;

    fn state() -> ClusterState {
        let spec = ClusterSpec::new(
            1,
            "1=127.0.0.1:8081,2=127.0.0.1:8082,3=127.0.0.1:8083",
            Some(8),
            Some(3),
        )
        .unwrap();
        let mut state = ClusterState::from_spec(&spec, ClusterId(0x5f0c));
        let add = MetaCommand::AddMember {
            id: 4,
            addr: "127.0.0.1:8084".into(),
        };
        apply(&mut state, &add).unwrap();
        apply(&mut state, &MetaCommand::Activate { id: 4 }).unwrap();
        let (&shard, mv) = state.moves.iter().next().unwrap();
        let admit = MetaCommand::Admit {
            shard,
            move_id: mv.id,
        };
        apply(&mut state, &admit).unwrap();
        state
    }

    #[test]
    fn cluster_view_counts_and_round_trips() {
        let state = state();
        let shard = *state.moves.keys().next().unwrap();
        let move_id = state.moves[&shard].id;
        let known = NodeKnowledge {
            node_id: 1,
            meta_leader: Some(2),
            leaders: vec![Some(1); 8],
            progress: vec![MoveProgress {
                shard,
                move_id,
                bytes: Some(1_048_576),
                total_bytes: Some(2_203_648),
                stalled: None,
            }],
            meta_voters: None,
        };
        let view = ClusterView::new(&state, &known);
        assert_eq!(view.version, state.version);
        assert!(!view.settled);
        assert_eq!(view.moves.copying, 1);
        assert_eq!(view.moves.planned as usize, state.moves.len() - 1);
        assert_eq!(view.moves.total as usize, state.moves.len());
        assert_eq!(view.active.len(), 1);
        assert_eq!(view.active[0].percent, Some(47));
        assert_eq!(view.members.len(), 4);
        assert_eq!(view.members[0].meta, MetaRole::Voter);
        assert_eq!(view.members[3].meta, MetaRole::Learner);
        assert_eq!(view.members[0].shards_led, 8);
        let hosted: u32 = view.members.iter().map(|m| m.shards_hosted).sum();
        assert_eq!(
            hosted as usize,
            8 * 3 + state.moves.len(),
            "current voters plus each move's learner"
        );

        let json = serde_json::to_string(&view).unwrap();
        assert!(json.contains(r#""cluster_id":"00000000-0000-0000-0000-000000005f0c""#));
        assert!(json.contains(r#""state":"active""#));
        assert!(json.contains(r#""phase":"copying""#));
        assert!(json.contains(r#""stalled":null"#));
        let back: ClusterView = serde_json::from_str(&json).unwrap();
        assert_eq!(back, view);

        let local = LocalProgress {
            node_id: 1,
            version: 9,
            moves: known.progress.clone(),
        };
        let json = serde_json::to_string(&local).unwrap();
        assert_eq!(serde_json::from_str::<LocalProgress>(&json).unwrap(), local);
    }

    #[test]
    fn percent_is_bounded() {
        assert_eq!(percent(Some(5), Some(10)), Some(50));
        assert_eq!(percent(Some(50), Some(10)), Some(100));
        assert_eq!(percent(Some(0), Some(0)), Some(100));
        assert_eq!(percent(None, Some(10)), None);
        assert_eq!(percent(Some(u64::MAX), Some(u64::MAX)), Some(100));
    }

    #[test]
    fn shards_body_adds_fields_old_clients_ignore() {
        let state = state();
        let view = ShardsView {
            shards: 8,
            replicas: 3,
            node_id: 1,
            members: state.addresses(),
            groups: (0..8u32)
                .map(|shard| GroupView {
                    shard,
                    replicas: state.current[shard as usize].clone(),
                    preferred_leader: state.current[shard as usize][0],
                    leader: None,
                    term: None,
                    committed: None,
                    applied: None,
                    snapshot: None,
                    purged: None,
                    hosted: true,
                })
                .collect(),
        };
        let fields = PlacementFields::new(&state);
        let body = shards_body(&view, &fields);
        assert_eq!(ShardsView::parse(&body).unwrap(), view, "old readers");
        let back = PlacementFields::parse(&body).unwrap();
        assert_eq!(back, fields);
        assert_eq!(back.version, Some(state.version));
        assert_eq!(back.cluster_id, Some(ClusterId(0x5f0c)));
        assert!(
            String::from_utf8_lossy(&body)
                .contains(r#""cluster_id":"00000000-0000-0000-0000-000000005f0c""#),
            "the id as GET /-/cluster writes it"
        );
        assert_eq!(back.moving.len(), state.moves.len());
        assert_eq!(back.member_states[&4], MemberState::Active);
        // A body from an older node has none of them.
        let old = serde_json::to_vec(&view).unwrap();
        assert_eq!(
            PlacementFields::parse(&old).unwrap(),
            PlacementFields::default()
        );
    }
}
