//! The checks `vm start` makes before anything starts: a guest that cannot boot is refused
//! with a clear error, and nothing is left running or locked.
//!
//! [`plan`] turns a checked [`GuestConfig`] into a [`BootPlan`]: the loader is `linux`, the
//! kernel exists and is a bzImage the 64-bit boot protocol can load, the initrd exists and
//! fits in half the guest RAM, the RAM fits in the host, every disk is a virtio-blk disk
//! whose image exists (vm-bhyve creates images at `vm create`; `vm start` never does), and
//! every value is within the bounds of [`proto::runner::MachineConfig`].

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use proto::runner::{MAX_CMDLINE_BYTES, MAX_CPUS, MIN_MEMORY_BYTES};

use crate::guest_config::{DiskDev, DiskEmulation, GuestConfig, Loader, NicEmulation, OnFault};
use crate::switch::config::Switches;

/// Guest RAM when the config sets none (vm-bhyve's default).
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Seconds `vm stop` waits for a guest to power off when `stop_timeout` is unset.
pub const DEFAULT_STOP_TIMEOUT: u32 = 30;
/// Offset of the bzImage header magic `HdrS` (Linux `Documentation/arch/x86/boot.rst`).
const HDRS_OFFSET: u64 = 0x202;
/// Lowest boot protocol version accepted: 2.06 (the first with `cmdline_size`).
const MIN_BOOT_PROTOCOL: u16 = 0x0206;
/// The logical block size of a disk without `sectorsize=` (bhyve's default).
pub const DEFAULT_SECTOR_SIZE: u32 = 512;
/// Most disks of one guest, install media included (one PCI slot each after the host bridge,
/// and [`proto::bootstrap::MAX_DEVICE_INDEX`]).
pub const MAX_DISKS: usize = 16;

/// Most NICs of one guest.
pub const MAX_NICS: usize = 8;
/// The MTU of a NIC whose switch sets none.
pub const DEFAULT_MTU: u32 = 1500;

/// Why a guest cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("the guest has no loader set (capvm boots loader=\"linux\")")]
    NoLoader,
    #[error("loader {0} is not yet supported by vm start (only linux is)")]
    LoaderUnsupported(&'static str),
    #[error("linux_kernel is not set")]
    NoKernel,
    #[error("kernel {0} does not exist")]
    KernelMissing(PathBuf),
    #[error("initrd {0} does not exist")]
    InitrdMissing(PathBuf),
    #[error("reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel {0} is not a bzImage (no HdrS boot header at 0x202)")]
    NotBzImage(PathBuf),
    #[error(
        "kernel {path} uses boot protocol {}.{:02}, older than 2.06",
        version >> 8,
        version & 0xff
    )]
    OldBootProtocol { path: PathBuf, version: u16 },
    #[error(
        "initrd {path} is {size} bytes, too large for {memory} bytes of guest memory (it must be under half)"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory: u64,
    },
    #[error("memory of {memory} bytes is more than the host's {host} bytes")]
    MemoryTooLarge { memory: u64, host: u64 },
    #[error("memory of {0} bytes must be at least 32M and a multiple of 2M")]
    MemoryShape(u64),
    #[error("cpu={cpus} is more than capvm's {MAX_CPUS}")]
    TooManyCpus { cpus: u32 },
    #[error("linux_cmdline must be printable ASCII of at most {MAX_CMDLINE_BYTES} bytes")]
    Cmdline,
    #[error("disk{index}: {what} is not supported yet (capvm serves virtio-blk disks only)")]
    DiskUnsupported { index: u32, what: String },
    #[error("disk{index}: image {path} does not exist (vm create makes disk images)")]
    DiskMissing { index: u32, path: PathBuf },
    #[error("disk{index}: {path} is neither a regular file nor a block device")]
    DiskNotImage { index: u32, path: PathBuf },
    #[error("install media {0} does not exist")]
    IsoMissing(PathBuf),
    #[error("{0} is not a regular file")]
    IsoNotFile(PathBuf),
    #[error("the guest has more than {MAX_DISKS} disks")]
    TooManyDisks,
    #[error("network{index}: {what} is not supported (capvm serves virtio-net NICs only)")]
    NicUnsupported { index: u32, what: &'static str },
    #[error("network{index}: switch {switch} does not exist (see vm switch list)")]
    NoSwitch { index: u32, switch: String },
    #[error("network{index}: switch {switch} is misconfigured in system.conf (see vm switch list)")]
    BadSwitch { index: u32, switch: String },
    #[error("network{index}: networkN_device {device} does not exist (create the tap first)")]
    NicDeviceMissing { index: u32, device: String },
    #[error("network{index} has no MAC address")]
    NoMac { index: u32 },
    #[error("the guest has more than {MAX_NICS} NICs")]
    TooManyNics,
}

