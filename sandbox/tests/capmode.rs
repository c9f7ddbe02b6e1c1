//! Capability mode observed from outside.
//!
//! Each case re-executes this binary as a child (the role chosen by `SANDBOX_TEST_PROBE`),
//! which enters a profile while single-threaded (`harness = false`: no libtest threads), says
//! `entered` on a socket it held before entering, waits for `go`, tries one operation and
//! reports `result ...` on the same socket. The parent inspects the child's `/proc` entries
//! while it waits, then asserts the designed outcome: a Capsicum-like call fails with
//! `sandbox::ECAPMODE`, anything else outside the allow-list kills the child with SIGSYS.
//!
//! Needs root (namespaces, `pivot_root`, `setresuid`); prints why and passes nothing otherwise.

use std::collections::BTreeSet;
use std::env;
use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, ExitStatus};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::Signal;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, connect, socket};
use nix::unistd::{Pid, geteuid, pipe};

use sandbox::{ECAPMODE, Policy, Profile, Weaken};

const PROBE: &str = "SANDBOX_TEST_PROBE";
const PROFILE: &str = "SANDBOX_TEST_PROFILE";
const CTL_FD: &str = "SANDBOX_TEST_CTL_FD";
const EXTRA_FDS: &str = "SANDBOX_TEST_EXTRA_FDS";
const PORT: &str = "SANDBOX_TEST_PORT";

/// One test case: `Err` carries what went wrong.
type Case = fn() -> Result<(), String>;

/// Every case, in the order they run.
const CASES: &[(&str, Case)] = &[
    (
        "open_etc_passwd_fails_with_ecapmode",
        open_etc_passwd_fails_with_ecapmode,
    ),
    (
        "socket_inet_fails_with_ecapmode",
        socket_inet_fails_with_ecapmode,
    ),
    (
        "connect_held_socket_to_loopback_listener_fails_with_ecapmode",
        connect_held_socket_to_loopback_listener_fails_with_ecapmode,
    ),
    (
        "sendto_an_address_fails_with_ecapmode",
        sendto_an_address_fails_with_ecapmode,
    ),
    ("execve_fails_with_ecapmode", execve_fails_with_ecapmode),
    ("fork_kills_with_sigsys", fork_kills_with_sigsys),
    ("kill_pid_1_kills_with_sigsys", kill_pid_1_kills_with_sigsys),
    (
        "ptrace_attach_kills_with_sigsys",
        ptrace_attach_kills_with_sigsys,
    ),
    ("mount_kills_with_sigsys", mount_kills_with_sigsys),
    ("unshare_kills_with_sigsys", unshare_kills_with_sigsys),
    (
        "tgkill_to_another_process_kills_with_sigsys",
        tgkill_to_another_process_kills_with_sigsys,
    ),
    (
        "executable_mapping_kills_with_sigsys",
        executable_mapping_kills_with_sigsys,
    ),
    (
        "io_uring_setup_kills_with_sigsys",
        io_uring_setup_kills_with_sigsys,
    ),
    ("abort_still_raises_sigabrt", abort_still_raises_sigabrt),
    (
        "landlock_denies_an_io_uring_open_that_seccomp_cannot_see",
        landlock_denies_an_io_uring_open_that_seccomp_cannot_see,
    ),
    (
        "held_pipes_still_read_and_write",
        held_pipes_still_read_and_write,
    ),
    (
        "proc_status_shows_seccomp_nnp_no_caps_unprivileged_ids",
        proc_status_shows_seccomp_nnp_no_caps_unprivileged_ids,
    ),
    (
        "network_namespace_differs_from_parent",
        network_namespace_differs_from_parent,
    ),
    (
        "only_kept_descriptors_remain_and_stdio_is_dev_null",
        only_kept_descriptors_remain_and_stdio_is_dev_null,
    ),
    ("root_is_empty", root_is_empty),
    (
        "rlimits_forbid_processes_and_cores",
        rlimits_forbid_processes_and_cores,
    ),
    (
        "netcfg_profile_keeps_only_net_admin_and_host_network",
        netcfg_profile_keeps_only_net_admin_and_host_network,
    ),
    (
        "threads_profile_starts_a_thread",
        threads_profile_starts_a_thread,
    ),
    (
        "threads_profile_fork_still_kills",
        threads_profile_fork_still_kills,
    ),
    (
        "multithreaded_process_is_refused_before_any_change",
        multithreaded_process_is_refused_before_any_change,
    ),
    (
        "no_namespaces_weakening_keeps_host_network_but_denies_open",
        no_namespaces_weakening_keeps_host_network_but_denies_open,
    ),
];

