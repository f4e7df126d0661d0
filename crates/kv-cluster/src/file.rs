//! `<data-dir>/cluster.json`: the cluster a data dir belongs to, and the
//! check that a restart's flags agree with it (design §3, §8).
//!
//! A node writes the file on its first start, before it serves or sends any
//! Raft traffic, and reads it on every start. Its flags must then agree: a
//! data dir created with 64 shards holds keys placed by `shard_of(key, 64)`,
//! and started with 32 it would look for them in the wrong groups. So a
//! difference is refused with a message that says what differs and what to
//! type instead ([`check_flags`]).
//!
//! **On disk**: pretty JSON, `{"checksum": "<16 hex digits>", "format": 1,
//! "cluster_id": "<uuid>", "node_id": 1, "shards": 64, "replicas": 3, "members": {"1": "127.0.0.1:8081", ...},
//! "seen": [2, 3]}`. `seen` lists the members
//! this node has exchanged Raft traffic with (the first-start guard of §8:
//! a peer that has seen a node whose data dir is empty knows its data was
//! lost). `cluster_id` names the cluster (design §8; absent in files
//! written before it existed, which still read). `checksum` is the xxh3 of the compact JSON of everything else, so
//! a flipped digit (a member's port, the shard count) is caught instead of
//! silently starting a different cluster; JSON keeps the file readable. A
//! file without `checksum` is accepted: that is how a damaged file is
//! replaced by hand (a peer's copy with `node_id` changed, see the error
//! message); kv writes one every time.
//!
//! **Writes are atomic**: write `cluster.json.tmp`, fsync it, rename over
//! `cluster.json`, fsync the directory. A crash leaves the old file or the
//! new one, never a mix; a leftover temp file is ignored and overwritten.
//! A file that is torn, damaged, fails its checksum, has another format or
//! holds an invalid spec is a typed [`ClusterFileError`] naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::spec::{format_peers, ClusterSpec, SpecError};

/// The file's name inside a data dir.
pub const CLUSTER_FILE: &str = "cluster.json";
/// The format this version writes and reads.
pub const CLUSTER_FORMAT: u32 = 1;
const TEMP_SUFFIX: &str = ".tmp";

/// What `cluster.json` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCluster {
    /// The cluster and this node's id in it.
    pub spec: ClusterSpec,
    /// Members this node has exchanged Raft traffic with (design §8).
    pub seen: BTreeSet<u64>,
    /// The cluster's id: a random UUID chosen once, when the cluster is
    /// created, and agreed by every member (design §8). `None` in a file
    /// written before ids existed, or by a member that has not learnt it
    /// yet; kv-node adopts one then.
    pub cluster_id: Option<String>,
    /// This node joined a running cluster (`kv-node --join`, issue 13)
    /// rather than being created with it: it never initialises the metadata
    /// group (only a founding member may). Absent (false) in files written
    /// by `--peers`.
    pub joined: bool,
}

/// Why `cluster.json` could not be read or written. Every variant names the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    /// The file system refused.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "fsync", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not JSON of the expected shape: torn, truncated or damaged.
    #[error("{} is damaged ({source}); {RESTORE}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        #[source]
        source: serde_json::Error,
    },
    /// Valid JSON whose checksum does not match its contents.
    #[error("{} is damaged: checksum {stored} stored but {computed} computed; {RESTORE}", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Checksum in the file.
        stored: String,
        /// Checksum of what the file says.
        computed: String,
    },
    /// A format this version does not read.
    #[error("{} has format {found} but this kv reads format {CLUSTER_FORMAT}: it was written by a newer kv, or is damaged", path.display())]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The format found.
        found: u64,
    },
    /// Intact, but the cluster it describes is not valid (or, when writing,
    /// the spec given is not).
    #[error("{} holds an invalid cluster: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: SpecError,
    },
}

/// How to recover from a damaged file: every node's copy describes the same
/// cluster apart from `node_id` and `seen`.
const RESTORE: &str = "restore it from a backup, or copy another node's cluster.json, set its \"node_id\" to this node's id and delete its \"checksum\" line";

