//! On-disk record and segment headers (zerocopy, little-endian, no padding).
//!
//! The reader follows check-then-parse: [`RecordHeader::check`] decides whether the bytes at an
//! offset hold a complete, CRC-valid record of the expected segment before anything is used.
//! Nothing in this file panics on any input.

use crate::crc32c;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `b"TWRC"` read as a little-endian u32: marks the start of a record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TWRC");
/// `b"TWSG"`: marks a segment header (offset 0 of every segment file).
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"TWSG");
/// Version of the segment format; a different version is refused, not guessed at. Version 3
/// checksums records with CRC32C; version 2 had the same 32-byte headers with an IEEE CRC32,
/// version 1 had 40-byte headers.
pub const SEGMENT_VERSION: u32 = 3;

/// Why a segment of format version 1 or 2 is refused.
const OLDER_VERSION: &str = "segment format version 1 or 2 (written by an older release): \
    this build reads version 3 only; restore the replica from its peers";

/// Size of the record header in bytes.
pub const RECORD_HEADER_BYTES: usize = 32;
/// Records start at multiples of this within a segment.
pub const RECORD_ALIGN_BYTES: usize = 8;
/// The segment header occupies the first block; records start here. 4096 is the largest DMA
/// alignment we accept, so the first record is aligned for every device we run on.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
/// Size of the meaningful part of the segment header.
pub const SEGMENT_HEADER_USED_BYTES: usize = 32;
/// The payload length is a 24-bit field: the largest `entry_bytes_max` a log accepts.
pub const PAYLOAD_BYTES_LIMIT: u32 = (1 << 24) - 1;
/// Largest padding record: it reaches the next block boundary (blocks are at most
/// `SEGMENT_HEADER_BYTES`), one block further when fewer than a header's bytes are left.
pub const PAD_BYTES_MAX: u64 = 2 * SEGMENT_HEADER_BYTES;
/// Largest payload (zeros) of a padding record.
pub const PAD_PAYLOAD_BYTES_MAX: u32 = (PAD_BYTES_MAX - RECORD_HEADER_BYTES as u64) as u32;

/// Record kind reserved for the seal record that closes a segment.
pub const KIND_SEAL: u8 = 255;
/// Record kind reserved for a truncation marker: "the log ends before this record's index".
/// It persists `truncate_suffix` inside the tail segment without rewriting anything.
pub const KIND_TRUNCATE: u8 = 254;
/// Record kind reserved for padding: it fills the rest of the last block of a write (index =
/// the previous record's index, zero payload) and the reader skips it.
pub const KIND_PAD: u8 = 253;
/// Largest kind a caller may use for its entries.
pub const KIND_USER_MAX: u8 = 252;

/// The CRC covers the magic (a constant) and then the contiguous bytes from `CRC_FROM` to the
/// end of the payload: the encoder hashes that range in one pass, starting from the CRC
/// register after the magic instead of hashing the four magic bytes each time.
pub const CRC_FROM: usize = 8;
/// The raw CRC32C register after the magic (initial value `!0`, no final inversion).
pub const MAGIC_CRC_REGISTER: u32 = crc32c::update_const(!0, &RECORD_MAGIC.to_le_bytes());

const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);
const _: () = assert!(RECORD_HEADER_BYTES % RECORD_ALIGN_BYTES == 0);
const _: () = assert!(std::mem::size_of::<SegmentHeader>() == SEGMENT_HEADER_USED_BYTES);
const _: () = assert!(SEGMENT_HEADER_BYTES as usize >= SEGMENT_HEADER_USED_BYTES);

/// Fixed 32-byte header in front of every record payload. See the crate docs for the byte
/// layout. The index is stored relative to the segment's first index (a segment of at most
/// 1 GiB holds fewer than 2^25 records), so decoding needs that first index.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    pub magic: U32,
    /// CRC32C over header bytes 0..4 and 8..32, then the payload.
    pub crc: U32,
    /// Sequence number of the segment this record was written into: records left over from an
    /// older life of a recycled segment file carry a different value and are never accepted.
    pub segment_seq: U32,
    /// Payload length in bytes, 24-bit little-endian.
    pub payload_len: [u8; 3],
    pub kind: u8,
    pub term: U64,
    /// `index - segment first index + 1` (0 only for the seal of an empty segment).
    pub index_rel: U32,
    /// Every byte of this segment below this offset was durable (fdatasync completed) when this
    /// record was encoded. Recovery uses it to tell a torn tail from lost acknowledged data.
    pub durable_offset: U32,
}

