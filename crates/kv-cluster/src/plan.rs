//! Placement recomputation, the move planner and the scheduler's decisions
//! (`docs/membership.md` §4.2, §4.3, §4.6).
//!
//! **Replan** ([`replan`], run by [`crate::meta::apply`] whenever the set of
//! `Active` members changes or a move finishes): the placement becomes the
//! ring over the active ids ([`crate::placement_over`]); then every shard
//! whose `current` voters differ from its placement gets **one** planned
//! swap: the first placement member (ring order) not yet a voter comes in,
//! a voter outside the placement goes out (a `Leaving` one first, else the
//! last in ring order). A shard two swaps away (two changes at once) gets its
//! second move when the first is `Done`, so a group's voters only ever change
//! one at a time.
//!
//! An open move stays while it still leads towards the placement (its `add`
//! is placed and its `remove` is not). One that no longer does is replaced
//! by the move from `current`, or dropped when `current` is already placed,
//! but only up to `Copying`: a move in `Joint` goes forward to its goal
//! whatever happens (the group may already be uniform at the goal with the
//! `Done` not yet applied, so the state cannot know whether "back" is one
//! membership step or two), and the replan after its `Done` repairs the rest.
//! The doc's §4.6 had joint moves turned back; see its "as built" note.
//!
//! **Schedule** ([`schedule`], the metadata leader, after each applied
//! state): `Activate` for joiners whose metadata replica caught up, `Admit`
//! for planned moves in shard order while fewer than `max_moves` are
//! `Copying`/`Joint` (at most `max_incoming` at a time into one member, and
//! only into a member that is live), `Forget` for leaving members that hold
//! nothing. It only proposes: [`crate::meta::apply`] validates each command
//! again, so a decision made from a stale state is refused, not harmful.

use std::collections::{BTreeMap, BTreeSet};

use crate::meta::{ClusterState, MemberState, MetaCommand, Move, NodeId, Phase};
use crate::placement::placement_over;

/// Moves admitted at a time cluster-wide when `--max-moves` is not given.
pub const DEFAULT_MAX_MOVES: u32 = 2;
/// Moves admitted at a time into one member (one incoming snapshot, §4.3).
pub const DEFAULT_MAX_INCOMING: u32 = 1;

/// The ring's placement over the state's `Active` members.
pub fn target_placement(state: &ClusterState) -> Vec<Vec<NodeId>> {
    placement_over(state.active(), state.shards, state.replicas)
}

/// Replica slots that differ between two placements: `Σ |to[s] \ from[s]|`,
/// the number of one-swap moves that take `from` to `to` (§4.2's figures).
pub fn replicas_to_move(from: &[Vec<NodeId>], to: &[Vec<NodeId>]) -> usize {
    from.iter()
        .zip(to)
        .map(|(old, new)| new.iter().filter(|id| !old.contains(id)).count())
        .sum()
}

/// The next swap from `current` towards `target`: `(add, remove, goal)`, or
/// `None` when they hold the same members. `leaving` members go out first.
/// The goal keeps `current`'s order with `add` in `remove`'s slot, or is
/// `target` itself (ring order) when it reaches it.
pub fn next_swap(
    current: &[NodeId],
    target: &[NodeId],
    leaving: &BTreeSet<NodeId>,
) -> Option<(NodeId, NodeId, Vec<NodeId>)> {
    let add = target.iter().copied().find(|id| !current.contains(id))?;
    let outside: Vec<NodeId> = current
        .iter()
        .copied()
        .filter(|id| !target.contains(id))
        .collect();
    let remove = outside
        .iter()
        .copied()
        .find(|id| leaving.contains(id))
        .or_else(|| outside.last().copied())?;
    let mut goal: Vec<NodeId> = current
        .iter()
        .map(|&id| if id == remove { add } else { id })
        .collect();
    if same_members(&goal, target) {
        goal = target.to_vec();
    }
    Some((add, remove, goal))
}

fn same_members(a: &[NodeId], b: &[NodeId]) -> bool {
    a.len() == b.len() && a.iter().all(|id| b.contains(id))
}

