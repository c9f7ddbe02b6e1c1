//! One VNC client's protocol state: the handshake (RFC 6143 §7.1–7.3), its messages, and the
//! updates it is owed. Pure: bytes in, bytes out, no sockets, so it is unit-tested and fuzzed
//! directly; `server` moves the bytes.
//!
//! Handshake by version:
//!
//! | step | 3.3 | 3.7 | 3.8 |
//! |---|---|---|---|
//! | security | server picks, `u32` type | server lists types, client picks | same as 3.7 |
//! | None: SecurityResult | no | no | yes |
//! | VNC auth failed | `u32 1`, close | `u32 1`, close | `u32 1` + reason, close |
//!
//! Updates: the server marks the tiles that changed on each scan ([`Session::mark_changed`]).
//! An incremental request is answered with the changed tiles inside it, once there are some;
//! a non-incremental one with the whole requested area at once.

use crate::auth;
use crate::encode::{self, Encoder, Encoding, number};
use crate::framebuffer::{Screen, TILE};
use crate::input::{InputEvent, InputSink, scale_to_abs};
use crate::keymap::{keysym_to_evdev, xt_to_evdev};
use crate::message::{
    ClientMessage, MessageError, MessageReader, Rect, Step, Version, parse_version,
};
use crate::pixel::{Converter, PixelFormat};

/// Default zlib level when the client names none (-256..=-247 pseudo-encodings). 9, as QEMU's
/// VNC server: at 6 a full-screen change of stripes took 53 462 bytes against QEMU's 32 880
/// (scripts/bench-vnc.sh rows, 1600x900); at 9, with memory level 9 and one rectangle for the
/// screen, 32 869 (tests/tests/dev_fb.rs checks every bench picture against QEMU's bytes).
const DEFAULT_COMPRESS_LEVEL: u32 = 9;

/// Encoder scratch memory kept between updates.
const SCRATCH_KEEP: usize = 64 * 1024;

/// Security types (RFC 6143 §7.2).
const SEC_NONE: u8 = 1;
const SEC_VNC: u8 = 2;

/// Why a session ends. The server writes what is already queued (a refusal reason, say),
/// then closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad ProtocolVersion")]
    Version(#[from] crate::message::VersionError),
    #[error("client chose security type {0}, which was not offered")]
    SecurityType(u8),
    #[error("VNC authentication failed")]
    AuthFailed,
    #[error("making an authentication challenge failed")]
    Challenge(#[from] auth::AuthError),
    #[error("bad client message")]
    Message(#[from] MessageError),
    #[error("encoding an update failed")]
    Encode(#[from] encode::EncodeError),
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Version,
    SecurityType,
    AuthResponse([u8; auth::CHALLENGE_LEN]),
    ClientInit,
    Normal,
}

/// What a session needs from the server while it reads client bytes.
pub struct Context<'a> {
    /// The VNC password, if VNC Authentication is required.
    pub password: Option<&'a [u8]>,
    /// The desktop name (the guest's name).
    pub name: &'a str,
    /// The current mode's size.
    pub size: (u16, u16),
    pub input: &'a mut dyn InputSink,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Something the server must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The client finished its handshake with shared-flag 0.
    WantsExclusive,
    /// The client sent input (the screen may change soon).
    Input,
}

/// What the client asked for with its encodings.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    desktop_size: bool,
    extended_desktop_size: bool,
    qemu_key: bool,
}

/// Pseudo-rectangles owed with the next update.
#[derive(Debug, Clone, Copy, Default)]
struct Owed {
    resize: bool,
    qemu_key_ack: bool,
    /// ExtendedDesktopSize answer to a SetDesktopSize: (reason, status).
    desktop_size_reply: Option<(u16, u16)>,
}

/// A pending FramebufferUpdateRequest (several merge into one).
#[derive(Debug, Clone, Copy)]
struct Request {
    incremental: bool,
    rect: Rect,
}

/// What a client holds down in the guest: released when it goes, so that a client that
/// disconnects mid-press leaves no key stuck down.
#[derive(Debug, Clone, Default)]
struct Held {
    /// Evdev codes down, each once (at most the keymap's few hundred codes).
    keys: Vec<u16>,
    /// The last pointer position (scaled) and button mask.
    at: (u16, u16),
    buttons: u8,
}

/// One client's protocol state.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    version: Version,
    reader: MessageReader,
    conv: Converter,
    encoding: Encoding,
    caps: Caps,
    encoder: Encoder,
    request: Option<Request>,
    /// Per tile (row-major over `tiles.0` columns), the box of pixels changed since this
    /// client's last update.
    dirty: Vec<Option<Rect>>,
    tiles: (u32, u32),
    /// The framebuffer size this client believes in (ServerInit or the last resize it got).
    client_size: (u16, u16),
    owed: Owed,
    held: Held,
    /// Bytes for the client, not yet written.
    pub out: Vec<u8>,
}

