//! The transport driven like Linux's `virtio_pci_modern` driver drives it, through the PCI
//! root (ECAM) and BAR0 MMIO, with a fake host recording KVM registrations and a fake device
//! channel recording (and validating) every message. Hostile sequences check that nothing
//! panics and nothing invalid reaches the device or KVM.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::channel::{Channel, ChannelError, ChannelKind};
use proto::device::{
    ConfigEntry, ConfigTable, DeviceInfo, FromDevice, INPUT_CONFIG_BYTES, ToDevice, input_select,
};
use proto::runner::GuestExit;
use vmm_sys_util::eventfd::EventFd;

use super::common::{F_VERSION_1, NO_VECTOR, STATUS_NEEDS_RESET};
use super::registrations::peek;
use super::window::BarWindow;
use super::*;
use crate::devices::pci::PciRoot;
use crate::devices::{MmioDevice, Platform};

const BAR: u64 = 0xc000_4000;
const SLOT: u64 = 3;
const F_EVENT_IDX: u64 = 1 << 29;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const F_BLK_FLUSH: u64 = 1 << 9;

/// Common configuration offsets.
const DFSELECT: u64 = 0x00;
const DF: u64 = 0x04;
const GFSELECT: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const GENERATION: u64 = 0x15;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_MSIX: u64 = 0x1a;
const Q_ENABLE: u64 = 0x1c;
const Q_NOTIFY_OFF: u64 = 0x1e;
const Q_DESC: u64 = 0x20;
const Q_DRIVER: u64 = 0x28;
const Q_DEVICE: u64 = 0x30;

// ---- fakes ----

#[derive(Debug, Default)]
struct HostState {
    ioeventfds: Vec<(u64, RawFd)>,
    irqfds: Vec<(RawFd, u32)>,
    routes: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
    /// Misuse: a duplicate registration or removing what is not registered.
    errors: Vec<String>,
    refuse_ioeventfds: bool,
}

#[derive(Debug, Default)]
struct FakeHost(Mutex<HostState>);

fn refused(op: &'static str) -> HostError {
    HostError::Kvm {
        op,
        source: kvm_ioctls::Error::new(libc::EEXIST),
    }
}

impl FakeHost {
    fn state(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.0.lock().unwrap()
    }
}

impl VirtioHost for FakeHost {
    fn register_ioeventfd(&self, addr: u64, fd: &EventFd) -> Result<(), HostError> {
        let mut s = self.state();
        if s.refuse_ioeventfds {
            return Err(refused("KVM_IOEVENTFD"));
        }
        if s.ioeventfds.iter().any(|&(a, _)| a == addr) {
            s.errors.push(format!("ioeventfd at {addr:#x} twice"));
            return Err(refused("KVM_IOEVENTFD"));
        }
        s.ioeventfds.push((addr, fd.as_raw_fd()));
        Ok(())
    }

    fn unregister_ioeventfd(&self, addr: u64, fd: &EventFd) -> Result<(), HostError> {
        let mut s = self.state();
        let entry = (addr, fd.as_raw_fd());
        if let Some(i) = s.ioeventfds.iter().position(|&e| e == entry) {
            s.ioeventfds.remove(i);
            Ok(())
        } else {
            s.errors
                .push(format!("removing unknown ioeventfd {entry:?}"));
            Err(refused("KVM_IOEVENTFD"))
        }
    }

    fn alloc_gsi(&self) -> Result<u32, HostError> {
        let mut s = self.state();
        let gsi = 24 + s.next_gsi;
        s.next_gsi += 1;
        Ok(gsi)
    }

