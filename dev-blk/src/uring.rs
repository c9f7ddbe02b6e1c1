//! The asynchronous engine: one `io_uring` per serving thread, each serving one or more
//! virtqueues, with every read, write and flush of the queue in flight at once.
//!
//! ```text
//!  guest ──kick eventfd──▶ (a POLL_ADD in the ring) ┐
//!                                                 ├─ pop every available chain ─ READV/WRITEV/FSYNC
//!    ▲                                            │   straight between the disk and guest RAM
//!    │                                   io_uring_enter: submit the batch, wait for one completion
//!    └──── call eventfd ◀── add_used for each completion ◀─┘
//! ```
//!
//! Why: with the worker pool ([`crate::queue_loop`]) each request costs a blocking system call
//! and a sleep/wake-up of a worker. Here one `io_uring_enter` submits every chain taken and
//! waits for whatever completes first. `GET_ID`, discard, write-zeroes and failed requests run
//! synchronously on the serving thread ([`crate::request::execute`]): they are rare, and
//! discard and write-zeroes are `fallocate` calls the kernel would run on a worker anyway.
//!
//! **Not the default.** Measured with `scripts/bench-blk.sh --compare-engines` (4 KiB random
//! at queue depth 32, both engines interleaved in one run, medians of 7 rounds, on a 2-CPU
//! Firecracker guest whose disk is virtio-blk; two runs on an otherwise idle machine): with
//! [`SPIN_US`] of polling this engine completes about as many requests as the worker pool
//! (read 101-102 % of the host against 81-104 %, write 65-74 % against 73-79 %) at 30-55 %
//! less CPU per request (5.9-6.8 against 9.1-13.1 µs). It stays opt-in for security: the
//! pool needs nothing beyond plain `preadv`/`pwritev`, while every ring keeps the kernel's
//! `io_uring` machinery reachable from a process a guest may have taken over (restricted to
//! five operations, but still one of the kernel's larger attack surfaces).
//! `CAPVM_BLK_IO=uring` in the supervisor's environment turns it on, for hosts where CPU per
//! I/O matters more.
//!
//! # The rings are made before capability mode
//!
//! `io_uring` operations run in the kernel without passing seccomp, so `io_uring_setup` and
//! `io_uring_register` are in no policy of this process: [`make_rings`] creates every ring
//! before the sandbox is entered (`IORING_SETUP_R_DISABLED`), registers
//! `IORING_REGISTER_RESTRICTIONS` — the operations `READV`, `WRITEV`, `FSYNC`, `POLL_ADD` (the
//! kick and stop eventfds) and `ASYNC_CANCEL`, no SQE flags, no register operation — and only
//! then enables it. The running process can call `io_uring_enter` and nothing else of
//! `io_uring`, and a ring can only read and write descriptors the process already holds.
//! The rings outlive activations (a reset returns a thread's ring to the device). Where the
//! kernel refuses rings (`kernel.io_uring_disabled`, an old kernel) the device uses the worker
//! pool.
//!
//! # Guest memory
//!
//! A request's iovecs point into the guest RAM mapping, which the device holds for its whole
//! life; they are kept with the request until its completion arrives, and a serving thread
//! never returns while a request of its ring is in flight (stop waits for every completion and
//! cancels the kick polls), so the kernel never writes through a stale iovec into a reused
//! mapping.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, register::Restriction, squeue, types};
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use crate::disk::{Disk, FileDisk};
use crate::inflight::QueueLog;
use crate::queue_loop::{BrokenHook, QueueError, Rings, pop_logged};
use crate::request::{Context, Plan, Request, execute, plan, with_slices};
use child::drain_eventfd;

