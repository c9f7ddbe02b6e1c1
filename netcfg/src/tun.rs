//! Turning a `/dev/net/tun` descriptor into a tap: `TUNSETIFF` (`include/uapi/linux/if_tun.h`).
//!
//! The one `ioctl` netcfg makes; the seccomp policy allows it by number and nothing else.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// A layer-2 device.
pub const IFF_TAP: i16 = 0x0002;
/// No 4-byte packet-information prefix.
pub const IFF_NO_PI: i16 = 0x1000;
/// Frames carry a `virtio_net_hdr` (dev-net's offloads).
pub const IFF_VNET_HDR: i16 = 0x4000;
/// The tap has several queues, one per descriptor (`TUNSETIFF` on each, same name).
pub const IFF_MULTI_QUEUE: i16 = 0x0100;
/// Fail with `EBUSY` rather than attach to a tap that already exists.
// 0x8000 does not fit an i16 literal; the kernel's `short` holds the same bits.
pub const IFF_TUN_EXCL: i16 = i16::from_ne_bytes(0x8000u16.to_ne_bytes());

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags, in a 40-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// Makes `tun` the new tap `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, with
/// `IFF_MULTI_QUEUE` when `multi_queue`), refusing to attach to an existing device
/// (`IFF_TUN_EXCL`: `EBUSY`).
pub fn create_tap(tun: BorrowedFd<'_>, name: &str, multi_queue: bool) -> io::Result<()> {
    let mq = if multi_queue { IFF_MULTI_QUEUE } else { 0 };
    set_iff(
        tun,
        name,
        IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL | mq,
    )
}

/// Attaches `tun` as a further queue of the multi-queue tap `name` that [`create_tap`] just
/// made; the kernel refuses (`EINVAL`) if `name` is not a multi-queue tap with these flags.
pub fn attach_queue(tun: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    set_iff(
        tun,
        name,
        IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
    )
}

fn set_iff(tun: BorrowedFd<'_>, name: &str, flags: i16) -> io::Result<()> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    // Leave room for the terminating NUL.
    let room = req.name.len().saturating_sub(1);
    if name.len() > room {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    if let Some(dst) = req.name.get_mut(..name.len()) {
        dst.copy_from_slice(name.as_bytes());
    }
    // SAFETY: `req` is a live, properly laid out `struct ifreq` of 40 bytes (name, short
    // flags, padding); TUNSETIFF reads it and writes back at most the same 40 bytes. The fd is
    // borrowed for the duration of the call; on a descriptor that is not a tun device the
    // kernel answers ENOTTY/EBADFD without touching memory.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn ifreq_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(IFF_TUN_EXCL.cast_unsigned(), 0x8000);
    }

    #[test]
    fn a_name_too_long_is_refused_before_the_ioctl() {
        let (r, _w) = std::io::pipe().unwrap();
        let err = create_tap(r.as_fd(), "sixteen-chars-xx", false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    }

    #[test]
    fn a_descriptor_that_is_not_tun_is_refused_by_the_kernel() {
        let (r, _w) = std::io::pipe().unwrap();
        assert!(create_tap(r.as_fd(), "capvm-tap0", true).is_err());
        assert!(attach_queue(r.as_fd(), "capvm-tap0").is_err());
    }
}
