//! The PCI side of a virtio function: its configuration space (type 0 header, BAR0, the
//! virtio capabilities of §4.1.4 and MSI-X), BAR decoding, and the `VIRTIO_PCI_CAP_PCI_CFG`
//! access window into BAR0.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use proto::device::DeviceInfo;

use super::common::COMMON_LEN;
use super::{
    BAR_SIZE, COMMON_OFFSET, DEVICE_OFFSET, ISR_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_MULTIPLIER, NOTIFY_OFFSET, TransportError, VirtioPci,
};
use crate::devices::pci::PciFunction;
use crate::devices::pci_config::{BarKind, ConfigSetupError, ConfigSpace, PciIds};

/// Red Hat's virtio vendor ID.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device type (§4.1.2.1).
const MODERN_DEVICE_ID_BASE: u16 = 0x1040;
/// Highest virtio device type a modern PCI ID can name (0x107f).
pub(super) const MAX_DEVICE_TYPE: u16 = 0x3f;
/// §4.1.2.1: non-transitional devices SHOULD have a subsystem ID of 0x40 or higher.
const SUBSYSTEM_ID: u16 = 0x40;

/// Configuration-space registers.
const REG_COMMAND_STATUS: u16 = 0x04;
const REG_BAR0: u16 = 0x10;
const REG_BAR1: u16 = 0x14;
const REG_CAP_POINTER: u16 = 0x34;
const COMMAND_MEMORY: u16 = 0x2;
/// Command bits a guest may set and status bits it clears by writing one (as the rest of the
/// root's functions; see `pci_config`).
const COMMAND_WRITABLE: u32 = 0x0547;
const STATUS_CLEAR_ON_WRITE: u32 = 0xf900 << 16;
/// Status: the function has a capabilities list.
const STATUS_CAP_LIST: u32 = 0x0010 << 16;

/// Capability placement in configuration space.
const CAP_COMMON: u16 = 0x40;
const CAP_NOTIFY: u16 = 0x50;
const CAP_ISR: u16 = 0x64;
const CAP_DEVICE: u16 = 0x74;
const CAP_PCI_CFG: u16 = 0x84;
const CAP_MSIX: u16 = 0x98;
/// `virtio_pci_cfg_cap` fields: BAR byte, offset, length, data.
const PCI_CFG_BAR: u16 = CAP_PCI_CFG + 4;
const PCI_CFG_OFFSET: u16 = CAP_PCI_CFG + 8;
const PCI_CFG_LENGTH: u16 = CAP_PCI_CFG + 12;
const PCI_CFG_DATA: u16 = CAP_PCI_CFG + 16;
/// Capability IDs and virtio structure types (§4.1.4).
const CAP_ID_VENDOR: u32 = 0x09;
const CAP_ID_MSIX: u32 = 0x11;
const CFG_TYPE_COMMON: u32 = 1;
const CFG_TYPE_NOTIFY: u32 = 2;
const CFG_TYPE_ISR: u32 = 3;
const CFG_TYPE_DEVICE: u32 = 4;
const CFG_TYPE_PCI: u32 = 5;
/// MSI-X message control: enable and function mask (in the capability's first dword).
const MSIX_ENABLE: u32 = 1 << 31;
const MSIX_FUNCTION_MASK: u32 = 1 << 30;

/// The PCI class code for a virtio device type.
fn class_of(device_type: u16) -> u32 {
    match device_type {
        2 => 0x01_80_00,  // block: mass storage, other
        1 => 0x02_00_00,  // network: ethernet
        16 => 0x03_80_00, // GPU: display, other
        18 => 0x09_80_00, // input: input device, other (as QEMU's virtio-input-pci)
        _ => 0xff_00_00,
    }
}

fn dword(bytes: [u8; 4]) -> u32 {
    u32::from_le_bytes(bytes)
}

