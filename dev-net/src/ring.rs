//! The split rings as this device uses them (virtio 1.2 §2.7): popping and checking descriptor
//! chains, and a used ring that publishes several elements at once.
//!
//! ```text
//!   driver ── avail ring ──▶ pop(): chain → Chain { head, segments }   (or a Bad chain)
//!   driver ◀── used ring ─── UsedRing::push() … publish() → needs_interrupt()
//! ```
//!
//! Two kinds of faults. A chain whose *contents* are abusive — a descriptor pointing outside
//! RAM, a device-readable descriptor on the receive queue (or the reverse), too many
//! descriptors — is [`Popped::Bad`]: the caller returns it with length 0, counts it and serves
//! on. A ring that is *structurally* broken — the available index jumping more than the queue
//! size, a chain cut short by a loop or a `next` out of range, a bad indirect table, a used
//! ring outside RAM — is a [`RingError`]: the device needs a reset.
//!
//! `virtio-queue`'s `add_used` publishes every element on its own; a frame spread over several
//! receive buffers (`MRG_RXBUF`) must appear to the driver at once, so the used side is kept
//! here, with its own interrupt suppression (§2.7.7, §2.7.10).

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::MAX_QUEUE_SIZE;

/// Most descriptors one chain may have (direct or through an indirect table). Linux sends at
/// most `MAX_SKB_FRAGS + 2` (19); a longer chain is dropped.
pub const MAX_DESCRIPTORS: usize = 64;
/// Most descriptors walked to tell a long chain (dropped) from a loop (a broken ring): above
/// the largest queue, so every direct chain is walked to its end; an indirect table longer
/// than this is dropped unwalked.
pub const WALK_LIMIT: usize = 4096;
/// `VRING_AVAIL_F_NO_INTERRUPT`: without `EVENT_IDX`, the driver asks for no interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The ring is broken: the device needs a reset (§2.1.2).
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("reading the available ring failed")]
    Avail(#[from] virtio_queue::Error),
    #[error(
        "descriptor chain at head {0} is cut short: a loop, a next index out of range, an \
         unreadable descriptor or a bad indirect table"
    )]
    Truncated(u16),
    #[error("writing the used ring failed")]
    Used,
}

/// Why a chain is returned unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadChain {
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("a descriptor points outside guest memory")]
    OutsideMemory,
    #[error("a descriptor has the wrong direction for this queue")]
    Direction,
    #[error("the buffers add up to more than 4 GiB")]
    TooBig,
}

/// One guest buffer of a chain, inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A checked chain: every segment lies in guest RAM and has the queue's direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub segments: Vec<Segment>,
    /// Sum of the segment lengths.
    pub len: u32,
}

/// What [`pop`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Popped {
    Good(Chain),
    Bad { head: u16, why: BadChain },
}

