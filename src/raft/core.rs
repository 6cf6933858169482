//! `RawNode`: one replica of one group as a deterministic state machine, and `Ready`, the work
//! it hands to the I/O shell.
//!
//! # The Ready contract
//! The shell loops: feed input (`tick`, `step`, `propose`, `read_index`, ...), then, when
//! `has_ready()`, take one `ready()` and do, in this order:
//! 1. Start one storage write holding, in order: `snapshot()` (install it and drop the whole
//!    stored log), `entries()` (truncate the stored log from the first entry's index, then
//!    append), `hard_state()`. Writes complete (become durable) in the order they were started.
//!    `must_write()` says whether a write is needed at all; a write with nothing in it is still
//!    an ordering barrier for `persisted_messages`. `must_sync()` says whether it needs an
//!    fsync (a commit-index-only change does not); unsynced writes still complete in order.
//! 2. Send `messages()` at once: they do not depend on the write (the leader's AppendEntries
//!    leave before its own fsync: the leader counts itself only once `on_persisted` says so).
//! 3. Send `persisted_messages()` only after this write and every earlier one are durable:
//!    votes and vote requests (term and vote must survive a crash before anyone relies on them).
//! 4. Restore `snapshot()` into the state machine if present, then apply `committed_entries()`
//!    in order before calling `ready()` again. They are committed and durable locally already.
//! 5. Serve each `read_states()` entry once the state machine has applied its index.
//! 6. When the write is durable, call `on_persisted(ready.write_mark())`. Followers ack only
//!    what `on_persisted` has reported, so acks never cover entries a crash could lose.
//!
//! # Back of the envelope
//! One fsync is ~0.2 ms, so throughput comes from batching: a `propose` takes a batch, a
//! loop turn produces one `Ready` (one write, one AppendEntries per follower carrying every new
//! entry), and per entry the core does one `Bytes` clone into the log and one per follower
//! message, no other allocation. Commit counting sorts at most 7 match indexes.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{Config, ConfigError, ReadMode};
use super::log::{PersistMark, RaftLog};
use super::membership::{apply_change, decode_conf, encode_conf, ConfChange, ConfChangeError};
use super::progress::{Progress, ProgressState};
use super::types::*;

/// Heartbeat rounds remembered for lease reads; older rounds are too old to extend a lease.
const ROUNDS_MAX: usize = 64;
/// Bytes of committed entries handed out per `Ready`, so one turn stays short.
const APPLY_BYTES_PER_READY_MAX: u64 = 64 << 20;
/// Terms and indexes from the network at or above this are malformed: far beyond any real log
/// (2^62 entries), and it leaves headroom so that `+ 1` never overflows.
const NUMBER_MAX: u64 = 1 << 62;
/// Entries in one AppendEntries accepted from the network (a sanity bound far above the config).
const ENTRIES_PER_MSG_ACCEPT_MAX: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// What the storage holds at start: durable hard state, the latest snapshot and the entries
/// after it. A brand new replica joining a group starts from `InitialState::default()`.
#[derive(Clone, Debug, Default)]
pub struct InitialState {
    pub hard_state: HardState,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    /// The configuration when there is no snapshot and no configuration entry (bootstrap).
    pub conf: ConfState,
}

impl InitialState {
    /// The state every founding member of a new group starts from: entry 1 is a configuration
    /// entry listing `voters`, already committed, so that replicas added later learn the founding
    /// membership from the log (or from a snapshot that includes it).
    pub fn bootstrap(voters: &[NodeId]) -> InitialState {
        let conf = ConfState::new(voters.to_vec(), vec![]);
        let entry = Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Conf,
            data: Bytes::from(encode_conf(&conf)),
        };
        InitialState {
            hard_state: HardState {
                term: 1,
                vote: NODE_NONE,
                commit: 1,
            },
            snapshot: None,
            entries: vec![entry],
            conf: ConfState::default(),
        }
    }
}

/// Identifies one `Ready`'s storage write; hand it back to `on_persisted` once durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteMark {
    log: PersistMark,
    hard_state: HardState,
}

/// The work of one loop turn. Fields are private; take them with the accessors.
#[derive(Debug, Default)]
pub struct Ready {
    hard_state: Option<HardState>,
    entries: Vec<Entry>,
    snapshot: Option<Snapshot>,
    messages: Vec<Message>,
    persisted_messages: Vec<Message>,
    committed_entries: Vec<Entry>,
    read_states: Vec<ReadState>,
    mark: WriteMark,
    /// The hard state of the previous `Ready`, to tell a commit-only change apart.
    prev_hard_state: HardState,
}

impl Ready {
    /// A storage write (or at least an ordering barrier) is needed.
    pub fn must_write(&self) -> bool {
        self.hard_state.is_some()
            || !self.entries.is_empty()
            || self.snapshot.is_some()
            || !self.persisted_messages.is_empty()
    }
    /// The write must be fsynced before `on_persisted`: it carries entries, a snapshot, a new
    /// term or vote, or messages that promise durability. A write whose only change is the
    /// commit index need not be synced (like etcd's `MustSync`): a lost commit index is
    /// learned again from the leader.
    pub fn must_sync(&self) -> bool {
        !self.entries.is_empty()
            || self.snapshot.is_some()
            || !self.persisted_messages.is_empty()
            || self.hard_state.is_some_and(|hs| {
                hs.term != self.prev_hard_state.term || hs.vote != self.prev_hard_state.vote
            })
    }
    pub fn hard_state(&self) -> Option<HardState> {
        self.hard_state
    }
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn take_entries(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.entries)
    }
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }
    pub fn take_snapshot(&mut self) -> Option<Snapshot> {
        self.snapshot.take()
    }
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.messages)
    }
    pub fn take_persisted_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.persisted_messages)
    }
    pub fn committed_entries(&self) -> &[Entry] {
        &self.committed_entries
    }
    pub fn take_committed_entries(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.committed_entries)
    }
    pub fn take_read_states(&mut self) -> Vec<ReadState> {
        std::mem::take(&mut self.read_states)
    }
    pub fn write_mark(&self) -> WriteMark {
        self.mark
    }
}

