//! Shard migration: how one group follows the controller's configurations, one number at a
//! time, and hands shards to other groups. A pure state machine driven by the group's own log.
//!
//! Every replica of a group applies the same entries in the same order, so they agree on which
//! client writes came before a configuration change and which after. The entries (all carried
//! in the group's Raft log next to the KV batches):
//!
//! 1. `AcceptConfig { previous, config }`: the group moves from configuration n-1 to n.
//!    Shards it keeps go on serving without a pause. A shard it gains from nobody (the first
//!    configuration) is created empty and served at once. A shard it gains from group G becomes
//!    Importing (not served: `-TRYAGAIN`). A shard it loses to group H becomes Exporting: frozen
//!    in the KV state (no writes from this log position on; a client is sent to H with `-ASK`).
//! 2. `Install { n, shard, blob }`: the new owner pulled the frozen shard (data and the
//!    session entries exactly-once needs) from the old owner and logs it; once applied the
//!    shard is served (Confirming: served, but the old owner is not yet told to delete).
//! 3. `DeleteExported { n, shard }`: the old owner, asked by the new owner to confirm, deletes
//!    its frozen copy (garbage collection).
//! 4. `ConfirmDone { n, shard }`: the new owner learnt the old copy is gone; the shard is
//!    plainly Serving.
//!
//! Why this is safe ("never two groups accept writes for one shard"): the old owner stops
//! accepting writes for a shard at the log position of `AcceptConfig n`, before it hands out
//! anything; it answers a pull only once it has applied configuration n (`handle_pull` says
//! NotYet before), so the blob is the frozen, final state; the new owner accepts writes only
//! after applying the `Install` of that blob. A group accepts configuration n+1 only when no
//! shard of n is in flight (no Importing, Confirming or Exporting shard), so a shard never
//! starts a second move before its first one finished, and an old owner can never have moved
//! past configuration n while a new owner still needs its copy from n.
//!
//! Why it survives crashes at any step: every transition is a log entry, and the state is a
//! function of the log (and of snapshots taken of it, [`GroupShards::encode`]). Requests between
//! groups (pull, confirm) are idempotent and retried by the runtime until the log says they are
//! done; duplicate entries (a retried Install, a second DeleteExported) apply as `Stale` and
//! change nothing.
//!
//! What the runtime does with it, each loop turn on the group's leader:
//! - if [`GroupShards::next_config_wanted`] is Some(n), fetch configuration n (and n-1) from
//!   the controller and propose [`MigrationEntry::AcceptConfig`];
//! - for each of [`GroupShards::pulls`], ask the old owner's leader (slots from
//!   [`GroupShards::previous`]) with `handle_pull`, and propose an `Install` with the blob;
//! - for each of [`GroupShards::confirms`], ask the old owner with `handle_confirm`; on Done
//!   propose `ConfirmDone`;
//! - route each client request with [`GroupShards::route`];
//! - a group that a configuration no longer lists stops once [`GroupShards::is_drained`].
//!
//! Entries from this module start with [`MIGRATION_TAG`], a byte no KV entry starts with
//! ([`is_migration_entry`]): the runtime hands those to [`GroupShards::apply`], which also
//! advances the KV state machine's applied index.

use std::collections::BTreeMap;

use bytes::Bytes;
use thiserror::Error;

use crate::controller::codec::{
    put_bytes32, put_count, put_u16, put_u64, put_u8, DecodeError, Reader,
};
use crate::controller::{Configuration, GroupId, GROUP_NONE};
use crate::kv::{
    shard_blob_shard, ShardState, StateMachine as Kv, FORMAT_VERSION as KV_FORMAT_VERSION,
};

/// First byte of every migration entry. KV entries start with their format version.
pub const MIGRATION_TAG: u8 = 0xC7;
const _: () = assert!(MIGRATION_TAG != KV_FORMAT_VERSION);
/// Encoding version of migration entries and of the [`GroupShards`] snapshot.
pub const MIGRATION_FORMAT_VERSION: u8 = 1;
/// Bound on one shard blob in an Install entry.
pub const BLOB_BYTES_MAX: usize = 1 << 30;

const KIND_ACCEPT: u8 = 1;
const KIND_INSTALL: u8 = 2;
const KIND_DELETE: u8 = 3;
const KIND_CONFIRM_DONE: u8 = 4;

/// Whether a group log payload is a migration entry (else it is the KV state machine's).
pub fn is_migration_entry(payload: &[u8]) -> bool {
    payload.first() == Some(&MIGRATION_TAG)
}

/// Where one shard is in its life at this group, under the current configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Held and served.
    Serving,
    /// Owned in the current configuration; waiting for the data from `from`.
    Importing { from: GroupId },
    /// Installed and served; `from` has not yet confirmed it deleted its copy.
    Confirming { from: GroupId },
    /// Lost to `to` in the current configuration; frozen until `to` confirms it has the data.
    Exporting { to: GroupId },
}

impl Phase {
    /// The KV state a shard in this phase must have.
    pub fn kv_state(self) -> ShardState {
        match self {
            Phase::Serving | Phase::Confirming { .. } => ShardState::Serving,
            Phase::Importing { .. } => ShardState::Importing,
            Phase::Exporting { .. } => ShardState::Exporting,
        }
    }

    fn code(self) -> (u8, GroupId) {
        match self {
            Phase::Serving => (1, GROUP_NONE),
            Phase::Importing { from } => (2, from),
            Phase::Confirming { from } => (3, from),
            Phase::Exporting { to } => (4, to),
        }
    }

    fn from_code(code: u8, group: GroupId) -> Option<Phase> {
        match code {
            1 => Some(Phase::Serving),
            2 => Some(Phase::Importing { from: group }),
            3 => Some(Phase::Confirming { from: group }),
            4 => Some(Phase::Exporting { to: group }),
            _ => None,
        }
    }
}

