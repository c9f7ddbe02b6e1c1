//! The RFB client-to-server messages (RFC 6143 §7.5) and the handshake strings, parsed from
//! untrusted bytes with every length bounded.
//!
//! [`MessageReader`] takes bytes as they arrive and yields whole messages. Nothing a client
//! says makes it allocate more than a few hundred bytes: a SetEncodings list longer than
//! [`MAX_ENCODINGS`] keeps its first entries and skips the rest as they stream past, and
//! ClientCutText contents are skipped unread (up to [`MAX_CUT_TEXT`]; longer closes the
//! connection). An unknown message type is an error: RFB has no length prefix, so nothing
//! after it can be framed.

use crate::pixel::{PixelFormat, PixelFormatError};

/// Most encodings kept from one SetEncodings (the rest are skipped).
pub const MAX_ENCODINGS: usize = 64;
/// Longest ClientCutText accepted (its contents are discarded); longer closes the client.
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// Most screens kept from one SetDesktopSize.
pub const MAX_SCREENS: usize = 16;
/// The longest message the reader needs whole in its buffer: SetDesktopSize with 255 screens.
pub const MAX_BUFFERED_MESSAGE: usize = 8 + 255 * 16;

/// A rectangle in screen pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    pub x: u16,
    pub y: u16,
    pub w: u16,
    pub h: u16,
}

impl Rect {
    pub fn is_empty(&self) -> bool {
        self.w == 0 || self.h == 0
    }

    /// The smallest rectangle holding both.
    #[must_use]
    pub fn union(&self, other: Rect) -> Rect {
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 = self
            .x
            .saturating_add(self.w)
            .max(other.x.saturating_add(other.w));
        let y1 = self
            .y
            .saturating_add(self.h)
            .max(other.y.saturating_add(other.h));
        Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        }
    }

    /// The part of `self` inside `area` (empty if they do not meet).
    #[must_use]
    pub fn intersect(&self, area: Rect) -> Rect {
        let x0 = self.x.max(area.x);
        let y0 = self.y.max(area.y);
        let x1 = self
            .x
            .saturating_add(self.w)
            .min(area.x.saturating_add(area.w));
        let y1 = self
            .y
            .saturating_add(self.h)
            .min(area.y.saturating_add(area.h));
        Rect {
            x: x0,
            y: y0,
            w: x1.saturating_sub(x0),
            h: y1.saturating_sub(y0),
        }
    }

    /// `self` clipped to a `width`×`height` screen (empty if it lies outside).
    #[must_use]
    pub fn clip(&self, width: u16, height: u16) -> Rect {
        let x0 = self.x.min(width);
        let y0 = self.y.min(height);
        let x1 = self.x.saturating_add(self.w).min(width);
        let y1 = self.y.saturating_add(self.h).min(height);
        Rect {
            x: x0,
            y: y0,
            w: x1.saturating_sub(x0),
            h: y1.saturating_sub(y0),
        }
    }
}

/// One client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    SetPixelFormat(PixelFormat),
    /// The encodings the client listed (at most [`MAX_ENCODINGS`]), in its order of preference.
    SetEncodings(Vec<i32>),
    FramebufferUpdateRequest {
        incremental: bool,
        rect: Rect,
    },
    KeyEvent {
        down: bool,
        keysym: u32,
    },
    PointerEvent {
        buttons: u8,
        x: u16,
        y: u16,
    },
    /// ClientCutText of `len` bytes; the text itself is skipped.
    ClientCutText {
        len: u32,
    },
    /// QEMU Extended Key Event (message 255, sub-type 0).
    QemuKeyEvent {
        down: bool,
        keysym: u32,
        /// An XT scancode, extended keys as `0x80 | code` (0 = use the keysym).
        keycode: u32,
    },
    /// SetDesktopSize (251, from clients of ExtendedDesktopSize): always refused by dev-fb.
    SetDesktopSize {
        width: u16,
        height: u16,
        screens: usize,
    },
}