/// Why a message was dropped. Nothing from the network makes the core panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    WrongRecipient,
    Malformed(&'static str),
    StaleTerm,
    /// A vote request while this replica believes a leader is alive (CheckQuorum lease).
    InLease,
    /// Not meaningful in the current role (e.g. a vote response to a follower).
    Unexpected,
    UnknownPeer,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub dropped_wrong_recipient: u64,
    pub dropped_malformed: u64,
    pub dropped_stale_term: u64,
    pub dropped_in_lease: u64,
    pub dropped_unexpected: u64,
    pub dropped_unknown_peer: u64,
    pub malformed_conf_entries: u64,
    pub elections_started: u64,
    pub leader_step_downs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader hint {leader})")]
    NotLeader { leader: NodeId },
    #[error("leadership transfer to {to} in progress")]
    Transferring { to: NodeId },
    #[error("batch of {entries} entries is empty or above the limit {limit}")]
    BadBatch { entries: usize, limit: usize },
    #[error(
        "{uncommitted_bytes} uncommitted bytes plus {batch_bytes} exceeds the limit {limit_bytes}"
    )]
    TooManyUncommitted {
        uncommitted_bytes: u64,
        batch_bytes: u64,
        limit_bytes: u64,
    },
    #[error("a configuration change is still pending (index {pending_index}, applied {applied})")]
    ConfChangePending {
        pending_index: Index,
        applied: Index,
    },
    #[error("learner {id} is {behind} entries behind, more than {limit}")]
    LearnerBehind { id: NodeId, behind: u64, limit: u64 },
    #[error(transparent)]
    ConfChange(#[from] ConfChangeError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("not the leader (leader hint {leader})")]
    NotLeader { leader: NodeId },
    #[error("{pending} reads pending, limit {limit}")]
    TooMany { pending: usize, limit: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("not the leader (leader hint {leader})")]
    NotLeader { leader: NodeId },
    #[error("node {0} is not a voter")]
    NotVoter(NodeId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompactError {
    #[error("snapshot index {index} is beyond the applied index {applied}")]
    NotApplied { index: Index, applied: Index },
    #[error("snapshot index {index} is not above the current snapshot {snapshot_index}")]
    Stale { index: Index, snapshot_index: Index },
}

/// A read waiting for a heartbeat round acknowledged by a quorum.
#[derive(Clone, Copy, Debug)]
struct PendingRead {
    ctx: u64,
    index: Index,
    round: u64,
}

/// Snapshot chunks received so far.
#[derive(Debug)]
struct IncomingSnapshot {
    meta: SnapshotMeta,
    total_bytes: u64,
    buf: Vec<u8>,
}

/// A snapshot of the replica's state for observers (tests, the simulator, metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: Term,
    pub vote: NodeId,
    pub leader: NodeId,
    pub commit: Index,
    pub applied: Index,
    pub persisted: Index,
    pub last_index: Index,
    pub last_term: Term,
    pub snapshot_index: Index,
    pub conf: ConfState,
}

pub struct RawNode {
    cfg: Config,
    id: NodeId,
    term: Term,
    vote: NodeId,
    leader: NodeId,
    role: Role,
    log: RaftLog,
    /// The configuration in effect (the last applied configuration entry).
    conf: ConfState,
    /// (index at which it took effect, configuration) since the last snapshot, for snapshots.
    conf_history: Vec<(Index, ConfState)>,
    /// The latest snapshot, sent to followers that fell behind the first index.
    snapshot: Option<Snapshot>,
    rng: ChaCha8Rng,
    now_ticks: u64,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_ticks: u32,
    // Candidate.
    votes: BTreeMap<NodeId, bool>,
    // Follower.
    /// Highest index known to match the current leader's log (reset when the term changes).
    leader_match: Index,
    /// Highest index acked to the current leader.
    acked_index: Index,
    incoming_snapshot: Option<IncomingSnapshot>,
    // Leader.
    progress: BTreeMap<NodeId, Progress>,
    pending_conf_index: Index,
    uncommitted_bytes: u64,
    transferee: NodeId,
    transfer_elapsed: u32,
    /// A TimeoutNow went out in this term: its election ignores leases, so ours is void.
    lease_void: bool,
    round: u64,
    rounds: VecDeque<(u64, u64)>,
    pending_reads: VecDeque<PendingRead>,
    reads_waiting_commit: Vec<u64>,
    need_round: bool,
    need_bcast: bool,
    // Durability.
    durable_hs: HardState,
    last_hs: HardState,
    // Output.
    msgs: Vec<Message>,
    persisted_msgs: Vec<Message>,
    read_states: Vec<ReadState>,
    stats: Stats,
    scratch: Vec<Index>,
}

impl RawNode {
    /// Starts a replica from what its storage holds. `seed` drives every random choice.
    pub fn new(cfg: Config, storage: InitialState, seed: u64) -> Result<RawNode, ConfigError> {
        cfg.validate()?;
        let InitialState {
            hard_state,
            snapshot,
            entries,
            conf,
        } = storage;
        let (snapshot_index, snapshot_term, conf) = match &snapshot {
            Some(s) => (s.meta.index, s.meta.term, s.meta.conf.clone()),
            None => (0, 0, conf),
        };
        // Configuration entries after the snapshot take effect as they are applied again.
        let conf_history = vec![(snapshot_index, conf.clone())];
        let log = RaftLog::restore_from_storage(
            snapshot_index,
            snapshot_term,
            entries,
            hard_state.commit,
        );
        let id = cfg.id;
        let mut node = RawNode {
            id,
            term: hard_state.term,
            vote: hard_state.vote,
            leader: NODE_NONE,
            role: Role::Follower,
            log,
            conf,
            conf_history,
            snapshot,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now_ticks: 0,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_ticks: cfg.election_ticks,
            votes: BTreeMap::new(),
            leader_match: 0,
            acked_index: 0,
            incoming_snapshot: None,
            progress: BTreeMap::new(),
            pending_conf_index: 0,
            uncommitted_bytes: 0,
            transferee: NODE_NONE,
            transfer_elapsed: 0,
            lease_void: false,
            round: 0,
            rounds: VecDeque::new(),
            pending_reads: VecDeque::new(),
            reads_waiting_commit: Vec::new(),
            need_round: false,
            need_bcast: false,
            durable_hs: hard_state,
            last_hs: hard_state,
            msgs: Vec::new(),
            persisted_msgs: Vec::new(),
            read_states: Vec::new(),
            stats: Stats::default(),
            scratch: Vec::new(),
            cfg,
        };
        node.reset_randomized_election();
        node.check_invariants();
        Ok(node)
    }

    // ----- observers -------------------------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn leader(&self) -> NodeId {
        self.leader
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    pub fn conf(&self) -> &ConfState {
        &self.conf
    }
    pub fn status(&self) -> Status {
        Status {
            id: self.id,
            role: self.role,
            term: self.term,
            vote: self.vote,
            leader: self.leader,
            commit: self.log.committed,
            applied: self.log.applied,
            persisted: self.log.persisted(),
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
            snapshot_index: self.log.snapshot_index(),
            conf: self.conf.clone(),
        }
    }
    /// The entry at `index` if it is in the in-memory log (not compacted).
    pub fn log_entry(&self, index: Index) -> Option<&Entry> {
        self.log.entry(index)
    }
    pub fn log_term(&self, index: Index) -> Option<Term> {
        self.log.term(index)
    }
    /// The leader's view of a follower: (match index, state), for tests and metrics.
    pub fn progress_of(&self, id: NodeId) -> Option<(Index, ProgressState)> {
        self.progress.get(&id).map(|p| (p.match_index, p.state))
    }
    /// A leader that has committed an entry of its own term (reads and conf changes need it).
    pub fn committed_in_term(&self) -> bool {
        self.log.term(self.log.committed) == Some(self.term)
    }

    // ----- inputs ----------------------------------------------------------------------------

    pub fn tick(&mut self) {
        self.now_ticks += 1;
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => self.tick_election(),
        }
        self.check_invariants();
    }

    fn tick_election(&mut self) {
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        // A non-voter never campaigns, and its clock keeps running: resetting it would keep it
        // "in lease" of a leader long gone and make it refuse the votes a new leader needs.
        if self.election_elapsed >= self.randomized_election_ticks && self.conf.is_voter(self.id) {
            self.election_elapsed = 0;
            self.campaign(false);
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.transferee != NODE_NONE {
            self.transfer_elapsed += 1;
            if self.transfer_elapsed >= self.cfg.election_ticks {
                self.transferee = NODE_NONE;
                if !self.conf.is_voter(self.id) {
                    self.hand_off_leadership();
                }
            }
        }
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum {
                if !self.quorum_active() {
                    self.stats.leader_step_downs += 1;
                    self.become_follower(self.term, NODE_NONE);
                    return;
                }
                for pr in self.progress.values_mut() {
                    pr.recent_active = false;
                }
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.bcast_heartbeat();
        }
    }

    fn quorum_active(&self) -> bool {
        let active = self
            .conf
            .voters
            .iter()
            .filter(|&&v| v == self.id || self.progress.get(&v).is_some_and(|p| p.recent_active))
            .count();
        active >= self.conf.quorum()
    }

    /// Proposes a batch of commands. Returns the index range they were given.
    pub fn propose(&mut self, batch: &[Bytes]) -> Result<(Index, Index), ProposeError> {
        self.check_can_propose()?;
        if batch.is_empty() || batch.len() > self.cfg.max_batch_entries {
            return Err(ProposeError::BadBatch {
                entries: batch.len(),
                limit: self.cfg.max_batch_entries,
            });
        }
        let batch_bytes: u64 = batch
            .iter()
            .map(|d| ENTRY_HEADER_BYTES + d.len() as u64)
            .sum();
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes + batch_bytes > self.cfg.max_uncommitted_bytes
        {
            return Err(ProposeError::TooManyUncommitted {
                uncommitted_bytes: self.uncommitted_bytes,
                batch_bytes,
                limit_bytes: self.cfg.max_uncommitted_bytes,
            });
        }
        let first = self.log.last_index() + 1;
        let term = self.term;
        let last = self
            .log
            .append(batch.iter().enumerate().map(|(i, d)| Entry {
                index: first + i as u64,
                term,
                kind: EntryKind::Normal,
                data: d.clone(),
            }));
        self.uncommitted_bytes += batch_bytes;
        self.need_bcast = true;
        self.check_invariants();
        Ok((first, last))
    }

    fn check_can_propose(&self) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transferee != NODE_NONE {
            return Err(ProposeError::Transferring {
                to: self.transferee,
            });
        }
        Ok(())
    }

    /// Proposes a single-server membership change (see `membership.rs`). Returns its index.
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Index, ProposeError> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.log.applied {
            return Err(ProposeError::ConfChangePending {
                pending_index: self.pending_conf_index,
                applied: self.log.applied,
            });
        }
        let conf = apply_change(&self.conf, change)?;
        if let ConfChange::PromoteLearner(id) = change {
            let matched = self.progress.get(&id).map_or(0, |p| p.match_index);
            let behind = self.log.last_index().saturating_sub(matched);
            if behind > self.cfg.promote_lag_entries_max {
                return Err(ProposeError::LearnerBehind {
                    id,
                    behind,
                    limit: self.cfg.promote_lag_entries_max,
                });
            }
        }
        let index = self.log.last_index() + 1;
        self.log.append([Entry {
            index,
            term: self.term,
            kind: EntryKind::Conf,
            data: Bytes::from(encode_conf(&conf)),
        }]);
        self.pending_conf_index = index;
        self.need_bcast = true;
        Ok(index)
    }

    /// Registers a linearizable read. Its `ReadState` with the same `ctx` appears in a later
    /// `Ready` once it is safe; reads pending when leadership is lost are dropped (the caller
    /// retries on timeout).
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ReadError> {
        if self.role != Role::Leader {
            return Err(ReadError::NotLeader {
                leader: self.leader,
            });
        }
        let pending = self.pending_reads.len() + self.reads_waiting_commit.len();
        if pending >= self.cfg.max_pending_reads {
            return Err(ReadError::TooMany {
                pending,
                limit: self.cfg.max_pending_reads,
            });
        }
        if !self.committed_in_term() {
            // Section 6.4: until its no-op commits, the leader does not know the commit index.
            self.reads_waiting_commit.push(ctx);
            return Ok(());
        }
        self.register_read(ctx);
        Ok(())
    }

    fn register_read(&mut self, ctx: u64) {
        debug_assert!(
            self.committed_in_term(),
            "read registered before the term's first commit"
        );
        let index = self.log.committed;
        if self.conf.quorum() == 1 && self.conf.is_voter(self.id) {
            self.read_states.push(ReadState { ctx, index });
            return;
        }
        if self.cfg.read_mode == ReadMode::Lease && self.lease_valid() {
            self.read_states.push(ReadState { ctx, index });
            return;
        }
        self.pending_reads.push_back(PendingRead {
            ctx,
            index,
            round: self.round + 1,
        });
        self.need_round = true;
    }

    /// The round a quorum of voters has acknowledged (the leader acks its own rounds).
    fn quorum_round(&mut self) -> u64 {
        self.scratch.clear();
        for &v in &self.conf.voters {
            let r = if v == self.id {
                self.round
            } else {
                self.progress.get(&v).map_or(0, |p| p.acked_round)
            };
            self.scratch.push(r);
        }
        if self.scratch.is_empty() {
            return 0;
        }
        self.scratch.sort_unstable_by(|a, b| b.cmp(a));
        self.scratch[self.conf.quorum() - 1]
    }

    /// Leader lease: a quorum acknowledged a heartbeat sent at tick s, so none of them grants a
    /// (non-transfer) vote before s + election_ticks on its own clock; with clock drift bounded
    /// by `lease_drift_ticks`, no other leader exists before s + election_ticks - drift.
    fn lease_valid(&mut self) -> bool {
        if !self.cfg.check_quorum || self.lease_void || self.transferee != NODE_NONE {
            return false;
        }
        let q = self.quorum_round();
        let Some(&(_, sent_tick)) = self.rounds.iter().find(|(r, _)| *r == q) else {
            return false;
        };
        let lease_ticks = (self.cfg.election_ticks - self.cfg.lease_drift_ticks) as u64;
        self.now_ticks < sent_tick + lease_ticks
    }

    /// Starts handing leadership to `to` (TimeoutNow once it has caught up). Proposals are
    /// refused until it completes or `election_ticks` pass.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader: self.leader,
            });
        }
        if to == self.id {
            return Ok(());
        }
        if !self.conf.is_voter(to) {
            return Err(TransferError::NotVoter(to));
        }
        if self.transferee == to {
            return Ok(());
        }
        self.transferee = to;
        self.transfer_elapsed = 0;
        let caught_up = self
            .progress
            .get(&to)
            .is_some_and(|p| p.match_index == self.log.last_index());
        if caught_up {
            self.send_timeout_now(to);
        } else {
            self.send_append(to, true);
        }
        Ok(())
    }

    fn send_timeout_now(&mut self, to: NodeId) {
        self.lease_void = true;
        self.send(to, MessageBody::TimeoutNow);
    }

    /// The service took a snapshot of its state at `index` (it must have applied it and made the
    /// snapshot durable). The log before it is dropped; lagging followers get this snapshot.
    pub fn compact(&mut self, index: Index, data: Bytes) -> Result<(), CompactError> {
        if index > self.log.applied || index > self.log.persisted() {
            return Err(CompactError::NotApplied {
                index,
                applied: self.log.applied.min(self.log.persisted()),
            });
        }
        if index <= self.log.snapshot_index() {
            return Err(CompactError::Stale {
                index,
                snapshot_index: self.log.snapshot_index(),
            });
        }
        let Some(term) = self.log.term(index) else {
            unreachable!(
                "index {index} is above the snapshot and at most applied, so it is in the log"
            )
        };
        let conf = self.conf_at(index);
        self.snapshot = Some(Snapshot {
            meta: SnapshotMeta { index, term, conf },
            data,
        });
        self.log.compact(index);
        // Keep the last configuration at or below the snapshot and everything after it.
        let keep_from = self
            .conf_history
            .iter()
            .rposition(|(i, _)| *i <= index)
            .unwrap_or(0);
        self.conf_history.drain(..keep_from);
        self.check_invariants();
        Ok(())
    }

    fn conf_at(&self, index: Index) -> ConfState {
        self.conf_history
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or_else(|| self.conf.clone(), |(_, c)| c.clone())
    }

    /// The latest snapshot this replica holds (from `compact` or from the leader).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    // ----- Ready -----------------------------------------------------------------------------

    pub fn has_ready(&self) -> bool {
        !self.msgs.is_empty()
            || !self.persisted_msgs.is_empty()
            || !self.read_states.is_empty()
            || self.need_bcast
            || self.need_round
            || self.log.has_unstable()
            || self.hard_state() != self.last_hs
            || self.log.applied < self.log.committed.min(self.log.persisted())
    }

    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    pub fn ready(&mut self) -> Ready {
        if self.role == Role::Leader {
            if self.need_round {
                self.bcast_heartbeat();
            }
            if self.need_bcast {
                self.need_bcast = false;
                // Walk the followers in id order without allocating: a group has at most a
                // handful, and `send_append` needs `&mut self`.
                let mut next = self.progress.keys().next().copied();
                while let Some(id) = next {
                    self.send_append(id, false);
                    next = self.progress.range(id + 1..).next().map(|(&k, _)| k);
                }
            }
        }
        self.need_bcast = false;
        self.need_round = false;
        let mut rd = Ready::default();
        let hs = self.hard_state();
        rd.prev_hard_state = self.last_hs;
        if hs != self.last_hs {
            rd.hard_state = Some(hs);
            self.last_hs = hs;
        }
        let (snapshot, log_mark) = self.log.take_unstable(&mut rd.entries);
        rd.snapshot = snapshot;
        self.log
            .next_to_apply(APPLY_BYTES_PER_READY_MAX, &mut rd.committed_entries);
        for i in 0..rd.committed_entries.len() {
            if rd.committed_entries[i].kind == EntryKind::Conf {
                let (index, data) = (
                    rd.committed_entries[i].index,
                    rd.committed_entries[i].data.clone(),
                );
                self.apply_conf(index, &data);
            }
        }
        rd.messages = std::mem::take(&mut self.msgs);
        rd.persisted_messages = std::mem::take(&mut self.persisted_msgs);
        rd.read_states = std::mem::take(&mut self.read_states);
        rd.mark = WriteMark {
            log: log_mark,
            hard_state: hs,
        };
        self.check_invariants();
        rd
    }

    /// The write of a `Ready` is durable.
    pub fn on_persisted(&mut self, mark: WriteMark) {
        // Writes complete in order, so the latest mark carries the latest durable hard state.
        if mark.hard_state.term >= self.durable_hs.term {
            self.durable_hs = mark.hard_state;
        }
        if self.log.stable_to(mark.log) {
            match self.role {
                Role::Leader => {
                    let moved = self.maybe_commit();
                    self.need_bcast |= moved;
                }
                Role::Follower => self.maybe_ack(false),
                _ => {}
            }
        }
        if self.role == Role::Candidate {
            self.poll();
        }
        self.check_invariants();
    }

    fn apply_conf(&mut self, index: Index, data: &[u8]) {
        let Some(conf) = decode_conf(data) else {
            self.stats.malformed_conf_entries += 1;
            return;
        };
        self.conf = conf.clone();
        self.conf_history.push((index, conf));
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        let inflight_max = self.cfg.max_inflight_msgs;
        let members: Vec<NodeId> = self.conf.members().filter(|&m| m != self.id).collect();
        self.progress.retain(|id, _| members.contains(id));
        for m in members {
            let is_learner = self.conf.is_learner(m);
            let pr = self.progress.entry(m).or_insert_with(|| {
                let mut p = Progress::new(last + 1, inflight_max, is_learner);
                p.recent_active = true;
                p
            });
            pr.is_learner = is_learner;
        }
        if self.transferee != NODE_NONE && !self.conf.is_voter(self.transferee) {
            self.transferee = NODE_NONE;
        }
        self.maybe_commit();
        self.need_bcast = true;
        if !self.conf.is_voter(self.id) {
            self.hand_off_leadership();
        }
    }

    /// This leader applied its own removal. Stepping down at once could strand the group: the
    /// remaining voters may not know yet that the removal committed (so they still count us),
    /// and our log may be longer than theirs (so we would refuse them our vote). Instead we keep
    /// leading without counting ourselves, take no proposals, keep replicating (which carries
    /// the commit index), and hand over to the most caught-up voter with TimeoutNow.
    fn hand_off_leadership(&mut self) {
        let Some((&to, _)) = self
            .progress
            .iter()
            .filter(|(id, _)| self.conf.is_voter(**id))
            .max_by_key(|(id, p)| (p.match_index, std::cmp::Reverse(**id)))
        else {
            return;
        };
        self.transferee = to;
        self.transfer_elapsed = 0;
        let caught_up = self
            .progress
            .get(&to)
            .is_some_and(|p| p.match_index == self.log.last_index());
        if caught_up {
            self.send_timeout_now(to);
        } else {
            self.send_append(to, true);
        }
    }

    // ----- step ------------------------------------------------------------------------------

    /// Feeds one message from the network. Malformed, misaddressed or stale messages are
    /// dropped, counted, and reported in the `Err`; they never panic the node, and they change
    /// nothing beyond what any message of that term would (a newer term is still adopted, and
    /// a stale leader is told about it).
    pub fn step(&mut self, m: Message) -> Result<(), Dropped> {
        let result = self.step_inner(m);
        if let Err(d) = result {
            match d {
                Dropped::WrongRecipient => self.stats.dropped_wrong_recipient += 1,
                Dropped::Malformed(_) => self.stats.dropped_malformed += 1,
                Dropped::StaleTerm => self.stats.dropped_stale_term += 1,
                Dropped::InLease => self.stats.dropped_in_lease += 1,
                Dropped::Unexpected => self.stats.dropped_unexpected += 1,
                Dropped::UnknownPeer => self.stats.dropped_unknown_peer += 1,
            }
        }
        self.check_invariants();
        result
    }

    fn validate(&self, m: &Message) -> Result<(), Dropped> {
        if m.to != self.id {
            return Err(Dropped::WrongRecipient);
        }
        if m.from == NODE_NONE || m.from == self.id {
            return Err(Dropped::Malformed("bad sender"));
        }
        if m.term >= NUMBER_MAX {
            return Err(Dropped::Malformed("term out of range"));
        }
        match &m.body {
            MessageBody::PreVote {
                last_term,
                last_index,
            }
            | MessageBody::Vote {
                last_term,
                last_index,
                ..
            } if *last_term > m.term || *last_index >= NUMBER_MAX => {
                return Err(Dropped::Malformed("vote request log position"));
            }
            MessageBody::AppendResp { index, reject } => {
                let hint_bad = reject.is_some_and(|h| {
                    h.rejected_index >= NUMBER_MAX
                        || h.conflict_index >= NUMBER_MAX
                        || h.conflict_term > m.term
                });
                if *index >= NUMBER_MAX || hint_bad {
                    return Err(Dropped::Malformed("append response index"));
                }
            }
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                if *prev_term > m.term
                    || *prev_index >= NUMBER_MAX
                    || *commit >= NUMBER_MAX
                    || entries.len() > ENTRIES_PER_MSG_ACCEPT_MAX
                {
                    return Err(Dropped::Malformed("append header"));
                }
                let mut min_term = *prev_term;
                for (e, expect_index) in entries.iter().zip(prev_index + 1..) {
                    if e.index != expect_index || e.term < min_term || e.term > m.term {
                        return Err(Dropped::Malformed("append entries out of order"));
                    }
                    if e.kind == EntryKind::Conf && decode_conf(&e.data).is_none() {
                        return Err(Dropped::Malformed("bad configuration entry"));
                    }
                    min_term = e.term;
                }
            }
            MessageBody::Snapshot {
                meta,
                offset,
                total_bytes,
                data,
            } => {
                let end = offset
                    .checked_add(data.len() as u64)
                    .ok_or(Dropped::Malformed("snapshot offset"))?;
                if meta.index == 0
                    || meta.index >= NUMBER_MAX
                    || meta.term > m.term
                    || meta.term == 0
                    || end > *total_bytes
                    || *total_bytes > self.cfg.snapshot_size_bytes_max
                    || meta.conf.voters.is_empty()
                    || meta.conf.members().any(|id| id == NODE_NONE)
                    || meta.conf.voters.len() + meta.conf.learners.len()
                        > super::membership::MEMBERS_MAX
                {
                    return Err(Dropped::Malformed("snapshot chunk"));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn in_lease(&self) -> bool {
        self.cfg.check_quorum
            && ((self.leader != NODE_NONE && self.election_elapsed < self.cfg.election_ticks)
                || self.now_ticks < self.cfg.election_ticks as u64)
    }

    fn step_inner(&mut self, m: Message) -> Result<(), Dropped> {
        self.validate(&m)?;
        if m.term > self.term {
            match &m.body {
                MessageBody::PreVote { .. }
                | MessageBody::Vote {
                    transfer: false, ..
                } if self.in_lease() => {
                    // A partitioned node rejoining must not depose a leader we still hear.
                    return Err(Dropped::InLease);
                }
                MessageBody::PreVote { .. } => {}
                MessageBody::PreVoteResp { reject: false } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. } => {
                    self.become_follower(m.term, m.from);
                }
                _ => self.become_follower(m.term, NODE_NONE),
            }
        } else if m.term < self.term {
            match &m.body {
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. } => {
                    // Tell a stale leader about the newer term so it steps down.
                    self.send(
                        m.from,
                        MessageBody::AppendResp {
                            index: 0,
                            reject: None,
                        },
                    );
                }
                MessageBody::PreVote { .. } => {
                    self.send(m.from, MessageBody::PreVoteResp { reject: true });
                }
                _ => {}
            }
            return Err(Dropped::StaleTerm);
        }
        match m.body {
            MessageBody::PreVote {
                last_index,
                last_term,
            } => {
                self.handle_vote_request(m.from, m.term, last_index, last_term, true);
                Ok(())
            }
            MessageBody::Vote {
                last_index,
                last_term,
                ..
            } => {
                self.handle_vote_request(m.from, m.term, last_index, last_term, false);
                Ok(())
            }
            _ => match self.role {
                Role::Leader => self.step_leader(m),
                Role::PreCandidate | Role::Candidate => self.step_candidate(m),
                Role::Follower => self.step_follower(m),
            },
        }
    }

    fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: Term,
        last_index: Index,
        last_term: Term,
        pre: bool,
    ) {
        let can_vote = self.vote == from
            || (self.vote == NODE_NONE && self.leader == NODE_NONE)
            || (pre && term > self.term);
        let grant = can_vote && self.log.is_up_to_date(last_index, last_term);
        if pre {
            let reply_term = if grant { term } else { self.term };
            self.msgs.push(Message {
                from: self.id,
                to: from,
                term: reply_term,
                body: MessageBody::PreVoteResp { reject: !grant },
            });
            return;
        }
        if grant {
            self.vote = from;
            self.election_elapsed = 0;
            // The vote must be durable before it leaves.
            self.persisted_msgs.push(Message {
                from: self.id,
                to: from,
                term: self.term,
                body: MessageBody::VoteResp { reject: false },
            });
        } else {
            self.send(from, MessageBody::VoteResp { reject: true });
        }
    }

    fn step_follower(&mut self, m: Message) -> Result<(), Dropped> {
        match m.body {
            MessageBody::Append {
                prev_index,
                prev_term,
                commit,
                entries,
            } => {
                self.accept_leader(m.from);
                self.handle_append(prev_index, prev_term, commit, &entries)
            }
            MessageBody::Heartbeat { commit, round } => {
                self.accept_leader(m.from);
                // The leader sends min(commit, our acked match): entries we acked in this term
                // are durable and only this leader could overwrite them, which it never does. So
                // they still match, even across our crash (that reset leader_match).
                let matched = commit.min(self.log.last_index());
                self.leader_match = self.leader_match.max(matched);
                self.log.commit_to(matched);
                self.send(m.from, MessageBody::HeartbeatResp { round });
                Ok(())
            }
            MessageBody::Snapshot {
                meta,
                offset,
                total_bytes,
                data,
            } => {
                self.accept_leader(m.from);
                self.handle_snapshot_chunk(meta, offset, total_bytes, data);
                Ok(())
            }
            MessageBody::TimeoutNow => {
                if self.conf.is_voter(self.id) {
                    self.campaign(true);
                    Ok(())
                } else {
                    Err(Dropped::Unexpected)
                }
            }
            _ => Err(Dropped::Unexpected),
        }
    }

    fn accept_leader(&mut self, from: NodeId) {
        self.election_elapsed = 0;
        if self.leader != from {
            self.leader = from;
        }
    }

    fn step_candidate(&mut self, m: Message) -> Result<(), Dropped> {
        match m.body {
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. } => {
                // A leader of our term (or newer) exists.
                self.become_follower(m.term, m.from);
                self.step_follower(m)
            }
            MessageBody::PreVoteResp { reject } if self.role == Role::PreCandidate => {
                if !self.conf.is_voter(m.from) {
                    return Err(Dropped::UnknownPeer);
                }
                self.votes.insert(m.from, !reject);
                self.poll();
                Ok(())
            }
            MessageBody::VoteResp { reject } if self.role == Role::Candidate => {
                if !self.conf.is_voter(m.from) {
                    return Err(Dropped::UnknownPeer);
                }
                self.votes.insert(m.from, !reject);
                self.poll();
                Ok(())
            }
            _ => Err(Dropped::Unexpected),
        }
    }

    fn step_leader(&mut self, m: Message) -> Result<(), Dropped> {
        if matches!(
            m.body,
            MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. }
        ) {
            // Two leaders in one term is impossible unless the sender is broken.
            return Err(Dropped::Malformed(
                "leader traffic in the leader's own term",
            ));
        }
        let Some(pr) = self.progress.get_mut(&m.from) else {
            return Err(Dropped::UnknownPeer);
        };
        pr.recent_active = true;
        match m.body {
            MessageBody::AppendResp {
                reject: Some(hint), ..
            } => {
                if hint.rejected_index > self.log.last_index() {
                    // We never sent a prev_index beyond our log, which only grows.
                    return Err(Dropped::Malformed("reject of an index we never sent"));
                }
                let next = if hint.conflict_term > 0 {
                    let idx = self
                        .log
                        .last_index_of_term_le(hint.conflict_term, hint.rejected_index);
                    if self.log.term(idx) == Some(hint.conflict_term) {
                        idx + 1
                    } else {
                        hint.conflict_index
                    }
                } else {
                    hint.conflict_index
                };
                let next = next.clamp(1, self.log.last_index() + 1);
                let pr = self.progress.get_mut(&m.from).ok_or(Dropped::UnknownPeer)?;
                if pr.maybe_decr_to(hint.rejected_index, next) {
                    self.send_append(m.from, true);
                }
                Ok(())
            }
            MessageBody::AppendResp {
                index,
                reject: None,
            } => {
                if index > self.log.last_index() {
                    return Err(Dropped::Malformed("ack beyond the leader's log"));
                }
                let pr = self.progress.get_mut(&m.from).ok_or(Dropped::UnknownPeer)?;
                let updated = pr.maybe_update(index);
                match pr.state {
                    ProgressState::Probe if pr.match_index + 1 >= pr.next_index => {
                        pr.become_replicate()
                    }
                    ProgressState::Snapshot if pr.match_index >= pr.snapshot_index => {
                        pr.become_replicate()
                    }
                    _ => {}
                }
                if updated && self.maybe_commit() {
                    self.need_bcast = true;
                }
                let caught_up = self
                    .progress
                    .get(&m.from)
                    .is_some_and(|p| p.match_index == self.log.last_index());
                if self.transferee == m.from && caught_up {
                    self.send_timeout_now(m.from);
                }
                self.send_append(m.from, false);
                Ok(())
            }
            MessageBody::HeartbeatResp { round } => {
                let last = self.log.last_index();
                let pr = self.progress.get_mut(&m.from).ok_or(Dropped::UnknownPeer)?;
                if round > self.round {
                    return Err(Dropped::Malformed("heartbeat round from the future"));
                }
                pr.acked_round = pr.acked_round.max(round);
                let behind = pr.match_index < last;
                // Stalled: this heartbeat left a full heartbeat interval after our last append
                // to this follower and came back, yet the follower is still behind: that append
                // or its ack is presumed lost. (Only slow? Then the resend is a duplicate.)
                let hb_sent_tick = self
                    .rounds
                    .iter()
                    .find(|(r, _)| *r == round)
                    .map(|&(_, t)| t);
                let stalled = behind
                    && hb_sent_tick
                        .is_some_and(|t| t >= pr.append_tick + self.cfg.heartbeat_ticks as u64);
                match pr.state {
                    ProgressState::Probe => {
                        if stalled {
                            pr.probe_sent = false;
                        }
                    }
                    ProgressState::Replicate => {
                        if stalled {
                            // No ack for a whole heartbeat interval while behind: the appends in
                            // flight (or their acks) are presumed lost; resend from the match
                            // point. Messages that were only slow are harmless duplicates.
                            pr.become_probe();
                        }
                    }
                    ProgressState::Snapshot => {
                        pr.snapshot_chunk_sent = false;
                        // Still no ack for a fully sent snapshot: the follower may have crashed
                        // before making it durable. Start over; a follower that has it answers
                        // the first chunk with an ack.
                        if pr.snapshot_offset > 0 && behind {
                            if let Some(s) = &self.snapshot {
                                if pr.snapshot_offset >= s.data.len() as u64 {
                                    pr.snapshot_offset = 0;
                                }
                            }
                        }
                    }
                }
                let probing = pr.state == ProgressState::Probe;
                if pr.state == ProgressState::Snapshot {
                    self.send_snapshot_chunk(m.from);
                } else if behind && probing {
                    self.send_append(m.from, true);
                }
                self.advance_reads();
                Ok(())
            }
            MessageBody::SnapshotResp {
                snapshot_index,
                next_offset,
            } => {
                if pr.state == ProgressState::Snapshot && pr.snapshot_index == snapshot_index {
                    pr.snapshot_offset = next_offset;
                    pr.snapshot_chunk_sent = false;
                    self.send_snapshot_chunk(m.from);
                }
                Ok(())
            }
            _ => Err(Dropped::Unexpected),
        }
    }

    fn handle_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        commit: Index,
        entries: &[Entry],
    ) -> Result<(), Dropped> {
        let committed = self.log.committed;
        // Our committed prefix matches every leader's log (leader completeness).
        self.leader_match = self.leader_match.max(committed);
        let (prev_index, prev_term, entries) = if prev_index < committed {
            let skip = (committed - prev_index) as usize;
            let Some(term) = self.log.term(committed) else {
                unreachable!("the committed index {committed} is at or above the snapshot")
            };
            (committed, term, entries.get(skip..).unwrap_or(&[]))
        } else {
            (prev_index, prev_term, entries)
        };
        if !self.log.match_term(prev_index, prev_term) {
            let hint = match self.log.term(prev_index) {
                None => RejectHint {
                    rejected_index: prev_index,
                    conflict_term: 0,
                    conflict_index: self.log.last_index() + 1,
                },
                Some(t) => RejectHint {
                    rejected_index: prev_index,
                    conflict_term: t,
                    conflict_index: self.log.first_index_of_term(t, prev_index),
                },
            };
            self.send(
                self.leader,
                MessageBody::AppendResp {
                    index: 0,
                    reject: Some(hint),
                },
            );
            return Ok(());
        }
        // This leader's log only grows, so nothing it sends can conflict with what it already
        // matched with us; a message that does is broken and would make us cut acked entries.
        let contradicts = entries
            .iter()
            .take_while(|e| e.index <= self.leader_match)
            .any(|e| !self.log.match_term(e.index, e.term));
        if contradicts {
            return Err(Dropped::Malformed(
                "append contradicts entries the leader already matched",
            ));
        }
        let last_new = self.log.append_after_match(prev_index, entries);
        self.leader_match = self.leader_match.max(last_new);
        self.log.commit_to(commit.min(self.leader_match));
        // Ack now if all of it is durable already (a retransmission); otherwise on_persisted
        // does, once it is. A partial ack now would only make the leader resend the rest.
        if self.log.persisted().min(self.leader_match) >= last_new {
            self.maybe_ack(true);
        }
        Ok(())
    }

    /// Acks the durable prefix that matches the leader, when it grew (or when `force`).
    fn maybe_ack(&mut self, force: bool) {
        if self.leader == NODE_NONE || self.role != Role::Follower {
            return;
        }
        let index = self.log.persisted().min(self.leader_match);
        if index > self.acked_index || force {
            self.acked_index = self.acked_index.max(index);
            self.send(
                self.leader,
                MessageBody::AppendResp {
                    index,
                    reject: None,
                },
            );
        }
    }

    fn handle_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        total_bytes: u64,
        data: Bytes,
    ) {
        let from = self.leader;
        if meta.index <= self.log.committed {
            // Nothing to install; tell the leader where we are.
            self.send(
                from,
                MessageBody::SnapshotResp {
                    snapshot_index: meta.index,
                    next_offset: total_bytes,
                },
            );
            self.leader_match = self.leader_match.max(self.log.committed);
            self.maybe_ack(true);
            return;
        }
        let same = self
            .incoming_snapshot
            .as_ref()
            .is_some_and(|s| s.meta == meta && s.total_bytes == total_bytes);
        if !same {
            if offset != 0 {
                self.send(
                    from,
                    MessageBody::SnapshotResp {
                        snapshot_index: meta.index,
                        next_offset: 0,
                    },
                );
                return;
            }
            self.incoming_snapshot = Some(IncomingSnapshot {
                meta: meta.clone(),
                total_bytes,
                buf: Vec::new(),
            });
        }
        let Some(inc) = self.incoming_snapshot.as_mut() else {
            unreachable!("set above")
        };
        if offset != inc.buf.len() as u64 {
            let next_offset = inc.buf.len() as u64;
            self.send(
                from,
                MessageBody::SnapshotResp {
                    snapshot_index: meta.index,
                    next_offset,
                },
            );
            return;
        }
        inc.buf.extend_from_slice(&data);
        if (inc.buf.len() as u64) < inc.total_bytes {
            let next_offset = inc.buf.len() as u64;
            self.send(
                from,
                MessageBody::SnapshotResp {
                    snapshot_index: meta.index,
                    next_offset,
                },
            );
            return;
        }
        let Some(inc) = self.incoming_snapshot.take() else {
            unreachable!("checked above")
        };
        self.send(
            from,
            MessageBody::SnapshotResp {
                snapshot_index: meta.index,
                next_offset: total_bytes,
            },
        );
        if self.log.match_term(meta.index, meta.term) {
            // We have the entry the snapshot ends at: our log already contains its prefix.
            self.leader_match = self.leader_match.max(meta.index);
            self.log.commit_to(meta.index);
            self.maybe_ack(true);
            return;
        }
        let mut snap_meta = inc.meta;
        snap_meta.conf = ConfState::new(snap_meta.conf.voters, snap_meta.conf.learners);
        let snapshot = Snapshot {
            meta: snap_meta,
            data: Bytes::from(inc.buf),
        };
        self.conf = snapshot.meta.conf.clone();
        self.conf_history = vec![(snapshot.meta.index, snapshot.meta.conf.clone())];
        self.log.restore_snapshot(snapshot.clone());
        self.snapshot = Some(snapshot);
        self.leader_match = meta.index;
        // The ack follows once the snapshot write is durable (on_persisted).
    }

    // ----- leader sending --------------------------------------------------------------------

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.msgs.push(Message {
            from: self.id,
            to,
            term: self.term,
            body,
        });
    }

    /// Sends what `to` is missing, as many messages as its state allows. With `allow_empty`, an
    /// empty AppendEntries goes out when there is nothing new (to probe or carry the commit).
    fn send_append(&mut self, to: NodeId, allow_empty: bool) {
        let mut allow_empty = allow_empty;
        loop {
            let last = self.log.last_index();
            let Some(pr) = self.progress.get(&to) else {
                return;
            };
            if pr.is_paused() {
                return;
            }
            debug_assert!(
                pr.next_index >= 1 && pr.next_index <= last + 1,
                "next index out of the log"
            );
            let next = pr.next_index.clamp(1, last + 1);
            if next > last && !allow_empty {
                return;
            }
            let prev_index = next - 1;
            let Some(prev_term) = self.log.term(prev_index) else {
                self.start_snapshot(to);
                return;
            };
            let mut entries = Vec::new();
            if next <= last {
                self.log.slice(
                    next,
                    last,
                    self.cfg.max_entries_per_msg,
                    self.cfg.max_bytes_per_msg,
                    &mut entries,
                );
            }
            let last_sent = entries.last().map(|e| e.index);
            let commit = self.log.committed;
            let Some(pr) = self.progress.get_mut(&to) else {
                return;
            };
            pr.sent_append(last_sent);
            pr.append_tick = self.now_ticks;
            let probing = pr.state == ProgressState::Probe;
            self.msgs.push(Message {
                from: self.id,
                to,
                term: self.term,
                body: MessageBody::Append {
                    prev_index,
                    prev_term,
                    commit,
                    entries,
                },
            });
            allow_empty = false;
            if probing || last_sent.is_none() {
                return;
            }
        }
    }

    fn start_snapshot(&mut self, to: NodeId) {
        let Some(snapshot_index) = self.snapshot.as_ref().map(|s| s.meta.index) else {
            unreachable!("entries below the first index were compacted, so a snapshot exists")
        };
        if let Some(pr) = self.progress.get_mut(&to) {
            pr.become_snapshot(snapshot_index);
        }
        self.send_snapshot_chunk(to);
    }

    fn send_snapshot_chunk(&mut self, to: NodeId) {
        let Some(snapshot) = self.snapshot.as_ref() else {
            return;
        };
        let Some(pr) = self.progress.get_mut(&to) else {
            return;
        };
        if pr.state != ProgressState::Snapshot || pr.snapshot_chunk_sent {
            return;
        }
        if pr.snapshot_index != snapshot.meta.index {
            // We compacted again meanwhile: start over with the newer snapshot.
            pr.snapshot_index = snapshot.meta.index;
            pr.snapshot_offset = 0;
        }
        let total = snapshot.data.len() as u64;
        if pr.snapshot_offset > total {
            pr.snapshot_offset = 0;
        }
        if pr.snapshot_offset == total && total > 0 {
            return; // everything sent; waiting for the follower's ack
        }
        let start = pr.snapshot_offset as usize;
        let end = (pr.snapshot_offset + self.cfg.snapshot_chunk_bytes).min(total) as usize;
        pr.snapshot_chunk_sent = true;
        let body = MessageBody::Snapshot {
            meta: snapshot.meta.clone(),
            offset: start as u64,
            total_bytes: total,
            data: snapshot.data.slice(start..end),
        };
        self.send(to, body);
    }

    fn bcast_heartbeat(&mut self) {
        self.round += 1;
        self.rounds.push_back((self.round, self.now_ticks));
        while self.rounds.len() > ROUNDS_MAX {
            self.rounds.pop_front();
        }
        self.need_round = false;
        let committed = self.log.committed;
        for (&id, pr) in &self.progress {
            let commit = committed.min(pr.match_index);
            self.msgs.push(Message {
                from: self.id,
                to: id,
                term: self.term,
                body: MessageBody::Heartbeat {
                    commit,
                    round: self.round,
                },
            });
        }
        // A single voter confirms its own rounds.
        self.advance_reads();
    }

    fn advance_reads(&mut self) {
        if self.pending_reads.is_empty() {
            return;
        }
        let q = self.quorum_round();
        while let Some(r) = self.pending_reads.front() {
            if r.round > q {
                break;
            }
            self.read_states.push(ReadState {
                ctx: r.ctx,
                index: r.index,
            });
            self.pending_reads.pop_front();
        }
    }

    /// Commits the highest index of the current term held durably by a quorum of voters
    /// (the leader's own copy counts only once durable). Returns true when commit moved.
    fn maybe_commit(&mut self) -> bool {
        self.scratch.clear();
        for &v in &self.conf.voters {
            let m = if v == self.id {
                self.log.persisted()
            } else {
                self.progress.get(&v).map_or(0, |p| p.match_index)
            };
            self.scratch.push(m);
        }
        if self.scratch.is_empty() {
            return false;
        }
        self.scratch.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = self.scratch[self.conf.quorum() - 1];
        // Figure 8: only an entry of the current term is committed by counting replicas.
        if candidate <= self.log.committed || self.log.term(candidate) != Some(self.term) {
            return false;
        }
        let was_committed_in_term = self.committed_in_term();
        let old = self.log.committed;
        self.log.commit_to(candidate);
        let mut freed = 0u64;
        for i in old + 1..=candidate {
            if let Some(e) = self.log.entry(i) {
                if e.term == self.term && e.kind == EntryKind::Normal {
                    freed += e.size_bytes();
                }
            }
        }
        self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(freed);
        if !was_committed_in_term {
            for ctx in std::mem::take(&mut self.reads_waiting_commit) {
                self.register_read(ctx);
            }
        }
        true
    }

    // ----- role changes ----------------------------------------------------------------------

    fn reset_randomized_election(&mut self) {
        let e = self.cfg.election_ticks;
        self.randomized_election_ticks = self.rng.gen_range(e..2 * e);
    }

    fn reset_common(&mut self, term: Term) {
        if term != self.term {
            self.term = term;
            self.vote = NODE_NONE;
            self.leader_match = 0;
            self.acked_index = 0;
            self.incoming_snapshot = None;
            self.lease_void = false;
        }
        self.leader = NODE_NONE;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election();
        self.votes.clear();
        self.progress.clear();
        self.transferee = NODE_NONE;
        self.pending_reads.clear();
        self.reads_waiting_commit.clear();
        self.need_round = false;
        self.need_bcast = false;
        self.uncommitted_bytes = 0;
    }

    fn become_follower(&mut self, term: Term, leader: NodeId) {
        assert!(
            term >= self.term,
            "term going back: {} -> {}",
            self.term,
            term
        );
        self.reset_common(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn campaign(&mut self, transfer: bool) {
        self.stats.elections_started += 1;
        if self.cfg.pre_vote && !transfer {
            self.become_pre_candidate();
        } else {
            self.become_candidate(transfer);
        }
    }

    fn become_pre_candidate(&mut self) {
        assert!(
            self.role != Role::Leader,
            "invalid transition [leader -> pre-candidate]"
        );
        // Like reset_common, but the term and vote do not change: PreVote raises no term.
        self.role = Role::PreCandidate;
        self.leader = NODE_NONE;
        self.votes.clear();
        self.election_elapsed = 0;
        self.reset_randomized_election();
        self.votes.insert(self.id, true);
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for v in self.conf.voters.clone() {
            if v != self.id {
                self.msgs.push(Message {
                    from: self.id,
                    to: v,
                    term: self.term + 1,
                    body: MessageBody::PreVote {
                        last_index,
                        last_term,
                    },
                });
            }
        }
        self.poll();
    }

    fn become_candidate(&mut self, transfer: bool) {
        assert!(
            self.role != Role::Leader,
            "invalid transition [leader -> candidate]"
        );
        self.reset_common(self.term + 1);
        self.role = Role::Candidate;
        self.vote = self.id;
        self.votes.insert(self.id, true);
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for v in self.conf.voters.clone() {
            if v != self.id {
                // Sent only once term and vote are durable.
                self.persisted_msgs.push(Message {
                    from: self.id,
                    to: v,
                    term: self.term,
                    body: MessageBody::Vote {
                        last_index,
                        last_term,
                        transfer,
                    },
                });
            }
        }
        self.poll();
    }

    /// Counts votes. A candidate's own vote counts only once its term and vote are durable.
    fn poll(&mut self) {
        let self_durable = self.role == Role::PreCandidate
            || (self.durable_hs.term == self.term && self.durable_hs.vote == self.id);
        let mut granted = 0;
        let mut rejected = 0;
        for &v in &self.conf.voters {
            match self.votes.get(&v) {
                Some(true) if v != self.id || self_durable => granted += 1,
                Some(false) => rejected += 1,
                _ => {}
            }
        }
        let quorum = self.conf.quorum();
        if granted >= quorum {
            match self.role {
                Role::PreCandidate => self.become_candidate(false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
        } else if self.conf.voters.len() - rejected < quorum {
            self.become_follower(self.term, NODE_NONE);
        }
    }

    fn become_leader(&mut self) {
        assert!(
            self.role == Role::Candidate,
            "invalid transition [{:?} -> leader]",
            self.role
        );
        let term = self.term;
        self.reset_common(term);
        self.role = Role::Leader;
        self.leader = self.id;
        let last = self.log.last_index();
        for m in self.conf.members().collect::<Vec<_>>() {
            if m != self.id {
                let mut pr = Progress::new(
                    last + 1,
                    self.cfg.max_inflight_msgs,
                    self.conf.is_learner(m),
                );
                // Everyone gets one election timeout to answer before CheckQuorum judges.
                pr.recent_active = true;
                self.progress.insert(m, pr);
            }
        }
        let noop_index = last + 1;
        self.log.append([Entry {
            index: noop_index,
            term,
            kind: EntryKind::Noop,
            data: Bytes::new(),
        }]);
        // No configuration change before this no-op is applied (the single-server fix).
        self.pending_conf_index = noop_index;
        self.need_bcast = true;
        self.maybe_commit();
    }

    // ----- invariants ------------------------------------------------------------------------

    fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        self.log.check_invariants();
        assert!(
            self.log.last_term() <= self.term,
            "log term {} above current term {}",
            self.log.last_term(),
            self.term
        );
        assert_eq!(
            self.role == Role::Leader,
            self.leader == self.id,
            "leader id and role disagree"
        );
        assert!(self.durable_hs.term <= self.term);
        if self.role == Role::Leader {
            assert!(self.progress.len() < self.conf.voters.len() + self.conf.learners.len() + 1);
            for (id, pr) in &self.progress {
                assert!(
                    pr.match_index <= self.log.last_index(),
                    "match of {id} beyond last"
                );
                assert!(
                    pr.next_index > pr.match_index,
                    "next of {id} not above match"
                );
            }
            assert!(
                self.uncommitted_bytes
                    <= self.cfg.max_uncommitted_bytes.saturating_mul(2) + (1 << 30)
            );
        }
        if self.role == Role::Candidate {
            assert_eq!(self.vote, self.id, "a candidate votes for itself");
        }
    }
}
