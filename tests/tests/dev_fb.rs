//! dev-fb, the real sandboxed binary, started the way the supervisor starts it, with a
//! framebuffer file the test paints and a listener on 127.0.0.1:0, driven by the test RFB
//! client (`tests::rfb_client`): each RFB version, VNC Authentication, pixel formats and
//! encodings read back pixel by pixel, incremental updates, several clients, a client that
//! stops reading, hostile input, mode changes, input translation, idle CPU and the sandbox;
//! and issue 7's bench pictures at 1600×900: Zlib and ZRLE bytes no more than QEMU's, every
//! decoded pixel right, and idle CPU and memory at that size.
//!
//! Needs root (the sandbox unshares namespaces and switches uid); skips with a reason
//! otherwise. Build the binary first: `cargo build -p dev-fb` (it is looked up beside this
//! test's `target/<profile>`).

// Test colours and rectangles are built from small loop counters and screen sizes; the casts
// to bytes and u16 cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::display::{DisplaySetup, Mode, SharePolicy, ToDisplay};
use supervisor::spawn;
use tests::rfb_client::{
    DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE, Format, QEMU_EXTENDED_KEY, RAW, Refused, RfbClient,
    Security, ZLIB, ZRLE,
};

const V33: &[u8; 12] = b"RFB 003.003\n";
const V37: &[u8; 12] = b"RFB 003.007\n";
const V38: &[u8; 12] = b"RFB 003.008\n";
const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
const BACKGROUND: [u8; 3] = [0x20, 0x40, 0x60];

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: dev-fb tests need root (the sandbox unshares namespaces, switches uid)");
    true
}

/// A running dev-fb over a framebuffer file the test paints.
struct Display {
    running: Option<spawn::Running>,
    addr: SocketAddr,
    fb: File,
    stride: u32,
    log: tempfile::NamedTempFile,
}

struct Options {
    width: u32,
    height: u32,
    max: (u32, u32),
    password: Option<&'static str>,
    share: SharePolicy,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            width: WIDTH,
            height: HEIGHT,
            max: (1024, 768),
            password: None,
            share: SharePolicy::AllowExclusive,
        }
    }
}

impl Display {
    fn start(opts: &Options) -> Display {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let fb_bytes = u64::from(opts.max.0) * u64::from(opts.max.1) * 4;
        let fb = tempfile::tempfile_in(dir).expect("framebuffer file");
        fb.set_len(fb_bytes).expect("size framebuffer");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("listener address");
        let log = tempfile::NamedTempFile::new().expect("log file");
        let log_fd = log.reopen().expect("log fd");
        let (uid, gid) = sandbox::nobody();
        let boot = Bootstrap {
            role: Role::DevFb,
            vm_name: "fb-test-guest".into(),
            sandbox: SandboxSettings {
                uid,
                gid,
                max_fds: 64,
            },
            fds: vec![FdRole::Log, FdRole::Framebuffer, FdRole::VncListener],
            log_filter: "debug,dev_fb::input=trace".into(),
        };
        let running = spawn::spawn(
            &tests::harness::build_dir().join("dev-fb"),
            &boot,
            &[log_fd.as_fd(), fb.as_fd(), listener.as_fd()],
        )
        .expect("spawn dev-fb (run `cargo build -p dev-fb` first)");
        drop(listener);
        let setup = DisplaySetup {
            width: opts.width,
            height: opts.height,
            max_width: opts.max.0,
            max_height: opts.max.1,
            framebuffer_bytes: fb_bytes,
            password: opts.password.map(String::from),
            share: opts.share,
        };
        running.channel.send(&setup, &[]).expect("send setup");
        let d = Display {
            running: Some(running),
            addr,
            fb,
            stride: opts.width * 4,
            log,
        };
        d.paint(0, 0, opts.width, opts.height, BACKGROUND);
        d
    }

