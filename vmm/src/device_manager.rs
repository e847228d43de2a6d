//! Places virtio devices in the guest: each gets a 4 KiB MMIO window in the
//! 32-bit gap and its own IOAPIC pin, an irqfd for that pin, a KVM ioeventfd
//! per queue on its QueueNotify register, and a `virtio_mmio.device=` entry
//! on the kernel command line (the kernel has no bus to discover them on).

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::MMIO_GAP_START;
use crate::devices::bus::Bus;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, REG_QUEUE_NOTIFY};
use crate::devices::virtio::VirtioDevice;

/// First GSI for virtio devices: 0-4 are the PIT, keyboard, cascade and COM
/// ports; KVM's IOAPIC has 24 pins.
const FIRST_IRQ: u32 = 5;
const LAST_IRQ: u32 = 23;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many virtio devices: at most {} fit the interrupt controller", LAST_IRQ - FIRST_IRQ + 1)]
    TooManyDevices,
    #[error("setting up a virtio device: {0}")]
    Setup(String),
    #[error("KVM could not {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}

#[derive(Default)]
pub struct DeviceManager {
    transports: Vec<Arc<MmioTransport>>,
    cmdline: Vec<String>,
}

impl DeviceManager {
    pub fn attach(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Arc<MmioTransport>, Error> {
        let index = self.transports.len() as u32;
        let irq = FIRST_IRQ + index;
        if irq > LAST_IRQ {
            return Err(Error::TooManyDevices);
        }
        let base = MMIO_GAP_START + index as u64 * MMIO_WINDOW;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Setup(e.to_string()))?;
        vm.register_irqfd(&irqfd, irq).map_err(|source| Error::Kvm { what: "register a virtio irqfd", source })?;
        let transport = Arc::new(MmioTransport::new(device, mem.clone(), irqfd).map_err(Error::Setup)?);
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), queue as u32)
                .map_err(|source| Error::Kvm { what: "register a virtio ioeventfd", source })?;
        }
        mmio.insert(base, MMIO_WINDOW, transport.clone()).map_err(|e| Error::Setup(e.to_string()))?;
        self.cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        tracing::debug!(device_type = transport.device_type(), base, irq, "virtio device attached");
        self.transports.push(transport.clone());
        Ok(transport)
    }

    /// The kernel command line entries declaring the devices.
    pub fn cmdline(&self) -> String {
        self.cmdline.join(" ")
    }

    /// Stops every device's worker.
    pub fn shutdown(&self) {
        for t in &self.transports {
            t.shutdown();
        }
    }
}
