//! The typed guest config: a vm-bhyve guest or template file read through [`Conf`] and
//! checked key by key.
//!
//! Three outcomes per key, as the vm-bhyve format promises that a vm-bhyve template works
//! unchanged:
//! - a value vm-bhyve/bhyve would also reject (`memory="lots"`, `cpu=0`,
//!   `graphics_res="7x7"`) is an error naming file, line and key;
//! - a key or value vm-bhyve accepts but capvm does not implement yet (see [`KEYS`]) is a
//!   warning naming it, and is ignored;
//! - everything else fills [`GuestConfig`].
//!
//! An empty value counts as unset, as it does in vm-bhyve's `[ -z ... ]` checks.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

mod keys;
mod values;

pub use self::keys::{KEYS, KeySpec, Support, lookup_key};
pub use self::values::{
    DEFAULT_RES, MAX_CPUS, MAX_MEMORY, MAX_RES, MIN_RES, MacAddr, parse_cpu, parse_disk_size,
    parse_memory, parse_resolution, yesno,
};
use self::values::{parse_port, parse_seconds};
pub use crate::conf::Diagnostic;
use crate::conf::{Conf, ConfError};

/// The longest `linux_cmdline` (the x86 boot protocol's `COMMAND_LINE_SIZE` less the NUL).
pub const MAX_CMDLINE: usize = 2047;

/// Why a guest config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GuestConfigError {
    #[error(transparent)]
    Load(#[from] ConfError),
    #[error("{}", summary(errors))]
    Invalid {
        errors: Vec<Diagnostic>,
        warnings: Vec<Diagnostic>,
    },
}

fn summary(errors: &[Diagnostic]) -> String {
    match errors {
        [] => "invalid config".to_owned(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more errors)", rest.len()),
    }
}

/// How the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loader {
    Uefi,
    Linux,
    Bhyveload,
    Grub,
    UefiCsm,
    UefiCustom,
}

impl Loader {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "uefi" => Loader::Uefi,
            "linux" => Loader::Linux,
            "bhyveload" => Loader::Bhyveload,
            "grub" => Loader::Grub,
            "uefi-csm" => Loader::UefiCsm,
            "uefi-custom" => Loader::UefiCustom,
            other => {
                return Err(format!(
                    "unknown loader {other:?} (expected uefi, linux, bhyveload, grub, uefi-csm or uefi-custom)"
                ));
            }
        })
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Loader::Uefi => "uefi",
            Loader::Linux => "linux",
            Loader::Bhyveload => "bhyveload",
            Loader::Grub => "grub",
            Loader::UefiCsm => "uefi-csm",
            Loader::UefiCustom => "uefi-custom",
        }
    }

    /// Whether capvm can boot with it.
    pub fn is_supported(self) -> bool {
        matches!(self, Loader::Uefi | Loader::Linux)
    }
}

/// capvm's direct kernel boot (`loader="linux"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LinuxBoot {
    /// As written; relative paths are relative to the guest directory.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// `diskN_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskEmulation {
    VirtioBlk,
    AhciHd,
    AhciCd,
    Nvme,
    VirtioScsi,
}

impl DiskEmulation {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "virtio-blk" => DiskEmulation::VirtioBlk,
            "ahci-hd" => DiskEmulation::AhciHd,
            "ahci-cd" => DiskEmulation::AhciCd,
            "nvme" => DiskEmulation::Nvme,
            "virtio-scsi" => DiskEmulation::VirtioScsi,
            other => {
                return Err(format!(
                    "unknown disk emulation {other:?} (expected virtio-blk, ahci-hd, ahci-cd, nvme or virtio-scsi)"
                ));
            }
        })
    }
}

/// `diskN_dev`: what backs the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskDev {
    File,
    Custom,
    Zvol,
    SparseZvol,
    Iscsi,
}

impl DiskDev {
    /// Parses a `diskN_dev` value.
    pub fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "file" => DiskDev::File,
            "custom" => DiskDev::Custom,
            "zvol" => DiskDev::Zvol,
            "sparse-zvol" => DiskDev::SparseZvol,
            "iscsi" => DiskDev::Iscsi,
            other => {
                return Err(format!(
                    "unknown disk device type {other:?} (expected file, custom, zvol, sparse-zvol or iscsi)"
                ));
            }
        })
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            DiskDev::File => "file",
            DiskDev::Custom => "custom",
            DiskDev::Zvol => "zvol",
            DiskDev::SparseZvol => "sparse-zvol",
            DiskDev::Iscsi => "iscsi",
        }
    }
}

/// One `diskN_*` group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    pub index: u32,
    pub emulation: DiskEmulation,
    pub dev: DiskDev,
    pub name: String,
    /// `diskN_size` in bytes (templates).
    pub size: Option<u64>,
    /// `diskN_opts`.
    pub opts: DiskOpts,
}

