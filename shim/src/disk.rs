//! Container roots on disk images: a container whose spec carries the
//! annotation `io.hearth.rootfs.disk=PATH` runs on that ext4 image, attached
//! to the VM through hearth-vmm's control socket and mounted by the agent,
//! instead of on a directory shared over virtio-fs. File operations then
//! stay inside the guest's kernel (as in WSL 2's per-distro VHDX); a
//! deleted file's blocks go back to the sparse image (the agent mounts with
//! `discard`).
//!
//! The image must lie directly in `disk_images_dir` (the annotation is set
//! by whoever may create containers, but the shim runs as root: it opens
//! nothing else), is checked with `e2fsck -p` and refused if damaged, and
//! is locked (`flock`) for as long as it is attached: the VMM holds the
//! same open file, so the lock lasts until the disk is detached or the VMM
//! dies, and no second container or VM attaches it meanwhile.
//!
//! A root that containerd's snapshotter gives as a block device (devmapper)
//! is attached the same way ([`snapshot_device`], [`open_device`]), opened
//! with `O_EXCL` in place of the lock.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const ANNOTATION: &str = "io.hearth.rootfs.disk";

/// The image named by the spec's annotation, if any.
pub fn requested(spec: &oci_spec::runtime::Spec) -> Option<String> {
    spec.annotations().as_ref()?.get(ANNOTATION).cloned()
}

/// The disk's id in the VM (its serial, at most 20 bytes): derived from the
/// container id, which may be longer.
pub fn serial(container_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("root{h:016x}")
}

/// Opens, locks and checks the image `image` for a container root.
pub fn open(images_dir: &Path, image: &str) -> Result<File> {
    let path = PathBuf::from(image);
    let dir = std::fs::canonicalize(images_dir).with_context(|| {
        format!("the disk images directory {} is missing: create it, or set disk_images_dir", images_dir.display())
    })?;
    let parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
    if !path.is_absolute() || parent.as_deref() != Some(dir.as_path()) || path.file_name().is_none() {
        bail!("the disk image {image} is not directly in {} (disk_images_dir): move it there", dir.display());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(path.file_name().unwrap()))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => anyhow::anyhow!("the disk image {image} does not exist"),
            Some(libc::ELOOP) => anyhow::anyhow!("the disk image {image} is a symbolic link: name the file itself"),
            _ => anyhow::anyhow!("cannot open the disk image {image}: {e}"),
        })?;
    if !file.metadata()?.is_file() {
        bail!("the disk image {image} is not a regular file");
    }
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("the disk image {image} is in use (attached to another container or VM): an image is attached once");
    }
    check(&path)?;
    Ok(file)
}

/// The block device of a root that containerd's snapshotter made one
/// (devmapper gives one ext4 mount whose source is a thin device): such a
/// root is attached to the VM as a disk, as an image is, instead of being
/// mounted on the host and shared over virtio-fs.
pub fn snapshot_device(rootfs: &[containerd_shim::protos::api::Mount]) -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let [m] = rootfs else { return None };
    let source = Path::new(&m.source);
    (m.type_ == "ext4"
        && source.is_absolute()
        && std::fs::metadata(source).is_ok_and(|md| md.file_type().is_block_device()))
    .then(|| source.to_path_buf())
}

/// Opens a snapshot's block device for the VM, exclusively: the kernel
/// refuses it while it is mounted or opened so elsewhere (a second
/// container, the host), and it is never attached twice.
pub fn open_device(device: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => anyhow::anyhow!(
                "the snapshot's block device {} is in use (mounted on the host, or attached to another container)",
                device.display()
            ),
            _ => anyhow::anyhow!("cannot open the snapshot's block device {}: {e}", device.display()),
        })
}

/// `e2fsck -p`: repairs what is safe to repair, refuses a damaged image.
fn check(path: &Path) -> Result<()> {
    let out = crate::tool::output(std::process::Command::new("e2fsck").arg("-p").arg(path))
        .context("running e2fsck (package e2fsprogs) to check the disk image")?;
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1 | 2) => {
            log::warn!("e2fsck repaired {}: {}", path.display(), String::from_utf8_lossy(&out.stdout).trim());
            Ok(())
        }
        _ => bail!(
            "the disk image {} is damaged or not an ext4 file system (e2fsck: {}{}): repair it with `e2fsck -f {}`, or restore it",
            path.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_fit_and_differ() {
        let a = serial("a-container-id-much-longer-than-twenty-characters");
        assert!(a.len() <= 20, "{a}");
        assert_ne!(a, serial("another"));
        assert_eq!(a, serial("a-container-id-much-longer-than-twenty-characters"));
    }

    #[test]
    fn only_images_directly_in_the_directory_are_opened() {
        let tmp = std::env::temp_dir().join(format!("hearth-disk-{}", std::process::id()));
        let dir = tmp.join("disks");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(tmp.join("outside.img"), b"").unwrap();
        std::fs::write(dir.join("sub/deep.img"), b"").unwrap();
        std::os::unix::fs::symlink(tmp.join("outside.img"), dir.join("link.img")).unwrap();
        let err = |p: PathBuf| open(&dir, &p.display().to_string()).unwrap_err().to_string();
        assert!(err(tmp.join("outside.img")).contains("not directly in"));
        assert!(err(dir.join("sub/deep.img")).contains("not directly in"));
        assert!(err(dir.join("sub/../../outside.img")).contains("not directly in"));
        assert!(open(&dir, "relative.img").unwrap_err().to_string().contains("not directly in"));
        assert!(err(dir.join("link.img")).contains("symbolic link"));
        assert!(err(dir.join("missing.img")).contains("does not exist"));
        assert!(open(&tmp.join("nope"), "/x.img").unwrap_err().to_string().contains("disk_images_dir"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
