//! FramebufferUpdate rectangles (RFC 6143 §7.6.1, §7.7): Raw, Zlib, ZRLE and the
//! pseudo-encodings dev-fb sends.
//!
//! Each encoder appends one rectangle (header and data) to an output buffer, reading the
//! guest's pixels through a [`Screen`] and converting them with the client's [`Converter`].
//! Zlib and ZRLE keep one deflate stream per client for the life of the connection, as the
//! RFC requires (each rectangle ends with a sync flush).
//!
//! Pixels go to deflate as they are produced (a row of pixels for Zlib, a row of tiles for
//! ZRLE), so the scratch memory is one such row however large the rectangle, and a whole-screen
//! rectangle is one deflate run: repeated content anywhere in the last 32 KiB is found. The
//! streams use zlib's largest hash and symbol buffers (memory level 9, about 0.5 MiB a stream):
//! longer deflate blocks, fewer block headers.

use zlib_rs::{DeflateConfig, DeflateFlush, Method, Status, Strategy};

use crate::framebuffer::Screen;
use crate::message::Rect;
use crate::pixel::{Converter, SourceFormat};

/// Encoding numbers (RFC 6143 §7.7, §7.8 and the RFB community registry).
pub mod number {
    pub const RAW: i32 = 0;
    pub const COPY_RECT: i32 = 1;
    pub const ZLIB: i32 = 6;
    pub const ZRLE: i32 = 16;
    pub const DESKTOP_SIZE: i32 = -223;
    pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
    pub const QEMU_EXTENDED_KEY: i32 = -258;
    /// CompressLevel 0..=9 is -256..=-247.
    pub const COMPRESS_LEVEL_0: i32 = -256;
    pub const COMPRESS_LEVEL_9: i32 = -247;
}

/// The pixel encodings dev-fb can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Zlib,
    Zrle,
}

impl Encoding {
    /// The first encoding in the client's list that dev-fb supports (Raw if none).
    pub fn choose(list: &[i32]) -> Encoding {
        list.iter()
            .find_map(|&e| match e {
                number::ZRLE => Some(Encoding::Zrle),
                number::ZLIB => Some(Encoding::Zlib),
                number::RAW => Some(Encoding::Raw),
                _ => None,
            })
            .unwrap_or(Encoding::Raw)
    }
}

/// Side of a ZRLE tile.
const ZRLE_TILE: u16 = 64;

/// Zlib pixel bytes gathered before they go to deflate.
const ZLIB_CHUNK: usize = 64 * 1024;

/// Why a rectangle could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("deflate failed: {0}")]
    Deflate(&'static str),
    #[error("compressed rectangle longer than 4 GiB")]
    TooLong,
}

/// One client's deflate stream for one encoding.
struct Stream(zlib_rs::Deflate);

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("total_in", &self.0.total_in())
            .field("total_out", &self.0.total_out())
            .finish()
    }
}

impl Stream {
    fn new(level: i32) -> Stream {
        Stream(zlib_rs::Deflate::new_with_config(DeflateConfig {
            level,
            method: Method::Deflated,
            window_bits: 15,
            mem_level: 9,
            strategy: Strategy::Default,
        }))
    }

    /// Deflates all of `input` into `out`; with [`DeflateFlush::SyncFlush`] also everything
    /// deflate still holds, so the client can decode it now.
    fn compress(
        &mut self,
        mut input: &[u8],
        flush: DeflateFlush,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        loop {
            let start = out.len();
            // Room for what deflate may write: it never grows data by much more than 0.1%.
            let room = (input.len() / 512 + 4096).max(input.len() / 8);
            out.resize(start.saturating_add(room), 0);
            let (in0, out0) = (self.0.total_in(), self.0.total_out());
            let status = self
                .0
                .compress(input, out.get_mut(start..).unwrap_or_default(), flush)
                .map_err(|e| EncodeError::Deflate(e.as_str()))?;
            let used = usize::try_from(self.0.total_in() - in0).unwrap_or(usize::MAX);
            let made = usize::try_from(self.0.total_out() - out0).unwrap_or(usize::MAX);
            out.truncate(start.saturating_add(made));
            input = input.get(used..).unwrap_or_default();
            // Done when all input is in and, for a flush, deflate left output room unused
            // (it had nothing more to say).
            let drained = flush == DeflateFlush::NoFlush || made < room;
            if (input.is_empty() && drained) || status == Status::BufError {
                return Ok(());
            }
        }
    }
}

