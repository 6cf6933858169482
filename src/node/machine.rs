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

use crate::controller;
use crate::kv::{self, ReadConsistency};

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

/// A data group's KV store.
pub struct KvMachine {
    pub sm: kv::StateMachine,
    pub config: kv::Config,
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
                Op::Put { key, value } | Op::Append { key, value } => key.len() + value.len(),
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
        self.sm.apply(index, payload, outcomes);
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
        let mut data = BytesMut::new();
        for chunk in self.sm.snapshot_writer(KV_SNAPSHOT_CHUNK_BYTES) {
            data.extend_from_slice(&chunk);
        }
        self.sm.mark_snapshot_taken();
        data.freeze()
    }

    fn restored(&self, data: &Bytes) -> Result<KvMachine, String> {
        let sm = kv::restore(self.config.clone(), [data.clone()]).map_err(|e| e.to_string())?;
        Ok(KvMachine {
            sm,
            config: self.config.clone(),
        })
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
