//! Named scenarios of the replicated key-value service in the simulator, after the MIT 6.824
//! kvraft tests (lab 3A/3B). Each runs simulated clients against a simulated group, asserts what
//! its name says, and puts the whole history through the linearizability checker. All are
//! deterministic (fixed seeds, simulated time).

use std::collections::BTreeSet;

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tynamo::check::{ClientId, OpKind, Record, Status};
use tynamo::kv::{Op, Outcome, ReadConsistency};
use tynamo::raft::{NodeId, ReadMode};
use tynamo::sim::kv::{
    check_linearizable, heal_and_drain, KvProfile, KvSim, KvSimConfig, LogOnlyProfile,
    NoSessionCheck, OpMix, ScriptOp, SimProfile,
};
use tynamo::sim::{ClusterConfig, NetConfig, Steps};

/// `ClusterConfig::sim_raft_config().election_ticks`.
const ELECTION: u64 = 20;

fn lossy() -> NetConfig {
    NetConfig {
        drop_per_million: 100_000,
        dup_per_million: 50_000,
        delay_ticks_min: 1,
        delay_ticks_max: 4,
    }
}

fn group(nodes: usize, net: NetConfig) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(nodes);
    cfg.net = net;
    cfg.client_timeout_ticks = 60;
    cfg.raft.snapshot_chunk_bytes = 512;
    cfg
}

/// A group of `nodes` and `clients` clients over five keys; on a lossy network, one client
/// reply in ten is lost too.
fn new_sim<P: KvProfile>(nodes: usize, clients: usize, net: NetConfig, seed: u64) -> KvSim<P> {
    let mut kv = KvSimConfig::new(clients, 5);
    if net.drop_per_million > 0 {
        kv.lost_replies_percent = 10;
    }
    KvSim::new(group(nodes, net), kv, seed)
}

/// Heals, demands liveness and convergence, and checks the history. Returns the history.
fn finish<P: KvProfile>(sim: &mut KvSim<P>) -> Vec<Record> {
    heal_and_drain(sim).unwrap_or_else(|f| panic!("{f}"));
    let history = sim.finish_history();
    check_linearizable(&history).unwrap_or_else(|e| panic!("{e}"));
    history
}

fn ok_ops_of(history: &[Record], client: u64) -> usize {
    history
        .iter()
        .filter(|r| r.client == ClientId::Number(client) && r.status == Status::Ok)
        .count()
}

/// Every client completed at least `min` operations.
fn assert_each_client_served<P: KvProfile>(sim: &KvSim<P>, history: &[Record], min: usize) {
    for i in 0..sim.client_count() {
        let n = ok_ops_of(history, sim.client_id(i));
        assert!(
            n >= min,
            "client {} completed {n} operations, want >= {min}",
            sim.client_id(i)
        );
    }
}

fn step_or_panic<P: KvProfile>(sim: &mut KvSim<P>, ticks: u64) {
    sim.run_ticks(ticks).unwrap_or_else(|v| panic!("{v}"));
}

/// A random split of the replicas in two (both directions cut).
fn random_partition<P: KvProfile>(sim: &mut KvSim<P>, rng: &mut ChaCha8Rng) {
    let mut ids = sim.cluster.ids();
    ids.shuffle(rng);
    let k = rng.gen_range(1..ids.len());
    let (a, b) = ids.split_at(k);
    sim.cluster.net.heal();
    for &x in a {
        for &y in b {
            sim.cluster.net.cut_link(x, y);
            sim.cluster.net.cut_link(y, x);
        }
    }
}

/// Runs `ticks` with a new random partition (or a healed network) every 20-60 ticks.
fn run_with_partitions<P: KvProfile>(sim: &mut KvSim<P>, ticks: u64, seed: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let end = sim.now() + ticks;
    let mut partitions = 0;
    while sim.now() < end {
        if rng.gen_bool(0.7) {
            random_partition(sim, &mut rng);
            partitions += 1;
        } else {
            sim.cluster.net.heal();
        }
        let span = rng.gen_range(20..=60);
        step_or_panic(sim, span);
    }
    partitions
}

