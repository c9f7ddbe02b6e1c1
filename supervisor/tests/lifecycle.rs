//! The guest lifecycle end to end: `vm start`/`stop`/`restart`/`reset`/`poweroff`/`console`/
//! `startall`/`stopall` against real per-VM supervisors, each running the fake vcpu-runner
//! (`examples/fake_vcpu_runner.rs`: the real bootstrap, sandbox and runner protocol, no KVM).
//!
//! Each test has its own datastore (`VM_DIR`), host config (`CAPVM_CONF`) and libexec
//! directory (`CAPVM_LIBEXEC`, a `vcpu-runner` symlink to the example). `CAPVM_KVM_DEVICE` is
//! `/dev/null`, so the tests also run on hosts without KVM. They need root (the sandbox) and
//! skip with a reason without it. Run with `cargo test -p supervisor`, which builds the example.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    vm_dir: PathBuf,
    conf: PathBuf,
    libexec: PathBuf,
}

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: lifecycle tests need root (the vcpu-runner sandbox)");
    true
}

fn fake_runner() -> PathBuf {
    fake_example("fake_vcpu_runner")
}

fn fake_example(name: &str) -> PathBuf {
    let vm = PathBuf::from(env!("CARGO_BIN_EXE_vm"));
    let path = vm.parent().unwrap().join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test -p supervisor` (it builds the examples)",
        path.display()
    );
    // `cargo test --test lifecycle` alone does not rebuild examples: refuse a stale one.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).unwrap();
    assert!(
        modified(&path) >= modified(&source),
        "{} is older than its source: run `cargo test -p supervisor` (it builds the examples)",
        path.display()
    );
    path
}

/// Bytes that pass as a bzImage with boot protocol 2.15.
fn bzimage() -> Vec<u8> {
    let mut image = vec![0u8; 0x400];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image
}

impl Env {
    fn new(vm_list: &str) -> Env {
        Env::with_delay(vm_list, 0)
    }

    fn with_delay(vm_list: &str, vm_delay: u32) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let vm_dir = root.join("vm");
        let conf = root.join("vm.conf");
        let libexec = root.join("libexec");
        fs::create_dir(&libexec).unwrap();
        std::os::unix::fs::symlink(fake_runner(), libexec.join("vcpu-runner")).unwrap();
        std::os::unix::fs::symlink(fake_example("fake_dev_blk"), libexec.join("dev-blk")).unwrap();
        fs::write(
            &conf,
            format!("vm_list=\"{vm_list}\"\nvm_delay=\"{vm_delay}\"\n"),
        )
        .unwrap();
        let env = Env {
            _dir: dir,
            root,
            vm_dir,
            conf,
            libexec,
        };
        env.ok(&["init"]);
        env
    }

    /// A linux guest with a fake bzImage; `extra` lines come first in its config, so they win
    /// over the defaults (the first of repeated keys counts).
    fn guest(&self, name: &str, extra: &str) -> PathBuf {
        let dir = self.vm_dir.join(name);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("vmlinuz"), bzimage()).unwrap();
        fs::write(
            dir.join(format!("{name}.conf")),
            format!("{extra}\nloader=\"linux\"\nlinux_kernel=\"vmlinuz\"\ncpu=1\nmemory=64M\n"),
        )
        .unwrap();
        dir
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm"));
        cmd.args(args)
            .env("VM_DIR", &self.vm_dir)
            .env("CAPVM_CONF", &self.conf)
            .env("CAPVM_LIBEXEC", &self.libexec)
            .env("CAPVM_KVM_DEVICE", "/dev/null")
            .env_remove("VM_LOG")
            .stdin(Stdio::null());
        cmd
    }

    fn vm(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vm(args);
        assert!(
            out.status.success(),
            "vm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.vm(args);
        assert!(!out.status.success(), "vm {args:?} succeeded");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.vm_dir.join(name).join("vm-bhyve.log")).unwrap_or_default()
    }

    /// The supervisor pid from `vm list`'s `Running (PID)`, if running.
    fn running_pid(&self, name: &str) -> Option<u32> {
        let list = self.ok(&["list"]);
        let line = list.lines().find(|l| l.starts_with(&format!("{name} ")))?;
        let state = line.split("Running (").nth(1)?;
        state.trim_end_matches(')').parse().ok()
    }

    /// (role, pid, restarts) of each process `vm info` shows.
    fn processes(&self, name: &str) -> Vec<(String, u32, u32)> {
        self.ok(&["info", name])
            .lines()
            .filter_map(|l| l.trim().strip_prefix("process: "))
            .map(|p| {
                let f: Vec<&str> = p.split_whitespace().collect();
                (
                    f[0].to_owned(),
                    f[2].parse().unwrap(),
                    f[f.len() - 1].parse().unwrap(),
                )
            })
            .collect()
    }

    fn runner_pid(&self, name: &str) -> u32 {
        self.processes(name)
            .into_iter()
            .find(|(role, ..)| role == "vcpu-runner")
            .map(|(_, pid, _)| pid)
            .expect("vm info shows the vcpu-runner")
    }

    fn wait_stopped(&self, name: &str) {
        wait_until(Duration::from_secs(15), || self.running_pid(name).is_none());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave nothing running behind a failed test.
        for entry in fs::read_dir(&self.vm_dir).into_iter().flatten().flatten() {
            let lock = entry.path().join("run.lock");
            if let Some(pid) = fs::read_to_string(&lock)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
                && supervisor::state::probe(&entry.path())
                    .is_ok_and(|s| s != supervisor::state::RunState::Stopped)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// A running `vm` whose stdout is collected in the background.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
}

impl Session {
    fn start(mut cmd: Command) -> Session {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&out);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Session {
            stdin: child.stdin.take(),
            child,
            out,
        }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} not seen; output so far: {:?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn type_text(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "vm did not exit within {within:?}; output {:?}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn started_guest_is_listed_running_with_its_processes() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    let dir = env.guest("g", "");

    let out = env.ok(&["start", "g"]);
    let pid = env.running_pid("g").expect("running after vm start");
    let procs = env.processes("g");
    let info = env.ok(&["info", "g"]);

    assert_eq!(out, "Starting g\n");
    assert_eq!(
        fs::read_to_string(dir.join("run.lock")).unwrap().trim(),
        pid.to_string()
    );
    assert!(dir.join("run/control.sock").exists());
    assert_eq!(procs.len(), 2, "{procs:?}");
    assert_eq!(procs[0].0, "supervisor");
    assert_eq!(procs[0].1, pid);
    assert_eq!(procs[1].0, "vcpu-runner");
    assert!(alive(procs[1].1));
    assert!(info.contains("  uptime: 00:00:"), "{info}");
    let log = env.log("g");
    assert!(log.contains(": initialising\n"), "{log}");
    assert!(
        log.contains(&format!(": starting vcpu-runner (pid {})\n", procs[1].1)),
        "{log}"
    );
    env.ok(&["poweroff", "-f", "g"]);
}

#[test]
fn stop_presses_the_power_button_and_returns_when_off() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    let dir = env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();
    let runner = env.runner_pid("g");

    let out = env.ok(&["stop", "g"]);

    assert_eq!(out, "Sending ACPI shutdown to g\n");
    assert_eq!(env.running_pid("g"), None);
    wait_until(Duration::from_secs(5), || !alive(pid) && !alive(runner));
    assert!(!dir.join("run.lock").exists());
    assert!(!dir.join("run/control.sock").exists());
    let log = env.log("g");
    assert!(
        log.contains(": stop requested, sending ACPI shutdown\n"),
        "{log}"
    );
    assert!(log.contains(": guest powered off\n"), "{log}");
    assert!(log.ends_with(": exited (powered off)\n"), "{log}");
}

#[test]
fn stop_timeout_forces_the_guest_off_and_logs_it() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.ignore_power\"");
    env.ok(&["start", "g"]);

    let started = Instant::now();
    env.ok(&["stop", "-t", "1", "g"]);

    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(env.running_pid("g"), None);
    let log = env.log("g");
    assert!(
        log.contains(": did not power off within 1 s, forced off\n"),
        "{log}"
    );
    assert!(log.ends_with(": exited (forced off)\n"), "{log}");
}

#[test]
fn stop_timeout_comes_from_the_guest_config() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.ignore_power\"\nstop_timeout=1");
    env.ok(&["start", "g"]);

    env.ok(&["stop", "g"]);

    assert!(
        env.log("g")
            .contains(": did not power off within 1 s, forced off\n")
    );
}

#[test]
fn guest_reboot_restarts_it_in_the_same_supervisor() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();
    let first_runner = env.runner_pid("g");
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");

    console.type_text("reboot\n");
    wait_until(Duration::from_secs(10), || {
        env.processes("g").get(1).is_some_and(|p| p.2 == 1)
    });

    assert_eq!(env.running_pid("g"), Some(pid));
    let second_runner = env.runner_pid("g");
    assert_ne!(second_runner, first_runner);
    wait_until(Duration::from_secs(5), || !alive(first_runner));
    // The viewer stays attached across the reboot and sees the new boot.
    wait_until(Duration::from_secs(5), || {
        console.output().matches("fake: ready").count() == 2
    });
    let log = env.log("g");
    assert!(log.contains(": guest rebooted\n"), "{log}");
    assert!(
        log.contains(&format!(": starting vcpu-runner (pid {second_runner})\n")),
        "{log}"
    );
    env.ok(&["poweroff", "-f", "g"]);
    assert!(console.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn guest_poweroff_ends_the_supervisor() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");

    console.type_text("poweroff\n");

    assert!(console.wait_exit(Duration::from_secs(5)).success());
    env.wait_stopped("g");
    assert!(env.log("g").contains(": guest powered off\n"));
}

#[test]
fn poweroff_asks_first_and_pulls_the_plug_with_f() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();

    let mut asked = Session::start(env.command(&["poweroff", "g"]));
    asked.type_text("n\n");
    assert!(asked.wait_exit(Duration::from_secs(5)).success());
    assert_eq!(env.running_pid("g"), Some(pid));

    env.ok(&["poweroff", "-f", "g"]);

    assert_eq!(env.running_pid("g"), None);
    let log = env.log("g");
    assert!(log.contains(": poweroff requested\n"), "{log}");
    assert!(log.ends_with(": exited (forced off)\n"), "{log}");
}

#[test]
fn reset_boots_a_new_runner_at_once() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.ignore_power\"");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();
    let first_runner = env.runner_pid("g");

    env.ok(&["reset", "-f", "g"]);
    wait_until(Duration::from_secs(10), || {
        env.processes("g").get(1).is_some_and(|p| p.2 == 1)
    });

    assert_eq!(env.running_pid("g"), Some(pid));
    assert_ne!(env.runner_pid("g"), first_runner);
    assert!(!alive(first_runner));
    let log = env.log("g");
    assert!(log.contains(": reset requested\n"), "{log}");
    assert!(log.contains(": guest reset\n"), "{log}");
    env.ok(&["poweroff", "-f", "g"]);
}

#[test]
fn restart_shuts_down_and_boots_again() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();

    assert_eq!(env.ok(&["restart", "g"]), "Restarting g\n");
    wait_until(Duration::from_secs(10), || {
        env.processes("g").get(1).is_some_and(|p| p.2 == 1)
    });

    assert_eq!(env.running_pid("g"), Some(pid));
    assert!(env.log("g").contains(": guest powered off, restarting\n"));
    env.ok(&["poweroff", "-f", "g"]);
}

#[test]
fn console_replays_early_output_to_every_viewer() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);

    let mut first = Session::start(env.command(&["console", "g"]));
    first.wait_for("fake: ready");
    let mut second = Session::start(env.command(&["console", "g"]));
    second.wait_for("fake: ready");
    first.type_text("hello\n");
    first.wait_for("echo: hello");
    second.wait_for("echo: hello");
    first.type_text("~.");
    let first_status = first.wait_exit(Duration::from_secs(5));
    // A script's viewer: stdin ends, output goes on until the guest ends.
    second.close_stdin();
    std::thread::sleep(Duration::from_millis(300));
    let second_alive = second.child.try_wait().unwrap().is_none();
    env.ok(&["poweroff", "-f", "g"]);
    let second_status = second.wait_exit(Duration::from_secs(5));

    for out in [first.output(), second.output()] {
        assert!(
            out.starts_with("fake: booting 1 cpus 64 MiB"),
            "early output missing: {out:?}"
        );
        assert!(
            out.contains("fake: early line 3\r\nfake: ready\r\n"),
            "{out:?}"
        );
    }
    assert!(first_status.success());
    assert!(second_alive, "the viewer left at stdin EOF");
    assert!(second_status.success());
}

#[test]
fn killed_supervisor_leaves_nothing_that_blocks_the_next_start() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    let dir = env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();
    let runner = env.runner_pid("g");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(5), || !alive(pid) && !alive(runner));

    assert!(dir.join("run.lock").exists(), "stale lock left in place");
    assert!(dir.join("run/control.sock").exists(), "stale socket left");
    assert_eq!(env.running_pid("g"), None);
    env.ok(&["start", "g"]);
    let again = env.running_pid("g").unwrap();
    assert_ne!(again, pid);
    assert!(env.processes("g").len() == 2);
    env.ok(&["stop", "g"]);
}

#[test]
fn sigterm_to_the_supervisor_shuts_the_guest_down() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    env.wait_stopped("g");

    let log = env.log("g");
    assert!(
        log.contains(": SIGTERM received, sending ACPI shutdown\n"),
        "{log}"
    );
    assert!(log.ends_with(": exited (powered off)\n"), "{log}");
}

fn assert_nothing_started(env: &Env, name: &str) {
    let dir = env.vm_dir.join(name);
    assert!(!dir.join("run.lock").exists(), "a lock was left");
    assert!(!dir.join("run").exists(), "run files were left");
    assert_eq!(env.running_pid(name), None);
}

#[test]
fn bad_kernel_initrd_or_memory_is_refused_before_anything_starts() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    let cases: [(&str, &str, &str); 5] = [
        ("notbz", "", "is not a bzImage"),
        ("nokernel", "", "does not exist"),
        ("hugemem", "memory=8T", "more than the host's"),
        ("biginitrd", "linux_initrd=\"initrd\"", "too large for"),
        ("uefi", "", "not yet supported"),
    ];
    for (name, extra, _) in &cases {
        let dir = env.guest(name, extra);
        match *name {
            "notbz" => fs::write(dir.join("vmlinuz"), vec![0u8; 8192]).unwrap(),
            "nokernel" => fs::remove_file(dir.join("vmlinuz")).unwrap(),
            "biginitrd" => fs::File::create(dir.join("initrd"))
                .unwrap()
                .set_len(40 << 20)
                .unwrap(),
            "uefi" => fs::write(dir.join("uefi.conf"), "loader=\"uefi\"\nmemory=64M\n").unwrap(),
            _ => {}
        }
    }

    for (name, _, expected) in &cases {
        let err = env.fails(&["start", name]);
        assert!(err.contains(expected), "{name}: {err}");
        assert!(
            err.starts_with(&format!("vm: ERROR: {name}: ")),
            "{name}: {err}"
        );
        assert_nothing_started(&env, name);
    }
}

#[test]
fn runner_that_cannot_boot_fails_the_start_and_unlocks() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.fail\"");

    let err = env.fails(&["start", "g"]);

    assert!(
        err.contains("g failed to start: fake failure requested"),
        "{err}"
    );
    env.wait_stopped("g");
    assert!(!env.vm_dir.join("g/run.lock").exists());
    assert!(
        env.log("g")
            .contains(": vcpu-runner could not boot the guest: fake failure requested\n")
    );
}

#[test]
fn missing_runner_binary_is_a_clear_error() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    fs::remove_file(env.libexec.join("vcpu-runner")).unwrap();

    let err = env.fails(&["start", "g"]);

    assert!(err.contains("vcpu-runner"), "{err}");
    env.wait_stopped("g");
    assert!(!env.vm_dir.join("g/run.lock").exists());
}

#[test]
fn starting_a_running_guest_is_refused() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();

    let err = env.fails(&["start", "g"]);

    assert_eq!(
        err,
        format!("vm: ERROR: g is already running (pid {pid})\n")
    );
    assert_eq!(env.running_pid("g"), Some(pid));
    env.ok(&["stop", "g"]);
}

#[test]
fn a_second_supervisor_for_a_running_guest_cannot_start() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let pid = env.running_pid("g").unwrap();

    // What `vm start` runs detached, run directly beside the first supervisor.
    let out = env.vm(&["_run", "g"]);

    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("error: the guest is running (pid {pid})\n")
    );
    assert_eq!(env.running_pid("g"), Some(pid));
    assert_eq!(env.processes("g")[1].2, 0);
    env.ok(&["stop", "g"]);
}

#[test]
fn start_of_several_guests_waits_vm_delay_between_them() {
    if skip_unless_root() {
        return;
    }
    let env = Env::with_delay("", 1);
    for name in ["a", "b", "c"] {
        env.guest(name, "");
    }

    let started = Instant::now();
    let out = env.ok(&["start", "a", "b", "c"]);
    let took = started.elapsed();

    assert_eq!(out, "Starting a\nStarting b\nStarting c\n");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    for name in ["a", "b", "c"] {
        assert!(env.running_pid(name).is_some(), "{name}");
    }
    env.ok(&["stop", "a", "b", "c"]);
}

#[test]
fn relative_config_and_libexec_paths_survive_the_detach() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");

    let out = env
        .command(&["start", "g"])
        .current_dir(&env.root)
        .env("CAPVM_CONF", "vm.conf")
        .env("CAPVM_LIBEXEC", "libexec")
        .output()
        .unwrap();

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = env.running_pid("g").unwrap();
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        PathBuf::from("/")
    );
    env.ok(&["stop", "g"]);
}

#[test]
fn stopping_a_stopped_guest_is_an_error() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");

    let err = env.fails(&["stop", "g"]);

    assert!(
        err.contains("g doesn't appear to be a running virtual machine"),
        "{err}"
    );
}

#[test]
fn triple_fault_ends_the_guest_by_default() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.fault\"");

    env.ok(&["start", "g"]);
    env.wait_stopped("g");

    let log = env.log("g");
    assert!(
        log.contains(": guest triple fault on vcpu 0: fake fault\n"),
        "{log}"
    );
    assert!(log.ends_with(": exited (fault)\n"), "{log}");
}

#[test]
fn on_fault_restart_reboots_a_crashing_guest_within_a_bound() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.die\"\non_fault=\"restart\"");

    env.ok(&["start", "g"]);
    env.wait_stopped("g");

    let log = env.log("g");
    assert!(
        log.contains(": vcpu-runner died: killed by SIGABRT\n"),
        "{log}"
    );
    assert_eq!(
        log.matches(": restarting after the fault (on_fault=restart)\n")
            .count(),
        5,
        "{log}"
    );
    assert!(
        log.contains(": 5 fault restarts within 60 s, giving up\n"),
        "{log}"
    );
}

#[test]
fn runner_breaking_the_protocol_is_killed_as_a_crash() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.garbage\"");

    env.ok(&["start", "g"]);
    env.wait_stopped("g");

    let log = env.log("g");
    assert!(
        log.contains(": vcpu-runner sent an invalid message (reason text must be printable ASCII"),
        "{log}"
    );
    assert!(!log.contains("owned"), "{log}");
    assert!(log.ends_with(": exited (fault)\n"), "{log}");
}

#[test]
fn runner_killed_by_seccomp_is_logged_as_such() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    env.ok(&["start", "g"]);
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");

    console.type_text("sigsys\n");
    env.wait_stopped("g");

    let log = env.log("g");
    assert!(
        log.contains(": vcpu-runner died: killed by its seccomp filter (SIGSYS)\n"),
        "{log}"
    );
    assert!(console.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn foreground_start_puts_the_console_on_stdio_and_exits_with_the_guest() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "");
    let mut fg = Session::start(env.command(&["start", "-f", "g"]));
    fg.wait_for("fake: ready");
    assert!(env.running_pid("g").is_some());

    fg.type_text("poweroff\n");
    let status = fg.wait_exit(Duration::from_secs(5));

    assert!(status.success());
    assert!(
        fg.output().starts_with("fake: booting"),
        "{:?}",
        fg.output()
    );
    assert!(fg.output().contains("echo: poweroff"));
    assert_eq!(env.running_pid("g"), None);
}

#[test]
fn foreground_start_fails_when_the_guest_faults() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest("g", "linux_cmdline=\"fake.fault\"");

    let out = env.vm(&["start", "-f", "g"]);

    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("fake: ready"));
}

#[test]
fn startall_and_stopall_follow_vm_list() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("b a");
    for name in ["a", "b", "c"] {
        env.guest(name, "");
    }

    let started = env.ok(&["startall"]);
    assert_eq!(started, "Starting b\nStarting a\n");
    assert!(env.running_pid("a").is_some() && env.running_pid("b").is_some());
    assert_eq!(env.running_pid("c"), None);
    env.ok(&["start", "c"]);

    let stopped = env.ok(&["stopall"]);

    assert_eq!(
        stopped,
        "Sending ACPI shutdown to a\nSending ACPI shutdown to b\nSending ACPI shutdown to c\n"
    );
    for name in ["a", "b", "c"] {
        assert_eq!(env.running_pid(name), None, "{name}");
    }
}

/// Polls `f` until it returns a value, at most `timeout`.
/// Kills guest g's process listed as `role` by `vm info` six times, each as soon as it is
/// back: five restarts (at once, then after 100, 200, 400, 800 ms), and the sixth death fails
/// it. `logged` is the name the supervisor's log gives it; the fake guest's device 0 is the
/// one replaced.
fn kill_six_times(env: &Env, console: &mut Session, role: &str, logged: &str) {
    for kill in 1..=6 {
        let pid = wait_for_value(Duration::from_secs(5), || {
            env.processes("g")
                .into_iter()
                .find(|(r, pid, _)| r == role && *pid != 0)
                .map(|(_, pid, _)| pid)
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let died = format!(": {logged} (pid {pid}) died: killed by SIGKILL\n");
        wait_until(Duration::from_secs(5), || env.log("g").contains(&died));
        if kill < 6 {
            wait_until(Duration::from_secs(5), || {
                console.output().matches("fake: device 0 replaced").count() == kill
            });
        }
    }
}

fn wait_for_value<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guest with two disks: `disk0.img` (writable, 4K sectors) and `disk1.img` (`ro`), each
/// starting with a text the fake dev-blk reports.
fn disk_guest(env: &Env, name: &str) -> PathBuf {
    let dir = env.guest(
        name,
        "uuid=\"5a1c0e2f-0000-4000-8000-000000000001\"\ncpu=2\n\
         disk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"\ndisk0_opts=\"sectorsize=4096\"\n\
         disk1_type=\"virtio-blk\"\ndisk1_name=\"disk1.img\"\ndisk1_opts=\"ro\"",
    );
    fs::write(dir.join("disk0.img"), b"DISK0AAA-and-more").unwrap();
    fs::write(dir.join("disk1.img"), b"DISK1BBB-and-more").unwrap();
    dir
}

/// (pid) of each `dev-blkN` `vm info` shows, in order.
fn device_pids(env: &Env, name: &str) -> Vec<(String, u32)> {
    env.processes(name)
        .into_iter()
        .filter(|(role, ..)| role.starts_with("dev-blk"))
        .map(|(role, pid, _)| (role, pid))
        .collect()
}

#[test]
fn each_disk_gets_a_dev_blk_in_pci_order_with_its_options() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    let dir = disk_guest(&env, "g");

    env.ok(&["start", "g"]);
    let console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");
    let devices = device_pids(&env, "g");

    let out = console.output();
    assert!(
        out.contains(
            "fake: device 0: serial=5a1c0e2f-d0 ro=false bs=4096 queues=2 regions=1 writable=true head=DISK0AAA\r\n\
             fake: device 1: serial=5a1c0e2f-d1 ro=true bs=512 queues=2 regions=1 writable=false head=DISK1BBB\r\n"
        ),
        "{out:?}"
    );
    let roles: Vec<&str> = devices.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["dev-blk0", "dev-blk1"]);
    assert!(devices.iter().all(|&(_, pid)| alive(pid)));
    let log = env.log("g");
    assert!(
        log.contains(&format!(
            ": starting dev-blk1 (pid {}) for {}, read-only\n",
            devices[1].1,
            dir.join("disk1.img").display()
        )),
        "{log}"
    );
    assert!(dir.join("dev-blk0.log").exists() && dir.join("dev-blk1.log").exists());
    env.ok(&["poweroff", "-f", "g"]);
    wait_until(Duration::from_secs(5), || {
        devices.iter().all(|&(_, pid)| !alive(pid))
    });
}

#[test]
fn a_dead_dev_blk_is_restarted_at_once_and_reboots_get_new_ones() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    disk_guest(&env, "g");
    env.ok(&["start", "g"]);
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");
    let first = device_pids(&env, "g");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first[1].1).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let died = format!(": dev-blk1 (pid {}) died: killed by SIGKILL\n", first[1].1);
    wait_until(Duration::from_secs(5), || env.log("g").contains(&died));
    // The runner gets the new process's channel, and the new process its old disk.
    console.wait_for("fake: device 1 replaced: serial=5a1c0e2f-d1 ro=true");
    assert!(
        env.log("g").contains(": dev-blk1 restarted (pid "),
        "{}",
        env.log("g")
    );
    assert!(env.running_pid("g").is_some());
    let after = env.processes("g");
    let blk1: Vec<_> = after.iter().filter(|(r, ..)| r == "dev-blk1").collect();
    assert_eq!(blk1.len(), 1, "{after:?}");
    assert_ne!(blk1[0].1, first[1].1, "a new process");
    assert!(alive(blk1[0].1));
    assert_eq!(blk1[0].2, 1, "vm info counts the restart: {after:?}");
    assert_eq!(device_pids(&env, "g")[0], first[0], "dev-blk0 untouched");

    console.type_text("reboot\n");
    wait_until(Duration::from_secs(10), || {
        console.output().matches("fake: ready").count() == 2
    });
    let second = device_pids(&env, "g");
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(
        second
            .iter()
            .all(|(_, pid)| !first.iter().any(|(_, p)| p == pid) && *pid != blk1[0].1)
    );
    wait_until(Duration::from_secs(5), || !alive(first[0].1));
    env.ok(&["poweroff", "-f", "g"]);
}

#[test]
fn a_dev_blk_that_keeps_dying_is_failed_after_the_limit_and_the_guest_runs_on() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    disk_guest(&env, "g");
    env.ok(&["start", "g"]);
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");
    kill_six_times(&env, &mut console, "dev-blk0", "dev-blk0");
    console.wait_for("fake: device 0 failed");
    assert!(
        env.log("g")
            .contains(": dev-blk0 died 6 times within 60 s: marked failed"),
        "{}",
        env.log("g")
    );
    let procs = env.processes("g");
    let failed: Vec<_> = procs
        .iter()
        .filter(|(r, ..)| r == "dev-blk0:failed")
        .collect();
    assert_eq!(failed.len(), 1, "{procs:?}");
    assert_eq!((failed[0].1, failed[0].2), (0, 5), "no pid, five restarts");
    // The guest and the other disk run on.
    console.type_text("still here\n");
    console.wait_for("echo: still here");
    assert!(
        procs
            .iter()
            .any(|(r, pid, _)| r == "dev-blk1" && alive(*pid))
    );
    env.ok(&["poweroff", "-f", "g"]);
}

#[test]
fn install_attaches_the_iso_read_only_for_that_run_only() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    let dir = env.guest(
        "g",
        "uuid=\"5a1c0e2f-0000-4000-8000-000000000001\"\n\
         disk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"",
    );
    fs::write(dir.join("disk0.img"), b"DISK0AAA").unwrap();
    fs::write(env.vm_dir.join(".iso/inst.iso"), b"ISO9660X-image").unwrap();
    let iso_line = "fake: device 1: serial=5a1c0e2f-d1 ro=true bs=512 queues=1 regions=1 writable=false head=ISO9660X";

    let out = env.ok(&["install", "g", "inst.iso"]);
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");
    console.wait_for(iso_line);
    console.type_text("reboot\n");
    wait_until(Duration::from_secs(10), || {
        console.output().matches(iso_line).count() == 2
    });
    env.ok(&["poweroff", "-f", "g"]);
    console.wait_exit(Duration::from_secs(5));
    env.ok(&["start", "g"]);
    let later = Session::start(env.command(&["console", "g"]));
    later.wait_for("fake: ready");

    assert!(out.starts_with("Starting g with "), "{out}");
    assert!(out.contains("/.iso/inst.iso attached"), "{out}");
    assert!(
        later.output().contains("fake: device 0: "),
        "{:?}",
        later.output()
    );
    assert!(
        !later.output().contains("fake: device 1"),
        "{:?}",
        later.output()
    );
    assert_eq!(device_pids(&env, "g").len(), 1);
    env.ok(&["poweroff", "-f", "g"]);
    let err = env.fails(&["install", "g", "missing.iso"]);
    assert!(
        err.contains("install media") && err.contains("missing.iso does not exist"),
        "{err}"
    );
}

#[test]
fn missing_or_unsupported_disks_are_refused_before_anything_starts() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    env.guest(
        "gone",
        "disk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"",
    );
    let dir = env.guest("ahci", "disk0_type=\"ahci-hd\"\ndisk0_name=\"disk0.img\"");
    fs::write(dir.join("disk0.img"), b"x").unwrap();

    let gone = env.fails(&["start", "gone"]);
    let ahci = env.fails(&["start", "ahci"]);

    assert!(
        gone.contains("gone: disk0: image ") && gone.contains("disk0.img does not exist"),
        "{gone}"
    );
    assert!(
        ahci.contains("disk0: disk0_type=ahci-hd is not supported yet"),
        "{ahci}"
    );
    assert_nothing_started(&env, "gone");
    assert_nothing_started(&env, "ahci");
}

/// The real dev-fb beside `vm` (built by `cargo build -p dev-fb` or a workspace build).
fn real_dev_fb() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_vm"))
        .parent()?
        .join("dev-fb");
    path.is_file().then_some(path)
}

/// Reads the RFB server greeting on a new connection to `addr`.
fn rfb_greeting(addr: &str) -> std::io::Result<[u8; 12]> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut greeting = [0u8; 12];
    s.read_exact(&mut greeting)?;
    Ok(greeting)
}

#[test]
fn a_dead_dev_fb_is_restarted_on_the_same_port_with_its_display_and_input_channels() {
    if skip_unless_root() {
        return;
    }
    let Some(dev_fb) = real_dev_fb() else {
        eprintln!("SKIP: dev-fb is not built beside vm (cargo build -p dev-fb)");
        return;
    };
    let env = Env::new("");
    std::os::unix::fs::symlink(dev_fb, env.libexec.join("dev-fb")).unwrap();
    let dir = env.guest(
        "g",
        "graphics=\"yes\"\ngraphics_res=\"640x480\"\nxhci_mouse=\"yes\"",
    );
    env.ok(&["start", "g"]);
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");
    // The keyboard and the tablet are the runner's devices 0 and 1, served by dev-fb.
    let out = console.output();
    assert!(
        out.contains("fake: device 0: type 18\r\nfake: device 1: type 18\r\n"),
        "{out:?}"
    );
    let vnc = fs::read_to_string(dir.join("console")).unwrap();
    let addr = vnc.trim().strip_prefix("vnc=").unwrap().to_owned();
    let role = "dev-fb+keyboard+tablet";
    let dev_fb_pid = |env: &Env| {
        env.processes("g")
            .into_iter()
            .find(|(r, pid, _)| r == role && *pid != 0)
            .map(|(_, pid, restarts)| (pid, restarts))
    };
    let (first, restarts) = wait_for_value(Duration::from_secs(5), || dev_fb_pid(&env));
    assert_eq!(restarts, 0);
    assert_eq!(&rfb_greeting(&addr).unwrap(), b"RFB 003.008\n");
    let mut client = std::net::TcpStream::connect(&addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut greeting = [0u8; 12];
    client.read_exact(&mut greeting).unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    // The connected client is dropped...
    let mut rest = [0u8; 1];
    assert!(
        matches!(client.read(&mut rest), Ok(0) | Err(_)),
        "the old connection ends"
    );
    // ...and a new one is served on the same port at once.
    let greeting = wait_for_value(Duration::from_secs(5), || rfb_greeting(&addr).ok());
    assert_eq!(&greeting, b"RFB 003.008\n");
    let reconnect = killed.elapsed();
    assert!(reconnect < Duration::from_secs(1), "{reconnect:?}");
    let log = env.log("g");
    assert!(
        log.contains(&format!(": dev-fb (pid {first}) died: killed by SIGKILL\n")),
        "{log}"
    );
    assert!(log.contains(": dev-fb restarted (pid "), "{log}");
    // The runner got the new display channel and both input devices' new channels.
    console.wait_for("fake: display replaced");
    console.wait_for("fake: device 0 replaced: type 18");
    console.wait_for("fake: device 1 replaced: type 18");
    let (second, restarts) = wait_for_value(Duration::from_secs(5), || dev_fb_pid(&env));
    assert_ne!(second, first);
    assert_eq!(restarts, 1, "vm info counts the restart");
    assert!(alive(second));
    // The guest runs on.
    console.type_text("still here\n");
    console.wait_for("echo: still here");
    env.ok(&["poweroff", "-f", "g"]);
    wait_until(Duration::from_secs(5), || !alive(second));
}

#[test]
fn a_dev_fb_that_keeps_dying_is_failed_after_the_limit_with_its_input_devices() {
    if skip_unless_root() {
        return;
    }
    let Some(dev_fb) = real_dev_fb() else {
        eprintln!("SKIP: dev-fb is not built beside vm (cargo build -p dev-fb)");
        return;
    };
    let env = Env::new("");
    std::os::unix::fs::symlink(dev_fb, env.libexec.join("dev-fb")).unwrap();
    let dir = env.guest("g", "graphics=\"yes\"\ngraphics_res=\"640x480\"");
    env.ok(&["start", "g"]);
    let mut console = Session::start(env.command(&["console", "g"]));
    console.wait_for("fake: ready");
    kill_six_times(&env, &mut console, "dev-fb+keyboard", "dev-fb");
    // The keyboard (device 0) is failed in the runner: the driver sees it needing a reset.
    console.wait_for("fake: device 0 failed");
    assert!(
        env.log("g")
            .contains(": dev-fb died 6 times within 60 s: marked failed"),
        "{}",
        env.log("g")
    );
    let procs = env.processes("g");
    let failed: Vec<_> = procs
        .iter()
        .filter(|(r, ..)| r == "dev-fb+keyboard:failed")
        .collect();
    assert_eq!(failed.len(), 1, "{procs:?}");
    assert_eq!((failed[0].1, failed[0].2), (0, 5), "no pid, five restarts");
    // A VNC client is not left waiting for a greeting: it is told why and closed.
    let vnc = fs::read_to_string(dir.join("console")).unwrap();
    let addr = vnc.trim().strip_prefix("vnc=").unwrap().to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut refusal = Vec::new();
    s.read_to_end(&mut refusal)
        .expect("a refusal, then the close");
    assert_eq!(&refusal[..16], b"RFB 003.003\n\0\0\0\0", "{refusal:?}");
    let reason = String::from_utf8_lossy(&refusal[20..]);
    assert!(reason.contains("dev-fb) failed"), "{reason}");
    assert!(
        env.log("g")
            .contains("VNC clients are refused with a reason"),
        "{}",
        env.log("g")
    );
    console.type_text("still here\n");
    console.wait_for("echo: still here");
    env.ok(&["poweroff", "-f", "g"]);
}

/// A guest with `graphics_wait="yes"` whose real dev-fb sits beside `vm`; its VNC address.
fn waiting_guest(env: &Env, name: &str) -> Option<String> {
    let Some(dev_fb) = real_dev_fb() else {
        eprintln!("SKIP: dev-fb is not built beside vm (cargo build -p dev-fb)");
        return None;
    };
    let link = env.libexec.join("dev-fb");
    if !link.exists() {
        std::os::unix::fs::symlink(dev_fb, link).unwrap();
    }
    let dir = env.guest(
        name,
        "graphics=\"yes\"\ngraphics_res=\"640x480\"\ngraphics_wait=\"yes\"",
    );
    env.ok(&["start", name]);
    wait_until(Duration::from_secs(10), || {
        env.log(name).contains("waiting for a VNC client")
    });
    let vnc = fs::read_to_string(dir.join("console")).unwrap();
    Some(vnc.trim().strip_prefix("vnc=").unwrap().to_owned())
}

#[test]
fn graphics_wait_boots_the_guest_only_when_a_vnc_client_connects() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    let Some(addr) = waiting_guest(&env, "w") else {
        return;
    };
    // `vm start` returned, the supervisor runs, nothing of the guest does.
    std::thread::sleep(Duration::from_secs(1));
    assert!(env.running_pid("w").is_some());
    let processes = env.processes("w");
    assert!(
        processes.iter().all(|(role, _, _)| role == "supervisor"),
        "{processes:?}"
    );
    assert!(env.ok(&["info", "w"]).contains(&addr));
    // The client waits in the backlog; the boot's dev-fb accepts and greets it.
    assert_eq!(&rfb_greeting(&addr).unwrap(), b"RFB 003.008\n");
    wait_until(Duration::from_secs(10), || {
        env.processes("w")
            .iter()
            .any(|(r, _, _)| r == "vcpu-runner")
    });
    assert!(env.log("w").contains("a VNC client connected; booting"));
    env.ok(&["poweroff", "-f", "w"]);
    env.wait_stopped("w");
}

#[test]
fn stopping_a_guest_that_waits_for_a_vnc_client_ends_it_unbooted() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new("");
    if waiting_guest(&env, "s").is_none() {
        return;
    }
    env.ok(&["stop", "s"]);
    env.wait_stopped("s");
    let log = env.log("s");
    assert!(
        log.contains("stop requested before a VNC client connected; the guest never booted"),
        "{log}"
    );
    assert!(!log.contains("starting vcpu-runner"), "{log}");
}
