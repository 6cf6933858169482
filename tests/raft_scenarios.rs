//! Scenario tests over the simulator, named after the tests people use to judge a Raft
//! (MIT 6.824 labs 2A-2D, the etcd and raft-rs suites). Every test is deterministic (fixed seeds,
//! simulated time): a failure reproduces exactly.

use bytes::Bytes;
use tynamo::raft::{ConfChange, Config, MessageBody, NodeId, ReadMode, Role};
use tynamo::sim::{Cluster, ClusterConfig, HashApp, NetConfig, Outcome, ReadOutcome, Steps};

type Sim = Cluster<HashApp>;

const ELECTION: u64 = 20; // ClusterConfig::sim_raft_config().election_ticks

fn cluster(n: usize, seed: u64) -> Sim {
    Cluster::new(ClusterConfig::new(n), seed)
}

fn lossy() -> NetConfig {
    NetConfig {
        drop_per_million: 100_000,
        dup_per_million: 50_000,
        delay_ticks_min: 1,
        delay_ticks_max: 4,
    }
}

/// Waits for a leader that has committed its no-op. Panics after `ELECTION * 20` ticks.
fn wait_leader(c: &mut Sim) -> NodeId {
    let ok = c
        .run_until(ELECTION * 20, |c| {
            c.leader()
                .is_some_and(|l| c.raft(l).is_some_and(|r| r.committed_in_term()))
        })
        .expect("no violation");
    assert!(ok, "no leader within {} ticks", ELECTION * 20);
    c.leader().expect("leader")
}

/// Proposes at the leader (retrying across leader changes) until committed; returns the index.
fn commit(c: &mut Sim, data: &[u8]) -> u64 {
    for _ in 0..20 {
        wait_leader(c);
        let Ok(id) = c.propose(Bytes::copy_from_slice(data)) else {
            c.step().expect("no violation");
            continue;
        };
        let done = c
            .run_until(ELECTION * 10, |c| c.outcome(id) != Outcome::Pending)
            .expect("no violation");
        if let (true, Outcome::Committed { index, .. }) = (done, c.outcome(id)) {
            return index;
        }
    }
    panic!("proposal never committed");
}

fn applied(c: &Sim, id: NodeId) -> u64 {
    c.raft(id).map_or(0, |r| r.status().applied)
}

fn all_applied(c: &Sim, index: u64) -> bool {
    c.ids()
        .iter()
        .all(|&id| !c.is_up(id) || applied(c, id) >= index)
}

fn wait_all_applied(c: &mut Sim, index: u64) {
    let ok = c
        .run_until(ELECTION * 20, |c| all_applied(c, index))
        .expect("no violation");
    assert!(ok, "not every live node applied {index}");
}

fn vote_messages(c: &Sim) -> u64 {
    ["PreVote", "PreVoteResp", "Vote", "VoteResp"]
        .iter()
        .map(|k| c.net.stats.by_kind.get(k).copied().unwrap_or(0))
        .sum()
}

fn others(c: &Sim, id: NodeId) -> Vec<NodeId> {
    c.ids().into_iter().filter(|&x| x != id).collect()
}

// ----- 2A: elections -------------------------------------------------------------------------

#[test]
fn initial_election() {
    for seed in 0..20 {
        let mut c = cluster(3, seed);
        let leader = wait_leader(&mut c);
        let term = c.raft(leader).unwrap().term();
        // Electing a leader takes at most 30 messages.
        assert!(
            vote_messages(&c) <= 30,
            "seed {seed}: {} election messages",
            vote_messages(&c)
        );
        // Every node agrees and nothing changes without faults.
        c.run_ticks(ELECTION * 10).unwrap();
        assert_eq!(
            c.leader(),
            Some(leader),
            "seed {seed}: leader changed without faults"
        );
        for id in c.ids() {
            assert_eq!(
                c.raft(id).unwrap().term(),
                term,
                "seed {seed}: term moved without faults"
            );
            assert_eq!(c.raft(id).unwrap().leader(), leader);
        }
    }
}

