//! The device: one thread, one epoll set over the runner channel, the bootstrap channel, the
//! two queues' kick eventfds and the tap.
//!
//! ```text
//!  tap ──readable──▶ rx_work: read one frame → RxQueue::deliver → call eventfd
//!  guest ──tx kick──▶ tx_work: TxQueue::next_frame → writev to the tap → call eventfd
//!  guest ──rx kick──▶ buffers are back: re-arm the tap, deliver the waiting frame
//! ```
//!
//! The tap is only polled while the receive ring has buffers: when it runs dry the device
//! asks the driver for a kick (`enable_notification`, §2.7.10) and takes the tap out of the
//! poll set until the kick arrives, so it neither reads frames it cannot place nor spins. A
//! tap that goes away turns the link down (`ConfigChanged`); the process serves on.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError, ChannelKind};
use proto::device::{DeviceInfo, FromDevice, NetSetup, QueueConfig, ToDevice};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::config::{self, DEVICE_TYPE_NET, MAX_QUEUE_SIZE, Negotiated, bit};
use crate::header::{HEADER_LEN, MAX_GSO_FRAME};
use crate::ring::{RingError, build_queue};
use crate::rx::{RxOutcome, RxQueue, RxStats};
use crate::tap::{Tap, TapError, TapIo};
use crate::tx::{TxQueue, TxStats};

/// Frames moved per queue before the other side gets a turn.
const BUDGET: usize = 256;
/// How often the counters are logged at debug level, in milliseconds.
const STATS_INTERVAL_MS: u16 = 10_000;
/// Bytes of the receive bounce buffer: the largest frame a tap hands over, with its header.
const RX_BUFFER: usize = HEADER_LEN + MAX_GSO_FRAME as usize + 1024;

const TOKEN_RUNNER: u64 = 0;
const TOKEN_BOOTSTRAP: u64 = 1;
const TOKEN_RX_KICK: u64 = 2;
const TOKEN_TX_KICK: u64 = 3;
const TOKEN_TAP: u64 = 4;

