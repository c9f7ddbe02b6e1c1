//! The lifecycle commands: `vm start`, `stop`, `restart`, `reset`, `poweroff`, `startall`,
//! `stopall`, and the hidden `vm _run NAME` that is the detached per-VM supervisor.
//!
//! `vm install NAME ISO` is `vm start` with the ISO attached read-only as one more disk after
//! the configured ones (`vm _run --iso PATH NAME`): it stays attached across the guest's
//! reboots in that run, and a later `vm start` does not attach it. With `loader="linux"` the
//! guest still boots `linux_kernel`; the ISO is a disk it can read (`/dev/vdN`).
//!
//! `vm start NAME` checks the guest ([`preflight`]), then runs `vm _run NAME` in a new session
//! with stdio on `/dev/null` (stderr on the guest's `vm-bhyve.log`), and waits on a pipe
//! (the child's stdout) for one line: `ok` once the guest runs, or `error: WHY`. Every other
//! command talks to the running supervisor over its control socket and, where it ends the
//! guest, waits until the run lock is released.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proto::control::Request;

use crate::commands::Streams;
use crate::control_socket::{self, ControlSocketError};
use crate::datastore::{DatastoreError, Datastores, Guest};
use crate::guest_config::{GuestConfig, GuestConfigError};
use crate::host_config::HostConfig;
use crate::monitor::{self, MonitorConfig, MonitorError, Outcome};
use crate::preflight::{self, BootPlan, PreflightError};
use crate::spawn;
use crate::state::{self, RunState, StateError};
use crate::vmlog::LOG_FILE;

/// The runner binary's name (found by [`spawn::binary_path`]).
pub const RUNNER_BINARY: &str = "vcpu-runner";
/// Where `vm install` looks for an ISO named without a `/`, in the default datastore.
const ISO_DIR: &str = crate::datastore::ISO_DIR;
/// How long `vm start` waits for the supervisor to report the guest running.
const START_TIMEOUT: Duration = Duration::from_mins(1);
/// Extra time `vm stop` waits beyond the stop timeout for the supervisor to exit.
const STOP_MARGIN: Duration = Duration::from_secs(15);
/// How long `vm poweroff` waits for the supervisor to exit.
const POWEROFF_WAIT: Duration = Duration::from_secs(20);

