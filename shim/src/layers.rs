//! Container roots from containerd's overlayfs snapshots as read-only
//! erofs images of their layers, attached to the VM as disks, with the
//! container's writable layer in the guest (a tmpfs of its own under an
//! overlay the agent mounts). File reads then stay in the guest's kernel and
//! page cache, and writes never cross the VM boundary, where a root shared
//! over virtio-fs makes each lookup, create and write a round trip to
//! virtiofsd (docs/benchmarks.md has both paths measured).
//!
//! - An image is built once for a chain of layers (the snapshot's lower
//!   directories, flattened through a read-only overlay mount on the host
//!   so that whiteouts are applied) with `mkfs.erofs`, and kept in
//!   `layer_images_dir` under a key derived from the layers' directories
//!   (path, device, inode and change time: a committed snapshot never
//!   changes, and a new one made with a reused path has a new inode).
//! - One image is attached once per VM, however many containers of the
//!   same image run there ([`Attached`]), and detached with the last one.
//! - The container's writes live and die with it in the VM: containerd's
//!   upper directory for it stays empty, so `ctr snapshot diff` or a commit
//!   of such a container sees nothing. `overlay_roots = "virtio-fs"` (or the
//!   annotation `io.hearth.rootfs.layers=virtio-fs`) keeps the shared path.
//! - When no disk slot is free, or the image cannot be made, the container
//!   runs on virtio-fs instead, and the shim's log says why.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use containerd_shim::protos::api::Mount;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const ANNOTATION: &str = "io.hearth.rootfs.layers";

/// How a root made by containerd's overlayfs snapshotter reaches the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlayRoots {
    /// An erofs image of the layers on a disk, the writes in the guest.
    Erofs,
    /// The snapshot mounted on the host and shared over virtio-fs.
    VirtioFs,
}

/// The path a container's root takes: the annotation's, else the config's.
pub fn wanted(spec: &oci_spec::runtime::Spec, default: OverlayRoots) -> Result<OverlayRoots> {
    match spec.annotations().as_ref().and_then(|a| a.get(ANNOTATION)).map(String::as_str) {
        None => Ok(default),
        Some("erofs") => Ok(OverlayRoots::Erofs),
        Some("virtio-fs") => Ok(OverlayRoots::VirtioFs),
        Some(other) => bail!("the annotation {ANNOTATION}={other:?} is not a root path: use erofs or virtio-fs"),
    }
}

/// The lower directories of a root that containerd's overlayfs snapshotter
/// gave as one overlay mount, topmost first; None for any other root.
pub fn lower_dirs(rootfs: &[Mount]) -> Option<Vec<PathBuf>> {
    let [m] = rootfs else { return None };
    if m.type_ != "overlay" {
        return None;
    }
    let lowers = m.options.iter().find_map(|o| o.strip_prefix("lowerdir="))?;
    let dirs: Vec<PathBuf> = lowers.split(':').map(PathBuf::from).collect();
    dirs.iter().all(|d| d.is_absolute()).then_some(dirs)
}