    fn set_msi_route(&self, gsi: u32, message: MsiMessage) -> Result<(), HostError> {
        self.state().routes.insert(gsi, message);
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HostError> {
        let mut s = self.state();
        let raw = fd.as_raw_fd();
        if s.irqfds.iter().any(|&(f, _)| f == raw) {
            s.errors.push(format!("irqfd {raw} twice"));
            return Err(refused("KVM_IRQFD"));
        }
        if !s.routes.contains_key(&gsi) {
            s.errors.push(format!("irqfd on unrouted GSI {gsi}"));
        }
        s.irqfds.push((raw, gsi));
        Ok(())
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HostError> {
        let mut s = self.state();
        let entry = (fd.as_raw_fd(), gsi);
        if let Some(i) = s.irqfds.iter().position(|&e| e == entry) {
            s.irqfds.remove(i);
            Ok(())
        } else {
            s.errors.push(format!("removing unknown irqfd {entry:?}"));
            Err(refused("KVM_IRQFD"))
        }
    }
}

/// Records every message with the raw numbers of its fds; checks each against `info`.
#[derive(Debug)]
struct FakeDevice {
    info: DeviceInfo,
    sent: Mutex<Vec<(ToDevice, Vec<RawFd>)>>,
    errors: Mutex<Vec<String>>,
    closed: AtomicBool,
}

impl FakeDevice {
    fn new(info: DeviceInfo) -> Arc<FakeDevice> {
        Arc::new(FakeDevice {
            info,
            sent: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        })
    }

    fn sent(&self) -> Vec<(ToDevice, Vec<RawFd>)> {
        self.sent.lock().unwrap().clone()
    }

    fn take(&self) -> Vec<(ToDevice, Vec<RawFd>)> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

impl DeviceSender for FakeDevice {
    fn send(&self, msg: &ToDevice, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(ChannelError::Closed);
        }
        if let Err(e) = msg.validate(&self.info) {
            self.errors.lock().unwrap().push(format!("{msg:?}: {e}"));
        }
        if fds.len() != msg.fd_count() {
            self.errors
                .lock()
                .unwrap()
                .push(format!("{msg:?} with {} fds", fds.len()));
        }
        let raw = fds.iter().map(AsRawFd::as_raw_fd).collect();
        self.sent.lock().unwrap().push((msg.clone(), raw));
        Ok(())
    }
}

#[derive(Debug)]
struct NoPlatform;

impl Platform for NoPlatform {
    fn set_irq(&self, _gsi: u32, _level: bool) {}
    fn request_exit(&self, _exit: GuestExit) {}
}

fn blk_info() -> DeviceInfo {
    DeviceInfo {
        device_type: 2,
        features: F_VERSION_1 | F_EVENT_IDX | F_BLK_FLUSH | F_ACCESS_PLATFORM,
        queues: 2,
        max_queue_size: 256,
        config: (0u8..60).collect(),
    }
}

// ---- a Linux-like driver ----

struct Rig {
    pci: Arc<Mutex<VirtioPci>>,
    root: PciRoot,
    host: Arc<FakeHost>,
    dev: Arc<FakeDevice>,
    bar: u64,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(blk_info())
    }

    fn with(info: DeviceInfo) -> Rig {
        let host = Arc::new(FakeHost::default());
        Rig::build(info, BAR, host.clone(), host)
    }

    /// A rig whose transport uses `real` as its host (`host` is then only a bystander).
    fn build(info: DeviceInfo, bar: u64, host: Arc<FakeHost>, real: Arc<dyn VirtioHost>) -> Rig {
        let dev = FakeDevice::new(info.clone());
        let pci = Arc::new(Mutex::new(
            VirtioPci::new(info, bar, real, dev.clone()).unwrap(),
        ));
        let mut root = PciRoot::new(Arc::new(NoPlatform));
        root.add_function(3, VirtioPci::pci_function(&pci)).unwrap();
        Rig {
            pci,
            root,
            host,
            dev,
            bar,
        }
    }

    fn cfg_read(&mut self, reg: u64, len: usize) -> u64 {
        let mut buf = vec![0u8; len];
        MmioDevice::read(&mut self.root, ECAM_START + (SLOT << 15) + reg, &mut buf);
        le(&buf)
    }

    fn cfg_write(&mut self, reg: u64, len: usize, value: u64) {
        let bytes = value.to_le_bytes();
        MmioDevice::write(
            &mut self.root,
            ECAM_START + (SLOT << 15) + reg,
            &bytes[..len],
        );
    }

    fn read(&self, offset: u64, len: usize) -> u64 {
        let mut buf = vec![0u8; len];
        self.pci.lock().unwrap().read(self.bar + offset, &mut buf);
        le(&buf)
    }

    fn write(&self, offset: u64, len: usize, value: u64) {
        let bytes = value.to_le_bytes();
        self.pci
            .lock()
            .unwrap()
            .write(self.bar + offset, &bytes[..len]);
    }

    /// The capabilities: (cap offset, cap id, `cfg_type`, offset, length, extra dword).
    fn caps(&mut self) -> Vec<(u64, u64, u64, u64, u64, u64)> {
        let mut caps = Vec::new();
        let mut at = self.cfg_read(0x34, 1);
        while at != 0 && caps.len() < 16 {
            let id = self.cfg_read(at, 1);
            let cfg_type = self.cfg_read(at + 3, 1);
            caps.push((
                at,
                id,
                cfg_type,
                self.cfg_read(at + 8, 4),
                self.cfg_read(at + 12, 4),
                self.cfg_read(at + 16, 4),
            ));
            at = self.cfg_read(at + 1, 1);
        }
        caps
    }

    fn status(&self) -> u64 {
        self.read(STATUS, 1)
    }

    /// Reset, `ACKNOWLEDGE`, `DRIVER`, features (the offer masked by `wanted`), `FEATURES_OK`.
    fn negotiate(&self, wanted: u64) -> u64 {
        self.write(STATUS, 1, 0);
        self.write(STATUS, 1, 1);
        self.write(STATUS, 1, 3);
        self.write(DFSELECT, 4, 0);
        let low = self.read(DF, 4);
        self.write(DFSELECT, 4, 1);
        let offer = low | (self.read(DF, 4) << 32);
        let features = offer & wanted;
        self.write(GFSELECT, 4, 0);
        self.write(GF, 4, features & 0xffff_ffff);
        self.write(GFSELECT, 4, 1);
        self.write(GF, 4, features >> 32);
        self.write(STATUS, 1, 0xb);
        features
    }

    /// MSI-X on with every entry programmed (vector v → APIC 0, data 0x40 + v) and unmasked.
    fn enable_msix(&mut self) {
        let cap = 0x98;
        self.cfg_write(cap + 2, 2, 0xc000);
        for v in 0..3u64 {
            let entry = 0x3800 + v * 16;
            self.write(entry, 4, 0xfee0_0000);
            self.write(entry + 4, 4, 0);
            self.write(entry + 8, 4, 0x40 + v);
            self.write(entry + 12, 4, 0);
        }
        self.cfg_write(cap + 2, 2, 0x8000);
    }

    fn setup_queue(&self, index: u16, size: u16, vector: u16, base: u64) {
        self.write(Q_SELECT, 2, u64::from(index));
        self.write(Q_SIZE, 2, u64::from(size));
        self.write(Q_MSIX, 2, u64::from(vector));
        self.write(Q_DESC, 4, base & 0xffff_ffff);
        self.write(Q_DESC + 4, 4, base >> 32);
        self.write(Q_DRIVER, 4, (base + 0x1000) & 0xffff_ffff);
        self.write(Q_DRIVER + 4, 4, (base + 0x1000) >> 32);
        self.write(Q_DEVICE, 4, (base + 0x2000) & 0xffff_ffff);
        self.write(Q_DEVICE + 4, 4, (base + 0x2000) >> 32);
        self.write(Q_ENABLE, 2, 1);
    }

    /// The whole probe: features, MSI-X, config vector 2, queues 0 and 1 on vectors 0 and 1,
    /// `DRIVER_OK`.
    fn probe(&mut self) {
        self.negotiate(F_VERSION_1 | F_EVENT_IDX | F_BLK_FLUSH);
        self.enable_msix();
        self.write(MSIX_CONFIG, 2, 2);
        self.setup_queue(0, 128, 0, 0x10_0000);
        self.setup_queue(1, 256, 1, 0x20_0000);
        self.write(STATUS, 1, 0xf);
    }

    fn gsi(&self, vector: usize) -> u32 {
        self.pci.lock().unwrap().gsis[vector]
    }

    fn call(&self, queue: usize) -> RawFd {
        self.pci.lock().unwrap().active.as_ref().unwrap().queues[queue]
            .call
            .as_raw_fd()
    }

    fn config_irq(&self) -> RawFd {
        self.pci.lock().unwrap().config_irq.as_raw_fd()
    }

    /// Nothing invalid reached the device, nothing was registered twice or removed unknown.
    fn assert_clean(&self) {
        assert_eq!(*self.dev.errors.lock().unwrap(), Vec::<String>::new());
        assert_eq!(self.host.state().errors, Vec::<String>::new());
    }
}

fn le(buf: &[u8]) -> u64 {
    buf.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b))
}

// ---- tests ----

#[test]
fn config_space_identifies_a_modern_virtio_block_device() {
    let mut rig = Rig::new();
    assert_eq!(rig.cfg_read(0, 4), 0x1042_1af4);
    assert_eq!(
        rig.cfg_read(8, 4),
        0x0180_0001,
        "class mass storage/other, rev 1"
    );
    assert_eq!(rig.cfg_read(0x2c, 4), 0x0040_1af4);
    assert_eq!(rig.cfg_read(0x06, 2) & 0x10, 0x10, "capability list");
    assert_eq!(rig.cfg_read(0x04, 2) & 0x2, 0x2, "memory decoding on");
    assert_eq!(rig.cfg_read(0x3d, 1), 0, "no INTx pin");
    assert_eq!(rig.cfg_read(0x10, 4), BAR | 0x4, "64-bit memory BAR");
    assert_eq!(rig.cfg_read(0x14, 4), 0);
}

