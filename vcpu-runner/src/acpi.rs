//! The ACPI tables the guest finds through `boot_params.acpi_rsdp_addr`: RSDP → XSDT → FADT
//! (with FACS and DSDT), MADT, MCFG. Built as bytes here (pure, unit-tested) and copied into the
//! reserved BIOS area of guest RAM by the caller.
//!
//! What the guest sees: every vCPU as a local APIC, the in-kernel IOAPIC, the PC's legacy
//! interrupt overrides (IRQ0 on GSI2, the SCI level-triggered), a PCI Express root bridge with
//! its ECAM window, COM1, the RTC, a fixed-feature power button, the ACPI PM registers and the
//! `\_S5` sleep type that powers the machine off.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use crate::layout::{
    ACPI_PM_BASE, ACPI_PM_LEN, ACPI_PM_TMR_PORT, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT,
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SCI_GSI, ACPI_SLP_TYP_S5, CMOS_PORT, COM1_GSI,
    COM1_PORT, ECAM_SIZE, ECAM_START, IOAPIC_START, LAPIC_START, PCI_MMIO32_START, RTC_GSI,
};

/// Where the tables go: the BIOS area that the e820 map reserves (RSDP first, 16-aligned, so
/// a legacy scan of 0xE0000..0xFFFFF would find it too).
pub const ACPI_START: u64 = 0xE_0000;
/// The end of the area the tables may use.
pub const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"CAPVM ";
const OEM_TABLE_ID: [u8; 8] = *b"CAPVMTBL";
const OEM_REVISION: u32 = 1;

/// The 64-bit PCI window's size, from the first GiB boundary above RAM.
const MMIO64_SIZE: u64 = 64 << 30;

/// The tables as one blob to write at [`ACPI_START`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
    /// The bytes of every table, laid out from [`ACPI_START`].
    pub blob: Vec<u8>,
}

/// Why the tables could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiError {
    #[error("{cpus} vCPUs do not fit the MADT's 8-bit APIC ids")]
    TooManyCpus { cpus: u32 },
    #[error("the ACPI tables ({len} bytes) overflow the BIOS area")]
    TooLarge { len: usize },
}

/// Builds the tables for `cpus` vCPUs (APIC ids 0..cpus) and RAM ending at `ram_top` (the
/// first address above the highest RAM byte, at least 4 GiB).
pub fn build(cpus: u32, ram_top: u64) -> Result<AcpiTables, AcpiError> {
    let cpu_count = u8::try_from(cpus)
        .ok()
        .filter(|&c| c < u8::MAX)
        .ok_or(AcpiError::TooManyCpus { cpus })?;
    let mut blob = Blob::default();
    let rsdp_at = blob.reserve(Rsdp::len(), 16);

    let facs_at = blob.push(&FACS::new(), 64);
    let dsdt_at = blob.push(&dsdt(ram_top), 16);
    let fadt_at = blob.push(&fadt(facs_at, dsdt_at), 16);
    let madt_at = blob.push(&madt(cpu_count), 16);
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(ECAM_START, 0, 0, 0);
    let mcfg_at = blob.push(&mcfg, 16);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in [fadt_at, madt_at, mcfg_at] {
        xsdt.add_entry(table);
    }
    let xsdt_at = blob.push(&xsdt, 16);
    blob.fill(rsdp_at, &Rsdp::new(OEM_ID, xsdt_at));

    if ACPI_START + blob.bytes.len() as u64 > ACPI_END {
        return Err(AcpiError::TooLarge {
            len: blob.bytes.len(),
        });
    }
    Ok(AcpiTables {
        rsdp: rsdp_at,
        blob: blob.bytes,
    })
}

#[derive(Default)]
struct Blob {
    bytes: Vec<u8>,
}

impl Blob {
    /// Appends `len` zero bytes at `align`; returns their guest address.
    fn reserve(&mut self, len: usize, align: usize) -> u64 {
        let at = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(at + len, 0);
        ACPI_START.saturating_add(u64::try_from(at).unwrap_or(u64::MAX))
    }

    fn push(&mut self, table: &dyn Aml, align: usize) -> u64 {
        let mut bytes = Vec::new();
        table.to_aml_bytes(&mut bytes);
        let at = self.reserve(bytes.len(), align);
        self.fill(at, table);
        at
    }

    fn fill(&mut self, at: u64, table: &dyn Aml) {
        let mut bytes = Vec::new();
        table.to_aml_bytes(&mut bytes);
        let start = usize::try_from(at.saturating_sub(ACPI_START)).unwrap_or(usize::MAX);
        if let Some(dst) = self.bytes.get_mut(start..start.saturating_add(bytes.len())) {
            dst.copy_from_slice(&bytes);
        }
    }
}

