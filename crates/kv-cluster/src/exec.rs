//! The executor's decision for one shard: what its leader does next
//! (`docs/membership.md` §4.4), and when a replica that left may drop its
//! copy (§5).
//!
//! [`next_step`] is a pure function of the shard's entry in the cluster state
//! ([`ShardWork`]), the group's membership as the leader sees it
//! ([`GroupMembership`]), the leader's replication progress
//! ([`Replication`]) and the node's id. Nothing is remembered between calls:
//! kv-node calls it in a loop (woken by the metadata watch and the group's
//! metrics), performs the one [`Step`] it returns, and calls it again, so a
//! restarted node or a new leader resumes from whatever the logs say.
//!
//! The order of checks is the design's: a committed membership first; then
//! stray learners out; then the learner in, only after the leader purged its
//! log past the membership (the learner starts from a snapshot and never
//! replays a configuration in which it was a voter: open question 10); catch
//! up; leadership handed over by a leader that is not in the goal; at least
//! `replicas − 1` live copies in the goal; the joint step; the goal; `Done`.
//!
//! **A stale metadata view is harmless.** The node's applied metadata state
//! may lag the metadata leader's. Every step that reports goes through the
//! metadata group, which refuses a move that is no longer open. The joint
//! step, the only one that commits the group to the move, is gated by such a
//! proposal ([`Step::Joint`]): the caller appends the joint membership only if
//! the metadata group accepted `Phase { Joint }` for this very move just
//! before, so an executor whose view still shows an old move cannot redo it.
//! Every membership change is also compare-and-set on the membership log id
//! the step was computed from (`Precondition::LastMembershipLogId`).

use std::collections::{BTreeMap, BTreeSet};

use crate::meta::{ClusterState, MetaCommand, Move, NodeId, Phase};

/// A learner is caught up when its matched index is within this many entries
/// of the leader's last log index (and at least the membership's index).
pub const CATCH_UP_SLACK: u64 = 64;

/// One shard's entry in the applied cluster state: what the executor works
/// towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardWork<'a> {
    /// The shard.
    pub shard: u32,
    /// Replicas per shard.
    pub replicas: u32,
    /// The voters when its last move finished.
    pub current: &'a [NodeId],
    /// The log index of the membership that made `current`.
    pub current_log_index: u64,
    /// Its open move, if any.
    pub open: Option<&'a Move>,
}

impl ClusterState {
    /// The executor's input for `shard`; `None` for a shard that does not exist.
    pub fn work(&self, shard: u32) -> Option<ShardWork<'_>> {
        let s = shard as usize;
        Some(ShardWork {
            shard,
            replicas: self.replicas,
            current: self.current.get(s)?,
            current_log_index: *self.current_log_index.get(s)?,
            open: self.moves.get(&shard),
        })
    }
}

/// A group's effective membership as its leader sees it (openraft's
/// `metrics.membership_config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMembership {
    /// Log index of the membership entry (`StoredMembership::log_id`).
    pub log_index: u64,
    /// Whether that entry is committed in the leader's view
    /// (`local_committed ≥ log_index`).
    pub committed: bool,
    /// Voter sets: one (uniform) or two (joint: old, new).
    pub configs: Vec<BTreeSet<NodeId>>,
    /// Learners (nodes that are not voters).
    pub learners: BTreeSet<NodeId>,
}

impl GroupMembership {
    /// A committed uniform membership of `voters`, no learners.
    pub fn uniform(log_index: u64, voters: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            log_index,
            committed: true,
            configs: vec![voters.into_iter().collect()],
            learners: BTreeSet::new(),
        }
    }

    /// Every voter of every config.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.configs.iter().flatten().copied().collect()
    }

    /// Whether this is a joint membership.
    pub fn is_joint(&self) -> bool {
        self.configs.len() > 1
    }

    /// The voters when uniform.
    fn uniform_voters(&self) -> Option<&BTreeSet<NodeId>> {
        match self.configs.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }
}

/// The leader's replication progress (openraft's `metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replication {
    /// Whether this node leads the group. Only a leader executes.
    pub leading: bool,
    /// The leader's last log index.
    pub last_log_index: u64,
    /// The leader's purged index (`None`: nothing purged yet).
    pub purged: Option<u64>,
    /// Per target (voters other than the leader, and learners), the highest
    /// log index known replicated (`metrics.replication`).
    pub matched: BTreeMap<NodeId, Option<u64>>,
    /// Targets that acknowledged within the last `election_timeout_max`.
    pub live: BTreeSet<NodeId>,
}

