//! Payload patterns: bytes that depend on their offset, so loss, duplication or reordering
//! anywhere in a transfer shows up at the first wrong byte.

use bytes::Bytes;

/// The byte at offset `i` of a test payload.
pub fn pattern(i: u64) -> u8 {
    ((i ^ (i >> 9) ^ (i >> 17)) % 251) as u8
}

/// `len` pattern bytes starting at offset `start`.
pub fn pattern_chunk(start: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|k| pattern(start + k))
        .collect::<Vec<u8>>()
        .into()
}

/// Checks a stream of pattern bytes chunk by chunk.
#[derive(Debug, Default)]
pub struct PatternCheck {
    /// Bytes seen so far.
    pub len: u64,
    /// Offset of the first wrong byte, if any.
    pub first_bad: Option<u64>,
}

impl PatternCheck {
    /// Checks the next chunk of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        if self.first_bad.is_none() {
            let start = self.len;
            self.first_bad = (start..)
                .zip(data)
                .find(|(i, b)| **b != pattern(*i))
                .map(|(i, _)| i);
        }
        self.len += data.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_line_up_and_a_changed_byte_is_found() {
        let whole = pattern_chunk(0, 5000);
        let mut check = PatternCheck::default();
        check.feed(&whole[..1234]);
        check.feed(&pattern_chunk(1234, 3766));
        assert_eq!((check.len, check.first_bad), (5000, None));
        let mut bad = whole.to_vec();
        bad[4321] ^= 1;
        let mut check = PatternCheck::default();
        check.feed(&bad);
        assert_eq!(check.first_bad, Some(4321));
    }
}