#[test]
fn reelection_after_leader_failure() {
    let mut c = cluster(3, 1);
    let l1 = wait_leader(&mut c);
    c.crash(l1);
    let l2 = wait_leader(&mut c);
    assert_ne!(l1, l2);
    // The old leader rejoins: it must not disturb the new one.
    c.restart(l1).unwrap();
    c.run_ticks(ELECTION * 5).unwrap();
    assert_eq!(c.leader(), Some(l2));
    // Without a majority nobody leads.
    let rest = others(&c, l2);
    c.crash(l2);
    c.crash(rest[0]);
    c.run_ticks(ELECTION * 10).unwrap();
    assert_eq!(c.leader(), None, "a leader without a majority");
    c.restart(rest[0]).unwrap();
    wait_leader(&mut c);
}

#[test]
fn many_elections_under_churn() {
    let mut c = cluster(5, 7);
    wait_leader(&mut c);
    for round in 0..10 {
        // Crash up to two random nodes, keep a majority.
        let ids = c.ids();
        let a = ids[(round * 3) % 5];
        let b = ids[(round * 7 + 1) % 5];
        c.crash(a);
        c.crash(b);
        let l = wait_leader(&mut c);
        assert!(l != a && l != b);
        c.restart(a).unwrap();
        c.restart(b).unwrap();
    }
    let index = commit(&mut c, b"after churn");
    wait_all_applied(&mut c, index);
}

// ----- 2B: agreement -------------------------------------------------------------------------

#[test]
fn basic_agreement() {
    let mut c = cluster(3, 2);
    wait_leader(&mut c);
    let mut last = 0;
    for i in 0..3u8 {
        let index = commit(&mut c, &[i; 16]);
        assert!(index > last, "indexes increase");
        last = index;
        wait_all_applied(&mut c, index);
    }
    let hashes: Vec<u64> = c.ids().iter().map(|&id| c.node(id).app.hash).collect();
    assert!(
        hashes.windows(2).all(|w| w[0] == w[1]),
        "replicas applied different histories"
    );
}

#[test]
fn rpc_byte_counts_one_append_per_batch() {
    let mut c = cluster(3, 3);
    let leader = wait_leader(&mut c);
    c.run_ticks(5).unwrap();
    let appends_before = c.net.stats.by_kind.get("Append").copied().unwrap_or(0);
    let bytes_before = c.net.stats.sent_bytes;
    // 10 entries of 5 KB in one batch.
    let batch: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 5000])).collect();
    let (_, last) = c.raft_mut(leader).unwrap().propose(&batch).unwrap();
    // Step exactly one tick: one AppendEntries per follower carries the whole batch.
    c.step().unwrap();
    let appends = c.net.stats.by_kind.get("Append").copied().unwrap_or(0) - appends_before;
    assert_eq!(
        appends, 2,
        "one AppendEntries per follower for a batch of 10 entries"
    );
    wait_all_applied(&mut c, last);
    let payload = 10 * 5000u64;
    let wire = c.net.stats.sent_bytes - bytes_before;
    assert!(
        wire <= 3 * payload + 50_000,
        "{wire} bytes on the wire for {payload} bytes of payload"
    );
}

#[test]
fn agreement_despite_follower_disconnection() {
    let mut c = cluster(3, 4);
    let leader = wait_leader(&mut c);
    let f = others(&c, leader)[0];
    c.net.isolate(f, c.ids());
    for i in 0..5u8 {
        commit(&mut c, &[i; 8]);
    }
    let index = commit(&mut c, b"x");
    assert!(applied(&c, f) < index);
    c.net.heal();
    wait_all_applied(&mut c, index);
}

#[test]
fn no_agreement_without_majority() {
    let mut c = cluster(5, 5);
    let leader = wait_leader(&mut c);
    let fs = others(&c, leader);
    for &f in &fs[..3] {
        c.net.isolate(f, c.ids());
    }
    let before = c.raft(leader).unwrap().status().commit;
    let id = c
        .propose_at(leader, Bytes::from_static(b"minority"))
        .unwrap();
    c.run_ticks(ELECTION / 2).unwrap();
    assert_eq!(
        c.outcome(id),
        Outcome::Pending,
        "committed without a majority"
    );
    assert_eq!(c.raft(leader).unwrap().status().commit, before);
    c.net.heal();
    let index = commit(&mut c, b"healed");
    wait_all_applied(&mut c, index);
}

