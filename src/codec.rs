//! The bounds-checked little-endian byte reader under the state machines' binary formats: kv
//! entries, snapshots and shard blobs (`kv::codec`), controller configurations, commands,
//! replies and snapshots (`controller::codec`).
//!
//! Every read checks the remaining length first and fails with the byte offset; nothing here
//! panics on any input. Each format keeps its own error type, whose variants say what its
//! fields mean; the two failures every format shares (too few bytes, bytes left over) reach it
//! through `From<ReadError>`, so a read returns the format's own error directly.

use std::marker::PhantomData;

/// A read past the end, or bytes left after the last field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadError {
    Truncated {
        offset: usize,
        needed_bytes: usize,
    },
    TrailingBytes {
        offset: usize,
        trailing_bytes: usize,
    },
}

/// `From<ReadError>` for a format's error type, whose `Truncated` and `TrailingBytes` variants
/// have the same fields as `ReadError`'s.
macro_rules! from_read_error {
    ($error:ty) => {
        impl From<$crate::codec::ReadError> for $error {
            fn from(e: $crate::codec::ReadError) -> Self {
                match e {
                    $crate::codec::ReadError::Truncated {
                        offset,
                        needed_bytes,
                    } => Self::Truncated {
                        offset,
                        needed_bytes,
                    },
                    $crate::codec::ReadError::TrailingBytes {
                        offset,
                        trailing_bytes,
                    } => Self::TrailingBytes {
                        offset,
                        trailing_bytes,
                    },
                }
            }
        }
    };
}
pub(crate) use from_read_error;

/// Reads fields in order from `buf`; every method fails with the format's error `E`.
pub(crate) struct ByteReader<'a, E> {
    buf: &'a [u8],
    pos: usize,
    error: PhantomData<fn() -> E>,
}

impl<'a, E: From<ReadError>> ByteReader<'a, E> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        ByteReader {
            buf,
            pos: 0,
            error: PhantomData,
        }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], E> {
        if self.remaining() < n {
            return Err(ReadError::Truncated {
                offset: self.pos,
                needed_bytes: n - self.remaining(),
            }
            .into());
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..start + n])
    }

    pub(crate) fn u8(&mut self) -> Result<u8, E> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, E> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, E> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, E> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, E> {
        Ok(self.u64()? as i64)
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<(), E> {
        if self.remaining() != 0 {
            return Err(ReadError::TrailingBytes {
                offset: self.pos,
                trailing_bytes: self.remaining(),
            }
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_little_endian_bounds_checked_and_report_the_offset() {
        let mut r = ByteReader::<ReadError>::new(&[1, 2, 0, 3, 0, 0, 0, 9]);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(2));
        assert_eq!(r.u32(), Ok(3));
        assert_eq!(r.offset(), 7);
        assert_eq!(
            r.u16(),
            Err(ReadError::Truncated {
                offset: 7,
                needed_bytes: 1
            })
        );
        assert_eq!(
            r.finish(),
            Err(ReadError::TrailingBytes {
                offset: 7,
                trailing_bytes: 1
            })
        );
        assert_eq!(r.u8(), Ok(9));
        assert_eq!(r.finish(), Ok(()));
        let mut r = ByteReader::<ReadError>::new(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.i64(), Ok(-2));
    }
}
