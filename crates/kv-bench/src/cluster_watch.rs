//! `kv-bench cluster-watch`: follow a layout change until it settles
//! (`docs/membership.md` §8).
//!
//! Every `--every` it asks `GET /-/cluster` and reads the answer as
//! kv-cluster's [`ClusterView`]. On a terminal (indicatif's stderr target
//! detects one) it draws one `indicatif` bar,
//! `version 9 [#####-----] 30/47 moves  shard 17 -> node 4 47%  12.3 MB moved`;
//! otherwise (logs, pipes, tests) the bar is hidden and it prints the same
//! information as one plain line on stdout per change, so a log shows every
//! step once and nothing in between.
//!
//! **Which node.** `--node` first; every answer's members (all but removed
//! ones) become further sources, and when the node last asked does not
//! answer the others are asked in turn, so a watch survives the node it was
//! given going down (or being removed). An answer of an older placement
//! version than one already shown (a lagging node) is skipped, so the
//! version and `done/total` never go back.
//!
//! **Exit codes** ([`WatchEnd::exit_code`]): 0 once a view says `settled`
//! (at `--min-version` or newer: a watch started right after a change was
//! asked for, e.g. `kv-node --join`, must not take the layout before it as
//! the end);
//! 1 at `--timeout`, naming the moves still open; 2 when the first poll finds
//! no node answering with a `ClusterView` (nothing listening, or an answer
//! that is not one, e.g. a 404 from a node built before issue 13). Once a
//! view was seen, nodes that stop answering are retried until `--timeout`:
//! a node restarting in the middle of a move is part of what is watched.
//!
//! "MB moved" adds up the bytes every move seen so far reported (its
//! largest); a move that started and finished between two polls is not in it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use hyper::{Method, Uri};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kv_cluster::{ClusterView, MemberState, MoveView, Phase};

use crate::client::{self, ClientKind, Endpoint};
use crate::config::ClusterWatchArgs;

/// The shortest pause between two polls.
const MIN_EVERY: Duration = Duration::from_millis(10);

/// Bound of one `GET /-/cluster` (connect plus answer).
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// How a watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    /// A view said `settled`; the summary line.
    Settled(String),
    /// `--timeout` passed first; what is still open.
    TimedOut(String),
    /// No node answered with a cluster view; why.
    NoView(String),
}

impl WatchEnd {
    /// 0 settled, 1 timed out, 2 no view.
    pub fn exit_code(&self) -> u8 {
        match self {
            WatchEnd::Settled(_) => 0,
            WatchEnd::TimedOut(_) => 1,
            WatchEnd::NoView(_) => 2,
        }
    }
}

/// Why one node gave no view.
enum NoAnswer {
    /// Nothing (refused, timed out, broken).
    Silent(String),
    /// An answer that is not a `ClusterView`.
    NotAView(String),
}

impl NoAnswer {
    fn describe(&self, endpoint: &Endpoint) -> String {
        match self {
            NoAnswer::Silent(why) => format!("{} does not answer: {why}", endpoint.authority),
            NoAnswer::NotAView(why) => format!("{} {why}", endpoint.authority),
        }
    }
}

/// Runs the watch to its end, printing progress; the caller exits with
/// [`WatchEnd::exit_code`] after printing the end's message.
///
/// `authorization` (kv-bench's `--auth-token-file` / `KV_AUTH_TOKEN`) goes
/// on every request, to `--node` and to the members learnt; `https://`
/// endpoints use the TLS settings installed by [`crate::Config::install_tls`].
pub fn run(args: &ClusterWatchArgs, authorization: Option<HeaderValue>) -> WatchEnd {
    let mut first = match Endpoint::parse(&args.node) {
        Ok(endpoint) => endpoint,
        Err(why) => return WatchEnd::NoView(format!("--node: {why}")),
    };
    first.authorization = authorization.clone();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return WatchEnd::NoView(format!("cannot start the async runtime: {error}")),
    };
    let mut watch = Watch::new(first, args.min_version, Display::new());
    watch.authorization = authorization;
    // `--every 0` would ask as fast as the node answers.
    let every = args.every.max(MIN_EVERY);
    runtime.block_on(watch.run(args.timeout, every))
}

