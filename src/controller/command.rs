//! Controller commands (what clients propose) and replies (what apply returns), with their
//! versioned binary encodings.
//!
//! ```text
//! command := version:u8 (=1) client_id:u64 seq:u64 op_code:u8 op_body
//!   1 Join           count:u32 (1..=JOIN_HOSTS_MAX) (host_id:u64 cores:u16 addr:(len:u8 utf8))*
//!   2 Leave          count:u32 (1..=JOIN_HOSTS_MAX) host_id:u64*
//!   3 Move           shard:u16 group:u64
//!   4 Query          num:i64 (-1 = latest)
//!   5 SetController  count:u32 (1..=7) (host_id:u64 core:u16)*
//! reply   := version:u8 (=1) code:u8 body
//!   1 Ok             num:u64             (the configuration the operation produced)
//!   2 Config         configuration       (see config.rs)
//!   3 Err            error_code:u8 a:u64 b:u64 text:(len:u32 utf8)
//! ```
//!
//! `client_id` 0 means "no session": the operation is applied without duplicate detection.
//! A client with a session sends one operation at a time with increasing `seq` and retries
//! with the same `seq` until it gets an answer; the controller applies it once.

use thiserror::Error;

use super::codec::{
    put_bytes32, put_count, put_text8, put_u16, put_u64, put_u8, DecodeError, Reader,
};
use super::config::{
    put_slot, read_slot, Configuration, GroupId, HostId, Slot, ADDR_BYTES_MAX, REPLICATION_MAX,
};

/// Encoding version of commands and replies.
pub const COMMAND_FORMAT_VERSION: u8 = 1;
/// Hosts one Join or Leave may name.
pub const JOIN_HOSTS_MAX: usize = 64;
/// Bytes of the text of an error reply.
pub const ERROR_TEXT_BYTES_MAX: usize = 1_024;

const OP_JOIN: u8 = 1;
const OP_LEAVE: u8 = 2;
const OP_MOVE: u8 = 3;
const OP_QUERY: u8 = 4;
const OP_SET_CONTROLLER: u8 = 5;

const REPLY_OK: u8 = 1;
const REPLY_CONFIG: u8 = 2;
const REPLY_ERR: u8 = 3;

/// A host joining the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    pub id: HostId,
    pub cores: u16,
    pub addr: String,
}

/// One controller operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// New hosts: groups are created on their cores and shards rebalanced onto them.
    Join { hosts: Vec<HostSpec> },
    /// Hosts being retired: every group with a replica on one of them is removed, its shards
    /// move to the remaining groups (the retiring replicas hand them over, see
    /// `shard::migration`), and new groups fill the cores left free.
    Leave { hosts: Vec<HostId> },
    /// One shard to one group (an operator override; the next Join or Leave rebalances).
    Move { shard: u16, group: GroupId },
    /// Configuration `num`, or the latest with -1.
    Query { num: i64 },
    /// Records where the controller's replicas now run (the runtime changes the controller's
    /// Raft membership one server at a time, then records the result here).
    SetController { slots: Vec<Slot> },
}

impl Op {
    pub fn is_read(&self) -> bool {
        matches!(self, Op::Query { .. })
    }
}

/// A command as proposed through the controller's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The client's session id; 0 = no session.
    pub client_id: u64,
    /// The client's sequence number (1, 2, ...), one operation at a time.
    pub seq: u64,
    pub op: Op,
}

/// The deterministic refusal of an operation: the state did not change. Every replica computes
/// the same one.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ControllerError {
    #[error("host {host} is not in the cluster")]
    UnknownHost { host: HostId },
    #[error("host {host} is already in the cluster")]
    HostExists { host: HostId },
    #[error("host {host} is named twice")]
    DuplicateHost { host: HostId },
    #[error("host {host} runs controller replica {node_id}: move the controller first")]
    HostRunsController { host: HostId, node_id: u64 },
    #[error("group {group} does not exist")]
    UnknownGroup { group: GroupId },
    #[error("shard {shard} is out of range (shard count {shard_count})")]
    ShardOutOfRange { shard: u16, shard_count: u16 },
    #[error("configuration {num} does not exist (latest {latest})")]
    NoSuchConfig { num: i64, latest: u64 },
    #[error("configuration {num} was discarded (oldest kept {oldest})")]
    Compacted { num: u64, oldest: u64 },
    #[error("leaving would remove every group ({groups} groups), so shards would have no owner")]
    NoGroupLeft { groups: u64 },
    #[error("sequence {seq} of client {client_id} is below its last applied sequence")]
    StaleSequence { client_id: u64, seq: u64 },
    #[error("the result would be an invalid configuration: {reason}")]
    Invalid { reason: String },
    #[error("malformed command in entry {index}: {reason}")]
    BadCommand { index: u64, reason: String },
}

