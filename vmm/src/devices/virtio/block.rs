//! virtio-blk over a raw image file.
//!
//! A request is a descriptor chain: a 16-byte header the device reads
//! (type, reserved, sector), data buffers (read by the device for a write,
//! written by it for a read), and a final 1-byte status the device writes.
//! Everything is checked: a chain of the wrong shape, a sector range past the
//! end of the disk, or a write to a read-only disk fails that request with
//! an error status; only a chain with no room for a status is returned with
//! nothing written.
//!
//! Discard and write-zeroes punch holes in the image (or zero a range of
//! it), so a sparse image gives back what the guest trims.
//!
//! A device is either a disk given at start (`--disk`) or a **slot**
//! (`--disk-slots`): a device the guest probes at boot with no medium
//! (capacity 0), to which the control socket later attaches an image and
//! from which it detaches it, each change announced to the guest as a
//! configuration change (the driver re-reads the capacity). docs/vmm.md says
//! why slots rather than hot-plug.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// The one flag of a write-zeroes segment: the device may deallocate.
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Segments per discard or write-zeroes request (config max_*_seg).
const MAX_RANGE_SEGMENTS: u32 = 32;
/// Sectors per discard or write-zeroes segment (config max_*_sectors): 1 GiB.
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Discard granularity in sectors (config discard_sector_alignment): a page.
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

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
    /// Deallocates `len` bytes at `offset`, which then read as zeros.
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }
    /// Makes `len` bytes at `offset` read as zeros, keeping them allocated.
    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
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
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An empty slot has no disk: nothing reaches it (its capacity is 0), and a
/// flush fails.
impl<D: Disk> Disk for Option<D> {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_mut().ok_or_else(no_medium)?.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.as_mut().ok_or_else(no_medium)?.write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.as_mut().ok_or_else(no_medium)?.flush()
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.as_mut().ok_or_else(no_medium)?.punch_hole(offset, len)
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.as_mut().ok_or_else(no_medium)?.zero_range(offset, len)
    }
}

fn no_medium() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOMEDIUM)
}

/// What a disk has served, for the control socket's `info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskStats {
    pub requests: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Bytes discarded or zeroed (write-zeroes).
    pub discarded_bytes: u64,
    pub flushes: u64,
    /// Requests that failed (I/O error or unsupported).
    pub errors: u64,
}

/// Serves requests for one disk. Separate from the thread and the queue so
/// that tests and fuzzers can drive it with any chain.
pub struct RequestHandler<D: Disk> {
    pub disk: D,
    pub sectors: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES],
    pub stats: DiskStats,
    buf: Vec<u8>,
}

/// The serial the guest reads (`/sys/block/vdX/serial`): `id`, cut to 20 bytes.
pub fn serial(id: &str) -> [u8; ID_BYTES] {
    let mut id_bytes = [0u8; ID_BYTES];
    let n = id.len().min(ID_BYTES);
    id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
    id_bytes
}

impl<D: Disk> RequestHandler<D> {
    pub fn new(disk: D, size_bytes: u64, read_only: bool, id: &str) -> Self {
        RequestHandler {
            disk,
            sectors: size_bytes / SECTOR_SIZE,
            read_only,
            id: serial(id),
            stats: DiskStats::default(),
            buf: Vec::new(),
        }
    }

