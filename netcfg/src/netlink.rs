//! The rtnetlink wire format: building requests and reading the kernel's answers.
//!
//! Pure byte work, no I/O: [`MessageBuilder`] writes one `nlmsghdr` with its family header
//! (`ifinfomsg`, `ifaddrmsg`) and attributes; [`messages`] splits a datagram into messages and
//! [`attrs`] walks an attribute list. Every length read from a buffer is checked against the
//! buffer before it is used, so a short or lying message is an error, never a panic.
//! Layouts: `include/uapi/linux/netlink.h`, `rtnetlink.h`, `if_link.h`, `if_addr.h`.
//!
//! capvm writes these few messages itself rather than pulling a general netlink crate into the
//! one process that keeps `CAP_NET_ADMIN`: the whole format it speaks is in this file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Netlink message types and flags used here.
pub mod consts {
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const RTM_NEWLINK: u16 = 16;
    pub const RTM_DELLINK: u16 = 17;
    pub const RTM_GETLINK: u16 = 18;
    pub const RTM_NEWADDR: u16 = 20;
    pub const RTM_DELADDR: u16 = 21;
    pub const RTM_GETADDR: u16 = 22;

    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_MULTI: u16 = 0x2;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLM_F_REPLACE: u16 = 0x100;
    pub const NLM_F_EXCL: u16 = 0x200;
    pub const NLM_F_CREATE: u16 = 0x400;
    /// On an `NLMSG_ERROR`: only the original header is echoed.
    pub const NLM_F_CAPPED: u16 = 0x100;
    /// On an `NLMSG_ERROR`: extended-ack attributes follow.
    pub const NLM_F_ACK_TLVS: u16 = 0x200;
    pub const NLMSGERR_ATTR_MSG: u16 = 1;
    /// Attribute type bits that are flags, not the type.
    pub const NLA_F_NESTED: u16 = 0x8000;
    pub const NLA_TYPE_MASK: u16 = 0x3fff;

    pub const IFLA_IFNAME: u16 = 3;
    pub const IFLA_MTU: u16 = 4;
    pub const IFLA_LINK: u16 = 5;
    pub const IFLA_MASTER: u16 = 10;
    pub const IFLA_LINKINFO: u16 = 18;
    pub const IFLA_IFALIAS: u16 = 20;
    pub const IFLA_INFO_KIND: u16 = 1;
    pub const IFLA_INFO_DATA: u16 = 2;
    pub const IFLA_INFO_SLAVE_KIND: u16 = 4;
    pub const IFLA_INFO_SLAVE_DATA: u16 = 5;
    pub const IFLA_VLAN_ID: u16 = 1;
    pub const IFLA_BRPORT_ISOLATED: u16 = 33;

    pub const IFA_ADDRESS: u16 = 1;
    pub const IFA_LOCAL: u16 = 2;

    pub const IFF_UP: u32 = 0x1;
    pub const AF_UNSPEC: u8 = 0;
    pub const AF_INET: u8 = 2;
    pub const AF_INET6: u8 = 10;
    /// `RT_SCOPE_LINK`: an address valid on this link only (IPv6 `fe80::/10`).
    pub const RT_SCOPE_LINK: u8 = 253;
}

#[allow(clippy::wildcard_imports)] // the kernel's constant names, as in its headers
use consts::*;

/// Length of `nlmsghdr`.
pub const NLMSG_HDR_LEN: usize = 16;
/// Length of `ifinfomsg`.
pub const IFINFOMSG_LEN: usize = 16;
/// Length of `ifaddrmsg`.
pub const IFADDRMSG_LEN: usize = 8;
const NLA_HDR_LEN: usize = 4;

/// A message the kernel sent that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("netlink message header is truncated")]
    ShortHeader,
    #[error("netlink message length {len} does not fit the {available} bytes received")]
    BadLength { len: usize, available: usize },
    #[error("attribute is truncated")]
    ShortAttribute,
    #[error("{0} header is truncated")]
    ShortFamilyHeader(&'static str),
}

/// Rounds up to netlink's 4-byte alignment.
fn align(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// One request under construction.
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    buf: Vec<u8>,
}

