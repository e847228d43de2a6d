//! virtio devices over the MMIO transport (virtio 1.2, MMIO version 2).
//!
//! - [`mmio`]: the transport a driver talks to: feature negotiation, queue
//!   set-up, status, interrupts, config space, reset.
//! - [`worker`]: each active device runs on its own thread, woken by epoll on
//!   its queue eventfds (KVM ioeventfds, so a notify costs no exit to the
//!   VMM) and its back-end's descriptors.
//! - [`interrupt`]: the interrupt status register and the irqfd behind it.
//! - one module per device.
//!
//! The guest is untrusted: devices parse descriptor chains only through
//! virtio-queue's checked accessors, and a malformed request fails that
//! request (an error status, or a used entry of length 0), never the VMM.

pub mod balloon;
pub mod block;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod nic_slot;
pub mod queue;
pub mod tap;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::Interrupt;
pub use worker::WorkerHandle;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Feature bit every modern device offers and the driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What an activated device gets: guest memory, its queues as the driver set
/// them up, the eventfd of each queue, and its interrupt.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub acked_features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<WorkerHandle, String>;
}

/// Copies `data.len()` bytes of `config` from `offset`, zero-filling past its
/// end: a driver reading beyond the config space reads zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_reads_are_bounded() {
        let mut d = [0xffu8; 4];
        super::read_config_bytes(&[1, 2, 3], 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        super::read_config_bytes(&[1, 2, 3], u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
