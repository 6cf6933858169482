//! A simulated disk per replica, modelled on what a real one does under a WAL:
//! - A write is submitted, then completes (its fsync returns) after a latency (slow disks have a
//!   longer one). Writes complete in submission order. Only a completed write is durable, and
//!   only a completed write is reported to the node (`next_completed`, then `on_persisted`).
//! - A crash (power loss) loses every write whose completion was not reported, except that the
//!   device may already hold a prefix of them, in order: whole writes, then part of the next one
//!   (torn). A write is a sequence of records, in the order the `LogStore` contract gives:
//!   snapshot, then each entry (the first one also truncates the conflicting suffix), then the
//!   hard state. A torn write keeps a prefix of its records, so entries can survive without
//!   the hard state written with them.

use std::collections::VecDeque;

use rand::Rng;

use crate::raft::{
    ConfState, Entry, HardState, InitialState, LogStore, Message, Snapshot, WriteMark,
};

struct PendingWrite {
    done_at: u64,
    hard_state: Option<HardState>,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
    mark: WriteMark,
    persisted_messages: Vec<Message>,
}

impl PendingWrite {
    /// Records a crash can keep or lose one by one (an empty write is only a barrier).
    fn records(&self) -> usize {
        usize::from(self.snapshot.is_some())
            + self.entries.len()
            + usize::from(self.hard_state.is_some())
    }
}

/// A completed write: report `mark` to the node, then send the messages.
pub struct Completion {
    pub mark: WriteMark,
    pub persisted_messages: Vec<Message>,
}

#[derive(Default)]
pub struct SimDisk {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    /// Entries after the snapshot, in order.
    entries: Vec<Entry>,
    bootstrap_conf: ConfState,
    pending: VecDeque<PendingWrite>,
    pub writes: u64,
}

impl SimDisk {
    pub fn new(initial: InitialState) -> SimDisk {
        SimDisk {
            hard_state: initial.hard_state,
            snapshot: initial.snapshot,
            entries: initial.entries,
            bootstrap_conf: initial.conf,
            pending: VecDeque::new(),
            writes: 0,
        }
    }

    pub fn submit(
        &mut self,
        done_at: u64,
        hard_state: Option<HardState>,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
        mark: WriteMark,
        persisted_messages: Vec<Message>,
    ) {
        // In order: a write never completes before an earlier one.
        let done_at = self
            .pending
            .back()
            .map_or(done_at, |w| w.done_at.max(done_at));
        self.pending.push_back(PendingWrite {
            done_at,
            hard_state,
            snapshot,
            entries,
            mark,
            persisted_messages,
        });
    }

    pub fn next_completed(&mut self, now: u64) -> Option<Completion> {
        if self.pending.front()?.done_at > now {
            return None;
        }
        let w = self.pending.pop_front()?;
        self.writes += 1;
        self.apply(w.snapshot, w.entries, w.hard_state);
        Some(Completion {
            mark: w.mark,
            persisted_messages: w.persisted_messages,
        })
    }

    /// The service made a snapshot durable and the log before it may go.
    pub fn store_snapshot(&mut self, snapshot: Snapshot) {
        if let Err(never) = self.compact(snapshot) {
            match never {}
        }
    }

    /// Power loss: writes not reported complete are gone, except a random prefix of their
    /// records (see the module comment) that the device had already made durable.
    pub fn crash(&mut self, rng: &mut impl Rng) {
        let records: usize = self.pending.iter().map(PendingWrite::records).sum();
        let keep = rng.gen_range(0..=records);
        self.crash_keeping_records(keep);
    }

    /// Power loss that keeps exactly the first `records` records of the pending writes.
    pub fn crash_keeping_records(&mut self, mut records: usize) {
        while records > 0 {
            let Some(mut w) = self.pending.pop_front() else {
                break;
            };
            let n = w.records();
            if n <= records {
                records -= n;
                self.apply(w.snapshot, w.entries, w.hard_state);
                continue;
            }
            // Torn: the snapshot, then entries, then the hard state, cut after `records`.
            let snapshot = w.snapshot.take();
            records -= usize::from(snapshot.is_some());
            w.entries.truncate(records);
            self.apply(snapshot, w.entries, None);
            break;
        }
        self.pending.clear();
    }

    fn apply(
        &mut self,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
        hard_state: Option<HardState>,
    ) {
        if let Err(never) = self.write(snapshot, entries, hard_state) {
            match never {}
        }
    }

    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }

    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn initial_state(&self) -> InitialState {
        InitialState {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
            conf: self.bootstrap_conf.clone(),
        }
    }
}

/// The durable part of the simulated disk: what survives a crash.
impl LogStore for SimDisk {
    type Error = std::convert::Infallible;