/// `diskN_opts`: bhyve's block device options, comma separated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskOpts {
    /// `ro`: the guest sees a read-only disk; the image is opened read-only.
    pub read_only: bool,
    /// `direct`: the image is opened `O_DIRECT` (no host page cache).
    pub direct: bool,
    /// `nocache`: the image is opened `O_DIRECT` as well (see [`DiskOpts::parse`]).
    pub nocache: bool,
    /// `sectorsize=L[/P]`: the logical block size the guest sees (the physical one is
    /// checked and not passed on).
    pub sectorsize: Option<u32>,
}

impl DiskOpts {
    /// Parses a `diskN_opts` value. bhyve's `nocache` skips the host cache for reads and
    /// `direct` makes writes synchronous; capvm opens the image `O_DIRECT` for either, which
    /// covers both (every flush still reaches `fdatasync`). `nodelete` is accepted and has no
    /// effect yet (discards always punch holes).
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut opts = DiskOpts::default();
        for word in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "ro" => opts.read_only = true,
                "direct" => opts.direct = true,
                "nocache" => opts.nocache = true,
                "nodelete" => {}
                _ => {
                    let Some(sizes) = word.strip_prefix("sectorsize=") else {
                        return Err(format!(
                            "unknown disk option {word:?} (expected ro, direct, nocache, nodelete or sectorsize=)"
                        ));
                    };
                    let mut parts = sizes.splitn(2, '/');
                    let logical = parse_sector_size(parts.next().unwrap_or_default())?;
                    if let Some(physical) = parts.next() {
                        let physical = parse_sector_size(physical)?;
                        if physical < logical {
                            return Err(format!(
                                "sectorsize={sizes}: the physical size is smaller than the logical one"
                            ));
                        }
                    }
                    opts.sectorsize = Some(logical);
                }
            }
        }
        Ok(opts)
    }
}

/// A sector size: a power of two in 512..=4096 (what virtio-blk's `blk_size` may offer).
fn parse_sector_size(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if (512..=4096).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(format!(
            "sector size {text:?} is not a power of two in 512..=4096"
        )),
    }
}

impl Disk {
    /// Where the disk lives on the host, for the backings capvm supports.
    pub fn path(&self, guest_dir: &Path) -> Option<PathBuf> {
        disk_path(self.dev, &self.name, guest_dir)
    }
}

/// The host path of a disk called `name` with backing `dev`, for `file` (a plain file name
/// inside the guest directory) and `custom` (an absolute path). `None` for anything else,
/// so a hostile `disk0_name="../../x"` never names a file outside the guest directory.
pub fn disk_path(dev: DiskDev, name: &str, guest_dir: &Path) -> Option<PathBuf> {
    match dev {
        DiskDev::File => is_plain_file_name(name).then(|| guest_dir.join(name)),
        DiskDev::Custom => Path::new(name).is_absolute().then(|| PathBuf::from(name)),
        DiskDev::Zvol | DiskDev::SparseZvol | DiskDev::Iscsi => None,
    }
}

/// A file name with no directory part.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// `networkN_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicEmulation {
    VirtioNet,
    E1000,
}

/// One `networkN_*` group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub index: u32,
    pub emulation: NicEmulation,
    pub switch: Option<String>,
    pub mac: Option<MacAddr>,
    /// `networkN_device`: an existing tap to attach instead of creating one.
    pub device: Option<String>,
    /// `networkN_queues`: virtio-net queue pairs (default one).
    pub queues: NicQueues,
}

/// `networkN_queues`: how many virtio-net queue pairs (and tap queues) a NIC has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NicQueues {
    /// This many, 1..=[`proto::device::MAX_NET_QUEUE_PAIRS`].
    Count(u16),
    /// One per vCPU (at most [`proto::device::MAX_NET_QUEUE_PAIRS`]).
    Cpus,
}

impl Default for NicQueues {
    /// One pair: multi-queue was not faster where it was measured (see README).
    fn default() -> Self {
        NicQueues::Count(1)
    }
}

impl NicQueues {
    /// Parses `cpus` or a number of pairs, 1..=[`proto::device::MAX_NET_QUEUE_PAIRS`].
    pub fn parse(v: &str) -> Result<NicQueues, String> {
        let max = proto::device::MAX_NET_QUEUE_PAIRS;
        if v == "cpus" {
            return Ok(NicQueues::Cpus);
        }
        match v.parse::<u16>() {
            Ok(n) if (1..=max).contains(&n) => Ok(NicQueues::Count(n)),
            _ => Err(format!(
                "queues {v:?} is not cpus or a number of queue pairs from 1 to {max}"
            )),
        }
    }

    /// The pairs for a guest with `cpus` vCPUs.
    pub fn pairs(self, cpus: u32) -> u16 {
        let max = proto::device::MAX_NET_QUEUE_PAIRS;
        match self {
            NicQueues::Count(n) => n.clamp(1, max),
            NicQueues::Cpus => u16::try_from(cpus).unwrap_or(max).clamp(1, max),
        }
    }
}

/// `graphics_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphicsWait {
    No,
    Yes,
    Auto,
}

