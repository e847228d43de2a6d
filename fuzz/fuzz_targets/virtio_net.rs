//! Fuzzes virtio-net through its real worker: chains built from the input
//! in a small guest memory make up one of the device's two queues (transmit
//! or receive, the other a small valid queue), and `NetWorker` runs its own
//! event handling (`DeviceWorker::handle`, through an epoll as on the
//! device's thread) with one end of a datagram socketpair as the tap. For
//! transmit the guest's notify is replayed until the worker stops
//! re-notifying itself (the per-wake budget); for receive, frames from the
//! input are written into the "tap" first.
//!
//! Input, read front to back (missing bytes read as zeros):
//! - config byte: queue size 2^(b % 9), EVENT_IDX, tx or rx queue; the
//!   start of the rings, used_event;
//! - entries, each a well-formed chain (1 to 4 buffers, small, around a
//!   frame's size or large; device-readable for tx, writable for rx, now
//!   and then one of the other kind), direct or in an indirect table, or a
//!   raw descriptor (any flags and next);
//! - for rx, up to three frame lengths (empty, a header's worth, up to
//!   MAX_FRAME);
//! - optionally a raw available index; the rest fills guest memory.
//!
//! Oracles: no panic, no hang (a runaway index or a full ring must not
//! keep the worker busy: the dispatch loop below is bounded and must end
//! with nothing left to do); no frame on the tap longer than MAX_FRAME and
//! no more frames than chains.

#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use hearth_fuzz::chains::*;
use hearth_vmm::devices::virtio::net::{NetWorker, MAX_FRAME};
use hearth_vmm::devices::virtio::tap::DatagramTap;
use hearth_vmm::devices::virtio::worker::{DeviceWorker, Poller};
use hearth_vmm::devices::virtio::Interrupt;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the other (valid, empty) queue lives, clear of the fuzzed one.
const OTHER_QUEUE: u64 = 0xf0000;

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});

fn frame_len(v: u16) -> usize {
    match v {
        v if v < 0x4000 => (v % 64) as usize,
        v if v < 0x8000 => 1514,
        v => (v as usize * 2) % (MAX_FRAME + 1),
    }
}

fn run(mut u: Unstructured) -> Result<()> {
    let cfg: u8 = u.arbitrary()?;
    let size = 1u16 << (cfg % 9);
    let event_idx = cfg & 0x10 != 0;
    let rx = cfg & 0x20 != 0;
    let start: u16 = u.arbitrary()?;
    let used_event: u16 = u.arbitrary()?;
    let entries: u8 = u.int_in_range(0..=32)?;

    let mem = guest_memory();
    let mock = MockSplitQueue::new(&mem, size);
    let mut b = Builder::new(&mock, size);
    for _ in 0..entries {
        let mode: u8 = u.arbitrary()?;
        if mode & 0x80 != 0 {
            b.raw_entry(&mut u, mode)?;
        } else {
            let segs = segments(&mut u, mode, 12 + 1514, rx)?;
            b.chain(&segs, mode & 0x08 != 0, None);
        }
    }
    let frames: Vec<usize> = if rx {
        let n: u8 = u.int_in_range(0..=3)?;
        (0..n).map(|_| u.arbitrary::<u16>().map(frame_len)).collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let raw_avail = if u.arbitrary::<bool>()? { Some(u.arbitrary()?) } else { None };
    let payload = u.take_rest();
    let (mut queue, _) = b.finish(&mem, start, raw_avail, payload);
    queue.set_event_idx(event_idx);
    let used_event_at = mock.avail_addr().0 + 4 + 2 * size as u64;
    mem.write_obj(used_event, GuestAddress(used_event_at)).unwrap();

    let other_mock = MockSplitQueue::create(&mem, GuestAddress(OTHER_QUEUE), 16);
    let other: Queue = other_mock.create_queue().unwrap();
    let (rxq, txq) = if rx { (queue, other) } else { (other, queue) };

    let (guest, host) = UnixDatagram::pair().unwrap();
    guest.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let rx_event = EventFd::new(EFD_NONBLOCK).unwrap();
    let tx_event = EventFd::new(EFD_NONBLOCK).unwrap();
    let (rx_kick, tx_kick) = (rx_event.try_clone().unwrap(), tx_event.try_clone().unwrap());
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut worker = NetWorker::new(DatagramTap(guest), mem.clone(), rxq, txq, rx_event, tx_event, interrupt);
    let poller = Poller::new().unwrap();
    worker.init(&poller).unwrap();

    for len in &frames {
        let f: Vec<u8> = (0..*len).map(|i| i as u8).collect();
        let _ = host.send(&f);
    }
    // The guest's notify.
    if rx {
        rx_kick.write(1).unwrap()
    } else {
        tx_kick.write(1).unwrap()
    }

    // Each round is one wake of the device thread; a queue of up to 256
    // chains needs at most two under the budget, a few more for the tap.
    let mut quiet = false;
    for _ in 0..16 {
        if poller.dispatch(&mut worker, 0).unwrap() == 0 {
            quiet = true;
            break;
        }
    }
    assert!(quiet, "the worker keeps waking itself");

    let mut sent = 0;
    let mut buf = vec![0u8; MAX_FRAME + 64];
    while let Ok(n) = host.recv(&mut buf) {
        assert!(n <= MAX_FRAME, "a {n}-byte frame reached the tap");
        sent += 1;
    }
    assert!(sent <= size as usize, "{sent} frames from a {size}-entry queue");
    Ok(())
}
