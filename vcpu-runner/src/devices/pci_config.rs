//! A PCI function's configuration space as registers with per-bit write masks: the building
//! block for every [`PciFunction`](super::pci::PciFunction) on the root bus.
//!
//! Each dword has a value, a mask of bits the guest may write and a mask of bits it clears by
//! writing one (status bits). BAR sizing falls out of the masks: a BAR's writable bits are the
//! address bits above its size, so writing all-ones reads back the size mask with the read-only
//! type bits, as the PCI spec (Local Bus 3.0, §6.2.5.1) describes.

use super::pci::PciFunction;

/// Bytes of one function's (extended) configuration space.
pub const CONFIG_SPACE_BYTES: u16 = 4096;
const DWORDS: usize = CONFIG_SPACE_BYTES as usize / 4;

/// Register offsets of the type 0 header.
const REG_ID: u16 = 0x00;
const REG_COMMAND_STATUS: u16 = 0x04;
const REG_CLASS_REVISION: u16 = 0x08;
const REG_HEADER: u16 = 0x0C;
const REG_BAR0: u16 = 0x10;
const REG_SUBSYSTEM: u16 = 0x2C;

/// Command bits a guest may set: I/O space, memory space, bus master, parity error response,
/// `SERR#` enable, `INTx` disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status bits that are write-one-to-clear: master data parity error, signalled/received target
/// abort, received master abort, signalled system error, detected parity error.
const STATUS_CLEAR_ON_WRITE: u32 = 0xF900 << 16;

/// BAR type bits.
const BAR_IO: u32 = 0x1;
const BAR_MEM64: u32 = 0x4;
const BAR_PREFETCHABLE: u32 = 0x8;
/// Number of BARs in a type 0 header.
pub const BAR_COUNT: usize = 6;

/// The identity of a function, fixed at creation and read-only to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID (PCI-SIG assigned).
    pub vendor: u16,
    /// Device ID, the vendor's.
    pub device: u16,
    /// Base class, subclass and programming interface (`0xCCSSPP`).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Header type byte (0 for an endpoint; bit 7 marks a multi-function device).
    pub header_type: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Memory32 { prefetchable: bool },
    /// Takes this BAR and the next one (the upper 32 address bits).
    Memory64 { prefetchable: bool },
}

/// A register or BAR that cannot be set up as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigSetupError {
    #[error("register {0:#x} is not a dword inside configuration space")]
    Register(u16),
    #[error("BAR {0} does not exist or is already in use")]
    Bar(usize),
    #[error(
        "BAR size {0:#x} is not a power of two of at least 16 (memory) or 4 (I/O) bytes, or too big for the BAR"
    )]
    BarSize(u64),
}

/// One function's configuration space.
pub struct ConfigSpace {
    value: Vec<u32>,
    writable: Vec<u32>,
    clear_on_write: Vec<u32>,
    /// What each BAR register holds.
    bars: [BarUse; BAR_COUNT],
}

/// What a BAR register holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarUse {
    Free,
    /// A BAR's (low) address register.
    Base,
    /// The upper address half of the 64-bit BAR before it.
    Upper,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("id", &format_args!("{:#010x}", self.read(REG_ID)))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

/// The index into the dword arrays of register `reg`, if it is a dword inside the space.
fn dword_index(reg: u16) -> Option<usize> {
    (reg.is_multiple_of(4) && reg < CONFIG_SPACE_BYTES).then_some(usize::from(reg / 4))
}

/// The mask of the bytes `byte_enable` selects (bit n = byte n).
fn byte_mask(byte_enable: u8) -> u32 {
    (0..4)
        .filter(|byte| byte_enable & (1 << byte) != 0)
        .fold(0, |mask, byte| mask | (0xff << (byte * 8)))
}

impl ConfigSpace {
    /// A type 0 header with `ids`, command and status writable, no BARs, no capabilities.
    pub fn new(ids: &PciIds) -> ConfigSpace {
        let mut space = ConfigSpace {
            value: vec![0; DWORDS],
            writable: vec![0; DWORDS],
            clear_on_write: vec![0; DWORDS],
            bars: [BarUse::Free; BAR_COUNT],
        };
        let dword = |low: u16, high: u16| u32::from(low) | (u32::from(high) << 16);
        let registers = [
            (REG_ID, dword(ids.vendor, ids.device), 0, 0),
            (
                REG_COMMAND_STATUS,
                0,
                COMMAND_WRITABLE,
                STATUS_CLEAR_ON_WRITE,
            ),
            (
                REG_CLASS_REVISION,
                ((ids.class & 0x00ff_ffff) << 8) | u32::from(ids.revision),
                0,
                0,
            ),
            (REG_HEADER, u32::from(ids.header_type) << 16, 0, 0),
            (
                REG_SUBSYSTEM,
                dword(ids.subsystem_vendor, ids.subsystem),
                0,
                0,
            ),
        ];
        for (reg, value, writable, clear_on_write) in registers {
            // Every offset above is a fixed dword of the header.
            let _ = space.set_register(reg, value, writable, clear_on_write);
        }
        space
    }

