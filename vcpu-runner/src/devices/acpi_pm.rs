//! The ACPI fixed-hardware PM registers at [`ACPI_PM_BASE`]: the PM1a event block (status and
//! enable), the PM1a control block (sleep → poweroff), the PM timer and the FADT's reset
//! register.
//!
//! Block layout (bytes from the base): 0 PM1_STS, 2 PM1_EN, 4 PM1_CNT, 8 PM_TMR (4 bytes),
//! 0xC the reset register. Registers are decoded byte by byte, so any width at any offset works
//! the way the spec's byte lanes do (PM1_STS + PM1_EN as one dword included). The machine is
//! always in ACPI mode: SCI_EN reads 1 and there is no SMI command port.
//!
//! The SCI is a level interrupt on [`ACPI_SCI_GSI`]: it is up while an enabled status bit is set.
//! The timer's overflow status is only noticed when the guest touches the block (there is no host
//! timer behind it); guests that use the PM timer poll it and do not enable its SCI.

#![allow(clippy::doc_markdown)] // ACPI register names (PM1_STS, SLP_TYP) read better bare.

use std::sync::Arc;

use proto::runner::GuestExit;

use super::access::byte_port;
use super::{PioDevice, Platform};
use crate::layout::{
    ACPI_PM_BASE, ACPI_PM_LEN, ACPI_PM_TMR_PORT, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT,
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SCI_GSI, ACPI_SLP_TYP_S5,
};

/// PM1 status/enable: the timer's bit 23 changed.
const TMR: u16 = 1 << 0;
/// PM1 status/enable: the power button was pressed.
const PWRBTN: u16 = 1 << 8;
/// PM1_EN bits the guest may set (TMR, GBL, PWRBTN, SLPBTN, RTC, PCIEXP_WAKE_DIS).
const EN_WRITABLE: u16 = TMR | (1 << 5) | PWRBTN | (1 << 9) | (1 << 10) | (1 << 14);
/// Status bits that raise the SCI when enabled (the only events this machine produces).
const SCI_EVENTS: u16 = TMR | PWRBTN;

/// PM1_CNT: the SCI, not the SMI, signals events; always so here.
const SCI_EN: u16 = 1 << 0;
/// PM1_CNT: sleep type field (bits 10–12).
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
/// PM1_CNT: enter the sleep state in SLP_TYP (write-only).
const SLP_EN: u16 = 1 << 13;
/// PM1_CNT bits kept as written: BM_RLD (1) and SLP_TYP. GBL_RLS (2) and SLP_EN are write-only.
const CNT_STORED: u16 = (1 << 1) | SLP_TYP_MASK;

/// The PM timer's frequency, fixed by the ACPI spec.
const PM_TIMER_HZ: u128 = 3_579_545;
/// The PM timer is 24 bits wide (the FADT does not claim TMR_VAL_EXT).
const PM_TIMER_MASK: u64 = 0x00ff_ffff;
/// The timer bit whose change sets TMR_STS.
const PM_TIMER_MSB_SHIFT: u32 = 23;

/// Byte offsets in the block.
const OFF_STS: u16 = ACPI_PM1_EVT_PORT - ACPI_PM_BASE;
const OFF_EN: u16 = OFF_STS + 2;
const OFF_CNT: u16 = ACPI_PM1_CNT_PORT - ACPI_PM_BASE;
const OFF_TMR: u16 = ACPI_PM_TMR_PORT - ACPI_PM_BASE;
const OFF_RESET: u16 = ACPI_RESET_PORT - ACPI_PM_BASE;

/// The ACPI PM register block.
pub struct AcpiPm {
    platform: Arc<dyn Platform>,
    now_ns: Box<dyn Fn() -> u64 + Send>,
    start_ns: u64,
    status: u16,
    enable: u16,
    control: u16,
    /// The timer's bit 23 at the last look, to detect its changes.
    timer_msb_epoch: u64,
    sci_level: bool,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("status", &self.status)
            .field("enable", &self.enable)
            .field("control", &self.control)
            .field("sci_level", &self.sci_level)
            .finish_non_exhaustive()
    }
}

