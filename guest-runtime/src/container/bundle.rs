//! Turning a create request into a bundle libcontainer can run: the
//! container's root filesystem (a directory, an overlay assembled here, or
//! a disk the host attached, found by its serial and mounted here) and a
//! config.json pointing at it.

use std::path::{Path, PathBuf};

use hearth_agent_protocol::agent::Rootfs;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{RootBuilder, Spec};

use crate::error::{AgentError, Result};

/// A prepared bundle; [`Bundle::remove`] undoes it.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    /// The overlay this agent mounted, if it assembled one.
    pub overlay: Option<PathBuf>,
    /// The disk root this agent mounted: unmounted for real (not lazily)
    /// at removal, since the host detaches the disk next.
    pub disk: Option<PathBuf>,
    /// The device of a writable disk root (`/dev/vdX`): at removal the
    /// agent waits until no file system holds it any more.
    pub disk_dev: Option<PathBuf>,
    /// The cgroup path in the spec (set to `/hearth/<id>` when absent).
    pub cgroup_path: PathBuf,
}

/// Container ids become directory names and cgroup names: keep them plain.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "container id {id:?} is not valid: use 1 to 128 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Writes the bundle for container `id` under `bundles_dir`.
pub fn prepare(bundles_dir: &Path, id: &str, mut spec: Spec, rootfs: &Rootfs) -> Result<Bundle> {
    let dir = bundles_dir.join(id);
    if dir.exists() {
        return Err(AgentError::AlreadyExists(format!("container {id:?} already exists")));
    }
    std::fs::create_dir_all(&dir).map_err(|e| AgentError::internal(format!("creating {}", dir.display()), e))?;
    let result = (|| {
        let mut disk = None;
        let mut disk_dev = None;
        let (root_path, overlay) = if !rootfs.block_serial.is_empty() && rootfs.block_is_lower {
            let lower = dir.join("lower");
            mount_disk(&lower, rootfs)?;
            disk = Some(lower.clone());
            let scratch = dir.join("scratch");
            mount_scratch(&scratch)?;
            let target = dir.join("rootfs");
            let on_disk = Rootfs {
                lower_dirs: vec![lower.display().to_string()],
                upper_dir: scratch.join("upper").display().to_string(),
                work_dir: scratch.join("work").display().to_string(),
                ..Default::default()
            };
            mount_overlay(&dir, &target, &on_disk)?;
            (target.clone(), Some(target))
        } else if !rootfs.block_serial.is_empty() {
            let target = dir.join("rootfs");
            disk_dev = Some(mount_disk(&target, rootfs)?);
            disk = Some(target.clone());
            (target, None)
        } else if rootfs.lower_dirs.is_empty() {
            if rootfs.path.is_empty() {
                return Err(AgentError::InvalidArgument(
                    "no root filesystem: give rootfs.path or rootfs.lower_dirs".into(),
                ));
            }
            let p = PathBuf::from(&rootfs.path);
            if !p.is_absolute() || !p.is_dir() {
                return Err(AgentError::InvalidArgument(format!(
                    "the root filesystem {:?} is not a directory in the guest: mount it first (Mount) or give an absolute path",
                    rootfs.path
                )));
            }
            (p, None)
        } else {
            let target = dir.join("rootfs");
            mount_overlay(&dir, &target, rootfs)?;
            (target.clone(), Some(target))
        };
        let readonly = spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false);
        let root = RootBuilder::default()
            .path(root_path.clone())
            .readonly(readonly)
            .build()
            .map_err(|e| AgentError::internal("building the spec's root", e))?;
        spec.set_root(Some(root));
        let wants_resolv = spec.annotations().as_ref().and_then(|a| a.get(hearth_oci::ANNOTATION_RESOLV_CONF));
        if wants_resolv.map(String::as_str) == Some("vm") && !readonly {
            give_resolv_conf(&root_path, Path::new(crate::pid1::network::RESOLV_CONF))?;
        }
        let mut linux = spec.linux().clone().unwrap_or_default();
        let cgroup_path = match linux.cgroups_path() {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => Path::new("/").join(p),
            None => PathBuf::from(format!("/hearth/{id}")),
        };
        linux.set_cgroups_path(Some(cgroup_path.clone()));
        spec.set_linux(Some(linux));
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| AgentError::internal("writing config.json", e))?;
        std::fs::write(dir.join("config.json"), json).map_err(|e| AgentError::internal("writing config.json", e))?;
        Ok(Bundle { dir: dir.clone(), rootfs: root_path, overlay, disk, disk_dev, cgroup_path })
    })();
    if result.is_err() {
        for m in ["rootfs", "scratch", "lower"] {
            let _ = umount2(&dir.join(m), MntFlags::empty());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Copies the VM's resolver configuration (`vm_resolv`) to the container
/// root's /etc/resolv.conf, replacing what is there (a file, or a symlink
/// such as systemd-resolved's, which is removed rather than followed). A
/// VM without one (no network) leaves the root alone.
fn give_resolv_conf(root: &Path, vm_resolv: &Path) -> Result<()> {
    let Ok(text) = std::fs::read(vm_resolv) else { return Ok(()) };
    let etc = root.join("etc");
    let fail = |what: &str, e: std::io::Error| AgentError::internal(format!("{what} {}/resolv.conf", etc.display()), e);
    if etc.symlink_metadata().map(|m| !m.is_dir()).unwrap_or(false) {
        return Err(AgentError::InvalidArgument(format!("{} is not a directory", etc.display())));
    }
    std::fs::create_dir_all(&etc).map_err(|e| fail("creating the directory of", e))?;
    let target = etc.join("resolv.conf");
    match std::fs::remove_file(&target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("replacing", e)),
    }
    std::fs::write(&target, text).map_err(|e| fail("writing", e))
}

/// How long the agent waits for an attached disk to show up and be free
/// of an earlier file system on its device: the host's
/// attach reaches the guest's driver as a configuration-change interrupt,
/// handled on a workqueue.
const DISK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The block device whose serial is `serial`, once it has a size.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<String> {
    for e in std::fs::read_dir(sys_block).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
        if read("serial").trim_end_matches(['\n', '\0']) == serial && read("size").trim() != "0" {
            return Some(name);
        }
    }
    None
}

