//! The device's control side: the main thread polls the runner channel, the bootstrap
//! channel, the control queue's kick and the workers' wake eventfd; each queue pair is served
//! by its own worker thread ([`crate::pair`]).
//!
//! ```text
//!  runner ──Activate──▶ build the rings, start one worker per pair (pair j: rx j, tx j, tap queue j)
//!  guest ──ctrl kick──▶ VQ_PAIRS_SET n: stop the workers, hand the tap queues to pairs 0..n, restart, ack
//!  worker ──wake──▶ a tap went away: ConfigChanged (link down); a ring broke: NeedsReset
//! ```
//!
//! Queue layout (§5.1.2): `rx0, tx0` without `MQ`; `rx0, tx0, …, rxN-1, txN-1, ctrl` with it
//! (N = the pairs offered), or `rx0, tx0, ctrl` with `CTRL_VQ` alone. Only pair 0 receives
//! until the driver enables more with `VQ_PAIRS_SET` (§5.1.6.5.5); every pair transmits.
//!
//! Each count it applies is reported to the runner (`FromDevice::QueuePairs`) before the
//! command's ack is published. A device restarted after a crash gets the last count back
//! from the runner (`ToDevice::ResumeQueuePairs`, right before the re-sent `Activate`) and
//! activates with that many pairs enabled, so the driver, which saw nothing, keeps its
//! receive queues; commands the driver queued meanwhile are applied after it.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError, ChannelKind};
use proto::device::{DeviceInfo, FromDevice, NetSetup, QueueConfig, ToDevice, net_queue_count};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::config::{self, DEVICE_TYPE_NET, MAX_QUEUE_SIZE, Negotiated, bit};
use crate::ctrl;
use crate::pair::{PairQueues, PairState, PairStats, RxTap, Shared, Worker};
use crate::ring::{RingError, UsedRing, build_queue};
use crate::rx::RxQueue;
use crate::tap::{Tap, TapError};
use crate::tx::TxQueue;

const TOKEN_RUNNER: u64 = 0;
const TOKEN_BOOTSTRAP: u64 = 1;
const TOKEN_WAKE: u64 = 2;
const TOKEN_CTRL_KICK: u64 = 3;

