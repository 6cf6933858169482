//! Named scenarios of the sharded world, in the spirit of MIT 6.824's shardctrler and shardkv
//! tests: each asserts what its name says, on top of the checks every world runs after every
//! tick (Raft invariants of every group, kv / migration agreement, never two groups accepting
//! writes for one shard in one configuration) and, at the end, the linearizability checker
//! over the whole history including a final read of every key.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use tynamo::check::{OpKind, Record, Status};
use tynamo::controller::{Configuration, GroupId, HostId, HostSpec, Op, Reply};
use tynamo::shard::key_shard;
use tynamo::sim::kv::check_linearizable;
use tynamo::sim::shard::{
    finish, run_shard_seed, snapshot_now, Breakage, ScriptOp, ShardOptions, World, WorldConfig,
};
use tynamo::sim::{Failure, Faults, NetConfig, Steps};

const SETTLE_TICKS_MAX: u64 = 3_000;

fn spec(id: HostId) -> HostSpec {
    HostSpec {
        id,
        cores: 1,
        addr: format!("h{id}:7000"),
    }
}

fn join(ids: &[HostId]) -> Op {
    Op::Join {
        hosts: ids.iter().map(|&h| spec(h)).collect(),
    }
}

fn leave(ids: &[HostId]) -> Op {
    Op::Leave {
        hosts: ids.to_vec(),
    }
}

/// A world of `hosts` one-core hosts whose clients only run scripted operations.
fn world(seed: u64, hosts: u64) -> World {
    let mut w = World::new(WorldConfig::new(
        seed,
        (1..=hosts).map(|h| (h, 1)).collect(),
    ));
    w.clients.set_accepting(false);
    w
}

/// Runs until the admin finished and every group applied the latest configuration.
fn settle(w: &mut World) {
    let ok = w
        .run_until(SETTLE_TICKS_MAX, |w| w.admin_idle() && w.settled())
        .unwrap_or_else(|v| panic!("{v}\n{}", w.describe()));
    assert!(ok, "not settled:\n{}", w.describe());
}

fn run(w: &mut World, ticks: u64) {
    w.run_ticks(ticks)
        .unwrap_or_else(|v| panic!("{v}\n{}", w.describe()));
}

/// Heals, drains, reads every key, and checks the history.
fn check(w: &mut World) -> Vec<Record> {
    finish(w).unwrap_or_else(|f| panic!("{f}\n{}", w.describe()));
    let history = w.clients.finish_history();
    check_linearizable(&history).unwrap_or_else(|e| panic!("{e}"));
    history
}

/// Scripts `rounds` appends to every key, spread over the clients.
fn appends(w: &mut World, rounds: usize) {
    let keys = w.cfg.clients.keys;
    let clients = w.clients.len();
    for k in 0..keys {
        let ops: Vec<ScriptOp> = (0..rounds).map(|_| ScriptOp::Append(k)).collect();
        w.clients.script(k % clients, &ops);
    }
}

fn wait_clients(w: &mut World) {
    let ok = w
        .run_until(SETTLE_TICKS_MAX, |w| w.clients.idle())
        .unwrap_or_else(|v| panic!("{v}\n{}", w.describe()));
    assert!(ok, "clients busy:{}", w.clients.describe());
}

fn latest(w: &World) -> Configuration {
    w.latest_config()
        .cloned()
        .expect("a live controller replica")
}

fn key_of(k: usize) -> Bytes {
    Bytes::from(format!("k{k}"))
}

fn ok_ops(history: &[Record]) -> usize {
    history.iter().filter(|r| r.status == Status::Ok).count()
}

fn admin_ok_nums(w: &World) -> Vec<u64> {
    admin_ok_nums_of(w, 0)
}

fn admin_ok_nums_of(w: &World, admin: usize) -> Vec<u64> {
    w.admin_replies_of(admin)
        .iter()
        .filter_map(|(_, r)| match r {
            Reply::Ok { num } => Some(*num),
            _ => None,
        })
        .collect()
}