impl Session {
    /// A new session; its greeting (our ProtocolVersion) is already queued.
    pub fn new() -> Session {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(Version::V3_8.wire());
        Session {
            phase: Phase::Version,
            version: Version::V3_8,
            reader: MessageReader::default(),
            conv: Converter::new(PixelFormat::DEFAULT),
            encoding: Encoding::Raw,
            caps: Caps::default(),
            encoder: Encoder::new(DEFAULT_COMPRESS_LEVEL),
            request: None,
            dirty: Vec::new(),
            tiles: (0, 0),
            client_size: (0, 0),
            owed: Owed::default(),
            held: Held::default(),
            out,
        }
    }

    /// Whether the handshake is done.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Normal
    }

    /// Whether the client waits for an update (so the server must keep scanning).
    pub fn wants_update(&self) -> bool {
        self.is_ready() && self.request.is_some()
    }

    /// Whether a request is pending that is answered without waiting for changes.
    pub fn update_due_now(&self) -> bool {
        let owed =
            self.owed.resize || self.owed.qemu_key_ack || self.owed.desktop_size_reply.is_some();
        self.is_ready() && self.request.is_some_and(|r| !r.incremental || owed)
    }

    /// Consumes what it can of `buf` (bytes from the client) and returns how many bytes it
    /// used; replies are queued in [`Session::out`].
    pub fn receive(
        &mut self,
        buf: &[u8],
        ctx: &mut Context<'_>,
        events: &mut Vec<Event>,
    ) -> Result<usize, SessionError> {
        let mut used = 0usize;
        loop {
            let rest = buf.get(used..).unwrap_or_default();
            let n = match self.phase {
                Phase::Normal => self.message(rest, ctx, events)?,
                _ => self.handshake(rest, ctx, events)?,
            };
            if n == 0 {
                return Ok(used);
            }
            used += n;
        }
    }

    fn handshake(
        &mut self,
        buf: &[u8],
        ctx: &mut Context<'_>,
        events: &mut Vec<Event>,
    ) -> Result<usize, SessionError> {
        let security = if ctx.password.is_some() {
            SEC_VNC
        } else {
            SEC_NONE
        };
        match self.phase {
            Phase::Version => {
                let Some(v) = buf.get(..12).and_then(|b| <&[u8; 12]>::try_from(b).ok()) else {
                    return Ok(0);
                };
                self.version = parse_version(v)?;
                if self.version == Version::V3_3 {
                    self.out
                        .extend_from_slice(&u32::from(security).to_be_bytes());
                    self.start_security(security)?;
                } else {
                    self.out.extend_from_slice(&[1, security]);
                    self.phase = Phase::SecurityType;
                }
                Ok(12)
            }
            Phase::SecurityType => {
                let Some(&chosen) = buf.first() else {
                    return Ok(0);
                };
                if chosen != security {
                    if self.version == Version::V3_8 {
                        self.security_failed("security type not offered");
                    }
                    return Err(SessionError::SecurityType(chosen));
                }
                self.start_security(security)?;
                if security == SEC_NONE && self.version == Version::V3_8 {
                    self.out.extend_from_slice(&0u32.to_be_bytes());
                }
                Ok(1)
            }
            Phase::AuthResponse(challenge) => {
                let Some(response) = buf.get(..auth::CHALLENGE_LEN) else {
                    return Ok(0);
                };
                let ok = ctx
                    .password
                    .is_some_and(|p| auth::verify(p, &challenge, response));
                if !ok {
                    if self.version == Version::V3_8 {
                        self.security_failed("authentication failed");
                    } else {
                        self.out.extend_from_slice(&1u32.to_be_bytes());
                    }
                    return Err(SessionError::AuthFailed);
                }
                self.out.extend_from_slice(&0u32.to_be_bytes());
                self.phase = Phase::ClientInit;
                Ok(auth::CHALLENGE_LEN)
            }
            Phase::ClientInit => {
                let Some(&shared) = buf.first() else {
                    return Ok(0);
                };
                if shared == 0 {
                    events.push(Event::WantsExclusive);
                }
                self.server_init(ctx);
                self.phase = Phase::Normal;
                Ok(1)
            }
            Phase::Normal => Ok(0),
        }
    }

    fn start_security(&mut self, security: u8) -> Result<(), SessionError> {
        if security == SEC_VNC {
            let challenge = auth::challenge()?;
            self.out.extend_from_slice(&challenge);
            self.phase = Phase::AuthResponse(challenge);
        } else {
            self.phase = Phase::ClientInit;
        }
        Ok(())
    }

    /// RFB 3.8's SecurityResult failed, with a reason string.
    fn security_failed(&mut self, reason: &str) {
        self.out.extend_from_slice(&1u32.to_be_bytes());
        self.out
            .extend_from_slice(&u32::try_from(reason.len()).unwrap_or(0).to_be_bytes());
        self.out.extend_from_slice(reason.as_bytes());
    }

    fn server_init(&mut self, ctx: &Context<'_>) {
        let (w, h) = ctx.size;
        self.client_size = (w, h);
        self.out.extend_from_slice(&w.to_be_bytes());
        self.out.extend_from_slice(&h.to_be_bytes());
        self.out.extend_from_slice(&self.conv.format().to_bytes());
        let name = ctx.name.as_bytes();
        let name = name.get(..name.len().min(256)).unwrap_or_default();
        self.out
            .extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
        self.out.extend_from_slice(name);
    }

    fn message(
        &mut self,
        buf: &[u8],
        ctx: &mut Context<'_>,
        events: &mut Vec<Event>,
    ) -> Result<usize, SessionError> {
        let (msg, used) = match self.reader.next(buf)? {
            Step::NeedMore => return Ok(0),
            Step::Skipped(n) => return Ok(n),
            Step::Message(msg, n) => (msg, n),
        };
        match msg {
            ClientMessage::SetPixelFormat(pf) => {
                tracing::debug!(?pf, "client pixel format");
                self.conv = Converter::new(pf);
            }
            ClientMessage::SetEncodings(list) => self.set_encodings(&list),
            ClientMessage::FramebufferUpdateRequest { incremental, rect } => {
                self.request_update(incremental, rect);
            }
            ClientMessage::KeyEvent { down, keysym } => {
                self.key(keysym_to_evdev(keysym), down, ctx, events);
            }
            ClientMessage::QemuKeyEvent {
                down,
                keysym,
                keycode,
            } => {
                let code = xt_to_evdev(keycode).or_else(|| keysym_to_evdev(keysym));
                self.key(code, down, ctx, events);
            }
            ClientMessage::PointerEvent { buttons, x, y } => {
                let (w, h) = ctx.size;
                let at = (scale_to_abs(x, u32::from(w)), scale_to_abs(y, u32::from(h)));
                self.held.at = at;
                self.held.buttons = buttons;
                ctx.input.deliver(InputEvent::Pointer {
                    x: at.0,
                    y: at.1,
                    buttons,
                });
                events.push(Event::Input);
            }
            ClientMessage::ClientCutText { len } => {
                tracing::trace!(len, "client cut text discarded");
            }
            ClientMessage::SetDesktopSize { width, height, .. } => {
                tracing::debug!(width, height, "client asked for a desktop size; refused");
                self.owed.desktop_size_reply = Some((1, 1));
            }
        }
        Ok(used)
    }

    fn key(
        &mut self,
        code: Option<u16>,
        down: bool,
        ctx: &mut Context<'_>,
        events: &mut Vec<Event>,
    ) {
        if let Some(code) = code {
            let held = self.held.keys.iter().position(|&k| k == code);
            match (down, held) {
                (true, None) => self.held.keys.push(code),
                (false, Some(i)) => {
                    self.held.keys.swap_remove(i);
                }
                _ => {}
            }
            ctx.input.deliver(InputEvent::Key { code, down });
            events.push(Event::Input);
        } else {
            tracing::trace!("key without an evdev code dropped");
        }
    }

    /// Whether this client holds key `code` down.
    pub fn holds_key(&self, code: u16) -> bool {
        self.held.keys.contains(&code)
    }

    /// The events that let go of everything this client holds down (its keys, then its
    /// buttons at the pointer's last position), which it then no longer holds.
    pub fn release_held(&mut self) -> Vec<InputEvent> {
        let held = std::mem::take(&mut self.held);
        let mut out: Vec<InputEvent> = held
            .keys
            .into_iter()
            .map(|code| InputEvent::Key { code, down: false })
            .collect();
        if held.buttons != 0 {
            out.push(InputEvent::Pointer {
                x: held.at.0,
                y: held.at.1,
                buttons: 0,
            });
        }
        out
    }

    fn set_encodings(&mut self, list: &[i32]) {
        self.encoding = Encoding::choose(list);
        let had_qemu_key = self.caps.qemu_key;
        self.caps = Caps {
            desktop_size: list.contains(&number::DESKTOP_SIZE),
            extended_desktop_size: list.contains(&number::EXTENDED_DESKTOP_SIZE),
            qemu_key: list.contains(&number::QEMU_EXTENDED_KEY),
        };
        if self.caps.qemu_key && !had_qemu_key {
            self.owed.qemu_key_ack = true;
        }
        if let Some(level) = list
            .iter()
            .find(|e| (number::COMPRESS_LEVEL_0..=number::COMPRESS_LEVEL_9).contains(e))
        {
            self.encoder
                .set_level(u32::try_from(level - number::COMPRESS_LEVEL_0).unwrap_or(6));
        }
        tracing::debug!(encoding = ?self.encoding, caps = ?self.caps, "client encodings");
    }

    fn request_update(&mut self, incremental: bool, rect: Rect) {
        let (w, h) = self.client_size;
        let rect = rect.clip(w, h);
        if rect.is_empty() {
            tracing::trace!("empty update request ignored");
            return;
        }
        self.request = Some(match self.request {
            None => Request { incremental, rect },
            Some(old) => Request {
                incremental: incremental && old.incremental,
                rect: old.rect.union(rect),
            },
        });
    }

    /// The screen changed size or mode: every tile is dirty and the client is owed a resize.
    pub fn mode_changed(&mut self, size: (u16, u16)) {
        if size != self.client_size && self.is_ready() {
            self.owed.resize = true;
        }
        self.dirty.clear();
        self.tiles = (0, 0);
    }

    /// Adds a scan's changed boxes (row-major, `cols`×`rows` tiles) to this client's dirty set.
    pub fn mark_changed(&mut self, changed: &[Option<Rect>], cols: u32, rows: u32) {
        if self.tiles != (cols, rows) || self.dirty.len() != changed.len() {
            self.tiles = (cols, rows);
            self.dirty = whole_tiles(cols, rows);
            return;
        }
        for (d, c) in self.dirty.iter_mut().zip(changed) {
            if let Some(c) = c {
                *d = Some(d.map_or(*c, |r| r.union(*c)));
            }
        }
    }

    /// If an update is owed and there is something to send, appends one FramebufferUpdate to
    /// [`Session::out`]; returns whether it did.
    ///
    /// `tiles` are the change grid's columns and rows: a client that has not seen the grid yet
    /// counts every tile as dirty until this update cleans what it sends.
    pub fn update(&mut self, screen: &Screen<'_>, tiles: (u32, u32)) -> Result<bool, SessionError> {
        let Some(request) = self.request.filter(|_| self.is_ready()) else {
            return Ok(false);
        };
        if self.tiles != tiles {
            self.tiles = tiles;
            self.dirty = whole_tiles(tiles.0, tiles.1);
        }
        let size = screen.size();
        let can_resize = self.caps.desktop_size || self.caps.extended_desktop_size;
        let mut pseudo = Vec::new();
        let mut count = 0u16;
        let mut full = !request.incremental;
        if self.owed.resize && can_resize {
            if self.caps.extended_desktop_size {
                encode::extended_desktop_size(size.0, size.1, 0, 0, &mut pseudo);
            } else {
                encode::desktop_size(size.0, size.1, &mut pseudo);
            }
            count += 1;
            self.client_size = size;
            full = true;
        }
        self.owed.resize = false;
        if let Some((reason, status)) = self.owed.desktop_size_reply.take()
            && self.caps.extended_desktop_size
        {
            encode::extended_desktop_size(size.0, size.1, reason, status, &mut pseudo);
            count += 1;
        }
        if self.owed.qemu_key_ack && self.caps.qemu_key {
            encode::qemu_extended_key(&mut pseudo);
            count += 1;
        }
        self.owed.qemu_key_ack = false;

        // What the client can show: its idea of the size, and the screen.
        let visible = (
            size.0.min(self.client_size.0),
            size.1.min(self.client_size.1),
        );
        let area = if full && count > 0 {
            Rect {
                x: 0,
                y: 0,
                w: visible.0,
                h: visible.1,
            }
        } else {
            request.rect.clip(visible.0, visible.1)
        };
        self.clip_dirty(Rect {
            x: 0,
            y: 0,
            w: visible.0,
            h: visible.1,
        });
        let rects = if full {
            if area.is_empty() {
                Vec::new()
            } else {
                vec![area]
            }
        } else {
            self.dirty_rects(area)
        };
        if rects.is_empty() && count == 0 {
            if full {
                // A non-incremental request for nothing visible (the screen shrank under a
                // client that cannot resize): nothing will ever answer it.
                self.request = None;
            }
            // Otherwise nothing changed yet: the incremental request stays pending.
            return Ok(false);
        }
        let total = count.saturating_add(u16::try_from(rects.len()).unwrap_or(u16::MAX));
        self.out.extend_from_slice(&[0, 0]);
        self.out.extend_from_slice(&total.to_be_bytes());
        self.out.extend_from_slice(&pseudo);
        for r in rects.iter().take(usize::from(total - count)) {
            self.encoder
                .rect(self.encoding, screen, *r, &self.conv, &mut self.out)?;
        }
        self.clean(area);
        self.encoder.trim(SCRATCH_KEEP);
        self.request = None;
        Ok(true)
    }

    /// The dirty boxes inside `area`, merged: boxes of neighbouring tiles in a tile row that
    /// line up (same rows, touching) become one, and then such a row box with the one just
    /// above it when they span the same columns and touch. A change of the whole screen is one
    /// rectangle: one header and one deflate flush, and ZRLE's deflate sees each row of tiles
    /// right after the one above (similar content, close together).
    fn dirty_rects(&self, area: Rect) -> Vec<Rect> {
        let mut out: Vec<Rect> = Vec::new();
        for r in self.row_rects(area) {
            let above = out
                .iter_mut()
                .rev()
                .find(|p| p.x == r.x && p.w == r.w && p.y.saturating_add(p.h) == r.y);
            match above {
                Some(p) => *p = p.union(r),
                None => out.push(r),
            }
        }
        out
    }

    /// The dirty boxes inside `area`, those of touching tiles in a tile row with the same rows
    /// merged, so a wide change is one rectangle per tile row.
    fn row_rects(&self, area: Rect) -> Vec<Rect> {
        let (cols, _) = self.tiles;
        let mut out: Vec<Rect> = Vec::new();
        if cols == 0 {
            return out;
        }
        for line in self.dirty.chunks(cols as usize) {
            let mut run: Option<Rect> = None;
            for r in line.iter().map(|d| d.map(|r| r.intersect(area))) {
                match (r.filter(|r| !r.is_empty()), run) {
                    (Some(r), Some(prev))
                        if prev.y == r.y
                            && prev.h == r.h
                            && prev.x.saturating_add(prev.w) == r.x =>
                    {
                        run = Some(prev.union(r));
                    }
                    (next, prev) => {
                        out.extend(prev);
                        run = next;
                    }
                }
            }
            out.extend(run);
        }
        out
    }

    /// Takes `area` (just sent) out of every dirty box: a box inside it is clean, a box cut by
    /// it keeps the part outside where that part is one rectangle, else stays whole.
    fn clean(&mut self, area: Rect) {
        for d in &mut self.dirty {
            if let Some(r) = *d {
                *d = subtract(r, area);
            }
        }
    }

    /// Forgets dirt outside the client's `visible` screen: it can never be sent.
    fn clip_dirty(&mut self, visible: Rect) {
        for d in &mut self.dirty {
            *d = d.map(|r| r.intersect(visible)).filter(|r| !r.is_empty());
        }
    }
}

