//! Guest-level disk benchmark: capvm's dev-blk against QEMU's `virtio-blk-pci`
//! (`cache=none`), on the same raw image size, the same guest, in one run.
//!
//! The guest is the kit with the agent, booted from `kit-packages.cpio` (which
//! carries fio, tests/kit/packages.kit); 2 vCPUs, 512 MiB. Each VMM gets a fresh
//! raw image of `--size` MiB as its first virtio disk, opened `O_DIRECT` by both
//! (capvm `disk0_opts="direct"`, QEMU `cache=none,aio=threads`; through a loop
//! device where the image's file system has no `O_DIRECT`, as tmpfs inside the
//! test host). In the guest, one fio run on `/dev/vda` (`--direct=1`,
//! `--ioengine=libaio`, `--iodepth=32`, one job at a time, each `--time` seconds
//! over the whole image) measures, in this order: 1 MiB sequential write, 4 KiB
//! random write, 1 MiB sequential read, 4 KiB random read (the writes first, so
//! that the reads read written blocks, not holes). fio's own figures (terse
//! output, version 3) count: MB/s for the 1 MiB rows, IOPS for the 4 KiB rows.
//!
//! Each run boots both VMMs one after the other (capvm first in odd runs, QEMU
//! first in even runs); a guest that fails is tried once more. The table holds
//! the medians of the runs and the ratio capvm/QEMU per row.
//!
//! Usage: `bench_disk [--runs N] [--size MIB] [--time SECS]`;
//! `scripts/bench-disk.sh` runs it where KVM runs ordinary guests (inside the test
//! host on PVM machines).

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tests::bench::{median, packages_initrd, with_attempts};
use tests::kit::{Action, Kit, KitCmdline};
use tests::launcher::{
    Accel, CapvmLauncher, GuestSpec, LaunchError, Launcher, Machine, QemuLauncher,
};
use tests::testvm::TestVm;

/// fio and its libraries make `kit-packages.cpio` about 90 MiB: slow to load nested.
const BOOT_TIMEOUT: Duration = Duration::from_mins(8);
const IMAGE: &str = "bench-disk.img";
/// capvm's guest name (its directory under the datastore's `vms/`).
const GUEST: &str = "bench";
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;
const IODEPTH: u32 = 32;

/// capvm with one virtio-blk disk: the `vm` launcher's datastore plus `disk0`, opened
/// `O_DIRECT` (`disk0_opts="direct"`, as QEMU's `cache=none`).
#[derive(Debug)]
struct CapvmWithDisk {
    inner: CapvmLauncher,
    size_mib: u64,
    disks: Disks,
}

impl Launcher for CapvmWithDisk {
    fn name(&self) -> String {
        "capvm".into()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let command = self.inner.command(spec, workdir)?;
        let dir = workdir.join("vms").join(&self.inner.name);
        let disk = self.disks.make(&dir.join(IMAGE), self.size_mib)?;
        let conf = dir.join(format!("{}.conf", self.inner.name));
        let text = format!(
            "{}disk0_type=\"virtio-blk\"\ndisk0_dev=\"custom\"\ndisk0_name=\"{}\"\ndisk0_opts=\"direct\"\n",
            fs::read_to_string(&conf).unwrap_or_default(),
            disk.display()
        );
        fs::write(&conf, text).map_err(|source| LaunchError::Prepare { path: conf, source })?;
        Ok(command)
    }
}

/// QEMU with the same image size on `virtio-blk-pci`, `cache=none`.
#[derive(Debug)]
struct QemuWithDisk {
    inner: QemuLauncher,
    size_mib: u64,
    disks: Disks,
}

impl Launcher for QemuWithDisk {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let disk = self.disks.make(&workdir.join(IMAGE), self.size_mib)?;
        let mut command = self.inner.command(spec, workdir)?;
        command.args([
            "-drive".to_owned(),
            format!(
                "file={},if=none,id=d0,format=raw,cache=none,aio=threads",
                disk.display()
            ),
            "-device".to_owned(),
            "virtio-blk-pci,drive=d0".to_owned(),
        ]);
        Ok(command)
    }
}

