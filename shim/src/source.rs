//! Bind sources, resolved so that no guest can aim them.
//!
//! A bind mount's source is a host path named by the caller (containerd,
//! Docker, the kubelet), and is resolved as runc resolves it: symbolic links
//! are followed, since the caller named them. But part of a path may lie in
//! a directory that a hearth guest can write: a volume bound read-write
//! into a container (of this VM or another), or a container's root. A
//! symbolic link there was planted by whoever runs in that guest, and
//! following it would let that guest choose what the next container binds:
//! `ln -s / /vol/data` in one container, and a second container given
//! `/srv/vol/data` as a volume would get the host's root.
//!
//! So the shim resolves a source itself, one component at a time from `/`
//! (with `openat` of `O_PATH` descriptors, never a path string twice):
//! a symbolic link in a directory no guest can write is followed (its
//! target's components are walked the same way), and a symbolic link in a
//! directory some guest can write refuses the bind, naming the link. The
//! result is a descriptor, from which the bind is made: what was checked is
//! what is mounted, whatever the guest renames meanwhile.
//!
//! Which directories a guest can write is read from the shim's mount table
//! ([`GuestWritable::scan`]): every read-write mount in the shares' host
//! trees of every VM under the state directory (volumes and roots), and
//! the upper directories of the overlays among them. A directory is inside
//! one when one of its ancestors (by device and inode, walking `..`) is.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The most symbolic links one source may go through (the kernel's limit).
const MAX_LINKS: usize = 40;

/// Directories (device, inode) some hearth guest can write beneath.
#[derive(Default, Debug)]
pub struct GuestWritable {
    roots: HashSet<(u64, u64)>,
}

impl GuestWritable {
    /// The read-write mounts beneath `state_dir` (each VM's share trees)
    /// in this process's mount table, and their overlays' upper
    /// directories.
    pub fn scan(state_dir: &Path) -> GuestWritable {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Self::from_mountinfo(&info, state_dir)
    }

    fn from_mountinfo(info: &str, state_dir: &Path) -> GuestWritable {
        let mut w = GuestWritable::default();
        for line in info.lines() {
            let Some((fields, rest)) = line.split_once(" - ") else { continue };
            let f: Vec<&str> = fields.split(' ').collect();
            let (Some(point), Some(opts)) = (f.get(4), f.get(5)) else { continue };
            let point = PathBuf::from(crate::vm::unescape_mountinfo(point));
            if !point.starts_with(state_dir) || !opts.split(',').any(|o| o == "rw") {
                continue;
            }
            // A share's own host tree (VM/host/NAME) is the shim's, and read
            // only to the guest; the containers' mounts are beneath it.
            let rel = point.strip_prefix(state_dir).unwrap_or(&point);
            if rel.components().count() <= 3 {
                continue;
            }
            w.add(&point);
            // `TYPE SOURCE SUPEROPTS`: an overlay's writes land in its upper
            // directory, on the host's file system.
            let mut r = rest.splitn(3, ' ');
            if r.next() == Some("overlay") {
                if let Some(upper) = r.nth(1).and_then(|o| o.split(',').find_map(|kv| kv.strip_prefix("upperdir="))) {
                    w.add(Path::new(&crate::vm::unescape_mountinfo(upper)));
                }
            }
        }
        w
    }

    fn add(&mut self, dir: &Path) {
        if let Ok(m) = std::fs::metadata(dir) {
            use std::os::unix::fs::MetadataExt;
            self.roots.insert((m.dev(), m.ino()));
        }
    }

    /// Whether directory `dir` is one of them or beneath one.
    fn contains(&self, dir: &OwnedFd) -> io::Result<bool> {
        if self.roots.is_empty() {
            return Ok(false);
        }
        let mut cur = openat(dir.as_raw_fd(), OsStr::new("."), libc::O_PATH | libc::O_DIRECTORY)?;
        loop {
            let id = dev_ino(&cur)?;
            if self.roots.contains(&id) {
                return Ok(true);
            }
            let parent = openat(cur.as_raw_fd(), OsStr::new(".."), libc::O_PATH | libc::O_DIRECTORY)?;
            if dev_ino(&parent)? == id {
                return Ok(false); // the root
            }
            cur = parent;
        }
    }
}

/// Opens bind source `source` (absolute) as an `O_PATH` descriptor,
/// following symbolic links except in directories `writable` holds (see
/// the module's docs).
pub fn open(source: &Path, writable: &GuestWritable) -> Result<OwnedFd> {
    if !source.is_absolute() {
        bail!("the bind source {} is not an absolute path", source.display());
    }
    let mut cur = openat(libc::AT_FDCWD, OsStr::new("/"), libc::O_PATH | libc::O_DIRECTORY)?;
    let mut walked = PathBuf::from("/");
    let mut todo: VecDeque<OsString> = components(source);
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            cur = openat(cur.as_raw_fd(), &name, libc::O_PATH | libc::O_DIRECTORY)?;
            walked.pop();
            continue;
        }
        let st = lstatat(cur.as_raw_fd(), &name)
            .with_context(|| format!("the bind source {}: {}", source.display(), walked.join(&name).display()))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            if writable.contains(&cur)? {
                bail!(
                    "the bind source {} goes through the symbolic link {}, in a directory that a hearth guest can \
                     write (a container's read-write volume or root): refused, since that guest could aim it \
                     anywhere on the host; name the link's target instead",
                    source.display(),
                    walked.join(&name).display()
                );
            }
            links += 1;
            if links > MAX_LINKS {
                bail!("the bind source {}: too many symbolic links", source.display());
            }
            let target = readlinkat(cur.as_raw_fd(), &name)?;
            if target.is_absolute() {
                cur = openat(libc::AT_FDCWD, OsStr::new("/"), libc::O_PATH | libc::O_DIRECTORY)?;
                walked = PathBuf::from("/");
            }
            for c in components(&target).into_iter().rev() {
                todo.push_front(c);
            }
            continue;
        }
        let next = openat(cur.as_raw_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW)?;
        // Replaced by a symbolic link since it was looked at: O_NOFOLLOW
        // opened the link itself.
        if fstat(&next)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            bail!("the bind source {} changed while it was resolved: retry", source.display());
        }
        cur = next;
        walked.push(&name);
    }
    Ok(cur)
}