/// Why the device could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the supervisor did not pass a {0:?} descriptor")]
    MissingFd(FdRole),
    #[error("invalid net setup")]
    Setup(#[from] proto::device::DeviceMessageError),
    #[error("mapping guest memory failed")]
    Memory(#[from] child::guest_ram::GuestRamError),
    #[error("the tap cannot be used")]
    Tap(#[from] TapError),
    #[error("the runner channel failed")]
    Channel(#[from] ChannelError),
    #[error("the event loop failed")]
    Epoll(#[source] nix::errno::Errno),
}

/// The descriptors the device process holds.
#[derive(Debug)]
pub struct DeviceFds {
    pub memory: OwnedFd,
    pub tap: OwnedFd,
    pub runner: Channel,
}

/// The queues of an activated device.
#[derive(Debug)]
struct Active {
    rx: RxQueue,
    tx: TxQueue,
    rx_kick: File,
    rx_call: File,
    tx_kick: File,
    tx_call: File,
    neg: Negotiated,
    /// The tap is in the poll set for input.
    tap_armed: bool,
    /// A budget ran out: run again without waiting.
    rx_more: bool,
    tx_more: bool,
}

/// Counters that outlive one activation.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    rx: RxStats,
    tx: TxStats,
    /// Frames read from the tap that were dropped: reset, link or header trouble.
    rx_lost: u64,
}

/// A configured device, serving its runner channel.
pub struct Device {
    info: DeviceInfo,
    mac: [u8; 6],
    mtu: u16,
    mem: GuestMemoryMmap,
    tap: Tap,
    runner: Channel,
    link_up: bool,
    active: Option<Active>,
    totals: Totals,
    /// The frame read from the tap and not delivered yet: `rx_buf[..pending]`.
    rx_buf: Vec<u8>,
    pending: usize,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .field("link_up", &self.link_up)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Maps memory and sets up the tap described by `setup`.
    pub fn new(setup: &NetSetup, fds: DeviceFds) -> Result<Device, DeviceError> {
        setup.validate()?;
        let mem = child::guest_ram::map_guest_ram(&fds.memory, &setup.memory)?;
        let tap = Tap::new(fds.tap)?;
        let info = DeviceInfo {
            device_type: DEVICE_TYPE_NET,
            features: config::features(),
            queues: 2,
            max_queue_size: MAX_QUEUE_SIZE,
            config: config::config_space(setup.mac, true, setup.mtu),
        };
        Ok(Device {
            info,
            mac: setup.mac,
            mtu: setup.mtu,
            mem,
            tap,
            runner: fds.runner,
            link_up: true,
            active: None,
            totals: Totals::default(),
            rx_buf: vec![0; RX_BUFFER],
            pending: 0,
        })
    }

    /// Handshakes with the runner, sends `Info`, then serves until the runner or the
    /// supervisor (`bootstrap`) hangs up.
    pub fn serve(mut self, bootstrap: &Channel) -> Result<(), DeviceError> {
        self.runner.handshake(ChannelKind::RunnerDevice)?;
        self.runner
            .send(&FromDevice::Info(self.info.clone()), &[])?;
        tracing::info!(
            mac = %format_mac(self.mac),
            mtu = self.mtu,
            "virtio-net device ready"
        );
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(DeviceError::Epoll)?;
        let input = |t| EpollEvent::new(EpollFlags::EPOLLIN, t);
        epoll
            .add(&self.runner, input(TOKEN_RUNNER))
            .map_err(DeviceError::Epoll)?;
        epoll
            .add(bootstrap, input(TOKEN_BOOTSTRAP))
            .map_err(DeviceError::Epoll)?;
        // The tap stays in the set (for its error events) but is armed for input only while
        // the receive ring has buffers.
        epoll
            .add(&self.tap, EpollEvent::new(EpollFlags::empty(), TOKEN_TAP))
            .map_err(DeviceError::Epoll)?;
        let mut events = [EpollEvent::empty(); 8];
        let mut last_logged = (0u64, 0u64);
        let mut last_log_at = std::time::Instant::now();
        loop {
            let busy = self.active.as_ref().is_some_and(|a| a.rx_more || a.tx_more);
            let timeout = if busy {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::from(STATS_INTERVAL_MS)
            };
            let n = match epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(DeviceError::Epoll(e)),
            };
            let (ready, tap_error) = ready_tokens(events.iter().take(n));
            if ready[1] && supervisor_hung_up(bootstrap) {
                tracing::info!("supervisor closed the channel; exiting");
                self.log_totals(true);
                return Ok(());
            }
            if ready[0] {
                match self.runner.recv::<ToDevice>() {
                    Ok(received) => self.handle(&epoll, received.msg, received.fds)?,
                    Err(ChannelError::Closed) => {
                        tracing::info!("runner closed the device channel; exiting");
                        self.log_totals(true);
                        return Ok(());
                    }
                    Err(e @ (ChannelError::Send(_) | ChannelError::Recv(_))) => {
                        return Err(e.into());
                    }
                    Err(e) => tracing::warn!(error = %e, "dropping a malformed runner message"),
                }
            }
            if tap_error
                && self.link_up
                && self.pending == 0
                && let Err(Failure::Device(e)) = self.read_tap(&epoll)
            {
                // A deleted tap reports an error; the read says why (and turns the link down).
                return Err(e);
            }
            let kicked_rx = ready[2];
            let kicked_tx = ready[3];
            if let Some(a) = self.active.as_mut() {
                if kicked_rx {
                    drain(&mut a.rx_kick);
                }
                if kicked_tx {
                    drain(&mut a.tx_kick);
                }
            }
            if self.active.is_some() {
                let rx_more = self.active.as_ref().is_some_and(|a| a.rx_more);
                if kicked_rx || ready[4] || rx_more {
                    self.guard(&epoll, Self::rx_work)?;
                }
                let tx_more = self.active.as_ref().is_some_and(|a| a.tx_more);
                if kicked_tx || tx_more {
                    self.guard(&epoll, Self::tx_work)?;
                }
            }
            if last_log_at.elapsed().as_millis() >= u128::from(STATS_INTERVAL_MS) {
                last_log_at = std::time::Instant::now();
                let t = self.totals_now();
                let now = (t.rx.frames, t.tx.frames);
                if now != last_logged {
                    last_logged = now;
                    self.log_totals(false);
                }
            }
        }
    }

    /// Runs `work`; a broken ring asks the runner for a reset and stops the queues.
    fn guard(
        &mut self,
        epoll: &Epoll,
        work: fn(&mut Self, &Epoll) -> Result<(), Failure>,
    ) -> Result<(), DeviceError> {
        match work(self, epoll) {
            Ok(()) => Ok(()),
            Err(Failure::Device(e)) => Err(e),
            Err(Failure::Ring(e)) => {
                let reason = crate::error_chain(&e);
                tracing::warn!(%reason, "ring broken; the device needs a reset");
                self.deactivate(epoll);
                self.runner.send(&FromDevice::needs_reset(&reason), &[])?;
                Ok(())
            }
        }
    }

    fn handle(
        &mut self,
        epoll: &Epoll,
        msg: ToDevice,
        fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError> {
        if let Err(e) = msg.validate(&self.info) {
            tracing::warn!(error = %e, "refusing a runner message");
            return Ok(self
                .runner
                .send(&FromDevice::needs_reset(&e.to_string()), &[])?);
        }
        match msg {
            ToDevice::Activate { features, queues } => {
                self.deactivate(epoll);
                let reply = match self.activate(epoll, features, &queues, fds) {
                    Ok(()) => {
                        tracing::info!(features = format_args!("{features:#x}"), "activated");
                        FromDevice::Activated
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "activation refused");
                        self.deactivate(epoll);
                        FromDevice::needs_reset(&reason)
                    }
                };
                self.runner.send(&reply, &[])?;
                if self.active.is_some() {
                    // The driver may have queued frames and buffers before activating (or
                    // before a restarted device process came up).
                    self.guard(epoll, Self::tx_work)?;
                    self.guard(epoll, Self::rx_work)?;
                }
            }
            ToDevice::Reset => {
                self.deactivate(epoll);
                tracing::info!("reset");
                self.runner.send(&FromDevice::ResetDone, &[])?;
            }
            ToDevice::ConfigWrite { offset, .. } => {
                // §5.1.4: with VERSION_1 no field of the configuration space is writable.
                tracing::debug!(offset, "ignoring a configuration write");
            }
        }
        Ok(())
    }

    /// Starts serving an `Activate`; an error is the `NeedsReset` reason.
    fn activate(
        &mut self,
        epoll: &Epoll,
        features: u64,
        configs: &[QueueConfig],
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        if features & !self.info.features != 0 {
            return Err(format!(
                "features {features:#x} exceed the offer {:#x}",
                self.info.features
            ));
        }
        if features & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err("VIRTIO_F_VERSION_1 not negotiated".into());
        }
        if configs.len() != 2 || fds.len() != 4 {
            return Err(format!(
                "{} queues with {} eventfds; the device needs receive and transmit",
                configs.len(),
                fds.len()
            ));
        }
        let neg = Negotiated::from_features(features);
        let mut rx = None;
        let mut tx = None;
        let mut fds = fds.into_iter();
        for c in configs {
            let queue = build_queue(c, neg.event_idx, &self.mem)?;
            let (Some(kick), Some(call)) = (fds.next(), fds.next()) else {
                return Err("missing eventfds".into());
            };
            let slot = (queue, File::from(kick), File::from(call));
            // §5.1.2: queue 0 receives, queue 1 transmits.
            if c.index == 0 {
                rx = Some(slot);
            } else {
                tx = Some(slot);
            }
        }
        let (Some((rxq, rx_kick, rx_call)), Some((txq, tx_kick, tx_call))) = (rx, tx) else {
            return Err("receive or transmit queue missing".into());
        };
        // A tap that is gone takes no settings: the link is (or goes) down, the queues serve.
        if self.link_up {
            match self.tap.set_offloads(neg.tap_offloads) {
                Ok(()) => {}
                Err(TapError::Offload(e @ nix::errno::Errno::EBADFD)) => {
                    self.link_down(epoll, e)
                        .map_err(|e| crate::error_chain(&e))?;
                }
                Err(e) => return Err(crate::error_chain(&e)),
            }
        }
        let input = |t| EpollEvent::new(EpollFlags::EPOLLIN, t);
        epoll
            .add(&rx_kick, input(TOKEN_RX_KICK))
            .map_err(|e| format!("polling the receive kick: {e}"))?;
        epoll
            .add(&tx_kick, input(TOKEN_TX_KICK))
            .map_err(|e| format!("polling the transmit kick: {e}"))?;
        self.active = Some(Active {
            rx: RxQueue::new(rxq),
            tx: TxQueue::new(txq),
            rx_kick,
            rx_call,
            tx_kick,
            tx_call,
            neg,
            tap_armed: false,
            rx_more: false,
            tx_more: false,
        });
        Ok(())
    }

    /// Stops using the queues: their eventfds close (leaving the poll set), the counters are
    /// kept, a frame waiting for buffers is dropped.
    fn deactivate(&mut self, epoll: &Epoll) {
        if let Some(a) = self.active.take() {
            self.totals.rx = add_rx(self.totals.rx, a.rx.stats);
            self.totals.tx = add_tx(self.totals.tx, a.tx.stats);
            if a.tap_armed && self.link_up {
                let _ = epoll.modify(
                    &self.tap,
                    &mut EpollEvent::new(EpollFlags::empty(), TOKEN_TAP),
                );
            }
        }
        if self.pending > 0 {
            self.pending = 0;
            self.totals.rx_lost = self.totals.rx_lost.saturating_add(1);
        }
    }

    /// Moves frames from the tap into the receive ring until the tap is empty, the ring has
    /// no room or the budget is spent.
    fn rx_work(&mut self, epoll: &Epoll) -> Result<(), Failure> {
        let mut starved = false;
        let mut budget_left = true;
        for round in 0..=BUDGET {
            if round == BUDGET {
                budget_left = false;
                break;
            }
            let Some(a) = self.active.as_mut() else {
                return Ok(());
            };
            if self.pending == 0 {
                if !self.link_up {
                    break;
                }
                if !a.rx.has_buffers(&self.mem)? {
                    // §2.7.10: ask for a kick; buffers that came meanwhile are seen here.
                    if a.rx.queue.enable_notification(&self.mem)? {
                        continue;
                    }
                    starved = true;
                    break;
                }
                if !self.read_tap(epoll)? {
                    break;
                }
                continue;
            }
            let Some(a) = self.active.as_mut() else {
                return Ok(());
            };
            let packet = self.rx_buf.get(..self.pending).unwrap_or_default();
            match a.rx.deliver(&self.mem, packet, &a.neg)? {
                RxOutcome::Delivered { .. } | RxOutcome::Dropped => self.pending = 0,
                RxOutcome::NoBuffers => {
                    if a.rx.queue.enable_notification(&self.mem)? {
                        continue;
                    }
                    starved = true;
                    break;
                }
            }
        }
        let link_up = self.link_up;
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        a.rx_more = !budget_left && link_up;
        if !starved {
            // Buffers are at hand: kicks are not needed until the ring runs dry again.
            a.rx.queue.disable_notification(&self.mem)?;
        }
        let want_armed = link_up && !starved;
        if want_armed != a.tap_armed {
            let flags = if want_armed {
                EpollFlags::EPOLLIN
            } else {
                EpollFlags::empty()
            };
            epoll
                .modify(&self.tap, &mut EpollEvent::new(flags, TOKEN_TAP))
                .map_err(|e| Failure::Device(DeviceError::Epoll(e)))?;
            a.tap_armed = want_armed;
        }
        // Chains returned empty need an interrupt as much as delivered frames.
        if a.rx.used.needs_interrupt(&self.mem)? {
            let _ = a.rx_call.write(&1u64.to_ne_bytes());
        }
        Ok(())
    }

    /// Reads one frame into the bounce buffer; false when there is none (or the tap is gone).
    fn read_tap(&mut self, epoll: &Epoll) -> Result<bool, Failure> {
        match self.tap.recv(&mut self.rx_buf) {
            Ok(n) if n >= HEADER_LEN => {
                self.pending = n;
                Ok(true)
            }
            Ok(_) => {
                self.totals.rx_lost = self.totals.rx_lost.saturating_add(1);
                Ok(true)
            }
            Err(TapIo::WouldBlock) => Ok(false),
            Err(TapIo::Failed(e)) => {
                tracing::debug!(error = %e, "reading the tap failed");
                self.totals.rx_lost = self.totals.rx_lost.saturating_add(1);
                Ok(false)
            }
            Err(TapIo::Gone(e)) => {
                self.link_down(epoll, e).map_err(Failure::Device)?;
                Ok(false)
            }
        }
    }

    /// Sends the transmit ring's frames to the tap.
    fn tx_work(&mut self, epoll: &Epoll) -> Result<(), Failure> {
        let mut more = false;
        let mut gone = None;
        {
            let Some(a) = self.active.as_mut() else {
                return Ok(());
            };
            'outer: loop {
                a.tx.queue.disable_notification(&self.mem)?;
                for _ in 0..BUDGET {
                    let Some((head, frame)) = a.tx.next_frame(&self.mem, self.mtu, a.neg.tx)?
                    else {
                        // §2.7.10: re-enabling reports chains that came meanwhile.
                        if a.tx.queue.enable_notification(&self.mem)? {
                            continue 'outer;
                        }
                        break 'outer;
                    };
                    match frame {
                        Err(why) => {
                            tracing::trace!(head, %why, "dropping a transmitted frame");
                            a.tx.stats.count_drop(&why);
                        }
                        Ok(_) if !self.link_up || gone.is_some() => {
                            a.tx.stats.no_link = a.tx.stats.no_link.saturating_add(1);
                        }
                        Ok(f) => match self.tap.send(&f.header, &self.mem, &f.segments) {
                            Ok(()) => {
                                a.tx.stats.frames = a.tx.stats.frames.saturating_add(1);
                                a.tx.stats.bytes =
                                    a.tx.stats.bytes.saturating_add(u64::from(f.len));
                            }
                            Err(TapIo::Gone(e)) => gone = Some(e),
                            Err(TapIo::Failed(_) | TapIo::WouldBlock) => {
                                a.tx.stats.tap_errors = a.tx.stats.tap_errors.saturating_add(1);
                            }
                        },
                    }
                    // §5.1.6.2: the device writes nothing into a transmit buffer.
                    a.tx.used.push(&self.mem, head, 0)?;
                }
                more = true;
                break;
            }
            a.tx.used.publish(&self.mem)?;
            a.tx_more = more;
            if a.tx.used.needs_interrupt(&self.mem)? {
                let _ = a.tx_call.write(&1u64.to_ne_bytes());
            }
        }
        if let Some(e) = gone {
            self.link_down(epoll, e).map_err(Failure::Device)?;
        }
        Ok(())
    }

    /// The tap went away: stop polling it, tell the driver the link is down.
    fn link_down(&mut self, epoll: &Epoll, why: nix::errno::Errno) -> Result<(), DeviceError> {
        if !self.link_up {
            return Ok(());
        }
        self.link_up = false;
        if self.pending > 0 {
            self.pending = 0;
            self.totals.rx_lost = self.totals.rx_lost.saturating_add(1);
        }
        let _ = epoll.delete(&self.tap);
        if let Some(a) = self.active.as_mut() {
            a.tap_armed = false;
            a.rx_more = false;
        }
        tracing::warn!(error = %why, "the tap went away; link down");
        let config = config::config_space(self.mac, false, self.mtu);
        self.info.config.clone_from(&config);
        self.runner
            .send(&FromDevice::ConfigChanged { config }, &[])?;
        Ok(())
    }

    fn totals_now(&self) -> Totals {
        let mut t = self.totals;
        if let Some(a) = &self.active {
            t.rx = add_rx(t.rx, a.rx.stats);
            t.tx = add_tx(t.tx, a.tx.stats);
        }
        t
    }

    /// Logs the counters: at exit (info), or on the timer (debug).
    fn log_totals(&self, exiting: bool) {
        let t = self.totals_now();
        macro_rules! totals {
            ($level:ident, $msg:literal) => {
                tracing::$level!(
                    rx_frames = t.rx.frames,
                    rx_bytes = t.rx.bytes,
                    rx_too_big = t.rx.too_big,
                    rx_bad_chains = t.rx.bad_chains,
                    rx_lost = t.rx_lost,
                    tx_frames = t.tx.frames,
                    tx_bytes = t.tx.bytes,
                    tx_bad_chains = t.tx.bad_chains,
                    tx_bad_headers = t.tx.bad_headers,
                    tx_no_link = t.tx.no_link,
                    tx_tap_errors = t.tx.tap_errors,
                    link_up = self.link_up,
                    $msg
                )
            };
        }
        if exiting {
            totals!(info, "counters at exit");
        } else {
            totals!(debug, "counters");
        }
    }
}

