//! netcfg, started through `supervisor::netcfg_client` the way the supervisor and the CLI start
//! it, against real links: bridges, members, VLANs, MTU, addresses, private ports, taps,
//! refusals, and its sandbox seen from `/proc`.
//!
//! Each test makes its own network namespace (`ip netns add capvm-nc-PID-N`, deleted on drop)
//! and runs in a thread that has `setns()`ed into it, so netcfg (which keeps its parent's
//! network namespace), its netlink socket and `/dev/net/tun` all land there. Results are read
//! with `ip -n NS -j`. Addresses only from `198.18.0.0/15` and `2001:db8::/32`; the host's own
//! interfaces are never touched.
//!
//! Needs root and the `netcfg` binary beside the test executable (`cargo build` first); skips
//! with a printed reason when not root.

use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use proto::netcfg::{IfAddress, NetcfgSetup};
use serde_json::Value;
use supervisor::netcfg_client::{NetcfgClient, NetcfgClientError};

const BRIDGE: &str = "br-nc0";
const OTHER_BRIDGE: &str = "br-nc1";

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: netcfg tests need root (network namespaces, CAP_NET_ADMIN)");
    true
}

/// A network namespace of this test process, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("capvm-nc-{}-{n}", std::process::id());
        // A leftover of an earlier run with the same pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        Netns { name }
    }

    /// `ip -n NS ARGS`, which must succeed; its stdout.
    fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -n NS -d -j link show NAME`, or `None` if it does not exist.
    fn link(&self, name: &str) -> Option<Value> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-d", "-j", "link", "show", "dev", name])
            .output()
            .expect("run ip");
        if !out.status.success() {
            return None;
        }
        let mut links: Vec<Value> = serde_json::from_slice(&out.stdout).expect("ip -j output");
        links.pop()
    }

    fn names_starting(&self, prefix: &str) -> Vec<String> {
        let links: Vec<Value> =
            serde_json::from_str(&self.ip(&["-j", "link", "show"])).expect("ip -j output");
        links
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    /// The addresses of `dev` as `addr/len`, with their scope.
    fn addrs(&self, dev: &str) -> Vec<(String, String)> {
        let out: Vec<Value> =
            serde_json::from_str(&self.ip(&["-j", "addr", "show", "dev", dev])).expect("ip -j");
        out.iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| {
                (
                    format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]),
                    a["scope"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect()
    }

    /// Runs `f` in a new thread that has entered this namespace: netcfg and the tun devices
    /// it opens are created there.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = fs::File::open(&path).expect("open the netns");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
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

fn run_ok(command: &mut Command) -> String {
    let out = command.output().expect("run command");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client with its log in a temporary file (printed when a test fails).
struct Started {
    client: NetcfgClient,
    log: tempfile::NamedTempFile,
}

impl Started {
    fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = fs::File::open(self.log.path()).and_then(|mut f| f.read_to_string(&mut s));
        s
    }
}

fn start(bridges: &[&str], owner: &str) -> Started {
    let binary = tests::harness::build_dir().join("netcfg");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build` first",
        binary.display()
    );
    let log = tempfile::NamedTempFile::new().expect("log file");
    let setup = NetcfgSetup {
        bridges: bridges.iter().map(|b| (*b).to_owned()).collect(),
        tap_owner: owner.to_owned(),
    };
    let client = NetcfgClient::start_binary(&binary, &setup, log.as_file().as_fd())
        .unwrap_or_else(|e| panic!("starting netcfg failed: {e:?}"));
    Started { client, log }
}

