//! Clients of the sharded service, and the history they record.
//!
//! A client routes a key to its shard (`key_shard`) and the shard to its group with a cached
//! configuration (fetched from the controller through the RPC network). It runs one operation
//! at a time: writes go through the owning group's log with the client's session (client id,
//! seq), opened at each group before the first write there; reads go through ReadIndex at the
//! group's leader and are served once that replica applied the read index. Answers that say
//! the shard is elsewhere (wrong group: `-MOVED`) or migrating (`-TRYAGAIN` / `-ASK`) make it
//! refresh its configuration and retry; a lost answer, a crash or a timeout makes it retry the
//! same (client id, seq), possibly at another group after a move (the session entries travel
//! with the shard, so exactly-once holds across groups). After `op_timeout_ticks` it gives up:
//! a write that may have reached a log is recorded as `timeout`, one that never did as `fail`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::app::{decode_result, ReadAnswer, ResultClass};
use super::world::DataGroup;
use crate::check::{ClientId, JsonBytes, OpKind, Record, Status};
use crate::controller::{Configuration, GroupId, GROUP_NONE};
use crate::kv::{encode_batch, Command, Op};
use crate::raft::{NodeId, ProposeError, ReadError};
use crate::shard::key_shard;
use crate::sim::kv::{Reply, ReplyError, TICK_MS};
use crate::sim::{Outcome, ProposalId, ReadOutcome, Violation};

/// Clients of one world.
pub const CLIENTS_MAX: usize = 32;
/// Keys of one world.
pub const KEYS_MAX: usize = 256;
/// Ticks between two configuration queries of one client.
const CONFIG_ASK_TICKS: u64 = 4;
/// The first client's id (the admin's controller session is 1).
const CLIENT_ID_BASE: u64 = 1_000;

#[derive(Clone, Debug)]
pub struct ClientsConfig {
    pub clients: usize,
    /// Keys `k0..k{keys-1}`.
    pub keys: usize,
    /// Ticks a client waits between two operations, drawn from `0..=think_ticks_max`.
    pub think_ticks_max: u64,
    pub op_timeout_ticks: u64,
    /// Answers lost on the way back, in percent (the client retries the same seq).
    pub lost_replies_percent: u32,
    /// Percent of operations that are reads (the rest: appends and puts).
    pub reads_percent: u32,
}

impl ClientsConfig {
    pub fn new(clients: usize, keys: usize) -> ClientsConfig {
        assert!((1..=CLIENTS_MAX).contains(&clients), "clients {clients}");
        assert!((1..=KEYS_MAX).contains(&keys), "keys {keys}");
        ClientsConfig {
            clients,
            keys,
            think_ticks_max: 3,
            op_timeout_ticks: 400,
            lost_replies_percent: 0,
            reads_percent: 35,
        }
    }
}

/// An operation of the history a test may script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptOp {
    Get(usize),
    Put(usize),
    Append(usize),
}

#[derive(Clone, Debug)]
enum Attempt {
    Ready {
        at: u64,
    },
    Opening {
        group: GroupId,
        proposal: ProposalId,
    },
    Proposed {
        group: GroupId,
        proposal: ProposalId,
    },
    Reading {
        group: GroupId,
        ctx: u64,
    },
    Serving {
        group: GroupId,
        node: NodeId,
        incarnation: u32,
        index: u64,
    },
}

#[derive(Clone, Debug)]
struct Request {
    kind: OpKind,
    key: Bytes,
    value: Option<Bytes>,
    seq: u64,
    invoke: u64,
    deadline: u64,
    /// An earlier send may have been applied.
    maybe_applied: bool,
    attempt: Attempt,
}

#[derive(Clone, Debug)]
struct Client {
    id: u64,
    config: Option<Configuration>,
    ask_at: u64,
    opened: BTreeSet<GroupId>,
    target: BTreeMap<GroupId, NodeId>,
    seq: u64,
    ops_started: u64,
    script: std::collections::VecDeque<ScriptOp>,
    idle_until: u64,
    busy: Option<Request>,
}

