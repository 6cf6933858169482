//! The seeded simulator: many replicas in one thread, a faulty network and faulty disks, and
//! invariant checks after every step. The same seed gives the same run, byte for byte: all
//! randomness comes from one ChaCha8 RNG seeded from the seed, and nothing iterates a HashMap.
//!
//! - `network.rs`: drop, duplicate, delay/reorder, directed partitions.
//! - `disk.rs`: ordered writes with latency, durable only once complete; a crash loses what
//!   was not reported complete, except a random in-order prefix of its records (torn writes).
//! - `cluster.rs`: the group, the client API, the Ready loop (with crash points between its
//!   steps), and the checks that need the disks: a leader's commit is on a quorum of disks,
//!   its own vote is on its disk.
//! - `invariants.rs`: the safety checker, including read linearizability at serve time.
//! - `run.rs`: one seed with a fault schedule and a liveness phase (used by `tynamo-sim`).
//! - `app.rs`: the application trait the KV service implements, and a hashing default.
//! - `kv/`: the KV service as that application, simulated clients and checked histories.
//! - `shard/`: the controller group, several data groups and live shard migration between
//!   them, with clients following the shards (`tynamo-sim --workload shard`).
//!
//! Running it:
//! - CI: `cargo test --test raft_sim` runs 2,000 seeds of 3 nodes, 2,000 of 5, 300 of 1 and
//!   500 of 2 with every fault, and the deliberately broken variants (`TestBreakage`,
//!   `ClusterConfig::ack_on_submit`) that must be caught (about 10-20 s here in the test
//!   profile, tests in parallel).
//! - By hand: `cargo run --release --bin tynamo-sim -- --seeds 2000 --nodes 3,5 --faults all`
//!   (about 10 s for the 4,000 runs). A failure prints the seed and the command that replays it;
//!   `TYNAMO_SIM_TRACE=1` prints every delivery, write and apply of that run. `--break lease`
//!   (with `--read-mode lease`), `--break ack` or `--break vote` measure catch rates.
//!
//! - The sharded service: `cargo run --release --bin tynamo-sim -- --workload shard --seeds
//!   2000` (about 30 s here); `cargo test --test shard_sim_scenarios --test shard_sim_seeds`.
//!
//! Plugging in another state machine (the KV service): implement [`App`], build a
//! `Cluster<YourApp>`, and drive it with `propose`/`outcome` and `read`/`read_outcome`; a
//! `Committed` outcome carries what `App::apply` returned, and a `ReadOutcome::Ready` names the
//! replica whose state may serve the read.

mod app;
mod cluster;
mod disk;
mod invariants;
pub mod kv;
mod network;
mod run;
pub mod shard;

pub use self::app::{App, HashApp};
pub use self::cluster::{Cluster, ClusterConfig, Outcome, ProposalId, ReadOutcome, SimNode};
pub use self::disk::{Completion, SimDisk};
pub use self::invariants::{Checker, Violation};
pub use self::network::{NetConfig, NetStats, Network};
pub use self::run::{run_seed, Failure, Faults, RunOptions, RunSummary, LIVENESS_TICKS_MAX};

/// A simulated world that advances one tick at a time and checks its invariants after each:
/// the Raft group (`Cluster`), the KV service (`kv::KvSim`) and the sharded service
/// (`shard::World`) all run the same way.
pub trait Steps {
    /// One tick, then the invariant checks.
    fn step(&mut self) -> Result<(), Violation>;

    fn run_ticks(&mut self, ticks: u64) -> Result<(), Violation> {
        for _ in 0..ticks {
            self.step()?;
        }
        Ok(())
    }

    /// Steps until `cond` holds or `ticks_max` ticks pass; returns whether it held.
    fn run_until(
        &mut self,
        ticks_max: u64,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Result<bool, Violation>
    where
        Self: Sized,
    {
        for _ in 0..ticks_max {
            if cond(self) {
                return Ok(true);
            }
            self.step()?;
        }
        Ok(cond(self))
    }
}
