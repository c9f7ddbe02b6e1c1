use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use proto::channel::Channel;
use proto::display::ToDisplay;

use super::window::DisplayWindow;
use super::*;
use crate::layout::{DISPLAY_FRAMEBUFFER_START, DISPLAY_REGISTERS_START, ECAM_START};

const FB: u64 = 16 << 20;
const FB_AT: u64 = 0xd000_0000;
const REGS_AT: u64 = 0xcfff_f000;

/// Records every placement of the framebuffer; refuses addresses in `fail`.
#[derive(Debug, Default)]
struct SlotLog {
    history: Vec<Option<u64>>,
    placed: Option<u64>,
}

struct FakeSlot {
    size: u64,
    log: Arc<Mutex<SlotLog>>,
}

impl FramebufferSlot for FakeSlot {
    fn size(&self) -> u64 {
        self.size
    }

    fn place(&mut self, at: Option<u64>) -> Result<(), SlotError> {
        let mut log = self.log.lock().unwrap();
        log.history.push(at);
        log.placed = at;
        Ok(())
    }

    fn placed(&self) -> Option<u64> {
        self.log.lock().unwrap().placed
    }
}

/// Busy ranges of the rest of the machine.
struct FakeAddresses(Vec<(u64, u64)>);

impl AddressMap for FakeAddresses {
    fn is_free(&self, start: u64, len: u64) -> bool {
        !self.0.iter().any(|&(b, l)| overlaps(start, len, b, l))
    }
}

#[derive(Debug, Default)]
struct RecordingSink(Mutex<Vec<Option<Mode>>>);

impl ModeSink for RecordingSink {
    fn mode_changed(&self, mode: Option<Mode>) {
        self.0.lock().unwrap().push(mode);
    }
}

impl RecordingSink {
    fn take(&self) -> Vec<Option<Mode>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// What the window hands on: records the addresses it was given.
#[derive(Debug, Default)]
struct Behind(Vec<u64>);

impl MmioDevice for Behind {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        self.0.push(addr);
        data.fill(0x5a);
    }
    fn write(&mut self, addr: u64, _data: &[u8]) {
        self.0.push(addr);
    }
}

fn le(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b))
}

fn config() -> DisplayConfig {
    DisplayConfig::with_framebuffer(FB)
}

struct Rig {
    display: Arc<Mutex<BochsDisplay>>,
    function: Box<dyn PciFunction>,
    window: DisplayWindow,
    behind: Arc<Mutex<Behind>>,
    sink: Arc<RecordingSink>,
    slot: Arc<Mutex<SlotLog>>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(&config(), vec![(0, 0x8000_0000)])
    }

    fn with(config: &DisplayConfig, busy: Vec<(u64, u64)>) -> Rig {
        let slot = Arc::new(Mutex::new(SlotLog::default()));
        let sink = Arc::new(RecordingSink::default());
        let display = BochsDisplay::new(
            config,
            Placement {
                framebuffer: FB_AT,
                registers: REGS_AT,
            },
            Box::new(FakeSlot {
                size: config.framebuffer_bytes,
                log: slot.clone(),
            }),
            Box::new(FakeAddresses(busy)),
            sink.clone(),
        )
        .unwrap();
        let display = Arc::new(Mutex::new(display));
        let behind = Arc::new(Mutex::new(Behind::default()));
        let next: Arc<Mutex<dyn MmioDevice>> = behind.clone();
        Rig {
            function: BochsDisplay::pci_function(&display),
            window: DisplayWindow::new(&display, Some(next)),
            display,
            behind,
            sink,
            slot,
        }
    }

    fn regs(&self) -> u64 {
        self.display.lock().unwrap().registers_at().unwrap()
    }

    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut buf = vec![0u8; len];
        let at = self.regs() + offset;
        self.window.read(at, &mut buf);
        le(&buf)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        let bytes = value.to_le_bytes();
        let at = self.regs() + offset;
        self.window.write(at, &bytes[..len]);
    }

    fn dispi(&mut self, index: u16, value: u16) {
        self.write(0x500 + 2 * u64::from(index), 2, u64::from(value));
    }

    fn dispi_read(&mut self, index: u16) -> u16 {
        u16::try_from(self.read(0x500 + 2 * u64::from(index), 2)).unwrap()
    }

    /// Linux's `bochs_hw_setmode` writes for `width`x`height` at `bpp`.
    fn setmode(&mut self, bpp: u16, width: u16, height: u16, virt_width: u16) {
        let stride = u64::from(virt_width) * u64::from(bpp / 8).max(1);
        let virt_height = u16::try_from((FB / stride.max(1)).min(0xffff)).unwrap();
        for (i, v) in [
            (dispi::INDEX_ENABLE, 0),
            (dispi::INDEX_BPP, bpp),
            (dispi::INDEX_XRES, width),
            (dispi::INDEX_YRES, height),
            (dispi::INDEX_BANK, 0),
            (dispi::INDEX_VIRT_WIDTH, virt_width),
            (dispi::INDEX_VIRT_HEIGHT, virt_height),
            (dispi::INDEX_X_OFFSET, 0),
            (dispi::INDEX_Y_OFFSET, 0),
            (dispi::INDEX_ENABLE, dispi::ENABLED | dispi::LFB_ENABLED),
        ] {
            self.dispi(i, v);
        }
    }

    fn placed(&self) -> Option<u64> {
        self.slot.lock().unwrap().placed
    }
}

