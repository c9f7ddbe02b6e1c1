//! VNC Authentication (RFC 6143 §7.2.2): a 16-byte random challenge that the client
//! DES-encrypts with its password as the key.
//!
//! The key is the password's first 8 bytes, zero padded, each byte bit-reversed (what every
//! VNC implementation does, though the RFC does not say so). The password is never logged and
//! the response is compared in constant time. VNC Authentication is weak by design (DES, an
//! 8-byte password, no channel protection): it keeps honest users apart, nothing more; capvm's
//! listener defaults to loopback.

use des::Des;
use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockEncrypt, KeyInit};

/// Length of the challenge and the response.
pub const CHALLENGE_LEN: usize = 16;

/// Why a challenge could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("getrandom failed")]
    Random(#[source] std::io::Error),
}

/// A fresh random challenge from the kernel (`getrandom(2)`, allowed by the base policy).
pub fn challenge() -> Result<[u8; CHALLENGE_LEN], AuthError> {
    let mut buf = [0u8; CHALLENGE_LEN];
    let mut filled = 0usize;
    while filled < CHALLENGE_LEN {
        let rest = buf.get_mut(filled..).unwrap_or_default();
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the duration of
        // the call; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if let Ok(n) = usize::try_from(n) {
            filled = filled.saturating_add(n);
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(AuthError::Random(e));
            }
        }
    }
    Ok(buf)
}

/// The response a client with `password` gives to `challenge`.
pub fn expected_response(password: &[u8], challenge: &[u8; CHALLENGE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = Des::new(GenericArray::from_slice(&key));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// Whether `response` answers `challenge` for `password`, compared in constant time.
pub fn verify(password: &[u8], challenge: &[u8; CHALLENGE_LEN], response: &[u8]) -> bool {
    let expected = expected_response(password, challenge);
    if response.len() != CHALLENGE_LEN {
        return false;
    }
    let diff = expected
        .iter()
        .zip(response)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_matches_openssl_des() {
        // `openssl enc -des-ecb -nopad -K 0e86ceceeef64e26` (the bit-reversed "password") of
        // the bytes 0..16.
        let challenge: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        let expected = [
            0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5,
            0x38, 0xe2,
        ];
        assert_eq!(expected_response(b"password", &challenge), expected);
        assert!(verify(b"password", &challenge, &expected));
    }

    #[test]
    fn a_wrong_password_or_short_response_fails() {
        let c = challenge().unwrap();
        let good = expected_response(b"secret", &c);
        assert!(verify(b"secret", &c, &good));
        assert!(!verify(b"secreT", &c, &good));
        assert!(!verify(b"secret", &c, &good[..15]));
    }

    #[test]
    fn only_the_first_eight_password_bytes_count() {
        let c = [7u8; 16];
        assert_eq!(
            expected_response(b"12345678", &c),
            expected_response(b"123456789", &c)
        );
    }

    #[test]
    fn challenges_differ() {
        assert_ne!(challenge().unwrap(), challenge().unwrap());
    }
}
