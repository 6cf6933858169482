//! Commands and their log encoding.
//!
//! One Raft entry payload carries either a batch of client commands (the server batches one loop
//! turn's requests into one proposal) or one shard admin command. The format is a compact
//! little-endian binary one with a bound on every count and length:
//!
//! ```text
//! payload        := version:u8 (=1) kind:u8 body          (an empty payload is a no-op entry)
//! kind 1 (batch) := timestamp_ms:u64 count:u32 (1..=BATCH_COMMANDS_MAX) command*count
//! command        := client_id:u64 seq:u64 op_code:u8 op_body
//! kind 2 (admin) := admin_code:u8 admin_body
//!
//! bytes          := length:u32 (<= FIELD_BYTES_MAX) data
//! opt            := 0:u8 | 1:u8 bytes
//! op_body by op_code:
//!   1 Get, 2 Exists, 6 Delete   key:bytes
//!   3 MGet                       count:u32 (1..=MULTI_KEYS_MAX) key:bytes*count
//!   4 Put, 5 Append              key:bytes value:bytes
//!   7 Incr                       key:bytes delta:i64
//!   8 Cas                        key:bytes expected:opt new:opt
//!   9 MPut                       count:u32 (1..=MULTI_KEYS_MAX) (key:bytes value:bytes)*count
//!  10 OpenSession, 11 CloseSession  (empty; the session is the command's client_id)
//!  12 PutIfPresent               key:bytes value:bytes
//! admin_body by admin_code:
//!   1 SetState  shard:u16 state:u8 (1 Serving, 2 Importing, 3 Exporting)
//!   2 Import    blob:bytes (the output of `StateMachine::export_shard`)
//!   3 Delete    shard:u16
//! ```
//!
//! `client_id` 0 means "no session": the write is applied without duplicate detection (what a
//! plain RESP connection gets). The structural bounds here (`FIELD_BYTES_MAX`, counts) only keep a
//! garbage payload from asking for absurd work; the configured key and value limits are checked
//! at apply time and give a [`KvError`](super::KvError) result, never a partial write.
//!
//! Cost sketch: decoding walks the payload once; a key or value is a `Bytes::slice` of the
//! payload (no copy, no allocation); the only allocations are the batch's command vector and
//! the key vector of a multi-key command.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{bytes_len, put_bytes, put_opt_bytes, Reader};
use super::error::DecodeError;

/// Version byte at the start of every non-empty entry payload.
pub const FORMAT_VERSION: u8 = 1;
/// Bound on the commands of one batch entry.
pub const BATCH_COMMANDS_MAX: u32 = 16_384;
/// Bound on the keys of one multi-key command (MGet / MPut).
pub const MULTI_KEYS_MAX: u32 = 1_024;
/// Structural bound on one key or value field; the configured limits are lower.
pub const FIELD_BYTES_MAX: u32 = 64 << 20;

const KIND_BATCH: u8 = 1;
const KIND_ADMIN: u8 = 2;

const OP_GET: u8 = 1;
const OP_EXISTS: u8 = 2;
const OP_MGET: u8 = 3;
const OP_PUT: u8 = 4;
const OP_APPEND: u8 = 5;
const OP_DELETE: u8 = 6;
const OP_INCR: u8 = 7;
const OP_CAS: u8 = 8;
const OP_MPUT: u8 = 9;
const OP_OPEN_SESSION: u8 = 10;
const OP_CLOSE_SESSION: u8 = 11;
const OP_PUT_IF_PRESENT: u8 = 12;

const ADMIN_SET_STATE: u8 = 1;
const ADMIN_IMPORT: u8 = 2;
const ADMIN_DELETE: u8 = 3;

/// The state of a shard held by this group. A shard that is not held has no state (absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShardState {
    /// Reads and writes are served.
    Serving,
    /// Being received from another group: nothing is served until the import installs it.
    Importing,
    /// Frozen for hand-over: no writes (so the exported blob stays the truth); stale reads only.
    Exporting,
}

