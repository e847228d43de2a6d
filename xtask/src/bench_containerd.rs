//! `cargo xtask bench containerd`: `ctr run --rm ... true` on the hearth
//! runtime, cold (no VM: the shim boots one) and warm (a VM already running,
//! kept up by another container), against `ctr run --rm` with runc
//! (io.containerd.runc.v2) on the same containerd, image and host, in the same
//! run. Medians of RUNS runs; the last lines are the ratios.

use std::time::Duration;

use anyhow::Result;
use hearth_e2e::containerd::{wait_until, Containerd, IMAGE, RUNTIME};

use crate::bench::{median_f64, timed_ctr};

const RUNS: usize = 5;

fn timed_run(c: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    timed_ctr(c, &["run", "--rm", "--runtime", runtime, IMAGE, id, "true"])
}

pub fn run() -> Result<()> {
    let env = hearth_e2e::Env::get();
    crate::bench::mount_cgroup_if_bare();
    let scratch = hearth_e2e::Scratch::new("bench-containerd");
    // VMs idle out after a second, so that each cold run finds none.
    let c = Containerd::start(&env, &scratch, 1);
    let no_vm = |c: &Containerd| {
        wait_until("the idle VM gone", Duration::from_secs(120), || c.vmm_pids().is_empty());
        wait_until("the shim gone", Duration::from_secs(60), || {
            hearth_e2e::containerd::pids_matching("containerd-shim-hearth-v2", "").is_empty()
        });
    };
    let mut cold = Vec::new();
    for i in 0..RUNS {
        no_vm(&c);
        cold.push(timed_run(&c, RUNTIME, &format!("cold-{i}"))?);
    }
    // Warm: one long-running container keeps the VM up.
    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "keeper", "sleep", "100000"]);
    let (mut warm, mut runc) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        warm.push(timed_run(&c, RUNTIME, &format!("warm-{i}"))?);
        runc.push(timed_run(&c, "io.containerd.runc.v2", &format!("runc-{i}"))?);
    }
    c.ok(&["task", "kill", "-s", "SIGKILL", "keeper"]);
    let (cold, warm, runc) = (median_f64(cold), median_f64(warm), median_f64(runc));
    println!("ctr run --rm {IMAGE} true, median of {RUNS}:");
    println!("  hearth cold (VM boot included) {cold:.0} ms");
    println!("  hearth warm (VM running)       {warm:.0} ms");
    println!("  runc (reference)               {runc:.0} ms");
    println!("ratio hearth cold/runc {:.2}", cold / runc);
    println!("ratio hearth warm/runc {:.2}", warm / runc);
    Ok(())
}
