//! `cargo xtask setup`: everything the project needs on a fresh Debian
//! machine, idempotent, heavy artefacts cached under `~/.cache/hearth/`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use hearth_rootfs::progress::Progress;

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
    ("runc", "the reference that `cargo xtask bench agent` measures hearth-agent against"),
    ("containerd", "containerd and ctr, which drive the shim (e2e containerd, the demo)"),
    ("qemu-system-x86", "the test host, and the reference VMM of `bench boot`"),
    ("e2fsprogs", "ext4 images for the guest's disks (mke2fs -d, debugfs)"),
    ("libseccomp-dev", "building virtiofsd, and libseccomp.a for the static hearth-agent"),
    ("libcap-ng-dev", "building virtiofsd"),
    ("iproute2", "taps for virtio-net in the e2e suites"),
    ("mmdebstrap", "the Debian test image (docker.io/hearth/debian) and the distros, made as root from deb.debian.org"),
    (
        "protobuf-compiler",
        "protoc, which generates containerd's gRPC API bindings for the hearth CLI (containerd-client)",
    ),
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

/// virtiofsd serves virtio-fs shares; Debian 12 has no package of it, so
/// it is built from crates.io into ~/.cargo/bin.
pub fn virtiofsd() -> Result<PathBuf> {
    if let Some(p) = find_virtiofsd() {
        eprintln!("==> virtiofsd: {}", p.display());
        return Ok(p);
    }
    let p = Progress::new("building virtiofsd from crates.io (cargo install virtiofsd, ~4 min on 2 cores)");
    sh::run(cmd("cargo").args(["install", "--locked", "virtiofsd", "--version", VIRTIOFSD_VERSION]))?;
    p.finish("done");
    find_virtiofsd().context("cargo install virtiofsd succeeded but no virtiofsd binary was found in ~/.cargo/bin")
}

const VIRTIOFSD_VERSION: &str = "1.14.0";

pub fn find_virtiofsd() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = home.join("bin/virtiofsd");
    p.is_file().then_some(p)
}

pub fn run() -> Result<()> {
    apt()?;
    virtiofsd()?;
    std::fs::create_dir_all(paths::cache())?;
    kernel::ensure()?;
    guest::ensure_boot_initramfs()?;
    // The runtime's image: hearth-agent, static, as the initramfs's /init.
    let agent = crate::artefacts::build_static_agent()?;
    guest::ensure_agent_initramfs(&agent)?;
    // The test host is needed wherever /dev/kvm is not hardware-backed, and
    // HEARTH_TESTHOST=always asks for it anywhere: prepare it always (cheap).
    testhost::ensure_assets()?;
    crate::fuzz::ensure_tools()?;
    // The Debian image and the distro suite's tree download from the mirror:
    // here, not at test time.
    crate::images::ensure_debian(&crate::images::DEBIAN)?;
    crate::images::ensure_suite_distro()?;
    sh::run(cmd("cargo").args(["build", "--release", "--workspace"]).current_dir(paths::workspace()))?;
    eprintln!("==> setup complete; e2e suites will run {}", testhost::describe(testhost::place()));
    Ok(())
}
