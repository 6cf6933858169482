//! The controller as a simulator application: controller commands go through a simulated
//! 3-replica Raft group under crashes, partitions, message loss, duplication and reordering,
//! with clients that retry with the same (client id, sequence) until they get an answer.
//!
//! Checks: every configuration number is produced by exactly one operation (retries and
//! duplicated messages never create a second one); every retry gets the first answer; all
//! replicas end with byte-identical state. A failure names the seed.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tynamo::controller::{Command, ControllerApp, HostSpec, Op, Reply};
use tynamo::sim::{Cluster, ClusterConfig, NetConfig, Outcome, ProposalId, Steps};

const SEEDS: u64 = 60;
const CLIENTS: u64 = 3;
const OPS_PER_CLIENT: usize = 12;
const TICKS_MAX: u64 = 20_000;

struct Client {
    id: u64,
    ops: Vec<Op>,
    /// Index into `ops` of the operation in progress; its seq is `next + 1`.
    next: usize,
    pending: Option<ProposalId>,
    replies: Vec<Reply>,
    /// The first answer to the operation in progress when the client "lost" it and resends.
    lost: Option<Reply>,
    attempts: u64,
    /// Answers that were thrown away and asked again: each must come back identical.
    lost_replies: u64,
    rng: ChaCha8Rng,
}

impl Client {
    fn new(id: u64, seed: u64) -> Client {
        // Each client joins its own hosts (3 hosts of one core: one group), later retires
        // them; other clients' operations interleave arbitrarily.
        let mut ops = Vec::new();
        for round in 0..OPS_PER_CLIENT as u64 / 2 {
            let base = id * 1_000 + round * 10;
            ops.push(Op::Join {
                hosts: (base..base + 3)
                    .map(|h| HostSpec {
                        id: h,
                        cores: 1,
                        addr: format!("h{h}:7000"),
                    })
                    .collect(),
            });
            if round % 2 == 1 {
                ops.push(Op::Leave {
                    hosts: (base..base + 3).collect(),
                });
            } else {
                ops.push(Op::Move {
                    shard: (id * 7 + round) as u16 % 64,
                    group: 1,
                });
            }
        }
        Client {
            id,
            ops,
            next: 0,
            pending: None,
            replies: Vec::new(),
            lost: None,
            attempts: 0,
            lost_replies: 0,
            rng: ChaCha8Rng::seed_from_u64(seed * 1_000 + id),
        }
    }

    fn done(&self) -> bool {
        self.next == self.ops.len()
    }

    fn payload(&self) -> bytes::Bytes {
        bytes::Bytes::from(
            Command {
                client_id: self.id,
                seq: self.next as u64 + 1,
                op: self.ops[self.next].clone(),
            }
            .encode(),
        )
    }

    /// One tick of the client: wait, take an answer, or (re)send.
    fn tick(&mut self, cluster: &mut Cluster<ControllerApp>, seed: u64) {
        if self.done() {
            return;
        }
        if let Some(id) = self.pending {
            match cluster.outcome(id) {
                Outcome::Pending => return,
                Outcome::Committed { result, .. } => {
                    let reply = Reply::decode(&result)
                        .unwrap_or_else(|e| panic!("seed {seed}: reply does not decode: {e}"));
                    self.pending = None;
                    if let Some(first) = self.lost.take() {
                        assert_eq!(
                            reply,
                            first,
                            "seed {seed}: client {} seq {}: a retry got another answer",
                            self.id,
                            self.next + 1
                        );
                    } else if self.rng.gen_bool(0.4) {
                        // The answer is lost on the way back: ask again with the same seq.
                        self.lost = Some(reply);
                        self.lost_replies += 1;
                        return;
                    }
                    self.replies.push(reply);
                    self.next += 1;
                    self.pending = None;
                    return;
                }
                Outcome::Failed | Outcome::Unknown => self.pending = None,
            }
        }
        let payload = self.payload();
        if let Ok(id) = cluster.propose(payload) {
            self.attempts += 1;
            self.pending = Some(id);
        }
    }
}

