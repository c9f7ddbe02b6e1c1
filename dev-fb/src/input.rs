//! Keyboard and pointer input from VNC clients, in the form the guest's virtio-input devices
//! take: evdev key codes and an absolute pointer scaled to `0..=ABS_MAX` on both axes.
//!
//! The VNC server hands every event to an [`InputSink`]: in the process, the virtio-input
//! keyboard and tablet ([`crate::virtio_input::InputDevices`]); in tests, an [`InputQueue`]:
//! bounded, dropping the oldest events when a consumer falls behind.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;

/// The largest absolute coordinate the tablet reports (`EV_ABS` range `0..=ABS_MAX`).
pub const ABS_MAX: u16 = 32767;

/// Most events an [`InputQueue`] holds.
pub const QUEUE_CAPACITY: usize = 1024;

/// One input event for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEvent {
    /// A key (evdev code, `linux/input-event-codes.h`) went down or up.
    Key { code: u16, down: bool },
    /// The absolute pointer: position scaled to `0..=ABS_MAX`, RFB button mask (bit 0 left,
    /// 1 middle, 2 right, 3 wheel up, 4 wheel down, 5 wheel left, 6 wheel right).
    Pointer { x: u16, y: u16, buttons: u8 },
}

/// Where the VNC server delivers input.
pub trait InputSink {
    fn deliver(&mut self, event: InputEvent);

    /// Descriptors the server's `poll` should also wait on for the sink (the virtio-input
    /// devices' runner channels and kicks). The server passes what fired, in the same order,
    /// to [`InputSink::poll_ready`] before anything else runs.
    fn poll_fds(&mut self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    /// Which of the last [`InputSink::poll_fds`] are readable (or hung up).
    fn poll_ready(&mut self, _ready: &[bool]) {}
}

/// Logs an event at trace level (the target tests and debugging filter on).
pub fn log_event(event: &InputEvent) {
    tracing::trace!(?event, "input");
}

/// A bounded queue of input events; when full, the oldest event is dropped.
#[derive(Debug, Default)]
pub struct InputQueue {
    events: VecDeque<InputEvent>,
    dropped: u64,
}

impl InputQueue {
    pub fn new() -> InputQueue {
        InputQueue::default()
    }

    /// Takes the oldest event.
    pub fn pop(&mut self) -> Option<InputEvent> {
        self.events.pop_front()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// How many events were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl InputSink for InputQueue {
    fn deliver(&mut self, event: InputEvent) {
        if self.events.len() >= QUEUE_CAPACITY {
            self.events.pop_front();
            self.dropped = self.dropped.saturating_add(1);
        }
        log_event(&event);
        self.events.push_back(event);
    }
}

/// Scales a screen coordinate in `0..size` to `0..=ABS_MAX` (the last pixel is `ABS_MAX`);
/// coordinates past the edge are clamped.
pub fn scale_to_abs(pos: u16, size: u32) -> u16 {
    let last = size.saturating_sub(1);
    if last == 0 {
        return 0;
    }
    let pos = u32::from(pos).min(last);
    let scaled = pos * u32::from(ABS_MAX) / last;
    u16::try_from(scaled).unwrap_or(ABS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_corners_scale_to_zero_and_abs_max() {
        assert_eq!(scale_to_abs(0, 1024), 0);
        assert_eq!(scale_to_abs(1023, 1024), ABS_MAX);
        assert_eq!(scale_to_abs(5000, 1024), ABS_MAX);
        assert_eq!(scale_to_abs(512, 1025), 16383);
        assert_eq!(scale_to_abs(3, 1), 0);
    }

    #[test]
    fn a_full_queue_drops_its_oldest_event() {
        let mut q = InputQueue::new();
        for code in (0u16..).take(QUEUE_CAPACITY + 1) {
            q.deliver(InputEvent::Key { code, down: true });
        }
        assert_eq!(q.len(), QUEUE_CAPACITY);
        assert_eq!(q.dropped(), 1);
        assert_eq!(
            q.pop(),
            Some(InputEvent::Key {
                code: 1,
                down: true
            })
        );
    }
}
