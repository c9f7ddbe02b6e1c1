//! Keys from the client to Linux evdev key codes (`linux/input-event-codes.h`), which the
//! virtio-input keyboard passes to the guest.
//!
//! Two sources: an X11 keysym (RFB KeyEvent, RFC 6143 §7.5.4), translated for a US layout —
//! the client sends Shift itself, so `A` and `a` are both `KEY_A`, `!` is `KEY_1`; and an XT
//! scancode (QEMU Extended Key Event), which names the physical key and so works for any
//! guest layout. Unknown keys are `None` and dropped.

/// evdev codes used by the tables and tests.
pub mod code {
    pub const KEY_ESC: u16 = 1;
    pub const KEY_1: u16 = 2;
    pub const KEY_0: u16 = 11;
    pub const KEY_BACKSPACE: u16 = 14;
    pub const KEY_TAB: u16 = 15;
    pub const KEY_Q: u16 = 16;
    pub const KEY_ENTER: u16 = 28;
    pub const KEY_LEFTCTRL: u16 = 29;
    pub const KEY_A: u16 = 30;
    pub const KEY_LEFTSHIFT: u16 = 42;
    pub const KEY_Z: u16 = 44;
    pub const KEY_RIGHTSHIFT: u16 = 54;
    pub const KEY_LEFTALT: u16 = 56;
    pub const KEY_SPACE: u16 = 57;
    pub const KEY_F1: u16 = 59;
    pub const KEY_F11: u16 = 87;
    pub const KEY_F12: u16 = 88;
    pub const KEY_RIGHTCTRL: u16 = 97;
    pub const KEY_RIGHTALT: u16 = 100;
    pub const KEY_HOME: u16 = 102;
    pub const KEY_UP: u16 = 103;
    pub const KEY_PAGEUP: u16 = 104;
    pub const KEY_LEFT: u16 = 105;
    pub const KEY_RIGHT: u16 = 106;
    pub const KEY_END: u16 = 107;
    pub const KEY_DOWN: u16 = 108;
    pub const KEY_PAGEDOWN: u16 = 109;
    pub const KEY_INSERT: u16 = 110;
    pub const KEY_DELETE: u16 = 111;
    pub const KEY_LEFTMETA: u16 = 125;
    pub const KEY_RIGHTMETA: u16 = 126;
    pub const KEY_COMPOSE: u16 = 127;
}

use code::{
    KEY_0, KEY_1, KEY_BACKSPACE, KEY_COMPOSE, KEY_DELETE, KEY_DOWN, KEY_END, KEY_ENTER, KEY_ESC,
    KEY_F1, KEY_F11, KEY_F12, KEY_HOME, KEY_INSERT, KEY_LEFT, KEY_LEFTALT, KEY_LEFTCTRL,
    KEY_LEFTMETA, KEY_LEFTSHIFT, KEY_PAGEDOWN, KEY_PAGEUP, KEY_RIGHT, KEY_RIGHTALT, KEY_RIGHTCTRL,
    KEY_RIGHTMETA, KEY_RIGHTSHIFT, KEY_SPACE, KEY_TAB, KEY_UP,
};

/// The letters row by row as evdev numbers them (qwertyuiop, asdfghjkl, zxcvbnm).
const LETTER_CODES: [u16; 26] = [
    30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45,
    21, 44,
];

/// US-layout punctuation: (unshifted keysym, shifted keysym, evdev code).
const PUNCTUATION: [(u8, u8, u16); 11] = [
    (b'-', b'_', 12),
    (b'=', b'+', 13),
    (b'[', b'{', 26),
    (b']', b'}', 27),
    (b';', b':', 39),
    (b'\'', b'"', 40),
    (b'`', b'~', 41),
    (b'\\', b'|', 43),
    (b',', b'<', 51),
    (b'.', b'>', 52),
    (b'/', b'?', 53),
];

/// Shifted digits on a US keyboard, `!` over 1 through `)` over 0.
const SHIFTED_DIGITS: &[u8; 10] = b"!@#$%^&*()";

