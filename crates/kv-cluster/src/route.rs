//! The retry rules of a client that routes to shard leaders (design §6.1,
//! §12), shared by kv-proxy and kv-bench so the two cannot drift apart.
//!
//! A client sends a key's request to its shard's leader from a
//! [`ShardTable`] with `X-Kv-Route: direct`, then asks [`Routing::next`]
//! what the answer means. The rules follow from one invariant of kv-node's
//! status table: **421 and 503 mean "not proposed, never will be applied";
//! only 504 means "outcome unknown".** So:
//!
//! | what happened | next step |
//! |---|---|
//! | 421 with a [`NotLeader`] body | update the table, retry at the named leader at once, [`MAX_HOPS`] times; after that keep following, paced as a wait for a leader, until the wait bound, then 503 |
//! | 503, a connection that failed before anything was written, no leader known | wait for a leader: refresh the table every [`REFRESH_EVERY`] and retry, until the wait bound (`--leader-wait`, default [`DEFAULT_LEADER_WAIT`]) passes, then 503 |
//! | 504, or a write whose exchange broke or timed out after it was written | outcome unknown: 504, never retried |
//! | a read (GET/HEAD) whose exchange broke, timed out or was answered 504 | as a failed connect: a read changes nothing, so it may go again |
//! | a read still unanswered after [`READ_PATIENCE`] while a refreshed table names another leader ([`Attempt::Abandoned`]) | retry at the new leader at once, like a 421 (counts as a hop) |
//! | anything else | the answer (200, 404, 400, 413, ...) |
//!
//! **Reads behind a frozen leader.** A leader that stops answering (SIGSTOP,
//! a full disk, a GC-like pause) without closing its connections leaves a
//! read waiting for the whole request timeout. A read is safe to send again,
//! so a client waiting on one for longer than [`READ_PATIENCE`] re-learns
//! the shard's leader from the other replicas' `/-/shards` (every
//! [`REFRESH_EVERY`], [`Routing::moved`]) and, once they name another one
//! (they elect within about one election timeout), abandons the first
//! attempt and sends the read there. A leader that is only slow keeps its
//! read: the table still names it. Writes never do this: a write in flight
//! may be applied, so giving up on it would be a 504 anyway.
//!
//! **One budget per request.** The wait bound counts from when the request
//! arrived ([`Routing::new`]'s `arrived`), not from its first failure: a
//! first try that took two seconds (a leader that could not confirm a read)
//! leaves one of three. Every wait inside it ends at [`Routing::deadline`],
//! [`answer_margin`] before the bound, so the 503 is given within the bound:
//! the client sends what is left ([`Routing::budget`]) with each try in
//! [`WAIT_BUDGET_HEADER`], and kv-node cuts its own wait for a quorum (a
//! read's confirmation) there instead of at its `--raft-write-timeout`.
//!
//! The rules are pure: no clock of their own (the caller passes `now`), no
//! I/O. Sending, sleeping and fetching `/-/shards` are the caller's, in its
//! own client.

use std::time::{Duration, Instant};

use crate::table::{NotLeader, ShardTable, NOT_LEADER_STATUS};

/// 421s followed at once for one request. Leaders change rarely, so more
/// mean leadership is in flux (a thawed leader taking its shards back, a
/// hand-over racing an election): later 421s are followed only after a
/// table refresh ([`REFRESH_EVERY`]), within the wait bound, and 503 once
/// it passes ([`Next::TooManyHops`]), so a failover costs latency, not
/// errors.
pub const MAX_HOPS: u32 = 3;
/// How long a request waits for its shard to elect a leader before 503.
pub const DEFAULT_LEADER_WAIT: Duration = Duration::from_secs(3);
/// Request header: the milliseconds left of the sender's wait for a leader
/// (kv-proxy's, or a node's forwarding a client's request). A node stops
/// waiting for a quorum to confirm the request once they have passed and
/// answers 503 (not proposed), as it would at its own bound: the sender
/// would give up by then anyway.
pub const WAIT_BUDGET_HEADER: &str = "x-kv-wait-budget-ms";
/// How often a waiting request refreshes the table from `/-/shards`.
pub const REFRESH_EVERY: Duration = Duration::from_millis(50);
/// How long a read waits at its shard's leader before the client starts
/// checking (every [`REFRESH_EVERY`]) whether the other replicas name
/// another leader. Far above a healthy read's time (a read-index round on
/// loopback takes well under a millisecond), near the election timeout a
/// frozen leader's followers wait before electing another (kv-node's
/// default 600-800 ms after its last heartbeat): checking sooner would
/// only refresh tables.
pub const READ_PATIENCE: Duration = Duration::from_millis(500);
/// How often the table is refreshed in the background, waiting or not.
pub const BACKGROUND_REFRESH: Duration = Duration::from_secs(1);
/// Request header choosing the read consistency (design §6.3).
pub const CONSISTENCY_HEADER: &str = "x-kv-consistency";
/// The value of [`CONSISTENCY_HEADER`] that allows a stale read from any
/// replica.
pub const CONSISTENCY_STALE: &str = "stale";

