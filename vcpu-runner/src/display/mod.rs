//! The bochs display: a PCI function (vendor 0x1234, device 0x1111, class "display, other",
//! revision 2, subsystem 1af4:1100 — what QEMU's `bochs-display` is) that Linux's `bochs` DRM
//! driver and OVMF's video driver both drive.
//!
//! ```text
//!   BAR0  32-bit prefetchable memory: the framebuffer (the `Framebuffer` memfd), a KVM memory
//!         slot — pixel stores never exit; dev-fb maps the same memfd to read them
//!   BAR2  32-bit memory, 4 KiB of registers (every access exits to here):
//!     0x000..0x400  EDID (one 128-byte EDID 1.4 block, then zeros)
//!     0x400..0x420  VGA ports 0x3c0..0x3df: not emulated (writes dropped, reads 0)
//!     0x500..0x516  the DISPI registers, index i at 0x500 + 2*i, 16 bits each
//!     0x600         QEMU extended registers: size (u32, 8), framebuffer byte order (u32 at
//!                   0x604: 0x1e1e1e1e little endian; big endian 0xbebebebe is refused)
//! ```
//!
//! The DISPI registers ([`dispi`]) decide the scan-out mode; each change of the shown mode
//! (and the display being disabled) goes to a [`ModeSink`] — in the runner the thread of
//! [`sender::ChannelSink`], which sends `ToDisplay::SetMode` to dev-fb. A mode that does not fit
//! the framebuffer or the configured maximum is refused, so dev-fb is never told to read past
//! the memfd whatever the guest writes.
//!
//! BAR0 follows the guest: when it moves the BAR or switches memory decoding, the framebuffer
//! slot is deleted and added at the new address ([`FramebufferSlot`]); an address that would
//! overlap RAM, another BAR, the display's own registers or a platform region ([`AddressMap`])
//! is refused (logged, the framebuffer stays unmapped until the guest picks a free address).
//! BAR2 is found by [`window::DisplayWindow`] wherever it is decoded.
//!
//! Trusts nothing the guest writes: any access width, offset and value is answered without
//! panicking. Touches: the framebuffer slot and the sink it is given.
//!
//! Not emulated: the legacy VGA window and ports, banked access (`BANK` is stored and
//! ignored), a big-endian framebuffer (`Mode` has no byte order), clearing the framebuffer on
//! enable, interrupts (pin 0).

mod dispi;
mod edid;
pub mod kvm_slot;
pub mod sender;
#[cfg(test)]
mod tests;
pub mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use proto::display::{MAX_DIMENSION, MAX_FRAMEBUFFER_BYTES, Mode};

use crate::devices::MmioDevice;
use crate::devices::pci::PciFunction;
use crate::devices::pci_config::{BarKind, ConfigSetupError, ConfigSpace, PciIds};
pub use dispi::ModeError;
use dispi::{Dispi, Limits, Outcome};

/// Bytes of BAR2.
pub const REGS_BAR_SIZE: u64 = 0x1000;
/// Smallest framebuffer: one `VIDEO_MEMORY_64K` unit.
pub const MIN_FRAMEBUFFER_BYTES: u64 = 64 << 10;
/// The framebuffer the supervisor creates unless configured otherwise (QEMU's default).
pub const DEFAULT_FRAMEBUFFER_BYTES: u64 = 16 << 20;
/// The preferred (EDID) mode and the largest mode when nothing else is configured: bhyve's
/// default resolution, and the top of vm-bhyve's `graphics_res` list.
pub const DEFAULT_WIDTH: u32 = 1024;
pub const DEFAULT_HEIGHT: u32 = 768;
pub const DEFAULT_MAX_WIDTH: u32 = 1920;
pub const DEFAULT_MAX_HEIGHT: u32 = 1200;

const IDS: PciIds = PciIds {
    vendor: 0x1234,
    device: 0x1111,
    class: 0x03_80_00,
    // Linux reads the QEMU extended registers only from revision 2 on.
    revision: 2,
    header_type: 0,
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
};

