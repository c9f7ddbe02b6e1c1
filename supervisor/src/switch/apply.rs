//! Making the live links match a switch's config, through netcfg ([`Links`]).
//!
//! Every step is idempotent (netcfg creates a bridge or VLAN only if missing, enslaving a
//! member twice is harmless), so [`ensure`] both creates a switch and repairs one after a host
//! reboot (`vm init`). Detaching looks first ([`Links::link`]) and only undoes what is there,
//! so removing a port whose interface has gone is not an error.

#![forbid(unsafe_code)]

use proto::netcfg::{IfAddress, LinkState};

use super::config::{Switch, SwitchType};
use crate::netcfg_client::{NetcfgClient, NetcfgClientError};

/// The netcfg requests the switch commands use; [`NetcfgClient`] in production, a recorder
/// in the unit tests.
pub trait Links {
    fn create_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError>;
    fn destroy_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError>;
    fn add_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError>;
    fn remove_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError>;
    fn add_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError>;
    fn delete_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError>;
    fn set_mtu(&mut self, bridge: &str, mtu: u32) -> Result<(), NetcfgClientError>;
    fn set_addresses(
        &mut self,
        bridge: &str,
        addresses: &[IfAddress],
    ) -> Result<(), NetcfgClientError>;
    fn set_private(&mut self, bridge: &str, private: bool) -> Result<(), NetcfgClientError>;
    fn link(&mut self, ifname: &str) -> Result<Option<LinkState>, NetcfgClientError>;
}

impl Links for NetcfgClient {
    fn create_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError> {
        NetcfgClient::create_bridge(self, bridge)
    }
    fn destroy_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError> {
        NetcfgClient::destroy_bridge(self, bridge)
    }
    fn add_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError> {
        NetcfgClient::add_member(self, bridge, member)
    }
    fn remove_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError> {
        NetcfgClient::remove_member(self, bridge, member)
    }
    fn add_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError> {
        NetcfgClient::add_vlan(self, parent, vlan)
    }
    fn delete_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError> {
        NetcfgClient::delete_vlan(self, parent, vlan)
    }
    fn set_mtu(&mut self, bridge: &str, mtu: u32) -> Result<(), NetcfgClientError> {
        NetcfgClient::set_mtu(self, bridge, mtu)
    }
    fn set_addresses(
        &mut self,
        bridge: &str,
        addresses: &[IfAddress],
    ) -> Result<(), NetcfgClientError> {
        NetcfgClient::set_addresses(self, bridge, addresses)
    }
    fn set_private(&mut self, bridge: &str, private: bool) -> Result<(), NetcfgClientError> {
        NetcfgClient::set_private(self, bridge, private)
    }
    fn link(&mut self, ifname: &str) -> Result<Option<LinkState>, NetcfgClientError> {
        NetcfgClient::link(self, ifname)
    }
}

/// Why a switch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{what}")]
    Netcfg {
        what: String,
        #[source]
        source: NetcfgClientError,
    },
    #[error("bridge {bridge} of manual switch {switch} does not exist (create it first)")]
    NoBridge { switch: String, bridge: String },
    #[error("{name} is not a bridge (it is a {kind} link)")]
    NotBridge { name: String, kind: String },
    #[error("{0}")]
    Config(String),
}

fn step<T>(
    what: impl FnOnce() -> String,
    r: Result<T, NetcfgClientError>,
) -> Result<T, ApplyError> {
    r.map_err(|source| ApplyError::Netcfg {
        what: what(),
        source,
    })
}

/// Checks that a manual switch's bridge exists and is a bridge.
pub fn check_manual_bridge(links: &mut dyn Links, sw: &Switch) -> Result<(), ApplyError> {
    let link = step(
        || format!("looking up {}", sw.bridge),
        links.link(&sw.bridge),
    )?;
    match link {
        None => Err(ApplyError::NoBridge {
            switch: sw.name.clone(),
            bridge: sw.bridge.clone(),
        }),
        Some(l) if l.kind != "bridge" => Err(ApplyError::NotBridge {
            name: sw.bridge.clone(),
            kind: if l.kind.is_empty() {
                "physical".to_owned()
            } else {
                l.kind
            },
        }),
        Some(_) => Ok(()),
    }
}

