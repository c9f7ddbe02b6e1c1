//! Guest-level network benchmark: capvm's dev-net against QEMU's `virtio-net-pci`, the same
//! kit guest, the same bridge, in one run.
//!
//! The bench creates a network namespace (`capvm-e2e-bench-<pid>`) and, in it, capvm's standard
//! switch `bench` (bridge `vm-bench`, host addresses `198.18.9.1/24`, `2001:db8:9::1/64`) and
//! an `iperf3 -s` on the host side. capvm's guest gets `network0` on that switch (a tap from
//! netcfg, served by a sandboxed dev-net); QEMU's guest gets `virtio-net-pci` on a tap of its
//! own on the same bridge (`-netdev tap,...,vhost=off`: vhost-net is off for QEMU, and capvm
//! has no vhost at all). In each guest (the kit's `kit-packages.cpio`, which carries iperf3,
//! with the agent; 2 vCPUs, 512 MiB):
//!
//! - `iperf3 -c` to the host for `--time` seconds (guest→host TCP), then with `-R`
//!   (host→guest); the receiver's rate counts;
//! - `--pings` pings at 10 ms from the guest to the host, then from the host to the guest;
//!   average, p99 and maximum round-trip time;
//! - for capvm, dev-net's resident set (`VmRSS`, and its peak `VmHWM`) after the traffic,
//!   against the 4 MiB target.
//!
//! Prints a `MEASURE` line per figure and run, then a table of medians with the ratios
//! capvm/QEMU. Usage: `bench_net [--runs N] [--time SECS] [--pings N] [--mq]`;
//!
//! With `--mq` the bench compares capvm with itself instead: one virtio-net queue pair
//! (`network0_queues="1"`) against one per vCPU (2), with `iperf3 -P 2` (two parallel
//! streams) both ways, so that a second pair has traffic of its own; the table's ratio is
//! pairs=2 / pairs=1. QEMU is not run then.
//! `scripts/bench-net.sh` builds what it needs and runs it where KVM runs ordinary guests
//! (inside the emulated test host on PVM machines: the figures are then nested under TCG).
//! Needs root, `ip` (iproute2), `iperf3` and `ping` (iputils) on the host.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tests::bench::{median, packages_initrd, with_attempts};
use tests::kit::{Action, Kit, KitCmdline};
use tests::launcher::{
    Accel, CapvmLauncher, GuestSpec, LaunchError, Launcher, Machine, QemuLauncher,
};
use tests::netns::{InNetns, Netns, args, sh};
use tests::procfs;
use tests::testvm::TestVm;

const BOOT_TIMEOUT: Duration = Duration::from_mins(4);
const CMD_TIMEOUT: Duration = Duration::from_mins(3);
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;
const SWITCH: &str = "bench";
const BRIDGE: &str = "vm-bench";
const HOST4: &str = "198.18.9.1";
const HOST6: &str = "2001:db8:9::1";
const QEMU_TAP: &str = "qtap-bench";
/// dev-net's resident-set target (issue 6).
const RSS_TARGET_KIB: u64 = 4096;

/// One VMM's guest on the bench link.
#[derive(Debug, Clone, Copy)]
struct Guest {
    mac: &'static str,
    addr4: &'static str,
}

const CAPVM_GUEST: Guest = Guest {
    mac: "58:9c:fc:0b:00:02",
    addr4: "198.18.9.2",
};
const QEMU_GUEST: Guest = Guest {
    mac: "58:9c:fc:0b:00:03",
    addr4: "198.18.9.3",
};

/// QEMU in the namespace: `virtio-net-pci` on a tap of its own on the switch's bridge.
#[derive(Debug)]
struct QemuOnBridge<'a> {
    inner: QemuLauncher,
    ns: &'a Netns,
}

