//! virtio-net over a host tap device.
//!
//! Two queues: receive (0) and transmit (1). Every packet, both ways, is the
//! 12-byte `virtio_net_hdr_v1` (with VIRTIO_F_VERSION_1 the header always
//! includes `num_buffers`) followed by an Ethernet frame. No offload is
//! offered (no CSUM, TSO or MRG_RXBUF), so the header carries nothing:
//!
//! - transmit: the device gathers the chain's device-readable bytes, skips
//!   the header (its content is ignored) and writes the bare frame to the tap,
//!   which is opened without IFF_VNET_HDR (see [`super::tap`]). The used
//!   length is 0: the device writes nothing into a transmit buffer.
//! - receive: when the tap is readable the device reads one frame and writes
//!   the header (all zeros except `num_buffers` = 1, which the spec requires
//!   without MRG_RXBUF, section 5.1.6.4) and the frame into the next chain's
//!   device-writable buffers; the used length is 12 + the frame's length.
//!   When the guest has no receive buffer left, the frame read is kept, the
//!   tap is no longer polled and the device waits for the guest's notify of
//!   the receive queue: no busy loop, no frame dropped for lack of a buffer
//!   (beyond what the tap's own queue drops while we wait).
//!
//! The guest is untrusted; a malformed chain fails its packet only:
//!
//! - a transmit chain that cannot be read (an address outside guest memory),
//!   is too short for the header and an Ethernet header, or is longer than
//!   [`MAX_FRAME`] is returned with used length 0 and nothing is sent.
//! - a receive chain that is unusable for any frame (an address outside guest
//!   memory, or fewer writable bytes than a header and an Ethernet header,
//!   e.g. only device-readable buffers) is returned with used length 0, and
//!   the frame waits for the next chain.
//! - a receive chain that is valid but too small for this frame: the frame is
//!   dropped and the chain returned with used length 0. Without MRG_RXBUF a
//!   frame must fit one chain (5.1.6.3.1: the driver should give buffers of
//!   at least 1526 bytes); the spec has no way to report a truncated frame,
//!   so delivering part of it would be wrong, and keeping the chain for a
//!   smaller frame could stall reception behind one bad buffer. A used
//!   length of 0 is a buffer with nothing written (2.7.8), which Linux counts
//!   as a length error and refills.
//!
//! Work per wake-up is bounded (a flood on the tap cannot starve transmit,
//! and a guest that keeps transmitting cannot starve receive).
//!
//! The tap lives in a [`NicSlot`] shared with the control socket: a NIC
//! slot's tap is attached and detached while the VM runs, its link is up
//! only while one is attached, and what the guest transmits with no tap is
//! dropped (and counted).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::nic_slot::{NetStats, NicSlot};
use super::queue::{avail_index_is_sane, drain_queue, BUDGET};
use super::tap::{Tap, TapIo};
use super::worker::{self, DeviceWorker, Poller};
use super::{Activation, Interrupt, VirtioDevice, WorkerHandle, TYPE_NET};
use crate::config::NetConfig;
use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;
const ETH_HLEN: usize = 14;
/// Largest frame either way: a 64 KiB IP packet with an Ethernet header and
/// a VLAN tag.
pub const MAX_FRAME: usize = 65535 + ETH_HLEN + 4;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Frames received per wake-up before giving the other direction a turn
/// (transmit uses the shared loop's budget, [`BUDGET`], too).
const RX_BUDGET: usize = BUDGET;

static RX_RUNAWAY: LogLimit = LogLimit::new();
static RX_ERROR: LogLimit = LogLimit::new();

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_CHANGED: u64 = 3;

/// The MAC of NIC slot `index` (until the guest sets its own): locally
/// administered, "he" for hearth, then the slot.
pub fn slot_mac(index: u8) -> [u8; 6] {
    [0x02, 0x68, 0x65, 0x00, 0x00, index]
}

/// A NIC's back end as the device, its worker and the control socket share it.
pub type SharedNic = Arc<NicSlot<Tap>>;

/// The header of every received packet: no offload, one buffer.
fn rx_header() -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[10..12].copy_from_slice(&1u16.to_le_bytes());
    h
}

