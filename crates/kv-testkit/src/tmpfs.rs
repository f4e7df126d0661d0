//! A small tmpfs as a data dir, for full-disk tests: mounted with
//! `mount -t tmpfs -o size=...`, grown in place with `remount`, unmounted
//! on drop. Mounting needs root (CI runs as root); [`Tmpfs::mount_at`]
//! returns `None` elsewhere and the test says it skipped ([`skipped`]).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
    /// The temporary directory it is mounted on, when it made one.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// A tmpfs of `size` (e.g. `"3m"`) on a new temporary directory;
    /// `None` when mounting is refused (not root, no `CAP_SYS_ADMIN`).
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut tmpfs = Tmpfs::mount_at(dir.path(), size)?;
        tmpfs._dir = Some(dir);
        Some(tmpfs)
    }

    /// A tmpfs of `size` on `path` (created if missing); `None` when
    /// mounting is refused.
    pub fn mount_at(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("create the mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .ok()?;
        mounted.status.success().then(|| Tmpfs {
            path: path.to_path_buf(),
            _dir: None,
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes its size in place (files stay): more room for a full disk.
    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot remount the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Says on the process's stderr that `test` was skipped because mounting
/// a tmpfs needs root: straight to the file descriptor, since libtest
/// captures `eprintln!` of a passing test, which would hide the skip.
pub fn skipped(test: &str) {
    let line = format!("SKIPPED: {test} needs root to mount a tmpfs (not root)\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}
