//! The guest-physical address map and the platform's fixed ports and interrupt lines
//! (`x86_64`). DESIGN.md: RAM from 0 up to 3 GiB, a 1 GiB hole for 32-bit MMIO (PCI BARs, ECAM,
//! IOAPIC, LAPIC), the rest of RAM above 4 GiB, 64-bit BARs above RAM.

#![allow(clippy::doc_markdown)] // ACPI register names (PM1a_EVT_BLK, SLP_TYP) read better bare.

/// Where low RAM ends and the 32-bit MMIO hole begins (3 GiB).
pub const MMIO_HOLE_START: u64 = proto::device::RAM_LOW_END;
/// Where the hole ends and high RAM begins (4 GiB).
pub const MMIO_HOLE_END: u64 = proto::device::RAM_HIGH_START;
/// 32-bit PCI BARs are placed in `PCI_MMIO32_START..ECAM_START`.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// PCI Express enhanced configuration space (ECAM), one bus (bus 0): 1 MiB.
pub const ECAM_START: u64 = 0xE000_0000;
/// Size of the ECAM window: 1 bus × 32 devices × 8 functions × 4 KiB.
pub const ECAM_SIZE: u64 = 1 << 20;
/// The bochs display's BAR2 (its 4 KiB of registers) as the runner first places it: just below
/// the framebuffer, far above the virtio BARs packed from [`PCI_MMIO32_START`].
pub const DISPLAY_REGISTERS_START: u64 = 0xCFFF_F000;
/// The bochs display's BAR0 (the framebuffer) as the runner first places it. 256 MiB-aligned,
/// so every framebuffer size up to `proto::display::MAX_FRAMEBUFFER_BYTES` (a power of two, at
/// most 256 MiB) is aligned to its size and ends at or before [`ECAM_START`].
pub const DISPLAY_FRAMEBUFFER_START: u64 = 0xD000_0000;
/// The IOAPIC's MMIO page (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// The local APICs' MMIO page.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// KVM's TSS (three pages) for real-mode emulation on Intel, inside the hole, unused by
/// anything else.
pub const KVM_TSS_START: u64 = 0xFFFB_D000;
/// KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xFFFB_C000;

/// The legacy COM1 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_GSI: u32 = 4;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The CMOS/RTC index port (the data port follows).
pub const CMOS_PORT: u16 = 0x70;
/// The RTC's interrupt line.
pub const RTC_GSI: u32 = 8;
/// PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC..0xD00.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// The PCI reset control register (a byte at 0xCF9, inside the config address dword).
pub const PCI_RESET_PORT: u16 = 0xcf9;
/// The ACPI PM register block: `PM1a` event (status, enable), `PM1a` control, PM timer, reset.
pub const ACPI_PM_BASE: u16 = 0x600;
/// PM1a_EVT_BLK: PM1_STS (2 bytes) then PM1_EN (2 bytes).
pub const ACPI_PM1_EVT_PORT: u16 = ACPI_PM_BASE;
/// PM1a_CNT_BLK: PM1_CNT (2 bytes).
pub const ACPI_PM1_CNT_PORT: u16 = ACPI_PM_BASE + 4;
/// PM_TMR_BLK: the 24-bit 3.579545 MHz PM timer (4 bytes).
pub const ACPI_PM_TMR_PORT: u16 = ACPI_PM_BASE + 8;
/// The FADT's RESET_REG: an I/O byte; writing [`ACPI_RESET_VALUE`] resets the machine.
pub const ACPI_RESET_PORT: u16 = ACPI_PM_BASE + 0xc;
/// The value the guest writes to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// Bytes of the whole ACPI PM block.
pub const ACPI_PM_LEN: u16 = 0x10;
/// The SCI's interrupt line (level, active high).
pub const ACPI_SCI_GSI: u32 = 9;
/// The SLP_TYP value of S5 in the DSDT's `\_S5` package, as written to PM1_CNT.
pub const ACPI_SLP_TYP_S5: u8 = 5;
