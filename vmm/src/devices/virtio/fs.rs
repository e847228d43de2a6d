//! virtio-fs (device type 26) as a vhost-user frontend: the FUSE requests the
//! guest puts on the queues are served by virtiofsd, a separate process that
//! maps guest memory itself (guest RAM is a shared memfd for this reason) and
//! is woken directly by the queues' KVM ioeventfds.
//!
//! The VMM's part: the device's config space (tag, number of request
//! queues), feature negotiation relayed to virtiofsd, the memory table and
//! vring addresses at activation, and interrupts. virtio-mmio drivers only
//! look at the queues if InterruptStatus says so, so virtiofsd's "call"
//! eventfds are not irqfds: a worker waits on them and raises the interrupt
//! through [`Interrupt::signal_used`], which sets that bit first.
//!
//! With `dir=` the VMM starts virtiofsd itself (found as `$HEARTH_VIRTIOFSD`,
//! on PATH, or in ~/.cargo/bin) and stops it with the VM; with `socket=` it
//! connects to one started by someone else.

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{self, DeviceWorker, Poller};
use super::{Activation, Interrupt, VirtioDevice, WorkerHandle, TYPE_FS};

/// hiprio queue + one request queue (virtiofsd serves one request queue).
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 1024;
const TAG_LEN: usize = 36;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// `--fs tag=TAG,dir=DIR[,cache=auto|always|never|metadata][,xattr=on|off]`
/// or `--fs tag=TAG,socket=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    pub tag: String,
    pub dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub cache: String,
    /// Extended attributes passed through (virtiofsd `--xattr`): file
    /// capabilities, ACLs, and tools that copy them (Docker's vfs driver).
    pub xattr: bool,
}

impl FsConfig {
    pub fn parse(s: &str) -> Result<FsConfig, String> {
        const USAGE: &str =
            "use tag=TAG,dir=DIR[,cache=auto|always|never|metadata][,xattr=on|off] or tag=TAG,socket=PATH";
        let mut c = FsConfig { tag: String::new(), dir: None, socket: None, cache: "auto".into(), xattr: false };
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tag", v)) => c.tag = v.to_string(),
                Some(("dir", v)) if !v.is_empty() => c.dir = Some(v.into()),
                Some(("socket", v)) if !v.is_empty() => c.socket = Some(v.into()),
                Some(("cache", v)) if ["auto", "always", "never", "metadata"].contains(&v) => c.cache = v.into(),
                Some(("xattr", "on")) => c.xattr = true,
                Some(("xattr", "off")) => c.xattr = false,
                _ => return Err(format!("bad virtio-fs option {opt:?}: {USAGE}")),
            }
        }
        if c.tag.is_empty() || c.tag.len() > TAG_LEN {
            return Err(format!("a virtio-fs tag of 1 to {TAG_LEN} bytes is needed: {USAGE}"));
        }
        if c.dir.is_some() == c.socket.is_some() {
            return Err(format!("give exactly one of dir= and socket=: {USAGE}"));
        }
        Ok(c)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot find virtiofsd: install it with `cargo xtask setup` (cargo install virtiofsd), \
         put it on PATH, or set HEARTH_VIRTIOFSD"
    )]
    NoVirtiofsd,
    #[error("the shared directory {0} does not exist or is not a directory")]
    NoDir(PathBuf),
    #[error("starting virtiofsd ({path}): {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("making a private directory for virtiofsd's socket: {0}")]
    SocketDir(std::io::Error),
    #[error("virtiofsd did not create its socket {0} in time (its messages are above)")]
    NoSocket(PathBuf),
    #[error("vhost-user with virtiofsd at {socket}: {what}: {source}")]
    VhostUser { socket: PathBuf, what: &'static str, source: vhost::Error },
}

fn find_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HEARTH_VIRTIOFSD") {
        return Some(p.into());
    }
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push("/usr/libexec".into());
    dirs.into_iter().map(|d| d.join("virtiofsd")).find(|p| p.is_file())
}

pub struct Fs {
    config: FsConfig,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    virtiofsd: Option<Child>,
}

impl Fs {
    pub fn new(config: FsConfig) -> Result<Fs, Error> {
        Fs::new_in(config, None)
    }

