//! `tynamo-sim`: runs the seeded Raft simulator over many seeds.
//!
//! Exit codes: 0 every seed passed, 1 a safety violation or a panic, 2 a liveness failure
//! (and no safety failure), 64 bad usage. The last line is always
//! `RESULT seeds=N failed=F steps=S elapsed_ms=T`; the kv workload adds `histories=H ops=M`
//! (histories that passed the linearizability checker, and their operations), the shard
//! workload `histories=H ops=M moves=V` (shard moves between groups over all seeds).
//!
//! `--workload shard` runs the controller and several data groups with live shard migration
//! under random Join/Leave/Move and every fault (see `sim::shard`); hosts and groups come from
//! the seed, so `--nodes` does not apply. `--break old-owner-writes|serve-before-install` runs
//! a deliberately broken migration.
//!
//! `--break lease|vote|ack` runs a deliberately broken core or shell, to measure how often the
//! invariants catch that bug (every failure is then expected; the exit code still says which).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tynamo::raft::ReadMode;
use tynamo::sim::kv::{history_path, run_kv_seed, write_history_file, KvOptions};
use tynamo::sim::shard::{run_shard_seed, Breakage, ShardOptions};
use tynamo::sim::{run_seed, Failure, Faults, RunOptions};

#[derive(Parser, Debug)]
#[command(about = "Seeded simulation of the Raft core under faults")]
struct Args {
    /// Number of seeds to run (per node count).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    seed_start: u64,
    /// Group sizes to run each seed with, e.g. `3` or `3,5`.
    #[arg(long, default_value = "3", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// `all`, `none`, or a comma list of crash,partition,net,disk,transfer,membership,clock.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Ticks of the fault phase per seed.
    #[arg(long, default_value_t = 600)]
    fault_ticks: u64,
    /// `raft`: the core with a hashing application. `kv`: the key-value service with clients
    /// whose histories go through the linearizability checker. `shard`: the controller and
    /// several data groups with live shard migration under random Join/Leave/Move (hosts
    /// and groups are drawn from the seed; `--nodes` is ignored).
    #[arg(long, value_enum, default_value_t = Workload::Raft)]
    workload: Workload,
    /// With `--workload kv`: write each seed's history as JSON lines to
    /// `DIR/kv-n<nodes>-seed<seed>.jsonl`.
    #[arg(long, value_name = "DIR")]
    history_out: Option<PathBuf>,
    /// `safe` or `lease` for every run (default: drawn from the seed).
    #[arg(long)]
    read_mode: Option<String>,
    /// A deliberate bug, to measure catch rates: `lease` (leases never expire), `vote` (own
    /// vote counted before durable), `ack` (writes reported durable on submission).
    #[arg(long = "break")]
    breakage: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Raft,
    Kv,
    Shard,
}

/// Totals of the shard workload beyond the common counters.
#[derive(Default)]
struct ShardTotals {
    moves: u64,
}

/// One seed of the shard workload: (steps, operations checked, moves).
fn run_shard(
    seed: u64,
    faults: Faults,
    fault_ticks: u64,
    breakage: Breakage,
    history_out: Option<&PathBuf>,
) -> Result<(u64, u64, u64), Failure> {
    let mut opts = ShardOptions::new(faults);
    opts.fault_ticks = fault_ticks;
    opts.breakage = breakage;
    let run = run_shard_seed(seed, &opts);
    if let Some(dir) = history_out {
        let path = dir.join(format!("shard-seed{seed}.jsonl"));
        write_history_file(&path, &run.history).map_err(|e| {
            Failure::Safety(format!("cannot write history {}: {e}", path.display()))
        })?;
    }
    run.result.map(|s| (s.steps, s.ops, s.moves))
}