/// A group log entry of the migration protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationEntry {
    /// Move from configuration `previous` (n-1) to `config` (n).
    AcceptConfig {
        previous: Configuration,
        config: Configuration,
    },
    /// The pulled blob of `shard` as of configuration `config_num`.
    Install {
        config_num: u64,
        shard: u16,
        blob: Bytes,
    },
    /// The new owner has `shard` of `config_num`: drop the frozen copy.
    DeleteExported { config_num: u64, shard: u16 },
    /// The old owner dropped its copy of `shard` of `config_num`.
    ConfirmDone { config_num: u64, shard: u16 },
}

impl MigrationEntry {
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(32);
        put_u8(&mut out, MIGRATION_TAG);
        put_u8(&mut out, MIGRATION_FORMAT_VERSION);
        match self {
            MigrationEntry::AcceptConfig { previous, config } => {
                put_u8(&mut out, KIND_ACCEPT);
                previous.encode(&mut out);
                config.encode(&mut out);
            }
            MigrationEntry::Install {
                config_num,
                shard,
                blob,
            } => {
                assert!(blob.len() <= BLOB_BYTES_MAX, "blob of {} bytes", blob.len());
                put_u8(&mut out, KIND_INSTALL);
                put_u64(&mut out, *config_num);
                put_u16(&mut out, *shard);
                put_bytes32(&mut out, blob);
            }
            MigrationEntry::DeleteExported { config_num, shard } => {
                put_u8(&mut out, KIND_DELETE);
                put_u64(&mut out, *config_num);
                put_u16(&mut out, *shard);
            }
            MigrationEntry::ConfirmDone { config_num, shard } => {
                put_u8(&mut out, KIND_CONFIRM_DONE);
                put_u64(&mut out, *config_num);
                put_u16(&mut out, *shard);
            }
        }
        Bytes::from(out)
    }

    /// Decodes an entry; never panics. The blob of an Install is a slice of `payload` (no copy).
    pub fn decode(payload: &Bytes) -> Result<MigrationEntry, DecodeError> {
        let mut r = Reader::new(payload);
        let tag = r.u8()?;
        if tag != MIGRATION_TAG {
            return Err(DecodeError::Unknown {
                offset: 0,
                what: "migration tag",
                value: u64::from(tag),
            });
        }
        let version = r.u8()?;
        if version != MIGRATION_FORMAT_VERSION {
            return Err(DecodeError::Unknown {
                offset: 1,
                what: "migration version",
                value: u64::from(version),
            });
        }
        let entry = match r.u8()? {
            KIND_ACCEPT => MigrationEntry::AcceptConfig {
                previous: Configuration::read(&mut r)?,
                config: Configuration::read(&mut r)?,
            },
            KIND_INSTALL => {
                let config_num = r.u64()?;
                let shard = r.u16()?;
                let blob = r.bytes32("blob byte", BLOB_BYTES_MAX)?;
                let end = r.offset();
                MigrationEntry::Install {
                    config_num,
                    shard,
                    blob: payload.slice(end - blob.len()..end),
                }
            }
            KIND_DELETE => MigrationEntry::DeleteExported {
                config_num: r.u64()?,
                shard: r.u16()?,
            },
            KIND_CONFIRM_DONE => MigrationEntry::ConfirmDone {
                config_num: r.u64()?,
                shard: r.u16()?,
            },
            kind => {
                return Err(DecodeError::Unknown {
                    offset: 2,
                    what: "migration entry kind",
                    value: u64::from(kind),
                })
            }
        };
        r.finish()?;
        Ok(entry)
    }
}

/// What applying an entry did. Every replica computes the same one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied,
    /// A duplicate or out-of-date entry (a retried Install, a second DeleteExported, a
    /// configuration already accepted): nothing changed. Normal after retries and leader changes.
    Stale {
        reason: String,
    },
    /// A malformed entry or one that contradicts the state (a blob of another shard, a
    /// configuration that does not follow the current one): nothing changed.
    Refused(MigrationError),
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum MigrationError {
    #[error("entry {index} does not decode: {reason}")]
    Decode { index: u64, reason: DecodeError },
    #[error("group {group}: configuration {num} cannot follow {current} ({reason})")]
    ConfigOutOfOrder {
        group: GroupId,
        num: u64,
        current: u64,
        reason: &'static str,
    },
    #[error("group {group}: configuration {num} has {got} shards, the group holds {want}")]
    ShardCountChanged {
        group: GroupId,
        num: u64,
        got: u16,
        want: u16,
    },
    #[error("group {group}: the blob installed as shard {shard} holds shard {blob_shard:?}")]
    BlobShardMismatch {
        group: GroupId,
        shard: u16,
        blob_shard: Option<u16>,
    },
    #[error("group {group}: kv refused {what} of shard {shard}: {reason}")]
    Kv {
        group: GroupId,
        shard: u16,
        what: &'static str,
        reason: String,
    },
}

/// A shard this group must fetch: `shard` of configuration `config_num` from group `from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pull {
    pub shard: u16,
    pub from: GroupId,
    pub config_num: u64,
}

/// A shard whose old owner `from` must be told to delete its copy of `config_num`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confirm {
    pub shard: u16,
    pub from: GroupId,
    pub config_num: u64,
}

/// The old owner's answer to a pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullReply {
    /// The frozen shard as of the asked configuration.
    Blob(Bytes),
    /// This group has not applied the asked configuration yet: retry later.
    NotYet { config_num: u64 },
    /// This group no longer holds the shard for that configuration: the asker already
    /// installed and confirmed it (its request is a stale duplicate).
    Gone,
}

/// The old owner's answer to a confirmation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfirmReply {
    /// Propose this entry (a DeleteExported); ask again after it applied.
    Propose(Bytes),
    /// The copy is deleted: the asker may log ConfirmDone.
    Done,
    /// This group has not applied the asked configuration yet.
    NotYet { config_num: u64 },
}

