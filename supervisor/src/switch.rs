//! `vm switch`: vm-bhyve's virtual switches, backed by Linux bridges.
//!
//! A `standard` switch is a bridge capvm creates (`vm-NAME`) with member ports (`ports_NAME`,
//! joined as `IF.VLAN` when `vlan_NAME` is set); a `manual` switch names a bridge made
//! outside capvm (`bridge_NAME`), which capvm never creates, deletes or changes the members
//! of. Host addresses always go on the bridge, never on a member port (vm-bhyve #146).
//!
//! Each command checks its arguments, applies the change to the live links through a
//! sandboxed netcfg ([`NetcfgClient`]: the switches' bridges are all it may touch, its log is
//! `.config/netcfg.log`), and only then writes `system.conf` ([`config`]), so a change the
//! kernel refused is not recorded. `vm init` re-applies every switch ([`init_all`]), which
//! re-creates standard switches after a host reboot.
//!
//! What it trusts: nothing in `system.conf` (every key is checked, bad ones are errors naming
//! file, line and key) and nothing netcfg says beyond its bounds. What it may touch:
//! `system.conf`, `netcfg.log`, and through netcfg the switches' bridges and member ports.
//! It reads `/sys/class/net` to find which guest a tap belongs to (its alias).

#![forbid(unsafe_code)]

pub mod apply;
pub mod config;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use proto::netcfg::{LinkState, NetcfgSetup, TAP_ALIAS_PREFIX, TAP_NAME_PREFIX, validate_ifname};

use self::apply::{ApplyError, Links};
use self::config::{Switch, SwitchType, Switches, standard_bridge, validate_switch_name};
use crate::conf::{self, ConfError, Diagnostic};
use crate::datastore::{CONFIG_DIR, system_conf_path};
use crate::netcfg_client::{NetcfgClient, NetcfgClientError};

/// netcfg's log for `vm switch` and `vm init`, in the datastore's `.config`.
pub const NETCFG_LOG: &str = "netcfg.log";

/// Why a switch command failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error("{}", summary(errors))]
    Invalid { errors: Vec<Diagnostic> },
    #[error("switch {0} does not exist")]
    NoSwitch(String),
    #[error("switch {0} already exists")]
    Exists(String),
    #[error("{0}")]
    Name(String),
    #[error("{flag}: {message}")]
    BadArgument { flag: &'static str, message: String },
    #[error("switch {0} is manual: the members and VLAN of its bridge are managed outside capvm")]
    Manual(String),
    #[error("{port} is not a member of switch {switch}")]
    NotMember { switch: String, port: String },
    #[error("{port} is already a member of switch {other}")]
    AlreadyMember { port: String, other: String },
    #[error("bridge {bridge} is already switch {other}'s")]
    BridgeTaken { bridge: String, other: String },
    #[error("opening {path} failed")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting netcfg failed")]
    Netcfg(#[source] NetcfgClientError),
    #[error("switch {switch}")]
    Apply {
        switch: String,
        #[source]
        source: ApplyError,
    },
}

fn summary(errors: &[Diagnostic]) -> String {
    match errors {
        [] => "invalid switch config".to_owned(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more errors)", rest.len()),
    }
}

/// Opens the live links for a command: `bridges` are the bridges netcfg may touch.
pub type Opener<'a> = dyn FnMut(Vec<String>) -> Result<Box<dyn Links>, SwitchError> + 'a;

/// The production [`Opener`]: a sandboxed netcfg logging to `vm_dir/.config/netcfg.log`.
pub fn netcfg_opener(
    vm_dir: &Path,
) -> impl FnMut(Vec<String>) -> Result<Box<dyn Links>, SwitchError> + use<> {
    let log_path = vm_dir.join(CONFIG_DIR).join(NETCFG_LOG);
    move |bridges| {
        let log = open_append(&log_path)?;
        let setup = NetcfgSetup {
            bridges,
            tap_owner: String::new(),
        };
        let client = NetcfgClient::start(&setup, log.as_fd()).map_err(SwitchError::Netcfg)?;
        Ok(Box::new(client) as Box<dyn Links>)
    }
}

/// Opens `path` for appending, creating it (mode 644).
pub fn open_append(path: &Path) -> Result<File, SwitchError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| SwitchError::Log {
            path: path.to_owned(),
            source,
        })
}

/// The switches of `vm_dir`'s `system.conf`.
pub fn load(vm_dir: &Path) -> Result<Switches, SwitchError> {
    Ok(Switches::load(&system_conf_path(vm_dir))?)
}

/// The switch `name` of `switches`, or why there is none.
fn find<'a>(switches: &'a Switches, name: &str) -> Result<&'a Switch, SwitchError> {
    if switches.failed.iter().any(|f| f == name) {
        let errors: Vec<Diagnostic> = switches
            .errors
            .iter()
            .filter(|d| d.key.ends_with(&format!("_{name}")) || d.key == "switch_list")
            .cloned()
            .collect();
        return Err(SwitchError::Invalid { errors });
    }
    switches
        .get(name)
        .ok_or_else(|| SwitchError::NoSwitch(name.to_owned()))
}

