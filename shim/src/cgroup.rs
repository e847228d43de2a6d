//! A cgroup of its own for each VM's hearth-vmm (and the virtiofsd it
//! starts), so that what a guest costs the host, memory above all (guest
//! RAM is the VMM's memory), is accounted to that VM and not to the shim or
//! containerd, and can be read and limited per VM, as Kata and Firecracker's
//! jailer give each VMM one.
//!
//! cgroup v2 only: `/sys/fs/cgroup/hearth/<vm dir name>`, with the memory,
//! cpu, io and pids controllers enabled where the kernel has them. On a
//! cgroup v1 host the VMM stays in the shim's cgroup, and the shim's log
//! says so once per VM.
//!
//! A VM of its own for a CRI pod (`mode = "per-pod"`) goes beneath the
//! pod's cgroup instead (`<cgroup_parent>/hearth-<vm dir name>`), as Kata's
//! `sandbox_cgroup_only` puts its VMM: the kubelet's pod limits then bound
//! the whole VM, and containerd's PodSandboxStats, which reads the pod's
//! cgroup on the host, reports what the pod's VM costs.
//!
//! The VMM joins its cgroup itself, between fork and exec, so it is in it
//! before it runs a single instruction or starts virtiofsd.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The cgroup v2 mount.
pub const ROOT: &str = "/sys/fs/cgroup";
/// The cgroup under [`ROOT`] that holds every VM's.
pub const PARENT: &str = "hearth";
const CONTROLLERS: [&str; 4] = ["cpu", "memory", "io", "pids"];

/// A VM's cgroup; removed by [`VmCgroup::remove`] once its processes ended.
#[derive(Debug, Clone)]
pub struct VmCgroup {
    path: PathBuf,
}

impl VmCgroup {
    /// Creates the cgroup for the VM directory named `name` under `root`
    /// (a cgroup v2 mount): beneath `pod` (a pod's cgroup, relative to
    /// `root`) when given, else in [`PARENT`]. `None` when `root` is not
    /// cgroup v2.
    pub fn create(root: &Path, name: &str, pod: Option<&Path>) -> Result<Option<VmCgroup>> {
        if !root.join("cgroup.controllers").exists() {
            log::warn!(
                "{} is not a cgroup v2 hierarchy: hearth-vmm stays in the shim's cgroup, and its memory and CPU \
                 are not accounted per VM",
                root.display()
            );
            return Ok(None);
        }
        let (parent, leaf) = match pod {
            Some(p) => (root.join(p), format!("hearth-{name}")),
            None => (root.join(PARENT), name.to_string()),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("creating the cgroup {}", parent.display()))?;
        // Controllers are enabled level by level, from the root down.
        let mut level = root.to_path_buf();
        enable_controllers(&level);
        for c in parent.strip_prefix(root).unwrap_or(Path::new("")).components() {
            level.push(c);
            enable_controllers(&level);
        }
        let path = parent.join(leaf);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            // Left by a VM of a shim with the same pid: its processes are
            // gone (reap_orphans), reuse it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating the cgroup {}", path.display())),
        }
        Ok(Some(VmCgroup { path }))
    }

    /// The cgroup of the VM directory `name`, whether or not it exists.
    pub fn of(root: &Path, name: &str) -> VmCgroup {
        VmCgroup { path: root.join(PARENT).join(name) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A cgroup at `path`, which must lie beneath `root` (read back from a
    /// VM directory's record of it, for the clean-up after a dead shim).
    pub fn at(root: &Path, path: &Path) -> Option<VmCgroup> {
        let rel = path.strip_prefix(root).ok()?;
        is_beneath(rel).then(|| VmCgroup { path: path.to_path_buf() })
    }

    /// Caps what the VM may cost the host: `memory.max` (guest RAM plus
    /// the VMM's and virtiofsd's own overhead; reaching it has the kernel
    /// kill the VMM, and with `memory.oom.group` its virtiofsd with it,
    /// rather than anything else on the host) and `pids.max` (the VMM's
    /// threads and virtiofsd's; seccomp already forbids the VMM to fork).
    pub fn limit(&self, memory_max: u64, pids_max: u64) -> Result<()> {
        for (file, value) in [
            ("memory.max", memory_max.to_string()),
            ("memory.oom.group", "1".into()),
            ("pids.max", pids_max.to_string()),
        ] {
            std::fs::write(self.path.join(file), &value)
                .with_context(|| format!("setting {}/{file} to {value}", self.path.display()))?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer killed a process of this
    /// cgroup because it reached `memory.max`, and that limit.
    pub fn oom_kills(&self) -> (u64, String) {
        let events = std::fs::read_to_string(self.path.join("memory.events")).unwrap_or_default();
        let kills =
            events.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
        let max = std::fs::read_to_string(self.path.join("memory.max")).unwrap_or_default().trim().to_string();
        (kills, max)
    }

    /// Opens `cgroup.procs` for writing: the child writes "0" to it (itself)
    /// between fork and exec, see [`join_in_child`].
    pub fn procs(&self) -> Result<OwnedFd> {
        let f = OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", self.path.display()))?;
        Ok(f.into())
    }

    /// Kills whatever is still in the cgroup (cgroup.kill, Linux 5.14) and
    /// removes it, waiting up to `wait` for the processes to be gone.
    pub fn kill_and_remove(&self, wait: Duration) {
        if !self.path.exists() {
            return;
        }
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        self.remove(wait);
    }

    /// Removes the cgroup once it is empty, waiting up to `wait` for its
    /// processes to end (virtiofsd dies just after hearth-vmm).
    pub fn remove(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    log::warn!("removing the cgroup {}: {e} (a process of the VM is still in it)", self.path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Whether relative path `rel` names a cgroup strictly beneath the one it
/// is taken from: at least one component, and only plain names (no `..`,
/// `.` or root that would leave it).
pub fn is_beneath(rel: &Path) -> bool {
    rel.components().count() > 0 && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `fd`.
/// Only write(2): safe between fork and exec.
pub fn join_in_child(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: write of a one-byte static buffer to a descriptor we own.
    if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Enables in `dir`'s children each controller `dir` has, one by one (one
/// that cannot be enabled, say because of a process in a non-root cgroup,
/// does not keep the others off).
fn enable_controllers(dir: &Path) {
    let have = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let on = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in CONTROLLERS {
        if have.split_whitespace().any(|h| h == c) && !on.split_whitespace().any(|h| h == c) {
            if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                log::warn!("enabling the {c} controller in {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_or_missing_hierarchy_gives_no_cgroup() {
        let dir = std::env::temp_dir().join(format!("hearth-cgroup-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(VmCgroup::create(&dir, "default-1", None).unwrap().is_none());
        assert!(!dir.join(PARENT).exists(), "nothing is made outside a cgroup v2 hierarchy");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_recorded_cgroup_must_lie_beneath_the_root() {
        let root = Path::new(ROOT);
        assert!(VmCgroup::at(root, Path::new("/sys/fs/cgroup/kubepods/pod1/hearth-k8s.io-7")).is_some());
        assert!(VmCgroup::at(root, Path::new("/sys/fs/cgroup/../../etc")).is_none());
        assert!(VmCgroup::at(root, Path::new("/etc")).is_none());
        assert!(VmCgroup::at(root, root).is_none());
    }

    #[test]
    fn cgroups_are_named_after_the_vm_directory() {
        let c = VmCgroup::of(Path::new(ROOT), "default-42");
        assert_eq!(c.path(), Path::new("/sys/fs/cgroup/hearth/default-42"));
    }
}
