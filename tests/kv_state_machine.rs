//! The key-value state machine against a BTreeMap model, with sessions, retries, limits,
//! snapshots and garbage payloads.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proptest::prelude::*;
use tynamo::kv::{
    encode_batch, restore, Command, Config, KvError, Op, Outcome, ReadConsistency, ShardState,
    SnapshotReader, StateMachine,
};
use tynamo::shard::key_shard;

const SHARDS: u16 = 4;

fn small_config() -> Config {
    Config {
        shard_count: SHARDS,
        key_bytes_max: 8,
        value_bytes_max: 16,
        multi_keys_max: 3,
        sessions_max: 64,
        session_ttl_ms: u64::MAX / 2,
        session_results_max: 1024,
        snapshot_log_bytes_threshold: 1 << 20,
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

// Keys: short ones in several shards, and one over the 8-byte limit.
const KEYS: &[&str] = &["a", "b", "c", "{a}x", "{a}y", "n", "toolongkey"];
// Values: numeric and not, one over the 16-byte limit.
const VALUES: &[&str] = &["1", "-5", "0", "abc", "", "x1", "01", "seventeen-bytes!!"];

/// The model: a BTreeMap and a dedup table, written from the spec, not from the code.
struct Model {
    data: BTreeMap<Bytes, Bytes>,
    sessions: HashMap<u64, HashMap<u64, Outcome>>,
    config: Config,
}

impl Model {
    fn new(config: Config) -> Model {
        Model {
            data: BTreeMap::new(),
            sessions: HashMap::new(),
            config,
        }
    }

    fn key_err(&self, key: &Bytes) -> Option<KvError> {
        (key.len() > self.config.key_bytes_max as usize).then(|| KvError::KeyTooLarge {
            size_bytes: key.len() as u64,
            size_bytes_max: u64::from(self.config.key_bytes_max),
        })
    }

    fn value_err(&self, size: usize) -> Option<KvError> {
        (size > self.config.value_bytes_max as usize).then(|| KvError::ValueTooLarge {
            size_bytes: size as u64,
            size_bytes_max: u64::from(self.config.value_bytes_max),
        })
    }

    fn shard_err(&self, keys: &[&Bytes]) -> Option<KvError> {
        let first = key_shard(keys[0], SHARDS);
        keys.iter()
            .map(|k| key_shard(k, SHARDS))
            .find(|&s| s != first)
            .map(|other| KvError::CrossShard {
                shard_first: first,
                shard_other: other,
            })
    }

    fn apply(&mut self, command: &Command) -> Outcome {
        let Command { client_id, seq, op } = command;
        match op {
            Op::OpenSession => {
                self.sessions.entry(*client_id).or_default();
                return Outcome::Ok;
            }
            Op::CloseSession => {
                self.sessions.remove(client_id);
                return Outcome::Ok;
            }
            _ => {}
        }
        if !op.is_write() {
            return self.execute(op);
        }
        if *client_id != 0 {
            match self.sessions.get(client_id) {
                None => {
                    return Outcome::Err(KvError::SessionUnknown {
                        client_id: *client_id,
                    })
                }
                Some(applied) => {
                    if let Some(result) = applied.get(seq) {
                        return result.clone();
                    }
                }
            }
        }
        let outcome = self.execute(op);
        if *client_id != 0 && !outcome.is_err() {
            self.sessions
                .get_mut(client_id)
                .unwrap()
                .insert(*seq, outcome.clone());
        }
        outcome
    }

    fn execute(&mut self, op: &Op) -> Outcome {
        let err = |e| Outcome::Err(e);
        match op {
            Op::Get { key } | Op::Exists { key } => {
                if let Some(e) = self.key_err(key) {
                    return err(e);
                }
                let v = self.data.get(key).cloned();
                match op {
                    Op::Get { .. } => Outcome::Value(v),
                    _ => Outcome::Int(v.is_some() as i64),
                }
            }
            Op::MGet { keys } => {
                if keys.len() > self.config.multi_keys_max as usize {
                    return err(KvError::TooManyKeys {
                        count: keys.len() as u64,
                        count_max: u64::from(self.config.multi_keys_max),
                    });
                }
                if let Some(e) = keys.iter().find_map(|k| self.key_err(k)) {
                    return err(e);
                }
                if let Some(e) = self.shard_err(&keys.iter().collect::<Vec<_>>()) {
                    return err(e);
                }
                Outcome::Values(keys.iter().map(|k| self.data.get(k).cloned()).collect())
            }
            Op::Put { key, value } => {
                if let Some(e) = self.key_err(key).or(self.value_err(value.len())) {
                    return err(e);
                }
                self.data.insert(key.clone(), value.clone());
                Outcome::Ok
            }
            Op::Append { key, value } => {
                if let Some(e) = self.key_err(key).or(self.value_err(value.len())) {
                    return err(e);
                }
                let mut v = self.data.get(key).map(|v| v.to_vec()).unwrap_or_default();
                v.extend_from_slice(value);
                if let Some(e) = self.value_err(v.len()) {
                    return err(e);
                }
                let len = v.len() as i64;
                self.data.insert(key.clone(), Bytes::from(v));
                Outcome::Int(len)
            }
            Op::Delete { key } => {
                if let Some(e) = self.key_err(key) {
                    return err(e);
                }
                Outcome::Int(self.data.remove(key).is_some() as i64)
            }
            Op::Incr { key, delta } => {
                if let Some(e) = self.key_err(key) {
                    return err(e);
                }
                let current = match self.data.get(key) {
                    None => 0i64,
                    Some(v) => {
                        // Canonical decimal only: the text must be exactly what n prints as.
                        let text = String::from_utf8_lossy(v);
                        match text.parse::<i64>() {
                            Ok(n) if n.to_string() == text => n,
                            _ => return err(KvError::NotAnInteger),
                        }
                    }
                };
                match current.checked_add(*delta) {
                    None => err(KvError::IntegerOverflow),
                    Some(n) => {
                        self.data.insert(key.clone(), b(&n.to_string()));
                        Outcome::Int(n)
                    }
                }
            }
            Op::PutIfPresent { key, value } => {
                if let Some(e) = self.key_err(key).or(self.value_err(value.len())) {
                    return err(e);
                }
                if !self.data.contains_key(key) {
                    return Outcome::Bool(false);
                }
                self.data.insert(key.clone(), value.clone());
                Outcome::Bool(true)
            }
            Op::Cas { key, expected, new } => {
                if let Some(e) = self.key_err(key) {
                    return err(e);
                }
                if let Some(e) = new.as_ref().and_then(|v| self.value_err(v.len())) {
                    return err(e);
                }
                if self.data.get(key) != expected.as_ref() {
                    return Outcome::Bool(false);
                }
                match new {
                    Some(v) => self.data.insert(key.clone(), v.clone()),
                    None => self.data.remove(key),
                };
                Outcome::Bool(true)
            }
            Op::MPut { pairs } => {
                if pairs.len() > self.config.multi_keys_max as usize {
                    return err(KvError::TooManyKeys {
                        count: pairs.len() as u64,
                        count_max: u64::from(self.config.multi_keys_max),
                    });
                }
                for (k, v) in pairs {
                    if let Some(e) = self.key_err(k).or(self.value_err(v.len())) {
                        return err(e);
                    }
                }
                if let Some(e) = self.shard_err(&pairs.iter().map(|(k, _)| k).collect::<Vec<_>>()) {
                    return err(e);
                }
                for (k, v) in pairs {
                    self.data.insert(k.clone(), v.clone());
                }
                Outcome::Ok
            }
            Op::OpenSession | Op::CloseSession => unreachable!(),
        }
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let key = (0..KEYS.len()).prop_map(|i| b(KEYS[i]));
    let value = (0..VALUES.len()).prop_map(|i| b(VALUES[i]));
    let opt_value = proptest::option::of(value.clone());
    prop_oneof![
        key.clone().prop_map(|key| Op::Get { key }),
        key.clone().prop_map(|key| Op::Exists { key }),
        proptest::collection::vec(key.clone(), 1..5).prop_map(|keys| Op::MGet { keys }),
        (key.clone(), value.clone()).prop_map(|(key, value)| Op::Put { key, value }),
        (key.clone(), value.clone()).prop_map(|(key, value)| Op::Append { key, value }),
        (key.clone(), value.clone()).prop_map(|(key, value)| Op::PutIfPresent { key, value }),
        key.clone().prop_map(|key| Op::Delete { key }),
        (
            key.clone(),
            prop_oneof![Just(1i64), Just(-3), Just(i64::MAX)]
        )
            .prop_map(|(key, delta)| Op::Incr { key, delta }),
        (key.clone(), opt_value.clone(), opt_value).prop_map(|(key, expected, new)| Op::Cas {
            key,
            expected,
            new
        }),
        proptest::collection::vec((key, value), 1..5).prop_map(|pairs| Op::MPut { pairs }),
    ]
}

/// A step of a client workload: a new op, or a retry of one of the client's earlier writes.
#[derive(Debug, Clone)]
enum Step {
    New { client: u64, op: Op },
    Retry { client: u64, pick: usize },
    Close { client: u64 },
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..4u64, op_strategy()).prop_map(|(client, op)| Step::New { client, op }),
        3 => (0..4u64, any::<usize>()).prop_map(|(client, pick)| Step::Retry { client, pick }),
        1 => (1..4u64).prop_map(|client| Step::Close { client }),
    ]
}

/// Turns steps into commands: clients 1..=3 have sessions (opened first), client 0 has none.
fn commands(steps: &[Step]) -> Vec<Command> {
    let mut out: Vec<Command> = (1..=3)
        .map(|client_id| Command {
            client_id,
            seq: 0,
            op: Op::OpenSession,
        })
        .collect();
    let mut next_seq: HashMap<u64, u64> = HashMap::new();
    let mut sent: HashMap<u64, Vec<Command>> = HashMap::new();
    for step in steps {
        match step {
            Step::New { client, op } => {
                let seq = next_seq.entry(*client).or_insert(1);
                let command = Command {
                    client_id: *client,
                    seq: *seq,
                    op: op.clone(),
                };
                *seq += 1;
                sent.entry(*client).or_default().push(command.clone());
                out.push(command);
            }
            Step::Retry { client, pick } => {
                if let Some(previous) = sent.get(client).filter(|v| !v.is_empty()) {
                    out.push(previous[pick % previous.len()].clone());
                }
            }
            Step::Close { client } => out.push(Command {
                client_id: *client,
                seq: 0,
                op: Op::CloseSession,
            }),
        }
    }
    out
}

fn apply_in_batches(sm: &mut StateMachine, commands: &[Command], batch: usize) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for (i, chunk) in commands.chunks(batch.max(1)).enumerate() {
        let payload = encode_batch(1000 + i as u64, chunk);
        sm.apply(sm.applied_index() + 1, &payload, &mut outcomes);
    }
    outcomes
}

