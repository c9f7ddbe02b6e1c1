//! Framing of one packet: the fixed header and the bincode payload, with no I/O.
//!
//! `Channel::send` and `Channel::recv` call exactly these functions around
//! `sendmsg`/`recvmsg`, so the fuzz target exercises the receive path a hostile peer reaches.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ChannelError, MAX_FDS, MAX_MESSAGE_BYTES};

/// Bytes of the fixed header in front of every payload.
pub const HEADER_LEN: usize = 12;

/// First four bytes of every packet: `b"cpvm"` read as a little-endian `u32`.
pub const PACKET_MAGIC: u32 = u32::from_le_bytes(*b"cpvm");

/// The bincode configuration of every payload: varint integers, little endian, and a decode
/// limit so a hostile length prefix cannot make the decoder allocate more than a packet holds.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Encodes `msg` as one packet (header + payload) announcing `fd_count` attached fds.
pub fn encode_packet<T: Serialize>(msg: &T, fd_count: usize) -> Result<Vec<u8>, ChannelError> {
    if fd_count > MAX_FDS {
        return Err(ChannelError::TooManyFds);
    }
    let payload = bincode::serde::encode_to_vec(msg, config()).map_err(ChannelError::Encode)?;
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(ChannelError::TooLarge);
    }
    // Both fit: MAX_MESSAGE_BYTES and MAX_FDS are far below u32::MAX.
    let payload_len = u32::try_from(payload.len()).map_err(|_| ChannelError::TooLarge)?;
    let fd_count = u32::try_from(fd_count).map_err(|_| ChannelError::TooManyFds)?;

    let mut packet = Vec::with_capacity(HEADER_LEN.saturating_add(payload.len()));
    packet.extend_from_slice(&PACKET_MAGIC.to_le_bytes());
    packet.extend_from_slice(&payload_len.to_le_bytes());
    packet.extend_from_slice(&fd_count.to_le_bytes());
    packet.extend_from_slice(&payload);
    Ok(packet)
}

