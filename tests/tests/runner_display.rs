//! End-to-end: the real `vcpu-runner`, started the way the supervisor starts it (as in
//! `runner_boot.rs`) plus a 16 MiB framebuffer memfd and a display channel, boots the kit
//! guest. The guest's own `bochs` DRM driver finds the bochs display (`/sys/class/drm/card0`),
//! reads its EDID and sets the preferred mode, the `graphics_res` the `Boot` message gave
//! (1600x900: not the driver's own 1024x768 default, and no `video=` on the command line):
//! `/dev/fb0` shows that mode, the mode arrives on the display channel as
//! `ToDisplay::SetMode`, and a pattern the guest writes to a row of `/dev/fb0` appears in the
//! memfd at that row of the mode.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::Channel;
use proto::display::{Mode, ToDisplay};
use proto::runner::{DisplayModes, FromRunner, GuestExit, MachineConfig, ToRunner};
use supervisor::spawn;
use tests::console::Console;
use tests::harness::{self, E2e, Needs};
use tests::kit::{Action, Kit, KitCmdline};
use tests::marker::{self, Marker};

const MEMORY: u64 = 512 << 20;
const FRAMEBUFFER: u64 = 16 << 20;
/// `graphics_res`: the EDID's preferred mode and the largest the display accepts.
const MODE: (u32, u32) = (1600, 900);
const BOOT_TIMEOUT: Duration = Duration::from_mins(3);
/// The row checked of the 40 the guest fills with the pattern (256 KiB of it from offset 0,
/// rows of 6400 bytes): below the top-left character cell, where fbcon's cursor draws.
const PATTERN_ROW: u64 = 32;
const PATTERN: &[u8; 16] = b"CAPVM-FB-PATTERN";

fn main() -> ExitCode {
    harness::main(&[E2e {
        name: "runner_display_bochs_drm_sets_the_edid_mode_and_fb0_writes_reach_the_memfd",
        needs: Needs::Kvm,
        timeout: Duration::from_mins(5),
        run: bochs_display,
    }])
}

fn runner_binary() -> PathBuf {
    if std::env::var_os(spawn::LIBEXEC_ENV).is_some() {
        return spawn::binary_path("vcpu-runner");
    }
    harness::build_dir().join("vcpu-runner")
}

fn sealed_memfd(name: &str, bytes: u64) -> anyhow::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    nix::unistd::ftruncate(&fd, i64::try_from(bytes)?)?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// The guest's checks: wait for `/dev/fb0`, print what DRM and fbdev say, write the pattern
/// over the first 64 rows of `/dev/fb0`.
///
/// fbdev emulation writes go to a shadow buffer and reach the framebuffer through damage
/// handling, merged with fbcon's (its cursor blinks in the top-left character cell). The guest
/// kit's kernel (Debian's 6.1) damages the range after the one a `write()` covered; a write
/// from row 0 is flushed either way once it merges with the cursor's damage, which a write at
/// an offset (`dd seek=`) never was in our runs.
const SCRIPT: &str = "i=0; while [ ! -e /dev/fb0 ] && [ $i -lt 40 ]; do sleep 0.25; i=$((i+1)); done; \
    echo probe-drm=$(ls /sys/class/drm | tr '\\n' ' '); \
    echo probe-fb-name=$(cat /sys/class/graphics/fb0/name); \
    echo probe-fb-size=$(cat /sys/class/graphics/fb0/virtual_size); \
    echo probe-fb-bpp=$(cat /sys/class/graphics/fb0/bits_per_pixel); \
    echo probe-fb-stride=$(cat /sys/class/graphics/fb0/stride); \
    echo probe-bochs=$(dmesg | grep -i -e bochs -e drm -e edid | tr '\\n' '|'); \
    echo probe-modes=$(head -n 3 /sys/class/drm/card0-*/modes | tr '\\n' ' '); \
    i=0; while [ $i -lt 256 ]; do printf CAPVM-FB-PATTERN; i=$((i+1)); done > /tmp/row; \
    i=0; while [ $i -lt 64 ]; do cat /tmp/row; i=$((i+1)); done > /tmp/rows; \
    cat /tmp/rows > /dev/fb0; \
    echo probe-readback=$(dd if=/dev/fb0 bs=4096 skip=32 count=1 2>/dev/null | head -c 16); \
    sync; sleep 2; echo probe-written=yes";

