//! The loop every device worker runs on a notify: pop each available chain,
//! serve it, return it as used, with notifications re-enabled only when the
//! ring is drained, and an interrupt only if the driver wants one.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

/// Serves every chain the driver made available on `queue` with `serve`
/// (which returns the used length); returns whether to interrupt the guest.
/// `device` names the device in log messages.
pub fn serve_queue<M, F>(device: &str, queue: &mut Queue, mem: &M, mut serve: F) -> bool
where
    M: GuestMemory,
    F: FnMut(&M, DescriptorChain<&M>) -> u32,
{
    if !queue.ready() {
        return false;
    }
    let mut used_any = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            tracing::warn!("{device}: {e:?}");
            return false;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = serve(mem, chain);
            match queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => tracing::warn!("{device}: add_used: {e:?}"),
            }
        }
        match queue.enable_notification(mem) {
            // More arrived meanwhile, unless the driver's available index is
            // more than a queue ahead: no chain can be popped from such a
            // ring, and going on would spin this thread forever (found by
            // fuzzing).
            Ok(true) if avail_index_is_sane(queue, mem) => continue,
            Ok(true) => {
                tracing::warn!("{device}: the driver's available index is more than a queue ahead; ignoring the queue");
                break;
            }
            Ok(false) => break,
            Err(e) => {
                tracing::warn!("{device}: {e:?}");
                return false;
            }
        }
    }
    used_any && queue.needs_notification(mem).unwrap_or(true)
}

/// Whether the driver's available index is at most a queue ahead of ours.
fn avail_index_is_sane<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| (idx - Wrapping(queue.next_avail())).0 <= queue.size())
}
