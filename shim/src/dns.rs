//! The host end of a container's relay to a resolver in its host-side
//! network namespace: Docker's embedded DNS, which dockerd serves at
//! 127.0.0.11 inside each container's namespace on user-defined networks
//! (names of the network's containers, then the host's resolvers). The
//! container's resolv.conf names that loopback address; its namespace is in
//! the VM, so the agent listens there (guest-runtime/src/container/dns.rs)
//! and sends each query here over vsock, in DNS-over-TCP framing, and the
//! shim asks the resolver over TCP from inside the host-side namespace.
//!
//! Only the agent holds the stream's token; a connection without it is
//! closed unread, as for stdio. What the guest sends is a DNS message to
//! dockerd's resolver, which already takes queries from the container.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hearth_agent_protocol::agent as pb;
use hearth_agent_protocol::transport::{
    accept_stdio, listen_stdio_random, relay_both_ways, stdio_socket_path, StdioToken,
};
use oci_spec::runtime::Spec;

/// Streams relayed at once; more wait for the agent's retry.
const MAX_IN_FLIGHT: usize = 64;
/// How long a relayed stream may stay silent.
const IDLE: Duration = Duration::from_secs(30);
/// How often the accepting thread looks at the stop flag.
const ACCEPT_WINDOW: Duration = Duration::from_secs(10);

/// The loopback resolver the container's resolv.conf names, if any: the
/// file a bind mount puts at /etc/resolv.conf (dockerd writes it).
pub fn wanted(spec: &Spec) -> Option<Ipv4Addr> {
    let m = spec.mounts().as_ref()?.iter().find(|m| m.destination() == Path::new("/etc/resolv.conf"))?;
    // The container can write this file (it is bound read-write): read a
    // bounded prefix, and relay only to a loopback address of its own
    // host-side namespace, which holds nothing but what its caller put.
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(File::open(m.source().as_ref()?).ok()?, 64 * 1024), &mut text)
        .ok()?;
    resolver_in(&String::from_utf8_lossy(&text))
}

/// The first `nameserver` of a resolv.conf, if it is a loopback IPv4 one.
fn resolver_in(text: &str) -> Option<Ipv4Addr> {
    let first = text.lines().find_map(|l| l.trim().strip_prefix("nameserver"))?;
    first.trim().parse::<Ipv4Addr>().ok().filter(Ipv4Addr::is_loopback)
}

/// A running relay; it stops when dropped.
pub struct Relay {
    stop: Arc<AtomicBool>,
    socket: PathBuf,
}

impl Relay {
    /// Listens for the agent's streams at a fresh vsock port and relays
    /// each to `addr`:53 inside the network namespace `netns`.
    pub fn start(vsock: &Path, netns: &Path, addr: Ipv4Addr) -> Result<(Relay, pb::DnsRelay)> {
        let ns = File::open(netns).with_context(|| format!("opening the network namespace {}", netns.display()))?;
        let (port, listener) = listen_stdio_random(vsock).context("a vsock port for the DNS relay")?;
        let token = StdioToken::random()?;
        let stop = Arc::new(AtomicBool::new(false));
        let req =
            pb::DnsRelay { address: addr.to_string(), port, token: token.as_bytes().to_vec(), ..Default::default() };
        let stopping = stop.clone();
        std::thread::Builder::new().name("dns-relay".into()).spawn(move || {
            let ns = Arc::new(ns);
            let in_flight = Arc::new(AtomicUsize::new(0));
            while !stopping.load(Ordering::Relaxed) {
                let stream = match accept_stdio(&listener, &token, ACCEPT_WINDOW) {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                    Err(e) => {
                        log::warn!("DNS relay: {e}");
                        return;
                    }
                };
                if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (ns, in_flight) = (ns.clone(), in_flight.clone());
                std::thread::spawn(move || {
                    // An idle stream ends (a read times out), so that a
                    // silent guest cannot hold every slot for ever.
                    let relayed = connect_in(&ns, SocketAddr::from((addr, 53))).and_then(|tcp| {
                        stream.set_read_timeout(Some(IDLE))?;
                        tcp.set_read_timeout(Some(IDLE))?;
                        relay_both_ways(stream, tcp)
                    });
                    if let Err(e) = relayed {
                        log::debug!("DNS relay: {e}");
                    }
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                });
            }
        })?;
        Ok((Relay { stop, socket: stdio_socket_path(vsock, port) }, req))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // No new stream can reach it; the thread ends at its next look.
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A TCP connection to `to` made from inside the namespace `ns`.
fn connect_in(ns: &Arc<File>, to: SocketAddr) -> std::io::Result<TcpStream> {
    crate::netns::on_thread_in(ns.clone(), move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(10))?))
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loopback_resolver_is_relayed() {
        assert_eq!(
            resolver_in("# Generated by Docker\nnameserver 127.0.0.11\noptions ndots:0\n"),
            Some(Ipv4Addr::new(127, 0, 0, 11))
        );
        assert_eq!(resolver_in("nameserver 10.0.2.3\nnameserver 127.0.0.11\n"), None);
        assert_eq!(resolver_in("search example\n"), None);
    }
}
