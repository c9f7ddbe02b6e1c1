//! What netcfg does with each request: check it against the setup, act through [`Rtnl`], and
//! answer with one [`NetcfgReply`].
//!
//! The rules, beyond the request's own bounds ([`NetcfgRequest::validate`]):
//! - bridges are only those the setup lists, and must be bridges (a setup name that belongs to
//!   some other kind of link is never touched);
//! - a member is an existing link that is not a bridge, not already another bridge's member,
//!   and not a capvm tap of another guest; it is brought up, never taken down;
//! - taps are created only for the setup's guest, deleted only when their alias says they are
//!   its own ([`is_tap_of`]);
//! - a refused or failed request is an [`NetcfgReply::Error`] and a log line; the process goes
//!   on serving.
//!
//! A switch's private flag lives on its bridge, as the alias [`PRIVATE_ALIAS`], so that the
//! netcfg of a guest started later (a different process) still isolates its new taps.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use proto::netcfg::{
    IfAddress, LinkState, MAX_ADDRESSES, MAX_DELETED, MAX_MEMBERS, MAX_NETCFG_TEXT_BYTES,
    NetcfgMessageError, NetcfgReply, NetcfgRequest, NetcfgSetup, TAP_ALIAS_PREFIX, TAP_NAME_PREFIX,
    is_tap_of, tap_alias, vlan_ifname,
};

use crate::netlink::Link;
use crate::netlink::consts::RT_SCOPE_LINK;
use crate::rtnl::{LinkChange, Rtnl, RtnlError, reportable_name};
use crate::tun;

/// The alias that marks a bridge whose tap ports are isolated (`vm switch private NAME on`).
pub const PRIVATE_ALIAS: &str = "capvm:private";
/// How many taken tap names `CreateTap` tries before it gives up.
const TAP_NAME_ATTEMPTS: usize = 64;
/// Highest N of `capvm-tapN` (six digits keep the name within 15 bytes).
const MAX_TAP_NUMBER: u32 = 999_999;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Invalid(#[from] NetcfgMessageError),
    #[error("the request needs {expected} file descriptors, {got} came")]
    FdCount { expected: usize, got: usize },
    #[error("bridge {0} is not one of the datastore's switches")]
    NotInSetup(String),
    #[error("interface {0} does not exist")]
    NoSuchLink(String),
    #[error("{0} is not a bridge")]
    NotABridge(String),
    #[error("{0} is a bridge and cannot be a member")]
    IsABridge(String),
    #[error("{0} is not a VLAN interface")]
    NotAVlan(String),
    #[error("{name} exists and is not VLAN {vlan} on {parent}")]
    OtherVlan {
        name: String,
        vlan: u16,
        parent: String,
    },
    #[error("{0} is a tap of another guest")]
    ForeignTap(String),
    #[error("{member} is a member of another bridge")]
    MemberOfOther { member: String },
    #[error("{member} is not a member of {bridge}")]
    NotAMember { member: String, bridge: String },
    #[error("this netcfg serves no guest, so it creates and deletes no taps")]
    NoGuest,
    #[error("no free tap name")]
    NoFreeTapName,
    #[error("creating tap {name} failed")]
    Tun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} vanished while it was being set up")]
    Vanished(String),
    #[error(transparent)]
    Netlink(#[from] RtnlError),
}

/// The request handler.
#[derive(Debug)]
pub struct Server {
    setup: NetcfgSetup,
    rtnl: Rtnl,
}

impl Server {
    pub fn new(setup: NetcfgSetup, rtnl: Rtnl) -> Server {
        Server { setup, rtnl }
    }

