//! The transmit queue: a chain from the guest → a checked header and the frame's guest
//! buffers, ready for one `writev` to the tap (virtio 1.2 §5.1.6.2).
//!
//! The header is copied out of guest memory once and checked ([`crate::header::check_tx`]);
//! the copy, not guest memory, goes to the tap, so the guest cannot change it between the
//! check and the kernel's use (a double fetch).

use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::header::{HEADER_LEN, HeaderError, NetHeader, TxOffloads, check_tx};
use crate::ring::{BadChain, Popped, RingError, Segment, UsedRing, pop};

/// Why a transmitted chain is returned without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    #[error("bad descriptor chain")]
    Chain(#[from] BadChain),
    #[error("chain shorter than a virtio header")]
    NoHeader,
    #[error("bad virtio header")]
    Header(#[from] HeaderError),
}

/// A frame ready for the tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxFrame {
    /// The checked header, as it goes to the tap.
    pub header: [u8; HEADER_LEN],
    /// The Ethernet frame in guest memory.
    pub segments: Vec<Segment>,
    /// Bytes of the frame.
    pub len: u32,
}

/// A popped transmit chain: its head, and its frame or why it is dropped.
pub type TxChain = (u16, Result<TxFrame, TxDrop>);

/// Counters of the transmit side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxStats {
    pub frames: u64,
    pub bytes: u64,
    /// Chains dropped for their descriptors (direction, RAM, length).
    pub bad_chains: u64,
    /// Frames dropped for their virtio header or their length.
    pub bad_headers: u64,
    /// Frames dropped because the tap is gone.
    pub no_link: u64,
    /// Frames the tap refused.
    pub tap_errors: u64,
}

impl TxStats {
    pub fn count_drop(&mut self, why: &TxDrop) {
        let c = match why {
            TxDrop::Chain(_) => &mut self.bad_chains,
            TxDrop::NoHeader | TxDrop::Header(_) => &mut self.bad_headers,
        };
        *c = c.saturating_add(1);
    }
}

/// The transmit queue of an active device.
#[derive(Debug)]
pub struct TxQueue {
    pub queue: Queue,
    pub used: UsedRing,
    pub stats: TxStats,
}

impl TxQueue {
    pub fn new(queue: Queue) -> TxQueue {
        TxQueue {
            used: UsedRing::new(&queue),
            queue,
            stats: TxStats::default(),
        }
    }

    /// Pops the next chain: `Ok(None)` when there is none, else its head and the frame or why
    /// it is dropped.
    pub fn next_frame(
        &mut self,
        mem: &GuestMemoryMmap,
        mtu: u16,
        offloads: TxOffloads,
    ) -> Result<Option<TxChain>, RingError> {
        Ok(pop(&mut self.queue, mem, false)?.map(|p| match p {
            Popped::Bad { head, why } => (head, Err(why.into())),
            Popped::Good(c) => (c.head, frame(&c.segments, mem, mtu, offloads)),
        }))
    }
}

/// Splits a transmit chain's bytes into the header and the frame and checks them.
pub fn frame(
    segments: &[Segment],
    mem: &GuestMemoryMmap,
    mtu: u16,
    offloads: TxOffloads,
) -> Result<TxFrame, TxDrop> {
    let mut header = [0u8; HEADER_LEN];
    let mut have = 0usize;
    let mut rest = Vec::with_capacity(segments.len());
    let mut len = 0u32;
    for s in segments {
        let take = (HEADER_LEN - have).min(s.len as usize);
        if take > 0 {
            let dst = header.get_mut(have..have + take).ok_or(TxDrop::NoHeader)?;
            vm_memory::Bytes::read_slice(mem, dst, s.addr).map_err(|_| BadChain::OutsideMemory)?;
            have += take;
        }
        let tail = s
            .len
            .saturating_sub(u32::try_from(take).unwrap_or(u32::MAX));
        if tail > 0 {
            let addr = s
                .addr
                .0
                .checked_add(take as u64)
                .ok_or(BadChain::OutsideMemory)?;
            rest.push(Segment {
                addr: GuestAddress(addr),
                len: tail,
            });
            len = len.checked_add(tail).ok_or(BadChain::TooBig)?;
        }
    }
    if have < HEADER_LEN {
        return Err(TxDrop::NoHeader);
    }
    let mut hdr = NetHeader::decode(&header);
    check_tx(&hdr, len, mtu, offloads)?;
    // num_buffers means nothing on transmit (§5.1.6.2); the tap ignores it too.
    hdr.num_buffers = 0;
    Ok(TxFrame {
        header: hdr.encode(),
        segments: rest,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::F_NEEDS_CSUM;
    use crate::ring::testing::*;
    use vm_memory::Bytes;

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn a_header_split_across_buffers_is_reassembled() {
        let mem = mem();
        let hdr = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            num_buffers: 7,
            ..NetHeader::default()
        }
        .encode();
        mem.write_slice(&hdr[..5], GuestAddress(0x8000)).expect("w");
        mem.write_slice(&hdr[5..], GuestAddress(0x9000)).expect("w");
        let f = frame(
            &[seg(0x8000, 5), seg(0x9000, 7 + 20), seg(0xa000, 40)],
            &mem,
            1500,
            ALL,
        )
        .expect("good frame");
        assert_eq!(f.len, 60);
        assert_eq!(f.segments, vec![seg(0x9007, 20), seg(0xa000, 40)]);
        assert_eq!(NetHeader::decode(&f.header).csum_start, 34);
        assert_eq!(NetHeader::decode(&f.header).num_buffers, 0);
    }

    #[test]
    fn short_chains_and_bad_headers_are_dropped() {
        let mem = mem();
        assert_eq!(
            frame(&[seg(0x8000, 11)], &mem, 1500, ALL),
            Err(TxDrop::NoHeader)
        );
        // A header with a zeroed body: a runt frame.
        assert!(matches!(
            frame(&[seg(0x8000, 12 + 10)], &mem, 1500, ALL),
            Err(TxDrop::Header(HeaderError::Runt(10)))
        ));
        mem.write_slice(&[1, 0, 0, 0, 0, 0, 50, 0, 0, 0], GuestAddress(0x8000))
            .expect("w");
        assert!(matches!(
            frame(&[seg(0x8000, 12 + 50)], &mem, 1500, ALL),
            Err(TxDrop::Header(HeaderError::CsumRange { .. }))
        ));
    }

    #[test]
    fn popped_bad_chains_report_why() {
        let mem = mem();
        let mut tx = TxQueue::new(queue(&mem, false));
        desc(&mem, 0, 0x8000, 100, WRITE, 0);
        offer(&mem, 0, 0);
        let got = tx.next_frame(&mem, 1500, ALL).expect("ring ok");
        assert_eq!(got, Some((0, Err(TxDrop::Chain(BadChain::Direction)))));
        assert_eq!(tx.next_frame(&mem, 1500, ALL).expect("ring ok"), None);
    }
}