impl AcpiPm {
    /// The block at power-on, its timer counting from `now_ns()` (monotonic nanoseconds), its
    /// SCI driven on `platform`.
    pub fn new(platform: Arc<dyn Platform>, now_ns: Box<dyn Fn() -> u64 + Send>) -> AcpiPm {
        let start_ns = now_ns();
        AcpiPm {
            platform,
            now_ns,
            start_ns,
            status: 0,
            enable: 0,
            control: 0,
            timer_msb_epoch: 0,
            sci_level: false,
        }
    }

    /// The power button was pressed (`vm stop`): sets PWRBTN_STS and raises the SCI if the
    /// guest enabled the power button event.
    pub fn press_power_button(&mut self) {
        tracing::info!("acpi: power button pressed");
        self.status |= PWRBTN;
        self.update_sci();
    }

    /// PM timer ticks since creation (not masked to 24 bits).
    fn ticks(&self) -> u64 {
        let elapsed = (self.now_ns)().saturating_sub(self.start_ns);
        let ticks = u128::from(elapsed) * PM_TIMER_HZ / 1_000_000_000;
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// Sets TMR_STS if bit 23 of the timer changed since the last look.
    fn note_timer(&mut self, ticks: u64) {
        let epoch = ticks >> PM_TIMER_MSB_SHIFT;
        if epoch != self.timer_msb_epoch {
            self.timer_msb_epoch = epoch;
            self.status |= TMR;
        }
    }

    fn update_sci(&mut self) {
        let level = self.status & self.enable & SCI_EVENTS != 0;
        if level != self.sci_level {
            self.sci_level = level;
            self.platform.set_irq(ACPI_SCI_GSI, level);
        }
    }

    /// The whole block as the guest would read it at this instant.
    fn snapshot(&self, ticks: u64) -> [u8; ACPI_PM_LEN as usize] {
        let mut block = [0u8; ACPI_PM_LEN as usize];
        let timer = u32::try_from(ticks & PM_TIMER_MASK).unwrap_or(0);
        let fields: [(u16, &[u8]); 4] = [
            (OFF_STS, &self.status.to_le_bytes()),
            (OFF_EN, &self.enable.to_le_bytes()),
            (OFF_CNT, &(self.control | SCI_EN).to_le_bytes()),
            (OFF_TMR, &timer.to_le_bytes()),
        ];
        for (offset, bytes) in fields {
            if let Some(dst) = block.get_mut(usize::from(offset)..usize::from(offset) + bytes.len())
            {
                dst.copy_from_slice(bytes);
            }
        }
        block
    }

    /// Replaces byte `lane` (0 = low) of a 16-bit register with `value`.
    fn with_byte(register: u16, lane: u16, value: u8) -> u16 {
        let shift = lane * 8;
        (register & !(0xff << shift)) | (u16::from(value) << shift)
    }

    fn write_byte(&mut self, offset: u16, value: u8) {
        match offset {
            OFF_STS | 1 => {
                // Write-one-to-clear, per byte lane.
                let lane = offset - OFF_STS;
                self.status &= !(u16::from(value) << (lane * 8));
            }
            2 | 3 => {
                let lane = offset - OFF_EN;
                self.enable = Self::with_byte(self.enable, lane, value) & EN_WRITABLE;
            }
            4 | 5 => {
                let lane = offset - OFF_CNT;
                let written = Self::with_byte(self.control, lane, value);
                self.control = written & CNT_STORED;
                if lane == 1 && written & SLP_EN != 0 {
                    self.sleep((written & SLP_TYP_MASK) >> SLP_TYP_SHIFT);
                }
            }
            OFF_RESET => {
                if value == ACPI_RESET_VALUE {
                    tracing::info!("acpi: guest wrote the reset register");
                    self.platform.request_exit(GuestExit::Reboot);
                } else {
                    tracing::debug!(value, "acpi: reset register write ignored");
                }
            }
            _ => tracing::debug!(
                offset,
                value,
                "acpi: write to a read-only or absent register"
            ),
        }
    }

    fn sleep(&mut self, sleep_type: u16) {
        if sleep_type == u16::from(ACPI_SLP_TYP_S5) {
            tracing::info!("acpi: guest entered S5");
            self.platform.request_exit(GuestExit::Poweroff);
        } else {
            tracing::debug!(sleep_type, "acpi: unsupported sleep state ignored");
        }
    }

    fn offset(port: u16) -> Option<u16> {
        port.checked_sub(ACPI_PM_BASE).filter(|&o| o < ACPI_PM_LEN)
    }
}

impl PioDevice for AcpiPm {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let ticks = self.ticks();
        self.note_timer(ticks);
        self.update_sci();
        let block = self.snapshot(ticks);
        for (i, byte) in data.iter_mut().enumerate() {
            let offset = byte_port(port, i).and_then(Self::offset);
            *byte = offset.map_or(0xff, |o| block.get(usize::from(o)).copied().unwrap_or(0xff));
            if offset.is_none() {
                tracing::debug!(port, "acpi: read outside the PM block");
            }
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        let ticks = self.ticks();
        self.note_timer(ticks);
        for (i, &value) in data.iter().enumerate() {
            if let Some(offset) = byte_port(port, i).and_then(Self::offset) {
                self.write_byte(offset, value);
            } else {
                tracing::debug!(port, "acpi: write outside the PM block dropped");
            }
        }
        self.update_sci();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::devices::fake_platform::RecordingPlatform;

    const STS: u16 = ACPI_PM1_EVT_PORT;
    const EN: u16 = ACPI_PM1_EVT_PORT + 2;
    const CNT: u16 = ACPI_PM1_CNT_PORT;
    /// PM1 status: the machine woke up.
    const WAK_STS: u16 = 1 << 15;

    struct Rig {
        pm: AcpiPm,
        platform: Arc<RecordingPlatform>,
        now: Arc<AtomicU64>,
    }

    fn rig() -> Rig {
        let platform = Arc::new(RecordingPlatform::default());
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock = now.clone();
        let pm = AcpiPm::new(
            platform.clone(),
            Box::new(move || clock.load(Ordering::SeqCst)),
        );
        Rig { pm, platform, now }
    }

    fn inw(pm: &mut AcpiPm, port: u16) -> u16 {
        let mut b = [0u8; 2];
        pm.read(port, &mut b);
        u16::from_le_bytes(b)
    }

    fn inl(pm: &mut AcpiPm, port: u16) -> u32 {
        let mut b = [0u8; 4];
        pm.read(port, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn sci_en_always_reads_set() {
        let mut r = rig();
        assert_eq!(inw(&mut r.pm, CNT) & SCI_EN, SCI_EN);
        r.pm.write(CNT, &0u16.to_le_bytes());
        assert_eq!(inw(&mut r.pm, CNT) & SCI_EN, SCI_EN);
    }

    #[test]
    fn slp_en_with_s5_requests_poweroff() {
        let mut r = rig();
        let value = (u16::from(ACPI_SLP_TYP_S5) << SLP_TYP_SHIFT) | SLP_EN;
        r.pm.write(CNT, &value.to_le_bytes());
        assert_eq!(r.platform.exits(), vec![GuestExit::Poweroff]);
    }

    #[test]
    fn slp_en_as_a_high_byte_write_also_sleeps() {
        let mut r = rig();
        let value = (u16::from(ACPI_SLP_TYP_S5) << SLP_TYP_SHIFT) | SLP_EN;
        r.pm.write(CNT + 1, &[value.to_le_bytes()[1]]);
        assert_eq!(r.platform.exits(), vec![GuestExit::Poweroff]);
    }

    #[test]
    fn other_sleep_types_and_slp_typ_without_slp_en_do_nothing() {
        let mut r = rig();
        r.pm.write(CNT, &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        r.pm.write(
            CNT,
            &(u16::from(ACPI_SLP_TYP_S5) << SLP_TYP_SHIFT).to_le_bytes(),
        );
        assert!(r.platform.exits().is_empty());
        assert_eq!(inw(&mut r.pm, CNT) & SLP_EN, 0, "SLP_EN is write-only");
    }

    #[test]
    fn reset_register_reboots_only_on_the_reset_value() {
        let mut r = rig();
        r.pm.write(ACPI_RESET_PORT, &[ACPI_RESET_VALUE.wrapping_add(1)]);
        assert!(r.platform.exits().is_empty());
        r.pm.write(ACPI_RESET_PORT, &[ACPI_RESET_VALUE]);
        assert_eq!(r.platform.exits(), vec![GuestExit::Reboot]);
    }

    #[test]
    fn power_button_raises_the_sci_only_when_enabled_and_clear_lowers_it() {
        let mut r = rig();
        r.pm.press_power_button();
        assert!(r.platform.irqs().is_empty(), "PWRBTN_EN is clear");
        assert_eq!(inw(&mut r.pm, STS) & PWRBTN, PWRBTN);
        r.pm.write(EN, &PWRBTN.to_le_bytes());
        assert_eq!(r.platform.irqs(), vec![(ACPI_SCI_GSI, true)]);
        r.pm.press_power_button();
        assert_eq!(r.platform.irqs().len(), 1, "no call without a change");
        r.pm.write(STS, &PWRBTN.to_le_bytes());
        assert_eq!(inw(&mut r.pm, STS) & PWRBTN, 0);
        assert_eq!(
            r.platform.irqs(),
            vec![(ACPI_SCI_GSI, true), (ACPI_SCI_GSI, false)]
        );
    }

    #[test]
    fn event_block_as_one_dword_reads_status_low_and_enable_high() {
        let mut r = rig();
        r.pm.press_power_button();
        r.pm.write(STS, &(u32::from(WAK_STS | PWRBTN) << 16).to_le_bytes());
        assert_eq!(
            inl(&mut r.pm, STS),
            (u32::from(PWRBTN) << 16) | u32::from(PWRBTN)
        );
        // Writing ones to WAK_STS and PWRBTN_STS in the low half clears the status.
        r.pm.write(
            STS,
            &(u32::from(PWRBTN) << 16 | u32::from(WAK_STS | PWRBTN)).to_le_bytes(),
        );
        assert_eq!(inl(&mut r.pm, STS), u32::from(PWRBTN) << 16);
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz_and_wraps_at_24_bits() {
        let mut r = rig();
        assert_eq!(inl(&mut r.pm, ACPI_PM_TMR_PORT), 0);
        r.now.fetch_add(1_000_000_000, Ordering::SeqCst);
        assert_eq!(inl(&mut r.pm, ACPI_PM_TMR_PORT), 3_579_545);
        // 5 s later: 17_897_725 ticks in all, past 2^24.
        r.now.fetch_add(4_000_000_000, Ordering::SeqCst);
        assert_eq!(inl(&mut r.pm, ACPI_PM_TMR_PORT), 17_897_725 - (1 << 24));
    }

    #[test]
    fn timer_msb_change_sets_tmr_sts_and_raises_the_sci_if_enabled() {
        let mut r = rig();
        r.pm.write(EN, &TMR.to_le_bytes());
        assert!(r.platform.irqs().is_empty());
        // 2^23 ticks take about 2.34 s.
        r.now.fetch_add(2_400_000_000, Ordering::SeqCst);
        assert_eq!(inw(&mut r.pm, STS) & TMR, TMR);
        assert_eq!(r.platform.irqs(), vec![(ACPI_SCI_GSI, true)]);
    }

    #[test]
    fn odd_widths_and_offsets_never_panic_and_outside_bytes_read_all_ones() {
        let mut r = rig();
        for offset in 0..ACPI_PM_LEN + 4 {
            for width in [1usize, 2, 4, 8] {
                let mut buf = vec![0u8; width];
                r.pm.read(ACPI_PM_BASE + offset, &mut buf);
                if offset != ACPI_RESET_PORT - ACPI_PM_BASE && offset != CNT - ACPI_PM_BASE {
                    r.pm.write(ACPI_PM_BASE + offset, &vec![0xffu8; width]);
                }
            }
        }
        let mut past = [0u8; 4];
        r.pm.read(ACPI_PM_BASE + ACPI_PM_LEN - 2, &mut past);
        assert_eq!(past[2..], [0xff, 0xff]);
        r.pm.read(u16::MAX, &mut past);
        assert_eq!(past, [0xff; 4]);
        assert!(r.platform.exits().is_empty());
    }
}
