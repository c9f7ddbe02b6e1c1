//! The display's EDID: one 128-byte EDID 1.4 base block (VESA E-EDID Release A, Rev. 2)
//! whose preferred mode is the configured resolution, described by a detailed timing
//! descriptor with reduced-blanking timings at 60 Hz. Linux's `bochs` driver reads it from
//! BAR2 offset 0 and offers its modes; the established and standard timings add the smaller
//! modes of vm-bhyve's `graphics_res` list that fit the maximum.

/// Bytes of the block.
pub(super) const EDID_BYTES: usize = 128;

const HEADER: [u8; 8] = [0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00];
/// Manufacturer "CVM" in the EDID's three 5-bit letters.
const MANUFACTURER: [u8; 3] = *b"CVM";
const PRODUCT: u16 = 0x0001;
/// Week 1 of 2026 (years count from 1990).
const WEEK: u8 = 1;
const YEAR: u8 = 36;
/// Digital input, 8 bits per primary colour, interface not defined.
const VIDEO_INPUT: u8 = 0xa0;
/// Gamma 2.2, stored as (gamma * 100) - 100.
const GAMMA: u8 = 120;
/// RGB 4:4:4, sRGB is the default colour space, the preferred timing is the native mode.
const FEATURES: u8 = 0x06;
/// Reduced-blanking timing parameters (pixels and lines).
const H_BLANK: u32 = 160;
const H_FRONT: u32 = 48;
const H_SYNC: u32 = 32;
const V_FRONT: u32 = 3;
const V_SYNC: u32 = 6;
/// Minimum vertical blanking time of reduced blanking (µs) within a 60 Hz frame (µs).
const V_BLANK_US: u32 = 460;
const FRAME_US: u32 = 16_667;
const REFRESH_HZ: u32 = 60;
/// Largest pixel clock a detailed timing holds, in 10 kHz units.
const MAX_CLOCK_10KHZ: u32 = 0xffff;
/// Detailed timing flags: digital separate sync, hsync positive, vsync negative.
const DTD_FLAGS: u8 = 0x1a;
/// Largest active size a detailed timing holds (12 bits).
pub(super) const MAX_DTD_ACTIVE: u32 = 0xfff;
/// Assumed pixel density for the physical size: 96 DPI, as 960 pixels per 254 mm.
const PIXELS_PER_254MM: u32 = 960;
const NAME: &[u8] = b"capvm";

/// Established timings (byte, bit) of 640x480, 800x600 and 1024x768 at 60 Hz.
const ESTABLISHED: [(u32, u32, usize, u8); 3] =
    [(640, 480, 0, 5), (800, 600, 0, 0), (1024, 768, 1, 3)];
/// Standard timings of vm-bhyve's larger modes: width, height, aspect code (00 16:10,
/// 01 4:3, 10 5:4, 11 16:9).
const STANDARD: [(u32, u32, u8); 6] = [
    (1920, 1200, 0b00),
    (1920, 1080, 0b11),
    (1600, 1200, 0b01),
    (1600, 900, 0b11),
    (1280, 1024, 0b10),
    (1280, 720, 0b11),
];

/// sRGB chromaticity (x, y in thousandths... of red, green, blue, white).
const CHROMA: [(u32, u32); 4] = [(6400, 3300), (3000, 6000), (1500, 600), (3127, 3290)];

/// A 10-bit chromaticity coordinate from ten-thousandths.
fn chroma10(v: u32) -> u32 {
    (v * 1024 + 5000) / 10_000
}

fn low8(v: u32) -> u8 {
    u8::try_from(v & 0xff).unwrap_or(0)
}

fn bits(v: u32, shift: u32, mask: u32) -> u8 {
    u8::try_from((v >> shift) & mask).unwrap_or(0)
}

/// The reduced-blanking timing of `width`x`height`: (pixel clock in 10 kHz, h blank, v blank).
fn timing(width: u32, height: u32) -> (u32, u32, u32) {
    let v_blank = (height * V_BLANK_US)
        .div_ceil(FRAME_US - V_BLANK_US)
        .max(V_FRONT + V_SYNC + 6);
    let total = u64::from(width + H_BLANK) * u64::from(height + v_blank) * u64::from(REFRESH_HZ);
    let clock = u32::try_from(total.div_ceil(10_000))
        .unwrap_or(MAX_CLOCK_10KHZ)
        .min(MAX_CLOCK_10KHZ);
    (clock, H_BLANK, v_blank)
}

