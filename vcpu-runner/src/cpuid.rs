//! Per-vCPU CPUID: KVM's supported CPUID with this vCPU's APIC id and the machine's topology
//! (one package, `cpus` cores, one thread each), so every vCPU the MADT lists is also
//! consistent in CPUID. The KVM paravirtual leaves (`0x4000_0000` signature, `0x4000_0001`
//! features such as `KVM_FEATURE_CLOCKSOURCE2`) are kept, so the guest uses kvmclock.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the logical processor count in `EBX[23:16]` is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf `0x8000_0001` ECX: `CmpLegacy` (AMD: cores are reported through `0x8000_0008`).
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Extended topology level types (leaf 0xB / 0x1F `ECX[15:8]`).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Whether the host CPUID says AMD (`AuthenticAMD` in leaf 0).
pub fn is_amd(cpuid: &CpuId) -> bool {
    cpuid.as_slice().iter().any(|e| {
        e.function == 0 && e.ebx == 0x6874_7541 && e.edx == 0x6974_6e65 && e.ecx == 0x444d_4163
    })
}

/// Bits needed to number `cpus` cores (the APIC id shift of the package level).
fn core_bits(cpus: u32) -> u32 {
    cpus.max(1).next_power_of_two().trailing_zeros()
}

/// Edits `cpuid` for vCPU `vcpu` (its APIC id) of a `cpus`-vCPU machine.
pub fn set_topology(cpuid: &mut CpuId, vcpu: u32, cpus: u32) {
    let amd = is_amd(cpuid);
    let bits = core_bits(cpus);
    for e in cpuid.as_mut_slice() {
        edit_entry(e, vcpu, cpus, bits, amd);
    }
}

fn edit_entry(e: &mut kvm_cpuid_entry2, vcpu: u32, cpus: u32, bits: u32, amd: bool) {
    let apic_id = vcpu;
    match e.function {
        0x1 => {
            e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((cpus & 0xff) << 16);
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            if cpus > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 if !amd => {
            // Intel deterministic cache parameters: EAX[31:26] = cores per package - 1,
            // EAX[25:14] = threads sharing this cache - 1 (all cores share the L3 and up).
            let cores = (1u32 << bits) - 1;
            let cache_level = (e.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { cores } else { 0 };
            e.eax = (e.eax & 0x3fff) | (cores << 26) | (sharing << 14);
        }
        0xb | 0x1f => {
            // Extended topology: level 0 SMT (one thread), level 1 core (`cpus`), then none.
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = bits;
                    e.ebx = cpus;
                    e.ecx = (LEVEL_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        0x8000_0001 if amd => {
            if cpus > 1 {
                e.ecx |= EXT1_ECX_CMP_LEGACY;
            } else {
                e.ecx &= !EXT1_ECX_CMP_LEGACY;
            }
        }
        0x8000_0008 if amd => {
            // ECX[15:12] ApicIdCoreIdSize, ECX[7:0] NC = cores - 1.
            e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (cpus.saturating_sub(1) & 0xff);
        }
        0x8000_001e if amd => {
            // Extended APIC id, core id with one thread per core, node 0.
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn amd_cpuid() -> CpuId {
        let mut vendor = entry(0, 0);
        vendor.ebx = 0x6874_7541;
        vendor.edx = 0x6974_6e65;
        vendor.ecx = 0x444d_4163;
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0xff00_0800;
        let mut kvm = entry(0x4000_0001, 0);
        kvm.eax = 1 << 3;
        CpuId::from_entries(&[
            vendor,
            leaf1,
            entry(0xb, 0),
            entry(0xb, 1),
            kvm,
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_core_count() {
        let mut c = amd_cpuid();
        assert!(is_amd(&c));
        set_topology(&mut c, 2, 3);
        let leaf1 = find(&c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 3);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "brand and clflush size kept");
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 3, LEVEL_CORE, 2)
        );
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.ebx, smt.ecx >> 8), (1, LEVEL_SMT));
    }

    #[test]
    fn amd_leaves_report_cores_per_package() {
        let mut c = amd_cpuid();
        set_topology(&mut c, 1, 4);
        let ext8 = find(&c, 0x8000_0008, 0);
        assert_eq!(ext8.ecx & 0xff, 3);
        assert_eq!((ext8.ecx >> 12) & 0xf, 2);
        assert_eq!(find(&c, 0x8000_001e, 0).eax, 1);
    }

    #[test]
    fn kvm_leaves_are_kept() {
        let mut c = amd_cpuid();
        set_topology(&mut c, 0, 1);
        assert_eq!(find(&c, 0x4000_0001, 0).eax, 1 << 3);
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }
}
