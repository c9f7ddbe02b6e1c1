//! Guest-level disk benchmark: capvm's dev-blk against QEMU's `virtio-blk-pci`
//! (`cache=none`), on the same raw image size, the same guest, in one run.
//!
//! The guest is the kit (Debian kernel + busybox) with the agent; each VMM gets
//! a fresh raw image of `--size` MiB as its first virtio disk. In the guest,
//! busybox `dd` with `O_DIRECT` (`iflag=`/`oflag=direct`) moves `--size` MiB
//! in 1 MiB blocks (sequential write, then read) and 16 MiB in 4 KiB blocks
//! (queue depth 1: busybox has no fio), and prints its own rate. The guest's
//! figures are what the user sees; the ratio capvm/QEMU is printed per row.
//!
//! Usage: `bench_disk [--runs N] [--size MIB]`; `scripts/bench-disk.sh` runs
//! it where KVM runs ordinary guests (inside the test host on PVM machines).

use std::fs;
use std::path::Path;
use std::process::{Command, ExitCode};
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

/// capvm with one virtio-blk disk: the `vm` launcher's datastore plus `disk0`.
#[derive(Debug)]
struct CapvmWithDisk {
    inner: CapvmLauncher,
    size_mib: u64,
}

impl Launcher for CapvmWithDisk {
    fn name(&self) -> String {
        "capvm".into()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let command = self.inner.command(spec, workdir)?;
        let dir = workdir.join("vms").join(&self.inner.name);
        let prepare = |path: std::path::PathBuf, r: std::io::Result<()>| {
            r.map_err(|source| LaunchError::Prepare { path, source })
        };
        let image = dir.join(IMAGE);
        prepare(image.clone(), make_image(&image, self.size_mib))?;
        let conf = dir.join(format!("{}.conf", self.inner.name));
        let text = format!(
            "{}disk0_type=\"virtio-blk\"\ndisk0_name=\"{IMAGE}\"\n",
            fs::read_to_string(&conf).unwrap_or_default()
        );
        prepare(conf.clone(), fs::write(&conf, text))?;
        Ok(command)
    }
}

/// QEMU with the same image size on `virtio-blk-pci`, `cache=none`.
#[derive(Debug)]
struct QemuWithDisk {
    inner: QemuLauncher,
    size_mib: u64,
}

impl Launcher for QemuWithDisk {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let image = workdir.join(IMAGE);
        make_image(&image, self.size_mib).map_err(|source| LaunchError::Prepare {
            path: image.clone(),
            source,
        })?;
        let mut command = self.inner.command(spec, workdir)?;
        command.args([
            "-drive".to_owned(),
            format!(
                "file={},if=none,id=d0,format=raw,cache=none,aio=threads",
                image.display()
            ),
            "-device".to_owned(),
            "virtio-blk-pci,drive=d0".to_owned(),
        ]);
        Ok(command)
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

/// One row: the dd command and what it measures.
struct Row {
    name: &'static str,
    dd: String,
}

fn rows(size_mib: u64) -> Vec<Row> {
    vec![
        Row {
            name: "seq-write-1M",
            dd: format!("dd if=/dev/zero of=/dev/vda bs=1M count={size_mib} oflag=direct"),
        },
        Row {
            name: "seq-read-1M",
            dd: format!("dd if=/dev/vda of=/dev/null bs=1M count={size_mib} iflag=direct"),
        },
        Row {
            name: "write-4k-qd1",
            dd: "dd if=/dev/zero of=/dev/vda bs=4k count=4096 oflag=direct".into(),
        },
        Row {
            name: "read-4k-qd1",
            dd: "dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct".into(),
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
        }),
        Box::new(QemuWithDisk {
            inner: qemu,
            size_mib,
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
                            "MEASURE bench_disk vmm={} run={run} row={} mb_s={rate:.1}",
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
        "{:<14} {:>12} {:>12} {:>8}  (medians, MB/s as busybox dd reports)",
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
            (Some(c), Some(q)) => println!("{:<14} {c:>12.1} {q:>12.1} {:>8.2}", row.name, c / q),
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
        let out = vm.run(&format!("{} 2>&1", row.dd), CMD_TIMEOUT)?;
        if out.status != 0 {
            bail!("{}: exit {}: {}", row.dd, out.status, out.output);
        }
        rates.push(dd_rate(&out.output).with_context(|| format!("no rate in {:?}", out.output))?);
    }
    let _ = vm.stop(Duration::from_mins(1));
    Ok(rates)
}

/// The MB/s busybox dd prints last: "... copied, 1.2 seconds, 103.7MB/s" (or kB/s, GB/s).
fn dd_rate(output: &str) -> Option<f64> {
    let last = output.lines().rev().find(|l| l.contains("copied"))?;
    let rate = last.rsplit(", ").next()?.trim();
    let (number, unit) = rate.split_at(rate.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.trim().parse().ok()?;
    let scale = match unit {
        "B/s" => 1e-6,
        "kB/s" | "KB/s" => 1e-3,
        "MB/s" => 1.0,
        "GB/s" => 1e3,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod unit {
    use super::dd_rate;

    #[test]
    fn busybox_dd_rates_are_read_in_mb_per_second() {
        let out = "128+0 records in\n128+0 records out\n134217728 bytes (128.0MB) copied, 1.250000 seconds, 102.4MB/s";
        assert_eq!(dd_rate(out), Some(102.4));
        assert_eq!(dd_rate("x copied, 2 seconds, 512.0kB/s"), Some(0.512));
        assert_eq!(dd_rate("no rate here"), None);
    }
}
