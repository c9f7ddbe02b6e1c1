//! One boot of the guest: the descriptors a vcpu-runner needs, its device processes
//! ([`super::devices`]), the runner process, and its channel.
//!
//! Each boot gets everything fresh: a new guest RAM memfd (sealed against resizing, so a
//! mapping can never be cut short under another process), `/dev/kvm`, the kernel and initrd
//! opened read-only, a new console socketpair, a dev-blk per disk and a dev-net per NIC on
//! the same memfd. Nothing of an earlier boot survives into the next one but the NICs' taps,
//! which the supervisor holds for the whole run.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::SystemTime;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelError};
use proto::runner::{DisplayModes, GuestExit, MachineConfig, ToRunner};

use super::devices::{self, DeviceContext, DeviceError, DeviceProcess, TapRef};
use crate::preflight::BootPlan;
use crate::spawn::{self, SpawnError};
use crate::vmlog;

/// The KVM device; `CAPVM_KVM_DEVICE` names another (tests use `/dev/null` with the fake
/// runner on hosts without KVM).
pub const KVM_DEVICE: &str = "/dev/kvm";
/// Environment variable replacing [`KVM_DEVICE`].
pub const KVM_DEVICE_ENV: &str = "CAPVM_KVM_DEVICE";
/// Environment variable with the runner's `tracing` filter (default `info`).
pub const RUNNER_LOG_ENV: &str = "CAPVM_RUNNER_LOG";
/// The fd ceiling of the runner's sandbox without devices.
const RUNNER_BASE_FDS: u32 = 64;
/// What each device adds to it: its channel and two eventfds per queue.
const RUNNER_FDS_PER_DEVICE: u32 = 1 + 2 * proto::device::MAX_QUEUES as u32;

