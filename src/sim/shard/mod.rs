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
//! Cost sketch: a seed is ~1,000-2,000 ticks of one 3-replica controller and 1-4 data groups
//! of 3 replicas, 3-5 clients, a few hundred operations; the checker sees one key at a time.

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
