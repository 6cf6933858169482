//! The replicated key-value state machine: commands and their log encoding, exactly-once
//! sessions, shard hand-over, snapshots.
//!
//! Sans-IO: no sockets, files, clocks or threads. The Raft driver (in `node/`) owns a
//! [`StateMachine`] per group and:
//! 1. proposes [`encode_batch`] payloads (one per loop turn, many client commands) and
//!    [`encode_admin`] payloads (shard state changes, imports, deletes);
//! 2. calls [`StateMachine::apply`] for every committed entry in log order and answers the
//!    waiting clients with the returned [`Outcome`]s (one per command, in order);
//! 3. serves reads with [`StateMachine::read`]: `Linearizable` after ReadIndex/lease confirmed
//!    leadership and apply caught up to the read index, `Stale` from any replica;
//! 4. when [`StateMachine::snapshot_due`], streams [`StateMachine::snapshot_writer`] to a
//!    snapshot file, calls [`StateMachine::mark_snapshot_taken`], and compacts the log; restores
//!    with [`SnapshotReader`] / [`restore`].
//!
//! Garbage in a log entry never panics: it applies nothing and yields one
//! `Outcome::Err(KvError::BadEntry { index, .. })`, the same on every replica.

mod codec;
pub mod command;
pub mod error;
mod key;
pub mod outcome;
mod session;
pub mod snapshot;
pub mod state_machine;

pub use command::{
    encode_admin, encode_batch, Command, Entry, Op, ShardAdmin, ShardState, BATCH_COMMANDS_MAX,
    FIELD_BYTES_MAX, FORMAT_VERSION, MULTI_KEYS_MAX,
};
pub use error::{DecodeError, KvError};
pub use outcome::{Outcome, WriteResult};
pub use snapshot::{
    restore, shard_blob_shard, SnapshotError, SnapshotReader, SnapshotWriter, FRAME_BODY_BYTES_MAX,
};
pub use state_machine::{Config, ConfigError, ReadConsistency, StateMachine};
