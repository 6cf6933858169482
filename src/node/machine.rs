//! The seam between a group replica's Ready loop (`group.rs`) and the state machine its log
//! drives: the KV store of a data group, or the controller's configurations.
//!
//! `Group<M: Machine>` is generic, not a trait object: the KV hot path (encode a batch, apply
//! an entry, serve a read) is monomorphised and pays no dynamic dispatch per request. The
//! controller runs the same loop, persister and storage with [`ControllerMachine`].
//!
//! Contract, the same for every machine:
//! - `apply` is deterministic: every replica that applies the same entries reaches the same
//!   state and pushes the same outcomes, one per command of the entry, in command order (the
//!   group matches them to the waiting clients by position). An empty payload (a no-op or a
//!   membership entry) only advances the applied index.
//! - `take_snapshot` captures everything `apply` produced up to `applied_index`, and
//!   `restored` rebuilds exactly that state from those bytes (or says why it cannot).

use bytes::{Bytes, BytesMut};

use crate::controller::{self, GroupId as ControllerGroupId};
use crate::kv::{self, ReadConsistency};
use crate::shard::migration::{is_migration_entry, ApplyOutcome, GroupShards};

/// A replicated state machine driven by a group's committed log.
pub trait Machine: Sized {
    /// One queued write: several are encoded into one log entry per turn.
    type Command;
    /// One queued read, served after a ReadIndex (or at once when stale reads are allowed).
    type Read;
    /// What a write or a read comes to.
    type Outcome: Clone;

    /// Most commands in one log entry.
    const BATCH_COMMANDS_MAX: usize;

    /// Bytes a command adds to its entry (for cutting batches).
    fn command_size_bytes(command: &Self::Command) -> usize;
    /// The payload of one log entry holding `commands` (proposed at `now_ms`, wall clock of
    /// the proposer: machines that need time take it from the log, never from the replica).
    fn encode_batch(now_ms: u64, commands: &[Self::Command]) -> Bytes;
    /// Applies the committed entry at `index`; pushes one outcome per command it holds.
    fn apply(&mut self, index: u64, payload: &Bytes, outcomes: &mut Vec<Self::Outcome>);
    /// Serves a read from the applied state.
    fn read(&self, read: &Self::Read, stale: bool) -> Self::Outcome;
    fn applied_index(&self) -> u64;
    /// Whether enough log has been applied since the last snapshot to take one.
    fn snapshot_due(&self) -> bool;
    /// The state as snapshot bytes; counts as taken (`snapshot_due` restarts from here).
    fn take_snapshot(&mut self) -> Bytes;
    /// A machine rebuilt from snapshot bytes, with this one's settings.
    fn restored(&self, data: &Bytes) -> Result<Self, String>;
}

/// Chunk size of the KV snapshot stream.
const KV_SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// First byte of a data group's snapshot (KV + migration state).
const DATA_SNAPSHOT_MAGIC: u8 = b'G';
const DATA_SNAPSHOT_VERSION: u8 = 1;
/// `magic:u8 version:u8 shards_len:u32`.
const DATA_SNAPSHOT_HEADER_BYTES: usize = 6;
/// Bound on the migration half of a snapshot: two configurations and the shard phases (a
/// configuration of the largest cluster the controller allows is well under 1 MiB).
const SHARDS_SNAPSHOT_BYTES_MAX: usize = 16 << 20;

/// What applying a migration entry came to, as the outcome its proposer receives: `Bool(true)`
/// applied, `Bool(false)` stale or refused (changed nothing).
pub fn migration_outcome_applied(outcome: &kv::Outcome) -> bool {
    matches!(outcome, kv::Outcome::Bool(true))
}

/// A data group's state: the KV store and the group's migration state ([`GroupShards`])
/// behind one Raft log. Entries that start with [`MIGRATION_TAG`](crate::shard::migration::MIGRATION_TAG)
/// go to [`GroupShards::apply`] (which also advances the KV applied index), every other entry
/// is a KV batch, so both halves are a function of the log and the KV applied index follows
/// the Raft applied index one for one.
pub struct KvMachine {
    pub sm: kv::StateMachine,
    pub config: kv::Config,
    pub shards: GroupShards,
}

impl KvMachine {
    /// A replica of configuration group `group` over `sm`. A new replica's `sm` holds no shard:
    /// the first configuration that names the group creates them (`AcceptConfig`).
    pub fn new(sm: kv::StateMachine, config: kv::Config, group: ControllerGroupId) -> KvMachine {
        KvMachine {
            sm,
            config,
            shards: GroupShards::new(group),
        }
    }

