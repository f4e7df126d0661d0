//! The live progress line: current ops/s, errors and time left, redrawn with
//! `\r` on stderr twice a second — only when stderr is a terminal, so logs
//! and pipes stay clean. Hand-rolled (a dozen lines) rather than a progress
//! bar crate: it reads the workers' relaxed counters and prints one line.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::worker::RunShared;

/// Whether progress should be drawn.
pub fn wanted(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// Draws progress until the returned handle is stopped with [`stop`].
/// `ends` is when the run is due to end (duration runs), `total` the
/// requests it sends (request-count runs).
pub fn start(
    label: String,
    shared: Arc<RunShared>,
    start: Instant,
    ends: Option<Instant>,
    total: Option<u64>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        let (mut last_ops, mut last_at) = (0u64, start);
        // The first tick is immediate; the first line comes after 500 ms.
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = Instant::now();
            let ops: u64 = shared
                .live
                .iter()
                .map(|l| l.ops.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let errors: u64 = shared
                .live
                .iter()
                .map(|l| l.errors.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let rate = (ops - last_ops.min(ops)) as f64 / (now - last_at).as_secs_f64().max(1e-9);
            (last_ops, last_at) = (ops, now);
            let left = match (ends, total) {
                (Some(ends), _) => format!(
                    "{:.0}s left",
                    ends.saturating_duration_since(now).as_secs_f64()
                ),
                (None, Some(total)) => format!("{ops}/{total}"),
                (None, None) => String::new(),
            };
            let mut stderr = std::io::stderr().lock();
            let _ = write!(
                stderr,
                "\r\x1b[2K{label}: {ops} ops, {rate:.0} ops/s, {errors} errors, {left}"
            );
            let _ = stderr.flush();
        }
    })
}

/// Stops the progress line and clears it.
pub fn stop(handle: JoinHandle<()>) {
    handle.abort();
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "\r\x1b[2K");
    let _ = stderr.flush();
}
