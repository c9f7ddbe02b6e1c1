//! End-to-end: real kit guests under capvm's own `vm` command — boot, what the
//! guest sees, the sandbox of its processes from outside, and the lifecycle
//! commands (`vm stop`, guest reboot, `vm console`, `vm reset`, `vm poweroff`,
//! a supervisor killed with SIGKILL).
//!
//! Each test gets its own datastore (`vm init` under a temp dir, `VM_DIR` and
//! `CAPVM_CONF` pointing there) and the binaries of this build
//! (`CAPVM_LIBEXEC` = `target/<profile>`). On this workplace's machines the
//! harness runs them inside the test host.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tests::console::Console;
use tests::harness::{self, E2e, Needs};
use tests::kit::{Action, Kit, KitCmdline, Then};
use tests::launcher::{CapvmLauncher, GuestSpec, Launcher};
use tests::marker::{self, Marker};
use tests::procfs;
use tests::testvm::TestVm;

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const CMD_TIMEOUT: Duration = Duration::from_mins(1);
const NAME: &str = "kit";
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;

fn main() -> ExitCode {
    // SAFETY: single-threaded here, before the harness starts any thread.
    unsafe { std::env::set_var("CAPVM_LIBEXEC", tests::harness::build_dir()) };
    let minutes = Duration::from_mins;
    harness::main(&[
        E2e {
            name: "vm_start_boots_the_kit_and_vm_stop_ends_it_through_acpi",
            needs: Needs::Kvm,
            timeout: minutes(4),
            run: start_and_stop,
        },
        E2e {
            name: "guest_reboot_comes_back_in_the_same_supervisor",
            needs: Needs::Kvm,
            timeout: minutes(5),
            run: guest_reboot,
        },
        E2e {
            name: "detached_guest_console_reset_and_poweroff",
            needs: Needs::Kvm,
            timeout: minutes(5),
            run: console_reset_poweroff,
        },
        E2e {
            name: "a_supervisor_killed_with_sigkill_leaves_a_startable_guest",
            needs: Needs::Kvm,
            timeout: minutes(5),
            run: killed_supervisor,
        },
    ])
}

fn spec(cmdline: &KitCmdline) -> anyhow::Result<GuestSpec> {
    let kit = Kit::locate()?;
    Ok(GuestSpec {
        kernel: kit.kernel.clone(),
        initrd: kit.initrd.clone(),
        cmdline: cmdline.render()?,
        cpus: CPUS,
        memory_mib: MEMORY_MIB,
    })
}

/// One datastore with the guest [`NAME`] in it, driven by `vm` commands.
struct Datastore {
    launcher: CapvmLauncher,
    dir: tempfile::TempDir,
}

impl Datastore {
    fn new(cmdline: &KitCmdline) -> anyhow::Result<Datastore> {
        let dir = tempfile::Builder::new().prefix("capvm-e2e.").tempdir()?;
        let launcher = CapvmLauncher::new(NAME);
        // Writes the datastore and NAME.conf; the foreground command it returns is not used.
        launcher.command(&spec(cmdline)?, dir.path())?;
        Ok(Datastore { launcher, dir })
    }

    fn vm(&self, args: &[&str]) -> Command {
        let mut c = self.launcher.vm_command(self.dir.path());
        c.args(args);
        c
    }

    /// Runs `vm ARGS`, which must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .vm(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running vm {args:?}"))?;
        ensure!(
            out.status.success(),
            "vm {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn guest_dir(&self) -> PathBuf {
        self.dir.path().join("vms").join(NAME)
    }

    /// The supervisor's pid from `vm list`, if the guest is running.
    fn supervisor_pid(&self) -> anyhow::Result<Option<u32>> {
        let list = self.ok(&["list"])?;
        let line = list
            .lines()
            .find(|l| l.split_whitespace().next() == Some(NAME))
            .with_context(|| format!("{NAME} missing from vm list:\n{list}"))?;
        if let Some(rest) = line.split("Running (").nth(1) {
            let pid = rest.split(')').next().unwrap_or_default();
            return Ok(Some(
                pid.parse().with_context(|| format!("pid in {line:?}"))?,
            ));
        }
        ensure!(
            line.contains("Stopped"),
            "neither Running nor Stopped: {line:?}"
        );
        Ok(None)
    }

