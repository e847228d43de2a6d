//! The host side of virtio-vsock, in user space (our hosts have no
//! vhost-vsock), after Firecracker's design: one Unix socket per VM.
//!
//! - Host-initiated: a host process connects to the VM's socket and writes
//!   `CONNECT <port>\n`; the muxer asks the guest (REQUEST to that port) and,
//!   once the guest's listener accepts (RESPONSE), answers `OK <hostport>\n`;
//!   from then on the Unix stream carries the bytes.
//! - Guest-initiated: a guest connection to host port P is connected to the
//!   Unix socket `<path>_<P>`; if nothing listens there, the guest gets RST.
//!
//! Flow control is virtio's credit scheme: each side advertises a receive
//! buffer (buf_alloc) and how much it has consumed (fwd_cnt); a sender never
//! has more than buf_alloc bytes in flight. The muxer stops reading a host
//! stream while the guest has no credit for it, and buffers guest data the
//! host is not ready for (never more than it advertised: a guest that sends
//! beyond its credit is reset).
//!
//! Bounds, so that a hostile guest (or a misbehaving host process) cannot
//! exhaust the host through the muxer ([`Limits`]):
//!
//! - connections: at most [`MAX_CONNECTIONS`], counting half-open ones. Over
//!   the cap a guest REQUEST gets RST and a host connection is accepted and
//!   closed at once (not left in the backlog, which would keep the listener
//!   readable and the worker spinning).
//! - pending control packets for the guest (REQUEST, RESPONSE, RST, credit
//!   updates): at most [`MAX_PENDING_CONTROL`]. A guest that floods packets
//!   and posts no receive buffers would otherwise grow the queue without
//!   end; over the cap a packet is dropped (and a connection whose RESPONSE
//!   or REQUEST cannot be queued is closed). Data needs no such cap: it is
//!   read from a host stream only when the guest has a buffer for it, and
//!   guest data is bounded by the credit we advertise (CONN_BUF).
//! - half-open connections: a host connection that never finishes its
//!   `CONNECT <port>` line, or whose REQUEST the guest never answers, is
//!   closed (and the guest sent RST) after [`HALF_OPEN_TIMEOUT`]. The worker
//!   arms a timer at [`Muxer::next_deadline`] and calls [`Muxer::sweep`].

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::*;
use crate::devices::ratelimit::LogLimit;
use crate::devices::virtio::worker::Poller;
use crate::warn_limited;

pub const HOST_CID: u64 = 2;
/// Receive buffer advertised to the guest, per connection.
pub const CONN_BUF: u32 = 256 * 1024;
const HANDSHAKE_MAX: usize = 64;
const FIRST_LOCAL_PORT: u32 = 1 << 30;
pub const TOKEN_LISTENER: u64 = 16;
const TOKEN_CONN_BASE: u64 = 1 << 20;

/// Connections at once, half-open included. Each holds a descriptor and up
/// to CONN_BUF (256 KiB) of guest data: 512 keeps the worst case at 128 MiB
/// and half of the usual 1024-descriptor soft limit, leaving the rest to the
/// VMM's disks, eventfds and virtiofsd. Firecracker's muxer allows 1023; the
/// utility VM needs a handful (the agent's ttrpc channel, exec streams).
pub const MAX_CONNECTIONS: usize = 512;
/// Control packets waiting for a guest receive buffer: four receive
/// queues' worth, a few tens of KiB.
pub const MAX_PENDING_CONTROL: usize = 1024;
/// How long a connection may stay half-open. Generous because the guest
/// may run under nested emulation (the test host), where answering a
/// REQUEST can take seconds; short enough that a flood of stalled
/// handshakes is cleared well before it matters.
pub const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

static CAP_WARN: LogLimit = LogLimit::new();
static CONTROL_WARN: LogLimit = LogLimit::new();
static TIMEOUT_WARN: LogLimit = LogLimit::new();
static GUEST_WARN: LogLimit = LogLimit::new();

