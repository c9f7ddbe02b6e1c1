//! A guest's graphical console (`graphics="yes"`): the framebuffer, the VNC listening socket
//! and the `dev-fb` process that serves it.
//!
//! The supervisor creates what outlives a dev-fb process — the framebuffer memfd (the bochs
//! display's BAR0 in the runner, mapped read-only by dev-fb) and the listening socket — and
//! keeps them for the guest's whole run, so a restarted dev-fb serves the same picture on the
//! same port. dev-fb only `accept`s on the socket: it cannot bind or open anything. dev-fb
//! also serves the guest's virtio-input keyboard (and, with `xhci_mouse="yes"`, tablet): per
//! boot it gets guest RAM and one device channel per input device, whose other ends go to the
//! runner after the disks' and NICs' channels.
//!
//! The port: `graphics_port` if set (busy → a clear error), else the first free port from
//! 5900 up. Binding is the reservation, so two guests starting at once cannot pick the same
//! port. The listening address is `graphics_listen`, loopback unless the user says otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::Child;

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::device::{DeviceSetup, InputKind, InputSetup};
use proto::display::{DisplaySetup, SharePolicy};

use crate::guest_config::Graphics;
use crate::spawn::{self, SpawnError};

/// The first port tried when `graphics_port` is unset (VNC display :0).
pub const FIRST_VNC_PORT: u16 = 5900;
/// How many ports from [`FIRST_VNC_PORT`] are tried.
pub const VNC_PORTS: u16 = 100;
/// The smallest framebuffer (QEMU's bochs-display default); larger modes get the next power
/// of two that holds them at 32 bpp (a PCI BAR is a power of two).
pub const MIN_FRAMEBUFFER_BYTES: u64 = 16 << 20;
/// The dev-fb binary's name.
pub const DEV_FB_BINARY: &str = "dev-fb";
/// The fd ceiling of dev-fb's sandbox: its own fds plus a bounded number of VNC clients.
const DEV_FB_MAX_FDS: u32 = 96;

