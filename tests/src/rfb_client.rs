//! A small RFB (VNC) client for device-level tests of dev-fb: the handshake of RFB 3.3, 3.7
//! and 3.8 with security None or VNC Authentication, `SetPixelFormat`, `SetEncodings`, update
//! requests, input events, and a decoder for Raw, Zlib and ZRLE into a local copy of the
//! screen in the client's own pixel values (so a test checks the values the server chose).
//!
//! Written from RFC 6143, independently of dev-fb's encoder. Blocking, with a read timeout:
//! a server that stops answering fails the test instead of hanging it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockEncrypt, KeyInit};
use flate2::{Decompress, FlushDecompress};

/// How long any single read may wait.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Encoding numbers.
pub const RAW: i32 = 0;
pub const ZLIB: i32 = 6;
pub const ZRLE: i32 = 16;
pub const DESKTOP_SIZE: i32 = -223;
pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
pub const QEMU_EXTENDED_KEY: i32 = -258;

/// A true-colour pixel format, as the client asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub bpp: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub max: [u16; 3],
    pub shift: [u8; 3],
}

impl Format {
    /// 32 bpp, depth 24, little endian, red at bit 16.
    pub const RGB888_LE: Format = Format {
        bpp: 32,
        depth: 24,
        big_endian: false,
        max: [255, 255, 255],
        shift: [16, 8, 0],
    };
    /// 32 bpp, depth 24, big endian, red at bit 16.
    pub const RGB888_BE: Format = Format {
        big_endian: true,
        ..Format::RGB888_LE
    };
    /// 16 bpp RGB565, little endian.
    pub const RGB565_LE: Format = Format {
        bpp: 16,
        depth: 16,
        big_endian: false,
        max: [31, 63, 31],
        shift: [11, 5, 0],
    };
    /// 8 bpp true colour 3-3-2 (red in the top bits).
    pub const RGB332: Format = Format {
        bpp: 8,
        depth: 8,
        big_endian: false,
        max: [7, 7, 3],
        shift: [5, 2, 0],
    };

    pub fn to_bytes(self) -> [u8; 16] {
        let m = self.max.map(u16::to_be_bytes);
        [
            self.bpp,
            self.depth,
            u8::from(self.big_endian),
            1,
            m[0][0],
            m[0][1],
            m[1][0],
            m[1][1],
            m[2][0],
            m[2][1],
            self.shift[0],
            self.shift[1],
            self.shift[2],
            0,
            0,
            0,
        ]
    }

    fn parse(b: &[u8]) -> anyhow::Result<Format> {
        ensure!(b.len() >= 16, "short pixel format");
        ensure!(b[3] == 1, "server pixel format is not true colour");
        Ok(Format {
            bpp: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            max: [
                u16::from_be_bytes([b[4], b[5]]),
                u16::from_be_bytes([b[6], b[7]]),
                u16::from_be_bytes([b[8], b[9]]),
            ],
            shift: [b[10], b[11], b[12]],
        })
    }

    pub fn bytes(self) -> usize {
        usize::from(self.bpp / 8)
    }

    /// The pixel value an ideal server sends for an 8-bit colour (rounded scaling).
    pub fn value_of(self, rgb: [u8; 3]) -> u32 {
        (0..3)
            .map(|i| {
                let scaled = (u32::from(rgb[i]) * u32::from(self.max[i]) + 127) / 255;
                scaled << self.shift[i]
            })
            .fold(0, |a, b| a | b)
    }

