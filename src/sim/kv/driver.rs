//! Simulated kv clients over a simulated group, and the history they record.
//!
//! Each client opens a session (its client id), then runs one operation at a time: it invokes
//! it at sim tick t0 and sends it to the replica it believes leads. Writes carry (client id,
//! seq) and go through the log; all writes sent to one replica in one tick share one proposal
//! (one batch entry), as a server batches one loop turn. Linearizable reads go through
//! ReadIndex/lease at that replica (`Cluster::read_at`) and are served from its state machine
//! once it has applied the read index. A refusal (not leader) redirects to the hint, or to the
//! next replica; a lost or timed-out attempt is retried with the SAME (client id, seq) at the
//! next replica. After `op_timeout_ticks` or `attempts_max` sends the client gives up: a write
//! that may have reached a log is recorded as `timeout` (possibly applied), one that never did
//! as `fail`. Stale reads are answered at once by any replica; they are checked by
//! [`StaleReadCheck`](super::stale::StaleReadCheck), not by the linearizability checker.
//!
//! The driver also takes the snapshots: when a replica's state machine says `snapshot_due`
//! (a small log-bytes threshold), it serialises the state, compacts the Raft log and stores the
//! snapshot on the replica's simulated disk, as the node runtime does at the end of a loop turn.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::app::{decode_replies, KvApp, KvProfile, Reply, SimProfile};
use super::stale::StaleReadCheck;
use crate::check::{ClientId, JsonBytes, OpKind, Record, Status};
use crate::kv::{encode_batch, Command, Op, Outcome as KvOutcome, ReadConsistency};
use crate::raft::{CompactError, NodeId, ProposeError, ReadError};
use crate::sim::{App, Cluster, ClusterConfig, Outcome, ProposalId, ReadOutcome, Violation};

/// Simulated milliseconds per tick, for the batches' log timestamps (session expiry).
pub const TICK_MS: u64 = 10;
/// Clients of one simulation: more would only make the per-key check exponential.
pub const CLIENTS_MAX: usize = 64;
/// Keys of one simulation.
pub const KEYS_MAX: usize = 1024;

/// Relative weights of the operations a client picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpMix {
    pub get: u32,
    pub stale_get: u32,
    pub put: u32,
    pub append: u32,
    pub delete: u32,
}

impl OpMix {
    /// Mostly appends and reads (appends make a double apply visible in every later read),
    /// with puts and deletes so that values also restart.
    pub fn standard() -> OpMix {
        OpMix {
            get: 30,
            stale_get: 5,
            put: 15,
            append: 45,
            delete: 5,
        }
    }

    fn total(&self) -> u32 {
        self.get + self.stale_get + self.put + self.append + self.delete
    }
}

/// Client behaviour of one simulation.
#[derive(Clone, Debug)]
pub struct KvSimConfig {
    pub clients: usize,
    /// Keys `k0..k{keys-1}`: few, so that operations conflict.
    pub keys: usize,
    pub mix: OpMix,
    /// Ticks a client waits between two operations, drawn from `0..=think_ticks_max`.
    pub think_ticks_max: u64,
    /// Ticks after which a client gives up on an operation.
    pub op_timeout_ticks: u64,
    /// Sends of one operation (the first, redirects and retries) before the client gives up.
    pub attempts_max: u32,
    /// Replies lost on the way back to the client, in percent: the client cannot tell a lost
    /// reply from a lost request and retries the same (client id, seq) elsewhere, so this is
    /// what exercises exactly-once hardest.
    pub lost_replies_percent: u32,
    /// TEST ONLY, broken on purpose: "linearizable" reads answered at once by any replica.
    pub follower_reads: bool,
}

impl KvSimConfig {
    pub fn new(clients: usize, keys: usize) -> KvSimConfig {
        assert!(
            (1..=CLIENTS_MAX).contains(&clients),
            "clients {clients} outside 1..={CLIENTS_MAX}"
        );
        assert!(
            (1..=KEYS_MAX).contains(&keys),
            "keys {keys} outside 1..={KEYS_MAX}"
        );
        KvSimConfig {
            clients,
            keys,
            mix: OpMix::standard(),
            think_ticks_max: 3,
            op_timeout_ticks: 300,
            attempts_max: 64,
            lost_replies_percent: 0,
            follower_reads: false,
        }
    }
}

