//! `vm switch` and guest NICs end to end, against the real sandboxed `netcfg`, each test in a
//! network namespace of its own (`vm` runs under `ip netns exec`), with addresses from
//! `198.18.0.0/15` and `2001:db8::/32` only. What capvm did is read back with `ip -j -d`.
//!
//! Guests run the fake vcpu-runner (`examples/fake_vcpu_runner.rs`) and, to see exactly what a
//! NIC's device is given, the fake dev-net (`examples/fake_dev_net.rs`: it reports its setup
//! and what its tap fd is); one test runs the real `dev-net`.
//!
//! Needs root (namespaces, netcfg) and skips with a reason without it. `netcfg` and `dev-net`
//! must be built beside `vm` (`cargo build -p netcfg -p dev-net`, or `cargo test --workspace`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: switch tests need root (network namespaces, netcfg, the sandbox)");
    true
}

/// `target/<profile>`, where `vm`, `netcfg` and `dev-net` are.
fn build_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vm"))
        .parent()
        .unwrap()
        .to_owned()
}

fn built(name: &str) -> PathBuf {
    let path = build_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p netcfg -p dev-net` (or run `cargo test --workspace`)",
        path.display()
    );
    path
}

fn fake_example(name: &str) -> PathBuf {
    let path = build_dir().join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test -p supervisor` (it builds the examples)",
        path.display()
    );
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).unwrap();
    assert!(
        modified(&path) >= modified(&source),
        "{} is older than its source: run `cargo test -p supervisor`",
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
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "capvm-sw{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.0).args(args))
    }

    /// `ip -n NS -j -d link show`: every link by name.
    fn links(&self) -> Vec<Value> {
        serde_json::from_str(&self.ip(&["-j", "-d", "link", "show"])).unwrap()
    }

    fn link(&self, name: &str) -> Option<Value> {
        self.links()
            .into_iter()
            .find(|l| l["ifname"].as_str() == Some(name))
    }

    /// The global addresses of `name` as `addr/len`.
    fn addrs(&self, name: &str) -> Vec<String> {
        let v: Vec<Value> =
            serde_json::from_str(&self.ip(&["-j", "addr", "show", "dev", name])).unwrap();
        v.iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["scope"].as_str() == Some("global"))
            .map(|a| {
                format!(
                    "{}/{}",
                    a["local"].as_str().unwrap(),
                    a["prefixlen"].as_u64().unwrap()
                )
            })
            .collect()
    }

    fn taps(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .filter(|n| n.starts_with("capvm-tap"))
            .collect()
    }

    /// A veth pair `name` / `name`p: `name` is a port a switch can take.
    fn port(&self, name: &str) {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{name}p"),
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn master(link: &Value) -> Option<&str> {
    link["master"].as_str()
}

fn kind(link: &Value) -> Option<&str> {
    link["linkinfo"]["info_kind"].as_str()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DevNet {
    Fake,
    Real,
}

struct Env {
    _dir: tempfile::TempDir,
    vm_dir: PathBuf,
    conf: PathBuf,
    libexec: PathBuf,
    ns: Netns,
}

impl Env {
    fn new() -> Env {
        Env::with(DevNet::Fake)
    }

    fn with(dev_net: DevNet) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let libexec = root.join("libexec");
        fs::create_dir(&libexec).unwrap();
        let link = |from: PathBuf, name: &str| {
            std::os::unix::fs::symlink(from, libexec.join(name)).unwrap();
        };
        link(fake_example("fake_vcpu_runner"), "vcpu-runner");
        link(fake_example("fake_dev_blk"), "dev-blk");
        link(built("netcfg"), "netcfg");
        match dev_net {
            DevNet::Fake => link(fake_example("fake_dev_net"), "dev-net"),
            DevNet::Real => link(built("dev-net"), "dev-net"),
        }
        let conf = root.join("vm.conf");
        fs::write(&conf, "").unwrap();
        let env = Env {
            vm_dir: root.join("vm"),
            conf,
            libexec,
            ns: Netns::new(),
            _dir: dir,
        };
        env.ok(&["init"]);
        env
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.0])
            .arg(env!("CARGO_BIN_EXE_vm"))
            .args(args)
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

    fn system_conf(&self) -> String {
        fs::read_to_string(self.vm_dir.join(".config/system.conf")).unwrap()
    }

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

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.vm_dir.join(name).join("vm-bhyve.log")).unwrap_or_default()
    }

    /// (role, pid) of each process `vm info` shows.
    fn processes(&self, name: &str) -> Vec<(String, u32)> {
        self.ok(&["info", name])
            .lines()
            .filter_map(|l| l.trim().strip_prefix("process: "))
            .map(|p| {
                let f: Vec<&str> = p.split_whitespace().collect();
                (f[0].to_owned(), f[2].parse().unwrap())
            })
            .collect()
    }

    fn running(&self, name: &str) -> bool {
        supervisor::state::probe(&self.vm_dir.join(name))
            .is_ok_and(|s| s != supervisor::state::RunState::Stopped)
    }

    /// The console text up to `fake: ready`.
    fn console_until_ready(&self, name: &str) -> String {
        let mut child = self
            .command(&["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut text = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&text).contains("fake: ready") {
                    break;
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
        });
        let text = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        assert!(text.contains("fake: ready"), "{text:?}");
        text
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave nothing running behind a failed test (the namespace goes with the Env).
        for entry in fs::read_dir(&self.vm_dir).into_iter().flatten().flatten() {
            if let Some(pid) = fs::read_to_string(entry.path().join("run.lock"))
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

#[test]
fn standard_switch_commands_change_the_live_bridge_and_system_conf() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.ns.port("up0");
    env.ns.port("up1");

    env.ok(&[
        "switch",
        "create",
        "-i",
        "up0",
        "-a",
        "198.18.0.1/24",
        "-a",
        "2001:db8::1/64",
        "-m",
        "1400",
        "public",
    ]);

    let bridge = env.ns.link("vm-public").expect("bridge vm-public");
    assert_eq!(kind(&bridge), Some("bridge"));
    assert_eq!(bridge["mtu"], 1400);
    assert_eq!(master(&env.ns.link("up0").unwrap()), Some("vm-public"));
    assert_eq!(
        env.ns.addrs("vm-public"),
        ["198.18.0.1/24", "2001:db8::1/64"]
    );
    assert!(
        env.ns.addrs("up0").is_empty(),
        "addresses go on the bridge only"
    );
    let conf = env.system_conf();
    assert!(conf.contains("switch_list=\"public\"\ntype_public=\"standard\"\nports_public=\"up0\"\naddr_public=\"198.18.0.1/24 2001:db8::1/64\"\nmtu_public=\"1400\"\n"), "{conf}");
    let list = env.ok(&["switch", "list"]);
    assert_eq!(
        list,
        "NAME    TYPE      IFACE      ADDRESS                       PRIVATE  MTU   VLAN  PORTS\n\
         public  standard  vm-public  198.18.0.1/24,2001:db8::1/64  no       1400  -     up0\n"
    );

    env.ok(&["switch", "add", "public", "up1"]);
    assert_eq!(master(&env.ns.link("up1").unwrap()), Some("vm-public"));
    env.ok(&["switch", "remove", "public", "up0"]);
    assert_eq!(master(&env.ns.link("up0").unwrap()), None);
    assert!(env.system_conf().contains("ports_public=\"up1\""));

    env.ok(&[
        "switch",
        "address",
        "public",
        "198.18.5.1/24",
        "2001:db8:5::1/64",
    ]);
    assert_eq!(
        env.ns.addrs("vm-public"),
        ["198.18.5.1/24", "2001:db8:5::1/64"]
    );
    env.ok(&["switch", "address", "public", "none"]);
    assert!(env.ns.addrs("vm-public").is_empty());
    assert!(!env.system_conf().contains("addr_public"));

    env.ok(&["switch", "mtu", "public", "1300"]);
    assert_eq!(env.ns.link("vm-public").unwrap()["mtu"], 1300);
    assert_eq!(env.ns.link("up1").unwrap()["mtu"], 1300);

    env.ok(&["switch", "private", "public", "on"]);
    assert_eq!(
        env.ns.link("vm-public").unwrap()["ifalias"],
        "capvm:private"
    );
    assert!(
        env.ok(&["switch", "info", "public"])
            .contains("  private: yes\n")
    );
    env.ok(&["switch", "private", "public", "off"]);
    assert!(env.ns.link("vm-public").unwrap()["ifalias"].is_null());

    let info = env.ok(&["switch", "info"]);
    assert!(info.contains("Virtual Switch: public\n"), "{info}");
    assert!(
        info.contains("  bridge: vm-public (up)\n  ports: up1\n"),
        "{info}"
    );
    assert!(info.contains("  live-members: up1\n"), "{info}");

    env.ok(&["switch", "destroy", "public"]);
    assert!(env.ns.link("vm-public").is_none());
    assert_eq!(master(&env.ns.link("up1").unwrap()), None);
    assert!(
        env.ns.link("up1").is_some(),
        "ports are released, not deleted"
    );
    assert!(!env.system_conf().contains("public"));
    assert!(
        env.fails(&["switch", "destroy", "public"])
            .contains("does not exist")
    );
}

#[test]
fn bad_switch_commands_change_nothing() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.ns.port("up0");
    env.ok(&["switch", "create", "-i", "up0", "s"]);
    let before = env.system_conf();
    for (args, want) in [
        (&["switch", "create", "s"][..], "already exists"),
        (&["switch", "create", "toolongname13"][..], "1 to 12"),
        (&["switch", "create", "-i", "nosuch0", "t"][..], "nosuch0"),
        (&["switch", "add", "s", "up0"][..], "already a member"),
        (&["switch", "remove", "s", "nosuch0"][..], "not a member"),
        (
            &["switch", "address", "s", "198.18.0.1"][..],
            "prefix length",
        ),
        (
            &["switch", "address", "s", "224.0.0.1/4"][..],
            "prefix length",
        ),
        (&["switch", "mtu", "s", "20"][..], "68..=65535"),
        (&["switch", "vlan", "s", "4095"][..], "4094"),
        (&["switch", "private", "s", "maybe"][..], "yes or no"),
        (&["switch", "add", "nope", "up0"][..], "does not exist"),
    ] {
        let err = env.fails(args);
        assert!(err.contains(want), "vm {args:?}: {err}");
    }
    assert_eq!(env.system_conf(), before);
    assert!(env.ns.link("vm-t").is_none(), "a failed create is undone");
}

