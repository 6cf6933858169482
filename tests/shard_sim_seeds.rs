//! Random seeds of the sharded world with every fault and random Join/Leave/Move: each history
//! must be linearizable, the world must settle after healing, and the invariants hold after
//! every tick. `tynamo-sim --workload shard --seeds 2000` runs more.

use tynamo::sim::shard::{run_shard_seed, ShardOptions};
use tynamo::sim::{Failure, Faults};

fn run(seeds: std::ops::Range<u64>, faults: Faults) -> (u64, u64, u64) {
    let opts = ShardOptions::new(faults);
    let (mut ops, mut moves, mut configs) = (0, 0, 0);
    for seed in seeds {
        match run_shard_seed(seed, &opts).result {
            Ok(s) => {
                ops += s.ops;
                moves += s.moves;
                configs += s.configs;
            }
            Err(Failure::Safety(e)) | Err(Failure::Liveness(e)) => panic!("{e}"),
        }
    }
    (ops, moves, configs)
}

#[test]
fn random_seeds_without_faults_are_linearizable_and_settle() {
    let (ops, moves, configs) = run(0..50, Faults::none());
    assert!(ops > 0 && configs > 8, "ops {ops} configs {configs}");
    assert!(moves > 0, "no shard ever moved");
}

#[test]
fn random_seeds_with_every_fault_are_linearizable_and_settle() {
    let (ops, moves, _) = run(0..300, Faults::all());
    assert!(ops > 0 && moves > 0, "ops {ops} moves {moves}");
}

#[test]
fn a_seed_replays_byte_for_byte() {
    let opts = ShardOptions::new(Faults::all());
    for seed in [3, 77] {
        let a = run_shard_seed(seed, &opts);
        let b = run_shard_seed(seed, &opts);
        assert!(!a.history.is_empty());
        assert_eq!(a.history, b.history, "seed {seed}");
        let (a, b) = (a.result.ok(), b.result.ok());
        assert!(a.is_some(), "seed {seed} failed");
        assert_eq!(a, b, "seed {seed}");
    }
}
