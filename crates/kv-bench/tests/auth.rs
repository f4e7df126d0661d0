#![allow(clippy::unwrap_used, clippy::expect_used)]
//! kv-bench against a node that requires a token (issue 14): with
//! `--auth-token-file` (both clients) every answer checks out; without it
//! the run fails on 401s.

use kv_testkit::Process;

mod common;
use common::{bench, binary, explain};

#[test]
fn sends_the_token_from_its_file_with_either_client() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "bench-test-token\n").unwrap();
    let data = dir.path().join("data");
    let node = Process::spawn(
        &binary("kv-node"),
        &[
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
            "--auth-token-file",
            token.to_str().unwrap(),
        ],
    );
    let url = node.url();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--urls",
            url.as_str(),
            "--requests",
            "300",
            "--concurrency",
            "4",
            "--keys",
            "50",
        ];
        args.extend_from_slice(extra);
        bench(&args)
    };
    let token = token.to_str().unwrap();
    for client in ["lean", "hyper"] {
        let output = run(&["--client", client, "--auth-token-file", token]);
        assert!(output.status.success(), "{client}: {}", explain(&output));
    }
    let output = run(&[]);
    assert!(!output.status.success(), "{}", explain(&output));
}
