//! Guest-level disk benchmark: capvm's dev-blk against QEMU's `virtio-blk-pci`
//! (`cache=none`), on the same raw image size, the same guest, in one run.
//!
//! The guest is the kit (Debian kernel + busybox) with the agent; each VMM gets
//! a fresh raw image of `--size` MiB as its first virtio disk, opened `O_DIRECT`
//! by both (capvm `disk0_opts="direct"`, QEMU `cache=none`; through a loop
//! device where the image's file system has no `O_DIRECT`, as tmpfs inside the
//! test host). In the guest, busybox `dd` with `O_DIRECT` moves `--size` MiB in
//! 1 MiB blocks (sequential write, then read) and 16 MiB in 4 KiB blocks (queue
//! depth 1: busybox has no fio), timed by the guest's own uptime. The guest's
//! figures are what the user sees; the ratio capvm/QEMU is printed per row.
//!
//! Usage: `bench_disk [--runs N] [--size MIB]`; `scripts/bench-disk.sh` runs
//! it where KVM runs ordinary guests (inside the test host on PVM machines).

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use tests::kit::{Action, Kit, KitCmdline};
use tests::launcher::{
    Accel, CapvmLauncher, GuestSpec, LaunchError, Launcher, Machine, QemuLauncher,
};
use tests::testvm::TestVm;

const BOOT_TIMEOUT: Duration = Duration::from_mins(3);
const CMD_TIMEOUT: Duration = Duration::from_mins(5);
const IMAGE: &str = "bench-disk.img";

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
/// which does. Loop devices are detached when the launcher goes.
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
}

