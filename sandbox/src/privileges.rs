//! Steps 5 and 6: become an unprivileged user with no capabilities (or, for `netcfg`, only
//! `CAP_NET_ADMIN`), then `no_new_privs` and non-dumpable.

use std::io;

use nix::sys::prctl;
use nix::unistd::{Gid, Uid, getgroups, getresgid, getresuid, setgroups, setresgid, setresuid};

use crate::{Error, Profile, sys};

/// `CAP_NET_ADMIN`, the one capability `netcfg` keeps.
pub const CAP_NET_ADMIN: u32 = 12;

/// The highest capability number the kernel knows (`/proc/sys/kernel/cap_last_cap`), found by
/// asking the bounding set, which answers EINVAL past it.
pub(crate) fn last_cap() -> Result<u32, Error> {
    let mut last = None;
    for cap in 0..64u32 {
        match sys::capbset_read(cap) {
            Ok(_) => last = Some(cap),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(source) => {
                return Err(Error::DropPrivileges {
                    op: format!("reading bounding-set capability {cap}"),
                    source,
                });
            }
        }
    }
    last.ok_or_else(|| Error::DropPrivileges {
        op: "finding the last capability".to_owned(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// The capability mask the profile keeps.
pub(crate) fn kept_caps(profile: &Profile) -> u64 {
    if profile.keep_net_admin {
        1 << CAP_NET_ADMIN
    } else {
        0
    }
}

/// Clears the bounding and ambient sets, the supplementary groups, switches to the profile's
/// uid/gid and sets the capability sets to exactly the kept ones; then checks every piece.
pub(crate) fn drop_privileges(profile: &Profile, last_cap: u32) -> Result<(), Error> {
    let kept = kept_caps(profile);
    let fail = |op: &str| {
        let op = op.to_owned();
        move |source: io::Error| Error::DropPrivileges { op, source }
    };
    let nix_fail = |op: &str| {
        let op = op.to_owned();
        move |e: nix::Error| Error::DropPrivileges {
            op,
            source: e.into(),
        }
    };

    if kept != 0 {
        // Keep the permitted set across the uid change; capset below trims it to `kept`.
        prctl::set_keepcaps(true).map_err(nix_fail("PR_SET_KEEPCAPS"))?;
    }
    for cap in 0..=last_cap {
        if kept & (1 << cap) == 0 {
            sys::capbset_drop(cap).map_err(fail("PR_CAPBSET_DROP"))?;
        }
    }
    sys::ambient_clear_all().map_err(fail("PR_CAP_AMBIENT_CLEAR_ALL"))?;
    setgroups(&[]).map_err(nix_fail("setgroups"))?;
    let (uid, gid) = (Uid::from_raw(profile.uid), Gid::from_raw(profile.gid));
    setresgid(gid, gid, gid).map_err(nix_fail("setresgid"))?;
    setresuid(uid, uid, uid).map_err(nix_fail("setresuid"))?;
    sys::capset(sys::CapSets {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    })
    .map_err(fail("capset"))?;
    if kept != 0 {
        prctl::set_keepcaps(false).map_err(nix_fail("clearing PR_SET_KEEPCAPS"))?;
    }
    verify(profile, kept, last_cap)
}

fn verify(profile: &Profile, kept: u64, last_cap: u32) -> Result<(), Error> {
    let mismatch = |what: String| Error::DropPrivileges {
        op: "checking the result".to_owned(),
        source: io::Error::other(what),
    };
    let nix_fail = |op: &'static str| {
        move |e: nix::Error| Error::DropPrivileges {
            op: op.to_owned(),
            source: e.into(),
        }
    };
    let uids = getresuid().map_err(nix_fail("getresuid"))?;
    let gids = getresgid().map_err(nix_fail("getresgid"))?;
    let expected_uid = Uid::from_raw(profile.uid);
    let expected_gid = Gid::from_raw(profile.gid);
    if [uids.real, uids.effective, uids.saved] != [expected_uid; 3] || uids.real.is_root() {
        return Err(mismatch(format!("uids are {uids:?}")));
    }
    if [gids.real, gids.effective, gids.saved] != [expected_gid; 3] || gids.real.as_raw() == 0 {
        return Err(mismatch(format!("gids are {gids:?}")));
    }
    let groups = getgroups().map_err(nix_fail("getgroups"))?;
    if !groups.is_empty() {
        return Err(mismatch(format!("supplementary groups remain: {groups:?}")));
    }
    let caps = sys::capget().map_err(|source| Error::DropPrivileges {
        op: "capget".to_owned(),
        source,
    })?;
    let expected = sys::CapSets {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    };
    if caps != expected {
        return Err(mismatch(format!("capabilities are {caps:x?}")));
    }
    for cap in 0..=last_cap {
        let in_bounding = sys::capbset_read(cap).map_err(|source| Error::DropPrivileges {
            op: "PR_CAPBSET_READ".to_owned(),
            source,
        })?;
        if in_bounding != (kept & (1 << cap) != 0) {
            return Err(mismatch(format!("bounding set still has capability {cap}")));
        }
        let ambient = sys::ambient_is_set(cap).map_err(|source| Error::DropPrivileges {
            op: "PR_CAP_AMBIENT_IS_SET".to_owned(),
            source,
        })?;
        if ambient {
            return Err(mismatch(format!("ambient set still has capability {cap}")));
        }
    }
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS` (needed by Landlock and seccomp without `CAP_SYS_ADMIN`, and makes any
/// exec unable to gain privileges) and `PR_SET_DUMPABLE` 0 (no core dumps, and other processes
/// of the same uid may not ptrace it or open its `/proc` files).
pub(crate) fn no_new_privs() -> Result<(), Error> {
    let fail = |e: nix::Error| Error::NoNewPrivs(e.into());
    prctl::set_no_new_privs().map_err(fail)?;
    if !prctl::get_no_new_privs().map_err(fail)? {
        return Err(Error::NoNewPrivs(io::Error::other(
            "PR_GET_NO_NEW_PRIVS reads back 0",
        )));
    }
    prctl::set_dumpable(false).map_err(fail)?;
    if prctl::get_dumpable().map_err(fail)? {
        return Err(Error::NoNewPrivs(io::Error::other(
            "PR_GET_DUMPABLE reads back 1",
        )));
    }
    Ok(())
}