/// Counters of the clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub ops_ok: u64,
    pub ops_fail: u64,
    pub ops_timeout: u64,
    pub moved_answers: u64,
    pub try_again_answers: u64,
    pub sessions_opened: u64,
}

pub struct Clients {
    cfg: ClientsConfig,
    rng: ChaCha8Rng,
    clients: Vec<Client>,
    accepting: bool,
    history: Vec<Record>,
    pub stats: ClientStats,
}

impl Clients {
    pub fn new(cfg: ClientsConfig, seed: u64) -> Clients {
        let clients = (0..cfg.clients)
            .map(|i| Client {
                id: CLIENT_ID_BASE + i as u64,
                config: None,
                ask_at: 0,
                opened: BTreeSet::new(),
                target: BTreeMap::new(),
                seq: 0,
                ops_started: 0,
                script: Default::default(),
                idle_until: 0,
                busy: None,
            })
            .collect();
        Clients {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xc11e_7500),
            clients,
            accepting: true,
            history: Vec::new(),
            stats: ClientStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn client_id(&self, i: usize) -> u64 {
        self.clients[i].id
    }

    /// Whether clients start new random operations (scripted ones always run).
    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    /// Queues operations for client `i`, run before any random one.
    pub fn script(&mut self, i: usize, ops: &[ScriptOp]) {
        self.clients[i].script.extend(ops.iter().copied());
    }

    /// No client has an operation in flight or queued.
    pub fn idle(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.busy.is_none() && c.script.is_empty())
    }

    /// The completed operations so far.
    pub fn history(&self) -> &[Record] {
        &self.history
    }

    /// The history: completed operations, then those in flight as `timeout`.
    pub fn finish_history(&self) -> Vec<Record> {
        let mut records = self.history.clone();
        for c in &self.clients {
            if let Some(req) = &c.busy {
                records.push(record(c.id, req, None, None, Status::Timeout));
            }
        }
        records.sort_by_key(|r| (r.invoke, r.complete));
        records
    }

    pub fn describe(&self) -> String {
        let mut out = String::new();
        for c in &self.clients {
            if let Some(req) = &c.busy {
                out.push_str(&format!(
                    "\n  client {} {:?} {:?} seq {} invoked {} config {:?} {:?}",
                    c.id,
                    req.kind,
                    req.key,
                    req.seq,
                    req.invoke,
                    c.config.as_ref().map(|c| c.num),
                    req.attempt
                ));
            }
        }
        out
    }

    /// A configuration reply for client `i`: kept when newer than its cache.
    pub fn learn_config(&mut self, i: usize, config: Configuration) {
        if let Some(c) = self.clients.get_mut(i) {
            if c.config.as_ref().map_or(true, |old| old.num < config.num) {
                c.config = Some(config);
            }
        }
    }

    /// One tick of every client. `asks` receives the clients that want a fresh configuration.
    pub fn step(
        &mut self,
        now: u64,
        groups: &mut BTreeMap<GroupId, DataGroup>,
        asks: &mut Vec<usize>,
    ) -> Result<(), Violation> {
        for i in 0..self.clients.len() {
            if self.clients[i].config.is_none() {
                self.ask(i, now, asks);
            }
            self.client_turn(i, now, groups, asks)?;
        }
        Ok(())
    }

    fn ask(&mut self, i: usize, now: u64, asks: &mut Vec<usize>) {
        let c = &mut self.clients[i];
        if c.ask_at <= now {
            c.ask_at = now + CONFIG_ASK_TICKS;
            asks.push(i);
        }
    }