    fn pid(&self) -> u32 {
        self.running.as_ref().expect("running").process.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Fills a rectangle with one XRGB8888 colour, as the guest would.
    fn paint(&self, x: u32, y: u32, w: u32, h: u32, rgb: [u8; 3]) {
        let px = [rgb[2], rgb[1], rgb[0], 0];
        let row: Vec<u8> = px.iter().copied().cycle().take(w as usize * 4).collect();
        for yy in y..y + h {
            let off = u64::from(yy) * u64::from(self.stride) + u64::from(x) * 4;
            self.fb.write_all_at(&row, off).expect("paint framebuffer");
        }
    }

    fn connect(&self) -> RfbClient {
        RfbClient::connect(self.addr, V38, &Security::None, true).expect("connect")
    }

    /// Waits until the log contains `needle`.
    fn wait_log(&self, needle: &str) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Checks that dev-fb still runs and serves a new client.
    fn assert_serves(&self) {
        let mut c = self.connect();
        c.request_all(false).expect("request");
        let rects = c.read_update().expect("update for a fresh client");
        assert!(!rects.is_empty());
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            drop(r.channel);
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                match r.process.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > end => {
                        let _ = r.process.kill();
                        let _ = r.process.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Asserts that every pixel of the client's picture inside `rect` is `inside` and a probe
/// outside it is `outside`.
fn assert_rect(
    client: &RfbClient,
    (x, y, width, height): (u16, u16, u16, u16),
    inside: u32,
    outside: u32,
    what: &str,
) {
    for yy in y..y + height {
        for xx in x..x + width {
            let got = client.pixel(xx, yy);
            assert_eq!(
                got, inside,
                "{what}: pixel ({xx},{yy}) is {got:#x}, expected {inside:#x}"
            );
        }
    }
    assert_eq!(
        client.pixel(x + width, y),
        outside,
        "{what}: right of the rectangle"
    );
    assert_eq!(client.pixel(0, 0), outside, "{what}: top-left corner");
}

#[test]
fn every_rfb_version_completes_the_handshake_and_gets_the_screen() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    d.paint(10, 20, 30, 40, [255, 0, 0]);
    for version in [V33, V37, V38, b"RFB 003.005\n"] {
        let mut c = RfbClient::connect(d.addr, version, &Security::None, true)
            .unwrap_or_else(|e| panic!("{version:?}: {e:#}"));
        assert_eq!((c.width, c.height), (640, 480));
        assert_eq!(c.name, "fb-test-guest");
        assert_eq!(c.format, Format::RGB888_LE, "the default format");
        c.request_all(false).unwrap();
        c.read_update().unwrap();
        assert_rect(
            &c,
            (10, 20, 30, 40),
            0x00ff_0000,
            0x0020_4060,
            "default format",
        );
    }
}

#[test]
fn vnc_authentication_admits_the_right_password_and_refuses_a_wrong_one() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options {
        password: Some("s3cret"),
        ..Options::default()
    });
    for version in [V33, V37, V38] {
        let mut c = RfbClient::connect(d.addr, version, &Security::Vnc("s3cret".into()), true)
            .unwrap_or_else(|e| panic!("{version:?} right password: {e:#}"));
        c.request_all(false).unwrap();
        c.read_update().unwrap();

        let err = RfbClient::connect(d.addr, version, &Security::Vnc("wrong".into()), true)
            .expect_err("a wrong password was accepted");
        match err.downcast_ref::<Refused>() {
            Some(Refused::AuthFailed(reason)) => {
                if version == V38 {
                    assert!(!reason.is_empty(), "3.8 gives a reason");
                }
            }
            None => panic!("{version:?}: wrong password: unexpected error {err:#}"),
        }
    }
    // A client offering no authentication is not let in.
    assert!(RfbClient::connect(d.addr, V38, &Security::None, true).is_err());
    assert!(
        !d.log_text().contains("s3cret"),
        "the password is never logged"
    );
    d.assert_serves_with(&Security::Vnc("s3cret".into()));
}

impl Display {
    fn assert_serves_with(&self, sec: &Security) {
        let mut c = RfbClient::connect(self.addr, V38, sec, true).expect("connect");
        c.request_all(false).expect("request");
        c.read_update().expect("update");
    }
}

#[test]
fn colours_read_back_exactly_in_every_pixel_format_and_encoding() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let colours = [
        ((100, 100, 70, 70), [255, 0, 0]),
        ((200, 100, 70, 70), [0, 255, 0]),
        ((300, 100, 70, 70), [0, 0, 255]),
        ((400, 100, 70, 70), [0xc0, 0x80, 0x33]),
    ];
    for &((x, y, w, h), rgb) in &colours {
        d.paint(x, y, w, h, rgb);
    }
    // A noisy region so that ZRLE's raw and RLE tiles are exercised too.
    for i in 0..64u32 {
        d.paint(
            10 + i,
            300,
            1,
            64,
            [(i * 4) as u8, (255 - i * 3) as u8, (i * 7) as u8],
        );
    }
    let formats = [
        ("32 bpp LE", Format::RGB888_LE),
        ("32 bpp BE", Format::RGB888_BE),
        ("16 bpp 565", Format::RGB565_LE),
        ("8 bpp 332", Format::RGB332),
    ];
    // Literal values of pure red in each format, independent of the formula below.
    let red = [0x00ff_0000, 0x00ff_0000, 0xf800, 0xe0];
    for (i, &(fname, format)) in formats.iter().enumerate() {
        for (ename, enc) in [("Raw", RAW), ("Zlib", ZLIB), ("ZRLE", ZRLE)] {
            let what = format!("{fname} {ename}");
            let mut c = d.connect();
            c.set_pixel_format(format).unwrap();
            c.set_encodings(&[enc]).unwrap();
            c.request_all(false).unwrap();
            let rects = c.read_update().unwrap();
            assert!(
                rects.iter().all(|r| r.encoding == enc),
                "{what}: encodings {rects:?}"
            );
            let bg = format.value_of(BACKGROUND);
            assert_eq!(format.value_of([255, 0, 0]), red[i], "{what}: test formula");
            for &((x, y, w, h), rgb) in &colours {
                let rect = (x as u16, y as u16, w as u16, h as u16);
                assert_rect(&c, rect, format.value_of(rgb), bg, &what);
            }
            for i in 0..64u16 {
                let v = u32::from(i);
                let rgb = [(v * 4) as u8, (255 - v * 3) as u8, (v * 7) as u8];
                assert_eq!(
                    c.pixel(10 + i, 330),
                    format.value_of(rgb),
                    "{what}: noise column {i}"
                );
            }
        }
    }
}

