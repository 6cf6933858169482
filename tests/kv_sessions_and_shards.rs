//! Exactly-once sessions (across snapshots, expiry, bounds) and whole-shard hand-over.

use bytes::Bytes;
use tynamo::kv::{
    encode_admin, encode_batch, restore, Command, Config, KvError, Op, Outcome, ReadConsistency,
    ShardAdmin, ShardState, StateMachine,
};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn config() -> Config {
    Config {
        shard_count: 8,
        session_ttl_ms: 1_000,
        ..Config::default()
    }
}

/// A replica with a log-index counter, so tests read like a sequence of committed entries.
struct Replica {
    sm: StateMachine,
}

impl Replica {
    fn new(config: Config, shards: impl IntoIterator<Item = u16>) -> Replica {
        Replica {
            sm: StateMachine::new(config, shards),
        }
    }

    fn batch(&mut self, timestamp_ms: u64, commands: &[Command]) -> Vec<Outcome> {
        let payload = encode_batch(timestamp_ms, commands);
        let index = self.sm.applied_index() + 1;
        self.sm.apply_entry(index, &payload)
    }

    fn one(&mut self, timestamp_ms: u64, client_id: u64, seq: u64, op: Op) -> Outcome {
        let mut out = self.batch(timestamp_ms, &[Command { client_id, seq, op }]);
        assert_eq!(out.len(), 1);
        out.pop().unwrap()
    }

    fn admin(&mut self, admin: ShardAdmin) -> Outcome {
        let index = self.sm.applied_index() + 1;
        let mut out = self.sm.apply_entry(index, &encode_admin(&admin));
        assert_eq!(out.len(), 1);
        out.pop().unwrap()
    }

    fn get(&self, key: &str) -> Outcome {
        self.sm
            .read(&Op::Get { key: b(key) }, ReadConsistency::Linearizable)
    }
}

fn append(key: &str, value: &str) -> Op {
    Op::Append {
        key: b(key),
        value: b(value),
    }
}

#[test]
fn a_retry_after_snapshot_and_restore_is_not_applied_twice() {
    let mut r = Replica::new(config(), 0..8);
    assert_eq!(r.one(10, 7, 0, Op::OpenSession), Outcome::Ok);
    assert_eq!(r.one(11, 7, 1, append("k", "x")), Outcome::Int(1));
    let snapshot: Vec<Bytes> = r.sm.snapshot_writer(256).collect();
    let mut restored = Replica {
        sm: restore(config(), &snapshot).unwrap(),
    };
    // The reply was lost; the client retries against the restored replica (a new leader).
    assert_eq!(restored.one(12, 7, 1, append("k", "x")), Outcome::Int(1));
    assert_eq!(restored.get("k"), Outcome::Value(Some(b("x"))));
    // A new write is applied.
    assert_eq!(restored.one(13, 7, 2, append("k", "y")), Outcome::Int(2));
    assert_eq!(restored.get("k"), Outcome::Value(Some(b("xy"))));
}

#[test]
fn without_a_session_a_retry_applies_twice() {
    // The control for the test above: client id 0 opts out of duplicate detection.
    let mut r = Replica::new(config(), 0..8);
    r.one(10, 0, 1, append("k", "x"));
    r.one(11, 0, 1, append("k", "x"));
    assert_eq!(r.get("k"), Outcome::Value(Some(b("xx"))));
}

#[test]
fn sessions_expire_by_log_time() {
    let mut r = Replica::new(config(), 0..8);
    r.one(0, 1, 0, Op::OpenSession);
    r.one(0, 2, 0, Op::OpenSession);
    // Client 2 stays active; client 1 goes quiet.
    r.one(900, 2, 1, append("a", "1"));
    // A leader with a clock behind does not move log time back.
    r.one(100, 2, 2, append("a", "2"));
    assert_eq!(r.sm.log_time_ms(), 900);
    r.one(1_001, 2, 3, append("a", "3"));
    assert!(!r.sm.has_session(1) && r.sm.has_session(2));
    assert_eq!(
        r.one(1_002, 1, 1, append("b", "x")),
        Outcome::Err(KvError::SessionUnknown { client_id: 1 })
    );
    assert_eq!(r.get("b"), Outcome::Value(None));
}

#[test]
fn the_session_table_is_bounded_and_evicts_the_least_recently_active() {
    let mut r = Replica::new(
        Config {
            sessions_max: 3,
            ..config()
        },
        0..8,
    );
    for client in 1..=3 {
        r.one(client, client, 0, Op::OpenSession);
    }
    r.one(10, 1, 1, append("k", "1"));
    r.one(11, 4, 0, Op::OpenSession);
    assert_eq!(r.sm.session_count(), 3);
    assert!(r.sm.has_session(1) && !r.sm.has_session(2) && r.sm.has_session(3));
}