    fn start(&mut self, i: usize, now: u64) {
        let scripted = self.clients[i].script.pop_front();
        let op = match scripted {
            Some(op) => op,
            None => {
                let key = self.rng.gen_range(0..self.cfg.keys);
                let roll = self.rng.gen_range(0..100);
                if roll < self.cfg.reads_percent {
                    ScriptOp::Get(key)
                } else if roll < self.cfg.reads_percent + (100 - self.cfg.reads_percent) / 4 {
                    ScriptOp::Put(key)
                } else {
                    ScriptOp::Append(key)
                }
            }
        };
        let c = &mut self.clients[i];
        c.ops_started += 1;
        let value = Bytes::from(format!("{}.{};", c.id, c.ops_started));
        let key = |k: usize| Bytes::from(format!("k{k}"));
        let (kind, key, value) = match op {
            ScriptOp::Get(k) => (OpKind::Get, key(k), None),
            ScriptOp::Put(k) => (OpKind::Put, key(k), Some(value)),
            ScriptOp::Append(k) => (OpKind::Append, key(k), Some(value)),
        };
        let seq = if kind == OpKind::Get {
            0
        } else {
            c.seq += 1;
            c.seq
        };
        c.busy = Some(Request {
            kind,
            key,
            value,
            seq,
            invoke: now,
            deadline: now + self.cfg.op_timeout_ticks,
            maybe_applied: false,
            attempt: Attempt::Ready { at: now },
        });
    }