    /// Waits until `vm list` says Stopped, no capvm process of the guest is
    /// left and nothing holds its lock.
    fn wait_stopped(&self, supervisor: u32, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !procfs::alive(supervisor) && self.supervisor_pid()?.is_none() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "guest still running {timeout:?} later (supervisor {supervisor})"
            );
            thread::sleep(Duration::from_millis(200));
        }
        let left = procfs::children_named(supervisor, "vcpu-runner");
        ensure!(left.is_empty(), "vcpu-runner left running: {left:?}");
        let lock = self.guest_dir().join("run.lock");
        if lock.exists() {
            // A file may stay behind; nobody may hold it.
            let held = Command::new("flock")
                .args(["-n", "-x"])
                .arg(&lock)
                .arg("true")
                .status()?;
            ensure!(held.success(), "{} is still locked", lock.display());
        }
        Ok(())
    }

    fn log(&self) -> String {
        fs::read_to_string(self.guest_dir().join("vm-bhyve.log")).unwrap_or_default()
    }
}

/// Whether `pid` is a process that has not ended (a zombie has).
/// `vm console NAME` as a script would run it: stdin a pipe, output on stdout.
struct Viewer {
    child: Child,
    console: Console,
    _log: tempfile::TempDir,
}

impl Viewer {
    fn attach(ds: &Datastore) -> anyhow::Result<Viewer> {
        let mut child = ds
            .vm(&["console", NAME])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("vm console")?;
        let log = tempfile::tempdir()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let console = Console::start(stdout, &log.path().join("console.log"))?;
        Ok(Viewer {
            child,
            console,
            _log: log,
        })
    }

    /// Waits for the `n`th ready marker this viewer has seen (1-based).
    fn wait_ready(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let seen = |c: &Console| {
            c.lines()
                .iter()
                .filter(|l| matches!(marker::find(l), Some((_, Ok(Marker::Ready(_))))))
                .count()
        };
        let deadline = Instant::now() + timeout;
        while seen(&self.console) < n {
            if self.console.next_line(deadline).is_err() {
                bail!(
                    "ready marker #{n} not seen on vm console within {timeout:?}; tail:\n{}",
                    self.console.tail(30)
                );
            }
        }
        Ok(())
    }

    /// Waits for the console to close (the guest ended); returns `vm console`'s status.
    fn wait_closed(mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while !self.console.is_closed() {
            match self.console.next_line(deadline) {
                Ok(_) => {}
                Err(tests::console::WaitEnd::Closed) => break,
                Err(tests::console::WaitEnd::Timeout) => {
                    let _ = self.child.kill();
                    bail!("vm console still open {timeout:?} after the guest ended");
                }
            }
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Powers the guest off hard if a test failed half-way, so no guest outlives it.
struct Cleanup<'a>(&'a Datastore);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.vm(&["poweroff", "-f", NAME]).output();
    }
}

/// `vm start -f`: the kit boots with the configured CPUs and memory, its
/// processes are sandboxed, `vm stop` powers it off through the ACPI power
/// button and nothing is left behind.
fn start_and_stop() -> anyhow::Result<()> {
    let mut cmdline = KitCmdline::new(Action::Agent);
    cmdline.cpus = Some(CPUS);
    let launcher = CapvmLauncher::new(NAME);
    let mut vm = TestVm::start(&launcher, &spec(&cmdline)?)?;
    let guest_dir = vm.workdir().join("vms").join(NAME);
    start_and_stop_with(&launcher, &mut vm).map_err(|e| {
        let file = |n: &str| fs::read_to_string(guest_dir.join(n)).unwrap_or_default();
        anyhow::anyhow!(
            "{e:#}\n--- vm-bhyve.log ---\n{}\n--- vcpu-runner.log ---\n{}",
            file("vm-bhyve.log"),
            file("vcpu-runner.log")
        )
    })
}

