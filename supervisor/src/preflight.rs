//! The checks `vm start` makes before anything starts: a guest that cannot boot is refused
//! with a clear error, and nothing is left running or locked.
//!
//! [`plan`] turns a checked [`GuestConfig`] into a [`BootPlan`]: the loader is `linux`, the
//! kernel exists and is a bzImage the 64-bit boot protocol can load, the initrd exists and
//! fits in half the guest RAM, the RAM fits in the host, and every value is within the
//! bounds of [`proto::runner::MachineConfig`].

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use proto::runner::{MAX_CMDLINE_BYTES, MAX_CPUS, MIN_MEMORY_BYTES};

use crate::guest_config::{GuestConfig, Loader, OnFault};

/// Guest RAM when the config sets none (vm-bhyve's default).
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Seconds `vm stop` waits for a guest to power off when `stop_timeout` is unset.
pub const DEFAULT_STOP_TIMEOUT: u32 = 30;
/// Offset of the bzImage header magic `HdrS` (Linux `Documentation/arch/x86/boot.rst`).
const HDRS_OFFSET: u64 = 0x202;
/// Lowest boot protocol version accepted: 2.06 (the first with `cmdline_size`).
const MIN_BOOT_PROTOCOL: u16 = 0x0206;

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
    Ok(BootPlan {
        cpus,
        memory_bytes,
        kernel,
        initrd,
        cmdline,
        utctime: config.utctime,
        uuid: config.uuid.map_or([0; 16], |u| *u.as_bytes()),
        on_fault: config.on_fault,
        stop_timeout: config.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
    })
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

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemFree: 5 kB\nMemTotal:       2048 kB\n";
        assert_eq!(parse_mem_total(text), Some(2 << 20));
        assert_eq!(parse_mem_total("nothing"), None);
    }
}