impl ShardState {
    pub(crate) fn code(self) -> u8 {
        match self {
            ShardState::Serving => 1,
            ShardState::Importing => 2,
            ShardState::Exporting => 3,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<ShardState> {
        match code {
            1 => Some(ShardState::Serving),
            2 => Some(ShardState::Importing),
            3 => Some(ShardState::Exporting),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ShardState::Serving => "serving",
            ShardState::Importing => "importing",
            ShardState::Exporting => "exporting",
        }
    }
}

/// One key-value operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get {
        key: Bytes,
    },
    Exists {
        key: Bytes,
    },
    /// Multi-key get; all keys must be in one shard.
    MGet {
        keys: Vec<Bytes>,
    },
    Put {
        key: Bytes,
        value: Bytes,
    },
    /// Appends to the value; on a missing key acts like Put. Result: the new length.
    Append {
        key: Bytes,
        value: Bytes,
    },
    /// Result: 1 if the key existed, else 0.
    Delete {
        key: Bytes,
    },
    /// Adds `delta` to the decimal integer value (missing = 0). Result: the new value.
    Incr {
        key: Bytes,
        delta: i64,
    },
    /// Compare-and-set: if the current value equals `expected` (None = missing), set it to `new`
    /// (None = delete). Result: whether it swapped.
    Cas {
        key: Bytes,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    },
    /// Sets the value only if the key exists (Redis `SET ... XX`). Result: whether it was set.
    PutIfPresent {
        key: Bytes,
        value: Bytes,
    },
    /// Multi-key put; all keys must be in one shard; all or nothing.
    MPut {
        pairs: Vec<(Bytes, Bytes)>,
    },
    /// Registers the command's `client_id` as a session (idempotent).
    OpenSession,
    /// Forgets the command's session.
    CloseSession,
}

