//! VNC benchmark: capvm's dev-fb against QEMU's VNC server (`-device bochs-display -vnc`) for
//! the same kit guest at 1600×900, in one run.
//!
//! The guest changes its `/dev/fb0` (the framebuffer console unbound, so nothing else draws):
//! the whole screen to random bytes (`noise`: incompressible), to vertical stripes of 16
//! colours in 8-row bands (`stripes`: structured, palette-friendly), to one colour (`solid`),
//! and a 64×16 box at (101, 203) (`small`: a word typed, a cursor). Before each change a
//! client (`tests::rfb_client`, 32 bpp depth 24, one encoding: Raw, Zlib or ZRLE, no compress
//! level named, so each server uses its default) has an incremental update request
//! outstanding, and reads updates (asking again after each) until the screen is quiet. After
//! the two full-screen changes it also asks for the whole screen non-incrementally
//! (`*-refresh`: the same picture on both servers, so a pure encoder comparison).
//!
//! Per row: bytes the client read, and `span`: from the first byte of the first update to
//! the end of the last (the server's time to deliver the change; `first` — the wait from the
//! guest's write to that first byte — depends on each server's scan timer and is printed in
//! the MEASURE lines). Then each server's CPU over 10 s with one idle client holding an
//! incremental request (QEMU's process, and its `vnc_worker` thread apart; QEMU's refresh
//! timer runs in its main loop thread, so its process figure is an upper bound), and its RSS.
//! Finally whether each answers a Tight-only client with Tight.
//!
//! Usage: `bench_vnc [--vmm capvm,qemu]`; `scripts/bench-vnc.sh` runs it where KVM runs
//! ordinary guests (inside the test host on PVM machines).

use std::io::Read as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tests::graphics_guest::{Area, GraphicsVm, Vmm, copy_rows, kit_spec, solid_file};
use tests::pictures::{self, SIZE, SMALL_COLOUR, SOLID, stripe_colour, stripe_runs};
use tests::rfb_client::{Format, RAW, RfbClient, Security, ZLIB, ZRLE};

/// Updates that stop for this long (after the guest's write returned) end a change: longer
/// than QEMU's slowest refresh interval (3 s).
const QUIET: Duration = Duration::from_secs(4);
/// The longest wait for a change's first update (QEMU's refresh timer eases to 3 s).
const FIRST_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_WINDOW: Duration = Duration::from_secs(10);
const TIGHT: i32 = 7;
const SMALL: Area = Area {
    x: pictures::SMALL.0,
    y: pictures::SMALL.1,
    w: pictures::SMALL.2,
    h: pictures::SMALL.3,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Noise,
    Stripes,
    Solid,
    Small,
}

impl Change {
    const ALL: [Change; 4] = [Change::Noise, Change::Stripes, Change::Solid, Change::Small];

    fn name(self) -> &'static str {
        match self {
            Change::Noise => "full-noise",
            Change::Stripes => "full-stripes",
            Change::Solid => "full-solid",
            Change::Small => "small-64x16",
        }
    }

    /// The guest command that makes the change from files prepared by [`prepare`].
    fn command(self) -> String {
        match self {
            Change::Noise => "cat /tmp/noise > /dev/fb0".into(),
            Change::Stripes => "cat /tmp/stripes > /dev/fb0".into(),
            Change::Solid => "cat /tmp/solid > /dev/fb0".into(),
            Change::Small => copy_rows("/tmp/row", SIZE.0, SMALL),
        }
    }

    /// The colour of (x, y) after the change, where the bench knows it.
    fn expected(self, x: u32, y: u32) -> Option<[u8; 3]> {
        match self {
            Change::Noise => None,
            Change::Stripes => Some(stripe_colour(x, y)),
            Change::Solid => Some(SOLID),
            Change::Small => {
                let inside = (SMALL.x..SMALL.x + SMALL.w).contains(&x)
                    && (SMALL.y..SMALL.y + SMALL.h).contains(&y);
                Some(if inside { SMALL_COLOUR } else { SOLID })
            }
        }
    }
}

fn escapes(rgb: [u8; 3]) -> String {
    let [r, g, b] = rgb;
    format!("\\{b:03o}\\{g:03o}\\{r:03o}\\000")
}

