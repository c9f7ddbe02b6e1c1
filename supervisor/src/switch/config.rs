//! The switch keys of `system.conf`, vm-bhyve's:
//!
//! ```text
//! switch_list="public lab"        the switches, in order
//! type_public="standard"          standard (capvm creates bridge vm-public) or manual
//! bridge_lab="br0"                a manual switch's existing bridge
//! ports_public="eth0"             member interfaces (IF.VLAN when vlan_ is set)
//! vlan_public="10"                802.1Q id of the members; 0 or unset: none
//! addr_public="198.18.0.1/24 2001:db8::1/64"   host addresses, on the bridge
//! addr6_public="2001:db8::1/64"   more addresses (older vm-bhyve spelling), merged into addr_
//! mtu_public="9000"               MTU of the bridge, its members and its taps
//! private_public="yes"            guests on the switch do not reach each other
//! ```
//!
//! Reading never stops at the first bad switch: each bad value is a [`Diagnostic`] naming file,
//! line and key, that switch is left out, and the others are usable. Writing edits the file
//! line by line ([`conf::set_value`]), so comments and other keys stay.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use proto::netcfg::{IfAddress, MAX_ADDRESSES, validate_ifname, validate_mtu, vlan_ifname};
use serde::Serialize;

use crate::conf::{self, Conf, ConfError, Diagnostic};

/// The longest switch name: a standard switch's bridge `vm-NAME` must fit in 15 bytes.
pub const MAX_SWITCH_NAME: usize = 12;
/// The prefix of a standard switch's bridge.
pub const BRIDGE_PREFIX: &str = "vm-";
/// Most member ports of a switch.
pub const MAX_PORTS: usize = 64;

/// `type_NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchType {
    /// A bridge capvm creates and destroys (`vm-NAME`), with its members.
    Standard,
    /// An existing bridge capvm only attaches taps (and addresses) to.
    Manual,
}

impl SwitchType {
    /// Parses `standard` or `manual`; empty is `standard`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "" | "standard" => Ok(SwitchType::Standard),
            "manual" => Ok(SwitchType::Manual),
            other => Err(format!(
                "unknown switch type {other:?} (expected standard or manual)"
            )),
        }
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            SwitchType::Standard => "standard",
            SwitchType::Manual => "manual",
        }
    }
}

/// One switch, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Switch {
    pub name: String,
    pub kind: SwitchType,
    /// `vm-NAME` for a standard switch, `bridge_NAME` for a manual one.
    pub bridge: String,
    /// Member interfaces as configured (without the VLAN suffix).
    pub ports: Vec<String>,
    pub vlan: Option<u16>,
    pub addresses: Vec<IfAddress>,
    pub mtu: Option<u32>,
    pub private: bool,
}

impl Switch {
    /// A new switch with nothing set.
    pub fn new(name: &str, kind: SwitchType, bridge: String) -> Switch {
        Switch {
            name: name.to_owned(),
            kind,
            bridge,
            ports: Vec::new(),
            vlan: None,
            addresses: Vec::new(),
            mtu: None,
            private: false,
        }
    }

    /// The interface that joins the bridge for `port`: `port`, or `port.VLAN`.
    pub fn member_name(&self, port: &str) -> Result<String, String> {
        match self.vlan {
            None => Ok(port.to_owned()),
            Some(vlan) => vlan_ifname(port, vlan).map_err(|e| e.to_string()),
        }
    }
}

