//! Localhost forwarding, the host's side (docs/networking.md): a TCP port
//! that something in the VM's network (a distro, a container sharing it)
//! listens on is reachable at the host's 127.0.0.1 on the same port, as
//! WSL forwards its distributions' ports.
//!
//! A thread asks the agent every second which ports listen
//! (`ListeningPorts`). For each new one it binds 127.0.0.1:PORT on the host;
//! each connection accepted there is relayed over the VM's hybrid vsock to
//! the agent's relay ([`FORWARD_PORT`]), which connects to the port on the
//! VM's loopback. A port the host already uses is not forwarded and is
//! reported (once in the log, and in `ports.json` for `hearth status`).
//! A port that stops listening in the VM stops being forwarded. Only
//! loopback is bound on the host: nothing in the VM is offered beyond it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hearth_agent_protocol::agent::Empty;
use hearth_agent_protocol::transport::{connect_hybrid_vsock, relay_both_ways, FORWARD_PORT};
use hearth_agent_protocol::AgentClient;
use serde::{Deserialize, Serialize};

/// How often the VM's listening ports are read.
const POLL: Duration = Duration::from_secs(1);
/// At most this many ports are forwarded (the guest names them: each costs
/// a host listener and its thread).
const MAX_PORTS: usize = 128;
/// The file, in the VM's directory, that says what is forwarded.
pub const PORTS_FILE: &str = "ports.json";

/// What `ports.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    /// Reachable at the host's 127.0.0.1.
    pub forwarded: Vec<u16>,
    /// Listening in the VM, but 127.0.0.1:PORT is taken on the host.
    pub taken: Vec<u16>,
}

/// The forwarding of one VM; stops when dropped.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Forwarder {
    /// Starts forwarding the listening ports of the VM whose agent is
    /// `agent` and whose hybrid vsock socket is `vsock`; `ports_file` is
    /// kept up to date.
    pub fn start(agent: AgentClient, vsock: PathBuf, ports_file: PathBuf) -> io::Result<Forwarder> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::Builder::new().name("forward-poll".into()).spawn(move || poll(agent, &vsock, &ports_file, &s))?;
        Ok(Forwarder { stop })
    }
}

fn poll(agent: AgentClient, vsock: &Path, ports_file: &Path, stop: &AtomicBool) {
    let mut listeners: BTreeMap<u16, Arc<AtomicBool>> = BTreeMap::new();
    let mut taken: BTreeSet<u16> = BTreeSet::new();
    let mut last = None;
    while !stop.load(Ordering::SeqCst) {
        if let Ok(r) = agent.listening_ports(crate::vm::ctx(5), &Empty::new()) {
            // The guest's word: ports only, each a u16, whatever it says.
            let now: BTreeSet<u16> =
                r.tcp.iter().filter_map(|p| u16::try_from(*p).ok()).filter(|p| *p != 0).take(MAX_PORTS).collect();
            listeners.retain(|port, stop| {
                let keep = now.contains(port);
                if !keep {
                    stop.store(true, Ordering::SeqCst);
                    log::info!("localhost forwarding: port {port} no longer listens in the VM; no longer forwarded");
                }
                keep
            });
            taken.retain(|p| now.contains(p));
            let new: Vec<u16> =
                now.iter().copied().filter(|p| !listeners.contains_key(p) && !taken.contains(p)).collect();
            for port in new {
                match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                    Ok(l) => {
                        let flag = Arc::new(AtomicBool::new(false));
                        if serve(l, port, vsock.to_path_buf(), flag.clone()).is_ok() {
                            log::info!("localhost forwarding: 127.0.0.1:{port} -> port {port} in the VM");
                            listeners.insert(port, flag);
                        }
                    }
                    Err(e) => {
                        log::warn!(
                            "localhost forwarding: port {port} listens in the VM but 127.0.0.1:{port} is taken on \
                             the host ({e}); it is not forwarded (stop what uses it on the host, or use the VM's \
                             address)"
                        );
                        taken.insert(port);
                    }
                }
            }
            let ports =
                Ports { forwarded: listeners.keys().copied().collect(), taken: taken.iter().copied().collect() };
            if last.as_ref() != Some(&ports) {
                let _ = std::fs::write(ports_file, serde_json::to_vec(&ports).unwrap_or_default());
                last = Some(ports);
            }
        }
        std::thread::sleep(POLL);
    }
    for stop in listeners.values() {
        stop.store(true, Ordering::SeqCst);
    }
}

/// Accepts on `listener` until `stop`, relaying each connection.
fn serve(listener: TcpListener, port: u16, vsock: PathBuf, stop: Arc<AtomicBool>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name(format!("forward-{port}")).spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let vsock = vsock.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = relay(conn, port, &vsock) {
                            log::debug!("localhost forwarding of port {port}: {e}");
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    log::warn!("localhost forwarding of port {port}: accept: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })?;
    Ok(())
}

/// One host connection to the agent's relay, then bytes both ways.
fn relay(client: TcpStream, port: u16, vsock: &Path) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let mut guest = connect_hybrid_vsock(vsock, FORWARD_PORT)?;
    guest.write_all(&port.to_be_bytes())?;
    guest.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut answer = [0u8; 1];
    guest.read_exact(&mut answer)?;
    guest.set_read_timeout(None)?;
    if answer[0] != 0 {
        return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "refused in the VM"));
    }
    relay_both_ways(client, guest)
}
