//! The sharded service in the simulator: the controller group, several data groups whose
//! replicas the controller places on (host, core) slots, live shard migration between them,
//! clients that follow the shards, and every history through the linearizability checker.
//!
//! - `app.rs`: [`ShardApp`], one data-group replica: kv state machine + `GroupShards` behind
//!   one log, one snapshot; the deliberately broken variants ([`Breakage`]).
//! - `rpc.rs`: the network between groups, hosts, the controller and clients (loss,
//!   duplication, delay, cuts between hosts).
//! - `world.rs`: [`World`]: hosts, the controller, the groups it creates, each group leader's
//!   migration runtime, the admin client, the cross-group invariants after every tick.
//! - `client.rs`: clients with sessions that route keys with a cached configuration and follow
//!   wrong-group / migrating answers; the history they record.
//! - `run.rs`: one seed with every fault and random Join/Leave/Move, then liveness, final
//!   reads and the checker (`tynamo-sim --workload shard`).
//!
//! Cost sketch: a seed is ~750 ticks (600 of faults, then healing and draining) of one
//! 3-replica controller and 1-4 data groups of 3 replicas, 3-5 clients and up to 4 admins,
//! ~180 operations and ~10 shard moves; the checker sees one key at a time. Measured on the
//! shared 2-core machine: 2,000 seeds in ~30 s in release (`tynamo-sim --workload shard`),
//! the CI test's 350 seeds in ~6-8 s in the test profile, the scenarios in under a second.
//!
//! Simplifications, each chosen because it hides no migration bug: the runtime's memory
//! (fetched configurations, pulled blobs, confirmations) is per group rather than per leader,
//! since it holds only immutable facts; a configuration query is answered from any controller
//! replica's applied state (configurations never change once committed); a new group's
//! replicas all start when the first host learns the configuration that creates it (those on
//! crashed hosts start crashed); Raft membership inside a data group never changes (the
//! controller's placement fixes it), so the `membership` fault does not apply here.

mod app;
mod client;
mod rpc;
mod run;
mod world;

pub use self::app::{decode_result, Breakage, ReadAnswer, ResultClass, ShardApp};
pub use self::client::{ClientStats, Clients, ClientsConfig, ScriptOp, CLIENTS_MAX, KEYS_MAX};
pub use self::rpc::{ConfirmAnswer, Endpoint, Rpc, RpcBody, RpcNet, RpcStats};
pub use self::run::{
    configure, finish, run_shard_seed, shard_repro_command, ShardOptions, ShardRun, ShardSummary,
    SHARD_LIVENESS_TICKS_MAX,
};
pub use self::world::{
    snapshot_now, DataGroup, World, WorldConfig, WorldStats, ADMINS_MAX, CONTROLLER_REPLICAS,
    HOSTS_MAX, RETRY_TICKS,
};
