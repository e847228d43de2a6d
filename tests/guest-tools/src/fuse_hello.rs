//! `fuse-hello MOUNTPOINT`: a read-only FUSE filesystem served straight over
//! /dev/fuse, whose root holds one file, `hello.txt`, reading
//! `hello from fuse\n`. The e2e suites use it to check that a container given
//! /dev/fuse and CAP_SYS_ADMIN can mount and serve a FUSE filesystem.
//!
//! No libfuse: this program is linked statically with nothing but libc, and
//! the handful of requests a `cat`/`ls`/`stat` makes are simple enough to
//! answer by hand. The wire format is the kernel's
//! include/uapi/linux/fuse.h: each read(2) of /dev/fuse yields one request (a
//! `fuse_in_header` and its body), each reply is one write(2) of a
//! `fuse_out_header` and its body, all integers in native byte order.
//!
//! Prints `fuse-hello: mounted on MOUNTPOINT` once mounted, then serves until
//! the filesystem is unmounted.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The opcodes of `enum fuse_opcode` this server looks at.
mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

/// FUSE_ROOT_ID: the kernel's node id for the mount's root.
const ROOT: u64 = 1;
const HELLO: u64 = 2;
const HELLO_NAME: &[u8] = b"hello.txt";
const HELLO_DATA: &[u8] = b"hello from fuse\n";

/// The newest protocol minor we answer with: 7.31 has every structure used
/// here in its current size and nothing we would have to opt out of.
const MAX_MINOR: u32 = 31;
/// 7.12 (Linux 2.6.29) is the oldest whose entry, attr and read structures
/// have the layout written and parsed below.
const MIN_MINOR: u32 = 12;
const MAX_WRITE: u32 = 128 * 1024;
/// The kernel refuses (EINVAL) a read of /dev/fuse whose buffer could not hold
/// a WRITE request of `max_write` bytes plus its headers.
const BUF_SIZE: usize = MAX_WRITE as usize + 4096;
/// How long the kernel may cache names and attributes. Nothing here changes.
const VALID_SECS: u64 = 1;

const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// FUSE_COMPAT_22_INIT_OUT_SIZE: the fuse_init_out the kernel expects before
/// 7.23, when it grew to 64 bytes.
const INIT_OUT_LEN_COMPAT_22: usize = 24;

const DT_DIR: u32 = 4;
const DT_REG: u32 = 8;

/// Native-endian integer at `at` in `b`, or None past its end.
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// A reply body under construction.
#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// What to do with one request.
enum Answer {
    /// Reply with this body (Ok) or this errno (Err).
    Reply(Result<Vec<u8>, i32>),
    /// FORGET, BATCH_FORGET and INTERRUPT take no reply.
    Silent,
    /// Reply with success, then stop serving.
    Stop,
}

struct Request<'a> {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    body: &'a [u8],
}

impl<'a> Request<'a> {
    /// The header and body of one read of /dev/fuse; None if even the header
    /// is short.
    fn parse(msg: &'a [u8]) -> Option<Self> {
        let len = u32_at(msg, 0)? as usize;
        let opcode = u32_at(msg, 4)?;
        let unique = u64_at(msg, 8)?;
        let nodeid = u64_at(msg, 16)?;
        // The header's length should be what was read; trust the smaller.
        let end = len.clamp(IN_HEADER_LEN, msg.len().max(IN_HEADER_LEN));
        let body = msg.get(IN_HEADER_LEN..end)?;
        Some(Request { opcode, unique, nodeid, body })
    }
}

struct Hello {
    uid: u32,
    gid: u32,
    /// atime, mtime and ctime of both inodes: when the server started.
    time: u64,
}

