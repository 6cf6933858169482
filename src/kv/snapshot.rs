//! Snapshots and shard hand-over blobs: a streaming, framed format with a CRC per frame.
//!
//! ```text
//! stream := frame*
//! frame  := body_len:u32 crc:u32 kind:u8 body[body_len]    crc = CRC-32 (IEEE, zlib's) of kind || body
//!
//! kind 1 Header      magic:u32 "TYKV" version:u16 applied_index:u64 log_time_ms:u64 shard_count:u16
//! kind 2 Shard       shard:u16 state:u8 key_count:u64           (shards in increasing order)
//! kind 3 Pairs       shard:u16 count:u32 (key:bytes value:bytes)*count   (keys increasing)
//! kind 4 Sessions    count:u32 session*count                     (after all shards)
//! kind 5 End         shard_count:u32 key_count:u64 session_count:u64
//! kind 6 BlobHeader  magic:u32 "TYSH" version:u16 shard:u16 shard_count:u16 key_count:u64
//! session := client_id:u64 last_active_ms:u64 seq_floor:u64 count:u32
//!            (seq:u64 shard:u16 tag:u8 [i64 | u8])*count
//! ```
//!
//! A snapshot is Header, then per shard a Shard frame and its Pairs frames, then Sessions frames,
//! then End. A shard blob (`export_shard`) is BlobHeader, Pairs, Sessions, End. The writer
//! iterates the state in a deterministic order (shard, key; sessions by activity then id) and
//! yields one frame per chunk, about `chunk_bytes_target` each, so a replica streams a snapshot
//! to disk or to a peer without building it whole. The reader takes chunks of any size, keeps at
//! most one partial frame buffered, checks every CRC, count, order and shard of every key, and
//! fails with the stream offset of the bad frame on truncation or garbage. A restored value
//! that is most of its frame (a large value) stays a slice of the frame buffer; smaller keys
//! and values are copied out so they do not pin whole frames (see `detach`).
//! All integers are little-endian; `bytes` is a u32 length then the bytes.
//!
//! The writer borrows the state machine: apply cannot run while a snapshot is being produced.
//! The driver drains it into memory or writes it out within one loop turn; sizing: at ~1 GB/s
//! memcpy, a 1 GiB state takes ~1 s, so large states need a copy-on-write map (not done yet).

use std::collections::{btree_map, BTreeMap, HashSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::codec::{put_bytes, Reader};
use super::command::{ShardState, FIELD_BYTES_MAX};
use super::error::DecodeError;
use super::key::Key;
use super::session::{decode_session, encode_session, Session};
use super::state_machine::{detach, Config, ConfigError, ShardData, StateMachine};
use crate::shard::key_shard;

const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"TYKV");
const BLOB_MAGIC: u32 = u32::from_le_bytes(*b"TYSH");
const VERSION: u16 = 1;
const FRAME_HEADER_BYTES: usize = 9;
/// One pair of maximal key and value always fits in one frame.
pub const FRAME_BODY_BYTES_MAX: u32 = 2 * FIELD_BYTES_MAX + 64;
/// Sessions per Sessions frame.
const SESSIONS_PER_FRAME_MAX: u32 = 4096;
/// Pairs per Pairs frame (bounds the work a forged count can ask for).
const PAIRS_PER_FRAME_MAX: u32 = 1 << 20;

const KIND_HEADER: u8 = 1;
const KIND_SHARD: u8 = 2;
const KIND_PAIRS: u8 = 3;
const KIND_SESSIONS: u8 = 4;
const KIND_END: u8 = 5;
const KIND_BLOB_HEADER: u8 = 6;

/// A snapshot or blob stream that cannot be restored. `offset` is the stream offset of the
/// frame at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnapshotError {
    #[error("frame at offset {offset}: body of {body_bytes} bytes exceeds {body_bytes_max}")]
    FrameTooLarge {
        offset: u64,
        body_bytes: u64,
        body_bytes_max: u64,
    },
    #[error(
        "frame at offset {offset}: crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BadCrc {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("frame at offset {offset}: {reason}")]
    BadFrame { offset: u64, reason: DecodeError },
    #[error("frame at offset {offset}: {what}")]
    Invalid { offset: u64, what: String },
    #[error("stream truncated at offset {offset}: {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn begin_frame(out: &mut BytesMut, kind: u8) -> usize {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u32_le(0);
    out.put_u8(kind);
    start
}