/// Why a transmit chain was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxError {
    /// A descriptor outside guest memory, or lengths that overflow.
    BadChain,
    /// Shorter than the header and an Ethernet header.
    TooShort,
    /// Longer than [`MAX_FRAME`] after the header.
    TooLong,
}

/// Gathers the frame of a transmit chain (its device-readable bytes minus
/// the header) into `frame`.
pub fn gather_frame<M>(mem: &M, chain: DescriptorChain<&M>, frame: &mut Vec<u8>) -> Result<(), TxError>
where
    M: GuestMemory,
{
    let mut reader = Reader::new(mem, chain).map_err(|_| TxError::BadChain)?;
    let total = reader.available_bytes();
    if total < HDR_LEN + ETH_HLEN {
        return Err(TxError::TooShort);
    }
    let len = total - HDR_LEN;
    if len > MAX_FRAME {
        return Err(TxError::TooLong);
    }
    let mut header = [0u8; HDR_LEN];
    reader.read_exact(&mut header).map_err(|_| TxError::BadChain)?;
    frame.resize(len, 0);
    reader.read_exact(frame).map_err(|_| TxError::BadChain)?;
    Ok(())
}

/// What became of a receive chain offered a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The header and frame were written: the used length.
    Delivered(u32),
    /// The chain is fine but smaller than this frame: drop the frame, return
    /// the chain with used length 0.
    FrameTooBig,
    /// The chain cannot hold any frame: return it with used length 0, keep
    /// the frame for the next chain.
    BadChain,
}

/// Writes the header and `frame` into the device-writable buffers of `chain`.
pub fn deliver_frame<M>(mem: &M, chain: DescriptorChain<&M>, frame: &[u8]) -> RxOutcome
where
    M: GuestMemory,
{
    let mut writer = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(_) => return RxOutcome::BadChain,
    };
    let room = writer.available_bytes();
    if room < HDR_LEN + ETH_HLEN {
        return RxOutcome::BadChain;
    }
    if room - HDR_LEN < frame.len() {
        return RxOutcome::FrameTooBig;
    }
    if writer.write_all(&rx_header()).is_err() || writer.write_all(frame).is_err() {
        return RxOutcome::BadChain;
    }
    RxOutcome::Delivered((HDR_LEN + frame.len()) as u32)
}

/// The thread side of the device: both queues and the tap (in its slot).
pub struct NetWorker<T: TapIo + AsRawFd> {
    nic: Arc<NicSlot<T>>,
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_event: EventFd,
    tx_event: EventFd,
    interrupt: Arc<Interrupt>,
    /// Receive buffer; `pending` bytes of it are a frame read from the tap
    /// and not delivered yet.
    rx_frame: Vec<u8>,
    pending: Option<usize>,
    tx_frame: Vec<u8>,
    /// Whether the tap should be polled: the guest may have receive buffers.
    tap_wanted: bool,
    /// The descriptor registered with the poller, if any.
    polled_fd: Option<RawFd>,
    /// The slot's generation this worker last set itself up for.
    generation: u64,
    /// The tap failed (or the back end closed): it is not polled again
    /// until another is attached.
    tap_broken: bool,
}

impl<T: TapIo + AsRawFd> NetWorker<T> {
    /// A worker over `tap` alone (a slot of its own, attached as "tap").
    pub fn new(
        tap: T,
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        rx_event: EventFd,
        tx_event: EventFd,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let nic = Arc::new(NicSlot::new(Some(tap), Some("tap".into())).expect("an eventfd"));
        Self::with_slot(nic, mem, rx, tx, rx_event, tx_event, interrupt)
    }

    pub fn with_slot(
        nic: Arc<NicSlot<T>>,
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        rx_event: EventFd,
        tx_event: EventFd,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let generation = nic.lock().generation();
        NetWorker {
            nic,
            mem,
            rx,
            tx,
            rx_event,
            tx_event,
            interrupt,
            rx_frame: vec![0; MAX_FRAME],
            pending: None,
            tx_frame: Vec::new(),
            tap_wanted: true,
            polled_fd: None,
            generation,
            tap_broken: false,
        }
    }

    /// Whether the tap should be watched for frames now.
    pub fn wants_tap(&self) -> bool {
        self.tap_wanted && !self.tap_broken && self.nic.lock().is_attached()
    }

    /// The counters of the current attachment.
    pub fn stats(&self) -> NetStats {
        self.nic.lock().stats
    }

