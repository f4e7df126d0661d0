//! The **catch-up guard**: a replica that may have lost entries it once
//! acknowledged neither votes nor campaigns until it holds them again
//! (design `docs/replication.md` §4.4).
//!
//! `--repair` cuts a damaged write-ahead log at the damage, sets a damaged
//! snapshot aside or goes on without a missing segment (kv-store's
//! `RecoveryReport::repaired`). Every group on such a node may then lack
//! entries it had acknowledged to its leader, and a write acknowledged by
//! the leader and this replica only is then on the leader alone: if this
//! replica voted (or stood) with the third, behind replica while the
//! leader is down, the two would elect a leader without the write and it
//! would be lost although a client was told it was stored. So kv-node
//! hosts every group of a repaired node with [`Groups::insert_catching_up`]
//! (`super::server::Groups`), and until the group is caught up:
//!
//! - vote and pre-vote requests are refused, as the restart guard refuses
//!   them (not granted, with this replica's vote and last log id), those
//!   with `leadership_transfer` too: a candidate then needs the votes of
//!   others, whose logs are intact;
//! - the group does not stand for election (openraft's `enable_elect` off
//!   from the group's creation, `runtime_config().elect(true)` once
//!   released, unless the node holds elections for a full disk).
//!
//! A `TransferLeader` naming this replica is still passed to openraft: its
//! target campaigns only if its log is at least the leader's last log id
//! (`RaftMsg::HandleTransferLeader`), so it then holds every entry the
//! leader holds, which includes every committed one; such a leadership is
//! safe, and releases the guard (below).
//!
//! **Caught up** means: the group's *local committed* index (openraft's
//! `local_committed`: the entries of its own log it knows committed, which
//! a follower reaches only for entries matching its leader's log) has
//! reached a *target*, the leader's commit index carried by the first
//! append this replica accepted (not answered "higher vote") whose commit
//! index is an entry of that leader's own term. The committed index rather
//! than the applied one: an election compares logs, and the log is whole
//! once the entries are in it and committed; applying them to the map
//! changes nothing an election looks at, and lags.
//!
//! Why this target is enough: every write acknowledged before this replica
//! came back was committed by then, at an index no greater than any later
//! leader's own-term commit index (a leader's commit index reaches its
//! predecessors' committed entries once its own first entry commits, which
//! is why a commit index of an earlier term is not taken: a just-elected
//! leader reports its predecessors' commit as it last learnt it, possibly
//! short of an entry they committed). Once this replica's log holds every
//! entry up to the target, matching a leader's log, it holds every entry
//! that was committed when it came back; entries committed after that were
//! counted with this replica's acknowledgements of entries it really holds
//! (its acknowledgements after the restart are of its repaired log).
//!
//! **A leader change while catching up** does not weaken this. The target
//! was committed, so by Raft's leader completeness every later leader's
//! log holds the same entries up to it, and a follower's local committed
//! index only counts entries matching the current leader's log: reaching
//! the target under a later leader means holding the same prefix. While
//! this replica is caught up by no one (the leader that would catch it up
//! is down), its group has only the remaining replicas to elect from: with
//! three replicas one lost leader leaves one electable replica and no
//! quorum, so the shard answers 503 until that leader is back (safety over
//! availability).
//!
//! A replica that becomes leader (only by a transfer, above) is released
//! once it has committed an entry of its own term, for the same reason.

use std::sync::atomic::{AtomicBool, Ordering};

use openraft::async_runtime::WatchReceiver;
use openraft::storage::RaftStateMachine;
use openraft::ServerState;
use parking_lot::Mutex;

use crate::types::{KvRaft, Raft};

/// One hosted group's election switches: the catch-up guard, and a hold
/// the node puts on elections (a full disk), combined into openraft's
/// `enable_elect` under one lock so that neither undoes the other.
#[derive(Debug, Default)]
pub(crate) struct Election {
    /// `true` while catching up: read on every vote and append without
    /// taking the lock.
    catching_up: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// While catching up: the target, once an append carried one.
    target: Option<u64>,
    /// The node holds this group's elections (a full disk).
    held: bool,
}

