//! The kv workload over many seeds with every fault on (what `tynamo-sim --workload kv` runs),
//! and proof that the checks have teeth: deliberately broken variants are caught within a few
//! seeds.

use tynamo::sim::kv::{
    run_kv_seed, run_kv_seed_with, KvOptions, KvProfile, KvSummary, NoSessionCheck, OpMix,
};
use tynamo::sim::{Failure, Faults};

/// Seeds per group size: 2 x 500 = 1000 checked histories on every CI run.
const SEEDS: u64 = 500;

fn run_many(nodes: usize) -> KvSummary {
    let opts = KvOptions::new(nodes, Faults::all());
    let mut total = KvSummary {
        steps: 0,
        ops: 0,
        ops_ok: 0,
        ops_timeout: 0,
        stale_reads: 0,
        write_retries_maybe_applied: 0,
        snapshots_taken: 0,
        snapshot_chunks_sent: 0,
        restarts_from_snapshot: 0,
        check_steps: 0,
        digest: 0,
    };
    for seed in 0..SEEDS {
        let s = match run_kv_seed(seed, &opts).result {
            Ok(s) => s,
            Err(f) => panic!("seed {seed} with {nodes} nodes failed: {f}"),
        };
        total.steps += s.steps;
        total.ops += s.ops;
        total.ops_ok += s.ops_ok;
        total.ops_timeout += s.ops_timeout;
        total.stale_reads += s.stale_reads;
        total.write_retries_maybe_applied += s.write_retries_maybe_applied;
        total.snapshots_taken += s.snapshots_taken;
        total.snapshot_chunks_sent += s.snapshot_chunks_sent;
        total.restarts_from_snapshot += s.restarts_from_snapshot;
        total.check_steps += s.check_steps;
    }
    // The faults reached the service: every mechanism the workload claims to exercise did run.
    assert!(total.ops >= 100 * SEEDS, "{total:?}");
    assert!(total.ops_ok * 10 >= total.ops * 9, "{total:?}");
    assert!(total.ops_timeout > 0, "{total:?}");
    assert!(total.stale_reads > 0, "{total:?}");
    assert!(total.write_retries_maybe_applied > 0, "{total:?}");
    assert!(total.snapshots_taken >= 10 * SEEDS, "{total:?}");
    assert!(total.snapshot_chunks_sent > 0, "{total:?}");
    assert!(total.restarts_from_snapshot > 0, "{total:?}");
    total
}

#[test]
fn kv_500_seeds_3_nodes_all_faults_linearizable() {
    run_many(3);
}

#[test]
fn kv_500_seeds_5_nodes_all_faults_linearizable() {
    run_many(5);
}

#[test]
fn kv_runs_are_deterministic() {
    let opts = KvOptions::new(3, Faults::all());
    let a = run_kv_seed(42, &opts);
    let b = run_kv_seed(42, &opts);
    assert_eq!(a.history, b.history);
    assert_eq!(a.result.unwrap(), b.result.unwrap());
    let other = run_kv_seed(43, &opts);
    assert_ne!(a.history, other.history);
}

/// Runs seeds `0..seeds` of a variant with stale reads off (so that only the linearizability
/// checker can catch it); returns how many seeds the checker failed, and the first message.
fn caught_by_checker<P: KvProfile>(opts: &KvOptions, seeds: u64) -> (u64, Option<String>) {
    let mut caught = 0;
    let mut first = None;
    for seed in 0..seeds {
        match run_kv_seed_with::<P>(seed, opts).result {
            Err(Failure::Safety(message)) if message.contains("not linearizable") => {
                caught += 1;
                first.get_or_insert(message);
            }
            Err(other) => panic!("seed {seed}: failed otherwise than by the checker: {other}"),
            Ok(_) => {}
        }
    }
    (caught, first)
}

fn no_stale_reads() -> OpMix {
    OpMix {
        stale_get: 0,
        ..OpMix::standard()
    }
}

#[test]
fn serving_linearizable_reads_from_any_replica_is_caught_within_a_few_seeds() {
    let mut opts = KvOptions::new(3, Faults::all());
    opts.mix = no_stale_reads();
    opts.follower_reads = true;
    let (caught, first) = caught_by_checker::<tynamo::sim::kv::SimProfile>(&opts, 5);
    assert!(caught >= 2, "only {caught} of 5 seeds caught");
    // The message names the seed, the reproduction and the failing key's operations.
    let message = first.unwrap();
    assert!(message.contains("reproduce: cargo run"), "{message}");
    assert!(message.contains("\"op\":\"get\""), "{message}");
}

#[test]
fn applying_retried_writes_twice_is_caught_within_a_few_seeds() {
    let mut opts = KvOptions::new(3, Faults::all());
    opts.mix = no_stale_reads();
    let (caught, first) = caught_by_checker::<NoSessionCheck>(&opts, 10);
    assert!(caught >= 2, "only {caught} of 10 seeds caught: {first:?}");
}

#[test]
fn the_correct_service_passes_the_same_seeds() {
    let mut opts = KvOptions::new(3, Faults::all());
    opts.mix = no_stale_reads();
    let (caught, first) = caught_by_checker::<tynamo::sim::kv::SimProfile>(&opts, 10);
    assert_eq!(caught, 0, "{first:?}");
}

/// A history written with `--history-out` reads back unchanged and passes the checker from the
/// file alone, so any other checker can verify it too.
#[test]
fn written_histories_read_back_and_check() {
    use tynamo::check::{check_history, read_history_file, CheckConfig, Verdict};
    use tynamo::sim::kv::{history_path, write_history_file};
    let dir = tempfile::tempdir().unwrap();
    let run = run_kv_seed(7, &KvOptions::new(5, Faults::all()));
    run.result.unwrap();
    let path = history_path(dir.path(), 7, 5);
    write_history_file(&path, &run.history).unwrap();
    let back = read_history_file(&path).unwrap();
    assert_eq!(back, run.history);
    let report = check_history(&back, &CheckConfig::default());
    assert_eq!(report.verdict, Verdict::Linearizable);
    assert!(report.ops_checked >= 100, "{report:?}");
}

/// `tynamo-sim --workload kv` prints the RESULT line with the histories checked and writes one
/// history file per seed.
#[test]
fn the_binary_runs_kv_seeds_and_writes_histories() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tynamo-sim"))
        .args(["--workload", "kv", "--seeds", "3", "--nodes", "3,5"])
        .arg("--history-out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let result = stdout.lines().last().unwrap();
    assert!(result.starts_with("RESULT seeds=6 failed=0 "), "{result}");
    assert!(result.contains(" histories=6 ops="), "{result}");
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 6);
    assert!(dir.path().join("kv-n5-seed2.jsonl").exists());
}
