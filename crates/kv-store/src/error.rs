//! Errors the storage engine reports to its caller: typed (`thiserror`), so
//! a caller maps each kind to its own answer (kv-node: an HTTP status) and
//! keeps the underlying `io::Error` as the source.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a store operation failed.
///
/// Cheap to clone: every writer of a failed batch gets the same error, so
/// the `io::Error` is shared behind an [`Arc`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A log write or fdatasync failed for good: EIO, a file-size limit, or
    /// any failed fdatasync, even one for want of room (a `write` without
    /// room is [`StoreError::DiskFull`]). The write it carried was not
    /// applied, and the store refuses writes from now on: after a failed
    /// fsync Linux may have dropped the dirty pages, so a retry that
    /// "succeeds" proves nothing. Reads keep working.
    #[error("disk error {action} {}: {source}", path.display())]
    DiskFailed {
        /// What the log was doing, e.g. "appending to".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// The disk has no room for a log write (`ENOSPC`, `EDQUOT`). Unlike
    /// [`StoreError::DiskFailed`] this passes: the refused write was not
    /// applied, the log thread keeps the Raft groups' records it holds and
    /// retries them, and once a retry finds room the store takes writes
    /// again, without a restart (see `journal::writer`, "Full disk").
    #[error("disk full {action} {}: {source}; writes resume once space is freed", path.display())]
    DiskFull {
        /// What the log was doing, e.g. "appending to".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// The store is closing (or closed): no more writes.
    #[error("the store is shutting down")]
    Closed,
    /// The value is larger than one log record can frame with its key.
    #[error("value of {len} bytes is larger than the {max} bytes the log can frame with its key")]
    TooLarge { len: usize, max: usize },
    /// The key is longer than the store can frame.
    #[error("key of {0} bytes is longer than the {max} the store accepts", max = crate::entry::MAX_KEY_BYTES)]
    KeyTooLong(usize),
    /// A snapshot could not be taken (the log still holds every write).
    #[error("snapshot failed: {0}")]
    Snapshot(String),
}

impl StoreError {
    pub(crate) fn disk(action: &'static str, path: PathBuf, source: io::Error) -> Self {
        StoreError::DiskFailed {
            action,
            path,
            source: Arc::new(source),
        }
    }

    pub(crate) fn full(action: &'static str, path: PathBuf, source: io::Error) -> Self {
        StoreError::DiskFull {
            action,
            path,
            source: Arc::new(source),
        }
    }
}

/// Whether `error` says the disk has no room (`ENOSPC`, or `EDQUOT` for a
/// quota): the one kind of write failure that passes once space is freed.
pub fn is_no_room(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Why [`crate::Store::open`] could not open a data directory.
#[derive(Debug)]
pub enum OpenError {
    /// A file operation failed.
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Another process holds the directory's lock.
    Locked { dir: PathBuf },
    /// A log segment or snapshot is damaged somewhere other than a torn tail.
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A log segment (or the snapshot covering it) is missing: acknowledged
    /// writes would be lost.
    Gap { reason: String },
}

impl OpenError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        OpenError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            OpenError::Locked { dir } => write!(
                f,
                "data dir {} is in use by another process (it holds {}); stop that node or use another data dir",
                dir.display(),
                dir.join(crate::journal::LOCK_FILE).display()
            ),
            OpenError::Corrupt {
                file,
                offset,
                reason,
            } if is_snapshot(file) => write!(
                f,
                "{} is corrupt at offset {offset} ({reason}); refusing to start. Start with \
                 --repair to set it aside and start from the previous snapshot and the log since it",
                file.display()
            ),
            OpenError::Corrupt {
                file,
                offset,
                reason,
            } => write!(
                f,
                "{} is corrupt at offset {offset} ({reason}); refusing to start rather than drop \
                 what follows. Start with --repair to cut it there (the cut bytes are kept in a side file)",
                file.display()
            ),
            OpenError::Gap { reason } => write!(
                f,
                "{reason}; refusing to start rather than lose the writes it held. Put the \
                 missing file back, or start with --repair to go on without it"
            ),
        }
    }
}

fn is_snapshot(file: &std::path::Path) -> bool {
    matches!(
        file.file_name()
            .map(|name| crate::journal::classify(&name.to_string_lossy())),
        Some(crate::journal::FileKind::Snapshot(_))
    )
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
