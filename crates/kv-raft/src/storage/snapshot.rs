//! A shard's snapshot files: format, writing, loading, generations.
//!
//! A snapshot of shard `g` at log id `(term, index)` is the file
//! `<data_dir>/shards/<g>/snap-<term>-<index>.snap`:
//!
//! ```text
//! "KVSHARD1"  [meta len: u32 LE][meta xxh3: u64 LE][meta: postcard SnapshotMeta]
//! Put record * count   (kv-store's framing: [key len u16][key][value] per record)
//! End record (body: count u64 LE)
//! ```
//!
//! Records use kv-store's framing ([`kv_store::journal::record`]): every
//! record carries its own checksum, so a torn or flipped file is detected
//! wherever the damage is, and the end record's count catches a file cut
//! exactly between two records.
//!
//! The file's bytes are also what travels to a lagging follower
//! ([`crate::SnapshotData`] is a `Cursor<Vec<u8>>`, sent whole by the
//! transport): a leader reads its newest file, the follower checks and
//! loads the same bytes and writes them as its own file. Streaming the file
//! instead of holding it in memory is left for later (design §5, open
//! question 5): today a snapshot is in memory once while it is sent,
//! received or loaded.
//!
//! A file is written to `<name>.tmp`, fsynced, renamed, and the directory
//! fsynced; then all but the newest two generations are deleted. Keeping one
//! previous generation lets a restart fall back to it when the newest file
//! turns out damaged ([`load_newest`]); the log keeps the entries after the
//! previous generation for exactly that case (see [`super::log`]).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kv_store::journal::record::{self, Kind};
use kv_store::Map;
use openraft::alias::SnapshotMetaOf;
use xxhash_rust::xxh3::xxh3_64;

use crate::types::KvRaft;

const MAGIC: &[u8; 8] = b"KVSHARD1";
const META_HEADER: usize = 8 + 4 + 8;

/// A snapshot's meta.
pub(crate) type Meta = SnapshotMetaOf<KvRaft>;

/// Why a snapshot's bytes cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("damaged at offset {offset}: {reason}")]
pub struct Damaged {
    pub offset: u64,
    pub reason: String,
}

fn damaged(offset: usize, reason: impl Into<String>) -> Damaged {
    Damaged {
        offset: offset as u64,
        reason: reason.into(),
    }
}

/// `(term, index)` of a snapshot's last log id; `(0, 0)` for none.
pub(crate) fn position(meta: &Meta) -> (u64, u64) {
    meta.last_log_id
        .as_ref()
        .map_or((0, 0), |id| (id.committed_leader_id().term, id.index))
}

/// The file name of a snapshot at `(term, index)`.
pub(crate) fn file_name((term, index): (u64, u64)) -> String {
    format!("snap-{term}-{index}.snap")
}

/// `(term, index)` from a snapshot file name, `None` for other files.
pub(crate) fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
    let (term, index) = rest.split_once('-')?;
    Some((term.parse().ok()?, index.parse().ok()?))
}

/// Encodes a snapshot of `entries` (a consistent copy of the shard's map)
/// with `meta`.
pub(crate) fn encode(meta: &Meta, entries: &[kv_store::Entry]) -> io::Result<Vec<u8>> {
    let meta_bytes = postcard::to_stdvec(meta).map_err(io::Error::other)?;
    let meta_len = u32::try_from(meta_bytes.len()).map_err(io::Error::other)?;
    let body: usize = entries
        .iter()
        .map(|e| e.len() + record::HEADER_LEN + 1)
        .sum();
    let mut out = Vec::with_capacity(META_HEADER + meta_bytes.len() + body + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&meta_len.to_le_bytes());
    out.extend_from_slice(&xxh3_64(&meta_bytes).to_le_bytes());
    out.extend_from_slice(&meta_bytes);
    for entry in entries {
        record::encode(&mut out, Kind::Put, entry);
    }
    record::encode(&mut out, Kind::End, &(entries.len() as u64).to_le_bytes());
    Ok(out)
}

