//! A model of issue 13's moves (`docs/membership.md` §4, §5, §9 "pure
//! logic"): random add/remove sequences and node crashes driven through the
//! real [`apply`], [`schedule`], [`next_step`] and [`may_drop`] against a
//! model of each shard's Raft group (its membership log, purge point,
//! leader, each replica's log position and its leader's progress).
//!
//! What the model simplifies: the metadata group is always available and
//! applies proposals in order (each node *applies* them late: its view is a
//! prefix of the log, so executors and drops run on stale states); a
//! membership entry commits as soon as it is appended while a quorum is up;
//! writes reach every live voter at once (learners only on replication
//! ticks, so catching up takes time). Crashes: at most one node is down at a
//! time (the failure model), chosen at random, also between the
//! metadata proposal and the joint append of a joint step; a restarted node
//! keeps its replicas and its applied state, as after kill -9 with a WAL.
//!
//! Checked after every action: each config of every group's membership has
//! at least `replicas − 1` live, up-to-date copies; no voter of any group
//! lost its copy; the version only increases (by one per change, not at all
//! on a refusal or a repeat); a replica created after a drop never passes
//! through a configuration older than the entry that added it back (open
//! question 10). At the end (everyone up, no more changes): the moves finish
//! within a bound, every group's voters are the ring's placement over the
//! active members, nodes that left a shard dropped it, and replaying the
//! whole command log from nothing gives the same state.
//!
//! `KV_MODEL_SEEDS` (default 30) sets how many random runs to make.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use kv_cluster::{
    apply, may_drop, next_step, placement_over, schedule, ClusterId, ClusterSpec, ClusterState,
    GroupMembership, LiveInfo, MemberState, MetaCommand, NodeId, Outcome, Phase, ReplicaView,
    Replication, Settings, Step,
};

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len() as u64) as usize])
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    configs: Vec<BTreeSet<NodeId>>,
    learners: BTreeSet<NodeId>,
}

impl Config {
    fn voters(&self) -> BTreeSet<NodeId> {
        self.configs.iter().flatten().copied().collect()
    }
    fn nodes(&self) -> BTreeSet<NodeId> {
        self.voters().union(&self.learners).copied().collect()
    }
}

#[derive(Debug, Clone)]
struct Replica {
    /// Last log index it holds.
    matched: u64,
    /// Index of its own last membership entry.
    membership_index: u64,
    /// Created empty (a new member, or added back after a drop).
    fresh: bool,
}

#[derive(Debug)]
struct Group {
    /// (index, membership) entries; the last is effective.
    memberships: Vec<(u64, Config)>,
    last_index: u64,
    purged: Option<u64>,
    leader: Option<NodeId>,
    replicas: BTreeMap<NodeId, Replica>,
    /// The leader's progress per target: survives a target dropping its
    /// copy, reset when the target leaves the membership (as openraft's).
    progress: BTreeMap<NodeId, Option<u64>>,
    /// Index of the entry that last added a node as learner.
    learner_added_at: BTreeMap<NodeId, u64>,
}

impl Group {
    fn effective(&self) -> &Config {
        &self.memberships.last().expect("a group has a membership").1
    }
    fn effective_index(&self) -> u64 {
        self.memberships.last().map_or(0, |(index, _)| *index)
    }
}

#[derive(Debug, Clone, Copy)]
struct Node {
    up: bool,
    /// Removed and exited for good.
    gone: bool,
    /// How many commands of the log it applied.
    meta_applied: usize,
}

#[derive(Debug, Default)]
struct Stats {
    learners_added: u64,
    re_added_after_drop: u64,
    drops: u64,
    refusals: u64,
    crashes: u64,
    joint_crashes: u64,
}

struct World {
    rng: Rng,
    meta: ClusterState,
    log: Vec<MetaCommand>,
    /// history[k]: the state after the first k commands.
    history: Vec<ClusterState>,
    nodes: BTreeMap<NodeId, Node>,
    groups: Vec<Group>,
    next_id: NodeId,
    settings: Settings,
    stats: Stats,
    /// Nodes that dropped a shard's copy at some point: (node, shard).
    dropped: BTreeSet<(NodeId, u32)>,
}