#[test]
fn an_incremental_update_covers_a_repainted_region_and_not_the_whole_screen() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    for enc in [RAW, ZRLE] {
        let mut c = d.connect();
        c.set_encodings(&[enc]).unwrap();
        c.request_all(false).unwrap();
        c.read_update().unwrap();
        c.request_all(true).unwrap();
        d.paint(300, 200, 10, 10, [1, 2, 3]);
        let want = Format::RGB888_LE.value_of([1, 2, 3]);
        // A scan may catch the paint half done; the rest follows in the next update.
        let mut covered = [false; 100];
        for round in 0..5 {
            let rects = c.read_update().unwrap();
            // dev-fb sends the changed rows of the changed 16-pixel spans (x 288 to 320), not
            // whole tiles.
            for r in &rects {
                let inside = r.x >= 288 && r.x + r.w <= 320 && r.y >= 200 && r.y + r.h <= 210;
                assert!(inside, "{rects:?}: more than the repainted region's spans");
            }
            for r in &rects {
                for y in r.y..r.y + r.h {
                    for x in r.x..r.x + r.w {
                        if (300..310).contains(&x) && (200..210).contains(&y) {
                            covered[usize::from(y - 200) * 10 + usize::from(x - 300)] = true;
                        }
                    }
                }
            }
            if covered.iter().all(|&c| c) {
                break;
            }
            assert!(
                round < 4,
                "updates {rects:?} never covered the repainted region"
            );
            c.request_all(true).unwrap();
        }
        for (x, y) in [(300, 200), (309, 209), (305, 205)] {
            assert_eq!(c.pixel(x, y), want, "pixel ({x},{y})");
        }
        d.paint(300, 200, 10, 10, BACKGROUND);
    }
}

#[test]
fn two_clients_at_once_both_see_a_change() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let mut a = d.connect();
    let mut b = d.connect();
    b.set_pixel_format(Format::RGB565_LE).unwrap();
    for c in [&mut a, &mut b] {
        c.request_all(false).unwrap();
        c.read_update().unwrap();
        c.request_all(true).unwrap();
    }
    d.paint(0, 0, 64, 64, [255, 255, 255]);
    for c in [&mut a, &mut b] {
        let white = c.format.value_of([255, 255, 255]);
        // A scan may catch the paint half done (even miss row 5 while seeing later rows, as
        // the paint overtakes a slow scan); the rest follows in the next update.
        for round in 0..5 {
            c.read_update().unwrap();
            if c.pixel(5, 5) == white && c.pixel(63, 63) == white {
                break;
            }
            assert!(
                round < 4,
                "five updates and the paint is still not all there"
            );
            c.request_all(true).unwrap();
        }
    }
}

#[test]
fn a_client_that_never_reads_is_dropped_while_another_keeps_getting_updates() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options {
        width: 1024,
        height: 768,
        ..Options::default()
    });
    let mut good = d.connect();
    let mut stuck = d.connect();
    // The stuck client asks for the whole screen, raw, over and over, and never reads.
    stuck.set_encodings(&[RAW]).unwrap();
    let mut updates = 0;
    let mut colour = 0u8;
    let start = Instant::now();
    let mut stuck_alive = true;
    while start.elapsed() < Duration::from_secs(20) && (stuck_alive || updates < 20) {
        if stuck_alive {
            for _ in 0..4 {
                if stuck.request_all(false).is_err() {
                    stuck_alive = false;
                    break;
                }
            }
        }
        colour = colour.wrapping_add(1);
        d.paint(0, 0, 64, 64, [colour, 0, 0]);
        good.request_all(true).unwrap();
        good.read_update()
            .expect("the reading client keeps getting updates");
        assert_eq!(good.pixel(1, 1), Format::RGB888_LE.value_of([colour, 0, 0]));
        updates += 1;
        if !d.log_text().contains("output queue full") {
            continue;
        }
        stuck_alive = false;
    }
    assert!(
        d.log_text().contains("output queue full"),
        "the stuck client was not dropped in 20 s ({updates} updates to the other)"
    );
    assert!(
        updates >= 20,
        "only {updates} updates reached the reading client"
    );
    d.assert_serves();
}