/// Decodes one received packet, `bytes` being exactly what `recvmsg` returned and `fd_count`
/// the number of fds that came with it.
///
/// Checks, in order: the header is complete, the magic, the declared payload length against
/// [`MAX_MESSAGE_BYTES`] and against the bytes that arrived, the declared fd count against
/// [`MAX_FDS`] and against `fd_count`, then decodes the payload and rejects trailing bytes.
pub fn decode_packet<T: DeserializeOwned>(
    bytes: &[u8],
    fd_count: usize,
) -> Result<T, ChannelError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(ChannelError::Truncated { len: bytes.len() });
    };
    let [m0, m1, m2, m3, l0, l1, l2, l3, f0, f1, f2, f3] = *header;
    let magic = u32::from_le_bytes([m0, m1, m2, m3]);
    if magic != PACKET_MAGIC {
        return Err(ChannelError::BadMagic { found: magic });
    }
    let declared_len = usize::try_from(u32::from_le_bytes([l0, l1, l2, l3]))
        .map_err(|_| ChannelError::TooLarge)?;
    if declared_len > MAX_MESSAGE_BYTES {
        return Err(ChannelError::TooLarge);
    }
    if declared_len != payload.len() {
        return Err(ChannelError::LengthMismatch {
            declared: declared_len,
            actual: payload.len(),
        });
    }
    let declared_fds = usize::try_from(u32::from_le_bytes([f0, f1, f2, f3]))
        .map_err(|_| ChannelError::TooManyFds)?;
    if declared_fds > MAX_FDS {
        return Err(ChannelError::TooManyFds);
    }
    if declared_fds != fd_count {
        return Err(ChannelError::FdCountMismatch {
            expected: declared_fds,
            got: fd_count,
        });
    }
    let (msg, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(ChannelError::Decode)?;
    let extra = payload.len().saturating_sub(used);
    if extra != 0 {
        return Err(ChannelError::TrailingBytes { extra });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, len: u32, fds: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&magic.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&fds.to_le_bytes());
        h
    }

    #[test]
    fn encoded_packet_decodes_to_the_same_value() {
        let msg = (7u32, String::from("seven"), vec![1u64, 2, 3]);

        let packet = encode_packet(&msg, 2).unwrap();
        let back: (u32, String, Vec<u64>) = decode_packet(&packet, 2).unwrap();

        assert_eq!(back, msg);
    }

    #[test]
    fn packet_starts_with_the_documented_header() {
        let packet = encode_packet(&1u8, 3).unwrap();

        assert_eq!(
            packet.get(..HEADER_LEN),
            Some(header(PACKET_MAGIC, 1, 3).as_slice())
        );
        assert_eq!(packet.get(HEADER_LEN..), Some(&[1u8][..]));
    }

    #[test]
    fn short_packet_is_truncated() {
        let packet = encode_packet(&1u8, 0).unwrap();

        let err = decode_packet::<u8>(packet.get(..HEADER_LEN - 1).unwrap(), 0).unwrap_err();

        assert!(
            matches!(err, ChannelError::Truncated { len: 11 }),
            "{err:?}"
        );
    }

    #[test]
    fn wrong_packet_magic_is_bad_magic() {
        let mut packet = header(0xdead_beef, 1, 0);
        packet.push(1);

        let err = decode_packet::<u8>(&packet, 0).unwrap_err();

        assert!(
            matches!(err, ChannelError::BadMagic { found: 0xdead_beef }),
            "{err:?}"
        );
    }

    #[test]
    fn declared_length_over_the_limit_is_too_large() {
        let packet = header(PACKET_MAGIC, u32::MAX, 0);

        let err = decode_packet::<u8>(&packet, 0).unwrap_err();

        assert!(matches!(err, ChannelError::TooLarge), "{err:?}");
    }

    #[test]
    fn declared_length_disagreeing_with_bytes_is_length_mismatch() {
        let mut packet = header(PACKET_MAGIC, 5, 0);
        packet.push(1);

        let err = decode_packet::<u8>(&packet, 0).unwrap_err();

        assert!(
            matches!(
                err,
                ChannelError::LengthMismatch {
                    declared: 5,
                    actual: 1
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn declared_fd_count_over_the_limit_is_too_many_fds() {
        let packet = header(PACKET_MAGIC, 0, 33);

        let err = decode_packet::<()>(&packet, 33).unwrap_err();

        assert!(matches!(err, ChannelError::TooManyFds), "{err:?}");
    }

    #[test]
    fn declared_fd_count_disagreeing_with_received_is_mismatch() {
        let packet = encode_packet(&(), 2).unwrap();

        let err = decode_packet::<()>(&packet, 1).unwrap_err();

        assert!(
            matches!(
                err,
                ChannelError::FdCountMismatch {
                    expected: 2,
                    got: 1
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn bytes_after_the_message_are_trailing_bytes() {
        let mut packet = header(PACKET_MAGIC, 3, 0);
        packet.extend_from_slice(&[1, 2, 3]);

        let err = decode_packet::<u8>(&packet, 0).unwrap_err();

        assert!(
            matches!(err, ChannelError::TrailingBytes { extra: 2 }),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_enum_tag_is_decode_error() {
        let mut packet = header(PACKET_MAGIC, 1, 0);
        packet.push(200);

        let err = decode_packet::<Option<u8>>(&packet, 0).unwrap_err();

        assert!(matches!(err, ChannelError::Decode(_)), "{err:?}");
    }

    #[test]
    fn huge_length_prefix_inside_payload_is_decode_error_not_allocation() {
        // A Vec<u8> claiming u64::MAX elements: varint tag 253 then 8 bytes.
        let mut payload = vec![253u8];
        payload.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut packet = header(PACKET_MAGIC, u32::try_from(payload.len()).unwrap(), 0);
        packet.extend_from_slice(&payload);

        let err = decode_packet::<Vec<u8>>(&packet, 0).unwrap_err();

        assert!(matches!(err, ChannelError::Decode(_)), "{err:?}");
    }

    #[test]
    fn message_over_the_limit_is_not_encoded() {
        let big = vec![0u8; MAX_MESSAGE_BYTES];

        let err = encode_packet(&big, 0).unwrap_err();

        assert!(matches!(err, ChannelError::TooLarge), "{err:?}");
    }

    #[test]
    fn encoding_with_too_many_fds_is_refused() {
        let err = encode_packet(&(), MAX_FDS + 1).unwrap_err();

        assert!(matches!(err, ChannelError::TooManyFds), "{err:?}");
    }
}
