//! dev-fb's virtio-input keyboard and tablet, device level (no KVM): the real sandboxed dev-fb
//! started as the supervisor starts it for a guest with `xhci_mouse="yes"` — guest RAM in a
//! shared file, one device channel per input device — with this test playing the runner (the
//! handshake, `InfoWithTable`, `Activate` with kick and call eventfds) and the guest's driver
//! (`tests::virtio_driver`: 8-byte event buffers on the event queue, LED events on the status
//! queue), and an RFB client (`tests::rfb_client`) sending keys and pointer events. Asserts
//! the exact `virtio_input_event`s in the guest's buffers; a flood with no buffers stays
//! bounded; a broken ring asks for a reset while VNC keeps working; what a client holds down
//! is released when it goes, and what anyone held when dev-fb died when a new dev-fb resumes
//! the rings; no `EV_REP`, a client's repeated key-down is an autorepeat; a runner slow to
//! handshake delays VNC by seconds only.
//!
//! Needs root (the sandbox unshares namespaces and switches uid); skips with a reason
//! otherwise. Build the binary first: `cargo build -p dev-fb`.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelKind};
use proto::device::{
    ConfigTable, DeviceSetup, FromDevice, InputKind, InputSetup, MemoryRegion, ToDevice,
    VIRTIO_ID_INPUT, input_select,
};
use proto::display::{DisplaySetup, SharePolicy};
use supervisor::spawn;
use tests::rfb_client::{QEMU_EXTENDED_KEY, RAW, RfbClient, Security};
use tests::virtio_driver::{Buf, GuestRam, SplitQueue, Used, activation};

const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
const RAM: u64 = 16 << 20;
const QUEUE: u16 = 64;
const WAIT: Duration = Duration::from_secs(10);
/// Where each device's rings and buffers live in guest RAM.
const KEYBOARD_BASE: u64 = 0x10_0000;
const TABLET_BASE: u64 = 0x40_0000;
const EVENTQ_AT: u64 = 0;
const STATUSQ_AT: u64 = 0x1_0000;
const BUFFERS_AT: u64 = 0x2_0000;

const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_REL: u16 = 2;
const EV_ABS: u16 = 3;
const EV_LED: u16 = 0x11;
const BTN_LEFT: u16 = 0x110;
const REL_WHEEL: u16 = 8;

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: dev-fb tests need root (the sandbox unshares namespaces, switches uid)");
    true
}

/// One `virtio_input_event` as the guest reads it: (type, code, value).
type Ev = (u16, u16, u32);

const SYN: Ev = (EV_SYN, 0, 0);

/// The guest's side of one virtio-input device.
struct Driver {
    runner: Channel,
    table: ConfigTable,
    eventq: SplitQueue,
    statusq: SplitQueue,
    base: u64,
    /// Event buffers handed out so far (each is `BUFFERS_AT + 8 * n`, wrapping at the queue).
    posted: u64,
}

impl Driver {
    /// Handshakes as the runner, reads the device's `InfoWithTable`, lays out the queues.
    fn connect(runner: Channel, ram: &GuestRam, base: u64) -> Driver {
        let table = Self::introduce(&runner);
        Driver {
            runner,
            table,
            eventq: SplitQueue::new(ram, base + EVENTQ_AT, QUEUE).expect("eventq"),
            statusq: SplitQueue::new(ram, base + STATUSQ_AT, QUEUE).expect("statusq"),
            base,
            posted: 0,
        }
    }

    /// Handshakes as the runner and reads the device's `InfoWithTable`.
    fn introduce(runner: &Channel) -> ConfigTable {
        runner
            .handshake_timeout(ChannelKind::RunnerDevice, WAIT)
            .expect("handshake");
        let msg = runner.recv_timeout::<FromDevice>(WAIT).expect("info").msg;
        msg.validate().expect("a valid InfoWithTable");
        let FromDevice::InfoWithTable { info, table } = msg else {
            panic!("expected InfoWithTable, got {msg:?}");
        };
        assert_eq!(info.device_type, VIRTIO_ID_INPUT);
        assert_eq!(info.queues, 2);
        table
    }