/// Guest commands that write `/tmp/noise`, `/tmp/stripes`, `/tmp/solid` and `/tmp/row`.
fn prepare() -> Vec<String> {
    let pixels = u64::from(SIZE.0) * u64::from(SIZE.1);
    let seg = "seg(){ printf \"$1\" > /tmp/u; n=1; while [ $n -lt $2 ]; do cat /tmp/u /tmp/u > \
               /tmp/v; mv /tmp/v /tmp/u; n=$((n*2)); done; head -c $(($2*4)) /tmp/u; }";
    let row = |odd: bool, path: &str| {
        let body: Vec<String> = stripe_runs(odd)
            .into_iter()
            .map(|(c, w)| format!("seg '{}' {w}", escapes(c)))
            .collect();
        format!("{seg}; {{ {}; }} > {path}", body.join("; "))
    };
    vec![
        format!("head -c {} /dev/urandom > /tmp/noise", pixels * 4),
        row(false, "/tmp/ra"),
        row(true, "/tmp/rb"),
        format!(
            "for i in 1 2 3 4 5 6 7 8; do cat /tmp/ra; done > /tmp/band; \
             for i in 1 2 3 4 5 6 7 8; do cat /tmp/rb; done >> /tmp/band; \
             n=16; while [ $n -lt {} ]; do cat /tmp/band /tmp/band > /tmp/v; mv /tmp/v /tmp/band; \
             n=$((n*2)); done; head -c {} /tmp/band > /tmp/stripes; rm /tmp/band",
            SIZE.1,
            pixels * 4
        ),
        solid_file("/tmp/solid", SOLID, pixels),
        solid_file("/tmp/row", SMALL_COLOUR, u64::from(SMALL.w)),
        "ls -l /tmp/noise /tmp/stripes /tmp/solid /tmp/row".into(),
    ]
}

/// What a client read for one change or refresh.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    bytes: u64,
    updates: u32,
    rects: u32,
    /// From the start (the guest command or the request) to the first update's first byte.
    first: Duration,
    /// From the first update's first byte to the end of the last update.
    span: Duration,
    /// Whether the client's picture shows the expected pixels (`None`: not known).
    correct: Option<bool>,
}

/// Reads updates, asking again after each, until `QUIET` passes without one after `done` is
/// set (or `FIRST_TIMEOUT` without any).
fn collect(client: &mut RfbClient, start: Instant, done: &AtomicBool) -> anyhow::Result<Sample> {
    let bytes0 = client.bytes_read;
    let mut s = Sample::default();
    let mut first: Option<Instant> = None;
    let mut last = start;
    loop {
        let wait = if first.is_some() {
            QUIET
        } else {
            FIRST_TIMEOUT.saturating_sub(start.elapsed())
        };
        if !client.wait_message(wait)? {
            if first.is_none() && wait.is_zero() {
                bail!("no update within {FIRST_TIMEOUT:?}");
            }
            if done.load(Ordering::SeqCst) && first.is_some() {
                break;
            }
            if start.elapsed() > FIRST_TIMEOUT * 4 {
                bail!("updates never went quiet");
            }
            continue;
        }
        let now = Instant::now();
        if first.is_none() {
            first = Some(now);
        }
        let rects = client.read_update()?;
        last = Instant::now();
        s.updates += 1;
        s.rects += u32::try_from(rects.len()).unwrap_or(u32::MAX);
        client.request_all(true)?;
    }
    let first = first.unwrap_or(start);
    s.bytes = client.bytes_read - bytes0;
    s.first = first - start;
    s.span = last - first;
    Ok(s)
}

/// Samples the client's picture against `change`'s expected colours on a 50-pixel grid.
fn check(client: &RfbClient, change: Change) -> Option<bool> {
    let mut all = true;
    for y in (0..SIZE.1).step_by(50).chain([SMALL.y + 3]) {
        for x in (0..SIZE.0).step_by(50).chain([SMALL.x + 7]) {
            let want = change.expected(x, y)?;
            let (Ok(cx), Ok(cy)) = (u16::try_from(x), u16::try_from(y)) else {
                return Some(false);
            };
            all &= client.pixel(cx, cy) == client.format.value_of(want);
        }
    }
    Some(all)
}