/// Power loss on every replica at once, then all restart (the lab's "crash all servers").
fn crash_all_and_restart<P: KvProfile>(sim: &mut KvSim<P>) {
    for id in sim.cluster.ids() {
        sim.crash(id);
    }
    for id in sim.cluster.ids() {
        sim.restart(id).unwrap_or_else(|v| panic!("{v}"));
    }
}

fn in_flight_log_bytes<P: KvProfile>(sim: &KvSim<P>, id: NodeId) -> u64 {
    sim.cluster
        .node(id)
        .disk
        .entries()
        .iter()
        .map(|e| e.size_bytes())
        .sum()
}

#[test]
fn basic() {
    let mut sim: KvSim = new_sim(3, 1, NetConfig::reliable(), 1);
    step_or_panic(&mut sim, 400);
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 40);
    assert_eq!(sim.stats.ops_timeout + sim.stats.ops_fail, 0);
}

#[test]
fn concurrent_clients() {
    let mut sim: KvSim = new_sim(3, 5, NetConfig::reliable(), 2);
    step_or_panic(&mut sim, 400);
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 30);
    assert_eq!(sim.stats.ops_timeout + sim.stats.ops_fail, 0);
}

#[test]
fn unreliable_network() {
    let mut sim: KvSim = new_sim(3, 5, lossy(), 3);
    step_or_panic(&mut sim, 600);
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 10);
    // The losses were felt: messages dropped, replies lost and writes retried with the same
    // sequence after a send that may have been applied.
    assert!(
        sim.stats.write_retries_maybe_applied >= 10,
        "{:?}",
        sim.stats
    );
    assert!(sim.cluster.net.stats.dropped > 0);
}

/// On the minority side of a partition neither a write nor a linearizable read completes (with
/// ReadIndex and with leases) while the majority side keeps serving; once the partition heals,
/// both complete.
#[test]
fn one_partition() {
    for read_mode in [ReadMode::Safe, ReadMode::Lease] {
        let mut cfg = group(5, NetConfig::reliable());
        cfg.raft.read_mode = read_mode;
        let mut kv = KvSimConfig::new(3, 1);
        kv.op_timeout_ticks = 100_000;
        kv.attempts_max = 1_000_000;
        let mut sim: KvSim = KvSim::new(cfg, kv, 4);
        sim.set_accepting(false);
        sim.script(0, &[ScriptOp::Put(0)]);
        assert!(sim.run_until(ELECTION * 20, |s| s.idle()).unwrap());
        let leader = sim.cluster.leader().expect("a leader served the put");
        let ids = sim.cluster.ids();
        let other = ids.iter().copied().find(|&id| id != leader).unwrap();
        let minority = vec![leader, other];
        let majority: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|id| !minority.contains(id))
            .collect();
        for &x in &minority {
            for &y in &majority {
                sim.cluster.net.cut_link(x, y);
                sim.cluster.net.cut_link(y, x);
            }
        }
        sim.set_reach(0, Some(majority.clone()));
        sim.set_reach(1, Some(minority.clone()));
        sim.set_reach(2, Some(minority.clone()));
        // The majority elects a new leader and serves.
        sim.script(0, &[ScriptOp::Append(0), ScriptOp::Get(0)]);
        assert!(
            sim.run_until(ELECTION * 20, |s| s.client_done(0)).unwrap(),
            "{read_mode:?}: the majority side did not serve{}",
            sim.describe_clients()
        );
        // The minority side: a write and a linearizable read, at the old leader and its peer.
        let partitioned_at = sim.now();
        sim.script(1, &[ScriptOp::Append(0)]);
        sim.script(2, &[ScriptOp::Get(0)]);
        step_or_panic(&mut sim, ELECTION * 10);
        assert!(sim.client_busy(1) && sim.client_busy(2), "{read_mode:?}");
        let minority_ids = [sim.client_id(1), sim.client_id(2)];
        let done_on_minority = |h: &[Record]| {
            h.iter()
                .filter(|r| {
                    r.invoke >= partitioned_at
                        && matches!(r.client, ClientId::Number(c) if minority_ids.contains(&c))
                })
                .count()
        };
        assert_eq!(done_on_minority(sim.history()), 0, "{read_mode:?}");
        // Meanwhile the majority keeps serving.
        sim.script(0, &[ScriptOp::Append(0), ScriptOp::Get(0)]);
        assert!(sim.run_until(ELECTION * 20, |s| s.client_done(0)).unwrap());
        assert!(sim.client_busy(1) && sim.client_busy(2), "{read_mode:?}");
        // Heal: both minority operations complete, successfully.
        sim.cluster.net.heal();
        let healed_at = sim.now();
        sim.set_reach(1, None);
        sim.set_reach(2, None);
        assert!(
            sim.run_until(ELECTION * 20, |s| s.idle()).unwrap(),
            "{read_mode:?}: not served after healing{}",
            sim.describe_clients()
        );
        let after: Vec<&Record> = sim
            .history()
            .iter()
            .filter(|r| {
                r.invoke >= partitioned_at
                    && matches!(r.client, ClientId::Number(c) if minority_ids.contains(&c))
            })
            .collect();
        assert_eq!(after.len(), 2, "{read_mode:?}: {after:?}");
        for r in after {
            assert_eq!(r.status, Status::Ok, "{read_mode:?}: {r:?}");
            assert!(r.complete.is_some_and(|t| t >= healed_at), "{r:?}");
        }
        finish(&mut sim);
    }
}

