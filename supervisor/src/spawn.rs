//! Starting a sandboxed child process with its bootstrap.
//!
//! The child gets exactly one inherited descriptor, its bootstrap channel on fd 3 (stdin is
//! /dev/null; stdout and stderr are inherited only until the child closes them on entering
//! capability mode). Everything else — guest RAM, disks, taps, its log — travels as `SCM_RIGHTS`
//! in the [`Bootstrap`] message, so what a child holds is written down in one place.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::bootstrap::{Bootstrap, BootstrapReply};
use proto::channel::{Channel, ChannelError, ChannelKind};

/// How long a child may take from exec to `Ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable naming the directory that holds the child binaries.
pub const LIBEXEC_ENV: &str = "CAPVM_LIBEXEC";

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("creating the bootstrap channel failed")]
    Channel(#[source] ChannelError),
    #[error("starting {path} failed")]
    Exec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrap of {role} failed")]
    Bootstrap {
        role: &'static str,
        #[source]
        source: ChannelError,
    },
    #[error("{role} failed to start at its {stage} stage: {error}")]
    ChildFailed {
        role: &'static str,
        stage: String,
        error: String,
    },
    #[error("{role} reported pid {reported}, but its pid is {actual}")]
    PidMismatch {
        role: &'static str,
        reported: u32,
        actual: u32,
    },
}

/// A child that has entered capability mode and reported ready.
#[derive(Debug)]
pub struct Running {
    /// The child process.
    pub process: Child,
    /// The supervisor's end of the bootstrap channel; dropping it asks the child to exit.
    pub channel: Channel,
}

/// Finds a child binary: in `$CAPVM_LIBEXEC` if set, else beside the running executable.
pub fn binary_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(LIBEXEC_ENV) {
        return Path::new(&dir).join(name);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts `binary` with `bootstrap` and the descriptors it names, and waits for `Ready`.
///
/// `fds` must be in the order of `bootstrap.fds`. On any failure the child is killed and reaped.
pub fn spawn(
    binary: &Path,
    bootstrap: &Bootstrap,
    fds: &[BorrowedFd<'_>],
) -> Result<Running, SpawnError> {
    let role = bootstrap.role.name();
    let (ours, theirs) = Channel::pair().map_err(SpawnError::Channel)?;
    let theirs_raw = theirs.as_raw_fd();

    let mut cmd = Command::new(binary);
    cmd.stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and calls only dup2, fcntl and
    // sigprocmask, which are async-signal-safe; `theirs_raw` stays open in the parent until
    // after spawn returns, so it is a valid descriptor in the child.
    unsafe {
        cmd.pre_exec(move || {
            place_bootstrap_fd(theirs_raw)?;
            unblock_signals()
        });
    }
    let mut process = cmd.spawn().map_err(|source| SpawnError::Exec {
        path: binary.to_path_buf(),
        source,
    })?;
    drop(theirs);

    match bootstrap_child(&ours, bootstrap, fds, role, process.id()) {
        Ok(()) => Ok(Running {
            process,
            channel: ours,
        }),
        Err(e) => {
            let _ = process.kill();
            let _ = process.wait();
            Err(e)
        }
    }
}

fn bootstrap_child(
    channel: &Channel,
    bootstrap: &Bootstrap,
    fds: &[BorrowedFd<'_>],
    role: &'static str,
    pid: u32,
) -> Result<(), SpawnError> {
    let chan_err = |source| SpawnError::Bootstrap { role, source };
    channel
        .handshake(ChannelKind::Bootstrap)
        .map_err(chan_err)?;
    channel.send(bootstrap, fds).map_err(chan_err)?;
    let reply = channel
        .recv_timeout::<BootstrapReply>(READY_TIMEOUT)
        .map_err(chan_err)?;
    match reply.msg {
        BootstrapReply::Ready { pid: reported } if reported == pid => Ok(()),
        BootstrapReply::Ready { pid: reported } => Err(SpawnError::PidMismatch {
            role,
            reported,
            actual: pid,
        }),
        BootstrapReply::Failed { stage, error } => {
            Err(SpawnError::ChildFailed { role, stage, error })
        }
    }
}

/// In the child, between fork and exec: an empty signal mask, since the per-VM supervisor
/// blocks the signals it reads from a signalfd and a mask survives exec.
fn unblock_signals() -> std::io::Result<()> {
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before use; sigprocmask
    // only reads it; both are async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// In the child, between fork and exec: put the bootstrap socket on fd 3, inheritable.
fn place_bootstrap_fd(fd: i32) -> std::io::Result<()> {
    const TARGET: i32 = 3;
    if fd == TARGET {
        // SAFETY: fcntl on a descriptor this process owns; async-signal-safe.
        if unsafe { libc::fcntl(TARGET, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 onto fd 3 in the freshly forked child; async-signal-safe. The duplicate does
    // not carry FD_CLOEXEC, so it survives exec.
    if unsafe { libc::dup2(fd, TARGET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