/// Reads a snapshot's meta only (checked).
pub(crate) fn decode_meta(bytes: &[u8]) -> Result<(Meta, usize), Damaged> {
    let len: Option<[u8; 4]> = bytes.get(8..12).and_then(|b| b.try_into().ok());
    let sum: Option<[u8; 8]> = bytes.get(12..20).and_then(|b| b.try_into().ok());
    let (true, true, Some(len), Some(sum)) = (
        bytes.len() >= META_HEADER,
        bytes.starts_with(MAGIC),
        len,
        sum,
    ) else {
        return Err(damaged(0, "not a shard snapshot (bad magic)"));
    };
    let len = u32::from_le_bytes(len) as usize;
    let meta_bytes = bytes
        .get(META_HEADER..META_HEADER + len)
        .ok_or_else(|| damaged(8, "snapshot meta truncated"))?;
    if xxh3_64(meta_bytes) != u64::from_le_bytes(sum) {
        return Err(damaged(META_HEADER, "snapshot meta checksum mismatch"));
    }
    let meta = postcard::from_bytes(meta_bytes)
        .map_err(|e| damaged(META_HEADER, format!("undecodable snapshot meta: {e}")))?;
    Ok((meta, META_HEADER + len))
}

/// Checks a snapshot's bytes and loads its entries into a new map.
pub(crate) fn decode(bytes: &[u8]) -> Result<(Meta, Map), Damaged> {
    let (meta, mut at) = decode_meta(bytes)?;
    let map = Map::new();
    let mut count = 0u64;
    loop {
        // `at` only advances by whole records found in `bytes`.
        let rec = match record::decode(bytes.get(at..).unwrap_or_default()) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Err(damaged(at, "snapshot ends without its end record")),
            Err(damage) => return Err(damaged(at, damage.describe())),
        };
        match rec.kind {
            Kind::Put => {
                let (key, value) =
                    split_entry(rec.body).ok_or_else(|| damaged(at, "malformed entry"))?;
                map.insert(key, value)
                    .map_err(|e| damaged(at, e.to_string()))?;
                count += 1;
            }
            Kind::End => {
                if rec.body != count.to_le_bytes() {
                    return Err(damaged(at, "end record does not match the entries read"));
                }
                if at + rec.framed_len != bytes.len() {
                    return Err(damaged(at + rec.framed_len, "bytes after the end record"));
                }
                return Ok((meta, map));
            }
            _ => return Err(damaged(at, "unexpected record in a shard snapshot")),
        }
        at += rec.framed_len;
    }
}

/// `[key len u16 LE][key][value]` → key, value.
fn split_entry(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_le_bytes([*body.first()?, *body.get(1)?]));
    let key = body.get(2..2 + len)?;
    Some((key, body.get(2 + len..)?))
}

/// Writes `bytes` as the snapshot at `position` in `dir` (temp file,
/// fsync, rename, dir fsync), then deletes all but the newest two
/// generations. Blocking.
pub(crate) fn write(dir: &Path, position: (u64, u64), bytes: &[u8]) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let path = dir.join(file_name(position));
    let tmp = dir.join(format!("{}.tmp", file_name(position)));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    prune(dir)?;
    Ok(path)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The snapshot files in `dir`, newest first.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<((u64, u64), PathBuf)>> {
    let mut files = Vec::new();
    let items = match fs::read_dir(dir) {
        Ok(items) => items,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e),
    };
    for item in items {
        let item = item?;
        if let Some(position) = parse_name(&item.file_name().to_string_lossy()) {
            files.push((position, item.path()));
        }
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(files)
}

