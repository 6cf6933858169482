//! A simulated network: per-message drop, duplication and delay (which reorders), and cut
//! links for partitions (directed, so partitions can be asymmetric). Deterministic: messages
//! due at the same tick are delivered in send order.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::raft::{Message, NodeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub drop_per_million: u32,
    pub dup_per_million: u32,
    pub delay_ticks_min: u64,
    pub delay_ticks_max: u64,
}

impl NetConfig {
    pub fn reliable() -> NetConfig {
        NetConfig {
            drop_per_million: 0,
            dup_per_million: 0,
            delay_ticks_min: 1,
            delay_ticks_max: 1,
        }
    }
    /// Every message arrives in the same tick: the benchmark's network.
    pub fn instant() -> NetConfig {
        NetConfig {
            drop_per_million: 0,
            dup_per_million: 0,
            delay_ticks_min: 0,
            delay_ticks_max: 0,
        }
    }
}

/// Counters per message kind, for the RPC-count bounds.
#[derive(Clone, Debug, Default)]
pub struct NetStats {
    pub sent: u64,
    pub sent_append_class: u64,
    pub sent_bytes: u64,
    pub dropped: u64,
    pub delivered: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
}

pub struct Network {
    pub cfg: NetConfig,
    queue: BTreeMap<(u64, u64), Message>,
    seq: u64,
    cut: BTreeSet<(NodeId, NodeId)>,
    pub stats: NetStats,
}

/// Messages in flight at once; beyond it the network drops (a bound on simulator memory).
const IN_FLIGHT_MAX: usize = 1 << 20;

impl Network {
    pub fn new(cfg: NetConfig) -> Network {
        Network {
            cfg,
            queue: BTreeMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            stats: NetStats::default(),
        }
    }

    pub fn send(&mut self, m: Message, now: u64, rng: &mut ChaCha8Rng) {
        self.stats.sent += 1;
        self.stats.sent_bytes += m.size_bytes();
        if m.body.is_append_class() {
            self.stats.sent_append_class += 1;
        }
        *self.stats.by_kind.entry(m.body.name()).or_insert(0) += 1;
        if self.cut.contains(&(m.from, m.to))
            || rng.gen_range(0..1_000_000) < self.cfg.drop_per_million
            || self.queue.len() >= IN_FLIGHT_MAX
        {
            self.stats.dropped += 1;
            return;
        }
        if rng.gen_range(0..1_000_000) < self.cfg.dup_per_million {
            let delay = self.delay(rng);
            self.seq += 1;
            self.queue.insert((now + delay, self.seq), m.clone());
        }
        let delay = self.delay(rng);
        self.seq += 1;
        self.queue.insert((now + delay, self.seq), m);
    }

    fn delay(&self, rng: &mut ChaCha8Rng) -> u64 {
        rng.gen_range(self.cfg.delay_ticks_min..=self.cfg.delay_ticks_max)
    }

    /// Removes and returns the next message due at or before `now` (links cut meanwhile drop it).
    pub fn next_due(&mut self, now: u64) -> Option<Message> {
        loop {
            let (&key, _) = self.queue.first_key_value()?;
            if key.0 > now {
                return None;
            }
            let m = self.queue.remove(&key)?;
            if self.cut.contains(&(m.from, m.to)) {
                self.stats.dropped += 1;
                continue;
            }
            self.stats.delivered += 1;
            return Some(m);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    pub fn cut_link(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
    }

    /// Cuts every link between `node` and `others`, both directions.
    pub fn isolate(&mut self, node: NodeId, others: impl IntoIterator<Item = NodeId>) {
        for o in others {
            if o != node {
                self.cut.insert((node, o));
                self.cut.insert((o, node));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn is_partitioned(&self) -> bool {
        !self.cut.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::MessageBody;
    use rand::SeedableRng;

    fn msg(from: NodeId, to: NodeId) -> Message {
        Message {
            from,
            to,
            term: 1,
            body: MessageBody::TimeoutNow,
        }
    }

    #[test]
    fn cut_links_drop_in_one_direction_only() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut net = Network::new(NetConfig::reliable());
        net.cut_link(1, 2);
        net.send(msg(1, 2), 0, &mut rng);
        net.send(msg(2, 1), 0, &mut rng);
        let delivered: Vec<_> = std::iter::from_fn(|| net.next_due(1)).collect();
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].from, 2);
        assert_eq!(net.stats.dropped, 1);
    }

    #[test]
    fn a_partition_made_after_sending_still_drops() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut net = Network::new(NetConfig::reliable());
        net.send(msg(1, 2), 0, &mut rng);
        net.isolate(2, [1, 3]);
        assert!(net.next_due(5).is_none());
        net.heal();
        assert!(!net.is_partitioned());
    }

    #[test]
    fn lossy_network_drops_duplicates_and_delays() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = NetConfig {
            drop_per_million: 200_000,
            dup_per_million: 200_000,
            delay_ticks_min: 1,
            delay_ticks_max: 5,
        };
        let mut net = Network::new(cfg);
        for i in 0..1000 {
            net.send(msg(1, 2), i, &mut rng);
        }
        let delivered = std::iter::from_fn(|| net.next_due(10_000)).count() as u64;
        assert!(net.stats.dropped > 100, "drops happen");
        assert!(delivered > 1000 - net.stats.dropped, "duplicates happen");
    }
}
