//! The in-flight region: which requests each queue had taken from its avail ring and not yet
//! put on its used ring, kept in a memfd that outlives this process.
//!
//! The supervisor creates the region ([`FdRole::InflightRegion`], [`INFLIGHT_REGION_BYTES`])
//! once per disk and boot and hands the same memfd to every incarnation of the disk's dev-blk.
//! When an incarnation dies mid-request (a crash, a seccomp kill, SIGKILL), the next one gets
//! the same `Activate` from the runner, reads the region and resubmits the requests that were
//! in flight, in the order the driver offered them, before it takes new ones — so a request is
//! never lost, and one whose completion the guest already saw is not completed twice. (The
//! idea is vhost-user's in-flight tracking; the layout is capvm's own.)
//!
//! Layout: [`proto::device::MAX_QUEUES`] queue records of [`QUEUE_WORDS`] little-endian `u32`s:
//!
//! | word | meaning |
//! |---|---|
//! | 0 | [`LIVE`] while the queue is activated, 0 otherwise |
//! | 1 | queue size |
//! | 2..8 | descriptor table, avail ring, used ring addresses (low, high) |
//! | 8 | `last_avail`: the avail position after the last chain taken |
//! | 9 | the completion being published: [`PENDING`] ∣ head, or 0 |
//! | 10 | the used index before that completion |
//! | 16 + head | [`SLOT_INFLIGHT`] ∣ avail position the head was taken at, or 0 |
//!
//! Only the queue's own thread writes its record, in this order:
//! - taking a chain at avail position `p` with head `h`: slot `h` ← in flight at `p`, then
//!   `last_avail` ← `p + 1`. A death between the two leaves `p` to be taken again as new,
//!   which runs it once.
//! - completing head `h`: word 10 ← used index, word 9 ← pending `h`; the used element and used
//!   index are written to guest memory; slot `h` ← 0; word 9 ← 0. A death after the used index
//!   moved but before the slot was cleared is recognised by the pending record: the guest's used
//!   index is past word 10, so `h` is done.
//!
//! The region is as trusted as the process that wrote it (a compromised dev-blk already holds
//! the disk and guest RAM), but every value read back is bounded before use.
//!
//! [`FdRole::InflightRegion`]: proto::bootstrap::FdRole::InflightRegion

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use proto::device::{INFLIGHT_REGION_BYTES, MAX_QUEUES, QueueConfig};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::config::MAX_QUEUE_SIZE;

/// `u32` words per queue record: 16 header words and one slot per possible head.
pub const QUEUE_WORDS: u64 = 16 + MAX_QUEUE_SIZE as u64;
/// Word 0 of an activated queue's record ("CPVL").
pub const LIVE: u32 = 0x4350_564c;
/// Word 9's flag: a completion is being published.
pub const PENDING: u32 = 1 << 31;
/// A slot's flag: the head is in flight.
pub const SLOT_INFLIGHT: u32 = 1 << 31;

const _: () = assert!(
    (MAX_QUEUES as u64) * QUEUE_WORDS * 4 <= INFLIGHT_REGION_BYTES as u64,
    "the region the supervisor creates must hold every queue record"
);

/// Why the region could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("the in-flight region is {0} bytes, fewer than the {INFLIGHT_REGION_BYTES} needed")]
    TooSmall(u64),
    #[error("reading the in-flight region's size failed")]
    Stat(#[source] std::io::Error),
    #[error("mapping the in-flight region failed")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// The mapped region.
#[derive(Debug)]
pub struct Region {
    mem: GuestMemoryMmap,
    /// Whether it outlives this process (a memfd from the supervisor).
    shared: bool,
}

impl Region {
    /// Maps the supervisor's memfd, shared.
    pub fn map(fd: OwnedFd) -> Result<Region, InflightError> {
        let file = File::from(fd);
        let len = file.metadata().map_err(InflightError::Stat)?.len();
        if len < INFLIGHT_REGION_BYTES as u64 {
            return Err(InflightError::TooSmall(len));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            INFLIGHT_REGION_BYTES,
            Some(FileOffset::new(file, 0)),
        )])?;
        Ok(Region { mem, shared: true })
    }

    /// A private region, for a device started without one: nothing survives this process,
    /// so a restart resumes from the used index alone.
    pub fn private() -> Result<Region, InflightError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), INFLIGHT_REGION_BYTES)])?;
        Ok(Region { mem, shared: false })
    }

    /// Whether the region outlives this process.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Marks every queue inactive (the driver reset the device).
    pub fn deactivate_all(self: &Arc<Self>) {
        for q in 0..MAX_QUEUES {
            QueueLog::new(Arc::clone(self), q).deactivate();
        }
    }
}

