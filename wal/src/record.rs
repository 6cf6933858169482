//! On-disk record and segment headers (zerocopy, little-endian, no padding).
//!
//! The reader follows check-then-parse: [`RecordHeader::check`] decides whether the bytes at an
//! offset hold a complete, CRC-valid record of the expected segment before anything is used.
//! Nothing in this file panics on any input.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `b"TWRC"` read as a little-endian u32: marks the start of a record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TWRC");
/// `b"TWSG"`: marks a segment header (offset 0 of every segment file).
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"TWSG");
/// Version of the segment format; a different version is refused, not guessed at.
pub const SEGMENT_VERSION: u32 = 1;

/// Size of the record header in bytes.
pub const RECORD_HEADER_BYTES: usize = 40;
/// Records start at multiples of this within a segment.
pub const RECORD_ALIGN_BYTES: usize = 8;
/// The segment header occupies the first block; records start here. 4096 is the largest DMA
/// alignment we accept, so the first record is aligned for every device we run on.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
/// Size of the meaningful part of the segment header.
pub const SEGMENT_HEADER_USED_BYTES: usize = 32;

/// Record kind reserved for the seal record that closes a segment.
pub const KIND_SEAL: u8 = 255;
/// Record kind reserved for a truncation marker: "the log ends before this record's index".
/// It persists `truncate_suffix` inside the tail segment without rewriting anything.
pub const KIND_TRUNCATE: u8 = 254;
/// Largest kind a caller may use for its entries.
pub const KIND_USER_MAX: u8 = 253;

const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);
const _: () = assert!(RECORD_HEADER_BYTES % RECORD_ALIGN_BYTES == 0);
const _: () = assert!(std::mem::size_of::<SegmentHeader>() == SEGMENT_HEADER_USED_BYTES);
const _: () = assert!(SEGMENT_HEADER_BYTES as usize >= SEGMENT_HEADER_USED_BYTES);

/// Fixed header in front of every record payload. See the crate docs for the byte layout.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    pub magic: U32,
    /// CRC32 (IEEE, crc32fast) over header bytes 0..4 and 8..40, then the payload.
    pub crc: U32,
    pub payload_len: U32,
    /// Sequence number of the segment this record was written into: records left over from an
    /// older life of a recycled segment file carry a different value and are never accepted.
    pub segment_seq: U32,
    pub term: U64,
    pub index: U64,
    pub kind: u8,
    pub reserved: [u8; 3],
    /// Every byte of this segment below this offset was durable (fdatasync completed) when this
    /// record was encoded. Recovery uses it to tell a torn tail from lost acknowledged data.
    pub durable_offset: U32,
}

impl RecordHeader {
    pub fn new(
        segment_seq: u32,
        index: u64,
        term: u64,
        kind: u8,
        durable_offset: u32,
        payload: &[u8],
    ) -> Self {
        let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        debug_assert_eq!(payload_len as usize, payload.len());
        let mut header = RecordHeader {
            magic: U32::new(RECORD_MAGIC),
            crc: U32::new(0),
            payload_len: U32::new(payload_len),
            segment_seq: U32::new(segment_seq),
            term: U64::new(term),
            index: U64::new(index),
            kind,
            reserved: [0; 3],
            durable_offset: U32::new(durable_offset),
        };
        header.crc = U32::new(header.compute_crc(payload));
        header
    }

    fn compute_crc(&self, payload: &[u8]) -> u32 {
        let bytes = self.as_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&bytes[0..4]);
        hasher.update(&bytes[8..RECORD_HEADER_BYTES]);
        hasher.update(payload);
        hasher.finalize()
    }

    /// Total bytes the record occupies in the segment, header and padding included.
    pub fn record_bytes(payload_len: usize) -> usize {
        align_up_usize(RECORD_HEADER_BYTES + payload_len, RECORD_ALIGN_BYTES)
    }

    /// Checks the bytes at the start of `bytes` for a complete record of segment `segment_seq`
    /// with a payload of at most `payload_bytes_max`. Returns the header when magic, segment,
    /// length and CRC all agree, `None` otherwise. Never panics.
    pub fn check(bytes: &[u8], segment_seq: u32, payload_bytes_max: u32) -> Option<RecordHeader> {
        let (header, rest) = RecordHeader::read_from_prefix(bytes).ok()?;
        if header.magic.get() != RECORD_MAGIC || header.segment_seq.get() != segment_seq {
            return None;
        }
        let payload_len = header.payload_len.get();
        if payload_len > payload_bytes_max || payload_len as usize > rest.len() {
            return None;
        }
        if header.reserved != [0; 3] {
            return None;
        }
        let payload = &rest[..payload_len as usize];
        if header.compute_crc(payload) != header.crc.get() {
            return None;
        }
        Some(header)
    }

    /// True when the bytes look like the start of a record of this segment (magic and
    /// sequence match), whether or not the rest of it is intact.
    pub fn looks_like_start(bytes: &[u8], segment_seq: u32) -> bool {
        match RecordHeader::read_from_prefix(bytes) {
            Ok((h, _)) => h.magic.get() == RECORD_MAGIC && h.segment_seq.get() == segment_seq,
            Err(_) => false,
        }
    }
}