fn connect(vm: &GraphicsVm, encoding: i32) -> anyhow::Result<RfbClient> {
    let mut client = RfbClient::connect(vm.vnc_addr(), b"RFB 003.008\n", &Security::None, true)?;
    client.set_pixel_format(Format::RGB888_LE)?;
    client.set_encodings(&[encoding])?;
    client.request_all(false)?;
    client.read_update()?;
    Ok(client)
}

/// One change, measured.
fn measure_change(
    vm: &mut GraphicsVm,
    client: &mut RfbClient,
    change: Change,
) -> anyhow::Result<Sample> {
    client.request_all(true)?;
    let done = AtomicBool::new(false);
    let command = change.command();
    let start = Instant::now();
    let (sample, ran) = thread::scope(|scope| {
        let reader = scope.spawn(|| collect(client, start, &done));
        let ran = vm.run_ok(&command);
        done.store(true, Ordering::SeqCst);
        (reader.join(), ran)
    });
    ran?;
    let mut sample = sample.map_err(|_| anyhow::anyhow!("reader panicked"))??;
    sample.correct = check(client, change);
    Ok(sample)
}

/// The whole screen, asked for non-incrementally.
fn measure_refresh(client: &mut RfbClient, change: Change) -> anyhow::Result<Sample> {
    // Drain whatever is still coming for the change first.
    while client.wait_message(Duration::from_millis(500))? {
        client.read_update()?;
    }
    let done = AtomicBool::new(true);
    let start = Instant::now();
    client.request_all(false)?;
    let mut sample = collect(client, start, &done)?;
    sample.correct = check(client, change);
    Ok(sample)
}

/// `v` as a float (counts here stay far below 2^32; larger ones saturate).
fn as_f64(v: u64) -> f64 {
    f64::from(u32::try_from(v).unwrap_or(u32::MAX))
}

/// utime + stime of `/proc/PID[/task/TID]/stat`, in clock ticks.
fn cpu_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After "pid (comm)": state is field 3, utime 14 and stime 15 (proc(5)).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The stat files of `pid`'s threads named `comm`.
fn threads_named(pid: u32, comm: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .map(|e| e.path().join("stat").display().to_string())
        .collect()
}

/// The fields of `/proc/PID/status` named in `keys`, in kB.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What idles cost: the server's CPU in % of one core over `IDLE_WINDOW`, QEMU's VNC worker
/// thread apart, and memory.
#[derive(Debug, Default, Clone)]
struct Idle {
    cpu_pct: f64,
    worker_pct: Option<f64>,
    rss_kb: u64,
    anon_kb: u64,
    shmem_kb: u64,
}

fn measure_idle(vm: &GraphicsVm) -> anyhow::Result<Idle> {
    let pid = vm.vnc_server_pid()?;
    let mut client = connect(vm, ZRLE)?;
    client.request_all(true)?;
    thread::sleep(Duration::from_secs(2));
    let proc_stat = format!("/proc/{pid}/stat");
    let workers = threads_named(pid, "vnc_worker");
    let worker_ticks = || workers.iter().filter_map(|p| cpu_ticks(p)).sum::<u64>();
    let (p0, w0) = (cpu_ticks(&proc_stat).context("stat")?, worker_ticks());
    let t0 = Instant::now();
    thread::sleep(IDLE_WINDOW);
    let (p1, w1) = (cpu_ticks(&proc_stat).context("stat")?, worker_ticks());
    let secs = t0.elapsed().as_secs_f64();
    // Linux's USER_HZ is 100 on x86_64.
    let pct = |ticks: u64| as_f64(ticks) / 100.0 / secs * 100.0;
    // An idle client must have received nothing.
    let quiet = !client.wait_message(Duration::from_millis(10))?;
    if !quiet {
        println!("NOTE: the idle client got an update during the idle window");
    }
    Ok(Idle {
        cpu_pct: pct(p1 - p0),
        worker_pct: (!workers.is_empty()).then(|| pct(w1 - w0)),
        rss_kb: status_kb(pid, "VmRSS").unwrap_or(0),
        anon_kb: status_kb(pid, "RssAnon").unwrap_or(0),
        shmem_kb: status_kb(pid, "RssShmem").unwrap_or(0),
    })
}

