//! `cargo xtask bench docker`: `docker run --rm IMAGE true` through Docker
//! 26 on the hearth runtime against the same command on runc, same dockerd,
//! image and host, in the same run; on Docker's default bridge network
//! (hooks, a veth mirrored into the VM: docs/networking.md) and with
//! `--network none`. hearth's VM is kept up by another container, so the
//! figures are a container's start and end, not a boot (`bench containerd`
//! measures the cold start). Medians of RUNS; the last lines are ratios.

use std::time::Instant;

use anyhow::{bail, Result};
use hearth_e2e::docker::{Dockerd, HEARTH, IMAGE};

use crate::bench::median_f64;

const RUNS: usize = 5;

fn timed(d: &Dockerd, args: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let o = d.docker(args);
    if !o.status.success() {
        bail!("docker {args:?} failed: {}", hearth_e2e::containerd::text(&o));
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

pub fn run() -> Result<()> {
    let env = hearth_e2e::Env::get();
    crate::bench::mount_cgroup_if_bare();
    let scratch = hearth_e2e::Scratch::new("bench-docker");
    let d = Dockerd::start(&env, &scratch);
    d.ok(&["run", "-d", "--name", "keeper", "--network", "none", "--runtime", HEARTH, IMAGE, "sleep", "100000"]);
    let mut rows = Vec::new();
    for (what, net) in [("bridge network", "bridge"), ("--network none", "none")] {
        let (mut hearth, mut runc) = (Vec::new(), Vec::new());
        // One of each first, not counted (image and network warm-up).
        for i in 0..=RUNS {
            let h = timed(&d, &["run", "--rm", "--network", net, "--runtime", HEARTH, IMAGE, "true"])?;
            let r = timed(&d, &["run", "--rm", "--network", net, "--runtime", "runc", IMAGE, "true"])?;
            if i > 0 {
                hearth.push(h);
                runc.push(r);
            }
        }
        rows.push((what, median_f64(hearth), median_f64(runc)));
    }
    d.ok(&["rm", "-f", "keeper"]);
    let title = format!("docker run --rm {IMAGE} true (hearth's VM running), median of {RUNS}:");
    crate::bench::print_against_runc(&title, &rows);
    Ok(())
}
