//! The seeded simulator over thousands of seeds with every fault on (crashes, restarts,
//! symmetric, asymmetric and leader-isolating partitions, drops, duplicates, reordering, slow
//! disks, leadership transfers). A failure names the seed and the command that reproduces it.

use tynamo::sim::{run_seed, Failure, Faults, RunOptions};

/// Seeds per group size in CI. About 5 s per 2,000 runs on one core in the test profile.
const SEEDS: u64 = 2_000;

fn run_many(nodes: usize, seed_start: u64) {
    let opts = RunOptions::new(nodes, Faults::all());
    let mut committed = 0;
    for seed in seed_start..seed_start + SEEDS {
        // A broken assertion inside the core panics: report the seed with it.
        let verdict = std::panic::catch_unwind(|| run_seed(seed, &opts))
            .unwrap_or_else(|_| Err(Failure::Safety("panic (see the message above)".to_string())));
        match verdict {
            Ok(summary) => committed += summary.committed,
            Err(f) => panic!(
                "seed {seed} with {nodes} nodes failed: {f}\nreproduce: cargo run --release --bin tynamo-sim -- --seeds 1 --seed-start {seed} --nodes {nodes} --faults all"
            ),
        }
    }
    // The runs did real work, not only elections.
    assert!(
        committed > SEEDS * 50,
        "only {committed} entries committed over {SEEDS} seeds"
    );
}

#[test]
fn sim_2000_seeds_3_nodes_all_faults() {
    run_many(3, 0);
}

#[test]
fn sim_2000_seeds_5_nodes_all_faults() {
    run_many(5, 1_000_000);
}
