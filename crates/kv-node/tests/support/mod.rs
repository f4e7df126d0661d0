//! Shared by the `replication_*` tests: clients that record every
//! operation they make as a [`kv_bench::linearizability::Op`], and the
//! checks over those histories.
//!
//! A client issues one request at a time (fresh connection, blocking) and
//! classifies the answer as the history file does (`kv_bench::history`):
//! * answered (`ok`): PUT 200, GET 200 with a value or 404, DELETE 200/404;
//! * definitely not applied (`fail`, left out of the history): 421, 503 and
//!   other 4xx, given before anything was proposed (design §6.1);
//! * unknown: 504, other 5xx, a broken or timed-out connection. A write
//!   with an unknown outcome may take effect any time after its invoke, or
//!   never; the client then continues under a fresh client id, since one
//!   client has at most one operation in flight and this one never ends.
//!
//! Values are integers (`{"value": N}`), so an id in the checker is the
//! value itself.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kv_bench::history::now_ns;
use kv_bench::linearizability::{self, Input, Op, Output, Verdict};
use kv_testkit::cluster::send;

/// Steps the checker may take per key before calling it undecided (which
/// fails the test: undecided is not a pass).
const MAX_STEPS: u64 = 50_000_000;

/// Every recorded operation, per key.
#[derive(Default)]
pub struct History {
    ops: Mutex<BTreeMap<String, Vec<Op>>>,
    next_client: AtomicU64,
}

/// What a request's answer means for the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Took effect with this output.
    Ok(Output),
    /// Definitely not applied (or a read that says nothing).
    Fail(u16),
    /// May or may not have taken effect.
    Unknown,
}

impl History {
    pub fn new() -> Arc<History> {
        Arc::new(History::default())
    }

    pub fn client(self: &Arc<Self>) -> Client {
        Client {
            id: self.next_client.fetch_add(1, Ordering::SeqCst),
            history: self.clone(),
            headers: Vec::new(),
            last_status: 0,
        }
    }

    fn record(&self, key: &str, op: Op) {
        self.ops
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default()
            .push(op);
    }

    /// A copy of every key's operations.
    pub fn ops(&self) -> BTreeMap<String, Vec<Op>> {
        self.ops.lock().unwrap().clone()
    }

    /// Operations recorded so far that took effect (`ok`).
    pub fn acknowledged(&self) -> usize {
        self.ops
            .lock()
            .unwrap()
            .values()
            .flatten()
            .filter(|op| op.output != Output::Unknown)
            .count()
    }

    /// Checks every key's history for linearizability; the error names
    /// each key that is not (or could not be decided) and why.
    pub fn check_linearizable(&self) -> Result<usize, String> {
        let mut problems = String::new();
        let ops = self.ops();
        for (key, ops) in &ops {
            let checked = linearizability::check(ops, MAX_STEPS);
            match checked.verdict {
                Verdict::Linearizable => {}
                Verdict::Violation => {
                    let involved = linearizability::minimise(ops, MAX_STEPS, 200);
                    let values: Vec<String> = Vec::new();
                    problems.push_str(&format!(
                        "{key}: NOT linearizable ({} ops): {}\n",
                        ops.len(),
                        linearizability::describe_violation(ops, &involved, &values)
                    ));
                }
                Verdict::TooLarge => problems.push_str(&format!(
                    "{key}: undecided after {} steps ({} ops)\n",
                    checked.steps,
                    ops.len()
                )),
            }
        }
        if problems.is_empty() {
            Ok(ops.len())
        } else {
            Err(problems)
        }
    }
}

/// One client: one request at a time, each recorded.
pub struct Client {
    id: u64,
    history: Arc<History>,
    headers: Vec<(String, String)>,
    /// The status of the last answer (0: none came), to tell a 504 from a
    /// broken connection among [`Answer::Unknown`]s.
    pub last_status: u16,
}