    /// Rebuilds both halves from a data group snapshot; every disagreement is an error naming it.
    pub fn restore(
        config: kv::Config,
        group: ControllerGroupId,
        data: &Bytes,
    ) -> Result<KvMachine, String> {
        let header = &data[..data.len().min(DATA_SNAPSHOT_HEADER_BYTES)];
        if data.len() < DATA_SNAPSHOT_HEADER_BYTES
            || data[0] != DATA_SNAPSHOT_MAGIC
            || data[1] != DATA_SNAPSHOT_VERSION
        {
            return Err(format!(
                "not a data group snapshot of version {DATA_SNAPSHOT_VERSION}: header {header:?}"
            ));
        }
        let shards_len = u32::from_le_bytes([data[2], data[3], data[4], data[5]]) as usize;
        let kv_at = DATA_SNAPSHOT_HEADER_BYTES + shards_len;
        if shards_len > SHARDS_SNAPSHOT_BYTES_MAX || kv_at > data.len() {
            return Err(format!(
                "migration state of {shards_len} bytes in a snapshot of {} bytes",
                data.len()
            ));
        }
        let shards = GroupShards::decode(&data[DATA_SNAPSHOT_HEADER_BYTES..kv_at])
            .map_err(|e| format!("migration state: {e}"))?;
        if shards.group() != group {
            return Err(format!(
                "the snapshot holds group {}, this replica is group {group}",
                shards.group()
            ));
        }
        let sm = kv::restore(config.clone(), [data.slice(kv_at..)])
            .map_err(|e| format!("kv state: {e}"))?;
        if shards.applied_index() > sm.applied_index() {
            return Err(format!(
                "migration state applied up to {} but kv only up to {}",
                shards.applied_index(),
                sm.applied_index()
            ));
        }
        shards.check_against(&sm)?;
        Ok(KvMachine { sm, config, shards })
    }
}

impl Machine for KvMachine {
    type Command = kv::Command;
    type Read = kv::Op;
    type Outcome = kv::Outcome;

    const BATCH_COMMANDS_MAX: usize = kv::BATCH_COMMANDS_MAX as usize;

    fn command_size_bytes(c: &kv::Command) -> usize {
        use kv::Op;
        const OVERHEAD_BYTES: usize = 32;
        OVERHEAD_BYTES
            + match &c.op {
                Op::Get { key } | Op::Exists { key } | Op::Delete { key } => key.len(),
                Op::Put { key, value }
                | Op::Append { key, value }
                | Op::PutIfPresent { key, value } => key.len() + value.len(),
                Op::Incr { key, .. } => key.len(),
                Op::Cas { key, expected, new } => {
                    key.len()
                        + expected.as_ref().map_or(0, |v| v.len())
                        + new.as_ref().map_or(0, |v| v.len())
                }
                Op::MGet { keys } => keys.iter().map(|k| k.len() + 4).sum(),
                Op::MPut { pairs } => pairs.iter().map(|(k, v)| k.len() + v.len() + 8).sum(),
                Op::OpenSession | Op::CloseSession => 0,
            }
    }

    fn encode_batch(now_ms: u64, commands: &[kv::Command]) -> Bytes {
        kv::encode_batch(now_ms, commands)
    }

    #[inline]
    fn apply(&mut self, index: u64, payload: &Bytes, outcomes: &mut Vec<kv::Outcome>) {
        if !is_migration_entry(payload) {
            self.sm.apply(index, payload, outcomes);
            return;
        }
        let applied = match self.shards.apply(&mut self.sm, index, payload) {
            ApplyOutcome::Applied => true,
            ApplyOutcome::Stale { .. } => false,
            // Refused entries change nothing (GroupShards checks before it changes), and the
            // runtime proposes only entries that follow from the log and the controller: a
            // refusal is a bug worth a loud line, not a reason to stop serving other shards.
            ApplyOutcome::Refused(e) => {
                eprintln!(
                    "tynamo: group {}: migration entry {index} refused: {e}",
                    self.shards.group()
                );
                false
            }
        };
        outcomes.push(kv::Outcome::Bool(applied));
    }

    #[inline]
    fn read(&self, op: &kv::Op, stale: bool) -> kv::Outcome {
        let consistency = if stale {
            ReadConsistency::Stale
        } else {
            ReadConsistency::Linearizable
        };
        self.sm.read(op, consistency)
    }

    fn applied_index(&self) -> u64 {
        self.sm.applied_index()
    }

    fn snapshot_due(&self) -> bool {
        self.sm.snapshot_due()
    }

