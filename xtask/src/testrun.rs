//! `cargo xtask test`: setup, one build of what the suites need, then the
//! jobs in lanes side by side: every e2e suite, the unit tests and the fuzz
//! targets. On our 2-core machines that is two at once: a test host is one
//! TCG thread, so the longest suite runs beside everything else, and the
//! unit tests' and fuzz targets' compiling fills the other core. Every
//! phase, job and test is timed; the closing table is checked against CI's
//! budget.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::artefacts::Artefacts;
use crate::e2e::{self, SuiteReport};
use crate::sh::{self, cmd};
use crate::{fuzz, paths, setup};

/// A whole `cargo xtask test` with warm caches must stay within this (CI
/// kills a run at 90 minutes; the rest is the margin for a fresh machine's
/// setup and a slow day).
pub const BUDGET_SECS: f64 = 3600.0;

/// Each job's expected seconds in the test host (measured, docs/testing.md):
/// lanes take the longest first, so that the long suites do not start last.
const EXPECTED_SECS: &[(&str, u64)] = &[
    ("distro", 560),
    ("disks", 420),
    ("fuzz", 290),
    ("containerd", 170),
    ("escape", 160),
    ("network", 240),
    ("docker", 420),
    ("cri", 240),
    ("unit", 110),
    ("devices", 95),
    ("agent", 27),
    ("boot", 19),
    ("agent-native", 3),
];

fn expected(job: &str) -> u64 {
    EXPECTED_SECS.iter().find(|(j, _)| *j == job).map(|(_, s)| *s).unwrap_or(600)
}

/// How many jobs run at once: `HEARTH_TEST_LANES`, else one per core (at
/// most 4: a test host takes 2 to 6 GiB).
fn lanes() -> Result<usize> {
    match std::env::var("HEARTH_TEST_LANES") {
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("HEARTH_TEST_LANES={s:?} is not a number of lanes (1 or more)"),
        },
        Err(_) => Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4)),
    }
}

struct Phase {
    name: String,
    secs: f64,
}

fn timed<T>(phases: &mut Vec<Phase>, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    eprintln!("==> phase: {name}");
    let r = f();
    let secs = started.elapsed().as_secs_f64();
    eprintln!("==> phase {name}: {secs:.0} s");
    phases.push(Phase { name: name.to_string(), secs });
    r
}

/// What a job of the lanes ended with.
enum Outcome {
    Suite(SuiteReport),
    /// The unit tests or the fuzz targets.
    Other {
        job: String,
        secs: f64,
        error: Option<String>,
    },
}

impl Outcome {
    fn name(&self) -> &str {
        match self {
            Outcome::Suite(r) => &r.suite,
            Outcome::Other { job, .. } => job,
        }
    }
    fn passed(&self) -> bool {
        match self {
            Outcome::Suite(r) => r.passed(),
            Outcome::Other { error, .. } => error.is_none(),
        }
    }
}

/// Where each job's whole output is kept, for the replay of a failure.
fn log_dir() -> PathBuf {
    paths::target_dir().join("hearth-test")
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let mut phases = Vec::new();
    timed(&mut phases, "setup", setup::run)?;
    let fuzz_secs = fuzz::test_seconds()?;
    let (artefacts, exes) = timed(&mut phases, "build (binaries, images, suites)", || {
        let a = Artefacts::build()?;
        Ok((a, e2e::build_all()?))
    })?;

    let mut jobs: Vec<&str> = e2e::SUITES.to_vec();
    jobs.push("unit");
    if fuzz_secs > 0 {
        jobs.push("fuzz");
    } else {
        eprintln!("==> fuzzing skipped (HEARTH_FUZZ_SECONDS=0)");
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(expected(j)));
    let lanes = lanes()?.min(jobs.len());
    let queue = Mutex::new(jobs.into_iter().collect::<VecDeque<_>>());
    let outcomes = Mutex::new(Vec::new());
    std::fs::create_dir_all(log_dir())?;
    let phase_name = format!("e2e suites, unit tests and fuzzing, {lanes} at a time");
    timed(&mut phases, &phase_name, || {
        std::thread::scope(|s| {
            for _ in 0..lanes {
                s.spawn(|| loop {
                    let Some(job) = queue.lock().unwrap().pop_front() else { return };
                    let outcome = run_job(job, &artefacts, &exes, fuzz_secs);
                    outcomes.lock().unwrap().push(outcome);
                });
            }
        });
        Ok(())
    })?;
    let outcomes = outcomes.into_inner().unwrap();

    // Failures last, whole, so that the end of the output (all CI keeps)
    // shows them.
    for o in outcomes.iter().filter(|o| !o.passed()) {
        replay(o.name());
    }
    let total = started.elapsed().as_secs_f64();
    print_table(&phases, &outcomes, total);
    // Every e2e test counts; a suite that failed outside its tests (a hang,
    // a dead test host) counts once more. Fuzzing said its own line above.
    let (mut passed, mut failed) = (0, 0);
    for r in outcomes.iter().filter_map(|o| if let Outcome::Suite(r) = o { Some(r) } else { None }) {
        passed += r.tests.iter().filter(|t| t.passed).count();
        failed += r.tests.iter().filter(|t| !t.passed).count();
        failed += usize::from(r.error.is_some() && r.tests.iter().all(|t| t.passed));
    }
    let broken: Vec<&str> = outcomes.iter().filter(|o| !o.passed()).map(|o| o.name()).collect();
    println!("e2e: {passed} passed, {failed} failed");
    if !broken.is_empty() {
        bail!("failed: {}", broken.join(", "));
    }
    Ok(())
}

