//! The host side of a virtio-fs share, laid out so that the guest cannot
//! redirect anything the shim does.
//!
//! The guest writes to its shares (any privileged container can mount one
//! itself), so a directory the shim mounts into must not be one the guest can
//! replace with a symlink: a symlink planted where the next container's bind
//! or root goes would make the shim, as root, mount over a host path or
//! remove host files. So each share has two trees in the VM's directory:
//!
//! - `host/NAME`: where the shim creates mount points and mounts. It is a
//!   shared mount (bound onto itself), so mounts made beneath it propagate.
//!   virtiofsd never sees this tree.
//! - `export/NAME`: what virtiofsd serves, a bind of `host/NAME` in the same
//!   peer group (so each container's mounts appear there too), remounted
//!   read-only. The guest can write only inside the containers' own mounts
//!   (their roots, their read-write volumes), each a mount of its own with
//!   its own flags; the directories between them, `ID/`, `ID/mounts/` and
//!   the share's top, are on the read-only mount, so a guest's attempt to
//!   create, rename or remove anything there fails with EROFS.
//!
//! Defence in depth: every mount point is created and opened relative to the
//! host tree's own descriptor with `openat2` (RESOLVE_BENEATH,
//! RESOLVE_NO_SYMLINKS, RESOLVE_NO_XDEV: no symlink followed, nothing outside
//! the tree, no walking into a mount), and mounts are moved onto the opened
//! descriptor rather than onto a path. Removal never crosses a mount point
//! ([`remove_tree`]).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// One share's two trees.
pub struct Share {
    host: PathBuf,
    export: PathBuf,
    /// `host`, opened once it is a mount of its own: everything beneath is
    /// resolved from here.
    host_fd: OwnedFd,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `openat2` beneath `dir`, following no symlink (a symlink anywhere,
/// the last component included, is ELOOP) and crossing no mount (EXDEV).
fn open_beneath(dir: RawFd, name: &Path, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let path = cstr(name)?;
    // SAFETY: open_how is plain integers; zero is its "nothing asked" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = mode as u64;
    how.resolve =
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    // SAFETY: a NUL-terminated path and an open_how of its true size, both
    // outliving the call; the returned fd is owned from here on.
    let fd = check(unsafe {
        libc::syscall(libc::SYS_openat2, dir, path.as_ptr(), &how as *const libc::open_how, std::mem::size_of_val(&how))
    })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A path of plain names only (no `..`, no root): what may be resolved
/// beneath a share.
fn plain(rel: &Path) -> Result<()> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("{} is not a plain relative path", rel.display());
    }
    Ok(())
}

/// Creates (if missing) and opens each directory of `rel` beneath `dir`.
fn make_dirs(dir: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let mut cur = open_beneath(dir.as_raw_fd(), Path::new("."), libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for c in rel.components() {
        let name = cstr(Path::new(c.as_os_str()))?;
        // SAFETY: a NUL-terminated name relative to a descriptor we own.
        // mkdirat never follows a symlink in its last component.
        if unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        cur = open_beneath(cur.as_raw_fd(), Path::new(c.as_os_str()), libc::O_PATH | libc::O_DIRECTORY, 0)?;
    }
    Ok(cur)
}

impl Share {
    /// Makes `VM_DIR/host/NAME` and its read-only export `VM_DIR/export/NAME`.
    pub fn create(vm_dir: &Path, name: &str) -> Result<Share> {
        let host = vm_dir.join("host").join(name);
        let export = vm_dir.join("export").join(name);
        std::fs::create_dir_all(&host)?;
        std::fs::create_dir_all(&export)?;
        mount(Some(&host), &host, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("binding {}", host.display()))?;
        mount(None::<&str>, &host, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .with_context(|| format!("making {} a shared mount", host.display()))?;
        let share = Share { host_fd: std::fs::File::open(&host)?.into(), host: host.clone(), export: export.clone() };
        mount(Some(&host), &export, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("binding {} at {}", host.display(), export.display()))?;
        mount(
            None::<&str>,
            &export,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("making {} read-only", export.display()))?;
        Ok(share)
    }

    /// What virtiofsd serves.
    pub fn export(&self) -> &Path {
        &self.export
    }

    /// Binds `source` (a host path given by the caller, not the guest) at
    /// `rel` beneath the share, creating the mount point: with the mounts
    /// beneath it when `recursive` (rbind), and read-only on the host,
    /// submounts included, when `readonly`. Returns the mount's host path,
    /// for [`unmount`].
    ///
    /// The bind is made detached (open_tree), set read-only there
    /// (mount_setattr) and only then moved onto the mount point's
    /// descriptor (move_mount): a bind made in place and remounted read-only
    /// afterwards would already have propagated, writable, into virtiofsd's
    /// mount namespace, and the guest would write through that copy.
    ///
    /// `src` is `source` as [`crate::source::open`] resolved it: the bind is
    /// made from that descriptor, so what was checked is what is mounted.
    pub fn bind(&self, rel: &Path, source: &Path, src: &OwnedFd, recursive: bool, readonly: bool) -> Result<PathBuf> {
        plain(rel)?;
        let what = || format!("binding {} at {}", source.display(), self.host.join(rel).display());
        let target = if crate::source::is_dir(src).with_context(what)? {
            make_dirs(&self.host_fd, rel)
        } else {
            // A file: its directory, then the file (created if missing).
            let (parent, name) = (rel.parent().unwrap_or(Path::new("")), rel.file_name().unwrap_or_default());
            make_dirs(&self.host_fd, parent)
                .and_then(|p| open_beneath(p.as_raw_fd(), Path::new(name), libc::O_CREAT | libc::O_WRONLY, 0o600))
        }
        .with_context(|| format!("{} (the mount point)", what()))?;

        let empty = CString::default();
        const OPEN_TREE_CLONE: libc::c_uint = 1;
        const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
        const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
        let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
        if recursive {
            flags |= libc::AT_RECURSIVE as libc::c_uint;
        }
        // SAFETY: the source's descriptor and an empty path that outlives
        // the call; the returned fd is owned from here on.
        let tree = check(unsafe { libc::syscall(libc::SYS_open_tree, src.as_raw_fd(), empty.as_ptr(), flags) })
            .with_context(|| format!("{} (open_tree)", what()))?;
        // SAFETY: a fresh descriptor that nothing else owns.
        let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
        if readonly {
            let attr =
                libc::mount_attr { attr_set: libc::MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
            // SAFETY: the detached tree's fd, an empty path, and an
            // attribute block of its true size that outlives the call.
            check(unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    tree.as_raw_fd(),
                    empty.as_ptr(),
                    libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
                    &attr as *const libc::mount_attr,
                    std::mem::size_of::<libc::mount_attr>(),
                )
            })
            .with_context(|| format!("{} (mount_setattr read-only)", what()))?;
        }
        // SAFETY: two descriptors we own and empty paths.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                target.as_raw_fd(),
                empty.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            )
        })
        .with_context(|| format!("{} (move_mount)", what()))?;
        Ok(self.host.join(rel))
    }

    /// Removes `rel` (a container's directory) beneath the share once its
    /// mounts are undone, never descending into a mount that is still there.
    pub fn forget(&self, rel: &Path) {
        if plain(rel).is_err() {
            return;
        }
        if let Err(e) = remove_tree(&self.host.join(rel)) {
            log::warn!("removing {}: {e:#}", self.host.join(rel).display());
        }
    }

    /// Unmounts both trees (and every mount beneath them).
    pub fn teardown(&self) {
        for p in [&self.export, &self.host] {
            if let Err(e) = umount2(p, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                    log::warn!("unmounting {}: {e}", p.display());
                }
            }
        }
    }
}

