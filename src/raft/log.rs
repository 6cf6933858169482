//! The replica's log in memory: a compacted prefix (the snapshot point) and the entries after it.
//!
//! The whole log since the last compaction lives in memory (a `VecDeque`, so a term lookup is
//! O(1) index arithmetic). The service bounds its size by taking snapshots; the runtime's WAL
//! holds the durable copy and hands it back on restart. Memory sketch: a 256 B write costs
//! ~280 B here, so 100k entries between snapshots is ~28 MB per group.
//!
//! Durability bookkeeping (asynchronous storage writes):
//! - `unstable_from`: the first index not yet handed to storage in a `Ready`.
//! - `persisted`: the highest index known durable *and* equal to what memory holds.
//! - `epoch`: bumped whenever memory truncates its suffix (a conflict with a new leader) or
//!   restores a snapshot. A write handed out in epoch e reports (e, last index) when durable.
//!
//! Why the epoch (the ABA race of asynchronous appends, cf. etcd's `newStorageAppendRespMsg`):
//! 1. A follower appends entries 8..10 of term 2 and hands them to the disk (write W1).
//! 2. Before W1 completes, a leader of term 3 overwrites 8.. in memory with entries of term 3,
//!    then a leader of term 4 whose log came from term 2 overwrites them again with term-2
//!    entries at 8..10 that differ from W1's (write W3, after W2 from step 2).
//! 3. W1 completes. Comparing only (index, term) of memory with W1's last entry would say
//!    "8..10 durable", yet W2 may still land after W1 and W3 is not durable: a crash now leaves
//!    term-3 entries on disk while the node has acked term-2 ones.
//!
//! Writes are completed in order, and within one epoch memory only grows by appending. So a
//! completion (e, i) with e equal to the current epoch proves the disk holds exactly memory's
//! prefix up to i; a completion from an older epoch proves nothing and is ignored: a truncation
//! always comes with a new write in the new epoch, whose completion will cover it.
//!
//! Do not "simplify" the epoch into a term comparison.

use std::collections::VecDeque;

use super::types::{Entry, Index, Snapshot, Term};

#[derive(Debug)]
pub struct RaftLog {
    snapshot_index: Index,
    snapshot_term: Term,
    entries: VecDeque<Entry>,
    pub committed: Index,
    /// Handed to the application for applying (the contract: applied before the next `ready`).
    pub applied: Index,
    persisted: Index,
    epoch: u64,
    unstable_from: Index,
    /// A snapshot received from the leader, to hand out in the next `Ready`.
    pending_snapshot: Option<Snapshot>,
}

/// What a `Ready`'s storage write covers; report it back with `advance` once durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistMark {
    pub epoch: u64,
    pub index: Index,
}

impl RaftLog {
    /// A log recovered from storage: everything handed in is durable.
    pub fn restore_from_storage(
        snapshot_index: Index,
        snapshot_term: Term,
        entries: Vec<Entry>,
        committed: Index,
    ) -> RaftLog {
        let entries: VecDeque<Entry> = entries.into();
        let last = snapshot_index + entries.len() as u64;
        let log = RaftLog {
            snapshot_index,
            snapshot_term,
            entries,
            committed: committed.max(snapshot_index),
            applied: snapshot_index,
            persisted: last,
            epoch: 0,
            unstable_from: last + 1,
            pending_snapshot: None,
        };
        log.check_invariants();
        log
    }

    pub fn first_index(&self) -> Index {
        self.snapshot_index + 1
    }