fn end_frame(out: &mut BytesMut, start: usize) {
    let body_bytes = out.len() - start - FRAME_HEADER_BYTES;
    assert!(
        body_bytes <= FRAME_BODY_BYTES_MAX as usize,
        "frame too large"
    );
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(body_bytes as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Writes one Pairs frame from `pairs`, stopping after about `chunk_bytes_target` bytes.
/// Returns the number of pairs written (at least one if any remain).
fn write_pairs<'a>(
    out: &mut BytesMut,
    shard: u16,
    pairs: &mut std::iter::Peekable<btree_map::Iter<'a, Key, Bytes>>,
    chunk_bytes_target: usize,
) -> u32 {
    let start = begin_frame(out, KIND_PAIRS);
    out.put_u16_le(shard);
    let count_at = out.len();
    out.put_u32_le(0);
    let mut count: u32 = 0;
    while let Some((key, value)) = pairs.peek() {
        let size = 8 + key.len() + value.len();
        let full = out.len() - start + size > chunk_bytes_target || count == PAIRS_PER_FRAME_MAX;
        if count > 0 && full {
            break;
        }
        put_bytes(out, key);
        put_bytes(out, value);
        count += 1;
        pairs.next();
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    end_frame(out, start);
    count
}

fn write_sessions(
    out: &mut BytesMut,
    sessions: &mut dyn Iterator<Item = (u64, &Session)>,
    chunk_bytes_target: usize,
) -> u32 {
    let start = begin_frame(out, KIND_SESSIONS);
    let count_at = out.len();
    out.put_u32_le(0);
    let mut count: u32 = 0;
    for (client_id, session) in &mut *sessions {
        encode_session(out, client_id, session);
        count += 1;
        if out.len() - start >= chunk_bytes_target || count == SESSIONS_PER_FRAME_MAX {
            break;
        }
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    end_frame(out, start);
    count
}

fn write_end(out: &mut BytesMut, shard_count: u32, key_count: u64, session_count: u64) {
    let start = begin_frame(out, KIND_END);
    out.put_u32_le(shard_count);
    out.put_u64_le(key_count);
    out.put_u64_le(session_count);
    end_frame(out, start);
}

enum Stage<'a> {
    Header,
    Shards {
        shards: btree_map::Iter<'a, u16, ShardData>,
        current: Option<(u16, std::iter::Peekable<btree_map::Iter<'a, Key, Bytes>>)>,
    },
    Sessions(std::iter::Peekable<Box<dyn Iterator<Item = (u64, &'a Session)> + 'a>>),
    End,
    Done,
}

/// Streams a snapshot of a state machine, one frame per item.
pub struct SnapshotWriter<'a> {
    sm: &'a StateMachine,
    chunk_bytes_target: usize,
    stage: Stage<'a>,
    key_count: u64,
    session_count: u64,
}

impl StateMachine {
    /// A streaming snapshot of the current state (at `applied_index`), in chunks of about
    /// `chunk_bytes_target` bytes (a chunk may be larger to hold one big pair).
    pub fn snapshot_writer(&self, chunk_bytes_target: usize) -> SnapshotWriter<'_> {
        SnapshotWriter {
            sm: self,
            chunk_bytes_target: chunk_bytes_target.max(64),
            stage: Stage::Header,
            key_count: 0,
            session_count: 0,
        }
    }
}

impl Iterator for SnapshotWriter<'_> {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let mut out = BytesMut::new();
        loop {
            match &mut self.stage {
                Stage::Header => {
                    let start = begin_frame(&mut out, KIND_HEADER);
                    out.put_u32_le(SNAPSHOT_MAGIC);
                    out.put_u16_le(VERSION);
                    out.put_u64_le(self.sm.applied_index);
                    out.put_u64_le(self.sm.log_time_ms);
                    out.put_u16_le(self.sm.config.shard_count);
                    end_frame(&mut out, start);
                    self.stage = Stage::Shards {
                        shards: self.sm.shards.iter(),
                        current: None,
                    };
                    return Some(out.freeze());
                }
                Stage::Shards { shards, current } => {
                    if let Some((shard, pairs)) = current {
                        if pairs.peek().is_some() {
                            let count =
                                write_pairs(&mut out, *shard, pairs, self.chunk_bytes_target);
                            self.key_count += u64::from(count);
                            return Some(out.freeze());
                        }
                        *current = None;
                    }
                    match shards.next() {
                        Some((&shard, data)) => {
                            let start = begin_frame(&mut out, KIND_SHARD);
                            out.put_u16_le(shard);
                            out.put_u8(data.state.code());
                            out.put_u64_le(data.data.len() as u64);
                            end_frame(&mut out, start);
                            *current = Some((shard, data.data.iter().peekable()));
                            return Some(out.freeze());
                        }
                        None => {
                            let sessions: Box<dyn Iterator<Item = (u64, &Session)>> =
                                Box::new(self.sm.sessions.iter());
                            self.stage = Stage::Sessions(sessions.peekable());
                        }
                    }
                }
                Stage::Sessions(sessions) => {
                    if sessions.peek().is_none() {
                        self.stage = Stage::End;
                        continue;
                    }
                    let count = write_sessions(&mut out, sessions, self.chunk_bytes_target);
                    self.session_count += u64::from(count);
                    return Some(out.freeze());
                }
                Stage::End => {
                    write_end(
                        &mut out,
                        self.sm.shards.len() as u32,
                        self.key_count,
                        self.session_count,
                    );
                    self.stage = Stage::Done;
                    return Some(out.freeze());
                }
                Stage::Done => return None,
            }
        }
    }
}