/// Counters of one simulation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    pub ops_ok: u64,
    pub ops_fail: u64,
    pub ops_timeout: u64,
    pub stale_reads: u64,
    /// Sends after the first (redirects and retries).
    pub resends: u64,
    /// Retries of a write whose earlier send may have been applied (the exactly-once cases).
    pub write_retries_maybe_applied: u64,
    pub snapshots_taken: u64,
    /// Restarts that began from a snapshot on disk.
    pub restarts_from_snapshot: u64,
    pub crashes: u64,
}

/// An operation a test scripts for one client (the value of a put or append is generated,
/// unique as always).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptOp {
    Get(usize),
    StaleGet(usize),
    Put(usize),
    Append(usize),
    Delete(usize),
}

#[derive(Clone, Debug)]
enum ClientOp {
    OpenSession,
    Write {
        kind: OpKind,
        key: Bytes,
        value: Option<Bytes>,
    },
    Read {
        key: Bytes,
        stale: bool,
    },
}

#[derive(Clone, Copy, Debug)]
enum Attempt {
    /// To be sent at tick `at` or later.
    Ready { at: u64 },
    /// In the batch proposed as `proposal`, at position `slot`.
    Proposed {
        proposal: ProposalId,
        slot: usize,
        node: NodeId,
        incarnation: u32,
    },
    /// Waiting for the read index.
    Reading { ctx: u64 },
    /// Leadership confirmed at `index`: serve once `node` (same incarnation) applied it.
    Serving {
        node: NodeId,
        incarnation: u32,
        index: u64,
    },
}

#[derive(Clone, Debug)]
struct Request {
    op: ClientOp,
    seq: u64,
    invoke: u64,
    deadline: u64,
    sends: u32,
    /// An earlier send may have been applied (it reached a log and its fate is unknown).
    maybe_applied: bool,
    attempt: Attempt,
}

#[derive(Clone, Debug)]
enum Phase {
    /// Opening the session (not part of the history).
    Opening(Request),
    Thinking {
        until: u64,
    },
    Busy(Request),
}

#[derive(Clone, Debug)]
struct SimClient {
    id: u64,
    /// The last write sequence number used.
    seq: u64,
    ops_started: u64,
    /// The replica this client believes leads.
    target: NodeId,
    /// Replicas this client can reach (None: all).
    reach: Option<Vec<NodeId>>,
    /// Round-robin position among the reachable replicas, advanced by every rotation, so that
    /// redirects between two confused replicas cannot keep a client away from the leader.
    rotation: usize,
    /// Operations a test queued; taken before random ones, even when not accepting.
    script: VecDeque<ScriptOp>,
    phase: Phase,
}

/// A simulated group running the kv state machine, with clients recording a history.
pub struct KvSim<P: KvProfile = SimProfile> {
    pub cluster: Cluster<KvApp<P>>,
    cfg: KvSimConfig,
    rng: ChaCha8Rng,
    clients: Vec<SimClient>,
    history: Vec<Record>,
    stale: StaleReadCheck,
    accepting: bool,
    pub stats: KvStats,
}