/// Pops the next available chain of `queue` and checks it: all descriptors device-writable
/// (`writable`, the receive queue) or all device-readable (the transmit queue). `Ok(None)`
/// when the driver offered nothing new.
pub fn pop(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> Result<Option<Popped>, RingError> {
    // `iter` fails when the available index moved more than the queue size (§2.7.6).
    let Some(chain) = queue.iter(mem)?.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    check(head, chain, mem, writable).map(Some)
}

/// Checks the descriptors of the chain at `head`. `descriptors` is the chain as `virtio-queue`
/// yields it: it stops early, silently, on loops, out-of-range `next` indices, unreadable
/// descriptors and bad indirect tables, so a last descriptor that still says `NEXT` marks a
/// broken ring.
pub fn check(
    head: u16,
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> Result<Popped, RingError> {
    let mut segments = Vec::new();
    let mut len = 0u32;
    let mut bad = None;
    let mut last: Option<Descriptor> = None;
    for (n, d) in descriptors.enumerate() {
        last = Some(d);
        if n >= WALK_LIMIT {
            return Ok(Popped::Bad {
                head,
                why: BadChain::TooLong,
            });
        }
        if n >= MAX_DESCRIPTORS {
            // Walk on (without keeping anything) to see whether the chain ends or loops.
            bad = Some(BadChain::TooLong);
        }
        if bad.is_some() {
            continue;
        }
        // §2.7.4.2 and §5.1.6: receive buffers are device-writable, transmit ones readable.
        if d.is_write_only() != writable {
            bad = Some(BadChain::Direction);
            continue;
        }
        let Some(size) = usize::try_from(d.len()).ok() else {
            bad = Some(BadChain::OutsideMemory);
            continue;
        };
        if d.len() > 0 && !mem.check_range(d.addr(), size) {
            bad = Some(BadChain::OutsideMemory);
            continue;
        }
        let Some(sum) = len.checked_add(d.len()) else {
            bad = Some(BadChain::TooBig);
            continue;
        };
        len = sum;
        if d.len() > 0 {
            segments.push(Segment {
                addr: d.addr(),
                len: d.len(),
            });
        }
    }
    match last {
        None => return Err(RingError::Truncated(head)),
        Some(d) if d.has_next() => return Err(RingError::Truncated(head)),
        Some(_) => {}
    }
    Ok(match bad {
        Some(why) => Popped::Bad { head, why },
        None => Popped::Good(Chain {
            head,
            segments,
            len,
        }),
    })
}

/// A `Queue` for `c` of at most [`MAX_QUEUE_SIZE`] entries ([`child::guest_ram::build_queue`]).
pub fn build_queue(
    c: &proto::device::QueueConfig,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Queue, String> {
    child::guest_ram::build_queue(c, MAX_QUEUE_SIZE, event_idx, mem)
}

/// The device side of a used ring: elements are written with [`UsedRing::push`] and become
/// visible to the driver together at [`UsedRing::publish`].
#[derive(Debug)]
pub struct UsedRing {
    used: GuestAddress,
    avail: GuestAddress,
    size: u16,
    event_idx: bool,
    /// The next used index to write.
    next: Wrapping<u16>,
    /// The used index at the last interrupt decision.
    signalled: Wrapping<u16>,
}

impl UsedRing {
    /// The used ring of `queue` (already built with [`build_queue`]).
    pub fn new(queue: &Queue) -> UsedRing {
        UsedRing {
            used: GuestAddress(queue.used_ring()),
            avail: GuestAddress(queue.avail_ring()),
            size: queue.size(),
            event_idx: queue.event_idx_enabled(),
            next: Wrapping(queue.next_used()),
            signalled: Wrapping(queue.next_used()),
        }
    }

    /// Writes one element (not yet visible to the driver).
    pub fn push(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), RingError> {
        let slot = u64::from(self.next.0 % self.size.max(1));
        let addr = self.used.checked_add(4 + 8 * slot).ok_or(RingError::Used)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr).map_err(|_| RingError::Used)?;
        self.next += Wrapping(1);
        Ok(())
    }

    /// Makes every pushed element visible: the index store is ordered after the elements.
    pub fn publish(&self, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        let addr = self.used.checked_add(2).ok_or(RingError::Used)?;
        mem.store(self.next.0.to_le(), addr, Ordering::Release)
            .map_err(|_| RingError::Used)
    }

    /// Whether the driver wants an interrupt for what was published since the last call
    /// (§2.7.10 with `EVENT_IDX`, the `NO_INTERRUPT` flag without).
    pub fn needs_interrupt(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let (old, new) = (self.signalled, self.next);
        if old == new {
            return Ok(false);
        }
        self.signalled = new;
        // The index store must be visible before the driver's event is read, or both sides
        // could miss each other (the driver does the mirror image).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let offset = 4 + 2 * u64::from(self.size);
            let addr = self.avail.checked_add(offset).ok_or(RingError::Used)?;
            let used_event: u16 = mem
                .load(addr, Ordering::Relaxed)
                .map(u16::from_le)
                .map_err(|_| RingError::Used)?;
            Ok((new - Wrapping(used_event) - Wrapping(1)) < (new - old))
        } else {
            let flags: u16 = mem
                .load(self.avail, Ordering::Relaxed)
                .map(u16::from_le)
                .map_err(|_| RingError::Used)?;
            Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test constants are small
pub(crate) mod testing {
    //! A guest-side ring writer for the unit tests of this crate.

    use super::*;

    pub const QSIZE: u16 = 16;
    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    pub const RAM: u64 = 0x10_0000;
    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("memory")
    }

    pub fn queue(mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
        let c = proto::device::QueueConfig {
            index: 0,
            size: QSIZE,
            desc: DESC,
            avail: AVAIL,
            used: USED,
        };
        build_queue(&c, event_idx, mem).expect("queue")
    }

    pub fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(DESC + u64::from(i) * 16))
            .expect("descriptor");
    }

    /// Offers `head` at avail position `pos` and sets the avail index to `pos + 1`.
    pub fn offer(mem: &GuestMemoryMmap, pos: u16, head: u16) {
        let slot = u64::from(pos % QSIZE);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
            .expect("ring");
        mem.write_obj(pos.wrapping_add(1), GuestAddress(AVAIL + 2))
            .expect("idx");
    }

    pub fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).expect("used idx")
    }

    pub fn used_elem(mem: &GuestMemoryMmap, pos: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(pos % QSIZE);
        (
            mem.read_obj(GuestAddress(at)).expect("id"),
            mem.read_obj(GuestAddress(at + 4)).expect("len"),
        )
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data from small counters
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn a_good_chain_pops_with_its_segments() {
        let mem = mem();
        let mut q = queue(&mem, false);
        desc(&mem, 0, 0x8000, 100, WRITE | NEXT, 1);
        desc(&mem, 1, 0x9000, 0, WRITE | NEXT, 2);
        desc(&mem, 2, 0xa000, 28, WRITE, 0);
        offer(&mem, 0, 0);
        let Some(Popped::Good(c)) = pop(&mut q, &mem, true).expect("ring ok") else {
            panic!("expected a good chain");
        };
        assert_eq!((c.head, c.len, c.segments.len()), (0, 128, 2));
        assert_eq!(pop(&mut q, &mem, true).expect("ring ok"), None);
    }

    #[test]
    fn abusive_chains_are_bad_but_the_ring_is_fine() {
        let mem = mem();
        let mut q = queue(&mem, false);
        // Wrong direction for a receive queue.
        desc(&mem, 0, 0x8000, 100, 0, 0);
        // Outside RAM, and straddling its end.
        desc(&mem, 1, RAM + 0x1000, 100, WRITE, 0);
        desc(&mem, 2, RAM - 10, 100, WRITE, 0);
        for (pos, head) in [(0u16, 0u16), (1, 1), (2, 2)] {
            offer(&mem, pos, head);
            let popped = pop(&mut q, &mem, true).expect("ring ok");
            assert!(
                matches!(popped, Some(Popped::Bad { head: h, .. }) if h == head),
                "{popped:?}"
            );
        }
    }

    #[test]
    fn a_chain_longer_than_the_bound_is_bad() {
        let mem = mem();
        // An indirect table of 100 descriptors, each readable.
        let table = 0x4_0000u64;
        for i in 0..100u16 {
            let d = Descriptor::new(0x8000, 10, if i < 99 { NEXT } else { 0 }, i + 1);
            mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
                .expect("indirect");
        }
        let mut q = queue(&mem, false);
        desc(&mem, 0, table, 100 * 16, 4, 0);
        offer(&mem, 0, 0);
        assert_eq!(
            pop(&mut q, &mem, false).expect("ring ok"),
            Some(Popped::Bad {
                head: 0,
                why: BadChain::TooLong
            })
        );
    }

    #[test]
    fn loops_and_index_jumps_break_the_ring() {
        let mem = mem();
        let mut q = queue(&mem, false);
        desc(&mem, 0, 0x8000, 10, NEXT, 1);
        desc(&mem, 1, 0x8000, 10, NEXT, 0);
        offer(&mem, 0, 0);
        assert!(matches!(
            pop(&mut q, &mem, false),
            Err(RingError::Truncated(0))
        ));
        let mut q = queue(&mem, false);
        mem.write_obj(QSIZE + 5, GuestAddress(AVAIL + 2))
            .expect("idx");
        assert!(matches!(pop(&mut q, &mem, false), Err(RingError::Avail(_))));
    }

    #[test]
    fn pushed_elements_appear_only_at_publish() {
        let mem = mem();
        let q = queue(&mem, false);
        let mut used = UsedRing::new(&q);
        used.push(&mem, 3, 1500).expect("push");
        used.push(&mem, 4, 60).expect("push");
        assert_eq!(used_idx(&mem), 0);
        used.publish(&mem).expect("publish");
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used_elem(&mem, 0), (3, 1500));
        assert_eq!(used_elem(&mem, 1), (4, 60));
    }

    #[test]
    fn interrupts_follow_used_event_and_the_no_interrupt_flag() {
        let mem = mem();
        let q = queue(&mem, true);
        let mut used = UsedRing::new(&q);
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
        // The driver wants to hear once the device passes index 2.
        mem.write_obj(2u16, used_event).expect("used_event");
        used.push(&mem, 0, 1).expect("push");
        used.publish(&mem).expect("publish");
        assert!(!used.needs_interrupt(&mem).expect("check"), "idx 1");
        used.push(&mem, 1, 1).expect("push");
        used.push(&mem, 2, 1).expect("push");
        used.publish(&mem).expect("publish");
        assert!(used.needs_interrupt(&mem).expect("check"), "idx 3 passes 2");
        assert!(!used.needs_interrupt(&mem).expect("check"), "nothing new");

        let q = queue(&mem, false);
        let mut plain = UsedRing::new(&q);
        plain.push(&mem, 0, 1).expect("push");
        plain.publish(&mem).expect("publish");
        mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
            .expect("flags");
        assert!(!plain.needs_interrupt(&mem).expect("check"));
        mem.write_obj(0u16, GuestAddress(AVAIL)).expect("flags");
        plain.push(&mem, 1, 1).expect("push");
        plain.publish(&mem).expect("publish");
        assert!(plain.needs_interrupt(&mem).expect("check"));
    }
}