/// Whether a file system (or anything else) holds block device `dev`: an
/// exclusive open fails with EBUSY while one is mounted from it, in any
/// mount namespace.
fn held(dev: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Polls `f` every 20 ms until it gives a value or `deadline` passes.
fn poll_until<T>(deadline: std::time::Instant, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until nothing holds `dev`, up to `deadline`; whether it is free.
fn wait_released(dev: &Path, deadline: std::time::Instant) -> bool {
    poll_until(deadline, || (!held(dev)).then_some(())).is_some()
}

/// Mounts the disk whose serial the request names on `target`; its device.
fn mount_disk(target: &Path, rootfs: &Rootfs) -> Result<PathBuf> {
    let serial = &rootfs.block_serial;
    let ok = serial.len() <= 20 && serial.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(AgentError::InvalidArgument(format!("{serial:?} is not a disk serial")));
    }
    let fs_type = if rootfs.fs_type.is_empty() { "ext4" } else { rootfs.fs_type.as_str() };
    if !matches!(fs_type, "ext4" | "ext2" | "ext3" | "xfs" | "btrfs" | "erofs") {
        return Err(AgentError::InvalidArgument(format!("{fs_type:?} is not a file system for a disk root")));
    }
    let deadline = std::time::Instant::now() + DISK_WAIT;
    let Some(name) = poll_until(deadline, || find_disk(Path::new("/sys/block"), serial)) else {
        return Err(AgentError::InvalidArgument(format!(
            "no disk with serial {serial:?} appeared within {DISK_WAIT:?}: was it attached to this VM?"
        )));
    };
    tracing::debug!(serial, name, "disk found");
    std::fs::create_dir_all(target).map_err(|e| AgentError::internal(format!("creating {}", target.display()), e))?;
    let dev = format!("/dev/{name}");
    // A writable root is its container's alone. A file system still alive
    // on this device (an earlier disk in the same slot, whose mount some
    // namespace kept) would be taken for this disk's by the mount below:
    // the kernel finds superblocks by device. erofs layer images are
    // shared by the containers of one image, so they are not checked.
    if fs_type != "erofs" && !wait_released(Path::new(&dev), deadline) {
        return Err(AgentError::FailedPrecondition(format!(
            "the disk {dev} (serial {serial}) is still held by a file system mounted in the guest: \
             an earlier disk in this slot was not released; delete what uses it, or restart the VM"
        )));
    }
    // discard: a deleted file's blocks go back to the host's sparse image.
    // erofs is read-only, and its disk may be too (a write open would fail).
    let (data, flags) = if fs_type == "erofs" {
        ("", MsFlags::MS_NOATIME | MsFlags::MS_RDONLY)
    } else {
        ("discard", MsFlags::MS_NOATIME)
    };
    mount(Some(dev.as_str()), target, Some(fs_type), flags, Some(data))
        .map_err(|e| AgentError::internal(format!("mounting the disk {dev} ({fs_type}, serial {serial})"), e))?;
    tracing::debug!(serial, name, "disk mounted");
    Ok(PathBuf::from(dev))
}

/// The writable layer of a root over a read-only disk: a tmpfs of the
/// container's own (overlayfs needs a file system with whiteouts and
/// trusted xattrs for its upper), as large as the kernel's default (half
/// the VM's memory), gone when the container is.
fn mount_scratch(scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch).map_err(|e| AgentError::internal(format!("creating {}", scratch.display()), e))?;
    mount(Some("tmpfs"), scratch, Some("tmpfs"), MsFlags::MS_NOATIME, Some("mode=0755"))
        .map_err(|e| AgentError::internal(format!("mounting the writable layer's tmpfs on {}", scratch.display()), e))
}

