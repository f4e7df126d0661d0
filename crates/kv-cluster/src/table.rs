//! The leaders' table clients route by, and the wire types it is built from
//! (design §6.1, §11, §12).
//!
//! A node answers `GET /-/shards` with a [`ShardsView`]: per shard its
//! replicas, preferred leader, and the node's own view of the leader and term.
//! kv-proxy and kv-bench turn that into a [`ShardTable`] (key → shard →
//! leader address), send each request to the leader with `X-Kv-Route:
//! direct`, and learn from a `421` whose body is a [`NotLeader`]. The types
//! live here, not in kv-node, because node, proxy and bench must agree on
//! them field for field.
//!
//! **Terms order what a client believes.** Answers arrive from different
//! nodes at different times; one may still name a deposed leader. Raft has
//! at most one leader per term, so the table takes a leader only from a
//! newer term than it knows (or the same term when it knows no leader for
//! it, or the same leader at a new address): an old answer can never replace
//! a newer one. A view that knows only a newer term, without a leader (an
//! election in progress), clears the leader, so the client waits for one
//! instead of hammering the deposed node.
//!
//! **Placement versions order the layout** (issue 13, `docs/membership.md`
//! §6). Members and replica sets change when nodes join or leave; every
//! change bumps the cluster's placement version, which a node shows in
//! `/-/shards` ([`crate::PlacementFields`]) and in the
//! [`crate::PLACEMENT_VERSION_HEADER`] of every answer. The table keeps the
//! version of the layout it holds and takes members and replicas from an
//! answer of that version or newer ([`ShardTable::merge`]): a node that has
//! not applied the last change yet does not take a member back. Leaders are
//! still merged by term from any answer of the same cluster, since terms
//! order leaders whatever the layout, but only for members of the table's
//! layout. A node that predates issue 13 shows no version: version 0.
//!
//! **No version is trusted for good** (review R1). A version is a number
//! some node said; one node that says `u64::MAX` once (a bug, another
//! program on a member's port) must not pin the layout, and a cluster wiped
//! and created again at the same addresses starts again at version 1 (and
//! term 1). So:
//!
//! - The version is keyed by the cluster id a node shows beside it
//!   ([`Placement`]). An answer of another cluster is not compared by
//!   version at all: it rebuilds the table from scratch (the caller logs
//!   "cluster id changed"), unless a source still shows the table's own
//!   cluster, in which case it is ignored whole, leaders included (a seed
//!   list that mixes two clusters stays on the first it found, instead of
//!   flapping between them).
//! - The table remembers what each source (an address it asks) showed last
//!   ([`ShardTable::source_failed`] forgets a source that did not answer).
//!   The table's layout is *backed* while some source's last answer shows
//!   its cluster at its version or newer. An unbacked layout is one nobody
//!   vouches for any more: then the newest layout the sources do show is
//!   taken, even though its version is lower ([`Taken::WentBack`]). In one
//!   honest cluster that only happens when every node that applied the
//!   newest change stops answering at once; the cost is a layout one change
//!   old until one of them answers again.
//!
//! Node ids and terms are only ever compared within one cluster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::ClusterId;
use crate::shard::{shard_of, MAX_SHARDS};
use crate::spec::check_addr;

/// Status of a "not leader" answer: `421 Misdirected Request`.
pub const NOT_LEADER_STATUS: u16 = 421;
/// The `error` field of a [`NotLeader`] body.
pub const NOT_LEADER_ERROR: &str = "not leader";
/// Request header by which kv-proxy and kv-bench ask for a 421 instead of
/// the node forwarding to the leader itself.
pub const ROUTE_HEADER: &str = "x-kv-route";
/// The value of [`ROUTE_HEADER`] that asks for it.
pub const ROUTE_DIRECT: &str = "direct";
/// Response header of a 421 carrying the leader's address.
pub const LEADER_HEADER: &str = "x-kv-leader";
/// Response header of a forwarded answer carrying the leader's id.
pub const LEADER_ID_HEADER: &str = "x-kv-leader-id";
/// Header on every node-to-node request (Raft traffic, forwarded client
/// requests): the sender's cluster id (design §8). A node of another
/// cluster refuses the request with 409.
pub const CLUSTER_ID_HEADER: &str = "x-kv-cluster-id";
/// Header on every node-to-node request: the sender's member id.
pub const NODE_ID_HEADER: &str = "x-kv-node-id";

/// The body of `GET /-/shards` (design §11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardsView {
    /// Number of shards.
    pub shards: u32,
    /// Replicas per shard.
    pub replicas: u32,
    /// The answering node.
    pub node_id: u64,
    /// Member id → address (JSON object keys are the ids as strings).
    pub members: BTreeMap<u64, String>,
    /// One entry per shard, in shard order.
    pub groups: Vec<GroupView>,
}

/// One shard in a [`ShardsView`]. `leader` and `term` are the answering
/// node's view; the indexes are its own replica's (`null` when it does not
/// host the shard, or has no snapshot yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// Shard number.
    pub shard: u32,
    /// Member ids holding it, in placement order.
    pub replicas: Vec<u64>,
    /// Who should lead it ([`crate::preferred_leaders`]).
    pub preferred_leader: u64,
    /// Current leader, if known.
    pub leader: Option<u64>,
    /// Term of that knowledge, if any.
    pub term: Option<u64>,
    /// Highest index known committed on this replica.
    #[serde(default)]
    pub committed: Option<u64>,
    /// Highest index applied on this replica.
    #[serde(default)]
    pub applied: Option<u64>,
    /// Index of the newest snapshot.
    #[serde(default)]
    pub snapshot: Option<u64>,
    /// Highest index dropped from the log.
    #[serde(default)]
    pub purged: Option<u64>,
    /// Whether the answering node holds a replica.
    pub hosted: bool,
}

