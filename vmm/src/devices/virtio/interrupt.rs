//! The interrupt of one virtio-mmio device: the InterruptStatus register
//! (bit 0: used buffers, bit 1: configuration change) and the irqfd that
//! raises the device's GSI in KVM's IOAPIC.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;
use vmm_sys_util::eventfd::EventFd;

/// Guest-triggerable warnings go through a rate limit (see ratelimit.rs).
static IRQ_WARN: LogLimit = LogLimit::new();

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt { status: AtomicU32::new(0), irqfd }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            warn_limited!(IRQ_WARN, "virtio interrupt: {e}");
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// The device's configuration space changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}
