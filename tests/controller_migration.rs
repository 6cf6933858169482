//! Groups following the controller's configurations and handing shards to each other, with
//! a random schedule of controller operations, config acceptance, pulls, installs,
//! confirmations, client writes and crash-restarts of any group at any step.
//!
//! Invariants checked after every step:
//! - never two groups serving (accepting writes for) one shard;
//! - every acknowledged write is readable from the group serving its shard (nothing is lost
//!   across moves, restarts and garbage collection);
//! - a restarted group (snapshot at a random point of its log + replay) equals the old one.
//!
//! At the end every group reaches the latest configuration, every shard is served by exactly
//! its owner in it, and retired groups are drained. A failure names the seed.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tynamo::controller::{Command, Configuration, GroupId, HostSpec, Op, Reply, Settings};
use tynamo::kv::{
    encode_batch, restore, Command as KvCommand, Config as KvConfig, Op as KvOp, Outcome,
    ReadConsistency, ShardState, StateMachine as Kv,
};
use tynamo::shard::migration::{
    is_migration_entry, ApplyOutcome, ConfirmReply, GroupShards, MigrationEntry, PullReply, Route,
};

const SHARDS: u16 = 16;
const SEEDS: u64 = 30;
const STEPS: usize = 1_500;
const CONFIGS_MAX: u64 = 30;
const KEYS: usize = 48;

fn kv_config() -> KvConfig {
    KvConfig {
        shard_count: SHARDS,
        ..KvConfig::default()
    }
}

/// One group, modelled by one replica: every replica of a group applies the same log, so one
/// stands for all of them (the Raft layer is tested elsewhere).
struct Group {
    log: Vec<Bytes>,
    shards: GroupShards,
    kv: Kv,
}

impl Group {
    fn new(id: GroupId) -> Group {
        Group {
            log: Vec::new(),
            shards: GroupShards::new(id),
            kv: Kv::new(kv_config(), []),
        }
    }

    fn commit(&mut self, payload: Bytes) -> Vec<Outcome> {
        self.log.push(payload.clone());
        let index = self.log.len() as u64;
        if is_migration_entry(&payload) {
            match self.shards.apply(&mut self.kv, index, &payload) {
                ApplyOutcome::Refused(e) => panic!("group {}: {e}", self.shards.group()),
                ApplyOutcome::Applied | ApplyOutcome::Stale { .. } => Vec::new(),
            }
        } else {
            self.kv.apply_entry(index, &payload)
        }
    }

    /// Crash and restart from a snapshot taken after `k` entries plus the rest of the log.
    fn restart(&self, k: usize) -> Group {
        let id = self.shards.group();
        let mut before = Group::new(id);
        for payload in &self.log[..k] {
            before.commit(payload.clone());
        }
        let chunks: Vec<Bytes> = before.kv.snapshot_writer(256).collect();
        let mut g = Group {
            log: self.log[..k].to_vec(),
            shards: GroupShards::decode(&before.shards.encode()).expect("own snapshot decodes"),
            kv: restore(kv_config(), &chunks).expect("own snapshot restores"),
        };
        for payload in &self.log[k..] {
            g.commit(payload.clone());
        }
        g
    }
}

struct World {
    seed: u64,
    rng: ChaCha8Rng,
    controller: tynamo::controller::StateMachine,
    controller_index: u64,
    groups: BTreeMap<GroupId, Group>,
    next_host: u64,
    /// The acknowledged value of each key.
    model: BTreeMap<Bytes, Bytes>,
    writes_ok: u64,
    redirects: BTreeMap<&'static str, u64>,
}

impl World {
    fn new(seed: u64) -> World {
        let controller = tynamo::controller::StateMachine::new(Settings {
            shard_count: SHARDS,
            replication: 1,
            ..Settings::default()
        })
        .expect("valid settings");
        World {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            controller,
            controller_index: 0,
            groups: BTreeMap::new(),
            next_host: 1,
            model: BTreeMap::new(),
            writes_ok: 0,
            redirects: BTreeMap::new(),
        }
    }