impl World {
    fn new(seed: u64, members: u64, shards: u32, replicas: u32, max_moves: u32) -> Self {
        let peers: Vec<String> = (1..=members)
            .map(|id| format!("{id}=127.0.0.1:{}", 9000 + id))
            .collect();
        let spec = ClusterSpec::new(1, &peers.join(","), Some(shards), Some(replicas)).unwrap();
        let boot = MetaCommand::Bootstrap {
            cluster_id: ClusterId(u128::from(seed) + 1),
            shards,
            replicas,
            members: spec.members.clone(),
        };
        let mut meta = ClusterState::default();
        apply(&mut meta, &boot).unwrap();
        assert_eq!(meta, ClusterState::from_spec(&spec, meta.cluster_id));
        let groups = meta
            .current
            .iter()
            .map(|row| {
                let voters: BTreeSet<NodeId> = row.iter().copied().collect();
                let config = Config {
                    configs: vec![voters.clone()],
                    learners: BTreeSet::new(),
                };
                Group {
                    memberships: vec![(0, config)],
                    last_index: 0,
                    purged: None,
                    leader: row.first().copied(),
                    replicas: voters
                        .iter()
                        .map(|&id| {
                            let replica = Replica {
                                matched: 0,
                                membership_index: 0,
                                fresh: false,
                            };
                            (id, replica)
                        })
                        .collect(),
                    progress: voters.iter().map(|&id| (id, Some(0))).collect(),
                    learner_added_at: BTreeMap::new(),
                }
            })
            .collect();
        let nodes = (1..=members)
            .map(|id| {
                let node = Node {
                    up: true,
                    gone: false,
                    meta_applied: 1,
                };
                (id, node)
            })
            .collect();
        Self {
            rng: Rng::new(seed),
            history: vec![ClusterState::default(), meta.clone()],
            meta,
            log: vec![boot],
            nodes,
            groups,
            next_id: members + 1,
            settings: Settings {
                max_moves,
                max_incoming: 1,
            },
            stats: Stats::default(),
            dropped: BTreeSet::new(),
        }
    }

    fn view(&self, node: NodeId) -> &ClusterState {
        &self.history[self.nodes[&node].meta_applied]
    }

