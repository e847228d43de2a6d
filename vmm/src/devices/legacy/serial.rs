//! COM1: vm-superio's 16550A model at I/O port 0x3f8, raising IRQ 4 through
//! an irqfd, writing into the [`ConsoleSink`](super::console::ConsoleSink).

use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::console::ConsoleSink;
use super::IrqTrigger;
use crate::devices::bus::BusDevice;
use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;

/// Guest-triggerable warnings go through a rate limit (see ratelimit.rs).
static SERIAL_WARN: LogLimit = LogLimit::new();

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const COM1_LEN: u64 = 8;

pub struct SerialConsole(Mutex<Serial<IrqTrigger, NoEvents, ConsoleSink>>);

impl SerialConsole {
    pub fn new(irq: IrqTrigger, sink: ConsoleSink) -> Self {
        SerialConsole(Mutex::new(Serial::new(irq, sink)))
    }

    /// Queues bytes for the guest to read (console input).
    pub fn input(&self, bytes: &[u8]) -> usize {
        self.0.lock().unwrap().enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&self) {
        use std::io::Write;
        let _ = self.0.lock().unwrap().writer_mut().flush();
    }
}

impl BusDevice for SerialConsole {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            data[0] = self.0.lock().unwrap().read(off);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if let Err(e) = self.0.lock().unwrap().write(off, data[0]) {
                warn_limited!(SERIAL_WARN, "serial console: {e}");
            }
        }
    }
}
