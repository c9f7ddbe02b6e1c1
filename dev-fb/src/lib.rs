//! `dev-fb`: the guest's display as a VNC (RFB) server, and keyboard and pointer input from it.
//!
//! Started by the per-VM supervisor with its bootstrap channel on fd 3. It receives its log,
//! the framebuffer memfd ([`FdRole::Framebuffer`], BAR0 of the bochs display the runner shows
//! the guest) and the listening VNC socket ([`FdRole::VncListener`], bound by the supervisor),
//! enters capability mode (`child::start`, with this crate's `seccomp.policy`), reads a
//! [`DisplaySetup`] on the bootstrap channel, maps the framebuffer read-only and serves VNC
//! clients until the supervisor closes the channel. Mode changes arrive on the runner's
//! display channel ([`proto::display::ToDisplay`]). With a guest that has a keyboard (and a
//! tablet) it also holds the guest RAM memfd and one [`FdRole::DeviceChannel`] per input
//! device, reads a [`DeviceSetup::Input`] after the display setup and serves the virtio-input
//! devices ([`virtio_input`]) in the same loop. VNC waits at most a few seconds for the runner's
//! side of the devices' handshakes: a device whose runner answers later (logged as an error)
//! starts when it does.
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
//!   the server delivers to.
//! - [`virtio_input`]: the virtio-input keyboard and tablet.
//!
//! Trusts: its supervisor, for the bootstrap and setup (still validated). Trusts no VNC client
//! and no byte of the framebuffer or guest RAM, and the runner's messages only within their
//! validated bounds. Touches: only the descriptors it was given; it accepts on the listener but
//! opens nothing; guest RAM only through `vm-memory`'s bounds-checked accesses.
//!
//! [`FdRole::Framebuffer`]: proto::bootstrap::FdRole::Framebuffer
//! [`FdRole::VncListener`]: proto::bootstrap::FdRole::VncListener
//! [`FdRole::DeviceChannel`]: proto::bootstrap::FdRole::DeviceChannel

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
pub mod virtio_input;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError};
use proto::device::{DeviceMessageError, DeviceSetup, InputSetup};
use proto::display::{DisplayError, DisplaySetup};

use virtio_input::{InputDevices, VirtioInput};

/// How long dev-fb waits for the runner's side of the input devices' handshakes before it
/// serves VNC anyway; a device whose runner answers later starts then.
const INPUT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The least wait for each device's hello, however late its turn comes.
const INPUT_HANDSHAKE_MIN: Duration = Duration::from_millis(200);

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
    #[error("reading the input setup failed")]
    InputSetup(#[source] ChannelError),
    #[error("the input setup is not an InputSetup")]
    WrongInputSetup,
    #[error("the input setup is invalid")]
    InvalidInputSetup(#[from] DeviceMessageError),
    #[error("the input setup names {devices} devices for {channels} device channels")]
    InputChannels { devices: usize, channels: usize },
    #[error("mapping guest memory failed")]
    GuestMemory(#[from] child::guest_ram::GuestRamError),
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
    let mut channels = Vec::new();
    while let Some(fd) = started.take_fd(&FdRole::DeviceChannel) {
        channels.push(Channel::from_fd(fd));
    }
    let memory = started.take_fd(&FdRole::GuestMemory);
    let input = if channels.is_empty() {
        InputDevices::default()
    } else {
        let Some(DeviceSetup::Input(input_setup)) =
            child::recv_setup::<DeviceSetup>(&started.channel).map_err(RunError::InputSetup)?
        else {
            return Err(RunError::WrongInputSetup);
        };
        let memory = memory.ok_or(RunError::MissingFd(FdRole::GuestMemory))?;
        // Without input the display is still worth serving: a failure costs the keyboard and
        // tablet, not VNC.
        start_input(&input_setup, &memory, channels).unwrap_or_else(|e| {
            tracing::error!(
                error = %error_chain(&e),
                "the input devices failed to start; serving VNC without keyboard and tablet"
            );
            InputDevices::default()
        })
    };
    let fb = framebuffer::Framebuffer::map(fb_fd, setup.framebuffer_bytes)?;
    tracing::info!(
        width = setup.width,
        height = setup.height,
        auth = setup.password.is_some(),
        share = ?setup.share,
        "serving VNC"
    );
    let name = started.bootstrap.vm_name.clone();
    let mut server = server::Server::new(&fb, setup, name, listener, input);
    server.serve(&started.channel, display.as_ref())?;
    Ok(())
}

/// Maps guest RAM and starts one virtio-input device per channel, as `setup` names them.
fn start_input(
    setup: &InputSetup,
    memory: &std::os::fd::OwnedFd,
    channels: Vec<Channel>,
) -> Result<InputDevices, RunError> {
    setup.validate()?;
    if setup.devices.len() != channels.len() {
        return Err(RunError::InputChannels {
            devices: setup.devices.len(),
            channels: channels.len(),
        });
    }
    let mem = child::guest_ram::map_guest_ram(memory, &setup.memory)?;
    let deadline = Instant::now() + INPUT_HANDSHAKE_TIMEOUT;
    let mut devices = Vec::with_capacity(channels.len());
    for (&kind, channel) in setup.devices.iter().zip(channels) {
        // One deadline for all; a runner hello sent meanwhile is already queued, so a later
        // device still gets a moment to read it.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(INPUT_HANDSHAKE_MIN);
        match VirtioInput::start(kind, channel, mem.clone(), wait) {
            Ok(d) => devices.push(d),
            Err(e) => tracing::error!(
                device = virtio_input::config::name(kind),
                error = %error_chain(&e),
                "the device handshake with the runner failed; serving VNC without this device"
            ),
        }
    }
    Ok(InputDevices::new(devices))
}

pub(crate) use child::error_chain;