#[test]
fn concurrent_proposals() {
    let mut c = cluster(3, 6);
    wait_leader(&mut c);
    let ids: Vec<_> = (0..20u8)
        .map(|i| c.propose(Bytes::from(vec![i; 4])).unwrap())
        .collect();
    c.run_until(ELECTION * 5, |c| {
        ids.iter().all(|&p| c.outcome(p) != Outcome::Pending)
    })
    .unwrap();
    let mut indexes: Vec<u64> = ids
        .iter()
        .map(|&p| match c.outcome(p) {
            Outcome::Committed { index, .. } => index,
            other => panic!("proposal {p}: {other:?}"),
        })
        .collect();
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(indexes.len(), 20, "every proposal got its own index");
}

#[test]
fn rejoin_of_partitioned_leader() {
    let mut c = cluster(3, 8);
    let old = wait_leader(&mut c);
    commit(&mut c, b"before");
    c.net.isolate(old, c.ids());
    let lost: Vec<_> = (0..3u8)
        .map(|i| c.propose_at(old, Bytes::from(vec![i; 4])).unwrap())
        .collect();
    // The majority elects a new leader and makes progress.
    let ok = c
        .run_until(ELECTION * 10, |c| c.leader().is_some_and(|l| l != old))
        .unwrap();
    assert!(ok);
    let index = commit(&mut c, b"majority");
    c.net.heal();
    wait_all_applied(&mut c, index);
    assert_ne!(c.raft(old).unwrap().role(), Role::Leader);
    for p in lost {
        assert!(
            !matches!(c.outcome(p), Outcome::Committed { .. }),
            "a minority write committed"
        );
    }
}

#[test]
fn backup_overwrites_many_uncommitted_entries_quickly() {
    let mut c = cluster(5, 9);
    let l1 = wait_leader(&mut c);
    commit(&mut c, b"base");
    let os = others(&c, l1);
    // Leader and one follower in the minority get 50 entries that never commit.
    for &x in &os[1..] {
        c.net.isolate(x, [l1, os[0]]);
    }
    for i in 0..50u32 {
        let _ = c
            .raft_mut(l1)
            .unwrap()
            .propose(&[Bytes::from(i.to_le_bytes().to_vec())]);
    }
    c.run_ticks(5).unwrap();
    // The majority side moves on with 50 committed entries in a newer term.
    c.net.heal();
    c.net.isolate(l1, c.ids());
    c.net.isolate(os[0], c.ids());
    for i in 0..50u32 {
        let _ = commit(&mut c, &i.to_be_bytes());
    }
    let target = c.checker.committed_len();
    let rejects_before = c.net.stats.by_kind.get("AppendResp").copied().unwrap_or(0);
    c.net.heal();
    let ticks_start = c.now;
    wait_all_applied(&mut c, target);
    let ticks = c.now - ticks_start;
    let resp = c.net.stats.by_kind.get("AppendResp").copied().unwrap_or(0) - rejects_before;
    // Fast backup skips whole terms: a handful of round trips, not one per entry.
    assert!(ticks <= ELECTION * 3, "overwriting took {ticks} ticks");
    assert!(
        resp <= 60,
        "{resp} AppendEntries responses to back up 50 entries"
    );
}

#[test]
fn rpc_counts_stay_bounded() {
    // Production timing (heartbeat 10 ticks against a 2-tick round trip), as in the 6.824 test
    // where heartbeats are rare compared with an RPC round trip.
    let mut cfg = ClusterConfig::new(3);
    cfg.raft = Config::new(1);
    let mut c: Sim = Cluster::new(cfg, 10);
    wait_leader(&mut c);
    c.run_ticks(3).unwrap();
    let before = c.net.stats.sent_append_class;
    for i in 0..10u8 {
        commit(&mut c, &[i; 8]);
    }
    let used = c.net.stats.sent_append_class - before;
    assert!(
        used <= (10 + 4) * 3,
        "{used} AppendEntries-class messages for 10 proposals"
    );
}

