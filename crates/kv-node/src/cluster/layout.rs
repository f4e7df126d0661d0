//! Where shards live, as this node knows it now (`docs/membership.md` §3.4):
//! the [`Layout`] every request reads once, and the per-shard [`HostedSlots`]
//! holding this node's replicas.
//!
//! Issue 12 fixed both at start (from `cluster.json`); issue 13 changes them
//! at run time when the metadata group applies a new cluster state. So:
//!
//! * a [`Layout`] is immutable and swapped **whole** behind a lock
//!   ([`LayoutCell`]): a request takes one `Arc` and sees one consistent
//!   version (members, voters, preferred leaders, solo owners) however many
//!   times it looks, never half of a change;
//! * a replica is a slot per shard that the metadata task fills when this
//!   node starts hosting a shard and empties when it drops one; a request
//!   holds its `Arc<Hosted>` for as long as it needs it, so a group removed
//!   under a request finishes that request on the old handle.
//!
//! Version 0 is the layout read from `cluster.json` before the metadata
//! group has applied a state (it equals the state's version 1: a first start
//! and an upgrade from issue 12 route exactly as before).

use std::collections::BTreeMap;
use std::sync::Arc;

use kv_cluster::{preferred_leaders_toward, ClusterSpec, ClusterState};
use kv_raft::NodeId;
use parking_lot::RwLock;

use super::Hosted;

/// One consistent picture of the cluster (module docs).
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// The placement version this was built from (0: `cluster.json`).
    pub(crate) version: u64,
    /// Members that may hold or lead a replica (not removed): id → address.
    pub(crate) members: BTreeMap<NodeId, String>,
    /// Per shard, the voters of its group as last finished, in ring order:
    /// who serves it now (the design's `current`).
    pub(crate) current: Vec<Vec<NodeId>>,
    /// Per shard, who the placement wants (differs from `current` while a
    /// move is open). Read by the move executor (issue 13, M3b).
    #[allow(dead_code)]
    pub(crate) placement: Vec<Vec<NodeId>>,
    /// Per shard, who should lead it (from `current`).
    pub(crate) preferred: Vec<NodeId>,
    /// Per shard, `Some(owner)` when it has one replica: a solo shard,
    /// served by its owner's store without Raft.
    pub(crate) solo: Vec<Option<NodeId>>,
    /// The applied metadata state this layout was built from (`None` for
    /// version 0).
    pub(crate) state: Option<Arc<ClusterState>>,
}

impl Layout {
    /// Version 0: `cluster.json`'s static placement (issue 12's).
    pub(crate) fn from_spec(spec: &ClusterSpec) -> Self {
        let placed = kv_cluster::placement(spec);
        Self::build(0, spec.members.clone(), placed.clone(), placed, None)
    }

    /// Version 0 of a node that joined (`--join`): the placement over the
    /// members it learnt, without itself (it holds nothing until the
    /// metadata state says so). Only a route guess until that state arrives.
    pub(crate) fn joined(spec: &ClusterSpec) -> Self {
        let others = spec
            .members
            .keys()
            .copied()
            .filter(|id| *id != spec.node_id);
        let placed = kv_cluster::placement_over(others, spec.shards, spec.replicas);
        Self::build(0, spec.members.clone(), placed.clone(), placed, None)
    }

    /// The layout of an applied metadata state.
    pub(crate) fn from_state(state: ClusterState) -> Self {
        Self::build(
            state.version,
            state.addresses(),
            state.current.clone(),
            state.placement.clone(),
            Some(Arc::new(state)),
        )
    }

    fn build(
        version: u64,
        members: BTreeMap<NodeId, String>,
        current: Vec<Vec<NodeId>>,
        placement: Vec<Vec<NodeId>>,
        state: Option<Arc<ClusterState>>,
    ) -> Self {
        // Anchored on the target, so a move re-targets only its own shard.
        let preferred = preferred_leaders_toward(&current, &placement);
        let solo = current
            .iter()
            .map(|replicas| match replicas.as_slice() {
                [owner] => Some(*owner),
                _ => None,
            })
            .collect();
        Self {
            version,
            members,
            current,
            placement,
            preferred,
            solo,
            state,
        }
    }

    /// Shard `shard`'s voters now (empty for a shard out of range).
    pub(crate) fn replicas(&self, shard: u32) -> &[NodeId] {
        self.current.get(shard as usize).map_or(&[], Vec::as_slice)
    }

    /// Who should lead `shard` ([`kv_cluster::NO_LEADER`] out of range).
    pub(crate) fn preferred(&self, shard: u32) -> NodeId {
        self.preferred
            .get(shard as usize)
            .copied()
            .unwrap_or(kv_cluster::NO_LEADER)
    }

    /// The owner of `shard` when it is a solo shard.
    pub(crate) fn solo_owner(&self, shard: u32) -> Option<NodeId> {
        self.solo.get(shard as usize).copied().flatten()
    }

