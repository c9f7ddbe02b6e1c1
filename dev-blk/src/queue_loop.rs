//! The workers of one virtqueue: each takes an available chain, runs its I/O, puts the
//! completion on the used ring and notifies the driver, then takes the next chain.
//!
//! ```text
//!  guest ──kick eventfd──▶ listening worker ─┐
//!                                            ├─ pop chain ─ preadv/pwritev into guest RAM ─ add_used
//!    ▲                    busy workers ──────┘                                                │
//!    └──────────────────────────────── call eventfd ◀──────────────────────────────────────────┘
//! ```
//!
//! A leader/follower pool per queue: the queue state (the `Queue`, the in-flight record, the
//! replay list) sits behind one mutex; a worker holds it only to pop a chain or to publish a
//! completion, never during I/O. At most one idle worker waits on the kick eventfd (the
//! listener); the other idle ones park on a condition variable. A worker that takes a chain
//! while idle workers are parked wakes one, so someone is always listening or taking the next
//! chain. Under load every worker goes from its completion straight to the next chain: one
//! blocking system call per request and no hand-off between threads (measured: the hand-offs
//! of a queue thread feeding a shared pool were most of dev-blk's CPU per request).
//!
//! Waking another thread — the driver through the call eventfd, a parked worker through the
//! condition variable — is decided under the lock and done after it is released, so the woken
//! thread does not find the lock still held (measured with `scripts/bench-blk.sh`, 4 KiB at
//! queue depth 32: 1.42-1.48 → 1.16-1.27 context switches per request for dev-blk and driver
//! together, 6.0-7.1 → 5.3-6.6 µs of dev-blk CPU per request). When several workers finish
//! their I/O together, only the last to publish asks `needs_notification`, which covers every
//! element added since it was last asked: one interrupt for the burst (0.19-0.22 → 0.13-0.17
//! interrupts per request).
//!
//! With `VIRTIO_RING_F_EVENT_IDX` notifications are suppressed both ways as §2.7.10 describes
//! (`virtio-queue` keeps `avail_event`/`used_event`). A broken ring (an avail index that jumps
//! more than the queue size, a broken chain, a used ring outside RAM) stops the queue and is
//! reported through `on_broken`: the device needs a reset.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::disk::Disk;
use crate::inflight::QueueLog;
use crate::request::{ChainError, Context, Request, execute, parse};

/// Worker threads per queue, so requests of one queue in flight at once. Measured with
/// `scripts/bench-blk.sh` (queue depth 32, `O_DIRECT`, 2 CPUs, a loaded machine): 8, 16 and 32
/// workers took 7.0-7.7, 6.6-6.8 and 8.9-9.9 µs of dev-blk CPU per 4 KiB request (the old queue
/// thread feeding a 12-thread pool: 9-11.4 µs); 16 also had the best 4 KiB ratios. Measured
/// again after notifications moved out of the lock: 16, 24 and 32 workers took 1.2, 1.7 and
/// 2.1 context switches and 5.3-6.2, 6.8-8.1 and 7.2-9.3 µs of dev-blk CPU per 4 KiB request.
/// With fewer workers than requests in flight the ring keeps a backlog, so a worker that
/// completes takes the next chain without anyone waking; with as many workers as requests,
/// every request costs a kick and a wakeup. (The host's own 4 KiB random reads on this disk
/// gained only ~5 % from 16 to 32 threads.) Waking as many parked workers as chains wait, all
/// at once, instead of each by the one before, changed nothing measurable at 16 or 32 workers
/// (interleaved runs, 9 rounds; 32 workers still took 15-17 µs per request against 8-12).
pub const WORKERS_PER_QUEUE: usize = 16;

/// The environment variable that overrides [`WORKERS_PER_QUEUE`] (1 to 64), for measuring.
pub const WORKERS_ENV: &str = "CAPVM_BLK_WORKERS";

/// Workers per queue: [`WORKERS_PER_QUEUE`] unless [`WORKERS_ENV`] names another count.
pub fn workers_per_queue() -> usize {
    crate::env_number(WORKERS_ENV, 1..=64, WORKERS_PER_QUEUE)
}

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;

