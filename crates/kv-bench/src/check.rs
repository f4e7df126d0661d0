//! Checking every answer, and counting failures by kind.
//!
//! The hot path is one status comparison and, for a GET with a value, one
//! `memcmp` against the exact body kv-node answers with
//! (`{"value":<the JSON text stored>}` plus a newline). Only when the bytes
//! differ is the body parsed as JSON and the values compared, so a server
//! that formats its JSON differently (a proxy, another implementation) is
//! still judged on the value, not the spelling.

use std::fmt;

use serde::Serialize;

use crate::workload::Expect;

/// Why a request counted as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A GET answered 200 with another value than the one this run set, a
    /// body that is not `{"value": ...}`, or a value for a key that must be
    /// absent (or a DELETE found a key that must be absent).
    WrongValue,
    /// A 404 for a key that must hold a value.
    Missing,
    /// A status the operation never answers with (5xx, 400, ...).
    UnexpectedStatus,
    /// No answer within --timeout.
    Timeout,
    /// Could not open a connection.
    Connect,
    /// The connection failed mid-request (reset, closed, bad HTTP).
    Connection,
}

pub const ERROR_KINDS: [ErrorKind; 6] = [
    ErrorKind::WrongValue,
    ErrorKind::Missing,
    ErrorKind::UnexpectedStatus,
    ErrorKind::Timeout,
    ErrorKind::Connect,
    ErrorKind::Connection,
];

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::WrongValue => "wrong_value",
            ErrorKind::Missing => "missing",
            ErrorKind::UnexpectedStatus => "unexpected_status",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Connection => "connection",
        }
    }
}

/// A failed request: its kind and a description for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.detail)
    }
}

/// Error counts by kind, plus the first few descriptions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorCounts {
    pub wrong_value: u64,
    pub missing: u64,
    pub unexpected_status: u64,
    pub timeout: u64,
    pub connect: u64,
    pub connection: u64,
    /// The first few failures, described.
    pub samples: Vec<String>,
}

/// How many failure descriptions a report keeps.
const SAMPLES: usize = 5;

impl ErrorCounts {
    pub fn slot(&mut self, kind: ErrorKind) -> &mut u64 {
        match kind {
            ErrorKind::WrongValue => &mut self.wrong_value,
            ErrorKind::Missing => &mut self.missing,
            ErrorKind::UnexpectedStatus => &mut self.unexpected_status,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Connection => &mut self.connection,
        }
    }

    pub fn get(&self, kind: ErrorKind) -> u64 {
        match kind {
            ErrorKind::WrongValue => self.wrong_value,
            ErrorKind::Missing => self.missing,
            ErrorKind::UnexpectedStatus => self.unexpected_status,
            ErrorKind::Timeout => self.timeout,
            ErrorKind::Connect => self.connect,
            ErrorKind::Connection => self.connection,
        }
    }

    pub fn record(&mut self, failure: Failure) {
        *self.slot(failure.kind) += 1;
        if self.samples.len() < SAMPLES {
            self.samples.push(failure.to_string());
        }
    }

    pub fn total(&self) -> u64 {
        ERROR_KINDS.iter().map(|&k| self.get(k)).sum()
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for kind in ERROR_KINDS {
            *self.slot(kind) += other.get(kind);
        }
        for sample in &other.samples {
            if self.samples.len() < SAMPLES {
                self.samples.push(sample.clone());
            }
        }
    }

