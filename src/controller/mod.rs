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
