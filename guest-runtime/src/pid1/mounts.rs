//! The filesystems PID 1 mounts before anything else runs.

use std::path::Path;

use anyhow::Context;
use nix::mount::{mount, MsFlags};

struct Fs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

const FILESYSTEMS: &[Fs] = &[
    Fs { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: None },
    Fs { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC, data: None },
    Fs { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
    Fs {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=620,ptmxmode=666"),
    },
    Fs {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    // cgroup v2 only: the unified hierarchy is what libcontainer and systemd
    // in distros expect.
    Fs {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
    Fs {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Fs {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

fn is_mountpoint(target: &str) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(target))
}

/// Moves PID 1 off the initramfs onto a fresh tmpfs root.
///
/// The kernel's initial root ("rootfs") cannot be pivoted away from:
/// pivot_root(2) fails with EINVAL there, and libcontainer pivots into every
/// container's root. So, as switch_root does for a distribution's initrd, PID
/// 1 mounts a tmpfs, moves it over `/` and chroots into it. The initramfs held
/// only /init, which keeps running from memory; it is unlinked so its pages go
/// when nothing maps them.
pub fn leave_initramfs() -> anyhow::Result<()> {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    const RAMFS_MAGIC: FsType = FsType(0x858458f6);
    let fs = statfs("/").context("statfs /")?;
    if fs.filesystem_type() != RAMFS_MAGIC && fs.filesystem_type() != TMPFS_MAGIC {
        return Ok(()); // booted from a real root filesystem
    }
    let new = Path::new("/newroot");
    std::fs::create_dir_all(new).context("creating /newroot")?;
    mount(Some("tmpfs"), new, Some("tmpfs"), MsFlags::MS_NOSUID, Some("mode=0755"))
        .context("mounting the new root tmpfs")?;
    for d in ["dev", "proc", "sys", "run", "tmp", "mnt"] {
        std::fs::create_dir_all(new.join(d))?;
    }
    let _ = std::fs::remove_file("/init");
    nix::unistd::chdir(new)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).context("moving the new root over /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    nix::unistd::chdir("/")?;
    Ok(())
}

pub fn mount_all() -> anyhow::Result<()> {
    for fs in FILESYSTEMS {
        std::fs::create_dir_all(fs.target).with_context(|| format!("creating {}", fs.target))?;
        if fs.target != "/proc" && is_mountpoint(fs.target) {
            continue;
        }
        mount(Some(fs.source), fs.target, Some(fs.fstype), fs.flags, fs.data)
            .with_context(|| format!("mounting {} on {}", fs.fstype, fs.target))?;
    }
    for (link, to) in [("/dev/fd", "/proc/self/fd"), ("/dev/ptmx", "pts/ptmx")] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(to, link);
        }
    }
    delegate_controllers(Path::new("/sys/fs/cgroup"))
}

/// Enables every available controller for the root's children, so that
/// container cgroups can limit memory, CPU, I/O and pids.
fn delegate_controllers(root: &Path) -> anyhow::Result<()> {
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).context("reading cgroup.controllers")?;
    let enable: Vec<String> = available.split_whitespace().map(|c| format!("+{c}")).collect();
    std::fs::write(root.join("cgroup.subtree_control"), enable.join(" "))
        .with_context(|| format!("enabling cgroup controllers {available:?}"))?;
    tracing::debug!(controllers = %available.trim(), "cgroup v2 controllers delegated");
    Ok(())
}
