//! The parent's side of the netcfg channel: starts a sandboxed `netcfg` and asks it for
//! bridges, members, VLANs, addresses and taps ([`proto::netcfg`]).
//!
//! `netcfg` cannot open paths or sockets once it is in capability mode, so this side opens what
//! it needs: a `NETLINK_ROUTE` socket at start (the child keeps the caller's network namespace,
//! so the socket and the child see the same links) and `/dev/net/tun` for every tap. Every
//! reply is checked against its bounds ([`NetcfgReply::validate`]) before it is used.
//!
//! Network namespaces: netcfg works in the namespace of the thread that calls
//! [`NetcfgClient::start`], and a tap is made in the namespace of the thread that opened
//! `/dev/net/tun`, so call [`NetcfgClient::create_tap`] from a thread in that same namespace
//! (tests that `setns()` one thread must keep using that thread).
//!
//! Dropping the client closes the channel, which makes `netcfg` exit; the process is reaped,
//! and killed if it does not exit within [`EXIT_GRACE`].

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings, validate_vm_name};
use proto::channel::{Channel, ChannelError};
use proto::netcfg::{
    IfAddress, LinkState, NetcfgMessageError, NetcfgReply, NetcfgRequest, NetcfgSetup,
};

use crate::spawn::{self, SpawnError};

/// The netcfg binary's name (found by [`spawn::binary_path`]).
pub const NETCFG_BINARY: &str = "netcfg";
/// Environment variable with netcfg's `tracing` filter (default `info`).
pub const NETCFG_LOG_ENV: &str = "CAPVM_NETCFG_LOG";
/// How long one request may take to be answered (a bridge with many ports takes a few
/// netlink round trips per port).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long netcfg may take to exit after its channel closes before it is killed.
pub const EXIT_GRACE: Duration = Duration::from_millis(500);
/// The fd ceiling of netcfg's sandbox: its log, the netlink socket, the bootstrap channel and
/// the one tap fd of a request in flight, with room to spare.
const NETCFG_MAX_FDS: u32 = 16;
/// The bootstrap's `vm_name` when the setup has no guest (the CLI's netcfg).
const CLI_VM_NAME: &str = "vm";
/// The tun clone device.
const TUN_PATH: &str = "/dev/net/tun";

