//! `cargo xtask setup`: everything the project needs on a fresh Debian
//! machine, idempotent, heavy artefacts cached under `~/.cache/hearth/`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use hearth_rootfs::progress::Progress;

use crate::sh::{self, cmd};
use crate::{guest, kernel, paths, testhost};

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
    crate::apt::ensure()?;
    crate::apt::unpacked(&crate::apt::CONTAINERD_CRI)?;
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