/// A record header that passed [`RecordHeader::check`], with its index made absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedRecord {
    pub index: u64,
    pub term: u64,
    pub kind: u8,
    pub payload_len: u32,
    pub durable_offset: u32,
}

fn u24(b: [u8; 3]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], 0])
}

impl RecordHeader {
    /// A header for `payload` (used by tests and tools; the log encodes in place with
    /// [`RecordHeader::encode_in_place`]). `index` must be in `[first_index - 1, first_index
    /// + 2^32 - 2]` and the payload at most [`PAYLOAD_BYTES_LIMIT`] bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        segment_seq: u32,
        segment_first_index: u64,
        index: u64,
        term: u64,
        kind: u8,
        durable_offset: u32,
        payload: &[u8],
    ) -> Self {
        let mut header = Self::without_crc(
            segment_seq,
            segment_first_index,
            index,
            term,
            kind,
            durable_offset,
            payload.len(),
        );
        header.crc = U32::new(header.compute_crc(payload));
        header
    }

    /// The header with a zero CRC field: the encoder fills the CRC in later
    /// ([`RecordHeader::seal_crc`]), several records at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn without_crc(
        segment_seq: u32,
        segment_first_index: u64,
        index: u64,
        term: u64,
        kind: u8,
        durable_offset: u32,
        payload_len: usize,
    ) -> Self {
        let words = Self::words_without_crc(
            segment_seq,
            segment_first_index,
            index,
            term,
            kind,
            durable_offset,
            payload_len,
        );
        let mut bytes = [0u8; RECORD_HEADER_BYTES];
        for (b, w) in bytes.chunks_exact_mut(8).zip(words) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        zerocopy::transmute!(bytes)
    }

    /// [`RecordHeader::without_crc`] as four little-endian 64-bit words, computed in
    /// registers: the encoder checksums and stores these directly, so that no load has to
    /// wait for narrower stores of the header's fields (a failed store-to-load forward
    /// waits for the whole store buffer, see `State::stage_fitting`). Same arguments.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn words_without_crc(
        segment_seq: u32,
        segment_first_index: u64,
        index: u64,
        term: u64,
        kind: u8,
        durable_offset: u32,
        payload_len: usize,
    ) -> [u64; 4] {
        debug_assert!(payload_len <= PAYLOAD_BYTES_LIMIT as usize);
        let index_rel = (index + 1).wrapping_sub(segment_first_index);
        debug_assert!(
            index_rel <= u64::from(u32::MAX),
            "index {index} too far from segment start"
        );
        [
            u64::from(RECORD_MAGIC),
            u64::from(segment_seq)
                | ((payload_len as u64) & 0xFF_FFFF) << 32
                | u64::from(kind) << 56,
            term,
            (index_rel & 0xFFFF_FFFF) | u64::from(durable_offset) << 32,
        ]
    }

    /// The first header word with the CRC field set from the raw register over
    /// `record[CRC_FROM..]` (see [`RecordHeader::seal_crc`]).
    #[inline(always)]
    pub fn seal_word0(word0: u64, register: u32) -> u64 {
        word0 | u64::from(!register) << 32
    }

    /// Writes the header into `record[..RECORD_HEADER_BYTES]`, whose payload already sits at
    /// `record[RECORD_HEADER_BYTES..]` (exactly the payload: `record.len()` is header +
    /// payload), and checksums it in one pass over the copy (still in cache).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_in_place(
        record: &mut [u8],
        segment_seq: u32,
        segment_first_index: u64,
        index: u64,
        term: u64,
        kind: u8,
        durable_offset: u32,
    ) {
        let payload_len = record.len() - RECORD_HEADER_BYTES;
        let header = Self::without_crc(
            segment_seq,
            segment_first_index,
            index,
            term,
            kind,
            durable_offset,
            payload_len,
        );
        record[..RECORD_HEADER_BYTES].copy_from_slice(header.as_bytes());
        let register = crc32c::update(MAGIC_CRC_REGISTER, &record[CRC_FROM..]);
        Self::seal_crc(record, register);
    }

    /// Stores the CRC of a record whose raw CRC32C register over `record[CRC_FROM..]` (header
    /// rest and payload, started from `MAGIC_CRC_REGISTER`) is `register`.
    pub fn seal_crc(record: &mut [u8], register: u32) {
        record[4..8].copy_from_slice(&(!register).to_le_bytes());
    }

    fn compute_crc(&self, payload: &[u8]) -> u32 {
        let register = crc32c::update(MAGIC_CRC_REGISTER, &self.as_bytes()[CRC_FROM..]);
        !crc32c::update(register, payload)
    }

    /// Total bytes the record occupies in the segment, header and padding included.
    pub fn record_bytes(payload_len: usize) -> usize {
        align_up_usize(RECORD_HEADER_BYTES + payload_len, RECORD_ALIGN_BYTES)
    }

    /// Checks the bytes at the start of `bytes` for a complete record of segment `segment_seq`
    /// (whose header says it starts at `segment_first_index`) with a payload of at most
    /// `payload_bytes_max`. Returns the decoded header when magic, segment, length and CRC all
    /// agree, `None` otherwise. Never panics.
    pub fn check(
        bytes: &[u8],
        segment_seq: u32,
        segment_first_index: u64,
        payload_bytes_max: u32,
    ) -> Option<CheckedRecord> {
        let (header, rest) = RecordHeader::read_from_prefix(bytes).ok()?;
        if header.magic.get() != RECORD_MAGIC || header.segment_seq.get() != segment_seq {
            return None;
        }
        let payload_len = u24(header.payload_len);
        if payload_len > payload_bytes_max || payload_len as usize > rest.len() {
            return None;
        }
        let payload = &rest[..payload_len as usize];
        if header.compute_crc(payload) != header.crc.get() {
            return None;
        }
        // index_rel is at most 2^32 - 1 and a segment's first index is at least 1: no overflow
        // below u64::MAX - 2^32; a header claiming more is refused rather than wrapped.
        let index = segment_first_index
            .checked_sub(1)?
            .checked_add(u64::from(header.index_rel.get()))?;
        Some(CheckedRecord {
            index,
            term: header.term.get(),
            kind: header.kind,
            payload_len,
            durable_offset: header.durable_offset.get(),
        })
    }

    /// The identifying fields of whatever is at the start of `bytes` (magic, segment sequence,
    /// claimed payload length), intact or not; `None` when fewer than a header's bytes remain.
    pub fn peek(bytes: &[u8]) -> Option<(u32, u32, u32)> {
        let (h, _) = RecordHeader::read_from_prefix(bytes).ok()?;
        Some((h.magic.get(), h.segment_seq.get(), u24(h.payload_len)))
    }

    /// True when the bytes look like the start of a record of this segment (magic and
    /// sequence match), whether or not the rest of it is intact.
    pub fn looks_like_start(bytes: &[u8], segment_seq: u32) -> bool {
        matches!(Self::peek(bytes), Some((m, s, _)) if m == RECORD_MAGIC && s == segment_seq)
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
        match header.version.get() {
            SEGMENT_VERSION => {}
            1 | 2 => {
                return Err(OLDER_VERSION);
            }
            _ => return Err("unknown segment format version (this build reads version 3)"),
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
        let h = RecordHeader::new(seq, 40, index, 3, 1, 4096, payload);
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(payload);
        v.resize(RecordHeader::record_bytes(payload.len()), 0);
        v
    }

    #[test]
    fn magic_crc_register_matches_crc32c() {
        assert_eq!(!MAGIC_CRC_REGISTER, crc32c::checksum(b"TWRC"));
    }

    /// The CRC is the standard CRC32C of the magic followed by header bytes 8..32 and the
    /// payload: what a tool in another language computes.
    #[test]
    fn record_crc_is_crc32c_of_magic_rest_of_header_and_payload() {
        let bytes = encode(7, 42, b"hello");
        let mut covered = bytes[0..4].to_vec();
        covered.extend_from_slice(&bytes[8..RECORD_HEADER_BYTES + 5]);
        let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        assert_eq!(crc, crc32c::checksum(&covered));
    }

    #[test]
    fn record_round_trip() {
        let bytes = encode(7, 42, b"hello");
        assert_eq!(bytes.len(), 40);
        let h = RecordHeader::check(&bytes, 7, 40, 1024).expect("valid");
        assert_eq!(h.index, 42);
        assert_eq!(h.term, 3);
        assert_eq!(h.kind, 1);
        assert_eq!(h.payload_len, 5);
        assert_eq!(h.durable_offset, 4096);
        // The same bytes read against another segment start give another index: the index is
        // relative, so the reader must pass the header's first index.
        assert_eq!(
            RecordHeader::check(&bytes, 7, 41, 1024).map(|h| h.index),
            Some(43)
        );
    }

    #[test]
    fn header_words_hold_each_field_where_the_struct_has_it() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let first = next() % (1 << 40);
            let index = first + next() % (1 << 31);
            let (seq, term, kind) = (next() as u32, next(), next() as u8);
            let (durable, len) = (next() as u32, (next() % (1 << 24)) as usize);
            let header = RecordHeader::without_crc(seq, first, index, term, kind, durable, len);
            let words =
                RecordHeader::words_without_crc(seq, first, index, term, kind, durable, len);
            assert_eq!(header.magic.get(), RECORD_MAGIC);
            assert_eq!(header.crc.get(), 0);
            assert_eq!(header.segment_seq.get(), seq);
            assert_eq!(u24(header.payload_len) as usize, len);
            assert_eq!(header.kind, kind);
            assert_eq!(header.term.get(), term);
            assert_eq!(u64::from(header.index_rel.get()), index + 1 - first);
            assert_eq!(header.durable_offset.get(), durable);
            let register = next() as u32;
            let mut sealed = header;
            RecordHeader::seal_crc(sealed.as_mut_bytes(), register);
            assert_eq!(
                RecordHeader::seal_word0(words[0], register).to_le_bytes(),
                sealed.as_bytes()[..8]
            );
        }
    }

    #[test]
    fn encode_in_place_matches_new() {
        for (index, payload) in [(39u64, &b""[..]), (40, b"x"), (1000, &[0xA5; 300][..])] {
            let expected = encode(9, index, payload);
            let mut rec = vec![0xFFu8; RECORD_HEADER_BYTES + payload.len()];
            rec[RECORD_HEADER_BYTES..].copy_from_slice(payload);
            RecordHeader::encode_in_place(&mut rec, 9, 40, index, 3, 1, 4096);
            assert_eq!(rec[..], expected[..rec.len()], "index {index}");
            let h = RecordHeader::check(&expected, 9, 40, 1024).expect("valid");
            assert_eq!((h.index, h.payload_len as usize), (index, payload.len()));
        }
    }

    #[test]
    fn record_rejects_every_single_bit_flip() {
        let bytes = encode(7, 42, b"payload bytes");
        let used = RECORD_HEADER_BYTES + 13;
        for bit in 0..used * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                RecordHeader::check(&b, 7, 40, 1024).is_none(),
                "bit {bit} accepted"
            );
        }
    }

    #[test]
    fn record_rejects_other_segment_truncation_and_oversize() {
        let bytes = encode(7, 42, b"payload");
        assert!(RecordHeader::check(&bytes, 8, 40, 1024).is_none());
        assert!(RecordHeader::check(&bytes, 7, 40, 6).is_none());
        assert!(RecordHeader::check(&bytes, 7, 0, 1024).is_none());
        for cut in 0..RECORD_HEADER_BYTES + 7 {
            assert!(RecordHeader::check(&bytes[..cut], 7, 40, 1024).is_none());
        }
        assert!(RecordHeader::check(&[0u8; 64], 0, 1, 1024).is_none());
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

    /// Version 2 used the same layout with an IEEE CRC32: its segments are refused with a
    /// reason that says so, not misread (their records would all fail the CRC32C check and
    /// look like a torn tail).
    #[test]
    fn older_and_unknown_versions_are_refused_by_name() {
        for (version, words) in [
            (1u32, "version 1 or 2"),
            (2, "version 1 or 2"),
            (4, "unknown"),
        ] {
            let mut h = SegmentHeader::new(9, 100);
            h.version = U32::new(version);
            h.crc = U32::new(crc32fast::hash(&h.as_bytes()[0..24]));
            let reason = SegmentHeader::check(h.as_bytes()).expect_err("refused");
            assert!(reason.contains(words), "version {version}: {reason}");
        }
    }
}