impl Hello {
    fn answer(&self, req: &Request) -> Answer {
        let r = match req.opcode {
            op::INIT => self.init(req.body),
            op::LOOKUP => self.lookup(req.nodeid, req.body),
            op::GETATTR => self.getattr(req.nodeid),
            op::OPEN => open(req.nodeid, req.body),
            op::OPENDIR => opendir(req.nodeid),
            op::READ => read(req.nodeid, req.body),
            op::READDIR => readdir(req.nodeid, req.body),
            op::STATFS => Ok(statfs()),
            op::ACCESS => access(req.nodeid, req.body),
            op::RELEASE | op::RELEASEDIR | op::FLUSH => Ok(Vec::new()),
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => return Answer::Silent,
            op::DESTROY => return Answer::Stop,
            // No xattrs: on ENOSYS the kernel stops asking and answers
            // EOPNOTSUPP itself.
            op::GETXATTR | op::LISTXATTR => Err(libc::ENOSYS),
            _ => Err(libc::ENOSYS),
        };
        Answer::Reply(r)
    }

    /// fuse_init_in: major, minor, max_readahead, flags (and more we ignore).
    fn init(&self, b: &[u8]) -> Result<Vec<u8>, i32> {
        let (Some(major), Some(minor), Some(max_readahead)) = (u32_at(b, 0), u32_at(b, 4), u32_at(b, 8)) else {
            return Err(libc::EINVAL);
        };
        if major < 7 || (major == 7 && minor < MIN_MINOR) {
            eprintln!("fuse-hello: the kernel speaks FUSE {major}.{minor}, older than 7.{MIN_MINOR}");
            return Err(libc::EPROTO);
        }
        // A newer major would resend INIT with ours; within 7, the lower
        // minor of both sides is what the connection runs.
        let minor = if major > 7 { MAX_MINOR } else { minor.min(MAX_MINOR) };
        // flags 0: in particular no FUSE_DO_READDIRPLUS, so listings come as
        // plain READDIR, and no FUSE_MAX_PAGES, so max_pages is ignored.
        let body = Body::default()
            .u32(7)
            .u32(minor)
            .u32(max_readahead.min(128 * 1024))
            .u32(0) // flags
            .u16(16) // max_background
            .u16(12) // congestion_threshold
            .u32(MAX_WRITE)
            .u32(1) // time_gran: nanoseconds
            .u16(0) // max_pages
            .u16(0) // map_alignment
            .u32(0) // flags2
            .u32(0) // max_stack_depth
            .zeros(6 * 4);
        let mut body = body.0;
        if minor < 23 {
            body.truncate(INIT_OUT_LEN_COMPAT_22);
        }
        Ok(body)
    }

    /// struct fuse_attr of a node, or None for a node that does not exist.
    fn attr(&self, b: Body, nodeid: u64) -> Option<Body> {
        let (mode, nlink, size) = match nodeid {
            ROOT => (libc::S_IFDIR | 0o555, 2, 0),
            HELLO => (libc::S_IFREG | 0o444, 1, HELLO_DATA.len() as u64),
            _ => return None,
        };
        let t = self.time;
        Some(
            b.u64(nodeid) // ino
                .u64(size)
                .u64(size.div_ceil(512)) // blocks
                .u64(t)
                .u64(t)
                .u64(t)
                .u32(0)
                .u32(0)
                .u32(0)
                .u32(mode)
                .u32(nlink)
                .u32(self.uid)
                .u32(self.gid)
                .u32(0) // rdev
                .u32(4096) // blksize
                .u32(0), // flags
        )
    }

    /// The body is the NUL-terminated name, looked up in directory `parent`.
    fn lookup(&self, parent: u64, b: &[u8]) -> Result<Vec<u8>, i32> {
        if parent != ROOT {
            return Err(if parent == HELLO { libc::ENOTDIR } else { libc::ENOENT });
        }
        let name = b.split(|&c| c == 0).next().unwrap_or_default();
        if name != HELLO_NAME {
            return Err(libc::ENOENT);
        }
        // fuse_entry_out: nodeid, generation, entry_valid, attr_valid,
        // entry_valid_nsec, attr_valid_nsec, attr.
        let b = Body::default().u64(HELLO).u64(0).u64(VALID_SECS).u64(VALID_SECS).u32(0).u32(0);
        self.attr(b, HELLO).map(|b| b.0).ok_or(libc::ENOENT)
    }