fn assert_balanced(c: &Configuration) {
    let counts = c.shard_counts();
    let (lo, hi) = (
        counts.values().min().copied().unwrap_or(0),
        counts.values().max().copied().unwrap_or(0),
    );
    assert!(
        hi - lo <= 1,
        "unbalanced {counts:?} in configuration {}",
        c.num
    );
    for (s, owner) in c.shards.iter().enumerate() {
        assert!(c.groups.contains_key(owner), "shard {s} owned by {owner}");
    }
}

// ----- controller ------------------------------------------------------------------------

#[test]
fn controller_basic_join_leave_move_and_query() {
    let mut w = world(1, 6);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    let c1 = latest(&w);
    assert_eq!(c1.num, 1);
    assert_eq!(c1.groups.len(), 1, "three one-core hosts make one group");
    assert_balanced(&c1);
    w.admin(join(&[4, 5, 6]));
    settle(&mut w);
    let c2 = latest(&w);
    assert_eq!(c2.groups.len(), 2);
    assert_balanced(&c2);
    let g_new = *c2.groups.keys().max().unwrap();
    w.admin(Op::Move {
        shard: 0,
        group: g_new,
    });
    settle(&mut w);
    assert_eq!(
        latest(&w).owner(0),
        Some(g_new),
        "Move put shard 0 on {g_new}"
    );
    w.admin(leave(&[1]));
    settle(&mut w);
    let c4 = latest(&w);
    assert!(!c4.hosts.contains_key(&1));
    assert_eq!(c4.groups.len(), 1, "five cores of R=3 make one group");
    assert_balanced(&c4);
    // Every operation succeeded once, in order, and Query(n) returns what they produced.
    assert_eq!(admin_ok_nums(&w), vec![1, 2, 3, 4]);
    assert_eq!(w.config(2), Some(&c2));
    // A Move to a group that does not exist is refused and changes nothing.
    w.admin(Op::Move {
        shard: 1,
        group: 999,
    });
    settle(&mut w);
    assert!(matches!(w.admin_replies().last(), Some((_, Reply::Err(_)))));
    assert_eq!(latest(&w).num, 4);
    check(&mut w);
}

#[test]
fn controller_multi_concurrent_admins_under_faults_each_operation_applies_once() {
    let mut w = world(2, 9);
    w.set_nets(lossy(), lossy());
    w.clients.set_accepting(true);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    // Three admins at once, each with its own session, through lost and duplicated messages
    // and controller crashes.
    let scripts: [Vec<Op>; 3] = [
        vec![
            join(&[4]),
            Op::Move { shard: 3, group: 1 },
            leave(&[4]),
            join(&[4]),
        ],
        vec![
            join(&[5, 6]),
            leave(&[2]),
            join(&[2]),
            Op::Move { shard: 1, group: 1 },
        ],
        vec![
            join(&[7]),
            Op::Move { shard: 6, group: 1 },
            join(&[8, 9]),
            leave(&[7]),
        ],
    ];
    let sent: usize = scripts.iter().map(Vec::len).sum();
    for (admin, ops) in scripts.into_iter().enumerate() {
        for op in ops {
            w.admin_as(admin, op);
        }
    }
    for h in [1, 2, 3, 1] {
        run(&mut w, 40);
        w.crash_host(h);
        run(&mut w, 30);
        w.restart_host(h).unwrap();
    }
    w.set_nets(NetConfig::reliable(), NetConfig::reliable());
    settle(&mut w);
    // One answer per operation; every configuration after the first is the product of exactly
    // one successful operation (retries never made a second one, none was lost).
    let mut nums: Vec<u64> = Vec::new();
    let mut answers = 0;
    for admin in 0..3 {
        answers += w.admin_replies_of(admin).len();
        let mine = admin_ok_nums_of(&w, admin);
        // One admin's operations apply in its order.
        assert!(
            mine.windows(2).all(|p| p[0] < p[1]),
            "admin {admin}: {mine:?}"
        );
        nums.extend(mine);
    }
    // The first Join plus the scripts.
    assert_eq!(answers, sent + 1);
    nums.sort_unstable();
    let k = latest(&w).num;
    assert_eq!(nums, (1..=k).collect::<Vec<u64>>());
    assert!(k >= 8, "only {k} configurations");
    appends(&mut w, 2);
    wait_clients(&mut w);
    check(&mut w);
}

