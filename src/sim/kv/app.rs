//! The key-value state machine as a simulated replica's application.
//!
//! [`KvApp`] implements the simulator's [`App`] over [`kv::StateMachine`]: a committed Normal
//! entry is a kv batch payload and applying it yields one kv outcome per command, encoded with
//! [`encode_replies`] into the `Bytes` the proposer receives (the simulator's stand-in for the
//! reply a server sends its clients). Noop and configuration entries are applied as empty
//! payloads, so the kv applied index follows the Raft applied index one for one.
//!
//! The simulator's `App` values are made with `Default` (a crashed replica gets a fresh one), so
//! the per-run knobs live in the type: a [`KvProfile`] fixes the snapshot threshold and, for the
//! tests that prove the checker has teeth, whether the session check is on.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes, BytesMut};

use crate::kv::{
    self, encode_batch, Command, KvError, Op, Outcome, StateMachine, BATCH_COMMANDS_MAX,
    FIELD_BYTES_MAX,
};
use crate::raft::{Entry, EntryKind, Snapshot};
use crate::sim::App;

/// Shards of the simulated group. Few, so that snapshots hold several shard frames, and the
/// group serves them all (migration is not part of this workload).
pub const SIM_SHARD_COUNT: u16 = 4;
/// Target size of one snapshot frame: small, so that even a small state spans several frames.
const SNAPSHOT_FRAME_BYTES: usize = 512;
/// Longest error message carried in a reply; longer ones are cut (they are diagnostics only).
const REPLY_MESSAGE_BYTES_MAX: usize = 1024;

/// Compile-time knobs of a simulated kv replica.
pub trait KvProfile: 'static {
    /// Log payload bytes applied between two snapshots (`kv::Config::snapshot_log_bytes_threshold`).
    const SNAPSHOT_THRESHOLD_BYTES: u64;
    /// Whether writes go through the exactly-once session check. Only a broken-on-purpose test
    /// profile turns it off.
    const SESSION_CHECK: bool = true;
}

/// The profile of the simulator workload: a snapshot every ~1 KiB of applied log, about every
/// 20 single-command entries, so that every run compacts, installs and restores snapshots.
pub struct SimProfile;

impl KvProfile for SimProfile {
    const SNAPSHOT_THRESHOLD_BYTES: u64 = 1024;
}

/// No snapshots: restarts replay the whole log (the "persist" scenarios).
pub struct LogOnlyProfile;

impl KvProfile for LogOnlyProfile {
    const SNAPSHOT_THRESHOLD_BYTES: u64 = u64::MAX;
}

/// TEST ONLY, broken on purpose: the adapter strips the client id from every data write before
/// the state machine sees it, so a retried write is applied again. The checker must catch it.
pub struct NoSessionCheck;

impl KvProfile for NoSessionCheck {
    const SNAPSHOT_THRESHOLD_BYTES: u64 = SimProfile::SNAPSHOT_THRESHOLD_BYTES;
    const SESSION_CHECK: bool = false;
}

/// The kv configuration of every replica of a run with profile `P`.
pub fn sim_kv_config<P: KvProfile>() -> kv::Config {
    kv::Config {
        shard_count: SIM_SHARD_COUNT,
        // Sessions never expire within a run (log time is ticks * 10 ms, runs are minutes at
        // most): an expired session would turn a retry into SessionUnknown, which the clients
        // treat as a bug.
        session_ttl_ms: 24 * 3600 * 1000,
        snapshot_log_bytes_threshold: P::SNAPSHOT_THRESHOLD_BYTES,
        ..kv::Config::default()
    }
}

/// One replica's kv state machine, driven by the simulator.
pub struct KvApp<P: KvProfile = SimProfile> {
    sm: StateMachine,
    _profile: PhantomData<fn() -> P>,
}

impl<P: KvProfile> Default for KvApp<P> {
    fn default() -> Self {
        KvApp {
            sm: StateMachine::new(sim_kv_config::<P>(), 0..SIM_SHARD_COUNT),
            _profile: PhantomData,
        }
    }
}

impl<P: KvProfile> KvApp<P> {
    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }

    pub fn applied_index(&self) -> u64 {
        self.sm.applied_index()
    }

    pub fn snapshot_due(&self) -> bool {
        self.sm.snapshot_due()
    }

    pub fn mark_snapshot_taken(&mut self) {
        self.sm.mark_snapshot_taken();
    }
}

