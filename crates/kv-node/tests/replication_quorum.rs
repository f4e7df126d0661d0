//! Issue 12, test 3: quorum loss (design §14.3), through the proxy.
//!
//! Three nodes, three replicas, a kv-proxy (`--leader-wait 1s`) in front;
//! nodes with `--raft-write-timeout 1s`. Writers run while two nodes are
//! killed with SIGKILL. Then, with no shard having a quorum:
//! * every PUT and GET of a key in every shard answers within the bound
//!   (leader wait + write timeout, plus slack for a loaded machine: never a
//!   hang), PUTs 503 (refused, not applied) or 504 (outcome unknown), GETs
//!   503 (a linearizable read cannot be confirmed);
//! * no write invoked after the kill is acknowledged.
//!
//! One node comes back: every shard takes writes and reads again; no value
//! whose write was refused (503) is ever read; every key's history,
//! including the writes of the loss window, is linearizable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kv_bench::history::now_ns;
use kv_bench::linearizability::{Input, Output};
use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{Cluster, ClusterOpts};
use support::{key_per_shard, Answer, History, Load};

const LEADER_WAIT: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Scheduling slack on a loaded 2-core machine: the answers come from
/// deadlines, not from work, so this only separates "answered" from "hung".
const SLACK: Duration = Duration::from_secs(3);

#[test]
fn two_of_three_down_refuses_within_the_bound_and_one_back_recovers() {
    let started = Instant::now();
    let opts = ClusterOpts {
        extra: vec!["--raft-write-timeout".into(), "1s".into()],
        proxy: Some(vec!["--leader-wait".into(), "1s".into()]),
        ..ClusterOpts::default()
    };
    let shards = opts.shards;
    let mut cluster = Cluster::start(3, 3, opts);
    let proxy = cluster.proxy_addr().unwrap();
    let history = History::new();
    let keys = key_per_shard("q", shards);

    let mut client = history.client();
    for (i, key) in keys.iter().enumerate() {
        let value = i as u32 + 1;
        wait_until(&format!("PUT {key} acknowledged"), BOUND, || {
            client.put(proxy, key, value) == Answer::Ok(Output::Stored)
        });
    }
    // Writers on the same keys, so some writes are in flight at the loss.
    let writers = {
        let history = history.clone();
        let keys = keys.clone();
        Load::start(4, move |i, stop| {
            let mut client = history.client();
            let mut value = 1_000 * (i as u32 + 1);
            let mut n = i;
            while !stop.load(Ordering::SeqCst) {
                value += 1;
                n += 1;
                client.put(proxy, &keys[n % keys.len()], value);
            }
        })
    };
    wait_until("the writers are acknowledged", BOUND, || {
        history.acknowledged() >= keys.len() + 50
    });

    eprintln!("loaded at {:?}", started.elapsed());
    let survivor = cluster.leader_of_most_shards();
    let others: Vec<u64> = cluster
        .members()
        .into_iter()
        .filter(|id| *id != survivor)
        .collect();
    for id in &others {
        cluster.kill9(*id);
    }
    let killed = now_ns();

    let bound = LEADER_WAIT + WRITE_TIMEOUT + SLACK;
    // One client per shard, all at once: each answer takes up to the
    // proxy's leader wait, so one after another would take minutes.
    let answers: Vec<(String, Answer, Duration, u16, String, Duration)> =
        std::thread::scope(|scope| {
            let threads: Vec<_> = keys
                .iter()
                .enumerate()
                .map(|(i, key)| {
                    let mut client = history.client();
                    scope.spawn(move || {
                        let asked = Instant::now();
                        let (answer, _, _) =
                            client.timed(proxy, key, Input::Put(100_000 + i as u32));
                        let put_took = asked.elapsed();
                        let asked = Instant::now();
                        let response = send(proxy, "GET", &format!("/{key}"), &[], None).unwrap();
                        let get_took = asked.elapsed();
                        (
                            key.clone(),
                            answer,
                            put_took,
                            response.status,
                            response.text(),
                            get_took,
                        )
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
    let mut slowest = Duration::ZERO;
    let (mut refused, mut unknown) = (0, 0);
    for (key, answer, put_took, status, text, get_took) in answers {
        assert!(put_took < bound, "PUT {key}: {answer:?} after {put_took:?}");
        match answer {
            Answer::Fail(503) => refused += 1,
            Answer::Unknown => unknown += 1,
            other => panic!("PUT {key} without a quorum: {other:?}"),
        }
        assert!(get_took < bound, "GET {key}: {status} after {get_took:?}");
        assert_eq!(status, 503, "GET {key}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(json["error"].is_string(), "{text}");
        slowest = slowest.max(put_took).max(get_took);
    }
    eprintln!("loss checks done at {:?}", started.elapsed());
    writers.stop();
    eprintln!("writers stopped at {:?}", started.elapsed());
    let restarted = now_ns();
    eprintln!(
        "without a quorum: {refused} PUTs refused (503), {unknown} unknown (504), slowest answer {slowest:?}"
    );
    assert!(refused + unknown > 0);

    // Nothing invoked after the kill was acknowledged while the quorum was gone.
    for (key, ops) in history.ops() {
        for op in ops {
            if let (Input::Put(v), Output::Stored) = (op.input, op.output) {
                assert!(
                    op.invoke < killed || op.invoke > restarted,
                    "{key}: PUT {v} invoked after the kill was acknowledged"
                );
            }
        }
    }

    // One back: a quorum again.
    cluster.restart(others[0]);
    eprintln!("restarted at {:?}", started.elapsed());
    cluster.wait_for_leaders(BOUND);
    eprintln!("leaders at {:?}", started.elapsed());
    for (i, key) in keys.iter().enumerate() {
        let value = 500_000 + i as u32;
        wait_until(&format!("PUT {key} after recovery"), BOUND, || {
            client.put(proxy, key, value) == Answer::Ok(Output::Stored)
        });
        let answer = client.get(proxy, key);
        assert_eq!(answer, Answer::Ok(Output::Read(Some(value))), "GET {key}");
    }
    eprintln!("recovered at {:?}", started.elapsed());
    let checked = history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(checked, keys.len());
    eprintln!("test 3 in {:?}", started.elapsed());
}
