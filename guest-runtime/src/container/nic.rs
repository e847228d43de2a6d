//! NICs the host attached for one container: the interfaces of the network
//! namespace its caller made (CNI, Docker), mirrored into the VM
//! (docs/networking.md). Each arrives as a virtio-net device in the VM's
//! own namespace, found by its permanent MAC (its slot's, which no MAC
//! change alters); it is given the host interface's MAC and MTU there,
//! moved into the container's namespace, renamed, addressed and routed
//! there. When that namespace goes, the kernel moves the device back to
//! the VM's namespace, down, ready for the next container.
//!
//! The interface ioctls do all but the move, which only netlink can do: one
//! RTM_NEWLINK message, built here rather than with a netlink stack.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use hearth_agent_protocol::agent::Interface;

use crate::pid1::network::{ifreq, in_netns_of, inet6_socket, inet_socket, ioctl, parse_cidr, set_link, sockaddr};

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> io::Result<[u8; 6]> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} is not a MAC address"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Checks everything the host sent before anything changes.
pub fn validate(nic: &Interface) -> io::Result<()> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    parse_mac(&nic.device_mac)?;
    parse_mac(&nic.mac)?;
    ifreq(&nic.name)?;
    if nic.name.is_empty() || nic.name.contains(['/', ':']) || nic.name == "lo" {
        return Err(bad(format!("{:?} cannot name a container's interface", nic.name)));
    }
    if !(68..=65535).contains(&nic.mtu) {
        return Err(bad(format!("MTU {} of {} is out of range", nic.mtu, nic.name)));
    }
    for a in &nic.ipv4 {
        parse_cidr(a)?;
    }
    for a in &nic.ipv6 {
        parse_cidr6(a)?;
    }
    for r in &nic.routes {
        route(r)?;
    }
    for n in &nic.neighbours {
        n.ip.parse::<std::net::IpAddr>().map_err(|_| bad(format!("neighbour {:?} is not an address", n.ip)))?;
        parse_mac(&n.mac)?;
    }
    Ok(())
}

/// Parses an IPv6 `ADDR/PREFIX`.
fn parse_cidr6(s: &str) -> io::Result<(Ipv6Addr, u8)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} is not an IPv6 ADDR/PREFIX"));
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv6Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix > 128 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// A route of either family, parsed.
enum ParsedRoute {
    Route4 { dst: Ipv4Addr, mask: Ipv4Addr, gateway: Option<Ipv4Addr> },
    Route6 { dst: Ipv6Addr, prefix: u8, gateway: Option<Ipv6Addr> },
}
use ParsedRoute::{Route4, Route6};

fn route(r: &hearth_agent_protocol::agent::Route) -> io::Result<ParsedRoute> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if r.destination.contains(':') {
        let (dst, prefix) = parse_cidr6(&r.destination)?;
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => Some(g.parse::<Ipv6Addr>().map_err(|_| bad(format!("route gateway {g:?} is not an IPv6 address")))?),
        };
        Ok(Route6 { dst, prefix, gateway })
    } else {
        let (dst, mask) = parse_cidr(&r.destination)?;
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => Some(g.parse::<Ipv4Addr>().map_err(|_| bad(format!("route gateway {g:?} is not an IPv4 address")))?),
        };
        Ok(Route4 { dst, mask, gateway })
    }
}

/// The kernel's `struct in6_rtmsg` (linux/ipv6_route.h), for SIOCADDRT on
/// an AF_INET6 socket.
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn in6(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr { s6_addr: a.octets() }
}

fn add_ipv6(sock6: &OwnedFd, name: &str, ifindex: u32, cidr: &str) -> io::Result<()> {
    let (addr, prefix) = parse_cidr6(cidr)?;
    let mut req =
        libc::in6_ifreq { ifr6_addr: in6(addr), ifr6_prefixlen: prefix as u32, ifr6_ifindex: ifindex as libc::c_int };
    ioctl(sock6, libc::SIOCSIFADDR, &mut req as *mut _ as *mut _, &format!("setting {name}'s address {cidr}"))
}

