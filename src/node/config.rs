//! Server configuration: the static cluster map (until the controller replaces it), addresses,
//! timings and limits. Built from command-line flags or an equivalent TOML file, then validated
//! as a whole so that a mistake is reported with the value at fault before anything starts.
//!
//! Addressing: core `c` of a host serves clients on the host's client port + `c` and peers on
//! its peer port + `c`. Group `g` (`0..cores`) has one replica on core `g` of every host, and
//! the shards are spread over the groups in contiguous blocks (a static map), so that a group's
//! slots form one contiguous range and `CLUSTER SLOTS` has one row per group.
//!
//! The other hosts' client addresses (needed for `-MOVED` and `CLUSTER SLOTS`) come from the
//! `--initial-cluster` map: `id=peer_addr/client_addr`. When `/client_addr` is omitted the
//! client address is the peer address with the port lowered by [`CLIENT_PORT_BELOW_PEER`]
//! (7101 -> 7001, the documented example layout). Ports are base + core, so hosts sharing an IP
//! need bases at least `cores` apart: the issue's example (peers 7101, 7102, 7103 with
//! `--cores 2`) collides (host 1 core 1 = host 2 core 0) and is refused by `validate`; `tynamo
//! demo` spaces hosts 10 ports apart.
//!
//! # Measured defaults (in-flight window, AppendEntries batch)
//! `tools/cluster.sh window-table 30000` (release build, 3 hosts x 2 cores on one 2-CPU machine
//! shared with other work, redis-benchmark `--cluster -t set -d 256`), median of three runs at
//! load average ~4.5:
//!
//! | window | SET rps, 1 connection | SET rps, 256 connections |
//! | --- | --- | --- |
//! | 1 | 1 198 | 39 841 |
//! | 2 | 1 198 | 39 630 |
//! | 4 | 1 330 | 39 578 |
//! | 16 | 1 330 | 39 788 |
//!
//! An earlier single run at load average ~8.8 gave 841/31 546, 1 141/26 613, 839/13 952,
//! 166/7 220: with the CPUs overloaded the deeper windows did worse (consistent with hashicorp/raft's
//! finding that deep pipelines starve batching, though that run was noisy). On the quieter machine
//! the window makes no difference beyond noise: one turn's AppendEntries already carries every
//! queued write. The default is 2 (hashicorp's), on the safe side of both. Entries per AppendEntries: 1024 (a batch
//! entry holds up to 16 384 client commands, so the entry count per message is rarely the limit).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::raft::ReadMode;
use crate::shard::SLOT_COUNT;

/// Default distance between a host's peer port and its client port.
pub const CLIENT_PORT_BELOW_PEER: u16 = 100;
/// Most cores per host (ports are port + core, so keep the range small).
pub const CORES_MAX: u16 = 64;
/// Key and value bytes of one client command (the server refuses larger ones before proposing).
pub const COMMAND_BYTES_MAX: u32 = 8 << 20;
/// Largest log entry: a batch is cut at `group::BATCH_BYTES_MAX` unless one command is larger.
pub const ENTRY_BYTES_MAX: u32 = COMMAND_BYTES_MAX + (2 << 20);
/// Smallest WAL segment: it must hold the largest entry.
pub const SEGMENT_BYTES_MIN: u64 = 16 << 20;
const _: () = assert!(SEGMENT_BYTES_MIN > ENTRY_BYTES_MAX as u64 + 8192);
const _: () = assert!(super::group::BATCH_BYTES_MAX < ENTRY_BYTES_MAX as usize);
/// Most hosts in the static map (a group has one replica per host; raft caps members).
pub const HOSTS_MAX: usize = crate::raft::MEMBERS_MAX;

/// One host of the static cluster map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddrs {
    pub id: u64,
    /// Core 0's peer address; core c listens on port + c.
    pub peer: SocketAddr,
    /// Core 0's client (RESP) address; core c listens on port + c.
    pub client: SocketAddr,
}

