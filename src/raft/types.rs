//! Plain values that cross the core's boundary: entries, hard state, snapshots, messages.
//!
//! Everything here is a plain Rust type so that the runtime can encode it as flatbuffers later.
//! Entry payloads are `Bytes`: a clone is a reference count bump, and the runtime can hand in
//! slices of its receive buffers without copying.

use bytes::Bytes;

/// A replica's id inside one group. `0` means "none" and is never a valid id.
pub type NodeId = u64;
/// A Raft term.
pub type Term = u64;
/// A log index. The first real entry has index 1; index 0 is the empty prefix with term 0.
pub type Index = u64;

/// "No node": no vote cast, no leader known.
pub const NODE_NONE: NodeId = 0;

/// What an entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    /// An application command (a batch element of a proposal).
    Normal,
    /// The empty entry a new leader appends so that it can commit earlier terms (section 5.4.2).
    Noop,
    /// A configuration change; `data` is the encoded [`ConfState`] that takes effect when the
    /// entry is applied (see `membership.rs`).
    Conf,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: Index,
    pub term: Term,
    pub kind: EntryKind,
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry costs on the wire and in batching limits: payload plus a fixed header
    /// (index, term, kind, length), the same accounting the WAL record uses.
    pub fn size_bytes(&self) -> u64 {
        ENTRY_HEADER_BYTES + self.data.len() as u64
    }
}

/// Per-entry overhead used for byte limits (index 8 + term 8 + kind 1 + length 4, rounded).
pub const ENTRY_HEADER_BYTES: u64 = 24;

/// What must be durable before votes and acks may leave the node: term, vote and commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    pub vote: NodeId,
    pub commit: Index,
}

/// The members of a group. Voters count for elections and commitment; learners only receive
/// the log. Both lists are sorted and disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfState {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

impl ConfState {
    pub fn new(mut voters: Vec<NodeId>, mut learners: Vec<NodeId>) -> ConfState {
        voters.sort_unstable();
        voters.dedup();
        learners.sort_unstable();
        learners.dedup();
        learners.retain(|l| voters.binary_search(l).is_err());
        ConfState { voters, learners }
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.binary_search(&id).is_ok()
    }

    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.binary_search(&id).is_ok()
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// A majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Every member, voters first, in id order inside each list.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }
}

/// Identifies a snapshot: the last index and term it covers and the membership at that index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
    pub conf: ConfState,
}

/// A state machine image at `meta.index`, as produced by the service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Bytes,
}

/// A linearizable read that may now be served: once the state machine has applied `index`,
/// answering the read registered with `ctx` from local state is linearizable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub ctx: u64,
    pub index: Index,
}

/// Why a follower rejected an AppendEntries, so that the leader can skip whole terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectHint {
    /// `prev_index` of the rejected message (lets the leader drop stale rejects).
    pub rejected_index: Index,
    /// The follower's term at `rejected_index`, or 0 when its log is shorter than that.
    pub conflict_term: Term,
    /// The follower's first index of `conflict_term`, or its last index + 1 when shorter.
    pub conflict_index: Index,
}

/// A peer message. `term` is the sender's current term, except for a granted PreVote response
/// which carries the term of the election it grants (as in etcd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub body: MessageBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    PreVote {
        last_index: Index,
        last_term: Term,
    },
    PreVoteResp {
        reject: bool,
    },
    Vote {
        last_index: Index,
        last_term: Term,
        /// Set when the election follows a TimeoutNow: voters ignore their leader lease.
        transfer: bool,
    },
    VoteResp {
        reject: bool,
    },
    Append {
        prev_index: Index,
        prev_term: Term,
        commit: Index,
        entries: Vec<Entry>,
    },
    /// `index` is the highest index the follower holds durably and knows matches the leader.
    AppendResp {
        index: Index,
        reject: Option<RejectHint>,
    },
    Heartbeat {
        commit: Index,
        round: u64,
    },
    HeartbeatResp {
        round: u64,
    },
    /// One chunk of a snapshot; chunks are sent in order, one at a time.
    Snapshot {
        meta: SnapshotMeta,
        offset: u64,
        total_bytes: u64,
        data: Bytes,
    },
    /// `next_offset` is the byte the follower expects next (it has everything before it).
    SnapshotResp {
        snapshot_index: Index,
        next_offset: u64,
    },
    TimeoutNow,
}

impl MessageBody {
    /// A short name for counters and logs.
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::PreVote { .. } => "PreVote",
            MessageBody::PreVoteResp { .. } => "PreVoteResp",
            MessageBody::Vote { .. } => "Vote",
            MessageBody::VoteResp { .. } => "VoteResp",
            MessageBody::Append { .. } => "Append",
            MessageBody::AppendResp { .. } => "AppendResp",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResp { .. } => "HeartbeatResp",
            MessageBody::Snapshot { .. } => "Snapshot",
            MessageBody::SnapshotResp { .. } => "SnapshotResp",
            MessageBody::TimeoutNow => "TimeoutNow",
        }
    }

    /// Leader-to-follower replication traffic (AppendEntries, heartbeats, snapshot chunks):
    /// what the "RPC count" bounds count.
    pub fn is_append_class(&self) -> bool {
        matches!(
            self,
            MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. }
        )
    }
}

impl Message {
    /// Approximate bytes on the wire: a fixed header plus entries or snapshot data.
    pub fn size_bytes(&self) -> u64 {
        const HEADER_BYTES: u64 = 48;
        HEADER_BYTES
            + match &self.body {
                MessageBody::Append { entries, .. } => {
                    entries.iter().map(Entry::size_bytes).sum::<u64>()
                }
                MessageBody::Snapshot { meta, data, .. } => {
                    data.len() as u64
                        + 8 * (meta.conf.voters.len() + meta.conf.learners.len()) as u64
                }
                _ => 0,
            }
    }
}
