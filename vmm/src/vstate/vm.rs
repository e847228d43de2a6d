//! The KVM VM: guest memory registered as memory slots, the in-kernel
//! LAPIC/IOAPIC/PIC and PIT, and the TSS address KVM needs on Intel.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::arch::memory::guest_regions;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM could not {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("allocating {size_mib} MiB of guest memory failed: {reason}")]
    Memory { size_mib: u64, reason: String },
}

pub struct Vm {
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub memory_size: u64,
}

impl Vm {
    pub fn new(kvm: &Kvm, memory_size: u64) -> Result<Vm, Error> {
        let err = |what| move |source| Error::Kvm { what, source };
        let fd = kvm.create_vm().map_err(err("create a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(err("set the TSS address"))?;
        fd.create_irq_chip().map_err(err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(err("create the in-kernel PIT"))?;

        let memory = guest_memory(memory_size)?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| Error::Memory { size_mib: memory_size >> 20, reason: e.to_string() })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which
            // lives as long as the VM, and slots do not overlap.
            unsafe { fd.set_user_memory_region(r) }.map_err(err("register guest memory"))?;
        }
        Ok(Vm { fd, memory, memory_size })
    }
}

/// Guest RAM, backed by one memfd mapped shared: a vhost-user back-end
/// (virtiofsd) can then map the same memory, and the balloon can give pages
/// back to the host by punching holes in the file. Pages are only allocated
/// when the guest touches them.
pub fn guest_memory(memory_size: u64) -> Result<GuestMemoryMmap, Error> {
    let fail = |reason: String| Error::Memory { size_mib: memory_size >> 20, reason };
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hearth-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(fail(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fd is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(memory_size).map_err(|e| fail(format!("sizing the memfd: {e}")))?;
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (start, len) in guest_regions(memory_size) {
        let f = file.try_clone().map_err(|e| fail(e.to_string()))?;
        ranges.push((GuestAddress(start), len as usize, Some(FileOffset::new(f, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| fail(e.to_string()))
}
