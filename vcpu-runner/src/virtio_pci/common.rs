//! The common configuration structure (virtio 1.2 §4.1.4.3): feature negotiation, device
//! status, MSI-X vector numbers and queue setup, as a pure register state machine.
//!
//! Reads of any width and offset are served from a byte image of the registers; writes are
//! taken only at each field's natural width (§4.1.3.1: the driver uses 8/16/32-bit accesses
//! for 8/16/32-bit fields and may split a 64-bit field into two 32-bit halves) and dropped
//! otherwise. What the transport must do about a write (activate, reset, re-route an
//! interrupt) is returned as an [`Effect`]; this module never touches KVM or the device.

/// Bytes of the structure (up to and including `queue_device`; no `queue_notify_data` or
/// `queue_reset`, whose features are never offered).
pub(super) const COMMON_LEN: u64 = 0x38;

/// Device status bits (§2.1).
pub(super) const STATUS_ACKNOWLEDGE: u8 = 0x01;
pub(super) const STATUS_DRIVER: u8 = 0x02;
pub(super) const STATUS_DRIVER_OK: u8 = 0x04;
pub(super) const STATUS_FEATURES_OK: u8 = 0x08;
pub(super) const STATUS_NEEDS_RESET: u8 = 0x40;
pub(super) const STATUS_FAILED: u8 = 0x80;
/// The bits a driver sets; `DEVICE_NEEDS_RESET` is the device's.
const DRIVER_STATUS_BITS: u8 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED;

/// `VIRTIO_F_VERSION_1`: the modern interface, required here (no legacy transport).
pub(super) const F_VERSION_1: u64 = 1 << 32;
/// No MSI-X vector (§4.1.5.1.2).
pub(super) const NO_VECTOR: u16 = 0xffff;

/// Register offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Ring alignments of a split virtqueue (§2.7: descriptor table 16, driver area 2, device
/// area 4 bytes).
const DESC_ALIGN: u64 = 16;
const DRIVER_ALIGN: u64 = 2;
const DEVICE_ALIGN: u64 = 4;

/// One virtqueue as the driver set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct QueueState {
    pub size: u16,
    pub msix_vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueState {
    fn new(max_size: u16) -> QueueState {
        QueueState {
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Whether the queue may be enabled: a power-of-two size within the device's maximum
    /// (§2.7: "Queue Size value is always a power of 2") and rings that are non-zero,
    /// aligned (§2.7.1–2.7.3) and do not wrap around the address space.
    fn usable(&self, max_size: u16) -> bool {
        let size = u64::from(self.size);
        let ends = [
            self.desc.checked_add(size.saturating_mul(16)),
            self.driver
                .checked_add(size.saturating_mul(2).saturating_add(6)),
            self.device
                .checked_add(size.saturating_mul(8).saturating_add(6)),
        ];
        self.size != 0
            && self.size <= max_size
            && self.size.is_power_of_two()
            && self.desc != 0
            && self.driver != 0
            && self.device != 0
            && self.desc.is_multiple_of(DESC_ALIGN)
            && self.driver.is_multiple_of(DRIVER_ALIGN)
            && self.device.is_multiple_of(DEVICE_ALIGN)
            && ends.iter().all(Option::is_some)
    }
}

/// What the transport must do after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    None,
    /// The driver wrote 0 to `device_status`; the registers are already back to their reset
    /// values. Carries the status before the reset.
    Reset {
        previous: u8,
    },
    /// `DRIVER_OK` was accepted: activate the device.
    DriverOk,
    /// The configuration-change vector changed.
    ConfigVector,
    /// The MSI-X vector of queue `.0` changed.
    QueueVector(u16),
}

/// The common configuration registers of one device.
#[derive(Debug)]
pub(super) struct Common {
    /// Features the transport offers (the device's offer, cut to what the transport supports).
    offered: u64,
    max_queue_size: u16,
    /// MSI-X table entries; a vector at or above this is refused (read back as `NO_VECTOR`).
    vectors: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueState>,
}

/// Bits `index*32..index*32+32` of `value` (zero past bit 63).
fn half(value: u64, index: u32) -> u32 {
    let shifted = value.checked_shr(index.saturating_mul(32)).unwrap_or(0);
    u32::try_from(shifted & 0xffff_ffff).unwrap_or(0)
}

/// `value` with its 32-bit half `index` (0 low, 1 high) replaced by `part`.
fn with_half(value: u64, index: u32, part: u32) -> u64 {
    let shift = index.saturating_mul(32);
    let mask = 0xffff_ffffu64.checked_shl(shift).unwrap_or(0);
    (value & !mask) | u64::from(part).checked_shl(shift).unwrap_or(0)
}

/// The little-endian value of `data` (at most 8 bytes).
fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .rev()
        .fold(0, |value, &byte| (value << 8) | u64::from(byte))
}

