//! End-to-end: disks of real kit guests under `vm start -f` — a `dev-blk` per `diskN`,
//! seen by the guest as `/dev/vda`, `/dev/vdb`, ...
//!
//! - `a_guest_disk_reads_and_writes_the_image_and_synced_data_survives_sigkill`: bytes the
//!   guest writes with `dd conv=fsync` are in the image, bytes the host wrote before boot
//!   are what the guest reads, the queue shows `sectorsize=` and `min(cpu, 16)` queues, the
//!   serial is the one derived from the guest's UUID, each dev-blk is sandboxed; then the
//!   guest writes through its page cache and runs `sync`, the whole guest gets SIGKILL, and
//!   those bytes are in the image.
//! - `a_read_only_second_disk_refuses_writes_and_discard_frees_blocks`: `disk1_opts="ro"` is
//!   read-only in the guest and the image is unchanged after a write attempt; `blkdiscard`
//!   on `/dev/vda` makes the sparse image's allocated blocks drop on the host. The guest runs
//!   under `vm install -f`, so an ISO is `/dev/vdc`, read-only.
//!
//! Each test boots one guest (about 30 s inside the emulated test host). Binaries: this
//! build's `target/<profile>` (`cargo build --release -p supervisor -p vcpu-runner -p
//! dev-blk` first).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tests::harness::{self, E2e, Needs};
use tests::kit::{Action, Kit, KitCmdline};
use tests::launcher::{CapvmLauncher, GuestSpec, LaunchError, Launcher};
use tests::procfs;
use tests::testvm::TestVm;

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const CMD_TIMEOUT: Duration = Duration::from_mins(1);
const NAME: &str = "kit";
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;
const UUID: &str = "5a1c0e2f-1111-4222-8333-444455556666";
/// The serials capvm derives from [`UUID`].
const SERIAL0: &str = "5a1c0e2f-d0";
const DISK_BYTES: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

fn main() -> ExitCode {
    // SAFETY: single-threaded here, before the harness starts any thread.
    unsafe { std::env::set_var("CAPVM_LIBEXEC", tests::harness::build_dir()) };
    let minutes = Duration::from_mins;
    harness::main(&[
        E2e {
            name: "a_guest_disk_reads_and_writes_the_image_and_synced_data_survives_sigkill",
            needs: Needs::Kvm,
            timeout: minutes(5),
            run: read_write_sigkill,
        },
        E2e {
            name: "a_dev_blk_killed_three_times_under_guest_io_loses_nothing",
            needs: Needs::Kvm,
            timeout: minutes(6),
            run: killed_dev_blk,
        },
        E2e {
            name: "a_read_only_second_disk_refuses_writes_and_discard_frees_blocks",
            needs: Needs::Kvm,
            timeout: minutes(5),
            run: read_only_and_discard,
        },
    ])
}

/// A disk image to create in the guest directory: `size` bytes, sparse, with `data` written
/// at each offset.
#[derive(Debug, Clone)]
struct Image {
    name: &'static str,
    size: u64,
    data: Vec<(u64, Vec<u8>)>,
}