/// The watch's state between polls.
struct Watch {
    /// Where to ask: `--node`, then the members learnt (never removed from,
    /// so a node that comes back is asked again).
    sources: Vec<Endpoint>,
    /// The source that answered last, asked first.
    preferred: usize,
    /// A settled view of an older version is not the end.
    min_version: u64,
    /// The newest view shown.
    newest: Option<ClusterView>,
    /// (shard, move id) → the most bytes it reported.
    moved: BTreeMap<(u32, u64), u64>,
    display: Display,
    /// Sent on every request (`Bearer <token>`).
    authorization: Option<HeaderValue>,
    /// The most moves a view counted: a node's counts start again from 0
    /// once its state settles, so the summary says what the change took.
    moves_seen: u64,
}

impl Watch {
    fn new(first: Endpoint, min_version: u64, display: Display) -> Self {
        Self {
            sources: vec![first],
            preferred: 0,
            min_version,
            newest: None,
            moved: BTreeMap::new(),
            display,
            authorization: None,
            moves_seen: 0,
        }
    }

    async fn run(&mut self, timeout: Duration, every: Duration) -> WatchEnd {
        let started = Instant::now();
        let deadline = started + timeout;
        // Said once per outage, not at every poll.
        let mut outage = false;
        loop {
            match self.poll().await {
                Ok(view) => {
                    outage = false;
                    if let Some(end) = self.show(view, started) {
                        return end;
                    }
                }
                Err(why) if self.newest.is_none() => return WatchEnd::NoView(why),
                Err(why) => {
                    if !outage {
                        self.display
                            .note(&format!("no member answers ({why}); retrying"));
                    }
                    outage = true;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                self.display.clear();
                return WatchEnd::TimedOut(self.open_moves(timeout, outage));
            }
            tokio::time::sleep(every.min(deadline - now)).await;
        }
    }

    /// One view from the preferred source, else from the others in turn.
    async fn poll(&mut self) -> Result<ClusterView, String> {
        let mut failures = Vec::new();
        let count = self.sources.len();
        for turn in 0..count {
            let index = (self.preferred + turn) % count;
            // A remainder by `count`: always `Some`.
            let Some(endpoint) = self.sources.get(index).cloned() else {
                continue;
            };
            match fetch(&endpoint).await {
                Ok(view) => {
                    self.preferred = index;
                    self.learn(&view);
                    return Ok(view);
                }
                Err(no) => failures.push(no.describe(&endpoint)),
            }
        }
        Err(failures.join("; "))
    }

    /// Adds the view's members to the sources.
    fn learn(&mut self, view: &ClusterView) {
        for member in &view.members {
            if member.state == MemberState::Removed
                || self.sources.iter().any(|s| s.authority == member.addr)
            {
                continue;
            }
            match Endpoint::parse(&member.addr) {
                Ok(mut endpoint) => {
                    endpoint.authorization = self.authorization.clone();
                    self.sources.push(endpoint)
                }
                Err(why) => log::debug!("member {}: {why}", member.id),
            }
        }
    }

    /// Shows `view` unless it is older than the one shown; the end if it
    /// is settled.
    fn show(&mut self, view: ClusterView, started: Instant) -> Option<WatchEnd> {
        if self
            .newest
            .as_ref()
            .is_some_and(|newest| view.version < newest.version)
        {
            return None;
        }
        for mv in &view.active {
            if let Some(bytes) = mv.bytes {
                let seen = self.moved.entry((mv.shard, mv.move_id)).or_default();
                *seen = (*seen).max(bytes);
            }
        }
        let moved = self.moved.values().sum();
        self.moves_seen = self.moves_seen.max(view.moves.total);
        let end = (view.settled && view.version >= self.min_version).then(|| {
            // Settled: every move seen is done.
            let total = view.moves.total.max(self.moves_seen);
            WatchEnd::Settled(format!(
                "version {}  settled: {total}/{total} moves done, {} moved, in {}",
                view.version,
                megabytes(moved),
                humantime::format_duration(Duration::from_millis(
                    started.elapsed().as_millis() as u64
                )),
            ))
        });
        if end.is_some() {
            self.display.clear();
        } else {
            self.display.update(&view, moved);
        }
        self.newest = Some(view);
        end
    }

    /// What `TimedOut` says: the open moves of the newest view.
    fn open_moves(&self, timeout: Duration, outage: bool) -> String {
        let mut text = format!("not settled after {}", humantime::format_duration(timeout));
        if outage {
            text.push_str(" (no member answers now)");
        }
        let Some(view) = &self.newest else {
            return text;
        };
        let _ = write!(
            text,
            ": version {}, {}/{} moves done",
            view.version, view.moves.done, view.moves.total
        );
        for mv in &view.active {
            let _ = write!(
                text,
                "\n  open: shard {} node {} -> node {} {}",
                mv.shard,
                mv.remove,
                mv.add,
                phase_progress(mv)
            );
            if let Some(why) = &mv.stalled {
                let _ = write!(text, ", stalled: {}", printable(why));
            }
        }
        if view.moves.planned > 0 {
            let _ = write!(
                text,
                "\n  planned, not started: {} move(s)",
                view.moves.planned
            );
        }
        let joining: Vec<String> = view
            .members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Joining | MemberState::Leaving))
            .map(|m| format!("node {} {}", m.id, m.state.as_str()))
            .collect();
        if !joining.is_empty() {
            let _ = write!(text, "\n  members: {}", joining.join(", "));
        }
        text
    }
}