/// What one attempt at a shard's leader came to, as the client saw it.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// The node answered with this status and body (the body is looked at
    /// only for a 421).
    Answered {
        /// HTTP status.
        status: u16,
        /// The whole body, or empty when the caller streams it on.
        body: &'a [u8],
    },
    /// Nothing was sent: the table knows no leader, the connection was
    /// refused or not made in time, or the node is known to be down.
    NotSent,
    /// The request was written (maybe in part) and no answer came: the
    /// connection broke. A timeout is not this: it is [`Attempt::Answered`]
    /// with 504 as far as the rules go (see [`Attempt::TimedOut`]).
    Lost,
    /// No answer within the request timeout: outcome unknown for a write;
    /// for a read, as [`Attempt::Lost`].
    TimedOut,
    /// A read given up on by the client after [`READ_PATIENCE`] because the
    /// table now names another leader ([`Routing::moved`]).
    Abandoned,
}

/// What the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Give the client this answer: it is final.
    Deliver,
    /// Send again at once, to the shard's leader in the (updated) table.
    Retry,
    /// No leader to send to: sleep until [`Routing::refresh_at`], refresh
    /// the table from any node, then send to its leader (or, with none,
    /// ask again with [`Attempt::NotSent`]).
    WaitForLeader,
    /// Give up: 503, nothing was proposed, the client may retry.
    NoLeader,
    /// Give up: 503, still redirected (over [`MAX_HOPS`] 421s) when the wait
    /// bound passed; nothing was proposed.
    TooManyHops,
    /// Give up: 504, the outcome is unknown; never retried.
    Unknown,
}

/// One request's progress through the rules.
#[derive(Debug, Clone)]
pub struct Routing {
    shard: u32,
    /// A read (GET/HEAD) may be resent after a broken exchange.
    read: bool,
    leader_wait: Duration,
    hops: u32,
    /// When the request arrived: the bound counts from here.
    arrived: Instant,
    /// When the request first had to wait for a leader (none: it has not).
    waiting_since: Option<Instant>,
    /// When the table was last refreshed for this request.
    refreshed: Option<Instant>,
}

impl Routing {
    /// The rules for one request on `shard`; `read` for GET and HEAD;
    /// `arrived` is when the request came in, where its `leader_wait`
    /// starts.
    pub fn new(shard: u32, read: bool, leader_wait: Duration, arrived: Instant) -> Self {
        Self {
            shard,
            read,
            leader_wait,
            hops: 0,
            arrived,
            waiting_since: None,
            refreshed: None,
        }
    }

    /// The request's shard.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// How many 421s were followed.
    pub fn hops(&self) -> u32 {
        self.hops
    }

