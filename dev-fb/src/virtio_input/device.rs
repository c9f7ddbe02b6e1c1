//! One virtio-input device (keyboard or tablet) as dev-fb serves it to the runner.
//!
//! ```text
//!  VNC client ──event──▶ report() ──▶ backlog ──▶ eventq buffers ──▶ call eventfd ──▶ guest
//!  guest ──eventq kick──▶ buffers are back: the backlog drains
//!  guest ──statusq kick─▶ LED state read (logged at trace), buffers returned
//! ```
//!
//! Reports wait in a bounded backlog while the driver has no buffers ([`BACKLOG_EVENTS`]):
//! when it is full the oldest whole report goes, so the guest never sees half a report, and
//! the drop is counted. Events before the driver activated the device (or after a reset) are
//! dropped too: they belong to no driver. A broken ring asks the runner for a reset
//! (`NeedsReset`, §2.1.2) and the device stops using its queues until the next `Activate`, as
//! dev-net does. If the runner goes away (the guest ended) the device stops; dev-fb serves on.
//! Activated on rings a driver has already used (this process replaces one that died), the
//! device first releases every key or button it has, since the guest may still hold some down.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use proto::channel::{Channel, ChannelError, ChannelKind, Hello, Received};
use proto::device::{DeviceInfo, FromDevice, InputKind, QueueConfig, ToDevice};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::config::{self, EVENT_QUEUE, FEATURES, MAX_QUEUE_SIZE, STATUS_QUEUE};
use super::events::{EVENT_BYTES, Event, ReportState, release_all, report};
use crate::input::InputEvent;

/// Most events the backlog holds (128 key presses with their syncs, four times over).
pub const BACKLOG_EVENTS: usize = 1024;
/// [`EVENT_BYTES`] as a used-ring length.
const EVENT_LEN: u32 = 8;
/// Status buffers taken per kick, so a driver flooding the status queue cannot hold the loop.
const STATUS_BUDGET: usize = 256;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("the runner channel failed")]
    Channel(#[from] ChannelError),
}

/// The ring is broken: the device needs a reset.
#[derive(Debug, thiserror::Error)]
enum RingError {
    #[error("reading the available ring failed")]
    Avail(#[from] virtio_queue::Error),
    #[error("descriptor chain at head {0} has no descriptor")]
    Empty(u16),
}

/// Counters, logged when the device stops.
#[derive(Debug, Clone, Copy, Default)]
pub struct InputStats {
    /// Events written into driver buffers.
    pub delivered: u64,
    /// Events dropped from a full backlog.
    pub dropped: u64,
    /// VNC events that came while no driver had the device, and undelivered events a reset
    /// dropped.
    pub inactive: u64,
    /// Event-queue buffers the device could not use (too short, read-only, outside RAM).
    pub bad_buffers: u64,
    /// Status events the driver sent.
    pub status: u64,
}

/// The queues of an activated device.
#[derive(Debug)]
struct Active {
    eventq: Queue,
    statusq: Queue,
    event_kick: File,
    event_call: File,
    status_kick: File,
    status_call: File,
}

/// Which of a device's descriptors [`VirtioInput::poll_fds`] listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Runner,
    EventKick,
    StatusKick,
}

/// One virtio-input device.
#[derive(Debug)]
pub struct VirtioInput {
    kind: InputKind,
    info: DeviceInfo,
    /// `None` once the runner has gone away.
    runner: Option<Channel>,
    /// Our hello is sent and the runner's not read yet: the device has not introduced itself.
    greeting: bool,
    mem: GuestMemoryMmap,
    active: Option<Active>,
    backlog: VecDeque<Event>,
    /// What the current driver was told (keys down, pointer).
    state: ReportState,
    stats: InputStats,
}

impl VirtioInput {
    /// Says hello to the runner on `runner` and waits at most `timeout` for its hello, then
    /// introduces the device with its table. A runner that has not answered by then gets the
    /// introduction when it does ([`Token::Runner`] in the server's loop): the channel stays
    /// open, since the runner refuses to build the machine around a device that hung up.
    pub fn start(
        kind: InputKind,
        runner: Channel,
        mem: GuestMemoryMmap,
        timeout: Duration,
    ) -> Result<VirtioInput, InputError> {
        runner.send(&Hello::new(ChannelKind::RunnerDevice), &[])?;
        let hello = runner.recv_timeout::<Hello>(timeout);
        let mut dev = VirtioInput {
            kind,
            info: config::info(kind),
            runner: Some(runner),
            mem,
            greeting: true,
            active: None,
            backlog: VecDeque::new(),
            state: ReportState::default(),
            stats: InputStats::default(),
        };
        match hello {
            Ok(received) => dev.greeted(received)?,
            Err(ChannelError::Timeout) => tracing::error!(
                device = config::name(kind),
                waited_ms = timeout.as_millis(),
                "the runner has not answered the device handshake; serving VNC without this \
                 device until it does"
            ),
            Err(e) => return Err(e.into()),
        }
        if let Some(r) = &dev.runner {
            r.set_nonblocking(true)?;
        }
        Ok(dev)
    }

