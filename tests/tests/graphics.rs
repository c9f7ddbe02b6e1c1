//! End-to-end: the graphical console of a real kit guest under `vm start -f` with
//! `graphics="yes"` — the runner's bochs display, the guest's `bochs` DRM driver and
//! `/dev/fb0`, and dev-fb's VNC server on the port the supervisor bound.
//!
//! `a_guest_fills_its_framebuffer_and_vnc_clients_see_the_colour`: with `graphics_res="1600x900"`
//! and nothing on the kernel command line about the mode, the guest's `/dev/fb0` comes up at
//! 1600x900 (the bochs display's EDID; Linux's own default is 1024x768) and VNC clients see a
//! 1600x900 desktop; the guest writes 64 rows of one colour to `/dev/fb0`; VNC clients asking
//! for 32 bpp, 16 bpp (565) and 8 bpp (332) true colour each see that colour there, in their own
//! format; `vm info` and the `console` file name the VNC address; dev-fb runs sandboxed. Real clients (vncdotool, `TigerVNC`) are
//! `vnc_clients.rs`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::ensure;
use tests::graphics_guest::{GraphicsVm, fill_rows, kit_spec};
use tests::harness::{self, E2e, Needs};
use tests::launcher::CapvmLauncher;
use tests::procfs;
use tests::rfb_client::{DESKTOP_SIZE, Format, RAW, RfbClient, Security, ZRLE};

const NAME: &str = "fb";
/// `graphics_res`: not the guest driver's 1024x768 default, so only the EDID can set it.
const SIZE: (u32, u32) = (1600, 900);
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

fn fill_and_look() -> anyhow::Result<()> {
    let mut vm = GraphicsVm::capvm(NAME, &kit_spec(2, 512, SIZE)?, SIZE)?;
    let result = checks(&mut vm);
    result.map_err(|e| vm.with_logs(&e))
}

fn checks(vm: &mut GraphicsVm) -> anyhow::Result<()> {
    let addr = vm.vnc_addr();
    ensure!(
        addr.ip().is_loopback() && addr.port() >= 5900,
        "VNC listens on {addr}, not loopback from 5900"
    );
    let info = CapvmLauncher::new(NAME)
        .vm_command(vm.vm().workdir())
        .args(["info", NAME])
        .output()?;
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    ensure!(
        info.contains(&addr.to_string()),
        "vm info does not show {addr}: {info}"
    );

    // fb0 at graphics_res (prepare_fb checks its size and stride against SIZE).
    vm.prepare_fb()?;
    vm.run_ok(&fill_rows(COLOUR, SIZE.0, 64))?;

    // dev-fb: sandboxed, a child of the supervisor.
    procfs::assert_sandboxed(vm.vnc_server_pid()?)?;

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

/// Connects with `format` and `encoding` and reads updates of the box around pixel (512, 40)
/// until it shows `want` (the guest's write reaches the framebuffer through fbdev's damage
/// handling, a moment later) or 20 s pass; returns the last value seen. Checks that the
/// client's desktop is [`SIZE`].
fn look(addr: SocketAddr, format: Format, encoding: i32, want: u32) -> anyhow::Result<u32> {
    let mut client = RfbClient::connect(addr, b"RFB 003.008\n", &Security::None, true)?;
    client.set_pixel_format(format)?;
    // DesktopSize: a guest mode other than graphics_res would show as a resize.
    client.set_encodings(&[encoding, DESKTOP_SIZE])?;
    // Only the box around the pixel: a whole 1600x900 frame from a debug dev-fb inside the
    // emulated test host can take longer than the client's read timeout.
    client.request(false, 480, 32, 64, 16)?;
    client.read_update()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = client.pixel(512, 40);
    while got != want && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        client.request(false, 480, 32, 64, 16)?;
        client.read_update()?;
        got = client.pixel(512, 40);
    }
    let (width, height) = SIZE;
    ensure!(
        (u32::from(client.width), u32::from(client.height)) == SIZE,
        "the VNC client sees a {}x{} desktop, not {width}x{height}",
        client.width,
        client.height
    );
    Ok(got)
}