impl MessageBuilder {
    /// A message of `kind` with `flags` (`NLM_F_REQUEST` is added).
    pub fn new(kind: u16, flags: u16) -> MessageBuilder {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0, the kernel fills it
        MessageBuilder { buf }
    }

    /// Appends an `ifinfomsg`.
    #[must_use]
    pub fn ifinfo(mut self, family: u8, index: u32, flags: u32, change: u32) -> MessageBuilder {
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
        self
    }

    /// Appends an `ifaddrmsg`.
    #[must_use]
    pub fn ifaddr(mut self, family: u8, prefix_len: u8, scope: u8, index: u32) -> MessageBuilder {
        self.buf
            .extend_from_slice(&[family, prefix_len, 0 /* flags */, scope]);
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self
    }

    /// Appends attribute `kind` with `payload`, padded to the alignment.
    #[must_use]
    pub fn attr(mut self, kind: u16, payload: &[u8]) -> MessageBuilder {
        self.push_attr(kind, payload);
        self
    }

    #[must_use]
    pub fn attr_u32(self, kind: u16, value: u32) -> MessageBuilder {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    #[must_use]
    pub fn attr_str(self, kind: u16, value: &str) -> MessageBuilder {
        let mut payload = Vec::with_capacity(value.len().saturating_add(1));
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.attr(kind, &payload)
    }

    /// A nested attribute whose contents `fill` appends.
    #[must_use]
    pub fn nested(
        mut self,
        kind: u16,
        fill: impl FnOnce(MessageBuilder) -> MessageBuilder,
    ) -> MessageBuilder {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        let mut this = fill(self);
        let len = u16::try_from(this.buf.len().saturating_sub(start)).unwrap_or(u16::MAX);
        if let Some(slot) = this.buf.get_mut(start..start.saturating_add(2)) {
            slot.copy_from_slice(&len.to_ne_bytes());
        }
        this
    }

    fn push_attr(&mut self, kind: u16, payload: &[u8]) {
        let len = NLA_HDR_LEN.saturating_add(payload.len());
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align(self.buf.len()), 0);
    }

    /// The finished message with sequence number `seq`.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        if let Some(slot) = self.buf.get_mut(0..4) {
            slot.copy_from_slice(&len.to_ne_bytes());
        }
        if let Some(slot) = self.buf.get_mut(8..12) {
            slot.copy_from_slice(&seq.to_ne_bytes());
        }
        self.buf
    }
}

/// One message of a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the `nlmsghdr`.
    pub payload: &'a [u8],
}

/// Splits a datagram into its messages.
pub fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, ParseError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = u32_at(buf, 0).ok_or(ParseError::ShortHeader)?;
        let len = usize::try_from(len).map_err(|_| ParseError::ShortHeader)?;
        let kind = u16_at(buf, 4).ok_or(ParseError::ShortHeader)?;
        let flags = u16_at(buf, 6).ok_or(ParseError::ShortHeader)?;
        let seq = u32_at(buf, 8).ok_or(ParseError::ShortHeader)?;
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Err(ParseError::BadLength {
                len,
                available: buf.len(),
            });
        }
        let payload = buf.get(NLMSG_HDR_LEN..len).ok_or(ParseError::ShortHeader)?;
        out.push(Message {
            kind,
            flags,
            seq,
            payload,
        });
        buf = buf.get(align(len)..).unwrap_or_default();
    }
    Ok(out)
}

/// Walks an attribute list: `(type without flag bits, payload)`.
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

/// Iterator of [`attrs`]. A truncated attribute ends the walk with an error item.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLA_HDR_LEN {
            // Trailing padding shorter than a header is not an attribute.
            return None;
        }
        let parsed = (|| {
            let len = usize::from(u16_at(self.rest, 0)?);
            let kind = u16_at(self.rest, 2)? & NLA_TYPE_MASK;
            if len < NLA_HDR_LEN {
                return None;
            }
            let payload = self.rest.get(NLA_HDR_LEN..len)?;
            Some((len, kind, payload))
        })();
        if let Some((len, kind, payload)) = parsed {
            self.rest = self.rest.get(align(len)..).unwrap_or_default();
            Some(Ok((kind, payload)))
        } else {
            self.rest = &[];
            Some(Err(ParseError::ShortAttribute))
        }
    }
}

