//! The `kv-bench` binary: parse flags, set up logging, run, exit code.

use std::process::ExitCode;

use clap::Parser;
use kv_bench::Config;

fn main() -> ExitCode {
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match kv_bench::run(config) {
        Ok(outcome) if outcome.failed() => {
            eprintln!(
                "kv-bench: {} request(s) failed or got wrong answers (see errors above; --allow-errors to exit 0)",
                outcome.errors
            );
            ExitCode::from(1)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kv-bench: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