#[test]
fn vlan_members_join_the_bridge_as_if_dot_vlan() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.ns.port("up0");
    let probe = Command::new("ip")
        .args([
            "-n", &env.ns.0, "link", "add", "link", "up0", "name", "up0.9",
        ])
        .args(["type", "vlan", "id", "9"])
        .output()
        .unwrap();
    if !probe.status.success() {
        eprintln!(
            "SKIP: this kernel cannot make VLAN interfaces (8021q): {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        return;
    }
    env.ns.ip(&["link", "del", "up0.9"]);

    env.ok(&["switch", "create", "-i", "up0", "-n", "10", "v"]);
    let member = env.ns.link("up0.10").expect("up0.10");
    assert_eq!(kind(&member), Some("vlan"));
    assert_eq!(master(&member), Some("vm-v"));
    assert_eq!(member["linkinfo"]["info_data"]["id"], 10);

    env.ok(&["switch", "vlan", "v", "20"]);
    assert!(env.ns.link("up0.10").is_none());
    assert_eq!(master(&env.ns.link("up0.20").unwrap()), Some("vm-v"));
    env.ok(&["switch", "vlan", "v", "0"]);
    assert!(env.ns.link("up0.20").is_none());
    assert_eq!(master(&env.ns.link("up0").unwrap()), Some("vm-v"));
    assert!(!env.system_conf().contains("vlan_v"));
}