fn start_and_stop_with(launcher: &CapvmLauncher, vm: &mut TestVm) -> anyhow::Result<()> {
    let booted = vm.wait_ready(BOOT_TIMEOUT)?;
    println!(
        "MEASURE boot vmm=capvm kernel=bzimage action=agent wall_to_ready_s={:.1} uptime_s={:.2}",
        booted.wall.as_secs_f64(),
        booted.ready.uptime_s
    );
    ensure!(
        booted.ready.cpus == CPUS,
        "guest saw {} CPUs",
        booted.ready.cpus
    );

    let cpus = vm.run("grep -c ^processor /proc/cpuinfo", CMD_TIMEOUT)?;
    ensure!(cpus.output.trim() == CPUS.to_string(), "cpuinfo: {cpus:?}");
    let mem = vm.run(
        "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
        CMD_TIMEOUT,
    )?;
    let kib: u64 = mem
        .output
        .trim()
        .parse()
        .with_context(|| format!("MemTotal: {mem:?}"))?;
    let configured = u64::from(MEMORY_MIB) * 1024;
    // The kernel keeps its own image and reserved areas out of MemTotal.
    ensure!(
        kib <= configured && kib >= configured * 80 / 100,
        "guest MemTotal {kib} KiB for {configured} KiB configured"
    );
    let checks = vm.run("kit-test cpus", CMD_TIMEOUT)?;
    ensure!(checks.status == 0, "kit-test: {checks:?}");

    // The datastore TestVm's launcher made under its workdir.
    let workdir = vm.workdir().to_owned();
    let vm_in = |args: &[&str]| {
        let out = launcher.vm_command(&workdir).args(args).output()?;
        ensure!(
            out.status.success(),
            "vm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let list = vm_in(&["list"])?;
    let supervisor: u32 = list
        .split("Running (")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no Running (pid) in vm list:\n{list}"))?;
    let runners = procfs::children_named(supervisor, "vcpu-runner");
    ensure!(
        runners.len() == 1,
        "vcpu-runners of {supervisor}: {runners:?}"
    );
    for pid in &runners {
        procfs::assert_sandboxed(*pid)?;
    }

    let stopped = Instant::now();
    vm_in(&["stop", NAME])?;
    vm.wait_marker("the power-button marker", CMD_TIMEOUT, |m| {
        (*m == Marker::PowerButton).then_some(())
    })?;
    let status = vm.wait_exit(CMD_TIMEOUT)?;
    println!(
        "MEASURE stop vmm=capvm stop_to_exit_s={:.1}",
        stopped.elapsed().as_secs_f64()
    );
    ensure!(status.success(), "vm start -f exited with {status}");
    let list = vm_in(&["list"])?;
    ensure!(list.contains("Stopped"), "after stop:\n{list}");
    ensure!(
        procfs::children_named(supervisor, "vcpu-runner").is_empty(),
        "vcpu-runner left behind"
    );
    let log =
        fs::read_to_string(workdir.join("vms").join(NAME).join("vm-bhyve.log")).unwrap_or_default();
    ensure!(!log.is_empty(), "vm-bhyve.log is empty");
    Ok(())
}

/// The kit reboots itself after its checks; the guest comes back up under the
/// same supervisor, twice, and `vm poweroff -f` ends it.
fn guest_reboot() -> anyhow::Result<()> {
    let mut cmdline = KitCmdline::new(Action::Test(vec!["cpus".into()]));
    cmdline.cpus = Some(CPUS);
    cmdline.then = Some(Then::Reboot);
    let ds = Datastore::new(&cmdline)?;
    let _cleanup = Cleanup(&ds);
    ds.ok(&["start", NAME])?;
    let supervisor = ds.supervisor_pid()?.context("not running after vm start")?;
    let mut viewer = Viewer::attach(&ds)?;
    viewer.wait_ready(1, BOOT_TIMEOUT)?;
    viewer.wait_ready(2, BOOT_TIMEOUT)?;
    ensure!(
        viewer
            .console
            .lines()
            .iter()
            .any(|l| matches!(marker::find(l), Some((_, Ok(Marker::Reboot))))),
        "no reboot marker between the boots"
    );
    ensure!(
        ds.supervisor_pid()? == Some(supervisor),
        "the supervisor changed across the reboot"
    );
    ds.ok(&["poweroff", "-f", NAME])?;
    ds.wait_stopped(supervisor, CMD_TIMEOUT)?;
    let log = ds.log();
    ensure!(
        log.to_lowercase().contains("reboot"),
        "vm-bhyve.log:\n{log}"
    );
    Ok(())
}

/// `vm start` returns with the guest running in the background; a viewer that
/// attaches after the guest printed its ready marker still sees it (the
/// console's ring buffer), beside a second viewer; `vm reset -f` boots it
/// again under the same supervisor; `vm poweroff -f` ends it and closes the
/// viewers.
fn console_reset_poweroff() -> anyhow::Result<()> {
    let mut cmdline = KitCmdline::new(Action::Agent);
    cmdline.cpus = Some(CPUS);
    let ds = Datastore::new(&cmdline)?;
    let _cleanup = Cleanup(&ds);
    let started = Instant::now();
    ds.ok(&["start", NAME])?;
    println!(
        "MEASURE detached_start vmm=capvm vm_start_returns_s={:.2}",
        started.elapsed().as_secs_f64()
    );
    let supervisor = ds.supervisor_pid()?.context("not running after vm start")?;

    let mut first = Viewer::attach(&ds)?;
    first.wait_ready(1, BOOT_TIMEOUT)?;
    // Attached after the marker was printed: the ring buffer replays it,
    // including the kernel's first lines.
    let mut second = Viewer::attach(&ds)?;
    second.wait_ready(1, CMD_TIMEOUT)?;
    // Everything up to the marker, line for line as the first viewer saw it.
    let upto_marker = |c: &Console| -> Vec<String> {
        let lines = c.lines();
        let end = lines
            .iter()
            .position(|l| matches!(marker::find(l), Some((_, Ok(Marker::Ready(_))))))
            .map_or(lines.len(), |i| i + 1);
        lines.iter().take(end).cloned().collect()
    };
    ensure!(
        upto_marker(&second.console) == upto_marker(&first.console),
        "the late viewer's replay differs:\n{}\n--- first viewer:\n{}",
        second.console.tail(30),
        first.console.tail(30)
    );
    // Input from a viewer reaches the guest: the agent answers a command.
    let stdin = first.child.stdin.as_mut().context("viewer stdin")?;
    stdin.write_all(b"e1 ZWNobyBlY2hvLWZyb20tZ3Vlc3Q=\n")?; // "echo echo-from-guest"
    stdin.flush()?;
    first
        .console
        .wait_for(CMD_TIMEOUT, |l| {
            (l.trim() == "echo-from-guest").then_some(())
        })
        .map_err(|e| {
            anyhow::anyhow!("agent answer not seen ({e:?}): {}", first.console.tail(10))
        })?;

    ds.ok(&["reset", "-f", NAME])?;
    first.wait_ready(2, BOOT_TIMEOUT)?;
    ensure!(
        ds.supervisor_pid()? == Some(supervisor),
        "reset changed the supervisor"
    );

    ds.ok(&["poweroff", "-f", NAME])?;
    ds.wait_stopped(supervisor, CMD_TIMEOUT)?;
    first.wait_closed(CMD_TIMEOUT)?;
    second.wait_closed(CMD_TIMEOUT)?;
    Ok(())
}

/// SIGKILL to the supervisor: its vcpu-runner goes too, and the next `vm start`
/// is not blocked by the lock or socket it left.
fn killed_supervisor() -> anyhow::Result<()> {
    let mut cmdline = KitCmdline::new(Action::Agent);
    cmdline.cpus = Some(CPUS);
    let ds = Datastore::new(&cmdline)?;
    let _cleanup = Cleanup(&ds);
    ds.ok(&["start", NAME])?;
    let supervisor = ds.supervisor_pid()?.context("not running after vm start")?;
    let runners = procfs::children_named(supervisor, "vcpu-runner");
    ensure!(runners.len() == 1, "vcpu-runners: {runners:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(supervisor)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = Instant::now() + CMD_TIMEOUT;
    while runners.iter().any(|&p| procfs::alive(p)) {
        ensure!(
            Instant::now() < deadline,
            "vcpu-runner outlived its supervisor"
        );
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        ds.supervisor_pid()?.is_none(),
        "still Running after SIGKILL"
    );

    ds.ok(&["start", NAME])?;
    let again = ds
        .supervisor_pid()?
        .context("not running after the second start")?;
    let mut viewer = Viewer::attach(&ds)?;
    viewer.wait_ready(1, BOOT_TIMEOUT)?;
    ds.ok(&["poweroff", "-f", NAME])?;
    ds.wait_stopped(again, CMD_TIMEOUT)?;
    Ok(())
}
