//! Fuzzes virtio-balloon's inflate and free page reporting queues: chains
//! built from the input in a guest memory of two regions (with a hole
//! between them), served by `balloon::process_queue` (the worker's loop)
//! with `BalloonHandler::inflate` or `report`, over a `Discard` that only
//! records ranges: real memory is never punched.
//!
//! Input, read front to back (missing bytes read as zeros):
//! - config byte: queue size 2^(b % 9), EVENT_IDX, inflate or reporting
//!   queue, page poison negotiated and its value; the start of the rings;
//! - entries, each a well-formed chain (inflate: device-readable buffers of
//!   PFNs, mostly in or near guest RAM, runs of consecutive ones; reporting:
//!   device-writable buffers, page-aligned or not), direct or indirect, or
//!   a raw descriptor (any flags and next);
//! - optionally a raw available index; the rest fills guest memory.
//!
//! Oracles: no panic, no hang; every discarded range is page-aligned, not
//! empty and inside its region (what `Discard` implementations rely on).

#![no_main]

use std::io;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use hearth_fuzz::chains::*;
use hearth_vmm::devices::virtio::balloon::{self, BalloonHandler, Discard, PAGE_SIZE};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// A second region, past a hole, so ranges can span regions or the hole.
const HIGH_AT: u64 = MEM_SIZE + 0x10000;
const HIGH_SIZE: u64 = 0x40000;

/// Records ranges, checking what the trait promises; never touches memory.
struct Recorder {
    ranges: usize,
    fail: bool,
}

impl Discard for Recorder {
    fn discard<R: GuestMemoryRegion>(&mut self, region: &R, at: MemoryRegionAddress, len: u64) -> io::Result<()> {
        assert!(len > 0, "empty discard");
        assert!(at.0 % PAGE_SIZE == 0 && len % PAGE_SIZE == 0, "misaligned discard {:#x}+{len:#x}", at.0);
        assert!(
            at.0.checked_add(len).is_some_and(|end| end <= region.len()),
            "discard {:#x}+{len:#x} past its region",
            at.0
        );
        self.ranges += 1;
        if self.fail {
            return Err(io::Error::other("injected discard failure"));
        }
        Ok(())
    }
}

/// The bytes of an inflate buffer: PFNs in RAM, in the hole, past it, or
/// any, often in runs.
fn pfns(u: &mut Unstructured, len: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pfn: u32 = 0;
    while out.len() < len as usize {
        let v: u8 = u.arbitrary()?;
        pfn = match v >> 5 {
            0..=3 => pfn.wrapping_add(1),
            4 => (v as u32 & 0x1f) * 8,
            5 => (HIGH_AT / PAGE_SIZE) as u32 + (v as u32 & 0x3f),
            6 => ((MEM_SIZE / PAGE_SIZE) as u32).wrapping_add(v as u32 & 0x1f).wrapping_sub(4),
            _ => u.arbitrary()?,
        };
        out.extend_from_slice(&pfn.to_le_bytes());
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});

fn run(mut u: Unstructured) -> Result<()> {
    let cfg: u8 = u.arbitrary()?;
    let size = 1u16 << (cfg % 9);
    let event_idx = cfg & 0x10 != 0;
    let report = cfg & 0x20 != 0;
    let poison_negotiated = cfg & 0x40 != 0;
    let fail = cfg & 0x80 != 0;
    let poison: u32 = if u.arbitrary()? { u.arbitrary()? } else { 0 };
    let start: u16 = u.arbitrary()?;
    let entries: u8 = u.int_in_range(0..=32)?;

    let mem = guest_memory();
    let mock = MockSplitQueue::new(&mem, size);
    let mut b = Builder::new(&mock, size);
    for _ in 0..entries {
        let mode: u8 = u.arbitrary()?;
        if mode & 0x80 != 0 {
            b.raw_entry(&mut u, mode)?;
        } else if report {
            // Free page reports: each buffer is a range of guest RAM, so
            // place descriptors by hand at page-aligned or odd places.
            if b.next_slot as usize + 4 > size as usize {
                continue;
            }
            let n = 1 + (mode & 3) as u16;
            let first = b.next_slot;
            for i in 0..n {
                let v: u16 = u.arbitrary()?;
                let at = match v >> 14 {
                    0 => (v as u64 & 0xff) * PAGE_SIZE,
                    1 => HIGH_AT - 0x4000 + (v as u64 & 0x7f) * PAGE_SIZE,
                    2 => MEM_SIZE - 0x4000 + (v as u64 & 0xf) * PAGE_SIZE,
                    _ => addr(u.arbitrary()?),
                };
                let l = match u.arbitrary::<u8>()? {
                    w if w < 0xc0 => (w as u32 % 16) * PAGE_SIZE as u32,
                    w if w < 0xf0 => w as u32 * 17,
                    _ => u.arbitrary()?,
                };
                let flags = if v & 0x1f == 0x1f { 0 } else { F_WRITE };
                let (flags, next) = if i + 1 < n { (flags | F_NEXT, first + i + 1) } else { (flags, 0) };
                b.store(first + i, Descriptor::new(at, l, flags, next));
            }
            b.next_slot += n;
            b.heads.push(first);
        } else {
            let mut segs = segments(&mut u, mode, 256, false)?;
            for s in &mut segs {
                if mode & 0x10 == 0 {
                    s.0 &= !3;
                }
            }
            let total = segs[0].0.min(0x8000);
            let bytes = pfns(&mut u, total)?;
            b.chain(&segs, mode & 0x08 != 0, Some(bytes));
        }
    }
    let raw_avail = if u.arbitrary::<bool>()? { Some(u.arbitrary()?) } else { None };
    let payload = u.take_rest();
    let (mut queue, _) = b.finish(&mem, start, raw_avail, payload);
    queue.set_event_idx(event_idx);

    let mut handler =
        BalloonHandler::new(Recorder { ranges: 0, fail }, Arc::new(AtomicU32::new(poison)), poison_negotiated);
    if report {
        balloon::process_queue(&mut queue, &mem, |m, chain| handler.report(m, chain));
    } else {
        balloon::process_queue(&mut queue, &mem, |m, chain| handler.inflate(m, chain));
    }
    Ok(())
}

/// Guest memory of two regions with a hole between them.
fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(HIGH_AT), HIGH_SIZE as usize),
    ])
    .unwrap()
}