    /// fuse_attr_out: attr_valid, attr_valid_nsec, dummy, attr.
    fn getattr(&self, nodeid: u64) -> Result<Vec<u8>, i32> {
        let b = Body::default().u64(VALID_SECS).u32(0).u32(0);
        self.attr(b, nodeid).map(|b| b.0).ok_or(libc::ENOENT)
    }
}

/// fuse_open_out: fh, open_flags, padding. Handles are not needed: the node
/// id in each request says which inode it is about.
fn open_out() -> Vec<u8> {
    Body::default().u64(0).u32(0).u32(0).0
}

/// fuse_open_in: flags, open_flags.
fn open(nodeid: u64, b: &[u8]) -> Result<Vec<u8>, i32> {
    let flags = u32_at(b, 0).ok_or(libc::EINVAL)? as i32;
    match nodeid {
        ROOT => Err(libc::EISDIR),
        HELLO if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 => Err(libc::EROFS),
        HELLO => Ok(open_out()),
        _ => Err(libc::ENOENT),
    }
}

fn opendir(nodeid: u64) -> Result<Vec<u8>, i32> {
    match nodeid {
        ROOT => Ok(open_out()),
        HELLO => Err(libc::ENOTDIR),
        _ => Err(libc::ENOENT),
    }
}

/// fuse_read_in: fh, offset, size, ...; returns (offset, size).
fn read_in(b: &[u8]) -> Result<(u64, usize), i32> {
    match (u64_at(b, 8), u32_at(b, 16)) {
        (Some(offset), Some(size)) => Ok((offset, size as usize)),
        _ => Err(libc::EINVAL),
    }
}

fn read(nodeid: u64, b: &[u8]) -> Result<Vec<u8>, i32> {
    match nodeid {
        HELLO => {}
        ROOT => return Err(libc::EISDIR),
        _ => return Err(libc::ENOENT),
    }
    let (offset, size) = read_in(b)?;
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(HELLO_DATA.len());
    let end = start.saturating_add(size).min(HELLO_DATA.len());
    Ok(HELLO_DATA[start..end].to_vec())
}

/// The root's entries as fuse_dirent records (ino, off, namelen, type, name
/// padded to 8 bytes), from index `offset` on while they fit in `size`. Each
/// record's `off` is where the next listing call resumes.
fn readdir(nodeid: u64, b: &[u8]) -> Result<Vec<u8>, i32> {
    match nodeid {
        ROOT => {}
        HELLO => return Err(libc::ENOTDIR),
        _ => return Err(libc::ENOENT),
    }
    let (offset, size) = read_in(b)?;
    let entries: [(&[u8], u64, u32); 3] = [(b".", ROOT, DT_DIR), (b"..", ROOT, DT_DIR), (HELLO_NAME, HELLO, DT_REG)];
    let mut out = Vec::new();
    for (i, (name, ino, kind)) in entries.iter().enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
        let len = (24 + name.len()).next_multiple_of(8);
        if out.len() + len > size {
            break;
        }
        out.extend_from_slice(&ino.to_ne_bytes());
        out.extend_from_slice(&(i as u64 + 1).to_ne_bytes());
        out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    Ok(out)
}

/// fuse_statfs_out (a fuse_kstatfs): blocks, bfree, bavail, files, ffree,
/// bsize, namelen, frsize, padding, spare[6].
fn statfs() -> Vec<u8> {
    Body::default().u64(1).u64(0).u64(0).u64(2).u64(0).u32(4096).u32(255).u32(4096).u32(0).zeros(6 * 4).0
}

