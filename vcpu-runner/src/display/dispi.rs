//! The DISPI ("display interface") registers of the Bochs VBE extensions as the bochs display
//! has them: eleven 16-bit registers (index `i` at BAR2 offset `0x500 + 2*i`), and the scan-out
//! [`Mode`] they describe.
//!
//! The registers keep what the guest wrote (a driver reads back its own values), as QEMU's
//! bochs-display does. The mode is derived from them and checked every time it could change:
//! setting `ENABLED` in `ENABLE` with registers that describe no valid mode is refused
//! (`ENABLE` keeps its old value), and a later write of a resolution, offset or virtual width
//! while enabled that would leave the framebuffer keeps the previous mode. Only a mode that
//! [`Mode::validate`] accepts against the framebuffer's size ever leaves this file, so no guest
//! value can make dev-fb read outside the framebuffer (the bug class of bhyve's fbuf advisory).
//!
//! The visible picture starts at byte `y_offset * stride + x_offset * bytes_per_pixel`, with
//! `stride = virt_width * bytes_per_pixel`: the offsets are a linear byte offset in disguise,
//! which is how Linux's `bochs` driver uses them to flip between buffers anywhere in the
//! framebuffer. `VIRT_HEIGHT` is stored but bounds nothing: Linux sets it to the whole
//! framebuffer's height, so a page-flipped mode would never fit "virtual screen plus offset";
//! what must fit is the visible window, which `Mode::validate` checks.

use proto::display::Mode;

/// Register indexes.
pub(super) const INDEX_ID: u16 = 0x0;
pub(super) const INDEX_XRES: u16 = 0x1;
pub(super) const INDEX_YRES: u16 = 0x2;
pub(super) const INDEX_BPP: u16 = 0x3;
pub(super) const INDEX_ENABLE: u16 = 0x4;
#[cfg_attr(not(test), allow(dead_code))] // named for the tests' register sequences
pub(super) const INDEX_BANK: u16 = 0x5;
pub(super) const INDEX_VIRT_WIDTH: u16 = 0x6;
#[cfg_attr(not(test), allow(dead_code))] // named for the tests' register sequences
pub(super) const INDEX_VIRT_HEIGHT: u16 = 0x7;
pub(super) const INDEX_X_OFFSET: u16 = 0x8;
pub(super) const INDEX_Y_OFFSET: u16 = 0x9;
pub(super) const INDEX_VIDEO_MEMORY_64K: u16 = 0xa;
/// Number of registers.
pub(super) const REGISTERS: u16 = 11;

/// The interface version this device reports (`VBE_DISPI_ID5`).
pub(super) const ID5: u16 = 0xb0c5;
/// `ENABLE` bits.
pub(super) const ENABLED: u16 = 0x01;
/// Reads of `XRES`, `YRES` and `BPP` return the maxima while this is set.
pub(super) const GETCAPS: u16 = 0x02;
#[cfg_attr(not(test), allow(dead_code))] // named for the tests' register sequences
pub(super) const LFB_ENABLED: u16 = 0x40;
/// Bits per pixel the device reports as its maximum (`GETCAPS`).
const MAX_BPP: u16 = 32;
/// The unit of `VIDEO_MEMORY_64K`.
const VIDEO_MEMORY_UNIT: u64 = 64 << 10;

/// What bounds a mode: the largest resolution and the framebuffer's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    pub max_width: u32,
    pub max_height: u32,
    pub framebuffer_bytes: u64,
}

/// Why the registers describe no mode the device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error("{0} bits per pixel is not supported (only 32 and 16)")]
    Bpp(u16),
    #[error("width {width} is not 1 to {max}")]
    Width { width: u16, max: u32 },
    #[error("height {height} is not 1 to {max}")]
    Height { height: u16, max: u32 },
    #[error("virtual width {virt_width} is narrower than the width {width}")]
    VirtWidth { virt_width: u16, width: u16 },
    #[error("the picture ({mode:?}) does not fit the {framebuffer_bytes}-byte framebuffer")]
    Framebuffer { mode: Mode, framebuffer_bytes: u64 },
}

/// What a register write did to the scan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Nothing the display shows changed.
    Unchanged,
    /// The display now shows this mode (`None`: it is disabled).
    Changed(Option<Mode>),
    /// The write asked for a mode that is refused; the previous state stays.
    Refused(ModeError),
}

/// The register file and the mode it describes.
#[derive(Debug, Clone)]
pub(super) struct Dispi {
    /// What the guest wrote, by index; `ID` and `VIDEO_MEMORY_64K` are not stored.
    regs: [u16; REGISTERS as usize],
    mode: Option<Mode>,
    limits: Limits,
}

