//! End-to-end crash isolation (issue 8) with real kit guests under `vm start -f`, on a switch
//! inside a network namespace the test creates (`198.18.9.0/24`, `198.18.10.0/24`).
//!
//! - `a_dev_net_killed_three_times_keeps_pings_and_a_tcp_stream`: the guest pings the host's
//!   bridge address every 10 ms while the host streams random bytes to it over TCP; dev-net
//!   gets SIGKILL three times. Each time the supervisor restarts it, the host sees the guest's
//!   echo requests again within one second of the kill (five inside the emulated test host,
//!   where the respawn alone takes up to two; a raw ICMP socket in the namespace
//!   timestamps them), the guest's ping gets replies again, the stream's SHA-256 on the guest
//!   is the host's, and `vm info` counts the restarts.
//! - `a_killed_vcpu_runner_stops_the_guest_and_leaves_nothing_behind`: the guest writes random
//!   files to an ext4 disk the host made, `sync`s after each and prints its md5 on the console;
//!   the vcpu-runner gets SIGKILL. The supervisor ends the guest (`on_fault="stop"`): `vm list`
//!   and `vm info` say stopped, no process of the guest is left, no tap, the lock is free; the
//!   image's file system is clean (`e2fsck -fn` after the journal replay any mount does), and
//!   a fresh `vm start` of the same guest mounts it and reads back every file whose md5 was
//!   printed. Then, with `on_fault="restart"`, a second runner kill boots the guest again.
//!
//! Each test boots one or two guests (about 30 s each inside the emulated test host, where
//! they are opt-in: `CAPVM_E2E_NESTED_PCI=1`). Binaries: this build's `target/<profile>`
//! (`cargo build --release` first).

// Counts and rates are far below 2^52: the casts to f64 lose nothing that matters.
#![allow(clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tests::harness::{self, E2e, Needs};
use tests::launcher::{CapvmLauncher, GuestSpec, LaunchError, Launcher};
use tests::netns::{InNetns, Netns, args, guest_ifup, sh};
use tests::procfs;
use tests::testvm::TestVm;

const BOOT_TIMEOUT: Duration = Duration::from_mins(5);
const CMD_TIMEOUT: Duration = Duration::from_mins(3);
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;
const MAC: &str = "58:9c:fc:0a:09:01";
/// How soon after a dev-net kill the guest's pings must reach the host again (issue 8).
const RESUME_LIMIT: Duration = Duration::from_secs(1);
/// The same inside the emulated test host, where everything runs under TCG: there the
/// supervisor's respawn of dev-net alone (fork, sandbox, setup) took 0.5 to 1.7 s in a run
/// where the host was busy (`vm-bhyve.log`'s "restarted (..., N ms)"), against 3.5 to 10 ms
/// directly on the host (`scripts/bench-restart.sh`), and the guest's ping sends about 7
/// requests a second instead of 100.
const RESUME_LIMIT_EMULATED: Duration = Duration::from_secs(5);

/// [`RESUME_LIMIT`], or [`RESUME_LIMIT_EMULATED`] inside the emulated test host.
fn resume_limit() -> Duration {
    if std::env::var_os("CAPVM_IN_TESTHOST").is_some() {
        RESUME_LIMIT_EMULATED
    } else {
        RESUME_LIMIT
    }
}
/// The guest's ping interval, and how many pings in a row may go unanswered across a kill.
const PING_INTERVAL_MS: u64 = 10;
const MAX_LOST_PINGS: u32 = 100;
const KILLS: usize = 3;

fn main() -> ExitCode {
    // SAFETY: single-threaded here, before the harness starts any thread.
    unsafe { std::env::set_var("CAPVM_LIBEXEC", tests::harness::build_dir()) };
    let minutes = Duration::from_mins;
    harness::main(&[
        E2e {
            name: "parsers_read_pings_synced_lines_and_echo_requests",
            needs: Needs::Nothing,
            timeout: minutes(1),
            run: parsers,
        },
        E2e {
            name: "a_dev_net_killed_three_times_keeps_pings_and_a_tcp_stream",
            needs: Needs::Kvm,
            timeout: minutes(12),
            run: dev_net_killed,
        },
        E2e {
            name: "a_killed_vcpu_runner_stops_the_guest_and_leaves_nothing_behind",
            needs: Needs::Kvm,
            timeout: minutes(25),
            run: runner_killed,
        },
    ])
}

