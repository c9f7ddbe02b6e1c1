//! End-to-end: networks of real kit guests — `vm switch`, a tap per `networkN` made by
//! `netcfg`, a sandboxed `dev-net` per NIC, seen by the guest as `eth0`, `eth1`, ...
//!
//! Everything happens inside a network namespace each test creates (`ip netns add`), with
//! addresses from `198.18.0.0/15` and `2001:db8::/32`; the `vm` commands run under `ip netns
//! exec`, so the switches' bridges and the guests' taps live there too.
//!
//! - `a_guest_reaches_the_host_over_standard_and_manual_switches`: a standard switch with an
//!   IPv4 and an IPv6 address on its bridge, and a manual switch on a bridge made beforehand.
//!   The guest pings the host first (IPv4, IPv6), then the host pings the guest first after
//!   both forgot their neighbours (the forum thread's IPv6 case); the manual switch carries
//!   pings too; 100 MiB over TCP arrive intact (SHA-256 on both ends); each dev-net is
//!   sandboxed; after `vm stop` no tap is left and the bridges keep their addresses. With
//!   `networkN_queues="cpus"` in its config the 2-vCPU guest's NICs are multi-queue:
//!   two-queue taps, `rx-0`/`rx-1`/`tx-0`/`tx-1` in the guest, both pairs enabled by its
//!   driver (`VQ_PAIRS_SET`), and the stream runs over them.
//! - `two_guests_on_one_switch_reach_each_other`: two guests on one switch ping each other,
//!   each NIC with the default single queue pair.

use std::fs;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tests::harness::{self, E2e, Needs};
use tests::launcher::{CapvmLauncher, GuestSpec};
use tests::netns::{InNetns, Netns, args as switch_args, guest_ifup, sh};
use tests::procfs;
use tests::testvm::TestVm;

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const CMD_TIMEOUT: Duration = Duration::from_mins(1);
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;
/// Host addresses of the standard switch's bridge, and the guests' on that link.
const HOST4: &str = "198.18.7.1";
const HOST6: &str = "2001:db8:7::1";
const GUEST4: [&str; 2] = ["198.18.7.2", "198.18.7.3"];
const GUEST6: [&str; 2] = ["2001:db8:7::2", "2001:db8:7::3"];
/// The manual switch's pre-made bridge and its link.
const MANUAL_BRIDGE: &str = "br-manual";
const MANUAL_HOST4: &str = "198.18.8.1";
const MANUAL_GUEST4: &str = "198.18.8.2";
const MACS: [&str; 3] = [
    "58:9c:fc:0a:00:01",
    "58:9c:fc:0a:00:02",
    "58:9c:fc:0a:00:03",
];
const STREAM_BYTES: usize = 100 << 20;
const STREAM_PORT: u16 = 5001;

fn main() -> ExitCode {
    // SAFETY: single-threaded here, before the harness starts any thread.
    unsafe { std::env::set_var("CAPVM_LIBEXEC", tests::harness::build_dir()) };
    let minutes = Duration::from_mins;
    harness::main(&[
        E2e {
            name: "a_guest_reaches_the_host_over_standard_and_manual_switches",
            needs: Needs::Kvm,
            timeout: minutes(7),
            run: host_and_guest,
        },
        E2e {
            name: "two_guests_on_one_switch_reach_each_other",
            needs: Needs::Kvm,
            timeout: minutes(7),
            run: two_guests,
        },
    ])
}

fn kit_spec() -> anyhow::Result<GuestSpec> {
    Ok(tests::kit::agent_guest(CPUS, MEMORY_MIB)?)
}

fn start(launcher: &InNetns<'_>) -> anyhow::Result<TestVm> {
    let mut vm = TestVm::start(launcher, &kit_spec()?)?;
    let booted = vm
        .wait_ready(BOOT_TIMEOUT)
        .map_err(|e| with_logs(&vm, &launcher.inner.name, &e.into()))?;
    println!(
        "MEASURE network boot wall_to_ready_s={:.1} uptime_s={:.2}",
        booted.wall.as_secs_f64(),
        booted.ready.uptime_s
    );
    Ok(vm)
}

