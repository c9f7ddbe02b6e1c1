//! The netcfg channel: the per-VM supervisor or the `vm` CLI ↔ `netcfg`.
//!
//! `netcfg` is the one capvm process that keeps `CAP_NET_ADMIN`. Its parent starts it with a
//! netlink route socket ([`FdRole::Netlink`], opened by the parent, since capability mode
//! forbids `socket`) and sends a [`NetcfgSetup`] on the bootstrap channel after `Ready`: the
//! bridges it may touch (those that the datastore's switches name) and the guest whose taps it
//! creates. Then the parent sends one [`NetcfgRequest`] at a time on the same channel and reads
//! one [`NetcfgReply`].
//!
//! Taps: the parent opens `/dev/net/tun` (netcfg cannot open paths) and attaches the fd to
//! [`NetcfgRequest::CreateTap`]; netcfg turns it into a tap with `TUNSETIFF` (`IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`, and `IFF_MULTI_QUEUE` when several fds come: the first
//! creates the tap, the others attach to it as its further queues), names it `capvm-tapN` (the first free N), marks it with the
//! interface alias `capvm:<guest>:<nic>`, sets its MTU, attaches it to the bridge and brings it
//! up. The tap is not persistent: it disappears when the last fd to it closes, so a guest's taps
//! go away with its supervisor and device processes even after a crash. netcfg only deletes or
//! changes taps whose alias says they are its guest's.
//!
//! Host addresses go on bridges only, never on a member port (the guest could not reach the
//! host otherwise, vm-bhyve #146).
//!
//! netcfg trusts its parent (root) for the setup, but still checks every request against it:
//! interface names are checked by [`validate_ifname`], bridges must be in the setup's list,
//! counts are bounded.
//!
//! [`FdRole::Netlink`]: crate::bootstrap::FdRole::Netlink

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::bounds::clip;

/// Longest Linux interface name (`IFNAMSIZ` − 1).
pub const MAX_IFNAME_BYTES: usize = 15;
/// Most bridges of a [`NetcfgSetup`].
pub const MAX_BRIDGES: usize = 64;
/// Most addresses of a [`NetcfgRequest::SetAddresses`] or a [`LinkState`].
pub const MAX_ADDRESSES: usize = 32;
/// Most members of a [`LinkState`].
pub const MAX_MEMBERS: usize = 256;
/// Most names in a [`NetcfgReply::Deleted`].
pub const MAX_DELETED: usize = 256;
/// Longest [`NetcfgReply::Error`] message and [`LinkState::kind`], in bytes.
pub const MAX_NETCFG_TEXT_BYTES: usize = 1024;
/// Longest guest name in a tap alias.
pub const MAX_OWNER_BYTES: usize = 64;
/// The prefix of a tap's interface alias: `capvm:<guest>:<nic>`.
pub const TAP_ALIAS_PREFIX: &str = "capvm:";
/// The prefix of a tap's name: `capvm-tapN`.
pub const TAP_NAME_PREFIX: &str = "capvm-tap";
/// Smallest MTU netcfg sets (IPv4's minimum).
pub const MIN_MTU: u32 = 68;
/// Largest MTU netcfg sets.
pub const MAX_MTU: u32 = 65535;
/// Largest 802.1Q VLAN id.
pub const MAX_VLAN: u16 = 4094;
/// Most queues (fds) of one tap: one per virtio-net queue pair.
pub const MAX_TAP_QUEUES: u16 = crate::device::MAX_NET_QUEUE_PAIRS;

/// What netcfg may touch, sent once after `Ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetcfgSetup {
    /// Bridges named by the datastore's switches (standard `vm-NAME` and manual ones), at
    /// most [`MAX_BRIDGES`], each a valid interface name.
    pub bridges: Vec<String>,
    /// The guest whose taps this netcfg creates and deletes; empty for the CLI (which creates
    /// none).
    pub tap_owner: String,
}

impl NetcfgSetup {
    /// Checks the bounds netcfg relies on.
    pub fn validate(&self) -> Result<(), NetcfgMessageError> {
        if self.bridges.len() > MAX_BRIDGES {
            return Err(NetcfgMessageError::TooMany("bridges"));
        }
        for bridge in &self.bridges {
            validate_ifname(bridge)?;
        }
        validate_owner(&self.tap_owner)
    }
}