/// Why a boot could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("creating the guest memory failed")]
    Memory(#[source] nix::Error),
    #[error("opening {path} failed")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the console socket failed")]
    Console(#[source] nix::Error),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("watching the vcpu-runner failed")]
    Pidfd(#[source] io::Error),
    #[error("sending the machine to the vcpu-runner failed")]
    Send(#[source] ChannelError),
    #[error("the machine is invalid")]
    Machine(#[from] proto::runner::RunnerMessageError),
    #[error("creating the display channel failed")]
    DisplayChannel(#[source] ChannelError),
    #[error("starting the graphical console failed")]
    Display(#[source] crate::graphics::GraphicsError),
}

/// A running (or booting) vcpu-runner.
#[derive(Debug)]
pub struct RunnerProcess {
    pub process: Child,
    /// Readable when the process has exited.
    pub pidfd: OwnedFd,
    /// `None` once the runner has closed it.
    pub channel: Option<Channel>,
    /// The supervisor's end of the guest's COM1 stream.
    pub console: OwnedFd,
    /// Whether the runner has reported [`proto::runner::FromRunner::Running`].
    pub running: bool,
    /// What the runner reported about the guest's end, if anything.
    pub exit: Option<(GuestExit, String)>,
    /// Whether the supervisor killed it.
    pub killed: bool,
    /// The device processes of this boot, in PCI order.
    pub devices: Vec<DeviceProcess>,
    /// The guest RAM memfd, kept for the devices of this boot.
    pub memory: OwnedFd,
    /// This boot's dev-fb (VNC server), if the guest has graphics.
    pub display: Option<crate::graphics::DevFb>,
}

impl RunnerProcess {
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Sends SIGKILL (once) and remembers that the supervisor did.
    pub fn kill(&mut self) {
        if !self.killed {
            self.killed = true;
            if let Err(e) = self.process.kill() {
                tracing::warn!(error = %e, "killing the vcpu-runner failed");
            }
        }
    }

    /// Reaps the exited process.
    pub fn reap(&mut self) -> io::Result<ExitStatus> {
        self.process.wait()
    }

    /// Kills and reaps the device processes of this boot.
    pub fn stop_devices(&mut self) {
        for device in &mut self.devices {
            device.stop();
        }
        if let Some(display) = &mut self.display {
            display.stop();
        }
    }
}

impl Drop for RunnerProcess {
    /// A runner is never left behind: one still running when the supervisor lets go of it
    /// (an error path) is killed and reaped.
    fn drop(&mut self) {
        if let Ok(None) = self.process.try_wait() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// What a boot needs besides the plan.
#[derive(Debug)]
pub struct BootContext<'a> {
    pub name: &'a str,
    pub runner_binary: &'a Path,
    /// Where the runner logs (its `tracing` output).
    pub runner_log: BorrowedFd<'a>,
    pub dev_blk_binary: &'a Path,
    pub dev_net_binary: &'a Path,
    /// One log per disk of the plan, in its order.
    pub disk_logs: &'a [BorrowedFd<'a>],
    /// One log per NIC of the plan, in its order.
    pub nic_logs: &'a [BorrowedFd<'a>],
    /// One tap per NIC of the plan, in its order (held by the supervisor for the run).
    pub taps: &'a [TapRef<'a>],
    /// The graphical console, if the guest has one.
    pub display: Option<DisplayContext<'a>>,
}

/// What a boot's display needs: the run's console (framebuffer, listener), dev-fb and its log.
#[derive(Debug, Clone, Copy)]
pub struct DisplayContext<'a> {
    pub console: &'a crate::graphics::Console,
    pub dev_fb_binary: &'a Path,
    pub log: BorrowedFd<'a>,
}

/// The machine `plan` describes, with the display's resolutions (`graphics_res`, as dev-fb's
/// setup has them) for the bochs display's EDID and maxima.
fn machine_config(plan: &BootPlan, ctx: &BootContext<'_>) -> MachineConfig {
    MachineConfig {
        cpus: plan.cpus,
        memory_bytes: plan.memory_bytes,
        cmdline: plan.cmdline.clone(),
        utctime: plan.utctime,
        local_offset_secs: vmlog::local_time(SystemTime::now()).offset_secs,
        uuid: plan.uuid,
        display: ctx.display.map(|d| DisplayModes {
            width: d.console.setup.width,
            height: d.console.setup.height,
            max_width: d.console.setup.max_width,
            max_height: d.console.setup.max_height,
        }),
    }
}

/// Opens everything, starts the runner in its sandbox and sends it the machine.
pub fn boot(plan: &BootPlan, ctx: &BootContext<'_>) -> Result<RunnerProcess, BootError> {
    let machine = machine_config(plan, ctx);
    machine.validate()?;
    let memory = guest_memory(plan.memory_bytes)?;
    let kvm_path = std::env::var_os(KVM_DEVICE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(KVM_DEVICE), PathBuf::from);
    let kvm = open(&kvm_path, true)?;
    let kernel = open(&plan.kernel, false)?;
    let initrd = plan
        .initrd
        .as_ref()
        .map(|path| open(path, false))
        .transpose()?;
    let devices = start_devices(plan, ctx, memory.as_fd())?;
    let (console, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(BootError::Console)?;

    let mut roles = vec![
        FdRole::Log,
        FdRole::Kvm,
        FdRole::GuestMemory,
        FdRole::Kernel,
    ];
    let mut fds = vec![ctx.runner_log, kvm.as_fd(), memory.as_fd(), kernel.as_fd()];
    if let Some(initrd) = &initrd {
        roles.push(FdRole::Initrd);
        fds.push(initrd.as_fd());
    }
    roles.push(FdRole::Console);
    fds.push(theirs.as_fd());
    let (display, display_end, input_ends) = start_display(ctx, memory.as_fd(), plan.memory_bytes)?;
    // The input devices' PCI slots follow the disks and NICs.
    for end in devices.runner_ends.iter().chain(&input_ends) {
        roles.push(FdRole::DeviceChannel);
        fds.push(end.as_fd());
    }
    if let (Some(d), Some(end)) = (&ctx.display, &display_end) {
        roles.push(FdRole::Framebuffer);
        fds.push(d.console.framebuffer.as_fd());
        roles.push(FdRole::DisplayChannel);
        fds.push(end.as_fd());
    }
    let (uid, gid) = sandbox::nobody();
    let bootstrap = Bootstrap {
        role: Role::VcpuRunner,
        vm_name: ctx.name.to_owned(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: runner_max_fds(devices.runner_ends.len() + input_ends.len()),
        },
        fds: roles,
        log_filter: std::env::var(RUNNER_LOG_ENV).unwrap_or_else(|_| "info".to_owned()),
    };
    let spawned = spawn::spawn(ctx.runner_binary, &bootstrap, &fds)?;
    let mut runner = RunnerProcess {
        pidfd: match pidfd_open(spawned.process.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let mut process = spawned.process;
                let _ = process.kill();
                let _ = process.wait();
                return Err(BootError::Pidfd(e));
            }
        },
        process: spawned.process,
        channel: Some(spawned.channel),
        console,
        running: false,
        exit: None,
        killed: false,
        devices: devices.processes,
        memory,
        display,
    };
    let sent = runner
        .channel
        .as_ref()
        .map_or(Err(ChannelError::Closed), |c| {
            c.send(&ToRunner::Boot(machine), &[])
        });
    if let Err(e) = sent {
        runner.kill();
        let _ = runner.reap();
        return Err(BootError::Send(e));
    }
    Ok(runner)
}

/// The runner's ends of a boot's display: the display channel and one device channel per
/// virtio-input device dev-fb serves.
type DisplayEnds = (
    Option<crate::graphics::DevFb>,
    Option<Channel>,
    Vec<Channel>,
);

/// The display of a boot, if the guest has one: the runner maps the framebuffer as the bochs
/// display's BAR0 and sends mode changes to this boot's dev-fb on the display channel; dev-fb
/// also serves the keyboard (and tablet) on guest RAM `memory`. The runner's ends are
/// returned.
fn start_display(
    ctx: &BootContext<'_>,
    memory: BorrowedFd<'_>,
    memory_bytes: u64,
) -> Result<DisplayEnds, BootError> {
    let Some(d) = &ctx.display else {
        return Ok((None, None, Vec::new()));
    };
    launch_dev_fb(d, ctx.name, memory, memory_bytes)
}

/// Starts a dev-fb for display `d` on guest RAM `memory`, with a new display channel and a new
/// channel per input device: at boot, and again after dev-fb died (the runner then gets the
/// returned ends in `ToRunner::ReplaceDisplay` and `ReplaceDevice`).
pub fn launch_dev_fb(
    d: &DisplayContext<'_>,
    name: &str,
    memory: BorrowedFd<'_>,
    memory_bytes: u64,
) -> Result<DisplayEnds, BootError> {
    let (runner_end, fb_end) = Channel::pair().map_err(BootError::DisplayChannel)?;
    let kinds = d.console.input_kinds();
    let mut runner_inputs = Vec::with_capacity(kinds.len());
    let mut fb_inputs = Vec::with_capacity(kinds.len());
    for _ in &kinds {
        let (r, f) = Channel::pair().map_err(BootError::DisplayChannel)?;
        runner_inputs.push(r);
        fb_inputs.push(f);
    }
    let input = crate::graphics::InputFds {
        memory,
        setup: proto::device::InputSetup {
            memory: proto::device::guest_ram_layout(memory_bytes),
            devices: kinds,
        },
        channels: fb_inputs.iter().map(AsFd::as_fd).collect(),
    };
    let dev_fb = crate::graphics::start_dev_fb(
        d.dev_fb_binary,
        name,
        d.log,
        d.console,
        Some(fb_end.as_fd()),
        Some(&input),
    )
    .map_err(BootError::Display)?;
    Ok((Some(dev_fb), Some(runner_end), runner_inputs))
}

/// The boot's device processes: disks, then NICs, on guest RAM `memory`.
fn start_devices(
    plan: &BootPlan,
    ctx: &BootContext<'_>,
    memory: BorrowedFd<'_>,
) -> Result<devices::Devices, DeviceError> {
    devices::start_devices(
        &plan.disks,
        &plan.nics,
        &DeviceContext {
            vm_name: ctx.name,
            dev_blk_binary: ctx.dev_blk_binary,
            dev_net_binary: ctx.dev_net_binary,
            logs: ctx.disk_logs,
            nic_logs: ctx.nic_logs,
            taps: ctx.taps,
            memory,
            memory_bytes: plan.memory_bytes,
            cpus: plan.cpus,
        },
    )
}

/// The runner's fd ceiling with `devices` devices, within the sandbox's bound.
fn runner_max_fds(devices: usize) -> u32 {
    let devices = u32::try_from(devices).unwrap_or(u32::MAX);
    RUNNER_FDS_PER_DEVICE
        .saturating_mul(devices)
        .saturating_add(RUNNER_BASE_FDS)
        .min(proto::bootstrap::MAX_SANDBOX_FDS)
}

/// A fresh guest RAM memfd of `bytes`, sealed against shrinking, growing and further seals.
fn guest_memory(bytes: u64) -> Result<OwnedFd, BootError> {
    let fd = memfd_create(
        c"capvm-guest-ram",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(BootError::Memory)?;
    let len = libc::off_t::try_from(bytes).map_err(|_| BootError::Memory(nix::Error::EFBIG))?;
    nix::unistd::ftruncate(&fd, len).map_err(BootError::Memory)?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(BootError::Memory)?;
    Ok(fd)
}

fn open(path: &Path, write: bool) -> Result<File, BootError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| BootError::Open {
            path: path.to_owned(),
            source,
        })
}

/// A pidfd for `pid`, readable once the process exits.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor (close-on-exec by default) and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How a runner's exit status reads in the log.
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(libc::SIGSYS)) => "killed by its seccomp filter (SIGSYS)".to_owned(),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_owned());
            format!("killed by {name}")
        }
        (None, None) => "ended".to_owned(),
    }
}

/// The resident set size of `pid` in KiB (`VmRSS` of `/proc/PID/status`); 0 if unknown.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// The size of the file behind `fd`.
pub fn fd_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(fd)?;
    u64::try_from(st.st_size).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_is_sized_and_sealed() {
        let fd = guest_memory(4 << 20).unwrap();
        assert_eq!(fd_size(fd.as_fd()).unwrap(), 4 << 20);
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap();
        let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        assert_eq!(
            SealFlag::from_bits_truncate(seals) & want,
            want,
            "seals {seals:#x}"
        );
        assert!(nix::unistd::ftruncate(&fd, 2 << 20).is_err());
    }

    #[test]
    fn statuses_read_as_log_text() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_status(ExitStatus::from_raw(0x100)), "exit code 1");
        assert_eq!(
            describe_status(ExitStatus::from_raw(libc::SIGSYS)),
            "killed by its seccomp filter (SIGSYS)"
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by SIGKILL"
        );
    }

    #[test]
    fn own_rss_is_known() {
        assert!(rss_kib(std::process::id()) > 0);
        assert_eq!(rss_kib(u32::MAX), 0);
    }
}