impl Op {
    /// Whether the op may change state: everything but Get, Exists and MGet. Data writes go
    /// through session duplicate detection; session ops are idempotent by themselves.
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. } | Op::Exists { .. } | Op::MGet { .. })
    }

    fn code(&self) -> u8 {
        match self {
            Op::Get { .. } => OP_GET,
            Op::Exists { .. } => OP_EXISTS,
            Op::MGet { .. } => OP_MGET,
            Op::Put { .. } => OP_PUT,
            Op::Append { .. } => OP_APPEND,
            Op::Delete { .. } => OP_DELETE,
            Op::Incr { .. } => OP_INCR,
            Op::Cas { .. } => OP_CAS,
            Op::PutIfPresent { .. } => OP_PUT_IF_PRESENT,
            Op::MPut { .. } => OP_MPUT,
            Op::OpenSession => OP_OPEN_SESSION,
            Op::CloseSession => OP_CLOSE_SESSION,
        }
    }

    fn encoded_len(&self) -> usize {
        1 + match self {
            Op::Get { key } | Op::Exists { key } | Op::Delete { key } => bytes_len(key),
            Op::MGet { keys } => 4 + keys.iter().map(|k| bytes_len(k)).sum::<usize>(),
            Op::Put { key, value }
            | Op::Append { key, value }
            | Op::PutIfPresent { key, value } => bytes_len(key) + bytes_len(value),
            Op::Incr { key, .. } => bytes_len(key) + 8,
            Op::Cas { key, expected, new } => {
                bytes_len(key)
                    + 1
                    + expected.as_ref().map_or(0, |v| bytes_len(v))
                    + 1
                    + new.as_ref().map_or(0, |v| bytes_len(v))
            }
            Op::MPut { pairs } => {
                4 + pairs
                    .iter()
                    .map(|(k, v)| bytes_len(k) + bytes_len(v))
                    .sum::<usize>()
            }
            Op::OpenSession | Op::CloseSession => 0,
        }
    }

    fn encode(&self, out: &mut BytesMut) {
        out.put_u8(self.code());
        match self {
            Op::Get { key } | Op::Exists { key } | Op::Delete { key } => put_bytes(out, key),
            Op::MGet { keys } => {
                out.put_u32_le(keys.len() as u32);
                for key in keys {
                    put_bytes(out, key);
                }
            }
            Op::Put { key, value }
            | Op::Append { key, value }
            | Op::PutIfPresent { key, value } => {
                put_bytes(out, key);
                put_bytes(out, value);
            }
            Op::Incr { key, delta } => {
                put_bytes(out, key);
                out.put_i64_le(*delta);
            }
            Op::Cas { key, expected, new } => {
                put_bytes(out, key);
                put_opt_bytes(out, expected.as_deref());
                put_opt_bytes(out, new.as_deref());
            }
            Op::MPut { pairs } => {
                out.put_u32_le(pairs.len() as u32);
                for (key, value) in pairs {
                    put_bytes(out, key);
                    put_bytes(out, value);
                }
            }
            Op::OpenSession | Op::CloseSession => {}
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Op, DecodeError> {
        let offset = r.offset();
        let code = r.u8()?;
        let op = match code {
            OP_GET => Op::Get {
                key: r.bytes(FIELD_BYTES_MAX)?,
            },
            OP_EXISTS => Op::Exists {
                key: r.bytes(FIELD_BYTES_MAX)?,
            },
            OP_DELETE => Op::Delete {
                key: r.bytes(FIELD_BYTES_MAX)?,
            },
            OP_MGET => {
                let count = r.count(MULTI_KEYS_MAX)?;
                let mut keys = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    keys.push(r.bytes(FIELD_BYTES_MAX)?);
                }
                Op::MGet { keys }
            }
            OP_PUT => Op::Put {
                key: r.bytes(FIELD_BYTES_MAX)?,
                value: r.bytes(FIELD_BYTES_MAX)?,
            },
            OP_APPEND => Op::Append {
                key: r.bytes(FIELD_BYTES_MAX)?,
                value: r.bytes(FIELD_BYTES_MAX)?,
            },
            OP_PUT_IF_PRESENT => Op::PutIfPresent {
                key: r.bytes(FIELD_BYTES_MAX)?,
                value: r.bytes(FIELD_BYTES_MAX)?,
            },
            OP_INCR => Op::Incr {
                key: r.bytes(FIELD_BYTES_MAX)?,
                delta: r.i64()?,
            },
            OP_CAS => Op::Cas {
                key: r.bytes(FIELD_BYTES_MAX)?,
                expected: r.opt_bytes(FIELD_BYTES_MAX)?,
                new: r.opt_bytes(FIELD_BYTES_MAX)?,
            },
            OP_MPUT => {
                let count = r.count(MULTI_KEYS_MAX)?;
                let mut pairs = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let key = r.bytes(FIELD_BYTES_MAX)?;
                    let value = r.bytes(FIELD_BYTES_MAX)?;
                    pairs.push((key, value));
                }
                Op::MPut { pairs }
            }
            OP_OPEN_SESSION => Op::OpenSession,
            OP_CLOSE_SESSION => Op::CloseSession,
            code => return Err(DecodeError::BadOpCode { offset, code }),
        };
        Ok(op)
    }
}

/// A client command: an op plus the (client id, sequence) pair used for exactly-once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The client's session id; 0 = no session (no duplicate detection).
    pub client_id: u64,
    /// The client's sequence number of this write (ignored for reads and session ops).
    pub seq: u64,
    pub op: Op,
}

/// A shard admin command, ordered through the log so that every replica agrees which writes
/// came before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardAdmin {
    /// Creates the shard in `state` if absent, or moves it to `state`.
    SetState { shard: u16, state: ShardState },
    /// Installs a blob from `export_shard` (the shard must be absent or Importing); it becomes
    /// Serving.
    Import { blob: Bytes },
    /// Drops the shard and its data.
    Delete { shard: u16 },
}

/// A decoded log entry payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An empty payload (e.g. a leader's no-op entry).
    Noop,
    Batch {
        /// Stamped by the proposing leader; apply uses the max seen as the log time.
        timestamp_ms: u64,
        commands: Vec<Command>,
    },
    Admin(ShardAdmin),
}