impl Launcher for QemuOnBridge<'_> {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let setup = |args: &[&str]| -> Result<(), LaunchError> {
            self.ns.ip(args).map(drop).map_err(|e| LaunchError::Setup {
                command: format!("ip {}", args.join(" ")),
                status: std::process::ExitStatus::default(),
                stderr: format!("{e:#}"),
            })
        };
        if self.ns.ip(&["link", "show", QEMU_TAP]).is_err() {
            setup(&["tuntap", "add", "dev", QEMU_TAP, "mode", "tap"])?;
        }
        setup(&["link", "set", QEMU_TAP, "master", BRIDGE])?;
        setup(&["link", "set", QEMU_TAP, "up"])?;
        let mut inner = self.inner.clone();
        inner.extra.extend([
            "-netdev".to_owned(),
            format!("tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost=off"),
            "-device".to_owned(),
            format!("virtio-net-pci,netdev=n0,mac={}", QEMU_GUEST.mac),
        ]);
        let command = inner.command(spec, workdir)?;
        Ok(self.ns.wrap(&command))
    }
}

/// What one guest measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Guest→host and host→guest TCP, Mbit/s at the receiver.
    tx_mbit: f64,
    rx_mbit: f64,
    /// Round-trip times in ms.
    ping_from_guest: Vec<f64>,
    ping_from_host: Vec<f64>,
    /// dev-net's resident set after the traffic (capvm only).
    rss: Option<Rss>,
}

/// The figures of the table, in order: (name, unit, higher is better).
const FIGURES: [(&str, &str, bool); 8] = [
    ("tcp guest->host", "Mbit/s", true),
    ("tcp host->guest", "Mbit/s", true),
    ("ping guest->host avg", "ms", false),
    ("ping guest->host p99", "ms", false),
    ("ping guest->host max", "ms", false),
    ("ping host->guest avg", "ms", false),
    ("ping host->guest p99", "ms", false),
    ("ping host->guest max", "ms", false),
];

impl Sample {
    fn figures(&self) -> [Option<f64>; 8] {
        let g = Stats::of(&self.ping_from_guest);
        let h = Stats::of(&self.ping_from_host);
        [
            Some(self.tx_mbit),
            Some(self.rx_mbit),
            g.map(|s| s.avg),
            g.map(|s| s.p99),
            g.map(|s| s.max),
            h.map(|s| s.avg),
            h.map(|s| s.p99),
            h.map(|s| s.max),
        ]
    }
}

/// A process's resident set, KiB (`/proc/PID/status`). `RssShmem` of dev-net is guest RAM
/// it touched through its shared mapping: the guest's own pages, no memory of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Rss {
    total: u64,
    peak: u64,
    anon: u64,
    file: u64,
    shmem: u64,
}

impl Rss {
    /// What the process costs the host beyond the guest's RAM.
    fn own(self) -> u64 {
        self.anon.saturating_add(self.file)
    }
}

/// Average, 99th percentile (nearest rank) and maximum of round-trip times.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    avg: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(v: &[f64]) -> Option<Stats> {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let max = *v.last()?;
        let avg = v.iter().sum::<f64>() / f64::from(u32::try_from(n).ok()?);
        // Nearest rank: ceil(0.99 n), 1-based.
        let rank = n.saturating_mul(99).div_ceil(100).max(1);
        let p99 = *v.get(rank.saturating_sub(1))?;
        Some(Stats { avg, p99, max })
    }
}

fn main() -> ExitCode {
    tests::bench::exit_code("bench_net", run())
}

#[derive(Debug, Clone, Copy)]
struct Options {
    runs: usize,
    time_s: u32,
    pings: u32,
    /// capvm with 1 queue pair against capvm with [`CPUS`] pairs, `iperf3 -P` [`CPUS`].
    mq: bool,
    /// Parallel iperf3 streams.
    streams: u32,
}

/// capvm with its NIC's queue pairs set (`network0_queues` in `inner`'s guest config).
#[derive(Debug)]
struct WithPairs<'a> {
    inner: InNetns<'a>,
    pairs: u32,
}

impl Launcher for WithPairs<'_> {
    fn name(&self) -> String {
        format!("capvm-pairs{}", self.pairs)
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        self.inner.command(spec, workdir)
    }
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 1,
        time_s: 10,
        pings: 100,
        mq: false,
        streams: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => o.runs = value()?.parse()?,
            "--time" => o.time_s = value()?.parse()?,
            "--pings" => o.pings = value()?.parse()?,
            "--mq" => {
                o.mq = true;
                o.streams = CPUS;
            }
            _ => bail!(
                "unknown argument {arg:?} (bench_net [--runs N] [--time SECS] [--pings N] [--mq])"
            ),
        }
    }
    ensure!(
        o.runs > 0 && o.time_s > 0 && o.pings > 0,
        "--runs, --time and --pings must be positive"
    );
    Ok(o)
}

