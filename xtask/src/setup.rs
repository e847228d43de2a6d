//! `cargo xtask setup`: everything the project needs on a fresh Debian
//! machine, idempotent, heavy artefacts cached under `~/.cache/hearth/`.

use anyhow::{Context, Result};

use crate::sh::{self, cmd};
use crate::{guest, kernel, paths, testhost};

/// Debian packages, each with why it is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("linux-source-6.12", "source of the tuned guest kernel"),
    ("build-essential", "kernel build"),
    ("flex", "kernel build"),
    ("bison", "kernel build"),
    ("bc", "kernel build"),
    ("libelf-dev", "kernel build (objtool)"),
    ("libssl-dev", "kernel build"),
    ("lz4", "the bzImage is lz4-compressed for a fast boot"),
    ("xz-utils", "unpacking the kernel source"),
    ("busybox-static", "userland of the boot initramfs and of the test host"),
    ("qemu-system-x86", "the test host, and the reference VMM of `bench boot`"),
    ("e2fsprogs", "ext4 images for the guest's disks (mke2fs -d, debugfs)"),
];

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            sh::output(cmd("dpkg-query").args(["-W", "-f", "${db:Status-Status}", p]))
                .map(|s| s != "installed")
                .unwrap_or(true)
        })
        .collect()
}

pub fn apt() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        eprintln!("==> Debian packages: all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    eprintln!("==> installing Debian packages: {}", missing.join(" "));
    sh::run(cmd("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update (setup needs root)")?;
    sh::run(
        cmd("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install (setup needs root)")
}

pub fn run() -> Result<()> {
    apt()?;
    std::fs::create_dir_all(paths::cache())?;
    kernel::ensure()?;
    guest::ensure_boot_initramfs()?;
    // The test host is needed wherever /dev/kvm is not hardware-backed, and
    // HEARTH_TESTHOST=always asks for it anywhere: prepare it always (cheap).
    testhost::ensure_assets()?;
    sh::run(cmd("cargo").args(["build", "--release", "--workspace"]).current_dir(paths::workspace()))?;
    eprintln!("==> setup complete; e2e suites will run {}", testhost::describe(testhost::place()));
    Ok(())
}