/// Checks a switch name: 1 to [`MAX_SWITCH_NAME`] characters of `[A-Za-z0-9_-]`.
pub fn validate_switch_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SWITCH_NAME {
        return Err(format!(
            "switch name {name:?} is not 1 to {MAX_SWITCH_NAME} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        return Err(format!(
            "switch name {name:?} may only have letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// The bridge of standard switch `name`.
pub fn standard_bridge(name: &str) -> String {
    format!("{BRIDGE_PREFIX}{name}")
}

/// Parses `addr_NAME`: addresses separated by blanks.
pub fn parse_addresses(value: &str) -> Result<Vec<IfAddress>, String> {
    let mut out: Vec<IfAddress> = Vec::new();
    for word in value.split_whitespace() {
        let a = IfAddress::parse(word).ok_or_else(|| {
            format!(
                "{word:?} is not an address with a prefix length (198.18.0.1/24, 2001:db8::1/64)"
            )
        })?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.len() > MAX_ADDRESSES {
        return Err(format!("more than {MAX_ADDRESSES} addresses"));
    }
    Ok(out)
}

/// Parses `vlan_NAME`: 0 or empty is none, else 1..=4094.
pub fn parse_vlan(value: &str) -> Result<Option<u16>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    let id: u16 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a VLAN id (0 to 4094)"))?;
    match id {
        0 => Ok(None),
        1..=proto::netcfg::MAX_VLAN => Ok(Some(id)),
        _ => Err(format!("VLAN {id} is outside 1..=4094")),
    }
}

/// Parses `mtu_NAME`: empty is unset.
pub fn parse_mtu(value: &str) -> Result<Option<u32>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    let mtu: u32 = value
        .parse()
        .map_err(|_| format!("{value:?} is not an MTU"))?;
    validate_mtu(mtu).map_err(|e| e.to_string())?;
    Ok(Some(mtu))
}

/// Parses `private_NAME`: yes/no (also on/off, true/false, 1/0); empty is no.
pub fn parse_private(value: &str) -> Result<bool, String> {
    let v = value.to_ascii_lowercase();
    match v.as_str() {
        "" | "no" | "off" | "false" | "0" => Ok(false),
        "yes" | "on" | "true" | "1" => Ok(true),
        _ => Err(format!("{value:?} is not yes or no")),
    }
}

/// Parses `ports_NAME`: interface names separated by blanks.
pub fn parse_ports(value: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for port in value.split_whitespace() {
        validate_ifname(port).map_err(|e| e.to_string())?;
        if !out.iter().any(|p| p == port) {
            out.push(port.to_owned());
        }
    }
    if out.len() > MAX_PORTS {
        return Err(format!("more than {MAX_PORTS} ports"));
    }
    Ok(out)
}

/// The switches of a `system.conf`, with what was wrong.
#[derive(Debug, Clone, Default)]
pub struct Switches {
    pub path: PathBuf,
    /// The usable switches, in `switch_list` order.
    pub switches: Vec<Switch>,
    /// Switches left out because of an error.
    pub failed: Vec<String>,
    pub errors: Vec<Diagnostic>,
}

impl Switches {
    /// Reads the switches of `system.conf` at `path` (missing file: none).
    pub fn load(path: &Path) -> Result<Switches, ConfError> {
        Ok(Switches::from_conf(&Conf::load_if_exists(path)?, path))
    }

    /// Reads the switches of `conf` (read from `path`, for the diagnostics).
    pub fn from_conf(conf: &Conf, path: &Path) -> Switches {
        let mut out = Switches {
            path: path.to_owned(),
            ..Switches::default()
        };
        let list_line = conf.entry("switch_list").map_or(0, |e| e.line);
        let mut seen: Vec<&str> = Vec::new();
        for name in conf
            .get("switch_list")
            .unwrap_or_default()
            .split_whitespace()
        {
            if seen.contains(&name) {
                continue;
            }
            seen.push(name);
            if let Err(message) = validate_switch_name(name) {
                out.errors
                    .push(diag(path, list_line, "switch_list", message));
                out.failed.push(name.to_owned());
                continue;
            }
            match read_switch(conf, path, name) {
                Ok(sw) => {
                    if let Some(other) = out.switches.iter().find(|o| o.bridge == sw.bridge) {
                        let key = format!("bridge_{name}");
                        let line = conf.entry(&key).map_or(list_line, |e| e.line);
                        let message =
                            format!("bridge {} is already switch {}'s", sw.bridge, other.name);
                        out.errors.push(diag(path, line, &key, message));
                        out.failed.push(name.to_owned());
                    } else {
                        out.switches.push(sw);
                    }
                }
                Err(errors) => {
                    out.errors.extend(errors);
                    out.failed.push(name.to_owned());
                }
            }
        }
        out
    }

    /// The switch called `name`.
    pub fn get(&self, name: &str) -> Option<&Switch> {
        self.switches.iter().find(|s| s.name == name)
    }

    /// Every switch's bridge (what netcfg may touch).
    pub fn bridges(&self) -> Vec<String> {
        self.switches.iter().map(|s| s.bridge.clone()).collect()
    }
}

fn diag(path: &Path, line: usize, key: &str, message: String) -> Diagnostic {
    Diagnostic {
        file: path.to_owned(),
        line,
        key: key.to_owned(),
        message,
    }
}

/// Reads the `KEY_NAME` values of one switch, collecting an error per bad value.
struct Reader<'a> {
    conf: &'a Conf,
    path: &'a Path,
    name: &'a str,
    errors: Vec<Diagnostic>,
}

impl Reader<'_> {
    /// The trimmed value of `{suffix}_NAME` (empty when unset), its key and line.
    fn raw(&self, suffix: &str) -> (String, String, usize) {
        let key = format!("{suffix}_{}", self.name);
        let (value, line) = self
            .conf
            .entry(&key)
            .map_or((String::new(), 0), |e| (e.value.trim().to_owned(), e.line));
        (key, value, line)
    }

    /// `{suffix}_NAME` through `parse`; a failure is recorded.
    fn get<T>(&mut self, suffix: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let (key, value, line) = self.raw(suffix);
        self.check(&key, line, parse(&value))
    }

    fn check<T>(&mut self, key: &str, line: usize, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(message) => {
                self.errors.push(diag(self.path, line, key, message));
                None
            }
        }
    }
}