/// The names to walk: `..` kept (resolved as the walk goes), `.` and the
/// root dropped.
fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn openat(dir: RawFd, name: &OsStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: a NUL-terminated name that outlives the call.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn lstatat(dir: RawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: stat is plain data; the name outlives the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; an empty path with AT_EMPTY_PATH names fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(fd.as_raw_fd(), c"".as_ptr(), &mut st, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) }
        < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn dev_ino(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

fn readlinkat(dir: RawFd, name: &OsStr) -> io::Result<PathBuf> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the buffer is as long as we say; the name outlives the call.
    let n = unsafe { libc::readlinkat(dir, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from_vec(buf)))
}

/// Whether a descriptor from [`open`] is a directory.
pub fn is_dir(fd: &OwnedFd) -> io::Result<bool> {
    Ok(fstat(fd)?.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hearth-source-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn guest_writes(dirs: &[&Path]) -> GuestWritable {
        let mut w = GuestWritable::default();
        for d in dirs {
            w.add(d);
        }
        w
    }

    fn target_of(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
    }

    #[test]
    fn host_symlinks_are_followed_as_runc_follows_them() {
        let d = scratch("host");
        std::fs::create_dir_all(d.join("real/sub")).unwrap();
        symlink(d.join("real"), d.join("abs")).unwrap();
        symlink("real", d.join("rel")).unwrap();
        let none = GuestWritable::default();
        assert_eq!(target_of(&open(&d.join("abs/sub"), &none).unwrap()), d.join("real/sub"));
        assert_eq!(target_of(&open(&d.join("rel/sub"), &none).unwrap()), d.join("real/sub"));
        assert_eq!(target_of(&open(&d.join("real/sub/../sub"), &none).unwrap()), d.join("real/sub"));
        assert!(open(&d.join("missing"), &none).is_err());
        assert!(open(Path::new("relative/path"), &none).is_err());
        symlink("loop", d.join("loop")).unwrap();
        assert!(open(&d.join("loop"), &none).unwrap_err().to_string().contains("too many symbolic links"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_in_a_guest_writable_directory_is_refused_even_when_reached_through_a_host_one() {
        let d = scratch("guest");
        std::fs::create_dir_all(d.join("vol/plain")).unwrap();
        std::fs::create_dir_all(d.join("secret")).unwrap();
        // What a guest plants in its volume, and a host link into it.
        symlink(d.join("secret"), d.join("vol/evil")).unwrap();
        symlink(d.join("vol/evil"), d.join("host-link")).unwrap();
        let w = guest_writes(&[&d.join("vol")]);
        for source in [d.join("vol/evil"), d.join("vol/evil/x"), d.join("host-link")] {
            let e = open(&source, &w).unwrap_err().to_string();
            assert!(e.contains("a hearth guest can"), "{source:?}: {e}");
            assert!(e.contains(&d.join("vol/evil").display().to_string()), "the link is named: {e}");
        }
        // Plain directories inside it are fine, and so is the link for a
        // shim that knows of no guest writing there.
        assert_eq!(target_of(&open(&d.join("vol/plain"), &w).unwrap()), d.join("vol/plain"));
        assert_eq!(target_of(&open(&d.join("vol/evil"), &GuestWritable::default()).unwrap()), d.join("secret"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writable_mounts_are_read_from_the_mount_table() {
        let d = scratch("mountinfo");
        let vm = d.join("k8s.io-42");
        std::fs::create_dir_all(vm.join("host/shared/c1/mounts/0")).unwrap();
        std::fs::create_dir_all(vm.join("host/shared/c1/mounts/1")).unwrap();
        std::fs::create_dir_all(vm.join("host/roots/c1/rootfs")).unwrap();
        std::fs::create_dir_all(d.join("upper")).unwrap();
        let p = |s: &Path| s.display().to_string().replace(' ', "\\040");
        let info = format!(
            "1 0 0:1 / {} rw,relatime shared:1 - tmpfs tmpfs rw\n\
             2 1 0:1 / {} rw,relatime shared:2 - ext4 /dev/sda1 rw\n\
             3 1 0:1 / {} ro,relatime shared:3 - ext4 /dev/sda1 rw\n\
             4 1 0:2 / {} rw - overlay overlay rw,lowerdir=/l,upperdir={},workdir=/w\n",
            p(&vm.join("host/shared")),
            p(&vm.join("host/shared/c1/mounts/0")),
            p(&vm.join("host/shared/c1/mounts/1")),
            p(&vm.join("host/roots/c1/rootfs")),
            p(&d.join("upper")),
        );
        let w = GuestWritable::from_mountinfo(&info, &d);
        let id = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        assert!(w.roots.contains(&id(&vm.join("host/shared/c1/mounts/0"))), "a read-write volume");
        assert!(!w.roots.contains(&id(&vm.join("host/shared/c1/mounts/1"))), "a read-only one");
        assert!(!w.roots.contains(&id(&vm.join("host/shared"))), "the share's own tree");
        assert!(w.roots.contains(&id(&d.join("upper"))), "an overlay's upper directory");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