/// Why the device could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the supervisor did not pass a {0:?} descriptor")]
    MissingFd(FdRole),
    #[error("invalid net setup")]
    Setup(#[from] proto::device::DeviceMessageError),
    #[error("{pairs} queue pairs need as many tap descriptors, {taps} came")]
    TapCount { pairs: u16, taps: usize },
    #[error("mapping guest memory failed")]
    Memory(#[from] child::guest_ram::GuestRamError),
    #[error("the tap cannot be used")]
    Tap(#[from] TapError),
    #[error("the runner channel failed")]
    Channel(#[from] ChannelError),
    #[error("the event loop failed")]
    Epoll(#[source] nix::errno::Errno),
    #[error("starting a queue pair's thread failed")]
    Thread(#[source] std::io::Error),
    #[error("a queue pair's thread panicked")]
    WorkerPanicked,
}

/// The descriptors the device process holds.
#[derive(Debug)]
pub struct DeviceFds {
    pub memory: OwnedFd,
    /// One per queue of the tap, one queue per pair, in order.
    pub taps: Vec<OwnedFd>,
    pub runner: Channel,
}

/// One queue of an `Activate` with its kick and call eventfds.
type QueueSlot = (Queue, File, File);

/// The control queue of an activated device.
#[derive(Debug)]
struct CtrlQueue {
    queue: Queue,
    used: UsedRing,
    kick: File,
    call: File,
}

/// The queues of an activated device.
#[derive(Debug)]
struct Active {
    neg: Negotiated,
    /// `MQ` negotiated: `VQ_PAIRS_SET` is accepted.
    multiqueue: bool,
    /// Pairs the driver has enabled (`VQ_PAIRS_SET`; 1 at first, or the count the runner
    /// said to resume with).
    enabled: u16,
    /// Each pair's worker, in pair order; empty while they are stopped.
    workers: Vec<Worker>,
    /// The pairs' states while no worker runs them.
    idle: Vec<PairState>,
    ctrl: Option<CtrlQueue>,
}

/// A configured device, serving its runner channel.
pub struct Device {
    info: DeviceInfo,
    mac: [u8; 6],
    mtu: u16,
    /// Queue pairs offered (= tap queues).
    pairs: u16,
    mem: GuestMemoryMmap,
    taps: Vec<Arc<Tap>>,
    /// The tap queues' read side while no worker holds them, in queue order.
    rx_taps: Vec<RxTap>,
    runner: Channel,
    /// The main thread's poll set.
    epoll: Epoll,
    shared: Arc<Shared>,
    /// The link state the driver was last told.
    link_up: bool,
    active: Option<Active>,
    /// The pairs the next `Activate` starts with (`ToDevice::ResumeQueuePairs`), if not 1.
    resume_pairs: Option<u16>,
    totals: PairStats,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .field("pairs", &self.pairs)
            .field("link_up", &self.link_up)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Maps memory and sets up the tap queues described by `setup`.
    pub fn new(setup: &NetSetup, fds: DeviceFds) -> Result<Device, DeviceError> {
        setup.validate()?;
        if fds.taps.len() != usize::from(setup.queue_pairs) {
            return Err(DeviceError::TapCount {
                pairs: setup.queue_pairs,
                taps: fds.taps.len(),
            });
        }
        let mem = child::guest_ram::map_guest_ram(&fds.memory, &setup.memory)?;
        let taps = fds
            .taps
            .into_iter()
            .map(|fd| Tap::new(fd).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let rx_taps = taps
            .iter()
            .enumerate()
            .map(|(i, t)| RxTap::new(i, Arc::clone(t)))
            .collect();
        let pairs = setup.queue_pairs;
        let info = DeviceInfo {
            device_type: DEVICE_TYPE_NET,
            features: config::features(pairs),
            queues: net_queue_count(pairs),
            max_queue_size: MAX_QUEUE_SIZE,
            config: config::config_space(setup.mac, true, setup.mtu, pairs),
        };
        Ok(Device {
            info,
            mac: setup.mac,
            mtu: setup.mtu,
            pairs,
            mem,
            taps,
            rx_taps,
            runner: fds.runner,
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(DeviceError::Epoll)?,
            shared: Arc::new(Shared::new().map_err(DeviceError::Epoll)?),
            link_up: true,
            active: None,
            resume_pairs: None,
            totals: PairStats::default(),
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
            pairs = self.pairs,
            "virtio-net device ready"
        );
        let input = |t| EpollEvent::new(EpollFlags::EPOLLIN, t);
        self.epoll
            .add(&self.runner, input(TOKEN_RUNNER))
            .map_err(DeviceError::Epoll)?;
        self.epoll
            .add(bootstrap, input(TOKEN_BOOTSTRAP))
            .map_err(DeviceError::Epoll)?;
        self.epoll
            .add(&self.shared.wake, input(TOKEN_WAKE))
            .map_err(DeviceError::Epoll)?;
        let result = self.serve_loop(bootstrap);
        self.deactivate();
        self.log_totals();
        result
    }

    fn serve_loop(&mut self, bootstrap: &Channel) -> Result<(), DeviceError> {
        let mut events = [EpollEvent::empty(); 8];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(DeviceError::Epoll(e)),
            };
            let ready = |t| events.iter().take(n).any(|e| e.data() == t);
            if ready(TOKEN_BOOTSTRAP) && child::supervisor_hung_up(bootstrap) {
                tracing::info!("supervisor closed the channel; exiting");
                return Ok(());
            }
            if ready(TOKEN_RUNNER) {
                match self.runner.recv::<ToDevice>() {
                    Ok(received) => self.handle(received.msg, received.fds)?,
                    Err(ChannelError::Closed) => {
                        tracing::info!("runner closed the device channel; exiting");
                        return Ok(());
                    }
                    Err(e @ (ChannelError::Send(_) | ChannelError::Recv(_))) => {
                        return Err(e.into());
                    }
                    Err(e) => tracing::warn!(error = %e, "dropping a malformed runner message"),
                }
            }
            if ready(TOKEN_WAKE) {
                let _ = self.shared.wake.read();
                self.worker_news()?;
            }
            if ready(TOKEN_CTRL_KICK)
                && let Some(c) = self.active.as_mut().and_then(|a| a.ctrl.as_mut())
            {
                child::drain_eventfd(&mut c.kick);
                if let Err(e) = self.ctrl_work() {
                    self.needs_reset(&crate::error_chain(&e))?;
                }
            }
        }
    }

    /// What the workers reported: a link that went down, a ring that broke.
    fn worker_news(&mut self) -> Result<(), DeviceError> {
        if self.link_up && !self.shared.link_up.load(Ordering::SeqCst) {
            self.link_up = false;
            let config = config::config_space(self.mac, false, self.mtu, self.pairs);
            self.info.config.clone_from(&config);
            self.runner
                .send(&FromDevice::ConfigChanged { config }, &[])?;
        }
        let reason = self.shared.reset.lock().ok().and_then(|mut r| r.take());
        if let Some(reason) = reason {
            self.needs_reset(&reason)?;
        }
        Ok(())
    }

    /// Stops the queues and asks the runner for a reset.
    fn needs_reset(&mut self, reason: &str) -> Result<(), DeviceError> {
        if self.active.is_none() {
            return Ok(());
        }
        tracing::warn!(%reason, "the device needs a reset");
        self.deactivate();
        self.runner.send(&FromDevice::needs_reset(reason), &[])?;
        Ok(())
    }

    fn handle(&mut self, msg: ToDevice, fds: Vec<OwnedFd>) -> Result<(), DeviceError> {
        if let Err(e) = msg.validate(&self.info) {
            tracing::warn!(error = %e, "refusing a runner message");
            return Ok(self
                .runner
                .send(&FromDevice::needs_reset(&e.to_string()), &[])?);
        }
        match msg {
            ToDevice::Activate { features, queues } => {
                self.deactivate();
                let resume = self.resume_pairs.take();
                let reply = match self.activate(features, &queues, fds, resume) {
                    Ok(()) => {
                        tracing::info!(features = format_args!("{features:#x}"), "activated");
                        FromDevice::Activated
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "activation refused");
                        self.deactivate();
                        FromDevice::needs_reset(&reason)
                    }
                };
                self.runner.send(&reply, &[])?;
                if self.active.is_some() {
                    // The driver may have queued commands before a restarted process came up.
                    if let Err(e) = self.ctrl_work() {
                        self.needs_reset(&crate::error_chain(&e))?;
                    }
                }
            }
            ToDevice::ResumeQueuePairs { pairs } => {
                // Checked against the pairs offered (`validate` above); applied by `Activate`.
                tracing::info!(
                    pairs,
                    "the next activation resumes the driver's queue pairs"
                );
                self.resume_pairs = Some(pairs);
            }
            ToDevice::Reset => {
                self.deactivate();
                self.resume_pairs = None;
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

    /// Starts serving an `Activate` with `resume` pairs enabled (1 if `None` or without `MQ`);
    /// an error is the `NeedsReset` reason.
    fn activate(
        &mut self,
        features: u64,
        configs: &[QueueConfig],
        fds: Vec<OwnedFd>,
        resume: Option<u16>,
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
        let neg = Negotiated::from_features(features);
        let multiqueue = config::multiqueue(features);
        // §5.1.2: without MQ one pair, and the control queue (if any) is queue 2.
        let pairs = if multiqueue { self.pairs } else { 1 };
        let ctrl_index =
            (features & bit(VIRTIO_NET_F_CTRL_VQ) != 0).then(|| pairs.saturating_mul(2));
        let needed = usize::from(pairs.saturating_mul(2)) + usize::from(ctrl_index.is_some());
        let slots = self.queue_slots(configs, fds, needed, neg.event_idx)?;
        let mut slots = slots.into_iter();
        let mut states = Vec::with_capacity(usize::from(pairs));
        for j in 0..usize::from(pairs) {
            let (Some(Some(rx)), Some(Some(tx))) = (slots.next(), slots.next()) else {
                return Err(format!("the queues of pair {j} are missing"));
            };
            let tap = self
                .taps
                .get(j)
                .ok_or_else(|| format!("no tap queue for pair {j}"))?;
            let queues = PairQueues {
                rx: RxQueue::new(rx.0),
                tx: TxQueue::new(tx.0),
                rx_kick: rx.1,
                rx_call: rx.2,
                tx_kick: tx.1,
                tx_call: tx.2,
            };
            states.push(PairState::new(j, queues, Arc::clone(tap)));
        }
        let ctrl = if ctrl_index.is_some() {
            let Some(Some((queue, kick, call))) = slots.next() else {
                return Err("the control queue is missing".into());
            };
            Some(CtrlQueue {
                used: UsedRing::new(&queue),
                queue,
                kick,
                call,
            })
        } else {
            None
        };
        // A tap that is gone takes no settings: the link is (or goes) down, the queues serve.
        // The offloads are the tap's, not a queue's: one call sets them for every queue.
        if self.link_up
            && let Some(tap) = self.taps.first()
        {
            match tap.set_offloads(neg.tap_offloads) {
                Ok(()) => {}
                Err(TapError::Offload(nix::errno::Errno::EBADFD)) => {
                    self.shared.link_up.store(false, Ordering::SeqCst);
                    self.worker_news().map_err(|e| crate::error_chain(&e))?;
                }
                Err(e) => return Err(crate::error_chain(&e)),
            }
        }
        // §5.1.6.5.5: one pair until VQ_PAIRS_SET; a restarted process resumes the count its
        // predecessor applied (the runner checked it against the offer, `validate` did too).
        let enabled = resume
            .filter(|_| multiqueue)
            .map_or(1, |p| p.clamp(1, pairs));
        if enabled > 1 {
            tracing::info!(pairs = enabled, "queue pairs enabled (resumed)");
        }
        self.active = Some(Active {
            neg,
            multiqueue,
            enabled,
            workers: Vec::new(),
            idle: states,
            ctrl,
        });
        self.start_workers().map_err(|e| crate::error_chain(&e))?;
        if let Some(c) = self.active.as_ref().and_then(|a| a.ctrl.as_ref()) {
            // The runner keeps its copy of the kick open, so the registration outlives our
            // descriptor: `deactivate` takes it out again.
            self.epoll
                .add(
                    &c.kick,
                    EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CTRL_KICK),
                )
                .map_err(|e| format!("polling the control kick: {e}"))?;
        }
        Ok(())
    }

    /// The first `needed` queues of an `Activate`, by index, each with its kick and call
    /// eventfds; a queue the negotiated layout does not use is dropped.
    fn queue_slots(
        &self,
        configs: &[QueueConfig],
        fds: Vec<OwnedFd>,
        needed: usize,
        event_idx: bool,
    ) -> Result<Vec<Option<QueueSlot>>, String> {
        if fds.len() != configs.len().saturating_mul(2) {
            return Err(format!(
                "{} queues with {} eventfds",
                configs.len(),
                fds.len()
            ));
        }
        let mut slots: Vec<Option<QueueSlot>> = Vec::new();
        slots.resize_with(needed, || None);
        let mut fds = fds.into_iter();
        for c in configs {
            let (Some(kick), Some(call)) = (fds.next(), fds.next()) else {
                return Err("missing eventfds".into());
            };
            // A queue beyond the layout: the driver should not enable it.
            if let Some(slot) = slots.get_mut(usize::from(c.index)) {
                let queue = build_queue(c, event_idx, &self.mem)?;
                *slot = Some((queue, File::from(kick), File::from(call)));
            }
        }
        Ok(slots)
    }

    /// Hands the tap queues to the enabled pairs (queue `i` to pair `i mod enabled`) and
    /// starts a worker per pair.
    fn start_workers(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let enabled = usize::from(a.enabled.max(1));
        for t in self.rx_taps.drain(..) {
            if let Some(s) = a.idle.get_mut(t.queue % enabled) {
                s.rx_taps.push(t);
            }
        }
        for s in a.idle.drain(..) {
            let w = Worker::start(
                s,
                self.mem.clone(),
                a.neg,
                self.mtu,
                Arc::clone(&self.shared),
            )
            .map_err(DeviceError::Thread)?;
            a.workers.push(w);
        }
        Ok(())
    }

    /// Stops every worker; their states go back to `idle`, the tap queues to `rx_taps`.
    fn stop_workers(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let mut panicked = false;
        for w in a.workers.drain(..) {
            match w.stop() {
                Some(mut s) => {
                    self.rx_taps.append(&mut s.rx_taps);
                    a.idle.push(s);
                }
                None => panicked = true,
            }
        }
        self.rx_taps.sort_by_key(|t| t.queue);
        if panicked {
            return Err(DeviceError::WorkerPanicked);
        }
        Ok(())
    }

    /// Answers the control queue's commands.
    fn ctrl_work(&mut self) -> Result<(), RingError> {
        loop {
            let Some(a) = self.active.as_mut() else {
                return Ok(());
            };
            let multiqueue = a.multiqueue;
            let Some(c) = a.ctrl.as_mut() else {
                return Ok(());
            };
            let Some(cmd) = ctrl::pop_command(&mut c.queue, &self.mem)? else {
                break;
            };
            let answer = if cmd.malformed {
                tracing::debug!(head = cmd.head, "malformed control chain");
                ctrl::Answer {
                    ack: ctrl::ACK_ERR,
                    set_pairs: None,
                }
            } else {
                ctrl::answer(&cmd.bytes, self.pairs, multiqueue)
            };
            if let Some(pairs) = answer.set_pairs {
                self.set_pairs(pairs);
            }
            tracing::debug!(
                class = cmd.bytes.first(),
                command = cmd.bytes.get(1),
                ack = answer.ack,
                "control command"
            );
            let Some(c) = self.active.as_mut().and_then(|a| a.ctrl.as_mut()) else {
                return Ok(());
            };
            let len = ctrl::write_ack(&cmd, answer.ack, &self.mem);
            c.used.push(&self.mem, cmd.head, len)?;
            c.used.publish(&self.mem)?;
        }
        if let Some(c) = self.active.as_mut().and_then(|a| a.ctrl.as_mut())
            && c.used.needs_interrupt(&self.mem)?
        {
            let _ = c.call.write(&1u64.to_ne_bytes());
        }
        Ok(())
    }

    /// `VQ_PAIRS_SET`: receive on pairs `0..pairs` from now on (before the ack is published,
    /// §5.1.6.5.5), and tell the runner, which keeps the count for a restarted process.
    fn set_pairs(&mut self, pairs: u16) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if a.enabled == pairs {
            return;
        }
        tracing::info!(from = a.enabled, to = pairs, "queue pairs enabled");
        let restarted = self.stop_workers().and_then(|()| {
            if let Some(a) = self.active.as_mut() {
                a.enabled = pairs;
            }
            self.start_workers()
        });
        if let Err(e) = restarted {
            self.shared.needs_reset(crate::error_chain(&e));
            return;
        }
        if let Err(e) = self.runner.send(&FromDevice::QueuePairs { pairs }, &[]) {
            // The runner is gone or not reading: a restart would begin with 1 pair again.
            tracing::warn!(error = %e, "reporting the queue pairs to the runner failed");
        }
    }

    /// Stops using the queues: workers stop, eventfds close, counters are kept, frames
    /// waiting for buffers are dropped.
    fn deactivate(&mut self) {
        if self.active.is_none() {
            return;
        }
        if let Err(e) = self.stop_workers() {
            tracing::error!(error = %crate::error_chain(&e), "stopping the queue pairs");
        }
        if let Some(mut a) = self.active.take() {
            if let Some(c) = &a.ctrl {
                let _ = self.epoll.delete(&c.kick);
            }
            for s in &mut a.idle {
                self.totals = self.totals.plus(s.take_stats());
            }
        }
        for t in &mut self.rx_taps {
            if t.drop_pending() {
                self.totals.rx_lost = self.totals.rx_lost.saturating_add(1);
            }
        }
        if let Ok(mut r) = self.shared.reset.lock() {
            r.take();
        }
    }

    /// Logs the counters (at exit).
    fn log_totals(&self) {
        let t = self.totals;
        tracing::info!(
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
            "counters at exit"
        );
    }
}

fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_seccomp_policy_parses() {
        assert!(sandbox::Policy::parse(crate::SECCOMP_POLICY).is_ok());
    }
}
