//! Running a step where KVM can run our VMM: here, or in the test host.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::artefacts::{quote, Artefacts};
use crate::testhost::{self, Place};

/// Runs `argv` with the artefacts' environment, directly or in the test
/// host, and returns its exit status.
pub fn run(name: &str, artefacts: &Artefacts, argv: &[String], memory_mib: u64, timeout: Duration) -> Result<i32> {
    let place = testhost::place();
    eprintln!("==> {name}: running {}", testhost::describe(place));
    match place {
        Place::Direct => {
            let status = std::process::Command::new(&argv[0]).args(&argv[1..]).envs(artefacts.env()).status()?;
            Ok(status.code().unwrap_or(128 + 9))
        }
        Place::TestHost => {
            let assets = testhost::ensure_assets()?;
            let line: Vec<String> = argv.iter().map(|a| quote(a)).collect();
            let script = format!("{}exec {}\n", artefacts.shell_exports(), line.join(" "));
            testhost::run(&assets, &testhost::Run { name, script, memory_mib, timeout })
        }
    }
}

pub fn run_ok(name: &str, artefacts: &Artefacts, argv: &[String], memory_mib: u64, timeout: Duration) -> Result<()> {
    let code = run(name, artefacts, argv, memory_mib, timeout)?;
    if code != 0 {
        bail!("{name} failed (exit status {code})");
    }
    Ok(())
}
