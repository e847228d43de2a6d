//! Running a step where KVM can run our VMM: here, or in the test host.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::artefacts::{quote, Artefacts};
use crate::testhost::{self, Console, Place};

/// Runs `step`'s script with the artefacts' environment, directly or in
/// the test host (whose memory and hang guard it gives), and returns its
/// exit status.
pub fn run_script(artefacts: &Artefacts, step: testhost::Run) -> Result<i32> {
    let place = testhost::place();
    (step.console)(&format!("==> {}: running {}", step.name, testhost::describe(place)));
    match place {
        Place::Direct => run_here(&step.script, artefacts, step.console),
        Place::TestHost => {
            let script = format!("{}{}", artefacts.shell_exports(), step.script);
            testhost::run(testhost::assets()?, &testhost::Run { script, ..step })
        }
    }
}

/// Runs `script` on this machine with the artefacts' environment, its
/// stdout and stderr line by line to `console`, and returns its exit status.
pub fn run_here(script: &str, artefacts: &Artefacts, console: Console) -> Result<i32> {
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec 2>&1\n{script}"))
        .envs(artefacts.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting /bin/sh")?;
    for line in BufReader::new(child.stdout.take().unwrap()).split(b'\n') {
        console(&String::from_utf8_lossy(&line?));
    }
    Ok(child.wait()?.code().unwrap_or(128 + 9))
}

/// Runs `argv` with the artefacts' environment, directly or in the test
/// host, its output on stdout, and fails unless it exits 0.
pub fn run_ok(name: &str, artefacts: &Artefacts, argv: &[String], memory_mib: u64, timeout: Duration) -> Result<()> {
    let line: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    let script = format!("exec {}\n", line.join(" "));
    let step = testhost::Run { name, script, memory_mib, timeout, console: &testhost::stdout_console };
    let code = run_script(artefacts, step)?;
    if code != 0 {
        bail!("{name} failed (exit status {code})");
    }
    Ok(())
}
