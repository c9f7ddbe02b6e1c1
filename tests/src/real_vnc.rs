//! VNC clients not written by capvm, driven from the e2e tests: vncdotool (`PyPI`) and
//! `TigerVNC`'s `vncviewer` (Debian `tigervnc-viewer`) on an `Xvfb` display, plus Pillow to read
//! their pictures. The Python side is `src/vnc_tools.py`.
//!
//! The test host runs commands with a fixed `PATH`, where `python3` may be another interpreter
//! than the one `scripts/install-deps.sh` installed vncdotool for (e.g. pyenv's). So the
//! interpreter is resolved once on the outer host ([`resolve_python`], before the harness starts)
//! and handed in as `CAPVM_PYTHON`, which the test host passes on with the other `CAPVM_*`
//! variables.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::rfb_client::Format;

/// The variable that names the Python interpreter with vncdotool and Pillow.
pub const PYTHON_VAR: &str = "CAPVM_PYTHON";

/// `src/vnc_tools.py`.
pub fn tools_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vnc_tools.py")
}

/// The interpreter `python3` on this `PATH` really is, if it imports vncdotool and Pillow
/// (for `main` to export as `CAPVM_PYTHON` before the harness starts any thread).
pub fn resolve_python() -> Option<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys, vncdotool, PIL; print(sys.executable)"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !exe.is_empty()).then_some(exe)
}