/// Configuration-space registers and bits (as the rest of the root's functions).
const REG_COMMAND_STATUS: u16 = 0x04;
const REG_BAR0: u16 = 0x10;
const REG_BAR2: u16 = 0x18;
const COMMAND_MEMORY: u16 = 0x2;
const COMMAND_WRITABLE: u32 = 0x0547;
const STATUS_CLEAR_ON_WRITE: u32 = 0xf900 << 16;

/// BAR2 layout.
const EDID_END: u64 = 0x400;
const DISPI_START: u64 = 0x500;
const DISPI_END: u64 = DISPI_START + 2 * dispi::REGISTERS as u64;
const QEXT_SIZE_REG: u64 = 0x600;
const QEXT_BYTE_ORDER_REG: u64 = 0x604;
const QEXT_END: u64 = 0x608;
/// The extended registers' size as reported at 0x600.
const QEXT_SIZE: u32 = 8;
const BYTE_ORDER_LITTLE: u32 = 0x1e1e_1e1e;
const BYTE_ORDER_BIG: u32 = 0xbebe_bebe;

/// Refused modes and addresses logged (at warn) before the rest are only counted.
const REFUSAL_LOG_LIMIT: u32 = 16;

/// The display's resolution bounds and framebuffer size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisplayConfig {
    /// The preferred mode (the EDID's detailed timing): `graphics_res`.
    pub width: u32,
    pub height: u32,
    /// The largest mode the guest may set.
    pub max_width: u32,
    pub max_height: u32,
    /// Bytes of the framebuffer memfd and BAR0: a power of two.
    pub framebuffer_bytes: u64,
}

/// A display configuration the device cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "framebuffer size {0} is not a power of two from {MIN_FRAMEBUFFER_BYTES} to {MAX_FRAMEBUFFER_BYTES} bytes"
    )]
    FramebufferSize(u64),
    #[error("maximum mode {width}x{height} is not 1 to {MAX_DIMENSION} on each side")]
    MaxMode { width: u32, height: u32 },
    #[error(
        "preferred mode {width}x{height} is not 1 to 4095 on each side, within the maximum, at 32 bpp inside the framebuffer"
    )]
    Preferred { width: u32, height: u32 },
}

impl DisplayConfig {
    /// The default resolutions over a framebuffer of `framebuffer_bytes`.
    pub fn with_framebuffer(framebuffer_bytes: u64) -> DisplayConfig {
        DisplayConfig {
            width: DEFAULT_WIDTH,
            height: DEFAULT_HEIGHT,
            max_width: DEFAULT_MAX_WIDTH,
            max_height: DEFAULT_MAX_HEIGHT,
            framebuffer_bytes,
        }
    }

    /// Checks the bounds the device relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fb = self.framebuffer_bytes;
        if !fb.is_power_of_two() || !(MIN_FRAMEBUFFER_BYTES..=MAX_FRAMEBUFFER_BYTES).contains(&fb) {
            return Err(ConfigError::FramebufferSize(fb));
        }
        let side = 1..=MAX_DIMENSION;
        if !side.contains(&self.max_width) || !side.contains(&self.max_height) {
            return Err(ConfigError::MaxMode {
                width: self.max_width,
                height: self.max_height,
            });
        }
        let dtd = 1..=edid::MAX_DTD_ACTIVE;
        if !dtd.contains(&self.width)
            || !dtd.contains(&self.height)
            || self.width > self.max_width
            || self.height > self.max_height
            || Mode::packed(self.width, self.height, 32)
                .validate(fb)
                .is_err()
        {
            return Err(ConfigError::Preferred {
                width: self.width,
                height: self.height,
            });
        }
        Ok(())
    }
}

/// Why the framebuffer slot could not be set up or moved.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("reading the framebuffer memfd's size")]
    Stat(#[source] std::io::Error),
    #[error("framebuffer memfd is {actual} bytes, the display asks for {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("mapping the framebuffer memfd")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the framebuffer mapping is gone")]
    Gone,
}

