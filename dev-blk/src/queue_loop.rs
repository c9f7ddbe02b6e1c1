//! One thread per virtqueue: wait for a kick, pop available chains, parse them, hand them to
//! the I/O pool, put completions on the used ring and notify the driver.
//!
//! ```text
//!  guest ──kick eventfd──▶ queue thread ──Job──▶ pool worker (preadv/pwritev into guest RAM)
//!    ▲                          │  ▲                    │
//!    └──────call eventfd────────┘  └──done eventfd──────┘ (head, used length)
//! ```
//!
//! Only the queue thread touches the rings, so no lock guards the `Queue`. With
//! `VIRTIO_RING_F_EVENT_IDX` notifications are suppressed both ways as §2.7.10 describes
//! (`virtio-queue` keeps `avail_event`/`used_event`). A broken ring (an avail index that jumps
//! more than the queue size, a broken chain, a used ring outside RAM) stops the queue and is
//! reported through `on_broken`: the device needs a reset.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::disk::Disk;
use crate::inflight::QueueLog;
use crate::pool::Pool;
use crate::request::{ChainError, Context, Request, execute, parse};

/// Requests of one queue in the pool at once; the queue stops popping chains at this depth
/// and resumes as they complete.
pub const MAX_INFLIGHT: usize = 128;

const TOKEN_KICK: u64 = 0;
const TOKEN_DONE: u64 = 1;
const TOKEN_STOP: u64 = 2;

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
    #[error("the I/O pool is gone")]
    Pool(#[from] crate::pool::PoolError),
    #[error("waiting for events failed")]
    Epoll(#[source] nix::errno::Errno),
    #[error("starting the queue thread failed")]
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
    pub pool: Arc<Pool>,
    /// Called once, from the queue thread, when the queue breaks.
    pub on_broken: Arc<BrokenHook>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

/// A running queue thread.
#[derive(Debug)]
pub struct QueueHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl QueueHandle {
    /// Stops the thread after its in-flight requests finished, and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
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
    let stop_theirs = stop
        .as_fd()
        .try_clone_to_owned()
        .map_err(QueueError::Spawn)?;
    let done = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| QueueError::Spawn(e.into()))?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(QueueError::Epoll)?;
    epoll
        .add(&kick, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_KICK))
        .map_err(QueueError::Epoll)?;
    epoll
        .add(&done, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_DONE))
        .map_err(QueueError::Epoll)?;
    epoll
        .add(
            &stop_theirs,
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP),
        )
        .map_err(QueueError::Epoll)?;
    let (done_tx, done_rx) = channel();
    let mut worker = Worker {
        index,
        queue,
        kick: File::from(kick),
        call: File::from(call),
        done: Arc::new(Doorbell {
            evt: done,
            pending: AtomicBool::new(false),
        }),
        done_tx,
        done_rx,
        inflight: 0,
        log,
        replay,
        shared,
    };
    let thread = std::thread::Builder::new()
        .name(format!("blk-queue-{index}"))
        .stack_size(256 * 1024)
        .spawn(move || {
            let _stop = stop_theirs;
            worker.serve(&epoll);
        })
        .map_err(QueueError::Spawn)?;
    Ok(QueueHandle {
        stop,
        thread: Some(thread),
    })
}

/// The completion wake-up: one eventfd write per batch of completions rather than per
/// request (each write is a wake-up of the queue thread).
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

struct Doorbell {
    evt: EventFd,
    /// A write is outstanding that the queue thread has not consumed yet.
    pending: AtomicBool,
}

impl Doorbell {
    fn ring(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            let _ = self.evt.write(1);
        }
    }
}

struct Worker {
    index: u16,
    queue: Queue,
    kick: File,
    call: File,
    done: Arc<Doorbell>,
    done_tx: Sender<(u16, u32)>,
    done_rx: Receiver<(u16, u32)>,
    inflight: usize,
    log: QueueLog,
    replay: Vec<(u16, Request)>,
    shared: Shared,
}