impl<P: KvProfile> KvSim<P> {
    pub fn new(cluster_cfg: ClusterConfig, cfg: KvSimConfig, seed: u64) -> KvSim<P> {
        let cluster = Cluster::new(cluster_cfg, seed);
        let rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b76_5f63_6c69_656e);
        let nodes = cluster.nodes.len() as u64;
        let clients = (0..cfg.clients as u64)
            .map(|i| SimClient {
                id: i + 1,
                seq: 0,
                ops_started: 0,
                target: i % nodes + 1,
                reach: None,
                rotation: i as usize,
                script: VecDeque::new(),
                phase: Phase::Opening(Request {
                    op: ClientOp::OpenSession,
                    seq: 0,
                    invoke: 0,
                    deadline: cfg.op_timeout_ticks,
                    sends: 0,
                    maybe_applied: false,
                    attempt: Attempt::Ready { at: 0 },
                }),
            })
            .collect();
        KvSim {
            cluster,
            cfg,
            rng,
            clients,
            history: Vec::new(),
            stale: StaleReadCheck::default(),
            accepting: true,
            stats: KvStats::default(),
        }
    }

    pub fn now(&self) -> u64 {
        self.cluster.now
    }

    /// Whether clients start new operations (the one in flight always runs to its end).
    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    /// Limits the replicas client `client` (0-based) can reach; None: all.
    pub fn set_reach(&mut self, client: usize, reach: Option<Vec<NodeId>>) {
        let c = &mut self.clients[client];
        if let Some(r) = &reach {
            assert!(!r.is_empty(), "a client must reach at least one replica");
            if !r.contains(&c.target) {
                c.target = r[0];
            }
        }
        c.reach = reach;
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Queues operations for client `client` (0-based); they run one at a time, before any
    /// random operation and even when the clients do not accept new ones. Keys are `k<n>`.
    pub fn script(&mut self, client: usize, ops: &[ScriptOp]) {
        self.clients[client].script.extend(ops.iter().copied());
    }

    /// Client `client` has nothing in flight and nothing queued.
    pub fn client_done(&self, client: usize) -> bool {
        let c = &self.clients[client];
        c.script.is_empty() && matches!(c.phase, Phase::Thinking { .. })
    }

    /// One line per busy client: its target and request state, for failure messages.
    pub fn describe_clients(&self) -> String {
        let mut out = String::new();
        for c in &self.clients {
            let req = match &c.phase {
                Phase::Thinking { .. } => continue,
                Phase::Opening(req) | Phase::Busy(req) => req,
            };
            out.push_str(&format!(
                "\n  client {} -> node {}: {:?} seq {} invoked {} sends {} maybe applied {} {:?}",
                c.id,
                c.target,
                req.op,
                req.seq,
                req.invoke,
                req.sends,
                req.maybe_applied,
                req.attempt
            ));
        }
        out
    }

    /// The id client `client` (0-based) records in the history.
    pub fn client_id(&self, client: usize) -> u64 {
        self.clients[client].id
    }

    /// Whether client `client` (0-based) has a history operation in flight.
    pub fn client_busy(&self, client: usize) -> bool {
        matches!(self.clients[client].phase, Phase::Busy(_))
    }

    /// No client has an operation, a queued operation or a session opening in flight.
    pub fn idle(&self) -> bool {
        (0..self.clients.len()).all(|i| self.client_done(i))
    }

    /// Operations completed so far.
    pub fn history(&self) -> &[Record] {
        &self.history
    }

    pub fn stale_reads_checked(&self) -> u64 {
        self.stale.checked
    }

    /// The history: every completed operation, then the ones still in flight as `timeout`
    /// (a write in flight may still be applied; a read in flight is dropped by the checker).
    pub fn finish_history(&self) -> Vec<Record> {
        let mut records = self.history.clone();
        for c in &self.clients {
            if let Phase::Busy(req) = &c.phase {
                if let Some(r) = record(c.id, req, None, None, Status::Timeout) {
                    records.push(r);
                }
            }
        }
        records.sort_by_key(|r| (r.invoke, r.complete));
        records
    }

    pub fn crash(&mut self, id: NodeId) {
        if self.cluster.is_up(id) {
            self.stats.crashes += 1;
        }
        self.cluster.crash(id);
    }

    pub fn restart(&mut self, id: NodeId) -> Result<(), Violation> {
        if !self.cluster.is_up(id) && self.cluster.node(id).disk.snapshot().is_some() {
            self.stats.restarts_from_snapshot += 1;
        }
        self.cluster.restart(id)
    }
    /// One tick: clients act, writes are proposed in per-replica batches, the group runs one
    /// tick, and replicas over the snapshot threshold take a snapshot. A client that sees
    /// something a correct service never does (a write error, a forged stale value, an
    /// undecodable reply) is a violation, like a broken Raft invariant.
    pub fn step(&mut self) -> Result<(), Violation> {
        let mut batches: BTreeMap<NodeId, Vec<(usize, Command)>> = BTreeMap::new();
        for i in 0..self.clients.len() {
            self.poll_client(i, &mut batches)?;
        }
        self.propose_batches(batches);
        self.cluster.step()?;
        self.take_snapshots()
    }

    fn poll_client(
        &mut self,
        i: usize,
        batches: &mut BTreeMap<NodeId, Vec<(usize, Command)>>,
    ) -> Result<(), Violation> {
        let now = self.cluster.now;
        let client_id = self.clients[i].id;
        if let Phase::Thinking { until } = self.clients[i].phase {
            let scripted = self.clients[i].script.front().copied();
            if now < until || (scripted.is_none() && !self.accepting) {
                return Ok(());
            }
            let op = match self.clients[i].script.pop_front() {
                Some(op) => op,
                None => self.random_op(),
            };
            self.start_op(i, op);
        }
        let (req, opening) = match &self.clients[i].phase {
            Phase::Opening(req) => (req.clone(), true),
            Phase::Busy(req) => (req.clone(), false),
            Phase::Thinking { .. } => return Ok(()),
        };
        if now >= req.deadline
            || (matches!(req.attempt, Attempt::Ready { .. }) && req.sends >= self.cfg.attempts_max)
        {
            self.give_up(i, &req, opening);
            return Ok(());
        }
        match req.attempt {
            Attempt::Ready { at } if now >= at => self.send(i, req, batches),
            Attempt::Ready { .. } => Ok(()),
            Attempt::Proposed {
                proposal,
                slot,
                node,
                incarnation,
            } => match self.cluster.outcome(proposal) {
                Outcome::Pending => Ok(()),
                Outcome::Committed { .. } if self.reply_lost() => {
                    self.retry(i, req, true);
                    Ok(())
                }
                Outcome::Committed { index, result } => {
                    // The proposer answers once the write is applied in its own state machine
                    // (apply runs behind commit, never ahead of the answer).
                    let n = self.cluster.node(node);
                    if n.incarnation == incarnation && n.app.applied_index() < index {
                        return Err(Violation(format!(
                            "client {}: node {node} answered entry {index} before applying it (applied {})",
                            self.clients[i].id,
                            n.app.applied_index()
                        )));
                    }
                    let replies = decode_replies(&result).map_err(|e| {
                        Violation(format!("client {client_id}: reply of entry {index}: {e}"))
                    })?;
                    let reply = replies.get(slot).cloned().ok_or_else(|| {
                        Violation(format!(
                            "client {}: entry {index} has {} replies, want slot {slot}",
                            self.clients[i].id,
                            replies.len()
                        ))
                    })?;
                    self.write_done(i, req, reply)
                }
                Outcome::Failed => {
                    self.retry(i, req, false);
                    Ok(())
                }
                Outcome::Unknown => {
                    self.retry(i, req, true);
                    Ok(())
                }
            },
            Attempt::Reading { ctx } => {
                match self.cluster.read_outcome(ctx) {
                    ReadOutcome::Pending => {}
                    ReadOutcome::Ready { node, index } => {
                        let incarnation = self.cluster.node(node).incarnation;
                        let mut req = req;
                        req.attempt = Attempt::Serving {
                            node,
                            incarnation,
                            index,
                        };
                        self.set_request(i, req);
                    }
                    ReadOutcome::Unknown => self.retry(i, req, false),
                }
                Ok(())
            }
            Attempt::Serving {
                node,
                incarnation,
                index,
            } => {
                let n = self.cluster.node(node);
                if n.raft.is_none() || n.incarnation != incarnation {
                    self.retry(i, req, false);
                    return Ok(());
                }
                if n.app.applied_index() < index {
                    // Apply runs behind commit: the read waits for it, not the other way.
                    return Ok(());
                }
                if self.reply_lost() {
                    self.retry(i, req, false);
                    return Ok(());
                }
                self.serve_read(i, req, node, ReadConsistency::Linearizable)
            }
        }
    }

    fn random_op(&mut self) -> ScriptOp {
        let mix = self.cfg.mix;
        let key = self.rng.gen_range(0..self.cfg.keys);
        let mut pick = self.rng.gen_range(0..mix.total().max(1));
        let mut take = |weight: u32| {
            let hit = pick < weight;
            pick -= weight.min(pick);
            hit
        };
        if take(mix.get) {
            ScriptOp::Get(key)
        } else if take(mix.stale_get) {
            ScriptOp::StaleGet(key)
        } else if take(mix.put) {
            ScriptOp::Put(key)
        } else if take(mix.append) {
            ScriptOp::Append(key)
        } else {
            ScriptOp::Delete(key)
        }
    }

    fn start_op(&mut self, i: usize, op: ScriptOp) {
        let now = self.cluster.now;
        let c = &mut self.clients[i];
        c.ops_started += 1;
        let value = Bytes::from(format!("{}.{};", c.id, c.ops_started));
        let key = |k: usize| Bytes::from(format!("k{k}"));
        let write = |kind, k, value| ClientOp::Write {
            kind,
            key: key(k),
            value,
        };
        let op = match op {
            ScriptOp::Get(k) => ClientOp::Read {
                key: key(k),
                stale: false,
            },
            ScriptOp::StaleGet(k) => ClientOp::Read {
                key: key(k),
                stale: true,
            },
            ScriptOp::Put(k) => write(OpKind::Put, k, Some(value)),
            ScriptOp::Append(k) => write(OpKind::Append, k, Some(value)),
            ScriptOp::Delete(k) => write(OpKind::Delete, k, None),
        };
        let seq = match &op {
            ClientOp::Write { kind, key, value } => {
                if let Some(value) = value {
                    self.stale.on_write_invoked(key, *kind, value);
                }
                c.seq += 1;
                c.seq
            }
            _ => 0,
        };
        c.phase = Phase::Busy(Request {
            op,
            seq,
            invoke: now,
            deadline: now + self.cfg.op_timeout_ticks,
            sends: 0,
            maybe_applied: false,
            attempt: Attempt::Ready { at: now },
        });
    }

    fn set_request(&mut self, i: usize, req: Request) {
        let c = &mut self.clients[i];
        c.phase = match c.phase {
            Phase::Opening(_) => Phase::Opening(req),
            _ => Phase::Busy(req),
        };
    }

    fn send(
        &mut self,
        i: usize,
        mut req: Request,
        batches: &mut BTreeMap<NodeId, Vec<(usize, Command)>>,
    ) -> Result<(), Violation> {
        if req.sends > 0 {
            self.stats.resends += 1;
            if req.maybe_applied && matches!(req.op, ClientOp::Write { .. }) {
                self.stats.write_retries_maybe_applied += 1;
            }
        }
        req.sends += 1;
        let now = self.cluster.now;
        let client_id = self.clients[i].id;
        let target = self.clients[i].target;
        let op = match &req.op {
            ClientOp::OpenSession => Op::OpenSession,
            ClientOp::Write { kind, key, value } => {
                let key = key.clone();
                match (kind, value) {
                    (OpKind::Put, Some(value)) => Op::Put {
                        key,
                        value: value.clone(),
                    },
                    (OpKind::Append, Some(value)) => Op::Append {
                        key,
                        value: value.clone(),
                    },
                    _ => Op::Delete { key },
                }
            }
            ClientOp::Read { stale: true, .. } => {
                let node = self.any_reachable_up_node(i);
                return self.serve_read(i, req, node, ReadConsistency::Stale);
            }
            ClientOp::Read { .. } if self.cfg.follower_reads => {
                let node = self.any_reachable_up_node(i);
                return self.serve_read(i, req, node, ReadConsistency::Linearizable);
            }
            ClientOp::Read { .. } => {
                match self.cluster.read_at(target) {
                    Ok(ctx) => req.attempt = Attempt::Reading { ctx },
                    Err(ReadError::NotLeader { leader }) => {
                        self.redirect(i, leader);
                        req.attempt = Attempt::Ready { at: now + 1 };
                    }
                    Err(ReadError::TooMany { .. }) => {
                        self.rotate(i);
                        req.attempt = Attempt::Ready { at: now + 1 };
                    }
                }
                self.set_request(i, req);
                return Ok(());
            }
        };
        batches.entry(target).or_default().push((
            i,
            Command {
                client_id,
                seq: req.seq,
                op,
            },
        ));
        // Stays Ready until `propose_batches` records where it went.
        req.attempt = Attempt::Ready { at: u64::MAX };
        self.set_request(i, req);
        Ok(())
    }

    fn propose_batches(&mut self, batches: BTreeMap<NodeId, Vec<(usize, Command)>>) {
        let now = self.cluster.now;
        for (node, entries) in batches {
            let commands: Vec<Command> = entries.iter().map(|(_, c)| c.clone()).collect();
            let payload = encode_batch(now * TICK_MS, &commands);
            let result = self.cluster.propose_at(node, payload);
            for (slot, (i, _)) in entries.into_iter().enumerate() {
                let mut req = match &self.clients[i].phase {
                    Phase::Opening(req) | Phase::Busy(req) => req.clone(),
                    Phase::Thinking { .. } => unreachable!("client {i} sent without a request"),
                };
                req.attempt = match &result {
                    Ok(proposal) => Attempt::Proposed {
                        proposal: *proposal,
                        slot,
                        node,
                        incarnation: self.cluster.node(node).incarnation,
                    },
                    Err(ProposeError::NotLeader { leader }) => {
                        self.redirect(i, *leader);
                        Attempt::Ready { at: now + 1 }
                    }
                    Err(_) => {
                        self.rotate(i);
                        Attempt::Ready { at: now + 1 }
                    }
                };
                self.set_request(i, req);
            }
        }
    }

    /// The send was lost (`maybe_applied`: it may still be applied) or definitely failed: send
    /// the same request to the next replica.
    fn retry(&mut self, i: usize, mut req: Request, maybe_applied: bool) {
        req.maybe_applied |= maybe_applied;
        req.attempt = Attempt::Ready {
            at: self.cluster.now + 1,
        };
        self.rotate(i);
        self.set_request(i, req);
    }

    fn reply_lost(&mut self) -> bool {
        self.cfg.lost_replies_percent > 0
            && self.rng.gen_range(0..100) < self.cfg.lost_replies_percent
    }

    fn reachable(&self, i: usize, node: NodeId) -> bool {
        let in_group = node >= 1 && node as usize <= self.cluster.nodes.len();
        in_group
            && match &self.clients[i].reach {
                None => true,
                Some(r) => r.contains(&node),
            }
    }

    fn redirect(&mut self, i: usize, hint: NodeId) {
        if hint != 0 && hint != self.clients[i].target && self.reachable(i, hint) {
            self.clients[i].target = hint;
        } else {
            self.rotate(i);
        }
    }

    /// The next replica in this client's round robin over the reachable ones (skipping the
    /// current target).
    fn rotate(&mut self, i: usize) {
        let candidates = match &self.clients[i].reach {
            Some(r) => r.clone(),
            None => self.cluster.ids(),
        };
        let c = &mut self.clients[i];
        for _ in 0..candidates.len() {
            let next = candidates[c.rotation % candidates.len()];
            c.rotation = c.rotation.wrapping_add(1);
            if next != c.target {
                c.target = next;
                return;
            }
        }
    }

    fn any_reachable_up_node(&mut self, i: usize) -> Option<NodeId> {
        let up: Vec<NodeId> = self
            .cluster
            .ids()
            .into_iter()
            .filter(|&id| self.cluster.is_up(id) && self.reachable(i, id))
            .collect();
        if up.is_empty() {
            return None;
        }
        Some(up[self.rng.gen_range(0..up.len())])
    }

    fn serve_read(
        &mut self,
        i: usize,
        mut req: Request,
        node: impl Into<Option<NodeId>>,
        consistency: ReadConsistency,
    ) -> Result<(), Violation> {
        let ClientOp::Read { key, stale } = &req.op else {
            unreachable!("serve_read of a write")
        };
        let Some(node) = node.into() else {
            // Nothing reachable is up: try again next tick.
            req.attempt = Attempt::Ready {
                at: self.cluster.now + 1,
            };
            self.set_request(i, req);
            return Ok(());
        };
        let op = Op::Get { key: key.clone() };
        let value = match self
            .cluster
            .node(node)
            .app
            .state_machine()
            .read(&op, consistency)
        {
            KvOutcome::Value(v) => v,
            other => {
                return Err(Violation(format!(
                    "client {}: get of {:?} at node {node} answered {other:?}",
                    self.clients[i].id, key
                )))
            }
        };
        if *stale {
            self.stale.check(key, value.as_ref()).map_err(|e| {
                Violation(format!("client {} at node {node}: {e}", self.clients[i].id))
            })?;
            self.stats.stale_reads += 1;
            self.think(i);
            return Ok(());
        }
        // A missing key is recorded as null, which the checker tells apart from "".
        self.complete(i, &req, value.map(JsonBytes), Status::Ok);
        Ok(())
    }

    fn write_done(&mut self, i: usize, req: Request, reply: Reply) -> Result<(), Violation> {
        let expected = match &req.op {
            ClientOp::OpenSession => matches!(reply, Reply::Ok),
            ClientOp::Write {
                kind: OpKind::Put, ..
            } => matches!(reply, Reply::Ok),
            ClientOp::Write {
                kind: OpKind::Append,
                value: Some(value),
                ..
            } => matches!(reply, Reply::Int(n) if n >= value.len() as i64),
            ClientOp::Write {
                kind: OpKind::Delete,
                ..
            } => matches!(reply, Reply::Int(0 | 1)),
            _ => false,
        };
        if !expected {
            return Err(Violation(format!(
                "client {} seq {}: {:?} answered {reply:?} (sends {}, maybe applied before: {})",
                self.clients[i].id, req.seq, req.op, req.sends, req.maybe_applied
            )));
        }
        match req.op {
            ClientOp::OpenSession => self.think(i),
            _ => self.complete(i, &req, None, Status::Ok),
        }
        Ok(())
    }

    fn give_up(&mut self, i: usize, req: &Request, opening: bool) {
        let now = self.cluster.now;
        if opening {
            // A session must open before anything else; OpenSession is idempotent.
            let mut req = req.clone();
            req.deadline = now + self.cfg.op_timeout_ticks;
            req.sends = 0;
            req.attempt = Attempt::Ready { at: now };
            self.clients[i].phase = Phase::Opening(req);
            return;
        }
        let in_a_log = req.maybe_applied || matches!(req.attempt, Attempt::Proposed { .. });
        let status = match req.op {
            ClientOp::Write { .. } if !in_a_log => Status::Fail,
            _ => Status::Timeout,
        };
        self.complete(i, req, None, status);
    }

    fn complete(&mut self, i: usize, req: &Request, result: Option<JsonBytes>, status: Status) {
        let now = self.cluster.now;
        let complete = (status != Status::Timeout).then_some(now);
        if let Some(r) = record(self.clients[i].id, req, complete, result, status) {
            self.history.push(r);
        }
        match status {
            Status::Ok => self.stats.ops_ok += 1,
            Status::Fail => self.stats.ops_fail += 1,
            Status::Timeout => self.stats.ops_timeout += 1,
        }
        self.think(i);
    }

    fn think(&mut self, i: usize) {
        let pause = self.rng.gen_range(0..=self.cfg.think_ticks_max);
        self.clients[i].phase = Phase::Thinking {
            until: self.cluster.now + 1 + pause,
        };
    }

    fn take_snapshots(&mut self) -> Result<(), Violation> {
        for id in self.cluster.ids() {
            if self.cluster.node(id).app.snapshot_due() {
                self.snapshot_now(id)?;
            }
        }
        Ok(())
    }

    /// Replica `id` snapshots its state at its applied index, compacts its log and stores the
    /// snapshot on its disk. Returns whether it did (not when down, when the applied index is
    /// not durable locally yet, or when a snapshot already covers it).
    pub fn snapshot_now(&mut self, id: NodeId) -> Result<bool, Violation> {
        let i = (id - 1) as usize;
        let node = &mut self.cluster.nodes[i];
        let Some(raft) = node.raft.as_mut() else {
            return Ok(false);
        };
        let status = raft.status();
        if node.app.applied_index() != status.applied {
            return Err(Violation(format!(
                "node {id}: kv applied {} but raft handed out {}",
                node.app.applied_index(),
                status.applied
            )));
        }
        if status.persisted < status.applied {
            return Ok(false); // compact needs the index durable locally: next tick
        }
        match raft.compact(status.applied, node.app.snapshot()) {
            Ok(()) => {
                if let Some(s) = raft.snapshot() {
                    node.disk.store_snapshot(s.clone());
                }
                node.app.mark_snapshot_taken();
                self.cluster.checker.on_snapshot_durable(id, status.applied);
                self.stats.snapshots_taken += 1;
                Ok(true)
            }
            // A snapshot from the leader already covers this index.
            Err(CompactError::Stale { .. }) => {
                node.app.mark_snapshot_taken();
                Ok(false)
            }
            Err(CompactError::NotApplied { .. }) => Ok(false),
        }
    }
}

/// The history record of a request; None for session opening (not a kv operation).
fn record(
    client: u64,
    req: &Request,
    complete: Option<u64>,
    result: Option<JsonBytes>,
    status: Status,
) -> Option<Record> {
    let (op, key, value) = match &req.op {
        ClientOp::OpenSession => return None,
        ClientOp::Write { kind, key, value } => (*kind, key, value.clone().map(JsonBytes)),
        ClientOp::Read { key, .. } => (OpKind::Get, key, None),
    };
    Some(Record {
        client: ClientId::Number(client),
        op,
        key: JsonBytes(key.clone()),
        value,
        invoke: req.invoke,
        complete,
        result,
        status,
    })
}

impl<P: KvProfile> crate::sim::Steps for KvSim<P> {
    fn step(&mut self) -> Result<(), Violation> {
        KvSim::step(self)
    }
}
