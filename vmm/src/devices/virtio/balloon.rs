//! virtio-balloon (virtio 1.2 section 5.5) with free page reporting: guest
//! memory the guest no longer uses goes back to the host, so an idle VM's
//! footprint shrinks after its workloads free memory (what WSL calls
//! autoMemoryReclaim).
//!
//! Queues, for the features offered here (PAGE_REPORTING and PAGE_POISON,
//! never STATS_VQ or FREE_PAGE_HINT): inflate (0), deflate (1), reporting
//! (2). A queue exists only if its feature is negotiated and the ones after
//! it move down: Linux's `init_vqs` leaves the stats and free-page-hint
//! queues unnamed and virtio-mmio's `vm_find_vqs` only numbers named queues,
//! so the reporting queue is index 2 here.
//!
//! - inflate: the driver hands over page frame numbers (le32, 4 KiB pages)
//!   of pages it took out of its allocator; their host memory is discarded.
//!   The host sets the target, `num_pages`, through the control socket
//!   (`set-balloon`); the guest inflates to it and reports `actual`.
//! - deflate: the pages come back; nothing to do, a discarded page is
//!   allocated again (zeroed) when the guest touches it.
//! - reporting: the guest kernel's page reporting (mm/page_reporting.c)
//!   puts free blocks of its allocator (2 MiB and up by default) in a chain of
//!   device-writable buffers and waits until the chain is used; each buffer
//!   is discarded and the chain returned with used length 0 (the driver
//!   ignores the length).
//!
//! Guest RAM is one memfd mapped MAP_SHARED (`vstate::vm::guest_memory`):
//! MADV_DONTNEED would only unmap the pages from this process and leave them
//! in the file, so a discard punches a hole in the memfd ([`HostDiscard`]),
//! which frees them for every mapping, KVM's included.
//!
//! The guest is untrusted: every range is checked to be page-aligned and
//! inside guest RAM (through vm-memory's regions) before anything is
//! discarded; anything else is counted, logged once, and skipped.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, Reader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{drain_queue, Drained, BUDGET};
use super::worker::{self, DeviceWorker, Poller};
use super::{Activation, Interrupt, VirtioDevice, WorkerHandle, TYPE_BALLOON};
use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;

/// Guest-triggerable warnings go through a rate limit (see ratelimit.rs).
static DISCARD_WARN: LogLimit = LogLimit::new();

/// The balloon's page size: PFNs are in units of 4 KiB whatever the guest's
/// page size (VIRTIO_BALLOON_PFN_SHIFT).
pub const PAGE_SIZE: u64 = 1 << PFN_SHIFT;
const PFN_SHIFT: u32 = 12;

/// Linux refuses a reporting queue smaller than PAGE_REPORTING_CAPACITY (32).
const QUEUE_SIZE: u16 = 256;
const _: () = assert!(QUEUE_SIZE >= 32);

/// The driver tells the device which value free pages hold (poison_val).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u64 = 1 << 4;
/// Free page reporting: the reporting queue exists.
pub const VIRTIO_BALLOON_F_PAGE_REPORTING: u64 = 1 << 5;

pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
/// Index of the reporting queue when PAGE_REPORTING is negotiated (and, as
/// here, neither STATS_VQ nor FREE_PAGE_HINT is).
pub const REPORTING_QUEUE: usize = 2;

/// PFNs one inflate request may carry; Linux sends at most 256. The rest of
/// a longer request is ignored, so a hostile chain costs bounded work.
const MAX_INFLATE_PFNS: usize = 4096;

/// The balloon as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer free page reporting.
    pub free_page_reporting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig { free_page_reporting: true }
    }
}