fn main() -> ExitCode {
    if let Ok(probe) = env::var(PROBE) {
        return child::run(&probe);
    }
    if !geteuid().is_root() {
        println!(
            "skipping sandbox capability-mode tests: they need root (euid {})",
            geteuid()
        );
        return ExitCode::SUCCESS;
    }
    let filters: Vec<String> = env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = 0usize;
    let mut ran = 0usize;
    for (name, case) in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        match case() {
            Ok(()) => println!("test {name} ... ok"),
            Err(message) => {
                failed += 1;
                println!("test {name} ... FAILED\n    {message}");
            }
        }
    }
    println!("\ntest result: {} passed; {failed} failed", ran - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---- The cases -------------------------------------------------------------------------------

fn open_etc_passwd_fails_with_ecapmode() -> Result<(), String> {
    Sandboxed::spawn("open", "plain", &[], &[])?.expect_result(&errno(ECAPMODE))
}

fn socket_inet_fails_with_ecapmode() -> Result<(), String> {
    Sandboxed::spawn("socket", "plain", &[], &[])?.expect_result(&errno(ECAPMODE))
}

fn connect_held_socket_to_loopback_listener_fails_with_ecapmode() -> Result<(), String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(text)?;
    listener.set_nonblocking(true).map_err(text)?;
    let port = listener.local_addr().map_err(text)?.port();
    // Created here, in the host's network namespace, where connecting would work: only the
    // sandbox can make it fail.
    let sock = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .map_err(text)?;

    let child = Sandboxed::spawn("connect", "plain", &[sock], &[(PORT, port.to_string())])?;
    child.expect_result(&errno(ECAPMODE))?;

    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Ok((_, peer)) => Err(format!("the listener accepted a connection from {peer}")),
        Err(e) => Err(format!("accept: {e}")),
    }
}

fn sendto_an_address_fails_with_ecapmode() -> Result<(), String> {
    let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(text)?;
    receiver.set_nonblocking(true).map_err(text)?;
    let port = receiver.local_addr().map_err(text)?.port();
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::empty(),
        None,
    )
    .map_err(text)?;

    let child = Sandboxed::spawn("sendto", "plain", &[sock], &[(PORT, port.to_string())])?;
    child.expect_result(&errno(ECAPMODE))?;

    let mut buf = [0u8; 16];
    match receiver.recv(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Ok(n) => Err(format!("the receiver got {n} bytes")),
        Err(e) => Err(format!("recv: {e}")),
    }
}

fn execve_fails_with_ecapmode() -> Result<(), String> {
    Sandboxed::spawn("execve", "plain", &[], &[])?.expect_result(&errno(ECAPMODE))
}

fn fork_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("fork", "plain", &[], &[])?.expect_sigsys()
}

fn kill_pid_1_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("kill", "plain", &[], &[])?.expect_sigsys()
}

fn ptrace_attach_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("ptrace", "plain", &[], &[])?.expect_sigsys()
}

fn mount_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("mount", "plain", &[], &[])?.expect_sigsys()
}

fn unshare_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("unshare", "plain", &[], &[])?.expect_sigsys()
}

fn tgkill_to_another_process_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("tgkill-other", "plain", &[], &[])?.expect_sigsys()
}

fn executable_mapping_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("mmap-exec", "plain", &[], &[])?.expect_sigsys()
}

fn io_uring_setup_kills_with_sigsys() -> Result<(), String> {
    Sandboxed::spawn("uring-setup", "plain", &[], &[])?.expect_sigsys()
}

