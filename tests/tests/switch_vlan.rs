//! End-to-end: `vm switch create -i IF -n VLAN` and `vm switch vlan` put a switch's member
//! port on an 802.1Q VLAN — the bridge's traffic leaves the physical port tagged, and only
//! frames of that VLAN come in.
//!
//! The "wire" is a veth pair between two network namespaces the test creates: `vwire0` is the
//! switch's member port (in the namespace where `vm` runs), `vwire1` is in a second namespace
//! that plays the rest of the LAN, where the test puts its addresses on VLAN sub-interfaces
//! (`vwire1.10`) or on the untagged port itself. An address on `vwire1.10` only sends and
//! accepts frames tagged 10, so a ping that is answered proves the tag.
//!
//! - `a_vlan_switch_tags_the_bridges_traffic_on_its_member_port`: no guest. The bridge's
//!   host address answers over VLAN 10, not over VLAN 20; after `vm switch vlan NAME 20` the
//!   reverse; after `vm switch vlan NAME 0` only untagged frames. The member port stays up
//!   and address-free throughout (vm-bhyve #105, #146); `vm switch destroy` removes the VLAN
//!   interface and leaves the port.
//! - `a_guest_on_a_vlan_switch_reaches_a_tagged_peer`: a kit guest on the switch and the peer
//!   on `vwire1.10` ping each other, both orders.
//!
//! These need the kernel's `8021q`; they are routed like the guest tests (inside the test host
//! where /dev/kvm cannot run guests directly), whose Debian kernel has it.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tests::harness::{self, E2e, Needs};
use tests::launcher::{CapvmLauncher, GuestSpec};
use tests::netns::{InNetns, Netns, args as switch_args, guest_ifup, sh};
use tests::testvm::TestVm;

const SWITCH: &str = "tagged";
const BRIDGE: &str = "vm-tagged";
const PORT: &str = "vwire0";
const PEER_PORT: &str = "vwire1";
const HOST4: &str = "198.18.10.1";
const PEER4: &str = "198.18.10.2";
const GUEST4: &str = "198.18.10.3";
const GUEST_MAC: &str = "58:9c:fc:0a:10:03";
const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const CMD_TIMEOUT: Duration = Duration::from_mins(1);

fn main() -> ExitCode {
    // SAFETY: single-threaded here, before the harness starts any thread.
    unsafe { std::env::set_var("CAPVM_LIBEXEC", tests::harness::build_dir()) };
    harness::main(&[
        E2e {
            name: "a_vlan_switch_tags_the_bridges_traffic_on_its_member_port",
            needs: Needs::Kvm,
            timeout: Duration::from_mins(3),
            run: bridge_over_vlan,
        },
        E2e {
            name: "a_guest_on_a_vlan_switch_reaches_a_tagged_peer",
            needs: Needs::Kvm,
            timeout: Duration::from_mins(7),
            run: guest_over_vlan,
        },
    ])
}

/// `vm switch create -i vwire0 -n 10 -a 198.18.10.1/24 tagged`.
fn create_args() -> Vec<String> {
    let host = format!("{HOST4}/24");
    switch_args(&[
        "switch", "create", "-i", PORT, "-n", "10", "-a", &host, SWITCH,
    ])
}

/// Skips where the kernel cannot make VLAN interfaces.
fn need_8021q() -> anyhow::Result<()> {
    let _ = Command::new("modprobe").arg("8021q").status();
    if Path::new("/proc/net/vlan").exists() {
        Ok(())
    } else {
        Err(harness::skip(
            "this kernel has no 802.1Q VLAN support (module 8021q)",
        ))
    }
}

/// The switch's namespace and the wire's, joined by the veth pair `vwire0`/`vwire1`.
fn wire() -> anyhow::Result<(Netns, Netns)> {
    let ns = Netns::new("vlan")?;
    let lan = Netns::new("lan")?;
    ns.ip(&[
        "link",
        "add",
        PORT,
        "type",
        "veth",
        "peer",
        "name",
        PEER_PORT,
        "netns",
        lan.name(),
    ])?;
    ns.ip(&["link", "set", PORT, "up"])?;
    lan.ip(&["link", "set", PEER_PORT, "up"])?;
    Ok((ns, lan))
}

/// Moves the peer's address to `vwire1.VLAN` (untagged `vwire1` for 0), deleting the
/// sub-interface it had.
fn peer_on(lan: &Netns, from: u16, to: u16) -> anyhow::Result<()> {
    let name = |vlan: u16| {
        if vlan == 0 {
            PEER_PORT.to_owned()
        } else {
            format!("{PEER_PORT}.{vlan}")
        }
    };
    if from == 0 {
        lan.ip(&["addr", "flush", "dev", PEER_PORT])?;
    } else {
        lan.ip(&["link", "del", &name(from)])?;
    }
    if to != 0 {
        let vid = to.to_string();
        lan.ip(&[
            "link",
            "add",
            "link",
            PEER_PORT,
            "name",
            &name(to),
            "type",
            "vlan",
            "id",
            &vid,
        ])?;
        lan.ip(&["link", "set", &name(to), "up"])?;
    }
    lan.ip(&["addr", "add", &format!("{PEER4}/24"), "dev", &name(to)])?;
    lan.ip(&["neigh", "flush", "all"])?;
    Ok(())
}

