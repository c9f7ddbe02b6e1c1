//! [`TestVm`]: one kit guest under test.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tests::kit::{Action, Kit, KitCmdline};
//! use tests::launcher::{Accel, GuestSpec, Machine, QemuLauncher};
//! use tests::testvm::TestVm;
//!
//! let kit = Kit::locate()?;
//! let spec = GuestSpec {
//!     kernel: kit.vmlinux.clone(),
//!     initrd: kit.initrd.clone(),
//!     cmdline: KitCmdline::new(Action::Agent).render()?,
//!     cpus: 2,
//!     memory_mib: 256,
//! };
//! let mut vm = TestVm::start(&QemuLauncher::new(Machine::Q35, Accel::Kvm), &spec)?;
//! vm.wait_ready(Duration::from_secs(120))?;
//! let out = vm.run("grep -c ^processor /proc/cpuinfo", Duration::from_secs(30))?;
//! assert_eq!(out.output.trim(), "2");
//! vm.stop(Duration::from_secs(30))?;
//! # Ok(()) }
//! ```
//!
//! The VMM runs in its own process group under `timeout` (a hard limit on
//! its life, so a test that dies cannot leave it running for long); dropping
//! the fixture kills the group. Every console byte goes to `console.log` in
//! the fixture's work dir; errors carry the console's last lines.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::console::{self, Console, ConsoleError, TAIL_LINES, WaitEnd};
use crate::launcher::{GuestSpec, LaunchError, Launcher};
use crate::marker::{self, Marker, Ready};