#[test]
fn a_manual_switch_uses_a_bridge_made_beforehand_and_never_destroys_it() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.ns.ip(&["link", "add", "br0", "type", "bridge"]);
    env.ns.port("up0");
    env.ns.ip(&["link", "set", "up0", "master", "br0"]);

    assert!(
        env.fails(&["switch", "create", "-t", "manual", "-b", "br9", "lab"])
            .contains("br9 of manual switch lab does not exist")
    );
    env.ok(&[
        "switch",
        "create",
        "-t",
        "manual",
        "-b",
        "br0",
        "-a",
        "198.18.7.1/24",
        "lab",
    ]);
    assert_eq!(env.ns.addrs("br0"), ["198.18.7.1/24"]);
    assert!(
        env.system_conf()
            .contains("type_lab=\"manual\"\nbridge_lab=\"br0\"\n")
    );
    assert!(
        env.ok(&["switch", "list"])
            .contains("lab   manual  br0    198.18.7.1/24")
    );
    assert!(
        env.fails(&["switch", "add", "lab", "up0"])
            .contains("manual")
    );

    env.ok(&["switch", "destroy", "lab"]);
    let br0 = env.ns.link("br0").expect("br0 is still there");
    assert_eq!(kind(&br0), Some("bridge"));
    assert_eq!(
        master(&env.ns.link("up0").unwrap()),
        Some("br0"),
        "its members stay"
    );
    assert!(
        env.ns.addrs("br0").is_empty(),
        "capvm's address is taken back"
    );
}