#[test]
fn controller_minimal_moves_only_shards_for_the_new_group_move() {
    let mut w = world(3, 9);
    w.cfg.shard_count = 8;
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    for hosts in [[4, 5, 6], [7, 8, 9]] {
        let before = latest(&w);
        w.admin(join(&hosts));
        settle(&mut w);
        let after = latest(&w);
        let created: BTreeSet<GroupId> = after.groups_created().map(|(g, _)| g).collect();
        assert_eq!(created.len(), 1);
        let moved: Vec<usize> = (0..before.shards.len())
            .filter(|&s| before.shards[s] != after.shards[s])
            .collect();
        // Only shards for the new group move, and exactly as many as it needs.
        for &s in &moved {
            assert!(
                created.contains(&after.shards[s]),
                "shard {s} moved between old groups"
            );
        }
        let groups = after.groups.len();
        assert_eq!(moved.len(), before.shards.len() / groups, "moves {moved:?}");
    }
    // Leaving a group's hosts moves only that group's shards.
    let before = latest(&w);
    let gone: GroupId = *before.groups.keys().next().unwrap();
    let gone_hosts: Vec<HostId> = before.groups[&gone].hosts().collect();
    w.admin(leave(&gone_hosts));
    settle(&mut w);
    let after = latest(&w);
    for s in 0..before.shards.len() {
        if before.shards[s] != gone {
            assert_eq!(
                before.shards[s], after.shards[s],
                "shard {s} moved needlessly"
            );
        }
    }
    assert_balanced(&after);
    check(&mut w);
}

// ----- shardkv -------------------------------------------------------------------------

#[test]
fn static_shards_a_group_down_blocks_only_its_shards() {
    let mut cfg = WorldConfig::new(4, (1..=6).map(|h| (h, 1)).collect());
    cfg.clients = tynamo::sim::shard::ClientsConfig::new(4, 12);
    let mut w = World::new(cfg);
    w.clients.set_accepting(false);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    w.admin(join(&[4, 5, 6]));
    settle(&mut w);
    appends(&mut w, 1);
    wait_clients(&mut w);
    let c = latest(&w);
    let ids: Vec<GroupId> = c.groups.keys().copied().collect();
    let (up, down) = (ids[0], ids[1]);
    let down_hosts: Vec<HostId> = c.groups[&down].hosts().collect();
    let up_hosts: BTreeSet<HostId> = c.groups[&up].hosts().collect();
    assert!(
        down_hosts.iter().all(|h| !up_hosts.contains(h)),
        "groups share hosts"
    );
    let shard_count = c.shard_count();
    let owner_of = |k: usize| c.owner(key_shard(&key_of(k), shard_count)).unwrap();
    let (up_keys, down_keys): (Vec<usize>, Vec<usize>) =
        (0..w.cfg.clients.keys).partition(|&k| owner_of(k) == up);
    assert!(!up_keys.is_empty() && !down_keys.is_empty());
    // A majority of one group goes down.
    for &h in &down_hosts[..2] {
        w.crash_host(h);
    }
    let started = w.now;
    // Client 0 works on the downed group's keys, the others on the live group's.
    let down_ops: Vec<ScriptOp> = down_keys.iter().map(|&k| ScriptOp::Append(k)).collect();
    w.clients.script(0, &down_ops);
    for (i, &k) in up_keys.iter().enumerate() {
        let client = 1 + i % (w.clients.len() - 1);
        w.clients
            .script(client, &[ScriptOp::Append(k), ScriptOp::Get(k)]);
    }
    run(&mut w, 300);
    let after: Vec<&Record> = w
        .clients
        .history()
        .iter()
        .filter(|r| r.invoke >= started)
        .collect();
    let key_num =
        |r: &Record| -> usize { std::str::from_utf8(&r.key.0[1..]).unwrap().parse().unwrap() };
    // Every operation on the live group's shards answered; none on the downed group's did.
    let served: Vec<usize> = after
        .iter()
        .filter(|r| r.status == Status::Ok)
        .map(|r| key_num(r))
        .collect();
    assert!(served.iter().all(|&k| owner_of(k) == up), "{after:?}");
    assert_eq!(served.len(), up_keys.len() * 2, "{after:?}");
    for &h in &down_hosts[..2] {
        w.restart_host(h).unwrap();
    }
    wait_clients(&mut w);
    check(&mut w);
}