/// `vm switch create` arguments, as given.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    pub name: String,
    /// `-t standard|manual`
    pub kind: Option<String>,
    /// `-i IF`
    pub interface: Option<String>,
    /// `-n VLAN`
    pub vlan: Option<String>,
    /// `-b BRIDGE`
    pub bridge: Option<String>,
    /// `-m MTU`
    pub mtu: Option<String>,
    /// `-a ADDR/LEN`, repeatable.
    pub addresses: Vec<String>,
    /// `-p`
    pub private: bool,
}

fn bad(flag: &'static str) -> impl FnOnce(String) -> SwitchError {
    move |message| SwitchError::BadArgument { flag, message }
}

/// Builds the switch `args` describe, checked against the existing ones.
fn new_switch(args: &CreateArgs, existing: &Switches) -> Result<Switch, SwitchError> {
    let name = args.name.as_str();
    validate_switch_name(name).map_err(SwitchError::Name)?;
    if existing.get(name).is_some() || existing.failed.iter().any(|f| f == name) {
        return Err(SwitchError::Exists(name.to_owned()));
    }
    let kind = match (&args.kind, &args.bridge) {
        (Some(k), _) => SwitchType::parse(k).map_err(bad("-t"))?,
        (None, Some(_)) => SwitchType::Manual,
        (None, None) => SwitchType::Standard,
    };
    let bridge = match (kind, &args.bridge) {
        (SwitchType::Standard, None) => standard_bridge(name),
        (SwitchType::Standard, Some(_)) => {
            return Err(bad("-b")(
                "a standard switch's bridge is vm-NAME; -b is for -t manual".to_owned(),
            ));
        }
        (SwitchType::Manual, None) => {
            return Err(bad("-b")(
                "a manual switch needs its bridge (-b BRIDGE)".to_owned(),
            ));
        }
        (SwitchType::Manual, Some(b)) => {
            validate_ifname(b).map_err(|e| bad("-b")(e.to_string()))?;
            b.clone()
        }
    };
    if let Some(other) = existing.switches.iter().find(|s| s.bridge == bridge) {
        return Err(SwitchError::BridgeTaken {
            bridge,
            other: other.name.clone(),
        });
    }
    let mut sw = Switch::new(name, kind, bridge);
    if kind == SwitchType::Manual && (args.interface.is_some() || args.vlan.is_some()) {
        return Err(SwitchError::Manual(name.to_owned()));
    }
    if let Some(vlan) = &args.vlan {
        sw.vlan = config::parse_vlan(vlan).map_err(bad("-n"))?;
    }
    if let Some(port) = &args.interface {
        check_new_port(existing, &sw, port)?;
        sw.ports.push(port.clone());
    }
    if let Some(mtu) = &args.mtu {
        sw.mtu = config::parse_mtu(mtu).map_err(bad("-m"))?;
    }
    sw.addresses = config::parse_addresses(&args.addresses.join(" ")).map_err(bad("-a"))?;
    sw.private = args.private;
    Ok(sw)
}

fn check_new_port(existing: &Switches, sw: &Switch, port: &str) -> Result<(), SwitchError> {
    validate_ifname(port).map_err(|e| SwitchError::Name(e.to_string()))?;
    sw.member_name(port).map_err(SwitchError::Name)?;
    if let Some(other) = existing
        .switches
        .iter()
        .find(|s| s.ports.iter().any(|p| p == port))
    {
        return Err(SwitchError::AlreadyMember {
            port: port.to_owned(),
            other: other.name.clone(),
        });
    }
    if existing.switches.iter().any(|s| s.bridge == port) || port == sw.bridge {
        return Err(SwitchError::Name(format!(
            "{port} is a switch's bridge, not a port"
        )));
    }
    Ok(())
}

fn applied(name: &str) -> impl FnOnce(ApplyError) -> SwitchError {
    let switch = name.to_owned();
    move |source| SwitchError::Apply { switch, source }
}

fn write(vm_dir: &Path, sw: &Switch) -> Result<(), SwitchError> {
    conf::update_file(&system_conf_path(vm_dir), |text| {
        config::write_switch(text, sw)
    })?;
    Ok(())
}

/// `vm switch create`.
pub fn create(vm_dir: &Path, args: &CreateArgs, open: &mut Opener<'_>) -> Result<(), SwitchError> {
    let existing = load(vm_dir)?;
    let sw = new_switch(args, &existing)?;
    let mut bridges = existing.bridges();
    bridges.push(sw.bridge.clone());
    let mut links = open(bridges)?;
    if let Err(e) = apply::ensure(links.as_mut(), &sw) {
        // Leave nothing half made behind (a manual bridge is never touched here).
        if sw.kind == SwitchType::Standard
            && let Err(cleanup) = apply::teardown(links.as_mut(), &sw)
        {
            tracing::warn!(switch = %sw.name, error = %cleanup, "undoing a failed create failed");
        }
        return Err(applied(&sw.name)(e));
    }
    write(vm_dir, &sw)
}