#[test]
fn idle_group_message_rate_is_bounded() {
    // Production timing: 10 ms ticks, 100 ms heartbeat. Stated bound: 2 * (n - 1) messages per
    // heartbeat interval, i.e. 40 messages per second for 3 replicas.
    let mut cfg = ClusterConfig::new(3);
    cfg.raft = Config::new(1);
    let mut c: Sim = Cluster::new(cfg, 11);
    let ok = c
        .run_until(2000, |c| {
            c.leader()
                .is_some_and(|l| c.raft(l).unwrap().committed_in_term())
        })
        .unwrap();
    assert!(ok);
    c.run_ticks(100).unwrap();
    let before = c.net.stats.sent;
    c.run_ticks(1000).unwrap(); // ten seconds
    let per_second = (c.net.stats.sent - before) / 10;
    assert!(
        per_second <= 40,
        "{per_second} messages per second while idle"
    );
    assert!(
        per_second >= 20,
        "heartbeats must keep flowing ({per_second}/s)"
    );
}

#[test]
fn persistence_across_crash_of_all_nodes() {
    let mut c = cluster(3, 12);
    wait_leader(&mut c);
    let mut last = 0;
    for i in 0..10u8 {
        last = commit(&mut c, &[i; 8]);
    }
    wait_all_applied(&mut c, last);
    for id in c.ids() {
        c.crash(id);
    }
    for id in c.ids() {
        c.restart(id).unwrap();
    }
    wait_leader(&mut c);
    wait_all_applied(&mut c, last);
    let index = commit(&mut c, b"after");
    assert!(index > last);
    wait_all_applied(&mut c, index);
    // Every replica replayed the same prefix and applied the same history.
    let hashes: Vec<u64> = c.ids().iter().map(|&id| c.node(id).app.hash).collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]));
}

fn figure_8(seed: u64, net: NetConfig) {
    let mut cfg = ClusterConfig::new(5);
    cfg.net = net;
    cfg.disk_ticks_max = 3;
    let mut c: Sim = Cluster::new(cfg, seed);
    wait_leader(&mut c);
    let mut up = 5;
    for iter in 0..60u64 {
        if let Some(l) = c.leader() {
            let _ = c.propose_at(l, Bytes::from(iter.to_le_bytes().to_vec()));
        }
        let pause = if c.rng_u64() % 10 < 2 {
            ELECTION * 3
        } else {
            c.rng_u64() % 6
        };
        c.run_ticks(pause).unwrap();
        if let Some(l) = c.leader() {
            c.crash(l);
            up -= 1;
        }
        if up < 3 {
            let down: Vec<_> = c.ids().into_iter().filter(|&id| !c.is_up(id)).collect();
            let pick = down[(c.rng_u64() % down.len() as u64) as usize];
            c.restart(pick).unwrap();
            up += 1;
        }
    }
    c.net.cfg = NetConfig::reliable();
    for id in c.ids() {
        c.restart(id).unwrap();
    }
    let index = commit(&mut c, b"final");
    wait_all_applied(&mut c, index);
}

trait RngU64 {
    fn rng_u64(&mut self) -> u64;
}
impl RngU64 for Sim {
    fn rng_u64(&mut self) -> u64 {
        use rand::Rng;
        self.rng.gen()
    }
}

#[test]
fn figure_8_reliable() {
    figure_8(13, NetConfig::reliable());
}

#[test]
fn figure_8_unreliable() {
    figure_8(14, lossy());
}

#[test]
fn unreliable_agreement() {
    let mut cfg = ClusterConfig::new(5);
    cfg.net = lossy();
    let mut c: Sim = Cluster::new(cfg, 15);
    let mut last = 0;
    for i in 0..30u8 {
        last = commit(&mut c, &[i; 8]);
    }
    c.net.cfg = NetConfig::reliable();
    wait_all_applied(&mut c, last);
}

