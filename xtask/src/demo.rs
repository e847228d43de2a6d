//! `cargo xtask demo`: the main job. containerd runs a container with the
//! runtime `io.containerd.hearth.v2`; the shim boots the utility VM on first
//! use, and the container prints the guest kernel beside the host's.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hearth_e2e::containerd::{text, Containerd, IMAGE, RUNTIME};

use crate::artefacts::Artefacts;
use crate::place;
use crate::sh;

pub fn run(artefacts: &Artefacts) -> Result<()> {
    let host = sh::output(Command::new("uname").arg("-r"))?;
    println!("host kernel (this machine): {host}");
    let me = std::env::current_exe()?.display().to_string();
    place::run_ok("demo", artefacts, &[me, "demo-inner".into()], 2048, Duration::from_secs(900))
}

/// Runs where our VMM can run: a containerd of its own, the busybox image,
/// one container through the hearth shim.
pub fn inner() -> Result<()> {
    let env = hearth_e2e::Env::get();
    let here = sh::output(Command::new("uname").arg("-r"))?;
    let hostname = sh::output(Command::new("uname").arg("-n"))?;
    let scratch = hearth_e2e::Scratch::new("demo");
    println!("==> containerd with the hearth runtime, image {IMAGE} imported");
    let c = Containerd::start(&env, &scratch, 5);
    println!("==> ctr run --rm --runtime {RUNTIME} {IMAGE} demo ...   (the shim boots the utility VM)");
    let started = Instant::now();
    let o =
        c.run("demo", &[], &["sh", "-c", "echo \"guest kernel: $(uname -r), $(nproc) vCPUs, hostname $(hostname)\""]);
    if !o.status.success() {
        bail!("the container failed: {}", text(&o));
    }
    print!("{}", String::from_utf8_lossy(&o.stdout));
    println!("    (container done {:.1} s after ctr started, VM boot included)", started.elapsed().as_secs_f64());
    println!();
    if hostname == "hearth-testhost" {
        println!("test host kernel (QEMU, emulated AMD SVM): {here}");
    } else {
        println!("host kernel: {here}");
    }
    let guest = String::from_utf8_lossy(&o.stdout);
    let guest = guest.lines().find_map(|l| l.strip_prefix("guest kernel: ")).unwrap_or("(not reported)");
    println!("guest kernel (the hearth utility VM, through containerd): {guest}");
    Ok(())
}
