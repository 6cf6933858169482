//! One replica of a data group: the kv state machine and the group's migration state
//! ([`GroupShards`]) behind one Raft log.
//!
//! Committed entries that start with [`MIGRATION_TAG`] go to [`GroupShards::apply`] (which
//! also advances the kv applied index); every other Normal entry is a kv batch; no-op and
//! membership entries apply as empty kv payloads. So the kv applied index follows the Raft
//! applied index one for one, and both halves of the state are a function of the log.
//!
//! The snapshot holds both halves, versioned and bounded:
//! `magic:u8 ('S') version:u8 shards_len:u32 shards:GroupShards::encode kv:snapshot frames`.
//! A restore that does not decode, or whose halves disagree (applied indexes, group id, shard
//! phases against kv shard states), is an error value naming the index.

use bytes::{BufMut, Bytes, BytesMut};

use crate::controller::GroupId;
use crate::kv::{self, KvError, Op, Outcome, ReadConsistency, ShardState, StateMachine as Kv};
use crate::raft::{Entry, EntryKind, Snapshot};
use crate::shard::migration::{is_migration_entry, ApplyOutcome, GroupShards};
use crate::sim::kv::{decode_replies, encode_replies, Reply};
use crate::sim::App;

const SNAPSHOT_MAGIC: u8 = b'S';
const SNAPSHOT_VERSION: u8 = 1;
/// Bound on the migration half of a snapshot (two configurations and the shard phases).
const SHARDS_SNAPSHOT_BYTES_MAX: usize = 16 << 20;
/// Target size of one kv snapshot frame: small, so a small state spans several frames.
const SNAPSHOT_FRAME_BYTES: usize = 512;

/// TEST ONLY deliberate bugs, which the simulator's checks must catch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Breakage {
    #[default]
    None,
    /// The old owner keeps accepting writes for a shard after `AcceptConfig` froze it
    /// (Exporting): writes after the pull are lost, and two groups accept writes at one epoch.
    OldOwnerWritesAfterFreeze,
    /// The new owner answers reads of a shard it is still importing (before `Install`), from
    /// its empty copy.
    ServeBeforeInstall,
}

/// How the proposer of an entry learns what applying it did (the first byte of the result).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultClass {
    /// kv replies follow ([`encode_replies`]).
    Kv,
    /// The first command was refused: the shard is not held here (`-MOVED`).
    WrongShard,
    /// The first command was refused: the shard is migrating here (`-TRYAGAIN` / `-ASK`).
    NotServing,
    MigrationApplied,
    MigrationStale,
}

impl ResultClass {
    fn code(self) -> u8 {
        match self {
            ResultClass::Kv => 0,
            ResultClass::WrongShard => 1,
            ResultClass::NotServing => 2,
            ResultClass::MigrationApplied => 3,
            ResultClass::MigrationStale => 4,
        }
    }

    fn from_code(code: u8) -> Option<ResultClass> {
        Some(match code {
            0 => ResultClass::Kv,
            1 => ResultClass::WrongShard,
            2 => ResultClass::NotServing,
            3 => ResultClass::MigrationApplied,
            4 => ResultClass::MigrationStale,
            _ => return None,
        })
    }
}

/// Decodes an entry's result: its class and the kv replies (empty for migration entries).
pub fn decode_result(result: &Bytes) -> Result<(ResultClass, Vec<Reply>), String> {
    let code = *result.first().ok_or("empty result")?;
    let class = ResultClass::from_code(code).ok_or(format!("unknown result class {code}"))?;
    let replies = match class {
        ResultClass::MigrationApplied | ResultClass::MigrationStale => Vec::new(),
        _ => decode_replies(&result.slice(1..))?,
    };
    Ok((class, replies))
}

/// What a linearizable read served by a replica answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAnswer {
    Value(Option<Bytes>),
    WrongShard,
    NotServing,
}