    /// The runner's hello came: checked, it is answered with the device's `Info` and table.
    fn greeted(&mut self, received: Received<Hello>) -> Result<(), ChannelError> {
        let (hello, _) = received.expect_fds(0)?;
        hello.check(ChannelKind::RunnerDevice)?;
        self.greeting = false;
        if let Some(runner) = &self.runner {
            runner.send(
                &FromDevice::InfoWithTable {
                    info: self.info.clone(),
                    table: config::table(self.kind),
                },
                &[],
            )?;
        }
        tracing::info!(
            device = config::name(self.kind),
            "virtio-input device ready"
        );
        Ok(())
    }

    pub fn kind(&self) -> InputKind {
        self.kind
    }

    pub fn stats(&self) -> InputStats {
        self.stats
    }

    /// Events waiting for driver buffers.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// What to poll: the runner channel and, while active, both kicks.
    pub fn poll_fds(&self) -> Vec<(Token, BorrowedFd<'_>)> {
        let mut fds = Vec::with_capacity(3);
        if let Some(r) = &self.runner {
            fds.push((Token::Runner, r.as_fd()));
        }
        if let Some(a) = &self.active {
            fds.push((Token::EventKick, a.event_kick.as_fd()));
            fds.push((Token::StatusKick, a.status_kick.as_fd()));
        }
        fds
    }

    /// Handles one ready descriptor.
    pub fn ready(&mut self, token: Token) {
        match token {
            Token::Runner => self.runner_message(),
            Token::EventKick => {
                if let Some(a) = self.active.as_mut() {
                    drain(&mut a.event_kick);
                }
                self.guard(Self::flush);
            }
            Token::StatusKick => {
                if let Some(a) = self.active.as_mut() {
                    drain(&mut a.status_kick);
                }
                self.guard(Self::status);
            }
        }
    }

    /// A VNC event for this device: its report goes to the guest now, or waits for buffers.
    pub fn deliver(&mut self, event: InputEvent) {
        // Checked first: what no driver saw must not count as down or as the position.
        if self.active.is_none() {
            self.stats.inactive = self.stats.inactive.saturating_add(1);
            return;
        }
        let events = report(event, &mut self.state);
        self.queue(events);
    }

    /// Adds one whole report to the backlog and delivers what the driver has buffers for.
    fn queue(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        while self.backlog.len().saturating_add(events.len()) > BACKLOG_EVENTS
            && !self.backlog.is_empty()
        {
            self.drop_oldest_report();
        }
        self.backlog.extend(events);
        self.guard(Self::flush);
    }

    /// Drops the backlog's oldest report, up to and including its `SYN_REPORT`.
    fn drop_oldest_report(&mut self) {
        while let Some(e) = self.backlog.pop_front() {
            self.stats.dropped = self.stats.dropped.saturating_add(1);
            if e == Event::SYN {
                break;
            }
        }
    }

    fn runner_message(&mut self) {
        if self.greeting {
            let Some(runner) = &self.runner else { return };
            let result = match runner.recv::<Hello>() {
                Ok(received) => self.greeted(received),
                Err(ChannelError::WouldBlock | ChannelError::Timeout) => return,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::error!(
                    device = config::name(self.kind),
                    error = %e,
                    "the runner's late device handshake failed; this device is off"
                );
                self.runner = None;
                return;
            }
        }
        loop {
            let Some(runner) = &self.runner else { return };
            let received = match runner.recv::<ToDevice>() {
                Ok(r) => r,
                Err(ChannelError::WouldBlock | ChannelError::Timeout) => return,
                Err(ChannelError::Closed | ChannelError::Recv(_) | ChannelError::Send(_)) => {
                    self.runner_gone();
                    return;
                }
                Err(e) => {
                    tracing::warn!(device = config::name(self.kind), error = %e, "dropping a malformed runner message");
                    continue;
                }
            };
            self.handle(received.msg, received.fds);
        }
    }