/// The runner with its display, and the test's ends of its descriptors.
struct Started {
    runner: spawn::Running,
    console: UnixStream,
    display: Channel,
    framebuffer: File,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Started {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Spawns the runner with the supervisor's descriptors plus the framebuffer and the display
/// channel, and sends `Boot` for the kit running `script`.
fn start(script: &str) -> anyhow::Result<Started> {
    let kit = Kit::locate()?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("vcpu-runner.log");
    let log_file = File::create(&log)?;
    let kvm = OpenOptions::new().read(true).write(true).open("/dev/kvm")?;
    let memory = sealed_memfd("capvm-guest-ram", MEMORY)?;
    let framebuffer = sealed_memfd("capvm-framebuffer", FRAMEBUFFER)?;
    let kernel = File::open(&kit.kernel)?;
    let initrd = File::open(&kit.initrd)?;
    let (console, theirs) = UnixStream::pair()?;
    let (display, display_theirs) = Channel::pair()?;
    let display_fd = OwnedFd::from(display_theirs);
    let (uid, gid) = sandbox::nobody();
    let bootstrap = Bootstrap {
        role: Role::VcpuRunner,
        vm_name: "runner-display".into(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: 64,
        },
        fds: vec![
            FdRole::Log,
            FdRole::Kvm,
            FdRole::GuestMemory,
            FdRole::Kernel,
            FdRole::Initrd,
            FdRole::Console,
            FdRole::Framebuffer,
            FdRole::DisplayChannel,
        ],
        log_filter: "info".into(),
    };
    let fds = [
        log_file.as_fd(),
        kvm.as_fd(),
        memory.as_fd(),
        kernel.as_fd(),
        initrd.as_fd(),
        theirs.as_fd(),
        framebuffer.as_fd(),
        display_fd.as_fd(),
    ];
    let runner =
        spawn::spawn(&runner_binary(), &bootstrap, &fds).context("spawning vcpu-runner")?;
    let cmdline = KitCmdline::new(Action::Run(script.into())).render()?;
    runner.channel.send(
        &ToRunner::Boot(MachineConfig {
            cpus: 1,
            memory_bytes: MEMORY,
            cmdline,
            utctime: true,
            local_offset_secs: 0,
            uuid: [0x43; 16],
            display: Some(DisplayModes {
                width: MODE.0,
                height: MODE.1,
                max_width: MODE.0,
                max_height: MODE.1,
            }),
        }),
        &[],
    )?;
    Ok(Started {
        runner,
        console,
        display,
        framebuffer: File::from(framebuffer),
        log,
        dir,
    })
}

/// Waits for `Running`, then for the guest's script to end; returns its `probe-` lines.
fn run_guest(started: &Started) -> anyhow::Result<Vec<(String, String)>> {
    let t0 = Instant::now();
    let running = started
        .runner
        .channel
        .recv_timeout::<FromRunner>(Duration::from_secs(30))?
        .msg;
    ensure!(
        running == FromRunner::Running,
        "expected Running, got {running:?}; log:\n{}",
        started.log()
    );
    let mut console = Console::start(
        started.console.try_clone()?,
        &started.dir.path().join("console.log"),
    )?;
    let mut probes: Vec<(String, String)> = Vec::new();
    let outcome = console.wait_for(BOOT_TIMEOUT, |line| {
        if let Some((_, Ok(Marker::Exit(status)))) = marker::find(line) {
            return Some(status);
        }
        if let Some((k, v)) = line.strip_prefix("probe-").and_then(|p| p.split_once('=')) {
            probes.push((k.to_owned(), v.trim().to_owned()));
        }
        None
    });
    let Ok(status) = outcome else {
        bail!(
            "the guest did not finish: {outcome:?}\nconsole:\n{}\nrunner log:\n{}",
            console.tail(40),
            started.log()
        );
    };
    println!(
        "MEASURE runner_display_boot_to_done wall_s={:.1}",
        t0.elapsed().as_secs_f64()
    );
    for (k, v) in &probes {
        println!("guest {k}: {v}");
    }
    ensure!(status == 0, "the guest's script exited {status}");
    Ok(probes)
}

/// Checks that row [`PATTERN_ROW`] of `mode` in the framebuffer holds the pattern; on a
/// mismatch, says where the pattern is.
fn check_pattern(fb: &File, mode: &Mode) -> anyhow::Result<()> {
    let mut row = vec![0u8; 4096];
    let at = mode.offset + PATTERN_ROW * u64::from(mode.stride);
    fb.read_exact_at(&mut row, at)?;
    let Some(bad) = row
        .chunks(PATTERN.len())
        .position(|c| c != PATTERN)
        .map(|i| i * PATTERN.len())
    else {
        return Ok(());
    };
    let mut all = vec![0u8; usize::try_from(FRAMEBUFFER)?];
    fb.read_exact_at(&mut all, 0)?;
    let found: Vec<usize> = all
        .windows(PATTERN.len())
        .enumerate()
        .filter(|(_, w)| *w == PATTERN)
        .map(|(i, _)| i)
        .take(8)
        .collect();
    let nonzero_rows: Vec<usize> = all
        .chunks(4096)
        .enumerate()
        .filter(|(_, r)| r.iter().any(|&b| b != 0))
        .map(|(i, _)| i)
        .take(32)
        .collect();
    bail!(
        "the memfd at row {PATTERN_ROW} of the mode ({at:#x}) differs from byte {bad}: {:?}; \
         the pattern is at {found:x?}, non-zero 4 KiB rows {nonzero_rows:?}",
        String::from_utf8_lossy(
            row.get(bad..)
                .unwrap_or_default()
                .get(..32)
                .unwrap_or_default()
        )
    );
}

fn bochs_display() -> anyhow::Result<()> {
    let mut started = start(SCRIPT)?;
    let result = check_guest(&started);
    if result.is_err() && matches!(started.runner.process.try_wait(), Ok(None)) {
        // Our own child: end it rather than leave it running.
        let _ = started.runner.process.kill();
        let _ = started.runner.process.wait();
    }
    result?;
    wait_exit(&mut started.runner, Duration::from_secs(10))
}

fn check_guest(started: &Started) -> anyhow::Result<()> {
    let probes = run_guest(started)?;
    let probe = |key: &str| {
        probes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    ensure!(
        probe("drm").split(' ').any(|c| c == "card0"),
        "no /sys/class/drm/card0: {:?}\nrunner log:\n{}",
        probe("drm"),
        started.log()
    );
    let (width, height) = MODE;
    ensure!(
        probe("fb-size") == format!("{width},{height}"),
        "fb0 is {:?}, not the EDID's {width}x{height}; the guest's modes: {:?}; its log: {:?}",
        probe("fb-size"),
        probe("modes"),
        probe("bochs")
    );
    ensure!(
        probe("modes").split(' ').next() == Some(format!("{width}x{height}").as_str()),
        "the guest's first (preferred) mode is not {width}x{height}: {:?}",
        probe("modes")
    );
    ensure!(
        probe("fb-stride") == (width * 4).to_string(),
        "fb0 stride {:?}",
        probe("fb-stride")
    );
    ensure!(probe("fb-bpp") == "32", "fb0 bpp {:?}", probe("fb-bpp"));
    ensure!(probe("written") == "yes", "the guest did not write fb0");

    // Every mode the runner sent, in order; the last is what dev-fb would show.
    let mut modes: Vec<Mode> = Vec::new();
    while let Ok(r) = started
        .display
        .recv_timeout::<ToDisplay>(Duration::from_millis(500))
    {
        let ToDisplay::SetMode(m) = r.msg;
        modes.push(m);
    }
    println!("display channel: {modes:?}");
    let Some(mode) = modes.last().copied() else {
        bail!("no SetMode arrived; runner log:\n{}", started.log());
    };
    ensure!(
        (mode.width, mode.height, mode.bpp, mode.stride) == (width, height, 32, width * 4),
        "the last mode is {mode:?}"
    );
    ensure!(mode.validate(FRAMEBUFFER).is_ok());
    check_pattern(&started.framebuffer, &mode)?;

    let exited = started
        .runner
        .channel
        .recv_timeout::<FromRunner>(Duration::from_mins(1))?
        .msg;
    ensure!(
        matches!(
            exited,
            FromRunner::Exited {
                exit: GuestExit::Poweroff,
                ..
            }
        ),
        "expected a poweroff, got {exited:?}"
    );
    Ok(())
}

/// Waits for the runner to exit on its own; kills it (this test's own child) if it does not.
fn wait_exit(runner: &mut spawn::Running, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = runner.process.try_wait()? {
            ensure!(status.success(), "vcpu-runner exited with {status}");
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = runner.process.kill();
            let _ = runner.process.wait();
            bail!("vcpu-runner did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