#[test]
fn many_partitions_one_client() {
    let mut sim: KvSim = new_sim(5, 1, NetConfig::reliable(), 5);
    let partitions = run_with_partitions(&mut sim, 1_000, 5);
    assert!(partitions >= 10, "only {partitions} partitions");
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 20);
}

#[test]
fn many_partitions_many_clients() {
    let mut sim: KvSim = new_sim(5, 5, NetConfig::reliable(), 6);
    let partitions = run_with_partitions(&mut sim, 1_000, 6);
    assert!(partitions >= 10, "only {partitions} partitions");
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 10);
}

/// Crashes every replica three times; with no snapshots, restarts replay the log.
fn persist_scenario<P: KvProfile>(
    nodes: usize,
    clients: usize,
    net: NetConfig,
    partitions: bool,
    seed: u64,
) -> (KvSim<P>, Vec<Record>) {
    let mut sim: KvSim<P> = new_sim(nodes, clients, net, seed);
    for round in 0..3 {
        if partitions {
            run_with_partitions(&mut sim, 200, seed * 10 + round);
            sim.cluster.net.heal();
        } else {
            step_or_panic(&mut sim, 200);
        }
        crash_all_and_restart(&mut sim);
    }
    step_or_panic(&mut sim, 100);
    let history = finish(&mut sim);
    assert_eq!(sim.stats.crashes, 3 * nodes as u64);
    (sim, history)
}

#[test]
fn persist_one_client() {
    let (sim, history) = persist_scenario::<LogOnlyProfile>(3, 1, NetConfig::reliable(), false, 7);
    assert_each_client_served(&sim, &history, 20);
    assert_eq!(sim.stats.snapshots_taken, 0);
}

#[test]
fn persist_concurrent() {
    let (sim, history) = persist_scenario::<LogOnlyProfile>(3, 5, NetConfig::reliable(), false, 8);
    assert_each_client_served(&sim, &history, 10);
}

#[test]
fn persist_concurrent_unreliable() {
    let (sim, history) = persist_scenario::<LogOnlyProfile>(3, 5, lossy(), false, 9);
    assert_each_client_served(&sim, &history, 5);
}

#[test]
fn persist_partition() {
    let (sim, history) = persist_scenario::<LogOnlyProfile>(5, 5, NetConfig::reliable(), true, 10);
    assert_each_client_served(&sim, &history, 5);
}

