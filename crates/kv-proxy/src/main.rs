//! The `kv-proxy` binary: parse flags, set up logging, bind, run.

#![deny(clippy::indexing_slicing)]

use std::process::ExitCode;

use clap::Parser;
use kv_proxy::Config;

/// hyper and hyper-util allocate per request (futures, header maps, pool
/// handles); mimalloc's thread-local free lists make that cheaper than
/// glibc's malloc, which profiles showed at ~7% of the proxy's CPU. Set in
/// the binary only: the library leaves the choice to whoever embeds it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Protected mode and unusable tokens refuse the start before binding,
    // with clap's exit code for a bad configuration.
    if let Err(error) = config
        .auth
        .validate(config.bind, "kv-proxy")
        .and_then(|_| config.node_token())
    {
        log::error!("{error}");
        return ExitCode::from(kv_http::auth::CONFIG_EXIT_CODE);
    }
    if let Err(error) = config.tls.load() {
        log::error!("{error}");
        return ExitCode::from(kv_http::auth::CONFIG_EXIT_CODE);
    }
    // This runtime only accepts connections and runs health checks; the
    // requests are served by the worker threads `run` starts.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            log::error!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Before the listener exists, so a SIGTERM at any point after the
        // "listening" line is a clean stop.
        let signal = kv_proxy::shutdown_signal();
        let listener = kv_proxy::bind(config.bind, config.port).await?;
        kv_proxy::run(listener, config, signal).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