impl Entry {
    /// Decodes an entry payload. Never panics: any input that is not a valid encoding is an
    /// error with the offset where decoding stopped.
    pub fn decode(payload: &Bytes) -> Result<Entry, DecodeError> {
        if payload.is_empty() {
            return Ok(Entry::Noop);
        }
        let mut r = Reader::new(payload);
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::BadVersion { offset: 0, version });
        }
        let kind_offset = r.offset();
        let entry = match r.u8()? {
            KIND_BATCH => {
                let timestamp_ms = r.u64()?;
                let count = r.count(BATCH_COMMANDS_MAX)?;
                // Each command takes at least 17 bytes: do not let a forged count reserve more
                // memory than the payload could describe.
                let capacity = (count as usize).min(r.remaining() / 17 + 1);
                let mut commands = Vec::with_capacity(capacity);
                for _ in 0..count {
                    let client_id = r.u64()?;
                    let seq = r.u64()?;
                    let op = Op::decode(&mut r)?;
                    commands.push(Command { client_id, seq, op });
                }
                Entry::Batch {
                    timestamp_ms,
                    commands,
                }
            }
            KIND_ADMIN => {
                let offset = r.offset();
                let admin = match r.u8()? {
                    ADMIN_SET_STATE => {
                        let shard = r.u16()?;
                        let state_offset = r.offset();
                        let code = r.u8()?;
                        let state = ShardState::from_code(code).ok_or(DecodeError::BadField {
                            offset: state_offset,
                            field: "shard state",
                            value: u64::from(code),
                        })?;
                        ShardAdmin::SetState { shard, state }
                    }
                    ADMIN_IMPORT => ShardAdmin::Import {
                        blob: r.bytes(u32::MAX)?,
                    },
                    ADMIN_DELETE => ShardAdmin::Delete { shard: r.u16()? },
                    code => return Err(DecodeError::BadAdminCode { offset, code }),
                };
                Entry::Admin(admin)
            }
            kind => {
                return Err(DecodeError::BadEntryKind {
                    offset: kind_offset,
                    kind,
                })
            }
        };
        r.finish()?;
        Ok(entry)
    }
}

/// Encodes a batch entry. Panics (a programmer error) on an empty or oversized batch or an
/// oversized field: the server checks [`super::Config::check_op`] before proposing.
pub fn encode_batch(timestamp_ms: u64, commands: &[Command]) -> Bytes {
    assert!(!commands.is_empty() && commands.len() <= BATCH_COMMANDS_MAX as usize);
    let size = 2
        + 8
        + 4
        + commands
            .iter()
            .map(|c| 16 + c.op.encoded_len())
            .sum::<usize>();
    let mut out = BytesMut::with_capacity(size);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(KIND_BATCH);
    out.put_u64_le(timestamp_ms);
    out.put_u32_le(commands.len() as u32);
    for command in commands {
        assert_op_within_bounds(&command.op);
        out.put_u64_le(command.client_id);
        out.put_u64_le(command.seq);
        command.op.encode(&mut out);
    }
    debug_assert_eq!(out.len(), size);
    out.freeze()
}

/// Encodes a shard admin entry.
pub fn encode_admin(admin: &ShardAdmin) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(FORMAT_VERSION);
    out.put_u8(KIND_ADMIN);
    match admin {
        ShardAdmin::SetState { shard, state } => {
            out.put_u8(ADMIN_SET_STATE);
            out.put_u16_le(*shard);
            out.put_u8(state.code());
        }
        ShardAdmin::Import { blob } => {
            out.put_u8(ADMIN_IMPORT);
            assert!(blob.len() <= u32::MAX as usize);
            put_bytes(&mut out, blob);
        }
        ShardAdmin::Delete { shard } => {
            out.put_u8(ADMIN_DELETE);
            out.put_u16_le(*shard);
        }
    }
    out.freeze()
}