fn churn(seed: u64, net: NetConfig) {
    let mut cfg = ClusterConfig::new(5);
    cfg.net = net;
    cfg.snapshot_every_entries = 20;
    let mut c: Sim = Cluster::new(cfg, seed);
    let mut acked = 0;
    for _ in 0..400 {
        let r = c.rng_u64() % 1000;
        if r < 300 {
            if let Ok(id) = c.propose(Bytes::from(c.now.to_le_bytes().to_vec())) {
                let _ = id;
            }
        }
        if r < 15 {
            let id = 1 + c.rng_u64() % 5;
            c.crash(id);
        } else if r < 60 {
            let id = 1 + c.rng_u64() % 5;
            c.restart(id).unwrap();
        } else if r < 70 {
            let id = 1 + c.rng_u64() % 5;
            c.net.isolate(id, c.ids());
        } else if r < 90 {
            c.net.heal();
        }
        c.step().unwrap();
        acked = acked.max(c.checker.acked_max);
    }
    c.net.heal();
    c.net.cfg = NetConfig::reliable();
    for id in c.ids() {
        c.restart(id).unwrap();
    }
    let index = commit(&mut c, b"end of churn");
    assert!(index > acked);
    wait_all_applied(&mut c, index);
    assert!(acked > 10, "churn made too little progress ({acked})");
}

#[test]
fn reliable_churn() {
    churn(16, NetConfig::reliable());
}

#[test]
fn unreliable_churn() {
    churn(17, lossy());
}

// ----- 2D: snapshots -------------------------------------------------------------------------

fn snapshot_cluster(seed: u64, net: NetConfig) -> Sim {
    let mut cfg = ClusterConfig::new(3);
    cfg.net = net;
    cfg.snapshot_every_entries = 10;
    Cluster::new(cfg, seed)
}

fn snapshot_install(seed: u64, net: NetConfig, crash: bool) {
    let mut c = snapshot_cluster(seed, net);
    let leader = wait_leader(&mut c);
    let lag = others(&c, leader)[0];
    c.net.isolate(lag, c.ids());
    if crash {
        c.crash(lag);
    }
    let mut last = 0;
    for i in 0..60u8 {
        last = commit(&mut c, &[i; 8]);
    }
    let l = c.leader().unwrap();
    assert!(
        c.raft(l).unwrap().status().snapshot_index > applied(&c, lag),
        "leader compacted past the follower"
    );
    let snaps_before = c.net.stats.by_kind.get("Snapshot").copied().unwrap_or(0);
    c.net.heal();
    c.net.cfg = NetConfig::reliable();
    c.restart(lag).unwrap();
    wait_all_applied(&mut c, last);
    assert!(
        c.net.stats.by_kind.get("Snapshot").copied().unwrap_or(0) > snaps_before,
        "no InstallSnapshot sent"
    );
    assert_eq!(c.node(lag).app.hash, c.node(l).app.hash);
    let index = commit(&mut c, b"after snapshot");
    wait_all_applied(&mut c, index);
}

#[test]
fn snapshot_install_to_lagging_follower() {
    snapshot_install(18, NetConfig::reliable(), false);
}

#[test]
fn snapshot_install_with_crash() {
    snapshot_install(19, NetConfig::reliable(), true);
}

#[test]
fn snapshot_install_unreliable() {
    snapshot_install(20, lossy(), true);
}

#[test]
fn snapshot_crash_all_one_op_crash_all_again() {
    let mut c = snapshot_cluster(21, NetConfig::reliable());
    let mut last = 0;
    for i in 0..25u8 {
        last = commit(&mut c, &[i; 8]);
    }
    wait_all_applied(&mut c, last);
    for id in c.ids() {
        assert!(
            c.node(id).disk.snapshot().is_some(),
            "node {id} has no durable snapshot"
        );
        c.crash(id);
    }
    for id in c.ids() {
        c.restart(id).unwrap();
    }
    let one = commit(&mut c, b"one op");
    wait_all_applied(&mut c, one);
    for id in c.ids() {
        c.crash(id);
    }
    for id in c.ids() {
        c.restart(id).unwrap();
        // The snapshot survived both crashes.
        assert!(c.raft(id).unwrap().status().snapshot_index >= 10);
    }
    wait_leader(&mut c);
    wait_all_applied(&mut c, one);
}

