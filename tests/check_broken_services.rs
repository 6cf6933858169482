//! Histories of deliberately broken services, built on the real state machine, must be caught
//! by the checker; the same scenarios without the bug must pass.
//!
//! The three bugs: a stale read served by a deposed leader, an acknowledged write lost in a
//! crash, and a retried write applied twice.

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tynamo::check::{
    check_history, CheckConfig, ClientId, JsonBytes, OpKind, Record, Status, Verdict,
};
use tynamo::kv::{
    encode_batch, restore, Command, Config, Op, Outcome, ReadConsistency, StateMachine,
};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn config() -> Config {
    Config {
        shard_count: 4,
        ..Config::default()
    }
}

/// A replicated log shared by replicas that apply it at their own pace, plus the history the
/// clients observe.
struct Service {
    log: Vec<Bytes>,
    replicas: Vec<StateMachine>,
    history: Vec<Record>,
}

impl Service {
    fn new(replicas: usize) -> Service {
        Service {
            log: Vec::new(),
            replicas: (0..replicas)
                .map(|_| StateMachine::new(config(), 0..4))
                .collect(),
            history: Vec::new(),
        }
    }

    /// Commits a command and returns its log index.
    fn commit(&mut self, command: Command) -> u64 {
        let timestamp_ms = self.log.len() as u64;
        self.log.push(encode_batch(timestamp_ms, &[command]));
        self.log.len() as u64
    }

    /// Applies the log on `replica` up to `index`; returns the outcome of entry `index`.
    fn catch_up(&mut self, replica: usize, index: u64) -> Option<Outcome> {
        let sm = &mut self.replicas[replica];
        let mut last = None;
        while sm.applied_index() < index {
            let next = sm.applied_index() + 1;
            let mut outcomes = sm.apply_entry(next, &self.log[next as usize - 1]);
            last = outcomes.pop();
        }
        last
    }

