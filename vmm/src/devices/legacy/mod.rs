//! PC devices the boot needs: the 16550 UART for the console and the i8042
//! controller whose reset line is how the guest ends the VM.

pub mod console;
pub mod console_log;
pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::SerialConsole;

/// A vm-superio trigger that raises a guest interrupt through an irqfd.
pub struct IrqTrigger(pub vmm_sys_util::eventfd::EventFd);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
