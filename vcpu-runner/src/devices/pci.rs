//! The PCI root: bus 0, reached through configuration mechanism #1 (ports 0xCF8/0xCFC) and
//! through ECAM (MMIO at [`ECAM_START`]), with a host bridge at 00:00.0 and room for one
//! single-function device in each other slot. Port 0xCF9, inside the address dword, is the
//! chipset's reset control register.
//!
//! Only bus 0 and function 0 exist; everything else reads all-ones, which is how a guest
//! learns a slot is empty.

use std::sync::Arc;

use proto::runner::GuestExit;

use super::access::{read_le, write_le};
use super::pci_config::{CONFIG_SPACE_BYTES, ConfigSpace, PciIds};
use super::{MmioDevice, PioDevice, Platform};
use crate::layout::{ECAM_SIZE, ECAM_START, PCI_CONFIG_PORT, PCI_RESET_PORT};

/// One function on the root bus, as its configuration space.
///
/// Registers are dwords at offsets that are multiples of 4 below 4096; the root splits every
/// guest access (any width, any alignment, through ports or ECAM) into these calls, so an
/// implementation never sees an unaligned or out-of-range register. A function answers BAR
/// sizing itself: after the guest writes all-ones to a BAR, the BAR reads back its size mask
/// ([`ConfigSpace`] does this from its write masks).
///
/// BAR placement is not announced: a function that needs to know where the guest mapped a BAR
/// reads its own BAR register when the guest enables decoding in the command register. (A
/// notification to the runner, to move ioeventfds and MMIO ranges, comes with virtio-pci.)
pub trait PciFunction: Send {
    /// The dword at `reg`. May have side effects (a config window into a BAR).
    fn read_config(&mut self, reg: u16) -> u32;
    /// A write of the bytes of `value` selected by `byte_enable` (bit n = byte n, only bits
    /// 0–3) to the dword at `reg`.
    fn write_config(&mut self, reg: u16, value: u32, byte_enable: u8);
}

/// Device numbers on a bus.
const DEVICES: u8 = 32;
/// The host bridge's slot.
const HOST_BRIDGE_DEVICE: u8 = 0;
/// The host bridge: Red Hat's generic `PCIe` host bridge ID, class "host bridge".
const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x1b36,
    device: 0x0008,
    class: 0x06_00_00,
    revision: 0,
    header_type: 0,
    subsystem_vendor: 0,
    subsystem: 0,
};

/// 0xCF8: configuration enabled.
const ADDRESS_ENABLE: u32 = 1 << 31;
/// 0xCF8: the bits that hold something (enable, bus, device, function, dword register).
const ADDRESS_BITS: u32 = ADDRESS_ENABLE | 0x00ff_fffc;
/// Offsets in the port range.
const PORT_DATA_OFFSET: u16 = 4;
const PORT_RANGE_LEN: u16 = 8;
/// 0xCF9: system reset (hard reset when bit 2 fires).
const RESET_SYSTEM: u8 = 1 << 1;
/// 0xCF9: reset the CPU (fires on write).
const RESET_CPU: u8 = 1 << 2;
/// 0xCF9: full reset (power cycle); kept as written.
const RESET_FULL: u8 = 1 << 3;

/// A function already sits in the asked-for slot, or there is no such slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddFunctionError {
    #[error("PCI device number {0} is not below 32")]
    DeviceNumber(u8),
    #[error("PCI slot {0} is already taken")]
    SlotTaken(u8),
}

/// Bus/device/function and register of a configuration access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConfigAddress {
    bus: u64,
    device: u64,
    function: u64,
    /// Byte offset in the function's space.
    offset: u16,
}

/// The root bus and its host bridge.
pub struct PciRoot {
    platform: Arc<dyn Platform>,
    address: u32,
    reset_control: u8,
    /// Function 0 of each device number; index = device number.
    slots: Vec<Option<Box<dyn PciFunction>>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let occupied: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots.get(i).is_some_and(Option::is_some))
            .collect();
        f.debug_struct("PciRoot")
            .field("address", &format_args!("{:#010x}", self.address))
            .field("reset_control", &self.reset_control)
            .field("occupied", &occupied)
            .finish_non_exhaustive()
    }
}

