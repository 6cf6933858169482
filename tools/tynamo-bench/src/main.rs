//! tynamo-bench: a RESP load generator with HdrHistogram latency reports.
//!
//! It drives any RESP server (TynamoDB, Redis, Redis Cluster) through the same client library
//! (`tynamo::client`), closed loop or open loop at a constant rate with coordinated-omission
//! correction, with YCSB-style mixes, and optionally verifies what it reads (`--verify`).
//!
//! Exit status: 0 on success, 1 when `--verify` found a mismatch, 2 when the run could not be
//! done (bad arguments, unreachable target, a target that answers garbage, a failed `--load`).
//! The last line on stdout is always `RESULT k=v ...` for a run that happened.

mod local;
mod report;
mod verify;
mod worker;
mod workload;

use clap::{ArgGroup, Parser, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tynamo::client::{network_executor, resolve, ClientOptions, ConnectOptions};
use worker::{Config, Shared, Stop, Target};
use workload::{Dist, Rmw, ValueSize, Workload};

/// Bounds on the knobs (a typo must not open a million sockets).
const CONNECTIONS_MAX: usize = 10_000;
const THREADS_MAX: usize = 256;
const PIPELINE_MAX: usize = 4096;
const DURATION_DEFAULT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReadMode {
    /// Reads see every write acknowledged before them.
    Linearizable,
    /// READONLY on every connection: replicas may answer with older data.
    Stale,
}

#[derive(Parser, Debug)]
#[command(
    name = "tynamo-bench",
    version,
    about = "RESP load generator with HdrHistogram latency reports"
)]
#[command(group(ArgGroup::new("target").required(true).args(["cluster", "server", "local"])))]
struct Args {
    /// Cluster-aware target: seed node(s) host:port[,host:port...]; keys go to their slot owner.
    #[arg(long)]
    cluster: Option<String>,
    /// A plain RESP server host:port (every key sent to it).
    #[arg(long)]
    server: Option<String>,
    /// Start a local 3-host TynamoDB cluster for the run (`tynamo server` x 3, data in a
    /// temporary directory) and stop it after.
    #[arg(long)]
    local: bool,
    /// --local: cores (= Raft groups) per host.
    #[arg(long, default_value_t = 2)]
    local_cores: u16,
    /// --local: client port of host 1 (host h: +10(h-1), peers +100); default: a free block.
    #[arg(long)]
    local_base_port: Option<u16>,
    /// --local: an extra argument for every `tynamo server` (repeat it: --local-server-arg=--window
    /// --local-server-arg=4).
    #[arg(long, allow_hyphen_values = true)]
    local_server_arg: Vec<String>,
    /// Connections in total (spread over the threads).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests in flight per connection (sent together, replies awaited together).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Threads, each with its own glommio executor.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run time: 30, 30s, 500ms, 2m (default 10s unless --requests is given).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Total requests to send (instead of --duration).
    #[arg(long)]
    requests: Option<u64>,
    /// Open loop: requests per second in total, latency measured from the intended send time.
    #[arg(long)]
    rate: Option<f64>,
    /// YCSB mix: a (50/50 read/update), b (95/5), c (read only), d (read latest, 5% insert),
    /// f (read-modify-write), write (100% SET).
    #[arg(long, value_enum, default_value = "a")]
    workload: Workload,
    /// How workload F modifies records.
    #[arg(long, value_enum, default_value = "incr")]
    rmw: Rmw,
    /// Number of keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// uniform | zipfian[:theta] | latest[:theta] (default: latest for d, else uniform).
    #[arg(long)]
    dist: Option<Dist>,
    /// Value size in bytes: N or MIN..MAX.
    #[arg(long, default_value = "100")]
    value_size: ValueSize,
    /// Fill the key space before the measured run.
    #[arg(long)]
    load: bool,
    #[arg(long, value_enum, default_value = "linearizable")]
    read_mode: ReadMode,
    /// Check every read against acknowledged writes and scan every written key at the end.
    #[arg(long)]
    verify: bool,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one HdrHistogram .hgrm file per operation type into this directory.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Draw latency by percentile (SVG) into this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Prefix of every key (counters of workload F get `<prefix>c:`).
    #[arg(long, default_value = "tb:")]
    key_prefix: String,
    /// Seed of every random choice (runs are repeatable in what they send).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 2000)]
    connect_timeout_ms: u64,
    /// Bound on each read or write of a connection.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print the progress line once a second as its own line (`[  3.0s] ... ops/s ...`), also
    /// when stderr is not a terminal: a log of throughput over time (e.g. across a migration).
    #[arg(long)]
    progress_lines: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (30, 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("unknown unit in '{s}' (ms, s, m, h)")),
    };
    if !(secs > 0.0 && secs < 1e7) {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A usage or setup error: message and exit status 2.
fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tynamo-bench: {message}");
    ExitCode::from(2)
}

