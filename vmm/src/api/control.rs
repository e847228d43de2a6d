//! What each control request does to the running VM. Everything a request
//! names is checked here (ids, sizes, the descriptor's type and access
//! mode, the image not already attached), and every refusal says what to do.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::protocol::{BalloonInfo, DiskInfo, NicInfo, Reply, Request, VmInfo, VmState};
use crate::devices::virtio::balloon::BalloonSize;
use crate::devices::virtio::block::{SharedSlot, Slot, SECTOR_SIZE};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::SharedNic;
use crate::devices::virtio::tap::Tap;
use crate::vstate::run_control::RunControl;

/// How long a pause waits for every vCPU to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Balloon pages are 4 KiB.
const PAGES_PER_MIB: u64 = 256;

/// A virtio-blk device as the control socket sees it.
pub struct DiskDevice {
    pub transport: Arc<MmioTransport>,
    pub slot: SharedSlot,
    /// Attachable (`--disk-slots`) rather than given with `--disk`.
    pub hotplug: bool,
}

/// A virtio-net device as the control socket sees it.
pub struct NicDevice {
    pub transport: Arc<MmioTransport>,
    pub nic: SharedNic,
    pub mac: [u8; 6],
    /// Attachable (`--nic-slots`) rather than given with `--net`.
    pub hotplug: bool,
}

pub struct BalloonDevice {
    pub transport: Arc<MmioTransport>,
    pub size: Arc<BalloonSize>,
}

pub struct Control {
    pub run: Arc<RunControl>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<DiskDevice>,
    pub nics: Vec<NicDevice>,
    pub balloon: Option<BalloonDevice>,
    /// Serializes attaches and detaches.
    pub changes: std::sync::Mutex<()>,
}

impl Control {
    /// Serves one request; `file` is the descriptor sent with it, if any.
    pub fn handle(&self, request: Request, file: Option<File>) -> Reply {
        if file.is_some() && !matches!(request, Request::AttachDisk { .. } | Request::AttachNic { .. }) {
            return Reply::Error(
                "this request takes no file descriptor: send one only with attach-disk or attach-nic".into(),
            );
        }
        let result = match request {
            Request::Info {} => Ok(Reply::Info(self.info())),
            Request::Pause {} => self.run.pause(PAUSE_TIMEOUT).map(|()| Reply::Done).map_err(|e| e.to_string()),
            Request::Resume {} => {
                self.run.resume();
                Ok(Reply::Done)
            }
            Request::SetBalloon { target_mib } => self.set_balloon(target_mib),
            Request::AttachDisk { id, read_only } => self.attach(&id, read_only, file),
            Request::DetachDisk { id } => self.detach(&id),
            Request::AttachNic { id } => self.attach_nic(&id, file),
            Request::DetachNic { id } => self.detach_nic(&id),
        };
        result.unwrap_or_else(Reply::Error)
    }

    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: if self.run.is_paused() { VmState::Paused } else { VmState::Running },
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            balloon: self.balloon.as_ref().map(|b| BalloonInfo {
                target_mib: u64::from(b.size.num_pages.load(Ordering::Acquire)) / PAGES_PER_MIB,
                actual_mib: u64::from(b.size.actual.load(Ordering::Acquire)) / PAGES_PER_MIB,
            }),
            disks: self.disks.iter().enumerate().map(|(i, d)| disk_info(i, d, &d.slot.lock().unwrap())).collect(),
            nics: self.nics.iter().enumerate().map(|(i, n)| nic_info(i, n)).collect(),
        }
    }

    fn set_balloon(&self, target_mib: u64) -> Result<Reply, String> {
        let b = self.balloon.as_ref().ok_or("this VM has no balloon device: start it with --balloon")?;
        if target_mib >= self.memory_mib {
            return Err(format!(
                "a balloon of {target_mib} MiB would take all of the guest's {} MiB: ask for less",
                self.memory_mib
            ));
        }
        let pages = u32::try_from(target_mib * PAGES_PER_MIB).map_err(|_| "the target is too large".to_string())?;
        b.transport.update_config(|| b.size.num_pages.store(pages, Ordering::Release));
        Ok(Reply::Done)
    }

    fn attach(&self, id: &str, read_only: bool, file: Option<File>) -> Result<Reply, String> {
        check_id(id)?;
        let file =
            file.ok_or("attach-disk needs the image's open file descriptor sent with the request (SCM_RIGHTS)")?;
        let meta = file.metadata().map_err(|e| format!("cannot stat the image: {e}"))?;
        let block_device = meta.file_type().is_block_device();
        if !meta.file_type().is_file() && !block_device {
            return Err("the descriptor is neither a regular file nor a block device: attach a raw image file or a block device".into());
        }
        if !read_only && !writable(&file) {
            return Err("the image was opened read-only: open it read-write, or attach it with read_only".into());
        }
        // A block device (a devmapper snapshot, say) has no length in its
        // inode: its size is where its end is.
        let size = if block_device {
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0)).map_err(|e| format!("cannot size the block device: {e}"))?
        } else {
            meta.len()
        };
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(format!(
                "the image is {size} bytes: a disk is a whole number of 512-byte sectors, at least one"
            ));
        }
        // The same device is the same disk whichever node named it.
        let identity = if block_device { (meta.rdev(), u64::MAX) } else { (meta.dev(), meta.ino()) };
        // Attaches and detaches one at a time, so that what is checked here
        // still holds when the slot is filled.
        let _changes = self.changes.lock().unwrap();
        let mut free = None;
        for (i, d) in self.disks.iter().enumerate() {
            let s = d.slot.lock().unwrap();
            if s.is_attached() && s.handler.id_str() == id {
                return Err(format!("a disk with id {id:?} is already attached: choose another id"));
            }
            if s.identity == Some(identity) {
                return Err(format!(
                    "this image is already attached as {:?}: one image is never attached twice",
                    s.handler.id_str()
                ));
            }
            if free.is_none() && d.hotplug && !s.is_attached() {
                free = Some(i);
            }
        }
        let Some(index) = free else {
            let n = self.disks.iter().filter(|d| d.hotplug).count();
            return Err(format!(
                "all {n} disk slots are in use: detach a disk, or start the VM with more --disk-slots"
            ));
        };
        let disk = &self.disks[index];
        // Lock order: the transport's (taken by update_config), then the slot's.
        let info = disk
            .transport
            .update_config(|| {
                let mut slot = disk.slot.lock().unwrap();
                slot.attach(file, size, identity, read_only, id).map(|()| disk_info(index, disk, &slot))
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(id, index, size, read_only, "disk attached");
        Ok(Reply::Attached(info))
    }

    fn detach(&self, id: &str) -> Result<Reply, String> {
        check_id(id)?;
        let _changes = self.changes.lock().unwrap();
        for (index, disk) in self.disks.iter().enumerate() {
            let info = {
                let slot = disk.slot.lock().unwrap();
                if !slot.is_attached() || slot.handler.id_str() != id {
                    continue;
                }
                disk_info(index, disk, &slot)
            };
            if !disk.hotplug {
                return Err(format!("{id:?} was given with --disk: only disks attached through this socket detach"));
            }
            // The counters up to the moment it goes.
            let stats =
                disk.transport.update_config(|| disk.slot.lock().unwrap().detach()).map_err(|e| e.to_string())?;
            tracing::info!(id, index, "disk detached");
            return Ok(Reply::Detached(DiskInfo { stats, ..info }));
        }
        let attached: Vec<String> = self
            .disks
            .iter()
            .filter(|d| d.hotplug)
            .filter_map(|d| {
                let s = d.slot.lock().unwrap();
                s.is_attached().then(|| s.handler.id_str())
            })
            .collect();
        Err(format!("no attached disk has id {id:?} (attached: {attached:?})"))
    }
}

