//! `kv-health [ADDR]`: exits 0 if `GET http://ADDR/-/health` answers 200.
//!
//! Container images carry no curl or wget; this tiny probe (kv-http's
//! [`kv_http::probe`], std only) is what the Dockerfile's HEALTHCHECK runs,
//! for kv-node and kv-proxy alike. ADDR defaults to 127.0.0.1:8081.

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_owned());
    match kv_http::probe::check(&addr, Duration::from_secs(2)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("unhealthy: {why}");
            ExitCode::FAILURE
        }
    }
}