/// What the bench compares, and where.
fn print_header(o: Options) {
    let nested = std::env::var_os("CAPVM_IN_TESTHOST").is_some();
    let where_ = if nested {
        "inside the emulated test host: nested KVM under QEMU TCG, so compare ratios, not figures"
    } else {
        "directly on this host's KVM"
    };
    println!(
        "bench_net: {} run(s), iperf3 -t {} s, {} pings at 10 ms, {CPUS} vCPUs, {MEMORY_MIB} MiB, {where_}",
        o.runs, o.time_s, o.pings
    );
    if o.mq {
        println!(
            "bench_net: --mq: capvm with 1 queue pair against capvm with {CPUS} (one per vCPU), iperf3 -P {} both ways",
            o.streams
        );
    } else {
        println!(
            "bench_net: capvm = dev-net (no vhost exists in capvm); qemu = virtio-net-pci, -netdev tap vhost=off (vhost-net off), microvm with PCIe"
        );
    }
}

fn run() -> anyhow::Result<()> {
    let o = options()?;
    let kit = Kit::locate()?;
    print_header(o);
    let ns = Netns::new("bench")?;
    let mut server = IperfServer::start(&ns)?;
    let initrd = packages_initrd(&kit.dir)?;
    println!("bench_net: kit {} ({})", kit.key, initrd.display());
    let spec = GuestSpec {
        kernel: kit.kernel.clone(),
        initrd,
        cmdline: KitCmdline::new(Action::Agent).render()?,
        cpus: CPUS,
        memory_mib: MEMORY_MIB,
    };
    let mut qemu = QemuLauncher::new(Machine::Microvm, Accel::Kvm);
    // microvm with a PCIe root, so QEMU's NIC is virtio-net-pci like capvm's.
    qemu.extra = vec!["-machine".into(), "pcie=on".into()];
    // capvm in the namespace: the `bench` switch (each run's datastore is new; the bridge it
    // names outlives the guests), and `network0` on it.
    let switches = vec![args(&[
        "switch",
        "create",
        "-a",
        &format!("{HOST4}/24"),
        "-a",
        &format!("{HOST6}/64"),
        SWITCH,
    ])];
    let conf = format!(
        "network0_type=\"virtio-net\"\nnetwork0_switch=\"{SWITCH}\"\nnetwork0_mac=\"{}\"\n",
        CAPVM_GUEST.mac
    );
    let in_ns = |queues: Option<u32>| InNetns {
        inner: CapvmLauncher::new("bench"),
        ns: &ns,
        switches: switches.clone(),
        conf: match queues {
            Some(q) => format!("{conf}network0_queues=\"{q}\"\n"),
            None => conf.clone(),
        },
    };
    let capvm = in_ns(None);
    let qemu = QemuOnBridge {
        inner: qemu,
        ns: &ns,
    };
    let one_pair = WithPairs {
        inner: in_ns(Some(1)),
        pairs: 1,
    };
    let all_pairs = WithPairs {
        inner: in_ns(Some(CPUS)),
        pairs: CPUS,
    };
    // capvm first in each run: its `vm switch create` makes the bridge QEMU's tap joins.
    let launchers: [(&dyn Launcher, Guest); 2] = if o.mq {
        [(&all_pairs, CAPVM_GUEST), (&one_pair, CAPVM_GUEST)]
    } else {
        [(&capvm, CAPVM_GUEST), (&qemu, QEMU_GUEST)]
    };
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=o.runs {
        for (i, (launcher, guest)) in launchers.iter().enumerate() {
            server.check()?;
            let measured = with_attempts("bench_net", &launcher.name(), run, || {
                measure(*launcher, &spec, *guest, &ns, o)
            });
            if let Some(sample) = measured {
                print_sample(&launcher.name(), run, &sample);
                if let Some(slot) = samples.get_mut(i) {
                    slot.push(sample);
                }
            }
        }
    }
    server.stop();
    let columns = if o.mq {
        [format!("pairs={CPUS}"), "pairs=1".to_owned()]
    } else {
        ["capvm".to_owned(), "qemu".to_owned()]
    };
    print_table(&samples, &columns);
    Ok(())
}