    fn latest(&self) -> &Configuration {
        self.controller.latest()
    }

    fn config(&self, num: u64) -> Configuration {
        self.controller
            .query(num as i64)
            .expect("configurations are retained")
            .clone()
    }

    fn control(&mut self, op: Op) {
        self.controller_index += 1;
        let payload = Command {
            client_id: 0,
            seq: 0,
            op,
        }
        .encode();
        let reply = self.controller.apply(self.controller_index, &payload);
        if let Some(Reply::Ok { .. }) = reply {
            // New groups start empty, as the runtime bootstraps them.
            let latest = self.latest().clone();
            for (&id, g) in &latest.groups {
                if g.created_in == latest.num {
                    self.groups.insert(id, Group::new(id));
                }
            }
        }
    }

    fn random_control(&mut self) {
        if self.latest().num >= CONFIGS_MAX {
            return;
        }
        let latest = self.latest().clone();
        match self.rng.gen_range(0..4) {
            0 | 1 if latest.hosts.len() < 6 || latest.groups.is_empty() => {
                let id = self.next_host;
                self.next_host += 1;
                self.control(Op::Join {
                    hosts: vec![HostSpec {
                        id,
                        cores: 1,
                        addr: format!("h{id}:7000"),
                    }],
                });
            }
            2 if latest.hosts.len() > 1 => {
                let hosts: Vec<u64> = latest.hosts.keys().copied().collect();
                let host = hosts[self.rng.gen_range(0..hosts.len())];
                self.control(Op::Leave { hosts: vec![host] });
            }
            _ if !latest.groups.is_empty() => {
                let groups: Vec<GroupId> = latest.groups.keys().copied().collect();
                let shard = self.rng.gen_range(0..SHARDS);
                let group = groups[self.rng.gen_range(0..groups.len())];
                self.control(Op::Move { shard, group });
            }
            _ => {}
        }
    }

    fn random_group(&mut self) -> Option<GroupId> {
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        if ids.is_empty() {
            return None;
        }
        Some(ids[self.rng.gen_range(0..ids.len())])
    }

    /// The group's leader proposes the next configuration if it may.
    fn accept(&mut self, id: GroupId) -> bool {
        let g = &self.groups[&id];
        let num = match g.shards.config() {
            None => self
                .latest()
                .groups
                .get(&id)
                .map(|gr| gr.created_in)
                .or_else(|| {
                    // Created and already retired before it started: find where it was created.
                    (self.controller.oldest().num..=self.latest().num)
                        .find_map(|n| self.config(n).groups.get(&id).map(|gr| gr.created_in))
                }),
            Some(_) => g.shards.next_config_wanted(),
        };
        let Some(num) = num else { return false };
        if num > self.latest().num {
            return false;
        }
        let previous = self.config(num - 1);
        let config = self.config(num);
        let g = self.groups.get_mut(&id).expect("group exists");
        if !g.shards.can_accept(&previous, &config) {
            return false;
        }
        g.commit(MigrationEntry::AcceptConfig { previous, config }.encode());
        true
    }

    /// The group's leader asks the old owners for every shard it still needs.
    fn pull(&mut self, id: GroupId) -> bool {
        let mut busy = false;
        for pull in self.groups[&id].shards.pulls() {
            busy |= self.pull_one(id, pull);
        }
        busy
    }

    fn pull_one(&mut self, id: GroupId, pull: tynamo::shard::migration::Pull) -> bool {
        let source = &self.groups[&pull.from];
        match source
            .shards
            .handle_pull(&source.kv, pull.shard, pull.config_num)
        {
            PullReply::Blob(blob) => {
                self.groups.get_mut(&id).expect("group exists").commit(
                    MigrationEntry::Install {
                        config_num: pull.config_num,
                        shard: pull.shard,
                        blob,
                    }
                    .encode(),
                );
                true
            }
            PullReply::NotYet { .. } => false,
            PullReply::Gone => panic!("seed {}: {pull:?} gone before it was installed", self.seed),
        }
    }