fn guest_dir(vm: &TestVm, name: &str) -> PathBuf {
    vm.workdir().join("vms").join(name)
}

/// `e` with the guest's console and its processes' logs.
fn with_logs(vm: &TestVm, name: &str, e: &anyhow::Error) -> anyhow::Error {
    vm.with_logs(
        name,
        &[
            "vm-bhyve.log",
            "vcpu-runner.log",
            "dev-net0.log",
            "dev-net1.log",
        ],
        e,
    )
}

/// Runs `command` in the guest; it must exit 0. Returns its output, trimmed.
fn run_ok(vm: &mut TestVm, command: &str) -> anyhow::Result<String> {
    vm.run_ok(command, CMD_TIMEOUT)
}

fn guest_ping(vm: &mut TestVm, addr: &str) -> anyhow::Result<()> {
    let ping = if addr.contains(':') { "ping6" } else { "ping" };
    run_ok(vm, &format!("{ping} -c 3 -W 5 {addr}"))
        .map(drop)
        .with_context(|| format!("the guest cannot ping {addr}"))
}

fn host_and_guest() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    let ns = Netns::new("net")?;
    ns.ip(&["link", "add", MANUAL_BRIDGE, "type", "bridge"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{MANUAL_HOST4}/24"),
        "dev",
        MANUAL_BRIDGE,
    ])?;
    ns.ip(&["link", "set", MANUAL_BRIDGE, "up"])?;
    let launcher = InNetns {
        inner: CapvmLauncher::new("net"),
        ns: &ns,
        switches: vec![
            switch_args(&[
                "switch",
                "create",
                "-a",
                &format!("{HOST4}/24"),
                "-a",
                &format!("{HOST6}/64"),
                "public",
            ]),
            switch_args(&[
                "switch",
                "create",
                "-t",
                "manual",
                "-b",
                MANUAL_BRIDGE,
                "manual",
            ]),
        ],
        conf: format!(
            "network0_type=\"virtio-net\"\nnetwork0_switch=\"public\"\nnetwork0_mac=\"{}\"\n\
             network0_queues=\"cpus\"\nnetwork1_type=\"virtio-net\"\n\
             network1_switch=\"manual\"\nnetwork1_mac=\"{}\"\nnetwork1_queues=\"cpus\"\n",
            MACS[0], MACS[1]
        ),
    };
    let mut vm = start(&launcher)?;
    let result = host_and_guest_checks(&ns, &mut vm);
    let result = result.map_err(|e| with_logs(&vm, "net", &e));
    let stopped = stop_and_check_taps_gone(&ns, vm);
    result?;
    stopped?;
    // The host's addresses stay on the bridges (never on a member port).
    let public = ns.ip(&["-o", "addr", "show", "dev", "vm-public"])?;
    ensure!(
        public.contains(HOST4) && public.contains(HOST6),
        "vm-public lost its addresses after the guest stopped: {public}"
    );
    Ok(())
}

