//! The per-VM supervisor: `vm _run NAME` (forked by `vm start`), or `vm start -f NAME` in the
//! foreground.
//!
//! It holds the guest's run lock for its whole life, serves the control socket
//! ([`crate::control_socket`]), starts a vcpu-runner per boot ([`runner`]) and watches it,
//! keeps the console ring and its viewers ([`viewers`]), and writes `vm-bhyve.log`. One thread
//! polls everything: the control listener, the runner's channel, its pidfd, its console, each
//! viewer, a signalfd, and the nearest deadline as the poll timeout.
//!
//! The run loop is vm-bhyve's: a guest reboot boots it again in place (a new runner and new
//! guest RAM), a poweroff ends it, a triple fault or a crashed runner ends it unless
//! `on_fault="restart"`. What the runner says is checked ([`FromRunner::validate`]): it runs
//! guest-controlled code paths and may be compromised. A malformed message kills it.
//!
//! Each boot also starts a `dev-blk` per disk and a `dev-net` per NIC ([`devices`]); the
//! supervisor watches their pidfds too, logs a device that dies, and kills and reaps them all
//! when the boot ends. The NICs' taps are made once per run, before the first boot
//! ([`network`]), and held until the guest ends; then they are closed and netcfg deletes what
//! is left of them.
//!
//! Files: `GUEST_DIR/run.lock` (held), `GUEST_DIR/run/control.sock`, `GUEST_DIR/vm-bhyve.log`
//! (lifecycle lines), `GUEST_DIR/vcpu-runner.log` (the runner's own `tracing` output),
//! `GUEST_DIR/dev-blkN.log` (disk N's device), `GUEST_DIR/dev-netN.log` (NIC N's device) and
//! `GUEST_DIR/netcfg.log`, truncated at each start and appended to by each boot of that run.

mod control;
pub mod devices;
pub mod network;
pub mod runner;
pub mod viewers;
pub mod wait;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{MsgFlags, recv, send};
use proto::channel::ChannelError;
use proto::runner::{FromRunner, GuestExit, ToRunner};

use self::devices::TapRef;
use self::network::{GuestNetwork, NETCFG_LOG_FILE, NetworkError};
use self::runner::{BootContext, BootError, RunnerProcess};
use self::viewers::{Input, MAX_INPUT_BACKLOG, Viewer};
use crate::control_socket::{self, ControlSocketError};
use crate::guest_config::OnFault;
use crate::preflight::BootPlan;
use crate::ring::{CONSOLE_RING_BYTES, Ring};
use crate::state::{GuestLock, StateError};
use crate::vmlog::{VmLog, VmLogError};

/// The runner's log file in the guest directory.
pub const RUNNER_LOG_FILE: &str = "vcpu-runner.log";

/// The log file of disk `index`'s dev-blk in the guest directory.
pub fn disk_log_file(index: u32) -> String {
    format!("dev-blk{index}.log")
}

/// dev-fb's log file in the guest directory.
pub const DEV_FB_LOG_FILE: &str = "dev-fb.log";

/// The log file of NIC `index`'s dev-net in the guest directory.
pub fn nic_log_file(index: u32) -> String {
    format!("dev-net{index}.log")
}

/// How long a runner may take from its start to `Running`.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a runner may linger after reporting the guest's end, or after SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// `on_fault="restart"` gives up after this many fault restarts within [`FAULT_WINDOW`].
const MAX_FAULT_RESTARTS: usize = 5;
const FAULT_WINDOW: Duration = Duration::from_mins(1);
/// A device process that dies more than this many times within [`DEVICE_DEATH_WINDOW`] is
/// marked failed and not restarted again.
pub const MAX_DEVICE_DEATHS: usize = 5;
/// The window [`MAX_DEVICE_DEATHS`] counts in.
pub const DEVICE_DEATH_WINDOW: Duration = Duration::from_mins(1);
/// The delay before restarting a device after its second death within the window; it doubles
/// with each further death, up to [`MAX_DEVICE_BACKOFF`]. The first death restarts at once.
const DEVICE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_DEVICE_BACKOFF: Duration = Duration::from_secs(5);

/// How long to wait before restarting a device that died for the `deaths`-th time within the
/// window: nothing for the first, then 100 ms, 200 ms, … up to 5 s.
pub fn device_backoff(deaths: usize) -> Duration {
    if deaths <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(deaths - 2).unwrap_or(u32::MAX).min(16);
    DEVICE_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_DEVICE_BACKOFF)
}