/// Why the display could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the framebuffer is {slot} bytes, the configuration says {config}")]
    FramebufferSize { slot: u64, config: u64 },
    #[error(
        "BAR addresses {framebuffer:#x} and {registers:#x} are not aligned, disjoint and below 4 GiB"
    )]
    Placement { framebuffer: u64, registers: u64 },
    #[error("building the configuration space failed")]
    ConfigSpace(#[from] ConfigSetupError),
    #[error("mapping the framebuffer failed")]
    Slot(#[from] SlotError),
}

/// The framebuffer as guest memory: BAR0's backing, placed at a guest-physical address.
pub trait FramebufferSlot: Send {
    /// Bytes of the framebuffer.
    fn size(&self) -> u64;
    /// Makes the framebuffer guest memory at `at` (`None`: nowhere), removing it from where
    /// it was. After an error it is nowhere or where it was (see [`FramebufferSlot::placed`]).
    fn place(&mut self, at: Option<u64>) -> Result<(), SlotError>;
    /// Where the framebuffer is guest memory now.
    fn placed(&self) -> Option<u64>;
}

/// The rest of the guest-physical address map, for refusing a BAR0 placement that clashes.
pub trait AddressMap: Send {
    /// Whether `start..start+len` overlaps no RAM, no other device's BAR and no platform MMIO.
    fn is_free(&self, start: u64, len: u64) -> bool;
}

/// Where mode changes go (to dev-fb).
pub trait ModeSink: Send + Sync {
    /// The display now shows `mode` (`None`: disabled). Must not block.
    fn mode_changed(&self, mode: Option<Mode>);
}

/// Where the BARs start, as firmware would assign them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// BAR0, aligned to the framebuffer's size.
    pub framebuffer: u64,
    /// BAR2, aligned to [`REGS_BAR_SIZE`].
    pub registers: u64,
}

/// Counts refusals and logs only the first few.
#[derive(Debug, Default)]
struct RateLimit(u32);

impl RateLimit {
    /// Whether this refusal is logged.
    fn allow(&mut self) -> bool {
        self.0 = self.0.saturating_add(1);
        if self.0 == REFUSAL_LOG_LIMIT.saturating_add(1) {
            tracing::warn!("display: further refusals are not logged");
        }
        self.0 <= REFUSAL_LOG_LIMIT
    }
}

/// Whether `a..a+a_len` and `b..b+b_len` overlap.
fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// The bochs display's PCI function and register BAR.
pub struct BochsDisplay {
    space: ConfigSpace,
    dispi: Dispi,
    edid: [u8; edid::EDID_BYTES],
    /// Where BAR2 is decoded (0: nowhere), shared with the window.
    registers: Arc<AtomicU64>,
    framebuffer: Box<dyn FramebufferSlot>,
    addresses: Box<dyn AddressMap>,
    sink: Arc<dyn ModeSink>,
    refusals: RateLimit,
}

impl std::fmt::Debug for BochsDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BochsDisplay")
            .field("mode", &self.dispi.mode())
            .field("framebuffer", &self.framebuffer.placed())
            .field("registers", &self.registers_at())
            .finish_non_exhaustive()
    }
}

impl BochsDisplay {
    /// The display of `config` over `framebuffer`, with its BARs at `placement` and memory
    /// decoding on (as firmware leaves it): the framebuffer is mapped there unless
    /// `addresses` says it clashes. Mode changes go to `sink`.
    pub fn new(
        config: &DisplayConfig,
        placement: Placement,
        framebuffer: Box<dyn FramebufferSlot>,
        addresses: Box<dyn AddressMap>,
        sink: Arc<dyn ModeSink>,
    ) -> Result<BochsDisplay, DisplayError> {
        config.validate()?;
        let size = config.framebuffer_bytes;
        if framebuffer.size() != size {
            return Err(DisplayError::FramebufferSize {
                slot: framebuffer.size(),
                config: size,
            });
        }
        let Placement {
            framebuffer: fb_at,
            registers: regs_at,
        } = placement;
        let aligned_below_4g = |at: u64, len: u64| {
            at != 0 && at.is_multiple_of(len) && at.checked_add(len).is_some_and(|e| e <= 1 << 32)
        };
        if !aligned_below_4g(fb_at, size)
            || !aligned_below_4g(regs_at, REGS_BAR_SIZE)
            || overlaps(fb_at, size, regs_at, REGS_BAR_SIZE)
        {
            return Err(DisplayError::Placement {
                framebuffer: fb_at,
                registers: regs_at,
            });
        }
        let mut space = ConfigSpace::new(&IDS);
        space.set_register(
            REG_COMMAND_STATUS,
            u32::from(COMMAND_MEMORY),
            COMMAND_WRITABLE,
            STATUS_CLEAR_ON_WRITE,
        )?;
        space.add_bar(0, BarKind::Memory32 { prefetchable: true }, size)?;
        space.add_bar(
            2,
            BarKind::Memory32 {
                prefetchable: false,
            },
            REGS_BAR_SIZE,
        )?;
        // Both fit 32 bits (checked above).
        space.write(REG_BAR0, u32::try_from(fb_at).unwrap_or(0), 0xf);
        space.write(REG_BAR2, u32::try_from(regs_at).unwrap_or(0), 0xf);
        let mut display = BochsDisplay {
            space,
            dispi: Dispi::new(Limits {
                max_width: config.max_width,
                max_height: config.max_height,
                framebuffer_bytes: size,
            }),
            edid: edid::build(
                config.width,
                config.height,
                config.max_width,
                config.max_height,
            ),
            registers: Arc::new(AtomicU64::new(0)),
            framebuffer,
            addresses,
            sink,
            refusals: RateLimit::default(),
        };
        display.update_decode();
        if display.framebuffer.placed() != Some(fb_at) {
            return Err(DisplayError::Placement {
                framebuffer: fb_at,
                registers: regs_at,
            });
        }
        Ok(display)
    }