/// Where executors run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementMode {
    /// Pinned when the machine has a CPU per core of every host sharing it, else unbound.
    Auto,
    Pinned,
    Unbound,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub hosts: Vec<HostAddrs>,
    pub cores: u16,
    pub placement: PlacementMode,
    /// Identifies the cluster on peer connections.
    pub cluster_id: u64,
    pub tick_ms: u64,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    /// AppendEntries in flight per follower (pipeline window). Deep on purpose: a follower's
    /// persister takes every AppendEntries queued when its round starts, so everything the
    /// leader proposes during a round must already be there when it ends; with a shallow
    /// window (it was 2) the later proposals wait at the leader for the first ack and then for
    /// the follower's next round, one persist round more per write under load (the test
    /// `a_deep_window_keeps_writes_within_two_persist_rounds`). The leader sends at most one
    /// AppendEntries per follower per loop turn, and the bytes in flight are bounded by
    /// `max_uncommitted_bytes` and the transport's outbox, not by this count.
    pub inflight_msgs_max: usize,
    /// Entries per AppendEntries.
    pub entries_per_msg_max: usize,
    pub read_mode: ReadMode,
    /// Shards the key space is cut into (spread over the groups).
    pub shard_count: u16,
    /// Log bytes applied after which a group snapshots and compacts its log.
    pub snapshot_log_bytes: u64,
    /// WAL segment size.
    pub segment_bytes: u64,
    /// glommio io_memory per executor (RLIMIT_MEMLOCK is small on shared machines).
    pub io_memory_bytes: usize,
    /// Client connections per core.
    pub connections_max: usize,
    /// `--join SEED`: this host is not in `--initial-cluster`; it learns the cluster from the
    /// seed (any host's client address) on its first start, and from its data directory after
    /// (see `node::join`).
    pub join: Option<String>,
    /// Whether this host runs as a joined host (`--join`, or a data directory that says so):
    /// `hosts` then holds only this host, and it runs no static-map group and no controller
    /// replica. Set by `node::run` before the cores start.
    pub joined: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--initial-cluster entry {entry:?}: {why}")]
    ClusterEntry { entry: String, why: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("config file {path}: {why}")]
    File { path: PathBuf, why: String },
}

impl ServerConfig {
    /// Defaults for everything but the identity and the map.
    pub fn new(id: u64, data_dir: PathBuf, hosts: Vec<HostAddrs>, cores: u16) -> ServerConfig {
        ServerConfig {
            id,
            data_dir,
            hosts,
            cores,
            placement: PlacementMode::Auto,
            cluster_id: 0x7479_6e61_6d6f, // "tynamo"
            tick_ms: crate::raft::TICK_MS_DEFAULT,
            heartbeat_ms: 100,
            election_ms: 1_000,
            inflight_msgs_max: 32,
            entries_per_msg_max: 1024,
            read_mode: ReadMode::Safe,
            shard_count: 64,
            snapshot_log_bytes: 64 << 20,
            segment_bytes: 64 << 20,
            io_memory_bytes: 1 << 20,
            connections_max: 10_000,
            join: None,
            joined: false,
        }
    }

    pub fn me(&self) -> Option<&HostAddrs> {
        self.hosts.iter().find(|h| h.id == self.id)
    }

    pub fn host(&self, id: u64) -> Option<&HostAddrs> {
        self.hosts.iter().find(|h| h.id == id)
    }

