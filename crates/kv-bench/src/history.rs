//! Operation histories: `--history FILE` records every operation of a run,
//! and `kv-bench check-history FILE` checks them for linearizability.
//!
//! **Recording.** Each worker (one client: at most one request in flight)
//! owns a [`Recorder`] and appends one [`Entry`] per operation: preload,
//! warmup, measured and cleanup operations alike, since every write shapes
//! what later reads may return. Times are nanoseconds since the first
//! reading of one process-wide monotonic clock ([`now_ns`]), so all workers
//! and all runs of one invocation share it. An entry is 48 bytes and holds
//! kv-bench's own values as their sequence number (a value is 16 hex digits
//! of it plus padding), so a 10-million-operation run buffers ~480 MB;
//! other values (the seed workload's, or an unexpected answer) are kept as
//! their JSON text. Nothing is written until a run ends, when the entries
//! are appended to the file in one pass; without the flag the hot path pays
//! one branch per request.
//!
//! **Outcomes.** `ok`: the answer says what happened (PUT 200; DELETE 200 =
//! deleted, 404 = absent; GET 200 with the value, 404). `fail`: the
//! operation definitely did not take effect: a 4xx other than 404 (the
//! server refused it before applying it; 421 "not leader" included), a 503
//! (no leader: refused before proposing), or no connection could be opened
//! (nothing was sent). `unknown`: anything that leaves the effect open: a
//! timeout, a 504, another 5xx, a connection broken after the request was
//! written, a GET answer that is not `{"value": ...}`.
//!
//! **The file**, one JSON object per line:
//! ```text
//! {"client":3,"op":"put","key":"k1","value":"v","invoke":1200,"return":1800,"outcome":"ok","status":200}
//! {"client":4,"op":"get","key":"k1","invoke":1500,"return":2100,"outcome":"ok","status":200,"found":true,"value":"v"}
//! {"client":4,"op":"delete","key":"k1","invoke":2200,"return":5002200,"outcome":"unknown","error":"timeout"}
//! ```
//! `value` is the JSON value itself (a PUT's, or what a GET found); `found`
//! is given for `ok` GETs and DELETEs; `return` of an `unknown` operation is
//! when the client gave up, which the checker ignores (it may take effect
//! any time after `invoke`, or never). The file is truncated when kv-bench
//! starts: times of two invocations are not on one clock.
//!
//! **Checking** groups operations by key (linearizability is compositional),
//! leaves `fail` ones out, and runs [`crate::linearizability`] on each key.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use crate::check::{ErrorKind, Failure};
use crate::linearizability::{self, Checked, Input, Op, Output, Verdict};
use crate::workload::OpKind;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on the clock every recorder of this process shares.
#[inline]
pub fn now_ns() -> u64 {
    let origin = *ORIGIN.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(origin).as_nanos() as u64
}

/// What happened to an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Fail,
    Unknown,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        }
    }
}

/// A value: a PUT's, or what a GET found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    None,
    /// kv-bench's value with this sequence number (see `worker.rs`).
    Seq(u64),
    /// Any other value: its compact JSON text is the recorder's
    /// `values[i]` (kept aside so an entry stays 48 bytes).
    Json(u32),
}

/// One recorded operation.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Index into the recorder's key names.
    pub key: u32,
    pub kind: OpKind,
    pub outcome: Outcome,
    /// GET or DELETE `ok`: whether the key held a value.
    pub found: bool,
    /// Why there was no answer (`unknown` or `fail` without a status).
    pub error: Option<ErrorKind>,
    /// The HTTP status; 0 when there was none.
    pub status: u16,
    pub invoke: u64,
    pub ret: u64,
    pub value: Value,
}

/// One client's operations, buffered until the end of the run.
pub struct Recorder {
    client: u64,
    value_size: usize,
    keys: Vec<String>,
    values: Vec<Box<str>>,
    entries: Vec<Entry>,
}

