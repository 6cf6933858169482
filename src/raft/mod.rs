//! Sans-IO Raft: one replica of one group as a deterministic state machine.
//!
//! No sockets, files, clocks, threads or global RNG: time comes in as [`RawNode::tick`],
//! messages as [`RawNode::step`], proposals as [`RawNode::propose`], and the work goes out as a
//! [`Ready`] (see the contract in `core.rs`). Randomness (election timeouts) comes from a seed
//! the caller passes in. The same code runs in the seeded simulator (`crate::sim`) and under the
//! glommio runtime (`crate::node`).
//!
//! Features: PreVote, CheckQuorum, batched and pipelined replication with fast conflict backup,
//! leader appends in parallel with its own fsync, asynchronous storage writes (`log.rs` explains
//! the epoch that makes them safe), snapshots sent in chunks, ReadIndex and lease reads,
//! leadership transfer, single-server membership changes with learners (`membership.rs`).

mod config;
mod core;
mod log;
mod membership;
mod progress;
mod storage;
mod types;

pub use self::config::{Config, ConfigError, ReadMode, TICK_MS_DEFAULT};
pub use self::core::{
    CompactError, Dropped, InitialState, ProposeError, RawNode, ReadError, Ready, Role, Stats,
    Status, TransferError, WriteMark,
};
pub use self::log::PersistMark;
pub use self::membership::{
    apply_change, decode_conf, encode_conf, ConfChange, ConfChangeError, MEMBERS_MAX,
};
pub use self::progress::{Inflights, Progress, ProgressState};
pub use self::storage::LogStore;
pub use self::types::*;