#[test]
fn capabilities_describe_bar0s_layout() {
    let mut rig = Rig::new();
    let caps = rig.caps();
    let virtio: Vec<(u64, u64, u64)> = caps
        .iter()
        .filter(|c| c.1 == 0x09)
        .map(|c| (c.2, c.3, c.4))
        .collect();
    assert_eq!(
        virtio,
        vec![
            (1, 0, 0x38),
            (2, 0x3000, 8),
            (3, 0x1000, 1),
            (4, 0x2000, 60),
            (5, 0, 0)
        ]
    );
    let notify = caps.iter().find(|c| c.1 == 0x09 && c.2 == 2).unwrap();
    assert_eq!(notify.5, 4, "notify_off_multiplier");
    let msix = caps.iter().find(|c| c.1 == 0x11).unwrap();
    assert_eq!(rig.cfg_read(msix.0 + 2, 2), 2, "table size 3 (N-1)");
    assert_eq!(rig.cfg_read(msix.0 + 4, 4), 0x3800, "table in BAR 0");
    assert_eq!(rig.cfg_read(msix.0 + 8, 4), 0x3c00, "PBA in BAR 0");
    // Every capability's bar byte names BAR 0.
    assert!(caps.iter().filter(|c| c.1 == 0x09).all(|c| c.0 != 0));
}

#[test]
fn a_device_without_config_has_no_device_capability() {
    let mut info = blk_info();
    info.config.clear();
    let mut rig = Rig::with(info);
    let types: Vec<u64> = rig
        .caps()
        .iter()
        .filter(|c| c.1 == 0x09)
        .map(|c| c.2)
        .collect();
    assert_eq!(types, vec![1, 2, 3, 5]);
}

#[test]
fn bar_sizing_reads_the_size_and_decoding_follows_the_command_register() {
    let mut rig = Rig::new();
    rig.cfg_write(0x04, 2, 0);
    assert_eq!(rig.read(0, 4), 0xffff_ffff, "decoding off");
    rig.cfg_write(0x10, 4, 0xffff_ffff);
    rig.cfg_write(0x14, 4, 0xffff_ffff);
    assert_eq!(rig.cfg_read(0x10, 4), 0xffff_c004);
    assert_eq!(rig.cfg_read(0x14, 4), 0xffff_ffff);
    rig.cfg_write(0x10, 4, BAR);
    rig.cfg_write(0x14, 4, 0);
    rig.cfg_write(0x04, 2, 0x6);
    assert_eq!(rig.read(NUM_QUEUES, 2), 2);
}

#[test]
fn linux_like_probe_activates_with_rings_eventfds_and_registrations() {
    let mut rig = Rig::new();
    rig.probe();
    assert_eq!(rig.status(), 0xf);
    rig.write(Q_SELECT, 2, 1);
    assert_eq!(rig.read(Q_SIZE, 2), 256);
    assert_eq!(rig.read(Q_MSIX, 2), 1);
    assert_eq!(rig.read(Q_ENABLE, 2), 1);
    assert_eq!(rig.read(Q_NOTIFY_OFF, 2), 1);
    assert_eq!(rig.read(MSIX_CONFIG, 2), 2);

    let sent = rig.dev.sent();
    assert_eq!(sent.len(), 1);
    let (msg, fds) = &sent[0];
    let ToDevice::Activate { features, queues } = msg else {
        panic!("expected Activate, got {msg:?}");
    };
    assert_eq!(*features, F_VERSION_1 | F_EVENT_IDX | F_BLK_FLUSH);
    assert_eq!(
        queues,
        &vec![
            QueueConfig {
                index: 0,
                size: 128,
                desc: 0x10_0000,
                avail: 0x10_1000,
                used: 0x10_2000
            },
            QueueConfig {
                index: 1,
                size: 256,
                desc: 0x20_0000,
                avail: 0x20_1000,
                used: 0x20_2000
            },
        ]
    );
    assert_eq!(fds.len(), 4, "kick and call per queue");

    let host = rig.host.state();
    let mut ioeventfds = host.ioeventfds.clone();
    ioeventfds.sort_unstable();
    assert_eq!(
        ioeventfds,
        vec![(BAR + 0x3000, fds[0]), (BAR + 0x3004, fds[2])]
    );
    drop(host);
    let (g0, g1, g2) = (rig.gsi(0), rig.gsi(1), rig.gsi(2));
    let host = rig.host.state();
    for (fd, gsi) in [(fds[1], g0), (fds[3], g1), (rig.config_irq(), g2)] {
        assert!(
            host.irqfds.contains(&(fd, gsi)),
            "irqfd {fd} on {gsi}: {:?}",
            host.irqfds
        );
    }
    assert_eq!(host.irqfds.len(), 3);
    for (vector, gsi) in [(0u32, g0), (1, g1), (2, g2)] {
        assert_eq!(
            host.routes.get(&gsi),
            Some(&MsiMessage {
                address: 0xfee0_0000,
                data: 0x40 + vector
            })
        );
    }
    drop(host);
    rig.assert_clean();
}

#[test]
fn unsupported_offered_features_are_hidden_from_the_driver() {
    let rig = Rig::new();
    rig.write(DFSELECT, 4, 1);
    assert_eq!(rig.read(DF, 4), 1, "VERSION_1 but not ACCESS_PLATFORM");
    rig.write(DFSELECT, 4, 0);
    assert_eq!(rig.read(DF, 4), F_EVENT_IDX | F_BLK_FLUSH);
}

#[test]
fn features_ok_with_unoffered_bits_is_refused_and_driver_ok_does_not_activate() {
    let rig = Rig::new();
    rig.negotiate(u64::MAX);
    // The driver asked for ACCESS_PLATFORM, which was not offered... but `negotiate` masks
    // by the offer, so write an unoffered bit by hand.
    rig.write(STATUS, 1, 0);
    rig.write(STATUS, 1, 3);
    rig.write(GFSELECT, 4, 1);
    rig.write(GF, 4, 0b11);
    rig.write(STATUS, 1, 0xb);
    assert_eq!(rig.status(), 0x3, "FEATURES_OK refused");
    rig.setup_queue(0, 8, NO_VECTOR, 0x10_0000);
    rig.write(STATUS, 1, 0x7);
    assert_eq!(rig.status(), 0x3);
    assert!(rig.dev.sent().is_empty());
    rig.assert_clean();
}

#[test]
fn driver_ok_without_an_enabled_queue_needs_reset_and_sends_nothing() {
    let rig = Rig::new();
    rig.negotiate(F_VERSION_1);
    rig.write(Q_SELECT, 2, 0);
    rig.write(Q_SIZE, 2, 100);
    rig.write(Q_ENABLE, 2, 1);
    rig.write(STATUS, 1, 0xf);
    assert_eq!(rig.status() & u64::from(STATUS_NEEDS_RESET), 0x40);
    assert!(rig.dev.sent().is_empty());
    assert!(rig.host.state().ioeventfds.is_empty());
}

