//! Network namespaces for the e2e tests, and a launcher that starts a capvm guest inside one.
//!
//! Each test that puts guests on a switch makes its own namespace ([`Netns`], deleted on
//! drop); the `vm` commands run under `ip netns exec` ([`InNetns`]), so the switches' bridges
//! and the guests' taps live there and nothing touches the host's own interfaces. Addresses
//! are the tests' own, from `198.18.0.0/15` and `2001:db8::/32`. [`guest_ifup`] configures the
//! guest's end.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

use crate::launcher::{CapvmLauncher, GuestSpec, LaunchError, Launcher};
use crate::testvm::TestVm;

/// Runs `command`; it must exit 0. Returns its stdout.
pub fn sh(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `capvm-e2e-TAG-PID`, with its loopback up (one left by an earlier run of this pid is
    /// deleted first).
    pub fn new(tag: &str) -> anyhow::Result<Netns> {
        let name = format!("capvm-e2e-{tag}-{}", std::process::id());
        if Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NS ARGS`, which must succeed; its stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        sh(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip netns exec NS PROGRAM`.
    pub fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `command` (program, arguments, environment, directory) under `ip netns exec`.
    pub fn wrap(&self, command: &Command) -> Command {
        let mut wrapped = self.exec(Path::new(command.get_program()));
        wrapped
            .args(command.get_args())
            .envs(command.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Whether `ping` from inside the namespace gets an answer from `addr`.
    pub fn ping(&self, addr: &str) -> anyhow::Result<()> {
        sh(Command::new("ip").args([
            "netns", "exec", &self.name, "ping", "-c", "3", "-i", "0.2", "-W", "5", addr,
        ]))
        .map(drop)
        .with_context(|| format!("the host cannot ping {addr}"))
    }

    /// Interface names in the namespace whose name starts with `prefix`.
    pub fn links_named(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    /// Runs `f` on a thread that entered the namespace (sockets it makes live there).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let path = self.path();
        std::thread::spawn(move || {
            let netns = fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the test's network namespace")?;
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// [`CapvmLauncher`] inside a network namespace: `switches` are `vm` commands (switch
/// creation) run before the guest starts, `conf` is appended to the guest's config.
#[derive(Debug)]
pub struct InNetns<'a> {
    pub inner: CapvmLauncher,
    pub ns: &'a Netns,
    pub switches: Vec<Vec<String>>,
    pub conf: String,
}

impl Launcher for InNetns<'_> {
    fn name(&self) -> String {
        "capvm".to_owned()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let command = self.inner.command(spec, workdir)?;
        let conf = workdir
            .join("vms")
            .join(&self.inner.name)
            .join(format!("{}.conf", self.inner.name));
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(self.conf.as_bytes()))
            .map_err(|source| LaunchError::Prepare {
                path: conf.clone(),
                source,
            })?;
        for args in &self.switches {
            let mut vm = self.in_ns(&self.inner.vm_command(workdir));
            let out = vm
                .args(args)
                .output()
                .map_err(|source| LaunchError::Spawn {
                    program: "vm".into(),
                    source,
                })?;
            if !out.status.success() {
                return Err(LaunchError::Setup {
                    command: format!("vm {}", args.join(" ")),
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        Ok(self.in_ns(&command))
    }
}

impl InNetns<'_> {
    /// `command` (program, arguments, environment) under `ip netns exec`.
    pub fn in_ns(&self, command: &Command) -> Command {
        self.ns.wrap(command)
    }
}

/// Brings up the guest's interface with MAC `mac` as `addrs` (IPv6 without duplicate address
/// detection, so an address is usable at once: busybox `ip` has no `nodad`). Returns the
/// interface's name.
pub fn guest_ifup(vm: &mut TestVm, mac: &str, addrs: &[&str]) -> anyhow::Result<String> {
    let mut run = |command: &str| -> anyhow::Result<String> {
        let out = vm.run(command, GUEST_COMMAND_TIMEOUT)?;
        ensure!(
            out.status == 0,
            "{command:?} exited {}: {}",
            out.status,
            out.output
        );
        Ok(out.output.trim().to_owned())
    };
    let ifname = run(&format!(
        "for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {mac} ] && basename $i; done; true"
    ))?;
    ensure!(
        !ifname.is_empty() && !ifname.contains(char::is_whitespace),
        "no single guest interface has MAC {mac}: {ifname:?}"
    );
    run(&format!(
        "echo 0 > /proc/sys/net/ipv6/conf/{ifname}/accept_dad && ip link set {ifname} up"
    ))?;
    for addr in addrs {
        run(&format!("ip addr add {addr} dev {ifname}"))?;
    }
    Ok(ifname)
}

/// How long [`guest_ifup`] waits for each guest command.
const GUEST_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_mins(1);

/// `vm` arguments from string slices.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|&s| s.to_owned()).collect()
}
