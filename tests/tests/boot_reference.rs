//! The reference boot: QEMU on KVM boots the unmodified guest kit, which
//! reports ready and runs commands. capvm's own boot is compared with these
//! numbers (the `MEASURE` lines). Where the host's KVM cannot run ordinary
//! guests, the KVM tests run inside the test host (see `tests::harness`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tests::harness::{self, E2e, Needs};
use tests::kit::{Action, Kit, KitCmdline};
use tests::launcher::{Accel, GuestSpec, Machine, QemuLauncher};
use tests::testvm::{TestVm, VmError};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const CMD_TIMEOUT: Duration = Duration::from_mins(1);
const CPUS: u32 = 2;

fn main() -> ExitCode {
    let minutes = Duration::from_mins;
    harness::main(&[
        E2e {
            name: "kit_build_is_cached_and_ordered",
            needs: Needs::Nothing,
            timeout: minutes(10),
            run: kit_build,
        },
        E2e {
            name: "qemu_microvm_boots_kit_and_runs_a_command",
            needs: Needs::Kvm,
            timeout: minutes(4),
            run: microvm,
        },
        E2e {
            name: "qemu_q35_boots_kit_and_runs_a_command",
            needs: Needs::Kvm,
            timeout: minutes(4),
            run: q35,
        },
        E2e {
            name: "qemu_q35_boots_bzimage",
            needs: Needs::Kvm,
            timeout: minutes(4),
            run: q35_bzimage,
        },
        E2e {
            name: "qemu_microvm_agent_runs_commands_and_stops",
            needs: Needs::Kvm,
            timeout: minutes(4),
            run: agent,
        },
    ])
}

/// The kit builds (or comes from the cache), a second call is a cache hit,
/// and each initramfs loads every module after its dependencies.
fn kit_build() -> anyhow::Result<()> {
    let first = Kit::build().context("building the kit")?;
    let second = Kit::build().context("building the kit again")?;
    println!(
        "MEASURE kit_build first_s={:.1} (cached: {}) second_s={:.1}",
        first.elapsed.as_secs_f64(),
        first.cached,
        second.elapsed.as_secs_f64()
    );
    ensure!(second.cached, "the second build was not a cache hit");
    ensure!(
        second.kit == first.kit,
        "the second build gave another kit: {}",
        second.kit.dir.display()
    );
    ensure!(
        second.elapsed < Duration::from_secs(30),
        "a cache hit took {:?}",
        second.elapsed
    );
    for flavour in ["kit", "testhost"] {
        let order = std::fs::read_to_string(first.kit.dir.join(format!("{flavour}.modules")))?;
        let order: Vec<&str> = order.lines().collect();
        let deps = std::fs::read_to_string(first.kit.dir.join(format!("{flavour}.deps")))?;
        for line in deps.lines() {
            let mut fields = line.split(' ');
            let module = fields.next().unwrap_or_default();
            let at = order
                .iter()
                .position(|m| *m == module)
                .with_context(|| format!("{module} not loaded"))?;
            for dep in fields
                .next()
                .unwrap_or_default()
                .split(',')
                .filter(|d| !d.is_empty())
            {
                let dep_at = order
                    .iter()
                    .position(|m| *m == dep)
                    .with_context(|| format!("{dep} not loaded"))?;
                ensure!(dep_at < at, "{flavour}: {dep} loads after {module}");
            }
        }
        for needed in [
            "virtio_pci",
            "virtio_mmio",
            "virtio_blk",
            "virtio_net",
            "bochs",
        ] {
            ensure!(order.contains(&needed), "{flavour} lacks {needed}");
        }
    }
    Ok(())
}

fn spec(kit: &Kit, kernel: &std::path::Path, cmdline: &KitCmdline) -> anyhow::Result<GuestSpec> {
    Ok(GuestSpec {
        kernel: kernel.to_owned(),
        initrd: kit.initrd.clone(),
        cmdline: cmdline.render()?,
        cpus: CPUS,
        memory_mib: 256,
    })
}

/// Boots the kit with `capvm.action=run`: the CPU count, then the built-in
/// checks that prove the virtio modules bound the rng device.
fn boot_and_run(machine: Machine, bzimage: bool, rng_device: &str) -> anyhow::Result<()> {
    let kit = Kit::locate()?;
    let mut cmdline = KitCmdline::new(Action::Run(
        "grep -c ^processor /proc/cpuinfo; kit-test cpus virtio rng".into(),
    ));
    cmdline.cpus = Some(CPUS);
    let kernel = if bzimage { &kit.kernel } else { &kit.vmlinux };
    let mut launcher = QemuLauncher::new(machine, Accel::Kvm);
    launcher.extra = vec!["-device".into(), rng_device.into()];
    let mut vm = TestVm::start(&launcher, &spec(&kit, kernel, &cmdline)?)?;

    let booted = vm.wait_ready(BOOT_TIMEOUT)?;
    let ran = vm.wait_run_exit(CMD_TIMEOUT)?;
    let status = vm.wait_exit(CMD_TIMEOUT)?;

    println!(
        "MEASURE boot machine={} kernel={} wall_to_ready_s={:.1} guest_uptime_s={:.2}",
        machine.name(),
        if bzimage { "bzImage" } else { "vmlinux-pvh" },
        booted.wall.as_secs_f64(),
        booted.ready.uptime_s
    );
    ensure!(
        booted.ready.cpus == CPUS,
        "ready marker says {} cpus",
        booted.ready.cpus
    );
    ensure!(
        booted.ready.kernel == kit.kernel_release,
        "guest runs {}",
        booted.ready.kernel
    );
    ensure!(
        ran.status == 0,
        "the command failed ({}):\n{}",
        ran.status,
        ran.output
    );
    let first = ran
        .output
        .lines()
        .find(|l| !l.starts_with('['))
        .unwrap_or_default();
    ensure!(
        first == CPUS.to_string(),
        "grep counted {first:?} processors:\n{}",
        ran.output
    );
    for check in ["cpus ok", "virtio ok", "rng ok current=virtio_rng"] {
        ensure!(
            ran.output.contains(&format!("CAPVM-KIT: result {check}")),
            "no `{check}` in:\n{}",
            ran.output
        );
    }
    ensure!(
        status.success(),
        "QEMU exited with {status} after the guest powered off"
    );
    Ok(())
}

