//! Segment descriptors for entering the kernel, and their translation into
//! the `kvm_segment` form KVM wants in the special registers.

use kvm_bindings::kvm_segment;

/// Builds a descriptor from its flags (access byte plus the upper nibble of
/// granularity/size flags, as the kernel's GDT_ENTRY macro), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The flat 64-bit GDT: null, code (L=1), data, TSS.
pub const GDT_64: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// The flat 32-bit GDT for PVH entry (protected mode, paging off).
pub const GDT_32: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xc09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)];

/// Translates GDT entry `index` of `table` into a `kvm_segment`.
pub fn kvm_segment(table: &[u64], index: u16) -> kvm_segment {
    let e = table[index as usize];
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | (((e >> 56) & 0xff) << 24),
        // KVM takes the limit in bytes: scale page-granular limits.
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: if present == 0 { 1 } else { 0 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode_flat() {
        let cs = kvm_segment(&GDT_64, 1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!((cs.type_, cs.present, cs.dpl, cs.s, cs.l, cs.db, cs.g), (0xb, 1, 0, 1, 1, 0, 1));
    }

    #[test]
    fn code32_and_tss_segments() {
        let cs = kvm_segment(&GDT_32, 1);
        assert_eq!((cs.l, cs.db, cs.limit), (0, 1, 0xffff_ffff));
        let tss = kvm_segment(&GDT_32, 3);
        assert_eq!((tss.type_, tss.s, tss.limit, tss.selector), (0xb, 0, 0x67, 0x18));
        let null = kvm_segment(&GDT_32, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn base_bits_round_trip() {
        let e = gdt_entry(0xc093, 0x1234_5678, 0xabcde);
        let s = kvm_segment(&[e], 0);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
    }
}
