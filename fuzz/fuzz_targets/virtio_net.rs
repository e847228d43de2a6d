//! Fuzzes virtio-net's chain handling: chains built from the input in a
//! small guest memory, served by the device's own queue loop
//! (`queue::serve_queue`: pop, serve, `add_used`, until nothing more is
//! available), either as transmit chains (`net::gather_frame`) or as
//! receive chains offered a frame (`net::deliver_frame`).
//!
//! Input, read front to back (missing bytes read as zeros):
//! - config byte: queue size 2^(b % 9), EVENT_IDX, tx or rx queue; the
//!   start of the rings, used_event;
//! - entries, each a well-formed chain (1 to 4 buffers, small, around a
//!   frame's size or large; device-readable for tx, writable for rx, now
//!   and then one of the other kind), direct or in an indirect table, or a
//!   raw descriptor (any flags and next);
//! - for rx, the frame length (empty, a header's worth, up to MAX_FRAME);
//! - optionally a raw available index; the rest fills guest memory.
//!
//! Oracles: no panic, no hang; a gathered frame is never longer than
//! MAX_FRAME, a delivered one fits the chain.

#![no_main]

use hearth_fuzz::chains::*;
use hearth_vmm::devices::virtio::net::{self, RxOutcome, MAX_FRAME};
use hearth_vmm::devices::virtio::queue::serve_queue;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});

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
    let frame_len = match u.arbitrary::<u16>()? {
        v if v < 0x4000 => (v % 64) as usize,
        v if v < 0x8000 => 1514,
        v => (v as usize * 2) % (MAX_FRAME + 1),
    };
    let raw_avail = if u.arbitrary::<bool>()? { Some(u.arbitrary()?) } else { None };
    let payload = u.take_rest();
    let (mut queue, _) = b.finish(&mem, start, raw_avail, payload);
    queue.set_event_idx(event_idx);
    let used_event_at = mock.avail_addr().0 + 4 + 2 * size as u64;
    mem.write_obj(used_event, GuestAddress(used_event_at)).unwrap();

    if rx {
        let frame: Vec<u8> = (0..frame_len).map(|i| i as u8).collect();
        serve_queue("fuzz-net-rx", &mut queue, &mem, |m, chain| match net::deliver_frame(m, chain, &frame) {
            RxOutcome::Delivered(n) => {
                assert_eq!(n as usize, net::HDR_LEN + frame.len());
                n
            }
            RxOutcome::FrameTooBig | RxOutcome::BadChain => 0,
        });
    } else {
        let mut frame = Vec::new();
        serve_queue("fuzz-net-tx", &mut queue, &mem, |m, chain| {
            if net::gather_frame(m, chain, &mut frame).is_ok() {
                assert!(frame.len() <= MAX_FRAME, "gathered a {}-byte frame", frame.len());
            }
            0
        });
    }
    Ok(())
}