    /// Answers one request; never fails (a failure is an error reply). The request's fds are
    /// closed when it returns: the taps stay alive through the parent's copies.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "taking the fds closes netcfg's copies once the request is answered"
    )]
    pub fn handle(&mut self, request: &NetcfgRequest, fds: Vec<OwnedFd>) -> NetcfgReply {
        match self.try_handle(request, &fds) {
            Ok(reply) => reply,
            Err(e) => {
                let message = error_chain(&e);
                tracing::warn!(?request, error = %message, "request refused");
                NetcfgReply::error(&message)
            }
        }
    }

    fn try_handle(
        &mut self,
        request: &NetcfgRequest,
        fds: &[OwnedFd],
    ) -> Result<NetcfgReply, RequestError> {
        request.validate()?;
        if fds.len() != request.fd_count() {
            return Err(RequestError::FdCount {
                expected: request.fd_count(),
                got: fds.len(),
            });
        }
        match request {
            NetcfgRequest::CreateBridge { bridge } => self.create_bridge(bridge),
            NetcfgRequest::DestroyBridge { bridge } => self.destroy_bridge(bridge),
            NetcfgRequest::AddMember { bridge, member } => self.add_member(bridge, member),
            NetcfgRequest::RemoveMember { bridge, member } => self.remove_member(bridge, member),
            NetcfgRequest::AddVlan { parent, vlan } => self.add_vlan(parent, *vlan),
            NetcfgRequest::DeleteVlan { parent, vlan } => self.delete_vlan(parent, *vlan),
            NetcfgRequest::SetMtu { bridge, mtu } => self.set_mtu(bridge, *mtu),
            NetcfgRequest::SetAddresses { bridge, addresses } => {
                self.set_addresses(bridge, addresses)
            }
            NetcfgRequest::SetPrivate { bridge, private } => self.set_private(bridge, *private),
            NetcfgRequest::CreateTap {
                bridge, nic, mtu, ..
            } => {
                return self.create_tap(bridge.as_deref(), *nic, *mtu, fds);
            }
            NetcfgRequest::DeleteTaps => return self.delete_taps(),
            NetcfgRequest::Link { ifname } => return self.link_state(ifname),
        }?;
        Ok(NetcfgReply::Ok)
    }

    /// A bridge of the setup, which may or may not exist.
    fn check_in_setup(&self, bridge: &str) -> Result<(), RequestError> {
        if self.setup.bridges.iter().any(|b| b == bridge) {
            Ok(())
        } else {
            Err(RequestError::NotInSetup(bridge.to_owned()))
        }
    }

    /// A bridge of the setup that exists.
    fn bridge(&mut self, bridge: &str) -> Result<Link, RequestError> {
        self.check_in_setup(bridge)?;
        let link = self.existing(bridge)?;
        if link.is_bridge() {
            Ok(link)
        } else {
            Err(RequestError::NotABridge(bridge.to_owned()))
        }
    }

    fn existing(&mut self, name: &str) -> Result<Link, RequestError> {
        self.rtnl
            .link(name)?
            .ok_or_else(|| RequestError::NoSuchLink(name.to_owned()))
    }

    fn members(&mut self, bridge: &Link) -> Result<Vec<Link>, RequestError> {
        let mut links = self.rtnl.links()?;
        links.retain(|l| l.master == bridge.index && l.index != bridge.index);
        Ok(links)
    }

    /// Refuses a capvm tap that is not the setup's guest's.
    fn check_not_foreign_tap(&self, link: &Link) -> Result<(), RequestError> {
        let own = !self.setup.tap_owner.is_empty() && is_tap_of(&link.alias, &self.setup.tap_owner);
        if is_capvm_tap(link) && !own {
            Err(RequestError::ForeignTap(link.name.clone()))
        } else {
            Ok(())
        }
    }

    fn create_bridge(&mut self, bridge: &str) -> Result<(), RequestError> {
        self.check_in_setup(bridge)?;
        let link = match self.rtnl.link(bridge)? {
            Some(link) if link.is_bridge() => link,
            Some(_) => return Err(RequestError::NotABridge(bridge.to_owned())),
            None => {
                self.rtnl.create_bridge(bridge)?;
                tracing::info!(bridge, "bridge created");
                self.existing(bridge)?
            }
        };
        self.up(&link)
    }

    fn destroy_bridge(&mut self, bridge: &str) -> Result<(), RequestError> {
        self.check_in_setup(bridge)?;
        match self.rtnl.link(bridge)? {
            None => Ok(()),
            Some(link) if link.is_bridge() => {
                self.rtnl.delete_link(link.index)?;
                tracing::info!(bridge, "bridge deleted");
                Ok(())
            }
            Some(_) => Err(RequestError::NotABridge(bridge.to_owned())),
        }
    }

    fn add_member(&mut self, bridge: &str, member: &str) -> Result<(), RequestError> {
        let br = self.bridge(bridge)?;
        let link = self.existing(member)?;
        if link.is_bridge() || link.index == br.index {
            return Err(RequestError::IsABridge(member.to_owned()));
        }
        self.check_not_foreign_tap(&link)?;
        if link.master != 0 && link.master != br.index {
            return Err(RequestError::MemberOfOther {
                member: member.to_owned(),
            });
        }
        self.rtnl.change_link(
            link.index,
            &LinkChange {
                master: Some(br.index),
                up: true,
                ..LinkChange::default()
            },
        )?;
        tracing::info!(bridge, member, "member added");
        Ok(())
    }

    fn remove_member(&mut self, bridge: &str, member: &str) -> Result<(), RequestError> {
        let br = self.bridge(bridge)?;
        let link = self.existing(member)?;
        if link.master != br.index {
            return Err(RequestError::NotAMember {
                member: member.to_owned(),
                bridge: bridge.to_owned(),
            });
        }
        self.check_not_foreign_tap(&link)?;
        self.rtnl.change_link(
            link.index,
            &LinkChange {
                master: Some(0),
                ..LinkChange::default()
            },
        )?;
        tracing::info!(bridge, member, "member removed");
        Ok(())
    }

    fn add_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), RequestError> {
        let name = vlan_ifname(parent, vlan)?;
        let lower = self.existing(parent)?;
        self.check_not_foreign_tap(&lower)?;
        let link = if let Some(link) = self.rtnl.link(&name)? {
            if link.kind != "vlan" || link.link != lower.index || link.vlan_id != Some(vlan) {
                return Err(RequestError::OtherVlan {
                    name,
                    vlan,
                    parent: parent.to_owned(),
                });
            }
            link
        } else {
            self.rtnl.create_vlan(&name, lower.index, vlan)?;
            tracing::info!(parent, vlan, "VLAN interface created");
            self.existing(&name)?
        };
        self.up(&link)
    }

    fn delete_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), RequestError> {
        let name = vlan_ifname(parent, vlan)?;
        match self.rtnl.link(&name)? {
            None => Ok(()),
            Some(link) if link.kind == "vlan" => {
                self.rtnl.delete_link(link.index)?;
                tracing::info!(parent, vlan, "VLAN interface deleted");
                Ok(())
            }
            Some(_) => Err(RequestError::NotAVlan(name)),
        }
    }

    fn set_mtu(&mut self, bridge: &str, mtu: u32) -> Result<(), RequestError> {
        let br = self.bridge(bridge)?;
        // Members first: a bridge takes the smallest MTU of its ports.
        for member in self.members(&br)? {
            self.rtnl.change_link(
                member.index,
                &LinkChange {
                    mtu: Some(mtu),
                    ..LinkChange::default()
                },
            )?;
        }
        self.rtnl.change_link(
            br.index,
            &LinkChange {
                mtu: Some(mtu),
                ..LinkChange::default()
            },
        )?;
        tracing::info!(bridge, mtu, "MTU set");
        Ok(())
    }

    fn set_addresses(&mut self, bridge: &str, wanted: &[IfAddress]) -> Result<(), RequestError> {
        let br = self.bridge(bridge)?;
        self.up(&br)?;
        for addr in self.rtnl.addrs(br.index)? {
            let keep = is_link_scoped(addr.scope)
                || addr
                    .own()
                    .is_some_and(|a| wanted.contains(&if_address(a, addr.prefix_len)));
            if !keep {
                self.rtnl.del_addr(&addr)?;
            }
        }
        // Removing a primary IPv4 address can take its secondaries along: look again.
        let present: Vec<IfAddress> = self
            .rtnl
            .addrs(br.index)?
            .iter()
            .filter_map(|a| a.own().map(|own| if_address(own, a.prefix_len)))
            .collect();
        for addr in wanted {
            if !present.contains(addr) {
                self.rtnl.add_addr(br.index, addr.addr, addr.prefix_len)?;
            }
        }
        tracing::info!(bridge, addresses = ?wanted, "addresses set");
        Ok(())
    }

    fn set_private(&mut self, bridge: &str, private: bool) -> Result<(), RequestError> {
        let br = self.bridge(bridge)?;
        let alias = if private {
            if !br.alias.is_empty() && br.alias != PRIVATE_ALIAS {
                tracing::warn!(bridge, alias = %br.alias, "replacing the bridge's alias with capvm's private mark");
            }
            Some(PRIVATE_ALIAS)
        } else {
            (br.alias == PRIVATE_ALIAS).then_some("")
        };
        if let Some(alias) = alias {
            self.rtnl.change_link(
                br.index,
                &LinkChange {
                    alias: Some(alias),
                    ..LinkChange::default()
                },
            )?;
        }
        for port in self.members(&br)? {
            if is_capvm_tap(&port) {
                self.rtnl.set_isolated(port.index, private)?;
            }
        }
        tracing::info!(bridge, private, "private flag set");
        Ok(())
    }

    fn create_tap(
        &mut self,
        bridge: Option<&str>,
        nic: u16,
        mtu: Option<u32>,
        tuns: &[OwnedFd],
    ) -> Result<NetcfgReply, RequestError> {
        if self.setup.tap_owner.is_empty() {
            return Err(RequestError::NoGuest);
        }
        let br = bridge.map(|b| self.bridge(b)).transpose()?;
        let (first, rest) = tuns.split_first().ok_or(RequestError::FdCount {
            expected: 1,
            got: 0,
        })?;
        let name = self.make_tap(first, !rest.is_empty())?;
        // Each further fd becomes a queue of the same tap; the tap vanishes with its fds if
        // this fails (the parent drops them on the error reply).
        for tun in rest {
            tun::attach_queue(tun.as_fd(), &name).map_err(|source| RequestError::Tun {
                name: name.clone(),
                source,
            })?;
        }
        let tap = self
            .rtnl
            .link(&name)?
            .ok_or_else(|| RequestError::Vanished(name.clone()))?;
        let alias = tap_alias(&self.setup.tap_owner, nic);
        self.rtnl.change_link(
            tap.index,
            &LinkChange {
                alias: Some(&alias),
                mtu: mtu.or(br.as_ref().map(|b| b.mtu)),
                ..LinkChange::default()
            },
        )?;
        self.rtnl.change_link(
            tap.index,
            &LinkChange {
                master: br.as_ref().map(|b| b.index),
                up: true,
                ..LinkChange::default()
            },
        )?;
        if let Some(br) = &br
            && br.alias == PRIVATE_ALIAS
        {
            self.rtnl.set_isolated(tap.index, true)?;
        }
        tracing::info!(tap = %name, %alias, bridge = ?bridge, queues = tuns.len(), "tap created");
        Ok(NetcfgReply::Tap { name })
    }

    /// `TUNSETIFF` with the first free `capvm-tapN`; a name taken since the listing (the
    /// kernel's `EBUSY`/`EEXIST`) moves on to the next.
    fn make_tap(&mut self, tun: &OwnedFd, multi_queue: bool) -> Result<String, RequestError> {
        let taken: Vec<String> = self.rtnl.links()?.into_iter().map(|l| l.name).collect();
        let mut attempts = 0usize;
        for n in 0..=MAX_TAP_NUMBER {
            let name = format!("{TAP_NAME_PREFIX}{n}");
            if taken.contains(&name) {
                continue;
            }
            match tun::create_tap(tun.as_fd(), &name, multi_queue) {
                Ok(()) => return Ok(name),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)) => {
                    attempts = attempts.saturating_add(1);
                    if attempts >= TAP_NAME_ATTEMPTS {
                        break;
                    }
                }
                Err(source) => return Err(RequestError::Tun { name, source }),
            }
        }
        Err(RequestError::NoFreeTapName)
    }

    fn delete_taps(&mut self) -> Result<NetcfgReply, RequestError> {
        if self.setup.tap_owner.is_empty() {
            return Err(RequestError::NoGuest);
        }
        let mut names = Vec::new();
        for link in self.rtnl.links()? {
            if link.kind == "tun" && is_tap_of(&link.alias, &self.setup.tap_owner) {
                match self.rtnl.delete_link(link.index) {
                    Ok(()) => {}
                    // Gone already: its last fd closed meanwhile.
                    Err(e) if e.errno() == Some(libc::ENODEV) => continue,
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(tap = %link.name, alias = %link.alias, "tap deleted");
                if names.len() < MAX_DELETED && reportable_name(&link).is_some() {
                    names.push(link.name);
                }
            }
        }
        Ok(NetcfgReply::Deleted { names })
    }

    fn link_state(&mut self, ifname: &str) -> Result<NetcfgReply, RequestError> {
        let Some(link) = self.rtnl.link(ifname)? else {
            return Ok(NetcfgReply::Link(None));
        };
        let members = if link.is_bridge() {
            self.members(&link)?
                .iter()
                .filter_map(reportable_name)
                .take(MAX_MEMBERS)
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        let master = if link.master == 0 {
            None
        } else {
            self.rtnl
                .link_by_index(link.master)?
                .and_then(|m| reportable_name(&m).map(str::to_owned))
        };
        let addresses = self
            .rtnl
            .addrs(link.index)?
            .iter()
            .filter_map(|a| a.own().map(|own| if_address(own, a.prefix_len)))
            .filter(IfAddress::is_valid)
            .take(MAX_ADDRESSES)
            .collect();
        let kind = if link.kind.len() <= MAX_NETCFG_TEXT_BYTES
            && link.kind.bytes().all(|b| b.is_ascii_graphic())
        {
            link.kind.clone()
        } else {
            String::new()
        };
        Ok(NetcfgReply::Link(Some(LinkState {
            name: ifname.to_owned(),
            kind,
            mtu: link.mtu,
            up: link.is_up(),
            master,
            members,
            addresses,
            private: link.is_bridge() && link.alias == PRIVATE_ALIAS,
        })))
    }

    fn up(&mut self, link: &Link) -> Result<(), RequestError> {
        if !link.is_up() {
            self.rtnl.change_link(
                link.index,
                &LinkChange {
                    up: true,
                    ..LinkChange::default()
                },
            )?;
        }
        Ok(())
    }
}

/// A capvm tap: by its name or by its alias.
fn is_capvm_tap(link: &Link) -> bool {
    link.name.starts_with(TAP_NAME_PREFIX)
        || (link.kind == "tun" && link.alias.starts_with(TAP_ALIAS_PREFIX))
}

/// Link-local (IPv6 `fe80::/10`) and host-scoped addresses are the kernel's, not the
/// switch's: `SetAddresses` leaves them.
fn is_link_scoped(scope: u8) -> bool {
    scope >= RT_SCOPE_LINK
}

fn if_address(addr: std::net::IpAddr, prefix_len: u8) -> IfAddress {
    IfAddress { addr, prefix_len }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server whose netlink socket is a dead end: only requests refused before any
    /// netlink exchange can be answered.
    fn offline_server(owner: &str) -> Server {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        Server::new(
            NetcfgSetup {
                bridges: vec!["vm-public".into()],
                tap_owner: owner.into(),
            },
            Rtnl::new(OwnedFd::from(a)),
        )
    }

    fn error_text(reply: &NetcfgReply) -> &str {
        match reply {
            NetcfgReply::Error { message } => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_bridge_not_in_the_setup_is_refused() {
        let mut server = offline_server("web");
        for request in [
            NetcfgRequest::CreateBridge {
                bridge: "br-host".into(),
            },
            NetcfgRequest::DestroyBridge {
                bridge: "eth0".into(),
            },
            NetcfgRequest::SetMtu {
                bridge: "br-host".into(),
                mtu: 1500,
            },
        ] {
            let reply = server.handle(&request, Vec::new());
            assert!(
                error_text(&reply).contains("not one of the datastore's switches"),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn taps_without_a_guest_are_refused() {
        let mut server = offline_server("");
        let (tun, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let reply = server.handle(
            &NetcfgRequest::CreateTap {
                bridge: None,
                nic: 0,
                mtu: None,
                queues: 1,
            },
            vec![OwnedFd::from(tun)],
        );
        assert!(error_text(&reply).contains("no guest"), "{reply:?}");
        let reply = server.handle(&NetcfgRequest::DeleteTaps, Vec::new());
        assert!(error_text(&reply).contains("no guest"), "{reply:?}");
    }

    #[test]
    fn a_request_with_the_wrong_fd_count_is_refused() {
        let mut server = offline_server("web");
        let reply = server.handle(
            &NetcfgRequest::CreateTap {
                bridge: None,
                nic: 0,
                mtu: None,
                queues: 1,
            },
            Vec::new(),
        );
        assert!(
            error_text(&reply).contains("needs 1 file descriptors"),
            "{reply:?}"
        );
        let (tun, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let reply = server.handle(
            &NetcfgRequest::CreateTap {
                bridge: None,
                nic: 0,
                mtu: None,
                queues: 2,
            },
            vec![OwnedFd::from(tun)],
        );
        assert!(
            error_text(&reply).contains("needs 2 file descriptors"),
            "{reply:?}"
        );
    }

    #[test]
    fn a_request_out_of_bounds_is_refused() {
        let mut server = offline_server("web");
        let reply = server.handle(
            &NetcfgRequest::CreateBridge {
                bridge: "a/b".into(),
            },
            Vec::new(),
        );
        assert!(error_text(&reply).contains("interface name"), "{reply:?}");
    }

    #[test]
    fn taps_are_recognised_by_name_or_alias() {
        let tap = Link {
            name: "capvm-tap3".into(),
            kind: "tun".into(),
            ..Link::default()
        };
        let aliased = Link {
            name: "renamed".into(),
            kind: "tun".into(),
            alias: "capvm:db:0".into(),
            ..Link::default()
        };
        let veth = Link {
            name: "veth0".into(),
            kind: "veth".into(),
            ..Link::default()
        };
        assert!(is_capvm_tap(&tap));
        assert!(is_capvm_tap(&aliased));
        assert!(!is_capvm_tap(&veth));
        let server = offline_server("web");
        assert!(server.check_not_foreign_tap(&aliased).is_err());
        assert!(server.check_not_foreign_tap(&veth).is_ok());
    }
}