/// Function and modifier keysyms (0xffxx) and their codes.
const SPECIAL: [(u32, u16); 45] = [
    (0xff08, KEY_BACKSPACE),
    (0xff09, KEY_TAB),
    (0xff0d, KEY_ENTER),
    (0xff13, 119), // Pause
    (0xff14, 70),  // Scroll_Lock
    (0xff15, 99),  // Sys_Req
    (0xff1b, KEY_ESC),
    (0xff50, KEY_HOME),
    (0xff51, KEY_LEFT),
    (0xff52, KEY_UP),
    (0xff53, KEY_RIGHT),
    (0xff54, KEY_DOWN),
    (0xff55, KEY_PAGEUP),
    (0xff56, KEY_PAGEDOWN),
    (0xff57, KEY_END),
    (0xff61, 99), // Print
    (0xff63, KEY_INSERT),
    (0xff67, KEY_COMPOSE), // Menu
    (0xff7f, 69),          // Num_Lock
    (0xff8d, 96),          // KP_Enter
    (0xffaa, 55),          // KP_Multiply
    (0xffab, 78),          // KP_Add
    (0xffad, 74),          // KP_Subtract
    (0xffae, 83),          // KP_Decimal
    (0xffaf, 98),          // KP_Divide
    (0xffb0, 82),          // KP_0
    (0xffb1, 79),          // KP_1
    (0xffb2, 80),          // KP_2
    (0xffb3, 81),          // KP_3
    (0xffb4, 75),          // KP_4
    (0xffb5, 76),          // KP_5
    (0xffb6, 77),          // KP_6
    (0xffb7, 71),          // KP_7
    (0xffb8, 72),          // KP_8
    (0xffb9, 73),          // KP_9
    (0xffe1, KEY_LEFTSHIFT),
    (0xffe2, KEY_RIGHTSHIFT),
    (0xffe3, KEY_LEFTCTRL),
    (0xffe4, KEY_RIGHTCTRL),
    (0xffe5, 58), // Caps_Lock
    (0xffe9, KEY_LEFTALT),
    (0xffea, KEY_RIGHTALT),
    (0xffeb, KEY_LEFTMETA),  // Super_L
    (0xffec, KEY_RIGHTMETA), // Super_R
    (0xffff, KEY_DELETE),
];

/// The evdev code of an X11 keysym on a US layout.
pub fn keysym_to_evdev(keysym: u32) -> Option<u16> {
    if let Ok(c) = u8::try_from(keysym) {
        let lower = c.to_ascii_lowercase();
        if lower.is_ascii_lowercase() {
            return LETTER_CODES.get(usize::from(lower - b'a')).copied();
        }
        if c == b'0' {
            return Some(KEY_0);
        }
        if (b'1'..=b'9').contains(&c) {
            return Some(KEY_1 + u16::from(c - b'1'));
        }
        if c == b' ' {
            return Some(KEY_SPACE);
        }
        if let Some(pos) = SHIFTED_DIGITS.iter().position(|&s| s == c) {
            // `)` is over 0, the others over 1..=9.
            return Some(match u16::try_from(pos) {
                Ok(p) if p < 9 => KEY_1 + p,
                _ => KEY_0,
            });
        }
        return PUNCTUATION
            .iter()
            .find(|&&(plain, shifted, _)| c == plain || c == shifted)
            .map(|&(_, _, code)| code);
    }
    // F1..F10 are 59..68, F11 and F12 are 87 and 88.
    if (0xffbe..=0xffc7).contains(&keysym) {
        return u16::try_from(keysym - 0xffbe).ok().map(|n| KEY_F1 + n);
    }
    match keysym {
        0xffc8 => return Some(KEY_F11),
        0xffc9 => return Some(KEY_F12),
        // ISO_Left_Tab (Shift+Tab on X11)
        0xfe20 => return Some(KEY_TAB),
        // Meta_L/R: the Windows keys on some clients
        0xffe7 => return Some(KEY_LEFTMETA),
        0xffe8 => return Some(KEY_RIGHTMETA),
        _ => {}
    }
    SPECIAL
        .iter()
        .find(|&&(sym, _)| sym == keysym)
        .map(|&(_, code)| code)
}

/// Extended XT scancodes (`0xe0` prefix, encoded `0x80 | code`) and their evdev codes.
const XT_EXTENDED: [(u8, u16); 19] = [
    (0x1c, 96), // KP_Enter
    (0x1d, KEY_RIGHTCTRL),
    (0x35, 98), // KP_Divide
    (0x37, 99), // Print
    (0x38, KEY_RIGHTALT),
    (0x46, 119), // Pause (Ctrl+Break)
    (0x47, KEY_HOME),
    (0x48, KEY_UP),
    (0x49, KEY_PAGEUP),
    (0x4b, KEY_LEFT),
    (0x4d, KEY_RIGHT),
    (0x4f, KEY_END),
    (0x50, KEY_DOWN),
    (0x51, KEY_PAGEDOWN),
    (0x52, KEY_INSERT),
    (0x53, KEY_DELETE),
    (0x5b, KEY_LEFTMETA),
    (0x5c, KEY_RIGHTMETA),
    (0x5d, KEY_COMPOSE),
];

/// Plain XT scancodes above F12 and their evdev codes.
const XT_HIGH: [(u8, u16); 4] = [
    (0x59, 117), // KP_Equal
    (0x70, 93),  // Katakana/Hiragana
    (0x73, 89),  // RO
    (0x7d, 124), // Yen
];

