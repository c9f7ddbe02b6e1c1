//! What the device offers: its feature bits, its configuration space (`virtio_net_config`) and
//! the tap offloads that follow from what the driver accepted.
//!
//! Virtio 1.2 §5.1.3 (feature bits) and §5.1.4 (device configuration layout); every field is
//! little endian.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::header::TxOffloads;

/// The virtio device type of a network device (§5.1).
pub const DEVICE_TYPE_NET: u16 = 1;
/// Largest queue the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Bytes of the configuration space as this device lays it out (up to `mtu`).
pub const CONFIG_LEN: usize = 12;
/// Offset of `status` in the configuration space.
pub const STATUS_OFFSET: usize = 6;

/// `TUN_F_CSUM`: the reader of the tap accepts partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: … TCP/IPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: … TCP/IPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`: … TSO with the ECN bit.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Bit `n` of a feature word.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Every feature bit a device with `pairs` queue pairs offers: with more than one, `MQ` and
/// the control queue it needs (`CTRL_VQ`, §5.1.3.1).
pub fn features(pairs: u16) -> u64 {
    let mq = if pairs > 1 {
        bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ)
    } else {
        0
    };
    mq | [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
    ]
    .into_iter()
    .fold(0, |f, b| f | bit(b))
}

/// The negotiated features the data path acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several receive chains.
    pub mergeable: bool,
    /// `VIRTIO_NET_F_GUEST_CSUM`: received frames may carry partial checksums.
    pub guest_csum: bool,
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// What transmitted headers may ask for.
    pub tx: TxOffloads,
    /// The `TUNSETOFFLOAD` flags: what the kernel may hand us to receive.
    pub tap_offloads: u32,
}

/// Whether the driver accepted `VIRTIO_NET_F_MQ` (with the `CTRL_VQ` it needs): several
/// queue pairs and a control queue.
pub fn multiqueue(features: u64) -> bool {
    let both = bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    features & both == both
}

impl Negotiated {
    /// Reads the features the driver accepted (already checked against the offer).
    pub fn from_features(f: u64) -> Negotiated {
        let has = |b: u32| f & bit(b) != 0;
        let guest_csum = has(VIRTIO_NET_F_GUEST_CSUM);
        let mut tap_offloads = 0;
        // The tap refuses TSO without checksum offload (and so does §5.1.3.1).
        if guest_csum {
            tap_offloads |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                tap_offloads |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                tap_offloads |= TUN_F_TSO6;
            }
            if tap_offloads & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
                tap_offloads |= TUN_F_TSO_ECN;
            }
        }
        let csum = has(VIRTIO_NET_F_CSUM);
        Negotiated {
            mergeable: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum,
            event_idx: has(VIRTIO_RING_F_EVENT_IDX),
            tx: TxOffloads {
                csum,
                tso4: csum && has(VIRTIO_NET_F_HOST_TSO4),
                tso6: csum && has(VIRTIO_NET_F_HOST_TSO6),
                ecn: csum && has(VIRTIO_NET_F_HOST_ECN),
            },
            tap_offloads,
        }
    }
}

/// The configuration space (`struct virtio_net_config` up to `mtu`), [`CONFIG_LEN`] bytes;
/// `max_virtqueue_pairs` is `pairs` (only read by a driver that negotiated `MQ`).
pub fn config_space(mac: [u8; 6], link_up: bool, mtu: u16, pairs: u16) -> Vec<u8> {
    let status = if link_up {
        u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1)
    } else {
        0
    };
    let mut c = Vec::with_capacity(CONFIG_LEN);
    c.extend_from_slice(&mac); // 0: mac
    c.extend_from_slice(&status.to_le_bytes()); // 6: status
    c.extend_from_slice(&pairs.max(1).to_le_bytes()); // 8: max_virtqueue_pairs
    c.extend_from_slice(&mtu.to_le_bytes()); // 10: mtu
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_has_the_spec_layout() {
        let c = config_space([2, 0, 0, 0, 0, 7], true, 9000, 1);
        assert_eq!(c, vec![2, 0, 0, 0, 0, 7, 1, 0, 1, 0, 0x28, 0x23]);
        let mq = config_space([2, 0, 0, 0, 0, 7], true, 9000, 4);
        assert_eq!(mq.get(8..10), Some(&[4, 0][..]));
        let down = config_space([2, 0, 0, 0, 0, 7], false, 9000, 1);
        assert_eq!(
            down.get(STATUS_OFFSET..STATUS_OFFSET + 2),
            Some(&[0, 0][..])
        );
        assert_eq!(down.len(), CONFIG_LEN);
    }

    #[test]
    fn the_offer_has_the_promised_bits_and_multiqueue_only_with_pairs() {
        let f = features(1);
        for b in [0, 1, 3, 5, 7, 8, 9, 11, 12, 13, 15, 16, 28, 29, 32] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
        // MQ (22) and CTRL_VQ (17) need a control queue; UFO (10, 14) is not offered.
        for b in [10, 14, 17, 22] {
            assert_eq!(f & bit(b), 0, "bit {b}");
        }
        let mq = features(2);
        assert_eq!(mq & !f, bit(17) | bit(22));
        assert!(multiqueue(mq));
        assert!(!multiqueue(f));
        assert!(!multiqueue(bit(22)), "MQ without CTRL_VQ");
    }

    #[test]
    fn tap_offloads_follow_the_guest_receive_features() {
        assert_eq!(Negotiated::from_features(features(1)).tap_offloads, 0x0f);
        let no_csum = features(1) & !bit(VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(Negotiated::from_features(no_csum).tap_offloads, 0);
        let only_csum = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(
            Negotiated::from_features(only_csum).tap_offloads,
            TUN_F_CSUM
        );
    }

    #[test]
    fn host_offloads_without_csum_are_not_honoured() {
        let n = Negotiated::from_features(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_F_VERSION_1));
        assert_eq!(n.tx, TxOffloads::default());
        assert!(!n.mergeable);
    }
}