fn flags(link: &Value) -> Vec<String> {
    link["flags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn is_up(link: &Value) -> bool {
    flags(link).iter().any(|f| f == "UP")
}

fn addr(s: &str) -> IfAddress {
    IfAddress::parse(s).expect("test address")
}

fn refused(result: Result<(), NetcfgClientError>, what: &str) -> String {
    match result {
        Err(NetcfgClientError::Refused(message)) => message,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn bridges_members_vlans_and_mtu_reach_the_kernel() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "nc-a", "type", "veth", "peer", "name", "nc-b",
    ]);
    ns.ip(&["link", "set", "nc-a", "up"]);
    ns.ip(&["link", "set", "nc-b", "up"]);
    let vlan_supported = Command::new("ip")
        .args([
            "-n", &ns.name, "link", "add", "link", "nc-b", "name", "probe.1",
        ])
        .args(["type", "vlan", "id", "1"])
        .output()
        .expect("run ip")
        .status
        .success();

    ns.run(|| {
        let mut s = start(&[BRIDGE], "");
        let c = &mut s.client;

        // Arrange/act: a bridge, created and up; creating it again is fine.
        c.create_bridge(BRIDGE).expect("create bridge");
        c.create_bridge(BRIDGE).expect("create bridge again");
        let br = ns.link(BRIDGE).expect("bridge exists");
        assert_eq!(br["linkinfo"]["info_kind"], "bridge");
        assert!(is_up(&br), "bridge is not up: {br}");

        // A member: enslaved, still up (never taken down).
        c.add_member(BRIDGE, "nc-a").expect("add member");
        let member = ns.link("nc-a").expect("member exists");
        assert_eq!(member["master"], BRIDGE);
        assert!(is_up(&member), "member went down: {member}");
        let state = c.link(BRIDGE).expect("link").expect("bridge state");
        assert_eq!(state.kind, "bridge");
        assert!(state.up);
        assert_eq!(state.members, vec!["nc-a".to_owned()]);
        let member_state = c.link("nc-a").expect("link").expect("member state");
        assert_eq!(member_state.master.as_deref(), Some(BRIDGE));
        assert_eq!(member_state.kind, "veth");

        // MTU on the bridge and every member.
        c.set_mtu(BRIDGE, 1400).expect("set mtu");
        assert_eq!(ns.link(BRIDGE).expect("bridge")["mtu"], 1400);
        assert_eq!(ns.link("nc-a").expect("member")["mtu"], 1400);
        c.set_mtu(BRIDGE, 1500).expect("set mtu back");
        assert_eq!(ns.link(BRIDGE).expect("bridge")["mtu"], 1500);

        // VLAN interface on a parent.
        let vlan = c.add_vlan("nc-b", 10);
        if vlan_supported {
            vlan.expect("add vlan");
            let v = ns.link("nc-b.10").expect("vlan exists");
            assert_eq!(v["linkinfo"]["info_kind"], "vlan");
            assert_eq!(v["linkinfo"]["info_data"]["id"], 10);
            assert!(is_up(&v));
            c.delete_vlan("nc-b", 10).expect("delete vlan");
            assert!(ns.link("nc-b.10").is_none(), "vlan still there");
        } else {
            eprintln!("SKIP (part): this kernel has no 802.1Q support; checking the refusal");
            let message = refused(vlan.map(drop), "vlan without kernel support");
            assert!(message.contains("VLAN"), "{message}");
            assert!(ns.link("nc-b.10").is_none());
        }

        // Release and destroy: the member survives, up, without a master.
        c.remove_member(BRIDGE, "nc-a").expect("remove member");
        let member = ns.link("nc-a").expect("member exists");
        assert!(member.get("master").is_none(), "still enslaved: {member}");
        assert!(is_up(&member));
        c.add_member(BRIDGE, "nc-a").expect("add member again");
        c.destroy_bridge(BRIDGE).expect("destroy bridge");
        assert!(ns.link(BRIDGE).is_none(), "bridge still there");
        let member = ns.link("nc-a").expect("member survives its bridge");
        assert!(member.get("master").is_none());
    });
}

