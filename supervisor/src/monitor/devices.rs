//! The device processes of one boot: a `dev-blk` per disk, then a `dev-net` per NIC.
//!
//! Each boot has its own guest RAM memfd, so each boot has its own device processes. Per disk
//! the supervisor opens the image (read-only for `ro` disks and install media, `O_DIRECT` for
//! `direct`/`nocache`), creates the device's channel to the runner (a `SOCK_SEQPACKET`
//! socketpair), starts `dev-blk` in its sandbox with `[Log, GuestMemory, Disk, DeviceChannel]`
//! and sends it [`DeviceSetup::Block`]. Per NIC it starts `dev-net` with `[Log, GuestMemory,
//! Tap, DeviceChannel, Tap…]` (the tap the supervisor holds for the whole run,
//! [`super::network`]: its first queue, then one fd per further queue pair)
//! and sends it [`DeviceSetup::Net`]. The other ends of the channels go to the runner as
//! [`FdRole::DeviceChannel`]s: disks first, then NICs, which is the PCI order.
//!
//! A device that dies is logged (its exit status says `SIGSYS` when its seccomp filter killed
//! it) and started again from its [`Recipe`]: the same log, guest RAM, backing fd (image or tap,
//! which the supervisor keeps), in-flight region (disks) and setup, on a new channel whose other
//! end goes to the runner ([`proto::runner::ToRunner::ReplaceDevice`]); the runner re-sends the
//! device's `Activate` and the new process resumes the queues (see `super::Monitor`'s restart
//! policy). Every device process is killed and reaped when its boot ends.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelError};
use proto::device::{BlockSetup, DeviceSetup, NetSetup};

use crate::preflight::{DiskPlan, NicPlan};
use crate::spawn::{self, SpawnError};

/// The dev-blk binary's name (found by [`spawn::binary_path`]).
pub const DEV_BLK_BINARY: &str = "dev-blk";
/// The dev-net binary's name (found by [`spawn::binary_path`]).
pub const DEV_NET_BINARY: &str = "dev-net";
/// Environment variable with the device processes' `tracing` filter (default `info`).
pub const DEVICE_LOG_ENV: &str = "CAPVM_DEVICE_LOG";
/// The fd ceiling of a dev-blk sandbox: its five fds, two eventfds per queue, and room for
/// the epoll and worker descriptors of its threads.
const DEV_BLK_MAX_FDS: u32 = 128;
/// The fd ceiling of a dev-net sandbox: its four fds and further tap queues, the eventfds
/// of its queues (2 × 15), and room for its threads' poll and wake descriptors.
const DEV_NET_MAX_FDS: u32 = 96;
/// Most request queues of a disk ([`proto::device::MAX_QUEUES`]).
const MAX_QUEUES: u32 = proto::device::MAX_QUEUES as u32;

/// Why a device process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("opening disk{index} {path} failed")]
    OpenDisk {
        index: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the channel of {device} failed")]
    Channel {
        device: String,
        #[source]
        source: ChannelError,
    },
    #[error("starting {device} failed")]
    Spawn {
        device: String,
        #[source]
        source: SpawnError,
    },
    #[error("watching {device} failed")]
    Pidfd {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("sending the setup of {device} failed")]
    Setup {
        device: String,
        #[source]
        source: ChannelError,
    },
    #[error("{device} has no log")]
    NoLog { device: String },
    #[error("network{index} has no tap")]
    NoTap { index: u32 },
    #[error("duplicating a descriptor of {device} failed")]
    Dup {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("creating the in-flight region of {device} failed")]
    Inflight {
        device: String,
        #[source]
        source: io::Error,
    },
}

/// Everything a device process is started with, kept for the boot's whole life so that a
/// dead one can be started again exactly as the first.
#[derive(Debug)]
pub struct Recipe {
    role: Role,
    binary: PathBuf,
    vm_name: String,
    log: OwnedFd,
    backing_role: FdRole,
    /// The disk image or tap (a duplicate of the supervisor's).
    backing: OwnedFd,
    /// Further fds after the device channel (a disk's in-flight region).
    extra: Vec<(FdRole, OwnedFd)>,
    max_fds: u32,
    setup: DeviceSetup,
}