/// The interpreter with vncdotool and Pillow, or why there is none.
pub fn python() -> Result<PathBuf, String> {
    let exe = std::env::var_os(PYTHON_VAR).map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let ok = Command::new(&exe)
        .args(["-c", "import vncdotool, PIL"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(exe)
    } else {
        Err(format!(
            "{} cannot import vncdotool and PIL (scripts/install-deps.sh installs them)",
            exe.display()
        ))
    }
}

/// Whether `program` runs (`-help`/`--help` may exit non-zero: only a failure to start counts).
pub fn have_program(program: &str) -> bool {
    Command::new(program)
        .arg("-help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs `vnc_tools.py ARGS` and returns its stdout, or an error with its stderr.
fn tools(python: &Path, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new(python)
        .arg(tools_script())
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "vnc_tools.py {args:?} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// What vncdotool asks the server for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VncdoFormat {
    /// 32 (the server's own depth-24 format) or 16 (vncdotool's BGR16: RGB565 little endian).
    pub bpp: u8,
    /// `"raw"` or `"zrle"` (vncdotool's ZRLE decoder reads 3-byte pixels: 32 bpp only).
    pub encoding: &'static str,
}

/// A colour to count in a picture: red, green, blue and the tolerance per channel.
pub type Want = ([u8; 3], u8);

/// vncdotool captures the whole screen of `addr` into `png`; returns its report line and the
/// [`Match`] of each of `wants`.
pub fn vncdo_capture(
    python: &Path,
    addr: SocketAddr,
    format: VncdoFormat,
    png: &Path,
    wants: &[Want],
) -> anyhow::Result<(String, Vec<Match>)> {
    vncdo_capture_with_password(python, addr, format, png, wants, None, 120)
}

/// [`vncdo_capture`], answering VNC Authentication with `password` if given, giving up after
/// `timeout_s` seconds (vncdotool waits that long when the server refuses it).
pub fn vncdo_capture_with_password(
    python: &Path,
    addr: SocketAddr,
    format: VncdoFormat,
    png: &Path,
    wants: &[Want],
    password: Option<&str>,
    timeout_s: u32,
) -> anyhow::Result<(String, Vec<Match>)> {
    let timeout = timeout_s.to_string();
    let server = format!("{}::{}", addr.ip(), addr.port());
    let bpp = format.bpp.to_string();
    let png = png.to_string_lossy();
    let mut args: Vec<String> = [
        "capture",
        &server,
        &png,
        "--bpp",
        &bpp,
        "--encoding",
        format.encoding,
        "--timeout",
        &timeout,
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(password) = password {
        args.extend(["--password".to_owned(), password.to_owned()]);
    }
    args.extend(match_args(wants));
    let out = tools(python, &args)?;
    let report = out
        .lines()
        .find(|l| l.starts_with("captured"))
        .unwrap_or_default()
        .to_owned();
    Ok((report, matches(&out, wants)?))
}

fn match_args(wants: &[Want]) -> Vec<String> {
    wants
        .iter()
        .flat_map(|&([r, g, b], t)| ["--match".to_owned(), format!("{r},{g},{b},{t}")])
        .collect()
}

/// The `match` lines of `out`, one per want, in order.
fn matches(out: &str, wants: &[Want]) -> anyhow::Result<Vec<Match>> {
    wants
        .iter()
        .map(|&([r, g, b], t)| {
            let key = format!("match {r},{g},{b},{t} ");
            out.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(parse_match)
                .with_context(|| format!("no readable {key:?} line in {out:?}"))
        })
        .collect()
}

/// The pixels of a picture that match a colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub count: u64,
    /// Bounding box of the matching pixels, `x0, y0, x1, y1` (exclusive ends); `None` if none.
    pub bounds: Option<[u32; 4]>,
    pub size: (u32, u32),
}

/// Reads `count N box X0 Y0 X1 Y1 size W H`.
fn parse_match(line: &str) -> Option<Match> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let ["count", n, "box", x0, y0, x1, y1, "size", w, h] = words.as_slice() else {
        return None;
    };
    let corners: Vec<i64> = [x0, y0, x1, y1]
        .iter()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let bounds = match corners.as_slice() {
        [-1, -1, -1, -1] => None,
        [x0, y0, x1, y1] => Some([*x0, *y0, *x1, *y1].map(|v| u32::try_from(v).unwrap_or(0))),
        _ => return None,
    };
    Some(Match {
        count: n.parse().ok()?,
        bounds,
        size: (w.parse().ok()?, h.parse().ok()?),
    })
}

/// An `Xvfb` server on a display it chose itself (`-displayfd`); killed on drop.
#[derive(Debug)]
pub struct Xvfb {
    child: Child,
    pub display: String,
}

impl Xvfb {
    /// Starts `Xvfb` with one screen of `width`×`height` at depth 24.
    pub fn start(width: u32, height: u32) -> anyhow::Result<Xvfb> {
        let mut child = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                &format!("{width}x{height}x24"),
                "-nolisten",
                "tcp",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start Xvfb")?;
        let stdout = child.stdout.take().context("Xvfb's stdout")?;
        let mut line = String::new();
        // Xvfb writes the display number once it accepts connections.
        let read = BufReader::new(stdout).read_line(&mut line);
        let mut xvfb = Xvfb {
            child,
            display: String::new(),
        };
        match read {
            Ok(n) if n > 0 && line.trim().parse::<u32>().is_ok() => {
                xvfb.display = format!(":{}", line.trim());
                Ok(xvfb)
            }
            other => bail!("Xvfb reported no display number ({other:?}, {line:?})"),
        }
    }

    /// Pillow grabs the whole X screen into `png`; the [`Match`] of each of `wants`.
    pub fn grab(&self, python: &Path, png: &Path, wants: &[Want]) -> anyhow::Result<Vec<Match>> {
        let mut args = vec![
            "xgrab".to_owned(),
            self.display.clone(),
            png.to_string_lossy().into_owned(),
        ];
        args.extend(match_args(wants));
        let out = tools(python, &args)?;
        matches(&out, wants)
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `TigerVNC`'s `vncviewer` connected to a server, view-only, its log in a file; killed on drop.
#[derive(Debug)]
pub struct Viewer {
    child: Child,
    log: PathBuf,
}

impl Viewer {
    /// Starts `vncviewer` on `xvfb` against `addr` with `params` (`TigerVNC` parameters such as
    /// `-FullColor=0`), logging everything to `log`.
    pub fn start(
        xvfb: &Xvfb,
        addr: SocketAddr,
        params: &[&str],
        log: &Path,
    ) -> anyhow::Result<Viewer> {
        let file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let child = Command::new("vncviewer")
            .args(["-display", &xvfb.display])
            .args([
                "-Shared",
                "-ViewOnly",
                "-AlertOnFatalError=0",
                "-ReconnectOnError=0",
                "-SecurityTypes",
                "None",
                "-Log",
                "*:stderr:100",
            ])
            .args(params)
            .arg(format!("{}::{}", addr.ip(), addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("cannot start vncviewer")?;
        Ok(Viewer {
            child,
            log: log.to_owned(),
        })
    }

    /// The viewer's log so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// Whether the viewer is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Grabs `xvfb`'s screen into `png` until at least `min_count` pixels match the first of
/// `wants` or `timeout` passes (the viewer draws a moment after it connects); returns the last
/// grab's matches.
pub fn wait_for_colour(
    python: &Path,
    xvfb: &Xvfb,
    viewer: &mut Viewer,
    png: &Path,
    wants: &[Want],
    min_count: u64,
    timeout: Duration,
) -> anyhow::Result<Vec<Match>> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = xvfb.grab(python, png, wants)?;
        if m.first().is_some_and(|m| m.count >= min_count) || Instant::now() >= deadline {
            return Ok(m);
        }
        ensure!(
            viewer.running(),
            "vncviewer exited; its log:\n{}",
            viewer.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The colour a client shows for `rgb` sent in `format` and widened back to 8 bits per
/// channel as `v × 255 / max` (`TigerVNC`'s and Pillow's widening agree with it within 1).
pub fn widened(format: Format, rgb: [u8; 3]) -> [u8; 3] {
    let value = format.value_of(rgb);
    std::array::from_fn(|i| {
        let max = format.max.get(i).copied().map_or(1, u32::from).max(1);
        let shift = format.shift.get(i).copied().unwrap_or(0);
        let v = (value >> shift) & max;
        u8::try_from(v * 255 / max).unwrap_or(u8::MAX)
    })
}

/// Where the e2e tests keep pictures for people to look at: `<target>/<profile>/e2e-artifacts/
/// <test>/`, inside the checkout (which the test host shares back, unlike its `/tmp`).
pub fn artifact_dir(test: &str) -> anyhow::Result<PathBuf> {
    let dir = crate::harness::build_dir().join("e2e-artifacts").join(test);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_match_report_gives_count_bounds_and_size() {
        let m = parse_match("count 65536 box 0 0 1024 64 size 1024 768");
        assert_eq!(
            m,
            Some(Match {
                count: 65536,
                bounds: Some([0, 0, 1024, 64]),
                size: (1024, 768)
            })
        );
    }

    #[test]
    fn colours_through_low_depth_formats_lose_their_low_bits() {
        let colour = [0x20, 0xc0, 0x60];
        assert_eq!(widened(Format::RGB888_LE, colour), colour);
        // 3-3-2 bits: 1, 5, 1, widened to 36, 182, 85.
        assert_eq!(widened(Format::RGB332, colour), [36, 182, 85]);
        // 5-6-5 bits: 4, 47, 12.
        assert_eq!(widened(Format::RGB565_LE, colour), [32, 190, 98]);
    }

    #[test]
    fn a_match_report_without_matches_has_no_bounds() {
        let m = parse_match("count 0 box -1 -1 -1 -1 size 8 8");
        assert_eq!(m.map(|m| (m.count, m.bounds)), Some((0, None)));
        assert_eq!(parse_match("garbage"), None);
        let out = "captured 8x8\nmatch 1,2,3,0 count 4 box 0 0 2 2 size 8 8\n";
        let found = matches(out, &[([1, 2, 3], 0)]).unwrap();
        assert_eq!(found[0].count, 4);
        assert!(matches(out, &[([1, 2, 4], 0)]).is_err());
    }
}
