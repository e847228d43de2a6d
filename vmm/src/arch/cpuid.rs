//! The CPUID each vCPU sees: KVM's supported set, with the topology leaves
//! patched so that every vCPU reports its own APIC id and the hypervisor bit
//! set (which is what lets the guest find kvmclock and the PV features).

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Patches `cpuid` (KVM's supported set) for vCPU `cpu_id` of `cpu_count`.
/// `tsc_deadline`: KVM emulates the LAPIC's TSC-deadline mode
/// (KVM_CAP_TSC_DEADLINE_TIMER) but leaves it out of the supported set; with
/// it, the guest needs no LAPIC timer calibration, which fails under
/// emulation and leaves every CPU ticking from the PIT by broadcast IPIs.
pub fn patch_for_vcpu(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8, tsc_deadline: bool) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors.
                entry.ebx = (entry.ebx & 0x0000_ffff) | ((cpu_id as u32) << 24) | ((cpu_count as u32) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => entry.edx = cpu_id as u32,
            LEAF_AMD_EXT_APIC_ID => entry.eax = cpu_id as u32,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_0800, edx: 0, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, edx: 0, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x8000_001e, eax: 0, ..Default::default() },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        patch_for_vcpu(&mut cpuid, 3, 4, true);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].eax, 3);
    }
}
