//! The controller's binary formats (configurations, commands, replies, snapshots, migration
//! entries): the shared bounds-checked reader (`crate::codec`) with this format's fields and
//! error type, and the writer.
//!
//! Every read checks the remaining length first and fails with the byte offset; nothing here
//! panics on any input. Counts are checked against a caller-given maximum before anything is
//! allocated, so a forged count cannot make a decoder reserve memory the input cannot describe.

use thiserror::Error;

use crate::codec::{from_read_error, ByteReader};

/// Bytes that do not decode. `offset` is relative to the start of the buffer given to the decoder.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated at offset {offset}: needed {needed_bytes} more bytes")]
    Truncated { offset: usize, needed_bytes: usize },
    #[error("unknown {what} {value} at offset {offset}")]
    Unknown {
        offset: usize,
        what: &'static str,
        value: u64,
    },
    #[error("{what} count {count} at offset {offset} exceeds {count_max}")]
    TooMany {
        offset: usize,
        what: &'static str,
        count: u64,
        count_max: u64,
    },
    #[error("{what} at offset {offset} is out of order or repeated (value {value})")]
    NotCanonical {
        offset: usize,
        what: &'static str,
        value: u64,
    },
    #[error("{trailing_bytes} trailing bytes at offset {offset}")]
    TrailingBytes {
        offset: usize,
        trailing_bytes: usize,
    },
    #[error("invalid text at offset {offset}")]
    BadText { offset: usize },
    /// Well-formed bytes describing something invalid (a configuration that fails validation).
    #[error("invalid content at offset {offset}: {reason}")]
    Invalid { offset: usize, reason: String },
}

// The shared reader's two failures, in this format's terms.
from_read_error!(DecodeError);

pub(crate) type Reader<'a> = ByteReader<'a, DecodeError>;

/// The controller formats' own fields: bounded counts, short texts, long byte strings.
impl<'a> ByteReader<'a, DecodeError> {
    /// A u32 count in `0..=count_max`.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        count_max: usize,
    ) -> Result<usize, DecodeError> {
        let offset = self.offset();
        let count = self.u32()?;
        if count as usize > count_max {
            return Err(DecodeError::TooMany {
                offset,
                what,
                count: u64::from(count),
                count_max: count_max as u64,
            });
        }
        Ok(count as usize)
    }

    /// A u8-length-prefixed UTF-8 string.
    pub(crate) fn text8(&mut self) -> Result<String, DecodeError> {
        let offset = self.offset();
        let len = self.u8()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadText { offset })
    }

    /// A u32-length-prefixed byte string of at most `length_bytes_max` bytes.
    pub(crate) fn bytes32(
        &mut self,
        what: &'static str,
        length_bytes_max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.count(what, length_bytes_max)?;
        self.take(len)
    }
}

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a count; callers have bounded it by a limit far below u32::MAX.
pub(crate) fn put_count(out: &mut Vec<u8>, count: usize) {
    assert!(
        count <= u32::MAX as usize,
        "count {count} does not fit the format"
    );
    put_u32(out, count as u32);
}

/// Writes a u8-length-prefixed string; callers have checked it is at most 255 bytes.
pub(crate) fn put_text8(out: &mut Vec<u8>, text: &str) {
    assert!(
        text.len() <= u8::MAX as usize,
        "text of {} bytes does not fit",
        text.len()
    );
    out.push(text.len() as u8);
    out.extend_from_slice(text.as_bytes());
}

pub(crate) fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    put_count(out, bytes.len());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(
            r.u32(),
            Err(DecodeError::Truncated {
                offset: 0,
                needed_bytes: 1
            })
        );
        let mut r = Reader::new(&[9, 0, 0, 0]);
        assert!(matches!(
            r.count("x", 8),
            Err(DecodeError::TooMany { count: 9, .. })
        ));
        let mut r = Reader::new(&[2, 0xff, 0xfe]);
        assert_eq!(r.text8(), Err(DecodeError::BadText { offset: 0 }));
        let r = Reader::new(&[0]);
        assert!(matches!(r.finish(), Err(DecodeError::TrailingBytes { .. })));
    }
}