pub(crate) fn encode_shard_blob(sm: &StateMachine, shard: u16) -> Bytes {
    let data = &sm
        .shards
        .get(&shard)
        .expect("caller checked the shard")
        .data;
    let sessions = sm.sessions.export_for_shard(shard);
    let mut out = BytesMut::new();
    let start = begin_frame(&mut out, KIND_BLOB_HEADER);
    out.put_u32_le(BLOB_MAGIC);
    out.put_u16_le(VERSION);
    out.put_u16_le(shard);
    out.put_u16_le(sm.config.shard_count);
    out.put_u64_le(data.len() as u64);
    end_frame(&mut out, start);
    let mut pairs = data.iter().peekable();
    while pairs.peek().is_some() {
        write_pairs(&mut out, shard, &mut pairs, 1 << 20);
    }
    let mut iter = sessions.iter().map(|(id, s)| (*id, s)).peekable();
    while iter.peek().is_some() {
        write_sessions(&mut out, &mut iter, 1 << 20);
    }
    write_end(&mut out, 1, data.len() as u64, sessions.len() as u64);
    out.freeze()
}

/// A decoded shard blob, checked and ready to install.
pub(crate) struct ShardBlob {
    pub(crate) shard: u16,
    pub(crate) data: BTreeMap<Key, Bytes>,
    pub(crate) sessions: Vec<(u64, Session)>,
}

pub(crate) fn decode_shard_blob(
    blob: &Bytes,
    shard_count: u16,
) -> Result<ShardBlob, SnapshotError> {
    let mut restorer = Restorer::new(Mode::Blob, shard_count, usize::MAX);
    let mut rest = blob.clone();
    let mut offset = 0u64;
    while !rest.is_empty() {
        match split_frame(&mut rest, offset)? {
            Some((kind, body, frame_bytes)) => {
                restorer.frame(offset, kind, &body)?;
                offset += frame_bytes as u64;
            }
            None => {
                return Err(SnapshotError::Truncated {
                    offset,
                    what: "partial frame at the end of the blob",
                })
            }
        }
    }
    restorer.check_end(offset)?;
    let shard = restorer.blob_shard.ok_or(SnapshotError::Truncated {
        offset,
        what: "no blob header",
    })?;
    let data = restorer
        .shards
        .remove(&shard)
        .map(|s| s.data)
        .unwrap_or_default();
    Ok(ShardBlob {
        shard,
        data,
        sessions: restorer.sessions,
    })
}