fn all_shards() -> std::ops::Range<u16> {
    0..SHARDS
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn state_machine_matches_the_model(
        steps in proptest::collection::vec(step_strategy(), 1..80),
        batch in 1usize..6,
    ) {
        let commands = commands(&steps);
        let mut sm = StateMachine::new(small_config(), all_shards());
        let outcomes = apply_in_batches(&mut sm, &commands, batch);
        let mut model = Model::new(small_config());
        let expected: Vec<Outcome> = commands.iter().map(|c| model.apply(c)).collect();
        prop_assert_eq!(outcomes, expected);
        for key in KEYS {
            let key = b(key);
            if key.len() <= 8 {
                prop_assert_eq!(
                    sm.read(&Op::Get { key: key.clone() }, ReadConsistency::Linearizable),
                    Outcome::Value(model.data.get(&key).cloned())
                );
            }
        }
    }

    #[test]
    fn snapshot_restores_an_identical_state(
        steps in proptest::collection::vec(step_strategy(), 1..60),
        chunk_target in 64usize..512,
        feed_size in 1usize..300,
    ) {
        let mut sm = StateMachine::new(small_config(), all_shards());
        apply_in_batches(&mut sm, &commands(&steps), 3);
        let stream: Vec<u8> = sm.snapshot_writer(chunk_target).flatten().collect();
        // Fed in pieces that do not line up with frames.
        let mut reader = SnapshotReader::new(small_config()).unwrap();
        for piece in stream.chunks(feed_size) {
            reader.feed(piece).unwrap();
        }
        let restored = reader.finish().unwrap();
        sm.mark_snapshot_taken();
        prop_assert_eq!(restored.state_hash(), sm.state_hash());
        prop_assert_eq!(&restored, &sm);
    }

    #[test]
    fn a_restore_in_the_middle_changes_no_outcome(
        steps in proptest::collection::vec(step_strategy(), 1..80),
        cut in any::<usize>(),
    ) {
        // Retries after the restore must be deduplicated by the restored sessions.
        let commands = commands(&steps);
        let cut = cut % (commands.len() + 1);
        let mut sm = StateMachine::new(small_config(), all_shards());
        let mut outcomes = apply_in_batches(&mut sm, &commands[..cut], 2);
        let stream: Vec<Bytes> = sm.snapshot_writer(100).collect();
        let mut restored = restore(small_config(), &stream).unwrap();
        outcomes.extend(apply_in_batches(&mut restored, &commands[cut..], 2));
        let mut model = Model::new(small_config());
        let expected: Vec<Outcome> = commands.iter().map(|c| model.apply(c)).collect();
        prop_assert_eq!(outcomes, expected);
    }

    #[test]
    fn garbage_snapshots_and_blobs_never_panic(
        garbage in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        prop_assert!(restore(small_config(), [&garbage]).is_err());
        let mut sm = StateMachine::new(small_config(), []);
        let before = sm.state_hash();
        prop_assert!(sm.import_shard(&Bytes::from(garbage)).is_err());
        prop_assert_eq!(sm.state_hash(), before);
    }

    #[test]
    fn frames_with_valid_crcs_and_garbage_bodies_never_panic(
        frames in proptest::collection::vec(
            (1u8..=7, proptest::collection::vec(any::<u8>(), 0..64)),
            0..8,
        ),
        prefix_valid_header in any::<bool>(),
    ) {
        // Passes the CRC check, so the frame parsers themselves see the garbage.
        let mut stream = Vec::new();
        if prefix_valid_header {
            let sm = StateMachine::new(small_config(), []);
            stream.extend_from_slice(&sm.snapshot_writer(64).next().unwrap());
        }
        for (kind, body) in &frames {
            let mut crc = crc32fast::Hasher::new();
            crc.update(&[*kind]);
            crc.update(body);
            stream.extend_from_slice(&(body.len() as u32).to_le_bytes());
            stream.extend_from_slice(&crc.finalize().to_le_bytes());
            stream.push(*kind);
            stream.extend_from_slice(body);
        }
        // Whatever is accepted must be a consistent state: it snapshots and restores to itself.
        if let Ok(accepted) = restore(small_config(), [&stream]) {
            let again = restore(small_config(), accepted.snapshot_writer(64)).unwrap();
            prop_assert_eq!(again.state_hash(), accepted.state_hash());
        }
        let mut sm = StateMachine::new(small_config(), []);
        let before = sm.state_hash();
        match sm.import_shard(&Bytes::from(stream)) {
            Ok(()) => prop_assert!(sm.shards().all(|(_, state)| state == ShardState::Serving)),
            Err(_) => prop_assert_eq!(sm.state_hash(), before),
        }
    }

    #[test]
    fn garbage_payloads_never_panic_and_apply_identically(
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut a = StateMachine::new(small_config(), all_shards());
        let mut c = StateMachine::new(small_config(), all_shards());
        let payload = Bytes::from(garbage);
        let out_a = a.apply_entry(1, &payload);
        let out_c = c.apply_entry(1, &payload);
        prop_assert_eq!(out_a, out_c);
        prop_assert_eq!(a.state_hash(), c.state_hash());
    }

    #[test]
    fn mutated_valid_payloads_never_panic(
        steps in proptest::collection::vec(step_strategy(), 1..10),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
    ) {
        let commands = commands(&steps);
        let mut payload = encode_batch(5, &commands).to_vec();
        for (at, byte) in flips {
            let at = at % payload.len();
            payload[at] ^= byte;
        }
        payload.truncate(cut % (payload.len() + 1));
        let payload = Bytes::from(payload);
        let mut a = StateMachine::new(small_config(), all_shards());
        let mut c = StateMachine::new(small_config(), all_shards());
        prop_assert_eq!(a.apply_entry(1, &payload), c.apply_entry(1, &payload));
        prop_assert_eq!(a.state_hash(), c.state_hash());
    }

    #[test]
    fn corrupt_or_truncated_snapshots_are_rejected(
        steps in proptest::collection::vec(step_strategy(), 1..40),
        at in any::<usize>(),
        flip in 1u8..=255,
    ) {
        let mut sm = StateMachine::new(small_config(), all_shards());
        apply_in_batches(&mut sm, &commands(&steps), 4);
        let stream: Vec<u8> = sm.snapshot_writer(128).flatten().collect();
        let at = at % stream.len();
        let mut corrupt = stream.clone();
        corrupt[at] ^= flip;
        prop_assert!(restore(small_config(), [&corrupt]).is_err());
        prop_assert!(restore(small_config(), [&stream[..at]]).is_err());
    }
}