#[test]
fn persist_partition_unreliable_linearizable() {
    let (sim, history) = persist_scenario::<LogOnlyProfile>(5, 5, lossy(), true, 11);
    assert_each_client_served(&sim, &history, 3);
    // Linearizability is what `finish` checked; make sure it checked reads as well as writes.
    let reads = history
        .iter()
        .filter(|r| r.op == OpKind::Get && r.status == Status::Ok)
        .count();
    assert!(reads >= 20, "only {reads} reads");
}

/// A follower cut off while the others snapshot past its log gets the state by InstallSnapshot,
/// and is then needed for a majority.
#[test]
fn snapshot_rpc() {
    let mut kv = KvSimConfig::new(1, 3);
    kv.op_timeout_ticks = 100_000;
    kv.attempts_max = 1_000_000;
    let mut sim: KvSim = KvSim::new(group(3, NetConfig::reliable()), kv, 12);
    sim.set_accepting(false);
    sim.script(0, &[ScriptOp::Put(0)]);
    assert!(sim.run_until(ELECTION * 20, |s| s.idle()).unwrap());
    let leader = sim.cluster.leader().unwrap();
    let ids = sim.cluster.ids();
    let followers: Vec<NodeId> = ids.iter().copied().filter(|&id| id != leader).collect();
    let (lagger, other) = (followers[0], followers[1]);
    sim.cluster.net.isolate(lagger, ids.iter().copied());
    let ops: Vec<ScriptOp> = (0..60).map(|i| ScriptOp::Append(i % 3)).collect();
    sim.script(0, &ops);
    assert!(sim.run_until(ELECTION * 200, |s| s.idle()).unwrap());
    let leader_snapshot = sim.cluster.raft(leader).unwrap().status().snapshot_index;
    let lagger_last = sim.cluster.raft(lagger).unwrap().status().last_index;
    assert!(
        leader_snapshot > lagger_last,
        "the leader's snapshot {leader_snapshot} does not cover past the lagger's log {lagger_last}"
    );
    let chunks = |s: &KvSim| s.cluster.net.stats.by_kind.get("Snapshot").copied();
    let chunks_before = chunks(&sim).unwrap_or(0);
    // Heal the lagger and cut the other follower off: the lagger is now needed for a majority.
    sim.cluster.net.heal();
    sim.cluster.net.isolate(other, ids.iter().copied());
    sim.script(
        0,
        &[ScriptOp::Append(0), ScriptOp::Get(0), ScriptOp::Get(1)],
    );
    assert!(
        sim.run_until(ELECTION * 50, |s| s.idle()).unwrap(),
        "no progress with the lagger in the majority{}",
        sim.describe_clients()
    );
    assert!(chunks(&sim).unwrap_or(0) > chunks_before);
    let lagger_status = sim.cluster.raft(lagger).unwrap().status();
    assert!(lagger_status.snapshot_index >= leader_snapshot);
    finish(&mut sim);
}

/// Runs one client doing puts and gets on five keys for 3000 ticks; returns the largest
/// persisted Raft state (hard state plus the log after the snapshot; the snapshot is stored
/// apart, as in 6.824) and the largest snapshot seen on any replica at any tick.
fn raft_state_sizes<P: KvProfile>() -> (KvSim<P>, u64, usize) {
    const HARD_STATE_BYTES: u64 = 24;
    let mut kv = KvSimConfig::new(1, 5);
    kv.mix = OpMix {
        get: 20,
        stale_get: 0,
        put: 80,
        append: 0,
        delete: 0,
    };
    kv.think_ticks_max = 0;
    let mut sim: KvSim<P> = KvSim::new(group(3, NetConfig::reliable()), kv, 13);
    let (mut raft_state_max, mut snapshot_max) = (0, 0);
    for _ in 0..3_000 {
        sim.step().unwrap_or_else(|v| panic!("{v}"));
        for id in sim.cluster.ids() {
            let raft_state = HARD_STATE_BYTES + in_flight_log_bytes(&sim, id);
            raft_state_max = raft_state_max.max(raft_state);
            let snapshot = sim
                .cluster
                .node(id)
                .disk
                .snapshot()
                .map_or(0, |s| s.data.len());
            snapshot_max = snapshot_max.max(snapshot);
        }
    }
    (sim, raft_state_max, snapshot_max)
}