fn print_sample(vmm: &str, run: usize, s: &Sample) {
    let f = s.figures();
    let mut line = format!("MEASURE bench_net vmm={vmm} run={run}");
    for ((name, unit, _), v) in FIGURES.iter().zip(f) {
        if let Some(v) = v {
            let key = name.replace("->", "_to_").replace(' ', "_");
            let _ = write!(line, " {key}_{}={v:.3}", unit.replace('/', "_per_"));
        }
    }
    if let Some(r) = s.rss {
        let _ = write!(
            line,
            " dev_net_vmrss_kib={} dev_net_vmhwm_kib={} dev_net_rss_anon_kib={} dev_net_rss_file_kib={} dev_net_rss_shmem_kib={}",
            r.total, r.peak, r.anon, r.file, r.shmem
        );
    }
    println!("{line}");
}

fn print_table(samples: &[Vec<Sample>; 2], columns: &[String; 2]) {
    let [a, b] = columns;
    println!();
    println!(
        "{:<22} {:>7} {a:>10} {b:>10} {:>7}  (medians of the runs; ratio = {a}/{b})",
        "figure", "unit", "ratio"
    );
    let med = |l: usize, i: usize| {
        let v: Vec<f64> = samples
            .get(l)
            .map(|runs| {
                runs.iter()
                    .filter_map(|s| s.figures().get(i).copied().flatten())
                    .collect()
            })
            .unwrap_or_default();
        median(&v)
    };
    for (i, (name, unit, higher_better)) in FIGURES.iter().enumerate() {
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        let (c, q) = (med(0, i), med(1, i));
        let ratio = match (c, q) {
            (Some(c), Some(q)) if q > 0.0 => {
                let good = if *higher_better { c >= q } else { c <= q };
                format!("{:.2}{}", c / q, if good { "" } else { " !" })
            }
            _ => "-".to_owned(),
        };
        println!(
            "{name:<22} {unit:>7} {:>10} {:>10} {ratio:>7}",
            cell(c),
            cell(q)
        );
    }
    // The run whose dev-net held the most memory of its own.
    match samples[0]
        .iter()
        .filter_map(|s| s.rss)
        .max_by_key(|r| r.own())
    {
        Some(r) => println!(
            "dev-net resident set (largest of the runs): VmRSS {} KiB (peak VmHWM {}) = RssAnon {} + RssFile {} + RssShmem {} (guest RAM it touched, shared with the guest); \
             its own memory RssAnon+RssFile {} KiB, target <= {RSS_TARGET_KIB} KiB: {}",
            r.total,
            r.peak,
            r.anon,
            r.file,
            r.shmem,
            r.own(),
            if r.own() <= RSS_TARGET_KIB {
                "met"
            } else {
                "MISSED"
            }
        ),
        None => println!("dev-net resident set: not measured"),
    }
    println!("(a ratio marked ! is one where {a} is worse than {b})");
}

/// `iperf3 -s` on the host side of the link, for the whole bench.
struct IperfServer {
    child: Child,
}

impl IperfServer {
    fn start(ns: &Netns) -> anyhow::Result<IperfServer> {
        let child = ns
            .exec(Path::new("iperf3"))
            .arg("-s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s in the bench namespace (apt-get install iperf3)")?;
        Ok(IperfServer { child })
    }

    /// The server must still run.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("iperf3 -s exited ({status})");
        }
        Ok(())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn measure(
    launcher: &dyn Launcher,
    spec: &GuestSpec,
    guest: Guest,
    ns: &Netns,
    o: Options,
) -> anyhow::Result<Sample> {
    let mut vm = TestVm::start(launcher, spec)?;
    let result = (|| {
        vm.wait_ready(BOOT_TIMEOUT)?;
        measure_in(&mut vm, guest, ns, o)
    })();
    let result = result.map_err(|e| {
        e.context(format!(
            "--- console and logs of {} ---\n{}",
            launcher.name(),
            vm.logs()
        ))
    });
    let _ = vm.stop(Duration::from_mins(1));
    result
}