#[test]
fn reset_tells_the_device_removes_registrations_and_waits_for_reset_done() {
    let mut rig = Rig::new();
    rig.probe();
    rig.dev.take();
    rig.write(STATUS, 1, 0);
    assert_eq!(
        rig.dev
            .take()
            .iter()
            .map(|(m, _)| m.clone())
            .collect::<Vec<_>>(),
        vec![ToDevice::Reset]
    );
    {
        let host = rig.host.state();
        assert!(host.ioeventfds.is_empty(), "{:?}", host.ioeventfds);
        assert!(host.irqfds.is_empty(), "{:?}", host.irqfds);
    }
    assert_ne!(rig.status(), 0, "reset not done until the device says so");
    rig.write(STATUS, 1, 1);
    rig.pci.lock().unwrap().handle(FromDevice::ResetDone);
    assert_eq!(rig.status(), 0);
    assert_eq!(rig.read(MSIX_CONFIG, 2), u64::from(NO_VECTOR));
    // A second probe works the same way and activates again.
    rig.probe();
    assert!(matches!(rig.dev.sent()[0].0, ToDevice::Activate { .. }));
    assert_eq!(rig.host.state().ioeventfds.len(), 2);
    rig.assert_clean();
}

#[test]
fn a_reset_the_device_never_answers_completes_after_enough_polls_or_when_it_dies() {
    let mut rig = Rig::new();
    rig.probe();
    rig.write(STATUS, 1, 0);
    let mut polls = 0;
    while rig.status() != 0 {
        polls += 1;
        assert!(polls <= RESET_POLL_LIMIT + 1, "reset never completed");
    }
    assert!(polls >= RESET_POLL_LIMIT);
    rig.probe();
    rig.write(STATUS, 1, 0);
    assert_ne!(rig.status(), 0);
    rig.pci.lock().unwrap().device_gone();
    assert_eq!(rig.status(), 0);
}

#[test]
fn masking_a_vector_parks_its_interrupts_in_the_pba_until_unmasked() {
    let mut rig = Rig::new();
    rig.probe();
    let call = rig.call(0);
    let gsi = rig.gsi(0);
    rig.write(0x3800 + 12, 4, 1);
    assert!(!rig.host.state().irqfds.contains(&(call, gsi)));
    assert_eq!(rig.read(0x3c00, 8), 0, "nothing pending yet");
    rig.pci.lock().unwrap().active.as_ref().unwrap().queues[0]
        .call
        .write(1)
        .unwrap();
    assert_eq!(rig.read(0x3c00, 8), 0b1, "the device's call is pending");
    assert_eq!(
        rig.read(0x3c00, 8),
        0b1,
        "reading the PBA does not consume it"
    );
    rig.write(0x3800 + 12, 4, 0);
    assert!(rig.host.state().irqfds.contains(&(call, gsi)));
    assert_eq!(rig.read(0x3c00, 8), 0);
    // The function mask and MSI-X enable act on every vector.
    rig.cfg_write(0x98 + 2, 2, 0xc000);
    assert!(rig.host.state().irqfds.is_empty());
    rig.cfg_write(0x98 + 2, 2, 0x8000);
    assert_eq!(rig.host.state().irqfds.len(), 3);
    rig.cfg_write(0x98 + 2, 2, 0);
    assert!(rig.host.state().irqfds.is_empty());
    rig.assert_clean();
}

#[test]
fn rewriting_an_entry_reroutes_its_gsi_and_a_new_queue_vector_moves_the_irqfd() {
    let mut rig = Rig::new();
    rig.probe();
    rig.write(0x3800 + 16 + 8, 4, 0x77);
    let g1 = rig.gsi(1);
    assert_eq!(rig.host.state().routes[&g1].data, 0x77);
    // Queue 0 moves from vector 0 to vector 1 (allowed after DRIVER_OK).
    let call = rig.call(0);
    rig.write(Q_SELECT, 2, 0);
    rig.write(Q_MSIX, 2, 1);
    assert!(rig.host.state().irqfds.contains(&(call, g1)));
    assert!(!rig.host.state().irqfds.contains(&(call, rig.gsi(0))));
    // A vector beyond the table reads back NO_VECTOR and unbinds the queue.
    rig.write(Q_MSIX, 2, 3);
    assert_eq!(rig.read(Q_MSIX, 2), u64::from(NO_VECTOR));
    assert!(!rig.host.state().irqfds.iter().any(|&(fd, _)| fd == call));
    rig.assert_clean();
}

#[test]
fn moving_the_bar_moves_ioeventfds_and_mmio() {
    let mut rig = Rig::new();
    rig.probe();
    let kicks: Vec<RawFd> = rig.dev.sent()[0].1.iter().step_by(2).copied().collect();
    let window = Arc::new(Mutex::new(BarWindow::new(&[rig.pci.clone()])));
    let new_bar = 0x8_0000_0000u64;
    rig.cfg_write(0x04, 2, 0x4);
    assert!(rig.host.state().ioeventfds.is_empty(), "decoding off");
    rig.cfg_write(0x10, 4, new_bar & 0xffff_ffff);
    rig.cfg_write(0x14, 4, new_bar >> 32);
    rig.cfg_write(0x04, 2, 0x6);
    let mut ioeventfds = rig.host.state().ioeventfds.clone();
    ioeventfds.sort_unstable();
    assert_eq!(
        ioeventfds,
        vec![(new_bar + 0x3000, kicks[0]), (new_bar + 0x3004, kicks[1])]
    );
    let mut buf = [0u8; 2];
    window.lock().unwrap().read(BAR + NUM_QUEUES, &mut buf);
    assert_eq!(buf, [0xff, 0xff], "old address no longer decodes");
    window.lock().unwrap().read(new_bar + NUM_QUEUES, &mut buf);
    assert_eq!(u16::from_le_bytes(buf), 2);
    assert_eq!(rig.pci.lock().unwrap().bar(), Some(new_bar));
    rig.assert_clean();
}

#[test]
fn notify_writes_reaching_the_runner_kick_only_activated_queues() {
    let mut rig = Rig::new();
    rig.host.state().refuse_ioeventfds = true;
    rig.write(0x3000, 2, 0);
    rig.probe();
    assert!(rig.host.state().ioeventfds.is_empty());
    rig.write(0x3004, 2, 1);
    rig.write(0x3006, 2, 1);
    let pci = rig.pci.lock().unwrap();
    let queues = &pci.active.as_ref().unwrap().queues;
    assert!(queues[0].kick.read().is_err(), "queue 0 not kicked");
    assert_eq!(queues[1].kick.read().unwrap(), 1, "one forwarded kick");
}

