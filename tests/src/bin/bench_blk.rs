//! Device-level virtio-blk benchmark: the sandboxed dev-blk process, driven through a split
//! ring by `tests::virtio_driver`, against the host's own `pread`/`pwrite` on the same file,
//! both with `O_DIRECT` (dev-blk is handed an `O_DIRECT` descriptor, as a supervisor could).
//!
//! Workloads, each at queue depth 32 for `--secs` seconds: 1 MiB sequential read and write
//! (MB/s), 4 KiB random read and write (IOPS). The host side runs 32 threads, one request each;
//! dev-blk gets one queue with 32 requests in flight. Prints one line per workload with both
//! figures and dev-blk's ratio to the host, then dev-blk's resident memory. Host and dev-blk
//! runs alternate, workload by workload and round by round, on the same file.
//!
//! The driver (this process, on the same CPUs as dev-blk) behaves like a Linux guest's
//! virtio-blk driver with `EVENT_IDX`: it re-arms `used_event` only after draining the used
//! ring (one interrupt per burst of completions), reads just the used elements it consumes,
//! refills every free slot and then kicks once, only if `avail_event` asks for it.
//!
//! Usage: `bench_blk [--rounds N] [--secs N] [--size-mib N] [--dir DIR] [--only NAME,...]`
//! (root: the sandbox needs it); `scripts/bench-blk.sh` builds and runs it. `--only` picks
//! workloads by name (`rand-write-4k,rand-read-4k`, ...). Besides the rates it prints the CPU
//! per request of dev-blk, of the driver (this process while dev-blk runs) and of the host
//! baseline; the context switches per request of dev-blk and the driver together; and the
//! kicks and interrupts per request. Those counts are what load elsewhere on the machine barely
//! moves, unlike the rates.

// Counts and rates are far below 2^52: the casts to f64 lose nothing that matters.
#![allow(clippy::cast_precision_loss)]

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelKind};
use proto::device::{BlockSetup, DeviceSetup, FromDevice, MemoryRegion};
use tests::virtio_driver::{Buf, GuestRam, SplitQueue, activation};

const DEPTH: usize = 32;
const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const WAIT: Duration = Duration::from_secs(10);
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    block: u64,
    random: bool,
    write: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "seq-read-1m",
        block: MIB,
        random: false,
        write: false,
    },
    Workload {
        name: "seq-write-1m",
        block: MIB,
        random: false,
        write: true,
    },
    Workload {
        name: "rand-read-4k",
        block: 4096,
        random: true,
        write: false,
    },
    Workload {
        name: "rand-write-4k",
        block: 4096,
        random: true,
        write: true,
    },
];

struct Args {
    rounds: usize,
    secs: f64,
    size: u64,
    dir: PathBuf,
    /// Workload names to run (all when empty).
    only: Vec<String>,
    /// Also run a second dev-blk with this environment variable set (`--compare-engines`:
    /// the other I/O engine; `--compare-env VAR=VALUE`), interleaved with the first.
    other_env: Option<(String, String)>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        rounds: 3,
        secs: 5.0,
        size: 1024 * MIB,
        dir: PathBuf::from("/var/tmp"),
        only: Vec::new(),
        other_env: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--compare-engines" {
            a.other_env = Some(("CAPVM_BLK_IO".into(), other_engine().into()));
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => a.rounds = value.parse::<usize>()?.max(1),
            "--secs" => a.secs = value.parse()?,
            "--size-mib" => a.size = value.parse::<u64>()? * MIB,
            "--dir" => a.dir = PathBuf::from(value),
            "--only" => a.only = value.split(',').map(str::to_owned).collect(),
            "--compare-env" => {
                let (k, v) = value.split_once('=').context("--compare-env VAR=VALUE")?;
                a.other_env = Some((k.to_owned(), v.to_owned()));
            }
            other => bail!("unknown option {other}"),
        }
    }
    Ok(a)
}

/// Where request `n` of a workload goes: sequential wraps around the file, random is a
/// block-aligned xorshift.
fn offset(w: Workload, n: u64, size: u64) -> u64 {
    let blocks = size / w.block;
    if w.random {
        let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDEAD_BEEF;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * w.block
    } else {
        (n % blocks) * w.block
    }
}

fn o_direct(path: &std::path::Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .with_context(|| format!("open {} with O_DIRECT", path.display()))
}

