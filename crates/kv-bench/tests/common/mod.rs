//! What the kv-bench integration tests share: building and running the
//! real binaries, and reading the JSON-lines files kv-bench writes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `kv_testkit::binary` runs `cargo build --bin NAME` in the current
/// directory; from this package's directory cargo only sees kv-bench's
/// binaries, so build from the workspace root (the same for every test, so
/// tests running in parallel agree on it).
pub fn binary(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::set_current_dir(root).unwrap();
    kv_testkit::binary(name)
}

/// Runs kv-bench with `args` to its end.
pub fn bench(args: &[&str]) -> Output {
    Command::new(binary("kv-bench"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("kv-bench runs")
}

/// Status, stdout and stderr, for an assertion's message.
pub fn explain(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A JSON-lines file (`--json`, `--history`), one value per line.
pub fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}
