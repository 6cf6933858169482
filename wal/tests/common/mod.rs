//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::future::Future;

use glommio::{LocalExecutorBuilder, Placement};
use tynamo_wal::{EntryRef, WalOptions};

/// Runs `f` on a fresh glommio executor with a small io_memory, so that `cargo test`'s
/// parallel threads stay under RLIMIT_MEMLOCK (8 MiB here).
pub fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(f)
        .expect("spawn executor")
        .join()
        .expect("executor panicked");
}

/// Small segments so that tests cross segment boundaries quickly.
pub fn small_opts() -> WalOptions {
    WalOptions {
        segment_bytes: 64 << 10,
        entry_bytes_max: 8 << 10,
        staged_bytes_max: 1 << 20,
        spare_segments_max: 2,
    }
}

/// Deterministic payload for (index, term): checkable after recovery.
pub fn payload(index: u64, term: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ term;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

#[derive(Clone, Debug)]
pub struct Owned {
    pub index: u64,
    pub term: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

impl Owned {
    pub fn new(index: u64, term: u64, len: usize) -> Owned {
        Owned {
            index,
            term,
            kind: (index % 7) as u8,
            payload: payload(index, term, len),
        }
    }

    pub fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            index: self.index,
            term: self.term,
            kind: self.kind,
            payload: &self.payload,
        }
    }
}