/// The persisted Raft state stays under 4x the snapshot threshold on every replica at every
/// tick (measured: ~1.7x; the log counts entry headers the kv threshold does not), and with
/// puts on five keys the snapshot stays under 1 KiB. Without snapshots the same run breaks the
/// bound, so the bound means something.
#[test]
fn snapshot_size_stays_bounded() {
    const SNAPSHOT_BYTES_MAX: usize = 1024;
    let threshold = SimProfile::SNAPSHOT_THRESHOLD_BYTES;
    let (mut sim, raft_state_max, snapshot_max) = raft_state_sizes::<SimProfile>();
    assert!(
        raft_state_max <= 4 * threshold,
        "{raft_state_max} bytes of raft state, threshold {threshold}"
    );
    assert!(snapshot_max <= SNAPSHOT_BYTES_MAX, "{snapshot_max} bytes");
    let history = finish(&mut sim);
    assert!(ok_ops_of(&history, 1) >= 300);
    assert!(sim.stats.snapshots_taken >= 30, "{:?}", sim.stats);

    let (_, unbounded, _) = raft_state_sizes::<LogOnlyProfile>();
    assert!(unbounded > 4 * threshold, "{unbounded}");
}

/// Crash-all restarts with snapshots: every replica comes back from its snapshot plus the log
/// after it.
fn snapshot_recover_scenario(clients: usize, seed: u64) {
    let mut sim: KvSim = new_sim(3, clients, NetConfig::reliable(), seed);
    for _ in 0..3 {
        step_or_panic(&mut sim, 250);
        crash_all_and_restart(&mut sim);
    }
    step_or_panic(&mut sim, 100);
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 10);
    assert!(sim.stats.restarts_from_snapshot >= 6, "{:?}", sim.stats);
}

#[test]
fn snapshot_recover() {
    snapshot_recover_scenario(1, 14);
}

#[test]
fn snapshot_recover_many_clients() {
    snapshot_recover_scenario(5, 15);
}

#[test]
fn snapshot_unreliable() {
    let mut sim: KvSim = new_sim(3, 5, lossy(), 16);
    step_or_panic(&mut sim, 800);
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 5);
    assert!(sim.stats.snapshots_taken >= 10, "{:?}", sim.stats);
}

#[test]
fn snapshot_unreliable_recover_partition_linearizable() {
    let mut sim: KvSim = new_sim(5, 5, lossy(), 17);
    for round in 0..3 {
        run_with_partitions(&mut sim, 250, 170 + round);
        sim.cluster.net.heal();
        crash_all_and_restart(&mut sim);
    }
    let history = finish(&mut sim);
    assert_each_client_served(&sim, &history, 3);
    assert!(sim.stats.restarts_from_snapshot >= 5, "{:?}", sim.stats);
}

