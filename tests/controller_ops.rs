//! The controller state machine: Join, Leave, Move, Query, exactly-once, determinism, and the
//! rebalancing guarantees (counts differ by at most one, fewest moves), in the spirit of MIT
//! 6.824's shardctrler tests.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tynamo::controller::{
    rebalance, Command, Configuration, ControllerError, GroupId, HostId, HostSpec, Op, Reply,
    Settings, StateMachine, GROUP_NONE,
};

/// A controller replica fed one command per log index, like the Raft driver does.
struct Ctl {
    sm: StateMachine,
    index: u64,
}

impl Ctl {
    fn new(shard_count: u16, replication: u8) -> Ctl {
        Ctl {
            sm: StateMachine::new(Settings {
                shard_count,
                replication,
                ..Settings::default()
            })
            .unwrap(),
            index: 0,
        }
    }

    fn run(&mut self, client_id: u64, seq: u64, op: Op) -> Reply {
        self.index += 1;
        let payload = Command { client_id, seq, op }.encode();
        let reply = self.sm.apply(self.index, &payload).unwrap();
        // What goes back to the client is the encoded reply: it must decode to the same.
        assert_eq!(Reply::decode(&reply.encode()).unwrap(), reply);
        reply
    }

    fn ok(&mut self, op: Op) -> u64 {
        match self.run(0, 0, op.clone()) {
            Reply::Ok { num } => num,
            other => panic!("{op:?}: {other:?}"),
        }
    }

    fn query(&mut self, num: i64) -> Configuration {
        match self.run(0, 0, Op::Query { num }) {
            Reply::Config(c) => c,
            other => panic!("query {num}: {other:?}"),
        }
    }

    fn latest(&self) -> &Configuration {
        self.sm.latest()
    }
}

fn hosts(ids: impl IntoIterator<Item = HostId>, cores: u16) -> Vec<HostSpec> {
    ids.into_iter()
        .map(|id| HostSpec {
            id,
            cores,
            addr: format!("10.0.{}.{}:7000", id / 256, id % 256),
        })
        .collect()
}

fn join(ids: impl IntoIterator<Item = HostId>, cores: u16) -> Op {
    Op::Join {
        hosts: hosts(ids, cores),
    }
}

/// Every configuration the controller hands out must satisfy these.
fn check_config(c: &Configuration) {
    c.validate().unwrap();
    for (gid, g) in &c.groups {
        let hosts: BTreeSet<HostId> = g.hosts().collect();
        assert_eq!(
            hosts.len(),
            g.replicas.len(),
            "group {gid} replicas share a host"
        );
    }
}

fn check_balanced(c: &Configuration) {
    check_config(c);
    let counts = c.shard_counts();
    if counts.is_empty() {
        assert!(c.shards.iter().all(|&g| g == GROUP_NONE));
        return;
    }
    let min = counts.values().min().unwrap();
    let max = counts.values().max().unwrap();
    assert!(
        max - min <= 1,
        "configuration {} unbalanced: {counts:?}",
        c.num
    );
}

#[test]
fn basic_join_leave_move_query() {
    let mut ctl = Ctl::new(64, 3);
    let c0 = ctl.query(-1);
    assert_eq!(c0.num, 0);
    assert!(c0.groups.is_empty() && c0.shards.iter().all(|&g| g == GROUP_NONE));

    // Three hosts of two cores: two groups, one replica per core, 32 shards each.
    assert_eq!(ctl.ok(join(1..=3, 2)), 1);
    let c1 = ctl.query(-1);
    check_balanced(&c1);
    assert_eq!(c1.groups.len(), 2);
    assert_eq!(
        c1.shard_counts().values().copied().collect::<Vec<_>>(),
        vec![32, 32]
    );
    for g in c1.groups.values() {
        assert_eq!(g.created_in, 1);
        assert_eq!(g.voters(), vec![1, 2, 3]);
    }

    // Three more hosts: two more groups, 16 shards each, and only 32 shards moved.
    assert_eq!(ctl.ok(join(4..=6, 2)), 2);
    let c2 = ctl.query(2);
    check_balanced(&c2);
    assert_eq!(c2.groups.len(), 4);
    let moved = (0..64).filter(|&s| c1.shards[s] != c2.shards[s]).count();
    assert_eq!(moved, 32);

    // Move a shard to a given group.
    let shard = 5u16;
    let target = *c2.groups.keys().find(|&&g| g != c2.shards[5]).unwrap();
    assert_eq!(
        ctl.ok(Op::Move {
            shard,
            group: target
        }),
        3
    );
    assert_eq!(ctl.query(3).shards[usize::from(shard)], target);

    // Leave: every group with a replica on host 4 goes; shards spread over the rest.
    let on_host_4: Vec<GroupId> = ctl
        .latest()
        .groups
        .iter()
        .filter(|(_, g)| g.hosts().any(|h| h == 4))
        .map(|(&id, _)| id)
        .collect();
    assert!(!on_host_4.is_empty());
    assert_eq!(ctl.ok(Op::Leave { hosts: vec![4] }), 4);
    let c4 = ctl.query(-1);
    check_balanced(&c4);
    assert!(!c4.hosts.contains_key(&4));
    for g in &on_host_4 {
        assert!(!c4.groups.contains_key(g));
        assert!(!c4.shards.contains(g));
    }
    // Group ids are never reused.
    assert!(c4.groups.keys().all(|g| !on_host_4.contains(g)));

    // Old configurations stay queryable and unchanged.
    assert_eq!(ctl.query(1), c1);
    assert_eq!(ctl.query(2), c2);
    assert_eq!(ctl.query(0), c0);
}