impl Recorder {
    /// A recorder for `client`, whose keys (by index) are `keys`, writing
    /// kv-bench values of `value_size` characters.
    pub fn new(client: u64, value_size: usize, keys: Vec<String>) -> Self {
        Recorder {
            client,
            value_size,
            keys,
            values: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// A value given as JSON text (not one of kv-bench's own).
    pub fn add_value(&mut self, json: String) -> Value {
        self.values.push(json.into_boxed_str());
        Value::Json((self.values.len() - 1) as u32)
    }

    /// Adds a key name; returns its index.
    pub fn add_key(&mut self, name: String) -> u32 {
        self.keys.push(name);
        (self.keys.len() - 1) as u32
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Records an operation on key `key` invoked at `invoke` (from
    /// [`now_ns`]) and answered now: `put` is the value a PUT sent.
    pub fn record(
        &mut self,
        key: u32,
        kind: OpKind,
        put: Value,
        invoke: u64,
        answer: Result<(u16, &[u8]), &Failure>,
    ) {
        let ret = now_ns();
        let mut entry = Entry {
            key,
            kind,
            outcome: Outcome::Unknown,
            found: false,
            error: None,
            status: 0,
            invoke,
            ret,
            value: if kind == OpKind::Set {
                put
            } else {
                Value::None
            },
        };
        match answer {
            Err(failure) => {
                entry.error = Some(failure.kind);
                // Only a connection that could not be opened sent nothing.
                if failure.kind == ErrorKind::Connect {
                    entry.outcome = Outcome::Fail;
                }
            }
            Ok((status, body)) => {
                entry.status = status;
                entry.outcome = match (kind, status) {
                    (OpKind::Set, 200) => Outcome::Ok,
                    (OpKind::Get | OpKind::Delete, 404) => Outcome::Ok,
                    (OpKind::Delete, 200) => {
                        entry.found = true;
                        Outcome::Ok
                    }
                    (OpKind::Get, 200) => match self.read_value(body) {
                        Some(value) => {
                            entry.found = true;
                            entry.value = value;
                            Outcome::Ok
                        }
                        None => Outcome::Unknown,
                    },
                    (_, 503) => Outcome::Fail,
                    (_, 400..=499) if status != 404 => Outcome::Fail,
                    _ => Outcome::Unknown,
                };
            }
        }
        self.entries.push(entry);
    }

    /// The value in a GET body `{"value": ...}`: kv-bench's own as its
    /// sequence number, anything else as compact JSON; `None` if the body
    /// is not such an object.
    fn read_value(&mut self, body: &[u8]) -> Option<Value> {
        const PREFIX: &[u8] = b"{\"value\":\"";
        let trimmed = body.strip_suffix(b"\n").unwrap_or(body);
        let text = trimmed
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_suffix(b"\"}"));
        if let Some((digits, padding)) = text
            .filter(|text| text.len() == self.value_size && self.value_size >= 16)
            .and_then(|text| text.split_at_checked(16))
        {
            if padding.iter().all(|&b| b == b'x') {
                if let Some(seq) = std::str::from_utf8(digits)
                    .ok()
                    .filter(|d| {
                        d.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    })
                    .and_then(|d| u64::from_str_radix(d, 16).ok())
                {
                    return Some(Value::Seq(seq));
                }
            }
        }
        let parsed: serde_json::Value = serde_json::from_slice(body).ok()?;
        let object = parsed.as_object().filter(|o| o.len() == 1)?;
        let value = object.get("value")?;
        Some(self.add_value(value.to_string()))
    }

    /// The JSON text of a value.
    fn value_text(&self, value: &Value) -> Option<String> {
        match value {
            Value::None => None,
            Value::Seq(seq) => {
                let mut text = String::with_capacity(self.value_size + 2);
                text.push('"');
                text.push_str(&format!("{seq:016x}"));
                text.extend(std::iter::repeat_n('x', self.value_size.saturating_sub(16)));
                text.push('"');
                Some(text)
            }
            Value::Json(i) => self.values.get(*i as usize).map(|text| text.to_string()),
        }
    }

    /// Writes every entry as a JSON line.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        for entry in &self.entries {
            let key = self.keys.get(entry.key as usize).map_or("", String::as_str);
            let op = match entry.kind {
                OpKind::Set => "put",
                OpKind::Get => "get",
                OpKind::Delete => "delete",
            };
            write!(
                out,
                "{{\"client\":{},\"op\":\"{op}\",\"key\":{}",
                self.client,
                serde_json::Value::from(key)
            )?;
            if entry.kind == OpKind::Set {
                if let Some(value) = self.value_text(&entry.value) {
                    write!(out, ",\"value\":{value}")?;
                }
            }
            write!(
                out,
                ",\"invoke\":{},\"return\":{},\"outcome\":\"{}\"",
                entry.invoke,
                entry.ret,
                entry.outcome.name()
            )?;
            if entry.status != 0 {
                write!(out, ",\"status\":{}", entry.status)?;
            }
            if let Some(error) = entry.error {
                write!(out, ",\"error\":\"{}\"", error.name())?;
            }
            if entry.outcome == Outcome::Ok && entry.kind != OpKind::Set {
                write!(out, ",\"found\":{}", entry.found)?;
                if entry.kind == OpKind::Get {
                    if let Some(value) = self.value_text(&entry.value) {
                        write!(out, ",\"value\":{value}")?;
                    }
                }
            }
            out.write_all(b"}\n")?;
        }
        Ok(())
    }
}

/// Creates (or empties) the history file.
pub fn create(path: &Path) -> io::Result<()> {
    File::create(path).map(drop)
}

/// Appends the recorders' entries to the file.
pub fn append(path: &Path, recorders: &[Recorder]) -> io::Result<()> {
    let file = OpenOptions::new().append(true).create(true).open(path)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    for recorder in recorders {
        recorder.write_to(&mut out)?;
    }
    out.flush()
}

/// Why a history could not be read.
#[derive(Debug)]
pub enum HistoryError {
    Io { path: PathBuf, source: io::Error },
    Parse { line: usize, why: String },
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::Io { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            HistoryError::Parse { line, why } => write!(f, "line {line}: {why}"),
        }
    }
}

