//! Storage for issue 13's moves, over the real WAL and snapshot files:
//! the metadata group's state machine applying `Command::Meta` and keeping
//! the cluster state across restarts (`docs/membership.md` §3.1), and
//! dropping a replica (`NodeStorage::drop_group`, §5): stopped at each of
//! its steps and re-opened, the node never loads the dropped replica again,
//! and the group id can be hosted afresh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::{store_options, BOUND};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kv_cluster::meta::{self, ClusterId, MemberState, MetaCommand, Refusal};
use kv_raft::{
    raft_config, Command, GroupId, Network, NodeStorage, Outcome, ShardRaft, ShardSm, Timeouts,
};
use kv_store::{FsyncPolicy, GroupRecord, Store};
use openraft::{BasicNode, Raft};

const GROUP: GroupId = 7;

/// Waits (bounded) until only `store`'s last handle is left, then drops it
/// (closing the WAL), so the directory can be opened again.
async fn release(store: Arc<Store>) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while Arc::strong_count(&store) > 1 {
        assert!(tokio::time::Instant::now() < deadline, "store still held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(store);
}

/// Opens the node's storage and starts `GROUP` on it, a single voter.
async fn start(dir: &Path) -> (Arc<Store>, NodeStorage, ShardRaft, ShardSm) {
    start_group(dir, GROUP).await
}

async fn start_group(dir: &Path, group: GroupId) -> (Arc<Store>, NodeStorage, ShardRaft, ShardSm) {
    let store = Arc::new(Store::open(dir, store_options(FsyncPolicy::Always)).unwrap());
    let storage = NodeStorage::open(Arc::clone(&store), dir).unwrap();
    let (log, sm) = storage.group(group).unwrap();
    let config = raft_config(Timeouts::default(), 1 << 20).unwrap();
    let raft: ShardRaft = Raft::new(1, config, Network::new().factory(group), log, sm.clone())
        .await
        .unwrap();
    (store, storage, raft, sm)
}

async fn propose(raft: &ShardRaft, cmd: MetaCommand) -> Outcome {
    raft.client_write(Command::Meta(cmd)).await.unwrap().data
}

/// The metadata group applies `Command::Meta` through `meta::apply` into
/// its reserved key: each change answers its new version, a refusal or a
/// repeat changes nothing, and the state survives a restart both replayed
/// from the WAL and loaded from a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_group_applies_meta_commands_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let group = kv_raft::types::METADATA_GROUP;
    let (store, storage, raft, sm) = start_group(dir.path(), group).await;
    lead(&raft).await;
    assert!(sm.cluster_state().unwrap().is_none());
    let add = MetaCommand::AddMember {
        id: 3,
        addr: "127.0.0.1:8083".into(),
    };
    assert_eq!(
        propose(&raft, add.clone()).await,
        Outcome::Meta(Err(Refusal::NotBootstrapped))
    );
    let bootstrap = MetaCommand::Bootstrap {
        cluster_id: ClusterId(0xfeed),
        shards: 8,
        replicas: 2,
        members: BTreeMap::from([
            (1, "127.0.0.1:8081".to_owned()),
            (2, "127.0.0.1:8082".to_owned()),
        ]),
    };
    assert_eq!(
        propose(&raft, bootstrap.clone()).await,
        Outcome::Meta(Ok(meta::Outcome::Changed { version: 1 }))
    );
    assert_eq!(
        propose(&raft, bootstrap.clone()).await,
        Outcome::Meta(Ok(meta::Outcome::Unchanged { version: 1 }))
    );
    assert_eq!(
        propose(&raft, add.clone()).await,
        Outcome::Meta(Ok(meta::Outcome::Changed { version: 2 }))
    );
    let state = sm.cluster_state().unwrap().unwrap();
    assert_eq!(state.version, 2);
    assert_eq!(state.cluster_id, ClusterId(0xfeed));
    assert_eq!(state.members[&3].state, MemberState::Joining);
    raft.shutdown().await.unwrap();
    drop((raft, sm, storage));
    release(store).await;

    // Replayed from the WAL.
    let (store, storage, raft, sm) = start_group(dir.path(), group).await;
    lead(&raft).await;
    raft.wait(Some(BOUND))
        .metrics(|m| m.last_applied.is_some_and(|a| a.index >= 4), "replayed")
        .await
        .unwrap();
    assert_eq!(sm.cluster_state().unwrap().unwrap(), state);
    // Then from a snapshot, with a change after it.
    let index = raft
        .client_write(Command::Meta(MetaCommand::Activate { id: 3 }))
        .await
        .unwrap()
        .log_id
        .index;
    raft.trigger().snapshot().await.unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= index), "snapshot")
        .await
        .unwrap();
    let state = sm.cluster_state().unwrap().unwrap();
    assert_eq!(state.version, 3);
    assert_eq!(state.members[&3].state, MemberState::Active);
    raft.shutdown().await.unwrap();
    drop((raft, sm, storage));
    release(store).await;
    let (store, storage, raft, sm) = start_group(dir.path(), group).await;
    assert_eq!(sm.cluster_state().unwrap().unwrap(), state);
    raft.shutdown().await.unwrap();
    drop((raft, sm, storage));
    release(store).await;
}

async fn lead(raft: &ShardRaft) {
    if raft.is_initialized().await.unwrap() {
        // Restarted: it elects itself again.
    } else {
        raft.initialize(BTreeMap::from([(1, BasicNode::default())]))
            .await
            .unwrap();
    }
    raft.wait(Some(BOUND))
        .metrics(|m| m.state.is_leader(), "leader")
        .await
        .unwrap();
}

