//! Segment files: names, and the recovery scan of one segment's bytes.
//!
//! The scan is a pure function over the file's bytes so that crash tests can run it at every
//! cut and bit flip without touching a disk; [`crate::Wal::open`] applies its verdict.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::record::{
    RecordHeader, KIND_PAD, KIND_SEAL, KIND_TRUNCATE, PAD_PAYLOAD_BYTES_MAX, RECORD_ALIGN_BYTES,
    SEGMENT_HEADER_BYTES,
};

const SEGMENT_SUFFIX: &str = ".wal";
const SPARE_PREFIX: &str = "spare-";

/// `0000000042.wal`: fixed width, so a directory listing sorts in log order.
pub fn segment_file_name(seq: u32) -> String {
    format!("{seq:010}{SEGMENT_SUFFIX}")
}

/// `spare-0000000007.wal`: a preallocated, written file waiting to become a segment.
pub fn spare_file_name(n: u64) -> String {
    format!("{SPARE_PREFIX}{n:010}{SEGMENT_SUFFIX}")
}

/// What a file name in a WAL directory is.
#[derive(Debug, PartialEq, Eq)]
pub enum FileKind {
    Segment(u32),
    Spare(u64),
    Other,
}

pub fn classify(name: &str) -> FileKind {
    let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
        return FileKind::Other;
    };
    if let Some(n) = stem.strip_prefix(SPARE_PREFIX) {
        if n.len() == 10 && n.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = n.parse() {
                return FileKind::Spare(n);
            }
        }
        return FileKind::Other;
    }
    if stem.len() == 10 && stem.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(seq) = stem.parse() {
            return FileKind::Segment(seq);
        }
    }
    FileKind::Other
}

pub fn segment_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(segment_file_name(seq))
}

/// One valid record found by the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedRecord {
    pub index: u64,
    pub term: u64,
    pub kind: u8,
    /// Offset of the record header in the segment.
    pub offset: u64,
    pub payload_len: u32,
}

/// A torn tail found at the end of the last segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Offset of the first bad record: everything from here on is dropped.
    pub offset: u64,
    /// End of the last byte of this segment's generation found beyond `offset` (a torn header's
    /// claimed extent, or a record written in the same unsynced burst): the range to zero.
    pub drop_end: u64,
}

/// The verdict of scanning one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// Valid records in file order, truncation markers included. Indexes may go back: a later
    /// record overwrites the suffix from its index on, and a truncation marker (kind
    /// `KIND_TRUNCATE`) removes it; that is how `truncate_suffix` is persisted, append-only.
    pub records: Vec<ScannedRecord>,
    /// Offset just past the last valid record (where the next record goes).
    pub end_offset: u64,
    /// The segment ends with a seal record: it is complete and read-only.
    pub sealed: bool,
    /// Set when the last segment ends with a torn write to drop.
    pub torn: Option<TornTail>,
}