/// What the checksum covers: everything but the checksum, in this order.
#[derive(Serialize)]
struct Body<'a> {
    format: u64,
    /// Skipped when absent, so a file written before ids existed keeps
    /// its checksum.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_id: Option<&'a str>,
    node_id: u64,
    shards: u32,
    replicas: u32,
    members: &'a BTreeMap<u64, String>,
    seen: &'a BTreeSet<u64>,
    /// Skipped when false, so files without it keep their checksum.
    #[serde(skip_serializing_if = "is_false")]
    joined: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The whole file. Unknown fields are refused: in format 1 a key that is
/// not one of these is a damaged key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    /// Absent only in a file edited by hand (see [`RESTORE`]); every file kv
    /// writes has one. First, so deleting its line leaves valid JSON; a torn
    /// write cannot drop it without dropping the closing brace too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checksum: Option<String>,
    format: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
    node_id: u64,
    shards: u32,
    replicas: u32,
    members: BTreeMap<u64, String>,
    #[serde(default)]
    seen: BTreeSet<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    joined: bool,
}

impl OnDisk {
    fn body(&self) -> Body<'_> {
        Body {
            format: self.format,
            cluster_id: self.cluster_id.as_deref(),
            node_id: self.node_id,
            shards: self.shards,
            replicas: self.replicas,
            members: &self.members,
            seen: &self.seen,
            joined: self.joined,
        }
    }
}

/// Just the format, read first so a newer file says so instead of
/// failing on fields this version does not know.
#[derive(Deserialize)]
struct FormatOnly {
    format: u64,
}

fn checksum(body: &Body<'_>) -> Result<String, serde_json::Error> {
    Ok(format!("{:016x}", xxh3_64(&serde_json::to_vec(body)?)))
}

/// `<dir>/cluster.json`.
pub fn cluster_file(dir: &Path) -> PathBuf {
    dir.join(CLUSTER_FILE)
}

/// Reads `<dir>/cluster.json`: `Ok(None)` when there is none (a fresh data
/// dir, first start), the stored cluster when it is intact and valid, a
/// typed error naming the file otherwise.
pub fn read_cluster(dir: &Path) -> Result<Option<StoredCluster>, ClusterFileError> {
    let path = cluster_file(dir);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ClusterFileError::Io {
                op: "read",
                path,
                source,
            })
        }
    };
    decode_cluster(&path, &bytes).map(Some)
}

/// Parses and checks the bytes of a cluster file (`path` for messages).
pub fn decode_cluster(path: &Path, bytes: &[u8]) -> Result<StoredCluster, ClusterFileError> {
    let corrupt = |source| ClusterFileError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let FormatOnly { format } = serde_json::from_slice(bytes).map_err(corrupt)?;
    if format != u64::from(CLUSTER_FORMAT) {
        return Err(ClusterFileError::UnsupportedFormat {
            path: path.to_owned(),
            found: format,
        });
    }
    let file: OnDisk = serde_json::from_slice(bytes).map_err(corrupt)?;
    if let Some(stored) = &file.checksum {
        let computed = checksum(&file.body()).map_err(corrupt)?;
        if *stored != computed {
            return Err(ClusterFileError::Checksum {
                path: path.to_owned(),
                stored: stored.clone(),
                computed,
            });
        }
    }
    let cluster = StoredCluster {
        spec: ClusterSpec {
            node_id: file.node_id,
            shards: file.shards,
            replicas: file.replicas,
            members: file.members,
        },
        seen: file.seen,
        cluster_id: file.cluster_id,
        joined: file.joined,
    };
    cluster
        .spec
        .validate()
        .map_err(|source| ClusterFileError::Invalid {
            path: path.to_owned(),
            source,
        })?;
    Ok(cluster)
}