fn assert_op_within_bounds(op: &Op) {
    let field_ok = |b: &Bytes| b.len() <= FIELD_BYTES_MAX as usize;
    let ok = match op {
        Op::Get { key } | Op::Exists { key } | Op::Delete { key } | Op::Incr { key, .. } => {
            field_ok(key)
        }
        Op::MGet { keys } => {
            !keys.is_empty() && keys.len() <= MULTI_KEYS_MAX as usize && keys.iter().all(field_ok)
        }
        Op::Put { key, value } | Op::Append { key, value } | Op::PutIfPresent { key, value } => {
            field_ok(key) && field_ok(value)
        }
        Op::Cas { key, expected, new } => {
            field_ok(key) && expected.iter().all(field_ok) && new.iter().all(field_ok)
        }
        Op::MPut { pairs } => {
            !pairs.is_empty()
                && pairs.len() <= MULTI_KEYS_MAX as usize
                && pairs.iter().all(|(k, v)| field_ok(k) && field_ok(v))
        }
        Op::OpenSession | Op::CloseSession => true,
    };
    assert!(ok, "op exceeds the structural bounds of the entry format");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn all_ops() -> Vec<Op> {
        vec![
            Op::Get { key: b("k") },
            Op::Exists { key: b("") },
            Op::MGet {
                keys: vec![b("a"), b("b")],
            },
            Op::Put {
                key: b("k"),
                value: b("v"),
            },
            Op::Append {
                key: b("k"),
                value: Bytes::from_static(&[0, 255, 10]),
            },
            Op::Delete { key: b("k") },
            Op::Incr {
                key: b("n"),
                delta: -7,
            },
            Op::Cas {
                key: b("k"),
                expected: None,
                new: Some(b("x")),
            },
            Op::Cas {
                key: b("k"),
                expected: Some(b("x")),
                new: None,
            },
            Op::MPut {
                pairs: vec![(b("a"), b("1")), (b("b"), b(""))],
            },
            Op::PutIfPresent {
                key: b("k"),
                value: b("only if present"),
            },
            Op::OpenSession,
            Op::CloseSession,
        ]
    }

    #[test]
    fn batch_round_trips() {
        let commands: Vec<Command> = all_ops()
            .into_iter()
            .enumerate()
            .map(|(i, op)| Command {
                client_id: 42,
                seq: i as u64 + 1,
                op,
            })
            .collect();
        let payload = encode_batch(1234, &commands);
        let decoded = Entry::decode(&payload).unwrap();
        assert_eq!(
            decoded,
            Entry::Batch {
                timestamp_ms: 1234,
                commands
            }
        );
    }

    #[test]
    fn admin_round_trips() {
        for admin in [
            ShardAdmin::SetState {
                shard: 7,
                state: ShardState::Exporting,
            },
            ShardAdmin::Import { blob: b("blob") },
            ShardAdmin::Delete { shard: 16383 },
        ] {
            let payload = encode_admin(&admin);
            assert_eq!(Entry::decode(&payload).unwrap(), Entry::Admin(admin));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let commands: Vec<Command> = all_ops()
            .into_iter()
            .map(|op| Command {
                client_id: 1,
                seq: 1,
                op,
            })
            .collect();
        let payload = encode_batch(1, &commands);
        for len in 1..payload.len() {
            let cut = payload.slice(..len);
            assert!(
                Entry::decode(&cut).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
        let mut longer = BytesMut::from(&payload[..]);
        longer.put_u8(0);
        assert!(matches!(
            Entry::decode(&longer.freeze()),
            Err(DecodeError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn forged_counts_are_rejected_without_reserving_memory() {
        let mut out = BytesMut::new();
        out.put_u8(FORMAT_VERSION);
        out.put_u8(KIND_BATCH);
        out.put_u64_le(0);
        out.put_u32_le(BATCH_COMMANDS_MAX + 1);
        assert!(matches!(
            Entry::decode(&out.freeze()),
            Err(DecodeError::BadCount { offset: 10, .. })
        ));
    }
}
