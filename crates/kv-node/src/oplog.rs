//! The operation log (`--op-log FILE`): one line per operation in the Flask
//! store's format, for people and scripts that read it.
//!
//! ```text
//! 2024-10-07 14:07:10 - PUT - Key: key_1, Value: value_1
//! 2024-10-07 14:08:10 - GET - Key: key_1
//! 2024-10-07 14:09:10 - SAVE: Snapshot of 2 keys written
//! ```
//!
//! Times are UTC ([`jiff`] formats them). One operation is one line, always:
//! in keys and values, a backslash is written `\\`, a newline `\n`, a
//! carriage return `\r`, a tab `\t`, and any other control character (and
//! the Unicode line and paragraph separators) `\u{XXXX}`, so a key such as
//! `a\n2000-01-01 00:00:00 - DELETE - Key: victim` cannot forge a line.
//! Everything else is written as it is, as the Flask store did.
//!
//! Requests never wait for this file: they hand an entry to a
//! bounded channel with `try_send`, and a dedicated thread formats and writes
//! it, in batches (it pauses 5 ms after each, so senders rarely have to wake
//! it). When the buffer is full (a slow or full disk, a stuck pipe) the entry
//! is dropped and counted (`kv_op_log_dropped_total`), and a warning is logged
//! at each power of two dropped so the log itself cannot flood.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// One operation to log.
pub enum Entry {
    Get(Box<str>),
    /// The key and the stored body (`{"value":<json>}\n`).
    Put(Box<str>, Bytes),
    Delete(Box<str>),
    /// A persistence event, such as a snapshot.
    Save(String),
}

/// What the writer thread is handed.
enum Msg {
    /// An entry and its time (Unix seconds).
    Entry(u64, Entry),
    /// Write what came before, then stop.
    Close,
}

/// The request side of the operation log.
pub struct OpLog {
    sender: SyncSender<Msg>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How long [`OpLog::close`] waits for the last lines to be written.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl OpLog {
    /// Starts the writer thread for `path`, with room for `capacity` entries.
    /// The file is opened (for appending) by that thread, so even a path that
    /// blocks on open cannot hold up the server.
    pub fn start(path: PathBuf, capacity: usize) -> std::io::Result<OpLog> {
        let (sender, receiver) = sync_channel(capacity.max(1));
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let thread = std::thread::Builder::new()
            .name("kv-op-log".into())
            .spawn(move || write_loop(path, receiver, counter))?;
        Ok(OpLog {
            sender,
            dropped: AtomicU64::new(0),
            written,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Writes what is queued and stops the writer thread; blocking, for at
    /// most a few seconds (a stuck disk does not hold up shutdown). Later
    /// entries are dropped.
    pub fn close(&self) {
        let Some(thread) = self.thread.lock().ok().and_then(|mut thread| thread.take()) else {
            return;
        };
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        // The buffer may be full for a moment: the writer is draining it.
        let mut close = Msg::Close;
        loop {
            match self.sender.try_send(close) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    close = back;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => break,
            }
        }
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!("op log: the last lines were not written within {CLOSE_WAIT:?}");
        }
    }

    /// Queues `entry` without ever blocking; drops it if the buffer is full.
    pub fn record(&self, entry: Entry) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.sender.try_send(Msg::Entry(now, entry))
        {
            let dropped = self.dropped.fetch_add(1, Relaxed) + 1;
            if dropped.is_power_of_two() {
                log::warn!("op log cannot keep up: {dropped} entries dropped so far");
            }
        }
    }

    /// Entries dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Entries written to the file.
    pub fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }
}

fn write_loop(path: PathBuf, receiver: Receiver<Msg>, written: Arc<AtomicU64>) {
    let file = match OpenOptions::new().create(true).append(true).open(&path) {
        Ok(file) => file,
        Err(error) => {
            log::error!(
                "cannot open op log {}: {error}; operations will not be logged",
                path.display()
            );
            // Keep draining so senders see a full buffer only if we stop;
            // stop when asked, so shutdown does not wait for nothing.
            for msg in receiver {
                if matches!(msg, Msg::Close) {
                    return;
                }
            }
            return;
        }
    };
    let mut out = BufWriter::new(file);
    let mut line = String::new();
    let mut closing = false;
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        // Write everything queued, then flush once: one syscall per burst.
        while let Some(msg) = next {
            match msg {
                Msg::Entry(time, entry) => {
                    line.clear();
                    format_line(&mut line, time, &entry);
                    if let Err(error) = out.write_all(line.as_bytes()) {
                        log::error!("op log write failed: {error}");
                    } else {
                        written.fetch_add(1, Relaxed);
                    }
                }
                Msg::Close => closing = true,
            }
            next = receiver.try_recv().ok();
        }
        if let Err(error) = out.flush() {
            log::error!("op log flush failed: {error}");
        }
        if closing {
            return;
        }
        // Let entries gather before the next drain. A sender wakes this
        // thread (a futex syscall, and a context switch on a busy core) only
        // when it is blocked in `recv`; under load that was once per request
        // and cost ~20% of GET throughput. Asleep here, it is not woken:
        // one wake-up per pause at most. Idle, it blocks in `recv` again.
        std::thread::sleep(GATHER_PAUSE);
    }
}