#[test]
fn addresses_go_on_the_bridge_and_are_replaced_while_link_local_stays() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.run(|| {
        let mut s = start(&[BRIDGE], "");
        let c = &mut s.client;
        c.create_bridge(BRIDGE).expect("create bridge");

        c.set_addresses(BRIDGE, &[addr("198.18.5.1/24"), addr("2001:db8::1/64")])
            .expect("set addresses");
        let global = |ns: &Netns| -> Vec<String> {
            let mut v: Vec<String> = ns
                .addrs(BRIDGE)
                .into_iter()
                .filter(|(_, scope)| scope == "global")
                .map(|(a, _)| a)
                .collect();
            v.sort();
            v
        };
        assert_eq!(global(&ns), vec!["198.18.5.1/24", "2001:db8::1/64"]);
        assert!(is_up(&ns.link(BRIDGE).expect("bridge")));

        // The kernel's link-local address appears on an up bridge; wait for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let link_local = loop {
            let found = ns
                .addrs(BRIDGE)
                .into_iter()
                .find(|(a, scope)| scope == "link" && a.starts_with("fe80:"));
            if let Some((a, _)) = found {
                break a;
            }
            assert!(Instant::now() < deadline, "no link-local address appeared");
            std::thread::sleep(Duration::from_millis(50));
        };

        c.set_addresses(BRIDGE, &[addr("198.18.6.1/24"), addr("2001:db8:1::1/64")])
            .expect("replace addresses");
        assert_eq!(global(&ns), vec!["198.18.6.1/24", "2001:db8:1::1/64"]);
        let state = c.link(BRIDGE).expect("link").expect("bridge");
        assert!(state.addresses.contains(&addr("198.18.6.1/24")));

        c.set_addresses(BRIDGE, &[]).expect("remove addresses");
        assert!(global(&ns).is_empty(), "{:?}", global(&ns));
        assert!(
            ns.addrs(BRIDGE).iter().any(|(a, _)| *a == link_local),
            "link-local {link_local} was removed"
        );
    });
}

#[test]
fn taps_are_vnet_hdr_members_with_the_guest_alias_and_private_ports_are_isolated() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.run(|| {
        let mut s = start(&[BRIDGE], "guest-a");
        let c = &mut s.client;
        c.create_bridge(BRIDGE).expect("create bridge");
        c.set_mtu(BRIDGE, 1400).expect("mtu");

        let t0 = Instant::now();
        let (name, fd) = c.create_tap(Some(BRIDGE), 0, None, 1).expect("create tap");
        let tap_time = t0.elapsed();
        assert!(name.starts_with("capvm-tap"), "{name}");
        let tap = ns.link(&name).expect("tap exists");
        assert_eq!(tap["ifalias"], "capvm:guest-a:0");
        assert_eq!(tap["master"], BRIDGE);
        assert_eq!(tap["linkinfo"]["info_kind"], "tun");
        assert_eq!(tap["linkinfo"]["info_data"]["type"], "tap");
        assert_eq!(tap["linkinfo"]["info_data"]["vnet_hdr"], true);
        assert_eq!(tap["linkinfo"]["info_data"]["pi"], false);
        assert_eq!(tap["mtu"], 1400, "the tap takes the bridge's MTU");
        assert!(is_up(&tap));
        assert_eq!(tap["linkinfo"]["info_slave_data"]["isolated"], false);

        // Private: every tap port isolated, and the flag reads back.
        c.set_private(BRIDGE, true).expect("private on");
        let tap = ns.link(&name).expect("tap");
        assert_eq!(tap["linkinfo"]["info_slave_data"]["isolated"], true);
        assert!(c.link(BRIDGE).expect("link").expect("bridge").private);

        // A tap made later, by another netcfg (a guest started later), is isolated too.
        let mut other = start(&[BRIDGE], "guest-b");
        let (name_b, fd_b) = other
            .client
            .create_tap(Some(BRIDGE), 1, Some(1300), 1)
            .expect("second tap");
        assert_ne!(name_b, name);
        let tap_b = ns.link(&name_b).expect("second tap");
        assert_eq!(tap_b["linkinfo"]["info_slave_data"]["isolated"], true);
        assert_eq!(tap_b["mtu"], 1300);
        assert_eq!(tap_b["ifalias"], "capvm:guest-b:1");

        c.set_private(BRIDGE, false).expect("private off");
        for n in [&name, &name_b] {
            let t = ns.link(n).expect("tap");
            assert_eq!(t["linkinfo"]["info_slave_data"]["isolated"], false, "{n}");
        }
        assert!(!c.link(BRIDGE).expect("link").expect("bridge").private);

        // A tap lives as long as an fd to it: netcfg kept none.
        drop(fd);
        drop(s);
        assert!(
            ns.link(&name).is_none(),
            "{name} outlived its fd and netcfg"
        );
        drop(fd_b);
        drop(other);
        assert!(ns.names_starting("capvm-tap").is_empty());
        eprintln!("measured: CreateTap round trip {tap_time:?}");
    });
}