/// Host baseline: `DEPTH` threads, each with one aligned buffer, until the deadline.
/// Returns the rate and the requests completed.
fn run_host(
    path: &std::path::Path,
    w: Workload,
    size: u64,
    secs: f64,
) -> anyhow::Result<(f64, u64)> {
    let file = Arc::new(o_direct(path)?);
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut threads = Vec::new();
    for _ in 0..DEPTH {
        let (file, counter) = (Arc::clone(&file), Arc::clone(&counter));
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            let len = usize::try_from(w.block).expect("block");
            let mut raw = vec![0x5au8; len + 4096];
            let skew = raw.as_ptr().align_offset(4096);
            let buf = &mut raw[skew..skew + len];
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let off = offset(w, n, size);
                if w.write {
                    file.write_all_at(buf, off)?;
                } else {
                    file.read_exact_at(buf, off)?;
                }
            }
            Ok(())
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("host thread panicked"))??;
    }
    let done = counter.load(Ordering::Relaxed).saturating_sub(DEPTH as u64);
    Ok((rate(w, done, start.elapsed()), done))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn rate(w: Workload, done: u64, took: Duration) -> f64 {
    let per_s = done as f64 / took.as_secs_f64();
    if w.random {
        per_s
    } else {
        per_s * w.block as f64 / 1e6
    }
}

struct DevBlk {
    log: tempfile::NamedTempFile,
    running: supervisor::spawn::Running,
    _runner: Channel,
    ram: GuestRam,
    queue: SplitQueue,
}

impl DevBlk {
    fn start(path: &std::path::Path) -> anyhow::Result<DevBlk> {
        let ram = GuestRam::new(RAM)?;
        let disk = o_direct(path)?;
        let log = tempfile::NamedTempFile::new()?;
        let (runner, theirs) = Channel::pair()?;
        let (uid, gid) = sandbox::nobody();
        let boot = Bootstrap {
            role: Role::DevBlk { index: 0 },
            vm_name: "bench-blk".into(),
            sandbox: SandboxSettings {
                uid,
                gid,
                max_fds: 64,
            },
            fds: vec![
                FdRole::Log,
                FdRole::GuestMemory,
                FdRole::Disk,
                FdRole::DeviceChannel,
            ],
            log_filter: "info".into(),
        };
        let bin = supervisor::spawn::binary_path("dev-blk");
        let running = supervisor::spawn::spawn(
            &bin,
            &boot,
            &[
                log.as_file().as_fd(),
                ram.fd(),
                disk.as_fd(),
                theirs.as_fd(),
            ],
        )
        .with_context(|| format!("spawn {}", bin.display()))?;
        drop(theirs);
        let setup = DeviceSetup::Block(BlockSetup {
            memory: vec![MemoryRegion {
                guest_addr: 0,
                size: RAM,
                file_offset: 0,
            }],
            read_only: false,
            logical_block_size: 512,
            serial: "bench".into(),
            queues: 1,
        });
        running.channel.send(&setup, &[])?;
        runner.handshake_timeout(ChannelKind::RunnerDevice, WAIT)?;
        let FromDevice::Info(info) = runner.recv_timeout::<FromDevice>(WAIT)?.msg else {
            bail!("dev-blk did not send Info");
        };
        let mut queue = SplitQueue::new(&ram, 0x1000, 128)?;
        queue.set_event_idx(info.features & (1 << 29) != 0);
        let (msg, fds) = activation(info.features, [(0, &queue)]);
        runner.send(&msg, &fds)?;
        let reply = runner.recv_timeout::<FromDevice>(WAIT)?.msg;
        if reply != FromDevice::Activated {
            bail!("activation failed: {reply:?}");
        }
        Ok(DevBlk {
            log,
            running,
            _runner: runner,
            ram,
            queue,
        })
    }

    /// Guest addresses of slot `s`: header, status, data (1 MiB each, page aligned).
    fn slot(s: usize) -> (u64, u64, u64) {
        let s = s as u64;
        (0x8000 + s * 16, 0x9000 + s, 16 * MIB + s * MIB)
    }

