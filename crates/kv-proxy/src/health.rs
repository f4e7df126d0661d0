//! Each node's health: active checks plus passive marking, beside the ring.
//!
//! The ring never changes when a node goes down: its keys are answered 503
//! (fail closed) instead of being remapped to a node that doesn't hold them.
//!
//! * Active: every `--health-interval`, kv-http's `GET /-/health` probe on
//!   a fresh TCP connection (never a pooled one, so a check sees what a new
//!   connection would: a restarted or firewalled node). 200 is a success; anything else,
//!   or no answer within `--health-timeout`, a failure.
//! * Passive: a connect error while forwarding counts as a failure too.
//! * A node is down after [`FAILURES_TO_DOWN`] consecutive failures and up
//!   again after one success. The state is an atomic flag read on every
//!   request; a change is logged once, by whichever check flips it.
//! * Until a node has answered once (a check or a request), it is
//!   *unchecked*: requests still go to it (the first check runs at once,
//!   and a request that cannot connect counts as a failure), but it does
//!   not count as up for `/-/ready` and `/-/health`
//!   ([`NodeHealth::is_known_up`]), so a proxy started while its nodes are
//!   down never says ready before its first checks have failed. The
//!   checkers start with the proxy and check at once, so a proxy whose
//!   nodes are up is ready after one check's round trip.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Consecutive failures that mark a node down.
pub const FAILURES_TO_DOWN: u32 = 2;

/// The health of one node.
#[derive(Debug)]
pub struct NodeHealth {
    node: String,
    up: AtomicBool,
    /// The node answered a check or a request at least once.
    answered: AtomicBool,
    failures: AtomicU32,
}

impl NodeHealth {
    /// A node is presumed up for routing until checks or requests say
    /// otherwise, but is not known up until it has answered once.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            up: AtomicBool::new(true),
            answered: AtomicBool::new(false),
            failures: AtomicU32::new(0),
        }
    }

    /// Whether requests may be sent to the node (not marked down).
    #[inline]
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether the node has answered and is not marked down since: what
    /// `/-/ready` and `/-/health` count as up.
    pub fn is_known_up(&self) -> bool {
        self.answered.load(Ordering::Acquire) && self.is_up()
    }

    /// Neither answered yet nor marked down: no check has told.
    pub fn is_unchecked(&self) -> bool {
        !self.answered.load(Ordering::Acquire) && self.is_up()
    }

    /// A check or a request succeeded.
    #[inline]
    pub fn record_success(&self) {
        // Read first: on the hot path the counter is already zero, and a
        // load keeps the cache line shared between cores where a store
        // would bounce it.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if !self.answered.load(Ordering::Relaxed) {
            self.answered.store(true, Ordering::Release);
        }
        if !self.up.load(Ordering::Relaxed) && !self.up.swap(true, Ordering::AcqRel) {
            log::info!("node {} is up", self.node);
        }
    }

    /// A check failed, or a request could not connect.
    pub fn record_failure(&self, why: &str) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= FAILURES_TO_DOWN && self.up.swap(false, Ordering::AcqRel) {
            log::warn!(
                "node {} is down after {failures} failures: {why}",
                self.node
            );
        } else {
            log::debug!("node {} failure {failures}: {why}", self.node);
        }
    }
}

/// Starts one checker task per node; abort the handles to stop them.
pub fn spawn_checkers(
    nodes: &[Arc<NodeHealth>],
    interval: Duration,
    timeout: Duration,
) -> Vec<JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::current();
    nodes
        .iter()
        .map(|health| spawn_checker(&runtime, Arc::clone(health), interval, timeout))
        .collect()
}

/// Starts one node's checker task on `runtime`; abort the handle to stop it.
pub fn spawn_checker(
    runtime: &tokio::runtime::Handle,
    health: Arc<NodeHealth>,
    interval: Duration,
    timeout: Duration,
) -> JoinHandle<()> {
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        // A slow check delays the next one rather than firing a burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match check(&health.node, timeout).await {
                Ok(()) => health.record_success(),
                Err(why) => health.record_failure(&why),
            }
        }
    })
}

/// One active check: kv-http's [`probe`](kv_http::probe) (a fresh
/// connection, `GET /-/health`, 200 or bust), on the blocking pool.
pub async fn check(node: &str, timeout: Duration) -> Result<(), String> {
    let node = node.to_owned();
    tokio::task::spawn_blocking(move || {
        kv_http::probe::check_with(&node, timeout, crate::node_auth::tls())
    })
    .await
    .unwrap_or_else(|error| Err(format!("check failed: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchecked_until_it_answers() {
        let health = NodeHealth::new("n");
        assert!(health.is_up(), "requests may go to it");
        assert!(health.is_unchecked());
        assert!(!health.is_known_up(), "not up for readiness yet");
        health.record_failure("x");
        assert!(health.is_unchecked(), "one failure says nothing yet");
        assert!(!health.is_known_up());
        health.record_failure("x");
        assert!(!health.is_unchecked(), "down now");
        assert!(!health.is_known_up());
        health.record_success();
        assert!(health.is_known_up());
        assert!(!health.is_unchecked());
    }

    #[test]
    fn down_after_two_failures_up_after_one_success() {
        let health = NodeHealth::new("n");
        assert!(health.is_up());
        health.record_failure("x");
        assert!(health.is_up(), "one failure is not enough");
        health.record_failure("x");
        assert!(!health.is_up());
        health.record_failure("x");
        assert!(!health.is_up());
        health.record_success();
        assert!(health.is_up());
        // The count restarted: one failure after a success is not enough.
        health.record_failure("x");
        assert!(health.is_up());
    }

    #[tokio::test]
    async fn check_fails_on_a_closed_port_and_a_silent_node() {
        // A port nothing listens on (bound, then released).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(check(&addr, Duration::from_secs(2)).await.is_err());

        // A node that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let holder = tokio::spawn(async move {
            let (_stream, _) = silent.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let result = check(&addr, Duration::from_millis(200)).await;
        assert!(result.unwrap_err().contains("no answer"));
        holder.abort();
    }
}