/// Why a client's bytes cannot be parsed; the client is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("unknown QEMU message sub-type {0}")]
    UnknownQemuSubtype(u8),
    #[error("ClientCutText of {0} bytes is longer than {MAX_CUT_TEXT}")]
    CutTextTooLong(u32),
    #[error("SetPixelFormat refused")]
    PixelFormat(#[from] PixelFormatError),
    #[error("SetDesktopSize with no screens")]
    NoScreens,
}

/// What [`MessageReader::next`] found at the start of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A message that used this many bytes.
    Message(ClientMessage, usize),
    /// Bytes of an earlier message's tail skipped unread.
    Skipped(usize),
    /// The buffer holds only part of a message.
    NeedMore,
}

/// A streaming parser of client messages.
#[derive(Debug, Default)]
pub struct MessageReader {
    /// Bytes still to skip: the unkept encodings, cut text.
    skip: u64,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*s.first()?, *s.get(1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(s))
}

impl MessageReader {
    /// Parses what starts `buf`.
    pub fn next(&mut self, buf: &[u8]) -> Result<Step, MessageError> {
        if self.skip > 0 {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            self.skip = self.skip.saturating_sub(n as u64);
            return Ok(Step::Skipped(n));
        }
        let Some(&kind) = buf.first() else {
            return Ok(Step::NeedMore);
        };
        let parsed = match kind {
            0 => buf.get(..20).map(|b| {
                let mut pf = [0u8; 16];
                pf.copy_from_slice(b.get(4..20).unwrap_or(&[0; 16]));
                PixelFormat::parse(&pf)
                    .map(|f| (ClientMessage::SetPixelFormat(f), 20))
                    .map_err(MessageError::from)
            }),
            2 => self.set_encodings(buf).map(Ok),
            3 => buf.get(..10).map(|b| {
                let rect = Rect {
                    x: be16(b, 2).unwrap_or(0),
                    y: be16(b, 4).unwrap_or(0),
                    w: be16(b, 6).unwrap_or(0),
                    h: be16(b, 8).unwrap_or(0),
                };
                let incremental = b.get(1).is_some_and(|&v| v != 0);
                Ok((
                    ClientMessage::FramebufferUpdateRequest { incremental, rect },
                    10,
                ))
            }),
            4 => buf.get(..8).map(|b| {
                Ok((
                    ClientMessage::KeyEvent {
                        down: b.get(1).is_some_and(|&v| v != 0),
                        keysym: be32(b, 4).unwrap_or(0),
                    },
                    8,
                ))
            }),
            5 => buf.get(..6).map(|b| {
                Ok((
                    ClientMessage::PointerEvent {
                        buttons: b.get(1).copied().unwrap_or(0),
                        x: be16(b, 2).unwrap_or(0),
                        y: be16(b, 4).unwrap_or(0),
                    },
                    6,
                ))
            }),
            6 => match be32(buf, 4) {
                None => None,
                Some(len) if len > MAX_CUT_TEXT => return Err(MessageError::CutTextTooLong(len)),
                Some(len) => {
                    self.skip = u64::from(len);
                    Some(Ok((ClientMessage::ClientCutText { len }, 8)))
                }
            },
            251 => Self::set_desktop_size(buf),
            255 => match buf.get(1) {
                None => None,
                Some(0) => buf.get(..12).map(|b| {
                    Ok((
                        ClientMessage::QemuKeyEvent {
                            down: be16(b, 2).is_some_and(|v| v != 0),
                            keysym: be32(b, 4).unwrap_or(0),
                            keycode: be32(b, 8).unwrap_or(0),
                        },
                        12,
                    ))
                }),
                Some(&sub) => return Err(MessageError::UnknownQemuSubtype(sub)),
            },
            other => return Err(MessageError::UnknownType(other)),
        };
        match parsed {
            None => Ok(Step::NeedMore),
            Some(Ok((msg, used))) => Ok(Step::Message(msg, used)),
            Some(Err(e)) => Err(e),
        }
    }