/// The disks a launcher made: a fresh raw image each time, used directly where its file
/// system supports `O_DIRECT`, else (tmpfs, inside the test host) through a loop device,
/// which does. Loop devices are detached by [`Disks::release`] and when the launcher goes.
#[derive(Debug, Default)]
struct Disks {
    loops: Mutex<Vec<PathBuf>>,
}

impl Disks {
    /// Makes a zeroed image of `size_mib` at `image`; returns the path both VMMs open.
    fn make(&self, image: &Path, size_mib: u64) -> Result<PathBuf, LaunchError> {
        let prepare = |source| LaunchError::Prepare {
            path: image.to_path_buf(),
            source,
        };
        make_image(image, size_mib).map_err(prepare)?;
        let direct = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(image);
        if direct.is_ok() {
            return Ok(image.to_path_buf());
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .map_err(prepare)?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || dev.is_empty() {
            return Err(prepare(std::io::Error::other(format!(
                "no O_DIRECT on the image's file system and losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))));
        }
        let dev = PathBuf::from(dev);
        self.loops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(dev.clone());
        Ok(dev)
    }

    /// Detaches the loop devices made so far: the images of finished guests (their
    /// workdirs are gone) then free their memory.
    fn release(&self) {
        let mut loops = self
            .loops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for dev in loops.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        self.release();
    }
}

fn make_image(path: &Path, size_mib: u64) -> std::io::Result<()> {
    let file = fs::File::create(path)?;
    file.set_len(size_mib << 20)
}

/// What a row reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Bandwidth, 10^6 bytes per second.
    MbPerS,
    Iops,
}

impl Unit {
    fn label(self) -> &'static str {
        match self {
            Unit::MbPerS => "MB/s",
            Unit::Iops => "IOPS",
        }
    }
}

/// One fio job of the bench, and one row of its table.
struct Job {
    name: &'static str,
    /// fio's `--rw`.
    rw: &'static str,
    /// fio's `--bs`.
    bs: &'static str,
    unit: Unit,
}

impl Job {
    fn reads(&self) -> bool {
        self.rw.contains("read")
    }
}

/// In the order they run: the writes first, so that the reads find written blocks.
const JOBS: [Job; 4] = [
    Job {
        name: "seq-write-1M-qd32",
        rw: "write",
        bs: "1M",
        unit: Unit::MbPerS,
    },
    Job {
        name: "rand-write-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        unit: Unit::Iops,
    },
    Job {
        name: "seq-read-1M-qd32",
        rw: "read",
        bs: "1M",
        unit: Unit::MbPerS,
    },
    Job {
        name: "rand-read-4k-qd32",
        rw: "randread",
        bs: "4k",
        unit: Unit::Iops,
    },
];

/// The guest's shell command: fio over the whole of `/dev/vda`, one job after the other
/// (`--stonewall`), terse output. `/dev/vda` must be a block device: fio would create a
/// plain file of that name otherwise and measure the guest's RAM.
fn fio_command(size_mib: u64, time_s: u64) -> String {
    let mut cmd = format!(
        "[ -b /dev/vda ] || {{ echo 'no block device /dev/vda'; exit 2; }}; \
         fio --output-format=terse --terse-version=3 --filename=/dev/vda --direct=1 \
         --ioengine=libaio --iodepth={IODEPTH} --numjobs=1 --time_based --runtime={time_s} \
         --size={size_mib}M --randrepeat=0 --norandommap"
    );
    for job in &JOBS {
        let _ = write!(
            cmd,
            " --name={} --rw={} --bs={} --stonewall",
            job.name, job.rw, job.bs
        );
    }
    cmd
}

/// One direction of a fio job, from its terse line.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Side {
    /// KiB moved.
    kib: u64,
    /// KiB per second.
    bw_kib_s: u64,
    iops: f64,
    runtime_ms: u64,
}

/// One job's line of fio's terse output (`--terse-version=3`).
#[derive(Debug, Clone, PartialEq)]
struct FioJob {
    name: String,
    /// fio's error number for the job; 0 when it ran.
    error: i64,
    read: Side,
    write: Side,
}

#[derive(Debug, thiserror::Error, PartialEq)]
enum TerseError {
    #[error("terse line of job {job:?} has no field {index} ({what})")]
    MissingField {
        job: String,
        index: usize,
        what: &'static str,
    },
    #[error("terse line of job {job:?}: field {index} ({what}) is {value:?}")]
    BadField {
        job: String,
        index: usize,
        what: &'static str,
        value: String,
    },
}

// Field indices of a terse version 3 line (fio's HOWTO, "Terse output"), from 0:
// 0 terse version, 1 fio version, 2 job name, 3 group, 4 error, then the read figures
// (5 KiB, 6 KiB/s, 7 IOPS, 8 runtime ms, then latencies and bandwidth statistics: 41
// fields in all), then the write figures in the same layout from 46.
const FIELD_NAME: usize = 2;
const FIELD_ERROR: usize = 4;
const FIELD_READ: usize = 5;
const FIELD_WRITE: usize = 46;

/// The jobs of fio's terse output: every line that starts `3;` (fio's messages on
/// stderr, interleaved by the console, are skipped).
fn parse_terse(output: &str) -> Result<Vec<FioJob>, TerseError> {
    output
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("3;"))
        .map(parse_terse_line)
        .collect()
}

fn parse_terse_line(line: &str) -> Result<FioJob, TerseError> {
    let fields: Vec<&str> = line.split(';').collect();
    let name = fields
        .get(FIELD_NAME)
        .copied()
        .unwrap_or_default()
        .to_owned();
    let field = |index: usize, what: &'static str| -> Result<&str, TerseError> {
        fields
            .get(index)
            .copied()
            .ok_or_else(|| TerseError::MissingField {
                job: name.clone(),
                index,
                what,
            })
    };
    let bad = |index: usize, what: &'static str, value: &str| TerseError::BadField {
        job: name.clone(),
        index,
        what,
        value: value.to_owned(),
    };
    let int = |index: usize, what: &'static str| -> Result<u64, TerseError> {
        let v = field(index, what)?;
        v.parse().map_err(|_| bad(index, what, v))
    };
    let side = |base: usize| -> Result<Side, TerseError> {
        let iops_at = base + 2;
        let iops = field(iops_at, "iops")?;
        Ok(Side {
            kib: int(base, "KiB")?,
            bw_kib_s: int(base + 1, "KiB/s")?,
            iops: iops
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| bad(iops_at, "iops", iops))?,
            runtime_ms: int(base + 3, "runtime ms")?,
        })
    };
    let error = field(FIELD_ERROR, "error")?;
    Ok(FioJob {
        error: error
            .parse()
            .map_err(|_| bad(FIELD_ERROR, "error", error))?,
        read: side(FIELD_READ)?,
        write: side(FIELD_WRITE)?,
        name,
    })
}