/// The muxer's bounds; [`Limits::default`] in the VMM, smaller in tests.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending_control: usize,
    pub half_open_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            max_pending_control: MAX_PENDING_CONTROL,
            half_open_timeout: HALF_OPEN_TIMEOUT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A host connection that has not sent its CONNECT line yet.
    Handshake,
    /// REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    local_port: u32,
    peer_port: u32,
    handshake: Vec<u8>,
    /// Host bytes read with the CONNECT line, sent once established.
    early: Vec<u8>,
    /// The host stream may have bytes to read (edge-triggered epoll).
    readable: bool,
    host_eof: bool,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Protocol bytes for the host stream (the OK line), not counted as data.
    to_host_ctrl: Vec<u8>,
    /// Guest data not yet written to the host stream.
    to_host: VecDeque<u8>,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    guest_shut_send: bool,
    /// The guest closed: reset once the buffered data is flushed.
    closing: bool,
    /// When the connection entered its current half-open state.
    since: Instant,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Conn {
        Conn {
            stream,
            state,
            local_port: 0,
            peer_port: 0,
            handshake: Vec::new(),
            early: Vec::new(),
            readable: false,
            host_eof: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            to_host_ctrl: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_shut_send: false,
            closing: false,
            since: Instant::now(),
        }
    }

    fn half_open(&self) -> bool {
        matches!(self.state, State::Handshake | State::Connecting)
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc.wrapping_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    order: Vec<u64>,
    next_rr: usize,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Packet>,
    limits: Limits,
}