#[test]
fn a_multi_queue_tap_has_one_fd_per_queue_and_lives_until_the_last_closes() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.run(|| {
        let mut s = start(&[BRIDGE], "guest-mq");
        let c = &mut s.client;
        c.create_bridge(BRIDGE).expect("bridge");
        // Arrange + act: a tap of three queues.
        let (name, mut fds) = c.create_tap(Some(BRIDGE), 0, None, 3).expect("mq tap");
        // Assert: three fds, each a queue of that one multi-queue tap with a vnet header.
        assert_eq!(fds.len(), 3);
        for fd in &fds {
            let (ifname, flags) = tun_get_iff(fd);
            assert_eq!(ifname, name);
            assert_eq!(flags & 0x0100, 0x0100, "IFF_MULTI_QUEUE on {flags:#x}");
            assert_eq!(flags & 0x4000, 0x4000, "IFF_VNET_HDR on {flags:#x}");
        }
        let tap = ns.link(&name).expect("tap exists");
        assert_eq!(tap["linkinfo"]["info_data"]["multi_queue"], true, "{tap}");
        assert_eq!(tap["master"], BRIDGE);
        assert_eq!(tap["ifalias"], "capvm:guest-mq:0");
        assert_eq!(tap["linkinfo"]["info_data"]["numqueues"], 3, "{tap}");
        // A single-queue tap is not multi-queue.
        let (single, single_fd) = c.create_tap(None, 1, None, 1).expect("tap");
        let flags = tun_get_iff(&single_fd[0]).1;
        assert_eq!(flags & 0x0100, 0, "{single}: no IFF_MULTI_QUEUE");
        // Out of bounds: refused before anything is opened.
        let max = proto::netcfg::MAX_TAP_QUEUES;
        assert!(c.create_tap(None, 2, None, max + 1).is_err());
        assert!(c.create_tap(None, 2, None, 0).is_err());
        let (big, big_fds) = c.create_tap(None, 3, None, max).expect("max queues");
        assert_eq!(big_fds.len(), usize::from(max));
        drop(big_fds);
        assert!(gone_soon(&ns, &big), "{big} outlived its fds");
        // The tap lives while any queue's fd is open.
        fds.truncate(1);
        assert!(ns.link(&name).is_some(), "{name} gone with one queue left");
        drop(fds);
        assert!(gone_soon(&ns, &name), "{name} outlived its fds");
    });
}

/// Whether link `name` disappears within a second: a process another test forks may hold a
/// copy of a closed fd until it execs.
fn gone_soon(ns: &Netns, name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while ns.link(name).is_some() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `TUNGETIFF` on a tap fd: its name and `IFF_*` flags.
fn tun_get_iff(fd: &std::os::fd::OwnedFd) -> (String, u16) {
    use std::os::fd::AsRawFd;
    let mut ifr = [0u8; 40];
    // SAFETY: TUNGETIFF writes one `struct ifreq` (40 bytes) at the pointer, which points at
    // `ifr`, alive for the call; the fd is held.
    let r = unsafe { nix::libc::ioctl(fd.as_raw_fd(), 0x8004_54d2, ifr.as_mut_ptr()) };
    assert_eq!(r, 0, "TUNGETIFF: {}", std::io::Error::last_os_error());
    let end = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
    (
        String::from_utf8_lossy(&ifr[..end]).into_owned(),
        u16::from_ne_bytes([ifr[16], ifr[17]]),
    )
}

#[test]
fn delete_taps_deletes_only_the_guests_own_taps() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.run(|| {
        let mut a = start(&[BRIDGE], "guest-a");
        let mut b = start(&[BRIDGE], "guest-b");
        a.client.create_bridge(BRIDGE).expect("bridge");
        let (a0, _a0_fd) = a
            .client
            .create_tap(Some(BRIDGE), 0, None, 1)
            .expect("tap a0");
        let (a1, _a1_fd) = a.client.create_tap(None, 1, None, 1).expect("tap a1");
        let (b0, _b0_fd) = b
            .client
            .create_tap(Some(BRIDGE), 0, None, 1)
            .expect("tap b0");

        // The fds are still held (as after a crash of the guest's device processes).
        let mut deleted = a.client.delete_taps().expect("delete taps");
        deleted.sort();
        let mut expected = vec![a0.clone(), a1.clone()];
        expected.sort();

        assert_eq!(deleted, expected);
        assert!(ns.link(&a0).is_none() && ns.link(&a1).is_none());
        assert!(ns.link(&b0).is_some(), "another guest's tap was deleted");
        assert_eq!(a.client.delete_taps().expect("again"), Vec::<String>::new());
    });
}

