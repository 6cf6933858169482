//! Sharding: key -> hash slot (Redis Cluster CRC16) -> shard, and (later) shard migration.

pub mod migration;
pub mod slots;

pub use slots::{key_shard, key_slot, shard_slots, slot_shard, SLOT_COUNT};