/// How long the writer lets entries gather between drains: short enough
/// that `tail -f` looks live, long enough to batch thousands of entries.
const GATHER_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// `YYYY-MM-DD HH:MM:SS - OP - Key: k[, Value: v]\n`, one line whatever
/// the key and value hold.
pub fn format_line(line: &mut String, unix_seconds: u64, entry: &Entry) {
    use std::fmt::Write as _;
    let time = i64::try_from(unix_seconds)
        .ok()
        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let _ = write!(line, "{} - ", time.strftime("%Y-%m-%d %H:%M:%S"));
    match entry {
        Entry::Get(key) => {
            line.push_str("GET - Key: ");
            push_escaped(line, key);
        }
        Entry::Delete(key) => {
            line.push_str("DELETE - Key: ");
            push_escaped(line, key);
        }
        Entry::Put(key, body) => {
            line.push_str("PUT - Key: ");
            push_escaped(line, key);
            line.push_str(", Value: ");
            push_escaped(line, &display_value(body));
        }
        Entry::Save(what) => {
            line.push_str("SAVE: ");
            push_escaped(line, what);
        }
    }
    line.push('\n');
}

/// Appends `text` with what could end or fake a line escaped (see the
/// module docs). Plain ASCII text, the common case, is copied as is.
fn push_escaped(line: &mut String, text: &str) {
    use std::fmt::Write as _;
    if text
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        line.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => {
                let _ = write!(line, "\\u{{{:04X}}}", u32::from(c));
            }
            c => line.push(c),
        }
    }
}

/// The value inside a stored `{"value":<json>}\n` body, as Python's `str()`
/// would show it for a string (no quotes) and as JSON otherwise.
fn display_value(body: &Bytes) -> String {
    let json = body
        .strip_prefix(b"{\"value\":")
        .and_then(|rest| rest.strip_suffix(b"}\n"))
        .unwrap_or(body);
    let text = String::from_utf8_lossy(json);
    if text.starts_with('"') {
        if let Ok(plain) = serde_json::from_str::<String>(&text) {
            return plain;
        }
    }
    text.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_the_flask_format() {
        // 2024-10-07 14:07:10 UTC
        let t = 1_728_310_030;
        let mut line = String::new();
        let body = Bytes::from_static(b"{\"value\":\"value_1\"}\n");
        format_line(&mut line, t, &Entry::Put("key_1".into(), body));
        assert_eq!(
            line,
            "2024-10-07 14:07:10 - PUT - Key: key_1, Value: value_1\n"
        );
        line.clear();
        format_line(&mut line, t + 60, &Entry::Get("key_1".into()));
        assert_eq!(line, "2024-10-07 14:08:10 - GET - Key: key_1\n");
        line.clear();
        format_line(
            &mut line,
            t,
            &Entry::Put("k".into(), Bytes::from_static(b"{\"value\":[1, 2]}\n")),
        );
        assert_eq!(line, "2024-10-07 14:07:10 - PUT - Key: k, Value: [1, 2]\n");
        line.clear();
        format_line(
            &mut line,
            0,
            &Entry::Save("Snapshot of 2 keys written".into()),
        );
        assert_eq!(
            line,
            "1970-01-01 00:00:00 - SAVE: Snapshot of 2 keys written\n"
        );
    }

    #[test]
    fn leap_days() {
        let mut line = String::new();
        format_line(&mut line, 1_709_164_800, &Entry::Get("k".into()));
        assert_eq!(line, "2024-02-29 00:00:00 - GET - Key: k\n");
    }

    #[test]
    fn one_operation_is_one_line_whatever_the_key_and_value_hold() {
        let forged = "a\n2000-01-01 00:00:00 - DELETE - Key: victim";
        let mut line = String::new();
        format_line(&mut line, 0, &Entry::Get(forged.into()));
        assert_eq!(
            line,
            "1970-01-01 00:00:00 - GET - Key: a\\n2000-01-01 00:00:00 - DELETE - Key: victim\n"
        );
        line.clear();
        let value = Bytes::from_static(b"{\"value\":\"x\\r\\ny\\u0000\\u2028\\\\n\"}\n");
        format_line(&mut line, 0, &Entry::Put("k\u{85}\t".into(), value));
        assert_eq!(
            line,
            "1970-01-01 00:00:00 - PUT - Key: k\\u{0085}\\t, Value: x\\r\\ny\\u{0000}\\u{2028}\\\\n\n"
        );
        // A JSON value's own whitespace may hold newlines too.
        line.clear();
        let value = Bytes::from_static(b"{\"value\":[1,\n2]}\n");
        format_line(&mut line, 0, &Entry::Put("k".into(), value));
        assert_eq!(
            line,
            "1970-01-01 00:00:00 - PUT - Key: k, Value: [1,\\n2]\n"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }
}