impl std::error::Error for HistoryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HistoryError::Io { source, .. } => Some(source),
            HistoryError::Parse { .. } => None,
        }
    }
}

/// One key's operations, ready for the checker, with the value texts the
/// ids stand for.
#[derive(Debug, Default)]
pub struct KeyHistory {
    pub ops: Vec<Op>,
    pub values: Vec<String>,
    value_ids: BTreeMap<String, u32>,
}

impl KeyHistory {
    fn value_id(&mut self, text: String) -> u32 {
        if let Some(&id) = self.value_ids.get(&text) {
            return id;
        }
        let id = self.values.len() as u32;
        self.values.push(text.clone());
        self.value_ids.insert(text, id);
        id
    }
}

/// Reads a history, by key; `fail` operations are left out.
pub fn read(reader: impl BufRead) -> Result<BTreeMap<String, KeyHistory>, HistoryError> {
    let mut keys: BTreeMap<String, KeyHistory> = BTreeMap::new();
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let parse = |why: String| HistoryError::Parse { line: line_no, why };
        let line = line.map_err(|e| parse(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).map_err(|e| parse(format!("not a JSON object: {e}")))?;
        let field = |name: &str| {
            object
                .get(name)
                .ok_or_else(|| parse(format!("no \"{name}\"")))
        };
        let number = |name: &str| {
            field(name)?
                .as_u64()
                .ok_or_else(|| parse(format!("\"{name}\" is not a whole number")))
        };
        let text = |name: &str| {
            field(name)?
                .as_str()
                .ok_or_else(|| parse(format!("\"{name}\" is not a string")))
        };
        let outcome = match text("outcome")? {
            "ok" => Outcome::Ok,
            "fail" => continue,
            "unknown" => Outcome::Unknown,
            other => {
                return Err(parse(format!(
                    "unknown outcome \"{other}\" (ok, fail, unknown)"
                )))
            }
        };
        let client = number("client")?;
        let key = text("key")?.to_owned();
        let invoke = number("invoke")?;
        let ret = match outcome {
            Outcome::Ok => {
                let ret = number("return")?;
                if ret < invoke {
                    return Err(parse(format!(
                        "returns at {ret}, before its invoke at {invoke}"
                    )));
                }
                Some(ret)
            }
            _ => None,
        };
        let found = || {
            field("found")?
                .as_bool()
                .ok_or_else(|| parse("\"found\" is not true or false".into()))
        };
        let history = keys.entry(key).or_default();
        let (input, output) = match text("op")? {
            "put" => {
                let value = history.value_id(field("value")?.to_string());
                let output = if outcome == Outcome::Ok {
                    Output::Stored
                } else {
                    Output::Unknown
                };
                (Input::Put(value), output)
            }
            "get" if outcome == Outcome::Ok => {
                let read = if found()? {
                    Some(history.value_id(field("value")?.to_string()))
                } else {
                    None
                };
                (Input::Get, Output::Read(read))
            }
            "get" => (Input::Get, Output::Unknown),
            "delete" if outcome == Outcome::Ok => (Input::Delete, Output::Deleted(found()?)),
            "delete" => (Input::Delete, Output::Unknown),
            other => return Err(parse(format!("unknown op \"{other}\" (put, get, delete)"))),
        };
        history.ops.push(Op {
            client,
            input,
            output,
            invoke,
            ret,
        });
    }
    Ok(keys)
}

