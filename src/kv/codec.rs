//! The reader of the entry, snapshot and shard-blob decoders: the shared bounds-checked reader
//! (`crate::codec`) with this format's fields and error type.
//!
//! Every read checks the remaining length first and returns [`DecodeError::Truncated`] with the
//! offset; nothing here can panic on any input. Byte fields are returned as `Bytes::slice`s of the
//! input buffer (a reference-count increment, no copy), so a payload kept from the receive buffer
//! or the WAL is never copied by decoding.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::DecodeError;
use crate::codec::{from_read_error, ByteReader};

// The shared reader's two failures, in this format's terms.
from_read_error!(DecodeError);

/// The shared reader over a `Bytes` buffer, whose byte fields it hands out as slices of it.
pub(crate) struct Reader<'a> {
    src: &'a Bytes,
    fields: ByteReader<'a, DecodeError>,
}

impl<'a> std::ops::Deref for Reader<'a> {
    type Target = ByteReader<'a, DecodeError>;
    fn deref(&self) -> &Self::Target {
        &self.fields
    }
}

impl std::ops::DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.fields
    }
}

impl<'a> Reader<'a> {
    pub(crate) fn new(src: &'a Bytes) -> Self {
        Reader {
            src,
            fields: ByteReader::new(src),
        }
    }

    /// A `u32` count that must lie in `1..=count_max`.
    pub(crate) fn count(&mut self, count_max: u32) -> Result<u32, DecodeError> {
        let offset = self.offset();
        let count = self.u32()?;
        if count == 0 || count > count_max {
            return Err(DecodeError::BadCount {
                offset,
                count: u64::from(count),
                count_max: u64::from(count_max),
            });
        }
        Ok(count)
    }

    /// A `u32` length-prefixed byte string of at most `length_bytes_max` bytes, as a slice of the
    /// input (no copy).
    pub(crate) fn bytes(&mut self, length_bytes_max: u32) -> Result<Bytes, DecodeError> {
        let offset = self.offset();
        let length = self.u32()?;
        if length > length_bytes_max {
            return Err(DecodeError::LengthTooLarge {
                offset,
                length_bytes: u64::from(length),
                length_bytes_max: u64::from(length_bytes_max),
            });
        }
        let length = length as usize;
        self.take(length)?;
        Ok(self.src.slice(self.offset() - length..self.offset()))
    }

    /// An optional byte string: a flag byte (0 absent, 1 present) then the string.
    pub(crate) fn opt_bytes(
        &mut self,
        length_bytes_max: u32,
    ) -> Result<Option<Bytes>, DecodeError> {
        let offset = self.offset();
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes(length_bytes_max)?)),
            flag => Err(DecodeError::BadFlag { offset, flag }),
        }
    }

    pub(crate) fn bool(&mut self) -> Result<bool, DecodeError> {
        let offset = self.offset();
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            flag => Err(DecodeError::BadFlag { offset, flag }),
        }
    }
}

pub(crate) fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    // Lengths are bounded by FIELD_BYTES_MAX (< 4 GiB) before anything is encoded.
    debug_assert!(bytes.len() <= u32::MAX as usize);
    out.put_u32_le(bytes.len() as u32);
    out.put_slice(bytes);
}

pub(crate) fn put_opt_bytes(out: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => out.put_u8(0),
        Some(b) => {
            out.put_u8(1);
            put_bytes(out, b);
        }
    }
}

/// Encoded size of a length-prefixed byte string.
pub(crate) fn bytes_len(bytes: &[u8]) -> usize {
    4 + bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let buf = Bytes::from_static(&[5, 0, 0, 0, b'a', b'b']);
        let mut r = Reader::new(&buf);
        assert_eq!(
            r.bytes(100),
            Err(DecodeError::Truncated {
                offset: 4,
                needed_bytes: 3
            })
        );
        let mut r = Reader::new(&buf);
        assert!(matches!(
            r.bytes(4),
            Err(DecodeError::LengthTooLarge { offset: 0, .. })
        ));
        let empty = Bytes::new();
        assert!(Reader::new(&empty).u64().is_err());
    }

    #[test]
    fn byte_fields_are_slices_of_the_input() {
        let mut out = BytesMut::new();
        put_bytes(&mut out, b"hello");
        let buf = out.freeze();
        let mut r = Reader::new(&buf);
        let field = r.bytes(10).unwrap();
        assert_eq!(&field[..], b"hello");
        // Same memory: no copy was made.
        assert_eq!(field.as_ptr(), buf[4..].as_ptr());
        r.finish().unwrap();
    }
}
