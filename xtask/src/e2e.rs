//! `cargo xtask e2e <suite>`: builds a suite of tests/e2e/ and runs it where
//! our VMM can run (see place.rs).

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::artefacts::Artefacts;
use crate::sh::cmd;
use crate::{paths, place};

pub const SUITES: &[&str] = &["boot", "devices", "agent-native", "agent", "containerd", "distro"];

/// Suites that need no VM: they run on this machine directly, as root.
const NATIVE: &[&str] = &["agent-native"];

/// Builds the test binary of `suite` and returns its path.
fn build(suite: &str) -> Result<String> {
    let out = cmd("cargo")
        .args(["test", "--release", "-p", "hearth-e2e", "--test", suite, "--no-run"])
        .args(["--message-format", "json-render-diagnostics"])
        .current_dir(paths::workspace())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("building the {suite} suite failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == suite)
        .find_map(|v| v["executable"].as_str().map(String::from))
        .with_context(|| format!("cargo did not report the {suite} test executable"))
}

pub fn run(suite: &str, filter: Option<&str>, artefacts: &Artefacts) -> Result<()> {
    if !SUITES.contains(&suite) {
        bail!("no e2e suite {suite:?}; the suites are: {}", SUITES.join(", "));
    }
    let exe = build(suite)?;
    // One test at a time: each boots a VM, and the machine has two cores.
    let mut argv = vec![exe, "--test-threads=1".to_string(), "--color=never".to_string()];
    argv.extend(filter.map(String::from));
    if NATIVE.contains(&suite) {
        let mut c = cmd(&argv[0]);
        c.args(&argv[1..]).envs(artefacts.env());
        return crate::sh::run(&mut c);
    }
    // The distro suite keeps two distros (root filesystems, image layers and
    // an export in the test host's memory) and a VM of 1 GiB.
    let (memory_mib, guard) = if suite == "distro" { (6144, 2700) } else { (2048, 1800) };
    place::run_ok(&format!("e2e-{suite}"), artefacts, &argv, memory_mib, Duration::from_secs(guard))
}
