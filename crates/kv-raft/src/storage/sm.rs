//! [`ShardSm`]: one shard's state machine over a kv-store [`Map`], and its
//! snapshots (design `docs/replication.md` §5).
//!
//! openraft hands `apply` the committed entries in log order; a PUT
//! inserts into the shard's map (outcome `Stored`), a DELETE removes
//! (`Deleted { found }`, decided in log order on every replica), blank and
//! membership entries only advance the applied log id. In the metadata
//! group a META command rewrites the cluster state under its reserved key
//! ([`crate::meta`], `docs/membership.md` §3.1). The map holds
//! applied (so committed) writes only, and readers look it up directly
//! ([`ShardSm::get`]): no await, no channel hop, no Raft task in the path.
//!
//! The map sits behind an `RwLock<Arc<Map>>` so that installing a snapshot
//! from the leader swaps in a complete new map at once: a reader sees the
//! old state or the new one, never a mix. `apply` and `install_snapshot`
//! both run on the group's state-machine task, one at a time.
//!
//! Snapshots: `try_create_snapshot_builder` runs on the state-machine task
//! between two `apply` calls, so copying the map there (reference-count
//! increments, [`Map::copy_all`]) with the applied log id and membership is
//! a consistent cut; the builder then encodes and writes the file on a
//! blocking thread ([`super::snapshot`]) while applying goes on.

use std::fmt::Debug;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use kv_store::Map;
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use parking_lot::{Mutex, RwLock};
use xxhash_rust::xxh3::xxh3_64;

use kv_cluster::meta::{ClusterState, StateError};

use super::log::PurgeFloor;
use super::snapshot::{self, Meta};
use crate::meta::{apply_meta, decode_state, META_KEY};
use crate::types::{Command, GroupId, KvRaft, Outcome, SnapshotData};

#[derive(Debug, Default)]
struct State {
    applied: Option<LogIdOf<KvRaft>>,
    membership: StoredMembershipOf<KvRaft>,
    /// The newest snapshot file written or installed here, and its meta.
    current: Option<(Meta, PathBuf)>,
}

struct Shared {
    group: GroupId,
    dir: PathBuf,
    map: RwLock<Arc<Map>>,
    /// Applied index + 1 (0: nothing applied), for lock-free readers.
    applied_index: AtomicU64,
    state: Mutex<State>,
    /// Serialises snapshot file writes (a build and an install may overlap).
    files: Mutex<()>,
    floor: PurgeFloor,
    installs: AtomicU64,
    builds: AtomicU64,
}

/// One shard's state machine; a cheap `Clone` handle (readers keep one).
#[derive(Clone)]
pub struct ShardSm(Arc<Shared>);

impl Debug for ShardSm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSm")
            .field("group", &self.0.group)
            .field("applied_index", &self.applied_index())
            .finish_non_exhaustive()
    }
}

/// First and longest pause between tries of a snapshot file that found
/// no room.
const FIRST_ROOM_PAUSE: Duration = Duration::from_millis(20);
const MAX_ROOM_PAUSE: Duration = Duration::from_secs(1);

/// Runs `write` (a whole snapshot file: temp file, sync, rename) until it
/// does not fail for want of room (`ENOSPC`, `EDQUOT`), pausing between
/// tries. An error here would reach openraft as a storage error and stop
/// the group for good; a snapshot that waits only delays a purge (built
/// here) or this replica's catching up (installed from the leader), and a
/// failed try leaves nothing behind (its temp file is removed). Blocking.
fn until_room<T>(group: GroupId, mut write: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut pause = FIRST_ROOM_PAUSE;
    let mut waited = false;
    loop {
        match write() {
            Err(error) if kv_store::is_no_room(&error) => {
                if !waited {
                    log::warn!(
                        "shard {group}: no room for a snapshot file ({error}); trying again \
                         until space is freed"
                    );
                    waited = true;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_ROOM_PAUSE);
            }
            other => {
                if waited && other.is_ok() {
                    log::info!("shard {group}: snapshot file written once room returned");
                }
                return other;
            }
        }
    }
}

fn blocking_failed(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("snapshot task failed: {e}"))
}

