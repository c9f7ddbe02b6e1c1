//! Every capvm child process, started the way the supervisor starts it, is in capability mode
//! when it says it is ready: checked from outside through `/proc/PID`.
//!
//! Needs root (the sandbox unshares namespaces and switches uid); skips with a reason otherwise.

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use supervisor::spawn::{self, SpawnError};

/// `CapEff` of a process that kept exactly `CAP_NET_ADMIN` (bit 12).
const CAP_NET_ADMIN_ONLY: &str = "0000000000001000";
const NO_CAPS: &str = "0000000000000000";

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: sandbox tests need root (namespaces, uid switch)");
    true
}

fn bootstrap(role: Role, fds: Vec<FdRole>) -> Bootstrap {
    let (uid, gid) = sandbox::nobody();
    Bootstrap {
        role,
        vm_name: "sandbox-test".to_string(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: 64,
        },
        fds,
        log_filter: "debug".to_string(),
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Expect {
    binary: &'static str,
    role: Role,
    cap_eff: &'static str,
    own_netns: bool,
}

fn check_child_is_in_capability_mode(expect: &Expect) {
    let (log_read, log_write): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
    let boot = bootstrap(expect.role, vec![FdRole::Log]);
    let path = tests::harness::build_dir().join(expect.binary);
    let mut running = spawn::spawn(&path, &boot, &[log_write.as_fd()])
        .unwrap_or_else(|e| panic!("{}: spawn failed: {e:?}", expect.binary));
    drop(log_write);
    let pid = running.process.id();

    // Outside view, while the child is alive and ready.
    assert_eq!(
        status_field(pid, "Seccomp:"),
        "2",
        "{}: Seccomp",
        expect.binary
    );
    assert_eq!(
        status_field(pid, "NoNewPrivs:"),
        "1",
        "{}: NoNewPrivs",
        expect.binary
    );
    assert_eq!(
        status_field(pid, "CapEff:"),
        expect.cap_eff,
        "{}: CapEff",
        expect.binary
    );
    assert_eq!(
        status_field(pid, "CapPrm:"),
        expect.cap_eff,
        "{}: CapPrm",
        expect.binary
    );
    let uids = status_field(pid, "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u != "0"),
        "{}: runs with uid 0 somewhere in {uids:?}",
        expect.binary
    );
    let ours = fs::read_link("/proc/self/ns/net").expect("our netns");
    let theirs = fs::read_link(format!("/proc/{pid}/ns/net")).expect("child netns");
    assert_eq!(
        ours != theirs,
        expect.own_netns,
        "{}: network namespace",
        expect.binary
    );
    let root_entries = fs::read_dir(format!("/proc/{pid}/root"))
        .expect("list the child's root")
        .count();
    assert_eq!(root_entries, 0, "{}: its root is not empty", expect.binary);

    // It holds fds 0-2 (/dev/null), its bootstrap socket and its log, nothing else.
    let mut fds: Vec<u32> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list child fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds.len(), 5, "{}: open fds {fds:?}", expect.binary);

    // Closing the channel asks it to exit; it exits cleanly and logged its start.
    drop(running.channel);
    let status = wait_exit(&mut running.process, Duration::from_secs(10));
    assert!(status.success(), "{}: exit status {status}", expect.binary);
    let mut log = String::new();
    fs::File::from(log_read)
        .read_to_string(&mut log)
        .expect("read log");
    assert!(
        log.contains("in capability mode"),
        "{}: log lacks the ready line: {log}",
        expect.binary
    );
}

#[test]
fn every_device_process_runs_in_capability_mode_as_nobody() {
    if skip_unless_root() {
        return;
    }
    let children = [
        ("vcpu-runner", Role::VcpuRunner),
        ("dev-blk", Role::DevBlk { index: 0 }),
        ("dev-net", Role::DevNet { index: 0 }),
        ("dev-fb", Role::DevFb),
    ];
    for (binary, role) in children {
        check_child_is_in_capability_mode(&Expect {
            binary,
            role,
            cap_eff: NO_CAPS,
            own_netns: true,
        });
    }
}

#[test]
fn netcfg_keeps_only_net_admin_in_the_host_network_namespace() {
    if skip_unless_root() {
        return;
    }
    check_child_is_in_capability_mode(&Expect {
        binary: "netcfg",
        role: Role::Netcfg,
        cap_eff: CAP_NET_ADMIN_ONLY,
        own_netns: false,
    });
}

#[test]
fn a_bootstrap_for_another_role_is_refused_by_the_child() {
    if skip_unless_root() {
        return;
    }
    let boot = bootstrap(Role::DevNet { index: 0 }, vec![]);
    let err = spawn::spawn(&tests::harness::build_dir().join("dev-blk"), &boot, &[])
        .expect_err("dev-blk accepted a dev-net bootstrap");
    match err {
        SpawnError::ChildFailed { stage, error, .. } => {
            assert_eq!(stage, "validate");
            assert!(error.contains("dev-net"), "error text: {error}");
        }
        other => panic!("unexpected error: {other:?}"),
    }
}

#[test]
fn a_child_started_without_a_bootstrap_socket_exits_with_a_clear_error() {
    let out = Command::new(tests::harness::build_dir().join("dev-blk"))
        .output()
        .expect("run dev-blk");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a bootstrap socket"),
        "stderr: {stderr}"
    );
}