/// Per-client encoder state: the deflate streams of Zlib and ZRLE.
#[derive(Debug)]
pub struct Encoder {
    level: i32,
    zlib: Option<Stream>,
    zrle: Option<Stream>,
    raw: Vec<u8>,
    row: Vec<u8>,
    values: Vec<u32>,
}

fn header(out: &mut Vec<u8>, rect: Rect, encoding: i32) {
    for v in [rect.x, rect.y, rect.w, rect.h] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encoding.to_be_bytes());
}

/// Writes the `u32` length of the compressed data that starts after the slot at `len_at`.
fn patch_len(out: &mut [u8], len_at: usize) -> Result<(), EncodeError> {
    let len = out
        .len()
        .checked_sub(len_at.saturating_add(4))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(EncodeError::TooLong)?;
    if let Some(slot) = out.get_mut(len_at..len_at.saturating_add(4)) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

fn level_of(level: u32) -> i32 {
    i32::try_from(level.min(9)).unwrap_or(9)
}

impl Encoder {
    /// A new encoder at compression `level` (0..=9).
    pub fn new(level: u32) -> Encoder {
        Encoder {
            level: level_of(level),
            zlib: None,
            zrle: None,
            raw: Vec::new(),
            row: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Gives back scratch memory beyond `keep` bytes (after a large update).
    pub fn trim(&mut self, keep: usize) {
        self.raw.clear();
        self.raw.shrink_to(keep);
    }

    /// Sets the level for streams not yet started (a running stream keeps its level).
    pub fn set_level(&mut self, level: u32) {
        self.level = level_of(level);
    }

    /// Appends one rectangle of `screen` in `encoding`.
    pub fn rect(
        &mut self,
        encoding: Encoding,
        screen: &Screen<'_>,
        rect: Rect,
        conv: &Converter,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        match encoding {
            Encoding::Raw => {
                header(out, rect, number::RAW);
                let src = SourceFormat::for_bpp(screen.mode().bpp);
                out.reserve(
                    usize::from(rect.w) * usize::from(rect.h) * conv.format().bytes_per_pixel(),
                );
                for y in rect.y..rect.y.saturating_add(rect.h) {
                    self.pixel_row(screen, rect, y);
                    conv.convert_row(src, &self.row, out);
                }
                Ok(())
            }
            Encoding::Zlib => self.deflated_rect(number::ZLIB, screen, rect, conv, out),
            Encoding::Zrle => self.deflated_rect(number::ZRLE, screen, rect, conv, out),
        }
    }

    /// A Zlib or ZRLE rectangle (`number`): the header, a length patched in afterwards, and
    /// the data deflated through that encoding's own stream, which lives as long as the
    /// connection (RFC 6143 §7.7.2, §7.7.6).
    fn deflated_rect(
        &mut self,
        number: i32,
        screen: &Screen<'_>,
        rect: Rect,
        conv: &Converter,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        header(out, rect, number);
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let zrle = number == number::ZRLE;
        let slot = if zrle { &mut self.zrle } else { &mut self.zlib };
        let level = self.level;
        let mut stream = slot.take().unwrap_or_else(|| Stream::new(level));
        let res = if zrle {
            self.zrle_data(&mut stream, screen, rect, conv, out)
        } else {
            self.zlib_data(&mut stream, screen, rect, conv, out)
        };
        *(if zrle { &mut self.zrle } else { &mut self.zlib }) = Some(stream);
        res?;
        patch_len(out, len_at)
    }

    /// Reads row `y` of `rect` into `self.row`.
    fn pixel_row(&mut self, screen: &Screen<'_>, rect: Rect, y: u16) {
        screen.row(
            u32::from(rect.x),
            u32::from(y),
            u32::from(rect.w),
            &mut self.row,
        );
    }

    /// The Zlib data of `rect`: its converted pixels, deflated a chunk of rows at a time.
    fn zlib_data(
        &mut self,
        stream: &mut Stream,
        screen: &Screen<'_>,
        rect: Rect,
        conv: &Converter,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let src = SourceFormat::for_bpp(screen.mode().bpp);
        self.raw.clear();
        for y in rect.y..rect.y.saturating_add(rect.h) {
            self.pixel_row(screen, rect, y);
            conv.convert_row(src, &self.row, &mut self.raw);
            if self.raw.len() >= ZLIB_CHUNK {
                stream.compress(&self.raw, DeflateFlush::NoFlush, out)?;
                self.raw.clear();
            }
        }
        stream.compress(&self.raw, DeflateFlush::SyncFlush, out)
    }

    /// The ZRLE data of `rect`: its 64×64 tiles, left to right, top to bottom, deflated a
    /// row of tiles at a time.
    fn zrle_data(
        &mut self,
        stream: &mut Stream,
        screen: &Screen<'_>,
        rect: Rect,
        conv: &Converter,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let src = SourceFormat::for_bpp(screen.mode().bpp);
        let cpixel = CPixel::for_converter(conv);
        let mut ty = 0u16;
        while ty < rect.h {
            let th = (rect.h - ty).min(ZRLE_TILE);
            self.raw.clear();
            let mut tx = 0u16;
            while tx < rect.w {
                let tw = (rect.w - tx).min(ZRLE_TILE);
                self.values.clear();
                for y in 0..th {
                    screen.row(
                        u32::from(rect.x) + u32::from(tx),
                        u32::from(rect.y) + u32::from(ty) + u32::from(y),
                        u32::from(tw),
                        &mut self.row,
                    );
                    conv.values_row(src, &self.row, &mut self.values);
                }
                zrle_tile(&self.values, usize::from(tw), conv, cpixel, &mut self.raw);
                tx += tw;
            }
            stream.compress(&self.raw, DeflateFlush::NoFlush, out)?;
            ty += th;
        }
        stream.compress(&[], DeflateFlush::SyncFlush, out)
    }
}

/// How ZRLE writes one pixel: whole, or as 3 of its 4 bytes (RFC 6143 §7.7.6, CPIXEL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CPixel {
    Whole,
    /// Three bytes from this index of the 4-byte wire pixel.
    Three(usize),
}

impl CPixel {
    /// CPIXEL is 3 bytes for 32 bpp true colour of depth ≤ 24 whose colour bits all lie in
    /// the low or the high 3 bytes.
    pub fn for_converter(conv: &Converter) -> CPixel {
        let f = conv.format();
        if f.bits_per_pixel != 32 || f.depth > 24 {
            return CPixel::Whole;
        }
        let mask = conv.value(255, 255, 255);
        let low = mask.leading_zeros() >= 8;
        let high = mask.trailing_zeros() >= 8;
        // Which 3 of the 4 wire bytes hold the colour: the low 3 bytes come first in little
        // endian, last in big endian, and the high 3 the other way round.
        match (low, high, f.big_endian) {
            (true, _, false) | (false, true, true) => CPixel::Three(0),
            (true, _, true) | (false, true, false) => CPixel::Three(1),
            (false, false, _) => CPixel::Whole,
        }
    }

    /// Bytes per CPIXEL for a converter whose pixels are `bpp` bytes.
    fn len(self, bpp: usize) -> usize {
        match self {
            CPixel::Whole => bpp,
            CPixel::Three(_) => 3,
        }
    }

    fn push(self, conv: &Converter, value: u32, out: &mut Vec<u8>) {
        match self {
            CPixel::Whole => conv.push_value(value, out),
            CPixel::Three(at) => {
                let bytes = if conv.format().big_endian {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                out.extend_from_slice(bytes.get(at..at + 3).unwrap_or(&[0; 3]));
            }
        }
    }
}

/// Most palette entries of a ZRLE palette tile.
const MAX_PALETTE: usize = 127;

/// Distinct pixel values of a tile, up to [`MAX_PALETTE`], with a small open-addressing index.
struct Palette {
    colours: Vec<u32>,
    slots: [u8; 256],
}

impl Palette {
    /// `None` if the tile has more than [`MAX_PALETTE`] colours.
    fn of(values: &[u32]) -> Option<Palette> {
        let mut p = Palette {
            colours: Vec::with_capacity(16),
            slots: [0; 256],
        };
        let mut last = None;
        for &v in values {
            if last == Some(v) {
                continue;
            }
            last = Some(v);
            if p.index(v).is_none() {
                if p.colours.len() >= MAX_PALETTE {
                    return None;
                }
                p.insert(v);
            }
        }
        Some(p)
    }

    fn hash(v: u32) -> usize {
        (v.wrapping_mul(0x9e37_79b1) >> 24) as usize
    }

    /// Slots hold index + 1; 0 is empty. At most 127 entries in 256 slots, so probing ends.
    fn index(&self, v: u32) -> Option<u8> {
        let mut h = Self::hash(v);
        loop {
            let s = *self.slots.get(h)?;
            if s == 0 {
                return None;
            }
            let i = s - 1;
            if self.colours.get(usize::from(i)) == Some(&v) {
                return Some(i);
            }
            h = (h + 1) & 255;
        }
    }

    fn insert(&mut self, v: u32) {
        let mut h = Self::hash(v);
        while self.slots.get(h).is_some_and(|&s| s != 0) {
            h = (h + 1) & 255;
        }
        self.colours.push(v);
        // At most MAX_PALETTE (127) colours, so the index + 1 fits a u8.
        let stored = u8::try_from(self.colours.len()).unwrap_or(0);
        if let Some(s) = self.slots.get_mut(h) {
            *s = stored;
        }
    }
}

/// Runs of equal values, in order: (value, length).
fn runs(values: &[u32]) -> Vec<(u32, usize)> {
    let mut out: Vec<(u32, usize)> = Vec::new();
    for &v in values {
        match out.last_mut() {
            Some((last, n)) if *last == v => *n += 1,
            _ => out.push((v, 1)),
        }
    }
    out
}

/// Bytes of a ZRLE run length (length − 1 as 255s and a final byte < 255).
fn run_len_bytes(n: usize) -> usize {
    (n - 1) / 255 + 1
}

fn push_run_len(n: usize, out: &mut Vec<u8>) {
    let mut rest = n - 1;
    while rest >= 255 {
        out.push(255);
        rest -= 255;
    }
    out.push(u8::try_from(rest).unwrap_or(0));
}

/// One ZRLE tile: the smallest of raw, solid, packed palette, plain RLE and palette RLE.
fn zrle_tile(values: &[u32], width: usize, conv: &Converter, cpixel: CPixel, out: &mut Vec<u8>) {
    let cp = cpixel.len(conv.format().bytes_per_pixel());
    let palette = Palette::of(values);
    let runs = runs(values);
    if let Some(p) = &palette
        && p.colours.len() == 1
    {
        out.push(1);
        cpixel.push(conv, p.colours.first().copied().unwrap_or(0), out);
        return;
    }
    let raw_size = values.len() * cp;
    let plain_rle: usize = runs.iter().map(|&(_, n)| cp + run_len_bytes(n)).sum();
    let mut best = (raw_size, 0u8);
    if plain_rle < best.0 {
        best = (plain_rle, 128);
    }
    if let Some(p) = &palette {
        let n = p.colours.len();
        let bits = match n {
            2 => 1,
            3..=4 => 2,
            _ => 4,
        };
        let height = values.len() / width.max(1);
        if n <= 16 {
            let packed = n * cp + height * (width * bits).div_ceil(8);
            if packed < best.0 {
                best = (packed, u8::try_from(n).unwrap_or(0));
            }
        }
        let prle: usize = n * cp
            + runs
                .iter()
                .map(|&(_, len)| if len == 1 { 1 } else { 1 + run_len_bytes(len) })
                .sum::<usize>();
        if prle < best.0 {
            // n ≤ MAX_PALETTE (127), so 128 + n fits a u8.
            best = (prle, 128 + u8::try_from(n).unwrap_or(0));
        }
    }
    match (best.1, &palette) {
        (128, _) => {
            out.push(128);
            for &(v, n) in &runs {
                cpixel.push(conv, v, out);
                push_run_len(n, out);
            }
        }
        (sub @ 2..=16, Some(p)) => {
            out.push(sub);
            for &c in &p.colours {
                cpixel.push(conv, c, out);
            }
            let bits = match sub {
                2 => 1,
                3..=4 => 2,
                _ => 4,
            };
            for row in values.chunks(width.max(1)) {
                let mut byte = 0u8;
                let mut used = 0;
                for &v in row {
                    let i = p.index(v).unwrap_or(0);
                    byte |= i << (8 - bits - used);
                    used += bits;
                    if used == 8 {
                        out.push(byte);
                        byte = 0;
                        used = 0;
                    }
                }
                if used > 0 {
                    out.push(byte);
                }
            }
        }
        (sub @ 130.., Some(p)) => {
            out.push(sub);
            for &c in &p.colours {
                cpixel.push(conv, c, out);
            }
            for &(v, n) in &runs {
                let i = p.index(v).unwrap_or(0);
                if n == 1 {
                    out.push(i);
                } else {
                    out.push(i | 0x80);
                    push_run_len(n, out);
                }
            }
        }
        _ => {
            out.push(0);
            for &v in values {
                cpixel.push(conv, v, out);
            }
        }
    }
}

/// A DesktopSize pseudo-rectangle (the client resizes to `w`×`h`).
pub fn desktop_size(w: u16, h: u16, out: &mut Vec<u8>) {
    header(out, Rect { x: 0, y: 0, w, h }, number::DESKTOP_SIZE);
}

/// An ExtendedDesktopSize pseudo-rectangle with one screen covering the framebuffer.
/// `reason`: 0 server change, 1 this client's request, 2 another client's; `status`: 0 ok,
/// 1 prohibited.
pub fn extended_desktop_size(w: u16, h: u16, reason: u16, status: u16, out: &mut Vec<u8>) {
    header(
        out,
        Rect {
            x: reason,
            y: status,
            w,
            h,
        },
        number::EXTENDED_DESKTOP_SIZE,
    );
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes()); // screen id
    for v in [0, 0, w, h] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&0u32.to_be_bytes()); // flags
}

/// The QEMU Extended Key Event pseudo-rectangle: tells the client it may send scancodes.
pub fn qemu_extended_key(out: &mut Vec<u8>) {
    header(out, Rect::default(), number::QEMU_EXTENDED_KEY);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixel::PixelFormat;
    use proto::display::Mode;

    fn conv() -> Converter {
        Converter::new(PixelFormat::DEFAULT)
    }

    #[test]
    fn the_first_supported_encoding_in_the_clients_order_wins() {
        assert_eq!(Encoding::choose(&[7, 16, 6, 0]), Encoding::Zrle);
        assert_eq!(Encoding::choose(&[6, 16]), Encoding::Zlib);
        assert_eq!(Encoding::choose(&[-223, 5]), Encoding::Raw);
    }

    #[test]
    fn a_raw_rect_has_its_header_and_converted_pixels() {
        let fb: Vec<u8> = vec![1, 2, 3, 0, 4, 5, 6, 0];
        let screen = Screen::new(&fb, Mode::packed(2, 1, 32)).unwrap();
        let mut out = Vec::new();
        let rect = Rect {
            x: 1,
            y: 0,
            w: 1,
            h: 1,
        };
        Encoder::new(6)
            .rect(Encoding::Raw, &screen, rect, &conv(), &mut out)
            .unwrap();
        assert_eq!(out, [0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 4, 5, 6, 0]);
    }

    #[test]
    fn zlib_rects_inflate_to_the_raw_pixels() {
        let fb: Vec<u8> = (0..64u8).collect();
        let screen = Screen::new(&fb, Mode::packed(4, 4, 32)).unwrap();
        let rect = Rect {
            x: 0,
            y: 0,
            w: 4,
            h: 4,
        };
        let mut enc = Encoder::new(6);
        let mut inflate = flate2::Decompress::new(true);
        for _ in 0..2 {
            let mut out = Vec::new();
            enc.rect(Encoding::Zlib, &screen, rect, &conv(), &mut out)
                .unwrap();
            let len = u32::from_be_bytes(out[12..16].try_into().unwrap()) as usize;
            assert_eq!(out.len(), 16 + len);
            let mut plain = Vec::with_capacity(256);
            inflate
                .decompress_vec(&out[16..], &mut plain, flate2::FlushDecompress::Sync)
                .unwrap();
            // The converted pixels: the guest's X byte becomes 0.
            let expected: Vec<u8> = fb
                .iter()
                .enumerate()
                .map(|(i, &b)| if i % 4 == 3 { 0 } else { b })
                .collect();
            assert_eq!(plain, expected, "the stream continues across rects");
        }
    }

    #[test]
    fn zrle_solid_tile_is_one_cpixel() {
        let mut out = Vec::new();
        let c = conv();
        zrle_tile(
            &[0x00ff_0000; 16],
            4,
            &c,
            CPixel::for_converter(&c),
            &mut out,
        );
        assert_eq!(out, [1, 0, 0, 0xff]);
    }

    #[test]
    fn zrle_two_colour_tile_uses_a_one_bit_packed_palette() {
        let c = conv();
        let values: Vec<u32> = (0..64).map(|i| if i % 2 == 0 { 1 } else { 2 }).collect();
        let mut out = Vec::new();
        zrle_tile(&values, 8, &c, CPixel::for_converter(&c), &mut out);
        // Subencoding 2, two 3-byte CPIXELs, 8 rows of one byte 0b01010101.
        assert_eq!(out[0], 2);
        assert_eq!(&out[1..7], &[1, 0, 0, 2, 0, 0]);
        assert_eq!(&out[7..], &[0x55; 8]);
    }

    #[test]
    fn cpixel_is_three_bytes_only_for_depth_24_in_32_bpp() {
        assert_eq!(CPixel::for_converter(&conv()), CPixel::Three(0));
        let be = Converter::new(PixelFormat {
            big_endian: true,
            ..PixelFormat::DEFAULT
        });
        assert_eq!(CPixel::for_converter(&be), CPixel::Three(1));
        let shifted = Converter::new(PixelFormat {
            red_shift: 24,
            green_shift: 16,
            blue_shift: 8,
            ..PixelFormat::DEFAULT
        });
        assert_eq!(CPixel::for_converter(&shifted), CPixel::Three(1));
        let deep = Converter::new(PixelFormat {
            depth: 32,
            ..PixelFormat::DEFAULT
        });
        assert_eq!(CPixel::for_converter(&deep), CPixel::Whole);
    }

    #[test]
    fn long_runs_encode_their_length_in_255s() {
        let mut out = Vec::new();
        push_run_len(1, &mut out);
        push_run_len(256, &mut out);
        push_run_len(511, &mut out);
        assert_eq!(out, [0, 255, 0, 255, 255, 0]);
    }
}