    fn runner_gone(&mut self) {
        tracing::info!(
            device = config::name(self.kind),
            delivered = self.stats.delivered,
            dropped = self.stats.dropped,
            inactive = self.stats.inactive,
            bad_buffers = self.stats.bad_buffers,
            status = self.stats.status,
            "the runner closed the input device channel"
        );
        self.active = None;
        self.backlog.clear();
        self.runner = None;
    }

    fn send(&mut self, msg: &FromDevice) {
        let Some(runner) = &self.runner else { return };
        match runner.send(msg, &[]) {
            Ok(()) => {}
            Err(ChannelError::WouldBlock) => {
                tracing::warn!(
                    device = config::name(self.kind),
                    "the runner is not reading; a reply is lost"
                );
            }
            Err(_) => self.runner_gone(),
        }
    }

    fn handle(&mut self, msg: ToDevice, fds: Vec<OwnedFd>) {
        let name = config::name(self.kind);
        if let Err(e) = msg.validate(&self.info) {
            tracing::warn!(device = name, error = %e, "refusing a runner message");
            self.send(&FromDevice::needs_reset(&e.to_string()));
            return;
        }
        match msg {
            ToDevice::Activate { features, queues } => {
                self.deactivate();
                match self.activate(features, &queues, fds) {
                    Ok(()) => {
                        tracing::info!(device = name, "activated");
                        self.send(&FromDevice::Activated);
                        // The driver fills both queues before DRIVER_OK (or a restarted
                        // dev-fb finds them filled): LED state may be waiting.
                        self.guard(Self::status);
                    }
                    Err(reason) => {
                        tracing::warn!(device = name, %reason, "activation refused");
                        self.send(&FromDevice::needs_reset(&reason));
                    }
                }
            }
            ToDevice::Reset => {
                self.deactivate();
                tracing::info!(device = name, "reset");
                self.send(&FromDevice::ResetDone);
            }
            ToDevice::ConfigWrite { offset, .. } => {
                // The runner answers the selector space itself; nothing else is writable.
                tracing::debug!(device = name, offset, "ignoring a configuration write");
            }
            // virtio-net's; `validate` refuses it for any other device.
            ToDevice::ResumeQueuePairs { .. } => {}
        }
    }

    /// Starts serving an `Activate`; an error is the `NeedsReset` reason.
    fn activate(
        &mut self,
        features: u64,
        configs: &[QueueConfig],
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        if features != FEATURES {
            return Err(format!("features {features:#x} are not {FEATURES:#x}"));
        }
        if configs.len() != 2 || fds.len() != 4 {
            return Err(format!(
                "{} queues with {} eventfds; the device needs its event and status queues",
                configs.len(),
                fds.len()
            ));
        }
        let mut eventq = None;
        let mut statusq = None;
        let mut fds = fds.into_iter();
        for c in configs {
            let queue = child::guest_ram::build_queue(c, MAX_QUEUE_SIZE, false, &self.mem)?;
            let (Some(kick), Some(call)) = (fds.next(), fds.next()) else {
                return Err("missing eventfds".into());
            };
            let slot = (queue, File::from(kick), File::from(call));
            match c.index {
                EVENT_QUEUE => eventq = Some(slot),
                STATUS_QUEUE => statusq = Some(slot),
                _ => return Err(format!("queue {} does not exist", c.index)),
            }
        }
        let (Some((eventq, event_kick, event_call)), Some((statusq, status_kick, status_call))) =
            (eventq, statusq)
        else {
            return Err("the event or status queue is missing".into());
        };
        // A used index past 0 means a driver has taken events from this ring before: this
        // process is a restart under a running guest (the runner repeats the `Activate`), and
        // keys or buttons a client held when the old process ended may still be down there.
        let resumed = eventq.next_used() != 0;
        self.active = Some(Active {
            eventq,
            statusq,
            event_kick,
            event_call,
            status_kick,
            status_call,
        });
        if resumed {
            tracing::info!(
                device = config::name(self.kind),
                "resuming a running driver; releasing every key and button"
            );
            self.queue(release_all(config::releasable(self.kind)));
        }
        Ok(())
    }

    /// Stops using the queues; reports not delivered belong to the old driver.
    fn deactivate(&mut self) {
        self.active = None;
        let lost = self.backlog.len() as u64;
        self.stats.inactive = self.stats.inactive.saturating_add(lost);
        self.backlog.clear();
        self.state = ReportState::default();
    }

    /// Runs `work`; a broken ring asks the runner for a reset and stops the queues.
    fn guard(&mut self, work: fn(&mut Self) -> Result<(), RingError>) {
        if self.active.is_none() {
            return;
        }
        if let Err(e) = work(self) {
            let reason = crate::error_chain(&e);
            tracing::warn!(device = config::name(self.kind), %reason, "ring broken; the device needs a reset");
            self.deactivate();
            self.send(&FromDevice::needs_reset(&reason));
        }
    }

