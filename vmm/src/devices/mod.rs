//! Devices the guest reaches through port I/O or MMIO exits. `legacy/` holds
//! the PC devices the boot needs (serial console, i8042 reset line); virtio
//! devices will live in `virtio/` beside it.

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod virtio;

use std::sync::mpsc::Sender;

/// Something a device or vCPU tells the VMM that ends the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a CPU reset (reboot, or poweroff through reboot).
    Reset,
    /// The guest triple-faulted (also how `reboot=t` reboots).
    TripleFault,
    /// The guest kernel panicked; the panic line from its console.
    Panic(String),
    /// A vCPU cannot go on (KVM error, emulation failure, bad entry state).
    Fatal(String),
}

/// Where devices and vCPUs report [`VmEvent`]s.
pub type EventSender = Sender<VmEvent>;
