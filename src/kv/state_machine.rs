//! The replicated key-value state machine of one Raft group.
//!
//! The Raft driver hands every committed entry, in log order, to [`StateMachine::apply`], which
//! returns one [`Outcome`] per client command; the driver answers the waiting clients with them
//! (on the leader) or drops them (on followers). Apply is a pure function of (state, entry): no
//! clock, no randomness, no I/O, so every replica computes the same state and the same outcomes.
//! Apply runs behind commit and never blocks replication: it is called from the Ready loop after
//! the entries are handed to the WAL and the peers, and costs O(log n) per key.
//!
//! Data is kept per shard (`BTreeMap<shard, BTreeMap<key, value>>`), so a shard can be exported,
//! imported or dropped whole, and iteration order is deterministic for snapshots and hashes.
//! Why a BTreeMap and not a hash map: deterministic snapshot order for free and no rehash pause
//! on the apply path; a lookup is ~log2(n) key comparisons (20 at 1M keys), well inside the few
//! microseconds of leader CPU the budget in DESIGN.md allows per write. Measured on this 2-core
//! machine (test profile, shared, noisy), batches of 64 puts of 256 B values: decode ~0.2 us
//! per command; apply ~0.8 us per put at 1k keys and ~1.6 us at 100k keys without a session;
//! a session (dedup check, result window, activity index) adds ~0.7-1.3 us. If apply shows in
//! profiles, the first candidates are the session activity index (a BTreeSet touched per
//! write) and a hash map for data with sorting at snapshot time.
//!
//! Log time: each batch carries the proposing leader's clock (ms); `log_time_ms` is the max seen,
//! so it never goes backwards even across leader changes with skewed clocks, and session expiry
//! is identical on every replica.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use super::command::{Command, Entry, Op, ShardAdmin, ShardState, MULTI_KEYS_MAX};
use super::error::KvError;
use super::key::Key;
use super::outcome::Outcome;
use super::session::{Sessions, SESSION_RESULTS_MAX_LIMIT};
use crate::shard::{key_shard, SLOT_COUNT};

/// Configuration of the state machine. Must be identical on every replica of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Number of shards the key space is cut into (keys -> slots -> shards).
    pub shard_count: u16,
    pub key_bytes_max: u32,
    pub value_bytes_max: u32,
    /// Keys in one MGet / MPut.
    pub multi_keys_max: u32,
    pub sessions_max: usize,
    /// A session idle for longer than this (log time) expires.
    pub session_ttl_ms: u64,
    /// Writes a session remembers: how many a client may have in flight at once.
    pub session_results_max: usize,
    /// Log bytes applied since the last snapshot after which [`StateMachine::snapshot_due`].
    pub snapshot_log_bytes_threshold: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shard_count: 64,
            key_bytes_max: 64 << 10,
            value_bytes_max: 8 << 20,
            multi_keys_max: 512,
            sessions_max: 100_000,
            session_ttl_ms: 3_600_000,
            session_results_max: 16,
            snapshot_log_bytes_threshold: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid kv config: {0}")]
pub struct ConfigError(pub String);

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let field_max = super::command::FIELD_BYTES_MAX;
        if self.shard_count == 0 || self.shard_count > SLOT_COUNT {
            return Err(ConfigError(format!(
                "shard count {} should be in 1..={SLOT_COUNT}",
                self.shard_count
            )));
        }
        if self.key_bytes_max == 0 || self.key_bytes_max > field_max {
            return Err(ConfigError(format!(
                "key bytes max {} should be in 1..={field_max}",
                self.key_bytes_max
            )));
        }
        if self.value_bytes_max > field_max {
            return Err(ConfigError(format!(
                "value bytes max {} should be at most {field_max}",
                self.value_bytes_max
            )));
        }
        if self.multi_keys_max == 0 || self.multi_keys_max > MULTI_KEYS_MAX {
            return Err(ConfigError(format!(
                "multi keys max {} should be in 1..={MULTI_KEYS_MAX}",
                self.multi_keys_max
            )));
        }
        if self.sessions_max == 0 {
            return Err(ConfigError("sessions max should be at least 1".into()));
        }
        if self.session_results_max == 0 || self.session_results_max > SESSION_RESULTS_MAX_LIMIT {
            return Err(ConfigError(format!(
                "session results max {} should be in 1..={SESSION_RESULTS_MAX_LIMIT}",
                self.session_results_max
            )));
        }
        Ok(())
    }
}