    /// Reads one pixel of `bytes()` bytes in this format's byte order.
    fn read(self, b: &[u8]) -> u32 {
        match (self.bpp, self.big_endian) {
            (8, _) => u32::from(b[0]),
            (16, false) => u32::from(u16::from_le_bytes([b[0], b[1]])),
            (16, true) => u32::from(u16::from_be_bytes([b[0], b[1]])),
            (_, false) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            (_, true) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    /// ZRLE's CPIXEL (RFC 6143 §7.7.6): 3 bytes for 32 bpp depth ≤ 24 when the colour bits fit
    /// the low or high 3 bytes; returns (length, offset of those bytes in the 4-byte pixel).
    fn cpixel(self) -> (usize, usize) {
        if self.bpp != 32 || self.depth > 24 {
            return (self.bytes(), 0);
        }
        let mask = (0..3).fold(0u32, |a, i| a | (u32::from(self.max[i]) << self.shift[i]));
        let low = mask & 0xff00_0000 == 0;
        let high = mask.trailing_zeros() >= 8;
        match (low, high, self.big_endian) {
            (true, _, false) | (false, true, true) => (3, 0),
            (true, _, true) | (false, true, false) => (3, 1),
            _ => (4, 0),
        }
    }

    fn read_cpixel(self, b: &[u8]) -> u32 {
        let (len, at) = self.cpixel();
        if len == 4 || len == self.bytes() {
            return self.read(b);
        }
        let mut four = [0u8; 4];
        four[at..at + 3].copy_from_slice(&b[..3]);
        self.read(&four)
    }
}

/// How the client authenticates.
#[derive(Debug, Clone)]
pub enum Security {
    None,
    Vnc(String),
}

/// A rectangle of a `FramebufferUpdate`, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RectInfo {
    pub x: u16,
    pub y: u16,
    pub w: u16,
    pub h: u16,
    pub encoding: i32,
}

/// Why a connection attempt failed, when the server refused it politely.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("authentication failed: {0}")]
    AuthFailed(String),
}

/// A connected, initialised RFB client.
#[derive(Debug)]
pub struct RfbClient {
    stream: TcpStream,
    pub width: u16,
    pub height: u16,
    pub name: String,
    pub format: Format,
    /// The client's picture, one pixel value per pixel, row-major.
    pixels: Vec<u32>,
    zlib: Decompress,
    zrle: Decompress,
    /// Bytes read from the socket in total.
    pub bytes_read: u64,
}

fn des_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password.bytes()) {
        // VNC keys DES with each password byte's bits mirrored.
        let mut m = 0u8;
        for bit in 0..8 {
            if p & (1 << bit) != 0 {
                m |= 0x80 >> bit;
            }
        }
        *k = m;
    }
    let cipher = des::Des::new(GenericArray::from_slice(&key));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

impl RfbClient {
    /// Connects and completes the handshake, speaking `version` (e.g. `b"RFB 003.008\n"`).
    pub fn connect(
        addr: SocketAddr,
        version: &[u8; 12],
        security: &Security,
        shared: bool,
    ) -> anyhow::Result<RfbClient> {
        let mut stream = TcpStream::connect(addr).context("connect")?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut server_version = [0u8; 12];
        stream
            .read_exact(&mut server_version)
            .context("server ProtocolVersion")?;
        ensure!(
            &server_version == b"RFB 003.008\n",
            "server version {server_version:?}"
        );
        stream.write_all(version)?;
        // A server treats minor versions other than 7 and 8 as 3.3 (RFC 6143 §7.1.1).
        let minor: &[u8] = match &version[8..11] {
            m @ (b"007" | b"008") => m,
            _ => b"003",
        };
        let wanted: u8 = match security {
            Security::None => 1,
            Security::Vnc(_) => 2,
        };
        if minor == b"003" {
            let ty = read_u32(&mut stream)?;
            if ty == 0 {
                let reason = read_string(&mut stream)?;
                bail!("server refused: {reason}");
            }
            ensure!(ty == u32::from(wanted), "server chose security type {ty}");
        } else {
            let mut n = [0u8; 1];
            stream.read_exact(&mut n)?;
            if n[0] == 0 {
                let reason = read_string(&mut stream)?;
                bail!("server refused: {reason}");
            }
            let mut types = vec![0u8; usize::from(n[0])];
            stream.read_exact(&mut types)?;
            ensure!(types.contains(&wanted), "server offers {types:?}");
            stream.write_all(&[wanted])?;
        }
        if let Security::Vnc(password) = security {
            let mut challenge = [0u8; 16];
            stream.read_exact(&mut challenge).context("challenge")?;
            stream.write_all(&des_response(password, &challenge))?;
        }
        let has_result = matches!(security, Security::Vnc(_)) || minor == b"008";
        if has_result {
            let result = read_u32(&mut stream).context("SecurityResult")?;
            if result != 0 {
                let reason = if minor == b"008" {
                    read_string(&mut stream)?
                } else {
                    String::new()
                };
                return Err(Refused::AuthFailed(reason).into());
            }
        }
        stream.write_all(&[u8::from(shared)])?;
        let mut init = [0u8; 24];
        stream.read_exact(&mut init).context("ServerInit")?;
        let width = u16::from_be_bytes([init[0], init[1]]);
        let height = u16::from_be_bytes([init[2], init[3]]);
        let format = Format::parse(&init[4..20])?;
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        ensure!(name_len <= 1024, "name of {name_len} bytes");
        let mut name = vec![0u8; name_len as usize];
        stream.read_exact(&mut name)?;
        Ok(RfbClient {
            stream,
            width,
            height,
            name: String::from_utf8_lossy(&name).into_owned(),
            format,
            pixels: vec![0; usize::from(width) * usize::from(height)],
            zlib: Decompress::new(true),
            zrle: Decompress::new(true),
            bytes_read: 0,
        })
    }