    /// The group's leader tells the old owners which shards arrived.
    fn confirm(&mut self, id: GroupId) -> bool {
        let confirms = self.groups[&id].shards.confirms();
        let busy = !confirms.is_empty();
        for confirm in confirms {
            self.confirm_one(id, confirm);
        }
        busy
    }

    fn confirm_one(&mut self, id: GroupId, confirm: tynamo::shard::migration::Confirm) {
        let source = self
            .groups
            .get_mut(&confirm.from)
            .expect("old owner exists");
        match source
            .shards
            .handle_confirm(confirm.shard, confirm.config_num)
        {
            ConfirmReply::Propose(delete) => {
                source.commit(delete);
            }
            ConfirmReply::Done => {
                self.groups.get_mut(&id).expect("group exists").commit(
                    MigrationEntry::ConfirmDone {
                        config_num: confirm.config_num,
                        shard: confirm.shard,
                    }
                    .encode(),
                );
            }
            ConfirmReply::NotYet { .. } => {
                panic!("seed {}: {confirm:?} before the old owner moved", self.seed)
            }
        }
    }

    /// A client writes a random key at the group the latest configuration names, or (to
    /// exercise redirects) at a random group.
    fn write(&mut self) {
        let key = Bytes::from(format!("key{}", self.rng.gen_range(0..KEYS)));
        let value = Bytes::from(format!("v{}", self.rng.gen::<u32>()));
        let shard = tynamo::shard::key_shard(&key, SHARDS);
        let target = if self.rng.gen_bool(0.7) {
            self.latest().shards[usize::from(shard)]
        } else {
            match self.random_group() {
                Some(g) => g,
                None => return,
            }
        };
        // Like a Redis cluster client: follow -MOVED and -ASK a few hops, give up on -TRYAGAIN.
        let mut target = target;
        for _hop in 0..4 {
            let Some(g) = self.groups.get_mut(&target) else {
                return;
            };
            match g.shards.route(shard) {
                Route::Serve => {
                    let payload = encode_batch(
                        1,
                        &[KvCommand {
                            client_id: 0,
                            seq: 0,
                            op: KvOp::Put {
                                key: key.clone(),
                                value: value.clone(),
                            },
                        }],
                    );
                    let outcomes = g.commit(payload);
                    assert_eq!(outcomes, vec![Outcome::Ok], "seed {}", self.seed);
                    self.model.insert(key, value);
                    self.writes_ok += 1;
                    return;
                }
                Route::TryAgain => {
                    *self.redirects.entry("tryagain").or_default() += 1;
                    return;
                }
                Route::Ask { group } => {
                    // A frozen shard refuses the write in kv too (the route is not advice).
                    let payload = encode_batch(
                        1,
                        &[KvCommand {
                            client_id: 0,
                            seq: 0,
                            op: KvOp::Put {
                                key: key.clone(),
                                value: value.clone(),
                            },
                        }],
                    );
                    let outcomes = g.commit(payload);
                    assert!(
                        outcomes[0].is_err(),
                        "seed {}: frozen shard took a write",
                        self.seed
                    );
                    *self.redirects.entry("ask").or_default() += 1;
                    target = group;
                }
                Route::Moved { group } => {
                    *self.redirects.entry("moved").or_default() += 1;
                    target = group;
                }
            }
        }
    }

    fn restart(&mut self, id: GroupId) {
        let g = &self.groups[&id];
        let k = self.rng.gen_range(0..=g.log.len());
        let restarted = g.restart(k);
        assert_eq!(
            restarted.shards, g.shards,
            "seed {}: group {id} after restart at {k}",
            self.seed
        );
        assert_eq!(
            restarted.kv.state_hash(),
            g.kv.state_hash(),
            "seed {}",
            self.seed
        );
        self.groups.insert(id, restarted);
    }