/// Scans the records of segment `seq` whose header says it starts at `first_index`.
///
/// Accepts records while each is valid (magic, segment, length, CRC) and its index is in
/// `[first_index, previous + 1]`; a seal ends the segment. At the first bad record:
/// - in a non-last segment, that is corruption: the segment was sealed and synced before the
///   next one received anything, so its whole content was durable.
/// - in the last segment, the rest of the file is searched for a valid record of this segment.
///   Each carries the offset below which the segment was durable when it was written; if one
///   says the bad offset was already durable, acknowledged data is damaged (corruption).
///   Otherwise the bad bytes were an unsynced write cut short by the crash: a torn tail.
pub fn scan_segment(
    bytes: &[u8],
    path: &Path,
    seq: u32,
    first_index: u64,
    is_last: bool,
    payload_bytes_max: u32,
) -> Result<SegmentScan> {
    // Padding records may be longer than an entry may be: validity checks use the larger
    // bound, and entries are held to `payload_bytes_max` below.
    let entry_bytes_max = payload_bytes_max;
    let payload_bytes_max = payload_bytes_max.max(PAD_PAYLOAD_BYTES_MAX);
    let mut records = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut last_index = first_index - 1;
    let len = bytes.len() as u64;
    loop {
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        let header = bytes
            .get(at..)
            .and_then(|b| RecordHeader::check(b, seq, first_index, payload_bytes_max));
        let plausible = header.filter(|h| {
            let index = h.index;
            if h.kind == KIND_SEAL {
                index == last_index && h.payload_len == 0
            } else if h.kind == KIND_PAD {
                index == last_index
            } else if h.kind == KIND_TRUNCATE {
                index >= first_index && index <= last_index + 1 && h.payload_len == 0
            } else {
                index >= first_index && index <= last_index + 1 && h.payload_len <= entry_bytes_max
            }
        });
        let Some(h) = plausible else { break };
        let payload_len = h.payload_len;
        if h.kind == KIND_PAD {
            offset += RecordHeader::record_bytes(payload_len as usize) as u64;
            continue;
        }
        if h.kind == KIND_SEAL {
            let end = offset + RecordHeader::record_bytes(0) as u64;
            return Ok(SegmentScan {
                records,
                end_offset: end,
                sealed: true,
                torn: None,
            });
        }
        records.push(ScannedRecord {
            index: h.index,
            term: h.term,
            kind: h.kind,
            offset,
            payload_len,
        });
        last_index = if h.kind == KIND_TRUNCATE {
            h.index - 1
        } else {
            h.index
        };
        offset += RecordHeader::record_bytes(payload_len as usize) as u64;
    }
    // `offset` is the first position without a valid record.
    if !is_last {
        return Err(Error::Corruption {
            path: path.to_path_buf(),
            offset,
            reason: format!(
                "sealed segment has no valid record or seal here (after index {last_index})"
            ),
        });
    }
    let mut drop_end = offset;
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    if let Some(b) = bytes.get(at..) {
        let peek = RecordHeader::peek(b);
        let magic_ok = peek.is_some_and(|(m, _, _)| m == crate::record::RECORD_MAGIC);
        let seq_ok = peek.is_some_and(|(_, s, _)| s == seq);
        if magic_ok && seq_ok {
            // A torn or damaged record of ours: its claimed extent is part of what we drop.
            let claimed = peek.map_or(0, |(_, _, len)| len) as usize;
            let claimed_end =
                offset.saturating_add(RecordHeader::record_bytes(claimed.min(bytes.len())) as u64);
            drop_end = drop_end.max(claimed_end.min(len));
        } else if peek
            // Validity does not depend on the other generation's first index (only the
            // decoded index does), so any first index will do.
            .and_then(|(_, other, _)| RecordHeader::check(b, other, 1, payload_bytes_max))
            .is_some()
        {
            // An intact record of another generation: a leftover of a recycled file, not a
            // write of ours. The log simply ends here.
        } else if magic_ok || seq_ok {
            // One of the two identifying fields is intact but the record does not check out:
            // a damaged header of ours. Drop the header.
            drop_end = drop_end.max((offset + crate::record::RECORD_HEADER_BYTES as u64).min(len));
        }
    }
    let mut probe = offset + RECORD_ALIGN_BYTES as u64;
    while probe + (crate::record::RECORD_HEADER_BYTES as u64) <= len {
        let p = probe as usize;
        // Cheap filter before the CRC: magic and segment must match.
        if RecordHeader::looks_like_start(&bytes[p..], seq) {
            if let Some(h) = RecordHeader::check(&bytes[p..], seq, first_index, payload_bytes_max) {
                if u64::from(h.durable_offset) > offset {
                    return Err(Error::Corruption {
                        path: path.to_path_buf(),
                        offset,
                        reason: format!(
                            "bad record after index {last_index}, but the record at offset \
                             {probe} (index {}) was written after this offset was durable",
                            h.index
                        ),
                    });
                }
                let end = probe + RecordHeader::record_bytes(h.payload_len as usize) as u64;
                drop_end = drop_end.max(end);
                probe = end;
                continue;
            }
        }
        probe += RECORD_ALIGN_BYTES as u64;
    }
    let torn = (drop_end > offset).then_some(TornTail { offset, drop_end });
    Ok(SegmentScan {
        records,
        end_offset: offset,
        sealed: false,
        torn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RECORD_HEADER_BYTES;
    use zerocopy::IntoBytes;

    #[test]
    fn names_round_trip() {
        assert_eq!(classify(&segment_file_name(42)), FileKind::Segment(42));
        assert_eq!(classify(&spare_file_name(7)), FileKind::Spare(7));
        assert_eq!(classify("hardstate"), FileKind::Other);
        assert_eq!(classify("12.wal"), FileKind::Other);
        assert_eq!(classify("spare-x.wal"), FileKind::Other);
        assert_eq!(classify("99999999999.wal"), FileKind::Other);
    }

    fn put(
        bytes: &mut [u8],
        offset: u64,
        seq: u32,
        index: u64,
        durable: u32,
        payload: &[u8],
    ) -> u64 {
        let h = RecordHeader::new(seq, 10, index, 1, 0, durable, payload);
        let o = offset as usize;
        bytes[o..o + RECORD_HEADER_BYTES].copy_from_slice(h.as_bytes());
        bytes[o + RECORD_HEADER_BYTES..o + RECORD_HEADER_BYTES + payload.len()]
            .copy_from_slice(payload);
        offset + RecordHeader::record_bytes(payload.len()) as u64
    }

    #[test]
    fn zero_tail_is_clean_and_garbage_of_other_generation_is_ignored() {
        let mut b = vec![0u8; 16384];
        let mut off = SEGMENT_HEADER_BYTES;
        off = put(&mut b, off, 3, 10, 4096, b"a");
        off = put(&mut b, off, 3, 11, 4096, b"bb");
        // A record of an older life of this file (segment 2) further on: not ours.
        put(&mut b, off + 64, 2, 12, 65535, b"old");
        let s = scan_segment(&b, Path::new("x"), 3, 10, true, 1024).unwrap();
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.end_offset, off);
        assert_eq!(s.torn, None);
        assert!(!s.sealed);
    }

    #[test]
    fn overwrite_is_accepted_and_gaps_are_not() {
        let mut b = vec![0u8; 16384];
        let mut off = SEGMENT_HEADER_BYTES;
        off = put(&mut b, off, 3, 10, 4096, b"a");
        off = put(&mut b, off, 3, 11, 4096, b"b");
        off = put(&mut b, off, 3, 11, 4096, b"c");
        let gap_at = off;
        put(&mut b, off, 3, 13, 4096, b"d");
        let s = scan_segment(&b, Path::new("x"), 3, 10, true, 1024).unwrap();
        let idx: Vec<u64> = s.records.iter().map(|r| r.index).collect();
        assert_eq!(idx, vec![10, 11, 11]);
        assert_eq!(s.end_offset, gap_at);
        assert!(s.torn.is_some());
    }
}