#[test]
fn pipelined_writes_within_the_window_are_deduplicated() {
    let mut r = Replica::new(
        Config {
            session_results_max: 2,
            ..config()
        },
        0..8,
    );
    r.one(1, 9, 0, Op::OpenSession);
    // Seq 2 arrives before seq 1 (retried after a leader change): both apply once.
    assert_eq!(r.one(2, 9, 2, append("k", "b")), Outcome::Int(1));
    assert_eq!(r.one(3, 9, 1, append("k", "a")), Outcome::Int(2));
    assert_eq!(r.one(4, 9, 2, append("k", "b")), Outcome::Int(1));
    assert_eq!(r.one(5, 9, 3, append("k", "c")), Outcome::Int(3));
    // The window holds 2 and 3 now: 1's result is forgotten, so its retry is refused.
    assert_eq!(
        r.one(6, 9, 1, append("k", "a")),
        Outcome::Err(KvError::SequenceTooOld {
            client_id: 9,
            seq: 1,
            seq_floor: 2
        })
    );
    assert_eq!(r.get("k"), Outcome::Value(Some(b("bac"))));
}

#[test]
fn a_shard_moves_whole_with_the_sessions_its_retries_need() {
    let config = config();
    let key = "user:42";
    let shard = StateMachine::new(config.clone(), []).shard_of(key.as_bytes());
    let mut old = Replica::new(config.clone(), 0..8);
    let mut new = Replica::new(config.clone(), []);
    old.one(1, 5, 0, Op::OpenSession);
    assert_eq!(old.one(2, 5, 1, append(key, "a")), Outcome::Int(1));

    // Freeze: no more writes at the old owner, linearizable reads refused, stale reads served.
    assert_eq!(
        old.admin(ShardAdmin::SetState {
            shard,
            state: ShardState::Exporting
        }),
        Outcome::Ok
    );
    assert!(matches!(
        old.one(3, 5, 2, append(key, "b")),
        Outcome::Err(KvError::ShardNotServing { .. })
    ));
    assert!(matches!(
        old.get(key),
        Outcome::Err(KvError::ShardNotServing { .. })
    ));
    assert_eq!(
        old.sm
            .read(&Op::Get { key: b(key) }, ReadConsistency::Stale),
        Outcome::Value(Some(b("a")))
    );
    let blob = old.sm.export_shard(shard).unwrap();

    new.admin(ShardAdmin::SetState {
        shard,
        state: ShardState::Importing,
    });
    assert!(matches!(
        new.get(key),
        Outcome::Err(KvError::ShardNotServing { .. })
    ));
    assert_eq!(new.admin(ShardAdmin::Import { blob }), Outcome::Ok);
    assert_eq!(new.sm.shard_state(shard), Some(ShardState::Serving));
    assert_eq!(new.get(key), Outcome::Value(Some(b("a"))));
    // The client's retry of its applied write reaches the new owner: not applied again.
    assert_eq!(new.one(4, 5, 1, append(key, "a")), Outcome::Int(1));
    // Its next write (refused by the frozen old owner, never applied) is applied once.
    assert_eq!(new.one(5, 5, 2, append(key, "b")), Outcome::Int(2));
    assert_eq!(new.get(key), Outcome::Value(Some(b("ab"))));

    assert_eq!(old.admin(ShardAdmin::Delete { shard }), Outcome::Ok);
    assert_eq!(old.sm.shard_state(shard), None);
    assert_eq!(
        old.sm
            .read(&Op::Get { key: b(key) }, ReadConsistency::Stale),
        Outcome::Err(KvError::WrongShard { shard })
    );
}