    /// A restarted device process on `runner`: the same queues, as the runner keeps them.
    fn reconnect(&mut self, runner: Channel) {
        let table = Self::introduce(&runner);
        assert_eq!(table, self.table, "the restarted device is the same device");
        self.runner = runner;
    }

    fn name(&self) -> String {
        let name = self
            .table
            .lookup(input_select::ID_NAME, 0)
            .unwrap_or_default();
        String::from_utf8_lossy(name).into_owned()
    }

    /// `DRIVER_OK`: the runner's `Activate` with both queues' eventfds; waits for `Activated`.
    fn activate(&self) {
        let (msg, fds) = activation(1 << 32, [(0, &self.eventq), (1, &self.statusq)]);
        self.runner.send(&msg, &fds).expect("send Activate");
        let reply = self
            .runner
            .recv_timeout::<FromDevice>(WAIT)
            .expect("reply")
            .msg;
        assert_eq!(reply, FromDevice::Activated);
    }

    fn buffer_addr(&self, n: u64) -> u64 {
        self.base + BUFFERS_AT + 8 * (n % u64::from(QUEUE))
    }

    /// Posts `n` 8-byte event buffers (at most the queue's worth outstanding) and kicks.
    fn post(&mut self, ram: &GuestRam, n: u64) {
        for _ in 0..n {
            let addr = self.buffer_addr(self.posted);
            ram.write(addr, &[0xee; 8]);
            let head = self.eventq.add_chain(ram, &[Buf::input(addr, 8)]);
            self.eventq.publish(ram, head);
            self.posted += 1;
        }
        self.eventq.kick();
    }

    /// Waits for `n` used event buffers and decodes them, in order.
    fn events(&mut self, ram: &GuestRam, n: usize) -> Vec<Ev> {
        let used = self.eventq.wait_used(ram, n, WAIT).expect("events");
        self.decode(ram, &used)
    }

    fn decode(&self, ram: &GuestRam, used: &[Used]) -> Vec<Ev> {
        used.iter()
            .map(|u| {
                assert_eq!(u.len, 8, "one event per buffer");
                // Heads are handed out in order, one descriptor per buffer.
                let b = ram.read(self.base + BUFFERS_AT + 8 * u64::from(u.id), 8);
                (
                    u16::from_le_bytes([b[0], b[1]]),
                    u16::from_le_bytes([b[2], b[3]]),
                    u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                )
            })
            .collect()
    }

    /// Asserts that nothing more arrives within `quiet`.
    fn assert_quiet(&mut self, ram: &GuestRam, quiet: Duration) {
        if let Ok(extra) = self.eventq.wait_some(ram, quiet) {
            panic!("unexpected events: {:?}", self.decode(ram, &extra));
        }
    }
}

/// dev-fb with a keyboard and a tablet.
struct Rig {
    running: Option<spawn::Running>,
    addr: SocketAddr,
    ram: GuestRam,
    keyboard: Driver,
    tablet: Driver,
    log: tempfile::NamedTempFile,
    /// Kept open for dev-fb's life (the test never paints it).
    fb: fs::File,
}

/// A started dev-fb process and the runner's ends of its device channels.
struct Launched {
    running: spawn::Running,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
    fb: fs::File,
    keyboard: Channel,
    tablet: Channel,
}

