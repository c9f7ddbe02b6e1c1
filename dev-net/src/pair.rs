//! One queue pair's worker: a thread with its own epoll set over the pair's two kick eventfds,
//! the tap queues it reads, and a stop eventfd.
//!
//! ```text
//!  tap queue(s) ──readable──▶ rx: read one frame → RxQueue::deliver → call eventfd
//!  guest ──tx kick──▶ tx: TxQueue::next_frame → writev to the pair's own tap queue → call eventfd
//!  guest ──rx kick──▶ buffers are back: re-arm the taps, deliver the waiting frames
//! ```
//!
//! Pair `j` always transmits on tap queue `j`. It receives from the tap queues the device
//! gives it: its own while every pair is in use, and also those of pairs the driver has not
//! enabled (`VQ_PAIRS_SET` below the maximum), whose frames the kernel may still steer there.
//! A pair above the enabled count receives nothing (§5.1.6.5.5) but still transmits.
//!
//! The taps are only polled while the receive ring has buffers: when it runs dry the worker
//! asks the driver for a kick (`enable_notification`, §2.7.10) and takes the taps out of its
//! poll set until the kick arrives, so it neither reads frames it cannot place nor spins.
//!
//! A broken ring or a tap that went away is reported to the device's main thread through
//! [`Shared`] and its wake eventfd; the worker stops (broken ring) or serves on without the
//! tap (link down). [`Worker::stop`] hands the queues and taps back, ring positions and a
//! frame not yet delivered included, so the device can redistribute them.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::config::Negotiated;
use crate::header::{HEADER_LEN, MAX_GSO_FRAME};
use crate::ring::RingError;
use crate::rx::{RxOutcome, RxQueue, RxStats};
use crate::tap::{Tap, TapIo};
use crate::tx::{TxQueue, TxStats};

/// Frames moved per queue before the other side gets a turn.
const BUDGET: usize = 256;
/// Bytes of a receive bounce buffer: the largest frame a tap hands over, with its header.
const RX_BUFFER: usize = HEADER_LEN + MAX_GSO_FRAME as usize + 1024;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX_KICK: u64 = 1;
const TOKEN_TX_KICK: u64 = 2;
/// Tap slot `i` polls as `TOKEN_TAP + i`.
const TOKEN_TAP: u64 = 3;

/// What the workers tell the device's main thread, which polls `wake`.
#[derive(Debug)]
pub struct Shared {
    /// Written (1) whenever `link_up` or `reset` changes.
    pub wake: EventFd,
    /// False once a tap queue went away: the interface is gone.
    pub link_up: AtomicBool,
    /// A worker found its ring broken: why (the device needs a reset).
    pub reset: Mutex<Option<String>>,
}

impl Shared {
    pub fn new() -> nix::Result<Shared> {
        Ok(Shared {
            wake: EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
            link_up: AtomicBool::new(true),
            reset: Mutex::new(None),
        })
    }

    fn link_down(&self, why: nix::errno::Errno) {
        if self.link_up.swap(false, Ordering::SeqCst) {
            tracing::warn!(error = %why, "the tap went away; link down");
            let _ = self.wake.write(1);
        }
    }

    pub fn needs_reset(&self, why: String) {
        if let Ok(mut r) = self.reset.lock() {
            r.get_or_insert(why);
        }
        let _ = self.wake.write(1);
    }
}

/// The rings and eventfds of one queue pair, kept across worker restarts.
#[derive(Debug)]
pub struct PairQueues {
    pub rx: RxQueue,
    pub tx: TxQueue,
    pub rx_kick: File,
    pub rx_call: File,
    pub tx_kick: File,
    pub tx_call: File,
}

/// A tap queue as its reader sees it: a frame read but not delivered yet stays with it.
#[derive(Debug)]
pub struct RxTap {
    /// Which queue of the tap (the pair it transmits for).
    pub queue: usize,
    pub tap: Arc<Tap>,
    /// `buf[..pending]` is a frame waiting for receive buffers.
    buf: Vec<u8>,
    pending: usize,
    /// In the poll set for input.
    armed: bool,
    /// Read failed for good (the interface is gone).
    gone: bool,
}

impl RxTap {
    pub fn new(queue: usize, tap: Arc<Tap>) -> RxTap {
        RxTap {
            queue,
            tap,
            buf: vec![0; RX_BUFFER],
            pending: 0,
            armed: false,
            gone: false,
        }
    }

