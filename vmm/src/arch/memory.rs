//! Guest RAM regions and the memory map handed to the kernel (e820 for the
//! Linux boot protocol, the PVH memory map for PVH).

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Smallest guest the tuned kernel plus an initramfs can boot in.
pub const MIN_MEMORY_MIB: u64 = 64;

/// One range of guest physical memory the kernel may use as RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
}

/// The host mappings backing guest memory: one contiguous region from 0, and
/// a second one above 4 GiB when the guest is bigger than the MMIO gap allows.
pub fn guest_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

/// What the kernel is told is RAM: the guest regions minus the legacy area
/// between the end of base memory and 1 MiB (where the MP table lives).
pub fn ram_map(mem_size: u64) -> Vec<RamRange> {
    let mut map = vec![RamRange { start: 0, size: EBDA_START }];
    for (start, size) in guest_regions(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START { size } else { start + size };
        if end > start {
            map.push(RamRange { start, size: end - start });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_skips_legacy_hole() {
        let mib = 1 << 20;
        assert_eq!(guest_regions(256 * mib), vec![(0, 256 * mib)]);
        assert_eq!(
            ram_map(256 * mib),
            vec![
                RamRange { start: 0, size: EBDA_START },
                RamRange { start: HIMEM_START, size: 256 * mib - HIMEM_START },
            ]
        );
    }

    #[test]
    fn big_guest_is_split_around_the_mmio_gap() {
        let gib = 1u64 << 30;
        let regions = guest_regions(8 * gib);
        assert_eq!(regions, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 8 * gib - MMIO_GAP_START)]);
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 8 * gib);
        let map = ram_map(8 * gib);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1], RamRange { start: HIMEM_START, size: MMIO_GAP_START - HIMEM_START });
        assert_eq!(map[2].start, MMIO_GAP_END);
        for r in &map {
            assert!(r.start + r.size <= MMIO_GAP_START || r.start >= MMIO_GAP_END);
        }
    }
}