#[test]
fn bad_requests_are_refused_and_netcfg_keeps_answering() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "nc-a", "type", "veth", "peer", "name", "nc-b",
    ]);
    ns.run(|| {
        let mut guest_b = start(&[BRIDGE, OTHER_BRIDGE], "guest-b");
        let (tap_b, _tap_b_fd) = guest_b
            .client
            .create_tap(None, 0, None, 1)
            .expect("b's tap");
        let mut s = start(&[BRIDGE, OTHER_BRIDGE], "guest-a");
        let c = &mut s.client;
        c.create_bridge(BRIDGE).expect("bridge");
        c.create_bridge(OTHER_BRIDGE).expect("other bridge");
        let still_answers = |c: &mut NetcfgClient| {
            let state = c.link(BRIDGE).expect("netcfg still answers");
            assert!(state.is_some());
        };

        let m = refused(c.create_bridge("br-notinsetup"), "bridge not in setup");
        assert!(m.contains("not one of the datastore's switches"), "{m}");
        assert!(ns.link("br-notinsetup").is_none());
        still_answers(c);

        let m = refused(c.add_member(BRIDGE, &tap_b), "another guest's tap");
        assert!(m.contains("tap of another guest"), "{m}");
        assert!(ns.link(&tap_b).expect("tap")["master"].is_null());
        still_answers(c);

        let m = refused(c.add_member(BRIDGE, OTHER_BRIDGE), "a bridge as member");
        assert!(m.contains("is a bridge"), "{m}");
        still_answers(c);

        let m = refused(c.add_member(BRIDGE, "nc-missing"), "a missing member");
        assert!(m.contains("does not exist"), "{m}");
        still_answers(c);

        c.add_member(OTHER_BRIDGE, "nc-a")
            .expect("member of the other bridge");
        let m = refused(c.add_member(BRIDGE, "nc-a"), "stealing a member");
        assert!(m.contains("member of another bridge"), "{m}");
        still_answers(c);

        // A name outside the rules is refused (by the client before sending; netcfg's own
        // check is unit-tested in netcfg::serve).
        let err = c.create_bridge("bad/name").expect_err("bad name accepted");
        assert!(
            matches!(err, NetcfgClientError::InvalidRequest(_)),
            "{err:?}"
        );
        still_answers(c);

        let mut cli = start(&[BRIDGE], "");
        let err = cli.client.create_tap(Some(BRIDGE), 0, None, 1).map(drop);
        let m = refused(err, "a tap without a guest");
        assert!(m.contains("serves no guest"), "{m}");
        still_answers(&mut cli.client);
        let log = s.log_text();
        assert!(
            log.contains("request refused"),
            "refusals are logged: {log}"
        );
    });
}