/// Loads switch `name`, makes the new config with `change`, applies it with `live` (old,
/// new), then writes it.
fn modify(
    vm_dir: &Path,
    name: &str,
    open: &mut Opener<'_>,
    change: impl FnOnce(&Switches, &Switch) -> Result<Switch, SwitchError>,
    live: impl FnOnce(&mut dyn Links, &Switch, &Switch) -> Result<(), ApplyError>,
) -> Result<(), SwitchError> {
    let switches = load(vm_dir)?;
    let old = find(&switches, name)?;
    let new = change(&switches, old)?;
    let mut links = open(switches.bridges())?;
    live(links.as_mut(), old, &new).map_err(applied(name))?;
    write(vm_dir, &new)
}

/// `vm switch add NAME IF`.
pub fn add(
    vm_dir: &Path,
    name: &str,
    port: &str,
    open: &mut Opener<'_>,
) -> Result<(), SwitchError> {
    modify(
        vm_dir,
        name,
        open,
        |all, old| {
            if old.kind == SwitchType::Manual {
                return Err(SwitchError::Manual(name.to_owned()));
            }
            check_new_port(all, old, port)?;
            let mut new = old.clone();
            new.ports.push(port.to_owned());
            Ok(new)
        },
        |links, _, new| apply::ensure(links, new),
    )
}

/// `vm switch remove NAME IF`.
pub fn remove(
    vm_dir: &Path,
    name: &str,
    port: &str,
    open: &mut Opener<'_>,
) -> Result<(), SwitchError> {
    modify(
        vm_dir,
        name,
        open,
        |_, old| {
            if old.kind == SwitchType::Manual {
                return Err(SwitchError::Manual(name.to_owned()));
            }
            if !old.ports.iter().any(|p| p == port) {
                return Err(SwitchError::NotMember {
                    switch: name.to_owned(),
                    port: port.to_owned(),
                });
            }
            let mut new = old.clone();
            new.ports.retain(|p| p != port);
            Ok(new)
        },
        |links, old, _| apply::detach(links, old, port),
    )
}

/// `vm switch address NAME ADDR/LEN...|none`: the switch's addresses become exactly these.
pub fn address(
    vm_dir: &Path,
    name: &str,
    addresses: &[String],
    open: &mut Opener<'_>,
) -> Result<(), SwitchError> {
    let list = if matches!(addresses, [none] if none == "none") {
        Vec::new()
    } else {
        config::parse_addresses(&addresses.join(" ")).map_err(bad("address"))?
    };
    modify(
        vm_dir,
        name,
        open,
        |_, old| {
            let mut new = old.clone();
            new.addresses = list;
            Ok(new)
        },
        |links, old, new| {
            if new.kind == SwitchType::Manual {
                apply::check_manual_bridge(links, new)?;
                if new.addresses.is_empty() && old.addresses.is_empty() {
                    return Ok(());
                }
                return links
                    .set_addresses(&new.bridge, &new.addresses)
                    .map_err(|source| ApplyError::Netcfg {
                        what: format!("setting the addresses of {}", new.bridge),
                        source,
                    });
            }
            apply::ensure(links, new)
        },
    )
}

/// `vm switch vlan NAME ID|0`.
pub fn vlan(vm_dir: &Path, name: &str, id: &str, open: &mut Opener<'_>) -> Result<(), SwitchError> {
    let vlan = config::parse_vlan(id).map_err(bad("vlan"))?;
    modify(
        vm_dir,
        name,
        open,
        |_, old| {
            if old.kind == SwitchType::Manual {
                return Err(SwitchError::Manual(name.to_owned()));
            }
            let mut new = old.clone();
            new.vlan = vlan;
            for port in &new.ports {
                new.member_name(port).map_err(SwitchError::Name)?;
            }
            Ok(new)
        },
        |links, old, new| {
            if old.vlan != new.vlan {
                for port in &old.ports {
                    apply::detach(links, old, port)?;
                }
            }
            apply::ensure(links, new)
        },
    )
}

/// `vm switch private NAME on|off`.
pub fn private(
    vm_dir: &Path,
    name: &str,
    value: &str,
    open: &mut Opener<'_>,
) -> Result<(), SwitchError> {
    let on = config::parse_private(value).map_err(bad("private"))?;
    modify(
        vm_dir,
        name,
        open,
        |_, old| {
            let mut new = old.clone();
            new.private = on;
            Ok(new)
        },
        |links, _, new| {
            if new.kind == SwitchType::Manual {
                apply::check_manual_bridge(links, new)?;
                return links
                    .set_private(&new.bridge, new.private)
                    .map_err(|source| ApplyError::Netcfg {
                        what: format!("setting {} private={}", new.bridge, new.private),
                        source,
                    });
            }
            apply::ensure(links, new)
        },
    )
}