/// The frame buffer and its VNC console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Graphics {
    pub enabled: bool,
    pub port: Option<u16>,
    pub listen: Option<IpAddr>,
    pub width: u32,
    pub height: u32,
    pub wait: GraphicsWait,
    pub xhci_mouse: bool,
    /// `vnc_password`: VNC Authentication, 1 to 8 printable ASCII characters. Never
    /// serialised (`vm info --json`) and never logged.
    #[serde(skip)]
    pub password: Option<String>,
}

impl Default for Graphics {
    fn default() -> Self {
        Graphics {
            enabled: false,
            port: None,
            listen: None,
            width: DEFAULT_RES.0,
            height: DEFAULT_RES.1,
            wait: GraphicsWait::Auto,
            xhci_mouse: false,
            password: None,
        }
    }
}

/// What the supervisor does when the guest faults or its vcpu-runner crashes (`on_fault`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFault {
    /// End the guest, as a poweroff would (vm-bhyve's behaviour for a bhyve error exit).
    #[default]
    Stop,
    /// Boot the guest again, as a reboot would.
    Restart,
}

impl OnFault {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "stop" => Ok(OnFault::Stop),
            "restart" => Ok(OnFault::Restart),
            other => Err(format!(
                "unknown on_fault {other:?} (expected stop or restart)"
            )),
        }
    }
}

/// A guest config, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestConfig {
    /// `loader`, or `uefi="yes"` when `loader` is unset.
    pub loader: Option<Loader>,
    pub cpu: Option<u32>,
    /// Bytes.
    pub memory: Option<u64>,
    pub utctime: bool,
    #[serde(serialize_with = "serialize_uuid")]
    pub uuid: Option<uuid::Uuid>,
    pub loader_timeout: Option<u32>,
    /// `on_fault`: what a guest fault or runner crash does.
    pub on_fault: OnFault,
    /// `stop_timeout`: seconds `vm stop` waits before forcing the guest off.
    pub stop_timeout: Option<u32>,
    pub linux: LinuxBoot,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub graphics: Graphics,
}

#[allow(
    clippy::ref_option,
    reason = "the signature serde's serialize_with calls"
)]
fn serialize_uuid<S: serde::Serializer>(
    uuid: &Option<uuid::Uuid>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match uuid {
        Some(u) => s.collect_str(u),
        None => s.serialize_none(),
    }
}

/// A usable config and what was ignored in it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub config: GuestConfig,
    pub warnings: Vec<Diagnostic>,
}

impl GuestConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Parsed, GuestConfigError> {
        let conf = Conf::load(path)?;
        GuestConfig::from_conf(&conf, path)
    }

    /// Checks `conf`, read from `file` (named in every diagnostic).
    pub fn from_conf(conf: &Conf, file: &Path) -> Result<Parsed, GuestConfigError> {
        let mut p = Checker {
            conf,
            file,
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        let config = p.check();
        p.errors.sort_by_key(|d| d.line);
        p.warnings.sort_by_key(|d| d.line);
        if p.errors.is_empty() {
            Ok(Parsed {
                config,
                warnings: p.warnings,
            })
        } else {
            Err(GuestConfigError::Invalid {
                errors: p.errors,
                warnings: p.warnings,
            })
        }
    }
}