    /// Moves backlog events into the driver's event buffers, one event per buffer (§5.8.6.2).
    fn flush(&mut self) -> Result<(), RingError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used_any = false;
        while let Some(&event) = self.backlog.front() {
            // `iter` fails when the available index moved more than the queue size (§2.7.6).
            let Some(mut chain) = a.eventq.iter(&self.mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let first = chain.next().ok_or(RingError::Empty(head))?;
            // §5.8.6.1: event buffers are device-writable and hold one virtio_input_event.
            let fits = first.is_write_only()
                && usize::try_from(first.len()).is_ok_and(|l| l >= EVENT_BYTES)
                && self
                    .mem
                    .write_slice(&event.to_bytes(), first.addr())
                    .is_ok();
            let written = if fits {
                self.backlog.pop_front();
                self.stats.delivered = self.stats.delivered.saturating_add(1);
                EVENT_LEN
            } else {
                self.stats.bad_buffers = self.stats.bad_buffers.saturating_add(1);
                0
            };
            a.eventq.add_used(&self.mem, head, written)?;
            used_any = true;
        }
        if used_any && a.eventq.needs_notification(&self.mem)? {
            let _ = a.event_call.write(&1u64.to_ne_bytes());
        }
        Ok(())
    }

    /// Takes the driver's status events (LEDs) and returns their buffers (§5.8.6.2).
    fn status(&mut self) -> Result<(), RingError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used_any = false;
        for _ in 0..STATUS_BUDGET {
            let Some(mut chain) = a.statusq.iter(&self.mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let first = chain.next().ok_or(RingError::Empty(head))?;
            let mut bytes = [0u8; EVENT_BYTES];
            if !first.is_write_only()
                && usize::try_from(first.len()).is_ok_and(|l| l >= EVENT_BYTES)
                && self.mem.read_slice(&mut bytes, first.addr()).is_ok()
            {
                self.stats.status = self.stats.status.saturating_add(1);
                let e = Event::from_bytes(bytes);
                tracing::trace!(
                    device = config::name(self.kind),
                    kind = e.kind,
                    code = e.code,
                    value = e.value,
                    "status event"
                );
            }
            // The device writes nothing into a status buffer.
            a.statusq.add_used(&self.mem, head, 0)?;
            used_any = true;
        }
        if used_any && a.statusq.needs_notification(&self.mem)? {
            let _ = a.status_call.write(&1u64.to_ne_bytes());
        }
        Ok(())
    }
}

