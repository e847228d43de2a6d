//! A bus maps address ranges (I/O ports or MMIO addresses) to devices, so a
//! vCPU exit can be dispatched to the device that owns the address.

use std::sync::Arc;

/// A device on a bus. Accesses come from any vCPU thread, so devices lock
/// their own state.
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("empty or overflowing range {base:#x}+{len:#x}")]
    BadRange { base: u64, len: u64 },
}

#[derive(Default)]
pub struct Bus {
    // Sorted by base; a handful of devices, so a linear scan is fastest.
    devices: Vec<(u64, u64, Arc<dyn BusDevice>)>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::BadRange { base, len })?;
        if self.devices.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(Error::Overlap { base, len });
        }
        self.devices.push((base, len, device));
        self.devices.sort_by_key(|d| d.0);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Arc<dyn BusDevice>, u64)> {
        self.devices
            .iter()
            .find(|(b, l, _)| addr >= *b && addr.checked_add(size as u64).is_some_and(|e| e <= b + l))
            .map(|(b, _, d)| (d, addr - b))
    }

    /// Returns false when no device owns the address; the caller decides what
    /// an unclaimed access means (reads of nothing return all ones on a PC).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((d, offset)) => {
                d.read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((d, offset)) => {
                d.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let dev = Arc::new(Recorder::default());
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.0.lock().unwrap()[0], (7, vec![9]));
        assert!(!bus.read(0x400, &mut b));
        // An access straddling the end of a device is not that device's.
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::default();
        bus.insert(0x60, 5, Arc::new(Recorder::default())).unwrap();
        assert_eq!(bus.insert(0x64, 2, Arc::new(Recorder::default())), Err(Error::Overlap { base: 0x64, len: 2 }));
        assert!(bus.insert(0x58, 8, Arc::new(Recorder::default())).is_ok());
        assert_eq!(
            bus.insert(u64::MAX, 2, Arc::new(Recorder::default())),
            Err(Error::BadRange { base: u64::MAX, len: 2 })
        );
        assert_eq!(bus.insert(0x10, 0, Arc::new(Recorder::default())), Err(Error::BadRange { base: 0x10, len: 0 }));
    }
}