fn measure_in(vm: &mut TestVm, guest: Guest, ns: &Netns, o: Options) -> anyhow::Result<Sample> {
    let ifname = run_ok(
        vm,
        &format!(
            "for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {} ] && basename $i; done; true",
            guest.mac
        ),
    )?;
    ensure!(
        !ifname.is_empty() && !ifname.contains(char::is_whitespace),
        "no single guest interface has MAC {}: {ifname:?}",
        guest.mac
    );
    run_ok(
        vm,
        &format!(
            "ip link set {ifname} up && ip addr add {}/24 dev {ifname}",
            guest.addr4
        ),
    )?;
    // What the guest's driver made of the NIC: one rx-N per queue pair it uses.
    let queues = run_ok(vm, &format!("ls /sys/class/net/{ifname}/queues"))?;
    println!(
        "bench_net: {}: guest {ifname} queues: {}",
        vm.launcher(),
        queues.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    // The first pings resolve neighbours both ways (and wait for the bridge port to
    // forward: a new port may take a moment).
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_ok(vm, &format!("ping -c 1 -W 2 {HOST4}")).is_err() {
        ensure!(Instant::now() < deadline, "the guest cannot ping {HOST4}");
    }
    sh(ns
        .exec(Path::new("ping"))
        .args(["-c", "2", "-W", "5", guest.addr4]))
    .context("the host cannot ping the guest")?;
    let mut sample = Sample {
        tx_mbit: iperf(vm, o.time_s, o.streams, false)?,
        rx_mbit: iperf(vm, o.time_s, o.streams, true)?,
        ..Sample::default()
    };
    let out = run_ok(
        vm,
        &format!(
            "ping -c {} -i 0.01 -W 5 {HOST4} > /tmp/ping.out 2>&1; sed -n 's/.*time=\\([0-9.]*\\) ms.*/\\1/p' /tmp/ping.out | tr '\\n' ' '",
            o.pings
        ),
    )?;
    sample.ping_from_guest = ping_times(&out.replace(' ', "\n"));
    let host_ping = ns
        .exec(Path::new("ping"))
        .args([
            "-c",
            &o.pings.to_string(),
            "-i",
            "0.01",
            "-W",
            "5",
            guest.addr4,
        ])
        .output()
        .context("ping from the host")?;
    sample.ping_from_host = ping_times(&String::from_utf8_lossy(&host_ping.stdout));
    let lost = |got: usize| {
        o.pings
            .saturating_sub(u32::try_from(got).unwrap_or(u32::MAX))
    };
    if lost(sample.ping_from_guest.len()) > 0 || lost(sample.ping_from_host.len()) > 0 {
        println!(
            "bench_net: {}: lost pings: guest->host {}, host->guest {}",
            vm.launcher(),
            lost(sample.ping_from_guest.len()),
            lost(sample.ping_from_host.len())
        );
    }
    sample.rss = dev_net_rss(vm.pid());
    Ok(sample)
}

/// `iperf3 -c` from the guest to the host (`reverse`: host to guest) with `streams`
/// parallel streams; the receiver's rate (their sum).
fn iperf(vm: &mut TestVm, time_s: u32, streams: u32, reverse: bool) -> anyhow::Result<f64> {
    let r = if reverse { " -R" } else { "" };
    // With several streams the summary line is `[SUM]`; a single stream's is its own.
    let filter = if streams > 1 {
        "SUM.*receiver|error"
    } else {
        "receiver|error"
    };
    // Into a file first: every console byte is a VM exit.
    let out = vm.run(
        &format!(
            "iperf3 -c {HOST4} -t {time_s} -P {streams} -i 0 -f m{r} > /tmp/iperf.out 2>&1; s=$?; grep -E '{filter}' /tmp/iperf.out; exit $s"
        ),
        CMD_TIMEOUT + Duration::from_secs(u64::from(time_s)),
    )?;
    ensure!(
        out.status == 0,
        "iperf3{r} exited {}: {}",
        out.status,
        out.output
    );
    iperf_receiver_mbit(&out.output)
        .with_context(|| format!("no receiver rate in {:?}", out.output))
}

/// The rate on iperf3's `receiver` summary line, in Mbit/s.
fn iperf_receiver_mbit(output: &str) -> Option<f64> {
    let line = output
        .lines()
        .find(|l| l.trim_end().ends_with("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| w.ends_with("bits/sec"))?;
    let scale = match *words.get(at)? {
        "bits/sec" => 1e-6,
        "Kbits/sec" => 1e-3,
        "Mbits/sec" => 1.0,
        "Gbits/sec" => 1e3,
        _ => return None,
    };
    let n: f64 = words.get(at.checked_sub(1)?)?.parse().ok()?;
    Some(n * scale)
}

/// The `time=X ms` of each reply line (iputils and busybox), or bare numbers one a line.
fn ping_times(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| {
            let t = match l.split_once("time=") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.trim(),
            };
            t.parse().ok()
        })
        .collect()
}

/// dev-net's resident set, found under the guest's `vm` process.
fn dev_net_rss(launcher_pid: u32) -> Option<Rss> {
    // ip netns exec → vm start -f (supervisor) → dev-net; `timeout` is the launcher's pid.
    let mut frontier = vec![launcher_pid];
    for _ in 0..4 {
        let mut next = Vec::new();
        for pid in frontier {
            if let Some(&dev) = procfs::children_named(pid, "dev-net").first() {
                let kib = |f: &str| {
                    procfs::field(dev, f)?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                };
                return Some(Rss {
                    total: kib("VmRSS")?,
                    peak: kib("VmHWM")?,
                    anon: kib("RssAnon")?,
                    file: kib("RssFile")?,
                    shmem: kib("RssShmem")?,
                });
            }
            next.extend(all_children(pid));
        }
        frontier = next;
    }
    None
}

fn all_children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Runs `command` in the guest; it must exit 0. Returns its output, trimmed.
fn run_ok(vm: &mut TestVm, command: &str) -> anyhow::Result<String> {
    vm.run_ok(command, CMD_TIMEOUT)
}

#[cfg(test)]
mod unit {
    use super::{Stats, iperf_receiver_mbit, ping_times};

    #[test]
    fn iperf3_receiver_line_is_read_in_mbit_per_second() {
        let out = "[  5]   0.00-10.00  sec   112 MBytes  94.1 Mbits/sec    0             sender\n\
                   [  5]   0.00-10.04  sec   111 MBytes  93.0 Mbits/sec                  receiver";
        assert_eq!(iperf_receiver_mbit(out), Some(93.0));
        let g = "[  5]   0.00-10.00  sec  2.1 GBytes  1.80 Gbits/sec                  receiver";
        assert_eq!(iperf_receiver_mbit(g), Some(1800.0));
        assert_eq!(
            iperf_receiver_mbit("iperf3: error - unable to connect to server"),
            None
        );
        let sum = "[SUM]   0.00-10.04  sec   222 MBytes   186 Mbits/sec                  receiver";
        assert_eq!(iperf_receiver_mbit(sum), Some(186.0));
    }

    #[test]
    fn ping_reply_times_are_read_from_iputils_busybox_and_bare_lines() {
        let iputils = "PING 198.18.9.2 (198.18.9.2) 56(84) bytes of data.\n\
                       64 bytes from 198.18.9.2: icmp_seq=1 ttl=64 time=0.512 ms\n\
                       64 bytes from 198.18.9.2: icmp_seq=2 ttl=64 time=1.25 ms\n\
                       rtt min/avg/max/mdev = 0.512/0.881/1.250/0.369 ms";
        assert_eq!(ping_times(iputils), vec![0.512, 1.25]);
        let busybox = "64 bytes from 198.18.9.1: seq=0 ttl=64 time=2.000 ms";
        assert_eq!(ping_times(busybox), vec![2.0]);
        assert_eq!(ping_times("0.3\n0.4\n"), vec![0.3, 0.4]);
    }

    #[test]
    fn stats_give_average_nearest_rank_p99_and_maximum() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v).expect("stats");
        assert!((s.p99 - 99.0).abs() < 1e-9);
        assert!((s.max - 100.0).abs() < 1e-9);
        assert!((s.avg - 50.5).abs() < 1e-9);
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(
            Stats::of(&[3.0, 1.0]).map(|s| (s.p99, s.max)),
            Some((3.0, 3.0))
        );
    }
}