/// Submission queue entries of a ring (its completion queue has twice as many).
pub const RING_ENTRIES: u32 = 256;
/// Most rings (serving threads) a device makes.
pub const MAX_RINGS: usize = 8;
/// The environment variable that picks the engine: `uring` for this one; the worker pool
/// otherwise.
pub const ENGINE_ENV: &str = "CAPVM_BLK_IO";
/// Most iovecs of one submitted request (`UIO_MAXIOV`); a longer request runs synchronously.
const IOV_MAX: usize = 1024;
/// Up to this many outstanding chains of a queue are all kept in flight ([`in_flight_cap`]).
const RESERVE_FROM: usize = 8;
/// Iovecs a request keeps inline (every 4 KiB request needs one).
const INLINE_IOVS: usize = 8;
/// How long, in µs, a serving thread with requests in flight polls for a completion or a new
/// chain before it sleeps in `io_uring_enter`. Measured with `scripts/bench-blk.sh` (4 KiB
/// random at queue depth 32, interleaved rounds, an otherwise idle machine): without polling
/// 72.9 % of the host's reads and 64.7 % of its writes at 4.4 and 3.3 µs of dev-blk CPU per
/// request; polling 50 µs, 91.9 % and 76.2 % at 6.3 and 5.8 µs. (On a loaded machine 20 µs
/// fell in between, and 100-200 µs gained nothing more and cost up to 14 µs.) A sleeping
/// thread's wake-up (an idle CPU halted in a VM) is slower than the disk's next completion.
/// Nothing is polled while no request is in flight.
pub const SPIN_US: u64 = 50;
/// The environment variable that overrides [`SPIN_US`] (0 to 1000; 0 never polls), for
/// measuring.
pub const SPIN_ENV: &str = "CAPVM_BLK_SPIN_US";

/// The polling time: [`SPIN_US`] unless [`SPIN_ENV`] names another; `None` for 0.
fn spin_time() -> Option<Duration> {
    let us = crate::env_number(SPIN_ENV, 0..=1000, SPIN_US);
    (us > 0).then(|| Duration::from_micros(us))
}

/// `POLLIN` as `POLL_ADD` takes it.
const POLLIN: u32 = libc::POLLIN as u32;

const TAG_SHIFT: u32 = 32;
const TAG_IO: u64 = 1;
const TAG_KICK: u64 = 2;
const TAG_STOP: u64 = 3;
const TAG_CANCEL: u64 = 4;

/// Why rings could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("io_uring_setup failed")]
    Setup(#[source] std::io::Error),
    #[error("registering the ring's restrictions failed")]
    Restrict(#[source] std::io::Error),
    #[error("enabling the ring failed")]
    Enable(#[source] std::io::Error),
}

/// One restricted, enabled ring.
pub fn make_ring() -> Result<IoUring, RingError> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(RING_ENTRIES)
        .map_err(RingError::Setup)?;
    let mut allowed = [
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::PollAdd::CODE),
        Restriction::sqe_op(opcode::AsyncCancel::CODE),
        Restriction::sqe_flags_allowed(0),
    ];
    ring.submitter()
        .register_restrictions(&mut allowed)
        .map_err(RingError::Restrict)?;
    ring.submitter()
        .register_enable_rings()
        .map_err(RingError::Enable)?;
    Ok(ring)
}

/// Whether the environment asks for this engine (`CAPVM_BLK_IO=uring`).
pub fn wanted() -> bool {
    std::env::var(ENGINE_ENV).is_ok_and(|v| v == "uring")
}

/// Up to `count` rings (at least one), made before capability mode when [`wanted`]; empty
/// otherwise or when the kernel refuses rings.
pub fn make_rings(count: usize) -> Vec<IoUring> {
    if !wanted() {
        return Vec::new();
    }
    let mut rings = Vec::new();
    for _ in 0..count.clamp(1, MAX_RINGS) {
        match make_ring() {
            Ok(ring) => rings.push(ring),
            Err(e) => {
                // Logging is up (child::start_with runs this after it); the device then
                // says which engine it uses.
                tracing::warn!(error = %child::error_chain(&e), made = rings.len(), "io_uring refused a ring");
                break;
            }
        }
    }
    rings
}

/// One queue a serving thread serves.
#[derive(Debug)]
pub struct Served {
    pub index: u16,
    pub queue: Queue,
    pub rings: Rings,
}