impl ControllerError {
    fn code_and_fields(&self) -> (u8, u64, u64, &str) {
        match self {
            ControllerError::UnknownHost { host } => (1, *host, 0, ""),
            ControllerError::HostExists { host } => (2, *host, 0, ""),
            ControllerError::DuplicateHost { host } => (3, *host, 0, ""),
            ControllerError::HostRunsController { host, node_id } => (4, *host, *node_id, ""),
            ControllerError::UnknownGroup { group } => (5, *group, 0, ""),
            ControllerError::ShardOutOfRange { shard, shard_count } => {
                (6, u64::from(*shard), u64::from(*shard_count), "")
            }
            ControllerError::NoSuchConfig { num, latest } => (7, *num as u64, *latest, ""),
            ControllerError::Compacted { num, oldest } => (8, *num, *oldest, ""),
            ControllerError::NoGroupLeft { groups } => (9, *groups, 0, ""),
            ControllerError::StaleSequence { client_id, seq } => (10, *client_id, *seq, ""),
            ControllerError::Invalid { reason } => (11, 0, 0, reason),
            ControllerError::BadCommand { index, reason } => (12, *index, 0, reason),
        }
    }

    fn from_fields(
        offset: usize,
        code: u8,
        a: u64,
        b: u64,
        text: String,
    ) -> Result<Self, DecodeError> {
        let small = |v: u64, what: &'static str| {
            u16::try_from(v).map_err(|_| DecodeError::Unknown {
                offset,
                what,
                value: v,
            })
        };
        Ok(match code {
            1 => ControllerError::UnknownHost { host: a },
            2 => ControllerError::HostExists { host: a },
            3 => ControllerError::DuplicateHost { host: a },
            4 => ControllerError::HostRunsController {
                host: a,
                node_id: b,
            },
            5 => ControllerError::UnknownGroup { group: a },
            6 => ControllerError::ShardOutOfRange {
                shard: small(a, "shard")?,
                shard_count: small(b, "shard count")?,
            },
            7 => ControllerError::NoSuchConfig {
                num: a as i64,
                latest: b,
            },
            8 => ControllerError::Compacted { num: a, oldest: b },
            9 => ControllerError::NoGroupLeft { groups: a },
            10 => ControllerError::StaleSequence {
                client_id: a,
                seq: b,
            },
            11 => ControllerError::Invalid { reason: text },
            12 => ControllerError::BadCommand {
                index: a,
                reason: text,
            },
            code => {
                return Err(DecodeError::Unknown {
                    offset,
                    what: "error code",
                    value: u64::from(code),
                })
            }
        })
    }
}

/// What applying a command returns to its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The operation produced configuration `num`.
    Ok {
        num: u64,
    },
    /// The configuration a Query asked for.
    Config(Configuration),
    Err(ControllerError),
}

impl Command {
    /// Encodes the command. Panics on a command over the format's bounds (a programmer error:
    /// [`Command::check_bounds`] says whether a command built from user input fits).
    pub fn encode(&self) -> Vec<u8> {
        if let Err(e) = self.check_bounds() {
            panic!("command over the format bounds: {e}");
        }
        let mut out = Vec::with_capacity(32);
        put_u8(&mut out, COMMAND_FORMAT_VERSION);
        put_u64(&mut out, self.client_id);
        put_u64(&mut out, self.seq);
        match &self.op {
            Op::Join { hosts } => {
                put_u8(&mut out, OP_JOIN);
                put_count(&mut out, hosts.len());
                for h in hosts {
                    put_u64(&mut out, h.id);
                    put_u16(&mut out, h.cores);
                    put_text8(&mut out, &h.addr);
                }
            }
            Op::Leave { hosts } => {
                put_u8(&mut out, OP_LEAVE);
                put_count(&mut out, hosts.len());
                for &h in hosts {
                    put_u64(&mut out, h);
                }
            }
            Op::Move { shard, group } => {
                put_u8(&mut out, OP_MOVE);
                put_u16(&mut out, *shard);
                put_u64(&mut out, *group);
            }
            Op::Query { num } => {
                put_u8(&mut out, OP_QUERY);
                put_u64(&mut out, *num as u64);
            }
            Op::SetController { slots } => {
                put_u8(&mut out, OP_SET_CONTROLLER);
                put_count(&mut out, slots.len());
                for &slot in slots {
                    put_slot(&mut out, slot);
                }
            }
        }
        out
    }

