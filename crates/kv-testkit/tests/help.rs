//! What a newcomer reads first: every binary's `--help`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use kv_testkit::binary;

fn help(name: &str) -> String {
    let out = Command::new(binary(name)).arg("--help").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// Each option's block of help text, keyed by its first line.
fn options(help: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") || (trimmed.starts_with('-') && line.starts_with("  -")) {
            blocks.push((trimmed.to_owned(), String::new()));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    blocks
}

#[test]
fn every_duration_flag_says_which_units_it_takes() {
    for name in ["kv-node", "kv-proxy", "kv-bench"] {
        let text = help(name);
        let mut durations = 0;
        for (flag, block) in options(&text) {
            let value = flag.split('<').nth(1).unwrap_or("");
            if ["TIMEOUT>", "INTERVAL>", "DURATION>", "WARMUP>"]
                .iter()
                .any(|end| value.ends_with(end))
            {
                durations += 1;
                assert!(
                    block.contains("500ms, 30s"),
                    "{name} {flag} does not say its units:\n{block}"
                );
            }
        }
        assert!(durations >= 3, "{name}: found {durations} duration flags");
    }
}

#[test]
fn help_has_no_rustdoc_links_and_repair_covers_snapshots() {
    for name in ["kv-node", "kv-proxy", "kv-bench"] {
        let text = help(name);
        assert!(
            !text.contains("[`"),
            "{name} --help shows a rustdoc link:\n{text}"
        );
        assert!(
            !text.contains("crate::"),
            "{name} --help names a Rust path:\n{text}"
        );
    }
    let node = help("kv-node");
    let (_, repair) = options(&node)
        .into_iter()
        .find(|(flag, _)| flag.starts_with("--repair"))
        .unwrap();
    assert!(repair.contains("snapshot"), "{repair}");
}

#[test]
fn limits_that_would_refuse_everything_are_refused_at_start() {
    for (name, flag) in [
        ("kv-node", "--max-connections"),
        ("kv-node", "--workers"),
        ("kv-node", "--max-value-bytes"),
        ("kv-proxy", "--max-connections"),
        ("kv-proxy", "--workers"),
        ("kv-proxy", "--max-body-bytes"),
    ] {
        // Port 1 is never bound: a binary that accepted the flag would fail
        // later, on bind, with another message.
        let out = Command::new(binary(name))
            .args([flag, "0", "--port", "1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {flag} 0: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '0' for '{flag}")),
            "{name} {flag} 0: {stderr}"
        );
    }
}
