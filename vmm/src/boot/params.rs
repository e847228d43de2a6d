//! Boot parameters: the Linux zero page (`struct boot_params` with its e820
//! map) and the PVH `hvm_start_info` with its memory map and module list.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::{linux::LinuxBootConfigurator, pvh::PvhBootConfigurator};
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::Initramfs;
use crate::arch::layout::*;
use crate::arch::memory::ram_map;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initramfs: Option<Initramfs>,
) -> Result<(), String> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initramfs {
        params.hdr.ramdisk_image = i.address as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = ram_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(format!("{} e820 entries do not fit in the zero page", map.len()));
    }
    for (slot, r) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: r.start, size: r.size, r#type: E820_RAM };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| e.to_string())
}

pub fn write_pvh(mem: &GuestMemoryMmap, mem_size: u64, initramfs: Option<Initramfs>) -> Result<(), String> {
    let memmap: Vec<hvm_memmap_table_entry> = ram_map(mem_size)
        .iter()
        .map(|r| hvm_memmap_table_entry { addr: r.start, size: r.size, type_: E820_RAM, reserved: 0 })
        .collect();
    if memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(format!("{} PVH memory map entries do not fit", memmap.len()));
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some(i) = initramfs {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry { paddr: i.address, size: i.size, ..Default::default() };
        boot.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    boot.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let size = 256u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let initrd = Initramfs { address: 0x0f00_0000, size: 1234 };
        write_zero_page(&mem, size, None, 42, Some(initrd)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0x0f00_0000, 1234));
        assert_eq!(p.e820_entries, 2);
        let last = p.e820_table[1];
        assert_eq!(({ last.addr }, { last.size }), (HIMEM_START, size - HIMEM_START));
    }

    #[test]
    fn pvh_start_info_has_magic_memmap_and_module() {
        let size = 128u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write_pvh(&mem, size, Some(Initramfs { address: 0x700_0000, size: 99 })).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!((info.nr_modules, info.memmap_entries), (1, 2));
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((m.paddr, m.size), (0x700_0000, 99));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.size, e.type_), (HIMEM_START, size - HIMEM_START, E820_RAM));
    }
}