/// A string attribute's value (up to its first NUL), lossily decoded.
pub fn attr_string(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(payload.get(..end).unwrap_or_default()).into_owned()
}

fn attr_u32(payload: &[u8]) -> Option<u32> {
    u32_at(payload, 0)
}

/// An `NLMSG_ERROR` (an ack when `errno` is 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// A positive errno, or 0 for success.
    pub errno: i32,
    /// The kernel's extended-ack text, if it sent one.
    pub message: Option<String>,
}

/// Reads an `NLMSG_ERROR` payload: `i32` error, the echoed request, extended-ack attributes.
pub fn parse_ack(flags: u16, payload: &[u8]) -> Result<Ack, ParseError> {
    let error = u32_at(payload, 0).ok_or(ParseError::ShortFamilyHeader("nlmsgerr"))?;
    let errno = i32::from_ne_bytes(error.to_ne_bytes()).saturating_neg();
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        let echoed_len = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDR_LEN
        } else {
            let len = u32_at(payload, 4).ok_or(ParseError::ShortHeader)?;
            usize::try_from(len).map_err(|_| ParseError::ShortHeader)?
        };
        let tlvs = payload.get(align(4usize.saturating_add(echoed_len))..);
        for attr in attrs(tlvs.unwrap_or_default()) {
            let (kind, value) = attr?;
            if kind == NLMSGERR_ATTR_MSG {
                message = Some(attr_string(value));
            }
        }
    }
    Ok(Ack { errno, message })
}

/// An interface from an `RTM_NEWLINK`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFF_*` flags.
    pub flags: u32,
    pub mtu: u32,
    /// The master's index, 0 for none.
    pub master: u32,
    /// `IFLA_LINK`: the lower device (a VLAN's parent), 0 for none.
    pub link: u32,
    pub alias: String,
    /// `IFLA_INFO_KIND`: `bridge`, `tun`, `vlan`, `veth`, … or empty.
    pub kind: String,
    /// A VLAN's id.
    pub vlan_id: Option<u16>,
    /// For a bridge port: `IFLA_BRPORT_ISOLATED`.
    pub isolated: Option<bool>,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.flags & IFF_UP != 0
    }

    pub fn is_bridge(&self) -> bool {
        self.kind == "bridge"
    }
}

/// Reads an `RTM_NEWLINK` payload.
pub fn parse_link(payload: &[u8]) -> Result<Link, ParseError> {
    let header = payload
        .get(..IFINFOMSG_LEN)
        .ok_or(ParseError::ShortFamilyHeader("ifinfomsg"))?;
    let mut link = Link {
        index: u32_at(header, 4).ok_or(ParseError::ShortFamilyHeader("ifinfomsg"))?,
        flags: u32_at(header, 8).ok_or(ParseError::ShortFamilyHeader("ifinfomsg"))?,
        ..Link::default()
    };
    for attr in attrs(payload.get(IFINFOMSG_LEN..).unwrap_or_default()) {
        let (kind, value) = attr?;
        match kind {
            IFLA_IFNAME => link.name = attr_string(value),
            IFLA_MTU => link.mtu = attr_u32(value).unwrap_or(0),
            IFLA_MASTER => link.master = attr_u32(value).unwrap_or(0),
            IFLA_LINK => link.link = attr_u32(value).unwrap_or(0),
            IFLA_IFALIAS => link.alias = attr_string(value),
            IFLA_LINKINFO => parse_linkinfo(value, &mut link)?,
            _ => {}
        }
    }
    Ok(link)
}