/// Unmounts one mount the shim made (detached, following no symlink).
pub fn unmount(path: &Path) {
    if let Err(e) = umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        log::warn!("unmounting {}: {e}", path.display());
    }
}

/// The id of the mount `fd` is on.
fn mount_id(fd: RawFd) -> io::Result<u64> {
    // SAFETY: statx fills the zeroed struct it is given; an empty path with
    // AT_EMPTY_PATH names the descriptor itself.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let empty = CString::default();
    check(unsafe {
        libc::statx(fd, empty.as_ptr(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW, libc::STATX_MNT_ID, &mut st)
    } as libc::c_long)?;
    Ok(st.stx_mnt_id)
}

/// Removes `dir` and everything beneath it that is on `dir`'s own mount:
/// symlinks are removed, never followed, and a directory or file that is
/// (or is on) another mount is left alone, with an error naming it, so that
/// a mount made while a tree is torn down (or one whose unmount failed) can
/// never let the removal reach the host files behind it.
pub fn remove_tree(dir: &Path) -> Result<()> {
    let fd = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(dir) {
        Ok(f) => OwnedFd::from(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("opening {}", dir.display())),
    };
    let mnt = mount_id(fd.as_raw_fd())?;
    let mut left = Vec::new();
    remove_beneath(&fd, dir, mnt, &mut left)?;
    if !left.is_empty() {
        bail!(
            "left alone, on another mount: {}",
            left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

fn remove_beneath(dir: &OwnedFd, path: &Path, mnt: u64, left: &mut Vec<PathBuf>) -> Result<()> {
    use nix::dir::Dir;
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let mut entries = Vec::new();
    {
        let mut d = Dir::openat(
            Some(dir.as_raw_fd()),
            ".",
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("reading {}", path.display()))?;
        for e in d.iter() {
            let e = e?;
            let name = e.file_name().to_owned();
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                entries.push(name);
            }
        }
    }
    for name in entries {
        let os = std::ffi::OsStr::from_bytes(name.to_bytes());
        let child_path = path.join(os);
        let child = match open_beneath(dir.as_raw_fd(), Path::new(os), libc::O_PATH, 0) {
            Ok(c) => c,
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                left.push(child_path);
                continue;
            }
            // A symlink (RESOLVE_NO_SYMLINKS refuses it): remove the link.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                unlinkat(Some(dir.as_raw_fd()), name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", child_path.display())),
        };
        if mount_id(child.as_raw_fd())? != mnt {
            left.push(child_path);
            continue;
        }
        let is_dir = nix::sys::stat::fstat(child.as_raw_fd())?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir {
            let sub = open_beneath(dir.as_raw_fd(), Path::new(os), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            remove_beneath(&sub, &child_path, mnt, left)?;
            if let Err(e) = unlinkat(Some(dir.as_raw_fd()), name.as_c_str(), UnlinkatFlags::RemoveDir) {
                if !left.iter().any(|l| l.starts_with(&child_path)) {
                    return Err(e).with_context(|| format!("removing {}", child_path.display()));
                }
            }
        } else if let Err(e) = unlinkat(Some(dir.as_raw_fd()), name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            if e == nix::errno::Errno::EBUSY {
                left.push(child_path);
            } else {
                return Err(e).with_context(|| format!("removing {}", child_path.display()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A scratch directory in a mount namespace of this test's thread alone,
    /// with nothing propagating back to the host's.
    fn src_fd(p: &Path) -> OwnedFd {
        crate::source::open(p, &Default::default()).unwrap()
    }

    fn private_scratch(name: &str) -> PathBuf {
        // SAFETY: unshare takes flags only; CLONE_NEWNS affects this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        assert_eq!(rc, 0, "unshare (the shim's tests run as root): {}", io::Error::last_os_error());
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
        let dir = std::env::temp_dir().join(format!("hearth-share-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A tmpfs of its own, so that the test's mounts vanish with it.
        mount(Some("tmpfs"), &dir, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
        dir
    }

    fn erofs<T: std::fmt::Debug>(r: io::Result<T>) -> bool {
        matches!(r, Err(e) if e.raw_os_error() == Some(libc::EROFS))
    }

    #[test]
    fn the_guest_side_is_read_only_between_the_containers_mounts() {
        let dir = private_scratch("ro");
        let (rw, ro) = (dir.join("rw-src"), dir.join("ro-src"));
        std::fs::create_dir_all(&rw).unwrap();
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::write(ro.join("keep"), "host").unwrap();
        let share = Share::create(&dir.join("vm"), "shared").unwrap();
        share.bind(Path::new("c1/mounts/0"), &rw, &src_fd(&rw), false, false).unwrap();
        share.bind(Path::new("c1/mounts/1"), &ro, &src_fd(&ro), false, true).unwrap();
        let export = share.export();

        // What the guest sees: the container's mounts, read-write or
        // read-only as asked, and nothing else it can change.
        std::fs::write(export.join("c1/mounts/0/new"), "guest").unwrap();
        assert_eq!(std::fs::read_to_string(rw.join("new")).unwrap(), "guest");
        assert!(erofs(std::fs::write(export.join("c1/mounts/1/keep"), "pwned")));
        assert!(erofs(symlink("/etc", export.join("c2"))), "a symlink planted at the share's top");
        assert!(erofs(symlink("/etc", export.join("c1/mounts/2"))), "a symlink planted at the next bind");
        assert!(erofs(std::fs::rename(export.join("c1/mounts"), export.join("c1/gone"))));
        assert!(erofs(std::fs::remove_dir(export.join("c1/mounts/0"))) || export.join("c1/mounts/0").exists());
        assert_eq!(std::fs::read_to_string(ro.join("keep")).unwrap(), "host");
        share.teardown();
    }

    #[test]
    fn mount_points_are_never_reached_through_a_symlink() {
        let dir = private_scratch("symlink");
        let (src, victim) = (dir.join("src"), dir.join("victim"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("precious"), "host").unwrap();
        let share = Share::create(&dir.join("vm"), "shared").unwrap();
        // As if something had planted symlinks in the host tree: at the
        // container's directory, at a bind target, at a file target.
        symlink(&victim, dir.join("vm/host/shared/c1")).unwrap();
        std::fs::create_dir_all(dir.join("vm/host/shared/c2/mounts")).unwrap();
        symlink(&victim, dir.join("vm/host/shared/c2/mounts/0")).unwrap();
        symlink(victim.join("precious"), dir.join("vm/host/shared/c2/mounts/1")).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        for (rel, source) in
            [("c1/mounts/0", src.clone()), ("c2/mounts/0", src.clone()), ("c2/mounts/1", src.join("f"))]
        {
            let e = share.bind(Path::new(rel), &source, &src_fd(&source), false, false).unwrap_err();
            assert!(format!("{e:#}").contains("mount point"), "{rel}: {e:#}");
        }
        assert!(share.bind(Path::new("../escape"), &src, &src_fd(&src), false, false).is_err());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(victim.to_str().unwrap()), "{mounts}");
        assert_eq!(std::fs::read_to_string(victim.join("precious")).unwrap(), "host");
        share.teardown();
    }

    #[test]
    fn removal_never_crosses_a_mount_or_follows_a_symlink() {
        let dir = private_scratch("remove");
        let tree = dir.join("tree");
        let (outside, mounted) = (dir.join("outside"), tree.join("a/still-mounted"));
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), "host").unwrap();
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/file"), "x").unwrap();
        symlink(&outside, tree.join("a/link")).unwrap();
        std::fs::create_dir_all(&mounted).unwrap();
        mount(Some(&outside), &mounted, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();

        let e = remove_tree(&tree).unwrap_err();
        assert!(format!("{e:#}").contains("still-mounted"), "{e:#}");
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "host");
        assert!(!tree.join("a/b").exists() && !tree.join("a/link").exists());

        umount2(&mounted, MntFlags::MNT_DETACH).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "host");
    }
}