/// Inside the test host (KVM nested under TCG) a guest sometimes resets
/// before its console says anything (about one q35 boot in three, seldom on
/// microvm): QEMU then exits 0 without output. That is the emulation, not the
/// guest, so there it gets up to two more tries, each reported; a guest that
/// said anything and then failed is never retried. On real KVM: no retry.
fn nested_retry(mut boot: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let nested = std::env::var_os("CAPVM_IN_TESTHOST").is_some();
    let mut attempt = 1;
    loop {
        match boot() {
            Err(e) if nested && attempt < 3 && silent_reset(&e) => {
                println!(
                    "RETRY: attempt {attempt}: the nested guest reset before any output: {e:#}"
                );
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn silent_reset(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<VmError>(), Some(VmError::Closed { what, tail, .. })
        if what == "the ready marker" && tail.lines().all(|l| l.trim().is_empty() || l.starts_with("---")))
}

fn microvm() -> anyhow::Result<()> {
    nested_retry(|| boot_and_run(Machine::Microvm, false, "virtio-rng-device"))
}

/// QEMU's q35 machine under nested SVM inside the emulated test host is not
/// reliable: measured on this workplace's machines, the PVH boot of the
/// uncompressed kernel froze or killed the test host twice in a row, and in CI
/// the bzImage boot once printed nothing for 120 s and on retry hung the test
/// host for 300 s. microvm passes there. So q35 runs only where /dev/kvm runs
/// guests directly (the users' hosts), and says so where it does not.
fn q35_nested_skip() -> anyhow::Result<()> {
    if std::env::var_os("CAPVM_IN_TESTHOST").is_some() {
        return Err(harness::skip(
            "QEMU q35 under nested SVM in the emulated test host hangs or kills it \
             (measured locally and in CI); runs where /dev/kvm runs guests directly",
        ));
    }
    Ok(())
}

fn q35() -> anyhow::Result<()> {
    q35_nested_skip()?;
    nested_retry(|| boot_and_run(Machine::Q35, false, "virtio-rng-pci"))
}

fn q35_bzimage() -> anyhow::Result<()> {
    q35_nested_skip()?;
    nested_retry(|| boot_and_run(Machine::Q35, true, "virtio-rng-pci"))
}

/// The fixture's agent: several commands in one boot, exit statuses and
/// stderr come back, and `stop` powers the guest off.
fn agent() -> anyhow::Result<()> {
    nested_retry(agent_once)
}

fn agent_once() -> anyhow::Result<()> {
    let kit = Kit::locate()?;
    let launcher = QemuLauncher::new(Machine::Microvm, Accel::Kvm);
    let mut vm = TestVm::start(
        &launcher,
        &spec(&kit, &kit.vmlinux, &KitCmdline::new(Action::Agent))?,
    )?;
    let booted = vm.wait_ready(BOOT_TIMEOUT)?;
    println!(
        "MEASURE boot machine=microvm kernel=vmlinux-pvh action=agent wall_to_ready_s={:.1}",
        booted.wall.as_secs_f64()
    );

    let start = Instant::now();
    let cpus = vm.run("grep -c ^processor /proc/cpuinfo", CMD_TIMEOUT)?;
    let failing = vm.run(
        "echo to-stdout; echo to-stderr >&2; printf unterminated; exit 3",
        CMD_TIMEOUT,
    )?;
    let checks = vm.run("kit-test cpus mem", CMD_TIMEOUT)?;
    println!(
        "MEASURE agent three_commands_s={:.2}",
        start.elapsed().as_secs_f64()
    );
    let status = vm.stop(CMD_TIMEOUT)?;

    ensure!(
        cpus == tests::testvm::CommandOutput {
            status: 0,
            output: CPUS.to_string()
        },
        "{cpus:?}"
    );
    ensure!(
        failing.status == 3,
        "exit 3 came back as {}",
        failing.status
    );
    ensure!(
        failing.output == "to-stdout\nto-stderr\nunterminated",
        "output was {:?}",
        failing.output
    );
    ensure!(
        checks.status == 0 && checks.output.contains("result mem ok total_kib="),
        "{checks:?}"
    );
    ensure!(status.success(), "QEMU exited with {status} after poweroff");
    Ok(())
}