fn parse_linkinfo(buf: &[u8], link: &mut Link) -> Result<(), ParseError> {
    let mut data = None;
    for attr in attrs(buf) {
        let (kind, value) = attr?;
        match kind {
            IFLA_INFO_KIND => link.kind = attr_string(value),
            IFLA_INFO_DATA => data = Some(value),
            IFLA_INFO_SLAVE_DATA => {
                for port_attr in attrs(value) {
                    let (port_kind, port_value) = port_attr?;
                    if port_kind == IFLA_BRPORT_ISOLATED {
                        link.isolated = port_value.first().map(|&b| b != 0);
                    }
                }
            }
            _ => {}
        }
    }
    // INFO_DATA's layout depends on the kind, which may come after it.
    if let (Some(data), "vlan") = (data, link.kind.as_str()) {
        for attr in attrs(data) {
            let (kind, value) = attr?;
            if kind == IFLA_VLAN_ID {
                link.vlan_id = u16_at(value, 0);
            }
        }
    }
    Ok(())
}

/// An address from an `RTM_NEWADDR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub family: u8,
    pub prefix_len: u8,
    pub scope: u8,
    pub index: u32,
    /// `IFA_ADDRESS`.
    pub address: Option<IpAddr>,
    /// `IFA_LOCAL` (IPv4: the interface's own address).
    pub local: Option<IpAddr>,
}

impl Addr {
    /// The interface's own address: `IFA_LOCAL` if present, else `IFA_ADDRESS`.
    pub fn own(&self) -> Option<IpAddr> {
        self.local.or(self.address)
    }
}

/// Reads an `RTM_NEWADDR` payload.
pub fn parse_addr(payload: &[u8]) -> Result<Addr, ParseError> {
    let short = ParseError::ShortFamilyHeader("ifaddrmsg");
    let header = payload.get(..IFADDRMSG_LEN).ok_or(short.clone())?;
    let family = *header.first().ok_or(short.clone())?;
    let mut addr = Addr {
        family,
        prefix_len: *header.get(1).ok_or(short.clone())?,
        scope: *header.get(3).ok_or(short.clone())?,
        index: u32_at(header, 4).ok_or(short)?,
        address: None,
        local: None,
    };
    for attr in attrs(payload.get(IFADDRMSG_LEN..).unwrap_or_default()) {
        let (kind, value) = attr?;
        match kind {
            IFA_ADDRESS => addr.address = ip_from(family, value),
            IFA_LOCAL => addr.local = ip_from(family, value),
            _ => {}
        }
    }
    Ok(addr)
}