/// What a group's metrics say for [`caught_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// `local_committed`'s index.
    pub(crate) committed: Option<u64>,
    /// This replica leads the group and its local committed entry is one
    /// of its own term.
    pub(crate) leads_with_own_commit: bool,
}

/// Whether a catching-up group may be released (module docs).
pub(crate) fn caught_up(target: Option<u64>, progress: Progress) -> bool {
    progress.leads_with_own_commit
        || target.is_some_and(|target| progress.committed.is_some_and(|c| c >= target))
}

impl Election {
    /// A group hosted catching up, or not.
    pub(crate) fn new(catching_up: bool) -> Self {
        Self {
            catching_up: AtomicBool::new(catching_up),
            state: Mutex::default(),
        }
    }

    /// Whether the group is still catching up.
    pub(crate) fn is_catching_up(&self) -> bool {
        self.catching_up.load(Ordering::Acquire)
    }

    /// An append was accepted with `leader_commit` from a leader: the
    /// first one whose commit is of the sender's own term sets the target.
    pub(crate) fn note_append(&self, own_term_commit: Option<u64>) {
        if let Some(index) = own_term_commit {
            let mut state = self.state.lock();
            if state.target.is_none() {
                state.target = Some(index);
            }
        }
    }

    /// Releases the group if [`caught_up`] (reading `raft`'s metrics) and
    /// enables its elections unless held; `true` if this call released it.
    pub(crate) fn release_if_caught_up<SM: RaftStateMachine<KvRaft>>(
        &self,
        raft: &Raft<SM>,
    ) -> bool {
        if !self.is_catching_up() {
            return false;
        }
        let state = self.state.lock();
        let progress = {
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            Progress {
                committed: m.local_committed.as_ref().map(|l| l.index),
                leads_with_own_commit: m.state == ServerState::Leader
                    && m.local_committed
                        .as_ref()
                        .is_some_and(|l| l.leader_id == m.vote.leader_id),
            }
        };
        if !caught_up(state.target, progress) {
            return false;
        }
        // Under the lock, so a hold set at the same time is not undone.
        if !self.catching_up.swap(false, Ordering::AcqRel) {
            return false;
        }
        raft.runtime_config().elect(!state.held);
        true
    }

    /// Stops catching up without being caught up (the group is no longer
    /// hosted); `true` if it was catching up.
    pub(crate) fn forget(&self) -> bool {
        let _state = self.state.lock();
        self.catching_up.swap(false, Ordering::AcqRel)
    }

    /// Holds (or lets go) the group's elections for the node; they stay
    /// off while catching up either way.
    pub(crate) fn hold<SM: RaftStateMachine<KvRaft>>(&self, raft: &Raft<SM>, held: bool) {
        let mut state = self.state.lock();
        state.held = held;
        raft.runtime_config()
            .elect(!held && !self.catching_up.load(Ordering::Acquire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(committed: Option<u64>) -> Progress {
        Progress {
            committed,
            leads_with_own_commit: false,
        }
    }

    #[test]
    fn no_target_no_release() {
        assert!(!caught_up(None, at(Some(100))));
        assert!(!caught_up(None, at(None)));
    }

    #[test]
    fn released_once_committed_reaches_the_target() {
        assert!(!caught_up(Some(10), at(None)));
        assert!(!caught_up(Some(10), at(Some(9))));
        assert!(caught_up(Some(10), at(Some(10))));
        assert!(caught_up(Some(10), at(Some(11))));
        assert!(caught_up(Some(0), at(Some(0))));
    }

    #[test]
    fn a_leader_with_an_own_term_commit_is_released() {
        let leading = Progress {
            committed: Some(3),
            leads_with_own_commit: true,
        };
        assert!(caught_up(None, leading));
    }

    #[test]
    fn the_first_own_term_commit_is_the_target() {
        let election = Election::new(true);
        election.note_append(None);
        assert_eq!(election.state.lock().target, None);
        election.note_append(Some(7));
        election.note_append(Some(9));
        assert_eq!(election.state.lock().target, Some(7));
        assert!(election.forget());
        assert!(!election.is_catching_up());
        assert!(!election.forget());
    }
}