/// Recomputes the placement and the open moves (module docs). Moves it plans
/// take the state's version as id, so call it after the version was bumped.
pub(crate) fn replan(state: &mut ClusterState) {
    state.placement = target_placement(state);
    let leaving: BTreeSet<NodeId> = state.with_state(MemberState::Leaving).collect();
    for shard in 0..state.shards {
        let s = shard as usize;
        // Both have a row per shard (`target_placement`, `ClusterState::check`).
        let (Some(current), Some(target)) = (state.current.get(s), state.placement.get(s)) else {
            continue;
        };
        if let Some(open) = state.moves.get(&shard) {
            let useful = target.contains(&open.add) && !target.contains(&open.remove);
            if open.phase == Phase::Joint || useful {
                continue;
            }
        }
        match next_swap(current, target, &leaving) {
            Some((add, remove, goal)) => {
                state.moves.insert(
                    shard,
                    Move {
                        id: state.version,
                        add,
                        remove,
                        goal,
                        phase: Phase::Planned,
                    },
                );
            }
            None => {
                state.moves.remove(&shard);
                if let (Some(current), Some(target)) =
                    (state.current.get_mut(s), state.placement.get(s))
                {
                    if current != target {
                        // Same members, another order (ring order changes as
                        // members come and go): adopt the ring's order, which
                        // preferred leaders break ties by. No group changes.
                        current.clone_from(target);
                    }
                }
            }
        }
    }
}

/// The scheduler's throttle (`--max-moves`, §4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Moves `Copying` or `Joint` at a time, cluster-wide (at least 1 is used).
    pub max_moves: u32,
    /// Moves `Copying` or `Joint` at a time into one member.
    pub max_incoming: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_moves: DEFAULT_MAX_MOVES,
            max_incoming: DEFAULT_MAX_INCOMING,
        }
    }
}

/// What the metadata leader observes that the state does not hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveInfo {
    /// Members whose metadata replica matched the leader's last log index
    /// (from the metadata group's `metrics.replication`).
    pub meta_caught_up: BTreeSet<NodeId>,
    /// Members heard from recently (a move into any other one is not
    /// admitted: it would hold a slot of the throttle copying to nobody).
    pub live: BTreeSet<NodeId>,
}