#[test]
fn applied_never_goes_back_across_crashes() {
    let mut c = snapshot_cluster(22, NetConfig::reliable());
    let mut last = 0;
    for round in 0..5u8 {
        for i in 0..12u8 {
            last = commit(&mut c, &[round, i]);
        }
        wait_all_applied(&mut c, last);
        let victim = 1 + (round as u64 % 3);
        let snap = c.node(victim).disk.snapshot().map_or(0, |s| s.meta.index);
        c.crash(victim);
        c.restart(victim).unwrap();
        // Resumes at or above its last snapshot, and the app agrees.
        let st = c.raft(victim).unwrap().status();
        assert!(
            st.applied >= snap,
            "restart at {} below snapshot {snap}",
            st.applied
        );
        assert_eq!(c.node(victim).app.applied, st.applied);
    }
    wait_all_applied(&mut c, last);
}

#[test]
fn slow_follower_after_compaction() {
    let mut cfg = ClusterConfig::new(3);
    cfg.snapshot_every_entries = 10;
    cfg.slow_disk_ticks = 30;
    let mut c: Sim = Cluster::new(cfg, 23);
    let leader = wait_leader(&mut c);
    let slow = others(&c, leader)[0];
    c.set_slow_disk(slow, true);
    let mut last = 0;
    for i in 0..40u8 {
        last = commit(&mut c, &[i; 8]);
    }
    c.set_slow_disk(slow, false);
    wait_all_applied(&mut c, last);
    assert_eq!(c.node(slow).app.hash, c.node(leader).app.hash);
}

// ----- leadership, membership, PreVote, CheckQuorum, reads ----------------------------------

#[test]
fn leadership_transfer() {
    let mut c = cluster(3, 24);
    let old = wait_leader(&mut c);
    let term = c.raft(old).unwrap().term();
    let to = others(&c, old)[1];
    c.raft_mut(old).unwrap().transfer_leader(to).unwrap();
    let ok = c.run_until(ELECTION, |c| c.leader() == Some(to)).unwrap();
    assert!(ok, "transfer did not complete within an election timeout");
    assert_eq!(c.raft(to).unwrap().term(), term + 1);
    // And to a lagging follower: it catches up first.
    let lag = others(&c, to)[0];
    c.net.isolate(lag, c.ids());
    for i in 0..5u8 {
        commit(&mut c, &[i]);
    }
    c.net.heal();
    c.raft_mut(to).unwrap().transfer_leader(lag).unwrap();
    let ok = c
        .run_until(ELECTION * 2, |c| c.leader() == Some(lag))
        .unwrap();
    assert!(ok, "transfer to a lagging follower did not complete");
    let index = commit(&mut c, b"after transfer");
    wait_all_applied(&mut c, index);
}

#[test]
fn membership_add_and_remove_under_load() {
    let mut cfg = ClusterConfig::new(3);
    cfg.snapshot_every_entries = 15;
    let mut c: Sim = Cluster::new(cfg, 25);
    wait_leader(&mut c);
    for i in 0..20u8 {
        commit(&mut c, &[i]);
    }
    let new = c.add_node();
    let change = |c: &mut Sim, cc: ConfChange| {
        for _ in 0..50 {
            wait_leader(c);
            if c.propose_conf_change(cc).is_ok() {
                return;
            }
            c.run_ticks(5).unwrap();
        }
        panic!("conf change {cc:?} never accepted");
    };
    change(&mut c, ConfChange::AddLearner(new));
    // Load continues while the learner catches up; it does not vote yet.
    for i in 0..10u8 {
        let _ = c.propose(Bytes::from(vec![i; 4]));
        c.run_ticks(2).unwrap();
    }
    let ok = c
        .run_until(ELECTION * 20, |c| {
            c.raft(new).unwrap().conf().is_learner(new)
        })
        .unwrap();
    assert!(ok);
    let index = commit(&mut c, b"learner");
    wait_all_applied(&mut c, index);
    change(&mut c, ConfChange::PromoteLearner(new));
    let ok = c
        .run_until(ELECTION * 20, |c| {
            c.ids()
                .iter()
                .all(|&id| c.raft(id).unwrap().conf().is_voter(new))
        })
        .unwrap();
    assert!(ok, "promotion did not reach everyone");
    // Remove the leader itself under load.
    let leader = c.leader().unwrap();
    for i in 0..5u8 {
        let _ = c.propose(Bytes::from(vec![i; 4]));
    }
    change(&mut c, ConfChange::Remove(leader));
    let ok = c
        .run_until(ELECTION * 20, |c| c.leader().is_some_and(|l| l != leader))
        .unwrap();
    assert!(ok, "no new leader after removing the old one");
    let index = commit(&mut c, b"after remove");
    let voters = c.raft(c.leader().unwrap()).unwrap().conf().voters.clone();
    assert_eq!(voters.len(), 3);
    assert!(!voters.contains(&leader) && voters.contains(&new));
    let ok = c
        .run_until(ELECTION * 20, |c| {
            voters.iter().all(|&v| applied(c, v) >= index)
        })
        .unwrap();
    assert!(ok);
}

