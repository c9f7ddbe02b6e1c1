//! The display channel: what dev-fb is told about its framebuffer and its VNC server.
//!
//! The supervisor sends one [`DisplaySetup`] on dev-fb's bootstrap channel right after
//! [`BootstrapReply::Ready`](crate::bootstrap::BootstrapReply::Ready), like a device's
//! [`DeviceSetup`](crate::device::DeviceSetup). dev-fb already holds the framebuffer memfd
//! ([`FdRole::Framebuffer`](crate::bootstrap::FdRole::Framebuffer)) and the listening socket
//! ([`FdRole::VncListener`](crate::bootstrap::FdRole::VncListener)).
//!
//! Later, a guest programming the bochs display's DISPI registers changes the scan-out mode at
//! run time: that reaches dev-fb as [`ToDisplay::SetMode`]. Every [`Mode`] is checked against
//! the framebuffer's size with [`Mode::validate`] before dev-fb reads a pixel through it; a mode
//! that does not fit is refused (the bug class of bhyve's fbuf advisory: an offset or stride
//! past the end of the buffer).

use serde::{Deserialize, Serialize};

/// Widest and tallest mode dev-fb serves (QEMU's bochs-display limit is 16384; RFB's fields
/// are `u16`).
pub const MAX_DIMENSION: u32 = 8192;
/// Largest framebuffer memfd, in bytes (enough for 8192×8192 at 32 bpp would be 256 MiB; this
/// keeps a compromised setup from making dev-fb map more than a sane BAR).
pub const MAX_FRAMEBUFFER_BYTES: u64 = 256 << 20;
/// Longest VNC password, in bytes: VNC Authentication (RFC 6143 §7.2.2) keys DES with 8 bytes.
pub const MAX_PASSWORD_BYTES: usize = 8;

/// One scan-out mode of the framebuffer.
///
/// Pixels are little endian: 32 bpp is XRGB8888 (bytes B, G, R, X), 16 bpp is RGB565 — what
/// the bochs display and Linux's `bochs` DRM driver use. Row `y` starts at byte
/// `offset + y * stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mode {
    pub width: u32,
    pub height: u32,
    /// Bits per pixel: 32 or 16.
    pub bpp: u32,
    /// Bytes from one row to the next, at least `width * bpp / 8`.
    pub stride: u32,
    /// Byte offset of the first visible pixel in the framebuffer.
    pub offset: u64,
}

impl Mode {
    /// A packed mode (`stride = width * bpp / 8`, offset 0); unchecked until [`Mode::validate`].
    pub fn packed(width: u32, height: u32, bpp: u32) -> Mode {
        Mode {
            width,
            height,
            bpp,
            stride: width.saturating_mul(bpp / 8),
            offset: 0,
        }
    }

    /// Bytes per pixel (2 or 4 for a valid mode).
    pub fn bytes_per_pixel(&self) -> u32 {
        self.bpp / 8
    }

    /// Checks that every row of the mode lies inside a framebuffer of `framebuffer_bytes` and
    /// that the mode is one dev-fb serves.
    pub fn validate(&self, framebuffer_bytes: u64) -> Result<(), DisplayError> {
        let bad = || DisplayError::Mode {
            mode: *self,
            framebuffer_bytes,
        };
        if self.width == 0
            || self.height == 0
            || self.width > MAX_DIMENSION
            || self.height > MAX_DIMENSION
            || !matches!(self.bpp, 16 | 32)
        {
            return Err(bad());
        }
        let row = u64::from(self.width) * u64::from(self.bytes_per_pixel());
        if u64::from(self.stride) < row {
            return Err(bad());
        }
        // The last row needs only `row` bytes, not a whole stride.
        let end = u64::from(self.height - 1)
            .checked_mul(u64::from(self.stride))
            .and_then(|v| v.checked_add(row))
            .and_then(|v| v.checked_add(self.offset))
            .ok_or_else(bad)?;
        if end > framebuffer_bytes {
            return Err(bad());
        }
        Ok(())
    }
}

/// Who may keep a connection when a client asks for exclusive access (RFC 6143 §7.3.1,
/// `ClientInit`'s shared-flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SharePolicy {
    /// As RFB says: a client with shared-flag 0 disconnects the others.
    #[default]
    AllowExclusive,
    /// Every client shares the display, whatever its flag says (QEMU's `share=force-shared`).
    ForceShared,
}

/// The setup message dev-fb reads after `Ready`. Its `Debug` hides the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplaySetup {
    /// The initial mode's width and height (32 bpp, packed); `graphics_res`.
    pub width: u32,
    pub height: u32,
    /// The largest mode the guest may set later.
    pub max_width: u32,
    pub max_height: u32,
    /// Size of the framebuffer memfd (BAR0), at most [`MAX_FRAMEBUFFER_BYTES`]; dev-fb maps
    /// exactly this much and checks it against the memfd.
    pub framebuffer_bytes: u64,
    /// `vnc_password`: `Some` asks for VNC Authentication; 1 to [`MAX_PASSWORD_BYTES`] bytes.
    /// Never logged: `Debug` prints `Some("<hidden>")`.
    pub password: Option<String>,
    /// What a non-shared client does to the others.
    pub share: SharePolicy,
}