/// Whether one ping from the wire's side reaches the bridge's address (2 s at most).
fn answered(lan: &Netns) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            lan.name(),
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            HOST4,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The member port is up, still on the wire, and carries no host address.
fn port_untouched(ns: &Netns) -> anyhow::Result<()> {
    let link = ns.ip(&["-o", "link", "show", PORT])?;
    ensure!(
        link.contains("state UP") || link.contains(",UP"),
        "the member port went down: {link}"
    );
    let addrs = ns.ip(&["-o", "-4", "addr", "show", "dev", PORT])?;
    ensure!(
        addrs.trim().is_empty(),
        "the member port carries an address: {addrs}"
    );
    Ok(())
}

fn bridge_over_vlan() -> anyhow::Result<()> {
    need_8021q()?;
    let (ns, lan) = wire()?;
    let work = tempfile::tempdir()?;
    let capvm = CapvmLauncher::new("none");
    capvm.init(work.path())?;
    let vm = |args: &[&str]| -> anyhow::Result<String> {
        sh(ns.wrap(&capvm.vm_command(work.path())).args(args))
    };
    let create = create_args();
    vm(&create.iter().map(String::as_str).collect::<Vec<_>>())?;
    let member = ns.ip(&["-d", "link", "show", &format!("{PORT}.10")])?;
    ensure!(
        member.contains("vlan protocol 802.1Q id 10")
            && member.contains(&format!("master {BRIDGE}")),
        "{PORT}.10 is not a VLAN 10 port of {BRIDGE}: {member}"
    );
    port_untouched(&ns)?;

    // Tagged 10: answered; the same address on VLAN 20: not.
    peer_on(&lan, 0, 10)?;
    ensure!(answered(&lan), "no answer over VLAN 10 from the bridge");
    peer_on(&lan, 10, 20)?;
    ensure!(
        !answered(&lan),
        "the bridge answered on VLAN 20 while on VLAN 10"
    );

    // `vm switch vlan` moves the switch to 20.
    vm(&["switch", "vlan", SWITCH, "20"])?;
    let list = vm(&["switch", "list"])?;
    let row = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(SWITCH))
        .with_context(|| format!("no {SWITCH} in `vm switch list`: {list}"))?;
    ensure!(
        row.split_whitespace().any(|c| c == "20"),
        "`vm switch list` does not show VLAN 20: {row}"
    );
    ensure!(
        ns.links_named(&format!("{PORT}.10"))?.is_empty(),
        "{PORT}.10 is left after the move to VLAN 20"
    );
    ensure!(
        answered(&lan),
        "no answer over VLAN 20 after `vm switch vlan`"
    );
    peer_on(&lan, 20, 10)?;
    ensure!(!answered(&lan), "the bridge still answers on VLAN 10");
    port_untouched(&ns)?;

    // VLAN 0: the port itself is the member, untagged.
    vm(&["switch", "vlan", SWITCH, "0"])?;
    ensure!(!answered(&lan), "the untagged switch answered on VLAN 10");
    peer_on(&lan, 10, 0)?;
    ensure!(
        answered(&lan),
        "no untagged answer after `vm switch vlan {SWITCH} 0`"
    );
    let port = ns.ip(&["-d", "link", "show", PORT])?;
    ensure!(
        port.contains(&format!("master {BRIDGE}")),
        "{PORT} did not join {BRIDGE} untagged: {port}"
    );
    ensure!(
        ns.links_named(&format!("{PORT}."))?.is_empty(),
        "a VLAN interface is left after `vm switch vlan {SWITCH} 0`"
    );

    // Destroy: the bridge goes, the port stays (and stays up).
    vm(&["switch", "vlan", SWITCH, "10"])?;
    vm(&["switch", "destroy", SWITCH])?;
    ensure!(
        ns.links_named(BRIDGE)?.is_empty() && ns.links_named(&format!("{PORT}."))?.is_empty(),
        "the bridge or {PORT}.10 is left after `vm switch destroy`: {}",
        ns.ip(&["-o", "link", "show"])?
    );
    port_untouched(&ns)
}

fn guest_over_vlan() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    need_8021q()?;
    let (ns, lan) = wire()?;
    peer_on(&lan, 0, 10)?;
    let launcher = InNetns {
        inner: CapvmLauncher::new("vlan"),
        ns: &ns,
        switches: vec![create_args()],
        conf: format!(
            "network0_type=\"virtio-net\"\nnetwork0_switch=\"{SWITCH}\"\nnetwork0_mac=\"{GUEST_MAC}\"\n"
        ),
    };
    let spec: GuestSpec = tests::kit::agent_guest(1, 256)?;
    let mut vm = TestVm::start(&launcher, &spec)?;
    let result = guest_checks(&lan, &mut vm);
    let console = vm.logs();
    let stopped = vm.stop(Duration::from_mins(1));
    if let Err(e) = result {
        bail!("{e:#}\n--- console ---\n{console}");
    }
    stopped.map(drop).context("stopping the guest")
}

fn guest_checks(lan: &Netns, vm: &mut TestVm) -> anyhow::Result<()> {
    vm.wait_ready(BOOT_TIMEOUT)?;
    guest_ifup(vm, GUEST_MAC, &[&format!("{GUEST4}/24")])?;
    let out = vm.run(&format!("ping -c 3 -W 5 {PEER4}"), CMD_TIMEOUT)?;
    ensure!(
        out.status == 0,
        "the guest cannot ping the tagged peer {PEER4}: {}",
        out.output
    );
    vm.run("ip neigh flush all", CMD_TIMEOUT)?;
    lan.ip(&["neigh", "flush", "all"])?;
    lan.ping(GUEST4)
}
