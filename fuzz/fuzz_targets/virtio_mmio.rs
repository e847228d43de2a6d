//! Fuzzes the virtio-mmio transport: a sequence of register reads and writes
//! of any offset, size and value, as a guest driver could issue them, to a
//! transport wrapping a small test device whose activation starts a real
//! (idle) worker thread.
//!
//! Each operation (missing bytes read as zeros):
//! - op byte: bit 0 write/read, bits 1-2 size (1, 2, 4, 8), bits 3-4 offset
//!   kind, bits 5-6 value kind; 0xff instead runs a driver's whole set-up
//!   (`driver_init`), so that states past activation are reached often;
//! - offset: a 4-byte-aligned register or config offset (u8 * 4), a config
//!   offset (0x100 + u8), or any u64;
//! - value: any u32, a small number (status bits, selectors, queue index),
//!   a 16-byte-aligned address inside guest memory (queue set-up), or one
//!   feature bit.
//!
//! Oracles: no panic or hang; an activation only sees FEATURES_OK features
//! the device offered, with VERSION_1, and ready queues inside guest memory;
//! at most one worker is alive at a time, and none after shutdown.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hearth_vmm::devices::bus::BusDevice;
use hearth_vmm::devices::virtio::mmio::MmioTransport;
use hearth_vmm::devices::virtio::worker::{self, DeviceWorker, Poller};
use hearth_vmm::devices::virtio::{Activation, VirtioDevice, WorkerHandle, VIRTIO_F_VERSION_1};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: u64 = 1 << 20;
const FEATURES: u64 = (1 << 5) | (1 << 29); // a device bit and EVENT_IDX

struct TestDevice {
    live_workers: Arc<AtomicUsize>,
    mem: GuestMemoryMmap,
}

/// Counts itself alive from activation until its thread ends.
struct IdleWorker(Arc<AtomicUsize>);

impl Drop for IdleWorker {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DeviceWorker for IdleWorker {
    fn init(&mut self, _: &Poller) -> std::io::Result<()> {
        Ok(())
    }
    fn handle(&mut self, _: u64, _: EventSet, _: &Poller) {}
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 256]
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        hearth_vmm::devices::virtio::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data)
    }
    fn activate(&mut self, a: Activation) -> std::result::Result<WorkerHandle, String> {
        assert_eq!(a.queues.len(), 2);
        assert_eq!(a.queue_events.len(), 2);
        assert_eq!(a.acked_features & !(FEATURES | VIRTIO_F_VERSION_1), 0, "features not offered were acked");
        assert_ne!(a.acked_features & VIRTIO_F_VERSION_1, 0, "activated without VERSION_1");
        for q in &a.queues {
            assert!(!q.ready() || q.is_valid(&self.mem), "a ready queue outside guest memory was activated");
        }
        self.live_workers.fetch_add(1, Ordering::SeqCst);
        worker::spawn("fuzz-idle", IdleWorker(self.live_workers.clone()))
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let live = Arc::new(AtomicUsize::new(0));
    let device = TestDevice { live_workers: live.clone(), mem: mem.clone() };
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let transport = MmioTransport::new(Box::new(device), mem, irqfd).unwrap();
    let mut u = Unstructured::new(data);
    while !u.is_empty() {
        if step(&transport, &mut u).is_err() {
            break;
        }
        assert!(live.load(Ordering::SeqCst) <= 1, "two workers serve the same device");
    }
    transport.shutdown();
    assert_eq!(live.load(Ordering::SeqCst), 0, "a worker outlived the transport's shutdown");
});

fn step(t: &MmioTransport, u: &mut Unstructured) -> Result<()> {
    let op: u8 = u.arbitrary()?;
    if op == 0xff {
        return driver_init(t, u);
    }
    let write = op & 1 != 0;
    let size = [1, 2, 4, 8][(op >> 1) as usize & 3];
    let offset: u64 = match (op >> 3) & 3 {
        0 | 1 => u.arbitrary::<u8>()? as u64 * 4,
        2 => 0x100 + u.arbitrary::<u8>()? as u64,
        _ => u.arbitrary()?,
    };
    if write {
        let value: u32 = match (op >> 5) & 3 {
            0 => u.arbitrary()?,
            1 => u.arbitrary::<u8>()? as u32,
            2 => (u.arbitrary::<u16>()? as u32) << 4,
            _ => 1 << (u.arbitrary::<u8>()? % 32),
        };
        t.write(offset, &u64::from(value).to_le_bytes()[..size]);
    } else {
        let mut buf = [0u8; 8];
        t.read(offset, &mut buf[..size]);
    }
    Ok(())
}

fn wr(t: &MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// A driver's set-up in one operation, with input-chosen features, queue
/// sizes, addresses inside guest memory, readiness and whether to finish
/// with DRIVER_OK: a shortcut to the states past activation, which single
/// register writes reach only by a long, exact sequence.
fn driver_init(t: &MmioTransport, u: &mut Unstructured) -> Result<()> {
    const ACK_DRIVER: u32 = 1 | 2;
    const FEATURES_OK: u32 = 8;
    const DRIVER_OK: u32 = 4;
    let features = (u.arbitrary::<u64>()? & FEATURES) | VIRTIO_F_VERSION_1;
    wr(t, 0x070, ACK_DRIVER);
    for sel in 0..2u32 {
        wr(t, 0x024, sel);
        wr(t, 0x020, (features >> (32 * sel)) as u32);
    }
    wr(t, 0x070, ACK_DRIVER | FEATURES_OK);
    for q in 0..2u32 {
        wr(t, 0x030, q);
        wr(t, 0x038, 1 << (u.arbitrary::<u8>()? % 9));
        for reg in [0x080, 0x090, 0x0a0] {
            wr(t, reg, (u.arbitrary::<u16>()? as u32) << 4);
        }
        wr(t, 0x044, u.arbitrary::<u8>()? as u32 & 1);
    }
    if u.arbitrary::<bool>()? {
        wr(t, 0x070, ACK_DRIVER | FEATURES_OK | DRIVER_OK);
    }
    Ok(())
}
