//! `cargo xtask fuzz`: the cargo-fuzz targets under `fuzz/` (see
//! docs/fuzzing.md), and the tools they need (the nightly toolchain and
//! cargo-fuzz), which `cargo xtask setup` installs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::sh::{self, cmd};

/// Every target in fuzz/fuzz_targets/.
pub const TARGETS: &[&str] =
    &["virtio_blk", "virtio_mmio", "virtio_vsock", "virtio_net", "virtio_balloon", "api_request"];
/// Seconds per target of `cargo xtask fuzz` without --seconds.
pub const DEFAULT_SECONDS: u64 = 30;
/// Seconds per target in `cargo xtask test`, unless HEARTH_FUZZ_SECONDS says otherwise.
const TEST_SECONDS: u64 = 20;
/// An input running longer than this is reported as a hang.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// Installs the nightly toolchain (minimal profile) and cargo-fuzz if missing.
pub fn ensure_tools() -> Result<()> {
    let toolchains = sh::output(cmd("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to install the nightly toolchain that cargo-fuzz uses")?;
    // `nightly-<host>`; a dated `nightly-2025-01-01-<host>` is not what `+nightly` runs.
    let has_nightly = toolchains
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| name.strip_prefix("nightly-").is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit())));
    if has_nightly {
        eprintln!("==> nightly toolchain: present");
    } else {
        eprintln!("==> installing the nightly toolchain (cargo-fuzz needs it)");
        sh::run(cmd("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("cannot install the nightly toolchain, without which the fuzz targets cannot be built")?;
    }
    if cargo_fuzz_version().is_some() {
        eprintln!("==> cargo-fuzz: present");
    } else {
        eprintln!("==> installing cargo-fuzz");
        sh::run(cmd("cargo").args(["install", "cargo-fuzz", "--locked"])).context("cannot install cargo-fuzz")?;
        if cargo_fuzz_version().is_none() {
            bail!("cargo-fuzz was installed but `cargo fuzz` does not run: is ~/.cargo/bin on PATH?");
        }
    }
    Ok(())
}

fn cargo_fuzz_version() -> Option<String> {
    let out = cmd("cargo").args(["fuzz", "--version"]).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `cargo xtask test`'s share: every target for HEARTH_FUZZ_SECONDS (default
/// 20) seconds each; 0 skips fuzzing.
pub fn test_seconds() -> Result<u64> {
    match std::env::var("HEARTH_FUZZ_SECONDS") {
        Ok(s) => s.trim().parse().with_context(|| format!("HEARTH_FUZZ_SECONDS={s:?} is not a number of seconds")),
        Err(_) => Ok(TEST_SECONDS),
    }
}

/// Builds the targets, runs each of `targets` (all when empty) for `seconds`,
/// prints what each did, and fails if any found something.
pub fn run(targets: &[String], seconds: u64) -> Result<()> {
    let targets = pick(targets)?;
    if seconds == 0 {
        eprintln!("==> fuzzing skipped (0 seconds)");
        return Ok(());
    }
    let console = |line: &str| println!("{line}");
    build(&console)?;
    run_built(&targets, seconds, &console)
}

/// The named targets, checked; all when none is named.
pub fn pick(targets: &[String]) -> Result<Vec<&'static str>> {
    if targets.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    targets
        .iter()
        .map(|t| {
            TARGETS
                .iter()
                .copied()
                .find(|k| k == t)
                .with_context(|| format!("no fuzz target {t}: the targets are {}", TARGETS.join(", ")))
        })
        .collect()
}

/// Installs the tools if missing and builds every target.
pub fn build(console: &(dyn Fn(&str) + Sync)) -> Result<()> {
    ensure_tools()?;
    console("==> building the fuzz targets (nightly, AddressSanitizer)");
    let started = Instant::now();
    sh::run_lines(cargo_fuzz(&paths::workspace().join("fuzz"), "build"), console)?;
    console(&format!("    built in {:.0}s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// Runs each of `targets`, already built, for `seconds`, each line of what
/// it says to `console`, and fails if any found something.
pub fn run_built(targets: &[&str], seconds: u64, console: &(dyn Fn(&str) + Sync)) -> Result<()> {
    let dir = paths::workspace().join("fuzz");
    let mut failed = Vec::new();
    for target in targets {
        let outcome = run_one(&dir, target, seconds, console)?;
        console(&format!("fuzz {target}: {}", outcome.describe()));
        if !outcome.clean() {
            console(&format!("---- from {} ----", outcome.log.display()));
            outcome.excerpt().lines().for_each(console);
            console("----");
            failed.push(*target);
        }
    }
    console(&format!("fuzz: {} passed, {} failed", targets.len() - failed.len(), failed.len()));
    if !failed.is_empty() {
        bail!("fuzzing found problems in: {} (inputs under fuzz/artifacts/, see docs/fuzzing.md)", failed.join(", "));
    }
    Ok(())
}

/// `cargo +nightly fuzz <sub>` in fuzz/, with a target dir of its own
/// (nightly and the sanitizer flags build everything differently): fuzz/target,
/// or `fuzz` under CARGO_TARGET_DIR where the caller keeps its builds
/// elsewhere (.ci/run keeps them warm across clones), whatever toolchain the
/// caller's cargo had.
fn cargo_fuzz(dir: &Path, sub: &str) -> std::process::Command {
    let mut c = cmd("cargo");
    c.args(["+nightly", "fuzz", sub]).current_dir(dir).env_remove("CARGO_TARGET_DIR").env_remove("RUSTUP_TOOLCHAIN");
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        c.arg("--target-dir").arg(PathBuf::from(t).join("fuzz"));
    }
    c
}

struct Outcome {
    log: PathBuf,
    text: String,
    success: bool,
    seconds: u64,
    corpus: usize,
}

impl Outcome {
    /// libFuzzer's closing "Done N runs in S second(s)".
    fn done(&self) -> Option<(u64, u64)> {
        let line = self.text.lines().rev().find(|l| l.starts_with("Done ") && l.contains(" runs in "))?;
        let mut words = line.split_whitespace();
        let runs = words.nth(1)?.parse().ok()?;
        let secs = words.nth(2)?.parse().ok()?;
        Some((runs, secs))
    }

    /// Inputs libFuzzer saved as findings ("Test unit written to ...").
    fn findings(&self) -> Vec<&str> {
        self.text.lines().filter_map(|l| l.split("Test unit written to ").nth(1)).map(str::trim).collect()
    }

    /// The last status line's execution count ("#12345 ..."), when there is no Done line.
    fn last_count(&self) -> Option<u64> {
        self.text.lines().rev().find_map(|l| l.strip_prefix('#')?.split_whitespace().next()?.parse().ok())
    }

    fn clean(&self) -> bool {
        self.success && self.findings().is_empty() && self.done().is_some()
    }

    fn describe(&self) -> String {
        let found = self.findings();
        let what = if found.is_empty() && self.success {
            "nothing found".to_string()
        } else if found.is_empty() {
            format!("FAILED without saving an input (see {})", self.log.display())
        } else {
            format!("FOUND {}", found.join(", "))
        };
        match (self.done(), self.last_count()) {
            (Some((runs, secs)), _) => {
                format!(
                    "{runs} executions in {secs} s ({}/s), corpus {} inputs, {what}",
                    runs / secs.max(1),
                    self.corpus
                )
            }
            (None, Some(n)) => format!("stopped after about {n} executions (of {} s asked), {what}", self.seconds),
            (None, None) => format!("no executions, {what}"),
        }
    }

    /// What went wrong: the first report (panic, sanitizer, libFuzzer) and
    /// cargo-fuzz's "Reproduce with" lines; the whole log is beside.
    fn excerpt(&self) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        let marks =
            ["panicked at", "ERROR: AddressSanitizer", "ERROR: libFuzzer", "ALARM:", "error[", "error:", "Error:"];
        let mut out = Vec::new();
        if let Some(i) = lines.iter().position(|l| marks.iter().any(|m| l.contains(m))) {
            out.extend_from_slice(&lines[i..lines.len().min(i + 6)]);
        }
        if let Some(i) = lines.iter().position(|l| l.starts_with("Reproduce with:")) {
            out.extend_from_slice(&lines[i..lines.len().min(i + 3)]);
        }
        if out.is_empty() {
            out.extend_from_slice(&lines[lines.len().saturating_sub(20)..]);
        }
        out.join("\n")
    }
}

fn run_one(dir: &Path, target: &str, seconds: u64, console: &(dyn Fn(&str) + Sync)) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let artifacts = dir.join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let log = artifacts.join(format!("{target}.log"));
    console(&format!("==> fuzzing {target} for {seconds}s (corpus {}, log {})", corpus.display(), log.display()));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut c = cargo_fuzz(dir, "run");
    c.arg(target)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .stdout(out.try_clone()?)
        .stderr(out);
    let status = c.status().with_context(|| format!("cannot start {c:?}"))?;
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let corpus_len = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
    Ok(Outcome { log, text, success: status.success(), seconds, corpus: corpus_len })
}
