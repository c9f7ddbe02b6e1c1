//! End-to-end: VNC clients that capvm did not write, against dev-fb's VNC server for a real kit
//! guest under `vm start -f` with `graphics="yes"`. The guest fills rows 0..64 of its
//! 1024×768 `/dev/fb0` with one colour (the framebuffer console unbound, so nothing else
//! draws); each client's picture must show exactly that block.
//!
//! - `vncdotool_captures_the_guests_colour_at_32_and_16_bpp`: vncdotool (`PyPI`) captures the
//!   screen to a PNG with Raw and with its own ZRLE decoder at the server's 32-bpp format, and
//!   with Raw at 16 bpp: vncdotool's own RGB565 format (`BGR16`, which it otherwise asks for
//!   only from Apple Remote Desktop; `src/vnc_tools.py` makes it ask), decoded by vncdotool
//!   and Pillow. Pillow counts the pixels of the colour in each PNG.
//! - `tigervnc_under_xvfb_renders_the_guests_colour_in_full_and_8_bpp_colour`: `TigerVNC`'s
//!   `vncviewer` on an Xvfb display, first with its defaults (full colour; it asks for Tight
//!   first, dev-fb answers with ZRLE), then with `-AutoSelect=0 -FullColor=0
//!   -LowColorLevel=2`, where it asks for 8-bpp true colour (RGB332) and keeps it. An X
//!   screenshot (Pillow) of each must show the colour as that format carries it; the
//!   screenshots are kept as artifacts (their paths are printed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, ensure};
use tests::graphics_guest::{GraphicsVm, fill_rows, kit_spec};
use tests::harness::{self, E2e, Needs, skip};
use tests::real_vnc::{self, Match, Viewer, VncdoFormat, Xvfb};
use tests::rfb_client::Format;

const SIZE: (u32, u32) = (1024, 768);
const ROWS: u32 = 64;
/// The colour the guest paints, as red, green, blue.
const COLOUR: [u8; 3] = [0x20, 0xc0, 0x60];
/// Pixels of the painted block.
const BLOCK: u64 = SIZE.0 as u64 * ROWS as u64;

fn main() -> ExitCode {
    // SAFETY: single-threaded here, before the harness starts any thread.
    unsafe {
        std::env::set_var("CAPVM_LIBEXEC", tests::harness::build_dir());
        // The test host runs commands with a PATH of its own: hand it this host's interpreter.
        if std::env::var_os(real_vnc::PYTHON_VAR).is_none()
            && let Some(python) = real_vnc::resolve_python()
        {
            std::env::set_var(real_vnc::PYTHON_VAR, python);
        }
    }
    harness::main(&[
        E2e {
            name: "vncdotool_captures_the_guests_colour_at_32_and_16_bpp",
            needs: Needs::Kvm,
            timeout: Duration::from_mins(12),
            run: vncdotool,
        },
        E2e {
            name: "tigervnc_under_xvfb_renders_the_guests_colour_in_full_and_8_bpp_colour",
            needs: Needs::Kvm,
            timeout: Duration::from_mins(12),
            run: tigervnc,
        },
    ])
}

fn seen_through(format: Format) -> [u8; 3] {
    real_vnc::widened(format, COLOUR)
}

/// Boots the guest and paints the block.
fn painted_guest(name: &str) -> anyhow::Result<GraphicsVm> {
    let mut vm = GraphicsVm::capvm(name, &kit_spec(2, 512, SIZE)?, SIZE)?;
    let painted = (|| {
        vm.prepare_fb()?;
        vm.run_ok(&fill_rows(COLOUR, SIZE.0, ROWS))
    })();
    match painted {
        Ok(_) => Ok(vm),
        Err(e) => Err(vm.with_logs(&e)),
    }
}

fn python_or_skip() -> anyhow::Result<PathBuf> {
    real_vnc::python().map_err(skip)
}

fn vncdotool() -> anyhow::Result<()> {
    // Its guest has virtio-pci functions (the keyboard and tablet).
    harness::nested_pci_skip()?;
    let python = python_or_skip()?;
    let mut vm = painted_guest("vncdo")?;
    let result = vncdotool_checks(&python, &mut vm);
    result.map_err(|e| vm.with_logs(&e))
}

