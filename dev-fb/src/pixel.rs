//! Pixel formats: the client's (RFC 6143 §7.4 PIXEL_FORMAT) and the conversion from the
//! guest's framebuffer pixels into it.
//!
//! The guest's pixels are little-endian XRGB8888 (32 bpp) or RGB565 (16 bpp). A client may ask
//! for any true-colour format of 8, 16 or 32 bits per pixel, either byte order, with any
//! shifts and maxima that fit; dev-fb honours it exactly (bhyve's server ignores it, which is
//! why its clients show a broken screen below 24 bpp). Colour-map formats are refused: the
//! connection is closed with the reason logged.

/// A client pixel format, validated: true colour, 8/16/32 bpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

/// Why a client's SetPixelFormat is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PixelFormatError {
    #[error("colour-map pixel formats are not supported")]
    ColourMap,
    #[error("{0} bits per pixel is not 8, 16 or 32")]
    BitsPerPixel(u8),
    #[error("a colour channel's maximum or shift does not fit the pixel")]
    Channel,
}

impl PixelFormat {
    /// The server's default: 32 bpp, depth 24, little endian, XRGB (red at bit 16).
    pub const DEFAULT: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// Parses and checks the 16-byte PIXEL_FORMAT structure.
    pub fn parse(b: &[u8; 16]) -> Result<PixelFormat, PixelFormatError> {
        let [
            bpp,
            depth,
            be,
            tc,
            rm0,
            rm1,
            gm0,
            gm1,
            bm0,
            bm1,
            rs,
            gs,
            bs,
            ..,
        ] = *b;
        if tc == 0 {
            return Err(PixelFormatError::ColourMap);
        }
        if !matches!(bpp, 8 | 16 | 32) {
            return Err(PixelFormatError::BitsPerPixel(bpp));
        }
        let pf = PixelFormat {
            bits_per_pixel: bpp,
            depth,
            big_endian: be != 0,
            red_max: u16::from_be_bytes([rm0, rm1]),
            green_max: u16::from_be_bytes([gm0, gm1]),
            blue_max: u16::from_be_bytes([bm0, bm1]),
            red_shift: rs,
            green_shift: gs,
            blue_shift: bs,
        };
        for (max, shift) in [(pf.red_max, rs), (pf.green_max, gs), (pf.blue_max, bs)] {
            if !channel_fits(max, shift, bpp) {
                return Err(PixelFormatError::Channel);
            }
        }
        Ok(pf)
    }

    /// The 16-byte wire form (ServerInit).
    pub fn to_bytes(&self) -> [u8; 16] {
        let [rm0, rm1] = self.red_max.to_be_bytes();
        let [gm0, gm1] = self.green_max.to_be_bytes();
        let [bm0, bm1] = self.blue_max.to_be_bytes();
        [
            self.bits_per_pixel,
            self.depth,
            u8::from(self.big_endian),
            1,
            rm0,
            rm1,
            gm0,
            gm1,
            bm0,
            bm1,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
            0,
            0,
            0,
        ]
    }

    /// Bytes per pixel on the wire: 1, 2 or 4.
    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }
}

/// Whether `max << shift` fits in `bpp` bits.
fn channel_fits(max: u16, shift: u8, bpp: u8) -> bool {
    let bits = 16 - max.leading_zeros();
    u32::from(shift) + bits <= u32::from(bpp)
}

/// The guest's pixel layout in the framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// 32 bpp little-endian XRGB8888.
    Xrgb8888,
    /// 16 bpp little-endian RGB565.
    Rgb565,
}

impl SourceFormat {
    /// The layout of a mode's `bpp` (32 or 16; anything else was refused by `Mode::validate`).
    pub fn for_bpp(bpp: u32) -> SourceFormat {
        if bpp == 16 {
            SourceFormat::Rgb565
        } else {
            SourceFormat::Xrgb8888
        }
    }

    /// Bytes per source pixel.
    pub fn bytes(self) -> usize {
        match self {
            SourceFormat::Xrgb8888 => 4,
            SourceFormat::Rgb565 => 2,
        }
    }

    /// 8-bit red, green and blue of the pixel at the start of `px` (0 if `px` is short).
    pub fn rgb(self, px: &[u8]) -> (u8, u8, u8) {
        match self {
            SourceFormat::Xrgb8888 => match px {
                [b, g, r, ..] => (*r, *g, *b),
                _ => (0, 0, 0),
            },
            SourceFormat::Rgb565 => match px {
                [lo, hi, ..] => {
                    let v = u16::from_le_bytes([*lo, *hi]);
                    let r5 = ((v >> 11) & 0x1f) as u8;
                    let g6 = ((v >> 5) & 0x3f) as u8;
                    let b5 = (v & 0x1f) as u8;
                    // Replicate the top bits so that full scale maps to 255.
                    (
                        (r5 << 3) | (r5 >> 2),
                        (g6 << 2) | (g6 >> 4),
                        (b5 << 3) | (b5 >> 2),
                    )
                }
                _ => (0, 0, 0),
            },
        }
    }
}

/// A precomputed conversion from 8-bit channels into one client pixel format.
#[derive(Clone)]
pub struct Converter {
    format: PixelFormat,
    red: [u32; 256],
    green: [u32; 256],
    blue: [u32; 256],
}

impl std::fmt::Debug for Converter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Converter")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

fn channel_table(max: u16, shift: u8) -> [u32; 256] {
    let mut t = [0u32; 256];
    for (v, slot) in (0u32..).zip(t.iter_mut()) {
        // Rounded scaling of 0..=255 onto 0..=max; `max << shift` fits the pixel (checked by
        // `PixelFormat::parse`), so the shift cannot lose bits.
        let scaled = (v * u32::from(max) + 127) / 255;
        *slot = scaled.checked_shl(u32::from(shift)).unwrap_or(0);
    }
    t
}

