//! Fuzzes virtio-vsock through its real worker: `VsockWorker` (the device's
//! thread: its queues, the muxer, the half-open timer) runs its own event
//! handling (`DeviceWorker::handle`, through an epoll as on the thread),
//! with the transmit queue's chains built from the input in a small guest
//! memory and a receive queue of valid buffers. The host side is real too:
//! Unix listeners on `<path>_1024` and `<path>_5000` accept the guest's
//! connections, and a host process connects to the VM's socket and sends
//! `CONNECT <port>` (a port the guest packets may answer with RESPONSE,
//! from the local port the muxer hands out first, 2^30) and some data.
//!
//! Input, read front to back (missing bytes read as zeros):
//! - config byte: queue size 2^(b % 9), whether a host connection is made;
//!   start of the rings; the CONNECT port; the receive buffers' count;
//! - entries, each a well-formed tx chain (a header the muxer may accept:
//!   guest CID or not, host CID, a few ports, any op, a payload length that
//!   may or may not match), or a raw descriptor (any flags and next),
//!   direct or in an indirect table;
//! - optionally a raw available index; the rest fills guest memory.
//!
//! Oracles: no panic, no hang (the dispatch loop is bounded and must go
//! quiet), connections never above the cap. Descriptors stay bounded: the
//! worker, its listener and connections, the host ends and the epoll are
//! dropped after each input.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use hearth_fuzz::chains::*;
use hearth_vmm::devices::virtio::block::descriptor;
use hearth_vmm::devices::virtio::vsock::muxer::{self, Muxer, MAX_CONNECTIONS};
use hearth_vmm::devices::virtio::vsock::packet::{Header, HDR_LEN, TYPE_STREAM};
use hearth_vmm::devices::virtio::vsock::VsockWorker;
use hearth_vmm::devices::virtio::worker::{DeviceWorker, Poller};
use hearth_vmm::devices::virtio::Interrupt;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
/// The receive queue and its buffers, clear of the fuzzed transmit queue.
const RX_QUEUE: u64 = 0xe0000;
const RX_BUFS: u64 = 0xe8000;
const RX_BUF_LEN: u32 = HDR_LEN as u32 + 256;

/// A temporary directory for the muxer's socket, made once per process.
fn socket_path() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hearth-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("vsock.sock")
    })
}

fn host_listener(path: &Path, port: u32) -> UnixListener {
    let p = PathBuf::from(format!("{}_{port}", path.display()));
    let _ = std::fs::remove_file(&p);
    let l = UnixListener::bind(&p).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

fn tx_header(u: &mut Unstructured) -> Result<Vec<u8>> {
    let v: u8 = u.arbitrary()?;
    let ports = [1024u32, 1025, 5000, 1 << 30];
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
    let host_connects = cfg & 0x10 != 0;
    let start: u16 = u.arbitrary()?;
    let connect_port = [1024u32, 1025, 5000, 7][u.int_in_range(0..=3)?];
    let rx_bufs: u16 = u.int_in_range(0..=32)?;
    let entries: u8 = u.int_in_range(0..=32)?;

    let mem = guest_memory();
    let mock = MockSplitQueue::new(&mem, size);
    let mut b = Builder::new(&mock, size);
    for _ in 0..entries {
        let mode: u8 = u.arbitrary()?;
        if mode & 0x80 != 0 {
            b.raw_entry(&mut u, mode)?;
        } else {
            let hdr = tx_header(&mut u)?;
            let mut segs = segments(&mut u, mode, 64, false)?;
            if mode & 0x10 == 0 {
                segs[0].0 = HDR_LEN as u32; // the header alone in the first buffer
            }
            b.chain(&segs, mode & 0x08 != 0, Some(hdr));
        }
    }
    let raw_avail = if u.arbitrary::<bool>()? { Some(u.arbitrary()?) } else { None };
    let payload = u.take_rest();
    let (tx, _) = b.finish(&mem, start, raw_avail, payload);
    // The guest publishes its packets only after the host's CONNECT is read
    // (any event makes the worker drain the transmit queue, so a RESPONSE
    // published earlier would come before the REQUEST it answers).
    let avail_idx_at = GuestAddress(mock.avail_addr().0 + 2);
    let avail_idx: u16 = mem.read_obj(avail_idx_at).unwrap();
    mem.write_obj(start, avail_idx_at).unwrap();

    // The receive queue: valid buffers for whatever the muxer sends.
    let rx_mock = MockSplitQueue::create(&mem, GuestAddress(RX_QUEUE), 64);
    for i in 0..rx_bufs {
        let d = descriptor(RX_BUFS + i as u64 * RX_BUF_LEN as u64, RX_BUF_LEN, true, None);
        rx_mock.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
    }
    let rx: Queue = rx_mock.create_queue().unwrap();

    let path = socket_path();
    let _l1 = host_listener(path, 1024);
    let _l2 = host_listener(path, 5000);
    let listener = muxer::bind(path).expect("binding the muxer's socket");
    let mux = Muxer::new(GUEST_CID, path.clone(), listener);
    let evts: Vec<EventFd> = (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let tx_kick = evts[1].try_clone().unwrap();
    let rx_kick = evts[0].try_clone().unwrap();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut evts = evts.into_iter();
    let (e0, e1, e2) = (evts.next().unwrap(), evts.next().unwrap(), evts.next().unwrap());
    let mut worker = VsockWorker::new(rx, tx, e0, e1, e2, mem.clone(), interrupt, mux).unwrap();
    let poller = Poller::new().expect("epoll");
    worker.init(&poller).expect("registering the worker");

    // A host process asks for a guest port, before the guest's packets.
    let mut host = None;
    if host_connects {
        if let Ok(mut s) = UnixStream::connect(path) {
            let _ = s.write_all(format!("CONNECT {connect_port}\nearly bytes").as_bytes());
            host = Some(s);
        }
        for _ in 0..4 {
            if poller.dispatch(&mut worker, 0).unwrap() == 0 {
                break;
            }
        }
    }
    // The guest's notifies.
    mem.write_obj(avail_idx, avail_idx_at).unwrap();
    tx_kick.write(1).unwrap();
    rx_kick.write(1).unwrap();
    // Host streams may stay readable while the guest has buffers and
    // credit, so the rounds are bounded rather than run until quiet.
    for _ in 0..32 {
        if poller.dispatch(&mut worker, 0).unwrap() == 0 {
            break;
        }
        if let Some(s) = host.as_mut() {
            let _ = s.write_all(b"more");
        }
    }
    assert!(worker.muxer.connection_count() <= MAX_CONNECTIONS);
    drop(host);
    Ok(())
}