impl PciRoot {
    /// Bus 0 with only the host bridge, reset requests going to `platform`.
    pub fn new(platform: Arc<dyn Platform>) -> PciRoot {
        let mut slots: Vec<Option<Box<dyn PciFunction>>> = (0..DEVICES).map(|_| None).collect();
        if let Some(slot) = slots.get_mut(usize::from(HOST_BRIDGE_DEVICE)) {
            *slot = Some(Box::new(ConfigSpace::new(&HOST_BRIDGE_IDS)));
        }
        PciRoot {
            platform,
            address: 0,
            reset_control: 0,
            slots,
        }
    }

    /// Puts `function` at function 0 of slot `device` (1–31; 0 is the host bridge).
    pub fn add_function(
        &mut self,
        device: u8,
        function: Box<dyn PciFunction>,
    ) -> Result<(), AddFunctionError> {
        let slot = self
            .slots
            .get_mut(usize::from(device))
            .ok_or(AddFunctionError::DeviceNumber(device))?;
        if slot.is_some() {
            return Err(AddFunctionError::SlotTaken(device));
        }
        *slot = Some(function);
        Ok(())
    }

    /// The function an access targets, if it exists (bus 0, function 0, an occupied slot).
    fn function(&mut self, at: ConfigAddress) -> Option<&mut Box<dyn PciFunction>> {
        if at.bus != 0 || at.function != 0 {
            return None;
        }
        let device = usize::try_from(at.device).ok()?;
        self.slots.get_mut(device)?.as_mut()
    }

    /// The dword registers `data` covers from `offset`, with the span inside each, if the
    /// whole access lies in configuration space.
    fn dwords(offset: u16, len: usize) -> Option<impl Iterator<Item = u16>> {
        let len = u16::try_from(len).ok().filter(|&l| l > 0)?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= CONFIG_SPACE_BYTES)?;
        Some((offset & !3..end).step_by(4))
    }

    fn config_read(&mut self, at: ConfigAddress, data: &mut [u8]) {
        data.fill(0xff);
        let (Some(dwords), Some(function)) =
            (Self::dwords(at.offset, data.len()), self.function(at))
        else {
            tracing::debug!(?at, len = data.len(), "pci: config read of nothing");
            return;
        };
        for reg in dwords {
            let bytes = function.read_config(reg).to_le_bytes();
            for (lane, byte) in (0u16..).zip(bytes) {
                let Some(index) = reg.checked_add(lane).and_then(|b| b.checked_sub(at.offset))
                else {
                    continue;
                };
                if let Some(slot) = data.get_mut(usize::from(index)) {
                    *slot = byte;
                }
            }
        }
    }

    fn config_write(&mut self, at: ConfigAddress, data: &[u8]) {
        let (Some(dwords), Some(function)) =
            (Self::dwords(at.offset, data.len()), self.function(at))
        else {
            tracing::debug!(
                ?at,
                len = data.len(),
                "pci: config write to nothing dropped"
            );
            return;
        };
        for reg in dwords {
            let mut value = [0u8; 4];
            let mut byte_enable = 0u8;
            for (lane, slot) in (0u16..).zip(value.iter_mut()) {
                let Some(index) = reg.checked_add(lane).and_then(|b| b.checked_sub(at.offset))
                else {
                    continue;
                };
                if let Some(&byte) = data.get(usize::from(index)) {
                    *slot = byte;
                    byte_enable |= 1 << lane;
                }
            }
            function.write_config(reg, u32::from_le_bytes(value), byte_enable);
        }
    }

    /// The target of a data-port access at byte `lane` (0–3) of the data dword, if enabled.
    fn port_config_address(&self, lane: u16) -> Option<ConfigAddress> {
        if self.address & ADDRESS_ENABLE == 0 {
            return None;
        }
        let a = u64::from(self.address);
        let register = u16::try_from(self.address & 0xfc).ok()?;
        Some(ConfigAddress {
            bus: (a >> 16) & 0xff,
            device: (a >> 11) & 0x1f,
            function: (a >> 8) & 0x7,
            offset: register.checked_add(lane)?,
        })
    }

    /// The target of an ECAM access at `addr`.
    fn ecam_address(addr: u64) -> Option<ConfigAddress> {
        let offset = addr.checked_sub(ECAM_START).filter(|&o| o < ECAM_SIZE)?;
        Some(ConfigAddress {
            bus: offset >> 20,
            device: (offset >> 15) & 0x1f,
            function: (offset >> 12) & 0x7,
            offset: u16::try_from(offset & 0xfff).ok()?,
        })
    }

    fn write_reset_control(&mut self, value: u8) {
        if value & RESET_CPU != 0 && value & RESET_SYSTEM != 0 {
            tracing::info!(value, "pci: guest reset through port 0xCF9");
            self.platform.request_exit(GuestExit::Reboot);
        }
        self.reset_control = value & (RESET_SYSTEM | RESET_FULL);
    }
}