/// Why the executor waits (shown as a move's `stalled` reason when long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// This node does not lead the group.
    NotLeader,
    /// The membership entry is not committed yet (`InProgress` otherwise).
    Committed,
    /// The move is planned, not admitted.
    Admission,
    /// The learner has not caught up.
    CatchUp {
        /// The learner.
        id: NodeId,
        /// Its matched index.
        matched: Option<u64>,
        /// The index it must reach.
        target: u64,
    },
    /// This node must hand leadership over, and no voter of the goal is live
    /// and caught up.
    HandOverTarget,
    /// Fewer than `replicas − 1` live copies in the goal.
    LiveCopies {
        /// Live, caught-up members of the goal.
        live: u32,
        /// `replicas − 1`.
        needed: u32,
    },
    /// The group's membership is neither the state's current voters, the
    /// joint towards the move's goal, nor the goal: this node's metadata view
    /// is behind, or something is wrong; it waits for a newer state.
    Membership,
}

/// What the leader does next for a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// Wait, and call again on the next change.
    Wait(Wait),
    /// Remove learners no move wants: `change_membership(RemoveNodes(ids),
    /// false)` with the precondition.
    RemoveLearners {
        /// The learners.
        ids: BTreeSet<NodeId>,
    },
    /// Propose this to the metadata group (a report: `LearnersRemoved` or
    /// `Done`, or `Phase` on the way to the joint step is [`Step::Joint`]).
    Propose(MetaCommand),
    /// `trigger().snapshot()` then `purge_log` up to it: the learner must
    /// start from a snapshot newer than the membership's log index.
    PurgeLog {
        /// The purged index must reach this (the membership's log index).
        through: u64,
    },
    /// `add_learner(id, BasicNode { addr }, false)`.
    AddLearner {
        /// The learner.
        id: NodeId,
    },
    /// `trigger().transfer_leader(to)`, then stop: the new leader continues.
    HandOver {
        /// A live, caught-up voter of both the membership and the goal.
        to: NodeId,
    },
    /// Propose `command` (`Phase { Joint }` for this move) and, only if it is
    /// applied (changed or unchanged), append the joint membership `[old,
    /// new]` (`append_membership`, blank payload, the precondition).
    Joint {
        /// The proposal that gates the joint entry.
        command: MetaCommand,
        /// The current voters.
        old: Vec<NodeId>,
        /// The goal.
        new: Vec<NodeId>,
    },
    /// `change_membership_if(goal, false, precondition)`: from the joint
    /// membership to the uniform goal in one entry.
    ToGoal {
        /// The goal.
        goal: Vec<NodeId>,
    },
}

fn as_set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

