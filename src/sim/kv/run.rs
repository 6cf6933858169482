//! One seeded kv run with faults, its history and its verdict (used by `tynamo-sim --workload
//! kv` and the CI tests).
//!
//! Everything is drawn from the seed: the group (network loss, duplication and delay, disk
//! latency, replication window, snapshot chunk size, ReadIndex or lease reads), the clients
//! (3-6, over 4-8 keys) and the fault schedule (the Raft run's faults: crashes and restarts,
//! partitions of every shape, slow disks, leadership transfers, membership changes, slow
//! clocks). Snapshots come every ~1 KiB of applied log. After the fault phase every fault is
//! healed, every replica restarted, and then:
//! 1. liveness: every client completes an operation invoked after the heal;
//! 2. the clients stop and drain, and every member replica reaches the same kv state hash;
//! 3. the history goes through the linearizability checker: a non-linearizable or unknown
//!    verdict fails the seed, with the reproduction command and the failing key's operations.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::app::{KvProfile, SimProfile};
use super::driver::{KvSim, KvSimConfig, OpMix};
use crate::check::{
    check_history, write_history, CheckConfig, CheckReport, ClientId, Record, Status, Verdict,
};
use crate::raft::{NodeId, ReadMode};
use crate::sim::run::change_membership;
use crate::sim::Steps;
use crate::sim::{ClusterConfig, Failure, Faults, NetConfig, Violation};

/// Ticks after healing within which every client must complete an operation.
pub const KV_LIVENESS_TICKS_MAX: u64 = 1_000;
/// Operations of a failing key printed in a failure message (the rest are counted).
const FAILURE_OPS_SHOWN_MAX: usize = 40;

#[derive(Clone, Debug)]
pub struct KvOptions {
    pub nodes: usize,
    pub faults: Faults,
    pub fault_ticks: u64,
    /// What the clients do (the standard mix by default).
    pub mix: OpMix,
    /// TEST ONLY, broken on purpose: linearizable reads answered by any replica at once.
    pub follower_reads: bool,
}

impl KvOptions {
    pub fn new(nodes: usize, faults: Faults) -> KvOptions {
        KvOptions {
            nodes,
            faults,
            fault_ticks: 600,
            mix: OpMix::standard(),
            follower_reads: false,
        }
    }
}

/// What one passing seed did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvSummary {
    pub steps: u64,
    /// Operations in the history (ok, fail and timeout).
    pub ops: u64,
    pub ops_ok: u64,
    pub ops_timeout: u64,
    pub stale_reads: u64,
    pub write_retries_maybe_applied: u64,
    pub snapshots_taken: u64,
    /// InstallSnapshot chunks sent.
    pub snapshot_chunks_sent: u64,
    pub restarts_from_snapshot: u64,
    pub check_steps: u64,
    pub digest: u64,
}

/// A run's history (also when it failed, for `--history-out`) and its verdict.
pub struct KvRun {
    pub history: Vec<Record>,
    pub result: Result<KvSummary, Failure>,
}

/// The `--faults` value that selects `f`.
pub fn faults_arg(f: Faults) -> String {
    let names = [
        (f.crash, "crash"),
        (f.partition, "partition"),
        (f.lossy_net, "net"),
        (f.slow_disk, "disk"),
        (f.transfer, "transfer"),
        (f.membership, "membership"),
        (f.clock, "clock"),
    ];
    if names.iter().all(|(on, _)| *on) {
        return "all".into();
    }
    let on: Vec<&str> = names
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    if on.is_empty() {
        "none".into()
    } else {
        on.join(",")
    }
}

/// The command that reruns one seed of the kv workload.
pub fn repro_command(seed: u64, opts: &KvOptions) -> String {
    format!(
        "cargo run --release --bin tynamo-sim -- --workload kv --seeds 1 --seed-start {seed} --nodes {} --faults {} --fault-ticks {}",
        opts.nodes,
        faults_arg(opts.faults),
        opts.fault_ticks
    )
}

/// The file `--history-out DIR` writes a seed's history to.
pub fn history_path(dir: &Path, seed: u64, nodes: usize) -> PathBuf {
    dir.join(format!("kv-n{nodes}-seed{seed}.jsonl"))
}