#[test]
fn prevote_keeps_flapping_node_from_raising_terms() {
    let mut c = cluster(3, 26);
    let leader = wait_leader(&mut c);
    let term = c.raft(leader).unwrap().term();
    let f = others(&c, leader)[0];
    // The node flaps: cut off for many election timeouts, back, cut off again.
    for _ in 0..3 {
        c.net.isolate(f, c.ids());
        c.run_ticks(ELECTION * 6).unwrap();
        assert_eq!(
            c.raft(f).unwrap().term(),
            term,
            "an isolated node raised its term"
        );
        c.net.heal();
        c.run_ticks(ELECTION).unwrap();
    }
    assert_eq!(c.leader(), Some(leader), "the healthy leader was deposed");
    assert_eq!(c.raft(leader).unwrap().term(), term);
}

#[test]
fn check_quorum_steps_down_isolated_leader() {
    let mut c = cluster(3, 27);
    let leader = wait_leader(&mut c);
    c.net.isolate(leader, c.ids());
    let ok = c
        .run_until(ELECTION * 3, |c| {
            c.raft(leader).unwrap().role() != Role::Leader
        })
        .unwrap();
    assert!(ok, "an isolated leader kept leading");
    assert_ne!(c.raft(leader).unwrap().leader(), leader);
}

#[test]
fn new_leader_serves_no_read_before_committing_in_its_term() {
    let mut c = cluster(3, 28);
    let old = wait_leader(&mut c);
    commit(&mut c, b"x");
    c.crash(old);
    let ok = c
        .run_until(ELECTION * 10, |c| c.leader().is_some())
        .unwrap();
    assert!(ok);
    let new = c.leader().unwrap();
    let new_term = c.raft(new).unwrap().term();
    // Cut the new leader off before its no-op can commit.
    c.net.isolate(new, c.ids());
    assert!(!c.raft(new).unwrap().committed_in_term());
    let ctx = c.read().expect("the leader accepts the read");
    c.run_ticks(ELECTION / 2).unwrap();
    assert_eq!(
        c.read_outcome(ctx),
        ReadOutcome::Pending,
        "read served before the no-op committed"
    );
    c.net.heal();
    let ok = c
        .run_until(ELECTION * 5, |c| {
            c.read_outcome(ctx) != ReadOutcome::Pending
        })
        .unwrap();
    assert!(ok);
    match c.read_outcome(ctx) {
        ReadOutcome::Ready { node, index } => {
            assert_eq!(node, new);
            // The read index is at or after the new leader's no-op.
            assert_eq!(c.raft(new).unwrap().log_term(index), Some(new_term));
        }
        other => panic!("read not served after healing: {other:?}"),
    }
}

#[test]
fn read_index_is_confirmed_by_one_heartbeat_round_for_many_reads() {
    let mut c = cluster(3, 29);
    let leader = wait_leader(&mut c);
    let index = commit(&mut c, b"w");
    c.run_ticks(3).unwrap();
    let hb_before = c.net.stats.by_kind.get("Heartbeat").copied().unwrap_or(0);
    let ctxs: Vec<u64> = (0..50).map(|_| c.read().unwrap()).collect();
    c.step().unwrap();
    let hb = c.net.stats.by_kind.get("Heartbeat").copied().unwrap_or(0) - hb_before;
    assert!(
        hb <= 4,
        "{hb} heartbeats for 50 reads: reads are not batched"
    );
    c.run_until(10, |c| {
        ctxs.iter()
            .all(|&r| c.read_outcome(r) != ReadOutcome::Pending)
    })
    .unwrap();
    for r in ctxs {
        match c.read_outcome(r) {
            ReadOutcome::Ready { node, index: ri } => {
                assert_eq!(node, leader);
                assert!(ri >= index);
            }
            other => panic!("read {r}: {other:?}"),
        }
    }
}