/// Why the graphical console could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GraphicsError {
    #[error("VNC port {addr} is in use (graphics_port)")]
    PortBusy {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no free VNC port on {listen} from {FIRST_VNC_PORT} to {}", FIRST_VNC_PORT + VNC_PORTS - 1)]
    NoFreePort { listen: IpAddr },
    #[error("listening for VNC on {addr} failed")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the {bytes}-byte framebuffer failed")]
    Framebuffer {
        bytes: u64,
        #[source]
        source: nix::Error,
    },
    #[error("starting dev-fb failed")]
    Spawn(#[source] SpawnError),
    #[error("sending dev-fb its setup failed")]
    Setup(#[source] proto::ChannelError),
    #[error("watching dev-fb failed")]
    Pidfd(#[source] std::io::Error),
}

/// The framebuffer size for modes up to `width`×`height` at 32 bpp: room for two frames,
/// because Linux's `bochs` driver refuses a mode that needs more than half of it (it keeps a
/// second buffer to flip to), and a power of two (a PCI BAR).
pub fn framebuffer_bytes(width: u32, height: u32) -> u64 {
    let need = u64::from(width) * u64::from(height) * 4 * 2;
    need.next_power_of_two().max(MIN_FRAMEBUFFER_BYTES)
}

/// What a running guest's graphics hold across dev-fb restarts.
#[derive(Debug)]
pub struct Console {
    pub framebuffer: OwnedFd,
    pub framebuffer_bytes: u64,
    pub listener: TcpListener,
    /// Where the listener is bound (`vm list`'s VNC column).
    pub addr: SocketAddr,
    pub setup: DisplaySetup,
    /// The guest gets a virtio tablet besides its keyboard (`xhci_mouse="yes"`).
    pub tablet: bool,
}

impl Console {
    /// Binds the listener and creates the framebuffer for `graphics`, with `password` for
    /// VNC Authentication.
    pub fn new(graphics: &Graphics, password: Option<String>) -> Result<Console, GraphicsError> {
        let listen = graphics.listen.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let (listener, addr) = bind(listen, graphics.port)?;
        let bytes = framebuffer_bytes(graphics.width, graphics.height);
        let framebuffer = crate::memfd::sealed(c"capvm-framebuffer", bytes)
            .map_err(|source| GraphicsError::Framebuffer { bytes, source })?;
        let setup = DisplaySetup {
            width: graphics.width,
            height: graphics.height,
            max_width: graphics.width,
            max_height: graphics.height,
            framebuffer_bytes: bytes,
            password,
            share: SharePolicy::AllowExclusive,
        };
        Ok(Console {
            framebuffer,
            framebuffer_bytes: bytes,
            listener,
            addr,
            setup,
            tablet: graphics.xhci_mouse,
        })
    }

    /// The virtio-input devices dev-fb serves the guest: a keyboard, and a tablet with
    /// `xhci_mouse="yes"`. Their PCI slots follow the disks and NICs, in this order.
    pub fn input_kinds(&self) -> Vec<InputKind> {
        let mut kinds = vec![InputKind::Keyboard];
        if self.tablet {
            kinds.push(InputKind::Tablet);
        }
        kinds
    }

    /// How `vm info` names dev-fb: with the input devices it serves (one word, like the
    /// other roles).
    pub fn role(&self) -> String {
        let mut role = String::from("dev-fb+keyboard");
        if self.tablet {
            role.push_str("+tablet");
        }
        role
    }

    /// `host:port` as `vm list` shows it.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// Binds `port` on `listen`, or the first free port from [`FIRST_VNC_PORT`].
pub fn bind(listen: IpAddr, port: Option<u16>) -> Result<(TcpListener, SocketAddr), GraphicsError> {
    if let Some(port) = port {
        let addr = SocketAddr::new(listen, port);
        return match TcpListener::bind(addr) {
            Ok(l) => Ok((l, addr)),
            Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                Err(GraphicsError::PortBusy { addr, source })
            }
            Err(source) => Err(GraphicsError::Listen { addr, source }),
        };
    }
    for port in FIRST_VNC_PORT..FIRST_VNC_PORT + VNC_PORTS {
        let addr = SocketAddr::new(listen, port);
        match TcpListener::bind(addr) {
            Ok(l) => return Ok((l, addr)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(source) => return Err(GraphicsError::Listen { addr, source }),
        }
    }
    Err(GraphicsError::NoFreePort { listen })
}

/// What a VNC client is told while dev-fb is failed (until the guest's next boot starts one).
pub const DISPLAY_FAILED_REASON: &str =
    "the guest's display server (dev-fb) failed and is not restarted until the guest reboots";

/// Most connections [`refuse_clients`] answers per call, so a flood cannot hold the caller.
const REFUSALS_PER_CALL: usize = 16;

/// Accepts the connections waiting on `listener` (at most [`REFUSALS_PER_CALL`]) and refuses
/// each with an RFB failure: `ProtocolVersion` 3.3, security type 0 ("invalid") and `reason`
/// (RFC 6143 §7.1.1 and the 3.3 form of §7.1.2), then closes it. A VNC client shows the
/// reason instead of hanging on a connection that is never greeted. Returns how many it
/// refused.
pub fn refuse_clients(listener: &TcpListener, reason: &str) -> usize {
    use std::io::{Read, Write};
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::warn!(error = %e, "making the VNC listener non-blocking failed");
        return 0;
    }
    let mut refusal = b"RFB 003.003\n".to_vec();
    refusal.extend_from_slice(&0u32.to_be_bytes());
    refusal.extend_from_slice(&u32::try_from(reason.len()).unwrap_or(0).to_be_bytes());
    refusal.extend_from_slice(reason.as_bytes());
    let mut refused = 0;
    while refused < REFUSALS_PER_CALL {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        refused += 1;
        // A fresh socket's send buffer takes the whole refusal at once; never wait on it.
        let _ = stream.set_nonblocking(true);
        let _ = stream.write_all(&refusal);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Whatever the client already sent (its version) is read, so that closing does not
        // turn into a reset that could discard the refusal on its side.
        let _ = stream.read(&mut [0u8; 64]);
    }
    refused
}

/// A running dev-fb (or a dead one waiting for its restart).
#[derive(Debug)]
pub struct DevFb {
    pub process: Child,
    /// Closing it asks dev-fb to exit.
    pub bootstrap: proto::Channel,
    /// Readable when the process has exited.
    pub pidfd: OwnedFd,
    /// Set once the process has been reaped.
    pub status: Option<std::process::ExitStatus>,
    /// How often it was restarted after dying (carried over to each new incarnation).
    pub restarts: u32,
    /// When it died, within the restart window (oldest first).
    pub deaths: std::collections::VecDeque<std::time::Instant>,
    /// When the next restart is due, if one is.
    pub restart_at: Option<std::time::Instant>,
    /// It died too often and is not restarted any more.
    pub failed: bool,
}

impl DevFb {
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Kills (if still running) and reaps it.
    pub fn stop(&mut self) {
        if self.status.is_some() {
            return;
        }
        if let Ok(None) = self.process.try_wait() {
            let _ = self.process.kill();
        }
        if let Ok(status) = self.process.wait() {
            self.status = Some(status);
        }
    }

    /// Takes over the restart history of the incarnation it replaces.
    pub fn succeed(&mut self, old: &mut DevFb) {
        self.restarts = old.restarts.saturating_add(1);
        self.deaths = std::mem::take(&mut old.deaths);
    }
}

impl Drop for DevFb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What dev-fb needs to serve the guest's virtio-input devices: guest RAM, its layout and
/// kinds, and dev-fb's end of one device channel per device (whose other ends the runner has).
#[derive(Debug)]
pub struct InputFds<'a> {
    pub memory: BorrowedFd<'a>,
    pub setup: InputSetup,
    pub channels: Vec<BorrowedFd<'a>>,
}

/// Starts dev-fb for `console`: `[Log, Framebuffer, VncListener]` plus, when the runner has a
/// display, its end of the display channel, and with `input`, `[GuestMemory, DeviceChannel…]`
/// (the [`InputSetup`] follows the [`DisplaySetup`] on the bootstrap channel).
pub fn start_dev_fb(
    binary: &Path,
    vm_name: &str,
    log: BorrowedFd<'_>,
    console: &Console,
    display_channel: Option<BorrowedFd<'_>>,
    input: Option<&InputFds<'_>>,
) -> Result<DevFb, GraphicsError> {
    let (uid, gid) = sandbox::nobody();
    let mut roles = vec![FdRole::Log, FdRole::Framebuffer, FdRole::VncListener];
    let mut fds = vec![log, console.framebuffer.as_fd(), console.listener.as_fd()];
    if let Some(channel) = display_channel {
        roles.push(FdRole::DisplayChannel);
        fds.push(channel);
    }
    if let Some(input) = input {
        roles.push(FdRole::GuestMemory);
        fds.push(input.memory);
        for channel in &input.channels {
            roles.push(FdRole::DeviceChannel);
            fds.push(*channel);
        }
    }
    let bootstrap = Bootstrap {
        role: Role::DevFb,
        vm_name: vm_name.to_owned(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: DEV_FB_MAX_FDS,
        },
        fds: roles,
        log_filter: std::env::var(crate::monitor::devices::DEVICE_LOG_ENV)
            .unwrap_or_else(|_| "info".to_owned()),
    };
    let spawned = spawn::spawn(binary, &bootstrap, &fds).map_err(GraphicsError::Spawn)?;
    let mut process = spawned.process;
    let pidfd = match crate::monitor::runner::pidfd_open(process.id()) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = process.kill();
            let _ = process.wait();
            return Err(GraphicsError::Pidfd(e));
        }
    };
    let mut dev_fb = DevFb {
        process,
        bootstrap: spawned.channel,
        pidfd,
        status: None,
        restarts: 0,
        deaths: std::collections::VecDeque::new(),
        restart_at: None,
        failed: false,
    };
    let mut sent = dev_fb.bootstrap.send(&console.setup, &[]);
    if let (Ok(()), Some(input)) = (&sent, input) {
        sent = dev_fb
            .bootstrap
            .send(&DeviceSetup::Input(input.setup.clone()), &[]);
    }
    if let Err(source) = sent {
        let _ = dev_fb.process.kill();
        let _ = dev_fb.process.wait();
        return Err(GraphicsError::Setup(source));
    }
    Ok(dev_fb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framebuffers_hold_two_frames_in_a_power_of_two_of_at_least_16_mib() {
        assert_eq!(framebuffer_bytes(800, 600), 16 << 20);
        assert_eq!(framebuffer_bytes(1600, 900), 16 << 20);
        assert_eq!(framebuffer_bytes(1920, 1200), 32 << 20);
        assert_eq!(framebuffer_bytes(2560, 1600), 32 << 20);
        assert_eq!(framebuffer_bytes(3840, 2160), 64 << 20);
    }

    #[test]
    fn a_set_port_is_bound_exactly_and_a_busy_one_is_a_clear_error() {
        let (first, addr) = bind(IpAddr::V4(Ipv4Addr::LOCALHOST), Some(0)).expect("bind");
        let port = first.local_addr().expect("addr").port();
        assert_eq!(addr.port(), 0);
        let busy = bind(IpAddr::V4(Ipv4Addr::LOCALHOST), Some(port));
        assert!(
            matches!(busy, Err(GraphicsError::PortBusy { .. })),
            "{busy:?}"
        );
    }

    #[test]
    fn a_refused_client_reads_version_3_3_security_type_0_and_the_reason() {
        use std::io::Read;
        let (listener, _) = bind(IpAddr::V4(Ipv4Addr::LOCALHOST), Some(0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        assert_eq!(refuse_clients(&listener, "gone"), 1);
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("read until closed");
        assert_eq!(&got[..12], b"RFB 003.003\n");
        assert_eq!(
            &got[12..],
            &[0, 0, 0, 0, 0, 0, 0, 4, b'g', b'o', b'n', b'e']
        );
        assert_eq!(refuse_clients(&listener, "gone"), 0, "nobody else waits");
    }

    #[test]
    fn unset_ports_take_the_first_free_one_from_5900() {
        let listen = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (a, addr_a) = bind(listen, None).expect("first");
        let (b, addr_b) = bind(listen, None).expect("second");
        assert!((FIRST_VNC_PORT..FIRST_VNC_PORT + VNC_PORTS).contains(&addr_a.port()));
        assert!(addr_b.port() > addr_a.port(), "{addr_a} then {addr_b}");
        drop((a, b));
    }
}
