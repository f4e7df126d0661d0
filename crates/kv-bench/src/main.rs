//! The `kv-bench` binary: parse flags, set up logging, run (or check a
//! history, or watch a cluster's layout change), exit code.

#![deny(clippy::indexing_slicing)]

use std::process::ExitCode;

use clap::Parser;
use kv_bench::config::Command;
use kv_bench::Config;

fn main() -> ExitCode {
    let mut config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Some(Command::ClusterWatch(args)) = &config.command {
        let authorization = match config.authorization() {
            Ok(authorization) => authorization,
            Err(why) => {
                eprintln!("kv-bench cluster-watch: {why}");
                return ExitCode::from(2);
            }
        };
        if let Err(why) = config.install_tls() {
            eprintln!("kv-bench cluster-watch: {why}");
            return ExitCode::from(2);
        }
        let end = kv_bench::cluster_watch::run(args, authorization);
        match &end {
            kv_bench::cluster_watch::WatchEnd::Settled(summary) => println!("{summary}"),
            kv_bench::cluster_watch::WatchEnd::TimedOut(why) => {
                eprintln!("kv-bench cluster-watch: {why}")
            }
            kv_bench::cluster_watch::WatchEnd::NoView(why) => {
                eprintln!("kv-bench cluster-watch: {why}")
            }
        }
        return ExitCode::from(end.exit_code());
    }
    if let Some(Command::CheckHistory(args)) = config.command.take() {
        let mut out = std::io::stdout().lock();
        return match kv_bench::history::check_file(&args.file, args.max_steps, args.quiet, &mut out)
        {
            Ok(summary) if summary.passed() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(1),
            Err(error) => {
                eprintln!("kv-bench check-history: {error}");
                ExitCode::from(2)
            }
        };
    }
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
