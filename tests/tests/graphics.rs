//! End-to-end: the graphical console of a real kit guest under `vm start -f` with
//! `graphics="yes"` — the runner's bochs display, the guest's `bochs` DRM driver and
//! `/dev/fb0`, and dev-fb's VNC server on the port the supervisor bound.
//!
//! `a_guest_fills_its_framebuffer_and_vnc_clients_see_the_colour`: the guest writes 64 rows
//! of one colour to `/dev/fb0`; VNC clients asking for 32 bpp, 16 bpp (565) and 8 bpp (332)
//! true colour each see that colour there, in their own format; `vm info` and the `console`
//! file name the VNC address; dev-fb runs sandboxed.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tests::harness::{self, E2e, Needs};
use tests::kit::{Action, Kit, KitCmdline};
use tests::launcher::{CapvmLauncher, GuestSpec, LaunchError, Launcher};
use tests::procfs;
use tests::rfb_client::{Format, RAW, RfbClient, Security, ZRLE};
use tests::testvm::TestVm;

const NAME: &str = "fb";
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 512;
const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const CMD_TIMEOUT: Duration = Duration::from_mins(1);
/// The colour the guest paints, as red, green, blue.
const COLOUR: [u8; 3] = [0x20, 0xc0, 0x60];

fn main() -> ExitCode {
    // SAFETY: single-threaded here, before the harness starts any thread.
    unsafe { std::env::set_var("CAPVM_LIBEXEC", tests::harness::build_dir()) };
    harness::main(&[E2e {
        name: "a_guest_fills_its_framebuffer_and_vnc_clients_see_the_colour",
        needs: Needs::Kvm,
        timeout: Duration::from_mins(5),
        run: fill_and_look,
    }])
}

/// [`CapvmLauncher`] with `conf` appended to the guest's config.
#[derive(Debug)]
struct WithConf {
    inner: CapvmLauncher,
    conf: String,
}

impl Launcher for WithConf {
    fn name(&self) -> String {
        "capvm".to_owned()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let command = self.inner.command(spec, workdir)?;
        let conf = guest_dir(workdir).join(format!("{NAME}.conf"));
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(self.conf.as_bytes()))
            .map_err(|source| LaunchError::Prepare { path: conf, source })?;
        Ok(command)
    }
}

fn guest_dir(workdir: &Path) -> PathBuf {
    workdir.join("vms").join(NAME)
}

fn run_ok(vm: &mut TestVm, command: &str) -> anyhow::Result<String> {
    let out = vm.run(command, CMD_TIMEOUT)?;
    ensure!(
        out.status == 0,
        "{command:?} exited {}: {}",
        out.status,
        out.output
    );
    Ok(out.output.trim().to_owned())
}

fn fill_and_look() -> anyhow::Result<()> {
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
    let launcher = WithConf {
        inner: CapvmLauncher::new(NAME),
        conf: "graphics=\"yes\"\ngraphics_res=\"1024x768\"\n".to_owned(),
    };
    let mut vm = TestVm::start(&launcher, &spec)?;
    let result = (|| {
        vm.wait_ready(BOOT_TIMEOUT)?;
        checks(&mut vm)
    })();
    result.map_err(|e| {
        let dir = guest_dir(vm.workdir());
        let file = |n: &str| fs::read_to_string(dir.join(n)).unwrap_or_default();
        anyhow::anyhow!(
            "{e:#}\n--- console ---\n{}\n--- vm-bhyve.log ---\n{}\n--- vcpu-runner.log ---\n{}\n--- dev-fb.log ---\n{}",
            vm.logs(),
            file("vm-bhyve.log"),
            file("vcpu-runner.log"),
            file("dev-fb.log")
        )
    })
}

fn checks(vm: &mut TestVm) -> anyhow::Result<()> {
    let dir = guest_dir(vm.workdir());
    let console = fs::read_to_string(dir.join("console")).context("the guest's console file")?;
    let addr: SocketAddr = console
        .lines()
        .find_map(|l| l.strip_prefix("vnc="))
        .context("no vnc= line in the console file")?
        .parse()?;
    ensure!(
        addr.ip().is_loopback() && addr.port() >= 5900,
        "VNC listens on {addr}, not loopback from 5900"
    );
    let info = CapvmLauncher::new(NAME)
        .vm_command(vm.workdir())
        .args(["info", NAME])
        .output()?;
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    ensure!(
        info.contains(&addr.to_string()),
        "vm info does not show {addr}: {info}"
    );

    // The guest paints rows 0..64 (4096 bytes a row at 1024x768x32) in XRGB8888: B, G, R, X.
    let [r, g, b] = COLOUR;
    let paint = format!(
        "i=0; while [ ! -e /dev/fb0 ] && [ $i -lt 40 ]; do sleep 0.25; i=$((i+1)); done; \
         cat /sys/class/graphics/fb0/virtual_size; \
         printf '\\{b:03o}\\{g:03o}\\{r:03o}\\000' > /tmp/p; \
         for i in $(seq 16); do cat /tmp/p /tmp/p > /tmp/q; mv /tmp/q /tmp/p; done; \
         cat /tmp/p > /dev/fb0; sync"
    );
    let size = run_ok(vm, &paint)?;
    ensure!(size.contains("1024,768"), "fb0 is {size:?}, not 1024x768");

    // dev-fb: sandboxed, a child of the supervisor.
    let supervisor = procfs::children_named(vm.pid(), "vm")
        .first()
        .copied()
        .context("no vm process")?;
    let dev_fb = procfs::children_named(supervisor, "dev-fb");
    ensure!(dev_fb.len() == 1, "dev-fb processes: {dev_fb:?}");
    procfs::assert_sandboxed(dev_fb[0])?;

    for (format, encoding) in [
        (Format::RGB888_LE, ZRLE),
        (Format::RGB565_LE, RAW),
        (Format::RGB332, RAW),
    ] {
        let want = format.value_of(COLOUR);
        let got = look(addr, format, encoding, want)?;
        ensure!(
            got == want,
            "a {}-bpp client sees {got:#x} at (512, 40), not the guest's colour {want:#x}",
            format.bpp
        );
    }
    Ok(())
}

/// Connects with `format` and `encoding` and reads updates until pixel (512, 40) shows
/// `want` (the guest's write reaches the framebuffer through fbdev's damage handling, a moment
/// later) or 20 s pass; returns the last value seen.
fn look(addr: SocketAddr, format: Format, encoding: i32, want: u32) -> anyhow::Result<u32> {
    let mut client = RfbClient::connect(addr, b"RFB 003.008\n", &Security::None, true)?;
    client.set_pixel_format(format)?;
    client.set_encodings(&[encoding])?;
    client.request_all(false)?;
    client.read_update()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = client.pixel(512, 40);
    while got != want && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        client.request_all(false)?;
        client.read_update()?;
        got = client.pixel(512, 40);
    }
    Ok(got)
}