/// `vm switch mtu NAME MTU`.
pub fn mtu(
    vm_dir: &Path,
    name: &str,
    value: &str,
    open: &mut Opener<'_>,
) -> Result<(), SwitchError> {
    let mtu = config::parse_mtu(value)
        .map_err(bad("mtu"))?
        .ok_or_else(|| bad("mtu")("an MTU is needed".to_owned()))?;
    modify(
        vm_dir,
        name,
        open,
        |_, old| {
            let mut new = old.clone();
            new.mtu = Some(mtu);
            Ok(new)
        },
        |links, _, new| {
            if new.kind == SwitchType::Manual {
                apply::check_manual_bridge(links, new)?;
                return links
                    .set_mtu(&new.bridge, mtu)
                    .map_err(|source| ApplyError::Netcfg {
                        what: format!("setting MTU {mtu} on {}", new.bridge),
                        source,
                    });
            }
            apply::ensure(links, new)
        },
    )
}

/// `vm switch destroy NAME`: a standard switch's bridge is deleted (its ports released); a
/// manual switch's bridge stays.
pub fn destroy(vm_dir: &Path, name: &str, open: &mut Opener<'_>) -> Result<(), SwitchError> {
    let switches = load(vm_dir)?;
    let listed = switches.get(name).is_some() || switches.failed.iter().any(|f| f == name);
    if !listed {
        return Err(SwitchError::NoSwitch(name.to_owned()));
    }
    if let Some(sw) = switches.get(name) {
        let mut links = open(switches.bridges())?;
        apply::teardown(links.as_mut(), sw).map_err(applied(name))?;
    }
    conf::update_file(&system_conf_path(vm_dir), |text| {
        config::remove_switch(text, name)
    })?;
    Ok(())
}

/// `vm init`: applies every switch again (a standard switch's bridge is re-created with its
/// members, VLAN, MTU, addresses and private flag). Returns one message per switch that
/// failed; the others are still applied. No switch, no netcfg.
pub fn init_all(vm_dir: &Path, open: &mut Opener<'_>) -> Result<Vec<String>, SwitchError> {
    let switches = load(vm_dir)?;
    let mut problems: Vec<String> = switches.errors.iter().map(ToString::to_string).collect();
    if switches.switches.is_empty() {
        return Ok(problems);
    }
    let mut links = open(switches.bridges())?;
    for sw in &switches.switches {
        if let Err(e) = apply::ensure(links.as_mut(), sw) {
            problems.push(crate::list::error_chain(&applied(&sw.name)(e)));
        }
    }
    Ok(problems)
}

/// One switch with its live bridge, if the bridge exists.
#[derive(Debug, Clone)]
pub struct LiveSwitch {
    pub switch: Switch,
    pub bridge: Option<LinkState>,
    /// The bridge's members that are not the switch's ports: guest taps and others.
    pub virtual_ports: Vec<VirtualPort>,
}

/// A bridge member that is not a configured port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualPort {
    pub device: String,
    /// The guest and NIC number from a capvm tap's alias.
    pub guest: Option<(String, u32)>,
}