#[test]
fn hostile_input_closes_only_that_client_and_the_next_is_served() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let mut bystander = d.connect();

    // A garbled version string.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = [0u8; 12];
    s.read_exact(&mut v).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_closed(&mut s, "garbled version");
    // A short version, then hang-up: nothing to check but that the server goes on.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(b"RFB 00").unwrap();
    drop(s);

    // Cut text longer than 1 MiB.
    let mut c = d.connect();
    c.send_raw(&[6, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]).unwrap();
    assert_client_closed(c, "huge cut text");

    // An unknown message type.
    let mut c = d.connect();
    c.send_raw(&[99, 1, 2, 3]).unwrap();
    assert_client_closed(c, "unknown message type");

    // SetEncodings with the largest count: kept in bound, skipped, and the client goes on.
    let mut c = d.connect();
    let mut msg = vec![2, 0, 0xff, 0xff];
    for i in 0..0xffffi32 {
        msg.extend_from_slice(&(i % 7 - 3).to_be_bytes());
    }
    c.send_raw(&msg).unwrap();
    c.request_all(false).unwrap();
    c.read_update().expect("served after a huge SetEncodings");

    // An empty request is ignored; an enormous one is clipped to the screen.
    c.request(false, 10, 10, 0, 0).unwrap();
    c.request(false, 0, 0, 0xffff, 0xffff).unwrap();
    let rects = c.read_update().unwrap();
    assert!(
        rects
            .iter()
            .all(|r| u32::from(r.x) + u32::from(r.w) <= WIDTH
                && u32::from(r.y) + u32::from(r.h) <= HEIGHT),
        "{rects:?} leave the screen"
    );
    // A request wholly outside the screen is ignored: the next update answers the next request.
    c.request(false, 5000, 5000, 10, 10).unwrap();
    c.request(false, 0, 0, 8, 8).unwrap();
    let rects = c.read_update().unwrap();
    assert_eq!(rects.len(), 1);
    assert_eq!((rects[0].w, rects[0].h), (8, 8));

    // The bystander was never disturbed.
    bystander.request_all(false).unwrap();
    bystander
        .read_update()
        .expect("the bystander is still served");
    d.assert_serves();
}

fn assert_closed(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: the server did not close the connection: {e}"),
        }
    }
}

fn assert_client_closed(c: RfbClient, what: &str) {
    let mut s = c.stream().try_clone().unwrap();
    drop(c);
    assert_closed(&mut s, what);
}

#[test]
fn connections_beyond_sixteen_are_closed_and_the_others_keep_working() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let mut clients: Vec<RfbClient> = (0..16).map(|_| d.connect()).collect();
    let mut extra = TcpStream::connect(d.addr).unwrap();
    assert_closed(&mut extra, "the seventeenth connection");
    assert!(d.wait_log("too many VNC clients"));
    for c in &mut clients {
        c.request(false, 0, 0, 8, 8).unwrap();
        c.read_update().expect("the first sixteen are still served");
    }
    drop(clients.pop());
    // A slot came free: the next client is served once dev-fb has seen the hang-up.
    assert!(d.wait_log("client hung up"));
    d.assert_serves();
}

#[test]
fn a_non_shared_client_disconnects_the_others() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let a = d.connect();
    let mut b = RfbClient::connect(d.addr, V38, &Security::None, false).unwrap();
    assert_client_closed(a, "shared client after an exclusive one");
    b.request_all(false).unwrap();
    b.read_update().unwrap();

    let forced = Display::start(&Options {
        share: SharePolicy::ForceShared,
        ..Options::default()
    });
    let mut a = forced.connect();
    let _b = RfbClient::connect(forced.addr, V38, &Security::None, false).unwrap();
    a.request_all(false).unwrap();
    a.read_update()
        .expect("force-shared keeps the first client");
}

