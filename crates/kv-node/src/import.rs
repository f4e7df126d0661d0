//! `--import kv_store.json`: migrating from the Flask store.
//!
//! The Flask store dumped its dict with `json.dump`: one JSON object of key
//! to value. Each value's JSON text is kept as written (as a `PUT` keeps the
//! text it was sent) and stored as the body a `GET` answers with
//! ([`crate::api::value_body`]). Every key is written through the store's log
//! in one group commit, then a snapshot makes the import compact.
//!
//! The import goes only into an empty data dir: importing over live data
//! could overwrite writes newer than the dump, and losing nothing wins over
//! convenience. A bad file is refused as a whole with the reason, before any
//! key is written.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kv_store::Store;
use serde_json::value::RawValue;

use crate::api::value_body;
use kv_http::key::MAX_KEY_BYTES;

/// Why an import was refused.
#[derive(Debug)]
pub enum ImportError {
    Read(PathBuf, std::io::Error),
    NotAnObject(PathBuf, serde_json::Error),
    BadKey(PathBuf, String),
    NotEmpty(PathBuf, usize),
    Store(kv_store::StoreError),
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportError::Read(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            ImportError::NotAnObject(path, e) => write!(
                f,
                "{} is not a Flask kv_store.json dump (a JSON object of key to value): {e}",
                path.display()
            ),
            ImportError::BadKey(path, key) => write!(
                f,
                "{} holds a key kv-node cannot serve ({} bytes; keys are 1 to {MAX_KEY_BYTES} bytes): {key:?}",
                path.display(),
                key.len()
            ),
            ImportError::NotEmpty(path, keys) => write!(
                f,
                "refusing to import {}: the data dir already holds {keys} keys, and importing \
                 could overwrite newer writes; import into an empty --data-dir, or drop --import",
                path.display()
            ),
            ImportError::Store(e) => write!(f, "import failed: {e}"),
        }
    }
}

impl std::error::Error for ImportError {}

/// Parses a dump into (key, stored body) pairs.
pub fn parse_dump(path: &Path, text: &[u8]) -> Result<Vec<(String, bytes::Bytes)>, ImportError> {
    // A BTreeMap keeps the last of duplicate keys, as Python's json.load does.
    let dump: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(text)
        .map_err(|e| ImportError::NotAnObject(path.to_path_buf(), e))?;
    dump.into_iter()
        .map(|(key, value)| {
            if key.is_empty() || key.len() > MAX_KEY_BYTES {
                return Err(ImportError::BadKey(path.to_path_buf(), key));
            }
            let body = value_body(value.get().as_bytes());
            Ok((key, body))
        })
        .collect()
}

/// Imports the dump at `path` into `store` (which must be empty); the number
/// of keys imported.
pub async fn import(store: Arc<Store>, path: PathBuf) -> Result<usize, ImportError> {
    let read_path = path.clone();
    let text = tokio::task::spawn_blocking(move || std::fs::read(&read_path))
        .await
        .map_err(|e| ImportError::Read(path.clone(), std::io::Error::other(e)))?
        .map_err(|e| ImportError::Read(path.clone(), e))?;
    let entries = parse_dump(&path, &text)?;
    drop(text);
    if !store.is_empty() {
        return Err(ImportError::NotEmpty(path, store.len()));
    }
    let count = store.put_all(entries).await.map_err(ImportError::Store)?;
    tokio::task::spawn_blocking(move || store.snapshot_now())
        .await
        .map_err(|e| ImportError::Store(kv_store::StoreError::Snapshot(e.to_string())))?
        .map_err(ImportError::Store)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_value_text_and_last_duplicate() {
        let entries = parse_dump(
            Path::new("x.json"),
            br#"{"a": [1, 2.50], "b": null, "a": {"k": "v"}}"#,
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, "a");
        assert_eq!(&entries[0].1[..], b"{\"value\":{\"k\": \"v\"}}\n");
        assert_eq!(&entries[1].1[..], b"{\"value\":null}\n");
    }

    #[test]
    fn refuses_bad_dumps() {
        let path = Path::new("x.json");
        assert!(matches!(
            parse_dump(path, b"[1, 2]"),
            Err(ImportError::NotAnObject(..))
        ));
        assert!(matches!(
            parse_dump(path, b"{\"a\": "),
            Err(ImportError::NotAnObject(..))
        ));
        assert!(matches!(
            parse_dump(path, br#"{"": 1}"#),
            Err(ImportError::BadKey(..))
        ));
    }
}
