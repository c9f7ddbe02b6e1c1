//! A small virtio split-ring driver that plays the guest for device-level tests: guest RAM in
//! a shared file, descriptor tables and rings written at chosen guest addresses, kicks and
//! interrupts through eventfds.
//!
//! Layout of one queue at `base` (virtio 1.2 §2.7): the descriptor table (16 bytes per entry),
//! then the available ring (`flags`, `idx`, `ring[size]`, `used_event`), then, 4-byte aligned,
//! the used ring (`flags`, `idx`, `ring[size]` of `{id: u32, len: u32}`, `avail_event`).
//!
//! Trusts: nothing it reads back from the device beyond what it asserts. Touches: its own
//! temporary files and eventfds.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use proto::device::{QueueConfig, ToDevice};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: device-writable.
pub const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// Guest RAM: a file in `/dev/shm` that the device maps `MAP_SHARED`, like the real memfd.
/// The driver maps it too (through `vm-memory`, so without `unsafe` here) and touches rings
/// and buffers with plain memory accesses, as a guest would.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// `size` bytes of zeroed RAM at guest address 0.
    pub fn new(size: u64) -> io::Result<GuestRam> {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let file = tempfile::tempfile_in(dir)?;
        file.set_len(size)?;
        let len = usize::try_from(size).map_err(io::Error::other)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(io::Error::other)?;
        Ok(GuestRam { file, mem, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The descriptor to hand to the device.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest RAM");
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("read guest RAM");
        buf
    }

    /// Stores a ring index with release ordering (entries written before it are visible first).
    pub fn store_u16(&self, addr: u64, v: u16) {
        self.mem
            .store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .expect("store guest RAM");
    }

    /// Loads a ring index with acquire ordering.
    pub fn load_u16(&self, addr: u64) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(addr), Ordering::Acquire)
                .expect("load guest RAM"),
        )
    }

    /// Fills `buf` from `addr`.
    pub fn read_into(&self, addr: u64, buf: &mut [u8]) {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .expect("read guest RAM");
    }

    pub fn write_u16(&self, addr: u64, v: u16) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn write_u32(&self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn read_u16(&self, addr: u64) -> u16 {
        let b = self.read(addr, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn read_u32(&self, addr: u64) -> u32 {
        let b = self.read(addr, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    pub fn read_u8(&self, addr: u64) -> u8 {
        self.read(addr, 1)[0]
    }
}

/// One buffer of a chain: guest address, length, and whether the device writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    pub fn out(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: false,
        }
    }

    pub fn input(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

/// One used-ring element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// The `Activate` the runner sends a device at the driver's `DRIVER_OK`, for `queues` (each
/// with its queue index) and `features`, and the descriptors that go with it: each queue's
/// kick eventfd, then its call eventfd, in the order of `queues`.
pub fn activation<'a>(
    features: u64,
    queues: impl IntoIterator<Item = (u16, &'a SplitQueue)>,
) -> (ToDevice, Vec<BorrowedFd<'a>>) {
    let mut configs = Vec::new();
    let mut fds = Vec::new();
    for (index, q) in queues {
        configs.push(QueueConfig {
            index,
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
        });
        fds.extend([q.kick.as_fd(), q.call.as_fd()]);
    }
    (
        ToDevice::Activate {
            features,
            queues: configs,
        },
        fds,
    )
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The eventfd the driver writes to notify the device.
    pub kick: EventFd,
    /// The eventfd the device writes to interrupt the driver.
    pub call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    event_idx: bool,
    /// The available index at the last [`SplitQueue::notify`].
    notified_at: u16,
    /// Notifications sent to the device so far.
    kicks: AtomicU64,
    /// Notifications received from the device so far (eventfd writes, as read back).
    interrupts: u64,
}

impl SplitQueue {
    /// Lays out a queue of `size` entries at `base` and zeroes its rings.
    pub fn new(ram: &GuestRam, base: u64, size: u16) -> io::Result<SplitQueue> {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let end = used + 6 + 8 * n;
        ram.write(
            base,
            &vec![0; usize::try_from(end - base).expect("ring size")],
        );
        Ok(SplitQueue {
            size,
            desc,
            avail,
            used,
            kick: EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?,
            call: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            event_idx: false,
            notified_at: 0,
            kicks: AtomicU64::new(0),
            interrupts: 0,
        })
    }

    /// Bytes the queue occupies from its base.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let used_off = (16 * n + 6 + 2 * n + 3) & !3;
        used_off + 6 + 8 * n
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn write_desc_at(
        ram: &GuestRam,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        ram.write(
            table + 16 * u64::from(i),
            &desc_bytes(addr, len, flags, next),
        );
    }

    /// Writes descriptor `i` of this queue's table.
    pub fn write_desc(&self, ram: &GuestRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        Self::write_desc_at(ram, self.desc, i, addr, len, flags, next);
    }

    /// Writes `bufs` as a chain on free descriptors and returns its head (not yet published).
    pub fn add_chain(&mut self, ram: &GuestRam, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        let count = u16::try_from(bufs.len()).expect("chain length");
        for (k, b) in bufs.iter().enumerate() {
            let i = (head + u16::try_from(k).expect("index")) % self.size;
            let last = k + 1 == bufs.len();
            let flags = if b.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(ram, i, b.addr, b.len, flags, (i + 1) % self.size);
        }
        self.next_desc = (head + count) % self.size;
        head
    }

    /// Puts `head` on the available ring and moves the available index past it.
    pub fn publish(&mut self, ram: &GuestRam, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        ram.write_u16(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.store_u16(self.avail + 2, self.avail_idx);
    }

    /// Writes any value into the available index (for malformed-ring tests).
    pub fn set_avail_idx_raw(&mut self, ram: &GuestRam, idx: u16) {
        self.avail_idx = idx;
        ram.store_u16(self.avail + 2, idx);
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated: [`SplitQueue::notify`] then kicks
    /// only when the device asked for it (§2.7.10).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Notifies the device of everything published since the last call, if it wants to know.
    pub fn notify(&mut self, ram: &GuestRam) {
        let (old, new) = (self.notified_at, self.avail_idx);
        self.notified_at = new;
        if !self.event_idx {
            self.kick();
            return;
        }
        // The index store must be visible before avail_event is read (the device does the
        // mirror image), or both sides could skip the notification.
        std::sync::atomic::fence(Ordering::SeqCst);
        let avail_event = ram.load_u16(self.used + 4 + 8 * u64::from(self.size));
        if new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.kick();
        }
    }

    /// Notifies the device unconditionally.
    pub fn kick(&self) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
        self.kick.write(1).expect("kick");
    }

    /// Notifications sent to the device so far.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }

    /// Notifications from the device the waits consumed so far (each eventfd write counts,
    /// also when several arrived before one wakeup).
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    /// Adds, publishes and kicks one chain; returns its head.
    pub fn submit(&mut self, ram: &GuestRam, bufs: &[Buf]) -> u16 {
        let head = self.add_chain(ram, bufs);
        self.publish(ram, head);
        self.kick();
        head
    }

    /// Writes `bufs` as a chain on descriptors `first..first + bufs.len()` (for callers that
    /// keep a fixed set of descriptors per request slot) and returns its head.
    pub fn add_chain_at(&mut self, ram: &GuestRam, first: u16, bufs: &[Buf]) -> u16 {
        // One write for the whole chain; short chains (every benchmark request) from the stack.
        let mut inline = [0u8; 16 * 4];
        let mut spilled = Vec::new();
        let table: &mut [u8] = if bufs.len() <= 4 {
            &mut inline[..16 * bufs.len()]
        } else {
            spilled.resize(16 * bufs.len(), 0);
            &mut spilled
        };
        for ((k, b), d) in bufs.iter().enumerate().zip(table.chunks_exact_mut(16)) {
            let i = first + u16::try_from(k).expect("index");
            let last = k + 1 == bufs.len();
            let flags = if b.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            d.copy_from_slice(&desc_bytes(b.addr, b.len, flags, i + 1));
        }
        ram.write(self.desc + 16 * u64::from(first), table);
        first
    }

    /// Waits until `n` more used elements arrived (each announced by an interrupt, with
    /// `used_event` kept current for `EVENT_IDX`), or `timeout` passed.
    pub fn wait_used(
        &mut self,
        ram: &GuestRam,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Used>, String> {
        self.collect_used(ram, n, n, timeout)
    }

    /// Waits for at least one used element and returns every one available.
    pub fn wait_some(&mut self, ram: &GuestRam, timeout: Duration) -> Result<Vec<Used>, String> {
        self.collect_used(ram, 1, usize::MAX, timeout)
    }

    fn collect_used(
        &mut self,
        ram: &GuestRam,
        min: usize,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Used>, String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            // used_event: interrupt me once you go past what I have seen.
            ram.store_u16(self.avail + 4 + 2 * u64::from(self.size), self.used_seen);
            // The device reads used_event after writing the used index; without a full fence
            // both sides could miss each other's write and the interrupt would never come.
            std::sync::atomic::fence(Ordering::SeqCst);
            let idx = ram.load_u16(self.used + 2);
            while self.used_seen != idx && got.len() < max {
                // The new elements up to the ring's end (or `max`) in one read, as a guest
                // reads just the elements it consumes.
                let first = self.used_seen % self.size;
                let ready = usize::from(idx.wrapping_sub(self.used_seen));
                let count = ready
                    .min(usize::from(self.size - first))
                    .min(max - got.len());
                let mut elems = [0u8; 8 * 32];
                let chunk = count.min(32);
                let bytes = &mut elems[..8 * chunk];
                ram.read_into(self.used + 4 + 8 * u64::from(first), bytes);
                for elem in bytes.chunks_exact(8) {
                    got.push(Used {
                        id: u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]),
                        len: u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]),
                    });
                }
                self.used_seen = self
                    .used_seen
                    .wrapping_add(u16::try_from(chunk).expect("chunk"));
            }
            if got.len() >= min {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "{} of {min} completions after {timeout:?} (used idx {idx})",
                    got.len()
                ));
            }
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            let mut fds = [PollFd::new(self.call.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(ms)).map_err(|e| e.to_string())? > 0
                && let Ok(n) = self.call.read()
            {
                self.interrupts += n;
            }
        }
    }
}

/// A split-ring descriptor as the device reads it (little endian).
fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}
