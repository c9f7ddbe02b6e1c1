//! The MSI-X table (PCI Local Bus 3.0 §6.8.2): one 16-byte entry per vector (message
//! address low/high, data, vector control) and the capability's enable and function-mask bits.
//!
//! Pure state; the transport turns it into KVM routes and irqfd registrations. The pending
//! bit array is not stored: a masked vector is pending while one of its interrupt sources'
//! eventfds holds a count, which the transport checks when the PBA is read.

/// Bytes per table entry.
pub(super) const ENTRY_BYTES: u64 = 16;
/// Vector control bit 0: the entry is masked.
const ENTRY_MASKED: u32 = 1;

/// One entry's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    /// Every entry starts masked (§6.8.2.9).
    fn default() -> Entry {
        Entry {
            address_lo: 0,
            address_hi: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

/// An MSI message: where the device writes, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Whether an access of `len` bytes at `offset` is an aligned dword or qword (§6.8.2: the
/// table is accessed only so).
fn aligned(offset: u64, len: usize) -> bool {
    match len {
        4 => offset.is_multiple_of(4),
        8 => offset.is_multiple_of(8),
        _ => false,
    }
}

/// The table and the capability's control bits.
#[derive(Debug)]
pub(super) struct Msix {
    entries: Vec<Entry>,
    enabled: bool,
    function_mask: bool,
}

impl Msix {
    pub fn new(vectors: u16) -> Msix {
        Msix {
            entries: vec![Entry::default(); usize::from(vectors)],
            enabled: false,
            function_mask: false,
        }
    }

    /// Sets the capability's `MSI-X Enable` and `Function Mask` bits.
    pub fn set_control(&mut self, enabled: bool, function_mask: bool) {
        self.enabled = enabled;
        self.function_mask = function_mask;
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `vector` may not fire now: MSI-X off, the function masked, the entry masked,
    /// or no such entry.
    pub fn masked(&self, vector: u16) -> bool {
        !self.enabled
            || self.function_mask
            || self
                .entries
                .get(usize::from(vector))
                .is_none_or(|e| e.control & ENTRY_MASKED != 0)
    }

    /// The message entry `vector` holds.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries.get(usize::from(vector)).map(|e| MsiMessage {
            address: (u64::from(e.address_hi) << 32) | u64::from(e.address_lo),
            data: e.data,
        })
    }

    /// The dword at byte `offset` of the table, if it exists.
    fn dword(&mut self, offset: u64) -> Option<&mut u32> {
        let entry = self
            .entries
            .get_mut(usize::try_from(offset / ENTRY_BYTES).ok()?)?;
        match offset % ENTRY_BYTES {
            0 => Some(&mut entry.address_lo),
            4 => Some(&mut entry.address_hi),
            8 => Some(&mut entry.data),
            12 => Some(&mut entry.control),
            _ => None,
        }
    }

    /// A driver read at `offset` of the table: aligned dwords and qwords (§6.8.2); anything
    /// else reads zero.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            return;
        }
        for (at, chunk) in (0u64..).zip(data.chunks_mut(4)) {
            if let Some(&mut value) = offset.checked_add(at * 4).and_then(|at| self.dword(at)) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
    }

    /// A driver write at `offset` of the table; returns the vector it touched, if any.
    /// Only bit 0 of vector control is writable.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u16> {
        if !aligned(offset, data.len()) {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-pci: MSI-X table write dropped"
            );
            return None;
        }
        let mut touched = None;
        for (i, chunk) in (0u64..).zip(data.chunks(4)) {
            let Some(at) = offset.checked_add(i * 4) else {
                break;
            };
            let mut bytes = [0u8; 4];
            for (b, c) in bytes.iter_mut().zip(chunk) {
                *b = *c;
            }
            let value = u32::from_le_bytes(bytes);
            let control = at % ENTRY_BYTES == 12;
            if let Some(slot) = self.dword(at) {
                *slot = if control { value & ENTRY_MASKED } else { value };
                touched = u16::try_from(at / ENTRY_BYTES).ok();
            }
        }
        touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write32(m: &mut Msix, offset: u64, value: u32) -> Option<u16> {
        m.write(offset, &value.to_le_bytes())
    }

    #[test]
    fn entries_start_masked_and_unmask_only_when_enabled_and_not_function_masked() {
        let mut m = Msix::new(2);
        assert!(m.masked(0));
        write32(&mut m, 12, 0);
        assert!(m.masked(0), "MSI-X still disabled");
        m.set_control(true, true);
        assert!(m.masked(0), "function mask");
        m.set_control(true, false);
        assert!(!m.masked(0));
        assert!(m.masked(1));
        assert!(m.masked(2), "no such vector");
    }

    #[test]
    fn message_is_assembled_from_dword_and_qword_writes() {
        let mut m = Msix::new(2);
        assert_eq!(write32(&mut m, 16, 0xfee0_1000), Some(1));
        write32(&mut m, 20, 0x1);
        write32(&mut m, 24, 0x4021);
        assert_eq!(
            m.message(1),
            Some(MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4021
            })
        );
        assert_eq!(m.write(0, &0x0000_0000_fee0_0000u64.to_le_bytes()), Some(0));
        assert_eq!(m.message(0).unwrap().address, 0xfee0_0000);
        let mut buf = [0u8; 8];
        m.read(16, &mut buf);
        assert_eq!(u64::from_le_bytes(buf), 0x1_fee0_1000);
    }

    #[test]
    fn reserved_control_bits_stay_zero() {
        let mut m = Msix::new(1);
        write32(&mut m, 12, 0xffff_fffe);
        let mut buf = [0u8; 4];
        m.read(12, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 0);
    }

    #[test]
    fn misaligned_narrow_and_outside_accesses_are_dropped() {
        let mut m = Msix::new(1);
        assert_eq!(m.write(2, &[1, 2, 3, 4]), None);
        assert_eq!(m.write(0, &[1, 2]), None);
        assert_eq!(m.write(4, &[0; 8]), None);
        assert_eq!(write32(&mut m, 16, 1), None);
        assert_eq!(write32(&mut m, u64::MAX - 3, 1), None);
        let mut buf = [0xaau8; 2];
        m.read(12, &mut buf);
        assert_eq!(buf, [0, 0]);
        let mut buf = [0xaau8; 4];
        m.read(u64::MAX - 3, &mut buf);
        assert_eq!(buf, [0; 4]);
        assert_eq!(m.message(0).unwrap().address, 0);
    }
}
