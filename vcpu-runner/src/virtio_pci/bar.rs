//! BAR0 as the driver sees it: the common configuration, ISR, device configuration,
//! notify and MSI-X regions at their fixed offsets, reached by MMIO at absolute addresses.

use proto::device::ToDevice;

use super::common::{COMMON_LEN, Effect};
use super::msix::ENTRY_BYTES;
use super::{
    BAR_SIZE, COMMON_OFFSET, DEVICE_OFFSET, ISR_LEN, ISR_OFFSET, MSIX_PBA_LEN, MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, SelectedTable, VirtioPci,
};
use crate::devices::MmioDevice;

impl VirtioPci {
    /// The region of BAR0 an access of `len` bytes at `offset` lies in, and the offset in it.
    fn region(&self, offset: u64, len: usize) -> Option<(Region, u64)> {
        let len = u64::try_from(len).ok().filter(|&l| (1..=8).contains(&l))?;
        let config_len = u64::try_from(self.info.config.len()).ok()?;
        let notify_len = u64::from(self.info.queues) * u64::from(NOTIFY_MULTIPLIER);
        let table_len = u64::try_from(self.gsis.len()).ok()? * ENTRY_BYTES;
        let regions = [
            (Region::Common, COMMON_OFFSET, COMMON_LEN),
            (Region::Isr, ISR_OFFSET, ISR_LEN),
            (Region::Device, DEVICE_OFFSET, config_len),
            (Region::Notify, NOTIFY_OFFSET, notify_len),
            (Region::MsixTable, MSIX_TABLE_OFFSET, table_len),
            (Region::MsixPba, MSIX_PBA_OFFSET, MSIX_PBA_LEN),
        ];
        let end = offset.checked_add(len)?;
        regions.into_iter().find_map(|(region, start, size)| {
            let rel = offset.checked_sub(start)?;
            (end <= start.checked_add(size)?).then_some((region, rel))
        })
    }