#[test]
fn a_mode_change_reaches_clients_as_a_desktop_size_and_bad_modes_are_refused() {
    if skip_unless_root() {
        return;
    }
    let mut d = Display::start(&Options::default());
    let mut plain = d.connect();
    plain.set_encodings(&[RAW, DESKTOP_SIZE]).unwrap();
    let mut ext = d.connect();
    ext.set_encodings(&[ZRLE, EXTENDED_DESKTOP_SIZE, DESKTOP_SIZE])
        .unwrap();
    for c in [&mut plain, &mut ext] {
        c.request_all(false).unwrap();
        c.read_update().unwrap();
        c.request_all(true).unwrap();
    }
    let running = d.running.as_ref().unwrap();
    // Past the end of the framebuffer: refused, nothing reaches the clients.
    let mut bad = Mode::packed(1024, 768, 32);
    bad.offset = 4096;
    running.channel.send(&ToDisplay::SetMode(bad), &[]).unwrap();
    assert!(d.wait_log("refusing a display mode"));
    // 800x600 at 16 bpp.
    running
        .channel
        .send(&ToDisplay::SetMode(Mode::packed(800, 600, 16)), &[])
        .unwrap();
    // Paint a 565 red square at (700, 500) with the new stride.
    d.stride = 800 * 2;
    let red565 = 0xf800u16.to_le_bytes();
    for y in 500..520u64 {
        let row: Vec<u8> = red565.iter().copied().cycle().take(20 * 2).collect();
        d.fb.write_all_at(&row, y * 1600 + 700 * 2).unwrap();
    }
    for (c, pseudo) in [
        (&mut plain, DESKTOP_SIZE),
        (&mut ext, EXTENDED_DESKTOP_SIZE),
    ] {
        // The paint may race the mode change and reach the client as tiles of the old mode
        // first; the resize follows in one of the next updates.
        let mut rects = c.read_update().unwrap();
        for _ in 0..5 {
            if rects[0].encoding == pseudo {
                break;
            }
            c.request_all(true).unwrap();
            rects = c.read_update().unwrap();
        }
        assert_eq!(rects[0].encoding, pseudo, "{rects:?}");
        assert_eq!((c.width, c.height), (800, 600));
        // The whole new screen follows in the same update; the test's paint may land after
        // that scan, and then arrives as an incremental update.
        for _ in 0..5 {
            if c.pixel(710, 510) == 0x00ff_0000 {
                break;
            }
            c.request_all(true).unwrap();
            c.read_update().unwrap();
        }
        assert_eq!(c.pixel(710, 510), 0x00ff_0000);
    }
    d.stride = WIDTH * 4;
}

#[test]
fn keys_and_pointer_reach_the_input_queue_as_evdev_codes() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let mut c = d.connect();
    c.set_encodings(&[RAW, QEMU_EXTENDED_KEY]).unwrap();
    c.request_all(false).unwrap();
    let rects = c.read_update().unwrap();
    assert!(
        rects.iter().any(|r| r.encoding == QEMU_EXTENDED_KEY),
        "the server confirms QEMU extended keys: {rects:?}"
    );
    c.key(u32::from(b'a'), true).unwrap();
    c.key(0xff0d, false).unwrap(); // Return
    c.qemu_key(0xff52, 0x80 | 0x48, true).unwrap(); // Up, by scancode
    c.pointer(1, 639, 479).unwrap();
    c.pointer(0, 0, 0).unwrap();
    assert!(d.wait_log("Pointer { x: 0, y: 0, buttons: 0 }"));
    let log = d.log_text();
    for needle in [
        "Key { code: 30, down: true }",
        "Key { code: 28, down: false }",
        "Key { code: 103, down: true }",
        "Pointer { x: 32767, y: 32767, buttons: 1 }",
    ] {
        assert!(log.contains(needle), "log lacks {needle}:\n{log}");
    }
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the ")" of the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_client_on_an_idle_screen_costs_almost_no_cpu() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options {
        width: 1024,
        height: 768,
        ..Options::default()
    });
    let mut c = d.connect();
    c.request_all(false).unwrap();
    c.read_update().unwrap();
    // A connected client with no request outstanding: no scanning at all.
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let quiet = cpu_ticks(d.pid()) - before;
    // What real viewers do: an incremental request always outstanding.
    c.request_all(true).unwrap();
    // Past the fast-scan second and the slow tier (3 s in all): one scan a second.
    std::thread::sleep(Duration::from_millis(3500));
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let waiting = cpu_ticks(d.pid()) - before;
    eprintln!(
        "dev-fb CPU in 2 s at 1024x768: {quiet} ticks with no request, {waiting} ticks with an \
         incremental request outstanding"
    );
    let field = |f| tests::procfs::field(d.pid(), f).unwrap_or_default();
    eprintln!(
        "dev-fb memory: VmRSS {}, RssAnon {}, RssShmem {} (framebuffer 1024x768x4 = 3072 kB)",
        field("VmRSS"),
        field("RssAnon"),
        field("RssShmem")
    );
    // 100 ticks a second: 1 tick is 0.5% of one core over 2 s. Two scans of 1024x768 take
    // about 0.6 ms in a release build; an unoptimised one, about 60 ms.
    assert!(
        quiet <= 1,
        "dev-fb used {quiet} ticks in 2 s with nothing to do"
    );
    let limit = if cfg!(debug_assertions) { 20 } else { 2 };
    assert!(
        waiting <= limit,
        "dev-fb used {waiting} ticks in 2 s on an idle screen"
    );
}