fn kit_spec() -> anyhow::Result<GuestSpec> {
    Ok(tests::kit::agent_guest(CPUS, MEMORY_MIB)?)
}

/// Starts a guest and waits for the kit's ready marker.
fn start(launcher: &dyn Launcher, name: &str) -> anyhow::Result<TestVm> {
    let mut vm = TestVm::start(launcher, &kit_spec()?)?;
    let booted = vm
        .wait_ready(BOOT_TIMEOUT)
        .map_err(|e| with_logs(&vm, name, &e.into()))?;
    println!(
        "MEASURE crash boot wall_to_ready_s={:.1} uptime_s={:.2}",
        booted.wall.as_secs_f64(),
        booted.ready.uptime_s
    );
    Ok(vm)
}

fn guest_dir(workdir: &Path, name: &str) -> PathBuf {
    workdir.join("vms").join(name)
}

/// `e` with the guest's console and its processes' logs.
fn with_logs(vm: &TestVm, name: &str, e: &anyhow::Error) -> anyhow::Error {
    vm.with_logs(
        name,
        &[
            "vm-bhyve.log",
            "vcpu-runner.log",
            "dev-net0.log",
            "dev-blk0.log",
        ],
        e,
    )
}

/// Runs `command` in the guest; it must exit 0. Returns its output, trimmed.
fn run_ok(vm: &mut TestVm, command: &str) -> anyhow::Result<String> {
    vm.run_ok(command, CMD_TIMEOUT)
}

/// The foreground supervisor's pid: the `vm` child of the fixture's `timeout`.
fn supervisor_of(vm: &TestVm) -> anyhow::Result<u32> {
    procfs::children_named(vm.pid(), "vm")
        .first()
        .copied()
        .with_context(|| format!("no vm process under {}", vm.pid()))
}

/// The only live child named `comm` of `supervisor`.
fn only_child(supervisor: u32, comm: &str) -> anyhow::Result<u32> {
    let pids = procfs::children_named(supervisor, comm);
    match pids.as_slice() {
        [pid] => Ok(*pid),
        _ => bail!("expected one {comm} under {supervisor}, found {pids:?}"),
    }
}

fn sigkill(pid: u32) -> anyhow::Result<()> {
    kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL)
        .with_context(|| format!("SIGKILL to {pid}"))
}

/// Waits until `vm-bhyve.log` holds `needle` at least `count` times; returns the log.
fn wait_log(dir: &Path, needle: &str, count: usize, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = fs::read_to_string(dir.join("vm-bhyve.log")).unwrap_or_default();
        if log.matches(needle).count() >= count {
            return Ok(log);
        }
        ensure!(
            Instant::now() < deadline,
            "vm-bhyve.log has {needle:?} fewer than {count} times after {timeout:?}:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// dev-net

const NET_NAME: &str = "nk";
const NET_HOST4: &str = "198.18.9.1";
const NET_GUEST4: &str = "198.18.9.2";
const STREAM_PORT: u16 = 5002;
/// The host writes the stream in chunks of this size with a pause after each, so that it runs
/// across all the kills however fast the guest takes it.
const STREAM_CHUNK: usize = 16 << 10;
const STREAM_PAUSE: Duration = Duration::from_millis(5);

/// Echo requests from the guest as the host's kernel received them: when, and their sequence
/// number.
type Requests = Arc<Mutex<Vec<(Instant, u16)>>>;

/// Reads the guest's ICMP echo requests from a raw socket inside the namespace until `stop`.
fn watch_echo_requests(
    ns: &Netns,
    stop: Arc<AtomicBool>,
) -> (Requests, thread::JoinHandle<anyhow::Result<()>>) {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt,
    };
    let seen: Requests = Arc::default();
    let out = Arc::clone(&seen);
    let guest: std::net::Ipv4Addr = NET_GUEST4
        .parse()
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let handle = ns.spawn(move || {
        let sock = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
        .context("raw ICMP socket")?;
        setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let n = match nix::sys::socket::recv(
                sock.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let at = Instant::now();
            if let Some(seq) = echo_request_seq(buf.get(..n).unwrap_or_default(), guest)
                && let Ok(mut list) = out.lock()
            {
                list.push((at, seq));
            }
        }
        Ok(())
    });
    (seen, handle)
}

/// The sequence number of an IPv4 ICMP echo request from `from`, if `packet` is one.
fn echo_request_seq(packet: &[u8], from: std::net::Ipv4Addr) -> Option<u16> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let src = packet.get(12..16)?;
    if src != from.octets() {
        return None;
    }
    let icmp = packet.get(ihl..)?;
    (icmp.first() == Some(&8)).then_some(())?;
    Some(u16::from_be_bytes([*icmp.get(6)?, *icmp.get(7)?]))
}