/// The body of a 421 answer (design §6.1): given before anything was
/// proposed, so retrying at `leader_addr` is safe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotLeader {
    /// Always [`NOT_LEADER_ERROR`], the same `error` field every error has.
    pub error: String,
    /// The key's shard.
    pub shard: u32,
    /// The leader's member id.
    pub leader: u64,
    /// Where to send the request instead.
    pub leader_addr: String,
    /// The term in which `leader` leads.
    pub term: u64,
}

impl NotLeader {
    /// A 421 body naming `leader` at `leader_addr` for `shard` in `term`.
    pub fn new(shard: u32, leader: u64, leader_addr: impl Into<String>, term: u64) -> Self {
        Self {
            error: NOT_LEADER_ERROR.to_owned(),
            shard,
            leader,
            leader_addr: leader_addr.into(),
            term,
        }
    }
}

/// Why a `/-/shards` answer cannot be routed by.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Not the JSON shape of [`ShardsView`].
    #[error("/-/shards answer is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// `shards` outside 1..=[`MAX_SHARDS`].
    #[error("/-/shards says {shards} shards; expected 1..={MAX_SHARDS}")]
    ShardCount {
        /// The count given.
        shards: u32,
    },
    /// `groups` does not list every shard once, in order.
    #[error("/-/shards lists {} at position {position} (of {shards} shards); expected every shard once, in order", found.map_or("nothing".to_owned(), |shard| format!("shard {shard}")))]
    Groups {
        /// Where in `groups`.
        position: usize,
        /// What was there (`None`: the list ended early).
        found: Option<u32>,
        /// The shard count.
        shards: u32,
    },
    /// A leader or replica id that is not a member, so it has no address.
    #[error("/-/shards names node {id} for shard {shard}, which is not among its members")]
    UnknownMember {
        /// The shard.
        shard: u32,
        /// The id.
        id: u64,
    },
    /// A member address a client could not connect to.
    #[error("/-/shards gives member {id} the address {addr:?}, which is not HOST:PORT")]
    BadAddr {
        /// The member.
        id: u64,
        /// Its address.
        addr: String,
    },
    /// A refresh from a cluster with another shard count: the client was
    /// pointed at a different cluster.
    #[error(
        "/-/shards now says {got} shards, but this table has {had}; is this the same cluster?"
    )]
    ShardCountChanged {
        /// The table's count.
        had: u32,
        /// The answer's count.
        got: u32,
    },
}

/// A shard's leader as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Member id.
    pub id: u64,
    /// Where to send requests.
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    replicas: Vec<u64>,
    term: Option<u64>,
    leader: Option<Leader>,
}

/// Key → shard → leader address, kept fresh from `/-/shards` answers and
/// 421s by the rules in the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTable {
    shards: u32,
    /// The cluster the layout is of (`None`: its nodes show no id).
    cluster: Option<ClusterId>,
    /// The placement version of the members and replicas held.
    version: u64,
    members: BTreeMap<u64, String>,
    entries: Vec<Entry>,
    /// Source address → what its last answer showed (module docs: what
    /// backs the layout).
    shown: BTreeMap<String, Placement>,
}

/// What a `/-/shards` answer says of the layout it shows: whose cluster,
/// which placement version. Versions of two clusters are not comparable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    /// The cluster id (`None`: the node does not show one).
    pub cluster: Option<ClusterId>,
    /// The placement version (0: none shown).
    pub version: u64,
}

impl Placement {
    /// Of `version` in `cluster`.
    pub fn new(cluster: Option<ClusterId>, version: u64) -> Self {
        Self { cluster, version }
    }

    /// Read from a `/-/shards` body: its `cluster_id` and `version` fields
    /// ([`crate::PlacementFields`]), absent ones `None` and 0.
    pub fn of(body: &[u8]) -> Self {
        match crate::view::PlacementFields::parse(body) {
            Ok(fields) => Self {
                cluster: fields.cluster_id,
                version: fields.version.unwrap_or(0),
            },
            Err(_) => Self::default(),
        }
    }
}

/// What [`ShardTable::merge`] took from an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Its members and replicas (its version is the table's or newer), and
    /// leaders by term.
    Layout,
    /// Leaders by term only: its layout is older than the table's, which
    /// another source still shows.
    Leaders,
    /// Its layout although older: no source shows the table's version any
    /// more, and this is the newest one shown (module docs).
    WentBack {
        /// The version the table held.
        from: u64,
        /// The version it holds now.
        to: u64,
    },
    /// The table was rebuilt from it: another cluster's answer, and no
    /// source shows the table's cluster any more.
    NewCluster {
        /// The cluster the table followed.
        from: ClusterId,
        /// The one it follows now.
        to: ClusterId,
    },
    /// Nothing: another cluster's answer while a source still shows the
    /// table's cluster (at any version).
    OtherCluster {
        /// The answer's cluster.
        theirs: ClusterId,
        /// The table's.
        ours: ClusterId,
    },
}

/// What [`ShardTable::merge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merge {
    /// What of the answer was taken.
    pub taken: Taken,
    /// How many shards' leader or term changed.
    pub changed: usize,
}

impl Merge {
    /// Whether anything of the answer was taken (a layout or leaders).
    pub fn took(&self) -> bool {
        !matches!(self.taken, Taken::OtherCluster { .. })
    }
}

impl ShardsView {
    /// Parses a `GET /-/shards` body and checks it can be routed by.
    pub fn parse(body: &[u8]) -> Result<Self, TableError> {
        let view: Self = serde_json::from_slice(body)?;
        view.check()?;
        Ok(view)
    }