    /// Whether this host is one of `--initial-cluster` (runs the static map's groups).
    pub fn initial_host(&self) -> bool {
        !self.joined
    }

    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.hosts.iter().map(|h| h.id).collect();
        v.sort_unstable();
        v
    }

    pub fn heartbeat_ticks(&self) -> u32 {
        (self.heartbeat_ms / self.tick_ms).max(1) as u32
    }

    pub fn election_ticks(&self) -> u32 {
        (self.election_ms / self.tick_ms).max(2) as u32
    }

    /// The group serving a shard: contiguous blocks of shards per group.
    pub fn shard_group(&self, shard: u16) -> u16 {
        ((u32::from(shard) * u32::from(self.cores)) / u32::from(self.shard_count)) as u16
    }

    pub fn group_shards(&self, group: u16) -> Vec<u16> {
        (0..self.shard_count)
            .filter(|&s| self.shard_group(s) == group)
            .collect()
    }

    /// Checks every value and their relations; the message names the one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.id == 0 {
            return bad("--id must be at least 1".into());
        }
        if self.cores == 0 || self.cores > CORES_MAX {
            return bad(format!(
                "--cores {} should be in 1..={CORES_MAX}",
                self.cores
            ));
        }
        if self.hosts.is_empty() || self.hosts.len() > HOSTS_MAX {
            return bad(format!(
                "{} hosts in --initial-cluster, should be 1..={HOSTS_MAX}",
                self.hosts.len()
            ));
        }
        let replication_max = usize::from(crate::controller::config::REPLICATION_MAX);
        if self.hosts.len() > replication_max {
            // Every group of the static map has a replica on every initial host, and the
            // controller's configuration caps replicas per group.
            return bad(format!(
                "{} hosts in --initial-cluster, at most {replication_max} (more hosts join later)",
                self.hosts.len()
            ));
        }
        let mut ids: Vec<u64> = self.hosts.iter().map(|h| h.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.hosts.len() || ids.first() == Some(&0) {
            return bad("host ids in --initial-cluster must be unique and non-zero".into());
        }
        if self.me().is_none() {
            return bad(format!("--id {} is not in --initial-cluster", self.id));
        }
        // Every listener of the map with its user, so a collision names both.
        let mut listeners: Vec<(SocketAddr, u64, u16, &str)> = Vec::new();
        for h in &self.hosts {
            for (base, kind) in [(h.peer, "peer"), (h.client, "client")] {
                if u32::from(base.port()) + u32::from(self.cores) > 65_536 || base.port() == 0 {
                    return bad(format!(
                        "host {}: {kind} port {} + {} cores leaves the port range",
                        h.id,
                        base.port(),
                        self.cores
                    ));
                }
                for c in 0..self.cores {
                    listeners.push((SocketAddr::new(base.ip(), base.port() + c), h.id, c, kind));
                }
            }
        }
        listeners.sort_unstable();
        if let Some(w) = listeners.windows(2).find(|w| w[0].0 == w[1].0) {
            let (addr, h1, c1, k1) = w[0];
            let (_, h2, c2, k2) = w[1];
            return bad(format!(
                "address {addr} is both host {h1} core {c1}'s {k1} port and host {h2} core \
                 {c2}'s {k2} port (core c listens on base port + c, so hosts sharing an IP \
                 need base ports at least --cores {} apart, e.g. 10 apart as `tynamo demo` \
                 uses: 1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,...)",
                self.cores
            ));
        }
        if self.tick_ms == 0 || self.heartbeat_ms < self.tick_ms {
            return bad(format!(
                "tick {} ms must be non-zero and at most the heartbeat {} ms",
                self.tick_ms, self.heartbeat_ms
            ));
        }
        if self.election_ms <= self.heartbeat_ms {
            return bad(format!(
                "election timeout {} ms must be above the heartbeat {} ms",
                self.election_ms, self.heartbeat_ms
            ));
        }
        if self.inflight_msgs_max == 0 || self.entries_per_msg_max == 0 {
            return bad("window and entries per message must be at least 1".into());
        }
        if self.shard_count < self.cores || self.shard_count > SLOT_COUNT {
            return bad(format!(
                "shard count {} should be in {}..={SLOT_COUNT} (at least one per group)",
                self.shard_count, self.cores
            ));
        }
        if self.io_memory_bytes < (512 << 10) {
            return bad(format!(
                "io memory {} bytes is below glommio's 512 KiB minimum",
                self.io_memory_bytes
            ));
        }
        if self.segment_bytes < SEGMENT_BYTES_MIN || self.segment_bytes % 4096 != 0 {
            return bad(format!(
                "segment bytes {} should be a multiple of 4096, at least {SEGMENT_BYTES_MIN}",
                self.segment_bytes
            ));
        }
        if self.connections_max == 0 {
            return bad("connections max must be at least 1".into());
        }
        Ok(())
    }
}

