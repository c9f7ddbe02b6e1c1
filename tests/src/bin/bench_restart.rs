//! Restart-latency benchmark (issue 8): from a device process's death to the first request it
//! completes after its restart, over many kills in one run, for dev-blk and dev-net.
//!
//! Device level, no KVM: the real sandboxed binaries, started the way the supervisor starts
//! them (`supervisor::spawn`, the same fd roles and setup), driven through split rings by
//! `tests::virtio_driver` playing the guest. The bench plays the supervisor and the runner's
//! part of a restart: SIGKILL, reap, spawn a new process with the same fds (guest RAM, disk or
//! tap, dev-blk's in-flight region), handshake, and re-send the same `Activate` (same rings,
//! same kick and call eventfds). The clock starts at the SIGKILL and stops at the first used
//! element after it.
//!
//! - dev-blk: 4 KiB reads and writes at queue depth 16 on a 4 MiB image in `/var/tmp`, so
//!   requests are in flight at every kill and the new process replays them from the in-flight
//!   region; every request must complete with status OK.
//! - dev-net: a tap in a network namespace the bench creates (`198.18.11.1/24` on the host's
//!   side, the "guest" `198.18.11.2` with a permanent neighbour entry), a UDP datagram from the
//!   namespace to the guest every millisecond; the first frame on the receive ring after the
//!   kill stops the clock.
//!
//! Prints one `MEASURE` line per kill, then per device the median, 90th percentile and worst
//! against the 20 ms target, and where it ran. Usage: `bench_restart [--kills N] [--only
//! blk|net]` (root: the sandbox and the namespace need it); `scripts/bench-restart.sh` builds
//! and runs it.

// Latencies and counts are far below 2^52: the casts to f64 lose nothing that matters.
#![allow(clippy::cast_precision_loss)]

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelKind};
use proto::device::{BlockSetup, DeviceInfo, DeviceSetup, FromDevice, MemoryRegion, NetSetup};
use supervisor::spawn;
use tests::virtio_driver::{Buf, GuestRam, SplitQueue, activation};

const RAM: u64 = 16 << 20;
const QSIZE: u16 = 256;
const WAIT: Duration = Duration::from_secs(10);
const TARGET: Duration = Duration::from_millis(20);
/// Completions between two kills (dev-blk), or time between two kills (dev-net).
const BLK_BETWEEN_KILLS: usize = 64;
const NET_BETWEEN_KILLS: Duration = Duration::from_millis(30);

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("bench_restart: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    kills: usize,
    blk: bool,
    net: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        kills: 50,
        blk: true,
        net: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--kills" => {
                args.kills = it
                    .next()
                    .context("--kills needs a number")?
                    .parse()
                    .context("--kills")?;
            }
            "--only" => match it.next().as_deref() {
                Some("blk") => args.net = false,
                Some("net") => args.blk = false,
                other => bail!("--only blk|net, not {other:?}"),
            },
            other => bail!("unknown argument {other:?} (--kills N, --only blk|net)"),
        }
    }
    ensure!(args.kills > 0, "--kills must be at least 1");
    Ok(args)
}

/// Runs the selected benchmarks; `false` if a median missed the target.
fn run() -> anyhow::Result<bool> {
    let args = parse_args()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (the device sandbox, a network namespace)"
    );
    print_where();
    let mut met = true;
    if args.blk {
        let times = bench_blk(args.kills).context("dev-blk")?;
        met &= report("dev-blk", &times);
    }
    if args.net {
        let times = bench_net(args.kills).context("dev-net")?;
        met &= report("dev-net", &times);
    }
    Ok(met)
}

/// The machine this ran on: kernel, CPU, load, and whether inside the emulated test host.
fn print_where() {
    let uname = Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let nested = if std::env::var_os("CAPVM_IN_TESTHOST").is_some() {
        "inside the emulated test host (TCG)"
    } else {
        "directly on this host (device level: no KVM needed)"
    };
    println!(
        "where: {uname}, {cpus} x {model}, load average {}, {nested}",
        load.join(" ")
    );
}