async fn put(raft: &ShardRaft, prefix: &str, n: usize) -> u64 {
    let mut last = 0;
    for i in 0..n {
        last = raft
            .client_write(Command::Put {
                key: format!("{prefix}{i}"),
                value: b"v".to_vec(),
            })
            .await
            .unwrap()
            .log_id
            .index;
    }
    last
}

/// A replica with a snapshot file and entries after it, shut down.
async fn replica_with_a_snapshot(dir: &Path) {
    let (store, storage, raft, sm) = start(dir).await;
    lead(&raft).await;
    let index = put(&raft, "old", 20).await;
    raft.trigger().snapshot().await.unwrap();
    raft.wait(Some(BOUND))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= index), "snapshot")
        .await
        .unwrap();
    put(&raft, "later", 5).await;
    assert_eq!(sm.len(), 25);
    raft.shutdown().await.unwrap();
    drop((raft, sm, storage));
    release(store).await;
    assert!(dir.join("shards").join(GROUP.to_string()).is_dir());
}

/// After a drop, re-opened: the group is unknown, its directory gone, and
/// asking for it gives an empty replica.
async fn assert_forgotten(dir: &Path) {
    let store = Arc::new(Store::open(dir, store_options(FsyncPolicy::Always)).unwrap());
    let storage = NodeStorage::open(Arc::clone(&store), dir).unwrap();
    assert!(!storage.known_groups().contains(&GROUP));
    let shards: Vec<String> = std::fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|item| item.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(shards.is_empty(), "left behind: {shards:?}");
    let (log, sm) = storage.group(GROUP).unwrap();
    assert_eq!(sm.len(), 0);
    assert_eq!(sm.applied_index(), None);
    assert_eq!(log.purged_index(), None);
    drop((log, sm, storage));
    release(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_drop_record_leaves_nothing_to_load() {
    let dir = tempfile::tempdir().unwrap();
    replica_with_a_snapshot(dir.path()).await;
    // Step 1 only: the record is durable, the directory still there.
    let store = Store::open(dir.path(), store_options(FsyncPolicy::Always)).unwrap();
    let (tx, rx) = mpsc::channel();
    store.submit_group(
        GROUP,
        GroupRecord::Drop,
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
    );
    rx.recv_timeout(BOUND).unwrap().unwrap();
    drop(store);
    assert!(dir.path().join("shards").join(GROUP.to_string()).is_dir());
    assert_forgotten(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_rename_deletes_the_renamed_directory() {
    let dir = tempfile::tempdir().unwrap();
    replica_with_a_snapshot(dir.path()).await;
    // Steps 1 and 2: the record, and the directory renamed.
    let store = Store::open(dir.path(), store_options(FsyncPolicy::Always)).unwrap();
    let (tx, rx) = mpsc::channel();
    store.submit_group(
        GROUP,
        GroupRecord::Drop,
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
    );
    rx.recv_timeout(BOUND).unwrap().unwrap();
    drop(store);
    let shards = dir.path().join("shards");
    std::fs::rename(
        shards.join(GROUP.to_string()),
        shards.join(format!("dropped-{GROUP}")),
    )
    .unwrap();
    assert_forgotten(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_drop_record_keeps_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    replica_with_a_snapshot(dir.path()).await;
    // Nothing done: the replica is whole, snapshot and entries after it.
    let (store, storage, raft, sm) = start(dir.path()).await;
    lead(&raft).await;
    assert_eq!(sm.len(), 25);
    assert_eq!(sm.get(b"later4").as_deref(), Some(&b"v"[..]));
    raft.shutdown().await.unwrap();
    drop((raft, sm, storage));
    release(store).await;
}

/// The whole drop on a running node, then the same group id hosted again:
/// it starts empty and, restarted, holds only what the new replica wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_group_is_forgotten_and_can_be_hosted_again() {
    let dir = tempfile::tempdir().unwrap();
    replica_with_a_snapshot(dir.path()).await;
    let (store, storage, raft, sm) = start(dir.path()).await;
    lead(&raft).await;
    raft.shutdown().await.unwrap();
    drop((raft, sm));
    storage.drop_group(GROUP).await.unwrap();
    assert!(!dir.path().join("shards").join(GROUP.to_string()).exists());
    assert!(!storage.known_groups().contains(&GROUP));
    drop(storage);
    release(store).await;
    assert_forgotten(dir.path()).await;

    // Hosted again: a new, empty replica.
    let (store, storage, raft, sm) = start(dir.path()).await;
    assert!(!raft.is_initialized().await.unwrap());
    lead(&raft).await;
    put(&raft, "new", 3).await;
    raft.shutdown().await.unwrap();
    drop((raft, sm, storage));
    release(store).await;
    let (store, storage, raft, sm) = start(dir.path()).await;
    lead(&raft).await;
    raft.wait(Some(BOUND))
        .metrics(|m| m.last_applied.is_some_and(|a| a.index >= 3), "replayed")
        .await
        .unwrap();
    let digest_keys = sm.digest().0;
    assert_eq!(digest_keys, 3, "only the new replica's keys");
    assert_eq!(sm.get(b"old0"), None);
    raft.shutdown().await.unwrap();
    drop((raft, sm, storage));
    release(store).await;
}