    fn is_up(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.up && !n.gone)
    }

    /// Proposes to the metadata group, checking `apply`'s contract.
    fn propose(&mut self, cmd: MetaCommand) -> Result<Outcome, kv_cluster::Refusal> {
        let before = self.meta.clone();
        let result = apply(&mut self.meta, &cmd);
        match result {
            Err(_) | Ok(Outcome::Unchanged { .. }) => {
                assert_eq!(self.meta, before, "{cmd:?} changed the state: {result:?}");
                if result.is_err() {
                    self.stats.refusals += 1;
                }
            }
            Ok(Outcome::Changed { version }) => {
                assert_eq!(version, before.version + 1, "{cmd:?}");
                assert_eq!(self.meta.version, version);
                self.meta.check().unwrap();
            }
        }
        self.log.push(cmd);
        self.history.push(self.meta.clone());
        result
    }

    fn down_count(&self) -> usize {
        self.nodes.values().filter(|n| !n.up && !n.gone).count()
    }

    fn crash(&mut self, node: NodeId) {
        if self.down_count() == 0 && self.is_up(node) {
            self.nodes.get_mut(&node).unwrap().up = false;
            self.stats.crashes += 1;
            self.settle_groups();
        }
    }

    fn restart_all(&mut self) {
        for node in self.nodes.values_mut() {
            if !node.gone {
                node.up = true;
            }
        }
        self.settle_groups();
    }

    /// Appends a membership entry to group `s`.
    fn append_membership(&mut self, s: usize, config: Config) {
        let g = &mut self.groups[s];
        g.last_index += 1;
        let index = g.last_index;
        let nodes = config.nodes();
        g.progress.retain(|id, _| nodes.contains(id));
        for id in nodes {
            g.progress.entry(id).or_insert(None);
        }
        g.memberships.push((index, config));
        if let Some(leader) = g.leader {
            if let Some(r) = g.replicas.get_mut(&leader) {
                r.matched = index;
                r.membership_index = index;
            }
        }
    }

    /// Replicates group `s` to `node` (entries or a snapshot), as openraft's
    /// leader does, if the node is up, in the membership and hosts the group
    /// (kv-node creates a group once its applied state says it hosts it).
    fn replicate(&mut self, s: usize, node: NodeId) {
        let Some(leader) = self.groups[s].leader else {
            return;
        };
        if node == leader || !self.is_up(leader) || !self.is_up(node) {
            return;
        }
        if !self.groups[s].effective().nodes().contains(&node) {
            return;
        }
        let hosts = self.view(node).hosts(s as u32).contains(&node);
        let g = &mut self.groups[s];
        if let std::collections::btree_map::Entry::Vacant(slot) = g.replicas.entry(node) {
            if !hosts {
                return; // UnknownGroup: openraft retries later
            }
            if self.dropped.contains(&(node, s as u32)) {
                self.stats.re_added_after_drop += 1;
            }
            slot.insert(Replica {
                matched: 0,
                membership_index: 0,
                fresh: true,
            });
        }
        let last_index = g.last_index;
        let purged = g.purged;
        let added_at = g.learner_added_at.get(&node).copied();
        let replica = g.replicas.get_mut(&node).unwrap();
        if replica.matched < last_index {
            if purged.is_some_and(|p| replica.matched < p) {
                // Snapshot: the membership in it is the effective one.
                replica.membership_index = g.memberships.last().map_or(0, |(index, _)| *index);
            } else {
                for (index, config) in &g.memberships {
                    if *index > replica.matched && *index <= last_index {
                        if replica.fresh && config.voters().contains(&node) {
                            let added = added_at.unwrap_or(0);
                            assert!(
                                *index >= added,
                                "shard {s}: node {node}, added back at {added}, replays \
                                 configuration {index} in which it was a voter"
                            );
                        }
                        replica.membership_index = *index;
                    }
                }
            }
            replica.matched = last_index;
        }
        g.progress.insert(node, Some(replica.matched));
    }

    /// Voters get every entry at once; elections as Raft would hold them.
    fn settle_groups(&mut self) {
        for s in 0..self.groups.len() {
            self.elect(s);
            let voters = self.groups[s].effective().voters();
            for v in voters {
                self.replicate(s, v);
            }
        }
    }

    fn elect(&mut self, s: usize) {
        let g = &self.groups[s];
        let config = g.effective().clone();
        let leader_ok = g
            .leader
            .is_some_and(|l| self.is_up(l) && config.voters().contains(&l));
        if leader_ok {
            return;
        }
        let alive = |id: &NodeId| self.is_up(*id) && g.replicas.contains_key(id);
        let quorum = config
            .configs
            .iter()
            .all(|c| c.iter().filter(|id| alive(id)).count() * 2 > c.len());
        let mut candidates: Vec<(u64, NodeId)> = config
            .voters()
            .into_iter()
            .filter(|id| alive(id))
            .map(|id| (g.replicas[&id].matched, id))
            .collect();
        candidates.sort_unstable();
        let best = candidates.last().map(|c| c.0);
        let tied: Vec<NodeId> = candidates
            .iter()
            .filter(|c| Some(c.0) == best)
            .map(|c| c.1)
            .collect();
        let leader = if quorum { self.rng.pick(&tied) } else { None };
        self.groups[s].leader = leader;
        if let Some(leader) = leader {
            // A new leader knows nothing of its peers until they answer.
            for (id, progress) in self.groups[s].progress.iter_mut() {
                if *id != leader {
                    *progress = None;
                }
            }
        }
    }

    fn write(&mut self, s: usize) {
        if self.groups[s].leader.is_some_and(|l| self.is_up(l)) {
            let g = &mut self.groups[s];
            g.last_index += 1;
            let index = g.last_index;
            if let Some(r) = g.leader.and_then(|l| g.replicas.get_mut(&l)) {
                r.matched = index;
            }
            self.settle_groups_one(s);
        }
    }

    fn settle_groups_one(&mut self, s: usize) {
        self.elect(s);
        for v in self.groups[s].effective().voters() {
            self.replicate(s, v);
        }
    }

    fn replicate_learners(&mut self, s: usize) {
        for l in self.groups[s].effective().learners.clone() {
            self.replicate(s, l);
        }
    }

    /// The metadata leader's turn.
    fn schedule_tick(&mut self) {
        let live: BTreeSet<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|&id| self.is_up(id))
            .collect();
        let caught_up = live
            .iter()
            .copied()
            .filter(|id| self.nodes[id].meta_applied == self.log.len())
            .collect();
        let info = LiveInfo {
            meta_caught_up: caught_up,
            live,
        };
        for cmd in schedule(&self.meta, self.settings, &info) {
            let _ = self.propose(cmd);
        }
    }

    /// Shard `s`'s leader runs one step of its executor.
    fn executor_tick(&mut self, s: usize, crash_percent: u64) {
        let Some(leader) = self.groups[s].leader else {
            return;
        };
        if !self.is_up(leader) {
            return;
        }
        let g = &self.groups[s];
        let config = g.effective().clone();
        let step = {
            let Some(work) = self.view(leader).work(s as u32) else {
                return;
            };
            let membership = GroupMembership {
                log_index: g.effective_index(),
                committed: true,
                configs: config.configs.clone(),
                learners: config.learners.clone(),
            };
            let live = config
                .nodes()
                .into_iter()
                .filter(|id| *id != leader && self.is_up(*id) && g.replicas.contains_key(id))
                .collect();
            let replication = Replication {
                leading: true,
                last_log_index: g.last_index,
                purged: g.purged,
                matched: g
                    .progress
                    .iter()
                    .filter(|(id, _)| **id != leader)
                    .map(|(&id, &m)| (id, m))
                    .collect(),
                live,
            };
            next_step(&work, &membership, &replication, leader)
        };
        match step {
            Step::Idle | Step::Wait(_) => {}
            Step::RemoveLearners { ids } => {
                assert!(ids.is_subset(&config.learners), "{ids:?} {config:?}");
                let mut next = config.clone();
                next.learners.retain(|id| !ids.contains(id));
                self.append_membership(s, next);
            }
            Step::Propose(cmd) => {
                let _ = self.propose(cmd);
            }
            Step::PurgeLog { through } => {
                let g = &mut self.groups[s];
                assert!(g.last_index >= through);
                g.purged = Some(g.last_index);
            }
            Step::AddLearner { id } => {
                let g = &self.groups[s];
                assert!(
                    g.purged.is_some_and(|p| p >= g.effective_index()),
                    "shard {s}: learner {id} added before the log was purged past the membership"
                );
                assert!(!config.voters().contains(&id));
                let mut next = config.clone();
                next.learners.insert(id);
                self.append_membership(s, next);
                let index = self.groups[s].last_index;
                self.groups[s].learner_added_at.insert(id, index);
                self.stats.learners_added += 1;
            }
            Step::HandOver { to } => {
                let g = &self.groups[s];
                assert!(config.voters().contains(&to) && self.is_up(to));
                assert_eq!(
                    g.replicas[&to].matched, g.last_index,
                    "hand over to a laggard"
                );
                self.groups[s].leader = Some(to);
            }
            Step::Joint { command, old, new } => {
                if self.propose(command).is_err() {
                    return;
                }
                if self.rng.chance(crash_percent) && self.down_count() == 0 {
                    // kill -9 between the metadata proposal and the append.
                    self.stats.joint_crashes += 1;
                    self.crash(leader);
                    return;
                }
                let old: BTreeSet<NodeId> = old.into_iter().collect();
                let new: BTreeSet<NodeId> = new.into_iter().collect();
                assert_eq!(config.configs, vec![old.clone()], "joint from current only");
                assert_eq!(new.difference(&old).count(), 1, "one swap");
                let added = new.difference(&old).next().copied().unwrap();
                assert!(config.learners.contains(&added), "voter only after learner");
                let mut next = Config {
                    configs: vec![old, new.clone()],
                    learners: config.learners.clone(),
                };
                next.learners.retain(|id| !new.contains(id));
                self.append_membership(s, next);
            }
            Step::ToGoal { goal } => {
                let goal: BTreeSet<NodeId> = goal.into_iter().collect();
                assert!(config.configs.len() == 2 && config.configs[1] == goal);
                let next = Config {
                    configs: vec![goal.clone()],
                    learners: config.learners.clone(),
                };
                self.append_membership(s, next);
                if !goal.contains(&leader) {
                    self.groups[s].leader = None;
                }
            }
        }
        self.settle_groups_one(s);
    }

    /// Node `node` applies more of the metadata log, exits if removed.
    fn meta_catch_up(&mut self, node: NodeId, all: bool) {
        if !self.is_up(node) {
            return;
        }
        let from = self.nodes[&node].meta_applied;
        let to = if all {
            self.log.len()
        } else {
            from + self.rng.below((self.log.len() - from) as u64 + 1) as usize
        };
        self.nodes.get_mut(&node).unwrap().meta_applied = to;
        let removed = self
            .view(node)
            .members
            .get(&node)
            .is_some_and(|m| m.state == MemberState::Removed);
        if removed {
            // §4.5: it drops everything and exits 0.
            for g in &mut self.groups {
                assert!(
                    !g.effective().voters().contains(&node),
                    "removed node {node} is still a voter"
                );
                g.replicas.remove(&node);
            }
            let n = self.nodes.get_mut(&node).unwrap();
            n.gone = true;
            n.up = false;
            self.settle_groups();
        }
    }

    fn drop_tick(&mut self, node: NodeId) {
        if !self.is_up(node) {
            return;
        }
        let view = self.view(node).clone();
        for s in 0..self.groups.len() {
            let g = &self.groups[s];
            let Some(replica) = g.replicas.get(&node) else {
                continue;
            };
            let rv = ReplicaView {
                membership_log_index: replica.membership_index,
                leading: g.leader == Some(node),
            };
            if may_drop(&view, s as u32, node, rv) {
                self.groups[s].replicas.remove(&node);
                self.dropped.insert((node, s as u32));
                self.stats.drops += 1;
            }
        }
        self.settle_groups();
    }

    fn check(&self, when: &str) {
        let needed = self.meta.replicas as usize - 1;
        for (s, g) in self.groups.iter().enumerate() {
            let config = g.effective();
            for v in config.voters() {
                let gone = self.nodes[&v].gone;
                assert!(
                    g.replicas.contains_key(&v) && !gone,
                    "{when}: shard {s}: voter {v} lost its copy ({config:?})"
                );
            }
            for c in &config.configs {
                let live = c
                    .iter()
                    .filter(|id| {
                        self.is_up(**id)
                            && g.replicas
                                .get(id)
                                .is_some_and(|r| r.matched == g.last_index)
                    })
                    .count();
                assert!(
                    live >= needed,
                    "{when}: shard {s}: {live} live copies in {c:?}, need {needed}"
                );
            }
        }
    }

    fn non_removed(&self) -> Vec<NodeId> {
        self.meta
            .members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Removed)
            .map(|(&id, _)| id)
            .collect()
    }

    fn random_action(&mut self, allow_changes: bool) {
        let shards = self.groups.len() as u64;
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        match self.rng.below(100) {
            0..=14 => {
                let s = self.rng.below(shards) as usize;
                self.write(s);
            }
            15..=17 if allow_changes => {
                if self.non_removed().len() < 7 {
                    let id = self.next_id;
                    self.next_id += 1;
                    let addr = format!("127.0.0.1:{}", 9000 + id);
                    if self.propose(MetaCommand::AddMember { id, addr }).is_ok() {
                        let node = Node {
                            up: true,
                            gone: false,
                            meta_applied: 0,
                        };
                        self.nodes.insert(id, node);
                    }
                }
            }
            18..=19 if allow_changes => {
                // Half the time the newest member: an add then its removal
                // sends shards back to nodes that dropped them (question 10).
                let members = self.non_removed();
                let newest = members.last().copied().filter(|_| self.rng.chance(50));
                if let Some(id) = newest.or_else(|| self.rng.pick(&members)) {
                    let _ = self.propose(MetaCommand::Leave { id });
                }
            }
            20..=22 => {
                if let Some(id) = self.rng.pick(&ids) {
                    self.crash(id);
                }
            }
            23..=27 => self.restart_all(),
            28..=29 => {
                // A retry or a duplicate of any earlier command.
                let cmd = self.log[self.rng.below(self.log.len() as u64) as usize].clone();
                let _ = self.propose(cmd);
            }
            30..=39 => self.schedule_tick(),
            40..=74 => {
                let s = self.rng.below(shards) as usize;
                self.executor_tick(s, 20);
            }
            75..=82 => {
                let s = self.rng.below(shards) as usize;
                self.replicate_learners(s);
            }
            83..=92 => {
                if let Some(id) = self.rng.pick(&ids) {
                    self.meta_catch_up(id, false);
                }
            }
            _ => {
                if let Some(id) = self.rng.pick(&ids) {
                    self.drop_tick(id);
                }
            }
        }
    }

    fn converged(&self) -> bool {
        self.meta.settled()
            && self
                .nodes
                .values()
                .all(|n| n.gone || n.meta_applied == self.log.len())
            && self.groups.iter().enumerate().all(|(s, g)| {
                let current: BTreeSet<NodeId> = self.meta.current[s].iter().copied().collect();
                let holders: BTreeSet<NodeId> = g.replicas.keys().copied().collect();
                g.effective().configs == vec![current.clone()]
                    && g.effective().learners.is_empty()
                    && holders == current
                    && g.effective_index() == self.meta.current_log_index[s]
            })
    }

    /// Everyone up, no more changes: run every loop until the layout settles.
    fn quiesce(&mut self, what: &str) -> usize {
        self.restart_all();
        for round in 0..2000 {
            if self.converged() {
                return round;
            }
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for &id in &ids {
                self.meta_catch_up(id, true);
            }
            self.schedule_tick();
            for s in 0..self.groups.len() {
                self.write(s);
                self.replicate_learners(s);
                self.executor_tick(s, 0);
            }
            for &id in &ids {
                self.drop_tick(id);
            }
            self.check(what);
        }
        panic!(
            "{what}: did not settle: state {:#?}\ngroups {:#?}",
            self.meta, self.groups
        );
    }

    fn final_checks(&self, what: &str) {
        let active: Vec<NodeId> = self.meta.active().collect();
        let expected = placement_over(active, self.meta.shards, self.meta.replicas);
        assert_eq!(self.meta.placement, expected, "{what}");
        assert_eq!(
            self.meta.current, expected,
            "{what}: current = ring placement"
        );
        let mut replay = ClusterState::default();
        for cmd in &self.log {
            let _ = apply(&mut replay, cmd);
        }
        assert_eq!(replay, self.meta, "{what}: replay differs");
        for (k, state) in self.history.iter().enumerate().skip(1) {
            assert!(state.version >= self.history[k - 1].version, "{what}");
        }
    }
}

