//! dev-blk, the real sandboxed binary, started the way the supervisor starts it and driven by
//! a split-ring driver playing the guest (`tests::virtio_driver`): data reaches the image file,
//! flushes, read-only disks, discard and write-zeroes, `GET_ID`, multi-queue, hostile chains,
//! and the process's sandbox seen from outside.
//!
//! Needs root (the sandbox unshares namespaces and switches uid); skips with a reason
//! otherwise. Build the binary first: `cargo build -p dev-blk` (it is looked up beside this
//! test's `target/<profile>`).

// Test data is built from small loop counters; the casts to bytes cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelKind};
use proto::device::{BlockSetup, DeviceInfo, DeviceSetup, FromDevice, MemoryRegion, ToDevice};
use supervisor::spawn;
use tests::virtio_driver::{Buf, GuestRam, SplitQueue, Used, activation};

const RAM: u64 = 16 << 20;
const QSIZE: u16 = 128;
const WAIT: Duration = Duration::from_secs(10);
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: dev-blk tests need root (the sandbox unshares namespaces, switches uid)");
    true
}

/// A running dev-blk with a guest and a runner played by the test.
struct Harness {
    running: Option<spawn::Running>,
    runner: Channel,
    ram: GuestRam,
    disk: tempfile::NamedTempFile,
    log: tempfile::NamedTempFile,
    info: DeviceInfo,
    queues: Vec<SplitQueue>,
    /// What the device opens: the image, or a block device over it.
    disk_path: PathBuf,
    read_only: bool,
    /// The in-flight region handed to every incarnation, as the supervisor keeps it.
    inflight: Option<OwnedFd>,
}