fn build_config(args: &Args, target: Target) -> Result<Config, String> {
    if args.connections == 0 || args.connections > CONNECTIONS_MAX {
        return Err(format!("--connections must be in 1..={CONNECTIONS_MAX}"));
    }
    if args.threads == 0 || args.threads > THREADS_MAX {
        return Err(format!("--threads must be in 1..={THREADS_MAX}"));
    }
    if args.pipeline == 0 || args.pipeline > PIPELINE_MAX {
        return Err(format!("--pipeline must be in 1..={PIPELINE_MAX}"));
    }
    let stop = match (args.duration, args.requests) {
        (Some(_), Some(_)) => return Err("give --duration or --requests, not both".into()),
        (Some(d), None) => Stop::After(d),
        (None, Some(0)) => return Err("--requests must be at least 1".into()),
        (None, Some(n)) => Stop::Requests(n),
        (None, None) => Stop::After(DURATION_DEFAULT),
    };
    if let Some(r) = args.rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err("--rate must be a positive number of requests per second".into());
        }
    }
    if args.keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    let inserts_max = if args.workload == Workload::D {
        args.keys
    } else {
        0
    };
    if args.verify {
        if args.keys + inserts_max > verify::VERIFY_KEYS_MAX {
            return Err(format!(
                "--verify tracks at most {} keys (inserts included)",
                verify::VERIFY_KEYS_MAX
            ));
        }
        if args.keys < args.connections as u64 {
            return Err(
                "--verify needs --keys >= --connections (each key has one writing connection)"
                    .into(),
            );
        }
        if args.workload == Workload::F && args.rmw == Rmw::Append {
            return Err("--verify checks workload F with --rmw incr only (appended values are not versioned)".into());
        }
    }
    let prefix = args.key_prefix.clone().into_bytes();
    let mut counter_prefix = prefix.clone();
    counter_prefix.extend_from_slice(b"c:");
    Ok(Config {
        target,
        threads: args.threads.min(args.connections),
        connections: args.connections,
        pipeline: args.pipeline,
        stop,
        rate: args.rate,
        workload: args.workload,
        rmw: args.rmw,
        keys: args.keys,
        inserts_max,
        dist: args.dist.unwrap_or(args.workload.default_dist()),
        value_size: args.value_size,
        load: args.load,
        stale: args.read_mode == ReadMode::Stale,
        verify: args.verify,
        key_prefix: prefix,
        counter_prefix,
        seed: args.seed,
        client: ClientOptions {
            connect: ConnectOptions {
                connect_timeout: Duration::from_millis(args.connect_timeout_ms.max(1)),
                io_timeout: Duration::from_millis(args.timeout_ms.max(1)),
                ..ConnectOptions::default()
            },
            ..ClientOptions::default()
        },
        progress: std::io::stderr().is_terminal() || args.progress_lines,
    })
}