/// What a queue resumes with after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Where new chains begin in the avail ring.
    pub last_avail: u16,
    /// `(avail position, head)` of every request to run again, oldest first. They are
    /// replayed by head (their avail ring slots may have been reused since).
    pub inflight: Vec<(u16, u16)>,
}

/// One queue's record.
#[derive(Debug, Clone)]
pub struct QueueLog {
    region: Arc<Region>,
    base: u64,
}

impl QueueLog {
    /// The record of queue `index` (clamped to the last record).
    pub fn new(region: Arc<Region>, index: u16) -> QueueLog {
        let index = u64::from(index.min(MAX_QUEUES - 1));
        QueueLog {
            region,
            base: index * QUEUE_WORDS * 4,
        }
    }

    fn load(&self, word: u64) -> u32 {
        self.region
            .mem
            .load(GuestAddress(self.base + word * 4), Ordering::Acquire)
            .unwrap_or(0)
    }

    fn store(&self, word: u64, value: u32) {
        // In bounds by construction (the const assertion above); a failure would only mean
        // a lost record, never memory outside the region.
        let _ = self
            .region
            .mem
            .store(value, GuestAddress(self.base + word * 4), Ordering::Release);
    }

    fn slot(head: u16) -> u64 {
        16 + u64::from(head)
    }

    fn addresses(c: &QueueConfig) -> [u32; 6] {
        let split = |a: u64| {
            let [b0, b1, b2, b3, b4, b5, b6, b7] = a.to_le_bytes();
            [
                u32::from_le_bytes([b0, b1, b2, b3]),
                u32::from_le_bytes([b4, b5, b6, b7]),
            ]
        };
        let [d0, d1] = split(c.desc);
        let [a0, a1] = split(c.avail);
        let [u0, u1] = split(c.used);
        [d0, d1, a0, a1, u0, u1]
    }

    /// Whether the record describes these rings and is live.
    fn matches(&self, c: &QueueConfig) -> bool {
        self.load(0) == LIVE
            && self.load(1) == u32::from(c.size)
            && Self::addresses(c)
                .iter()
                .zip(2u64..)
                .all(|(&v, w)| self.load(w) == v)
    }

    /// Starts a fresh record for `c`: nothing in flight, chains taken from position `start`.
    pub fn begin(&self, c: &QueueConfig, start: u16) {
        self.store(0, 0);
        for head in 0..MAX_QUEUE_SIZE {
            self.store(Self::slot(head), 0);
        }
        self.store(1, u32::from(c.size));
        for (v, w) in Self::addresses(c).iter().zip(2u64..) {
            self.store(w, *v);
        }
        self.store(8, u32::from(start));
        self.store(9, 0);
        self.store(10, 0);
        self.store(0, LIVE);
    }

    /// If the record is live for the same rings, what to resume with, given the used index
    /// in guest memory; else `None` (a fresh activation).
    pub fn resume(&self, c: &QueueConfig, guest_used: u16) -> Option<Resume> {
        if !self.region.shared || !self.matches(c) {
            return None;
        }
        let pending = self.load(9);
        if pending & PENDING != 0 {
            let head = (pending & 0xffff) as u16;
            let before = (self.load(10) & 0xffff) as u16;
            // The used index moved past the pending completion: the guest may have seen it.
            if head < c.size && guest_used != before {
                self.store(Self::slot(head), 0);
            }
            self.store(9, 0);
        }
        let last_avail = (self.load(8) & 0xffff) as u16;
        let mut inflight: Vec<(u16, u16)> = (0..c.size)
            .filter_map(|head| {
                let slot = self.load(Self::slot(head));
                (slot & SLOT_INFLIGHT != 0).then_some(((slot & 0xffff) as u16, head))
            })
            // A slot taken at `last_avail` itself was recorded before `last_avail` moved past
            // it: that chain is taken again as new, so it is not replayed. Any older position
            // may still be in flight, however far back: completions come out of order, and one
            // slow request can sit while the driver cycles the rest of the ring many times.
            .filter(|&(pos, _)| pos != last_avail)
            .collect();
        inflight.sort_by_key(|&(pos, _)| std::cmp::Reverse(last_avail.wrapping_sub(pos)));
        Some(Resume {
            last_avail,
            inflight,
        })
    }

    /// Records that the chain at avail position `pos` with `head` was taken.
    pub fn taken(&self, pos: u16, head: u16) {
        self.store(Self::slot(head), SLOT_INFLIGHT | u32::from(pos));
        self.store(8, u32::from(pos.wrapping_add(1)));
    }

    /// Records that the completion of `head` is about to be published at used index
    /// `used_before`.
    pub fn completing(&self, head: u16, used_before: u16) {
        self.store(10, u32::from(used_before));
        self.store(9, PENDING | u32::from(head));
    }