/// One seed of the kv workload: (steps, operations checked). Writes the history, also of a
/// failing seed, when asked.
fn run_kv(
    seed: u64,
    nodes: usize,
    faults: Faults,
    fault_ticks: u64,
    history_out: Option<&PathBuf>,
) -> Result<(u64, u64), Failure> {
    let mut opts = KvOptions::new(nodes, faults);
    opts.fault_ticks = fault_ticks;
    let run = run_kv_seed(seed, &opts);
    if let Some(dir) = history_out {
        let path = history_path(dir, seed, nodes);
        write_history_file(&path, &run.history).map_err(|e| {
            Failure::Safety(format!("cannot write history {}: {e}", path.display()))
        })?;
    }
    run.result.map(|s| (s.steps, s.ops))
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let faults = match Faults::parse(&args.faults) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tynamo-sim: {e}");
            return ExitCode::from(64);
        }
    };
    if let Some(dir) = &args.history_out {
        if args.workload == Workload::Raft {
            eprintln!("tynamo-sim: --history-out needs --workload kv or shard");
            return ExitCode::from(64);
        }
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("tynamo-sim: cannot create {}: {e}", dir.display());
            return ExitCode::from(64);
        }
    }
    if args.workload == Workload::Kv && (args.read_mode.is_some() || args.breakage.is_some()) {
        eprintln!("tynamo-sim: --read-mode and --break apply to --workload raft only");
        return ExitCode::from(64);
    }
    let mut shard_breakage = Breakage::None;
    if args.workload == Workload::Shard {
        if args.read_mode.is_some() {
            eprintln!("tynamo-sim: --read-mode does not apply to --workload shard");
            return ExitCode::from(64);
        }
        shard_breakage = match args.breakage.take().as_deref() {
            None => Breakage::None,
            Some("old-owner-writes") => Breakage::OldOwnerWritesAfterFreeze,
            Some("serve-before-install") => Breakage::ServeBeforeInstall,
            Some(other) => {
                eprintln!(
                    "tynamo-sim: --break {other:?} with --workload shard is not old-owner-writes or serve-before-install"
                );
                return ExitCode::from(64);
            }
        };
    }
    // The shard workload draws its hosts and groups from the seed: one run per seed.
    let nodes_list = if args.workload == Workload::Shard {
        vec![3]
    } else {
        args.nodes.clone()
    };
    let read_mode = match args.read_mode.as_deref() {
        None => None,
        Some("safe") => Some(ReadMode::Safe),
        Some("lease") => Some(ReadMode::Lease),
        Some(other) => {
            eprintln!("tynamo-sim: --read-mode {other:?} is not safe or lease");
            return ExitCode::from(64);
        }
    };
    let mut template = RunOptions::new(1, faults);
    template.fault_ticks = args.fault_ticks;
    template.read_mode = read_mode;
    match args.breakage.as_deref() {
        None => {}
        Some("lease") => template.breakage.lease_never_expires = true,
        Some("vote") => template.breakage.count_own_vote_before_durable = true,
        Some("ack") => template.ack_on_submit = true,
        Some(other) => {
            eprintln!("tynamo-sim: --break {other:?} is not lease, vote or ack");
            return ExitCode::from(64);
        }
    }
    for &n in &args.nodes {
        if !(1..=7).contains(&n) {
            eprintln!("tynamo-sim: --nodes {n} is outside 1..=7");
            return ExitCode::from(64);
        }
    }
    // Keep panic output for the first failure only; later ones are counted.
    let default_hook = std::panic::take_hook();
    let first_panic_shown = std::sync::atomic::AtomicBool::new(false);
    std::panic::set_hook(Box::new(move |info| {
        if !first_panic_shown.swap(true, std::sync::atomic::Ordering::SeqCst) {
            default_hook(info);
        }
    }));
    let started = Instant::now();
    let (mut runs, mut failed, mut steps) = (0u64, 0u64, 0u64);
    let (mut histories, mut ops) = (0u64, 0u64);
    let mut shard_totals = ShardTotals::default();
    let mut exit = 0u8;
    let mut first_failure: Option<String> = None;
    for seed in args.seed_start..args.seed_start.saturating_add(args.seeds) {
        for &nodes in &nodes_list {
            runs += 1;
            let mut opts = template.clone();
            opts.nodes = nodes;
            let verdict = catch_unwind(AssertUnwindSafe(|| match args.workload {
                Workload::Raft => run_seed(seed, &opts).map(|s| (s.steps, 0)),
                Workload::Kv => run_kv(
                    seed,
                    nodes,
                    faults,
                    args.fault_ticks,
                    args.history_out.as_ref(),
                ),
                Workload::Shard => run_shard(
                    seed,
                    faults,
                    args.fault_ticks,
                    shard_breakage,
                    args.history_out.as_ref(),
                )
                .map(|(steps, ops, moves)| {
                    shard_totals.moves += moves;
                    (steps, ops)
                }),
            }));
            let failure = match verdict {
                Ok(Ok((seed_steps, seed_ops))) => {
                    steps += seed_steps;
                    if args.workload != Workload::Raft {
                        histories += 1;
                        ops += seed_ops;
                    }
                    continue;
                }
                Ok(Err(f)) => f,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".to_string());
                    Failure::Safety(format!("panic: {msg}"))
                }
            };
            failed += 1;
            // Safety failures outrank liveness failures in the exit code.
            exit = match failure {
                Failure::Safety(_) => 1,
                Failure::Liveness(_) if exit == 0 => 2,
                Failure::Liveness(_) => exit,
            };
            eprintln!("seed {seed} nodes {nodes}: FAILED: {failure}");
            if first_failure.is_none() {
                let workload = match args.workload {
                    Workload::Raft => "",
                    Workload::Kv => "--workload kv ",
                    Workload::Shard => "--workload shard ",
                };
                let breakage = match shard_breakage {
                    Breakage::None => "",
                    Breakage::OldOwnerWritesAfterFreeze => " --break old-owner-writes",
                    Breakage::ServeBeforeInstall => " --break serve-before-install",
                };
                first_failure = Some(format!(
                    "tynamo-sim -- {workload}--seeds 1 --seed-start {seed} --nodes {nodes} --faults {} --fault-ticks {}{}{}",
                    args.faults,
                    args.fault_ticks,
                    args.read_mode
                        .as_deref()
                        .map_or(String::new(), |m| format!(" --read-mode {m}")),
                    args.breakage
                        .as_deref()
                        .map_or(String::new(), |b| format!(" --break {b}")),
                ) + breakage);
            }
        }
    }
    if let Some(repro) = &first_failure {
        println!("reproduce the first failure with: cargo run --release --bin {repro}");
    }
    let kv_counts = match args.workload {
        Workload::Raft => String::new(),
        Workload::Kv => format!(" histories={histories} ops={ops}"),
        Workload::Shard => format!(
            " histories={histories} ops={ops} moves={}",
            shard_totals.moves
        ),
    };
    println!(
        "RESULT seeds={runs} failed={failed} steps={steps} elapsed_ms={}{kv_counts}",
        started.elapsed().as_millis()
    );
    ExitCode::from(exit)
}