impl<P: KvProfile> App for KvApp<P> {
    fn apply(&mut self, entry: &Entry) -> Result<Bytes, String> {
        let expected = self.sm.applied_index() + 1;
        if entry.index != expected {
            return Err(format!(
                "kv apply out of order: entry {} (term {}) while {expected} is next",
                entry.index, entry.term
            ));
        }
        let payload = match entry.kind {
            EntryKind::Normal if P::SESSION_CHECK => entry.data.clone(),
            EntryKind::Normal => strip_session_ids(&entry.data),
            EntryKind::Noop | EntryKind::Conf => Bytes::new(),
        };
        let mut outcomes = Vec::new();
        self.sm.apply(entry.index, &payload, &mut outcomes);
        Ok(encode_replies(&outcomes))
    }

    fn snapshot(&self) -> Bytes {
        let mut out = BytesMut::new();
        for frame in self.sm.snapshot_writer(SNAPSHOT_FRAME_BYTES) {
            out.extend_from_slice(&frame);
        }
        out.freeze()
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let index = snapshot.meta.index;
        let sm = kv::restore(sim_kv_config::<P>(), [&snapshot.data[..]])
            .map_err(|e| format!("kv snapshot at index {index}: {e}"))?;
        if sm.applied_index() != index {
            return Err(format!(
                "kv snapshot at index {index} holds the state after index {}",
                sm.applied_index()
            ));
        }
        self.sm = sm;
        Ok(())
    }
}

/// The broken variant's rewrite: data writes lose their session (client id 0 = no duplicate
/// detection). Session ops keep theirs so that opening a session still works.
fn strip_session_ids(payload: &Bytes) -> Bytes {
    match kv::Entry::decode(payload) {
        Ok(kv::Entry::Batch {
            timestamp_ms,
            mut commands,
        }) => {
            for command in &mut commands {
                if !matches!(command.op, Op::OpenSession | Op::CloseSession) {
                    command.client_id = 0;
                }
            }
            encode_batch(timestamp_ms, &commands)
        }
        _ => payload.clone(),
    }
}

/// A client's view of one command's outcome, as carried back from the replica that applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Value(Option<Bytes>),
    Values(Vec<Option<Bytes>>),
    Int(i64),
    Bool(bool),
    Err(ReplyError),
}

/// The errors a client acts on by kind; the rest carry the state machine's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    SessionUnknown,
    SequenceTooOld,
    Other(String),
}

const TAG_OK: u8 = 1;
const TAG_VALUE_NONE: u8 = 2;
const TAG_VALUE: u8 = 3;
const TAG_VALUES: u8 = 4;
const TAG_INT: u8 = 5;
const TAG_BOOL: u8 = 6;
const TAG_ERR_SESSION_UNKNOWN: u8 = 7;
const TAG_ERR_SEQUENCE_TOO_OLD: u8 = 8;
const TAG_ERR_OTHER: u8 = 9;

/// Replies of one entry, at most one per command of a batch (an admin entry or a bad entry
/// yields one).
const REPLIES_MAX: u32 = BATCH_COMMANDS_MAX;

/// Encodes the outcomes of one applied entry:
/// `count:u32 reply*`, `reply := tag:u8 body` with values as `len:u32 bytes`.
pub fn encode_replies(outcomes: &[Outcome]) -> Bytes {
    assert!(outcomes.len() <= REPLIES_MAX as usize);
    let mut out = BytesMut::new();
    out.put_u32_le(outcomes.len() as u32);
    let put_value = |out: &mut BytesMut, value: &Option<Bytes>| match value {
        None => out.put_u8(TAG_VALUE_NONE),
        Some(v) => {
            out.put_u8(TAG_VALUE);
            out.put_u32_le(v.len() as u32);
            out.put_slice(v);
        }
    };
    for outcome in outcomes {
        match outcome {
            Outcome::Ok => out.put_u8(TAG_OK),
            Outcome::Value(v) => put_value(&mut out, v),
            Outcome::Values(values) => {
                out.put_u8(TAG_VALUES);
                out.put_u32_le(values.len() as u32);
                for v in values {
                    put_value(&mut out, v);
                }
            }
            Outcome::Int(n) => {
                out.put_u8(TAG_INT);
                out.put_i64_le(*n);
            }
            Outcome::Bool(b) => {
                out.put_u8(TAG_BOOL);
                out.put_u8(u8::from(*b));
            }
            Outcome::Err(KvError::SessionUnknown { .. }) => out.put_u8(TAG_ERR_SESSION_UNKNOWN),
            Outcome::Err(KvError::SequenceTooOld { .. }) => out.put_u8(TAG_ERR_SEQUENCE_TOO_OLD),
            Outcome::Err(error) => {
                let message = error.to_string();
                let mut cut = message.len().min(REPLY_MESSAGE_BYTES_MAX);
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.put_u8(TAG_ERR_OTHER);
                out.put_u32_le(cut as u32);
                out.put_slice(&message.as_bytes()[..cut]);
            }
        }
    }
    out.freeze()
}

