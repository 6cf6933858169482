//! The leader's view of one follower: how far its log matches, what to send next, and how much
//! is in flight (etcd's `tracker` package, reduced to what we use).
//!
//! States:
//! - `Probe`: we do not know where the follower's log matches. At most one AppendEntries is
//!   outstanding; the next one leaves after its answer or after a heartbeat response.
//! - `Replicate`: the follower's log matches up to `match_index` and the pipeline is open: the
//!   leader sends optimistically (`next_index` moves on at send time) up to `max_inflight_msgs`
//!   messages without waiting for answers. A reject drops back to `Probe`.
//! - `Snapshot`: the follower needs entries the leader has compacted away; chunks of the
//!   snapshot are sent one at a time until the follower acks the snapshot index.

use super::types::Index;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    Snapshot,
}

/// A ring of the last index of each AppendEntries in flight, oldest first.
#[derive(Clone, Debug)]
pub struct Inflights {
    buf: Vec<Index>,
    start: usize,
    count: usize,
}

impl Inflights {
    pub fn new(capacity: usize) -> Inflights {
        assert!(
            capacity > 0,
            "an inflight window of 0 would stop replication"
        );
        Inflights {
            buf: vec![0; capacity],
            start: 0,
            count: 0,
        }
    }

    pub fn full(&self) -> bool {
        self.count == self.buf.len()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn add(&mut self, last_index: Index) {
        assert!(!self.full(), "inflight window overflow");
        if self.count > 0 {
            let newest = self.buf[(self.start + self.count - 1) % self.buf.len()];
            debug_assert!(
                newest <= last_index,
                "inflights out of order: {newest} > {last_index}"
            );
        }
        let slot = (self.start + self.count) % self.buf.len();
        self.buf[slot] = last_index;
        self.count += 1;
    }

    /// Frees every message whose last index is at or below `index` (it has been acked).
    pub fn free_le(&mut self, index: Index) {
        while self.count > 0 && self.buf[self.start] <= index {
            self.start = (self.start + 1) % self.buf.len();
            self.count -= 1;
        }
    }

    /// Frees the oldest message (its answer is presumed lost).
    pub fn free_first(&mut self) {
        if self.count > 0 {
            self.start = (self.start + 1) % self.buf.len();
            self.count -= 1;
        }
    }

    pub fn reset(&mut self) {
        self.start = 0;
        self.count = 0;
    }
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub match_index: Index,
    pub next_index: Index,
    pub state: ProgressState,
    /// In `Probe`: an AppendEntries is outstanding, send nothing more until it is answered.
    pub probe_sent: bool,
    /// In `Snapshot`: the index of the snapshot being sent and the next byte to send.
    pub snapshot_index: Index,
    pub snapshot_offset: u64,
    /// In `Snapshot`: a chunk is outstanding.
    pub snapshot_chunk_sent: bool,
    pub inflights: Inflights,
    /// Heard from since the last CheckQuorum round.
    pub recent_active: bool,
    /// Highest heartbeat round this follower acknowledged in the current term.
    pub acked_round: u64,
    /// When the last AppendEntries left for this follower (leader ticks), to detect loss.
    pub append_tick: u64,
    pub is_learner: bool,
}

impl Progress {
    pub fn new(next_index: Index, inflight_max: usize, is_learner: bool) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            snapshot_index: 0,
            snapshot_offset: 0,
            snapshot_chunk_sent: false,
            inflights: Inflights::new(inflight_max),
            recent_active: false,
            acked_round: 0,
            append_tick: 0,
            is_learner,
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.state = state;
        self.probe_sent = false;
        self.snapshot_index = 0;
        self.snapshot_offset = 0;
        self.snapshot_chunk_sent = false;
        self.inflights.reset();
    }

    pub fn become_probe(&mut self) {
        // Coming back from a snapshot, the follower has at least the snapshot.
        let next = if self.state == ProgressState::Snapshot {
            (self.match_index + 1).max(self.snapshot_index + 1)
        } else {
            self.match_index + 1
        };
        self.reset_state(ProgressState::Probe);
        self.next_index = next;
    }