    fn client_turn(
        &mut self,
        i: usize,
        now: u64,
        groups: &mut BTreeMap<GroupId, DataGroup>,
        asks: &mut Vec<usize>,
    ) -> Result<(), Violation> {
        if self.clients[i].busy.is_none() {
            let c = &self.clients[i];
            let wants = !c.script.is_empty() || self.accepting;
            if now < c.idle_until || !wants {
                return Ok(());
            }
            self.start(i, now);
        }
        let Some(mut req) = self.clients[i].busy.clone() else {
            return Ok(());
        };
        if now >= req.deadline {
            let in_a_log = req.maybe_applied || matches!(req.attempt, Attempt::Proposed { .. });
            let status = if req.kind != OpKind::Get && !in_a_log {
                Status::Fail
            } else {
                Status::Timeout
            };
            self.complete(i, now, &req, None, status);
            return Ok(());
        }
        let client_id = self.clients[i].id;
        match req.attempt.clone() {
            Attempt::Ready { at } => {
                if now < at {
                    return Ok(());
                }
                let Some(config) = self.clients[i].config.as_ref() else {
                    return Ok(());
                };
                let shard = key_shard(&req.key, config.shard_count());
                let gid = config.owner(shard).unwrap_or(GROUP_NONE);
                let running = groups.get(&gid).is_some_and(|g| !g.stopped);
                if gid == GROUP_NONE || !running {
                    self.ask(i, now, asks);
                    req.attempt = Attempt::Ready { at: now + 2 };
                    self.clients[i].busy = Some(req);
                    return Ok(());
                }
                let Some(g) = groups.get_mut(&gid) else {
                    return Ok(());
                };
                let target = *self.clients[i].target.entry(gid).or_insert(1);
                let result: Result<Attempt, NodeId> = if req.kind == OpKind::Get {
                    match g.cluster.read_at(target) {
                        Ok(ctx) => Ok(Attempt::Reading { group: gid, ctx }),
                        Err(ReadError::NotLeader { leader }) => Err(leader),
                        Err(_) => Err(0),
                    }
                } else if !self.clients[i].opened.contains(&gid) {
                    let open = Command {
                        client_id,
                        seq: 0,
                        op: Op::OpenSession,
                    };
                    match g
                        .cluster
                        .propose_at(target, encode_batch(now * TICK_MS, &[open]))
                    {
                        Ok(proposal) => Ok(Attempt::Opening {
                            group: gid,
                            proposal,
                        }),
                        Err(ProposeError::NotLeader { leader }) => Err(leader),
                        Err(_) => Err(0),
                    }
                } else {
                    let key = req.key.clone();
                    let op = match (&req.kind, &req.value) {
                        (OpKind::Append, Some(v)) => Op::Append {
                            key,
                            value: v.clone(),
                        },
                        (_, v) => Op::Put {
                            key,
                            value: v.clone().unwrap_or_default(),
                        },
                    };
                    let command = Command {
                        client_id,
                        seq: req.seq,
                        op,
                    };
                    match g
                        .cluster
                        .propose_at(target, encode_batch(now * TICK_MS, &[command]))
                    {
                        Ok(proposal) => Ok(Attempt::Proposed {
                            group: gid,
                            proposal,
                        }),
                        Err(ProposeError::NotLeader { leader }) => Err(leader),
                        Err(_) => Err(0),
                    }
                };
                req.attempt = match result {
                    Ok(a) => a,
                    Err(hint) => {
                        self.redirect(i, gid, hint, g.hosts.len());
                        Attempt::Ready { at: now + 1 }
                    }
                };
            }
            Attempt::Opening { group, proposal } => {
                let Some(g) = groups.get(&group) else {
                    req.attempt = Attempt::Ready { at: now + 1 };
                    self.clients[i].busy = Some(req);
                    return Ok(());
                };
                match g.cluster.outcome(proposal) {
                    Outcome::Pending => return Ok(()),
                    Outcome::Committed { result, index } => {
                        let (_, replies) = decode_result(&result)
                            .map_err(|e| Violation(format!("group {group} entry {index}: {e}")))?;
                        if replies.first() != Some(&Reply::Ok) {
                            return Err(Violation(format!(
                                "client {client_id}: opening a session at group {group} answered {replies:?}"
                            )));
                        }
                        self.clients[i].opened.insert(group);
                        self.stats.sessions_opened += 1;
                        req.attempt = Attempt::Ready { at: now };
                    }
                    Outcome::Failed | Outcome::Unknown => {
                        let n = g.hosts.len();
                        self.redirect(i, group, 0, n);
                        req.attempt = Attempt::Ready { at: now + 1 };
                    }
                }
            }
            Attempt::Proposed { group, proposal } => {
                let Some(g) = groups.get(&group) else {
                    req.maybe_applied = true;
                    req.attempt = Attempt::Ready { at: now + 1 };
                    self.clients[i].busy = Some(req);
                    return Ok(());
                };
                let n = g.hosts.len();
                match g.cluster.outcome(proposal) {
                    Outcome::Pending => return Ok(()),
                    Outcome::Committed { .. } if self.reply_lost() => {
                        req.maybe_applied = true;
                        req.attempt = Attempt::Ready { at: now + 1 };
                    }
                    Outcome::Committed { result, index } => {
                        let (class, replies) = decode_result(&result)
                            .map_err(|e| Violation(format!("group {group} entry {index}: {e}")))?;
                        match class {
                            ResultClass::WrongShard | ResultClass::NotServing => {
                                if class == ResultClass::WrongShard {
                                    self.stats.moved_answers += 1;
                                } else {
                                    self.stats.try_again_answers += 1;
                                }
                                self.ask(i, now, asks);
                                req.attempt = Attempt::Ready { at: now + 2 };
                            }
                            _ => match replies.first() {
                                Some(Reply::Err(ReplyError::SessionUnknown)) => {
                                    self.clients[i].opened.remove(&group);
                                    req.attempt = Attempt::Ready { at: now };
                                }
                                Some(reply) => {
                                    let ok = match (req.kind, reply) {
                                        (OpKind::Put, Reply::Ok) => true,
                                        (OpKind::Append, Reply::Int(n)) => req
                                            .value
                                            .as_ref()
                                            .is_some_and(|v| *n >= v.len() as i64),
                                        _ => false,
                                    };
                                    if !ok {
                                        return Err(Violation(format!(
                                            "client {client_id} seq {}: {:?} of {:?} at group {group} answered {reply:?}",
                                            req.seq, req.kind, req.key
                                        )));
                                    }
                                    self.complete(i, now, &req, None, Status::Ok);
                                    return Ok(());
                                }
                                None => {
                                    return Err(Violation(format!(
                                        "client {client_id}: entry {index} of group {group} has no reply"
                                    )))
                                }
                            },
                        }
                    }
                    Outcome::Failed => {
                        self.redirect(i, group, 0, n);
                        req.attempt = Attempt::Ready { at: now + 1 };
                    }
                    Outcome::Unknown => {
                        req.maybe_applied = true;
                        self.redirect(i, group, 0, n);
                        req.attempt = Attempt::Ready { at: now + 1 };
                    }
                }
            }
            Attempt::Reading { group, ctx } => {
                let Some(g) = groups.get(&group) else {
                    req.attempt = Attempt::Ready { at: now + 1 };
                    self.clients[i].busy = Some(req);
                    return Ok(());
                };
                match g.cluster.read_outcome(ctx) {
                    ReadOutcome::Pending => return Ok(()),
                    ReadOutcome::Ready { node, index } => {
                        req.attempt = Attempt::Serving {
                            group,
                            node,
                            incarnation: g.cluster.node(node).incarnation,
                            index,
                        };
                    }
                    ReadOutcome::Unknown => {
                        let n = g.hosts.len();
                        self.redirect(i, group, 0, n);
                        req.attempt = Attempt::Ready { at: now + 1 };
                    }
                }
            }
            Attempt::Serving {
                group,
                node,
                incarnation,
                index,
            } => {
                let Some(g) = groups.get(&group) else {
                    req.attempt = Attempt::Ready { at: now + 1 };
                    self.clients[i].busy = Some(req);
                    return Ok(());
                };
                let n = g.cluster.node(node);
                if n.raft.is_none() || n.incarnation != incarnation || g.stopped {
                    req.attempt = Attempt::Ready { at: now + 1 };
                } else if n.app.applied_index() < index {
                    return Ok(());
                } else if self.reply_lost() {
                    req.attempt = Attempt::Ready { at: now + 1 };
                } else {
                    match n.app.read(&req.key) {
                        ReadAnswer::Value(v) => {
                            self.complete(i, now, &req, v.map(JsonBytes), Status::Ok);
                            return Ok(());
                        }
                        ReadAnswer::WrongShard | ReadAnswer::NotServing => {
                            self.stats.try_again_answers += 1;
                            self.ask(i, now, asks);
                            req.attempt = Attempt::Ready { at: now + 2 };
                        }
                    }
                }
            }
        }
        self.clients[i].busy = Some(req);
        Ok(())
    }