    /// The serial as a string (up to its first NUL).
    pub fn id_str(&self) -> String {
        let end = self.id.iter().position(|b| *b == 0).unwrap_or(ID_BYTES);
        String::from_utf8_lossy(&self.id[..end]).into_owned()
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
        self.stats.requests += 1;
        if status != VIRTIO_BLK_S_OK {
            self.stats.errors += 1;
        }
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
                self.stats.read_bytes += len as u64;
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
                self.stats.written_bytes += len as u64;
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => {
                    self.stats.flushes += 1;
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (self.ranges(kind, reader), 0),
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

    /// A discard or write-zeroes request: up to MAX_RANGE_SEGMENTS segments
    /// of 16 bytes (sector le64, sectors le32, flags le32), all checked
    /// before any is applied.
    fn ranges<B: BitmapSlice>(&mut self, kind: u32, reader: &mut Reader<'_, B>) -> u8 {
        if self.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = reader.available_bytes();
        if len == 0 || len % 16 != 0 || len > MAX_RANGE_SEGMENTS as usize * 16 {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut raw = [0u8; MAX_RANGE_SEGMENTS as usize * 16];
        if reader.read_exact(&mut raw[..len]).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut segments = Vec::with_capacity(len / 16);
        for seg in raw[..len].chunks_exact(16) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let count = u32::from_le_bytes(seg[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            let allowed = if kind == VIRTIO_BLK_T_WRITE_ZEROES { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 {
                return VIRTIO_BLK_S_UNSUPP;
            }
            match sector.checked_add(count as u64) {
                Some(end) if count <= MAX_RANGE_SECTORS && end <= self.sectors => {}
                _ => return VIRTIO_BLK_S_IOERR,
            }
            segments.push((sector * SECTOR_SIZE, count as u64 * SECTOR_SIZE, flags));
        }
        for (offset, bytes, flags) in segments {
            let done = if kind == VIRTIO_BLK_T_DISCARD || flags & WRITE_ZEROES_FLAG_UNMAP != 0 {
                self.disk.punch_hole(offset, bytes)
            } else {
                self.disk.zero_range(offset, bytes)
            };
            if done.is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            self.stats.discarded_bytes += bytes;
        }
        VIRTIO_BLK_S_OK
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

/// What a slot holds: the request handler (an empty slot's has no disk and
/// a capacity of 0) and which file is attached, so that one image is never
/// attached twice.
pub struct Slot {
    pub handler: RequestHandler<Option<File>>,
    /// (st_dev, st_ino) of the attached image.
    pub identity: Option<(u64, u64)>,
}

/// The state of a disk device, shared by the device (config space), its
/// worker (requests) and the control socket (attach, detach, info). Lock
/// order: the transport's state, then this (the worker takes only this).
pub type SharedSlot = Arc<Mutex<Slot>>;

/// Why an attach or detach was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    #[error("the slot already holds the disk {0:?}: detach it first")]
    Occupied(String),
    #[error("the slot is empty")]
    Empty,
    #[error("the image is {0} bytes: a disk is a whole number of 512-byte sectors, at least one")]
    BadSize(u64),
    #[error("the disk was given with --disk: only disks attached through the control socket can be detached")]
    Fixed,
}

impl Slot {
    fn empty() -> Slot {
        Slot { handler: RequestHandler::new(None, 0, false, ""), identity: None }
    }

    pub fn is_attached(&self) -> bool {
        self.handler.disk.is_some()
    }

    /// Puts `file` (of `size` bytes, identified by dev and inode) in an
    /// empty slot, with serial `id`. Counters restart.
    pub fn attach(
        &mut self,
        file: File,
        size: u64,
        identity: (u64, u64),
        read_only: bool,
        id: &str,
    ) -> Result<(), SlotError> {
        if self.is_attached() {
            return Err(SlotError::Occupied(self.handler.id_str()));
        }
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(SlotError::BadSize(size));
        }
        self.handler = RequestHandler::new(Some(file), size, read_only, id);
        self.identity = Some(identity);
        Ok(())
    }

    /// Empties the slot, closing the image; returns what it served.
    pub fn detach(&mut self) -> Result<DiskStats, SlotError> {
        if !self.is_attached() {
            return Err(SlotError::Empty);
        }
        let stats = self.handler.stats;
        *self = Slot::empty();
        Ok(stats)
    }
}

pub struct Block {
    /// A disk given at start: its path, and VIRTIO_BLK_F_RO when read-only.
    fixed: Option<DiskConfig>,
    slot: SharedSlot,
}

impl Block {
    /// A disk given at start, opened now (before any jail).
    pub fn new(config: DiskConfig) -> io::Result<Block> {
        let file = OpenOptions::new().read(true).write(!config.read_only).open(&config.path)?;
        let meta = file.metadata()?;
        let size = meta.len();
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(path = %config.path.display(), size, "disk size is not a multiple of 512: the tail is not visible");
        }
        use std::os::unix::fs::MetadataExt;
        let name = config.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let slot = Slot {
            handler: RequestHandler::new(Some(file), size, config.read_only, &name),
            identity: Some((meta.dev(), meta.ino())),
        };
        Ok(Block { fixed: Some(config), slot: Arc::new(Mutex::new(slot)) })
    }

    /// An empty slot, to which the control socket attaches images.
    pub fn slot() -> Block {
        Block { fixed: None, slot: Arc::new(Mutex::new(Slot::empty())) }
    }

    pub fn shared(&self) -> SharedSlot {
        self.slot.clone()
    }

    /// The path given with `--disk`; None for a slot.
    pub fn path(&self) -> Option<&Path> {
        self.fixed.as_ref().map(|c| c.path.as_path())
    }

    fn read_only(&self) -> bool {
        self.fixed.as_ref().is_some_and(|c| c.read_only)
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let sectors = self.slot.lock().unwrap().handler.sectors;
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

/// Configuration space up to write_zeroes_may_unmap and its padding:
/// capacity le64 @0, size_max @8, seg_max @12, geometry @16, blk_size @20,
/// topology @24, writeback @32, num_queues @34, max_discard_sectors @36,
/// max_discard_seg @40, discard_sector_alignment @44,
/// max_write_zeroes_sectors @48, max_write_zeroes_seg @52,
/// write_zeroes_may_unmap @56.
const CONFIG_SIZE: usize = 60;

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        // Features are fixed when the driver probes: a slot offers discard
        // and write-zeroes whatever is attached later (a read-only attach
        // refuses them per request).
        let extra = if self.read_only() { VIRTIO_BLK_F_RO } else { VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES };
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_RING_F_EVENT_IDX | extra
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data)
    }
    fn activate(&mut self, mut a: Activation) -> Result<WorkerHandle, String> {
        let worker = BlockWorker {
            slot: self.slot.clone(),
            queue: a.queues.remove(0),
            event: a.queue_events.remove(0),
            mem: a.mem,
            interrupt: a.interrupt,
        };
        worker::spawn("virtio-blk", worker)
    }
}

struct BlockWorker {
    slot: SharedSlot,
    queue: Queue,
    event: vmm_sys_util::eventfd::EventFd,
    mem: GuestMemoryMmap,
    interrupt: std::sync::Arc<super::Interrupt>,
}

impl BlockWorker {
    fn process_queue(&mut self) {
        let mut slot = self.slot.lock().unwrap();
        let drained = process_queue(&mut slot.handler, &mut self.queue, &self.mem);
        drop(slot);
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

    /// Writes discard/write-zeroes segments at DATA; returns the chain.
    fn range_chain(m: &GuestMemoryMmap, kind: u32, segments: &[(u64, u32, u32)]) -> Vec<SplitDescriptor> {
        header(m, kind, 0);
        for (i, (sector, count, flags)) in segments.iter().enumerate() {
            let at = DATA + 16 * i as u64;
            m.write_obj(*sector, GuestAddress(at)).unwrap();
            m.write_obj(*count, GuestAddress(at + 8)).unwrap();
            m.write_obj(*flags, GuestAddress(at + 12)).unwrap();
        }
        vec![
            descriptor(HDR, 16, false, Some(1)),
            descriptor(DATA, 16 * segments.len() as u32, false, Some(2)),
            descriptor(STATUS, 1, true, None),
        ]
    }

    #[test]
    fn discard_and_write_zeroes_clear_their_ranges_only() {
        let m = mem();
        let mut h = handler(false);
        let chain = range_chain(&m, VIRTIO_BLK_T_DISCARD, &[(1, 1, 0), (5, 2, 0)]);
        assert_eq!(run(&mut h, &m, &chain), (1, VIRTIO_BLK_S_OK));
        let sector = |h: &RequestHandler<MemDisk>, i: usize| h.disk.0[i * 512..(i + 1) * 512].to_vec();
        for (i, zero) in [(0, false), (1, true), (2, false), (4, false), (5, true), (6, true), (7, false)] {
            assert_eq!(sector(&h, i).iter().all(|b| *b == 0), zero || i == 0, "sector {i}");
        }
        assert_eq!(h.stats.discarded_bytes, 3 * 512);
        let chain = range_chain(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(2, 1, WRITE_ZEROES_FLAG_UNMAP)]);
        assert_eq!(run(&mut h, &m, &chain).1, VIRTIO_BLK_S_OK);
        assert!(sector(&h, 2).iter().all(|b| *b == 0));
        assert!(sector(&h, 3).iter().all(|b| *b == 3));
    }

    #[test]
    fn bad_discards_change_nothing() {
        let m = mem();
        let mut h = handler(false);
        let before = h.disk.0.clone();
        // Past the end (the valid first segment is not applied either).
        let chain = range_chain(&m, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0), (7, 2, 0)]);
        assert_eq!(run(&mut h, &m, &chain).1, VIRTIO_BLK_S_IOERR);
        let chain = range_chain(&m, VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 2, 0)]);
        assert_eq!(run(&mut h, &m, &chain).1, VIRTIO_BLK_S_IOERR);
        // Unmap is a write-zeroes flag only; unknown flags are unsupported.
        let chain = range_chain(&m, VIRTIO_BLK_T_DISCARD, &[(0, 1, WRITE_ZEROES_FLAG_UNMAP)]);
        assert_eq!(run(&mut h, &m, &chain).1, VIRTIO_BLK_S_UNSUPP);
        let chain = range_chain(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]);
        assert_eq!(run(&mut h, &m, &chain).1, VIRTIO_BLK_S_UNSUPP);
        // Not whole segments; too many segments.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let chain = vec![
            descriptor(HDR, 16, false, Some(1)),
            descriptor(DATA, 12, false, Some(2)),
            descriptor(STATUS, 1, true, None),
        ];
        assert_eq!(run(&mut h, &m, &chain).1, VIRTIO_BLK_S_IOERR);
        let many: Vec<_> = (0..MAX_RANGE_SEGMENTS as u64 + 1).map(|i| (i % 8, 1, 0)).collect();
        assert_eq!(run(&mut h, &m, &range_chain(&m, VIRTIO_BLK_T_DISCARD, &many)).1, VIRTIO_BLK_S_IOERR);
        assert_eq!(h.disk.0, before);
        assert_eq!(h.stats.errors, 6);
        // A read-only disk discards nothing.
        let mut ro = handler(true);
        assert_eq!(run(&mut ro, &m, &range_chain(&m, VIRTIO_BLK_T_DISCARD, &[(1, 1, 0)])).1, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn discard_punches_holes_in_a_sparse_image() {
        use std::os::unix::fs::MetadataExt;
        let path = std::env::temp_dir().join(format!("hearth-blk-discard-{}", std::process::id()));
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all(&vec![0xaa; 4 << 20]).unwrap();
        file.sync_all().unwrap();
        let allocated = |f: &File| f.metadata().unwrap().blocks() * 512;
        assert!(allocated(&file) >= 4 << 20);
        let mut h = RequestHandler::new(file, 4 << 20, false, "sparse");
        let m = mem();
        let chain = range_chain(&m, VIRTIO_BLK_T_DISCARD, &[(0, (3 << 20) / 512, 0)]);
        assert_eq!(run_file(&mut h, &m, &chain), VIRTIO_BLK_S_OK);
        assert!(allocated(&h.disk) <= (1 << 20) + (64 << 10), "the hole was not punched: {}", allocated(&h.disk));
        let mut buf = vec![0xffu8; 4096];
        h.disk.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "a discarded range reads as zeros");
        h.disk.read_at(&mut buf, 3 << 20).unwrap();
        assert!(buf.iter().all(|b| *b == 0xaa), "the rest is kept");
    }

    fn run_file(h: &mut RequestHandler<File>, m: &GuestMemoryMmap, descs: &[SplitDescriptor]) -> u8 {
        let q = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(m).unwrap();
        h.handle(m, chain);
        m.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn an_empty_slot_fails_io_until_a_disk_is_attached() {
        let m = mem();
        let block = Block::slot();
        let slot = block.shared();
        let mut s = slot.lock().unwrap();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::new(&m, 16);
        let raw: Vec<RawDescriptor> = rw_chain(512, true).iter().map(|d| RawDescriptor::from(*d)).collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        s.handler.handle(&m, chain);
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_IOERR);
        assert_eq!(s.detach(), Err(SlotError::Empty));
        let path = std::env::temp_dir().join(format!("hearth-blk-slot-{}", std::process::id()));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(4096).unwrap();
        let again = file.try_clone().unwrap();
        assert_eq!(s.attach(file, 1000, (1, 1), false, "x").unwrap_err(), SlotError::BadSize(1000));
        s.attach(again, 4096, (1, 1), false, "data").unwrap();
        assert_eq!((s.handler.sectors, s.handler.id_str().as_str()), (8, "data"));
        let another = OpenOptions::new().read(true).open("/dev/null").unwrap();
        assert_eq!(s.attach(another, 4096, (2, 2), false, "y").unwrap_err(), SlotError::Occupied("data".into()));
        assert!(s.detach().is_ok());
        assert_eq!(s.handler.sectors, 0);
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
