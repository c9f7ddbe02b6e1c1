//! Guest accesses as little-endian values: a port or MMIO access of 1, 2, 4 or 8 bytes is a
//! byte slice; these turn it into a number and back without indexing.

/// The little-endian value of up to the first eight bytes of `data`.
pub(crate) fn read_le(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .rev()
        .fold(0, |value, &byte| (value << 8) | u64::from(byte))
}

/// Fills `data` with the low bytes of `value`, little-endian; bytes past the eighth read zero.
pub(crate) fn write_le(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (i, slot) in data.iter_mut().enumerate() {
        *slot = bytes.get(i).copied().unwrap_or(0);
    }
}

/// The port of byte `index` of an access that starts at `port`, if it exists.
pub(crate) fn byte_port(port: u16, index: usize) -> Option<u16> {
    port.checked_add(u16::try_from(index).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_le_of_each_width_assembles_low_byte_first() {
        assert_eq!(read_le(&[0x12]), 0x12);
        assert_eq!(read_le(&[0x34, 0x12]), 0x1234);
        assert_eq!(read_le(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        assert_eq!(read_le(&[1, 2, 3, 4, 5, 6, 7, 8]), 0x0807_0605_0403_0201);
        assert_eq!(read_le(&[]), 0);
    }

    #[test]
    fn write_le_truncates_to_the_slice_and_zeroes_past_eight_bytes() {
        let mut two = [0u8; 2];
        write_le(&mut two, 0xaabb_ccdd);
        assert_eq!(two, [0xdd, 0xcc]);
        let mut nine = [0xffu8; 9];
        write_le(&mut nine, u64::MAX);
        assert_eq!(nine, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    }
}
