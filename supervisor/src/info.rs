//! `vm info`: vm-bhyve's per-guest report (state, datastore, loader, uuid, cpu, memory, then
//! each network interface and virtual disk), as text or as JSON.
//!
//! Like `vm list`, values are shown as written, so a guest with a broken config still gets
//! its report, with the config's errors and warnings alongside.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;

use proto::control::ProcessInfo;
use serde::Serialize;

use crate::conf::Conf;
use crate::datastore::Guest;
use crate::guest_config::{self, DiskDev, GuestConfig, GuestConfigError};
use crate::list::{error_chain, loader_label, state_words};
use crate::state::RunState;

/// One `network-interface` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicInfo {
    pub number: u32,
    pub emulation: String,
    pub virtual_switch: Option<String>,
    pub fixed_mac_address: Option<String>,
    pub fixed_device: Option<String>,
    /// The host tap of a running guest's NIC.
    pub tap: Option<String>,
}

/// One `virtual-disk` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskInfo {
    pub number: u32,
    pub device_type: String,
    pub emulation: String,
    pub options: Option<String>,
    pub system_path: Option<String>,
    pub bytes_size: Option<u64>,
    /// Allocated bytes (`st_blocks * 512`).
    pub bytes_used: Option<u64>,
}

/// Everything `vm info` shows about one guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestInfo {
    pub name: String,
    /// `stopped`, `running` or `unknown`.
    pub state: String,
    pub pid: Option<u32>,
    pub datastore: String,
    pub path: String,
    pub loader: String,
    pub uuid: Option<String>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub network_interfaces: Vec<NicInfo>,
    pub virtual_disks: Vec<DiskInfo>,
    /// Seconds since the guest started, from its supervisor.
    pub uptime_secs: Option<u64>,
    /// Where its VNC server listens (`host:port`), from its supervisor.
    pub vnc: Option<String>,
    /// The guest's processes (the supervisor first), from its supervisor.
    pub processes: Vec<ProcessInfo>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

fn value(conf: &Conf, key: &str) -> Option<String> {
    conf.get(key).filter(|v| !v.is_empty()).map(str::to_owned)
}

/// Gathers the report for `guest`.
pub fn gather(guest: &Guest) -> GuestInfo {
    let conf_path = guest.conf_path();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let conf = match Conf::load(&conf_path) {
        Ok(conf) => {
            match GuestConfig::from_conf(&conf, &conf_path) {
                Ok(parsed) => warnings.extend(parsed.warnings.iter().map(ToString::to_string)),
                Err(GuestConfigError::Invalid {
                    errors: e,
                    warnings: w,
                }) => {
                    errors.extend(e.iter().map(ToString::to_string));
                    warnings.extend(w.iter().map(ToString::to_string));
                }
                Err(e) => errors.push(error_chain(&e)),
            }
            conf
        }
        Err(e) => {
            errors.push(error_chain(&e));
            Conf::default()
        }
    };
    let (run, state_word, state_error) = state_words(&guest.dir);
    errors.extend(state_error);
    let status = match run {
        RunState::Running { .. } => crate::lifecycle::status_of(&guest.dir),
        RunState::Stopped => None,
    };
    let processes = status.as_ref().map_or_else(Vec::new, |s| {
        let mut all = vec![ProcessInfo {
            role: "supervisor".to_owned(),
            pid: s.pid,
            rss_kib: crate::monitor::runner::rss_kib(s.pid),
            restarts: 0,
        }];
        all.extend(s.processes.iter().cloned());
        all
    });
    GuestInfo {
        name: guest.name.clone(),
        state: state_word.to_owned(),
        pid: match run {
            RunState::Running { pid } => pid,
            RunState::Stopped => None,
        },
        datastore: guest.datastore.clone(),
        path: guest.dir.display().to_string(),
        loader: loader_label(&conf),
        uuid: value(&conf, "uuid"),
        cpu: value(&conf, "cpu"),
        memory: value(&conf, "memory"),
        network_interfaces: nics(&conf, &guest.name, matches!(run, RunState::Running { .. })),
        virtual_disks: disks(&conf, guest),
        uptime_secs: status.as_ref().map(|s| s.uptime_secs),
        vnc: status.and_then(|s| s.vnc),
        processes,
        warnings,
        errors,
    }
}

