//! VNC input as the guest's evdev sees it: each [`InputEvent`] becomes a report, a few
//! `virtio_input_event`s closed by `SYN_REPORT` (§5.8.6.1, the evdev protocol).
//!
//! A key is one `EV_KEY` with value 1 (down) or 0 (up), or 2 (autorepeat) for a key that is
//! already down: the keyboard offers no `EV_REP`, so the guest does not repeat keys itself and
//! a VNC client's repeated key-downs (its own autorepeat) are the repeats. A pointer event reports only what
//! changed since the last one: the position (`ABS_X`, `ABS_Y`, already scaled to
//! `0..=ABS_MAX`), buttons that went down or up, and a wheel step for each wheel "button"
//! the client pressed (RFB sends wheel turns as presses of buttons 4–7). An event that changes
//! nothing produces no report. Pure: no I/O.

use crate::input::InputEvent;

use super::config::{
    ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_KEY, EV_REL, EV_SYN, REL_HWHEEL,
    REL_WHEEL, SYN_REPORT,
};

/// Bytes of one `virtio_input_event`.
pub const EVENT_BYTES: usize = 8;

/// One `virtio_input_event` (§5.8.6): `le16 type, le16 code, le32 value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

impl Event {
    pub const SYN: Event = Event {
        kind: EV_SYN,
        code: SYN_REPORT,
        value: 0,
    };

    /// The wire form.
    pub fn to_bytes(self) -> [u8; EVENT_BYTES] {
        let mut b = [0u8; EVENT_BYTES];
        let (kind, rest) = b.split_at_mut(2);
        let (code, value) = rest.split_at_mut(2);
        kind.copy_from_slice(&self.kind.to_le_bytes());
        code.copy_from_slice(&self.code.to_le_bytes());
        value.copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Parses the wire form (a status-queue event from the driver).
    pub fn from_bytes(b: [u8; EVENT_BYTES]) -> Event {
        let [k0, k1, c0, c1, v0, v1, v2, v3] = b;
        Event {
            kind: u16::from_le_bytes([k0, k1]),
            code: u16::from_le_bytes([c0, c1]),
            value: u32::from_le_bytes([v0, v1, v2, v3]),
        }
    }
}

/// RFB button-mask bits and the evdev buttons they are.
const BUTTONS: [(u8, u16); 3] = [
    (1 << 0, BTN_LEFT),
    (1 << 1, BTN_MIDDLE),
    (1 << 2, BTN_RIGHT),
];
/// RFB wheel "buttons" 4–7: the axis and step each press is.
const WHEELS: [(u8, u16, i32); 4] = [
    (1 << 3, REL_WHEEL, 1),
    (1 << 4, REL_WHEEL, -1),
    (1 << 5, REL_HWHEEL, -1),
    (1 << 6, REL_HWHEEL, 1),
];

/// Key codes a [`ReportState`] tracks (`KEY_CNT`); higher codes pass through untracked.
const KEY_CODES: u16 = 0x300;

/// What the guest was last told: the pointer, so a report carries only changes, and which
/// keys are down, so a second press is an autorepeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportState {
    position: Option<(u16, u16)>,
    buttons: u8,
    keys: [u64; KEY_CODES as usize / 64],
}

impl Default for ReportState {
    fn default() -> ReportState {
        ReportState {
            position: None,
            buttons: 0,
            keys: [0; KEY_CODES as usize / 64],
        }
    }
}