/// Prints the summary of one device; whether its median met the target.
fn report(device: &str, times: &[Duration]) -> bool {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        let i = ((sorted.len() as f64 - 1.0) * q).round();
        // In range: q is within [0, 1] and the list is not empty.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        sorted.get(i as usize).copied().unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (median, p90, worst, best) = (
        at(0.5),
        at(0.9),
        sorted.last().copied().unwrap_or_default(),
        sorted.first().copied().unwrap_or_default(),
    );
    let met = median < TARGET;
    println!(
        "RESULT {device} restart: kills={} median_ms={:.2} p90_ms={:.2} worst_ms={:.2} best_ms={:.2} target_median_ms={} {}",
        sorted.len(),
        ms(median),
        ms(p90),
        ms(worst),
        ms(best),
        TARGET.as_millis(),
        if met { "met" } else { "MISSED" }
    );
    met
}

/// A device process as the supervisor starts it: the fds of its recipe and its setup.
struct Recipe<'a> {
    role: Role,
    binary: &'static str,
    fds: Vec<(FdRole, BorrowedFd<'a>)>,
    setup: DeviceSetup,
}

/// One incarnation: the process and the runner's end of its channel.
struct Incarnation {
    running: spawn::Running,
    runner: Channel,
    info: DeviceInfo,
}

impl Recipe<'_> {
    /// Spawns the device in its sandbox, sends its setup, handshakes as the runner and reads
    /// its `Info`.
    fn launch(&self, log: BorrowedFd<'_>) -> anyhow::Result<Incarnation> {
        let (runner, theirs) = Channel::pair()?;
        let (uid, gid) = sandbox::nobody();
        let mut roles = vec![FdRole::Log];
        let mut fds = vec![log];
        for (i, (role, fd)) in self.fds.iter().enumerate() {
            if i == 2 {
                // [Log, GuestMemory, backing, DeviceChannel, extra…], as the supervisor.
                roles.push(FdRole::DeviceChannel);
                fds.push(theirs.as_fd());
            }
            roles.push(*role);
            fds.push(*fd);
        }
        if self.fds.len() <= 2 {
            roles.push(FdRole::DeviceChannel);
            fds.push(theirs.as_fd());
        }
        let boot = Bootstrap {
            role: self.role,
            vm_name: "bench-restart".into(),
            sandbox: SandboxSettings {
                uid,
                gid,
                max_fds: 64,
            },
            fds: roles,
            log_filter: "warn".into(),
        };
        let binary = supervisor::spawn::binary_path(self.binary);
        let running = spawn::spawn(&binary, &boot, &fds)
            .with_context(|| format!("starting {} (build it first)", binary.display()))?;
        drop(theirs);
        running.channel.send(&self.setup, &[])?;
        runner.handshake_timeout(ChannelKind::RunnerDevice, WAIT)?;
        let info = match runner.recv_timeout::<FromDevice>(WAIT)?.msg {
            FromDevice::Info(info) => info,
            other => bail!("expected Info, got {other:?}"),
        };
        info.validate()?;
        Ok(Incarnation {
            running,
            runner,
            info,
        })
    }
}

impl Incarnation {
    /// Sends `Activate` for `queues` with their eventfds and waits for `Activated`.
    fn activate(&self, features: u64, queues: &[SplitQueue]) -> anyhow::Result<()> {
        let (msg, fds) = activation(features, (0..).zip(queues));
        self.runner.send(&msg, &fds)?;
        let reply = self.runner.recv_timeout::<FromDevice>(WAIT)?.msg;
        ensure!(
            reply == FromDevice::Activated,
            "Activate answered {reply:?}"
        );
        Ok(())
    }

    /// SIGKILL and reap, as a crash the supervisor's pidfd reports.
    fn kill(mut self) -> anyhow::Result<()> {
        self.running.process.kill()?;
        self.running.process.wait()?;
        Ok(())
    }
}

fn memory() -> Vec<MemoryRegion> {
    vec![MemoryRegion {
        guest_addr: 0,
        size: RAM,
        file_offset: 0,
    }]
}