/// vm-bhyve's rule: interfaces run from 0 while `networkN_type` is set.
fn nics(conf: &Conf, name: &str, running: bool) -> Vec<NicInfo> {
    // A running guest's taps carry its name in their alias (netcfg's `capvm:GUEST:N`).
    let taps = if running {
        crate::switch::taps_of(name)
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for number in 0u32.. {
        let Some(emulation) = value(conf, &format!("network{number}_type")) else {
            break;
        };
        out.push(NicInfo {
            number,
            emulation,
            virtual_switch: value(conf, &format!("network{number}_switch")),
            fixed_mac_address: value(conf, &format!("network{number}_mac")),
            fixed_device: value(conf, &format!("network{number}_device")),
            tap: taps
                .iter()
                .find(|(n, _)| *n == number)
                .map(|(_, tap)| tap.clone())
                .or_else(|| {
                    running
                        .then(|| value(conf, &format!("network{number}_device")))
                        .flatten()
                }),
        });
    }
    out
}

/// vm-bhyve's rule: disks run from 0 while both `diskN_name` and `diskN_type` are set.
fn disks(conf: &Conf, guest: &Guest) -> Vec<DiskInfo> {
    let mut out = Vec::new();
    for number in 0u32.. {
        let (Some(name), Some(emulation)) = (
            value(conf, &format!("disk{number}_name")),
            value(conf, &format!("disk{number}_type")),
        ) else {
            break;
        };
        let device_type =
            value(conf, &format!("disk{number}_dev")).unwrap_or_else(|| "file".to_owned());
        let path = DiskDev::parse(&device_type)
            .ok()
            .and_then(|dev| guest_config::disk_path(dev, &name, &guest.dir));
        let meta = path.as_ref().and_then(|p| fs::metadata(p).ok());
        out.push(DiskInfo {
            number,
            device_type,
            emulation,
            options: value(conf, &format!("disk{number}_opts")),
            system_path: path.map(|p| p.display().to_string()),
            bytes_size: meta.as_ref().map(fs::Metadata::len),
            bytes_used: meta.map(|m| m.blocks().saturating_mul(512)),
        });
    }
    out
}

/// vm-bhyve's human size: the value in B, K, M, G or T with three decimals.
pub fn bytes_human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    #[allow(
        clippy::cast_precision_loss,
        reason = "a display value to three decimals"
    )]
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.3}{}", UNITS.get(unit).copied().unwrap_or("T"))
}

/// `1d 02:03:04`, `02:03:04`.
pub fn uptime_text(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let hms = format!(
        "{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    if days > 0 {
        format!("{days}d {hms}")
    } else {
        hms
    }
}

fn dash(v: Option<&String>) -> &str {
    v.map_or("-", String::as_str)
}

