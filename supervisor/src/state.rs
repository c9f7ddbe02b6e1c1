//! Whether a guest is running, from its `GUEST_DIR/run.lock`.
//!
//! The protocol, shared with the per-VM supervisor:
//!
//! - A running guest's supervisor holds an exclusive `flock(2)` on `GUEST_DIR/run.lock` for
//!   its whole life, and the file holds its pid in decimal. The kernel drops the lock when the
//!   process dies, however it dies, so a crashed supervisor never leaves a guest "running".
//! - [`probe`]: no file → stopped; a file whose lock nobody holds → stopped (a stale file
//!   left behind); lock held → running, with the pid read from the file (absent while the
//!   holder has not written it yet).
//! - [`GuestLock::acquire`] takes the lock (creating the file), for a supervisor about to
//!   start the guest, or for `vm destroy`/`vm rename`, which must not run beside one.
//!   It retries briefly, because [`probe`] takes a shared lock for an instant.
//! - Only a holder of the lock may unlink the file ([`GuestLock::remove`]); [`GuestLock::acquire`]
//!   checks after locking that the path still names the inode it locked, so a lock on an
//!   unlinked file is never mistaken for the guest's lock.
//!
//! `flock` is used rather than `fcntl` locks because it exists on FreeBSD too and is tied to
//! the open file, not to the process's other descriptors of the same file.

#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

/// The lock file in each guest directory.
pub const LOCK_FILE: &str = "run.lock";

/// How often [`GuestLock::acquire`] tries before it concludes the lock is held.
const ACQUIRE_TRIES: u32 = 5;
const ACQUIRE_PAUSE: Duration = Duration::from_millis(20);

/// Why the run state could not be read or the lock taken.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the guest is running ({})", pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}")))]
    Running { pid: Option<u32> },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError + use<> {
    let path = path.to_owned();
    move |source| StateError::Io { op, path, source }
}

/// A guest's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RunState {
    Stopped,
    Running { pid: Option<u32> },
}

impl fmt::Display for RunState {
    /// vm-bhyve's `vm list` wording: `Stopped`, `Running (PID)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunState::Stopped => f.write_str("Stopped"),
            RunState::Running { pid: Some(pid) } => write!(f, "Running ({pid})"),
            RunState::Running { pid: None } => f.write_str("Running"),
        }
    }
}

/// Reads the run state of the guest in `guest_dir` without disturbing a running guest.
pub fn probe(guest_dir: &Path) -> Result<RunState, StateError> {
    let path = guest_dir.join(LOCK_FILE);
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RunState::Stopped),
        Err(e) => return Err(io_err("opening", &path)(e)),
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_unlocked_on_drop) => Ok(RunState::Stopped),
        Err((mut file, Errno::EWOULDBLOCK)) => Ok(RunState::Running {
            pid: read_pid(&mut file),
        }),
        Err((_, errno)) => Err(io_err("locking", &path)(errno.into())),
    }
}

/// The pid written in a lock file; `None` if absent or not a pid.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok().filter(|&pid| pid > 0)
}

/// The exclusive run lock of one guest, held until dropped.
#[derive(Debug)]
pub struct GuestLock {
    lock: Flock<File>,
    path: PathBuf,
    created: bool,
}