/// `abort()` signals the process itself (`tgkill` to `$pid`): a panic in a release build
/// (`panic = "abort"`) must read as SIGABRT to the supervisor, not as a sandbox violation.
fn abort_still_raises_sigabrt() -> Result<(), String> {
    let outcome = Sandboxed::spawn("abort", "plain", &[], &[])?.finish()?;
    if outcome.attempted && outcome.status.signal() == Some(Signal::SIGABRT as i32) {
        Ok(())
    } else {
        Err(format!("expected SIGABRT, got {:?}", outcome.status))
    }
}

/// A profile that allows `io_uring` gets operations seccomp never sees. Opening the new root
/// (a tmpfs of mode 0555, readable by the sandbox's uid) through the ring can then only be
/// refused by Landlock.
fn landlock_denies_an_io_uring_open_that_seccomp_cannot_see() -> Result<(), String> {
    Sandboxed::spawn("uring-open-root", "uring", &[], &[])?.expect_result(&errno(ECAPMODE))
}

fn held_pipes_still_read_and_write() -> Result<(), String> {
    let (to_child_read, to_child_write) = pipe().map_err(text)?;
    let (from_child_read, from_child_write) = pipe().map_err(text)?;
    let child = Sandboxed::spawn("pipe-io", "plain", &[to_child_read, from_child_write], &[])?;

    let mut input = fs::File::from(to_child_write);
    input.write_all(b"ping").map_err(text)?;
    drop(input);
    let outcome = child.finish()?;
    let mut reply = String::new();
    fs::File::from(from_child_read)
        .read_to_string(&mut reply)
        .map_err(text)?;

    outcome.expect_result("ok")?;
    if reply == "PING" {
        Ok(())
    } else {
        Err(format!("child wrote {reply:?}, expected \"PING\""))
    }
}

fn proc_status_shows_seccomp_nnp_no_caps_unprivileged_ids() -> Result<(), String> {
    let child = Sandboxed::spawn("none", "plain", &[], &[])?;
    let status = child.proc_file("status")?;
    let (uid, gid) = sandbox::nobody();

    let checks = [
        field(&status, "Seccomp") == "2",
        field(&status, "NoNewPrivs") == "1",
        field(&status, "CapEff") == "0000000000000000",
        field(&status, "CapPrm") == "0000000000000000",
        field(&status, "CapInh") == "0000000000000000",
        field(&status, "CapBnd") == "0000000000000000",
        field(&status, "CapAmb") == "0000000000000000",
        field(&status, "Groups").is_empty(),
        ids(&status, "Uid") == [uid; 4],
        ids(&status, "Gid") == [gid; 4],
        uid != 0,
    ];
    child.finish()?.expect_result("ok")?;
    if checks.iter().all(|ok| *ok) {
        Ok(())
    } else {
        Err(format!("checks {checks:?} on status:\n{status}"))
    }
}

fn network_namespace_differs_from_parent() -> Result<(), String> {
    let child = Sandboxed::spawn("none", "plain", &[], &[])?;
    let theirs = child.proc_link("ns/net")?;
    let ours = own_net_ns()?;
    child.finish()?.expect_result("ok")?;
    if theirs == ours {
        Err(format!(
            "child shares the parent's network namespace {theirs}"
        ))
    } else {
        Ok(())
    }
}

fn only_kept_descriptors_remain_and_stdio_is_dev_null() -> Result<(), String> {
    let child = Sandboxed::spawn("none", "plain", &[], &[])?;
    let fds = child.open_fds()?;
    let stdio = (0..3)
        .map(|fd| child.proc_link(&format!("fd/{fd}")))
        .collect::<Result<Vec<_>, _>>()?;
    let expected: BTreeSet<RawFd> = [0, 1, 2, child.ctl_fd].into();
    child.finish()?.expect_result("ok")?;
    if fds != expected {
        return Err(format!("open descriptors {fds:?}, expected {expected:?}"));
    }
    if stdio.iter().any(|target| target != "/dev/null") {
        return Err(format!("stdio points at {stdio:?}"));
    }
    Ok(())
}