    /// Drops a frame waiting for buffers (a reset); true if there was one.
    pub fn drop_pending(&mut self) -> bool {
        std::mem::replace(&mut self.pending, 0) > 0
    }
}

/// Counters of one worker run.
#[derive(Debug, Clone, Copy, Default)]
pub struct PairStats {
    pub rx: RxStats,
    pub tx: TxStats,
    /// Frames read from a tap and dropped: short, unreadable, or lost to a reset.
    pub rx_lost: u64,
}

impl PairStats {
    /// Both counts summed.
    #[must_use]
    pub fn plus(self, o: PairStats) -> PairStats {
        PairStats {
            rx: RxStats {
                frames: self.rx.frames.saturating_add(o.rx.frames),
                bytes: self.rx.bytes.saturating_add(o.rx.bytes),
                too_big: self.rx.too_big.saturating_add(o.rx.too_big),
                bad_chains: self.rx.bad_chains.saturating_add(o.rx.bad_chains),
            },
            tx: TxStats {
                frames: self.tx.frames.saturating_add(o.tx.frames),
                bytes: self.tx.bytes.saturating_add(o.tx.bytes),
                bad_chains: self.tx.bad_chains.saturating_add(o.tx.bad_chains),
                bad_headers: self.tx.bad_headers.saturating_add(o.tx.bad_headers),
                no_link: self.tx.no_link.saturating_add(o.tx.no_link),
                tap_errors: self.tx.tap_errors.saturating_add(o.tx.tap_errors),
            },
            rx_lost: self.rx_lost.saturating_add(o.rx_lost),
        }
    }
}

/// What a worker is started with, and hands back when it stops.
#[derive(Debug)]
pub struct PairState {
    pub index: usize,
    pub queues: PairQueues,
    /// The pair's own tap queue (transmit).
    pub tx_tap: Arc<Tap>,
    /// The tap queues it receives from; empty for a pair above the enabled count.
    pub rx_taps: Vec<RxTap>,
    /// Counters since the last [`PairState::take_stats`].
    stats: PairStats,
}

impl PairState {
    pub fn new(index: usize, queues: PairQueues, tx_tap: Arc<Tap>) -> PairState {
        PairState {
            index,
            queues,
            tx_tap,
            rx_taps: Vec::new(),
            stats: PairStats::default(),
        }
    }

    /// The counters so far (ring counters included), reset to zero.
    pub fn take_stats(&mut self) -> PairStats {
        let mut s = std::mem::take(&mut self.stats);
        s.rx = std::mem::take(&mut self.queues.rx.stats);
        s.tx = std::mem::take(&mut self.queues.tx.stats);
        s
    }

    pub fn count_lost(&mut self) {
        self.stats.rx_lost = self.stats.rx_lost.saturating_add(1);
    }
}

/// A running worker thread.
#[derive(Debug)]
pub struct Worker {
    stop: Arc<EventFd>,
    thread: JoinHandle<PairState>,
}

impl Worker {
    /// Starts serving `state` on a new thread.
    pub fn start(
        state: PairState,
        mem: GuestMemoryMmap,
        neg: Negotiated,
        mtu: u16,
        shared: Arc<Shared>,
    ) -> std::io::Result<Worker> {
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(std::io::Error::from)?,
        );
        let name = format!("net-pair{}", state.index);
        let stop_fd = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut run = Run {
                s: state,
                mem,
                neg,
                mtu,
                shared,
                rx_more: false,
                tx_more: false,
            };
            run.serve(stop_fd.as_fd());
            run.disarm_all();
            run.s
        })?;
        Ok(Worker { stop, thread })
    }

    /// Stops the thread and takes its state back (`None` if it panicked, which it must not).
    pub fn stop(self) -> Option<PairState> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

