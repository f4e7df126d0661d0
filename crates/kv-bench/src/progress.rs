//! The live progress line: requests sent, current ops/s, errors and time
//! left, as one `indicatif` bar on stderr refreshed twice a second — only
//! when stderr is a terminal ([`wanted`]), so logs, pipes and tests get no
//! progress output at all, as before. The bar comes from indicatif (the
//! team's rule: progress bars from a well-kept crate, not drawn by hand);
//! this module only reads the workers' relaxed counters into it.
//!
//! A request-count run fills the bar by requests (`1200/5000`), a duration
//! run by time (`12s left`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::worker::RunShared;

/// How often the counters are read into the bar.
const EVERY: Duration = Duration::from_millis(500);

/// Whether progress should be drawn.
pub fn wanted(quiet: bool) -> bool {
    use std::io::IsTerminal;
    !quiet && std::io::stderr().is_terminal()
}

/// A bar being drawn; end it with [`stop`].
pub struct Progress {
    bar: ProgressBar,
    task: JoinHandle<()>,
}

/// Draws progress until [`stop`]. `ends` is when the run is due to end
/// (duration runs), `total` the requests it sends (request-count runs).
pub fn start(
    label: String,
    shared: Arc<RunShared>,
    start: Instant,
    ends: Option<Instant>,
    total: Option<u64>,
) -> Progress {
    // The bar's length and position: requests, or milliseconds of the run.
    let (length, template) = match (ends, total) {
        (Some(ends), _) => (
            ends.saturating_duration_since(start).as_millis() as u64,
            "{prefix}: [{bar:20}] {wide_msg}",
        ),
        (None, Some(total)) => (total, "{prefix}: [{bar:20}] {pos}/{len} {wide_msg}"),
        (None, None) => (0, "{prefix}: {wide_msg}"),
    };
    let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("#-"));
    }
    bar.set_prefix(label);
    let drawn = bar.clone();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(EVERY);
        let (mut last_ops, mut last_at) = (0u64, start);
        // The first tick is immediate; the first line comes after 500 ms.
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = Instant::now();
            let ops: u64 = shared
                .live
                .iter()
                .map(|l| l.ops.load(Ordering::Relaxed))
                .sum();
            let errors: u64 = shared
                .live
                .iter()
                .map(|l| l.errors.load(Ordering::Relaxed))
                .sum();
            let rate = (ops - last_ops.min(ops)) as f64 / (now - last_at).as_secs_f64().max(1e-9);
            (last_ops, last_at) = (ops, now);
            match (ends, total) {
                (Some(ends), _) => {
                    drawn.set_position(now.saturating_duration_since(start).as_millis() as u64);
                    drawn.set_message(format!(
                        "{ops} ops, {rate:.0} ops/s, {errors} errors, {:.0}s left",
                        ends.saturating_duration_since(now).as_secs_f64()
                    ));
                }
                (None, Some(_)) => {
                    drawn.set_position(ops);
                    drawn.set_message(format!("{rate:.0} ops/s, {errors} errors"));
                }
                (None, None) => {
                    drawn.set_message(format!("{ops} ops, {rate:.0} ops/s, {errors} errors"))
                }
            }
        }
    });
    Progress { bar, task }
}

/// Stops the progress bar and clears it.
pub fn stop(progress: Progress) {
    progress.task.abort();
    progress.bar.finish_and_clear();
}