fn root_is_empty() -> Result<(), String> {
    let child = Sandboxed::spawn("none", "plain", &[], &[])?;
    let entries: Vec<String> = fs::read_dir(format!("/proc/{}/root/", child.pid))
        .map_err(text)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(text)?;
    let root = child.proc_link("root")?;
    child.finish()?.expect_result("ok")?;
    if entries.is_empty() && root == "/" {
        Ok(())
    } else {
        Err(format!("root {root} holds {entries:?}"))
    }
}

fn rlimits_forbid_processes_and_cores() -> Result<(), String> {
    let child = Sandboxed::spawn("none", "plain", &[], &[])?;
    let limits = child.proc_file("limits")?;
    child.finish()?.expect_result("ok")?;
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let expected = [
        ("Max processes", "Max processes 0 0 processes"),
        ("Max core file size", "Max core file size 0 0 bytes"),
        ("Max open files", "Max open files 256 256 files"),
    ];
    for (name, want) in expected {
        if limit(name) != want {
            return Err(format!("{:?}, expected {want:?}", limit(name)));
        }
    }
    Ok(())
}

fn netcfg_profile_keeps_only_net_admin_and_host_network() -> Result<(), String> {
    let child = Sandboxed::spawn("none", "netcfg", &[], &[])?;
    let status = child.proc_file("status")?;
    let theirs = child.proc_link("ns/net")?;
    let ours = own_net_ns()?;
    child.finish()?.expect_result("ok")?;

    let net_admin = "0000000000001000";
    let checks = [
        field(&status, "CapEff") == net_admin,
        field(&status, "CapPrm") == net_admin,
        field(&status, "CapBnd") == net_admin,
        field(&status, "CapInh") == "0000000000000000",
        field(&status, "CapAmb") == "0000000000000000",
        field(&status, "Seccomp") == "2",
        field(&status, "NoNewPrivs") == "1",
        ids(&status, "Uid").iter().all(|id| *id != 0),
        theirs == ours,
    ];
    if checks.iter().all(|ok| *ok) {
        Ok(())
    } else {
        Err(format!(
            "checks {checks:?}; net ns {theirs} vs {ours}; status:\n{status}"
        ))
    }
}

fn threads_profile_starts_a_thread() -> Result<(), String> {
    Sandboxed::spawn("thread", "threads", &[], &[])?.expect_result("ok 42")
}

fn threads_profile_fork_still_kills() -> Result<(), String> {
    Sandboxed::spawn("fork", "threads", &[], &[])?.expect_sigsys()
}

fn multithreaded_process_is_refused_before_any_change() -> Result<(), String> {
    let child = Sandboxed::spawn_raw("none", "multithreaded", &[], &[])?;
    let outcome = child.finish()?;
    let line = outcome.line.clone().unwrap_or_default();
    if line.starts_with("enter-error NotSingleThreaded") && outcome.status.code() == Some(3) {
        Ok(())
    } else {
        Err(format!("got {line:?}, status {:?}", outcome.status))
    }
}

fn no_namespaces_weakening_keeps_host_network_but_denies_open() -> Result<(), String> {
    let child = Sandboxed::spawn("open", "no-namespaces", &[], &[])?;
    let theirs = child.proc_link("ns/net")?;
    let status = child.proc_file("status")?;
    let ours = own_net_ns()?;
    child.expect_result(&errno(ECAPMODE))?;
    if theirs == ours && field(&status, "Seccomp") == "2" {
        Ok(())
    } else {
        Err(format!("net ns {theirs} vs {ours}; status:\n{status}"))
    }
}

// ---- The parent's side -----------------------------------------------------------------------

/// A child that has entered capability mode and waits for `go`.
struct Sandboxed {
    process: std::process::Child,
    pid: u32,
    ctl: BufReader<UnixStream>,
    /// The control socket's number inside the child.
    ctl_fd: RawFd,
}

/// How a child ended.
struct Outcome {
    /// The child reached its probe.
    attempted: bool,
    /// What it reported after the probe.
    line: Option<String>,
    status: ExitStatus,
}