    fn initial_state(&self) -> Result<InitialState, Self::Error> {
        Ok(SimDisk::initial_state(self))
    }

    fn write(
        &mut self,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
        hard_state: Option<HardState>,
    ) -> Result<(), Self::Error> {
        if let Some(s) = snapshot {
            self.entries.clear();
            self.snapshot = Some(s);
        }
        if let Some(first) = entries.first() {
            let base = self.snapshot.as_ref().map_or(0, |s| s.meta.index);
            let keep = first.index.saturating_sub(base + 1) as usize;
            self.entries.truncate(keep.min(self.entries.len()));
            for e in entries {
                if e.index > base {
                    assert_eq!(
                        e.index,
                        base + self.entries.len() as u64 + 1,
                        "sim disk: gap in the log"
                    );
                    self.entries.push(e);
                }
            }
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs;
        }
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), Self::Error> {
        let index = snapshot.meta.index;
        let base = self.snapshot.as_ref().map_or(0, |s| s.meta.index);
        if index <= base {
            return Ok(());
        }
        let drop = ((index - base) as usize).min(self.entries.len());
        self.entries.drain(..drop);
        self.snapshot = Some(snapshot);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{EntryKind, WriteMark};
    use bytes::Bytes;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::new(),
        }
    }

    #[test]
    fn writes_complete_in_order_and_a_crash_loses_unsynced_ones() {
        let mut d = SimDisk::new(InitialState::default());
        d.submit(
            10,
            None,
            None,
            vec![ent(1, 1), ent(2, 1)],
            WriteMark::default(),
            vec![],
        );
        // A later write with a shorter latency still completes after the first.
        d.submit(
            3,
            Some(HardState {
                term: 1,
                vote: 0,
                commit: 2,
            }),
            None,
            vec![ent(3, 1)],
            WriteMark::default(),
            vec![],
        );
        assert!(d.next_completed(5).is_none());
        assert!(d.next_completed(10).is_some());
        assert_eq!(d.entries().len(), 2);
        d.submit(
            20,
            None,
            None,
            vec![ent(2, 2)],
            WriteMark::default(),
            vec![],
        );
        assert!(d.next_completed(10).is_some());
        assert_eq!(d.entries().len(), 3);
        d.crash_keeping_records(0);
        assert_eq!(d.pending_writes(), 0);
        let s = d.initial_state();
        assert_eq!(
            s.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 1), (3, 1)]
        );
        assert_eq!(s.hard_state.commit, 2);
    }

    #[test]
    fn a_crash_keeps_a_prefix_of_records_and_can_tear_a_write() {
        let hs = |term| HardState {
            term,
            vote: 1,
            commit: 0,
        };
        let pending = |d: &mut SimDisk| {
            d.submit(
                5,
                Some(hs(2)),
                None,
                vec![ent(1, 2)],
                WriteMark::default(),
                vec![],
            );
            d.submit(
                5,
                Some(hs(3)),
                None,
                vec![ent(2, 3), ent(3, 3)],
                WriteMark::default(),
                vec![],
            );
        };
        // The whole first write and one entry of the second, without its hard state.
        let mut d = SimDisk::new(InitialState::default());
        pending(&mut d);
        d.crash_keeping_records(3);
        assert_eq!(d.pending_writes(), 0);
        assert_eq!(
            d.entries().iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(d.hard_state(), hs(2), "the torn write's hard state is lost");
        // Everything kept when the device had it all.
        let mut d = SimDisk::new(InitialState::default());
        pending(&mut d);
        d.crash_keeping_records(5);
        assert_eq!(d.entries().len(), 3);
        assert_eq!(d.hard_state(), hs(3));
        // A random crash never keeps a record without every record before it, and it hits
        // every cut point.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut d = SimDisk::new(InitialState::default());
            pending(&mut d);
            d.crash(&mut rng);
            let state = (d.entries().len(), d.hard_state().term);
            assert!(
                [(0, 0), (1, 0), (1, 2), (2, 2), (3, 2), (3, 3)].contains(&state),
                "{state:?}"
            );
            seen.insert(state);
        }
        assert_eq!(seen.len(), 6);
    }

    #[test]
    fn a_write_truncates_from_its_first_entry() {
        let mut d = SimDisk::new(InitialState::default());
        d.submit(
            0,
            None,
            None,
            vec![ent(1, 1), ent(2, 1), ent(3, 1)],
            WriteMark::default(),
            vec![],
        );
        d.submit(0, None, None, vec![ent(2, 2)], WriteMark::default(), vec![]);
        while d.next_completed(0).is_some() {}
        assert_eq!(
            d.entries().iter().map(|e| e.term).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }
}
