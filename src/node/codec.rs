//! Raft messages <-> flatbuffers frames (schema/raft.fbs).
//!
//! One frame carries every message a core has for one remote core in a loop turn (a `PeerBatch`),
//! so heartbeats and appends of many groups share a frame and a write.
//!
//! Decoding never trusts the bytes: the whole buffer is verified with tightened limits before any
//! field is read, and a message whose contents make no sense (no body, an unknown entry kind) is an
//! error for that frame. Entry and snapshot payloads come out as `Bytes` slices of the frame, so the
//! receive buffer is read in place, never copied.

use bytes::Bytes;
use flatbuffers::{FlatBufferBuilder, VerifierOptions, WIPOffset};

use crate::raft::{ConfState, Entry, EntryKind, Message, MessageBody, RejectHint, SnapshotMeta};
use crate::schema_gen::wire;

/// A Raft group's id on the wire and in the runtime.
pub type GroupId = u64;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame failed flatbuffers verification: {0}")]
    Invalid(String),
    #[error("message {index} of the frame has no body")]
    NoBody { index: usize },
    #[error("message {index} of the frame has unknown body type {body_type}")]
    UnknownBody { index: usize, body_type: u8 },
    #[error("message {index} of the frame has unknown entry kind {kind}")]
    UnknownEntryKind { index: usize, kind: u8 },
    #[error("message {index} of the frame lacks field {field}")]
    Missing { index: usize, field: &'static str },
}

/// Verifier limits for peer frames. Our schema nests at most 5 tables deep
/// (PeerBatch > RaftMessage > SnapshotChunk > SnapshotMeta > ConfState).
pub fn verifier_options(frame_bytes_max: usize) -> VerifierOptions {
    VerifierOptions {
        max_depth: 8,
        // Every entry is a table: bound them by what the frame could physically hold.
        max_tables: (frame_bytes_max / 8).max(64),
        max_apparent_size: frame_bytes_max,
        ignore_missing_null_terminator: false,
    }
}

fn kind_to_wire(kind: EntryKind) -> wire::EntryKind {
    match kind {
        EntryKind::Normal => wire::EntryKind::Normal,
        EntryKind::Noop => wire::EntryKind::Noop,
        EntryKind::Conf => wire::EntryKind::Conf,
    }
}

fn conf_to_wire<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    conf: &ConfState,
) -> WIPOffset<wire::ConfState<'a>> {
    let voters = fbb.create_vector(&conf.voters);
    let learners = fbb.create_vector(&conf.learners);
    wire::ConfState::create(
        fbb,
        &wire::ConfStateArgs {
            voters: Some(voters),
            learners: Some(learners),
        },
    )
}

fn meta_to_wire<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    meta: &SnapshotMeta,
) -> WIPOffset<wire::SnapshotMeta<'a>> {
    let conf = conf_to_wire(fbb, &meta.conf);
    wire::SnapshotMeta::create(
        fbb,
        &wire::SnapshotMetaArgs {
            index: meta.index,
            term: meta.term,
            conf: Some(conf),
        },
    )
}

/// Encodes `messages` (each with its group) as one PeerBatch into `fbb` and returns the finished
/// bytes (without a length prefix: the transport adds it). `fbb` is reset first; reuse one builder
/// per connection so its buffer is allocated once.
pub fn encode_batch<'b>(
    fbb: &'b mut FlatBufferBuilder<'static>,
    messages: &[(GroupId, &Message)],
) -> &'b [u8] {
    fbb.reset();
    let mut offsets = Vec::with_capacity(messages.len());
    for &(group, m) in messages {
        let (body_type, body) = encode_body(fbb, &m.body);
        offsets.push(wire::RaftMessage::create(
            fbb,
            &wire::RaftMessageArgs {
                group,
                from: m.from,
                to: m.to,
                term: m.term,
                body_type,
                body: Some(body),
            },
        ));
    }
    let messages = fbb.create_vector(&offsets);
    let batch = wire::PeerBatch::create(
        fbb,
        &wire::PeerBatchArgs {
            messages: Some(messages),
        },
    );
    fbb.finish(batch, None);
    fbb.finished_data()
}