/// The permanent MAC of interface `name` (ETHTOOL_GPERMADDR).
fn permanent_mac(sock: &OwnedFd, name: &str) -> io::Result<[u8; 6]> {
    #[repr(C)]
    struct PermAddr {
        cmd: u32,
        size: u32,
        data: [u8; 32],
    }
    const ETHTOOL_GPERMADDR: u32 = 0x20;
    let mut pa = PermAddr { cmd: ETHTOOL_GPERMADDR, size: 32, data: [0; 32] };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_data = &mut pa as *mut PermAddr as *mut libc::c_char;
    ioctl(sock, libc::SIOCETHTOOL, &mut req as *mut _ as *mut _, &format!("reading {name}'s permanent MAC"))?;
    if pa.size != 6 {
        return Err(io::Error::other(format!("{name} has no Ethernet address")));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&pa.data[..6]);
    Ok(mac)
}

/// The interface in this thread's network namespace whose permanent MAC is
/// `mac`. A NIC that served a container whose namespace is being torn down
/// comes back to the VM's namespace a moment later: it is waited for.
fn find_by_permanent_mac(sock: &OwnedFd, mac: [u8; 6]) -> io::Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        for entry in std::fs::read_dir("/sys/class/net")? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if permanent_mac(sock, &name).is_ok_and(|m| m == mac) {
                return Ok(name);
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no NIC in the VM's network namespace has the MAC {}", fmt_mac(mac)),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn fmt_mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn set_mac(sock: &OwnedFd, name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: sockaddr is plain old data.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in sa.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = sa;
    ioctl(sock, libc::SIOCSIFHWADDR, &mut req as *mut _ as *mut _, &format!("setting {name}'s MAC"))
}

fn set_mtu(sock: &OwnedFd, name: &str, mtu: u32) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl(sock, libc::SIOCSIFMTU, &mut req as *mut _ as *mut _, &format!("setting {name}'s MTU"))
}

fn rename(sock: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    if from == to {
        return Ok(());
    }
    let mut req = ifreq(from)?;
    let new = ifreq(to)?;
    req.ifr_ifru.ifru_newname = new.ifr_name;
    ioctl(sock, libc::SIOCSIFNAME, &mut req as *mut _ as *mut _, &format!("renaming {from} to {to}"))
}

fn index_of(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// One rtnetlink request: a header for `kind` with `flags`, then `body`
/// (the family's fixed header and its attributes, each padded to 4).
fn netlink_message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel's
    msg.extend_from_slice(body);
    msg
}

/// Appends attribute `kind` with `value`, padded to 4 bytes.
fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Sends `msg` to the kernel on a NETLINK_ROUTE socket made by this thread
/// (in its network namespace) and waits for the acknowledgement.
fn netlink_request(msg: &[u8]) -> io::Result<()> {
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: msg is a valid buffer of its length; the destination is the
    // kernel (a zeroed netlink address).
    let sent = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &to as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    ack_error(&buf[..n as usize])
}

/// Moves interface `index` into the network namespace of process `pid`
/// (RTM_NEWLINK with IFLA_NET_NS_PID).
fn move_to_netns_of(index: u32, pid: i32) -> io::Result<()> {
    const IFLA_NET_NS_PID: u16 = 19;
    let mut body = Vec::new();
    body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]); // ifi_family, pad
    body.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    body.extend_from_slice(&(index as i32).to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes()); // ifi_flags
    body.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
    attribute(&mut body, IFLA_NET_NS_PID, &(pid as u32).to_ne_bytes());
    netlink_request(&netlink_message(libc::RTM_NEWLINK, 0, &body))
}

