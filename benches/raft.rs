//! Micro benchmark of the Raft core alone: committed entries per second for a 3-node group
//! through the simulator's zero-latency network and instant disks, invariant checker off, and
//! a state machine that only counts.
//! This is the CPU ceiling the runtime must not waste (budget: ~15 us per write across three
//! replicas, see DESIGN.md). Entries are 256 B, one shared `Bytes` (no copy per entry).
//!
//! Run: `cargo bench --bench raft`. The last line is
//! `RESULT raft_commit_entries_per_sec batch1=.. batch64=.. batch1024=..`.

use std::time::Instant;

use bytes::Bytes;
use tynamo::raft::{Config, Entry, Role, Snapshot};
use tynamo::sim::{App, Cluster, ClusterConfig, NetConfig, Steps};

/// Applies nothing but a counter: the benchmark measures consensus, not a state machine.
#[derive(Default)]
struct CountApp {
    applied: u64,
}

impl App for CountApp {
    fn apply(&mut self, entry: &Entry) -> Result<Bytes, String> {
        self.applied = entry.index;
        Ok(Bytes::new())
    }
    fn snapshot(&self) -> Bytes {
        Bytes::copy_from_slice(&self.applied.to_le_bytes())
    }
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        self.applied = snapshot.meta.index;
        Ok(())
    }
}

fn cluster() -> Cluster<CountApp> {
    let mut cfg = ClusterConfig::new(3);
    cfg.net = NetConfig::instant();
    cfg.disk_ticks_min = 0;
    cfg.disk_ticks_max = 0;
    cfg.checks = false;
    let mut raft = Config::new(1);
    raft.max_entries_per_msg = 4096;
    raft.max_bytes_per_msg = 4 << 20;
    cfg.raft = raft;
    let mut c = Cluster::new(cfg, 1);
    let elected = c
        .run_until(10_000, |c| {
            c.leader()
                .is_some_and(|l| c.raft(l).is_some_and(|r| r.committed_in_term()))
        })
        .unwrap_or(false);
    assert!(elected, "no leader");
    c
}

/// Proposes `batch` entries per loop turn until `total` are committed; returns entries/s.
fn run(batch: usize, total: u64) -> f64 {
    let mut c = cluster();
    let leader = c.leader().unwrap_or(1);
    let payload = Bytes::from(vec![0x5au8; 256]);
    let proposal: Vec<Bytes> = (0..batch).map(|_| payload.clone()).collect();
    let start_commit = c.raft(leader).map_or(0, |r| r.status().commit);
    let started = Instant::now();
    let mut committed = 0;
    while committed < total {
        let raft = c.raft_mut(leader).expect("leader is up");
        assert_eq!(
            raft.role(),
            Role::Leader,
            "leadership moved during the benchmark"
        );
        raft.propose(&proposal).expect("proposal accepted");
        c.settle().expect("no violation");
        committed = c.raft(leader).map_or(0, |r| r.status().commit) - start_commit;
    }
    let secs = started.elapsed().as_secs_f64();
    committed as f64 / secs
}

fn main() {
    let mut results = Vec::new();
    for (batch, total) in [(1usize, 50_000u64), (64, 500_000), (1024, 1_000_000)] {
        let rate = run(batch, total);
        println!(
            "batch {batch:>5}: {rate:>12.0} committed entries/s ({:.2} us per entry)",
            1e6 / rate
        );
        results.push(format!("batch{batch}={rate:.0}"));
    }
    println!("RESULT raft_commit_entries_per_sec {}", results.join(" "));
}