/// The text report, vm-bhyve's layout.
pub fn render_text(info: &GuestInfo) -> String {
    let mut s = String::new();
    let state = match info.state.as_str() {
        "running" => RunState::Running { pid: info.pid }
            .to_string()
            .to_lowercase(),
        other => other.to_owned(),
    };
    let _ = writeln!(s, "------------------------");
    let _ = writeln!(s, "Virtual Machine: {}", info.name);
    let _ = writeln!(s, "------------------------");
    let _ = writeln!(s, "  state: {state}");
    let _ = writeln!(s, "  datastore: {}", info.datastore);
    let _ = writeln!(s, "  loader: {}", info.loader);
    let _ = writeln!(s, "  uuid: {}", info.uuid.as_deref().unwrap_or("auto"));
    let _ = writeln!(s, "  cpu: {}", dash(info.cpu.as_ref()));
    let _ = writeln!(s, "  memory: {}", dash(info.memory.as_ref()));
    if let Some(uptime) = info.uptime_secs {
        let _ = writeln!(s, "  uptime: {}", uptime_text(uptime));
    }
    if let Some(vnc) = &info.vnc {
        let _ = writeln!(s, "  vnc: {vnc}");
    }
    for p in &info.processes {
        let _ = writeln!(
            s,
            "  process: {} pid {} rss {} restarts {}",
            p.role,
            p.pid,
            bytes_human(p.rss_kib.saturating_mul(1024)),
            p.restarts
        );
    }
    for nic in &info.network_interfaces {
        let _ = writeln!(s, "\n  network-interface");
        let _ = writeln!(s, "    number: {}", nic.number);
        let _ = writeln!(s, "    emulation: {}", nic.emulation);
        let _ = writeln!(
            s,
            "    virtual-switch: {}",
            dash(nic.virtual_switch.as_ref())
        );
        let _ = writeln!(
            s,
            "    fixed-mac-address: {}",
            dash(nic.fixed_mac_address.as_ref())
        );
        let _ = writeln!(s, "    fixed-device: {}", dash(nic.fixed_device.as_ref()));
        if let Some(tap) = &nic.tap {
            let _ = writeln!(s, "    tap: {tap}");
        }
    }
    for disk in &info.virtual_disks {
        let _ = writeln!(s, "\n  virtual-disk");
        let _ = writeln!(s, "    number: {}", disk.number);
        let _ = writeln!(s, "    device-type: {}", disk.device_type);
        let _ = writeln!(s, "    emulation: {}", disk.emulation);
        let _ = writeln!(s, "    options: {}", dash(disk.options.as_ref()));
        let _ = writeln!(s, "    system-path: {}", dash(disk.system_path.as_ref()));
        if let (Some(size), Some(used)) = (disk.bytes_size, disk.bytes_used) {
            let _ = writeln!(s, "    bytes-size: {size} ({})", bytes_human(size));
            let _ = writeln!(s, "    bytes-used: {used} ({})", bytes_human(used));
        }
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_with(conf: &str) -> (tempfile::TempDir, Guest) {
        let dir = tempfile::tempdir().unwrap();
        let guest = Guest {
            name: "g".into(),
            datastore: "default".into(),
            dir: dir.path().to_owned(),
        };
        fs::write(guest.conf_path(), conf).unwrap();
        (dir, guest)
    }

    #[test]
    fn uptime_reads_as_days_and_clock() {
        assert_eq!(uptime_text(59), "00:00:59");
        assert_eq!(uptime_text(86_400 + 3723), "1d 01:02:03");
    }

    #[test]
    fn bytes_human_matches_vm_bhyve() {
        assert_eq!(bytes_human(0), "0.000B");
        assert_eq!(bytes_human(1023), "1023.000B");
        assert_eq!(bytes_human(1536), "1.500K");
        assert_eq!(bytes_human(64 << 30), "64.000G");
        assert_eq!(bytes_human(3 << 50), "3072.000T");
    }

    #[test]
    fn report_lists_interfaces_and_disks() {
        let (_d, guest) = guest_with(
            "uefi=yes\ncpu=2\nmemory=1G\nnetwork0_type=virtio-net\nnetwork0_switch=public\ndisk0_type=virtio-blk\ndisk0_name=disk0.img\n",
        );
        fs::File::create(guest.dir.join("disk0.img"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let info = gather(&guest);
        assert_eq!(info.loader, "uefi");
        assert_eq!(info.network_interfaces.len(), 1);
        assert_eq!(info.virtual_disks[0].bytes_size, Some(1 << 20));
        assert_eq!(info.virtual_disks[0].bytes_used, Some(0));
        let text = render_text(&info);
        assert!(text.starts_with("------------------------\nVirtual Machine: g\n"));
        assert!(text.contains("  state: stopped\n  datastore: default\n  loader: uefi\n  uuid: auto\n  cpu: 2\n  memory: 1G\n"));
        assert!(text.contains("\n  network-interface\n    number: 0\n    emulation: virtio-net\n    virtual-switch: public\n    fixed-mac-address: -\n"));
        assert!(text.contains("    bytes-size: 1048576 (1.000M)\n    bytes-used: 0 (0.000B)\n"));
    }

    #[test]
    fn hostile_disk_name_has_no_system_path() {
        let (_d, guest) = guest_with("disk0_type=virtio-blk\ndisk0_name=../../etc/passwd\n");
        let info = gather(&guest);
        assert_eq!(info.virtual_disks[0].system_path, None);
        assert_eq!(info.virtual_disks[0].bytes_size, None);
        assert_eq!(info.errors.len(), 1);
    }

    #[test]
    fn bad_value_is_reported_not_fatal() {
        let (_d, guest) = guest_with("cpu=1\nmemory=\"lots\"\n");
        let info = gather(&guest);
        assert_eq!(info.memory.as_deref(), Some("lots"));
        assert_eq!(info.errors.len(), 1);
        assert!(info.errors[0].ends_with("g.conf:2: memory: \"lots\" is not a size (a number with an optional K, M, G or T suffix)"), "{:?}", info.errors);
    }
}
