//! Reading log segments and snapshots in bounded chunks, and what to do with
//! damage in them.
//!
//! Files are streamed ([`stream`]): records are decoded from a buffer of
//! about [`CHUNK`] bytes (larger only for a record that does not fit) and
//! handed over a batch at a time, so recovery's memory is the map plus a few
//! MiB whatever the size of the files.
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

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::group::{self, GroupRef};
use super::record::{self, Kind, Record};
use super::segment::{self, Header};
use crate::entry;
use crate::map::{Change, Recovered};
use crate::OpenError;

/// Bytes read from a file at a time.
pub const CHUNK: usize = 4 << 20;

/// Damage found while streaming: where, why, and whether it may be a torn
/// tail (a record that passed its checksum never is).
#[derive(Clone, Copy, Debug)]
pub struct Found {
    pub offset: u64,
    pub reason: &'static str,
    pub may_be_tail: bool,
}

/// How a stream ended.
#[derive(Debug)]
pub struct Streamed {
    /// The offset after the last record handed over (or after the stop record).
    pub end: u64,
    /// `convert` answered [`Item::Stop`] for the record ending at `end`.
    pub stopped: bool,
    pub damage: Option<Found>,
}

/// What a record turns into.
pub enum Item<'a> {
    Change(Recovered<'a>),
    /// A Raft group's record ([`super::group`]), handed over at once.
    Group(u32, GroupRef<'a>),
    /// A record to pass over (a change a snapshot already covers).
    Skip,
    /// A valid end marker: stop reading.
    Stop,
}

/// Gives a closure the signature [`stream`] needs (closures do not infer
/// that their result borrows from their argument).
pub fn converter<F>(f: F) -> F
where
    F: for<'a> Fn(&Record<'a>) -> Result<Item<'a>, &'static str>,
{
    f
}