/// After a quiet spell dev-fb scans once a second: a change the guest makes on its own reaches
/// a waiting client within that second, and client input brings the next scan forward to the
/// fast rate (33 ms), so a change that follows input arrives at once.
#[test]
fn after_a_quiet_spell_a_change_arrives_within_a_second_and_one_after_input_at_once() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let mut c = d.connect();
    c.request_all(false).unwrap();
    c.read_update().unwrap();
    // Past the fast second and the slow tier: the screen is idle (a scan a second).
    let quiet = Duration::from_millis(3500);
    let paint_and_wait = |c: &mut RfbClient, colour: [u8; 3], input: bool| {
        c.request_all(true).unwrap();
        std::thread::sleep(quiet);
        if input {
            c.pointer(0, 10, 10).unwrap();
        }
        d.paint(100, 100, 20, 20, colour);
        let start = Instant::now();
        assert!(c.wait_message(Duration::from_secs(5)).unwrap(), "no update");
        let latency = start.elapsed();
        // Read the whole change (a scan may catch the paint half done).
        loop {
            c.read_update().unwrap();
            if c.pixel(119, 119) == c.format.value_of(colour) {
                break;
            }
            c.request_all(true).unwrap();
        }
        latency
    };
    let idle = paint_and_wait(&mut c, [200, 0, 0], false);
    let after_input = [
        paint_and_wait(&mut c, [0, 200, 0], true),
        paint_and_wait(&mut c, [0, 0, 200], true),
    ];
    eprintln!(
        "MEASURE first update after a quiet spell: {idle:?} on its own, {after_input:?} after \
         pointer input"
    );
    // 1 s between idle scans, plus time to encode and for a busy host.
    assert!(
        idle <= Duration::from_millis(1500),
        "{idle:?} to the first update"
    );
    // A scan 33 ms after the input; by chance alone (a scan a second) both would be this
    // quick one time in eleven.
    for l in after_input {
        assert!(
            l <= Duration::from_millis(300),
            "{l:?} to the first update after input"
        );
    }
}

#[test]
fn dev_fb_runs_sandboxed() {
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options::default());
    let _c = d.connect();
    tests::procfs::assert_sandboxed(d.pid()).expect("dev-fb is sandboxed");
    let log = d.log_text();
    assert!(log.contains("in capability mode"), "log: {log}");
    assert!(log.contains("VNC client connected"), "log: {log}");
}

/// The pictures of `bench_vnc` (`tests/src/bin/bench_vnc.rs`) at 1600×900, as XRGB8888 bytes.
mod bench_pictures {
    pub const W: u32 = tests::pictures::SIZE.0;
    pub const H: u32 = tests::pictures::SIZE.1;
    pub use tests::pictures::SMALL;
    use tests::pictures::{SMALL_COLOUR, SOLID, stripe_runs};

    fn push(fb: &mut Vec<u8>, [r, g, b]: [u8; 3]) {
        fb.extend_from_slice(&[b, g, r, 0]);
    }

    /// Vertical stripes of 16 colours in 8-row bands.
    pub fn stripes() -> Vec<u8> {
        let mut fb = Vec::with_capacity((W * H * 4) as usize);
        let bands = [stripe_runs(false), stripe_runs(true)];
        for y in 0..H {
            for &(colour, w) in &bands[(y / 8 % 2) as usize] {
                for _ in 0..w {
                    push(&mut fb, colour);
                }
            }
        }
        fb
    }