/// The next step for `work`'s shard on node `me` (module docs).
pub fn next_step(
    work: &ShardWork<'_>,
    membership: &GroupMembership,
    replication: &Replication,
    me: NodeId,
) -> Step {
    if !replication.leading {
        return Step::Wait(Wait::NotLeader);
    }
    if !membership.committed {
        return Step::Wait(Wait::Committed);
    }
    let current = as_set(work.current);
    let active = work.open.filter(|mv| mv.phase != Phase::Planned);
    let wanted_learner = work.open.map(|mv| mv.add);
    let stray: BTreeSet<NodeId> = membership
        .learners
        .iter()
        .copied()
        .filter(|&id| Some(id) != wanted_learner)
        .collect();

    let Some(mv) = active else {
        // No move running: the group should be `current`, uniform. Learners
        // of a cancelled move go; then the entry without them is reported.
        return match membership.uniform_voters() {
            Some(voters) if *voters == current => {
                if !stray.is_empty() {
                    Step::RemoveLearners { ids: stray }
                } else if membership.log_index > work.current_log_index
                    && membership.learners.is_empty()
                {
                    Step::Propose(MetaCommand::LearnersRemoved {
                        shard: work.shard,
                        voters: work.current.to_vec(),
                        membership_log_index: membership.log_index,
                    })
                } else if work.open.is_some() {
                    Step::Wait(Wait::Admission)
                } else {
                    Step::Idle
                }
            }
            _ => Step::Wait(Wait::Membership),
        };
    };

    let goal = as_set(&mv.goal);
    if let Some(voters) = membership.uniform_voters() {
        if *voters == goal {
            // The goal is in place (after our own change, or found after a
            // crash): report it. Only a joint move can have got here.
            return if mv.phase == Phase::Joint {
                Step::Propose(MetaCommand::Done {
                    shard: work.shard,
                    move_id: mv.id,
                    voters: mv.goal.clone(),
                    membership_log_index: membership.log_index,
                })
            } else {
                Step::Wait(Wait::Membership)
            };
        }
        if *voters != current {
            return Step::Wait(Wait::Membership);
        }
        if !stray.is_empty() {
            return Step::RemoveLearners { ids: stray };
        }
        if !membership.learners.contains(&mv.add) {
            if replication.purged.is_none_or(|p| p < membership.log_index) {
                return Step::PurgeLog {
                    through: membership.log_index,
                };
            }
            return Step::AddLearner { id: mv.add };
        }
    } else {
        // Joint: only ever `[current, goal]`, appended by a gated step.
        let expected = [current.clone(), goal.clone()];
        if membership.configs != expected {
            return Step::Wait(Wait::Membership);
        }
    }

    let target = caught_up_target(membership, replication);
    let matched = replication.matched.get(&mv.add).copied().flatten();
    let add_caught_up = mv.add == me || matched.is_some_and(|m| m >= target);
    if !membership.is_joint() && !add_caught_up {
        return Step::Wait(Wait::CatchUp {
            id: mv.add,
            matched,
            target,
        });
    }

    if !goal.contains(&me) {
        // A leader that is not in the goal hands over first, to a voter of
        // the membership (never the learner) that is in the goal.
        return hand_over_target(membership, replication, &goal, target, me)
            .map_or(Step::Wait(Wait::HandOverTarget), |to| Step::HandOver { to });
    }

    let live = goal
        .iter()
        .filter(|&&id| {
            id == me
                || (replication.live.contains(&id)
                    && replication
                        .matched
                        .get(&id)
                        .copied()
                        .flatten()
                        .is_some_and(|m| m >= target))
        })
        .count() as u32;
    let needed = work.replicas.saturating_sub(1);
    if live < needed {
        return Step::Wait(Wait::LiveCopies { live, needed });
    }

    if membership.is_joint() {
        Step::ToGoal {
            goal: mv.goal.clone(),
        }
    } else {
        Step::Joint {
            command: MetaCommand::Phase {
                shard: work.shard,
                move_id: mv.id,
                phase: Phase::Joint,
            },
            old: work.current.to_vec(),
            new: mv.goal.clone(),
        }
    }
}

/// The index a replica must have matched to count as caught up.
fn caught_up_target(membership: &GroupMembership, replication: &Replication) -> u64 {
    replication
        .last_log_index
        .saturating_sub(CATCH_UP_SLACK)
        .max(membership.log_index)
}

/// The most caught-up live voter of the membership that is in the goal
/// (ties: lowest id), other than `me`.
fn hand_over_target(
    membership: &GroupMembership,
    replication: &Replication,
    goal: &BTreeSet<NodeId>,
    target: u64,
    me: NodeId,
) -> Option<NodeId> {
    membership
        .voters()
        .into_iter()
        .filter(|id| *id != me && goal.contains(id) && replication.live.contains(id))
        .filter_map(|id| {
            let matched = replication.matched.get(&id).copied().flatten()?;
            (matched >= target).then_some((matched, id))
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, id)| id)
}

/// This node's replica of a group, as its own storage sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaView {
    /// The log index of the replica's own last membership entry.
    pub membership_log_index: u64,
    /// Whether the replica leads the group.
    pub leading: bool,
}

