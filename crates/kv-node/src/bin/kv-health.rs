//! `kv-health [ADDR]`: exits 0 if `GET http://ADDR/-/health` answers 200.
//!
//! Container images carry no curl or wget; this tiny probe (kv-http's
//! [`kv_http::probe`], std only) is what the Dockerfile's HEALTHCHECK runs,
//! for kv-node and kv-proxy alike. ADDR defaults to 127.0.0.1:8081.
//!
//! In the environment of a server whose port speaks TLS (`KV_TLS_CERT` and
//! `KV_TLS_CA` both set, as the server reads them), the probe speaks TLS,
//! verified against `KV_TLS_CA` (the certificate must name ADDR's host).

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_owned());
    let tls = match std::env::var_os("KV_TLS_CERT").and(std::env::var_os("KV_TLS_CA")) {
        Some(ca) => {
            let args = kv_http::tls::TlsArgs {
                tls_ca: Some(ca.into()),
                ..Default::default()
            };
            match args.load() {
                Ok(tls) => tls,
                Err(error) => {
                    eprintln!("unhealthy: {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    match kv_http::probe::check_with(&addr, Duration::from_secs(2), tls.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("unhealthy: {why}");
            ExitCode::FAILURE
        }
    }
}