impl ReportState {
    /// Marks `code` down or up; returns whether it was down before.
    fn set_key(&mut self, code: u16, down: bool) -> bool {
        let Some(word) = self.keys.get_mut(usize::from(code / 64)) else {
            return false;
        };
        let bit = 1u64 << (code % 64);
        let was = *word & bit != 0;
        if down {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        was
    }
}

/// The report for `event`, or nothing if it changes nothing; `state` is updated.
pub fn report(event: InputEvent, state: &mut ReportState) -> Vec<Event> {
    let mut out = Vec::new();
    match event {
        InputEvent::Key { code, down } => {
            let was_down = state.set_key(code, down);
            out.push(Event {
                kind: EV_KEY,
                code,
                value: match (down, was_down) {
                    (true, true) => 2,
                    (true, false) => 1,
                    (false, _) => 0,
                },
            });
        }
        InputEvent::Pointer { x, y, buttons } => {
            if state.position != Some((x, y)) {
                let (old_x, old_y) = state
                    .position
                    .map_or((None, None), |(a, b)| (Some(a), Some(b)));
                if old_x != Some(x) {
                    out.push(abs(ABS_X, x));
                }
                if old_y != Some(y) {
                    out.push(abs(ABS_Y, y));
                }
                state.position = Some((x, y));
            }
            let changed = buttons ^ state.buttons;
            for (bit, code) in BUTTONS {
                if changed & bit != 0 {
                    out.push(Event {
                        kind: EV_KEY,
                        code,
                        value: u32::from(buttons & bit != 0),
                    });
                }
            }
            let pressed = changed & buttons;
            for (bit, code, step) in WHEELS {
                if pressed & bit != 0 {
                    out.push(Event {
                        kind: EV_REL,
                        code,
                        // Two's complement, as the driver reads an `le32` value.
                        value: step.cast_unsigned(),
                    });
                }
            }
            state.buttons = buttons;
        }
    }
    if !out.is_empty() {
        out.push(Event::SYN);
    }
    out
}

/// One report releasing every one of `codes` (keys or buttons), for a guest whose idea of
/// what is down this device cannot know: after dev-fb restarted under a running driver. The
/// guest's input core ignores releases of keys it has up.
pub fn release_all(codes: impl Iterator<Item = u16>) -> Vec<Event> {
    let mut out: Vec<Event> = codes
        .map(|code| Event {
            kind: EV_KEY,
            code,
            value: 0,
        })
        .collect();
    out.push(Event::SYN);
    out
}

fn abs(code: u16, v: u16) -> Event {
    Event {
        kind: EV_ABS,
        code,
        value: u32::from(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: u16, code: u16, value: u32) -> Event {
        Event { kind, code, value }
    }

    #[test]
    fn a_key_is_one_key_event_and_a_sync() {
        let mut p = ReportState::default();
        assert_eq!(
            report(
                InputEvent::Key {
                    code: 30,
                    down: true
                },
                &mut p
            ),
            vec![ev(EV_KEY, 30, 1), Event::SYN]
        );
        assert_eq!(
            report(
                InputEvent::Key {
                    code: 30,
                    down: false
                },
                &mut p
            ),
            vec![ev(EV_KEY, 30, 0), Event::SYN]
        );
    }

    #[test]
    fn a_second_press_of_a_held_key_is_an_autorepeat() {
        let mut p = ReportState::default();
        let key = |down| InputEvent::Key { code: 30, down };
        assert_eq!(
            report(key(true), &mut p),
            vec![ev(EV_KEY, 30, 1), Event::SYN]
        );
        assert_eq!(
            report(key(true), &mut p),
            vec![ev(EV_KEY, 30, 2), Event::SYN]
        );
        assert_eq!(
            report(key(false), &mut p),
            vec![ev(EV_KEY, 30, 0), Event::SYN]
        );
        assert_eq!(
            report(key(true), &mut p),
            vec![ev(EV_KEY, 30, 1), Event::SYN]
        );
        let high = InputEvent::Key {
            code: 0x2ff,
            down: true,
        };
        report(high, &mut p);
        assert_eq!(report(high, &mut p)[0].value, 2, "the last code is tracked");
        let beyond = InputEvent::Key {
            code: 0x300,
            down: true,
        };
        report(beyond, &mut p);
        assert_eq!(
            report(beyond, &mut p)[0].value,
            1,
            "codes past KEY_CNT are not"
        );
    }

    #[test]
    fn release_all_is_one_report_of_releases() {
        assert_eq!(
            release_all([30, BTN_LEFT].into_iter()),
            vec![ev(EV_KEY, 30, 0), ev(EV_KEY, BTN_LEFT, 0), Event::SYN]
        );
    }

    #[test]
    fn the_first_pointer_event_reports_the_position_and_later_ones_only_changes() {
        let mut p = ReportState::default();
        let at = |x, y, buttons| InputEvent::Pointer { x, y, buttons };
        assert_eq!(
            report(at(100, 200, 0), &mut p),
            vec![ev(EV_ABS, ABS_X, 100), ev(EV_ABS, ABS_Y, 200), Event::SYN]
        );
        assert_eq!(report(at(100, 200, 0), &mut p), vec![], "nothing changed");
        assert_eq!(
            report(at(100, 300, 1), &mut p),
            vec![ev(EV_ABS, ABS_Y, 300), ev(EV_KEY, BTN_LEFT, 1), Event::SYN]
        );
        assert_eq!(
            report(at(100, 300, 0b100), &mut p),
            vec![
                ev(EV_KEY, BTN_LEFT, 0),
                ev(EV_KEY, BTN_RIGHT, 1),
                Event::SYN
            ]
        );
        assert_eq!(
            report(at(100, 300, 0b110), &mut p),
            vec![ev(EV_KEY, BTN_MIDDLE, 1), Event::SYN]
        );
    }

    #[test]
    fn wheel_presses_are_one_step_each_and_their_releases_nothing() {
        let mut p = ReportState::default();
        let at = |buttons| InputEvent::Pointer {
            x: 0,
            y: 0,
            buttons,
        };
        report(at(0), &mut p);
        assert_eq!(
            report(at(1 << 3), &mut p),
            vec![ev(EV_REL, REL_WHEEL, 1), Event::SYN]
        );
        assert_eq!(report(at(0), &mut p), vec![]);
        assert_eq!(
            report(at(1 << 4), &mut p),
            vec![ev(EV_REL, REL_WHEEL, u32::MAX), Event::SYN]
        );
        assert_eq!(
            report(at(1 << 5), &mut p),
            vec![ev(EV_REL, REL_HWHEEL, u32::MAX), Event::SYN]
        );
        assert_eq!(
            report(at(1 << 6), &mut p),
            vec![ev(EV_REL, REL_HWHEEL, 1), Event::SYN]
        );
        assert_eq!(report(at(1 << 7), &mut p), vec![], "button 8 means nothing");
    }

    #[test]
    fn events_round_trip_through_their_wire_form() {
        let e = ev(EV_REL, REL_WHEEL, u32::MAX);
        assert_eq!(e.to_bytes(), [2, 0, 8, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(Event::from_bytes(e.to_bytes()), e);
    }
}