impl Config {
    /// Checks an op against the size limits and the one-shard rule, and returns its shard
    /// (None for session ops). The state machine applies exactly this check, so a server may
    /// call it before proposing to refuse a bad request without a round through the log.
    pub fn check_op(&self, op: &Op) -> Result<Option<u16>, KvError> {
        let shard = match op {
            Op::Get { key } | Op::Exists { key } | Op::Delete { key } | Op::Incr { key, .. } => {
                self.check_key(key)?;
                key_shard(key, self.shard_count)
            }
            Op::Put { key, value }
            | Op::Append { key, value }
            | Op::PutIfPresent { key, value } => {
                self.check_key(key)?;
                self.check_value(value.len())?;
                key_shard(key, self.shard_count)
            }
            Op::Cas { key, new, .. } => {
                self.check_key(key)?;
                if let Some(value) = new {
                    self.check_value(value.len())?;
                }
                key_shard(key, self.shard_count)
            }
            Op::MGet { keys } => {
                self.check_count(keys.len())?;
                for key in keys {
                    self.check_key(key)?;
                }
                self.common_shard(keys.iter())?
            }
            Op::MPut { pairs } => {
                self.check_count(pairs.len())?;
                for (key, value) in pairs {
                    self.check_key(key)?;
                    self.check_value(value.len())?;
                }
                self.common_shard(pairs.iter().map(|(k, _)| k))?
            }
            Op::OpenSession | Op::CloseSession => return Ok(None),
        };
        Ok(Some(shard))
    }

    fn check_key(&self, key: &Bytes) -> Result<(), KvError> {
        if key.len() > self.key_bytes_max as usize {
            return Err(KvError::KeyTooLarge {
                size_bytes: key.len() as u64,
                size_bytes_max: u64::from(self.key_bytes_max),
            });
        }
        Ok(())
    }

    fn check_value(&self, size_bytes: usize) -> Result<(), KvError> {
        if size_bytes > self.value_bytes_max as usize {
            return Err(KvError::ValueTooLarge {
                size_bytes: size_bytes as u64,
                size_bytes_max: u64::from(self.value_bytes_max),
            });
        }
        Ok(())
    }

    fn check_count(&self, count: usize) -> Result<(), KvError> {
        if count == 0 || count > self.multi_keys_max as usize {
            return Err(KvError::TooManyKeys {
                count: count as u64,
                count_max: u64::from(self.multi_keys_max),
            });
        }
        Ok(())
    }

    fn common_shard<'k>(&self, mut keys: impl Iterator<Item = &'k Bytes>) -> Result<u16, KvError> {
        let Some(first) = keys.next() else {
            unreachable!("check_count refused an empty key list");
        };
        let shard_first = key_shard(first, self.shard_count);
        for key in keys {
            let shard_other = key_shard(key, self.shard_count);
            if shard_other != shard_first {
                return Err(KvError::CrossShard {
                    shard_first,
                    shard_other,
                });
            }
        }
        Ok(shard_first)
    }
}

/// How a read may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// The driver confirmed leadership (ReadIndex or lease) and applied up to the read index:
    /// only a Serving shard answers.
    Linearizable,
    /// Any replica's local copy, possibly old or missing (`READONLY` connections).
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShardData {
    pub(crate) state: ShardState,
    pub(crate) data: BTreeMap<Key, Bytes>,
}

/// The key-value state of one Raft group: the shards it holds, their data, the client sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMachine {
    pub(crate) config: Config,
    pub(crate) shards: BTreeMap<u16, ShardData>,
    pub(crate) sessions: Sessions,
    pub(crate) applied_index: u64,
    pub(crate) log_time_ms: u64,
    pub(crate) log_bytes_since_snapshot: u64,
}

impl StateMachine {
    /// An empty state machine serving `shards`. Panics on an invalid config (check it with
    /// [`Config::validate`] first) or a shard out of range.
    pub fn new(config: Config, shards: impl IntoIterator<Item = u16>) -> StateMachine {
        if let Err(e) = config.validate() {
            panic!("{e}");
        }
        let mut sm = StateMachine::empty(config);
        for shard in shards {
            assert!(shard < sm.config.shard_count, "shard {shard} out of range");
            sm.shards.insert(
                shard,
                ShardData {
                    state: ShardState::Serving,
                    data: BTreeMap::new(),
                },
            );
        }
        sm
    }