    /// SetEncodings: 1 type, 1 padding, u16 count, count × s32. Keeps the first
    /// [`MAX_ENCODINGS`] once they are all in `buf`; the rest are skipped as they arrive.
    fn set_encodings(&mut self, buf: &[u8]) -> Option<(ClientMessage, usize)> {
        let count = usize::from(be16(buf, 2)?);
        let kept = count.min(MAX_ENCODINGS);
        let used = 4 + kept * 4;
        let list = buf.get(4..used)?;
        let encodings = list
            .chunks_exact(4)
            .filter_map(|c| c.try_into().ok().map(i32::from_be_bytes))
            .collect();
        self.skip = ((count - kept) * 4) as u64;
        Some((ClientMessage::SetEncodings(encodings), used))
    }

    /// SetDesktopSize: 1 type, 1 padding, u16 width, u16 height, u8 screens, 1 padding,
    /// screens × 16 bytes. At most 255 screens, so the whole message is buffered.
    fn set_desktop_size(buf: &[u8]) -> Option<Result<(ClientMessage, usize), MessageError>> {
        let screens = usize::from(*buf.get(6)?);
        let used = 8 + screens * 16;
        buf.get(..used)?;
        if screens == 0 {
            return Some(Err(MessageError::NoScreens));
        }
        Some(Ok((
            ClientMessage::SetDesktopSize {
                width: be16(buf, 2)?,
                height: be16(buf, 4)?,
                screens: screens.min(MAX_SCREENS),
            },
            used,
        )))
    }
}

/// The RFB protocol versions dev-fb speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V3_3,
    V3_7,
    V3_8,
}

impl Version {
    /// The 12-byte ProtocolVersion string.
    pub fn wire(self) -> &'static [u8; 12] {
        match self {
            Version::V3_3 => b"RFB 003.003\n",
            Version::V3_7 => b"RFB 003.007\n",
            Version::V3_8 => b"RFB 003.008\n",
        }
    }
}

/// Why a ProtocolVersion is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("ProtocolVersion is not of the form \"RFB xxx.yyy\\n\"")]
    Garbled,
    #[error("RFB major version {0} is not 3")]
    Major(u32),
}

