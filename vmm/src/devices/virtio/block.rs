//! virtio-blk over a raw image file.
//!
//! A request is a descriptor chain: a 16-byte header the device reads
//! (type, reserved, sector), data buffers (read by the device for a write,
//! written by it for a read), and a final 1-byte status the device writes.
//! Everything is checked: a chain of the wrong shape, a sector range past the
//! end of the disk, or a write to a read-only disk fails that request with
//! an error status; only a chain with no room for a status is returned with
//! nothing written.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_queue::{desc::split::Descriptor as SplitDescriptor, DescriptorChain, Queue};
use virtio_queue::{Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::queue::{drain_queue, Drained, BUDGET};
use super::worker::{self, DeviceWorker, Poller};
use super::{Activation, VirtioDevice, WorkerHandle, TYPE_BLOCK};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const ID_BYTES: usize = 20;
/// Largest data transfer one request may ask for; bigger is an I/O error.
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Segments per request the driver may use (config seg_max).
const SEG_MAX: u32 = 128;

/// The disk behind the device: positioned I/O on a file.
pub trait Disk: Send {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

impl Disk for File {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// Serves requests for one disk. Separate from the thread and the queue so
/// that tests and fuzzers can drive it with any chain.
pub struct RequestHandler<D: Disk> {
    pub disk: D,
    pub sectors: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES],
    buf: Vec<u8>,
}

impl<D: Disk> RequestHandler<D> {
    pub fn new(disk: D, size_bytes: u64, read_only: bool, id: &str) -> Self {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        RequestHandler { disk, sectors: size_bytes / SECTOR_SIZE, read_only, id: id_bytes, buf: Vec::new() }
    }

    /// Executes one request; returns the number of bytes written into the
    /// chain (the used length).
    pub fn handle<M>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> u32
    where
        M: GuestMemory,
    {
        let mut reader = match Reader::new(mem, chain.clone()) {
            Ok(r) => r,
            Err(_) => return 0,
        };
        let mut writer = match Writer::new(mem, chain) {
            Ok(w) => w,
            Err(_) => return 0,
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            return 0; // nowhere to put a status: the driver gets nothing back
        }
        let mut status_writer = match writer.split_at(writable - 1) {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let (status, data_written) = self.execute(&mut reader, &mut writer);
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        (data_written + 1) as u32
    }

    fn execute<B: BitmapSlice>(&mut self, reader: &mut Reader<'_, B>, writer: &mut Writer<'_, B>) -> (u8, usize) {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let Some(offset) = self.checked_range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                self.buf.resize(len, 0);
                if self.disk.read_at(&mut self.buf, offset).is_err() || writer.write_all(&self.buf).is_err() {
                    return (VIRTIO_BLK_S_IOERR, writer.bytes_written());
                }
                (VIRTIO_BLK_S_OK, len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = reader.available_bytes();
                let Some(offset) = self.checked_range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                self.buf.resize(len, 0);
                if reader.read_exact(&mut self.buf).is_err() || self.disk.write_at(&self.buf, offset).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they lie inside the
    /// disk and the transfer is whole sectors of a sane size.
    fn checked_range(&self, sector: u64, len: usize) -> Option<u64> {
        if len > MAX_REQUEST_BYTES || len as u64 % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
        (end <= self.sectors).then(|| sector * SECTOR_SIZE)
    }
}

/// A disk as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

pub struct Block {
    config: DiskConfig,
    file: Option<File>,
    size: u64,
}

impl Block {
    pub fn new(config: DiskConfig) -> io::Result<Block> {
        let file = OpenOptions::new().read(true).write(!config.read_only).open(&config.path)?;
        let size = file.metadata()?.len();
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(path = %config.path.display(), size, "disk size is not a multiple of 512: the tail is not visible");
        }
        Ok(Block { config, file: Some(file), size })
    }

    fn config_space(&self) -> Vec<u8> {
        // capacity (le64), size_max (le32), seg_max (le32)
        let mut c = Vec::with_capacity(16);
        c.extend_from_slice(&(self.size / SECTOR_SIZE).to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    pub fn path(&self) -> &Path {
        &self.config.path
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let ro = if self.config.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_RING_F_EVENT_IDX | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data)
    }
    fn activate(&mut self, mut a: Activation) -> Result<WorkerHandle, String> {
        let file = match &self.file {
            Some(f) => f.try_clone().map_err(|e| e.to_string())?,
            None => return Err("disk file missing".into()),
        };
        let name = self.config.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let handler = RequestHandler::new(file, self.size, self.config.read_only, &name);
        let worker = BlockWorker {
            handler,
            queue: a.queues.remove(0),
            event: a.queue_events.remove(0),
            mem: a.mem,
            interrupt: a.interrupt,
        };
        worker::spawn("virtio-blk", worker)
    }
}

struct BlockWorker {
    handler: RequestHandler<File>,
    queue: Queue,
    event: vmm_sys_util::eventfd::EventFd,
    mem: GuestMemoryMmap,
    interrupt: std::sync::Arc<super::Interrupt>,
}

impl BlockWorker {
    fn process_queue(&mut self) {
        let drained = process_queue(&mut self.handler, &mut self.queue, &self.mem);
        if drained.notify {
            self.interrupt.signal_used();
        }
        drained.renotify(&self.event);
    }
}

/// Serves the requests the driver made available on `queue` (up to the
/// per-wake budget), as the worker does on each notification.
pub fn process_queue<D: Disk, M: GuestMemory>(handler: &mut RequestHandler<D>, queue: &mut Queue, mem: &M) -> Drained {
    drain_queue("virtio-blk", queue, mem, BUDGET, |m, chain| handler.handle(m, chain))
}

impl DeviceWorker for BlockWorker {
    fn init(&mut self, poller: &Poller) -> io::Result<()> {
        poller.add(self.event.as_raw_fd(), 0, EventSet::IN)
    }
    fn handle(&mut self, _token: u64, _events: EventSet, _poller: &Poller) {
        let _ = self.event.read();
        self.process_queue();
    }
}

/// Builds a chain of raw descriptors for tests and fuzzing.
pub fn descriptor(addr: u64, len: u32, write: bool, next: Option<u16>) -> SplitDescriptor {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    let mut flags = 0;
    if write {
        flags |= VRING_DESC_F_WRITE;
    }
    if next.is_some() {
        flags |= VRING_DESC_F_NEXT;
    }
    SplitDescriptor::new(addr, len, flags as u16, next.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    struct MemDisk(Vec<u8>, usize);
    impl Disk for MemDisk {
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.1 += 1;
            Ok(())
        }
    }

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x11000;
    const STATUS: u64 = 0x13000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Runs one request made of `descs`, returning (used len, status byte).
    fn run(h: &mut RequestHandler<MemDisk>, m: &GuestMemoryMmap, descs: &[SplitDescriptor]) -> (u32, u8) {
        let q = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let chain = queue.pop_descriptor_chain(m).unwrap();
        let len = h.handle(m, chain);
        (len, m.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn handler(read_only: bool) -> RequestHandler<MemDisk> {
        let mut data = vec![0u8; 8 * 512];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        RequestHandler::new(MemDisk(data, 0), 8 * 512, read_only, "disk0")
    }

    fn rw_chain(data_len: u32, device_writes_data: bool) -> Vec<SplitDescriptor> {
        vec![
            descriptor(HDR, 16, false, Some(1)),
            descriptor(DATA, data_len, device_writes_data, Some(2)),
            descriptor(STATUS, 1, true, None),
        ]
    }

    #[test]
    fn read_returns_disk_contents() {
        let m = mem();
        let mut h = handler(false);
        header(&m, VIRTIO_BLK_T_IN, 3);
        let (len, status) = run(&mut h, &m, &rw_chain(1024, true));
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK));
        assert_eq!(m.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 3);
        assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 1023)).unwrap(), 4);
    }

    #[test]
    fn write_then_flush() {
        let m = mem();
        let mut h = handler(false);
        m.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 7);
        assert_eq!(run(&mut h, &m, &rw_chain(512, false)), (1, VIRTIO_BLK_S_OK));
        assert!(h.disk.0[7 * 512..].iter().all(|b| *b == 0x5a));
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let chain = vec![descriptor(HDR, 16, false, Some(1)), descriptor(STATUS, 1, true, None)];
        assert_eq!(run(&mut h, &m, &chain), (1, VIRTIO_BLK_S_OK));
        assert_eq!(h.disk.1, 1);
    }

    #[test]
    fn requests_past_the_end_are_io_errors() {
        let m = mem();
        let mut h = handler(false);
        header(&m, VIRTIO_BLK_T_IN, 7);
        assert_eq!(run(&mut h, &m, &rw_chain(1024, true)).1, VIRTIO_BLK_S_IOERR);
        header(&m, VIRTIO_BLK_T_OUT, u64::MAX);
        assert_eq!(run(&mut h, &m, &rw_chain(512, false)).1, VIRTIO_BLK_S_IOERR);
        // Not a whole number of sectors.
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&mut h, &m, &rw_chain(100, true)).1, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let m = mem();
        let mut h = handler(true);
        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(run(&mut h, &m, &rw_chain(512, false)).1, VIRTIO_BLK_S_IOERR);
        assert!(h.disk.0[..512].iter().all(|b| *b == 0));
    }

    #[test]
    fn malformed_chains_fail_the_request_only() {
        let m = mem();
        let mut h = handler(false);
        header(&m, VIRTIO_BLK_T_IN, 0);
        // Header too short.
        let short = vec![descriptor(HDR, 8, false, Some(1)), descriptor(STATUS, 1, true, None)];
        assert_eq!(run(&mut h, &m, &short).1, VIRTIO_BLK_S_IOERR);
        // No writable descriptor at all: nothing can be reported.
        let none = vec![descriptor(HDR, 16, false, None)];
        assert_eq!(run(&mut h, &m, &none).0, 0);
        // A descriptor pointing outside guest memory.
        let outside = vec![
            descriptor(HDR, 16, false, Some(1)),
            descriptor(0xffff_0000_0000, 512, true, Some(2)),
            descriptor(STATUS, 1, true, None),
        ];
        let (len, _) = run(&mut h, &m, &outside);
        assert_eq!(len, 0);
        // Unknown request type.
        header(&m, 77, 0);
        let chain = vec![descriptor(HDR, 16, false, Some(1)), descriptor(STATUS, 1, true, None)];
        assert_eq!(run(&mut h, &m, &chain).1, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn avail_index_more_than_a_queue_ahead_does_not_spin() {
        // Found by the virtio_blk fuzz target: the ring is refused, so nothing
        // pops, yet enable_notification keeps reporting more to do.
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.avail().idx().store(17);
        let mut queue: Queue = q.create_queue().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut h = handler(false);
            tx.send(process_queue(&mut h, &mut queue, &m)).unwrap();
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert!(done.is_ok(), "process_queue spins on an available index 17 ahead of a 16-entry queue");
    }

    #[test]
    fn get_id_reports_the_serial() {
        let m = mem();
        let mut h = handler(false);
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (len, status) = run(&mut h, &m, &rw_chain(20, true));
        assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 5];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk0");
    }
}
