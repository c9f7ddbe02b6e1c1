//! The guest's keyboard and tablet: virtio-input devices (virtio 1.2 §5.8) that dev-fb serves
//! itself, so VNC input reaches the guest without another process.
//!
//! The runner owns the transport; each device here has its own channel to the runner, like a
//! dev-net or dev-blk process would, and reads and writes its queues in the guest RAM memfd
//! mapped by `child::guest_ram`. The configuration space is a selector table sent once with
//! the device's `Info` ([`proto::device::FromDevice::InfoWithTable`]); the runner answers the
//! driver's reads from it.
//!
//! - [`config`]: the `Info` and selector table of each kind.
//! - [`events`]: VNC events → `virtio_input_event` reports.
//! - [`device`]: one device: runner messages, the queues, the backlog.
//!
//! [`InputDevices`] is the [`InputSink`] the VNC server delivers to: keys go to the keyboard,
//! pointer events to the tablet (dropped when the guest has none, `xhci_mouse="no"`).

pub mod config;
pub mod device;
pub mod events;

use std::os::fd::BorrowedFd;

use proto::device::InputKind;

pub use device::{InputError, InputStats, Token, VirtioInput};

use crate::input::{InputEvent, InputSink, log_event};

/// dev-fb's input devices (none, when it was started without device channels).
#[derive(Debug, Default)]
pub struct InputDevices {
    devices: Vec<VirtioInput>,
    /// The tokens of the last [`InputSink::poll_fds`], per device.
    polled: Vec<Vec<Token>>,
}

impl InputDevices {
    pub fn new(devices: Vec<VirtioInput>) -> InputDevices {
        InputDevices {
            devices,
            polled: Vec::new(),
        }
    }

    fn of_kind(&mut self, kind: InputKind) -> Option<&mut VirtioInput> {
        self.devices.iter_mut().find(|d| d.kind() == kind)
    }
}

impl InputSink for InputDevices {
    fn deliver(&mut self, event: InputEvent) {
        log_event(&event);
        let kind = match event {
            InputEvent::Key { .. } => InputKind::Keyboard,
            InputEvent::Pointer { .. } => InputKind::Tablet,
        };
        if let Some(d) = self.of_kind(kind) {
            d.deliver(event);
        }
    }

    fn poll_fds(&mut self) -> Vec<BorrowedFd<'_>> {
        self.polled.clear();
        let mut fds = Vec::new();
        for d in &self.devices {
            let listed = d.poll_fds();
            self.polled.push(listed.iter().map(|&(t, _)| t).collect());
            fds.extend(listed.into_iter().map(|(_, fd)| fd));
        }
        fds
    }

    fn poll_ready(&mut self, ready: &[bool]) {
        let mut ready = ready.iter();
        for (d, tokens) in self
            .devices
            .iter_mut()
            .zip(std::mem::take(&mut self.polled))
        {
            let fired: Vec<Token> = tokens
                .into_iter()
                .filter(|_| ready.next().copied().unwrap_or(false))
                .collect();
            for t in fired {
                d.ready(t);
            }
        }
    }
}