impl Dispi {
    /// Registers after reset: everything zero, the display disabled.
    pub(super) fn new(limits: Limits) -> Dispi {
        Dispi {
            regs: [0; REGISTERS as usize],
            mode: None,
            limits,
        }
    }

    /// The mode the display shows, if enabled.
    pub(super) fn mode(&self) -> Option<Mode> {
        self.mode
    }

    fn raw(&self, index: u16) -> u16 {
        self.regs.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn enabled(&self) -> bool {
        self.raw(INDEX_ENABLE) & ENABLED != 0
    }

    /// What a guest read of register `index` returns; an index past the last reads all-ones.
    pub(super) fn read(&self, index: u16) -> u16 {
        let caps = self.raw(INDEX_ENABLE) & GETCAPS != 0;
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        match index {
            INDEX_ID => ID5,
            INDEX_VIDEO_MEMORY_64K => {
                u16::try_from(self.limits.framebuffer_bytes / VIDEO_MEMORY_UNIT).unwrap_or(u16::MAX)
            }
            INDEX_XRES if caps => clamp(self.limits.max_width),
            INDEX_YRES if caps => clamp(self.limits.max_height),
            INDEX_BPP if caps => MAX_BPP,
            _ if index < REGISTERS => self.raw(index),
            _ => u16::MAX,
        }
    }

    /// The register value a partial (byte) write merges into: what was written, not what a
    /// `GETCAPS` read shows.
    pub(super) fn stored(&self, index: u16) -> u16 {
        self.raw(index)
    }

    /// A guest write of `value` to register `index`.
    pub(super) fn write(&mut self, index: u16, value: u16) -> Outcome {
        match index {
            // Read-only: the interface version and the memory size.
            INDEX_ID | INDEX_VIDEO_MEMORY_64K => Outcome::Unchanged,
            INDEX_ENABLE if value & ENABLED != 0 => match self.candidate() {
                Ok(mode) => {
                    self.set(INDEX_ENABLE, value);
                    self.show(Some(mode))
                }
                Err(e) => Outcome::Refused(e),
            },
            INDEX_ENABLE => {
                self.set(INDEX_ENABLE, value);
                self.show(None)
            }
            _ if index < REGISTERS => {
                self.set(index, value);
                if !self.enabled() {
                    return Outcome::Unchanged;
                }
                // Enabled: the new value takes effect only if the mode stays valid.
                match self.candidate() {
                    Ok(mode) => self.show(Some(mode)),
                    Err(e) => Outcome::Refused(e),
                }
            }
            _ => Outcome::Unchanged,
        }
    }

    fn set(&mut self, index: u16, value: u16) {
        if let Some(r) = self.regs.get_mut(usize::from(index)) {
            *r = value;
        }
    }

    fn show(&mut self, mode: Option<Mode>) -> Outcome {
        if mode == self.mode {
            Outcome::Unchanged
        } else {
            self.mode = mode;
            Outcome::Changed(mode)
        }
    }

    /// The mode the registers describe now, if it is one the device serves.
    pub(super) fn candidate(&self) -> Result<Mode, ModeError> {
        let bpp = self.raw(INDEX_BPP);
        let bytes: u32 = match bpp {
            32 => 4,
            16 => 2,
            _ => return Err(ModeError::Bpp(bpp)),
        };
        let (width, height) = (self.raw(INDEX_XRES), self.raw(INDEX_YRES));
        if width == 0 || u32::from(width) > self.limits.max_width {
            return Err(ModeError::Width {
                width,
                max: self.limits.max_width,
            });
        }
        if height == 0 || u32::from(height) > self.limits.max_height {
            return Err(ModeError::Height {
                height,
                max: self.limits.max_height,
            });
        }
        let virt_width = self.raw(INDEX_VIRT_WIDTH);
        if virt_width < width {
            return Err(ModeError::VirtWidth { virt_width, width });
        }
        // 65535 * 4 fits a u32; the offset (< 2^35) a u64.
        let stride = u32::from(virt_width) * bytes;
        let offset = u64::from(self.raw(INDEX_Y_OFFSET)) * u64::from(stride)
            + u64::from(self.raw(INDEX_X_OFFSET)) * u64::from(bytes);
        let mode = Mode {
            width: u32::from(width),
            height: u32::from(height),
            bpp: u32::from(bpp),
            stride,
            offset,
        };
        mode.validate(self.limits.framebuffer_bytes)
            .map_err(|_| ModeError::Framebuffer {
                mode,
                framebuffer_bytes: self.limits.framebuffer_bytes,
            })?;
        Ok(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FB: u64 = 16 << 20;

    fn dispi() -> Dispi {
        Dispi::new(Limits {
            max_width: 1920,
            max_height: 1200,
            framebuffer_bytes: FB,
        })
    }

    /// The writes of Linux's `bochs_hw_setmode` for `width`x`height` at 32 bpp.
    fn linux_setmode(d: &mut Dispi, width: u16, height: u16) -> Vec<Outcome> {
        let stride = u64::from(width) * 4;
        let virt_height = u16::try_from(FB / stride).unwrap();
        [
            (INDEX_ENABLE, 0),
            (INDEX_BPP, 32),
            (INDEX_XRES, width),
            (INDEX_YRES, height),
            (INDEX_BANK, 0),
            (INDEX_VIRT_WIDTH, width),
            (INDEX_VIRT_HEIGHT, virt_height),
            (INDEX_X_OFFSET, 0),
            (INDEX_Y_OFFSET, 0),
            (INDEX_ENABLE, ENABLED | LFB_ENABLED),
        ]
        .into_iter()
        .map(|(i, v)| d.write(i, v))
        .filter(|o| *o != Outcome::Unchanged)
        .collect()
    }

    fn program(d: &mut Dispi, bpp: u16, width: u16, height: u16, virt_width: u16) -> Outcome {
        d.write(INDEX_ENABLE, 0);
        d.write(INDEX_BPP, bpp);
        d.write(INDEX_XRES, width);
        d.write(INDEX_YRES, height);
        d.write(INDEX_VIRT_WIDTH, virt_width);
        d.write(INDEX_ENABLE, ENABLED | LFB_ENABLED)
    }

    #[test]
    fn id_and_memory_size_are_read_only() {
        let mut d = dispi();
        assert_eq!(d.write(INDEX_ID, 0xb0c0), Outcome::Unchanged);
        assert_eq!(d.write(INDEX_VIDEO_MEMORY_64K, 1), Outcome::Unchanged);
        assert_eq!(d.read(INDEX_ID), ID5);
        assert_eq!(d.read(INDEX_VIDEO_MEMORY_64K), 256);
        assert_eq!(d.read(REGISTERS), u16::MAX);
        assert_eq!(d.read(u16::MAX), u16::MAX);
        assert_eq!(d.write(u16::MAX, 5), Outcome::Unchanged);
    }

    #[test]
    fn linux_setmode_sequence_shows_one_packed_mode_and_registers_read_back() {
        let mut d = dispi();
        let outcomes = linux_setmode(&mut d, 1024, 768);
        let expected = Mode::packed(1024, 768, 32);
        assert_eq!(outcomes, vec![Outcome::Changed(Some(expected))]);
        assert_eq!(d.mode(), Some(expected));
        assert_eq!(d.read(INDEX_XRES), 1024);
        assert_eq!(d.read(INDEX_VIRT_HEIGHT), 4096);
        assert_eq!(d.read(INDEX_ENABLE), ENABLED | LFB_ENABLED);
    }

    #[test]
    fn a_page_flip_through_the_offsets_moves_the_mode_offset() {
        let mut d = dispi();
        linux_setmode(&mut d, 1024, 768);
        // Linux's bochs_hw_setbase for a buffer at byte 768 * 4096 + 64.
        assert_eq!(d.write(INDEX_VIRT_WIDTH, 1024), Outcome::Unchanged);
        assert_eq!(d.write(INDEX_X_OFFSET, 16), {
            let mut m = Mode::packed(1024, 768, 32);
            m.offset = 64;
            Outcome::Changed(Some(m))
        });
        let Outcome::Changed(Some(m)) = d.write(INDEX_Y_OFFSET, 768) else {
            panic!("the flip was not shown");
        };
        assert_eq!(m.offset, 768 * 4096 + 64);
        assert_eq!(m.validate(FB), Ok(()));
    }

    #[test]
    fn bpp_other_than_32_and_16_is_refused_and_enable_stays_clear() {
        for bpp in [24, 8, 4, 15, 0, 0xffff] {
            let mut d = dispi();
            assert_eq!(
                program(&mut d, bpp, 640, 480, 640),
                Outcome::Refused(ModeError::Bpp(bpp))
            );
            assert_eq!(d.read(INDEX_ENABLE) & ENABLED, 0, "bpp {bpp}");
            assert_eq!(d.mode(), None);
        }
        let mut d = dispi();
        assert_eq!(
            program(&mut d, 16, 640, 480, 640),
            Outcome::Changed(Some(Mode::packed(640, 480, 16)))
        );
    }

    #[test]
    fn huge_zero_or_above_maximum_resolutions_are_refused() {
        for (w, h) in [
            (0xffff, 480),
            (640, 0xffff),
            (0, 480),
            (640, 0),
            (1921, 1200),
            (1920, 1201),
        ] {
            let mut d = dispi();
            assert!(
                matches!(
                    program(&mut d, 32, w, h, w),
                    Outcome::Refused(ModeError::Width { .. } | ModeError::Height { .. })
                ),
                "{w}x{h}"
            );
            assert_eq!(d.mode(), None);
        }
        let mut d = dispi();
        assert_eq!(
            program(&mut d, 32, 1920, 1200, 1920),
            Outcome::Changed(Some(Mode::packed(1920, 1200, 32)))
        );
    }

    #[test]
    fn a_virtual_width_narrower_than_the_width_is_refused() {
        let mut d = dispi();
        assert_eq!(
            program(&mut d, 32, 800, 600, 799),
            Outcome::Refused(ModeError::VirtWidth {
                virt_width: 799,
                width: 800
            })
        );
        assert_eq!(
            program(&mut d, 32, 800, 600, 0),
            Outcome::Refused(ModeError::VirtWidth {
                virt_width: 0,
                width: 800
            })
        );
    }

    #[test]
    fn modes_past_the_framebuffer_are_refused_without_overflow() {
        let small = Limits {
            max_width: 1920,
            max_height: 1200,
            framebuffer_bytes: 1 << 20,
        };
        let mut d = Dispi::new(small);
        // 640x480x4 = 1.2 MB > 1 MiB.
        assert!(matches!(
            program(&mut d, 32, 640, 480, 640),
            Outcome::Refused(ModeError::Framebuffer { .. })
        ));
        // The widest virtual width with the largest offsets: stride * height overflows nothing
        // and is refused.
        let mut d = dispi();
        d.write(INDEX_X_OFFSET, 0xffff);
        d.write(INDEX_Y_OFFSET, 0xffff);
        assert!(matches!(
            program(&mut d, 32, 1920, 1200, 0xffff),
            Outcome::Refused(ModeError::Framebuffer { .. })
        ));
        assert_eq!(d.mode(), None);
    }

    #[test]
    fn while_enabled_an_offset_past_the_end_keeps_the_previous_mode() {
        let mut d = dispi();
        linux_setmode(&mut d, 1024, 768);
        let before = d.mode();
        // The last row would start past the end: 4096 rows of 4096 bytes fill 16 MiB.
        assert!(matches!(
            d.write(INDEX_Y_OFFSET, 4096 - 767),
            Outcome::Refused(ModeError::Framebuffer { .. })
        ));
        assert_eq!(d.mode(), before);
        // Exactly at the end fits.
        assert!(matches!(
            d.write(INDEX_Y_OFFSET, 4096 - 768),
            Outcome::Changed(Some(m)) if m.offset == (4096 - 768) * 4096
        ));
        // One pixel further refuses, and going back changes nothing shown.
        assert!(matches!(
            d.write(INDEX_X_OFFSET, 1),
            Outcome::Refused(ModeError::Framebuffer { .. })
        ));
        assert_eq!(d.write(INDEX_X_OFFSET, 0), Outcome::Unchanged);
        assert_eq!(d.mode().map(|m| m.offset), Some((4096 - 768) * 4096));
        // A resolution change while enabled is checked too.
        assert!(matches!(
            d.write(INDEX_XRES, 1025),
            Outcome::Refused(ModeError::VirtWidth { .. })
        ));
        assert_eq!(d.mode().map(|m| m.width), Some(1024));
    }

    #[test]
    fn disabling_reports_no_mode_once() {
        let mut d = dispi();
        linux_setmode(&mut d, 800, 600);
        assert_eq!(d.write(INDEX_ENABLE, 0), Outcome::Changed(None));
        assert_eq!(d.write(INDEX_ENABLE, 0), Outcome::Unchanged);
        // Registers written while disabled change nothing shown.
        assert_eq!(d.write(INDEX_XRES, 0xffff), Outcome::Unchanged);
        assert_eq!(d.mode(), None);
    }

    #[test]
    fn getcaps_reads_the_maxima_and_keeps_the_written_values() {
        let mut d = dispi();
        d.write(INDEX_XRES, 640);
        d.write(INDEX_ENABLE, GETCAPS);
        assert_eq!(
            (d.read(INDEX_XRES), d.read(INDEX_YRES), d.read(INDEX_BPP)),
            (1920, 1200, 32)
        );
        assert_eq!(d.stored(INDEX_XRES), 640);
        d.write(INDEX_ENABLE, 0);
        assert_eq!(d.read(INDEX_XRES), 640);
    }
}
