//! The cluster-aware RESP client library (glommio: one client per executor, no locks).
//!
//! - [`Connection`]: one pipelined connection; requests queued, flushed in one write, replies
//!   read back in order; every wait bounded by a timeout.
//! - [`ClusterClient`]: routes keys to slot owners from `CLUSTER SLOTS`, executes a [`Batch`]
//!   pipelined across all owners, follows `-MOVED`/`-ASK`, retries `-TRYAGAIN` and lost
//!   connections with bounded backoff, and re-sends writes with the same exactly-once sequence.
//! - [`ClientError`]: what went wrong, with the peer's address.
//! - [`ctl`]: the blocking operator client behind `tynamo ctl` (`TYNAMO.CTL`, redirects to the
//!   controller leader, tables).
//!
//! It speaks to TynamoDB and to Redis (standalone or Redis Cluster) alike.

pub mod cluster;
pub mod connection;
pub mod ctl;
pub mod error;

pub use cluster::{Batch, ClientOptions, ClientStats, ClusterClient};
pub use connection::{ConnectOptions, Connection};
pub use error::{resolve, ClientError};

/// A glommio executor builder sized for a thread that only does network I/O: `io_memory` kept
/// small (RLIMIT_MEMLOCK is 8 MiB on our machines and every executor locks its own), unbound
/// placement (several processes share few CPUs), no spinning before parking.
pub fn network_executor(name: &str) -> glommio::LocalExecutorBuilder {
    /// glommio's minimum; network sockets do not use the registered buffers.
    const IO_MEMORY_BYTES: usize = 64 * 1024;
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name(name)
        .io_memory(IO_MEMORY_BYTES)
}
