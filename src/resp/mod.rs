//! The RESP (Redis serialization protocol) layer shared by the server and the client.
//!
//! - [`frame`]: incremental, size-capped RESP2/RESP3 parser and allocation-free encoders.
//! - [`command`]: typed commands parsed from a request, with Redis' own error wording, and the
//!   exactly-once session extension (`TYNAMO.SESSION`, `TYNAMO.SEQ`).
//! - [`reply`]: replies whose shape tools depend on: `CLUSTER SLOTS|SHARDS|NODES|INFO`,
//!   `-MOVED`/`-ASK`/`-TRYAGAIN`, `HELLO`, byte-compatible with Redis 7.

pub mod command;
pub mod frame;
pub mod reply;

pub use command::{Command, CommandError, Request};
pub use frame::{Frame, Limits, Protocol, ProtocolError};
