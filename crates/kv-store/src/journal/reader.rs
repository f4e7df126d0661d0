//! Reading log segments, and what to do with damage in them.
//!
//! An all-zero tail is the writer's unused preallocation: cut silently.
//! Other damage at offset `o` of a segment is a **torn tail** when the segment is
//! the last one and no valid record starts anywhere after `o`: the process
//! (or machine) died mid-append, or garbage was appended. It is cut off with
//! a warning naming the file, the offset and the bytes dropped; none of those
//! bytes were acknowledged as a whole record.
//!
//! Anything else (a bad checksum with valid records after it, damage in a
//! sealed segment, a well-checksummed record that makes no sense) is
//! **corruption**: refuse to open, naming file and offset, unless `repair`
//! is set; then cut the segment there and keep the cut bytes in
//! `<segment>.corrupt-<offset>` so nothing is destroyed.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use super::record::{self, Kind};
use crate::entry;
use crate::map::{Change, Recovered};
use crate::OpenError;

/// The change a decoded log record makes; `Err` says why it makes no sense.
fn change(kind: Kind, body: &[u8]) -> Result<Recovered<'_>, &'static str> {
    match kind {
        Kind::Put if entry::is_well_formed(body) => Ok(Recovered::new(Change::Put(body))),
        Kind::Put => Err("malformed put record"),
        Kind::Delete => Ok(Recovered::new(Change::Delete(body))),
        Kind::End => Err("snapshot end record inside a log segment"),
    }
}

/// Decodes the changes of `buf` up to the first damage: the changes, where
/// they end, and the damage (its reason, and whether it may be a torn tail).
pub fn decode_changes(buf: &[u8]) -> (Vec<Recovered<'_>>, usize, Option<(&'static str, bool)>) {
    let mut changes = Vec::new();
    let mut pos = 0;
    let damage = loop {
        match record::decode(&buf[pos..]) {
            Ok(None) => break None,
            Ok(Some(rec)) => match change(rec.kind, rec.body) {
                Ok(change) => {
                    changes.push(change);
                    pos += rec.framed_len;
                }
                // A record that passed its checksum is never a torn tail.
                Err(why) => break Some((why, false)),
            },
            Err(damage) => break Some((damage.describe(), true)),
        }
    };
    (changes, pos, damage)
}

/// Reads the segment at `path` and handles damage in it as the module docs
/// say. `is_last`: the segment was being appended to when the process
/// stopped. Returns its usable bytes (decode them with [`decode_changes`])
/// and the bytes cut.
pub fn read_segment(path: &Path, is_last: bool, repair: bool) -> Result<(Vec<u8>, u64), OpenError> {
    let mut buf = fs::read(path).map_err(|e| OpenError::io("read log segment", path, e))?;
    let (_, pos, damage) = decode_changes(&buf);
    let cut_bytes = cut_damage(path, &buf, pos, damage, is_last, repair)?;
    buf.truncate(pos);
    Ok((buf, cut_bytes))
}

/// Handles the damage found at `pos` (if any) as the module docs say; the
/// bytes cut.
fn cut_damage(
    path: &Path,
    buf: &[u8],
    pos: usize,
    damage: Option<(&'static str, bool)>,
    is_last: bool,
    repair: bool,
) -> Result<u64, OpenError> {
    let Some((reason, may_be_tail)) = damage else {
        return Ok(0);
    };
    if may_be_tail && buf[pos..].iter().all(|&b| b == 0) {
        // The unused part of the writer's zero-filled preallocation.
        log::debug!("{}: preallocated tail from offset {pos}", path.display());
        truncate(path, pos as u64)?;
        return Ok(0);
    }
    let dropped = buf.len() - pos;
    if may_be_tail && is_last && record::valid_record_after(buf, pos).is_none() {
        log::warn!(
            "{}: torn tail at offset {pos} ({reason}): dropping the last {dropped} bytes",
            path.display()
        );
        truncate(path, pos as u64)?;
        return Ok(dropped as u64);
    }
    if !repair {
        return Err(OpenError::Corrupt {
            file: path.to_path_buf(),
            offset: pos as u64,
            reason: reason.to_owned(),
        });
    }
    let mut side_name = path.as_os_str().to_owned();
    side_name.push(format!(".corrupt-{pos}"));
    let side = Path::new(&side_name);
    let saved = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(side)
        .and_then(|mut file| {
            file.write_all(&buf[pos..])?;
            file.sync_all()
        });
    saved.map_err(|e| OpenError::io("save the cut bytes to", side, e))?;
    log::warn!(
        "repair: {} is corrupt at offset {pos} ({reason}); cut it there and moved the {dropped} \
         bytes after it to {}",
        path.display(),
        side.display()
    );
    truncate(path, pos as u64)?;
    Ok(dropped as u64)
}

fn truncate(path: &Path, len: u64) -> Result<(), OpenError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| {
            file.set_len(len)?;
            file.sync_all()
        })
        .map_err(|e| OpenError::io("truncate log segment", path, e))
}