/// The purge floor the files in `dir` call for: the last index of the
/// oldest generation kept (see [`super::log`]); `u64::MAX` (no floor) when
/// there is none past index 0: a snapshot of nothing but the initial
/// membership (or of nothing, as openraft's storage suite builds) is not
/// worth keeping log for.
pub(crate) fn purge_floor(dir: &Path) -> io::Result<u64> {
    Ok(list(dir)?
        .into_iter()
        .rev()
        .map(|((_, index), _)| index)
        .find(|index| *index > 0)
        .unwrap_or(u64::MAX))
}

/// Deletes all but the newest two generations, and leftover temp files.
fn prune(dir: &Path) -> io::Result<()> {
    let mut removed = false;
    for (_, path) in list(dir)?.into_iter().skip(2) {
        fs::remove_file(path)?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Removes temp files a crash left behind (on open).
pub(crate) fn remove_temps(dir: &Path) -> io::Result<()> {
    let items = match fs::read_dir(dir) {
        Ok(items) => items,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for item in items {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap-") && name.ends_with(".snap.tmp") {
            fs::remove_file(item.path())?;
        }
    }
    Ok(())
}

/// A snapshot loaded at start.
pub(crate) struct Loaded {
    pub meta: Meta,
    pub map: Map,
    pub path: PathBuf,
}

/// Loads the newest usable snapshot in `dir`: a damaged newer one is
/// skipped with a warning (falling back to the generation before it).
/// `Ok(None)`: no snapshot file at all. `Err(reasons)`: files exist and
/// none is usable (each file's problem).
pub(crate) fn load_newest(dir: &Path) -> io::Result<Result<Option<Loaded>, Vec<String>>> {
    let files = list(dir)?;
    let mut problems = Vec::new();
    for (_, path) in files {
        let bytes = fs::read(&path)?;
        match decode(&bytes) {
            Ok((meta, map)) => {
                for problem in &problems {
                    log::warn!("{problem}; fell back to {}", path.display());
                }
                return Ok(Ok(Some(Loaded { meta, map, path })));
            }
            Err(damage) => problems.push(format!("snapshot {}: {damage}", path.display())),
        }
    }
    if problems.is_empty() {
        Ok(Ok(None))
    } else {
        Ok(Err(problems))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> (Meta, Vec<kv_store::Entry>) {
        let map = Map::new();
        map.insert(b"a", b"1").unwrap();
        map.insert(b"bb", b"").unwrap();
        (Meta::default(), map.copy_all())
    }

    #[test]
    fn round_trips_and_every_cut_or_flip_is_caught() {
        let (meta, entries) = sample();
        let bytes = encode(&meta, &entries).unwrap();
        let (back, map) = decode(&bytes).unwrap();
        assert_eq!(back, meta);
        assert_eq!(map.get(b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(map.get(b"bb").as_deref(), Some(&b""[..]));
        assert_eq!(map.len(), 2);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            assert!(decode(&flipped).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn names_parse_back_and_order() {
        assert_eq!(parse_name(&file_name((3, 17))), Some((3, 17)));
        assert_eq!(parse_name("snap-3-17.snap.tmp"), None);
        assert_eq!(parse_name("snap-x-1.snap"), None);
    }

    #[test]
    fn keeps_two_generations_and_falls_back_past_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, entries) = sample();
        let bytes = encode(&meta, &entries).unwrap();
        for position in [(1, 5), (1, 9), (2, 12)] {
            write(dir.path(), position, &bytes).unwrap();
        }
        let left: Vec<_> = list(dir.path()).unwrap().into_iter().map(|f| f.0).collect();
        assert_eq!(left, [(2, 12), (1, 9)]);
        fs::write(
            dir.path().join(file_name((2, 12))),
            &bytes[..bytes.len() - 3],
        )
        .unwrap();
        let loaded = load_newest(dir.path()).unwrap().unwrap().unwrap();
        assert_eq!(loaded.path, dir.path().join(file_name((1, 9))));
        fs::write(dir.path().join(file_name((1, 9))), b"junk").unwrap();
        let problems = load_newest(dir.path()).unwrap().err().unwrap();
        assert_eq!(problems.len(), 2);
    }
}
