//! The RESP (Redis serialization protocol) layer shared by the server and the client.
//!
//! - [`frame`]: incremental, size-capped RESP2/RESP3 parser and allocation-free encoders.
//! - [`command`]: typed commands parsed from a request, with Redis' own error wording, and the
//!   exactly-once session extension (`TYNAMO.SESSION`, `TYNAMO.SEQ`).

pub mod command;
pub mod frame;

pub use command::{Command, CommandError, Request};
pub use frame::{Frame, Limits, Protocol, ProtocolError};