    /// Random bytes (a fixed xorshift sequence), padding byte included, as `cat /dev/urandom`.
    pub fn noise() -> Vec<u8> {
        let mut s: u64 = 0x1234_5678_9abc_def1;
        (0..W * H * 4)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// One colour, with the small box on it if `boxed`.
    pub fn solid(boxed: bool) -> Vec<u8> {
        let (bx, by, bw, bh) = SMALL;
        let mut fb = Vec::with_capacity((W * H * 4) as usize);
        for y in 0..H {
            for x in 0..W {
                let inside = boxed && (bx..bx + bw).contains(&x) && (by..by + bh).contains(&y);
                push(&mut fb, if inside { SMALL_COLOUR } else { SOLID });
            }
        }
        fb
    }
}

/// Checks every pixel of the client's picture against `fb` (XRGB8888).
fn assert_picture(c: &RfbClient, fb: &[u8], what: &str) {
    let width = bench_pictures::W as usize;
    for (i, px) in fb.chunks_exact(4).enumerate() {
        let (x, y) = ((i % width) as u16, (i / width) as u16);
        let want = c.format.value_of([px[2], px[1], px[0]]);
        let got = c.pixel(x, y);
        assert_eq!(
            got, want,
            "{what}: pixel ({x},{y}) is {got:#x}, not {want:#x}"
        );
    }
}

/// A step of the bench: name, picture, incremental, QEMU's bytes (Zlib, ZRLE).
type Step<'a> = (&'a str, &'a Vec<u8>, bool, Option<(u64, u64)>);

/// Reads one update, waiting up to a minute for it to start (a debug build of dev-fb takes
/// seconds to deflate a screen of noise).
fn read_slow_update(c: &mut RfbClient, what: &str) -> Vec<tests::rfb_client::RectInfo> {
    assert!(
        c.wait_message(Duration::from_mins(1)).unwrap(),
        "{what}: no update within a minute"
    );
    c.read_update().unwrap()
}

/// The bench's changes (`bench_vnc`, issue 7) with the framebuffer filled at once, so each
/// change is one update: the bytes a 32 bpp depth-24 client offering one encoding reads must
/// not exceed what QEMU's VNC server sent for the same change, and the client's decoded
/// picture must equal the framebuffer. The order is the bench's: the deflate stream runs on
/// from one change to the next, so what went before counts.
#[test]
fn zlib_and_zrle_send_no_more_bytes_than_qemu_for_the_bench_pictures() {
    use bench_pictures::{H, SMALL, W, noise, solid, stripes};
    if skip_unless_root() {
        return;
    }
    let display = Display::start(&Options {
        width: W,
        height: H,
        max: (W, H),
        ..Options::default()
    });
    let (boxed, noise, stripes, solid) = (solid(true), noise(), stripes(), solid(false));
    // Per step: name, picture, incremental, and QEMU's bytes (Zlib, ZRLE) from the bench on
    // Debian's QEMU with bochs-display.
    let steps: [Step<'_>; 6] = [
        ("noise", &noise, true, Some((5_761_039, 4_321_476))),
        ("noise refresh", &noise, false, None),
        ("stripes", &stripes, true, Some((34_199, 1_111))),
        ("stripes refresh", &stripes, false, Some((32_880, 711))),
        ("solid", &solid, true, Some((5_628, 41))),
        ("small", &boxed, true, Some((103, 47))),
    ];
    let mut table = Vec::new();
    for (ename, enc) in [("Zlib", ZLIB), ("ZRLE", ZRLE)] {
        display.fb.write_all_at(&boxed, 0).unwrap();
        let mut client = display.connect();
        client.set_pixel_format(Format::RGB888_LE).unwrap();
        client.set_encodings(&[enc]).unwrap();
        client.request_all(false).unwrap();
        read_slow_update(&mut client, ename);
        assert_picture(&client, &boxed, &format!("{ename} first picture"));
        for &(step, picture, incremental, qemu) in &steps {
            let what = format!("{ename} {step}");
            // No request is outstanding, so dev-fb does not scan while the picture is written:
            // the next request sees all of the change at once.
            display.fb.write_all_at(picture, 0).unwrap();
            let before = client.bytes_read;
            client.request_all(incremental).unwrap();
            let rects = read_slow_update(&mut client, &what);
            let bytes = client.bytes_read - before;
            assert!(rects.iter().all(|r| r.encoding == enc), "{what}: {rects:?}");
            assert_picture(&client, picture, &what);
            if step == "small" {
                // dev-fb finds changes per 16-pixel span of a row (as QEMU does): the box
                // widened to whole spans, its rows exact.
                let sent = [rects[0].x, rects[0].y, rects[0].w, rects[0].h];
                let (x0, x1) = (SMALL.0 / 16 * 16, (SMALL.0 + SMALL.2).div_ceil(16) * 16);
                let spans = [x0, SMALL.1, x1 - x0, SMALL.3].map(|v| v as u16);
                assert_eq!(rects.len(), 1, "{what}: {rects:?}");
                assert_eq!(sent, spans, "{what}: only the box's spans");
            }
            let limit = qemu.map(|(z, r)| if enc == ZLIB { z } else { r });
            table.push(format!(
                "{what}: {bytes} bytes in {} rects (QEMU {})",
                rects.len(),
                limit.map_or("-".into(), |l| l.to_string())
            ));
            if let Some(limit) = limit {
                assert!(bytes <= limit, "{what}: {bytes} bytes, QEMU sent {limit}");
            }
        }
    }
    eprintln!("{}", table.join("\n"));
}

/// Issue 7's idle figures at the bench's size: over 10 s with one idle ZRLE client holding an
/// incremental request, dev-fb's CPU and memory (after a whole-screen update, so the encoder's
/// buffers and the deflate stream exist).
#[test]
fn an_idle_client_at_1600x900_costs_little_cpu_and_memory() {
    use bench_pictures::{H, W, stripes};
    if skip_unless_root() {
        return;
    }
    let d = Display::start(&Options {
        width: W,
        height: H,
        max: (W, H),
        ..Options::default()
    });
    d.fb.write_all_at(&stripes(), 0).unwrap();
    let mut c = d.connect();
    c.set_pixel_format(Format::RGB888_LE).unwrap();
    c.set_encodings(&[ZRLE]).unwrap();
    c.request_all(false).unwrap();
    read_slow_update(&mut c, "first picture");
    c.request_all(true).unwrap();
    // Past the fast-scan second and the slow tier: the screen is idle.
    std::thread::sleep(Duration::from_millis(3500));
    let before = cpu_ticks(d.pid());
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let ticks = cpu_ticks(d.pid()) - before;
    let secs = window.elapsed().as_secs_f64();
    assert!(
        !c.wait_message(Duration::from_millis(10)).unwrap(),
        "an idle screen sends nothing"
    );
    let kb = |f| {
        tests::procfs::field(d.pid(), f)
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (rss, anon, shmem) = (kb("VmRSS"), kb("RssAnon"), kb("RssShmem"));
    let fb_kb = u64::from(W * H * 4) / 1024;
    // 100 ticks a second (USER_HZ).
    let pct = f64::from(u32::try_from(ticks).unwrap_or(u32::MAX)) / secs;
    eprintln!(
        "MEASURE dev-fb idle at {W}x{H}: {ticks} ticks in {secs:.1} s = {pct:.2}% of a core; \
         VmRSS {rss} kB, RssAnon {anon} kB, RssShmem {shmem} kB (framebuffer {fb_kb} kB)"
    );
    // Idle, a scan a second hashes the 5.6 MB picture in under 1 ms (release): 0.1% of a
    // core, 1 tick in 10 s. 5 ticks leave room for a busy host; the old shadow copy scanned
    // every 200 ms cost 7. An unoptimised dev-fb (a debug test run) takes about 50 ms a scan
    // unless the workspace optimises xxhash-rust in dev builds, so it gets 10% of a core.
    let limit = if cfg!(debug_assertions) { 100 } else { 5 };
    assert!(
        ticks <= limit,
        "dev-fb used {ticks} ticks ({pct:.2}% of a core) in 10 s on an idle screen"
    );
    // The target (issue 7): 8 MiB plus the framebuffer, which dev-fb maps shared.
    assert!(
        rss <= 8 * 1024 + fb_kb,
        "VmRSS {rss} kB over 8 MiB + the framebuffer ({fb_kb} kB)"
    );
}

/// Real clients (vncdotool from `PyPI`, not our code) against VNC Authentication: two capture
/// the screen at the same time with the password and both see exactly the painted block; a
/// wrong password gets no picture, and dev-fb serves on.
#[test]
fn vncdotool_clients_with_the_password_capture_at_once_and_a_wrong_password_gets_nothing() {
    use tests::real_vnc::{VncdoFormat, vncdo_capture_with_password};
    if skip_unless_root() {
        return;
    }
    let python = match tests::real_vnc::python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let d = Display::start(&Options {
        password: Some("s3cret"),
        ..Options::default()
    });
    let colour = [0xe0, 0x30, 0x10];
    d.paint(0, 0, WIDTH, 64, colour);
    let dir = tempfile::tempdir().expect("tempdir");
    let format = VncdoFormat {
        bpp: 32,
        encoding: "zrle",
    };
    let capture = |name: &str, password: &'static str, timeout_s: u32| {
        let (python, addr) = (python.clone(), d.addr);
        let png = dir.path().join(format!("{name}.png"));
        std::thread::spawn(move || {
            vncdo_capture_with_password(
                &python,
                addr,
                format,
                &png,
                &[(colour, 0)],
                Some(password),
                timeout_s,
            )
        })
    };
    let both = [capture("a", "s3cret", 120), capture("b", "s3cret", 120)];
    for (i, c) in both.into_iter().enumerate() {
        let (report, found) = c
            .join()
            .expect("capture thread")
            .unwrap_or_else(|e| panic!("client {i} with the password: {e:#}"));
        assert!(report.contains("640x480"), "client {i}: {report}");
        let block = found.first().expect("a match line");
        assert_eq!(
            (block.count, block.bounds),
            (u64::from(WIDTH) * 64, Some([0, 0, WIDTH, 64])),
            "client {i}: the painted block"
        );
    }
    // vncdotool does not give up when refused: it waits out its timeout.
    let wrong = capture("wrong", "not-it", 10)
        .join()
        .expect("capture thread");
    assert!(wrong.is_err(), "a wrong password got a picture: {wrong:?}");
    assert!(
        !d.log_text().contains("s3cret"),
        "the password is never logged"
    );
    d.assert_serves_with(&Security::Vnc("s3cret".into()));
}
