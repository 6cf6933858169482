//! Client errors: each says which peer, and whether retrying can help.

use crate::resp::ProtocolError;
use std::io;
use std::net::SocketAddr;

/// What went wrong talking to a RESP server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid address '{address}': {why}")]
    BadAddress { address: String, why: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to {addr} timed out after {after_ms} ms")]
    ConnectTimeout { addr: SocketAddr, after_ms: u64 },
    #[error("i/o error talking to {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("{addr} did not answer within {after_ms} ms")]
    Timeout { addr: SocketAddr, after_ms: u64 },
    #[error("{addr} closed the connection with {in_flight} replies outstanding")]
    Closed { addr: SocketAddr, in_flight: usize },
    #[error("{addr} answered garbage (Protocol error: {source})")]
    Protocol {
        addr: SocketAddr,
        source: ProtocolError,
    },
    #[error("{addr} answered '{reply}' to {request}, which is not a valid reply to it")]
    Unexpected {
        addr: SocketAddr,
        request: &'static str,
        reply: String,
    },
    #[error("{addr} refused: {message}")]
    Server { addr: SocketAddr, message: String },
    #[error("more than {in_flight_max} requests in flight on {addr}")]
    TooManyInFlight {
        addr: SocketAddr,
        in_flight_max: usize,
    },
    #[error("no seed node answered CLUSTER SLOTS (last error: {last})")]
    NoSlotMap { last: String },
    #[error("slot {slot} has no owner in the slot map")]
    SlotUnowned { slot: u16 },
    #[error("gave up after {attempts} attempts ({redirects} redirects); last: {last}")]
    RetriesExhausted {
        attempts: u32,
        redirects: u32,
        last: String,
    },
}

impl ClientError {
    /// Whether the same request may succeed if re-sent (on a new connection, after a backoff).
    /// Garbage and refusals are not retried: re-sending would get the same answer.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::ConnectTimeout { .. }
                | ClientError::Io { .. }
                | ClientError::Timeout { .. }
                | ClientError::Closed { .. }
        )
    }

    /// The peer this error is about, when there is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            ClientError::Connect { addr, .. }
            | ClientError::ConnectTimeout { addr, .. }
            | ClientError::Io { addr, .. }
            | ClientError::Timeout { addr, .. }
            | ClientError::Closed { addr, .. }
            | ClientError::Protocol { addr, .. }
            | ClientError::Unexpected { addr, .. }
            | ClientError::Server { addr, .. }
            | ClientError::TooManyInFlight { addr, .. } => Some(*addr),
            _ => None,
        }
    }
}

/// Resolves `host:port` (a name or an IP) to its first socket address.
pub fn resolve(address: &str) -> Result<SocketAddr, ClientError> {
    use std::net::ToSocketAddrs;
    let bad = |why: String| ClientError::BadAddress {
        address: address.to_string(),
        why,
    };
    let mut addrs = address.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| bad("resolves to no address".to_string()))
}