fn seeds() -> u64 {
    std::env::var("KV_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

#[test]
fn random_adds_removes_and_crashes_keep_the_invariants_and_converge() {
    let mut totals = Stats::default();
    for seed in 0..seeds() {
        let mut rng = Rng::new(seed ^ 0xABCD);
        let members = 3 + rng.below(3);
        let replicas = 2 + rng.below(2) as u32;
        let shards = 4 + rng.below(13) as u32;
        let max_moves = 1 + rng.below(3) as u32;
        let mut world = World::new(seed, members, shards, replicas, max_moves);
        let what = format!("seed {seed} ({members} members, {shards}x{replicas}, max {max_moves})");
        for phase in 0..3 {
            for _ in 0..200 {
                world.random_action(true);
                world.check(&what);
            }
            // Sometimes let a change settle before the next one (so shards
            // go back to nodes that already dropped them), sometimes not.
            if phase == 2 || world.rng.chance(50) {
                world.quiesce(&what);
                world.final_checks(&what);
            }
        }
        world.final_checks(&what);
        totals.learners_added += world.stats.learners_added;
        totals.re_added_after_drop += world.stats.re_added_after_drop;
        totals.drops += world.stats.drops;
        totals.refusals += world.stats.refusals;
        totals.crashes += world.stats.crashes;
        totals.joint_crashes += world.stats.joint_crashes;
    }
    eprintln!("model totals over {} seeds: {totals:?}", seeds());
    // The runs exercised what they claim to.
    assert!(totals.crashes > 0 && totals.joint_crashes > 0, "{totals:?}");
    assert!(
        totals.drops > 0 && totals.re_added_after_drop > 0,
        "{totals:?}"
    );
    assert!(totals.refusals > 0, "{totals:?}");
}

/// §4.2's figure through the whole machinery: 3 → 4 members, 64 shards × 3
/// replicas moves exactly the 47 replicas the ring says (ideal 48), each
/// once, with and without crashes along the way.
#[test]
fn adding_a_fourth_node_moves_47_of_192_replicas() {
    for (seed, crashes) in [(1u64, false), (2, true), (3, true)] {
        let what = format!("3 -> 4, seed {seed}, crashes {crashes}");
        let mut world = World::new(seed, 3, 64, 3, 2);
        let before = world.meta.current.clone();
        let addr = "127.0.0.1:9004".to_owned();
        world
            .propose(MetaCommand::AddMember { id: 4, addr })
            .unwrap();
        world.nodes.insert(
            4,
            Node {
                up: true,
                gone: false,
                meta_applied: 0,
            },
        );
        if crashes {
            for _ in 0..3000 {
                // Only what a running cluster does by itself, plus crashes.
                match world.rng.below(10) {
                    0 => {
                        let id = 1 + world.rng.below(4);
                        world.crash(id);
                    }
                    1 => world.restart_all(),
                    _ => world.random_action(false),
                }
                world.check(&what);
            }
        }
        world.quiesce(&what);
        world.final_checks(&what);
        let after = placement_over(1..=4, 64, 3);
        assert_eq!(kv_cluster::replicas_to_move(&before, &after), 47);
        assert_eq!(world.meta.moves_done, 47, "{what}");
        assert_eq!(
            world.stats.learners_added, 47,
            "{what}: each replica copied once"
        );
        let moved: u64 = world.stats.drops;
        assert_eq!(moved, 47, "{what}: each old replica dropped once");
        let version = world.meta.version;
        // 1 bootstrap + add + activate + 47 × (admit, joint, done).
        assert_eq!(version, 1 + 2 + 47 * 3, "{what}");
    }
}

/// Open question 10: add node 4, let shards leave their old holders, then
/// remove node 4 so those shards go back to nodes that dropped them. The
/// returning replicas start from a snapshot (the model asserts that no
/// replica added back replays a configuration older than its re-add).
#[test]
fn a_node_added_back_to_a_group_it_left_starts_from_a_snapshot() {
    let mut world = World::new(7, 3, 16, 3, 2);
    let original = world.meta.current.clone();
    let addr = "127.0.0.1:9004".to_owned();
    world
        .propose(MetaCommand::AddMember { id: 4, addr })
        .unwrap();
    world.nodes.insert(
        4,
        Node {
            up: true,
            gone: false,
            meta_applied: 0,
        },
    );
    world.quiesce("add 4");
    let dropped_before = world.dropped.len();
    assert!(dropped_before > 0, "some shard left an old holder");
    // Writes after the first move, so that history is long.
    for s in 0..16 {
        for _ in 0..5 {
            world.write(s);
        }
    }
    world.propose(MetaCommand::Leave { id: 4 }).unwrap();
    world.quiesce("remove 4");
    world.final_checks("remove 4");
    assert_eq!(world.meta.current, original, "back to the 3-node layout");
    assert_eq!(world.meta.members[&4].state, MemberState::Removed);
    assert!(world.nodes[&4].gone, "node 4 exited");
    assert_eq!(
        world.stats.re_added_after_drop, dropped_before as u64,
        "every shard that left a node went back to it"
    );
    // A removed id cannot come back.
    let addr = "127.0.0.1:9004".to_owned();
    assert_eq!(
        world.propose(MetaCommand::AddMember { id: 4, addr }),
        Err(kv_cluster::Refusal::IdRemoved { id: 4 })
    );
}

/// Removing the node being added, mid-move: copying moves are cancelled
/// (their learners removed and dropped), joint ones finish and are undone.
#[test]
fn removing_a_joining_node_mid_move_rolls_it_back() {
    for seed in 0..20u64 {
        let what = format!("roll back, seed {seed}");
        let mut world = World::new(seed, 3, 16, 3, 3);
        let original = world.meta.current.clone();
        let addr = "127.0.0.1:9004".to_owned();
        world
            .propose(MetaCommand::AddMember { id: 4, addr })
            .unwrap();
        world.nodes.insert(
            4,
            Node {
                up: true,
                gone: false,
                meta_applied: 0,
            },
        );
        // Run until some move is copying or joint, then remove node 4.
        for _ in 0..5000 {
            if world.meta.moves.values().any(|m| m.phase != Phase::Planned) && world.rng.chance(5) {
                break;
            }
            world.random_action(false);
            world.check(&what);
        }
        world.propose(MetaCommand::Leave { id: 4 }).unwrap();
        world.quiesce(&what);
        world.final_checks(&what);
        assert_eq!(world.meta.current, original, "{what}");
        assert_eq!(world.meta.members[&4].state, MemberState::Removed, "{what}");
    }
}