impl std::fmt::Debug for DisplaySetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisplaySetup")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("max_width", &self.max_width)
            .field("max_height", &self.max_height)
            .field("framebuffer_bytes", &self.framebuffer_bytes)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("share", &self.share)
            .finish()
    }
}

impl DisplaySetup {
    /// The initial mode: 32 bpp XRGB8888, packed, at offset 0.
    pub fn initial_mode(&self) -> Mode {
        Mode::packed(self.width, self.height, 32)
    }

    /// Checks the bounds dev-fb relies on.
    pub fn validate(&self) -> Result<(), DisplayError> {
        if self.framebuffer_bytes == 0 || self.framebuffer_bytes > MAX_FRAMEBUFFER_BYTES {
            return Err(DisplayError::FramebufferSize(self.framebuffer_bytes));
        }
        if self.max_width == 0
            || self.max_height == 0
            || self.max_width > MAX_DIMENSION
            || self.max_height > MAX_DIMENSION
            || self.width > self.max_width
            || self.height > self.max_height
        {
            return Err(DisplayError::MaxMode {
                width: self.max_width,
                height: self.max_height,
            });
        }
        self.initial_mode().validate(self.framebuffer_bytes)?;
        if let Some(p) = &self.password
            && (p.is_empty() || p.len() > MAX_PASSWORD_BYTES)
        {
            return Err(DisplayError::PasswordLength);
        }
        Ok(())
    }

    /// Checks a run-time mode: inside the framebuffer and no larger than the maximum.
    pub fn check_mode(&self, mode: &Mode) -> Result<(), DisplayError> {
        mode.validate(self.framebuffer_bytes)?;
        if mode.width > self.max_width || mode.height > self.max_height {
            return Err(DisplayError::Mode {
                mode: *mode,
                framebuffer_bytes: self.framebuffer_bytes,
            });
        }
        Ok(())
    }
}

/// Run-time messages to dev-fb (from the runner's bochs-display registers, later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDisplay {
    /// The guest set a new scan-out mode; refused unless [`DisplaySetup::check_mode`] accepts it.
    SetMode(Mode),
}

/// Why a display message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisplayError {
    #[error("framebuffer size {0} is not 1 to {MAX_FRAMEBUFFER_BYTES} bytes")]
    FramebufferSize(u64),
    #[error("maximum mode {width}x{height} is not 1 to {MAX_DIMENSION} on each side")]
    MaxMode { width: u32, height: u32 },
    #[error("mode {mode:?} does not fit a {framebuffer_bytes}-byte framebuffer")]
    Mode { mode: Mode, framebuffer_bytes: u64 },
    #[error("VNC password is not 1 to {MAX_PASSWORD_BYTES} bytes")]
    PasswordLength,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> DisplaySetup {
        DisplaySetup {
            width: 1024,
            height: 768,
            max_width: 1920,
            max_height: 1200,
            framebuffer_bytes: 1920 * 1200 * 4,
            password: None,
            share: SharePolicy::AllowExclusive,
        }
    }

    #[test]
    fn a_sensible_setup_is_valid() {
        assert_eq!(setup().validate(), Ok(()));
    }

    #[test]
    fn debug_output_hides_the_password() {
        let mut s = setup();
        s.password = Some("hunter2".into());
        let text = format!("{s:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<hidden>"), "{text}");
    }

    #[test]
    fn an_initial_mode_larger_than_the_framebuffer_is_refused() {
        let mut s = setup();
        s.framebuffer_bytes = 1024 * 767 * 4;
        assert!(matches!(s.validate(), Err(DisplayError::Mode { .. })));
    }

    #[test]
    fn passwords_longer_than_eight_bytes_or_empty_are_refused() {
        let mut s = setup();
        s.password = Some("123456789".into());
        assert_eq!(s.validate(), Err(DisplayError::PasswordLength));
        s.password = Some(String::new());
        assert_eq!(s.validate(), Err(DisplayError::PasswordLength));
        s.password = Some("12345678".into());
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn modes_past_the_end_of_the_framebuffer_are_refused() {
        let s = setup();
        let mut m = Mode::packed(1920, 1200, 32);
        assert_eq!(s.check_mode(&m), Ok(()));
        m.offset = 4;
        assert!(s.check_mode(&m).is_err());
        m.offset = 0;
        m.stride = 1920 * 4 + 4;
        assert!(s.check_mode(&m).is_err());
        m.stride = 100;
        assert!(s.check_mode(&m).is_err(), "stride shorter than a row");
    }

    #[test]
    fn odd_bpp_zero_sizes_and_huge_offsets_are_refused() {
        let s = setup();
        assert!(s.check_mode(&Mode::packed(640, 480, 24)).is_err());
        assert!(s.check_mode(&Mode::packed(0, 480, 32)).is_err());
        let mut m = Mode::packed(640, 480, 16);
        assert_eq!(s.check_mode(&m), Ok(()));
        m.offset = u64::MAX - 10;
        assert!(s.check_mode(&m).is_err());
    }

    #[test]
    fn modes_above_the_maximum_are_refused_even_if_they_fit() {
        let mut s = setup();
        s.max_width = 800;
        s.width = 800;
        s.height = 600;
        assert!(s.check_mode(&Mode::packed(1024, 768, 32)).is_err());
    }
}
