//! One seeded simulation run with faults, and its verdict.
//!
//! A run has a fault phase (client load plus crashes, restarts, partitions of every shape, slow
//! disks, and a lossy, duplicating, reordering network, all drawn from the seed) and then a
//! liveness phase: every fault is healed and every replica restarted, and a leader must be
//! elected and a new proposal committed within `LIVENESS_TICKS_MAX` ticks.
//!
//! Crashes strike between ticks and also inside a replica's Ready loop (after it took a Ready,
//! after submitting the write, after sending, after applying, after a write completed but
//! before the replica heard), and a crash keeps a random prefix of the unfinished writes.
//!
//! The schedule aims at the dangerous case for reads: a leader is isolated (often), its clock
//! runs slow (as slow as the lease's drift bound allows, with `clock`), and clients keep
//! reading from it while the majority elects a new leader and acknowledges writes.

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::raft::{ConfChange, NodeId, ReadMode, Role, TestBreakage};

use super::app::{App, HashApp};
use super::cluster::{Cluster, ClusterConfig, Outcome};
use super::invariants::Violation;
use super::network::NetConfig;
use super::Steps;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    pub crash: bool,
    pub partition: bool,
    pub lossy_net: bool,
    pub slow_disk: bool,
    pub transfer: bool,
    /// Membership changes: add learners (new replicas), promote them, remove voters.
    pub membership: bool,
    /// Clock skew: replicas whose clocks run up to 10% slow (within the lease's drift bound).
    pub clock: bool,
}

impl Faults {
    pub fn all() -> Faults {
        Faults {
            crash: true,
            partition: true,
            lossy_net: true,
            slow_disk: true,
            transfer: true,
            membership: true,
            clock: true,
        }
    }
    pub fn none() -> Faults {
        Faults {
            crash: false,
            partition: false,
            lossy_net: false,
            slow_disk: false,
            transfer: false,
            membership: false,
            clock: false,
        }
    }
    /// Parses `all`, `none`, or a comma list of `crash,partition,net,disk,transfer,membership,clock`.
    pub fn parse(s: &str) -> Result<Faults, String> {
        match s {
            "all" => return Ok(Faults::all()),
            "none" => return Ok(Faults::none()),
            _ => {}
        }
        let mut f = Faults::none();
        for part in s.split(',') {
            match part {
                "crash" => f.crash = true,
                "partition" => f.partition = true,
                "net" => f.lossy_net = true,
                "disk" => f.slow_disk = true,
                "transfer" => f.transfer = true,
                "membership" => f.membership = true,
                "clock" => f.clock = true,
                other => {
                    return Err(format!(
                    "unknown fault {other:?} (all, none, crash, partition, net, disk, transfer, membership, clock)"
                ))
                }
            }
        }
        Ok(f)
    }
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub nodes: usize,
    pub faults: Faults,
    pub fault_ticks: u64,
    /// Read mode for every replica; `None`: drawn from the seed (half the runs use leases).
    pub read_mode: Option<ReadMode>,
    /// TEST ONLY: deliberate bugs in the core (see `TestBreakage`).
    pub breakage: TestBreakage,
    /// TEST ONLY: a broken shell that reports writes durable when submitted.
    pub ack_on_submit: bool,
}

impl RunOptions {
    pub fn new(nodes: usize, faults: Faults) -> RunOptions {
        RunOptions {
            nodes,
            faults,
            fault_ticks: 600,
            read_mode: None,
            breakage: TestBreakage::default(),
            ack_on_submit: false,
        }
    }
}

/// Clock skew bounds, in ticks missed per million. The lease is `election_ticks -
/// lease_drift_ticks` = 16 of 20 ticks in the simulator, so a leader clock up to 20% slow is
/// within the drift bound; an isolated leader gets up to 15% (a margin for whole-tick rounding).
const CLOCK_SLOW_PER_MILLION_MAX: u32 = 100_000;
const ISOLATED_LEADER_SLOW_PER_MILLION_MAX: u32 = 150_000;

/// Ticks after healing within which a leader must exist and a new proposal must commit.
pub const LIVENESS_TICKS_MAX: u64 = 600;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub steps: u64,
    pub committed: u64,
    pub acked: u64,
    pub digest: u64,
    pub messages: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Safety(String),
    Liveness(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Safety(s) => write!(f, "safety: {s}"),
            Failure::Liveness(s) => write!(f, "liveness: {s}"),
        }
    }
}

impl From<Violation> for Failure {
    fn from(v: Violation) -> Failure {
        Failure::Safety(v.0)
    }
}