#[test]
fn shard_blobs_are_checked_before_anything_is_installed() {
    let config = config();
    let mut old = Replica::new(config.clone(), 0..8);
    old.one(
        1,
        0,
        0,
        Op::Put {
            key: b("k"),
            value: b("v"),
        },
    );
    let shard = old.sm.shard_of(b"k");
    // Only a frozen shard can be exported.
    assert!(old.sm.export_shard(shard).is_err());
    old.admin(ShardAdmin::SetState {
        shard,
        state: ShardState::Exporting,
    });
    let blob = old.sm.export_shard(shard).unwrap();

    let mut new = Replica::new(config.clone(), []);
    let before = new.sm.state_hash();
    for cut in [1, blob.len() / 2, blob.len() - 1] {
        let outcome = new.admin(ShardAdmin::Import {
            blob: blob.slice(..cut),
        });
        assert!(
            matches!(outcome, Outcome::Err(KvError::BadShardBlob { .. })),
            "{outcome:?}"
        );
    }
    let mut flipped = blob.to_vec();
    flipped[blob.len() / 2] ^= 0x40;
    assert!(matches!(
        new.admin(ShardAdmin::Import {
            blob: Bytes::from(flipped)
        }),
        Outcome::Err(KvError::BadShardBlob { .. })
    ));
    // A blob cut for a different shard count does not fit this group.
    let mut other = Replica::new(
        Config {
            shard_count: 16,
            ..config.clone()
        },
        [],
    );
    assert!(matches!(
        other.admin(ShardAdmin::Import { blob: blob.clone() }),
        Outcome::Err(KvError::BadShardBlob { .. })
    ));
    // Nothing was installed by the failures (only the applied index moved).
    let mut control = Replica::new(config.clone(), []);
    for _ in 0..4 {
        control
            .sm
            .apply_entry(control.sm.applied_index() + 1, &Bytes::new());
    }
    assert_ne!(before, control.sm.state_hash());
    assert_eq!(new.sm.state_hash(), control.sm.state_hash());
    // And a good import over a serving shard is refused.
    let mut serving = Replica::new(config, [shard]);
    assert!(matches!(
        serving.admin(ShardAdmin::Import { blob }),
        Outcome::Err(KvError::ShardAdmin { .. })
    ));
}

#[test]
fn keys_outside_the_groups_shards_are_refused() {
    let mut r = Replica::new(config(), [0]);
    let key = (0..100)
        .map(|i| format!("key{i}"))
        .find(|k| r.sm.shard_of(k.as_bytes()) != 0)
        .unwrap();
    let shard = r.sm.shard_of(key.as_bytes());
    assert_eq!(
        r.one(
            1,
            0,
            0,
            Op::Put {
                key: b(&key),
                value: b("v")
            }
        ),
        Outcome::Err(KvError::WrongShard { shard })
    );
    // Multi-key commands must stay within one shard.
    let other = (0..100)
        .map(|i| format!("other{i}"))
        .find(|k| r.sm.shard_of(k.as_bytes()) != shard)
        .unwrap();
    assert!(matches!(
        r.one(
            2,
            0,
            0,
            Op::MPut {
                pairs: vec![(b(&key), b("1")), (b(&other), b("2"))]
            }
        ),
        Outcome::Err(KvError::CrossShard { .. })
    ));
}

#[test]
fn a_snapshot_is_due_after_the_configured_log_bytes() {
    let mut r = Replica::new(
        Config {
            snapshot_log_bytes_threshold: 200,
            ..config()
        },
        0..8,
    );
    let mut writes = 0;
    while !r.sm.snapshot_due() {
        r.one(
            1,
            0,
            0,
            Op::Put {
                key: b("k"),
                value: Bytes::from(vec![b'x'; 50]),
            },
        );
        writes += 1;
        assert!(writes < 10, "threshold never reached");
    }
    // Each entry is ~80 bytes: due after the third.
    assert_eq!(writes, 3);
    r.sm.mark_snapshot_taken();
    assert!(!r.sm.snapshot_due());
}

#[test]
fn a_moved_shard_refuses_retries_its_old_owner_had_forgotten() {
    let config = Config {
        session_results_max: 2,
        ..config()
    };
    let probe = StateMachine::new(config.clone(), []);
    let moved_key = "moved";
    let moved = probe.shard_of(moved_key.as_bytes());
    let other_key = (0..100)
        .map(|i| format!("other{i}"))
        .find(|k| probe.shard_of(k.as_bytes()) != moved)
        .unwrap();
    let other = probe.shard_of(other_key.as_bytes());
    let mut old = Replica::new(config.clone(), [moved, other]);
    let mut new = Replica::new(config.clone(), []);
    // The client has a session with both groups (sequence numbers are the client's own).
    old.one(1, 5, 0, Op::OpenSession);
    new.one(1, 5, 0, Op::OpenSession);
    assert_eq!(old.one(2, 5, 1, append(moved_key, "a")), Outcome::Int(1));
    // Two more writes elsewhere slide seq 1 out of the old owner's window.
    old.one(3, 5, 2, append(&other_key, "x"));
    old.one(4, 5, 3, append(&other_key, "y"));

    old.admin(ShardAdmin::SetState {
        shard: moved,
        state: ShardState::Exporting,
    });
    let blob = old.sm.export_shard(moved).unwrap();
    assert_eq!(new.admin(ShardAdmin::Import { blob }), Outcome::Ok);
    // A late retry of seq 1 must not append a second "a".
    assert!(matches!(
        new.one(5, 5, 1, append(moved_key, "a")),
        Outcome::Err(KvError::SequenceTooOld { seq: 1, .. })
    ));
    assert_eq!(new.get(moved_key), Outcome::Value(Some(b("a"))));
}