impl Converter {
    pub fn new(format: PixelFormat) -> Converter {
        Converter {
            red: channel_table(format.red_max, format.red_shift),
            green: channel_table(format.green_max, format.green_shift),
            blue: channel_table(format.blue_max, format.blue_shift),
            format,
        }
    }

    pub fn format(&self) -> &PixelFormat {
        &self.format
    }

    /// The client's pixel value for an 8-bit colour.
    pub fn value(&self, r: u8, g: u8, b: u8) -> u32 {
        let [r, g, b] = [usize::from(r), usize::from(g), usize::from(b)];
        // Indexing by a u8 into 256-entry tables cannot go out of range.
        self.red.get(r).copied().unwrap_or(0)
            | self.green.get(g).copied().unwrap_or(0)
            | self.blue.get(b).copied().unwrap_or(0)
    }

    /// Appends `value` in the client's byte order and size.
    // `value` was built from channels that fit the pixel size (checked by `PixelFormat::parse`),
    // so narrowing to 8 or 16 bits drops only zero bits.
    #[allow(clippy::cast_possible_truncation)]
    pub fn push_value(&self, value: u32, out: &mut Vec<u8>) {
        match (self.format.bits_per_pixel, self.format.big_endian) {
            (8, _) => out.push(value as u8),
            (16, false) => out.extend_from_slice(&(value as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(value as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&value.to_le_bytes()),
            (_, true) => out.extend_from_slice(&value.to_be_bytes()),
        }
    }

    /// Converts a row of source pixels and appends them to `out`.
    pub fn convert_row(&self, src: SourceFormat, row: &[u8], out: &mut Vec<u8>) {
        for px in row.chunks_exact(src.bytes()) {
            let (r, g, b) = src.rgb(px);
            self.push_value(self.value(r, g, b), out);
        }
    }

    /// Converts a row into pixel values (for encoders that look at whole pixels).
    pub fn values_row(&self, src: SourceFormat, row: &[u8], out: &mut Vec<u32>) {
        for px in row.chunks_exact(src.bytes()) {
            let (r, g, b) = src.rgb(px);
            out.push(self.value(r, g, b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(bpp: u8, be: bool, tc: bool, max: [u16; 3], shift: [u8; 3]) -> [u8; 16] {
        let [r, g, b] = max.map(u16::to_be_bytes);
        [
            bpp,
            bpp.min(24),
            u8::from(be),
            u8::from(tc),
            r[0],
            r[1],
            g[0],
            g[1],
            b[0],
            b[1],
            shift[0],
            shift[1],
            shift[2],
            0,
            0,
            0,
        ]
    }

    #[test]
    fn default_format_round_trips_through_the_wire_form() {
        let bytes = PixelFormat::DEFAULT.to_bytes();
        assert_eq!(PixelFormat::parse(&bytes), Ok(PixelFormat::DEFAULT));
    }

    #[test]
    fn colour_map_formats_are_refused() {
        let b = wire(8, false, false, [7, 7, 3], [0, 3, 6]);
        assert_eq!(PixelFormat::parse(&b), Err(PixelFormatError::ColourMap));
    }

    #[test]
    fn odd_bit_depths_and_overflowing_channels_are_refused() {
        assert_eq!(
            PixelFormat::parse(&wire(24, false, true, [255; 3], [16, 8, 0])),
            Err(PixelFormatError::BitsPerPixel(24))
        );
        assert_eq!(
            PixelFormat::parse(&wire(8, false, true, [255; 3], [16, 8, 0])),
            Err(PixelFormatError::Channel)
        );
        assert_eq!(
            PixelFormat::parse(&wire(32, false, true, [255; 3], [200, 8, 0])),
            Err(PixelFormatError::Channel)
        );
    }

    #[test]
    fn rgb565_big_endian_pure_red_is_f800_in_network_order() {
        let pf = PixelFormat::parse(&wire(16, true, true, [31, 63, 31], [11, 5, 0])).unwrap();
        let c = Converter::new(pf);
        let mut out = Vec::new();
        // One XRGB8888 pixel: B, G, R, X.
        c.convert_row(SourceFormat::Xrgb8888, &[0, 0, 255, 0], &mut out);
        assert_eq!(out, [0xf8, 0x00]);
    }

    #[test]
    fn bgr233_maps_full_scale_channels_to_their_maxima() {
        let pf = PixelFormat::parse(&wire(8, false, true, [7, 7, 3], [0, 3, 6])).unwrap();
        let c = Converter::new(pf);
        assert_eq!(c.value(255, 0, 0), 0x07);
        assert_eq!(c.value(0, 255, 0), 0x38);
        assert_eq!(c.value(0, 0, 255), 0xc0);
        assert_eq!(c.value(255, 255, 255), 0xff);
    }

    #[test]
    fn rgb565_source_full_scale_reads_as_255() {
        let white = 0xffffu16.to_le_bytes();
        assert_eq!(SourceFormat::Rgb565.rgb(&white), (255, 255, 255));
        let green = 0x07e0u16.to_le_bytes();
        assert_eq!(SourceFormat::Rgb565.rgb(&green), (0, 255, 0));
    }

    #[test]
    fn thirty_two_bit_big_endian_puts_the_high_byte_first() {
        let c = Converter::new(PixelFormat {
            big_endian: true,
            ..PixelFormat::DEFAULT
        });
        let mut out = Vec::new();
        c.convert_row(SourceFormat::Xrgb8888, &[0x33, 0x22, 0x11, 0], &mut out);
        assert_eq!(out, [0x00, 0x11, 0x22, 0x33]);
    }
}
