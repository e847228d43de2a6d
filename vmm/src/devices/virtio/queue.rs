//! The one loop every device drains a queue with: pop each available chain,
//! serve it, return it as used, with notifications re-enabled only when the
//! ring is drained, and an interrupt only if the driver wants one.
//!
//! Two bounds keep a hostile driver from owning the device's thread:
//!
//! - the runaway index: an available index more than a queue ahead of ours
//!   makes every pop fail while `enable_notification` keeps saying "more";
//!   the loop gives up on the queue instead of spinning (found by fuzzing).
//! - the budget: at most `budget` chains per wake-up ([`BUDGET`] in the
//!   workers). A driver that refills the ring as fast as it is drained
//!   would otherwise keep the thread here forever, starving the device's
//!   other queues and back end. What is left is not lost: the caller sees
//!   [`Drained::more`] and notifies itself (see [`Drained::renotify`]), so
//!   the worker's epoll comes back to the queue after the other events.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;

/// Chains a worker serves from one queue per wake-up before yielding.
pub const BUDGET: usize = 256;

static RUNAWAY: LogLimit = LogLimit::new();
static QUEUE_ERROR: LogLimit = LogLimit::new();

/// What a drain did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Chains served (and returned as used).
    pub served: usize,
    /// The driver wants an interrupt for them.
    pub notify: bool,
    /// The budget ran out with chains still available: come back later.
    pub more: bool,
}

impl Drained {
    /// Makes `event` (the queue's own eventfd) readable again if work is
    /// left, so the worker's epoll wakes for it after the other events.
    pub fn renotify(&self, event: &EventFd) {
        if self.more {
            if let Err(e) = event.write(1) {
                tracing::error!("re-notifying a queue with work left: {e}");
            }
        }
    }
}

/// Serves up to `budget` chains the driver made available on `queue` with
/// `serve` (which returns the used length). `device` names the device in log
/// messages.
pub fn drain_queue<M, F>(device: &str, queue: &mut Queue, mem: &M, budget: usize, mut serve: F) -> Drained
where
    M: GuestMemory,
    F: FnMut(&M, DescriptorChain<&M>) -> u32,
{
    let mut out = Drained::default();
    if !queue.ready() {
        return out;
    }
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            warn_limited!(QUEUE_ERROR, "{device}: {e:?}");
            return Drained { notify: false, ..out };
        }
        while out.served < budget {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let len = serve(mem, chain);
            out.served += 1;
            if let Err(e) = queue.add_used(mem, head, len) {
                warn_limited!(QUEUE_ERROR, "{device}: add_used: {e:?}");
            }
        }
        let spent = out.served >= budget;
        if spent && avail_index_is_sane(queue, mem) && has_available(queue, mem) {
            // Notifications stay disabled: we come back on our own.
            out.more = true;
            break;
        }
        match queue.enable_notification(mem) {
            // More arrived meanwhile, unless the driver's available index is
            // more than a queue ahead: no chain can be popped from such a
            // ring, and going on would spin this thread forever.
            Ok(true) if avail_index_is_sane(queue, mem) => {
                if spent {
                    out.more = true;
                    break;
                }
                continue;
            }
            Ok(true) => {
                warn_limited!(
                    RUNAWAY,
                    "{device}: the driver's available index is more than a queue ahead; ignoring the queue"
                );
                break;
            }
            Ok(false) => break,
            Err(e) => {
                warn_limited!(QUEUE_ERROR, "{device}: {e:?}");
                return Drained { notify: false, ..out };
            }
        }
    }
    out.notify = out.served > 0 && queue.needs_notification(mem).unwrap_or(true);
    out
}

/// Whether the driver's available index is at most a queue ahead of ours.
/// Public for the loops that pop on their own terms (net and vsock receive,
/// which pop only when they have something to deliver).
pub fn avail_index_is_sane<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| (idx - Wrapping(queue.next_avail())).0 <= queue.size())
}

fn has_available<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| idx.0 != queue.next_avail())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::block::descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Sets the driver's available index of `mock` to `idx`.
    pub(crate) fn set_avail_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, idx: u16) {
        mem.write_obj(idx, GuestAddress(mock.avail_addr().0 + 2)).unwrap();
    }

    fn chains(mock: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
        for i in 0..n {
            mock.add_desc_chains(&[RawDescriptor::from(descriptor(0x10000, 16, false, None))], i).unwrap();
        }
    }

    #[test]
    fn a_runaway_available_index_returns_without_spinning() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let mut q = mock.create_queue::<Queue>().unwrap();
        chains(&mock, 2);
        set_avail_idx(&m, &mock, 2 + 16 + 1);
        let d = drain_queue("test", &mut q, &m, BUDGET, |_, _| 0);
        assert!(!d.more);
        assert!(d.served <= 16);
    }

    #[test]
    fn the_budget_leaves_the_rest_for_the_next_wake_and_loses_nothing() {
        let m = mem();
        // MockSplitQueue::new packs the rings: its used ring overlaps the
        // upper half of the available ring, so stay below half a queue.
        let mock = MockSplitQueue::new(&m, 128);
        let mut q = mock.create_queue::<Queue>().unwrap();
        chains(&mock, 50);
        let ev = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut heads = Vec::new();
        let d = drain_queue("test", &mut q, &m, 20, |_, c| {
            heads.push(c.head_index());
            0
        });
        assert_eq!((d.served, d.more), (20, true));
        d.renotify(&ev);
        assert_eq!(ev.read().unwrap(), 1, "the queue re-notified itself");
        let d = drain_queue("test", &mut q, &m, 20, |_, c| {
            heads.push(c.head_index());
            0
        });
        assert_eq!((d.served, d.more), (20, true));
        let d = drain_queue("test", &mut q, &m, 20, |_, c| {
            heads.push(c.head_index());
            0
        });
        assert_eq!((d.served, d.more), (10, false));
        d.renotify(&ev);
        assert!(ev.read().is_err(), "no self-notify once drained");
        assert_eq!(heads, (0..50).collect::<Vec<u16>>(), "every chain once, in order");
        assert_eq!(mock.used().idx().load(), 50);
    }

    #[test]
    fn exactly_the_budget_is_not_more() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let mut q = mock.create_queue::<Queue>().unwrap();
        chains(&mock, 8);
        let d = drain_queue("test", &mut q, &m, 8, |_, _| 0);
        assert_eq!((d.served, d.more), (8, false));
        // The driver must be asked to notify again, or the queue stalls.
        let flags: u16 = m.read_obj(mock.used_addr()).unwrap();
        assert_eq!(flags, 0, "VRING_USED_F_NO_NOTIFY left set");
    }
}