impl Sandboxed {
    /// Starts a child and waits until it reports it has entered capability mode.
    fn spawn(
        probe: &str,
        profile: &str,
        extra: &[OwnedFd],
        env: &[(&str, String)],
    ) -> Result<Sandboxed, String> {
        let mut child = Sandboxed::spawn_raw(probe, profile, extra, env)?;
        let line = child.read_line()?;
        if line.as_deref() == Some("entered") {
            Ok(child)
        } else {
            let status = child.process.wait().map_err(text)?;
            Err(format!("child did not enter: {line:?}, {status:?}"))
        }
    }

    fn spawn_raw(
        probe: &str,
        profile: &str,
        extra: &[OwnedFd],
        env: &[(&str, String)],
    ) -> Result<Sandboxed, String> {
        let (ours, theirs) = UnixStream::pair().map_err(text)?;
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(text)?;
        // This process is single-threaded, so no other spawn can inherit these in between.
        for fd in extra.iter().map(AsFd::as_fd).chain([theirs.as_fd()]) {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(text)?;
        }
        let extra_list = extra
            .iter()
            .map(|fd| fd.as_raw_fd().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let ctl_fd = theirs.as_raw_fd();
        let process = Command::new(env::current_exe().map_err(text)?)
            .env(PROBE, probe)
            .env(PROFILE, profile)
            .env(CTL_FD, ctl_fd.to_string())
            .env(EXTRA_FDS, extra_list)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .spawn()
            .map_err(text)?;
        drop(theirs);
        Ok(Sandboxed {
            pid: process.id(),
            process,
            ctl: BufReader::new(ours),
            ctl_fd,
        })
    }

    fn read_line(&mut self) -> Result<Option<String>, String> {
        let mut line = String::new();
        match self.ctl.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line.trim_end().to_owned())),
            Err(e) => Err(format!("reading from the child: {e}")),
        }
    }

    /// Lets the child run its probe and waits for it to end.
    fn finish(mut self) -> Result<Outcome, String> {
        // A child that is already gone makes this fail with EPIPE; its status tells.
        let _ = self.ctl.get_mut().write_all(b"go\n");
        let mut line = self.read_line().unwrap_or(None);
        let attempted = line.as_deref() == Some("attempt");
        if attempted {
            line = self.read_line().unwrap_or(None);
        }
        let status = self.process.wait().map_err(text)?;
        Ok(Outcome {
            attempted,
            line,
            status,
        })
    }

    fn expect_result(self, expected: &str) -> Result<(), String> {
        self.finish()?.expect_result(expected)
    }

    fn expect_sigsys(self) -> Result<(), String> {
        let outcome = self.finish()?;
        let sigsys = outcome.status.signal() == Some(Signal::SIGSYS as i32);
        if sigsys && outcome.attempted && outcome.line.is_none() {
            Ok(())
        } else {
            Err(format!(
                "expected death by SIGSYS during the probe, got {:?} (probe reached: {}, then {:?})",
                outcome.status, outcome.attempted, outcome.line
            ))
        }
    }

    fn proc_file(&self, name: &str) -> Result<String, String> {
        fs::read_to_string(format!("/proc/{}/{name}", self.pid)).map_err(text)
    }

    fn proc_link(&self, name: &str) -> Result<String, String> {
        fs::read_link(format!("/proc/{}/{name}", self.pid))
            .map(|p| p.display().to_string())
            .map_err(text)
    }

    fn open_fds(&self) -> Result<BTreeSet<RawFd>, String> {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map_err(text)?
            .map(|e| {
                let name = e.map_err(text)?.file_name();
                name.to_string_lossy().parse::<RawFd>().map_err(text)
            })
            .collect()
    }
}

impl Outcome {
    fn expect_result(&self, expected: &str) -> Result<(), String> {
        let want = format!("result {expected}");
        if self.attempted && self.line.as_deref() == Some(want.as_str()) && self.status.success() {
            Ok(())
        } else {
            Err(format!(
                "expected {want:?} and exit 0, got {:?} and {:?}",
                self.line, self.status
            ))
        }
    }
}

fn own_net_ns() -> Result<String, String> {
    fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .map_err(text)
}