    /// The underlying socket (to close it, or to stop reading).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn set_pixel_format(&mut self, format: Format) -> anyhow::Result<()> {
        let mut msg = vec![0, 0, 0, 0];
        msg.extend_from_slice(&format.to_bytes());
        self.stream.write_all(&msg)?;
        self.format = format;
        Ok(())
    }

    pub fn set_encodings(&mut self, encodings: &[i32]) -> anyhow::Result<()> {
        let mut msg = vec![2, 0];
        msg.extend_from_slice(&u16::try_from(encodings.len())?.to_be_bytes());
        for e in encodings {
            msg.extend_from_slice(&e.to_be_bytes());
        }
        self.stream.write_all(&msg)?;
        Ok(())
    }

    pub fn request(
        &mut self,
        incremental: bool,
        x: u16,
        y: u16,
        w: u16,
        h: u16,
    ) -> anyhow::Result<()> {
        let mut msg = vec![3, u8::from(incremental)];
        for v in [x, y, w, h] {
            msg.extend_from_slice(&v.to_be_bytes());
        }
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// A full-screen request.
    pub fn request_all(&mut self, incremental: bool) -> anyhow::Result<()> {
        self.request(incremental, 0, 0, self.width, self.height)
    }

    pub fn key(&mut self, keysym: u32, down: bool) -> anyhow::Result<()> {
        let mut msg = vec![4, u8::from(down), 0, 0];
        msg.extend_from_slice(&keysym.to_be_bytes());
        self.stream.write_all(&msg)?;
        Ok(())
    }

    pub fn qemu_key(&mut self, keysym: u32, keycode: u32, down: bool) -> anyhow::Result<()> {
        let mut msg = vec![255, 0];
        msg.extend_from_slice(&u16::from(down).to_be_bytes());
        msg.extend_from_slice(&keysym.to_be_bytes());
        msg.extend_from_slice(&keycode.to_be_bytes());
        self.stream.write_all(&msg)?;
        Ok(())
    }

    pub fn pointer(&mut self, buttons: u8, x: u16, y: u16) -> anyhow::Result<()> {
        let mut msg = vec![5, buttons];
        msg.extend_from_slice(&x.to_be_bytes());
        msg.extend_from_slice(&y.to_be_bytes());
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// The pixel value at (x, y) of the client's picture.
    pub fn pixel(&self, x: u16, y: u16) -> u32 {
        self.pixels[usize::from(y) * usize::from(self.width) + usize::from(x)]
    }

    /// Waits up to `timeout` for the server's next message to start arriving, without reading
    /// it; `false` if none came. (The whole message is then read with [`READ_TIMEOUT`].)
    pub fn wait_message(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        if timeout.is_zero() {
            return Ok(false);
        }
        self.stream.set_read_timeout(Some(timeout))?;
        let mut byte = [0u8; 1];
        let peeked = self.stream.peek(&mut byte);
        self.stream.set_read_timeout(Some(READ_TIMEOUT))?;
        match peeked {
            Ok(0) => bail!("the server closed the connection"),
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads server messages until one `FramebufferUpdate` has been decoded; returns its rects.
    pub fn read_update(&mut self) -> anyhow::Result<Vec<RectInfo>> {
        loop {
            let mut kind = [0u8; 1];
            self.read_exact(&mut kind).context("server message type")?;
            match kind[0] {
                0 => return self.update_body(),
                2 => {} // Bell
                3 => {
                    let mut hdr = [0u8; 7];
                    self.read_exact(&mut hdr)?;
                    let len = u32::from_be_bytes([hdr[3], hdr[4], hdr[5], hdr[6]]);
                    ensure!(len < 1 << 20, "cut text of {len}");
                    let mut skip = vec![0u8; len as usize];
                    self.read_exact(&mut skip)?;
                }
                other => bail!("unexpected server message type {other}"),
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.stream.read_exact(buf)?;
        self.bytes_read += buf.len() as u64;
        Ok(())
    }

    fn update_body(&mut self) -> anyhow::Result<Vec<RectInfo>> {
        let mut hdr = [0u8; 3];
        self.read_exact(&mut hdr)?;
        let count = u16::from_be_bytes([hdr[1], hdr[2]]);
        let mut rects = Vec::new();
        for _ in 0..count {
            let mut r = [0u8; 12];
            self.read_exact(&mut r)?;
            let info = RectInfo {
                x: u16::from_be_bytes([r[0], r[1]]),
                y: u16::from_be_bytes([r[2], r[3]]),
                w: u16::from_be_bytes([r[4], r[5]]),
                h: u16::from_be_bytes([r[6], r[7]]),
                encoding: i32::from_be_bytes([r[8], r[9], r[10], r[11]]),
            };
            self.decode(info)?;
            rects.push(info);
        }
        Ok(rects)
    }

    fn decode(&mut self, r: RectInfo) -> anyhow::Result<()> {
        let in_screen = u32::from(r.x) + u32::from(r.w) <= u32::from(self.width)
            && u32::from(r.y) + u32::from(r.h) <= u32::from(self.height);
        match r.encoding {
            DESKTOP_SIZE => self.resize(r.w, r.h),
            EXTENDED_DESKTOP_SIZE => {
                let mut n = [0u8; 4];
                self.read_exact(&mut n)?;
                let mut screens = vec![0u8; usize::from(n[0]) * 16];
                self.read_exact(&mut screens)?;
                if r.x != 1 {
                    self.resize(r.w, r.h);
                }
            }
            QEMU_EXTENDED_KEY => {}
            RAW => {
                ensure!(
                    in_screen,
                    "rect {r:?} outside {}x{}",
                    self.width,
                    self.height
                );
                let mut data = vec![0u8; usize::from(r.w) * usize::from(r.h) * self.format.bytes()];
                self.read_exact(&mut data)?;
                self.put_raw(r, &data);
            }
            ZLIB => {
                ensure!(
                    in_screen,
                    "rect {r:?} outside {}x{}",
                    self.width,
                    self.height
                );
                let data = self.read_compressed()?;
                let want = usize::from(r.w) * usize::from(r.h) * self.format.bytes();
                let plain = inflate(&mut self.zlib, &data, want)?;
                ensure!(
                    plain.len() == want,
                    "zlib rect inflated to {} of {want}",
                    plain.len()
                );
                self.put_raw(r, &plain);
            }
            ZRLE => {
                ensure!(
                    in_screen,
                    "rect {r:?} outside {}x{}",
                    self.width,
                    self.height
                );
                let data = self.read_compressed()?;
                let plain = inflate(&mut self.zrle, &data, 0)?;
                self.put_zrle(r, &plain)?;
            }
            other => bail!("unexpected encoding {other}"),
        }
        Ok(())
    }

    fn resize(&mut self, w: u16, h: u16) {
        self.width = w;
        self.height = h;
        self.pixels = vec![0; usize::from(w) * usize::from(h)];
    }

    fn read_compressed(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len);
        ensure!(len < 64 << 20, "compressed length {len}");
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        Ok(data)
    }

    fn put_raw(&mut self, r: RectInfo, data: &[u8]) {
        let bpp = self.format.bytes();
        for (i, px) in data.chunks_exact(bpp).enumerate() {
            let x = usize::from(r.x) + i % usize::from(r.w);
            let y = usize::from(r.y) + i / usize::from(r.w);
            self.pixels[y * usize::from(self.width) + x] = self.format.read(px);
        }
    }

    fn put_zrle(&mut self, r: RectInfo, data: &[u8]) -> anyhow::Result<()> {
        let (cp, _) = self.format.cpixel();
        let mut cur = Cursor { data, at: 0 };
        let mut take = |n: usize| cur.take(n);
        let mut ty = 0u16;
        while ty < r.h {
            let th = (r.h - ty).min(64);
            let mut tx = 0u16;
            while tx < r.w {
                let tw = (r.w - tx).min(64);
                let n = usize::from(tw) * usize::from(th);
                let sub = take(1)?[0];
                let mut tile = Vec::with_capacity(n);
                match sub {
                    0 => {
                        for _ in 0..n {
                            tile.push(self.format.read_cpixel(take(cp)?));
                        }
                    }
                    1 => {
                        let v = self.format.read_cpixel(take(cp)?);
                        tile.resize(n, v);
                    }
                    2..=16 => {
                        let palette: Vec<u32> = (0..sub)
                            .map(|_| take(cp).map(|b| self.format.read_cpixel(b)))
                            .collect::<anyhow::Result<_>>()?;
                        let bits = match sub {
                            2 => 1,
                            3 | 4 => 2,
                            _ => 4,
                        };
                        let row_bytes = (usize::from(tw) * bits).div_ceil(8);
                        for _ in 0..th {
                            let row = take(row_bytes)?;
                            for x in 0..usize::from(tw) {
                                let bit = x * bits;
                                let idx =
                                    (row[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                tile.push(*palette.get(usize::from(idx)).context("index")?);
                            }
                        }
                    }
                    128 => {
                        while tile.len() < n {
                            let v = self.format.read_cpixel(take(cp)?);
                            let len = run_length(&mut take)?;
                            tile.extend(std::iter::repeat_n(v, len));
                        }
                    }
                    130..=255 => {
                        let palette: Vec<u32> = (0..sub - 128)
                            .map(|_| take(cp).map(|b| self.format.read_cpixel(b)))
                            .collect::<anyhow::Result<_>>()?;
                        while tile.len() < n {
                            let b = take(1)?[0];
                            let v = *palette.get(usize::from(b & 0x7f)).context("index")?;
                            let len = if b & 0x80 != 0 {
                                run_length(&mut take)?
                            } else {
                                1
                            };
                            tile.extend(std::iter::repeat_n(v, len));
                        }
                    }
                    other => bail!("bad ZRLE subencoding {other}"),
                }
                ensure!(
                    tile.len() == n,
                    "ZRLE tile of {} pixels, not {n}",
                    tile.len()
                );
                for (i, v) in tile.into_iter().enumerate() {
                    let x = usize::from(r.x + tx) + i % usize::from(tw);
                    let y = usize::from(r.y + ty) + i / usize::from(tw);
                    self.pixels[y * usize::from(self.width) + x] = v;
                }
                tx += tw;
            }
            ty += th;
        }
        ensure!(
            cur.at == data.len(),
            "{} bytes after the ZRLE tiles",
            data.len() - cur.at
        );
        Ok(())
    }
}

/// Reads ZRLE tile data front to back.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let s = self
            .data
            .get(self.at..self.at + n)
            .context("ZRLE data ends early")?;
        self.at += n;
        Ok(s)
    }
}

fn run_length<'a>(
    take: &mut impl FnMut(usize) -> anyhow::Result<&'a [u8]>,
) -> anyhow::Result<usize> {
    let mut len = 1usize;
    loop {
        let b = take(1)?[0];
        len += usize::from(b);
        if b != 255 {
            return Ok(len);
        }
    }
}

/// Inflates `data` (one sync-flushed piece of a continuing stream).
fn inflate(stream: &mut Decompress, data: &[u8], hint: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(hint.max(4096));
    let mut consumed = 0usize;
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity());
        }
        let before = stream.total_in();
        stream.decompress_vec(&data[consumed..], &mut out, FlushDecompress::Sync)?;
        consumed += usize::try_from(stream.total_in() - before)?;
        if consumed >= data.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

fn read_u32(s: &mut TcpStream) -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_string(s: &mut TcpStream) -> anyhow::Result<String> {
    let len = read_u32(s)?;
    ensure!(len <= 4096, "reason of {len} bytes");
    let mut b = vec![0u8; len as usize];
    s.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}