/// Makes the live state match `sw`: a standard switch's bridge (created if missing), its
/// members (VLAN interfaces made first), MTU, addresses and private flag; a manual switch's
/// addresses, MTU and private flag on its existing bridge.
pub fn ensure(links: &mut dyn Links, sw: &Switch) -> Result<(), ApplyError> {
    let bridge = sw.bridge.as_str();
    match sw.kind {
        SwitchType::Standard => {
            step(
                || format!("creating bridge {bridge}"),
                links.create_bridge(bridge),
            )?;
            for port in &sw.ports {
                attach(links, sw, port)?;
            }
        }
        SwitchType::Manual => check_manual_bridge(links, sw)?,
    }
    if let Some(mtu) = sw.mtu {
        step(
            || format!("setting MTU {mtu} on {bridge}"),
            links.set_mtu(bridge, mtu),
        )?;
    }
    // A manual bridge's addresses are only capvm's business when the switch names some.
    if sw.kind == SwitchType::Standard || !sw.addresses.is_empty() {
        step(
            || format!("setting the addresses of {bridge}"),
            links.set_addresses(bridge, &sw.addresses),
        )?;
    }
    if sw.kind == SwitchType::Standard || sw.private {
        step(
            || format!("setting {bridge} private={}", sw.private),
            links.set_private(bridge, sw.private),
        )?;
    }
    Ok(())
}

/// Adds `port` (as `port.VLAN` with a VLAN) to the switch's bridge.
pub fn attach(links: &mut dyn Links, sw: &Switch, port: &str) -> Result<(), ApplyError> {
    let member = sw.member_name(port).map_err(ApplyError::Config)?;
    if let Some(vlan) = sw.vlan {
        step(
            || format!("creating VLAN interface {member}"),
            links.add_vlan(port, vlan),
        )?;
    }
    step(
        || format!("adding {member} to {}", sw.bridge),
        links.add_member(&sw.bridge, &member),
    )
}

/// Takes `port` out of the switch's bridge (and deletes its VLAN interface), as far as it is
/// there.
pub fn detach(links: &mut dyn Links, sw: &Switch, port: &str) -> Result<(), ApplyError> {
    let member = sw.member_name(port).map_err(ApplyError::Config)?;
    let link = step(|| format!("looking up {member}"), links.link(&member))?;
    let Some(link) = link else {
        return Ok(());
    };
    if link.master.as_deref() == Some(sw.bridge.as_str()) {
        step(
            || format!("removing {member} from {}", sw.bridge),
            links.remove_member(&sw.bridge, &member),
        )?;
    }
    if let Some(vlan) = sw.vlan {
        step(
            || format!("deleting VLAN interface {member}"),
            links.delete_vlan(port, vlan),
        )?;
    }
    Ok(())
}