fn log_file() -> anyhow::Result<(tempfile::NamedTempFile, File)> {
    let log = tempfile::NamedTempFile::new()?;
    let fd = OpenOptions::new().append(true).open(log.path())?;
    Ok((log, fd))
}

// ---------------------------------------------------------------------------------------------
// dev-blk

const BLK_DEPTH: usize = 16;
const BLK_SECTORS: u64 = 8192;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;

/// Guest addresses of request slot `s`: header, status byte, 4 KiB buffer.
fn blk_slot(s: usize) -> (u64, u64, u64) {
    let base = 0x10_0000 + 0x2000 * u64::try_from(s).unwrap_or(0);
    (base, base + 0x100, base + 0x1000)
}

/// Puts request `n` on slot `s`: a 4 KiB write (even `n`) or read (odd) of sector `8 n`
/// modulo the disk.
fn blk_issue(ram: &GuestRam, queue: &mut SplitQueue, s: usize, n: u64) {
    let (hdr, status, buf) = blk_slot(s);
    let kind = if n.is_multiple_of(2) { T_OUT } else { T_IN };
    let mut header = kind.to_le_bytes().to_vec();
    header.extend_from_slice(&[0; 4]);
    header.extend_from_slice(&((n * 8) % BLK_SECTORS).to_le_bytes());
    ram.write(hdr, &header);
    ram.write(status, &[0xee]);
    let bufs = [
        Buf::out(hdr, 16),
        Buf {
            addr: buf,
            len: 4096,
            write: kind == T_IN,
        },
        Buf::input(status, 1),
    ];
    let first = u16::try_from(s * 3).unwrap_or(0);
    let head = queue.add_chain_at(ram, first, &bufs);
    queue.publish(ram, head);
}

fn bench_blk(kills: usize) -> anyhow::Result<Vec<Duration>> {
    let ram = GuestRam::new(RAM)?;
    let mut disk = tempfile::NamedTempFile::new_in("/var/tmp")?;
    disk.write_all(&vec![0x5a; usize::try_from(BLK_SECTORS * 512)?])?;
    disk.as_file().sync_all()?;
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk.path())?;
    let region = nix::sys::memfd::memfd_create(c"inflight", nix::sys::memfd::MFdFlags::empty())?;
    let region = File::from(region);
    region.set_len(u64::try_from(proto::device::INFLIGHT_REGION_BYTES)?)?;
    let (log, log_fd) = log_file()?;
    let recipe = Recipe {
        role: Role::DevBlk { index: 0 },
        binary: "dev-blk",
        fds: vec![
            (FdRole::GuestMemory, ram.fd()),
            (FdRole::Disk, image.as_fd()),
            (FdRole::InflightRegion, region.as_fd()),
        ],
        setup: DeviceSetup::Block(BlockSetup {
            memory: memory(),
            read_only: false,
            logical_block_size: 512,
            serial: "bench-restart".into(),
            queues: 1,
        }),
    };
    let mut device = recipe.launch(log_fd.as_fd())?;
    let features = device.info.features;
    let mut queue = SplitQueue::new(&ram, 0x1000, QSIZE)?;
    queue.set_event_idx(features & (1 << 29) != 0);
    device.activate(features, std::slice::from_ref(&queue))?;

    let mut issued = 0u64;
    for s in 0..BLK_DEPTH {
        blk_issue(&ram, &mut queue, s, issued);
        issued += 1;
    }
    queue.notify(&ram);
    let mut times = Vec::with_capacity(kills);
    let mut since_kill = 0usize;
    let mut killed_at: Option<Instant> = None;
    let mut completed = 0u64;
    // Completions the killed process published before it died: handled before the clock stops.
    let mut leftover = Vec::new();
    while times.len() < kills || killed_at.is_some() {
        let fresh = leftover.is_empty();
        let used = if fresh {
            queue.wait_some(&ram, WAIT).map_err(|e| {
                anyhow::anyhow!(
                    "stalled after {completed} requests: {e}; log:\n{}",
                    text(log.path())
                )
            })?
        } else {
            std::mem::take(&mut leftover)
        };
        if fresh && let Some(at) = killed_at.take() {
            let took = at.elapsed();
            println!(
                "MEASURE bench_restart dev-blk kill={} death_to_first_completion_ms={:.2}",
                times.len() + 1,
                took.as_secs_f64() * 1000.0
            );
            times.push(took);
        }
        for u in used {
            let s = usize::try_from(u.id)? / 3;
            let (_, status, _) = blk_slot(s);
            ensure!(
                ram.read_u8(status) == S_OK,
                "request in slot {s} completed with status {}",
                ram.read_u8(status)
            );
            completed += 1;
            since_kill += 1;
            blk_issue(&ram, &mut queue, s, issued);
            issued += 1;
        }
        queue.notify(&ram);
        if times.len() < kills && since_kill >= BLK_BETWEEN_KILLS {
            since_kill = 0;
            // Requests are in flight now: the clock starts at the SIGKILL.
            killed_at = Some(Instant::now());
            device.kill()?;
            leftover = queue.wait_some(&ram, Duration::ZERO).unwrap_or_default();
            device = recipe.launch(log_fd.as_fd())?;
            device.activate(features, std::slice::from_ref(&queue))?;
        }
    }
    println!("dev-blk: {completed} requests completed OK across {kills} kills");
    Ok(times)
}

