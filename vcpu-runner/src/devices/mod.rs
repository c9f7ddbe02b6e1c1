//! The platform devices the runner emulates in-process, and the buses that route guest port
//! and MMIO accesses to them.
//!
//! Every device here is a pure state machine: it sees an access (absolute port or address,
//! the bytes) and changes its state; what it needs from the machine — an interrupt line, a
//! guest exit — goes through [`Platform`], so unit tests drive it with a recording fake and
//! no KVM. The guest is hostile: any port, width or value may arrive. A device never panics
//! on an access; what it does not understand reads as all-ones and is logged at debug level.

use std::sync::{Arc, Mutex};

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod pci;
pub mod pci_config;
pub mod serial;

mod access;
#[cfg(test)]
mod fake_platform;

use proto::runner::GuestExit;

/// What a device may ask of the machine it is part of.
pub trait Platform: Send + Sync {
    /// Drives the interrupt line `gsi` (an IOAPIC/PIC input) to `level`.
    fn set_irq(&self, gsi: u32, level: bool);
    /// Ends the guest: every vCPU stops and the runner reports `exit` to the supervisor.
    /// The first request wins; later ones are ignored.
    fn request_exit(&self, exit: GuestExit);
}

/// A device reached through x86 I/O ports.
pub trait PioDevice: Send {
    /// A guest `in` of `data.len()` bytes (1, 2 or 4) at absolute `port`.
    fn read(&mut self, port: u16, data: &mut [u8]);
    /// A guest `out` of `data.len()` bytes (1, 2 or 4) at absolute `port`.
    fn write(&mut self, port: u16, data: &[u8]);
}

/// A device reached through guest-physical MMIO.
pub trait MmioDevice: Send {
    /// A guest load of `data.len()` bytes (1, 2, 4 or 8) at absolute `addr`.
    fn read(&mut self, addr: u64, data: &mut [u8]);
    /// A guest store of `data.len()` bytes (1, 2, 4 or 8) at absolute `addr`.
    fn write(&mut self, addr: u64, data: &[u8]);
}

/// Two ranges of one bus overlap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} is empty or overlaps one already inserted")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

/// An address space (ports or MMIO) mapping non-overlapping ranges to devices. One device
/// may sit at several ranges (the i8042 at 0x60 and 0x64).
pub struct Bus<D: ?Sized> {
    /// Sorted by base; ranges never overlap.
    ranges: Vec<(u64, u64, Arc<Mutex<D>>)>,
}

impl<D: ?Sized> std::fmt::Debug for Bus<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|(b, l, _)| (b, l)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus { ranges: Vec::new() }
    }
}

impl<D: ?Sized> Bus<D> {
    /// Places `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) -> Result<(), Overlap> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Overlap { base, len })?;
        if self
            .ranges
            .iter()
            .any(|&(b, l, _)| base < b.saturating_add(l) && b < end)
        {
            return Err(Overlap { base, len });
        }
        let at = self.ranges.partition_point(|&(b, _, _)| b < base);
        self.ranges.insert(at, (base, len, device));
        Ok(())
    }

    /// The device whose range holds every byte of `addr..addr+size`.
    pub fn find(&self, addr: u64, size: usize) -> Option<&Arc<Mutex<D>>> {
        let last = addr.checked_add(u64::try_from(size).ok()?.checked_sub(1)?)?;
        let at = self.ranges.partition_point(|&(b, _, _)| b <= addr);
        let (base, len, device) = self.ranges.get(at.checked_sub(1)?)?;
        (last < base.saturating_add(*len)).then_some(device)
    }
}

impl Bus<dyn PioDevice> {
    /// Routes a guest `in`; an unclaimed port reads as all-ones. Returns whether a device took it.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        if let Some(d) = self.find(u64::from(port), data.len()) {
            d.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .read(port, data);
            true
        } else {
            data.fill(0xff);
            false
        }
    }

    /// Routes a guest `out`; an unclaimed port drops it. Returns whether a device took it.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(u64::from(port), data.len()) {
            Some(d) => {
                d.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .write(port, data);
                true
            }
            None => false,
        }
    }
}

impl Bus<dyn MmioDevice> {
    /// Routes a guest load; unclaimed MMIO reads as all-ones. Returns whether a device took it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some(d) = self.find(addr, data.len()) {
            d.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .read(addr, data);
            true
        } else {
            data.fill(0xff);
            false
        }
    }

    /// Routes a guest store; unclaimed MMIO drops it. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some(d) => {
                d.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .write(addr, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(Vec<(u16, Vec<u8>)>);
    impl PioDevice for Latch {
        fn read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, port: u16, data: &[u8]) {
            self.0.push((port, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_whose_range_holds_them() {
        let mut bus: Bus<dyn PioDevice> = Bus::default();
        let dev = Arc::new(Mutex::new(Latch(Vec::new())));
        bus.insert(0x60, 1, dev.clone()).unwrap();
        bus.insert(0x64, 1, dev.clone()).unwrap();
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.write(0x62, &[1]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x60, &mut b));
        assert_eq!(b, [0x5a]);
        assert!(!bus.read(0x61, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(dev.lock().unwrap().0, vec![(0x64, vec![0xfe])]);
    }

    #[test]
    fn an_access_straddling_a_range_end_is_unclaimed() {
        let mut bus: Bus<dyn PioDevice> = Bus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Latch(Vec::new()))))
            .unwrap();
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
        assert!(bus.read(0x3fc, &mut w));
        assert!(!bus.read(0xffff, &mut w));
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus: Bus<dyn PioDevice> = Bus::default();
        let dev = Arc::new(Mutex::new(Latch(Vec::new())));
        bus.insert(0x70, 2, dev.clone()).unwrap();
        assert!(bus.insert(0x71, 1, dev.clone()).is_err());
        assert!(bus.insert(0x6f, 2, dev.clone()).is_err());
        assert!(bus.insert(0x80, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x72, 1, dev).unwrap();
    }
}
