//! Shared memory the supervisor creates for its children: guest RAM, the framebuffer, a
//! disk's in-flight region.
//!
//! Each is a memfd of a fixed size, sealed against shrinking, growing and further seals before
//! any child sees it: a child that could shrink it would make every other holder's mapping
//! fault (`SIGBUS`) past the new end.

use std::ffi::CStr;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

/// A zero-filled memfd of `bytes` named `name` (as `/proc/PID/fd` shows it), sealed.
pub fn sealed(name: &CStr, bytes: u64) -> nix::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let len = libc::off_t::try_from(bytes).map_err(|_| nix::Error::EFBIG)?;
    nix::unistd::ftruncate(&fd, len)?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_memfd_has_its_size_and_cannot_be_resized() {
        let fd = sealed(c"capvm-test", 1 << 20).expect("memfd");
        let file = std::fs::File::from(fd);
        assert_eq!(file.metadata().expect("stat").len(), 1 << 20);
        assert!(file.set_len(4096).is_err(), "shrinking must fail");
        assert!(file.set_len(2 << 20).is_err(), "growing must fail");
    }
}