impl Client {
    fn run(&mut self, addr: SocketAddr, key: &str, input: Input) -> (Answer, u64, u64) {
        let (method, body) = match input {
            Input::Put(v) => ("PUT", Some(format!("{{\"value\": {v}}}"))),
            Input::Get => ("GET", None),
            Input::Delete => ("DELETE", None),
        };
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let invoke = now_ns();
        let response = send(addr, method, &format!("/{key}"), &headers, body.as_deref());
        let ret = now_ns();
        self.last_status = response.as_ref().map_or(0, |r| r.status);
        let answer = match response {
            Err(_) => match input {
                // A read that got no answer changed nothing.
                Input::Get => Answer::Fail(0),
                _ => Answer::Unknown,
            },
            Ok(response) => classify(input, response.status, &response.body),
        };
        match answer {
            Answer::Ok(output) => self.history.record(
                key,
                Op {
                    client: self.id,
                    input,
                    output,
                    invoke,
                    ret: Some(ret),
                },
            ),
            Answer::Unknown => {
                self.history.record(
                    key,
                    Op {
                        client: self.id,
                        input,
                        output: Output::Unknown,
                        invoke,
                        ret: None,
                    },
                );
                // This operation never ends for the checker: go on as a
                // new client.
                self.id = self.history.next_client.fetch_add(1, Ordering::SeqCst);
            }
            Answer::Fail(_) => {}
        }
        (answer, invoke, ret)
    }

    pub fn put(&mut self, addr: SocketAddr, key: &str, value: u32) -> Answer {
        self.run(addr, key, Input::Put(value)).0
    }

    pub fn get(&mut self, addr: SocketAddr, key: &str) -> Answer {
        self.run(addr, key, Input::Get).0
    }

    pub fn delete(&mut self, addr: SocketAddr, key: &str) -> Answer {
        self.run(addr, key, Input::Delete).0
    }

    /// Like [`Client::run`], returning invoke and return times too.
    pub fn timed(&mut self, addr: SocketAddr, key: &str, input: Input) -> (Answer, u64, u64) {
        self.run(addr, key, input)
    }
}

/// The status map of design §6.1, seen from a client.
pub fn classify(input: Input, status: u16, body: &[u8]) -> Answer {
    match (input, status) {
        (Input::Put(_), 200) => Answer::Ok(Output::Stored),
        (Input::Get, 200) => match parse_value(body) {
            Some(v) => Answer::Ok(Output::Read(Some(v))),
            None => Answer::Fail(200),
        },
        (Input::Get, 404) => Answer::Ok(Output::Read(None)),
        (Input::Delete, 200) => Answer::Ok(Output::Deleted(true)),
        (Input::Delete, 404) => Answer::Ok(Output::Deleted(false)),
        // A read is refused or lost: it changed nothing either way.
        (Input::Get, _) => Answer::Fail(status),
        (_, 504) => Answer::Unknown,
        (_, 421 | 503) => Answer::Fail(status),
        (_, s) if (400..500).contains(&s) => Answer::Fail(status),
        _ => Answer::Unknown,
    }
}

/// `{"value":N}\n` → N.
pub fn parse_value(body: &[u8]) -> Option<u32> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    u32::try_from(json.get("value")?.as_u64()?).ok()
}

/// Threads running a loop body until stopped; each gets its index.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(
        threads: usize,
        body: impl Fn(usize, &AtomicBool) + Send + Sync + 'static,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let body = Arc::new(body);
        let threads = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                let body = body.clone();
                std::thread::spawn(move || body(i, &stop))
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops every thread and waits for each (a request in flight ends
    /// within the client's I/O timeout).
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().expect("a load thread panicked");
        }
    }
}

/// For each shard `0..shards`, a key named `{prefix}-N` that falls in it.
pub fn key_per_shard(prefix: &str, shards: u32) -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; shards as usize];
    let mut n = 0u32;
    while keys.iter().any(Option::is_none) {
        let key = format!("{prefix}-{n}");
        let shard = kv_cluster::shard_of(key.as_bytes(), shards) as usize;
        if keys[shard].is_none() {
            keys[shard] = Some(key);
        }
        n += 1;
    }
    keys.into_iter().flatten().collect()
}
pub mod membership;
