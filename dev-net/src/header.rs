//! The virtio-net packet header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6) and the checks a
//! transmitted frame's header must pass before it reaches the tap.
//!
//! Pure: no memory, no descriptors. The tap hands the same 12-byte layout to the kernel
//! (`TUNSETVNETHDRSZ` 12), whose `virtio_net_hdr_to_skb` trusts `csum_start`, `csum_offset`,
//! `gso_size` and `hdr_len` more than a guest deserves (the bug class of bhyve's e1000
//! advisories and DPDK's CVE-2024-11614), so every field is checked against the frame here.

/// Bytes of `struct virtio_net_hdr_v1` (with `num_buffers`, always present with `VERSION_1`).
pub const HEADER_LEN: usize = 12;
/// Bytes of an Ethernet header: the shortest frame that can be sent.
pub const ETH_HLEN: u32 = 14;
/// Bytes of one 802.1Q tag a frame may carry beyond the MTU.
pub const VLAN_HLEN: u32 = 4;
/// Largest frame (without the virtio header) of a segmentation-offload send: a full 16-bit IP
/// datagram plus an Ethernet header and one VLAN tag.
pub const MAX_GSO_FRAME: u32 = 65_535 + ETH_HLEN + VLAN_HLEN;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the device completes the checksum at `csum_start + csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: receive only, the checksum was verified.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, never offered).
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into a TCP `gso_type`.
pub const GSO_ECN: u8 = 0x80;

/// A decoded `virtio_net_hdr_v1` (little endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHeader {
    /// Decodes the 12 header bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> NetHeader {
        let word = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
            num_buffers: word(10),
        }
    }

    /// Encodes the header as the guest or the tap reads it.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// The transmit offloads the driver negotiated, which bound what its headers may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(clippy::struct_excessive_bools)] // one flag per negotiated feature bit
pub struct TxOffloads {
    /// `VIRTIO_NET_F_CSUM`.
    pub csum: bool,
    /// `VIRTIO_NET_F_HOST_TSO4`.
    pub tso4: bool,
    /// `VIRTIO_NET_F_HOST_TSO6`.
    pub tso6: bool,
    /// `VIRTIO_NET_F_HOST_ECN`.
    pub ecn: bool,
}

/// Why a transmitted frame is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Runt(u32),
    #[error("frame of {len} bytes is longer than {max}")]
    TooLong { len: u32, max: u32 },
    #[error("unknown or receive-only header flags {0:#x}")]
    Flags(u8),
    #[error("checksum offload requested without VIRTIO_NET_F_CSUM")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} does not fit a {len}-byte frame")]
    CsumRange { start: u16, offset: u16, len: u32 },
    #[error("gso_type {0:#x} unknown or not negotiated")]
    GsoType(u8),
    #[error("segmentation offload without a segment size")]
    GsoSizeZero,
    #[error("segmentation offload without checksum offload")]
    GsoWithoutCsum,
    #[error("hdr_len {hdr_len} is beyond the {len}-byte frame")]
    HdrLen { hdr_len: u16, len: u32 },
}

/// Checks the header of a transmitted frame of `frame_len` bytes (without the header) against
/// the negotiated `offloads` and the device's `mtu` (virtio 1.2 §5.1.6.2, §5.1.6.2.1).
pub fn check_tx(
    hdr: &NetHeader,
    frame_len: u32,
    mtu: u16,
    offloads: TxOffloads,
) -> Result<(), HeaderError> {
    if frame_len < ETH_HLEN {
        return Err(HeaderError::Runt(frame_len));
    }
    // §5.1.6.2.1: the driver MUST NOT set DATA_VALID or RSC_INFO; other bits are reserved.
    if hdr.flags & !F_NEEDS_CSUM != 0 {
        return Err(HeaderError::Flags(hdr.flags));
    }
    let needs_csum = hdr.flags & F_NEEDS_CSUM != 0;
    if needs_csum {
        if !offloads.csum {
            return Err(HeaderError::CsumNotNegotiated);
        }
        // The checksum field (2 bytes at csum_start + csum_offset) lies inside the frame.
        let end = u32::from(hdr.csum_start) + u32::from(hdr.csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::CsumRange {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: frame_len,
            });
        }
    }
    let ecn = hdr.gso_type & GSO_ECN != 0;
    let gso = match hdr.gso_type & !GSO_ECN {
        GSO_NONE if !ecn => false,
        GSO_TCPV4 if offloads.tso4 && (!ecn || offloads.ecn) => true,
        GSO_TCPV6 if offloads.tso6 && (!ecn || offloads.ecn) => true,
        _ => return Err(HeaderError::GsoType(hdr.gso_type)),
    };
    let max = if gso {
        // §5.1.6.2.1: a GSO send also asks for checksum offload; gso_size is the segment's
        // payload and cannot be zero.
        if hdr.gso_size == 0 {
            return Err(HeaderError::GsoSizeZero);
        }
        if !needs_csum {
            return Err(HeaderError::GsoWithoutCsum);
        }
        MAX_GSO_FRAME
    } else {
        u32::from(mtu) + ETH_HLEN + VLAN_HLEN
    };
    if frame_len > max {
        return Err(HeaderError::TooLong {
            len: frame_len,
            max,
        });
    }
    if u32::from(hdr.hdr_len) > frame_len {
        return Err(HeaderError::HdrLen {
            hdr_len: hdr.hdr_len,
            len: frame_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    fn csum(start: u16, offset: u16) -> NetHeader {
        NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: start,
            csum_offset: offset,
            ..NetHeader::default()
        }
    }

    fn tso(gso_type: u8, gso_size: u16) -> NetHeader {
        NetHeader {
            gso_type,
            gso_size,
            hdr_len: 54,
            ..csum(34, 16)
        }
    }

    #[test]
    fn decode_and_encode_are_inverse_and_little_endian() {
        let raw = [1, 4, 0x36, 0, 0xa8, 0x05, 0x22, 0, 0x10, 0, 3, 0];
        let h = NetHeader::decode(&raw);
        assert_eq!(
            h,
            NetHeader {
                flags: 1,
                gso_type: 4,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 3
            }
        );
        assert_eq!(h.encode(), raw);
    }

    #[test]
    fn plain_and_checksummed_frames_within_the_mtu_pass() {
        assert_eq!(check_tx(&NetHeader::default(), 60, 1500, ALL), Ok(()));
        assert_eq!(check_tx(&NetHeader::default(), 1518, 1500, ALL), Ok(()));
        assert_eq!(check_tx(&csum(34, 6), 42, 1500, ALL), Ok(()));
        assert_eq!(check_tx(&tso(GSO_TCPV4, 1448), 65_000, 1500, ALL), Ok(()));
        assert_eq!(
            check_tx(&tso(GSO_TCPV6 | GSO_ECN, 1428), MAX_GSO_FRAME, 1500, ALL),
            Ok(())
        );
    }

    #[test]
    fn runts_and_oversized_frames_are_dropped() {
        let plain = NetHeader::default();
        assert_eq!(check_tx(&plain, 13, 1500, ALL), Err(HeaderError::Runt(13)));
        assert_eq!(check_tx(&plain, 0, 1500, ALL), Err(HeaderError::Runt(0)));
        assert!(matches!(
            check_tx(&plain, 1519, 1500, ALL),
            Err(HeaderError::TooLong { .. })
        ));
        assert!(matches!(
            check_tx(&tso(GSO_TCPV4, 1448), MAX_GSO_FRAME + 1, 1500, ALL),
            Err(HeaderError::TooLong { .. })
        ));
        assert!(matches!(
            check_tx(&plain, 70_000, u16::MAX, ALL),
            Err(HeaderError::TooLong { .. })
        ));
    }

    #[test]
    fn a_checksum_field_past_the_frame_is_dropped() {
        assert!(matches!(
            check_tx(&csum(34, 7), 42, 1500, ALL),
            Err(HeaderError::CsumRange { .. })
        ));
        assert!(matches!(
            check_tx(&csum(u16::MAX, u16::MAX), 1500, 1500, ALL),
            Err(HeaderError::CsumRange { .. })
        ));
        let no_csum = TxOffloads { csum: false, ..ALL };
        assert_eq!(
            check_tx(&csum(34, 6), 60, 1500, no_csum),
            Err(HeaderError::CsumNotNegotiated)
        );
    }

    #[test]
    fn bad_segmentation_requests_are_dropped() {
        assert_eq!(
            check_tx(&tso(GSO_TCPV4, 0), 9000, 1500, ALL),
            Err(HeaderError::GsoSizeZero)
        );
        assert_eq!(
            check_tx(&tso(GSO_UDP, 1400), 9000, 1500, ALL),
            Err(HeaderError::GsoType(GSO_UDP))
        );
        assert_eq!(
            check_tx(&tso(0x42, 1400), 9000, 1500, ALL),
            Err(HeaderError::GsoType(0x42))
        );
        assert_eq!(
            check_tx(&tso(GSO_ECN, 1400), 9000, 1500, ALL),
            Err(HeaderError::GsoType(GSO_ECN))
        );
        let no_tso6 = TxOffloads {
            tso6: false,
            ecn: false,
            ..ALL
        };
        assert!(check_tx(&tso(GSO_TCPV6, 1400), 9000, 1500, no_tso6).is_err());
        assert!(check_tx(&tso(GSO_TCPV4 | GSO_ECN, 1400), 9000, 1500, no_tso6).is_err());
        let mut no_csum = tso(GSO_TCPV4, 1400);
        no_csum.flags = 0;
        assert_eq!(
            check_tx(&no_csum, 9000, 1500, ALL),
            Err(HeaderError::GsoWithoutCsum)
        );
        let mut long_hdr = tso(GSO_TCPV4, 1400);
        long_hdr.hdr_len = 9001;
        assert!(matches!(
            check_tx(&long_hdr, 9000, 1500, ALL),
            Err(HeaderError::HdrLen { .. })
        ));
    }

    #[test]
    fn receive_only_and_reserved_flags_are_dropped() {
        for flags in [F_DATA_VALID, 4, 0x80, F_NEEDS_CSUM | F_DATA_VALID] {
            let h = NetHeader {
                flags,
                ..csum(14, 0)
            };
            assert_eq!(check_tx(&h, 60, 1500, ALL), Err(HeaderError::Flags(flags)));
        }
    }
}