/// What is left of `r` after `area` is taken out, as one rectangle (`r` itself when the rest
/// is not a rectangle).
fn subtract(r: Rect, area: Rect) -> Option<Rect> {
    let cut = r.intersect(area);
    if cut.is_empty() {
        return Some(r);
    }
    if cut == r {
        return None;
    }
    let end = |a: u16, b: u16| a.saturating_add(b);
    // The cut spans r's full height: what is left lies to its left or right.
    if cut.y == r.y && cut.h == r.h {
        let left = cut.x - r.x;
        let right = end(r.x, r.w) - end(cut.x, cut.w);
        return Some(match (left, right) {
            (0, w) => Rect {
                x: end(cut.x, cut.w),
                w,
                ..r
            },
            (w, 0) => Rect { w, ..r },
            _ => r,
        });
    }
    // The cut spans r's full width: what is left lies above or below.
    if cut.x == r.x && cut.w == r.w {
        let above = cut.y - r.y;
        let below = end(r.y, r.h) - end(cut.y, cut.h);
        return Some(match (above, below) {
            (0, h) => Rect {
                y: end(cut.y, cut.h),
                h,
                ..r
            },
            (h, 0) => Rect { h, ..r },
            _ => r,
        });
    }
    Some(r)
}

/// Every tile of a `cols`×`rows` grid, whole (clipped later to what is visible).
fn whole_tiles(cols: u32, rows: u32) -> Vec<Option<Rect>> {
    (0..rows)
        .flat_map(|row| (0..cols).map(move |col| Some(tile_rect(col, col + 1, row))))
        .collect()
}

