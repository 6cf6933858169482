//! The glommio runtime: one executor per core, the peer transport, timers and the Ready loop that
//! drives each group's sans-IO Raft node against its WAL, and the RESP front door.
//!
//! - [`config`]: the server configuration and the static cluster map.
//! - [`storage`]: a group's WAL, hard state and snapshots <-> the Raft core.
//! - [`group`]: one group replica's loop turn and its persister, generic over its
//!   [`machine`] (the KV store of a data group, or the controller's configurations).
//! - [`control`]: where the controller group runs, its bootstrap configuration, JSON views.
//! - [`admin`]: `TYNAMO.CTL`, the operator commands behind `tynamo ctl`.
//! - [`executor`]: the per-core executors and their tasks.
//! - [`replica`]: a core's data group replicas: created when a configuration places them
//!   here (Join), removed once their group drained (Leave).
//! - [`join`]: how a host that is not in `--initial-cluster` joins (`tynamo server --join`).
//! - [`migrate`]: each group's migration driver and the group-to-group requests.
//! - [`server`]: client connections (RESP), routing, replies.
//! - [`transport`], [`codec`]: peer frames over TCP, flatbuffers messages.
//! - [`histogram`]: log2 histograms of the runtime's own timings, printed by INFO.

pub mod admin;
pub mod codec;
pub mod config;
pub mod control;
pub mod executor;
pub mod group;
pub mod histogram;
pub mod join;
pub mod machine;
pub mod migrate;
pub mod replica;
pub mod server;
pub mod storage;
pub mod transport;

pub use config::{parse_initial_cluster, HostAddrs, PlacementMode, ServerConfig};
pub use executor::{run, NodeError};
