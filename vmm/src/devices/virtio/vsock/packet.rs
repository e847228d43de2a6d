//! virtio-vsock packets: the 44-byte header and its payload, read from a
//! guest tx chain or written into a guest rx chain, always through
//! virtio-queue's bounds-checked Reader and Writer.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemory;

pub const HDR_LEN: usize = 44;
/// Largest payload the guest may send in one packet (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); bigger is a malformed packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet: header plus payload (empty for control packets).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    BadChain,
    ShortHeader,
    PayloadTooBig(u32),
    ShortPayload { header: u32, available: usize },
}

/// Reads a guest tx chain: header, then exactly `hdr.len` bytes of payload.
pub fn read_tx<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>) -> Result<Packet, ParseError> {
    let mut reader = Reader::new(mem, chain).map_err(|_| ParseError::BadChain)?;
    let mut hdr = [0u8; HDR_LEN];
    reader.read_exact(&mut hdr).map_err(|_| ParseError::ShortHeader)?;
    let hdr = Header::from_bytes(&hdr);
    if hdr.len as usize > MAX_PAYLOAD {
        return Err(ParseError::PayloadTooBig(hdr.len));
    }
    let available = reader.available_bytes();
    if available < hdr.len as usize {
        return Err(ParseError::ShortPayload { header: hdr.len, available });
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader.read_exact(&mut data).map_err(|_| ParseError::BadChain)?;
    Ok(Packet { hdr, data })
}

/// Room for payload in a guest rx chain (its writable bytes past a header),
/// or None if the chain cannot even hold a header.
pub fn rx_capacity<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>) -> Option<usize> {
    let w = Writer::new(mem, chain).ok()?;
    w.available_bytes().checked_sub(HDR_LEN)
}

/// Writes `pkt` into a guest rx chain; returns the used length.
pub fn write_rx<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>, pkt: &Packet) -> Option<u32> {
    let mut w = Writer::new(mem, chain).ok()?;
    if w.available_bytes() < HDR_LEN + pkt.data.len() {
        return None;
    }
    let mut hdr = pkt.hdr;
    hdr.len = pkt.data.len() as u32;
    w.write_all(&hdr.to_bytes()).ok()?;
    w.write_all(&pkt.data).ok()?;
    Some((HDR_LEN + pkt.data.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn with_chain<R>(
        m: &GuestMemoryMmap,
        descs: &[virtio_queue::desc::split::Descriptor],
        f: impl FnOnce(DescriptorChain<&GuestMemoryMmap>) -> R,
    ) -> R {
        let q = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        f(queue.pop_descriptor_chain(m).unwrap())
    }

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 5000,
            len,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            fwd_cnt: 7,
            flags: 0,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = hdr(OP_RW, 12);
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn tx_packet_split_over_descriptors() {
        let m = mem();
        m.write_slice(&hdr(OP_RW, 5).to_bytes(), GuestAddress(0x10000)).unwrap();
        m.write_slice(b"hello", GuestAddress(0x11000)).unwrap();
        let p = with_chain(&m, &[descriptor(0x10000, 44, false, Some(1)), descriptor(0x11000, 5, false, None)], |c| {
            read_tx(&m, c)
        })
        .unwrap();
        assert_eq!(p.hdr.op, OP_RW);
        assert_eq!(p.data, b"hello");
    }

    #[test]
    fn malformed_tx_packets_are_errors() {
        let m = mem();
        // Header claims more payload than the chain carries.
        m.write_slice(&hdr(OP_RW, 100).to_bytes(), GuestAddress(0x10000)).unwrap();
        let r = with_chain(&m, &[descriptor(0x10000, 44, false, Some(1)), descriptor(0x11000, 5, false, None)], |c| {
            read_tx(&m, c)
        });
        assert_eq!(r, Err(ParseError::ShortPayload { header: 100, available: 5 }));
        // Payload over the limit.
        m.write_slice(&hdr(OP_RW, u32::MAX).to_bytes(), GuestAddress(0x10000)).unwrap();
        let r = with_chain(&m, &[descriptor(0x10000, 44, false, None)], |c| read_tx(&m, c));
        assert_eq!(r, Err(ParseError::PayloadTooBig(u32::MAX)));
        // Too short for a header.
        let r = with_chain(&m, &[descriptor(0x10000, 20, false, None)], |c| read_tx(&m, c));
        assert_eq!(r, Err(ParseError::ShortHeader));
        // Outside guest memory.
        let r = with_chain(&m, &[descriptor(0xffff_ffff_0000, 44, false, None)], |c| read_tx(&m, c));
        assert!(r.is_err());
    }

    #[test]
    fn rx_packet_written_with_length() {
        let m = mem();
        let pkt = Packet { hdr: hdr(OP_RW, 0), data: b"abc".to_vec() };
        let descs = [descriptor(0x20000, 4096, true, None)];
        assert_eq!(with_chain(&m, &descs, |c| rx_capacity(&m, c)), Some(4096 - 44));
        assert_eq!(with_chain(&m, &descs, |c| write_rx(&m, c, &pkt)), Some(47));
        let mut b = [0u8; 44];
        m.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        assert_eq!(Header::from_bytes(&b).len, 3);
        // A chain too small for the header carries nothing.
        let tiny = [descriptor(0x20000, 10, true, None)];
        assert_eq!(with_chain(&m, &tiny, |c| rx_capacity(&m, c)), None);
        assert_eq!(with_chain(&m, &tiny, |c| write_rx(&m, c, &pkt)), None);
    }
}