/// Why netcfg could not be started or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetcfgClientError {
    #[error("the netcfg setup is out of bounds")]
    InvalidSetup(#[source] NetcfgMessageError),
    #[error("the request is out of bounds")]
    InvalidRequest(#[source] NetcfgMessageError),
    #[error("CreateTap carries a tun fd: send it with create_tap")]
    NeedsCreateTap,
    #[error("opening a NETLINK_ROUTE socket failed")]
    NetlinkSocket(#[source] io::Error),
    #[error("opening {TUN_PATH} failed")]
    TunOpen(#[source] io::Error),
    #[error("starting netcfg failed")]
    Spawn(#[source] SpawnError),
    #[error("the netcfg channel failed")]
    Channel(#[source] ChannelError),
    #[error("netcfg refused: {0}")]
    Refused(String),
    #[error("netcfg's reply is out of bounds")]
    BadReply(#[source] NetcfgMessageError),
    #[error("netcfg answered {got} to a {expected} request")]
    UnexpectedReply {
        expected: &'static str,
        got: &'static str,
    },
}

/// A running, sandboxed netcfg and the channel to it.
#[derive(Debug)]
pub struct NetcfgClient {
    process: Child,
    channel: Option<Channel>,
    /// Set once the process has been reaped.
    status: Option<ExitStatus>,
}

impl NetcfgClient {
    /// Starts a sandboxed netcfg (binary found by `spawn::binary_path("netcfg")`) in the
    /// caller's network namespace, with a fresh `NETLINK_ROUTE` socket (opened here,
    /// close-on-exec) and `log` as its log, and sends `setup`.
    pub fn start(
        setup: &NetcfgSetup,
        log: BorrowedFd<'_>,
    ) -> Result<NetcfgClient, NetcfgClientError> {
        Self::start_binary(&spawn::binary_path(NETCFG_BINARY), setup, log)
    }

    /// [`NetcfgClient::start`] with an explicit binary.
    pub fn start_binary(
        binary: &std::path::Path,
        setup: &NetcfgSetup,
        log: BorrowedFd<'_>,
    ) -> Result<NetcfgClient, NetcfgClientError> {
        setup.validate().map_err(NetcfgClientError::InvalidSetup)?;
        let netlink = open_netlink().map_err(NetcfgClientError::NetlinkSocket)?;
        let vm_name = if validate_vm_name(&setup.tap_owner).is_ok() {
            setup.tap_owner.clone()
        } else {
            CLI_VM_NAME.to_owned()
        };
        let (uid, gid) = sandbox::nobody();
        let bootstrap = Bootstrap {
            role: Role::Netcfg,
            vm_name,
            // An unprivileged uid that keeps CAP_NET_ADMIN as its only capability: rtnetlink
            // and creating a tap check the capability, not the uid.
            sandbox: SandboxSettings {
                uid,
                gid,
                max_fds: NETCFG_MAX_FDS,
            },
            fds: vec![FdRole::Log, FdRole::Netlink],
            log_filter: std::env::var(NETCFG_LOG_ENV).unwrap_or_else(|_| "info".to_owned()),
        };
        let running = spawn::spawn(binary, &bootstrap, &[log, netlink.as_fd()])
            .map_err(NetcfgClientError::Spawn)?;
        drop(netlink);
        let client = NetcfgClient {
            process: running.process,
            channel: Some(running.channel),
            status: None,
        };
        client
            .channel()?
            .send(setup, &[])
            .map_err(NetcfgClientError::Channel)?;
        Ok(client)
    }

    /// The netcfg process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// One request, one reply (reply validated; [`NetcfgReply::Error`] becomes
    /// [`NetcfgClientError::Refused`]).
    pub fn request(&mut self, request: &NetcfgRequest) -> Result<NetcfgReply, NetcfgClientError> {
        if request.fd_count() != 0 {
            // The one request with an fd goes through create_tap, which opens it.
            return Err(NetcfgClientError::NeedsCreateTap);
        }
        self.request_with_fds(request, &[])
    }

    fn request_with_fds(
        &mut self,
        request: &NetcfgRequest,
        fds: &[BorrowedFd<'_>],
    ) -> Result<NetcfgReply, NetcfgClientError> {
        request
            .validate()
            .map_err(NetcfgClientError::InvalidRequest)?;
        let channel = self.channel()?;
        channel
            .send(request, fds)
            .map_err(NetcfgClientError::Channel)?;
        let received = channel
            .recv_timeout::<NetcfgReply>(REPLY_TIMEOUT)
            .map_err(NetcfgClientError::Channel)?;
        let (reply, _) = received.expect_fds(0).map_err(NetcfgClientError::Channel)?;
        reply.validate().map_err(NetcfgClientError::BadReply)?;
        match reply {
            NetcfgReply::Error { message } => Err(NetcfgClientError::Refused(message)),
            other => Ok(other),
        }
    }

    /// Opens `/dev/net/tun` `queues` times (`O_RDWR | O_CLOEXEC | O_NONBLOCK`), sends
    /// [`NetcfgRequest::CreateTap`] with the fds; returns the tap's name and the fds, one per
    /// queue in order (a multi-queue tap when `queues` > 1). The tap goes away when the last
    /// duplicate of its fds is closed.
    pub fn create_tap(
        &mut self,
        bridge: Option<&str>,
        nic: u16,
        mtu: Option<u32>,
        queues: u16,
    ) -> Result<(String, Vec<OwnedFd>), NetcfgClientError> {
        let request = NetcfgRequest::CreateTap {
            bridge: bridge.map(str::to_owned),
            nic,
            mtu,
            queues,
        };
        request
            .validate()
            .map_err(NetcfgClientError::InvalidRequest)?;
        let tuns = (0..queues)
            .map(|_| open_tun())
            .collect::<io::Result<Vec<OwnedFd>>>()
            .map_err(NetcfgClientError::TunOpen)?;
        let borrowed: Vec<BorrowedFd<'_>> = tuns.iter().map(AsFd::as_fd).collect();
        match self.request_with_fds(&request, &borrowed)? {
            NetcfgReply::Tap { name } => Ok((name, tuns)),
            other => Err(unexpected("CreateTap", &other)),
        }
    }

    /// Creates `bridge` if missing and brings it up.
    pub fn create_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::CreateBridge {
            bridge: bridge.to_owned(),
        })
    }

    /// Deletes `bridge`; its members are released.
    pub fn destroy_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::DestroyBridge {
            bridge: bridge.to_owned(),
        })
    }

    /// Enslaves `member` to `bridge` and brings it up (never down first).
    pub fn add_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::AddMember {
            bridge: bridge.to_owned(),
            member: member.to_owned(),
        })
    }

    /// Releases `member` from `bridge`.
    pub fn remove_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::RemoveMember {
            bridge: bridge.to_owned(),
            member: member.to_owned(),
        })
    }

    /// Creates `parent.vlan` if missing and brings it up.
    pub fn add_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::AddVlan {
            parent: parent.to_owned(),
            vlan,
        })
    }

    /// Deletes `parent.vlan`.
    pub fn delete_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::DeleteVlan {
            parent: parent.to_owned(),
            vlan,
        })
    }

    /// Sets the MTU of `bridge` and of all its members.
    pub fn set_mtu(&mut self, bridge: &str, mtu: u32) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::SetMtu {
            bridge: bridge.to_owned(),
            mtu,
        })
    }

    /// Makes `addresses` the global addresses of `bridge` (empty: none).
    pub fn set_addresses(
        &mut self,
        bridge: &str,
        addresses: &[IfAddress],
    ) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::SetAddresses {
            bridge: bridge.to_owned(),
            addresses: addresses.to_vec(),
        })
    }

    /// Isolates (or not) the tap ports of `bridge` from one another.
    pub fn set_private(&mut self, bridge: &str, private: bool) -> Result<(), NetcfgClientError> {
        self.expect_ok(&NetcfgRequest::SetPrivate {
            bridge: bridge.to_owned(),
            private,
        })
    }

    /// Deletes every tap of the setup's guest; returns their names.
    pub fn delete_taps(&mut self) -> Result<Vec<String>, NetcfgClientError> {
        match self.request(&NetcfgRequest::DeleteTaps)? {
            NetcfgReply::Deleted { names } => Ok(names),
            other => Err(unexpected("DeleteTaps", &other)),
        }
    }

    /// Describes `ifname`; `None` if it does not exist.
    pub fn link(&mut self, ifname: &str) -> Result<Option<LinkState>, NetcfgClientError> {
        match self.request(&NetcfgRequest::Link {
            ifname: ifname.to_owned(),
        })? {
            NetcfgReply::Link(link) => Ok(link),
            other => Err(unexpected("Link", &other)),
        }
    }

    /// Closes the channel and reaps netcfg (killed after [`EXIT_GRACE`]); returns its exit
    /// status.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        drop(self.channel.take());
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            if let Some(status) = self.process.try_wait()? {
                self.status = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.process.kill();
        let status = self.process.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    fn expect_ok(&mut self, request: &NetcfgRequest) -> Result<(), NetcfgClientError> {
        match self.request(request)? {
            NetcfgReply::Ok => Ok(()),
            other => Err(unexpected(request_name(request), &other)),
        }
    }

    fn channel(&self) -> Result<&Channel, NetcfgClientError> {
        self.channel
            .as_ref()
            .ok_or(NetcfgClientError::Channel(ChannelError::Closed))
    }
}