impl Worker {
    fn serve(&mut self, epoll: &Epoll) {
        let mut broken = false;
        let mut events = [EpollEvent::empty(); 3];
        // The driver may have queued requests before the device was activated (or before a
        // restarted device process came up): the first step runs without waiting for a kick.
        let mut ready = [false; 3];
        for (head, req) in std::mem::take(&mut self.replay) {
            if let Err(e) = self.submit(head, req) {
                broken = true;
                (self.shared.on_broken)(self.index, &e);
                break;
            }
        }
        loop {
            if ready[2] {
                self.drain_inflight();
                return;
            }
            if ready[0] {
                drain_eventfd(&mut self.kick);
            }
            if ready[1] {
                // Consume the ring, then clear the flag, then (in `step`) drain: a worker that
                // finishes after the clear rings again, one that finished before it is drained.
                // (Clearing before the read could swallow a ring and leave the flag set.)
                let _ = self.done.evt.read();
                self.done.pending.store(false, Ordering::SeqCst);
            }
            if !broken && let Err(e) = self.step() {
                broken = true;
                (self.shared.on_broken)(self.index, &e);
            }
            ready = [false; 3];
            let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    (self.shared.on_broken)(self.index, &QueueError::Epoll(e));
                    self.drain_inflight();
                    return;
                }
            };
            for ev in events.iter().take(n) {
                if let Some(r) = usize::try_from(ev.data())
                    .ok()
                    .and_then(|i| ready.get_mut(i))
                {
                    *r = true;
                }
            }
        }
    }

    /// Retires completions, then pops new chains up to the in-flight bound.
    fn step(&mut self) -> Result<(), QueueError> {
        let mem = Arc::clone(&self.shared.mem);
        let mut used = false;
        while let Ok((head, len)) = self.done_rx.try_recv() {
            self.inflight = self.inflight.saturating_sub(1);
            self.log.completing(head, self.queue.next_used());
            self.queue.add_used(&*mem, head, len)?;
            self.log.completed(head);
            used = true;
        }
        if used && self.queue.needs_notification(&*mem)? {
            let _ = self.call.write(&1u64.to_ne_bytes());
        }
        loop {
            self.queue.disable_notification(&*mem)?;
            while self.inflight < MAX_INFLIGHT {
                let pos = self.queue.next_avail();
                let Some((head, req)) = pop_request(&mut self.queue, &mem)? else {
                    break;
                };
                self.log.taken(pos, head);
                self.submit(head, req)?;
            }
            if self.inflight >= MAX_INFLIGHT {
                // Completions wake the thread and pop the rest.
                return Ok(());
            }
            // Re-enabling reports whether chains arrived meanwhile (§2.7.10).
            if !self.queue.enable_notification(&*mem)? {
                return Ok(());
            }
        }
    }

    /// Hands `req` to the I/O pool; its completion comes back through `done`.
    fn submit(&mut self, head: u16, req: Request) -> Result<(), QueueError> {
        self.inflight += 1;
        let (m, disk, ctx) = (
            Arc::clone(&self.shared.mem),
            Arc::clone(&self.shared.disk),
            Arc::clone(&self.shared.ctx),
        );
        let (tx, done) = (self.done_tx.clone(), Arc::clone(&self.done));
        self.shared.pool.submit(Box::new(move || {
            let c = execute(&req, &m, &*disk, &ctx);
            let _ = tx.send((head, c.used_len));
            done.ring();
        }))?;
        Ok(())
    }

    /// Waits for this queue's requests still in the pool; their buffers belong to the guest
    /// again only once they are done.
    fn drain_inflight(&mut self) {
        while self.inflight > 0 {
            if self.done_rx.recv().is_err() {
                return;
            }
            self.inflight -= 1;
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

fn drain_eventfd(f: &mut File) {
    let mut buf = [0u8; 8];
    let _ = f.read(&mut buf);
}

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