#[test]
fn config_changes_bump_the_generation_and_fire_the_config_vector() {
    let mut rig = Rig::new();
    rig.probe();
    let generation = rig.read(GENERATION, 1);
    let mut config: Vec<u8> = blk_info().config;
    config[0] = 0xee;
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::ConfigChanged { config });
    assert_eq!(rig.read(GENERATION, 1), generation + 1);
    assert_eq!(rig.read(0x2000, 4), 0x0302_01ee);
    assert!(
        peek(&rig.pci.lock().unwrap().config_irq),
        "config interrupt signalled"
    );
    // A change of the wrong length is dropped.
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::ConfigChanged { config: vec![1; 8] });
    assert_eq!(rig.read(GENERATION, 1), generation + 1);
    assert_eq!(rig.read(0x2000, 1), 0xee);
}

#[test]
fn needs_reset_from_an_active_device_sets_the_status_bit_and_raises_config() {
    let mut rig = Rig::new();
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::needs_reset("not yet active"));
    assert_eq!(rig.status(), 0, "ignored before activation");
    rig.probe();
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::needs_reset("bad ring"));
    assert_eq!(rig.status(), 0x4f);
    assert!(peek(&rig.pci.lock().unwrap().config_irq));
    // The driver's reset clears it.
    rig.write(STATUS, 1, 0);
    rig.pci.lock().unwrap().handle(FromDevice::ResetDone);
    assert_eq!(rig.status(), 0);
}

#[test]
fn device_config_reads_come_from_the_cache_and_writes_go_to_the_device() {
    let rig = Rig::new();
    assert_eq!(rig.read(0x2000 + 8, 8), 0x0f0e_0d0c_0b0a_0908);
    assert_eq!(rig.read(0x2000 + 59, 1), 59);
    assert_eq!(
        rig.read(0x2000 + 58, 4),
        0,
        "straddling the end reads nothing"
    );
    rig.write(0x2000 + 32, 1, 1);
    rig.write(0x2000 + 58, 4, 1);
    assert_eq!(
        rig.dev
            .take()
            .into_iter()
            .map(|(m, _)| m)
            .collect::<Vec<_>>(),
        vec![ToDevice::ConfigWrite {
            offset: 32,
            data: vec![1]
        }]
    );
    assert_eq!(rig.read(0x2000 + 32, 1), 32, "the device is authoritative");
    rig.assert_clean();
}

#[test]
fn the_pci_cfg_window_reaches_bar0() {
    let mut rig = Rig::new();
    let cap = 0x84;
    rig.cfg_write(cap + 4, 1, 0);
    rig.cfg_write(cap + 8, 4, NUM_QUEUES);
    rig.cfg_write(cap + 12, 4, 2);
    assert_eq!(rig.cfg_read(cap + 16, 4), 2);
    rig.cfg_write(cap + 8, 4, STATUS);
    rig.cfg_write(cap + 12, 4, 1);
    rig.cfg_write(cap + 16, 4, 1);
    assert_eq!(rig.status(), 1);
    // Misaligned, odd lengths and other BARs do nothing.
    rig.cfg_write(cap + 8, 4, 0x13);
    rig.cfg_write(cap + 12, 4, 2);
    assert_eq!(rig.cfg_read(cap + 16, 4), 0);
    rig.cfg_write(cap + 8, 4, STATUS);
    rig.cfg_write(cap + 12, 4, 3);
    rig.cfg_write(cap + 16, 4, 0);
    rig.cfg_write(cap + 12, 4, 1);
    rig.cfg_write(cap + 4, 1, 2);
    rig.cfg_write(cap + 16, 4, 0);
    assert_eq!(rig.status(), 1);
}

#[test]
fn a_restarted_device_gets_the_same_activate_and_eventfds() {
    let mut rig = Rig::new();
    rig.probe();
    let (first, fds) = rig.dev.sent()[0].clone();
    let ioeventfds = rig.host.state().ioeventfds.clone();
    let new_dev = FakeDevice::new(blk_info());
    rig.dev.closed.store(true, Ordering::SeqCst);
    {
        let mut pci = rig.pci.lock().unwrap();
        pci.replace_device(new_dev.clone());
        pci.handle(FromDevice::Info(blk_info()));
    }
    assert_eq!(new_dev.sent(), vec![(first, fds)]);
    assert_eq!(
        rig.host.state().ioeventfds,
        ioeventfds,
        "registrations kept"
    );
    assert_eq!(rig.status(), 0xf);
    // A different device in its place: the driver must reset.
    let mut other = blk_info();
    other.queues = 1;
    rig.pci.lock().unwrap().handle(FromDevice::Info(other));
    assert_eq!(rig.status() & 0x40, 0x40);
}

const F_NET_CTRL_VQ: u64 = 1 << 17;
const F_NET_MQ: u64 = 1 << 22;

/// A virtio-net device of two queue pairs: rx0 tx0 rx1 tx1 ctrl.
fn net_info() -> DeviceInfo {
    DeviceInfo {
        device_type: 1,
        features: F_VERSION_1 | F_NET_CTRL_VQ | F_NET_MQ,
        queues: 5,
        max_queue_size: 256,
        config: vec![0; 12],
    }
}

/// Probes a net device with `features` and its five queues enabled (no MSI-X: the queues'
/// interrupts do not matter here).
fn net_probe(rig: &Rig, features: u64) {
    rig.negotiate(features);
    for q in 0..5u16 {
        rig.setup_queue(q, 64, NO_VECTOR, 0x10_0000 * (u64::from(q) + 1));
    }
    rig.write(STATUS, 1, 0xf);
    assert_eq!(rig.status(), 0xf);
}

/// The device process dies and a new one with `info` introduces itself: what the new one
/// is sent (messages only).
fn restart_device(rig: &Rig, info: DeviceInfo) -> Vec<ToDevice> {
    let new_dev = FakeDevice::new(info.clone());
    let mut pci = rig.pci.lock().unwrap();
    pci.device_gone();
    pci.replace_device(new_dev.clone());
    pci.handle(FromDevice::Info(info));
    drop(pci);
    assert_eq!(*new_dev.errors.lock().unwrap(), Vec::<String>::new());
    new_dev.sent().into_iter().map(|(m, _)| m).collect()
}

fn activates(msgs: &[ToDevice]) -> bool {
    matches!(msgs, [ToDevice::Activate { .. }])
}

#[test]
fn a_restarted_net_device_is_told_the_queue_pairs_reported_before_its_activate() {
    let rig = Rig::with(net_info());
    net_probe(&rig, F_VERSION_1 | F_NET_CTRL_VQ | F_NET_MQ);
    let (first, fds) = rig.dev.sent()[0].clone();
    assert!(matches!(first, ToDevice::Activate { .. }));

    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::QueuePairs { pairs: 2 });
    let new_dev = FakeDevice::new(net_info());
    {
        let mut pci = rig.pci.lock().unwrap();
        pci.device_gone();
        pci.replace_device(new_dev.clone());
        pci.handle(FromDevice::Info(net_info()));
    }

    assert_eq!(
        new_dev.sent(),
        vec![
            (ToDevice::ResumeQueuePairs { pairs: 2 }, vec![]),
            (first, fds)
        ],
        "the count first, then the same Activate with the same eventfds"
    );
    assert_eq!(*new_dev.errors.lock().unwrap(), Vec::<String>::new());
    // Kept for a second restart too; a report of 1 pair forgets it.
    let again = restart_device(&rig, net_info());
    assert_eq!(
        again.first(),
        Some(&ToDevice::ResumeQueuePairs { pairs: 2 })
    );
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::QueuePairs { pairs: 1 });
    assert!(activates(&restart_device(&rig, net_info())));
    rig.assert_clean();
}

