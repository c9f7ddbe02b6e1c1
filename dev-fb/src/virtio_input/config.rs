//! What the guest's driver learns about each input device (virtio 1.2 §5.8.4): its `Info`
//! and the selector table the runner answers configuration reads from.
//!
//! The keyboard reports every key [`crate::keymap`] can produce (by keysym or by scancode)
//! and the Num/Caps/Scroll Lock LEDs, whose state the guest sends on the status queue. It does
//! not offer key repeat (`EV_REP`). QEMU's virtio keyboard and a USB HID keyboard do, and the
//! guest then repeats a held key itself after 250 ms; but a VNC client's key-up can come later
//! than that on a loaded link (vncdo typing "ab" got "aab"), and VNC clients repeat held keys
//! themselves by sending the key-down again. So the client's repeats drive it: a key-down for
//! a key already down goes to the guest as an autorepeat (value 2, see [`super::events`]). The
//! tablet
//! is an absolute pointer over the whole screen, `0..=ABS_MAX` on both axes, with the three
//! buttons and both wheels a VNC client can send. Like QEMU's virtio tablet it sets no
//! property bits: `INPUT_PROP_DIRECT` would make it a touchscreen, and without `BTN_TOUCH`
//! or a pen tool the guest's input stack takes an absolute device with mouse buttons as a
//! mouse that jumps to where the client's pointer is.

use proto::device::{
    ConfigEntry, ConfigTable, DeviceInfo, INPUT_CONFIG_BYTES, InputKind, VIRTIO_ID_INPUT,
    input_select,
};

use crate::input::ABS_MAX;
use crate::keymap::{keysym_to_evdev, xt_to_evdev};

/// Event types (`linux/input-event-codes.h`).
pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const EV_LED: u16 = 0x11;
pub const EV_REP: u16 = 0x14;
/// `SYN_REPORT`: the events since the last one form one report.
pub const SYN_REPORT: u16 = 0;
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;
pub const REL_HWHEEL: u16 = 0x06;
pub const REL_WHEEL: u16 = 0x08;
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;
/// Num Lock, Caps Lock and Scroll Lock (`LED_NUML`..=`LED_SCROLLL`).
const KEYBOARD_LEDS: u8 = 0b111;

/// `BUS_VIRTUAL`.
const BUS_VIRTUAL: u16 = 0x06;
/// The vendor QEMU's virtio input devices report; guests already know its devices.
const VENDOR: u16 = 0x0627;
const PRODUCT_KEYBOARD: u16 = 0x0001;
const PRODUCT_TABLET: u16 = 0x0003;
const VERSION: u16 = 0x0001;

/// `VIRTIO_F_VERSION_1`, the only feature offered.
pub const FEATURES: u64 = 1 << 32;
/// Entries of each queue: what QEMU offers; the event queue holds that many reports' worth.
pub const MAX_QUEUE_SIZE: u16 = 64;
/// Queue 0 carries events to the driver, queue 1 LED and other status back (§5.8.2).
pub const EVENT_QUEUE: u16 = 0;
pub const STATUS_QUEUE: u16 = 1;

/// The `Info` of `kind`: two queues, the selector space left zero for the runner to fill.
pub fn info(_kind: InputKind) -> DeviceInfo {
    DeviceInfo {
        device_type: VIRTIO_ID_INPUT,
        features: FEATURES,
        queues: 2,
        max_queue_size: MAX_QUEUE_SIZE,
        config: vec![0; INPUT_CONFIG_BYTES],
    }
}

/// The name the guest sees (`/proc/bus/input/devices`, `evtest`).
pub fn name(kind: InputKind) -> &'static str {
    match kind {
        InputKind::Keyboard => "capvm keyboard",
        InputKind::Tablet => "capvm tablet",
    }
}

/// Every answer `kind` gives the driver.
pub fn table(kind: InputKind) -> ConfigTable {
    let (product, serial) = match kind {
        InputKind::Keyboard => (PRODUCT_KEYBOARD, "capvm-keyboard-0"),
        InputKind::Tablet => (PRODUCT_TABLET, "capvm-tablet-0"),
    };
    let mut devids = Vec::with_capacity(8);
    for v in [BUS_VIRTUAL, VENDOR, product, VERSION] {
        devids.extend_from_slice(&v.to_le_bytes());
    }
    let mut entries = vec![
        entry(input_select::ID_NAME, 0, name(kind).as_bytes().to_vec()),
        entry(input_select::ID_SERIAL, 0, serial.as_bytes().to_vec()),
        entry(input_select::ID_DEVIDS, 0, devids),
    ];
    match kind {
        InputKind::Keyboard => {
            entries.push(ev_bits(EV_KEY, bitmap(keyboard_keys())));
            // No `EV_REP`: the client repeats keys (module docs).
            entries.push(ev_bits(EV_LED, vec![KEYBOARD_LEDS]));
        }
        InputKind::Tablet => {
            entries.push(ev_bits(
                EV_KEY,
                bitmap([BTN_LEFT, BTN_RIGHT, BTN_MIDDLE].into_iter()),
            ));
            entries.push(ev_bits(EV_REL, bitmap([REL_HWHEEL, REL_WHEEL].into_iter())));
            entries.push(ev_bits(EV_ABS, bitmap([ABS_X, ABS_Y].into_iter())));
            for axis in [ABS_X, ABS_Y] {
                entries.push(entry(
                    input_select::ABS_INFO,
                    u8::try_from(axis).unwrap_or(0),
                    abs_info(0, u32::from(ABS_MAX)),
                ));
            }
        }
    }
    ConfigTable { entries }
}

