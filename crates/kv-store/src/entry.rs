//! One key and its value in a single allocation.
//!
//! Memory per key is the figure the durability issue measures against Redis,
//! so an entry is one reference-counted allocation laid out as
//!
//! ```text
//! [refcount: 8][length: 8][key length: u16 LE][key bytes][value bytes]
//! ```
//!
//! held through a *thin* pointer (`triomphe::ThinArc`: the length lives in
//! the allocation, and there is no weak count), so a shard's table holds 8
//! bytes per slot. Compared with a `HashMap<Box<str>, Bytes>` (48-byte slots,
//! a key allocation, a value allocation and a lazily allocated `Bytes` header
//! on first clone) this saves two allocations and ~40 bytes of table per key.
//!
//! The same bytes are the body of a log or snapshot `Put` record, so writing
//! an entry out copies it once and recovery turns a record back into an entry
//! with one allocation and one `memcpy`.
//!
//! A read hands out the value as [`Bytes`] that share the entry
//! ([`Bytes::from_owner`]): no copy of the value, one small allocation for
//! the `Bytes` header.

use std::ops::Deref;

use bytes::Bytes;
use triomphe::ThinArc;

/// A key and its value, see the module docs for the layout. Derefs to the
/// `[key length][key][value]` bytes.
#[derive(Clone)]
pub struct Entry(ThinArc<(), u8>);

impl Entry {
    /// The entry's key.
    pub fn key(&self) -> &[u8] {
        key(self)
    }

    /// The entry's value.
    pub fn value(&self) -> &[u8] {
        value(self)
    }
}

impl Deref for Entry {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0.slice
    }
}

impl From<&[u8]> for Entry {
    /// An entry from a record body; the caller checked it is well formed.
    fn from(body: &[u8]) -> Self {
        Entry(ThinArc::from_header_and_slice((), body))
    }
}

/// Bytes in front of the key.
const KEY_LEN_BYTES: usize = 2;

/// The longest key an entry can hold.
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;

/// Builds an entry; `None` if the key is longer than [`MAX_KEY_BYTES`].
pub fn new(key: &[u8], value: &[u8]) -> Option<Entry> {
    let key_len = u16::try_from(key.len()).ok()?.to_le_bytes();
    let total = KEY_LEN_BYTES + key.len() + value.len();
    let value_at = KEY_LEN_BYTES + key.len();
    // A mapped range is an `ExactSizeIterator`: one allocation, no temporary.
    // Every `get` hits: `i` stays below `total`, the three parts' lengths.
    let bytes = (0..total).map(|i| {
        let byte = if i < KEY_LEN_BYTES {
            key_len.get(i)
        } else if i < value_at {
            key.get(i - KEY_LEN_BYTES)
        } else {
            value.get(i - value_at)
        };
        byte.copied().unwrap_or(0)
    });
    Some(Entry(ThinArc::from_header_and_iter((), bytes)))
}

/// Checks that `bytes` (a record body read from disk) is a well-formed entry.
pub fn is_well_formed(bytes: &[u8]) -> bool {
    bytes.len() >= KEY_LEN_BYTES && KEY_LEN_BYTES + key_len(bytes) <= bytes.len()
}

fn key_len(entry: &[u8]) -> usize {
    match entry {
        [low, high, ..] => usize::from(u16::from_le_bytes([*low, *high])),
        _ => 0,
    }
}

/// The key of a well-formed entry (empty for a malformed one, which
/// [`is_well_formed`] keeps out of the map).
pub fn key(entry: &[u8]) -> &[u8] {
    entry
        .get(KEY_LEN_BYTES..KEY_LEN_BYTES + key_len(entry))
        .unwrap_or_default()
}

/// The value of a well-formed entry (empty for a malformed one).
pub fn value(entry: &[u8]) -> &[u8] {
    entry
        .get(KEY_LEN_BYTES + key_len(entry)..)
        .unwrap_or_default()
}

/// Keeps an entry alive for as long as a [`Bytes`] of its value exists.
struct ValueOwner(Entry);

impl AsRef<[u8]> for ValueOwner {
    fn as_ref(&self) -> &[u8] {
        value(&self.0)
    }
}

/// The value of `entry` as [`Bytes`] that share its allocation.
pub fn value_bytes(entry: &Entry) -> Bytes {
    Bytes::from_owner(ValueOwner(entry.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let entry = new(b"key", b"value").unwrap();
        assert_eq!(&entry[..], b"\x03\x00keyvalue");
        assert!(is_well_formed(&entry));
        assert_eq!(key(&entry), b"key");
        assert_eq!(value(&entry), b"value");
        assert_eq!(&value_bytes(&entry)[..], b"value");
        assert!(new(&vec![b'k'; MAX_KEY_BYTES + 1], b"").is_none());
        assert!(!is_well_formed(b"\x05\x00ab"));
        assert!(!is_well_formed(b"\x01"));
    }
}