/// Starts dev-fb over `ram` as the supervisor would for a guest with a keyboard and tablet.
fn launch(ram: &GuestRam) -> Launched {
    let fb_bytes = u64::from(WIDTH) * u64::from(HEIGHT) * 4;
    let fb = tempfile::tempfile().expect("framebuffer file");
    fb.set_len(fb_bytes).expect("size framebuffer");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("listener address");
    let log = tempfile::NamedTempFile::new().expect("log file");
    let log_fd = log.reopen().expect("log fd");
    let (kbd_runner, kbd_dev) = Channel::pair().expect("keyboard channel");
    let (tab_runner, tab_dev) = Channel::pair().expect("tablet channel");
    let (uid, gid) = sandbox::nobody();
    let boot = Bootstrap {
        role: Role::DevFb,
        vm_name: "input-test".into(),
        sandbox: SandboxSettings {
            uid,
            gid,
            max_fds: 64,
        },
        fds: vec![
            FdRole::Log,
            FdRole::Framebuffer,
            FdRole::VncListener,
            FdRole::GuestMemory,
            FdRole::DeviceChannel,
            FdRole::DeviceChannel,
        ],
        log_filter: "debug,dev_fb::input=trace".into(),
    };
    let running = spawn::spawn(
        &tests::harness::build_dir().join("dev-fb"),
        &boot,
        &[
            log_fd.as_fd(),
            fb.as_fd(),
            listener.as_fd(),
            ram.fd(),
            kbd_dev.as_fd(),
            tab_dev.as_fd(),
        ],
    )
    .expect("spawn dev-fb (run `cargo build -p dev-fb` first)");
    drop((listener, kbd_dev, tab_dev));
    let setup = DisplaySetup {
        width: WIDTH,
        height: HEIGHT,
        max_width: WIDTH,
        max_height: HEIGHT,
        framebuffer_bytes: fb_bytes,
        password: None,
        share: SharePolicy::ForceShared,
    };
    running.channel.send(&setup, &[]).expect("send setup");
    let input = DeviceSetup::Input(InputSetup {
        memory: vec![MemoryRegion {
            guest_addr: 0,
            size: RAM,
            file_offset: 0,
        }],
        devices: vec![InputKind::Keyboard, InputKind::Tablet],
    });
    running.channel.send(&input, &[]).expect("send input setup");
    Launched {
        running,
        addr,
        log,
        fb,
        keyboard: kbd_runner,
        tablet: tab_runner,
    }
}

impl Rig {
    /// A started rig with both devices activated, or `None` (after saying why) without root.
    fn activated() -> Option<Rig> {
        if skip_unless_root() {
            return None;
        }
        let rig = Rig::start();
        rig.keyboard.activate();
        rig.tablet.activate();
        Some(rig)
    }

    fn start() -> Rig {
        let ram = GuestRam::new(RAM).expect("guest RAM");
        let l = launch(&ram);
        let keyboard = Driver::connect(l.keyboard, &ram, KEYBOARD_BASE);
        let tablet = Driver::connect(l.tablet, &ram, TABLET_BASE);
        Rig {
            running: Some(l.running),
            addr: l.addr,
            ram,
            keyboard,
            tablet,
            log: l.log,
            fb: l.fb,
        }
    }