/// Writes a `virtio_pci_cap` at `at` (§4.1.4): the structure of `cfg_type` at
/// `offset..offset+length` of BAR0, with `extra` as a fifth dword.
fn virtio_cap(
    space: &mut ConfigSpace,
    at: u16,
    next: u16,
    cfg_type: u32,
    window: (u64, u64),
    extra: Option<u32>,
) -> Result<(), ConfigSetupError> {
    let len: u32 = if extra.is_some() { 20 } else { 16 };
    let next = u32::from(next);
    let offset = u32::try_from(window.0).map_err(|_| ConfigSetupError::Register(at))?;
    let length = u32::try_from(window.1).map_err(|_| ConfigSetupError::Register(at))?;
    let reg = |n: u16| at.checked_add(n).ok_or(ConfigSetupError::Register(at));
    space.set_register(
        at,
        CAP_ID_VENDOR | next << 8 | len << 16 | cfg_type << 24,
        0,
        0,
    )?;
    space.set_register(reg(4)?, 0, 0, 0)?; // bar 0, id 0
    space.set_register(reg(8)?, offset, 0, 0)?;
    space.set_register(reg(12)?, length, 0, 0)?;
    if let Some(extra) = extra {
        space.set_register(reg(16)?, extra, 0, 0)?;
    }
    Ok(())
}

impl VirtioPci {
    pub(super) fn config_space(
        info: &DeviceInfo,
        vectors: u16,
        bar_address: u64,
    ) -> Result<ConfigSpace, TransportError> {
        let device = MODERN_DEVICE_ID_BASE
            .checked_add(info.device_type)
            .ok_or(TransportError::DeviceType(info.device_type))?;
        let mut space = ConfigSpace::new(&PciIds {
            vendor: VIRTIO_VENDOR,
            device,
            class: class_of(info.device_type),
            revision: 1,
            header_type: 0,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: SUBSYSTEM_ID,
        });
        space.set_register(
            REG_COMMAND_STATUS,
            STATUS_CAP_LIST | u32::from(COMMAND_MEMORY),
            COMMAND_WRITABLE,
            STATUS_CLEAR_ON_WRITE,
        )?;
        space.set_register(REG_CAP_POINTER, u32::from(CAP_COMMON), 0, 0)?;
        space.add_bar(
            0,
            BarKind::Memory64 {
                prefetchable: false,
            },
            BAR_SIZE,
        )?;
        space.write(
            REG_BAR0,
            u32::try_from(bar_address & 0xffff_ffff).unwrap_or(0),
            0xf,
        );
        space.write(REG_BAR1, u32::try_from(bar_address >> 32).unwrap_or(0), 0xf);

        let config_len = u64::try_from(info.config.len()).unwrap_or(0);
        let after_isr = if config_len > 0 {
            CAP_DEVICE
        } else {
            CAP_PCI_CFG
        };
        let notify_len = u64::from(info.queues) * u64::from(NOTIFY_MULTIPLIER);
        virtio_cap(
            &mut space,
            CAP_COMMON,
            CAP_NOTIFY,
            CFG_TYPE_COMMON,
            (COMMON_OFFSET, COMMON_LEN),
            None,
        )?;
        virtio_cap(
            &mut space,
            CAP_NOTIFY,
            CAP_ISR,
            CFG_TYPE_NOTIFY,
            (NOTIFY_OFFSET, notify_len),
            Some(NOTIFY_MULTIPLIER),
        )?;
        virtio_cap(
            &mut space,
            CAP_ISR,
            after_isr,
            CFG_TYPE_ISR,
            (ISR_OFFSET, 1),
            None,
        )?;
        if config_len > 0 {
            virtio_cap(
                &mut space,
                CAP_DEVICE,
                CAP_PCI_CFG,
                CFG_TYPE_DEVICE,
                (DEVICE_OFFSET, config_len),
                None,
            )?;
        }
        // The configuration access window (§4.1.4.9): bar, offset, length and data writable.
        virtio_cap(
            &mut space,
            CAP_PCI_CFG,
            CAP_MSIX,
            CFG_TYPE_PCI,
            (0, 0),
            Some(0),
        )?;
        space.set_register(PCI_CFG_BAR, 0, 0xff, 0)?;
        space.set_register(PCI_CFG_OFFSET, 0, u32::MAX, 0)?;
        space.set_register(PCI_CFG_LENGTH, 0, u32::MAX, 0)?;
        // MSI-X (PCI 3.0 §6.8.2): table size N-1, table and PBA in BAR 0.
        space.set_register(
            CAP_MSIX,
            CAP_ID_MSIX | (u32::from(vectors.saturating_sub(1)) << 16),
            MSIX_ENABLE | MSIX_FUNCTION_MASK,
            0,
        )?;
        let table = u32::try_from(MSIX_TABLE_OFFSET).unwrap_or(0);
        let pba = u32::try_from(MSIX_PBA_OFFSET).unwrap_or(0);
        space.set_register(CAP_MSIX + 4, table, 0, 0)?;
        space.set_register(CAP_MSIX + 8, pba, 0, 0)?;
        Ok(space)
    }

