//! Guest images the utility VM boots. For now: the minimal busybox
//! initramfs whose init is tests/guest/init.sh.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cpio::Archive;
use crate::paths;
use crate::sh;
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
