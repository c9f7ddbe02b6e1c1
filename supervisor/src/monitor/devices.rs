//! The device processes of one boot: a `dev-blk` per disk.
//!
//! Each boot has its own guest RAM memfd, so each boot has its own device processes. Per disk
//! the supervisor opens the image (read-only for `ro` disks and install media, `O_DIRECT` for
//! `direct`/`nocache`), creates the device's channel to the runner (a `SOCK_SEQPACKET`
//! socketpair), starts `dev-blk` in its sandbox with `[Log, GuestMemory, Disk, DeviceChannel]`
//! and sends it [`DeviceSetup::Block`]. The other end of the channel goes to the runner as a
//! [`FdRole::DeviceChannel`], in disk order, which is the PCI order.
//!
//! A device that dies is logged (its exit status says `SIGSYS` when its seccomp filter killed
//! it); restarting it is not done yet, so the guest keeps running without the disk's process.
//! Every device process is killed and reaped when its boot ends.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelError};
use proto::device::{BlockSetup, DeviceSetup};

use crate::preflight::DiskPlan;
use crate::spawn::{self, SpawnError};

/// The dev-blk binary's name (found by [`spawn::binary_path`]).
pub const DEV_BLK_BINARY: &str = "dev-blk";
/// Environment variable with the device processes' `tracing` filter (default `info`).
pub const DEVICE_LOG_ENV: &str = "CAPVM_DEVICE_LOG";
/// The fd ceiling of a dev-blk sandbox: its five fds, two eventfds per queue, and room for
/// the epoll and worker descriptors of its threads.
const DEV_BLK_MAX_FDS: u32 = 128;
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
    #[error("creating the channel of disk{index} failed")]
    Channel {
        index: u32,
        #[source]
        source: ChannelError,
    },
    #[error("starting the dev-blk of disk{index} failed")]
    Spawn {
        index: u32,
        #[source]
        source: SpawnError,
    },
    #[error("watching the dev-blk of disk{index} failed")]
    Pidfd {
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error("sending the setup of disk{index} failed")]
    Setup {
        index: u32,
        #[source]
        source: ChannelError,
    },
    #[error("disk{index} has no log")]
    NoLog { index: u32 },
}

/// A running device process.
#[derive(Debug)]
pub struct DeviceProcess {
    /// `dev-blk0`, ...: the role name with the disk number.
    pub name: String,
    pub process: Child,
    /// Readable when the process has exited.
    pub pidfd: OwnedFd,
    /// The supervisor's end of its bootstrap channel, kept open: closing it asks the device
    /// to exit.
    pub bootstrap: Channel,
    /// Set once the process has been reaped.
    pub status: Option<ExitStatus>,
}

impl DeviceProcess {
    pub fn pid(&self) -> u32 {
        self.process.id()
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

/// What the device processes of a boot are started with.
#[derive(Debug)]
pub struct DeviceContext<'a> {
    pub vm_name: &'a str,
    pub dev_blk_binary: &'a Path,
    /// One log per disk, in the order of the plan's disks.
    pub logs: &'a [BorrowedFd<'a>],
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

/// Starts one dev-blk per disk. On error the ones already started are killed and reaped
/// (dropping them).
pub fn start_disks(disks: &[DiskPlan], ctx: &DeviceContext<'_>) -> Result<Devices, DeviceError> {
    let mut devices = Devices::default();
    for (n, disk) in disks.iter().enumerate() {
        let log = *ctx
            .logs
            .get(n)
            .ok_or(DeviceError::NoLog { index: disk.index })?;
        let (process, runner_end) = start_disk(disk, log, ctx)?;
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
    let (runner_end, device_end) =
        Channel::pair().map_err(|source| DeviceError::Channel { index, source })?;
    let (uid, gid) = sandbox::nobody();
    let bootstrap = Bootstrap {
        role: Role::DevBlk { index },
        vm_name: ctx.vm_name.to_owned(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: DEV_BLK_MAX_FDS,
        },
        fds: vec![
            FdRole::Log,
            FdRole::GuestMemory,
            FdRole::Disk,
            FdRole::DeviceChannel,
        ],
        log_filter: std::env::var(DEVICE_LOG_ENV).unwrap_or_else(|_| "info".to_owned()),
    };
    let fds = [log, ctx.memory, image.as_fd(), device_end.as_fd()];
    let spawned = spawn::spawn(ctx.dev_blk_binary, &bootstrap, &fds)
        .map_err(|source| DeviceError::Spawn { index, source })?;
    drop(device_end);
    drop(image);
    let mut process = spawned.process;
    let pidfd = match super::runner::pidfd_open(process.id()) {
        Ok(fd) => fd,
        Err(source) => {
            let _ = process.kill();
            let _ = process.wait();
            return Err(DeviceError::Pidfd { index, source });
        }
    };
    let mut device = DeviceProcess {
        name: format!("dev-blk{index}"),
        process,
        pidfd,
        bootstrap: spawned.channel,
        status: None,
    };
    let setup = DeviceSetup::Block(BlockSetup {
        memory: proto::device::guest_ram_layout(ctx.memory_bytes),
        read_only: disk.read_only,
        logical_block_size: disk.logical_block_size,
        serial: disk.serial.clone(),
        queues: queue_count(ctx.cpus),
    });
    if let Err(source) = device.bootstrap.send(&setup, &[]) {
        device.stop();
        return Err(DeviceError::Setup { index, source });
    }
    Ok((device, runner_end))
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
