//! Step 1: close every descriptor the profile does not keep.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{IntoRawFd, RawFd};

use crate::{Error, sys};

const STDIO: [RawFd; 3] = [0, 1, 2];

/// Keeps exactly `keep` open, points unkept stdio numbers at `/dev/null` and closes the rest.
pub(crate) fn close_all_except(keep: &[RawFd]) -> Result<(), Error> {
    let error = |op: String| move |source| Error::CloseFds { op, source };
    for &fd in keep {
        if fd < 0 || !sys::fd_is_open(fd) {
            return Err(Error::CloseFds {
                op: format!("descriptor {fd} is to be kept but is not open"),
                source: io::Error::from_raw_os_error(libc::EBADF),
            });
        }
    }

    // Stdio numbers must stay occupied: a descriptor received later (over SCM_RIGHTS, say)
    // would otherwise take number 2, and a panic message would be written into it.
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(error("opening /dev/null".to_owned()))?
        // Closed by number below, so no owner may close it again.
        .into_raw_fd();
    for fd in STDIO {
        if !keep.contains(&fd) {
            sys::dup2(null, fd).map_err(error(format!("replacing descriptor {fd}")))?;
        }
    }

    let mut open: Vec<u32> = keep
        .iter()
        .chain(STDIO.iter())
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    open.sort_unstable();
    open.dedup();
    // Close the gaps between kept descriptors, then everything above the last one. This also
    // closes the /dev/null descriptor itself, unless the caller happened to keep its number.
    let mut next = 0u32;
    for fd in open {
        if fd > next {
            sys::close_range(next, fd.saturating_sub(1))
                .map_err(error(format!("closing {next}..{fd}")))?;
        }
        next = fd.saturating_add(1);
    }
    sys::close_range(next, u32::MAX).map_err(error(format!("closing {next} and above")))?;
    Ok(())
}