/// `GET /-/cluster` from `endpoint` on a fresh connection.
async fn fetch(endpoint: &Endpoint) -> Result<ClusterView, NoAnswer> {
    let mut conn = client::connect(endpoint, FETCH_TIMEOUT, ClientKind::Hyper)
        .await
        .map_err(|f| NoAnswer::Silent(f.detail))?;
    let uri = Uri::from_static("/-/cluster");
    let answer = client::send(&mut conn, endpoint, Method::GET, &uri, None, FETCH_TIMEOUT)
        .await
        .map_err(|f| NoAnswer::Silent(f.detail))?;
    match answer.status {
        200 => serde_json::from_slice(&answer.body).map_err(|e| {
            NoAnswer::NotAView(format!(
                "answered GET /-/cluster with something that is not the cluster's state ({e}): {}",
                snippet(&answer.body)
            ))
        }),
        404 => Err(NoAnswer::NotAView(format!(
            "answered GET /-/cluster with 404: not a member of a cluster that changes \
             membership (a standalone node, or one built before live membership): {}",
            snippet(&answer.body)
        ))),
        status => Err(NoAnswer::NotAView(format!(
            "answered GET /-/cluster with {status}: {}",
            snippet(&answer.body)
        ))),
    }
}

/// The start of a body, for a message (control characters escaped).
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(120) {
        Some((cut, _)) => format!("{}...", printable(&text[..cut])),
        None => printable(text),
    }
}

/// `text` from a node with its control characters escaped (`\u{1b}`), so
/// an answer cannot write terminal escape sequences (colours, a cleared
/// screen, a window title) to the watcher's terminal or log.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `bytes` as "12.3 MB".
fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// "47%", or the phase when the percent is unknown.
fn phase_progress(mv: &MoveView) -> String {
    match (mv.phase, mv.percent) {
        (Phase::Joint, _) => "joint".to_owned(),
        (_, Some(percent)) => format!("{percent}%"),
        (phase, None) => phase.as_str().to_owned(),
    }
}

/// The part after `done/total moves`: the first active move, how many
/// more, the bytes moved.
fn detail(view: &ClusterView, moved: u64) -> String {
    let mut text = String::new();
    if let Some(mv) = view.active.first() {
        let _ = write!(
            text,
            "shard {} -> node {} {}",
            mv.shard,
            mv.add,
            phase_progress(mv)
        );
        if let Some(why) = &mv.stalled {
            let _ = write!(text, " (stalled: {})", printable(why));
        }
        if view.active.len() > 1 {
            let _ = write!(text, " +{} more", view.active.len() - 1);
        }
        text.push_str("  ");
    } else if view.moves.planned > 0 {
        let _ = write!(text, "{} planned  ", view.moves.planned);
    } else if view.settled {
        // Shown only below --min-version: the change is not applied yet.
        text.push_str("settled, waiting for the change  ");
    }
    text.push_str(&megabytes(moved));
    text.push_str(" moved");
    text
}