/// Why the supervisor could not run the guest.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Lock(#[from] StateError),
    #[error(transparent)]
    Log(#[from] VmLogError),
    #[error("opening {path} failed")]
    RunnerLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Control(#[from] ControlSocketError),
    #[error("starting the guest failed")]
    Boot(#[from] BootError),
    #[error("setting up the guest's network failed")]
    Network(#[from] NetworkError),
    #[error("setting up the graphical console failed")]
    Graphics(#[source] crate::graphics::GraphicsError),
    #[error("the guest did not start: {0}")]
    NotStarted(String),
    #[error("setting up signal handling failed")]
    Signals(#[source] nix::Error),
    #[error("polling failed")]
    Poll(#[source] nix::Error),
    #[error("waiting for a VNC client failed")]
    Wait(#[source] nix::Error),
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered itself off (after `vm stop`'s button press, or on its own).
    PoweredOff,
    /// The supervisor pulled the plug (`vm poweroff`, or a stop that timed out).
    ForcedOff,
    /// A triple fault, a crashed vCPU or a runner that died.
    Faulted,
}

/// What the supervisor runs.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub name: String,
    pub guest_dir: PathBuf,
    pub plan: BootPlan,
    /// The `vcpu-runner` executable.
    pub runner_binary: PathBuf,
    /// The `dev-blk` executable.
    pub dev_blk_binary: PathBuf,
    /// The `dev-net` executable.
    pub dev_net_binary: PathBuf,
}

/// What the user asked for, which decides what the runner's end means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Run,
    /// `vm stop`: the button was pressed; force it off at the deadline.
    Stop {
        deadline: Option<Instant>,
        secs: u32,
    },
    /// `vm restart`: as stop, then boot again.
    Restart {
        deadline: Option<Instant>,
        secs: u32,
    },
    Poweroff,
    Reset,
}

/// The guest's COM1 as the supervisor holds it.
#[derive(Debug)]
struct Console {
    ring: Ring,
    /// Typed input waiting for the runner to take it.
    to_guest: VecDeque<u8>,
    /// The runner closed its end.
    eof: bool,
    viewers: Vec<Viewer>,
}

/// The supervisor's state while the guest runs.
struct Monitor<'a> {
    cfg: MonitorConfig,
    log: &'a mut VmLog,
    runner_log: File,
    /// One per disk of the plan, in its order.
    disk_logs: Vec<File>,
    /// One per NIC of the plan, in its order.
    nic_logs: Vec<File>,
    /// The NICs' taps, for the whole run.
    network: GuestNetwork,
    listener: OwnedFd,
    signals: SignalFd,
    console: Console,
    runner: RunnerProcess,
    graphics: Option<RunGraphics>,
    intent: Intent,
    boot_deadline: Option<Instant>,
    exit_deadline: Option<Instant>,
    started_at: Instant,
    restarts: u32,
    fault_restarts: VecDeque<Instant>,
    on_started: Option<&'a mut dyn FnMut(Result<(), String>)>,
}

#[derive(Debug, Clone, Copy)]
enum Token {
    Listener,
    Signal,
    Channel,
    Pidfd,
    /// The pidfd of device `n` of the current boot.
    DevicePidfd(usize),
    /// The pidfd of the current boot's dev-fb.
    DisplayPidfd,
    /// The VNC listener, while dev-fb is failed: clients are refused with a reason.
    VncRefusal,
    Console,
    ViewerIn(usize),
    ViewerOut(usize),
}

/// Runs the guest until it ends.
///
/// `terminal` (stdin, stdout) makes it the foreground of `vm start -f`. `on_started` is called
/// once: `Ok` when the first boot reports the guest running, or the reason it did not.
pub fn run(
    cfg: &MonitorConfig,
    terminal: Option<(OwnedFd, OwnedFd)>,
    on_started: &mut dyn FnMut(Result<(), String>),
) -> Result<Outcome, MonitorError> {
    let mut lock = GuestLock::acquire(&cfg.guest_dir)?;
    lock.write_pid(std::process::id())?;
    let result = run_locked(cfg, terminal, on_started);
    let _ = std::fs::remove_file(control_socket::socket_path(&cfg.guest_dir));
    if let Err(e) = lock.remove() {
        tracing::warn!(error = %e, "removing the run lock failed");
    }
    result
}

fn run_locked(
    cfg: &MonitorConfig,
    terminal: Option<(OwnedFd, OwnedFd)>,
    on_started: &mut dyn FnMut(Result<(), String>),
) -> Result<Outcome, MonitorError> {
    let mut log = VmLog::open(&cfg.guest_dir)?;
    log.line("initialising");
    let result = start_and_watch(cfg.clone(), &mut log, terminal, on_started);
    match &result {
        Ok(outcome) => log.line(&format!("exited ({})", outcome_text(*outcome))),
        Err(e) => log.line(&format!("exited: {}", crate::list::error_chain(e))),
    }
    result
}

fn outcome_text(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::PoweredOff => "powered off",
        Outcome::ForcedOff => "forced off",
        Outcome::Faulted => "fault",
    }
}

fn start_and_watch(
    cfg: MonitorConfig,
    log: &mut VmLog,
    terminal: Option<(OwnedFd, OwnedFd)>,
    on_started: &mut dyn FnMut(Result<(), String>),
) -> Result<Outcome, MonitorError> {
    let listener = control_socket::listen_at(&cfg.guest_dir)?;
    let (runner_log, disk_logs, nic_logs) = open_logs(&cfg)?;
    let signals = block_signals()?;
    let network = match start_network(&cfg, log) {
        Ok(network) => network,
        Err(e) => {
            let text = crate::list::error_chain(&e);
            log.line(&format!("failed to set up the network: {text}"));
            on_started(Err(text));
            return Err(e);
        }
    };
    let graphics = match start_graphics(&cfg) {
        Ok(g) => g,
        Err(e) => {
            let text = crate::list::error_chain(&e);
            log.line(&format!("failed to set up the graphical console: {text}"));
            on_started(Err(text));
            return Err(e);
        }
    };
    // With `graphics_wait`, `vm start` is told the guest started before the wait (vm-bhyve's
    // start returns too); the boot's own report then goes nowhere.
    let mut told_already = |_: Result<(), String>| {};
    let on_started: &mut dyn FnMut(Result<(), String>) = match wait_before_boot(
        &cfg,
        log,
        graphics.as_ref(),
        &listener,
        &signals,
        on_started,
    ) {
        Ok(BeforeBoot::Boot { waited: false }) => on_started,
        Ok(BeforeBoot::Boot { waited: true }) => &mut told_already,
        Ok(BeforeBoot::Stopped(why)) => {
            let _ = std::fs::remove_file(cfg.guest_dir.join(CONSOLE_FILE));
            let mut network = network;
            let _ = network.stop();
            log.line(&format!(
                "{why} before a VNC client connected; the guest never booted"
            ));
            return Ok(Outcome::PoweredOff);
        }
        Err(e) => return Err(e),
    };
    let runner = match boot(
        &cfg,
        &runner_log,
        &disk_logs,
        &nic_logs,
        &network,
        graphics.as_ref(),
    ) {
        Ok(r) => r,
        Err(e) => {
            let text = crate::list::error_chain(&e);
            log.line(&format!("failed to start vcpu-runner: {text}"));
            on_started(Err(text));
            return Err(e.into());
        }
    };
    log_boot(log, &cfg, &runner, &network);
    let mut viewers = Vec::new();
    if let Some((input, output)) = terminal {
        viewers.push(Viewer::terminal(input, output));
    }
    let mut monitor = Monitor {
        cfg,
        log,
        runner_log,
        disk_logs,
        nic_logs,
        network,
        listener,
        signals,
        console: Console {
            ring: Ring::new(CONSOLE_RING_BYTES),
            to_guest: VecDeque::new(),
            eof: false,
            viewers,
        },
        runner,
        graphics,
        intent: Intent::Run,
        boot_deadline: Instant::now().checked_add(BOOT_TIMEOUT),
        exit_deadline: None,
        started_at: Instant::now(),
        restarts: 0,
        fault_restarts: VecDeque::new(),
        on_started: Some(on_started),
    };
    let outcome = monitor.watch();
    monitor.tear_down();
    outcome
}

/// What happens before the first boot.
enum BeforeBoot {
    /// Boot; `waited` when a VNC client was waited for (and `vm start` already told).
    Boot { waited: bool },
    /// The run ended while waiting (`vm stop`, `vm poweroff`, a signal): why.
    Stopped(String),
}

/// `graphics_wait="yes"` (and `"auto"` during `vm install`): tells `vm start` the guest started,
/// then waits for a VNC client ([`wait`]).
fn wait_before_boot(
    cfg: &MonitorConfig,
    log: &mut VmLog,
    graphics: Option<&RunGraphics>,
    control: &OwnedFd,
    signals: &SignalFd,
    on_started: &mut dyn FnMut(Result<(), String>),
) -> Result<BeforeBoot, MonitorError> {
    let waits = cfg
        .plan
        .graphics
        .as_ref()
        .is_some_and(|g| g.wait == crate::guest_config::GraphicsWait::Yes);
    let Some(g) = graphics.filter(|_| waits) else {
        return Ok(BeforeBoot::Boot { waited: false });
    };
    let endpoint = g.console.endpoint();
    log.line(&format!(
        "waiting for a VNC client on {endpoint} before booting (graphics_wait)"
    ));
    on_started(Ok(()));
    match wait::wait_for_viewer(&g.console.listener, &endpoint, control, signals) {
        Ok(wait::Waited::Client) => {
            log.line("a VNC client connected; booting");
            Ok(BeforeBoot::Boot { waited: true })
        }
        Ok(wait::Waited::Stopped(why)) => Ok(BeforeBoot::Stopped(why)),
        Err(e) => {
            log.line(&format!("waiting for a VNC client failed: {e}"));
            Err(MonitorError::Wait(e))
        }
    }
}

/// The run's log files: the runner's, each disk's dev-blk's, each NIC's dev-net's.
fn open_logs(cfg: &MonitorConfig) -> Result<(File, Vec<File>, Vec<File>), MonitorError> {
    let runner_log = open_log(&cfg.guest_dir.join(RUNNER_LOG_FILE))?;
    let disk_logs = cfg
        .plan
        .disks
        .iter()
        .map(|d| open_log(&cfg.guest_dir.join(disk_log_file(d.index))))
        .collect::<Result<Vec<_>, _>>()?;
    let nic_logs = cfg
        .plan
        .nics
        .iter()
        .map(|n| open_log(&cfg.guest_dir.join(nic_log_file(n.index))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((runner_log, disk_logs, nic_logs))
}

/// Reaps a device process that ended; records its `status` and describes it for the log.
fn reap(
    process: &mut std::process::Child,
    status: &mut Option<std::process::ExitStatus>,
) -> String {
    match process.wait() {
        Ok(s) => {
            *status = Some(s);
            runner::describe_status(s)
        }
        Err(e) => {
            // Not reapable: stop polling it rather than spin.
            *status = Some(std::os::unix::process::ExitStatusExt::from_raw(0));
            format!("status unknown ({e})")
        }
    }
}

/// What a device process's death means for its restart budget.
enum Death {
    /// Restart it at the time set in `restart_at`.
    Restart,
    /// More than [`MAX_DEVICE_DEATHS`] deaths within [`DEVICE_DEATH_WINDOW`] (this many): fail
    /// it; `restart_at` is cleared.
    Failed(usize),
}

/// Counts a death now in `deaths` (which keeps the last [`DEVICE_DEATH_WINDOW`]) and sets
/// `restart_at` after the [`device_backoff`] for that count, or fails the process.
fn count_death(deaths: &mut VecDeque<Instant>, restart_at: &mut Option<Instant>) -> Death {
    let now = Instant::now();
    deaths.push_back(now);
    while deaths
        .front()
        .is_some_and(|t| now.duration_since(*t) > DEVICE_DEATH_WINDOW)
    {
        deaths.pop_front();
    }
    if deaths.len() > MAX_DEVICE_DEATHS {
        *restart_at = None;
        return Death::Failed(deaths.len());
    }
    *restart_at = now.checked_add(device_backoff(deaths.len()));
    Death::Restart
}

/// Makes the NICs' taps for this run (none without NICs) and logs them.
fn start_network(cfg: &MonitorConfig, log: &mut VmLog) -> Result<GuestNetwork, MonitorError> {
    if cfg.plan.nics.is_empty() {
        return Ok(GuestNetwork::default());
    }
    let netcfg_log = GuestNetwork::needs_netcfg(&cfg.plan)
        .then(|| open_log(&cfg.guest_dir.join(NETCFG_LOG_FILE)))
        .transpose()?;
    let (network, deleted) =
        GuestNetwork::start(&cfg.name, &cfg.plan, netcfg_log.as_ref().map(AsFd::as_fd))?;
    if !deleted.is_empty() {
        log.line(&format!(
            "deleted taps an earlier run left: {}",
            deleted.join(", ")
        ));
    }
    for (tap, nic) in network.taps.iter().zip(&cfg.plan.nics) {
        let on = match &nic.backend {
            crate::preflight::NicBackend::Tap {
                switch: Some(switch),
                bridge: Some(bridge),
                ..
            } => format!(" on switch {switch} ({bridge})"),
            crate::preflight::NicBackend::Tap { .. } => " on no switch".to_owned(),
            crate::preflight::NicBackend::Device { .. } => " (networkN_device)".to_owned(),
        };
        log.line(&format!(
            "network{}: tap {}{on}, mtu {}",
            tap.index, tap.name, tap.mtu
        ));
    }
    Ok(network)
}

/// Starts one boot: its devices and its runner, with the run's logs and taps.
fn boot(
    cfg: &MonitorConfig,
    runner_log: &File,
    disk_logs: &[File],
    nic_logs: &[File],
    network: &GuestNetwork,
    graphics: Option<&RunGraphics>,
) -> Result<RunnerProcess, BootError> {
    let disk_log_fds: Vec<_> = disk_logs.iter().map(AsFd::as_fd).collect();
    let nic_log_fds: Vec<_> = nic_logs.iter().map(AsFd::as_fd).collect();
    let taps: Vec<TapRef<'_>> = network.tap_refs();
    let ctx = BootContext {
        name: &cfg.name,
        runner_binary: &cfg.runner_binary,
        runner_log: runner_log.as_fd(),
        dev_blk_binary: &cfg.dev_blk_binary,
        dev_net_binary: &cfg.dev_net_binary,
        disk_logs: &disk_log_fds,
        nic_logs: &nic_log_fds,
        taps: &taps,
        display: graphics.map(|g| runner::DisplayContext {
            console: &g.console,
            dev_fb_binary: &g.dev_fb_binary,
            log: g.log.as_fd(),
        }),
    };
    runner::boot(&cfg.plan, &ctx)
}

/// The graphical console of a run: kept across reboots (the same port, the same framebuffer),
/// with a dev-fb per boot.
#[derive(Debug)]
struct RunGraphics {
    console: crate::graphics::Console,
    dev_fb_binary: PathBuf,
    log: File,
}

/// The vm-bhyve `console` file of a guest, whose `vnc=` line `vm list` shows.
const CONSOLE_FILE: &str = "console";

/// Binds the VNC port and makes the framebuffer for `cfg`'s guest, if it has graphics, and
/// writes the address where `vm list` reads it.
fn start_graphics(cfg: &MonitorConfig) -> Result<Option<RunGraphics>, MonitorError> {
    let Some(g) = &cfg.plan.graphics else {
        return Ok(None);
    };
    let console =
        crate::graphics::Console::new(g, g.password.clone()).map_err(MonitorError::Graphics)?;
    let log = open_log(&cfg.guest_dir.join(DEV_FB_LOG_FILE))?;
    let _ = std::fs::write(
        cfg.guest_dir.join(CONSOLE_FILE),
        format!("vnc={}\n", console.endpoint()),
    );
    Ok(Some(RunGraphics {
        console,
        dev_fb_binary: crate::spawn::binary_path(crate::graphics::DEV_FB_BINARY),
        log,
    }))
}

/// Opens a child's log file, truncated.
fn open_log(path: &std::path::Path) -> Result<File, MonitorError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| MonitorError::RunnerLog {
            path: path.to_owned(),
            source,
        })
}

/// The `vm-bhyve.log` lines of a boot: its devices, then its runner.
fn log_boot(log: &mut VmLog, cfg: &MonitorConfig, runner: &RunnerProcess, network: &GuestNetwork) {
    let mut devices = runner.devices.iter();
    // Disks first in the zip: it stops at the last disk without taking a NIC's device.
    for (disk, device) in cfg.plan.disks.iter().zip(devices.by_ref()) {
        let ro = if disk.read_only { ", read-only" } else { "" };
        log.line(&format!(
            "starting {} (pid {}) for {}{ro}",
            device.name,
            device.pid(),
            disk.path.display()
        ));
    }
    for (device, tap) in devices.zip(&network.taps) {
        log.line(&format!(
            "starting {} (pid {}) for tap {}",
            device.name,
            device.pid(),
            tap.name
        ));
    }
    if let Some(dev_fb) = &runner.display {
        log.line(&format!("starting dev-fb (pid {}) for VNC", dev_fb.pid()));
    }
    log.line(&format!("starting vcpu-runner (pid {})", runner.pid()));
}

/// Blocks SIGTERM, SIGINT and SIGHUP and returns a signalfd for them: the first asks the guest
/// to shut down, as `vm stop` does; a second one pulls the plug.
fn block_signals() -> Result<SignalFd, MonitorError> {
    let mut mask = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(sig);
    }
    mask.thread_block().map_err(MonitorError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(MonitorError::Signals)
}

impl Monitor<'_> {
    fn watch(&mut self) -> Result<Outcome, MonitorError> {
        loop {
            let events = self.wait()?;
            let mut runner_ended = false;
            for (token, flags) in events {
                match token {
                    Token::Listener => self.accept_clients(),
                    Token::Signal => self.on_signal(),
                    Token::Channel => self.on_runner_message(),
                    Token::Pidfd => runner_ended = true,
                    Token::DevicePidfd(i) => self.on_device_exit(i),
                    Token::DisplayPidfd => self.on_display_exit(),
                    Token::VncRefusal => self.refuse_vnc_clients(),
                    Token::Console => {
                        if flags.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                            self.read_console();
                        }
                        if flags.contains(PollFlags::POLLOUT) {
                            self.write_console();
                        }
                    }
                    Token::ViewerIn(i) => self.read_viewer(i),
                    Token::ViewerOut(i) => {
                        if let Some(v) = self.console.viewers.get_mut(i) {
                            v.flush();
                        }
                    }
                }
            }
            self.console.viewers.retain(|v| !v.is_closed());
            self.check_deadlines();
            if runner_ended && let Some(outcome) = self.on_runner_exit() {
                return Ok(outcome);
            }
        }
    }

    /// Polls until something happens or the nearest deadline passes.
    /// After the run: tells a `vm start` still waiting, flushes the viewers, stops the devices,
    /// removes the `console` file and the taps.
    fn tear_down(&mut self) {
        if let Some(notify) = self.on_started.take() {
            notify(Err("the guest ended before it was running".to_owned()));
        }
        for viewer in &mut self.console.viewers {
            viewer.flush();
        }
        self.runner.stop_devices();
        if self.graphics.take().is_some() {
            let _ = std::fs::remove_file(self.cfg.guest_dir.join(CONSOLE_FILE));
        }
        let had_taps = !self.network.taps.is_empty();
        let deleted = self.network.stop();
        if had_taps {
            let mut line = "network stopped, taps closed".to_owned();
            if !deleted.is_empty() {
                let _ = write!(line, " (netcfg deleted {})", deleted.join(", "));
            }
            self.log.line(&line);
        }
    }

    fn wait(&self) -> Result<Vec<(Token, PollFlags)>, MonitorError> {
        let mut tokens = vec![Token::Listener, Token::Signal, Token::Pidfd];
        let mut fds = vec![
            PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.runner.pidfd.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(channel) = &self.runner.channel {
            tokens.push(Token::Channel);
            fds.push(PollFd::new(channel.as_fd(), PollFlags::POLLIN));
        }
        for (i, device) in self.runner.devices.iter().enumerate() {
            if device.status.is_none() {
                tokens.push(Token::DevicePidfd(i));
                fds.push(PollFd::new(device.pidfd.as_fd(), PollFlags::POLLIN));
            }
        }
        if let Some(dev_fb) = &self.runner.display
            && dev_fb.status.is_none()
        {
            tokens.push(Token::DisplayPidfd);
            fds.push(PollFd::new(dev_fb.pidfd.as_fd(), PollFlags::POLLIN));
        }
        if let Some(g) = &self.graphics
            && self.runner.display.as_ref().is_some_and(|d| d.failed)
        {
            tokens.push(Token::VncRefusal);
            fds.push(PollFd::new(g.console.listener.as_fd(), PollFlags::POLLIN));
        }
        let mut console_flags = PollFlags::empty();
        if !self.console.eof {
            console_flags |= PollFlags::POLLIN;
        }
        if !self.console.to_guest.is_empty() {
            console_flags |= PollFlags::POLLOUT;
        }
        if !console_flags.is_empty() {
            tokens.push(Token::Console);
            fds.push(PollFd::new(self.runner.console.as_fd(), console_flags));
        }
        for (i, viewer) in self.console.viewers.iter().enumerate() {
            if let Some(fd) = viewer.input_fd() {
                tokens.push(Token::ViewerIn(i));
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            if let Some(fd) = viewer.output_fd() {
                tokens.push(Token::ViewerOut(i));
                fds.push(PollFd::new(fd, PollFlags::POLLOUT));
            }
        }
        let timeout = self.next_deadline().map_or(PollTimeout::NONE, |at| {
            let ms = at
                .saturating_duration_since(Instant::now())
                .as_millis()
                .saturating_add(1);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        });
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(MonitorError::Poll(e)),
        }
        Ok(tokens
            .into_iter()
            .zip(fds.iter())
            .filter_map(|(t, fd)| fd.revents().filter(|r| !r.is_empty()).map(|r| (t, r)))
            .collect())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let stop = match self.intent {
            Intent::Stop { deadline, .. } | Intent::Restart { deadline, .. } => deadline,
            _ => None,
        };
        let restart = self
            .runner
            .devices
            .iter()
            .filter_map(|d| d.restart_at)
            .min();
        let display = self.runner.display.as_ref().and_then(|d| d.restart_at);
        [
            self.boot_deadline,
            self.exit_deadline,
            stop,
            restart,
            display,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        if self.boot_deadline.is_some_and(|d| now >= d) {
            self.boot_deadline = None;
            self.log.line(&format!(
                "vcpu-runner did not report the guest running within {} s",
                BOOT_TIMEOUT.as_secs()
            ));
            self.kill_runner();
        }
        if self.exit_deadline.is_some_and(|d| now >= d) {
            self.exit_deadline = None;
            self.runner.kill();
        }
        for i in 0..self.runner.devices.len() {
            if self.runner.devices[i].restart_at.is_some_and(|d| now >= d) {
                self.runner.devices[i].restart_at = None;
                self.restart_device(i);
            }
        }
        if let Some(dev_fb) = self.runner.display.as_mut()
            && dev_fb.restart_at.is_some_and(|d| now >= d)
        {
            dev_fb.restart_at = None;
            self.restart_display();
        }
        match self.intent {
            Intent::Stop {
                deadline: Some(d),
                secs,
            } if now >= d => {
                self.intent = Intent::Stop {
                    deadline: None,
                    secs,
                };
                self.log
                    .line(&format!("did not power off within {secs} s, forced off"));
                self.kill_runner();
            }
            Intent::Restart {
                deadline: Some(d),
                secs,
            } if now >= d => {
                self.intent = Intent::Restart {
                    deadline: None,
                    secs,
                };
                self.log
                    .line(&format!("did not power off within {secs} s, forced off"));
                self.kill_runner();
            }
            _ => {}
        }
    }

    fn kill_runner(&mut self) {
        self.runner.kill();
        self.exit_deadline = None;
    }

    fn on_signal(&mut self) {
        let Ok(Some(info)) = self.signals.read_signal() else {
            return;
        };
        let name = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0))
            .map_or("a signal", Signal::as_str);
        match self.intent {
            Intent::Stop { .. } | Intent::Poweroff => {
                self.log
                    .line(&format!("{name} received again, forcing off"));
                self.intent = Intent::Poweroff;
                self.kill_runner();
            }
            _ => {
                self.log
                    .line(&format!("{name} received, sending ACPI shutdown"));
                self.press_power_button(self.cfg.plan.stop_timeout, false);
            }
        }
    }

    fn press_power_button(&mut self, secs: u32, restart: bool) {
        if let Some(channel) = &self.runner.channel
            && let Err(e) = channel.send(&ToRunner::PowerButton, &[])
        {
            tracing::warn!(error = %e, "sending the power button failed");
        }
        let deadline = (secs > 0)
            .then(|| Instant::now().checked_add(Duration::from_secs(u64::from(secs))))
            .flatten();
        self.intent = if restart {
            Intent::Restart { deadline, secs }
        } else {
            Intent::Stop { deadline, secs }
        };
    }

    fn on_runner_message(&mut self) {
        let Some(channel) = &self.runner.channel else {
            return;
        };
        let msg = match channel.recv::<FromRunner>() {
            Ok(received) if received.fds.is_empty() => received.msg,
            Ok(_) => {
                self.reject_runner("sent descriptors it was not asked for");
                return;
            }
            Err(ChannelError::Closed) => {
                self.runner.channel = None;
                return;
            }
            Err(ChannelError::WouldBlock) => return,
            Err(e) => {
                self.reject_runner(&format!("sent a malformed message ({e})"));
                return;
            }
        };
        if let Err(e) = msg.validate() {
            self.reject_runner(&format!("sent an invalid message ({e})"));
            return;
        }
        match msg {
            FromRunner::Running if !self.runner.running => {
                self.runner.running = true;
                self.boot_deadline = None;
                if let Some(notify) = self.on_started.take() {
                    notify(Ok(()));
                }
            }
            FromRunner::Running => {}
            FromRunner::Failed { reason } => {
                self.log
                    .line(&format!("vcpu-runner could not boot the guest: {reason}"));
                self.runner.exit = None;
                self.boot_deadline = None;
                self.fail_start(&reason);
                self.exit_deadline = Instant::now().checked_add(EXIT_GRACE);
            }
            FromRunner::Exited { exit, detail } => {
                self.runner.exit = Some((exit, detail));
                self.exit_deadline = Instant::now().checked_add(EXIT_GRACE);
            }
        }
    }

    fn reject_runner(&mut self, what: &str) {
        self.log.line(&format!("vcpu-runner {what}; killing it"));
        self.kill_runner();
    }

    fn fail_start(&mut self, reason: &str) {
        if let Some(notify) = self.on_started.take() {
            notify(Err(reason.to_owned()));
        }
    }

    /// A device process of this boot ended on its own: log why, then restart it (at once the
    /// first time, with a growing delay after that) unless it died more than
    /// [`MAX_DEVICE_DEATHS`] times within [`DEVICE_DEATH_WINDOW`]; then it is marked failed,
    /// the runner is told (the driver sees the device needing a reset) and the guest runs on
    /// without it.
    fn on_device_exit(&mut self, i: usize) {
        let Some(device) = self.runner.devices.get_mut(i) else {
            return;
        };
        let status = reap(&mut device.process, &mut device.status);
        let line = format!("{} (pid {}) died: {status}", device.name, device.pid());
        tracing::warn!(device = %device.name, %status, "device process died");
        self.log.line(&line);
        if self.runner.exit.is_some() || self.runner.killed || self.runner.channel.is_none() {
            // The boot is ending anyway.
            return;
        }
        self.device_died(i);
    }

    /// Counts a death of device `i` and schedules its restart, or fails it.
    fn device_died(&mut self, i: usize) {
        let Some(device) = self.runner.devices.get_mut(i) else {
            return;
        };
        let Death::Failed(deaths) = count_death(&mut device.deaths, &mut device.restart_at) else {
            return;
        };
        device.failed = true;
        let line = format!(
            "{} died {deaths} times within {} s: marked failed, not restarted again",
            device.name,
            DEVICE_DEATH_WINDOW.as_secs()
        );
        tracing::error!(device = %device.name, "device failed");
        self.log.line(&line);
        self.send_to_runner(
            &ToRunner::DeviceFailed {
                index: u16::try_from(i).unwrap_or(u16::MAX),
            },
            None,
        );
    }

    /// Starts device `i` again and hands the runner its new channel.
    fn restart_device(&mut self, i: usize) {
        let memory = self.runner.memory.as_fd();
        let Some(device) = self.runner.devices.get_mut(i) else {
            return;
        };
        if device.status.is_none() || device.failed {
            return;
        }
        let started = Instant::now();
        match device.respawn(memory) {
            Ok(runner_end) => {
                let line = format!(
                    "{} restarted (pid {}, restart {}, {} ms)",
                    device.name,
                    device.pid(),
                    device.restarts,
                    started.elapsed().as_millis()
                );
                tracing::info!(device = %device.name, pid = device.pid(), "device restarted");
                self.log.line(&line);
                let index = u16::try_from(i).unwrap_or(u16::MAX);
                self.send_to_runner(&ToRunner::ReplaceDevice { index }, Some(runner_end.as_fd()));
            }
            Err(e) => {
                let line = format!(
                    "restarting {} failed: {}",
                    device.name,
                    crate::list::error_chain(&e)
                );
                self.log.line(&line);
                self.device_died(i);
            }
        }
    }

    /// dev-fb ended on its own: log why, then restart it under the devices' policy (at once
    /// the first time, then with a growing delay; failed after [`MAX_DEVICE_DEATHS`] deaths
    /// within [`DEVICE_DEATH_WINDOW`]). VNC clients lose their connection and reconnect to the
    /// same listener; the guest's keyboard and tablet resume from their rings.
    fn on_display_exit(&mut self) {
        let Some(dev_fb) = self.runner.display.as_mut() else {
            return;
        };
        let status = reap(&mut dev_fb.process, &mut dev_fb.status);
        tracing::warn!(%status, "dev-fb died");
        self.log
            .line(&format!("dev-fb (pid {}) died: {status}", dev_fb.pid()));
        if self.runner.exit.is_some() || self.runner.killed || self.runner.channel.is_none() {
            return;
        }
        self.display_died();
    }

    /// A VNC client connected while dev-fb is failed: it is told so (rather than left
    /// waiting for a greeting that never comes) and closed.
    fn refuse_vnc_clients(&mut self) {
        if let Some(g) = &self.graphics {
            let n = crate::graphics::refuse_clients(
                &g.console.listener,
                crate::graphics::DISPLAY_FAILED_REASON,
            );
            tracing::info!(clients = n, "VNC clients refused: dev-fb failed");
        }
    }

    /// The runner's indices of dev-fb's input devices: after the disks and NICs.
    fn input_indices(&self) -> std::ops::Range<u16> {
        let first = u16::try_from(self.runner.devices.len()).unwrap_or(u16::MAX);
        let count = self
            .graphics
            .as_ref()
            .map_or(0, |g| g.console.input_kinds().len());
        let count = u16::try_from(count).unwrap_or(0);
        first..first.saturating_add(count)
    }

    /// Counts a death of dev-fb and schedules its restart, or fails it.
    fn display_died(&mut self) {
        let Some(dev_fb) = self.runner.display.as_mut() else {
            return;
        };
        let Death::Failed(deaths) = count_death(&mut dev_fb.deaths, &mut dev_fb.restart_at) else {
            return;
        };
        dev_fb.failed = true;
        let line = format!(
            "dev-fb died {deaths} times within {} s: marked failed, not restarted again",
            DEVICE_DEATH_WINDOW.as_secs()
        );
        tracing::error!("dev-fb failed");
        self.log.line(&line);
        self.log
            .line("VNC clients are refused with a reason until the guest reboots");
        for index in self.input_indices() {
            self.send_to_runner(&ToRunner::DeviceFailed { index }, None);
        }
    }

    /// Starts dev-fb again with the run's listener and framebuffer, this boot's guest RAM, a
    /// new display channel and new input-device channels, whose runner ends go to the runner.
    fn restart_display(&mut self) {
        let (Some(g), Some(old)) = (&self.graphics, &self.runner.display) else {
            return;
        };
        if old.status.is_none() || old.failed {
            return;
        }
        let started = Instant::now();
        let ctx = runner::DisplayContext {
            console: &g.console,
            dev_fb_binary: &g.dev_fb_binary,
            log: g.log.as_fd(),
        };
        let launched = runner::launch_dev_fb(
            &ctx,
            &self.cfg.name,
            self.runner.memory.as_fd(),
            self.cfg.plan.memory_bytes,
        );
        match launched {
            Ok((Some(mut dev_fb), Some(display_end), input_ends)) => {
                if let Some(old) = self.runner.display.as_mut() {
                    dev_fb.succeed(old);
                }
                let line = format!(
                    "dev-fb restarted (pid {}, restart {}, {} ms)",
                    dev_fb.pid(),
                    dev_fb.restarts,
                    started.elapsed().as_millis()
                );
                tracing::info!(pid = dev_fb.pid(), "dev-fb restarted");
                self.log.line(&line);
                self.runner.display = Some(dev_fb);
                self.send_to_runner(&ToRunner::ReplaceDisplay, Some(display_end.as_fd()));
                for (index, end) in self.input_indices().zip(&input_ends) {
                    self.send_to_runner(&ToRunner::ReplaceDevice { index }, Some(end.as_fd()));
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.log.line(&format!(
                    "restarting dev-fb failed: {}",
                    crate::list::error_chain(&e)
                ));
                self.display_died();
            }
        }
    }

    /// Sends `msg` (with `fd`) to the runner; a failure is logged (the runner's own end is
    /// judged by its pidfd and channel).
    fn send_to_runner(&mut self, msg: &ToRunner, fd: Option<std::os::fd::BorrowedFd<'_>>) {
        let Some(channel) = &self.runner.channel else {
            return;
        };
        let fds: Vec<_> = fd.into_iter().collect();
        if let Err(e) = channel.send(msg, &fds) {
            tracing::warn!(error = %e, "telling the runner about a device failed");
        }
    }

    /// The runner's process ended: decide between booting again and ending.
    fn on_runner_exit(&mut self) -> Option<Outcome> {
        // Whatever the guest printed last still goes to the ring and the viewers, and what the
        // runner said before it went is heard before its end is judged (the process is gone,
        // so its channel ends after the queued messages).
        self.read_console();
        for _ in 0..64 {
            if self.runner.channel.is_none() {
                break;
            }
            self.on_runner_message();
        }
        let status = match self.runner.reap() {
            Ok(status) => runner::describe_status(status),
            Err(e) => format!("status unknown ({e})"),
        };
        // The boot is over: its devices go with it (the next boot has new guest RAM).
        self.runner.stop_devices();
        self.exit_deadline = None;
        self.boot_deadline = None;
        // A runner killed on request is judged by the request, booted or not.
        if self.runner.killed && self.intent != Intent::Run {
            return match self.intent {
                Intent::Reset => {
                    self.log.line("guest reset");
                    self.reboot()
                }
                Intent::Restart { .. } => self.reboot(),
                Intent::Poweroff => {
                    self.log.line("guest powered off (forced)");
                    Some(Outcome::ForcedOff)
                }
                Intent::Stop { .. } | Intent::Run => Some(Outcome::ForcedOff),
            };
        }
        if !self.runner.running {
            let reason = format!("vcpu-runner ended before the guest ran ({status})");
            if self.runner.exit.is_none() {
                self.log.line(&reason);
            }
            self.fail_start(&reason);
            return Some(Outcome::Faulted);
        }
        if self.runner.killed {
            // Killed for a malformed message or for lingering: a crash.
            return self.fault();
        }
        match self.runner.exit.take() {
            Some((GuestExit::Poweroff, _)) => {
                if let Intent::Restart { .. } = self.intent {
                    self.log.line("guest powered off, restarting");
                    self.reboot()
                } else {
                    self.log.line("guest powered off");
                    Some(Outcome::PoweredOff)
                }
            }
            Some((GuestExit::Reboot, _)) => {
                self.log.line("guest rebooted");
                if let Intent::Stop { .. } = self.intent {
                    return Some(Outcome::PoweredOff);
                }
                self.reboot()
            }
            Some((GuestExit::TripleFault { vcpu }, detail)) => {
                self.log
                    .line(&format!("guest triple fault on vcpu {vcpu}: {detail}"));
                self.fault()
            }
            Some((GuestExit::Crashed { vcpu }, detail)) => {
                self.log
                    .line(&format!("vcpu {vcpu} could not run any more: {detail}"));
                self.fault()
            }
            None => {
                self.log.line(&format!("vcpu-runner died: {status}"));
                self.fault()
            }
        }
    }

    /// A fault ends the guest unless `on_fault="restart"`, within a bound.
    fn fault(&mut self) -> Option<Outcome> {
        let stopping = matches!(self.intent, Intent::Stop { .. } | Intent::Poweroff);
        if stopping || self.cfg.plan.on_fault != OnFault::Restart {
            return Some(Outcome::Faulted);
        }
        let now = Instant::now();
        self.fault_restarts
            .retain(|t| now.saturating_duration_since(*t) < FAULT_WINDOW);
        if self.fault_restarts.len() >= MAX_FAULT_RESTARTS {
            self.log.line(&format!(
                "{MAX_FAULT_RESTARTS} fault restarts within {} s, giving up",
                FAULT_WINDOW.as_secs()
            ));
            return Some(Outcome::Faulted);
        }
        self.fault_restarts.push_back(now);
        self.log
            .line("restarting after the fault (on_fault=restart)");
        self.reboot()
    }

    /// Boots the guest again in place: a new runner, new guest RAM, a new console stream.
    fn reboot(&mut self) -> Option<Outcome> {
        let booted = boot(
            &self.cfg,
            &self.runner_log,
            &self.disk_logs,
            &self.nic_logs,
            &self.network,
            self.graphics.as_ref(),
        );
        match booted {
            Ok(runner) => {
                self.restarts = self.restarts.saturating_add(1);
                log_boot(self.log, &self.cfg, &runner, &self.network);
                self.runner = runner;
                self.intent = Intent::Run;
                self.console.eof = false;
                self.console.to_guest.clear();
                self.boot_deadline = Instant::now().checked_add(BOOT_TIMEOUT);
                None
            }
            Err(e) => {
                self.log.line(&format!(
                    "restarting the guest failed: {}",
                    crate::list::error_chain(&e)
                ));
                Some(Outcome::Faulted)
            }
        }
    }

    fn read_console(&mut self) {
        if self.console.eof {
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        for _ in 0..16 {
            match recv(
                self.runner.console.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    self.console.eof = true;
                    return;
                }
                Ok(n) => {
                    let data = buf.get(..n).unwrap_or_default();
                    self.console.ring.push(data);
                    for viewer in &mut self.console.viewers {
                        viewer.write_output(data);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.console.eof = true;
                    return;
                }
            }
        }
    }

    fn write_console(&mut self) {
        while !self.console.to_guest.is_empty() {
            let (front, _) = self.console.to_guest.as_slices();
            match send(
                self.runner.console.as_raw_fd(),
                front,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => {
                    self.console
                        .to_guest
                        .drain(..n.min(self.console.to_guest.len()));
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.console.to_guest.clear();
                    return;
                }
            }
        }
    }

    fn read_viewer(&mut self, i: usize) {
        let Some(viewer) = self.console.viewers.get_mut(i) else {
            return;
        };
        if let Input::Data(data) = viewer.read_input() {
            let room = MAX_INPUT_BACKLOG.saturating_sub(self.console.to_guest.len());
            self.console
                .to_guest
                .extend(data.get(..data.len().min(room)).unwrap_or_default());
            self.write_console();
        }
    }
}