#[test]
fn init_re_creates_a_standard_switch_after_its_bridge_is_gone() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.ns.port("up0");
    env.ok(&[
        "switch",
        "create",
        "-i",
        "up0",
        "-a",
        "198.18.0.1/24",
        "-a",
        "2001:db8::1/64",
        "-m",
        "1400",
        "-p",
        "public",
    ]);
    env.ns.ip(&["link", "del", "vm-public"]);
    assert!(
        env.ok(&["switch", "list"])
            .contains("public  standard  -  ")
    );

    env.ok(&["init"]);

    let bridge = env.ns.link("vm-public").expect("re-created");
    assert_eq!(bridge["mtu"], 1400);
    assert_eq!(bridge["ifalias"], "capvm:private");
    assert_eq!(master(&env.ns.link("up0").unwrap()), Some("vm-public"));
    assert_eq!(
        env.ns.addrs("vm-public"),
        ["198.18.0.1/24", "2001:db8::1/64"]
    );
}

#[test]
fn a_guest_nic_gets_a_tap_on_its_switch_while_it_runs() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.ok(&[
        "switch",
        "create",
        "-a",
        "198.18.0.1/24",
        "-m",
        "1400",
        "-p",
        "public",
    ]);
    env.guest(
        "g",
        "disk0_type=\"virtio-blk\"\ndisk0_name=\"d.img\"\nnetwork0_type=\"virtio-net\"\nnetwork0_switch=\"public\"\nnetwork0_mac=\"58:9c:fc:01:02:03\"\nnetwork1_type=\"virtio-net\"\nnetwork1_switch=\"public\"",
    );
    fs::write(env.vm_dir.join("g/d.img"), b"DISK0AAA").unwrap();

    env.ok(&["start", "g"]);

    // network1 had no MAC: it got one, written to the config.
    let conf = fs::read_to_string(env.vm_dir.join("g/g.conf")).unwrap();
    let mac1 = conf
        .lines()
        .find_map(|l| l.strip_prefix("network1_mac=\""))
        .map(|m| m.trim_end_matches('"').to_owned())
        .expect("network1_mac written");
    assert!(mac1.starts_with("58:9c:fc:"), "{mac1}");
    let taps = env.ns.taps();
    assert_eq!(taps.len(), 2, "{taps:?}");
    let mut tap_of = std::collections::BTreeMap::new();
    for name in &taps {
        let tap = env.ns.link(name).unwrap();
        assert_eq!(master(&tap), Some("vm-public"));
        assert_eq!(tap["mtu"], 1400);
        assert_eq!(
            tap["linkinfo"]["info_slave_data"]["isolated"], true,
            "private switch"
        );
        let alias = tap["ifalias"].as_str().unwrap().to_owned();
        tap_of.insert(alias, name.clone());
    }
    let tap0 = tap_of["capvm:g:0"].clone();
    let tap1 = tap_of["capvm:g:1"].clone();
    // PCI order: disks, then NICs; each dev-net got its MAC, the switch's MTU and its tap.
    let console = env.console_until_ready("g");
    assert!(console.contains("fake: device 0: serial="), "{console}");
    assert!(
        console.contains(&format!(
            "fake: device 1: net mac=58:9c:fc:01:02:03 mtu=1400 pairs=1 regions=1 tap={tap0} vnet_hdr=true\r\n\
             fake: device 2: net mac={mac1} mtu=1400 pairs=1 regions=1 tap={tap1} vnet_hdr=true\r\n"
        )),
        "{console}"
    );
    let roles: Vec<String> = env.processes("g").into_iter().map(|(r, _)| r).collect();
    assert_eq!(
        roles,
        [
            "supervisor",
            "vcpu-runner",
            "dev-blk0",
            "dev-net0",
            "dev-net1"
        ]
    );
    let info = env.ok(&["info", "g"]);
    assert!(
        info.contains(&format!(
            "    fixed-mac-address: 58:9c:fc:01:02:03\n    fixed-device: -\n    tap: {tap0}\n"
        )),
        "{info}"
    );
    let sw = env.ok(&["switch", "info", "public"]);
    assert!(
        sw.contains(&format!(
            "    device: {tap0}\n    vm: g\n    nic: network0\n"
        )),
        "{sw}"
    );
    let log = env.log("g");
    assert!(
        log.contains(&format!(
            ": network0: tap {tap0} on switch public (vm-public), mtu 1400\n"
        )),
        "{log}"
    );
    assert!(log.contains(": starting dev-net1 (pid "), "{log}");

    env.ok(&["poweroff", "-f", "g"]);
    wait_until(Duration::from_secs(10), || !env.running("g"));
    assert!(env.ns.taps().is_empty(), "taps left: {:?}", env.ns.taps());
    assert!(env.log("g").contains(": network stopped, taps closed"));
    assert!(env.vm_dir.join("g/dev-net0.log").exists());

    // The next start keeps the MACs.
    env.ok(&["start", "g"]);
    assert!(
        env.console_until_ready("g")
            .contains(&format!("net mac={mac1} "))
    );
    env.ok(&["poweroff", "-f", "g"]);
    wait_until(Duration::from_secs(10), || !env.running("g"));
    assert!(env.ns.taps().is_empty());
}

