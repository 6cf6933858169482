//! The glommio runtime: one executor per core, the peer transport, timers and the Ready loop that
//! drives each group's sans-IO Raft node against its WAL.

pub mod codec;
pub mod transport;
