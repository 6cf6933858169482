//! `tynamo-sim`: runs the seeded Raft simulator over many seeds.
//!
//! Exit codes: 0 every seed passed, 1 a safety violation or a panic, 2 a liveness failure
//! (and no safety failure), 64 bad usage. The last line is always
//! `RESULT seeds=N failed=F steps=S elapsed_ms=T`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let faults = match Faults::parse(&args.faults) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tynamo-sim: {e}");
            return ExitCode::from(64);
        }
    };
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
    let mut exit = 0u8;
    let mut first_failure: Option<String> = None;
    for seed in args.seed_start..args.seed_start.saturating_add(args.seeds) {
        for &nodes in &args.nodes {
            runs += 1;
            let mut opts = RunOptions::new(nodes, faults);
            opts.fault_ticks = args.fault_ticks;
            let verdict = catch_unwind(AssertUnwindSafe(|| run_seed(seed, &opts)));
            let failure = match verdict {
                Ok(Ok(summary)) => {
                    steps += summary.steps;
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
                first_failure = Some(format!(
                    "tynamo-sim --seeds 1 --seed-start {seed} --nodes {nodes} --faults {} --fault-ticks {}",
                    args.faults, args.fault_ticks
                ));
            }
        }
    }
    if let Some(repro) = &first_failure {
        println!("reproduce the first failure with: cargo run --release --bin {repro}");
    }
    println!(
        "RESULT seeds={runs} failed={failed} steps={steps} elapsed_ms={}",
        started.elapsed().as_millis()
    );
    ExitCode::from(exit)
}
