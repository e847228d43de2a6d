//! virtio-vsock (device type 19) with the host side in user space: see
//! [`muxer`] for the Unix-socket protocol, [`packet`] for the checked parsing
//! of guest packets.

pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{self, DeviceWorker, Poller};
use super::{Activation, Interrupt, VirtioDevice, WorkerHandle, TYPE_VSOCK};
use muxer::Muxer;

const QUEUE_SIZES: [u16; 3] = [256, 256, 64];

/// `--vsock cid=N,socket=PATH`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

impl VsockConfig {
    pub fn parse(s: &str) -> Result<VsockConfig, String> {
        let (mut cid, mut socket) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) => cid = Some(v.parse::<u64>().map_err(|_| format!("bad vsock cid {v:?}"))?),
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => return Err(format!("unknown vsock option {part:?}: use cid=N,socket=PATH")),
            }
        }
        let cid = cid.ok_or("the vsock device needs cid=N (3 or more)")?;
        if cid < 3 || cid > u32::MAX as u64 {
            return Err(format!("vsock cid {cid} is reserved or too big: use 3 to {}", u32::MAX));
        }
        Ok(VsockConfig { cid, socket: socket.ok_or("the vsock device needs socket=PATH")? })
    }
}

pub struct Vsock {
    config: VsockConfig,
    listener: Option<UnixListener>,
}

impl Vsock {
    /// Binds the host socket now, so that a bad path fails at start-up.
    pub fn new(config: VsockConfig) -> std::io::Result<Vsock> {
        let listener = muxer::bind(&config.socket)?;
        Ok(Vsock { config, listener: Some(listener) })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.config.socket);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        QUEUE_SIZES.to_vec()
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config.cid.to_le_bytes(), offset, data)
    }
    fn activate(&mut self, a: Activation) -> Result<WorkerHandle, String> {
        let listener = self.listener.take().ok_or("the vsock device cannot be activated twice")?;
        let muxer = Muxer::new(self.config.cid, self.config.socket.clone(), listener);
        let mut queues = a.queues.into_iter();
        let mut events = a.queue_events.into_iter();
        let w = VsockWorker {
            rx: queues.next().unwrap(),
            tx: queues.next().unwrap(),
            rx_evt: events.next().unwrap(),
            tx_evt: events.next().unwrap(),
            evt_evt: events.next().unwrap(),
            mem: a.mem,
            interrupt: a.interrupt,
            muxer,
        };
        worker::spawn("virtio-vsock", w)
    }
}

struct VsockWorker {
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    evt_evt: EventFd,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
}

impl VsockWorker {
    fn process_tx(&mut self, poller: &Poller) -> bool {
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            match packet::read_tx(&self.mem, chain) {
                Ok(pkt) => self.muxer.on_guest_packet(pkt, poller),
                Err(e) => tracing::debug!("vsock: dropping a malformed packet: {e:?}"),
            }
            if let Err(e) = self.tx.add_used(&self.mem, head, 0) {
                tracing::warn!("vsock: tx add_used: {e:?}");
            }
            used = true;
        }
        used
    }

    fn process_rx(&mut self, poller: &Poller) -> bool {
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else { break };
            let head = chain.head_index();
            let len = match packet::rx_capacity(&self.mem, chain.clone()) {
                None => 0, // too small for a header: give it back empty
                Some(cap) => match self.muxer.next_rx(cap, poller) {
                    Some(pkt) => packet::write_rx(&self.mem, chain, &pkt).unwrap_or(0),
                    None => {
                        self.rx.go_to_previous_position();
                        break;
                    }
                },
            };
            if let Err(e) = self.rx.add_used(&self.mem, head, len) {
                tracing::warn!("vsock: rx add_used: {e:?}");
            }
            used = true;
        }
        used
    }
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVT: u64 = 2;

impl DeviceWorker for VsockWorker {
    fn init(&mut self, poller: &Poller) -> std::io::Result<()> {
        poller.add(self.rx_evt.as_raw_fd(), TOKEN_RX, EventSet::IN)?;
        poller.add(self.tx_evt.as_raw_fd(), TOKEN_TX, EventSet::IN)?;
        poller.add(self.evt_evt.as_raw_fd(), TOKEN_EVT, EventSet::IN)?;
        self.muxer.register(poller)
    }

    fn handle(&mut self, token: u64, events: EventSet, poller: &Poller) {
        let mut used_tx = false;
        match token {
            TOKEN_RX => {
                let _ = self.rx_evt.read();
            }
            TOKEN_TX => {
                let _ = self.tx_evt.read();
                used_tx = self.process_tx(poller);
            }
            TOKEN_EVT => {
                let _ = self.evt_evt.read(); // no transport events are ever sent
            }
            _ => self.muxer.handle_event(token, events, poller),
        }
        // The guest may have queued packets while we served the ring.
        if !used_tx && token != TOKEN_TX {
            used_tx = self.process_tx(poller);
        }
        let used_rx = self.process_rx(poller);
        if used_tx || used_rx {
            self.interrupt.signal_used();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parsing() {
        let c = VsockConfig::parse("cid=3,socket=/run/v.sock").unwrap();
        assert_eq!(c, VsockConfig { cid: 3, socket: "/run/v.sock".into() });
        assert!(VsockConfig::parse("cid=2,socket=/x").unwrap_err().contains("reserved"));
        assert!(VsockConfig::parse("socket=/x").unwrap_err().contains("cid"));
        assert!(VsockConfig::parse("cid=5").unwrap_err().contains("socket"));
        assert!(VsockConfig::parse("cid=5,socket=/x,speed=9").is_err());
    }
}
