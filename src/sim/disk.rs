//! A simulated disk per replica: writes complete in order after a latency (slow disks have a
//! longer one); a crash loses every write not yet completed (unsynced).

use std::collections::VecDeque;

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
        if let Err(never) = self.write(w.snapshot, w.entries, w.hard_state) {
            match never {}
        }
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

    /// Power loss: unsynced writes are gone.
    pub fn crash(&mut self) {
        self.pending.clear();
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
        d.crash();
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
