//! `cargo xtask e2e <suite>`: builds the suites of tests/e2e/ and runs one
//! where our VMM can run (see place.rs), each of its tests in a process of
//! its own so that every test's wall time is known.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::artefacts::{quote, Artefacts};
use crate::place;
use crate::sh::cmd;
use crate::{paths, testhost};

pub const SUITES: &[&str] = &[
    "boot",
    "devices",
    "agent-native",
    "agent",
    "containerd",
    "escape",
    "distro",
    "disks",
    "network",
    "docker",
    "cri",
];

/// Suites that need no VM: they run on this machine directly, as root.
const NATIVE: &[&str] = &["agent-native"];

/// The lines the suite script prints around each test (see [`script`]).
const START: &str = "HEARTH-E2E-START ";
const END: &str = "HEARTH-E2E-END ";
const RERUN: &str = "HEARTH-E2E-RERUN ";

/// Builds every suite's test binary in one cargo call and returns each
/// suite's executable.
pub fn build_all() -> Result<HashMap<String, String>> {
    let mut c = cmd("cargo");
    c.args(["test", "--release", "-p", "hearth-e2e", "--no-run"]);
    for s in SUITES {
        c.args(["--test", s]);
    }
    let out = c
        .args(["--message-format", "json-render-diagnostics"])
        .current_dir(paths::workspace())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("building the e2e suites failed");
    }
    let exes: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .filter_map(|v| Some((v["target"]["name"].as_str()?.to_string(), v["executable"].as_str()?.to_string())))
        .collect();
    if let Some(s) = SUITES.iter().find(|s| !exes.contains_key(**s)) {
        bail!("cargo did not report the {s} suite's test executable");
    }
    Ok(exes)
}

/// What one test of a suite did.
#[derive(Clone, Debug)]
pub struct TestTime {
    pub name: String,
    pub passed: bool,
    pub secs: f64,
    /// It ran a second time after the test host stalled during the first.
    pub rerun: bool,
}

/// What a suite did: its wall time (the test host's boot included) and each
/// test's.
#[derive(Clone, Debug)]
pub struct SuiteReport {
    pub suite: String,
    pub secs: f64,
    pub tests: Vec<TestTime>,
    /// Why the suite as a whole failed, beyond its tests (a hang, a test
    /// host that died, a test that never ended).
    pub error: Option<String>,
}

impl SuiteReport {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.tests.iter().all(|t| t.passed)
    }
}

/// The script that runs each test (those matching `filter`) in a process of
/// its own, one after the other, marking where each starts and ends. It
/// exits non-zero if any failed.
///
/// Each test prints as it goes (`--nocapture`), so a test that hangs has
/// already shown how far it got; and each has a guard of its own
/// (`per_test` s), past which it is killed, the processes it left are
/// listed with where they wait, and the suite goes on with the next test.
fn script(exe: &str, filter: Option<&str>, per_test: u64) -> String {
    let exe = quote(exe);
    let filter = filter.map(quote).unwrap_or_default();
    format!(
        r#"tests=$({exe} --list --format=terse {filter} | sed -n 's/: test$//p')
if [ -z "$tests" ]; then echo "no test of this suite matches {filter}"; exit 1; fi
failed=0
for t in $tests; do
    printf '\n{START}%s\n' "$t"
    for attempt in 1 2; do
        stalls=$(dmesg | grep -c 'soft lockup')
        timeout --kill-after=20 {per_test} {exe} --exact "$t" --test-threads=1 --color=never --nocapture
        rc=$?
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "!!! $t did not end within {per_test} s and was killed; what it left running:"
            ps --ppid 2 -p 2 -N -o pid,ppid,etime,stat,wchan:32,comm | tail -n 40
            # What it started would otherwise hold the test host's memory.
            for p in hearth-vmm virtiofsd containerd-shim containerd; do pkill -KILL -x "$p"; done
        fi
        [ "$rc" -eq 0 ] && break
        # QEMU's emulation now and then stops the test host's one CPU for
        # minutes (its kernel then reports a soft lockup; docs/testing.md):
        # a test failed across such a stall runs once more, said loudly.
        [ "$(dmesg | grep -c 'soft lockup')" -gt "$stalls" ] || break
        [ "$attempt" -eq 1 ] || break
        echo "!!! the test host's CPU stalled during $t:"
        dmesg | grep 'soft lockup' | tail -n 1
        echo "!!! an emulation fault, not the test's: running $t once more"
        printf '\n{RERUN}%s\n' "$t"
    done
    printf '\n{END}%s %s\n' "$t" "$rc"
    [ "$rc" -eq 0 ] || failed=1
done
exit $failed
"#
    )
}

