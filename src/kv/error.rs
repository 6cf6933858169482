//! Errors of the key-value state machine.
//!
//! Two families, kept apart on purpose:
//! - [`DecodeError`]: bytes that do not parse (a log entry, a snapshot frame, a shard blob).
//!   Always carries the byte offset where parsing stopped.
//! - [`KvError`]: the deterministic error *result* of applying a well-formed command (a key over
//!   the limit, a shard this group does not serve, ...). It is a value handed back to the client,
//!   identical on every replica, and never changes the state.

use thiserror::Error;

/// A byte string that does not decode. `offset` is relative to the start of the buffer handed to
/// the decoder (entry payload, frame body or blob).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated at offset {offset}: needed {needed_bytes} more bytes")]
    Truncated { offset: usize, needed_bytes: usize },
    #[error("unknown format version {version} at offset {offset}")]
    BadVersion { offset: usize, version: u8 },
    #[error("unknown entry kind {kind} at offset {offset}")]
    BadEntryKind { offset: usize, kind: u8 },
    #[error("unknown op code {code} at offset {offset}")]
    BadOpCode { offset: usize, code: u8 },
    #[error("unknown shard admin code {code} at offset {offset}")]
    BadAdminCode { offset: usize, code: u8 },
    #[error("invalid flag byte {flag} at offset {offset}")]
    BadFlag { offset: usize, flag: u8 },
    #[error("count {count} at offset {offset} is outside 1..={count_max}")]
    BadCount {
        offset: usize,
        count: u64,
        count_max: u64,
    },
    #[error("length {length_bytes} at offset {offset} exceeds the limit {length_bytes_max}")]
    LengthTooLarge {
        offset: usize,
        length_bytes: u64,
        length_bytes_max: u64,
    },
    #[error("{trailing_bytes} trailing bytes at offset {offset}")]
    TrailingBytes {
        offset: usize,
        trailing_bytes: usize,
    },
    #[error("invalid value {value} for {field} at offset {offset}")]
    BadField {
        offset: usize,
        field: &'static str,
        value: u64,
    },
}

/// The deterministic error result of a command. Every replica computes the same one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvError {
    #[error("key of {size_bytes} bytes exceeds the limit of {size_bytes_max} bytes")]
    KeyTooLarge {
        size_bytes: u64,
        size_bytes_max: u64,
    },
    #[error("value of {size_bytes} bytes exceeds the limit of {size_bytes_max} bytes")]
    ValueTooLarge {
        size_bytes: u64,
        size_bytes_max: u64,
    },
    #[error("{count} keys in one command exceed the limit of {count_max}")]
    TooManyKeys { count: u64, count_max: u64 },
    #[error("keys of one command fall in different shards ({shard_first} and {shard_other})")]
    CrossShard { shard_first: u16, shard_other: u16 },
    /// The shard is not held by this group (RESP: `-MOVED`).
    #[error("shard {shard} is not held by this group")]
    WrongShard { shard: u16 },
    /// The shard is held but migrating (RESP: `-TRYAGAIN`).
    #[error("shard {shard} is {state} and does not accept this request")]
    ShardNotServing { shard: u16, state: &'static str },
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    #[error("increment or decrement would overflow")]
    IntegerOverflow,
    /// The client's session expired, was evicted, or was never opened: the client must open a
    /// new session (with a new id); the outcome of its in-flight writes is unknown.
    #[error("session of client {client_id} is unknown (expired, evicted or never opened)")]
    SessionUnknown { client_id: u64 },
    /// The write's sequence number is below what the session still remembers: it may or may not
    /// have been applied, and its result is forgotten.
    #[error(
        "sequence {seq} of client {client_id} is below the remembered window (floor {seq_floor})"
    )]
    SequenceTooOld {
        client_id: u64,
        seq: u64,
        seq_floor: u64,
    },
    /// The log entry did not decode; nothing in it was applied.
    #[error("log entry {index} is malformed: {reason}")]
    BadEntry { index: u64, reason: DecodeError },
    /// A shard admin command could not be carried out (import of a bad blob, wrong state, ...).
    #[error("shard {shard}: {reason}")]
    ShardAdmin { shard: u16, reason: String },
    /// A shard blob handed to an import does not decode or does not fit this group.
    #[error("bad shard blob: {reason}")]
    BadShardBlob { reason: String },
    /// The command is a write but was sent to `read`.
    #[error("not a read command")]
    NotARead,
}
