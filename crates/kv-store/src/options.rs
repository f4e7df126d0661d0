//! How a durable store behaves: fsync policy, snapshot triggers, repair.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When the write-ahead log is flushed to stable storage (as Redis's
/// `appendfsync`). Every policy writes a record to the file before the write
/// is acknowledged, so a crash of the process alone never loses an
/// acknowledged write; they differ on a crash of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Acknowledge only after an `fdatasync` covers the write. Concurrent
    /// writers share one `fdatasync` (group commit).
    Always,
    /// `fdatasync` about once a second: a machine crash loses at most ~1 s.
    #[default]
    EverySec,
    /// Leave flushing to the kernel.
    Never,
}

impl FsyncPolicy {
    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::EverySec => "everysec",
            FsyncPolicy::Never => "never",
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "everysec" => Ok(FsyncPolicy::EverySec),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!(
                "unknown fsync policy {other:?}: expected always, everysec or never"
            )),
        }
    }
}

/// Options of [`crate::Store::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub fsync: FsyncPolicy,
    /// Take a snapshot this often (if anything was written since the last).
    pub snapshot_interval: Duration,
    /// Take a snapshot when the active log segment grows past this.
    pub wal_max_bytes: u64,
    /// Cut damaged logs at the damage (keeping the cut bytes in a side file)
    /// instead of refusing to open.
    pub repair: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::default(),
            snapshot_interval: Duration::from_secs(60),
            wal_max_bytes: 64 << 20,
            repair: false,
        }
    }
}