/// The guest's `replies gap last` line: how many replies its ping got, the longest run of
/// sequence numbers without one, and the last answered.
fn ping_summary(line: &str) -> Option<(u32, u32, u32)> {
    let mut words = line.split_whitespace().map(str::parse::<u32>);
    let summary = (
        words.next()?.ok()?,
        words.next()?.ok()?,
        words.next()?.ok()?,
    );
    words.next().is_none().then_some(summary)
}

fn dev_net_killed() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    let ns = Netns::new("netkill")?;
    let launcher = InNetns {
        inner: CapvmLauncher::new(NET_NAME),
        ns: &ns,
        switches: vec![args(&[
            "switch",
            "create",
            "-a",
            &format!("{NET_HOST4}/24"),
            "public",
        ])],
        conf: format!(
            "network0_type=\"virtio-net\"\nnetwork0_switch=\"public\"\nnetwork0_mac=\"{MAC}\"\n"
        ),
    };
    let mut vm = start(&launcher, NET_NAME)?;
    let result = dev_net_killed_checks(&ns, &mut vm).map_err(|e| with_logs(&vm, NET_NAME, &e));
    let stopped = vm.stop(Duration::from_mins(1));
    result?;
    stopped?;
    Ok(())
}

fn dev_net_killed_checks(ns: &Netns, vm: &mut TestVm) -> anyhow::Result<()> {
    let dir = guest_dir(vm.workdir(), NET_NAME);
    let supervisor = supervisor_of(vm)?;
    guest_ifup(vm, MAC, &[&format!("{NET_GUEST4}/24")])?;
    run_ok(vm, &format!("ping -c 1 -W 5 {NET_HOST4}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let (requests, watcher) = watch_echo_requests(ns, Arc::clone(&stop));
    run_ok(
        vm,
        &format!("(nc -l -p {STREAM_PORT} | sha256sum > /tmp/stream.sum) >/dev/null 2>&1 &"),
    )?;
    run_ok(
        vm,
        &format!(
            "(ping -i 0.{PING_INTERVAL_MS:02} {NET_HOST4} > /tmp/ping.log 2>&1 &) >/dev/null 2>&1"
        ),
    )?;
    let sent = tempfile::NamedTempFile::new()?;
    let sender = stream_to_guest(ns, sent.path().to_owned(), Arc::clone(&stop));

    // Pings flow before the first kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    while requests.lock().map_or(0, |r| r.len()) < 20 {
        ensure!(
            Instant::now() < deadline,
            "the host saw fewer than 20 echo requests in 30 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let first_seen = requests.lock().map_or(0, |r| r.len());
    let started = Instant::now();

    let mut resumes = Vec::new();
    for k in 1..=KILLS {
        thread::sleep(Duration::from_millis(1500));
        ensure!(
            !sender.is_finished(),
            "the TCP stream ended before kill {k}"
        );
        let pid = only_child(supervisor, "dev-net")?;
        let killed_at = Instant::now();
        sigkill(pid)?;
        wait_log(&dir, "dev-net0 restarted", k, Duration::from_secs(10))?;
        let deadline = killed_at + Duration::from_secs(10);
        let resumed = loop {
            let next = requests
                .lock()
                .ok()
                .and_then(|r| r.iter().find(|(at, _)| *at > killed_at).copied());
            if let Some((at, seq)) = next {
                break (at.duration_since(killed_at), seq);
            }
            ensure!(
                Instant::now() < deadline,
                "no echo request reached the host within 10 s of kill {k}"
            );
            thread::sleep(Duration::from_millis(5));
        };
        println!(
            "MEASURE crash dev_net kill={k} first_echo_request_after_ms={:.1} seq={}",
            resumed.0.as_secs_f64() * 1000.0,
            resumed.1
        );
        resumes.push(resumed);
    }
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let sent_bytes = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))??;
    watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the ICMP watcher panicked"))??;
    let seen = requests.lock().map(|r| r.clone()).unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "MEASURE crash dev_net echo_requests_seen={} per_s={:.1} stream_bytes={sent_bytes}",
        seen.len(),
        (seen.len().saturating_sub(first_seen)) as f64 / secs
    );

    guest_saw_everything(vm, sent.path(), sent_bytes, &resumes)?;
    restarts_logged(vm)
}

