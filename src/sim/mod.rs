//! The seeded simulator: many replicas in one thread, a faulty network and faulty disks, and
//! invariant checks after every step. The same seed gives the same run, byte for byte: all
//! randomness comes from one ChaCha8 RNG seeded from the seed, and nothing iterates a HashMap.
//!
//! - `network.rs`: drop, duplicate, delay/reorder, directed partitions.
//! - `disk.rs`: ordered writes with latency; a crash loses what is unsynced.
//! - `cluster.rs`: the group, the client API, the Ready loop.
//! - `invariants.rs`: the safety checker.
//! - `run.rs`: one seed with a fault schedule and a liveness phase (used by `tynamo-sim`).
//! - `app.rs`: the application trait the KV service implements, and a hashing default.
//!
//! Running it:
//! - CI: `cargo test --test raft_sim` runs 2,000 seeds of 3 nodes and 2,000 of 5 with every
//!   fault (about 20 s here in the test profile, two tests in parallel).
//! - By hand: `cargo run --release --bin tynamo-sim -- --seeds 2000 --nodes 3,5 --faults all`
//!   (about 15 s for the 4,000 runs). A failure prints the seed and the command that replays it;
//!   `TYNAMO_SIM_TRACE=1` prints every delivery, write and apply of that run.
//!
//! Plugging in another state machine (the KV service): implement [`App`], build a
//! `Cluster<YourApp>`, and drive it with `propose`/`outcome` and `read`/`read_outcome`; a
//! `Committed` outcome carries what `App::apply` returned, and a `ReadOutcome::Ready` names the
//! replica whose state may serve the read.

mod app;
mod cluster;
mod disk;
mod invariants;
mod network;
mod run;

pub use self::app::{App, HashApp};
pub use self::cluster::{Cluster, ClusterConfig, Outcome, ProposalId, ReadOutcome, SimNode};
pub use self::disk::{Completion, SimDisk};
pub use self::invariants::{Checker, Violation};
pub use self::network::{NetConfig, NetStats, Network};
pub use self::run::{run_seed, Failure, Faults, RunOptions, RunSummary, LIVENESS_TICKS_MAX};