/// fuse_access_in: mask, padding. Sent because the mount does not ask the
/// kernel to check permissions itself (no default_permissions).
fn access(nodeid: u64, b: &[u8]) -> Result<Vec<u8>, i32> {
    let mask = u32_at(b, 0).ok_or(libc::EINVAL)? as i32;
    match nodeid {
        ROOT | HELLO if mask & libc::W_OK != 0 => Err(libc::EROFS),
        ROOT | HELLO => Ok(Vec::new()),
        _ => Err(libc::ENOENT),
    }
}

/// What became of a reply.
enum Sent {
    Done,
    /// The filesystem is gone (ENODEV): stop serving.
    Unmounted,
}

/// One write(2) of fuse_out_header (len, error, unique) and the body.
fn reply(dev: &File, unique: u64, r: Result<Vec<u8>, i32>) -> std::io::Result<Sent> {
    let (error, body) = match r {
        Ok(body) => (0, body),
        Err(errno) => (-errno, Vec::new()),
    };
    let len = OUT_HEADER_LEN + body.len();
    let mut msg = Body::default().u32(len as u32).u32(error as u32).u64(unique).0;
    msg.extend_from_slice(&body);
    match (&*dev).write(&msg) {
        Ok(n) if n == len => Ok(Sent::Done),
        Ok(n) => Err(std::io::Error::other(format!("fuse-hello: short reply write ({n} of {len} bytes)"))),
        Err(e) => match e.raw_os_error() {
            // The request was interrupted and is already gone.
            Some(libc::ENOENT) => Ok(Sent::Done),
            Some(libc::ENODEV) => Ok(Sent::Unmounted),
            _ => Err(std::io::Error::other(format!("fuse-hello: reply to /dev/fuse: {e}"))),
        },
    }
}

fn serve(dev: &File, fs: &Hello) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match (&*dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                // Unmounted (or the connection aborted): the normal end.
                Some(libc::ENODEV) => return Ok(()),
                // ENOENT: the request was interrupted before we read it.
                Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                _ => return Err(std::io::Error::other(format!("fuse-hello: read /dev/fuse: {e}"))),
            },
        };
        let Some(req) = Request::parse(&buf[..n]) else {
            // Without a whole header there is no `unique` to answer to.
            eprintln!("fuse-hello: ignoring a {n}-byte request, shorter than its header");
            continue;
        };
        let sent = match fs.answer(&req) {
            Answer::Silent => Sent::Done,
            Answer::Reply(r) => {
                let init_failed = req.opcode == op::INIT && r.is_err();
                let sent = reply(dev, req.unique, r)?;
                if init_failed {
                    return Err(std::io::Error::other("fuse-hello: could not agree on a FUSE protocol version"));
                }
                sent
            }
            Answer::Stop => {
                reply(dev, req.unique, Ok(Vec::new()))?;
                return Ok(());
            }
        };
        if let Sent::Unmounted = sent {
            return Ok(());
        }
    }
}

fn open_dev() -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/fuse").map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::ENOENT) => "/dev/fuse is missing: give the container the device (c 10:229)".to_string(),
            Some(libc::EACCES | libc::EPERM) => {
                "/dev/fuse: permission denied: allow c 10:229 rw in the container's device cgroup".to_string()
            }
            Some(libc::ENXIO | libc::ENODEV) => {
                "/dev/fuse has no driver behind it: the kernel needs CONFIG_FUSE_FS".to_string()
            }
            _ => format!("open /dev/fuse: {e}"),
        };
        std::io::Error::other(format!("fuse-hello: {why}"))
    })
}

