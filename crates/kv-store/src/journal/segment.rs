//! The header each log segment starts with, so recovery can tell when a
//! segment is missing.
//!
//! ```text
//! "KVWAL02\n" [seq: u64 LE] [follows: u64 LE] [xxh3 of the 24 bytes before: u64 LE]
//! ```
//!
//! `seq` is the segment's own number (a renamed file is noticed) and
//! `follows` the number of the segment that was appended to before it (0 for
//! the first segment of a data directory). Numbers alone cannot show a gap:
//! recovery deletes a last segment that got no records (every start opens
//! one), so numbers legitimately skip. A chain of `follows` links can: the
//! segment opened after such a deletion follows the deleted segment's
//! predecessor, never a number that could hold records and be gone.
//!
//! Segments written before this header existed start directly with a record
//! (or with zeros); they are read as *legacy* segments, whose link is not
//! known, so a data directory upgrades in place.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use super::{segment_name, sync_dir};

/// The header's first bytes: the segment format and its version.
pub const MAGIC: &[u8; 8] = b"KVWAL02\n";

/// Bytes of the header; records start after it.
pub const HEADER_LEN: u64 = 32;

/// What a segment's first bytes say about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A segment with a header: records start at [`HEADER_LEN`].
    Linked {
        seq: u64,
        /// The segment appended to before this one (0: none).
        follows: u64,
    },
    /// No header (written by an older version, or zeros): records start at 0.
    Legacy,
    /// Starts with the magic but the rest fails its check.
    Damaged,
}

impl Header {
    /// Where the records start.
    pub fn records_at(self) -> u64 {
        match self {
            Header::Legacy => 0,
            Header::Linked { .. } | Header::Damaged => HEADER_LEN,
        }
    }
}

/// Encodes the header of segment `seq`, which follows segment `follows`.
pub fn encode(seq: u64, follows: u64) -> [u8; HEADER_LEN as usize] {
    let mut out = [0u8; HEADER_LEN as usize];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&follows.to_le_bytes());
    let check = xxh3_64(&out[..24]);
    out[24..].copy_from_slice(&check.to_le_bytes());
    out
}

/// Decodes the first bytes of a segment (fewer than [`HEADER_LEN`] if the
/// file is that short).
pub fn decode(bytes: &[u8]) -> Header {
    if !bytes.starts_with(MAGIC) {
        return Header::Legacy;
    }
    let Some(header) = bytes.get(..HEADER_LEN as usize) else {
        return Header::Damaged;
    };
    let word = |at: usize| {
        let out: Option<[u8; 8]> = header.get(at..at + 8).and_then(|b| b.try_into().ok());
        out.map_or(0, u64::from_le_bytes)
    };
    if word(24) != xxh3_64(header.get(..24).unwrap_or_default()) {
        return Header::Damaged;
    }
    Header::Linked {
        seq: word(8),
        follows: word(16),
    }
}

/// Reads the header of an open segment (from its start).
pub fn read(file: &mut File) -> io::Result<Header> {
    let mut bytes = Vec::with_capacity(HEADER_LEN as usize);
    Read::take(&mut *file, HEADER_LEN).read_to_end(&mut bytes)?;
    Ok(decode(&bytes))
}

/// Creates log segment `seq`, following segment `follows`: its header, then
/// zeros up to `zeros_to` (the writer's first preallocated chunk), synced,
/// with its directory entry synced too.
pub fn create(dir: &Path, seq: u64, follows: u64, zeros_to: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(segment_name(seq)))?;
    zero_fill(&file, HEADER_LEN, zeros_to.max(HEADER_LEN))?;
    file.write_all_at(&encode(seq, follows), 0)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok(file)
}

/// Rewrites segment `seq`'s header to follow `follows` (`--repair` going on
/// past a missing segment, so the next start does not stop at it again).
pub fn relink(path: &Path, seq: u64, follows: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.write_all_at(&encode(seq, follows), 0)?;
    file.sync_data()
}

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Writes zeros over `[from, to)`.
pub fn zero_fill(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let len = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(ZEROS.get(..len).unwrap_or_default(), at)?;
        at += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_damage_is_seen() {
        let header = encode(7, 5);
        assert_eq!(decode(&header), Header::Linked { seq: 7, follows: 5 });
        for at in 8..header.len() {
            let mut bad = header;
            bad[at] ^= 1;
            assert_eq!(decode(&bad), Header::Damaged, "flip at {at}");
        }
        assert_eq!(decode(&header[..20]), Header::Damaged);
        assert_eq!(decode(&[0; 32]), Header::Legacy);
        assert_eq!(decode(&[]), Header::Legacy);
    }
}