/// Why a lifecycle command failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("{name}: {source}")]
    Config {
        name: String,
        #[source]
        source: GuestConfigError,
    },
    #[error("{name}: {source}")]
    Preflight {
        name: String,
        #[source]
        source: PreflightError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{name}: {source}")]
    Mac {
        name: String,
        #[source]
        source: crate::create::CreateError,
    },
    #[error("{name}: {source}")]
    Switch {
        name: String,
        #[source]
        source: Box<crate::switch::SwitchError>,
    },
    #[error("{name} is already running{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning { name: String, pid: Option<u32> },
    #[error("{0} doesn't appear to be a running virtual machine")]
    NotRunning(String),
    #[error("{name}: {source}")]
    Control {
        name: String,
        #[source]
        source: ControlSocketError,
    },
    #[error("{name} did not stop within {secs} s")]
    DidNotStop { name: String, secs: u64 },
    #[error("{name} failed to start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("starting the supervisor of {name} failed")]
    Spawn {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("vm start -f takes exactly one guest")]
    ForegroundOne,
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    #[error("writing output failed")]
    Output(#[from] io::Error),
}

/// Loads `name`'s config and checks it can boot, with `iso` attached as install media.
fn plan_install(
    stores: &Datastores,
    name: &str,
    iso: Option<&Path>,
) -> Result<(Guest, BootPlan), LifecycleError> {
    let (guest, mut plan) = plan_guest(stores, name)?;
    if let Some(iso) = iso {
        plan.attach_install_media(iso)
            .map_err(|source| LifecycleError::Preflight {
                name: name.to_owned(),
                source,
            })?;
    }
    Ok((guest, plan))
}

/// vm-bhyve's rule for `vm install`'s ISO argument: a name with a `/` is a path, anything
/// else a file in the default datastore's `.iso/`. A relative path is made absolute, since
/// the supervisor leaves the working directory.
pub fn iso_path(vm_dir: &Path, iso: &str) -> PathBuf {
    if iso.contains('/') {
        std::path::absolute(iso).unwrap_or_else(|_| PathBuf::from(iso))
    } else {
        vm_dir.join(ISO_DIR).join(iso)
    }
}

/// Loads `name`'s config and checks it can boot.
pub fn plan_guest(stores: &Datastores, name: &str) -> Result<(Guest, BootPlan), LifecycleError> {
    let guest = stores.find_guest(name)?;
    let mut parsed =
        GuestConfig::load(&guest.conf_path()).map_err(|source| LifecycleError::Config {
            name: name.to_owned(),
            source,
        })?;
    let preflight_err = |source| LifecycleError::Preflight {
        name: name.to_owned(),
        source,
    };
    let mut plan = preflight::plan(&parsed.config, &guest.dir, preflight::host_memory())
        .map_err(preflight_err)?;
    if !parsed.config.nics.is_empty() {
        // vm-bhyve gives a NIC without a MAC one at start, and keeps it in the config.
        crate::create::assign_missing_macs(&guest, &mut parsed.config).map_err(|source| {
            LifecycleError::Mac {
                name: name.to_owned(),
                source,
            }
        })?;
        let vm_dir = &stores.get(crate::datastore::DEFAULT_DATASTORE)?.path;
        let switches = crate::switch::load(vm_dir).map_err(|source| LifecycleError::Switch {
            name: name.to_owned(),
            source: Box::new(source),
        })?;
        preflight::plan_network(&mut plan, &parsed.config, &switches).map_err(preflight_err)?;
    }
    Ok((guest, plan))
}

fn refuse_running(guest: &Guest) -> Result<(), LifecycleError> {
    match state::probe(&guest.dir)? {
        RunState::Running { pid } => Err(LifecycleError::AlreadyRunning {
            name: guest.name.clone(),
            pid,
        }),
        RunState::Stopped => Ok(()),
    }
}

/// `vm start NAME...`: starts each guest detached, `vm_delay` seconds apart. Returns whether
/// all started; failures are reported on `io.err` and do not stop the others.
pub fn start(
    host: &HostConfig,
    names: &[String],
    io: &mut Streams<'_>,
) -> Result<bool, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let mut all_ok = true;
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(u64::from(host.vm_delay)));
        }
        if let Err(e) = start_one(host, &stores, name, None, io) {
            writeln!(io.err, "vm: ERROR: {}", crate::list::error_chain(&e))?;
            all_ok = false;
        }
    }
    Ok(all_ok)
}

/// `vm install [-f] NAME ISO`: starts the guest (detached, or in the foreground) with the ISO
/// attached read-only after its disks, for this run only.
pub fn install(
    host: &HostConfig,
    name: &str,
    iso: &str,
    foreground: bool,
    io: &mut Streams<'_>,
) -> Result<bool, LifecycleError> {
    let iso = iso_path(&host.vm_dir, iso);
    if foreground {
        return start_foreground_with(host, name, Some(&iso), io);
    }
    let stores = Datastores::load(&host.vm_dir)?;
    start_one(host, &stores, name, Some(&iso), io)?;
    Ok(true)
}

fn start_one(
    host: &HostConfig,
    stores: &Datastores,
    name: &str,
    iso: Option<&Path>,
    io: &mut Streams<'_>,
) -> Result<(), LifecycleError> {
    let (guest, _plan) = plan_install(stores, name, iso)?;
    refuse_running(&guest)?;
    match iso {
        Some(iso) => writeln!(io.out, "Starting {name} with {} attached", iso.display())?,
        None => writeln!(io.out, "Starting {name}")?,
    }
    io.out.flush()?;
    let spawn_err = |source| LifecycleError::Spawn {
        name: name.to_owned(),
        source,
    };
    let exe = std::env::current_exe().map_err(spawn_err)?;
    let (mut reader, writer) = io::pipe().map_err(spawn_err)?;
    let stderr = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(guest.dir.join(LOG_FILE))
        .map_or_else(|_| Stdio::null(), Stdio::from);
    let mut cmd = Command::new(exe);
    cmd.arg("--vm-dir").arg(&host.vm_dir).arg("_run");
    if let Some(iso) = iso {
        cmd.arg("--iso").arg(iso);
    }
    cmd.arg(name)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr);
    // The supervisor leaves the caller's working directory; paths it may get relative are
    // made absolute first.
    for var in [crate::host_config::CONF_ENV, spawn::LIBEXEC_ENV] {
        if let Some(abs) = std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .and_then(|v| std::path::absolute(v).ok())
        {
            cmd.env(var, abs);
        }
    }
    // SAFETY: setsid and chdir are async-signal-safe and touch only the forked child.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            nix::unistd::chdir("/").map_err(io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop(cmd);
    let line = read_line_within(&mut reader, START_TIMEOUT);
    match line.as_deref().map(str::trim_end) {
        Some("ok") => Ok(()),
        Some(other) => {
            let _ = child.wait();
            Err(LifecycleError::StartFailed {
                name: name.to_owned(),
                reason: other.strip_prefix("error: ").unwrap_or(other).to_owned(),
            })
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(LifecycleError::StartFailed {
                name: name.to_owned(),
                reason: format!(
                    "the supervisor did not report (see {})",
                    guest.dir.join(LOG_FILE).display()
                ),
            })
        }
    }
}