/// An address with its prefix length, as on `ip addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IfAddress {
    pub addr: IpAddr,
    /// At most 32 for IPv4, 128 for IPv6.
    pub prefix_len: u8,
}

impl IfAddress {
    /// Parses `addr/len`.
    pub fn parse(s: &str) -> Option<IfAddress> {
        let (addr, len) = s.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let prefix_len: u8 = len.parse().ok()?;
        let a = IfAddress { addr, prefix_len };
        a.is_valid().then_some(a)
    }

    /// Whether the prefix length fits the address family and the address is one a host
    /// interface can carry (not unspecified, multicast or broadcast).
    pub fn is_valid(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => {
                self.prefix_len <= 32
                    && !a.is_unspecified()
                    && !a.is_multicast()
                    && !a.is_broadcast()
            }
            IpAddr::V6(a) => self.prefix_len <= 128 && !a.is_unspecified() && !a.is_multicast(),
        }
    }
}

impl std::fmt::Display for IfAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Parent → netcfg. Each is answered with one [`NetcfgReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetcfgRequest {
    /// Create bridge `bridge` (if missing) and bring it up. [`NetcfgReply::Ok`].
    CreateBridge { bridge: String },
    /// Delete bridge `bridge` (its members are released, not deleted). [`NetcfgReply::Ok`].
    DestroyBridge { bridge: String },
    /// Enslave `member` (an existing interface that is not a bridge of the setup) to `bridge`
    /// and bring it up, without taking it down first (vm-bhyve #105).
    AddMember { bridge: String, member: String },
    /// Release `member` from `bridge`.
    RemoveMember { bridge: String, member: String },
    /// Create the 802.1Q interface `parent.vlan` on `parent` (if missing) and bring it up.
    AddVlan { parent: String, vlan: u16 },
    /// Delete the interface `parent.vlan`.
    DeleteVlan { parent: String, vlan: u16 },
    /// Set the MTU of `bridge` and of every member it has.
    SetMtu { bridge: String, mtu: u32 },
    /// Make `addresses` (at most [`MAX_ADDRESSES`]) the global addresses of `bridge`; an
    /// empty list removes them. Link-local IPv6 addresses the kernel assigns stay.
    SetAddresses {
        bridge: String,
        addresses: Vec<IfAddress>,
    },
    /// Isolate (or not) the bridge's tap ports from one another (`vm switch private`): guests
    /// on a private switch reach the uplink and the host but not each other.
    SetPrivate { bridge: String, private: bool },
    /// Turn the attached `/dev/net/tun` fds (`queues` of them, 1..=[`MAX_TAP_QUEUES`]) into
    /// one tap for NIC `nic` of the setup's guest, attach it to `bridge` (if any) with `mtu`
    /// (if any; else the bridge's). With more than one fd the tap is multi-queue
    /// (`IFF_MULTI_QUEUE`): the first fd creates it, each further one attaches a queue, in
    /// order. Answered with [`NetcfgReply::Tap`]; the fds stay the parent's.
    CreateTap {
        bridge: Option<String>,
        nic: u16,
        mtu: Option<u32>,
        queues: u16,
    },
    /// Delete every tap of the setup's guest (left over from a crash). [`NetcfgReply::Deleted`].
    DeleteTaps,
    /// Describe interface `ifname`: [`NetcfgReply::Link`], `None` if it does not exist.
    Link { ifname: String },
}

impl NetcfgRequest {
    /// Checks the request's own bounds (what the setup allows is netcfg's business).
    pub fn validate(&self) -> Result<(), NetcfgMessageError> {
        match self {
            NetcfgRequest::CreateBridge { bridge }
            | NetcfgRequest::DestroyBridge { bridge }
            | NetcfgRequest::SetPrivate { bridge, .. } => validate_ifname(bridge),
            NetcfgRequest::Link { ifname } => validate_ifname(ifname),
            NetcfgRequest::AddMember { bridge, member }
            | NetcfgRequest::RemoveMember { bridge, member } => {
                validate_ifname(bridge)?;
                validate_ifname(member)
            }
            NetcfgRequest::AddVlan { parent, vlan }
            | NetcfgRequest::DeleteVlan { parent, vlan } => {
                validate_ifname(parent)?;
                vlan_ifname(parent, *vlan).map(drop)
            }
            NetcfgRequest::SetMtu { bridge, mtu } => {
                validate_ifname(bridge)?;
                validate_mtu(*mtu)
            }
            NetcfgRequest::SetAddresses { bridge, addresses } => {
                validate_ifname(bridge)?;
                validate_addresses(addresses)
            }
            NetcfgRequest::CreateTap {
                bridge,
                mtu,
                queues,
                ..
            } => {
                if let Some(bridge) = bridge {
                    validate_ifname(bridge)?;
                }
                if *queues == 0 || *queues > MAX_TAP_QUEUES {
                    return Err(NetcfgMessageError::TapQueues(*queues));
                }
                mtu.map_or(Ok(()), validate_mtu)
            }
            NetcfgRequest::DeleteTaps => Ok(()),
        }
    }

    /// How many fds must come with the request.
    pub fn fd_count(&self) -> usize {
        match self {
            NetcfgRequest::CreateTap { queues, .. } => usize::from(*queues),
            _ => 0,
        }
    }
}

/// An interface as netcfg sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub name: String,
    /// The link kind (`bridge`, `tun`, `vlan`, `veth`, … or empty for a physical port), at
    /// most [`MAX_NETCFG_TEXT_BYTES`].
    pub kind: String,
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// The bridge it is a member of.
    pub master: Option<String>,
    /// For a bridge: its member interfaces, at most [`MAX_MEMBERS`].
    pub members: Vec<String>,
    /// Its addresses, link-local ones included, at most [`MAX_ADDRESSES`].
    pub addresses: Vec<IfAddress>,
    /// For a bridge: whether its tap ports are isolated from one another.
    pub private: bool,
}

/// netcfg → parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetcfgReply {
    Ok,
    /// The tap [`NetcfgRequest::CreateTap`] made.
    Tap {
        name: String,
    },
    /// The taps [`NetcfgRequest::DeleteTaps`] deleted, at most [`MAX_DELETED`].
    Deleted {
        names: Vec<String>,
    },
    Link(Option<LinkState>),
    /// The request was refused or failed, with a message for the user.
    Error {
        message: String,
    },
}

impl NetcfgReply {
    /// An [`NetcfgReply::Error`] with `message` cut to its bound.
    pub fn error(message: &str) -> NetcfgReply {
        NetcfgReply::Error {
            message: clip(message, MAX_NETCFG_TEXT_BYTES),
        }
    }

    /// Checks the bounds the parent relies on (it prints names and messages).
    pub fn validate(&self) -> Result<(), NetcfgMessageError> {
        match self {
            NetcfgReply::Ok | NetcfgReply::Link(None) => Ok(()),
            NetcfgReply::Tap { name } => validate_ifname(name),
            NetcfgReply::Deleted { names } => {
                if names.len() > MAX_DELETED {
                    return Err(NetcfgMessageError::TooMany("deleted taps"));
                }
                names.iter().try_for_each(|n| validate_ifname(n))
            }
            NetcfgReply::Link(Some(link)) => {
                validate_ifname(&link.name)?;
                if let Some(master) = &link.master {
                    validate_ifname(master)?;
                }
                if link.kind.len() > MAX_NETCFG_TEXT_BYTES || !is_text(&link.kind) {
                    return Err(NetcfgMessageError::Text);
                }
                if link.members.len() > MAX_MEMBERS {
                    return Err(NetcfgMessageError::TooMany("members"));
                }
                link.members.iter().try_for_each(|n| validate_ifname(n))?;
                if link.addresses.len() > MAX_ADDRESSES {
                    return Err(NetcfgMessageError::TooMany("addresses"));
                }
                Ok(())
            }
            NetcfgReply::Error { message } => {
                if message.len() > MAX_NETCFG_TEXT_BYTES {
                    Err(NetcfgMessageError::Text)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A netcfg message outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetcfgMessageError {
    #[error("interface name {0:?} is not 1 to 15 characters of [A-Za-z0-9_.-]")]
    IfName(String),
    #[error("MTU {0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u32),
    #[error("VLAN {0} is outside 1..={MAX_VLAN}")]
    Vlan(u16),
    #[error("address {0} is not a host address with a prefix length that fits its family")]
    Address(IfAddress),
    #[error("too many {0}")]
    TooMany(&'static str),
    #[error("guest name {0:?} is not 1 to 64 characters of [A-Za-z0-9_.-]")]
    Owner(String),
    #[error("text out of bounds")]
    Text,
    #[error("{0} tap queues requested; 1..={MAX_TAP_QUEUES} are allowed")]
    TapQueues(u16),
}

/// Checks a Linux interface name: 1 to [`MAX_IFNAME_BYTES`] bytes of `[A-Za-z0-9_.-]`, not
/// `.` or `..` (the kernel also forbids `/`, `:` and whitespace; capvm is stricter).
pub fn validate_ifname(name: &str) -> Result<(), NetcfgMessageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_BYTES
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NetcfgMessageError::IfName(clip(name, 64)))
    }
}

/// The name of VLAN `vlan` on `parent` (`parent.vlan`), checked.
pub fn vlan_ifname(parent: &str, vlan: u16) -> Result<String, NetcfgMessageError> {
    if vlan == 0 || vlan > MAX_VLAN {
        return Err(NetcfgMessageError::Vlan(vlan));
    }
    let name = format!("{parent}.{vlan}");
    validate_ifname(&name)?;
    Ok(name)
}

/// Checks an MTU against [`MIN_MTU`]..=[`MAX_MTU`].
pub fn validate_mtu(mtu: u32) -> Result<(), NetcfgMessageError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(NetcfgMessageError::Mtu(mtu))
    }
}

fn validate_addresses(addresses: &[IfAddress]) -> Result<(), NetcfgMessageError> {
    if addresses.len() > MAX_ADDRESSES {
        return Err(NetcfgMessageError::TooMany("addresses"));
    }
    match addresses.iter().find(|a| !a.is_valid()) {
        Some(bad) => Err(NetcfgMessageError::Address(*bad)),
        None => Ok(()),
    }
}

/// A guest name fit for a tap alias: empty (the CLI) or 1 to [`MAX_OWNER_BYTES`] bytes of
/// `[A-Za-z0-9_.-]`.
fn validate_owner(owner: &str) -> Result<(), NetcfgMessageError> {
    let ok = owner.len() <= MAX_OWNER_BYTES
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NetcfgMessageError::Owner(clip(owner, 64)))
    }
}

/// The alias netcfg gives NIC `nic` of guest `owner`'s tap.
pub fn tap_alias(owner: &str, nic: u16) -> String {
    format!("{TAP_ALIAS_PREFIX}{owner}:{nic}")
}

/// Whether `alias` marks a tap of guest `owner`.
pub fn is_tap_of(alias: &str, owner: &str) -> bool {
    alias
        .strip_prefix(TAP_ALIAS_PREFIX)
        .and_then(|rest| rest.strip_prefix(owner))
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|nic| !nic.is_empty() && nic.bytes().all(|b| b.is_ascii_digit()))
}

fn is_text(s: &str) -> bool {
    crate::bounds::is_printable_ascii(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_linux_and_capvm_rules() {
        assert!(validate_ifname("vm-public").is_ok());
        assert!(validate_ifname("eth0.10").is_ok());
        assert!(validate_ifname("capvm-tap12345").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "a:b", "sixteen-chars-xx", "é"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn vlan_names_are_parent_dot_id_and_ids_are_bounded() {
        assert_eq!(vlan_ifname("eth0", 10).unwrap(), "eth0.10");
        assert_eq!(vlan_ifname("eth0", 0), Err(NetcfgMessageError::Vlan(0)));
        assert_eq!(
            vlan_ifname("eth0", 4095),
            Err(NetcfgMessageError::Vlan(4095))
        );
        // "averylongname.4094" is 18 bytes: longer than IFNAMSIZ allows.
        assert!(vlan_ifname("averylongname", 4094).is_err());
    }

    #[test]
    fn addresses_parse_with_family_checked_prefixes() {
        let a = IfAddress::parse("198.18.0.1/24").unwrap();
        assert_eq!(a.to_string(), "198.18.0.1/24");
        assert!(IfAddress::parse("2001:db8::1/64").is_some());
        for bad in [
            "198.18.0.1",
            "198.18.0.1/33",
            "2001:db8::1/129",
            "0.0.0.0/0",
            "224.0.0.1/4",
            "255.255.255.255/32",
            "ff02::1/64",
            "x/24",
        ] {
            assert!(IfAddress::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn requests_with_bad_fields_are_refused() {
        let bad = [
            NetcfgRequest::CreateBridge {
                bridge: "bad name".into(),
            },
            NetcfgRequest::SetMtu {
                bridge: "vm-public".into(),
                mtu: 67,
            },
            NetcfgRequest::SetMtu {
                bridge: "vm-public".into(),
                mtu: 65536,
            },
            NetcfgRequest::AddVlan {
                parent: "eth0".into(),
                vlan: 5000,
            },
            NetcfgRequest::SetAddresses {
                bridge: "vm-public".into(),
                addresses: vec![
                    IfAddress {
                        addr: "198.18.0.1".parse().unwrap(),
                        prefix_len: 24,
                    };
                    MAX_ADDRESSES + 1
                ],
            },
            NetcfgRequest::CreateTap {
                bridge: Some("x/y".into()),
                nic: 0,
                mtu: None,
                queues: 1,
            },
            NetcfgRequest::CreateTap {
                bridge: None,
                nic: 0,
                mtu: None,
                queues: 0,
            },
            NetcfgRequest::CreateTap {
                bridge: None,
                nic: 0,
                mtu: None,
                queues: MAX_TAP_QUEUES + 1,
            },
        ];
        for request in bad {
            assert!(request.validate().is_err(), "{request:?} accepted");
        }
        let good = NetcfgRequest::CreateTap {
            bridge: Some("vm-public".into()),
            nic: 3,
            mtu: Some(1500),
            queues: 1,
        };
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(good.fd_count(), 1);
        let multi = NetcfgRequest::CreateTap {
            bridge: None,
            nic: 0,
            mtu: None,
            queues: MAX_TAP_QUEUES,
        };
        assert_eq!(multi.validate(), Ok(()));
        assert_eq!(multi.fd_count(), usize::from(MAX_TAP_QUEUES));
        assert_eq!(NetcfgRequest::DeleteTaps.fd_count(), 0);
    }

    #[test]
    fn setup_bounds_bridges_and_owner() {
        let mut setup = NetcfgSetup {
            bridges: vec!["vm-public".into(), "br0".into()],
            tap_owner: "guest-1".into(),
        };
        assert_eq!(setup.validate(), Ok(()));
        setup.tap_owner = "a:b".into();
        assert!(setup.validate().is_err());
        setup.tap_owner = String::new();
        setup.bridges = vec!["b".into(); MAX_BRIDGES + 1];
        assert_eq!(
            setup.validate(),
            Err(NetcfgMessageError::TooMany("bridges"))
        );
    }

    #[test]
    fn tap_aliases_name_their_guest_exactly() {
        let alias = tap_alias("web", 2);
        assert_eq!(alias, "capvm:web:2");
        assert!(is_tap_of(&alias, "web"));
        assert!(!is_tap_of(&alias, "we"));
        assert!(!is_tap_of("capvm:webserver:2", "web"));
        assert!(!is_tap_of("capvm:web:", "web"));
        assert!(!is_tap_of("other:web:2", "web"));
    }

    #[test]
    fn replies_out_of_bounds_are_refused() {
        assert!(NetcfgReply::Tap { name: "x y".into() }.validate().is_err());
        assert!(
            NetcfgReply::Deleted {
                names: vec!["t".into(); MAX_DELETED + 1]
            }
            .validate()
            .is_err()
        );
        let long = "e".repeat(5000);
        assert_eq!(
            NetcfgReply::error(&long).validate(),
            Ok(()),
            "error() clips to the bound"
        );
    }
}