/// What backs a NIC on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A tap netcfg creates for this boot, attached to `bridge` (the NIC's switch's) if any.
    Tap {
        switch: Option<String>,
        bridge: Option<String>,
        /// The switch's MTU; `None`: the bridge's (or the default).
        mtu: Option<u32>,
    },
    /// `networkN_device`: an existing tap the supervisor attaches to (vm-bhyve #570).
    Device { name: String },
}

/// One NIC of a boot: what the supervisor opens and what it tells the NIC's dev-net.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicPlan {
    /// The `N` of `networkN`; NICs follow the disks on the PCI bus in this order.
    pub index: u32,
    pub mac: [u8; 6],
    pub backend: NicBackend,
    /// Virtio-net queue pairs (`networkN_queues` for the guest's vCPUs): the tap's queues.
    pub queue_pairs: u16,
}

/// One disk of a boot: what the supervisor opens and what it tells the disk's dev-blk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The `N` of `diskN` (install media: the next number after the configured disks); also
    /// the disk's order on the PCI bus.
    pub index: u32,
    /// The image file or block device.
    pub path: PathBuf,
    pub read_only: bool,
    /// Open with `O_DIRECT` (`direct` or `nocache`).
    pub direct: bool,
    pub logical_block_size: u32,
    /// The virtio-blk serial (`GET_ID`).
    pub serial: String,
}

/// Everything a supervisor needs to boot the guest, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub utctime: bool,
    pub uuid: [u8; 16],
    pub on_fault: OnFault,
    /// Seconds `vm stop` waits before forcing the guest off.
    pub stop_timeout: u32,
    /// The disks in PCI order.
    pub disks: Vec<DiskPlan>,
    /// The NICs, after the disks in PCI order ([`plan_network`]).
    pub nics: Vec<NicPlan>,
    /// Every switch's bridge: what the guest's netcfg may touch.
    pub bridges: Vec<String>,
    /// The graphical console (`graphics="yes"`).
    pub graphics: Option<crate::guest_config::Graphics>,
}

impl BootPlan {
    /// Attaches `iso` read-only after the configured disks (`vm install`).
    pub fn attach_install_media(&mut self, iso: &Path) -> Result<(), PreflightError> {
        match std::fs::metadata(iso) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(PreflightError::IsoNotFile(iso.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PreflightError::IsoMissing(iso.to_owned()));
            }
            Err(source) => {
                return Err(PreflightError::Read {
                    path: iso.to_owned(),
                    source,
                });
            }
        }
        if self.disks.len() >= MAX_DISKS {
            return Err(PreflightError::TooManyDisks);
        }
        let index = u32::try_from(self.disks.len()).map_err(|_| PreflightError::TooManyDisks)?;
        // vm-bhyve: graphics_wait="auto" waits for a VNC client during an install only.
        if let Some(g) = &mut self.graphics
            && g.wait == crate::guest_config::GraphicsWait::Auto
        {
            g.wait = crate::guest_config::GraphicsWait::Yes;
        }
        self.disks.push(DiskPlan {
            index,
            path: iso.to_owned(),
            read_only: true,
            direct: false,
            logical_block_size: DEFAULT_SECTOR_SIZE,
            serial: serial(&self.uuid, index),
        });
        Ok(())
    }
}

/// A disk's serial: the first 8 hex digits of the guest's UUID, `-d` and the disk number
/// (`5a1c0e2f-d0`), so a guest can tell its disks apart by a stable name.
pub fn serial(uuid: &[u8; 16], index: u32) -> String {
    let [a, b, c, d, ..] = *uuid;
    format!("{a:02x}{b:02x}{c:02x}{d:02x}-d{index}")
}