impl Drop for Disks {
    fn drop(&mut self) {
        let loops = self
            .loops
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for dev in loops.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

fn make_image(path: &Path, size_mib: u64) -> std::io::Result<()> {
    let file = fs::File::create(path)?;
    file.set_len(size_mib << 20)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_disk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One row: the dd command and the bytes it moves.
struct Row {
    name: &'static str,
    dd: String,
    bytes: u64,
}

fn rows(size_mib: u64) -> Vec<Row> {
    vec![
        Row {
            name: "seq-write-1M",
            dd: format!("dd if=/dev/zero of=/dev/vda bs=1M count={size_mib} oflag=direct"),
            bytes: size_mib << 20,
        },
        Row {
            name: "seq-read-1M",
            dd: format!("dd if=/dev/vda of=/dev/null bs=1M count={size_mib} iflag=direct"),
            bytes: size_mib << 20,
        },
        Row {
            name: "write-4k-qd1",
            dd: "dd if=/dev/zero of=/dev/vda bs=4k count=4096 oflag=direct".into(),
            bytes: 4096 * 4096,
        },
        Row {
            name: "read-4k-qd1",
            dd: "dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct".into(),
            bytes: 4096 * 4096,
        },
    ]
}

fn run() -> anyhow::Result<()> {
    let mut runs = 3usize;
    let mut size_mib = 128u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => runs = value()?.parse()?,
            "--size" => size_mib = value()?.parse()?,
            _ => bail!("unknown argument {arg:?}"),
        }
    }
    let kit = Kit::locate()?;
    let where_ = if std::env::var_os("CAPVM_IN_TESTHOST").is_some() {
        "inside the emulated test host (nested KVM under QEMU TCG)"
    } else {
        "directly on this host's KVM"
    };
    println!("bench_disk: {runs} runs each, {size_mib} MiB image, 2 vCPUs, 512 MiB RAM, {where_}");
    let spec = GuestSpec {
        kernel: kit.kernel.clone(),
        initrd: kit.initrd.clone(),
        cmdline: KitCmdline::new(Action::Agent).render()?,
        cpus: 2,
        memory_mib: 512,
    };
    let mut qemu = QemuLauncher::new(Machine::Microvm, Accel::Kvm);
    // microvm with a PCIe root, so QEMU's disk is virtio-blk-pci like capvm's.
    qemu.extra = vec!["-machine".into(), "pcie=on".into()];
    let launchers: Vec<Box<dyn Launcher>> = vec![
        Box::new(CapvmWithDisk {
            inner: CapvmLauncher::new("bench"),
            size_mib,
            disks: Disks::default(),
        }),
        Box::new(QemuWithDisk {
            inner: qemu,
            size_mib,
            disks: Disks::default(),
        }),
    ];
    let rows = rows(size_mib);
    // results[launcher][row] = MB/s samples
    let mut results = vec![vec![Vec::<f64>::new(); rows.len()]; launchers.len()];
    for run in 1..=runs {
        for (l, launcher) in launchers.iter().enumerate() {
            match measure(launcher.as_ref(), &spec, &rows) {
                Ok(rates) => {
                    for (r, rate) in rates.into_iter().enumerate() {
                        println!(
                            "MEASURE bench_disk vmm={} run={run} row={} mb_s={rate:.3}",
                            launcher.name(),
                            rows.get(r).map_or("?", |row| row.name)
                        );
                        if let Some(slot) = results.get_mut(l).and_then(|x| x.get_mut(r)) {
                            slot.push(rate);
                        }
                    }
                }
                Err(e) => println!("FAILED bench_disk vmm={} run={run}: {e:#}", launcher.name()),
            }
        }
    }
    println!();
    println!(
        "{:<14} {:>12} {:>12} {:>8}  (medians, MB/s timed in the guest)",
        "row", "capvm", "qemu", "ratio"
    );
    for (r, row) in rows.iter().enumerate() {
        let med = |l: usize| {
            results
                .get(l)
                .and_then(|x| x.get(r))
                .and_then(|v| median(v))
        };
        match (med(0), med(1)) {
            (Some(c), Some(q)) => println!("{:<14} {c:>12.3} {q:>12.3} {:>8.2}", row.name, c / q),
            (c, q) => println!("{:<14} {c:>12?} {q:>12?}", row.name),
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn measure(launcher: &dyn Launcher, spec: &GuestSpec, rows: &[Row]) -> anyhow::Result<Vec<f64>> {
    let mut vm = TestVm::start(launcher, spec)?;
    vm.wait_ready(BOOT_TIMEOUT)?;
    let mut rates = Vec::new();
    for row in rows {
        // busybox dd prints no rate: the guest's own uptime (10 ms ticks) around it does.
        let cmd = format!(
            "cat /proc/uptime; {} 2>&1 || echo DD-FAILED; cat /proc/uptime",
            row.dd
        );
        let out = vm.run(&cmd, CMD_TIMEOUT)?;
        if out.status != 0 || out.output.contains("DD-FAILED") {
            bail!("{}: exit {}: {}", row.dd, out.status, out.output);
        }
        let secs = elapsed(&out.output).with_context(|| format!("no times in {:?}", out.output))?;
        #[allow(clippy::cast_precision_loss)] // MB/s for a table
        rates.push(row.bytes as f64 / 1e6 / secs);
    }
    let _ = vm.stop(Duration::from_mins(1));
    Ok(rates)
}

/// Seconds between the first and the last `/proc/uptime` line of `output` (at least one
/// tick, 10 ms).
fn elapsed(output: &str) -> Option<f64> {
    let uptimes: Vec<f64> = output
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (up, idle) = (words.next()?, words.next()?);
            (words.next().is_none() && idle.parse::<f64>().is_ok())
                .then_some(up)?
                .parse()
                .ok()
        })
        .collect();
    let (first, last) = (uptimes.first()?, uptimes.last()?);
    (uptimes.len() >= 2).then_some((last - first).max(0.01))
}

#[cfg(test)]
mod unit {
    use super::elapsed;

    #[test]
    fn the_time_between_the_guest_uptimes_is_the_elapsed_time() {
        let out = "100.25 180.00\n128+0 records in\n128+0 records out\n101.75 181.00\n";
        assert_eq!(elapsed(out), Some(1.5));
        assert_eq!(elapsed("100.00 1.00\n100.00 1.00\n"), Some(0.01));
        assert_eq!(elapsed("no times here"), None);
        assert_eq!(elapsed("5.0 1.0\n"), None);
    }
}
