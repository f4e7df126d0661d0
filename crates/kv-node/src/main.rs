//! The `kv-node` binary: parse flags, set up logging, bind, run.

use std::process::ExitCode;

use clap::Parser;
use kv_node::Config;

// The allocator decides whether memory comes back: glibc's malloc keeps
// freed memory in per-thread arenas (RSS stays at its peak after keys are
// deleted or a connection spike closes), jemalloc returns it to the system
// a few seconds later from a background thread, as Redis does. Measured by
// `scripts/bench-engine.sh` (see the README).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lets jemalloc purge freed pages from its own thread (decayed over
/// ~10 s), instead of only when an allocating thread passes by: an idle
/// node after a mass delete would otherwise keep its RSS.
#[cfg(feature = "jemalloc")]
fn tune_allocator() {
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        log::warn!("cannot start jemalloc's background purging: {error}");
    }
}

#[cfg(not(feature = "jemalloc"))]
fn tune_allocator() {}

fn main() -> ExitCode {
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    tune_allocator();
    // Protected mode and an unusable token refuse the start before anything
    // is opened, with clap's exit code for a bad configuration.
    if let Err(error) = config.auth.validate(config.bind, "kv-node") {
        log::error!("{error}");
        return ExitCode::from(kv_http::auth::CONFIG_EXIT_CODE);
    }
    if let Err(error) = config.tls.load() {
        log::error!("{error}");
        return ExitCode::from(kv_http::auth::CONFIG_EXIT_CODE);
    }
    // Each connection is a descriptor; leave room for data files and logs.
    kv_node::raise_fd_limit(config.max_connections + 256);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            log::error!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let exit_with_parent = config.exit_with_parent;
    let result = runtime.block_on(async {
        // Before the listener exists, so a SIGTERM at any point after the
        // "listening" line is a clean stop.
        let signal = kv_node::shutdown_signal();
        let listener = kv_node::bind(config.bind, config.port).await?;
        let stop = async {
            tokio::select! {
                () = signal => {}
                () = kv_node::parent_exited(), if exit_with_parent => {}
            }
        };
        kv_node::run(listener, config, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error}");
            // A removed node's data dir is refused like a bad configuration.
            if error
                .get_ref()
                .is_some_and(|inner| inner.is::<kv_node::RemovedNode>())
            {
                return ExitCode::from(kv_http::auth::CONFIG_EXIT_CODE);
            }
            ExitCode::FAILURE
        }
    }
}