    fn check(&self) {
        for shard in 0..SHARDS {
            let serving: Vec<GroupId> = self
                .groups
                .iter()
                .filter(|(_, g)| g.kv.shard_state(shard) == Some(ShardState::Serving))
                .map(|(&id, _)| id)
                .collect();
            assert!(
                serving.len() <= 1,
                "seed {}: shard {shard} served by groups {serving:?}",
                self.seed
            );
        }
        for (key, value) in &self.model {
            let shard = tynamo::shard::key_shard(key, SHARDS);
            // Wherever the shard's data lives (served, frozen or in flight), the latest
            // acknowledged value is the one there; a shard being imported has no data yet.
            for (id, g) in &self.groups {
                if matches!(
                    g.kv.shard_state(shard),
                    Some(ShardState::Serving | ShardState::Exporting)
                ) && g.shards.route(shard) == Route::Serve
                {
                    let got =
                        g.kv.read(&KvOp::Get { key: key.clone() }, ReadConsistency::Stale);
                    assert_eq!(
                        got,
                        Outcome::Value(Some(value.clone())),
                        "seed {}: group {id} lost {key:?}",
                        self.seed
                    );
                }
            }
        }
    }

    fn step(&mut self) {
        match self.rng.gen_range(0..100) {
            0..=3 => self.random_control(),
            4..=30 => {
                if let Some(id) = self.random_group() {
                    self.accept(id);
                }
            }
            31..=50 => {
                if let Some(id) = self.random_group() {
                    self.pull(id);
                }
            }
            51..=65 => {
                if let Some(id) = self.random_group() {
                    self.confirm(id);
                }
            }
            66..=95 => self.write(),
            _ => {
                if let Some(id) = self.random_group() {
                    self.restart(id);
                }
            }
        }
        self.check();
    }

    /// Runs every group's work until nothing is left.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let ids: Vec<GroupId> = self.groups.keys().copied().collect();
            let mut busy = false;
            for id in ids {
                busy |= self.accept(id);
                busy |= self.pull(id);
                busy |= self.confirm(id);
            }
            self.check();
            if !busy {
                return;
            }
        }
        panic!("seed {}: groups did not settle", self.seed);
    }

    fn check_final(&self) {
        let latest = self.latest();
        for (&id, g) in &self.groups {
            if latest.groups.contains_key(&id) {
                assert_eq!(
                    g.shards.config_num(),
                    latest.num,
                    "seed {}: group {id}",
                    self.seed
                );
                let held: Vec<u16> = g.kv.shards().map(|(s, _)| s).collect();
                assert_eq!(held, latest.shards_of(id), "seed {}: group {id}", self.seed);
                assert!(g.kv.shards().all(|(_, st)| st == ShardState::Serving));
            } else {
                assert!(
                    g.shards.is_drained(),
                    "seed {}: retired group {id} holds shards",
                    self.seed
                );
            }
        }
        for (key, value) in &self.model {
            let shard = tynamo::shard::key_shard(key, SHARDS);
            let owner = &self.groups[&latest.shards[usize::from(shard)]];
            assert_eq!(
                owner.kv.read(
                    &KvOp::Get { key: key.clone() },
                    ReadConsistency::Linearizable
                ),
                Outcome::Value(Some(value.clone())),
                "seed {}",
                self.seed
            );
        }
    }
}

#[test]
fn shards_move_between_groups_without_two_owners_or_lost_writes() {
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut writes = 0;
    let mut configs = 0;
    for seed in 0..SEEDS {
        let mut w = World::new(seed);
        for _ in 0..STEPS {
            w.step();
        }
        w.settle();
        w.check_final();
        writes += w.writes_ok;
        configs += w.latest().num;
        for (k, v) in &w.redirects {
            *totals.entry(k).or_default() += v;
        }
    }
    eprintln!("{configs} configurations, {writes} writes, redirects {totals:?}");
    // The schedule really exercised moves and every kind of redirect.
    assert!(configs > SEEDS * 10, "only {configs} configurations");
    assert!(writes > SEEDS * 100, "only {writes} writes");
    for kind in ["tryagain", "ask", "moved"] {
        assert!(
            totals.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} redirect: {totals:?}"
        );
    }
}