    /// The function to put on the PCI root (it shares this display with the MMIO window).
    pub fn pci_function(this: &Arc<Mutex<BochsDisplay>>) -> Box<dyn PciFunction> {
        Box::new(DisplayFunction(this.clone()))
    }

    /// The mode the display shows, if enabled.
    pub fn mode(&self) -> Option<Mode> {
        self.dispi.mode()
    }

    /// Where the framebuffer is guest memory now.
    pub fn framebuffer_at(&self) -> Option<u64> {
        self.framebuffer.placed()
    }

    /// Where BAR2 is decoded now.
    pub fn registers_at(&self) -> Option<u64> {
        match self.registers.load(Ordering::Acquire) {
            0 => None,
            at => Some(at),
        }
    }

    fn registers_handle(&self) -> Arc<AtomicU64> {
        self.registers.clone()
    }

    /// Re-reads the command register and the BARs after a configuration write: BAR2's
    /// decode address follows at once; the framebuffer slot moves to BAR0's address if that
    /// is free, and is removed while decoding is off or the address clashes.
    fn update_decode(&mut self) {
        let decode = self.space.command() & COMMAND_MEMORY != 0;
        let regs = self
            .space
            .bar_address(2)
            .filter(|&at| decode && at != 0 && at.checked_add(REGS_BAR_SIZE).is_some());
        self.registers.store(regs.unwrap_or(0), Ordering::Release);

        let size = self.framebuffer.size();
        let wanted = self.space.bar_address(0).filter(|&at| decode && at != 0);
        let target = wanted.filter(|&at| {
            let clash = at.checked_add(size).is_none()
                || regs.is_some_and(|r| overlaps(at, size, r, REGS_BAR_SIZE))
                || !self.addresses.is_free(at, size);
            if clash && self.refusals.allow() {
                tracing::warn!(
                    bar = format_args!("{at:#x}"),
                    size,
                    "display: framebuffer BAR overlaps RAM or another device; left unmapped"
                );
            }
            !clash
        });
        if target == self.framebuffer.placed() {
            return;
        }
        match self.framebuffer.place(target) {
            Ok(()) => tracing::debug!(at = ?target, "display: framebuffer placed"),
            Err(e) => {
                tracing::warn!(error = %e, at = ?target, "display: moving the framebuffer failed");
            }
        }
    }

    fn config_write(&mut self, reg: u16, value: u32, byte_enable: u8) {
        self.space.write(reg, value, byte_enable);
        if matches!(reg, REG_COMMAND_STATUS | REG_BAR0 | REG_BAR2) {
            self.update_decode();
        }
    }

    /// BAR2's offset of an absolute address, if BAR2 is decoded there for `len` bytes.
    fn bar_offset(&self, addr: u64, len: usize) -> Option<u64> {
        let rel = addr.checked_sub(self.registers_at()?)?;
        let end = rel.checked_add(u64::try_from(len).ok()?)?;
        (end <= REGS_BAR_SIZE).then_some(rel)
    }

