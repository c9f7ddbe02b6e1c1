//! Boot benchmark: capvm and QEMU side by side on the same guest, in one run.
//!
//! The guest is the kit (Debian bzImage + busybox initramfs, `capvm.action=agent`)
//! with the same vCPUs and memory under each VMM. For each VMM and run it
//! measures, on the host's clock:
//! - `boot_s`: from starting the VMM to the kit's ready marker on the console;
//! - `poweroff_s`: from asking the guest to power off (the agent's `poweroff`,
//!   i.e. the guest's own ACPI S5) to the VMM's exit;
//! - `host_mib`: the VMM's host-side memory at the ready marker: the resident
//!   memory of every process of the VMM (capvm: the supervisor and its
//!   children) minus the guest RAM mapping(s), from `/proc/PID/smaps`.
//!
//! Prints one `MEASURE` line per run, the medians, and capvm's ratio to each
//! QEMU machine. Usage: `bench_boot [--runs N] [--vmm capvm,microvm,q35]
//! [--cpus N] [--memory MIB]`; `scripts/bench-boot.sh` builds and runs it
//! where KVM runs ordinary guests (inside the test host on PVM machines).

use std::fs;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tests::kit::{Action, Kit, KitCmdline};
use tests::launcher::{Accel, CapvmLauncher, GuestSpec, Launcher, Machine, QemuLauncher};
use tests::testvm::TestVm;

const BOOT_TIMEOUT: Duration = Duration::from_mins(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Capvm,
    Qemu(Machine),
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Capvm => "capvm",
            Vmm::Qemu(Machine::Microvm) => "qemu-microvm",
            Vmm::Qemu(Machine::Q35) => "qemu-q35",
        }
    }

    fn parse(word: &str) -> anyhow::Result<Vmm> {
        Ok(match word {
            "capvm" => Vmm::Capvm,
            "microvm" => Vmm::Qemu(Machine::Microvm),
            "q35" => Vmm::Qemu(Machine::Q35),
            _ => bail!("unknown VMM {word:?} (capvm, microvm, q35)"),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    boot_s: f64,
    poweroff_s: f64,
    host_mib: f64,
}

fn main() -> ExitCode {
    tests::bench::exit_code("bench_boot", run())
}

fn run() -> anyhow::Result<()> {
    let mut runs = 3usize;
    let mut vmms = vec![
        Vmm::Capvm,
        Vmm::Qemu(Machine::Microvm),
        Vmm::Qemu(Machine::Q35),
    ];
    let mut cpus = 2u32;
    let mut memory_mib = 512u32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => runs = value()?.parse()?,
            "--vmm" => {
                vmms = value()?
                    .split(',')
                    .map(Vmm::parse)
                    .collect::<anyhow::Result<_>>()?;
            }
            "--cpus" => cpus = value()?.parse()?,
            "--memory" => memory_mib = value()?.parse()?,
            _ => bail!("unknown argument {arg:?}"),
        }
    }
    let kit = Kit::locate()?;
    let where_ = if std::env::var_os("CAPVM_IN_TESTHOST").is_some() {
        "inside the emulated test host (nested KVM under QEMU TCG)"
    } else {
        "directly on this host's KVM"
    };
    println!("bench_boot: {runs} runs each, {cpus} vCPUs, {memory_mib} MiB, {where_}");
    // The same command line for every VMM (QemuLauncher adds microvm's own arguments).
    let spec = |_vmm: Vmm| -> anyhow::Result<GuestSpec> {
        let mut cmdline = KitCmdline::new(Action::Agent);
        cmdline.cpus = Some(cpus);
        Ok(GuestSpec {
            kernel: kit.kernel.clone(),
            initrd: kit.initrd.clone(),
            cmdline: cmdline.render()?,
            cpus,
            memory_mib,
        })
    };
    let mut results: Vec<(Vmm, Vec<Sample>)> = vmms.iter().map(|v| (*v, Vec::new())).collect();
    // Interleaved, so drift of the machine hits every VMM alike.
    for run in 1..=runs {
        for (vmm, samples) in &mut results {
            match measure(*vmm, &spec(*vmm)?, memory_mib) {
                Ok(s) => {
                    println!(
                        "MEASURE bench vmm={} run={run} boot_s={:.2} poweroff_s={:.2} host_mib={:.1}",
                        vmm.name(),
                        s.boot_s,
                        s.poweroff_s,
                        s.host_mib
                    );
                    samples.push(s);
                }
                Err(e) => println!("FAILED bench vmm={} run={run}: {e:#}", vmm.name()),
            }
        }
    }
    println!();
    println!(
        "{:<14} {:>8} {:>11} {:>9}  (medians)",
        "vmm", "boot_s", "poweroff_s", "host_mib"
    );
    let medians: Vec<(Vmm, Option<Sample>)> =
        results.iter().map(|(v, s)| (*v, median(s))).collect();
    for (vmm, m) in &medians {
        match m {
            Some(m) => println!(
                "{:<14} {:>8.2} {:>11.2} {:>9.1}",
                vmm.name(),
                m.boot_s,
                m.poweroff_s,
                m.host_mib
            ),
            None => println!("{:<14} {:>8} {:>11} {:>9}", vmm.name(), "-", "-", "-"),
        }
    }
    if let Some((_, Some(capvm))) = medians.iter().find(|(v, _)| *v == Vmm::Capvm) {
        for (vmm, m) in &medians {
            if let (Vmm::Qemu(_), Some(q)) = (vmm, m) {
                println!(
                    "RATIO capvm/{}: boot {:.2}  poweroff {:.2}  host_memory {:.2}",
                    vmm.name(),
                    capvm.boot_s / q.boot_s,
                    capvm.poweroff_s / q.poweroff_s,
                    capvm.host_mib / q.host_mib
                );
            }
        }
    }
    Ok(())
}