/// `[#####-----]` of `width` characters.
fn text_bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        (u128::from(done.min(total)) * width as u128 / u128::from(total)) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// The plain line of a view (what a log shows per change).
pub fn plain_line(view: &ClusterView, moved: u64) -> String {
    format!(
        "version {}  {}  {}/{} moves  {}",
        view.version,
        text_bar(view.moves.done, view.moves.total, 20),
        view.moves.done,
        view.moves.total,
        detail(view, moved)
    )
}

/// The bar on a terminal, or plain lines on stdout.
struct Display {
    bar: ProgressBar,
    /// The last plain line printed (no terminal), to print only changes.
    last: Option<String>,
}

impl Display {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "version {prefix}  [{bar:20}]  {pos}/{len} moves  {wide_msg}",
        )
        .map(|style| style.progress_chars("#-"))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Self { bar, last: None }
    }

    fn update(&mut self, view: &ClusterView, moved: u64) {
        if self.bar.is_hidden() {
            let line = plain_line(view, moved);
            if self.last.as_deref() != Some(line.as_str()) {
                println!("{line}");
                self.last = Some(line);
            }
            return;
        }
        self.bar.set_prefix(view.version.to_string());
        self.bar.set_length(view.moves.total);
        self.bar.set_position(view.moves.done);
        self.bar.set_message(detail(view, moved));
    }

    /// A line of its own (above the bar on a terminal).
    fn note(&self, text: &str) {
        if self.bar.is_hidden() {
            println!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    fn clear(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(version: u64, settled: bool, total: u64, done: u64) -> ClusterView {
        ClusterView {
            cluster_id: kv_cluster::meta::ClusterId(7),
            version,
            node_id: 1,
            meta_leader: Some(1),
            shards: 8,
            replicas: 3,
            settled,
            members: Vec::new(),
            moves: kv_cluster::MoveCounts {
                total,
                done,
                ..Default::default()
            },
            active: Vec::new(),
        }
    }

    /// A real node's counts start again from 0 once it settles: the summary
    /// still says how many moves the change took.
    #[test]
    fn the_summary_counts_the_moves_seen_before_the_counts_reset() {
        let first = Endpoint::parse("127.0.0.1:1").expect("an address");
        let mut watch = Watch::new(first, 5, Display::new());
        let started = Instant::now();
        assert!(watch.show(view(5, false, 3, 1), started).is_none());
        match watch.show(view(8, true, 0, 0), started) {
            Some(WatchEnd::Settled(summary)) => {
                assert!(
                    summary.starts_with("version 8  settled: 3/3 moves done"),
                    "{summary}"
                )
            }
            other => panic!("not settled: {other:?}"),
        }
    }

    #[test]
    fn text_bar_is_bounded() {
        assert_eq!(text_bar(0, 0, 4), "[----]");
        assert_eq!(text_bar(1, 2, 4), "[##--]");
        assert_eq!(text_bar(9, 2, 4), "[####]");
        assert_eq!(text_bar(u64::MAX, u64::MAX, 4), "[####]");
    }

    #[test]
    fn snippet_cuts_long_bodies() {
        assert_eq!(snippet(b" {\"error\":\"x\"}\n"), "{\"error\":\"x\"}");
        assert_eq!(snippet(&[b'a'; 200]).len(), 123);
    }

    #[test]
    fn node_text_has_no_control_characters() {
        let body = b"{\"error\":\"\x1b[31mred\x1b]0;title\x07\"}";
        let shown = snippet(body);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("\\u{1b}[31mred"), "{shown:?}");
        assert_eq!(printable("caf\u{e9} ok"), "caf\u{e9} ok");
    }
}