/// The row's figure from the job's result: the direction it measures, in its unit.
/// None when the job failed or moved nothing.
fn figure(job: &Job, result: &FioJob) -> Option<f64> {
    let side = if job.reads() {
        result.read
    } else {
        result.write
    };
    if result.error != 0 || side.kib == 0 || side.runtime_ms == 0 {
        return None;
    }
    Some(match job.unit {
        #[allow(clippy::cast_precision_loss)] // MB/s for a table
        Unit::MbPerS => side.bw_kib_s as f64 * 1024.0 / 1e6,
        Unit::Iops => side.iops,
    })
}

/// The figure of every row, in the order of [`JOBS`], from fio's output.
fn figures(output: &str) -> anyhow::Result<Vec<f64>> {
    let results = parse_terse(output)?;
    JOBS.iter()
        .map(|job| {
            let result = results
                .iter()
                .find(|r| r.name == job.name)
                .with_context(|| format!("fio reported no job {}", job.name))?;
            figure(job, result).with_context(|| {
                format!(
                    "fio job {} failed (error {}) or moved nothing",
                    job.name, result.error
                )
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Options {
    runs: usize,
    size_mib: u64,
    time_s: u64,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 3,
        size_mib: 128,
        time_s: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => o.runs = value()?.parse()?,
            "--size" => o.size_mib = value()?.parse()?,
            "--time" => o.time_s = value()?.parse()?,
            _ => {
                bail!("unknown argument {arg:?} (bench_disk [--runs N] [--size MIB] [--time SECS])")
            }
        }
    }
    ensure!(
        o.runs > 0 && o.size_mib > 0 && o.time_s > 0,
        "--runs, --size and --time must be positive"
    );
    Ok(o)
}

fn main() -> ExitCode {
    tests::bench::exit_code("bench_disk", run())
}

fn run() -> anyhow::Result<()> {
    let o = options()?;
    let kit = Kit::locate()?;
    let where_ = if std::env::var_os("CAPVM_IN_TESTHOST").is_some() {
        "inside the emulated test host (nested KVM under QEMU TCG)"
    } else {
        "directly on this host's KVM"
    };
    println!(
        "bench_disk: {} run(s), {} MiB image, fio libaio O_DIRECT iodepth {IODEPTH} {} s a row, {CPUS} vCPUs, {MEMORY_MIB} MiB, {where_}",
        o.runs, o.size_mib, o.time_s
    );
    println!(
        "bench_disk: capvm = dev-blk, disk0_opts=\"direct\"; qemu = virtio-blk-pci, cache=none,aio=threads, microvm with PCIe"
    );
    let initrd = packages_initrd(&kit.dir)?;
    println!("bench_disk: kit {} ({})", kit.key, initrd.display());
    let spec = GuestSpec {
        kernel: kit.kernel.clone(),
        initrd,
        cmdline: KitCmdline::new(Action::Agent).render()?,
        cpus: CPUS,
        memory_mib: MEMORY_MIB,
    };
    let mut qemu = QemuLauncher::new(Machine::Microvm, Accel::Kvm);
    // microvm with a PCIe root, so QEMU's disk is virtio-blk-pci like capvm's.
    qemu.extra = vec!["-machine".into(), "pcie=on".into()];
    let capvm = CapvmWithDisk {
        inner: CapvmLauncher::new(GUEST),
        size_mib: o.size_mib,
        disks: Disks::default(),
    };
    let qemu = QemuWithDisk {
        inner: qemu,
        size_mib: o.size_mib,
        disks: Disks::default(),
    };
    let launchers: [(&dyn Launcher, &Disks); 2] = [(&capvm, &capvm.disks), (&qemu, &qemu.disks)];
    let command = fio_command(o.size_mib, o.time_s);
    // samples[launcher][row]
    let mut samples = vec![vec![Vec::<f64>::new(); JOBS.len()]; launchers.len()];
    for run in 1..=o.runs {
        // Alternate who goes first, so that a drift of the machine does not favour one.
        let order: [usize; 2] = if run % 2 == 1 { [0, 1] } else { [1, 0] };
        for l in order {
            let Some((launcher, disks)) = launchers.get(l) else {
                continue;
            };
            let measured = with_attempts("bench_disk", &launcher.name(), run, || {
                let result = measure(*launcher, &spec, &command, o.time_s);
                disks.release();
                result
            });
            if let Some(m) = measured {
                record(&launcher.name(), run, &m, samples.get_mut(l));
            }
        }
    }
    print_table(&samples);
    Ok(())
}

/// What one guest measured.
struct Measured {
    boot: Duration,
    figures: Vec<f64>,
}

fn record(vmm: &str, run: usize, m: &Measured, slots: Option<&mut Vec<Vec<f64>>>) {
    let mut line = format!(
        "MEASURE bench_disk vmm={vmm} run={run} boot_s={:.1}",
        m.boot.as_secs_f64()
    );
    for (job, v) in JOBS.iter().zip(&m.figures) {
        let _ = write!(
            line,
            " {}_{}={v:.3}",
            job.name,
            job.unit.label().replace('/', "_per_")
        );
    }
    println!("{line}");
    if let Some(slots) = slots {
        for (slot, v) in slots.iter_mut().zip(&m.figures) {
            slot.push(*v);
        }
    }
}

fn print_table(samples: &[Vec<Vec<f64>>]) {
    println!();
    println!(
        "{:<20} {:>5} {:>12} {:>12} {:>7}  (medians of the runs; ratio = capvm/qemu)",
        "row", "unit", "capvm", "qemu", "ratio"
    );
    for (r, job) in JOBS.iter().enumerate() {
        let med = |l: usize| {
            samples
                .get(l)
                .and_then(|x| x.get(r))
                .and_then(|v| median(v))
        };
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        let (c, q) = (med(0), med(1));
        let ratio = match (c, q) {
            (Some(c), Some(q)) if q > 0.0 => {
                format!("{:.2}{}", c / q, if c >= q { "" } else { " !" })
            }
            _ => "-".to_owned(),
        };
        let n = |l: usize| samples.get(l).and_then(|x| x.get(r)).map_or(0, Vec::len);
        println!(
            "{:<20} {:>5} {:>12} {:>12} {ratio:>7}  (runs: {}/{})",
            job.name,
            job.unit.label(),
            cell(c),
            cell(q),
            n(0),
            n(1)
        );
    }
    println!("(a ratio marked ! is one where capvm is below qemu)");
}

fn measure(
    launcher: &dyn Launcher,
    spec: &GuestSpec,
    command: &str,
    time_s: u64,
) -> anyhow::Result<Measured> {
    let mut vm = TestVm::start(launcher, spec)?;
    // capvm's logs (the supervisor's, the runner's, dev-blk's) say why a guest died; a
    // QEMU guest has none of them (its stderr is in the console part).
    let logs: &[&str] = if launcher.name() == "capvm" {
        &CAPVM_LOGS
    } else {
        &[]
    };
    let result = fio_in(&mut vm, command, time_s).map_err(|e| vm.with_logs(GUEST, logs, &e));
    let _ = vm.stop(Duration::from_mins(1));
    result
}

/// capvm's log files in its guest's directory, for a failure report.
const CAPVM_LOGS: [&str; 3] = ["vm-bhyve.log", "vcpu-runner.log", "dev-blk0.log"];

fn fio_in(vm: &mut TestVm, command: &str, time_s: u64) -> anyhow::Result<Measured> {
    let booted = vm.wait_ready(BOOT_TIMEOUT)?;
    // Each job's runtime, plus fio's start (its libraries) and the guest's slowness nested.
    let timeout = Duration::from_secs(time_s.saturating_mul(JOBS.len() as u64))
        .saturating_add(Duration::from_mins(4));
    let out = vm.run(command, timeout)?;
    let figures = figures(&out.output)
        .and_then(|f| {
            ensure!(out.status == 0, "fio exited {}", out.status);
            Ok(f)
        })
        .with_context(|| format!("fio: {}", out.output.trim()))?;
    Ok(Measured {
        boot: booted.wall,
        figures,
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    /// fio 3.33's (Debian bookworm, the kit's) terse output of a 1 MiB sequential write
    /// and a 4 KiB random read at iodepth 32 (the host's own disk is a `vda` too).
    const TERSE: &str = concat!(
        "3;fio-3.33;seq-write-1M-qd32;0;0;0;0;0;0;0;0;0.000000;0.000000;0;0;0.000000;0.000000;1.000000%=0;5.000000%=0;10.000000%=0;20.000000%=0;30.000000%=0;40.000000%=0;50.000000%=0;60.000000%=0;70.000000%=0;80.000000%=0;90.000000%=0;95.000000%=0;99.000000%=0;99.500000%=0;99.900000%=0;99.950000%=0;99.990000%=0;0%=0;0%=0;0%=0;0;0;0.000000;0.000000;0;0;0.000000%;0.000000;0.000000;794624;774487;756;1026;79;181867;711.463524;6563.506748;4665;227437;40896.628916;43453.229937;1.000000%=5210;5.000000%=10158;10.000000%=20578;20.000000%=22151;30.000000%=22675;40.000000%=23199;50.000000%=27918;60.000000%=31064;70.000000%=34865;80.000000%=43778;90.000000%=53215;95.000000%=154140;99.000000%=221249;99.500000%=225443;99.900000%=227540;99.950000%=227540;99.990000%=227540;0%=0;0%=0;0%=0;4804;227630;41608.092441;43703.124608;1092386;1092386;100.000000%;1092386.000000;0.000000;4.390244%;11.024390%;328;0;10;0.1%;0.3%;0.5%;1.0%;2.1%;96.0%;0.0%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;4.77%;4.77%;78.35%;3.99%;8.12%;0.00%;0.00%;0.00%;0.00%;0.00%;vda;20442;776;0;0;7891;12374;20265;49.87%\n",
        "3;fio-3.33;rand-read-4k-qd32;1;0;135808;135672;33918;1001;1;5301;13.962808;107.370951;157;14615;927.495896;1150.840546;1.000000%=329;5.000000%=395;10.000000%=407;20.000000%=428;30.000000%=460;40.000000%=485;50.000000%=514;60.000000%=552;70.000000%=643;80.000000%=1335;90.000000%=1728;95.000000%=3325;99.000000%=5931;99.500000%=6651;99.900000%=11993;99.950000%=14614;99.990000%=14614;0%=0;0%=0;0%=0;212;14619;941.458704;1162.415261;98848;98848;72.858069%;98848.000000;0.000000;0;0;0;0;0;0;0.000000;0.000000;0;0;0.000000;0.000000;1.000000%=0;5.000000%=0;10.000000%=0;20.000000%=0;30.000000%=0;40.000000%=0;50.000000%=0;60.000000%=0;70.000000%=0;80.000000%=0;90.000000%=0;95.000000%=0;99.000000%=0;99.500000%=0;99.900000%=0;99.950000%=0;99.990000%=0;0%=0;0%=0;0%=0;0;0;0.000000;0.000000;0;0;0.000000%;0.000000;0.000000;3.400000%;27.600000%;1014;0;43;0.1%;0.1%;0.1%;0.1%;0.1%;99.9%;0.0%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.10%;45.70%;29.18%;3.22%;15.36%;3.27%;2.98%;0.19%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;vda;20442;776;0;0;7891;12374;20265;49.87%\n"
    );
    /// The same fio on a file it cannot use: a message, then a line with error 1.
    const TERSE_ERROR: &str = "fio: pid=0, err=1/file:filesetup.c:150, func=unlink, error=Operation not permitted\n\
        3;fio-3.33;seq-read-1M-qd32;0;1;0;0;0;0;0;0;0.000000;0.000000;0;0;0.000000;0.000000;1.000000%=0;5.000000%=0;10.000000%=0;20.000000%=0;30.000000%=0;40.000000%=0;50.000000%=0;60.000000%=0;70.000000%=0;80.000000%=0;90.000000%=0;95.000000%=0;99.000000%=0;99.500000%=0;99.900000%=0;99.950000%=0;99.990000%=0;0%=0;0%=0;0%=0;0;0;0.000000;0.000000;0;0;0.000000%;0.000000;0.000000;0;0;0;0;0;0;0.000000;0.000000;0;0;0.000000;0.000000;1.000000%=0;5.000000%=0;10.000000%=0;20.000000%=0;30.000000%=0;40.000000%=0;50.000000%=0;60.000000%=0;70.000000%=0;80.000000%=0;90.000000%=0;95.000000%=0;99.000000%=0;99.500000%=0;99.900000%=0;99.950000%=0;99.990000%=0;0%=0;0%=0;0%=0;0;0;0.000000;0.000000;0;0;0.000000%;0.000000;0.000000;0.000000%;0.000000%;0;0;0;0.0%;0.0%;0.0%;0.0%;0.0%;0.0%;0.0%;-nan%;0.00%\n";

    #[test]
    fn a_real_terse_output_gives_each_jobs_read_and_write_figures() {
        let jobs = parse_terse(TERSE).unwrap();
        assert_eq!(jobs.len(), 2);
        let (write, read) = (&jobs[0], &jobs[1]);
        assert_eq!(write.name, "seq-write-1M-qd32");
        assert_eq!(write.error, 0);
        assert_eq!(write.read.kib, 0);
        assert_eq!(
            write.write,
            Side {
                kib: 794_624,
                bw_kib_s: 774_487,
                iops: 756.0,
                runtime_ms: 1026
            }
        );
        assert_eq!(read.name, "rand-read-4k-qd32");
        assert_eq!(
            read.read,
            Side {
                kib: 135_808,
                bw_kib_s: 135_672,
                iops: 33_918.0,
                runtime_ms: 1001
            }
        );
        assert_eq!(read.write.kib, 0);
    }

    #[test]
    fn a_1m_row_is_mb_per_s_of_its_direction_and_a_4k_row_is_iops() {
        let jobs = parse_terse(TERSE).unwrap();
        let mb = figure(&JOBS[0], &jobs[0]).unwrap();
        assert!((mb - 774_487.0 * 1024.0 / 1e6).abs() < 1e-9, "{mb}");
        assert_eq!(figure(&JOBS[3], &jobs[1]), Some(33_918.0));
        // The read row of a write job moved nothing: no figure.
        assert_eq!(figure(&JOBS[2], &jobs[0]), None);
    }

    #[test]
    fn a_failed_job_gives_no_figure_and_fio_messages_are_skipped() {
        let jobs = parse_terse(TERSE_ERROR).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].error, 1);
        assert_eq!(figure(&JOBS[2], &jobs[0]), None);
        let e = figures(TERSE_ERROR).unwrap_err();
        assert!(
            format!("{e:#}").contains("no job seq-write-1M-qd32"),
            "{e:#}"
        );
    }

    #[test]
    fn figures_need_every_job_of_the_bench() {
        // TERSE has two of the four jobs.
        let e = figures(TERSE).unwrap_err();
        assert!(format!("{e:#}").contains("rand-write-4k-qd32"), "{e:#}");
        assert!(figures("no fio here").is_err());
    }

    #[test]
    fn a_truncated_or_garbled_line_is_an_error_naming_the_field() {
        assert_eq!(
            parse_terse("3;fio-3.33;j;0;0;10;20"),
            Err(TerseError::MissingField {
                job: "j".into(),
                index: 7,
                what: "iops"
            })
        );
        let mut line: Vec<String> = TERSE
            .lines()
            .next()
            .unwrap()
            .split(';')
            .map(String::from)
            .collect();
        line[47] = "fast".into();
        assert_eq!(
            parse_terse(&line.join(";")),
            Err(TerseError::BadField {
                job: "seq-write-1M-qd32".into(),
                index: 47,
                what: "KiB/s",
                value: "fast".into()
            })
        );
        line[47] = "1".into();
        line[48] = "-nan".into();
        assert!(matches!(
            parse_terse(&line.join(";")),
            Err(TerseError::BadField { index: 48, .. })
        ));
    }

    #[test]
    fn the_guest_command_runs_every_job_on_vda_with_direct_libaio_at_depth_32() {
        let cmd = fio_command(128, 7);
        assert!(cmd.starts_with("[ -b /dev/vda ] ||"), "{cmd}");
        for want in [
            "--filename=/dev/vda",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
            "--runtime=7",
            "--size=128M",
            "--terse-version=3",
        ] {
            assert!(cmd.contains(want), "{want} missing in {cmd}");
        }
        for job in &JOBS {
            let spec = format!(
                "--name={} --rw={} --bs={} --stonewall",
                job.name, job.rw, job.bs
            );
            assert!(cmd.contains(&spec), "{spec} missing in {cmd}");
        }
        // Writes before reads.
        let pos = |n: &str| cmd.find(n).unwrap();
        assert!(
            pos("--rw=write") < pos("--rw=read ") && pos("--rw=randwrite") < pos("--rw=randread")
        );
    }
}