fn detailed_timing(width: u32, height: u32) -> [u8; 18] {
    let (clock, h_blank, v_blank) = timing(width, height);
    let width_mm = width * 254 / PIXELS_PER_254MM;
    let height_mm = height * 254 / PIXELS_PER_254MM;
    let clock = u16::try_from(clock).unwrap_or(u16::MAX).to_le_bytes();
    [
        clock[0],
        clock[1],
        low8(width),
        low8(h_blank),
        (bits(width, 8, 0xf) << 4) | bits(h_blank, 8, 0xf),
        low8(height),
        low8(v_blank),
        (bits(height, 8, 0xf) << 4) | bits(v_blank, 8, 0xf),
        low8(H_FRONT),
        low8(H_SYNC),
        (bits(V_FRONT, 0, 0xf) << 4) | bits(V_SYNC, 0, 0xf),
        (bits(H_FRONT, 8, 3) << 6)
            | (bits(H_SYNC, 8, 3) << 4)
            | (bits(V_FRONT, 4, 3) << 2)
            | bits(V_SYNC, 4, 3),
        low8(width_mm),
        low8(height_mm),
        (bits(width_mm, 8, 0xf) << 4) | bits(height_mm, 8, 0xf),
        0,
        0,
        DTD_FLAGS,
    ]
}

/// A display descriptor (not a timing): tag and 13 bytes of payload.
fn descriptor(tag: u8, payload: [u8; 13]) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    d[5..].copy_from_slice(&payload);
    d
}

/// The range limits descriptor (tag 0xFD): 50–75 Hz, horizontal and pixel clock limits that
/// hold the preferred mode; "range limits only".
fn range_limits(width: u32, height: u32) -> [u8; 18] {
    let (clock, _, v_blank) = timing(width, height);
    let h_khz = ((height + v_blank) * REFRESH_HZ).div_ceil(1000);
    let clamp = |v: u32, lo: u32| u8::try_from(v.clamp(lo, 255)).unwrap_or(255);
    let mut p = [0x20u8; 13];
    p[..7].copy_from_slice(&[
        50,
        75,
        30,
        clamp(h_khz, 80),
        // 10 MHz units.
        clamp(clock.div_ceil(1000), 16),
        0x01,
        0x0a,
    ]);
    descriptor(0xfd, p)
}

fn name_descriptor() -> [u8; 18] {
    let mut p = [0x20u8; 13];
    p[..NAME.len()].copy_from_slice(NAME);
    p[NAME.len()] = 0x0a;
    descriptor(0xfc, p)
}

