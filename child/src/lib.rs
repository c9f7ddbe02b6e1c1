//! What every sandboxed capvm child does before anything else.
//!
//! A child (vcpu-runner, dev-blk, dev-net, dev-fb, netcfg) is started by its supervisor with
//! exactly one open descriptor of interest, fd 3: a `SOCK_SEQPACKET` bootstrap channel. On it the
//! child receives its [`proto::bootstrap::Bootstrap`] and every descriptor it will ever hold,
//! starts logging to its log descriptor, enters capability mode with its own seccomp policy and
//! reports [`proto::bootstrap::BootstrapReply::Ready`]. Only then may it read guest-controlled
//! data.
//!
//! Trusts: the supervisor (its parent) for the bootstrap message, which is still validated.
//! Touches: fd 3 and the descriptors it receives; nothing by path.

pub mod guest_ram;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::stat::{SFlag, fstat};
use proto::bootstrap::{Bootstrap, BootstrapReply, FdRole, Role};
use proto::channel::{Channel, ChannelError, ChannelKind};
use sandbox::{Policy, Profile, Weaken};

/// The descriptor number on which every child finds its bootstrap channel.
pub const BOOTSTRAP_FD: RawFd = 3;

/// How long a child waits for its bootstrap message before giving up.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a child holds once it is in capability mode.
#[derive(Debug)]
pub struct Started {
    /// The bootstrap message as received (and validated).
    pub bootstrap: Bootstrap,
    /// The bootstrap channel, kept open: the supervisor closes it to ask the child to exit.
    pub channel: Channel,
    /// Every descriptor the supervisor passed, with its role, in the order sent (the log
    /// descriptor is consumed by logging and not listed).
    pub fds: Vec<(FdRole, OwnedFd)>,
}

impl Started {
    /// Takes the first descriptor passed with `role`, if any.
    pub fn take_fd(&mut self, role: &FdRole) -> Option<OwnedFd> {
        let pos = self.fds.iter().position(|(r, _)| r == role)?;
        Some(self.fds.remove(pos).1)
    }
}

/// Which kind of sandbox a child process asks for.
#[derive(Debug, Clone, Copy)]
pub struct ChildKind {
    /// The role this binary plays; a bootstrap for another role is refused.
    pub role_name: &'static str,
    /// The process's own seccomp policy text (its `seccomp.policy`), added to the base policy.
    pub policy: &'static str,
    /// Whether the process creates threads after entering capability mode.
    pub threads: bool,
}

/// Why a child could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("fd {BOOTSTRAP_FD} is not a bootstrap socket (start this program through `vm`)")]
    NoBootstrapSocket,
    #[error("bootstrap channel failed")]
    Channel(#[from] ChannelError),
    #[error("invalid bootstrap message: {0}")]
    InvalidBootstrap(String),
    #[error("this is {ours}, but the bootstrap is for {theirs}")]
    WrongRole {
        ours: &'static str,
        theirs: &'static str,
    },
    #[error("reading the seccomp policy failed")]
    Policy(#[from] sandbox::PolicyError),
    #[error("entering capability mode failed")]
    Sandbox(#[from] sandbox::Error),
}

impl StartError {
    fn stage(&self) -> &'static str {
        match self {
            Self::NoBootstrapSocket | Self::Channel(_) => "bootstrap",
            Self::InvalidBootstrap(_) | Self::WrongRole { .. } => "validate",
            Self::Policy(_) => "policy",
            Self::Sandbox(_) => "sandbox",
        }
    }
}

/// Takes the bootstrap from fd 3, starts logging, enters capability mode and reports ready.
///
/// On failure after the channel is up, the supervisor is told which stage failed and why.
pub fn start(kind: ChildKind) -> Result<Started, StartError> {
    start_with(kind, &mut Vec::new)
}

/// [`start`], running `prepare` after the bootstrap is received and before capability mode
/// is entered: for what the sandbox then forbids making (dev-blk's restricted `io_uring`
/// rings). `prepare` returns the descriptors it made, which the sandbox keeps open.
pub fn start_with(
    kind: ChildKind,
    prepare: &mut dyn FnMut() -> Vec<RawFd>,
) -> Result<Started, StartError> {
    let channel = bootstrap_channel()?;
    channel.handshake(ChannelKind::Bootstrap)?;
    match start_on(&channel, kind, prepare) {
        Ok((bootstrap, fds)) => {
            let pid = std::process::id();
            channel.send(&BootstrapReply::Ready { pid }, &[])?;
            tracing::info!(role = bootstrap.role.name(), vm = %bootstrap.vm_name, pid, "in capability mode");
            Ok(Started {
                bootstrap,
                channel,
                fds,
            })
        }
        Err(e) => {
            let reply = BootstrapReply::Failed {
                stage: e.stage().to_string(),
                error: error_chain(&e),
            };
            // The supervisor may already be gone; the original error is what matters.
            let _ = channel.send(&reply, &[]);
            Err(e)
        }
    }
}

fn start_on(
    channel: &Channel,
    kind: ChildKind,
    prepare: &mut dyn FnMut() -> Vec<RawFd>,
) -> Result<(Bootstrap, Vec<(FdRole, OwnedFd)>), StartError> {
    let received = channel.recv_timeout::<Bootstrap>(BOOTSTRAP_TIMEOUT)?;
    let (bootstrap, fds) = (received.msg, received.fds);
    bootstrap
        .validate(fds.len())
        .map_err(|e| StartError::InvalidBootstrap(e.to_string()))?;
    if bootstrap.role.name() != kind.role_name {
        return Err(StartError::WrongRole {
            ours: kind.role_name,
            theirs: bootstrap.role.name(),
        });
    }

    let mut fds = bootstrap
        .pair_fds(fds)
        .map_err(|e| StartError::InvalidBootstrap(e.to_string()))?;
    let mut log_fd = None;
    if let Some(pos) = fds.iter().position(|(r, _)| *r == FdRole::Log) {
        let (_, log) = fds.remove(pos);
        log_fd = init_logging(log, &bootstrap.log_filter);
    }

    let mut keep: Vec<RawFd> = vec![channel.as_raw_fd()];
    keep.extend(fds.iter().map(|(_, fd)| fd.as_raw_fd()));
    keep.extend(log_fd);
    keep.extend(prepare());
    let policy = Policy::parse(kind.policy)?;
    let profile = Profile {
        name: kind.role_name.to_string(),
        keep_fds: keep,
        uid: bootstrap.sandbox.uid,
        gid: bootstrap.sandbox.gid,
        max_fds: u64::from(bootstrap.sandbox.max_fds),
        policy,
        threads: kind.threads,
        keep_net_admin: matches!(bootstrap.role, Role::Netcfg),
        weaken: Weaken::default(),
    };
    sandbox::enter(&profile)?;
    Ok((bootstrap, fds))
}

/// Sends this process's `tracing` output to `fd`; returns the descriptor number logging now owns
/// (so the sandbox keeps it open), or `None` if a subscriber was already installed.
fn init_logging(fd: OwnedFd, filter: &str) -> Option<RawFd> {
    let raw = fd.as_raw_fd();
    let file = File::from(fd);
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init()
        .is_ok();
    installed.then_some(raw)
}

fn bootstrap_channel() -> Result<Channel, StartError> {
    // SAFETY: fd 3 is only borrowed for fstat here; nothing else in this process uses it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(BOOTSTRAP_FD) };
    let st = fstat(borrowed).map_err(|_| StartError::NoBootstrapSocket)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(StartError::NoBootstrapSocket);
    }
    // SAFETY: fd 3 is open (fstat succeeded), is a socket, and nothing else in this process owns
    // it: the supervisor placed it there for us alone, and this function runs once.
    let fd = unsafe { OwnedFd::from_raw_fd(BOOTSTRAP_FD) };
    Ok(Channel::from_fd(fd))
}