/// Runs one seed. Panics inside the core (broken assertions) propagate; the binary catches them.
pub fn run_seed(seed: u64, opts: &RunOptions) -> Result<RunSummary, Failure> {
    let mut cfg = ClusterConfig::new(opts.nodes);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0x5eed);
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
    cfg.snapshot_every_entries = rng.gen_range(10..100);
    cfg.raft.max_inflight_msgs = rng.gen_range(1..=4);
    cfg.raft.max_entries_per_msg = rng.gen_range(1..=32);
    let lease = rng.gen_bool(0.5);
    cfg.raft.read_mode = match opts.read_mode {
        Some(mode) => mode,
        None if lease => ReadMode::Lease,
        None => ReadMode::Safe,
    };
    cfg.raft.test_breakage = opts.breakage;
    cfg.ack_on_submit = opts.ack_on_submit;
    if opts.faults.crash {
        cfg.crash_in_ready_per_million = rng.gen_range(0..200);
    }
    let mut c: Cluster<HashApp> = Cluster::new(cfg, seed);
    if opts.faults.clock {
        for n in &mut c.nodes {
            n.tick_skip_per_million = rng.gen_range(0..CLOCK_SLOW_PER_MILLION_MAX);
        }
    }
    let f = opts.faults;
    // The leader most recently cut off from everyone, while that partition lasts.
    let mut isolated: Option<NodeId> = None;
    for _ in 0..opts.fault_ticks {
        let ids: Vec<NodeId> = c.ids();
        // The isolated leader, while it still believes it leads: the window for stale reads.
        let stale = isolated.filter(|&l| c.raft(l).is_some_and(|r| r.role() == Role::Leader));
        // Client load: a few proposals and reads per tick at most; while an old leader is cut
        // off, the majority side gets more writes to acknowledge.
        let write_chance = if stale.is_some() { 0.8 } else { 0.3 };
        if c.rng.gen_bool(write_chance) {
            let size = c.rng.gen_range(1..64);
            let tag = c.rng.gen::<u64>();
            let mut data = tag.to_le_bytes().to_vec();
            data.resize(size.max(8), 7);
            let _ = c.propose(Bytes::from(data));
        }
        if c.rng.gen_bool(0.05) {
            // Any node that believes it leads, stale leaders included.
            let leaders: Vec<NodeId> = ids
                .iter()
                .copied()
                .filter(|&id| c.raft(id).is_some_and(|r| r.role() == Role::Leader))
                .collect();
            if let Some(&l) = leaders.choose(&mut c.rng) {
                let _ = c.read_at(l);
            }
        }
        if let Some(l) = stale {
            // Clients cut off with the old leader keep reading from it.
            let _ = c.read_at(l);
        }
        if f.crash && c.rng.gen_bool(0.004) {
            let id = *ids.choose(&mut c.rng).unwrap_or(&1);
            c.crash(id);
        }
        if f.crash {
            for &id in &ids {
                if !c.is_up(id) && c.rng.gen_bool(0.03) {
                    c.restart(id)?;
                }
            }
        }
        if f.partition {
            let before = isolated;
            if c.rng.gen_bool(0.006) {
                isolated = partition(&mut c, &ids);
            } else if !c.net.is_partitioned() && c.rng.gen_bool(0.05) {
                // Hunt leaders: cut off one that serves reads, again and again.
                if let Some(l) = c
                    .leader()
                    .filter(|&l| c.raft(l).is_some_and(|r| r.committed_in_term()))
                {
                    c.net.isolate(l, ids.iter().copied());
                    isolated = Some(l);
                }
            }
            if let Some(l) = isolated.filter(|_| isolated != before && f.clock) {
                // Its clock runs slow, as slow as the drift bound allows.
                c.nodes[(l - 1) as usize].tick_skip_per_million = c
                    .rng
                    .gen_range(CLOCK_SLOW_PER_MILLION_MAX..ISOLATED_LEADER_SLOW_PER_MILLION_MAX);
            }
            // Heal soon once the old leader has stepped down, never while it may serve reads.
            let heal_chance = match (isolated, stale) {
                (Some(_), Some(_)) => 0.0,
                (Some(_), None) => 0.1,
                (None, _) => 0.01,
            };
            if c.net.is_partitioned() && c.rng.gen_bool(heal_chance) {
                c.net.heal();
                isolated = None;
            }
        }
        if f.slow_disk && c.rng.gen_bool(0.004) {
            let id = *ids.choose(&mut c.rng).unwrap_or(&1);
            let slow = !c.node(id).slow_disk;
            c.set_slow_disk(id, slow);
        }
        if f.transfer && c.rng.gen_bool(0.002) {
            if let Some(l) = c.leader() {
                let to = *ids.choose(&mut c.rng).unwrap_or(&1);
                if let Some(r) = c.raft_mut(l) {
                    let _ = r.transfer_leader(to);
                }
            }
        }
        if f.membership && c.rng.gen_bool(0.004) {
            change_membership(&mut c, opts.nodes);
        }
        c.step()?;
    }
    let ids: Vec<NodeId> = c.ids();
    // Heal everything and demand progress.
    c.net.heal();
    c.net.cfg = NetConfig::reliable();
    c.cfg.crash_in_ready_per_million = 0;
    for &id in &ids {
        c.set_slow_disk(id, false);
        c.restart(id)?;
    }
    let healed_at = c.now;
    let mut probe = None;
    let mut committed = false;
    while c.now < healed_at + LIVENESS_TICKS_MAX {
        let stable_leader = c
            .leader()
            .filter(|&l| c.raft(l).is_some_and(|r| r.committed_in_term()));
        match probe {
            Some(p) => match c.outcome(p) {
                Outcome::Committed { .. } => {
                    committed = true;
                    break;
                }
                Outcome::Pending => {}
                _ => probe = None,
            },
            None => {
                if stable_leader.is_some() {
                    probe = c.propose(Bytes::from_static(b"liveness-probe")).ok();
                }
            }
        }
        c.step()?;
    }
    if !committed {
        let roles: Vec<String> = ids
            .iter()
            .map(|&id| match c.raft(id) {
                Some(r) => format!("{id}:{:?}/t{}/c{}", r.role(), r.term(), r.status().commit),
                None => format!("{id}:down"),
            })
            .collect();
        return Err(Failure::Liveness(format!(
            "no proposal committed within {LIVENESS_TICKS_MAX} ticks after healing at tick {healed_at} [{}]",
            roles.join(" ")
        )));
    }
    // Every member eventually applies what the leader committed (removed replicas are not
    // members any more and may stay behind).
    let target = c.checker.committed_len();
    let members_of = |c: &Cluster<HashApp>| -> Option<Vec<NodeId>> {
        let leader = c.raft(c.leader()?)?;
        Some(leader.conf().members().collect())
    };
    let converged = c.run_until(LIVENESS_TICKS_MAX, |c| {
        members_of(c).is_some_and(|members| {
            members
                .iter()
                .all(|&id| c.raft(id).is_some_and(|r| r.status().applied >= target))
        })
    })?;
    let members = members_of(&c).unwrap_or_else(|| ids.clone());
    if !converged {
        return Err(Failure::Liveness(format!(
            "replicas did not all apply index {target} after healing: {}",
            members
                .iter()
                .map(|&id| format!(
                    "{id}:{:?}",
                    c.raft(id).map(|r| (r.role(), r.status().applied))
                ))
                .collect::<Vec<_>>()
                .join(" ")
        )));
    }
    let leaders = ids
        .iter()
        .filter(|&&id| c.raft(id).is_some_and(|r| r.role() == Role::Leader))
        .count();
    debug_assert!(leaders >= 1);
    Ok(RunSummary {
        steps: c.steps,
        committed: c.checker.committed_len(),
        acked: c.checker.acked_max,
        digest: c.digest,
        messages: c.net.stats.sent,
    })
}

