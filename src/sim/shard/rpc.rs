//! The network between groups, hosts, the controller and clients: requests and replies that
//! are lost, duplicated and delayed (so reordered), and cut between partitioned hosts.
//!
//! Raft traffic inside a group uses each group's own `sim::Network`; this one carries what the
//! runtimes of different groups say to each other (configuration queries, pulls, confirms).
//! A message between two hosts is dropped when the link between them is cut, at send time and
//! again at delivery (a partition made while it was in flight). Clients sit outside the hosts:
//! only loss and delay touch them.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::controller::{Configuration, GroupId, HostId};
use crate::raft::NodeId;
use crate::shard::migration::PullReply;
use crate::sim::NetConfig;

/// Who sends or receives an RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    Controller(NodeId),
    Group(GroupId, NodeId),
    /// The host's agent, which learns configurations and starts the replicas they create.
    Host(HostId),
    /// A client, by index.
    Client(usize),
}

/// The old owner's answer to a confirmation, as it travels back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmAnswer {
    /// The copy is gone: the asker may log ConfirmDone.
    Done,
    /// Not yet (not applied that configuration, or DeleteExported proposed but not applied).
    Pending,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RpcBody {
    /// Configuration `num` (-1: the latest).
    Query {
        num: i64,
    },
    /// None: that configuration does not exist (yet).
    QueryReply {
        config: Option<Box<Configuration>>,
    },
    Pull {
        shard: u16,
        config_num: u64,
    },
    PullReply {
        shard: u16,
        config_num: u64,
        reply: PullReply,
    },
    Confirm {
        shard: u16,
        config_num: u64,
    },
    ConfirmReply {
        shard: u16,
        config_num: u64,
        answer: ConfirmAnswer,
    },
}

#[derive(Clone, Debug)]
pub struct Rpc {
    pub from: Endpoint,
    pub to: Endpoint,
    pub body: RpcBody,
}

struct InFlight {
    rpc: Rpc,
    from_host: Option<HostId>,
    to_host: Option<HostId>,
}

/// Counters, for run summaries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RpcStats {
    pub sent: u64,
    pub dropped: u64,
    pub delivered: u64,
    pub blob_bytes: u64,
}

pub struct RpcNet {
    pub cfg: NetConfig,
    queue: BTreeMap<(u64, u64), InFlight>,
    seq: u64,
    /// Directed host pairs whose link is cut.
    cut: BTreeSet<(HostId, HostId)>,
    pub stats: RpcStats,
}

/// RPCs in flight at once; beyond it the network drops (a bound on simulator memory).
const IN_FLIGHT_MAX: usize = 1 << 16;

impl RpcNet {
    pub fn new(cfg: NetConfig) -> RpcNet {
        RpcNet {
            cfg,
            queue: BTreeMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            stats: RpcStats::default(),
        }
    }

    fn is_cut(&self, from: Option<HostId>, to: Option<HostId>) -> bool {
        match (from, to) {
            (Some(a), Some(b)) => a != b && self.cut.contains(&(a, b)),
            _ => false,
        }
    }

    pub fn send(
        &mut self,
        rpc: Rpc,
        from_host: Option<HostId>,
        to_host: Option<HostId>,
        now: u64,
        rng: &mut ChaCha8Rng,
    ) {
        self.stats.sent += 1;
        if let RpcBody::PullReply {
            reply: PullReply::Blob(b),
            ..
        } = &rpc.body
        {
            self.stats.blob_bytes += b.len() as u64;
        }
        if self.is_cut(from_host, to_host)
            || rng.gen_range(0..1_000_000) < self.cfg.drop_per_million
            || self.queue.len() >= IN_FLIGHT_MAX
        {
            self.stats.dropped += 1;
            return;
        }
        // A duplicate clones `Bytes`: a blob is shared, not copied.
        let copies = if rng.gen_range(0..1_000_000) < self.cfg.dup_per_million {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = rng.gen_range(self.cfg.delay_ticks_min..=self.cfg.delay_ticks_max);
            self.seq += 1;
            self.queue.insert(
                (now + delay, self.seq),
                InFlight {
                    rpc: rpc.clone(),
                    from_host,
                    to_host,
                },
            );
        }
    }

    /// The next RPC due at or before `now` (links cut meanwhile drop it).
    pub fn next_due(&mut self, now: u64) -> Option<Rpc> {
        loop {
            let (&key, _) = self.queue.first_key_value()?;
            if key.0 > now {
                return None;
            }
            let m = self.queue.remove(&key)?;
            if self.is_cut(m.from_host, m.to_host) {
                self.stats.dropped += 1;
                continue;
            }
            self.stats.delivered += 1;
            return Some(m.rpc);
        }
    }

    pub fn cut_link(&mut self, from: HostId, to: HostId) {
        self.cut.insert((from, to));
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn cut_links(&self) -> &BTreeSet<(HostId, HostId)> {
        &self.cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn query(from: HostId, to: NodeId) -> Rpc {
        Rpc {
            from: Endpoint::Host(from),
            to: Endpoint::Controller(to),
            body: RpcBody::Query { num: -1 },
        }
    }

    #[test]
    fn cut_host_links_drop_in_one_direction_and_clients_are_outside_hosts() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut net = RpcNet::new(NetConfig::reliable());
        net.cut_link(1, 2);
        net.send(query(1, 2), Some(1), Some(2), 0, &mut rng);
        net.send(query(2, 1), Some(2), Some(1), 0, &mut rng);
        net.send(query(1, 2), None, Some(2), 0, &mut rng);
        let delivered: Vec<Rpc> = std::iter::from_fn(|| net.next_due(1)).collect();
        assert_eq!(delivered.len(), 2);
        assert_eq!(net.stats.dropped, 1);
    }

    #[test]
    fn a_cut_made_while_in_flight_drops_and_heal_restores() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut net = RpcNet::new(NetConfig::reliable());
        net.send(query(1, 2), Some(1), Some(2), 0, &mut rng);
        net.cut_link(1, 2);
        assert!(net.next_due(5).is_none());
        net.heal();
        net.send(query(1, 2), Some(1), Some(2), 5, &mut rng);
        assert!(net.next_due(6).is_some());
    }

    #[test]
    fn lossy_rpcs_are_dropped_duplicated_and_delayed() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut net = RpcNet::new(NetConfig {
            drop_per_million: 200_000,
            dup_per_million: 200_000,
            delay_ticks_min: 1,
            delay_ticks_max: 5,
        });
        for t in 0..1000 {
            net.send(query(1, 2), Some(1), Some(2), t, &mut rng);
        }
        let delivered = std::iter::from_fn(|| net.next_due(10_000)).count() as u64;
        assert!(net.stats.dropped > 100);
        assert!(delivered > 1000 - net.stats.dropped, "duplicates happen");
    }
}