    /// Shard count in range, every shard once and in order, every id named
    /// a member, every address `HOST:PORT`.
    pub fn check(&self) -> Result<(), TableError> {
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(TableError::ShardCount {
                shards: self.shards,
            });
        }
        for (&id, addr) in &self.members {
            if check_addr(addr).is_err() {
                return Err(TableError::BadAddr {
                    id,
                    addr: addr.clone(),
                });
            }
        }
        for position in 0..(self.shards as usize).max(self.groups.len()) {
            let found = self.groups.get(position).map(|group| group.shard);
            if found != Some(position as u32) || position >= self.shards as usize {
                return Err(TableError::Groups {
                    position,
                    found,
                    shards: self.shards,
                });
            }
        }
        for group in &self.groups {
            for &id in group.replicas.iter().chain(&group.leader) {
                if !self.members.contains_key(&id) {
                    return Err(TableError::UnknownMember {
                        shard: group.shard,
                        id,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The placement version a `/-/shards` body shows: its `version` field
/// ([`crate::PlacementFields`]), 0 when absent (a node that predates issue
/// 13, or one whose metadata group has not bootstrapped yet).
pub fn placement_version(body: &[u8]) -> u64 {
    crate::view::PlacementFields::parse(body)
        .ok()
        .and_then(|fields| fields.version)
        .unwrap_or(0)
}

/// What a client shows of its [`ShardTable`] (kv-proxy's `GET
/// /-/proxy/shards`), so two clients' tables can be compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableView {
    /// The cluster the layout is of (`null`: its nodes show no id).
    #[serde(default)]
    pub cluster_id: Option<ClusterId>,
    /// The placement version of the members and replicas.
    pub version: u64,
    /// Number of shards.
    pub shards: u32,
    /// Member id → address (JSON object keys are the ids as strings).
    pub members: BTreeMap<u64, String>,
    /// One entry per shard, in shard order.
    pub groups: Vec<TableGroup>,
}

/// One shard in a [`TableView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableGroup {
    /// Shard number.
    pub shard: u32,
    /// The leader's member id, if known.
    pub leader: Option<u64>,
    /// Where requests for it go, if known.
    pub leader_addr: Option<String>,
    /// The newest term known.
    pub term: Option<u64>,
    /// Member ids holding it, in placement order.
    pub replicas: Vec<u64>,
}

impl ShardTable {
    /// Parses a `GET /-/shards` body into a table, with the placement
    /// version the body shows.
    pub fn parse(body: &[u8]) -> Result<Self, TableError> {
        Self::from_view_at(ShardsView::parse(body)?, placement_version(body))
    }

    /// A table from a view of version 0 (checked again: it may not come
    /// from `parse`).
    pub fn from_view(view: ShardsView) -> Result<Self, TableError> {
        Self::from_view_at(view, 0)
    }

    /// A table from a view of placement version `version` (no cluster id).
    pub fn from_view_at(view: ShardsView, version: u64) -> Result<Self, TableError> {
        Self::from_view_in(view, Placement::new(None, version))
    }

    /// A table from `source`'s answer: `view`, showing `placement`. Later
    /// answers go to [`ShardTable::merge`].
    pub fn from_answer(
        source: &str,
        view: ShardsView,
        placement: Placement,
    ) -> Result<Self, TableError> {
        let mut table = Self::from_view_in(view, placement)?;
        table.shown.insert(source.to_owned(), placement);
        Ok(table)
    }

    /// A table from a view showing `placement`.
    pub fn from_view_in(view: ShardsView, placement: Placement) -> Result<Self, TableError> {
        view.check()?;
        let entries = view
            .groups
            .iter()
            .map(|group| Entry {
                replicas: group.replicas.clone(),
                term: group.term,
                leader: group.leader.and_then(|id| {
                    view.members.get(&id).map(|addr| Leader {
                        id,
                        addr: addr.clone(),
                    })
                }),
            })
            .collect();
        Ok(Self {
            shards: view.shards,
            cluster: placement.cluster,
            version: placement.version,
            members: view.members,
            entries,
            shown: BTreeMap::new(),
        })
    }

    /// [`ShardTable::refresh_at`] for an answer of version 0.
    pub fn refresh(&mut self, view: ShardsView) -> Result<usize, TableError> {
        self.refresh_at(view, 0)
    }

    /// Merges an answer of placement version `version` from any node.
    /// Members and replicas are taken as given from an answer of the
    /// table's version or newer, never from an older one; a leader that is
    /// no longer a member is forgotten, one whose address changed is
    /// readdressed. Leaders are merged by the term rules, for members of the
    /// table's (newest) layout only. Returns how many shards' leader or term
    /// changed.
    ///
    /// This is the merge of one answer on its own, by version alone: no
    /// cluster id, no source; clients use [`ShardTable::merge`].
    pub fn refresh_at(&mut self, view: ShardsView, version: u64) -> Result<usize, TableError> {
        let layout = version >= self.version;
        self.merge_view(view, version, layout)
    }

    /// Merges `source`'s answer `view`, which shows `placement`, by the
    /// rules of the module docs: another cluster's rebuilds the table or is
    /// ignored; within the cluster, the layout is taken from an answer of
    /// the table's version or newer, or from the newest one shown once the
    /// table's is not shown by any source; leaders by term.
    pub fn merge(
        &mut self,
        source: &str,
        view: ShardsView,
        placement: Placement,
    ) -> Result<Merge, TableError> {
        view.check()?;
        self.shown.insert(source.to_owned(), placement);
        if let (Some(ours), Some(theirs)) = (self.cluster, placement.cluster) {
            if ours != theirs {
                if self.shown.values().any(|shown| shown.cluster == Some(ours)) {
                    return Ok(Merge {
                        taken: Taken::OtherCluster { theirs, ours },
                        changed: 0,
                    });
                }
                let mut table = Self::from_view_in(view, placement)?;
                table.shown = std::mem::take(&mut self.shown);
                *self = table;
                return Ok(Merge {
                    taken: Taken::NewCluster {
                        from: ours,
                        to: theirs,
                    },
                    changed: self.shards as usize,
                });
            }
        }
        let from = self.version;
        let taken = if placement.version >= self.version {
            Taken::Layout
        } else if placement.cluster == self.cluster && !self.backed() && self.newest(placement) {
            Taken::WentBack {
                from,
                to: placement.version,
            }
        } else {
            Taken::Leaders
        };
        let layout = !matches!(taken, Taken::Leaders);
        let changed = match self.merge_view(view, placement.version, layout) {
            Ok(changed) => changed,
            Err(error) => {
                self.shown.remove(source);
                return Err(error);
            }
        };
        if layout && placement.cluster.is_some() {
            self.cluster = placement.cluster;
        }
        Ok(Merge { taken, changed })
    }

    /// Forgets what `source` showed: it did not answer (or answered
    /// nothing usable), so it no longer backs any layout.
    pub fn source_failed(&mut self, source: &str) {
        self.shown.remove(source);
    }

    /// Forgets what every source but `sources` showed: a member that left
    /// and is asked no more must not back a layout for good.
    pub fn keep_sources(&mut self, sources: &[String]) {
        self.shown.retain(|source, _| sources.contains(source));
    }

    /// Whether some source's last answer shows the table's cluster at its
    /// version or newer.
    fn backed(&self) -> bool {
        self.shown
            .values()
            .any(|shown| shown.cluster == self.cluster && shown.version >= self.version)
    }

    /// Whether `placement` is the newest version any source shows of its
    /// cluster.
    fn newest(&self, placement: Placement) -> bool {
        self.shown
            .values()
            .filter(|shown| shown.cluster == placement.cluster)
            .all(|shown| shown.version <= placement.version)
    }

    /// Merges `view` of `version`, its members and replicas too when
    /// `layout`.
    fn merge_view(
        &mut self,
        view: ShardsView,
        version: u64,
        layout: bool,
    ) -> Result<usize, TableError> {
        view.check()?;
        if view.shards != self.shards {
            return Err(TableError::ShardCountChanged {
                had: self.shards,
                got: view.shards,
            });
        }
        let mut changed = vec![false; self.entries.len()];
        if layout {
            self.version = version;
            self.members = view.members;
            for (shard, group) in view.groups.iter().enumerate() {
                if let Some(entry) = self.entries.get_mut(shard) {
                    entry.replicas.clone_from(&group.replicas);
                }
            }
            self.forget_departed(&mut changed);
        }
        for group in view.groups {
            let shard = group.shard;
            let learned = match (group.leader, group.term) {
                (Some(id), Some(term)) => match self.members.get(&id).cloned() {
                    Some(addr) => self.update_leader(shard, id, addr, term),
                    None => false,
                },
                (None, Some(term)) => self.newer_term_without_leader(shard, term),
                // A leader without a term cannot be ordered; ignore it.
                (_, None) => false,
            };
            if let Some(slot) = changed.get_mut(shard as usize) {
                *slot |= learned;
            }
        }
        Ok(changed.iter().filter(|&&c| c).count())
    }

    /// Forgets leaders that are no longer members and readdresses those
    /// whose member address changed, keeping their terms; marks the shards
    /// it changed in `changed`.
    fn forget_departed(&mut self, changed: &mut [bool]) {
        for (entry, changed) in self.entries.iter_mut().zip(changed) {
            let Some(leader) = &mut entry.leader else {
                continue;
            };
            match self.members.get(&leader.id) {
                Some(addr) if *addr == leader.addr => continue,
                Some(addr) => leader.addr.clone_from(addr),
                None => entry.leader = None,
            }
            *changed = true;
        }
    }

    /// Takes `id` at `addr` as the leader of `shard` if `term` is newer than
    /// the table's, or equal with no leader known, or equal naming the same
    /// leader (an address update). Returns whether it took it.
    pub fn update_leader(
        &mut self,
        shard: u32,
        id: u64,
        addr: impl Into<String>,
        term: u64,
    ) -> bool {
        let addr = addr.into();
        if check_addr(&addr).is_err() {
            return false;
        }
        let Some(entry) = self.entries.get_mut(shard as usize) else {
            return false;
        };
        let newer = match entry.term {
            None => true,
            Some(known) if term > known => true,
            Some(known) if term == known => match &entry.leader {
                None => true,
                Some(leader) => leader.id == id && leader.addr != addr,
            },
            Some(_) => false,
        };
        if newer {
            entry.term = Some(term);
            entry.leader = Some(Leader { id, addr });
        }
        newer
    }

    /// [`ShardTable::update_leader`] from a 421 body.
    pub fn apply_not_leader(&mut self, answer: &NotLeader) -> bool {
        self.update_leader(
            answer.shard,
            answer.leader,
            answer.leader_addr.clone(),
            answer.term,
        )
    }

    /// Forgets `shard`'s leader but keeps its term (its address refused a
    /// connection): the next answer of the same term or newer is taken.
    pub fn clear_leader(&mut self, shard: u32) {
        if let Some(entry) = self.entries.get_mut(shard as usize) {
            entry.leader = None;
        }
    }

    fn newer_term_without_leader(&mut self, shard: u32, term: u64) -> bool {
        match self.entries.get_mut(shard as usize) {
            Some(entry) if entry.term.is_none_or(|known| term > known) => {
                entry.term = Some(term);
                entry.leader = None;
                true
            }
            _ => false,
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The placement version of the members and replicas held (0: the
    /// nodes show none).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The cluster the layout is of (`None`: its nodes show no id).
    pub fn cluster(&self) -> Option<ClusterId> {
        self.cluster
    }

    /// The table as [`TableView`] shows it.
    pub fn view(&self) -> TableView {
        TableView {
            cluster_id: self.cluster,
            version: self.version,
            shards: self.shards,
            members: self.members.clone(),
            groups: self
                .entries
                .iter()
                .enumerate()
                .map(|(shard, entry)| TableGroup {
                    shard: shard as u32,
                    leader: entry.leader.as_ref().map(|leader| leader.id),
                    leader_addr: entry.leader.as_ref().map(|leader| leader.addr.clone()),
                    term: entry.term,
                    replicas: entry.replicas.clone(),
                })
                .collect(),
        }
    }

    /// Whether `addr` is a member's address, or a known leader's.
    pub fn knows_addr(&self, addr: &str) -> bool {
        self.members.values().any(|known| known == addr)
            || self
                .entries
                .iter()
                .any(|entry| entry.leader.as_ref().is_some_and(|l| l.addr == addr))
    }

    /// The shard of `key` in this cluster.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        shard_of(key, self.shards)
    }

    /// Where to send a request for `key`, if its shard's leader is known.
    pub fn leader_addr(&self, key: &[u8]) -> Option<&str> {
        self.leader(self.shard_of(key))
            .map(|leader| leader.addr.as_str())
    }

    /// `shard`'s leader, if known.
    pub fn leader(&self, shard: u32) -> Option<&Leader> {
        self.entries.get(shard as usize)?.leader.as_ref()
    }

    /// The newest term known for `shard`.
    pub fn term(&self, shard: u32) -> Option<u64> {
        self.entries.get(shard as usize)?.term
    }

    /// `shard`'s replicas, in placement order.
    pub fn replicas(&self, shard: u32) -> &[u64] {
        self.entries
            .get(shard as usize)
            .map_or(&[], |entry| entry.replicas.as_slice())
    }

    /// Member id → address, as last answered.
    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of design §11, extended to 4 shards.
    const VIEW: &str = r#"{"shards": 4, "replicas": 3, "node_id": 1,
        "members": {"1": "127.0.0.1:8081", "2": "127.0.0.1:8082", "3": "127.0.0.1:8083"},
        "groups": [
          {"shard": 0, "replicas": [1, 2, 3], "preferred_leader": 2, "leader": 2, "term": 5,
           "committed": 1234, "applied": 1234, "snapshot": 1000, "purged": 1000, "hosted": true},
          {"shard": 1, "replicas": [2, 3, 1], "preferred_leader": 3, "leader": 3, "term": 2,
           "committed": 10, "applied": 9, "snapshot": null, "purged": null, "hosted": true},
          {"shard": 2, "replicas": [3, 1, 2], "preferred_leader": 1, "leader": null, "term": 7,
           "committed": 0, "applied": 0, "snapshot": null, "purged": null, "hosted": true},
          {"shard": 3, "replicas": [1, 3, 2], "preferred_leader": 1, "leader": 1, "term": 1,
           "committed": null, "applied": null, "snapshot": null, "purged": null, "hosted": false}
        ]}"#;

    fn table() -> ShardTable {
        ShardTable::parse(VIEW.as_bytes()).unwrap()
    }

    fn key_in(table: &ShardTable, shard: u32) -> Vec<u8> {
        (0..)
            .map(|i| format!("key_{i}").into_bytes())
            .find(|key| table.shard_of(key) == shard)
            .unwrap()
    }

    #[test]
    fn parses_the_documented_shape_and_round_trips() {
        let view = ShardsView::parse(VIEW.as_bytes()).unwrap();
        assert_eq!(view.groups[0].preferred_leader, 2);
        assert_eq!(view.groups[1].snapshot, None);
        assert_eq!(view.groups[2].leader, None);
        assert!(!view.groups[3].hosted);
        assert_eq!(view.members[&3], "127.0.0.1:8083");
        let json = serde_json::to_string(&view).unwrap();
        assert!(
            json.contains(r#""members":{"1":"127.0.0.1:8081""#),
            "{json}"
        );
        assert!(json.contains(r#""leader":null"#), "{json}");
        assert_eq!(ShardsView::parse(json.as_bytes()).unwrap(), view);
        // Clients need only shards, members and leaders: the replica's own
        // indexes may be left out.
        let lean = r#"{"shards": 1, "replicas": 1, "node_id": 1, "members": {"1": "h:1"},
            "groups": [{"shard": 0, "replicas": [1], "preferred_leader": 1, "leader": 1,
                        "term": 1, "hosted": true}]}"#;
        assert_eq!(
            ShardTable::parse(lean.as_bytes())
                .unwrap()
                .leader(0)
                .unwrap()
                .id,
            1
        );
    }

    #[test]
    fn routes_keys_to_their_shards_leader() {
        let table = table();
        assert_eq!(table.shards(), 4);
        assert_eq!(
            table.leader_addr(&key_in(&table, 0)),
            Some("127.0.0.1:8082")
        );
        assert_eq!(
            table.leader_addr(&key_in(&table, 1)),
            Some("127.0.0.1:8083")
        );
        assert_eq!(table.leader_addr(&key_in(&table, 2)), None, "election");
        assert_eq!(
            table.leader_addr(&key_in(&table, 3)),
            Some("127.0.0.1:8081")
        );
        assert_eq!(table.shard_of(b"hello"), shard_of(b"hello", 4));
        assert_eq!(table.replicas(1), &[2, 3, 1]);
        assert_eq!(table.replicas(9), &[] as &[u64]);
        assert_eq!(table.term(2), Some(7));
    }

    #[test]
    fn leaders_are_taken_only_from_newer_terms() {
        let mut table = table();
        // Older or equal term naming another leader: ignored.
        assert!(!table.update_leader(0, 3, "127.0.0.1:8083", 4));
        assert!(!table.update_leader(0, 3, "127.0.0.1:8083", 5));
        assert_eq!(table.leader(0).unwrap().id, 2);
        // Newer term: taken, even at an address not yet in members.
        assert!(table.update_leader(0, 3, "10.0.0.3:9000", 6));
        assert_eq!(
            table.leader(0),
            Some(&Leader {
                id: 3,
                addr: "10.0.0.3:9000".into()
            })
        );
        assert_eq!(table.term(0), Some(6));
        // The same leader at a new address in the same term: taken; the
        // same answer again: nothing changes.
        assert!(table.update_leader(0, 3, "127.0.0.1:8083", 6));
        assert!(!table.update_leader(0, 3, "127.0.0.1:8083", 6));
        // Shard 2 knows term 7 but no leader: the first leader of term 7 wins.
        assert!(table.update_leader(2, 1, "127.0.0.1:8081", 7));
        assert!(!table.update_leader(2, 2, "127.0.0.1:8082", 7));
        // Out-of-range shards and unusable addresses change nothing.
        assert!(!table.update_leader(4, 1, "127.0.0.1:8081", 99));
        assert!(!table.update_leader(1, 1, "not an address", 99));
        assert_eq!(table.leader(1).unwrap().id, 3);
    }

    #[test]
    fn not_leader_body_is_the_documented_json_and_updates_the_table() {
        let body = NotLeader::new(17, 2, "127.0.0.1:8082", 5);
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":"not leader","shard":17,"leader":2,"leader_addr":"127.0.0.1:8082","term":5}"#
        );
        let parsed: NotLeader = serde_json::from_str(
            r#"{"error": "not leader", "shard": 1, "leader": 1, "leader_addr": "127.0.0.1:8081", "term": 3}"#,
        )
        .unwrap();
        let mut table = table();
        assert!(table.apply_not_leader(&parsed));
        assert_eq!(
            table.leader_addr(&key_in(&table, 1)),
            Some("127.0.0.1:8081")
        );
        // A stale 421 (an older term) does not undo it.
        assert!(!table.apply_not_leader(&NotLeader::new(1, 3, "127.0.0.1:8083", 2)));
        assert_eq!(table.leader(1).unwrap().id, 1);
    }

    #[test]
    fn refresh_merges_by_term() {
        let mut table = table();
        let mut view = ShardsView::parse(VIEW.as_bytes()).unwrap();
        // Another node's view: shard 0 is a term behind (stale), shard 1 is
        // in a newer term with no leader yet, shard 2 got its leader.
        view.groups[0].leader = Some(1);
        view.groups[0].term = Some(4);
        view.groups[1].leader = None;
        view.groups[1].term = Some(3);
        view.groups[2].leader = Some(3);
        view.members.insert(3, "127.0.0.1:9083".into());
        assert_eq!(table.refresh(view.clone()).unwrap(), 2);
        assert_eq!(table.leader(0).unwrap().id, 2, "stale view ignored");
        assert_eq!(table.leader(1), None, "newer term clears the old leader");
        assert_eq!(table.term(1), Some(3));
        assert_eq!(table.leader(2).unwrap().addr, "127.0.0.1:9083");
        assert_eq!(table.members()[&3], "127.0.0.1:9083");
        // The same view again changes nothing.
        assert_eq!(table.refresh(view.clone()).unwrap(), 0);
        // A cluster with another shard count is refused.
        let other = r#"{"shards": 1, "replicas": 1, "node_id": 1, "members": {"1": "h:1"},
            "groups": [{"shard": 0, "replicas": [1], "preferred_leader": 1, "leader": 1,
                        "term": 1, "hosted": true}]}"#;
        let err = table
            .refresh(ShardsView::parse(other.as_bytes()).unwrap())
            .unwrap_err();
        assert!(matches!(
            err,
            TableError::ShardCountChanged { had: 4, got: 1 }
        ));
        // clear_leader keeps the term, so a same-term answer is taken again.
        table.clear_leader(2);
        assert_eq!(table.leader(2), None);
        assert!(table.update_leader(2, 3, "127.0.0.1:8083", 7));
    }

    #[test]
    fn malformed_views_are_refused_with_the_reason() {
        let view = ShardsView::parse(VIEW.as_bytes()).unwrap();
        let refuse = |change: &dyn Fn(&mut ShardsView)| {
            let mut bad = view.clone();
            change(&mut bad);
            let err = ShardTable::from_view(bad.clone()).unwrap_err();
            // And the same through the JSON path.
            let json = serde_json::to_vec(&bad).unwrap();
            assert_eq!(
                ShardTable::parse(&json).unwrap_err().to_string(),
                err.to_string()
            );
            err
        };
        assert!(matches!(
            refuse(&|v| v.shards = 0),
            TableError::ShardCount { shards: 0 }
        ));
        assert!(matches!(
            refuse(&|v| v.shards = 5),
            TableError::Groups {
                position: 4,
                found: None,
                ..
            }
        ));
        let swapped = refuse(&|v| v.groups.swap(1, 2));
        assert!(matches!(
            swapped,
            TableError::Groups {
                position: 1,
                found: Some(2),
                ..
            }
        ));
        assert!(
            swapped
                .to_string()
                .contains("lists shard 2 at position 1 (of 4 shards)"),
            "{swapped}"
        );
        assert!(matches!(
            refuse(&|v| v.groups.push(v.groups[3].clone())),
            TableError::Groups { position: 4, .. }
        ));
        let unknown = refuse(&|v| v.groups[1].leader = Some(9));
        assert!(matches!(
            unknown,
            TableError::UnknownMember { shard: 1, id: 9 }
        ));
        assert!(
            unknown.to_string().contains("node 9 for shard 1"),
            "{unknown}"
        );
        assert!(matches!(
            refuse(&|v| v.groups[0].replicas.push(4)),
            TableError::UnknownMember { shard: 0, id: 4 }
        ));
        assert!(matches!(
            refuse(&|v| {
                v.members.insert(2, "http://x/".into());
            }),
            TableError::BadAddr { id: 2, .. }
        ));
        // Not JSON, the wrong shape, a 404 page.
        for body in [
            &b""[..],
            b"not found",
            b"{\"shards\": 4}",
            b"[]",
            b"{\"error\": \"x\"}",
        ] {
            assert!(matches!(
                ShardTable::parse(body).unwrap_err(),
                TableError::Json(_)
            ));
        }
    }

    /// Issue 13: members and replicas follow the newest placement version;
    /// an older answer only ever adds leaders (by term) among them.
    #[test]
    fn refresh_keeps_the_newest_versions_members() {
        let old = ShardsView::parse(VIEW.as_bytes()).unwrap();
        let mut table = ShardTable::from_view_at(old.clone(), 1).unwrap();
        assert_eq!(table.version(), 1);
        // Version 2: node 4 joined and leads shard 1 (a newer term); node 1
        // left, so its leadership of shard 3 is forgotten; node 2 moved.
        let mut new = old.clone();
        new.members.remove(&1);
        new.members.insert(2, "127.0.0.1:9082".into());
        new.members.insert(4, "127.0.0.1:8084".into());
        for group in &mut new.groups {
            group.replicas = vec![2, 3, 4];
            group.preferred_leader = 2;
            if group.leader == Some(1) {
                group.leader = None;
            }
        }
        new.groups[1].leader = Some(4);
        new.groups[1].term = Some(3);
        assert_eq!(table.refresh_at(new.clone(), 2).unwrap(), 3);
        assert_eq!(table.version(), 2);
        assert_eq!(table.members().len(), 3);
        assert_eq!(table.replicas(0), &[2, 3, 4]);
        assert_eq!(table.leader(1).unwrap().addr, "127.0.0.1:8084");
        assert_eq!(table.leader(0).unwrap().addr, "127.0.0.1:9082", "moved");
        assert_eq!(table.leader(3), None, "node 1 left");
        assert_eq!(table.term(3), Some(1), "the term is kept");
        assert!(table.knows_addr("127.0.0.1:8084"));
        assert!(!table.knows_addr("127.0.0.1:8081"));

        // A node still at version 1 answers: nothing of its layout is
        // taken back, and its leader for shard 3 (node 1) is not a member.
        let mut lagging = old.clone();
        lagging.groups[3].term = Some(2);
        assert_eq!(table.refresh_at(lagging.clone(), 1).unwrap(), 0);
        assert_eq!(table.version(), 2);
        assert!(!table.members().contains_key(&1));
        assert_eq!(table.replicas(0), &[2, 3, 4]);
        assert_eq!(table.leader(1).unwrap().id, 4);
        assert_eq!(table.leader(3), None);
        // But a newer term among current members is learned from it too.
        lagging.groups[2].leader = Some(3);
        lagging.groups[2].term = Some(8);
        assert_eq!(table.refresh_at(lagging.clone(), 1).unwrap(), 1);
        assert_eq!(table.leader(2).unwrap().addr, "127.0.0.1:8083");
        // Version 0 (no version shown) is older than any version too.
        assert_eq!(table.refresh(old).unwrap(), 0);
        assert_eq!(table.version(), 2);

        let shown = table.view();
        assert_eq!(shown.version, 2);
        assert_eq!(shown.groups[1].leader, Some(4));
        assert_eq!(
            shown.groups[1].leader_addr.as_deref(),
            Some("127.0.0.1:8084")
        );
        assert_eq!(shown.groups[3].leader, None);
        let json = serde_json::to_string(&shown).unwrap();
        assert_eq!(serde_json::from_str::<TableView>(&json).unwrap(), shown);
    }

    #[test]
    fn the_version_is_read_from_the_body() {
        assert_eq!(placement_version(VIEW.as_bytes()), 0);
        assert_eq!(ShardTable::parse(VIEW.as_bytes()).unwrap().version(), 0);
        let mut object: serde_json::Value = serde_json::from_str(VIEW).unwrap();
        object["version"] = 7.into();
        let body = serde_json::to_vec(&object).unwrap();
        assert_eq!(placement_version(&body), 7);
        assert_eq!(ShardTable::parse(&body).unwrap().version(), 7);
        assert_eq!(placement_version(b"not json"), 0);
    }

    /// Every prefix of a valid answer (a connection cut mid-body) is refused,
    /// never half-applied.
    #[test]
    fn truncated_answers_are_refused() {
        let json = serde_json::to_vec(&ShardsView::parse(VIEW.as_bytes()).unwrap()).unwrap();
        for len in 0..json.len() {
            assert!(ShardTable::parse(&json[..len]).is_err(), "prefix of {len}");
        }
        assert!(ShardTable::parse(&json).is_ok());
    }

    fn with_node4(view: &ShardsView) -> ShardsView {
        let mut view = view.clone();
        view.members.insert(4, "127.0.0.1:8084".into());
        view.groups[2].leader = Some(4);
        view.groups[2].term = Some(8);
        view
    }

    /// Review R1: one answer with an absurd version pins the layout only
    /// while its source keeps showing it.
    #[test]
    fn an_absurd_version_is_dropped_once_no_source_shows_it() {
        let view = ShardsView::parse(VIEW.as_bytes()).unwrap();
        let at = |version| Placement::new(None, version);
        let mut table = ShardTable::from_answer("n1", view.clone(), at(1)).unwrap();
        let merged = table.merge("n3", view.clone(), at(u64::MAX)).unwrap();
        assert_eq!(merged.taken, Taken::Layout);
        assert_eq!(table.version(), u64::MAX);
        // The cluster moves to version 2 (node 4 leads shard 2); node 1
        // says so first, while node 3 still backs u64::MAX: leaders only,
        // among the table's members (node 4 is not one).
        let new = with_node4(&view);
        let merged = table.merge("n1", new.clone(), at(2)).unwrap();
        assert_eq!(merged.taken, Taken::Leaders);
        assert!(!table.members().contains_key(&4));
        // Node 3 now shows version 2 too: nobody shows u64::MAX any more.
        let merged = table.merge("n3", new.clone(), at(2)).unwrap();
        assert_eq!(
            merged.taken,
            Taken::WentBack {
                from: u64::MAX,
                to: 2
            }
        );
        assert_eq!(table.version(), 2);
        assert_eq!(table.leader(2).unwrap().addr, "127.0.0.1:8084");

        // A source that stops answering backs nothing either.
        let mut table = ShardTable::from_answer("n1", view.clone(), at(1)).unwrap();
        table.merge("n3", view.clone(), at(u64::MAX)).unwrap();
        table.source_failed("n3");
        assert!(matches!(
            table.merge("n1", new.clone(), at(2)).unwrap().taken,
            Taken::WentBack { to: 2, .. }
        ));
        // Nor does one no longer asked (a member that left).
        let mut table = ShardTable::from_answer("n1", view.clone(), at(1)).unwrap();
        table.merge("n3", view.clone(), at(u64::MAX)).unwrap();
        table.keep_sources(&["n1".to_owned(), "n2".to_owned()]);
        assert!(matches!(
            table.merge("n2", new, at(2)).unwrap().taken,
            Taken::WentBack { to: 2, .. }
        ));
    }

    /// Only the newest version shown is gone back to, and a lagging node
    /// never takes a member back while another shows the newest layout.
    #[test]
    fn going_back_takes_the_newest_layout_shown() {
        let view = ShardsView::parse(VIEW.as_bytes()).unwrap();
        let at = |version| Placement::new(None, version);
        let mut table = ShardTable::from_answer("n1", view.clone(), at(5)).unwrap();
        assert_eq!(
            table.merge("n2", view.clone(), at(3)).unwrap().taken,
            Taken::Leaders,
            "n1 still shows 5"
        );
        table.source_failed("n1");
        assert_eq!(
            table.merge("n3", view.clone(), at(2)).unwrap().taken,
            Taken::Leaders,
            "n2 shows 3, newer than n3's 2"
        );
        assert_eq!(
            table.merge("n2", view.clone(), at(3)).unwrap().taken,
            Taken::WentBack { from: 5, to: 3 }
        );
        assert_eq!(table.version(), 3);
        assert_eq!(table.merge("n1", view, at(6)).unwrap().taken, Taken::Layout);
        assert_eq!(table.version(), 6);
    }

    /// A cluster created again at the same addresses (new id, versions and
    /// terms from 1) is followed once no source shows the old one; a seed
    /// of another cluster beside a live one is ignored, leaders included.
    #[test]
    fn another_clusters_answer_rebuilds_the_table_once_ours_is_gone() {
        let (a, b) = (ClusterId(0xa), ClusterId(0xb));
        let old = ShardsView::parse(VIEW.as_bytes()).unwrap();
        let mut table =
            ShardTable::from_answer("n1", old.clone(), Placement::new(Some(a), 7)).unwrap();
        table
            .merge("n2", old.clone(), Placement::new(Some(a), 7))
            .unwrap();
        assert_eq!(table.cluster(), Some(a));
        // Cluster B: other leaders, term 1, version 1, two shards only.
        let mut new = old.clone();
        new.shards = 2;
        new.groups.truncate(2);
        for group in &mut new.groups {
            group.leader = Some(3);
            group.term = Some(1);
        }
        let merged = table
            .merge("n1", new.clone(), Placement::new(Some(b), 1))
            .unwrap();
        assert_eq!(
            merged.taken,
            Taken::OtherCluster { theirs: b, ours: a },
            "n2 still shows cluster A"
        );
        assert!(!merged.took());
        assert_eq!(table.leader(0).unwrap().id, 2, "no leader of B taken");
        assert_eq!(table.version(), 7);
        // n2 answers for B too: A is gone.
        let merged = table
            .merge("n2", new.clone(), Placement::new(Some(b), 1))
            .unwrap();
        assert_eq!(merged.taken, Taken::NewCluster { from: a, to: b });
        assert_eq!(table.cluster(), Some(b));
        assert_eq!(table.version(), 1);
        assert_eq!(table.shards(), 2);
        assert_eq!(table.leader(0).unwrap().id, 3, "term 1 after term 5");
        assert_eq!(table.view().cluster_id, Some(b));
        // From now on B's answers merge by its own versions and terms.
        assert_eq!(
            table
                .merge("n3", new, Placement::new(Some(b), 1))
                .unwrap()
                .taken,
            Taken::Layout
        );
        // A node that shows no id (not bootstrapped yet) is of no cluster
        // in particular: version 0, leaders by term only.
        assert_eq!(
            table
                .merge("n4", old.clone(), Placement::new(None, 0))
                .unwrap_err()
                .to_string(),
            "/-/shards now says 4 shards, but this table has 2; is this the same cluster?"
        );
        // A table of nodes that showed no id takes the first id it sees.
        let mut table = ShardTable::from_answer("n1", old.clone(), Placement::default()).unwrap();
        assert_eq!(
            table
                .merge("n2", old, Placement::new(Some(a), 1))
                .unwrap()
                .taken,
            Taken::Layout
        );
        assert_eq!(table.cluster(), Some(a));
    }

    #[test]
    fn the_placement_is_read_from_the_body() {
        let mut object: serde_json::Value = serde_json::from_str(VIEW).unwrap();
        assert_eq!(
            Placement::of(&serde_json::to_vec(&object).unwrap()),
            Placement::default()
        );
        object["version"] = 3.into();
        object["cluster_id"] = "00000000-0000-0000-0000-00000000000a".into();
        assert_eq!(
            Placement::of(&serde_json::to_vec(&object).unwrap()),
            Placement::new(Some(ClusterId(0xa)), 3)
        );
    }
}