/// Why a queue stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("ring access failed")]
    Ring(#[from] virtio_queue::Error),
    #[error("bad descriptor chain at head {head}")]
    Chain {
        head: u16,
        #[source]
        source: ChainError,
    },
    #[error("waiting for events failed")]
    Epoll(#[source] nix::errno::Errno),
    #[error("starting a queue worker failed")]
    Spawn(#[source] std::io::Error),
    #[error("setting up the replay of in-flight requests failed")]
    Scratch,
}

/// Told a queue's index and why it broke.
pub type BrokenHook = dyn Fn(u16, &QueueError) + Send + Sync;

/// What every queue of a device shares.
#[derive(Clone)]
pub struct Shared {
    pub mem: Arc<GuestMemoryMmap>,
    pub disk: Arc<dyn Disk>,
    pub ctx: Arc<Context>,
    /// Workers per queue (at least one).
    pub workers: usize,
    /// Called once, from a worker, when the queue breaks.
    pub on_broken: Arc<BrokenHook>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ctx", &self.ctx)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// A running queue: its workers.
#[derive(Debug)]
pub struct QueueHandle {
    core: Arc<Core>,
    threads: Vec<JoinHandle<()>>,
}

impl QueueHandle {
    /// Stops the workers after their current requests finished, and waits for them.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.core.lock().stopping = true;
        let _ = self.core.stop.write(1);
        self.core.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A queue's eventfds, its in-flight record, and the requests a predecessor left in flight.
#[derive(Debug)]
pub struct Rings {
    pub kick: OwnedFd,
    pub call: OwnedFd,
    pub log: QueueLog,
    /// Requests to run before any new chain: `(head, request)`, oldest first
    /// ([`replay_requests`]).
    pub replay: Vec<(u16, Request)>,
}

/// What the workers share; `state` is the only lock.
struct Core {
    index: u16,
    state: Mutex<State>,
    /// Parked workers wait here.
    wake: Condvar,
    /// The listener waits on the kick and stop eventfds.
    epoll: Epoll,
    kick: Mutex<File>,
    call: File,
    stop: EventFd,
    shared: Shared,
    /// Workers whose I/O ended and whose completion is not yet on the used ring.
    completing: AtomicUsize,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

struct State {
    queue: Queue,
    log: QueueLog,
    replay: VecDeque<(u16, Request)>,
    /// A worker waits on the kick eventfd.
    listening: bool,
    /// Workers parked on the condition variable.
    parked: usize,
    stopping: bool,
    broken: bool,
}

/// Starts serving `queue` (already configured and checked with `is_valid`) as queue `index`.
pub fn start(
    index: u16,
    queue: Queue,
    rings: Rings,
    shared: Shared,
) -> Result<QueueHandle, QueueError> {
    let Rings {
        kick,
        call,
        log,
        replay,
    } = rings;
    let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| QueueError::Spawn(e.into()))?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(QueueError::Epoll)?;
    epoll
        .add(&kick, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_KICK))
        .map_err(QueueError::Epoll)?;
    epoll
        .add(
            stop.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP),
        )
        .map_err(QueueError::Epoll)?;
    let workers = shared.workers.max(1);
    let core = Arc::new(Core {
        index,
        state: Mutex::new(State {
            queue,
            log,
            replay: replay.into(),
            listening: false,
            parked: 0,
            stopping: false,
            broken: false,
        }),
        wake: Condvar::new(),
        epoll,
        kick: Mutex::new(File::from(kick)),
        call: File::from(call),
        stop,
        shared,
        completing: AtomicUsize::new(0),
    });
    let mut handle = QueueHandle {
        core: Arc::clone(&core),
        threads: Vec::with_capacity(workers),
    };
    for n in 0..workers {
        let core = Arc::clone(&core);
        let thread = std::thread::Builder::new()
            .name(format!("blk-q{index}-{n}"))
            .stack_size(256 * 1024)
            .spawn(move || core.work())
            .map_err(QueueError::Spawn)?;
        handle.threads.push(thread);
    }
    Ok(handle)
}

/// A chain a worker took: its head and parsed request.
type Taken = (u16, Request);

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a worker panicked mid-update; the state is still the best
        // record there is, and the device reports the queue broken below if it is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One worker's life: take, run, complete, until the queue stops. The driver may have
    /// queued requests before the device was activated (or before a restarted device process
    /// came up): the first worker looks at the ring before waiting for a kick.
    fn work(&self) {
        let mut st = self.lock();
        // A notification this worker owes the driver: decided under the lock (the EVENT_IDX
        // state lives there), sent after it is released.
        let mut owed = false;
        loop {
            if st.stopping {
                return;
            }
            if !st.broken {
                match self.take(&mut st) {
                    Ok(Some(((head, req), wake))) => {
                        drop(st);
                        self.signal(&mut owed, wake);
                        let done =
                            execute(&req, &self.shared.mem, &*self.shared.disk, &self.shared.ctx);
                        self.completing.fetch_add(1, Ordering::AcqRel);
                        st = self.lock();
                        if st.stopping {
                            // After a reset the rings are no longer the driver's to read.
                            return;
                        }
                        match self.complete(&mut st, head, done.used_len) {
                            Ok(notify) => owed = notify,
                            Err(e) => self.broke(&mut st, &e),
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => self.broke(&mut st, &e),
                }
            }
            if owed {
                // Nothing to take: send the notification before waiting, then look again.
                drop(st);
                self.signal(&mut owed, false);
                st = self.lock();
                continue;
            }
            if st.listening {
                st.parked += 1;
                st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.parked -= 1;
                continue;
            }
            st.listening = true;
            drop(st);
            let waited = self.wait_for_kick();
            st = self.lock();
            st.listening = false;
            if let Err(e) = waited {
                self.broke(&mut st, &QueueError::Epoll(e));
            }
        }
    }

    /// Outside the lock: notifies the driver if `owed`, wakes a parked worker if `wake`.
    /// Both wake another thread, which then need not wait for the lock this one held.
    fn signal(&self, owed: &mut bool, wake: bool) {
        if std::mem::take(owed) {
            let _ = (&self.call).write(&1u64.to_ne_bytes());
        }
        if wake {
            self.wake.notify_one();
        }
    }

    /// The next request: a replayed one first, then a new chain from the ring; and whether
    /// to wake a parked worker (when this one leaves no listener behind or more chains wait).
    fn take(&self, st: &mut State) -> Result<Option<(Taken, bool)>, QueueError> {
        let taken = if let Some(r) = st.replay.pop_front() {
            Some(r)
        } else {
            self.pop(st)?
        };
        Ok(taken.map(|t| {
            let wake = st.parked > 0 && (!st.listening || self.more(st));
            (t, wake)
        }))
    }

    /// Pops the next new chain, re-enabling notifications when the ring is empty (and
    /// popping what arrived meanwhile, §2.7.10).
    fn pop(&self, st: &mut State) -> Result<Option<Taken>, QueueError> {
        pop_logged(&mut st.queue, &st.log, &self.shared.mem)
    }

    /// Whether chains or replays wait beyond the one just taken.
    fn more(&self, st: &State) -> bool {
        !st.replay.is_empty()
            || st
                .queue
                .avail_idx(&*self.shared.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != st.queue.next_avail())
    }

    /// Publishes `head`'s completion; returns whether the driver asked to be notified. When
    /// other workers finished their I/O and wait to publish theirs, the last of them decides
    /// for all: `needs_notification` looks at every used element added since it was last
    /// asked (§2.7.10), so a burst of completions costs the driver one interrupt.
    fn complete(&self, st: &mut State, head: u16, len: u32) -> Result<bool, QueueError> {
        let mem = &*self.shared.mem;
        // A read-modify-write sees every increment before it: `others` are workers that will
        // take the lock after this one and run this function.
        let others = self
            .completing
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        st.log.completing(head, st.queue.next_used());
        st.queue.add_used(mem, head, len)?;
        st.log.completed(head);
        if others > 0 {
            return Ok(false);
        }
        Ok(st.queue.needs_notification(mem)?)
    }

    fn broke(&self, st: &mut State, e: &QueueError) {
        if !st.broken {
            st.broken = true;
            (self.shared.on_broken)(self.index, e);
        }
    }

    /// Blocks until the driver kicks or the queue stops; consumes the kick (the kick eventfd
    /// may be blocking: it is read only when it is readable).
    fn wait_for_kick(&self) -> Result<(), nix::errno::Errno> {
        let mut events = [EpollEvent::empty(); 2];
        let n = loop {
            match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        };
        if events.iter().take(n).any(|e| e.data() == TOKEN_KICK) {
            let mut kick = self.kick.lock().unwrap_or_else(PoisonError::into_inner);
            drain_eventfd(&mut kick);
        }
        Ok(())
    }
}

/// Pops the next new chain and records it as taken in `log`, re-enabling notifications when
/// the ring is empty (and popping what arrived meanwhile, §2.7.10).
pub fn pop_logged(
    queue: &mut Queue,
    log: &QueueLog,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, Request)>, QueueError> {
    loop {
        queue.disable_notification(mem)?;
        let pos = queue.next_avail();
        if let Some((head, req)) = pop_request(queue, mem)? {
            log.taken(pos, head);
            return Ok(Some((head, req)));
        }
        if !queue.enable_notification(mem)? {
            return Ok(None);
        }
    }
}

/// Pops the next available chain and parses it; `Ok(None)` when the driver offered nothing
/// new.
pub fn pop_request(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, Request)>, QueueError> {
    // `iter` fails when the avail index moved more than the queue size (§2.7.6).
    let Some(chain) = queue.iter(mem)?.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    let req = parse(chain, mem).map_err(|source| QueueError::Chain { head, source })?;
    Ok(Some((head, req)))
}

/// The requests of `heads` (oldest first), walked from the descriptor table at `desc` of a
/// queue of `size` exactly as chains the driver offers are walked (same bounds, loops,
/// indirect tables), through a scratch avail ring outside guest RAM: the heads' own avail
/// slots may have been reused by the driver since they were taken.
pub fn replay_requests(
    mem: &GuestMemoryMmap,
    size: u16,
    desc: u64,
    heads: &[u16],
) -> Result<Vec<(u16, Request)>, QueueError> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion};
    /// The scratch avail ring's page and the (never written) used ring's page.
    const SCRATCH_BYTES: usize = 0x2000;
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let scratch_at = mem
        .last_addr()
        .0
        .checked_add(0x1000)
        .map(|a| a & !0xfff)
        .ok_or(QueueError::Scratch)?;
    let region = MmapRegion::new(SCRATCH_BYTES).map_err(|_| QueueError::Scratch)?;
    let region =
        GuestRegionMmap::new(region, GuestAddress(scratch_at)).ok_or(QueueError::Scratch)?;
    let view = mem
        .insert_region(Arc::new(region))
        .map_err(|_| QueueError::Scratch)?;
    let count = u16::try_from(heads.len()).map_err(|_| QueueError::Scratch)?;
    let avail = GuestAddress(scratch_at);
    let write = |at: u64, v: u16| {
        view.write_obj(v.to_le(), GuestAddress(scratch_at + at))
            .map_err(|_| QueueError::Scratch)
    };
    write(0, 0)?;
    write(2, count)?;
    for (i, &head) in heads.iter().enumerate() {
        write(4 + 2 * i as u64, head)?;
    }
    let mut queue = Queue::new(size).map_err(QueueError::Ring)?;
    queue.try_set_size(size).map_err(QueueError::Ring)?;
    queue
        .try_set_desc_table_address(GuestAddress(desc))
        .map_err(QueueError::Ring)?;
    queue
        .try_set_avail_ring_address(avail)
        .map_err(QueueError::Ring)?;
    queue
        .try_set_used_ring_address(GuestAddress(scratch_at + 0x1000))
        .map_err(QueueError::Ring)?;
    queue.set_ready(true);
    let mut out = Vec::with_capacity(heads.len());
    for chain in queue.iter(&view)? {
        let head = chain.head_index();
        // Buffers are checked against guest RAM alone: the scratch page is no guest memory.
        let req = parse(chain, mem).map_err(|source| QueueError::Chain { head, source })?;
        out.push((head, req));
    }
    Ok(out)
}

use child::drain_eventfd;

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // virtio's u32 flag constants fit u16
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + u64::from(i) * 16);
        mem.write_obj(Descriptor::new(addr, len, flags, next), at)
            .expect("descriptor");
    }

    /// A read of `sector` at head `head`: header, 512 data bytes, status.
    fn read_chain(mem: &GuestMemoryMmap, head: u16, sector: u64) {
        let hdr = 0x8000 + u64::from(head) * 0x100;
        mem.write_obj(0u32, GuestAddress(hdr)).expect("type");
        mem.write_obj(sector, GuestAddress(hdr + 8))
            .expect("sector");
        desc(mem, head, hdr, 16, NEXT, head + 1);
        desc(mem, head + 1, 0x2_0000, 512, WRITE | NEXT, head + 2);
        desc(mem, head + 2, hdr + 0x80, 1, WRITE, 0);
    }

    #[test]
    fn in_flight_heads_are_walked_from_the_descriptor_table_in_order() {
        let mem = mem();
        read_chain(&mem, 6, 42);
        read_chain(&mem, 0, 7);
        let replayed = replay_requests(&mem, 16, DESC, &[6, 0]).expect("replay");
        let got: Vec<(u16, u64)> = replayed
            .iter()
            .map(|(h, r)| (*h, r.header.expect("header").sector))
            .collect();
        assert_eq!(got, vec![(6, 42), (0, 7)]);
        assert!(
            replay_requests(&mem, 16, DESC, &[])
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_broken_in_flight_chain_is_an_error_not_a_walk_outside_the_table() {
        let mem = mem();
        // Head 4 loops onto itself.
        desc(&mem, 4, 0x8000, 16, NEXT, 4);
        assert!(matches!(
            replay_requests(&mem, 16, DESC, &[4]),
            Err(QueueError::Chain { head: 4, .. })
        ));
        // A head past the queue size is an empty chain.
        assert!(matches!(
            replay_requests(&mem, 16, DESC, &[40]),
            Err(QueueError::Chain {
                head: 40,
                source: ChainError::Empty
            })
        ));
    }
}