fn mount_overlay(dir: &Path, target: &Path, rootfs: &Rootfs) -> Result<()> {
    for lower in &rootfs.lower_dirs {
        if !Path::new(lower).is_dir() {
            return Err(AgentError::InvalidArgument(format!(
                "overlay layer {lower:?} is not a directory in the guest"
            )));
        }
        if lower.contains(':') || lower.contains(',') {
            return Err(AgentError::InvalidArgument(format!("overlay layer {lower:?} has a ':' or ','")));
        }
    }
    let upper = if rootfs.upper_dir.is_empty() { dir.join("upper") } else { PathBuf::from(&rootfs.upper_dir) };
    let work = if rootfs.work_dir.is_empty() { dir.join("work") } else { PathBuf::from(&rootfs.work_dir) };
    for d in [&upper, &work, &target.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(|e| AgentError::internal(format!("creating {}", d.display()), e))?;
    }
    let data =
        format!("lowerdir={},upperdir={},workdir={}", rootfs.lower_dirs.join(":"), upper.display(), work.display());
    mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(data.as_str()))
        .map_err(|e| AgentError::internal(format!("mounting the overlay root filesystem ({data})"), e))
}

impl Bundle {
    pub fn remove(&self) {
        // The overlay first: a disk that is its lower layer is busy under it.
        if let Some(o) = &self.overlay {
            if let Err(e) = umount2(o, MntFlags::MNT_DETACH) {
                tracing::warn!(overlay = %o.display(), "unmounting the overlay: {e}");
            }
        }
        let scratch = self.dir.join("scratch");
        if self.disk.is_some() && scratch.exists() {
            let _ = umount2(&scratch, MntFlags::MNT_DETACH);
        }
        if let Some(d) = &self.disk {
            // The host detaches the disk once this returns. syncfs first:
            // what the container wrote reaches the image even if another
            // mount namespace keeps the file system alive past the unmount.
            if let Ok(root) = std::fs::File::open(d) {
                use std::os::fd::AsRawFd;
                // SAFETY: syncfs on a descriptor we own.
                if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
                    tracing::warn!(root = %d.display(), "syncfs: {}", std::io::Error::last_os_error());
                }
            }
            // Every process of the container is gone: a plain unmount
            // writes the file system back before the host detaches it.
            if let Err(e) = umount2(d, MntFlags::empty()) {
                tracing::error!(root = %d.display(), "unmounting the disk root: {e}; detaching it lazily");
                let _ = umount2(d, MntFlags::MNT_DETACH);
            }
        }
        if let Some(dev) = &self.disk_dev {
            // The unmount ends the file system only when no other mount of
            // it is left; wait for that, so that the next disk in this slot
            // is not mistaken for this one.
            if !wait_released(dev, std::time::Instant::now() + std::time::Duration::from_secs(10)) {
                tracing::error!(dev = %dev.display(), "the disk root is still held after its unmount");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "removing the bundle: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_found_by_its_serial_once_it_has_a_size() {
        let sys = std::env::temp_dir().join(format!("hearth-sysblock-{}", std::process::id()));
        let dev = |name: &str, serial: &str, size: &str| {
            std::fs::create_dir_all(sys.join(name)).unwrap();
            std::fs::write(sys.join(name).join("serial"), serial).unwrap();
            std::fs::write(sys.join(name).join("size"), size).unwrap();
        };
        dev("vda", "run.img\n", "131072\n");
        dev("vdb", "", "0\n");
        dev("vdc", "r0123456789abcdef", "0\n");
        assert_eq!(find_disk(&sys, "r0123456789abcdef"), None, "attached, but its size is not seen yet");
        dev("vdc", "r0123456789abcdef", "2048\n");
        assert_eq!(find_disk(&sys, "r0123456789abcdef").as_deref(), Some("vdc"));
        assert_eq!(find_disk(&sys, "r0123456789abcde"), None, "a prefix is not the serial");
        assert_eq!(find_disk(&sys, ""), None, "an empty slot is nobody's disk");
        std::fs::remove_dir_all(&sys).unwrap();
    }

    #[test]
    fn the_vm_resolv_conf_replaces_a_symlink_in_the_root_without_following_it() {
        let dir = std::env::temp_dir().join(format!("hearth-resolv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let outside = dir.join("outside");
        std::fs::write(&outside, "untouched").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/resolv.conf")).unwrap();
        let vm = dir.join("vm-resolv.conf");
        std::fs::write(&vm, "nameserver 10.0.0.1\n").unwrap();
        give_resolv_conf(&root, &vm).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(), "nameserver 10.0.0.1\n");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "untouched");
        // No VM resolv.conf (no network): the root is left alone.
        give_resolv_conf(&root, &dir.join("none")).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(), "nameserver 10.0.0.1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ids_are_plain_names() {
        assert!(check_id("web-1_a.b").is_ok());
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            let e = check_id(bad).unwrap_err();
            assert!(e.to_string().contains("is not valid"), "{e}");
        }
    }

