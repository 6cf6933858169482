//! A simulated group: N replicas, their disks and applications, one network, one clock, one
//! RNG, and a client-facing API (propose to the leader, completion or timeout, read_index).
//!
//! One `step()` is one tick: every live replica ticks, then messages due and disk writes due
//! are delivered and every `Ready` is handled, repeatedly until nothing is left for this tick
//! (so a zero-latency network and disk run a whole round trip inside one tick). The checker
//! (`invariants.rs`) runs on every `Ready` and after every tick.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::raft::{
    ConfChange, Config, Index, InitialState, Message, NodeId, ProposeError, RawNode, ReadError,
    Role, Term,
};

use super::app::{mix, App};
use super::disk::SimDisk;
use super::invariants::{Checker, Violation};
use super::network::{NetConfig, Network};

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub nodes: usize,
    /// Template for every replica's config (`id` is overwritten).
    pub raft: Config,
    pub net: NetConfig,
    pub disk_ticks_min: u64,
    pub disk_ticks_max: u64,
    /// Extra latency of a disk marked slow.
    pub slow_disk_ticks: u64,
    /// Take a snapshot once this many entries were applied since the last one (0: never).
    pub snapshot_every_entries: u64,
    /// Ticks after which a client gives up on a proposal or read.
    pub client_timeout_ticks: u64,
    /// Run the invariant checker (the benchmark turns it off to measure the core alone).
    pub checks: bool,
    /// Chance (per million) that a replica crashes at each step of handling a `Ready` (after
    /// taking it, after submitting its write, after sending its messages, after applying) and
    /// after a write completes but before the node hears of it.
    pub crash_in_ready_per_million: u32,
    /// TEST ONLY, a deliberately broken shell: report every write to the node as durable as
    /// soon as it is submitted (and send its persisted messages then), not when it completes.
    pub ack_on_submit: bool,
}

impl ClusterConfig {
    /// Small timeouts so that simulations are short: heartbeat 2 ticks, election 20-40.
    pub fn sim_raft_config() -> Config {
        let mut c = Config::new(1);
        c.election_ticks = 20;
        c.heartbeat_ticks = 2;
        c.lease_drift_ticks = 4;
        c.max_entries_per_msg = 64;
        c.max_bytes_per_msg = 64 << 10;
        c.max_inflight_msgs = 4;
        c.snapshot_chunk_bytes = 16;
        c
    }

    pub fn new(nodes: usize) -> ClusterConfig {
        ClusterConfig {
            nodes,
            raft: ClusterConfig::sim_raft_config(),
            net: NetConfig::reliable(),
            disk_ticks_min: 0,
            disk_ticks_max: 1,
            slow_disk_ticks: 0,
            snapshot_every_entries: 0,
            client_timeout_ticks: 200,
            checks: true,
            crash_in_ready_per_million: 0,
            ack_on_submit: false,
        }
    }
}

pub struct SimNode<A: App> {
    pub id: NodeId,
    pub raft: Option<RawNode>,
    pub disk: SimDisk,
    pub app: A,
    pub incarnation: u32,
    pub slow_disk: bool,
    /// Clock skew: this replica's clock runs slow, missing this many ticks per million, evenly
    /// spread (a bounded drift, as the lease assumes: see `lease_drift_ticks`).
    pub tick_skip_per_million: u32,
    /// Accumulated drift towards the next missed tick, in millionths of a tick.
    tick_skip_acc: u32,
    /// Highest commit index this incarnation was checked to hold on a quorum of disks.
    commit_checked: Index,
    /// The configuration when this replica last handled a Ready as leader, until it handles
    /// one as a non-leader: a leader can commit and step down between two Readies.
    leader_conf: Option<crate::raft::ConfState>,
    applied_since_snapshot: u64,
}

pub type ProposalId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    /// Applied at `index`; `result` is what the application returned.
    Committed {
        index: Index,
        result: Bytes,
    },
    /// Definitely not committed (another entry took its index).
    Failed,
    /// The replica crashed or the client timed out: it may or may not commit.
    Unknown,
}