    /// Kills dev-fb and starts another over the same guest RAM, as the supervisor restarts a
    /// crashed device; the drivers keep their queues.
    fn restart(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.process.kill();
            let _ = r.process.wait();
        }
        let l = launch(&self.ram);
        self.keyboard.reconnect(l.keyboard);
        self.tablet.reconnect(l.tablet);
        self.running = Some(l.running);
        self.addr = l.addr;
        self.log = l.log;
        self.fb = l.fb;
    }

    fn connect(&self) -> RfbClient {
        let mut c = RfbClient::connect(self.addr, b"RFB 003.008\n", &Security::None, true)
            .expect("connect");
        c.set_encodings(&[RAW, QEMU_EXTENDED_KEY])
            .expect("encodings");
        c.request_all(false).expect("request");
        c.read_update().expect("first update");
        c
    }

    fn alive(&mut self) -> bool {
        let r = self.running.as_mut().expect("running");
        matches!(r.process.try_wait(), Ok(None))
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) -> bool {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            drop(r.channel);
            let end = Instant::now() + Duration::from_secs(5);
            while !matches!(r.process.try_wait(), Ok(Some(_))) {
                if Instant::now() > end {
                    let _ = r.process.kill();
                    let _ = r.process.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn the_devices_introduce_themselves_with_names_ids_and_event_bitmaps() {
    if skip_unless_root() {
        return;
    }
    let rig = Rig::start();
    assert_eq!(rig.keyboard.name(), "capvm keyboard");
    assert_eq!(rig.tablet.name(), "capvm tablet");
    let devids = |d: &Driver| {
        d.table
            .lookup(input_select::ID_DEVIDS, 0)
            .map(<[u8]>::to_vec)
    };
    assert_eq!(
        devids(&rig.keyboard),
        Some(vec![6, 0, 0x27, 6, 1, 0, 1, 0]),
        "BUS_VIRTUAL, vendor 0x0627, product 1, version 1"
    );
    let keys = rig.keyboard.table.lookup(input_select::EV_BITS, 1).unwrap();
    assert_eq!(keys[30 / 8] & (1 << (30 % 8)), 1 << (30 % 8), "KEY_A");
    let axes = rig.tablet.table.lookup(input_select::EV_BITS, 3).unwrap();
    assert_eq!(axes, &[0x03], "ABS_X and ABS_Y");
    let x = rig.tablet.table.lookup(input_select::ABS_INFO, 0).unwrap();
    assert_eq!(u32::from_le_bytes([x[4], x[5], x[6], x[7]]), 32767);
    assert_eq!(rig.tablet.table.lookup(input_select::PROP_BITS, 0), None);
}

#[test]
fn keys_by_keysym_and_by_scancode_reach_the_keyboards_event_buffers() {
    let Some(mut rig) = Rig::activated() else {
        return;
    };
    rig.keyboard.post(&rig.ram, 16);
    let mut c = rig.connect();
    c.key(u32::from(b'a'), true).unwrap();
    c.key(u32::from(b'A'), false).unwrap();
    c.key(0xff0d, true).unwrap(); // Return
    c.qemu_key(0xff52, 0x80 | 0x48, true).unwrap(); // Up, by scancode
    c.qemu_key(0, 0x1e, false).unwrap(); // A up, by scancode only
    let got = rig.keyboard.events(&rig.ram, 10);
    assert_eq!(
        got,
        vec![
            (EV_KEY, 30, 1),
            SYN,
            (EV_KEY, 30, 0),
            SYN,
            (EV_KEY, 28, 1),
            SYN,
            (EV_KEY, 103, 1),
            SYN,
            (EV_KEY, 30, 0),
            SYN,
        ]
    );
    // Pointer events go to the tablet, never the keyboard.
    c.pointer(1, 10, 10).unwrap();
    rig.keyboard
        .assert_quiet(&rig.ram, Duration::from_millis(300));
}

#[test]
fn pointer_events_reach_the_tablet_as_absolute_positions_buttons_and_wheel_steps() {
    let Some(mut rig) = Rig::activated() else {
        return;
    };
    rig.tablet.post(&rig.ram, 32);
    let mut c = rig.connect();
    c.pointer(0, 639, 479).unwrap();
    c.pointer(1, 0, 0).unwrap();
    c.pointer(0, 0, 0).unwrap();
    c.pointer(0, 0, 0).unwrap(); // nothing changed: no report
    c.pointer(1 << 3, 0, 0).unwrap(); // wheel up
    c.pointer(0, 0, 0).unwrap();
    c.pointer(1 << 4, 320, 0).unwrap(); // wheel down while moving
    let got = rig.tablet.events(&rig.ram, 14);
    assert_eq!(
        got,
        vec![
            (EV_ABS, 0, 32767),
            (EV_ABS, 1, 32767),
            SYN,
            (EV_ABS, 0, 0),
            (EV_ABS, 1, 0),
            (EV_KEY, BTN_LEFT, 1),
            SYN,
            (EV_KEY, BTN_LEFT, 0),
            SYN,
            (EV_REL, REL_WHEEL, 1),
            SYN,
            (EV_ABS, 0, 16409),
            (EV_REL, REL_WHEEL, u32::MAX),
            SYN,
        ]
    );
    rig.tablet
        .assert_quiet(&rig.ram, Duration::from_millis(300));
}

#[test]
fn reports_wait_for_buffers_and_a_flood_without_buffers_stays_bounded() {
    if skip_unless_root() {
        return;
    }
    let mut rig = Rig::start();
    rig.keyboard.activate();
    let mut c = rig.connect();
    // 3000 key reports (6000 events) with not one buffer; the last is `z` up.
    for i in 0..1500u32 {
        c.key(u32::from(b'a'), true).unwrap();
        let last = i == 1499;
        c.key(u32::from(if last { b'z' } else { b'a' }), false)
            .unwrap();
    }
    assert!(
        rig.wait_log("Key { code: 44, down: false }"),
        "all keys read"
    );
    assert!(rig.alive(), "dev-fb survives the flood");
    // The backlog holds the newest 1024 events, whole reports only.
    let mut got = Vec::new();
    'rounds: loop {
        rig.keyboard.post(&rig.ram, 32);
        let mut round = 0;
        while round < 32 {
            let Ok(used) = rig
                .keyboard
                .eventq
                .wait_some(&rig.ram, Duration::from_millis(500))
            else {
                break 'rounds;
            };
            round += used.len();
            got.extend(rig.keyboard.decode(&rig.ram, &used));
        }
    }
    assert_eq!(got.len(), 1024, "bounded backlog");
    for pair in got.chunks(2) {
        assert_eq!(pair[0].0, EV_KEY, "reports are whole: {pair:?}");
        assert_eq!(pair[1], SYN);
    }
    assert_eq!(
        &got[1022..],
        &[(EV_KEY, 44, 0), SYN],
        "the newest report is kept"
    );
    // Fresh input still flows.
    rig.keyboard.post(&rig.ram, 2);
    c.key(0xff0d, true).unwrap();
    assert_eq!(rig.keyboard.events(&rig.ram, 2), vec![(EV_KEY, 28, 1), SYN]);
}

#[test]
fn led_status_buffers_are_returned_and_events_before_activation_are_dropped() {
    if skip_unless_root() {
        return;
    }
    let mut rig = Rig::start();
    let mut c = rig.connect();
    c.key(u32::from(b'q'), true).unwrap();
    assert!(rig.wait_log("Key { code: 16, down: true }"));
    rig.keyboard.activate();
    rig.keyboard.post(&rig.ram, 4);
    rig.keyboard
        .assert_quiet(&rig.ram, Duration::from_millis(300));
    // Caps Lock on, as the guest's input core sends it.
    let led = rig.keyboard.base + BUFFERS_AT + 0x1000;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&EV_LED.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    rig.ram.write(led, &bytes);
    rig.keyboard.statusq.submit(&rig.ram, &[Buf::out(led, 8)]);
    let used = rig
        .keyboard
        .statusq
        .wait_used(&rig.ram, 1, WAIT)
        .expect("status buffer back");
    assert_eq!(
        used[0].len, 0,
        "the device writes nothing into status buffers"
    );
    c.key(u32::from(b'q'), false).unwrap();
    assert_eq!(rig.keyboard.events(&rig.ram, 2), vec![(EV_KEY, 16, 0), SYN]);
}

#[test]
fn a_broken_event_ring_asks_for_a_reset_and_vnc_and_the_other_device_go_on() {
    let Some(mut rig) = Rig::activated() else {
        return;
    };
    let mut c = rig.connect();
    // The available index jumps a whole queue and more ahead (§2.7.6).
    rig.keyboard.eventq.set_avail_idx_raw(&rig.ram, QUEUE + 5);
    rig.keyboard.eventq.kick();
    c.key(u32::from(b'x'), true).unwrap();
    let reply = rig
        .keyboard
        .runner
        .recv_timeout::<FromDevice>(WAIT)
        .expect("a message")
        .msg;
    assert!(
        matches!(reply, FromDevice::NeedsReset { .. }),
        "expected NeedsReset, got {reply:?}"
    );
    assert!(rig.alive());
    // The tablet still works, and so does VNC.
    rig.tablet.post(&rig.ram, 4);
    c.pointer(0, 0, 0).unwrap();
    assert_eq!(
        rig.tablet.events(&rig.ram, 3),
        vec![(EV_ABS, 0, 0), (EV_ABS, 1, 0), SYN]
    );
    c.request_all(false).unwrap();
    assert!(!c.read_update().unwrap().is_empty());
    // A reset and a new activation bring the keyboard back.
    rig.keyboard.runner.send(&ToDevice::Reset, &[]).unwrap();
    let done = rig
        .keyboard
        .runner
        .recv_timeout::<FromDevice>(WAIT)
        .unwrap()
        .msg;
    assert_eq!(done, FromDevice::ResetDone);
    let ram = &rig.ram;
    rig.keyboard.eventq = SplitQueue::new(ram, KEYBOARD_BASE + EVENTQ_AT, QUEUE).unwrap();
    rig.keyboard.statusq = SplitQueue::new(ram, KEYBOARD_BASE + STATUSQ_AT, QUEUE).unwrap();
    rig.keyboard.posted = 0;
    rig.keyboard.activate();
    rig.keyboard.post(&rig.ram, 2);
    c.key(u32::from(b'x'), false).unwrap();
    assert_eq!(rig.keyboard.events(&rig.ram, 2), vec![(EV_KEY, 45, 0), SYN]);
}

#[test]
fn keys_and_buttons_a_client_holds_are_released_when_it_disconnects() {
    let Some(mut rig) = Rig::activated() else {
        return;
    };
    rig.keyboard.post(&rig.ram, 16);
    rig.tablet.post(&rig.ram, 16);
    let mut first = rig.connect();
    let mut second = rig.connect();
    first.key(u32::from(b'a'), true).unwrap();
    first.key(u32::from(b'b'), true).unwrap();
    first.pointer(1, 0, 0).unwrap();
    assert_eq!(
        rig.keyboard.events(&rig.ram, 4),
        vec![(EV_KEY, 30, 1), SYN, (EV_KEY, 48, 1), SYN]
    );
    assert_eq!(
        rig.tablet.events(&rig.ram, 4),
        vec![(EV_ABS, 0, 0), (EV_ABS, 1, 0), (EV_KEY, BTN_LEFT, 1), SYN]
    );
    // The second client holds `b` too (to the guest, a repeat of the held key).
    second.key(u32::from(b'b'), true).unwrap();
    assert_eq!(rig.keyboard.events(&rig.ram, 2), vec![(EV_KEY, 48, 2), SYN]);
    drop(first);
    assert_eq!(
        rig.keyboard.events(&rig.ram, 2),
        vec![(EV_KEY, 30, 0), SYN],
        "`a` is released; `b` stays down for the second client"
    );
    assert_eq!(
        rig.tablet.events(&rig.ram, 2),
        vec![(EV_KEY, BTN_LEFT, 0), SYN]
    );
    rig.keyboard
        .assert_quiet(&rig.ram, Duration::from_millis(300));
    drop(second);
    assert_eq!(rig.keyboard.events(&rig.ram, 2), vec![(EV_KEY, 48, 0), SYN]);
    rig.tablet
        .assert_quiet(&rig.ram, Duration::from_millis(300));
}

#[test]
fn the_keyboard_offers_no_ev_rep_and_a_clients_repeated_key_down_is_an_autorepeat() {
    if skip_unless_root() {
        return;
    }
    let mut rig = Rig::start();
    assert_eq!(
        rig.keyboard.table.lookup(input_select::EV_BITS, 0x14),
        None,
        "EV_REP is not offered: the guest does not repeat keys itself"
    );
    rig.keyboard.activate();
    rig.keyboard.post(&rig.ram, 8);
    let mut c = rig.connect();
    for down in [true, true, true, false] {
        c.key(u32::from(b'a'), down).unwrap();
    }
    assert_eq!(
        rig.keyboard.events(&rig.ram, 8),
        vec![
            (EV_KEY, 30, 1),
            SYN,
            (EV_KEY, 30, 2),
            SYN,
            (EV_KEY, 30, 2),
            SYN,
            (EV_KEY, 30, 0),
            SYN
        ]
    );
}

#[test]
fn a_restarted_dev_fb_releases_every_key_and_button_on_the_drivers_rings() {
    let Some(mut rig) = Rig::activated() else {
        return;
    };
    rig.keyboard.post(&rig.ram, 16);
    rig.tablet.post(&rig.ram, 8);
    let mut c = rig.connect();
    c.key(u32::from(b'a'), true).unwrap();
    c.pointer(4, 5, 5).unwrap();
    assert_eq!(rig.keyboard.events(&rig.ram, 2), vec![(EV_KEY, 30, 1), SYN]);
    assert_eq!(rig.tablet.events(&rig.ram, 4).len(), 4);
    // dev-fb dies (SIGKILL, the client still connected) with `a` and the right button down;
    // the supervisor starts another, which the runner gives the same queues.
    rig.restart();
    drop(c);
    rig.keyboard.activate();
    rig.tablet.activate();
    assert!(rig.wait_log("releasing every key and button"));
    assert_eq!(
        rig.tablet.events(&rig.ram, 4),
        vec![
            (EV_KEY, BTN_LEFT, 0),
            (EV_KEY, BTN_LEFT + 1, 0),
            (EV_KEY, BTN_LEFT + 2, 0),
            SYN
        ]
    );
    // The keyboard's report is longer than the 14 buffers still posted: give more.
    let mut got = Vec::new();
    while got.last() != Some(&SYN) {
        let used = rig
            .keyboard
            .eventq
            .wait_some(&rig.ram, WAIT)
            .expect("release events");
        got.extend(rig.keyboard.decode(&rig.ram, &used));
        if got.last() != Some(&SYN) {
            rig.keyboard.post(&rig.ram, 16);
        }
    }
    assert!(got.len() > 100, "every key: {} events", got.len());
    assert!(got.contains(&(EV_KEY, 30, 0)), "`a` is released");
    assert!(
        got[..got.len() - 1]
            .iter()
            .all(|&(kind, _, value)| kind == EV_KEY && value == 0),
        "releases only, in one report"
    );
    // And the new process serves VNC input as usual.
    rig.keyboard.post(&rig.ram, 2);
    let mut c = rig.connect();
    c.key(u32::from(b'a'), true).unwrap();
    assert_eq!(rig.keyboard.events(&rig.ram, 2), vec![(EV_KEY, 30, 1), SYN]);
}

#[test]
fn a_runner_slow_to_say_hello_delays_vnc_by_seconds_only_and_its_device_starts_later() {
    if skip_unless_root() {
        return;
    }
    let ram = GuestRam::new(RAM).expect("guest RAM");
    let started = Instant::now();
    let l = launch(&ram);
    // The keyboard's runner end stays open and silent for now; the tablet's answers.
    let mut tablet = Driver::connect(l.tablet, &ram, TABLET_BASE);
    let mut rig = Rig {
        running: Some(l.running),
        addr: l.addr,
        keyboard: Driver {
            runner: l.keyboard,
            table: ConfigTable::default(),
            eventq: SplitQueue::new(&ram, KEYBOARD_BASE + EVENTQ_AT, QUEUE).unwrap(),
            statusq: SplitQueue::new(&ram, KEYBOARD_BASE + STATUSQ_AT, QUEUE).unwrap(),
            base: KEYBOARD_BASE,
            posted: 0,
        },
        tablet: {
            tablet.activate();
            tablet.post(&ram, 4);
            tablet
        },
        ram,
        log: l.log,
        fb: l.fb,
    };
    assert!(
        rig.wait_log("serving VNC without this device"),
        "log:\n{}",
        rig.log_text()
    );
    assert!(rig.log_text().contains("capvm keyboard"));
    let mut c = rig.connect();
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "VNC served {:?} after the start",
        started.elapsed()
    );
    c.pointer(0, 0, 0).unwrap();
    assert_eq!(
        rig.tablet.events(&rig.ram, 3),
        vec![(EV_ABS, 0, 0), (EV_ABS, 1, 0), SYN]
    );
    c.key(u32::from(b'a'), true).unwrap();
    assert!(rig.wait_log("Key { code: 30, down: true }"));
    assert!(
        rig.alive(),
        "a key for the keyboard not yet there is dropped"
    );
    // The runner gets to the keyboard late: it is introduced then and works.
    rig.keyboard.table = Driver::introduce(&rig.keyboard.runner);
    assert_eq!(rig.keyboard.name(), "capvm keyboard");
    rig.keyboard.activate();
    rig.keyboard.post(&rig.ram, 2);
    c.key(u32::from(b'b'), true).unwrap();
    let got = rig.keyboard.events(&rig.ram, 2);
    assert_eq!(got, vec![(EV_KEY, 48, 1), SYN], "log:\n{}", rig.log_text());
}
