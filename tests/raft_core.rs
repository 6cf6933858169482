//! Tests of the sans-IO core driven by hand, message by message, where the simulator would
//! hide the exact order of events: the asynchronous-append overwrite race, what may leave
//! before the local fsync, and garbage from the network.

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tynamo::raft::*;

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.election_ticks = 10;
    c.heartbeat_ticks = 2;
    c.lease_drift_ticks = 2;
    c
}

/// A follower of a bootstrapped 3-node group with its first Ready written and durable.
fn follower(id: NodeId) -> RawNode {
    let mut n = RawNode::new(cfg(id), InitialState::bootstrap(&[1, 2, 3]), 7).unwrap();
    let rd = n.ready();
    n.on_persisted(rd.write_mark());
    n
}

fn ent(index: Index, term: Term, byte: u8) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: Bytes::from(vec![byte]),
    }
}

fn append(
    from: NodeId,
    term: Term,
    prev: (Index, Term),
    commit: Index,
    entries: Vec<Entry>,
) -> Message {
    Message {
        from,
        to: 2,
        term,
        body: MessageBody::Append {
            prev_index: prev.0,
            prev_term: prev.1,
            commit,
            entries,
        },
    }
}

fn acks(rd: &mut Ready) -> Vec<(NodeId, Index)> {
    rd.take_messages()
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResp {
                index,
                reject: None,
            } => Some((m.to, index)),
            _ => None,
        })
        .collect()
}

#[test]
fn async_append_overwrite_race_never_acks_what_is_not_durable() {
    let mut n = follower(2);
    // Leader 1 of term 2 sends entries 2..3; the write W1 starts but does not complete.
    n.step(append(
        1,
        2,
        (1, 1),
        1,
        vec![ent(2, 2, 0xa), ent(3, 2, 0xa)],
    ))
    .unwrap();
    let mut w1 = n.ready();
    assert_eq!(w1.entries().len(), 2);
    assert!(
        acks(&mut w1).is_empty(),
        "acked before the write is durable"
    );
    // Leader 3 of term 3 overwrites index 2 in memory while W1 is in flight (write W2).
    n.step(append(3, 3, (1, 1), 1, vec![ent(2, 3, 0xb)]))
        .unwrap();
    let mut w2 = n.ready();
    assert_eq!(
        w2.entries()
            .iter()
            .map(|e| (e.index, e.term))
            .collect::<Vec<_>>(),
        vec![(2, 3)]
    );
    assert!(acks(&mut w2).is_empty());
    // The leader's commit arrives before W2 is durable: nothing may be applied yet.
    n.step(Message {
        from: 3,
        to: 2,
        term: 3,
        body: MessageBody::Heartbeat {
            commit: 2,
            round: 1,
        },
    })
    .unwrap();
    let mut rd = n.ready();
    assert!(
        rd.committed_entries().is_empty(),
        "applied an entry that is not durable"
    );
    // W1 completes. It wrote the term-2 entries that memory no longer holds: no ack, no apply.
    n.on_persisted(w1.write_mark());
    let mut rd2 = n.ready();
    assert!(
        acks(&mut rd).is_empty() && acks(&mut rd2).is_empty(),
        "acked an overwritten write"
    );
    assert!(rd2.committed_entries().is_empty());
    assert_eq!(n.status().persisted, 1);
    // W2 completes: now index 2 (term 3) is durable, acked to leader 3, and applied.
    n.on_persisted(w2.write_mark());
    let mut rd3 = n.ready();
    assert_eq!(acks(&mut rd3), vec![(3, 2)]);
    assert_eq!(
        rd3.committed_entries()
            .iter()
            .map(|e| (e.index, e.term))
            .collect::<Vec<_>>(),
        vec![(2, 3)]
    );
}

#[test]
fn leader_sends_before_its_fsync_but_counts_itself_only_after() {
    // A single-voter group makes the leader's own durability the only thing that commits.
    let mut n = RawNode::new(cfg(1), InitialState::bootstrap(&[1]), 1).unwrap();
    let rd = n.ready();
    n.on_persisted(rd.write_mark());
    for _ in 0..30 {
        n.tick();
        if n.has_ready() {
            let rd = n.ready();
            n.on_persisted(rd.write_mark());
        }
        if n.role() == Role::Leader {
            break;
        }
    }
    assert_eq!(n.role(), Role::Leader);
    let rd = n.ready();
    n.on_persisted(rd.write_mark());
    let commit = n.status().commit;
    let (_, last) = n.propose(&[Bytes::from_static(b"a")]).unwrap();
    let rd = n.ready();
    assert_eq!(rd.entries().last().map(|e| e.index), Some(last));
    assert_eq!(
        n.status().commit,
        commit,
        "committed before its own write was durable"
    );
    n.on_persisted(rd.write_mark());
    assert_eq!(n.status().commit, last);
}

