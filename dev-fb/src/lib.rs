//! `dev-fb`: the guest's display as a VNC (RFB) server, and keyboard and pointer input from it.
//!
//! Started by the per-VM supervisor with its bootstrap channel on fd 3. It receives its log,
//! the framebuffer memfd ([`FdRole::Framebuffer`], BAR0 of the bochs display the runner shows
//! the guest) and the listening VNC socket ([`FdRole::VncListener`], bound by the supervisor),
//! enters capability mode (`child::start`, with this crate's `seccomp.policy`), reads a
//! [`DisplaySetup`] on the bootstrap channel, maps the framebuffer read-only and serves VNC
//! clients until the supervisor closes the channel. Mode changes arrive on the same channel as
//! [`proto::display::ToDisplay`].
//!
//! Layout:
//! - [`message`]: client messages and the version string, parsed with every length bounded.
//! - [`session`]: one client's protocol state machine (handshake, messages, owed updates); pure.
//! - [`server`]: the single-threaded `poll` loop: accept, read, scan, write, drop.
//! - [`framebuffer`]: the read-only mapping, the current mode, tile change detection.
//! - [`encode`]: Raw, Zlib, ZRLE and the pseudo-encodings.
//! - [`pixel`]: client pixel formats and conversion from the guest's XRGB8888/RGB565.
//! - [`auth`]: VNC Authentication (DES challenge).
//! - [`keymap`], [`input`]: keysyms and XT scancodes to evdev codes; the [`input::InputSink`]
//!   the virtio-input devices will consume.
//!
//! Trusts: its supervisor, for the bootstrap and setup (still validated). Trusts no VNC client
//! and no byte of the framebuffer. Touches: only the descriptors it was given; it accepts on
//! the listener but opens nothing.
//!
//! [`FdRole::Framebuffer`]: proto::bootstrap::FdRole::Framebuffer
//! [`FdRole::VncListener`]: proto::bootstrap::FdRole::VncListener

// RFB message and field names (SetEncodings, ClientInit, CPIXEL) read better bare in prose.
#![allow(clippy::doc_markdown)]

pub mod auth;
pub mod encode;
pub mod framebuffer;
pub mod input;
pub mod keymap;
pub mod message;
pub mod pixel;
pub mod server;
pub mod session;

use std::net::TcpListener;

use proto::bootstrap::FdRole;
use proto::channel::ChannelError;
use proto::display::{DisplayError, DisplaySetup};

/// This process's seccomp policy, on top of the sandbox's base policy.
pub const SECCOMP_POLICY: &str = include_str!("../seccomp.policy");

/// The role name this binary answers to.
pub const ROLE: &str = "dev-fb";

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] child::StartError),
    #[error("reading the display setup failed")]
    Setup(#[source] ChannelError),
    #[error("the display setup is invalid")]
    InvalidSetup(#[from] DisplayError),
    #[error("the bootstrap did not pass a {0:?} descriptor")]
    MissingFd(FdRole),
    #[error("mapping the framebuffer failed")]
    Framebuffer(#[from] framebuffer::FramebufferError),
    #[error("the VNC server failed")]
    Server(#[from] server::ServerError),
}

/// Runs the process: bootstrap, capability mode, display setup, then serve until the
/// supervisor hangs up.
pub fn run() -> Result<(), RunError> {
    let mut started = child::start(child::ChildKind {
        role_name: ROLE,
        policy: SECCOMP_POLICY,
        threads: false,
    })?;
    let Some(setup) =
        child::recv_setup::<DisplaySetup>(&started.channel).map_err(RunError::Setup)?
    else {
        return Ok(());
    };
    setup.validate()?;
    let mut take = |role| started.take_fd(&role).ok_or(RunError::MissingFd(role));
    let fb_fd = take(FdRole::Framebuffer)?;
    let listener = TcpListener::from(take(FdRole::VncListener)?);
    let display = started
        .take_fd(&FdRole::DisplayChannel)
        .map(proto::Channel::from_fd);
    let fb = framebuffer::Framebuffer::map(fb_fd, setup.framebuffer_bytes)?;
    tracing::info!(
        width = setup.width,
        height = setup.height,
        auth = setup.password.is_some(),
        share = ?setup.share,
        "serving VNC"
    );
    let name = started.bootstrap.vm_name.clone();
    let mut server = server::Server::new(&fb, setup, name, listener, input::InputQueue::new());
    server.serve(&started.channel, display.as_ref())?;
    Ok(())
}