    /// [`Fs::new`], with virtiofsd's socket (for the moment it takes to
    /// connect) in a private directory under `socket_base` (the VMM's jail,
    /// inside the VM's directory) rather than under the temporary directory.
    pub fn new_in(config: FsConfig, socket_base: Option<&Path>) -> Result<Fs, Error> {
        let (socket, virtiofsd) = match (&config.dir, &config.socket) {
            (Some(dir), _) => {
                if !dir.is_dir() {
                    return Err(Error::NoDir(dir.clone()));
                }
                // In a directory of our own (mkdtemp: an unpredictable name,
                // mode 0700), never at a predictable name in /tmp where
                // another user could squat on it or plant a symlink.
                // Short names in the jail: a Unix socket's path has at most
                // 107 bytes, and the VM's directory may be deep.
                let socket = match socket_base {
                    Some(base) => private_dir(base, "fs-")?.join("sock"),
                    None => private_dir(&std::env::temp_dir(), "hearth-virtiofsd-")?.join("virtiofsd.sock"),
                };
                let path = find_virtiofsd().ok_or(Error::NoVirtiofsd)?;
                let mut cmd = Command::new(&path);
                cmd.arg(format!("--socket-path={}", socket.display()))
                    .arg(format!("--shared-dir={}", dir.display()))
                    .arg(format!("--cache={}", config.cache))
                    .args(["--log-level", "error"])
                    .args(config.xattr.then_some("--xattr"))
                    .stdin(Stdio::null());
                // virtiofsd must not outlive us: a VMM killed by SIGKILL runs
                // no Drop, and an orphan would keep the share (and whatever
                // pipes it inherited) open. The main thread, which spawns it,
                // lives as long as the process.
                // SAFETY: prctl is async-signal-safe and touches no memory of ours.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = cmd.spawn().map_err(|source| Error::Spawn { path: path.clone(), source })?;
                (socket, Some(child))
            }
            (None, Some(socket)) => (socket.clone(), None),
            (None, None) => unreachable!("FsConfig::parse requires dir= or socket="),
        };
        let mut fs_child = virtiofsd;
        let deadline = Instant::now() + Duration::from_secs(20);
        let frontend = loop {
            match Frontend::connect(&socket, NUM_QUEUES as u64) {
                Ok(f) => break f,
                Err(_)
                    if Instant::now() < deadline
                        && fs_child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(None))) =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => {
                    if let Some(mut c) = fs_child {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(Error::NoSocket(socket));
                }
            }
        };
        let mut fs = Fs { config, socket, frontend, backend_features: 0, protocol: false, virtiofsd: fs_child };
        fs.negotiate()?;
        // Connected: the socket's name is needed no more. Removed now, it is
        // not left in /tmp by a VMM that is killed, nor out of reach of a
        // jailed one (see crate::jail).
        if fs.virtiofsd.is_some() {
            remove_socket(&fs.socket);
        }
        Ok(fs)
    }

    fn vhost<T>(&self, what: &'static str, r: Result<T, vhost::Error>) -> Result<T, Error> {
        r.map_err(|source| Error::VhostUser { socket: self.socket.clone(), what, source })
    }

    fn negotiate(&mut self) -> Result<(), Error> {
        let r = self.frontend.set_owner();
        self.vhost("set owner", r)?;
        let r = self.frontend.get_features();
        self.backend_features = self.vhost("get features", r)?;
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let r = self.frontend.get_protocol_features();
            let theirs = self.vhost("get protocol features", r)?;
            let r = self.frontend.set_protocol_features(theirs & VhostUserProtocolFeatures::MQ);
            self.vhost("set protocol features", r)?;
            self.protocol = true;
        }
        Ok(())
    }

    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; TAG_LEN + 4];
        c[..self.config.tag.len()].copy_from_slice(self.config.tag.as_bytes());
        c[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        c
    }

    fn setup_vrings(&mut self, a: &Activation, calls: &[EventFd]) -> Result<(), Error> {
        let features = a.acked_features | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES);
        let r = self.frontend.set_features(features);
        self.vhost("set features", r)?;
        let mut regions = Vec::new();
        for region in a.mem.iter() {
            let fo = region.file_offset().expect("guest memory is memfd-backed (vstate::vm::guest_memory)");
            let host = region.get_host_address(MemoryRegionAddress(0)).expect("a region's first byte is mapped");
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            });
        }
        let r = self.frontend.set_mem_table(&regions);
        self.vhost("set the memory table", r)?;
        // vring addresses go to virtiofsd in our address space; it translates
        // them with the memory table. They were checked by the transport.
        let hva = |addr: u64| a.mem.get_host_address(GuestAddress(addr)).map(|p| p as u64).unwrap_or(0);
        for (i, q) in a.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let r = self.frontend.set_vring_num(i, q.size());
            self.vhost("set vring num", r)?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: hva(q.desc_table()),
                used_ring_addr: hva(q.used_ring()),
                avail_ring_addr: hva(q.avail_ring()),
                log_addr: None,
            };
            let r = self.frontend.set_vring_addr(i, &cfg);
            self.vhost("set vring addresses", r)?;
            let r = self.frontend.set_vring_base(i, 0);
            self.vhost("set vring base", r)?;
            let r = self.frontend.set_vring_call(i, &calls[i]);
            self.vhost("set vring call", r)?;
            let r = self.frontend.set_vring_kick(i, &a.queue_events[i]);
            self.vhost("set vring kick", r)?;
            if self.protocol {
                let r = self.frontend.set_vring_enable(i, true);
                self.vhost("enable vring", r)?;
            }
        }
        Ok(())
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if let Some(mut c) = self.virtiofsd.take() {
            let _ = c.kill();
            let _ = c.wait();
            remove_socket(&self.socket);
        }
    }
}

