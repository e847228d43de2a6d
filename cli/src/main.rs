//! The `hearth` binary. See the crate's documentation and docs/distros.md.

use std::process::ExitCode;

use clap::Parser;
use hearth_cli::args::Cli;

/// hearth's own failures exit with this (as `docker run` does), so that a
/// command's own statuses pass through unambiguously.
const HEARTH_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.check() {
        eprintln!("hearth: error: {e}");
        return ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.global.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hearth: error: starting the async runtime: {e}");
            return ExitCode::from(HEARTH_FAILED);
        }
    };
    match runtime.block_on(hearth_cli::commands::dispatch(cli)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("hearth: error: {e:#}");
            ExitCode::from(HEARTH_FAILED)
        }
    }
}
