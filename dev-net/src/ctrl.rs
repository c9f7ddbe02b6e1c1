//! The control queue (virtio 1.2 §5.1.6.5): one command per chain, answered with an ack byte.
//!
//! ```text
//!  chain:  [ class u8 | command u8 | data … ]  device-readable, any split
//!          [ ack u8 ]                          device-writable, after the readable part
//! ```
//!
//! The device offers `CTRL_VQ` only together with `MQ`, so the one command it acts on is
//! `VIRTIO_NET_CTRL_MQ` / `VQ_PAIRS_SET` (§5.1.6.5.5), which Linux's `virtio_net` sends at probe
//! with the number of online CPUs (and on `ethtool -L`). Receive-mode and MAC-table commands are
//! acknowledged without effect (the device filters nothing: the guest sees every frame the tap
//! hands over, a superset of any filter), everything else gets `VIRTIO_NET_ERR`. A chain the
//! device cannot read is answered `ERR` (or, without a writable byte, returned with length 0);
//! none of it stops the device.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::ring::{MAX_DESCRIPTORS, RingError, WALK_LIMIT};

/// `VIRTIO_NET_OK`.
pub const ACK_OK: u8 = 0;
/// `VIRTIO_NET_ERR`.
pub const ACK_ERR: u8 = 1;
/// `VIRTIO_NET_CTRL_RX`: promiscuous and all-multicast modes.
pub const CLASS_RX: u8 = 0;
/// `VIRTIO_NET_CTRL_RX_PROMISC`.
pub const RX_PROMISC: u8 = 0;
/// `VIRTIO_NET_CTRL_RX_ALLMULTI`.
pub const RX_ALLMULTI: u8 = 1;
/// `VIRTIO_NET_CTRL_MAC`: the receive filter's address table.
pub const CLASS_MAC: u8 = 1;
/// `VIRTIO_NET_CTRL_MAC_TABLE_SET`.
pub const MAC_TABLE_SET: u8 = 0;
/// `VIRTIO_NET_CTRL_MQ`.
pub const CLASS_MQ: u8 = 4;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
pub const MQ_VQ_PAIRS_SET: u8 = 0;
/// Bytes of a command the device reads; a longer one (a big MAC table) is answered from its
/// first bytes, which are all a command this device acts on needs.
pub const MAX_COMMAND_BYTES: usize = 64;

/// What the device does with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// [`ACK_OK`] or [`ACK_ERR`].
    pub ack: u8,
    /// Use this many queue pairs from now on (`VQ_PAIRS_SET` accepted).
    pub set_pairs: Option<u16>,
}

impl Answer {
    const OK: Answer = Answer {
        ack: ACK_OK,
        set_pairs: None,
    };
    const ERR: Answer = Answer {
        ack: ACK_ERR,
        set_pairs: None,
    };
}

/// Answers the command in `bytes` (class, command, data) for a device of `max_pairs` pairs;
/// `multiqueue` says whether the driver negotiated `MQ`.
pub fn answer(bytes: &[u8], max_pairs: u16, multiqueue: bool) -> Answer {
    let (Some(&class), Some(&command)) = (bytes.first(), bytes.get(1)) else {
        return Answer::ERR;
    };
    let data = bytes.get(2..).unwrap_or_default();
    match (class, command) {
        (CLASS_MQ, MQ_VQ_PAIRS_SET) if multiqueue => {
            // §5.1.6.5.5: a le16 from 1 to max_virtqueue_pairs; anything else is refused.
            let Some(&[lo, hi]) = data.get(..2).and_then(|d| <&[u8; 2]>::try_from(d).ok()) else {
                return Answer::ERR;
            };
            let pairs = u16::from_le_bytes([lo, hi]);
            if (1..=max_pairs).contains(&pairs) {
                Answer {
                    ack: ACK_OK,
                    set_pairs: Some(pairs),
                }
            } else {
                Answer::ERR
            }
        }
        // One byte, on or off: every frame reaches the guest either way.
        (CLASS_RX, RX_PROMISC | RX_ALLMULTI) if data.len() == 1 => Answer::OK,
        (CLASS_MAC, MAC_TABLE_SET) => Answer::OK,
        _ => Answer::ERR,
    }
}