fn median(samples: &[Sample]) -> Option<Sample> {
    let pick = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    Some(Sample {
        boot_s: pick(|s| s.boot_s)?,
        poweroff_s: pick(|s| s.poweroff_s)?,
        host_mib: pick(|s| s.host_mib)?,
    })
}

fn measure(vmm: Vmm, spec: &GuestSpec, memory_mib: u32) -> anyhow::Result<Sample> {
    let launcher: Box<dyn Launcher> = match vmm {
        Vmm::Capvm => Box::new(CapvmLauncher::new("bench")),
        Vmm::Qemu(machine) => Box::new(QemuLauncher::new(machine, Accel::Kvm)),
    };
    let mut vm = TestVm::start(launcher.as_ref(), spec)?;
    let booted = vm.wait_ready(BOOT_TIMEOUT)?;
    // Let the guest settle into its idle agent loop before sampling memory.
    std::thread::sleep(Duration::from_millis(500));
    let guest_bytes = u64::from(memory_mib) << 20;
    let host_kib: u64 = descendants(vm.pid())
        .into_iter()
        .map(|pid| non_guest_rss_kib(pid, guest_bytes))
        .sum();
    let stopping = Instant::now();
    let status = vm.stop(Duration::from_mins(1))?;
    let poweroff_s = stopping.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{} exited with {status} after poweroff", vmm.name());
    }
    #[allow(clippy::cast_precision_loss)] // KiB counts far below 2^52
    let host_mib = host_kib as f64 / 1024.0;
    Ok(Sample {
        boot_s: booted.wall.as_secs_f64(),
        poweroff_s,
        host_mib,
    })
}

/// Every live process below `root` (not `root` itself: the fixture's `timeout`).
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))?
                .trim()
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while let Some(&p) = found.get(i) {
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.retain(|&p| p != root);
    found
}

/// Resident KiB of `pid` outside its guest RAM mappings: a mapping at least
/// half the guest's RAM is guest RAM (capvm's memfd in the runner, QEMU's
/// anonymous RAM block); everything else is the VMM's own.
fn non_guest_rss_kib(pid: u32, guest_bytes: u64) -> u64 {
    let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut total = 0u64;
    let mut guest_mapping = false;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            let kib: u64 = size
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            guest_mapping = kib.saturating_mul(1024) >= guest_bytes / 2;
        } else if let Some(rss) = line.strip_prefix("Rss:")
            && !guest_mapping
        {
            total += rss
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}