impl BalloonConfig {
    /// Parses `[reporting=on|off]` (empty: the defaults, reporting on).
    pub fn parse(s: &str) -> Result<BalloonConfig, String> {
        const USAGE: &str = "use [reporting=on|off]";
        let mut config = BalloonConfig::default();
        let mut reporting_given = false;
        for opt in s.split(',').filter(|o| !o.is_empty()) {
            let (key, value) = opt.split_once('=').ok_or_else(|| format!("{opt:?} is not KEY=VALUE: {USAGE}"))?;
            match key {
                "reporting" if !reporting_given => {
                    reporting_given = true;
                    config.free_page_reporting = match value {
                        "on" => true,
                        "off" => false,
                        other => return Err(format!("reporting={other:?}: {USAGE}")),
                    };
                }
                "reporting" => return Err(format!("reporting is given twice: {USAGE}")),
                other => return Err(format!("unknown balloon option {other:?}: {USAGE}")),
            }
        }
        Ok(config)
    }
}

/// Gives the host memory behind guest pages back to the host. A trait so
/// that tests can record ranges instead.
pub trait Discard: Send {
    /// Discards `len` bytes at `at` in `region`. The caller has checked that
    /// the range is page-aligned, not empty, and inside the region.
    fn discard<R: GuestMemoryRegion>(&mut self, region: &R, at: MemoryRegionAddress, len: u64) -> io::Result<()>;
}

/// The real discard: a hole punched in the file behind a file-backed region
/// (guest RAM's memfd, mapped shared), MADV_DONTNEED on an anonymous
/// (private) region. Either way the pages read as zeros afterwards.
pub struct HostDiscard;

impl Discard for HostDiscard {
    fn discard<R: GuestMemoryRegion>(&mut self, region: &R, at: MemoryRegionAddress, len: u64) -> io::Result<()> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        // Checked by the caller too: this is what keeps the syscalls below
        // inside guest RAM.
        if len == 0 || at.raw_value().checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(invalid());
        }
        let rc = match region.file_offset() {
            Some(file) => {
                let offset = file.start().checked_add(at.raw_value()).ok_or_else(invalid)?;
                let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
                let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
                // SAFETY: fallocate on a descriptor the region owns; the
                // range is guest RAM the guest gave up, which reads as zeros
                // afterwards in every mapping.
                unsafe {
                    libc::fallocate(
                        file.file().as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                }
            }
            None => {
                let host = region.get_host_address(at).map_err(|e| io::Error::other(e.to_string()))?;
                let len = usize::try_from(len).map_err(|_| invalid())?;
                // SAFETY: [host, host + len) lies inside the region's mapping
                // (checked above); guest memory is only ever accessed through
                // volatile accessors, which then read zeros.
                unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) }
            }
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Why a range was not discarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    Empty,
    Misaligned,
    Overflow,
    OutsideRam,
}

/// What the device did, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub discarded_bytes: u64,
    /// Ranges (or whole chains) refused as malformed.
    pub rejected: u64,
    /// Discards the host refused (an error from fallocate or madvise).
    pub failed: u64,
}

/// Serves the balloon's queues. Separate from the thread and the queues so
/// that tests and fuzzers can drive it with any chain.
pub struct BalloonHandler<D: Discard> {
    pub discard: D,
    pub stats: Stats,
    poison: Arc<AtomicU32>,
    poison_negotiated: bool,
    warned: bool,
}

impl<D: Discard> BalloonHandler<D> {
    /// `poison` is the driver's poison_val, meaningful when
    /// `poison_negotiated` (VIRTIO_BALLOON_F_PAGE_POISON was accepted).
    pub fn new(discard: D, poison: Arc<AtomicU32>, poison_negotiated: bool) -> Self {
        BalloonHandler { discard, stats: Stats::default(), poison, poison_negotiated, warned: false }
    }