/// The first line from `reader`, waiting at most `timeout`; `None` on timeout or EOF.
fn read_line_within(reader: &mut io::PipeReader, timeout: Duration) -> Option<String> {
    let deadline = Instant::now().checked_add(timeout)?;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ms = PollTimeout::try_from(left.as_millis()).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => return None,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
        match reader.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                bytes.extend_from_slice(buf.get(..n).unwrap_or_default());
                if let Some(pos) = bytes.iter().position(|&b| b == b'\n') {
                    bytes.truncate(pos);
                    return Some(String::from_utf8_lossy(&bytes).into_owned());
                }
                if bytes.len() > 4096 {
                    return Some(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Where `vm _run` reports to `vm start`: the pipe `vm start` left on stdout, moved off fd 1
/// (which then points at `/dev/null`) so that no child inherits it.
#[derive(Debug)]
struct Notifier {
    pipe: Option<File>,
}

impl Notifier {
    fn take_stdout() -> Notifier {
        let stdout = io::stdout();
        let pipe = stdout.as_fd().try_clone_to_owned().ok().map(File::from);
        if let Ok(null) = File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(null.as_fd());
        }
        Notifier { pipe }
    }

    fn send(&mut self, result: Result<(), String>) {
        if let Some(mut pipe) = self.pipe.take() {
            let line = match result {
                Ok(()) => "ok\n".to_owned(),
                Err(e) => format!("error: {}\n", e.replace('\n', " ")),
            };
            let _ = pipe.write_all(line.as_bytes());
        }
    }
}

/// `vm _run [--iso PATH] NAME`: the detached supervisor. Returns when the guest has ended.
pub fn run_detached(
    host: &HostConfig,
    name: &str,
    iso: Option<&Path>,
) -> Result<bool, LifecycleError> {
    let mut notifier = Notifier::take_stdout();
    let result = Datastores::load(&host.vm_dir)
        .map_err(LifecycleError::from)
        .and_then(|stores| plan_install(&stores, name, iso))
        .and_then(|(guest, plan)| {
            let cfg = monitor_config(name, &guest, plan);
            monitor::run(&cfg, None, &mut |r| notifier.send(r)).map_err(LifecycleError::from)
        });
    match result {
        Ok(outcome) => Ok(outcome == Outcome::PoweredOff),
        Err(e) => {
            notifier.send(Err(crate::list::error_chain(&e)));
            Err(e)
        }
    }
}

fn monitor_config(name: &str, guest: &Guest, plan: BootPlan) -> MonitorConfig {
    MonitorConfig {
        name: name.to_owned(),
        guest_dir: guest.dir.clone(),
        plan,
        runner_binary: spawn::binary_path(RUNNER_BINARY),
        dev_blk_binary: spawn::binary_path(crate::monitor::devices::DEV_BLK_BINARY),
        dev_net_binary: spawn::binary_path(crate::monitor::devices::DEV_NET_BINARY),
    }
}

/// `vm start -f NAME`: the supervisor in the foreground with the console on stdio. `Ok(true)`
/// when the guest powered itself off.
pub fn start_foreground(
    host: &HostConfig,
    names: &[String],
    io: &mut Streams<'_>,
) -> Result<bool, LifecycleError> {
    let [name] = names else {
        return Err(LifecycleError::ForegroundOne);
    };
    start_foreground_with(host, name, None, io)
}

fn start_foreground_with(
    host: &HostConfig,
    name: &str,
    iso: Option<&Path>,
    io: &mut Streams<'_>,
) -> Result<bool, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let (guest, plan) = plan_install(&stores, name, iso)?;
    refuse_running(&guest)?;
    writeln!(io.err, "Starting {name}")?;
    let stdin = io::stdin().as_fd().try_clone_to_owned()?;
    let stdout = io::stdout().as_fd().try_clone_to_owned()?;
    let raw = crate::console::RawMode::enable(stdin.as_fd());
    let terminal: (OwnedFd, OwnedFd) = (stdin, stdout);
    let mut failure = None;
    let result = monitor::run(
        &monitor_config(name, &guest, plan),
        Some(terminal),
        &mut |r| failure = r.err(),
    );
    drop(raw);
    if let Some(reason) = failure {
        return Err(LifecycleError::StartFailed {
            name: name.to_owned(),
            reason,
        });
    }
    Ok(result? == Outcome::PoweredOff)
}

fn running_guest(stores: &Datastores, name: &str) -> Result<Guest, LifecycleError> {
    let guest = stores.find_guest(name)?;
    match state::probe(&guest.dir)? {
        RunState::Running { .. } => Ok(guest),
        RunState::Stopped => Err(LifecycleError::NotRunning(name.to_owned())),
    }
}

fn send(guest: &Guest, request: &Request) -> Result<(), LifecycleError> {
    control_socket::request(&guest.dir, request)
        .map(drop)
        .map_err(|source| LifecycleError::Control {
            name: guest.name.clone(),
            source,
        })
}

/// Waits until the guest's supervisor has released its lock.
fn wait_stopped(guest: &Guest, within: Duration) -> Result<(), LifecycleError> {
    let deadline = Instant::now().checked_add(within);
    loop {
        if state::probe(&guest.dir)? == RunState::Stopped {
            return Ok(());
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            return Err(LifecycleError::DidNotStop {
                name: guest.name.clone(),
                secs: within.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The stop timeout for `guest`: `-t`, else its `stop_timeout`, else 30 s.
fn stop_timeout(guest: &Guest, flag: Option<u32>) -> u32 {
    flag.unwrap_or_else(|| {
        GuestConfig::load(&guest.conf_path())
            .ok()
            .and_then(|p| p.config.stop_timeout)
            .unwrap_or(preflight::DEFAULT_STOP_TIMEOUT)
    })
}

fn stop_wait(secs: u32) -> Duration {
    // 0 never forces the guest off; wait as long as a stop timeout may be.
    let secs = if secs == 0 {
        proto::control::MAX_STOP_TIMEOUT_SECS
    } else {
        secs
    };
    Duration::from_secs(u64::from(secs)).saturating_add(STOP_MARGIN)
}

/// `vm stop [-t SECS] NAME...`: presses each guest's power button, then waits until every
/// one has stopped (forced off after the timeout by its supervisor).
pub fn stop(
    host: &HostConfig,
    names: &[String],
    timeout: Option<u32>,
    io: &mut Streams<'_>,
) -> Result<bool, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let mut waiting = Vec::new();
    let mut all_ok = true;
    for name in names {
        match request_stop(&stores, name, timeout, io) {
            Ok(pending) => waiting.push(pending),
            Err(e) => {
                writeln!(io.err, "vm: ERROR: {}", crate::list::error_chain(&e))?;
                all_ok = false;
            }
        }
    }
    for (guest, secs) in waiting {
        if let Err(e) = wait_stopped(&guest, stop_wait(secs)) {
            writeln!(io.err, "vm: ERROR: {e}")?;
            all_ok = false;
        }
    }
    Ok(all_ok)
}

fn request_stop(
    stores: &Datastores,
    name: &str,
    timeout: Option<u32>,
    io: &mut Streams<'_>,
) -> Result<(Guest, u32), LifecycleError> {
    let guest = running_guest(stores, name)?;
    let secs = stop_timeout(&guest, timeout);
    send(&guest, &Request::Stop { timeout_secs: secs })?;
    writeln!(io.out, "Sending ACPI shutdown to {name}")?;
    io.out.flush()?;
    Ok((guest, secs))
}

/// `vm restart NAME`: ACPI shutdown, then the supervisor boots the guest again.
pub fn restart(
    host: &HostConfig,
    name: &str,
    io: &mut Streams<'_>,
) -> Result<bool, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let guest = running_guest(&stores, name)?;
    send(&guest, &Request::Restart)?;
    writeln!(io.out, "Restarting {name}")?;
    Ok(true)
}

/// Which forceful command is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Force {
    Reset,
    Poweroff,
}

/// `vm reset [-f] NAME` and `vm poweroff [-f] NAME`: ask unless forced, then pull the plug.
/// A poweroff waits until the guest has stopped.
pub fn force(
    host: &HostConfig,
    name: &str,
    what: Force,
    confirmed: bool,
    io: &mut Streams<'_>,
) -> Result<bool, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let guest = running_guest(&stores, name)?;
    let word = match what {
        Force::Reset => "reset",
        Force::Poweroff => "poweroff",
    };
    if !confirmed {
        write!(
            io.err,
            "Are you sure you want to forcefully {word} this virtual machine (y/n)? "
        )?;
        io.err.flush()?;
        let mut answer = String::new();
        io.input.read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            return Ok(true);
        }
    }
    match what {
        Force::Reset => send(&guest, &Request::Reset)?,
        Force::Poweroff => {
            send(&guest, &Request::Poweroff)?;
            wait_stopped(&guest, POWEROFF_WAIT)?;
        }
    }
    Ok(true)
}

/// `vm startall`: the guests of `vm_list` in order, `vm_delay` seconds apart; running ones
/// are skipped.
pub fn startall(host: &HostConfig, io: &mut Streams<'_>) -> Result<bool, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let mut all_ok = true;
    let mut first = true;
    for name in &host.vm_list {
        let running = stores
            .find_guest(name)
            .ok()
            .and_then(|g| state::probe(&g.dir).ok())
            .is_some_and(|s| matches!(s, RunState::Running { .. }));
        if running {
            continue;
        }
        if !first {
            std::thread::sleep(Duration::from_secs(u64::from(host.vm_delay)));
        }
        first = false;
        if let Err(e) = start_one(host, &stores, name, None, io) {
            writeln!(io.err, "vm: ERROR: {}", crate::list::error_chain(&e))?;
            all_ok = false;
        }
    }
    Ok(all_ok)
}

/// `vm stopall`: the running guests of `vm_list` in reverse order, each waited for, then
/// every other running guest together.
pub fn stopall(host: &HostConfig, io: &mut Streams<'_>) -> Result<bool, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let is_running =
        |g: &Guest| state::probe(&g.dir).is_ok_and(|s| matches!(s, RunState::Running { .. }));
    let mut all_ok = true;
    for name in host.vm_list.iter().rev() {
        let Ok(guest) = stores.find_guest(name) else {
            continue;
        };
        if !is_running(&guest) {
            continue;
        }
        let stopped = request_stop(&stores, name, None, io)
            .and_then(|(guest, secs)| wait_stopped(&guest, stop_wait(secs)));
        if let Err(e) = stopped {
            writeln!(io.err, "vm: ERROR: {}", crate::list::error_chain(&e))?;
            all_ok = false;
        }
    }
    let rest: Vec<String> = stores
        .guests()
        .into_iter()
        .filter(|g| !host.vm_list.contains(&g.name) && is_running(g))
        .map(|g| g.name)
        .collect();
    if !rest.is_empty() {
        all_ok &= stop(host, &rest, None, io)?;
    }
    Ok(all_ok)
}

/// The guest directory of a running guest, for `vm console`.
pub fn console_target(host: &HostConfig, name: &str) -> Result<PathBuf, LifecycleError> {
    let stores = Datastores::load(&host.vm_dir)?;
    Ok(running_guest(&stores, name)?.dir)
}

/// Reads a status from a running guest's supervisor, for `vm info`; `None` if it does not
/// answer.
pub fn status_of(guest_dir: &Path) -> Option<proto::control::VmStatus> {
    match control_socket::request(guest_dir, &Request::Status) {
        Ok((proto::control::Reply::Status(status), _)) => Some(status),
        _ => None,
    }
}