#[test]
fn config_space_identifies_a_bochs_display_with_its_two_bars() {
    let mut rig = Rig::new();
    let f = &mut rig.function;
    assert_eq!(f.read_config(0x00), 0x1111_1234);
    assert_eq!(
        f.read_config(0x08),
        0x0380_0002,
        "class 0x038000, revision 2"
    );
    assert_eq!(f.read_config(0x2c), 0x1100_1af4);
    assert_eq!(f.read_config(0x04) & 0x2, 0x2, "memory decoding on");
    assert_eq!(
        f.read_config(0x10),
        0xd000_0008,
        "BAR0 prefetchable 32-bit memory"
    );
    assert_eq!(f.read_config(0x14), 0, "BAR1 unused");
    assert_eq!(f.read_config(0x18), 0xcfff_f000, "BAR2 32-bit memory");
    assert_eq!(f.read_config(0x3c) >> 8 & 0xff, 0, "no interrupt pin");
    // Sizing (decoding off first, as Linux does).
    f.write_config(0x04, 0, 0x3);
    f.write_config(0x10, u32::MAX, 0xf);
    f.write_config(0x18, u32::MAX, 0xf);
    assert_eq!(f.read_config(0x10), 0xff00_0008);
    assert_eq!(f.read_config(0x18), 0xffff_f000);
}