    /// Sets the dword at `reg` to `value`, of which the guest may write the `writable` bits and
    /// clear the `clear_on_write` bits by writing ones (for capabilities and device registers).
    pub fn set_register(
        &mut self,
        reg: u16,
        value: u32,
        writable: u32,
        clear_on_write: u32,
    ) -> Result<(), ConfigSetupError> {
        let i = dword_index(reg).ok_or(ConfigSetupError::Register(reg))?;
        for (array, v) in [
            (&mut self.value, value),
            (&mut self.writable, writable & !clear_on_write),
            (&mut self.clear_on_write, clear_on_write),
        ] {
            *array.get_mut(i).ok_or(ConfigSetupError::Register(reg))? = v;
        }
        Ok(())
    }

    /// Declares BAR `index` as `kind` of `size` bytes, at address 0 until the guest moves it.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
    ) -> Result<(), ConfigSetupError> {
        let (halves, min_size, type_bits) = match kind {
            BarKind::Io => (1, 4, BAR_IO),
            BarKind::Memory32 { prefetchable } => {
                (1, 16, if prefetchable { BAR_PREFETCHABLE } else { 0 })
            }
            BarKind::Memory64 { prefetchable } => (
                2,
                16,
                BAR_MEM64 | if prefetchable { BAR_PREFETCHABLE } else { 0 },
            ),
        };
        let max_size = if halves == 2 { 1 << 63 } else { 1 << 31 };
        if !size.is_power_of_two() || size < min_size || size > max_size {
            return Err(ConfigSetupError::BarSize(size));
        }
        let last = index
            .checked_add(halves - 1)
            .ok_or(ConfigSetupError::Bar(index))?;
        let slots = self
            .bars
            .get_mut(index..=last)
            .ok_or(ConfigSetupError::Bar(index))?;
        if slots.iter().any(|&u| u != BarUse::Free) {
            return Err(ConfigSetupError::Bar(index));
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = if i == 0 { BarUse::Base } else { BarUse::Upper };
        }
        let address_mask = !(size - 1);
        let type_mask: u64 = if kind == BarKind::Io { 0x3 } else { 0xf };
        let low = u32::try_from(address_mask & !type_mask & 0xffff_ffff).unwrap_or(0);
        let reg = |i: usize| {
            u16::try_from(i)
                .ok()
                .and_then(|i| REG_BAR0.checked_add(i.checked_mul(4)?))
                .ok_or(ConfigSetupError::Bar(index))
        };
        self.set_register(reg(index)?, type_bits, low, 0)?;
        if halves == 2 {
            let high = u32::try_from(address_mask >> 32).unwrap_or(0);
            self.set_register(reg(last)?, 0, high, 0)?;
        }
        Ok(())
    }

    /// Where the guest placed BAR `index` (the base BAR of a 64-bit pair), if it is in use.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        if *self.bars.get(index)? != BarUse::Base {
            return None;
        }
        let reg = REG_BAR0.checked_add(u16::try_from(index).ok()?.checked_mul(4)?)?;
        let low = self.read(reg);
        if low & BAR_IO != 0 {
            return Some(u64::from(low & !0x3));
        }
        let high = if low & BAR_MEM64 != 0 {
            self.read(reg.checked_add(4)?)
        } else {
            0
        };
        Some((u64::from(high) << 32) | u64::from(low & !0xf))
    }

    /// The command register (memory/I/O decode, bus master, `INTx` disable).
    pub fn command(&self) -> u16 {
        u16::try_from(self.read(REG_COMMAND_STATUS) & 0xffff).unwrap_or(0)
    }

    /// The dword at `reg`; all-ones outside the space or unaligned.
    pub fn read(&self, reg: u16) -> u32 {
        dword_index(reg)
            .and_then(|i| self.value.get(i))
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// A guest write of the `byte_enable` bytes of `value` to the dword at `reg`.
    pub fn write(&mut self, reg: u16, value: u32, byte_enable: u8) {
        let Some(i) = dword_index(reg) else {
            return;
        };
        let lanes = byte_mask(byte_enable);
        let (Some(writable), Some(clear)) = (self.writable.get(i), self.clear_on_write.get(i))
        else {
            return;
        };
        let (writable, clear) = (*writable & lanes, *clear & lanes);
        if let Some(current) = self.value.get_mut(i) {
            let written = (*current & !writable) | (value & writable);
            *current = written & !(value & clear);
        }
    }
}

impl PciFunction for ConfigSpace {
    fn read_config(&mut self, reg: u16) -> u32 {
        self.read(reg)
    }

