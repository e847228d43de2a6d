//! Fuzzes virtio-vsock packet parsing and the muxer: chains built from the
//! input in a small guest memory, each popped as the device's worker does
//! and served either as a tx chain (`packet::read_tx`, and for packets that
//! parse, `Muxer::on_guest_packet` on a real muxer listening on a Unix
//! socket) or as an rx chain (`packet::rx_capacity`, then `write_rx` of the
//! muxer's next packet, or of a packet from the input when it has none).
//!
//! Input, read front to back (missing bytes read as zeros):
//! - config byte: queue size 2^(b % 9); start of the rings;
//! - entries, each a well-formed tx chain (a header the muxer may accept:
//!   guest CID or not, host CID, a few ports, any op, a payload length that
//!   may or may not match), a well-formed rx chain, or a raw descriptor
//!   (any flags and next), direct or in an indirect table;
//! - optionally a raw available index; the rest fills guest memory.
//!
//! Oracles: no panic, no hang. Descriptors stay bounded: the muxer, its
//! listener, its connections and the epoll are dropped after each input.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use hearth_fuzz::chains::*;
use hearth_vmm::devices::virtio::vsock::muxer::{self, Muxer};
use hearth_vmm::devices::virtio::vsock::packet::{self, Header, Packet, HDR_LEN, TYPE_STREAM};
use hearth_vmm::devices::virtio::worker::Poller;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;

/// A temporary directory for the muxer's socket, made once per process.
fn socket_path() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hearth-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("vsock.sock")
    })
}

fn tx_header(u: &mut Unstructured) -> Result<Vec<u8>> {
    let v: u8 = u.arbitrary()?;
    let ports = [1024u32, 1025, 5000, u32::MAX];
    let h = Header {
        src_cid: if v & 0x80 == 0 { GUEST_CID } else { u.arbitrary()? },
        dst_cid: if v & 0x40 == 0 { HOST_CID } else { u.arbitrary()? },
        src_port: ports[(v & 3) as usize],
        dst_port: ports[((v >> 2) & 3) as usize],
        len: if v & 0x20 == 0 { u.int_in_range(0..=64)? } else { u.arbitrary()? },
        kind: if v & 0x10 == 0 { TYPE_STREAM } else { u.arbitrary()? },
        op: u.int_in_range(0..=8)?,
        flags: u.int_in_range(0..=3)?,
        buf_alloc: u.arbitrary()?,
        fwd_cnt: u.arbitrary()?,
    };
    Ok(h.to_bytes().to_vec())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});

fn run(mut u: Unstructured) -> Result<()> {
    let cfg: u8 = u.arbitrary()?;
    let size = 1u16 << (cfg % 9);
    let start: u16 = u.arbitrary()?;
    let entries: u8 = u.int_in_range(0..=32)?;

    let mem = guest_memory();
    let mock = MockSplitQueue::new(&mem, size);
    let mut b = Builder::new(&mock, size);
    for _ in 0..entries {
        let mode: u8 = u.arbitrary()?;
        if mode & 0x80 != 0 {
            b.raw_entry(&mut u, mode)?;
        } else if mode & 0x40 == 0 {
            let hdr = tx_header(&mut u)?;
            let mut segs = segments(&mut u, mode, 64, false)?;
            if mode & 0x10 == 0 {
                segs[0].0 = HDR_LEN as u32; // the header alone in the first buffer
            }
            b.chain(&segs, mode & 0x08 != 0, Some(hdr));
        } else {
            let segs = segments(&mut u, mode, HDR_LEN as u32 + 64, true)?;
            b.chain(&segs, mode & 0x08 != 0, None);
        }
    }
    let raw_avail = if u.arbitrary::<bool>()? { Some(u.arbitrary()?) } else { None };
    // Which chains are tx (bit clear) or rx (bit set), in order.
    let roles: u64 = u.arbitrary()?;
    let payload = u.take_rest();
    let (mut queue, _) = b.finish(&mem, start, raw_avail, payload);

    let path = socket_path();
    let listener = muxer::bind(path).expect("binding the muxer's socket");
    let mut mux = Muxer::new(GUEST_CID, path.clone(), listener);
    let poller = Poller::new().expect("epoll");
    mux.register(&poller).expect("registering the listener");

    // At most a queue's worth: a bad available index is refused by the
    // device's loop (serve_queue), and pop_descriptor_chain stops anyway.
    let mut i = 0;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let used = if roles >> (i % 64) & 1 == 0 {
            if let Ok(pkt) = packet::read_tx(&mem, chain) {
                mux.on_guest_packet(pkt, &poller);
            }
            0
        } else {
            let probe = chain.clone();
            match packet::rx_capacity(&mem, probe) {
                Some(cap) => {
                    let pkt = mux.next_rx(cap, &poller).unwrap_or_else(|| Packet {
                        hdr: Header::from_bytes(&[0x11; HDR_LEN]),
                        data: vec![0xab; (i * 7) % 100],
                    });
                    let _ = mux.has_rx();
                    packet::write_rx(&mem, chain, &pkt).unwrap_or(0)
                }
                None => 0,
            }
        };
        let _ = queue.add_used(&mem, head, used);
        i += 1;
        if i > size as usize {
            break;
        }
    }
    let _ = mux.connection_count();
    Ok(())
}
