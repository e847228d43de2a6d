//! The back end of a virtio-net device, shared by the device (its config
//! space: the link is up while a tap is attached), its worker (frames) and
//! the control socket (attach, detach, counters).
//!
//! A `--net` device holds its tap from boot to the end. A NIC slot
//! (`--nic-slots`) starts empty, with its link down: the control socket
//! attaches a tap while the VM runs, which the guest sees as the link coming
//! up, and detaches it, which the guest sees as the link going down. The
//! device itself never changes, so nothing in the guest has to be probed
//! again: the same design as the disk slots (docs/vmm.md says why).
//!
//! A change bumps `generation` and writes `changed`, an eventfd the worker
//! polls: the worker then stops polling the old tap's descriptor (closing
//! it already took it out of the epoll set; the descriptor number may even
//! be the new tap's by now, which is why the worker re-registers on every
//! generation rather than comparing numbers) and polls the new one. Lock
//! order: the transport's state (config reads and updates), then this; the
//! worker takes only this.

use std::io;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Counters of one attachment (a `--net` device's run, or a slot's tap from
/// attach to detach).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames (and their bytes) delivered to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames (and their bytes) the guest sent that reached the tap.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames lost: read from the tap but too large for the guest's buffer.
    pub rx_dropped: u64,
    /// Frames lost: malformed chains, a failed tap write, or no tap attached.
    pub tx_dropped: u64,
}

pub struct NicState<T> {
    pub tap: Option<T>,
    /// What the control socket calls the attachment (a `--net` device's is
    /// its tap's name); None while empty.
    pub id: Option<String>,
    pub stats: NetStats,
    generation: u64,
}

impl<T> NicState<T> {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_attached(&self) -> bool {
        self.tap.is_some()
    }
}

pub struct NicSlot<T> {
    state: Mutex<NicState<T>>,
    changed: EventFd,
}

impl<T> NicSlot<T> {
    pub fn new(tap: Option<T>, id: Option<String>) -> io::Result<NicSlot<T>> {
        Ok(NicSlot {
            state: Mutex::new(NicState { tap, id, stats: NetStats::default(), generation: 0 }),
            changed: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, NicState<T>> {
        // A worker that panicked while holding the lock left nothing half
        // done that matters more than keeping the VM serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The eventfd written at every attach and detach.
    pub fn changed(&self) -> &EventFd {
        &self.changed
    }

    /// Puts `tap` in the empty slot under `id`, with fresh counters.
    pub fn attach(&self, tap: T, id: &str) -> Result<(), String> {
        let mut s = self.lock();
        if let Some(current) = &s.id {
            return Err(format!("the slot already holds the NIC {current:?}: detach it first"));
        }
        s.tap = Some(tap);
        s.id = Some(id.to_string());
        s.stats = NetStats::default();
        s.generation += 1;
        drop(s);
        let _ = self.changed.write(1);
        Ok(())
    }

    /// Empties the slot; returns what it held (its id and final counters).
    /// The tap is closed here: from this return on, no frame goes to it.
    pub fn detach(&self) -> Option<(String, NetStats)> {
        let mut s = self.lock();
        let id = s.id.take()?;
        s.tap = None;
        s.generation += 1;
        let stats = s.stats;
        drop(s);
        let _ = self.changed.write(1);
        Some((id, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_and_detach_bump_the_generation_and_signal() {
        let slot: NicSlot<u8> = NicSlot::new(None, None).unwrap();
        assert!(!slot.lock().is_attached());
        assert!(slot.changed().read().is_err(), "nothing signalled yet");
        slot.attach(7, "a").unwrap();
        assert_eq!(slot.changed().read().unwrap(), 1);
        assert_eq!(slot.lock().generation(), 1);
        assert!(slot.attach(8, "b").unwrap_err().contains("\"a\""), "an occupied slot is refused");
        slot.lock().stats.tx_frames = 3;
        let (id, stats) = slot.detach().unwrap();
        assert_eq!((id.as_str(), stats.tx_frames), ("a", 3));
        assert!(slot.lock().tap.is_none());
        assert_eq!(slot.lock().generation(), 2);
        assert!(slot.detach().is_none(), "an empty slot has nothing to detach");
        slot.attach(9, "c").unwrap();
        assert_eq!(slot.lock().stats, NetStats::default(), "counters start afresh per attachment");
    }
}