/// Starts dev-blk on `ram` and the disk at `disk_path`, sends its setup, handshakes as the
/// runner and reads its `Info`.
fn spawn_device(
    ram: &GuestRam,
    disk_path: &std::path::Path,
    read_only: bool,
    queues: u16,
    log: &tempfile::NamedTempFile,
    inflight: Option<BorrowedFd<'_>>,
) -> (spawn::Running, Channel, DeviceInfo) {
    let disk_fd: File = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(disk_path)
        .expect("open image");
    // Appended to: every incarnation's lines stay.
    let log_fd = OpenOptions::new()
        .append(true)
        .open(log.path())
        .expect("log fd");
    let (runner, theirs) = Channel::pair().expect("device channel");
    let (uid, gid) = sandbox::nobody();
    let boot = Bootstrap {
        role: Role::DevBlk { index: 0 },
        vm_name: "blk-test".into(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: 64,
        },
        fds: [
            FdRole::Log,
            FdRole::GuestMemory,
            FdRole::Disk,
            FdRole::DeviceChannel,
        ]
        .into_iter()
        .chain(inflight.map(|_| FdRole::InflightRegion))
        .collect(),
        log_filter: "debug".into(),
    };
    let mut fds = vec![log_fd.as_fd(), ram.fd(), disk_fd.as_fd(), theirs.as_fd()];
    fds.extend(inflight);
    let running = spawn::spawn(&tests::harness::build_dir().join("dev-blk"), &boot, &fds)
        .expect("spawn dev-blk (run `cargo build -p dev-blk` first)");
    drop(theirs);
    let setup = DeviceSetup::Block(BlockSetup {
        memory: vec![MemoryRegion {
            guest_addr: 0,
            size: RAM,
            file_offset: 0,
        }],
        read_only,
        logical_block_size: 512,
        serial: "capvm-disk0-serial".into(),
        queues,
    });
    running.channel.send(&setup, &[]).expect("send setup");
    runner
        .handshake_timeout(ChannelKind::RunnerDevice, WAIT)
        .expect("handshake");
    let info = match runner.recv_timeout::<FromDevice>(WAIT).expect("info").msg {
        FromDevice::Info(info) => info,
        other => panic!("expected Info, got {other:?}"),
    };
    info.validate().expect("valid info");
    (running, runner, info)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

impl Harness {
    fn start(read_only: bool, queues: u16, disk_len: usize) -> Harness {
        Self::start_with(read_only, queues, disk_len, std::path::Path::to_path_buf)
    }

    /// Like [`Harness::start`], but the device gets `device(image path)` opened instead of
    /// the image itself (a loop device over it, say).
    fn start_with(
        read_only: bool,
        queues: u16,
        disk_len: usize,
        device: impl FnOnce(&std::path::Path) -> PathBuf,
    ) -> Harness {
        let ram = GuestRam::new(RAM).expect("guest RAM");
        let mut disk = tempfile::NamedTempFile::new_in("/var/tmp").expect("disk image");
        disk.write_all(&pattern(disk_len)).expect("fill image");
        disk.as_file().sync_all().expect("sync image");
        let disk_path = device(disk.path());
        let log = tempfile::NamedTempFile::new().expect("log file");
        let (running, runner, info) = spawn_device(&ram, &disk_path, read_only, queues, &log, None);
        let mut h = Harness {
            running: Some(running),
            runner,
            ram,
            disk,
            log,
            info,
            queues: Vec::new(),
            disk_path,
            read_only,
            inflight: None,
        };
        h.activate(queues, h.info.features);
        h
    }

    /// Like [`Harness::start`], with an in-flight region (`INFLIGHT_REGION_BYTES` memfd) that
    /// every incarnation gets, as the supervisor does.
    fn start_with_inflight(queues: u16, disk_len: usize) -> Harness {
        let region = nix::sys::memfd::memfd_create(c"inflight", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let region = File::from(region);
        region
            .set_len(proto::device::INFLIGHT_REGION_BYTES as u64)
            .expect("size the region");
        let mut h = Harness::start(false, queues, disk_len);
        h.inflight = Some(region.into());
        // The first incarnation ran without it: start over with one that has it.
        h.respawn();
        h
    }

    fn pid(&self) -> u32 {
        self.running.as_ref().expect("running").process.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sets up fresh rings for `count` queues and activates them with `features`.
    fn activate(&mut self, count: u16, features: u64) {
        self.queues.clear();
        for i in 0..count {
            let q =
                SplitQueue::new(&self.ram, 0x1000 + u64::from(i) * 0x4000, QSIZE).expect("queue");
            self.queues.push(q);
        }
        let (msg, fds) = activation(features, (0..).zip(&self.queues));
        self.runner.send(&msg, &fds).expect("activate");
        let reply = self
            .runner
            .recv_timeout::<FromDevice>(WAIT)
            .expect("activate reply")
            .msg;
        assert_eq!(reply, FromDevice::Activated, "log:\n{}", self.log_text());
    }

    /// Kills dev-blk and starts a new one on the same RAM, disk, rings and eventfds, as the
    /// supervisor does after a device crash (the runner re-sends the same `Activate`).
    fn respawn(&mut self) {
        if let Some(mut old) = self.running.take() {
            old.process.kill().expect("kill dev-blk");
            old.process.wait().expect("reap dev-blk");
        }
        let count = u16::try_from(self.queues.len()).expect("queues");
        let (running, runner, info) = spawn_device(
            &self.ram,
            &self.disk_path,
            self.read_only,
            count,
            &self.log,
            self.inflight.as_ref().map(AsFd::as_fd),
        );
        self.running = Some(running);
        self.runner = runner;
        self.info = info;
        let (msg, fds) = activation(self.info.features, (0..).zip(&self.queues));
        self.runner.send(&msg, &fds).expect("activate");
        let reply = self
            .runner
            .recv_timeout::<FromDevice>(WAIT)
            .expect("reply")
            .msg;
        assert_eq!(reply, FromDevice::Activated);
    }

    fn reset(&mut self) {
        self.runner.send(&ToDevice::Reset, &[]).expect("reset");
        let reply = self
            .runner
            .recv_timeout::<FromDevice>(WAIT)
            .expect("reset reply")
            .msg;
        assert_eq!(reply, FromDevice::ResetDone);
    }

    /// Guest addresses of request slot `slot` on queue `q`: header, status, data (64 KiB).
    fn slot(q: usize, slot: usize) -> (u64, u64, u64) {
        let base = 0x10_0000 + q as u64 * 0x30_0000;
        (
            base + slot as u64 * 32,
            base + 0x1000 + slot as u64,
            base + 0x1_0000 + slot as u64 * 0x1_0000,
        )
    }

    /// Queues one request in `slot` of queue `q` without waiting.
    fn submit(&mut self, q: usize, slot: usize, kind: u32, sector: u64, data: &[u8], data_in: u32) {
        let (hdr, status, buf) = Self::slot(q, slot);
        let mut h = Vec::new();
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.ram.write(hdr, &h);
        self.ram.write(status, &[0xee]);
        let mut bufs = vec![Buf::out(hdr, 16)];
        if !data.is_empty() {
            self.ram.write(buf, data);
            bufs.push(Buf::out(buf, u32::try_from(data.len()).expect("len")));
        }
        if data_in > 0 {
            bufs.push(Buf::input(buf, data_in));
        }
        bufs.push(Buf::input(status, 1));
        let ram = &self.ram;
        self.queues[q].submit(ram, &bufs);
    }

    fn wait(&mut self, q: usize, n: usize) -> Vec<Used> {
        let ram = &self.ram;
        let log = self.log.path().to_path_buf();
        self.queues[q].wait_used(ram, n, WAIT).unwrap_or_else(|e| {
            panic!("{e}; log:\n{}", fs::read_to_string(log).unwrap_or_default())
        })
    }

    /// Runs one request on queue 0 and returns its status and used length.
    fn request(&mut self, kind: u32, sector: u64, data: &[u8], data_in: u32) -> (u8, u32) {
        self.submit(0, 0, kind, sector, data, data_in);
        let used = self.wait(0, 1);
        let (_, status, _) = Self::slot(0, 0);
        (self.ram.read_u8(status), used[0].len)
    }

    fn read_back(&mut self, sector: u64, len: u32) -> Vec<u8> {
        let (status, used) = self.request(T_IN, sector, &[], len);
        assert_eq!((status, used), (S_OK, len + 1));
        let (_, _, buf) = Self::slot(0, 0);
        self.ram.read(buf, len as usize)
    }

    fn image(&self) -> Vec<u8> {
        fs::read(self.disk.path()).expect("read image")
    }

    fn alive(&mut self) -> bool {
        self.running
            .as_mut()
            .expect("running")
            .process
            .try_wait()
            .expect("try_wait")
            .is_none()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            drop(r.channel);
            for _ in 0..200 {
                if r.process.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = r.process.kill();
            let _ = r.process.wait();
        }
    }
}

fn ranges(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut v = sector.to_le_bytes().to_vec();
    v.extend_from_slice(&sectors.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

#[test]
fn a_guest_write_reaches_the_image_and_reads_back() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 4 << 20);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 13) as u8 + 1).collect();
    assert_eq!(h.request(T_OUT, 100, &data, 0), (S_OK, 1));
    assert_eq!(h.request(T_FLUSH, 0, &[], 0), (S_OK, 1));
    assert_eq!(h.image().get(100 * 512..100 * 512 + 8192), Some(&data[..]));
    assert_eq!(h.read_back(100, 8192), data);
    // Untouched sectors still read as the image's pattern.
    assert_eq!(h.read_back(0, 512), pattern(512));
}

#[test]
fn get_id_returns_the_serial_and_unknown_types_are_unsupported() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 1 << 20);
    assert_eq!(h.request(T_GET_ID, 0, &[], 20), (S_OK, 21));
    let (_, _, buf) = Harness::slot(0, 0);
    assert_eq!(h.ram.read(buf, 20), b"capvm-disk0-serial\0\0");
    assert_eq!(h.request(0x55, 0, &[], 512).0, S_UNSUPP);
}

