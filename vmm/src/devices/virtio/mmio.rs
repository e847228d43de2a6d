//! The virtio-mmio transport (virtio 1.2 section 4.2, register layout
//! version 2): what the guest driver reads and writes in a device's 4 KiB
//! MMIO window. Queue notifications normally never reach it (the VMM
//! registers a KVM ioeventfd per queue); when they do, it kicks the queue's
//! eventfd itself.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, Interrupt, VirtioDevice, WorkerHandle, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;

/// Guest-triggerable warnings go through a rate limit (see ratelimit.rs).
static FEATURES_WARN: LogLimit = LogLimit::new();

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4854_4852; // "RHTH"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_START: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

struct State {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    worker: Option<WorkerHandle>,
}

pub struct MmioTransport {
    state: Mutex<State>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    device_type: u32,
    /// ConfigGeneration: bumped with every host-side change of the config
    /// space, so that a driver reading a field wider than 32 bits (the
    /// disk's capacity) retries instead of seeing half of each value.
    config_generation: AtomicU32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irqfd: EventFd) -> Result<Self, String> {
        let sizes = device.queue_max_sizes();
        let queues = sizes
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| format!("queue of size {max}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let device_type = device.device_type();
        Ok(MmioTransport {
            state: Mutex::new(State {
                device,
                queues,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                status: 0,
                worker: None,
            }),
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queue_events,
            device_type,
            config_generation: AtomicU32::new(0),
        })
    }

    /// Changes the device's configuration from the host side (`change` runs
    /// under the transport's lock, so no config read sees half of it), bumps
    /// the generation and raises the configuration-change interrupt.
    pub fn update_config<R>(&self, change: impl FnOnce() -> R) -> R {
        let s = self.state.lock().unwrap();
        let r = change();
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        // Once a driver has the device (it requests the interrupt while it
        // probes, and reads the config after): before that, nothing would
        // handle the interrupt, and the probe reads the new value anyway.
        let driven = s.status & STATUS_DRIVER != 0;
        drop(s);
        if driven {
            self.interrupt.signal_config();
        }
        r
    }

    /// One eventfd per queue: the VMM registers each as a KVM ioeventfd on
    /// QueueNotify with the queue's index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The driver's status register, for tests and diagnostics.
    pub fn status(&self) -> u32 {
        self.state.lock().unwrap().status
    }

    /// Stops the device's worker, if any (VM shutdown).
    pub fn shutdown(&self) {
        if let Some(w) = self.state.lock().unwrap().worker.take() {
            w.stop();
        }
    }

    fn reset(&self, s: &mut State) {
        if let Some(w) = s.worker.take() {
            w.stop();
        }
        for q in &mut s.queues {
            q.reset();
        }
        for e in &self.queue_events {
            let _ = e.read();
        }
        s.device_features_sel = 0;
        s.driver_features_sel = 0;
        s.driver_features = 0;
        s.queue_sel = 0;
        s.status = 0;
        self.interrupt.reset();
    }

    fn offered_features(s: &State) -> u64 {
        s.device.features() | VIRTIO_F_VERSION_1
    }

    fn set_status(&self, s: &mut State, value: u32) {
        if value == 0 {
            self.reset(s);
            return;
        }
        // Only a reset clears status bits (virtio 1.2 section 2.1.2): a driver
        // clearing DRIVER_OK and setting it again would otherwise start a
        // second worker beside the first, which is never stopped.
        let mut value = value | s.status;
        // FEATURES_OK only sticks if the driver accepted a subset of what
        // the device offers, including VERSION_1 (no legacy interface).
        if value & STATUS_FEATURES_OK != 0 && s.status & STATUS_FEATURES_OK == 0 {
            let offered = Self::offered_features(s);
            if s.driver_features & !offered != 0 || s.driver_features & VIRTIO_F_VERSION_1 == 0 {
                warn_limited!(
                    FEATURES_WARN,
                    device = self.device_type,
                    driver = s.driver_features,
                    offered,
                    "driver accepted features the device did not offer"
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        let becomes_ok = value & STATUS_DRIVER_OK != 0 && s.status & STATUS_DRIVER_OK == 0;
        s.status = value;
        if becomes_ok {
            if let Err(e) = self.activate(s) {
                tracing::error!(device = self.device_type, "activation failed: {e}");
                s.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt.signal_config();
            }
        }
    }

    fn activate(&self, s: &mut State) -> Result<(), String> {
        if s.status & STATUS_FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        for (i, q) in s.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(format!("queue {i} is set up outside guest memory or misaligned"));
            }
        }
        let queue_events = self
            .queue_events
            .iter()
            .map(|e| e.try_clone().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut queues = s
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).map_err(|e| format!("queue state: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let event_idx = s.driver_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: s.driver_features,
        };
        s.worker = Some(s.device.activate(activation)?);
        Ok(())
    }

    fn read_reg(&self, s: &State, offset: u64) -> u32 {
        let q = s.queues.get(s.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match s.device_features_sel {
                0 => Self::offered_features(s) as u32,
                1 => (Self::offered_features(s) >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size() as u32),
            REG_QUEUE_READY => q.map_or(0, |q| q.ready() as u32),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => s.status,
            REG_CONFIG_GENERATION => self.config_generation.load(Ordering::SeqCst),
            _ => {
                tracing::debug!(device = self.device_type, offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_reg(&self, s: &mut State, offset: u64, v: u32) {
        // Queue registers may only change before DRIVER_OK.
        let configurable = s.status & STATUS_DRIVER_OK == 0;
        let sel = s.queue_sel as usize;
        match offset {
            REG_DEVICE_FEATURES_SEL => s.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => s.driver_features_sel = v,
            REG_DRIVER_FEATURES if s.status & STATUS_FEATURES_OK == 0 => match s.driver_features_sel {
                0 => s.driver_features = (s.driver_features & !0xffff_ffff) | v as u64,
                1 => s.driver_features = (s.driver_features & 0xffff_ffff) | ((v as u64) << 32),
                _ => {}
            },
            REG_QUEUE_SEL => s.queue_sel = v,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if configurable =>
            {
                let Some(q) = s.queues.get_mut(sel) else { return };
                match offset {
                    // An invalid size (not a power of two, or too big) is ignored by virtio-queue.
                    REG_QUEUE_NUM => q.set_size(v.min(u16::MAX as u32) as u16),
                    REG_QUEUE_READY => q.set_ready(v == 1),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                    REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                    REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            REG_QUEUE_NOTIFY => match self.queue_events.get(v as usize) {
                Some(e) => {
                    let _ = e.write(1);
                }
                None => tracing::debug!(device = self.device_type, queue = v, "notify of a queue that does not exist"),
            },
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(s, v),
            _ => tracing::debug!(device = self.device_type, offset, value = v, "ignored virtio-mmio register write"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let s = self.state.lock().unwrap();
        if offset >= CONFIG_START {
            s.device.read_config(offset - CONFIG_START, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(&s, offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut s = self.state.lock().unwrap();
        if offset >= CONFIG_START {
            s.device.write_config(offset - CONFIG_START, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            let v = u32::from_le_bytes(data.try_into().unwrap());
            self.write_reg(&mut s, offset, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    struct Dummy {
        activations: Arc<AtomicUsize>,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xaa, 0xbb], offset, data)
        }
        fn activate(&mut self, a: Activation) -> Result<WorkerHandle, String> {
            assert_eq!(a.queues.len(), 2);
            self.activations.fetch_add(1, Ordering::SeqCst);
            struct Idle;
            impl super::super::worker::DeviceWorker for Idle {
                fn init(&mut self, _: &super::super::worker::Poller) -> std::io::Result<()> {
                    Ok(())
                }
                fn handle(&mut self, _: u64, _: vmm_sys_util::epoll::EventSet, _: &super::super::worker::Poller) {}
            }
            super::super::worker::spawn("dummy", Idle)
        }
    }

    fn rd(t: &MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let t = MmioTransport::new(Box::new(Dummy { activations: n.clone() }), mem, EventFd::new(0).unwrap()).unwrap();
        (t, n)
    }

    fn setup_queues(t: &MmioTransport) {
        for q in 0..2u32 {
            wr(t, REG_QUEUE_SEL, q);
            assert_eq!(rd(t, REG_QUEUE_NUM_MAX), 16);
            wr(t, REG_QUEUE_NUM, 16);
            let base = 0x1000 * (q + 1) * 4;
            wr(t, REG_QUEUE_DESC_LOW, base);
            wr(t, REG_QUEUE_DRIVER_LOW, base + 0x400);
            wr(t, REG_QUEUE_DEVICE_LOW, base + 0x800);
            wr(t, REG_QUEUE_READY, 1);
        }
    }

    #[test]
    fn identity_and_features() {
        let (t, _) = transport();
        assert_eq!(rd(&t, REG_MAGIC), MAGIC);
        assert_eq!(rd(&t, REG_VERSION), 2);
        assert_eq!(rd(&t, REG_DEVICE_ID), 2);
        wr(&t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&t, REG_DEVICE_FEATURES), 1 << 5);
        wr(&t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&t, REG_DEVICE_FEATURES), 1);
        let mut c = [0u8; 2];
        t.read(CONFIG_START, &mut c);
        assert_eq!(c, [0xaa, 0xbb]);
        // Unaligned or narrow register accesses read zero and change nothing.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn driver_init_sequence_activates_once_and_reset_stops() {
        let (t, n) = transport();
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&t, REG_DRIVER_FEATURES, 1); // VERSION_1
        wr(&t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&t, REG_DRIVER_FEATURES, 1 << 5);
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(rd(&t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        setup_queues(&t);
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        // Writing DRIVER_OK again does not activate twice.
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        // Queue registers are frozen while running.
        wr(&t, REG_QUEUE_SEL, 0);
        wr(&t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&t, REG_QUEUE_READY), 1);
        wr(&t, REG_STATUS, 0);
        assert_eq!(rd(&t, REG_STATUS), 0);
        assert_eq!(rd(&t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn status_bits_stay_until_reset_so_a_device_activates_once() {
        // Found by the virtio_mmio fuzz target: clearing DRIVER_OK without a
        // reset, then setting it again, started a second worker and leaked the first.
        let (t, n) = transport();
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(&t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&t, REG_DRIVER_FEATURES, 1);
        wr(&t, REG_STATUS, ready);
        setup_queues(&t);
        wr(&t, REG_STATUS, ready | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        wr(&t, REG_STATUS, ready);
        assert_ne!(rd(&t, REG_STATUS) & STATUS_DRIVER_OK, 0, "DRIVER_OK cleared without a reset");
        wr(&t, REG_STATUS, ready | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 1, "activated twice without a reset");
        wr(&t, REG_STATUS, 0);
        assert_eq!(rd(&t, REG_STATUS), 0);
        t.shutdown();
    }

    #[test]
    fn features_not_offered_are_refused() {
        let (t, n) = transport();
        wr(&t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&t, REG_DRIVER_FEATURES, 1 << 7); // not offered
        wr(&t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&t, REG_DRIVER_FEATURES, 1);
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(rd(&t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 0, "no activation without FEATURES_OK");
        assert_ne!(rd(&t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_outside_memory_fails_activation() {
        let (t, n) = transport();
        wr(&t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&t, REG_DRIVER_FEATURES, 1);
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        wr(&t, REG_QUEUE_SEL, 0);
        wr(&t, REG_QUEUE_NUM, 16);
        wr(&t, REG_QUEUE_DESC_LOW, 0xfff0_0000); // beyond the 1 MiB of memory
        wr(&t, REG_QUEUE_READY, 1);
        wr(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert_ne!(rd(&t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn notify_kicks_the_queue_event_and_bad_index_is_ignored() {
        let (t, _) = transport();
        wr(&t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        wr(&t, REG_QUEUE_NOTIFY, 99);
    }
}