#[test]
fn join_then_leave_moves_every_shard_and_stops_the_old_group() {
    let mut w = world(5, 6);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    appends(&mut w, 2);
    wait_clients(&mut w);
    let first: GroupId = *latest(&w).groups.keys().next().unwrap();
    w.admin(join(&[4, 5, 6]));
    appends(&mut w, 2);
    settle(&mut w);
    wait_clients(&mut w);
    w.admin(leave(&[1, 2, 3]));
    appends(&mut w, 2);
    settle(&mut w);
    wait_clients(&mut w);
    let c = latest(&w);
    assert!(!c.groups.contains_key(&first));
    assert_eq!(c.groups.len(), 1);
    let g = &w.groups[&first];
    assert!(g.stopped, "the retired group drained and stopped");
    assert!(
        w.moves() >= u64::from(c.shard_count()),
        "every shard moved at least once"
    );
    let history = check(&mut w);
    assert!(ok_ops(&history) >= 6 * w.cfg.clients.keys);
}

#[test]
fn snapshots_during_reconfiguration_restore_both_halves() {
    let mut cfg = WorldConfig::new(6, (1..=6).map(|h| (h, 1)).collect());
    cfg.snapshot_threshold_bytes = 256;
    let mut w = World::new(cfg);
    w.clients.set_accepting(false);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    appends(&mut w, 4);
    wait_clients(&mut w);
    appends(&mut w, 2);
    w.admin(join(&[4, 5, 6]));
    // Crash a replica of each group mid-migration: they restart from their snapshots.
    w.run_until(SETTLE_TICKS_MAX, |w| {
        w.groups.len() == 2 && w.latest_config().is_some_and(|c| c.num == 2)
    })
    .unwrap();
    assert!(!w.settled(), "the crash should come mid-migration");
    w.crash_host(2);
    w.crash_host(5);
    run(&mut w, 40);
    // The crashed replicas restart from snapshots on their disks (and the log after them).
    let from_snapshot = w
        .groups
        .values()
        .flat_map(|g| g.cluster.nodes.iter())
        .filter(|n| n.raft.is_none() && n.disk.snapshot().is_some())
        .count();
    assert!(from_snapshot > 0, "no crashed replica holds a snapshot");
    w.restart_host(2).unwrap();
    w.restart_host(5).unwrap();
    settle(&mut w);
    wait_clients(&mut w);
    assert!(w.stats.snapshots_taken > 0, "no snapshot was taken");
    let restored = w
        .groups
        .values()
        .flat_map(|g| g.cluster.nodes.iter())
        .filter(|n| n.disk.snapshot().is_some())
        .count();
    assert!(restored > 0, "no replica holds a snapshot");
    check(&mut w);
}

