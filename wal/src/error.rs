//! The crate's error type: every variant a caller can act on, with the file and offset.

use std::path::PathBuf;

/// Errors returned by the WAL, the hard-state file and the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed. `offset` is the byte offset in `path` when the call had one.
    #[error("{op} {path:?}{}: {source}", fmt_offset(*.offset))]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    /// fdatasync failed. The kernel may already have dropped the dirty pages, so what was
    /// written since the last good sync is in an unknown state: the log stops here (every later
    /// call returns [`Error::Poisoned`]) and must be reopened, which runs recovery.
    #[error("fdatasync {path:?} failed, the log is stopped: {source}")]
    SyncFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The log stopped after an earlier fatal error (see [`Error::SyncFailed`]).
    #[error("log in {dir:?} is stopped after an earlier fatal error: {reason}")]
    Poisoned { dir: PathBuf, reason: String },
    /// Data that was acknowledged as durable is damaged or missing: a bad record with valid
    /// records after it, a sealed segment without its seal, a bad header. Recovery refuses to
    /// guess: the node should refuse to start or repair this replica from its peers.
    #[error("corruption in {path:?} at offset {offset}: {reason}")]
    Corruption {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The caller broke the API contract (non-contiguous index, term going backwards, range
    /// outside the log, payload over the configured limit).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Configuration rejected by `validate`, naming the offending value.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// More bytes are staged for the next write than `staged_bytes_max`: await earlier appends.
    #[error("{staged_bytes} bytes staged, limit {staged_bytes_max}: await earlier appends first")]
    Busy {
        staged_bytes: usize,
        staged_bytes_max: usize,
    },
}

fn fmt_offset(offset: Option<u64>) -> String {
    match offset {
        Some(o) => format!(" at offset {o}"),
        None => String::new(),
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Builds a closure mapping any error convertible to `io::Error` into [`Error::Io`].
pub(crate) fn io_err<E: Into<std::io::Error>>(
    op: &'static str,
    path: &std::path::Path,
    offset: Option<u64>,
) -> impl FnOnce(E) -> Error {
    let path = path.to_path_buf();
    move |e| Error::Io {
        op,
        path,
        offset,
        source: e.into(),
    }
}