    /// `wrong_value 3, timeout 1`, or `none`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = ERROR_KINDS
            .iter()
            .filter(|&&k| self.get(k) > 0)
            .map(|&k| format!("{} {}", k.name(), self.get(k)))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Checks one answer. `value` is the JSON text of the value the key must
/// hold (used by `Value` and `ValueOrMissing`); `key` is only for the
/// description of a failure.
pub fn check(
    expect: Expect,
    status: u16,
    body: &[u8],
    value: &[u8],
    key: &str,
) -> Result<(), Failure> {
    match (expect, status) {
        (Expect::Stored, 200)
        | (Expect::Deleted, 200)
        | (Expect::Missing, 404)
        | (Expect::ValueOrMissing, 404)
        | (Expect::DeletedOrMissing, 200 | 404)
        | (Expect::Anything, 200 | 404) => Ok(()),
        (Expect::Value | Expect::ValueOrMissing, 200) => {
            if holds_value(body, value) {
                Ok(())
            } else {
                Err(Failure::new(
                    ErrorKind::WrongValue,
                    format!(
                        "GET {key}: expected {{\"value\":{}}}, got {}",
                        shorten(value),
                        shorten(body)
                    ),
                ))
            }
        }
        (Expect::Value, 404) => Err(Failure::new(
            ErrorKind::Missing,
            format!("GET {key}: 404 for a key this run set"),
        )),
        (Expect::Deleted, 404) => Err(Failure::new(
            ErrorKind::Missing,
            format!("DELETE {key}: 404 for a key this run set"),
        )),
        (Expect::Missing, 200) => Err(Failure::new(
            ErrorKind::WrongValue,
            format!(
                "{key}: 200 for a key that must be absent: {}",
                shorten(body)
            ),
        )),
        (_, status) => Err(Failure::new(
            ErrorKind::UnexpectedStatus,
            format!(
                "{key}: status {status} ({expect:?} expected): {}",
                shorten(body)
            ),
        )),
    }
}

/// Whether a GET body is `{"value": <value>}`: byte-exact first, then as JSON.
#[inline]
pub fn holds_value(body: &[u8], value: &[u8]) -> bool {
    const PREFIX: &[u8] = b"{\"value\":";
    let trimmed = body.strip_suffix(b"\n").unwrap_or(body);
    if trimmed.len() == PREFIX.len() + value.len() + 1
        && trimmed
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_suffix(b"}"))
            == Some(value)
    {
        return true;
    }
    let Ok(got) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let Ok(want) = serde_json::from_slice::<serde_json::Value>(value) else {
        return false;
    };
    got.as_object()
        .is_some_and(|o| o.len() == 1 && o.get("value") == Some(&want))
}

fn shorten(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: &[u8] = b"\"abc\"";

    #[test]
    fn exact_and_reformatted_bodies_hold_the_value() {
        assert!(holds_value(b"{\"value\":\"abc\"}\n", V));
        assert!(holds_value(b"{\"value\":\"abc\"}", V));
        assert!(holds_value(b"{ \"value\" : \"abc\" }", V));
        assert!(!holds_value(b"{\"value\":\"abd\"}\n", V));
        assert!(!holds_value(b"{\"value\":\"abc\",\"x\":1}", V));
        assert!(!holds_value(b"not json", V));
    }

    #[test]
    fn each_wrong_answer_has_its_kind() {
        let kind =
            |expect, status, body: &[u8]| check(expect, status, body, V, "k").err().map(|f| f.kind);
        assert_eq!(kind(Expect::Value, 200, b"{\"value\":\"abc\"}\n"), None);
        assert_eq!(
            kind(Expect::Value, 200, b"{\"value\":\"zzz\"}\n"),
            Some(ErrorKind::WrongValue)
        );
        assert_eq!(kind(Expect::Value, 404, b""), Some(ErrorKind::Missing));
        assert_eq!(
            kind(Expect::Value, 500, b""),
            Some(ErrorKind::UnexpectedStatus)
        );
        assert_eq!(kind(Expect::Missing, 404, b""), None);
        assert_eq!(
            kind(Expect::Missing, 200, b"{}"),
            Some(ErrorKind::WrongValue)
        );
        assert_eq!(kind(Expect::Deleted, 404, b""), Some(ErrorKind::Missing));
        assert_eq!(
            kind(Expect::Stored, 400, b""),
            Some(ErrorKind::UnexpectedStatus)
        );
        assert_eq!(kind(Expect::ValueOrMissing, 404, b""), None);
        assert_eq!(
            kind(Expect::ValueOrMissing, 200, b"{\"value\":1}"),
            Some(ErrorKind::WrongValue)
        );
        assert_eq!(kind(Expect::DeletedOrMissing, 404, b""), None);
        assert_eq!(kind(Expect::Anything, 200, b"whatever"), None);
        assert_eq!(
            kind(Expect::Anything, 503, b""),
            Some(ErrorKind::UnexpectedStatus)
        );
    }

    #[test]
    fn counts_merge_and_keep_a_few_samples() {
        let mut a = ErrorCounts::default();
        for _ in 0..7 {
            a.record(Failure::new(ErrorKind::Timeout, "slow"));
        }
        let mut b = ErrorCounts::default();
        b.record(Failure::new(ErrorKind::WrongValue, "bad"));
        a.merge(&b);
        assert_eq!(a.total(), 8);
        assert_eq!(a.samples.len(), 5);
        assert_eq!(a.summary(), "wrong_value 1, timeout 7");
        assert_eq!(ErrorCounts::default().summary(), "none");
    }
}
