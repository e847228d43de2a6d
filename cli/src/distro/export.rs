//! `hearth distro export`: a distro's root filesystem as a tar, the format
//! `distro import` takes back (and WSL's `--export` writes): the tree as its
//! init sees it, owners numeric, extended attributes and ACLs kept.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Distro, Hearth, State};
use crate::containerd::mount_all;
use hearth_rootfs::progress::Progress;

/// Unmounts on drop, so an error half-way leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl Hearth {
    /// Refuses to read a running distro's files (`why` says what would go
    /// wrong); for a stopped one, deletes its task, which still has the
    /// root filesystem mounted (by the shim, on the host) or its disk
    /// attached, so that the export can take it.
    pub(super) async fn hold_still(&self, d: &Distro, why: &str) -> Result<()> {
        if let s @ (State::Running { .. } | State::Starting) = self.state(&d.name).await? {
            bail!(
                "distro {} is {}: {why}. Stop it first with `hearth terminate {}`",
                d.name,
                s.to_string().to_lowercase(),
                d.name
            );
        }
        self.cd.delete_task(&d.name).await.map(|_| ())
    }

    /// Writes distro `d`'s files to `file` (gzip-compressed if it ends in
    /// `.gz` or `.tgz`); its size.
    pub async fn export(&self, d: &Distro, file: &Path) -> Result<u64> {
        self.hold_still(d, "its files would change while they are read").await?;
        let dir = std::env::temp_dir().join(format!("hearth-export-{}-{}", d.name, std::process::id()));
        std::fs::create_dir_all(&dir)?;
        match &d.disk {
            // Read-only through a loop device, the journal left alone.
            Some(image) => {
                let out = Command::new("mount")
                    .args(["-t", "ext4", "-o", "loop,ro,noload"])
                    .arg(image)
                    .arg(&dir)
                    .output()
                    .context("running mount")?;
                if !out.status.success() {
                    let _ = std::fs::remove_dir(&dir);
                    bail!(
                        "mounting the disk image {} read-only: {} (the loop driver is needed: `modprobe loop`)",
                        image.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            None => {
                let mounts = self.cd.snapshot_mounts(&self.cfg.snapshotter, &d.snapshot_key).await?;
                mount_all(&mounts, &dir, true)?;
            }
        }
        let mounted = Mounted(dir);
        let partial = file.with_extension("partial");
        let name = file.to_string_lossy();
        let gzip = name.ends_with(".gz") || name.ends_with(".tgz");
        let mut tar = Command::new("tar");
        tar.args(["--create", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse"])
            .arg(format!("--file={}", partial.display()))
            .arg("--directory")
            .arg(&mounted.0);
        if gzip {
            tar.arg("--gzip");
        }
        tar.arg(".");
        let mut child = tar.spawn().context("starting tar")?;
        let mut progress = Progress::new(&format!("exporting {} to {}", d.name, file.display()));
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            let written = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            progress.tick(&format!("{} MiB", written >> 20));
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        drop(mounted);
        if !status.success() {
            let _ = std::fs::remove_file(&partial);
            bail!("tar failed ({status}) exporting {}", d.name);
        }
        std::fs::rename(&partial, file).with_context(|| format!("writing {}", file.display()))?;
        let size = std::fs::metadata(file)?.len();
        progress.finish(&format!("{} MiB", size >> 20));
        Ok(size)
    }
}