    /// The function to put on the PCI root (it shares this transport with the MMIO side).
    pub fn pci_function(this: &Arc<Mutex<VirtioPci>>) -> Box<dyn PciFunction> {
        Box::new(VirtioPciFunction(this.clone()))
    }

    /// Re-reads the command register and BAR0 after a configuration write: a BAR the guest
    /// moved or whose decoding it switched takes its ioeventfds along.
    pub(super) fn update_decode(&mut self) {
        let decode = self.space.command() & COMMAND_MEMORY != 0;
        let new = self
            .space
            .bar_address(0)
            .filter(|&at| decode && at != 0 && at.checked_add(BAR_SIZE).is_some());
        if new != self.bar() {
            tracing::debug!(bar = ?new, "virtio-pci: BAR0 decode changed");
            self.decoded.store(new.unwrap_or(0), Ordering::Release);
            self.sync_ioeventfds();
        }
    }

    /// A configuration-space read of the dword at `reg`.
    fn config_read(&mut self, reg: u16) -> u32 {
        if reg == PCI_CFG_DATA {
            return self.window_access(None).unwrap_or(0);
        }
        self.space.read(reg)
    }

    /// A configuration-space write.
    fn config_write(&mut self, reg: u16, value: u32, byte_enable: u8) {
        if reg == PCI_CFG_DATA {
            self.window_access(Some(value));
            return;
        }
        self.space.write(reg, value, byte_enable);
        match reg {
            REG_COMMAND_STATUS | REG_BAR0 | REG_BAR1 => self.update_decode(),
            CAP_MSIX => {
                let control = self.space.read(CAP_MSIX);
                self.msix.set_control(
                    control & MSIX_ENABLE != 0,
                    control & MSIX_FUNCTION_MASK != 0,
                );
                self.sync_irqfds();
            }
            _ => {}
        }
    }

    /// The configuration access window (§4.1.4.9): an access of `length` (1, 2 or 4) bytes
    /// at `offset` of BAR `bar` through `pci_cfg_data`. A read returns the bytes in the low
    /// lanes; a write takes the low `length` bytes of `value`.
    fn window_access(&mut self, write: Option<u32>) -> Option<u32> {
        let bar = self.space.read(PCI_CFG_BAR) & 0xff;
        let offset = u64::from(self.space.read(PCI_CFG_OFFSET));
        let length = usize::try_from(self.space.read(PCI_CFG_LENGTH)).ok()?;
        if bar != 0 || !matches!(length, 1 | 2 | 4) || !offset.is_multiple_of(length as u64) {
            tracing::debug!(
                bar,
                offset,
                length,
                "virtio-pci: bad configuration window access"
            );
            return None;
        }
        if let Some(value) = write {
            let bytes = value.to_le_bytes();
            self.bar_write(offset, bytes.get(..length)?);
            return None;
        }
        let mut bytes = [0u8; 4];
        self.bar_read(offset, bytes.get_mut(..length)?);
        Some(dword(bytes))
    }
}

/// The PCI side of a shared transport (the root owns a `Box<dyn PciFunction>`).
struct VirtioPciFunction(Arc<Mutex<VirtioPci>>);

impl PciFunction for VirtioPciFunction {
    fn read_config(&mut self, reg: u16) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .config_read(reg)
    }

    fn write_config(&mut self, reg: u16, value: u32, byte_enable: u8) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .config_write(reg, value, byte_enable);
    }
}
