//! Fuzzes virtio-blk request parsing: a queue whose descriptor table, available
//! ring and guest memory come from the input, served by the worker's own loop
//! (`block::process_queue`: pop each chain, `RequestHandler::handle`,
//! `add_used`, until the driver has nothing more available).
//!
//! Input, read front to back (missing bytes read as zeros):
//! - config byte: queue size 2^(b % 9), EVENT_IDX, read-only disk, failing disk;
//! - disk size in bytes (up to 64 sectors and a partial tail);
//! - start position of the rings (next_avail = next_used), used_event;
//! - entries, as many as the input says and the table holds, each either
//!   - a request a driver could make: type (IN, OUT, FLUSH, GET_ID, DISCARD,
//!     WRITE_ZEROES or any),
//!     sector, up to three data segments of whole sectors or odd sizes, the
//!     status byte, in the table or in an indirect table in guest memory; or
//!   - a raw descriptor (addr u64, len u32, flags u16, next u16): flags and
//!     next are the input's, so chains may loop, point past the table, be
//!     indirect to whatever memory holds; `addr()` and `len()` keep most of
//!     them in memory; it may be made a head, or a raw head index pushed;
//! - optionally a raw available index (more than a queue ahead, behind...);
//! - the rest: guest memory, repeated over the 128 KiB where requests live
//!   (data to write, indirect tables and headers of raw chains come from it).
//!
//! Oracles: no panic, no hang (libFuzzer's -timeout; `cargo xtask fuzz`
//! passes 10 s), and the disk is only accessed inside its size.

#![no_main]

use std::io;
use std::ops::Range;

use hearth_vmm::devices::virtio::block::{self, Disk, RequestHandler, SECTOR_SIZE};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 1 << 20;
/// The rings of a queue of up to 256 entries, placed at 0, end below this.
const PAYLOAD_AT: u64 = 0x2000;
/// Where requests' buffers are placed, filled with the payload first.
const PAYLOAD_WINDOW: u64 = 0x20000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// A disk in memory that checks the handler's ranges: an access outside the
/// disk is a bug of the handler (a file would read short or grow).
struct VecDisk {
    data: Vec<u8>,
    fail: bool,
}

impl VecDisk {
    fn range(&self, offset: u64, len: usize) -> io::Result<Range<usize>> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| s.checked_add(len).map(|e| s..e)) {
            Some(r) if r.end <= self.data.len() => {
                if self.fail {
                    Err(io::Error::other("injected I/O error"))
                } else {
                    Ok(r)
                }
            }
            _ => panic!("the handler accessed {len} bytes at {offset} of a {}-byte disk", self.data.len()),
        }
    }
}

impl Disk for VecDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("injected I/O error"));
        }
        Ok(())
    }
}

/// Raw descriptors' addresses: most land in the rings or the payload window
/// (or just past it, in zeroed memory); some straddle the end of memory;
/// some are anywhere.
fn addr(raw: u64) -> u64 {
    match raw >> 62 {
        0 | 1 => raw % (PAYLOAD_AT + PAYLOAD_WINDOW + 0x1000),
        2 => MEM_SIZE.wrapping_sub(raw & 0xfff),
        _ => raw,
    }
}

/// Raw descriptors' lengths: small, whole sectors, a few bytes, or anything.
fn len(raw: u32) -> u32 {
    match raw >> 30 {
        0 => raw % 0x2000,
        1 => (raw % 64) * SECTOR_SIZE as u32,
        2 => raw % 32,
        _ => raw,
    }
}

/// Lays out what the entries need in the payload window: descriptors go in
/// the table at once, headers and indirect tables into `writes`, made once
/// the payload fills the window.
struct Builder<'a> {
    mock: &'a MockSplitQueue<'a, GuestMemoryMmap>,
    writes: Vec<(u64, Vec<u8>)>,
    size: u16,
    next_slot: u16,
    heads: Vec<u16>,
    bump: u64,
}