fn resolve_all(list: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| resolve(s.trim()).map_err(|e| e.to_string()))
        .collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Held for the whole run: dropping it stops the local cluster.
    let mut local_cluster = None;
    let (target, target_name) = if let Some(s) = &args.server {
        match resolve(s) {
            Ok(addr) => (Target::Single(addr), s.clone()),
            Err(e) => return fail(e),
        }
    } else if let Some(c) = &args.cluster {
        match resolve_all(c) {
            Ok(seeds) if !seeds.is_empty() => (Target::Cluster(seeds), format!("cluster {c}")),
            Ok(_) => return fail("--cluster needs at least one host:port"),
            Err(e) => return fail(e),
        }
    } else {
        let options = local::LocalOptions {
            cores: args.local_cores,
            base_port: args.local_base_port,
            server_args: args.local_server_arg.clone(),
        };
        match local::LocalCluster::start(&options) {
            Ok(cluster) => {
                let seeds = cluster.seeds.clone();
                local_cluster = Some(cluster);
                (Target::Cluster(seeds), "local 3-host cluster".to_string())
            }
            Err(e) => return fail(e),
        }
    };
    let args_progress_lines = args.progress_lines;
    let cfg = match build_config(&args, target) {
        Ok(c) => Arc::new(c),
        Err(e) => return fail(e),
    };
    let workload_name = format!(
        "{:?} dist={} keys={} value={}..{} connections={} pipeline={} threads={}{}",
        cfg.workload,
        cfg.dist,
        cfg.keys,
        cfg.value_size.min,
        cfg.value_size.max,
        cfg.connections,
        cfg.pipeline,
        cfg.threads,
        cfg.rate.map(|r| format!(" rate={r}")).unwrap_or_default()
    )
    .to_lowercase();

    let shared = Arc::new(Shared::new(&cfg));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(cfg.threads);
    for t in 0..cfg.threads {
        let (cfg, shared, finished) = (cfg.clone(), shared.clone(), finished.clone());
        let spawned = network_executor(&format!("bench-{t}")).spawn(move || async move {
            let result = worker::run_thread(t, cfg, shared).await;
            finished.fetch_add(1, Ordering::SeqCst);
            result
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                // Threads already started wait at the start barrier for this one: end the process.
                return fail(format!("cannot start executor thread {t}: {e}"));
            }
        }
    }
    if cfg.progress {
        progress_loop(&shared, &finished, cfg.threads, args_progress_lines);
    }
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(r) => results.push(r),
            Err(e) => return fail(format!("a load thread failed: {e}")),
        }
    }
    if let Some(why) = shared.fatal() {
        return fail(why);
    }

    let mut measured = report::Measured::new();
    let mut elapsed = Duration::ZERO;
    let (mut mismatches, mut samples, mut scanned) = (0, Vec::new(), 0);
    for r in &results {
        measured.merge(&r.measured);
        elapsed = elapsed.max(r.elapsed);
        mismatches += r.mismatches;
        samples.extend(r.samples.iter().cloned());
        scanned += r.keys_scanned;
    }
    samples.truncate(10);
    let summary = report::Summary {
        target: target_name,
        workload: workload_name,
        elapsed,
        measured,
        verify: cfg.verify.then_some(report::VerifyOutcome {
            mismatches,
            samples,
            keys_scanned: scanned,
        }),
    };
    print!("{}", report::text_report(&summary));
    let mut status = ExitCode::SUCCESS;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report::json_report(&summary)).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("tynamo-bench: cannot write {}: {e}", path.display());
            status = ExitCode::from(2);
        }
    }
    if let Some(dir) = &args.hgrm {
        if let Err(e) = report::write_hgrm(dir, &summary) {
            eprintln!(
                "tynamo-bench: cannot write .hgrm files into {}: {e}",
                dir.display()
            );
            status = ExitCode::from(2);
        }
    }
    if let Some(path) = &args.plot {
        if let Err(e) = std::fs::write(path, report::svg_plot(&summary)) {
            eprintln!("tynamo-bench: cannot write {}: {e}", path.display());
            status = ExitCode::from(2);
        }
    }
    println!("{}", report::result_line(&summary));
    let _ = std::io::stdout().flush();
    if let Some(cluster) = &local_cluster {
        let exited = cluster.exited_hosts();
        for e in &exited {
            eprintln!("tynamo-bench: {e}");
        }
        if !exited.is_empty() && mismatches == 0 {
            status = ExitCode::from(2);
        }
    }
    if mismatches > 0 {
        eprintln!("tynamo-bench: --verify found {mismatches} mismatches");
        return ExitCode::from(1);
    }
    status
}

/// The live line on stderr (a terminal only): throughput of the last second, p50/p99 so far.
fn progress_loop(shared: &Shared, finished: &AtomicUsize, threads: usize, lines: bool) {
    const TICK: Duration = Duration::from_millis(100);
    const EVERY: Duration = Duration::from_secs(1);
    let start = Instant::now();
    let (mut last_print, mut last_ops) = (Instant::now(), 0u64);
    while finished.load(Ordering::SeqCst) < threads {
        std::thread::sleep(TICK);
        if last_print.elapsed() < EVERY {
            continue;
        }
        let ops = shared.ops_done.load(Ordering::Relaxed);
        let rate = (ops - last_ops) as f64 / last_print.elapsed().as_secs_f64();
        let (p50, p99) = match shared.progress_us.lock() {
            Ok(h) if !h.is_empty() => (h.value_at_quantile(0.5), h.value_at_quantile(0.99)),
            _ => (0, 0),
        };
        let line = format!(
            "[{:6.1}s] {:>9.0} ops/s  p50 {:8.3} ms  p99 {:8.3} ms  errors {}",
            start.elapsed().as_secs_f64(),
            rate,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            shared.errors.load(Ordering::Relaxed)
        );
        if lines {
            eprintln!("{line}");
        } else {
            eprint!("\r{line}   ");
        }
        (last_print, last_ops) = (Instant::now(), ops);
    }
    eprintln!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