/// Writes a seed's history as JSON lines (see `crate::check::history` for the format).
pub fn write_history_file(path: &Path, history: &[Record]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    write_history(&mut file, history)?;
    file.flush()
}

/// The cluster and client configuration of a seed.
fn configure(seed: u64, opts: &KvOptions) -> (ClusterConfig, KvSimConfig) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b76_5eed);
    let mut cfg = ClusterConfig::new(opts.nodes);
    if opts.faults.lossy_net {
        cfg.net = NetConfig {
            drop_per_million: rng.gen_range(0..100_000),
            dup_per_million: rng.gen_range(0..50_000),
            delay_ticks_min: 1,
            delay_ticks_max: rng.gen_range(1..=4),
        };
    }
    cfg.disk_ticks_max = rng.gen_range(0..=3);
    cfg.slow_disk_ticks = 15;
    // The driver snapshots on the kv threshold, not on an entry count.
    cfg.snapshot_every_entries = 0;
    // A lost send is retried at the next replica after this long.
    cfg.client_timeout_ticks = rng.gen_range(30..=80);
    cfg.raft.max_inflight_msgs = rng.gen_range(1..=4);
    cfg.raft.max_entries_per_msg = rng.gen_range(1..=32);
    cfg.raft.snapshot_chunk_bytes = rng.gen_range(64..=2048);
    if rng.gen_bool(0.5) {
        cfg.raft.read_mode = ReadMode::Lease;
    }
    let clients = rng.gen_range(3..=6);
    let keys = rng.gen_range(4..=8);
    let mut kv = KvSimConfig::new(clients, keys);
    if opts.faults.lossy_net {
        kv.lost_replies_percent = rng.gen_range(0..=20);
    }
    kv.mix = opts.mix;
    kv.follower_reads = opts.follower_reads;
    (cfg, kv)
}

/// Runs one seed of the kv workload with the standard profile.
pub fn run_kv_seed(seed: u64, opts: &KvOptions) -> KvRun {
    run_kv_seed_with::<SimProfile>(seed, opts)
}

/// Runs one seed with profile `P` (tests run a broken-on-purpose profile through this).
pub fn run_kv_seed_with<P: KvProfile>(seed: u64, opts: &KvOptions) -> KvRun {
    let (cluster_cfg, kv_cfg) = configure(seed, opts);
    let mut sim: KvSim<P> = KvSim::new(cluster_cfg, kv_cfg, seed);
    if opts.faults.clock {
        // Clocks up to 10% slow, within what the lease tolerates (as in the Raft run): lease
        // reads answered by a leader whose lease ran out elsewhere would show in the history.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc10c);
        for n in &mut sim.cluster.nodes {
            n.tick_skip_per_million = rng.gen_range(0..100_000);
        }
    }
    let outcome = drive(&mut sim, opts);
    let history = sim.finish_history();
    let result = outcome.and_then(|()| verdict(seed, opts, &sim, &history));
    KvRun { history, result }
}

fn drive<P: KvProfile>(sim: &mut KvSim<P>, opts: &KvOptions) -> Result<(), Failure> {
    let f = opts.faults;
    for _ in 0..opts.fault_ticks {
        inject_faults(sim, f, opts.nodes)?;
        sim.step()?;
    }
    heal_and_drain(sim)
}

