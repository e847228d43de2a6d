//! The jail: what hearth-vmm can still reach on the host once the guest runs.
//!
//! Seccomp (see [`crate::seccomp`]) limits which system calls the VMM makes,
//! but not the paths they name: the vsock muxer must `connect()` to Unix
//! sockets and the console log must be created and renamed, and as host root
//! those calls would reach any socket (containerd's, say) or any file. So,
//! after set-up, the VMM leaves the host's view, as Firecracker's jailer puts
//! it (written here, read for its shape only):
//!
//! - new mount, network, IPC and UTS namespaces: nothing it mounts or
//!   configures is seen outside, and it has no network of its own (taps are
//!   opened before, and a tap's descriptor keeps working);
//! - its root pivoted to the jail directory, which holds only what it needs
//!   by path at run time: the vsock socket, the stdio and other sockets that
//!   guest connections reach (`<socket>_<port>`), the control socket, and
//!   the console log with its rotated copy. Everything else (kernel,
//!   initramfs, disks, taps, KVM, virtiofsd's socket) is opened before and
//!   used through descriptors; disks attached later arrive as descriptors
//!   over the control socket;
//! - no capabilities at all (effective, permitted, inheritable, ambient and
//!   the bounding set), and no_new_privs;
//! - with [`Ids`] (`--uid`, `--gid`; the shim passes them), an unprivileged
//!   user and group and no supplementary groups, so that even files owned
//!   by root that it could still name are not its to write. The jail
//!   directory is then that user's (it rotates the console log there), and
//!   the sockets that guest connections reach in it must let it connect
//!   (the shim makes them 0666: the directory, 0700, is what keeps others
//!   out). Changing the uid clears the parent-death signal, which is set
//!   again;
//! - not dumpable: a crash writes no core file holding guest memory, and
//!   processes of its uid cannot ptrace it.
//!
//! It must run while the process has one thread: the root and namespaces of
//! threads made before would stay the host's. [`enter`] checks that.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the jail {0} is not a directory: create it (owned by root, mode 0700) or drop --jail")]
    NotADirectory(PathBuf),
    #[error("{what} {path} must be directly inside the jail {jail}: the VMM reaches nothing else once jailed")]
    Outside { what: &'static str, path: PathBuf, jail: PathBuf },
    #[error("the VMM has {0} threads; it can only be jailed with one (a bug in hearth-vmm)")]
    Threads(usize),
    #[error("jailing the VMM: {what}: {source} (it needs root: CAP_SYS_ADMIN for namespaces and pivot_root)")]
    Sys { what: &'static str, source: io::Error },
    #[error("the jail {path} is owned by uid {owner}, but the VMM becomes uid {uid} in it: `chown {uid}:{gid} {path}`, mode 0700")]
    Owner { path: PathBuf, owner: u32, uid: u32, gid: u32 },
}

/// The unprivileged user and group the jailed VMM becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// Where `path`, a file directly inside `jail`, is once the jail is the root.
pub fn inside(jail: &Path, path: &Path, what: &'static str) -> Result<PathBuf, Error> {
    let outside = || Error::Outside { what, path: path.to_path_buf(), jail: jail.to_path_buf() };
    let name = path.file_name().ok_or_else(outside)?;
    let parent = path.parent().ok_or_else(outside)?;
    let same = match (std::fs::canonicalize(parent), std::fs::canonicalize(jail)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(outside());
    }
    Ok(Path::new("/").join(name))
}

/// Checks that `jail` can be entered, before anything is set up: a
/// directory, owned by the user the VMM becomes in it.
pub fn check(jail: &Path, ids: Option<Ids>) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(jail).map_err(|_| Error::NotADirectory(jail.to_path_buf()))?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory(jail.to_path_buf()));
    }
    if let Some(ids) = ids {
        if meta.uid() != ids.uid {
            return Err(Error::Owner { path: jail.to_path_buf(), owner: meta.uid(), uid: ids.uid, gid: ids.gid });
        }
    }
    Ok(())
}