impl PioDevice for PciRoot {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let offset = port
            .checked_sub(PCI_CONFIG_PORT)
            .filter(|&o| o < PORT_RANGE_LEN);
        match (offset, data.len()) {
            (Some(0), 4) => write_le(data, u64::from(self.address)),
            (Some(1), 1) if port == PCI_RESET_PORT => data.fill(self.reset_control),
            (Some(lane @ PORT_DATA_OFFSET..), len) if len <= usize::from(PORT_RANGE_LEN - lane) => {
                match self.port_config_address(lane - PORT_DATA_OFFSET) {
                    Some(at) => self.config_read(at, data),
                    None => data.fill(0xff),
                }
            }
            _ => {
                tracing::debug!(port, len = data.len(), "pci: unsupported port read");
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        let offset = port
            .checked_sub(PCI_CONFIG_PORT)
            .filter(|&o| o < PORT_RANGE_LEN);
        match (offset, data) {
            (Some(0), [_, _, _, _]) => {
                self.address = u32::try_from(read_le(data)).unwrap_or(0) & ADDRESS_BITS;
            }
            (Some(1), &[value]) if port == PCI_RESET_PORT => self.write_reset_control(value),
            (Some(lane @ PORT_DATA_OFFSET..), _)
                if data.len() <= usize::from(PORT_RANGE_LEN - lane) =>
            {
                if let Some(at) = self.port_config_address(lane - PORT_DATA_OFFSET) {
                    self.config_write(at, data);
                }
            }
            _ => tracing::debug!(
                port,
                len = data.len(),
                "pci: unsupported port write dropped"
            ),
        }
    }
}

impl MmioDevice for PciRoot {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        if let Some(at) = Self::ecam_address(addr) {
            self.config_read(at, data);
        } else {
            tracing::debug!(addr, "pci: read outside ECAM");
            data.fill(0xff);
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        if let Some(at) = Self::ecam_address(addr) {
            self.config_write(at, data);
        } else {
            tracing::debug!(addr, "pci: write outside ECAM dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::fake_platform::RecordingPlatform;
    use crate::devices::pci_config::BarKind;

    const DATA: u16 = PCI_CONFIG_PORT + 4;

    fn root() -> (PciRoot, Arc<RecordingPlatform>) {
        let platform = Arc::new(RecordingPlatform::default());
        (PciRoot::new(platform.clone()), platform)
    }

    fn cf8(bus: u32, device: u32, function: u32, reg: u32) -> u32 {
        ADDRESS_ENABLE | (bus << 16) | (device << 11) | (function << 8) | reg
    }

    fn ecam(device: u64, function: u64, reg: u64) -> u64 {
        ECAM_START + (device << 15) + (function << 12) + reg
    }

    fn port_read(root: &mut PciRoot, address: u32, port: u16, len: usize) -> u64 {
        PioDevice::write(root, PCI_CONFIG_PORT, &address.to_le_bytes());
        let mut buf = vec![0u8; len];
        PioDevice::read(root, port, &mut buf);
        read_le(&buf)
    }

    fn mmio_read(root: &mut PciRoot, addr: u64, len: usize) -> u64 {
        let mut buf = vec![0u8; len];
        MmioDevice::read(root, addr, &mut buf);
        read_le(&buf)
    }

    #[test]
    fn host_bridge_ids_agree_through_ports_and_ecam() {
        let (mut root, _) = root();
        assert_eq!(port_read(&mut root, cf8(0, 0, 0, 0), DATA, 4), 0x0008_1b36);
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 0), 4), 0x0008_1b36);
        assert_eq!(
            port_read(&mut root, cf8(0, 0, 0, 8), DATA, 4) >> 8,
            0x06_00_00
        );
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 8), 4) >> 8, 0x06_00_00);
        assert_eq!(
            (mmio_read(&mut root, ecam(0, 0, 0xc), 4) >> 16) & 0xff,
            0,
            "header type 0"
        );
    }

    #[test]
    fn narrow_and_unaligned_accesses_pick_the_right_bytes() {
        let (mut root, _) = root();
        assert_eq!(port_read(&mut root, cf8(0, 0, 0, 0), DATA + 2, 2), 0x0008);
        assert_eq!(port_read(&mut root, cf8(0, 0, 0, 0), DATA + 1, 1), 0x1b);
        assert_eq!(port_read(&mut root, cf8(0, 0, 0, 0), DATA + 1, 2), 0x081b);
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 1), 2), 0x081b);
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 3), 1), 0x00);
        // An 8-byte ECAM load spans two dwords: IDs then command/status.
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 0), 8), 0x0008_1b36);
        // A data-port access running past 0xCFF and the address port at a narrow width.
        assert_eq!(
            port_read(&mut root, cf8(0, 0, 0, 0), DATA + 2, 4),
            u64::from(u32::MAX)
        );
        let mut two = [0u8; 2];
        PioDevice::read(&mut root, PCI_CONFIG_PORT, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        // An ECAM access crossing into the next function reads all-ones.
        assert_eq!(
            mmio_read(&mut root, ecam(0, 0, 0xffe), 4),
            u64::from(u32::MAX)
        );
    }

    #[test]
    fn address_register_reads_back_without_reserved_bits() {
        let (mut root, _) = root();
        PioDevice::write(&mut root, PCI_CONFIG_PORT, &0xffff_ffffu32.to_le_bytes());
        let mut buf = [0u8; 4];
        PioDevice::read(&mut root, PCI_CONFIG_PORT, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 0x80ff_fffc);
    }

    #[test]
    fn empty_slots_other_functions_and_disabled_address_read_all_ones() {
        let (mut root, _) = root();
        let ones = u64::from(u32::MAX);
        assert_eq!(port_read(&mut root, cf8(0, 3, 0, 0), DATA, 4), ones);
        assert_eq!(port_read(&mut root, cf8(0, 0, 1, 0), DATA, 4), ones);
        assert_eq!(
            port_read(&mut root, cf8(0, 0, 0, 0) & !ADDRESS_ENABLE, DATA, 4),
            ones
        );
        assert_eq!(mmio_read(&mut root, ecam(31, 7, 0xffc), 4), ones);
        assert_eq!(mmio_read(&mut root, ECAM_START + ECAM_SIZE, 4), ones);
        assert_eq!(mmio_read(&mut root, 0, 8), u64::MAX);
    }

    #[test]
    fn buses_other_than_0_read_all_ones() {
        let (mut root, _) = root();
        assert_eq!(
            port_read(&mut root, cf8(1, 0, 0, 0), DATA, 4),
            u64::from(u32::MAX)
        );
        assert_eq!(port_read(&mut root, cf8(255, 0, 0, 0), DATA, 2), 0xffff);
    }

    #[test]
    fn writes_to_read_only_fields_are_ignored_and_command_bits_stick() {
        let (mut root, _) = root();
        MmioDevice::write(&mut root, ecam(0, 0, 0), &[0; 4]);
        PioDevice::write(&mut root, PCI_CONFIG_PORT, &cf8(0, 0, 0, 8).to_le_bytes());
        PioDevice::write(&mut root, DATA, &[0; 4]);
        MmioDevice::write(&mut root, ecam(0, 0, 0x10), &[0xff; 4]);
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 0), 4), 0x0008_1b36);
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 8), 4) >> 8, 0x06_00_00);
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 0x10), 4), 0, "no BARs");
        // Command: memory + bus master through a 2-byte port write; only writable bits stay.
        PioDevice::write(&mut root, PCI_CONFIG_PORT, &cf8(0, 0, 0, 4).to_le_bytes());
        PioDevice::write(&mut root, DATA, &0xfffeu16.to_le_bytes());
        assert_eq!(mmio_read(&mut root, ecam(0, 0, 4), 2), 0x0546);
    }

    #[test]
    fn cf9_with_system_and_cpu_reset_bits_requests_reboot() {
        let (mut root, platform) = root();
        PioDevice::write(&mut root, PCI_RESET_PORT, &[RESET_SYSTEM]);
        assert!(platform.exits().is_empty());
        let mut b = [0u8; 1];
        PioDevice::read(&mut root, PCI_RESET_PORT, &mut b);
        assert_eq!(b, [RESET_SYSTEM]);
        PioDevice::write(&mut root, PCI_RESET_PORT, &[RESET_SYSTEM | RESET_CPU]);
        assert_eq!(platform.exits(), vec![GuestExit::Reboot]);
    }

    #[test]
    fn cf9_cpu_bit_alone_or_in_a_wide_write_does_not_reset() {
        let (mut root, platform) = root();
        PioDevice::write(&mut root, PCI_RESET_PORT, &[RESET_CPU]);
        PioDevice::write(&mut root, PCI_RESET_PORT, &[0x06, 0]);
        assert!(platform.exits().is_empty());
    }

    /// A function that records what it was asked.
    struct Probe(Arc<Mutex<Vec<(u16, u32, u8)>>>);

    impl PciFunction for Probe {
        fn read_config(&mut self, reg: u16) -> u32 {
            u32::from(reg) | 0xab00_0000
        }
        fn write_config(&mut self, reg: u16, value: u32, byte_enable: u8) {
            self.0.lock().unwrap().push((reg, value, byte_enable));
        }
    }

    #[test]
    fn added_function_gets_dword_registers_with_byte_enables() {
        let (mut root, _) = root();
        let log = Arc::new(Mutex::new(Vec::new()));
        root.add_function(5, Box::new(Probe(log.clone()))).unwrap();
        assert_eq!(mmio_read(&mut root, ecam(5, 0, 0x102), 2), 0xab00);
        MmioDevice::write(&mut root, ecam(5, 0, 0x43), &[1, 2]);
        PioDevice::write(
            &mut root,
            PCI_CONFIG_PORT,
            &cf8(0, 5, 0, 0x3c).to_le_bytes(),
        );
        PioDevice::write(&mut root, DATA + 1, &[7]);
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                (0x40, 0x0100_0000, 0b1000),
                (0x44, 0x0000_0002, 0b0001),
                (0x3c, 0x0000_0700, 0b0010),
            ]
        );
    }

    #[test]
    fn add_function_refuses_taken_and_missing_slots() {
        let (mut root, _) = root();
        let bridge = || Box::new(ConfigSpace::new(&HOST_BRIDGE_IDS));
        assert_eq!(
            root.add_function(0, bridge()),
            Err(AddFunctionError::SlotTaken(0))
        );
        assert_eq!(
            root.add_function(32, bridge()),
            Err(AddFunctionError::DeviceNumber(32))
        );
        root.add_function(31, bridge()).unwrap();
        assert_eq!(
            root.add_function(31, bridge()),
            Err(AddFunctionError::SlotTaken(31))
        );
    }

    #[test]
    fn bar_sizing_works_through_the_root() {
        let (mut root, _) = root();
        let mut space = ConfigSpace::new(&HOST_BRIDGE_IDS);
        space
            .add_bar(
                0,
                BarKind::Memory32 {
                    prefetchable: false,
                },
                0x1000,
            )
            .unwrap();
        root.add_function(1, Box::new(space)).unwrap();
        MmioDevice::write(&mut root, ecam(1, 0, 0x10), &[0xff; 4]);
        assert_eq!(mmio_read(&mut root, ecam(1, 0, 0x10), 4), 0xffff_f000);
    }

    #[test]
    fn every_port_width_and_offset_is_survived() {
        let (mut root, platform) = root();
        for address in [0, cf8(0, 0, 0, 0xfc), cf8(0, 31, 7, 0xfc), u32::MAX] {
            for port in PCI_CONFIG_PORT..PCI_CONFIG_PORT + PORT_RANGE_LEN {
                for len in [1usize, 2, 4] {
                    PioDevice::write(&mut root, PCI_CONFIG_PORT, &address.to_le_bytes());
                    let mut buf = vec![0u8; len];
                    PioDevice::read(&mut root, port, &mut buf);
                    if port != PCI_RESET_PORT {
                        PioDevice::write(&mut root, port, &vec![0xffu8; len]);
                    }
                }
            }
        }
        assert!(platform.exits().is_empty());
    }
}