/// Streams the records of `file` from offset `from`: each is turned into a
/// change by `convert` (`Err`: it makes no sense) and the changes are handed
/// to `apply` in file order, a chunk at a time.
pub fn stream(
    file: &mut File,
    from: u64,
    convert: impl for<'a> Fn(&Record<'a>) -> Result<Item<'a>, &'static str>,
    apply: impl FnMut(&[Recovered<'_>]),
) -> io::Result<Streamed> {
    stream_with_groups(file, from, convert, apply, |_, _| {
        Err("group record where none belongs")
    })
}

/// [`stream`], handing each group record to `group` as it is decoded (group
/// records and changes are independent, so only each one's own order
/// matters); `group` answering `Err` is damage at that record.
pub fn stream_with_groups(
    file: &mut File,
    from: u64,
    convert: impl for<'a> Fn(&Record<'a>) -> Result<Item<'a>, &'static str>,
    mut apply: impl FnMut(&[Recovered<'_>]),
    mut group: impl FnMut(u32, GroupRef<'_>) -> Result<(), &'static str>,
) -> io::Result<Streamed> {
    file.seek(SeekFrom::Start(from))?;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut buf_at = from;
    let mut want = CHUNK;
    let mut eof = false;
    loop {
        if !eof && buf.len() < want {
            let need = want - buf.len();
            buf.reserve(need);
            let got = Read::take(&mut *file, need as u64).read_to_end(&mut buf)?;
            eof = got < need;
        }
        let mut batch = Vec::new();
        let mut pos = 0;
        let mut stopped = false;
        let mut damage = None;
        want = CHUNK;
        loop {
            // `pos` only advances by whole records found in `buf`.
            let rest = buf.get(pos..).unwrap_or_default();
            match record::decode(rest) {
                Ok(None) => break,
                Ok(Some(rec)) => match convert(&rec) {
                    Ok(Item::Change(change)) => {
                        batch.push(change);
                        pos += rec.framed_len;
                    }
                    Ok(Item::Skip) => pos += rec.framed_len,
                    Ok(Item::Group(id, what)) => match group(id, what) {
                        Ok(()) => pos += rec.framed_len,
                        Err(reason) => {
                            damage = Some((reason, false));
                            break;
                        }
                    },
                    Ok(Item::Stop) => {
                        pos += rec.framed_len;
                        stopped = true;
                        break;
                    }
                    Err(reason) => {
                        damage = Some((reason, false));
                        break;
                    }
                },
                Err(record::Damage::Truncated) if !eof => {
                    // Read on; a record larger than a chunk gets a buffer that fits.
                    want = want.max(record::needed(rest));
                    break;
                }
                Err(found) => {
                    damage = Some((found.describe(), true));
                    break;
                }
            }
        }
        apply(&batch);
        drop(batch);
        let end = buf_at + pos as u64;
        if stopped || damage.is_some() || (eof && pos == buf.len()) {
            return Ok(Streamed {
                end,
                stopped,
                damage: damage.map(|(reason, may_be_tail)| Found {
                    offset: end,
                    reason,
                    may_be_tail,
                }),
            });
        }
        buf.drain(..pos);
        buf_at = end;
    }
}

/// The change a decoded log record makes; `Err` says why it makes no sense.
fn change<'a>(rec: &Record<'a>) -> Result<Item<'a>, &'static str> {
    match rec.kind {
        kind if kind.is_group() => {
            let (id, what) = group::decode(kind, rec.body)?;
            Ok(Item::Group(id, what))
        }
        Kind::Put if entry::is_well_formed(rec.body) => {
            Ok(Item::Change(Recovered::new(Change::Put(rec.body))))
        }
        Kind::Put => Err("malformed put record"),
        Kind::Delete => Ok(Item::Change(Recovered::new(Change::Delete(rec.body)))),
        Kind::End => Err("snapshot end record inside a log segment"),
        _ => Err("unknown record kind"),
    }
}

/// [`change`] for a segment a snapshot covers: only group records count.
fn group_only<'a>(rec: &Record<'a>) -> Result<Item<'a>, &'static str> {
    match change(rec)? {
        Item::Change(_) => Ok(Item::Skip),
        other => Ok(other),
    }
}

/// What reading one segment found.
#[derive(Debug)]
pub struct SegmentRead {
    pub header: Header,
    pub records: u64,
    /// Bytes cut (torn tail or repair).
    pub cut_bytes: u64,
    /// What repair cut (not a torn tail), for [`super::recovery::RecoveryReport::repaired`].
    pub repaired: Option<String>,
}

/// Streams the log segment at `path` into `apply`, handling damage as the
/// module docs say. `is_last`: the segment was being appended to when the
/// process stopped.
///
/// `changes`: whether its puts and deletes count (`false` for a segment a
/// snapshot covers, read only for its group records); each group record
/// goes to `group` (`Err`: damage there).
pub fn read_segment(
    path: &Path,
    is_last: bool,
    repair: bool,
    changes: bool,
    mut apply: impl FnMut(&[Recovered<'_>]),
    mut group: impl FnMut(u32, GroupRef<'_>) -> Result<(), &'static str>,
) -> Result<SegmentRead, OpenError> {
    let io_error = |e| OpenError::io("read log segment", path, e);
    let mut file = File::open(path).map_err(io_error)?;
    let header = segment::read(&mut file).map_err(io_error)?;
    let mut records = 0u64;
    let mut group_records = 0u64;
    let convert = if changes { change } else { group_only };
    let streamed = stream_with_groups(
        &mut file,
        header.records_at(),
        convert,
        |batch| {
            records += batch.len() as u64;
            apply(batch);
        },
        |id, what| {
            group_records += 1;
            group(id, what)
        },
    )
    .map_err(io_error)?;
    let records = records + group_records;
    let (cut_bytes, repaired) = match streamed.damage {
        None => (0, None),
        Some(found) => {
            let mut tail = Vec::new();
            file.seek(SeekFrom::Start(found.offset))
                .and_then(|_| file.read_to_end(&mut tail))
                .map_err(io_error)?;
            cut_damage(path, &tail, found, is_last, repair)?
        }
    };
    Ok(SegmentRead {
        header,
        records,
        cut_bytes,
        repaired,
    })
}

/// Handles `found` as the module docs say, given the bytes from it to the
/// end of the file; the bytes cut, and what repair cut (`None` for a torn
/// tail or the preallocated zeros: never acknowledged).
fn cut_damage(
    path: &Path,
    tail: &[u8],
    found: Found,
    is_last: bool,
    repair: bool,
) -> Result<(u64, Option<String>), OpenError> {
    let Found {
        offset: pos,
        reason,
        may_be_tail,
    } = found;
    if may_be_tail && tail.iter().all(|&b| b == 0) {
        // The unused part of the writer's zero-filled preallocation.
        log::debug!("{}: preallocated tail from offset {pos}", path.display());
        truncate(path, pos)?;
        return Ok((0, None));
    }
    let dropped = tail.len();
    if may_be_tail && is_last && record::valid_record_after(tail, 0).is_none() {
        log::warn!(
            "{}: torn tail at offset {pos} ({reason}): dropping the last {dropped} bytes",
            path.display()
        );
        truncate(path, pos)?;
        return Ok((dropped as u64, None));
    }
    if !repair {
        return Err(OpenError::Corrupt {
            file: path.to_path_buf(),
            offset: pos,
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
            file.write_all(tail)?;
            file.sync_all()
        });
    saved.map_err(|e| OpenError::io("save the cut bytes to", side, e))?;
    log::warn!(
        "repair: {} is corrupt at offset {pos} ({reason}); cut it there and moved the {dropped} \
         bytes after it to {}",
        path.display(),
        side.display()
    );
    truncate(path, pos)?;
    Ok((
        dropped as u64,
        Some(format!(
            "{} cut at offset {pos} ({reason}): {dropped} bytes",
            path.display()
        )),
    ))
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