/// Whether node `me` may drop its replica of `shard` (§5): the applied state
/// does not have it host the shard (not a current voter, not the open move's
/// `add` or `remove`), it does not lead, and its own last membership is not
/// newer than the entry that made `current` (so a replica that was added
/// back since, which this node's state may not know yet, is kept). A replica
/// that left is never told (openraft stops replicating to it), so its last
/// membership is an old one that still names it; the state's
/// `current_log_index` is what says it is out.
pub fn may_drop(state: &ClusterState, shard: u32, me: NodeId, replica: ReplicaView) -> bool {
    let Some(work) = state.work(shard) else {
        return false;
    };
    let hosts =
        work.current.contains(&me) || work.open.is_some_and(|mv| mv.add == me || mv.remove == me);
    !hosts && !replica.leading && replica.membership_log_index <= work.current_log_index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(phase: Phase) -> Move {
        Move {
            id: 9,
            add: 4,
            remove: 3,
            goal: vec![1, 2, 4],
            phase,
        }
    }

    fn work(open: Option<&Move>) -> ShardWork<'_> {
        ShardWork {
            shard: 5,
            replicas: 3,
            current: &[1, 2, 3],
            current_log_index: 10,
            open,
        }
    }

    /// Leader 1; everyone live and caught up at 100; purged at 90.
    fn replication() -> Replication {
        Replication {
            leading: true,
            last_log_index: 100,
            purged: Some(90),
            matched: [(2, Some(100)), (3, Some(100)), (4, Some(100))].into(),
            live: [2, 3, 4].into(),
        }
    }

    fn with_learner(log_index: u64) -> GroupMembership {
        let mut m = GroupMembership::uniform(log_index, [1, 2, 3]);
        m.learners.insert(4);
        m
    }

    #[test]
    fn a_move_goes_learner_joint_goal_done() {
        let copying = mv(Phase::Copying);
        let w = work(Some(&copying));
        let mut r = replication();
        r.purged = Some(5);
        let m = GroupMembership::uniform(10, [1, 2, 3]);
        assert_eq!(
            next_step(&w, &m, &r, 1),
            Step::PurgeLog { through: 10 },
            "purge past the membership before adding a learner"
        );
        r.purged = Some(40);
        assert_eq!(next_step(&w, &m, &r, 1), Step::AddLearner { id: 4 });

        let m = with_learner(95);
        r.matched.insert(4, Some(20));
        assert_eq!(
            next_step(&w, &m, &r, 1),
            Step::Wait(Wait::CatchUp {
                id: 4,
                matched: Some(20),
                target: 95
            })
        );
        r.matched.insert(4, Some(96));
        let joint = next_step(&w, &m, &r, 1);
        assert_eq!(
            joint,
            Step::Joint {
                command: MetaCommand::Phase {
                    shard: 5,
                    move_id: 9,
                    phase: Phase::Joint
                },
                old: vec![1, 2, 3],
                new: vec![1, 2, 4],
            }
        );
        let joint_move = mv(Phase::Joint);
        let w = work(Some(&joint_move));
        assert_eq!(next_step(&w, &m, &r, 1), joint, "re-gated after a crash");

        let m = GroupMembership {
            log_index: 101,
            committed: true,
            configs: vec![[1, 2, 3].into(), [1, 2, 4].into()],
            learners: BTreeSet::new(),
        };
        r.last_log_index = 101;
        r.matched = [(2, Some(101)), (3, Some(101)), (4, Some(100))].into();
        assert_eq!(
            next_step(&w, &m, &r, 1),
            Step::ToGoal {
                goal: vec![1, 2, 4]
            }
        );
        let m = GroupMembership::uniform(102, [1, 2, 4]);
        assert_eq!(
            next_step(&w, &m, &r, 1),
            Step::Propose(MetaCommand::Done {
                shard: 5,
                move_id: 9,
                voters: vec![1, 2, 4],
                membership_log_index: 102
            })
        );
    }

    #[test]
    fn only_a_leader_with_a_committed_membership_acts() {
        let copying = mv(Phase::Copying);
        let w = work(Some(&copying));
        let mut r = replication();
        r.leading = false;
        let m = GroupMembership::uniform(10, [1, 2, 3]);
        assert_eq!(next_step(&w, &m, &r, 1), Step::Wait(Wait::NotLeader));
        let mut m = m;
        m.committed = false;
        assert_eq!(
            next_step(&w, &m, &replication(), 1),
            Step::Wait(Wait::Committed)
        );
    }

    #[test]
    fn the_leaving_leader_hands_over_to_a_caught_up_goal_voter() {
        let copying = mv(Phase::Copying);
        let w = work(Some(&copying));
        let mut r = replication();
        r.matched = [(1, Some(100)), (2, Some(99)), (4, Some(100))].into();
        r.live = [1, 2, 4].into();
        let m = with_learner(95);
        // Node 3 leads and is removed; 4 is a learner, so 1 (most caught up).
        assert_eq!(next_step(&w, &m, &r, 3), Step::HandOver { to: 1 });
        r.live.remove(&1);
        assert_eq!(next_step(&w, &m, &r, 3), Step::HandOver { to: 2 });
        r.live.remove(&2);
        assert_eq!(
            next_step(&w, &m, &r, 3),
            Step::Wait(Wait::HandOverTarget),
            "never to the learner"
        );
    }

    #[test]
    fn a_removal_waits_for_replicas_minus_one_live_copies() {
        let joint = mv(Phase::Joint);
        let w = work(Some(&joint));
        let mut r = replication();
        r.live = [3, 4].into(); // 2 is down
        let m = with_learner(95);
        // Goal {1,2,4}: 1 (me) and 4 live = 2 = replicas - 1: go.
        assert!(matches!(next_step(&w, &m, &r, 1), Step::Joint { .. }));
        r.live = [3].into(); // 2 and 4 down
        assert_eq!(
            next_step(&w, &m, &r, 1),
            Step::Wait(Wait::LiveCopies { live: 1, needed: 2 })
        );
    }

    #[test]
    fn stray_learners_go_and_their_removal_is_reported() {
        let r = replication();
        let m = with_learner(95);
        assert_eq!(
            next_step(&work(None), &m, &r, 1),
            Step::RemoveLearners { ids: [4].into() }
        );
        // A new move with another learner also clears the old one first.
        let other = Move {
            add: 5,
            goal: vec![1, 2, 5],
            ..mv(Phase::Copying)
        };
        assert_eq!(
            next_step(&work(Some(&other)), &m, &r, 1),
            Step::RemoveLearners { ids: [4].into() }
        );
        let m = GroupMembership::uniform(96, [1, 2, 3]);
        assert_eq!(
            next_step(&work(None), &m, &r, 1),
            Step::Propose(MetaCommand::LearnersRemoved {
                shard: 5,
                voters: vec![1, 2, 3],
                membership_log_index: 96
            })
        );
        let m = GroupMembership::uniform(10, [1, 2, 3]);
        assert_eq!(next_step(&work(None), &m, &r, 1), Step::Idle);
        let planned = mv(Phase::Planned);
        assert_eq!(
            next_step(&work(Some(&planned)), &m, &r, 1),
            Step::Wait(Wait::Admission)
        );
    }

    #[test]
    fn an_unexpected_membership_is_waited_out_not_changed() {
        let joint = mv(Phase::Joint);
        let r = replication();
        // A view older than the group: the group already moved elsewhere.
        let m = GroupMembership::uniform(200, [1, 2, 5]);
        assert_eq!(
            next_step(&work(Some(&joint)), &m, &r, 1),
            Step::Wait(Wait::Membership)
        );
        assert_eq!(
            next_step(&work(None), &m, &r, 1),
            Step::Wait(Wait::Membership)
        );
        let m = GroupMembership {
            log_index: 201,
            committed: true,
            configs: vec![[1, 2, 3].into(), [1, 2, 5].into()],
            learners: BTreeSet::new(),
        };
        assert_eq!(
            next_step(&work(Some(&joint)), &m, &r, 1),
            Step::Wait(Wait::Membership)
        );
        // The goal reached but the move only copying: not ours to report.
        let copying = mv(Phase::Copying);
        let m = GroupMembership::uniform(102, [1, 2, 4]);
        assert_eq!(
            next_step(&work(Some(&copying)), &m, &r, 1),
            Step::Wait(Wait::Membership)
        );
    }

    #[test]
    fn drop_only_when_out_of_the_state_and_not_added_back() {
        use crate::meta::ClusterId;
        let spec = crate::ClusterSpec::new(1, "1=a:1,2=a:2,3=a:3,4=a:4", Some(8), Some(3)).unwrap();
        let mut state = ClusterState::from_spec(&spec, ClusterId(1));
        let shard = 0;
        let out = (1..=4).find(|id| !state.current[0].contains(id)).unwrap();
        state.current_log_index[0] = 50;
        let old = ReplicaView {
            membership_log_index: 40,
            leading: false,
        };
        assert!(may_drop(&state, shard, out, old));
        assert!(!may_drop(
            &state,
            shard,
            out,
            ReplicaView {
                leading: true,
                ..old
            }
        ));
        let newer = ReplicaView {
            membership_log_index: 60,
            leading: false,
        };
        assert!(!may_drop(&state, shard, out, newer), "added back since");
        let member = state.current[shard as usize][0];
        assert!(!may_drop(&state, shard, member, old));
        state.moves.insert(
            shard,
            Move {
                id: 2,
                add: out,
                remove: member,
                goal: vec![],
                phase: Phase::Copying,
            },
        );
        assert!(!may_drop(&state, shard, out, old), "the move's learner");
        assert!(!may_drop(&state, 99, out, old), "no such shard");
    }
}
