//! Durable storage for the Raft groups a node hosts: each group's log over
//! the node's one write-ahead log, and each shard's state machine over a
//! kv-store map with snapshot files (design `docs/replication.md` §4-5).
//!
//! - [`GroupLog`] (`log`): openraft's `RaftLogStorage` for one group, in
//!   memory and durable through [`kv_store::Store::submit_group`], so every
//!   group on the node shares one group commit;
//! - [`ShardSm`] (`sm`): openraft's `RaftStateMachine` for one shard, over a
//!   [`kv_store::Map`] that readers query directly;
//! - `snapshot`: the per-shard snapshot files under
//!   `<data_dir>/shards/<group>/`;
//! - [`NodeStorage`] (here): what kv-node opens once per node and asks for
//!   each group's pair.
//!
//! # Restart
//!
//! [`NodeStorage::open`] takes the groups' records the store recovered from
//! its WAL ([`kv_store::Store::take_recovered_groups`]). [`NodeStorage::group`]
//! then rebuilds the group's log from them, loads the shard's newest usable
//! snapshot into its map (falling back one generation past a damaged file),
//! and hands both to the caller for `Raft::new`; openraft re-applies the
//! committed entries after the snapshot itself.
//!
//! # Dropping a replica
//!
//! A replica that moved away ([`NodeStorage::drop_group`], issue 13,
//! `docs/membership.md` §5) is forgotten in three steps, each safe to be
//! interrupted by a crash: a `GroupRecord::Drop` made durable in the WAL
//! (from then on recovery reports the group dropped and its old log
//! entries no longer pin WAL segments), then `shards/<g>/` renamed to
//! `shards/dropped-<g>/` (one atomic step, synced), then that deleted.
//! [`NodeStorage::open`] finishes whatever a crash interrupted: it deletes
//! every `dropped-*` directory and the leftover `shards/<g>/` of a group
//! whose last record is a drop, so a snapshot whose vote and log are gone
//! is never loaded again. The group id can be hosted again later: it then
//! starts empty, as a new replica.
//!
//! # kv-store in cluster mode
//!
//! The store's own map stays empty: kv-node never calls `Store::put` or
//! `delete` in cluster mode, so the store's map snapshots are empty files
//! and serve only to rotate and retire WAL segments, which happens once the
//! groups have purged the entries those segments hold.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kv_store::{GroupRecord, RecoveredGroup, Store, StoreError};
use parking_lot::Mutex;

mod log;
mod sched;
mod sm;
mod snapshot;

pub use self::log::GroupLog;
pub use sched::SnapshotScheduler;
pub use sm::{digest_entries, ShardSm, ShardSnapshotBuilder};

use crate::types::GroupId;

/// One group's Raft handle over its shard state machine.
pub type ShardRaft = crate::types::Raft<ShardSm>;

/// Why a group's storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A record the WAL holds for the group does not decode: written by an
    /// incompatible version, or damaged past its checksum.
    #[error("shard {group}: the write-ahead log holds an undecodable {what}: {reason}")]
    Undecodable {
        group: GroupId,
        what: &'static str,
        reason: String,
    },
    /// Snapshot files exist for the shard and none of them is usable.
    #[error(
        "shard {group}: no usable snapshot ({problems}); refusing to start this shard rather \
         than serve it without the writes those files held. Restore the files, or remove this \
         node's data dir and let it rejoin as a new replica"
    )]
    SnapshotUnusable { group: GroupId, problems: String },
    /// The WAL did not make a group's drop record durable (the replica's
    /// files are left as they were).
    #[error("shard {group}: cannot log the drop of this replica: {source}")]
    DropNotLogged {
        group: GroupId,
        #[source]
        source: StoreError,
    },
    /// The snapshot that loaded does not reach where the log was purged:
    /// the entries between are gone from this node.
    #[error(
        "shard {group}: the snapshot loaded ends at {applied} but the log was purged up to \
         {purged}: the entries between are lost here. Restore the newest snapshot file, or \
         remove this node's data dir and let it rejoin as a new replica"
    )]
    Unreplayable {
        group: GroupId,
        applied: String,
        purged: u64,
    },
}

/// A node's Raft storage: one per node, over the store kv-node opened.
pub struct NodeStorage {
    store: Arc<Store>,
    shards_dir: PathBuf,
    recovered: Mutex<BTreeMap<GroupId, RecoveredGroup>>,
    opened: Mutex<HashMap<GroupId, (GroupLog, ShardSm)>>,
}

impl std::fmt::Debug for NodeStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeStorage")
            .field("shards_dir", &self.shards_dir)
            .finish_non_exhaustive()
    }
}

/// Where a dropped replica's directory goes before it is deleted.
const DROPPED_PREFIX: &str = "dropped-";

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Deletes `shards/<group>/` as §5 says: renamed to `dropped-<group>` and
/// the rename synced (so a crash leaves either the old name, which the
/// drop record condemns, or the new one, which [`NodeStorage::open`]
/// deletes), then deleted. Nothing there is fine. Blocking.
fn remove_shard_dir(shards_dir: &Path, group: GroupId) -> Result<(), StorageError> {
    let dir = shards_dir.join(group.to_string());
    let doomed = shards_dir.join(format!("{DROPPED_PREFIX}{group}"));
    if doomed.exists() {
        // An earlier deletion that failed half way.
        std::fs::remove_dir_all(&doomed).map_err(io_error("delete", &doomed))?;
    }
    match std::fs::rename(&dir, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("rename", &dir)(e)),
    }
    snapshot::sync_dir(shards_dir).map_err(io_error("sync", shards_dir))?;
    std::fs::remove_dir_all(&doomed).map_err(io_error("delete", &doomed))
}