    fn reply_lost(&mut self) -> bool {
        self.cfg.lost_replies_percent > 0
            && self.rng.gen_range(0..100) < self.cfg.lost_replies_percent
    }

    /// Next replica of `group` to try: the hint when there is one, else the next in turn.
    fn redirect(&mut self, i: usize, group: GroupId, hint: NodeId, replicas: usize) {
        let replicas = replicas.max(1) as NodeId;
        let t = self.clients[i].target.entry(group).or_insert(1);
        *t = if hint != 0 && hint != *t && hint <= replicas {
            hint
        } else {
            *t % replicas + 1
        };
    }

    fn complete(
        &mut self,
        i: usize,
        now: u64,
        req: &Request,
        result: Option<JsonBytes>,
        status: Status,
    ) {
        let complete = (status != Status::Timeout).then_some(now);
        self.history
            .push(record(self.clients[i].id, req, complete, result, status));
        match status {
            Status::Ok => self.stats.ops_ok += 1,
            Status::Fail => self.stats.ops_fail += 1,
            Status::Timeout => self.stats.ops_timeout += 1,
        }
        let pause = self.rng.gen_range(0..=self.cfg.think_ticks_max);
        let c = &mut self.clients[i];
        c.busy = None;
        c.idle_until = now + 1 + pause;
    }
}

fn record(
    client: u64,
    req: &Request,
    complete: Option<u64>,
    result: Option<JsonBytes>,
    status: Status,
) -> Record {
    Record {
        client: ClientId::Number(client),
        op: req.kind,
        key: JsonBytes(req.key.clone()),
        value: req.value.clone().map(JsonBytes),
        invoke: req.invoke,
        complete,
        result,
        status,
    }
}