/// Decodes [`encode_replies`]. Never panics: garbage is an error naming the offset.
pub fn decode_replies(buf: &Bytes) -> Result<Vec<Reply>, String> {
    let mut r = ReplyReader { buf, pos: 0 };
    let count = r.u32()?;
    if count > REPLIES_MAX {
        return Err(format!("reply count {count} exceeds {REPLIES_MAX}"));
    }
    let mut replies = Vec::with_capacity((count as usize).min(buf.len()));
    for _ in 0..count {
        let tag_offset = r.pos;
        let reply = match r.u8()? {
            TAG_OK => Reply::Ok,
            TAG_VALUE_NONE => Reply::Value(None),
            TAG_VALUE => Reply::Value(Some(r.bytes(FIELD_BYTES_MAX)?)),
            TAG_VALUES => {
                let n = r.u32()?;
                if n > kv::MULTI_KEYS_MAX {
                    return Err(format!(
                        "{n} values at offset {tag_offset} exceed {}",
                        kv::MULTI_KEYS_MAX
                    ));
                }
                let mut values = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let value_offset = r.pos;
                    values.push(match r.u8()? {
                        TAG_VALUE_NONE => None,
                        TAG_VALUE => Some(r.bytes(FIELD_BYTES_MAX)?),
                        tag => return Err(format!("bad value tag {tag} at offset {value_offset}")),
                    });
                }
                Reply::Values(values)
            }
            TAG_INT => Reply::Int(r.u64()? as i64),
            TAG_BOOL => match r.u8()? {
                0 => Reply::Bool(false),
                1 => Reply::Bool(true),
                b => return Err(format!("bad bool {b} at offset {}", r.pos - 1)),
            },
            TAG_ERR_SESSION_UNKNOWN => Reply::Err(ReplyError::SessionUnknown),
            TAG_ERR_SEQUENCE_TOO_OLD => Reply::Err(ReplyError::SequenceTooOld),
            TAG_ERR_OTHER => {
                let message = r.bytes(REPLY_MESSAGE_BYTES_MAX as u32)?;
                Reply::Err(ReplyError::Other(
                    String::from_utf8_lossy(&message).into_owned(),
                ))
            }
            tag => return Err(format!("bad reply tag {tag} at offset {tag_offset}")),
        };
        replies.push(reply);
    }
    if r.pos != buf.len() {
        return Err(format!(
            "{} trailing bytes at offset {}",
            buf.len() - r.pos,
            r.pos
        ));
    }
    Ok(replies)
}

struct ReplyReader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl ReplyReader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| format!("truncated at offset {}: need {n} bytes", self.pos))?;
        let start = self.pos;
        self.pos = end;
        Ok(&self.buf[start..end])
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self, length_max: u32) -> Result<Bytes, String> {
        let offset = self.pos;
        let len = self.u32()?;
        if len > length_max {
            return Err(format!(
                "length {len} at offset {offset} exceeds {length_max}"
            ));
        }
        let start = self.pos;
        self.take(len as usize)?;
        Ok(self.buf.slice(start..self.pos))
    }
}

