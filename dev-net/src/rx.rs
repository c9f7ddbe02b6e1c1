//! The receive queue: one frame from the tap (virtio header + Ethernet frame) into the guest's
//! receive buffers (virtio 1.2 §5.1.6.3, §5.1.6.4).
//!
//! Chains popped from the ring wait in a small stash until a frame uses them, so a frame that
//! does not fit the buffers at hand is never half-written: it waits, with the chains it would
//! use, until the driver adds more. With `MRG_RXBUF` a frame spans as many chains as it needs
//! and `num_buffers` says how many; without it, a frame must fit one chain or is dropped.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::config::Negotiated;
use crate::header::{HEADER_LEN, NetHeader};
use crate::ring::{Chain, Popped, RingError, UsedRing, pop};

/// What became of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into `buffers` chains and published.
    Delivered { buffers: u16 },
    /// The buffers at hand are too few: keep the frame and wait for the driver.
    NoBuffers,
    /// The frame cannot be delivered (larger than every buffer the driver can offer, or
    /// shorter than a virtio header); it is gone, the buffers stay.
    Dropped,
}

/// Counters of the receive side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxStats {
    pub frames: u64,
    pub bytes: u64,
    /// Frames that did not fit the buffers the driver can offer.
    pub too_big: u64,
    /// Chains returned unused: outside RAM, wrong direction, too long, smaller than a header.
    pub bad_chains: u64,
}

/// The receive queue of an active device.
#[derive(Debug)]
pub struct RxQueue {
    pub queue: Queue,
    pub used: UsedRing,
    stash: VecDeque<Chain>,
    stash_bytes: u64,
    pub stats: RxStats,
}

impl RxQueue {
    pub fn new(queue: Queue) -> RxQueue {
        RxQueue {
            used: UsedRing::new(&queue),
            queue,
            stash: VecDeque::new(),
            stash_bytes: 0,
            stats: RxStats::default(),
        }
    }

    /// Whether a buffer is at hand (stashed or offered on the ring).
    pub fn has_buffers(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        if self.stash.is_empty() {
            self.pop_one(mem)?;
        }
        Ok(!self.stash.is_empty())
    }

    /// Pops one good chain into the stash, returning bad ones on the way; false when the ring
    /// is empty.
    fn pop_one(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        loop {
            match pop(&mut self.queue, mem, true)? {
                None => return Ok(false),
                // §5.1.6.3.1: every receive buffer holds at least a virtio header.
                Some(Popped::Good(c)) if c.len as usize >= HEADER_LEN => {
                    self.stash_bytes = self.stash_bytes.saturating_add(u64::from(c.len));
                    self.stash.push_back(c);
                    return Ok(true);
                }
                Some(Popped::Good(Chain { head, .. }) | Popped::Bad { head, .. }) => {
                    self.stats.bad_chains = self.stats.bad_chains.saturating_add(1);
                    self.used.push(mem, head, 0)?;
                    self.used.publish(mem)?;
                }
            }
        }
    }