fn host_and_guest_checks(ns: &Netns, vm: &mut TestVm) -> anyhow::Result<()> {
    let bridge = ns.ip(&["-o", "addr", "show", "dev", "vm-public"])?;
    ensure!(
        bridge.contains(&format!("{HOST4}/24")) && bridge.contains(&format!("{HOST6}/64")),
        "the standard switch's bridge vm-public does not carry the host addresses: {bridge}"
    );
    let taps = ns.links_named("capvm-tap")?;
    ensure!(
        taps.len() == 2,
        "expected 2 taps while the guest runs, found {taps:?}"
    );
    for tap in &taps {
        let detail = ns.ip(&["-d", "link", "show", tap])?;
        ensure!(
            detail.contains("master vm-public")
                || detail.contains(&format!("master {MANUAL_BRIDGE}")),
            "tap {tap} is on no switch's bridge: {detail}"
        );
        // Only the kernel's IPv6 link-local address; never a host address.
        let addrs = ns.ip(&["-o", "addr", "show", "dev", tap])?;
        ensure!(
            !addrs.contains("scope global"),
            "tap {tap} carries a host address: {addrs}"
        );
    }
    // Each dev-net is sandboxed, and a child of the guest's supervisor.
    let supervisor = procfs::children_named(vm.pid(), "vm")
        .first()
        .copied()
        .with_context(|| format!("no vm process under {}", vm.pid()))?;
    let devices = procfs::children_named(supervisor, "dev-net");
    ensure!(
        devices.len() == 2,
        "expected two dev-net processes, found {devices:?}"
    );
    for &pid in &devices {
        procfs::assert_sandboxed(pid).with_context(|| format!("dev-net pid {pid}"))?;
    }

    let ifname = guest_ifup(
        vm,
        MACS[0],
        &[&format!("{}/24", GUEST4[0]), &format!("{}/64", GUEST6[0])],
    )?;
    guest_ifup(vm, MACS[1], &[&format!("{MANUAL_GUEST4}/24")])?;
    multi_queue_checks(ns, vm, &taps, &ifname)?;
    // The guest first.
    guest_ping(vm, HOST4)?;
    guest_ping(vm, HOST6)?;
    guest_ping(vm, MANUAL_HOST4)?;
    // Then the host first, after both sides forgot their neighbours.
    run_ok(vm, "ip neigh flush all; ip -6 neigh flush all")?;
    ns.ip(&["neigh", "flush", "all"])?;
    ns.ip(&["-6", "neigh", "flush", "all"])?;
    ns.ping(GUEST6[0])?;
    ns.ping(GUEST4[0])?;
    ns.ping(MANUAL_GUEST4)?;
    tcp_stream(ns, vm)
}

/// A guest of [`CPUS`] vCPUs gets a queue pair per vCPU (`networkN_queues="cpus"`):
/// multi-queue taps with one queue per pair, the guest's NIC with as many receive and transmit
/// queues, and its driver enabled them all (`VQ_PAIRS_SET`, which dev-net logs).
fn multi_queue_checks(
    ns: &Netns,
    vm: &mut TestVm,
    taps: &[String],
    ifname: &str,
) -> anyhow::Result<()> {
    for tap in taps {
        let detail = ns.ip(&["-d", "link", "show", tap])?;
        ensure!(
            detail.contains("multi_queue") && detail.contains(&format!("numqueues {CPUS}")),
            "tap {tap} is not a multi-queue tap of {CPUS} queues: {detail}"
        );
    }
    let queues = run_ok(vm, &format!("ls /sys/class/net/{ifname}/queues"))?;
    let mut names: Vec<&str> = queues.split_whitespace().collect();
    names.sort_unstable();
    let want: Vec<String> = (0..CPUS)
        .map(|i| format!("rx-{i}"))
        .chain((0..CPUS).map(|i| format!("tx-{i}")))
        .collect();
    ensure!(
        names == want,
        "the guest's {ifname} has queues {names:?}, not {want:?}"
    );
    let log = fs::read_to_string(guest_dir(vm, "net").join("dev-net0.log")).unwrap_or_default();
    ensure!(
        log.contains("queue pairs enabled") && log.contains(&format!("to={CPUS}")),
        "dev-net0 did not see the driver enable {CPUS} queue pairs:\n{log}"
    );
    let irqs = run_ok(
        vm,
        "grep -E 'virtio[0-9]+-(input|output)' /proc/interrupts || true",
    )?;
    println!("MEASURE network mq guest_queues={names:?}\n{irqs}");
    Ok(())
}

