//! Steps 2 and 3: new namespaces, then an empty, read-only root.

use std::io;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::statfs::{TMPFS_MAGIC, statfs};
use nix::unistd::{chdir, pivot_root};

use crate::Error;

/// Directories the empty root may be mounted on. Any will do: the mount lives only in the new
/// mount namespace and becomes `/` at once.
const MOUNT_POINTS: [&str; 3] = ["/tmp", "/mnt", "/proc"];

/// Options of the new root: read-only, nothing executable, no devices, one inode (the root).
const ROOT_OPTIONS: &str = "size=4k,nr_inodes=2,mode=0555";

/// Unshares the mount, IPC, UTS and cgroup namespaces, and the network namespace unless the
/// process is to keep the host's (`netcfg`).
pub(crate) fn unshare_namespaces(keep_host_network: bool) -> Result<(), Error> {
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    if !keep_host_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| Error::Unshare(e.into()))
}

/// Makes an empty read-only tmpfs the root and detaches the old root entirely.
pub(crate) fn pivot_to_empty_root() -> Result<(), Error> {
    let error = |op: &'static str| {
        move |e: nix::Error| Error::PivotRoot {
            op: op.to_owned(),
            source: e.into(),
        }
    };
    // Nothing done below may propagate back to the host's mounts (pivot_root also refuses a
    // shared parent mount).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(error("making mounts private"))?;

    let Some(point) = MOUNT_POINTS.iter().find(|p| Path::new(p).is_dir()) else {
        return Err(Error::PivotRoot {
            op: format!("finding a mount point among {MOUNT_POINTS:?}"),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        });
    };
    mount(
        Some("tmpfs"),
        *point,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(ROOT_OPTIONS),
    )
    .map_err(error("mounting the empty root"))?;
    chdir(*point).map_err(error("entering the empty root"))?;
    // pivot_root(".", "."): the old root ends up mounted on top of the new one, where a lazy
    // unmount removes it; no directory for it is needed in the (read-only) new root.
    pivot_root(".", ".").map_err(error("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(error("detaching the old root"))?;
    chdir("/").map_err(error("entering the new root"))?;
    verify_empty_root()
}

/// The root must now be an empty tmpfs.
fn verify_empty_root() -> Result<(), Error> {
    let failed = |op: String| Error::PivotRoot {
        op,
        source: io::Error::other("the new root is not the empty tmpfs"),
    };
    let fs = statfs("/").map_err(|e| Error::PivotRoot {
        op: "checking the new root".to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != TMPFS_MAGIC {
        return Err(failed(format!(
            "root file system type is {:?}",
            fs.filesystem_type()
        )));
    }
    let entries = std::fs::read_dir("/").map_err(|source| Error::PivotRoot {
        op: "listing the new root".to_owned(),
        source,
    })?;
    if let Some(entry) = entries.into_iter().next() {
        return Err(failed(format!("the new root contains {entry:?}")));
    }
    Ok(())
}