/// Which tokens an epoll wait reported, and whether the tap reported an error.
fn ready_tokens<'a>(events: impl Iterator<Item = &'a EpollEvent>) -> ([bool; 5], bool) {
    let mut ready = [false; 5];
    let mut tap_error = false;
    for ev in events {
        if let Some(r) = usize::try_from(ev.data())
            .ok()
            .and_then(|i| ready.get_mut(i))
        {
            *r = true;
        }
        if ev.data() == TOKEN_TAP
            && ev
                .events()
                .intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP)
        {
            tap_error = true;
        }
    }
    (ready, tap_error)
}

/// Why a data-path step stopped.
#[derive(Debug)]
enum Failure {
    Ring(RingError),
    Device(DeviceError),
}

impl From<RingError> for Failure {
    fn from(e: RingError) -> Self {
        Failure::Ring(e)
    }
}

impl From<virtio_queue::Error> for Failure {
    fn from(e: virtio_queue::Error) -> Self {
        Failure::Ring(RingError::Avail(e))
    }
}

fn add_rx(a: RxStats, b: RxStats) -> RxStats {
    RxStats {
        frames: a.frames.saturating_add(b.frames),
        bytes: a.bytes.saturating_add(b.bytes),
        too_big: a.too_big.saturating_add(b.too_big),
        bad_chains: a.bad_chains.saturating_add(b.bad_chains),
    }
}

fn add_tx(a: TxStats, b: TxStats) -> TxStats {
    TxStats {
        frames: a.frames.saturating_add(b.frames),
        bytes: a.bytes.saturating_add(b.bytes),
        bad_chains: a.bad_chains.saturating_add(b.bad_chains),
        bad_headers: a.bad_headers.saturating_add(b.bad_headers),
        no_link: a.no_link.saturating_add(b.no_link),
        tap_errors: a.tap_errors.saturating_add(b.tap_errors),
    }
}

fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

use child::drain_eventfd as drain;

use child::supervisor_hung_up;

#[cfg(test)]
mod tests {
    #[test]
    fn the_seccomp_policy_parses() {
        assert!(sandbox::Policy::parse(crate::SECCOMP_POLICY).is_ok());
    }
}
