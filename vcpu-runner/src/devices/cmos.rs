//! The CMOS RTC (an MC146818 as PCs have it) at [`CMOS_PORT`]: index port 0x70, data port 0x71.
//!
//! The clock reads the host's time through the `clock` given at creation, plus the guest's own
//! offset: a guest that sets its clock moves only that offset, never the host's time. There is
//! no update cycle to wait for (UIP always reads clear) and no RTC interrupt (periodic, alarm and
//! update-ended flags are never raised). The rest of the 128 bytes of CMOS RAM is plain memory,
//! preset with the memory-size bytes firmware reads.

use super::{PioDevice, access::byte_port};
use crate::layout::CMOS_PORT;

const REG_SECONDS: usize = 0x00;
const REG_MINUTES: usize = 0x02;
const REG_HOURS: usize = 0x04;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0A;
const REG_B: usize = 0x0B;
const REG_C: usize = 0x0C;
const REG_D: usize = 0x0D;
const REG_CENTURY: usize = 0x32;

/// Register A: update in progress (never set here).
const A_UIP: u8 = 0x80;
/// Register A at power-on: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates halted while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B: time and date in binary rather than BCD.
const B_BINARY: u8 = 0x04;
/// Register B: 24-hour mode.
const B_24H: u8 = 0x02;
/// Register B at power-on: 24-hour, BCD.
const B_DEFAULT: u8 = B_24H;
/// Register D: the battery is good, RAM and time are valid.
const D_VALID: u8 = 0x80;
/// In 12-hour mode, the hour register's PM flag.
const HOUR_PM: u8 = 0x80;

/// Base memory size in KiB, low and high byte.
const REG_BASE_KIB: usize = 0x15;
/// Extended memory above 1 MiB in KiB (capped at 0xFFFF), low and high byte; repeated at 0x30.
const REG_EXT_KIB: usize = 0x17;
const REG_EXT_KIB_COPY: usize = 0x30;
/// Memory between 16 MiB and 4 GiB in 64 KiB units, low and high byte.
const REG_MEM_16M_64K: usize = 0x34;
/// Memory above 4 GiB in 64 KiB units, three bytes.
const REG_MEM_4G_64K: usize = 0x5B;

const RAM_BYTES: usize = 128;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECS_PER_DAY: i64 = 86_400;

/// A broken-down time, each field in its natural range (month 1–12, day 1–31).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the era-based civil-date algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let month = i64::from(month.clamp(1, 12));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date of `days` since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1..=31, 1..=12).
    (
        year,
        u8::try_from(month).unwrap_or(1),
        u8::try_from(day).unwrap_or(1),
    )
}

impl DateTime {
    fn from_unix(secs: i64) -> DateTime {
        let (year, month, day) = civil_from_days(secs.div_euclid(SECS_PER_DAY));
        let of_day = secs.rem_euclid(SECS_PER_DAY);
        // All three are below 60 or 24 by construction.
        let field = |v: i64| u8::try_from(v).unwrap_or(0);
        DateTime {
            year,
            month,
            day,
            hour: field(of_day / 3600),
            minute: field(of_day / 60 % 60),
            second: field(of_day % 60),
        }
    }

    /// Unix seconds; out-of-range fields (a guest may write any byte) just carry over.
    fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month, self.day);
        days.saturating_mul(SECS_PER_DAY)
            .saturating_add(i64::from(self.hour) * 3600)
            .saturating_add(i64::from(self.minute) * 60)
            .saturating_add(i64::from(self.second))
    }

    /// 1 = Sunday … 7 = Saturday, as the RTC counts.
    fn weekday(self) -> u8 {
        // 1970-01-01 was a Thursday (5).
        let days = days_from_civil(self.year, self.month, self.day);
        u8::try_from((days + 4).rem_euclid(7) + 1).unwrap_or(1)
    }
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10 % 10) << 4) | (value % 10)
}

fn from_bcd(value: u8) -> u8 {
    // Invalid digits (A–F) are taken at face value; the result stays below 256.
    (value >> 4) * 10 + (value & 0x0f)
}