/// The commands the metadata leader should propose now (module docs), in
/// order: activations, admissions, forgets. Re-run after each applied state.
pub fn schedule(state: &ClusterState, settings: Settings, live: &LiveInfo) -> Vec<MetaCommand> {
    let mut out = Vec::new();
    if state.is_empty() {
        return out;
    }
    for id in state.with_state(MemberState::Joining) {
        if live.meta_caught_up.contains(&id) {
            out.push(MetaCommand::Activate { id });
        }
    }
    let mut running = 0u32;
    let mut incoming: BTreeMap<NodeId, u32> = BTreeMap::new();
    for mv in state.moves.values() {
        if mv.phase != Phase::Planned {
            running += 1;
            *incoming.entry(mv.add).or_default() += 1;
        }
    }
    let max_moves = settings.max_moves.max(1);
    let max_incoming = settings.max_incoming.max(1);
    for (&shard, mv) in &state.moves {
        if running >= max_moves {
            break;
        }
        let into = incoming.get(&mv.add).copied().unwrap_or(0);
        if mv.phase == Phase::Planned && into < max_incoming && live.live.contains(&mv.add) {
            out.push(MetaCommand::Admit {
                shard,
                move_id: mv.id,
            });
            running += 1;
            incoming.insert(mv.add, into + 1);
        }
    }
    for id in state.with_state(MemberState::Leaving) {
        if state.holds(id).is_none() {
            out.push(MetaCommand::Forget { id });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{apply, ClusterId, Outcome};
    use crate::spec::ClusterSpec;

    fn spec(members: u64, shards: u32, replicas: u32) -> ClusterSpec {
        ClusterSpec {
            node_id: 1,
            shards,
            replicas,
            members: (1..=members)
                .map(|id| (id, format!("127.0.0.1:{}", 8080 + id)))
                .collect(),
        }
    }

    fn state(members: u64, shards: u32, replicas: u32) -> ClusterState {
        ClusterState::from_spec(&spec(members, shards, replicas), ClusterId(7))
    }

    fn add_and_activate(state: &mut ClusterState, id: NodeId) {
        let addr = format!("127.0.0.1:{}", 8080 + id);
        apply(state, &MetaCommand::AddMember { id, addr }).unwrap();
        apply(state, &MetaCommand::Activate { id }).unwrap();
    }

    /// §4.2's table, recomputed: every figure of the doc from the code.
    #[test]
    fn moved_replicas_match_the_design_figures() {
        for (members, shards, replicas, moved) in [
            (3u64, 64u32, 3u32, 47usize),
            (3, 256, 3, 190),
            (3, 64, 2, 34),
            (4, 64, 3, 36),
            (5, 64, 3, 33),
            (9, 64, 3, 16),
        ] {
            let mut s = state(members, shards, replicas);
            add_and_activate(&mut s, members + 1);
            assert_eq!(s.moves.len(), moved, "{members} -> {}", members + 1);
            assert_eq!(replicas_to_move(&s.current, &s.placement), moved);
            assert_eq!(
                s.placement,
                placement_over(1..=members + 1, shards, replicas)
            );
        }
        let moved: Vec<usize> = (1..=4)
            .map(|id| {
                let mut s = state(4, 64, 3);
                apply(&mut s, &MetaCommand::Leave { id }).unwrap();
                s.moves.len()
            })
            .collect();
        // The doc's "remove 1 of 4: 48" is node 1; ideal 64·3/4 = 48 each.
        assert_eq!(moved, vec![48, 48, 49, 47], "remove node 1, 2, 3 or 4 of 4");
    }

    /// Adding or removing one member changes each shard by at most one swap,
    /// and every planned move is exactly that swap.
    #[test]
    fn a_replan_is_one_swap_per_shard() {
        let mut s = state(3, 64, 3);
        add_and_activate(&mut s, 4);
        for (&shard, mv) in &s.moves {
            let current = &s.current[shard as usize];
            assert_eq!(mv.add, 4);
            assert!(current.contains(&mv.remove) && !current.contains(&mv.add));
            assert_eq!(mv.goal, s.placement[shard as usize], "one swap reaches it");
            assert_eq!(mv.phase, Phase::Planned);
            assert_eq!(mv.id, s.version);
        }
        let untouched = (0..64u32).filter(|shard| !s.moves.contains_key(shard));
        for shard in untouched {
            let s_ = shard as usize;
            assert_eq!(s.current[s_], s.placement[s_]);
        }
    }

    #[test]
    fn next_swap_prefers_leaving_members_and_keeps_order() {
        let leaving: BTreeSet<NodeId> = [2].into();
        // Two out (2, 3), two in (4, 5): the leaving one goes first, the
        // first placed newcomer comes in, in its slot.
        let (add, remove, goal) = next_swap(&[1, 2, 3], &[4, 1, 5], &leaving).unwrap();
        assert_eq!((add, remove), (4, 2));
        assert_eq!(goal, vec![1, 4, 3]);
        let (add, remove, goal) = next_swap(&goal, &[4, 1, 5], &leaving).unwrap();
        assert_eq!((add, remove), (5, 3));
        assert_eq!(goal, vec![4, 1, 5], "the last swap adopts ring order");
        assert_eq!(next_swap(&[1, 2, 3], &[3, 2, 1], &leaving), None);
    }

    #[test]
    fn concurrent_adds_take_two_swaps_one_at_a_time() {
        let mut s = state(3, 64, 3);
        add_and_activate(&mut s, 4);
        add_and_activate(&mut s, 5);
        let two_away: Vec<u32> = (0..64u32)
            .filter(|&shard| {
                let s_ = shard as usize;
                s.placement[s_]
                    .iter()
                    .filter(|id| !s.current[s_].contains(id))
                    .count()
                    == 2
            })
            .collect();
        assert!(!two_away.is_empty(), "some shard gains both 4 and 5");
        for shard in two_away {
            let mv = &s.moves[&shard];
            let current = &s.current[shard as usize];
            let changed = mv.goal.iter().filter(|id| !current.contains(id)).count();
            assert_eq!(changed, 1, "shard {shard}: one swap at a time");
        }
    }

    #[test]
    fn removing_a_joining_node_cancels_its_moves_but_not_joint_ones() {
        let mut s = state(3, 64, 3);
        add_and_activate(&mut s, 4);
        let shards: Vec<u32> = s.moves.keys().copied().collect();
        let (copying, joint) = (shards[0], shards[1]);
        for shard in [copying, joint] {
            let move_id = s.moves[&shard].id;
            apply(&mut s, &MetaCommand::Admit { shard, move_id }).unwrap();
        }
        let move_id = s.moves[&joint].id;
        let phase = Phase::Joint;
        let cmd = MetaCommand::Phase {
            shard: joint,
            move_id,
            phase,
        };
        apply(&mut s, &cmd).unwrap();
        let joint_move = s.moves[&joint].clone();

        apply(&mut s, &MetaCommand::Leave { id: 4 }).unwrap();
        assert_eq!(s.members[&4].state, MemberState::Leaving);
        assert_eq!(s.moves.len(), 1, "only the joint move is left");
        assert_eq!(s.moves[&joint], joint_move, "a joint move goes forward");
        assert!(!s.moves.contains_key(&copying));

        // Its Done replans the shard: a move takes 4 out again.
        let cmd = MetaCommand::Done {
            shard: joint,
            move_id,
            voters: joint_move.goal.clone(),
            membership_log_index: 10,
        };
        apply(&mut s, &cmd).unwrap();
        let back = &s.moves[&joint];
        assert_eq!((back.add, back.remove), (joint_move.remove, 4));
        assert_eq!(s.current_log_index[joint as usize], 10);
    }

    #[test]
    fn schedule_activates_admits_within_the_throttle_and_forgets() {
        let mut s = state(3, 64, 3);
        let addr = "127.0.0.1:8084".to_owned();
        apply(&mut s, &MetaCommand::AddMember { id: 4, addr }).unwrap();
        let mut live = LiveInfo {
            meta_caught_up: BTreeSet::new(),
            live: (1..=4).collect(),
        };
        assert!(schedule(&s, Settings::default(), &live).is_empty());
        live.meta_caught_up.insert(4);
        assert_eq!(
            schedule(&s, Settings::default(), &live),
            vec![MetaCommand::Activate { id: 4 }]
        );
        apply(&mut s, &MetaCommand::Activate { id: 4 }).unwrap();

        // Every move goes into 4: one at a time into it, whatever max_moves.
        let wide = Settings {
            max_moves: 8,
            max_incoming: 1,
        };
        let cmds = schedule(&s, wide, &live);
        let first = *s.moves.keys().next().unwrap();
        let move_id = s.moves[&first].id;
        assert_eq!(
            cmds,
            vec![MetaCommand::Admit {
                shard: first,
                move_id
            }]
        );
        let cmds = schedule(
            &s,
            Settings {
                max_moves: 2,
                max_incoming: 4,
            },
            &live,
        );
        assert_eq!(cmds.len(), 2, "max_moves bounds admissions");
        for cmd in &cmds {
            apply(&mut s, cmd).unwrap();
        }
        assert!(schedule(
            &s,
            Settings {
                max_moves: 2,
                max_incoming: 4
            },
            &live
        )
        .is_empty());

        // A dead joiner gets nothing admitted.
        live.live.remove(&4);
        assert!(schedule(&s, wide, &live).is_empty());

        // A leaving member holding nothing is forgotten.
        let mut s = state(4, 8, 3);
        apply(&mut s, &MetaCommand::Leave { id: 4 }).unwrap();
        assert!(!schedule(&s, Settings::default(), &LiveInfo::default())
            .contains(&MetaCommand::Forget { id: 4 }));
        s.moves.clear();
        for row in &mut s.current {
            row.retain(|&id| id != 4);
        }
        assert_eq!(
            schedule(&s, Settings::default(), &LiveInfo::default()),
            vec![MetaCommand::Forget { id: 4 }]
        );
        assert!(matches!(
            apply(&mut s, &MetaCommand::Forget { id: 4 }),
            Ok(Outcome::Changed { .. })
        ));
    }
}
