//! TynamoDB: a sharded, Raft-replicated, strongly consistent key-value store built as an io_uring
//! thread-per-core engine.
//!
//! Crate map (see DESIGN.md for the words):
//! - [`raft`]: sans-IO consensus (`RawNode`, `Ready`), no sockets, files, clocks or threads.
//! - [`sim`]: the seeded simulator that runs many nodes in one thread through faults.
//! - [`kv`]: the replicated key-value state machine, exactly-once sessions, snapshots.
//! - [`check`]: the linearizability checker for recorded histories.
//! - [`resp`]: the RESP (Redis protocol) parser and typed commands.
//! - [`client`]: the cluster-aware client library.
//! - [`node`]: the glommio runtime: executors, transport, timers, the Ready loop.
//! - [`shard`]: key -> slot -> shard mapping and shard migration.
//! - [`schema_gen`]: flatbuffers code generated from schema/*.fbs (peer RPC).
//! - [`controller`]: the controller group's state machine (configurations, rebalancing).
//!
//! The write-ahead log lives in its own crate, `tynamo-wal`.

pub mod check;
pub mod client;
pub(crate) mod codec;
pub mod controller;
pub mod kv;
pub mod node;
pub mod raft;
pub mod resp;
pub mod schema_gen;
pub mod shard;
pub mod sim;
