//! Distros on ext4 disk images, as WSL keeps each distro in a VHDX: the
//! distro's root is an image in the shim's `disk_images_dir`, attached to
//! the VM when the distro starts and detached when it stops (the shim does
//! both: see shim/src/disk.rs), so its file operations stay inside the
//! VM's kernel. `hearth distro import --vhd` registers one from an image,
//! `export --vhd` gives the image back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::Container;

use super::{check_name, Distro, Hearth};
use hearth_rootfs::progress::Progress;

/// The image a disk-backed distro runs on.
pub const LABEL_DISK: &str = "io.hearth.disk";

/// Reads `file` out of an ext4 image without mounting it; None if absent.
fn read_in_image(image: &Path, file: &str) -> Option<String> {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {file}")).arg(image).output().ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !err.contains("not found")).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn exists_in_image(image: &Path, file: &str) -> bool {
    Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {file}"))
        .arg(image)
        .output()
        .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("not found"))
}

/// The OS name, init and whether it is systemd, read from the image.
fn inspect(image: &Path) -> (String, Option<String>, bool) {
    let release = read_in_image(image, "/usr/lib/os-release").or_else(|| read_in_image(image, "/etc/os-release"));
    let field =
        |k: &str| release.as_deref()?.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim_matches('"').to_string());
    let os = field("PRETTY_NAME=").or_else(|| field("NAME=")).unwrap_or_default();
    let init = exists_in_image(image, "/sbin/init").then(|| "/sbin/init".to_string());
    let systemd = init.is_some()
        && (exists_in_image(image, "/usr/lib/systemd/systemd") || exists_in_image(image, "/lib/systemd/systemd"));
    (os, init, systemd)
}

/// `e2fsck -n`: is this an ext4 file system in a usable state? (Nothing is
/// changed: the user's file is only read.)
fn check_image(file: &Path) -> Result<()> {
    let out = Command::new("e2fsck").arg("-n").arg(file).output().context("running e2fsck (package e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "{} is damaged or not an ext4 file system (e2fsck: {}{}): repair it with `e2fsck -f {}` first",
            file.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            file.display()
        );
    }
    Ok(())
}

/// The default largest size of a distro's disk: the image is sparse, so it
/// takes only what the distro's files use and grows up to this.
pub const DEFAULT_SIZE_GIB: u64 = 256;

/// Makes `image`, a sparse ext4 image of `size_gib` GiB, holding the root
/// filesystem tar `tar` (plain or gzipped): unpacked next to it with owners,
/// modes, xattrs and ACLs (as root), then written by `mke2fs -d`.
fn image_from_tar(tar: &Path, image: &Path, size_gib: u64) -> Result<()> {
    let tree = image.with_extension("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&tree);
    let progress = Progress::new(&format!("unpacking {}", tar.display()));
    let out = Command::new("tar")
        .args(["--extract", "--same-owner", "--numeric-owner", "--same-permissions", "--xattrs", "--xattrs-include=*"])
        .args(["--acls", "--file"])
        .arg(tar)
        .arg("--directory")
        .arg(&tree)
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!("unpacking {} failed: {}", tar.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    progress.finish("done");
    let progress =
        Progress::new(&format!("writing the ext4 image {} ({size_gib} GiB at most, sparse)", image.display()));
    let partial = image.with_extension("partial");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "discard", "-d"])
        .arg(&tree)
        .arg(&partial)
        .arg(format!("{size_gib}G"))
        .output()
        .context("running mke2fs (package e2fsprogs)")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("mke2fs could not make {}: {}", image.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::rename(&partial, image).with_context(|| format!("writing {}", image.display()))?;
    progress.finish("done");
    Ok(())
}

/// Copies an image, keeping it sparse.
fn copy_sparse(from: &Path, to: &Path, what: &str) -> Result<()> {
    let progress = Progress::new(what);
    let partial = to.with_extension("partial");
    let status =
        Command::new("cp").arg("--sparse=always").arg(from).arg(&partial).status().context("running cp (coreutils)")?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("copying {} to {} failed ({status})", from.display(), to.display());
    }
    std::fs::rename(&partial, to).with_context(|| format!("writing {}", to.display()))?;
    progress.finish("done");
    Ok(())
}