/// The guest's side: the stream arrived whole, the pings got replies across every kill
/// (`resumes`: when and with which sequence number the host saw each kill's first request).
fn guest_saw_everything(
    vm: &mut TestVm,
    sent: &Path,
    sent_bytes: u64,
    resumes: &[(Duration, u16)],
) -> anyhow::Result<()> {
    let want = sh(Command::new("sha256sum").arg(sent))?;
    let want = want
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let deadline = Instant::now() + Duration::from_mins(2);
    let got = loop {
        let sum = run_ok(vm, "cat /tmp/stream.sum 2>/dev/null || true")?;
        if !sum.is_empty() || Instant::now() > deadline {
            break sum;
        }
        thread::sleep(Duration::from_millis(500));
    };
    ensure!(
        got.split_whitespace().next() == Some(want.as_str()),
        "the guest's SHA-256 of the stream across {KILLS} dev-net kills {got:?} is not the host's {want} ({sent_bytes} bytes sent)"
    );
    run_ok(vm, "killall ping; sleep 1; true")?;
    // The guest sums its ping log up itself: the whole log through the emulated console of
    // the test host took over three minutes once. Out: replies, longest unanswered run, last
    // sequence number answered.
    let summary = run_ok(
        vm,
        "awk -F'seq=' 'NF > 1 { split($2, a, \" \"); s = a[1] + 0; \
         if (n && s - p - 1 > g) g = s - p - 1; p = s; n++ } \
         END { print n + 0, g + 0, p + 0 }' /tmp/ping.log",
    )?;
    let (replies, gap, last) =
        ping_summary(&summary).with_context(|| format!("the guest's ping summary {summary:?}"))?;
    let last_resume_seq = resumes.last().map_or(0, |r| u32::from(r.1));
    println!(
        "MEASURE crash dev_net guest_replies={replies} longest_unanswered_run={gap} (x {PING_INTERVAL_MS} ms) last_seq={last}"
    );
    ensure!(
        last >= last_resume_seq,
        "the guest's ping got no reply after the last kill (request seq {last_resume_seq}, last \
         reply {last})"
    );
    ensure!(
        gap <= MAX_LOST_PINGS,
        "{gap} pings in a row went unanswered across a dev-net kill (limit {MAX_LOST_PINGS})"
    );
    let limit = resume_limit();
    for (k, (after, _)) in resumes.iter().enumerate() {
        ensure!(
            *after <= limit,
            "after kill {} the guest's pings reached the host again only after {after:?} (limit \
             {limit:?})",
            k + 1
        );
    }

    Ok(())
}