#[test]
fn a_read_only_disk_refuses_writes_and_leaves_the_file_unchanged() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(true, 1, 1 << 20);
    assert_ne!(h.info.features & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    let before = h.image();
    assert_eq!(h.request(T_OUT, 0, &[0xaa; 4096], 0).0, S_IOERR);
    assert_eq!(
        h.request(T_WRITE_ZEROES, 0, &ranges(0, 8, 0), 0).0,
        S_UNSUPP
    );
    assert_eq!(h.image(), before);
    assert_eq!(h.read_back(0, 4096), pattern(4096));
}

#[test]
fn discard_punches_a_hole_and_write_zeroes_zeroes() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 8 << 20);
    let blocks_before = fs::metadata(h.disk.path()).expect("stat").blocks();
    assert_eq!(
        h.request(T_DISCARD, 2048, &ranges(2048, 8192, 0), 0).0,
        S_OK
    );
    let blocks_after = fs::metadata(h.disk.path()).expect("stat").blocks();
    assert!(
        blocks_after + 4 * 1024 * 2 <= blocks_before,
        "st_blocks {blocks_before} -> {blocks_after}"
    );
    assert_eq!(fs::metadata(h.disk.path()).expect("stat").len(), 8 << 20);

    assert_eq!(h.request(T_WRITE_ZEROES, 0, &ranges(16, 16, 0), 0).0, S_OK);
    let image = h.image();
    assert!(image[16 * 512..32 * 512].iter().all(|&b| b == 0));
    assert_eq!(image[..16 * 512], pattern(16 * 512)[..]);
    assert_eq!(h.read_back(16, 8192), vec![0; 8192]);
}

