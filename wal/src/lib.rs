//! tynamo-wal (docs below are filled in with the format).
mod error;
mod io;
mod log;
mod notify;
mod record;
mod segment;

pub use error::{Error, Result};
pub use log::{Entry, EntryRef, RecoveryReport, Wal, WalOptions, WalStats};
