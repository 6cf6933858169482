//! Safety checks run as the simulation goes. Each returns a `Violation` naming what broke.
//!
//! - Election safety: at most one leader per term.
//! - Log matching: two logs holding an entry with the same index and term hold the same
//!   prefix up to it (checked with a chain hash per node, updated from every `Ready`).
//! - Leader completeness: a node that becomes leader holds every entry applied anywhere
//!   (which covers every proposal acknowledged as committed).
//! - State machine safety: no two nodes apply different entries at one index.
//! - Commit never goes back within an incarnation; a restarted node resumes at or above the
//!   snapshot it last made durable.
//! - Reads: a read's index covers every write acknowledged before the read was issued.

use std::collections::{BTreeMap, HashMap};

use crate::raft::{Entry, Index, NodeId, Term};

use super::app::{entry_hash, mix};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! violation {
    ($($arg:tt)*) => { return Err(Violation(format!($($arg)*))) };
}

/// One position of a log as the checker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    term: Term,
    entry: u64,
    chain: u64,
}

#[derive(Default)]
struct NodeView {
    /// The node's log (index i at i - 1) as told by its `Ready`s, never compacted here.
    mirror: Vec<Pos>,
    applied: Index,
    commit: Index,
    snapshot_durable: Index,
    leader_checked_term: Term,
}

#[derive(Default)]
pub struct Checker {
    leaders: BTreeMap<Term, NodeId>,
    /// Entries applied anywhere: the committed log.
    committed: Vec<Pos>,
    first_seen: HashMap<(Index, Term), u64>,
    nodes: BTreeMap<NodeId, NodeView>,
    /// Highest index acknowledged to a client as committed.
    pub acked_max: Index,
}

impl Checker {
    fn view(&mut self, id: NodeId) -> &mut NodeView {
        self.nodes.entry(id).or_default()
    }

    pub fn committed_len(&self) -> Index {
        self.committed.len() as Index
    }

    pub fn on_leader(&mut self, id: NodeId, term: Term) -> Result<(), Violation> {
        match self.leaders.insert(term, id) {
            Some(other) if other != id => {
                violation!("two leaders in term {term}: {other} and {id}")
            }
            _ => {}
        }
        // Leader completeness, checked once per term when the node is first seen leading.
        let committed_len = self.committed.len();
        let last_committed = self.committed.last().copied();
        let view = self.view(id);
        if view.leader_checked_term == term {
            return Ok(());
        }
        view.leader_checked_term = term;
        if let Some(last) = last_committed {
            match view.mirror.get(committed_len - 1) {
                Some(p) if p.chain == last.chain => {}
                Some(_) => violation!(
                    "leader {id} of term {term} lacks committed entries up to {committed_len}"
                ),
                None => violation!(
                    "leader {id} of term {term} has {} entries, {committed_len} are committed",
                    view.mirror.len()
                ),
            }
        }
        Ok(())
    }

