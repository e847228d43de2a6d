//! x86_64 specifics of the guest: where things live in guest physical memory,
//! the MP table that announces the vCPUs, the GDT and page tables of the boot
//! vCPU, and the CPUID/MSR values every vCPU starts with.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod msr;
pub mod regs;