/// Memory (MiB), hang guard (s) of a suite's test host, and the guard (s) of
/// each of its tests.
fn limits(suite: &str) -> (u64, u64, u64) {
    // The distro suite keeps two distros (root filesystems, image layers and
    // an export in the test host's memory) and a VM of 1 GiB; the disks
    // suite unpacks Debian and keeps its disk image there. Their longest
    // test takes 380-520 s on a loaded machine; the others' under 200 s.
    if suite == "distro" || suite == "disks" {
        (6144, 2700, 1200)
    } else if suite == "network" {
        // Its NAT test downloads through the nested-emulated VM: 120-300 s.
        (2048, 1800, 1200)
    } else {
        (2048, 1800, 600)
    }
}

/// Runs one suite (its tests whose names contain `filter`), each line of its
/// output passed to `console`, and reports each test's time. A failing test
/// is in the report, not an error; an error is a suite that could not run.
pub fn run(
    suite: &str,
    exe: &str,
    filter: Option<&str>,
    artefacts: &Artefacts,
    console: &(dyn Fn(&str) + Sync),
) -> Result<SuiteReport> {
    if !SUITES.contains(&suite) {
        bail!("no e2e suite {suite:?}; the suites are: {}", SUITES.join(", "));
    }
    let started = Instant::now();
    let tests: Mutex<Vec<TestTime>> = Mutex::new(Vec::new());
    let current: Mutex<Option<(String, Instant)>> = Mutex::new(None);
    let reruns: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let marks = |line: &str| {
        if let Some(name) = line.strip_prefix(START) {
            *current.lock().unwrap() = Some((name.trim().to_string(), Instant::now()));
        } else if let Some(name) = line.strip_prefix(RERUN) {
            reruns.lock().unwrap().push(name.trim().to_string());
        } else if let Some(rest) = line.strip_prefix(END) {
            let (name, rc) = rest.trim().rsplit_once(' ').unwrap_or((rest.trim(), "1"));
            let secs = match current.lock().unwrap().take() {
                Some((n, t)) if n == name => t.elapsed().as_secs_f64(),
                _ => 0.0,
            };
            let passed = rc == "0";
            let rerun = reruns.lock().unwrap().iter().any(|r| r == name);
            tests.lock().unwrap().push(TestTime { name: name.to_string(), passed, secs, rerun });
            let again = if rerun { " (run twice: the test host stalled in the first)" } else { "" };
            console(&format!("---- {suite}: {name} {} in {secs:.1} s{again}", if passed { "ok" } else { "FAILED" }));
            return;
        }
        console(line);
    };
    let (memory_mib, guard, per_test) = limits(suite);
    let script = script(exe, filter, per_test);
    let status = if NATIVE.contains(&suite) {
        // Native suites need no VM: on this machine, as root, whatever KVM is.
        place::run_here(&script, artefacts, &marks)
    } else {
        let step = testhost::Run {
            name: &format!("e2e-{suite}"),
            script,
            memory_mib,
            timeout: Duration::from_secs(guard),
            console: &marks,
        };
        place::run_script(artefacts, step)
    };
    let mut tests = tests.into_inner().unwrap();
    let mut error = None;
    if let Some((name, t)) = current.into_inner().unwrap() {
        // The suite ended inside a test: the hang guard or a dead test host.
        tests.push(TestTime { name: name.clone(), passed: false, secs: t.elapsed().as_secs_f64(), rerun: false });
        error = Some(format!("the suite ended during {name}"));
    }
    match status {
        Ok(0) => {}
        // The failing tests say why.
        Ok(_) if error.is_none() && tests.iter().any(|t| !t.passed) => {}
        Ok(code) => error = error.or(Some(format!("exit status {code}"))),
        Err(e) => error = Some(format!("{e:#}")),
    }
    if tests.is_empty() {
        error = Some(match filter {
            Some(f) => format!("no test matches {f:?}"),
            None => "it ran no test".into(),
        });
    }
    Ok(SuiteReport { suite: suite.to_string(), secs: started.elapsed().as_secs_f64(), tests, error })
}

/// `cargo xtask e2e <suite> [filter]`: one suite, output on stdout, with
/// each test's time at the end.
pub fn run_one(suite: &str, filter: Option<&str>, artefacts: &Artefacts) -> Result<()> {
    if !SUITES.contains(&suite) {
        bail!("no e2e suite {suite:?}; the suites are: {}", SUITES.join(", "));
    }
    let exes = build_all()?;
    let report = run(suite, &exes[suite], filter, artefacts, &testhost::stdout_console)?;
    crate::testrun::print_suites(std::slice::from_ref(&report));
    if !report.passed() {
        bail!("e2e suite {suite} failed{}", report.error.map(|e| format!(": {e}")).unwrap_or_default());
    }
    Ok(())
}
