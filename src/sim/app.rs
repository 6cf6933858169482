//! The application a simulated replica runs. The KV service plugs its state machine in here.

use bytes::Bytes;

use crate::raft::{Entry, EntryKind, Index, Snapshot};

/// A replicated state machine as the simulator drives it. One value per replica; a crashed
/// replica loses it and gets a fresh one (`Default`, or the cluster's factory:
/// `Cluster::with_app`), restored from its durable snapshot.
pub trait App {
    /// Applies one committed entry (entries arrive in index order, no gaps, each once per
    /// incarnation after the snapshot it was restored from). Returns the result the proposer
    /// receives. An `Err` is a broken invariant: the simulation fails with it.
    fn apply(&mut self, entry: &Entry) -> Result<Bytes, String>;
    /// Serialises the state after the last applied entry.
    fn snapshot(&self) -> Bytes;
    /// Replaces the state with a snapshot's.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String>;
}

/// The default application: a running hash over every applied entry, which also checks that
/// entries arrive in order. Two replicas that applied the same prefix hold the same hash.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct HashApp {
    pub applied: Index,
    pub hash: u64,
    pub commands: u64,
}

pub(crate) fn mix(mut h: u64, v: u64) -> u64 {
    h ^= v
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(h << 6)
        .wrapping_add(h >> 2);
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

pub(crate) fn hash_bytes(data: &[u8]) -> u64 {
    // FNV-1a: deterministic on every platform, fast enough for the simulator.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(crate) fn entry_hash(e: &Entry) -> u64 {
    let kind = match e.kind {
        EntryKind::Normal => 1,
        EntryKind::Noop => 2,
        EntryKind::Conf => 3,
    };
    mix(mix(mix(e.term, kind), e.index), hash_bytes(&e.data))
}

impl App for HashApp {
    fn apply(&mut self, entry: &Entry) -> Result<Bytes, String> {
        if entry.index != self.applied + 1 {
            return Err(format!(
                "apply out of order: got index {} after {}",
                entry.index, self.applied
            ));
        }
        self.applied = entry.index;
        self.hash = mix(self.hash, entry_hash(entry));
        if entry.kind == EntryKind::Normal {
            self.commands += 1;
        }
        Ok(Bytes::copy_from_slice(&self.hash.to_le_bytes()))
    }

    fn snapshot(&self) -> Bytes {
        let mut out = Vec::with_capacity(24);
        out.extend_from_slice(&self.applied.to_le_bytes());
        out.extend_from_slice(&self.hash.to_le_bytes());
        out.extend_from_slice(&self.commands.to_le_bytes());
        Bytes::from(out)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let d = &snapshot.data;
        if d.len() != 24 {
            return Err(format!(
                "snapshot at {} has {} bytes, want 24",
                snapshot.meta.index,
                d.len()
            ));
        }
        let word = |i: usize| u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let applied = word(0);
        if applied != snapshot.meta.index {
            return Err(format!(
                "snapshot data at {} claims index {}",
                snapshot.meta.index, applied
            ));
        }
        *self = HashApp {
            applied,
            hash: word(1),
            commands: word(2),
        };
        Ok(())
    }
}