/// One replica of a data group.
#[derive(Clone, Debug)]
pub struct ShardApp {
    kv_config: kv::Config,
    kv: Kv,
    shards: GroupShards,
    breakage: Breakage,
}

impl ShardApp {
    /// An empty replica of `group`: it holds nothing until its first configuration applies.
    pub fn new(group: GroupId, kv_config: kv::Config, breakage: Breakage) -> ShardApp {
        ShardApp {
            kv: Kv::new(kv_config.clone(), []),
            kv_config,
            shards: GroupShards::new(group),
            breakage,
        }
    }

    pub fn kv(&self) -> &Kv {
        &self.kv
    }

    pub fn shards(&self) -> &GroupShards {
        &self.shards
    }

    pub fn applied_index(&self) -> u64 {
        self.kv.applied_index()
    }

    pub fn snapshot_due(&self) -> bool {
        self.kv.snapshot_due()
    }

    pub fn mark_snapshot_taken(&mut self) {
        self.kv.mark_snapshot_taken();
    }

    /// Whether a write of `shard` applied now would change the state: the epoch invariant
    /// ("never two groups accept writes for one shard in one configuration") is checked on it.
    pub fn accepts_writes(&self, shard: u16) -> bool {
        match self.kv.shard_state(shard) {
            Some(ShardState::Serving) => true,
            Some(ShardState::Exporting) => self.breakage == Breakage::OldOwnerWritesAfterFreeze,
            _ => false,
        }
    }

    /// Serves a linearizable read of `key` (the caller confirmed leadership and waited for
    /// apply to reach the read index).
    pub fn read(&self, key: &Bytes) -> ReadAnswer {
        let shard = self.kv.shard_of(key);
        if self.breakage == Breakage::ServeBeforeInstall
            && self.kv.shard_state(shard) == Some(ShardState::Importing)
        {
            return ReadAnswer::Value(None);
        }
        match self
            .kv
            .read(&Op::Get { key: key.clone() }, ReadConsistency::Linearizable)
        {
            Outcome::Value(v) => ReadAnswer::Value(v),
            Outcome::Err(KvError::WrongShard { .. }) => ReadAnswer::WrongShard,
            _ => ReadAnswer::NotServing,
        }
    }

    /// Keys held over every shard (what deleting a shard frees).
    pub fn key_count(&self) -> usize {
        self.kv.shards().map(|(s, _)| self.kv.key_count(s)).sum()
    }

    fn apply_kv(&mut self, index: u64, payload: &Bytes) -> Bytes {
        let mut outcomes = Vec::new();
        let thawed: Vec<u16> = if self.breakage == Breakage::OldOwnerWritesAfterFreeze {
            self.kv
                .shards()
                .filter(|&(_, state)| state == ShardState::Exporting)
                .map(|(s, _)| s)
                .collect()
        } else {
            Vec::new()
        };
        for &s in &thawed {
            // The broken variant: frozen shards take writes as if still Serving.
            self.kv.force_shard_state(s, ShardState::Serving);
        }
        self.kv.apply(index, payload, &mut outcomes);
        for &s in &thawed {
            self.kv.force_shard_state(s, ShardState::Exporting);
        }
        let class = match outcomes.first() {
            Some(Outcome::Err(KvError::WrongShard { .. })) => ResultClass::WrongShard,
            Some(Outcome::Err(KvError::ShardNotServing { .. })) => ResultClass::NotServing,
            _ => ResultClass::Kv,
        };
        let replies = encode_replies(&outcomes);
        let mut out = BytesMut::with_capacity(1 + replies.len());
        out.put_u8(class.code());
        out.put_slice(&replies);
        out.freeze()
    }
}

