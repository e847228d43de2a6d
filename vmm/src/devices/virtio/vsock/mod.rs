//! virtio-vsock (device type 19) with the host side in user space: see
//! [`muxer`] for the Unix-socket protocol, [`packet`] for the checked parsing
//! of guest packets.

pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::queue::{drain_queue, BUDGET};
use super::worker::{self, DeviceWorker, Poller};
use super::{Activation, Interrupt, VirtioDevice, WorkerHandle, TYPE_VSOCK};
use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;
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

impl Vsock {
    /// The socket's path from now on (the muxer derives `<socket>_<port>`
    /// from it, and it is removed at the end): where the jail puts it (see
    /// [`crate::jail`]). The bound listener is kept.
    pub fn reached_at(&mut self, path: std::path::PathBuf) {
        self.config.socket = path;
    }
}

/// The socket goes with the device (at the VMM's end, on the main thread),
/// not with the muxer on the worker thread, whose seccomp filter allows no
/// unlink.
impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config.socket);
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
        let (Ok([rx, tx, _evt]), Ok([rx_evt, tx_evt, evt_evt])) =
            (<[Queue; 3]>::try_from(a.queues), <[EventFd; 3]>::try_from(a.queue_events))
        else {
            return Err("virtio-vsock needs exactly three queues".into());
        };
        let w = VsockWorker::new(rx, tx, rx_evt, tx_evt, evt_evt, a.mem, a.interrupt, muxer)
            .map_err(|e| format!("virtio-vsock: timerfd: {e}"))?;
        worker::spawn("virtio-vsock", w)
    }
}

/// The device's thread: the queues, the muxer, and a timer for the muxer's
/// half-open timeout. Public so that the fuzz target drives the real thing.
pub struct VsockWorker {
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    evt_evt: EventFd,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    pub muxer: Muxer,
    /// Armed (one-shot) at the muxer's next half-open deadline.
    timer: TimerFd,
    timer_deadline: Option<Instant>,
}

impl VsockWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rx: Queue,
        tx: Queue,
        rx_evt: EventFd,
        tx_evt: EventFd,
        evt_evt: EventFd,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        muxer: Muxer,
    ) -> std::io::Result<VsockWorker> {
        Ok(VsockWorker {
            rx,
            tx,
            rx_evt,
            tx_evt,
            evt_evt,
            mem,
            interrupt,
            muxer,
            timer: TimerFd::new()?,
            timer_deadline: None,
        })
    }

    /// Serves the guest's packets through the shared loop (runaway-index
    /// guard, per-wake budget, self-notify for the rest).
    fn process_tx(&mut self, poller: &Poller) -> bool {
        let muxer = &mut self.muxer;
        let drained = drain_queue("virtio-vsock tx", &mut self.tx, &self.mem, BUDGET, |m, chain| {
            match packet::read_tx(m, chain) {
                Ok(pkt) => muxer.on_guest_packet(pkt, poller),
                Err(e) => tracing::debug!("vsock: dropping a malformed packet: {e:?}"),
            }
            0
        });
        drained.renotify(&self.tx_evt);
        drained.served > 0
    }

    /// Fills the guest's receive buffers, at most [`BUDGET`] per wake-up;
    /// with more to send and buffers left, the rx eventfd brings us back.
    fn process_rx(&mut self, poller: &Poller) -> bool {
        let mut used = 0;
        while self.muxer.has_rx() {
            if used == BUDGET {
                if let Err(e) = self.rx_evt.write(1) {
                    tracing::error!("vsock: re-notifying the rx queue: {e}");
                }
                break;
            }
            // A runaway index pops nothing: the loop ends below.
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
                warn_limited!(RX_ERROR, "vsock: rx add_used: {e:?}");
            }
            used += 1;
        }
        used > 0
    }

    /// Closes timed-out half-open connections and re-arms the timer for the
    /// next deadline (disarmed when there is none).
    fn sync_timer(&mut self, now: Instant, poller: &Poller) {
        self.muxer.sweep(now, poller);
        let next = self.muxer.next_deadline();
        if next == self.timer_deadline {
            return;
        }
        let r = match next {
            // A zero duration would disarm the timer: at least 1 ms.
            Some(at) => self.timer.reset(at.saturating_duration_since(now).max(Duration::from_millis(1)), None),
            None => self.timer.clear(),
        };
        match r {
            Ok(()) => self.timer_deadline = next,
            Err(e) => tracing::error!("vsock: arming the half-open timer: {e}"),
        }
    }
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVT: u64 = 2;
const TOKEN_TIMER: u64 = 3;