    /// The guest added receive buffers.
    pub fn on_rx_notify(&mut self) {
        let _ = self.rx_event.read();
        self.tap_wanted = true;
        self.process_rx();
    }

    /// The guest added transmit chains.
    pub fn on_tx_notify(&mut self) {
        let _ = self.tx_event.read();
        self.process_tx();
    }

    /// The tap has a frame (or an error).
    pub fn on_tap_ready(&mut self, events: EventSet) {
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) && !events.contains(EventSet::IN) {
            tracing::warn!("virtio-net: the tap reports an error; receiving stops");
            self.tap_broken = true;
            return;
        }
        self.process_rx();
    }

    fn process_rx(&mut self) {
        if !self.rx.ready() {
            self.tap_wanted = false;
            return;
        }
        let nic = self.nic.clone();
        let mut slot = nic.lock();
        if slot.generation() != self.generation {
            // Another tap since this worker last looked: `sync_tap` sets up
            // polling; nothing read from the old one is delivered.
            return;
        }
        let slot = &mut *slot;
        let Some(tap) = slot.tap.as_mut() else { return };
        let mut used = false;
        for _ in 0..RX_BUDGET {
            let len = match self.pending {
                Some(len) => len,
                None => match tap.read_frame(&mut self.rx_frame) {
                    Ok(0) => {
                        tracing::warn!("virtio-net: the tap was closed; receiving stops");
                        self.tap_broken = true;
                        break;
                    }
                    Ok(len) => {
                        self.pending = Some(len);
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: reading the tap: {e}; receiving stops");
                        self.tap_broken = true;
                        break;
                    }
                },
            };
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                // Out of buffers: ask the guest to notify when it adds some,
                // unless some arrived meanwhile.
                match self.rx.enable_notification(&self.mem) {
                    // More buffers arrived meanwhile, unless the index ran
                    // away (then nothing pops: stop rather than spin).
                    Ok(true) if avail_index_is_sane(&self.rx, &self.mem) => {
                        let _ = self.rx.disable_notification(&self.mem);
                        continue;
                    }
                    Ok(true) => {
                        warn_limited!(RX_RUNAWAY, "virtio-net: the rx available index is more than a queue ahead")
                    }
                    Ok(false) => {}
                    Err(e) => warn_limited!(RX_ERROR, "virtio-net: rx queue: {e:?}"),
                }
                self.tap_wanted = false;
                break;
            };
            // While the tap is polled the guest need not notify new buffers.
            let _ = self.rx.disable_notification(&self.mem);
            let head = chain.head_index();
            let used_len = match deliver_frame(&self.mem, chain, &self.rx_frame[..len]) {
                RxOutcome::Delivered(n) => {
                    self.pending = None;
                    slot.stats.rx_frames += 1;
                    slot.stats.rx_bytes += len as u64;
                    n
                }
                RxOutcome::FrameTooBig => {
                    tracing::debug!(len, "virtio-net: frame larger than the receive buffer dropped");
                    self.pending = None;
                    slot.stats.rx_dropped += 1;
                    0
                }
                RxOutcome::BadChain => {
                    tracing::debug!("virtio-net: malformed receive chain returned unused");
                    0
                }
            };
            if let Err(e) = self.rx.add_used(&self.mem, head, used_len) {
                warn_limited!(RX_ERROR, "virtio-net: rx add_used: {e:?}");
            }
            used = true;
        }
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
    }

    fn process_tx(&mut self) {
        // The shared loop: runaway-index guard and per-wake budget; what the
        // budget leaves is served on the self-notify (`renotify`).
        let nic = self.nic.clone();
        let mut slot = nic.lock();
        let slot = &mut *slot;
        let (tap, stats, frame) = (&mut slot.tap, &mut slot.stats, &mut self.tx_frame);
        let drained = drain_queue("virtio-net tx", &mut self.tx, &self.mem, BUDGET, |m, chain| {
            match (gather_frame(m, chain, frame), tap.as_mut()) {
                (Ok(()), Some(tap)) => match tap.write_frame(frame) {
                    Ok(()) => {
                        stats.tx_frames += 1;
                        stats.tx_bytes += frame.len() as u64;
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net: writing to the tap: {e}; frame dropped");
                        stats.tx_dropped += 1;
                    }
                },
                // The link is down: the guest should not send, and what it
                // sends goes nowhere.
                (Ok(()), None) => stats.tx_dropped += 1,
                (Err(e), _) => {
                    tracing::debug!("virtio-net: transmit chain dropped: {e:?}");
                    stats.tx_dropped += 1;
                }
            }
            0
        });
        if drained.notify {
            self.interrupt.signal_used();
        }
        drained.renotify(&self.tx_event);
    }

    /// Adds or removes the tap from the poller to match [`Self::wants_tap`],
    /// starting afresh when the slot changed.
    fn sync_tap(&mut self, poller: &Poller) {
        let (generation, fd) = {
            let slot = self.nic.lock();
            (slot.generation(), slot.tap.as_ref().map(|t| t.as_raw_fd()))
        };
        if generation != self.generation {
            // The old tap's descriptor is closed (which took it out of the
            // epoll set) and its number may be reused: forget it.
            if let Some(old) = self.polled_fd.take() {
                let _ = poller.remove(old);
            }
            self.generation = generation;
            self.pending = None;
            self.tap_broken = false;
            self.tap_wanted = true;
        }
        let want = self.tap_wanted && !self.tap_broken && fd.is_some();
        match (want, self.polled_fd, fd) {
            (true, None, Some(fd)) => match poller.add(fd, TOKEN_TAP, EventSet::IN) {
                Ok(()) => self.polled_fd = Some(fd),
                Err(e) => {
                    tracing::warn!("virtio-net: registering the tap: {e}; receiving stops");
                    self.tap_broken = true;
                }
            },
            (false, Some(old), _) => {
                if let Err(e) = poller.remove(old) {
                    tracing::warn!("virtio-net: unregistering the tap: {e}; receiving stops");
                    self.tap_broken = true;
                }
                self.polled_fd = None;
            }
            _ => {}
        }
    }
}