#[test]
fn candidate_votes_leave_only_after_the_hard_state_is_durable() {
    let mut c = cfg(1);
    c.pre_vote = false;
    let mut n = RawNode::new(c, InitialState::bootstrap(&[1, 2, 3]), 3).unwrap();
    let rd = n.ready();
    n.on_persisted(rd.write_mark());
    let mut rd = loop {
        n.tick();
        if n.role() == Role::Candidate {
            break n.ready();
        }
    };
    assert!(rd.hard_state().is_some_and(|hs| hs.vote == 1));
    assert!(rd
        .take_messages()
        .iter()
        .all(|m| !matches!(m.body, MessageBody::Vote { .. })));
    let votes = rd.take_persisted_messages();
    assert_eq!(
        votes.len(),
        2,
        "vote requests wait for the fsync of term and vote"
    );
    // Granting a vote is also durable-first.
    let mut f = follower(2);
    f.step(Message {
        from: 1,
        to: 2,
        term: 2,
        body: MessageBody::Vote {
            last_index: 1,
            last_term: 1,
            transfer: false,
        },
    })
    .ok();
    // The follower was in its startup lease (it may have a leader it cannot see): tick past it.
    for _ in 0..10 {
        f.tick();
    }
    let _ = f.ready();
    f.step(Message {
        from: 1,
        to: 2,
        term: 3,
        body: MessageBody::Vote {
            last_index: 1,
            last_term: 1,
            transfer: false,
        },
    })
    .unwrap();
    let mut rd = f.ready();
    assert!(rd
        .take_messages()
        .iter()
        .all(|m| !matches!(m.body, MessageBody::VoteResp { reject: false })));
    let granted = rd.take_persisted_messages();
    assert!(matches!(
        granted[0].body,
        MessageBody::VoteResp { reject: false }
    ));
    assert_eq!(rd.hard_state().map(|h| h.vote), Some(1));
}

#[test]
fn stale_and_misaddressed_messages_are_dropped_and_counted() {
    let mut n = follower(2);
    n.step(append(1, 3, (1, 1), 1, vec![])).unwrap();
    let mut m = append(1, 3, (1, 1), 1, vec![]);
    m.to = 9;
    assert_eq!(n.step(m), Err(Dropped::WrongRecipient));
    assert_eq!(
        n.step(append(1, 2, (1, 1), 1, vec![])),
        Err(Dropped::StaleTerm)
    );
    // Entries out of order.
    let bad = append(1, 3, (1, 1), 1, vec![ent(3, 3, 0)]);
    assert!(matches!(n.step(bad), Err(Dropped::Malformed(_))));
    let s = n.stats();
    assert_eq!(
        (
            s.dropped_wrong_recipient,
            s.dropped_stale_term,
            s.dropped_malformed
        ),
        (1, 1, 1)
    );
}