fn text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// dev-net

const TAP: &str = "rb0";
const HOST_IP: &str = "198.18.11.1";
const GUEST_IP: &str = "198.18.11.2";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x0b, 0x0b, 0x02];
const RX_BUFS: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 2048;

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> anyhow::Result<Netns> {
        let name = format!("capvm-bench-restart-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        Ok(Netns(name))
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread inside the namespace.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).with_context(|| path.clone())?;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Opens `/dev/net/tun` as tap [`TAP`] with a virtio-net header (`IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`), as netcfg makes the supervisor's taps.
fn open_tap() -> anyhow::Result<OwnedFd> {
    const TUNSETIFF: nix::libc::c_ulong = 0x4004_54ca;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("/dev/net/tun")?;
    let mut ifr = [0u8; 40];
    ifr.get_mut(..TAP.len())
        .context("tap name")?
        .copy_from_slice(TAP.as_bytes());
    let flags: u16 = 0x0002 | 0x1000 | 0x4000;
    ifr.get_mut(16..18)
        .context("ifreq flags")?
        .copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes) at the pointer, which
    // points at `ifr`, alive and 40 bytes long for the call; `tun` is an open /dev/net/tun.
    let r = unsafe { nix::libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    ensure!(r == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    Ok(OwnedFd::from(tun))
}

/// The namespace with the tap (host side addressed and up, the guest a permanent neighbour).
fn net_namespace() -> anyhow::Result<(Netns, OwnedFd)> {
    ensure!(Path::new("/dev/net/tun").exists(), "needs /dev/net/tun");
    let ns = Netns::new()?;
    let tap = ns
        .spawn(open_tap)
        .join()
        .map_err(|_| anyhow::anyhow!("tap thread panicked"))??;
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
    ns.ip(&["link", "set", TAP, "up"])?;
    ns.ip(&[
        "neigh",
        "replace",
        GUEST_IP,
        "lladdr",
        &mac,
        "dev",
        TAP,
        "nud",
        "permanent",
    ])?;

    Ok((ns, tap))
}

/// Puts receive buffer `i` (descriptor `i`, [`RX_BUF_LEN`] bytes) on the ring.
fn post_rx(ram: &GuestRam, rx: &mut SplitQueue, i: u16) {
    let addr = RX_BUFS + u64::from(i) * u64::from(RX_BUF_LEN);
    let head = rx.add_chain_at(ram, i, &[Buf::input(addr, RX_BUF_LEN)]);
    rx.publish(ram, head);
}

/// One datagram a millisecond from the namespace to the guest until `stop`; returns how many.
fn udp_sender(ns: &Netns, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<anyhow::Result<u64>> {
    ns.spawn(move || {
        let socket = UdpSocket::bind((HOST_IP, 0))?;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            socket.send_to(&n.to_le_bytes(), (GUEST_IP, 9))?;
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(n)
    })
}

fn bench_net(kills: usize) -> anyhow::Result<Vec<Duration>> {
    let (ns, tap) = net_namespace()?;
    let ram = GuestRam::new(RAM)?;
    let (log, log_fd) = log_file()?;
    let recipe = Recipe {
        role: Role::DevNet { index: 0 },
        binary: "dev-net",
        fds: vec![(FdRole::GuestMemory, ram.fd()), (FdRole::Tap, tap.as_fd())],
        setup: DeviceSetup::Net(NetSetup {
            memory: memory(),
            mac: GUEST_MAC,
            mtu: 1500,
            queue_pairs: 1,
        }),
    };
    let first = recipe.launch(log_fd.as_fd())?;
    let features = first.info.features;
    // Receive queue 0, transmit queue 1 (the transmit queue stays idle).
    let mut rx = SplitQueue::new(&ram, 0x1_0000, QSIZE)?;
    let mut tx = SplitQueue::new(&ram, 0x2_0000, QSIZE)?;
    rx.set_event_idx(features & (1 << 29) != 0);
    tx.set_event_idx(features & (1 << 29) != 0);
    for i in 0..QSIZE {
        post_rx(&ram, &mut rx, i);
    }
    let mut queues = [rx, tx];
    first.activate(features, &queues)?;
    let mut device = Some(first);
    queues[0].notify(&ram);

    let stop = Arc::new(AtomicBool::new(false));
    let sender = udp_sender(&ns, Arc::clone(&stop));

    let mut times = Vec::with_capacity(kills);
    let mut frames = 0u64;
    let mut next_kill = Instant::now() + NET_BETWEEN_KILLS;
    let mut killed_at: Option<Instant> = None;
    let result = (|| -> anyhow::Result<()> {
        while times.len() < kills || killed_at.is_some() {
            let used = match queues[0].wait_some(&ram, Duration::from_millis(5)) {
                Ok(used) => used,
                Err(_) if killed_at.is_none() => Vec::new(),
                Err(_) => {
                    let at = killed_at.unwrap_or_else(Instant::now);
                    ensure!(
                        at.elapsed() < WAIT,
                        "no frame within {WAIT:?} of kill {}; log:\n{}",
                        times.len() + 1,
                        text(log.path())
                    );
                    Vec::new()
                }
            };
            if !used.is_empty()
                && let Some(at) = killed_at.take()
            {
                let took = at.elapsed();
                println!(
                    "MEASURE bench_restart dev-net kill={} death_to_first_frame_ms={:.2}",
                    times.len() + 1,
                    took.as_secs_f64() * 1000.0
                );
                times.push(took);
                next_kill = Instant::now() + NET_BETWEEN_KILLS;
            }
            for u in &used {
                frames += 1;
                post_rx(&ram, &mut queues[0], u16::try_from(u.id)?);
            }
            if !used.is_empty() {
                queues[0].notify(&ram);
            }
            if killed_at.is_none() && times.len() < kills && Instant::now() >= next_kill {
                ensure!(
                    frames > 0,
                    "no frame reached the device before the first kill"
                );
                // The clock starts at the SIGKILL; the replacement is spawned after it.
                killed_at = Some(Instant::now());
                if let Some(old) = device.take() {
                    old.kill()?;
                }
                // Frames the killed process delivered before it died do not stop the clock.
                let leftover = queues[0]
                    .wait_some(&ram, Duration::ZERO)
                    .unwrap_or_default();
                for u in &leftover {
                    frames += 1;
                    post_rx(&ram, &mut queues[0], u16::try_from(u.id)?);
                }
                queues[0].notify(&ram);
                let new = recipe.launch(log_fd.as_fd())?;
                new.activate(features, &queues)?;
                device = Some(new);
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    result?;
    // Frames beyond the datagrams are the namespace's own (IPv6 neighbour and router traffic).
    println!("dev-net: {frames} frames received, {sent} datagrams sent, across {kills} kills");
    Ok(times)
}