/// The shard a blob from [`StateMachine::export_shard`] holds, read from its header frame
/// (size and CRC checked, magic and version compared) without decoding the rest: migration
/// checks a pulled blob is the shard it asked for before installing it.
pub fn shard_blob_shard(blob: &Bytes) -> Result<u16, SnapshotError> {
    let mut rest = blob.clone();
    let Some((kind, body, _)) = split_frame(&mut rest, 0)? else {
        return Err(SnapshotError::Truncated {
            offset: 0,
            what: "no blob header",
        });
    };
    let invalid = |what: String| SnapshotError::Invalid { offset: 0, what };
    if kind != KIND_BLOB_HEADER {
        return Err(invalid(format!(
            "first frame of kind {kind}, not a blob header"
        )));
    }
    let mut r = super::codec::Reader::new(&body);
    let bad = |e: super::error::DecodeError| invalid(e.to_string());
    let magic = r.u32().map_err(bad)?;
    let version = r.u16().map_err(bad)?;
    if magic != BLOB_MAGIC || version != VERSION {
        return Err(invalid(format!(
            "magic {magic:#010x} version {version}, expected {BLOB_MAGIC:#010x} version {VERSION}"
        )));
    }
    r.u16().map_err(bad)
}

/// Splits one complete frame off the front of `buf`, checking its size and CRC. Returns None
/// when `buf` holds only part of a frame.
fn split_frame<B>(buf: &mut B, offset: u64) -> Result<Option<(u8, Bytes, usize)>, SnapshotError>
where
    B: Buf + SplitFront,
{
    if buf.remaining() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let head = buf.chunk();
    let body_bytes = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let stored = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if body_bytes > FRAME_BODY_BYTES_MAX {
        return Err(SnapshotError::FrameTooLarge {
            offset,
            body_bytes: u64::from(body_bytes),
            body_bytes_max: u64::from(FRAME_BODY_BYTES_MAX),
        });
    }
    let frame_bytes = FRAME_HEADER_BYTES + body_bytes as usize;
    if buf.remaining() < frame_bytes {
        return Ok(None);
    }
    let frame = buf.split_front(frame_bytes);
    let computed = crc32fast::hash(&frame[8..]);
    if computed != stored {
        return Err(SnapshotError::BadCrc {
            offset,
            stored,
            computed,
        });
    }
    Ok(Some((
        frame[8],
        frame.slice(FRAME_HEADER_BYTES..),
        frame_bytes,
    )))
}

/// Splitting the front off a buffer as `Bytes` without copying.
trait SplitFront {
    fn split_front(&mut self, n: usize) -> Bytes;
}

impl SplitFront for Bytes {
    fn split_front(&mut self, n: usize) -> Bytes {
        self.split_to(n)
    }
}

impl SplitFront for BytesMut {
    fn split_front(&mut self, n: usize) -> Bytes {
        self.split_to(n).freeze()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Snapshot,
    Blob,
}

/// Checks frames in order and collects the state they describe.
struct Restorer {
    mode: Mode,
    shard_count: u16,
    sessions_max: usize,
    header_seen: bool,
    end_seen: bool,
    applied_index: u64,
    log_time_ms: u64,
    blob_shard: Option<u16>,
    shards: BTreeMap<u16, ShardData>,
    /// The shard whose pairs are being read, and how many keys its header announced.
    current: Option<(u16, u64)>,
    last_key: Option<Bytes>,
    key_count: u64,
    sessions_started: bool,
    sessions: Vec<(u64, Session)>,
    session_ids: HashSet<u64>,
}

impl Restorer {
    fn new(mode: Mode, shard_count: u16, sessions_max: usize) -> Restorer {
        Restorer {
            mode,
            shard_count,
            sessions_max,
            header_seen: false,
            end_seen: false,
            applied_index: 0,
            log_time_ms: 0,
            blob_shard: None,
            shards: BTreeMap::new(),
            current: None,
            last_key: None,
            key_count: 0,
            sessions_started: false,
            sessions: Vec::new(),
            session_ids: HashSet::new(),
        }
    }