/// The encoding of the first rectangle a Tight-only client gets.
fn tight_answer(vm: &GraphicsVm) -> anyhow::Result<i32> {
    let mut client = RfbClient::connect(vm.vnc_addr(), b"RFB 003.008\n", &Security::None, true)?;
    client.set_pixel_format(Format::RGB888_LE)?;
    client.set_encodings(&[TIGHT])?;
    client.request_all(false)?;
    let mut head = [0u8; 16];
    let mut stream = client.stream();
    stream.read_exact(&mut head)?;
    ensure!(head[0] == 0, "message type {} before the update", head[0]);
    Ok(i32::from_be_bytes([head[12], head[13], head[14], head[15]]))
}

/// Everything measured for one VMM.
#[derive(Debug, Default)]
struct Results {
    /// (row name, encoding name) → sample.
    rows: Vec<((String, &'static str), Sample)>,
    idle: Option<Idle>,
    tight: Option<i32>,
}

const ENCODINGS: [(i32, &str); 3] = [(RAW, "raw"), (ZLIB, "zlib"), (ZRLE, "zrle")];

fn run_vmm(which: &str) -> anyhow::Result<Results> {
    let spec = kit_spec(2, 512, SIZE)?;
    let mut vm = match which {
        "capvm" => GraphicsVm::capvm("benchvnc", &spec, SIZE)?,
        _ => GraphicsVm::qemu(&spec, SIZE)?,
    };
    let result = measure_all(&mut vm, which);
    result.map_err(|e| vm.with_logs(&e))
}

fn measure_all(vm: &mut GraphicsVm, which: &str) -> anyhow::Result<Results> {
    vm.prepare_fb()?;
    for command in prepare() {
        let out = vm.run_ok(&command)?;
        if !out.is_empty() {
            println!("{which} guest: {out}");
        }
    }
    let mut results = Results::default();
    for (encoding, enc_name) in ENCODINGS {
        let mut client = connect(vm, encoding)?;
        for change in Change::ALL {
            let s = measure_change(vm, &mut client, change)?;
            report(which, change.name(), enc_name, &s);
            results.rows.push(((change.name().to_owned(), enc_name), s));
            if matches!(change, Change::Noise | Change::Stripes) {
                let s = measure_refresh(&mut client, change)?;
                let name = format!("{}-refresh", change.name());
                report(which, &name, enc_name, &s);
                results.rows.push(((name, enc_name), s));
            }
        }
    }
    let idle = measure_idle(vm)?;
    println!(
        "MEASURE bench_vnc vmm={which} idle_cpu_pct={:.2} vnc_worker_cpu_pct={} rss_kb={} anon_kb={} shmem_kb={}",
        idle.cpu_pct,
        idle.worker_pct
            .map_or_else(|| "-".to_owned(), |p| format!("{p:.2}")),
        idle.rss_kb,
        idle.anon_kb,
        idle.shmem_kb
    );
    results.idle = Some(idle);
    let tight = tight_answer(vm)?;
    println!("MEASURE bench_vnc vmm={which} tight_only_client_gets_encoding={tight}");
    results.tight = Some(tight);
    if let Vmm::Capvm(_) = vm.vmm() {
        println!(
            "{which}: framebuffer {} KiB ({}x{}x4)",
            SIZE.0 * SIZE.1 * 4 / 1024,
            SIZE.0,
            SIZE.1
        );
    }
    Ok(results)
}

fn report(which: &str, row: &str, enc: &str, s: &Sample) {
    println!(
        "MEASURE bench_vnc vmm={which} row={row} encoding={enc} bytes={} updates={} rects={} first_ms={} span_ms={} correct={}",
        s.bytes,
        s.updates,
        s.rects,
        s.first.as_millis(),
        s.span.as_millis(),
        s.correct.map_or("n/a", |c| if c { "yes" } else { "NO" })
    );
}

fn main() -> ExitCode {
    tests::bench::exit_code("bench_vnc", run())
}

fn run() -> anyhow::Result<()> {
    let mut vmms = vec!["capvm".to_owned(), "qemu".to_owned()];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--vmm" => {
                vmms = args
                    .next()
                    .context("--vmm needs a value")?
                    .split(',')
                    .map(str::to_owned)
                    .collect();
            }
            _ => bail!("unknown argument {arg:?}"),
        }
    }
    let where_ = if std::env::var_os("CAPVM_IN_TESTHOST").is_some() {
        "inside the emulated test host (nested KVM under QEMU TCG)"
    } else {
        "directly on this host's KVM"
    };
    println!(
        "bench_vnc: {}x{} guest framebuffer, 32-bpp client, {where_}",
        SIZE.0, SIZE.1
    );
    let mut all = Vec::new();
    for vmm in &vmms {
        ensure!(
            vmm == "capvm" || vmm == "qemu",
            "unknown VMM {vmm:?} (capvm, qemu)"
        );
        match run_vmm(vmm) {
            Ok(r) => all.push((vmm.clone(), r)),
            Err(e) => println!("FAILED bench_vnc vmm={vmm}: {e:#}"),
        }
    }
    table(&all);
    Ok(())
}