impl ShardSm {
    /// The state machine of `group`, from the snapshot loaded at start (if
    /// any); its files live in `dir`.
    pub(crate) fn new(
        group: GroupId,
        dir: PathBuf,
        loaded: Option<snapshot::Loaded>,
        floor: PurgeFloor,
    ) -> ShardSm {
        let mut state = State::default();
        let map = match loaded {
            Some(loaded) => {
                state.applied = loaded.meta.last_log_id;
                state.membership = loaded.meta.last_membership.clone();
                state.current = Some((loaded.meta, loaded.path));
                loaded.map
            }
            None => Map::new(),
        };
        let applied_index = state.applied.map_or(0, |id| id.index + 1);
        ShardSm(Arc::new(Shared {
            group,
            dir,
            map: RwLock::new(Arc::new(map)),
            applied_index: AtomicU64::new(applied_index),
            state: Mutex::new(state),
            files: Mutex::new(()),
            floor,
            installs: AtomicU64::new(0),
            builds: AtomicU64::new(0),
        }))
    }

    /// The group (shard) this state machine belongs to.
    pub fn group(&self) -> GroupId {
        self.0.group
    }

    /// The value of `key` as applied here: a map lookup, nothing else.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.0.map.read().get(key)
    }

    /// The cluster state applied here, for the metadata group's state
    /// machine (`None`: not bootstrapped yet, or not the metadata group).
    pub fn cluster_state(&self) -> Result<Option<ClusterState>, StateError> {
        decode_state(self.get(META_KEY.as_bytes()).as_deref())
    }

    /// How many keys the shard holds here.
    pub fn len(&self) -> usize {
        self.0.map.read().len()
    }

    /// Whether the shard holds no keys here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(keys, order-independent hash of the key-value pairs)`: equal on
    /// two replicas at the same applied index. The hash is the wrapping sum
    /// of xxh3 over each `[key len][key][value]`. Copies the map's entry
    /// handles first (no lock held while hashing).
    pub fn digest(&self) -> (u64, u64) {
        digest_entries(&self.0.map.read().copy_all())
    }

    /// The last applied log index (`None`: nothing applied).
    pub fn applied_index(&self) -> Option<u64> {
        self.0.applied_index.load(Ordering::Acquire).checked_sub(1)
    }

    /// The last log index the newest snapshot here covers.
    pub fn snapshot_index(&self) -> Option<u64> {
        let state = self.0.state.lock();
        state
            .current
            .as_ref()
            .and_then(|(meta, _)| meta.last_log_id.map(|id| id.index))
    }

    /// How many snapshots were installed here from a leader.
    pub fn snapshot_installs(&self) -> u64 {
        self.0.installs.load(Ordering::Relaxed)
    }

    /// How many snapshots were built here.
    pub fn snapshots_built(&self) -> u64 {
        self.0.builds.load(Ordering::Relaxed)
    }

    /// The directory holding this shard's snapshot files.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    fn set_applied(&self, state: &mut State, id: LogIdOf<KvRaft>) {
        state.applied = Some(id);
        self.0.applied_index.store(id.index + 1, Ordering::Release);
    }

    /// Writes a snapshot file and makes it current (unless a newer one
    /// already is), then lowers the log's purge floor to the oldest
    /// generation kept. Blocking.
    fn store_file(&self, meta: &Meta, bytes: &[u8]) -> io::Result<()> {
        let _files = self.0.files.lock();
        let position = snapshot::position(meta);
        let path = until_room(self.0.group, || {
            snapshot::write(&self.0.dir, position, bytes)
        })?;
        let mut state = self.0.state.lock();
        let newer = state
            .current
            .as_ref()
            .is_none_or(|(cur, _)| snapshot::position(cur) <= position);
        if newer {
            state.current = Some((meta.clone(), path));
        }
        // The oldest generation on disk is where a fallback would start.
        self.0.floor.set(snapshot::purge_floor(&self.0.dir)?);
        Ok(())
    }
}

/// Builds one snapshot from a consistent copy of the shard.
pub struct ShardSnapshotBuilder {
    sm: ShardSm,
    meta: Meta,
    entries: Vec<kv_store::Entry>,
}

impl RaftSnapshotBuilder<KvRaft> for ShardSnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<KvRaft, SnapshotData>, io::Error> {
        let sm = self.sm.clone();
        let meta = self.meta.clone();
        let entries = std::mem::take(&mut self.entries);
        let bytes = tokio::task::spawn_blocking(move || {
            let bytes = snapshot::encode(&meta, &entries)?;
            drop(entries);
            sm.store_file(&meta, &bytes)?;
            Ok::<_, io::Error>(bytes)
        })
        .await
        .map_err(blocking_failed)??;
        self.sm.0.builds.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "shard {}: snapshot at {} written ({} bytes)",
            self.sm.0.group,
            self.meta
                .last_log_id
                .map_or_else(|| "nothing".to_owned(), |id| id.to_string()),
            bytes.len()
        );
        Ok(SnapshotOf::<KvRaft, SnapshotData> {
            meta: self.meta.clone(),
            snapshot: Cursor::new(bytes),
        })
    }
}