impl App for ShardApp {
    fn apply(&mut self, entry: &Entry) -> Result<Bytes, String> {
        let group = self.shards.group();
        let expected = self.kv.applied_index() + 1;
        if entry.index != expected {
            return Err(format!(
                "group {group}: apply out of order: entry {} while {expected} is next",
                entry.index
            ));
        }
        let result = match entry.kind {
            EntryKind::Normal if is_migration_entry(&entry.data) => {
                let class = match self.shards.apply(&mut self.kv, entry.index, &entry.data) {
                    ApplyOutcome::Applied => ResultClass::MigrationApplied,
                    ApplyOutcome::Stale { .. } => ResultClass::MigrationStale,
                    // The runtime only proposes entries that follow from the log and the
                    // controller: a refusal is a bug in the protocol or its driver.
                    ApplyOutcome::Refused(e) => {
                        return Err(format!(
                            "group {group}: migration entry {} refused: {e}",
                            entry.index
                        ))
                    }
                };
                Bytes::from(vec![class.code()])
            }
            EntryKind::Normal => self.apply_kv(entry.index, &entry.data),
            EntryKind::Noop | EntryKind::Conf => self.apply_kv(entry.index, &Bytes::new()),
        };
        Ok(result)
    }

    fn snapshot(&self) -> Bytes {
        let shards = self.shards.encode();
        assert!(
            shards.len() <= SHARDS_SNAPSHOT_BYTES_MAX,
            "migration state of {} bytes",
            shards.len()
        );
        let mut out = BytesMut::with_capacity(6 + shards.len());
        out.put_u8(SNAPSHOT_MAGIC);
        out.put_u8(SNAPSHOT_VERSION);
        out.put_u32_le(shards.len() as u32);
        out.put_slice(&shards);
        for frame in self.kv.snapshot_writer(SNAPSHOT_FRAME_BYTES) {
            out.put_slice(&frame);
        }
        out.freeze()
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let index = snapshot.meta.index;
        let group = self.shards.group();
        let data = &snapshot.data;
        let fail = |what: String| format!("group {group} snapshot at index {index}: {what}");
        if data.len() < 6 || data[0] != SNAPSHOT_MAGIC || data[1] != SNAPSHOT_VERSION {
            return Err(fail(format!("bad header {:?}", &data[..data.len().min(6)])));
        }
        let shards_len = u32::from_le_bytes([data[2], data[3], data[4], data[5]]) as usize;
        if shards_len > SHARDS_SNAPSHOT_BYTES_MAX || 6 + shards_len > data.len() {
            return Err(fail(format!(
                "migration state of {shards_len} bytes in a snapshot of {}",
                data.len()
            )));
        }
        let shards = GroupShards::decode(&data[6..6 + shards_len])
            .map_err(|e| fail(format!("migration state: {e}")))?;
        let kv = kv::restore(self.kv_config.clone(), [&data[6 + shards_len..]])
            .map_err(|e| fail(format!("kv state: {e}")))?;
        if shards.group() != group {
            return Err(fail(format!("holds group {}", shards.group())));
        }
        if kv.applied_index() != index || shards.applied_index() > index {
            return Err(fail(format!(
                "kv applied {} and migration applied {}",
                kv.applied_index(),
                shards.applied_index()
            )));
        }
        shards.check_against(&kv).map_err(fail)?;
        self.kv = kv;
        self.shards = shards;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Command, HostSpec, Op as CtlOp, Reply as CtlReply, Settings};
    use crate::kv::{encode_batch, Command as KvCommand};
    use crate::raft::SnapshotMeta;
    use crate::shard::migration::MigrationEntry;

    fn kv_config() -> kv::Config {
        kv::Config {
            shard_count: 4,
            ..kv::Config::default()
        }
    }

    fn entry(index: u64, data: Bytes) -> Entry {
        Entry {
            term: 1,
            index,
            kind: EntryKind::Normal,
            data,
        }
    }

    fn snapshot_of(app: &ShardApp) -> Snapshot {
        Snapshot {
            meta: SnapshotMeta {
                index: app.applied_index(),
                ..SnapshotMeta::default()
            },
            data: app.snapshot(),
        }
    }