fn table(all: &[(String, Results)]) {
    let get = |vmm: &str| all.iter().find(|(v, _)| v == vmm).map(|(_, r)| r);
    let (capvm, qemu) = (get("capvm"), get("qemu"));
    let Some(rows) = capvm.or(qemu).map(|r| &r.rows) else {
        return;
    };
    println!();
    println!(
        "{:<22} {:<5} {:>11} {:>11} {:>7} {:>9} {:>9} {:>7}",
        "row", "enc", "capvm_B", "qemu_B", "B_ratio", "capvm_ms", "qemu_ms", "ms_ratio"
    );
    for ((name, enc), _) in rows {
        let find = |r: Option<&Results>| {
            r.and_then(|r| {
                r.rows
                    .iter()
                    .find(|((n, e), _)| n == name && e == enc)
                    .map(|(_, s)| *s)
            })
        };
        let (c, q) = (find(capvm), find(qemu));
        let bytes = |s: Option<Sample>| s.map_or_else(|| "-".to_owned(), |s| s.bytes.to_string());
        let ms = |s: Option<Sample>| {
            s.map_or_else(
                || "-".to_owned(),
                |s| format!("{:.0}", s.span.as_secs_f64() * 1000.0),
            )
        };
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".to_owned()
            }
        };
        let (br, tr) = match (c, q) {
            (Some(c), Some(q)) => (
                ratio(as_f64(c.bytes), as_f64(q.bytes)),
                ratio(c.span.as_secs_f64(), q.span.as_secs_f64()),
            ),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "{name:<22} {enc:<5} {:>11} {:>11} {br:>7} {:>9} {:>9} {tr:>7}",
            bytes(c),
            bytes(q),
            ms(c),
            ms(q)
        );
    }
    println!(
        "(B: bytes the client read for the change; ms: first update's first byte to last update's end)"
    );
    for (vmm, r) in all {
        if let Some(i) = &r.idle {
            println!(
                "{vmm}: idle client, idle guest: CPU {:.2}% of a core{}; RSS {} KiB (anon {}, shmem {})",
                i.cpu_pct,
                i.worker_pct
                    .map_or_else(String::new, |p| format!(" (vnc_worker thread {p:.2}%)")),
                i.rss_kb,
                i.anon_kb,
                i.shmem_kb
            );
        }
        match r.tight {
            Some(TIGHT) => println!("{vmm}: answers a Tight-only client with Tight (7)"),
            Some(e) => println!("{vmm}: answers a Tight-only client with encoding {e} (no Tight)"),
            None => {}
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn the_small_change_is_its_box_on_the_solid_screen() {
        assert_eq!(Change::Small.expected(101, 203), Some(SMALL_COLOUR));
        assert_eq!(Change::Small.expected(100, 203), Some(SOLID));
        assert_eq!(Change::Noise.expected(0, 0), None);
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stat");
        std::fs::write(
            &path,
            "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0\n",
        )
        .unwrap();
        assert_eq!(cpu_ticks(path.to_str().unwrap()), Some(300));
    }
}