    pub fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next_index = self.match_index + 1;
    }

    pub fn become_snapshot(&mut self, snapshot_index: Index) {
        self.reset_state(ProgressState::Snapshot);
        self.snapshot_index = snapshot_index;
    }

    /// No more AppendEntries may leave for now.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot => true,
        }
    }

    /// Records an AppendEntries carrying entries up to `last_index` (or none) being sent.
    pub fn sent_append(&mut self, last_index: Option<Index>) {
        match self.state {
            ProgressState::Replicate => {
                if let Some(last) = last_index {
                    debug_assert!(last >= self.next_index);
                    self.next_index = last + 1;
                    self.inflights.add(last);
                }
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot => unreachable!("append sent in snapshot state"),
        }
    }

    /// An ack for `index`. Returns false when it brings nothing new (a stale or duplicate ack).
    pub fn maybe_update(&mut self, index: Index) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        if self.next_index < index + 1 {
            self.next_index = index + 1;
        }
        self.inflights.free_le(index);
        updated
    }

    /// A reject of the append whose `prev_index` was `rejected_index`; `next` is the index the
    /// leader computed from the follower's hint. Returns false when the reject is stale.
    pub fn maybe_decr_to(&mut self, rejected_index: Index, next: Index) -> bool {
        if rejected_index < self.match_index {
            // An answer to an old message: the follower matches further than that by now.
            return false;
        }
        let upper = rejected_index.max(self.match_index + 1);
        match self.state {
            ProgressState::Replicate => {
                // Optimistic sends ran ahead; restart from the match point, probing the hint.
                self.become_probe();
                self.next_index = next.clamp(self.match_index + 1, upper);
                true
            }
            ProgressState::Probe => {
                if self.next_index != rejected_index + 1 {
                    // Not the answer to the probe we are waiting for.
                    return false;
                }
                self.next_index = next.clamp(self.match_index + 1, upper);
                self.probe_sent = false;
                true
            }
            ProgressState::Snapshot => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_free_in_order_and_wrap() {
        let mut inf = Inflights::new(3);
        inf.add(5);
        inf.add(7);
        inf.add(9);
        assert!(inf.full());
        inf.free_le(6);
        assert_eq!(inf.len(), 2);
        inf.add(12);
        assert!(inf.full());
        inf.free_le(9);
        assert_eq!(inf.len(), 1);
        inf.free_le(100);
        assert!(inf.is_empty());
    }

    #[test]
    #[should_panic(expected = "inflight window overflow")]
    fn inflights_overflow_is_a_bug() {
        let mut inf = Inflights::new(1);
        inf.add(1);
        inf.add(2);
    }

    #[test]
    fn probe_sends_one_at_a_time() {
        let mut pr = Progress::new(10, 4, false);
        assert!(!pr.is_paused());
        pr.sent_append(Some(12));
        assert!(pr.is_paused());
        // In probe the next index does not move at send time.
        assert_eq!(pr.next_index, 10);
        assert!(pr.maybe_update(12));
        assert!(!pr.is_paused());
        assert_eq!(pr.next_index, 13);
    }

    #[test]
    fn replicate_pipelines_up_to_window() {
        let mut pr = Progress::new(1, 2, false);
        pr.maybe_update(0);
        pr.become_replicate();
        pr.sent_append(Some(3));
        assert_eq!(pr.next_index, 4);
        pr.sent_append(Some(6));
        assert!(pr.is_paused());
        assert!(!pr.maybe_update(0));
        assert!(pr.maybe_update(3));
        assert!(!pr.is_paused());
        assert_eq!(pr.next_index, 7);
    }

    #[test]
    fn reject_in_replicate_falls_back_to_probe_at_hint() {
        let mut pr = Progress::new(1, 4, false);
        pr.maybe_update(5);
        pr.become_replicate();
        pr.sent_append(Some(10));
        pr.sent_append(Some(20));
        assert!(pr.maybe_decr_to(10, 8));
        assert_eq!(pr.state, ProgressState::Probe);
        assert_eq!(pr.next_index, 8);
        assert!(pr.inflights.is_empty());
        // A stale reject below the match point changes nothing.
        assert!(!pr.maybe_decr_to(3, 2));
        assert_eq!(pr.next_index, 8);
    }

    #[test]
    fn reject_never_moves_next_at_or_below_match() {
        let mut pr = Progress::new(10, 4, false);
        pr.maybe_update(6);
        pr.next_index = 10;
        assert!(pr.maybe_decr_to(9, 1));
        assert_eq!(pr.next_index, 7);
    }

    #[test]
    fn snapshot_state_pauses_and_resumes_after_snapshot() {
        let mut pr = Progress::new(1, 4, false);
        pr.become_snapshot(50);
        assert!(pr.is_paused());
        pr.maybe_update(50);
        pr.become_probe();
        assert_eq!(pr.next_index, 51);
        assert!(!pr.is_paused());
    }
}
