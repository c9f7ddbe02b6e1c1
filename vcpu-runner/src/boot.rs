//! Direct boot of a Linux bzImage through the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): the kernel is loaded with `linux-loader`, and this module
//! writes the zero page (`boot_params` with the e820 map, command line and initrd), a GDT and
//! identity page tables for the first 4 GiB into guest RAM, and computes the boot vCPU's
//! registers (long mode, `rip` at the kernel's 64-bit entry, `rsi` at the zero page).
//!
//! The kernel and initrd files come from the supervisor but are user-chosen: anything that does
//! not parse, or does not fit the memory, is a [`BootError`] before a guest instruction runs.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::layout::{ECAM_SIZE, ECAM_START, MMIO_HOLE_END, MMIO_HOLE_START};
use crate::memory::{GuestMem, ram_ranges};

/// The GDT (boot protocol: `__BOOT_CS` 0x10 and `__BOOT_DS` 0x18, flat 4 GiB).
pub const GDT_START: u64 = 0x500;
/// The zero page.
pub const BOOT_PARAMS_START: u64 = 0x7000;
/// The boot stack grows down from here (below the page tables).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// PML4; the PDPT and four page directories follow it page by page.
pub const PML4_START: u64 = 0x9000;
/// Page-table pages: PML4, PDPT, four PDs of 2 MiB pages mapping 4 GiB.
pub const PAGE_TABLE_PAGES: u64 = 6;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// The end of usable conventional memory: the EBDA/BIOS area starts here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel's protected-mode part is loaded (and high memory starts).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// [`CMDLINE_START`] and [`HIGH_MEMORY_START`] as the setup header's 32-bit fields.
const CMDLINE_START_32: u32 = 0x20000;
const HIGH_MEMORY_START_32: u32 = 0x10_0000;
/// The setup code's heap end (offset from the real-mode segment), the customary value.
const HEAP_END: u16 = 0xfe00;
/// The 64-bit entry point's offset from the protected-mode kernel's load address.
const ENTRY_64_OFFSET: u64 = 0x200;
/// `boot_params.hdr.header`: `HdrS`.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot protocol version with `xloadflags` and the 64-bit entry (2.12).
const MIN_PROTOCOL_64: u16 = 0x020c;
/// `xloadflags`: the kernel has a 64-bit entry point at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1;
/// `loadflags`: the heap end pointer is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// `type_of_loader`: undefined boot loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// Default `initrd_addr_max` for boot protocols before 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x0000_8b00_0000_0067;
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// Why the guest cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel is not a bzImage ({0})")]
    NotBzImage(String),
    #[error("kernel boot protocol {0:#x} has no 64-bit entry point (needs 2.12 and XLF_KERNEL_64)")]
    No64BitEntry(u16),
    #[error("kernel command line of {len} bytes exceeds the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: u64 },
    #[error(
        "initrd of {size_mib} MiB does not fit below {ceiling:#x} above the kernel (ends at {lowest:#x}); give the guest more memory"
    )]
    InitrdTooLarge {
        size_mib: u64,
        ceiling: u64,
        lowest: u64,
    },
    #[error("reading the {what}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the {what} into guest RAM")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel does not fit in guest RAM")]
    KernelTooLarge,
}

