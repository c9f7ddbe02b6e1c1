//! Parsers for guest config values: sizes, counts, ports, resolutions, MAC addresses and
//! vm-bhyve's booleans. Each returns the value or a message saying what is wrong with it.

use std::fmt;

use serde::Serialize;

/// The most vCPUs a guest may ask for.
pub const MAX_CPUS: u32 = 255;
/// The most guest memory accepted: 16 TiB.
pub const MAX_MEMORY: u64 = 16 << 40;
/// bhyve's frame buffer limits, which `graphics_res` must fall within.
pub const MIN_RES: (u32, u32) = (640, 480);
pub const MAX_RES: (u32, u32) = (1920, 1200);
/// vm-bhyve's default frame buffer size.
pub const DEFAULT_RES: (u32, u32) = (800, 600);

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `xx:xx:xx:xx:xx:xx` (one or two hex digits a group, as bhyve's `ether_aton`),
    /// refusing multicast and all-zero addresses as bhyve does.
    pub fn parse(value: &str) -> Result<Self, String> {
        let bad = || format!("{value:?} is not a MAC address (xx:xx:xx:xx:xx:xx)");
        let mut octets = [0u8; 6];
        let mut groups = value.split(':');
        for octet in &mut octets {
            let group = groups.next().ok_or_else(bad)?;
            if group.is_empty() || group.len() > 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(group, 16).map_err(|_| bad())?;
        }
        if groups.next().is_some() {
            return Err(bad());
        }
        if octets[0] & 1 != 0 {
            return Err(format!("{value} is a multicast address"));
        }
        if octets == [0; 6] {
            return Err("the all-zero address is not usable".to_owned());
        }
        Ok(MacAddr(octets))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, octet) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{octet:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// vm-bhyve's `util::yesno`: unset, empty, no, false, off and 0 are false; anything else true.
pub fn yesno(value: &str) -> bool {
    !(value.is_empty()
        || ["no", "false", "off", "0"]
            .iter()
            .any(|v| value.eq_ignore_ascii_case(v)))
}

/// Parses a bhyve memory size: a number with an optional K/M/G/T suffix (any case);
/// no suffix means megabytes, as `bhyve -m`. Returns bytes.
pub fn parse_memory(value: &str) -> Result<u64, String> {
    let bytes = parse_scaled(value, 20)?;
    if bytes < 1 << 20 {
        return Err(format!("{value:?} is less than 1M"));
    }
    if bytes % 4096 != 0 {
        return Err(format!("{value:?} is not a multiple of 4K"));
    }
    if bytes > MAX_MEMORY {
        return Err(format!("{value:?} is more than 16T"));
    }
    Ok(bytes)
}

/// Parses a disk size as `truncate -s` does: a number with an optional K/M/G/T suffix (any
/// case); no suffix means bytes. Returns bytes.
pub fn parse_disk_size(value: &str) -> Result<u64, String> {
    let bytes = parse_scaled(value, 0)?;
    if bytes == 0 {
        return Err("a disk needs a size above 0".to_owned());
    }
    if i64::try_from(bytes).is_err() {
        return Err(format!("{value:?} is too large for a file"));
    }
    Ok(bytes)
}

fn parse_scaled(value: &str, default_shift: u32) -> Result<u64, String> {
    let bad = || format!("{value:?} is not a size (a number with an optional K, M, G or T suffix)");
    let (digits, shift) = match value.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(bad()),
            };
            (value.get(..i).unwrap_or_default(), shift)
        }
        _ => (value, default_shift),
    };
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let number: u64 = digits.parse().map_err(|_| bad())?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{value:?} is too large"))
}

/// Parses a vCPU count, 1 to [`MAX_CPUS`].
pub fn parse_cpu(value: &str) -> Result<u32, String> {
    let bad = || format!("{value:?} is not a vCPU count from 1 to {MAX_CPUS}");
    if value.is_empty() || value.len() > 4 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u32 = value.parse().map_err(|_| bad())?;
    if (1..=MAX_CPUS).contains(&n) {
        Ok(n)
    } else {
        Err(bad())
    }
}