/// The EDID of a display whose preferred mode is `width`x`height` and whose largest is
/// `max_width`x`max_height`. `width` and `height` are at most [`MAX_DTD_ACTIVE`]
/// (`DisplayConfig::validate` checks it); larger values are clipped.
pub(super) fn build(width: u32, height: u32, max_width: u32, max_height: u32) -> [u8; EDID_BYTES] {
    let (width, height) = (width.min(MAX_DTD_ACTIVE), height.min(MAX_DTD_ACTIVE));
    let fits = |w: u32, h: u32| w <= max_width && h <= max_height;
    let mut e = [0u8; EDID_BYTES];
    e[..8].copy_from_slice(&HEADER);
    let letter = |c: u8| u16::from(c - b'A' + 1);
    let id =
        (letter(MANUFACTURER[0]) << 10) | (letter(MANUFACTURER[1]) << 5) | letter(MANUFACTURER[2]);
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&PRODUCT.to_le_bytes());
    e[16] = WEEK;
    e[17] = YEAR;
    e[18] = 1;
    e[19] = 4;
    e[20] = VIDEO_INPUT;
    let cm = |px: u32| u8::try_from(px * 254 / PIXELS_PER_254MM / 10).unwrap_or(u8::MAX);
    e[21] = cm(width);
    e[22] = cm(height);
    e[23] = GAMMA;
    e[24] = FEATURES;
    // Chromaticity: two low bits of each coordinate packed in bytes 25–26, high eight bits
    // in 27–34.
    let coords: Vec<u32> = CHROMA
        .iter()
        .flat_map(|&(x, y)| [chroma10(x), chroma10(y)])
        .collect();
    for (i, c) in coords.iter().enumerate() {
        let byte = 25 + i / 4;
        let shift = 6 - 2 * (i % 4);
        e[byte] |= bits(*c, 0, 3) << shift;
        e[27 + i] = bits(*c, 2, 0xff);
    }
    for (w, h, byte, bit) in ESTABLISHED {
        if fits(w, h) {
            e[35 + byte] |= 1 << bit;
        }
    }
    let mut slot = 38;
    for (w, h, aspect) in STANDARD {
        if fits(w, h) {
            e[slot] = low8(w / 8 - 31);
            e[slot + 1] = aspect << 6; // 60 Hz
            slot += 2;
        }
    }
    while slot < 54 {
        e[slot] = 0x01;
        e[slot + 1] = 0x01;
        slot += 2;
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    e[72..90].copy_from_slice(&range_limits(width, height));
    e[90..108].copy_from_slice(&name_descriptor());
    e[108..126].copy_from_slice(&descriptor(0x10, [0; 13]));
    let sum = e[..127].iter().fold(0u8, |s, &b| s.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the preferred detailed timing: (hactive, vactive, clock in 10 kHz).
    fn preferred(e: &[u8; EDID_BYTES]) -> (u32, u32, u32) {
        let d = &e[54..72];
        let h = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
        let v = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
        (h, v, u32::from(u16::from_le_bytes([d[0], d[1]])))
    }

    #[test]
    fn the_block_has_the_header_version_and_a_zero_checksum() {
        let e = build(1024, 768, 1920, 1200);
        assert_eq!(e[..8], HEADER);
        assert_eq!((e[18], e[19]), (1, 4));
        assert_eq!(e.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
        assert_eq!(e[126], 0, "no extension blocks");
        // "CVM": C=3, V=22, M=13.
        assert_eq!(
            u16::from_be_bytes([e[8], e[9]]),
            (0x03 << 10) | (0x16 << 5) | 0x0d
        );
    }

    #[test]
    fn the_preferred_timing_is_the_configured_resolution_at_about_60_hz() {
        for (w, h) in [(1024, 768), (1600, 900), (640, 480), (64, 48), (4095, 4095)] {
            let e = build(w, h, 4095, 4095);
            let (pw, ph, clock) = preferred(&e);
            assert_eq!((pw, ph), (w, h));
            assert!(clock > 0);
            let d = &e[54..72];
            let h_blank = u32::from(d[3]) | (u32::from(d[4] & 0xf) << 8);
            let v_blank = u32::from(d[6]) | (u32::from(d[7] & 0xf) << 8);
            let hz = f64::from(clock) * 10_000.0 / f64::from((w + h_blank) * (h + v_blank));
            assert!(
                clock == 0xffff || (59.9..60.5).contains(&hz),
                "{w}x{h}: {hz} Hz"
            );
        }
        // The smallest mode still has a timing (its refresh rounds to 10 kHz clock steps).
        assert_eq!(preferred(&build(1, 1, 1, 1)).0, 1);
        assert!(preferred(&build(1, 1, 1, 1)).2 > 0);
        // 1920x1080: the blanking of CVT-RB (vtotal 1111); 138.66 MHz for exactly 60 Hz where
        // CVT-RB rounds to 138.5 MHz and 59.93 Hz.
        let e = build(1920, 1080, 1920, 1080);
        assert_eq!(e[54 + 6], 31, "vertical blanking lines");
        assert_eq!(preferred(&e).2, 13_866);
    }

    #[test]
    fn only_modes_within_the_maximum_are_listed() {
        let e = build(800, 600, 1024, 768);
        assert_eq!(e[35], (1 << 5) | 1, "640x480 and 800x600");
        assert_eq!(e[36], 1 << 3, "1024x768");
        assert!(e[38..54].iter().all(|&b| b == 1), "no standard timing fits");
        let e = build(1920, 1200, 1920, 1200);
        // 1920x1200 16:10 first: (1920/8 - 31) = 209.
        assert_eq!((e[38], e[39]), (209, 0));
        assert_eq!((e[40], e[41]), (209, 0b11 << 6));
        assert_eq!((e[50], e[51]), (1, 1), "six standard timings, two unused");
    }

    #[test]
    fn descriptors_are_range_limits_name_and_dummy() {
        let e = build(1024, 768, 1920, 1200);
        assert_eq!(e[72..76], [0, 0, 0, 0xfd]);
        assert_eq!(e[90..96], [0, 0, 0, 0xfc, 0, b'c']);
        assert_eq!(&e[95..101], b"capvm\n");
        assert_eq!(e[108..112], [0, 0, 0, 0x10]);
        // sRGB white point x 0.3127 -> 320 (0x140): high bits 0x50, low bits 0.
        assert_eq!(e[33], 0x50);
    }
}