impl Builder<'_> {
    /// `len` bytes of the window, 16-aligned, or None when it is full.
    fn alloc(&mut self, len: u64) -> Option<u64> {
        let at = self.bump;
        let end = at.checked_add(len)?;
        if end > PAYLOAD_AT + PAYLOAD_WINDOW {
            return None;
        }
        self.bump = (end + 15) & !15;
        Some(at)
    }

    fn store(&self, slot: u16, d: Descriptor) {
        self.mock.desc_table().store(slot, RawDescriptor::from(d)).unwrap();
    }

    fn raw_entry(&mut self, u: &mut Unstructured, mode: u8) -> Result<()> {
        if self.next_slot >= self.size {
            return Ok(());
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.store(slot, Descriptor::new(addr(u.arbitrary()?), len(u.arbitrary()?), u.arbitrary()?, u.arbitrary()?));
        if mode & 0x40 != 0 {
            self.heads.push(slot);
        }
        if mode & 0x20 != 0 {
            self.heads.push(u.arbitrary()?);
        }
        Ok(())
    }

    fn request(&mut self, u: &mut Unstructured, mode: u8) -> Result<()> {
        let kind = match mode & 7 {
            0 | 5 => T_IN,
            1 | 6 => T_OUT,
            2 => T_FLUSH,
            3 => T_GET_ID,
            // Segments come from the payload: mostly past the end, now and
            // then a range inside the disk.
            4 if mode & 0x40 != 0 => T_WRITE_ZEROES,
            4 => T_DISCARD,
            _ => u.arbitrary()?,
        };
        let indirect = mode & 0x08 != 0;
        let segments = (mode >> 4) & 3;
        let sector = match u.arbitrary::<u8>()? {
            v @ 0..=0xef => v as u64 % 80, // some past the end of a 64-sector disk
            v => u64::MAX - (v - 0xf0) as u64,
        };
        let device_writes = kind == T_IN || kind == T_GET_ID;
        let mut chain = Vec::new(); // (addr, len, flags without NEXT)
        let Some(header) = self.alloc(16) else { return Ok(()) };
        let mut bytes = kind.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&sector.to_le_bytes());
        self.writes.push((header, bytes));
        chain.push((header, 16, 0));
        for _ in 0..segments {
            let v: u8 = u.arbitrary()?;
            let n = if v & 0x80 != 0 { (v & 0x7f) as u64 } else { (v % 9) as u64 * SECTOR_SIZE };
            let Some(at) = self.alloc(n) else { return Ok(()) };
            chain.push((at, n as u32, if device_writes { F_WRITE } else { 0 }));
        }
        let Some(status) = self.alloc(1) else { return Ok(()) };
        chain.push((status, 1, F_WRITE));

        let link = |i: usize, (a, l, f): (u64, u32, u16), n: usize| {
            let next = if i + 1 < n { F_NEXT } else { 0 };
            Descriptor::new(a, l, f | next, if next != 0 { i as u16 + 1 } else { 0 })
        };
        if indirect {
            if self.next_slot >= self.size {
                return Ok(());
            }
            let Some(table) = self.alloc(16 * chain.len() as u64) else { return Ok(()) };
            let mut bytes = Vec::new();
            for (i, &d) in chain.iter().enumerate() {
                bytes.extend_from_slice(RawDescriptor::from(link(i, d, chain.len())).as_slice());
            }
            self.writes.push((table, bytes));
            let slot = self.next_slot;
            self.next_slot += 1;
            self.store(slot, Descriptor::new(table, 16 * chain.len() as u32, F_INDIRECT, 0));
            self.heads.push(slot);
        } else {
            let first = self.next_slot;
            if first as usize + chain.len() > self.size as usize {
                return Ok(());
            }
            for (i, &d) in chain.iter().enumerate() {
                let mut desc = link(i, d, chain.len());
                if desc.flags() & F_NEXT != 0 {
                    desc = Descriptor::new(desc.addr().0, desc.len(), desc.flags(), first + i as u16 + 1);
                }
                self.store(first + i as u16, desc);
            }
            self.next_slot += chain.len() as u16;
            self.heads.push(first);
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});

fn run(mut u: Unstructured) -> Result<()> {
    let cfg: u8 = u.arbitrary()?;
    let size = 1u16 << (cfg % 9);
    let event_idx = cfg & 0x10 != 0;
    let read_only = cfg & 0x20 != 0;
    let fail = cfg & 0x40 != 0;
    let disk_bytes: u16 = u.int_in_range(0..=64 * SECTOR_SIZE as u16 + 511)?;
    let start: u16 = u.arbitrary()?;
    let used_event: u16 = u.arbitrary()?;
    let entries: u8 = u.int_in_range(0..=32)?;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let mock = MockSplitQueue::new(&mem, size);
    let mut b = Builder { mock: &mock, writes: Vec::new(), size, next_slot: 0, heads: Vec::new(), bump: PAYLOAD_AT };
    for _ in 0..entries {
        let mode: u8 = u.arbitrary()?;
        if mode & 0x80 != 0 {
            b.raw_entry(&mut u, mode)?;
        } else {
            b.request(&mut u, mode)?;
        }
    }
    let Builder { heads, writes, .. } = b;
    let heads = &heads[..heads.len().min(size as usize)];
    let avail_idx = if u.arbitrary::<bool>()? { u.arbitrary()? } else { start.wrapping_add(heads.len() as u16) };
    let payload = u.take_rest();

    // The payload repeated over the window (by doubling copies), then the
    // requests' headers and indirect tables on top.
    if !payload.is_empty() {
        let mut window = vec![0u8; PAYLOAD_WINDOW as usize];
        let mut filled = payload.len().min(window.len());
        window[..filled].copy_from_slice(&payload[..filled]);
        while filled < window.len() {
            let n = filled.min(window.len() - filled);
            window.copy_within(..n, filled);
            filled += n;
        }
        mem.write_slice(&window, GuestAddress(PAYLOAD_AT)).unwrap();
    }
    for (at, bytes) in writes {
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    for (i, &head) in heads.iter().enumerate() {
        let slot = start.wrapping_add(i as u16) % size;
        mock.avail().ring().ref_at(slot as usize).unwrap().store(head);
    }
    mock.avail().idx().store(avail_idx);
    // used_event sits right after the available ring's entries.
    let used_event_at = mock.avail_addr().0 + 4 + 2 * size as u64;
    mem.write_obj(used_event, GuestAddress(used_event_at)).unwrap();

    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_event_idx(event_idx);
    queue.set_next_avail(start);
    queue.set_next_used(start);

    let disk = VecDisk { data: vec![0x5a; disk_bytes as usize], fail };
    let mut handler = RequestHandler::new(disk, disk_bytes as u64, read_only, "fuzz-disk");
    // The worker's own loop: pop each chain, handle it, add_used, until
    // enable_notification says nothing more is available.
    block::process_queue(&mut handler, &mut queue, &mem);
    Ok(())
}