/// Reads switch `name`, or every error its keys have.
fn read_switch(conf: &Conf, path: &Path, name: &str) -> Result<Switch, Vec<Diagnostic>> {
    let mut r = Reader {
        conf,
        path,
        name,
        errors: Vec::new(),
    };
    let kind = r.get("type", SwitchType::parse);
    let ports = r.get("ports", parse_ports);
    let vlan = r.get("vlan", parse_vlan);
    let addresses = r.get("addr", parse_addresses);
    let addresses6 = r.get("addr6", parse_addresses);
    let mtu = r.get("mtu", parse_mtu);
    let private = r.get("private", parse_private);
    let bridge = match kind {
        Some(SwitchType::Standard) => Some(standard_bridge(name)),
        Some(SwitchType::Manual) => {
            let (key, value, line) = r.raw("bridge");
            let line = if line == 0 { r.raw("type").2 } else { line };
            let checked = if value.is_empty() {
                Err("a manual switch needs bridge_NAME".to_owned())
            } else {
                validate_ifname(&value)
                    .map(|()| value.clone())
                    .map_err(|e| e.to_string())
            };
            r.check(&key, line, checked)
        }
        None => None,
    };
    let (
        Some(kind),
        Some(bridge),
        Some(ports),
        Some(vlan),
        Some(mut addresses),
        Some(more),
        Some(mtu),
        Some(private),
    ) = (
        kind, bridge, ports, vlan, addresses, addresses6, mtu, private,
    )
    else {
        return Err(r.errors);
    };
    for a in more {
        if !addresses.contains(&a) {
            addresses.push(a);
        }
    }
    let (addr_key, _, addr_line) = r.raw("addr");
    if addresses.len() > MAX_ADDRESSES {
        r.check::<()>(
            &addr_key,
            addr_line,
            Err(format!("more than {MAX_ADDRESSES} addresses")),
        );
    }
    let sw = Switch {
        name: name.to_owned(),
        kind,
        bridge,
        ports,
        vlan,
        addresses,
        mtu,
        private,
    };
    let (ports_key, _, ports_line) = r.raw("ports");
    for port in &sw.ports {
        r.check(&ports_key, ports_line, sw.member_name(port).map(drop));
        if *port == sw.bridge {
            r.check::<()>(
                &ports_key,
                ports_line,
                Err(format!("{port} is the switch's own bridge")),
            );
        }
    }
    if r.errors.is_empty() {
        Ok(sw)
    } else {
        Err(r.errors)
    }
}

/// Returns `text` with `key` set to `value`, or removed when `value` is empty.
fn set_or_remove(text: &str, key: &str, value: &str) -> Result<String, ConfError> {
    if value.is_empty() {
        Ok(conf::remove_key(text, key))
    } else {
        conf::set_value(text, key, value)
    }
}

/// Returns `text` with switch `sw`'s keys written (and added to `switch_list` if missing).
pub fn write_switch(text: &str, sw: &Switch) -> Result<String, ConfError> {
    let mut list: Vec<String> = Conf::parse(text)
        .get("switch_list")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !list.contains(&sw.name) {
        list.push(sw.name.clone());
    }
    let name = &sw.name;
    let mut text = conf::set_value(text, "switch_list", &list.join(" "))?;
    text = conf::set_value(&text, &format!("type_{name}"), sw.kind.name())?;
    let bridge = match sw.kind {
        SwitchType::Standard => "",
        SwitchType::Manual => sw.bridge.as_str(),
    };
    text = set_or_remove(&text, &format!("bridge_{name}"), bridge)?;
    text = set_or_remove(&text, &format!("ports_{name}"), &sw.ports.join(" "))?;
    let vlan = sw.vlan.map(|v| v.to_string()).unwrap_or_default();
    text = set_or_remove(&text, &format!("vlan_{name}"), &vlan)?;
    let addresses: Vec<String> = sw.addresses.iter().map(ToString::to_string).collect();
    text = set_or_remove(&text, &format!("addr_{name}"), &addresses.join(" "))?;
    text = conf::remove_key(&text, &format!("addr6_{name}"));
    let mtu = sw.mtu.map(|m| m.to_string()).unwrap_or_default();
    text = set_or_remove(&text, &format!("mtu_{name}"), &mtu)?;
    text = set_or_remove(
        &text,
        &format!("private_{name}"),
        if sw.private { "yes" } else { "" },
    )?;
    Ok(text)
}