/// A fixed-layout address below 4 GiB as the 32-bit field it goes into.
fn addr32(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

/// AML already serialized, so a parent can hold it without borrowing its parts.
struct Raw(Vec<u8>);

impl Raw {
    fn of(aml: &dyn Aml) -> Raw {
        let mut bytes = Vec::new();
        aml.to_aml_bytes(&mut bytes);
        Raw(bytes)
    }
}

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

fn fadt(facs: u64, dsdt: u64) -> acpi_tables::fadt::FADT {
    // IA-PC boot architecture flags: legacy devices (the RTC, COM1) and an 8042.
    const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
    const IAPC_8042: u16 = 1 << 1;
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_64(facs)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::FixRtc)
        .flag(Flags::ResetRegSup);
    // No SMI_CMD: the platform is always in ACPI mode. PWR_BUTTON is clear: the power button
    // is the fixed-feature one in PM1 (PWRBTN_STS/EN).
    f.sci_int = u16::try_from(ACPI_SCI_GSI).unwrap_or(0).into();
    f.pm1a_evt_blk = u32::from(ACPI_PM1_EVT_PORT).into();
    f.pm1a_cnt_blk = u32::from(ACPI_PM1_CNT_PORT).into();
    f.pm_tmr_blk = u32::from(ACPI_PM_TMR_PORT).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.x_pm1a_evt_blk = io_gas(ACPI_PM1_EVT_PORT, 32, AccessSize::WordAccess);
    f.x_pm1a_cnt_blk = io_gas(ACPI_PM1_CNT_PORT, 16, AccessSize::WordAccess);
    f.x_pm_tmr_blk = io_gas(ACPI_PM_TMR_PORT, 32, AccessSize::DwordAccess);
    f.reset_reg = io_gas(ACPI_RESET_PORT, 8, AccessSize::ByteAccess);
    f.reset_value = ACPI_RESET_VALUE;
    f.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042).into();
    f.finalize()
}

/// MADT (ACPI 6.5 §5.2.12): local APIC address, `PCAT_COMPAT` (there are 8259s too), one
/// processor local APIC per vCPU, the IOAPIC, interrupt source overrides and LINT1 as NMI.
fn madt(cpus: u8) -> Sdt {
    const HEADER_LEN: u32 = 44;
    const PCAT_COMPAT: u32 = 1;
    const ENABLED: u32 = 1;
    const ISO_ACTIVE_HIGH_LEVEL: u16 = 0x1 | (0x3 << 2);
    let mut t = Sdt::new(*b"APIC", HEADER_LEN, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, addr32(LAPIC_START));
    t.write_u32(40, PCAT_COMPAT);
    let mut e: Vec<u8> = Vec::new();
    for id in 0..cpus {
        // Type 0, length 8: processor UID, APIC id, flags.
        e.extend([0, 8, id, id]);
        e.extend(ENABLED.to_le_bytes());
    }
    // Type 1, length 12: IOAPIC id 0, its address, GSI base 0.
    e.extend([1, 12, 0, 0]);
    e.extend(addr32(IOAPIC_START).to_le_bytes());
    e.extend(0u32.to_le_bytes());
    // Type 2, length 10: ISA IRQ 0 (the PIT) arrives on GSI 2; the SCI is level, active high.
    for (irq, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (
            u8::try_from(ACPI_SCI_GSI).unwrap_or(u8::MAX),
            ACPI_SCI_GSI,
            ISO_ACTIVE_HIGH_LEVEL,
        ),
    ] {
        e.extend([2, 10, 0, irq]);
        e.extend(gsi.to_le_bytes());
        e.extend(flags.to_le_bytes());
    }
    // Type 4, length 6: every processor's (0xff) LINT1 is the NMI input.
    e.extend([4, 6, 0xff, 0, 0, 1]);
    t.append_slice(&e);
    t
}