    /// One inflate request: a buffer of le32 PFNs. Returns the used length (0).
    pub fn inflate<M: GuestMemoryBackend>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        let mut reader = match Reader::new(mem, chain) {
            Ok(r) => r,
            Err(e) => {
                self.reject("inflate request outside guest memory", format_args!("{e:?}"));
                return 0;
            }
        };
        let available = reader.available_bytes();
        if available % 4 != 0 || available > MAX_INFLATE_PFNS * 4 {
            self.reject("inflate request of a bad size", format_args!("{available} bytes"));
        }
        let mut buf = vec![0u8; available.min(MAX_INFLATE_PFNS * 4) & !3];
        if reader.read_exact(&mut buf).is_err() {
            self.reject("unreadable inflate request", format_args!("{available} bytes"));
            return 0;
        }
        // Consecutive PFNs (the usual case) are discarded in one go.
        let mut run: Option<(u64, u64)> = None;
        for pfn in buf.chunks_exact(4).map(|b| u64::from(u32::from_le_bytes(b.try_into().unwrap()))) {
            match &mut run {
                Some((start, count)) if *start + *count == pfn => *count += 1,
                _ => {
                    if let Some((start, count)) = run.replace((pfn, 1)) {
                        self.discard_pfns(mem, start, count);
                    }
                }
            }
        }
        if let Some((start, count)) = run {
            self.discard_pfns(mem, start, count);
        }
        0
    }

    fn discard_pfns<M: GuestMemoryBackend>(&mut self, mem: &M, pfn: u64, count: u64) {
        // A PFN is a u32 and count at most MAX_INFLATE_PFNS: no overflow.
        let _ = self.discard_range(mem, GuestAddress(pfn << PFN_SHIFT), count << PFN_SHIFT);
    }

    /// One report: each descriptor of the chain, device-writable, is a free
    /// range of guest RAM. Returns the used length (0).
    pub fn report<M: GuestMemoryBackend>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        // The chain iterator stops at a loop and at 4 GiB in all: at most a
        // queue's worth of descriptors, or 65535 through an indirect table.
        let descriptors: Vec<_> = chain.collect();
        if let Some(d) = descriptors.iter().find(|d| !d.is_write_only()) {
            self.reject(
                "free page report with a device-readable buffer",
                format_args!("{:#x}+{:#x}", d.addr().raw_value(), d.len()),
            );
            return 0;
        }
        if self.poison_negotiated && self.poison.load(Ordering::Acquire) != 0 {
            // Reported pages must keep the driver's poison value; a
            // discarded page would read as zeros.
            return 0;
        }
        for d in descriptors {
            let _ = self.discard_range(mem, d.addr(), u64::from(d.len()));
        }
        0
    }

    /// Checks that `[addr, addr + len)` is whole pages of guest RAM and
    /// discards it, region by region; returns the bytes discarded.
    pub fn discard_range<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: u64,
    ) -> Result<u64, Rejected> {
        let pieces = match ram_pieces(mem, addr, len) {
            Ok(p) => p,
            Err(why) => {
                self.reject("range not discarded", format_args!("{:#x}+{len:#x}: {why:?}", addr.raw_value()));
                return Err(why);
            }
        };
        let mut done = 0;
        for (region, at, n) in pieces {
            match self.discard.discard(region, at, n) {
                Ok(()) => done += n,
                Err(e) => {
                    self.stats.failed += 1;
                    warn_limited!(DISCARD_WARN, "virtio-balloon: discarding {n:#x} bytes of guest RAM: {e}");
                }
            }
        }
        self.stats.discarded_bytes += done;
        Ok(done)
    }

    fn reject(&mut self, what: &str, detail: std::fmt::Arguments) {
        self.stats.rejected += 1;
        if !self.warned {
            self.warned = true;
            tracing::warn!("virtio-balloon: {what}: {detail} (further ones are logged at debug level)");
        } else {
            tracing::debug!("virtio-balloon: {what}: {detail}");
        }
    }
}

/// Part of a range inside one region: the region, the offset in it, the length.
pub type Piece<'a, R> = (&'a R, MemoryRegionAddress, u64);