/// A one-command batch, for tests and scenarios that drive the cluster directly.
pub fn single_command(timestamp_ms: u64, client_id: u64, seq: u64, op: Op) -> Bytes {
    encode_batch(timestamp_ms, &[Command { client_id, seq, op }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::SnapshotMeta;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn entry(index: u64, data: Bytes) -> Entry {
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data,
        }
    }

    #[test]
    fn sim_config_is_valid() {
        sim_kv_config::<SimProfile>().validate().unwrap();
        sim_kv_config::<NoSessionCheck>().validate().unwrap();
    }

    #[test]
    fn replies_round_trip_and_garbage_is_an_error() {
        let outcomes = vec![
            Outcome::Ok,
            Outcome::Value(None),
            Outcome::Value(Some(b("v"))),
            Outcome::Values(vec![None, Some(b(""))]),
            Outcome::Int(-3),
            Outcome::Bool(true),
            Outcome::Err(KvError::SessionUnknown { client_id: 9 }),
            Outcome::Err(KvError::SequenceTooOld {
                client_id: 9,
                seq: 1,
                seq_floor: 2,
            }),
            Outcome::Err(KvError::NotAnInteger),
        ];
        let bytes = encode_replies(&outcomes);
        let replies = decode_replies(&bytes).unwrap();
        assert_eq!(
            replies,
            vec![
                Reply::Ok,
                Reply::Value(None),
                Reply::Value(Some(b("v"))),
                Reply::Values(vec![None, Some(b(""))]),
                Reply::Int(-3),
                Reply::Bool(true),
                Reply::Err(ReplyError::SessionUnknown),
                Reply::Err(ReplyError::SequenceTooOld),
                Reply::Err(ReplyError::Other(KvError::NotAnInteger.to_string())),
            ]
        );
        for len in 0..bytes.len() {
            assert!(decode_replies(&bytes.slice(..len)).is_err(), "prefix {len}");
        }
        let mut longer = BytesMut::from(&bytes[..]);
        longer.put_u8(0);
        assert!(decode_replies(&longer.freeze()).is_err());
        let forged = Bytes::from(u32::MAX.to_le_bytes().to_vec());
        assert!(decode_replies(&forged).is_err());
    }

    #[test]
    fn apply_follows_the_raft_index_and_answers_per_command() {
        let mut app = KvApp::<SimProfile>::default();
        let noop = Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Noop,
            data: Bytes::new(),
        };
        assert_eq!(decode_replies(&app.apply(&noop).unwrap()).unwrap(), vec![]);
        let open = single_command(10, 7, 0, Op::OpenSession);
        assert_eq!(
            decode_replies(&app.apply(&entry(2, open)).unwrap()).unwrap(),
            vec![Reply::Ok]
        );
        let append = single_command(
            20,
            7,
            1,
            Op::Append {
                key: b("k"),
                value: b("ab"),
            },
        );
        let first = app.apply(&entry(3, append.clone())).unwrap();
        assert_eq!(decode_replies(&first).unwrap(), vec![Reply::Int(2)]);
        // The same (client, seq) again: the remembered answer, nothing applied.
        let again = app.apply(&entry(4, append)).unwrap();
        assert_eq!(decode_replies(&again).unwrap(), vec![Reply::Int(2)]);
        // A gap is a broken invariant.
        assert!(app.apply(&entry(9, Bytes::new())).is_err());
        assert_eq!(app.applied_index(), 4);
    }

    #[test]
    fn without_the_session_check_a_retry_is_applied_twice() {
        let mut app = KvApp::<NoSessionCheck>::default();
        let open = single_command(10, 7, 0, Op::OpenSession);
        app.apply(&entry(1, open)).unwrap();
        let append = single_command(
            20,
            7,
            1,
            Op::Append {
                key: b("k"),
                value: b("ab"),
            },
        );
        app.apply(&entry(2, append.clone())).unwrap();
        let again = app.apply(&entry(3, append)).unwrap();
        assert_eq!(decode_replies(&again).unwrap(), vec![Reply::Int(4)]);
    }

    #[test]
    fn snapshot_restores_the_same_state_and_checks_its_index() {
        let mut app = KvApp::<SimProfile>::default();
        app.apply(&entry(1, single_command(1, 5, 0, Op::OpenSession)))
            .unwrap();
        for i in 2..40u64 {
            let op = Op::Put {
                key: Bytes::from(format!("k{}", i % 5)),
                value: Bytes::from(format!("v{i}")),
            };
            app.apply(&entry(i, single_command(i, 5, i, op))).unwrap();
        }
        let data = app.snapshot();
        let meta = |index| SnapshotMeta {
            index,
            term: 1,
            conf: Default::default(),
        };
        let mut restored = KvApp::<SimProfile>::default();
        restored
            .restore(&Snapshot {
                meta: meta(39),
                data: data.clone(),
            })
            .unwrap();
        assert_eq!(
            restored.state_machine().state_hash(),
            app.state_machine().state_hash()
        );
        let mut wrong = KvApp::<SimProfile>::default();
        assert!(wrong
            .restore(&Snapshot {
                meta: meta(38),
                data: data.clone(),
            })
            .is_err());
        assert!(wrong
            .restore(&Snapshot {
                meta: meta(39),
                data: data.slice(..data.len() - 1),
            })
            .is_err());
    }
}