    fn write_config(&mut self, reg: u16, value: u32, byte_enable: u8) {
        self.write(reg, value, byte_enable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PciIds = PciIds {
        vendor: 0x1af4,
        device: 0x1041,
        class: 0x02_00_00,
        revision: 1,
        header_type: 0,
        subsystem_vendor: 0x1af4,
        subsystem: 0x0001,
    };

    #[test]
    fn header_holds_the_ids_and_ignores_writes_to_them() {
        let mut space = ConfigSpace::new(&IDS);
        space.write(REG_ID, 0, 0xf);
        space.write(REG_CLASS_REVISION, 0, 0xf);
        assert_eq!(space.read(REG_ID), 0x1041_1af4);
        assert_eq!(space.read(REG_CLASS_REVISION), 0x0200_0001);
        assert_eq!(space.read(REG_SUBSYSTEM), 0x0001_1af4);
        assert_eq!(space.read(REG_HEADER), 0);
    }

    #[test]
    fn command_keeps_only_its_writable_bits_and_honours_byte_enables() {
        let mut space = ConfigSpace::new(&IDS);
        space.write(REG_COMMAND_STATUS, 0xffff_ffff, 0b0001);
        assert_eq!(space.command(), 0x47);
        space.write(REG_COMMAND_STATUS, 0xffff_ffff, 0b0011);
        assert_eq!(space.command(), 0x547);
        space.write(REG_COMMAND_STATUS, 0, 0b0010);
        assert_eq!(space.command(), 0x47);
    }

    #[test]
    fn status_bits_clear_when_written_with_one() {
        let mut space = ConfigSpace::new(&IDS);
        space
            .set_register(
                REG_COMMAND_STATUS,
                0x2010_0000,
                COMMAND_WRITABLE,
                STATUS_CLEAR_ON_WRITE,
            )
            .unwrap();
        space.write(REG_COMMAND_STATUS, 0x2000_0000, 0b1100);
        // Received master abort (bit 13) cleared, capability list (bit 4) stays.
        assert_eq!(space.read(REG_COMMAND_STATUS), 0x0010_0000);
    }

    #[test]
    fn bar_sizing_with_all_ones_reads_back_the_size_mask() {
        let mut space = ConfigSpace::new(&IDS);
        space
            .add_bar(
                0,
                BarKind::Memory32 {
                    prefetchable: false,
                },
                0x4000,
            )
            .unwrap();
        space.add_bar(1, BarKind::Io, 0x20).unwrap();
        space
            .add_bar(2, BarKind::Memory64 { prefetchable: true }, 1 << 33)
            .unwrap();
        for bar in 0..6u16 {
            space.write(REG_BAR0 + bar * 4, u32::MAX, 0xf);
        }
        assert_eq!(space.read(0x10), 0xffff_c000);
        assert_eq!(space.read(0x14), 0xffff_ffe1);
        assert_eq!(space.read(0x18), 0x0000_000c);
        assert_eq!(space.read(0x1c), 0xffff_fffe);
        assert_eq!(space.read(0x20), 0, "unused BARs are hardwired to zero");
        space.write(0x10, 0xe123_4567, 0xf);
        assert_eq!(space.bar_address(0), Some(0xe123_4000));
        space.write(0x18, 0x8000_0000, 0xf);
        space.write(0x1c, 0x10, 0xf);
        assert_eq!(space.bar_address(2), Some(0x10_0000_0000));
        assert_eq!(space.bar_address(3), None, "upper half of BAR 2");
        assert_eq!(space.bar_address(4), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut space = ConfigSpace::new(&IDS);
        let mem = BarKind::Memory32 {
            prefetchable: false,
        };
        assert_eq!(
            space.add_bar(0, mem, 0x3000),
            Err(ConfigSetupError::BarSize(0x3000))
        );
        assert_eq!(space.add_bar(0, mem, 8), Err(ConfigSetupError::BarSize(8)));
        assert_eq!(
            space.add_bar(0, mem, 1 << 32),
            Err(ConfigSetupError::BarSize(1 << 32))
        );
        assert_eq!(space.add_bar(6, mem, 0x1000), Err(ConfigSetupError::Bar(6)));
        let mem64 = BarKind::Memory64 {
            prefetchable: false,
        };
        assert_eq!(
            space.add_bar(5, mem64, 0x1000),
            Err(ConfigSetupError::Bar(5))
        );
        space.add_bar(4, mem64, 0x1000).unwrap();
        assert_eq!(space.add_bar(5, mem, 0x1000), Err(ConfigSetupError::Bar(5)));
        assert_eq!(
            space.add_bar(usize::MAX, mem64, 0x1000),
            Err(ConfigSetupError::Bar(usize::MAX))
        );
    }

    #[test]
    fn unaligned_or_outside_registers_read_all_ones_and_ignore_writes() {
        let mut space = ConfigSpace::new(&IDS);
        assert_eq!(space.read(2), u32::MAX);
        assert_eq!(space.read(CONFIG_SPACE_BYTES), u32::MAX);
        space.write(CONFIG_SPACE_BYTES, 0, 0xf);
        space.write(6, 0, 0xf);
        assert_eq!(
            space.set_register(4095, 0, 0, 0),
            Err(ConfigSetupError::Register(4095))
        );
        assert_eq!(space.read(0xffc), 0);
    }
}
