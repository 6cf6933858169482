//! The durable side of one replica as the core sees it (etcd's `Storage`, with the write side
//! made explicit). The runtime's WAL implements it over segment files and a hard-state file;
//! the simulator's `SimDisk` implements it in memory. The core never calls it: the I/O shell
//! does, following the `Ready` contract in `core.rs`.

use super::core::InitialState;
use super::types::{Entry, HardState, Snapshot};

pub trait LogStore {
    type Error: std::fmt::Debug;

    /// Everything durable, to start a `RawNode` after a restart.
    fn initial_state(&self) -> Result<InitialState, Self::Error>;

    /// Makes one `Ready` write durable, in this order: install `snapshot` (and drop the whole
    /// stored log), truncate the stored log from `entries[0].index` and append `entries`, then
    /// store `hard_state`. Writes are applied in the order their `Ready`s were produced. An
    /// error is fatal for this log (an fsync error cannot be retried on Linux).
    fn write(
        &mut self,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
        hard_state: Option<HardState>,
    ) -> Result<(), Self::Error>;

    /// The service made `snapshot` durable: entries up to its index may be dropped.
    fn compact(&mut self, snapshot: Snapshot) -> Result<(), Self::Error>;
}