use child::drain_eventfd as drain;

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::keymap::code::KEY_A;

    /// A keyboard whose runner end is `peer`, over 64 KiB of zeroed guest RAM.
    fn keyboard() -> (VirtioInput, Channel) {
        let (ours, peer) = Channel::pair().unwrap();
        let t = std::thread::spawn(move || {
            peer.handshake(ChannelKind::RunnerDevice).unwrap();
            let info = peer.recv::<FromDevice>().unwrap().msg;
            assert!(matches!(info, FromDevice::InfoWithTable { .. }), "{info:?}");
            peer
        });
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let dev =
            VirtioInput::start(InputKind::Keyboard, ours, mem, Duration::from_secs(5)).unwrap();
        (dev, t.join().unwrap())
    }

    fn pipe_fds() -> Vec<OwnedFd> {
        let (a, b) = nix::unistd::pipe().unwrap();
        let (c, d) = nix::unistd::pipe().unwrap();
        vec![a, b, c, d]
    }

    fn activate(dev: &mut VirtioInput) {
        let q = |index, at: u64| QueueConfig {
            index,
            size: 64,
            desc: at,
            avail: at + 0x400,
            used: at + 0x800,
        };
        let msg = ToDevice::Activate {
            features: FEATURES,
            queues: vec![q(0, 0x1000), q(1, 0x2000)],
        };
        dev.handle(msg, pipe_fds());
        assert!(dev.active.is_some());
    }

    fn key(down: bool) -> InputEvent {
        InputEvent::Key { code: KEY_A, down }
    }

    #[test]
    fn a_runner_that_answers_late_is_introduced_to_the_device_when_it_does() {
        let (ours, peer) = Channel::pair().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let started = std::time::Instant::now();
        let mut dev =
            VirtioInput::start(InputKind::Keyboard, ours, mem, Duration::from_millis(200)).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the wait is bounded"
        );
        assert!(dev.greeting);
        dev.ready(Token::Runner);
        assert!(dev.greeting, "nothing from the runner yet");
        // The runner gets to the device: its hello, then the device's Info.
        peer.handshake(ChannelKind::RunnerDevice).unwrap();
        dev.ready(Token::Runner);
        assert!(!dev.greeting);
        let info = peer.recv::<FromDevice>().unwrap().msg;
        assert!(matches!(info, FromDevice::InfoWithTable { .. }), "{info:?}");
    }

    #[test]
    fn events_before_activation_are_counted_and_dropped() {
        let (mut dev, _peer) = keyboard();
        dev.deliver(key(true));
        assert_eq!(dev.backlog(), 0);
        assert_eq!(dev.stats().inactive, 1);
        activate(&mut dev);
        dev.deliver(key(true));
        assert_eq!(
            dev.backlog.front().map(|e| e.value),
            Some(1),
            "a press no driver saw does not make the next one a repeat"
        );
    }

    #[test]
    fn a_held_key_pressed_again_is_an_autorepeat_for_the_guest() {
        let (mut dev, _peer) = keyboard();
        activate(&mut dev);
        dev.deliver(key(true));
        dev.deliver(key(true));
        dev.deliver(key(false));
        let values: Vec<u32> = dev
            .backlog
            .iter()
            .filter(|e| **e != Event::SYN)
            .map(|e| e.value)
            .collect();
        assert_eq!(values, [1, 2, 0]);
    }

    #[test]
    fn activating_on_a_ring_a_driver_already_used_releases_every_key_once() {
        let (mut dev, _peer) = keyboard();
        // The used ring's index (at used + 2) says the driver has taken 7 events (and gave as
        // many buffers, avail + 2), with no buffer now outstanding: a restarted
        // dev-fb under a running guest.
        dev.mem.write_obj(7u16, GuestAddress(0x1800 + 2)).unwrap();
        dev.mem.write_obj(7u16, GuestAddress(0x1400 + 2)).unwrap();
        activate(&mut dev);
        let keys = config::releasable(InputKind::Keyboard).count();
        assert!(keys > 100, "{keys} keys");
        assert_eq!(dev.backlog(), keys + 1);
        assert!(dev.backlog.iter().take(keys).all(|e| e.value == 0));
        assert_eq!(dev.backlog.back(), Some(&Event::SYN));
    }

    #[test]
    fn activating_a_fresh_ring_sends_nothing() {
        let (mut dev, _peer) = keyboard();
        activate(&mut dev);
        assert_eq!(dev.backlog(), 0);
    }

    #[test]
    fn without_buffers_the_backlog_keeps_the_newest_whole_reports_up_to_its_bound() {
        let (mut dev, peer) = keyboard();
        activate(&mut dev);
        assert_eq!(
            peer.recv::<FromDevice>().unwrap().msg,
            FromDevice::Activated
        );
        for n in 0..2000 {
            dev.deliver(key(n % 2 == 0));
        }
        assert_eq!(dev.backlog(), BACKLOG_EVENTS);
        assert_eq!(dev.stats().dropped, 4000 - BACKLOG_EVENTS as u64);
        assert_eq!(
            dev.backlog.front().map(|e| e.kind),
            Some(super::super::config::EV_KEY)
        );
        assert_eq!(dev.backlog.back(), Some(&Event::SYN));
    }

    #[test]
    fn an_activation_with_other_features_or_queues_is_refused_with_needs_reset() {
        let (mut dev, peer) = keyboard();
        let msg = ToDevice::Activate {
            features: FEATURES | 1,
            queues: vec![QueueConfig {
                index: 0,
                size: 64,
                desc: 0x1000,
                avail: 0x1400,
                used: 0x1800,
            }],
        };
        dev.handle(msg, pipe_fds().into_iter().take(2).collect());
        assert!(dev.active.is_none());
        let reply = peer.recv::<FromDevice>().unwrap().msg;
        assert!(matches!(reply, FromDevice::NeedsReset { .. }), "{reply:?}");
    }

    #[test]
    fn a_reset_drops_the_backlog_and_answers_reset_done() {
        let (mut dev, peer) = keyboard();
        activate(&mut dev);
        let _ = peer.recv::<FromDevice>().unwrap();
        dev.deliver(key(true));
        assert_eq!(dev.backlog(), 2);
        dev.handle(ToDevice::Reset, Vec::new());
        assert_eq!(dev.backlog(), 0);
        assert!(dev.active.is_none());
        assert_eq!(
            peer.recv::<FromDevice>().unwrap().msg,
            FromDevice::ResetDone
        );
    }
}