impl RaftStateMachine<KvRaft> for ShardSm {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = ShardSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<KvRaft>>, StoredMembershipOf<KvRaft>), io::Error> {
        let state = self.0.state.lock();
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<KvRaft>, io::Error>> + Unpin + OptionalSend,
    {
        // Installs run on this same task, so the map cannot change under us.
        let map = Arc::clone(&self.0.map.read());
        while let Some((entry, responder)) = entries.try_next().await? {
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcome::Stored,
                EntryPayload::Normal(Command::Put { key, value }) => {
                    map.insert(key.as_bytes(), &value)
                        .map_err(io::Error::other)?;
                    Outcome::Stored
                }
                EntryPayload::Normal(Command::Delete { key }) => Outcome::Deleted {
                    found: map.remove(key.as_bytes()),
                },
                EntryPayload::Normal(Command::Meta(cmd)) => {
                    let stored = map.get(META_KEY.as_bytes());
                    let (outcome, state) = apply_meta(stored.as_deref(), &cmd)?;
                    if let Some(state) = state {
                        map.insert(META_KEY.as_bytes(), &state)
                            .map_err(io::Error::other)?;
                    }
                    outcome
                }
                EntryPayload::Membership(membership) => {
                    self.0.state.lock().membership =
                        StoredMembershipOf::<KvRaft>::new(Some(entry.log_id), membership);
                    Outcome::Stored
                }
            };
            self.set_applied(&mut self.0.state.lock(), entry.log_id);
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        Some(self.get_snapshot_builder().await)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let entries = self.0.map.read().copy_all();
        let state = self.0.state.lock();
        ShardSnapshotBuilder {
            sm: self.clone(),
            meta: Meta {
                last_log_id: state.applied,
                last_membership: state.membership.clone(),
            },
            entries,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<KvRaft>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let bytes = snapshot.into_inner();
        let sm = self.clone();
        let meta = meta.clone();
        let group = self.0.group;
        let map = tokio::task::spawn_blocking(move || {
            let (_, map) = snapshot::decode(&bytes).map_err(|damage| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("shard {group}: snapshot from the leader is {damage}"),
                )
            })?;
            // Durable before the log is purged to it.
            sm.store_file(&meta, &bytes)?;
            Ok::<_, io::Error>((map, meta))
        })
        .await
        .map_err(blocking_failed)??;
        let (map, meta) = map;
        *self.0.map.write() = Arc::new(map);
        {
            let mut state = self.0.state.lock();
            state.membership = meta.last_membership.clone();
            match meta.last_log_id {
                Some(id) => self.set_applied(&mut state, id),
                None => {
                    state.applied = None;
                    self.0.applied_index.store(0, Ordering::Release);
                }
            }
        }
        self.0.installs.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "shard {group}: installed a snapshot at {}",
            meta.last_log_id
                .map_or_else(|| "nothing".to_owned(), |id| id.to_string())
        );
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<KvRaft, SnapshotData>>, io::Error> {
        let sm = self.clone();
        tokio::task::spawn_blocking(move || {
            // Under the files lock, so the file is not pruned meanwhile.
            let _files = sm.0.files.lock();
            let Some((meta, path)) = sm.0.state.lock().current.clone() else {
                return Ok(None);
            };
            let bytes = std::fs::read(path)?;
            Ok(Some(SnapshotOf::<KvRaft, SnapshotData> {
                meta,
                snapshot: Cursor::new(bytes),
            }))
        })
        .await
        .map_err(blocking_failed)?
    }
}

/// `(keys, order-independent hash)` of `entries`, as [`ShardSm::digest`]
/// computes it: the wrapping sum of xxh3 over each `[key len][key][value]`.
/// Public so a shard held outside Raft (kv-node's solo shards, in the
/// store's own map) digests the same and tests can compare the two.
pub fn digest_entries(entries: &[kv_store::Entry]) -> (u64, u64) {
    let sum = entries
        .iter()
        .fold(0u64, |sum, entry| sum.wrapping_add(xxh3_64(entry)));
    (entries.len() as u64, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_write_without_room_is_tried_again_and_other_errors_are_not() {
        let mut tries = 0;
        let written = until_room(7, || {
            tries += 1;
            if tries < 3 {
                Err(io::Error::from_raw_os_error(28)) // ENOSPC
            } else {
                Ok(tries)
            }
        });
        assert_eq!(written.unwrap(), 3);

        let mut tries = 0;
        let failed: io::Result<()> = until_room(7, || {
            tries += 1;
            Err(io::Error::from_raw_os_error(5)) // EIO
        });
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(5));
        assert_eq!(tries, 1);
    }
}