struct Checker<'a> {
    conf: &'a Conf,
    file: &'a Path,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn diagnostic(&self, line: usize, key: &str, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.to_owned(),
            line,
            key: key.to_owned(),
            message,
        }
    }

    fn warn(&mut self, line: usize, key: &str, message: String) {
        let d = self.diagnostic(line, key, message);
        self.warnings.push(d);
    }

    fn error(&mut self, line: usize, key: &str, message: String) {
        let d = self.diagnostic(line, key, message);
        self.errors.push(d);
    }

    /// The non-empty value of `key` and its line.
    fn value(&self, key: &str) -> Option<(&str, usize)> {
        self.conf
            .entry(key)
            .filter(|e| !e.value.is_empty())
            .map(|e| (e.value.as_str(), e.line))
    }

    /// Parses `key` with `parse`; a failure is an error at its line.
    fn typed<T>(&mut self, key: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let (value, line) = self.value(key)?;
        match parse(value) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(line, key, message);
                None
            }
        }
    }

    fn flag(&self, key: &str, default: bool) -> bool {
        self.value(key).map_or(default, |(v, _)| yesno(v))
    }

    fn check(&mut self) -> GuestConfig {
        self.check_lines();
        let disk_count = self.count_devices("disk", &["_name", "_type"]);
        let nic_count = self.count_devices("network", &["_type"]);
        self.check_unreached(disk_count, nic_count);

        let loader = self.check_loader();
        let linux = self.check_linux(loader);
        let graphics = self.check_graphics();
        let disks = (0..disk_count).filter_map(|n| self.check_disk(n)).collect();
        let nics = (0..nic_count).filter_map(|n| self.check_nic(n)).collect();
        GuestConfig {
            loader,
            cpu: self.typed("cpu", parse_cpu),
            memory: self.typed("memory", parse_memory),
            utctime: self.flag("utctime", true),
            uuid: self.typed("uuid", |v| {
                uuid::Uuid::parse_str(v).map_err(|_| format!("{v:?} is not a UUID"))
            }),
            loader_timeout: self.typed("loader_timeout", parse_seconds),
            on_fault: self.typed("on_fault", OnFault::parse).unwrap_or_default(),
            stop_timeout: self.typed("stop_timeout", |v| {
                let secs = parse_seconds(v)?;
                if secs > proto::control::MAX_STOP_TIMEOUT_SECS {
                    return Err(format!(
                        "{v:?} is over {} seconds",
                        proto::control::MAX_STOP_TIMEOUT_SECS
                    ));
                }
                Ok(secs)
            }),
            linux,
            disks,
            nics,
            graphics,
        }
    }

    /// Warnings that concern lines rather than values: stray lines, repeats, unknown and
    /// unimplemented keys.
    fn check_lines(&mut self) {
        let conf = self.conf;
        for (line, text) in conf.stray_lines() {
            self.warn(*line, text, "line has no '=' and is ignored".to_owned());
        }
        for entry in conf.entries() {
            let first = conf.entry(&entry.key).map_or(entry.line, |e| e.line);
            if first != entry.line {
                self.warn(
                    entry.line,
                    &entry.key,
                    format!("repeats line {first}; the first value is used"),
                );
                continue;
            }
            match lookup_key(&entry.key) {
                None => self.warn(entry.line, &entry.key, "unknown key, ignored".to_owned()),
                Some((spec, _)) if spec.support == Support::No && !entry.value.is_empty() => {
                    self.warn(
                        entry.line,
                        &entry.key,
                        "not implemented in capvm yet, ignored".to_owned(),
                    );
                }
                Some(_) => {}
            }
        }
    }

    /// How many devices `prefix0`, `prefix1`, ... exist without a gap; a device exists when
    /// any of `fields` is set, as vm-bhyve stops at the first missing one.
    fn count_devices(&self, prefix: &str, fields: &[&str]) -> u32 {
        let mut n = 0u32;
        while fields
            .iter()
            .any(|f| self.value(&format!("{prefix}{n}{f}")).is_some())
        {
            n = n.saturating_add(1);
        }
        n
    }

    fn check_unreached(&mut self, disk_count: u32, nic_count: u32) {
        let conf = self.conf;
        for entry in conf.effective_entries() {
            let Some((spec, Some(n))) = lookup_key(&entry.key) else {
                continue;
            };
            let (kind, count) = if spec.key.starts_with("diskN_") {
                ("disk", disk_count)
            } else if spec.key.starts_with("networkN_") {
                ("network", nic_count)
            } else {
                continue;
            };
            if n >= count && !entry.value.is_empty() {
                self.warn(
                    entry.line,
                    &entry.key,
                    format!(
                        "ignored: {kind}{count} is not defined, and {kind}s are numbered from 0 without gaps"
                    ),
                );
            }
        }
    }

    fn check_loader(&mut self) -> Option<Loader> {
        let loader = self.typed("loader", Loader::parse);
        let uefi = self.value("uefi").map(|(v, line)| (v.to_owned(), line));
        let effective = match (loader, uefi) {
            (Some(l), Some((u, line))) if yesno(&u) && !matches!(l, Loader::Uefi) => {
                self.warn(
                    line,
                    "uefi",
                    format!("ignored because loader is {}", l.name()),
                );
                Some(l)
            }
            (Some(l), _) => Some(l),
            (None, Some((u, _))) if u.eq_ignore_ascii_case("csm") => Some(Loader::UefiCsm),
            (None, Some((u, _))) if yesno(&u) => Some(Loader::Uefi),
            (None, _) => None,
        };
        if let Some(l) = effective.filter(|l| !l.is_supported()) {
            let (key, line) = if loader.is_some() {
                ("loader", self.value("loader").map_or(0, |(_, line)| line))
            } else {
                ("uefi", self.value("uefi").map_or(0, |(_, line)| line))
            };
            self.warn(
                line,
                key,
                format!(
                    "loader {} is not supported by capvm (it boots uefi and linux)",
                    l.name()
                ),
            );
        }
        effective
    }

    fn check_linux(&mut self, loader: Option<Loader>) -> LinuxBoot {
        let path = |v: &str| -> Result<PathBuf, String> {
            if v.contains('\0') {
                return Err("path contains a NUL byte".to_owned());
            }
            Ok(PathBuf::from(v))
        };
        let linux = LinuxBoot {
            kernel: self.typed("linux_kernel", path),
            initrd: self.typed("linux_initrd", path),
            cmdline: self.typed("linux_cmdline", |v| {
                if v.len() > MAX_CMDLINE {
                    Err(format!("longer than {MAX_CMDLINE} bytes"))
                } else {
                    Ok(v.to_owned())
                }
            }),
        };
        if loader == Some(Loader::Linux) {
            if linux.kernel.is_none() && self.value("linux_kernel").is_none() {
                let line = self.value("loader").map_or(0, |(_, l)| l);
                self.error(
                    line,
                    "loader",
                    "loader is linux but linux_kernel is not set".to_owned(),
                );
            }
        } else {
            for key in ["linux_kernel", "linux_initrd", "linux_cmdline"] {
                if let Some((_, line)) = self.value(key) {
                    self.warn(line, key, "ignored unless loader is linux".to_owned());
                }
            }
        }
        linux
    }

    fn check_graphics(&mut self) -> Graphics {
        let (width, height) = self
            .typed("graphics_res", parse_resolution)
            .unwrap_or(DEFAULT_RES);
        Graphics {
            enabled: self.flag("graphics", false),
            port: self.typed("graphics_port", parse_port),
            listen: self.typed("graphics_listen", |v| {
                v.parse::<IpAddr>()
                    .map_err(|_| format!("{v:?} is not an IP address"))
            }),
            width,
            height,
            wait: self
                .value("graphics_wait")
                .map_or(GraphicsWait::Auto, |(v, _)| {
                    if v.eq_ignore_ascii_case("auto") {
                        GraphicsWait::Auto
                    } else if yesno(v) {
                        GraphicsWait::Yes
                    } else {
                        GraphicsWait::No
                    }
                }),
            xhci_mouse: self.flag("xhci_mouse", false),
            password: self.typed("vnc_password", |v| {
                if v.is_empty() || v.len() > 8 || !v.bytes().all(|b| (b' '..=b'~').contains(&b)) {
                    Err("must be 1 to 8 printable ASCII characters (VNC Authentication uses at most 8)".to_owned())
                } else {
                    Ok(v.to_owned())
                }
            }),
        }
    }

    fn check_disk(&mut self, n: u32) -> Option<Disk> {
        let type_key = format!("disk{n}_type");
        let name_key = format!("disk{n}_name");
        let dev_key = format!("disk{n}_dev");
        let size_key = format!("disk{n}_size");
        let emulation = self.typed(&type_key, DiskEmulation::parse);
        let dev = self.typed(&dev_key, DiskDev::parse);
        let size = self.typed(&size_key, parse_disk_size);
        let opts = self
            .typed(&format!("disk{n}_opts"), DiskOpts::parse)
            .unwrap_or_default();
        let name = self.value(&name_key).map(|(v, l)| (v.to_owned(), l));
        let type_line = self.value(&type_key).map(|(_, l)| l);
        let (Some((name, name_line)), Some(type_line)) = (name, type_line) else {
            let (present, missing, line) = match (self.value(&name_key), type_line) {
                (Some((_, l)), _) => (&name_key, &type_key, l),
                (None, Some(l)) => (&type_key, &name_key, l),
                (None, None) => return None,
            };
            self.error(
                line,
                present,
                format!("{missing} is not set; a disk needs both type and name"),
            );
            return None;
        };
        let dev_value = dev.unwrap_or(DiskDev::File);
        match dev_value {
            DiskDev::File if !is_plain_file_name(&name) => {
                self.error(
                    name_line,
                    &name_key,
                    format!("{name:?} must be a file name in the guest directory"),
                );
            }
            DiskDev::Custom if !Path::new(&name).is_absolute() => {
                self.error(
                    name_line,
                    &name_key,
                    format!("{name:?} must be an absolute path with {dev_key}=custom"),
                );
            }
            DiskDev::Zvol | DiskDev::SparseZvol | DiskDev::Iscsi => {
                let line = self.value(&dev_key).map_or(0, |(_, l)| l);
                self.warn(
                    line,
                    &dev_key,
                    format!("{} disks are not supported by capvm", dev_value.name()),
                );
            }
            _ => {}
        }
        let emulation = emulation?;
        if emulation != DiskEmulation::VirtioBlk {
            let value = self
                .value(&type_key)
                .map(|(v, _)| v.to_owned())
                .unwrap_or_default();
            self.warn(
                type_line,
                &type_key,
                format!("{value} is not supported by capvm (virtio-blk only)"),
            );
        }
        Some(Disk {
            index: n,
            emulation,
            dev: dev_value,
            name,
            size,
            opts,
        })
    }

    fn check_nic(&mut self, n: u32) -> Option<Nic> {
        let type_key = format!("network{n}_type");
        let emulation = self.typed(&type_key, |v| match v {
            "virtio-net" => Ok(NicEmulation::VirtioNet),
            "e1000" => Ok(NicEmulation::E1000),
            other => Err(format!(
                "unknown network emulation {other:?} (expected virtio-net or e1000)"
            )),
        });
        let mac = self.typed(&format!("network{n}_mac"), MacAddr::parse);
        let switch = self
            .value(&format!("network{n}_switch"))
            .map(|(v, _)| v.to_owned());
        let device = self.typed(&format!("network{n}_device"), |v| {
            proto::netcfg::validate_ifname(v)
                .map(|()| v.to_owned())
                .map_err(|e| e.to_string())
        });
        let queues = self
            .typed(&format!("network{n}_queues"), NicQueues::parse)
            .unwrap_or_default();
        let emulation = emulation?;
        if emulation == NicEmulation::E1000 {
            let line = self.value(&type_key).map_or(0, |(_, l)| l);
            self.warn(
                line,
                &type_key,
                "e1000 is not supported by capvm (virtio-net only)".to_owned(),
            );
        }
        Some(Nic {
            index: n,
            emulation,
            switch,
            mac,
            device,
            queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Parsed, GuestConfigError> {
        GuestConfig::from_conf(&Conf::parse(text), Path::new("/vm/g/g.conf"))
    }

    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Err(GuestConfigError::Invalid { errors, .. }) => {
                errors.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected errors, got {other:?}"),
        }
    }

    fn warnings(text: &str) -> Vec<String> {
        parse(text)
            .unwrap()
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const SEED: &str = include_str!("../templates/freebsd-uefi.conf");

    #[test]
    fn on_fault_and_stop_timeout_are_read_and_checked() {
        let c = parse("on_fault=\"restart\"\nstop_timeout=90\n")
            .unwrap()
            .config;
        assert_eq!((c.on_fault, c.stop_timeout), (OnFault::Restart, Some(90)));
        let c = parse("cpu=1\n").unwrap().config;
        assert_eq!((c.on_fault, c.stop_timeout), (OnFault::Stop, None));

        let errs = errors("on_fault=maybe\nstop_timeout=3601\n");

        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].ends_with(
                "g.conf:1: on_fault: unknown on_fault \"maybe\" (expected stop or restart)"
            ),
            "{errs:?}"
        );
        assert!(
            errs[1].ends_with("g.conf:2: stop_timeout: \"3601\" is over 3600 seconds"),
            "{errs:?}"
        );
    }

    #[test]
    fn seed_template_parses_without_warnings() {
        let parsed = parse(SEED).unwrap();
        assert_eq!(parsed.warnings, vec![]);
        let c = parsed.config;
        assert_eq!(c.loader, Some(Loader::Uefi));
        assert_eq!(c.cpu, Some(4));
        assert_eq!(c.memory, Some(4 << 30));
        assert!(c.utctime);
        assert_eq!(c.loader_timeout, Some(5));
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.disks[0].emulation, DiskEmulation::VirtioBlk);
        assert_eq!(c.disks[0].size, Some(64 << 30));
        assert_eq!(c.disks[0].name, "disk0.img");
        assert_eq!(c.nics.len(), 1);
        assert_eq!(c.nics[0].switch.as_deref(), Some("public"));
        assert!(c.graphics.enabled);
        assert_eq!(c.graphics.port, Some(5900));
        assert_eq!((c.graphics.width, c.graphics.height), (1600, 900));
        assert!(c.graphics.xhci_mouse);
    }

    #[test]
    fn shipped_templates_parse_without_warnings() {
        for text in [
            include_str!("../templates/default.conf"),
            include_str!("../templates/linux.conf"),
        ] {
            assert_eq!(parse(text).unwrap().warnings, vec![]);
        }
    }

    #[test]
    fn memory_lots_is_an_error_naming_file_line_and_key() {
        let errs = errors("cpu=1\nmemory=\"lots\"\n");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("/vm/g/g.conf:2: memory: "),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn cpu_zero_is_an_error() {
        let errs = errors("\ncpu=0\n");
        assert!(errs[0].starts_with("/vm/g/g.conf:2: cpu: "), "{}", errs[0]);
    }

    #[test]
    fn a_vnc_password_is_kept_out_of_json_and_bounded() {
        let parsed = parse("graphics=\"yes\"\nvnc_password=\"s3cret\"\n").unwrap();
        assert_eq!(parsed.config.graphics.password.as_deref(), Some("s3cret"));
        let json = serde_json::to_string(&parsed.config.graphics).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        let errs = errors("vnc_password=\"123456789\"\n");
        assert!(
            errs[0].starts_with("/vm/g/g.conf:1: vnc_password: "),
            "{}",
            errs[0]
        );
        assert!(
            !errs[0].contains("123456789"),
            "the password is echoed: {}",
            errs[0]
        );
    }

    #[test]
    fn tiny_resolution_is_an_error() {
        let errs = errors("graphics_res=\"7x7\"\n");
        assert!(
            errs[0].starts_with("/vm/g/g.conf:1: graphics_res: "),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn all_bad_values_are_reported_not_just_the_first() {
        let errs = errors(
            "cpu=x\nmemory=lots\ngraphics_port=0\nuuid=nope\nnetwork0_type=virtio-net\nnetwork0_mac=01:00:00:00:00:01\n",
        );
        assert_eq!(errs.len(), 5, "{errs:?}");
    }

    #[test]
    fn network_queues_are_a_pair_count_or_cpus_and_default_to_one() {
        let c = parse(
            "cpu=4\nnetwork0_type=virtio-net\nnetwork1_type=virtio-net\nnetwork1_queues=cpus\n\
             network2_type=virtio-net\nnetwork2_queues=\"3\"\n",
        )
        .unwrap()
        .config;
        let queues: Vec<NicQueues> = c.nics.iter().map(|n| n.queues).collect();
        assert_eq!(
            queues,
            [NicQueues::Count(1), NicQueues::Cpus, NicQueues::Count(3)]
        );
        assert_eq!(NicQueues::Cpus.pairs(4), 4);
        assert_eq!(
            NicQueues::Cpus.pairs(64),
            proto::device::MAX_NET_QUEUE_PAIRS
        );
        assert_eq!(NicQueues::Count(2).pairs(1), 2);
        for bad in ["0", "8", "-1", "two"] {
            let errs = errors(&format!(
                "network0_type=virtio-net\nnetwork0_queues=\"{bad}\"\n"
            ));
            assert_eq!(errs.len(), 1, "{bad:?}: {errs:?}");
            assert!(
                errs[0].starts_with("/vm/g/g.conf:2: network0_queues: queues "),
                "{}",
                errs[0]
            );
        }
    }

    #[test]
    fn invalid_error_display_summarises_the_rest() {
        let err = parse("cpu=x\nmemory=lots\n").unwrap_err();
        assert!(err.to_string().ends_with("(and 1 more errors)"), "{err}");
    }

    #[test]
    fn unknown_key_is_a_warning_naming_it() {
        let w = warnings("cpu=1\nfrobnicate=yes\n");
        assert_eq!(w, vec!["/vm/g/g.conf:2: frobnicate: unknown key, ignored"]);
    }

    #[test]
    fn unimplemented_key_is_a_warning_naming_it() {
        let w = warnings("cpu=1\npassthru0=\"3/0/0\"\n");
        assert_eq!(
            w,
            vec!["/vm/g/g.conf:2: passthru0: not implemented in capvm yet, ignored"]
        );
    }

    #[test]
    fn repeated_key_is_a_warning_and_first_wins() {
        let parsed = parse("cpu=2\ncpu=3\n").unwrap();
        assert_eq!(parsed.config.cpu, Some(2));
        assert_eq!(parsed.warnings.len(), 1);
        assert_eq!(parsed.warnings[0].line, 2);
    }

    #[test]
    fn empty_value_counts_as_unset() {
        let parsed = parse("loader=\"\"\ncpu=\"\"\nuuid=\"\"\npassthru0=\"\"\n").unwrap();
        assert_eq!(parsed.config.loader, None);
        assert_eq!(parsed.config.cpu, None);
        assert_eq!(parsed.warnings, vec![]);
    }

    #[test]
    fn loader_key_wins_over_uefi() {
        let parsed = parse("loader=\"linux\"\nlinux_kernel=k\nuefi=yes\n").unwrap();
        assert_eq!(parsed.config.loader, Some(Loader::Linux));
        assert_eq!(parsed.warnings.len(), 1);
        assert_eq!(parsed.warnings[0].key, "uefi");
    }

    #[test]
    fn unsupported_loader_is_a_warning() {
        let w = warnings("loader=\"grub\"\n");
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("loader: loader grub is not supported"),
            "{w:?}"
        );
        assert_eq!(
            parse("uefi=csm\n").unwrap().config.loader,
            Some(Loader::UefiCsm)
        );
    }

    #[test]
    fn unknown_loader_is_an_error() {
        assert!(errors("loader=\"floppy\"\n")[0].contains(":1: loader: "));
    }

    #[test]
    fn linux_loader_needs_a_kernel() {
        let errs = errors("cpu=1\nloader=linux\n");
        assert!(errs[0].starts_with("/vm/g/g.conf:2: loader: "), "{errs:?}");
    }

    #[test]
    fn linux_keys_without_linux_loader_are_warned() {
        let w = warnings("loader=uefi\nlinux_kernel=vmlinuz\n");
        assert!(w[0].contains("linux_kernel: ignored unless loader is linux"));
    }

    #[test]
    fn disk_name_escaping_guest_dir_is_an_error() {
        let errs = errors("disk0_type=virtio-blk\ndisk0_name=\"../other/disk0.img\"\n");
        assert!(errs[0].contains(":2: disk0_name: "), "{errs:?}");
        let errs = errors("disk0_type=virtio-blk\ndisk0_name=\"..\"\n");
        assert_eq!(errs.len(), 1);
    }

    #[test]
    fn custom_disk_needs_absolute_path() {
        let p = parse("disk0_type=virtio-blk\ndisk0_dev=custom\ndisk0_name=/dev/sdb\n").unwrap();
        assert_eq!(
            p.config.disks[0].path(Path::new("/g")),
            Some(PathBuf::from("/dev/sdb"))
        );
        assert!(!errors("disk0_type=virtio-blk\ndisk0_dev=custom\ndisk0_name=sdb\n").is_empty());
    }

    #[test]
    fn disk_with_name_but_no_type_is_an_error() {
        let errs = errors("disk0_name=disk0.img\n");
        assert!(
            errs[0].contains(":1: disk0_name: disk0_type is not set"),
            "{errs:?}"
        );
    }

    #[test]
    fn devices_after_a_gap_are_warned_and_ignored() {
        let p = parse(
            "disk0_type=virtio-blk\ndisk0_name=a.img\ndisk2_type=virtio-blk\ndisk2_name=c.img\n",
        )
        .unwrap();
        assert_eq!(p.config.disks.len(), 1);
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings[0].message.contains("disk1 is not defined"));
    }

    #[test]
    fn unsupported_emulations_are_warnings() {
        let p = parse(
            "disk0_type=ahci-hd\ndisk0_name=a.img\nnetwork0_type=e1000\ndisk1_type=virtio-blk\ndisk1_name=z\ndisk1_dev=zvol\n",
        )
        .unwrap();
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
        assert_eq!(p.config.disks.len(), 2);
        assert_eq!(p.config.disks[1].path(Path::new("/g")), None);
    }

    #[test]
    fn disk_opts_are_read() {
        let p = parse(
            "disk0_type=virtio-blk\ndisk0_name=a.img\ndisk0_opts=\"ro,direct, sectorsize=4096/4096\"\ndisk1_type=virtio-blk\ndisk1_name=b.img\n",
        )
        .unwrap();
        let want = DiskOpts {
            read_only: true,
            direct: true,
            nocache: false,
            sectorsize: Some(4096),
        };
        assert_eq!(p.config.disks[0].opts, want);
        assert_eq!(p.config.disks[1].opts, DiskOpts::default());
        assert_eq!(p.warnings, vec![]);
    }

    #[test]
    fn bad_disk_opts_are_errors_naming_the_key() {
        let errs = errors("disk0_type=virtio-blk\ndisk0_name=a.img\ndisk0_opts=\"fast\"\n");
        assert!(
            errs[0].contains(":3: disk0_opts: unknown disk option \"fast\""),
            "{errs:?}"
        );
        for bad in [
            "sectorsize=1000",
            "sectorsize=8192",
            "sectorsize=4096/512",
            "sectorsize=",
        ] {
            assert!(DiskOpts::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            DiskOpts::parse("nocache,nodelete").map(|o| o.nocache),
            Ok(true)
        );
    }

    #[test]
    fn stray_line_is_a_warning() {
        let w = warnings("cpu=1\ngraphics\n");
        assert_eq!(
            w,
            vec!["/vm/g/g.conf:2: graphics: line has no '=' and is ignored"]
        );
    }

    mod props {
        use std::fmt::Write as _;

        use super::super::*;
        use proptest::prelude::*;

        fn known_key() -> impl Strategy<Value = String> {
            (proptest::sample::select(KEYS), 0u32..3)
                .prop_map(|(spec, n)| spec.key.replace('N', &n.to_string()))
        }

        proptest! {
            #[test]
            fn any_text_never_panics(text in any::<String>()) {
                let _ = GuestConfig::from_conf(&Conf::parse(&text), Path::new("f"));
            }

            #[test]
            fn known_keys_with_any_values_never_panic(
                lines in proptest::collection::vec((known_key(), "[ -~]{0,24}"), 0..40)
            ) {
                let text: String = lines.iter().fold(String::new(), |mut t, (k, v)| {
                    let _ = writeln!(t, "{k}={v}");
                    t
                });
                match GuestConfig::from_conf(&Conf::parse(&text), Path::new("f")) {
                    Ok(_) => {}
                    Err(GuestConfigError::Invalid { errors, .. }) => {
                        prop_assert!(!errors.is_empty());
                        for e in errors {
                            prop_assert!(e.line >= 1, "{e}");
                        }
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }

            #[test]
            fn valid_generated_configs_round_trip(
                cpu in 1u32..=MAX_CPUS,
                mem_mb in 1u64..65536,
                disks in proptest::collection::vec(1u64..1_000_000, 0..4),
                nics in proptest::collection::vec(any::<[u8; 3]>(), 0..4),
            ) {
                let mut text = format!("loader=\"uefi\"\ncpu={cpu}\nmemory=\"{mem_mb}M\"\n");
                for (i, size) in disks.iter().enumerate() {
                    let _ = write!(text, "disk{i}_type=\"virtio-blk\"\ndisk{i}_name=\"disk{i}.img\"\ndisk{i}_size=\"{size}K\"\n");
                }
                for (i, tail) in nics.iter().enumerate() {
                    let mac = MacAddr([0x58, 0x9c, 0xfc, tail[0], tail[1], tail[2]]);
                    let _ = write!(text, "network{i}_type=\"virtio-net\"\nnetwork{i}_switch=\"sw{i}\"\nnetwork{i}_mac=\"{mac}\"\n");
                }
                let parsed = GuestConfig::from_conf(&Conf::parse(&text), Path::new("f")).unwrap();
                prop_assert_eq!(parsed.warnings, vec![]);
                let c = parsed.config;
                prop_assert_eq!(c.cpu, Some(cpu));
                prop_assert_eq!(c.memory, Some(mem_mb << 20));
                prop_assert_eq!(c.disks.len(), disks.len());
                for (d, size) in c.disks.iter().zip(&disks) {
                    prop_assert_eq!(d.size, Some(size << 10));
                }
                prop_assert_eq!(c.nics.len(), nics.len());
                for (n, tail) in c.nics.iter().zip(&nics) {
                    prop_assert_eq!(n.mac, Some(MacAddr([0x58, 0x9c, 0xfc, tail[0], tail[1], tail[2]])));
                }
            }
        }
    }
}