fn random_message(rng: &mut ChaCha8Rng, to: NodeId) -> Message {
    let big = |rng: &mut ChaCha8Rng| {
        if rng.gen_bool(0.1) {
            rng.gen::<u64>()
        } else {
            rng.gen_range(0..12)
        }
    };
    let term = big(rng);
    let body = match rng.gen_range(0..11) {
        0 => MessageBody::PreVote {
            last_index: big(rng),
            last_term: big(rng),
        },
        1 => MessageBody::PreVoteResp { reject: rng.gen() },
        2 => MessageBody::Vote {
            last_index: big(rng),
            last_term: big(rng),
            transfer: rng.gen(),
        },
        3 => MessageBody::VoteResp { reject: rng.gen() },
        4 => {
            let prev_index = big(rng);
            let n = rng.gen_range(0..4);
            let entries = (0..n)
                .map(|i| Entry {
                    index: if rng.gen_bool(0.9) {
                        prev_index.wrapping_add(1 + i)
                    } else {
                        big(rng)
                    },
                    term: big(rng),
                    kind: [EntryKind::Normal, EntryKind::Noop, EntryKind::Conf]
                        [rng.gen_range(0..3)],
                    data: Bytes::from(vec![rng.gen::<u8>(); rng.gen_range(0..20)]),
                })
                .collect();
            MessageBody::Append {
                prev_index,
                prev_term: big(rng),
                commit: big(rng),
                entries,
            }
        }
        5 => MessageBody::AppendResp {
            index: big(rng),
            reject: rng.gen_bool(0.5).then(|| RejectHint {
                rejected_index: big(rng),
                conflict_term: big(rng),
                conflict_index: big(rng),
            }),
        },
        6 => MessageBody::Heartbeat {
            commit: big(rng),
            round: big(rng),
        },
        7 => MessageBody::HeartbeatResp { round: big(rng) },
        8 => {
            let total = rng.gen_range(0..64);
            MessageBody::Snapshot {
                meta: SnapshotMeta {
                    index: big(rng),
                    term: big(rng),
                    conf: ConfState {
                        voters: vec![rng.gen_range(0..5), 2],
                        learners: vec![],
                    },
                },
                offset: big(rng),
                total_bytes: total,
                data: Bytes::from(vec![1u8; rng.gen_range(0..16)]),
            }
        }
        9 => MessageBody::SnapshotResp {
            snapshot_index: big(rng),
            next_offset: big(rng),
        },
        _ => MessageBody::TimeoutNow,
    };
    Message {
        from: rng.gen_range(0..5),
        to: if rng.gen_bool(0.95) { to } else { 7 },
        term,
        body,
    }
}

/// Drives node 2 through PreVote and Vote with grants from node 1.
fn make_leader(n: &mut RawNode) {
    while n.role() != Role::PreCandidate {
        n.tick();
    }
    let term = n.term() + 1;
    n.step(Message {
        from: 1,
        to: 2,
        term,
        body: MessageBody::PreVoteResp { reject: false },
    })
    .unwrap();
    assert_eq!(n.role(), Role::Candidate);
    let rd = n.ready();
    n.on_persisted(rd.write_mark());
    n.step(Message {
        from: 1,
        to: 2,
        term,
        body: MessageBody::VoteResp { reject: false },
    })
    .unwrap();
    let rd = n.ready();
    n.on_persisted(rd.write_mark());
}

#[test]
fn no_panic_on_random_messages_in_any_role() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for round in 0..200 {
        let mut n = RawNode::new(cfg(2), InitialState::bootstrap(&[1, 2, 3]), round).unwrap();
        let rd = n.ready();
        n.on_persisted(rd.write_mark());
        if round % 2 == 0 {
            make_leader(&mut n);
            assert_eq!(n.role(), Role::Leader);
        }
        for _ in 0..300 {
            match rng.gen_range(0..10) {
                0 => n.tick(),
                1 => {
                    let _ = n.propose(&[Bytes::from_static(b"p")]);
                }
                2 => {
                    let _ = n.read_index(rng.gen());
                }
                _ => {
                    let _ = n.step(random_message(&mut rng, 2));
                }
            }
            if n.has_ready() {
                let rd = n.ready();
                if rng.gen_bool(0.8) {
                    n.on_persisted(rd.write_mark());
                }
            }
        }
    }
}

#[test]
fn config_validation_rejects_a_bad_node_config() {
    let mut c = cfg(1);
    c.heartbeat_ticks = 20;
    assert!(matches!(
        RawNode::new(c, InitialState::default(), 0),
        Err(ConfigError::ElectionNotAboveHeartbeat {
            election_ticks: 10,
            heartbeat_ticks: 20
        })
    ));
}

#[test]
fn commit_only_hard_state_change_needs_no_fsync() {
    let mut n = follower(2);
    n.step(append(1, 2, (1, 1), 1, vec![ent(2, 2, 1)])).unwrap();
    let rd = n.ready();
    assert!(rd.must_sync(), "new entries and a new term must be synced");
    n.on_persisted(rd.write_mark());
    let _ = n.ready();
    // Only the commit index moves.
    n.step(Message {
        from: 1,
        to: 2,
        term: 2,
        body: MessageBody::Heartbeat {
            commit: 2,
            round: 1,
        },
    })
    .unwrap();
    let rd = n.ready();
    assert_eq!(rd.hard_state().map(|h| h.commit), Some(2));
    assert!(rd.must_write() && !rd.must_sync());
}