/// 100 MiB from the host to the guest over TCP; the guest's SHA-256 must be the host's.
fn tcp_stream(ns: &Netns, vm: &mut TestVm) -> anyhow::Result<()> {
    let data: Vec<u8> = (0..STREAM_BYTES)
        .map(|i| {
            let x = u32::try_from(i % 0xFFFF_FFFF).unwrap_or(0);
            (x.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]
        })
        .collect();
    let file = tempfile::NamedTempFile::new()?;
    fs::write(file.path(), &data)?;
    let want = sh(Command::new("sha256sum").arg(file.path()))?;
    let want = want
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    run_ok(
        vm,
        &format!("(nc -l -p {STREAM_PORT} | sha256sum > /tmp/stream.sum) >/dev/null 2>&1 &"),
    )?;
    let ns_path = ns.path();
    let target = format!("{}:{STREAM_PORT}", GUEST4[0]);
    let started = Instant::now();
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let netns = fs::File::open(&ns_path)?;
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stream = loop {
            match TcpStream::connect(&target) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => bail!("connecting to {target}: {e}"),
            }
        };
        stream.write_all(&data)?;
        stream.shutdown(Shutdown::Write)?;
        Ok(())
    });
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))??;
    let deadline = Instant::now() + Duration::from_mins(1);
    let got = loop {
        let sum = run_ok(vm, "cat /tmp/stream.sum 2>/dev/null || true")?;
        if !sum.is_empty() || Instant::now() > deadline {
            break sum;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        got.split_whitespace().next() == Some(want.as_str()),
        "the guest's SHA-256 of the stream {got:?} is not the host's {want}"
    );
    println!(
        "MEASURE network tcp host_to_guest_mib={} seconds={secs:.1} mib_per_s={:.1}",
        STREAM_BYTES >> 20,
        f64::from(u32::try_from(STREAM_BYTES >> 20).unwrap_or(u32::MAX)) / secs
    );
    Ok(())
}

/// Stops the guest with `vm stop`; afterwards no capvm tap is left in the namespace.
fn stop_and_check_taps_gone(ns: &Netns, vm: TestVm) -> anyhow::Result<()> {
    vm.stop(Duration::from_mins(1))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let taps = ns.links_named("capvm-tap")?;
        if taps.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("taps left after the guest stopped: {taps:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn two_guests() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    let ns = Netns::new("two")?;
    let launcher = |name: &str, mac: &str| InNetns {
        inner: CapvmLauncher::new(name),
        ns: &ns,
        // Two datastores naming the same switch the same way: one bridge, vm-public.
        switches: vec![switch_args(&[
            "switch",
            "create",
            "-a",
            &format!("{HOST4}/24"),
            "public",
        ])],
        conf: format!(
            "network0_type=\"virtio-net\"\nnetwork0_switch=\"public\"\nnetwork0_mac=\"{mac}\"\n"
        ),
    };
    let a_launcher = launcher("a", MACS[0]);
    let b_launcher = launcher("b", MACS[2]);
    let mut a = start(&a_launcher)?;
    let mut b = start(&b_launcher).map_err(|e| e.context("the second guest"))?;
    let checks = (|| -> anyhow::Result<()> {
        guest_ifup(
            &mut a,
            MACS[0],
            &[&format!("{}/24", GUEST4[0]), &format!("{}/64", GUEST6[0])],
        )?;
        guest_ifup(
            &mut b,
            MACS[2],
            &[&format!("{}/24", GUEST4[1]), &format!("{}/64", GUEST6[1])],
        )?;
        guest_ping(&mut a, GUEST4[1])?;
        guest_ping(&mut b, GUEST4[0])?;
        guest_ping(&mut b, GUEST6[0])?;
        guest_ping(&mut a, HOST4)?;
        Ok(())
    })();
    let checks = checks.map_err(|e| with_logs(&a, "a", &e));
    let b_stopped = stop_and_check_one(b);
    let a_stopped = stop_and_check_taps_gone(&ns, a);
    checks?;
    b_stopped?;
    a_stopped
}

fn stop_and_check_one(vm: TestVm) -> anyhow::Result<()> {
    vm.stop(Duration::from_mins(1))
        .map(drop)
        .map_err(Into::into)
}