/// The supervisor said why dev-net0 died each time, and `vm info` counts the restarts.
fn restarts_logged(vm: &TestVm) -> anyhow::Result<()> {
    let dir = guest_dir(vm.workdir(), NET_NAME);
    let log = fs::read_to_string(dir.join("vm-bhyve.log"))?;
    ensure!(
        log.lines()
            .filter(|l| l.contains("dev-net0 (pid") && l.contains("died: killed by SIGKILL"))
            .count()
            >= KILLS,
        "vm-bhyve.log does not say dev-net0 died of SIGKILL {KILLS} times:\n{log}"
    );
    let info = sh(CapvmLauncher::new(NET_NAME)
        .vm_command(vm.workdir())
        .args(["info", NET_NAME]))?;
    ensure!(
        info.lines().any(|l| l.contains("process: dev-net0")
            && l.trim_end().ends_with(&format!("restarts {KILLS}"))),
        "vm info does not show dev-net0 with {KILLS} restarts:\n{info}"
    );
    Ok(())
}

/// Connects to the guest's `nc -l` from inside the namespace and writes random bytes (also
/// to `copy`) until `stop`; returns how many it wrote.
fn stream_to_guest(
    ns: &Netns,
    copy: PathBuf,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<anyhow::Result<u64>> {
    let target = format!("{NET_GUEST4}:{STREAM_PORT}");
    ns.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stream = loop {
            match TcpStream::connect(&target) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
                Err(e) => bail!("connecting to {target}: {e}"),
            }
        };
        let mut file = fs::File::create(&copy)?;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(std::process::id());
        let mut chunk = vec![0u8; STREAM_CHUNK];
        let mut total = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for b in &mut chunk {
                // xorshift64: enough to make every byte of the stream matter.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state.to_le_bytes()[0];
            }
            stream.write_all(&chunk)?;
            file.write_all(&chunk)?;
            total = total.saturating_add(u64::try_from(chunk.len())?);
            thread::sleep(STREAM_PAUSE);
        }
        stream.shutdown(Shutdown::Write)?;
        file.sync_all()?;
        Ok(total)
    })
}

// ---------------------------------------------------------------------------------------------
// vcpu-runner

const RUN_NAME: &str = "rk";
const RUN_HOST4: &str = "198.18.10.1";
const DISK_BYTES: u64 = 64 << 20;
/// Files the guest must have synced (and printed) before the runner is killed.
const SYNCED_BEFORE_KILL: u32 = 4;

/// [`InNetns`] plus an ext4 image, made on the host, as `disk0`.
#[derive(Debug)]
struct WithExt4<'a> {
    inner: InNetns<'a>,
}

