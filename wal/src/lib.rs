//! # tynamo-wal: the storage of one Raft group
//!
//! Three things live in a group's directory, all written through glommio DMA files
//! (O_DIRECT, io_uring) and made durable with fdatasync:
//!
//! - the **log** ([`Wal`]): segment files of records, with group commit;
//! - the **hard state** ([`HardStateFile`]): term, vote and commit in two alternating slots;
//! - **snapshots** ([`SnapshotStore`]): temporary file, fdatasync, rename, directory fsync.
//!
//! Errors are values ([`Error`]) that name the file and offset. Recovery never panics on any
//! file content; a torn tail (a write that was never acknowledged) is dropped and reported,
//! while damage to acknowledged data is reported as [`Error::Corruption`] so that the node can
//! refuse to start or repair the replica from its peers. An fdatasync failure stops the log
//! ([`Error::SyncFailed`], then [`Error::Poisoned`]): it is never retried.
//!
//! ## Usage
//! ```no_run
//! # async fn demo() -> tynamo_wal::Result<()> {
//! use tynamo_wal::{EntryRef, Wal, WalOptions};
//! let wal = Wal::open("/var/lib/tynamo/group-7/wal", WalOptions::default()).await?;
//! let next = wal.last_index() + 1;
//! let durable = wal
//!     .append(&[EntryRef { index: next, term: 1, kind: 0, payload: b"set k v" }])
//!     .await?; // returns once one fdatasync covers the batch
//! assert_eq!(durable, next..=next);
//! let read = wal.entries(next, next + 1, 1 << 20).await?;
//! # let _ = read; Ok(()) }
//! ```
//!
//! ## Contract and limits
//! - One [`Wal`] per group directory, owned by one executor (`!Send`); methods take `&self`
//!   and may run concurrently as tasks: appends issued while a sync is in flight share the
//!   next write and fdatasync (group commit). `append` takes entries contiguous from
//!   `last_index() + 1`; call `truncate_suffix` first to replace a conflicting suffix. A
//!   batch of 192 KiB or more that finds the log idle is written in slices while it is
//!   encoded; appends issued meanwhile wait for it, then share the next round.
//! - Every call that returns `Ok` from `append`, `truncate_suffix` or `compact_prefix` is
//!   durable. Do not drop those futures midway: the log then stops rather than guess.
//! - Bounds: `segment_bytes` (default 64 MiB, at most 1 GiB), `entry_bytes_max` (8 MiB by
//!   default, at most 16 MiB - 1: the record's length field has 24 bits),
//!   `staged_bytes_max` (64 MiB staged and not yet written; beyond it `append` returns
//!   [`Error::Busy`]), `spare_segments_max` (2). Reads return at most `bytes_max` payload
//!   bytes (but at least one entry).
//! - Call [`Wal::prepare_spares`] off the hot path (after open, after compactions): a segment
//!   roll then reuses a preallocated, already written file instead of writing a segment of
//!   zeros. Compacted segments are recycled as spares.
//! - `open` reads segments with blocking `std::fs` reads: it is a startup path.
//! - A round is staged in the executor's registered I/O arena (`LocalExecutorBuilder::
//!   io_memory`) when it has room, so that its write is a fixed-buffer request, and the
//!   buffer goes back to the arena after the write; otherwise in heap buffers the log pools.
//!   An arena of at least twice the usual round (the server: 1 MiB, the benchmark: 2 MiB)
//!   keeps most rounds there.
//! - Recovery's torn-or-corrupt verdict relies on the durable offset each record carries. It
//!   is taken when the record is staged, so it can lag (records staged while the previous
//!   sync was in flight carry the older value): damage to the very last synced batch, with
//!   only such records after it, is then reported as a torn tail. The lag never goes the
//!   other way, so a torn tail is never reported as corruption. A payload that embeds a valid
//!   record image of the same segment could make a torn tail look like corruption (a refusal
//!   to start, never a silent loss).
//!
//! ## On-disk format (all integers little-endian)
//!
//! ### Directory
//! | name | what |
//! | --- | --- |
//! | `0000000042.wal` | segment with sequence number 42 (10 decimal digits, sorts in log order) |
//! | `spare-0000000007.wal` | a preallocated segment-sized file waiting to become a segment |
//! | `hardstate` | two hard-state slots |
//! | `snap-<index:20>-<term:20>.snap` | a complete snapshot; `*.snap.tmp` is an unfinished one |
//!
//! ### Segment file (`segment_bytes`, default 64 MiB, preallocated and written before use)
//! Bytes 0..4096 are the segment header block; records start at 4096, each at an offset that
//! is a multiple of 8.
//!
//! Segment header (bytes 32..4096 are zero):
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"TWSG"` |
//! | 4 | 4 | format version (3; versions 1 and 2 are refused, see below) |
//! | 8 | 4 | segment sequence number (equals the file name) |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | first index: the index of the segment's first record (also when empty) |
//! | 24 | 4 | CRC32 (IEEE) of bytes 0..24 |
//! | 28 | 4 | reserved, 0 |
//!
//! Record = 32-byte header + payload + zero padding to a multiple of 8 (a 128-byte entry takes
//! 160 bytes):
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"TWRC"` |
//! | 4 | 4 | CRC32C (Castagnoli) of header bytes 0..4 and 8..32, then the payload |
//! | 8 | 4 | segment sequence number (a record left over from a recycled file's former life does not match) |
//! | 12 | 3 | payload length in bytes (24 bits, so at most 16 MiB - 1) |
//! | 15 | 1 | kind: 0..=252 caller-defined entry kinds, 253 = padding, 254 = truncation marker, 255 = seal |
//! | 16 | 8 | term |
//! | 24 | 4 | index relative to the segment: index - segment first index + 1 (0 only for the seal of an empty segment) |
//! | 28 | 4 | durable offset: every byte of this segment below it was durable when the record was encoded |
//!
//! Format history: version 1 had 40-byte record headers; version 2 had this layout with an IEEE
//! CRC32 (crc32fast); version 3 checksums records with CRC32C, which x86-64 computes with one
//! instruction per 8 bytes (several records in parallel, see `crc32c.rs`). The segment header
//! keeps its IEEE CRC32 in every version. A segment of another version is refused on open
//! ([`Error::Corruption`] at offset 0, the reason naming the version), never misread.
//!
//! The relative index is exact: records of a segment (at most 1 GiB, at least 32 bytes each)
//! have indexes in `[first index - 1, first index + 2^25]`. Every header bit is covered by the
//! CRC; there are no reserved bytes.
//!
//! Rules a reader applies:
//! - A record is valid when magic, segment number, length (at most `entry_bytes_max`, inside
//!   the file) and CRC agree, and its index is in `[first index, previous + 1]`.
//!   An index at or below the previous one overwrites the suffix from there, and a
//!   **truncation marker** (kind 254, no payload) with index `i` removes entries `i..`: this
//!   is how `truncate_suffix` is persisted without rewriting anything. Likewise a segment whose header
//!   first index is at or below the previous segment's last index overwrites that suffix.
//! - A **seal** record (kind 255, no payload, index = the segment's last index) ends a segment.
//!   A segment is sealed and fdatasynced before the next segment receives any byte, so every
//!   segment but the last must end with its seal; anything else is corruption.
//! - In the last segment, the first invalid record ends the log. If a valid record of this
//!   segment lies beyond it and its durable offset is above the bad offset, acknowledged data
//!   was damaged: corruption. Otherwise the bytes were a write the crash cut short: they are
//!   zeroed and reported as dropped (the torn tail).
//! - A **padding** record (kind 253, index = the previous record's index, payload of zeros,
//!   at most 8 KiB in all) is skipped. Every write ends with one, on a block boundary
//!   (the file system block, 4096 here, or the DMA alignment if larger), so that the next
//!   write starts on a fresh block and no block is written twice. It reaches one block
//!   further when the gap to the boundary is below 32 bytes. The room for a padding record
//!   and a seal is always kept free at a segment's end.
//! - A segment whose first index is above the previous segment's last index + 1 marks an
//!   interrupted compaction: the segments before it are removed.
//! - Writes cover whole blocks. Only the first write after a recovery that ended inside a
//!   block rewrites that partial block, with its old bytes unchanged, so a torn write can only
//!   damage records of the batch being written.
//! - A large batch may go out as several writes (slices of its records, each ending with a
//!   padding record) in flight together and covered by one fdatasync. A crash may leave any
//!   subset of them on disk; their records carry a durable offset at or below the batch's
//!   start, so whatever is missing or torn among them is a torn tail, as for one write.
//!
//! ### `hardstate` (8192 bytes: slot 0 at 0, slot 1 at 4096)
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"THST"` |
//! | 4 | 4 | version (1) |
//! | 8 | 8 | generation (>= 1; save `g` goes to slot `g % 2`) |
//! | 16 | 8 | term |
//! | 24 | 8 | vote (node id, 0 = none) |
//! | 32 | 8 | commit index |
//! | 40 | 4 | CRC32 of bytes 0..40 |
//! | 44 | 4 | reserved, 0 |
//!
//! The valid slot with the highest generation is the hard state; two damaged slots are
//! corruption; two zero slots mean none was ever saved.
//!
//! ### Snapshot file
//! A 4096-byte header block, then the data (the file is exactly 4096 + data length bytes):
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"TSNP"` |
//! | 4 | 4 | version (1) |
//! | 8 | 8 | last included index (equals the file name) |
//! | 16 | 8 | last included term (equals the file name) |
//! | 24 | 8 | data length |
//! | 32 | 4 | CRC32 of the data |
//! | 36 | 4 | CRC32 of bytes 0..36 |

mod crc32c;
mod error;
mod hard_state;
mod io;
mod log;
mod notify;
mod record;
mod segment;
mod snapshot;
mod stream;

pub use error::{Error, Result};
pub use hard_state::{HardState, HardStateFile};
/// Call before the first glommio DMA open on a device from an executor thread if that open
/// may be of an empty file (see its docs): `Wal`, `HardStateFile` and `SnapshotStore` do.
pub use io::probe_device_once;
pub use log::{Entry, EntryRef, RecoveryReport, Wal, WalOptions, WalStats};
pub use snapshot::{Snapshot, SnapshotMeta, SnapshotReport, SnapshotStore};

/// Pure decoders of the on-disk formats, for crash tests and tools: they take a file's bytes
/// and return what recovery would conclude, without touching a disk.
pub mod format {
    pub use crate::hard_state::{decode as decode_hard_state, Loaded as LoadedHardState};
    pub use crate::record::{
        RecordHeader, SegmentHeader, KIND_SEAL, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
    };
    pub use crate::segment::{scan_segment, ScannedRecord, SegmentScan, TornTail};
    pub use crate::snapshot::decode as decode_snapshot;
}