    fn frame(&mut self, offset: u64, kind: u8, body: &Bytes) -> Result<(), SnapshotError> {
        let invalid = |what: String| SnapshotError::Invalid { offset, what };
        if self.end_seen {
            return Err(invalid("frame after the end frame".into()));
        }
        let expected_header = match self.mode {
            Mode::Snapshot => KIND_HEADER,
            Mode::Blob => KIND_BLOB_HEADER,
        };
        if !self.header_seen && kind != expected_header {
            return Err(invalid(format!(
                "first frame has kind {kind}, not a header"
            )));
        }
        let mut r = Reader::new(body);
        let bad = |reason: DecodeError| SnapshotError::BadFrame { offset, reason };
        match kind {
            KIND_HEADER | KIND_BLOB_HEADER => {
                if self.header_seen || kind != expected_header {
                    return Err(invalid(format!("unexpected header frame of kind {kind}")));
                }
                self.header_seen = true;
                let magic = r.u32().map_err(bad)?;
                let version = r.u16().map_err(bad)?;
                let want_magic = if kind == KIND_HEADER {
                    SNAPSHOT_MAGIC
                } else {
                    BLOB_MAGIC
                };
                if magic != want_magic || version != VERSION {
                    return Err(invalid(format!(
                        "magic {magic:#010x} version {version}, expected {want_magic:#010x} version {VERSION}"
                    )));
                }
                let shard_count;
                if kind == KIND_HEADER {
                    self.applied_index = r.u64().map_err(bad)?;
                    self.log_time_ms = r.u64().map_err(bad)?;
                    shard_count = r.u16().map_err(bad)?;
                } else {
                    let shard = r.u16().map_err(bad)?;
                    shard_count = r.u16().map_err(bad)?;
                    let key_count = r.u64().map_err(bad)?;
                    if shard >= self.shard_count {
                        return Err(invalid(format!("shard {shard} out of range")));
                    }
                    self.blob_shard = Some(shard);
                    self.begin_shard(shard, ShardState::Serving, key_count);
                }
                if shard_count != self.shard_count {
                    return Err(invalid(format!(
                        "written with {shard_count} shards, this group has {}",
                        self.shard_count
                    )));
                }
            }
            KIND_SHARD => {
                if self.mode != Mode::Snapshot || self.sessions_started {
                    return Err(invalid("unexpected shard frame".into()));
                }
                let shard = r.u16().map_err(bad)?;
                let state_offset = r.offset();
                let code = r.u8().map_err(bad)?;
                let state = ShardState::from_code(code).ok_or_else(|| {
                    bad(DecodeError::BadField {
                        offset: state_offset,
                        field: "shard state",
                        value: u64::from(code),
                    })
                })?;
                let key_count = r.u64().map_err(bad)?;
                self.close_shard(offset)?;
                if shard >= self.shard_count {
                    return Err(invalid(format!("shard {shard} out of range")));
                }
                if self
                    .shards
                    .keys()
                    .next_back()
                    .is_some_and(|&last| last >= shard)
                {
                    return Err(invalid(format!("shard {shard} out of order")));
                }
                self.begin_shard(shard, state, key_count);
            }
            KIND_PAIRS => {
                let shard = r.u16().map_err(bad)?;
                let Some((current, _)) = self.current else {
                    return Err(invalid("pairs outside a shard".into()));
                };
                if shard != current || self.sessions_started {
                    return Err(invalid(format!(
                        "pairs of shard {shard} inside shard {current}"
                    )));
                }
                let count = r.count(PAIRS_PER_FRAME_MAX).map_err(bad)?;
                let data = &mut self
                    .shards
                    .get_mut(&shard)
                    .expect("current shard exists")
                    .data;
                for _ in 0..count {
                    let key_offset = r.offset();
                    let key = r.bytes(FIELD_BYTES_MAX).map_err(bad)?;
                    let value = r.bytes(FIELD_BYTES_MAX).map_err(bad)?;
                    if self.last_key.as_ref().is_some_and(|last| *last >= key) {
                        return Err(invalid(format!(
                            "key at body offset {key_offset} out of order"
                        )));
                    }
                    let key_shard = key_shard(&key, self.shard_count);
                    if key_shard != shard {
                        return Err(invalid(format!(
                            "key at body offset {key_offset} belongs to shard {key_shard}, not {shard}"
                        )));
                    }
                    data.insert(Key::from(&key[..]), detach(value, body.len()));
                    self.last_key = Some(key);
                }
                self.key_count += u64::from(count);
            }
            KIND_SESSIONS => {
                self.close_shard(offset)?;
                self.sessions_started = true;
                let count = r.count(SESSIONS_PER_FRAME_MAX).map_err(bad)?;
                for _ in 0..count {
                    let (client_id, session) = decode_session(&mut r).map_err(bad)?;
                    if !self.session_ids.insert(client_id) {
                        return Err(invalid(format!("session {client_id} appears twice")));
                    }
                    if self.session_ids.len() > self.sessions_max {
                        return Err(invalid(format!(
                            "more than {} sessions (the configured maximum)",
                            self.sessions_max
                        )));
                    }
                    self.sessions.push((client_id, session));
                }
            }
            KIND_END => {
                self.close_shard(offset)?;
                let shard_count = r.u32().map_err(bad)?;
                let key_count = r.u64().map_err(bad)?;
                let session_count = r.u64().map_err(bad)?;
                let have = (
                    self.shards.len() as u64,
                    self.key_count,
                    self.sessions.len() as u64,
                );
                if (u64::from(shard_count), key_count, session_count) != have {
                    return Err(invalid(format!(
                        "end frame counts (shards {shard_count}, keys {key_count}, sessions \
                         {session_count}) differ from the stream's {have:?}"
                    )));
                }
                self.end_seen = true;
            }
            kind => return Err(invalid(format!("unknown frame kind {kind}"))),
        }
        r.finish().map_err(bad)
    }