#[test]
fn missed_change_a_replica_down_across_configurations_catches_up() {
    let mut w = world(7, 6);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    appends(&mut w, 1);
    wait_clients(&mut w);
    w.crash_host(3);
    w.admin(join(&[4, 5, 6]));
    w.admin(Op::Move { shard: 0, group: 1 });
    w.admin(Op::Move { shard: 1, group: 1 });
    appends(&mut w, 1);
    settle(&mut w);
    wait_clients(&mut w);
    let num = latest(&w).num;
    assert_eq!(num, 4);
    w.restart_host(3).unwrap();
    let caught_up = w
        .run_until(SETTLE_TICKS_MAX, |w| {
            w.groups.values().all(|g| {
                let leader = g.leader_app().map(|a| a.shards().clone());
                g.cluster
                    .nodes
                    .iter()
                    .all(|n| Some(n.app.shards().clone()) == leader)
            })
        })
        .unwrap();
    assert!(
        caught_up,
        "host 3's replicas did not catch up:\n{}",
        w.describe()
    );
    for g in w.groups.values() {
        for n in &g.cluster.nodes {
            assert_eq!(
                n.app.shards().config_num(),
                num,
                "group {} replica {}",
                g.id,
                n.id
            );
        }
    }
    check(&mut w);
}

fn concurrent(seed: u64, ops: Vec<Op>, crash: bool) {
    let mut w = world(seed, 6);
    w.clients.set_accepting(true);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    for op in ops {
        w.admin(op);
        if crash {
            let h = w.random_host();
            w.crash_host(h);
            run(&mut w, 25);
            w.restart_host(h).unwrap();
        }
        run(&mut w, 40);
    }
    settle(&mut w);
    let history = check(&mut w);
    assert!(w.moves() > 0);
    assert!(
        ok_ops(&history) > 50,
        "{} operations completed",
        ok_ops(&history)
    );
}

#[test]
fn concurrent_puts_during_joins() {
    concurrent(8, vec![join(&[4]), join(&[5]), join(&[6])], false);
}

#[test]
fn concurrent_puts_during_joins_and_leaves() {
    concurrent(
        9,
        vec![join(&[4, 5, 6]), leave(&[1]), join(&[1]), leave(&[2, 3])],
        false,
    );
}

#[test]
fn concurrent_puts_during_joins_leaves_and_moves_with_crashes() {
    concurrent(
        10,
        vec![
            join(&[4, 5, 6]),
            Op::Move { shard: 2, group: 1 },
            leave(&[4]),
            join(&[4]),
            leave(&[1]),
        ],
        true,
    );
}

fn lossy() -> NetConfig {
    NetConfig {
        drop_per_million: 100_000,
        dup_per_million: 50_000,
        delay_ticks_min: 1,
        delay_ticks_max: 6,
    }
}

fn unreliable(seed: u64, partitions: bool, lost_replies: u32) {
    let mut cfg = WorldConfig::new(seed, (1..=6).map(|h| (h, 1)).collect());
    cfg.raft_net = lossy();
    cfg.rpc_net = lossy();
    cfg.clients.lost_replies_percent = lost_replies;
    let mut w = World::new(cfg);
    w.admin(join(&[1, 2, 3]));
    run(&mut w, 100);
    for (i, op) in [join(&[4, 5, 6]), leave(&[2]), join(&[2]), leave(&[5])]
        .into_iter()
        .enumerate()
    {
        w.admin(op);
        if partitions {
            w.partition(&[(i as u64 % 6) + 1]);
            run(&mut w, 60);
            w.heal();
        }
        run(&mut w, 80);
    }
    let history = check(&mut w);
    assert_eq!(latest(&w).num, 5);
    assert!(w.moves() > 0);
    assert!(
        ok_ops(&history) > 30,
        "{} operations completed",
        ok_ops(&history)
    );
}

#[test]
fn unreliable_network_during_reconfiguration_loss_and_duplication() {
    unreliable(11, false, 0);
}

#[test]
fn unreliable_network_during_reconfiguration_with_partitions() {
    unreliable(12, true, 0);
}

#[test]
fn unreliable_network_during_reconfiguration_with_lost_replies() {
    unreliable(13, true, 20);
}