/// What every serving thread of a device shares.
#[derive(Clone)]
pub struct Shared {
    pub mem: Arc<GuestMemoryMmap>,
    pub disk: Arc<FileDisk>,
    pub ctx: Arc<Context>,
    /// Called once per queue, from its serving thread, when the queue breaks.
    pub on_broken: Arc<BrokenHook>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

/// A running serving thread.
#[derive(Debug)]
pub struct LoopHandle {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Option<IoUring>>>,
}

impl LoopHandle {
    /// Stops serving after every request in flight completed; returns the ring for the next
    /// activation (`None` if the ring failed).
    pub fn stop(mut self) -> Option<IoUring> {
        let _ = self.stop.write(1);
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl Drop for LoopHandle {
    /// Asks the thread to stop without waiting for it: a dropped handle means the process is
    /// exiting (the thread holds its own references to guest RAM and the disk until then).
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

/// Starts a thread serving `queues` on `ring`.
pub fn start(ring: IoUring, queues: Vec<Served>, shared: Shared) -> Result<LoopHandle, QueueError> {
    let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(|e| QueueError::Spawn(e.into()))?;
    let name = format!("blk-uring-q{}", queues.first().map_or(0, |q| q.index));
    let stop_fd = stop.as_raw_fd();
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(256 * 1024)
        .spawn(move || Server::new(ring, queues, shared, stop_fd).run())
        .map_err(QueueError::Spawn)?;
    Ok(LoopHandle {
        stop,
        thread: Some(thread),
    })
}

/// A served queue's state, owned by its serving thread.
struct QueueState {
    index: u16,
    queue: Queue,
    log: QueueLog,
    replay: VecDeque<(u16, Request)>,
    kick: File,
    call: File,
    /// A poll of the kick eventfd is in the ring.
    kick_armed: bool,
    /// Used elements were added since `needs_notification` was last asked.
    completed: bool,
    /// Requests of this queue submitted and not completed.
    in_flight: usize,
    broken: bool,
}

/// A request in flight.
struct Pending {
    queue: usize,
    head: u16,
    status: GuestAddress,
    /// The used length on success, without the status byte.
    data_len: u32,
    /// Bytes the submitted operation must transfer (0 for a flush).
    expect: u64,
    offset: u64,
    write: bool,
    iovs: [libc::iovec; INLINE_IOVS],
    more_iovs: Vec<libc::iovec>,
    iov_count: usize,
}

impl Pending {
    /// A request with no data (a flush) until its fields say otherwise.
    fn new(queue: usize, head: u16, status: GuestAddress) -> Pending {
        Pending {
            queue,
            head,
            status,
            data_len: 0,
            expect: 0,
            offset: 0,
            write: false,
            iovs: [EMPTY_IOV; INLINE_IOVS],
            more_iovs: Vec::new(),
            iov_count: 0,
        }
    }

    fn iovecs_mut(&mut self) -> &mut [libc::iovec] {
        if self.more_iovs.is_empty() {
            self.iovs.get_mut(..self.iov_count).unwrap_or_default()
        } else {
            &mut self.more_iovs
        }
    }
}

const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

struct Server {
    ring: IoUring,
    queues: Vec<QueueState>,
    shared: Shared,
    stop_fd: RawFd,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Operations in the ring whose completion has not been reaped.
    outstanding: usize,
    /// Most requests in flight, so completions never overflow the completion queue.
    cap: usize,
    cqes: Vec<(u64, i32)>,
    /// How long to poll for work before sleeping ([`spin_time`]).
    spin: Option<Duration>,
}

impl Server {
    fn new(ring: IoUring, queues: Vec<Served>, shared: Shared, stop_fd: RawFd) -> Server {
        let queues: Vec<QueueState> = queues
            .into_iter()
            .map(|s| QueueState {
                index: s.index,
                queue: s.queue,
                log: s.rings.log,
                replay: s.rings.replay.into(),
                kick: File::from(s.rings.kick),
                call: File::from(s.rings.call),
                kick_armed: false,
                completed: false,
                in_flight: 0,
                broken: false,
            })
            .collect();
        let cq = usize::try_from(ring.params().cq_entries()).unwrap_or(1);
        // Room for every queue's kick poll and its cancel, and the stop poll.
        let cap = cq.saturating_sub(2 * queues.len() + 2).max(1);
        Server {
            // Never grown past `cap` (see `take_all`), so a request's inline iovecs do not
            // move while the kernel may read them.
            slots: Vec::with_capacity(cap),
            free: Vec::new(),
            outstanding: 0,
            cap,
            cqes: Vec::with_capacity(cq),
            spin: spin_time(),
            ring,
            queues,
            shared,
            stop_fd,
        }
    }

    /// Serves until stopped; returns the ring if it is still usable.
    fn run(mut self) -> Option<IoUring> {
        let stop = opcode::PollAdd::new(types::Fd(self.stop_fd), POLLIN)
            .build()
            .user_data(TAG_STOP << TAG_SHIFT);
        let mut healthy = self.push(&stop).is_ok();
        let mut stopping = false;
        while healthy {
            if !stopping {
                self.take_all();
                self.arm_kicks();
            }
            if !self.ring.submission().is_empty() {
                // New I/O reaches the disk before the driver's interrupt is raised (an
                // eventfd write that wakes another CPU). Its own effect was within this
                // machine's run-to-run noise; it costs one io_uring_enter per batch.
                let _ = self.ring.submit();
            }
            self.notify();
            if stopping && self.outstanding == 0 {
                break;
            }
            let ready = !stopping && self.spin_for_work();
            let waited = if ready {
                Ok(0)
            } else {
                self.ring.submit_and_wait(1)
            };
            match waited {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                        Errno::EINTR | Errno::EBUSY | Errno::EAGAIN
                    ) => {}
                Err(e) => {
                    self.fail_all(&QueueError::Epoll(Errno::from_raw(
                        e.raw_os_error().unwrap_or(0),
                    )));
                    healthy = false;
                    break;
                }
            }
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            self.outstanding = self.outstanding.saturating_sub(self.cqes.len());

            for i in 0..self.cqes.len() {
                let Some(&(data, res)) = self.cqes.get(i) else {
                    break;
                };
                let low = usize::try_from(data & 0xffff_ffff).unwrap_or(usize::MAX);
                match data >> TAG_SHIFT {
                    TAG_IO => self.finish(low, res, stopping),
                    TAG_KICK => {
                        if let Some(q) = self.queues.get_mut(low) {
                            q.kick_armed = false;
                            if res > 0 {
                                // Readable: consume the kick so the next poll waits.
                                drain_eventfd(&mut q.kick);
                            }
                        }
                    }
                    TAG_STOP if !stopping => {
                        stopping = true;
                        healthy = self.cancel_kicks().is_ok();
                    }
                    _ => {}
                }
            }
        }
        if !healthy {
            // The ring's state is unknown: dropping it makes the kernel cancel what is left.
            self.wait_for_stop();
            return None;
        }
        Some(self.ring)
    }

    /// With requests in flight, polls for up to `spin` for a completion or a new chain the
    /// serving thread may take, instead of sleeping at once ([`SPIN_US`]). True when one came.
    fn spin_for_work(&mut self) -> bool {
        let Some(spin) = self.spin else {
            return false;
        };
        if self.queues.iter().all(|q| q.in_flight == 0) {
            return false;
        }
        let until = Instant::now() + spin;
        loop {
            if !self.ring.completion().is_empty() {
                return true;
            }
            let mem = &*self.shared.mem;
            let offered = |q: &QueueState| {
                q.queue
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|a| a.0 != q.queue.next_avail())
            };
            if self.queues.iter().any(|q| offered(q) && self.may_take(q)) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Whether `q` may have one more request in flight: the ring is under its cap, the queue
    /// is healthy and under its own ([`in_flight_cap`]).
    fn may_take(&self, q: &QueueState) -> bool {
        self.slots.len() - self.free.len() < self.cap
            && !q.broken
            && q.in_flight < in_flight_cap(&q.queue, &self.shared.mem)
    }

    /// Queues an operation, submitting what is queued first when the ring is full.
    fn push(&mut self, entry: &squeue::Entry) -> Result<(), Errno> {
        loop {
            // SAFETY: the only memory an entry names is a request's iovecs (and, through
            // them, guest RAM), kept in `slots` until its completion is reaped: slots are
            // freed only in `finish`, `slots` never reallocates, and `run` does not return
            // while operations are out. Polls and cancels name no memory.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.outstanding += 1;
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: nothing can be submitted until it is
                    // reaped, which `cap` prevents; treat it as a broken ring.
                    return Err(Errno::EBUSY);
                }
                Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(0))),
            }
        }
    }