/// Splits `[addr, addr + len)` into pieces each inside one region of `mem`:
/// (region, offset in it, length). Refuses an empty, misaligned or
/// overflowing range, or one with any byte outside guest RAM.
pub fn ram_pieces<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: u64,
) -> Result<Vec<Piece<'_, M::R>>, Rejected> {
    if len == 0 {
        return Err(Rejected::Empty);
    }
    if addr.raw_value() % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(Rejected::Misaligned);
    }
    addr.checked_add(len).ok_or(Rejected::Overflow)?;
    let mut pieces = Vec::with_capacity(1);
    let (mut at, mut left) = (addr, len);
    while left > 0 {
        let (region, offset) = mem.to_region_addr(at).ok_or(Rejected::OutsideRam)?;
        // offset < region.len(), so every turn makes progress.
        let n = (region.len() - offset.raw_value()).min(left);
        pieces.push((region, offset, n));
        at = at.unchecked_add(n);
        left -= n;
    }
    Ok(pieces)
}

/// Serves the chains the driver made available on `queue` with `serve`
/// (which returns the used length), up to the per-wake budget, as the
/// worker does on each notification.
pub fn process_queue<M, F>(queue: &mut Queue, mem: &M, serve: F) -> Drained
where
    M: GuestMemoryBackend,
    F: FnMut(&M, DescriptorChain<&M>) -> u32,
{
    drain_queue("virtio-balloon", queue, mem, BUDGET, serve)
}

/// Configuration space: num_pages, actual, free_page_hint_cmd_id, poison_val
/// (le32 each). The driver writes `actual` and `poison_val`.
const CONFIG_SIZE: usize = 16;
const ACTUAL: std::ops::Range<usize> = 4..8;
const POISON_VAL: std::ops::Range<usize> = 12..16;

/// The balloon's size, shared with the control socket, which sets the
/// target (changed under the transport's lock, then announced as a
/// configuration change: see `MmioTransport::update_config`).
#[derive(Debug, Default)]
pub struct BalloonSize {
    /// Pages (4 KiB) the device asks the guest to hold in the balloon.
    pub num_pages: AtomicU32,
    /// Pages the guest says it holds.
    pub actual: AtomicU32,
}

pub struct Balloon {
    config: BalloonConfig,
    size: Arc<BalloonSize>,
    poison: Arc<AtomicU32>,
}

impl Balloon {
    pub fn new(config: BalloonConfig) -> Balloon {
        Balloon { config, size: Arc::default(), poison: Arc::new(AtomicU32::new(0)) }
    }

    pub fn size(&self) -> Arc<BalloonSize> {
        self.size.clone()
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..4].copy_from_slice(&self.size.num_pages.load(Ordering::Acquire).to_le_bytes());
        c[ACTUAL].copy_from_slice(&self.size.actual.load(Ordering::Acquire).to_le_bytes());
        c[POISON_VAL].copy_from_slice(&self.poison.load(Ordering::Acquire).to_le_bytes());
        c
    }

    /// Pages the guest says the balloon holds (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.size.actual.load(Ordering::Acquire)
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        let queues = if self.config.free_page_reporting { 3 } else { 2 };
        vec![QUEUE_SIZE; queues]
    }
    fn features(&self) -> u64 {
        if self.config.free_page_reporting {
            VIRTIO_BALLOON_F_PAGE_REPORTING | VIRTIO_BALLOON_F_PAGE_POISON
        } else {
            0
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut c = self.config_space();
        for (i, b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else { break };
            if ACTUAL.contains(&o) || POISON_VAL.contains(&o) {
                c[o] = *b;
            }
        }
        let actual = u32::from_le_bytes(c[ACTUAL].try_into().unwrap());
        if actual != self.size.actual.swap(actual, Ordering::AcqRel) {
            tracing::debug!(actual, "virtio-balloon: the guest's balloon size changed");
        }
        self.poison.store(u32::from_le_bytes(c[POISON_VAL].try_into().unwrap()), Ordering::Release);
    }
    fn activate(&mut self, a: Activation) -> Result<WorkerHandle, String> {
        if a.queues.len() != a.queue_events.len() || a.queues.len() < 2 {
            return Err("virtio-balloon needs its inflate and deflate queues".into());
        }
        let reporting = a.acked_features & VIRTIO_BALLOON_F_PAGE_REPORTING != 0;
        if reporting && a.queues.len() <= REPORTING_QUEUE {
            return Err("virtio-balloon: reporting negotiated without a reporting queue".into());
        }
        let poison_negotiated = a.acked_features & VIRTIO_BALLOON_F_PAGE_POISON != 0;
        let worker = BalloonWorker {
            handler: BalloonHandler::new(HostDiscard, self.poison.clone(), poison_negotiated),
            queues: a.queues,
            events: a.queue_events,
            reporting,
            mem: a.mem,
            interrupt: a.interrupt,
            logged_bytes: 0,
        };
        worker::spawn("virtio-balloon", worker)
    }
}