    /// Entries a node hands to storage: they replace its log from the first one on.
    pub fn on_entries(&mut self, id: NodeId, entries: &[Entry]) -> Result<(), Violation> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut fresh = Vec::with_capacity(entries.len());
        {
            let view = self.nodes.entry(id).or_default();
            let keep = (first.index - 1) as usize;
            if keep > view.mirror.len() {
                violation!(
                    "node {id} writes index {} after a log of {}",
                    first.index,
                    view.mirror.len()
                );
            }
            view.mirror.truncate(keep);
            for e in entries {
                let prev = view.mirror.last().map_or(0, |p| p.chain);
                let entry = entry_hash(e);
                let pos = Pos {
                    term: e.term,
                    entry,
                    chain: mix(prev, entry),
                };
                view.mirror.push(pos);
                fresh.push((e.index, pos));
            }
        }
        for (index, pos) in fresh {
            match self.first_seen.get(&(index, pos.term)) {
                Some(&chain) if chain != pos.chain => {
                    violation!(
                        "log matching: node {id} differs at or before index {index} (term {})",
                        pos.term
                    )
                }
                Some(_) => {}
                None => {
                    self.first_seen.insert((index, pos.term), pos.chain);
                }
            }
        }
        Ok(())
    }

    /// A node's log was replaced by a snapshot at `index` (installed or recovered).
    pub fn on_snapshot_log(&mut self, id: NodeId, index: Index) -> Result<(), Violation> {
        if index as usize > self.committed.len() {
            violation!(
                "node {id} holds a snapshot at {index} beyond the committed log {}",
                self.committed.len()
            );
        }
        let prefix = self.committed[..index as usize].to_vec();
        let view = self.view(id);
        view.mirror = prefix;
        view.applied = index;
        Ok(())
    }

    pub fn on_apply(&mut self, id: NodeId, e: &Entry) -> Result<(), Violation> {
        let view = self.nodes.entry(id).or_default();
        if e.index != view.applied + 1 {
            violation!("node {id} applies index {} after {}", e.index, view.applied);
        }
        view.applied = e.index;
        let entry = entry_hash(e);
        let i = (e.index - 1) as usize;
        if i < self.committed.len() {
            if self.committed[i].entry != entry {
                violation!(
                    "state machine safety: node {id} applies a different entry at {} (term {} vs {})",
                    e.index,
                    e.term,
                    self.committed[i].term
                );
            }
        } else {
            debug_assert_eq!(i, self.committed.len());
            let prev = self.committed.last().map_or(0, |p| p.chain);
            self.committed.push(Pos {
                term: e.term,
                entry,
                chain: mix(prev, entry),
            });
        }
        Ok(())
    }

    pub fn on_commit(&mut self, id: NodeId, commit: Index) -> Result<(), Violation> {
        let view = self.view(id);
        if commit < view.commit {
            violation!(
                "node {id} commit index went back from {} to {commit}",
                view.commit
            );
        }
        view.commit = commit;
        Ok(())
    }

    pub fn on_snapshot_durable(&mut self, id: NodeId, index: Index) {
        let view = self.view(id);
        view.snapshot_durable = view.snapshot_durable.max(index);
    }

    /// A node restarts with `applied` = its durable snapshot index and a log from disk.
    pub fn on_restart(
        &mut self,
        id: NodeId,
        applied: Index,
        commit: Index,
        entries: &[Entry],
    ) -> Result<(), Violation> {
        let durable = self.view(id).snapshot_durable;
        if applied < durable {
            violation!(
                "node {id} restarts at applied {applied} below its durable snapshot {durable}"
            );
        }
        self.on_snapshot_log(id, applied)?;
        self.view(id).commit = commit;
        self.on_entries(id, entries)
    }

    pub fn on_acked(&mut self, index: Index) {
        self.acked_max = self.acked_max.max(index);
    }

    pub fn on_read(
        &self,
        id: NodeId,
        read_index: Index,
        acked_at_start: Index,
    ) -> Result<(), Violation> {
        if read_index < acked_at_start {
            violation!(
                "node {id} read at index {read_index} misses a write acked at {acked_at_start}"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryKind;
    use bytes::Bytes;

    fn ent(index: Index, term: Term, byte: u8) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::from(vec![byte]),
        }
    }

    #[test]
    fn two_leaders_in_one_term_is_caught() {
        let mut c = Checker::default();
        c.on_leader(1, 3).unwrap();
        c.on_leader(1, 3).unwrap();
        assert!(c.on_leader(2, 3).is_err());
        c.on_leader(2, 4).unwrap();
    }

    #[test]
    fn log_matching_violation_is_caught() {
        let mut c = Checker::default();
        c.on_entries(1, &[ent(1, 1, 0), ent(2, 2, 0)]).unwrap();
        // Same (index, term) at 2 but a different entry before it.
        assert!(c.on_entries(2, &[ent(1, 1, 9), ent(2, 2, 0)]).is_err());
    }

    #[test]
    fn state_machine_safety_violation_is_caught() {
        let mut c = Checker::default();
        c.on_apply(1, &ent(1, 1, 0)).unwrap();
        assert!(c.on_apply(2, &ent(1, 1, 7)).is_err());
        assert!(c.on_apply(1, &ent(3, 1, 0)).is_err(), "a gap in applying");
    }

    #[test]
    fn leader_missing_a_committed_entry_is_caught() {
        let mut c = Checker::default();
        c.on_entries(1, &[ent(1, 1, 0), ent(2, 1, 0)]).unwrap();
        c.on_apply(1, &ent(1, 1, 0)).unwrap();
        c.on_apply(1, &ent(2, 1, 0)).unwrap();
        c.on_entries(2, &[ent(1, 1, 0)]).unwrap();
        assert!(c.on_leader(2, 2).is_err());
        c.on_entries(3, &[ent(1, 1, 0), ent(2, 1, 0), ent(3, 2, 0)])
            .unwrap();
        c.on_leader(3, 3).unwrap();
    }

    #[test]
    fn commit_going_back_and_stale_reads_are_caught() {
        let mut c = Checker::default();
        c.on_commit(1, 5).unwrap();
        assert!(c.on_commit(1, 4).is_err());
        assert!(c.on_read(1, 3, 4).is_err());
        c.on_read(1, 4, 4).unwrap();
    }

    #[test]
    fn restart_below_durable_snapshot_is_caught() {
        let mut c = Checker::default();
        for i in 1..=5 {
            c.on_apply(1, &ent(i, 1, 0)).unwrap();
        }
        c.on_snapshot_durable(1, 4);
        assert!(c.on_restart(1, 3, 3, &[]).is_err());
        c.on_restart(1, 4, 4, &[ent(5, 1, 0)]).unwrap();
    }
}