/// Parses `1=127.0.0.1:7101,2=127.0.0.1:7102` or `1=127.0.0.1:7101/127.0.0.1:7001,...`.
pub fn parse_initial_cluster(text: &str) -> Result<Vec<HostAddrs>, ConfigError> {
    let mut hosts = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let err = |why: &str| ConfigError::ClusterEntry {
            entry: entry.to_string(),
            why: why.to_string(),
        };
        let (id, addrs) = entry
            .split_once('=')
            .ok_or_else(|| err("expected id=addr"))?;
        let id: u64 = id.trim().parse().map_err(|_| err("id is not a number"))?;
        let (peer, client) = match addrs.split_once('/') {
            Some((p, c)) => (p, Some(c)),
            None => (addrs, None),
        };
        let peer: SocketAddr = peer
            .trim()
            .parse()
            .map_err(|_| err("peer address is not ip:port"))?;
        let client: SocketAddr = match client {
            Some(c) => c
                .trim()
                .parse()
                .map_err(|_| err("client address is not ip:port"))?,
            None => {
                let port = peer
                    .port()
                    .checked_sub(CLIENT_PORT_BELOW_PEER)
                    .filter(|p| *p > 0)
                    .ok_or_else(|| err("peer port too low to derive the client port"))?;
                SocketAddr::new(peer.ip(), port)
            }
        };
        hosts.push(HostAddrs { id, peer, client });
    }
    Ok(hosts)
}

/// Renders the map back in the form `parse_initial_cluster` reads.
pub fn format_initial_cluster(hosts: &[HostAddrs]) -> String {
    hosts
        .iter()
        .map(|h| format!("{}={}/{}", h.id, h.peer, h.client))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_forms_parse_and_client_port_is_derived() {
        let hosts =
            parse_initial_cluster("1=127.0.0.1:7101,2=127.0.0.1:7102/127.0.0.1:9002").unwrap();
        assert_eq!(hosts[0].client, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(hosts[1].client, "127.0.0.1:9002".parse().unwrap());
        assert_eq!(
            parse_initial_cluster(&format_initial_cluster(&hosts)).unwrap(),
            hosts
        );
        assert!(parse_initial_cluster("1=nope").is_err());
        assert!(parse_initial_cluster("x=127.0.0.1:1").is_err());
        assert!(parse_initial_cluster("1=127.0.0.1:50").is_err());
    }

    #[test]
    fn validate_names_the_value_at_fault() {
        let hosts = parse_initial_cluster("1=127.0.0.1:7101,2=127.0.0.1:7102").unwrap();
        let mut c = ServerConfig::new(1, "/tmp/x".into(), hosts.clone(), 1);
        c.validate().unwrap();
        // Two cores: host 1's core 1 ports (7002, 7102) collide with host 2's core 0.
        c.cores = 2;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains(
                "127.0.0.1:7002 is both host 1 core 1's client port and host 2 core 0's client port"
            ),
            "{e}"
        );
        // The issue's example: host 1 core 1's client port 7002 is host 2 core 0's.
        let issue =
            parse_initial_cluster("1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103").unwrap();
        let e = ServerConfig::new(1, "/tmp/x".into(), issue, 2)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host 1 core 1") && e.contains("host 2 core 0"),
            "{e}"
        );
        // The layout the error and --help suggest works.
        let spaced = parse_initial_cluster(
            "1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,3=127.0.0.1:7121/127.0.0.1:7021",
        )
        .unwrap();
        ServerConfig::new(2, "/tmp/x".into(), spaced, 2)
            .validate()
            .unwrap();
        let mut c = ServerConfig::new(3, "/tmp/x".into(), hosts, 1);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--id 3"), "{e}");
        c.id = 1;
        c.election_ms = 50;
        assert!(c.validate().unwrap_err().to_string().contains("election"));
    }

    #[test]
    fn shards_spread_evenly_in_contiguous_blocks() {
        let hosts = parse_initial_cluster("1=127.0.0.1:7101").unwrap();
        let mut c = ServerConfig::new(1, "/tmp/x".into(), hosts, 3);
        c.shard_count = 64;
        let sizes: Vec<usize> = (0..3).map(|g| c.group_shards(g).len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 64);
        assert!(sizes.iter().all(|&s| s == 21 || s == 22), "{sizes:?}");
        for g in 0..3 {
            let s = c.group_shards(g);
            assert_eq!(s.last().unwrap() - s[0] + 1, s.len() as u16, "contiguous");
        }
    }
}