/// The kv part of the largest snapshot on `group`'s replicas after each snapshots now.
fn kv_snapshot_bytes(w: &mut World, group: GroupId) -> usize {
    let g = w.groups.get_mut(&group).unwrap();
    for id in g.cluster.ids() {
        snapshot_now(&mut g.cluster, id).unwrap();
    }
    g.cluster
        .nodes
        .iter()
        .filter_map(|n| {
            let s = n.disk.snapshot()?;
            Some(s.data.len() - n.app.shards().encode().len())
        })
        .max()
        .unwrap()
}

#[test]
fn deleting_shards_frees_the_old_owners_storage() {
    let mut w = world(14, 6);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    appends(&mut w, 10);
    wait_clients(&mut w);
    let old: GroupId = *latest(&w).groups.keys().next().unwrap();
    let keys_before = w.groups[&old].leader_app().unwrap().key_count();
    let snapshot_before = kv_snapshot_bytes(&mut w, old);
    assert!(keys_before > 0);
    w.admin(join(&[4, 5, 6]));
    settle(&mut w);
    let c = latest(&w);
    assert!(c.shards_of(old).len() < usize::from(c.shard_count()));
    let app = w.groups[&old].leader_app().unwrap();
    assert!(
        app.key_count() < keys_before,
        "old owner still holds {} of {keys_before} keys",
        app.key_count()
    );
    for (shard, _) in app.kv().shards() {
        assert_eq!(c.owner(shard), Some(old), "shard {shard} kept after moving");
    }
    // Its snapshot no longer holds the moved shards either.
    let snapshot_after = kv_snapshot_bytes(&mut w, old);
    assert!(
        snapshot_after < snapshot_before,
        "kv snapshot {snapshot_after} bytes, was {snapshot_before}"
    );
    check(&mut w);
}

#[test]
fn unaffected_shards_keep_serving_while_others_move() {
    let mut w = world(15, 6);
    w.admin(join(&[1, 2, 3]));
    w.admin(join(&[4, 5, 6]));
    settle(&mut w);
    let c = latest(&w);
    let shard_count = c.shard_count();
    let moving: u16 = 0;
    let to: GroupId = c
        .groups
        .keys()
        .copied()
        .find(|&g| c.owner(moving) != Some(g))
        .unwrap();
    // Hold the moving shard's pull so the move lasts, and keep clients busy on other keys.
    w.hold_pulls.insert(moving);
    let other_keys: Vec<usize> = (0..w.cfg.clients.keys)
        .filter(|&k| key_shard(&key_of(k), shard_count) != moving)
        .collect();
    assert!(!other_keys.is_empty());
    let started = w.now;
    w.admin(Op::Move {
        shard: moving,
        group: to,
    });
    for (i, &k) in other_keys.iter().enumerate() {
        let ops = vec![ScriptOp::Append(k), ScriptOp::Get(k), ScriptOp::Append(k)];
        w.clients.script(i % w.clients.len(), &ops);
    }
    wait_clients(&mut w);
    let ended = w.now;
    assert!(!w.settled(), "the held move should still be in flight");
    // Every operation on unaffected shards completed, none failed or timed out, and none took
    // longer than a quiet round trip through one log (measured in simulated ticks).
    let ops: Vec<&Record> = w
        .clients
        .history()
        .iter()
        .filter(|r| r.invoke >= started && r.invoke <= ended)
        .collect();
    assert_eq!(ops.len(), other_keys.len() * 3);
    for r in ops {
        assert_eq!(r.status, Status::Ok, "{r:?}");
        let latency_ticks = r.complete.unwrap() - r.invoke;
        assert!(latency_ticks <= 30, "{r:?} took {latency_ticks} ticks");
    }
    w.hold_pulls.clear();
    settle(&mut w);
    check(&mut w);
}