    /// Pops every chain the queues offer (replays first), while under the in-flight cap.
    fn take_all(&mut self) {
        for qi in 0..self.queues.len() {
            loop {
                if !self.queues.get(qi).is_some_and(|q| self.may_take(q)) {
                    break;
                }
                let mem = Arc::clone(&self.shared.mem);
                let Some(q) = self.queues.get_mut(qi) else {
                    break;
                };
                let taken = match q.replay.pop_front() {
                    Some(r) => Ok(Some(r)),
                    None => pop_logged(&mut q.queue, &q.log, &mem),
                };
                match taken {
                    Ok(Some((head, req))) => self.begin(qi, head, &req),
                    Ok(None) => break,
                    Err(e) => {
                        self.broke(qi, &e);
                        break;
                    }
                }
            }
        }
    }

    /// Starts one request: submits a read, write or flush; runs anything else at once.
    fn begin(&mut self, qi: usize, head: u16, req: &Request) {
        let disk_size = self.shared.disk.size();
        let fd = types::Fd(self.shared.disk.file().as_raw_fd());
        let ctx = Arc::clone(&self.shared.ctx);
        let (write, offset, segs, data_len) = match plan(req, &ctx, disk_size) {
            Plan::Read { offset, segs, len } => (false, offset, segs, len),
            Plan::Write { offset, segs } => (true, offset, segs, 0),
            Plan::Flush => {
                let slot = self.slot(Pending::new(qi, head, req.status));
                let entry = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(io_data(slot));
                self.submit_or_fail(slot, &entry);
                return;
            }
            Plan::Fail(_) | Plan::Other => {
                let done = execute(req, &self.shared.mem, &*self.shared.disk, &ctx);
                self.complete(qi, head, done.used_len);
                return;
            }
        };
        let mut p = Pending {
            data_len,
            offset,
            write,
            ..Pending::new(qi, head, req.status)
        };
        let mem = Arc::clone(&self.shared.mem);
        let built = with_slices(&mem, segs, |slices| {
            fill_iovecs(&mut p, slices);
            Ok::<(), ()>(())
        });
        if built.is_err() || p.iov_count > IOV_MAX {
            // A buffer outside RAM (IOERR) or too many iovecs for one operation: the
            // synchronous path runs it, or says why not.
            let done = execute(req, &self.shared.mem, &*self.shared.disk, &ctx);
            self.complete(qi, head, done.used_len);
            return;
        }
        let count = u32::try_from(p.iov_count).unwrap_or(0);
        let slot = self.slot(p);
        let Some(Some(p)) = self.slots.get_mut(slot) else {
            return;
        };
        let iovs = p.iovecs_mut().as_ptr();
        let entry = if write {
            opcode::Writev::new(fd, iovs, count)
                .offset(offset)
                .build()
                .user_data(io_data(slot))
        } else {
            opcode::Readv::new(fd, iovs, count)
                .offset(offset)
                .build()
                .user_data(io_data(slot))
        };
        self.submit_or_fail(slot, &entry);
    }

