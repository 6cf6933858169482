//! The controller's replicated state: the history of configurations and the client sessions
//! that make operations exactly-once.
//!
//! Apply is a pure function of (state, entry): no clock, no randomness, no hash-map order, so
//! every replica computes the same configurations byte for byte and the same replies. An
//! operation either produces configuration `latest + 1` or is refused with a
//! [`ControllerError`] and changes nothing (except that a session remembers the refusal, so a
//! retry gets the same answer).
//!
//! Sizes: a configuration of 64 shards, 30 hosts and 20 groups encodes to about 2 KiB, so the
//! default 4,096 retained configurations are under 10 MiB; the session table holds at most
//! `sessions_max` entries of a few dozen bytes. The controller sees a handful of operations a
//! second at most, so apply cloning the latest configuration is cheap.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use thiserror::Error;

use super::balance::{add_groups, rebalance};
use super::codec::{put_bytes32, put_count, put_u16, put_u64, put_u8, DecodeError, Reader};
use super::command::{Command, ControllerError, HostSpec, Op, Reply};
use super::config::{
    Configuration, GroupId, Host, HostId, Slot, REPLICATION_DEFAULT, REPLICATION_MAX,
    SHARD_COUNT_DEFAULT,
};
use crate::shard::SLOT_COUNT;

/// Encoding version of the controller snapshot.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 1;
/// Bound on a snapshot's retained configurations and sessions when decoding.
pub const CONFIGS_RETAINED_LIMIT: usize = 1 << 20;
pub const SESSIONS_LIMIT: usize = 1 << 20;
/// Bytes of one remembered reply in a snapshot (Ok or Err, never a configuration).
const SESSION_REPLY_BYTES_MAX: usize = 2_048;

/// Settings of the controller state machine, fixed at cluster creation and identical on every
/// replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Shards the 16384 slots are cut into.
    pub shard_count: u16,
    /// Replicas per group.
    pub replication: u8,
    /// Configurations kept for Query(n); older ones are discarded.
    pub configs_retained_max: usize,
    /// Client sessions remembered; the least recently used is evicted beyond this.
    pub sessions_max: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            shard_count: SHARD_COUNT_DEFAULT,
            replication: REPLICATION_DEFAULT,
            configs_retained_max: 4_096,
            sessions_max: 1_024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid controller settings: {0}")]
pub struct SettingsError(pub String);

impl Settings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.shard_count == 0 || self.shard_count > SLOT_COUNT {
            return Err(SettingsError(format!(
                "shard count {} should be in 1..={SLOT_COUNT}",
                self.shard_count
            )));
        }
        if self.replication == 0 || self.replication > REPLICATION_MAX {
            return Err(SettingsError(format!(
                "replication {} should be in 1..={REPLICATION_MAX}",
                self.replication
            )));
        }
        if self.configs_retained_max < 2 || self.configs_retained_max > CONFIGS_RETAINED_LIMIT {
            return Err(SettingsError(format!(
                "configs retained max {} should be in 2..={CONFIGS_RETAINED_LIMIT}",
                self.configs_retained_max
            )));
        }
        if self.sessions_max == 0 || self.sessions_max > SESSIONS_LIMIT {
            return Err(SettingsError(format!(
                "sessions max {} should be in 1..={SESSIONS_LIMIT}",
                self.sessions_max
            )));
        }
        Ok(())
    }
}

/// What a client session remembers: its last applied sequence and that operation's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    seq: u64,
    reply: Reply,
    last_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateMachine {
    settings: Settings,
    /// Consecutive numbers, oldest first; never empty.
    configs: VecDeque<Configuration>,
    sessions: BTreeMap<u64, Session>,
    applied_index: u64,
}