/// A device process of this boot (running, or dead and waiting for its restart).
#[derive(Debug)]
pub struct DeviceProcess {
    /// `dev-blk0`, `dev-net0`, ...: the role name with the disk or NIC number.
    pub name: String,
    pub process: Child,
    /// Readable when the process has exited.
    pub pidfd: OwnedFd,
    /// The supervisor's end of its bootstrap channel, kept open: closing it asks the device
    /// to exit.
    pub bootstrap: Channel,
    /// Set once the process has been reaped.
    pub status: Option<ExitStatus>,
    /// How to start it again.
    pub recipe: Recipe,
    /// How often it was restarted after dying.
    pub restarts: u32,
    /// When it died, within the restart window (oldest first).
    pub deaths: std::collections::VecDeque<std::time::Instant>,
    /// When the next restart is due, if one is.
    pub restart_at: Option<std::time::Instant>,
    /// It died too often and is not restarted any more.
    pub failed: bool,
}

impl DeviceProcess {
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Starts the device again from its recipe on guest RAM `memory`; returns the runner's
    /// end of the new channel. The old process must have been reaped.
    pub fn respawn(&mut self, memory: BorrowedFd<'_>) -> Result<Channel, DeviceError> {
        let launched = launch(&self.name, &self.recipe, memory)?;
        self.process = launched.process;
        self.pidfd = launched.pidfd;
        self.bootstrap = launched.bootstrap;
        self.status = None;
        self.restarts = self.restarts.saturating_add(1);
        Ok(launched.runner_end)
    }

    /// Kills (if still running) and reaps the process.
    pub fn stop(&mut self) {
        if self.status.is_some() {
            return;
        }
        if let Ok(None) = self.process.try_wait() {
            let _ = self.process.kill();
        }
        match self.process.wait() {
            Ok(status) => self.status = Some(status),
            Err(e) => tracing::warn!(device = %self.name, error = %e, "reaping failed"),
        }
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One NIC's tap as a boot's dev-net gets it.
#[derive(Debug, Clone)]
pub struct TapRef<'a> {
    /// One fd per tap queue = per virtio-net queue pair, in order; never empty.
    pub fds: Vec<BorrowedFd<'a>>,
    pub mtu: u16,
}

/// What the device processes of a boot are started with.
#[derive(Debug)]
pub struct DeviceContext<'a> {
    pub vm_name: &'a str,
    pub dev_blk_binary: &'a Path,
    pub dev_net_binary: &'a Path,
    /// One log per disk, in the order of the plan's disks.
    pub logs: &'a [BorrowedFd<'a>],
    /// One log per NIC, in the order of the plan's NICs.
    pub nic_logs: &'a [BorrowedFd<'a>],
    /// One tap per NIC, in the order of the plan's NICs.
    pub taps: &'a [TapRef<'a>],
    pub memory: BorrowedFd<'a>,
    pub memory_bytes: u64,
    pub cpus: u32,
}

/// The devices of a boot and the runner's ends of their channels, in PCI order.
#[derive(Debug, Default)]
pub struct Devices {
    pub processes: Vec<DeviceProcess>,
    pub runner_ends: Vec<Channel>,
}