/// Returns `text` without switch `name`: out of `switch_list`, its keys removed.
pub fn remove_switch(text: &str, name: &str) -> Result<String, ConfError> {
    let list: Vec<String> = Conf::parse(text)
        .get("switch_list")
        .unwrap_or_default()
        .split_whitespace()
        .filter(|n| *n != name)
        .map(str::to_owned)
        .collect();
    let mut text = set_or_remove(text, "switch_list", &list.join(" "))?;
    for key in [
        "type", "bridge", "ports", "vlan", "addr", "addr6", "mtu", "private",
    ] {
        text = conf::remove_key(&text, &format!("{key}_{name}"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Switches {
        Switches::from_conf(&Conf::parse(text), Path::new("/vm/.config/system.conf"))
    }

    fn errors(text: &str) -> Vec<String> {
        load(text).errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_standard_switch_with_every_key_reads_whole() {
        let s = load(
            "switch_list=\"public\"\ntype_public=\"standard\"\nports_public=\"eth0 eth1\"\nvlan_public=\"10\"\naddr_public=\"198.18.0.1/24 2001:db8::1/64\"\nmtu_public=\"9000\"\nprivate_public=\"yes\"\n",
        );
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let sw = s.get("public").unwrap();
        assert_eq!(sw.kind, SwitchType::Standard);
        assert_eq!(sw.bridge, "vm-public");
        assert_eq!(sw.ports, ["eth0", "eth1"]);
        assert_eq!(sw.vlan, Some(10));
        assert_eq!(sw.member_name("eth0").unwrap(), "eth0.10");
        let addrs: Vec<String> = sw.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["198.18.0.1/24", "2001:db8::1/64"]);
        assert_eq!(sw.mtu, Some(9000));
        assert!(sw.private);
    }

    #[test]
    fn an_unset_type_is_standard_and_unset_keys_are_defaults() {
        let s = load("switch_list=\"a\"\n");
        let sw = s.get("a").unwrap();
        assert_eq!(
            (sw.kind, sw.bridge.as_str(), sw.vlan, sw.mtu, sw.private),
            (SwitchType::Standard, "vm-a", None, None, false)
        );
        assert!(sw.ports.is_empty() && sw.addresses.is_empty());
    }

    #[test]
    fn a_manual_switch_uses_its_bridge_and_needs_one() {
        let s = load("switch_list=\"lab\"\ntype_lab=\"manual\"\nbridge_lab=\"br0\"\n");
        assert_eq!(s.get("lab").unwrap().bridge, "br0");
        assert_eq!(
            errors("switch_list=\"lab\"\ntype_lab=\"manual\"\n"),
            ["/vm/.config/system.conf:2: bridge_lab: a manual switch needs bridge_NAME"]
        );
        assert_eq!(
            errors("switch_list=\"lab\"\ntype_lab=\"manual\"\nbridge_lab=\"br 0\"\n").len(),
            1
        );
    }

    #[test]
    fn bad_values_name_file_line_and_key_and_leave_other_switches_usable() {
        let text = "switch_list=\"bad good\"\ntype_bad=\"vale\"\nvlan_bad=\"4095\"\naddr_bad=\"198.18.0.1\"\nmtu_bad=\"20\"\nprivate_bad=\"maybe\"\nports_bad=\"a:b\"\n";
        let s = load(text);
        let e: Vec<String> = s.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            e,
            [
                "/vm/.config/system.conf:2: type_bad: unknown switch type \"vale\" (expected standard or manual)",
                "/vm/.config/system.conf:7: ports_bad: interface name \"a:b\" is not 1 to 15 characters of [A-Za-z0-9_.-]",
                "/vm/.config/system.conf:3: vlan_bad: VLAN 4095 is outside 1..=4094",
                "/vm/.config/system.conf:4: addr_bad: \"198.18.0.1\" is not an address with a prefix length (198.18.0.1/24, 2001:db8::1/64)",
                "/vm/.config/system.conf:5: mtu_bad: MTU 20 is outside 68..=65535",
                "/vm/.config/system.conf:6: private_bad: \"maybe\" is not yes or no",
            ]
        );
        assert_eq!(s.failed, ["bad"]);
        assert!(s.get("good").is_some());
    }

    #[test]
    fn switch_names_are_short_and_plain() {
        assert!(validate_switch_name("public").is_ok());
        assert!(validate_switch_name("a_b-c123456x").is_ok());
        for bad in ["", "thirteen-char", "a.b", "a/b", "é"] {
            assert!(validate_switch_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            errors("switch_list=\"a.b\"\n"),
            [
                "/vm/.config/system.conf:1: switch_list: switch name \"a.b\" may only have letters, digits, '_' and '-'"
            ]
        );
    }

    #[test]
    fn vlan_zero_is_none_and_a_long_port_with_vlan_is_refused() {
        assert_eq!(parse_vlan("0"), Ok(None));
        assert_eq!(parse_vlan(""), Ok(None));
        assert_eq!(parse_vlan("4094"), Ok(Some(4094)));
        assert!(parse_vlan("x").is_err());
        let e = errors("switch_list=\"s\"\nports_s=\"enp0s31f6abc\"\nvlan_s=\"100\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains(":2: ports_s: "), "{e:?}");
    }

    #[test]
    fn addr6_is_merged_and_duplicates_dropped() {
        let s = load(
            "switch_list=\"s\"\naddr_s=\"198.18.0.1/24 198.18.0.1/24\"\naddr6_s=\"2001:db8::1/64\"\n",
        );
        let addrs: Vec<String> = s
            .get("s")
            .unwrap()
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addrs, ["198.18.0.1/24", "2001:db8::1/64"]);
    }

    #[test]
    fn private_and_mtu_values() {
        assert_eq!(parse_private("YES"), Ok(true));
        assert_eq!(parse_private("off"), Ok(false));
        assert_eq!(parse_private(""), Ok(false));
        assert_eq!(parse_mtu("1500"), Ok(Some(1500)));
        assert_eq!(parse_mtu(""), Ok(None));
        assert!(parse_mtu("65536").is_err());
        assert!(parse_mtu("-1").is_err());
    }

    #[test]
    fn two_switches_on_one_bridge_are_refused() {
        let e = errors(
            "switch_list=\"a b\"\ntype_a=manual\nbridge_a=br0\ntype_b=manual\nbridge_b=br0\n",
        );
        assert_eq!(
            e,
            ["/vm/.config/system.conf:5: bridge_b: bridge br0 is already switch a's"]
        );
    }

    #[test]
    fn writing_then_reading_gives_the_same_switch() {
        let mut sw = Switch::new("public", SwitchType::Standard, standard_bridge("public"));
        sw.ports = vec!["eth0".into()];
        sw.vlan = Some(5);
        sw.addresses = parse_addresses("198.18.0.1/24 2001:db8::1/64").unwrap();
        sw.mtu = Some(1400);
        sw.private = true;
        let text =
            write_switch("# header\nswitch_list=\"other\"\naddr6_public=\"x\"\n", &sw).unwrap();
        assert!(
            text.starts_with("# header\nswitch_list=\"other public\"\n"),
            "{text}"
        );
        assert!(!text.contains("addr6_public"), "{text}");
        let s = load(&text);
        assert_eq!(s.get("public"), Some(&sw));
        let text = remove_switch(&text, "public").unwrap();
        assert_eq!(text, "# header\nswitch_list=\"other\"\n");
        let text = remove_switch(&text, "other").unwrap();
        assert_eq!(text, "# header\n");
    }

    #[test]
    fn clearing_values_removes_their_keys() {
        let mut sw = Switch::new("s", SwitchType::Manual, "br0".into());
        sw.addresses = parse_addresses("198.18.0.1/24").unwrap();
        let text = write_switch("", &sw).unwrap();
        assert!(
            text.contains("bridge_s=\"br0\"") && text.contains("addr_s="),
            "{text}"
        );
        sw.addresses.clear();
        let text = write_switch(&text, &sw).unwrap();
        assert!(!text.contains("addr_s"), "{text}");
    }
}