    /// Writes the header of slot `s` and publishes its chain (descriptors 3s..3s+2).
    fn issue(&mut self, w: Workload, s: usize, n: u64, size: u64) {
        let (hdr, status, data) = Self::slot(s);
        let kind = if w.write { T_OUT } else { T_IN };
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&(offset(w, n, size) / 512).to_le_bytes());
        self.ram.write(hdr, &h);
        let len = u32::try_from(w.block).expect("block");
        let bufs = [
            Buf::out(hdr, 16),
            Buf {
                addr: data,
                len,
                write: !w.write,
            },
            Buf::input(status, 1),
        ];
        let first = u16::try_from(s * 3).expect("slot");
        let head = self.queue.add_chain_at(&self.ram, first, &bufs);
        self.queue.publish(&self.ram, head);
    }

    fn run(&mut self, w: Workload, size: u64, secs: f64) -> anyhow::Result<(f64, u64)> {
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let mut issued = 0u64;
        for s in 0..DEPTH {
            self.issue(w, s, issued, size);
            issued += 1;
        }
        self.queue.notify(&self.ram);
        let mut done = 0u64;
        let mut outstanding = DEPTH;
        while outstanding > 0 {
            let used = self
                .queue
                .wait_some(&self.ram, WAIT)
                .map_err(anyhow::Error::msg)?;
            let (_, status_base, _) = Self::slot(0);
            let statuses = self.ram.read(status_base, DEPTH);
            for u in &used {
                let s = usize::from(u16::try_from(u.id)?) / 3;
                match statuses.get(s) {
                    Some(0) => {}
                    other => bail!("request in slot {s} failed with status {other:?}"),
                }
                done += 1;
                if Instant::now() < deadline {
                    self.issue(w, s, issued, size);
                    issued += 1;
                } else {
                    outstanding -= 1;
                }
            }
            if Instant::now() < deadline || outstanding > 0 {
                self.queue.notify(&self.ram);
            }
        }
        Ok((rate(w, done, start.elapsed()), done))
    }

    /// utime + stime of the whole dev-blk process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        process_ticks(&format!("/proc/{}/stat", self.running.process.id()))
    }

    fn rss_kib(&self) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.running.process.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("RssAnon:"), field("VmRSS:"))
    }
}

