//! Localhost forwarding, the guest's side (docs/networking.md): which TCP
//! ports something in the agent's network namespace listens on (the VM's:
//! distros and containers sharing it), and the relay that connects each host
//! connection to one of them, as WSL's relay does for its distributions.
//!
//! The relay listens on vsock port [`FORWARD_PORT`]. A connection sends the
//! TCP port it wants (2 bytes, big-endian); the relay connects to that port
//! on the VM's loopback (127.0.0.1, then ::1), answers one byte (0 connected,
//! 1 refused) and copies bytes both ways until either side ends. Only the
//! host reaches a guest vsock listener, and only loopback is dialled, so the
//! relay gives the host nothing that the listing did not already offer.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub use hearth_agent_protocol::transport::FORWARD_PORT;

/// TCP LISTEN in /proc/net/tcp's `st` column.
const TCP_LISTEN: &str = "0A";

/// The ports of /proc/net/tcp and /proc/net/tcp6 that listen at a wildcard
/// or loopback address, sorted and each once.
pub fn listening_ports() -> Vec<u32> {
    let mut ports = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(text) = std::fs::read_to_string(path) {
            ports.extend(parse_listeners(&text, v6));
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Listening ports of one /proc/net/tcp{,6} table whose local address is a
/// wildcard or loopback one.
pub fn parse_listeners(text: &str, v6: bool) -> Vec<u32> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            if state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u32::from_str_radix(port, 16).ok()?;
            let reachable = if v6 {
                // Four host-order 32-bit words.
                addr.len() == 32 && (addr == "0".repeat(32) || addr == "00000000000000000000000001000000")
            } else {
                let a = u32::from_str_radix(addr, 16).ok()?;
                let ip = Ipv4Addr::from(u32::from_be(a));
                ip.is_unspecified() || ip.is_loopback()
            };
            reachable.then_some(port)
        })
        .collect()
}

/// Starts the relay on its own thread (VM mode only: it needs AF_VSOCK).
pub fn spawn_relay() -> io::Result<()> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, FORWARD_PORT))?;
    listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
    std::thread::Builder::new().name("forward-relay".into()).spawn(move || loop {
        // SAFETY: accept4 on our listening socket; the result is checked.
        let conn =
            unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if conn < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!("forward relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: a fresh descriptor from accept4, owned from here on.
        let conn = std::os::unix::net::UnixStream::from(unsafe { OwnedFd::from_raw_fd(conn) });
        let _ = std::thread::Builder::new().name("forward".into()).spawn(move || {
            if let Err(e) = relay(conn) {
                tracing::debug!("forward relay: {e}");
            }
        });
    })?;
    tracing::info!(port = FORWARD_PORT, "localhost forwarding relay listening");
    Ok(())
}

/// One host connection: the port, the loopback connection, then bytes.
/// (`UnixStream` stands for the vsock stream: its methods are the generic
/// read/write/shutdown system calls.)
fn relay(mut host: std::os::unix::net::UnixStream) -> io::Result<()> {
    host.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut port = [0u8; 2];
    host.read_exact(&mut port)?;
    host.set_read_timeout(None)?;
    let port = u16::from_be_bytes(port);
    let target =
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).or_else(|_| TcpStream::connect((Ipv6Addr::LOCALHOST, port)));
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            let _ = host.write_all(&[1]);
            return Err(io::Error::new(e.kind(), format!("port {port}: {e}")));
        }
    };
    host.write_all(&[0])?;
    hearth_agent_protocol::transport::relay_both_ways(host, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_at_wildcard_and_loopback_addresses_are_found() {
        // 0.0.0.0:8000 LISTEN, 127.0.0.1:5432 LISTEN, 10.89.0.2:9000 LISTEN
        // (the VM's address only), 127.0.0.1:8000 ESTABLISHED.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue\n\
                  0: 00000000:1F40 00000000:0000 0A 00000000:00000000\n\
                  1: 0100007F:1538 00000000:0000 0A 00000000:00000000\n\
                  2: 0200590A:2328 00000000:0000 0A 00000000:00000000\n\
                  3: 0100007F:1F40 0100007F:D431 01 00000000:00000000\n";
        assert_eq!(parse_listeners(v4, false), vec![8000, 5432]);
        // [::]:3000 and [::1]:4000 listening.
        let v6 = "  sl  local_address rem_address st\n\
                  0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 0\n\
                  1: 00000000000000000000000001000000:0FA0 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(parse_listeners(v6, true), vec![3000, 4000]);
    }
}