    /// How long the request has been under way at `now`, since it
    /// arrived: what a 503 reports as waited (the first try included).
    pub fn waited(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.arrived)
    }

    /// Whether the request has had to wait for a leader.
    pub fn has_waited(&self) -> bool {
        self.waiting_since.is_some()
    }

    /// When every wait of this request ends: [`answer_margin`] before its
    /// `leader_wait` is over. No refresh or try is waited for past it.
    pub fn deadline(&self) -> Instant {
        wait_deadline(self.arrived, self.leader_wait)
    }

    /// What is left of the request's wait at `now`, for
    /// [`WAIT_BUDGET_HEADER`]; `None` with `leader_wait` 0 (no wait: the
    /// node keeps its own bounds).
    pub fn budget(&self, now: Instant) -> Option<Duration> {
        (!self.leader_wait.is_zero()).then(|| self.deadline().saturating_duration_since(now))
    }

    /// The wait bound this request was given.
    pub fn leader_wait(&self) -> Duration {
        self.leader_wait
    }

    /// Decides what `attempt` means, updating `table` from a 421 or
    /// clearing a leader that did not answer.
    pub fn next(&mut self, table: &mut ShardTable, attempt: Attempt<'_>, now: Instant) -> Next {
        match attempt {
            Attempt::Answered { status, body } if status == NOT_LEADER_STATUS => {
                // Given before anything was proposed: safe to send again.
                match serde_json::from_slice::<NotLeader>(body) {
                    Ok(answer) if answer.shard == self.shard => {
                        table.apply_not_leader(&answer);
                    }
                    // A 421 that names no usable leader: the node does not
                    // know one either; wait for one.
                    _ => {
                        table.clear_leader(self.shard);
                        return self.wait(now);
                    }
                }
                self.hop(table, now)
            }
            Attempt::Answered { status: 503, .. } => {
                // No leader or no quorum there: not proposed. The leader
                // the table names may be the one that lost its quorum.
                table.clear_leader(self.shard);
                self.wait(now)
            }
            Attempt::Answered { status, .. } if is_final(status) => Next::Deliver,
            // A write's outcome is unknown: never sent again.
            Attempt::Answered { .. } | Attempt::TimedOut | Attempt::Lost if !self.read => {
                Next::Unknown
            }
            // A read changes nothing: whatever became of it, it may go
            // again, once a leader is known.
            Attempt::Answered { .. } | Attempt::TimedOut | Attempt::Lost | Attempt::NotSent => {
                table.clear_leader(self.shard);
                self.wait(now)
            }
            Attempt::Abandoned => self.hop(table, now),
        }
    }

    /// A redirect to the leader the table now names: at once for the first
    /// [`MAX_HOPS`], then paced as a wait for a leader (the caller
    /// refreshes the table first), 503 at the wait bound.
    fn hop(&mut self, table: &ShardTable, now: Instant) -> Next {
        self.hops += 1;
        if self.hops > MAX_HOPS {
            match self.wait(now) {
                Next::NoLeader => Next::TooManyHops,
                next => next,
            }
        } else if table.leader(self.shard).is_some() {
            Next::Retry
        } else {
            self.wait(now)
        }
    }

    /// How long an attempt waits before the client checks whether the
    /// shard's leader moved ([`Routing::moved`]): [`READ_PATIENCE`] for a
    /// read sent to the leader, `None` for a write (never abandoned).
    pub fn patience(&self) -> Option<Duration> {
        self.read.then_some(READ_PATIENCE)
    }

    /// Whether `table` now names a leader other than the one at `sent_to`
    /// (or none): a read still waiting there is then abandoned and sent
    /// again ([`Attempt::Abandoned`]).
    pub fn moved(&self, table: &ShardTable, sent_to: &str) -> bool {
        table
            .leader(self.shard)
            .is_none_or(|leader| leader.addr != sent_to)
    }

    fn wait(&mut self, now: Instant) -> Next {
        self.waiting_since.get_or_insert(now);
        if now >= self.deadline() {
            Next::NoLeader
        } else {
            Next::WaitForLeader
        }
    }

    /// When to refresh the table next while waiting: at once the first
    /// time, then [`REFRESH_EVERY`] after the last refresh, never past
    /// [`Routing::deadline`] (so the last try happens there, not after it).
    pub fn refresh_at(&self, now: Instant) -> Instant {
        let Some(last) = self.refreshed else {
            return now;
        };
        (last + REFRESH_EVERY).min(self.deadline())
    }

    /// Notes that the table was refreshed at `now`.
    pub fn refreshed(&mut self, now: Instant) {
        self.refreshed = Some(now);
    }
}

/// How long before its `leader_wait` is over a request stops waiting, so
/// that its 503 is given within the wait, not one exchange after it:
/// [`REFRESH_EVERY`], or a tenth of a shorter wait.
pub fn answer_margin(leader_wait: Duration) -> Duration {
    (leader_wait / 10).min(REFRESH_EVERY)
}