#[test]
fn sectors_past_the_end_are_io_errors() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 1 << 20);
    let sectors = (1u64 << 20) / 512;
    assert_eq!(h.request(T_IN, sectors, &[], 512).0, S_IOERR);
    assert_eq!(h.request(T_IN, sectors - 1, &[], 1024).0, S_IOERR);
    assert_eq!(h.request(T_OUT, u64::MAX, &[1; 512], 0).0, S_IOERR);
    assert_eq!(h.image().len(), 1 << 20);
    assert_eq!(h.request(T_IN, sectors - 1, &[], 512).0, S_OK);
}

#[test]
fn four_queues_serve_32_requests_each_in_parallel() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 4, 16 << 20);
    for q in 0..4 {
        for s in 0..32 {
            let fill = vec![(q * 32 + s) as u8 + 1; 16384];
            let sector = ((q * 32 + s) * 32) as u64;
            h.submit(q, s, T_OUT, sector, &fill, 0);
        }
    }
    for q in 0..4 {
        let used = h.wait(q, 32);
        assert_eq!(used.len(), 32);
        for s in 0..32 {
            let (_, status, _) = Harness::slot(q, s);
            assert_eq!(h.ram.read_u8(status), S_OK, "queue {q} slot {s}");
        }
    }
    let image = h.image();
    for n in 0..128usize {
        let at = n * 32 * 512;
        assert!(
            image[at..at + 16384].iter().all(|&b| b == n as u8 + 1),
            "request {n}"
        );
    }
}

#[test]
fn malformed_chains_get_statuses_or_needs_reset_and_the_device_serves_on() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 1 << 20);
    // Request-level faults complete with a status.
    let (hdr, status, _) = Harness::slot(0, 0);
    h.ram.write(hdr, &[0; 16]);
    let cases: [(&[Buf], u8); 4] = [
        (
            &[
                Buf::out(hdr, 16),
                Buf::input(RAM + 0x1000, 512),
                Buf::input(status, 1),
            ],
            S_IOERR,
        ),
        (
            &[
                Buf::out(hdr, 16),
                Buf::input(RAM - 256, 512),
                Buf::input(status, 1),
            ],
            S_IOERR,
        ),
        (
            &[
                Buf::out(hdr, 16),
                Buf::input(0x80_0000, 0),
                Buf::input(status, 1),
            ],
            S_IOERR,
        ),
        (&[Buf::out(hdr, 8), Buf::input(status, 1)], S_IOERR),
    ];
    for (bufs, want) in cases {
        h.ram.write(status, &[0xee]);
        let ram = &h.ram;
        h.queues[0].submit(ram, bufs);
        h.wait(0, 1);
        assert_eq!(h.ram.read_u8(status), want, "{bufs:?}");
    }

    // Ring-level faults: each one needs a reset; the device says so and serves again after.
    let faults: [&dyn Fn(&mut Harness); 4] = [
        &|h| {
            // A descriptor loop.
            let q = &mut h.queues[0];
            q.write_desc(&h.ram, 0, 0x10_0000, 16, 1, 1);
            q.write_desc(&h.ram, 1, 0x10_1000, 1, 1, 0);
            q.publish(&h.ram, 0);
            q.kick();
        },
        &|h| {
            // Header-only chain: no status byte.
            let q = &mut h.queues[0];
            q.write_desc(&h.ram, 0, 0x10_0000, 16, 0, 0);
            q.publish(&h.ram, 0);
            q.kick();
        },
        &|h| {
            // The available index jumps past the queue size.
            let q = &mut h.queues[0];
            q.set_avail_idx_raw(&h.ram, QSIZE + 7);
            q.kick();
        },
        &|h| {
            // A nested indirect table.
            let q = &mut h.queues[0];
            SplitQueue::write_desc_at(&h.ram, 0xF_0000, 0, 0xF_0000, 32, 4, 0);
            q.write_desc(&h.ram, 0, 0xF_0000, 32, 4, 0);
            q.publish(&h.ram, 0);
            q.kick();
        },
    ];
    for (n, fault) in faults.iter().enumerate() {
        fault(&mut h);
        match h
            .runner
            .recv_timeout::<FromDevice>(WAIT)
            .expect("needs reset")
            .msg
        {
            FromDevice::NeedsReset { reason } => eprintln!("fault {n}: {reason}"),
            other => panic!("fault {n}: expected NeedsReset, got {other:?}"),
        }
        assert!(
            h.alive(),
            "fault {n} killed dev-blk; log:\n{}",
            h.log_text()
        );
        h.reset();
        let features = h.info.features;
        h.activate(1, features);
        assert_eq!(
            h.request(T_OUT, 8, &[0x42; 512], 0),
            (S_OK, 1),
            "after fault {n}"
        );
        assert_eq!(h.read_back(8, 512), vec![0x42; 512]);
    }
}