/// Undoes a switch: a standard one's members are released and its bridge deleted; a manual
/// one's bridge stays, only the addresses and private flag capvm set are taken back.
pub fn teardown(links: &mut dyn Links, sw: &Switch) -> Result<(), ApplyError> {
    let bridge = sw.bridge.as_str();
    let exists = step(|| format!("looking up {bridge}"), links.link(bridge))?.is_some();
    match sw.kind {
        SwitchType::Standard => {
            for port in &sw.ports {
                detach(links, sw, port)?;
            }
            if exists {
                step(
                    || format!("deleting bridge {bridge}"),
                    links.destroy_bridge(bridge),
                )?;
            }
        }
        SwitchType::Manual if exists => {
            if !sw.addresses.is_empty() {
                step(
                    || format!("removing the addresses of {bridge}"),
                    links.set_addresses(bridge, &[]),
                )?;
            }
            if sw.private {
                step(
                    || format!("setting {bridge} private=false"),
                    links.set_private(bridge, false),
                )?;
            }
        }
        SwitchType::Manual => {}
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod fake {
    //! A [`Links`] that records requests and keeps a tiny model of links.

    use std::collections::BTreeMap;

    use super::*;

    #[derive(Debug, Default)]
    pub struct FakeLinks {
        pub calls: Vec<String>,
        pub links: BTreeMap<String, LinkState>,
    }

    impl FakeLinks {
        pub fn with(names: &[(&str, &str)]) -> FakeLinks {
            let mut f = FakeLinks::default();
            for (name, kind) in names {
                f.put(name, kind);
            }
            f
        }

        pub fn put(&mut self, name: &str, kind: &str) {
            self.links.insert(
                name.to_owned(),
                LinkState {
                    name: name.to_owned(),
                    kind: kind.to_owned(),
                    mtu: 1500,
                    up: true,
                    master: None,
                    members: Vec::new(),
                    addresses: Vec::new(),
                    private: false,
                },
            );
        }

        fn missing(name: &str) -> NetcfgClientError {
            NetcfgClientError::Refused(format!("{name} does not exist"))
        }
    }

    impl Links for FakeLinks {
        fn create_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("create_bridge {bridge}"));
            if !self.links.contains_key(bridge) {
                self.put(bridge, "bridge");
            }
            Ok(())
        }
        fn destroy_bridge(&mut self, bridge: &str) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("destroy_bridge {bridge}"));
            self.links
                .remove(bridge)
                .map(drop)
                .ok_or_else(|| Self::missing(bridge))
        }
        fn add_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("add_member {bridge} {member}"));
            let l = self
                .links
                .get_mut(member)
                .ok_or_else(|| Self::missing(member))?;
            l.master = Some(bridge.to_owned());
            Ok(())
        }
        fn remove_member(&mut self, bridge: &str, member: &str) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("remove_member {bridge} {member}"));
            let l = self
                .links
                .get_mut(member)
                .ok_or_else(|| Self::missing(member))?;
            l.master = None;
            Ok(())
        }
        fn add_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("add_vlan {parent} {vlan}"));
            if !self.links.contains_key(parent) {
                return Err(Self::missing(parent));
            }
            self.put(&format!("{parent}.{vlan}"), "vlan");
            Ok(())
        }
        fn delete_vlan(&mut self, parent: &str, vlan: u16) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("delete_vlan {parent} {vlan}"));
            self.links.remove(&format!("{parent}.{vlan}"));
            Ok(())
        }
        fn set_mtu(&mut self, bridge: &str, mtu: u32) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("set_mtu {bridge} {mtu}"));
            Ok(())
        }
        fn set_addresses(
            &mut self,
            bridge: &str,
            addresses: &[IfAddress],
        ) -> Result<(), NetcfgClientError> {
            let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            self.calls
                .push(format!("set_addresses {bridge} [{}]", list.join(" ")));
            Ok(())
        }
        fn set_private(&mut self, bridge: &str, private: bool) -> Result<(), NetcfgClientError> {
            self.calls.push(format!("set_private {bridge} {private}"));
            Ok(())
        }
        fn link(&mut self, ifname: &str) -> Result<Option<LinkState>, NetcfgClientError> {
            Ok(self.links.get(ifname).cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeLinks;
    use super::*;
    use crate::switch::config::{parse_addresses, standard_bridge};

    fn standard() -> Switch {
        let mut sw = Switch::new("pub", SwitchType::Standard, standard_bridge("pub"));
        sw.ports = vec!["eth0".into()];
        sw.addresses = parse_addresses("198.18.0.1/24 2001:db8::1/64").unwrap();
        sw.mtu = Some(1400);
        sw
    }

    #[test]
    fn ensure_builds_a_standard_switch_in_order() {
        let mut links = FakeLinks::with(&[("eth0", "")]);
        ensure(&mut links, &standard()).unwrap();
        assert_eq!(
            links.calls,
            [
                "create_bridge vm-pub",
                "add_member vm-pub eth0",
                "set_mtu vm-pub 1400",
                "set_addresses vm-pub [198.18.0.1/24 2001:db8::1/64]",
                "set_private vm-pub false",
            ]
        );
    }

    #[test]
    fn with_a_vlan_members_join_as_if_dot_vlan() {
        let mut links = FakeLinks::with(&[("eth0", "")]);
        let mut sw = standard();
        sw.vlan = Some(7);
        ensure(&mut links, &sw).unwrap();
        assert_eq!(
            links.calls[1..3],
            ["add_vlan eth0 7", "add_member vm-pub eth0.7"]
        );
        links.calls.clear();
        detach(&mut links, &sw, "eth0").unwrap();
        assert_eq!(
            links.calls,
            ["remove_member vm-pub eth0.7", "delete_vlan eth0 7"]
        );
    }

    #[test]
    fn detaching_a_port_that_is_gone_does_nothing() {
        let mut links = FakeLinks::default();
        detach(&mut links, &standard(), "eth0").unwrap();
        assert!(links.calls.is_empty(), "{:?}", links.calls);
    }

    #[test]
    fn a_manual_switch_needs_an_existing_bridge_and_is_never_created_or_destroyed() {
        let mut sw = Switch::new("lab", SwitchType::Manual, "br0".into());
        let mut links = FakeLinks::default();
        assert!(matches!(
            ensure(&mut links, &sw),
            Err(ApplyError::NoBridge { .. })
        ));
        let mut links = FakeLinks::with(&[("br0", "veth")]);
        assert!(matches!(
            ensure(&mut links, &sw),
            Err(ApplyError::NotBridge { .. })
        ));
        let mut links = FakeLinks::with(&[("br0", "bridge")]);
        sw.addresses = parse_addresses("198.18.1.1/24").unwrap();
        ensure(&mut links, &sw).unwrap();
        teardown(&mut links, &sw).unwrap();
        assert_eq!(
            links.calls,
            ["set_addresses br0 [198.18.1.1/24]", "set_addresses br0 []"]
        );
        assert!(links.links.contains_key("br0"));
    }

    #[test]
    fn teardown_releases_members_then_deletes_the_bridge() {
        let mut links = FakeLinks::with(&[("eth0", "")]);
        let sw = standard();
        ensure(&mut links, &sw).unwrap();
        links.calls.clear();
        teardown(&mut links, &sw).unwrap();
        assert_eq!(
            links.calls,
            ["remove_member vm-pub eth0", "destroy_bridge vm-pub"]
        );
        assert!(!links.links.contains_key("vm-pub"));
    }
}
