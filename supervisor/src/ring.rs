//! The console ring: the last bytes a guest printed on COM1, replayed to each `vm console`
//! that attaches, so nothing printed before attaching is lost.

#![forbid(unsafe_code)]

use std::collections::VecDeque;

/// How much console output a supervisor keeps.
pub const CONSOLE_RING_BYTES: usize = 256 * 1024;

/// A bounded byte buffer that drops its oldest bytes when full.
#[derive(Debug, Clone)]
pub struct Ring {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl Ring {
    /// An empty ring holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Ring {
        Ring {
            bytes: VecDeque::with_capacity(capacity.min(64 * 1024)),
            capacity,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        let keep = data
            .get(data.len().saturating_sub(self.capacity)..)
            .unwrap_or_default();
        let overflow = self
            .bytes
            .len()
            .saturating_add(keep.len())
            .saturating_sub(self.capacity);
        self.bytes.drain(..overflow.min(self.bytes.len()));
        self.bytes.extend(keep);
    }

    /// Everything held, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_is_kept_whole() {
        let mut ring = Ring::new(16);
        ring.push(b"hello ");
        ring.push(b"world");
        assert_eq!(ring.contents(), b"hello world");
    }

    #[test]
    fn overflow_drops_the_oldest_bytes() {
        let mut ring = Ring::new(8);
        ring.push(b"abcdef");
        ring.push(b"ghij");
        assert_eq!(ring.contents(), b"cdefghij");
        assert_eq!(ring.len(), 8);
    }

    #[test]
    fn a_push_larger_than_the_ring_keeps_its_tail() {
        let mut ring = Ring::new(4);
        ring.push(b"xy");
        ring.push(b"0123456789");
        assert_eq!(ring.contents(), b"6789");
    }
}