    /// Whether `shard`'s voters are still the ones the cluster was created
    /// with (no move ever finished): only then may its preferred leader
    /// initialise its group.
    pub(crate) fn never_moved(&self, shard: u32) -> bool {
        self.state
            .as_ref()
            .is_none_or(|state| state.current_log_index.get(shard as usize).copied() == Some(0))
    }

    /// The shards whose group `me` should host: a voter of `current`, or the
    /// member an open move adds (its learner must exist before the leader
    /// adds it). Solo shards have no group.
    pub(crate) fn groups_of(&self, me: NodeId) -> Vec<u32> {
        (0..self.current.len() as u32)
            .filter(|&shard| self.solo_owner(shard).is_none())
            .filter(|&shard| match &self.state {
                Some(state) => state.hosts(shard).contains(&me),
                None => self.replicas(shard).contains(&me),
            })
            .collect()
    }
}

/// The lock around the current [`Layout`]: readers clone the `Arc` (one
/// uncontended read lock), the metadata task swaps it whole.
pub(crate) struct LayoutCell(RwLock<Arc<Layout>>);

impl LayoutCell {
    pub(crate) fn new(layout: Layout) -> Self {
        Self(RwLock::new(Arc::new(layout)))
    }

    /// The layout now; hold it for one request.
    #[inline]
    pub(crate) fn get(&self) -> Arc<Layout> {
        Arc::clone(&self.0.read())
    }

    /// Replaces the layout when `layout` is newer; returns whether it did.
    pub(crate) fn swap_if_newer(&self, layout: Layout) -> bool {
        let mut current = self.0.write();
        if layout.version <= current.version {
            return false;
        }
        *current = Arc::new(layout);
        true
    }
}

/// Per shard, this node's replica when it hosts one (module docs).
pub(crate) struct HostedSlots(Vec<RwLock<Option<Arc<Hosted>>>>);

impl HostedSlots {
    /// `shards` empty slots.
    pub(crate) fn new(shards: u32) -> Self {
        Self((0..shards).map(|_| RwLock::new(None)).collect())
    }

    /// Shard `shard`'s replica here, if any.
    #[inline]
    pub(crate) fn get(&self, shard: u32) -> Option<Arc<Hosted>> {
        self.0.get(shard as usize)?.read().clone()
    }

    /// Fills `shard`'s slot; returns the replica it held before, if any.
    pub(crate) fn fill(&self, shard: u32, hosted: Hosted) -> Option<Arc<Hosted>> {
        let slot = self.0.get(shard as usize)?;
        slot.write().replace(Arc::new(hosted))
    }

    /// Empties `shard`'s slot (the node stops hosting it); returns what it
    /// held (a dropped replica, `moves`).
    pub(crate) fn empty(&self, shard: u32) -> Option<Arc<Hosted>> {
        self.0.get(shard as usize)?.write().take()
    }

    /// Every hosted replica, in shard order (a snapshot of the slots).
    pub(crate) fn all(&self) -> Vec<(u32, Arc<Hosted>)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(shard, slot)| Some((shard as u32, slot.read().clone()?)))
            .collect()
    }

    /// How many shards are hosted.
    pub(crate) fn count(&self) -> usize {
        self.0.iter().filter(|slot| slot.read().is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kv_cluster::{ClusterId, MetaCommand};

    fn spec() -> ClusterSpec {
        ClusterSpec::new(
            1,
            "1=127.0.0.1:8081,2=127.0.0.1:8082,3=127.0.0.1:8083",
            Some(8),
            Some(2),
        )
        .unwrap()
    }

    #[test]
    fn version_one_routes_as_cluster_json() {
        let spec = spec();
        let fixed = Layout::from_spec(&spec);
        let state = ClusterState::from_spec(&spec, ClusterId(1));
        let dynamic = Layout::from_state(state);
        assert_eq!(fixed.current, dynamic.current);
        assert_eq!(fixed.preferred, dynamic.preferred);
        assert_eq!(fixed.members, dynamic.members);
        assert_eq!(fixed.groups_of(2), dynamic.groups_of(2));
        assert_eq!((fixed.version, dynamic.version), (0, 1));
    }

    #[test]
    fn an_open_move_hosts_its_learner_and_only_newer_layouts_swap() {
        let spec = spec();
        let mut state = ClusterState::from_spec(&spec, ClusterId(1));
        let add = MetaCommand::AddMember {
            id: 4,
            addr: "127.0.0.1:8084".into(),
        };
        kv_cluster::apply(&mut state, &add).unwrap();
        kv_cluster::apply(&mut state, &MetaCommand::Activate { id: 4 }).unwrap();
        let moving: Vec<u32> = state.moves.keys().copied().collect();
        assert!(!moving.is_empty());
        let layout = Layout::from_state(state.clone());
        assert_eq!(layout.groups_of(4), moving, "node 4 hosts its learners");
        assert!(layout.members.contains_key(&4));

        let cell = LayoutCell::new(Layout::from_spec(&spec));
        assert!(cell.swap_if_newer(layout.clone()));
        assert!(!cell.swap_if_newer(layout), "same version: kept");
        assert_eq!(cell.get().version, state.version);
    }
}