/// What the boot vCPU needs once the guest image is in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSetup {
    /// The kernel's 64-bit entry point.
    pub entry: u64,
    /// The zero page, passed in `rsi`.
    pub boot_params: u64,
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map of a machine with `memory` bytes of RAM: conventional memory, the EBDA/BIOS
/// area (where the ACPI tables live), RAM from 1 MiB, the ECAM window, RAM above 4 GiB.
pub fn e820_map(memory: u64) -> Vec<E820> {
    let mut map = vec![
        E820 {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820 {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in ram_ranges(memory) {
        let start = r.guest.max(HIGH_MEMORY_START);
        if r.end() > start {
            map.push(E820 {
                addr: start,
                size: r.end() - start,
                kind: E820_RAM,
            });
        }
        if r.guest == 0 {
            // Between low RAM and high RAM: the ECAM window is the one part of the hole that
            // firmware would reserve (Linux checks MCFG against it).
            map.push(E820 {
                addr: ECAM_START,
                size: ECAM_SIZE,
                kind: E820_RESERVED,
            });
        }
    }
    map.sort_by_key(|e| e.addr);
    map
}

/// Where an initrd of `size` bytes goes: the highest 4 KiB-aligned address whose end is at or
/// below `ceiling` (`min(initrd_addr_max + 1, end of low RAM)`) and whose start is at or above
/// `lowest` (the end of the kernel's own footprint).
pub fn place_initrd(size: u64, lowest: u64, ceiling: u64) -> Result<u64, BootError> {
    let too_large = || BootError::InitrdTooLarge {
        size_mib: size.div_ceil(1 << 20),
        ceiling,
        lowest,
    };
    let start = ceiling.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < lowest {
        return Err(too_large());
    }
    Ok(start)
}

/// The PML4, PDPT and four page directories identity-mapping the first 4 GiB with 2 MiB pages,
/// as the bytes to write at `pml4`.
pub fn identity_page_tables(pml4: u64) -> Vec<u8> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pdpt = pml4 + 0x1000;
    let mut entries: Vec<u64> = Vec::with_capacity(512 * 6);
    entries.push(pdpt | PRESENT_RW);
    entries.resize(512, 0);
    entries.extend((1..=4u64).map(|pd| (pdpt + 0x1000 * pd) | PRESENT_RW));
    entries.resize(1024, 0);
    entries.extend((0..4 * 512u64).map(|page| (page << 21) | PRESENT_RW | HUGE));
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Loads the kernel (and initrd) and writes every boot structure; `rsdp` goes into the zero
/// page.
pub fn load_linux(
    mem: &GuestMem,
    memory: u64,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootSetup, BootError> {
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIGH_MEMORY_START))).map_err(
        |e| match e {
            linux_loader::loader::Error::Bzimage(inner) => BootError::NotBzImage(inner.to_string()),
            linux_loader::loader::Error::InvalidKernelStartAddress => {
                BootError::NotBzImage("its load address is below 1 MiB".into())
            }
            other => BootError::NotBzImage(other.to_string()),
        },
    )?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| BootError::NotBzImage("no setup header".into()))?;
    if hdr.header != HDRS_MAGIC {
        return Err(BootError::NotBzImage("no HdrS magic".into()));
    }
    if hdr.version < MIN_PROTOCOL_64 || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry(hdr.version));
    }

    let cmdline_max = hdr.cmdline_size;
    if u32::try_from(cmdline.len()).map_or(true, |len| len > cmdline_max.max(255)) {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: u64::from(cmdline_max),
        });
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    write(mem, CMDLINE_START, &cmdline_bytes, "command line")?;

    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END;
    hdr.cmd_line_ptr = CMDLINE_START_32;
    hdr.code32_start = HIGH_MEMORY_START_32;

    let kernel_end = loaded
        .kernel_load
        .raw_value()
        .saturating_add(loaded.kernel_end);
    let decompressed_end = hdr.pref_address.saturating_add(u64::from(hdr.init_size));
    let lowest = kernel_end.max(decompressed_end).next_multiple_of(0x1000);
    if lowest > memory.min(MMIO_HOLE_START) {
        return Err(BootError::KernelTooLarge);
    }
    if let Some(initrd) = initrd {
        let (start, size) = load_initrd(mem, memory, &hdr, initrd, lowest)?;
        hdr.ramdisk_image = start;
        hdr.ramdisk_size = size;
    }
    write_zero_page(mem, memory, hdr, rsdp)?;

    let gdt: Vec<u8> = [0, 0, GDT_CODE64, GDT_DATA, GDT_TSS]
        .iter()
        .flat_map(|e: &u64| e.to_le_bytes())
        .collect();
    write(mem, GDT_START, &gdt, "GDT")?;
    write(
        mem,
        PML4_START,
        &identity_page_tables(PML4_START),
        "page tables",
    )?;

    Ok(BootSetup {
        entry: loaded
            .kernel_load
            .raw_value()
            .saturating_add(ENTRY_64_OFFSET),
        boot_params: BOOT_PARAMS_START,
    })
}

/// Places the initrd above `lowest` and below the kernel's limit and the end of low RAM, and
/// reads it there; returns its address and size for the setup header.
fn load_initrd(
    mem: &GuestMem,
    memory: u64,
    hdr: &setup_header,
    initrd: &mut File,
    lowest: u64,
) -> Result<(u32, u32), BootError> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .and_then(|size| initrd.seek(SeekFrom::Start(0)).map(|_| size))
        .map_err(|source| BootError::Read {
            what: "initrd",
            source,
        })?;
    let addr_max = if hdr.version >= 0x0203 && hdr.initrd_addr_max != 0 {
        u64::from(hdr.initrd_addr_max)
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    let ceiling = addr_max.saturating_add(1).min(memory.min(MMIO_HOLE_START));
    let start = place_initrd(size, lowest, ceiling)?;
    // Both are below the ceiling, itself below 4 GiB: they fit the 32-bit header fields.
    let too_large = || BootError::InitrdTooLarge {
        size_mib: size >> 20,
        ceiling,
        lowest,
    };
    let start32 = u32::try_from(start).map_err(|_| too_large())?;
    let size32 = u32::try_from(size).map_err(|_| too_large())?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(start), initrd, len)
        .map_err(|source| BootError::GuestWrite {
            what: "initrd",
            source,
        })?;
    Ok((start32, size32))
}

