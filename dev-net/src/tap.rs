//! The tap descriptor: its checks and settings (`TUNGETIFF`, `TUNSETVNETHDRSZ`,
//! `TUNSETOFFLOAD`), non-blocking reads of one frame, and `writev` of a header plus guest
//! buffers.
//!
//! The tap was opened by someone else (netcfg, or a test) with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`; this process only holds the descriptor. This is the crate's one module with
//! `unsafe` (the tap ioctls and `writev` on guest memory).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::header::HEADER_LEN;
use crate::ring::Segment;

/// `TUNGETIFF`: `_IOR('T', 210, unsigned int)`; the kernel writes a whole `struct ifreq`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`, the argument is a pointer to the size.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`, the argument is the flags themselves.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `IFF_TAP`.
const IFF_TAP: u16 = 0x0002;
/// `IFF_NO_PI`.
const IFF_NO_PI: u16 = 0x1000;
/// `IFF_VNET_HDR`.
const IFF_VNET_HDR: u16 = 0x4000;
/// Bytes of `struct ifreq`.
const IFREQ_LEN: usize = 40;
/// Offset of `ifr_flags` in `struct ifreq`.
const IFR_FLAGS: usize = 16;
/// Most iovecs of one `writev`: the header plus every segment split at region boundaries.
const MAX_IOVECS: usize = 1024;

/// The tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("reading the tap's flags failed (is it a tun/tap descriptor?)")]
    GetFlags(#[source] Errno),
    #[error("the tap's flags {0:#x} lack IFF_TAP, IFF_NO_PI or IFF_VNET_HDR")]
    Flags(u16),
    #[error("setting the virtio header size failed")]
    HeaderSize(#[source] Errno),
    #[error("setting the tap's offloads failed")]
    Offload(#[source] Errno),
    #[error("making the tap non-blocking failed")]
    NonBlocking(#[source] Errno),
}

/// How a read or write of the tap ended other than with data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapIo {
    /// Nothing to read now.
    WouldBlock,
    /// The interface went away (`EBADFD`, `EIO`, `ENXIO`, end of file): the link is down for
    /// good.
    Gone(Errno),
    /// This frame failed; the tap itself is fine.
    Failed(Errno),
}

/// The held tap descriptor, set up for 12-byte virtio headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Checks that `fd` is a tap with virtio headers, sets the header size and makes it
    /// non-blocking.
    pub fn new(fd: OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        let mut ifreq = [0u8; IFREQ_LEN];
        // SAFETY: TUNGETIFF writes one `struct ifreq` (40 bytes on x86_64) through the pointer,
        // which points at `ifreq`, 40 bytes alive for the call; the descriptor is held.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, ifreq.as_mut_ptr()) };
        Errno::result(r).map_err(TapError::GetFlags)?;
        let flags = u16::from_ne_bytes([ifreq[IFR_FLAGS], ifreq[IFR_FLAGS + 1]]);
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if flags & want != want {
            return Err(TapError::Flags(flags));
        }
        let size = libc::c_int::try_from(HEADER_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `size`,
        // alive for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &raw const size) };
        Errno::result(r).map_err(TapError::HeaderSize)?;
        let fl = fcntl(&file, FcntlArg::F_GETFL).map_err(TapError::NonBlocking)?;
        let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
        fcntl(&file, FcntlArg::F_SETFL(fl)).map_err(TapError::NonBlocking)?;
        Ok(Tap { file })
    }

    /// Tells the kernel which partial checksums and segmentation offloads the reader (the
    /// guest) takes: `TUN_F_*` flags.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        Errno::result(r).map(drop).map_err(TapError::Offload)
    }

    /// Reads one frame (virtio header first) into `buf`.
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, TapIo> {
        loop {
            match nix::unistd::read(&self.file, buf) {
                Ok(0) => return Err(TapIo::Gone(Errno::UnknownErrno)),
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(TapIo::WouldBlock),
                Err(e) => return Err(classify(e, true)),
            }
        }
    }

    /// Writes `header` then the frame in guest memory as one packet.
    pub fn send(
        &self,
        header: &[u8; HEADER_LEN],
        mem: &GuestMemoryMmap,
        segments: &[Segment],
    ) -> Result<(), TapIo> {
        let mut slices: Vec<VolatileSlice<'_>> = Vec::with_capacity(segments.len());
        for s in segments {
            let len = usize::try_from(s.len).map_err(|_| TapIo::Failed(Errno::EFAULT))?;
            for slice in mem.get_slices(GuestAddress(s.addr.0), len) {
                slices.push(slice.map_err(|_| TapIo::Failed(Errno::EFAULT))?);
            }
        }
        if slices.len() >= MAX_IOVECS {
            return Err(TapIo::Failed(Errno::EMSGSIZE));
        }
        // The guards keep the pointers valid for as long as the iovecs are used.
        let guards: Vec<_> = slices.iter().map(VolatileSlice::ptr_guard).collect();
        let mut iovs = Vec::with_capacity(slices.len() + 1);
        iovs.push(libc::iovec {
            iov_base: header.as_ptr().cast_mut().cast(),
            iov_len: header.len(),
        });
        iovs.extend(guards.iter().zip(&slices).map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: s.len(),
        }));
        let count =
            libc::c_int::try_from(iovs.len()).map_err(|_| TapIo::Failed(Errno::EMSGSIZE))?;
        loop {
            // SAFETY: the first iovec points at `header` (12 bytes, borrowed for the call), the
            // others into mapped guest memory slices of at least `iov_len` bytes (vm-memory
            // checked each range; the guards keep them mapped). writev only reads them.
            let r = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), count) };
            match Errno::result(r) {
                // A tap takes a packet whole or not at all.
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(classify(e, false)),
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Whether an error means the interface is gone. A write to a tap that is merely down fails
/// with `EIO`, so only a read's `EIO` means gone; a deleted tap answers `EBADFD` to both.
fn classify(e: Errno, reading: bool) -> TapIo {
    match e {
        Errno::EBADFD | Errno::ENXIO | Errno::EBADF | Errno::ENODEV => TapIo::Gone(e),
        Errno::EIO if reading => TapIo::Gone(e),
        _ => TapIo::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let f = tempfile::tempfile().expect("temp file");
        assert!(matches!(
            Tap::new(OwnedFd::from(f)),
            Err(TapError::GetFlags(_))
        ));
    }

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        // _IOC(dir, 'T', nr, sizeof(int)): dir 2 = read, 1 = write.
        let ioc = |dir: libc::c_ulong, nr: libc::c_ulong| {
            (dir << 30) | (4 << 16) | (libc::c_ulong::from(b'T') << 8) | nr
        };
        assert_eq!(TUNGETIFF, ioc(2, 210));
        assert_eq!(TUNSETVNETHDRSZ, ioc(1, 216));
        assert_eq!(TUNSETOFFLOAD, ioc(1, 208));
    }
}