impl Launcher for WithExt4<'_> {
    fn name(&self) -> String {
        "capvm".to_owned()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let command = self.inner.command(spec, workdir)?;
        let image = guest_dir(workdir, RUN_NAME).join("disk0.img");
        let prepare = |result: std::io::Result<()>| {
            result.map_err(|source| LaunchError::Prepare {
                path: image.clone(),
                source,
            })
        };
        prepare(fs::File::create(&image).and_then(|f| f.set_len(DISK_BYTES)))?;
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "capvm-crash"])
            .arg(&image)
            .output()
            .map_err(|source| LaunchError::Spawn {
                program: "mkfs.ext4".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(LaunchError::Setup {
                command: "mkfs.ext4".into(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(command)
    }
}

/// `vm start -f NAME` of a guest that already exists in the datastore under `workdir`.
#[derive(Debug)]
struct Existing<'a> {
    ns: &'a Netns,
    workdir: PathBuf,
}

impl Launcher for Existing<'_> {
    fn name(&self) -> String {
        "capvm".to_owned()
    }

    fn command(&self, _spec: &GuestSpec, _workdir: &Path) -> Result<Command, LaunchError> {
        let launcher = InNetns {
            inner: CapvmLauncher::new(RUN_NAME),
            ns: self.ns,
            switches: Vec::new(),
            conf: String::new(),
        };
        let mut start = launcher.inner.vm_command(&self.workdir);
        start.args(["start", "-f", RUN_NAME]);
        Ok(launcher.in_ns(&start))
    }
}

fn runner_killed() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    which("mkfs.ext4")?;
    which("e2fsck")?;
    which("debugfs")?;
    let ns = Netns::new("runkill")?;
    let launcher = WithExt4 {
        inner: InNetns {
            inner: CapvmLauncher::new(RUN_NAME),
            ns: &ns,
            switches: vec![args(&[
                "switch",
                "create",
                "-a",
                &format!("{RUN_HOST4}/24"),
                "public",
            ])],
            conf: format!(
                "disk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"\n\
                 network0_type=\"virtio-net\"\nnetwork0_switch=\"public\"\nnetwork0_mac=\"{MAC}\"\n"
            ),
        },
    };
    let mut first = start(&launcher, RUN_NAME)?;
    let synced =
        runner_killed_first_boot(&ns, &mut first).map_err(|e| with_logs(&first, RUN_NAME, &e))?;
    let workdir = first.workdir().to_owned();
    let dir = guest_dir(&workdir, RUN_NAME);
    fsck_after_crash(&dir.join("disk0.img"), &synced)?;

    // A fresh boot of the same guest (its lock was released), now with on_fault="restart".
    let conf = dir.join(format!("{RUN_NAME}.conf"));
    let text = fs::read_to_string(&conf)?;
    let mut text = text
        .lines()
        .filter(|l| !l.starts_with("on_fault="))
        .fold(String::new(), |text, l| text + l + "\n");
    text.push_str("on_fault=\"restart\"\n");
    fs::write(&conf, text)?;
    let mut second = start(
        &Existing {
            ns: &ns,
            workdir: workdir.clone(),
        },
        RUN_NAME,
    )
    .map_err(|e| e.context("the fresh boot after the runner's kill"))?;
    let result = runner_killed_second_boot(&mut second, &dir, &synced)
        .map_err(|e| with_logs(&second, RUN_NAME, &e));
    let stopped = second.stop(Duration::from_mins(1));
    result?;
    stopped?;
    let taps = wait_no_taps(&ns)?;
    ensure!(
        taps.is_empty(),
        "taps left after the guest stopped: {taps:?}"
    );
    drop(first);
    Ok(())
}

fn which(program: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()?
        .status
        .success();
    if found {
        Ok(())
    } else {
        Err(harness::skip(format!(
            "{program} not found (apt-get install e2fsprogs)"
        )))
    }
}