    /// Delivers `packet` (a 12-byte virtio header from the tap, then the frame).
    pub fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        packet: &[u8],
        neg: &Negotiated,
    ) -> Result<RxOutcome, RingError> {
        let (Some(raw), Some(frame)) = (packet.get(..HEADER_LEN), packet.get(HEADER_LEN..)) else {
            return Ok(RxOutcome::Dropped);
        };
        let mut raw_hdr = [0u8; HEADER_LEN];
        raw_hdr.copy_from_slice(raw);
        let mut hdr = NetHeader::decode(&raw_hdr);
        if !neg.guest_csum {
            // §5.1.6.3.1: without GUEST_CSUM the flags are zero (the tap checksummed the frame).
            hdr.flags = 0;
        }
        let need = packet.len() as u64;
        let count = if neg.mergeable {
            while self.stash_bytes < need {
                if !self.pop_one(mem)? {
                    // A frame larger than a whole ring of buffers never fits.
                    if self.stash.len() >= usize::from(self.queue.size()) {
                        return Ok(self.too_big());
                    }
                    return Ok(RxOutcome::NoBuffers);
                }
            }
            let mut sum = 0u64;
            let mut count = 0usize;
            for c in &self.stash {
                sum = sum.saturating_add(u64::from(c.len));
                count += 1;
                if sum >= need {
                    break;
                }
            }
            count
        } else {
            if !self.has_buffers(mem)? {
                return Ok(RxOutcome::NoBuffers);
            }
            if self.stash.front().is_none_or(|c| u64::from(c.len) < need) {
                return Ok(self.too_big());
            }
            1
        };
        // §5.1.6.4: num_buffers is 1 without MRG_RXBUF.
        hdr.num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        let header = hdr.encode();
        let mut rest: &[u8] = frame;
        let mut first = true;
        for _ in 0..count {
            let Some(chain) = self.stash.pop_front() else {
                break;
            };
            self.stash_bytes = self.stash_bytes.saturating_sub(u64::from(chain.len));
            let head_part: &[u8] = if first { &header[..] } else { &[] };
            first = false;
            let written = fill(mem, &chain, head_part, &mut rest)?;
            self.used.push(mem, chain.head, written)?;
        }
        self.used.publish(mem)?;
        self.stats.frames = self.stats.frames.saturating_add(1);
        self.stats.bytes = self.stats.bytes.saturating_add(frame.len() as u64);
        Ok(RxOutcome::Delivered {
            buffers: hdr.num_buffers,
        })
    }

    fn too_big(&mut self) -> RxOutcome {
        self.stats.too_big = self.stats.too_big.saturating_add(1);
        RxOutcome::Dropped
    }
}