/// Replicas a run may grow to by adding learners.
const NODES_MAX: usize = 7;

/// One single-server change at the leader: promote a learner, remove a surplus voter, or add a
/// brand new replica as a learner (it catches up from the log or a snapshot). Refusals (one
/// change pending, learner behind) are fine. The raft and kv workloads both use it.
pub(crate) fn change_membership<A: App>(c: &mut Cluster<A>, voters_target: usize) {
    let Some(leader) = c.leader() else { return };
    let Some(conf) = c.raft(leader).map(|r| r.conf().clone()) else {
        return;
    };
    let change = if let Some(&learner) = conf.learners.first() {
        ConfChange::PromoteLearner(learner)
    } else if conf.voters.len() > voters_target {
        ConfChange::Remove(*conf.voters.choose(&mut c.rng).unwrap_or(&leader))
    } else if c.nodes.len() < NODES_MAX {
        let id = c.add_node();
        ConfChange::AddLearner(id)
    } else {
        return;
    };
    let _ = c.propose_conf_change(change);
}

/// Cuts the network in one of three shapes; returns the leader when it was isolated.
fn partition(c: &mut Cluster<HashApp>, ids: &[NodeId]) -> Option<NodeId> {
    c.net.heal();
    if ids.len() < 2 {
        return None;
    }
    // Isolating the leader is the dangerous case for reads: weigh it up.
    match c.rng.gen_range(0..5) {
        0 => {
            // A random split in two.
            let mut shuffled = ids.to_vec();
            shuffled.shuffle(&mut c.rng);
            let k = c.rng.gen_range(1..ids.len());
            let (a, b) = shuffled.split_at(k);
            for &x in a {
                for &y in b {
                    c.net.cut_link(x, y);
                    c.net.cut_link(y, x);
                }
            }
        }
        1..=2 => {
            // Isolate the leader.
            let l = c.leader()?;
            c.net.isolate(l, ids.iter().copied());
            return Some(l);
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
    None
}
