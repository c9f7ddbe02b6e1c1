//! A recording [`Platform`] for the devices' unit tests.

use std::sync::Mutex;

use proto::runner::GuestExit;

use super::Platform;

/// Records every interrupt line change and exit request, in order.
#[derive(Debug, Default)]
pub(crate) struct RecordingPlatform {
    irqs: Mutex<Vec<(u32, bool)>>,
    exits: Mutex<Vec<GuestExit>>,
}

impl RecordingPlatform {
    /// Every `set_irq(gsi, level)` so far.
    pub(crate) fn irqs(&self) -> Vec<(u32, bool)> {
        self.irqs.lock().unwrap().clone()
    }

    /// Every `request_exit(exit)` so far.
    pub(crate) fn exits(&self) -> Vec<GuestExit> {
        self.exits.lock().unwrap().clone()
    }
}

impl Platform for RecordingPlatform {
    fn set_irq(&self, gsi: u32, level: bool) {
        self.irqs.lock().unwrap().push((gsi, level));
    }

    fn request_exit(&self, exit: GuestExit) {
        self.exits.lock().unwrap().push(exit);
    }
}