#[test]
fn partial_shards_that_arrived_are_served_before_the_rest() {
    let mut w = world(16, 6);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    let c = latest(&w);
    let shard_count = c.shard_count();
    // Rebalancing hands a new group the highest-numbered shards: hold the last one back.
    let held = shard_count - 1;
    w.hold_pulls.insert(held);
    w.admin(join(&[4, 5, 6]));
    let ok = w
        .run_until(SETTLE_TICKS_MAX, |w| {
            let c = latest(w);
            c.num == 2
                && c.groups_created().all(|(g, _)| {
                    w.groups
                        .get(&g)
                        .and_then(|g| g.leader_app())
                        .is_some_and(|a| {
                            a.shards().config_num() == 2
                                && a.shards().pulls().iter().all(|p| p.shard == held)
                        })
                })
        })
        .unwrap();
    assert!(ok, "{}", w.describe());
    let c2 = latest(&w);
    let new: GroupId = c2.groups_created().map(|(g, _)| g).next().unwrap();
    let moved: Vec<u16> = c2.shards_of(new);
    assert!(
        moved.contains(&held),
        "shard {held} should move to the new group: {c2:?}"
    );
    assert!(moved.len() >= 2, "{moved:?}");
    // The held shard is still importing, the others of the same configuration are served.
    let keys: Vec<usize> = (0..w.cfg.clients.keys)
        .filter(|&k| {
            let s = key_shard(&key_of(k), shard_count);
            s != held && moved.contains(&s)
        })
        .collect();
    assert!(!keys.is_empty());
    let started = w.now;
    for (i, &k) in keys.iter().enumerate() {
        w.clients.script(
            i % w.clients.len(),
            &[ScriptOp::Append(k), ScriptOp::Get(k)],
        );
    }
    wait_clients(&mut w);
    let app = w.groups[&new].leader_app().unwrap();
    assert!(
        app.shards().pulls().iter().any(|p| p.shard == held),
        "shard {held} should still be importing"
    );
    let served: Vec<&Record> = w
        .clients
        .history()
        .iter()
        .filter(|r| r.invoke >= started && r.status == Status::Ok)
        .collect();
    assert_eq!(served.len(), keys.len() * 2);
    w.hold_pulls.clear();
    settle(&mut w);
    check(&mut w);
}

// ----- the checks have teeth ---------------------------------------------------------------

fn broken_runs(breakage: Breakage, seeds: u64) -> (u64, BTreeMap<&'static str, u64>) {
    let mut opts = ShardOptions::new(Faults::none());
    opts.breakage = breakage;
    let mut caught = 0;
    let mut by: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in 0..seeds {
        match run_shard_seed(seed, &opts).result {
            Ok(_) => {}
            Err(Failure::Safety(e)) => {
                caught += 1;
                let kind = if e.contains("both accept writes") {
                    "epoch invariant"
                } else if e.contains("not linearizable") {
                    "linearizability"
                } else {
                    "other"
                };
                *by.entry(kind).or_insert(0) += 1;
            }
            Err(Failure::Liveness(e)) => panic!("liveness failure in a broken run: {e}"),
        }
    }
    (caught, by)
}

#[test]
fn broken_old_owner_accepting_writes_after_freeze_is_caught() {
    let (caught, by) = broken_runs(Breakage::OldOwnerWritesAfterFreeze, 10);
    assert!(caught >= 5, "caught {caught} of 10: {by:?}");
    assert!(by.contains_key("epoch invariant"), "{by:?}");
}

#[test]
fn broken_new_owner_serving_before_install_is_caught() {
    let (caught, by) = broken_runs(Breakage::ServeBeforeInstall, 10);
    assert!(caught >= 3, "caught {caught} of 10: {by:?}");
    assert!(by.contains_key("linearizability"), "{by:?}");
}

#[test]
fn a_history_with_a_lost_write_fails_the_checker() {
    // The final read is what finds a lost acknowledged write: forge one and see it fail.
    let mut w = world(17, 3);
    w.admin(join(&[1, 2, 3]));
    settle(&mut w);
    appends(&mut w, 1);
    wait_clients(&mut w);
    let mut history = check(&mut w);
    let last_read = history
        .iter_mut()
        .rev()
        .find(|r| r.op == OpKind::Get && r.result.is_some())
        .unwrap();
    last_read.result = None;
    assert!(check_linearizable(&history).is_err());
}