    /// Whether the command fits the encoding's bounds (counts, address lengths).
    pub fn check_bounds(&self) -> Result<(), ControllerError> {
        let invalid = |reason: String| Err(ControllerError::Invalid { reason });
        match &self.op {
            Op::Join { hosts } => {
                if hosts.is_empty() || hosts.len() > JOIN_HOSTS_MAX {
                    return invalid(format!(
                        "join of {} hosts, should be 1..={JOIN_HOSTS_MAX}",
                        hosts.len()
                    ));
                }
                if let Some(h) = hosts.iter().find(|h| h.addr.len() > ADDR_BYTES_MAX) {
                    return invalid(format!(
                        "host {} address of {} bytes exceeds {ADDR_BYTES_MAX}",
                        h.id,
                        h.addr.len()
                    ));
                }
            }
            Op::Leave { hosts } => {
                if hosts.is_empty() || hosts.len() > JOIN_HOSTS_MAX {
                    return invalid(format!(
                        "leave of {} hosts, should be 1..={JOIN_HOSTS_MAX}",
                        hosts.len()
                    ));
                }
            }
            Op::SetController { slots } => {
                if slots.is_empty() || slots.len() > usize::from(REPLICATION_MAX) {
                    return invalid(format!(
                        "{} controller replicas, should be 1..={REPLICATION_MAX}",
                        slots.len()
                    ));
                }
            }
            Op::Move { .. } | Op::Query { .. } => {}
        }
        Ok(())
    }

    /// Decodes a command. Never panics: anything that is not a valid encoding is an error with
    /// the offset where decoding stopped.
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != COMMAND_FORMAT_VERSION {
            return Err(DecodeError::Unknown {
                offset: 0,
                what: "command version",
                value: u64::from(version),
            });
        }
        let client_id = r.u64()?;
        let seq = r.u64()?;
        let op_offset = r.offset();
        let op = match r.u8()? {
            OP_JOIN => {
                let count = nonzero(&mut r, "joining host", JOIN_HOSTS_MAX)?;
                let mut hosts = Vec::with_capacity(count);
                for _ in 0..count {
                    let id = r.u64()?;
                    let cores = r.u16()?;
                    let addr = r.text8()?;
                    hosts.push(HostSpec { id, cores, addr });
                }
                Op::Join { hosts }
            }
            OP_LEAVE => {
                let count = nonzero(&mut r, "leaving host", JOIN_HOSTS_MAX)?;
                let mut hosts = Vec::with_capacity(count);
                for _ in 0..count {
                    hosts.push(r.u64()?);
                }
                Op::Leave { hosts }
            }
            OP_MOVE => Op::Move {
                shard: r.u16()?,
                group: r.u64()?,
            },
            OP_QUERY => Op::Query { num: r.i64()? },
            OP_SET_CONTROLLER => {
                let count = nonzero(&mut r, "controller replica", usize::from(REPLICATION_MAX))?;
                let mut slots = Vec::with_capacity(count);
                for _ in 0..count {
                    slots.push(read_slot(&mut r)?);
                }
                Op::SetController { slots }
            }
            code => {
                return Err(DecodeError::Unknown {
                    offset: op_offset,
                    what: "op code",
                    value: u64::from(code),
                })
            }
        };
        r.finish()?;
        Ok(Command { client_id, seq, op })
    }
}