impl Hearth {
    /// The directory the shim takes disk images from.
    pub fn disk_images_dir(&self) -> Result<PathBuf> {
        Ok(self.cfg.vm_settings()?.disk_images_dir)
    }

    /// Registers distro `name` on a copy of the ext4 image `file`.
    pub async fn import_vhd(&self, name: &str, file: &Path) -> Result<Distro> {
        check_name(name)?;
        if self.cd.container(name).await?.is_some() {
            bail!("a distro named {name:?} exists already: import under another name");
        }
        if !file.is_file() {
            bail!("{} is not a file: name an ext4 disk image (as `hearth distro export --vhd` writes)", file.display());
        }
        check_image(file)?;
        let image = self.new_image_path(name)?;
        copy_sparse(file, &image, &format!("copying {} to {}", file.display(), image.display()))?;
        self.register_disk(name, &image, format!("import --vhd {}", file.display())).await
    }

    /// Registers distro `name` on a new sparse ext4 image of `size_gib` GiB
    /// made of the root filesystem tar `tar` (what `install` builds or
    /// `import` is given). The callers have checked the name.
    pub(super) async fn register_tar_on_disk(
        &self,
        name: &str,
        tar: &Path,
        size_gib: u64,
        source: String,
    ) -> Result<Distro> {
        if size_gib == 0 {
            bail!("a disk of 0 GiB holds nothing: give --disk-size in GiB, at least 1");
        }
        let image = self.new_image_path(name)?;
        tokio::task::block_in_place(|| image_from_tar(tar, &image, size_gib))?;
        self.register_disk(name, &image, source).await
    }

    /// `<disk_images_dir>/NAME.img`, which must not exist yet.
    fn new_image_path(&self, name: &str) -> Result<PathBuf> {
        let dir = self.disk_images_dir()?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&dir)
            .with_context(|| format!("creating the disk images directory {}", dir.display()))?;
        let image = dir.join(format!("{name}.img"));
        if image.exists() {
            bail!("{} exists already (a distro's disk image): remove it, or use another name", image.display());
        }
        Ok(image)
    }

    /// Registers distro `name` on `image` (in disk_images_dir): its
    /// container, with no snapshot; the image is removed if that fails.
    async fn register_disk(&self, name: &str, image: &Path, source: String) -> Result<Distro> {
        let (os, init, systemd) = inspect(image);
        if init.is_none() {
            tracing::warn!("{} has no /sbin/init: distro {name} will run a waiting shell as its init", image.display());
        }
        let d = Distro {
            name: name.into(),
            os,
            init,
            systemd,
            source,
            image: String::new(),
            snapshot_key: String::new(),
            created: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
            disk: Some(image.to_path_buf()),
        };
        let c = Container {
            id: name.into(),
            labels: d.labels(),
            runtime: Some(self.runtime()),
            spec: Some(self.spec_for(&d)?),
            ..Default::default()
        };
        if let Err(e) = self.cd.create_container(c).await {
            let _ = std::fs::remove_file(image);
            return Err(e);
        }
        Ok(d)
    }

    /// Writes a copy of a disk-backed distro's image to `file`; its size.
    pub async fn export_vhd(&self, d: &Distro, file: &Path) -> Result<u64> {
        let Some(image) = &d.disk else {
            bail!("distro {} keeps its files in a containerd snapshot, not a disk image: export it to a tar", d.name);
        };
        self.hold_still(d, "its disk would change while it is copied").await?;
        copy_sparse(image, file, &format!("exporting {} to {}", d.name, file.display()))?;
        Ok(std::fs::metadata(file)?.len())
    }
}