impl<T: TapIo + AsRawFd + 'static> DeviceWorker for NetWorker<T> {
    fn init(&mut self, poller: &Poller) -> io::Result<()> {
        poller.add(self.rx_event.as_raw_fd(), TOKEN_RX, EventSet::IN)?;
        poller.add(self.tx_event.as_raw_fd(), TOKEN_TX, EventSet::IN)?;
        poller.add(self.nic.changed().as_raw_fd(), TOKEN_CHANGED, EventSet::IN)?;
        if let Some(fd) = self.nic.lock().tap.as_ref().map(|t| t.as_raw_fd()) {
            poller.add(fd, TOKEN_TAP, EventSet::IN)?;
            self.polled_fd = Some(fd);
        }
        Ok(())
    }

    fn handle(&mut self, token: u64, events: EventSet, poller: &Poller) {
        match token {
            TOKEN_RX => self.on_rx_notify(),
            TOKEN_TX => self.on_tx_notify(),
            TOKEN_TAP => self.on_tap_ready(events),
            TOKEN_CHANGED => {
                let _ = self.nic.changed().read();
            }
            _ => {}
        }
        self.sync_tap(poller);
        // A tap just attached may already hold frames; the edge was missed.
        if token == TOKEN_CHANGED {
            self.process_rx();
            self.sync_tap(poller);
        }
    }
}

/// The virtio-net device as the transport sees it.
pub struct Net {
    mac: [u8; 6],
    nic: SharedNic,
}

impl Net {
    /// Opens (or creates) the tap of `config`: attached for the VM's life.
    pub fn new(config: NetConfig) -> io::Result<Net> {
        let tap = Tap::open(&config.tap)?;
        Ok(Net { mac: config.mac, nic: Arc::new(NicSlot::new(Some(tap), Some(config.tap))?) })
    }

    /// NIC slot `index`: no tap, link down, until the control socket
    /// attaches one.
    pub fn slot(index: u8) -> io::Result<Net> {
        Ok(Net { mac: slot_mac(index), nic: Arc::new(NicSlot::new(None, None)?) })
    }

