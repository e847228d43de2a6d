//! The VM's network: loopback always; eth0 with the address and gateway on
//! the command line (`hearth.ip=ADDR/PREFIX hearth.gw=GW`) when given, and
//! /etc/resolv.conf naming the resolvers of `hearth.dns=NS[,NS..]` (the
//! shim passes the host's: docs/networking.md).
//! Done with the classic interface ioctls: three calls do not justify a
//! netlink stack in PID 1.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::BootParams;

pub(crate) fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?} is too long")));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

pub(crate) fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // the family to know which it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

pub(crate) fn ioctl(sock: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> io::Result<()> {
    // SAFETY: each caller passes the structure its request expects.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

pub(crate) fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    set_link(sock, name, true)
}

/// Brings interface `name` up (and running) or takes it down.
pub(crate) fn set_link(sock: &OwnedFd, name: &str, up: bool) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req as *mut _ as *mut _, &format!("reading {name}'s flags"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = if up {
        flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short
    } else {
        flags & !(libc::IFF_UP as libc::c_short)
    };
    let what = if up { format!("bringing {name} up") } else { format!("taking {name} down") };
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req as *mut _ as *mut _, &what)
}

/// An AF_INET datagram socket, for the interface ioctls.
pub(crate) fn inet_socket() -> io::Result<OwnedFd> {
    socket_of(libc::AF_INET)
}

/// An AF_INET6 datagram socket, for the IPv6 address and route ioctls.
pub(crate) fn inet6_socket() -> io::Result<OwnedFd> {
    socket_of(libc::AF_INET6)
}

fn socket_of(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Parses `ADDR/PREFIX` into the address and its netmask.
pub fn parse_cidr(s: &str) -> io::Result<(Ipv4Addr, Ipv4Addr)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} is not an IPv4 ADDR/PREFIX"));
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u32 = p.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    Ok((addr, Ipv4Addr::from(mask)))
}

pub fn bring_up(params: &BootParams) -> io::Result<()> {
    let sock = inet_socket()?;
    set_up(&sock, "lo")?;
    let Some(ip) = &params.ip else { return Ok(()) };
    let (addr, mask) = parse_cidr(ip)?;
    let mut req = ifreq("eth0")?;
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req as *mut _ as *mut _, "setting eth0's address")?;
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req as *mut _ as *mut _, "setting eth0's netmask")?;
    set_up(&sock, "eth0")?;
    if let Some(gw) = &params.gateway {
        let gw: Ipv4Addr = gw
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("hearth.gw={gw:?} is not an address")))?;
        // SAFETY: rtentry is plain old data.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(&sock, libc::SIOCADDRT, &mut rt as *mut _ as *mut _, "adding the default route")?;
    }
    tracing::info!(%addr, %mask, gateway = ?params.gateway, "eth0 up");
    if let Some(dns) = &params.dns {
        let text = resolv_conf(dns)?;
        std::fs::create_dir_all("/etc")?;
        std::fs::write(RESOLV_CONF, text)?;
    }
    Ok(())
}

/// Brings loopback up in the network namespace of process `pid` (a
/// container's init, created and not started), as runc does for a
/// container given a network namespace of its own: libcontainer leaves its
/// `lo` down, and programs that talk to 127.0.0.1 would fail. Nothing is
/// done for a process in the agent's own namespace. The work runs on a
/// thread of its own, which alone enters the namespace and then ends.
pub fn loopback_up_in(pid: i32) -> io::Result<()> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net"))?;
    let ours = std::fs::metadata("/proc/self/ns/net")?;
    use std::os::unix::fs::MetadataExt;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Ok(());
    }
    in_netns_of(pid, || set_up(&inet_socket()?, "lo"))
}

/// Runs `f` on a thread of its own that has entered the network namespace
/// of process `pid`; the thread ends with it, and no other thread of the
/// agent ever leaves the VM's namespace.
pub(crate) fn in_netns_of<T: Send + 'static>(
    pid: i32,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace descriptor we own; it changes only
        // this thread, which ends after f.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

/// The VM's resolver configuration, which containers sharing the VM's
/// network (distros) get a copy of.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// resolv.conf for the comma-separated IPv4 resolvers of `hearth.dns=`.
pub fn resolv_conf(dns: &str) -> io::Result<String> {
    let mut text = String::from("# Written by hearth at the VM's boot: the host's resolvers (hearth.dns=).\n");
    for ns in dns.split(',').filter(|s| !s.is_empty()) {
        let addr: Ipv4Addr = ns.parse().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("hearth.dns: {ns:?} is not an IPv4 address"))
        })?;
        text.push_str(&format!("nameserver {addr}\n"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_to_address_and_mask() {
        assert_eq!(
            parse_cidr("10.0.2.15/24").unwrap(),
            ("10.0.2.15".parse().unwrap(), "255.255.255.0".parse().unwrap())
        );
        assert_eq!(parse_cidr("1.2.3.4/32").unwrap().1, Ipv4Addr::BROADCAST);
        assert_eq!(parse_cidr("1.2.3.4/0").unwrap().1, Ipv4Addr::UNSPECIFIED);
        for bad in ["1.2.3.4", "1.2.3/24", "1.2.3.4/33", "x/1"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolvers_become_nameserver_lines() {
        let text = resolv_conf("10.0.0.1,192.168.1.1").unwrap();
        assert!(text.ends_with("nameserver 10.0.0.1\nnameserver 192.168.1.1\n"), "{text}");
        assert!(resolv_conf("10.0.0.1,evil\nsearch x").is_err(), "only addresses get in");
    }
}