impl StateMachine {
    /// A controller holding only configuration 0 (no hosts, no groups).
    pub fn new(settings: Settings) -> Result<StateMachine, SettingsError> {
        settings.validate()?;
        let initial = Configuration::initial(settings.shard_count, settings.replication);
        Ok(StateMachine {
            settings,
            configs: VecDeque::from([initial]),
            sessions: BTreeMap::new(),
            applied_index: 0,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn latest(&self) -> &Configuration {
        self.configs.back().expect("the history is never empty")
    }

    pub fn oldest(&self) -> &Configuration {
        self.configs.front().expect("the history is never empty")
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Configuration `num`, or the latest with -1. Served from local state: through the log
    /// (a Query command) or after a ReadIndex, it is linearizable.
    pub fn query(&self, num: i64) -> Result<&Configuration, ControllerError> {
        let latest = self.latest().num;
        if num == -1 {
            return Ok(self.latest());
        }
        if num < 0 || num as u64 > latest {
            return Err(ControllerError::NoSuchConfig { num, latest });
        }
        let num = num as u64;
        let oldest = self.oldest().num;
        if num < oldest {
            return Err(ControllerError::Compacted { num, oldest });
        }
        Ok(&self.configs[(num - oldest) as usize])
    }

    /// Applies the committed entry at `index` and returns the reply for its proposer. A payload
    /// that does not decode changes nothing and yields `BadCommand`, the same on every replica.
    /// An empty payload (a leader's no-op) returns None.
    pub fn apply(&mut self, index: u64, payload: &[u8]) -> Option<Reply> {
        assert!(
            index > self.applied_index,
            "apply index {index} after applied index {}",
            self.applied_index
        );
        self.applied_index = index;
        if payload.is_empty() {
            return None;
        }
        Some(match Command::decode(payload) {
            Ok(command) => self.apply_command(index, command),
            Err(e) => Reply::Err(ControllerError::BadCommand {
                index,
                reason: e.to_string(),
            }),
        })
    }

    fn apply_command(&mut self, index: u64, command: Command) -> Reply {
        let Command { client_id, seq, op } = command;
        if let Op::Query { num } = op {
            return match self.query(num) {
                Ok(config) => Reply::Config(config.clone()),
                Err(e) => Reply::Err(e),
            };
        }
        if client_id != 0 {
            if let Some(session) = self.sessions.get_mut(&client_id) {
                if seq == session.seq {
                    session.last_index = index;
                    return session.reply.clone();
                }
                if seq < session.seq {
                    return Reply::Err(ControllerError::StaleSequence { client_id, seq });
                }
            }
        }
        let reply = match self.execute(op) {
            Ok(config) => {
                let num = config.num;
                self.configs.push_back(config);
                while self.configs.len() > self.settings.configs_retained_max {
                    self.configs.pop_front();
                }
                Reply::Ok { num }
            }
            Err(e) => Reply::Err(e),
        };
        if client_id != 0 {
            self.remember(client_id, seq, index, reply.clone());
        }
        reply
    }

    fn remember(&mut self, client_id: u64, seq: u64, index: u64, reply: Reply) {
        if !self.sessions.contains_key(&client_id)
            && self.sessions.len() >= self.settings.sessions_max
        {
            // Linear scan: evictions happen once per new admin client beyond the bound, and the
            // table is small (default 1,024). Ties cannot happen: one entry per index.
            let victim = self
                .sessions
                .iter()
                .min_by_key(|(&id, s)| (s.last_index, id))
                .map(|(&id, _)| id);
            if let Some(victim) = victim {
                self.sessions.remove(&victim);
            }
        }
        self.sessions.insert(
            client_id,
            Session {
                seq,
                reply,
                last_index: index,
            },
        );
    }

    /// The configuration an operation produces, or why it is refused.
    fn execute(&self, op: Op) -> Result<Configuration, ControllerError> {
        let mut next = self.latest().clone();
        next.num += 1;
        match op {
            Op::Join { hosts } => join(&mut next, hosts)?,
            Op::Leave { hosts } => leave(&mut next, hosts)?,
            Op::Move { shard, group } => {
                let shard_count = next.shard_count();
                if shard >= shard_count {
                    return Err(ControllerError::ShardOutOfRange { shard, shard_count });
                }
                if !next.groups.contains_key(&group) {
                    return Err(ControllerError::UnknownGroup { group });
                }
                next.shards[usize::from(shard)] = group;
            }
            Op::SetController { slots } => next.controller = slots,
            Op::Query { .. } => unreachable!("queries are answered before execute"),
        }
        next.validate().map_err(|e| ControllerError::Invalid {
            reason: e.to_string(),
        })?;
        Ok(next)
    }

    /// The snapshot of the whole state (history, sessions, applied index).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u8(&mut out, SNAPSHOT_FORMAT_VERSION);
        put_u64(&mut out, self.applied_index);
        put_u16(&mut out, self.settings.shard_count);
        put_u8(&mut out, self.settings.replication);
        put_count(&mut out, self.configs.len());
        for config in &self.configs {
            config.encode(&mut out);
        }
        put_count(&mut out, self.sessions.len());
        for (&client_id, session) in &self.sessions {
            put_u64(&mut out, client_id);
            put_u64(&mut out, session.seq);
            put_u64(&mut out, session.last_index);
            put_bytes32(&mut out, &session.reply.encode());
        }
        out
    }

    /// Rebuilds a state machine from [`snapshot`](Self::snapshot) bytes. Checks everything:
    /// the settings match, the history is consecutive, sessions are canonical and bounded.
    pub fn restore(settings: Settings, bytes: &[u8]) -> Result<StateMachine, DecodeError> {
        settings.validate().map_err(|e| DecodeError::Invalid {
            offset: 0,
            reason: e.to_string(),
        })?;
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(DecodeError::Unknown {
                offset: 0,
                what: "controller snapshot version",
                value: u64::from(version),
            });
        }
        let applied_index = r.u64()?;
        let offset = r.offset();
        let shard_count = r.u16()?;
        let replication = r.u8()?;
        if shard_count != settings.shard_count || replication != settings.replication {
            return Err(DecodeError::Invalid {
                offset,
                reason: format!(
                    "snapshot of {shard_count} shards x {replication} replicas, settings say {} x {}",
                    settings.shard_count, settings.replication
                ),
            });
        }
        let offset = r.offset();
        let count = r.count("configuration", settings.configs_retained_max)?;
        if count == 0 {
            return Err(DecodeError::Invalid {
                offset,
                reason: "no configuration".into(),
            });
        }
        let mut configs = VecDeque::with_capacity(count);
        for _ in 0..count {
            let offset = r.offset();
            let config = Configuration::read(&mut r)?;
            let expected = configs.back().map(|c: &Configuration| c.num + 1);
            if expected.is_some_and(|n| n != config.num)
                || config.shard_count() != shard_count
                || config.replication != replication
            {
                return Err(DecodeError::Invalid {
                    offset,
                    reason: format!("configuration {} does not follow the history", config.num),
                });
            }
            configs.push_back(config);
        }
        let session_count = r.count("session", settings.sessions_max)?;
        let mut sessions = BTreeMap::new();
        let mut last = None;
        for _ in 0..session_count {
            let offset = r.offset();
            let client_id = r.u64()?;
            if client_id == 0 || last.is_some_and(|l| client_id <= l) {
                return Err(DecodeError::NotCanonical {
                    offset,
                    what: "session client id",
                    value: client_id,
                });
            }
            last = Some(client_id);
            let seq = r.u64()?;
            let last_index = r.u64()?;
            let reply_bytes = r.bytes32("session reply byte", SESSION_REPLY_BYTES_MAX)?;
            let reply = Reply::decode(reply_bytes)?;
            sessions.insert(
                client_id,
                Session {
                    seq,
                    reply,
                    last_index,
                },
            );
        }
        r.finish()?;
        Ok(StateMachine {
            settings,
            configs,
            sessions,
            applied_index,
        })
    }
}

fn join(next: &mut Configuration, hosts: Vec<HostSpec>) -> Result<(), ControllerError> {
    let mut seen = BTreeSet::new();
    for h in &hosts {
        if !seen.insert(h.id) {
            return Err(ControllerError::DuplicateHost { host: h.id });
        }
        if next.hosts.contains_key(&h.id) {
            return Err(ControllerError::HostExists { host: h.id });
        }
    }
    for h in hosts {
        next.hosts.insert(
            h.id,
            Host {
                cores: h.cores,
                addr: h.addr,
            },
        );
    }
    // Validate the hosts before placing anything on them (cores 0, id 0, a long address).
    next.validate_hosts()
        .map_err(|e| ControllerError::Invalid {
            reason: e.to_string(),
        })?;
    add_groups(next);
    let groups: BTreeSet<GroupId> = next.groups.keys().copied().collect();
    rebalance(&mut next.shards, &groups);
    Ok(())
}

fn leave(next: &mut Configuration, hosts: Vec<HostId>) -> Result<(), ControllerError> {
    let mut leaving = BTreeSet::new();
    for &host in &hosts {
        if !leaving.insert(host) {
            return Err(ControllerError::DuplicateHost { host });
        }
        if !next.hosts.contains_key(&host) {
            return Err(ControllerError::UnknownHost { host });
        }
        if let Some(i) = next.controller.iter().position(|s: &Slot| s.host == host) {
            return Err(ControllerError::HostRunsController {
                host,
                node_id: i as u64 + 1,
            });
        }
    }
    let groups_before = next.groups.len();
    for host in &leaving {
        next.hosts.remove(host);
    }
    next.groups
        .retain(|_, g| !g.hosts().any(|h| leaving.contains(&h)));
    // Cores freed on the remaining hosts take new groups.
    add_groups(next);
    if next.groups.is_empty() && groups_before > 0 {
        return Err(ControllerError::NoGroupLeft {
            groups: groups_before as u64,
        });
    }
    let groups: BTreeSet<GroupId> = next.groups.keys().copied().collect();
    rebalance(&mut next.shards, &groups);
    Ok(())
}