fn run_job(
    job: &str,
    artefacts: &Artefacts,
    exes: &std::collections::HashMap<String, String>,
    fuzz_secs: u64,
) -> Outcome {
    let log = Mutex::new(File::create(log_dir().join(format!("{job}.log"))).ok());
    let console = |line: &str| {
        if let Some(f) = log.lock().unwrap().as_mut() {
            let _ = writeln!(f, "{line}");
        }
        // One line at a time under stdout's lock: lanes interleave by lines.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[{job}] {line}");
        let _ = out.flush();
    };
    let started = Instant::now();
    let other = match job {
        "unit" => Some(unit_tests(&console)),
        "fuzz" => Some(fuzz::build(&console).and_then(|_| fuzz::run_built(&fuzz::pick(&[])?, fuzz_secs, &console))),
        _ => None,
    };
    if let Some(r) = other {
        let (secs, error) = (started.elapsed().as_secs_f64(), r.err().map(|e| format!("{e:#}")));
        console(&format!("==> {job}: {} in {secs:.0} s", if error.is_none() { "passed" } else { "FAILED" }));
        return Outcome::Other { job: job.to_string(), secs, error };
    }
    let report = e2e::run(job, &exes[job], None, artefacts, &console).unwrap_or_else(|e| SuiteReport {
        suite: job.to_string(),
        secs: started.elapsed().as_secs_f64(),
        tests: Vec::new(),
        error: Some(format!("{e:#}")),
    });
    console(&format!("==> suite {job}: {} in {:.0} s", if report.passed() { "passed" } else { "FAILED" }, report.secs));
    Outcome::Suite(report)
}

/// Unit and integration tests of every crate; the e2e suites' targets run
/// in their own jobs, where KVM can run them.
fn unit_tests(console: &(dyn Fn(&str) + Sync)) -> Result<()> {
    let ws = paths::workspace();
    let mut c = cmd("cargo");
    c.args(["test", "--release", "--workspace", "--exclude", "hearth-e2e"]).current_dir(&ws);
    sh::run_lines(c, console)?;
    let mut c = cmd("cargo");
    c.args(["test", "--release", "-p", "hearth-e2e", "--lib"]).current_dir(&ws);
    sh::run_lines(c, console)
}

/// Prints the end of a failed job's log again.
fn replay(job: &str) {
    const LINES: usize = 200;
    let path = log_dir().join(format!("{job}.log"));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    println!("\n======== {job} FAILED: its last {LINES} lines (all of it: {}) ========", path.display());
    for l in &lines[lines.len().saturating_sub(LINES)..] {
        println!("{l}");
    }
    println!("======== end of {job} ========\n");
}

fn mins(secs: f64) -> String {
    format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
}

/// Each suite's and test's wall time.
pub fn print_suites(reports: &[SuiteReport]) {
    for r in reports {
        let state = if r.passed() { "ok" } else { "FAILED" };
        println!("  suite {:<72} {:>7.0} s  {state}", r.suite, r.secs);
        for t in &r.tests {
            let state = if t.passed { "ok" } else { "FAILED" };
            let again = if t.rerun { " (run twice: test host stalled)" } else { "" };
            println!("      {:<72} {:>7.1} s  {state}{again}", t.name, t.secs);
        }
        if let Some(e) = &r.error {
            println!("      ({e})");
        }
    }
}

fn print_table(phases: &[Phase], outcomes: &[Outcome], total: f64) {
    println!("\n==> wall times");
    for p in phases {
        println!("  {:<78} {:>7.0} s", p.name, p.secs);
    }
    let mut reports = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Suite(r) => reports.push(r.clone()),
            Outcome::Other { job, secs, error } => {
                let state = if error.is_some() { "FAILED" } else { "ok" };
                println!("  {job:<78} {secs:>7.0} s  {state}")
            }
        }
    }
    reports.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    print_suites(&reports);
    println!("  {:<78} {:>7.0} s  ({}, budget {})", "total", total, mins(total), mins(BUDGET_SECS));
    if total > BUDGET_SECS {
        let msg = format!(
            "WARNING: cargo xtask test took {} of its {} budget: CI stops at 90 minutes, and a fresh machine's \
             setup adds about 20. Make the slow suites above faster or run more of them at once.",
            mins(total),
            mins(BUDGET_SECS)
        );
        let bar = "!".repeat(78);
        println!("{bar}\n{msg}\n{bar}");
        eprintln!("{bar}\n{msg}\n{bar}");
    }
}