/// [`CapvmLauncher`] plus disks: the images, and `conf` lines appended to `NAME.conf`; with
/// `iso`, that file is made in the datastore's `.iso/` and the guest runs under `vm install
/// -f NAME ISO` instead of `vm start -f NAME`.
#[derive(Debug)]
struct WithDisks {
    inner: CapvmLauncher,
    images: Vec<Image>,
    conf: String,
    iso: Option<(&'static str, Vec<u8>)>,
}

impl Launcher for WithDisks {
    fn name(&self) -> String {
        "capvm".to_owned()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let command = self.inner.command(spec, workdir)?;
        let dir = guest_dir(workdir);
        let prepare = |path: PathBuf, result: std::io::Result<()>| {
            result.map_err(|source| LaunchError::Prepare { path, source })
        };
        let conf = dir.join(format!("{NAME}.conf"));
        prepare(
            conf.clone(),
            fs::OpenOptions::new()
                .append(true)
                .open(&conf)
                .and_then(|mut f| f.write_all(self.conf.as_bytes())),
        )?;
        for image in &self.images {
            let path = dir.join(image.name);
            prepare(path.clone(), create_image(&path, image))?;
        }
        let Some((iso, bytes)) = &self.iso else {
            return Ok(command);
        };
        let path = workdir.join("vms").join(".iso").join(iso);
        prepare(path.clone(), fs::write(&path, bytes))?;
        let mut install = self.inner.vm_command(workdir);
        install.args(["install", "-f", NAME, iso]);
        Ok(install)
    }
}

fn create_image(path: &Path, image: &Image) -> std::io::Result<()> {
    let mut file = fs::File::create(path)?;
    file.set_len(image.size)?;
    for (offset, bytes) in &image.data {
        file.seek(SeekFrom::Start(*offset))?;
        file.write_all(bytes)?;
    }
    file.sync_all()
}

fn guest_dir(workdir: &Path) -> PathBuf {
    workdir.join("vms").join(NAME)
}

fn read_at(path: &Path, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let mut file = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// A recognisable block of `len` bytes: `tag` repeated.
fn pattern(tag: &str, len: usize) -> Vec<u8> {
    tag.bytes().cycle().take(len).collect()
}

fn start(
    images: Vec<Image>,
    conf: &str,
    iso: Option<(&'static str, Vec<u8>)>,
) -> anyhow::Result<TestVm> {
    let mut cmdline = KitCmdline::new(Action::Agent);
    cmdline.cpus = Some(CPUS);
    let kit = Kit::locate()?;
    let spec = GuestSpec {
        kernel: kit.kernel.clone(),
        initrd: kit.initrd.clone(),
        cmdline: cmdline.render()?,
        cpus: CPUS,
        memory_mib: MEMORY_MIB,
    };
    let launcher = WithDisks {
        inner: CapvmLauncher::new(NAME),
        images,
        conf: format!("uuid=\"{UUID}\"\n{conf}"),
        iso,
    };
    let mut vm = TestVm::start(&launcher, &spec)?;
    let booted = vm
        .wait_ready(BOOT_TIMEOUT)
        .map_err(|e| with_logs(&vm, e.into()))?;
    println!(
        "MEASURE disks boot wall_to_ready_s={:.1} uptime_s={:.2}",
        booted.wall.as_secs_f64(),
        booted.ready.uptime_s
    );
    Ok(vm)
}

/// Runs `attempt` once more if its guest triple-faulted inside the emulated test host.
///
/// Measured there (QEMU TCG emulating SVM, nested KVM): about one guest boot in ten with
/// virtio-pci disks ended in a triple fault with nothing on the console, and QEMU's own q35
/// guests reset silently the same way (`tests/tests/boot_reference.rs`). Where /dev/kvm runs
/// guests directly a triple fault fails the test at once; here it is retried once, and the
/// retry is printed with the full logs, never hidden.
fn nested_fault_retry(
    mut attempt: impl FnMut() -> Result<(), (bool, anyhow::Error)>,
) -> anyhow::Result<()> {
    let nested = std::env::var_os("CAPVM_IN_TESTHOST").is_some();
    match attempt() {
        Ok(()) => Ok(()),
        Err((true, e)) if nested => {
            println!("RETRY: the nested guest triple-faulted (emulated SVM); once more:\n{e:#}");
            attempt().map_err(|(_, e)| e)
        }
        Err((_, e)) => Err(e),
    }
}

/// Whether the guest of `vm` ended in a triple fault (its supervisor logs it).
fn triple_faulted(vm: &TestVm) -> bool {
    fs::read_to_string(guest_dir(vm.workdir()).join("vm-bhyve.log"))
        .is_ok_and(|log| log.contains("triple fault"))
}

/// `e` with the guest's console and its processes' logs, for a failure report.
fn with_logs(vm: &TestVm, e: anyhow::Error) -> anyhow::Error {
    let e = e.context("disks e2e");
    vm.with_logs(
        NAME,
        &["vm-bhyve.log", "vcpu-runner.log", "dev-blk0.log"],
        &e,
    )
}

/// Runs `command` in the guest; it must exit 0. Returns its output, trimmed.
fn run_ok(vm: &mut TestVm, command: &str) -> anyhow::Result<String> {
    vm.run_ok(command, CMD_TIMEOUT)
}

/// The foreground supervisor's pid: the `vm` child of the fixture's `timeout`.
fn supervisor_of(vm: &TestVm) -> anyhow::Result<u32> {
    let found = procfs::children_named(vm.pid(), "vm");
    found
        .first()
        .copied()
        .with_context(|| format!("no vm process under {}", vm.pid()))
}

/// (a) + (c): one guest, one 4K-sector disk.
fn read_write_sigkill() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    nested_fault_retry(|| {
        let mut vm = None;
        read_write_sigkill_in(&mut vm).map_err(|e| match &vm {
            Some(vm) => (triple_faulted(vm), with_logs(vm, e)),
            None => (false, e),
        })
    })
}

fn read_write_sigkill_in(slot: &mut Option<TestVm>) -> anyhow::Result<()> {
    let host_block = pattern("HOST-WROTE-THIS;", 4096);
    let image = Image {
        name: "disk0.img",
        size: DISK_BYTES,
        data: vec![(MIB, host_block.clone())],
    };
    let vm = start(
        vec![image],
        "disk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"\ndisk0_opts=\"sectorsize=4096\"\n",
        None,
    )?;
    let vm = slot.insert(vm);
    let path = guest_dir(vm.workdir()).join("disk0.img");

    // What the guest sees of the device.
    let bs = run_ok(vm, "cat /sys/block/vda/queue/logical_block_size")?;
    ensure!(bs == "4096", "logical_block_size {bs}");
    let queues = run_ok(vm, "ls /sys/block/vda/mq | wc -l")?;
    ensure!(
        queues == CPUS.to_string(),
        "{queues} queues for {CPUS} cpus"
    );
    let serial = run_ok(
        vm,
        "cat /sys/block/vda/serial 2>/dev/null || cat /sys/block/vda/device/serial",
    )?;
    ensure!(serial == SERIAL0, "serial {serial:?}");
    let size = run_ok(vm, "cat /sys/block/vda/size")?;
    ensure!(
        size == (DISK_BYTES / 512).to_string(),
        "size {size} sectors"
    );

    // Host → guest: the block written before boot.
    let read = run_ok(
        vm,
        "dd if=/dev/vda bs=4096 skip=256 count=1 2>/dev/null | md5sum",
    )?;
    let want = md5_hex(vm, &host_block)?;
    ensure!(
        read.starts_with(&want),
        "guest read {read}, host block md5 {want}"
    );

    // Guest → host: a direct, fsynced write.
    let started = Instant::now();
    run_ok(
        vm,
        "dd if=/dev/zero bs=4096 count=1 2>/dev/null | tr '\\000' G | dd of=/dev/vda bs=4096 seek=512 oflag=direct conv=fsync 2>&1",
    )?;
    println!(
        "MEASURE disks guest_dd_direct_fsync_4k_s={:.2}",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        read_at(&path, 2 * MIB, 4096)? == vec![b'G'; 4096],
        "the guest's block is not at 2 MiB of the image"
    );
    ensure!(
        read_at(&path, 2 * MIB + 4096, 4096)? == vec![0; 4096],
        "the guest wrote past its block"
    );

    // Each dev-blk is sandboxed, and a child of the supervisor.
    let supervisor = supervisor_of(vm)?;
    let devices = procfs::children_named(supervisor, "dev-blk");
    ensure!(devices.len() == 1, "dev-blks of {supervisor}: {devices:?}");
    for &pid in &devices {
        procfs::assert_sandboxed(pid)?;
    }
    let runners = procfs::children_named(supervisor, "vcpu-runner");

    // (c) Through the guest's page cache, then `sync`, then SIGKILL of everything.
    run_ok(
        vm,
        "dd if=/dev/zero bs=4096 count=4 2>/dev/null | tr '\\000' S | dd of=/dev/vda bs=4096 seek=768 2>&1 && sync",
    )?;
    let group = nix::unistd::Pid::from_raw(i32::try_from(vm.pid())?);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL)?;
    for pid in [supervisor].iter().chain(&devices).chain(&runners) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(*pid)?),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + CMD_TIMEOUT;
    while [supervisor]
        .iter()
        .chain(&devices)
        .chain(&runners)
        .any(|&p| procfs::alive(p))
    {
        ensure!(
            Instant::now() < deadline,
            "a guest process outlived SIGKILL"
        );
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        read_at(&path, 3 * MIB, 4 * 4096)? == vec![b'S'; 4 * 4096],
        "the synced blocks are not in the image after SIGKILL"
    );
    Ok(())
}

