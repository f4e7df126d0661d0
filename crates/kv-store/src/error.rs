//! Errors the storage engine reports to its caller.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The store cannot accept writes (for example the disk failed); reads
    /// keep working.
    Unavailable(String),
    /// The key is longer than the store can frame.
    KeyTooLong(usize),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::KeyTooLong(len) => write!(
                f,
                "key of {len} bytes is longer than the {} the store accepts",
                crate::entry::MAX_KEY_BYTES
            ),
        }
    }
}

impl std::error::Error for StoreError {}

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