/// One control chain: its command bytes (at most [`MAX_COMMAND_BYTES`]) and where the ack
/// goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub head: u16,
    pub bytes: Vec<u8>,
    /// The first device-writable byte; `None` for a chain without one.
    pub ack_at: Option<GuestAddress>,
    /// The chain's layout is wrong (a readable buffer after a writable one, one outside guest
    /// memory, too many buffers): answered with `ERR` whatever it says.
    pub malformed: bool,
}

/// Pops the next control chain; `Ok(None)` when the driver offered nothing new. A chain cut
/// short (a loop, an index out of range) breaks the ring.
pub fn pop_command(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<Command>, RingError> {
    let Some(chain) = queue.iter(mem)?.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    read_command(head, chain, mem).map(Some)
}

/// Reads the chain at `head` as a control command (see [`crate::ring::check`] for why a last
/// descriptor with `NEXT` means a broken ring).
pub fn read_command(
    head: u16,
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
) -> Result<Command, RingError> {
    let mut cmd = Command {
        head,
        bytes: Vec::new(),
        ack_at: None,
        malformed: false,
    };
    let mut last: Option<Descriptor> = None;
    for (n, d) in descriptors.enumerate() {
        last = Some(d);
        if n >= WALK_LIMIT {
            cmd.malformed = true;
            return Ok(cmd);
        }
        if n >= MAX_DESCRIPTORS {
            cmd.malformed = true;
        }
        if cmd.malformed {
            continue;
        }
        let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
        if d.is_write_only() {
            if cmd.ack_at.is_none() && len > 0 {
                if mem.check_range(d.addr(), 1) {
                    cmd.ack_at = Some(d.addr());
                } else {
                    cmd.malformed = true;
                }
            }
            continue;
        }
        // §2.7.4.2: device-readable buffers come before device-writable ones.
        if cmd.ack_at.is_some() {
            cmd.malformed = true;
            continue;
        }
        let room = MAX_COMMAND_BYTES.saturating_sub(cmd.bytes.len());
        let take = len.min(room);
        if take == 0 {
            continue;
        }
        let mut buf = vec![0u8; take];
        if mem.read_slice(&mut buf, d.addr()).is_err() {
            cmd.malformed = true;
            continue;
        }
        cmd.bytes.extend_from_slice(&buf);
    }
    match last {
        None => Err(RingError::Truncated(head)),
        Some(d) if d.has_next() => Err(RingError::Truncated(head)),
        Some(_) => Ok(cmd),
    }
}

/// Writes the ack of `cmd` (if it has room for one); returns the used length.
pub fn write_ack(cmd: &Command, ack: u8, mem: &GuestMemoryMmap) -> u32 {
    match cmd.ack_at {
        Some(at) if mem.write_slice(&[ack], at).is_ok() => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::testing::{desc, mem, offer, queue};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    #[test]
    fn vq_pairs_set_within_the_max_is_accepted() {
        let a = answer(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0], 4, true);
        assert_eq!(
            a,
            Answer {
                ack: ACK_OK,
                set_pairs: Some(2)
            }
        );
        assert_eq!(
            answer(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 4, 0], 4, true).set_pairs,
            Some(4)
        );
        assert_eq!(
            answer(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 1, 0], 4, true).set_pairs,
            Some(1)
        );
    }

    #[test]
    fn vq_pairs_set_out_of_range_or_short_or_without_mq_is_refused() {
        for bad in [
            &[CLASS_MQ, MQ_VQ_PAIRS_SET, 0, 0][..],
            &[CLASS_MQ, MQ_VQ_PAIRS_SET, 5, 0],
            &[CLASS_MQ, MQ_VQ_PAIRS_SET, 0, 0x80],
            &[CLASS_MQ, MQ_VQ_PAIRS_SET, 0xff, 0xff],
            &[CLASS_MQ, MQ_VQ_PAIRS_SET, 2],
            &[CLASS_MQ, MQ_VQ_PAIRS_SET],
            &[CLASS_MQ, 1, 2, 0],
            &[CLASS_MQ],
            &[],
        ] {
            assert_eq!(answer(bad, 4, true), Answer::ERR, "{bad:?}");
        }
        assert_eq!(
            answer(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 1, 0], 4, false),
            Answer::ERR
        );
    }

    #[test]
    fn filter_commands_are_acknowledged_and_others_refused() {
        assert_eq!(answer(&[CLASS_RX, RX_PROMISC, 1], 1, false), Answer::OK);
        assert_eq!(answer(&[CLASS_RX, RX_ALLMULTI, 0], 1, false), Answer::OK);
        assert_eq!(answer(&[CLASS_RX, RX_PROMISC], 1, false), Answer::ERR);
        assert_eq!(
            answer(&[CLASS_MAC, MAC_TABLE_SET, 0, 0, 0, 0], 1, false),
            Answer::OK
        );
        // MAC_ADDR_SET, VLAN, ANNOUNCE, GUEST_OFFLOADS, unknown classes.
        for c in [[CLASS_MAC, 1], [2, 0], [3, 0], [5, 0], [0xff, 0xff]] {
            assert_eq!(answer(&c, 4, true), Answer::ERR, "{c:?}");
        }
    }

    #[test]
    fn a_split_command_is_read_whole_and_acked_in_its_writable_byte() {
        let m = mem();
        let mut q = queue(&m, false);
        m.write_slice(&[CLASS_MQ, MQ_VQ_PAIRS_SET], GuestAddress(0x1_0000))
            .unwrap();
        m.write_slice(&[3, 0], GuestAddress(0x1_1000)).unwrap();
        desc(&m, 0, 0x1_0000, 2, F_NEXT, 1);
        desc(&m, 1, 0x1_1000, 2, F_NEXT, 2);
        desc(&m, 2, 0x1_2000, 1, F_WRITE, 0);
        offer(&m, 0, 0);
        let cmd = pop_command(&mut q, &m).unwrap().unwrap();
        assert_eq!(cmd.bytes, vec![CLASS_MQ, MQ_VQ_PAIRS_SET, 3, 0]);
        assert_eq!(cmd.ack_at, Some(GuestAddress(0x1_2000)));
        assert!(!cmd.malformed);
        m.write_slice(&[0xaa], GuestAddress(0x1_2000)).unwrap();
        assert_eq!(write_ack(&cmd, ACK_OK, &m), 1);
        let mut ack = [0xffu8];
        m.read_slice(&mut ack, GuestAddress(0x1_2000)).unwrap();
        assert_eq!(ack, [ACK_OK]);
        assert!(pop_command(&mut q, &m).unwrap().is_none());
    }

    #[test]
    fn hostile_layouts_are_malformed_or_break_the_ring_without_panic() {
        let m = mem();
        // Readable after writable.
        let mut q = queue(&m, false);
        desc(&m, 0, 0x1_2000, 1, F_WRITE | F_NEXT, 1);
        desc(&m, 1, 0x1_0000, 4, 0, 0);
        offer(&m, 0, 0);
        assert!(pop_command(&mut q, &m).unwrap().unwrap().malformed);
        // Outside guest memory: unreadable command, no writable byte.
        let mut q = queue(&m, false);
        desc(&m, 0, u64::MAX - 1, 4, 0, 0);
        offer(&m, 0, 0);
        let cmd = pop_command(&mut q, &m).unwrap().unwrap();
        assert!(cmd.malformed || cmd.bytes.is_empty());
        assert_eq!(write_ack(&cmd, ACK_ERR, &m), 0);
        // A loop.
        let mut q = queue(&m, false);
        desc(&m, 0, 0x1_0000, 2, F_NEXT, 1);
        desc(&m, 1, 0x1_0000, 2, F_NEXT, 0);
        offer(&m, 0, 0);
        assert!(pop_command(&mut q, &m).is_err());
    }
}