/// The bytes [`write_cluster`] puts on disk.
pub fn encode_cluster(cluster: &StoredCluster) -> Result<Vec<u8>, serde_json::Error> {
    let mut file = OnDisk {
        format: u64::from(CLUSTER_FORMAT),
        node_id: cluster.spec.node_id,
        shards: cluster.spec.shards,
        replicas: cluster.spec.replicas,
        members: cluster.spec.members.clone(),
        seen: cluster.seen.clone(),
        cluster_id: cluster.cluster_id.clone(),
        joined: cluster.joined,
        checksum: None,
    };
    file.checksum = Some(checksum(&file.body())?);
    let mut bytes = serde_json::to_vec_pretty(&file)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Writes `<dir>/cluster.json` atomically (temp file, fsync, rename, fsync
/// of the directory). Refuses an invalid spec rather than store it.
pub fn write_cluster(dir: &Path, cluster: &StoredCluster) -> Result<(), ClusterFileError> {
    let path = cluster_file(dir);
    cluster
        .spec
        .validate()
        .map_err(|source| ClusterFileError::Invalid {
            path: path.clone(),
            source,
        })?;
    // Serialising maps with integer keys and strings cannot fail; if it ever
    // did, say so as an I/O error on the file rather than panic.
    let bytes = encode_cluster(cluster).map_err(|e| ClusterFileError::Io {
        op: "encode",
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    let mut temp_name = CLUSTER_FILE.to_owned();
    temp_name.push_str(TEMP_SUFFIX);
    let temp = dir.join(temp_name);
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| ClusterFileError::Io { op, path, source }
    };
    let mut file = File::create(&temp).map_err(io("create", &temp))?;
    file.write_all(&bytes).map_err(io("write", &temp))?;
    file.sync_all().map_err(io("fsync", &temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(io("rename into place", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync the directory of", &path))?;
    Ok(())
}

/// The flags a node was started with, as they bear on the stored cluster.
/// `None` means "not given" (not "the default"), so a restart may leave
/// `--shards` and `--replicas` out and take the stored values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flags {
    /// `--node-id`.
    pub node_id: u64,
    /// `--peers`, parsed.
    pub members: Option<BTreeMap<u64, String>>,
    /// `--shards`.
    pub shards: Option<u32>,
    /// `--replicas`.
    pub replicas: Option<u32>,
}

/// Whose stored cluster the flags were compared with: this node's own
/// data dir (a restart), or a peer's (the first-start guard, design §8).
/// The messages name it, since the fix differs: an empty data dir starts a
/// new cluster here, but cannot change what a peer stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// This node's `cluster.json`.
    Here,
    /// Node `id`'s `cluster.json`, fetched with `GET /-/raft/cluster`.
    Peer(u64),
}

impl std::fmt::Display for Whose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Whose::Here => f.write_str("this data dir"),
            Whose::Peer(id) => write!(f, "node {id}'s data dir"),
        }
    }
}

impl Whose {
    /// The other way out, after "start with <the stored value>".
    fn or_else(self) -> String {
        match self {
            Whose::Here => " or an empty data dir".to_owned(),
            Whose::Peer(id) => format!(" to join node {id}'s cluster"),
        }
    }
}

/// One way the flags contradict `cluster.json`; the message says how to fix
/// it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Difference {
    /// Another node's id.
    #[error("--node-id {given} but this data dir belongs to node {stored}; start with --node-id {stored}, or give node {given} its own data dir")]
    NodeId {
        /// In the file.
        stored: u64,
        /// On the command line.
        given: u64,
    },
    /// Another shard count.
    #[error("--shards {given} but {whose} was created with --shards {stored}; start with --shards {stored}{} (the shard count cannot change)", whose.or_else())]
    Shards {
        /// In the file.
        stored: u32,
        /// On the command line.
        given: u32,
        /// Whose file.
        whose: Whose,
    },
    /// Another replica count.
    #[error("--replicas {given} but {whose} was created with --replicas {stored}; start with --replicas {stored}{} (changing it is not supported yet)", whose.or_else())]
    Replicas {
        /// In the file.
        stored: u32,
        /// On the command line.
        given: u32,
        /// Whose file.
        whose: Whose,
    },
    /// Other members.
    #[error("--peers differs from the members {whose} was created with ({}); start with --peers {} (members change through POST and DELETE /-/cluster/members, not --peers)", describe_members(stored, given), format_peers(stored))]
    Members {
        /// In the file.
        stored: BTreeMap<u64, String>,
        /// On the command line.
        given: BTreeMap<u64, String>,
        /// Whose file.
        whose: Whose,
    },
    /// No `--peers` for a data dir that belongs to a cluster.
    #[error("this data dir belongs to a cluster (node {node_id}) but --peers was not given; start with --node-id {node_id} --peers {}", format_peers(stored))]
    NoPeers {
        /// The stored node id.
        node_id: u64,
        /// The stored members.
        stored: BTreeMap<u64, String>,
    },
}

/// Every way the flags contradict `cluster.json` (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// In the order node id, peers, shards, replicas.
    pub differences: Vec<Difference>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, difference) in self.differences.iter().enumerate() {
            if i > 0 {
                f.write_str("; also ")?;
            }
            write!(f, "{difference}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Mismatch {}

/// "node 4 (a:1) added, node 3 (b:2) missing, node 2 at c:3 here but d:4 stored".
fn describe_members(stored: &BTreeMap<u64, String>, given: &BTreeMap<u64, String>) -> String {
    let mut parts = Vec::new();
    for (id, addr) in given {
        match stored.get(id) {
            None => parts.push(format!("node {id} ({addr}) is not a stored member")),
            Some(old) if old != addr => {
                parts.push(format!("node {id} is at {addr} here but {old} stored"))
            }
            Some(_) => {}
        }
    }
    for (id, addr) in stored {
        if !given.contains_key(id) {
            parts.push(format!("stored member node {id} ({addr}) is missing"));
        }
    }
    parts.join(", ")
}

/// Checks a restart's flags against the stored spec: the node id must be
/// equal, `--peers` (required) equal to the stored members, and `--shards`
/// and `--replicas`, when given, equal to the stored values. Reports every
/// difference at once, so one restart shows everything to fix.
pub fn check_flags(stored: &ClusterSpec, flags: &Flags) -> Result<(), Mismatch> {
    let mut differences = Vec::new();
    if flags.node_id != stored.node_id {
        differences.push(Difference::NodeId {
            stored: stored.node_id,
            given: flags.node_id,
        });
    }
    if flags.members.is_none() {
        differences.push(Difference::NoPeers {
            node_id: stored.node_id,
            stored: stored.members.clone(),
        });
    }
    compare_cluster(stored, flags, Whose::Here, &mut differences);
    Mismatch::of(differences)
}

/// Checks a first start's flags against node `peer`'s stored spec (design
/// §8's first-start guard): the same members, shard count and replica count
/// (the node ids differ, of course). The messages name the peer's data dir.
pub fn check_flags_with_peer(
    theirs: &ClusterSpec,
    flags: &Flags,
    peer: u64,
) -> Result<(), Mismatch> {
    let mut differences = Vec::new();
    compare_cluster(theirs, flags, Whose::Peer(peer), &mut differences);
    Mismatch::of(differences)
}

/// Members, shards and replicas of `flags` against `stored`.
fn compare_cluster(
    stored: &ClusterSpec,
    flags: &Flags,
    whose: Whose,
    differences: &mut Vec<Difference>,
) {
    if let Some(given) = flags
        .members
        .as_ref()
        .filter(|given| **given != stored.members)
    {
        differences.push(Difference::Members {
            stored: stored.members.clone(),
            given: given.clone(),
            whose,
        });
    }
    if let Some(given) = flags.shards.filter(|&given| given != stored.shards) {
        differences.push(Difference::Shards {
            stored: stored.shards,
            given,
            whose,
        });
    }
    if let Some(given) = flags.replicas.filter(|&given| given != stored.replicas) {
        differences.push(Difference::Replicas {
            stored: stored.replicas,
            given,
            whose,
        });
    }
}

impl Mismatch {
    fn of(differences: Vec<Difference>) -> Result<(), Mismatch> {
        if differences.is_empty() {
            Ok(())
        } else {
            Err(Mismatch { differences })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three(node_id: u64) -> StoredCluster {
        StoredCluster {
            spec: ClusterSpec::new(
                node_id,
                "1=127.0.0.1:8081,2=127.0.0.1:8082,3=127.0.0.1:8083",
                None,
                None,
            )
            .unwrap(),
            seen: [2, 3].into(),
            cluster_id: Some("6f0c1a52-2f4e-4d39-9b7a-0d2b8f3c9e11".into()),
            joined: false,
        }
    }

    #[test]
    fn joined_is_stored_only_when_true() {
        let founding = three(1);
        let bytes = encode_cluster(&founding).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("joined"));
        let path = Path::new("cluster.json");
        assert_eq!(decode_cluster(path, &bytes).unwrap(), founding);
        let joined = StoredCluster {
            joined: true,
            ..three(3)
        };
        let bytes = encode_cluster(&joined).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("\"joined\": true"));
        assert_eq!(decode_cluster(path, &bytes).unwrap(), joined);
    }

    fn flags(node_id: u64) -> Flags {
        Flags {
            node_id,
            members: Some(three(node_id).spec.members),
            shards: None,
            replicas: None,
        }
    }

    #[test]
    fn writes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_cluster(dir.path()).unwrap(), None, "fresh data dir");
        let cluster = three(1);
        write_cluster(dir.path(), &cluster).unwrap();
        assert_eq!(read_cluster(dir.path()).unwrap(), Some(cluster.clone()));
        // Readable by people, and nothing else left behind.
        let text = fs::read_to_string(cluster_file(dir.path())).unwrap();
        assert!(text.contains("\"shards\": 64"), "{text}");
        assert!(text.contains("\"2\": \"127.0.0.1:8082\""), "{text}");
        assert!(text.ends_with("}\n"), "{text}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![CLUSTER_FILE]);
        // A rewrite replaces it (seen grows as peers are met).
        let mut more = cluster;
        more.seen.insert(4);
        more.spec.members.insert(4, "127.0.0.1:8084".into());
        write_cluster(dir.path(), &more).unwrap();
        assert_eq!(read_cluster(dir.path()).unwrap(), Some(more));
    }

    #[test]
    fn a_file_written_before_cluster_ids_still_reads_with_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = three(1);
        old.cluster_id = None;
        write_cluster(dir.path(), &old).unwrap();
        let text = fs::read_to_string(cluster_file(dir.path())).unwrap();
        assert!(!text.contains("cluster_id"), "{text}");
        assert_eq!(read_cluster(dir.path()).unwrap(), Some(old));
        // And an id is kept, under the checksum.
        let new = three(1);
        write_cluster(dir.path(), &new).unwrap();
        let text = fs::read_to_string(cluster_file(dir.path())).unwrap();
        assert!(text.contains(new.cluster_id.as_deref().unwrap()), "{text}");
        assert_eq!(read_cluster(dir.path()).unwrap(), Some(new));
        let changed = text.replace("6f0c1a52", "6f0c1a53");
        fs::write(cluster_file(dir.path()), changed).unwrap();
        assert!(matches!(
            read_cluster(dir.path()),
            Err(ClusterFileError::Checksum { .. })
        ));
    }

    #[test]
    fn a_leftover_temp_file_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join("cluster.json.tmp");
        fs::write(&temp, b"{\"format\": 1, \"node_").unwrap();
        assert_eq!(read_cluster(dir.path()).unwrap(), None);
        write_cluster(dir.path(), &three(2)).unwrap();
        assert!(!temp.exists());
        assert_eq!(read_cluster(dir.path()).unwrap(), Some(three(2)));
    }

    /// Every single-byte change to a written file is either refused with an
    /// error naming the file, or (whitespace for whitespace) reads back the
    /// same cluster: a damaged file never starts a different cluster.
    #[test]
    fn every_corrupted_byte_is_caught() {
        let path = Path::new("/data/cluster.json");
        let cluster = three(1);
        let good = encode_cluster(&cluster).unwrap();
        assert_eq!(decode_cluster(path, &good).unwrap(), cluster);
        let mut refused = 0usize;
        for position in 0..good.len() {
            for value in 0..=u8::MAX {
                if value == good[position] {
                    continue;
                }
                let mut bad = good.clone();
                bad[position] = value;
                match decode_cluster(path, &bad) {
                    Ok(read) => assert_eq!(
                        read, cluster,
                        "byte {position} set to {value:#x} read back another cluster"
                    ),
                    Err(e) => {
                        assert!(e.to_string().contains("/data/cluster.json"), "{e}");
                        refused += 1;
                    }
                }
            }
        }
        // Nearly all changes are refused (only whitespace swaps read back).
        assert!(refused * 100 >= good.len() * 255 * 95, "{refused}");
    }

    #[test]
    fn torn_files_are_refused() {
        let path = Path::new("/data/cluster.json");
        let good = encode_cluster(&three(1)).unwrap();
        // The trailing newline is the only byte a file can lose and stay whole.
        for len in 0..good.len() - 1 {
            let err = decode_cluster(path, &good[..len]).unwrap_err();
            assert!(
                matches!(err, ClusterFileError::Corrupt { .. }),
                "{len}: {err}"
            );
        }
        let err = decode_cluster(path, b"").unwrap_err();
        assert!(
            err.to_string().starts_with("/data/cluster.json is damaged"),
            "{err}"
        );
        assert!(
            err.to_string().contains("restore it from a backup"),
            "{err}"
        );
        assert!(matches!(
            decode_cluster(path, b"\xff\xfe{}").unwrap_err(),
            ClusterFileError::Corrupt { .. }
        ));
        // Through the file system too.
        let dir = tempfile::tempdir().unwrap();
        fs::write(cluster_file(dir.path()), &good[..good.len() / 2]).unwrap();
        let err = read_cluster(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&cluster_file(dir.path()).display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_changed_value_fails_the_checksum() {
        let path = Path::new("cluster.json");
        let good = String::from_utf8(encode_cluster(&three(1)).unwrap()).unwrap();
        let bad = good.replace("127.0.0.1:8082", "127.0.0.1:8092");
        let err = decode_cluster(path, bad.as_bytes()).unwrap_err();
        assert!(matches!(err, ClusterFileError::Checksum { .. }), "{err}");
        let bad = good.replace("\"shards\": 64", "\"shards\": 32");
        assert!(matches!(
            decode_cluster(path, bad.as_bytes()).unwrap_err(),
            ClusterFileError::Checksum { .. }
        ));
        // A damaged key is refused even where its value would default.
        let bad = good.replace("\"seen\"", "\"sean\"");
        assert!(matches!(
            decode_cluster(path, bad.as_bytes()).unwrap_err(),
            ClusterFileError::Corrupt { .. }
        ));
    }

    /// The repair the error message describes: a peer's file with its
    /// checksum line deleted and `node_id` changed.
    #[test]
    fn a_peers_copy_edited_as_the_message_says_is_accepted() {
        let peer = String::from_utf8(encode_cluster(&three(2)).unwrap()).unwrap();
        let edited: String = peer
            .lines()
            .filter(|line| !line.contains("\"checksum\""))
            .map(|line| line.replace("\"node_id\": 2", "\"node_id\": 1") + "\n")
            .collect();
        let read = decode_cluster(Path::new("cluster.json"), edited.as_bytes()).unwrap();
        assert_eq!(read.spec, three(1).spec);
        // Without the deletion, the edit is caught.
        let unchecked = peer.replace("\"node_id\": 2", "\"node_id\": 1");
        assert!(matches!(
            decode_cluster(Path::new("cluster.json"), unchecked.as_bytes()).unwrap_err(),
            ClusterFileError::Checksum { .. }
        ));
    }

    #[test]
    fn other_formats_and_invalid_clusters_are_named() {
        let path = Path::new("d/cluster.json");
        let newer = br#"{"format": 2, "something": "else"}"#;
        let err = decode_cluster(path, newer).unwrap_err();
        assert!(
            matches!(err, ClusterFileError::UnsupportedFormat { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("format 2"), "{err}");
        // Hand-written (no checksum) is accepted when valid...
        let by_hand = br#"{"format": 1, "node_id": 2, "shards": 8, "replicas": 1,
            "members": {"1": "a:1", "2": "b:2"}}"#;
        let read = decode_cluster(path, by_hand).unwrap();
        assert_eq!((read.spec.node_id, read.spec.shards), (2, 8));
        assert!(read.seen.is_empty());
        // ...and refused, naming the file, when the cluster is not.
        let invalid = br#"{"format": 1, "node_id": 2, "shards": 8, "replicas": 3,
            "members": {"1": "a:1", "2": "b:2"}}"#;
        let err = decode_cluster(path, invalid).unwrap_err();
        assert!(
            matches!(
                &err,
                ClusterFileError::Invalid {
                    source: SpecError::TooManyReplicas { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with("d/cluster.json holds an invalid cluster"));
    }

    #[test]
    fn write_refuses_an_invalid_spec_and_io_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = three(1);
        bad.spec.replicas = 0;
        assert!(matches!(
            write_cluster(dir.path(), &bad).unwrap_err(),
            ClusterFileError::Invalid { .. }
        ));
        assert_eq!(read_cluster(dir.path()).unwrap(), None, "nothing written");

        let missing = dir.path().join("no-such-dir");
        let err = write_cluster(&missing, &three(1)).unwrap_err();
        assert!(
            matches!(err, ClusterFileError::Io { op: "create", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("no-such-dir"), "{err}");

        let odd = dir.path().join("odd");
        fs::create_dir_all(cluster_file(&odd)).unwrap();
        let err = read_cluster(&odd).unwrap_err();
        assert!(
            matches!(err, ClusterFileError::Io { op: "read", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("odd/cluster.json"), "{err}");
    }

    #[test]
    fn matching_flags_pass() {
        let stored = three(1).spec;
        check_flags(&stored, &flags(1)).unwrap();
        let mut explicit = flags(1);
        explicit.shards = Some(64);
        explicit.replicas = Some(3);
        check_flags(&stored, &explicit).unwrap();
    }

    #[test]
    fn each_difference_says_what_and_how_to_fix() {
        let stored = three(1).spec;
        let mut given = flags(1);
        given.shards = Some(32);
        let err = check_flags(&stored, &given).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--shards 32 but this data dir was created with --shards 64; start with \
             --shards 64 or an empty data dir (the shard count cannot change)"
        );

        let mut given = flags(1);
        given.replicas = Some(1);
        assert_eq!(
            check_flags(&stored, &given).unwrap_err().differences,
            vec![Difference::Replicas {
                stored: 3,
                given: 1,
                whose: Whose::Here,
            }]
        );

        let err = check_flags(&stored, &flags(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--node-id 2 but this data dir belongs to node 1; start with --node-id 1, \
             or give node 2 its own data dir"
        );

        let mut given = flags(1);
        given.members = Some(
            crate::spec::parse_peers("1=127.0.0.1:8081,2=127.0.0.1:9082,4=127.0.0.1:8084").unwrap(),
        );
        let text = check_flags(&stored, &given).unwrap_err().to_string();
        for words in [
            "node 2 is at 127.0.0.1:9082 here but 127.0.0.1:8082 stored",
            "node 4 (127.0.0.1:8084) is not a stored member",
            "stored member node 3 (127.0.0.1:8083) is missing",
            "start with --peers 1=127.0.0.1:8081,2=127.0.0.1:8082,3=127.0.0.1:8083",
        ] {
            assert!(text.contains(words), "{words:?} not in {text}");
        }

        let mut given = flags(1);
        given.members = None;
        let text = check_flags(&stored, &given).unwrap_err().to_string();
        assert!(
            text.contains("--peers was not given; start with --node-id 1 --peers 1="),
            "{text}"
        );
    }

    #[test]
    fn a_peers_cluster_is_named_as_the_peers_data_dir() {
        let theirs = three(2).spec;
        let mut given = flags(1);
        given.shards = Some(32);
        let text = check_flags_with_peer(&theirs, &given, 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            text,
            "--shards 32 but node 2's data dir was created with --shards 64; start with \
             --shards 64 to join node 2's cluster (the shard count cannot change)"
        );
        assert!(!text.contains("this data dir"), "{text}");
        // Node ids differ between peers: not a difference.
        check_flags_with_peer(&theirs, &flags(1), 2).unwrap();
    }

    #[test]
    fn every_difference_is_reported_at_once() {
        let stored = three(1).spec;
        let given = Flags {
            node_id: 3,
            members: None,
            shards: Some(16),
            replicas: Some(2),
        };
        let err = check_flags(&stored, &given).unwrap_err();
        assert_eq!(err.differences.len(), 4);
        assert!(matches!(err.differences[0], Difference::NodeId { .. }));
        assert!(matches!(err.differences[1], Difference::NoPeers { .. }));
        assert!(matches!(err.differences[2], Difference::Shards { .. }));
        assert!(matches!(err.differences[3], Difference::Replicas { .. }));
        assert_eq!(err.to_string().matches("; also ").count(), 3);
    }
}
