//! What the ring fuzz targets share: guest memory filled from the input, and a split
//! virtqueue over it as a driver would have set it up.
//!
//! Input layout: bytes 0-1 the queue size (any value: invalid sizes are refused as a device
//! refuses them), byte 2 flags (bit 0 EVENT_IDX; the other bits are the target's), the rest
//! the first [`IMAGE_BYTES`] of guest memory. The descriptor table is at 0, the avail ring at
//! 0x1000, the used ring at 0x2000.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How much of guest memory, from address 0, the input fills.
pub const IMAGE_BYTES: usize = 0x14000;

/// Guest memory and a ready queue over it, with the input's flag byte.
pub struct Ring {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub flags: u8,
}

/// The ring an input describes, in guest memory made of `regions` (which must cover
/// 0..[`IMAGE_BYTES`]); `None` for an input shorter than its head or a queue the device
/// would refuse (a bad size, rings outside memory).
pub fn ring(data: &[u8], regions: &[(GuestAddress, usize)]) -> Option<Ring> {
    let (head, image) = data.split_at_checked(3)?;
    let size = u16::from_le_bytes([head[0], head[1]]);
    let flags = head[2];
    let mem = GuestMemoryMmap::from_ranges(regions).expect("guest memory");
    let n = image.len().min(IMAGE_BYTES);
    mem.write_slice(&image[..n], GuestAddress(0)).expect("fill");

    let mut queue = Queue::new(256).expect("queue");
    queue.try_set_size(size).ok()?;
    queue
        .try_set_desc_table_address(GuestAddress(0))
        .expect("desc");
    queue
        .try_set_avail_ring_address(GuestAddress(0x1000))
        .expect("avail");
    queue
        .try_set_used_ring_address(GuestAddress(0x2000))
        .expect("used");
    queue.set_event_idx(flags & 1 != 0);
    queue.set_ready(true);
    queue.is_valid(&mem).then_some(Ring { mem, queue, flags })
}