    /// A driver load of `data.len()` bytes at `offset` of BAR0.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((region, rel)) = self.region(offset, data.len()) else {
            tracing::debug!(offset, len = data.len(), "virtio-pci: BAR read of nothing");
            return;
        };
        match region {
            Region::Common => {
                self.common.read(rel, data);
                let status_at = 0x14u64
                    .checked_sub(rel)
                    .and_then(|i| usize::try_from(i).ok());
                if let Some(slot) = status_at.and_then(|i| data.get_mut(i))
                    && let Some(status) = self.poll_pending_reset()
                {
                    *slot = status;
                }
            }
            Region::Isr => {
                // §4.1.4.5.1: reading the ISR clears it.
                if rel == 0
                    && let Some(first) = data.first_mut()
                {
                    *first = std::mem::take(&mut self.isr);
                }
            }
            Region::Device => {
                let start = usize::try_from(rel).unwrap_or(usize::MAX);
                if let Some(t) = &self.table {
                    for (i, slot) in data.iter_mut().enumerate() {
                        *slot = t.byte(start.saturating_add(i));
                    }
                    return;
                }
                for (slot, byte) in data.iter_mut().zip(self.info.config.iter().skip(start)) {
                    *slot = *byte;
                }
            }
            Region::Notify => {}
            Region::MsixTable => self.msix.read(rel, data),
            Region::MsixPba => {
                let bits = self.pending_bits().to_le_bytes();
                let start = usize::try_from(rel).unwrap_or(usize::MAX);
                for (slot, byte) in data.iter_mut().zip(bits.iter().skip(start)) {
                    *slot = *byte;
                }
            }
        }
    }

    /// A driver store of `data` at `offset` of BAR0.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let Some((region, rel)) = self.region(offset, data.len()) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-pci: BAR write to nothing dropped"
            );
            return;
        };
        match region {
            Region::Common => {
                if self.reset_pending.is_some() {
                    tracing::debug!(rel, "virtio-pci: write during a pending reset dropped");
                    return;
                }
                match self.common.write(rel, data) {
                    Effect::None => {}
                    Effect::Reset { previous } => self.reset(previous),
                    Effect::DriverOk => self.activate(),
                    Effect::ConfigVector | Effect::QueueVector(_) => self.sync_irqfds(),
                }
            }
            Region::Device => {
                if let Some(t) = self.table.as_mut() {
                    // The selectors are the runner's own: nothing goes to the device.
                    let start = usize::try_from(rel).unwrap_or(usize::MAX);
                    for (i, byte) in data.iter().enumerate() {
                        t.write(start.saturating_add(i), *byte);
                    }
                    return;
                }
                let msg = ToDevice::ConfigWrite {
                    offset: u16::try_from(rel).unwrap_or(u16::MAX),
                    data: data.to_vec(),
                };
                self.send(&msg, &[]);
            }
            Region::Notify => self.notify(rel),
            Region::MsixTable => {
                if self.msix.write(rel, data).is_some() {
                    self.sync_irqfds();
                }
            }
            Region::Isr | Region::MsixPba => {
                tracing::debug!(rel, "virtio-pci: write to a read-only register dropped");
            }
        }
    }

    /// A notify write that reached the runner: no ioeventfd caught it (the BAR just moved,
    /// or registering failed). An activated queue gets the kick by hand; before activation a
    /// notify means nothing (§3.1.1: the driver notifies only after `DRIVER_OK`).
    fn notify(&self, rel: u64) {
        let index = u16::try_from(rel / u64::from(NOTIFY_MULTIPLIER)).unwrap_or(u16::MAX);
        if !rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) || self.live().is_none() {
            return;
        }
        if let Some(q) = self.queue(index)
            && let Err(e) = q.kick.write(1)
        {
            tracing::warn!(index, error = %e, "virtio-pci: forwarding a kick failed");
        }
    }

    /// BAR0's offset of an absolute address, if BAR0 is decoded there for `len` bytes.
    fn bar_offset(&self, addr: u64, len: usize) -> Option<u64> {
        let rel = addr.checked_sub(self.bar()?)?;
        let end = rel.checked_add(u64::try_from(len).ok()?)?;
        (end <= BAR_SIZE).then_some(rel)
    }
}

/// `virtio_input_config` (§5.8.4): `select`, `subsel`, `size`, five reserved bytes, `u`.
const SELECT_AT: usize = 0;
const SUBSEL_AT: usize = 1;
const SIZE_AT: usize = 2;
const PAYLOAD_AT: usize = 8;

impl SelectedTable {
    /// The answer to the current selector, if the device has one.
    fn current(&self) -> Option<&[u8]> {
        self.table.lookup(self.select, self.subsel)
    }

    /// Byte `at` of the configuration space for the current selector; an unknown selector
    /// reads as size 0 and a zero payload (§5.8.4).
    pub(super) fn byte(&self, at: usize) -> u8 {
        match at {
            SELECT_AT => self.select,
            SUBSEL_AT => self.subsel,
            SIZE_AT => self
                .current()
                .map_or(0, |d| u8::try_from(d.len()).unwrap_or(0)),
            _ => at
                .checked_sub(PAYLOAD_AT)
                .and_then(|i| self.current()?.get(i).copied())
                .unwrap_or(0),
        }
    }

    /// A driver store of `byte` at `at`: only `select` and `subsel` are writable (§5.8.4).
    fn write(&mut self, at: usize, byte: u8) {
        match at {
            SELECT_AT => self.select = byte,
            SUBSEL_AT => self.subsel = byte,
            _ => tracing::debug!(at, "virtio-pci: write to a read-only input config byte"),
        }
    }
}

/// BAR0's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    Common,
    Isr,
    Device,
    Notify,
    MsixTable,
    MsixPba,
}

/// Guest MMIO at absolute addresses: only what falls in the decoded BAR0 is answered.
impl MmioDevice for VirtioPci {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        match self.bar_offset(addr, data.len()) {
            Some(offset) => self.bar_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        if let Some(offset) = self.bar_offset(addr, data.len()) {
            self.bar_write(offset, data);
        }
    }
}