/// Writes `boot_params` with `hdr`, the e820 map of `memory` bytes and the RSDP address.
fn write_zero_page(
    mem: &GuestMem,
    memory: u64,
    hdr: setup_header,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let map = e820_map(memory);
    let mut count: u8 = 0;
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
        count = count.saturating_add(1);
    }
    params.e820_entries = count;
    mem.write_obj(params, GuestAddress(BOOT_PARAMS_START))
        .map_err(|source| BootError::GuestWrite {
            what: "zero page",
            source,
        })
}

fn write(mem: &GuestMem, addr: u64, bytes: &[u8], what: &'static str) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, source })
}

/// The boot vCPU's general registers.
pub fn boot_regs(setup: &BootSetup) -> kvm_regs {
    kvm_regs {
        rip: setup.entry,
        rsi: setup.boot_params,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Decodes a GDT entry into KVM's segment form.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0xf_0000)).unwrap_or(0);
    let g = bit(55);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` (as read from the vCPU) into 64-bit long mode with paging on the identity
/// tables and the boot GDT's segments.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(GDT_CODE64, BOOT_CS);
    let data = segment(GDT_DATA, BOOT_DS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS, BOOT_TSS);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The FPU state of a freshly reset x87/SSE unit.
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The first byte above the 4 GiB boundary that is not RAM: where 64-bit BARs may go.
pub fn ram_top(memory: u64) -> u64 {
    ram_ranges(memory)
        .last()
        .map_or(MMIO_HOLE_END, |r| r.end().max(MMIO_HOLE_END))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_of_small_memory_has_conventional_bios_and_high_ram() {
        let map = e820_map(512 << 20);
        assert_eq!(
            map,
            vec![
                E820 {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820 {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                E820 {
                    addr: 0x10_0000,
                    size: (512 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
                E820 {
                    addr: ECAM_START,
                    size: ECAM_SIZE,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn e820_of_large_memory_continues_above_four_gib() {
        let map = e820_map(6 << 30);
        let last = map.last().unwrap();
        assert_eq!(
            (last.addr, last.size, last.kind),
            (4 << 30, 3 << 30, E820_RAM)
        );
        let low = map.iter().find(|e| e.addr == HIGH_MEMORY_START).unwrap();
        assert_eq!(low.size, (3 << 30) - HIGH_MEMORY_START);
    }

    #[test]
    fn initrd_goes_to_the_highest_aligned_address_that_fits() {
        assert_eq!(
            place_initrd(0x1800, 0x100_0000, 0x2000_0000).unwrap(),
            0x1fff_e000
        );
        assert_eq!(
            place_initrd(0x1000, 0x100_0000, 0x2000_0000).unwrap(),
            0x1fff_f000
        );
    }

    #[test]
    fn an_initrd_too_large_for_memory_is_refused_with_its_size() {
        let err = place_initrd(600 << 20, 0x200_0000, 512 << 20).unwrap_err();
        assert!(
            err.to_string().contains("initrd of 600 MiB does not fit"),
            "{err}"
        );
        assert!(place_initrd(u64::MAX, 0, 512 << 20).is_err());
    }

    #[test]
    fn page_tables_identity_map_four_gib_with_2m_pages() {
        let bytes = identity_page_tables(PML4_START);
        let entry = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(bytes.len(), 6 * 4096);
        assert_eq!(entry(0), 0xa003);
        assert_eq!(entry(512), 0xb003);
        assert_eq!(entry(515), 0xe003);
        assert_eq!(entry(516), 0);
        assert_eq!(entry(1024), 0x83);
        assert_eq!(entry(1025), 0x20_0083);
        assert_eq!(entry(1024 + 4 * 512 - 1), 0xffe0_0083);
    }

    #[test]
    fn boot_segments_are_flat_long_mode_code_and_data() {
        let cs = segment(GDT_CODE64, BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.type_, cs.present, cs.s), (1, 0, 0xb, 1, 1));
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let ds = segment(GDT_DATA, BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_, ds.g), (0, 1, 3, 1));
        let sregs = long_mode_sregs(kvm_sregs::default());
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(sregs.cr3, PML4_START);
    }

    #[test]
    fn a_file_that_is_not_a_bzimage_is_refused() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let path = std::env::temp_dir().join(format!("not-bzimage-{}", std::process::id()));
        std::fs::write(&path, vec![0x7fu8; 8192]).unwrap();
        let mut file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = load_linux(&mem, 64 << 20, &mut file, None, "console=ttyS0", 0).unwrap_err();
        assert!(matches!(err, BootError::NotBzImage(_)), "{err}");
    }
}
