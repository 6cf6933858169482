//! The key-value service in the simulator: the kv state machine on every replica, simulated
//! clients with exactly-once sessions, and their histories checked for linearizability.
//!
//! - `app.rs`: [`KvApp`], the simulator `App` over `kv::StateMachine` (replies encoded per
//!   command), and the [`KvProfile`]s (snapshot threshold; a broken-on-purpose variant).
//! - `driver.rs`: [`KvSim`], clients that batch, redirect, retry with the same (client, seq),
//!   read through ReadIndex/lease or stale, record the history; and snapshot-on-threshold.
//! - `stale.rs`: the check that a stale read returns only values that were written.
//! - `run.rs`: one seed with the Raft run's faults, then liveness, convergence and the checker
//!   (`tynamo-sim --workload kv`).
//!
//! Cost sketch: a seed is ~630 ticks of a 3-5 replica group with 3-6 clients, ~200 operations;
//! the checker sees one key's few concurrent operations at a time, so it adds little to the
//! simulation. Measured in release on the shared 2-core machine (load ~8): 500 seeds of 3
//! nodes in 1.8 s, 2,000 in 7.7 s, 2,000 x {3, 5} in 19 s; the CI test (1,000 seeds, test
//! profile) in ~9 s.
//!
//! Running it: `cargo run --release --bin tynamo-sim -- --workload kv --seeds 2000 --nodes 3,5`
//! (`--history-out DIR` writes `DIR/kv-n<nodes>-seed<seed>.jsonl` per seed); a failure prints
//! the seed, the command that replays it and the failing key's operations.

mod app;
mod driver;
mod run;
mod stale;

pub use self::app::{
    decode_replies, encode_replies, sim_kv_config, single_command, KvApp, KvProfile,
    LogOnlyProfile, NoSessionCheck, Reply, ReplyError, SimProfile, SIM_SHARD_COUNT,
};
pub use self::driver::{
    KvSim, KvSimConfig, KvStats, OpMix, ScriptOp, CLIENTS_MAX, KEYS_MAX, TICK_MS,
};
pub use self::run::{
    check_linearizable, clients_without_ok_since, faults_arg, heal_and_drain, history_path,
    repro_command, run_kv_seed, run_kv_seed_with, write_history_file, KvOptions, KvRun, KvSummary,
    KV_LIVENESS_TICKS_MAX,
};
pub use self::stale::StaleReadCheck;