#[test]
fn query_of_a_missing_or_negative_number_is_an_error() {
    let mut ctl = Ctl::new(16, 3);
    ctl.ok(join(1..=3, 1));
    assert_eq!(
        ctl.run(0, 0, Op::Query { num: 2 }),
        Reply::Err(ControllerError::NoSuchConfig { num: 2, latest: 1 })
    );
    assert_eq!(
        ctl.run(0, 0, Op::Query { num: -2 }),
        Reply::Err(ControllerError::NoSuchConfig { num: -2, latest: 1 })
    );
    assert_eq!(ctl.query(-1).num, 1);
}

#[test]
fn bad_operations_are_refused_and_change_nothing() {
    let mut ctl = Ctl::new(16, 3);
    ctl.ok(join(1..=3, 1));
    let before = ctl.latest().clone();
    let cases = vec![
        (join([2], 1), ControllerError::HostExists { host: 2 }),
        (
            Op::Join {
                hosts: [hosts([7], 1), hosts([7], 1)].concat(),
            },
            ControllerError::DuplicateHost { host: 7 },
        ),
        (
            Op::Leave { hosts: vec![9] },
            ControllerError::UnknownHost { host: 9 },
        ),
        (
            Op::Move {
                shard: 16,
                group: 1,
            },
            ControllerError::ShardOutOfRange {
                shard: 16,
                shard_count: 16,
            },
        ),
        (
            Op::Move {
                shard: 0,
                group: 99,
            },
            ControllerError::UnknownGroup { group: 99 },
        ),
        // Leaving would leave no group to own the shards.
        (
            Op::Leave { hosts: vec![1] },
            ControllerError::NoGroupLeft { groups: 1 },
        ),
    ];
    for (op, want) in cases {
        assert_eq!(ctl.run(0, 0, op.clone()), Reply::Err(want), "{op:?}");
        assert_eq!(ctl.latest(), &before, "{op:?} changed the configuration");
    }
    // A host with zero cores makes an invalid configuration: refused with the reason.
    match ctl.run(0, 0, join([8], 0)) {
        Reply::Err(ControllerError::Invalid { reason }) => {
            assert!(
                reason.contains("host 8") && reason.contains("0 cores"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The controller's hosts cannot leave until it moved.
    let mut ctl2 = Ctl::new(16, 3);
    ctl2.ok(join(1..=4, 1));
    ctl2.ok(Op::SetController {
        slots: (1..=3)
            .map(|h| tynamo::controller::Slot { host: h, core: 0 })
            .collect(),
    });
    assert_eq!(
        ctl2.run(0, 0, Op::Leave { hosts: vec![2] }),
        Reply::Err(ControllerError::HostRunsController {
            host: 2,
            node_id: 2
        })
    );
    // Controller replicas must be on distinct known hosts.
    assert!(matches!(
        ctl2.run(
            0,
            0,
            Op::SetController {
                slots: vec![
                    tynamo::controller::Slot { host: 1, core: 0 },
                    tynamo::controller::Slot { host: 1, core: 0 }
                ]
            }
        ),
        Reply::Err(ControllerError::Invalid { .. })
    ));
}

#[test]
fn a_retried_operation_is_applied_once() {
    let mut ctl = Ctl::new(16, 3);
    assert_eq!(ctl.run(7, 1, join(1..=3, 1)), Reply::Ok { num: 1 });
    // The reply was lost; the client retries the same (client, seq): same answer, no new config.
    assert_eq!(ctl.run(7, 1, join(1..=3, 1)), Reply::Ok { num: 1 });
    assert_eq!(ctl.latest().num, 1);
    // A refused operation is remembered too: the retry gets the same refusal even though the
    // state changed in between in a way that would now let it succeed.
    assert_eq!(
        ctl.run(7, 2, join([4, 4], 1)),
        Reply::Err(ControllerError::DuplicateHost { host: 4 })
    );
    assert_eq!(ctl.run(8, 1, join(4..=6, 1)), Reply::Ok { num: 2 });
    assert_eq!(
        ctl.run(7, 2, join([4, 4], 1)),
        Reply::Err(ControllerError::DuplicateHost { host: 4 })
    );
    // Interleaved clients each get exactly-once.
    assert_eq!(
        ctl.run(7, 3, Op::Move { shard: 0, group: 2 }),
        Reply::Ok { num: 3 }
    );
    assert_eq!(
        ctl.run(8, 2, Op::Move { shard: 1, group: 2 }),
        Reply::Ok { num: 4 }
    );
    assert_eq!(
        ctl.run(7, 3, Op::Move { shard: 0, group: 2 }),
        Reply::Ok { num: 3 }
    );
    assert_eq!(ctl.latest().num, 4);
    // An older sequence than the last applied is refused, not re-applied.
    assert_eq!(
        ctl.run(7, 2, Op::Move { shard: 0, group: 1 }),
        Reply::Err(ControllerError::StaleSequence {
            client_id: 7,
            seq: 2
        })
    );
    assert_eq!(ctl.latest().num, 4);
    // Without a session (client 0) a retry is applied again.
    ctl.run(0, 0, Op::Move { shard: 2, group: 1 });
    ctl.run(0, 0, Op::Move { shard: 2, group: 1 });
    assert_eq!(ctl.latest().num, 6);
    // Sessions survive a snapshot.
    let restored = StateMachine::restore(ctl.sm.settings().clone(), &ctl.sm.snapshot()).unwrap();
    assert_eq!(restored, ctl.sm);
    let mut ctl = Ctl {
        sm: restored,
        index: ctl.index,
    };
    assert_eq!(
        ctl.run(7, 3, Op::Move { shard: 0, group: 2 }),
        Reply::Ok { num: 3 }
    );
    assert_eq!(ctl.latest().num, 6);
}

#[test]
fn the_session_table_is_bounded() {
    let mut ctl = Ctl {
        sm: StateMachine::new(Settings {
            shard_count: 16,
            replication: 1,
            sessions_max: 3,
            ..Settings::default()
        })
        .unwrap(),
        index: 0,
    };
    for client in 1..=5u64 {
        ctl.run(client, 1, join([client], 1));
    }
    assert_eq!(ctl.sm.session_count(), 3);
    // Client 1 was evicted (least recently active): its retry is applied again and refused
    // as a duplicate host, which is how a forgotten session shows.
    assert_eq!(
        ctl.run(1, 1, join([1], 1)),
        Reply::Err(ControllerError::HostExists { host: 1 })
    );
    // Client 5 is remembered.
    assert_eq!(ctl.run(5, 1, join([5], 1)), Reply::Ok { num: 5 });
}

/// Many clients issuing Join/Leave/Move in an interleaved order, with retries.
#[test]
fn multi_concurrent_clients() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut ctl = Ctl::new(64, 3);
    ctl.ok(join(1..=3, 2));
    let mut next_host: HostId = 100;
    let mut seqs: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last_reply: BTreeMap<u64, (Op, Reply)> = BTreeMap::new();
    for step in 0..400 {
        let client = rng.gen_range(1..=8u64);
        // A third of the time the client retries its last operation (a lost reply).
        if rng.gen_bool(0.3) {
            if let Some((op, reply)) = last_reply.get(&client).cloned() {
                let seq = seqs[&client];
                assert_eq!(ctl.run(client, seq, op), reply, "retry at step {step}");
                continue;
            }
        }
        let latest = ctl.latest().clone();
        let kind = if latest.groups.is_empty() {
            0
        } else {
            rng.gen_range(0..3)
        };
        let op = match kind {
            0 => {
                let ids: Vec<HostId> = (next_host..next_host + 3).collect();
                next_host += 3;
                join(ids, rng.gen_range(1..=3))
            }
            1 => {
                // Leave one non-controller host chosen at random.
                let candidates: Vec<HostId> = latest.hosts.keys().copied().collect();
                let host = candidates[rng.gen_range(0..candidates.len())];
                Op::Leave { hosts: vec![host] }
            }
            _ => {
                let groups: Vec<GroupId> = latest.groups.keys().copied().collect();
                Op::Move {
                    shard: rng.gen_range(0..64),
                    group: groups[rng.gen_range(0..groups.len())],
                }
            }
        };
        let seq = seqs.entry(client).or_insert(0);
        *seq += 1;
        let seq = *seq;
        let reply = ctl.run(client, seq, op.clone());
        let after = ctl.latest().clone();
        match (&op, &reply) {
            (Op::Move { .. }, Reply::Ok { .. }) => check_config(&after),
            (_, Reply::Ok { num }) => {
                assert_eq!(*num, latest.num + 1);
                check_balanced(&after);
            }
            (Op::Leave { .. }, Reply::Err(ControllerError::NoGroupLeft { .. })) => {
                assert_eq!(after, latest)
            }
            (_, Reply::Err(e)) => panic!("step {step}: {op:?} refused: {e}"),
            _ => unreachable!(),
        }
        last_reply.insert(client, (op, reply));
    }
    // Every configuration in the history is still there, numbered consecutively.
    let latest = ctl.latest().num;
    assert!(latest > 200, "only {latest} configurations");
    for num in 0..=latest {
        assert_eq!(ctl.query(num as i64).num, num);
    }
}

/// Same operations, same configurations byte for byte, on independent replicas (and on one
/// restored from a snapshot half way).
#[test]
fn determinism_same_ops_same_bytes() {
    let ops: Vec<Op> = vec![
        join(1..=3, 4),
        join(4..=5, 2),
        join(6..=9, 3),
        Op::Move { shard: 3, group: 2 },
        Op::Leave { hosts: vec![5, 2] },
        join(10..=12, 1),
        Op::Leave { hosts: vec![7] },
    ];
    let mut a = Ctl::new(64, 3);
    let mut b = Ctl::new(64, 3);
    let mut c = Ctl::new(64, 3);
    for (i, op) in ops.iter().enumerate() {
        let ra = a.run(0, 0, op.clone());
        let rb = b.run(0, 0, op.clone());
        assert_eq!(ra.encode(), rb.encode());
        if i == 3 {
            c = Ctl {
                sm: StateMachine::restore(a.sm.settings().clone(), &a.sm.snapshot()).unwrap(),
                index: a.index,
            };
        } else if i > 3 {
            let rc = c.run(0, 0, op.clone());
            assert_eq!(ra.encode(), rc.encode());
        }
    }
    // Local reads, so that the three replicas keep the same applied index.
    for num in 0..=a.latest().num as i64 {
        let bytes = a.sm.query(num).unwrap().to_bytes();
        assert_eq!(bytes, b.sm.query(num).unwrap().to_bytes());
        assert_eq!(bytes, c.sm.query(num).unwrap().to_bytes());
    }
    assert_eq!(a.sm.snapshot(), b.sm.snapshot());
    assert_eq!(a.sm.snapshot(), c.sm.snapshot());
}

#[test]
fn placement_spreads_groups_over_cores() {
    let mut ctl = Ctl::new(64, 3);
    ctl.ok(join(1..=3, 4));
    ctl.ok(join(4..=6, 4));
    let c = ctl.query(-1);
    // 24 cores, 3 replicas each: 8 groups, each core holding exactly one replica.
    assert_eq!(c.groups.len(), 8);
    let mut per_slot = BTreeMap::new();
    for g in c.groups.values() {
        for r in &g.replicas {
            *per_slot.entry(r.slot).or_insert(0) += 1;
        }
    }
    assert_eq!(per_slot.len(), 24);
    assert!(per_slot.values().all(|&n| n == 1));
    check_balanced(&c);
}

/// 6.824's "minimal transfers" checks: after a Join only the new groups gain shards; after a
/// Leave only the departed groups' shards move; and the counts balance.
#[test]
fn minimal_moves_after_join_and_leave() {
    // One core per host and R = 3: every 3 hosts make exactly one group.
    let mut ctl = Ctl::new(64, 3);
    let mut prev = ctl.query(-1);
    for batch in 0..6u64 {
        ctl.ok(join(batch * 3 + 1..=batch * 3 + 3, 1));
        let next = ctl.query(-1);
        check_balanced(&next);
        let new_groups: BTreeSet<GroupId> = next
            .groups
            .keys()
            .filter(|g| !prev.groups.contains_key(g))
            .copied()
            .collect();
        assert_eq!(new_groups.len(), 1);
        for s in 0..64 {
            if prev.shards[s] != next.shards[s] && prev.shards[s] != GROUP_NONE {
                assert!(
                    new_groups.contains(&next.shards[s]),
                    "shard {s} moved between old groups"
                );
            }
        }
        // The new group takes exactly its balanced share.
        let moved = (0..64)
            .filter(|&s| prev.shards[s] != next.shards[s])
            .count();
        if batch > 0 {
            assert_eq!(moved, next.shard_counts()[new_groups.first().unwrap()]);
        }
        prev = next;
    }
    for batch in 0..5u64 {
        ctl.ok(Op::Leave {
            hosts: (batch * 3 + 1..=batch * 3 + 3).collect(),
        });
        let next = ctl.query(-1);
        check_balanced(&next);
        let gone: BTreeSet<GroupId> = prev
            .groups
            .keys()
            .filter(|g| !next.groups.contains_key(g))
            .copied()
            .collect();
        assert_eq!(gone.len(), 1);
        for s in 0..64 {
            if prev.shards[s] != next.shards[s] {
                assert!(
                    gone.contains(&prev.shards[s]),
                    "shard {s} of a staying group moved"
                );
            }
        }
        prev = next;
    }
    assert_eq!(prev.groups.len(), 1);
    assert!(prev.shards.iter().all(|&g| g == prev.shards[0]));
}

#[test]
fn move_then_join_and_leave_rebalance_minimally() {
    let mut ctl = Ctl::new(32, 3);
    ctl.ok(join(1..=6, 1));
    let c = ctl.query(-1);
    let (g1, g2) = {
        let mut ids = c.groups.keys();
        (*ids.next().unwrap(), *ids.next().unwrap())
    };
    // Move everything to g1: Query shows exactly what was moved.
    for s in 0..32u16 {
        ctl.ok(Op::Move {
            shard: s,
            group: g1,
        });
        assert_eq!(ctl.query(-1).shards[usize::from(s)], g1);
    }
    let before = ctl.query(-1);
    assert_eq!(before.shard_counts()[&g2], 0);
    // A join rebalances: g1 gives up exactly what the others need and keeps the rest.
    ctl.ok(join(7..=9, 1));
    let after = ctl.query(-1);
    check_balanced(&after);
    let moved = (0..32)
        .filter(|&s| before.shards[s] != after.shards[s])
        .count();
    assert_eq!(moved, 32 - after.shard_counts()[&g1]);
    assert_eq!(after.shard_counts()[&g1], 11);
}

/// Against brute force on small cases: the rebalancer's moves equal the fewest any balanced
/// assignment needs, for random starting assignments.
#[test]
fn rebalance_matches_brute_force_minimum() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for _ in 0..300 {
        let n = rng.gen_range(1..=7usize);
        let g = rng.gen_range(1..=3u64);
        let groups: BTreeSet<GroupId> = (1..=g).collect();
        // Owners drawn from existing groups, removed groups (4, 5) and none.
        let start: Vec<GroupId> = (0..n).map(|_| rng.gen_range(0..=5)).collect();
        let mut shards = start.clone();
        let moved = rebalance(&mut shards, &groups);
        assert_eq!(moved, (0..n).filter(|&i| start[i] != shards[i]).count());
        let counts: Vec<usize> = groups
            .iter()
            .map(|gid| shards.iter().filter(|&&o| o == *gid).count())
            .collect();
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
        assert_eq!(counts.iter().sum::<usize>(), n);
        // Brute force over all g^n assignments.
        let mut best = usize::MAX;
        let total = (g as usize).pow(n as u32);
        for code in 0..total {
            let mut x = code;
            let mut assign = vec![0u64; n];
            for a in assign.iter_mut() {
                *a = (x % g as usize) as u64 + 1;
                x /= g as usize;
            }
            let c: Vec<usize> = (1..=g)
                .map(|gid| assign.iter().filter(|&&o| o == gid).count())
                .collect();
            if c.iter().max().unwrap() - c.iter().min().unwrap() <= 1 {
                best = best.min((0..n).filter(|&i| start[i] != assign[i]).count());
            }
        }
        assert_eq!(moved, best, "start {start:?} groups {g}");
    }
}