#[test]
fn after_a_driver_reset_a_restarted_net_device_starts_from_one_pair() {
    let rig = Rig::with(net_info());
    net_probe(&rig, F_VERSION_1 | F_NET_CTRL_VQ | F_NET_MQ);
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::QueuePairs { pairs: 2 });

    // The driver resets the device (a reboot, a driver reload) and probes it again.
    rig.write(STATUS, 1, 0);
    rig.pci.lock().unwrap().handle(FromDevice::ResetDone);
    assert_eq!(rig.status(), 0);
    // A report still in flight from before the reset belongs to the old driver.
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::QueuePairs { pairs: 2 });
    rig.dev.take();
    net_probe(&rig, F_VERSION_1 | F_NET_CTRL_VQ | F_NET_MQ);
    assert!(
        activates(
            &rig.dev
                .take()
                .into_iter()
                .map(|(m, _)| m)
                .collect::<Vec<_>>()
        ),
        "a new driver session's Activate comes alone"
    );

    assert!(activates(&restart_device(&rig, net_info())));
    rig.assert_clean();
}

#[test]
fn queue_pair_reports_beyond_the_offer_or_without_mq_are_refused() {
    // More pairs than offered, none, far too many: nothing to resume.
    let rig = Rig::with(net_info());
    net_probe(&rig, F_VERSION_1 | F_NET_CTRL_VQ | F_NET_MQ);
    for pairs in [3, 0, u16::MAX] {
        rig.pci
            .lock()
            .unwrap()
            .handle(FromDevice::QueuePairs { pairs });
        assert!(
            activates(&restart_device(&rig, net_info())),
            "{pairs} pairs refused"
        );
    }
    rig.assert_clean();

    // The driver did not negotiate MQ: one pair is all it can have.
    let rig = Rig::with(net_info());
    net_probe(&rig, F_VERSION_1 | F_NET_CTRL_VQ);
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::QueuePairs { pairs: 2 });
    assert!(activates(&restart_device(&rig, net_info())));

    // Not before DRIVER_OK, and never for a device that is not a NIC.
    let rig = Rig::with(net_info());
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::QueuePairs { pairs: 2 });
    net_probe(&rig, F_VERSION_1 | F_NET_CTRL_VQ | F_NET_MQ);
    assert!(activates(&restart_device(&rig, net_info())));
    let mut rig = Rig::new();
    rig.probe();
    rig.pci
        .lock()
        .unwrap()
        .handle(FromDevice::QueuePairs { pairs: 2 });
    assert!(activates(&restart_device(&rig, blk_info())));
    rig.assert_clean();
}

#[test]
fn construction_refuses_legacy_devices_bad_types_and_bad_bar_addresses() {
    let host: Arc<dyn VirtioHost> = Arc::new(FakeHost::default());
    let dev: Arc<dyn DeviceSender> = FakeDevice::new(blk_info());
    let make = |info: DeviceInfo, bar: u64| VirtioPci::new(info, bar, host.clone(), dev.clone());
    let mut legacy = blk_info();
    legacy.features &= !F_VERSION_1;
    assert!(matches!(make(legacy, BAR), Err(TransportError::NotModern)));
    let mut odd = blk_info();
    odd.device_type = 0x40;
    assert!(matches!(
        make(odd, BAR),
        Err(TransportError::DeviceType(0x40))
    ));
    let mut huge = blk_info();
    huge.queues = 17;
    assert!(matches!(make(huge, BAR), Err(TransportError::Info(_))));
    for bar in [0, BAR + 0x1000, u64::MAX - BAR_SIZE + 1] {
        assert!(
            matches!(make(blk_info(), bar), Err(TransportError::BarAddress(_))),
            "{bar:#x}"
        );
    }
    assert!(make(blk_info(), BAR).is_ok());
}

#[test]
fn bar_addresses_pack_the_32_bit_window_and_stop_before_ecam() {
    assert_eq!(bar_address(0), Some(PCI_MMIO32_START));
    assert_eq!(bar_address(1), Some(PCI_MMIO32_START + BAR_SIZE));
    let last = usize::try_from((ECAM_START - PCI_MMIO32_START) / BAR_SIZE).unwrap() - 1;
    assert_eq!(bar_address(last), Some(ECAM_START - BAR_SIZE));
    assert_eq!(bar_address(last + 1), None);
    assert_eq!(bar_address(usize::MAX), None);
}

/// A small deterministic generator for the hostile sequences.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 17
    }
}

#[test]
fn every_width_and_offset_of_bar0_and_config_space_is_survived() {
    let mut rig = Rig::new();
    rig.probe();
    let mut pci = rig.pci.lock().unwrap();
    for offset in (0..BAR_SIZE + 16).chain([u64::MAX - 3, u64::MAX]) {
        for len in [1usize, 2, 3, 4, 8, 16] {
            let mut buf = vec![0u8; len];
            pci.bar_read(offset, &mut buf);
            pci.read(BAR.wrapping_add(offset), &mut buf);
        }
    }
    drop(pci);
    for reg in (0..0x1000u64).step_by(1) {
        for len in [1usize, 2, 4] {
            rig.cfg_read(reg, len);
        }
    }
    rig.assert_clean();
}

#[test]
fn hostile_driver_sequences_never_send_the_device_anything_invalid() {
    let mut rig = Rig::new();
    let mut rng = Lcg(0x5eed);
    // Offsets the driver is most likely to hurt itself with, plus anywhere at all.
    let hot: [u64; 20] = [
        STATUS,
        Q_SELECT,
        Q_SIZE,
        Q_MSIX,
        Q_ENABLE,
        Q_DESC,
        Q_DESC + 4,
        Q_DRIVER,
        Q_DEVICE,
        MSIX_CONFIG,
        GF,
        GFSELECT,
        0x2000,
        0x2020,
        0x3000,
        0x3004,
        0x3800,
        0x380c,
        0x381c,
        0x3c00,
    ];
    for round in 0..60_000u32 {
        let pick = rng.next();
        let offset = if pick.is_multiple_of(4) {
            rng.next() % (BAR_SIZE + 8)
        } else {
            hot[usize::try_from(rng.next() % 20).unwrap()]
        };
        let len = [1usize, 2, 4, 8][usize::try_from(rng.next() % 4).unwrap()];
        let value = match rng.next() % 5 {
            0 => 0,
            1 => u64::MAX,
            2 => 1,
            3 => 0xf,
            _ => rng.next(),
        };
        rig.write(offset, len, value);
        let _ = rig.read(offset, len);
        match round % 997 {
            0 => rig.cfg_write(0x98 + 2, 2, rng.next() & 0xc000),
            1 => rig.cfg_write(0x04, 2, rng.next() & 0x6),
            2 => rig.pci.lock().unwrap().handle(FromDevice::ResetDone),
            3 => rig.pci.lock().unwrap().handle(FromDevice::Activated),
            4 => rig
                .pci
                .lock()
                .unwrap()
                .handle(FromDevice::needs_reset("fuzz")),
            5 => rig.pci.lock().unwrap().handle(FromDevice::ConfigChanged {
                config: vec![u8::try_from(round % 251).unwrap(); 60],
            }),
            6 => rig.probe(),
            _ => {}
        }
    }
    let activations = rig
        .dev
        .sent()
        .iter()
        .filter(|(m, _)| matches!(m, ToDevice::Activate { .. }))
        .count();
    assert!(activations > 0, "the sequence never reached DRIVER_OK");
    rig.assert_clean();
    // Whatever state it ended in, a reset leaves no queue registration behind.
    rig.write(STATUS, 1, 0);
    rig.pci.lock().unwrap().handle(FromDevice::ResetDone);
    let host = rig.host.state();
    assert!(host.ioeventfds.is_empty());
    assert!(host.irqfds.is_empty(), "{:?}", host.irqfds);
}

