//! Guest RAM as a device process sees it: the supervisor's memfd, mapped region by region at
//! the guest addresses the setup names, with every access bounds-checked by `vm-memory`.

use std::fs::File;
use std::os::fd::OwnedFd;

use proto::device::{MemoryRegion, QueueConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Why guest RAM could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    #[error("duplicating the guest memory descriptor failed")]
    Dup(#[source] std::io::Error),
    #[error("a guest RAM region of {0} bytes does not fit this address space")]
    TooLarge(u64),
    #[error("mapping guest memory failed")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// Maps `regions` (already validated by the setup's `validate`) of the guest RAM memfd, each
/// at its file offset, shared with the runner and the guest.
pub fn map_guest_ram(
    memfd: &OwnedFd,
    regions: &[MemoryRegion],
) -> Result<GuestMemoryMmap, GuestRamError> {
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.guest_addr);
    let mut ranges = Vec::with_capacity(sorted.len());
    for r in sorted {
        let file = File::from(memfd.try_clone().map_err(GuestRamError::Dup)?);
        let size = usize::try_from(r.size).map_err(|_| GuestRamError::TooLarge(r.size))?;
        ranges.push((
            GuestAddress(r.guest_addr),
            size,
            Some(FileOffset::new(file, r.file_offset)),
        ));
    }
    Ok(GuestMemoryMmap::from_ranges_with_files(ranges)?)
}

/// A `virtio-queue` `Queue` of at most `max_size` entries for a queue the driver set up,
/// checked against guest memory (§2.7: sizes, alignment, rings in RAM), resuming from the
/// used index in guest memory: 0 for rings a driver just set up, the previous process's
/// progress when a restarted device gets the same `Activate`. An error is the `NeedsReset`
/// reason.
pub fn build_queue(
    c: &QueueConfig,
    max_size: u16,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Queue, String> {
    let mut q = Queue::new(max_size).map_err(|e| e.to_string())?;
    q.try_set_size(c.size)
        .map_err(|e| format!("queue {}: size {}: {e}", c.index, c.size))?;
    q.try_set_desc_table_address(GuestAddress(c.desc))
        .map_err(|e| format!("queue {}: descriptor table: {e}", c.index))?;
    q.try_set_avail_ring_address(GuestAddress(c.avail))
        .map_err(|e| format!("queue {}: avail ring: {e}", c.index))?;
    q.try_set_used_ring_address(GuestAddress(c.used))
        .map_err(|e| format!("queue {}: used ring: {e}", c.index))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err(format!("queue {}: rings outside guest memory", c.index));
    }
    let used = q
        .used_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|e| format!("queue {}: used index: {e}", c.index))?;
    q.set_next_used(used.0);
    q.set_next_avail(used.0);
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_map_at_their_guest_addresses_and_file_offsets() {
        let fd = nix::sys::memfd::memfd_create(c"ram", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let file = File::from(fd);
        file.set_len(0x3000).expect("size");
        std::os::unix::fs::FileExt::write_all_at(&file, b"high", 0x2000).expect("write");
        let fd: OwnedFd = file.into();
        let regions = [
            MemoryRegion {
                guest_addr: 0x10_0000,
                size: 0x1000,
                file_offset: 0x2000,
            },
            MemoryRegion {
                guest_addr: 0,
                size: 0x2000,
                file_offset: 0,
            },
        ];
        let mem = map_guest_ram(&fd, &regions).expect("map");
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(&buf, b"high");
        assert!(
            mem.read_slice(&mut buf, GuestAddress(0x3000)).is_err(),
            "a hole"
        );
    }
}