#[test]
fn lease_reads_are_served_locally_and_stop_when_isolated() {
    let mut cfg = ClusterConfig::new(3);
    cfg.raft.read_mode = ReadMode::Lease;
    let mut c: Sim = Cluster::new(cfg, 30);
    let leader = wait_leader(&mut c);
    commit(&mut c, b"w");
    c.run_ticks(4).unwrap();
    let hb_before = c.net.stats.by_kind.get("Heartbeat").copied().unwrap_or(0);
    c.raft_mut(leader).unwrap().read_index(9_999).unwrap();
    let mut rd = c.raft_mut(leader).unwrap().ready();
    assert_eq!(
        rd.take_read_states().len(),
        1,
        "a lease read is answered at once"
    );
    for m in rd.take_messages() {
        assert!(
            !matches!(m.body, MessageBody::Heartbeat { .. }),
            "a lease read needs no heartbeat round"
        );
    }
    let _ = hb_before;
    // Isolated, the lease (election 20 - drift 4 = 16 ticks from the last acked heartbeat)
    // runs out: a read is then either refused (stepped down) or waits for a heartbeat round that
    // cannot complete. It is never answered from the lease.
    c.net.isolate(leader, c.ids());
    c.run_ticks(17).unwrap();
    let raft = c.raft_mut(leader).unwrap();
    if raft.read_index(10_000).is_ok() {
        for _ in 0..10 {
            raft.tick();
            let mut rd = raft.ready();
            assert!(
                rd.take_read_states().is_empty(),
                "a lease read served after the lease expired"
            );
        }
    }
}

#[test]
fn same_seed_same_run() {
    use tynamo::sim::{run_seed, Faults, RunOptions};
    let opts = RunOptions::new(5, Faults::all());
    let a = run_seed(42, &opts).unwrap();
    let b = run_seed(42, &opts).unwrap();
    assert_eq!(a, b);
    let other = run_seed(43, &opts).unwrap();
    assert_ne!(a.digest, other.digest);
}

#[test]
fn learner_is_promoted_only_after_catching_up() {
    let mut cfg = ClusterConfig::new(3);
    cfg.raft.promote_lag_entries_max = 5;
    let mut c: Sim = Cluster::new(cfg, 31);
    wait_leader(&mut c);
    let new = c.add_node();
    c.propose_conf_change(ConfChange::AddLearner(new)).unwrap();
    let ok = c
        .run_until(ELECTION * 10, |c| {
            c.ids()
                .iter()
                .all(|&id| c.raft(id).unwrap().conf().is_learner(new))
        })
        .unwrap();
    assert!(ok);
    // Cut the learner off and move the log well past the lag limit.
    c.net.isolate(new, c.ids());
    for i in 0..20u8 {
        commit(&mut c, &[i]);
    }
    let refused = c.propose_conf_change(ConfChange::PromoteLearner(new));
    assert!(
        matches!(refused, Err(tynamo::raft::ProposeError::LearnerBehind { id, .. }) if id == new),
        "{refused:?}"
    );
    // A learner never counts: the group committed all of that without it.
    assert!(!c.raft(c.leader().unwrap()).unwrap().conf().is_voter(new));
    c.net.heal();
    let target = c.checker.committed_len();
    wait_all_applied(&mut c, target);
    // The leader learns of the catch-up with the learner's next acks.
    let mut accepted = false;
    for _ in 0..ELECTION {
        if c.propose_conf_change(ConfChange::PromoteLearner(new))
            .is_ok()
        {
            accepted = true;
            break;
        }
        c.step().unwrap();
    }
    assert!(accepted, "promotion of a caught-up learner refused");
    let ok = c
        .run_until(ELECTION * 10, |c| c.raft(new).unwrap().conf().is_voter(new))
        .unwrap();
    assert!(ok, "the caught-up learner was not promoted");
}