    /// Records that the completion of `head` is published.
    pub fn completed(&self, head: u16) {
        self.store(Self::slot(head), 0);
        self.store(9, 0);
    }

    /// Marks the queue inactive.
    pub fn deactivate(&self) {
        self.store(0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_region() -> Arc<Region> {
        let fd = nix::sys::memfd::memfd_create(c"inflight", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let file = File::from(fd);
        file.set_len(INFLIGHT_REGION_BYTES as u64).expect("size");
        Arc::new(Region::map(file.into()).expect("map"))
    }

    fn config() -> QueueConfig {
        QueueConfig {
            index: 0,
            size: 8,
            desc: 0x1_0000_1000,
            avail: 0x2000,
            used: 0x3000,
        }
    }

    #[test]
    fn a_fresh_record_has_nothing_to_replay_and_other_rings_start_fresh() {
        let log = QueueLog::new(shared_region(), 0);
        assert_eq!(log.resume(&config(), 0), None, "never activated");
        log.begin(&config(), 0);
        assert_eq!(
            log.resume(&config(), 0),
            Some(Resume {
                last_avail: 0,
                inflight: vec![]
            })
        );
        let mut other = config();
        other.desc += 0x1000;
        assert_eq!(log.resume(&other, 0), None, "other rings");
        log.deactivate();
        assert_eq!(log.resume(&config(), 0), None, "after a reset");
    }

    #[test]
    fn in_flight_heads_replay_oldest_first_across_the_index_wrap() {
        let log = QueueLog::new(shared_region(), 3);
        log.begin(&config(), 65533);
        log.taken(65533, 4);
        log.taken(65534, 1);
        log.taken(65535, 6);
        log.taken(0, 2);
        // 65534 completes (out of order); the rest stay in flight.
        log.completing(1, 65533);
        log.completed(1);
        let r = log.resume(&config(), 65534).expect("resume");
        assert_eq!(r.last_avail, 1);
        assert_eq!(r.inflight, vec![(65533, 4), (65535, 6), (0, 2)]);
    }

    #[test]
    fn a_completion_the_guest_saw_is_not_replayed_but_an_unpublished_one_is() {
        let log = QueueLog::new(shared_region(), 0);
        log.begin(&config(), 0);
        log.taken(0, 5);
        log.taken(1, 3);
        // Died after the used index moved to 1, before the slot was cleared.
        log.completing(5, 0);
        let r = log.resume(&config(), 1).expect("resume");
        assert_eq!(r.inflight, vec![(1, 3)]);
        // Died before the used index moved: head 3 is still in flight and replays.
        log.completing(3, 1);
        let r = log.resume(&config(), 1).expect("resume");
        assert_eq!(r.inflight, vec![(1, 3)]);
    }

    #[test]
    fn a_slow_request_far_behind_is_still_replayed_and_heads_past_the_size_are_not() {
        let log = QueueLog::new(shared_region(), 0);
        log.begin(&config(), 100);
        // Taken at 100 and still running while the driver went round the ring many times.
        log.taken(100, 0);
        for pos in 101..5000u16 {
            log.taken(pos, 1);
            log.completing(1, pos);
            log.completed(1);
        }
        // A slot past the queue size (a corrupt region) is never looked at.
        log.store(QueueLog::slot(200), SLOT_INFLIGHT | 0x64);
        let r = log.resume(&config(), 4899).expect("resume");
        assert_eq!(r.last_avail, 5000);
        assert_eq!(r.inflight, vec![(100, 0)]);
    }

    #[test]
    fn a_chain_recorded_but_not_yet_counted_is_taken_again_not_replayed() {
        let log = QueueLog::new(shared_region(), 0);
        log.begin(&config(), 7);
        // Died between the slot store and the last_avail store of `taken(7, 2)`.
        log.store(QueueLog::slot(2), SLOT_INFLIGHT | 7);
        let r = log.resume(&config(), 7).expect("resume");
        assert_eq!((r.last_avail, r.inflight), (7, vec![]));
    }

    #[test]
    fn a_private_region_never_resumes() {
        let log = QueueLog::new(Arc::new(Region::private().expect("private")), 0);
        log.begin(&config(), 0);
        log.taken(0, 1);
        assert_eq!(log.resume(&config(), 0), None);
    }

    #[test]
    fn a_short_memfd_is_refused() {
        let fd = nix::sys::memfd::memfd_create(c"short", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let file = File::from(fd);
        file.set_len(4096).expect("size");
        assert!(matches!(
            Region::map(file.into()),
            Err(InflightError::TooSmall(4096))
        ));
    }
}