    fn read(&self, replica: usize, key: &str) -> Option<Bytes> {
        match self.replicas[replica].read(&Op::Get { key: b(key) }, ReadConsistency::Linearizable) {
            Outcome::Value(v) => v,
            other => panic!("read failed: {other:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        client: u64,
        op: OpKind,
        key: &str,
        value: Option<&str>,
        invoke: u64,
        complete: u64,
        result: Option<Bytes>,
    ) {
        self.history.push(Record {
            client: ClientId::Number(client),
            op,
            key: JsonBytes::from(key),
            value: value.map(JsonBytes::from),
            invoke,
            complete: Some(complete),
            result: result.map(JsonBytes),
            status: Status::Ok,
        });
    }

    /// A write through the leader: committed, applied on `leader` and `followers`, answered.
    fn write(
        &mut self,
        leader: usize,
        followers: &[usize],
        client: u64,
        op: Op,
        invoke: u64,
        complete: u64,
    ) {
        let (kind, key, value) = match &op {
            Op::Put { key, value } => (OpKind::Put, key.clone(), Some(value.clone())),
            Op::Append { key, value } => (OpKind::Append, key.clone(), Some(value.clone())),
            other => panic!("unsupported {other:?}"),
        };
        let index = self.commit(Command {
            client_id: 0,
            seq: 0,
            op,
        });
        self.catch_up(leader, index);
        for &f in followers {
            self.catch_up(f, index);
        }
        let key = String::from_utf8(key.to_vec()).unwrap();
        let value = value.map(|v| String::from_utf8(v.to_vec()).unwrap());
        self.record(client, kind, &key, value.as_deref(), invoke, complete, None);
    }

    fn get(&mut self, replica: usize, client: u64, key: &str, invoke: u64, complete: u64) {
        let result = self.read(replica, key);
        self.record(client, OpKind::Get, key, None, invoke, complete, result);
    }

    fn verdict(&self) -> Verdict {
        check_history(&self.history, &CheckConfig::default()).verdict
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: b(key),
        value: b(value),
    }
}

/// Replicas 0, 1, 2; replica 0 leads, then is partitioned away and replica 1 takes over while
/// 0 still believes it leads. With `bug`, a client's read is served by 0 without confirming
/// leadership (no ReadIndex round, no lease check).
fn deposed_leader_scenario(bug: bool) -> Verdict {
    let mut s = Service::new(3);
    s.write(0, &[1, 2], 1, put("x", "v1"), 1, 2);
    // Unrelated concurrent traffic on another key, so the checker has more than one key.
    s.write(0, &[1, 2], 4, put("y", "a"), 1, 3);
    s.get(0, 4, "y", 4, 5);
    // Partition: 0 is cut off; 1 is elected and commits x = v2 with 2.
    s.write(1, &[2], 2, put("x", "v2"), 10, 12);
    // A read concurrent with nothing, after v2 was acknowledged.
    let replica = if bug { 0 } else { 1 };
    s.get(replica, 3, "x", 20, 21);
    s.verdict()
}

#[test]
fn a_stale_read_from_a_deposed_leader_is_caught() {
    match deposed_leader_scenario(true) {
        Verdict::NotLinearizable { key, ops } => {
            assert_eq!(key, JsonBytes::from("x"));
            assert_eq!(ops.len(), 3);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(deposed_leader_scenario(false), Verdict::Linearizable);
}

/// The leader acknowledges `x = b` once it is committed; then it crashes. With `bug`, it comes
/// back from its last snapshot without replaying the log after it (as if the acknowledged
/// entry had never been made durable), and serves reads.
fn lost_write_scenario(bug: bool) -> Verdict {
    let mut s = Service::new(1);
    s.write(0, &[], 1, put("x", "a"), 1, 2);
    let snapshot: Vec<Bytes> = s.replicas[0].snapshot_writer(4096).collect();
    s.write(0, &[], 2, put("x", "b"), 3, 5);
    // Crash and restart.
    s.replicas[0] = restore(config(), &snapshot).unwrap();
    if !bug {
        let end = s.log.len() as u64;
        s.catch_up(0, end);
    }
    s.get(0, 3, "x", 10, 11);
    s.verdict()
}

#[test]
fn a_lost_acknowledged_write_is_caught() {
    assert!(matches!(
        lost_write_scenario(true),
        Verdict::NotLinearizable { .. }
    ));
    assert_eq!(lost_write_scenario(false), Verdict::Linearizable);
}

/// A client's append is committed and applied, but the reply is lost; the client retries the
/// same write. With `bug`, the service does no duplicate detection (client id 0).
fn double_apply_scenario(bug: bool) -> Verdict {
    let mut s = Service::new(1);
    let client_id = if bug { 0 } else { 77 };
    let open = s.commit(Command {
        client_id: 77,
        seq: 0,
        op: Op::OpenSession,
    });
    s.catch_up(0, open);
    let append = Command {
        client_id,
        seq: 1,
        op: Op::Append {
            key: b("k"),
            value: b("x"),
        },
    };
    let first = s.commit(append.clone());
    s.catch_up(0, first);
    let retry = s.commit(append);
    let outcome = s.catch_up(0, retry);
    assert!(matches!(outcome, Some(Outcome::Int(_))), "{outcome:?}");
    // One logical operation from the client's view: invoked before the first attempt,
    // completed with the retry's answer.
    s.record(1, OpKind::Append, "k", Some("x"), 1, 6, None);
    s.get(0, 2, "k", 7, 8);
    s.verdict()
}

#[test]
fn a_double_applied_retry_is_caught() {
    assert!(matches!(
        double_apply_scenario(true),
        Verdict::NotLinearizable { .. }
    ));
    assert_eq!(double_apply_scenario(false), Verdict::Linearizable);
}

/// Many clients append unique tokens and read, through one leader; replies are lost at random
/// and the clients retry. Operations take effect when applied, so with sessions the history is
/// linearizable; without, every duplicated token is visible to the final reads.
fn random_retries(seed: u64, sessions: bool) -> (Verdict, bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut s = Service::new(1);
    let clients = 5u64;
    if sessions {
        for client in 1..=clients {
            let index = s.commit(Command {
                client_id: client,
                seq: 0,
                op: Op::OpenSession,
            });
            s.catch_up(0, index);
        }
    }
    let keys = ["k0", "k1"];
    // Per client: the in-flight op (invoke time, command, applied at least once).
    let mut in_flight: Vec<Option<(u64, Command, bool)>> = vec![None; clients as usize + 1];
    let mut seq = vec![0u64; clients as usize + 1];
    let mut duplicated = false;
    let mut now = 10u64;
    for _ in 0..400 {
        now += 1;
        let client = rng.gen_range(1..=clients);
        let slot = client as usize;
        match in_flight[slot].take() {
            None => {
                let key = keys[rng.gen_range(0..keys.len())];
                if rng.gen_bool(0.3) {
                    s.get(0, client, key, now, now + 1);
                    now += 1;
                    continue;
                }
                seq[slot] += 1;
                let command = Command {
                    client_id: if sessions { client } else { 0 },
                    seq: seq[slot],
                    op: Op::Append {
                        key: b(key),
                        value: b(&format!("<{client}.{}>", seq[slot])),
                    },
                };
                in_flight[slot] = Some((now, command, false));
            }
            Some((invoke, command, applied)) => {
                let index = s.commit(command.clone());
                s.catch_up(0, index);
                duplicated |= applied && !sessions;
                if rng.gen_bool(0.3) {
                    // The reply is lost: the client will retry the same command.
                    in_flight[slot] = Some((invoke, command, true));
                    continue;
                }
                let Op::Append { key, value } = &command.op else {
                    unreachable!()
                };
                let key = String::from_utf8(key.to_vec()).unwrap();
                let value = String::from_utf8(value.to_vec()).unwrap();
                s.record(
                    client,
                    OpKind::Append,
                    &key,
                    Some(&value),
                    invoke,
                    now,
                    None,
                );
            }
        }
    }
    // Operations still in flight are timed out; then every key is read once more.
    for (client, op) in in_flight.iter().enumerate() {
        if let Some((invoke, command, _)) = op {
            let Op::Append { key, value } = &command.op else {
                unreachable!()
            };
            s.history.push(Record {
                client: ClientId::Number(client as u64),
                op: OpKind::Append,
                key: JsonBytes(key.clone()),
                value: Some(JsonBytes(value.clone())),
                invoke: *invoke,
                complete: None,
                result: None,
                status: Status::Timeout,
            });
        }
    }
    for key in keys {
        now += 2;
        s.get(0, 0, key, now, now + 1);
    }
    (s.verdict(), duplicated)
}

#[test]
fn random_retries_with_sessions_are_linearizable_and_without_them_are_caught() {
    let mut caught = 0;
    for seed in 0..10 {
        let (verdict, _) = random_retries(seed, true);
        assert_eq!(verdict, Verdict::Linearizable, "seed {seed} with sessions");
        let (verdict, duplicated) = random_retries(seed, false);
        if duplicated {
            assert!(
                matches!(verdict, Verdict::NotLinearizable { .. }),
                "seed {seed}: a duplicated append went unnoticed: {verdict:?}"
            );
            caught += 1;
        }
    }
    // The workload does provoke the bug.
    assert!(caught >= 8, "only {caught} seeds duplicated a write");
}