    pub fn shared(&self) -> SharedNic {
        self.nic.clone()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

/// The device configuration space: mac[6], then status (le16: the link is
/// up while a tap is attached).
fn config_space(mac: &[u8; 6], link_up: bool) -> [u8; 8] {
    let mut c = [0u8; 8];
    c[..6].copy_from_slice(mac);
    if link_up {
        c[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
    }
    c
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_RING_F_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let link_up = self.nic.lock().is_attached();
        super::read_config_bytes(&config_space(&self.mac, link_up), offset, data)
    }
    fn activate(&mut self, a: Activation) -> Result<WorkerHandle, String> {
        let (Ok([rx, tx]), Ok([rx_event, tx_event])) =
            (<[Queue; 2]>::try_from(a.queues), <[EventFd; 2]>::try_from(a.queue_events))
        else {
            return Err("virtio-net needs exactly two queues".into());
        };
        let worker = NetWorker::with_slot(self.nic.clone(), a.mem, rx, tx, rx_event, tx_event, a.interrupt);
        worker::spawn("virtio-net", worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::descriptor;
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use crate::devices::virtio::tap::DatagramTap;
    use crate::devices::virtio::worker::Poller;

    /// Queues of 512 entries, more than the per-wake-up budget.
    const QSIZE: u16 = 512;
    const RXQ: u64 = 0x0;
    const TXQ: u64 = 0x8000;
    const BUF: u64 = 0x10000;
    const BUF2: u64 = 0x20000;

    struct Rig {
        /// Leaked so that the driver-side mocks, which borrow it, live as
        /// long as the rig (creating a mock resets its rings).
        mem: &'static GuestMemoryMmap,
        rxq: MockSplitQueue<'static, GuestMemoryMmap>,
        txq: MockSplitQueue<'static, GuestMemoryMmap>,
        worker: NetWorker<DatagramTap>,
        /// The host side of the fake tap.
        host: UnixDatagram,
    }

    impl Rig {
        fn new() -> Rig {
            let mem: &'static GuestMemoryMmap =
                Box::leak(Box::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()));
            let rxq = MockSplitQueue::create(mem, GuestAddress(RXQ), QSIZE);
            let txq = MockSplitQueue::create(mem, GuestAddress(TXQ), QSIZE);
            let (guest, host) = UnixDatagram::pair().unwrap();
            guest.set_nonblocking(true).unwrap();
            host.set_nonblocking(true).unwrap();
            let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
            let worker = NetWorker::new(
                DatagramTap(guest),
                mem.clone(),
                rxq.create_queue().unwrap(),
                txq.create_queue().unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
                interrupt,
            );
            Rig { mem, rxq, txq, worker, host }
        }

        fn mock(&self, base: u64) -> &MockSplitQueue<'static, GuestMemoryMmap> {
            if base == RXQ {
                &self.rxq
            } else {
                &self.txq
            }
        }

        /// Makes `descs` available on the queue at `base`, from descriptor `first`.
        fn add(&self, base: u64, first: u16, descs: &[virtio_queue::desc::split::Descriptor]) {
            let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
            self.mock(base).add_desc_chains(&raw, first).unwrap();
        }

        /// The used ring entries (id, len) of the queue at `base`.
        fn used(&self, base: u64) -> Vec<(u32, u32)> {
            let m = self.mock(base);
            let n = m.used().idx().load();
            (0..n).map(|i| m.used().ring().ref_at(i as usize).unwrap().load()).map(|e| (e.id(), e.len())).collect()
        }

        fn host_recv(&self) -> Option<Vec<u8>> {
            let mut b = vec![0u8; 70000];
            match self.host.recv(&mut b) {
                Ok(n) => Some(b[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
    }

    fn rx_buffer(addr: u64, len: u32) -> Vec<virtio_queue::desc::split::Descriptor> {
        vec![descriptor(addr, len, true, None)]
    }

    #[test]
    fn tx_frame_reaches_the_tap_without_its_header() {
        let mut r = Rig::new();
        let f = frame(60, 1);
        r.mem.write_slice(&[0xaa; HDR_LEN], GuestAddress(BUF)).unwrap();
        r.mem.write_slice(&f, GuestAddress(BUF2)).unwrap();
        r.add(TXQ, 0, &[descriptor(BUF, HDR_LEN as u32, false, Some(1)), descriptor(BUF2, 60, false, None)]);
        // Header and frame in one buffer, the header split across two.
        r.mem.write_slice(&f, GuestAddress(BUF + 0x1000 + HDR_LEN as u64)).unwrap();
        r.add(TXQ, 2, &[descriptor(BUF + 0x1000, 72, false, None)]);
        r.mem.write_slice(&f, GuestAddress(BUF + 0x2000 + 8)).unwrap();
        r.add(TXQ, 3, &[descriptor(BUF + 0x2000 - 4, 4, false, Some(4)), descriptor(BUF + 0x2000, 68, false, None)]);
        r.worker.on_tx_notify();
        for _ in 0..3 {
            assert_eq!(r.host_recv().unwrap(), f);
        }
        assert_eq!(r.host_recv(), None);
        assert_eq!(r.used(TXQ), vec![(0, 0), (2, 0), (3, 0)]);
        assert_ne!(r.worker.interrupt.status() & 1, 0);
    }

    #[test]
    fn rx_frame_lands_in_guest_memory_after_the_header() {
        let mut r = Rig::new();
        r.mem.write_slice(&[0xee; 2048], GuestAddress(BUF)).unwrap();
        r.add(RXQ, 0, &rx_buffer(BUF, 1526));
        let f = frame(98, 3);
        r.host.send(&f).unwrap();
        r.worker.on_tap_ready(EventSet::IN);
        assert_eq!(r.used(RXQ), vec![(0, (HDR_LEN + 98) as u32)]);
        let mut got = vec![0u8; HDR_LEN + 98 + 1];
        r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got[..10], [0u8; 10], "no offload flags");
        assert_eq!(got[10..12], 1u16.to_le_bytes(), "num_buffers is 1 without MRG_RXBUF");
        assert_eq!(got[HDR_LEN..HDR_LEN + 98], f[..]);
        assert_eq!(got[HDR_LEN + 98], 0xee, "nothing written past the frame");
        assert_ne!(r.worker.interrupt.status() & 1, 0);
        assert!(r.worker.wants_tap());
    }

    #[test]
    fn rx_frame_spans_several_writable_descriptors() {
        let mut r = Rig::new();
        r.add(RXQ, 0, &[descriptor(BUF, 10, true, Some(1)), descriptor(BUF2, 1516, true, None)]);
        let f = frame(200, 9);
        r.host.send(&f).unwrap();
        r.worker.on_tap_ready(EventSet::IN);
        assert_eq!(r.used(RXQ), vec![(0, (HDR_LEN + 200) as u32)]);
        let mut got = vec![0u8; 200];
        r.mem.read_slice(&mut got, GuestAddress(BUF2 + 2)).unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn rx_without_buffers_stops_polling_until_the_guest_adds_some() {
        let mut r = Rig::new();
        let f = frame(60, 5);
        r.host.send(&f).unwrap();
        r.worker.on_tap_ready(EventSet::IN);
        assert!(!r.worker.wants_tap(), "no buffer: the tap is not polled");
        assert!(r.used(RXQ).is_empty());
        assert_eq!(r.worker.interrupt.status(), 0);
        // The guest adds a buffer and notifies.
        r.add(RXQ, 0, &rx_buffer(BUF, 1526));
        r.worker.rx_event.write(1).unwrap();
        r.worker.on_rx_notify();
        assert!(r.worker.wants_tap());
        assert_eq!(r.used(RXQ), vec![(0, (HDR_LEN + 60) as u32)]);
        let mut got = vec![0u8; 60];
        r.mem.read_slice(&mut got, GuestAddress(BUF + HDR_LEN as u64)).unwrap();
        assert_eq!(got, f, "the frame read before the buffer came was kept");
    }

    #[test]
    fn malformed_tx_chains_are_dropped_not_sent() {
        let mut r = Rig::new();
        // Too short for the header.
        r.add(TXQ, 0, &[descriptor(BUF, 8, false, None)]);
        // A header and less than an Ethernet header.
        r.add(TXQ, 1, &[descriptor(BUF, 20, false, None)]);
        // Outside guest memory.
        r.add(TXQ, 2, &[descriptor(BUF, 12, false, Some(3)), descriptor(0xffff_0000_0000, 60, false, None)]);
        // Crossing the end of guest memory.
        r.add(TXQ, 4, &[descriptor((1 << 20) - 30, 60, false, None)]);
        // Longer than any frame (descriptors of huge lengths).
        r.add(TXQ, 5, &[descriptor(BUF, 0xffff_ff00, false, Some(6)), descriptor(BUF, 0xffff_ff00, false, None)]);
        // Only device-writable buffers.
        r.add(TXQ, 7, &[descriptor(BUF, 100, true, None)]);
        // A next index past the table's end.
        r.add(TXQ, 8, &[descriptor(BUF, 12, false, Some(200))]);
        // Then a good one still goes through.
        r.add(TXQ, 9, &[descriptor(BUF, 74, false, None)]);
        r.worker.on_tx_notify();
        assert_eq!(r.host_recv().map(|f| f.len()), Some(62));
        assert_eq!(r.host_recv(), None);
        let used = r.used(TXQ);
        assert_eq!(used.len(), 8);
        assert!(used.iter().all(|&(_, len)| len == 0));
    }

    #[test]
    fn malformed_rx_chains_are_returned_unused_and_the_frame_kept() {
        let mut r = Rig::new();
        // Read-only buffer, out-of-memory buffer, a buffer too small for any frame.
        r.add(RXQ, 0, &[descriptor(BUF, 1526, false, None)]);
        r.add(RXQ, 1, &rx_buffer(0xffff_0000_0000, 1526));
        r.add(RXQ, 2, &rx_buffer(BUF, 20));
        r.add(RXQ, 3, &rx_buffer(BUF2, 1526));
        let f = frame(60, 7);
        r.host.send(&f).unwrap();
        r.worker.on_tap_ready(EventSet::IN);
        assert_eq!(r.used(RXQ), vec![(0, 0), (1, 0), (2, 0), (3, (HDR_LEN + 60) as u32)]);
        let mut got = vec![0u8; 60];
        r.mem.read_slice(&mut got, GuestAddress(BUF2 + HDR_LEN as u64)).unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn rx_frame_bigger_than_the_chain_is_dropped() {
        let mut r = Rig::new();
        r.add(RXQ, 0, &rx_buffer(BUF, 200));
        r.add(RXQ, 1, &rx_buffer(BUF2, 200));
        r.host.send(&frame(1000, 1)).unwrap();
        let small = frame(100, 2);
        r.host.send(&small).unwrap();
        r.worker.on_tap_ready(EventSet::IN);
        assert_eq!(r.used(RXQ), vec![(0, 0), (1, (HDR_LEN + 100) as u32)]);
        let mut got = vec![0u8; 100];
        r.mem.read_slice(&mut got, GuestAddress(BUF2 + HDR_LEN as u64)).unwrap();
        assert_eq!(got, small);
    }

    #[test]
    fn closed_back_end_stops_receiving() {
        let mut r = Rig::new();
        r.add(RXQ, 0, &rx_buffer(BUF, 1526));
        drop(std::mem::replace(&mut r.host, UnixDatagram::unbound().unwrap()));
        r.worker.on_tap_ready(EventSet::IN | EventSet::HANG_UP);
        r.worker.on_tap_ready(EventSet::HANG_UP);
        assert!(!r.worker.wants_tap());
        assert!(r.used(RXQ).is_empty());
    }

    #[test]
    fn work_per_wake_up_is_bounded() {
        let mut r = Rig::new();
        let n = BUDGET as u16 + 10;
        for i in 0..n {
            r.add(TXQ, i, &[descriptor(BUF, 74, false, None)]);
        }
        r.worker.on_tx_notify();
        let mut sent = 0;
        while r.host_recv().is_some() {
            sent += 1;
        }
        assert_eq!(sent, BUDGET);
        // The worker notified itself to come back for the rest.
        assert_eq!(r.worker.tx_event.read().unwrap(), 1);
        r.worker.on_tx_notify();
        while r.host_recv().is_some() {
            sent += 1;
        }
        assert_eq!(sent, n as usize);
        assert!(r.worker.tx_event.read().is_err(), "no more self-notify");
    }

    #[test]
    fn tx_runaway_available_index_returns_without_spinning() {
        let r = Rig::new();
        r.add(TXQ, 0, &[descriptor(BUF, 74, false, None)]);
        crate::devices::virtio::queue::tests::set_avail_idx(r.mem, &r.txq, 1 + QSIZE + 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut worker = r.worker;
        std::thread::spawn(move || {
            worker.on_tx_notify();
            tx.send(worker.tx_event.read().is_err()).unwrap();
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(done, Ok(true), "on_tx_notify returns and does not re-notify itself");
    }

    #[test]
    fn rx_runaway_available_index_returns_without_spinning() {
        let r = Rig::new();
        crate::devices::virtio::queue::tests::set_avail_idx(r.mem, &r.rxq, QSIZE + 5);
        r.host.send(&frame(60, 1)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut worker = r.worker;
        let host = r.host;
        std::thread::spawn(move || {
            worker.on_tap_ready(EventSet::IN);
            tx.send(()).unwrap();
            drop(host);
        });
        assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(), "rx spins");
    }

    #[test]
    fn config_space_is_mac_then_link_up() {
        assert_eq!(rx_header(), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let mut d = [0xffu8; 10];
        super::super::read_config_bytes(&config_space(&[0x52, 0x54, 0, 1, 2, 3], true), 0, &mut d);
        assert_eq!(d, [0x52, 0x54, 0, 1, 2, 3, 1, 0, 0, 0]);
        let mut status = [0u8; 2];
        super::super::read_config_bytes(&config_space(&[0; 6], true), 6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP);
        super::super::read_config_bytes(&config_space(&[0; 6], false), 6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 0, "an empty slot's link is down");
        assert_eq!(slot_mac(3), [0x02, 0x68, 0x65, 0, 0, 3]);
    }

    #[test]
    fn a_slot_carries_frames_only_while_a_tap_is_attached() {
        let mut r = Rig::new();
        let slot = Arc::new(NicSlot::<DatagramTap>::new(None, None).unwrap());
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        r.worker = NetWorker::with_slot(
            slot.clone(),
            r.mem.clone(),
            r.rxq.create_queue().unwrap(),
            r.txq.create_queue().unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            interrupt,
        );
        let poller = Poller::new().unwrap();
        r.worker.init(&poller).unwrap();
        assert!(!r.worker.wants_tap() && r.worker.polled_fd.is_none(), "an empty slot polls no tap");
        let f = frame(60, 2);
        let send = |r: &Rig, first: u16| {
            let at = BUF + 0x1000 * u64::from(first);
            r.mem.write_slice(&f, GuestAddress(at + HDR_LEN as u64)).unwrap();
            r.add(TXQ, first, &[descriptor(at, (HDR_LEN + 60) as u32, false, None)]);
        };
        // Link down: what the guest sends is returned and counted as dropped.
        send(&r, 0);
        r.worker.on_tx_notify();
        assert_eq!(r.used(TXQ), vec![(0, 0)]);
        assert_eq!(r.worker.stats().tx_dropped, 1);

        let (guest, host) = UnixDatagram::pair().unwrap();
        guest.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        slot.attach(DatagramTap(guest), "n1").unwrap();
        r.worker.handle(TOKEN_CHANGED, EventSet::IN, &poller);
        assert!(r.worker.polled_fd.is_some(), "the attached tap is polled");
        assert_eq!(r.worker.stats(), NetStats::default(), "fresh counters for the attachment");
        send(&r, 1);
        r.worker.on_tx_notify();
        let mut b = [0u8; 100];
        assert_eq!(host.recv(&mut b).unwrap(), 60, "the frame reached the attached tap");
        r.add(RXQ, 0, &rx_buffer(BUF2, 1526));
        host.send(&frame(80, 4)).unwrap();
        r.worker.handle(TOKEN_TAP, EventSet::IN, &poller);
        assert_eq!(r.used(RXQ), vec![(0, (HDR_LEN + 80) as u32)]);
        let s = r.worker.stats();
        assert_eq!((s.tx_frames, s.tx_bytes, s.rx_frames, s.rx_bytes), (1, 60, 1, 80));

        let (id, last) = slot.detach().unwrap();
        assert_eq!((id.as_str(), last), ("n1", s));
        r.worker.handle(TOKEN_CHANGED, EventSet::IN, &poller);
        assert!(r.worker.polled_fd.is_none(), "a detached tap is no longer polled");
        send(&r, 2);
        r.worker.on_tx_notify();
        assert_eq!(r.worker.stats().tx_dropped, 1, "sent after the detach: dropped");
        assert!(host.recv(&mut b).is_err(), "nothing reaches a detached tap");
    }
}