struct BalloonWorker {
    handler: BalloonHandler<HostDiscard>,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    reporting: bool,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// Discarded bytes at the last log line.
    logged_bytes: u64,
}

impl DeviceWorker for BalloonWorker {
    fn init(&mut self, poller: &Poller) -> io::Result<()> {
        for (i, e) in self.events.iter().enumerate() {
            poller.add(e.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle(&mut self, token: u64, _events: EventSet, _poller: &Poller) {
        let i = token as usize;
        let (Some(event), Some(queue)) = (self.events.get(i), self.queues.get_mut(i)) else { return };
        let _ = event.read();
        let (handler, mem) = (&mut self.handler, &self.mem);
        let drained = match i {
            INFLATE_QUEUE => process_queue(queue, mem, |m, c| handler.inflate(m, c)),
            DEFLATE_QUEUE => process_queue(queue, mem, |_, _| 0),
            REPORTING_QUEUE if self.reporting => process_queue(queue, mem, |m, c| handler.report(m, c)),
            _ => Drained::default(),
        };
        if drained.notify {
            self.interrupt.signal_used();
        }
        drained.renotify(event);
        let stats = self.handler.stats;
        if stats.discarded_bytes >= self.logged_bytes + (64 << 20) {
            self.logged_bytes = stats.discarded_bytes;
            tracing::debug!(
                discarded_mib = stats.discarded_bytes >> 20,
                rejected = stats.rejected,
                failed = stats.failed,
                "virtio-balloon: guest memory given back to the host"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::descriptor;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// Records (guest address, length) instead of discarding.
    #[derive(Default)]
    struct Recorder(Vec<(u64, u64)>);
    impl Discard for Recorder {
        fn discard<R: GuestMemoryRegion>(&mut self, region: &R, at: MemoryRegionAddress, len: u64) -> io::Result<()> {
            assert!(at.raw_value() + len <= region.len(), "a discard past its region");
            self.0.push((region.start_addr().raw_value() + at.raw_value(), len));
            Ok(())
        }
    }

    const MIB: u64 = 1 << 20;
    /// Scratch for PFN arrays, past the mock queue at 0.
    const PFNS: u64 = 0x10000;

    /// Two regions with a hole between, like RAM around the 32-bit gap.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB as usize), (GuestAddress(2 * MIB), MIB as usize)])
            .unwrap()
    }

    fn handler() -> BalloonHandler<Recorder> {
        BalloonHandler::new(Recorder::default(), Arc::new(AtomicU32::new(0)), false)
    }

    /// Serves one chain made of `descs` with `serve`; returns the used length.
    fn serve_one(
        m: &GuestMemoryMmap,
        descs: &[SplitDescriptor],
        serve: impl FnOnce(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> u32 {
        let q = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(m).unwrap();
        serve(m, chain)
    }

    fn write_pfns(m: &GuestMemoryMmap, pfns: &[u32]) -> u32 {
        for (i, p) in pfns.iter().enumerate() {
            m.write_obj(p.to_le(), GuestAddress(PFNS + 4 * i as u64)).unwrap();
        }
        4 * pfns.len() as u32
    }

    #[test]
    fn inflate_discards_the_pfns_coalescing_runs() {
        let m = mem();
        let mut h = handler();
        // 0x20, 0x21, 0x22 are one run; 0x205 (in the second region) another.
        let len = write_pfns(&m, &[0x20, 0x21, 0x22, 0x205, 0x30]);
        let used = serve_one(&m, &[descriptor(PFNS, len, false, None)], |m, c| h.inflate(m, c));
        assert_eq!(used, 0);
        assert_eq!(h.discard.0, vec![(0x20000, 0x3000), (0x205000, 0x1000), (0x30000, 0x1000)]);
        assert_eq!(h.stats, Stats { discarded_bytes: 5 * PAGE_SIZE, rejected: 0, failed: 0 });
    }

    #[test]
    fn inflate_skips_pfns_outside_guest_ram() {
        let m = mem();
        let mut h = handler();
        // 0x100 is the hole between the regions, 0x300 past the end, u32::MAX far beyond.
        let len = write_pfns(&m, &[0x100, 0x40, 0x300, u32::MAX, 0x2ff]);
        serve_one(&m, &[descriptor(PFNS, len, false, None)], |m, c| h.inflate(m, c));
        assert_eq!(h.discard.0, vec![(0x40000, 0x1000), (0x2ff000, 0x1000)]);
        assert_eq!(h.stats.rejected, 3);
    }

    #[test]
    fn inflate_of_a_bad_size_or_outside_memory_is_bounded() {
        let m = mem();
        let mut h = handler();
        // 6 bytes: one PFN and a stray half.
        write_pfns(&m, &[0x41, 0x42]);
        serve_one(&m, &[descriptor(PFNS, 6, false, None)], |m, c| h.inflate(m, c));
        assert_eq!(h.discard.0, vec![(0x41000, 0x1000)]);
        // A buffer outside guest memory: nothing read, nothing discarded.
        let mut h = handler();
        serve_one(&m, &[descriptor(0xffff_0000_0000, 64, false, None)], |m, c| h.inflate(m, c));
        assert!(h.discard.0.is_empty());
        assert_eq!(h.stats.rejected, 1);
        // A huge request (512 KiB of PFNs, all zeros: page 0 again and
        // again): only the first MAX_INFLATE_PFNS are looked at.
        let mut h = handler();
        serve_one(&m, &[descriptor(0x80000, 512 << 10, false, None)], |m, c| h.inflate(m, c));
        assert_eq!(h.discard.0.len(), MAX_INFLATE_PFNS, "a repeated page is not a run");
        assert_eq!(h.stats.rejected, 1);
        // Device-writable buffers carry no PFNs.
        let mut h = handler();
        write_pfns(&m, &[0x43]);
        serve_one(&m, &[descriptor(PFNS, 4, true, None)], |m, c| h.inflate(m, c));
        assert!(h.discard.0.is_empty());
    }

    #[test]
    fn reporting_discards_each_buffer() {
        let m = mem();
        let mut h = handler();
        let chain = [descriptor(0x8_0000, 0x8_0000, true, Some(1)), descriptor(0x20_0000, 0x10_0000, true, None)];
        assert_eq!(serve_one(&m, &chain, |m, c| h.report(m, c)), 0);
        assert_eq!(h.discard.0, vec![(0x8_0000, 0x8_0000), (0x20_0000, 0x10_0000)]);
        assert_eq!(h.stats.discarded_bytes, 0x18_0000);
    }

    #[test]
    fn reporting_rejects_bad_ranges_and_keeps_the_good_ones() {
        let m = mem();
        let mut h = handler();
        let chain = [
            descriptor(0x1000, 0x1000, true, Some(1)),
            descriptor(0x2001, 0x1000, true, Some(2)),    // misaligned start
            descriptor(0x3000, 0x800, true, Some(3)),     // partial page
            descriptor(0x4000, 0, true, Some(4)),         // empty
            descriptor(0xf_f000, 0x2000, true, Some(5)),  // runs into the hole
            descriptor(0x10_0000, 0x1000, true, Some(6)), // in the hole
            descriptor(0x2f_f000, 0x2000, true, Some(7)), // past the end
            descriptor(0xffff_ffff_ffff_f000, 0x2000, true, Some(8)), // overflows
            descriptor(0x5000, 0xfff0_0000, true, None),  // huge
        ];
        serve_one(&m, &chain, |m, c| h.report(m, c));
        assert_eq!(h.discard.0, vec![(0x1000, 0x1000)]);
        assert_eq!(h.stats.rejected, 8);
    }

    #[test]
    fn a_report_with_a_device_readable_buffer_is_refused_whole() {
        let m = mem();
        let mut h = handler();
        let chain = [descriptor(0x1000, 0x1000, true, Some(1)), descriptor(0x2000, 0x1000, false, None)];
        assert_eq!(serve_one(&m, &chain, |m, c| h.report(m, c)), 0);
        assert!(h.discard.0.is_empty());
        assert_eq!(h.stats.rejected, 1);
    }

    #[test]
    fn reports_are_not_discarded_while_the_driver_poisons_free_pages() {
        let m = mem();
        let poison = Arc::new(AtomicU32::new(0xaaaa_aaaa));
        let mut h = BalloonHandler::new(Recorder::default(), poison.clone(), true);
        let chain = [descriptor(0x1000, 0x1000, true, None)];
        serve_one(&m, &chain, |m, c| h.report(m, c));
        assert!(h.discard.0.is_empty());
        // init_on_free: free pages are zeros, which a discard keeps.
        poison.store(0, Ordering::Release);
        serve_one(&m, &chain, |m, c| h.report(m, c));
        assert_eq!(h.discard.0, vec![(0x1000, 0x1000)]);
    }

    #[test]
    fn a_range_spanning_contiguous_regions_is_split() {
        let m =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB as usize), (GuestAddress(MIB), MIB as usize)])
                .unwrap();
        let mut h = handler();
        assert_eq!(h.discard_range(&m, GuestAddress(0xf_e000), 0x4000), Ok(0x4000));
        assert_eq!(h.discard.0, vec![(0xf_e000, 0x2000), (0x10_0000, 0x2000)]);
        assert_eq!(h.discard_range(&m, GuestAddress(0x1f_f000), 0x2000), Err(Rejected::OutsideRam));
        assert_eq!(h.discard.0.len(), 2, "nothing of a refused range is discarded");
    }

    #[test]
    fn process_queue_serves_every_chain_and_does_not_spin() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chains = [descriptor(0x1000, 0x1000, true, None), descriptor(0x3000, 0x2000, true, None)];
        let raw: Vec<RawDescriptor> = chains.iter().map(|d| RawDescriptor::from(*d)).collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let mut h = handler();
        assert!(process_queue(&mut queue, &m, |m, c| h.report(m, c)).notify);
        assert_eq!(h.discard.0, vec![(0x1000, 0x1000), (0x3000, 0x2000)]);
        assert_eq!(q.used().idx().load(), 2);

        // An available index more than a queue ahead.
        let q = MockSplitQueue::new(&m, 16);
        q.avail().idx().store(17);
        let mut queue: Queue = q.create_queue().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let m2 = m.clone();
        std::thread::spawn(move || {
            let mut h = handler();
            tx.send(process_queue(&mut queue, &m2, |m, c| h.report(m, c))).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(), "process_queue spins");
    }

    #[test]
    fn host_discard_frees_memfd_pages_and_they_read_as_zeros() {
        let mem = crate::vstate::vm::guest_memory(16 * MIB).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let file = region.file_offset().expect("guest RAM is file-backed").file().try_clone().unwrap();
        let allocated = |f: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().blocks() * 512
        };
        mem.write_slice(&vec![0x5a; 4 * MIB as usize], GuestAddress(MIB)).unwrap();
        assert!(allocated(&file) >= 4 * MIB);
        let mut h = BalloonHandler::new(HostDiscard, Arc::new(AtomicU32::new(0)), false);
        assert_eq!(h.discard_range(&mem, GuestAddress(MIB), 4 * MIB), Ok(4 * MIB));
        assert!(allocated(&file) < MIB, "the memfd still holds {} bytes", allocated(&file));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(5 * MIB - 8)).unwrap(), 0);
        // The page after the range is untouched.
        mem.write_obj(0x77u8, GuestAddress(5 * MIB)).unwrap();
        assert_eq!(h.discard_range(&mem, GuestAddress(4 * MIB), PAGE_SIZE), Ok(PAGE_SIZE));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(5 * MIB)).unwrap(), 0x77);
    }

    #[test]
    fn host_discard_on_anonymous_memory_zeroes_the_pages() {
        let m = mem();
        m.write_obj(0x1234_5678u32, GuestAddress(0x2_0000)).unwrap();
        m.write_obj(0x1234_5678u32, GuestAddress(0x21_0000)).unwrap();
        let mut h = BalloonHandler::new(HostDiscard, Arc::new(AtomicU32::new(0)), false);
        assert_eq!(h.discard_range(&m, GuestAddress(0x2_0000), PAGE_SIZE), Ok(PAGE_SIZE));
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x2_0000)).unwrap(), 0);
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x21_0000)).unwrap(), 0x1234_5678);
        // HostDiscard checks the region bounds itself too.
        let region = m.find_region(GuestAddress(0)).unwrap();
        assert!(HostDiscard.discard(region, MemoryRegionAddress(MIB - PAGE_SIZE), 2 * PAGE_SIZE).is_err());
    }

    #[test]
    fn config_space_and_driver_writes() {
        let mut b = Balloon::new(BalloonConfig::default());
        assert_eq!(b.queue_max_sizes(), vec![QUEUE_SIZE; 3]);
        assert_eq!(b.features(), VIRTIO_BALLOON_F_PAGE_REPORTING | VIRTIO_BALLOON_F_PAGE_POISON);
        let mut c = [0xffu8; 16];
        b.read_config(0, &mut c);
        assert_eq!(c, [0; 16]);
        // The driver writes actual and poison_val; num_pages and the hint id are read-only.
        b.write_config(0, &7u32.to_le_bytes());
        b.write_config(4, &3u32.to_le_bytes());
        b.write_config(8, &9u32.to_le_bytes());
        b.write_config(12, &0xaaaa_aaaau32.to_le_bytes());
        b.write_config(u64::MAX, &[1, 2, 3]);
        b.read_config(0, &mut c);
        assert_eq!(&c[0..4], &[0; 4]);
        assert_eq!(u32::from_le_bytes(c[4..8].try_into().unwrap()), 3);
        assert_eq!(&c[8..12], &[0; 4]);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 0xaaaa_aaaa);
        assert_eq!(b.actual_pages(), 3);
        // One byte at a time, too.
        b.write_config(5, &[1]);
        assert_eq!(b.actual_pages(), 0x103);

        let off = Balloon::new(BalloonConfig::parse("reporting=off").unwrap());
        assert_eq!(off.queue_max_sizes().len(), 2);
        assert_eq!(off.features(), 0);
    }

    #[test]
    fn options() {
        assert_eq!(BalloonConfig::parse("").unwrap(), BalloonConfig { free_page_reporting: true });
        assert_eq!(BalloonConfig::parse("reporting=on").unwrap(), BalloonConfig { free_page_reporting: true });
        assert_eq!(BalloonConfig::parse("reporting=off").unwrap(), BalloonConfig { free_page_reporting: false });
        for bad in ["reporting", "reporting=yes", "reporting=on,reporting=off", "size=10", "on"] {
            assert!(BalloonConfig::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
