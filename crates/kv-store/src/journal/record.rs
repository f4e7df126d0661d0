//! Record framing shared by log segments and snapshots.
//!
//! ```text
//! [length: u32 LE][header check: u32 LE][checksum: u64 LE][kind: u8][body]
//!  `length` counts kind + body; `header check` is xxh3 of the length bytes
//!  (seeded, truncated); `checksum` is xxh3 of kind + body.
//! ```
//!
//! Two checks instead of one: the header check lets a reader tell, cheaply
//! and at any offset, whether a position *could* start a record. Recovery
//! uses that to decide whether damage is a torn tail (no valid record after
//! it) or corruption in the middle of the log (a valid record follows), in
//! linear time even over a long garbage tail.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Bytes before a record's kind.
pub const HEADER_LEN: usize = 16;

/// Largest kind + body accepted; anything longer is damage, not a record.
pub const MAX_PAYLOAD: usize = 256 << 20;

const HEADER_SEED: u64 = 0x6b76_2d6a_6f75_726e; // "kv-journ"

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The body is an entry (`[key len][key][value]`): store it.
    Put = 1,
    /// The body is a key: remove it.
    Delete = 2,
    /// Ends a snapshot; the body is the entry count (u64 LE).
    End = 3,
    /// A Raft group's log entries ([`super::group`] has the bodies).
    GroupEntries = 4,
    /// A Raft group's vote.
    GroupVote = 5,
    /// A Raft group's committed log id.
    GroupCommitted = 6,
    /// A Raft group drops the entries after an index.
    GroupTruncate = 7,
    /// A Raft group drops the entries up to an index.
    GroupPurge = 8,
    /// A Raft group's replica left this node: forget everything before.
    GroupDrop = 9,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Put),
            2 => Some(Kind::Delete),
            3 => Some(Kind::End),
            4 => Some(Kind::GroupEntries),
            5 => Some(Kind::GroupVote),
            6 => Some(Kind::GroupCommitted),
            7 => Some(Kind::GroupTruncate),
            8 => Some(Kind::GroupPurge),
            9 => Some(Kind::GroupDrop),
            _ => None,
        }
    }

    /// Whether a Raft group's record (never applied to the map).
    pub fn is_group(self) -> bool {
        matches!(
            self,
            Kind::GroupEntries
                | Kind::GroupVote
                | Kind::GroupCommitted
                | Kind::GroupTruncate
                | Kind::GroupPurge
                | Kind::GroupDrop
        )
    }
}

/// Why the bytes at some offset are not a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Fewer bytes than the header or the declared length needs.
    Truncated,
    /// The length field fails its check or is out of range.
    BadHeader,
    /// The kind + body fail the checksum, or the kind is unknown.
    BadChecksum,
}

impl Damage {
    /// A short description for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Damage::Truncated => "record truncated",
            Damage::BadHeader => "bad record header",
            Damage::BadChecksum => "record checksum mismatch",
        }
    }
}

fn header_check(len: [u8; 4]) -> u32 {
    xxh3_64_with_seed(&len, HEADER_SEED) as u32
}

/// Appends one framed record to `out`.
pub fn encode(out: &mut Vec<u8>, kind: Kind, body: &[u8]) {
    let len = u32::try_from(1 + body.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&header_check(len).to_le_bytes());
    let checksum_at = out.len();
    out.extend_from_slice(&[0; 8]);
    let payload_at = out.len();
    out.push(kind as u8);
    out.extend_from_slice(body);
    let checksum = xxh3_64(out.get(payload_at..).unwrap_or_default());
    // The 8 bytes reserved above.
    if let Some(slot) = out.get_mut(checksum_at..payload_at) {
        slot.copy_from_slice(&checksum.to_le_bytes());
    }
}

/// A record read from a buffer.
#[derive(Debug)]
pub struct Record<'a> {
    pub kind: Kind,
    pub body: &'a [u8],
    /// Bytes the framed record occupies.
    pub framed_len: usize,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<[u8; 4]> {
    bytes.get(at..at + 4)?.try_into().ok()
}

/// Decodes the record at the start of `buf`: `Ok(None)` if `buf` is empty.
pub fn decode(buf: &[u8]) -> Result<Option<Record<'_>>, Damage> {
    if buf.is_empty() {
        return Ok(None);
    }
    let (Some(len_bytes), Some(check), Some(checksum)) =
        (read_u32(buf, 0), read_u32(buf, 4), buf.get(8..HEADER_LEN))
    else {
        return Err(Damage::Truncated);
    };
    if u32::from_le_bytes(check) != header_check(len_bytes) {
        return Err(Damage::BadHeader);
    }
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_PAYLOAD {
        return Err(Damage::BadHeader);
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Err(Damage::Truncated);
    };
    let checksum: [u8; 8] = checksum.try_into().map_err(|_| Damage::Truncated)?;
    if u64::from_le_bytes(checksum) != xxh3_64(payload) {
        return Err(Damage::BadChecksum);
    }
    // `len` is at least 1: the kind byte is there.
    let (&kind, body) = payload.split_first().ok_or(Damage::BadHeader)?;
    let kind = Kind::from_byte(kind).ok_or(Damage::BadChecksum)?;
    Ok(Some(Record {
        kind,
        body,
        framed_len: HEADER_LEN + len,
    }))
}

/// How many bytes the record starting at `buf` needs in all, when
/// [`decode`] found it [`Damage::Truncated`].
pub fn needed(buf: &[u8]) -> usize {
    match read_u32(buf, 0) {
        Some(len) if buf.len() >= HEADER_LEN => HEADER_LEN + u32::from_le_bytes(len) as usize,
        _ => HEADER_LEN,
    }
}

/// Whether any offset after `from` starts a valid record: if so, damage at
/// `from` is in the middle of the log, not a torn tail.
pub fn valid_record_after(buf: &[u8], from: usize) -> Option<usize> {
    (from + 1..buf.len().saturating_sub(HEADER_LEN - 1))
        .find(|&at| matches!(buf.get(at..).map(decode), Some(Ok(Some(_)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Put, b"\x01\x00kv");
        encode(&mut buf, Kind::Delete, b"k");
        let first = decode(&buf).unwrap().unwrap();
        assert_eq!((first.kind, first.body), (Kind::Put, &b"\x01\x00kv"[..]));
        let second = decode(&buf[first.framed_len..]).unwrap().unwrap();
        assert_eq!((second.kind, second.body), (Kind::Delete, &b"k"[..]));
        assert!(decode(&buf[first.framed_len + second.framed_len..])
            .unwrap()
            .is_none());
        for cut in 1..first.framed_len {
            assert_eq!(decode(&buf[..cut]).unwrap_err(), Damage::Truncated);
        }
        let mut flipped = buf.clone();
        flipped[HEADER_LEN + 2] ^= 0x40;
        assert_eq!(decode(&flipped).unwrap_err(), Damage::BadChecksum);
        assert_eq!(valid_record_after(&flipped, 0), Some(first.framed_len));
        flipped[1] ^= 0x01;
        assert_eq!(decode(&flipped).unwrap_err(), Damage::BadHeader);
        assert_eq!(valid_record_after(&buf, first.framed_len), None);
    }
}