/// The RTM_NEWNEIGH request for a permanent neighbour `ip` at `mac` on
/// interface `index` (an ARP entry, or an NDP one for IPv6).
fn neighbour_message(index: u32, ip: std::net::IpAddr, mac: [u8; 6]) -> Vec<u8> {
    const NDA_DST: u16 = 1;
    const NDA_LLADDR: u16 = 2;
    const NUD_PERMANENT: u16 = 0x80;
    let (family, dst) = match ip {
        std::net::IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
        std::net::IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
    };
    let mut body = Vec::new();
    body.extend_from_slice(&[family as u8, 0]); // ndm_family, pad
    body.extend_from_slice(&0u16.to_ne_bytes()); // pad
    body.extend_from_slice(&(index as i32).to_ne_bytes());
    body.extend_from_slice(&NUD_PERMANENT.to_ne_bytes());
    body.extend_from_slice(&[0, 0]); // ndm_flags, ndm_type
    attribute(&mut body, NDA_DST, &dst);
    attribute(&mut body, NDA_LLADDR, &mac);
    let flags = (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    netlink_message(libc::RTM_NEWNEIGH, flags, &body)
}

/// The error an NLMSG_ERROR answer carries (0: an acknowledgement).
fn ack_error(reply: &[u8]) -> io::Result<()> {
    if reply.len() < 20 {
        return Err(io::Error::other("a short netlink answer"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other(format!("netlink answered with message type {kind}")));
    }
    match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// Gives the container whose init is `pid` (created, in a network namespace
/// of its own) the NIC `nic` describes.
pub fn move_into(pid: i32, nic: &Interface) -> io::Result<()> {
    validate(nic)?;
    let sock = inet_socket()?;
    let current = find_by_permanent_mac(&sock, parse_mac(&nic.device_mac)?)?;
    set_link(&sock, &current, false)?;
    set_mac(&sock, &current, parse_mac(&nic.mac)?)?;
    set_mtu(&sock, &current, nic.mtu)?;
    let index = index_of(&current)?;
    move_to_netns_of(index, pid).map_err(|e| io::Error::new(e.kind(), format!("moving {current}: {e}")))?;
    let nic = nic.clone();
    in_netns_of(pid, move || {
        let sock = inet_socket()?;
        // The same index in the new namespace, unless it was taken there.
        let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: name has room for IF_NAMESIZE bytes.
        let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
        let here = if found.is_null() {
            current.clone()
        } else {
            // SAFETY: if_indextoname wrote a NUL-terminated name.
            unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned()
        };
        let here = if here == "lo" { current.clone() } else { here };
        rename(&sock, &here, &nic.name)?;
        for (i, a) in nic.ipv4.iter().enumerate() {
            // Further addresses go on labels (eth0:1), as ifconfig did.
            let label = if i == 0 { nic.name.clone() } else { format!("{}:{i}", nic.name) };
            let (addr, mask) = parse_cidr(a)?;
            let mut req = ifreq(&label)?;
            req.ifr_ifru.ifru_addr = sockaddr(addr);
            ioctl(&sock, libc::SIOCSIFADDR, &mut req as *mut _ as *mut _, &format!("setting {label}'s address"))?;
            req.ifr_ifru.ifru_netmask = sockaddr(mask);
            ioctl(&sock, libc::SIOCSIFNETMASK, &mut req as *mut _ as *mut _, &format!("setting {label}'s netmask"))?;
        }
        let ifindex = index_of(&nic.name)?;
        let sock6 = if nic.ipv6.is_empty() && !nic.routes.iter().any(|r| r.destination.contains(':')) {
            None
        } else {
            Some(inet6_socket()?)
        };
        for a in &nic.ipv6 {
            add_ipv6(sock6.as_ref().expect("made above"), &nic.name, ifindex, a)?;
        }
        set_link(&sock, &nic.name, true)?;
        let dev = std::ffi::CString::new(nic.name.clone()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        for r in &nic.routes {
            let what = format!("adding the route to {}", r.destination);
            match route(r)? {
                Route4 { dst, mask, gateway } => {
                    // SAFETY: rtentry is plain old data.
                    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
                    rt.rt_dst = sockaddr(dst);
                    rt.rt_genmask = sockaddr(mask);
                    rt.rt_flags = libc::RTF_UP;
                    if let Some(gw) = gateway {
                        rt.rt_gateway = sockaddr(gw);
                        rt.rt_flags |= libc::RTF_GATEWAY;
                    }
                    rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
                    ioctl(&sock, libc::SIOCADDRT, &mut rt as *mut _ as *mut _, &what)?;
                }
                Route6 { dst, prefix, gateway } => {
                    let mut rt = In6Rtmsg {
                        dst: in6(dst),
                        src: in6(Ipv6Addr::UNSPECIFIED),
                        gateway: in6(gateway.unwrap_or(Ipv6Addr::UNSPECIFIED)),
                        kind: 0,
                        dst_len: prefix as u16,
                        src_len: 0,
                        metric: 1024,
                        info: 0,
                        flags: (libc::RTF_UP | if gateway.is_some() { libc::RTF_GATEWAY } else { 0 }) as u32,
                        ifindex: ifindex as libc::c_int,
                    };
                    let sock6 = sock6.as_ref().expect("made above");
                    ioctl(sock6, libc::SIOCADDRT, &mut rt as *mut _ as *mut _, &what)?;
                }
            }
        }
        for n in &nic.neighbours {
            let (ip, mac) = (n.ip.parse().expect("validated"), parse_mac(&n.mac)?);
            netlink_request(&neighbour_message(ifindex, ip, mac))
                .map_err(|e| io::Error::new(e.kind(), format!("adding the neighbour {}: {e}", n.ip)))?;
        }
        tracing::info!(
            name = nic.name,
            mac = nic.mac,
            ipv4 = ?nic.ipv4,
            ipv6 = ?nic.ipv6,
            routes = nic.routes.len(),
            neighbours = nic.neighbours.len(),
            "container NIC up"
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_agent_protocol::agent::{Neighbour, Route};

    fn nic() -> Interface {
        Interface {
            device_mac: "02:68:65:00:00:01".into(),
            name: "eth0".into(),
            mac: "0a:58:0a:58:00:05".into(),
            mtu: 1500,
            ipv4: vec!["10.88.0.5/16".into()],
            routes: vec![Route { destination: "0.0.0.0/0".into(), gateway: "10.88.0.1".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("02:68:65:00:00:0a").unwrap(), [2, 0x68, 0x65, 0, 0, 10]);
        for bad in ["02:68:65:00:00", "02:68:65:00:00:00:01", "zz:68:65:00:00:01", ""] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn what_the_host_sends_is_checked_before_anything_changes() {
        assert!(validate(&nic()).is_ok());
        let cases: Vec<fn(&mut Interface)> = vec![
            |n| n.name = "lo".into(),
            |n| n.name = "a/b".into(),
            |n| n.name = "x".repeat(16),
            |n| n.mtu = 10,
            |n| n.mac = "nope".into(),
            |n| n.ipv4 = vec!["10.0.0.1".into()],
            |n| n.routes[0].gateway = "gw".into(),
            |n| n.routes[0].destination = "default".into(),
            |n| n.ipv6 = vec!["fd00::5".into()],
            |n| n.ipv6 = vec!["fd00::5/129".into()],
            |n| n.routes[0].gateway = "fd00::1".into(),
            |n| n.routes = vec![Route { destination: "::/0".into(), gateway: "10.0.0.1".into(), ..Default::default() }],
            |n| n.neighbours = vec![Neighbour { ip: "10.0.0.9".into(), mac: "bad".into(), ..Default::default() }],
            |n| {
                n.neighbours = vec![Neighbour { ip: "x".into(), mac: "0a:58:00:00:00:09".into(), ..Default::default() }]
            },
        ];
        for (i, change) in cases.into_iter().enumerate() {
            let mut n = nic();
            change(&mut n);
            assert!(validate(&n).is_err(), "case {i}");
        }
    }

    #[test]
    fn ipv6_addresses_and_routes_are_understood() {
        let mut n = nic();
        n.ipv6 = vec!["fd00:88::5/64".into()];
        n.routes.push(Route { destination: "::/0".into(), gateway: "fd00:88::1".into(), ..Default::default() });
        assert!(validate(&n).is_ok());
        assert_eq!(parse_cidr6("fd00:88::5/64").unwrap(), ("fd00:88::5".parse().unwrap(), 64));
        assert!(matches!(route(&n.routes[1]).unwrap(), Route6 { prefix: 0, gateway: Some(_), .. }));
        assert_eq!(std::mem::size_of::<In6Rtmsg>(), 80, "the kernel's struct in6_rtmsg");
    }

    #[test]
    fn netlink_requests_are_laid_out_as_the_kernel_reads_them() {
        let msg = netlink_message(libc::RTM_NEWLINK, 0, &[0u8; 24]);
        assert_eq!(msg.len(), 40);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 40, "nlmsg_len");
        let n = neighbour_message(3, "10.77.0.9".parse().unwrap(), [10, 88, 0, 0, 0, 9]);
        // header 16, ndmsg 12, NDA_DST 4+4, NDA_LLADDR 4+6 padded to 12
        assert_eq!(n.len(), 48);
        assert_eq!(&n[28..32], &[8, 0, 1, 0], "NDA_DST, 8 bytes");
        assert_eq!(&n[36..46], &[10, 0, 2, 0, 10, 88, 0, 0, 0, 9], "NDA_LLADDR");
        let n6 = neighbour_message(3, "fd00::9".parse().unwrap(), [0; 6]);
        assert_eq!(n6.len(), 60);
    }

    #[test]
    fn netlink_acks_and_errors_are_told_apart() {
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        assert!(ack_error(&ack).is_ok());
        ack[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(ack_error(&ack).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(ack_error(&ack[..10]).is_err());
    }
}