/// Reads the live state of `switches` (`links`: `None` when netcfg could not start; then
/// only `/sys/class/net` tells whether a bridge exists).
pub fn live(switches: &Switches, mut links: Option<&mut (dyn Links + 'static)>) -> Vec<LiveSwitch> {
    switches
        .switches
        .iter()
        .map(|sw| {
            let bridge = match links.as_deref_mut() {
                Some(l) => l.link(&sw.bridge).ok().flatten(),
                None => None,
            };
            let members: Vec<String> = match &bridge {
                Some(b) => b.members.clone(),
                None => sysfs_members(&sw.bridge),
            };
            let ports: Vec<String> = sw
                .ports
                .iter()
                .filter_map(|p| sw.member_name(p).ok())
                .collect();
            let virtual_ports = members
                .into_iter()
                .filter(|m| !ports.contains(m))
                .map(|device| VirtualPort {
                    guest: tap_owner(&device),
                    device,
                })
                .collect();
            LiveSwitch {
                switch: sw.clone(),
                bridge,
                virtual_ports,
            }
        })
        .collect()
}

fn bridge_exists(live: &LiveSwitch) -> bool {
    live.bridge.is_some() || sysfs_dir(&live.switch.bridge).is_some_and(|d| d.is_dir())
}

fn sysfs_dir(ifname: &str) -> Option<PathBuf> {
    validate_ifname(ifname)
        .ok()
        .map(|()| Path::new("/sys/class/net").join(ifname))
}

fn sysfs_members(bridge: &str) -> Vec<String> {
    let Some(dir) = sysfs_dir(bridge) else {
        return Vec::new();
    };
    let mut out: Vec<String> = std::fs::read_dir(dir.join("brif"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// The guest and NIC a capvm tap belongs to, from its alias (`capvm:GUEST:N`).
pub fn tap_owner(ifname: &str) -> Option<(String, u32)> {
    if !ifname.starts_with(TAP_NAME_PREFIX) {
        return None;
    }
    let alias = std::fs::read_to_string(sysfs_dir(ifname)?.join("ifalias")).ok()?;
    parse_tap_alias(alias.trim_end())
}

/// Parses `capvm:GUEST:N`.
pub fn parse_tap_alias(alias: &str) -> Option<(String, u32)> {
    let rest = alias.strip_prefix(TAP_ALIAS_PREFIX)?;
    let (guest, nic) = rest.rsplit_once(':')?;
    let nic: u32 = nic.parse().ok()?;
    crate::datastore::validate_name(guest).ok()?;
    Some((guest.to_owned(), nic))
}

/// The taps of guest `name` that exist now, as (NIC number, tap name), sorted.
pub fn taps_of(name: &str) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|ifname| match tap_owner(&ifname) {
            Some((guest, nic)) if guest == name => Some((nic, ifname)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn dash_join(items: &[String], sep: &str) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(sep)
    }
}

/// `vm switch list`: NAME TYPE IFACE ADDRESS PRIVATE MTU VLAN PORTS; IFACE is the bridge when
/// it exists, `-` otherwise.
pub fn render_list(live: &[LiveSwitch]) -> String {
    let mut rows = vec![
        [
            "NAME", "TYPE", "IFACE", "ADDRESS", "PRIVATE", "MTU", "VLAN", "PORTS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for l in live {
        let sw = &l.switch;
        let addresses: Vec<String> = sw.addresses.iter().map(ToString::to_string).collect();
        rows.push(vec![
            sw.name.clone(),
            sw.kind.name().to_owned(),
            if bridge_exists(l) {
                sw.bridge.clone()
            } else {
                "-".to_owned()
            },
            dash_join(&addresses, ","),
            if sw.private { "yes" } else { "no" }.to_owned(),
            sw.mtu.map_or_else(|| "-".to_owned(), |m| m.to_string()),
            sw.vlan.map_or_else(|| "-".to_owned(), |v| v.to_string()),
            dash_join(&sw.ports, ","),
        ]);
    }
    crate::table::render(&rows)
}

/// `vm switch info`: per switch, its config, its bridge's live state and its virtual ports.
pub fn render_info(live: &[LiveSwitch]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for l in live {
        let sw = &l.switch;
        let addresses: Vec<String> = sw.addresses.iter().map(ToString::to_string).collect();
        let state = match &l.bridge {
            Some(b) if b.up => "up",
            Some(_) => "down",
            None if bridge_exists(l) => "exists",
            None => "missing",
        };
        let _ = writeln!(s, "------------------------");
        let _ = writeln!(s, "Virtual Switch: {}", sw.name);
        let _ = writeln!(s, "------------------------");
        let _ = writeln!(s, "  type: {}", sw.kind.name());
        let _ = writeln!(s, "  bridge: {} ({state})", sw.bridge);
        let _ = writeln!(s, "  ports: {}", dash_join(&sw.ports, " "));
        let _ = writeln!(s, "  addresses: {}", dash_join(&addresses, " "));
        let _ = writeln!(
            s,
            "  mtu: {}",
            sw.mtu.map_or_else(|| "-".to_owned(), |m| m.to_string())
        );
        let _ = writeln!(
            s,
            "  vlan: {}",
            sw.vlan.map_or_else(|| "-".to_owned(), |v| v.to_string())
        );
        let _ = writeln!(s, "  private: {}", if sw.private { "yes" } else { "no" });
        if let Some(b) = &l.bridge {
            let live_addresses: Vec<String> = b.addresses.iter().map(ToString::to_string).collect();
            let _ = writeln!(s, "  live-mtu: {}", b.mtu);
            let _ = writeln!(s, "  live-members: {}", dash_join(&b.members, " "));
            let _ = writeln!(s, "  live-addresses: {}", dash_join(&live_addresses, " "));
            let _ = writeln!(
                s,
                "  live-private: {}",
                if b.private { "yes" } else { "no" }
            );
        }
        for port in &l.virtual_ports {
            let _ = writeln!(s, "\n  virtual-port");
            let _ = writeln!(s, "    device: {}", port.device);
            match &port.guest {
                Some((guest, nic)) => {
                    let _ = writeln!(s, "    vm: {guest}");
                    let _ = writeln!(s, "    nic: network{nic}");
                }
                None => {
                    let _ = writeln!(s, "    vm: -");
                }
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::apply::fake::FakeLinks;
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A datastore with `system.conf` = `text`, and an opener over one shared fake.
    struct Fixture {
        dir: tempfile::TempDir,
        links: Rc<RefCell<FakeLinks>>,
        bridges_seen: Rc<RefCell<Vec<Vec<String>>>>,
    }

    /// Forwards to the shared fake so the test can look at it afterwards.
    struct Shared(Rc<RefCell<FakeLinks>>);

    impl Links for Shared {
        fn create_bridge(&mut self, b: &str) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().create_bridge(b)
        }
        fn destroy_bridge(&mut self, b: &str) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().destroy_bridge(b)
        }
        fn add_member(&mut self, b: &str, m: &str) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().add_member(b, m)
        }
        fn remove_member(&mut self, b: &str, m: &str) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().remove_member(b, m)
        }
        fn add_vlan(&mut self, p: &str, v: u16) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().add_vlan(p, v)
        }
        fn delete_vlan(&mut self, p: &str, v: u16) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().delete_vlan(p, v)
        }
        fn set_mtu(&mut self, b: &str, m: u32) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().set_mtu(b, m)
        }
        fn set_addresses(
            &mut self,
            b: &str,
            a: &[proto::netcfg::IfAddress],
        ) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().set_addresses(b, a)
        }
        fn set_private(&mut self, b: &str, p: bool) -> Result<(), NetcfgClientError> {
            self.0.borrow_mut().set_private(b, p)
        }
        fn link(&mut self, i: &str) -> Result<Option<LinkState>, NetcfgClientError> {
            self.0.borrow_mut().link(i)
        }
    }

    impl Fixture {
        fn new(text: &str, links: FakeLinks) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            crate::datastore::init(dir.path()).unwrap();
            std::fs::write(system_conf_path(dir.path()), text).unwrap();
            Fixture {
                dir,
                links: Rc::new(RefCell::new(links)),
                bridges_seen: Rc::default(),
            }
        }

        fn vm_dir(&self) -> &Path {
            self.dir.path()
        }

        fn opener(&self) -> impl FnMut(Vec<String>) -> Result<Box<dyn Links>, SwitchError> + use<> {
            let links = Rc::clone(&self.links);
            let seen = Rc::clone(&self.bridges_seen);
            move |bridges| {
                seen.borrow_mut().push(bridges);
                Ok(Box::new(Shared(Rc::clone(&links))) as Box<dyn Links>)
            }
        }

        fn conf(&self) -> String {
            std::fs::read_to_string(system_conf_path(self.vm_dir())).unwrap()
        }

        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut self.links.borrow_mut().calls)
        }
    }

    fn args(name: &str) -> CreateArgs {
        CreateArgs {
            name: name.into(),
            ..CreateArgs::default()
        }
    }

    #[test]
    fn create_applies_then_writes_and_netcfg_may_touch_the_new_bridge() {
        let f = Fixture::new("", FakeLinks::with(&[("eth0", "")]));
        let mut a = args("public");
        a.interface = Some("eth0".into());
        a.addresses = vec!["198.18.0.1/24".into(), "2001:db8::1/64".into()];
        a.mtu = Some("1400".into());
        a.private = true;

        create(f.vm_dir(), &a, &mut f.opener()).unwrap();

        assert_eq!(
            f.bridges_seen.borrow().as_slice(),
            [vec!["vm-public".to_owned()]]
        );
        assert_eq!(
            f.calls(),
            [
                "create_bridge vm-public",
                "add_member vm-public eth0",
                "set_mtu vm-public 1400",
                "set_addresses vm-public [198.18.0.1/24 2001:db8::1/64]",
                "set_private vm-public true"
            ]
        );
        let sw = load(f.vm_dir()).unwrap().get("public").cloned().unwrap();
        assert_eq!((sw.ports.len(), sw.mtu, sw.private), (1, Some(1400), true));
        assert!(matches!(
            create(f.vm_dir(), &a, &mut f.opener()),
            Err(SwitchError::Exists(_))
        ));
    }

    #[test]
    fn a_failed_create_is_undone_and_not_written() {
        let f = Fixture::new("", FakeLinks::default());
        let mut a = args("public");
        a.interface = Some("eth9".into());
        let err = create(f.vm_dir(), &a, &mut f.opener()).unwrap_err();
        assert!(err.to_string().contains("switch public"), "{err}");
        assert!(!f.links.borrow().links.contains_key("vm-public"));
        assert!(!f.conf().contains("public"), "{}", f.conf());
    }

    #[test]
    fn create_checks_its_options() {
        let f = Fixture::new(
            "switch_list=\"a\"\nports_a=\"eth0\"\n",
            FakeLinks::default(),
        );
        let cases: Vec<(CreateArgs, &str)> = vec![
            (args("thirteen-char"), "not 1 to 12"),
            (
                CreateArgs {
                    bridge: Some("br0".into()),
                    kind: Some("standard".into()),
                    ..args("b")
                },
                "-b",
            ),
            (
                CreateArgs {
                    kind: Some("manual".into()),
                    ..args("b")
                },
                "needs its bridge",
            ),
            (
                CreateArgs {
                    kind: Some("bogus".into()),
                    ..args("b")
                },
                "-t",
            ),
            (
                CreateArgs {
                    vlan: Some("5000".into()),
                    ..args("b")
                },
                "-n",
            ),
            (
                CreateArgs {
                    mtu: Some("10".into()),
                    ..args("b")
                },
                "-m",
            ),
            (
                CreateArgs {
                    addresses: vec!["198.18.0.1".into()],
                    ..args("b")
                },
                "-a",
            ),
            (
                CreateArgs {
                    interface: Some("eth0".into()),
                    ..args("b")
                },
                "already a member of switch a",
            ),
            (
                CreateArgs {
                    bridge: Some("br0".into()),
                    interface: Some("eth1".into()),
                    ..args("b")
                },
                "manual",
            ),
        ];
        for (a, want) in cases {
            let err = create(f.vm_dir(), &a, &mut f.opener())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{a:?}: {err}");
        }
        assert!(f.calls().is_empty());
    }

    #[test]
    fn add_and_remove_change_ports_live_and_in_the_file() {
        let f = Fixture::new(
            "switch_list=\"s\"\nvlan_s=\"7\"\n",
            FakeLinks::with(&[("eth0", "")]),
        );
        add(f.vm_dir(), "s", "eth0", &mut f.opener()).unwrap();
        assert!(f.conf().contains("ports_s=\"eth0\""), "{}", f.conf());
        assert!(f.calls().contains(&"add_member vm-s eth0.7".to_owned()));
        remove(f.vm_dir(), "s", "eth0", &mut f.opener()).unwrap();
        assert_eq!(
            f.calls(),
            ["remove_member vm-s eth0.7", "delete_vlan eth0 7"]
        );
        assert!(!f.conf().contains("ports_s"), "{}", f.conf());
        assert!(matches!(
            remove(f.vm_dir(), "s", "eth0", &mut f.opener()),
            Err(SwitchError::NotMember { .. })
        ));
        assert!(matches!(
            add(f.vm_dir(), "nope", "eth0", &mut f.opener()),
            Err(SwitchError::NoSwitch(_))
        ));
    }

    #[test]
    fn changing_the_vlan_moves_every_port() {
        let f = Fixture::new(
            "switch_list=\"s\"\nports_s=\"eth0\"\n",
            FakeLinks::with(&[("eth0", "")]),
        );
        apply::ensure(
            &mut *f.links.borrow_mut(),
            load(f.vm_dir()).unwrap().get("s").unwrap(),
        )
        .unwrap();
        f.calls();
        vlan(f.vm_dir(), "s", "9", &mut f.opener()).unwrap();
        let calls = f.calls();
        assert_eq!(
            calls[..3],
            [
                "remove_member vm-s eth0",
                "create_bridge vm-s",
                "add_vlan eth0 9"
            ]
        );
        assert!(f.conf().contains("vlan_s=\"9\""));
        vlan(f.vm_dir(), "s", "0", &mut f.opener()).unwrap();
        assert!(!f.conf().contains("vlan_s"), "{}", f.conf());
        assert!(f.calls().contains(&"delete_vlan eth0 9".to_owned()));
    }

    #[test]
    fn address_none_clears_and_bad_addresses_are_refused() {
        let f = Fixture::new(
            "switch_list=\"s\"\naddr_s=\"198.18.0.1/24\"\n",
            FakeLinks::default(),
        );
        address(
            f.vm_dir(),
            "s",
            &["2001:db8::1/64".into(), "198.18.0.2/24".into()],
            &mut f.opener(),
        )
        .unwrap();
        assert!(
            f.conf().contains("addr_s=\"2001:db8::1/64 198.18.0.2/24\""),
            "{}",
            f.conf()
        );
        address(f.vm_dir(), "s", &["none".into()], &mut f.opener()).unwrap();
        assert!(!f.conf().contains("addr_s"));
        assert!(f.calls().contains(&"set_addresses vm-s []".to_owned()));
        assert!(address(f.vm_dir(), "s", &["198.18.0.1".into()], &mut f.opener()).is_err());
    }

    #[test]
    fn private_and_mtu_are_written_and_applied() {
        let f = Fixture::new("switch_list=\"s\"\n", FakeLinks::default());
        private(f.vm_dir(), "s", "on", &mut f.opener()).unwrap();
        mtu(f.vm_dir(), "s", "9000", &mut f.opener()).unwrap();
        let calls = f.calls();
        assert!(
            calls.contains(&"set_private vm-s true".to_owned()),
            "{calls:?}"
        );
        assert!(calls.contains(&"set_mtu vm-s 9000".to_owned()), "{calls:?}");
        assert!(f.conf().contains("private_s=\"yes\"") && f.conf().contains("mtu_s=\"9000\""));
        assert!(private(f.vm_dir(), "s", "maybe", &mut f.opener()).is_err());
        assert!(mtu(f.vm_dir(), "s", "1", &mut f.opener()).is_err());
    }

    #[test]
    fn manual_switches_keep_their_bridge_and_members() {
        let f = Fixture::new("", FakeLinks::with(&[("br0", "bridge")]));
        let a = CreateArgs {
            bridge: Some("br0".into()),
            addresses: vec!["198.18.2.1/24".into()],
            ..args("lab")
        };
        create(f.vm_dir(), &a, &mut f.opener()).unwrap();
        assert!(
            f.conf().contains("type_lab=\"manual\"") && f.conf().contains("bridge_lab=\"br0\"")
        );
        assert!(matches!(
            add(f.vm_dir(), "lab", "eth0", &mut f.opener()),
            Err(SwitchError::Manual(_))
        ));
        assert!(matches!(
            vlan(f.vm_dir(), "lab", "3", &mut f.opener()),
            Err(SwitchError::Manual(_))
        ));
        destroy(f.vm_dir(), "lab", &mut f.opener()).unwrap();
        let calls = f.calls();
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("create_bridge") || c.starts_with("destroy_bridge")),
            "{calls:?}"
        );
        assert!(f.links.borrow().links.contains_key("br0"));
        assert!(!f.conf().contains("lab"), "{}", f.conf());
    }

    #[test]
    fn destroy_tears_down_and_forgets_a_standard_switch() {
        let f = Fixture::new(
            "switch_list=\"s\"\nports_s=\"eth0\"\n",
            FakeLinks::with(&[("eth0", "")]),
        );
        init_all(f.vm_dir(), &mut f.opener()).unwrap();
        f.calls();
        destroy(f.vm_dir(), "s", &mut f.opener()).unwrap();
        assert_eq!(
            f.calls(),
            ["remove_member vm-s eth0", "destroy_bridge vm-s"]
        );
        assert!(load(f.vm_dir()).unwrap().switches.is_empty());
        assert!(matches!(
            destroy(f.vm_dir(), "s", &mut f.opener()),
            Err(SwitchError::NoSwitch(_))
        ));
    }

    #[test]
    fn init_without_switches_starts_no_netcfg_and_reports_bad_ones() {
        let f = Fixture::new(
            "switch_list=\"bad\"\nvlan_bad=\"x\"\n",
            FakeLinks::default(),
        );
        let problems = init_all(f.vm_dir(), &mut f.opener()).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(f.bridges_seen.borrow().is_empty());
        assert!(matches!(
            add(f.vm_dir(), "bad", "eth0", &mut f.opener()),
            Err(SwitchError::Invalid { .. })
        ));
    }

    #[test]
    fn list_shows_the_bridge_only_when_it_exists() {
        let f = Fixture::new(
            "switch_list=\"a b\"\naddr_a=\"198.18.0.1/24 2001:db8::1/64\"\nports_a=\"eth0 eth1\"\nvlan_b=\"4\"\nmtu_b=\"1400\"\nprivate_b=yes\n",
            FakeLinks::with(&[("vm-a", "bridge")]),
        );
        let switches = load(f.vm_dir()).unwrap();
        let mut fake = f.links.borrow_mut();
        let text = render_list(&live(&switches, Some(&mut *fake)));
        assert_eq!(
            text,
            "NAME  TYPE      IFACE  ADDRESS                       PRIVATE  MTU   VLAN  PORTS\n\
             a     standard  vm-a   198.18.0.1/24,2001:db8::1/64  no       -     -     eth0,eth1\n\
             b     standard  -      -                             yes      1400  4     -\n"
        );
    }

    #[test]
    fn info_shows_config_live_state_and_guest_ports() {
        let mut fake = FakeLinks::with(&[("vm-a", "bridge")]);
        fake.links.get_mut("vm-a").unwrap().members = vec!["eth0".into(), "tapx".into()];
        let switches = Switches::from_conf(
            &crate::conf::Conf::parse("switch_list=\"a\"\nports_a=\"eth0\"\n"),
            Path::new("/s"),
        );
        let text = render_info(&live(&switches, Some(&mut fake)));
        assert!(text.contains("Virtual Switch: a\n"), "{text}");
        assert!(
            text.contains("  bridge: vm-a (up)\n  ports: eth0\n"),
            "{text}"
        );
        assert!(text.contains("  live-members: eth0 tapx\n"), "{text}");
        assert!(
            text.contains("\n  virtual-port\n    device: tapx\n    vm: -\n"),
            "{text}"
        );
        assert!(!text.contains("device: eth0"), "{text}");
    }

    #[test]
    fn tap_aliases_parse_to_guest_and_nic() {
        assert_eq!(parse_tap_alias("capvm:web:2"), Some(("web".into(), 2)));
        assert_eq!(parse_tap_alias("capvm:a-b.c:0"), Some(("a-b.c".into(), 0)));
        assert_eq!(parse_tap_alias("capvm:web:"), None);
        assert_eq!(parse_tap_alias("capvm:../x:1"), None);
        assert_eq!(parse_tap_alias("other"), None);
        assert_eq!(tap_owner("eth0"), None);
    }
}