/// Removes virtiofsd's socket, the pid file it keeps beside it
/// (`<socket>.pid`), and the private directory they are in.
fn remove_socket(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    let mut pid = socket.as_os_str().to_owned();
    pid.push(".pid");
    let _ = std::fs::remove_file(pid);
    if let Some(dir) = socket.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// A fresh directory only we can enter, under `base`, named `prefix` and
/// six random characters.
fn private_dir(base: &Path, prefix: &str) -> Result<PathBuf, Error> {
    let template = base.join(format!("{prefix}XXXXXX"));
    let mut bytes = std::ffi::CString::new(template.into_os_string().into_encoded_bytes())
        .expect("a temporary directory path has no NUL")
        .into_bytes_with_nul();
    // SAFETY: a writable NUL-terminated template that outlives the call.
    let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(Error::SocketDir(std::io::Error::last_os_error()));
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }
    fn features(&self) -> u64 {
        self.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data)
    }
    fn activate(&mut self, a: Activation) -> Result<WorkerHandle, String> {
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        self.setup_vrings(&a, &calls).map_err(|e| e.to_string())?;
        worker::spawn("virtio-fs", CallRelay { calls, interrupt: a.interrupt })
    }
}

/// Turns virtiofsd's used-buffer notifications into the device's interrupt.
struct CallRelay {
    calls: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
}

impl DeviceWorker for CallRelay {
    fn init(&mut self, poller: &Poller) -> std::io::Result<()> {
        for (i, c) in self.calls.iter().enumerate() {
            poller.add(c.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        Ok(())
    }
    fn handle(&mut self, token: u64, _events: EventSet, _poller: &Poller) {
        if let Some(c) = self.calls.get(token as usize) {
            let _ = c.read();
            self.interrupt.signal_used();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_directory_is_private_and_unpredictable() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = std::env::temp_dir();
        let (a, b) = (private_dir(&tmp, "hearth-virtiofsd-").unwrap(), private_dir(&tmp, "fs-").unwrap());
        assert_ne!(a, b);
        for d in [&a, &b] {
            let meta = std::fs::symlink_metadata(d).unwrap();
            assert!(meta.is_dir() && !meta.file_type().is_symlink());
            assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{}", d.display());
            std::fs::remove_dir(d).unwrap();
        }
    }

    #[test]
    fn the_socket_its_pid_file_and_their_directory_are_removed() {
        let dir = private_dir(&std::env::temp_dir(), "fs-").unwrap();
        let socket = dir.join("sock");
        // What virtiofsd leaves there: its socket and `<socket>.pid`.
        std::fs::write(&socket, "").unwrap();
        std::fs::write(dir.join("sock.pid"), "42").unwrap();
        remove_socket(&socket);
        assert!(!dir.exists(), "{} is left behind", dir.display());
    }

    #[test]
    fn options() {
        let c = FsConfig::parse("tag=home,dir=/root,cache=never").unwrap();
        assert_eq!((c.tag.as_str(), c.dir.as_deref(), c.cache.as_str()), ("home", Some(Path::new("/root")), "never"));
        assert!(!c.xattr);
        assert!(FsConfig::parse("tag=r,dir=/r,cache=always,xattr=on").unwrap().xattr);
        assert!(FsConfig::parse("tag=r,dir=/r,xattr=yes").is_err());
        assert_eq!(FsConfig::parse("tag=h,socket=/s").unwrap().socket.as_deref(), Some(Path::new("/s")));
        assert!(FsConfig::parse("tag=h").unwrap_err().contains("exactly one"));
        assert!(FsConfig::parse("tag=h,dir=/a,socket=/s").is_err());
        assert!(FsConfig::parse("dir=/a").unwrap_err().contains("tag"));
        assert!(FsConfig::parse(&format!("tag={},dir=/a", "x".repeat(37))).is_err());
        assert!(FsConfig::parse("tag=h,dir=/a,cache=sometimes").is_err());
    }

    #[test]
    fn missing_shared_dir_is_named() {
        let c = FsConfig::parse("tag=h,dir=/nonexistent/share").unwrap();
        let e = Fs::new(c).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/share"), "{e}");
    }
}