/// Heals every fault and restarts every replica, then demands progress: every client completes
/// an operation invoked after the heal; once new operations stop, every client drains; and
/// every member replica applies the leader's whole log and holds the same kv state.
pub fn heal_and_drain<P: KvProfile>(sim: &mut KvSim<P>) -> Result<(), Failure> {
    sim.set_accepting(true);
    for client in 0..sim.client_count() {
        sim.set_reach(client, None);
    }
    let ids = sim.cluster.ids();
    sim.cluster.net.heal();
    sim.cluster.net.cfg = NetConfig::reliable();
    for &id in &ids {
        sim.cluster.set_slow_disk(id, false);
        sim.restart(id)?;
    }
    let healed_at = sim.now();
    let client_ids: Vec<u64> = (0..sim.client_count()).map(|i| sim.client_id(i)).collect();
    let unserved = |sim: &KvSim<P>| clients_without_ok_since(sim.history(), healed_at, &client_ids);
    if !sim.run_until(KV_LIVENESS_TICKS_MAX, |s| unserved(s).is_empty())? {
        return Err(Failure::Liveness(format!(
            "clients {:?} completed no operation within {KV_LIVENESS_TICKS_MAX} ticks after healing at tick {healed_at} [{}]{}",
            unserved(sim),
            roles(sim),
            sim.describe_clients()
        )));
    }
    // Drain: no new operations; the ones in flight complete or give up (bounded by their
    // timeout), then every member must reach the same state.
    sim.set_accepting(false);
    let drain_ticks = KV_LIVENESS_TICKS_MAX;
    if !sim.run_until(drain_ticks, |s| s.idle())? {
        return Err(Failure::Liveness(format!(
            "clients still busy {drain_ticks} ticks after new operations stopped [{}]{}",
            roles(sim),
            sim.describe_clients()
        )));
    }
    if !sim.run_until(KV_LIVENESS_TICKS_MAX, converged)? {
        return Err(Failure::Liveness(format!(
            "member replicas did not converge on one state [{}]",
            roles(sim)
        )));
    }
    Ok(())
}

/// Every member has applied the leader's whole log and holds the same kv state.
fn converged<P: KvProfile>(sim: &KvSim<P>) -> bool {
    let c = &sim.cluster;
    let Some(leader) = c.leader().and_then(|l| c.raft(l)) else {
        return false;
    };
    let last = leader.status().last_index;
    let mut hash = None;
    for id in leader.conf().members() {
        let Some(r) = c.raft(id) else { return false };
        let app = &c.node(id).app;
        if r.status().applied != last || app.applied_index() != last {
            return false;
        }
        let h = app.state_machine().state_hash();
        if *hash.get_or_insert(h) != h {
            return false;
        }
    }
    true
}