/// Header at offset 0 of every segment file (the rest of the first 4096 bytes is zero).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentHeader {
    pub magic: U32,
    pub version: U32,
    pub seq: U32,
    pub reserved: U32,
    /// Index of the first record this segment holds (or would hold, if it is empty).
    pub first_index: U64,
    /// CRC32 over bytes 0..24.
    pub crc: U32,
    pub reserved2: U32,
}

impl SegmentHeader {
    pub fn new(seq: u32, first_index: u64) -> Self {
        let mut header = SegmentHeader {
            magic: U32::new(SEGMENT_MAGIC),
            version: U32::new(SEGMENT_VERSION),
            seq: U32::new(seq),
            reserved: U32::new(0),
            first_index: U64::new(first_index),
            crc: U32::new(0),
            reserved2: U32::new(0),
        };
        header.crc = U32::new(crc32fast::hash(&header.as_bytes()[0..24]));
        header
    }

    /// Parses and checks a segment header. Returns a reason when it is not valid.
    pub fn check(bytes: &[u8]) -> Result<SegmentHeader, &'static str> {
        let (header, _) =
            SegmentHeader::read_from_prefix(bytes).map_err(|_| "file shorter than a header")?;
        if header.magic.get() != SEGMENT_MAGIC {
            return Err("bad segment magic");
        }
        if crc32fast::hash(&header.as_bytes()[0..24]) != header.crc.get() {
            return Err("segment header crc mismatch");
        }
        if header.version.get() != SEGMENT_VERSION {
            return Err("unsupported segment version");
        }
        if header.first_index.get() == 0 {
            return Err("segment first index is 0");
        }
        Ok(header)
    }
}

pub fn align_up_usize(v: usize, align: usize) -> usize {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

pub fn align_up_u64(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

pub fn align_down_u64(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    v & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(seq: u32, index: u64, payload: &[u8]) -> Vec<u8> {
        let h = RecordHeader::new(seq, index, 3, 1, 4096, payload);
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(payload);
        v.resize(RecordHeader::record_bytes(payload.len()), 0);
        v
    }

    #[test]
    fn record_round_trip() {
        let bytes = encode(7, 42, b"hello");
        assert_eq!(bytes.len(), 48);
        let h = RecordHeader::check(&bytes, 7, 1024).expect("valid");
        assert_eq!(h.index.get(), 42);
        assert_eq!(h.term.get(), 3);
        assert_eq!(h.payload_len.get(), 5);
        assert_eq!(h.durable_offset.get(), 4096);
    }

    #[test]
    fn record_rejects_every_single_bit_flip() {
        let bytes = encode(7, 42, b"payload bytes");
        let used = RECORD_HEADER_BYTES + 13;
        for bit in 0..used * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                RecordHeader::check(&b, 7, 1024).is_none(),
                "bit {bit} accepted"
            );
        }
    }

    #[test]
    fn record_rejects_other_segment_truncation_and_oversize() {
        let bytes = encode(7, 42, b"payload");
        assert!(RecordHeader::check(&bytes, 8, 1024).is_none());
        assert!(RecordHeader::check(&bytes, 7, 6).is_none());
        for cut in 0..RECORD_HEADER_BYTES + 7 {
            assert!(RecordHeader::check(&bytes[..cut], 7, 1024).is_none());
        }
        assert!(RecordHeader::check(&[0u8; 64], 0, 1024).is_none());
    }

    #[test]
    fn segment_header_round_trip_and_bit_flips() {
        let h = SegmentHeader::new(9, 100);
        let bytes = h.as_bytes().to_vec();
        let back = SegmentHeader::check(&bytes).expect("valid");
        assert_eq!(back.seq.get(), 9);
        assert_eq!(back.first_index.get(), 100);
        for bit in 0..24 * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::check(&b).is_err(), "bit {bit} accepted");
        }
        assert!(SegmentHeader::check(&bytes[..10]).is_err());
    }
}