    fn slot(&mut self, p: Pending) -> usize {
        if let Some(q) = self.queues.get_mut(p.queue) {
            q.in_flight += 1;
        }
        if let Some(i) = self.free.pop()
            && let Some(s) = self.slots.get_mut(i)
        {
            *s = Some(p);
            return i;
        }
        self.slots.push(Some(p));
        self.slots.len() - 1
    }

    fn submit_or_fail(&mut self, slot: usize, entry: &squeue::Entry) {
        if let Err(e) = self.push(entry) {
            tracing::warn!(error = %e, "submitting to the ring failed");
            self.finish(slot, -(e as i32), false);
        }
    }

    /// A submitted request's completion: finishes a short transfer synchronously, writes the
    /// status byte and publishes the used element (unless the queue is being stopped: after a
    /// reset the rings are no longer the driver's to write).
    fn finish(&mut self, slot: usize, res: i32, stopping: bool) {
        let Some(mut p) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        if let Some(q) = self.queues.get_mut(p.queue) {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        let ok = match u64::try_from(res) {
            Ok(done) if done == p.expect => true,
            Ok(done) if done > 0 && done < p.expect => {
                // A short transfer (the kernel may stop early): the rest runs here.
                let offset = p.offset.saturating_add(done);
                let (write, iovs) = (p.write, p.iovecs_mut());
                let first = crate::disk::advance(iovs, 0, usize::try_from(done).unwrap_or(0));
                self.shared
                    .disk
                    .transfer_iovs(offset, iovs.get_mut(first..).unwrap_or_default(), write)
                    .is_ok()
            }
            Ok(_) => false,
            Err(_) => {
                tracing::debug!(errno = -res, "disk operation failed");
                false
            }
        };
        if stopping {
            return;
        }
        let status = if ok {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        };
        let status = u8::try_from(status).unwrap_or(u8::MAX);
        // The status address was checked when the chain was parsed.
        let _ = self.shared.mem.write_obj(status, p.status);
        let written = if ok { p.data_len } else { 0 };
        self.complete(p.queue, p.head, written.saturating_add(1));
    }

    /// Publishes `head`'s used element.
    fn complete(&mut self, qi: usize, head: u16, len: u32) {
        let mem = Arc::clone(&self.shared.mem);
        let Some(q) = self.queues.get_mut(qi) else {
            return;
        };
        q.log.completing(head, q.queue.next_used());
        let added = q.queue.add_used(&*mem, head, len);
        q.log.completed(head);
        match added {
            Ok(()) => q.completed = true,
            Err(e) => self.broke(qi, &QueueError::Ring(e)),
        }
    }

    /// Sends each queue's owed interrupt: one per batch of completions at most.
    fn notify(&mut self) {
        let mem = Arc::clone(&self.shared.mem);
        for q in &mut self.queues {
            if std::mem::take(&mut q.completed) && q.queue.needs_notification(&*mem).unwrap_or(true)
            {
                let _ = (&q.call).write(&1u64.to_ne_bytes());
            }
        }
    }

    /// Puts a poll of each healthy queue's kick eventfd in the ring. (A read would do, but a
    /// read of a non-blocking eventfd completes at once with `EAGAIN`.)
    fn arm_kicks(&mut self) {
        for qi in 0..self.queues.len() {
            let Some(q) = self.queues.get(qi) else {
                break;
            };
            if q.kick_armed || q.broken {
                continue;
            }
            let fd = types::Fd(q.kick.as_raw_fd());
            let entry = opcode::PollAdd::new(fd, POLLIN)
                .build()
                .user_data((TAG_KICK << TAG_SHIFT) | qi as u64);
            match self.push(&entry) {
                Ok(()) => {
                    if let Some(q) = self.queues.get_mut(qi) {
                        q.kick_armed = true;
                    }
                }
                Err(e) => self.broke(qi, &QueueError::Epoll(e)),
            }
        }
    }

    /// Cancels the armed kick polls (stopping): their descriptors are the old activation's.
    fn cancel_kicks(&mut self) -> Result<(), Errno> {
        for qi in 0..self.queues.len() {
            if self.queues.get(qi).is_some_and(|q| q.kick_armed) {
                let entry = opcode::AsyncCancel::new((TAG_KICK << TAG_SHIFT) | qi as u64)
                    .build()
                    .user_data(TAG_CANCEL << TAG_SHIFT);
                self.push(&entry)?;
            }
        }
        Ok(())
    }

    fn broke(&mut self, qi: usize, e: &QueueError) {
        if let Some(q) = self.queues.get_mut(qi)
            && !q.broken
        {
            q.broken = true;
            (self.shared.on_broken)(q.index, e);
        }
    }

    fn fail_all(&mut self, e: &QueueError) {
        for qi in 0..self.queues.len() {
            self.broke(qi, e);
        }
    }

    /// After the ring failed: waits for the device to stop this thread.
    fn wait_for_stop(&self) {
        let mut fds = [nix::poll::PollFd::new(
            // SAFETY: the stop eventfd is owned by the `LoopHandle`, which joins this thread
            // before dropping it.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(self.stop_fd) },
            nix::poll::PollFlags::POLLIN,
        )];
        while matches!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE),
            Err(Errno::EINTR) | Ok(0)
        ) {}
    }
}