impl Drop for NetcfgClient {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(pid = self.process.id(), error = %e, "reaping netcfg failed");
        }
    }
}

fn unexpected(expected: &'static str, got: &NetcfgReply) -> NetcfgClientError {
    NetcfgClientError::UnexpectedReply {
        expected,
        got: reply_name(got),
    }
}

fn reply_name(reply: &NetcfgReply) -> &'static str {
    match reply {
        NetcfgReply::Ok => "Ok",
        NetcfgReply::Tap { .. } => "Tap",
        NetcfgReply::Deleted { .. } => "Deleted",
        NetcfgReply::Link(_) => "Link",
        NetcfgReply::Error { .. } => "Error",
    }
}

fn request_name(request: &NetcfgRequest) -> &'static str {
    match request {
        NetcfgRequest::CreateBridge { .. } => "CreateBridge",
        NetcfgRequest::DestroyBridge { .. } => "DestroyBridge",
        NetcfgRequest::AddMember { .. } => "AddMember",
        NetcfgRequest::RemoveMember { .. } => "RemoveMember",
        NetcfgRequest::AddVlan { .. } => "AddVlan",
        NetcfgRequest::DeleteVlan { .. } => "DeleteVlan",
        NetcfgRequest::SetMtu { .. } => "SetMtu",
        NetcfgRequest::SetAddresses { .. } => "SetAddresses",
        NetcfgRequest::SetPrivate { .. } => "SetPrivate",
        NetcfgRequest::CreateTap { .. } => "CreateTap",
        NetcfgRequest::DeleteTaps => "DeleteTaps",
        NetcfgRequest::Link { .. } => "Link",
    }
}

/// `socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)` with extended acks on, so
/// netcfg's error replies can carry the kernel's explanation. netcfg cannot call
/// `setsockopt`, so the options are set here.
fn open_netlink() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers and returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    for option in [libc::NETLINK_EXT_ACK, libc::NETLINK_GET_STRICT_CHK] {
        // SAFETY: `on` is a live c_int and its size is passed; the descriptor is ours.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                option,
                (&raw const on).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

fn open_tun() -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(TUN_PATH)?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_socket_opens_close_on_exec() {
        let fd = open_netlink().unwrap();
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn a_setup_out_of_bounds_is_refused_before_spawning() {
        let (_r, w) = std::io::pipe().unwrap();
        let setup = NetcfgSetup {
            bridges: vec!["bad name".into()],
            tap_owner: String::new(),
        };
        let err = NetcfgClient::start_binary(
            std::path::Path::new("/nonexistent/netcfg"),
            &setup,
            w.as_fd(),
        )
        .unwrap_err();
        assert!(matches!(err, NetcfgClientError::InvalidSetup(_)), "{err:?}");
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let (_r, w) = std::io::pipe().unwrap();
        let setup = NetcfgSetup {
            bridges: vec!["vm-public".into()],
            tap_owner: "guest".into(),
        };
        let err = NetcfgClient::start_binary(
            std::path::Path::new("/nonexistent/netcfg"),
            &setup,
            w.as_fd(),
        )
        .unwrap_err();
        assert!(matches!(err, NetcfgClientError::Spawn(_)), "{err:?}");
    }
}