#[test]
fn without_event_idx_every_completion_still_interrupts() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 1 << 20);
    h.reset();
    let features = h.info.features & !EVENT_IDX;
    h.activate(1, features);
    for i in 0..20u64 {
        assert_eq!(h.request(T_OUT, i, &[i as u8; 512], 0), (S_OK, 1));
    }
    assert_eq!(h.read_back(19, 512), vec![19; 512]);
}

#[test]
fn the_serving_process_is_sandboxed() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 2, 1 << 20);
    assert_eq!(h.request(T_OUT, 0, &[1; 512], 0), (S_OK, 1));
    let status = fs::read_to_string(format!("/proc/{}/status", h.pid())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert!(
        field("Uid:").split_whitespace().all(|u| u != "0"),
        "uid {}",
        field("Uid:")
    );
    assert!(h.log_text().contains("in capability mode"));
    // The device holds the image but no path to it: its root is empty.
    assert_eq!(
        fs::read_dir(format!("/proc/{}/root", h.pid()))
            .expect("root")
            .count(),
        0
    );
    // The file it holds is the one it was given.
    let disk = h.disk.as_file().metadata().expect("meta").ino();
    let held = fs::read_dir(format!("/proc/{}/fd", h.pid()))
        .expect("fds")
        .filter_map(|e| fs::metadata(e.ok()?.path()).ok())
        .any(|m| m.ino() == disk);
    assert!(held);
    let _ = h.disk.as_file().read_at(&mut [0; 1], 0);
    // With CAPVM_BLK_IO=uring, where the kernel allows rings, the device serves through
    // restricted rings it made before capability mode (it cannot make one after:
    // io_uring_setup is not in its policy); otherwise through its worker pool.
    let threads: Vec<String> = fs::read_dir(format!("/proc/{}/task", h.pid()))
        .expect("tasks")
        .filter_map(|e| fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    let rings = fs::read_dir(format!("/proc/{}/fd", h.pid()))
        .expect("fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy() == "anon_inode:[io_uring]")
        .count();
    let uring_allowed = fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .is_ok_and(|v| v.trim() == "0")
        && std::env::var("CAPVM_BLK_IO").is_ok_and(|v| v == "uring");
    if uring_allowed {
        assert!(
            h.log_text().contains("engine=\"io_uring\""),
            "{}",
            h.log_text()
        );
        assert!(threads.iter().any(|t| t == "blk-uring-q0"), "{threads:?}");
        assert!(rings >= 1, "no ring held");
    } else {
        assert!(
            h.log_text().contains("engine=\"worker pool\""),
            "{}",
            h.log_text()
        );
        assert!(
            threads.iter().any(|t| t.starts_with("blk-q0-")),
            "{threads:?}"
        );
        assert_eq!(rings, 0);
    }
}

/// A loop device over an image file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(image: &std::path::Path) -> Result<LoopDevice, String> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(LoopDevice(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_block_device_disk_reports_its_size_and_serves_io() {
    if skip_unless_root() {
        return;
    }
    let probe = tempfile::NamedTempFile::new_in("/var/tmp").expect("probe image");
    if let Err(e) = LoopDevice::attach(probe.path()) {
        eprintln!("SKIP: no loop device for a block-device disk: {e}");
        return;
    }
    let mut attached = None;
    let mut h = Harness::start_with(false, 1, 3 << 20, |image| {
        let dev = LoopDevice::attach(image).expect("loop device");
        let path = dev.0.clone();
        attached = Some(dev);
        path
    });
    // The size came from BLKGETSIZE64 (fstat of a block device says 0).
    let capacity = u64::from_le_bytes(h.info.config[..8].try_into().expect("capacity"));
    assert_eq!(capacity, (3 << 20) / 512);
    assert_eq!(h.request(T_OUT, 10, &[0x3c; 4096], 0), (S_OK, 1));
    assert_eq!(h.request(T_FLUSH, 0, &[], 0), (S_OK, 1));
    assert_eq!(h.read_back(10, 4096), vec![0x3c; 4096]);
    assert_eq!(h.request(T_IN, capacity, &[], 512).0, S_IOERR);
    drop(h);
    drop(attached);
}

#[test]
fn thousands_of_requests_at_depth_32_never_stall() {
    // Lost wake-ups (kick or completion) show up as a stall here: every request is re-issued
    // as soon as it completes, and kicks are suppressed as EVENT_IDX allows.
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 4 << 20);
    h.queues[0].set_event_idx(h.info.features & EVENT_IDX != 0);
    let issue = |h: &mut Harness, s: usize, n: u64| {
        let (hdr, status, buf) = Harness::slot(0, s);
        let mut header = if n.is_multiple_of(2) { T_IN } else { T_OUT }
            .to_le_bytes()
            .to_vec();
        header.extend_from_slice(&[0; 4]);
        header.extend_from_slice(&((n * 8) % 8192).to_le_bytes());
        h.ram.write(hdr, &header);
        let bufs = [
            Buf::out(hdr, 16),
            Buf {
                addr: buf,
                len: 4096,
                write: n.is_multiple_of(2),
            },
            Buf::input(status, 1),
        ];
        let first = u16::try_from(s * 3).expect("slot");
        let ram = &h.ram;
        let head = h.queues[0].add_chain_at(ram, first, &bufs);
        h.queues[0].publish(ram, head);
    };
    let mut issued = 0u64;
    for s in 0..32 {
        issue(&mut h, s, issued);
        issued += 1;
    }
    h.queues[0].notify(&h.ram);
    let mut done = 0;
    while done < 40_000 {
        let ram = &h.ram;
        let used = h.queues[0]
            .wait_some(ram, WAIT)
            .unwrap_or_else(|e| panic!("stalled after {done} requests: {e}"));
        for u in used {
            let s = u.id as usize / 3;
            let (_, status, _) = Harness::slot(0, s);
            assert_eq!(h.ram.read_u8(status), S_OK);
            done += 1;
            issue(&mut h, s, issued);
            issued += 1;
        }
        let ram = &h.ram;
        h.queues[0].notify(ram);
    }
}