// ---- a selector-addressed configuration space (virtio-input) ----

fn input_info() -> DeviceInfo {
    DeviceInfo {
        device_type: 18,
        features: F_VERSION_1,
        queues: 2,
        max_queue_size: 64,
        config: vec![0; INPUT_CONFIG_BYTES],
    }
}

fn input_table() -> ConfigTable {
    ConfigTable {
        entries: vec![
            ConfigEntry {
                select: input_select::ID_NAME,
                subsel: 0,
                data: b"capvm keyboard".to_vec(),
            },
            ConfigEntry {
                select: input_select::EV_BITS,
                subsel: 1,
                data: (1u8..=128).collect(),
            },
        ],
    }
}

fn input_rig() -> Rig {
    let host = Arc::new(FakeHost::default());
    let info = input_info();
    let dev = FakeDevice::new(info.clone());
    let pci = VirtioPci::with_table(info, Some(input_table()), BAR, host.clone(), dev.clone());
    let pci = Arc::new(Mutex::new(pci.unwrap()));
    let mut root = PciRoot::new(Arc::new(NoPlatform));
    root.add_function(3, VirtioPci::pci_function(&pci)).unwrap();
    Rig {
        pci,
        root,
        host,
        dev,
        bar: BAR,
    }
}

/// The driver's `virtinput_cfg_select` then a read of `size` and the payload, like Linux.
fn select(rig: &Rig, sel: u8, subsel: u8) -> Vec<u8> {
    rig.write(0x2000, 1, u64::from(sel));
    rig.write(0x2001, 1, u64::from(subsel));
    let size = rig.read(0x2002, 1);
    (0..size)
        .map(|i| u8::try_from(rig.read(0x2008 + i, 1)).unwrap())
        .collect()
}

#[test]
fn an_input_device_is_class_input_and_answers_each_selector_from_its_table() {
    let mut rig = input_rig();
    assert_eq!(rig.cfg_read(0x02, 2), 0x1040 + 18);
    assert_eq!(rig.cfg_read(0x08, 4) >> 8, 0x09_80_00);
    assert_eq!(select(&rig, input_select::ID_NAME, 0), b"capvm keyboard");
    assert_eq!(
        select(&rig, input_select::EV_BITS, 1),
        (1u8..=128).collect::<Vec<_>>()
    );
    assert_eq!(rig.read(0x2000, 2), 0x0111, "select and subsel read back");
    // A wider load sees the last payload byte and nothing past the space.
    assert_eq!(rig.read(0x2008 + 124, 4), 0x807f_7e7d);
    assert_eq!(rig.read(0x2008 + 127, 1), 128);
    rig.assert_clean();
    assert!(
        rig.dev.sent().is_empty(),
        "selector writes stay in the runner"
    );
}

#[test]
fn unknown_or_unset_input_selectors_read_as_size_zero_and_a_zero_payload() {
    let rig = input_rig();
    for (sel, subsel) in [
        (input_select::UNSET, 0),
        (input_select::EV_BITS, 2),
        (input_select::ID_SERIAL, 0),
        (0xff, 0xff),
    ] {
        assert_eq!(select(&rig, sel, subsel), Vec::<u8>::new());
        assert_eq!(rig.read(0x2008, 8), 0, "{sel:#x}/{subsel:#x}");
    }
    // Stores to size, the reserved bytes or the payload change nothing.
    select(&rig, input_select::ID_NAME, 0);
    rig.write(0x2002, 1, 3);
    rig.write(0x2008, 4, 0xffff_ffff);
    assert_eq!(select(&rig, input_select::ID_NAME, 0), b"capvm keyboard");
    assert!(rig.dev.sent().is_empty());
}

#[test]
fn a_table_that_does_not_fit_the_device_is_refused_at_construction() {
    let host: Arc<dyn VirtioHost> = Arc::new(FakeHost::default());
    let dev = FakeDevice::new(blk_info());
    let built = VirtioPci::with_table(blk_info(), Some(input_table()), BAR, host.clone(), dev);
    assert!(matches!(built, Err(TransportError::Info(_))));
    let mut bad = input_table();
    bad.entries.push(bad.entries[0].clone());
    let dev = FakeDevice::new(input_info());
    let built = VirtioPci::with_table(input_info(), Some(bad), BAR, host, dev);
    assert!(matches!(built, Err(TransportError::Info(_))));
}

#[test]
fn a_restarted_input_device_with_the_same_table_is_reactivated_and_another_table_fails_it() {
    let mut rig = input_rig();
    rig.negotiate(F_VERSION_1);
    rig.enable_msix();
    rig.write(MSIX_CONFIG, 2, 2);
    rig.setup_queue(0, 64, 0, 0x10_0000);
    rig.setup_queue(1, 64, 1, 0x20_0000);
    rig.write(STATUS, 1, 0xf);
    let (first, fds) = rig.dev.sent()[0].clone();
    let new_dev = FakeDevice::new(input_info());
    {
        let mut pci = rig.pci.lock().unwrap();
        pci.replace_device(new_dev.clone());
        pci.handle(FromDevice::InfoWithTable {
            info: input_info(),
            table: input_table(),
        });
    }
    assert_eq!(new_dev.sent(), vec![(first, fds)]);
    assert_eq!(rig.status(), 0xf);
    let mut other = input_table();
    other.entries.truncate(1);
    rig.pci.lock().unwrap().handle(FromDevice::InfoWithTable {
        info: input_info(),
        table: other,
    });
    assert_eq!(rig.status() & 0x40, 0x40);
}