/// Starts one dev-blk per disk, then one dev-net per NIC. On error the ones already started
/// are killed and reaped (dropping them).
pub fn start_devices(
    disks: &[DiskPlan],
    nics: &[NicPlan],
    ctx: &DeviceContext<'_>,
) -> Result<Devices, DeviceError> {
    let mut devices = Devices::default();
    for (n, disk) in disks.iter().enumerate() {
        let log = *ctx.logs.get(n).ok_or_else(|| DeviceError::NoLog {
            device: format!("disk{}", disk.index),
        })?;
        let (process, runner_end) = start_disk(disk, log, ctx)?;
        devices.processes.push(process);
        devices.runner_ends.push(runner_end);
    }
    for (n, nic) in nics.iter().enumerate() {
        let log = *ctx.nic_logs.get(n).ok_or_else(|| DeviceError::NoLog {
            device: format!("network{}", nic.index),
        })?;
        let tap = ctx
            .taps
            .get(n)
            .ok_or(DeviceError::NoTap { index: nic.index })?;
        let (first, rest) = tap
            .fds
            .split_first()
            .ok_or(DeviceError::NoTap { index: nic.index })?;
        let queue_pairs =
            u16::try_from(tap.fds.len()).map_err(|_| DeviceError::NoTap { index: nic.index })?;
        let setup = DeviceSetup::Net(NetSetup {
            memory: proto::device::guest_ram_layout(ctx.memory_bytes),
            mac: nic.mac,
            mtu: tap.mtu,
            queue_pairs,
        });
        let name = format!("dev-net{}", nic.index);
        // The further queues of a multi-queue tap follow the device channel, in order.
        let extra = rest
            .iter()
            .map(|fd| dup(&name, *fd).map(|fd| (FdRole::Tap, fd)))
            .collect::<Result<Vec<_>, _>>()?;
        let (process, runner_end) = start_device(
            DeviceSpec {
                role: Role::DevNet { index: nic.index },
                binary: ctx.dev_net_binary,
                backing_role: FdRole::Tap,
                backing: dup(&name, *first)?,
                extra,
                max_fds: DEV_NET_MAX_FDS,
                setup,
            },
            name,
            log,
            ctx,
        )?;
        devices.processes.push(process);
        devices.runner_ends.push(runner_end);
    }
    Ok(devices)
}

fn start_disk(
    disk: &DiskPlan,
    log: BorrowedFd<'_>,
    ctx: &DeviceContext<'_>,
) -> Result<(DeviceProcess, Channel), DeviceError> {
    let index = disk.index;
    let image = open_disk(disk)?;
    let name = format!("dev-blk{index}");
    // The in-flight region outlives each dev-blk process of this boot: a restarted one
    // replays what its predecessor had in flight.
    let region = crate::memfd::sealed(
        c"capvm-inflight",
        proto::device::INFLIGHT_REGION_BYTES as u64,
    )
    .map_err(|e| DeviceError::Inflight {
        device: name.clone(),
        source: e.into(),
    })?;
    let setup = DeviceSetup::Block(BlockSetup {
        memory: proto::device::guest_ram_layout(ctx.memory_bytes),
        read_only: disk.read_only,
        logical_block_size: disk.logical_block_size,
        serial: disk.serial.clone(),
        queues: queue_count(ctx.cpus),
    });
    start_device(
        DeviceSpec {
            role: Role::DevBlk { index },
            binary: ctx.dev_blk_binary,
            backing_role: FdRole::Disk,
            backing: image.into(),
            extra: vec![(FdRole::InflightRegion, region)],
            max_fds: DEV_BLK_MAX_FDS,
            setup,
        },
        name,
        log,
        ctx,
    )
}

fn dup(device: &str, fd: BorrowedFd<'_>) -> Result<OwnedFd, DeviceError> {
    fd.try_clone_to_owned().map_err(|source| DeviceError::Dup {
        device: device.to_owned(),
        source,
    })
}

/// One device process to start.
struct DeviceSpec<'a> {
    role: Role,
    binary: &'a Path,
    backing_role: FdRole,
    /// The disk image or tap.
    backing: OwnedFd,
    extra: Vec<(FdRole, OwnedFd)>,
    max_fds: u32,
    setup: DeviceSetup,
}