/// Default hard limit on a guest's life.
pub const DEFAULT_LIFETIME: Duration = Duration::from_mins(15);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the work dir")]
    Workdir(#[source] std::io::Error),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("cannot start {launcher}")]
    Spawn {
        launcher: String,
        source: std::io::Error,
    },
    #[error("{launcher}: timed out after {timeout:?} waiting for {what}; console:\n{tail}")]
    Timeout {
        launcher: String,
        what: String,
        timeout: Duration,
        tail: String,
    },
    #[error("{launcher}: the guest's console closed while waiting for {what}; console:\n{tail}")]
    Closed {
        launcher: String,
        what: String,
        tail: String,
    },
    #[error("{launcher}: {source}; console:\n{tail}")]
    Marker {
        launcher: String,
        source: marker::MarkerError,
        tail: String,
    },
    #[error("cannot write to the guest's console")]
    Write(#[source] std::io::Error),
    #[error("command is {len} bytes encoded; the agent reads lines of at most 4000")]
    CommandTooLong { len: usize },
    #[error("cannot wait for the VMM")]
    Wait(#[source] std::io::Error),
}

/// What the agent reported for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub status: i32,
    /// stdout and stderr, interleaved, lines joined with `\n`.
    pub output: String,
}

/// The ready marker and when it came.
#[derive(Debug, Clone, PartialEq)]
pub struct Booted {
    pub ready: Ready,
    /// From the VMM's start to the marker on the host's clock.
    pub wall: Duration,
}

/// One running guest.
#[derive(Debug)]
pub struct TestVm {
    launcher: String,
    child: Child,
    stdin: Option<ChildStdin>,
    console: Console,
    started: Instant,
    next_id: u32,
    exited: Option<ExitStatus>,
    // Last: removed after the child is gone.
    workdir: tempfile::TempDir,
}

impl TestVm {
    /// Starts `spec` with `launcher`, limited to [`DEFAULT_LIFETIME`].
    pub fn start(launcher: &dyn Launcher, spec: &GuestSpec) -> Result<TestVm, VmError> {
        TestVm::start_with_lifetime(launcher, spec, DEFAULT_LIFETIME)
    }

    pub fn start_with_lifetime(
        launcher: &dyn Launcher,
        spec: &GuestSpec,
        lifetime: Duration,
    ) -> Result<TestVm, VmError> {
        let workdir = tempfile::Builder::new()
            .prefix("capvm-testvm.")
            .tempdir()
            .map_err(VmError::Workdir)?;
        let inner = launcher.command(spec, workdir.path())?;
        let mut command = Command::new("timeout");
        command
            .args([
                "--foreground",
                "-k",
                "5",
                &lifetime.as_secs().max(1).to_string(),
            ])
            .arg(inner.get_program())
            .args(inner.get_args())
            .envs(inner.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
            .current_dir(inner.get_current_dir().unwrap_or(workdir.path()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let name = launcher.name();
        let mut child = command.spawn().map_err(|source| VmError::Spawn {
            launcher: name.clone(),
            source,
        })?;
        let started = Instant::now();
        let stdin = child.stdin.take();
        // The VMM's own diagnostics go to a file of their own.
        if let Some(stderr) = child.stderr.take() {
            console::drain_to_file(stderr, &workdir.path().join("vmm-stderr.log"))?;
        }
        let Some(stdout) = child.stdout.take() else {
            return Err(VmError::Spawn {
                launcher: name,
                source: std::io::Error::other("no stdout pipe"),
            });
        };
        let console = Console::start(stdout, &workdir.path().join("console.log"))?;
        Ok(TestVm {
            launcher: name,
            child,
            stdin,
            console,
            started,
            next_id: 1,
            exited: None,
            workdir,
        })
    }

    /// The launcher's name.
    pub fn launcher(&self) -> &str {
        &self.launcher
    }

    /// The pid of the process the fixture started (a `timeout` wrapping the VMM).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The fixture's directory (console log, VMM files).
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// The console so far, plus the VMM's stderr: for failure reports.
    pub fn logs(&self) -> String {
        let stderr =
            std::fs::read_to_string(self.workdir.path().join("vmm-stderr.log")).unwrap_or_default();
        format!(
            "{}\n--- {} stderr ---\n{stderr}",
            self.console.tail(usize::MAX),
            self.launcher
        )
    }

    fn waited(&self, what: &str, timeout: Duration, end: WaitEnd) -> VmError {
        let mut tail = self.console.tail(TAIL_LINES);
        let stderr =
            std::fs::read_to_string(self.workdir.path().join("vmm-stderr.log")).unwrap_or_default();
        if !stderr.trim().is_empty() {
            tail = format!(
                "{tail}\n--- {} stderr ---\n{}",
                self.launcher,
                stderr.trim()
            );
        }
        match end {
            WaitEnd::Timeout => VmError::Timeout {
                launcher: self.launcher.clone(),
                what: what.into(),
                timeout,
                tail,
            },
            WaitEnd::Closed => VmError::Closed {
                launcher: self.launcher.clone(),
                what: what.into(),
                tail,
            },
        }
    }

    /// Waits for a console line containing `needle`; returns the line.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String, VmError> {
        self.console
            .wait_for(timeout, |l| l.contains(needle).then(|| l.to_owned()))
            .map_err(|end| self.waited(&format!("a line with {needle:?}"), timeout, end))
    }

    /// Waits for the first marker `pick` accepts. A malformed marker is an
    /// error: the kit and this parser disagree.
    pub fn wait_marker<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&Marker) -> Option<T>,
    ) -> Result<T, VmError> {
        let mut bad = None;
        let found = self
            .console
            .wait_for(timeout, |line| match marker::find(line) {
                Some((_, Ok(m))) => pick(&m).map(Some),
                Some((_, Err(e))) => {
                    bad = Some(e);
                    Some(None)
                }
                None => None,
            });
        if let Some(source) = bad {
            return Err(VmError::Marker {
                launcher: self.launcher.clone(),
                source,
                tail: self.console.tail(TAIL_LINES),
            });
        }
        match found {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(self.waited(what, timeout, WaitEnd::Closed)),
            Err(end) => Err(self.waited(what, timeout, end)),
        }
    }

    /// Waits for `CAPVM-KIT: ready`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Booted, VmError> {
        let ready = self.wait_marker("the ready marker", timeout, |m| match m {
            Marker::Ready(r) => Some(r.clone()),
            _ => None,
        })?;
        Ok(Booted {
            ready,
            wall: self.started.elapsed(),
        })
    }

    /// Runs `command` through the kit's agent (`capvm.action=agent`).
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CommandOutput, VmError> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(command);
        if encoded.len() > 4000 {
            return Err(VmError::CommandTooLong { len: encoded.len() });
        }
        let id = format!("c{}", self.next_id);
        self.next_id = self.next_id.saturating_add(1);
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| VmError::Write(std::io::ErrorKind::BrokenPipe.into()))?;
        stdin
            .write_all(format!("{id} {encoded}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(VmError::Write)?;
        let what = format!("the agent's answer to {command:?}");
        self.wait_marker(&what, timeout, |m| match m {
            Marker::Begin(b) if *b == id => Some(()),
            _ => None,
        })?;
        self.collect_output(&what, timeout, |m| match m {
            Marker::End { id: end, status } if *end == id => Some(*status),
            _ => None,
        })
    }

    /// [`TestVm::run`] that must exit 0: its output, trimmed, or an error with the status and
    /// output.
    pub fn run_ok(&mut self, command: &str, timeout: Duration) -> anyhow::Result<String> {
        let out = self.run(command, timeout)?;
        anyhow::ensure!(
            out.status == 0,
            "{command:?} exited {}: {}",
            out.status,
            out.output
        );
        Ok(out.output.trim().to_owned())
    }

    /// `e` with the guest's console and the named log files of capvm guest `guest` (under
    /// `WORKDIR/vms/GUEST/`), for a failure report.
    pub fn with_logs(&self, guest: &str, files: &[&str], e: &anyhow::Error) -> anyhow::Error {
        let dir = self.workdir().join("vms").join(guest);
        let mut text = format!("{e:#}\n--- console/stderr ---\n{}", self.logs());
        for f in files {
            let body = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let _ = write!(text, "\n--- {f} ---\n{body}");
        }
        anyhow::anyhow!(text)
    }

    /// For `capvm.action=run`: collects the command's output up to
    /// `CAPVM-KIT: exit <status>`. Call it after [`TestVm::wait_ready`].
    pub fn wait_run_exit(&mut self, timeout: Duration) -> Result<CommandOutput, VmError> {
        self.collect_output("the run action's exit marker", timeout, |m| match m {
            Marker::Exit(status) => Some(*status),
            _ => None,
        })
    }

    /// Collects console lines until `end` picks a status from a marker.
    fn collect_output(
        &mut self,
        what: &str,
        timeout: Duration,
        mut end: impl FnMut(&Marker) -> Option<i32>,
    ) -> Result<CommandOutput, VmError> {
        let mut output = Vec::new();
        let mut bad = None;
        let status = self
            .console
            .wait_for(timeout, |line| match marker::find(line) {
                Some((before, Ok(m))) => {
                    if let Some(status) = end(&m) {
                        if !before.is_empty() {
                            output.push(before.to_owned());
                        }
                        return Some(Some(status));
                    }
                    output.push(line.to_owned());
                    None
                }
                Some((_, Err(e))) => {
                    bad = Some(e);
                    Some(None)
                }
                None => {
                    output.push(line.to_owned());
                    None
                }
            });
        if let Some(source) = bad {
            return Err(VmError::Marker {
                launcher: self.launcher.clone(),
                source,
                tail: self.console.tail(TAIL_LINES),
            });
        }
        match status {
            Ok(Some(status)) => Ok(CommandOutput {
                status,
                output: output.join("\n"),
            }),
            Ok(None) => Err(self.waited(what, timeout, WaitEnd::Closed)),
            Err(end) => Err(self.waited(what, timeout, end)),
        }
    }

    /// Waits for the VMM to exit (e.g. after the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(VmError::Wait)? {
                self.exited = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(self.waited("the VMM to exit", timeout, WaitEnd::Timeout));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the agent to power off and waits for the VMM to exit; kills it if
    /// it does not within `timeout`.
    pub fn stop(mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"poweroff\n").and_then(|()| stdin.flush());
        }
        self.stdin = None;
        match self.wait_exit(timeout) {
            Ok(status) => Ok(status),
            Err(e) => {
                self.kill();
                Err(e)
            }
        }
    }

    fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Ok(status) = self.child.wait() {
            self.exited = Some(status);
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} console (test failed) ---\n{}",
                self.launcher,
                self.logs()
            );
        }
    }
}