    fn begin_shard(&mut self, shard: u16, state: ShardState, key_count: u64) {
        self.shards.insert(
            shard,
            ShardData {
                state,
                data: BTreeMap::new(),
            },
        );
        self.current = Some((shard, key_count));
        self.last_key = None;
    }

    fn close_shard(&mut self, offset: u64) -> Result<(), SnapshotError> {
        if let Some((shard, announced)) = self.current.take() {
            let have = self.shards.get(&shard).map_or(0, |s| s.data.len() as u64);
            if have != announced {
                return Err(SnapshotError::Invalid {
                    offset,
                    what: format!("shard {shard} announced {announced} keys but holds {have}"),
                });
            }
        }
        Ok(())
    }

    fn check_end(&self, offset: u64) -> Result<(), SnapshotError> {
        if !self.end_seen {
            return Err(SnapshotError::Truncated {
                offset,
                what: "no end frame",
            });
        }
        Ok(())
    }
}

/// Restores a state machine from a snapshot stream fed in chunks of any size.
pub struct SnapshotReader {
    config: Config,
    restorer: Restorer,
    buf: BytesMut,
    /// Stream offset of `buf[0]`.
    offset: u64,
    failed: Option<SnapshotError>,
}

impl SnapshotReader {
    pub fn new(config: Config) -> Result<SnapshotReader, SnapshotError> {
        config.validate()?;
        let restorer = Restorer::new(Mode::Snapshot, config.shard_count, config.sessions_max);
        Ok(SnapshotReader {
            config,
            restorer,
            buf: BytesMut::new(),
            offset: 0,
            failed: None,
        })
    }

    /// Consumes the next bytes of the stream. After an error, every call returns that error.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), SnapshotError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.buf.extend_from_slice(chunk);
        let result = self.drain();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn drain(&mut self) -> Result<(), SnapshotError> {
        while let Some((kind, body, frame_bytes)) = split_frame(&mut self.buf, self.offset)? {
            self.restorer.frame(self.offset, kind, &body)?;
            self.offset += frame_bytes as u64;
        }
        Ok(())
    }

    /// The restored state; fails if the stream stopped before its end frame.
    pub fn finish(self) -> Result<StateMachine, SnapshotError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if !self.buf.is_empty() {
            return Err(SnapshotError::Truncated {
                offset: self.offset,
                what: "partial frame at the end of the stream",
            });
        }
        self.restorer.check_end(self.offset)?;
        let mut sm = StateMachine::empty(self.config);
        sm.applied_index = self.restorer.applied_index;
        sm.log_time_ms = self.restorer.log_time_ms;
        sm.shards = self.restorer.shards;
        for (client_id, session) in self.restorer.sessions {
            sm.sessions.merge(client_id, session);
        }
        Ok(sm)
    }
}

/// Restores a state machine from a whole snapshot given as chunks.
pub fn restore<I, C>(config: Config, chunks: I) -> Result<StateMachine, SnapshotError>
where
    I: IntoIterator<Item = C>,
    C: AsRef<[u8]>,
{
    let mut reader = SnapshotReader::new(config)?;
    for chunk in chunks {
        reader.feed(chunk.as_ref())?;
    }
    reader.finish()
}