fn entry(select: u8, subsel: u8, data: Vec<u8>) -> ConfigEntry {
    ConfigEntry {
        select,
        subsel,
        data,
    }
}

fn ev_bits(ev_type: u16, bits: Vec<u8>) -> ConfigEntry {
    entry(
        input_select::EV_BITS,
        u8::try_from(ev_type).unwrap_or(0),
        bits,
    )
}

/// `virtio_input_absinfo`: min, max, fuzz 0, flat 0, resolution 0.
fn abs_info(min: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    for field in [min, max, 0, 0, 0] {
        v.extend_from_slice(&field.to_le_bytes());
    }
    v
}

/// The keys or buttons of `kind`, each once, ascending: what a release of everything covers.
pub fn releasable(kind: InputKind) -> impl Iterator<Item = u16> {
    let codes: std::collections::BTreeSet<u16> = match kind {
        InputKind::Keyboard => keyboard_keys().collect(),
        InputKind::Tablet => [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE].into_iter().collect(),
    };
    codes.into_iter()
}

/// Every evdev code the keymap yields, from keysyms (Latin-1 and the 0xfexx/0xffxx function
/// keys) and from XT scancodes.
fn keyboard_keys() -> impl Iterator<Item = u16> {
    let by_keysym = (0u32..=0xff)
        .chain(0xfe00..=0xffff)
        .filter_map(keysym_to_evdev);
    let by_scancode = (0u32..=0xff).filter_map(xt_to_evdev);
    by_keysym.chain(by_scancode)
}

/// A little-endian bitmap of `codes`, as long as its highest set bit needs.
fn bitmap(codes: impl Iterator<Item = u16>) -> Vec<u8> {
    let mut bits = Vec::new();
    for code in codes {
        let byte = usize::from(code / 8);
        if bits.len() <= byte {
            bits.resize(byte + 1, 0);
        }
        if let Some(b) = bits.get_mut(byte) {
            *b |= 1 << (code % 8);
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keymap::code::{KEY_A, KEY_ENTER, KEY_LEFTSHIFT, KEY_UP};

    fn has(bits: &[u8], code: u16) -> bool {
        bits.get(usize::from(code / 8))
            .is_some_and(|b| b & (1 << (code % 8)) != 0)
    }

    #[test]
    fn both_tables_pass_the_runners_checks() {
        for kind in [InputKind::Keyboard, InputKind::Tablet] {
            assert_eq!(table(kind).validate_for(&info(kind)), Ok(()), "{kind:?}");
        }
    }

    #[test]
    fn the_keyboard_reports_the_keys_of_the_keymap_and_leds_and_no_repeat() {
        let t = table(InputKind::Keyboard);
        let keys = t.lookup(input_select::EV_BITS, 1).unwrap();
        for code in [KEY_A, KEY_ENTER, KEY_LEFTSHIFT, KEY_UP, 124] {
            assert!(has(keys, code), "key {code}");
        }
        assert!(!has(keys, 0), "KEY_RESERVED");
        assert!(!has(keys, BTN_LEFT));
        assert_eq!(t.lookup(input_select::EV_BITS, 0x14), None, "no EV_REP");
        assert_eq!(t.lookup(input_select::EV_BITS, 0x11), Some(&[7u8][..]));
        assert_eq!(t.lookup(input_select::EV_BITS, 3), None, "no axes");
        assert_eq!(
            t.lookup(input_select::ID_NAME, 0),
            Some(&b"capvm keyboard"[..])
        );
        assert_eq!(
            t.lookup(input_select::ID_DEVIDS, 0),
            Some(&[6, 0, 0x27, 6, 1, 0, 1, 0][..])
        );
        assert_eq!(t.lookup(input_select::PROP_BITS, 0), None);
    }

    #[test]
    fn the_tablet_reports_two_absolute_axes_three_buttons_two_wheels_and_no_properties() {
        let t = table(InputKind::Tablet);
        let keys = t.lookup(input_select::EV_BITS, 1).unwrap();
        assert_eq!(keys.len(), 35);
        for code in [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE] {
            assert!(has(keys, code));
        }
        assert!(!has(keys, KEY_A));
        assert_eq!(
            releasable(InputKind::Tablet).collect::<Vec<_>>(),
            [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]
        );
        assert_eq!(t.lookup(input_select::EV_BITS, 2), Some(&[0x40, 0x01][..]));
        assert_eq!(t.lookup(input_select::EV_BITS, 3), Some(&[0x03][..]));
        let x = t.lookup(input_select::ABS_INFO, 0).unwrap();
        assert_eq!(&x[..8], &[0, 0, 0, 0, 0xff, 0x7f, 0, 0]);
        assert!(t.lookup(input_select::ABS_INFO, 1).is_some());
        assert_eq!(t.lookup(input_select::PROP_BITS, 0), None);
        assert_eq!(t.lookup(input_select::EV_BITS, 0x14), None, "no repeat");
    }
}