fn vncdotool_checks(python: &Path, vm: &mut GraphicsVm) -> anyhow::Result<()> {
    let dir = real_vnc::artifact_dir("vncdotool")?;
    let addr = vm.vnc_addr();
    for (format, seen, tolerance) in [
        (
            VncdoFormat {
                bpp: 32,
                encoding: "raw",
            },
            COLOUR,
            0,
        ),
        (
            VncdoFormat {
                bpp: 32,
                encoding: "zrle",
            },
            COLOUR,
            0,
        ),
        (
            VncdoFormat {
                bpp: 16,
                encoding: "raw",
            },
            seen_through(Format::RGB565_LE),
            1,
        ),
    ] {
        let png = dir.join(format!("{}bpp-{}.png", format.bpp, format.encoding));
        // The seen colour, and (at 16 bpp) the unreduced one, which must not appear.
        let wants = [(seen, tolerance), (COLOUR, 0)];
        // fbdev copies the guest's write to the framebuffer a moment later: capture until the
        // block is whole, a few times at most.
        let mut last = None;
        for _ in 0..4 {
            let (report, found) = real_vnc::vncdo_capture(python, addr, format, &png, &wants)?;
            ensure!(
                report.contains(&format!("bpp={}", format.bpp)),
                "vncdotool did not use {} bpp: {report}",
                format.bpp
            );
            let whole = found.first().is_some_and(|m| m.count == BLOCK);
            last = Some((report, found));
            if whole {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let (report, found) = last.context("no capture")?;
        let [m, exact] = found.as_slice() else {
            anyhow::bail!("matches {found:?}");
        };
        println!(
            "vncdotool {format:?}: {report}; {m:?}; picture {}",
            png.display()
        );
        check_block(m, "vncdotool", &format!("{format:?}"), seen)?;
        if format.bpp == 16 {
            // The server really sent 5-6-5 bits.
            ensure!(
                exact.count == 0,
                "the 16-bpp picture holds {} pixels of the unreduced colour",
                exact.count
            );
        }
    }
    Ok(())
}

/// The block must be exactly rows 0..64 across the screen, every pixel of it in the colour.
fn check_block(m: &Match, client: &str, what: &str, seen: [u8; 3]) -> anyhow::Result<()> {
    ensure!(
        m.size == SIZE,
        "{client} {what}: picture is {:?}, not {SIZE:?}",
        m.size
    );
    ensure!(
        m.count == BLOCK && m.bounds == Some([0, 0, SIZE.0, ROWS]),
        "{client} {what}: {} pixels of {seen:?} in {:?}; the guest painted {BLOCK} in rows 0..{ROWS}",
        m.count,
        m.bounds
    );
    Ok(())
}

fn tigervnc() -> anyhow::Result<()> {
    harness::nested_pci_skip()?;
    let python = python_or_skip()?;
    for program in ["Xvfb", "vncviewer"] {
        if !real_vnc::have_program(program) {
            return Err(skip(format!(
                "{program} is not installed (scripts/install-deps.sh installs it)"
            )));
        }
    }
    let mut vm = painted_guest("tiger")?;
    let result = tigervnc_checks(&python, &mut vm);
    result.map_err(|e| vm.with_logs(&e))
}

fn tigervnc_checks(python: &Path, vm: &mut GraphicsVm) -> anyhow::Result<()> {
    let dir = real_vnc::artifact_dir("tigervnc")?;
    let xvfb = Xvfb::start(1280, 1024)?;
    let runs: [(&str, &[&str], [u8; 3], u8); 2] = [
        ("full-colour", &[], COLOUR, 0),
        (
            "8bpp",
            &["-AutoSelect=0", "-FullColor=0", "-LowColorLevel=2"],
            seen_through(Format::RGB332),
            2,
        ),
    ];
    for (what, params, seen, tolerance) in runs {
        let log = dir.join(format!("vncviewer-{what}.log"));
        let png = dir.join(format!("xvfb-{what}.png"));
        let mut viewer = Viewer::start(&xvfb, vm.vnc_addr(), params, &log)?;
        let found = real_vnc::wait_for_colour(
            python,
            &xvfb,
            &mut viewer,
            &png,
            &[(seen, tolerance), (COLOUR, 0)],
            BLOCK,
            Duration::from_mins(2),
        )?;
        let [m, exact] = found.as_slice() else {
            anyhow::bail!("matches {found:?}");
        };
        println!(
            "TigerVNC {what}: {m:?}; screenshot {} (viewer log {})",
            png.display(),
            log.display()
        );
        let text = viewer.log();
        ensure!(
            m.count == BLOCK,
            "TigerVNC {what}: the screenshot has {} pixels of {seen:?}, not {BLOCK}; viewer log:\n{text}",
            m.count
        );
        // Without a window manager the viewer's window sits at the top left, unscaled.
        let Some([x0, y0, x1, y1]) = m.bounds else {
            anyhow::bail!("no bounds");
        };
        ensure!(
            x1 - x0 == SIZE.0 && y1 - y0 == ROWS,
            "TigerVNC {what}: the block spans {:?}, not {}x{ROWS}",
            m.bounds,
            SIZE.0
        );
        if what == "8bpp" {
            ensure!(
                text.contains("Using pixel format depth 8 (8bpp)")
                    && !text.contains("full color is now enabled"),
                "TigerVNC did not stay at 8 bpp; its log:\n{text}"
            );
            ensure!(
                exact.count == 0,
                "the 8-bpp screenshot holds {} pixels of the unreduced colour",
                exact.count
            );
        }
    }
    Ok(())
}