#[test]
fn the_real_dev_net_runs_per_nic_and_stop_leaves_no_tap() {
    if skip_unless_root() {
        return;
    }
    let env = Env::with(DevNet::Real);
    env.ok(&["switch", "create", "-a", "198.18.0.1/24", "public"]);
    env.guest(
        "g",
        "network0_type=\"virtio-net\"\nnetwork0_switch=\"public\"",
    );

    env.ok(&["start", "g"]);

    let net = env
        .processes("g")
        .into_iter()
        .find(|(role, _)| role == "dev-net0")
        .expect("dev-net0 runs");
    assert!(alive(net.1));
    let taps = env.ns.taps();
    assert_eq!(taps.len(), 1, "{taps:?}");
    assert_eq!(master(&env.ns.link(&taps[0]).unwrap()), Some("vm-public"));
    // The fake runner powers the guest off when the button is pressed.
    env.ok(&["stop", "g"]);
    assert!(!env.running("g"));
    wait_until(Duration::from_secs(5), || !alive(net.1));
    assert!(env.ns.taps().is_empty(), "taps left: {:?}", env.ns.taps());
}

#[test]
fn network_device_attaches_an_existing_tap_without_a_switch() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.ns
        .ip(&["tuntap", "add", "dev", "mytap0", "mode", "tap", "vnet_hdr"]);
    env.ns.ip(&["link", "set", "mytap0", "mtu", "1280"]);
    env.guest(
        "g",
        "network0_type=\"virtio-net\"\nnetwork0_device=\"mytap0\"\nnetwork0_mac=\"58:9c:fc:0a:0b:0c\"",
    );

    env.ok(&["start", "g"]);

    let console = env.console_until_ready("g");
    assert!(
        console.contains("fake: device 0: net mac=58:9c:fc:0a:0b:0c mtu=1280 pairs=1 regions=1 tap=mytap0 vnet_hdr=true\r\n"),
        "{console}"
    );
    assert!(
        env.ok(&["info", "g"])
            .contains("    fixed-device: mytap0\n    tap: mytap0\n")
    );
    assert!(
        !env.vm_dir.join("g/netcfg.log").exists(),
        "no netcfg is needed"
    );
    env.ok(&["poweroff", "-f", "g"]);
    wait_until(Duration::from_secs(10), || !env.running("g"));
    assert!(
        env.ns.link("mytap0").is_some(),
        "a tap capvm did not make stays"
    );
}

#[test]
fn unsupported_or_unknown_nics_are_refused_before_anything_starts() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    env.guest(
        "e",
        "network0_type=\"e1000\"\nnetwork0_mac=\"58:9c:fc:00:00:01\"",
    );
    env.guest(
        "u",
        "network0_type=\"virtio-net\"\nnetwork0_switch=\"nope\"",
    );
    env.guest(
        "d",
        "network0_type=\"virtio-net\"\nnetwork0_device=\"nosuch0\"",
    );

    let err = env.fails(&["start", "e"]);
    assert!(
        err.contains("network0: networkN_type=e1000 is not supported"),
        "{err}"
    );
    let err = env.fails(&["start", "u"]);
    assert!(
        err.contains("network0: switch nope does not exist"),
        "{err}"
    );
    let err = env.fails(&["start", "d"]);
    assert!(
        err.contains("networkN_device nosuch0 does not exist"),
        "{err}"
    );
    for g in ["e", "u", "d"] {
        assert!(!env.running(g));
    }
    assert!(env.ns.taps().is_empty());
}
