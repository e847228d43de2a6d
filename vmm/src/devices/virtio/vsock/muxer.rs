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

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::packet::*;
use crate::devices::virtio::worker::Poller;

pub const HOST_CID: u64 = 2;
/// Receive buffer advertised to the guest, per connection.
pub const CONN_BUF: u32 = 256 * 1024;
const HANDSHAKE_MAX: usize = 64;
const FIRST_LOCAL_PORT: u32 = 1 << 30;
pub const TOKEN_LISTENER: u64 = 16;
const TOKEN_CONN_BASE: u64 = 1 << 20;

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
        }
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
        }
    }

    pub fn register(&self, poller: &Poller) -> io::Result<()> {
        poller.add(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn header(&self, c: &Conn, op: u16, flags: u32) -> Header {
        header(self.guest_cid, c, op, flags)
    }

    fn queue_control(&mut self, token: u64, op: u16, flags: u32) {
        if let Some(c) = self.conns.get_mut(&token) {
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        if let Some(c) = self.conns.get(&token) {
            let hdr = self.header(c, op, flags);
            self.control.push_back(Packet { hdr, data: Vec::new() });
        }
    }

    /// RST for a guest packet that belongs to no connection.
    fn reset_unknown(&mut self, pkt: &Header) {
        if pkt.op == OP_RST {
            return; // never answer a reset with a reset
        }
        self.control.push_back(Packet {
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
        let token = self.next_token;
        self.next_token += 1;
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = poller.add(conn.stream.as_raw_fd(), token, events) {
            tracing::warn!("vsock: cannot watch a connection: {e}");
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
                        tracing::warn!("vsock: accept: {e}");
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
        self.by_ports.insert((local, port), token);
        self.queue_control(token, OP_REQUEST, 0);
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
                    tracing::warn!(port = h.src_port, "vsock: the guest sent beyond its credit; resetting");
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
            (OP_CREDIT_REQUEST, State::Established) => self.queue_control(token, OP_CREDIT_UPDATE, 0),
            (OP_CREDIT_UPDATE, State::Established) => {}
            _ => self.reset(token, poller),
        }
    }

    fn guest_connect(&mut self, h: &Header, poller: &Poller) {
        let target = PathBuf::from(format!("{}_{}", self.path.display(), h.dst_port));
        let stream = match UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
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
            Some(token) => self.queue_control(token, OP_RESPONSE, 0),
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

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