static RX_ERROR: LogLimit = LogLimit::new();

impl DeviceWorker for VsockWorker {
    fn init(&mut self, poller: &Poller) -> std::io::Result<()> {
        poller.add(self.rx_evt.as_raw_fd(), TOKEN_RX, EventSet::IN)?;
        poller.add(self.tx_evt.as_raw_fd(), TOKEN_TX, EventSet::IN)?;
        poller.add(self.evt_evt.as_raw_fd(), TOKEN_EVT, EventSet::IN)?;
        poller.add(self.timer.as_raw_fd(), TOKEN_TIMER, EventSet::IN)?;
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
            TOKEN_TIMER => {
                // Reading clears the expiration; the sweep is below.
                let _ = self.timer.wait();
                self.timer_deadline = None;
            }
            _ => self.muxer.handle_event(token, events, poller),
        }
        // The guest may have queued packets while we served the ring.
        if !used_tx && token != TOKEN_TX {
            used_tx = self.process_tx(poller);
        }
        self.sync_timer(Instant::now(), poller);
        let used_rx = self.process_rx(poller);
        if used_tx || used_rx {
            self.interrupt.signal_used();
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const QSIZE: u16 = 512;

    /// A worker over leaked guest memory (the driver-side mocks borrow it)
    /// with a muxer on a fresh socket; returns the tx mock too.
    fn worker(tag: &str) -> (VsockWorker, MockSplitQueue<'static, GuestMemoryMmap>, PathBuf) {
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()));
        let rxq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x8000), QSIZE);
        let dir = std::env::temp_dir().join(format!("hearth-vsock-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let muxer = Muxer::new(3, path.clone(), muxer::bind(&path).unwrap());
        let ev = || EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(ev()));
        let w = VsockWorker::new(
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            ev(),
            ev(),
            ev(),
            mem.clone(),
            interrupt,
            muxer,
        )
        .unwrap();
        (w, txq, dir)
    }

    #[test]
    fn tx_runaway_available_index_returns_without_spinning() {
        let (mut w, txq, dir) = worker("runaway");
        txq.avail().idx().store(QSIZE + 3);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let poller = Poller::new().unwrap();
            w.handle(TOKEN_TX, EventSet::IN, &poller);
            tx.send(w.tx_evt.read().is_err()).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "the tx drain spins or re-notifies");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tx_budget_leaves_the_rest_for_the_next_wake() {
        let (mut w, txq, dir) = worker("budget");
        let n = BUDGET as u16 + 20;
        for i in 0..n {
            // Too short for a header: each fails its own request only.
            txq.add_desc_chains(&[RawDescriptor::from(descriptor(0x20000, 8, false, None))], i).unwrap();
        }
        let poller = Poller::new().unwrap();
        w.handle(TOKEN_TX, EventSet::IN, &poller);
        assert_eq!(txq.used().idx().load(), BUDGET as u16);
        assert_eq!(w.tx_evt.read().unwrap(), 1, "the worker re-notified itself");
        w.handle(TOKEN_TX, EventSet::IN, &poller);
        assert_eq!(txq.used().idx().load(), n);
        assert!(w.tx_evt.read().is_err());
        drop(w);
        std::fs::remove_dir_all(dir).unwrap();
    }

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
