//! Building descriptor chains from fuzz input, shared by the virtio_vsock,
//! virtio_net and virtio_balloon targets: queue size and ring position,
//! well-formed chains of 1 to 4 buffers (direct or in an indirect table),
//! raw descriptors with any flags and next, an optional raw available
//! index, and the input's leftover bytes filling guest memory.

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: u64 = 1 << 20;
/// The rings of a queue of up to 256 entries, placed at 0, end below this.
pub const PAYLOAD_AT: u64 = 0x2000;
/// Where chains' buffers are placed, filled with the payload first.
pub const PAYLOAD_WINDOW: u64 = 0x20000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Raw descriptors' addresses: mostly in the rings or the payload window,
/// some across the end of memory, some anywhere.
pub fn addr(raw: u64) -> u64 {
    match raw >> 62 {
        0 | 1 => raw % (PAYLOAD_AT + PAYLOAD_WINDOW + 0x1000),
        2 => MEM_SIZE.wrapping_sub(raw & 0xfff),
        _ => raw,
    }
}

/// Raw descriptors' lengths: small, a few bytes, or anything.
pub fn len(raw: u32) -> u32 {
    match raw >> 30 {
        0 => raw % 0x2000,
        1 | 2 => raw % 64,
        _ => raw,
    }
}

/// Lays out chains: descriptors go in the table at once, indirect tables and
/// the bytes a chain starts with into `writes`, made once the payload fills
/// the window.
pub struct Builder<'a> {
    mock: &'a MockSplitQueue<'a, GuestMemoryMmap>,
    writes: Vec<(u64, Vec<u8>)>,
    size: u16,
    /// The next free slot of the descriptor table (targets that write raw
    /// descriptors of their own start there).
    pub next_slot: u16,
    /// Heads of the chains built so far, in order.
    pub heads: Vec<u16>,
    bump: u64,
}

impl<'a> Builder<'a> {
    pub fn new(mock: &'a MockSplitQueue<'a, GuestMemoryMmap>, size: u16) -> Self {
        Builder { mock, writes: Vec::new(), size, next_slot: 0, heads: Vec::new(), bump: PAYLOAD_AT }
    }

    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let at = self.bump;
        let end = at.checked_add(len)?;
        if end > PAYLOAD_AT + PAYLOAD_WINDOW {
            return None;
        }
        self.bump = (end + 15) & !15;
        Some(at)
    }

    pub fn store(&self, slot: u16, d: Descriptor) {
        self.mock.desc_table().store(slot, RawDescriptor::from(d)).unwrap();
    }

    /// A raw descriptor (any flags and next), made a head or not.
    pub fn raw_entry(&mut self, u: &mut Unstructured, mode: u8) -> Result<()> {
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

    /// A well-formed chain of `segs` (length, device-writable) buffers,
    /// direct or through an indirect table; `first` is written at the start
    /// of its first buffer. Returns false when the table or window is full.
    pub fn chain(&mut self, segs: &[(u32, bool)], indirect: bool, first: Option<Vec<u8>>) -> bool {
        let mut chain = Vec::new();
        for &(l, w) in segs {
            let Some(at) = self.alloc(l as u64) else { return false };
            chain.push((at, l, if w { F_WRITE } else { 0 }));
        }
        if chain.is_empty() {
            return false;
        }
        if let Some(bytes) = first {
            let (at, l, _) = chain[0];
            let n = bytes.len().min(l as usize);
            self.writes.push((at, bytes[..n].to_vec()));
        }
        let link = |i: usize, (a, l, f): (u64, u32, u16), n: usize, base: u16| {
            if i + 1 < n {
                Descriptor::new(a, l, f | F_NEXT, base + i as u16 + 1)
            } else {
                Descriptor::new(a, l, f, 0)
            }
        };
        if indirect {
            if self.next_slot >= self.size {
                return false;
            }
            let Some(table) = self.alloc(16 * chain.len() as u64) else { return false };
            let mut bytes = Vec::new();
            for (i, &d) in chain.iter().enumerate() {
                bytes.extend_from_slice(RawDescriptor::from(link(i, d, chain.len(), 0)).as_slice());
            }
            self.writes.push((table, bytes));
            let slot = self.next_slot;
            self.next_slot += 1;
            self.store(slot, Descriptor::new(table, 16 * chain.len() as u32, F_INDIRECT, 0));
            self.heads.push(slot);
        } else {
            let first = self.next_slot;
            if first as usize + chain.len() > self.size as usize {
                return false;
            }
            for (i, &d) in chain.iter().enumerate() {
                self.store(first + i as u16, link(i, d, chain.len(), first));
            }
            self.next_slot += chain.len() as u16;
            self.heads.push(first);
        }
        true
    }

    /// Fills the window with `payload`, makes the writes, publishes the heads
    /// (from `start`, or a raw available index) and returns the queue.
    pub fn finish(self, mem: &GuestMemoryMmap, start: u16, raw_avail: Option<u16>, payload: &[u8]) -> (Queue, usize) {
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
        for (at, bytes) in &self.writes {
            mem.write_slice(bytes, GuestAddress(*at)).unwrap();
        }
        let heads = &self.heads[..self.heads.len().min(self.size as usize)];
        for (i, &head) in heads.iter().enumerate() {
            let slot = start.wrapping_add(i as u16) % self.size;
            self.mock.avail().ring().ref_at(slot as usize).unwrap().store(head);
        }
        self.mock.avail().idx().store(raw_avail.unwrap_or(start.wrapping_add(heads.len() as u16)));
        let mut queue: Queue = self.mock.create_queue().unwrap();
        queue.set_next_avail(start);
        queue.set_next_used(start);
        (queue, heads.len())
    }
}

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Up to four segments: (length, device-writable); lengths small, odd,
/// around `typical`, or up to 64 KiB.
pub fn segments(u: &mut Unstructured, mode: u8, typical: u32, writable: bool) -> Result<Vec<(u32, bool)>> {
    let n = 1 + (mode & 3) as usize;
    let mut segs = Vec::with_capacity(n);
    for _ in 0..n {
        let v: u16 = u.arbitrary()?;
        let l = match v >> 14 {
            0 => (v as u32) % 64,
            1 => typical.saturating_sub(8).saturating_add((v as u32) % 16),
            2 => (v as u32) % 0x1000,
            _ => (v as u32) * 2,
        };
        // Now and then a buffer of the other direction.
        let w = if v & 0x1f == 0x1f { !writable } else { writable };
        segs.push((l, w));
    }
    Ok(segs)
}