fn mount(dev: &File, mountpoint: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("fuse-hello: mountpoint contains a NUL byte"))?;
    // rootmode is the root's file type in octal (S_IFDIR). user_id/group_id
    // name who may use the mount (without allow_other, only that user).
    let data = CString::new(format!("fd={},rootmode=40000,user_id={uid},group_id={gid}", dev.as_raw_fd()))
        .expect("formatted without NUL");
    // SAFETY: all strings are NUL-terminated and outlive the call.
    let r = unsafe {
        libc::mount(
            c"hello".as_ptr(),
            target.as_ptr(),
            c"fuse.hello".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    let m = mountpoint.display();
    let why = match e.raw_os_error() {
        Some(libc::EPERM) => {
            format!(
                "mount on {m} refused (EPERM): mounting FUSE needs CAP_SYS_ADMIN: give the container that capability"
            )
        }
        Some(libc::ENODEV) => "mount: the kernel has no fuse filesystem type: it needs CONFIG_FUSE_FS".to_string(),
        Some(libc::ENOENT | libc::ENOTDIR) => {
            format!("mountpoint {m} does not exist or is not a directory: create it first")
        }
        _ => format!("mount fuse on {m}: {e}"),
    };
    Err(std::io::Error::other(format!("fuse-hello: {why}")))
}

pub fn run(mountpoint: &Path) -> std::io::Result<()> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let dev = open_dev()?;
    mount(&dev, mountpoint, uid, gid)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "fuse-hello: mounted on {}", mountpoint.display())?;
    out.flush()?;
    drop(out);
    let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    serve(&dev, &Hello { uid, gid, time })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello { uid: 0, gid: 0, time: 0 }
    }

    fn read_in(offset: u64, size: u32) -> Vec<u8> {
        Body::default().u64(0).u64(offset).u32(size).u32(0).u64(0).u32(0).u32(0).0
    }

    /// Every opcode, on every node, with every truncation of a plausible body:
    /// answers without panicking.
    #[test]
    fn short_bodies_do_not_panic() {
        let long = [read_in(0, 4096), b"hello.txt\0".to_vec(), vec![0xff; 64]];
        for opcode in 0..60 {
            for nodeid in [0, ROOT, HELLO, 99] {
                for b in &long {
                    for cut in 0..=b.len() {
                        let _ = hello().answer(&Request { opcode, unique: 1, nodeid, body: &b[..cut] });
                    }
                }
            }
        }
        for n in 0..64 {
            let msg = vec![0xffu8; n];
            let _ = Request::parse(&msg);
        }
    }

    #[test]
    fn init_and_entries() {
        let init = Body::default().u32(7).u32(45).u32(1 << 20).u32(u32::MAX).0;
        let Answer::Reply(Ok(out)) = hello().answer(&Request { opcode: op::INIT, unique: 1, nodeid: 0, body: &init })
        else {
            panic!("INIT refused");
        };
        assert_eq!((out.len(), u32_at(&out, 4), u32_at(&out, 12)), (64, Some(MAX_MINOR), Some(0)));

        assert_eq!(hello().lookup(ROOT, b"hello.txt\0").map(|e| e.len()), Ok(128));
        assert_eq!(hello().lookup(ROOT, b"other\0"), Err(libc::ENOENT));
        assert_eq!(hello().getattr(ROOT).map(|a| a.len()), Ok(104));
        assert_eq!(statfs().len(), 80);

        assert_eq!(read(HELLO, &read_in(6, 4)), Ok(b"from".to_vec()));
        assert_eq!(read(HELLO, &read_in(u64::MAX, u32::MAX)), Ok(Vec::new()));

        let all = readdir(ROOT, &read_in(0, 4096)).unwrap();
        // 24-byte fuse_dirent headers, names padded to 8 bytes.
        assert_eq!(all.len(), 32 + 32 + 40);
        // Room for one entry only; the next call resumes at its `off`.
        assert_eq!(readdir(ROOT, &read_in(0, 40)).unwrap().len(), 32);
        assert_eq!(readdir(ROOT, &read_in(2, 4096)).unwrap(), all[64..].to_vec());
        assert_eq!(readdir(ROOT, &read_in(3, 4096)).unwrap(), Vec::<u8>::new());
    }
}