/// Returns (latest configuration, resends forced by faults, answers lost and asked again).
fn run(seed: u64) -> (u64, u64, u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cfg = ClusterConfig::new(3);
    cfg.net = NetConfig {
        drop_per_million: rng.gen_range(0..80_000),
        dup_per_million: rng.gen_range(0..50_000),
        delay_ticks_min: 1,
        delay_ticks_max: rng.gen_range(1..=4),
    };
    cfg.disk_ticks_max = rng.gen_range(0..=3);
    cfg.snapshot_every_entries = rng.gen_range(5..30);
    cfg.client_timeout_ticks = 100;
    // A controller snapshot is kilobytes (the simulator default of 16-byte chunks is sized for
    // the 24-byte hash application).
    cfg.raft.snapshot_chunk_bytes = 1 << 10;
    let mut cluster: Cluster<ControllerApp> = Cluster::new(cfg, seed);
    let mut clients: Vec<Client> = (1..=CLIENTS).map(|id| Client::new(id, seed)).collect();
    let mut down: Option<(u64, u64)> = None;
    let mut tick = 0;
    while clients.iter().any(|c| !c.done()) {
        tick += 1;
        assert!(
            tick < TICKS_MAX,
            "seed {seed}: clients not done after {TICKS_MAX} ticks"
        );
        // Faults during the first part of the run, then a healthy cluster to finish.
        let faulty = tick < 3_000;
        if let Some((node, until)) = down {
            if tick >= until || !faulty {
                cluster
                    .restart(node)
                    .unwrap_or_else(|v| panic!("seed {seed}: {v:?}"));
                down = None;
            }
        } else if faulty && rng.gen_ratio(1, 40) {
            let node = rng.gen_range(1..=3);
            cluster.crash(node);
            down = Some((node, tick + rng.gen_range(20..200)));
        }
        if faulty && rng.gen_ratio(1, 60) {
            let node = rng.gen_range(1..=3);
            cluster.net.isolate(node, cluster.ids());
        }
        if rng.gen_ratio(1, 80) || !faulty {
            cluster.net.heal();
        }
        for c in &mut clients {
            c.tick(&mut cluster, seed);
        }
        cluster
            .step()
            .unwrap_or_else(|v| panic!("seed {seed}: invariant violated: {v:?}"));
    }
    // Exactly-once: every configuration number comes from exactly one operation.
    let mut by_num: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    for c in &clients {
        for (i, reply) in c.replies.iter().enumerate() {
            if let Reply::Ok { num } = reply {
                if let Some(other) = by_num.insert(*num, (c.id, i)) {
                    panic!(
                        "seed {seed}: configuration {num} claimed by {other:?} and {:?}",
                        (c.id, i)
                    );
                }
            }
        }
    }
    // Heal everything, let every replica apply everything, then compare them.
    if let Some((node, _)) = down {
        cluster
            .restart(node)
            .unwrap_or_else(|v| panic!("seed {seed}: {v:?}"));
    }
    cluster.net.heal();
    let ok = cluster
        .run_until(2_000, |cl| {
            let applied: Vec<u64> = cl.nodes.iter().map(|n| n.app.sm.applied_index()).collect();
            applied.iter().all(|&a| a == applied[0])
                && cl.nodes.iter().all(|n| n.raft.is_some())
                && cl.leader().is_some()
                && cl.nodes[0]
                    .raft
                    .as_ref()
                    .is_some_and(|r| r.status().commit == applied[0])
        })
        .unwrap_or_else(|v| panic!("seed {seed}: {v:?}"));
    assert!(ok, "seed {seed}: replicas did not converge");
    let latest = cluster.nodes[0].app.sm.latest().num;
    let nums: Vec<u64> = by_num.keys().copied().collect();
    assert_eq!(
        nums,
        (1..=latest).collect::<Vec<_>>(),
        "seed {seed}: configurations not produced exactly once each"
    );
    let snapshot = cluster.nodes[0].app.sm.snapshot();
    for n in &cluster.nodes[1..] {
        assert_eq!(
            n.app.sm.snapshot(),
            snapshot,
            "seed {seed}: replica {} differs",
            n.id
        );
    }
    let attempts: u64 = clients.iter().map(|c| c.attempts).sum();
    let lost: u64 = clients.iter().map(|c| c.lost_replies).sum();
    (
        latest,
        attempts - lost - CLIENTS * OPS_PER_CLIENT as u64,
        lost,
    )
}

#[test]
fn controller_commands_are_exactly_once_under_faults() {
    let (mut retried, mut lost) = (0, 0);
    for seed in 0..SEEDS {
        let (latest, fault_resends, lost_replies) = run(seed);
        assert!(latest >= 1, "seed {seed}: no configuration created");
        retried += fault_resends;
        lost += lost_replies;
    }
    assert!(
        lost > 0,
        "no answer was lost and asked again in {SEEDS} seeds"
    );
    // The faults really forced retries (otherwise exactly-once was not exercised).
    assert!(
        retried > 0,
        "no operation was resent after a fault in {SEEDS} seeds"
    );
    eprintln!("{retried} resends after faults, {lost} lost answers asked again");
}