fn ip_from(family: u8, bytes: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => {
            let octets: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        AF_INET6 => {
            let octets: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// The family and wire bytes of an address.
pub fn ip_bytes(addr: IpAddr) -> (u8, Vec<u8>) {
    match addr {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let len = u32::try_from(NLMSG_HDR_LEN + payload.len()).unwrap();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align(m.len()), 0);
        m
    }

    #[test]
    fn a_built_bridge_request_has_the_kernels_layout() {
        let msg = MessageBuilder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK)
            .ifinfo(AF_UNSPEC, 0, 0, 0)
            .attr_str(IFLA_IFNAME, "br0")
            .nested(IFLA_LINKINFO, |m| m.attr_str(IFLA_INFO_KIND, "bridge"))
            .finish(7);

        // 16 header + 16 ifinfomsg + 8 ("br0\0") + 4 nest + 12 ("bridge\0" padded)
        assert_eq!(msg.len(), 56);
        assert_eq!(u32_at(&msg, 0), Some(56));
        assert_eq!(u16_at(&msg, 4), Some(RTM_NEWLINK));
        assert_eq!(
            u16_at(&msg, 6),
            Some(NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK)
        );
        assert_eq!(u32_at(&msg, 8), Some(7));
        assert_eq!(
            u16_at(&msg, 40),
            Some(16),
            "nest length covers its contents"
        );
        assert_eq!(u16_at(&msg, 42), Some(IFLA_LINKINFO | NLA_F_NESTED));
    }

    #[test]
    fn a_built_link_parses_back() {
        let payload = MessageBuilder::new(RTM_NEWLINK, 0)
            .ifinfo(AF_UNSPEC, 9, IFF_UP, 0)
            .attr_str(IFLA_IFNAME, "eth0.10")
            .attr_u32(IFLA_MTU, 1400)
            .attr_u32(IFLA_MASTER, 4)
            .attr_u32(IFLA_LINK, 2)
            .attr_str(IFLA_IFALIAS, "capvm:web:0")
            .nested(IFLA_LINKINFO, |m| {
                m.nested(IFLA_INFO_DATA, |m| {
                    m.attr(IFLA_VLAN_ID, &10u16.to_ne_bytes())
                })
                .attr_str(IFLA_INFO_KIND, "vlan")
                .nested(IFLA_INFO_SLAVE_DATA, |m| m.attr(IFLA_BRPORT_ISOLATED, &[1]))
            })
            .finish(1);
        let msgs = messages(&payload).unwrap();
        let link = parse_link(msgs[0].payload).unwrap();

        assert_eq!(
            link,
            Link {
                index: 9,
                name: "eth0.10".into(),
                flags: IFF_UP,
                mtu: 1400,
                master: 4,
                link: 2,
                alias: "capvm:web:0".into(),
                kind: "vlan".into(),
                vlan_id: Some(10),
                isolated: Some(true),
            }
        );
    }

    #[test]
    fn a_datagram_splits_into_its_messages() {
        let mut buf = nlmsg(RTM_NEWLINK, NLM_F_MULTI, 5, &[0; 16]);
        buf.extend(nlmsg(NLMSG_DONE, NLM_F_MULTI, 5, &0i32.to_ne_bytes()));
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].kind, RTM_NEWLINK);
        assert_eq!(msgs[1].kind, NLMSG_DONE);
        assert_eq!(msgs[1].seq, 5);
    }

    #[test]
    fn lying_lengths_are_errors_not_panics() {
        let mut buf = nlmsg(RTM_NEWLINK, 0, 1, &[0; 16]);
        buf[0] = 200;
        assert!(matches!(messages(&buf), Err(ParseError::BadLength { .. })));
        assert_eq!(messages(&buf[..10]), Err(ParseError::ShortHeader));
        let bad_attr = [40u8, 0, 3, 0, b'x'];
        assert_eq!(
            attrs(&bad_attr).collect::<Vec<_>>(),
            vec![Err(ParseError::ShortAttribute)]
        );
        assert!(parse_link(&[0; 8]).is_err());
        assert!(parse_addr(&[0; 4]).is_err());
    }

    #[test]
    fn an_error_ack_yields_errno_and_the_kernels_message() {
        let request = MessageBuilder::new(RTM_NEWLINK, NLM_F_ACK)
            .ifinfo(AF_UNSPEC, 0, 0, 0)
            .finish(3);
        let mut payload = (-17i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&request);
        let tlv = MessageBuilder::new(0, 0)
            .attr_str(NLMSGERR_ATTR_MSG, "Exists")
            .finish(0);
        payload.extend_from_slice(&tlv[NLMSG_HDR_LEN..]);

        let ack = parse_ack(NLM_F_ACK_TLVS, &payload).unwrap();

        assert_eq!(
            ack,
            Ack {
                errno: 17,
                message: Some("Exists".into())
            }
        );
        assert_eq!(parse_ack(0, &0i32.to_ne_bytes()).unwrap().errno, 0);
    }

    #[test]
    fn addresses_parse_for_both_families() {
        let v4 = MessageBuilder::new(RTM_NEWADDR, 0)
            .ifaddr(AF_INET, 24, 0, 3)
            .attr(IFA_LOCAL, &[198, 18, 0, 1])
            .attr(IFA_ADDRESS, &[198, 18, 0, 1])
            .finish(0);
        let a = parse_addr(&v4[NLMSG_HDR_LEN..]).unwrap();
        assert_eq!(a.own(), Some("198.18.0.1".parse().unwrap()));
        assert_eq!((a.prefix_len, a.index), (24, 3));

        let (family, bytes) = ip_bytes("2001:db8::1".parse().unwrap());
        let v6 = MessageBuilder::new(RTM_NEWADDR, 0)
            .ifaddr(family, 64, RT_SCOPE_LINK, 3)
            .attr(IFA_ADDRESS, &bytes)
            .finish(0);
        let a = parse_addr(&v6[NLMSG_HDR_LEN..]).unwrap();
        assert_eq!(a.own(), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(a.scope, RT_SCOPE_LINK);
    }
}