/// The first boot: write and sync files, kill the runner, check what is left. Returns the md5
/// of every file the guest reported synced, by file number.
fn runner_killed_first_boot(ns: &Netns, vm: &mut TestVm) -> anyhow::Result<BTreeMap<u32, String>> {
    let dir = guest_dir(vm.workdir(), RUN_NAME);
    let supervisor = supervisor_of(vm)?;
    run_ok(vm, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")?;
    let taps = ns.links_named("capvm-tap")?;
    ensure!(taps.len() == 1, "expected the guest's tap, found {taps:?}");
    // The guest answers after the mount (the lazy inode table init runs in the background).
    run_ok(vm, "sync; echo mounted")?;
    // File i: (i % 8 + 1) random 4 KiB blocks, synced, then its md5 on the console. The
    // background loop writes to /dev/console so the host sees each line as it happens; no
    // agent command runs while it does.
    run_ok(
        vm,
        "(i=1; while :; do dd if=/dev/urandom of=/mnt/f$i bs=4k count=$((i%8+1)) 2>/dev/null; \
         sync; echo CRASH-SYNCED $i $(md5sum </mnt/f$i) >/dev/console; i=$((i+1)); done) \
         >/dev/null 2>&1 &",
    )?;
    vm.wait_for_line(
        &format!("CRASH-SYNCED {SYNCED_BEFORE_KILL} "),
        Duration::from_mins(5),
    )?;
    // Mid-write: the next file is being written when the runner dies.
    thread::sleep(Duration::from_millis(300));
    let mut family = procfs::descendants(supervisor);
    family.push(supervisor);
    let runner = only_child(supervisor, "vcpu-runner")?;
    for comm in ["dev-blk", "dev-net"] {
        only_child(supervisor, comm)?;
    }
    let killed_at = Instant::now();
    sigkill(runner)?;
    let status = vm.wait_exit(Duration::from_mins(1))?;
    println!(
        "MEASURE crash runner_kill supervisor_exit_ms={} status={status}",
        killed_at.elapsed().as_millis()
    );

    // What the guest printed (so had synced) before it died.
    let console = fs::read_to_string(vm.workdir().join("console.log"))?;
    let synced = synced_files(&console);
    ensure!(
        synced.len() >= usize::try_from(SYNCED_BEFORE_KILL)?,
        "only {} synced files on the console",
        synced.len()
    );

    // Nothing of the guest is left: processes, taps, lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = family
            .iter()
            .copied()
            .filter(|&p| procfs::alive(p))
            .collect();
        if alive.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "processes of the guest outlived its runner: {:?}",
            alive
                .iter()
                .map(|&p| (p, procfs::field(p, "Name").unwrap_or_default()))
                .collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let taps = wait_no_taps(ns)?;
    ensure!(
        taps.is_empty(),
        "taps left after the runner's kill: {taps:?}"
    );
    let vm_cmd = || CapvmLauncher::new(RUN_NAME).vm_command(vm.workdir());
    let list = sh(vm_cmd().arg("list"))?;
    ensure!(
        list.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.first() == Some(&RUN_NAME) && words.contains(&"Stopped")
        }),
        "vm list does not show {RUN_NAME} stopped:\n{list}"
    );
    let info = sh(vm_cmd().args(["info", RUN_NAME]))?;
    ensure!(
        info.contains("  state: stopped"),
        "vm info does not say stopped:\n{info}"
    );
    // Why, and what on_fault did (the default, stop).
    let log = fs::read_to_string(dir.join("vm-bhyve.log"))?;
    for needle in [
        "vcpu-runner died: killed by SIGKILL",
        "exited (fault)",
        "taps closed",
    ] {
        ensure!(
            log.contains(needle),
            "vm-bhyve.log lacks {needle:?}:\n{log}"
        );
    }
    ensure!(
        !log.contains("restarting after the fault"),
        "on_fault=stop restarted the guest:\n{log}"
    );
    Ok(synced)
}

/// `CRASH-SYNCED N MD5 -` lines: file number to md5.
fn synced_files(console: &str) -> BTreeMap<u32, String> {
    console
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("CRASH-SYNCED ")?;
            let mut words = rest.split_whitespace();
            let n = words.next()?.parse().ok()?;
            let md5 = words.next()?;
            (md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| (n, md5.to_owned()))
        })
        .collect()
}