impl NodeStorage {
    /// `store` was opened by kv-node on the data dir (cluster mode);
    /// snapshots live under `dir/shards/`. Takes the groups the store
    /// recovered (once: a second `NodeStorage` over the same store would
    /// find none), and finishes drops a crash interrupted (module docs):
    /// a dropped group is then unknown here. Blocking.
    pub fn open(store: Arc<Store>, dir: &Path) -> Result<NodeStorage, StorageError> {
        let shards_dir = dir.join("shards");
        std::fs::create_dir_all(&shards_dir).map_err(io_error("create", &shards_dir))?;
        let items = std::fs::read_dir(&shards_dir).map_err(io_error("list", &shards_dir))?;
        for item in items {
            let item = item.map_err(io_error("list", &shards_dir))?;
            if item
                .file_name()
                .to_string_lossy()
                .starts_with(DROPPED_PREFIX)
            {
                let path = item.path();
                std::fs::remove_dir_all(&path).map_err(io_error("delete", &path))?;
            }
        }
        let mut recovered = store.take_recovered_groups();
        let dropped: Vec<GroupId> = recovered
            .iter()
            .filter(|(_, group)| group.dropped)
            .map(|(&id, _)| id)
            .collect();
        for group in dropped {
            remove_shard_dir(&shards_dir, group)?;
            recovered.remove(&group);
        }
        Ok(NodeStorage {
            store,
            shards_dir,
            recovered: Mutex::new(recovered),
            opened: Mutex::new(HashMap::new()),
        })
    }

    /// The groups that have a log or snapshot on this node (recovered from
    /// the WAL, or with a snapshot directory), opened or not.
    pub fn known_groups(&self) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> = self.recovered.lock().keys().copied().collect();
        groups.extend(self.opened.lock().keys().copied());
        if let Ok(items) = std::fs::read_dir(&self.shards_dir) {
            groups.extend(
                items
                    .flatten()
                    .filter_map(|item| item.file_name().to_str()?.parse::<GroupId>().ok()),
            );
        }
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// The group's log and state machine: recovered from the WAL +
    /// snapshot if it ever existed here, else empty. Asking again for the
    /// same group returns handles to the same log and state machine.
    /// Blocking (reads snapshot files).
    pub fn group(&self, group: GroupId) -> Result<(GroupLog, ShardSm), StorageError> {
        let mut opened = self.opened.lock();
        if let Some((log, sm)) = opened.get(&group) {
            return Ok((log.clone(), sm.clone()));
        }
        let dir = self.shards_dir.join(group.to_string());
        let io_error = |action, source| StorageError::Io {
            action,
            path: dir.clone(),
            source,
        };
        snapshot::remove_temps(&dir).map_err(|e| io_error("clean up", e))?;
        let floor = log::PurgeFloor::new();
        floor.set(snapshot::purge_floor(&dir).map_err(|e| io_error("list snapshots in", e))?);
        let recovered = self.recovered.lock().remove(&group).unwrap_or_default();
        let log = GroupLog::recover(group, Arc::clone(&self.store), recovered, floor.clone())?;
        let loaded =
            match snapshot::load_newest(&dir).map_err(|e| io_error("read snapshots in", e))? {
                Ok(loaded) => loaded,
                // The log was never purged: it holds everything from the
                // start, and openraft re-applies it to an empty map.
                Err(problems) if log.purged_index().is_none() => {
                    for problem in problems {
                        ::log::warn!(
                            "shard {group}: {problem}; the log holds every entry, replaying it"
                        );
                    }
                    None
                }
                Err(problems) => {
                    return Err(StorageError::SnapshotUnusable {
                        group,
                        problems: problems.join("; "),
                    })
                }
            };
        let sm = ShardSm::new(group, dir, loaded, floor);
        if let Some(purged) = log.purged_index() {
            if sm.applied_index().is_none_or(|applied| applied < purged) {
                return Err(StorageError::Unreplayable {
                    group,
                    applied: sm
                        .applied_index()
                        .map_or_else(|| "nothing (no snapshot)".to_owned(), |i| i.to_string()),
                    purged,
                });
            }
        }
        opened.insert(group, (log.clone(), sm.clone()));
        Ok((log, sm))
    }

    /// Forgets this node's replica of `group` (`docs/membership.md` §5):
    /// logs a drop record and waits until it is durable, then deletes
    /// `shards/<group>/` (module docs: a crash at any step is finished by
    /// the next [`NodeStorage::open`]). The caller has removed the group
    /// from its `Groups` and shut its Raft down first: nothing may write
    /// the group's log or snapshots any more. Handles still held to its
    /// log or state machine go stale; asking [`NodeStorage::group`] for
    /// the id again opens a new, empty replica.
    pub async fn drop_group(&self, group: GroupId) -> Result<(), StorageError> {
        self.opened.lock().remove(&group);
        self.recovered.lock().remove(&group);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.store.submit_group(
            group,
            GroupRecord::Drop,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await
            .unwrap_or(Err(StoreError::Closed))
            .map_err(|source| StorageError::DropNotLogged { group, source })?;
        let shards_dir = self.shards_dir.clone();
        tokio::task::spawn_blocking(move || remove_shard_dir(&shards_dir, group))
            .await
            .map_err(|e| StorageError::Io {
                action: "delete",
                path: self.shards_dir.join(group.to_string()),
                source: io::Error::other(format!("the deleting task failed: {e}")),
            })?
    }

    /// The store the logs write through.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}