/// The evdev code of a QEMU extended-key-event keycode (an XT scancode; extended keys have the
/// high bit set).
pub fn xt_to_evdev(keycode: u32) -> Option<u16> {
    let code = u8::try_from(keycode).ok()?;
    if code & 0x80 != 0 {
        let base = code & 0x7f;
        return XT_EXTENDED
            .iter()
            .find(|&&(sc, _)| sc == base)
            .map(|&(_, ev)| ev);
    }
    // Set 1 scancodes 0x01..=0x58 are numbered like evdev, except 0x54 (Alt+SysRq on AT
    // keyboards) and 0x55, which have no key of their own.
    if (0x01..=0x58).contains(&code) && code != 0x54 && code != 0x55 {
        return Some(u16::from(code));
    }
    XT_HIGH
        .iter()
        .find(|&&(sc, _)| sc == code)
        .map(|&(_, ev)| ev)
}

#[cfg(test)]
mod tests {
    use super::code::{KEY_A, KEY_Q, KEY_Z};
    use super::*;

    #[test]
    fn letters_map_to_their_keys_in_either_case() {
        assert_eq!(keysym_to_evdev(u32::from(b'a')), Some(KEY_A));
        assert_eq!(keysym_to_evdev(u32::from(b'A')), Some(KEY_A));
        assert_eq!(keysym_to_evdev(u32::from(b'q')), Some(KEY_Q));
        assert_eq!(keysym_to_evdev(u32::from(b'Z')), Some(KEY_Z));
        assert_eq!(keysym_to_evdev(u32::from(b'm')), Some(50));
    }

    #[test]
    fn digits_and_their_shifted_symbols_map_to_the_digit_row() {
        assert_eq!(keysym_to_evdev(u32::from(b'1')), Some(KEY_1));
        assert_eq!(keysym_to_evdev(u32::from(b'9')), Some(10));
        assert_eq!(keysym_to_evdev(u32::from(b'0')), Some(KEY_0));
        assert_eq!(keysym_to_evdev(u32::from(b'!')), Some(KEY_1));
        assert_eq!(keysym_to_evdev(u32::from(b')')), Some(KEY_0));
    }

    #[test]
    fn return_shift_ctrl_and_arrows_map_to_their_keys() {
        assert_eq!(keysym_to_evdev(0xff0d), Some(KEY_ENTER));
        assert_eq!(keysym_to_evdev(0xffe1), Some(KEY_LEFTSHIFT));
        assert_eq!(keysym_to_evdev(0xffe2), Some(KEY_RIGHTSHIFT));
        assert_eq!(keysym_to_evdev(0xffe3), Some(KEY_LEFTCTRL));
        assert_eq!(keysym_to_evdev(0xffe4), Some(KEY_RIGHTCTRL));
        assert_eq!(keysym_to_evdev(0xff51), Some(KEY_LEFT));
        assert_eq!(keysym_to_evdev(0xff52), Some(KEY_UP));
        assert_eq!(keysym_to_evdev(0xff53), Some(KEY_RIGHT));
        assert_eq!(keysym_to_evdev(0xff54), Some(KEY_DOWN));
    }

    #[test]
    fn function_keys_and_punctuation_map_to_us_layout_keys() {
        assert_eq!(keysym_to_evdev(0xffbe), Some(KEY_F1));
        assert_eq!(keysym_to_evdev(0xffc9), Some(KEY_F12));
        assert_eq!(keysym_to_evdev(u32::from(b'?')), Some(53));
        assert_eq!(keysym_to_evdev(u32::from(b' ')), Some(KEY_SPACE));
    }

    #[test]
    fn unknown_keysyms_map_to_nothing() {
        assert_eq!(keysym_to_evdev(0x20ac), None); // EuroSign
        assert_eq!(keysym_to_evdev(0xffff_ffff), None);
        assert_eq!(keysym_to_evdev(0x7f), None);
    }

    #[test]
    fn xt_scancodes_map_plain_and_extended_keys() {
        assert_eq!(xt_to_evdev(0x1e), Some(KEY_A));
        assert_eq!(xt_to_evdev(0x1c), Some(KEY_ENTER));
        assert_eq!(xt_to_evdev(0x80 | 0x48), Some(KEY_UP));
        assert_eq!(xt_to_evdev(0x80 | 0x1d), Some(KEY_RIGHTCTRL));
        assert_eq!(xt_to_evdev(0x58), Some(KEY_F12));
        assert_eq!(xt_to_evdev(0), None);
        assert_eq!(xt_to_evdev(0x1_0000), None);
    }
}