/// The CMOS RTC and its RAM.
pub struct Cmos {
    clock: Box<dyn Fn() -> i64 + Send>,
    /// Seconds from UTC to what the RTC shows before the guest sets it.
    zone_offset: i64,
    /// Seconds the guest moved its clock by.
    guest_offset: i64,
    /// While register B's SET bit is up: the time being set, frozen.
    frozen: Option<DateTime>,
    index: u8,
    ram: [u8; RAM_BYTES],
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("zone_offset", &self.zone_offset)
            .field("guest_offset", &self.guest_offset)
            .field("frozen", &self.frozen)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Cmos {
    /// An RTC reading `clock()` (Unix seconds), in UTC if `utc`, else shifted by
    /// `local_offset_secs` (east of UTC positive), with the memory-size bytes for a guest of
    /// `mem_below_4g` bytes of RAM under 4 GiB and `mem_above_4g` above it.
    pub fn new(
        clock: Box<dyn Fn() -> i64 + Send>,
        utc: bool,
        local_offset_secs: i32,
        mem_below_4g: u64,
        mem_above_4g: u64,
    ) -> Cmos {
        let mut cmos = Cmos {
            clock,
            zone_offset: if utc { 0 } else { i64::from(local_offset_secs) },
            guest_offset: 0,
            frozen: None,
            index: 0,
            ram: [0; RAM_BYTES],
        };
        cmos.set_ram(REG_A, A_DEFAULT);
        cmos.set_ram(REG_B, B_DEFAULT);
        cmos.set_ram(REG_D, D_VALID);
        cmos.set_memory_sizes(mem_below_4g, mem_above_4g);
        cmos
    }

    fn set_ram(&mut self, index: usize, value: u8) {
        if let Some(byte) = self.ram.get_mut(index) {
            *byte = value;
        }
    }

    fn ram(&self, index: usize) -> u8 {
        self.ram.get(index).copied().unwrap_or(0xff)
    }

    /// Stores the low `width` bytes of `value`, little-endian, from `index`.
    fn set_ram_le(&mut self, index: usize, value: u64, width: usize) {
        for (i, byte) in value.to_le_bytes().into_iter().take(width).enumerate() {
            self.set_ram(index.saturating_add(i), byte);
        }
    }

    /// The memory-size bytes PC firmware reads (the layout QEMU also uses).
    fn set_memory_sizes(&mut self, below_4g: u64, above_4g: u64) {
        let base_kib = (below_4g / KIB).min(640);
        self.set_ram_le(REG_BASE_KIB, base_kib, 2);
        let ext_kib = (below_4g.saturating_sub(MIB) / KIB).min(0xffff);
        self.set_ram_le(REG_EXT_KIB, ext_kib, 2);
        self.set_ram_le(REG_EXT_KIB_COPY, ext_kib, 2);
        let mid_64k = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff);
        self.set_ram_le(REG_MEM_16M_64K, mid_64k, 2);
        let high_64k = (above_4g / (64 * KIB)).min(0xff_ffff);
        self.set_ram_le(REG_MEM_4G_64K, high_64k, 3);
    }

    fn binary(&self) -> bool {
        self.ram(REG_B) & B_BINARY != 0
    }

    fn hours_24(&self) -> bool {
        self.ram(REG_B) & B_24H != 0
    }

    /// What the guest's clock reads now.
    fn now(&self) -> DateTime {
        self.frozen.unwrap_or_else(|| {
            DateTime::from_unix(
                (self.clock)()
                    .saturating_add(self.zone_offset)
                    .saturating_add(self.guest_offset),
            )
        })
    }

    fn encode(&self, value: u8) -> u8 {
        if self.binary() { value } else { to_bcd(value) }
    }