    pub fn last_index(&self) -> Index {
        self.snapshot_index + self.entries.len() as u64
    }

    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.snapshot_term, |e| e.term)
    }

    pub fn snapshot_index(&self) -> Index {
        self.snapshot_index
    }

    pub fn persisted(&self) -> Index {
        self.persisted
    }

    #[cfg(test)]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The term at `index`, or None when it is compacted away or beyond the end.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        if index < self.snapshot_index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.snapshot_index - 1) as usize].term)
    }

    pub fn match_term(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    pub fn entry(&self, index: Index) -> Option<&Entry> {
        if index <= self.snapshot_index || index > self.last_index() {
            return None;
        }
        Some(&self.entries[(index - self.snapshot_index - 1) as usize])
    }

    /// Section 5.4.1: is a log ending at (index, term) at least as up to date as ours?
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Entries from `lo` (which must be available) up to `hi` inclusive, stopping at
    /// `max_entries` or once `max_bytes` is exceeded (at least one entry is returned).
    pub fn slice(
        &self,
        lo: Index,
        hi: Index,
        max_entries: usize,
        max_bytes: u64,
        out: &mut Vec<Entry>,
    ) {
        debug_assert!(lo > self.snapshot_index && hi <= self.last_index());
        let mut bytes = 0u64;
        let mut i = lo;
        while i <= hi && out.len() < max_entries {
            let e = &self.entries[(i - self.snapshot_index - 1) as usize];
            bytes += e.size_bytes();
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(e.clone());
            i += 1;
        }
    }

    /// Number of entries among the first `len` for which `pred` holds, given that `pred` holds
    /// for a prefix of the log (terms never decrease along the log): a binary search.
    fn partition_point(&self, len: usize, pred: impl Fn(&Entry) -> bool) -> usize {
        let (a, b) = self.entries.as_slices();
        if len <= a.len() {
            return a[..len].partition_point(pred);
        }
        let in_a = a.partition_point(&pred);
        if in_a < a.len() {
            in_a
        } else {
            a.len() + b[..len - a.len()].partition_point(pred)
        }
    }

    /// The first index of `term` at or below `upto`.
    pub fn first_index_of_term(&self, term: Term, upto: Index) -> Index {
        let upto = upto.min(self.last_index());
        if upto <= self.snapshot_index {
            return upto;
        }
        let len = (upto - self.snapshot_index) as usize;
        self.snapshot_index + 1 + self.partition_point(len, |e| e.term < term) as u64
    }

    /// The last index whose term is at most `term`, at or below `upto`; the snapshot index when
    /// no entry qualifies (it is the lowest point we can still describe).
    pub fn last_index_of_term_le(&self, term: Term, upto: Index) -> Index {
        let upto = upto.min(self.last_index());
        if upto <= self.snapshot_index {
            return upto;
        }
        let len = (upto - self.snapshot_index) as usize;
        self.snapshot_index + self.partition_point(len, |e| e.term <= term) as u64
    }

    /// Leader path: appends entries that follow the last one. Returns the new last index.
    pub fn append(&mut self, entries: impl IntoIterator<Item = Entry>) -> Index {
        for e in entries {
            debug_assert_eq!(e.index, self.last_index() + 1, "leader append out of order");
            debug_assert!(
                e.term >= self.last_term(),
                "leader append with a lower term"
            );
            self.entries.push_back(e);
        }
        self.last_index()
    }

    /// Follower path: `entries` follow `prev_index`, which the caller matched. Appends what is
    /// new, truncating at the first conflict. Returns the index of the last entry of the message.
    pub fn append_after_match(&mut self, prev_index: Index, entries: &[Entry]) -> Index {
        let last_new = prev_index + entries.len() as u64;
        let mut skip = 0usize;
        for e in entries {
            match self.term(e.index) {
                Some(t) if t == e.term => skip += 1,
                Some(_) => {
                    // Conflict: everything from here on is replaced. Committed entries never
                    // conflict (leader completeness), so this is a bug if it trips.
                    assert!(
                        e.index > self.committed,
                        "conflict at committed index {} (committed {})",
                        e.index,
                        self.committed
                    );
                    self.truncate_from(e.index);
                    break;
                }
                None => break,
            }
        }
        for e in &entries[skip..] {
            debug_assert_eq!(e.index, self.last_index() + 1);
            self.entries.push_back(e.clone());
        }
        last_new
    }

    fn truncate_from(&mut self, index: Index) {
        debug_assert!(index > self.snapshot_index);
        self.entries
            .truncate((index - self.snapshot_index - 1) as usize);
        self.epoch += 1;
        self.persisted = self.persisted.min(index - 1);
        self.unstable_from = self.unstable_from.min(index);
    }

    pub fn commit_to(&mut self, index: Index) -> bool {
        if index > self.committed {
            assert!(
                index <= self.last_index(),
                "commit {} beyond last index {}",
                index,
                self.last_index()
            );
            self.committed = index;
            return true;
        }
        false
    }

    /// Replaces the whole log with a snapshot received from the leader.
    pub fn restore_snapshot(&mut self, snapshot: Snapshot) {
        let meta = &snapshot.meta;
        assert!(
            meta.index > self.committed,
            "restoring a snapshot at or below commit"
        );
        self.entries.clear();
        self.snapshot_index = meta.index;
        self.snapshot_term = meta.term;
        self.committed = meta.index;
        self.applied = meta.index;
        self.epoch += 1;
        // Nothing of the new log is durable until the write carrying the snapshot completes
        // (then `stable_to` moves `persisted` to the snapshot index). The old `persisted`
        // described the replaced log: keeping it would let the follower ack entries it no
        // longer has.
        self.persisted = 0;
        self.unstable_from = meta.index + 1;
        self.pending_snapshot = Some(snapshot);
    }

    /// Drops entries up to `index` (already applied and durable) after a service snapshot.
    pub fn compact(&mut self, index: Index) {
        assert!(
            index <= self.applied && index <= self.persisted,
            "compacting beyond applied/persisted"
        );
        if index <= self.snapshot_index {
            return;
        }
        let Some(term) = self.term(index) else {
            unreachable!("index {index} between snapshot and applied must be in the log")
        };
        let drop = (index - self.snapshot_index) as usize;
        self.entries.drain(..drop);
        self.snapshot_index = index;
        self.snapshot_term = term;
    }

    pub fn has_unstable(&self) -> bool {
        self.pending_snapshot.is_some() || self.unstable_from <= self.last_index()
    }

    /// Hands out the snapshot and entries not yet given to storage, with the mark to report.
    pub fn take_unstable(&mut self, out: &mut Vec<Entry>) -> (Option<Snapshot>, PersistMark) {
        let snapshot = self.pending_snapshot.take();
        let from = self.unstable_from.max(self.first_index());
        let last = self.last_index();
        if from <= last {
            out.extend(
                self.entries
                    .range((from - self.snapshot_index - 1) as usize..)
                    .cloned(),
            );
        }
        self.unstable_from = last + 1;
        (
            snapshot,
            PersistMark {
                epoch: self.epoch,
                index: last,
            },
        )
    }

    /// A storage write completed. Returns true when `persisted` moved.
    pub fn stable_to(&mut self, mark: PersistMark) -> bool {
        if mark.epoch != self.epoch || mark.index <= self.persisted {
            return false;
        }
        debug_assert!(
            mark.index <= self.last_index(),
            "same epoch never shrinks the log"
        );
        self.persisted = mark.index.min(self.last_index());
        true
    }

    /// Committed, durable entries not yet handed to the application, up to `max_bytes`.
    pub fn next_to_apply(&mut self, max_bytes: u64, out: &mut Vec<Entry>) {
        let hi = self.committed.min(self.persisted);
        if self.applied >= hi {
            return;
        }
        self.slice(self.applied + 1, hi, usize::MAX, max_bytes, out);
        if let Some(last) = out.last() {
            self.applied = last.index;
        }
    }

    pub fn check_invariants(&self) {
        debug_assert!(
            self.applied <= self.committed,
            "applied {} > committed {}",
            self.applied,
            self.committed
        );
        debug_assert!(self.committed <= self.last_index(), "committed beyond last");
        debug_assert!(
            self.snapshot_index <= self.applied,
            "compacted beyond applied"
        );
        debug_assert!(self.persisted <= self.last_index(), "persisted beyond last");
        debug_assert!(self.unstable_from <= self.last_index() + 1);
        debug_assert!(
            self.entries
                .front()
                .map_or(true, |e| e.index == self.snapshot_index + 1
                    && e.term >= self.snapshot_term),
            "first entry does not follow the snapshot"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::EntryKind;
    use bytes::Bytes;

    fn ent(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::new(),
        }
    }

    fn log_with(terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, &t)| ent(i as u64 + 1, t))
            .collect();
        RaftLog::restore_from_storage(0, 0, entries, 0)
    }

    #[test]
    fn term_lookup_and_bounds() {
        let log = log_with(&[1, 1, 2, 3]);
        assert_eq!(log.term(0), Some(0));
        assert_eq!(log.term(3), Some(2));
        assert_eq!(log.term(5), None);
        assert_eq!(log.last_index(), 4);
        assert_eq!(log.last_term(), 3);
    }

    #[test]
    fn term_search_skips_whole_terms() {
        let log = log_with(&[1, 1, 2, 2, 2, 5, 5]);
        assert_eq!(log.first_index_of_term(2, 7), 3);
        assert_eq!(log.first_index_of_term(5, 7), 6);
        assert_eq!(log.last_index_of_term_le(2, 7), 5);
        assert_eq!(log.last_index_of_term_le(4, 7), 5);
        assert_eq!(log.last_index_of_term_le(0, 7), 0);
        assert_eq!(log.last_index_of_term_le(9, 4), 4);
    }

    #[test]
    fn conflict_truncates_and_bumps_epoch() {
        let mut log = log_with(&[1, 1, 1, 1]);
        let epoch = log.epoch();
        assert_eq!(log.persisted(), 4);
        let last = log.append_after_match(2, &[ent(3, 2), ent(4, 2), ent(5, 2)]);
        assert_eq!(last, 5);
        assert_eq!(log.term(3), Some(2));
        assert_eq!(log.epoch(), epoch + 1);
        assert_eq!(log.persisted(), 2);
        // A duplicate, shorter message changes nothing.
        let before = log.epoch();
        log.append_after_match(2, &[ent(3, 2)]);
        assert_eq!(log.last_index(), 5);
        assert_eq!(log.epoch(), before);
    }

    #[test]
    fn stale_epoch_completion_is_ignored() {
        let mut log = log_with(&[]);
        log.append([ent(1, 1), ent(2, 1)]);
        let mut out = Vec::new();
        let (_, w1) = log.take_unstable(&mut out);
        assert_eq!(out.len(), 2);
        log.append_after_match(0, &[ent(1, 2)]);
        out.clear();
        let (_, w2) = log.take_unstable(&mut out);
        assert_eq!(out.len(), 1);
        assert!(!log.stable_to(w1), "old epoch must not count");
        assert_eq!(log.persisted(), 0);
        assert!(log.stable_to(w2));
        assert_eq!(log.persisted(), 1);
    }

    #[test]
    fn apply_waits_for_durability() {
        let mut log = log_with(&[]);
        log.append([ent(1, 1), ent(2, 1)]);
        log.commit_to(2);
        let mut out = Vec::new();
        log.next_to_apply(u64::MAX, &mut out);
        assert!(out.is_empty());
        let mut w = Vec::new();
        let (_, mark) = log.take_unstable(&mut w);
        log.stable_to(mark);
        log.next_to_apply(u64::MAX, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(log.applied, 2);
    }

    #[test]
    fn compact_keeps_term_of_snapshot_point() {
        let mut log = log_with(&[1, 2, 3]);
        log.commit_to(3);
        let mut out = Vec::new();
        log.next_to_apply(u64::MAX, &mut out);
        log.compact(2);
        assert_eq!(log.first_index(), 3);
        assert_eq!(log.term(2), Some(2));
        assert_eq!(log.term(1), None);
        assert!(log.match_term(3, 3));
    }

    #[test]
    fn slice_respects_byte_and_count_limits() {
        let entries: Vec<Entry> = (1..=10)
            .map(|i| Entry {
                index: i,
                term: 1,
                kind: EntryKind::Normal,
                data: Bytes::from(vec![0u8; 100]),
            })
            .collect();
        let log = RaftLog::restore_from_storage(0, 0, entries, 0);
        let mut out = Vec::new();
        log.slice(1, 10, 3, u64::MAX, &mut out);
        assert_eq!(out.len(), 3);
        out.clear();
        log.slice(1, 10, 100, 250, &mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        log.slice(1, 10, 100, 1, &mut out);
        assert_eq!(out.len(), 1, "one entry always goes, however large");
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            /// Follower append after a matching prefix of `prev` entries, with these terms.
            Append { prev: usize, terms: Vec<u64> },
            /// Hand the unstable entries to the disk (a write starts).
            StartWrite,
            /// The oldest write in flight completes.
            CompleteWrite,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0usize..12, proptest::collection::vec(1u64..4, 0..5))
                    .prop_map(|(prev, terms)| Op::Append { prev, terms }),
                Just(Op::StartWrite),
                Just(Op::CompleteWrite),
            ]
        }

        proptest! {
            /// Whatever the interleaving of overwrites and write completions, `persisted`
            /// never claims a prefix the disk does not hold exactly as memory does.
            #[test]
            fn persisted_prefix_is_always_on_disk(ops in proptest::collection::vec(op(), 1..80)) {
                let mut log = RaftLog::restore_from_storage(0, 0, vec![], 0);
                let mut disk: Vec<Entry> = Vec::new();
                let mut in_flight: VecDeque<(Vec<Entry>, PersistMark)> = VecDeque::new();
                let mut serial = 0u8;
                for op in ops {
                    match op {
                        Op::Append { prev, terms } => {
                            let prev = prev.min(log.last_index() as usize) as u64;
                            let base = log.term(prev).unwrap_or(0);
                            let mut term = base;
                            let entries: Vec<Entry> = terms
                                .iter()
                                .enumerate()
                                .map(|(i, t)| {
                                    term = term.max(*t);
                                    serial = serial.wrapping_add(1);
                                    Entry {
                                        index: prev + 1 + i as u64,
                                        term,
                                        kind: EntryKind::Normal,
                                        data: Bytes::from(vec![serial]),
                                    }
                                })
                                .collect();
                            // Same (index, term) must mean the same entry (log matching): reuse
                            // what memory holds for entries that match by term.
                            let entries: Vec<Entry> = entries
                                .into_iter()
                                .map(|e| match log.entry(e.index) {
                                    Some(old) if old.term == e.term => old.clone(),
                                    _ => e,
                                })
                                .collect();
                            log.append_after_match(prev, &entries);
                        }
                        Op::StartWrite => {
                            let mut out = Vec::new();
                            let (_, mark) = log.take_unstable(&mut out);
                            in_flight.push_back((out, mark));
                        }
                        Op::CompleteWrite => {
                            if let Some((entries, mark)) = in_flight.pop_front() {
                                if let Some(first) = entries.first() {
                                    disk.truncate((first.index - 1) as usize);
                                    disk.extend(entries);
                                }
                                log.stable_to(mark);
                            }
                        }
                    }
                    let p = log.persisted() as usize;
                    prop_assert!(p <= disk.len(), "persisted {} beyond disk {}", p, disk.len());
                    for i in 1..=p as u64 {
                        prop_assert_eq!(Some(&disk[(i - 1) as usize]), log.entry(i), "index {} differs", i);
                    }
                }
            }
        }
    }
}
