//! A resolver at a loopback address of the container's network namespace
//! that is really on the host: Docker's embedded DNS (127.0.0.11 on
//! user-defined networks), which dockerd serves inside the container's
//! host-side namespace. The container's resolv.conf names it, so the agent
//! listens at that address (UDP and TCP port 53) in the container's own
//! namespace in the VM and carries each query to the shim over vsock, in
//! DNS-over-TCP framing; the shim asks the resolver from the host-side
//! namespace (shim/src/dns.rs).
//!
//! The listening sockets hold the container's namespace, so they are closed
//! when the container is deleted ([`DnsRelay::stop`]); otherwise its NICs
//! would never come back to the VM.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hearth_agent_protocol::agent::DnsRelay as Request;
use hearth_agent_protocol::transport::relay_both_ways;

use crate::stdio::Dialer;

/// Queries in flight at once; more are dropped (the client retries).
const MAX_IN_FLIGHT: usize = 32;
/// How long one query may take on the host.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the serving threads look at the stop flag.
const POLL: Duration = Duration::from_millis(250);

pub struct DnsRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Checks the request before anything is made: a loopback IPv4 address.
pub fn validate(req: &Request) -> io::Result<Ipv4Addr> {
    let addr: Ipv4Addr = req
        .address
        .parse()
        .map_err(|_| io::Error::other(format!("dns_relay.address {:?} is not an IPv4 address", req.address)))?;
    if !addr.is_loopback() {
        return Err(io::Error::other(format!("dns_relay.address {addr} is not a loopback address")));
    }
    Ok(addr)
}

impl DnsRelay {
    /// Listens in the network namespace of process `pid` and serves until
    /// stopped.
    pub fn start(pid: i32, req: &Request, dialer: Dialer) -> io::Result<DnsRelay> {
        let addr = validate(req)?;
        let (udp, tcp) = crate::pid1::network::in_netns_of(pid, move || {
            let at = SocketAddr::from((addr, 53));
            Ok((UdpSocket::bind(at)?, TcpListener::bind(at)?))
        })?;
        udp.set_read_timeout(Some(POLL))?;
        tcp.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let host = Arc::new((dialer, req.port, req.token.clone()));
        let mut threads = Vec::new();
        {
            let (stop, in_flight, host) = (stop.clone(), in_flight.clone(), host.clone());
            threads.push(std::thread::spawn(move || serve_udp(udp, &stop, &in_flight, &host)));
        }
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve_tcp(tcp, &stop, &in_flight, &host)));
        }
        Ok(DnsRelay { stop, threads })
    }

    /// Closes the listening sockets (queries in flight finish on their own).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

type Host = (Dialer, u32, Vec<u8>);

/// Takes a slot for one query, or None when too many are in flight.
fn slot(in_flight: &Arc<AtomicUsize>) -> Option<Slot> {
    if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        in_flight.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    Some(Slot(in_flight.clone()))
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_udp(udp: UdpSocket, stop: &AtomicBool, in_flight: &Arc<AtomicUsize>, host: &Arc<Host>) {
    let mut buf = vec![0u8; 65535];
    while !stop.load(Ordering::Relaxed) {
        let (n, client) = match udp.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) => {
                tracing::warn!("DNS relay: {e}");
                return;
            }
        };
        let Some(slot) = slot(in_flight) else { continue };
        let (query, host) = (buf[..n].to_vec(), host.clone());
        let Ok(reply_to) = udp.try_clone() else { continue };
        std::thread::spawn(move || {
            let _slot = slot;
            match ask(&host, &query) {
                Ok(answer) => {
                    let _ = reply_to.send_to(&answer, client);
                }
                Err(e) => tracing::debug!("DNS relay: a query: {e}"),
            }
        });
    }
}

/// One query over a fresh host stream: length, message; length, answer.
fn ask(host: &Host, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = host.0.dial(host.1, &host.2)?;
    s.set_read_timeout(Some(QUERY_TIMEOUT))?;
    s.set_write_timeout(Some(QUERY_TIMEOUT))?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut answer)?;
    Ok(answer)
}

fn serve_tcp(tcp: TcpListener, stop: &AtomicBool, in_flight: &Arc<AtomicUsize>, host: &Arc<Host>) {
    while !stop.load(Ordering::Relaxed) {
        let client = match tcp.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL / 5);
                continue;
            }
            Err(e) => {
                tracing::warn!("DNS relay (TCP): {e}");
                return;
            }
        };
        let Some(slot) = slot(in_flight) else { continue };
        let host = host.clone();
        std::thread::spawn(move || {
            let _slot = slot;
            // TCP clients already frame their queries as the host expects.
            let relayed = client.set_nonblocking(false).and_then(|_| {
                let s = host.0.dial(host.1, &host.2)?;
                relay_both_ways(client, s)
            });
            if let Err(e) = relayed {
                tracing::debug!("DNS relay (TCP): {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loopback_ipv4_address_is_taken() {
        let req = |a: &str| Request { address: a.into(), ..Default::default() };
        assert_eq!(validate(&req("127.0.0.11")).unwrap(), Ipv4Addr::new(127, 0, 0, 11));
        assert!(validate(&req("10.0.0.1")).is_err());
        assert!(validate(&req("nonsense")).is_err());
    }
}