/// Binds the VM's socket, replacing a stale one (a file nobody listens on).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(ErrorKind::AddrInUse, format!("{} is in use by another VM", path.display())))
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl Muxer {
    pub fn new(guest_cid: u64, path: PathBuf, listener: UnixListener) -> Muxer {
        Muxer::with_limits(guest_cid, path, listener, Limits::default())
    }

    pub fn with_limits(guest_cid: u64, path: PathBuf, listener: UnixListener, limits: Limits) -> Muxer {
        Muxer {
            guest_cid,
            path,
            listener,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            order: Vec::new(),
            next_rr: 0,
            next_token: TOKEN_CONN_BASE,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            limits,
        }
    }

    pub fn register(&self, poller: &Poller) -> io::Result<()> {
        poller.add(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Control packets waiting for the guest.
    pub fn pending_control(&self) -> usize {
        self.control.len()
    }

    /// Queues a control packet for the guest, unless the queue is full.
    fn push_control(&mut self, pkt: Packet) -> bool {
        if self.control.len() >= self.limits.max_pending_control {
            warn_limited!(
                CONTROL_WARN,
                "vsock: {} control packets wait for the guest (it posts no receive buffers?); dropping one",
                self.control.len()
            );
            return false;
        }
        self.control.push_back(pkt);
        true
    }

    /// When the oldest half-open connection times out, if there is one.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter(|c| c.half_open()).map(|c| c.since + self.limits.half_open_timeout).min()
    }

    /// Closes the connections half-open since `timeout` before `now` (the
    /// caller's clock, so tests need not wait); returns how many.
    pub fn sweep(&mut self, now: Instant, poller: &Poller) -> usize {
        let timeout = self.limits.half_open_timeout;
        let expired: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.half_open() && now.saturating_duration_since(c.since) >= timeout)
            .map(|(t, _)| *t)
            .collect();
        for &token in &expired {
            if let Some(c) = self.conns.get(&token) {
                warn_limited!(
                    TIMEOUT_WARN,
                    port = c.peer_port,
                    "vsock: a connection stayed half-open ({:?}) for {timeout:?}; closing it",
                    c.state
                );
            }
            // Connecting: the guest saw our REQUEST, so it gets RST too.
            self.reset(token, poller);
        }
        expired.len()
    }

    fn header(&self, c: &Conn, op: u16, flags: u32) -> Header {
        header(self.guest_cid, c, op, flags)
    }

    /// Queues a control packet of a connection; false if it was dropped.
    fn queue_control(&mut self, token: u64, op: u16, flags: u32) -> bool {
        let Some(c) = self.conns.get(&token) else { return false };
        let hdr = self.header(c, op, flags);
        if !self.push_control(Packet { hdr, data: Vec::new() }) {
            return false;
        }
        if let Some(c) = self.conns.get_mut(&token) {
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        true
    }

    /// RST for a guest packet that belongs to no connection.
    fn reset_unknown(&mut self, pkt: &Header) {
        if pkt.op == OP_RST {
            return; // never answer a reset with a reset
        }
        self.push_control(Packet {
            hdr: Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: pkt.dst_port,
                dst_port: pkt.src_port,
                kind: TYPE_STREAM,
                op: OP_RST,
                ..Default::default()
            },
            data: Vec::new(),
        });
    }

    fn add_conn(&mut self, conn: Conn, poller: &Poller) -> Option<u64> {
        if self.conns.len() >= self.limits.max_connections {
            warn_limited!(CAP_WARN, "vsock: {} connections already (the cap); refusing another", self.conns.len());
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = poller.add(conn.stream.as_raw_fd(), token, events) {
            warn_limited!(CAP_WARN, "vsock: cannot watch a connection: {e}");
            return None;
        }
        if conn.state != State::Handshake {
            self.by_ports.insert((conn.local_port, conn.peer_port), token);
        }
        self.conns.insert(token, conn);
        self.order.push(token);
        Some(token)
    }

    fn remove(&mut self, token: u64, poller: &Poller) {
        if let Some(c) = self.conns.remove(&token) {
            let _ = poller.remove(c.stream.as_raw_fd());
            self.by_ports.remove(&(c.local_port, c.peer_port));
            self.order.retain(|t| *t != token);
        }
    }

    /// Resets a connection: RST to the guest (if it knows it) and close.
    fn reset(&mut self, token: u64, poller: &Poller) {
        if matches!(self.conns.get(&token).map(|c| c.state), Some(State::Connecting | State::Established)) {
            self.queue_control(token, OP_RST, 0);
        }
        self.remove(token, poller);
    }

    /// An event on the listener or a connection.
    pub fn handle_event(&mut self, token: u64, events: EventSet, poller: &Poller) {
        if token == TOKEN_LISTENER {
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_ok() {
                            self.add_conn(Conn::new(stream, State::Handshake), poller);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn_limited!(CAP_WARN, "vsock: accept: {e}");
                        break;
                    }
                }
            }
            return;
        }
        let Some(state) = self.conns.get(&token).map(|c| c.state) else { return };
        if events.contains(EventSet::IN)
            || events.contains(EventSet::READ_HANG_UP)
            || events.contains(EventSet::HANG_UP)
        {
            match state {
                State::Handshake => self.read_handshake(token, poller),
                _ => {
                    if let Some(c) = self.conns.get_mut(&token) {
                        c.readable = true;
                    }
                }
            }
        }
        if events.contains(EventSet::OUT) {
            self.flush(token, poller);
        }
        if events.contains(EventSet::ERROR) {
            self.reset(token, poller);
        }
    }

    fn read_handshake(&mut self, token: u64, poller: &Poller) {
        let Some(c) = self.conns.get_mut(&token) else { return };
        let mut buf = [0u8; HANDSHAKE_MAX];
        let n = match c.stream.read(&mut buf) {
            Ok(0) => return self.remove(token, poller),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return self.remove(token, poller),
        };
        c.handshake.extend_from_slice(&buf[..n]);
        let Some(nl) = c.handshake.iter().position(|b| *b == b'\n') else {
            if c.handshake.len() >= HANDSHAKE_MAX {
                self.remove(token, poller);
            }
            return;
        };
        let line = String::from_utf8_lossy(&c.handshake[..nl]).trim().to_string();
        let port = line.strip_prefix("CONNECT ").and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            let _ = c.stream.write_all(b"ERR expected CONNECT <port>\n");
            return self.remove(token, poller);
        };
        c.early = c.handshake.split_off(nl + 1);
        c.handshake.clear();
        let local = self.next_local_port;
        self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
        let c = self.conns.get_mut(&token).unwrap();
        c.local_port = local;
        c.peer_port = port;
        c.state = State::Connecting;
        c.since = Instant::now();
        self.by_ports.insert((local, port), token);
        if !self.queue_control(token, OP_REQUEST, 0) {
            self.remove(token, poller);
        }
    }

    /// A packet the guest sent.
    pub fn on_guest_packet(&mut self, pkt: Packet, poller: &Poller) {
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            tracing::debug!(?h, "vsock: packet with a wrong address or type");
            return self.reset_unknown(&h);
        }
        let token = self.by_ports.get(&(h.dst_port, h.src_port)).copied();
        if h.op == OP_REQUEST {
            return match token {
                Some(_) => self.reset_unknown(&h),
                None => self.guest_connect(&h, poller),
            };
        }
        let Some(token) = token else { return self.reset_unknown(&h) };
        let c = self.conns.get_mut(&token).unwrap();
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, c.state) {
            (OP_RESPONSE, State::Connecting) => {
                c.state = State::Established;
                c.to_host_ctrl.extend_from_slice(format!("OK {}\n", c.local_port).as_bytes());
                c.readable = true; // data may have arrived during the handshake
                self.flush(token, poller);
            }
            (OP_RST, _) => self.remove(token, poller),
            (OP_RW, State::Established) => {
                if c.to_host.len() + pkt.data.len() > CONN_BUF as usize {
                    warn_limited!(GUEST_WARN, port = h.src_port, "vsock: the guest sent beyond its credit; resetting");
                    return self.reset(token, poller);
                }
                c.to_host.extend(pkt.data);
                self.flush(token, poller);
            }
            (OP_SHUTDOWN, State::Established) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_shut_send = true;
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    c.closing = true;
                }
                self.flush(token, poller);
            }
            (OP_CREDIT_REQUEST, State::Established) => {
                self.queue_control(token, OP_CREDIT_UPDATE, 0);
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            _ => self.reset(token, poller),
        }
    }

    fn guest_connect(&mut self, h: &Header, poller: &Poller) {
        // Over the cap, refuse before connecting: a host listener must not
        // see (and accept) a connection the muxer would drop at once.
        if self.conns.len() >= self.limits.max_connections {
            warn_limited!(CAP_WARN, "vsock: {} connections already (the cap); refusing the guest's", self.conns.len());
            return self.reset_unknown(h);
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), h.dst_port));
        let stream = match connect_nonblocking(&target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(target = %target.display(), "vsock: guest connection refused: {e}");
                return self.reset_unknown(h);
            }
        };
        let mut c = Conn::new(stream, State::Established);
        c.local_port = h.dst_port;
        c.peer_port = h.src_port;
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match self.add_conn(c, poller) {
            Some(token) => {
                if !self.queue_control(token, OP_RESPONSE, 0) {
                    // The guest never learns of it: close our side.
                    self.remove(token, poller);
                }
            }
            None => self.reset_unknown(h),
        }
    }

    /// Writes buffered guest data to the host stream, as far as it takes it.
    fn flush(&mut self, token: u64, poller: &Poller) {
        let Some(c) = self.conns.get_mut(&token) else { return };
        while !c.to_host_ctrl.is_empty() {
            match c.stream.write(&c.to_host_ctrl) {
                Ok(n) => {
                    c.to_host_ctrl.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.reset(token, poller),
            }
        }
        while !c.to_host.is_empty() {
            let (front, _) = c.to_host.as_slices();
            match c.stream.write(front) {
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return self.reset(token, poller),
            }
        }
        let drained = c.to_host.is_empty();
        if drained && c.guest_shut_send {
            let _ = c.stream.shutdown(Shutdown::Write);
        }
        if drained && c.closing {
            return self.reset(token, poller);
        }
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= CONN_BUF / 4 {
            self.queue_control(token, OP_CREDIT_UPDATE, 0);
        }
    }

    /// True when there is something to send to the guest, if it has room.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| c.state == State::Established && c.readable && c.credit() > 0)
    }

    /// The next packet for the guest, carrying at most `capacity` bytes of
    /// payload: control packets first, then data from host streams, taking
    /// the connections in turn.
    pub fn next_rx(&mut self, capacity: usize, poller: &Poller) -> Option<Packet> {
        if let Some(p) = self.control.pop_front() {
            return Some(p);
        }
        let n = self.order.len();
        let guest_cid = self.guest_cid;
        for i in 0..n {
            let token = self.order[(self.next_rr + i) % n];
            let Some(c) = self.conns.get_mut(&token) else { continue };
            if c.state != State::Established || !c.readable || c.host_eof {
                continue;
            }
            let want = capacity.min(c.credit() as usize).min(MAX_PAYLOAD);
            if want == 0 {
                continue;
            }
            let mut data = vec![0u8; want];
            let got = if !c.early.is_empty() {
                let k = want.min(c.early.len());
                data[..k].copy_from_slice(&c.early[..k]);
                c.early.drain(..k);
                Ok(k)
            } else {
                c.stream.read(&mut data)
            };
            match got {
                Ok(0) => {
                    c.readable = false;
                    c.host_eof = true;
                    self.next_rr = (self.next_rr + i + 1) % n;
                    let hdr = header(guest_cid, c, OP_SHUTDOWN, SHUTDOWN_SEND);
                    return Some(Packet { hdr, data: Vec::new() });
                }
                Ok(k) => {
                    data.truncate(k);
                    c.tx_cnt = c.tx_cnt.wrapping_add(k as u32);
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    self.next_rr = (self.next_rr + i + 1) % n;
                    let hdr = header(guest_cid, c, OP_RW, 0);
                    return Some(Packet { hdr, data });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                Err(_) => {
                    self.reset(token, poller);
                    return self.control.pop_front();
                }
            }
        }
        None
    }
}