/// The image's name for a chain of layers.
pub fn key(lowers: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for d in lowers {
        let m = std::fs::symlink_metadata(d).with_context(|| format!("the layer {}", d.display()))?;
        if !m.is_dir() {
            bail!("the layer {} is not a directory", d.display());
        }
        h.update(d.as_os_str().as_encoded_bytes());
        h.update([0]);
        for n in [m.dev(), m.ino(), m.ctime() as u64, m.ctime_nsec() as u64] {
            h.update(n.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The disk's serial in the VM (20 bytes at most), from the image's key.
pub fn serial(key: &str) -> String {
    format!("lay{}", &key[..16])
}

/// The image of `lowers` in `dir`, built if it is not there yet (then the
/// `keep` most recently used are kept: only a build adds one); opened
/// read-only.
pub fn image(dir: &Path, lowers: &[PathBuf], keep: usize) -> Result<(String, File)> {
    let key = key(lowers)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating the layer images directory {}", dir.display()))?;
    let path = dir.join(format!("{key}.erofs"));
    if !path.exists() {
        // One build at a time in this shim: two creates of a new image at
        // once would otherwise share the temporary names, and the second
        // finds the first's image.
        static BUILDING: Mutex<()> = Mutex::new(());
        let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        if !path.exists() {
            build(dir, &key, lowers, &path)?;
            prune(dir, keep);
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("opening the layer image {}", path.display()))?;
    // Its last use, for [`prune`].
    let _ = file.set_modified(std::time::SystemTime::now());
    Ok((key, file))
}

fn build(dir: &Path, key: &str, lowers: &[PathBuf], path: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
    let mnt = dir.join(format!(".{key}.{}.mnt", std::process::id()));
    log::info!("building the erofs image of {} layer(s) ({})", lowers.len(), path.display());
    // One layer is the tree itself; several are flattened by the kernel's
    // overlayfs (their whiteouts and opaque directories applied).
    let flattened = lowers.len() > 1;
    let source = if flattened {
        std::fs::create_dir_all(&mnt)?;
        let joined: Vec<String> = lowers.iter().map(|d| d.display().to_string()).collect();
        let data = format!("lowerdir={}", joined.join(":"));
        // Within a page, mounted here; a longer list of layers needs the
        // shim crate's mount, which shortens it from a child process in the
        // layers' directory (and waits on the shim's reaper for that child).
        let mounted = if data.len() < 3584 {
            nix::mount::mount(
                Some("overlay"),
                &mnt,
                Some("overlay"),
                nix::mount::MsFlags::MS_RDONLY,
                Some(data.as_str()),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
        } else {
            containerd_shim::mount::mount_rootfs(Some("overlay"), Some("overlay"), &["ro".to_string(), data], &mnt)
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        mounted.map_err(|e| e.context("mounting the layers read-only to build their image"))?;
        mnt.clone()
    } else {
        lowers[0].clone()
    };
    let out = Command::new("mkfs.erofs").arg("--quiet").arg(&tmp).arg(&source).output();
    if flattened {
        let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&mnt);
    }
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mkfs.erofs is not installed: install erofs-utils, or set overlay_roots = \"virtio-fs\"")
        }
        Err(e) => bail!("running mkfs.erofs: {e}"),
    };
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!("mkfs.erofs failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::rename(&tmp, path).with_context(|| format!("placing the layer image {}", path.display()))?;
    log::info!("built {} in {} ms", path.display(), started.elapsed().as_millis());
    Ok(())
}

/// Removes all but the `keep` most recently used images in `dir` (an image
/// still attached stays usable: the VMM holds it open), and what a build
/// that a dead shim left behind (its temporary image and mount point, an
/// hour old: no build takes that long).
pub fn prune(dir: &Path, keep: usize) {
    let stale = |e: &std::fs::DirEntry| {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        name.starts_with('.')
            && (name.ends_with(".tmp") || name.ends_with(".mnt"))
            && old.is_some_and(|d| d > std::time::Duration::from_secs(3600))
    };
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten().filter(stale) {
        let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(e.path()).or_else(|_| std::fs::remove_dir(e.path()));
    }
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".erofs"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if images.len() <= keep {
        return;
    }
    images.sort();
    for (_, p) in &images[..images.len() - keep] {
        log::info!("removing the least recently used layer image {}", p.display());
        let _ = std::fs::remove_file(p);
    }
}

/// The layer images attached to one VM, each with the number of containers
/// on it: attached with the first, detached with the last.
#[derive(Default)]
pub struct Attached(Mutex<HashMap<String, (String, usize)>>);

impl Attached {
    /// The serial of the disk of image `key`, attached now if it is not yet.
    pub fn acquire(&self, api: &hearth_vmm::api::Client, key: &str, image: &File) -> Result<String> {
        let mut m = self.0.lock().unwrap();
        if let Some((serial, n)) = m.get_mut(key) {
            *n += 1;
            return Ok(serial.clone());
        }
        let serial = serial(key);
        api.attach_disk(image, &serial, true).map_err(|e| anyhow::anyhow!("attaching the layer image: {e}"))?;
        m.insert(key.to_string(), (serial.clone(), 1));
        Ok(serial)
    }

    /// One container of image `key` is gone (its overlay unmounted).
    pub fn release(&self, api: &hearth_vmm::api::Client, key: &str) {
        let mut m = self.0.lock().unwrap();
        let Some((serial, n)) = m.get_mut(key) else { return };
        *n -= 1;
        if *n == 0 {
            if let Err(e) = api.detach_disk(serial) {
                log::warn!("detaching the layer image disk {serial}: {e}");
            }
            m.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn lower_dirs_come_from_one_overlay_mount() {
        let m = overlay(&["index=off", "workdir=/s/3/work", "upperdir=/s/3/fs", "lowerdir=/s/2/fs:/s/1/fs"]);
        assert_eq!(
            lower_dirs(std::slice::from_ref(&m)),
            Some(vec![PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")])
        );
        assert_eq!(lower_dirs(&[m.clone(), m]), None, "two mounts are not one snapshot");
        assert_eq!(lower_dirs(&[overlay(&["upperdir=/u"])]), None);
        assert_eq!(lower_dirs(&[overlay(&["lowerdir=relative/fs"])]), None);
        let bind = Mount { type_: "bind".into(), source: "/s/1/fs".into(), ..Default::default() };
        assert_eq!(lower_dirs(&[bind]), None);
    }

    #[test]
    fn the_key_changes_with_a_layer_made_anew_at_the_same_path() {
        let dir = std::env::temp_dir().join(format!("hearth-layers-{}", std::process::id()));
        let layer = dir.join("1/fs");
        std::fs::create_dir_all(&layer).unwrap();
        let a = key(std::slice::from_ref(&layer)).unwrap();
        assert_eq!(a, key(std::slice::from_ref(&layer)).unwrap());
        std::fs::remove_dir(&layer).unwrap();
        std::fs::create_dir(dir.join("other")).unwrap();
        std::fs::create_dir(&layer).unwrap();
        assert_ne!(a, key(std::slice::from_ref(&layer)).unwrap());
        assert!(key(&[dir.join("missing")]).is_err());
        assert!(serial(&a).len() <= 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_annotation_chooses_the_path_and_names_a_mistake() {
        let mut spec = oci_spec::runtime::Spec::default();
        assert_eq!(wanted(&spec, OverlayRoots::Erofs).unwrap(), OverlayRoots::Erofs);
        spec.set_annotations(Some([(ANNOTATION.to_string(), "virtio-fs".to_string())].into()));
        assert_eq!(wanted(&spec, OverlayRoots::Erofs).unwrap(), OverlayRoots::VirtioFs);
        spec.set_annotations(Some([(ANNOTATION.to_string(), "nfs".to_string())].into()));
        assert!(wanted(&spec, OverlayRoots::Erofs).unwrap_err().to_string().contains("use erofs or virtio-fs"));
    }

    /// Needs root (an overlay mount) and mkfs.erofs (`cargo xtask setup`).
    #[test]
    fn two_layers_are_flattened_into_one_image_with_whiteouts_applied() {
        let dir = std::env::temp_dir().join(format!("hearth-layers-build-{}", std::process::id()));
        let (lower, upper, images) = (dir.join("1/fs"), dir.join("2/fs"), dir.join("images"));
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::write(lower.join("etc/kept"), "kept\n").unwrap();
        std::fs::write(lower.join("gone"), "deleted by the upper layer\n").unwrap();
        std::fs::write(upper.join("new"), "added\n").unwrap();
        // An overlay whiteout: a character device 0:0.
        nix::sys::stat::mknod(&upper.join("gone"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
            .expect("mknod (run the shim's tests as root)");
        let lowers = vec![upper.clone(), lower.clone()];
        let (key, _file) = image(&images, &lowers, 8).expect("building the image");
        let built = images.join(format!("{key}.erofs"));
        let out = dir.join("extracted");
        let s = Command::new("fsck.erofs").arg(format!("--extract={}", out.display())).arg(&built).status().unwrap();
        assert!(s.success(), "fsck.erofs of {}", built.display());
        assert_eq!(std::fs::read_to_string(out.join("etc/kept")).unwrap(), "kept\n");
        assert_eq!(std::fs::read_to_string(out.join("new")).unwrap(), "added\n");
        assert!(!out.join("gone").exists(), "the whiteout hides the lower file");
        // Reused, not rebuilt: the same key, the same file.
        let ino = std::fs::metadata(&built).unwrap().ino();
        assert_eq!(image(&images, &lowers, 8).unwrap().0, key);
        assert_eq!(std::fs::metadata(&built).unwrap().ino(), ino);
        // No temporary file or mount point is left beside it.
        assert_eq!(std::fs::read_dir(&images).unwrap().count(), 1);
        prune(&images, 0);
        assert_eq!(std::fs::read_dir(&images).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