/// Checks each configured disk and plans it.
fn plan_disks(
    config: &GuestConfig,
    guest_dir: &Path,
    uuid: &[u8; 16],
) -> Result<Vec<DiskPlan>, PreflightError> {
    if config.disks.len() > MAX_DISKS {
        return Err(PreflightError::TooManyDisks);
    }
    let mut disks = Vec::new();
    for disk in &config.disks {
        let index = disk.index;
        let unsupported = |what: String| PreflightError::DiskUnsupported { index, what };
        if disk.emulation != DiskEmulation::VirtioBlk {
            let name = match disk.emulation {
                DiskEmulation::AhciHd => "ahci-hd",
                DiskEmulation::AhciCd => "ahci-cd",
                DiskEmulation::Nvme => "nvme",
                DiskEmulation::VirtioScsi => "virtio-scsi",
                DiskEmulation::VirtioBlk => "virtio-blk",
            };
            return Err(unsupported(format!("disk{index}_type={name}")));
        }
        let path = match disk.dev {
            DiskDev::File | DiskDev::Custom => disk.path(guest_dir),
            DiskDev::Zvol | DiskDev::SparseZvol | DiskDev::Iscsi => None,
        }
        .ok_or_else(|| unsupported(format!("disk{index}_dev={}", disk.dev.name())))?;
        match std::fs::metadata(&path) {
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt;
                if !m.is_file() && !m.file_type().is_block_device() {
                    return Err(PreflightError::DiskNotImage { index, path });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PreflightError::DiskMissing { index, path });
            }
            Err(source) => return Err(PreflightError::Read { path, source }),
        }
        disks.push(DiskPlan {
            index,
            path,
            read_only: disk.opts.read_only,
            direct: disk.opts.direct || disk.opts.nocache,
            logical_block_size: disk.opts.sectorsize.unwrap_or(DEFAULT_SECTOR_SIZE),
            serial: serial(uuid, index),
        });
    }
    Ok(disks)
}

/// Checks `config` of the guest in `guest_dir` against the host, and plans its boot.
/// `host_memory` is the host's RAM in bytes ([`host_memory`]).
pub fn plan(
    config: &GuestConfig,
    guest_dir: &Path,
    host_memory: u64,
) -> Result<BootPlan, PreflightError> {
    match config.loader {
        Some(Loader::Linux) => {}
        Some(other) => return Err(PreflightError::LoaderUnsupported(other.name())),
        None => return Err(PreflightError::NoLoader),
    }
    let cpus = config.cpu.unwrap_or(1);
    if cpus > MAX_CPUS {
        return Err(PreflightError::TooManyCpus { cpus });
    }
    let memory_bytes = config.memory.unwrap_or(DEFAULT_MEMORY);
    if memory_bytes < MIN_MEMORY_BYTES || !memory_bytes.is_multiple_of(2 << 20) {
        return Err(PreflightError::MemoryShape(memory_bytes));
    }
    if memory_bytes > host_memory {
        return Err(PreflightError::MemoryTooLarge {
            memory: memory_bytes,
            host: host_memory,
        });
    }
    let cmdline = config.linux.cmdline.clone().unwrap_or_default();
    if cmdline.len() > MAX_CMDLINE_BYTES || !cmdline.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(PreflightError::Cmdline);
    }
    let kernel = config
        .linux
        .kernel
        .as_ref()
        .map(|k| guest_dir.join(k))
        .ok_or(PreflightError::NoKernel)?;
    check_bzimage(&kernel)?;
    let initrd = config.linux.initrd.as_ref().map(|i| guest_dir.join(i));
    if let Some(path) = &initrd {
        let size = match std::fs::metadata(path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => return Err(PreflightError::InitrdMissing(path.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PreflightError::InitrdMissing(path.clone()));
            }
            Err(source) => {
                return Err(PreflightError::Read {
                    path: path.clone(),
                    source,
                });
            }
        };
        if size >= memory_bytes / 2 {
            return Err(PreflightError::InitrdTooLarge {
                path: path.clone(),
                size,
                memory: memory_bytes,
            });
        }
    }
    let uuid = config.uuid.map_or([0; 16], |u| *u.as_bytes());
    let disks = plan_disks(config, guest_dir, &uuid)?;
    Ok(BootPlan {
        cpus,
        memory_bytes,
        kernel,
        initrd,
        cmdline,
        utctime: config.utctime,
        uuid,
        on_fault: config.on_fault,
        stop_timeout: config.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
        disks,
        nics: Vec::new(),
        bridges: Vec::new(),
        graphics: config.graphics.enabled.then(|| config.graphics.clone()),
    })
}