/// When every wait of a request that `arrived` with `leader_wait` ends
/// (kv-proxy, kv-bench and kv-node's own wait share it): [`answer_margin`]
/// before the wait is over.
pub fn wait_deadline(arrived: Instant, leader_wait: Duration) -> Instant {
    arrived + leader_wait.saturating_sub(answer_margin(leader_wait))
}

/// Pacing of the refreshes an answer's `X-Kv-Placement-Version` asks for
/// (kv-proxy's and kv-bench's `refresh_soon`).
///
/// The header is a hint, not a fact: a node may show a version its
/// `/-/shards` does not (it applied a change between the two answers), or
/// one no `/-/shards` ever will (a bug, a foreign program, a version of
/// another cluster). So a refresh that reaches the hinted version keeps the
/// next hinted one [`REFRESH_EVERY`] away, and one that does not doubles
/// the pause, up to [`BACKGROUND_REFRESH`]: a header that is never borne out
/// costs at most one refresh per background period, not one per 50 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintBackoff {
    pause: Duration,
}

impl Default for HintBackoff {
    fn default() -> Self {
        Self {
            pause: REFRESH_EVERY,
        }
    }
}

impl HintBackoff {
    /// How long to wait before the next hinted refresh, after one that
    /// `reached` (or did not reach) the hinted version.
    pub fn after(&mut self, reached: bool) -> Duration {
        self.pause = if reached {
            REFRESH_EVERY
        } else {
            (self.pause * 2).min(BACKGROUND_REFRESH)
        };
        self.pause
    }
}

/// Whether an answer with `status` is the request's final answer, to hand
/// to the client as it is: anything but 421, 503 and 504. A client may check
/// this first and skip [`Routing::next`] (and the table's lock) on the
/// common path.
#[inline]
pub fn is_final(status: u16) -> bool {
    !matches!(status, NOT_LEADER_STATUS | 503 | 504)
}