    #[test]
    fn a_directory_rootfs_is_written_into_config_json_with_a_cgroup() {
        let tmp = std::env::temp_dir().join(format!("hearth-bundle-{}", std::process::id()));
        let root = tmp.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "elsewhere", "readonly": true},
            "linux": {}
        }))
        .unwrap();
        let rootfs = Rootfs { path: root.display().to_string(), ..Default::default() };
        let b = prepare(&tmp.join("bundles"), "c1", spec.clone(), &rootfs).unwrap();
        let written: Spec = serde_json::from_slice(&std::fs::read(b.dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(written.root().as_ref().unwrap().path(), &root);
        assert_eq!(written.root().as_ref().unwrap().readonly(), Some(true));
        assert_eq!(b.cgroup_path, PathBuf::from("/hearth/c1"));
        // The same id twice is refused, and nothing is lost.
        let again = prepare(&tmp.join("bundles"), "c1", spec.clone(), &rootfs).unwrap_err();
        assert!(matches!(again, AgentError::AlreadyExists(_)));
        assert!(b.dir.join("config.json").exists());
        b.remove();
        // A missing rootfs is named.
        let missing = Rootfs { path: "/nonexistent/rootfs".into(), ..Default::default() };
        let e = prepare(&tmp.join("bundles"), "c2", spec, &missing).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/rootfs"), "{e}");
        assert!(!tmp.join("bundles/c2").exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
