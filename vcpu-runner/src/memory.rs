//! Guest RAM: the supervisor's sealed memfd mapped as the guest-physical address map of
//! DESIGN.md (low RAM below the 32-bit MMIO hole, the rest above 4 GiB).
//!
//! Every access to guest memory goes through `vm-memory`, so each guest address is
//! bounds-checked against these regions.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// The guest's RAM as this process maps it.
pub type GuestMem = GuestMemoryMmap<()>;

/// One contiguous piece of guest RAM and where it lives in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub guest: u64,
    /// Bytes.
    pub len: u64,
    /// Offset of `guest` in the memfd.
    pub file_offset: u64,
}

impl RamRange {
    /// The first guest-physical address after the range.
    pub fn end(&self) -> u64 {
        self.guest.saturating_add(self.len)
    }
}

/// Why guest RAM could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM memfd is {actual} bytes, the machine asks for {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("reading the guest RAM memfd's size")]
    Stat(#[source] std::io::Error),
    #[error("duplicating the guest RAM memfd")]
    Dup(#[source] std::io::Error),
    #[error("mapping guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("guest RAM of {0} bytes does not fit this host's address space")]
    TooLarge(u64),
}

/// Where `memory` bytes of RAM go ([`proto::device::guest_ram_layout`], the layout the
/// supervisor also gives the device processes).
pub fn ram_ranges(memory: u64) -> Vec<RamRange> {
    proto::device::guest_ram_layout(memory)
        .into_iter()
        .map(|r| RamRange {
            guest: r.guest_addr,
            len: r.size,
            file_offset: r.file_offset,
        })
        .collect()
}

/// Checks that `memfd` holds exactly `memory` bytes and maps it `MAP_SHARED`.
pub fn map(memfd: &File, memory: u64) -> Result<GuestMem, MemoryError> {
    let actual = memfd.metadata().map_err(MemoryError::Stat)?.len();
    if actual != memory {
        return Err(MemoryError::Size {
            expected: memory,
            actual,
        });
    }
    let mut regions = Vec::new();
    for r in ram_ranges(memory) {
        let file = memfd.try_clone().map_err(MemoryError::Dup)?;
        let len = usize::try_from(r.len).map_err(|_| MemoryError::TooLarge(memory))?;
        regions.push((
            GuestAddress(r.guest),
            len,
            Some(FileOffset::new(file, r.file_offset)),
        ));
    }
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryBackend;

    use super::*;

    #[test]
    fn memory_below_the_hole_is_one_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                guest: 0,
                len: 512 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn memory_above_three_gib_continues_at_four_gib() {
        let r = ram_ranges(5 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].guest, r[0].len), (0, 3 << 30));
        assert_eq!(
            r[1],
            RamRange {
                guest: 4 << 30,
                len: 2 << 30,
                file_offset: 3 << 30
            }
        );
        assert_eq!(r[1].end(), 6 << 30);
    }

    #[test]
    fn a_memfd_of_the_wrong_size_is_refused() {
        let file = tempfile_of(4 << 20);
        assert!(matches!(
            map(&file, 8 << 20),
            Err(MemoryError::Size { expected, actual }) if expected == 8 << 20 && actual == 4 << 20
        ));
        let mem = map(&file, 4 << 20).unwrap();
        assert_eq!(mem.last_addr(), GuestAddress((4 << 20) - 1));
    }

    fn tempfile_of(len: u64) -> File {
        let dir = std::env::temp_dir().join(format!("vcpu-runner-mem-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        file.set_len(len).unwrap();
        file
    }
}