/// Why a data-path step stopped.
enum Failure {
    Ring(RingError),
    Epoll(nix::errno::Errno),
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

/// A worker's loop state.
struct Run {
    s: PairState,
    mem: GuestMemoryMmap,
    neg: Negotiated,
    mtu: u16,
    shared: Arc<Shared>,
    /// A budget ran out: run again without waiting.
    rx_more: bool,
    tx_more: bool,
}

impl Run {
    fn serve(&mut self, stop: BorrowedFd<'_>) {
        let epoll = match self.poll_set(stop) {
            Ok(e) => e,
            Err(e) => {
                self.shared
                    .needs_reset(format!("pair {}: polling failed: {e}", self.s.index));
                return;
            }
        };
        // The driver may have queued frames and buffers before this worker started.
        if let Err(f) = self.tx_work().and_then(|()| self.rx_work(&epoll)) {
            self.fail(f);
            return;
        }
        let mut events = [EpollEvent::empty(); 16];
        loop {
            let timeout = if self.rx_more || self.tx_more {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::NONE
            };
            let n = match epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    self.fail(Failure::Epoll(e));
                    return;
                }
            };
            let (mut rx, mut tx) = (self.rx_more, self.tx_more);
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_STOP => return,
                    TOKEN_RX_KICK => {
                        child::drain_eventfd(&mut self.s.queues.rx_kick);
                        rx = true;
                    }
                    TOKEN_TX_KICK => {
                        child::drain_eventfd(&mut self.s.queues.tx_kick);
                        tx = true;
                    }
                    t => {
                        let slot = usize::try_from(t.saturating_sub(TOKEN_TAP)).unwrap_or(0);
                        let bad = EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP;
                        if ev.events().intersects(bad) {
                            // A deleted tap reports an error; the read says why.
                            self.probe_gone(&epoll, slot);
                        }
                        rx = true;
                    }
                }
            }
            let step = (|| {
                if tx {
                    self.tx_work()?;
                }
                if rx {
                    self.rx_work(&epoll)?;
                }
                Ok(())
            })();
            if let Err(f) = step {
                self.fail(f);
                return;
            }
        }
    }

    fn poll_set(&self, stop: BorrowedFd<'_>) -> nix::Result<Epoll> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let input = |t| EpollEvent::new(EpollFlags::EPOLLIN, t);
        epoll.add(stop, input(TOKEN_STOP))?;
        epoll.add(&self.s.queues.tx_kick, input(TOKEN_TX_KICK))?;
        if !self.s.rx_taps.is_empty() {
            epoll.add(&self.s.queues.rx_kick, input(TOKEN_RX_KICK))?;
        }
        // The taps stay in the set (for their error events) but are armed for input only
        // while the receive ring has buffers.
        for (i, t) in self.s.rx_taps.iter().enumerate() {
            if !t.gone {
                let token = TOKEN_TAP.saturating_add(i as u64);
                epoll.add(&*t.tap, EpollEvent::new(EpollFlags::empty(), token))?;
            }
        }
        Ok(epoll)
    }

    fn fail(&mut self, f: Failure) {
        let reason = match f {
            Failure::Ring(e) => crate::error_chain(&e),
            Failure::Epoll(e) => format!("the event loop failed: {e}"),
        };
        tracing::warn!(pair = self.s.index, %reason, "ring broken; the device needs a reset");
        self.shared.needs_reset(reason);
    }

    /// Marks every tap unarmed: the epoll set goes away with the worker.
    fn disarm_all(&mut self) {
        for t in &mut self.s.rx_taps {
            t.armed = false;
        }
    }

    /// A tap reported an error: read it to learn whether it is gone.
    fn probe_gone(&mut self, epoll: &Epoll, slot: usize) {
        let Some(t) = self.s.rx_taps.get_mut(slot) else {
            return;
        };
        if t.gone || t.pending > 0 {
            return;
        }
        match t.tap.recv(&mut t.buf) {
            Ok(n) if n >= HEADER_LEN => t.pending = n,
            Ok(_) | Err(TapIo::Failed(_)) => {
                self.s.stats.rx_lost = self.s.stats.rx_lost.saturating_add(1);
            }
            Err(TapIo::WouldBlock) => {}
            Err(TapIo::Gone(e)) => {
                t.gone = true;
                t.armed = false;
                let _ = epoll.delete(&*t.tap);
                self.shared.link_down(e);
            }
        }
    }

    /// Moves frames from the taps into the receive ring until the taps are empty, the ring
    /// has no room or the budget is spent.
    fn rx_work(&mut self, epoll: &Epoll) -> Result<(), Failure> {
        if self.s.rx_taps.is_empty() {
            return Ok(());
        }
        let link_up = self.shared.link_up.load(Ordering::Relaxed);
        let mut starved = false;
        let mut more = false;
        let mem = &self.mem;
        let rxq = &mut self.s.queues.rx;
        let stats = &mut self.s.stats;
        'taps: for t in &mut self.s.rx_taps {
            if t.gone {
                continue;
            }
            let mut round = 0usize;
            loop {
                if round == BUDGET {
                    more = true;
                    break;
                }
                round = round.saturating_add(1);
                if t.pending == 0 {
                    if !rxq.has_buffers(mem)? {
                        // §2.7.10: ask for a kick; buffers that came meanwhile are seen here.
                        if rxq.queue.enable_notification(mem)? {
                            continue;
                        }
                        starved = true;
                        break 'taps;
                    }
                    match t.tap.recv(&mut t.buf) {
                        Ok(n) if n >= HEADER_LEN => t.pending = n,
                        Ok(_) | Err(TapIo::Failed(_)) => {
                            stats.rx_lost = stats.rx_lost.saturating_add(1);
                            continue;
                        }
                        Err(TapIo::WouldBlock) => break,
                        Err(TapIo::Gone(e)) => {
                            t.gone = true;
                            t.armed = false;
                            let _ = epoll.delete(&*t.tap);
                            self.shared.link_down(e);
                            break;
                        }
                    }
                }
                let packet = t.buf.get(..t.pending).unwrap_or_default();
                match rxq.deliver(mem, packet, &self.neg)? {
                    RxOutcome::Delivered { .. } | RxOutcome::Dropped => t.pending = 0,
                    RxOutcome::NoBuffers => {
                        if rxq.queue.enable_notification(mem)? {
                            continue;
                        }
                        starved = true;
                        break 'taps;
                    }
                }
            }
        }
        self.rx_more = more && link_up && !starved;
        if !starved {
            // Buffers are at hand: kicks are not needed until the ring runs dry again.
            rxq.queue.disable_notification(mem)?;
        }
        for (i, t) in self.s.rx_taps.iter_mut().enumerate() {
            let want = !starved && !t.gone;
            if want != t.armed {
                let flags = if want {
                    EpollFlags::EPOLLIN
                } else {
                    EpollFlags::empty()
                };
                let token = TOKEN_TAP.saturating_add(i as u64);
                epoll
                    .modify(&*t.tap, &mut EpollEvent::new(flags, token))
                    .map_err(Failure::Epoll)?;
                t.armed = want;
            }
        }
        // Chains returned empty need an interrupt as much as delivered frames.
        if rxq.used.needs_interrupt(mem)? {
            let _ = self.s.queues.rx_call.write(&1u64.to_ne_bytes());
        }
        Ok(())
    }

    /// Sends the transmit ring's frames to the pair's tap queue.
    fn tx_work(&mut self) -> Result<(), Failure> {
        let mut more = false;
        let mem = &self.mem;
        let q = &mut self.s.queues;
        let tap = &self.s.tx_tap;
        let mut gone = None;
        'outer: loop {
            q.tx.queue.disable_notification(mem)?;
            for _ in 0..BUDGET {
                let Some((head, frame)) = q.tx.next_frame(mem, self.mtu, self.neg.tx)? else {
                    // §2.7.10: re-enabling reports chains that came meanwhile.
                    if q.tx.queue.enable_notification(mem)? {
                        continue 'outer;
                    }
                    break 'outer;
                };
                let link_up = gone.is_none() && self.shared.link_up.load(Ordering::Relaxed);
                match frame {
                    Err(why) => {
                        tracing::trace!(head, %why, "dropping a transmitted frame");
                        q.tx.stats.count_drop(&why);
                    }
                    Ok(_) if !link_up => {
                        q.tx.stats.no_link = q.tx.stats.no_link.saturating_add(1);
                    }
                    Ok(f) => match tap.send(&f.header, mem, &f.segments) {
                        Ok(()) => {
                            q.tx.stats.frames = q.tx.stats.frames.saturating_add(1);
                            q.tx.stats.bytes = q.tx.stats.bytes.saturating_add(u64::from(f.len));
                        }
                        Err(TapIo::Gone(e)) => gone = Some(e),
                        Err(TapIo::Failed(_) | TapIo::WouldBlock) => {
                            q.tx.stats.tap_errors = q.tx.stats.tap_errors.saturating_add(1);
                        }
                    },
                }
                // §5.1.6.2: the device writes nothing into a transmit buffer.
                q.tx.used.push(mem, head, 0)?;
            }
            more = true;
            break;
        }
        q.tx.used.publish(mem)?;
        self.tx_more = more;
        if q.tx.used.needs_interrupt(mem)? {
            let _ = q.tx_call.write(&1u64.to_ne_bytes());
        }
        if let Some(e) = gone {
            self.shared.link_down(e);
        }
        Ok(())
    }
}
