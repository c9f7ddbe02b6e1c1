//! `netcfg`: creates bridges, VLAN interfaces and taps and sets host addresses for capvm — the
//! only capvm process that keeps `CAP_NET_ADMIN`.
//!
//! Started by the per-VM supervisor or the `vm` CLI (`supervisor::netcfg_client`) with its
//! bootstrap channel on fd 3, a log and a `NETLINK_ROUTE` socket opened by the parent. It
//! enters capability mode (`child::start`, this crate's `seccomp.policy`): it stays in the
//! parent's network namespace with `CAP_NET_ADMIN` as its only capability (under the
//! unprivileged uid its parent names), an empty
//! root, no way to open paths or sockets. Then it reads a [`proto::netcfg::NetcfgSetup`] and
//! answers one [`proto::netcfg::NetcfgRequest`] at a time until the parent closes the channel.
//!
//! Layout:
//! - [`netlink`]: the rtnetlink wire format (pure, unit-tested).
//! - [`rtnl`]: requests and dumps over the held socket.
//! - [`tun`]: `TUNSETIFF` on a `/dev/net/tun` fd the parent sends.
//! - [`serve`]: the rules each request is checked against, and the actions.
//!
//! Trusts: its parent (root) for the setup, which is still validated; every request is checked
//! against the setup. Touches: only links it is asked about — bridges the setup lists, members
//! and VLAN parents named in a request (never taken down), and its guest's taps.

pub mod netlink;
pub mod rtnl;
pub mod serve;
pub mod tun;

use std::time::Duration;

use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError};
use proto::netcfg::{NetcfgMessageError, NetcfgReply, NetcfgRequest, NetcfgSetup};

/// This process's seccomp policy, on top of the sandbox's base policy.
pub const SECCOMP_POLICY: &str = include_str!("../seccomp.policy");

/// The role name this binary answers to.
pub const ROLE: &str = "netcfg";

/// How long the parent may take to send the setup after `Ready`.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] child::StartError),
    #[error("the bootstrap carried no netlink socket")]
    NoNetlink,
    #[error("reading the setup failed")]
    Setup(#[source] ChannelError),
    #[error("the setup is out of bounds")]
    InvalidSetup(#[source] NetcfgMessageError),
    #[error("the channel to the parent failed")]
    Channel(#[source] ChannelError),
}

/// Runs the process: bootstrap, capability mode, setup, then serve until the parent hangs up.
pub fn run() -> Result<(), RunError> {
    let mut started = child::start(child::ChildKind {
        role_name: ROLE,
        policy: SECCOMP_POLICY,
        threads: false,
    })?;
    let setup = match started.channel.recv_timeout::<NetcfgSetup>(SETUP_TIMEOUT) {
        Ok(received) => received.expect_fds(0).map_err(RunError::Setup)?.0,
        Err(ChannelError::Closed) => {
            tracing::info!("parent closed the channel before the setup; exiting");
            return Ok(());
        }
        Err(e) => return Err(RunError::Setup(e)),
    };
    setup.validate().map_err(RunError::InvalidSetup)?;
    let netlink = started
        .take_fd(&FdRole::Netlink)
        .ok_or(RunError::NoNetlink)?;
    tracing::info!(bridges = ?setup.bridges, guest = %setup.tap_owner, "setup received");
    let mut server = serve::Server::new(setup, rtnl::Rtnl::new(netlink));
    serve(&started.channel, &mut server)
}

/// Answers requests until the parent closes the channel. A malformed packet is answered with
/// an error, so the parent's one-request-one-reply rhythm holds.
pub fn serve(channel: &Channel, server: &mut serve::Server) -> Result<(), RunError> {
    loop {
        let reply = match channel.recv::<NetcfgRequest>() {
            Ok(received) => server.handle(&received.msg, received.fds),
            Err(ChannelError::Closed) => {
                tracing::info!("parent closed the channel; exiting");
                return Ok(());
            }
            Err(
                e @ (ChannelError::Truncated { .. }
                | ChannelError::LengthMismatch { .. }
                | ChannelError::Decode(_)
                | ChannelError::TrailingBytes { .. }
                | ChannelError::TooManyFds
                | ChannelError::FdCountMismatch { .. }
                | ChannelError::BadMagic { .. }
                | ChannelError::TooLarge),
            ) => {
                tracing::warn!(error = %e, "malformed request");
                NetcfgReply::error(&format!("malformed request: {e}"))
            }
            Err(e) => return Err(RunError::Channel(e)),
        };
        match channel.send(&reply, &[]) {
            Ok(()) => {}
            Err(ChannelError::Closed) => return Ok(()),
            Err(e) => return Err(RunError::Channel(e)),
        }
    }
}