impl Common {
    /// The registers after reset for a device with `queues` queues of at most `max_queue_size`
    /// entries, offering `offered` features, with `vectors` MSI-X table entries.
    pub fn new(offered: u64, queues: u16, max_queue_size: u16, vectors: u16) -> Common {
        Common {
            offered,
            max_queue_size,
            vectors,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: (0..queues)
                .map(|_| QueueState::new(max_queue_size))
                .collect(),
        }
    }

    /// Back to the reset state (§2.4): everything but the offer and the generation counter.
    fn reset(&mut self) {
        let queues = u16::try_from(self.queues.len()).unwrap_or(0);
        let generation = self.config_generation;
        *self = Common::new(self.offered, queues, self.max_queue_size, self.vectors);
        self.config_generation = generation;
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn config_msix_vector(&self) -> u16 {
        self.config_msix_vector
    }

    pub fn queues(&self) -> &[QueueState] {
        &self.queues
    }

    /// Sets `DEVICE_NEEDS_RESET` (§2.1.1).
    pub fn set_needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
    }

    /// Counts a configuration change (§4.1.4.3.1: `config_generation` changes whenever the
    /// device-specific configuration may have changed).
    pub fn bump_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The vector a driver asked for, if the table has it; otherwise `NO_VECTOR`, which tells
    /// the driver the mapping failed (§4.1.5.1.2.1).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn selected(&self) -> Option<&QueueState> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The registers as the bytes the driver reads, for the selected queue.
    fn image(&self) -> [u8; 0x38] {
        let mut image = [0u8; 0x38];
        let queue = self.selected().copied();
        let q = |f: fn(&QueueState) -> u64| queue.as_ref().map_or(0, f);
        let fields: [(u64, u64, usize); 16] = [
            (
                DEVICE_FEATURE_SELECT,
                u64::from(self.device_feature_select),
                4,
            ),
            (
                DEVICE_FEATURE,
                u64::from(half(self.offered, self.device_feature_select)),
                4,
            ),
            (
                DRIVER_FEATURE_SELECT,
                u64::from(self.driver_feature_select),
                4,
            ),
            (
                DRIVER_FEATURE,
                u64::from(half(self.driver_features, self.driver_feature_select)),
                4,
            ),
            (CONFIG_MSIX_VECTOR, u64::from(self.config_msix_vector), 2),
            (NUM_QUEUES, u64::try_from(self.queues.len()).unwrap_or(0), 2),
            (DEVICE_STATUS, u64::from(self.status), 1),
            (CONFIG_GENERATION, u64::from(self.config_generation), 1),
            (QUEUE_SELECT, u64::from(self.queue_select), 2),
            (QUEUE_SIZE, q(|s| u64::from(s.size)), 2),
            (
                QUEUE_MSIX_VECTOR,
                queue.map_or(u64::from(NO_VECTOR), |s| u64::from(s.msix_vector)),
                2,
            ),
            (QUEUE_ENABLE, q(|s| u64::from(s.enabled)), 2),
            // notify_off: each queue its own slot (the transport's multiplier spaces them).
            (
                QUEUE_NOTIFY_OFF,
                queue.map_or(0, |_| u64::from(self.queue_select)),
                2,
            ),
            (QUEUE_DESC, q(|s| s.desc), 8),
            (QUEUE_DRIVER, q(|s| s.driver), 8),
            (QUEUE_DEVICE, q(|s| s.device), 8),
        ];
        for (offset, value, len) in fields {
            let bytes = value.to_le_bytes();
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            if let (Some(slot), Some(src)) = (
                image.get_mut(start..start.saturating_add(len)),
                bytes.get(..len),
            ) {
                slot.copy_from_slice(src);
            }
        }
        image
    }