/// Checks the NICs of `config` against the datastore's `switches` and the host, and adds
/// them to `plan`: each is virtio-net, has a MAC (see [`crate::create::assign_missing_macs`]),
/// names a switch that exists and is valid, or an existing tap (`networkN_device`).
pub fn plan_network(
    plan: &mut BootPlan,
    config: &GuestConfig,
    switches: &Switches,
) -> Result<(), PreflightError> {
    if config.nics.len() > MAX_NICS {
        return Err(PreflightError::TooManyNics);
    }
    let mut nics = Vec::new();
    for nic in &config.nics {
        let index = nic.index;
        if nic.emulation != NicEmulation::VirtioNet {
            return Err(PreflightError::NicUnsupported {
                index,
                what: "networkN_type=e1000",
            });
        }
        let mac = nic.mac.ok_or(PreflightError::NoMac { index })?.0;
        let backend = if let Some(device) = &nic.device {
            if !Path::new("/sys/class/net").join(device).exists() {
                return Err(PreflightError::NicDeviceMissing {
                    index,
                    device: device.clone(),
                });
            }
            NicBackend::Device {
                name: device.clone(),
            }
        } else if let Some(name) = &nic.switch {
            if switches.failed.iter().any(|f| f == name) {
                return Err(PreflightError::BadSwitch {
                    index,
                    switch: name.clone(),
                });
            }
            let sw = switches.get(name).ok_or_else(|| PreflightError::NoSwitch {
                index,
                switch: name.clone(),
            })?;
            NicBackend::Tap {
                switch: Some(sw.name.clone()),
                bridge: Some(sw.bridge.clone()),
                mtu: sw.mtu,
            }
        } else {
            NicBackend::Tap {
                switch: None,
                bridge: None,
                mtu: None,
            }
        };
        let queue_pairs = nic.queues.pairs(plan.cpus);
        if queue_pairs > 1 && matches!(backend, NicBackend::Device { .. }) {
            // Someone else's tap has the queues it was made with: one.
            return Err(PreflightError::NicUnsupported {
                index,
                what: "networkN_queues above 1 with networkN_device",
            });
        }
        nics.push(NicPlan {
            index,
            mac,
            backend,
            queue_pairs,
        });
    }
    plan.nics = nics;
    plan.bridges = switches.bridges();
    Ok(())
}

/// Checks that `path` is a regular file with a bzImage setup header of protocol 2.06 or later.
pub fn check_bzimage(path: &Path) -> Result<(), PreflightError> {
    let read_err = |source| PreflightError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PreflightError::KernelMissing(path.to_owned()));
        }
        Err(e) => return Err(read_err(e)),
    };
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(PreflightError::NotBzImage(path.to_owned()));
    }
    let mut header = [0u8; 6];
    file.seek(SeekFrom::Start(HDRS_OFFSET)).map_err(read_err)?;
    match file.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(PreflightError::NotBzImage(path.to_owned()));
        }
        Err(e) => return Err(read_err(e)),
    }
    let [h, d, r, s, lo, hi] = header;
    if [h, d, r, s] != *b"HdrS" {
        return Err(PreflightError::NotBzImage(path.to_owned()));
    }
    let version = u16::from_le_bytes([lo, hi]);
    if version < MIN_BOOT_PROTOCOL {
        return Err(PreflightError::OldBootProtocol {
            path: path.to_owned(),
            version,
        });
    }
    Ok(())
}