/// What checking one key found.
#[derive(Debug)]
pub struct KeyReport {
    pub key: String,
    pub ops: usize,
    pub checked: Checked,
    /// For a violation: the few operations that contradict each other.
    pub explanation: Option<String>,
}

/// Most operations a violation is shrunk from; above it, the shortest
/// violating prefix is reported as is.
const MINIMISE_MAX_OPS: usize = 500;

/// Checks one key's history.
pub fn check_key(key: String, history: &KeyHistory, max_steps: u64) -> KeyReport {
    let checked = linearizability::check(&history.ops, max_steps);
    let explanation = (checked.verdict == Verdict::Violation).then(|| {
        let involved = linearizability::minimise(&history.ops, max_steps, MINIMISE_MAX_OPS);
        linearizability::describe_violation(&history.ops, &involved, &history.values)
    });
    KeyReport {
        key,
        ops: history.ops.len(),
        checked,
        explanation,
    }
}

/// `kv-bench check-history`'s totals.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub keys: usize,
    pub violations: usize,
    pub too_large: usize,
}

impl Summary {
    /// Exit status: 0 when every key is linearizable.
    pub fn passed(&self) -> bool {
        self.violations == 0 && self.too_large == 0
    }
}

/// Checks every key of the history at `path`, printing one line per key
/// (only the keys that did not pass with `quiet`) and the summary.
pub fn check_file(
    path: &Path,
    max_steps: u64,
    quiet: bool,
    out: &mut impl Write,
) -> Result<Summary, HistoryError> {
    let io_error = |source| HistoryError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let keys = read(BufReader::new(file))?;
    let mut summary = Summary::default();
    for (key, history) in keys {
        let report = check_key(key, &history, max_steps);
        summary.keys += 1;
        let line = match report.checked.verdict {
            Verdict::Linearizable if quiet => None,
            Verdict::Linearizable => Some(format!("{}: OK ({} ops)", report.key, report.ops)),
            Verdict::Violation => {
                summary.violations += 1;
                Some(format!(
                    "{}: violation ({} ops): {}",
                    report.key,
                    report.ops,
                    report.explanation.unwrap_or_default()
                ))
            }
            Verdict::TooLarge => {
                summary.too_large += 1;
                // Two bounds stop the search: the steps, and the search
                // cache's memory (a bit per operation per configuration, so
                // a key of ~30,000 racing operations can pass it long before
                // the steps); name the one that did, since raising
                // --max-steps does not help with the other.
                Some(if report.checked.steps > max_steps {
                    format!(
                        "{}: too large to check ({} ops; more than {} search steps, see --max-steps)",
                        report.key, report.ops, max_steps
                    )
                } else {
                    format!(
                        "{}: too large to check ({} ops; the search cache passed {} MiB after {} steps: \
                         check a shorter history)",
                        report.key,
                        report.ops,
                        crate::linearizability::MAX_CACHE_BYTES >> 20,
                        report.checked.steps
                    )
                })
            }
        };
        if let Some(line) = line {
            writeln!(out, "{line}").map_err(io_error)?;
        }
    }
    let mut total = format!(
        "{} keys checked, {} violations",
        summary.keys, summary.violations
    );
    if summary.too_large > 0 {
        total.push_str(&format!(", {} too large to check", summary.too_large));
    }
    writeln!(out, "{total}").map_err(io_error)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> Recorder {
        Recorder::new(7, 20, vec!["k\"1".into(), "k2".into()])
    }

    fn lines(recorder: &Recorder) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        recorder.write_to(&mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn an_entry_is_48_bytes() {
        assert!(
            std::mem::size_of::<Entry>() <= 48,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn outcomes_are_classified() {
        let mut r = recorder();
        let timeout = Failure::new(ErrorKind::Timeout, "slow");
        let refused = Failure::new(ErrorKind::Connect, "refused");
        let broken = Failure::new(ErrorKind::Connection, "reset");
        let body = b"{\"value\":\"000000000000002axxxx\"}\n";
        r.record(0, OpKind::Set, Value::Seq(42), 1, Ok((200, b"")));
        r.record(0, OpKind::Get, Value::None, 2, Ok((200, body)));
        r.record(
            0,
            OpKind::Get,
            Value::None,
            3,
            Ok((200, b"{\"value\": [1, {\"b\":2}]}")),
        );
        r.record(0, OpKind::Get, Value::None, 4, Ok((404, b"")));
        r.record(0, OpKind::Delete, Value::None, 5, Ok((200, b"")));
        r.record(0, OpKind::Delete, Value::None, 6, Ok((404, b"")));
        r.record(1, OpKind::Set, Value::Seq(43), 7, Ok((503, b"")));
        r.record(1, OpKind::Set, Value::Seq(44), 8, Ok((421, b"")));
        r.record(1, OpKind::Set, Value::Seq(45), 9, Ok((504, b"")));
        r.record(1, OpKind::Set, Value::Seq(46), 10, Err(&timeout));
        r.record(1, OpKind::Delete, Value::None, 11, Err(&refused));
        r.record(1, OpKind::Delete, Value::None, 12, Err(&broken));
        r.record(1, OpKind::Get, Value::None, 13, Ok((200, b"garbage")));
        let outcomes: Vec<&str> = r.entries().iter().map(|e| e.outcome.name()).collect();
        assert_eq!(
            outcomes,
            [
                "ok", "ok", "ok", "ok", "ok", "ok", "fail", "fail", "unknown", "unknown", "fail",
                "unknown", "unknown"
            ]
        );
        let lines = lines(&r);
        assert_eq!(lines[0]["key"], "k\"1");
        assert_eq!(lines[0]["op"], "put");
        assert_eq!(lines[0]["value"], "000000000000002axxxx");
        assert_eq!(lines[0]["client"], 7);
        assert_eq!(lines[1]["found"], true);
        assert_eq!(lines[1]["value"], "000000000000002axxxx");
        assert_eq!(lines[2]["value"], serde_json::json!([1, {"b": 2}]));
        assert_eq!(lines[3]["found"], false);
        assert!(lines[3].get("value").is_none());
        assert_eq!(lines[4]["found"], true);
        assert_eq!(lines[5]["found"], false);
        assert_eq!(lines[9]["error"], "timeout");
        assert_eq!(lines[9]["outcome"], "unknown");
        assert!(lines[9].get("found").is_none());
        assert!(lines
            .iter()
            .all(|l| l["invoke"].as_u64() <= l["return"].as_u64()));
    }

    #[test]
    fn a_written_history_reads_back_and_checks() {
        let mut r = recorder();
        r.record(0, OpKind::Set, Value::Seq(1), 1, Ok((200, b"")));
        let invoke = now_ns();
        r.record(
            0,
            OpKind::Get,
            Value::None,
            invoke,
            Ok((200, b"{\"value\":\"0000000000000001xxxx\"}")),
        );
        r.record(1, OpKind::Set, Value::Seq(2), now_ns(), Ok((503, b"")));
        r.record(1, OpKind::Get, Value::None, now_ns(), Ok((404, b"")));
        let mut out = Vec::new();
        r.write_to(&mut out).unwrap();
        let keys = read(&out[..]).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys["k\"1"].ops.len(), 2);
        assert_eq!(keys["k2"].ops.len(), 1, "the failed put is left out");
        for (key, history) in keys {
            assert_eq!(
                check_key(key, &history, 1000).checked.verdict,
                Verdict::Linearizable
            );
        }
    }

    #[test]
    fn check_file_reports_each_key_and_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"client\":1,\"op\":\"put\",\"key\":\"a\",\"value\":\"v1\",\"invoke\":0,\"return\":10,\"outcome\":\"ok\"}\n",
                "{\"client\":1,\"op\":\"put\",\"key\":\"a\",\"value\":\"v2\",\"invoke\":20,\"return\":30,\"outcome\":\"ok\"}\n",
                "{\"client\":2,\"op\":\"get\",\"key\":\"a\",\"invoke\":40,\"return\":50,\"outcome\":\"ok\",\"found\":true,\"value\":\"v1\"}\n",
                "{\"client\":1,\"op\":\"put\",\"key\":\"b\",\"value\":{\"x\":[1]},\"invoke\":0,\"return\":10,\"outcome\":\"ok\"}\n",
                "\n",
                "{\"client\":2,\"op\":\"get\",\"key\":\"b\",\"invoke\":40,\"return\":50,\"outcome\":\"ok\",\"found\":true,\"value\":{\"x\":[1]}}\n",
                "{\"client\":2,\"op\":\"delete\",\"key\":\"c\",\"invoke\":40,\"return\":50,\"outcome\":\"fail\",\"status\":503}\n",
            ),
        )
        .unwrap();
        let mut out = Vec::new();
        let summary = check_file(&path, 10_000, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            summary,
            Summary {
                keys: 2,
                violations: 1,
                too_large: 0
            }
        );
        assert!(!summary.passed());
        assert!(
            text.contains("a: violation (3 ops): get by client 2 at t=0.000000040s..0.000000050s returned \"v1\", but"),
            "{text}"
        );
        assert!(
            text.contains(
                "put \"v2\" by client 1 was acknowledged at t=0.000000030s before it began"
            ),
            "{text}"
        );
        assert!(text.contains("b: OK (2 ops)"), "{text}");
        assert!(text.ends_with("2 keys checked, 1 violations\n"), "{text}");
        // Quiet: only what did not pass.
        let mut out = Vec::new();
        check_file(&path, 10_000, true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("b: OK"), "{text}");
        // A tiny bound: too large, not a pass.
        let mut out = Vec::new();
        let summary = check_file(&path, 1, false, &mut out).unwrap();
        assert_eq!(summary.too_large, 2);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("2 too large to check"));
    }

    #[test]
    fn bad_lines_are_named() {
        let error = |text: &str| read(text.as_bytes()).unwrap_err().to_string();
        assert_eq!(error("{}\nnot json\n").split(':').next(), Some("line 1"));
        assert!(error("nope").starts_with("line 1: not a JSON object"));
        assert!(error("{\"outcome\":\"ok\",\"client\":1,\"key\":\"k\",\"invoke\":5,\"return\":4,\"op\":\"get\",\"found\":false}")
            .contains("before its invoke"));
        assert!(error("{\"outcome\":\"maybe\"}").contains("unknown outcome"));
        assert!(error("{\"outcome\":\"ok\",\"client\":1,\"key\":\"k\",\"invoke\":1,\"return\":4,\"op\":\"cas\"}")
            .contains("unknown op"));
        assert!(error("{\"outcome\":\"ok\",\"client\":1,\"key\":\"k\",\"invoke\":1,\"return\":4,\"op\":\"get\"}")
            .contains("no \"found\""));
    }
}