/// The append's first send reaches a follower's disk, then the leader dies before answering.
/// The survivors commit it, snapshot, and restart from the snapshot (so the session table comes
/// from it); only then does the client's retry (same client id and seq) reach them. Returns the
/// sim, the append's value and the key's value on a survivor just before the retry.
fn retried_append<P: KvProfile>() -> (KvSim<P>, Bytes, Option<Bytes>) {
    let mut cfg = group(3, NetConfig::reliable());
    cfg.disk_ticks_max = 0;
    let mut kv = KvSimConfig::new(1, 1);
    kv.op_timeout_ticks = 100_000;
    kv.attempts_max = 1_000_000;
    let mut sim: KvSim<P> = KvSim::new(cfg, kv, 18);
    sim.set_accepting(false);
    sim.script(0, &[ScriptOp::Put(0)]);
    assert!(sim.run_until(ELECTION * 20, |s| s.idle()).unwrap());
    let leader = sim.cluster.leader().unwrap();
    let survivors: Vec<NodeId> = sim
        .cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let last = sim.cluster.raft(leader).unwrap().status().last_index;
    // The client can only reach the leader until the survivors have restarted.
    sim.set_reach(0, Some(vec![leader]));
    sim.script(0, &[ScriptOp::Append(0)]);
    let reached = sim
        .run_until(ELECTION, |s| {
            survivors
                .iter()
                .any(|&f| s.cluster.raft(f).unwrap().status().persisted > last)
        })
        .unwrap();
    assert!(reached && sim.client_busy(0));
    sim.crash(leader);
    // The survivors elect a leader whose no-op commits the append.
    let applied = |s: &KvSim<P>| {
        survivors
            .iter()
            .all(|&f| s.cluster.node(f).app.applied_index() > last + 1)
    };
    assert!(sim.run_until(ELECTION * 20, applied).unwrap());
    assert!(
        sim.client_busy(0),
        "the client was answered by a dead leader"
    );
    for &f in &survivors {
        assert!(sim.snapshot_now(f).unwrap(), "node {f} took no snapshot");
        sim.crash(f);
    }
    for &f in &survivors {
        sim.restart(f).unwrap();
    }
    let get = Op::Get {
        key: Bytes::from_static(b"k0"),
    };
    let before_retry = match sim
        .cluster
        .node(survivors[0])
        .app
        .state_machine()
        .read(&get, ReadConsistency::Stale)
    {
        Outcome::Value(v) => v,
        other => panic!("{other:?}"),
    };
    // Now the retry reaches them.
    sim.set_reach(0, None);
    sim.script(0, &[ScriptOp::Get(0)]);
    assert!(sim.run_until(ELECTION * 50, |s| s.idle()).unwrap());
    assert!(
        sim.stats.write_retries_maybe_applied >= 1,
        "{:?}",
        sim.stats
    );
    sim.restart(leader).unwrap();
    let append = sim
        .history()
        .iter()
        .find(|r| r.op == OpKind::Append)
        .expect("the append completed");
    assert_eq!(append.status, Status::Ok);
    let token = append.value.clone().unwrap().0;
    (sim, token, before_retry)
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn retried_append_applied_exactly_once() {
    let (mut sim, token, before_retry) = retried_append::<SimProfile>();
    let before_retry = before_retry.expect("the first send was applied");
    assert_eq!(occurrences(&before_retry, &token), 1);
    let last_get = sim
        .history()
        .iter()
        .rev()
        .find(|r| r.op == OpKind::Get)
        .cloned()
        .unwrap();
    let seen = last_get.result.unwrap().0;
    assert_eq!(occurrences(&seen, &token), 1, "{seen:?}");
    finish(&mut sim);
}

/// The same scenario with the session check switched off in the adapter: the retry is applied
/// a second time, and both the direct look and the checker see it.
#[test]
fn retried_append_without_session_check_is_caught() {
    let (sim, token, before_retry) = retried_append::<NoSessionCheck>();
    assert_eq!(occurrences(&before_retry.unwrap(), &token), 1);
    let last_get = sim
        .history()
        .iter()
        .rev()
        .find(|r| r.op == OpKind::Get)
        .cloned()
        .unwrap();
    assert_eq!(occurrences(&last_get.result.unwrap().0, &token), 2);
    let error = check_linearizable(&sim.finish_history()).unwrap_err();
    assert!(error.contains("not linearizable"), "{error}");
}

/// Stale reads come from any replica, may be old, and are not in the checked history; every
/// one of them returned only values that were written, each at most once.
#[test]
fn stale_reads_return_only_written_values() {
    let mut kv = KvSimConfig::new(4, 3);
    kv.mix = OpMix {
        get: 10,
        stale_get: 40,
        put: 10,
        append: 40,
        delete: 0,
    };
    let mut sim: KvSim = KvSim::new(group(5, lossy()), kv, 19);
    run_with_partitions(&mut sim, 600, 19);
    let history = finish(&mut sim);
    assert!(
        sim.stale_reads_checked() >= 50,
        "{}",
        sim.stale_reads_checked()
    );
    let keys: BTreeSet<_> = history.iter().map(|r| r.key.clone()).collect();
    assert!(keys.len() <= 3);
}