fn encode_body(
    fbb: &mut FlatBufferBuilder<'static>,
    body: &MessageBody,
) -> (wire::Body, WIPOffset<flatbuffers::UnionWIPOffset>) {
    match body {
        MessageBody::PreVote {
            last_index,
            last_term,
        } => (
            wire::Body::PreVote,
            wire::PreVote::create(
                fbb,
                &wire::PreVoteArgs {
                    last_index: *last_index,
                    last_term: *last_term,
                },
            )
            .as_union_value(),
        ),
        MessageBody::PreVoteResp { reject } => (
            wire::Body::PreVoteResp,
            wire::PreVoteResp::create(fbb, &wire::PreVoteRespArgs { reject: *reject })
                .as_union_value(),
        ),
        MessageBody::Vote {
            last_index,
            last_term,
            transfer,
        } => (
            wire::Body::Vote,
            wire::Vote::create(
                fbb,
                &wire::VoteArgs {
                    last_index: *last_index,
                    last_term: *last_term,
                    transfer: *transfer,
                },
            )
            .as_union_value(),
        ),
        MessageBody::VoteResp { reject } => (
            wire::Body::VoteResp,
            wire::VoteResp::create(fbb, &wire::VoteRespArgs { reject: *reject }).as_union_value(),
        ),
        MessageBody::Append {
            prev_index,
            prev_term,
            commit,
            entries,
        } => {
            let mut offsets = Vec::with_capacity(entries.len());
            for e in entries {
                let data = fbb.create_vector(&e.data[..]);
                offsets.push(wire::Entry::create(
                    fbb,
                    &wire::EntryArgs {
                        index: e.index,
                        term: e.term,
                        kind: kind_to_wire(e.kind),
                        data: Some(data),
                    },
                ));
            }
            let entries = fbb.create_vector(&offsets);
            (
                wire::Body::Append,
                wire::Append::create(
                    fbb,
                    &wire::AppendArgs {
                        prev_index: *prev_index,
                        prev_term: *prev_term,
                        commit: *commit,
                        entries: Some(entries),
                    },
                )
                .as_union_value(),
            )
        }
        MessageBody::AppendResp { index, reject } => {
            let hint = reject.map(|r| {
                wire::RejectHint::new(r.rejected_index, r.conflict_term, r.conflict_index)
            });
            (
                wire::Body::AppendResp,
                wire::AppendResp::create(
                    fbb,
                    &wire::AppendRespArgs {
                        index: *index,
                        reject: hint.as_ref(),
                    },
                )
                .as_union_value(),
            )
        }
        MessageBody::Heartbeat { commit, round } => (
            wire::Body::Heartbeat,
            wire::Heartbeat::create(
                fbb,
                &wire::HeartbeatArgs {
                    commit: *commit,
                    round: *round,
                },
            )
            .as_union_value(),
        ),
        MessageBody::HeartbeatResp { round } => (
            wire::Body::HeartbeatResp,
            wire::HeartbeatResp::create(fbb, &wire::HeartbeatRespArgs { round: *round })
                .as_union_value(),
        ),
        MessageBody::Snapshot {
            meta,
            offset,
            total_bytes,
            data,
        } => {
            let meta = meta_to_wire(fbb, meta);
            let data = fbb.create_vector(&data[..]);
            (
                wire::Body::SnapshotChunk,
                wire::SnapshotChunk::create(
                    fbb,
                    &wire::SnapshotChunkArgs {
                        meta: Some(meta),
                        offset: *offset,
                        total_bytes: *total_bytes,
                        data: Some(data),
                    },
                )
                .as_union_value(),
            )
        }
        MessageBody::SnapshotResp {
            snapshot_index,
            next_offset,
        } => (
            wire::Body::SnapshotResp,
            wire::SnapshotResp::create(
                fbb,
                &wire::SnapshotRespArgs {
                    snapshot_index: *snapshot_index,
                    next_offset: *next_offset,
                },
            )
            .as_union_value(),
        ),
        MessageBody::TimeoutNow => (
            wire::Body::TimeoutNow,
            wire::TimeoutNow::create(fbb, &wire::TimeoutNowArgs {}).as_union_value(),
        ),
    }
}

/// Verifies `frame` and decodes every message in it, in order, with its group. Payloads are slices
/// of `frame`. Any bad message rejects the whole frame: a peer that sends garbage is broken, and
/// Raft recovers from the loss of a frame.
pub fn decode_batch(
    frame: &Bytes,
    opts: &VerifierOptions,
) -> Result<Vec<(GroupId, Message)>, DecodeError> {
    let batch = wire::root_as_peer_batch_with_opts(opts, frame)
        .map_err(|e| DecodeError::Invalid(e.to_string()))?;
    let Some(messages) = batch.messages() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(messages.len());
    for (index, m) in messages.iter().enumerate() {
        let body = decode_body(frame, index, &m)?;
        out.push((
            m.group(),
            Message {
                from: m.from(),
                to: m.to(),
                term: m.term(),
                body,
            },
        ));
    }
    Ok(out)
}

fn payload(frame: &Bytes, data: Option<flatbuffers::Vector<'_, u8>>) -> Bytes {
    match data {
        // The verifier proved the vector lies inside `frame`, which is what slice_ref requires.
        Some(v) if !v.is_empty() => frame.slice_ref(v.bytes()),
        _ => Bytes::new(),
    }
}

