//! rtnetlink over the `NETLINK_ROUTE` socket netcfg was given: one request at a time, each
//! answered by an ack or a dump.
//!
//! Only `send`/`recv` on the held socket (no address, so to the kernel): what the sandbox's
//! base seccomp policy allows. Answers carry the request's sequence number; stale messages
//! (from an earlier request that failed half-way) are skipped.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{MsgFlags, recv, send};

#[allow(clippy::wildcard_imports)] // the kernel's constant names, as in its headers
use crate::netlink::consts::*;
use crate::netlink::{self, Addr, Link, MessageBuilder, ParseError, parse_ack};

/// Receive buffer: the kernel sizes dump datagrams to at most 32 KiB; twice that is room.
const RECV_BUFFER: usize = 64 * 1024;
/// Upper bound on the datagrams of one dump, so a confused kernel cannot keep us forever.
const MAX_DUMP_DATAGRAMS: usize = 4096;
/// Upper bound on stale datagrams skipped while waiting for an answer.
const MAX_STALE: usize = 64;

/// A failed netlink exchange.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("sending to netlink failed")]
    Send(#[source] io::Error),
    #[error("receiving from netlink failed")]
    Recv(#[source] io::Error),
    #[error("the kernel's answer does not parse")]
    Parse(#[from] ParseError),
    #[error("the kernel's answer is larger than {RECV_BUFFER} bytes")]
    Truncated,
    #[error("the kernel's answer never came")]
    NoAnswer,
    #[error("{op} failed: {}{}", io::Error::from_raw_os_error(*errno),
        message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        op: &'static str,
        errno: i32,
        message: Option<String>,
    },
}

impl RtnlError {
    /// The kernel's errno, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Changes to an existing link, applied with one `RTM_NEWLINK`.
#[derive(Debug, Clone, Default)]
pub struct LinkChange<'a> {
    pub mtu: Option<u32>,
    /// `Some(0)` releases the link from its master.
    pub master: Option<u32>,
    /// `Some("")` clears the alias.
    pub alias: Option<&'a str>,
    /// Set `IFF_UP`. (Nothing here ever takes a link down.)
    pub up: bool,
}

/// The route netlink socket.
#[derive(Debug)]
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn new(fd: OwnedFd) -> Rtnl {
        Rtnl {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
        }
    }

    /// Every link.
    pub fn links(&mut self) -> Result<Vec<Link>, RtnlError> {
        let msg = MessageBuilder::new(RTM_GETLINK, NLM_F_DUMP).ifinfo(AF_UNSPEC, 0, 0, 0);
        let mut links = Vec::new();
        self.dump("listing links", msg, RTM_NEWLINK, |payload| {
            links.push(netlink::parse_link(payload)?);
            Ok(())
        })?;
        Ok(links)
    }

    /// The link named `name`, `None` if there is none.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, RtnlError> {
        let msg = MessageBuilder::new(RTM_GETLINK, 0)
            .ifinfo(AF_UNSPEC, 0, 0, 0)
            .attr_str(IFLA_IFNAME, name);
        self.get_link("looking up a link", msg)
    }

    /// The link with index `index`, `None` if there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>, RtnlError> {
        let msg = MessageBuilder::new(RTM_GETLINK, 0).ifinfo(AF_UNSPEC, index, 0, 0);
        self.get_link("looking up a link", msg)
    }

    fn get_link(
        &mut self,
        op: &'static str,
        msg: MessageBuilder,
    ) -> Result<Option<Link>, RtnlError> {
        let mut link = None;
        match self.exchange(op, msg, false, |kind, payload| {
            if kind == RTM_NEWLINK {
                link = Some(netlink::parse_link(payload)?);
            }
            Ok(())
        }) {
            Ok(()) => Ok(link),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a link `name` of `kind` (`bridge`), down.
    pub fn create_bridge(&mut self, name: &str) -> Result<(), RtnlError> {
        let msg = MessageBuilder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
            .ifinfo(AF_UNSPEC, 0, 0, 0)
            .attr_str(IFLA_IFNAME, name)
            .nested(IFLA_LINKINFO, |m| m.attr_str(IFLA_INFO_KIND, "bridge"));
        self.ack("creating a bridge", msg)
    }

    /// Creates the 802.1Q link `name` with id `vlan` on the link with index `parent`.
    pub fn create_vlan(&mut self, name: &str, parent: u32, vlan: u16) -> Result<(), RtnlError> {
        let msg = MessageBuilder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
            .ifinfo(AF_UNSPEC, 0, 0, 0)
            .attr_str(IFLA_IFNAME, name)
            .attr_u32(IFLA_LINK, parent)
            .nested(IFLA_LINKINFO, |m| {
                m.attr_str(IFLA_INFO_KIND, "vlan")
                    .nested(IFLA_INFO_DATA, |m| {
                        m.attr(IFLA_VLAN_ID, &vlan.to_ne_bytes())
                    })
            });
        self.ack("creating a VLAN interface", msg)
    }

    /// Deletes the link with index `index`.
    pub fn delete_link(&mut self, index: u32) -> Result<(), RtnlError> {
        let msg = MessageBuilder::new(RTM_DELLINK, 0).ifinfo(AF_UNSPEC, index, 0, 0);
        self.ack("deleting a link", msg)
    }

    /// Applies `change` to the link with index `index`.
    pub fn change_link(&mut self, index: u32, change: &LinkChange<'_>) -> Result<(), RtnlError> {
        let (flags, mask) = if change.up { (IFF_UP, IFF_UP) } else { (0, 0) };
        let mut msg = MessageBuilder::new(RTM_NEWLINK, 0).ifinfo(AF_UNSPEC, index, flags, mask);
        if let Some(mtu) = change.mtu {
            msg = msg.attr_u32(IFLA_MTU, mtu);
        }
        if let Some(master) = change.master {
            msg = msg.attr_u32(IFLA_MASTER, master);
        }
        if let Some(alias) = change.alias {
            // Not NUL-terminated: the kernel takes the attribute's length as the alias length.
            msg = msg.attr(IFLA_IFALIAS, alias.as_bytes());
        }
        self.ack("changing a link", msg)
    }

    /// Sets `IFLA_BRPORT_ISOLATED` on the bridge port with index `index`.
    pub fn set_isolated(&mut self, index: u32, isolated: bool) -> Result<(), RtnlError> {
        let msg = MessageBuilder::new(RTM_NEWLINK, 0)
            .ifinfo(AF_UNSPEC, index, 0, 0)
            .nested(IFLA_LINKINFO, |m| {
                m.nested(IFLA_INFO_SLAVE_DATA, |m| {
                    m.attr(IFLA_BRPORT_ISOLATED, &[u8::from(isolated)])
                })
            });
        self.ack("isolating a bridge port", msg)
    }

    /// The addresses of the link with index `index`.
    pub fn addrs(&mut self, index: u32) -> Result<Vec<Addr>, RtnlError> {
        // With NETLINK_GET_STRICT_CHK the kernel filters by index; without it, this does.
        let msg = MessageBuilder::new(RTM_GETADDR, NLM_F_DUMP).ifaddr(AF_UNSPEC, 0, 0, index);
        let mut addrs = Vec::new();
        self.dump("listing addresses", msg, RTM_NEWADDR, |payload| {
            let addr = netlink::parse_addr(payload)?;
            if addr.index == index {
                addrs.push(addr);
            }
            Ok(())
        })?;
        Ok(addrs)
    }

    /// Adds `addr/prefix_len` (universe scope) to the link with index `index`.
    pub fn add_addr(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<(), RtnlError> {
        let (family, bytes) = netlink::ip_bytes(addr);
        let mut msg = MessageBuilder::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE)
            .ifaddr(family, prefix_len, 0, index);
        if family == AF_INET {
            msg = msg.attr(IFA_LOCAL, &bytes);
        }
        msg = msg.attr(IFA_ADDRESS, &bytes);
        self.ack("adding an address", msg)
    }

    /// Removes `addr` as the kernel reported it.
    pub fn del_addr(&mut self, addr: &Addr) -> Result<(), RtnlError> {
        let mut msg = MessageBuilder::new(RTM_DELADDR, 0).ifaddr(
            addr.family,
            addr.prefix_len,
            addr.scope,
            addr.index,
        );
        if let Some(local) = addr.local {
            msg = msg.attr(IFA_LOCAL, &netlink::ip_bytes(local).1);
        }
        if let Some(address) = addr.address {
            msg = msg.attr(IFA_ADDRESS, &netlink::ip_bytes(address).1);
        }
        self.ack("removing an address", msg)
    }

    fn ack(&mut self, op: &'static str, msg: MessageBuilder) -> Result<(), RtnlError> {
        self.exchange(op, msg, false, |_, _| Ok(()))
    }

    fn dump(
        &mut self,
        op: &'static str,
        msg: MessageBuilder,
        kind: u16,
        mut each: impl FnMut(&[u8]) -> Result<(), ParseError>,
    ) -> Result<(), RtnlError> {
        self.exchange(op, msg, true, |k, payload| {
            if k == kind { each(payload) } else { Ok(()) }
        })
    }

    /// Sends `msg` (with `NLM_F_ACK` unless it is a dump) and feeds every answer message to
    /// `each` until the ack or the end of the dump.
    fn exchange(
        &mut self,
        op: &'static str,
        msg: MessageBuilder,
        dump: bool,
        mut each: impl FnMut(u16, &[u8]) -> Result<(), ParseError>,
    ) -> Result<(), RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut bytes = msg.finish(seq);
        if !dump {
            // Ask for an ack: the flags are at bytes 6..8 of the header.
            if let Some(flags) = bytes.get_mut(6..8) {
                let old = u16::from_ne_bytes([flags[0], flags[1]]);
                flags.copy_from_slice(&(old | NLM_F_ACK).to_ne_bytes());
            }
        }
        send_all(&self.fd, &bytes)?;
        let mut stale = 0usize;
        for _ in 0..MAX_DUMP_DATAGRAMS {
            let len = recv_one(&self.fd, &mut self.buf)?;
            let datagram = self.buf.get(..len).ok_or(RtnlError::Truncated)?;
            let mut relevant = false;
            for m in netlink::messages(datagram)? {
                if m.seq != seq {
                    continue;
                }
                relevant = true;
                match m.kind {
                    NLMSG_ERROR => {
                        let ack = parse_ack(m.flags, m.payload)?;
                        return if ack.errno == 0 {
                            Ok(())
                        } else {
                            Err(RtnlError::Kernel {
                                op,
                                errno: ack.errno,
                                message: ack.message,
                            })
                        };
                    }
                    NLMSG_DONE => {
                        // A dump may end with an error in the DONE payload.
                        let status = m.payload.get(..4).map_or(0, |b| {
                            i32::from_ne_bytes([b[0], b[1], b[2], b[3]]).saturating_neg()
                        });
                        return if status == 0 {
                            Ok(())
                        } else {
                            Err(RtnlError::Kernel {
                                op,
                                errno: status,
                                message: None,
                            })
                        };
                    }
                    kind => {
                        each(kind, m.payload)?;
                        // A non-dump answer (RTM_GETLINK by name) is one message, then the ack.
                    }
                }
            }
            if !relevant {
                stale = stale.saturating_add(1);
                if stale > MAX_STALE {
                    return Err(RtnlError::NoAnswer);
                }
            }
        }
        Err(RtnlError::NoAnswer)
    }
}

/// One datagram; `MSG_TRUNC` makes the kernel report its full length, so a datagram larger
/// than the buffer shows as one.
fn recv_one(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, RtnlError> {
    loop {
        match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_TRUNC) {
            Ok(len) => return Ok(len),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(RtnlError::Recv(e.into())),
        }
    }
}

fn send_all(fd: &OwnedFd, bytes: &[u8]) -> Result<(), RtnlError> {
    loop {
        match send(fd.as_raw_fd(), bytes, MsgFlags::empty()) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(RtnlError::Send(e.into())),
        }
    }
}

/// The link's name when it is one capvm may report (the kernel allows names `validate_ifname`
/// refuses, such as `a@b`).
pub fn reportable_name(link: &Link) -> Option<&str> {
    proto::netcfg::validate_ifname(&link.name)
        .is_ok()
        .then_some(link.name.as_str())
}
