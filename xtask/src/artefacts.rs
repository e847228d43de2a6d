//! The built things a suite, benchmark or demo uses, and how they travel to
//! the place where it runs (environment variables, since the test host sees
//! the same paths as this machine).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::sh::cmd;
use crate::{guest, kernel, paths, sh};

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

pub struct Artefacts {
    pub vmm: PathBuf,
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub kernel_release: String,
    pub boot_initramfs: PathBuf,
    /// Static guest-side test programs (tests/guest-tools).
    pub guest_tool: PathBuf,
    /// hearth-agent, statically linked.
    pub agent: PathBuf,
    /// The initramfs whose /init is hearth-agent.
    pub agent_initramfs: PathBuf,
    /// containerd-shim-hearth-v2.
    pub shim: PathBuf,
    /// The busybox OCI image archive.
    pub busybox_image: PathBuf,
    /// The pause image archive (a CRI pod's sandbox).
    pub pause_image: PathBuf,
    /// containerd 1.7's binaries (Debian 13's, unpacked beside Debian 12's
    /// 1.6), which the cri suite runs.
    pub containerd_cri: PathBuf,
    /// The Debian minbase OCI image archive (docker.io/hearth/debian:bookworm).
    pub debian_image: PathBuf,
    pub virtiofsd: PathBuf,
    /// The `hearth` CLI.
    pub cli: PathBuf,
    /// hearth's cache directory.
    pub cache: PathBuf,
}

impl Artefacts {
    /// Builds the release binaries and finds the cached images (`cargo xtask
    /// setup` makes those).
    pub fn build() -> Result<Artefacts> {
        sh::run(
            cmd("cargo")
                .args(["build", "--release", "-p", "hearth-vmm", "-p", "containerd-shim-hearth-v2", "-p", "hearth-cli"])
                .current_dir(paths::workspace()),
        )?;
        // Guest programs run on the guest's bare initramfs: link them
        // statically. An explicit --target keeps RUSTFLAGS away from build
        // scripts and proc macros.
        sh::run(
            cmd("cargo")
                .args(["build", "--release", "-p", "hearth-guest-tools", "--target", GUEST_TARGET])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .current_dir(paths::workspace()),
        )?;
        let agent = build_static_agent()?;
        let agent_initramfs = guest::ensure_agent_initramfs(&agent)?;
        let k = kernel::find()?;
        let guest_tool = paths::target_dir().join(GUEST_TARGET).join("release/hearth-guest-tool");
        let busybox_image = crate::images::ensure_busybox(&guest_tool)?;
        let pause_image = crate::images::ensure_pause(&guest_tool)?;
        let debian_image = crate::images::ensure_debian(&crate::images::DEBIAN)?;
        crate::images::ensure_suite_distro()?;
        let containerd_cri = crate::apt::unpacked(&crate::apt::CONTAINERD_CRI)?;
        Ok(Artefacts {
            vmm: paths::release_bin("hearth-vmm"),
            vmlinux: k.vmlinux,
            bzimage: k.bzimage,
            kernel_release: k.release,
            boot_initramfs: guest::find_boot_initramfs()?,
            guest_tool,
            agent,
            agent_initramfs,
            shim: paths::release_bin("containerd-shim-hearth-v2"),
            busybox_image,
            pause_image,
            containerd_cri,
            debian_image,
            virtiofsd: crate::setup::find_virtiofsd().context("virtiofsd is not installed: run `cargo xtask setup`")?,
            cli: paths::release_bin("hearth"),
            cache: paths::cache(),
        })
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HEARTH_VMM", self.vmm.display().to_string()),
            ("HEARTH_KERNEL_VMLINUX", self.vmlinux.display().to_string()),
            ("HEARTH_KERNEL_BZIMAGE", self.bzimage.display().to_string()),
            ("HEARTH_KERNEL_RELEASE", self.kernel_release.clone()),
            ("HEARTH_BOOT_INITRAMFS", self.boot_initramfs.display().to_string()),
            ("HEARTH_GUEST_TOOL", self.guest_tool.display().to_string()),
            ("HEARTH_AGENT", self.agent.display().to_string()),
            ("HEARTH_AGENT_INITRAMFS", self.agent_initramfs.display().to_string()),
            ("HEARTH_SHIM", self.shim.display().to_string()),
            ("HEARTH_BUSYBOX_IMAGE", self.busybox_image.display().to_string()),
            ("HEARTH_PAUSE_IMAGE", self.pause_image.display().to_string()),
            ("HEARTH_CONTAINERD_CRI", self.containerd_cri.display().to_string()),
            ("HEARTH_DEBIAN_IMAGE", self.debian_image.display().to_string()),
            ("HEARTH_VIRTIOFSD", self.virtiofsd.display().to_string()),
            ("HEARTH_CLI", self.cli.display().to_string()),
            ("HEARTH_CACHE", self.cache.display().to_string()),
        ]
    }

    /// The inverse of [`Artefacts::env`], inside the place a task runs.
    pub fn from_env() -> Result<Artefacts> {
        let get = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
        Ok(Artefacts {
            vmm: get("HEARTH_VMM")?.into(),
            vmlinux: get("HEARTH_KERNEL_VMLINUX")?.into(),
            bzimage: get("HEARTH_KERNEL_BZIMAGE")?.into(),
            kernel_release: get("HEARTH_KERNEL_RELEASE")?,
            boot_initramfs: get("HEARTH_BOOT_INITRAMFS")?.into(),
            guest_tool: get("HEARTH_GUEST_TOOL")?.into(),
            agent: get("HEARTH_AGENT")?.into(),
            agent_initramfs: get("HEARTH_AGENT_INITRAMFS")?.into(),
            shim: get("HEARTH_SHIM")?.into(),
            busybox_image: get("HEARTH_BUSYBOX_IMAGE")?.into(),
            pause_image: get("HEARTH_PAUSE_IMAGE")?.into(),
            containerd_cri: get("HEARTH_CONTAINERD_CRI")?.into(),
            debian_image: get("HEARTH_DEBIAN_IMAGE")?.into(),
            virtiofsd: get("HEARTH_VIRTIOFSD")?.into(),
            cli: get("HEARTH_CLI")?.into(),
            cache: get("HEARTH_CACHE")?.into(),
        })
    }

    /// A shell prologue exporting the environment, for the test host.
    pub fn shell_exports(&self) -> String {
        let mut s =
            String::from("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n");
        // Filters the caller set travel with the suite.
        for k in ["HEARTH_LOG", "HEARTH_AGENT_CASES"] {
            if let Ok(v) = std::env::var(k) {
                s.push_str(&format!("export {k}={}\n", quote(&v)));
            }
        }
        for (k, v) in self.env() {
            s.push_str(&format!("export {k}={}\n", quote(&v)));
        }
        s
    }
}

/// Builds hearth-agent as one static binary: it is the VM's /init, alone on
/// its initramfs. libseccomp is linked statically from Debian's libseccomp.a.
pub fn build_static_agent() -> Result<PathBuf> {
    sh::run(
        cmd("cargo")
            .args(["build", "--release", "-p", "hearth-agent", "--target", GUEST_TARGET])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("LIBSECCOMP_LINK_TYPE", "static")
            .env("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu")
            .current_dir(paths::workspace()),
    )?;
    Ok(paths::target_dir().join(GUEST_TARGET).join("release/hearth-agent"))
}

/// Single-quotes a string for sh.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