    fn take_snapshot(&mut self) -> Bytes {
        let shards = self.shards.encode();
        assert!(
            shards.len() <= SHARDS_SNAPSHOT_BYTES_MAX,
            "group {}: migration state of {} bytes",
            self.shards.group(),
            shards.len()
        );
        let mut data = BytesMut::with_capacity(DATA_SNAPSHOT_HEADER_BYTES + shards.len());
        data.extend_from_slice(&[DATA_SNAPSHOT_MAGIC, DATA_SNAPSHOT_VERSION]);
        data.extend_from_slice(&(shards.len() as u32).to_le_bytes());
        data.extend_from_slice(&shards);
        for chunk in self.sm.snapshot_writer(KV_SNAPSHOT_CHUNK_BYTES) {
            data.extend_from_slice(&chunk);
        }
        self.sm.mark_snapshot_taken();
        data.freeze()
    }

    fn restored(&self, data: &Bytes) -> Result<KvMachine, String> {
        KvMachine::restore(self.config.clone(), self.shards.group(), data)
    }
}

/// Controller entries applied between two snapshots of the controller group. Its state is a
/// few KiB per retained configuration, so snapshots are cheap; this bounds its log on disk.
pub const CONTROLLER_SNAPSHOT_ENTRIES: u64 = 1_024;

/// The controller group's configurations. One command per log entry (the controller's
/// `apply` decodes one `Command` per payload); the controller sees a few operations a second.
pub struct ControllerMachine {
    pub sm: controller::StateMachine,
    /// Applied index of the last snapshot taken or restored.
    snapshot_index: u64,
}

impl ControllerMachine {
    pub fn new(sm: controller::StateMachine) -> ControllerMachine {
        let snapshot_index = sm.applied_index();
        ControllerMachine { sm, snapshot_index }
    }
}

/// A controller read: configuration `num`, or the latest with -1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerQuery {
    pub num: i64,
}

impl Machine for ControllerMachine {
    type Command = controller::Command;
    type Read = ControllerQuery;
    type Outcome = controller::Reply;

    const BATCH_COMMANDS_MAX: usize = 1;

    fn command_size_bytes(_: &controller::Command) -> usize {
        // One command per entry: the size never cuts a batch.
        1
    }

    fn encode_batch(_now_ms: u64, commands: &[controller::Command]) -> Bytes {
        debug_assert_eq!(commands.len(), 1, "one controller command per entry");
        commands
            .first()
            .map_or_else(Bytes::new, |c| Bytes::from(c.encode()))
    }

    fn apply(&mut self, index: u64, payload: &Bytes, outcomes: &mut Vec<controller::Reply>) {
        if let Some(reply) = self.sm.apply(index, payload) {
            outcomes.push(reply);
        }
    }

    fn read(&self, query: &ControllerQuery, _stale: bool) -> controller::Reply {
        match self.sm.query(query.num) {
            Ok(config) => controller::Reply::Config(config.clone()),
            Err(e) => controller::Reply::Err(e),
        }
    }

    fn applied_index(&self) -> u64 {
        self.sm.applied_index()
    }

    fn snapshot_due(&self) -> bool {
        self.sm.applied_index() >= self.snapshot_index + CONTROLLER_SNAPSHOT_ENTRIES
    }

    fn take_snapshot(&mut self) -> Bytes {
        self.snapshot_index = self.sm.applied_index();
        Bytes::from(self.sm.snapshot())
    }

    fn restored(&self, data: &Bytes) -> Result<ControllerMachine, String> {
        let sm = controller::StateMachine::restore(self.sm.settings().clone(), data)
            .map_err(|e| e.to_string())?;
        Ok(ControllerMachine::new(sm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Command, HostSpec, Op, Reply, Settings, StateMachine};

    #[test]
    fn controller_machine_applies_one_command_per_entry_and_round_trips_its_snapshot() {
        let mut m = ControllerMachine::new(StateMachine::new(Settings::default()).unwrap());
        let join = Command {
            client_id: 7,
            seq: 1,
            op: Op::Join {
                hosts: (1..=3)
                    .map(|id| HostSpec {
                        id,
                        cores: 2,
                        addr: format!("127.0.0.1:{}", 7000 + id),
                    })
                    .collect(),
            },
        };
        let payload = ControllerMachine::encode_batch(0, std::slice::from_ref(&join));
        let mut out = Vec::new();
        m.apply(1, &Bytes::new(), &mut out);
        assert!(out.is_empty(), "a no-op has no outcome");
        m.apply(2, &payload, &mut out);
        assert_eq!(out, vec![Reply::Ok { num: 1 }]);
        assert!(!m.snapshot_due());
        let snap = m.take_snapshot();
        let back = m.restored(&snap).unwrap();
        assert_eq!(back.sm, m.sm);
        match back.read(&ControllerQuery { num: -1 }, false) {
            Reply::Config(c) => assert_eq!(c.num, 1),
            other => panic!("{other:?}"),
        }
    }
}
