//! One seeded simulation run with faults, and its verdict.
//!
//! A run has a fault phase (client load plus crashes, restarts, partitions of every shape, slow
//! disks, and a lossy, duplicating, reordering network, all drawn from the seed) and then a
//! liveness phase: every fault is healed and every replica restarted, and a leader must be
//! elected and a new proposal committed within `LIVENESS_TICKS_MAX` ticks.

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::raft::{ConfChange, NodeId, Role};

use super::app::HashApp;
use super::cluster::{Cluster, ClusterConfig, Outcome};
use super::invariants::Violation;
use super::network::NetConfig;

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
}

impl RunOptions {
    pub fn new(nodes: usize, faults: Faults) -> RunOptions {
        RunOptions {
            nodes,
            faults,
            fault_ticks: 600,
        }
    }
}

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
    if rng.gen_bool(0.5) {
        cfg.raft.read_mode = crate::raft::ReadMode::Lease;
    }
    let mut c: Cluster<HashApp> = Cluster::new(cfg, seed);
    if opts.faults.clock {
        // 10% slow at most: the lease (election 20 - drift 4 ticks) tolerates 20%.
        for n in &mut c.nodes {
            n.tick_skip_per_million = rng.gen_range(0..100_000);
        }
    }
    let f = opts.faults;
    for _ in 0..opts.fault_ticks {
        let ids: Vec<NodeId> = c.ids();
        // Client load: a few proposals and reads per tick at most.
        if c.rng.gen_bool(0.3) {
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
        if f.partition && c.rng.gen_bool(0.006) {
            partition(&mut c, &ids);
        }
        if f.partition && c.net.is_partitioned() && c.rng.gen_bool(0.01) {
            c.net.heal();
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
/// brand new replica as a learner. Refusals (one change pending, learner behind) are fine.
fn change_membership(c: &mut Cluster<HashApp>, voters_target: usize) {
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

fn partition(c: &mut Cluster<HashApp>, ids: &[NodeId]) {
    c.net.heal();
    if ids.len() < 2 {
        return;
    }
    match c.rng.gen_range(0..3) {
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