struct PendingProposal {
    node: NodeId,
    incarnation: u32,
    index: Index,
    term: Term,
    deadline: u64,
}

struct PendingRead {
    node: NodeId,
    incarnation: u32,
    acked_at_start: Index,
    index: Option<Index>,
    deadline: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    Pending,
    /// Safe to serve from `node`'s application, which has applied at least `index`.
    Ready {
        node: NodeId,
        index: Index,
    },
    Unknown,
}

pub struct Cluster<A: App> {
    pub cfg: ClusterConfig,
    pub now: u64,
    pub rng: ChaCha8Rng,
    pub nodes: Vec<SimNode<A>>,
    pub net: Network,
    pub checker: Checker,
    proposals: BTreeMap<ProposalId, PendingProposal>,
    /// (node, index) -> proposals waiting for that index to be applied on that node.
    by_slot: BTreeMap<(NodeId, Index), Vec<ProposalId>>,
    outcomes: BTreeMap<ProposalId, Outcome>,
    reads: BTreeMap<u64, PendingRead>,
    read_outcomes: BTreeMap<u64, ReadOutcome>,
    next_id: u64,
    /// Running digest of everything delivered and applied: same seed, same digest.
    pub digest: u64,
    pub steps: u64,
    /// Print every delivery, write and apply to stderr (set `TYNAMO_SIM_TRACE=1`).
    pub trace: bool,
    /// Makes a replica's application: at creation and after every crash (a fresh, empty one).
    make_app: Rc<dyn Fn() -> A>,
}

/// Inner rounds per tick before giving up on quiescence (a zero-latency livelock guard).
const ROUNDS_PER_TICK_MAX: usize = 10_000;

impl<A: App> Cluster<A> {
    pub fn new(cfg: ClusterConfig, seed: u64) -> Cluster<A>
    where
        A: Default + 'static,
    {
        Self::with_app(cfg, seed, Rc::new(A::default))
    }

