//! The backing store: a [`Disk`] trait and its implementation over a held file descriptor
//! (a raw image file or a block device).
//!
//! Data moves straight between the file and guest memory with `preadv`/`pwritev` on iovecs
//! built from bounds-checked guest memory slices: no bounce buffers. This is one of the two
//! modules of the crate with `unsafe` (the iovec system calls).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::stat::{SFlag, fstat};
use vm_memory::VolatileSlice;
use vm_memory::volatile_memory::PtrGuardMut;

/// Most iovecs handed to one `preadv`/`pwritev` (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;
/// Most buffers of a request whose iovecs are built on the stack.
const INLINE_IOVS: usize = 8;
const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};
/// Size of the zero buffer used when the file system cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// A backing store failure; the request completes with `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("reading the disk failed")]
    Read(#[source] Errno),
    #[error("writing the disk failed")]
    Write(#[source] Errno),
    #[error("the disk ended before the transfer did")]
    ShortTransfer,
    #[error("fdatasync failed")]
    Flush(#[source] Errno),
    #[error("punching a hole failed")]
    Discard(#[source] Errno),
    #[error("zeroing a range failed")]
    WriteZeroes(#[source] Errno),
    #[error("reading the disk's size failed")]
    Size(#[source] Errno),
    #[error("range {offset}+{len} does not fit the host's file offsets")]
    Range { offset: u64, len: u64 },
}

/// What the request path needs of a disk. Offsets and lengths are in bytes and already checked
/// against [`Disk::size`] by the caller.
pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `bufs`, in order, from the disk starting at `offset`.
    fn read_into(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), DiskError>;
    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_from(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), DiskError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DiskError>;
    /// Tells the disk a range is unused (the guest may read zeroes or old data afterwards).
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Makes a range read as zeroes, deallocating it if `unmap`.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError>;
}

/// A disk over a file descriptor: a regular file or a block device.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

impl FileDisk {
    /// Wraps `file`, reading its size with `fstat`, or `BLKGETSIZE64` for a block device.
    pub fn new(file: File) -> Result<FileDisk, DiskError> {
        let st = fstat(&file).map_err(DiskError::Size)?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let size = if kind == SFlag::S_IFBLK {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `bytes`,
            // alive for the call; the descriptor is a block device held by `file`.
            unsafe { blkgetsize64(file.as_raw_fd(), &raw mut bytes) }.map_err(DiskError::Size)?;
            bytes
        } else {
            u64::try_from(st.st_size).map_err(|_| DiskError::Size(Errno::EOVERFLOW))?
        };
        Ok(FileDisk { file, size })
    }

    /// The descriptor the disk reads and writes.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn off_t(offset: u64, len: u64) -> Result<(i64, i64), DiskError> {
        let range = DiskError::Range { offset, len };
        let end = offset
            .checked_add(len)
            .ok_or(DiskError::Range { offset, len })?;
        i64::try_from(end).map_err(|_| DiskError::Range { offset, len })?;
        Ok((
            i64::try_from(offset).map_err(|_| range)?,
            i64::try_from(len).map_err(|_| DiskError::Range { offset, len })?,
        ))
    }

    /// Transfers all of `bufs` at `offset`, in `IOV_MAX` batches, resuming after short
    /// transfers. The iovecs of a request of at most [`INLINE_IOVS`] buffers (every 4 KiB
    /// request, most others) live on the stack: no allocation per request.
    fn transfer(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        write: bool,
    ) -> Result<(), DiskError> {
        // The guards keep the pointers valid for as long as the iovecs are used (with the
        // unit bitmap they do nothing else).
        if bufs.len() <= INLINE_IOVS {
            let guards: [Option<PtrGuardMut>; INLINE_IOVS] =
                std::array::from_fn(|i| bufs.get(i).map(VolatileSlice::ptr_guard_mut));
            let mut iovs = [EMPTY_IOV; INLINE_IOVS];
            let mut n = 0;
            for (g, b) in guards.iter().flatten().zip(bufs) {
                if let Some(iov) = iovs.get_mut(n).filter(|_| !b.is_empty()) {
                    *iov = libc::iovec {
                        iov_base: g.as_ptr().cast(),
                        iov_len: b.len(),
                    };
                    n += 1;
                }
            }
            let iovs = iovs.get_mut(..n).unwrap_or_default();
            return self.transfer_iovs(offset, iovs, write);
        }
        let guards: Vec<_> = bufs.iter().map(VolatileSlice::ptr_guard_mut).collect();
        let mut iovs: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .filter(|(_, b)| !b.is_empty())
            .map(|(g, b)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        self.transfer_iovs(offset, &mut iovs, write)
    }

    /// Transfers `iovs` (pointing into guest memory kept mapped by the caller's guards).
    pub(crate) fn transfer_iovs(
        &self,
        offset: u64,
        iovs: &mut [libc::iovec],
        write: bool,
    ) -> Result<(), DiskError> {
        let mut pos = offset;
        let mut first = 0usize;
        while first < iovs.len() {
            let end = first.saturating_add(IOV_MAX).min(iovs.len());
            let batch = iovs.get(first..end).unwrap_or_default();
            let count = libc::c_int::try_from(batch.len()).unwrap_or(0);
            let off = i64::try_from(pos).map_err(|_| DiskError::Range {
                offset: pos,
                len: 0,
            })?;
            let done = if write {
                // SAFETY: every iovec points into a mapped guest memory slice of at least
                // `iov_len` bytes (vm-memory checked the range and the guards keep it
                // mapped); pwritev only reads them.
                unsafe { libc::pwritev(self.file.as_raw_fd(), batch.as_ptr(), count, off) }
            } else {
                // SAFETY: as above; preadv writes at most `iov_len` bytes into each slice,
                // which is guest memory the guest handed to the device for writing.
                unsafe { libc::preadv(self.file.as_raw_fd(), batch.as_ptr(), count, off) }
            };
            let done = match usize::try_from(done) {
                Ok(0) => return Err(DiskError::ShortTransfer),
                Ok(n) => n,
                Err(_) => {
                    let e = Errno::last();
                    if e == Errno::EINTR {
                        continue;
                    }
                    return Err(if write {
                        DiskError::Write(e)
                    } else {
                        DiskError::Read(e)
                    });
                }
            };
            pos = pos.saturating_add(done as u64);
            first = advance(iovs, first, done);
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let n = usize::try_from(end.saturating_sub(pos))
                .unwrap_or(ZERO_CHUNK)
                .min(ZERO_CHUNK);
            let chunk = zeroes.get(..n).unwrap_or_default();
            self.file.write_all_at(chunk, pos).map_err(|e| {
                DiskError::WriteZeroes(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
            })?;
            pos = pos.saturating_add(n as u64);
        }
        Ok(())
    }
}

/// Drops `done` bytes from the front of `iovs[first..]`; returns the new first iovec.
pub(crate) fn advance(iovs: &mut [libc::iovec], mut first: usize, mut done: usize) -> usize {
    while let Some(iov) = iovs.get_mut(first) {
        if done < iov.iov_len {
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(done).cast();
            iov.iov_len -= done;
            break;
        }
        done -= iov.iov_len;
        first += 1;
    }
    first
}

impl Disk for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_into(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), DiskError> {
        self.transfer(offset, bufs, false)
    }

    fn write_from(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), DiskError> {
        self.transfer(offset, bufs, true)
    }

    fn flush(&self) -> Result<(), DiskError> {
        nix::unistd::fdatasync(&self.file).map_err(DiskError::Flush)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let (off, l) = Self::off_t(offset, len)?;
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, mode, off, l) {
            // Discard is a hint (§5.2.6.2): a store that cannot punch holes ignores it.
            Ok(()) | Err(Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(DiskError::Discard(e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        let (off, l) = Self::off_t(offset, len)?;
        let mode = if unmap {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.file, mode, off, l) {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP | Errno::ENODEV) => self.write_zero_bytes(offset, len),
            Err(e) => Err(DiskError::WriteZeroes(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn disk_with(bytes: &[u8]) -> (tempfile::NamedTempFile, FileDisk) {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("fill");
        let disk = FileDisk::new(f.reopen().expect("reopen")).expect("disk");
        (f, disk)
    }

    #[test]
    fn size_of_a_regular_file_is_its_length() {
        let (_f, disk) = disk_with(&[7; 4096]);
        assert_eq!(disk.size(), 4096);
    }

    #[test]
    fn vectored_read_and_write_reach_guest_memory() {
        let content: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let (f, disk) = disk_with(&content);
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        let a = mem.get_slice(GuestAddress(0x1000), 1000).expect("a");
        let b = mem.get_slice(GuestAddress(0x8000), 3096).expect("b");
        disk.read_into(0, &[a, b]).expect("read");
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x1000)).expect("got");
        assert_eq!(got, content.get(..1000).expect("head"));

        mem.write_slice(&[0xab; 512], GuestAddress(0x3000))
            .expect("fill");
        let c = mem.get_slice(GuestAddress(0x3000), 512).expect("c");
        disk.write_from(512, &[c]).expect("write");
        let on_disk = std::fs::read(f.path()).expect("read back");
        assert_eq!(on_disk.get(512..1024), Some(&[0xab; 512][..]));
        assert_eq!(on_disk.get(..512), content.get(..512));
    }

    #[test]
    fn reading_past_the_end_of_the_file_is_a_short_transfer() {
        let (_f, disk) = disk_with(&[1; 512]);
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mem");
        let s = mem.get_slice(GuestAddress(0), 1024).expect("slice");
        assert!(matches!(
            disk.read_into(0, &[s]),
            Err(DiskError::ShortTransfer)
        ));
    }

    #[test]
    fn write_zeroes_without_unmap_zeroes_the_range() {
        let (f, disk) = disk_with(&[9; 8192]);
        disk.write_zeroes(4096, 4096, false).expect("zero");
        let on_disk = std::fs::read(f.path()).expect("read back");
        assert_eq!(on_disk.len(), 8192);
        assert!(on_disk.get(4096..).expect("tail").iter().all(|&b| b == 0));
        assert!(on_disk.get(..4096).expect("head").iter().all(|&b| b == 9));
    }

    #[test]
    fn advance_skips_whole_and_partial_iovecs() {
        let mut buf = [0u8; 30];
        let base = buf.as_mut_ptr();
        let mut iovs = [
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: base.wrapping_add(10).cast(),
                iov_len: 20,
            },
        ];
        let first = advance(&mut iovs, 0, 15);
        assert_eq!(first, 1);
        assert_eq!(iovs[1].iov_len, 15);
        assert_eq!(advance(&mut iovs, 1, 15), 2);
    }
}