    pub(crate) fn empty(config: Config) -> StateMachine {
        let sessions = Sessions::new(
            config.sessions_max,
            config.session_ttl_ms,
            config.session_results_max,
        );
        StateMachine {
            config,
            shards: BTreeMap::new(),
            sessions,
            applied_index: 0,
            log_time_ms: 0,
            log_bytes_since_snapshot: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn log_time_ms(&self) -> u64 {
        self.log_time_ms
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn has_session(&self, client_id: u64) -> bool {
        self.sessions.contains(client_id)
    }

    pub fn shard_state(&self, shard: u16) -> Option<ShardState> {
        self.shards.get(&shard).map(|s| s.state)
    }

    /// Shards held, with their state, in shard order.
    pub fn shards(&self) -> impl Iterator<Item = (u16, ShardState)> + '_ {
        self.shards.iter().map(|(&shard, s)| (shard, s.state))
    }

    pub fn key_count(&self, shard: u16) -> usize {
        self.shards.get(&shard).map_or(0, |s| s.data.len())
    }

    /// The shard of a key under this group's configuration.
    pub fn shard_of(&self, key: &[u8]) -> u16 {
        key_shard(key, self.config.shard_count)
    }

    /// Whether the log applied since the last snapshot passed the configured byte threshold.
    pub fn snapshot_due(&self) -> bool {
        self.log_bytes_since_snapshot >= self.config.snapshot_log_bytes_threshold
    }

    /// The driver took a snapshot at the current applied index (and may compact the log up to it).
    pub fn mark_snapshot_taken(&mut self) {
        self.log_bytes_since_snapshot = 0;
    }

    /// Applies the committed entry at `index` and appends one outcome per client command to
    /// `outcomes`, in command order (one for an admin entry, none for a no-op). An undecodable
    /// payload applies nothing and yields a single `BadEntry` error: the driver fails every
    /// client waiting on that entry with it. Indexes must increase; the driver calls this for every entry it applies
    /// (an empty payload for entries that are not the state machine's, e.g. the leader's no-op).
    pub fn apply(&mut self, index: u64, payload: &Bytes, outcomes: &mut Vec<Outcome>) {
        assert!(
            index > self.applied_index,
            "apply index {index} after applied index {}",
            self.applied_index
        );
        self.applied_index = index;
        self.log_bytes_since_snapshot = self
            .log_bytes_since_snapshot
            .saturating_add(payload.len() as u64);
        // Decode the whole entry before applying any of it: a corrupt entry applies nothing.
        let entry = match Entry::decode(payload) {
            Ok(entry) => entry,
            Err(reason) => {
                outcomes.push(Outcome::Err(KvError::BadEntry { index, reason }));
                return;
            }
        };
        match entry {
            Entry::Noop => {}
            Entry::Batch {
                timestamp_ms,
                commands,
            } => {
                self.log_time_ms = self.log_time_ms.max(timestamp_ms);
                self.sessions.expire(self.log_time_ms);
                outcomes.reserve(commands.len());
                for command in commands {
                    outcomes.push(self.apply_command(command, payload.len()));
                }
            }
            Entry::Admin(admin) => outcomes.push(self.apply_admin(admin)),
        }
    }

    /// Convenience form of [`apply`](Self::apply) that returns the outcomes.
    pub fn apply_entry(&mut self, index: u64, payload: &Bytes) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        self.apply(index, payload, &mut outcomes);
        outcomes
    }

    fn apply_command(&mut self, command: Command, payload_bytes: usize) -> Outcome {
        let Command { client_id, seq, op } = command;
        let now_ms = self.log_time_ms;
        match op {
            Op::Get { .. } | Op::Exists { .. } | Op::MGet { .. } => {
                return self.read(&op, ReadConsistency::Linearizable)
            }
            Op::OpenSession => {
                if client_id == 0 {
                    return Outcome::Err(KvError::SessionUnknown { client_id });
                }
                self.sessions.open(client_id, now_ms);
                return Outcome::Ok;
            }
            Op::CloseSession => {
                self.sessions.close(client_id);
                return Outcome::Ok;
            }
            _ => {}
        }
        // Duplicates first: a retry of an applied write gets its original answer even if the
        // shard has since frozen or left.
        let (config, shards) = (&self.config, &mut self.shards);
        let write = move || match write_shard(config, shards, &op) {
            Ok(shard) => (
                shard,
                execute_write(config, shards, shard, op, payload_bytes),
            ),
            Err(error) => (0, Outcome::Err(error)),
        };
        if client_id == 0 {
            return write().1;
        }
        self.sessions.apply_write(client_id, seq, now_ms, write)
    }

    fn check_shard(&self, shard: u16, consistency: ReadConsistency) -> Result<(), KvError> {
        check_shard(&self.shards, shard, consistency)
    }

    /// Serves a read (Get, Exists, MGet) from the local state. For `Linearizable` the driver must
    /// first have confirmed leadership (ReadIndex or lease) and applied up to the read index;
    /// `Stale` answers from whatever this replica has applied.
    pub fn read(&self, op: &Op, consistency: ReadConsistency) -> Outcome {
        match self.try_read(op, consistency) {
            Ok(outcome) => outcome,
            Err(error) => Outcome::Err(error),
        }
    }

    fn try_read(&self, op: &Op, consistency: ReadConsistency) -> Result<Outcome, KvError> {
        match op {
            Op::Get { key } | Op::Exists { key } => {
                let shard = self.config.check_op(op)?.expect("a data op has a shard");
                self.check_shard(shard, consistency)?;
                let value = self.shards.get(&shard).and_then(|s| s.data.get(&key[..]));
                Ok(match op {
                    Op::Get { .. } => Outcome::Value(value.cloned()),
                    _ => Outcome::Int(i64::from(value.is_some())),
                })
            }
            Op::MGet { keys } => {
                let shard = self.config.check_op(op)?.expect("a data op has a shard");
                self.check_shard(shard, consistency)?;
                let data = &self.shards.get(&shard).expect("checked").data;
                Ok(Outcome::Values(
                    keys.iter().map(|k| data.get(&k[..]).cloned()).collect(),
                ))
            }
            _ => Err(KvError::NotARead),
        }
    }

    fn apply_admin(&mut self, admin: ShardAdmin) -> Outcome {
        let result = match admin {
            ShardAdmin::SetState { shard, state } => self.set_shard_state(shard, state),
            ShardAdmin::Import { blob } => self.import_shard(&blob),
            ShardAdmin::Delete { shard } => self.delete_shard(shard),
        };
        match result {
            Ok(()) => Outcome::Ok,
            Err(error) => Outcome::Err(error),
        }
    }

    /// Creates `shard` in `state` if absent, or moves it to `state`. Migration drives the order
    /// through the log; this call refuses every transition migration never makes, so a bad
    /// or replayed admin entry cannot thaw a frozen shard or serve an empty one:
    /// - absent -> Serving (a shard gained from nobody) or Importing (being pulled);
    /// - Serving -> Exporting (frozen for hand-over);
    /// - any state to itself (idempotent).
    ///
    /// Importing -> Serving happens only through [`import_shard`](Self::import_shard), and an
    /// Exporting shard only leaves through [`delete_shard`](Self::delete_shard).
    /// Through the log: `ShardAdmin::SetState`.
    pub fn set_shard_state(&mut self, shard: u16, state: ShardState) -> Result<(), KvError> {
        if shard >= self.config.shard_count {
            return Err(KvError::ShardAdmin {
                shard,
                reason: format!("out of range (shard count {})", self.config.shard_count),
            });
        }
        let current = self.shard_state(shard);
        let allowed = match (current, state) {
            (Some(from), to) if from == to => true,
            (None, ShardState::Serving | ShardState::Importing) => true,
            (Some(ShardState::Serving), ShardState::Exporting) => true,
            _ => false,
        };
        if !allowed {
            return Err(KvError::ShardAdmin {
                shard,
                reason: format!(
                    "cannot go from {} to {}",
                    current.map_or("absent", ShardState::name),
                    state.name()
                ),
            });
        }
        self.force_shard_state(shard, state);
        Ok(())
    }

    /// Sets a shard's state with no transition check. The simulator's deliberately broken
    /// variants use it (a frozen shard taking writes); nothing else should.
    pub(crate) fn force_shard_state(&mut self, shard: u16, state: ShardState) {
        self.shards
            .entry(shard)
            .or_insert_with(|| ShardData {
                state,
                data: BTreeMap::new(),
            })
            .state = state;
    }

    /// Drops a shard and its data (idempotent). Through the log: `ShardAdmin::Delete`.
    pub fn delete_shard(&mut self, shard: u16) -> Result<(), KvError> {
        self.shards.remove(&shard);
        Ok(())
    }

    /// The hand-over blob of a frozen shard: its data plus the session entries its new owner
    /// needs for exactly-once, in the framed format of [`super::snapshot`]. The shard must be
    /// Exporting (frozen through the log), so the blob stays the truth until it is deleted.
    pub fn export_shard(&self, shard: u16) -> Result<Bytes, KvError> {
        match self.shard_state(shard) {
            Some(ShardState::Exporting) => Ok(super::snapshot::encode_shard_blob(self, shard)),
            Some(state) => Err(KvError::ShardNotServing {
                shard,
                state: state.name(),
            }),
            None => Err(KvError::WrongShard { shard }),
        }
    }

    /// Installs a blob from [`export_shard`](Self::export_shard); the shard must be absent or
    /// Importing, and becomes Serving. All or nothing: the blob is fully checked first.
    /// Through the log: `ShardAdmin::Import`.
    pub fn import_shard(&mut self, blob: &Bytes) -> Result<(), KvError> {
        self.import_shard_checked(None, blob)
    }

    /// [`import_shard`](Self::import_shard) of a blob that must hold `shard` (migration knows
    /// which shard it pulled: a blob of another one is refused, nothing changes). The blob's
    /// bytes count toward [`snapshot_due`](Self::snapshot_due) like applied log bytes: the
    /// entry that carried it is not a kv entry, so `apply` never saw its size.
    pub fn import_shard_expecting(&mut self, shard: u16, blob: &Bytes) -> Result<(), KvError> {
        self.import_shard_checked(Some(shard), blob)?;
        self.log_bytes_since_snapshot = self
            .log_bytes_since_snapshot
            .saturating_add(blob.len() as u64);
        Ok(())
    }

    fn import_shard_checked(&mut self, expected: Option<u16>, blob: &Bytes) -> Result<(), KvError> {
        let parsed =
            super::snapshot::decode_shard_blob(blob, self.config.shard_count).map_err(|e| {
                KvError::BadShardBlob {
                    reason: e.to_string(),
                }
            })?;
        let shard = parsed.shard;
        if let Some(want) = expected {
            if want != shard {
                return Err(KvError::ShardAdmin {
                    shard: want,
                    reason: format!("the blob holds shard {shard}"),
                });
            }
        }
        match self.shard_state(shard) {
            None | Some(ShardState::Importing) => {}
            Some(state) => {
                return Err(KvError::ShardAdmin {
                    shard,
                    reason: format!("cannot import over a shard that is {}", state.name()),
                })
            }
        }
        self.shards.insert(
            shard,
            ShardData {
                state: ShardState::Serving,
                data: parsed.data,
            },
        );
        for (client_id, session) in parsed.sessions {
            self.sessions.merge(client_id, session);
        }
        Ok(())
    }

    /// A 64-bit digest of the whole state (data, shard states, sessions, applied index, log
    /// time), equal on two state machines iff their snapshots are byte-identical.
    pub fn state_hash(&self) -> u64 {
        let mut hash = Fnv64::new();
        for chunk in self.snapshot_writer(1 << 20) {
            hash.write(&chunk);
        }
        hash.finish()
    }
}

/// Checks limits and routing of a write; returns its shard. Nothing is changed on error.
fn write_shard(
    config: &Config,
    shards: &BTreeMap<u16, ShardData>,
    op: &Op,
) -> Result<u16, KvError> {
    let shard = config
        .check_op(op)?
        .expect("session ops are handled before data writes");
    check_shard(shards, shard, ReadConsistency::Linearizable)?;
    Ok(shard)
}

fn check_shard(
    shards: &BTreeMap<u16, ShardData>,
    shard: u16,
    consistency: ReadConsistency,
) -> Result<(), KvError> {
    let Some(held) = shards.get(&shard) else {
        return Err(KvError::WrongShard { shard });
    };
    let allowed = match consistency {
        ReadConsistency::Linearizable => held.state == ShardState::Serving,
        // A frozen shard still has its data; an importing one has none yet.
        ReadConsistency::Stale => held.state != ShardState::Importing,
    };
    if !allowed {
        return Err(KvError::ShardNotServing {
            shard,
            state: held.state.name(),
        });
    }
    Ok(())
}

/// Stores `value` (as it is) under `key`. A key already present keeps its stored form and
/// only its value is replaced, so an update neither copies the key nor searches twice.
fn put(data: &mut BTreeMap<Key, Bytes>, key: &[u8], value: Bytes) {
    match data.get_mut(key) {
        Some(current) => *current = value,
        None => {
            data.insert(Key::from(key), value);
        }
    }
}

fn execute_write(
    config: &Config,
    shards: &mut BTreeMap<u16, ShardData>,
    shard: u16,
    op: Op,
    payload_bytes: usize,
) -> Outcome {
    let keep = |field: Bytes| detach(field, payload_bytes);
    let value_bytes_max = config.value_bytes_max as usize;
    let data = &mut shards
        .get_mut(&shard)
        .expect("write_shard checked the shard is held")
        .data;
    match op {
        Op::Put { key, value } => {
            put(data, &key, keep(value));
            Outcome::Ok
        }
        Op::Append { key, value } => {
            let old = data.get(&key[..]);
            let length = old.map_or(0, |v| v.len()) + value.len();
            if length > value_bytes_max {
                return Outcome::Err(KvError::ValueTooLarge {
                    size_bytes: length as u64,
                    size_bytes_max: value_bytes_max as u64,
                });
            }
            let new = match old {
                None => keep(value),
                Some(old) => {
                    // One copy of the old value per append; an append-heavy key pays
                    // O(size) per append, bounded by value_bytes_max.
                    let mut joined = BytesMut::with_capacity(length);
                    joined.extend_from_slice(old);
                    joined.extend_from_slice(&value);
                    joined.freeze()
                }
            };
            put(data, &key, new);
            Outcome::Int(length as i64)
        }
        Op::Delete { key } => Outcome::Int(i64::from(data.remove(&key[..]).is_some())),
        Op::Incr { key, delta } => {
            let current = match data.get(&key[..]) {
                None => 0,
                Some(v) => match parse_i64(v) {
                    Some(n) => n,
                    None => return Outcome::Err(KvError::NotAnInteger),
                },
            };
            let Some(new) = current.checked_add(delta) else {
                return Outcome::Err(KvError::IntegerOverflow);
            };
            put(data, &key, Bytes::from(new.to_string()));
            Outcome::Int(new)
        }
        Op::PutIfPresent { key, value } => match data.get_mut(&key[..]) {
            Some(current) => {
                *current = keep(value);
                Outcome::Bool(true)
            }
            None => Outcome::Bool(false),
        },
        Op::Cas { key, expected, new } => {
            if data.get(&key[..]) != expected.as_ref() {
                return Outcome::Bool(false);
            }
            match new {
                Some(value) => put(data, &key, keep(value)),
                None => {
                    data.remove(&key[..]);
                }
            };
            Outcome::Bool(true)
        }
        Op::MPut { pairs } => {
            for (key, value) in pairs {
                put(data, &key, keep(value));
            }
            Outcome::Ok
        }
        Op::Get { .. }
        | Op::Exists { .. }
        | Op::MGet { .. }
        | Op::OpenSession
        | Op::CloseSession => unreachable!("not a data write"),
    }
}

/// The form of a key or value field to store in the map.
///
/// A decoded field is a slice of the whole entry payload (or snapshot frame), and storing it
/// keeps that whole buffer alive for as long as the key lives: one 10-byte value from a 1 MiB
/// batch would pin the MiB. So a field that is less than half of its buffer is copied (a
/// memcpy of the field, cheap next to the map insert), and a large value, the case where
/// zero-copy pays, is kept as the slice it is.
pub(crate) fn detach(field: Bytes, buffer_bytes: usize) -> Bytes {
    if field.len() * 2 >= buffer_bytes {
        field
    } else {
        Bytes::copy_from_slice(&field)
    }
}

/// Parses a decimal i64 the way Redis does: optional '-', digits, no leading zeros, no spaces.
fn parse_i64(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    let (negative, digits) = match bytes[0] {
        b'-' => (true, &bytes[1..]),
        _ => (false, bytes),
    };
    if digits.is_empty() || (digits[0] == b'0' && (digits.len() > 1 || negative)) {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(d - b'0');
        n = n.checked_mul(10)?;
        n = if negative {
            n.checked_sub(digit)?
        } else {
            n.checked_add(digit)?
        };
    }
    Some(n)
}

/// FNV-1a, 64 bits: stable across Rust releases (unlike `DefaultHasher`), enough for comparing
/// replicas' states in tests and the simulator.
pub(crate) struct Fnv64(u64);

impl Fnv64 {
    pub(crate) fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_i64_matches_redis_rules() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        for bad in [&b""[..], b"-", b"01", b"-0", b" 1", b"1a", b"+1"] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn small_fields_are_copied_and_large_values_kept_in_place() {
        use crate::kv::command::{encode_batch, Command};
        let mut sm = StateMachine::new(Config::default(), 0..64);
        let big = Bytes::from(vec![7u8; 4096]);
        let put = |key: &str, value: Bytes| Command {
            client_id: 0,
            seq: 0,
            op: Op::Put {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value,
            },
        };
        let payload = encode_batch(
            1,
            &[put("small", Bytes::from_static(b"v")), put("big", big)],
        );
        sm.apply_entry(1, &payload);
        let in_payload = |b: &Bytes| {
            let start = payload.as_ptr() as usize;
            (start..start + payload.len()).contains(&(b.as_ptr() as usize))
        };
        let get = |key: &'static [u8]| match sm.read(
            &Op::Get {
                key: Bytes::from_static(key),
            },
            ReadConsistency::Stale,
        ) {
            Outcome::Value(Some(v)) => v,
            other => panic!("{other:?}"),
        };
        // The 1-byte value must not pin the 4 KiB payload; the 4 KiB value is the payload.
        assert!(!in_payload(&get(b"small")));
        assert!(in_payload(&get(b"big")));
    }