fn conf_from_wire(conf: Option<wire::ConfState<'_>>) -> ConfState {
    match conf {
        Some(c) => ConfState::new(
            c.voters().map(|v| v.iter().collect()).unwrap_or_default(),
            c.learners().map(|v| v.iter().collect()).unwrap_or_default(),
        ),
        None => ConfState::default(),
    }
}

fn decode_body(
    frame: &Bytes,
    index: usize,
    m: &wire::RaftMessage<'_>,
) -> Result<MessageBody, DecodeError> {
    let missing = |field| DecodeError::Missing { index, field };
    let body = match m.body_type() {
        wire::Body::NONE => return Err(DecodeError::NoBody { index }),
        wire::Body::PreVote => {
            let b = m.body_as_pre_vote().ok_or_else(|| missing("body"))?;
            MessageBody::PreVote {
                last_index: b.last_index(),
                last_term: b.last_term(),
            }
        }
        wire::Body::PreVoteResp => {
            let b = m.body_as_pre_vote_resp().ok_or_else(|| missing("body"))?;
            MessageBody::PreVoteResp { reject: b.reject() }
        }
        wire::Body::Vote => {
            let b = m.body_as_vote().ok_or_else(|| missing("body"))?;
            MessageBody::Vote {
                last_index: b.last_index(),
                last_term: b.last_term(),
                transfer: b.transfer(),
            }
        }
        wire::Body::VoteResp => {
            let b = m.body_as_vote_resp().ok_or_else(|| missing("body"))?;
            MessageBody::VoteResp { reject: b.reject() }
        }
        wire::Body::Append => {
            let b = m.body_as_append().ok_or_else(|| missing("body"))?;
            let mut entries = Vec::new();
            if let Some(list) = b.entries() {
                entries.reserve(list.len());
                for e in list.iter() {
                    let kind = match e.kind() {
                        wire::EntryKind::Normal => EntryKind::Normal,
                        wire::EntryKind::Noop => EntryKind::Noop,
                        wire::EntryKind::Conf => EntryKind::Conf,
                        other => {
                            return Err(DecodeError::UnknownEntryKind {
                                index,
                                kind: other.0,
                            })
                        }
                    };
                    entries.push(Entry {
                        index: e.index(),
                        term: e.term(),
                        kind,
                        data: payload(frame, e.data()),
                    });
                }
            }
            MessageBody::Append {
                prev_index: b.prev_index(),
                prev_term: b.prev_term(),
                commit: b.commit(),
                entries,
            }
        }
        wire::Body::AppendResp => {
            let b = m.body_as_append_resp().ok_or_else(|| missing("body"))?;
            MessageBody::AppendResp {
                index: b.index(),
                reject: b.reject().map(|r| RejectHint {
                    rejected_index: r.rejected_index(),
                    conflict_term: r.conflict_term(),
                    conflict_index: r.conflict_index(),
                }),
            }
        }
        wire::Body::Heartbeat => {
            let b = m.body_as_heartbeat().ok_or_else(|| missing("body"))?;
            MessageBody::Heartbeat {
                commit: b.commit(),
                round: b.round(),
            }
        }
        wire::Body::HeartbeatResp => {
            let b = m.body_as_heartbeat_resp().ok_or_else(|| missing("body"))?;
            MessageBody::HeartbeatResp { round: b.round() }
        }
        wire::Body::SnapshotChunk => {
            let b = m.body_as_snapshot_chunk().ok_or_else(|| missing("body"))?;
            let meta = b.meta().ok_or_else(|| missing("meta"))?;
            MessageBody::Snapshot {
                meta: SnapshotMeta {
                    index: meta.index(),
                    term: meta.term(),
                    conf: conf_from_wire(meta.conf()),
                },
                offset: b.offset(),
                total_bytes: b.total_bytes(),
                data: payload(frame, b.data()),
            }
        }
        wire::Body::SnapshotResp => {
            let b = m.body_as_snapshot_resp().ok_or_else(|| missing("body"))?;
            MessageBody::SnapshotResp {
                snapshot_index: b.snapshot_index(),
                next_offset: b.next_offset(),
            }
        }
        wire::Body::TimeoutNow => MessageBody::TimeoutNow,
        other => {
            return Err(DecodeError::UnknownBody {
                index,
                body_type: other.0,
            })
        }
    };
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_messages() -> Vec<(GroupId, Message)> {
        let conf = ConfState::new(vec![1, 2, 3], vec![4]);
        let bodies = vec![
            MessageBody::PreVote {
                last_index: 10,
                last_term: 2,
            },
            MessageBody::PreVoteResp { reject: true },
            MessageBody::Vote {
                last_index: 11,
                last_term: 3,
                transfer: true,
            },
            MessageBody::VoteResp { reject: false },
            MessageBody::Append {
                prev_index: 5,
                prev_term: 1,
                commit: 4,
                entries: vec![
                    Entry {
                        index: 6,
                        term: 2,
                        kind: EntryKind::Noop,
                        data: Bytes::new(),
                    },
                    Entry {
                        index: 7,
                        term: 2,
                        kind: EntryKind::Normal,
                        data: Bytes::from_static(b"set k v"),
                    },
                    Entry {
                        index: 8,
                        term: 2,
                        kind: EntryKind::Conf,
                        data: Bytes::from_static(&[1, 2, 3]),
                    },
                ],
            },
            MessageBody::AppendResp {
                index: 8,
                reject: None,
            },
            MessageBody::AppendResp {
                index: 3,
                reject: Some(RejectHint {
                    rejected_index: 7,
                    conflict_term: 1,
                    conflict_index: 2,
                }),
            },
            MessageBody::Heartbeat {
                commit: 8,
                round: 99,
            },
            MessageBody::HeartbeatResp { round: 99 },
            MessageBody::Snapshot {
                meta: SnapshotMeta {
                    index: 100,
                    term: 4,
                    conf,
                },
                offset: 4096,
                total_bytes: 10_000,
                data: Bytes::from(vec![7u8; 3000]),
            },
            MessageBody::SnapshotResp {
                snapshot_index: 100,
                next_offset: 7096,
            },
            MessageBody::TimeoutNow,
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                (
                    i as u64 % 3,
                    Message {
                        from: 1 + i as u64 % 3,
                        to: 3 - i as u64 % 3,
                        term: 5 + i as u64,
                        body,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn every_message_kind_round_trips_in_one_batch() {
        let messages = sample_messages();
        let refs: Vec<(GroupId, &Message)> = messages.iter().map(|(g, m)| (*g, m)).collect();
        let mut fbb = FlatBufferBuilder::new();
        let frame = Bytes::copy_from_slice(encode_batch(&mut fbb, &refs));
        let decoded = decode_batch(&frame, &verifier_options(1 << 20)).unwrap();
        assert_eq!(decoded, messages);
    }

    #[test]
    fn payloads_are_slices_of_the_frame() {
        let messages = sample_messages();
        let refs: Vec<(GroupId, &Message)> = messages.iter().map(|(g, m)| (*g, m)).collect();
        let mut fbb = FlatBufferBuilder::new();
        let frame = Bytes::copy_from_slice(encode_batch(&mut fbb, &refs));
        let decoded = decode_batch(&frame, &verifier_options(1 << 20)).unwrap();
        let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
        let mut checked = 0;
        for (_, m) in &decoded {
            if let MessageBody::Append { entries, .. } = &m.body {
                for e in entries.iter().filter(|e| !e.data.is_empty()) {
                    assert!(range.contains(&(e.data.as_ptr() as usize)));
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2);
    }

    #[test]
    fn truncated_frames_are_rejected() {
        let messages = sample_messages();
        let refs: Vec<(GroupId, &Message)> = messages.iter().map(|(g, m)| (*g, m)).collect();
        let mut fbb = FlatBufferBuilder::new();
        let full = encode_batch(&mut fbb, &refs).to_vec();
        let opts = verifier_options(1 << 20);
        for cut in 0..full.len() {
            let frame = Bytes::copy_from_slice(&full[..cut]);
            assert!(
                decode_batch(&frame, &opts).is_err(),
                "cut at {cut} accepted"
            );
        }
    }

    #[test]
    fn the_table_limit_rejects_a_frame_of_many_tiny_tables() {
        let entries: Vec<Entry> = (1..=1000)
            .map(|i| Entry {
                index: i,
                term: 1,
                kind: EntryKind::Normal,
                data: Bytes::new(),
            })
            .collect();
        let m = Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                commit: 0,
                entries,
            },
        };
        let mut fbb = FlatBufferBuilder::new();
        let frame = Bytes::copy_from_slice(encode_batch(&mut fbb, &[(1, &m)]));
        assert!(decode_batch(&frame, &verifier_options(1 << 20)).is_ok());
        let tight = VerifierOptions {
            max_tables: 100,
            ..verifier_options(1 << 20)
        };
        assert!(matches!(
            decode_batch(&frame, &tight),
            Err(DecodeError::Invalid(_))
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let frame = Bytes::from(bytes);
            let _ = decode_batch(&frame, &verifier_options(1 << 20));
        }

        #[test]
        fn bit_flips_never_panic(bit in 0usize..8192) {
            let messages = sample_messages();
            let refs: Vec<(GroupId, &Message)> = messages.iter().map(|(g, m)| (*g, m)).collect();
            let mut fbb = FlatBufferBuilder::new();
            let mut bytes = encode_batch(&mut fbb, &refs).to_vec();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let _ = decode_batch(&Bytes::from(bytes), &verifier_options(1 << 20));
        }
    }
}
