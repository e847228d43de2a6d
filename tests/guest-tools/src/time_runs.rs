//! `time-runs N LABEL -- COMMAND...`: runs COMMAND N times, one after the
//! other, and prints `HEARTH-LABEL-US: <microseconds>` for each run (busybox's
//! date has no sub-second clock). A failing run is an error: a benchmark must
//! not time failures.

use std::process::{Command, Stdio};
use std::time::Instant;

pub fn run(n: usize, label: &str, argv: &[String]) -> std::io::Result<()> {
    let (program, args) = argv.split_first().ok_or_else(|| std::io::Error::other("time-runs: no command"))?;
    for i in 0..n {
        let started = Instant::now();
        let status = Command::new(program).args(args).stdin(Stdio::null()).stdout(Stdio::null()).status()?;
        let us = started.elapsed().as_micros();
        if !status.success() {
            return Err(std::io::Error::other(format!("time-runs: run {i} of {program} failed: {status}")));
        }
        println!("HEARTH-{label}-US: {us}");
    }
    Ok(())
}
