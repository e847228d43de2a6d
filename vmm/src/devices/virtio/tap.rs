//! A host tap device: the back end of virtio-net.
//!
//! `Tap::open(name)` opens /dev/net/tun and binds the descriptor to the tap
//! interface `name` with TUNSETIFF (IFF_TAP | IFF_NO_PI): it attaches to an
//! existing tap (created beforehand with `ip tuntap add dev NAME mode tap`,
//! optionally `user ...` so that no privilege is needed here), or creates a
//! new one, which needs CAP_NET_ADMIN and lives as long as the descriptor.
//! A created tap is down and has no address: configuring it is the host's
//! business.
//!
//! No IFF_VNET_HDR: the tap carries bare Ethernet frames. The device strips
//! and adds the virtio-net header itself, so the guest cannot hand offload
//! metadata (GSO, partial checksums) to the host kernel, and the host kernel
//! never sends the guest frames that need offloads (the tap's offloads stay
//! off, so the host stack completes checksums and segments before the tap).
//!
//! The descriptor is non-blocking: a read with no frame waiting fails with
//! `WouldBlock`, and one read or write is one whole frame.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

const TUN_PATH: &str = "/dev/net/tun";

/// The frame I/O the virtio-net device needs from its back end; a tap, or a
/// socketpair or in-memory fake in tests.
pub trait TapIo: Send {
    /// Reads one frame into `buf`, returning its length; `WouldBlock` when
    /// none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one whole frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// One end of a datagram socketpair standing in for a tap, in unit tests
/// and the fuzz target: one datagram is one frame, as on a tap.
pub struct DatagramTap(pub std::os::unix::net::UnixDatagram);

impl TapIo for DatagramTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.send(frame).map(|_| ())
    }
}

impl std::os::fd::AsRawFd for DatagramTap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

pub struct Tap {
    file: File,
    name: String,
}

/// Checks an interface name the way the kernel will (IFNAMSIZ includes the
/// terminating NUL), so that a bad name is an error that says so.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a tap needs a name".into());
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!("tap name {name:?} is longer than {} bytes", libc::IFNAMSIZ - 1));
    }
    if name == "." || name == ".." || name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

impl Tap {
    /// Attaches to the tap `name`, or creates it.
    pub fn open(name: &str) -> io::Result<Tap> {
        check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let existed = interface_exists(name);
        let path = std::ffi::CString::new(TUN_PATH).unwrap();
        // SAFETY: a plain open(2) of a NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let msg = match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => format!(
                    "{TUN_PATH} is missing ({e}): load the tun module (`modprobe tun`), or create the node \
                     (`mkdir -p /dev/net && mknod {TUN_PATH} c 10 200`)"
                ),
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    format!("no permission to open {TUN_PATH} ({e}): it should be mode 0666, or run as root")
                }
                _ => format!("opening {TUN_PATH}: {e}"),
            };
            return Err(io::Error::new(e.kind(), msg));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };

        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may write back) one ifreq, which lives
        // on this stack frame for the whole call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let msg = match e.raw_os_error() {
                Some(libc::EPERM) if existed => format!(
                    "attaching to the tap {name} is not permitted ({e}): it belongs to another user or group; \
                     recreate it with `ip tuntap add dev {name} mode tap user $USER`, or run with CAP_NET_ADMIN"
                ),
                Some(libc::EPERM) => format!(
                    "creating the tap {name} needs CAP_NET_ADMIN ({e}): create it beforehand with \
                     `ip tuntap add dev {name} mode tap user $USER`, or run as root"
                ),
                Some(libc::EBUSY) => format!("the tap {name} is already in use by another process ({e})"),
                Some(libc::EINVAL) => format!(
                    "{name} exists but is not a single-queue tap device ({e}): it may be a tun device, a \
                     multi_queue tap, or another kind of interface"
                ),
                _ => format!("TUNSETIFF on {name}: {e}"),
            };
            return Err(io::Error::new(e.kind(), msg));
        }
        tracing::info!(tap = name, created = !existed, "tap opened");
        Ok(Tap { file, name: name.to_string() })
    }

    /// Takes a tap descriptor opened by someone else (sent to the control
    /// socket): it must be a tap bound to an interface, opened read-write
    /// with IFF_TAP | IFF_NO_PI and without IFF_VNET_HDR, as [`Tap::open`]
    /// opens one. It is made non-blocking (which the sender's descriptor
    /// shares: it is one open file).
    pub fn from_received(file: File) -> Result<Tap, String> {
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq, which lives on this stack frame.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut ifr as *mut libc::ifreq) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(format!(
                "the descriptor is not a tap bound to an interface ({e}): open {TUN_PATH} and bind it with TUNSETIFF"
            ));
        }
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        let name: String =
            ifr.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| char::from(c as u8)).collect::<String>();
        if flags & libc::IFF_TAP == 0 {
            return Err(format!("{name} is a tun device: attach a tap (IFF_TAP), which carries Ethernet frames"));
        }
        if flags & libc::IFF_NO_PI == 0 || flags & libc::IFF_VNET_HDR != 0 {
            return Err(format!(
                "the tap {name} was opened with packet information or a vnet header: open it with \
                 IFF_TAP | IFF_NO_PI only (the device adds and strips the virtio-net header itself)"
            ));
        }
        // SAFETY: F_GETFL / F_SETFL on a descriptor we own.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 || fl & libc::O_ACCMODE != libc::O_RDWR {
            return Err(format!("the tap {name} was not opened read-write: open it O_RDWR"));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(format!("making the tap {name} non-blocking: {}", io::Error::last_os_error()));
        }
        Ok(Tap { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap { file: self.file.try_clone()?, name: self.name.clone() })
    }
}

impl std::os::fd::AsFd for Tap {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl TapIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: reads at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: writes `frame.len()` bytes from `frame`.
            let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                // A tap takes a frame whole or not at all.
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("hearth0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a-very-long-name").is_err()); // 16 bytes
        assert!(check_name("abcdefghijklmno").is_ok()); // 15 bytes
        assert!(check_name("a/b").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("..").is_err());
    }

    #[test]
    fn a_received_descriptor_that_is_no_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        let e = Tap::from_received(file).err().unwrap();
        assert!(e.contains("not a tap"), "{e}");
    }

    #[test]
    fn bad_names_fail_before_touching_the_host() {
        let e = Tap::open("bad/name").err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
