//! Configuration of one replica, with every limit the core enforces.
//!
//! Time is in ticks. The runtime ticks every `TICK_MS_DEFAULT` ms, so the defaults give a 100 ms
//! heartbeat and a 1-2 s election timeout (etcd's defaults). An idle group of n voters sends
//! `2 * (n - 1)` messages per heartbeat interval (heartbeat + response per follower): 40 per
//! second for 3 replicas at the defaults.

use super::types::NodeId;

/// How long one tick is in the runtime (the core itself never reads a clock).
pub const TICK_MS_DEFAULT: u64 = 10;

/// How reads are confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex: every read (batched) waits for a heartbeat round acknowledged by a quorum.
    Safe,
    /// Leader lease: serve at once while a quorum acknowledged a heartbeat sent less than
    /// `election_ticks - lease_drift_ticks` ago. Requires CheckQuorum; falls back to Safe when
    /// the lease has expired.
    Lease,
}

/// Deliberate bugs, for tests only: each one breaks a safety rule so that a test can prove the
/// simulator's invariants catch it. Never set outside tests; all off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestBreakage {
    /// Lease reads ignore the lease's end: a leader serves reads locally as long as it leads.
    pub lease_never_expires: bool,
    /// A candidate counts its own vote before its term and vote are durable.
    pub count_own_vote_before_durable: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// Minimum election timeout; the actual one is drawn from `[election_ticks, 2 * election_ticks)`.
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub read_mode: ReadMode,
    /// Clock drift bound between replicas, in ticks: the lease is `election_ticks` minus this.
    pub lease_drift_ticks: u32,
    /// Entries per AppendEntries.
    pub max_entries_per_msg: usize,
    /// Payload bytes per AppendEntries (at least one entry is always sent, however large).
    pub max_bytes_per_msg: u64,
    /// AppendEntries in flight per follower in the replicate state (the pipeline window).
    pub max_inflight_msgs: usize,
    /// Bytes of proposed but uncommitted entries the leader accepts before refusing proposals.
    pub max_uncommitted_bytes: u64,
    /// Entries in one `propose` call.
    pub max_batch_entries: usize,
    /// Reads waiting for confirmation.
    pub max_pending_reads: usize,
    /// InstallSnapshot chunk size.
    pub snapshot_chunk_bytes: u64,
    /// Largest snapshot a follower accepts from the network.
    pub snapshot_size_bytes_max: u64,
    /// A learner may be promoted only when it is at most this many entries behind the leader.
    pub promote_lag_entries_max: u64,
    /// TEST ONLY: deliberate bugs (see [`TestBreakage`]). Leave at the default.
    pub test_breakage: TestBreakage,
}

impl Config {
    pub fn new(id: NodeId) -> Config {
        Config {
            id,
            election_ticks: 100,
            heartbeat_ticks: 10,
            pre_vote: true,
            check_quorum: true,
            read_mode: ReadMode::Safe,
            lease_drift_ticks: 10,
            max_entries_per_msg: 1024,
            max_bytes_per_msg: 1 << 20,
            max_inflight_msgs: 4,
            max_uncommitted_bytes: 64 << 20,
            max_batch_entries: 4096,
            max_pending_reads: 65536,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_size_bytes_max: 1 << 32,
            promote_lag_entries_max: 1024,
            test_breakage: TestBreakage::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        use ConfigError::*;
        if self.id == 0 {
            return Err(ZeroId);
        }
        if self.heartbeat_ticks == 0 {
            return Err(ZeroHeartbeat);
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return Err(ElectionNotAboveHeartbeat {
                election_ticks: self.election_ticks,
                heartbeat_ticks: self.heartbeat_ticks,
            });
        }
        if self.read_mode == ReadMode::Lease {
            if !self.check_quorum {
                return Err(LeaseWithoutCheckQuorum);
            }
            if self.lease_drift_ticks >= self.election_ticks {
                return Err(DriftNotBelowElection {
                    lease_drift_ticks: self.lease_drift_ticks,
                    election_ticks: self.election_ticks,
                });
            }
        }
        for (name, value) in [
            ("max_entries_per_msg", self.max_entries_per_msg as u64),
            ("max_bytes_per_msg", self.max_bytes_per_msg),
            ("max_inflight_msgs", self.max_inflight_msgs as u64),
            ("max_uncommitted_bytes", self.max_uncommitted_bytes),
            ("max_batch_entries", self.max_batch_entries as u64),
            ("max_pending_reads", self.max_pending_reads as u64),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
            ("snapshot_size_bytes_max", self.snapshot_size_bytes_max),
        ] {
            if value == 0 {
                return Err(ZeroLimit { name });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("node id must not be 0 (0 means none)")]
    ZeroId,
    #[error("heartbeat_ticks must be at least 1")]
    ZeroHeartbeat,
    #[error(
        "election_ticks {election_ticks} must be greater than heartbeat_ticks {heartbeat_ticks}"
    )]
    ElectionNotAboveHeartbeat {
        election_ticks: u32,
        heartbeat_ticks: u32,
    },
    #[error("lease reads need check_quorum (a leader that lost its quorum must step down)")]
    LeaseWithoutCheckQuorum,
    #[error("lease_drift_ticks {lease_drift_ticks} must be below election_ticks {election_ticks}")]
    DriftNotBelowElection {
        lease_drift_ticks: u32,
        election_ticks: u32,
    },
    #[error("{name} must be at least 1")]
    ZeroLimit { name: &'static str },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert_eq!(Config::new(1).validate(), Ok(()));
    }

    #[test]
    fn validate_names_the_bad_number() {
        let mut c = Config::new(1);
        c.election_ticks = 5;
        c.heartbeat_ticks = 5;
        let err = c.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "election_ticks 5 must be greater than heartbeat_ticks 5"
        );
        let mut c = Config::new(1);
        c.read_mode = ReadMode::Lease;
        c.check_quorum = false;
        assert_eq!(c.validate(), Err(ConfigError::LeaseWithoutCheckQuorum));
        let mut c = Config::new(1);
        c.max_inflight_msgs = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ZeroLimit {
                name: "max_inflight_msgs"
            })
        );
        assert_eq!(Config::new(0).validate(), Err(ConfigError::ZeroId));
    }
}
