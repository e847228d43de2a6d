//! The guest physical memory layout. Low memory below 1 MiB holds the boot
//! structures; the kernel loads at 1 MiB; a 32-bit MMIO gap below 4 GiB is kept
//! free for the IOAPIC, the LAPIC and (later) virtio-mmio devices.

/// Global descriptor table used while entering the kernel.
pub const GDT_START: u64 = 0x500;
/// An empty interrupt descriptor table (the kernel installs its own at once).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, its module list and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU on the 64-bit entry path.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables (1 GiB in 2 MiB pages) for the 64-bit entry path.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86's COMMAND_LINE_SIZE: the kernel truncates anything longer.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Usable base memory ends here; the MP table starts here (the kernel scans
/// the last KiB of base memory for it).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded and where high memory begins.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: guest RAM never overlaps it.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Default addresses of the IOAPIC and the LAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel; placed just below the BIOS area.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