    /// A replica of group 1 that accepted configuration 1 (every shard) and took one put.
    fn serving_replica() -> ShardApp {
        let mut ctl = crate::controller::StateMachine::new(Settings {
            shard_count: 4,
            replication: 1,
            ..Settings::default()
        })
        .unwrap();
        let join = Command {
            client_id: 0,
            seq: 0,
            op: CtlOp::Join {
                hosts: vec![HostSpec {
                    id: 1,
                    cores: 1,
                    addr: "h1:1".into(),
                }],
            },
        };
        assert_eq!(ctl.apply(1, &join.encode()), Some(CtlReply::Ok { num: 1 }));
        let mut app = ShardApp::new(1, kv_config(), Breakage::None);
        let accept = MigrationEntry::AcceptConfig {
            previous: ctl.query(0).unwrap().clone(),
            config: ctl.query(1).unwrap().clone(),
        };
        let r = app.apply(&entry(1, accept.encode())).unwrap();
        assert_eq!(decode_result(&r).unwrap().0, ResultClass::MigrationApplied);
        let put = encode_batch(
            1,
            &[KvCommand {
                client_id: 0,
                seq: 0,
                op: Op::Put {
                    key: Bytes::from_static(b"k"),
                    value: Bytes::from_static(b"v"),
                },
            }],
        );
        let r = app.apply(&entry(2, put)).unwrap();
        assert_eq!(decode_result(&r).unwrap().0, ResultClass::Kv);
        app
    }

    #[test]
    fn snapshot_restores_both_halves() {
        let app = serving_replica();
        let mut restored = ShardApp::new(1, kv_config(), Breakage::None);
        restored.restore(&snapshot_of(&app)).unwrap();
        assert_eq!(restored.kv().state_hash(), app.kv().state_hash());
        assert_eq!(restored.shards(), app.shards());
        assert_eq!(
            restored.read(&Bytes::from_static(b"k")),
            ReadAnswer::Value(Some(Bytes::from_static(b"v")))
        );
    }

    #[test]
    fn corrupt_or_foreign_snapshots_are_errors() {
        let app = serving_replica();
        let good = snapshot_of(&app);
        // Another group's replica must not take this group's state.
        let mut other = ShardApp::new(2, kv_config(), Breakage::None);
        let e = other.restore(&good).unwrap_err();
        assert!(e.contains("holds group 1"), "{e}");
        for cut in [0, 3, 6, 10, good.data.len() - 1] {
            let mut bad = good.clone();
            bad.data = good.data.slice(..cut);
            let mut fresh = ShardApp::new(1, kv_config(), Breakage::None);
            assert!(fresh.restore(&bad).is_err(), "cut at {cut}");
        }
        let mut flipped = good.data.to_vec();
        let last = flipped.len() - 3;
        flipped[last] ^= 0xff;
        let mut bad = good.clone();
        bad.data = Bytes::from(flipped);
        let mut fresh = ShardApp::new(1, kv_config(), Breakage::None);
        assert!(fresh.restore(&bad).is_err());
    }

    #[test]
    fn out_of_order_apply_is_an_error() {
        let mut app = ShardApp::new(1, kv_config(), Breakage::None);
        assert!(app.apply(&entry(2, Bytes::new())).is_err());
    }

    #[test]
    fn writes_to_an_unheld_shard_are_classified_wrong_shard() {
        let mut app = ShardApp::new(1, kv_config(), Breakage::None);
        let put = encode_batch(
            1,
            &[KvCommand {
                client_id: 0,
                seq: 0,
                op: Op::Put {
                    key: Bytes::from_static(b"k"),
                    value: Bytes::from_static(b"v"),
                },
            }],
        );
        let r = app.apply(&entry(1, put)).unwrap();
        assert_eq!(decode_result(&r).unwrap().0, ResultClass::WrongShard);
        assert!(!app.accepts_writes(0));
    }
}