/// Enters the jail at `jail` (see the module's docs), as `ids` when given.
/// Irreversible.
pub fn enter(jail: &Path, ids: Option<Ids>) -> Result<(), Error> {
    let threads = thread_count();
    if threads != 1 {
        return Err(Error::Threads(threads));
    }
    let dir = cstring(jail)?;
    let sys = |what: &'static str, rc: libc::c_int| {
        if rc < 0 {
            Err(Error::Sys { what, source: io::Error::last_os_error() })
        } else {
            Ok(())
        }
    };
    let last_cap = last_cap();
    // SAFETY: each call takes plain values or NUL-terminated strings that
    // live across it; none touches memory of ours beyond them.
    unsafe {
        sys(
            "unshare(mount, network, IPC, UTS namespaces)",
            libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS),
        )?;
        // Nothing done in our namespace propagates back to the host.
        sys(
            "making every mount private",
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        // pivot_root needs a mount point; a plain bind (not rbind) brings
        // nothing mounted beneath the jail.
        sys(
            "binding the jail onto itself",
            libc::mount(dir.as_ptr(), dir.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()),
        )?;
        sys(
            "remounting the jail nosuid, nodev, noexec",
            libc::mount(
                std::ptr::null(),
                dir.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
        )?;
        sys("chdir into the jail", libc::chdir(dir.as_ptr()))?;
        // pivot_root(".", "."): the old root ends up stacked on the new one,
        // and detaching "." then removes it.
        sys("pivot_root", libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        sys("detaching the host's root", libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        sys("chdir /", libc::chdir(c"/".as_ptr()))?;

        // Capabilities, last: everything above needs CAP_SYS_ADMIN.
        sys("no_new_privs", libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        sys(
            "clearing ambient capabilities",
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        )?;
        for cap in 0..=last_cap {
            sys("dropping a capability from the bounding set", libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
        }
        if let Some(Ids { uid, gid }) = ids {
            // Changing the uid clears the parent-death signal: keep it.
            let mut death: libc::c_int = 0;
            sys(
                "reading the parent-death signal",
                libc::prctl(libc::PR_GET_PDEATHSIG, &mut death as *mut libc::c_int),
            )?;
            // Groups first: once the uid is not root, they cannot change.
            sys("dropping supplementary groups", libc::setgroups(0, std::ptr::null()))?;
            sys("setresgid (the VMM's group)", libc::setresgid(gid, gid, gid))?;
            sys("setresuid (the VMM's user)", libc::setresuid(uid, uid, uid))?;
            if death != 0 {
                sys("setting the parent-death signal again", libc::prctl(libc::PR_SET_PDEATHSIG, death))?;
            }
        }
        let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [CapData::default(); 2];
        sys(
            "capset (dropping every capability)",
            libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) as libc::c_int,
        )?;
        // No core dump (it would write the guest's memory to a host file)
        // and no ptrace by processes of the same uid. After the uid change,
        // which resets it.
        sys("not dumpable", libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0))?;
    }
    tracing::info!(jail = %jail.display(), ?ids, "jailed: own namespaces, root pivoted to the jail, no capabilities");
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn cstring(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::NotADirectory(p.to_path_buf()))
}

/// The highest capability this kernel knows (read before the jail hides /proc).
fn last_cap() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_directly_inside_the_jail() {
        let jail = std::env::temp_dir().join(format!("hearth-jail-test-{}", std::process::id()));
        std::fs::create_dir_all(jail.join("sub")).unwrap();
        assert_eq!(inside(&jail, &jail.join("vsock.sock"), "the vsock socket").unwrap(), Path::new("/vsock.sock"));
        let e = inside(&jail, &jail.join("sub/vsock.sock"), "the vsock socket").unwrap_err().to_string();
        assert!(e.contains("must be directly inside the jail"), "{e}");
        assert!(inside(&jail, Path::new("/tmp/console.log"), "the console log").is_err());
        assert!(check(&jail.join("missing"), None).is_err());
        assert!(check(&jail, None).is_ok());
        // Owned by root (the tests run as root), not by the VMM's user.
        let e = check(&jail, Some(Ids { uid: 65534, gid: 65534 })).unwrap_err().to_string();
        assert!(e.contains("chown 65534:65534"), "{e}");
        std::fs::remove_dir_all(&jail).unwrap();
    }
}