/// The host's RAM in bytes (`MemTotal` of `/proc/meminfo`); `u64::MAX` if unreadable, so an
/// unreadable meminfo never refuses a guest on its own.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_total(&text))
        .unwrap_or(u64::MAX)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::Conf;

    /// A file that passes as a bzImage of protocol `version`.
    fn fake_bzimage(path: &Path, version: u16) {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        std::fs::write(path, image).unwrap();
    }

    fn config(text: &str) -> GuestConfig {
        GuestConfig::from_conf(&Conf::parse(text), Path::new("/g/g.conf"))
            .unwrap()
            .config
    }

    #[test]
    fn good_linux_guest_is_planned() {
        let dir = tempfile::tempdir().unwrap();
        fake_bzimage(&dir.path().join("vmlinuz"), 0x020f);
        std::fs::write(dir.path().join("initrd"), [0u8; 100]).unwrap();
        let c = config(
            "loader=linux\nlinux_kernel=vmlinuz\nlinux_initrd=initrd\nlinux_cmdline=\"console=ttyS0\"\ncpu=2\nmemory=64M\non_fault=restart\nstop_timeout=5\n",
        );

        let plan = plan(&c, dir.path(), 1 << 30).unwrap();

        assert_eq!((plan.cpus, plan.memory_bytes), (2, 64 << 20));
        assert_eq!(plan.kernel, dir.path().join("vmlinuz"));
        assert_eq!(plan.cmdline, "console=ttyS0");
        assert_eq!((plan.on_fault, plan.stop_timeout), (OnFault::Restart, 5));
    }

    #[test]
    fn a_file_without_hdrs_is_not_a_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            check_bzimage(&path),
            Err(PreflightError::NotBzImage(_))
        ));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            check_bzimage(&path),
            Err(PreflightError::NotBzImage(_))
        ));
    }

    #[test]
    fn an_old_boot_protocol_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fake_bzimage(&path, 0x0204);
        let err = check_bzimage(&path).unwrap_err();
        assert!(err.to_string().contains("boot protocol 2.04"), "{err}");
    }

    #[test]
    fn missing_kernel_huge_memory_and_big_initrd_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = config("loader=linux\nlinux_kernel=nope\nmemory=64M\n");
        assert!(matches!(
            plan(&c, dir.path(), 1 << 30),
            Err(PreflightError::KernelMissing(_))
        ));
        fake_bzimage(&dir.path().join("k"), 0x020f);
        let c = config("loader=linux\nlinux_kernel=k\nmemory=2G\n");
        assert!(matches!(
            plan(&c, dir.path(), 1 << 30),
            Err(PreflightError::MemoryTooLarge { .. })
        ));
        std::fs::write(dir.path().join("i"), vec![0u8; 40 << 20]).unwrap();
        let c = config("loader=linux\nlinux_kernel=k\nlinux_initrd=i\nmemory=64M\n");
        assert!(matches!(
            plan(&c, dir.path(), 1 << 30),
            Err(PreflightError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn more_cpus_than_the_runner_takes_are_refused() {
        let c = config("loader=linux\nlinux_kernel=k\ncpu=65\nmemory=64M\n");
        let err = plan(&c, Path::new("/nowhere"), 1 << 30).unwrap_err();
        assert_eq!(err.to_string(), "cpu=65 is more than capvm's 64");
    }

    #[test]
    fn memory_not_in_2m_steps_is_refused() {
        let c = config("loader=linux\nlinux_kernel=k\nmemory=65M\n");
        assert!(matches!(
            plan(&c, Path::new("/nowhere"), 1 << 30),
            Err(PreflightError::MemoryShape(_))
        ));
    }

    #[test]
    fn uefi_is_not_yet_supported() {
        let c = config("loader=uefi\n");
        let err = plan(&c, Path::new("/nowhere"), 1 << 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "loader uefi is not yet supported by vm start (only linux is)"
        );
    }

    fn disk_guest(dir: &Path, disks: &str) -> GuestConfig {
        fake_bzimage(&dir.join("k"), 0x020f);
        config(&format!(
            "loader=linux\nlinux_kernel=k\nmemory=64M\nuuid=5a1c0e2f-0000-4000-8000-000000000001\n{disks}"
        ))
    }

    #[test]
    fn disks_are_planned_in_order_with_their_options() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), [0u8; 4096]).unwrap();
        std::fs::write(dir.path().join("b.img"), [0u8; 4096]).unwrap();
        let c = disk_guest(
            dir.path(),
            "disk0_type=virtio-blk\ndisk0_name=a.img\ndisk0_opts=nocache,sectorsize=4096\ndisk1_type=virtio-blk\ndisk1_name=b.img\ndisk1_opts=ro\n",
        );

        let plan = plan(&c, dir.path(), 1 << 30).unwrap();

        let got: Vec<_> = plan
            .disks
            .iter()
            .map(|d| {
                (
                    d.index,
                    d.read_only,
                    d.direct,
                    d.logical_block_size,
                    d.serial.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, false, true, 4096, "5a1c0e2f-d0"),
                (1, true, false, 512, "5a1c0e2f-d1")
            ]
        );
        assert_eq!(plan.disks[1].path, dir.path().join("b.img"));
    }

    #[test]
    fn a_missing_disk_image_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = disk_guest(dir.path(), "disk0_type=virtio-blk\ndisk0_name=gone.img\n");

        let err = plan(&c, dir.path(), 1 << 30).unwrap_err();

        assert!(
            matches!(err, PreflightError::DiskMissing { index: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("gone.img does not exist"), "{err}");
    }

    #[test]
    fn other_disk_emulations_and_zvols_are_not_supported_yet() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), [0u8; 512]).unwrap();
        let c = disk_guest(dir.path(), "disk0_type=ahci-hd\ndisk0_name=a.img\n");
        let err = plan(&c, dir.path(), 1 << 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk0: disk0_type=ahci-hd is not supported yet (capvm serves virtio-blk disks only)"
        );
        let c = disk_guest(
            dir.path(),
            "disk0_type=virtio-blk\ndisk0_name=tank/g\ndisk0_dev=sparse-zvol\n",
        );
        let err = plan(&c, dir.path(), 1 << 30).unwrap_err();
        assert!(
            err.to_string()
                .contains("disk0_dev=sparse-zvol is not supported"),
            "{err}"
        );
    }

    #[test]
    fn a_directory_is_not_a_disk_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d.img")).unwrap();
        let c = disk_guest(dir.path(), "disk0_type=virtio-blk\ndisk0_name=d.img\n");
        assert!(matches!(
            plan(&c, dir.path(), 1 << 30),
            Err(PreflightError::DiskNotImage { .. })
        ));
    }

    #[test]
    fn install_media_goes_read_only_after_the_disks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), [0u8; 512]).unwrap();
        std::fs::write(dir.path().join("x.iso"), [0u8; 2048]).unwrap();
        let c = disk_guest(dir.path(), "disk0_type=virtio-blk\ndisk0_name=a.img\n");
        let mut plan = plan(&c, dir.path(), 1 << 30).unwrap();

        plan.attach_install_media(&dir.path().join("x.iso"))
            .unwrap();

        let iso = &plan.disks[1];
        assert_eq!(
            (iso.index, iso.read_only, iso.serial.as_str()),
            (1, true, "5a1c0e2f-d1")
        );
        assert!(matches!(
            plan.attach_install_media(&dir.path().join("nope.iso")),
            Err(PreflightError::IsoMissing(_))
        ));
    }

    #[test]
    fn graphics_wait_auto_waits_during_an_install_only() {
        use crate::guest_config::GraphicsWait;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.iso"), [0u8; 2048]).unwrap();
        let wait_of = |graphics: &str| {
            let c = disk_guest(dir.path(), graphics);
            let mut plan = plan(&c, dir.path(), 1 << 30).unwrap();
            let before = plan.graphics.as_ref().map(|g| g.wait);
            plan.attach_install_media(&dir.path().join("x.iso"))
                .unwrap();
            (before, plan.graphics.as_ref().map(|g| g.wait))
        };
        assert_eq!(
            wait_of("graphics=\"yes\"\n"),
            (Some(GraphicsWait::Auto), Some(GraphicsWait::Yes))
        );
        assert_eq!(
            wait_of("graphics=\"yes\"\ngraphics_wait=\"no\"\n"),
            (Some(GraphicsWait::No), Some(GraphicsWait::No))
        );
    }

    fn switches(text: &str) -> Switches {
        Switches::from_conf(&Conf::parse(text), Path::new("/vm/.config/system.conf"))
    }

    fn nic_plan(nics: &str, system: &str) -> Result<BootPlan, PreflightError> {
        let dir = tempfile::tempdir().unwrap();
        let c = disk_guest(dir.path(), nics);
        let mut p = plan(&c, dir.path(), 1 << 30).unwrap();
        plan_network(&mut p, &c, &switches(system)).map(|()| p)
    }

    #[test]
    fn nics_are_planned_on_their_switch_with_its_mtu() {
        let p = nic_plan(
            "network0_type=virtio-net\nnetwork0_switch=public\nnetwork0_mac=58:9c:fc:00:00:01\nnetwork1_type=virtio-net\nnetwork1_mac=58:9c:fc:00:00:02\nnetwork1_queues=3\n",
            "switch_list=\"public lab\"\nmtu_public=9000\ntype_lab=manual\nbridge_lab=br0\n",
        )
        .unwrap();
        assert_eq!(p.bridges, ["vm-public", "br0"]);
        assert_eq!(
            p.nics,
            [
                NicPlan {
                    index: 0,
                    mac: [0x58, 0x9c, 0xfc, 0, 0, 1],
                    backend: NicBackend::Tap {
                        switch: Some("public".into()),
                        bridge: Some("vm-public".into()),
                        mtu: Some(9000)
                    },
                    queue_pairs: 1,
                },
                NicPlan {
                    index: 1,
                    mac: [0x58, 0x9c, 0xfc, 0, 0, 2],
                    backend: NicBackend::Tap {
                        switch: None,
                        bridge: None,
                        mtu: None
                    },
                    queue_pairs: 3,
                }
            ]
        );
    }

    #[test]
    fn e1000_unknown_or_broken_switches_and_missing_devices_are_refused() {
        let mac = "network0_mac=58:9c:fc:00:00:01\n";
        let err = nic_plan(&format!("network0_type=e1000\n{mac}"), "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "network0: networkN_type=e1000 is not supported (capvm serves virtio-net NICs only)"
        );
        let err = nic_plan(
            &format!("network0_type=virtio-net\nnetwork0_switch=nope\n{mac}"),
            "switch_list=public\n",
        )
        .unwrap_err();
        assert!(
            matches!(err, PreflightError::NoSwitch { index: 0, .. }),
            "{err}"
        );
        let err = nic_plan(
            &format!("network0_type=virtio-net\nnetwork0_switch=public\n{mac}"),
            "switch_list=public\nvlan_public=x\n",
        )
        .unwrap_err();
        assert!(matches!(err, PreflightError::BadSwitch { .. }), "{err}");
        let err = nic_plan(
            &format!("network0_type=virtio-net\nnetwork0_device=capvm-nosuch0\n{mac}"),
            "",
        )
        .unwrap_err();
        assert!(
            matches!(err, PreflightError::NicDeviceMissing { .. }),
            "{err}"
        );
        let err = nic_plan("network0_type=virtio-net\n", "").unwrap_err();
        assert!(matches!(err, PreflightError::NoMac { index: 0 }), "{err}");
    }

    #[test]
    fn an_existing_device_needs_no_switch() {
        let p = nic_plan(
            "network0_type=virtio-net\nnetwork0_device=lo\nnetwork0_mac=58:9c:fc:00:00:01\n",
            "",
        )
        .unwrap();
        assert_eq!(p.nics[0].backend, NicBackend::Device { name: "lo".into() });
        assert_eq!(p.nics[0].queue_pairs, 1);
        // Someone else's tap has one queue: more pairs are refused.
        let err = nic_plan(
            "network0_type=virtio-net\nnetwork0_device=lo\nnetwork0_mac=58:9c:fc:00:00:01\nnetwork0_queues=2\n",
            "",
        )
        .unwrap_err();
        assert!(
            matches!(err, PreflightError::NicUnsupported { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemFree: 5 kB\nMemTotal:       2048 kB\n";
        assert_eq!(parse_mem_total(text), Some(2 << 20));
        assert_eq!(parse_mem_total("nothing"), None);
    }
}