/// Connects to a host listener without ever blocking the worker: a Unix
/// stream connect completes at once or, when the listener's backlog is
/// full (a host process slow to accept, or a guest flooding it), fails with
/// EAGAIN, where a blocking connect would wait, and stall every connection
/// of the VM with it. So a guest-initiated connection is never half-open on
/// our side: it is established or refused (RST) at once.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() returns a new descriptor or -1; checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours alone from here; the stream closes it on any error.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn header(guest_cid: u64, c: &Conn, op: u16, flags: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags,
        buf_alloc: CONN_BUF,
        fwd_cnt: c.fwd_cnt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const CID: u64 = 3;

    /// A muxer on a fresh socket path, with a host listener on port 5000.
    struct Rig {
        mux: Muxer,
        poller: Poller,
        path: PathBuf,
        host: UnixListener,
    }

    impl Rig {
        fn new(limits: Limits) -> Rig {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hearth-muxer-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("v.sock");
            let host = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
            let mux = Muxer::with_limits(CID, path.clone(), bind(&path).unwrap(), limits);
            let poller = Poller::new().unwrap();
            mux.register(&poller).unwrap();
            Rig { mux, poller, path, host }
        }

        fn guest(&mut self, op: u16, src_port: u32, dst_port: u32) {
            let hdr = Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                kind: TYPE_STREAM,
                op,
                buf_alloc: CONN_BUF,
                ..Default::default()
            };
            self.mux.on_guest_packet(Packet { hdr, data: Vec::new() }, &self.poller);
        }

        /// A host process connecting to the VM's socket, accepted by the muxer.
        fn host_connect(&mut self) -> UnixStream {
            let s = UnixStream::connect(&self.path).unwrap();
            self.mux.handle_event(TOKEN_LISTENER, EventSet::IN, &self.poller);
            s
        }

        fn control_ops(&mut self) -> Vec<u16> {
            std::iter::from_fn(|| self.mux.control.pop_front()).map(|p| p.hdr.op).collect()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
        }
    }

    fn limits(max_connections: usize, max_pending_control: usize) -> Limits {
        Limits { max_connections, max_pending_control, half_open_timeout: Duration::from_secs(5) }
    }

    /// Whether the host end sees its connection closed by the muxer.
    fn closed(s: &mut UnixStream) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 64];
        matches!(s.read(&mut b), Ok(0)) || matches!(s.read(&mut b), Ok(0))
    }

    #[test]
    fn connections_are_capped_guest_and_host_side() {
        let mut r = Rig::new(limits(2, 64));
        r.guest(OP_REQUEST, 1, 5000);
        r.guest(OP_REQUEST, 2, 5000);
        assert_eq!(r.mux.connection_count(), 2);
        assert_eq!(r.control_ops(), vec![OP_RESPONSE, OP_RESPONSE]);
        // Over the cap: the guest gets RST (and the host listener never
        // sees that connection), a host connection is closed.
        r.guest(OP_REQUEST, 3, 5000);
        assert_eq!(r.control_ops(), vec![OP_RST]);
        r.host.set_nonblocking(true).unwrap();
        let seen = std::iter::from_fn(|| r.host.accept().ok()).count();
        assert_eq!(seen, 2, "the host listener got a connection over the cap");
        let mut s = r.host_connect();
        assert_eq!(r.mux.connection_count(), 2);
        assert!(closed(&mut s), "the connection over the cap is closed, not left in the backlog");
        // A slot frees up: connections are accepted again.
        r.guest(OP_RST, 1, 5000);
        assert_eq!(r.mux.connection_count(), 1);
        let _s = r.host_connect();
        assert_eq!(r.mux.connection_count(), 2);
    }

    #[test]
    fn the_control_queue_is_bounded() {
        let mut r = Rig::new(limits(8, 16));
        // A flood of packets to ports nobody listens on, no receive buffers.
        for port in 0..10_000 {
            r.guest(OP_RW, port, 7);
        }
        assert_eq!(r.mux.pending_control(), 16);
        assert!(r.mux.has_rx());
        assert_eq!(r.control_ops(), vec![OP_RST; 16]);
        // With room again, a RESPONSE that cannot be queued is not left
        // behind as a connection the guest does not know.
        for port in 0..16 {
            r.guest(OP_RW, port, 7);
        }
        r.guest(OP_REQUEST, 1, 5000);
        assert_eq!(r.mux.connection_count(), 0);
    }

    #[test]
    fn a_host_connection_that_never_sends_connect_times_out() {
        let mut r = Rig::new(limits(8, 64));
        let t0 = Instant::now();
        let mut s = r.host_connect();
        assert_eq!(r.mux.connection_count(), 1);
        let deadline = r.mux.next_deadline().expect("a half-open connection has a deadline");
        assert!(deadline >= t0 + Duration::from_secs(5));
        assert_eq!(r.mux.sweep(t0, &r.poller), 0);
        assert_eq!(r.mux.sweep(deadline, &r.poller), 1);
        assert_eq!(r.mux.connection_count(), 0);
        assert_eq!(r.mux.next_deadline(), None);
        assert!(closed(&mut s));
        assert!(r.control_ops().is_empty(), "the guest never heard of it");
    }

    #[test]
    fn a_request_the_guest_never_answers_times_out_with_rst() {
        let mut r = Rig::new(limits(8, 64));
        let mut s = r.host_connect();
        s.write_all(b"CONNECT 1024\n").unwrap();
        r.mux.handle_event(TOKEN_CONN_BASE, EventSet::IN, &r.poller);
        assert_eq!(r.control_ops(), vec![OP_REQUEST]);
        let deadline = r.mux.next_deadline().unwrap();
        assert_eq!(r.mux.sweep(deadline - Duration::from_millis(1), &r.poller), 0);
        assert_eq!(r.mux.sweep(deadline, &r.poller), 1);
        assert_eq!(r.control_ops(), vec![OP_RST]);
        assert!(closed(&mut s));
    }

    #[test]
    fn a_guest_connect_to_a_full_backlog_is_refused_not_blocked() {
        // A cap above the backlog, so that the RST comes from the backlog.
        let mut r = Rig::new(limits(100_000, 64));
        // Nobody accepts on port 5000: fill its backlog.
        let mut port = 1;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            loop {
                r.guest(OP_REQUEST, port, 5000);
                port += 1;
                if r.control_ops().contains(&OP_RST) || port > 10_000 {
                    break;
                }
            }
            tx.send(port).unwrap();
        });
        let port = rx.recv_timeout(Duration::from_secs(20)).expect("a guest connect blocked the muxer");
        assert!(port <= 10_000, "the backlog never filled");
    }

    #[test]
    fn established_connections_never_time_out() {
        let mut r = Rig::new(limits(8, 64));
        r.guest(OP_REQUEST, 1, 5000);
        let mut s = r.host_connect();
        s.write_all(b"CONNECT 1024\n").unwrap();
        r.mux.handle_event(TOKEN_CONN_BASE + 1, EventSet::IN, &r.poller);
        let local = FIRST_LOCAL_PORT;
        r.guest(OP_RESPONSE, 1024, local);
        assert_eq!(r.mux.next_deadline(), None);
        assert_eq!(r.mux.sweep(Instant::now() + Duration::from_secs(3600), &r.poller), 0);
        assert_eq!(r.mux.connection_count(), 2);
    }
}