/// Writes `head` and then as much of `rest` as fits into `chain`; advances `rest` and returns
/// the bytes written.
fn fill<'a>(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    head: &'a [u8],
    rest: &mut &'a [u8],
) -> Result<u32, RingError> {
    let mut written = 0u32;
    let mut head = head;
    for seg in &chain.segments {
        let mut room = seg.len as usize;
        let mut addr = seg.addr;
        for src in [&mut head, &mut *rest] {
            let n = room.min(src.len());
            if n == 0 {
                continue;
            }
            let (now, later) = src.split_at(n);
            // The segment was checked to lie in RAM when it was popped.
            mem.write_slice(now, addr).map_err(|_| RingError::Used)?;
            *src = later;
            room -= n;
            addr = addr.checked_add(n as u64).ok_or(RingError::Used)?;
            written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
        if head.is_empty() && rest.is_empty() {
            break;
        }
    }
    Ok(written)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data from small counters
mod tests {
    use super::*;
    use crate::config::{bit, features};
    use crate::ring::testing::*;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    use vm_memory::GuestAddress;

    fn packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; HEADER_LEN];
        p[0] = 2; // DATA_VALID from the tap
        p.extend((0..len).map(|i| (i % 251) as u8));
        p
    }

    fn neg(mergeable: bool) -> Negotiated {
        let f = if mergeable {
            features(1)
        } else {
            features(1) & !bit(VIRTIO_NET_F_MRG_RXBUF)
        };
        Negotiated::from_features(f)
    }

    /// Offers `n` one-descriptor chains of `len` bytes at 0x10000 + i * 0x1000.
    fn offer_buffers(mem: &GuestMemoryMmap, first: u16, n: u16, len: u32) {
        for i in first..first + n {
            desc(mem, i, 0x1_0000 + u64::from(i) * 0x1000, len, WRITE, 0);
            offer(mem, i, i);
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        mem.read_slice(&mut b, GuestAddress(addr)).expect("read");
        b
    }

    #[test]
    fn a_large_frame_spans_merged_buffers_with_num_buffers() {
        let mem = mem();
        let mut rx = RxQueue::new(queue(&mem, true));
        offer_buffers(&mem, 0, 8, 1024);
        let p = packet(3000);
        assert_eq!(
            rx.deliver(&mem, &p, &neg(true)).expect("ring ok"),
            RxOutcome::Delivered { buffers: 3 }
        );
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(used_elem(&mem, 0), (0, 1024));
        assert_eq!(used_elem(&mem, 2), (2, 3012 - 2048));
        let first = read(&mem, 0x1_0000, 1024);
        assert_eq!(&first[10..12], &3u16.to_le_bytes());
        assert_eq!(first[0], 2, "flags kept with GUEST_CSUM");
        let mut got = first[HEADER_LEN..].to_vec();
        got.extend(read(&mem, 0x1_1000, 1024));
        got.extend(read(&mem, 0x1_2000, 3012 - 2048));
        assert_eq!(got, p[HEADER_LEN..]);
    }

    #[test]
    fn a_frame_waits_for_buffers_without_using_any() {
        let mem = mem();
        let mut rx = RxQueue::new(queue(&mem, true));
        offer_buffers(&mem, 0, 2, 1024);
        let p = packet(3000);
        assert_eq!(
            rx.deliver(&mem, &p, &neg(true)).expect("ring ok"),
            RxOutcome::NoBuffers
        );
        assert_eq!(used_idx(&mem), 0);
        offer_buffers(&mem, 2, 1, 1024);
        assert_eq!(
            rx.deliver(&mem, &p, &neg(true)).expect("ring ok"),
            RxOutcome::Delivered { buffers: 3 }
        );
    }

    #[test]
    fn a_frame_larger_than_the_whole_ring_is_dropped() {
        let mem = mem();
        let mut rx = RxQueue::new(queue(&mem, true));
        offer_buffers(&mem, 0, QSIZE, 64);
        assert_eq!(
            rx.deliver(&mem, &packet(5000), &neg(true))
                .expect("ring ok"),
            RxOutcome::Dropped
        );
        assert_eq!(rx.stats.too_big, 1);
        // The buffers serve the next frame.
        assert_eq!(
            rx.deliver(&mem, &packet(100), &neg(true)).expect("ring ok"),
            RxOutcome::Delivered { buffers: 2 }
        );
    }

    #[test]
    fn without_mergeable_buffers_a_frame_needs_one_chain() {
        let mem = mem();
        let mut rx = RxQueue::new(queue(&mem, false));
        offer_buffers(&mem, 0, 2, 1024);
        assert_eq!(
            rx.deliver(&mem, &packet(2000), &neg(false))
                .expect("ring ok"),
            RxOutcome::Dropped
        );
        let mut n = neg(false);
        n.guest_csum = false;
        assert_eq!(
            rx.deliver(&mem, &packet(500), &n).expect("ring ok"),
            RxOutcome::Delivered { buffers: 1 }
        );
        let hdr = read(&mem, 0x1_0000, HEADER_LEN);
        assert_eq!(hdr[0], 0, "flags cleared without GUEST_CSUM");
        assert_eq!(&hdr[10..12], &1u16.to_le_bytes());
        assert_eq!(used_elem(&mem, 0), (0, 512));
    }

    #[test]
    fn bad_receive_chains_are_returned_empty_and_skipped() {
        let mem = mem();
        let mut rx = RxQueue::new(queue(&mem, false));
        desc(&mem, 0, 0x1_0000, 1024, 0, 0); // device-readable
        offer(&mem, 0, 0);
        desc(&mem, 1, 0x1_1000, 8, WRITE, 0); // shorter than a header
        offer(&mem, 1, 1);
        desc(&mem, 2, 0x1_2000, 1024, WRITE, 0);
        offer(&mem, 2, 2);
        assert_eq!(
            rx.deliver(&mem, &packet(60), &neg(false)).expect("ring ok"),
            RxOutcome::Delivered { buffers: 1 }
        );
        assert_eq!(rx.stats.bad_chains, 2);
        assert_eq!(used_elem(&mem, 0), (0, 0));
        assert_eq!(used_elem(&mem, 1), (1, 0));
        assert_eq!(used_elem(&mem, 2), (2, 72));
    }
}