/// Most requests of a queue to keep in flight: every chain the driver has outstanding (posted
/// and not yet seen completed) up to [`RESERVE_FROM`], three quarters of them beyond. The
/// quarter left in the avail ring is a reserve: a completion is replaced from it at once,
/// without waiting for the driver to take its interrupt and post a new chain. Without it the
/// whole queue moves as one convoy (all in flight, all completed, one interrupt, all posted
/// again) and the disk idles while the driver turns around. Measured with
/// `scripts/bench-blk.sh --compare-engines` (queue depth 32, 4 KiB random, medians of 7
/// rounds): 24 in flight reached 87 % (read) and 71 % (write) of the host, everything in
/// flight 73 % and 48 %.
fn in_flight_cap(queue: &Queue, mem: &GuestMemoryMmap) -> usize {
    let outstanding = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_or(0, |a| usize::from(a.0.wrapping_sub(queue.next_used())));
    if outstanding <= RESERVE_FROM {
        outstanding.max(1)
    } else {
        (outstanding - outstanding / 4).max(RESERVE_FROM)
    }
}

fn io_data(slot: usize) -> u64 {
    (TAG_IO << TAG_SHIFT) | (slot as u64 & 0xffff_ffff)
}

/// Records `slices` as `p`'s iovecs and its expected transfer length.
fn fill_iovecs(p: &mut Pending, slices: &[VolatileSlice<'_>]) {
    let mut total = 0u64;
    let mut n = 0usize;
    for s in slices.iter().filter(|s| !s.is_empty()) {
        // With the unit bitmap the guard only carries the pointer; the mapping itself stays
        // alive as long as the device holds guest RAM (see the module docs).
        let iov = libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        };
        if let Some(slot) = p.iovs.get_mut(n) {
            *slot = iov;
        } else {
            if p.more_iovs.is_empty() {
                p.more_iovs.extend_from_slice(&p.iovs);
            }
            p.more_iovs.push(iov);
        }
        n += 1;
        total = total.saturating_add(s.len() as u64);
    }
    p.iov_count = n;
    p.expect = total;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submits `entry` alone and returns its result.
    fn run_one(ring: &mut IoUring, entry: &squeue::Entry) -> i32 {
        // SAFETY: the entries of these tests name only 'static memory or none.
        unsafe { ring.submission().push(entry) }.expect("push");
        ring.submit_and_wait(1).expect("submit");
        ring.completion().next().expect("completion").result()
    }

    fn ring_or_skip() -> Option<IoUring> {
        match make_ring() {
            Ok(ring) => Some(ring),
            Err(e) => {
                eprintln!(
                    "SKIP: this kernel refuses io_uring rings ({e}); dev-blk would use its worker pool"
                );
                None
            }
        }
    }

    #[test]
    fn a_restricted_ring_refuses_every_operation_but_the_allowed_ones() {
        let Some(mut ring) = ring_or_skip() else {
            return;
        };
        // An open through the ring would bypass seccomp: the restriction refuses it.
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/".as_ptr())
            .flags(libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .build();
        assert_eq!(run_one(&mut ring, &open), -libc::EACCES);
        assert_eq!(
            run_one(&mut ring, &opcode::Nop::new().build()),
            -libc::EACCES
        );
        // An allowed operation with an SQE flag (a fixed file) is refused too.
        let fixed = opcode::Fsync::new(types::Fixed(0))
            .build()
            .flags(squeue::Flags::FIXED_FILE);
        assert_eq!(run_one(&mut ring, &fixed), -libc::EACCES);
        // An allowed operation on a held descriptor works.
        let file = tempfile::tempfile().expect("temp file");
        let fsync = opcode::Fsync::new(types::Fd(file.as_raw_fd())).build();
        assert_eq!(run_one(&mut ring, &fsync), 0);
        // No register operation is allowed once the ring is enabled.
        let err = ring
            .submitter()
            .register_files(&[file.as_raw_fd()])
            .expect_err("registering files on a restricted ring");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }

    #[test]
    fn the_policy_allows_submitting_to_rings_but_never_making_or_registering_them() {
        let rules: Vec<&str> = crate::SECCOMP_POLICY
            .lines()
            .filter_map(|l| l.split('#').next())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert!(rules.contains(&"io_uring_enter"));
        assert!(
            !rules
                .iter()
                .any(|r| r.starts_with("io_uring_setup") || r.starts_with("io_uring_register")),
            "{rules:?}"
        );
    }

    #[test]
    fn rings_are_made_only_when_the_environment_asks_for_them() {
        let wanted = wanted();
        let rings = make_rings(2);
        if wanted {
            assert!(!rings.is_empty() || make_ring().is_err());
        } else {
            assert!(rings.is_empty());
        }
    }
}