    #[test]
    fn shard_state_transitions_are_only_the_ones_migration_makes() {
        use ShardState::{Exporting, Importing, Serving};
        let mut sm = StateMachine::new(Config::default(), []);
        assert!(
            sm.set_shard_state(1, Exporting).is_err(),
            "absent -> exporting"
        );
        sm.set_shard_state(1, Importing).unwrap();
        let e = sm.set_shard_state(1, Serving).unwrap_err();
        assert!(e.to_string().contains("from importing to serving"), "{e}");
        sm.set_shard_state(2, Serving).unwrap();
        sm.set_shard_state(2, Serving).unwrap();
        sm.set_shard_state(2, Exporting).unwrap();
        assert!(
            sm.set_shard_state(2, Serving).is_err(),
            "a frozen shard never thaws"
        );
        assert!(sm.set_shard_state(2, Importing).is_err());
        assert_eq!(sm.shard_state(1), Some(Importing));
        assert_eq!(sm.shard_state(2), Some(Exporting));
        assert!(sm.set_shard_state(64, Serving).is_err(), "out of range");
    }

    #[test]
    fn import_expecting_a_shard_refuses_another_and_counts_toward_snapshots() {
        let config = Config {
            snapshot_log_bytes_threshold: 1,
            ..Config::default()
        };
        let mut old = StateMachine::new(config.clone(), [3, 4]);
        old.set_shard_state(3, ShardState::Exporting).unwrap();
        let blob = old.export_shard(3).unwrap();
        let mut new = StateMachine::new(config, []);
        new.set_shard_state(4, ShardState::Importing).unwrap();
        let e = new.import_shard_expecting(4, &blob).unwrap_err();
        assert!(e.to_string().contains("blob holds shard 3"), "{e}");
        assert_eq!(new.shard_state(3), None, "nothing installed");
        assert!(!new.snapshot_due());
        new.import_shard_expecting(3, &blob).unwrap();
        assert_eq!(new.shard_state(3), Some(ShardState::Serving));
        assert!(
            new.snapshot_due(),
            "the installed blob counts toward the next snapshot"
        );
    }

    #[test]
    fn config_validation_names_the_number() {
        let config = Config {
            shard_count: 0,
            ..Config::default()
        };
        let e = config.validate().unwrap_err();
        assert!(e.to_string().contains("shard count 0"), "{e}");
        Config::default().validate().unwrap();
    }
}