/// Parses the client's 12-byte ProtocolVersion (RFC 6143 §7.1.1). Minor versions other than 7
/// and 8 below 8 are 3.3 (as the RFC says for 3.4–3.6 and Apple's 3.889); above 8, 3.8.
pub fn parse_version(b: &[u8; 12]) -> Result<Version, VersionError> {
    let digits = |s: &[u8]| -> Option<u32> {
        s.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let (Some(b"RFB "), Some(major), Some(b"."), Some(minor), Some(b"\n")) = (
        b.get(..4),
        b.get(4..7).and_then(digits),
        b.get(7..8),
        b.get(8..11).and_then(digits),
        b.get(11..12),
    ) else {
        return Err(VersionError::Garbled);
    };
    if major != 3 {
        return Err(VersionError::Major(major));
    }
    Ok(match minor {
        7 => Version::V3_7,
        m if m >= 8 && m != 889 => Version::V3_8,
        _ => Version::V3_3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> Result<Step, MessageError> {
        MessageReader::default().next(buf)
    }

    #[test]
    fn versions_three_three_seven_eight_and_later_minor_are_recognised() {
        assert_eq!(parse_version(b"RFB 003.003\n"), Ok(Version::V3_3));
        assert_eq!(parse_version(b"RFB 003.005\n"), Ok(Version::V3_3));
        assert_eq!(parse_version(b"RFB 003.889\n"), Ok(Version::V3_3));
        assert_eq!(parse_version(b"RFB 003.007\n"), Ok(Version::V3_7));
        assert_eq!(parse_version(b"RFB 003.008\n"), Ok(Version::V3_8));
        assert_eq!(parse_version(b"RFB 003.010\n"), Ok(Version::V3_8));
    }

    #[test]
    fn garbled_or_foreign_versions_are_refused() {
        assert_eq!(parse_version(b"GET / HTTP/1"), Err(VersionError::Garbled));
        assert_eq!(parse_version(b"RFB 003.00a\n"), Err(VersionError::Garbled));
        assert_eq!(parse_version(b"RFB 004.000\n"), Err(VersionError::Major(4)));
    }

    #[test]
    fn an_update_request_is_parsed_only_when_whole() {
        let msg = [3, 1, 0, 1, 0, 2, 0, 30, 0, 40];
        assert_eq!(one(&msg[..9]), Ok(Step::NeedMore));
        assert_eq!(
            one(&msg),
            Ok(Step::Message(
                ClientMessage::FramebufferUpdateRequest {
                    incremental: true,
                    rect: Rect {
                        x: 1,
                        y: 2,
                        w: 30,
                        h: 40
                    }
                },
                10
            ))
        );
    }

    #[test]
    fn a_huge_encoding_list_keeps_sixty_four_and_skips_the_rest() {
        let count = 1000u16;
        let mut msg = vec![2, 0];
        msg.extend_from_slice(&count.to_be_bytes());
        for i in 0..i32::from(count) {
            msg.extend_from_slice(&i.to_be_bytes());
        }
        msg.extend_from_slice(&[5, 0, 0, 1, 0, 2]); // a PointerEvent after it
        let mut r = MessageReader::default();
        let Ok(Step::Message(ClientMessage::SetEncodings(list), used)) = r.next(&msg) else {
            panic!("no SetEncodings");
        };
        assert_eq!(list.len(), MAX_ENCODINGS);
        assert_eq!(list.last(), Some(&63));
        let mut at = used;
        while let Ok(Step::Skipped(n)) = r.next(&msg[at..at + 100.min(msg.len() - at)]) {
            at += n;
        }
        assert_eq!(at, 4 + 4000);
        assert_eq!(
            r.next(&msg[at..]),
            Ok(Step::Message(
                ClientMessage::PointerEvent {
                    buttons: 0,
                    x: 1,
                    y: 2
                },
                6
            ))
        );
    }

    #[test]
    fn cut_text_over_the_limit_is_an_error_and_under_it_is_skipped() {
        let mut msg = vec![6, 0, 0, 0];
        msg.extend_from_slice(&(MAX_CUT_TEXT + 1).to_be_bytes());
        assert_eq!(
            one(&msg),
            Err(MessageError::CutTextTooLong(MAX_CUT_TEXT + 1))
        );
        let mut r = MessageReader::default();
        let msg = [6, 0, 0, 0, 0, 0, 0, 3, b'a', b'b', b'c'];
        assert_eq!(
            r.next(&msg),
            Ok(Step::Message(ClientMessage::ClientCutText { len: 3 }, 8))
        );
        assert_eq!(r.next(&msg[8..]), Ok(Step::Skipped(3)));
        assert_eq!(r.next(&[]), Ok(Step::NeedMore));
    }

    #[test]
    fn unknown_types_and_qemu_subtypes_are_errors() {
        assert_eq!(one(&[7]), Err(MessageError::UnknownType(7)));
        assert_eq!(one(&[255, 1]), Err(MessageError::UnknownQemuSubtype(1)));
    }

    #[test]
    fn qemu_key_events_carry_the_scancode() {
        let msg = [255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e];
        assert_eq!(
            one(&msg),
            Ok(Step::Message(
                ClientMessage::QemuKeyEvent {
                    down: true,
                    keysym: 0x61,
                    keycode: 0x1e
                },
                12
            ))
        );
    }

    #[test]
    fn rectangles_clip_to_the_screen() {
        let r = Rect {
            x: 600,
            y: 10,
            w: 65535,
            h: 65535,
        };
        assert_eq!(
            r.clip(640, 480),
            Rect {
                x: 600,
                y: 10,
                w: 40,
                h: 470
            }
        );
        let outside = Rect {
            x: 700,
            y: 0,
            w: 10,
            h: 10,
        };
        assert!(outside.clip(640, 480).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panicking_and_make_progress(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)
        ) {
            let mut r = MessageReader::default();
            let mut at = 0;
            while let Ok(Step::Message(_, n) | Step::Skipped(n)) = r.next(&data[at..]) {
                proptest::prop_assert!(n > 0 && at + n <= data.len());
                at += n;
            }
        }
    }
}