fn nonzero(r: &mut Reader<'_>, what: &'static str, count_max: usize) -> Result<usize, DecodeError> {
    let offset = r.offset();
    let count = r.count(what, count_max)?;
    if count == 0 {
        return Err(DecodeError::TooMany {
            offset,
            what,
            count: 0,
            count_max: count_max as u64,
        });
    }
    Ok(count)
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        put_u8(&mut out, COMMAND_FORMAT_VERSION);
        match self {
            Reply::Ok { num } => {
                put_u8(&mut out, REPLY_OK);
                put_u64(&mut out, *num);
            }
            Reply::Config(config) => {
                put_u8(&mut out, REPLY_CONFIG);
                config.encode(&mut out);
            }
            Reply::Err(error) => {
                put_u8(&mut out, REPLY_ERR);
                let (code, a, b, text) = error.code_and_fields();
                put_u8(&mut out, code);
                put_u64(&mut out, a);
                put_u64(&mut out, b);
                // Texts are built by us from bounded parts; cut at a char boundary if long.
                let mut end = text.len().min(ERROR_TEXT_BYTES_MAX);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                put_bytes32(&mut out, &text.as_bytes()[..end]);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Reply, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != COMMAND_FORMAT_VERSION {
            return Err(DecodeError::Unknown {
                offset: 0,
                what: "reply version",
                value: u64::from(version),
            });
        }
        let code_offset = r.offset();
        let reply = match r.u8()? {
            REPLY_OK => Reply::Ok { num: r.u64()? },
            REPLY_CONFIG => Reply::Config(Configuration::read(&mut r)?),
            REPLY_ERR => {
                let offset = r.offset();
                let code = r.u8()?;
                let a = r.u64()?;
                let b = r.u64()?;
                let text_offset = r.offset();
                let text = r.bytes32("error text byte", ERROR_TEXT_BYTES_MAX)?;
                let text = String::from_utf8(text.to_vec()).map_err(|_| DecodeError::BadText {
                    offset: text_offset,
                })?;
                Reply::Err(ControllerError::from_fields(offset, code, a, b, text)?)
            }
            code => {
                return Err(DecodeError::Unknown {
                    offset: code_offset,
                    what: "reply code",
                    value: u64::from(code),
                })
            }
        };
        r.finish()?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands() -> Vec<Command> {
        let ops = vec![
            Op::Join {
                hosts: vec![
                    HostSpec {
                        id: 4,
                        cores: 2,
                        addr: "10.0.0.4:7000".into(),
                    },
                    HostSpec {
                        id: 5,
                        cores: 16,
                        addr: "h5:1".into(),
                    },
                ],
            },
            Op::Leave { hosts: vec![2, 9] },
            Op::Move {
                shard: 63,
                group: 7,
            },
            Op::Query { num: -1 },
            Op::Query { num: 12 },
            Op::SetController {
                slots: vec![Slot { host: 1, core: 0 }, Slot { host: 4, core: 1 }],
            },
        ];
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| Command {
                client_id: 77,
                seq: i as u64 + 1,
                op,
            })
            .collect()
    }

    #[test]
    fn commands_round_trip_and_truncations_fail() {
        for c in commands() {
            let bytes = c.encode();
            assert_eq!(Command::decode(&bytes).unwrap(), c);
            for len in 0..bytes.len() {
                assert!(
                    Command::decode(&bytes[..len]).is_err(),
                    "{c:?} prefix {len}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(1);
            assert!(Command::decode(&longer).is_err());
        }
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let valid: Vec<Vec<u8>> = commands().iter().map(Command::encode).collect();
        for i in 0..20_000 {
            let mut bytes = valid[i % valid.len()].clone();
            let flips = rng.gen_range(1..4);
            for _ in 0..flips {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.gen();
            }
            let _ = Command::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }
        // A count field forged to the maximum is refused before allocating.
        let mut forged = vec![COMMAND_FORMAT_VERSION];
        forged.extend_from_slice(&[0; 16]);
        forged.push(OP_LEAVE);
        forged.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Command::decode(&forged),
            Err(DecodeError::TooMany { offset: 18, .. })
        ));
    }

    #[test]
    fn replies_round_trip() {
        let replies = vec![
            Reply::Ok { num: 5 },
            Reply::Config(Configuration::initial(16, 3)),
            Reply::Err(ControllerError::UnknownHost { host: 3 }),
            Reply::Err(ControllerError::ShardOutOfRange {
                shard: 70,
                shard_count: 64,
            }),
            Reply::Err(ControllerError::NoSuchConfig { num: -5, latest: 3 }),
            Reply::Err(ControllerError::Invalid {
                reason: "host 3 has 0 cores".into(),
            }),
        ];
        for reply in replies {
            let bytes = reply.encode();
            assert_eq!(Reply::decode(&bytes).unwrap(), reply);
            for len in 0..bytes.len() {
                assert!(Reply::decode(&bytes[..len]).is_err());
            }
        }
    }
}
