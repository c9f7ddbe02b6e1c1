//! [`ModeSink`] over the runner↔dev-fb channel: mode changes become
//! [`ToDisplay::SetMode`] messages, sent by a thread of their own.
//!
//! The vCPU that programs the registers only stores the newest state and wakes the thread, so
//! a dev-fb that reads slowly (or not at all) never blocks the guest and never makes memory
//! grow: states the thread had no time to send are replaced by newer ones, and dev-fb only
//! needs the last.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use proto::channel::Channel;
use proto::display::{Mode, ToDisplay};

use super::ModeSink;

/// A state of the display to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Mode(Mode),
    Disabled,
}

/// What the thread has yet to send.
#[derive(Debug, Default)]
struct Pending {
    /// The newest state not yet sent.
    latest: Option<Shown>,
    /// The channel failed; nothing more is sent.
    closed: bool,
}

/// The sending side of the display channel.
#[derive(Debug, Default)]
pub struct ChannelSink {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl ChannelSink {
    /// Starts the thread that sends on `channel` and returns the sink that feeds it.
    pub fn spawn(channel: Channel) -> std::io::Result<Arc<ChannelSink>> {
        let sink = Arc::new(ChannelSink::default());
        let worker = sink.clone();
        std::thread::Builder::new()
            .name("display-out".into())
            .spawn(move || worker.run(&channel))?;
        Ok(sink)
    }

    /// Waits for the next mode to send.
    fn next(&self) -> Mode {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match pending.latest.take() {
                Some(Shown::Mode(mode)) => return mode,
                Some(Shown::Disabled) => {
                    // proto::display has no message for "disabled" yet: dev-fb keeps showing
                    // the last mode's memory.
                    tracing::debug!("display: disabled (not sent: ToDisplay has no such message)");
                }
                None => {
                    pending = self
                        .wake
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    fn run(&self, channel: &Channel) {
        loop {
            let mode = self.next();
            if let Err(e) = channel.send(&ToDisplay::SetMode(mode), &[]) {
                tracing::warn!(error = %e, "display: dev-fb channel failed; mode changes are no longer sent");
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .closed = true;
                return;
            }
            tracing::debug!(?mode, "display: mode sent to dev-fb");
        }
    }
}

impl ModeSink for ChannelSink {
    fn mode_changed(&self, mode: Option<Mode>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if !pending.closed {
            pending.latest = Some(mode.map_or(Shown::Disabled, Shown::Mode));
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_newest_mode_arrives_and_a_peer_that_never_reads_blocks_nobody() {
        let (ours, theirs) = Channel::pair().unwrap();
        let sink = ChannelSink::spawn(ours).unwrap();
        let first = Mode::packed(640, 480, 32);
        sink.mode_changed(Some(first));
        let got = theirs
            .recv_timeout::<ToDisplay>(Duration::from_secs(5))
            .unwrap()
            .msg;
        assert_eq!(got, ToDisplay::SetMode(first));
        // Thousands of changes while the peer does not read: each call returns at once.
        let started = std::time::Instant::now();
        for w in 1..=20_000u32 {
            sink.mode_changed(Some(Mode::packed(w % 1920 + 1, 480, 32)));
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        let last = Mode::packed(1024, 768, 32);
        sink.mode_changed(Some(last));
        // Draining, the last message is the newest mode.
        let mut seen = Vec::new();
        while let Ok(r) = theirs.recv_timeout::<ToDisplay>(Duration::from_millis(500)) {
            seen.push(r.msg);
        }
        assert_eq!(seen.last(), Some(&ToDisplay::SetMode(last)));
    }

    #[test]
    fn after_the_peer_hangs_up_changes_are_dropped() {
        let (ours, theirs) = Channel::pair().unwrap();
        let sink = ChannelSink::spawn(ours).unwrap();
        drop(theirs);
        for _ in 0..3 {
            sink.mode_changed(Some(Mode::packed(640, 480, 32)));
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(sink.pending.lock().unwrap().closed);
        sink.mode_changed(Some(Mode::packed(800, 600, 32)));
        assert_eq!(sink.pending.lock().unwrap().latest, None);
    }
}
