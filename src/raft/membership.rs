//! Membership changes: one server at a time.
//!
//! Why not joint consensus: a group here has 3 (at most 7) replicas and the controller moves one
//! replica at a time (add a learner, let it catch up, promote it, remove the old one). With one
//! voter added or removed per change, every majority of the old voter set intersects every
//! majority of the new one, so no two leaders can be elected from the two configurations, and
//! the machinery stays small: one pending change, no C_old,new state to persist and recover.
//!
//! Rules (the known fix from Ongaro's raft-dev note of 2015 included):
//! - A configuration entry carries the whole resulting [`ConfState`] and takes effect on every
//!   replica when it is applied (committed and durable), as in etcd.
//! - At most one configuration entry is uncommitted (unapplied) at a time.
//! - A new leader proposes no change before its own no-op of the current term is applied: this
//!   is the fix for the single-server bug, where a leader of an older term could otherwise commit
//!   a change that conflicts with a change an intervening leader had already replicated.
//! - A learner is promoted only when it has caught up to within `promote_lag_entries_max`, so a
//!   new voter never stalls commitment while it replays the log.

use super::types::{ConfState, NodeId};

/// A single-server change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfChange {
    AddLearner(NodeId),
    PromoteLearner(NodeId),
    Remove(NodeId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfChangeError {
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    #[error("node {0} is not a learner")]
    NotLearner(NodeId),
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("removing node {0} would leave no voter")]
    NoVoterLeft(NodeId),
    #[error("node id 0 is reserved")]
    ZeroId,
}

/// The configuration that results from applying `change` to `conf`.
pub fn apply_change(conf: &ConfState, change: ConfChange) -> Result<ConfState, ConfChangeError> {
    let mut voters = conf.voters.clone();
    let mut learners = conf.learners.clone();
    match change {
        ConfChange::AddLearner(id) => {
            if id == 0 {
                return Err(ConfChangeError::ZeroId);
            }
            if conf.contains(id) {
                return Err(ConfChangeError::AlreadyMember(id));
            }
            learners.push(id);
        }
        ConfChange::PromoteLearner(id) => {
            if !conf.is_learner(id) {
                return Err(ConfChangeError::NotLearner(id));
            }
            learners.retain(|&l| l != id);
            voters.push(id);
        }
        ConfChange::Remove(id) => {
            if !conf.contains(id) {
                return Err(ConfChangeError::NotMember(id));
            }
            voters.retain(|&v| v != id);
            learners.retain(|&l| l != id);
            if voters.is_empty() {
                return Err(ConfChangeError::NoVoterLeft(id));
            }
        }
    }
    Ok(ConfState::new(voters, learners))
}

/// Wire form of a configuration entry: u32 voter count, u32 learner count, then u64 ids, all
/// little endian. Small and fixed so that the WAL and the snapshot code can share it.
pub fn encode_conf(conf: &ConfState) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 8 * (conf.voters.len() + conf.learners.len()));
    out.extend_from_slice(&(conf.voters.len() as u32).to_le_bytes());
    out.extend_from_slice(&(conf.learners.len() as u32).to_le_bytes());
    for id in conf.members() {
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// Most members a configuration may list: far above any group size, a bound for decoding.
pub const MEMBERS_MAX: usize = 64;

pub fn decode_conf(bytes: &[u8]) -> Option<ConfState> {
    let voters_len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let learners_len = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
    if voters_len + learners_len > MEMBERS_MAX || bytes.len() != 8 + 8 * (voters_len + learners_len)
    {
        return None;
    }
    let id_at =
        |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0; 8]));
    let voters: Vec<NodeId> = (0..voters_len).map(id_at).collect();
    let learners: Vec<NodeId> = (voters_len..voters_len + learners_len).map(id_at).collect();
    if voters.is_empty() || voters.contains(&0) || learners.contains(&0) {
        return None;
    }
    let conf = ConfState::new(voters, learners);
    if conf.voters.len() != voters_len || conf.learners.len() != learners_len {
        return None; // duplicates
    }
    Some(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let conf = ConfState::new(vec![3, 1, 2], vec![7]);
        assert_eq!(decode_conf(&encode_conf(&conf)), Some(conf));
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(decode_conf(&[]), None);
        assert_eq!(decode_conf(&[1, 0, 0, 0, 0, 0, 0, 0]), None);
        let mut bytes = encode_conf(&ConfState::new(vec![1, 2], vec![]));
        bytes.push(0);
        assert_eq!(decode_conf(&bytes), None);
        let dup = encode_conf(&ConfState {
            voters: vec![1, 1],
            learners: vec![],
        });
        assert_eq!(decode_conf(&dup), None);
        let huge = [255u8; 8];
        assert_eq!(decode_conf(&huge), None);
    }

    #[test]
    fn one_server_at_a_time() {
        let conf = ConfState::new(vec![1, 2, 3], vec![]);
        let c = apply_change(&conf, ConfChange::AddLearner(4)).unwrap();
        assert_eq!(c.learners, vec![4]);
        let c = apply_change(&c, ConfChange::PromoteLearner(4)).unwrap();
        assert_eq!(c.voters, vec![1, 2, 3, 4]);
        let c = apply_change(&c, ConfChange::Remove(1)).unwrap();
        assert_eq!(c.voters, vec![2, 3, 4]);
        assert_eq!(
            apply_change(&c, ConfChange::AddLearner(2)),
            Err(ConfChangeError::AlreadyMember(2))
        );
        assert_eq!(
            apply_change(&c, ConfChange::PromoteLearner(9)),
            Err(ConfChangeError::NotLearner(9))
        );
        let single = ConfState::new(vec![1], vec![]);
        assert_eq!(
            apply_change(&single, ConfChange::Remove(1)),
            Err(ConfChangeError::NoVoterLeft(1))
        );
    }
}
