//! Bounds-checked little-endian reader shared by the entry, snapshot and shard-blob decoders.
//!
//! Every read checks the remaining length first and returns [`DecodeError::Truncated`] with the
//! offset; nothing here can panic on any input. Byte fields are returned as `Bytes::slice`s of the
//! input buffer (a reference-count increment, no copy), so a payload kept from the receive buffer
//! or the WAL is never copied by decoding.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::DecodeError;

pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                needed_bytes: n - self.remaining(),
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..start + n])
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }

    /// A `u32` count that must lie in `1..=count_max`.
    pub(crate) fn count(&mut self, count_max: u32) -> Result<u32, DecodeError> {
        let offset = self.pos;
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
        let offset = self.pos;
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
        Ok(self.buf.slice(self.pos - length..self.pos))
    }

    /// An optional byte string: a flag byte (0 absent, 1 present) then the string.
    pub(crate) fn opt_bytes(
        &mut self,
        length_bytes_max: u32,
    ) -> Result<Option<Bytes>, DecodeError> {
        let offset = self.pos;
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes(length_bytes_max)?)),
            flag => Err(DecodeError::BadFlag { offset, flag }),
        }
    }

    pub(crate) fn bool(&mut self) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            flag => Err(DecodeError::BadFlag { offset, flag }),
        }
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::TrailingBytes {
                offset: self.pos,
                trailing_bytes: self.remaining(),
            });
        }
        Ok(())
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
