//! `cargo xtask bench cri`: the CRI's calls as the kubelet makes them, on
//! containerd 1.7 with the hearth runtime handler against runc, same
//! containerd, image and host, in the same run (tests/src/cri.rs):
//!
//! - a pod to running: RunPodSandbox, CreateContainer and StartContainer
//!   of a `sleep` container, until its status says running;
//! - ExecSync of `sh -c true` in it, the round trip (median of EXECS).
//!   Not a bare `true`: in the test host, runc 1.1.5's exec process finds
//!   itself in the test host's initramfs root rather than the container's
//!   (`ls /` there shows its /init), where busybox has sh but no `true`;
//!   hearth's exec is in the container's root;
//! - the pod's end: StopPodSandbox and RemovePodSandbox.
//!
//! hearth's VM is kept up by another pod, so the figures are a pod's, not
//! a boot (`bench containerd` measures the cold start). Medians of RUNS;
//! the last lines are ratios.

use std::time::Instant;

use anyhow::Result;
use hearth_e2e::cri::{self, Cri, HEARTH, RUNC};

use crate::bench::median_f64;

const RUNS: usize = 5;
const EXECS: usize = 10;

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

/// One pod on `handler`: the times to running, of an ExecSync and to
/// removed.
fn one_pod(c: &Cri, handler: &str, name: &str) -> (f64, f64, f64) {
    eprintln!("==> bench cri: a pod on {handler}");
    let config = c.pod_config(name, cri::default_namespaces());
    let started = Instant::now();
    let pod = c.run_pod(&config, handler);
    let mut sleeper = Cri::container_config("sleeper", &["sleep", "100000"]);
    // The kubelet gives each container its pod's namespace modes.
    sleeper.linux.as_mut().unwrap().security_context = Some(cri::api::LinuxContainerSecurityContext {
        namespace_options: Some(cri::default_namespaces()),
        ..Default::default()
    });
    let id = c.run(&pod, &config, sleeper);
    assert_eq!(c.status(&id).state, cri::api::ContainerState::ContainerRunning as i32);
    let to_running = ms(started);
    let execs = (0..EXECS)
        .map(|_| {
            let t = Instant::now();
            c.exec_ok(&id, &["sh", "-c", "true"]);
            ms(t)
        })
        .collect();
    let t = Instant::now();
    c.remove_pod(&pod);
    (to_running, median_f64(execs), ms(t))
}

pub fn run() -> Result<()> {
    let env = hearth_e2e::Env::get();
    crate::bench::mount_cgroup_if_bare();
    let scratch = hearth_e2e::Scratch::new("bench-cri");
    let c = Cri::start(&env, &scratch);
    let keeper_config = c.pod_config("keeper", cri::default_namespaces());
    let keeper = c.run_pod(&keeper_config, HEARTH);
    let mut samples: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    // One of each first, not counted (the pause and busybox snapshots).
    for i in 0..=RUNS {
        for (k, handler) in [HEARTH, RUNC].iter().enumerate() {
            let s = one_pod(&c, handler, &format!("bench-{handler}-{i}"));
            if i > 0 {
                samples[k].push(s);
            }
        }
    }
    c.remove_pod(&keeper);
    let col = |k: usize, f: fn(&(f64, f64, f64)) -> f64| median_f64(samples[k].iter().map(f).collect());
    let rows = [
        ("pod to running", col(0, |s| s.0), col(1, |s| s.0)),
        ("ExecSync sh -c true", col(0, |s| s.1), col(1, |s| s.1)),
        ("pod stop+remove", col(0, |s| s.2), col(1, |s| s.2)),
    ];
    let title = format!("CRI on containerd 1.7, hearth's VM running, median of {RUNS} pods ({EXECS} execs each):");
    crate::bench::print_against_runc(&title, &rows);
    Ok(())
}