/// The taps left in `ns` after up to 5 s.
fn wait_no_taps(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let taps = ns.links_named("capvm-tap")?;
        if taps.is_empty() || Instant::now() > deadline {
            return Ok(taps);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `e2fsck -fn` on the image as the crash left it (printed: without the journal replay that
/// every mount does first, a crash-consistent image may still need it), then on a copy after
/// that replay: it must find nothing to fix, and every synced file must be there with the md5
/// the guest printed (read on the host with `debugfs`).
fn fsck_after_crash(image: &Path, synced: &BTreeMap<u32, String>) -> anyhow::Result<()> {
    let raw = Command::new("e2fsck").arg("-fn").arg(image).output()?;
    println!(
        "crash: e2fsck -fn on the image as left: {} (superblock summary counts are the kernel's \
         lazily kept ones)",
        raw.status
    );
    let copy = tempfile::NamedTempFile::new()?;
    fs::copy(image, copy.path())?;
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(copy.path())
        .output()?;
    // 0: nothing to do, 1: the journal was replayed.
    ensure!(
        matches!(replay.status.code(), Some(0 | 1)),
        "replaying the journal failed ({}): {}{}",
        replay.status,
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    let check = Command::new("e2fsck")
        .arg("-fn")
        .arg(copy.path())
        .output()?;
    ensure!(
        check.status.success(),
        "e2fsck -fn after the journal replay ({}): {}{}",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for (n, want) in synced {
        let file = Command::new("debugfs")
            .args(["-R", &format!("cat /f{n}")])
            .arg(copy.path())
            .output()?;
        let got = md5_hex(&file.stdout)?;
        ensure!(
            &got == want,
            "on the host, f{n} of the image has md5 {got}, the guest synced {want}"
        );
    }
    println!(
        "crash: e2fsck -fn after the journal replay: clean; the {} synced files are in the image",
        synced.len()
    );
    Ok(())
}

/// The md5 of `bytes` by the host's `md5sum`, as hex.
fn md5_hex(bytes: &[u8]) -> anyhow::Result<String> {
    let file = tempfile::NamedTempFile::new()?;
    fs::write(file.path(), bytes)?;
    let out = sh(Command::new("md5sum").arg(file.path()))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// The fresh boot: every synced file reads back; then a runner kill under `on_fault="restart"`
/// boots the guest again in place.
fn runner_killed_second_boot(
    vm: &mut TestVm,
    dir: &Path,
    synced: &BTreeMap<u32, String>,
) -> anyhow::Result<()> {
    let check_files = |vm: &mut TestVm| -> anyhow::Result<()> {
        run_ok(vm, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")?;
        let numbers: Vec<String> = synced.keys().map(u32::to_string).collect();
        let out = run_ok(
            vm,
            &format!(
                "for i in {}; do echo \"f$i $(md5sum < /mnt/f$i)\"; done",
                numbers.join(" ")
            ),
        )?;
        let got: BTreeMap<u32, String> = out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let n = w.next()?.strip_prefix('f')?.parse().ok()?;
                Some((n, w.next()?.to_owned()))
            })
            .collect();
        for (n, want) in synced {
            ensure!(
                got.get(n) == Some(want),
                "file f{n} reads back as {:?}, was synced as {want}",
                got.get(n)
            );
        }
        let errors = run_ok(vm, "dmesg | grep -i -E 'ext4.*error|I/O error' || true")?;
        ensure!(
            errors.is_empty(),
            "the guest kernel logged errors: {errors}"
        );
        Ok(())
    };
    check_files(vm)?;
    println!(
        "crash: all {} synced files read back after the runner's kill",
        synced.len()
    );

    // on_fault="restart": a killed runner boots the guest again under the same supervisor.
    let supervisor = supervisor_of(vm)?;
    let runner = only_child(supervisor, "vcpu-runner")?;
    sigkill(runner)?;
    wait_log(
        dir,
        "restarting after the fault (on_fault=restart)",
        1,
        Duration::from_secs(30),
    )?;
    vm.wait_ready(BOOT_TIMEOUT)?;
    let again = only_child(supervisor, "vcpu-runner")?;
    ensure!(again != runner, "the runner {runner} is still there");
    check_files(vm)?;
    Ok(())
}

/// The parsers above, on fixed input (no guest).
fn parsers() -> anyhow::Result<()> {
    ensure!(ping_summary("4 3 6") == Some((4, 3, 6)), "ping summary");
    ensure!(ping_summary("4 3").is_none(), "a short summary is nothing");
    ensure!(
        ping_summary("4 3 6 7").is_none(),
        "a long summary is nothing"
    );
    let console = "x CRASH-SYNCED 3 0123456789abcdef0123456789abcdef  -\nCRASH-SYNCED 4 short -\n";
    let got = synced_files(console);
    ensure!(
        got.len() == 1
            && got.get(&3).map(String::as_str) == Some("0123456789abcdef0123456789abcdef"),
        "synced lines {got:?}"
    );
    let guest = std::net::Ipv4Addr::new(198, 18, 9, 2);
    let mut packet = vec![
        0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 9, 2, 198, 18, 9, 1,
    ];
    packet.extend_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0x01, 0x02]);
    ensure!(
        echo_request_seq(&packet, guest) == Some(0x0102),
        "echo request seq"
    );
    packet[20] = 0;
    ensure!(
        echo_request_seq(&packet, guest).is_none(),
        "an echo reply is no request"
    );
    ensure!(
        echo_request_seq(&packet[..10], guest).is_none(),
        "a short packet is nothing"
    );
    Ok(())
}