impl GuestLock {
    /// Takes the run lock of the guest in `guest_dir`, or reports it running.
    pub fn acquire(guest_dir: &Path) -> Result<Self, StateError> {
        let path = guest_dir.join(LOCK_FILE);
        let mut tries = 0;
        loop {
            tries += 1;
            let (file, created) = open_lock_file(&path)?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    if tries >= ACQUIRE_TRIES {
                        return Err(StateError::Running {
                            pid: read_pid(&mut file),
                        });
                    }
                    std::thread::sleep(ACQUIRE_PAUSE);
                    continue;
                }
                Err((_, errno)) => return Err(io_err("locking", &path)(errno.into())),
            };
            // The previous holder may have unlinked the file between our open and our lock.
            let locked = lock.metadata().map_err(io_err("inspecting", &path))?;
            match fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == locked.ino() && now.dev() == locked.dev() => {
                    return Ok(GuestLock {
                        lock,
                        path,
                        created,
                    });
                }
                _ if tries < ACQUIRE_TRIES => {}
                Ok(_) | Err(_) => {
                    return Err(io_err("locking", &path)(io::Error::other(
                        "the lock file keeps being replaced",
                    )));
                }
            }
        }
    }

    /// Whether this lock created the lock file (it was absent, so the guest was stopped).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Replaces the file's content with `pid`, for [`probe`] to report.
    pub fn write_pid(&mut self, pid: u32) -> Result<(), StateError> {
        let file: &mut File = &mut self.lock;
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .and_then(|()| file.flush())
            .map_err(io_err("writing", &self.path))
    }

    /// Records that the guest directory was renamed to `guest_dir` while the lock was held
    /// (the lock file moved with it).
    pub fn relocate(&mut self, guest_dir: &Path) {
        self.path = guest_dir.join(LOCK_FILE);
    }

    /// Unlinks the lock file while still holding the lock, then releases it.
    pub fn remove(self) -> Result<(), StateError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &self.path)(e)),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<(File, bool), StateError> {
    let open = |create_new: bool| {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW);
        if create_new {
            options.create_new(true);
        }
        options.open(path)
    };
    match open(false) {
        Ok(f) => Ok((f, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match open(true) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(false)
                .map(|f| (f, false))
                .map_err(io_err("opening", path)),
            Err(e) => Err(io_err("creating", path)(e)),
        },
        Err(e) => Err(io_err("opening", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_lock_file_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe(dir.path()).unwrap(), RunState::Stopped);
    }

    #[test]
    fn stale_lock_file_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOCK_FILE), "12345\n").unwrap();
        assert_eq!(probe(dir.path()).unwrap(), RunState::Stopped);
    }

    #[test]
    fn held_lock_is_running_with_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut lock = GuestLock::acquire(dir.path()).unwrap();
        assert!(lock.created());
        assert_eq!(probe(dir.path()).unwrap(), RunState::Running { pid: None });
        lock.write_pid(4242).unwrap();
        let state = probe(dir.path()).unwrap();
        assert_eq!(state, RunState::Running { pid: Some(4242) });
        assert_eq!(state.to_string(), "Running (4242)");
        drop(lock);
        assert_eq!(probe(dir.path()).unwrap(), RunState::Stopped);
    }

    #[test]
    fn second_acquire_reports_running() {
        let dir = tempfile::tempdir().unwrap();
        let mut lock = GuestLock::acquire(dir.path()).unwrap();
        lock.write_pid(7).unwrap();
        match GuestLock::acquire(dir.path()) {
            Err(StateError::Running { pid }) => assert_eq!(pid, Some(7)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn probe_does_not_block_a_later_acquire() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOCK_FILE), "").unwrap();
        assert_eq!(probe(dir.path()).unwrap(), RunState::Stopped);
        let lock = GuestLock::acquire(dir.path()).unwrap();
        assert!(!lock.created());
    }

    #[test]
    fn remove_unlinks_and_releases() {
        let dir = tempfile::tempdir().unwrap();
        let lock = GuestLock::acquire(dir.path()).unwrap();
        lock.remove().unwrap();
        assert!(!dir.path().join(LOCK_FILE).exists());
        assert_eq!(probe(dir.path()).unwrap(), RunState::Stopped);
    }

    #[test]
    fn garbage_pid_reads_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let lock = GuestLock::acquire(dir.path()).unwrap();
        fs::write(dir.path().join(LOCK_FILE), "not a pid").unwrap();
        assert_eq!(probe(dir.path()).unwrap(), RunState::Running { pid: None });
        drop(lock);
    }
}
