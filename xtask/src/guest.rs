//! Guest images the utility VM boots: the agent initramfs (hearth-agent as
//! /init, the runtime's image), and the minimal busybox initramfs whose init is
//! tests/guest/init.sh (the boot and device suites' image).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cpio::Archive;
use crate::paths;
use crate::sh;
use crate::sh::cmd;
use crate::testhost::BUSYBOX;

const BOOT_INIT: &str = include_str!("../../tests/guest/init.sh");

fn boot_initramfs_path() -> Result<PathBuf> {
    let busybox = std::fs::read(BUSYBOX).context("busybox-static is not installed: run `cargo xtask setup`")?;
    let key = sh::key(&[BOOT_INIT.as_bytes(), &busybox]);
    Ok(paths::cache().join("initramfs").join(key).join("boot.cpio"))
}

/// The cached boot initramfs.
pub fn find_boot_initramfs() -> Result<PathBuf> {
    let path = boot_initramfs_path()?;
    if !path.exists() {
        anyhow::bail!("no boot initramfs at {}: run `cargo xtask setup`", path.display());
    }
    Ok(path)
}

pub fn ensure_boot_initramfs() -> Result<PathBuf> {
    let path = boot_initramfs_path()?;
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    let mut a = Archive::default();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        a.dir(d);
    }
    a.char_dev("dev/console", 0o600, 5, 1);
    a.file_from("bin/busybox", 0o755, std::path::Path::new(BUSYBOX))?;
    a.symlink("bin/sh", "busybox");
    a.file("init", 0o755, BOOT_INIT.as_bytes());
    sh::write_atomic(&path, &a.finish())?;
    eprintln!("==> boot initramfs {} ({} KiB)", path.display(), std::fs::metadata(&path)?.len() / 1024);
    Ok(path)
}

/// The agent initramfs for a built agent binary, cached by its hash. Holds
/// /init and the directories the kernel and the agent need before they mount
/// anything; containers bring everything else.
pub fn ensure_agent_initramfs(agent: &std::path::Path) -> Result<PathBuf> {
    let full = std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let key = sh::key(&[b"agent-initramfs-v1", &full]);
    let path = paths::cache().join("initramfs").join(key).join("agent.cpio");
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    // The release profile keeps line tables for backtraces; the guest's copy
    // goes without (it stays in guest memory for the VM's life).
    let stripped = path.with_file_name("hearth-agent.stripped");
    sh::run(cmd("strip").arg("--strip-debug").arg("-o").arg(&stripped).arg(agent))?;
    let bin = std::fs::read(&stripped)?;
    let mut a = Archive::default();
    for d in ["dev", "proc", "sys", "run", "tmp", "mnt"] {
        a.dir(d);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    // (/newroot: where the agent moves to leave the initramfs.)
    a.dir("newroot");
    a.char_dev("dev/console", 0o600, 5, 1);
    a.file("init", 0o755, &bin);
    sh::write_atomic(&path, &a.finish())?;
    eprintln!(
        "==> agent initramfs {} ({:.1} MiB; hearth-agent {:.1} MiB)",
        path.display(),
        std::fs::metadata(&path)?.len() as f64 / 1048576.0,
        bin.len() as f64 / 1048576.0
    );
    Ok(path)
}