    /// A group whose replicas' applications come from `make_app` (for applications that need
    /// parameters, such as the group id of a sharded data group).
    pub fn with_app(cfg: ClusterConfig, seed: u64, make_app: Rc<dyn Fn() -> A>) -> Cluster<A> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ids: Vec<NodeId> = (1..=cfg.nodes as NodeId).collect();
        let mut nodes = Vec::new();
        for &id in &ids {
            let disk = SimDisk::new(InitialState::bootstrap(&ids));
            let raft = Self::boot(&cfg, id, &disk, rng.gen());
            nodes.push(SimNode {
                id,
                raft: Some(raft),
                disk,
                app: make_app(),
                incarnation: 0,
                slow_disk: false,
                tick_skip_per_million: 0,
                tick_skip_acc: 0,
                commit_checked: 0,
                leader_conf: None,
                applied_since_snapshot: 0,
            });
        }
        let net = Network::new(cfg.net);
        let mut c = Cluster {
            cfg,
            now: 0,
            rng,
            nodes,
            net,
            checker: Checker::default(),
            proposals: BTreeMap::new(),
            by_slot: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            reads: BTreeMap::new(),
            read_outcomes: BTreeMap::new(),
            next_id: 1,
            digest: seed,
            steps: 0,
            trace: std::env::var_os("TYNAMO_SIM_TRACE").is_some(),
            make_app,
        };
        for i in 0..c.nodes.len() {
            let id = c.nodes[i].id;
            let entries = c.nodes[i].disk.entries().to_vec();
            c.checker
                .on_restart(id, 0, 1, &entries)
                .expect("bootstrap log is consistent");
        }
        // The bootstrap entry is committed and on every disk.
        c.checker.on_commit_durable(1);
        c
    }

    fn boot(cfg: &ClusterConfig, id: NodeId, disk: &SimDisk, seed: u64) -> RawNode {
        let mut rc = cfg.raft.clone();
        rc.id = id;
        RawNode::new(rc, disk.initial_state(), seed).expect("simulator raft config is valid")
    }

    fn idx(&self, id: NodeId) -> usize {
        (id - 1) as usize
    }

    pub fn node(&self, id: NodeId) -> &SimNode<A> {
        &self.nodes[self.idx(id)]
    }

    pub fn raft(&self, id: NodeId) -> Option<&RawNode> {
        self.nodes[self.idx(id)].raft.as_ref()
    }

    pub fn raft_mut(&mut self, id: NodeId) -> Option<&mut RawNode> {
        let i = self.idx(id);
        self.nodes[i].raft.as_mut()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.node(id).raft.is_some()
    }

    /// The live leader with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.raft.as_ref())
            .filter(|r| r.role() == Role::Leader)
            .max_by_key(|r| r.term())
            .map(|r| r.id())
    }

    /// Adds a brand new, empty replica (to be added with a membership change).
    pub fn add_node(&mut self) -> NodeId {
        let id = self.nodes.len() as NodeId + 1;
        let disk = SimDisk::new(InitialState::default());
        let raft = Self::boot(&self.cfg, id, &disk, self.rng.gen());
        self.nodes.push(SimNode {
            id,
            raft: Some(raft),
            disk,
            app: (self.make_app)(),
            incarnation: 0,
            slow_disk: false,
            tick_skip_per_million: 0,
            tick_skip_acc: 0,
            commit_checked: 0,
            leader_conf: None,
            applied_since_snapshot: 0,
        });
        id
    }

    // ----- faults ----------------------------------------------------------------------------

    /// Power loss: the replica stops, unsynced writes are lost, its application state is gone.
    pub fn crash(&mut self, id: NodeId) {
        if self.trace {
            eprintln!("t{} CRASH n{id}", self.now);
        }
        let i = self.idx(id);
        let n = &mut self.nodes[i];
        n.raft = None;
        n.disk.crash(&mut self.rng);
        n.app = (self.make_app)();
        n.incarnation += 1;
        n.commit_checked = 0;
        n.leader_conf = None;
    }

    pub fn restart(&mut self, id: NodeId) -> Result<(), Violation> {
        let i = self.idx(id);
        if self.nodes[i].raft.is_some() {
            return Ok(());
        }
        let seed = self.rng.gen();
        let raft = Self::boot(&self.cfg, id, &self.nodes[i].disk, seed);
        if self.trace {
            eprintln!("t{} RESTART n{id} {:?}", self.now, raft.status());
        }
        let n = &mut self.nodes[i];
        let mut app = (self.make_app)();
        if let Some(s) = n.disk.snapshot() {
            app.restore(s)
                .map_err(|e| Violation(format!("node {id} cannot restore its snapshot: {e}")))?;
        }
        n.app = app;
        n.applied_since_snapshot = 0;
        let st = raft.status();
        n.raft = Some(raft);
        let entries = n.disk.entries().to_vec();
        self.checker.on_restart(id, st.applied, st.commit, &entries)
    }

    pub fn set_slow_disk(&mut self, id: NodeId, slow: bool) {
        let i = self.idx(id);
        self.nodes[i].slow_disk = slow;
    }

    // ----- clients ---------------------------------------------------------------------------

    /// Proposes `data` at the current leader. `Err` when there is no leader or it refuses.
    pub fn propose(&mut self, data: Bytes) -> Result<ProposalId, ProposeError> {
        let leader = self.leader().ok_or(ProposeError::NotLeader { leader: 0 })?;
        self.propose_at(leader, data)
    }

    pub fn propose_at(&mut self, node: NodeId, data: Bytes) -> Result<ProposalId, ProposeError> {
        let i = self.idx(node);
        let incarnation = self.nodes[i].incarnation;
        let raft = self.nodes[i]
            .raft
            .as_mut()
            .ok_or(ProposeError::NotLeader { leader: 0 })?;
        let (index, _) = raft.propose(&[data])?;
        let term = raft.term();
        let id = self.next_id;
        self.next_id += 1;
        let deadline = self.now + self.cfg.client_timeout_ticks;
        self.proposals.insert(
            id,
            PendingProposal {
                node,
                incarnation,
                index,
                term,
                deadline,
            },
        );
        self.by_slot.entry((node, index)).or_default().push(id);
        self.outcomes.insert(id, Outcome::Pending);
        Ok(id)
    }

    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Index, ProposeError> {
        let leader = self.leader().ok_or(ProposeError::NotLeader { leader: 0 })?;
        let raft = self
            .raft_mut(leader)
            .ok_or(ProposeError::NotLeader { leader: 0 })?;
        raft.propose_conf_change(change)
    }

    pub fn outcome(&self, id: ProposalId) -> Outcome {
        self.outcomes.get(&id).cloned().unwrap_or(Outcome::Unknown)
    }

    /// Registers a linearizable read at the leader. Returns its id.
    pub fn read(&mut self) -> Option<u64> {
        let leader = self.leader()?;
        self.read_at(leader).ok()
    }

    /// Registers a linearizable read at `node`, as a client that believes it is the leader
    /// would (a deposed leader on the minority side of a partition must not answer it).
    pub fn read_at(&mut self, node: NodeId) -> Result<u64, ReadError> {
        let i = self.idx(node);
        let ctx = self.next_id;
        let incarnation = self.nodes[i].incarnation;
        self.nodes[i]
            .raft
            .as_mut()
            .ok_or(ReadError::NotLeader { leader: 0 })?
            .read_index(ctx)?;
        self.next_id += 1;
        let acked_at_start = self.checker.acked_max;
        let deadline = self.now + self.cfg.client_timeout_ticks;
        self.reads.insert(
            ctx,
            PendingRead {
                node,
                incarnation,
                acked_at_start,
                index: None,
                deadline,
            },
        );
        self.read_outcomes.insert(ctx, ReadOutcome::Pending);
        Ok(ctx)
    }

    pub fn read_outcome(&self, ctx: u64) -> ReadOutcome {
        self.read_outcomes
            .get(&ctx)
            .cloned()
            .unwrap_or(ReadOutcome::Unknown)
    }

    // ----- running ---------------------------------------------------------------------------

    /// One tick of simulated time.
    pub fn step(&mut self) -> Result<(), Violation> {
        self.now += 1;
        self.steps += 1;
        for n in &mut self.nodes {
            n.tick_skip_acc += n.tick_skip_per_million.min(1_000_000);
            let skip = n.tick_skip_acc >= 1_000_000;
            if skip {
                n.tick_skip_acc -= 1_000_000;
            }
            if let Some(r) = n.raft.as_mut() {
                if !skip {
                    r.tick();
                }
            }
        }
        self.settle()?;
        self.expire_clients();
        self.check_tick()
    }
    /// Delivers everything due this tick, completes due writes and handles every Ready.
    pub fn settle(&mut self) -> Result<(), Violation> {
        for _ in 0..ROUNDS_PER_TICK_MAX {
            let mut busy = false;
            for i in 0..self.nodes.len() {
                busy |= self.handle_ready(i)?;
            }
            while let Some(m) = self.net.next_due(self.now) {
                busy = true;
                self.deliver(m);
            }
            for i in 0..self.nodes.len() {
                while let Some(c) = self.nodes[i].disk.next_completed(self.now) {
                    busy = true;
                    if self.nodes[i].raft.is_some() && self.crash_point() {
                        // Durable, but the node never heard: it crashes before on_persisted.
                        self.crash(self.nodes[i].id);
                        break;
                    }
                    if let Some(r) = self.nodes[i].raft.as_mut() {
                        if self.trace {
                            eprintln!("t{} persisted n{} {:?}", self.now, i + 1, c.mark);
                        }
                        r.on_persisted(c.mark);
                        for m in c.persisted_messages {
                            self.net.send(m, self.now, &mut self.rng);
                        }
                    }
                }
            }
            if !busy {
                return Ok(());
            }
        }
        Err(Violation(format!(
            "no quiescence within {ROUNDS_PER_TICK_MAX} rounds at tick {}",
            self.now
        )))
    }

    fn deliver(&mut self, m: Message) {
        let to = m.to;
        if to == 0 || to as usize > self.nodes.len() {
            return;
        }
        self.digest = mix(
            self.digest,
            mix(mix(m.from, m.to), mix(m.term, m.size_bytes())),
        );
        let i = self.idx(to);
        let trace = self.trace;
        if let Some(r) = self.nodes[i].raft.as_mut() {
            if trace {
                eprintln!("t{} deliver {:?}", self.now, m);
            }
            let res = r.step(m);
            if trace && res.is_err() {
                eprintln!("t{}   dropped {:?}", self.now, res);
            }
        }
    }

    fn handle_ready(&mut self, i: usize) -> Result<bool, Violation> {
        let now = self.now;
        let id = self.nodes[i].id;
        let Some(raft) = self.nodes[i].raft.as_mut() else {
            return Ok(false);
        };
        if !raft.has_ready() {
            return Ok(false);
        }
        let conf_before = if raft.role() == Role::Leader {
            Some(raft.conf().clone())
        } else {
            // Stepped down since its last Ready: what it committed meanwhile is checked below.
            self.nodes[i].leader_conf.take()
        };
        let Some(raft) = self.nodes[i].raft.as_mut() else {
            return Ok(false);
        };
        let mut rd = raft.ready();
        let commit = raft.status().commit;
        let role = raft.role();
        let term = raft.term();
        let commit_term = raft.log_term(commit);
        if self.trace {
            eprintln!(
                "t{now} ready n{id} {:?} term {term} commit {commit} hs {:?} entries {:?} snap {:?} apply {:?}",
                role,
                rd.hard_state(),
                rd.entries().iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
                rd.snapshot().map(|s| (s.meta.index, s.meta.term)),
                rd.committed_entries().iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            );
        }
        let checks = self.cfg.checks;
        if checks {
            self.checker.on_commit(id, commit)?;
            if let Some(s) = rd.snapshot() {
                self.checker.on_snapshot_log(id, s.meta.index)?;
            }
            self.checker.on_entries(id, rd.entries())?;
            if role == Role::Leader {
                self.checker.on_leader(id, term)?;
                self.check_leader_vote_durable(i)?;
            }
            if role == Role::Leader || conf_before.is_some() {
                self.check_commit_durable(i, commit, commit_term, conf_before.as_ref())?;
            }
            if role == Role::Leader {
                self.nodes[i].leader_conf = self.nodes[i].raft.as_ref().map(|r| r.conf().clone());
            }
        }
        if self.crash_point() {
            // After taking the Ready, before anything of it was done.
            self.crash(id);
            return Ok(true);
        }
        if rd.must_write() {
            let latency = self
                .rng
                .gen_range(self.cfg.disk_ticks_min..=self.cfg.disk_ticks_max)
                + if self.nodes[i].slow_disk {
                    self.cfg.slow_disk_ticks
                } else {
                    0
                };
            let snapshot = rd.take_snapshot();
            if let Some(s) = &snapshot {
                let node = &mut self.nodes[i];
                node.app
                    .restore(s)
                    .map_err(|e| Violation(format!("node {id}: {e}")))?;
                node.applied_since_snapshot = 0;
            }
            let hs = rd.hard_state();
            let entries = rd.take_entries();
            let mut pm = rd.take_persisted_messages();
            let early = if self.cfg.ack_on_submit {
                std::mem::take(&mut pm)
            } else {
                Vec::new()
            };
            self.nodes[i]
                .disk
                .submit(now + latency, hs, snapshot, entries, rd.write_mark(), pm);
            if self.cfg.ack_on_submit {
                if let Some(r) = self.nodes[i].raft.as_mut() {
                    r.on_persisted(rd.write_mark());
                }
                for m in early {
                    self.net.send(m, now, &mut self.rng);
                }
            }
            if self.crash_point() {
                // The write is submitted (the crash may keep part of it); nothing was sent.
                self.crash(id);
                return Ok(true);
            }
        }
        for m in rd.take_messages() {
            if self.trace {
                eprintln!(
                    "t{now} send {} {}->{} t{} {}B",
                    m.body.name(),
                    m.from,
                    m.to,
                    m.term,
                    m.size_bytes()
                );
            }
            self.net.send(m, now, &mut self.rng);
        }
        if self.crash_point() {
            // Messages are out, the write may still be in flight, nothing applied.
            self.crash(id);
            return Ok(true);
        }
        for e in rd.take_committed_entries() {
            if checks {
                self.checker.on_apply(id, &e)?;
            }
            let node = &mut self.nodes[i];
            let result = node
                .app
                .apply(&e)
                .map_err(|err| Violation(format!("node {id}: {err}")))?;
            node.applied_since_snapshot += 1;
            self.digest = mix(self.digest, mix(e.index, e.term));
            if !self.proposals.is_empty() {
                self.complete_proposals(id, e.index, e.term, result);
            }
        }
        if self.crash_point() {
            // Applied, but no read served and no snapshot taken.
            self.crash(id);
            return Ok(true);
        }
        for rs in rd.take_read_states() {
            if let Some(r) = self.reads.get_mut(&rs.ctx) {
                self.checker.on_read(id, rs.index, r.acked_at_start)?;
                r.index = Some(rs.index);
            }
        }
        // A confirmed read is served once the state machine has caught up with its index.
        let applied = self.nodes[i]
            .raft
            .as_ref()
            .map_or(0, |r| r.status().applied);
        let served: Vec<(u64, Index)> = self
            .reads
            .iter()
            .filter(|(_, r)| r.node == id && r.index.is_some_and(|x| x <= applied))
            .map(|(&ctx, r)| (ctx, r.index.unwrap_or(0)))
            .collect();
        for (ctx, index) in served {
            if let Some(r) = self.reads.remove(&ctx) {
                if checks {
                    self.checker
                        .on_read_served(id, ctx, applied, r.acked_at_start)?;
                }
            }
            self.read_outcomes
                .insert(ctx, ReadOutcome::Ready { node: id, index });
        }
        let every = self.cfg.snapshot_every_entries;
        let node = &mut self.nodes[i];
        if every > 0 && node.applied_since_snapshot >= every {
            if let Some(raft) = node.raft.as_mut() {
                let applied = raft.status().applied;
                if raft.compact(applied, node.app.snapshot()).is_ok() {
                    if let Some(s) = raft.snapshot() {
                        node.disk.store_snapshot(s.clone());
                        self.checker.on_snapshot_durable(id, applied);
                    }
                }
            }
            node.applied_since_snapshot = 0;
        }
        Ok(true)
    }

    /// Whether a crash strikes at this point of the Ready loop (`crash_in_ready_per_million`).
    fn crash_point(&mut self) -> bool {
        let p = self.cfg.crash_in_ready_per_million;
        p > 0 && self.rng.gen_range(0..1_000_000) < p
    }

    /// A leader of term T counted its own vote, so that vote must be on its disk: otherwise a
    /// crash could let it vote for someone else in T, and T would have two leaders.
    fn check_leader_vote_durable(&mut self, i: usize) -> Result<(), Violation> {
        let n = &self.nodes[i];
        let Some(r) = n.raft.as_ref() else {
            return Ok(());
        };
        let hs = n.disk.hard_state();
        if hs.term != r.term() || hs.vote != n.id {
            return Err(Violation(format!(
                "node {} leads term {} but its disk holds term {} vote {}",
                n.id,
                r.term(),
                hs.term,
                hs.vote
            )));
        }
        Ok(())
    }

    /// What "committed" means: the entry at a leader's commit index is on the disks of a quorum
    /// of voters. The commit was decided under the configuration before this Ready or under
    /// the one its applied configuration entries produced, so either quorum will do.
    fn check_commit_durable(
        &mut self,
        i: usize,
        commit: Index,
        commit_term: Option<Term>,
        conf_before: Option<&crate::raft::ConfState>,
    ) -> Result<(), Violation> {
        let id = self.nodes[i].id;
        if commit <= self.nodes[i].commit_checked || commit <= self.checker.durable_commit_max {
            return Ok(());
        }
        let Some(term) = commit_term else {
            return Ok(());
        };
        let Some(conf_after) = self.nodes[i].raft.as_ref().map(|r| r.conf().clone()) else {
            return Ok(());
        };
        let holds = |v: NodeId| -> bool {
            let Some(n) = self.nodes.get((v as usize).wrapping_sub(1)) else {
                return false;
            };
            let base = n.disk.snapshot().map_or(0, |s| s.meta.index);
            if commit <= base {
                return true;
            }
            n.disk
                .entries()
                .get((commit - base - 1) as usize)
                .is_some_and(|e| e.index == commit && e.term == term)
        };
        let quorum_holds = |conf: &crate::raft::ConfState| {
            conf.voters.iter().filter(|&&v| holds(v)).count() >= conf.quorum()
        };
        if !quorum_holds(&conf_after) && !conf_before.is_some_and(quorum_holds) {
            let on: Vec<NodeId> = conf_after
                .voters
                .iter()
                .copied()
                .filter(|&v| holds(v))
                .collect();
            return Err(Violation(format!(
                "leader {id} committed index {commit} (term {term}) but only voters {on:?} of {:?} hold it on disk",
                conf_after.voters
            )));
        }
        self.nodes[i].commit_checked = commit;
        self.checker.on_commit_durable(commit);
        Ok(())
    }

    fn complete_proposals(&mut self, node: NodeId, index: Index, term: Term, result: Bytes) {
        let Some(ids) = self.by_slot.remove(&(node, index)) else {
            return;
        };
        for id in ids {
            let Some(p) = self.proposals.remove(&id) else {
                continue;
            };
            let outcome = if p.term == term {
                self.checker.on_acked(index);
                Outcome::Committed {
                    index,
                    result: result.clone(),
                }
            } else {
                Outcome::Failed
            };
            self.outcomes.insert(id, outcome);
        }
    }

    fn expire_clients(&mut self) {
        let now = self.now;
        let nodes = &self.nodes;
        let alive = |node: NodeId, inc: u32| {
            let n = &nodes[(node - 1) as usize];
            n.raft.is_some() && n.incarnation == inc
        };
        let gone: Vec<ProposalId> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.deadline <= now || !alive(p.node, p.incarnation))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(p) = self.proposals.remove(&id) {
                if let Some(ids) = self.by_slot.get_mut(&(p.node, p.index)) {
                    ids.retain(|&x| x != id);
                    if ids.is_empty() {
                        self.by_slot.remove(&(p.node, p.index));
                    }
                }
            }
            self.outcomes.insert(id, Outcome::Unknown);
        }
        let gone: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.deadline <= now || !alive(r.node, r.incarnation))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.reads.remove(&id);
            self.read_outcomes.insert(id, ReadOutcome::Unknown);
        }
    }

    fn check_tick(&mut self) -> Result<(), Violation> {
        for n in &self.nodes {
            if let Some(r) = &n.raft {
                if r.role() == Role::Leader {
                    self.checker.on_leader(r.id(), r.term())?;
                }
            }
        }
        Ok(())
    }

    /// Number of proposals still waiting.
    pub fn pending_proposals(&self) -> usize {
        self.proposals.len()
    }
}

impl<A: App> super::Steps for Cluster<A> {
    fn step(&mut self) -> Result<(), Violation> {
        Cluster::step(self)
    }
}