    /// The byte at `offset` of BAR2.
    fn register_byte(&self, offset: u64) -> u8 {
        let lane = |value: u32, at: u64| {
            let bytes = value.to_le_bytes();
            usize::try_from(at % 4)
                .ok()
                .and_then(|i| bytes.get(i).copied())
                .unwrap_or(0xff)
        };
        match offset {
            ..EDID_END => usize::try_from(offset)
                .ok()
                .and_then(|i| self.edid.get(i).copied())
                .unwrap_or(0),
            EDID_END..DISPI_START => 0,
            DISPI_START..DISPI_END => {
                let rel = offset - DISPI_START;
                let value = self.dispi.read(u16::try_from(rel / 2).unwrap_or(u16::MAX));
                lane(u32::from(value), rel % 2)
            }
            QEXT_SIZE_REG..QEXT_BYTE_ORDER_REG => lane(QEXT_SIZE, offset),
            QEXT_BYTE_ORDER_REG..QEXT_END => lane(BYTE_ORDER_LITTLE, offset),
            _ => 0xff,
        }
    }

    fn register_read(&self, offset: u64, data: &mut [u8]) {
        for (at, byte) in (offset..).zip(data.iter_mut()) {
            *byte = self.register_byte(at);
        }
    }

    fn register_write(&mut self, offset: u64, data: &[u8]) {
        if offset == QEXT_BYTE_ORDER_REG && data.len() == 4 {
            let value = u32::from_le_bytes([0, 1, 2, 3].map(|i| data.get(i).copied().unwrap_or(0)));
            if value == BYTE_ORDER_BIG && self.refusals.allow() {
                tracing::warn!("display: big-endian framebuffer refused; it stays little endian");
            }
            return;
        }
        // Each DISPI register the access touches, with the written bytes merged into its
        // stored value (a byte write changes one half).
        let Some(end) = u64::try_from(data.len())
            .ok()
            .and_then(|l| offset.checked_add(l))
        else {
            return;
        };
        let first = offset.max(DISPI_START);
        let last = end.min(DISPI_END);
        if first >= last {
            tracing::trace!(
                offset,
                len = data.len(),
                "display: write outside the DISPI registers dropped"
            );
            return;
        }
        let mut merged: Vec<(u16, u16)> = Vec::new();
        for index in (first - DISPI_START) / 2..=(last - 1 - DISPI_START) / 2 {
            let Ok(index) = u16::try_from(index) else {
                continue;
            };
            let mut bytes = self.dispi.stored(index).to_le_bytes();
            let reg_start = DISPI_START + 2 * u64::from(index);
            for (at, byte) in (reg_start..).zip(bytes.iter_mut()) {
                let written = at
                    .checked_sub(offset)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| data.get(i));
                if let Some(&b) = written {
                    *byte = b;
                }
            }
            merged.push((index, u16::from_le_bytes(bytes)));
        }
        for (index, value) in merged {
            match self.dispi.write(index, value) {
                Outcome::Unchanged => {}
                Outcome::Changed(mode) => {
                    tracing::info!(?mode, "display: mode set");
                    self.sink.mode_changed(mode);
                }
                Outcome::Refused(e) => {
                    if self.refusals.allow() {
                        tracing::warn!(error = %e, "display: mode refused; the previous one stays");
                    }
                }
            }
        }
    }
}

/// Guest MMIO at absolute addresses: only what falls in the decoded BAR2 is answered.
impl MmioDevice for BochsDisplay {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        match self.bar_offset(addr, data.len()) {
            Some(offset) => self.register_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        if let Some(offset) = self.bar_offset(addr, data.len()) {
            self.register_write(offset, data);
        }
    }
}

/// The PCI side of a shared display (the root owns a `Box<dyn PciFunction>`).
struct DisplayFunction(Arc<Mutex<BochsDisplay>>);

impl PciFunction for DisplayFunction {
    fn read_config(&mut self, reg: u16) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .space
            .read(reg)
    }

    fn write_config(&mut self, reg: u16, value: u32, byte_enable: u8) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .config_write(reg, value, byte_enable);
    }
}