    fn decode(&self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            from_bcd(value)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.hours_24() {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.hours_24() {
            return self.decode(value);
        }
        let twelve = self.decode(value & !HOUR_PM) % 12;
        if value & HOUR_PM != 0 {
            twelve + 12
        } else {
            twelve
        }
    }

    fn read_register(&mut self, index: usize) -> u8 {
        let now = self.now();
        // Years outside 0..=9999 wrap; rem_euclid keeps both within 0..100.
        let year_of_century = u8::try_from(now.year.rem_euclid(100)).unwrap_or(0);
        let century = u8::try_from(now.year.div_euclid(100).rem_euclid(100)).unwrap_or(0);
        match index {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS => self.encode_hour(now.hour),
            REG_WEEKDAY => self.encode(now.weekday()),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode(year_of_century),
            REG_CENTURY => self.encode(century),
            REG_A => self.ram(REG_A) & !A_UIP,
            // Reading C acknowledges its flags; none is ever raised.
            REG_C => 0,
            REG_D => D_VALID,
            _ => self.ram(index),
        }
    }

    fn write_time_field(&mut self, index: usize, value: u8) {
        let mut t = self.now();
        match index {
            REG_SECONDS => t.second = self.decode(value),
            REG_MINUTES => t.minute = self.decode(value),
            REG_HOURS => t.hour = self.decode_hour(value),
            REG_DAY => t.day = self.decode(value),
            REG_MONTH => t.month = self.decode(value),
            REG_YEAR => {
                let century = t.year.div_euclid(100);
                t.year = century * 100 + i64::from(self.decode(value) % 100);
            }
            REG_CENTURY => {
                let year_of_century = t.year.rem_euclid(100);
                t.year = i64::from(self.decode(value)) * 100 + year_of_century;
            }
            _ => return,
        }
        if self.frozen.is_some() {
            self.frozen = Some(t);
        } else {
            self.set_guest_time(t);
        }
    }

    fn set_guest_time(&mut self, t: DateTime) {
        let host = (self.clock)().saturating_add(self.zone_offset);
        self.guest_offset = t.to_unix().saturating_sub(host);
        tracing::debug!(
            guest_offset = self.guest_offset,
            "cmos: guest set its clock"
        );
    }

    fn write_register(&mut self, index: usize, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.write_time_field(index, value),
            // The weekday follows from the date.
            REG_WEEKDAY => tracing::debug!(value, "cmos: weekday write ignored"),
            REG_A => self.set_ram(REG_A, value & !A_UIP),
            REG_B => {
                let was_set = self.ram(REG_B) & B_SET != 0;
                let set = value & B_SET != 0;
                if set && !was_set {
                    self.frozen = Some(self.now());
                } else if !set
                    && was_set
                    && let Some(t) = self.frozen.take()
                {
                    self.set_guest_time(t);
                }
                self.set_ram(REG_B, value);
            }
            REG_C | REG_D => {
                tracing::debug!(index, value, "cmos: read-only register write ignored");
            }
            _ => self.set_ram(index, value),
        }
    }
}

impl PioDevice for Cmos {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match byte_port(port, i).and_then(|p| p.checked_sub(CMOS_PORT)) {
                // The index port is write-only.
                Some(0) => 0xff,
                Some(1) => self.read_register(usize::from(self.index)),
                _ => {
                    tracing::debug!(port, "cmos: read outside the device");
                    0xff
                }
            };
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            match byte_port(port, i).and_then(|p| p.checked_sub(CMOS_PORT)) {
                // Bit 7 of the index is the NMI mask on PCs; there is no NMI source to mask.
                Some(0) => self.index = value & 0x7f,
                Some(1) => self.write_register(usize::from(self.index), value),
                _ => tracing::debug!(port, value, "cmos: write outside the device dropped"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    /// 2026-11-27 03:04:05 UTC, a Friday.
    const FIXED: i64 = 1_795_748_645;

    fn cmos_at(now: i64, utc: bool, local_offset: i32) -> Cmos {
        Cmos::new(Box::new(move || now), utc, local_offset, 0, 0)
    }

    fn reg(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(CMOS_PORT, &[index]);
        let mut b = [0u8; 1];
        cmos.read(CMOS_PORT + 1, &mut b);
        b[0]
    }

    fn set_reg(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(CMOS_PORT, &[index, value]);
    }

    fn time_regs(cmos: &mut Cmos) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|i| reg(cmos, i))
    }