fn dsdt(ram_top: u64) -> Sdt {
    let mmio64_start = ram_top.next_multiple_of(1 << 30);
    let mmio64_end = mmio64_start + MMIO64_SIZE - 1;

    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        addr32(PCI_MMIO32_START),
        addr32(ECAM_START - 1),
        None,
    );
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_end,
        None,
    );
    let pci_crs =
        aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mmio32, &mmio64]);
    let pci_hid = aml::EISAName::new("PNP0A08");
    let pci_cid = aml::EISAName::new("PNP0A03");

    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");

    let rtc_io = aml::IO::new(CMOS_PORT, CMOS_PORT, 1, 2);
    let rtc_irq = aml::Interrupt::new(true, true, false, false, RTC_GSI);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_hid = aml::EISAName::new("PNP0B00");

    // Motherboard resources: the ECAM window and the ACPI PM block, so the guest trusts MCFG
    // and leaves those ports alone.
    let ecam = aml::Memory32Fixed::new(false, addr32(ECAM_START), addr32(ECAM_SIZE));
    let pm_io = aml::IO::new(
        ACPI_PM_BASE,
        ACPI_PM_BASE,
        1,
        u8::try_from(ACPI_PM_LEN).unwrap_or(u8::MAX),
    );
    let mres_crs = aml::ResourceTemplate::new(vec![&ecam, &pm_io]);
    let mres_hid = aml::EISAName::new("PNP0C02");

    let zero = aml::ZERO;
    let com1 = Raw::of(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    ));
    let rtc = Raw::of(&aml::Device::new(
        "RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &rtc_hid),
            &aml::Name::new("_CRS".into(), &rtc_crs),
        ],
    ));
    let mres = Raw::of(&aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &mres_hid),
            &aml::Name::new("_CRS".into(), &mres_crs),
        ],
    ));
    let pci0 = Raw::of(&aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &pci_hid),
            &aml::Name::new("_CID".into(), &pci_cid),
            &aml::Name::new("_ADR".into(), &zero),
            &aml::Name::new("_SEG".into(), &zero),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_BBN".into(), &zero),
            &aml::Name::new("_CRS".into(), &pci_crs),
            &com1,
            &rtc,
        ],
    ));
    let sb = aml::Scope::new("\\_SB_".into(), vec![&pci0, &mres]);
    let s5_typ = ACPI_SLP_TYP_S5;
    let s5_pkg = aml::Package::new(vec![&s5_typ, &s5_typ, &zero, &zero]);
    let s5 = aml::Name::new("\\_S5_".into(), &s5_pkg);

    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    t.append_slice(&body);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(tables: &AcpiTables, addr: u64) -> &[u8] {
        let off = usize::try_from(addr - ACPI_START).unwrap();
        let len = u32::from_le_bytes(tables.blob[off + 4..off + 8].try_into().unwrap()) as usize;
        &tables.blob[off..off + len]
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u64_at(bytes: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn rsdp_leads_through_xsdt_to_checksummed_fadt_madt_and_mcfg() {
        let t = build(2, 4 << 30).unwrap();
        assert_eq!(t.rsdp, ACPI_START);
        let rsdp = &t.blob[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt = table_at(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let sigs: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|o| {
                let table = table_at(&t, u64_at(xsdt, o));
                assert_eq!(sum(table), 0, "checksum of {:?}", &table[..4]);
                &table[..4]
            })
            .collect();
        assert_eq!(sigs, vec![b"FACP", b"APIC", b"MCFG"]);
    }

    #[test]
    fn fadt_names_the_pm_block_sci_reset_register_and_dsdt() {
        let t = build(1, 4 << 30).unwrap();
        let xsdt = table_at(&t, u64_at(&t.blob, 24));
        let fadt = table_at(&t, u64_at(xsdt, 36));
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
        assert_eq!(
            u32::from_le_bytes(fadt[48..52].try_into().unwrap()),
            0,
            "SMI_CMD"
        );
        assert_eq!(
            u32::from_le_bytes(fadt[56..60].try_into().unwrap()),
            0x600,
            "PM1a_EVT"
        );
        assert_eq!(
            u32::from_le_bytes(fadt[64..68].try_into().unwrap()),
            0x604,
            "PM1a_CNT"
        );
        assert_eq!(
            u32::from_le_bytes(fadt[76..80].try_into().unwrap()),
            0x608,
            "PM_TMR"
        );
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(
            flags & (1 << 4),
            0,
            "PWR_BUTTON clear: fixed-feature button"
        );
        assert_eq!(fadt[116], 1, "RESET_REG in I/O space");
        assert_eq!(u64_at(fadt, 120), 0x60c);
        assert_eq!(fadt[128], 1, "RESET_VALUE");
        let dsdt = table_at(&t, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_") && has(b"PCI0") && has(b"COM1") && has(b"RTC_"));
    }

    #[test]
    fn madt_lists_one_enabled_local_apic_per_vcpu() {
        let t = build(4, 4 << 30).unwrap();
        let xsdt = table_at(&t, u64_at(&t.blob, 24));
        let madt = table_at(&t, u64_at(xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut overrides = Vec::new();
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => lapics.push((madt[off + 3], madt[off + 4] & 1)),
                2 => overrides.push((madt[off + 3], madt[off + 4])),
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(overrides, vec![(0, 2), (9, 9)]);
    }

    #[test]
    fn more_vcpus_than_apic_ids_are_refused() {
        assert_eq!(
            build(300, 4 << 30),
            Err(AcpiError::TooManyCpus { cpus: 300 })
        );
    }
}