fn roles<P: KvProfile>(sim: &KvSim<P>) -> String {
    sim.cluster
        .ids()
        .iter()
        .map(|&id| match sim.cluster.raft(id) {
            Some(r) => {
                let s = r.status();
                format!("{id}:{:?}/t{}/c{}/a{}", s.role, s.term, s.commit, s.applied)
            }
            None => format!("{id}:down"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the linearizability checker over a history. A non-linearizable verdict is an error
/// that shows the failing key's operations (the key with the fewest); an unknown verdict (the
/// search ran out of budget) is an error too.
pub fn check_linearizable(history: &[Record]) -> Result<CheckReport, String> {
    let report = check_history(history, &CheckConfig::default());
    match &report.verdict {
        Verdict::Linearizable => Ok(report),
        Verdict::NotLinearizable { key, ops } => {
            let mut shown = String::new();
            for op in ops.iter().take(FAILURE_OPS_SHOWN_MAX) {
                shown.push_str("\n  ");
                shown.push_str(&serde_json::to_string(op).unwrap_or_else(|e| e.to_string()));
            }
            if ops.len() > FAILURE_OPS_SHOWN_MAX {
                shown.push_str(&format!(
                    "\n  ... and {} more",
                    ops.len() - FAILURE_OPS_SHOWN_MAX
                ));
            }
            Err(format!(
                "history not linearizable on key {key:?} ({} ops on it):{shown}",
                ops.len()
            ))
        }
        Verdict::Unknown { keys } => Err(format!("the checker ran out of budget on keys {keys:?}")),
    }
}

fn verdict<P: KvProfile>(
    seed: u64,
    opts: &KvOptions,
    sim: &KvSim<P>,
    history: &[Record],
) -> Result<KvSummary, Failure> {
    let report = check_linearizable(history).map_err(|e| {
        Failure::Safety(format!(
            "seed {seed}: {e}\n  reproduce: {}",
            repro_command(seed, opts)
        ))
    })?;
    let s = &sim.stats;
    Ok(KvSummary {
        steps: sim.cluster.steps,
        ops: history.len() as u64,
        ops_ok: s.ops_ok,
        ops_timeout: s.ops_timeout,
        stale_reads: s.stale_reads,
        write_retries_maybe_applied: s.write_retries_maybe_applied,
        snapshots_taken: s.snapshots_taken,
        snapshot_chunks_sent: sim
            .cluster
            .net
            .stats
            .by_kind
            .get("Snapshot")
            .copied()
            .unwrap_or(0),
        restarts_from_snapshot: s.restarts_from_snapshot,
        check_steps: report.steps,
        digest: sim.cluster.digest,
    })
}

/// One tick's draw of faults, the same shapes and rates as the Raft run (`sim::run`).
fn inject_faults<P: KvProfile>(
    sim: &mut KvSim<P>,
    f: Faults,
    voters_target: usize,
) -> Result<(), Violation> {
    let ids: Vec<NodeId> = sim.cluster.ids();
    let pick = |sim: &mut KvSim<P>| *ids.choose(&mut sim.cluster.rng).unwrap_or(&1);
    if f.crash && sim.cluster.rng.gen_bool(0.004) {
        let id = pick(sim);
        sim.crash(id);
    }
    if f.crash {
        for &id in &ids {
            if !sim.cluster.is_up(id) && sim.cluster.rng.gen_bool(0.03) {
                sim.restart(id)?;
            }
        }
    }
    if f.partition && sim.cluster.rng.gen_bool(0.006) {
        partition(sim, &ids);
    }
    if f.partition && sim.cluster.net.is_partitioned() && sim.cluster.rng.gen_bool(0.01) {
        sim.cluster.net.heal();
    }
    if f.slow_disk && sim.cluster.rng.gen_bool(0.004) {
        let id = pick(sim);
        let slow = !sim.cluster.node(id).slow_disk;
        sim.cluster.set_slow_disk(id, slow);
    }
    if f.transfer && sim.cluster.rng.gen_bool(0.002) {
        if let Some(l) = sim.cluster.leader() {
            let to = pick(sim);
            if let Some(r) = sim.cluster.raft_mut(l) {
                let _ = r.transfer_leader(to);
            }
        }
    }
    if f.membership && sim.cluster.rng.gen_bool(0.004) {
        change_membership(&mut sim.cluster, voters_target);
    }
    Ok(())
}

fn partition<P: KvProfile>(sim: &mut KvSim<P>, ids: &[NodeId]) {
    let c = &mut sim.cluster;
    c.net.heal();
    match c.rng.gen_range(0..3) {
        0 => {
            // A random split in two.
            let mut shuffled = ids.to_vec();
            shuffled.shuffle(&mut c.rng);
            let k = c.rng.gen_range(1..ids.len().max(2));
            let (a, b) = shuffled.split_at(k.min(shuffled.len()));
            for &x in a {
                for &y in b {
                    c.net.cut_link(x, y);
                    c.net.cut_link(y, x);
                }
            }
        }
        1 => {
            // Isolate the leader.
            if let Some(l) = c.leader() {
                c.net.isolate(l, ids.iter().copied());
            }
        }
        _ => {
            // Asymmetric: one node can send but not receive (or the reverse).
            let x = *ids.choose(&mut c.rng).unwrap_or(&1);
            let inbound = c.rng.gen_bool(0.5);
            for &y in ids {
                if y != x {
                    if inbound {
                        c.net.cut_link(y, x);
                    } else {
                        c.net.cut_link(x, y);
                    }
                }
            }
        }
    }
}

/// The clients of `clients` with no successful operation invoked at or after tick `since`: the
/// liveness phase of a run waits until this is empty.
pub fn clients_without_ok_since(history: &[Record], since: u64, clients: &[u64]) -> Vec<u64> {
    let served: std::collections::BTreeSet<u64> = history
        .iter()
        .filter(|r| r.invoke >= since && r.status == Status::Ok)
        .filter_map(|r| match r.client {
            ClientId::Number(id) => Some(id),
            ClientId::Name(_) => None,
        })
        .collect();
    clients
        .iter()
        .copied()
        .filter(|id| !served.contains(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_arg_round_trips_through_the_parser() {
        for arg in [
            "all",
            "none",
            "crash",
            "crash,partition,net",
            "disk,membership",
        ] {
            let f = Faults::parse(arg).unwrap();
            assert_eq!(faults_arg(f), arg);
        }
    }
}