#[test]
fn netcfg_runs_sandboxed_with_only_net_admin_in_its_parents_namespace() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.run(|| {
        let t0 = Instant::now();
        let mut s = start(&[BRIDGE], "guest-a");
        let start_time = t0.elapsed();
        let pid = s.client.pid();
        let field = |name: &str| -> String {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            status
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert_eq!(field("Seccomp:"), "2");
        assert_eq!(field("NoNewPrivs:"), "1");
        assert_eq!(field("CapEff:"), "0000000000001000");
        assert_eq!(field("CapPrm:"), "0000000000001000");
        assert_eq!(field("CapBnd:"), "0000000000001000");
        let ours = fs::read_link("/proc/thread-self/ns/net").expect("our netns");
        let theirs = fs::read_link(format!("/proc/{pid}/ns/net")).expect("netcfg's netns");
        assert_eq!(
            ours, theirs,
            "netcfg is not in its parent's network namespace"
        );
        // Its root is an empty tmpfs: no path it could open exists.
        let root = fs::read_dir(format!("/proc/{pid}/root"))
            .expect("list its root")
            .count();
        assert_eq!(root, 0, "netcfg's root is not empty");
        // It holds stdio (/dev/null or inherited), the channel, its log and the netlink socket.
        let fds = fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .count();
        assert!(fds <= 6, "netcfg holds {fds} fds");

        // It works in there.
        let t1 = Instant::now();
        s.client.create_bridge(BRIDGE).expect("bridge");
        let request_time = t1.elapsed();
        assert!(ns.link(BRIDGE).is_some());
        let t2 = Instant::now();
        let rounds = 100u32;
        for _ in 0..rounds {
            s.client.link(BRIDGE).expect("link");
        }
        let link_time = t2.elapsed() / rounds;

        // Closing the channel ends it cleanly.
        let status = s.client.stop().expect("reap");
        assert!(
            status.success(),
            "netcfg exited with {status}: {}",
            s.log_text()
        );
        eprintln!(
            "measured: start to ready+setup {start_time:?}, CreateBridge {request_time:?}, \
             Link {link_time:?} per request"
        );
    });
}

/// netcfg's own checks, past the client's: a raw channel sends what `NetcfgClient` would
/// refuse to send.
#[test]
fn netcfg_itself_refuses_bad_names_missing_fds_and_malformed_packets() {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
    use proto::channel::Channel;
    use proto::netcfg::{NetcfgReply, NetcfgRequest};

    if skip_unless_root() {
        return;
    }
    let ns = Netns::new();
    ns.run(|| {
        let netlink = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .expect("netlink socket");
        let log = tempfile::NamedTempFile::new().expect("log");
        let (uid, gid) = sandbox::nobody();
        let boot = Bootstrap {
            role: Role::Netcfg,
            vm_name: "guest-a".into(),
            sandbox: SandboxSettings {
                uid,
                gid,
                max_fds: 16,
            },
            fds: vec![FdRole::Log, FdRole::Netlink],
            log_filter: "info".into(),
        };
        let binary = tests::harness::build_dir().join("netcfg");
        let mut running =
            supervisor::spawn::spawn(&binary, &boot, &[log.as_file().as_fd(), netlink.as_fd()])
                .expect("spawn netcfg");
        let ch: &Channel = &running.channel;
        let setup = NetcfgSetup {
            bridges: vec![BRIDGE.into()],
            tap_owner: "guest-a".into(),
        };
        ch.send(&setup, &[]).expect("setup");
        macro_rules! ask {
            ($msg:expr) => {{
                ch.send($msg, &[]).expect("send");
                ch.recv_timeout::<NetcfgReply>(Duration::from_secs(10))
                    .expect("a reply")
                    .msg
            }};
        }
        let is_error = |reply: &NetcfgReply, needle: &str| match reply {
            NetcfgReply::Error { message } => message.contains(needle),
            _ => false,
        };

        let bad_name = NetcfgRequest::CreateBridge {
            bridge: "bad/name".into(),
        };
        let reply = ask!(&bad_name);
        assert!(is_error(&reply, "interface name"), "{reply:?}");

        let no_fd = NetcfgRequest::CreateTap {
            bridge: None,
            nic: 0,
            mtu: None,
            queues: 1,
        };
        let reply = ask!(&no_fd);
        assert!(is_error(&reply, "file descriptors"), "{reply:?}");

        // Not a NetcfgRequest at all: an enum variant index far out of range.
        let reply = ask!(&u32::MAX);
        assert!(is_error(&reply, "malformed request"), "{reply:?}");

        let reply = ask!(&NetcfgRequest::CreateBridge {
            bridge: BRIDGE.into(),
        });
        assert_eq!(reply, NetcfgReply::Ok, "netcfg stopped answering");
        assert!(ns.link(BRIDGE).is_some());

        drop(running.channel);
        let status = running.process.wait().expect("wait");
        assert!(status.success(), "exit status {status}");
    });
}
