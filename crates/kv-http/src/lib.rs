//! `kv-http`: what kv-node and kv-proxy serve HTTP/1.1 with, so the proxy
//! needs neither the node nor the storage engine, and both keep one contract.
//!
//! The contract: every answer, whichever layer produces it (a handler, the
//! connection cap, or hyper's own parser), is `Content-Type:
//! application/json` with `{"error": "..."}` when it is an error, and every
//! error has one status, chosen in one place ([`ApiError::status`]).
//!
//! Modules, one concern each:
//! * [`auth`]: bearer tokens checked on every request, and protected mode
//!   (no token, no listening beyond loopback).
//! * [`error`]: every way a request can fail, its status, its JSON body.
//! * [`key`]: path → key decoding and validation (the ring hashes the
//!   decoded key, so proxy and node must decode alike).
//! * [`request`]: checks RFC 9110/9112 make of every request head (`Host`,
//!   `Expect`), and discarding a refused body without inviting it.
//! * [`canned`]: an I/O wrapper that turns hyper's own bodiless answers to
//!   unparseable requests (400, 414, 431) into the JSON contract.
//! * [`server`]: bind, accepting with its connection cap (and a small
//!   reserve that keeps `/-/health` and `/-/ready` answerable at the cap),
//!   per-connection timeouts, graceful drain, signals.
//! * [`tls`]: rustls on the port (`--tls-cert`/`--tls-key`), for the
//!   clients to nodes (`--tls-ca`), mutual TLS between nodes, SIGHUP reload.
//! * [`workers`]: thread per core (as nginx's worker processes), each
//!   worker a single-threaded runtime serving the connections it is handed.
//! * [`metrics`]: request counters and latency histograms, sharded by
//!   thread, and their Prometheus text (encoded by `prometheus-client`).
//! * [`probe`]: the one `GET /-/health` probe (kv-health, kv-bench,
//!   kv-proxy's health checks, kv-testkit), std only.

#![deny(clippy::indexing_slicing)]

pub mod auth;
pub mod canned;
pub mod error;
pub mod key;
pub mod metrics;
pub mod probe;
pub mod request;
pub mod server;
pub mod tls;
pub mod workers;

pub use error::{json_response, ApiError, Body};