/// Issue 8: while the guest writes, reads back and compares a pattern over `/dev/vda` in a
/// loop (direct I/O, so every round trip reaches dev-blk), SIGKILL dev-blk three times. The
/// supervisor restarts it each time, the new process replays what was in flight: the guest's
/// loop sees no error, its kernel logs no I/O error, and the image holds the last pattern.
fn killed_dev_blk() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    nested_fault_retry(|| {
        let mut vm = None;
        killed_dev_blk_in(&mut vm).map_err(|e| match &vm {
            Some(vm) => (triple_faulted(vm), with_logs(vm, e)),
            None => (false, e),
        })
    })
}

fn killed_dev_blk_in(slot: &mut Option<TestVm>) -> anyhow::Result<()> {
    const ROUNDS: u32 = 40;
    let image = Image {
        name: "disk0.img",
        size: DISK_BYTES,
        data: Vec::new(),
    };
    let vm = start(
        vec![image],
        "disk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"\n",
        None,
    )?;
    let vm = slot.insert(vm);
    let path = guest_dir(vm.workdir()).join("disk0.img");
    // Round r writes 1 MiB of the byte (r % 200 + 32) at 1 MiB · (r % 8), reads it back and
    // compares; any error ends the loop with LOOP-ERROR.
    run_ok(
        vm,
        &format!(
            "(r=1; while [ $r -le {ROUNDS} ]; do \
               c=$(printf '%03o' $((r % 200 + 32))); \
               dd if=/dev/zero bs=65536 count=16 2>/dev/null | tr '\\000' \"\\\\$c\" > /tmp/p || break; \
               dd if=/tmp/p of=/dev/vda bs=65536 seek=$((16 * (r % 8))) oflag=direct 2>/tmp/err || {{ echo LOOP-ERROR write $r; cat /tmp/err; break; }}; \
               dd if=/dev/vda of=/tmp/q bs=65536 skip=$((16 * (r % 8))) count=16 iflag=direct 2>/tmp/err || {{ echo LOOP-ERROR read $r; cat /tmp/err; break; }}; \
               cmp -s /tmp/p /tmp/q || {{ echo LOOP-ERROR compare $r; break; }}; \
               r=$((r + 1)); \
             done; echo LOOP-DONE $((r - 1))) > /tmp/loop.log 2>&1 &"
        ),
    )?;
    let supervisor = supervisor_of(vm)?;
    let dir = guest_dir(vm.workdir());
    for kill in 1..=3usize {
        thread::sleep(Duration::from_millis(700) * u32::try_from(kill)?);
        let pids = procfs::children_named(supervisor, "dev-blk");
        ensure!(pids.len() == 1, "dev-blks before kill {kill}: {pids:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pids[0])?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read_to_string(dir.join("vm-bhyve.log")).unwrap_or_default();
            if log.matches("dev-blk0 restarted").count() >= kill {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "dev-blk0 was not restarted after kill {kill}:\n{log}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    let deadline = Instant::now() + Duration::from_mins(3);
    let log = loop {
        let out = run_ok(vm, "cat /tmp/loop.log")?;
        if out.contains("LOOP-DONE") || out.contains("LOOP-ERROR") {
            break out;
        }
        ensure!(
            Instant::now() < deadline,
            "the guest's loop did not finish: {out}"
        );
        thread::sleep(Duration::from_secs(1));
    };
    ensure!(
        log.contains(&format!("LOOP-DONE {ROUNDS}")) && !log.contains("LOOP-ERROR"),
        "the guest's I/O loop saw an error across the restarts: {log}"
    );
    let dmesg = run_ok(
        vm,
        "dmesg | grep -i -E 'I/O error|blk_update|virtio_blk' || true",
    )?;
    ensure!(
        !dmesg.to_ascii_lowercase().contains("error"),
        "the guest kernel logged disk errors: {dmesg}"
    );
    // The image holds each slot's last pattern: slot k last written in the last round r ≡ k.
    for k in 0..8u64 {
        let last = (1..=u64::from(ROUNDS))
            .rev()
            .find(|r| r % 8 == k)
            .unwrap_or(0);
        let want = u8::try_from(last % 200 + 32)?;
        let got = read_at(&path, k * MIB, usize::try_from(MIB)?)?;
        ensure!(
            got.iter().all(|&b| b == want),
            "slot {k} of the image does not hold round {last}'s byte {want:#x}"
        );
    }
    let restarts = fs::read_to_string(dir.join("vm-bhyve.log"))?;
    let times: Vec<&str> = restarts
        .lines()
        .filter(|l| l.contains("dev-blk0 restarted"))
        .collect();
    println!("MEASURE disks dev_blk_restarts {times:?}");
    Ok(())
}

/// The md5 of `bytes`, by the host's `md5sum` (the guest's busybox has the same).
fn md5_hex(vm: &TestVm, bytes: &[u8]) -> anyhow::Result<String> {
    let file = vm.workdir().join("md5-input");
    fs::write(&file, bytes)?;
    let out = Command::new("md5sum").arg(&file).output()?;
    ensure!(out.status.success(), "md5sum failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// (b): vda writable and sparse, vdb `ro`.
fn read_only_and_discard() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    nested_fault_retry(|| {
        let mut vm = None;
        read_only_and_discard_in(&mut vm).map_err(|e| match &vm {
            Some(vm) => (triple_faulted(vm), with_logs(vm, e)),
            None => (false, e),
        })
    })
}

fn read_only_and_discard_in(slot: &mut Option<TestVm>) -> anyhow::Result<()> {
    let ro_bytes = pattern("READ-ONLY-DISK;", 1 << 20);
    let iso_bytes = pattern("INSTALL-MEDIA;", 2 << 20);
    // 8 MiB allocated at the start of vda, for blkdiscard to free half of.
    let allocated = pattern("ALLOCATED;", 8 << 20);
    let images = vec![
        Image {
            name: "disk0.img",
            size: DISK_BYTES,
            data: vec![(0, allocated.clone())],
        },
        Image {
            name: "disk1.img",
            size: 1 << 20,
            data: vec![(0, ro_bytes.clone())],
        },
    ];
    let vm = start(
        images,
        "disk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"\n\
         disk1_type=\"virtio-blk\"\ndisk1_name=\"disk1.img\"\ndisk1_opts=\"ro\"\n",
        Some(("inst.iso", iso_bytes.clone())),
    )?;
    let vm = slot.insert(vm);
    let dir = guest_dir(vm.workdir());

    let disks = run_ok(vm, "ls -d /sys/block/vd*")?;
    ensure!(
        disks.split_whitespace().collect::<Vec<_>>()
            == ["/sys/block/vda", "/sys/block/vdb", "/sys/block/vdc"],
        "block devices: {disks}"
    );
    // vm install: the ISO is the disk after the configured ones, read-only.
    ensure!(
        run_ok(vm, "cat /sys/block/vdc/ro")? == "1",
        "vdc is not read-only"
    );
    let iso_head = run_ok(vm, "dd if=/dev/vdc bs=13 count=1 2>/dev/null")?;
    ensure!(iso_head == "INSTALL-MEDIA", "vdc reads {iso_head:?}");
    ensure!(
        run_ok(vm, "cat /sys/block/vdb/ro")? == "1",
        "vdb is not read-only"
    );
    ensure!(
        run_ok(vm, "cat /sys/block/vda/ro")? == "0",
        "vda is read-only"
    );
    let write = vm.run(
        "dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct conv=fsync 2>&1",
        CMD_TIMEOUT,
    )?;
    ensure!(write.status != 0, "writing vdb succeeded: {}", write.output);
    println!("disks: writing the ro disk: {}", write.output.trim());
    ensure!(
        fs::read(dir.join("disk1.img"))? == ro_bytes,
        "the read-only image changed"
    );
    let read = run_ok(vm, "dd if=/dev/vdb bs=15 count=1 2>/dev/null")?;
    ensure!(read == "READ-ONLY-DISK;", "vdb reads {read:?}");

    // Discard frees the image's blocks on the host.
    let before = fs::metadata(dir.join("disk0.img"))?.blocks();
    let discard = vm.run("blkdiscard -o 0 -l 4194304 /dev/vda 2>&1", CMD_TIMEOUT)?;
    let granularity = run_ok(vm, "cat /sys/block/vda/queue/discard_granularity")?;
    ensure!(
        discard.status == 0,
        "blkdiscard failed ({}), discard_granularity {granularity}",
        discard.output
    );
    let after = fs::metadata(dir.join("disk0.img"))?.blocks();
    println!("MEASURE disks discard_4MiB st_blocks_before={before} after={after}");
    // 4 MiB is 8192 blocks of 512 bytes; allow for file system rounding.
    ensure!(
        before.saturating_sub(after) >= 8000,
        "st_blocks {before} -> {after} after discarding 4 MiB"
    );
    ensure!(
        read_at(&dir.join("disk0.img"), 4 << 20, 4 << 20)?
            == allocated.get(4 << 20..).unwrap_or_default(),
        "data past the discarded range changed"
    );
    let zero = run_ok(
        vm,
        "dd if=/dev/vda bs=4096 count=1 2>/dev/null | tr -d '\\000' | wc -c",
    )?;
    ensure!(
        zero == "0",
        "the discarded range reads {zero} non-zero bytes"
    );
    Ok(())
}
