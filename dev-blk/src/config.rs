//! What the device offers: its feature bits and its configuration space (`virtio_blk_config`).
//!
//! Virtio 1.2 §5.2.3 (feature bits) and §5.2.4 (device configuration layout); every field is
//! little endian.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The virtio device type of a block device (§5.2).
pub const DEVICE_TYPE_BLOCK: u16 = 2;
/// Largest queue the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Most data segments one request may use (`seg_max`); the two others are header and status.
pub const SEG_MAX: u32 = 254;
/// Largest single data segment, in bytes (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard or write-zeroes range of one segment, in 512-byte sectors (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Most segments of one discard or write-zeroes request.
pub const MAX_RANGE_SEGMENTS: u32 = 16;
/// Bytes of the configuration space as this device lays it out (up to `unused1`).
pub const CONFIG_LEN: usize = 60;
/// Bytes in a virtio-blk sector, whatever the logical block size (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Bit `n` of a feature word.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// What the disk looks like to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Disk size in bytes; the guest sees `capacity_bytes / 512` sectors.
    pub capacity_bytes: u64,
    /// Logical block size (512..=4096, a power of two).
    pub logical_block_size: u32,
    pub read_only: bool,
    /// Request queues.
    pub queues: u16,
}

impl DiskGeometry {
    /// Capacity in 512-byte sectors; a partial last sector is not addressable.
    pub fn sectors(&self) -> u64 {
        self.capacity_bytes / SECTOR_SIZE
    }

    /// The feature bits this device offers.
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.queues > 1 {
            f |= bit(VIRTIO_BLK_F_MQ);
        }
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The configuration space (`struct virtio_blk_config`), [`CONFIG_LEN`] bytes.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(CONFIG_LEN);
        c.extend_from_slice(&self.sectors().to_le_bytes()); // 0: capacity
        c.extend_from_slice(&SIZE_MAX.to_le_bytes()); // 8: size_max
        c.extend_from_slice(&SEG_MAX.to_le_bytes()); // 12: seg_max
        c.extend_from_slice(&[0; 4]); // 16: geometry (GEOMETRY not offered)
        c.extend_from_slice(&self.logical_block_size.to_le_bytes()); // 20: blk_size
        // 24: topology: physical_block_exp, alignment_offset, min_io_size (in logical blocks),
        // opt_io_size.
        c.extend_from_slice(&[0, 0]);
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.push(1); // 32: writeback (a write-back cache: FLUSH matters)
        c.push(0); // 33: unused0
        c.extend_from_slice(&self.queues.to_le_bytes()); // 34: num_queues
        let align = self.logical_block_size / 512;
        c.extend_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // 36: max_discard_sectors
        c.extend_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // 40: max_discard_seg
        c.extend_from_slice(&align.to_le_bytes()); // 44: discard_sector_alignment
        c.extend_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // 48: max_write_zeroes_sectors
        c.extend_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // 52: max_write_zeroes_seg
        c.push(1); // 56: write_zeroes_may_unmap
        c.extend_from_slice(&[0; 3]); // 57: unused1
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(read_only: bool, queues: u16) -> DiskGeometry {
        DiskGeometry {
            capacity_bytes: 1 << 30,
            logical_block_size: 4096,
            read_only,
            queues,
        }
    }

    #[test]
    fn config_space_has_the_spec_layout() {
        let c = geometry(false, 4).config_space();
        assert_eq!(c.len(), CONFIG_LEN);
        assert_eq!(c.get(0..8), Some(&(2u64 << 20).to_le_bytes()[..]));
        assert_eq!(c.get(12..16), Some(&SEG_MAX.to_le_bytes()[..]));
        assert_eq!(c.get(20..24), Some(&4096u32.to_le_bytes()[..]));
        assert_eq!(c.get(34..36), Some(&4u16.to_le_bytes()[..]));
        assert_eq!(c.get(44..48), Some(&8u32.to_le_bytes()[..]));
        assert_eq!(c.get(56), Some(&1));
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let f = geometry(true, 1).features();
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_MQ), 0);
        let f = geometry(false, 2).features();
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & bit(VIRTIO_F_VERSION_1), 0);
    }

    #[test]
    fn a_partial_last_sector_is_not_capacity() {
        let mut g = geometry(false, 1);
        g.capacity_bytes = 1025;
        assert_eq!(g.sectors(), 2);
    }
}