/// Where a client request for a shard goes, at this group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Served here.
    Serve,
    /// Arriving here; not served yet (`-TRYAGAIN`).
    TryAgain,
    /// Frozen here, moving to `group` (`-ASK`).
    Ask { group: GroupId },
    /// Not held here; `group` owns it in this group's current configuration (`-MOVED`).
    Moved { group: GroupId },
}

/// The migration state of one group (one replica's copy; all replicas hold the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupShards {
    group: GroupId,
    /// The current configuration (n) and the one before it (n-1, whose owners are the sources
    /// of the shards being imported). None before the first configuration that names the group.
    config: Option<Configuration>,
    previous: Option<Configuration>,
    shards: BTreeMap<u16, Phase>,
    applied_index: u64,
}

impl GroupShards {
    /// A group's state before it applied anything: it holds nothing.
    pub fn new(group: GroupId) -> GroupShards {
        assert_ne!(group, GROUP_NONE, "group 0 is reserved");
        GroupShards {
            group,
            config: None,
            previous: None,
            shards: BTreeMap::new(),
            applied_index: 0,
        }
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The number of the current configuration (0 before the first).
    pub fn config_num(&self) -> u64 {
        self.config.as_ref().map_or(0, |c| c.num)
    }

    pub fn config(&self) -> Option<&Configuration> {
        self.config.as_ref()
    }

    pub fn previous(&self) -> Option<&Configuration> {
        self.previous.as_ref()
    }

    pub fn phase(&self, shard: u16) -> Option<Phase> {
        self.shards.get(&shard).copied()
    }

    /// Shards held, with their phase, in shard order.
    pub fn shards(&self) -> impl Iterator<Item = (u16, Phase)> + '_ {
        self.shards.iter().map(|(&s, &p)| (s, p))
    }

    /// Whether the current configuration no longer lists this group.
    pub fn is_retired(&self) -> bool {
        self.config
            .as_ref()
            .is_some_and(|c| !c.groups.contains_key(&self.group))
    }

    /// A retired group that handed over every shard: its replicas may stop.
    pub fn is_drained(&self) -> bool {
        self.is_retired() && self.shards.is_empty()
    }

    fn in_flight(&self) -> bool {
        self.shards.values().any(|&p| p != Phase::Serving)
    }

    /// The configuration to accept next, when the group may move on: none is in flight and the
    /// group is not retired. Before the first configuration, the one that created the group
    /// (the runtime knows it from the configuration that bootstrapped the group's replicas).
    pub fn next_config_wanted(&self) -> Option<u64> {
        match &self.config {
            None => None,
            Some(_) if self.in_flight() || self.is_retired() => None,
            Some(c) => Some(c.num + 1),
        }
    }

    /// Shards to fetch, in shard order.
    pub fn pulls(&self) -> Vec<Pull> {
        let config_num = self.config_num();
        self.shards
            .iter()
            .filter_map(|(&shard, &p)| match p {
                Phase::Importing { from } => Some(Pull {
                    shard,
                    from,
                    config_num,
                }),
                _ => None,
            })
            .collect()
    }

    /// Old owners to tell that a shard arrived, in shard order.
    pub fn confirms(&self) -> Vec<Confirm> {
        let config_num = self.config_num();
        self.shards
            .iter()
            .filter_map(|(&shard, &p)| match p {
                Phase::Confirming { from } => Some(Confirm {
                    shard,
                    from,
                    config_num,
                }),
                _ => None,
            })
            .collect()
    }

    /// Where a request for `shard` goes.
    pub fn route(&self, shard: u16) -> Route {
        match self.shards.get(&shard) {
            Some(Phase::Serving | Phase::Confirming { .. }) => Route::Serve,
            Some(Phase::Importing { .. }) => Route::TryAgain,
            Some(&Phase::Exporting { to }) => Route::Ask { group: to },
            None => Route::Moved {
                group: self
                    .config
                    .as_ref()
                    .and_then(|c| c.owner(shard))
                    .unwrap_or(GROUP_NONE),
            },
        }
    }

    /// The old owner's side of a pull of `shard` as of `config_num`.
    pub fn handle_pull(&self, kv: &Kv, shard: u16, config_num: u64) -> PullReply {
        let num = self.config_num();
        if num < config_num {
            return PullReply::NotYet { config_num: num };
        }
        match self.shards.get(&shard) {
            Some(Phase::Exporting { .. }) if num == config_num => match kv.export_shard(shard) {
                Ok(blob) => PullReply::Blob(blob),
                // The phase says Exporting, so kv must agree: a broken invariant.
                Err(e) => panic!(
                    "group {}: shard {shard} is exporting but kv refuses the export: {e}",
                    self.group
                ),
            },
            _ => PullReply::Gone,
        }
    }

    /// The old owner's side of a confirmation that `shard` of `config_num` arrived.
    pub fn handle_confirm(&self, shard: u16, config_num: u64) -> ConfirmReply {
        let num = self.config_num();
        if num < config_num {
            return ConfirmReply::NotYet { config_num: num };
        }
        match self.shards.get(&shard) {
            Some(Phase::Exporting { .. }) if num == config_num => {
                ConfirmReply::Propose(MigrationEntry::DeleteExported { config_num, shard }.encode())
            }
            _ => ConfirmReply::Done,
        }
    }

    /// Whether an AcceptConfig of `config` after `previous` would apply now (the runtime checks
    /// before proposing, so it does not fill the log with entries that apply as Stale).
    pub fn can_accept(&self, previous: &Configuration, config: &Configuration) -> bool {
        self.check_accept(previous, config).is_ok()
    }

