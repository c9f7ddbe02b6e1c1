//! The raw system calls `nix` does not wrap. Every `unsafe` block of the crate is here.

use std::io;
use std::os::fd::RawFd;

/// Capability sets as 64-bit masks (bit n = capability n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CapSets {
    pub(crate) effective: u64,
    pub(crate) permitted: u64,
    pub(crate) inheritable: u64,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit data words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn check_int(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Closes every descriptor in `first..=last`.
///
/// Callers must own every descriptor in the range: objects still holding one would later act
/// on a reused number. `enter` documents that descriptors outside the profile are invalidated.
pub(crate) fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range takes no pointers. Closing descriptors other Rust objects may own is
    // the documented effect of `enter` (see its "Descriptors" section).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_uint::from(first),
            libc::c_uint::from(last),
            0 as libc::c_uint,
        )
    };
    check(rc).map(drop)
}

/// Whether `fd` is an open descriptor.
pub(crate) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD reads the descriptor flags and takes no pointer.
    let rc = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    rc >= 0
}

/// `dup2(old, new)`: makes `new` refer to what `old` does, closing what `new` referred to.
pub(crate) fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes no pointers. `new` is one of the stdio numbers, which `enter` replaces
    // by design; std's stdio handles do not own them.
    let rc = unsafe { libc::dup2(old, new) };
    check_int(rc).map(drop)
}

/// Reads the calling thread's capability sets.
pub(crate) fn capget() -> io::Result<CapSets> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: the header and the two-element data array are valid for the kernel to read and
    // write for the duration of the call, as _LINUX_CAPABILITY_VERSION_3 requires.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    check(rc)?;
    let [low, high] = data;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(low.effective, high.effective),
        permitted: join(low.permitted, high.permitted),
        inheritable: join(low.inheritable, high.inheritable),
    })
}

/// Sets the calling thread's capability sets.
pub(crate) fn capset(sets: CapSets) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Both halves fit by construction; the fallbacks are unreachable.
    let split = |v: u64| -> (u32, u32) {
        (
            u32::try_from(v & u64::from(u32::MAX)).unwrap_or(u32::MAX),
            u32::try_from(v >> 32).unwrap_or(u32::MAX),
        )
    };
    let (eff_lo, eff_hi) = split(sets.effective);
    let (perm_lo, perm_hi) = split(sets.permitted);
    let (inh_lo, inh_hi) = split(sets.inheritable);
    let data = [
        CapData {
            effective: eff_lo,
            permitted: perm_lo,
            inheritable: inh_lo,
        },
        CapData {
            effective: eff_hi,
            permitted: perm_hi,
            inheritable: inh_hi,
        },
    ];
    // SAFETY: the header and data array are valid for the call; the kernel only reads the data.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    check(rc).map(drop)
}

/// `prctl` for the options used here, which take integer arguments only.
fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<libc::c_int> {
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_CAPBSET_READ, PR_CAPBSET_DROP and PR_CAP_AMBIENT read only their integer
    // arguments; the unused ones are zero as the kernel requires.
    let rc = unsafe { libc::prctl(option, arg2, arg3, zero, zero) };
    check_int(rc)
}

/// Whether capability `cap` is in the bounding set; `Err(EINVAL)` past the last capability.
pub(crate) fn capbset_read(cap: u32) -> io::Result<bool> {
    prctl(libc::PR_CAPBSET_READ, cap.into(), 0).map(|v| v == 1)
}

/// Removes capability `cap` from the bounding set.
pub(crate) fn capbset_drop(cap: u32) -> io::Result<()> {
    prctl(libc::PR_CAPBSET_DROP, cap.into(), 0).map(drop)
}

/// Empties the ambient capability set.
pub(crate) fn ambient_clear_all() -> io::Result<()> {
    // PR_CAP_AMBIENT_CLEAR_ALL = 4; the remaining arguments must be zero.
    prctl(libc::PR_CAP_AMBIENT, 4, 0).map(drop)
}

/// Whether capability `cap` is in the ambient set.
pub(crate) fn ambient_is_set(cap: u32) -> io::Result<bool> {
    // PR_CAP_AMBIENT_IS_SET = 1.
    prctl(libc::PR_CAP_AMBIENT, 1, cap.into()).map(|v| v == 1)
}

/// The running kernel's Landlock ABI version (`Err` with ENOSYS or EOPNOTSUPP without Landlock).
pub(crate) fn landlock_abi() -> io::Result<i32> {
    // LANDLOCK_CREATE_RULESET_VERSION = 1 << 0: with a null attribute and size 0, the call
    // returns the ABI version instead of creating a ruleset.
    // SAFETY: a null attribute pointer with size 0 is the documented form of the version query.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    let version = check(rc)?;
    i32::try_from(version).map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))
}