pub(super) fn parse_seconds(value: &str) -> Result<u32, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{value:?} is not a number of seconds"));
    }
    value
        .parse()
        .map_err(|_| format!("{value:?} is too many seconds"))
}

pub(super) fn parse_port(value: &str) -> Result<u16, String> {
    let bad = || format!("{value:?} is not a TCP port from 1 to 65535");
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

/// Parses `graphics_res`: `WIDTHxHEIGHT` within bhyve's frame buffer limits.
pub fn parse_resolution(value: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{value:?} is not a resolution (WIDTHxHEIGHT, like 1600x900)");
    let (w, h) = value.split_once('x').ok_or_else(bad)?;
    let number = |s: &str| -> Result<u32, String> {
        if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (w, h) = (number(w)?, number(h)?);
    if !(MIN_RES.0..=MAX_RES.0).contains(&w) || !(MIN_RES.1..=MAX_RES.1).contains(&h) {
        return Err(format!(
            "{value} is outside {}x{} to {}x{}",
            MIN_RES.0, MIN_RES.1, MAX_RES.0, MAX_RES.1
        ));
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_without_suffix_is_megabytes() {
        assert_eq!(parse_memory("512"), Ok(512 << 20));
        assert_eq!(parse_memory("2g"), Ok(2 << 30));
        assert_eq!(parse_memory("1048576K"), Ok(1 << 30));
        assert_eq!(parse_memory("1T"), Ok(1 << 40));
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("512K").is_err());
        assert!(parse_memory("1.5G").is_err());
        assert!(parse_memory("G").is_err());
        assert!(parse_memory("-1G").is_err());
        assert!(parse_memory("99999999999999999999T").is_err());
        assert!(parse_memory("17T").is_err());
        assert!(parse_memory("4GB").is_err());
    }

    #[test]
    fn disk_size_without_suffix_is_bytes() {
        assert_eq!(parse_disk_size("4096"), Ok(4096));
        assert_eq!(parse_disk_size("64G"), Ok(64 << 30));
        assert_eq!(parse_disk_size("20g"), Ok(20 << 30));
        assert!(parse_disk_size("0").is_err());
        assert!(parse_disk_size("9000000T").is_err());
        assert!(parse_disk_size("").is_err());
    }

    #[test]
    fn resolution_limits_follow_bhyve() {
        assert_eq!(parse_resolution("1920x1200"), Ok((1920, 1200)));
        assert_eq!(parse_resolution("640x480"), Ok((640, 480)));
        assert!(parse_resolution("1921x1200").is_err());
        assert!(parse_resolution("800").is_err());
        assert!(parse_resolution("x").is_err());
        assert!(parse_resolution("800x600x1").is_err());
    }

    #[test]
    fn mac_parse_accepts_bhyve_forms_and_refuses_multicast() {
        assert_eq!(
            MacAddr::parse("58:9c:fc:1:2:3").map(|m| m.to_string()),
            Ok("58:9c:fc:01:02:03".to_owned())
        );
        assert!(MacAddr::parse("01:00:5e:00:00:01").is_err());
        assert!(MacAddr::parse("00:00:00:00:00:00").is_err());
        assert!(MacAddr::parse("58:9c:fc:00:00").is_err());
        assert!(MacAddr::parse("58:9c:fc:00:00:00:00").is_err());
        assert!(MacAddr::parse("58:9c:fc:000:00:00").is_err());
        assert!(MacAddr::parse("58:9c:fc:zz:00:00").is_err());
    }

    #[test]
    fn yesno_follows_vm_bhyve() {
        for v in ["yes", "YES", "on", "1", "true", "anything"] {
            assert!(yesno(v), "{v}");
        }
        for v in ["", "no", "No", "off", "false", "0"] {
            assert!(!yesno(v), "{v}");
        }
    }
}