fn errno(code: i32) -> String {
    format!("errno={code}")
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map_or("<missing>", str::trim)
}

fn ids(status: &str, name: &str) -> Vec<u32> {
    field(status, name)
        .split_whitespace()
        .filter_map(|id| id.parse().ok())
        .collect()
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---- The child's side ------------------------------------------------------------------------

mod child {
    use super::{
        AddressFamily, CTL_FD, EXTRA_FDS, ExitCode, FromRawFd, Ipv4Addr, PORT, PROFILE, Pid,
        Policy, Profile, RawFd, SockFlag, SockType, SockaddrIn, SocketAddrV4, UnixStream, Weaken,
        connect, env, errno, fs, io, socket, text,
    };
    use std::ffi::CString;
    use std::io::{Read, Write};

    /// Exit codes: 0 after a probe, 2 on a setup error, 3 when `enter` failed.
    pub(super) fn run(probe: &str) -> ExitCode {
        match setup(probe) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("sandbox test child: {e}");
                ExitCode::from(2)
            }
        }
    }

    fn setup(probe: &str) -> Result<ExitCode, String> {
        let ctl_fd: RawFd = env::var(CTL_FD).map_err(text)?.parse().map_err(text)?;
        // SAFETY: the parent passed this descriptor number for us alone; nothing else owns it.
        let mut ctl = unsafe { UnixStream::from_raw_fd(ctl_fd) };
        let extra: Vec<RawFd> = env::var(EXTRA_FDS)
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(text))
            .collect::<Result<_, _>>()?;
        let port: u16 = env::var(PORT)
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let parent = nix::unistd::getppid();

        let mut profile = Profile::new("sandbox-test", Policy::empty())
            .keep_fd(ctl_fd)
            .keep_fds(extra.iter().copied());
        let mut blocker = None;
        match env::var(PROFILE).map_err(text)?.as_str() {
            "plain" => {}
            "threads" => profile = profile.threads(true),
            "netcfg" => profile = profile.keep_net_admin(true),
            "uring" => {
                let policy = Policy::parse(
                    "io_uring_setup # test: a ring\nio_uring_enter # test: submitting to it\n",
                )
                .map_err(text)?;
                profile.policy = policy;
            }
            "no-namespaces" => {
                profile = profile.weaken(Weaken {
                    no_namespaces: true,
                    ..Weaken::default()
                });
            }
            "multithreaded" => {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                blocker = Some((tx, std::thread::spawn(move || rx.recv())));
            }
            other => return Err(format!("unknown profile {other}")),
        }

        if let Err(e) = sandbox::enter(&profile) {
            let name = format!("{e:?}");
            let variant = name.split([' ', '{', '(']).next().unwrap_or_default();
            writeln!(ctl, "enter-error {variant}: {e}").map_err(text)?;
            drop(blocker);
            return Ok(ExitCode::from(3));
        }
        writeln!(ctl, "entered").map_err(text)?;
        let mut go = [0u8; 3];
        ctl.read_exact(&mut go).map_err(text)?;

        // Tells the parent the probe starts now, so a SIGSYS after this line was the probe's.
        writeln!(ctl, "attempt").map_err(text)?;
        let result = attempt(probe, &extra, port, parent);
        writeln!(ctl, "result {result}").map_err(text)?;
        Ok(ExitCode::SUCCESS)
    }

    /// Tries one operation; a forbidden one either returns `errno=N` or never returns.
    fn attempt(probe: &str, extra: &[RawFd], port: u16, parent: Pid) -> String {
        let outcome: Result<String, io::Error> = match probe {
            "none" => Ok("ok".to_owned()),
            "open" => fs::File::open("/etc/passwd").map(|_| "opened".to_owned()),
            "socket" => socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
            .map(|_| "created".to_owned())
            .map_err(io::Error::from),
            "connect" => {
                let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
                let fd = extra.first().copied().unwrap_or(-1);
                connect(fd, &addr)
                    .map(|()| "connected".to_owned())
                    .map_err(io::Error::from)
            }
            "sendto" => {
                let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
                let fd = extra.first().copied().unwrap_or(-1);
                nix::sys::socket::sendto(fd, b"x", &addr, nix::sys::socket::MsgFlags::empty())
                    .map(|n| format!("sent {n}"))
                    .map_err(io::Error::from)
            }
            "execve" => {
                let path = CString::from(c"/bin/true");
                nix::unistd::execv(&path, &[&path])
                    .map(|_| "executed".to_owned())
                    .map_err(io::Error::from)
            }
            "fork" => fork(),
            "kill" => nix::sys::signal::kill(Pid::from_raw(1), None)
                .map(|()| "signalled".to_owned())
                .map_err(io::Error::from),
            "ptrace" => nix::sys::ptrace::attach(parent)
                .map(|()| "attached".to_owned())
                .map_err(io::Error::from),
            "mount" => nix::mount::mount(
                Some("none"),
                "/",
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map(|()| "mounted".to_owned())
            .map_err(io::Error::from),
            "unshare" => nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map(|()| "unshared".to_owned())
                .map_err(io::Error::from),
            "pipe-io" => pipe_io(extra),
            "tgkill-other" => {
                // SAFETY: tgkill takes integers only; signal 0 only checks permission.
                let rc = unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
                if rc < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok("signalled".to_owned())
                }
            }
            "mmap-exec" => {
                // SAFETY: a fresh anonymous mapping aliases nothing; it is never dereferenced.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if addr == libc::MAP_FAILED {
                    Err(io::Error::last_os_error())
                } else {
                    Ok("mapped".to_owned())
                }
            }
            "uring-setup" => io_uring::IoUring::new(8).map(|_| "ring".to_owned()),
            "uring-open-root" => uring_open_root(),
            "abort" => std::process::abort(),
            "thread" => std::thread::spawn(|| 42)
                .join()
                .map(|v| format!("ok {v}"))
                .map_err(|_| io::Error::other("thread panicked")),
            other => Ok(format!("unknown probe {other}")),
        };
        match outcome {
            Ok(text) => text,
            Err(e) => errno(e.raw_os_error().unwrap_or(-1)),
        }
    }

    fn fork() -> io::Result<String> {
        // SAFETY: the process is single-threaded; the child, if any, only calls _exit.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: _exit ends the forked child without running parent-owned destructors.
                unsafe { libc::_exit(0) }
            }
            _ => Ok("forked".to_owned()),
        }
    }

    /// A no-op first, proving the ring works, then `openat("/")` through the ring.
    fn uring_open_root() -> io::Result<String> {
        use io_uring::{opcode, types};
        let mut ring = io_uring::IoUring::new(8)?;
        let nop = opcode::Nop::new().build().user_data(1);
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/".as_ptr())
            .flags(libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .build()
            .user_data(2);
        for entry in [nop, open] {
            // SAFETY: the path is a 'static C string; the ring outlives the submission.
            unsafe { ring.submission().push(&entry) }.map_err(io::Error::other)?;
            ring.submit_and_wait(1)?;
            let Some(done) = ring.completion().next() else {
                return Ok("no completion".to_owned());
            };
            match (done.user_data(), done.result()) {
                (1, 0) => {}
                (1, res) => return Ok(format!("nop failed with {res}")),
                (_, res) if res < 0 => return Err(io::Error::from_raw_os_error(-res)),
                (_, _) => return Ok("opened".to_owned()),
            }
        }
        Ok("no result".to_owned())
    }

    fn pipe_io(extra: &[RawFd]) -> io::Result<String> {
        let [read_fd, write_fd] = extra else {
            return Ok("pipe-io needs two descriptors".to_owned());
        };
        // SAFETY: the parent passed these two pipe ends for this probe alone.
        let (mut input, mut output) = unsafe {
            (
                fs::File::from_raw_fd(*read_fd),
                fs::File::from_raw_fd(*write_fd),
            )
        };
        let mut buf = String::new();
        input.read_to_string(&mut buf)?;
        output.write_all(buf.to_uppercase().as_bytes())?;
        Ok("ok".to_owned())
    }
}