    /// A driver read of `data.len()` bytes at `offset`; bytes past the structure read zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let image = self.image();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = u64::try_from(i)
                .ok()
                .and_then(|i| offset.checked_add(i))
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| image.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A driver write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let value = le_value(data);
        let v32 = u32::try_from(value & 0xffff_ffff).unwrap_or(0);
        let v16 = u16::try_from(value & 0xffff).unwrap_or(0);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(v32),
            (CONFIG_MSIX_VECTOR, 2) => {
                self.config_msix_vector = self.checked_vector(v16);
                return Effect::ConfigVector;
            }
            (DEVICE_STATUS, 1) => return self.write_status(data.first().copied().unwrap_or(0)),
            (QUEUE_SELECT, 2) => self.queue_select = v16,
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(v16);
                let index = self.queue_select;
                if let Some(q) = self.queues.get_mut(usize::from(index)) {
                    q.msix_vector = vector;
                    return Effect::QueueVector(index);
                }
            }
            (QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC.., _) => {
                self.write_queue(offset, data.len(), value);
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-pci: common config write dropped"
            ),
        }
        Effect::None
    }

    /// §3.1.1: features are written before `FEATURES_OK` and frozen after it.
    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 || self.driver_feature_select > 1 {
            tracing::debug!(
                select = self.driver_feature_select,
                "virtio-pci: driver feature write ignored"
            );
            return;
        }
        self.driver_features = with_half(self.driver_features, self.driver_feature_select, value);
    }

    /// Queue setup fields; ignored for a queue that does not exist or is already enabled and
    /// after `DRIVER_OK` (§4.1.4.3.2: the driver configures a queue before enabling it).
    fn write_queue(&mut self, offset: u64, len: usize, value: u64) {
        let locked = self.status & STATUS_DRIVER_OK != 0;
        let max = self.max_queue_size;
        let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) else {
            tracing::debug!(offset, "virtio-pci: write to a queue that does not exist");
            return;
        };
        if q.enabled || locked {
            tracing::debug!(offset, "virtio-pci: write to an enabled queue ignored");
            return;
        }
        let v32 = u32::try_from(value & 0xffff_ffff).unwrap_or(0);
        let ring = |field: &mut u64, base: u64| match (offset.checked_sub(base), len) {
            (Some(0), 8) => *field = value,
            (Some(0), 4) => *field = with_half(*field, 0, v32),
            (Some(4), 4) => *field = with_half(*field, 1, v32),
            _ => {}
        };
        match (offset, len) {
            (QUEUE_SIZE, 2) => q.size = u16::try_from(value & 0xffff).unwrap_or(0),
            (QUEUE_ENABLE, 2) if value == 1 => {
                if q.usable(max) {
                    q.enabled = true;
                } else {
                    tracing::debug!(
                        queue = self.queue_select,
                        size = q.size,
                        "virtio-pci: queue enable refused (bad size or rings)"
                    );
                }
            }
            (QUEUE_DESC..QUEUE_DRIVER, _) => ring(&mut q.desc, QUEUE_DESC),
            (QUEUE_DRIVER..QUEUE_DEVICE, _) => ring(&mut q.driver, QUEUE_DRIVER),
            (QUEUE_DEVICE..COMMON_LEN, _) => ring(&mut q.device, QUEUE_DEVICE),
            _ => tracing::debug!(offset, len, "virtio-pci: queue write dropped"),
        }
    }

    /// Whether the driver's features may be accepted: only offered bits, `VERSION_1` among
    /// them (§6.1: a device MUST NOT accept a feature it did not offer; this transport is
    /// modern only).
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered == 0 && self.driver_features & F_VERSION_1 != 0
    }

    /// §3.1.1's order: `ACKNOWLEDGE`, `DRIVER`, features, `FEATURES_OK`, queues, `DRIVER_OK`. A
    /// driver only adds bits; a write that clears one is ignored, `FEATURES_OK` is kept only
    /// for acceptable features (§2.2.2) and `DRIVER_OK` only after `FEATURES_OK`.
    fn write_status(&mut self, value: u8) -> Effect {
        if value == 0 {
            let previous = self.status;
            self.reset();
            return Effect::Reset { previous };
        }
        let old = self.status & DRIVER_STATUS_BITS;
        let mut new = value & DRIVER_STATUS_BITS;
        if new & old != old {
            tracing::debug!(old, new, "virtio-pci: status write clearing bits ignored");
            return Effect::None;
        }
        if new & STATUS_FEATURES_OK != 0
            && old & STATUS_FEATURES_OK == 0
            && (new & STATUS_DRIVER == 0 || !self.features_acceptable())
        {
            tracing::debug!(
                features = format_args!("{:#x}", self.driver_features),
                "virtio-pci: FEATURES_OK refused"
            );
            new &= !STATUS_FEATURES_OK;
        }
        let mut effect = Effect::None;
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            if new & STATUS_FEATURES_OK == 0 {
                tracing::debug!("virtio-pci: DRIVER_OK before FEATURES_OK ignored");
                new &= !STATUS_DRIVER_OK;
            } else {
                effect = Effect::DriverOk;
            }
        }
        self.status = new | (self.status & STATUS_NEEDS_RESET);
        effect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: u64 = F_VERSION_1 | 0b110;

    fn common() -> Common {
        Common::new(OFFER, 2, 256, 3)
    }

    fn read(c: &Common, offset: u64, len: usize) -> u64 {
        let mut buf = vec![0u8; len];
        c.read(offset, &mut buf);
        le_value(&buf)
    }

    fn write(c: &mut Common, offset: u64, len: usize, value: u64) -> Effect {
        let bytes = value.to_le_bytes();
        c.write(offset, &bytes[..len])
    }

    fn negotiate(c: &mut Common, features: u64) {
        write(c, DEVICE_STATUS, 1, 1);
        write(c, DEVICE_STATUS, 1, 3);
        write(c, DRIVER_FEATURE_SELECT, 4, 0);
        write(c, DRIVER_FEATURE, 4, features & 0xffff_ffff);
        write(c, DRIVER_FEATURE_SELECT, 4, 1);
        write(c, DRIVER_FEATURE, 4, features >> 32);
        write(c, DEVICE_STATUS, 1, 0xb);
    }

    fn setup_queue(c: &mut Common, index: u16, size: u16) {
        write(c, QUEUE_SELECT, 2, u64::from(index));
        write(c, QUEUE_SIZE, 2, u64::from(size));
        write(c, QUEUE_DESC, 4, 0x10_0000);
        write(c, QUEUE_DESC + 4, 4, 0);
        write(c, QUEUE_DRIVER, 8, 0x10_1000);
        write(c, QUEUE_DEVICE, 4, 0x10_2000);
        write(c, QUEUE_ENABLE, 2, 1);
    }

    #[test]
    fn device_features_read_in_two_halves_and_beyond_read_zero() {
        let mut c = common();
        assert_eq!(read(&c, DEVICE_FEATURE, 4), 0b110);
        write(&mut c, DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(read(&c, DEVICE_FEATURE, 4), 1);
        write(&mut c, DEVICE_FEATURE_SELECT, 4, 7);
        assert_eq!(read(&c, DEVICE_FEATURE, 4), 0);
        write(&mut c, DEVICE_FEATURE_SELECT, 4, u64::from(u32::MAX));
        assert_eq!(read(&c, DEVICE_FEATURE, 4), 0);
        assert_eq!(read(&c, NUM_QUEUES, 2), 2);
    }

    #[test]
    fn features_ok_with_offered_features_and_version_1_sticks() {
        let mut c = common();
        negotiate(&mut c, F_VERSION_1 | 0b10);
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0xb);
        assert_eq!(c.driver_features(), F_VERSION_1 | 0b10);
        // Frozen after FEATURES_OK.
        write(&mut c, DRIVER_FEATURE_SELECT, 4, 0);
        write(&mut c, DRIVER_FEATURE, 4, 0);
        assert_eq!(c.driver_features(), F_VERSION_1 | 0b10);
    }

    #[test]
    fn features_ok_with_unoffered_bits_or_without_version_1_is_refused() {
        let mut c = common();
        negotiate(&mut c, F_VERSION_1 | 0b1000);
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0x3);
        let mut c = common();
        negotiate(&mut c, 0b10);
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0x3);
    }

    #[test]
    fn driver_ok_before_features_ok_is_ignored_and_status_bits_cannot_be_cleared() {
        let mut c = common();
        write(&mut c, DEVICE_STATUS, 1, 1);
        assert_eq!(write(&mut c, DEVICE_STATUS, 1, 0x7), Effect::None);
        assert_eq!(c.status(), 0x3);
        write(&mut c, DEVICE_STATUS, 1, 0x1);
        assert_eq!(c.status(), 0x3);
        // FEATURES_OK without DRIVER is refused too.
        let mut c = common();
        write(&mut c, DRIVER_FEATURE_SELECT, 4, 1);
        write(&mut c, DRIVER_FEATURE, 4, 1);
        write(&mut c, DEVICE_STATUS, 1, 0x9);
        assert_eq!(c.status(), 0x1);
    }

    #[test]
    fn driver_ok_after_features_ok_asks_for_activation() {
        let mut c = common();
        negotiate(&mut c, F_VERSION_1);
        assert_eq!(write(&mut c, DEVICE_STATUS, 1, 0xf), Effect::DriverOk);
        assert_eq!(write(&mut c, DEVICE_STATUS, 1, 0xf), Effect::None);
    }

    #[test]
    fn queue_setup_reads_back_and_enable_checks_size_and_rings() {
        let mut c = common();
        setup_queue(&mut c, 1, 128);
        assert_eq!(read(&c, QUEUE_ENABLE, 2), 1);
        assert_eq!(read(&c, QUEUE_SIZE, 2), 128);
        assert_eq!(read(&c, QUEUE_DESC, 8), 0x10_0000);
        assert_eq!(read(&c, QUEUE_DRIVER + 4, 4), 0);
        assert_eq!(read(&c, QUEUE_DEVICE, 4), 0x10_2000);
        assert_eq!(read(&c, QUEUE_NOTIFY_OFF, 2), 1);
        // Enabled queues are frozen.
        write(&mut c, QUEUE_SIZE, 2, 64);
        assert_eq!(read(&c, QUEUE_SIZE, 2), 128);
        for size in [0u16, 100, 512] {
            let mut c = common();
            setup_queue(&mut c, 0, size);
            assert_eq!(read(&c, QUEUE_ENABLE, 2), 0, "size {size}");
        }
        let mut c = common();
        write(&mut c, QUEUE_ENABLE, 2, 1);
        assert_eq!(read(&c, QUEUE_ENABLE, 2), 0, "no rings");
        let mut c = common();
        write(&mut c, QUEUE_DESC, 8, 0x1008);
        write(&mut c, QUEUE_DRIVER, 8, 0x2000);
        write(&mut c, QUEUE_DEVICE, 8, 0x3000);
        write(&mut c, QUEUE_ENABLE, 2, 1);
        assert_eq!(read(&c, QUEUE_ENABLE, 2), 0, "misaligned descriptor table");
        write(&mut c, QUEUE_DESC, 8, u64::MAX - 15);
        write(&mut c, QUEUE_ENABLE, 2, 1);
        assert_eq!(read(&c, QUEUE_ENABLE, 2), 0, "wrapping ring");
    }

    #[test]
    fn out_of_range_queue_select_reads_zero_size_and_ignores_writes() {
        let mut c = common();
        write(&mut c, QUEUE_SELECT, 2, 2);
        assert_eq!(read(&c, QUEUE_SIZE, 2), 0);
        assert_eq!(read(&c, QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        write(&mut c, QUEUE_SIZE, 2, 8);
        write(&mut c, QUEUE_ENABLE, 2, 1);
        assert_eq!(write(&mut c, QUEUE_MSIX_VECTOR, 2, 0), Effect::None);
        assert!(c.queues().iter().all(|q| q.size == 256 && !q.enabled));
    }

    #[test]
    fn vectors_beyond_the_table_read_back_as_no_vector() {
        let mut c = common();
        assert_eq!(
            write(&mut c, CONFIG_MSIX_VECTOR, 2, 2),
            Effect::ConfigVector
        );
        assert_eq!(read(&c, CONFIG_MSIX_VECTOR, 2), 2);
        write(&mut c, CONFIG_MSIX_VECTOR, 2, 3);
        assert_eq!(read(&c, CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        write(&mut c, QUEUE_SELECT, 2, 1);
        assert_eq!(
            write(&mut c, QUEUE_MSIX_VECTOR, 2, 1),
            Effect::QueueVector(1)
        );
        assert_eq!(read(&c, QUEUE_MSIX_VECTOR, 2), 1);
        write(&mut c, QUEUE_MSIX_VECTOR, 2, 0x8000);
        assert_eq!(read(&c, QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn reset_restores_defaults_but_keeps_the_generation() {
        let mut c = common();
        negotiate(&mut c, F_VERSION_1);
        setup_queue(&mut c, 0, 64);
        c.bump_generation();
        assert_eq!(
            write(&mut c, DEVICE_STATUS, 1, 0),
            Effect::Reset { previous: 0xb }
        );
        assert_eq!(c.status(), 0);
        assert_eq!(c.driver_features(), 0);
        assert_eq!(c.queues()[0], QueueState::new(256));
        assert_eq!(read(&c, CONFIG_GENERATION, 1), 1);
    }

    #[test]
    fn odd_widths_and_read_only_fields_change_nothing() {
        let mut c = common();
        let before = c.image();
        for offset in 0..0x40u64 {
            for len in [1usize, 3, 8] {
                if (offset, len) == (DEVICE_STATUS, 1) || offset >= QUEUE_DESC {
                    continue;
                }
                write(&mut c, offset, len, u64::MAX);
            }
        }
        write(&mut c, NUM_QUEUES, 2, 9);
        write(&mut c, DEVICE_FEATURE, 4, 0);
        write(&mut c, CONFIG_GENERATION, 1, 9);
        assert_eq!(c.image(), before);
        // Reads of any width never panic and stop at the structure's end.
        assert_eq!(read(&c, COMMON_LEN - 1, 8), 0);
        assert_eq!(read(&c, u64::MAX, 8), 0);
    }
}