/// Context switches (voluntary and not) of every thread of process `pid` (`self` too).
fn switches(pid: &str) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .map(|t| {
            let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// utime + stime of the process whose `stat` file is `path`, in clock ticks.
fn process_ticks(path: &str) -> u64 {
    let stat = fs::read_to_string(path).unwrap_or_default();
    // Fields after the ")" that ends the command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// One round of one workload: the host's run, then dev-blk's.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    host: f64,
    dev_blk: f64,
    /// The second dev-blk's rate and CPU per request (`--compare-engines`).
    other: f64,
    other_us: f64,
    /// CPU per request, µs: the host's threads, dev-blk, the driver.
    host_us: f64,
    dev_blk_us: f64,
    driver_us: f64,
    /// Per request: context switches of dev-blk and the driver, kicks, interrupts.
    switches: f64,
    kicks: f64,
    interrupts: f64,
}

fn measure(
    dev: &mut DevBlk,
    other: Option<&mut DevBlk>,
    image: &std::path::Path,
    w: Workload,
    args: &Args,
) -> anyhow::Result<Round> {
    // Clock ticks are 10 ms (USER_HZ 100).
    let us_per = |ticks: u64, requests: u64| ticks as f64 * 10_000.0 / requests.max(1) as f64;
    let per = |n: u64, requests: u64| n as f64 / requests.max(1) as f64;
    let me = "/proc/self/stat";
    let dev_pid = dev.running.process.id().to_string();

    let before = process_ticks(me);
    let (host, requests) = run_host(image, w, args.size, args.secs)?;
    let host_us = us_per(process_ticks(me).saturating_sub(before), requests);

    // While dev-blk runs, this process runs only the driver (the host threads ended).
    let (cpu, driver) = (dev.cpu_ticks(), process_ticks(me));
    let switched = switches(&dev_pid) + switches("self");
    let (kicks, interrupts) = (dev.queue.kicks(), dev.queue.interrupts());
    let (dev_blk, requests) = dev.run(w, args.size, args.secs).map_err(|e| {
        let log = fs::read_to_string(dev.log.path()).unwrap_or_default();
        e.context(format!("{}; dev-blk log:\n{log}", w.name))
    })?;
    let dev_blk_us = us_per(dev.cpu_ticks().saturating_sub(cpu), requests);
    let driver_us = us_per(process_ticks(me).saturating_sub(driver), requests);
    let (mut other_rate, mut other_us) = (0.0, 0.0);
    if let Some(o) = other {
        let cpu = o.cpu_ticks();
        let (rate, requests) = o.run(w, args.size, args.secs)?;
        other_rate = rate;
        other_us = us_per(o.cpu_ticks().saturating_sub(cpu), requests);
    }
    Ok(Round {
        host,
        dev_blk,
        other: other_rate,
        other_us,
        host_us,
        dev_blk_us,
        driver_us,
        switches: per(
            (switches(&dev_pid) + switches("self")).saturating_sub(switched),
            requests,
        ),
        kicks: per(dev.queue.kicks().saturating_sub(kicks), requests),
        interrupts: per(dev.queue.interrupts().saturating_sub(interrupts), requests),
    })
}

/// Prints the medians of `rounds` of `w`; returns dev-blk's ratio to the host.
/// `other` names what the second dev-blk ran with (`--compare-env`), if there was one.
fn report(w: Workload, rounds: &[Round], other: Option<&(String, String)>) -> f64 {
    let med = |f: fn(&Round) -> f64| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    let (host, ours) = (med(|r| r.host), med(|r| r.dev_blk));
    let ratio = ours / host;
    let unit = if w.random { "IOPS" } else { "MB/s" };
    println!(
        "MEASURE {:<14} host {host:>10.1} {unit}  dev-blk {ours:>10.1} {unit}  ratio {:>5.1}%  \
         dev-blk CPU {:>5.1} us/request  driver {:>4.1}  host {:>4.1} us/request  \
         switches {:>4.2}  kicks {:>4.2}  interrupts {:>4.2} /request",
        w.name,
        ratio * 100.0,
        med(|r| r.dev_blk_us),
        med(|r| r.driver_us),
        med(|r| r.host_us),
        med(|r| r.switches),
        med(|r| r.kicks),
        med(|r| r.interrupts),
    );
    if let Some((key, value)) = other {
        let other = med(|r| r.other);
        println!(
            "MEASURE {:<14} other ({key}={value}) {other:>10.1} {unit}  ratio {:>5.1}%  CPU {:>5.1} us/request",
            w.name,
            other / host * 100.0,
            med(|r| r.other_us),
        );
    }
    ratio
}

/// The engine the second dev-blk of `--compare-engines` runs: the one the first does not.
fn other_engine() -> &'static str {
    if std::env::var("CAPVM_BLK_IO").is_ok_and(|v| v == "uring") {
        "threads"
    } else {
        "uring"
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("bench_blk needs root (dev-blk's sandbox unshares namespaces and switches uid)");
    }
    let image = tempfile::NamedTempFile::new_in(&args.dir)?;
    let chunk = vec![0xa5u8; usize::try_from(MIB)?];
    for i in 0..args.size / MIB {
        image.as_file().write_all_at(&chunk, i * MIB)?;
    }
    image.as_file().sync_all()?;
    println!(
        "image: {} MiB in {}; queue depth {DEPTH}; {} s per run",
        args.size / MIB,
        args.dir.display(),
        args.secs
    );
    let mut dev = DevBlk::start(image.path())?;
    let mut other = if let Some((key, value)) = &args.other_env {
        let before = std::env::var_os(key);
        // SAFETY: the bench has no other thread yet, so nothing reads the environment
        // concurrently; the variable is restored right after the spawn.
        unsafe { std::env::set_var(key, value) };
        let started = DevBlk::start(image.path());
        match before {
            // SAFETY: as above.
            Some(v) => unsafe { std::env::set_var(key, v) },
            // SAFETY: as above.
            None => unsafe { std::env::remove_var(key) },
        }
        Some(started?)
    } else {
        None
    };
    let chosen: Vec<Workload> = WORKLOADS
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|n| n == w.name))
        .collect();
    // Host and dev-blk alternate, round after round, so that load from elsewhere on the
    // machine hits both alike; each figure is the median of its rounds.
    let mut rounds = vec![Vec::new(); chosen.len()];
    for _ in 0..args.rounds {
        for (w, done) in chosen.iter().zip(&mut rounds) {
            done.push(measure(&mut dev, other.as_mut(), image.path(), *w, &args)?);
        }
    }
    let worst = chosen
        .iter()
        .zip(&rounds)
        .map(|(w, r)| report(*w, r, args.other_env.as_ref()))
        .fold(f64::INFINITY, f64::min);
    let (anon, rss) = dev.rss_kib();
    println!(
        "dev-blk RSS: {rss} KiB total (anonymous {anon} KiB; the rest is mapped guest RAM and code)"
    );
    println!("worst ratio: {:.1}% (target >= 90%)", worst * 100.0);
    Ok(())
}