impl Control {
    fn attach_nic(&self, id: &str, file: Option<File>) -> Result<Reply, String> {
        check_id(id)?;
        let file = file.ok_or("attach-nic needs the tap's open file descriptor sent with the request (SCM_RIGHTS)")?;
        let tap = Tap::from_received(file)?;
        let _changes = self.changes.lock().unwrap();
        if self.nics.iter().any(|n| n.nic.lock().id.as_deref() == Some(id)) {
            return Err(format!("a NIC with id {id:?} is already attached: choose another id"));
        }
        let Some(index) = self.nics.iter().position(|n| n.hotplug && !n.nic.lock().is_attached()) else {
            let n = self.nics.iter().filter(|n| n.hotplug).count();
            return Err(format!("all {n} NIC slots are in use: detach a NIC, or start the VM with more --nic-slots"));
        };
        let dev = &self.nics[index];
        let tap_name = tap.name().to_string();
        // The link comes up in the config space the guest re-reads.
        dev.transport.update_config(|| dev.nic.attach(tap, id))?;
        tracing::info!(id, index, tap = tap_name, "NIC attached");
        Ok(Reply::NicAttached(nic_info(index, dev)))
    }

    fn detach_nic(&self, id: &str) -> Result<Reply, String> {
        check_id(id)?;
        let _changes = self.changes.lock().unwrap();
        let Some(index) = self.nics.iter().position(|n| n.nic.lock().id.as_deref() == Some(id)) else {
            let attached: Vec<String> = self.nics.iter().filter_map(|n| n.nic.lock().id.clone()).collect();
            return Err(format!("no attached NIC has id {id:?} (attached: {attached:?})"));
        };
        let dev = &self.nics[index];
        if !dev.hotplug {
            return Err(format!("{id:?} was given with --net: only NICs attached through this socket detach"));
        }
        let info = nic_info(index, dev);
        let (_, stats) = dev.transport.update_config(|| dev.nic.detach()).ok_or("the NIC went meanwhile")?;
        tracing::info!(id, index, "NIC detached");
        Ok(Reply::NicDetached(NicInfo { stats, ..info }))
    }
}

fn nic_info(index: usize, n: &NicDevice) -> NicInfo {
    let s = n.nic.lock();
    let m = n.mac;
    NicInfo {
        index,
        slot: n.hotplug,
        id: s.id.clone(),
        mac: format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]),
        link_up: s.is_attached(),
        stats: s.stats,
    }
}

fn disk_info(index: usize, d: &DiskDevice, s: &Slot) -> DiskInfo {
    DiskInfo {
        index,
        slot: d.hotplug,
        id: s.is_attached().then(|| s.handler.id_str()),
        read_only: s.handler.read_only,
        size_bytes: s.handler.sectors * SECTOR_SIZE,
        stats: s.handler.stats,
    }
}

/// A disk or NIC id (a disk's is the serial the guest reads): 1 to 20 bytes
/// of letters, digits, `.`, `_` and `-`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{id:?} is not an id: use 1 to 20 letters, digits, '.', '_' or '-'"))
    }
}

fn writable(file: &File) -> bool {
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_ACCMODE == libc::O_RDWR
}