    fn check_accept(
        &self,
        previous: &Configuration,
        config: &Configuration,
    ) -> Result<(), ApplyOutcome> {
        let refuse = |reason: &'static str| {
            Err(ApplyOutcome::Refused(MigrationError::ConfigOutOfOrder {
                group: self.group,
                num: config.num,
                current: self.config_num(),
                reason,
            }))
        };
        if previous.num + 1 != config.num {
            return refuse("previous is not the configuration before it");
        }
        if previous.shard_count() != config.shard_count() {
            return Err(ApplyOutcome::Refused(MigrationError::ShardCountChanged {
                group: self.group,
                num: config.num,
                got: config.shard_count(),
                want: previous.shard_count(),
            }));
        }
        match &self.config {
            None => {
                let created_here = config
                    .groups
                    .get(&self.group)
                    .is_some_and(|g| g.created_in == config.num);
                if !created_here || previous.groups.contains_key(&self.group) {
                    return refuse("a new group starts at the configuration that created it");
                }
            }
            Some(current) => {
                if config.num <= current.num {
                    return Err(ApplyOutcome::Stale {
                        reason: format!("configuration {} already accepted", config.num),
                    });
                }
                if config.num != current.num + 1 {
                    return refuse("configurations are accepted one number at a time");
                }
                if previous != current {
                    return refuse("previous differs from the current configuration");
                }
                if self.in_flight() {
                    return Err(ApplyOutcome::Stale {
                        reason: format!("configuration {} has shards in flight", current.num),
                    });
                }
                if self.is_retired() {
                    return Err(ApplyOutcome::Stale {
                        reason: "the group is retired".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Applies the committed migration entry at `index` to this state and to the group's KV
    /// state machine (whose applied index it also advances). Never panics on bad bytes.
    pub fn apply(&mut self, kv: &mut Kv, index: u64, payload: &Bytes) -> ApplyOutcome {
        assert!(
            index > self.applied_index,
            "group {}: apply index {index} after {}",
            self.group,
            self.applied_index
        );
        self.applied_index = index;
        // An empty payload is a no-op for kv: it only advances kv's applied index.
        kv.apply(index, &Bytes::new(), &mut Vec::new());
        let entry = match MigrationEntry::decode(payload) {
            Ok(entry) => entry,
            Err(reason) => return ApplyOutcome::Refused(MigrationError::Decode { index, reason }),
        };
        let outcome = match entry {
            MigrationEntry::AcceptConfig { previous, config } => {
                self.apply_accept(kv, previous, config)
            }
            MigrationEntry::Install {
                config_num,
                shard,
                blob,
            } => self.apply_install(kv, config_num, shard, &blob),
            MigrationEntry::DeleteExported { config_num, shard } => {
                match self.expect_phase(shard, config_num, |p| matches!(p, Phase::Exporting { .. }))
                {
                    Err(stale) => stale,
                    Ok(_) => {
                        if let Err(e) = kv.delete_shard(shard) {
                            return self.kv_refused(shard, "delete", e);
                        }
                        self.shards.remove(&shard);
                        ApplyOutcome::Applied
                    }
                }
            }
            MigrationEntry::ConfirmDone { config_num, shard } => {
                match self
                    .expect_phase(shard, config_num, |p| matches!(p, Phase::Confirming { .. }))
                {
                    Err(stale) => stale,
                    Ok(_) => {
                        self.shards.insert(shard, Phase::Serving);
                        ApplyOutcome::Applied
                    }
                }
            }
        };
        self.debug_check(kv);
        outcome
    }

    fn expect_phase(
        &self,
        shard: u16,
        config_num: u64,
        want: impl Fn(Phase) -> bool,
    ) -> Result<Phase, ApplyOutcome> {
        match self.shards.get(&shard) {
            Some(&p) if config_num == self.config_num() && want(p) => Ok(p),
            other => Err(ApplyOutcome::Stale {
                reason: format!(
                    "shard {shard} of configuration {config_num}: the group is at {} with {:?}",
                    self.config_num(),
                    other
                ),
            }),
        }
    }

    fn kv_refused(&self, shard: u16, what: &'static str, e: impl ToString) -> ApplyOutcome {
        ApplyOutcome::Refused(MigrationError::Kv {
            group: self.group,
            shard,
            what,
            reason: e.to_string(),
        })
    }

    fn apply_accept(
        &mut self,
        kv: &mut Kv,
        previous: Configuration,
        config: Configuration,
    ) -> ApplyOutcome {
        if let Err(outcome) = self.check_accept(&previous, &config) {
            return outcome;
        }
        if config.shard_count() != kv.config().shard_count {
            return ApplyOutcome::Refused(MigrationError::ShardCountChanged {
                group: self.group,
                num: config.num,
                got: config.shard_count(),
                want: kv.config().shard_count,
            });
        }
        let me = self.group;
        // Compute every change before making any, so the KV state changes all or nothing.
        let mut changes = Vec::new();
        for shard in 0..config.shard_count() {
            let old = previous.shards[usize::from(shard)];
            let new = config.shards[usize::from(shard)];
            let phase = if new == me && old != me {
                if old == GROUP_NONE {
                    Phase::Serving
                } else {
                    Phase::Importing { from: old }
                }
            } else if old == me && new != me {
                Phase::Exporting { to: new }
            } else {
                continue;
            };
            changes.push((shard, phase));
        }
        for (shard, phase) in changes {
            if let Err(e) = kv.set_shard_state(shard, phase.kv_state()) {
                // Shard numbers were checked against kv's shard count above, and the phases
                // and kv states agree (pair-asserted after every apply), so kv sees only the
                // transitions it allows: absent -> Serving/Importing, Serving -> Exporting.
                panic!("group {me}: kv refused shard {shard}: {e}");
            }
            self.shards.insert(shard, phase);
        }
        self.previous = Some(previous);
        self.config = Some(config);
        ApplyOutcome::Applied
    }

    fn apply_install(
        &mut self,
        kv: &mut Kv,
        config_num: u64,
        shard: u16,
        blob: &Bytes,
    ) -> ApplyOutcome {
        let from =
            match self.expect_phase(shard, config_num, |p| matches!(p, Phase::Importing { .. })) {
                Ok(Phase::Importing { from }) => from,
                Ok(_) => unreachable!("expect_phase checked Importing"),
                Err(stale) => return stale,
            };
        // A blob of another Importing shard must not be installed under this entry's
        // bookkeeping: name the mismatch here, and let kv check it again as it installs.
        let blob_shard = shard_blob_shard(blob).ok();
        if blob_shard != Some(shard) {
            return ApplyOutcome::Refused(MigrationError::BlobShardMismatch {
                group: self.group,
                shard,
                blob_shard,
            });
        }
        if let Err(e) = kv.import_shard_expecting(shard, blob) {
            return self.kv_refused(shard, "import", e);
        }
        self.shards.insert(shard, Phase::Confirming { from });
        ApplyOutcome::Applied
    }

    /// Pair assertion: the migration phases and the KV shard states say the same.
    fn debug_check(&self, kv: &Kv) {
        if cfg!(debug_assertions) {
            if let Err(e) = self.check_against(kv) {
                panic!("{e}");
            }
        }
    }

    /// Whether every shard's phase matches its KV state and KV holds no other shard.
    pub fn check_against(&self, kv: &Kv) -> Result<(), String> {
        let held: Vec<(u16, ShardState)> = kv.shards().collect();
        let want: Vec<(u16, ShardState)> = self
            .shards
            .iter()
            .map(|(&s, p)| (s, p.kv_state()))
            .collect();
        if held != want {
            return Err(format!(
                "group {}: kv shards {held:?} differ from migration phases {want:?}",
                self.group
            ));
        }
        Ok(())
    }

    /// Snapshot form, stored next to the KV snapshot:
    /// `tag version group:u64 applied:u64 has_config:u8 [previous config] shard_count:u32
    /// (shard:u16 phase:u8 group:u64)*`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u8(&mut out, MIGRATION_TAG);
        put_u8(&mut out, MIGRATION_FORMAT_VERSION);
        put_u64(&mut out, self.group);
        put_u64(&mut out, self.applied_index);
        match (&self.previous, &self.config) {
            (Some(previous), Some(config)) => {
                put_u8(&mut out, 1);
                previous.encode(&mut out);
                config.encode(&mut out);
            }
            _ => put_u8(&mut out, 0),
        }
        put_count(&mut out, self.shards.len());
        for (&shard, &phase) in &self.shards {
            let (code, group) = phase.code();
            put_u16(&mut out, shard);
            put_u8(&mut out, code);
            put_u64(&mut out, group);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<GroupShards, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.u8()? != MIGRATION_TAG || r.u8()? != MIGRATION_FORMAT_VERSION {
            return Err(DecodeError::Unknown {
                offset: 0,
                what: "migration snapshot header",
                value: 0,
            });
        }
        let offset = r.offset();
        let group = r.u64()?;
        if group == GROUP_NONE {
            return Err(DecodeError::Invalid {
                offset,
                reason: "group 0".into(),
            });
        }
        let applied_index = r.u64()?;
        let flag_offset = r.offset();
        let (previous, config) = match r.u8()? {
            0 => (None, None),
            1 => (
                Some(Configuration::read(&mut r)?),
                Some(Configuration::read(&mut r)?),
            ),
            flag => {
                return Err(DecodeError::Unknown {
                    offset: flag_offset,
                    what: "configuration flag",
                    value: u64::from(flag),
                })
            }
        };
        let shard_count = config.as_ref().map_or(0, |c| usize::from(c.shard_count()));
        let count = r.count("shard", shard_count)?;
        let mut shards = BTreeMap::new();
        let mut last = None;
        for _ in 0..count {
            let offset = r.offset();
            let shard = r.u16()?;
            if last.is_some_and(|l| shard <= l) || usize::from(shard) >= shard_count {
                return Err(DecodeError::NotCanonical {
                    offset,
                    what: "shard",
                    value: u64::from(shard),
                });
            }
            last = Some(shard);
            let code = r.u8()?;
            let other = r.u64()?;
            let phase = Phase::from_code(code, other).ok_or(DecodeError::Unknown {
                offset: offset + 2,
                what: "shard phase",
                value: u64::from(code),
            })?;
            shards.insert(shard, phase);
        }
        r.finish()?;
        Ok(GroupShards {
            group,
            config,
            previous,
            shards,
            applied_index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Command, HostSpec, Op, Reply, Settings, StateMachine as Controller};
    use crate::kv::{
        encode_batch, restore, Command as KvCommand, Config as KvConfig, Op as KvOp, Outcome,
    };

    const SHARDS: u16 = 8;

    fn kv_config() -> KvConfig {
        KvConfig {
            shard_count: SHARDS,
            ..KvConfig::default()
        }
    }

    /// A controller with `n` configurations produced by the given ops.
    fn controller(ops: Vec<Op>) -> Controller {
        let mut c = Controller::new(Settings {
            shard_count: SHARDS,
            replication: 1,
            ..Settings::default()
        })
        .unwrap();
        for (i, op) in ops.into_iter().enumerate() {
            let index = i as u64 + 1;
            let payload = Command {
                client_id: 0,
                seq: 0,
                op,
            }
            .encode();
            let reply = c.apply(index, &payload).unwrap();
            assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
        }
        c
    }

    fn join(id: u64) -> Op {
        Op::Join {
            hosts: vec![HostSpec {
                id,
                cores: 1,
                addr: format!("h{id}:7000"),
            }],
        }
    }

    /// One replica of a group: its log, migration state and KV state.
    struct Replica {
        log: Vec<Bytes>,
        shards: GroupShards,
        kv: Kv,
    }

    impl Replica {
        fn new(group: GroupId) -> Replica {
            Replica {
                log: Vec::new(),
                shards: GroupShards::new(group),
                kv: Kv::new(kv_config(), []),
            }
        }

        fn commit(&mut self, payload: Bytes) -> ApplyOutcome {
            self.log.push(payload.clone());
            let index = self.log.len() as u64;
            let outcome = if is_migration_entry(&payload) {
                self.shards.apply(&mut self.kv, index, &payload)
            } else {
                let outcomes = self.kv.apply_entry(index, &payload);
                assert!(outcomes.iter().all(|o| !o.is_err()), "{outcomes:?}");
                ApplyOutcome::Applied
            };
            self.shards.check_against(&self.kv).unwrap();
            self.check_restarts();
            outcome
        }

        fn accept(&mut self, c: &Controller, num: u64) -> ApplyOutcome {
            let previous = c.query(num as i64 - 1).unwrap().clone();
            let config = c.query(num as i64).unwrap().clone();
            self.commit(MigrationEntry::AcceptConfig { previous, config }.encode())
        }

        fn put(&mut self, key: &str, value: &str) {
            let payload = encode_batch(
                1,
                &[KvCommand {
                    client_id: 0,
                    seq: 0,
                    op: KvOp::Put {
                        key: Bytes::copy_from_slice(key.as_bytes()),
                        value: Bytes::copy_from_slice(value.as_bytes()),
                    },
                }],
            );
            self.commit(payload);
        }

        fn get(&self, key: &str) -> Outcome {
            self.kv.read(
                &KvOp::Get {
                    key: Bytes::copy_from_slice(key.as_bytes()),
                },
                crate::kv::ReadConsistency::Linearizable,
            )
        }

        /// Crash-restart after every prefix: a replica that snapshotted after any k entries
        /// (k = 0: none, a full replay), restored, and replayed the rest of the log holds the
        /// same migration state and the same KV state.
        fn check_restarts(&self) {
            let group = self.shards.group();
            for k in 0..=self.log.len() {
                let fresh = (GroupShards::new(group), Kv::new(kv_config(), []));
                let (shards, kv) = replay(fresh, &self.log[..k], 0);
                let restored_shards = GroupShards::decode(&shards.encode()).unwrap();
                assert_eq!(restored_shards, shards);
                let chunks: Vec<Bytes> = kv.snapshot_writer(64).collect();
                let restored_kv = restore(kv_config(), &chunks).unwrap();
                let (shards, kv) = replay((restored_shards, restored_kv), &self.log[k..], k);
                assert_eq!(shards, self.shards, "snapshot after {k} entries");
                assert_eq!(
                    kv.state_hash(),
                    self.kv.state_hash(),
                    "snapshot after {k} entries"
                );
            }
        }
    }

    /// Applies `log` (whose first entry has index `skipped + 1`) to a state.
    fn replay(state: (GroupShards, Kv), log: &[Bytes], skipped: usize) -> (GroupShards, Kv) {
        let (mut shards, mut kv) = state;
        for (i, payload) in log.iter().enumerate() {
            let index = (skipped + i) as u64 + 1;
            if is_migration_entry(payload) {
                shards.apply(&mut kv, index, payload);
            } else {
                kv.apply_entry(index, payload);
            }
        }
        (shards, kv)
    }

    fn serving_owners(replicas: &[&Replica], shard: u16) -> usize {
        replicas
            .iter()
            .filter(|r| r.kv.shard_state(shard) == Some(ShardState::Serving))
            .count()
    }

    fn assert_one_owner(replicas: &[&Replica]) {
        for shard in 0..SHARDS {
            assert!(
                serving_owners(replicas, shard) <= 1,
                "shard {shard} served by two groups"
            );
        }
    }

    #[test]
    fn a_shard_moves_through_every_step() {
        // Config 1: group 1 on host 1 owns all 8 shards. Config 2: group 2 joins, takes 4.
        let c = controller(vec![join(1), join(2)]);
        let moved: Vec<u16> = c.query(2).unwrap().shards_of(2);
        assert_eq!(moved.len(), 4);
        let mut a = Replica::new(1);
        let mut b = Replica::new(2);

        // A fresh group cannot start before the configuration that created it.
        assert!(matches!(a.accept(&c, 2), ApplyOutcome::Refused(_)));
        assert_eq!(a.accept(&c, 1), ApplyOutcome::Applied);
        assert!((0..SHARDS).all(|s| a.shards.phase(s) == Some(Phase::Serving)));
        for s in 0..32 {
            a.put(&format!("k{s}"), &format!("v{s}"));
        }
        assert_eq!(a.shards.next_config_wanted(), Some(2));

        // The new owner accepts first: Importing, not served; the old owner still serves.
        assert_eq!(b.accept(&c, 2), ApplyOutcome::Applied);
        for &s in &moved {
            assert_eq!(b.shards.phase(s), Some(Phase::Importing { from: 1 }));
            assert_eq!(b.shards.route(s), Route::TryAgain);
            assert_eq!(a.shards.route(s), Route::Serve);
        }
        assert_one_owner(&[&a, &b]);
        assert_eq!(b.shards.next_config_wanted(), None, "imports in flight");
        let pulls = b.shards.pulls();
        assert_eq!(pulls.len(), 4);
        // The old owner has not applied configuration 2: no blob yet.
        assert_eq!(
            a.shards.handle_pull(&a.kv, pulls[0].shard, 2),
            PullReply::NotYet { config_num: 1 }
        );

        // The old owner accepts: frozen, clients are sent to the new owner.
        assert_eq!(a.accept(&c, 2), ApplyOutcome::Applied);
        for &s in &moved {
            assert_eq!(a.shards.phase(s), Some(Phase::Exporting { to: 2 }));
            assert_eq!(a.shards.route(s), Route::Ask { group: 2 });
        }
        assert_one_owner(&[&a, &b]);
        assert_eq!(a.shards.next_config_wanted(), None, "exports in flight");

        // Pull and install the shards one at a time: each is served as soon as it arrives.
        for (i, pull) in pulls.iter().enumerate() {
            assert_eq!(pull.from, 1);
            let PullReply::Blob(blob) = a.shards.handle_pull(&a.kv, pull.shard, pull.config_num)
            else {
                panic!("no blob for {pull:?}");
            };
            // A blob of another shard under this shard's entry is refused.
            if let Some(other) = pulls.get(i + 1) {
                let PullReply::Blob(wrong) = a.shards.handle_pull(&a.kv, other.shard, 2) else {
                    panic!()
                };
                let outcome = b.commit(
                    MigrationEntry::Install {
                        config_num: 2,
                        shard: pull.shard,
                        blob: wrong,
                    }
                    .encode(),
                );
                assert!(matches!(
                    outcome,
                    ApplyOutcome::Refused(MigrationError::BlobShardMismatch { .. })
                ));
            }
            let install = MigrationEntry::Install {
                config_num: 2,
                shard: pull.shard,
                blob,
            }
            .encode();
            assert_eq!(b.commit(install.clone()), ApplyOutcome::Applied);
            assert_eq!(
                b.shards.phase(pull.shard),
                Some(Phase::Confirming { from: 1 })
            );
            assert_eq!(b.shards.route(pull.shard), Route::Serve);
            // A retried install is a no-op.
            assert!(matches!(b.commit(install), ApplyOutcome::Stale { .. }));
            assert_one_owner(&[&a, &b]);
            for &other in &pulls[i + 1..] {
                assert_eq!(b.shards.route(other.shard), Route::TryAgain);
            }
        }
        // The moved data is there.
        for s in 0..32 {
            let key = format!("k{s}");
            let owner =
                if b.kv.shard_state(b.kv.shard_of(key.as_bytes())) == Some(ShardState::Serving) {
                    &b
                } else {
                    &a
                };
            assert_eq!(
                owner.get(&key),
                Outcome::Value(Some(Bytes::from(format!("v{s}"))))
            );
        }

        // Garbage collection: the old owner deletes when told, then says Done.
        for confirm in b.shards.confirms() {
            let ConfirmReply::Propose(delete) = a.shards.handle_confirm(confirm.shard, 2) else {
                panic!("expected a delete for {confirm:?}");
            };
            assert_eq!(a.commit(delete.clone()), ApplyOutcome::Applied);
            assert!(matches!(a.commit(delete), ApplyOutcome::Stale { .. }));
            assert_eq!(
                a.shards.handle_confirm(confirm.shard, 2),
                ConfirmReply::Done
            );
            assert_eq!(
                a.shards.handle_pull(&a.kv, confirm.shard, 2),
                PullReply::Gone
            );
            assert_eq!(a.shards.route(confirm.shard), Route::Moved { group: 2 });
            let done = MigrationEntry::ConfirmDone {
                config_num: 2,
                shard: confirm.shard,
            }
            .encode();
            assert_eq!(b.commit(done.clone()), ApplyOutcome::Applied);
            assert!(matches!(b.commit(done), ApplyOutcome::Stale { .. }));
        }
        assert_eq!(a.shards.next_config_wanted(), Some(3));
        assert_eq!(b.shards.next_config_wanted(), Some(3));
        assert_eq!(a.kv.shards().count(), 4);
        assert_eq!(b.kv.shards().count(), 4);
        // Accepting an already-accepted configuration is stale, skipping one is refused.
        assert!(matches!(a.accept(&c, 2), ApplyOutcome::Stale { .. }));
    }

    #[test]
    fn a_retired_group_hands_everything_over_and_drains() {
        // Group 1 on host 1, group 2 joins on host 2, then host 1 leaves.
        let c = controller(vec![join(1), join(2), Op::Leave { hosts: vec![1] }]);
        let mut a = Replica::new(1);
        let mut b = Replica::new(2);
        a.accept(&c, 1);
        a.put("x", "1");
        a.accept(&c, 2);
        b.accept(&c, 2);
        let deliver = |a: &mut Replica, b: &mut Replica| {
            for pull in b.shards.pulls() {
                if let PullReply::Blob(blob) =
                    a.shards.handle_pull(&a.kv, pull.shard, pull.config_num)
                {
                    b.commit(
                        MigrationEntry::Install {
                            config_num: pull.config_num,
                            shard: pull.shard,
                            blob,
                        }
                        .encode(),
                    );
                }
            }
            for confirm in b.shards.confirms() {
                if let ConfirmReply::Propose(delete) =
                    a.shards.handle_confirm(confirm.shard, confirm.config_num)
                {
                    a.commit(delete);
                }
                assert_eq!(
                    a.shards.handle_confirm(confirm.shard, confirm.config_num),
                    ConfirmReply::Done
                );
                b.commit(
                    MigrationEntry::ConfirmDone {
                        config_num: confirm.config_num,
                        shard: confirm.shard,
                    }
                    .encode(),
                );
            }
        };
        deliver(&mut a, &mut b);
        assert_eq!(a.accept(&c, 3), ApplyOutcome::Applied);
        assert!(a.shards.is_retired() && !a.shards.is_drained());
        assert_eq!(a.shards.next_config_wanted(), None);
        b.accept(&c, 3);
        assert_one_owner(&[&a, &b]);
        deliver(&mut a, &mut b);
        assert!(a.shards.is_drained());
        assert_eq!(b.kv.shards().count(), usize::from(SHARDS));
        assert_eq!(b.get("x"), Outcome::Value(Some(Bytes::from_static(b"1"))));
    }

    #[test]
    fn entries_round_trip_and_garbage_is_refused_without_panic() {
        let c = controller(vec![join(1)]);
        let entries = vec![
            MigrationEntry::AcceptConfig {
                previous: c.query(0).unwrap().clone(),
                config: c.query(1).unwrap().clone(),
            },
            MigrationEntry::Install {
                config_num: 3,
                shard: 7,
                blob: Bytes::from_static(b"blob"),
            },
            MigrationEntry::DeleteExported {
                config_num: 3,
                shard: 1,
            },
            MigrationEntry::ConfirmDone {
                config_num: 9,
                shard: 0,
            },
        ];
        let mut r = Replica::new(1);
        for e in entries {
            let bytes = e.encode();
            assert!(is_migration_entry(&bytes));
            assert_eq!(MigrationEntry::decode(&bytes).unwrap(), e);
            for len in 0..bytes.len() {
                let cut = bytes.slice(..len);
                assert!(MigrationEntry::decode(&cut).is_err(), "prefix {len}");
            }
            let mut bad = bytes.to_vec();
            bad[2] = 99;
            let outcome =
                r.shards
                    .apply(&mut r.kv, r.shards.applied_index() + 1, &Bytes::from(bad));
            assert!(matches!(
                outcome,
                ApplyOutcome::Refused(MigrationError::Decode { .. })
            ));
        }
        assert_eq!(r.shards, {
            let mut fresh = GroupShards::new(1);
            fresh.applied_index = 4;
            fresh
        });
        assert!(GroupShards::decode(&[MIGRATION_TAG]).is_err());
    }

    #[test]
    fn configurations_are_accepted_one_at_a_time_and_only_when_nothing_is_in_flight() {
        let c = controller(vec![
            join(1),
            Op::Move { shard: 0, group: 1 },
            join(2),
            join(3),
        ]);
        let mut a = Replica::new(1);
        assert_eq!(a.accept(&c, 1), ApplyOutcome::Applied);
        // Skipping a number is refused; so is a previous that is not the current one.
        assert!(matches!(
            a.accept(&c, 3),
            ApplyOutcome::Refused(MigrationError::ConfigOutOfOrder {
                num: 3,
                current: 1,
                ..
            })
        ));
        let forged = MigrationEntry::AcceptConfig {
            previous: c.query(0).unwrap().clone(),
            config: c.query(2).unwrap().clone(),
        };
        assert!(matches!(
            a.commit(forged.encode()),
            ApplyOutcome::Refused(_)
        ));
        assert_eq!(a.accept(&c, 2), ApplyOutcome::Applied);
        assert_eq!(a.accept(&c, 3), ApplyOutcome::Applied);
        // Configuration 3 moved shards to group 2: nothing more until they are handed over.
        assert_eq!(a.shards.next_config_wanted(), None);
        assert!(matches!(a.accept(&c, 4), ApplyOutcome::Stale { .. }));
        assert_eq!(a.shards.config_num(), 3);
        // Stale pieces of other configurations change nothing.
        let exporting = a
            .shards
            .shards()
            .find(|(_, p)| matches!(p, Phase::Exporting { .. }));
        let (shard, _) = exporting.unwrap();
        for stale in [
            MigrationEntry::DeleteExported {
                config_num: 2,
                shard,
            },
            MigrationEntry::ConfirmDone {
                config_num: 3,
                shard,
            },
            MigrationEntry::Install {
                config_num: 3,
                shard,
                blob: Bytes::new(),
            },
        ] {
            let before = a.shards.clone();
            assert!(matches!(
                a.commit(stale.encode()),
                ApplyOutcome::Stale { .. }
            ));
            assert_eq!(
                a.shards.shards().collect::<Vec<_>>(),
                before.shards().collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_retried_write_after_a_move_gets_its_first_answer_at_the_new_owner() {
        let c = controller(vec![join(1), join(2)]);
        let mut a = Replica::new(1);
        let mut b = Replica::new(2);
        a.accept(&c, 1);
        // A client with a session appends to a key of a shard that will move to group 2.
        let moved = c.query(2).unwrap().shards_of(2);
        let key = (0..)
            .map(|i| format!("key{i}"))
            .find(|k| moved.contains(&a.kv.shard_of(k.as_bytes())))
            .unwrap();
        let append = |seq: u64| {
            encode_batch(
                1,
                &[KvCommand {
                    client_id: 9,
                    seq,
                    op: KvOp::Append {
                        key: Bytes::copy_from_slice(key.as_bytes()),
                        value: Bytes::from_static(b"x"),
                    },
                }],
            )
        };
        let open = encode_batch(
            1,
            &[KvCommand {
                client_id: 9,
                seq: 0,
                op: KvOp::OpenSession,
            }],
        );
        a.commit(open);
        a.log.push(append(1));
        let index = a.log.len() as u64;
        assert_eq!(a.kv.apply_entry(index, &append(1)), vec![Outcome::Int(1)]);
        // The answer is lost; meanwhile the shard moves.
        a.accept(&c, 2);
        b.accept(&c, 2);
        let shard = a.kv.shard_of(key.as_bytes());
        let PullReply::Blob(blob) = a.shards.handle_pull(&a.kv, shard, 2) else {
            panic!()
        };
        b.commit(
            MigrationEntry::Install {
                config_num: 2,
                shard,
                blob,
            }
            .encode(),
        );
        // The retry at the new owner is answered from the session, not applied again.
        b.log.push(append(1));
        let index = b.log.len() as u64;
        assert_eq!(b.kv.apply_entry(index, &append(1)), vec![Outcome::Int(1)]);
        assert_eq!(b.get(&key), Outcome::Value(Some(Bytes::from_static(b"x"))));
        // At the old owner (frozen) the retry is answered from its session as well: kv checks
        // duplicates before the shard state, so no path applies it twice.
        a.log.push(append(1));
        let index = a.log.len() as u64;
        let retry_at_old = a.kv.apply_entry(index, &append(1));
        assert_eq!(
            retry_at_old,
            vec![Outcome::Int(1)],
            "the old owner remembers it too"
        );
    }

    #[test]
    fn blob_shard_reads_the_kv_blob_header() {
        let mut kv = Kv::new(kv_config(), 0..SHARDS);
        kv.set_shard_state(5, ShardState::Exporting).unwrap();
        let blob = kv.export_shard(5).unwrap();
        assert_eq!(shard_blob_shard(&blob).ok(), Some(5));
        assert!(shard_blob_shard(&blob.slice(..10)).is_err());
        assert!(shard_blob_shard(&Bytes::new()).is_err());
        // A flipped bit in the header frame fails its CRC instead of naming another shard.
        let mut flipped = blob.to_vec();
        flipped[15] ^= 0x01;
        assert!(shard_blob_shard(&Bytes::from(flipped)).is_err());
    }
}