#[test]
fn a_bad_entry_applies_nothing_and_names_its_index() {
    let mut sm = StateMachine::new(small_config(), all_shards());
    let good = encode_batch(
        1,
        &[Command {
            client_id: 0,
            seq: 0,
            op: Op::Put {
                key: b("a"),
                value: b("1"),
            },
        }],
    );
    // The same batch cut short: decoding fails before anything is applied.
    let cut = good.slice(..good.len() - 1);
    let outcomes = sm.apply_entry(7, &cut);
    assert!(
        matches!(
            &outcomes[..],
            [Outcome::Err(KvError::BadEntry { index: 7, .. })]
        ),
        "{outcomes:?}"
    );
    assert_eq!(
        sm.read(&Op::Get { key: b("a") }, ReadConsistency::Stale),
        Outcome::Value(None)
    );
    assert_eq!(sm.applied_index(), 7);
    // An empty payload is a no-op entry.
    assert!(sm.apply_entry(8, &Bytes::new()).is_empty());
}

#[test]
fn an_oversized_multi_put_writes_nothing() {
    let mut sm = StateMachine::new(small_config(), all_shards());
    let outcomes = apply_in_batches(
        &mut sm,
        &[Command {
            client_id: 0,
            seq: 0,
            op: Op::MPut {
                pairs: vec![(b("{a}x"), b("ok")), (b("{a}y"), b("seventeen-bytes!!"))],
            },
        }],
        1,
    );
    assert_eq!(
        outcomes,
        vec![Outcome::Err(KvError::ValueTooLarge {
            size_bytes: 17,
            size_bytes_max: 16
        })]
    );
    assert_eq!(sm.key_count(sm.shard_of(b"{a}x")), 0);
}

#[test]
fn default_limits_are_64_kib_keys_and_8_mib_values() {
    let config = Config::default();
    assert_eq!(config.key_bytes_max, 64 * 1024);
    assert_eq!(config.value_bytes_max, 8 * 1024 * 1024);
}