/// `e` and its sources, joined by ": " (for logs and `Failed` replies).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Whether the supervisor closed the bootstrap channel (other traffic is read and dropped):
/// a device process's signal to exit.
pub fn supervisor_hung_up(bootstrap: &Channel) -> bool {
    match bootstrap.recv_timeout::<proto::bootstrap::BootstrapReply>(std::time::Duration::ZERO) {
        Err(ChannelError::Closed) => true,
        Err(ChannelError::Timeout | ChannelError::WouldBlock) | Ok(_) => false,
        Err(e) => {
            tracing::debug!(error = %e, "ignoring a malformed packet on the bootstrap channel");
            false
        }
    }
}

/// Consumes an eventfd's count (a kick) so it stops polling readable. Call it only when the fd
/// polled readable: a blocking eventfd with no count would block.
pub fn drain_eventfd(f: &mut File) {
    let mut buf = [0u8; 8];
    let _ = std::io::Read::read(f, &mut buf);
}

/// Waits until the supervisor closes the bootstrap channel, the signal for a child that has
/// nothing else to do yet to exit cleanly.
///
/// Nothing is expected on the channel yet: a message that arrives is logged and dropped; any
/// channel failure other than a malformed packet ends the wait too.
pub fn wait_for_close(channel: &Channel) {
    loop {
        match channel.recv::<BootstrapReply>() {
            Ok(_) => tracing::debug!("ignoring an unexpected message on the bootstrap channel"),
            Err(
                ChannelError::Truncated { .. }
                | ChannelError::LengthMismatch { .. }
                | ChannelError::Decode(_)
                | ChannelError::TrailingBytes { .. }
                | ChannelError::TooManyFds
                | ChannelError::BadMagic { .. }
                | ChannelError::TooLarge,
            ) => tracing::debug!("ignoring a malformed packet on the bootstrap channel"),
            Err(ChannelError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bootstrap channel failed");
                return;
            }
        }
    }
}

/// Reads the one setup message a child gets on its bootstrap channel after `Ready` (a
/// device's `DeviceSetup`, dev-fb's `DisplaySetup`). A malformed packet is logged and skipped;
/// `Ok(None)` means the supervisor hung up before sending it (the child should exit quietly).
pub fn recv_setup<T: serde::de::DeserializeOwned>(
    channel: &Channel,
) -> Result<Option<T>, ChannelError> {
    loop {
        match channel.recv::<T>() {
            Ok(received) => return Ok(Some(received.msg)),
            Err(ChannelError::Closed) => {
                tracing::info!("supervisor closed the channel before the setup; exiting");
                return Ok(None);
            }
            Err(e @ (ChannelError::Recv(_) | ChannelError::Send(_))) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "ignoring a malformed setup message"),
        }
    }
}

/// The whole life of a child whose device model is not written yet: start, then wait until the
/// supervisor hangs up.
pub fn start_and_wait(kind: ChildKind) -> Result<(), StartError> {
    let started = start(kind)?;
    wait_for_close(&started.channel);
    tracing::info!("supervisor closed the channel; exiting");
    Ok(())
}