/// Whether a request's `X-Kv-Consistency` header value asks for a stale
/// read (case-insensitive, as header values of this kind usually are).
pub fn wants_stale(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(CONSISTENCY_STALE.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::ShardsView;

    const VIEW: &str = r#"{"shards": 2, "replicas": 3, "node_id": 1,
        "members": {"1": "127.0.0.1:8081", "2": "127.0.0.1:8082", "3": "127.0.0.1:8083"},
        "groups": [
          {"shard": 0, "replicas": [1, 2, 3], "preferred_leader": 2, "leader": 2, "term": 5, "hosted": true},
          {"shard": 1, "replicas": [2, 3, 1], "preferred_leader": 3, "leader": null, "term": 2, "hosted": true}
        ]}"#;

    fn table() -> ShardTable {
        ShardTable::parse(VIEW.as_bytes()).unwrap()
    }

    fn answered(status: u16, body: &[u8]) -> Attempt<'_> {
        Attempt::Answered { status, body }
    }

    #[test]
    fn final_answers_are_delivered() {
        let mut table = table();
        let now = Instant::now();
        for status in [200, 404, 400, 405, 413, 500, 502] {
            let mut routing = Routing::new(0, false, DEFAULT_LEADER_WAIT, now);
            assert_eq!(
                routing.next(&mut table, answered(status, b""), now),
                Next::Deliver
            );
        }
        assert_eq!(table.leader(0).unwrap().id, 2, "table untouched");
    }

    #[test]
    fn a_421_moves_the_table_and_later_ones_are_paced_until_the_wait_bound() {
        let mut table = table();
        let now = Instant::now();
        let mut routing = Routing::new(0, false, DEFAULT_LEADER_WAIT, now);
        let body = serde_json::to_vec(&NotLeader::new(0, 3, "127.0.0.1:8083", 6)).unwrap();
        assert_eq!(
            routing.next(&mut table, answered(421, &body), now),
            Next::Retry
        );
        assert_eq!(table.leader(0).unwrap().addr, "127.0.0.1:8083");
        assert_eq!(routing.hops(), 1);
        // Nodes bouncing the request around: three hops are followed at
        // once, later ones after a table refresh, until the wait bound
        // passes; then 503 (not proposed).
        assert_eq!(
            routing.next(&mut table, answered(421, &body), now),
            Next::Retry
        );
        assert_eq!(
            routing.next(&mut table, answered(421, &body), now),
            Next::Retry
        );
        assert_eq!(
            routing.next(&mut table, answered(421, &body), now),
            Next::WaitForLeader
        );
        let later = now + DEFAULT_LEADER_WAIT / 2;
        assert_eq!(
            routing.next(&mut table, answered(421, &body), later),
            Next::WaitForLeader
        );
        assert_eq!(table.leader(0).unwrap().addr, "127.0.0.1:8083");
        let past = now + DEFAULT_LEADER_WAIT;
        assert_eq!(
            routing.next(&mut table, answered(421, &body), past),
            Next::TooManyHops
        );
        assert_eq!(routing.hops(), 6);
    }

    #[test]
    fn a_421_without_a_usable_leader_waits() {
        let mut table = table();
        let now = Instant::now();
        let mut routing = Routing::new(0, false, DEFAULT_LEADER_WAIT, now);
        assert_eq!(
            routing.next(
                &mut table,
                answered(421, b"{\"error\":\"not leader\"}"),
                now
            ),
            Next::WaitForLeader
        );
        assert_eq!(table.leader(0), None);
        // A 421 for another shard is not about this request.
        let mut table = self::table();
        let other = serde_json::to_vec(&NotLeader::new(1, 3, "127.0.0.1:8083", 6)).unwrap();
        assert_eq!(
            routing.next(&mut table, answered(421, &other), now),
            Next::WaitForLeader
        );
        assert_eq!(table.leader(1), None, "shard 1 not taken from it");
    }

    #[test]
    fn no_leader_waits_until_the_bound_then_gives_503() {
        let mut table = table();
        let start = Instant::now();
        let wait = Duration::from_millis(300);
        let mut routing = Routing::new(0, false, wait, start);
        // Every wait ends a margin before the bound, so the 503 is given
        // within it.
        let deadline = start + wait - answer_margin(wait);
        assert_eq!(answer_margin(wait), Duration::from_millis(30));
        assert_eq!(routing.deadline(), deadline);
        assert_eq!(
            routing.next(&mut table, answered(503, b""), start),
            Next::WaitForLeader
        );
        assert!(routing.has_waited());
        assert_eq!(
            table.leader(0),
            None,
            "the 503's node is not retried blindly"
        );
        assert_eq!(routing.refresh_at(start), start, "first refresh at once");
        routing.refreshed(start);
        assert_eq!(routing.refresh_at(start), start + REFRESH_EVERY);
        let later = start + Duration::from_millis(200);
        assert_eq!(
            routing.next(&mut table, Attempt::NotSent, later),
            Next::WaitForLeader
        );
        assert_eq!(routing.budget(later), Some(deadline - later));
        routing.refreshed(start + Duration::from_millis(260));
        assert_eq!(
            routing.refresh_at(later),
            deadline,
            "never past the deadline"
        );
        assert_eq!(
            routing.next(&mut table, Attempt::NotSent, deadline),
            Next::NoLeader
        );
        assert_eq!(routing.budget(deadline), Some(Duration::ZERO));
        assert_eq!(routing.waited(deadline), wait - answer_margin(wait));
    }

    #[test]
    fn the_bound_counts_from_arrival_not_from_the_first_failure() {
        let mut table = table();
        let arrived = Instant::now();
        let wait = Duration::from_secs(3);
        let mut routing = Routing::new(0, true, wait, arrived);
        assert!(!routing.has_waited());
        assert_eq!(routing.budget(arrived), Some(wait - REFRESH_EVERY));
        // A first try that took 2 s (a leader that could not confirm a
        // read) leaves the rest of the bound, not another 3 s.
        let failed = arrived + Duration::from_secs(2);
        assert_eq!(
            routing.next(&mut table, answered(503, b""), failed),
            Next::WaitForLeader
        );
        assert_eq!(routing.waited(failed), Duration::from_secs(2));
        assert_eq!(
            routing.budget(failed),
            Some(Duration::from_secs(1) - REFRESH_EVERY)
        );
        let end = arrived + wait - REFRESH_EVERY;
        assert_eq!(
            routing.next(&mut table, answered(503, b""), end),
            Next::NoLeader
        );
        // No wait at all: one try, and the node keeps its own bounds.
        let none = Routing::new(0, true, Duration::ZERO, arrived);
        assert_eq!(none.budget(arrived), None);
        assert_eq!(none.deadline(), arrived);
    }

    #[test]
    fn unknown_outcomes_are_never_retried_but_broken_reads_are() {
        let mut table = table();
        let now = Instant::now();
        for attempt in [answered(504, b""), Attempt::TimedOut, Attempt::Lost] {
            let mut routing = Routing::new(0, false, DEFAULT_LEADER_WAIT, now);
            assert_eq!(routing.next(&mut table, attempt, now), Next::Unknown);
        }
        // A read is sent again, whatever became of it, once the table names
        // a leader: the one it was sent to is forgotten until a refresh.
        for attempt in [Attempt::Lost, Attempt::TimedOut, answered(504, b"")] {
            let mut table = self::table();
            let mut read = Routing::new(0, true, DEFAULT_LEADER_WAIT, now);
            assert_eq!(read.next(&mut table, attempt, now), Next::WaitForLeader);
            assert_eq!(table.leader(0), None);
        }
    }

    #[test]
    fn a_read_waits_its_patience_then_moves_with_the_table() {
        let now = Instant::now();
        let write = Routing::new(0, false, DEFAULT_LEADER_WAIT, now);
        assert_eq!(write.patience(), None, "a write is never abandoned");
        let mut read = Routing::new(0, true, DEFAULT_LEADER_WAIT, now);
        assert_eq!(read.patience(), Some(READ_PATIENCE));
        let mut table = table();
        assert!(!read.moved(&table, "127.0.0.1:8082"), "still the leader");
        assert!(read.moved(&table, "127.0.0.1:8081"));
        // The other replicas elected node 3 in a newer term.
        let mut view = ShardsView::parse(VIEW.as_bytes()).unwrap();
        view.groups[0].leader = Some(3);
        view.groups[0].term = Some(6);
        table.refresh(view).unwrap();
        assert!(read.moved(&table, "127.0.0.1:8082"));
        assert_eq!(read.next(&mut table, Attempt::Abandoned, now), Next::Retry);
        assert_eq!(table.leader(0).unwrap().id, 3, "the new leader is kept");
        assert_eq!(read.hops(), 1);
        // A leader nobody names: wait for one.
        table.clear_leader(0);
        assert!(read.moved(&table, "127.0.0.1:8083"));
        assert_eq!(
            read.next(&mut table, Attempt::Abandoned, now),
            Next::WaitForLeader
        );
    }

    #[test]
    fn a_refused_connection_forgets_the_leader_until_a_refresh_names_one() {
        let mut table = table();
        let now = Instant::now();
        let mut routing = Routing::new(0, false, DEFAULT_LEADER_WAIT, now);
        assert_eq!(
            routing.next(&mut table, Attempt::NotSent, now),
            Next::WaitForLeader
        );
        assert_eq!(table.leader(0), None);
        // A refresh in a newer term names the new leader.
        let mut view = ShardsView::parse(VIEW.as_bytes()).unwrap();
        view.groups[0].leader = Some(1);
        view.groups[0].term = Some(6);
        table.refresh(view).unwrap();
        assert_eq!(table.leader(0).unwrap().id, 1);
    }

    #[test]
    fn hinted_refreshes_back_off_until_the_hint_is_borne_out() {
        let mut backoff = HintBackoff::default();
        let pauses: Vec<Duration> = (0..7).map(|_| backoff.after(false)).collect();
        assert_eq!(
            pauses,
            [100, 200, 400, 800, 1000, 1000, 1000].map(Duration::from_millis),
            "doubling up to the background period, never below it once there"
        );
        assert_eq!(backoff.after(true), REFRESH_EVERY, "reached: back to 50 ms");
        assert_eq!(backoff.after(false), REFRESH_EVERY * 2);
    }

    #[test]
    fn only_421_503_and_504_are_not_final() {
        for status in [200, 201, 204, 400, 404, 405, 408, 413, 500, 502] {
            assert!(is_final(status), "{status}");
        }
        for status in [421, 503, 504] {
            assert!(!is_final(status), "{status}");
        }
    }

    #[test]
    fn stale_is_asked_for_by_header() {
        assert!(wants_stale(b"stale"));
        assert!(wants_stale(b"Stale"));
        assert!(!wants_stale(b"linearizable"));
        assert!(!wants_stale(b""));
    }
}
