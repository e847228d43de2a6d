//! `cargo xtask demo`: boot the utility VM and show the guest's kernel
//! beside the host's.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::artefacts::Artefacts;
use crate::place;
use crate::sh;

pub fn run(artefacts: &Artefacts) -> Result<()> {
    let host = sh::output(Command::new("uname").arg("-r"))?;
    println!("host kernel (this machine): {host}");
    let me = std::env::current_exe()?.display().to_string();
    place::run_ok("demo", artefacts, &[me, "demo-inner".into()], 1024, Duration::from_secs(600))
}

/// Runs in the place our VMM can run: boots the VM with its console on our
/// stdout, then sums up.
pub fn inner() -> Result<()> {
    let a = Artefacts::from_env()?;
    let here = sh::output(Command::new("uname").arg("-r"))?;
    let hostname = sh::output(Command::new("uname").arg("-n"))?;
    let out = Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.vmlinux)
        .arg("--initramfs")
        .arg(&a.boot_initramfs)
        .args(["--cpus", "2", "--memory", "256"])
        .output()?;
    let console = String::from_utf8_lossy(&out.stdout);
    print!("{console}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("hearth-vmm failed ({})", out.status);
    }
    let guest = console.lines().find_map(|l| l.trim_end().strip_prefix("HEARTH-UNAME: ")).unwrap_or("(not reported)");
    println!();
    if hostname == "hearth-testhost" {
        println!("test host kernel (QEMU, emulated AMD SVM): {here}");
    } else {
        println!("host kernel: {here}");
    }
    println!("guest kernel (hearth-vmm, 2 vCPUs, 256 MiB): {guest}");
    Ok(())
}