/// Starts a device with `[Log, GuestMemory, backing, DeviceChannel, extra…]` and sends its
/// setup; keeps what it took as the device's [`Recipe`].
fn start_device(
    spec: DeviceSpec<'_>,
    name: String,
    log: BorrowedFd<'_>,
    ctx: &DeviceContext<'_>,
) -> Result<(DeviceProcess, Channel), DeviceError> {
    let recipe = Recipe {
        role: spec.role,
        binary: spec.binary.to_owned(),
        vm_name: ctx.vm_name.to_owned(),
        log: dup(&name, log)?,
        backing_role: spec.backing_role,
        backing: spec.backing,
        extra: spec.extra,
        max_fds: spec.max_fds,
        setup: spec.setup,
    };
    let launched = launch(&name, &recipe, ctx.memory)?;
    let device = DeviceProcess {
        name,
        process: launched.process,
        pidfd: launched.pidfd,
        bootstrap: launched.bootstrap,
        status: None,
        recipe,
        restarts: 0,
        deaths: std::collections::VecDeque::new(),
        restart_at: None,
        failed: false,
    };
    Ok((device, launched.runner_end))
}

/// A device process just started.
struct Launched {
    process: Child,
    pidfd: OwnedFd,
    bootstrap: Channel,
    runner_end: Channel,
}

/// Spawns the device of `recipe` in its sandbox and sends its setup.
fn launch(device: &str, recipe: &Recipe, memory: BorrowedFd<'_>) -> Result<Launched, DeviceError> {
    let device = device.to_owned();
    let (runner_end, device_end) = match Channel::pair() {
        Ok(pair) => pair,
        Err(source) => return Err(DeviceError::Channel { device, source }),
    };
    let (uid, gid) = sandbox::nobody();
    let mut roles = vec![
        FdRole::Log,
        FdRole::GuestMemory,
        recipe.backing_role,
        FdRole::DeviceChannel,
    ];
    let mut fds = vec![
        recipe.log.as_fd(),
        memory,
        recipe.backing.as_fd(),
        device_end.as_fd(),
    ];
    for (role, fd) in &recipe.extra {
        roles.push(*role);
        fds.push(fd.as_fd());
    }
    let bootstrap = Bootstrap {
        role: recipe.role,
        vm_name: recipe.vm_name.clone(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: recipe.max_fds,
        },
        fds: roles,
        log_filter: std::env::var(DEVICE_LOG_ENV).unwrap_or_else(|_| "info".to_owned()),
    };
    let spawned = match spawn::spawn(&recipe.binary, &bootstrap, &fds) {
        Ok(s) => s,
        Err(source) => return Err(DeviceError::Spawn { device, source }),
    };
    drop(device_end);
    let mut process = spawned.process;
    let pidfd = match super::runner::pidfd_open(process.id()) {
        Ok(fd) => fd,
        Err(source) => {
            let _ = process.kill();
            let _ = process.wait();
            return Err(DeviceError::Pidfd { device, source });
        }
    };
    if let Err(source) = spawned.channel.send(&recipe.setup, &[]) {
        let _ = process.kill();
        let _ = process.wait();
        return Err(DeviceError::Setup { device, source });
    }
    Ok(Launched {
        process,
        pidfd,
        bootstrap: spawned.channel,
        runner_end,
    })
}

/// Opens the image as the disk's options say.
fn open_disk(disk: &DiskPlan) -> Result<File, DeviceError> {
    let mut flags = libc::O_CLOEXEC | libc::O_NOCTTY;
    if disk.direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(!disk.read_only)
        .custom_flags(flags)
        .open(&disk.path)
        .map_err(|source| DeviceError::OpenDisk {
            index: disk.index,
            path: disk.path.clone(),
            source,
        })
}

/// One request queue per vCPU, at most [`proto::device::MAX_QUEUES`].
pub fn queue_count(cpus: u32) -> u16 {
    u16::try_from(cpus.clamp(1, MAX_QUEUES)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_follow_the_cpus_up_to_sixteen() {
        assert_eq!(queue_count(1), 1);
        assert_eq!(queue_count(4), 4);
        assert_eq!(queue_count(64), 16);
        assert_eq!(queue_count(0), 1);
    }

    #[test]
    fn a_read_only_disk_is_opened_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let disk = DiskPlan {
            index: 0,
            path,
            read_only: true,
            direct: false,
            logical_block_size: 512,
            serial: "x".into(),
        };
        let file = open_disk(&disk).unwrap();
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    }
}
