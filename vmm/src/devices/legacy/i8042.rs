//! The i8042 keyboard controller, only for its CPU reset line: the guest
//! kernel runs with `reboot=k`, so both `reboot` and hearth's way of powering
//! off (see docs/vmm.md) write 0xfe to port 0x64, which ends the VM.

use std::sync::Mutex;

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;
use crate::devices::{EventSender, VmEvent};

pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

pub struct ResetTrigger(pub EventSender);

impl vm_superio::Trigger for ResetTrigger {
    type E = String;
    fn trigger(&self) -> Result<(), String> {
        self.0.send(VmEvent::Reset).map_err(|e| e.to_string())
    }
}

pub struct I8042(Mutex<I8042Device<ResetTrigger>>);

impl I8042 {
    pub fn new(events: EventSender) -> Self {
        I8042(Mutex::new(I8042Device::new(ResetTrigger(events))))
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            data[0] = self.0.lock().unwrap().read(off);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            // The only failure is a VMM that already stopped listening.
            let _ = self.0.lock().unwrap().write(off, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_ends_the_vm() {
        let (tx, rx) = std::sync::mpsc::channel();
        let dev = I8042::new(tx);
        dev.write(0, &[0xfe]); // data port: nothing
        assert!(rx.try_recv().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Reset);
    }
}