#[test]
fn a_restarted_device_resumes_from_the_rings_in_guest_memory() {
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start(false, 1, 1 << 20);
    for i in 0..5u8 {
        assert_eq!(h.request(T_OUT, u64::from(i), &[i + 1; 512], 0), (S_OK, 1));
    }
    let old_pid = h.pid();
    h.respawn();
    assert_ne!(h.pid(), old_pid);
    // The new process continues after the 5 used entries instead of replaying them.
    assert_eq!(h.request(T_OUT, 9, &[0x99; 512], 0), (S_OK, 1));
    assert_eq!(h.ram.load_u16(h.queues[0].used + 2), 6);
    assert_eq!(h.read_back(9, 512), vec![0x99; 512]);
    assert_eq!(h.read_back(4, 512), vec![5; 512]);
}

#[test]
fn a_device_killed_mid_queue_completes_every_request_exactly_once() {
    // The supervisor's in-flight region lets each new incarnation replay what the killed one
    // had taken but not completed: no request is lost, none completes twice, and the image
    // holds every write.
    const TOTAL: u64 = 3000;
    const DEPTH: usize = 32;
    const SECTORS: u64 = 2048;
    if skip_unless_root() {
        return;
    }
    let mut h = Harness::start_with_inflight(1, (SECTORS * 512) as usize);
    h.queues[0].set_event_idx(h.info.features & EVENT_IDX != 0);
    // Request n writes 512 bytes of (n % 251) to sector n % SECTORS (later writes win).
    let issue = |h: &mut Harness, s: usize, n: u64| {
        let (hdr, status, buf) = Harness::slot(0, s);
        let mut header = T_OUT.to_le_bytes().to_vec();
        header.extend_from_slice(&[0; 4]);
        header.extend_from_slice(&(n % SECTORS).to_le_bytes());
        h.ram.write(hdr, &header);
        h.ram.write(status, &[0xee]);
        h.ram.write(buf, &[(n % 251) as u8; 512]);
        let bufs = [Buf::out(hdr, 16), Buf::out(buf, 512), Buf::input(status, 1)];
        let first = u16::try_from(s * 3).expect("slot");
        let ram = &h.ram;
        let head = h.queues[0].add_chain_at(ram, first, &bufs);
        h.queues[0].publish(ram, head);
    };
    // What each slot is doing: the request number in flight there.
    let mut outstanding: Vec<Option<u64>> = vec![None; DEPTH];
    let mut issued = 0u64;
    for (s, slot) in outstanding.iter_mut().enumerate() {
        issue(&mut h, s, issued);
        *slot = Some(issued);
        issued += 1;
    }
    h.queues[0].notify(&h.ram);
    let kills_at = [400u64, 1300, 2200];
    let mut kills = 0;
    let mut done = 0u64;
    let mut pids = vec![h.pid()];
    // From each SIGKILL to the first completion after it: the device's whole outage.
    let mut killed_at: Option<std::time::Instant> = None;
    let mut outages = Vec::new();
    while done < TOTAL {
        let ram = &h.ram;
        let used = h.queues[0].wait_some(ram, WAIT).unwrap_or_else(|e| {
            let waiting: Vec<(usize, u64)> = outstanding
                .iter()
                .enumerate()
                .filter_map(|(s, n)| n.map(|n| (s * 3, n)))
                .collect();
            panic!(
                "stalled after {done} requests, {kills} kills, waiting for (head, request) \
                 {waiting:?}: {e}; log:\n{}",
                h.log_text()
            )
        });
        if let Some(at) = killed_at.take() {
            outages.push(at.elapsed());
        }
        for u in used {
            let s = u.id as usize / 3;
            let Some(n) = outstanding.get_mut(s).and_then(Option::take) else {
                panic!(
                    "head {} completed twice (slot {s}), after {kills} kills",
                    u.id
                );
            };
            let (_, status, _) = Harness::slot(0, s);
            assert_eq!(h.ram.read_u8(status), S_OK, "request {n}");
            done += 1;
            if issued < TOTAL {
                issue(&mut h, s, issued);
                outstanding[s] = Some(issued);
                issued += 1;
            }
        }
        let ram = &h.ram;
        h.queues[0].notify(ram);
        if kills < kills_at.len() && done >= kills_at[kills] {
            // Requests are in flight right now: SIGKILL and a new incarnation.
            killed_at = Some(std::time::Instant::now());
            h.respawn();
            pids.push(h.pid());
            kills += 1;
        }
    }
    assert_eq!(kills, 3);
    assert!(outstanding.iter().all(Option::is_none), "{outstanding:?}");
    println!("MEASURE dev_blk kill_to_first_completion {outages:?}");
    pids.dedup();
    assert_eq!(pids.len(), 4, "each kill started a new process: {pids:?}");
    assert_last_writes(&h.image(), TOTAL, SECTORS);
    let log = h.log_text();
    assert!(
        log.contains("resuming the queue after a restart"),
        "log:\n{log}"
    );
}

/// Each sector of `image` holds the byte of the last of `total` requests that wrote it
/// (request n wrote `n % 251` to sector `n % sectors`); unwritten sectors keep the pattern.
fn assert_last_writes(image: &[u8], total: u64, sectors: u64) {
    for sector in 0..sectors {
        let last = (0..total).rev().find(|n| n % sectors == sector);
        let want = last.map_or_else(
            || pattern(sectors as usize * 512)[sector as usize * 512],
            |n| (n % 251) as u8,
        );
        let got = &image[sector as usize * 512..(sector as usize + 1) * 512];
        assert!(
            got.iter().all(|&b| b == want),
            "sector {sector}: want {want:#x}, got {:#x}",
            got[0]
        );
    }
}
