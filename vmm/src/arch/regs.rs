//! Register state of the boot vCPU for the two entry paths, FPU state, the
//! identity page tables of the 64-bit path, and the LAPIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{self, GDT_32, GDT_64};
use super::layout::*;

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `%rsi` = zero page.
    Linux64(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM rejected the vCPU's {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("writing the boot {0} into guest memory failed")]
    GuestMemory(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Sets the general-purpose registers, the special registers (writing the GDT
/// and, for the 64-bit path, the page tables into guest memory) of the boot vCPU.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<(), Error> {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        EntryPoint::Pvh(rip) => {
            regs.rip = rip;
            regs.rbx = PVH_INFO_START;
        }
        EntryPoint::Linux64(rip) => {
            regs.rip = rip;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm("general registers"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let table: &[u64] = match entry {
        EntryPoint::Pvh(_) => &GDT_32,
        EntryPoint::Linux64(_) => &GDT_64,
    };
    write_gdt(mem, table, &mut sregs)?;
    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
        }
        EntryPoint::Linux64(_) => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

fn write_gdt(mem: &GuestMemoryMmap, table: &[u64], sregs: &mut kvm_sregs) -> Result<(), Error> {
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64)).map_err(|_| Error::GuestMemory("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START)).map_err(|_| Error::GuestMemory("IDT"))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    let code = gdt::kvm_segment(table, 1);
    let data = gdt::kvm_segment(table, 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::kvm_segment(table, 3);
    Ok(())
}

/// Maps the first GiB 1:1 with 2 MiB pages: enough for the kernel, the zero
/// page and the command line until the kernel builds its own tables.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let err = |_| Error::GuestMemory("page tables");
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START)).map_err(err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START)).map_err(err)?;
    for i in 0..512u64 {
        // present | writable | page size (2 MiB)
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8)).map_err(err)?;
    }
    Ok(())
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Wires LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI, as firmware does,
/// matching the MP table's local interrupt entries.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_tables_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_identity_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte & !0xfff, PDE_START);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn gdt_lands_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        write_gdt(&mem, &GDT_64, &mut sregs).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(code, GDT_64[1]);
        assert_eq!((sregs.gdt.limit, sregs.cs.selector, sregs.tr.selector), (31, 8, 0x18));
    }
}
