//! The Intel MultiProcessor Specification 1.4 table. Without ACPI, this is
//! how the kernel learns how many CPUs there are, where the IOAPIC is, and how
//! ISA interrupts are wired to it. The table is built as bytes (every field is
//! little-endian and packed), then checksummed and written at the end of base
//! memory, where the kernel scans for the floating pointer.

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};

/// Interrupt lines routed through the IOAPIC (KVM's IOAPIC has 24 pins).
const IOAPIC_PINS: u8 = 24;
/// The kernel of the guest is built with NR_CPUS=64.
pub const MAX_CPUS: u8 = 64;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
// Family 6 signature and the FPU + APIC feature bits, as real firmware reports.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0} vCPUs requested: the MP table and the guest kernel support 1 to {MAX_CPUS}")]
    TooManyCpus(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, to be
/// written at [`mptable_address`].
pub fn build(num_cpus: u8) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }
    let base = mptable_address() as u32;
    let ioapic_id = num_cpus; // APIC ids 0..num_cpus belong to the CPUs.

    let mut table = Vec::new();
    // Configuration table header (44 bytes); length and checksum patched below.
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&0u16.to_le_bytes()); // length
    table.push(4); // spec revision 1.4
    table.push(0); // checksum
    table.extend_from_slice(b"HEARTH  "); // OEM id
    table.extend_from_slice(b"UTILITY VM  "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&0u16.to_le_bytes()); // entry count, patched
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // reserved
    let mut entries: u16 = 0;

    for cpu in 0..num_cpus {
        table.push(ENTRY_PROCESSOR);
        table.push(cpu); // local APIC id
        table.push(APIC_VERSION);
        table.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        table.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        table.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        table.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    table.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    table.extend_from_slice(b"ISA   ");
    entries += 1;
    table.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    table.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries += 1;
    // ISA IRQ n is IOAPIC pin n, matching KVM's default GSI routing.
    for irq in 0..IOAPIC_PINS {
        table.extend_from_slice(&[ENTRY_INTSRC, IRQ_TYPE_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        entries += 1;
    }
    // The legacy PIC reaches LINT0 of every CPU as ExtINT, NMIs reach LINT1.
    table.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    table.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    entries += 2;

    let len = table.len() as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[34..36].copy_from_slice(&entries.to_le_bytes());
    table[7] = checksum(&table);

    // Floating pointer structure (16 bytes), pointing right behind itself.
    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(base + 16).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision 1.4
    out.push(0); // checksum
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table follows
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Guest physical address of the floating pointer.
pub fn mptable_address() -> u64 {
    EBDA_START
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        for cpus in [1u8, 2, 7, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, mptable_address() + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as usize;
            assert_eq!(count, cpus as usize + 1 + 1 + IOAPIC_PINS as usize + 2);
            let processors = table[44..].chunks(20).take(cpus as usize);
            for (i, p) in processors.enumerate() {
                assert_eq!(p[0], ENTRY_PROCESSOR);
                assert_eq!(p[1], i as u8);
                assert_eq!(p[3] & CPU_BOOTPROCESSOR != 0, i == 0);
            }
        }
    }

    #[test]
    fn rejects_impossible_cpu_counts() {
        assert_eq!(build(0), Err(Error::TooManyCpus(0)));
        assert_eq!(build(MAX_CPUS + 1), Err(Error::TooManyCpus(MAX_CPUS + 1)));
    }
}