#[test]
fn linux_probe_reads_id_memory_size_extended_registers_and_edid() {
    let mut rig = Rig::new();
    assert_eq!(rig.dispi_read(dispi::INDEX_ID), 0xb0c5);
    assert_eq!(rig.dispi_read(dispi::INDEX_VIDEO_MEMORY_64K), 256);
    assert_eq!(rig.read(0x600, 4), 8, "extended registers' size");
    assert_eq!(rig.read(0x604, 4), 0x1e1e_1e1e, "little endian");
    let edid: Vec<u8> = (0..128)
        .map(|i| u8::try_from(rig.read(i, 1)).unwrap())
        .collect();
    assert_eq!(edid[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert_eq!(edid.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
    // The preferred timing is the configured 1024x768.
    assert_eq!(u32::from(edid[56]) | (u32::from(edid[58] >> 4) << 8), 1024);
    assert_eq!(u32::from(edid[59]) | (u32::from(edid[61] >> 4) << 8), 768);
    assert_eq!(rig.read(0x80, 8), 0, "past the block, up to 0x400, zeros");
    assert_eq!(
        rig.read(0x41a, 1),
        0,
        "VGA input status read by bochs_hw_blank"
    );
    assert_eq!(rig.read(0x700, 4), 0xffff_ffff);
}

#[test]
fn a_linux_mode_set_sends_one_mode_and_a_page_flip_sends_its_offset() {
    let mut rig = Rig::new();
    rig.setmode(32, 1024, 768, 1024);
    assert_eq!(rig.sink.take(), vec![Some(Mode::packed(1024, 768, 32))]);
    assert_eq!(rig.dispi_read(dispi::INDEX_ENABLE), 0x41);
    // bochs_hw_setbase for a buffer at byte 3 MiB: vx 0, vy 768.
    rig.dispi(dispi::INDEX_VIRT_WIDTH, 1024);
    rig.dispi(dispi::INDEX_X_OFFSET, 0);
    rig.dispi(dispi::INDEX_Y_OFFSET, 768);
    let mut flipped = Mode::packed(1024, 768, 32);
    flipped.offset = 768 * 4096;
    assert_eq!(rig.sink.take(), vec![Some(flipped)]);
    assert_eq!(rig.display.lock().unwrap().mode(), Some(flipped));
    // A 16 bpp mode is served too.
    rig.setmode(16, 800, 600, 800);
    assert_eq!(
        rig.sink.take(),
        vec![None, Some(Mode::packed(800, 600, 16))]
    );
}

#[test]
fn hostile_modes_send_nothing_and_leave_enable_clear() {
    let cases: [(u16, u16, u16, u16); 9] = [
        (24, 640, 480, 640),
        (8, 640, 480, 640),
        (4, 640, 480, 640),
        (32, 0xffff, 480, 0xffff),
        (32, 640, 0xffff, 640),
        (32, 1921, 1200, 1921),
        (32, 0, 480, 640),
        (32, 640, 480, 639),
        // The widest virtual width at the tallest height: 262140 * 1200 > 16 MiB.
        (32, 1920, 1200, 0xffff),
    ];
    for (bpp, w, h, vw) in cases {
        let mut rig = Rig::new();
        rig.setmode(bpp, w, h, vw);
        assert_eq!(rig.sink.take(), vec![], "{bpp} {w}x{h} virt {vw}");
        assert_eq!(rig.dispi_read(dispi::INDEX_ENABLE) & dispi::ENABLED, 0);
        assert_eq!(rig.display.lock().unwrap().mode(), None);
    }
}

#[test]
fn offsets_past_the_end_keep_the_previous_mode() {
    let mut rig = Rig::new();
    rig.setmode(32, 1920, 1200, 1920);
    rig.sink.take();
    // 16 MiB / 7680 = 2184.5 rows; the last visible row must end inside.
    rig.dispi(dispi::INDEX_Y_OFFSET, 2184 - 1199);
    rig.dispi(dispi::INDEX_Y_OFFSET, 2184 - 1200);
    rig.dispi(dispi::INDEX_X_OFFSET, 0xffff);
    rig.dispi(dispi::INDEX_Y_OFFSET, 0xffff);
    let sent = rig.sink.take();
    assert_eq!(sent.len(), 1, "only the offset that fits: {sent:?}");
    let Some(Some(m)) = sent.first().copied() else {
        panic!("no mode");
    };
    assert_eq!(m.offset, (2184 - 1200) * 7680);
    assert_eq!(m.validate(FB), Ok(()));
    assert_eq!(rig.display.lock().unwrap().mode(), Some(m));
}

#[test]
fn disabling_sends_no_mode() {
    let mut rig = Rig::new();
    rig.setmode(32, 640, 480, 640);
    rig.dispi(dispi::INDEX_ENABLE, 0);
    assert_eq!(
        rig.sink.take(),
        vec![Some(Mode::packed(640, 480, 32)), None]
    );
}

#[test]
fn big_endian_is_refused_and_the_byte_order_reads_little() {
    let mut rig = Rig::new();
    rig.write(0x604, 4, 0xbebe_bebe);
    assert_eq!(rig.read(0x604, 4), 0x1e1e_1e1e);
    rig.write(0x600, 4, 0);
    assert_eq!(rig.read(0x600, 4), 8);
}

#[test]
fn byte_and_dword_writes_merge_into_the_registers() {
    let mut rig = Rig::new();
    // XRES and YRES in one dword store.
    rig.write(0x502, 4, (0x1e0 << 16) | 0x280);
    assert_eq!(rig.dispi_read(dispi::INDEX_XRES), 640);
    assert_eq!(rig.dispi_read(dispi::INDEX_YRES), 480);
    // The high byte of XRES alone: 640 = 0x280 -> 0x380.
    rig.write(0x503, 1, 0x03);
    assert_eq!(rig.dispi_read(dispi::INDEX_XRES), 0x380);
    assert_eq!(rig.read(0x502, 1), 0x80);
    // An 8-byte store spanning ENABLE..VIRT_WIDTH, and one running off the last register.
    rig.write(0x50a, 8, 0x0001_0002_0003_0004);
    assert_eq!(rig.dispi_read(dispi::INDEX_BANK), 4);
    assert_eq!(rig.dispi_read(dispi::INDEX_VIRT_HEIGHT), 2);
    assert_eq!(rig.dispi_read(dispi::INDEX_X_OFFSET), 1);
    assert_eq!(rig.dispi_read(dispi::INDEX_Y_OFFSET), 0);
    rig.write(0x514, 4, u64::MAX);
    assert_eq!(rig.dispi_read(dispi::INDEX_VIDEO_MEMORY_64K), 256);
    assert_eq!(rig.read(0x516, 2), 0xffff);
}

#[test]
fn decoding_off_unmaps_the_framebuffer_and_hides_the_registers() {
    let mut rig = Rig::new();
    assert_eq!(rig.placed(), Some(FB_AT));
    rig.function.write_config(0x04, 0, 0x3);
    assert_eq!(rig.placed(), None);
    assert_eq!(rig.display.lock().unwrap().registers_at(), None);
    let mut buf = [0u8; 2];
    rig.window.read(REGS_AT + 0x500, &mut buf);
    assert_eq!(buf, [0x5a, 0x5a], "the access went to the window behind");
    rig.function.write_config(0x04, 0x2, 0x3);
    assert_eq!(rig.placed(), Some(FB_AT));
    assert_eq!(rig.dispi_read(dispi::INDEX_ID), 0xb0c5);
    assert_eq!(
        rig.slot.lock().unwrap().history,
        vec![Some(FB_AT), None, Some(FB_AT)]
    );
}

#[test]
fn moving_the_bars_moves_the_slot_and_the_registers() {
    let mut rig = Rig::new();
    rig.function.write_config(0x10, 0xc100_0000, 0xf);
    assert_eq!(rig.placed(), Some(0xc100_0000));
    rig.function.write_config(0x18, 0xc000_8000, 0xf);
    assert_eq!(rig.regs(), 0xc000_8000);
    assert_eq!(rig.dispi_read(dispi::INDEX_ID), 0xb0c5);
    let mut buf = [0u8; 2];
    rig.window.write(REGS_AT + 0x500, &buf);
    rig.window.read(REGS_AT + 0x500, &mut buf);
    assert_eq!(rig.behind.lock().unwrap().0, vec![REGS_AT + 0x500; 2]);
}

#[test]
fn a_framebuffer_bar_over_ram_another_device_or_its_registers_stays_unmapped() {
    // RAM below 2 GiB and a virtio BAR at 0xc000_0000.
    let mut rig = Rig::with(&config(), vec![(0, 0x8000_0000), (0xc000_0000, 0x4000)]);
    for bad in [0x1000_0000u32, 0xc000_0000, 0xcf00_0000] {
        rig.function.write_config(0x10, bad, 0xf);
        assert_eq!(rig.placed(), None, "{bad:#x}");
    }
    rig.function.write_config(0x10, 0xc200_0000, 0xf);
    assert_eq!(rig.placed(), Some(0xc200_0000));
    // The registers moved onto the framebuffer: the framebuffer gives way.
    rig.function.write_config(0x18, 0xc200_1000, 0xf);
    assert_eq!(rig.placed(), None);
    assert_eq!(rig.regs(), 0xc200_1000);
}

#[test]
fn construction_refuses_bad_configs_and_placements() {
    let sink: Arc<dyn ModeSink> = Arc::new(RecordingSink::default());
    let make = |config: &DisplayConfig, slot_size: u64, placement: Placement| {
        BochsDisplay::new(
            config,
            placement,
            Box::new(FakeSlot {
                size: slot_size,
                log: Arc::default(),
            }),
            Box::new(FakeAddresses(vec![])),
            sink.clone(),
        )
    };
    let good = Placement {
        framebuffer: FB_AT,
        registers: REGS_AT,
    };
    let mut c = config();
    c.framebuffer_bytes = 3 << 20;
    assert!(matches!(
        make(&c, 3 << 20, good),
        Err(DisplayError::Config(ConfigError::FramebufferSize(_)))
    ));
    c.framebuffer_bytes = 512 << 20;
    assert!(make(&c, 512 << 20, good).is_err());
    let mut c = config();
    c.width = 4096;
    c.max_width = 4096;
    assert!(matches!(
        make(&c, FB, good),
        Err(DisplayError::Config(ConfigError::Preferred { .. }))
    ));
    let mut c = config();
    c.max_height = 0;
    assert!(make(&c, FB, good).is_err());
    assert!(matches!(
        make(&config(), FB / 2, good),
        Err(DisplayError::FramebufferSize { .. })
    ));
    for (framebuffer, registers) in [
        (FB_AT + 0x1000, REGS_AT),
        (FB_AT, REGS_AT + 1),
        (FB_AT, FB_AT + 0x1000),
        (0, REGS_AT),
        (0xff00_0000, 0x1_0000_0000),
    ] {
        assert!(
            matches!(
                make(
                    &config(),
                    FB,
                    Placement {
                        framebuffer,
                        registers
                    }
                ),
                Err(DisplayError::Placement { .. })
            ),
            "{framebuffer:#x} {registers:#x}"
        );
    }
    assert!(make(&config(), FB, good).is_ok());
}

#[test]
fn the_display_placement_is_aligned_for_every_size_and_clear_of_virtio_bars() {
    let mut size = MIN_FRAMEBUFFER_BYTES;
    while size <= MAX_FRAMEBUFFER_BYTES {
        assert!(DISPLAY_FRAMEBUFFER_START.is_multiple_of(size));
        assert!(DISPLAY_FRAMEBUFFER_START + size <= ECAM_START);
        size *= 2;
    }
    assert!(DISPLAY_REGISTERS_START.is_multiple_of(REGS_BAR_SIZE));
    const { assert!(DISPLAY_REGISTERS_START + REGS_BAR_SIZE <= DISPLAY_FRAMEBUFFER_START) };
    for n in 0..32 {
        if let Some(bar) = crate::virtio_pci::bar_address(n) {
            assert!(bar + crate::virtio_pci::BAR_SIZE <= DISPLAY_REGISTERS_START);
        }
    }
}

/// A small deterministic generator (xorshift) for the hostile-access test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn any_access_of_any_width_is_survived_and_every_mode_sent_fits() {
    let mut rig = Rig::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let values = [
        0u64, 1, 16, 32, 24, 0x41, 480, 640, 768, 1024, 1200, 1920, 2000, 0x7fff, 0xffff,
    ];
    let pick = |r: u64| values[usize::try_from(r % 15).unwrap()];
    for _ in 0..200_000 {
        let r = rng.next();
        let random = rng.next();
        let (offset, len, value, write) = match r % 8 {
            // Mostly well-formed register writes with values near the edges...
            0..=4 => (0x500 + 2 * ((r >> 8) % 11), 2, pick(r >> 16), true),
            // ...then anything anywhere in BAR2 and around the DISPI registers.
            5 => ((r >> 8) % 0x1010, 1 << ((r >> 20) % 4), random, true),
            6 => ((r >> 8) % 0x1010, 1 << ((r >> 20) % 4), 0, false),
            _ => (0x4f8 + (r >> 8) % 0x28, 1 << ((r >> 20) % 4), random, true),
        };
        let at = REGS_AT + offset;
        let len = usize::try_from(len).unwrap();
        if write {
            rig.window.write(at, &value.to_le_bytes()[..len]);
        } else {
            let mut buf = vec![0u8; len];
            rig.window.read(at, &mut buf);
        }
    }
    let sent = rig.sink.take();
    assert!(
        sent.iter().flatten().count() > 10,
        "the generator never produced a mode: {}",
        sent.len()
    );
    for mode in sent.iter().flatten() {
        assert_eq!(mode.validate(FB), Ok(()), "{mode:?}");
        assert!(mode.width <= 1920 && mode.height <= 1200, "{mode:?}");
    }
    // Config space: any register, any value.
    for _ in 0..20_000 {
        let r = rng.next();
        let reg = u16::try_from((r % 0x40) & !3).unwrap();
        rig.function
            .write_config(reg, u32::try_from(rng.next() >> 32).unwrap(), 0xf);
        let _ = rig.function.read_config(reg);
    }
}

// --- Through KVM ------------------------------------------------------------------------

/// Real-mode guest at 0x1000: two pixels into the framebuffer at 0x20000, a mode through the
/// DISPI registers at 0x30000 and a read of the ID, then (after the host moved BAR0 to
/// 0x40000) a pixel there, and one more after the host switched decoding off.
const GUEST_CODE: &[u8] = &[
    0xb8, 0x00, 0x20, // mov ax, 0x2000
    0x8e, 0xd8, // mov ds, ax
    0x66, 0xc7, 0x06, 0x00, 0x00, 0x00, 0x00, 0xff, 0x00, // mov dword [0], 0x00ff0000
    0x66, 0xc7, 0x06, 0xfc, 0xff, 0x00, 0xff, 0x00, 0x00, // mov dword [0xfffc], 0x0000ff00
    0xe6, 0x10, // out 0x10, al
    0xb8, 0x00, 0x30, // mov ax, 0x3000
    0x8e, 0xd8, // mov ds, ax
    0xc7, 0x06, 0x06, 0x05, 0x20, 0x00, // mov word [0x506], 32      BPP
    0xc7, 0x06, 0x02, 0x05, 0x40, 0x00, // mov word [0x502], 64      XRES
    0xc7, 0x06, 0x04, 0x05, 0x30, 0x00, // mov word [0x504], 48      YRES
    0xc7, 0x06, 0x0c, 0x05, 0x40, 0x00, // mov word [0x50c], 64      VIRT_WIDTH
    0xc7, 0x06, 0x08, 0x05, 0x41, 0x00, // mov word [0x508], 0x41    ENABLE
    0xa1, 0x00, 0x05, // mov ax, [0x500]                              ID
    0xe6, 0x11, // out 0x11, al
    0xb8, 0x00, 0x40, // mov ax, 0x4000
    0x8e, 0xd8, // mov ds, ax
    0x66, 0xc7, 0x06, 0x10, 0x00, 0x44, 0x33, 0x22, 0x11, // mov dword [0x10], 0x11223344
    0xe6, 0x12, // out 0x12, al
    0x66, 0xc7, 0x06, 0x20, 0x00, 0x88, 0x77, 0x66, 0x55, // mov dword [0x20], 0x55667788
    0xe6, 0x13, // out 0x13, al
    0xf4, // hlt
];

/// A file of `len` zero bytes, unlinked at once (a memfd stand-in).
fn framebuffer_file(len: u64) -> File {
    let path = std::env::temp_dir().join(format!(
        "vcpu-runner-fb-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(len).unwrap();
    file
}

fn read_at(file: &File, offset: u64) -> [u8; 4] {
    let mut buf = [0u8; 4];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// A VM with 64 KiB of RAM holding [`GUEST_CODE`] and one vCPU in real mode about to run it,
/// or `None` (printed) where `/dev/kvm` is missing.
fn real_mode_vm() -> Option<(
    Arc<kvm_ioctls::VmFd>,
    vm_memory::GuestMemoryMmap<()>,
    kvm_ioctls::VcpuFd,
)> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("skipping: /dev/kvm unavailable: {e}");
            return None;
        }
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    memory
        .write_slice(GUEST_CODE, GuestAddress(0x1000))
        .unwrap();
    let host_addr = memory.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x1_0000,
        userspace_addr: host_addr as u64,
    };
    // SAFETY: the region is a live 64 KiB mapping owned by `memory`, which the caller keeps
    // until its vCPU is dropped: no guest code touches the slot after the mapping is gone.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).unwrap();
    Some((vm, memory, vcpu))
}

#[test]
fn through_kvm_pixels_land_in_the_memfd_without_exits_and_dispi_writes_send_a_mode() {
    use kvm_ioctls::VcpuExit;

    let Some((vm, _memory, mut vcpu)) = real_mode_vm() else {
        return;
    };
    let fb_size = 0x1_0000;
    let file = framebuffer_file(fb_size);
    let slot =
        kvm_slot::KvmFramebuffer::new(vm.clone(), 1, file.try_clone().unwrap(), fb_size).unwrap();
    let (ours, theirs) = Channel::pair().unwrap();
    let sink = sender::ChannelSink::spawn(ours).unwrap();
    let config = DisplayConfig {
        width: 64,
        height: 48,
        max_width: 320,
        max_height: 200,
        framebuffer_bytes: fb_size,
    };
    let display = BochsDisplay::new(
        &config,
        Placement {
            framebuffer: 0x2_0000,
            registers: 0x3_0000,
        },
        Box::new(slot),
        Box::new(FakeAddresses(vec![(0, 0x1_0000)])),
        sink,
    )
    .unwrap();
    let display = Arc::new(Mutex::new(display));
    let mut function = BochsDisplay::pci_function(&display);
    let mut window = DisplayWindow::new(&display, None);

    let mut mmio_writes = Vec::new();
    let mut outs = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::MmioWrite(addr, data) => {
                mmio_writes.push(addr);
                window.write(addr, data);
            }
            VcpuExit::MmioRead(addr, data) => window.read(addr, data),
            VcpuExit::IoOut(port, _) => {
                outs.push(port);
                match port {
                    0x10 => {
                        assert_eq!(mmio_writes, Vec::<u64>::new(), "pixel stores exited");
                        assert_eq!(read_at(&file, 0), [0x00, 0x00, 0xff, 0x00]);
                        assert_eq!(read_at(&file, 0xfffc), [0x00, 0xff, 0x00, 0x00]);
                    }
                    0x11 => {
                        assert_eq!(
                            mmio_writes,
                            vec![0x30506, 0x30502, 0x30504, 0x3050c, 0x30508]
                        );
                        let ax = vcpu.get_regs().unwrap().rax & 0xffff;
                        assert_eq!(ax, 0xb0c5, "the DISPI ID read through BAR2");
                        let got = theirs
                            .recv_timeout::<ToDisplay>(Duration::from_secs(5))
                            .unwrap()
                            .msg;
                        assert_eq!(got, ToDisplay::SetMode(Mode::packed(64, 48, 32)));
                        // The guest moves BAR0 (as its PCI code would, through config space).
                        function.write_config(0x10, 0x4_0000, 0xf);
                        assert_eq!(display.lock().unwrap().framebuffer_at(), Some(0x4_0000));
                        mmio_writes.clear();
                    }
                    0x12 => {
                        assert_eq!(
                            mmio_writes,
                            Vec::<u64>::new(),
                            "a store to the moved BAR exited"
                        );
                        assert_eq!(read_at(&file, 0x10), [0x44, 0x33, 0x22, 0x11]);
                        // Memory decoding off: the framebuffer leaves the guest's map.
                        function.write_config(0x04, 0, 0x3);
                        assert_eq!(display.lock().unwrap().framebuffer_at(), None);
                    }
                    0x13 => {
                        assert_eq!(mmio_writes, vec![0x4_0020], "the store exited instead");
                        assert_eq!(read_at(&file, 0x20), [0; 4]);
                    }
                    _ => panic!("unexpected port {port:#x}"),
                }
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(outs, vec![0x10, 0x11, 0x12, 0x13]);
    drop(vcpu);
}