#[test]
fn connect_returns_an_input_devices_table() {
    let (runner, device) = Channel::pair().unwrap();
    let t = std::thread::spawn(move || {
        device_end_hello(&device);
        let msg = FromDevice::InfoWithTable {
            info: input_info(),
            table: input_table(),
        };
        device.send(&msg, &[]).unwrap();
        device
    });
    let (info, table) = link::connect(&runner, Duration::from_secs(5)).unwrap();
    assert_eq!(info, input_info());
    assert_eq!(table, Some(input_table()));
    drop(t.join().unwrap());
}

#[test]
fn connect_refuses_a_table_with_a_bad_selector() {
    let (runner, device) = Channel::pair().unwrap();
    let t = std::thread::spawn(move || {
        device_end_hello(&device);
        let mut table = input_table();
        table.entries[0].select = 0x42;
        let msg = FromDevice::InfoWithTable {
            info: input_info(),
            table,
        };
        device.send(&msg, &[]).unwrap();
        device
    });
    assert!(matches!(
        link::connect(&runner, Duration::from_secs(5)),
        Err(link::LinkError::Info(_))
    ));
    drop(t.join().unwrap());
}

// ---- the device link over a real channel ----

fn device_end_hello(device: &Channel) {
    device.handshake(ChannelKind::RunnerDevice).unwrap();
}

#[test]
fn connect_returns_the_devices_info_after_the_handshake() {
    let (runner, device) = Channel::pair().unwrap();
    let t = std::thread::spawn(move || {
        device_end_hello(&device);
        device.send(&FromDevice::Info(blk_info()), &[]).unwrap();
        device
    });
    let (info, table) = link::connect(&runner, Duration::from_secs(5)).unwrap();
    assert_eq!(info, blk_info());
    assert_eq!(table, None);
    drop(t.join().unwrap());
}

#[test]
fn connect_refuses_a_device_that_starts_with_something_else() {
    let (runner, device) = Channel::pair().unwrap();
    let t = std::thread::spawn(move || {
        device_end_hello(&device);
        device.send(&FromDevice::ResetDone, &[]).unwrap();
        device
    });
    assert!(matches!(
        link::connect(&runner, Duration::from_secs(5)),
        Err(link::LinkError::NoInfo)
    ));
    drop(t.join().unwrap());
}

#[test]
fn the_link_thread_applies_good_messages_drops_bad_ones_and_notices_the_hang_up() {
    let rig = Rig::new();
    let (runner, device) = Channel::pair().unwrap();
    let handle = link::spawn("test", Arc::new(runner), rig.pci.clone()).unwrap();
    // Descriptors attached, and an out-of-bounds message: both dropped.
    let (_reader, stray) = std::io::pipe().unwrap();
    device
        .send(
            &FromDevice::ConfigChanged {
                config: vec![9; 60],
            },
            &[stray.as_fd()],
        )
        .unwrap();
    device
        .send(
            &FromDevice::NeedsReset {
                reason: "\n".into(),
            },
            &[],
        )
        .unwrap();
    device
        .send(
            &FromDevice::ConfigChanged {
                config: vec![7; 60],
            },
            &[],
        )
        .unwrap();
    drop(device);
    handle.join().unwrap();
    assert_eq!(rig.read(0x2000, 1), 7);
    assert_eq!(rig.read(GENERATION, 1), 1, "only the good change counted");
    assert_eq!(rig.status(), 0);
}

// ---- the whole path through KVM ----

/// Real-mode guest code at 0x1000: a 16-bit notify write to queue 0 (BAR at `0x1_0000`, so
/// `ds` = 0x1000 and offset 0x3000), `out 0x10`; then `sti` and a bounded wait for an
/// interrupt, `out 0x12` if none came. The handler of vector 0x40 (at 0x2000) does `out 0x11`.
const GUEST_CODE: &[u8] = &[
    0xb8, 0x00, 0x10, // mov ax, 0x1000
    0x8e, 0xd8, // mov ds, ax
    0x31, 0xc0, // xor ax, ax
    0xa3, 0x00, 0x30, // mov [0x3000], ax
    0xe6, 0x10, // out 0x10, al
    0xfb, // sti
    0xb9, 0xff, 0xff, // mov cx, 0xffff
    0x49, // dec cx
    0x75, 0xfd, // jnz dec
    0xe6, 0x12, // out 0x12, al
    0xf4, // hlt
];
const GUEST_HANDLER: &[u8] = &[0xe6, 0x11, 0xf4]; // out 0x11, al; hlt

/// Runs `vcpu` to its next exit, which must be a port write, and returns the port.
fn next_out(vcpu: &mut kvm_ioctls::VcpuFd) -> u16 {
    match vcpu.run().unwrap() {
        kvm_ioctls::VcpuExit::IoOut(port, _) => port,
        kvm_ioctls::VcpuExit::MmioWrite(addr, _) => panic!("MMIO write at {addr:#x} exited"),
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn through_kvm_a_notify_write_kicks_without_an_exit_and_a_call_raises_the_msix_vector() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("skipping: /dev/kvm unavailable: {e}");
            return;
        }
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    memory
        .write_slice(GUEST_CODE, GuestAddress(0x1000))
        .unwrap();
    memory
        .write_slice(GUEST_HANDLER, GuestAddress(0x2000))
        .unwrap();
    memory
        .write_slice(&[0x00, 0x20, 0x00, 0x00], GuestAddress(0x40 * 4))
        .unwrap();
    let host_addr = memory.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x1_0000,
        userspace_addr: host_addr as u64,
    };
    // SAFETY: the region is a live 64 KiB mapping owned by `memory`, which outlives the VM's
    // use of it (both are dropped at the end of the test, the VM's vCPU first).
    unsafe { vm.set_user_memory_region(region) }.unwrap();

    let bar = 0x1_0000;
    let mut rig = Rig::build(
        blk_info(),
        bar,
        Arc::new(FakeHost::default()),
        Arc::new(kvm_host::KvmHost::new(vm.clone())),
    );
    rig.probe();
    assert_eq!(rig.status(), 0xf);
    let (kick, call) = {
        let pci = rig.pci.lock().unwrap();
        let q = &pci.active.as_ref().unwrap().queues[0];
        (q.kick.try_clone().unwrap(), q.call.try_clone().unwrap())
    };

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).unwrap();
    // Software-enable the local APIC (spurious-interrupt vector register bit 8).
    let mut lapic = vcpu.get_lapic().unwrap();
    lapic.regs[0xf1] |= 1;
    vcpu.set_lapic(&lapic).unwrap();

    assert_eq!(next_out(&mut vcpu), 0x10, "the notify write did not exit");
    assert_eq!(
        kick.read().unwrap(),
        1,
        "the guest's notify reached the kick eventfd"
    );
    // The device process completes a request: its call goes through the irqfd and the
    // route of MSI-X entry 0 (vector 0x40 to APIC 0) into the guest.
    call.write(1).unwrap();
    assert_eq!(next_out(&mut vcpu), 0x11, "vector 0x40 was delivered");
}