    #[test]
    fn civil_conversion_round_trips_across_eras() {
        for secs in [0, FIXED, -1, 951_782_400, 4_107_542_400, -62_135_596_800] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs, "{secs}");
        }
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn fixed_utc_clock_reads_back_in_bcd() {
        let mut cmos = cmos_at(FIXED, true, 3600);
        // sec, min, hour, weekday (Friday = 6), day, month, year, century
        assert_eq!(
            time_regs(&mut cmos),
            [0x05, 0x04, 0x03, 0x06, 0x27, 0x11, 0x26, 0x20]
        );
        assert_eq!(reg(&mut cmos, 0x0B), B_DEFAULT);
        assert_eq!(reg(&mut cmos, 0x0A) & A_UIP, 0);
        assert_eq!(reg(&mut cmos, 0x0D), D_VALID);
    }

    #[test]
    fn local_time_applies_the_offset() {
        // UTC-5: 2026-11-26 22:04:05, a Thursday.
        let mut cmos = cmos_at(FIXED, false, -5 * 3600);
        assert_eq!(
            time_regs(&mut cmos),
            [0x05, 0x04, 0x22, 0x05, 0x26, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn binary_mode_reads_plain_numbers_and_12h_mode_flags_pm() {
        let mut cmos = cmos_at(FIXED + 12 * 3600, true, 0);
        set_reg(&mut cmos, 0x0B, B_24H | B_BINARY);
        assert_eq!(time_regs(&mut cmos), [5, 4, 15, 6, 27, 11, 26, 20]);
        set_reg(&mut cmos, 0x0B, 0);
        assert_eq!(reg(&mut cmos, 0x04), 0x03 | HOUR_PM);
    }

    #[test]
    fn guest_time_write_moves_only_the_guest_offset() {
        let now = Arc::new(AtomicI64::new(FIXED));
        let clock = now.clone();
        let mut cmos = Cmos::new(
            Box::new(move || clock.load(Ordering::SeqCst)),
            true,
            0,
            0,
            0,
        );
        // Set 2030-01-02 10:20:30 the way Linux does: SET, fields, clear SET.
        set_reg(&mut cmos, 0x0B, B_24H | B_SET);
        for (index, value) in [(0x00, 0x30), (0x02, 0x20), (0x04, 0x10)] {
            set_reg(&mut cmos, index, value);
        }
        for (index, value) in [(0x07, 0x02), (0x08, 0x01), (0x09, 0x30), (0x32, 0x20)] {
            set_reg(&mut cmos, index, value);
        }
        now.store(FIXED + 100, Ordering::SeqCst); // frozen while SET is up
        assert_eq!(reg(&mut cmos, 0x00), 0x30);
        set_reg(&mut cmos, 0x0B, B_24H);
        now.store(FIXED + 107, Ordering::SeqCst);
        // 2030-01-02 is a Wednesday (4).
        assert_eq!(
            time_regs(&mut cmos),
            [0x37, 0x20, 0x10, 0x04, 0x02, 0x01, 0x30, 0x20]
        );
        // Without SET, a single field write takes effect at once.
        set_reg(&mut cmos, 0x02, 0x59);
        assert_eq!(reg(&mut cmos, 0x02), 0x59);
        assert_eq!(reg(&mut cmos, 0x04), 0x10);
    }

    #[test]
    fn memory_size_bytes_follow_the_pc_layout() {
        let mut cmos = Cmos::new(Box::new(|| 0), true, 0, 3 << 30, 5 << 30);
        let word = |c: &mut Cmos, i: u8| u16::from(reg(c, i)) | (u16::from(reg(c, i + 1)) << 8);
        assert_eq!(word(&mut cmos, 0x15), 640);
        assert_eq!(word(&mut cmos, 0x17), 0xffff);
        assert_eq!(word(&mut cmos, 0x30), 0xffff);
        // (3 GiB - 16 MiB) / 64 KiB
        assert_eq!(word(&mut cmos, 0x34), 48_896);
        let above = u32::from(reg(&mut cmos, 0x5b))
            | (u32::from(reg(&mut cmos, 0x5c)) << 8)
            | (u32::from(reg(&mut cmos, 0x5d)) << 16);
        assert_eq!(above, 81_920, "5 GiB / 64 KiB");

        let mut small = Cmos::new(Box::new(|| 0), true, 0, 8 << 20, 0);
        assert_eq!(word(&mut small, 0x17), 7 * 1024);
        assert_eq!(word(&mut small, 0x34), 0);
    }

    #[test]
    fn index_bit_7_and_ram_round_trip_and_odd_accesses_are_survived() {
        let mut cmos = cmos_at(FIXED, true, 0);
        set_reg(&mut cmos, 0x80 | 0x40, 0xab);
        assert_eq!(reg(&mut cmos, 0x40), 0xab);
        let mut wide = [0u8; 4];
        cmos.read(CMOS_PORT, &mut wide);
        assert_eq!(wide[0], 0xff, "index port is write-only");
        assert_eq!(wide[2..], [0xff, 0xff]);
        cmos.write(CMOS_PORT + 1, &[0x0c, 0x12, 0x34, 0x56]);
        cmos.write(u16::MAX, &[1, 2]);
        for index in 0..=0xffu8 {
            for value in [0x00, 0x99, 0xff] {
                set_reg(&mut cmos, index, value);
                let _ = reg(&mut cmos, index);
            }
        }
    }
}
