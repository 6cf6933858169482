//! The result of one command, handed back by the driver to the waiting client.

use bytes::Bytes;

use super::error::KvError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Put, MPut, OpenSession, CloseSession.
    Ok,
    /// Get: the value, or None when the key is missing.
    Value(Option<Bytes>),
    /// MGet: one value per key, in the order asked.
    Values(Vec<Option<Bytes>>),
    /// Incr (new value), Append (new length), Delete and Exists (0 or 1).
    Int(i64),
    /// Cas: whether it swapped.
    Bool(bool),
    /// The command did not change the state.
    Err(KvError),
}

impl Outcome {
    pub fn is_err(&self) -> bool {
        matches!(self, Outcome::Err(_))
    }
}

/// The small results of writes that a session remembers: no values, so a session entry is a few
/// bytes whatever the payload sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Ok,
    Int(i64),
    Bool(bool),
}

impl WriteResult {
    /// The remembered form of a successful write outcome; None for errors and read results,
    /// which sessions do not remember (an error changed nothing, so re-executing its retry is
    /// still exactly-once).
    pub fn from_outcome(outcome: &Outcome) -> Option<WriteResult> {
        match outcome {
            Outcome::Ok => Some(WriteResult::Ok),
            Outcome::Int(n) => Some(WriteResult::Int(*n)),
            Outcome::Bool(b) => Some(WriteResult::Bool(*b)),
            Outcome::Value(_) | Outcome::Values(_) | Outcome::Err(_) => None,
        }
    }

    pub fn to_outcome(self) -> Outcome {
        match self {
            WriteResult::Ok => Outcome::Ok,
            WriteResult::Int(n) => Outcome::Int(n),
            WriteResult::Bool(b) => Outcome::Bool(b),
        }
    }
}