impl Default for Session {
    fn default() -> Session {
        Session::new()
    }
}

/// The pixels of tiles `s..e` of tile row `row`.
fn tile_rect(s: u32, e: u32, row: u32) -> Rect {
    let c = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    Rect {
        x: c(s * TILE),
        y: c(row * TILE),
        w: c((e - s) * TILE),
        h: c(TILE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framebuffer::TileGrid;
    use crate::input::InputQueue;
    use proto::display::Mode;

    const W: u32 = 130;
    const H: u32 = 70;

    struct Rig {
        fb: Vec<u8>,
        input: InputQueue,
        events: Vec<Event>,
        grid: TileGrid,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                fb: vec![0; (W * H * 4) as usize],
                input: InputQueue::new(),
                events: Vec::new(),
                grid: TileGrid::new(),
            }
        }

        fn feed(
            &mut self,
            s: &mut Session,
            bytes: &[u8],
            password: Option<&[u8]>,
        ) -> Result<usize, SessionError> {
            let mut ctx = Context {
                password,
                name: "guest",
                size: (130, 70),
                input: &mut self.input,
            };
            s.receive(bytes, &mut ctx, &mut self.events)
        }

        fn scan_and_update(&mut self, s: &mut Session) -> bool {
            let screen = Screen::new(&self.fb, Mode::packed(W, H, 32)).unwrap();
            let changed = self.grid.scan(&screen);
            let (c, r) = self.grid.dims();
            s.mark_changed(&changed, c, r);
            s.update(&screen, (c, r)).unwrap()
        }
    }

    /// A session past the handshake (3.8, no auth), its output cleared.
    fn ready(rig: &mut Rig) -> Session {
        let mut s = Session::new();
        let mut hello = b"RFB 003.008\n".to_vec();
        hello.extend_from_slice(&[1, 1]);
        assert_eq!(rig.feed(&mut s, &hello, None).unwrap(), 14);
        assert!(s.is_ready());
        s.out.clear();
        s
    }

    fn request(incremental: bool, x: u16, y: u16, width: u16, height: u16) -> Vec<u8> {
        let mut m = vec![3, u8::from(incremental)];
        for v in [x, y, width, height] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        m
    }

    #[test]
    fn a_three_eight_handshake_without_auth_sends_types_result_and_server_init() {
        let mut rig = Rig::new();
        let mut s = Session::new();
        assert_eq!(&s.out, b"RFB 003.008\n");
        s.out.clear();
        rig.feed(&mut s, b"RFB 003.008\n", None).unwrap();
        assert_eq!(s.out, [1, SEC_NONE]);
        s.out.clear();
        rig.feed(&mut s, &[1], None).unwrap();
        assert_eq!(s.out, [0, 0, 0, 0], "SecurityResult OK");
        s.out.clear();
        rig.feed(&mut s, &[1], None).unwrap();
        assert_eq!(&s.out[..4], &[0, 130, 0, 70]);
        assert_eq!(&s.out[4..20], &PixelFormat::DEFAULT.to_bytes());
        assert_eq!(&s.out[20..], &[0, 0, 0, 5, b'g', b'u', b'e', b's', b't']);
    }

    #[test]
    fn a_three_three_client_is_told_the_security_type_and_gets_no_result_for_none() {
        let mut rig = Rig::new();
        let mut s = Session::new();
        s.out.clear();
        rig.feed(&mut s, b"RFB 003.003\n", None).unwrap();
        assert_eq!(s.out, [0, 0, 0, 1]);
        s.out.clear();
        rig.feed(&mut s, &[1], None).unwrap();
        assert!(s.is_ready());
        assert_eq!(s.out.len(), 24 + 5, "ServerInit straight away");
    }

    #[test]
    fn a_wrong_vnc_password_fails_with_a_reason_on_three_eight() {
        let mut rig = Rig::new();
        let mut s = Session::new();
        s.out.clear();
        rig.feed(&mut s, b"RFB 003.008\n", Some(b"pw")).unwrap();
        assert_eq!(s.out, [1, SEC_VNC]);
        rig.feed(&mut s, &[SEC_VNC], Some(b"pw")).unwrap();
        s.out.clear();
        let err = rig.feed(&mut s, &[0u8; 16], Some(b"pw")).unwrap_err();
        assert!(matches!(err, SessionError::AuthFailed));
        assert_eq!(&s.out[..4], &[0, 0, 0, 1]);
        assert!(s.out.len() > 8, "a reason string follows");
    }

    #[test]
    fn the_right_vnc_password_answers_the_challenge() {
        let mut rig = Rig::new();
        let mut s = Session::new();
        rig.feed(&mut s, b"RFB 003.007\n", Some(b"pw")).unwrap();
        s.out.clear();
        rig.feed(&mut s, &[SEC_VNC], Some(b"pw")).unwrap();
        let challenge: [u8; 16] = s.out[..16].try_into().unwrap();
        s.out.clear();
        let response = auth::expected_response(b"pw", &challenge);
        rig.feed(&mut s, &response, Some(b"pw")).unwrap();
        assert_eq!(s.out, [0, 0, 0, 0]);
        rig.feed(&mut s, &[1], Some(b"pw")).unwrap();
        assert!(s.is_ready());
    }

    #[test]
    fn choosing_a_security_type_not_offered_is_refused() {
        let mut rig = Rig::new();
        let mut s = Session::new();
        rig.feed(&mut s, b"RFB 003.008\n", Some(b"pw")).unwrap();
        let err = rig.feed(&mut s, &[SEC_NONE], Some(b"pw")).unwrap_err();
        assert!(matches!(err, SessionError::SecurityType(1)));
    }

    #[test]
    fn a_non_shared_client_asks_for_exclusive_access() {
        let mut rig = Rig::new();
        let mut s = Session::new();
        rig.feed(&mut s, b"RFB 003.008\n\x01\x00", None).unwrap();
        assert_eq!(rig.events, [Event::WantsExclusive]);
    }

    #[test]
    fn an_incremental_request_waits_for_a_change_and_then_sends_only_its_tiles() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        rig.feed(&mut s, &request(false, 0, 0, 130, 70), None)
            .unwrap();
        assert!(rig.scan_and_update(&mut s), "a full update at once");
        s.out.clear();
        rig.feed(&mut s, &request(true, 0, 0, 130, 70), None)
            .unwrap();
        assert!(!rig.scan_and_update(&mut s), "nothing changed: no update");
        assert!(s.wants_update(), "the request stays pending");
        // Change pixel (100, 10): tile column 1, row 0.
        let at = (10 * W as usize + 100) * 4;
        rig.fb[at] = 0xff;
        assert!(rig.scan_and_update(&mut s));
        // Header, then one raw rectangle: the changed pixel's row of its 16-pixel span.
        assert_eq!(&s.out[..4], &[0, 0, 0, 1]);
        assert_eq!(&s.out[4..12], &[0, 96, 0, 10, 0, 16, 0, 1]);
        assert!(!s.wants_update());
    }

    #[test]
    fn keys_and_buttons_still_down_are_released_once() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        // `a` down twice (a client's autorepeat), `b` down and up, Return down; left button
        // down at (129, 69).
        for (down, sym) in [(1, b'a'), (1, b'a'), (1, b'b'), (0, b'b')] {
            rig.feed(&mut s, &[4, down, 0, 0, 0, 0, 0, sym], None)
                .unwrap();
        }
        rig.feed(&mut s, &[4, 1, 0, 0, 0, 0, 0xff, 0x0d], None)
            .unwrap();
        rig.feed(&mut s, &[5, 1, 0, 129, 0, 69], None).unwrap();
        assert!(s.holds_key(crate::keymap::code::KEY_A));
        assert!(!s.holds_key(48), "KEY_B went up");
        let released = s.release_held();
        assert_eq!(
            released,
            [
                InputEvent::Key {
                    code: crate::keymap::code::KEY_A,
                    down: false
                },
                InputEvent::Key {
                    code: crate::keymap::code::KEY_ENTER,
                    down: false
                },
                InputEvent::Pointer {
                    x: 32767,
                    y: 32767,
                    buttons: 0
                },
            ]
        );
        assert_eq!(s.release_held(), [], "nothing is held any more");
    }

    #[test]
    fn a_change_of_the_whole_screen_is_sent_as_one_rectangle() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        rig.feed(&mut s, &request(false, 0, 0, 130, 70), None)
            .unwrap();
        assert!(rig.scan_and_update(&mut s));
        s.out.clear();
        rig.feed(&mut s, &request(true, 0, 0, 130, 70), None)
            .unwrap();
        rig.fb.fill(0x55);
        assert!(rig.scan_and_update(&mut s));
        assert_eq!(&s.out[..4], &[0, 0, 0, 1], "one rectangle");
        assert_eq!(&s.out[4..12], &[0, 0, 0, 0, 0, 130, 0, 70]);
    }

    #[test]
    fn changes_in_different_columns_stay_separate_rectangles() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        rig.feed(&mut s, &request(false, 0, 0, 130, 70), None)
            .unwrap();
        assert!(rig.scan_and_update(&mut s));
        s.out.clear();
        rig.feed(&mut s, &request(true, 0, 0, 130, 70), None)
            .unwrap();
        // Pixel (1, 1) in tile (0, 0) and pixel (100, 66) in tile (1, 1).
        rig.fb[(W as usize + 1) * 4] = 1;
        rig.fb[(66 * W as usize + 100) * 4] = 1;
        assert!(rig.scan_and_update(&mut s));
        assert_eq!(&s.out[..4], &[0, 0, 0, 2], "two rectangles");
    }

    #[test]
    fn sending_part_of_a_dirty_box_leaves_the_rest_dirty() {
        let r = Rect {
            x: 0,
            y: 0,
            w: 64,
            h: 64,
        };
        let left = Rect {
            x: 0,
            y: 0,
            w: 20,
            h: 100,
        };
        assert_eq!(
            subtract(r, left),
            Some(Rect {
                x: 20,
                y: 0,
                w: 44,
                h: 64
            })
        );
        let top = Rect {
            x: 0,
            y: 0,
            w: 64,
            h: 10,
        };
        assert_eq!(
            subtract(r, top),
            Some(Rect {
                x: 0,
                y: 10,
                w: 64,
                h: 54
            })
        );
        let middle = Rect {
            x: 10,
            y: 10,
            w: 5,
            h: 5,
        };
        assert_eq!(subtract(r, middle), Some(r));
        assert_eq!(
            subtract(
                r,
                Rect {
                    x: 0,
                    y: 0,
                    w: 64,
                    h: 64
                }
            ),
            None
        );
        let apart = Rect {
            x: 100,
            y: 0,
            w: 5,
            h: 5,
        };
        assert_eq!(subtract(r, apart), Some(r));
    }

    #[test]
    fn an_empty_or_off_screen_request_is_ignored() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        rig.feed(&mut s, &request(false, 0, 0, 0, 10), None)
            .unwrap();
        rig.feed(&mut s, &request(false, 500, 500, 10, 10), None)
            .unwrap();
        assert!(!s.wants_update());
    }

    #[test]
    fn a_mode_change_sends_desktop_size_then_the_whole_new_screen() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        let mut enc = vec![2, 0, 0, 2];
        enc.extend_from_slice(&0i32.to_be_bytes());
        enc.extend_from_slice(&number::DESKTOP_SIZE.to_be_bytes());
        rig.feed(&mut s, &enc, None).unwrap();
        rig.feed(&mut s, &request(true, 0, 0, 130, 70), None)
            .unwrap();
        s.mode_changed((64, 32));
        assert!(s.update_due_now());
        let small = Mode::packed(64, 32, 32);
        let screen = Screen::new(&rig.fb, small).unwrap();
        assert!(s.update(&screen, (1, 1)).unwrap());
        assert_eq!(&s.out[..4], &[0, 0, 0, 2], "DesktopSize and one rect");
        assert_eq!(
            &s.out[4..16],
            &[0, 0, 0, 0, 0, 64, 0, 32, 0xff, 0xff, 0xff, 0x21]
        );
        assert_eq!(&s.out[16..24], &[0, 0, 0, 0, 0, 64, 0, 32]);
    }

    #[test]
    fn a_colour_map_pixel_format_closes_the_session() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        let mut msg = vec![0, 0, 0, 0, 8, 8, 0, 0];
        msg.extend_from_slice(&[0; 12]);
        let err = rig.feed(&mut s, &msg, None).unwrap_err();
        assert!(matches!(
            err,
            SessionError::Message(MessageError::PixelFormat(_))
        ));
    }

    #[test]
    fn pointer_events_are_scaled_and_keys_translated() {
        let mut rig = Rig::new();
        let mut s = ready(&mut rig);
        rig.feed(&mut s, &[5, 4, 0, 129, 0, 69], None).unwrap();
        rig.feed(&mut s, &[4, 1, 0, 0, 0, 0, 0xff, 0x0d], None)
            .unwrap();
        assert_eq!(
            rig.input.pop(),
            Some(InputEvent::Pointer {
                x: 32767,
                y: 32767,
                buttons: 4
            })
        );
        assert_eq!(
            rig.input.pop(),
            Some(InputEvent::Key {
                code: crate::keymap::code::KEY_ENTER,
                down: true
            })
        );
    }
}
