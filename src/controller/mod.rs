//! The controller group's state machine: numbered configurations (hosts, groups and their
//! replica slots, the shard -> group map), the operations that produce them (Join, Leave, Move,
//! SetController; Query reads them), rebalancing with the fewest moves, and replica placement.
//!
//! Sans-IO like the rest of the core: the runtime runs [`StateMachine`] behind a Raft group of
//! (by default) three replicas, proposes encoded [`Command`]s, applies committed entries with
//! [`StateMachine::apply`] and hands the encoded [`Reply`] back to the waiting client.
//!
//! - `config.rs`: the [`Configuration`] value, its validation and canonical encoding.
//! - `balance.rs`: rebalancing (counts differ by at most one, fewest moves) and placement.
//! - `command.rs`: commands and replies, versioned binary encodings.
//! - `state_machine.rs`: the replicated state: configuration history and client sessions.
//! - `app.rs`: the state machine as a simulator [`crate::sim::App`].
//!
//! Integration with the runtime (what `node/` does):
//! - Cluster creation: the controller group (core 0 of the first three hosts) starts from
//!   configuration 0 (no hosts, no groups, every shard unassigned); the bootstrap tool proposes
//!   `Join` of the initial hosts, then `SetController` with the controller's slots.
//! - Applying: committed Normal entries go to [`StateMachine::apply`] (no-op and membership
//!   entries as an empty payload, which only advance the applied index); the leader encodes
//!   the returned [`Reply`] for the waiting client. Snapshots: [`StateMachine::snapshot`] /
//!   [`StateMachine::restore`].
//! - Reads: `Query` through the log, or [`StateMachine::query`] after a ReadIndex.
//! - Hosts: for each new configuration, each core starts the replicas
//!   [`Configuration::replicas_at`] names and that it does not run yet; a group in
//!   [`Configuration::groups_created`] bootstraps with [`Group::voters`] as its voters. Groups
//!   then follow configurations with [`crate::shard::migration`].
//! - Clients: a session is (client id, seq) with one operation in flight; retry with the same
//!   seq until an answer comes. `Query` does not use the session (its seq is ignored).

pub mod app;
pub mod balance;
pub(crate) mod codec;
pub mod command;
pub mod config;
pub mod state_machine;

pub use app::ControllerApp;
pub use balance::{place_group, rebalance};
pub use codec::DecodeError;
pub use command::{
    Command, ControllerError, HostSpec, Op, Reply, COMMAND_FORMAT_VERSION, JOIN_HOSTS_MAX,
};
pub use config::{
    ConfigError, Configuration, Group, GroupId, Host, HostId, Replica, Slot, GROUP_NONE,
};
pub use state_machine::{Settings, StateMachine};
