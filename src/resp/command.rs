//! Typed commands: what a request (an array of arguments) means, with errors worded exactly as
//! Redis words them, so that redis-cli, redis-benchmark and client libraries behave as with Redis.
//!
//! One command is parsed in one place ([`Request::parse`]); the server maps each variant onto a
//! KV operation, and the client encodes the same types ([`Request::encode`]), so the two cannot
//! drift apart.
//!
//! # Exactly-once writes (the `TYNAMO.*` session extension)
//!
//! A retried write (after a timeout, a lost connection or a leader change) must be applied once.
//! Following the Raft thesis (Ongaro, section 6.3), a client that wants this opens a session and
//! numbers its writes; plain Redis clients never send these commands and get at-least-once
//! behaviour for their own retries, as with Redis.
//!
//! - `TYNAMO.SESSION <client-id>` (once per connection, on every connection the client opens):
//!   `client-id` is a non-zero u64 the client draws at random when it starts (64 random bits make
//!   collisions negligible). Reply `+OK`. A Redis server answers `-ERR unknown command`, which
//!   tells our client that exactly-once is not available there and to send plain writes.
//! - `TYNAMO.SEQ <seq> <first-unacked> <write command...>`: wraps one write (SET, APPEND, DEL,
//!   INCR, MSET). `seq` numbers the client's writes from 1, strictly increasing, one per write,
//!   across all its connections; a retry re-sends the *same* `seq`. `first-unacked` is the lowest
//!   `seq` the client has not yet seen a reply for, so the server may drop the cached replies of
//!   every `seq < first-unacked` (a pipelining client has many writes in flight, so one "last
//!   seq" per client is not enough). The reply is the wrapped command's reply.
//!
//! Server contract: the (client id, seq) pair travels with the write through the Raft log; the
//! state machine applies a write only if its seq has not been applied for that client, and keeps
//! the reply of every applied seq `>= first-unacked`; a duplicate gets the cached reply. The dedup
//! table is part of the snapshot. If the server no longer knows a session (expired) and
//! `first-unacked > 1`, it must answer `-SESSIONEXPIRED ...` instead of applying, because it can no
//! longer tell whether the write was applied; the client reports that to its caller.

use super::frame::{format_i64, parse_i64, put_array_len, put_bulk, put_bulk_decimal, Protocol};
use bytes::{Bytes, BytesMut};
use std::fmt;

/// Most arguments a single command may carry (also capped by the frame parser's array limit).
pub const ARGS_MAX: usize = 1024 * 1024;

/// `SET` conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetCondition {
    #[default]
    Always,
    /// `NX`: only if the key does not exist.
    IfAbsent,
    /// `XX`: only if the key exists.
    IfPresent,
}

/// `SET` expiry options. Parsed so that errors are precise; the server may reject them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Seconds(u64),
    Millis(u64),
    UnixSeconds(u64),
    UnixMillis(u64),
    KeepTtl,
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT t|PXAT t|KEEPTTL]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub key: Bytes,
    pub value: Bytes,
    pub condition: SetCondition,
    /// `GET`: reply with the old value instead of `+OK`.
    pub get: bool,
    pub expiry: Option<Expiry>,
}

/// `CLUSTER <subcommand>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterCommand {
    Slots,
    Shards,
    Nodes,
    KeySlot(Bytes),
    MyId,
    Info,
}

/// `COMMAND [COUNT | DOCS ... | INFO ...]`: enough for redis-cli and redis-benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandQuery {
    List,
    Count,
    Docs(Vec<Bytes>),
    Info(Vec<Bytes>),
}

/// One command the server supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ping(Option<Bytes>),
    Echo(Bytes),
    Hello {
        /// `None`: keep the connection's protocol (the reply still describes the server).
        protocol: Option<Protocol>,
        auth: Option<(Bytes, Bytes)>,
        client_name: Option<Bytes>,
    },
    Command(CommandQuery),
    Get(Bytes),
    Set(Set),
    Append {
        key: Bytes,
        value: Bytes,
    },
    Del(Vec<Bytes>),
    Exists(Vec<Bytes>),
    Incr(Bytes),
    MGet(Vec<Bytes>),
    MSet(Vec<(Bytes, Bytes)>),
    Info(Vec<Bytes>),
    Cluster(ClusterCommand),
    ReadOnly,
    ReadWrite,
    Asking,
    Quit,
    /// `TYNAMO.SESSION <client-id>`.
    Session(u64),
}

/// The (seq, first-unacked) pair of `TYNAMO.SEQ`; see the module comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    pub seq: u64,
    pub first_unacked: u64,
}

/// A parsed request: a command, and its sequence when it came wrapped in `TYNAMO.SEQ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub sequence: Option<Sequence>,
    pub command: Command,
}

/// Why a request was refused. `Display` is the error reply's text (after the `-`), worded as
/// Redis 7 words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// The command name and up to 128 bytes of its arguments, as Redis echoes them.
    Unknown {
        name: String,
        args: String,
    },
    /// Lower-case full name, e.g. `get` or `cluster|keyslot`.
    WrongArity(&'static str),
    UnknownSubcommand {
        sub: String,
        command: &'static str,
    },
    Syntax,
    NotInteger,
    InvalidExpire(&'static str),
    NoProto,
    /// An unknown `HELLO` option (echoed as Redis echoes it).
    HelloOption(String),
    /// Any other refusal (a malformed `TYNAMO.SEQ`, a bad `HELLO` version): the text after `ERR `.
    Invalid(&'static str),
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Unknown { name, args } => {
                write!(
                    f,
                    "ERR unknown command '{name}', with args beginning with: {args}"
                )
            }
            CommandError::WrongArity(name) => {
                write!(f, "ERR wrong number of arguments for '{name}' command")
            }
            CommandError::UnknownSubcommand { sub, command } => {
                write!(f, "ERR unknown subcommand '{sub}'. Try {command} HELP.")
            }
            CommandError::Syntax => write!(f, "ERR syntax error"),
            CommandError::NotInteger => write!(f, "ERR value is not an integer or out of range"),
            CommandError::InvalidExpire(name) => {
                write!(f, "ERR invalid expire time in '{name}' command")
            }
            CommandError::NoProto => write!(f, "NOPROTO unsupported protocol version"),
            CommandError::HelloOption(opt) => write!(f, "ERR Syntax error in HELLO option '{opt}'"),
            CommandError::Invalid(why) => write!(f, "ERR {why}"),
        }
    }
}

impl std::error::Error for CommandError {}

/// Redis truncates echoed names and arguments at 128 bytes.
const ECHO_BYTES_MAX: usize = 128;

fn lossy_prefix(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

fn unknown(args: &[Bytes]) -> CommandError {
    // As Redis' processCommand: append `'arg' ` while the text is shorter than 128 bytes.
    let mut echoed = String::new();
    for arg in &args[1..] {
        if echoed.len() >= ECHO_BYTES_MAX {
            break;
        }
        let room = ECHO_BYTES_MAX - echoed.len();
        echoed.push('\'');
        echoed.push_str(&lossy_prefix(arg, room));
        echoed.push_str("' ");
    }
    CommandError::Unknown {
        name: lossy_prefix(&args[0], ECHO_BYTES_MAX),
        args: echoed,
    }
}

fn is(arg: &[u8], name: &str) -> bool {
    arg.eq_ignore_ascii_case(name.as_bytes())
}

/// The full u64 range (session ids are random u64s), digits only, no sign, no leading zero.
fn parse_u64(arg: &[u8]) -> Result<u64, CommandError> {
    let canonical =
        !arg.is_empty() && arg.iter().all(u8::is_ascii_digit) && (arg.len() == 1 || arg[0] != b'0');
    if !canonical {
        return Err(CommandError::NotInteger);
    }
    arg.iter()
        .try_fold(0u64, |acc, &d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(CommandError::NotInteger)
}

/// Checks Redis' arity convention: `n >= 0` exact, `n < 0` at least `-n` (name included).
fn arity(args: &[Bytes], n: i32, name: &'static str) -> Result<(), CommandError> {
    let len = args.len();
    let ok = if n >= 0 {
        len == n as usize
    } else {
        len >= n.unsigned_abs() as usize
    };
    if ok && len <= ARGS_MAX {
        Ok(())
    } else {
        Err(CommandError::WrongArity(name))
    }
}

impl Request {
    /// Parses `args` (name first). Names are case-insensitive; keys and values are kept as the
    /// `Bytes` given (no copy).
    pub fn parse(args: &[Bytes]) -> Result<Request, CommandError> {
        let Some(name) = args.first() else {
            return Err(CommandError::Syntax);
        };
        if !is(name, "TYNAMO.SEQ") {
            return Command::parse(args).map(|command| Request {
                sequence: None,
                command,
            });
        }
        if args.len() < 4 {
            return Err(CommandError::WrongArity("tynamo.seq"));
        }
        let seq = parse_u64(&args[1])?;
        let first_unacked = parse_u64(&args[2])?;
        if seq == 0 || first_unacked == 0 || first_unacked > seq {
            return Err(CommandError::Invalid(
                "TYNAMO.SEQ needs 0 < first-unacked <= seq",
            ));
        }
        let command = Command::parse(&args[3..])?;
        if !command.is_write() {
            return Err(CommandError::Invalid("TYNAMO.SEQ wraps only writes"));
        }
        Ok(Request {
            sequence: Some(Sequence { seq, first_unacked }),
            command,
        })
    }

    /// Appends this request in wire form (an array of bulk strings).
    pub fn encode(&self, out: &mut BytesMut) {
        let mut count = self.command.arg_count();
        if self.sequence.is_some() {
            count += 3;
        }
        put_array_len(out, count);
        if let Some(s) = self.sequence {
            put_bulk(out, b"TYNAMO.SEQ");
            put_bulk_u64(out, s.seq);
            put_bulk_u64(out, s.first_unacked);
        }
        self.command.for_each_arg(&mut |arg| put_bulk(out, arg));
    }
}

/// Numbers in commands come from i64-range parsing, so they never exceed i64::MAX.
fn put_bulk_u64(out: &mut BytesMut, value: u64) {
    put_bulk_decimal(out, i64::try_from(value).unwrap_or(i64::MAX));
}

impl Command {
    /// Parses a plain (unwrapped) command.
    pub fn parse(args: &[Bytes]) -> Result<Command, CommandError> {
        let Some(name) = args.first() else {
            return Err(CommandError::Syntax);
        };
        let n = name.as_ref();
        let key = |i: usize| args[i].clone();
        if is(n, "GET") {
            arity(args, 2, "get")?;
            Ok(Command::Get(key(1)))
        } else if is(n, "SET") {
            arity(args, -3, "set")?;
            parse_set(args).map(Command::Set)
        } else if is(n, "PING") {
            arity(args, -1, "ping")?;
            match args.len() {
                1 => Ok(Command::Ping(None)),
                2 => Ok(Command::Ping(Some(key(1)))),
                _ => Err(CommandError::WrongArity("ping")),
            }
        } else if is(n, "ECHO") {
            arity(args, 2, "echo")?;
            Ok(Command::Echo(key(1)))
        } else if is(n, "APPEND") {
            arity(args, 3, "append")?;
            Ok(Command::Append {
                key: key(1),
                value: key(2),
            })
        } else if is(n, "DEL") {
            arity(args, -2, "del")?;
            Ok(Command::Del(args[1..].to_vec()))
        } else if is(n, "EXISTS") {
            arity(args, -2, "exists")?;
            Ok(Command::Exists(args[1..].to_vec()))
        } else if is(n, "INCR") {
            arity(args, 2, "incr")?;
            Ok(Command::Incr(key(1)))
        } else if is(n, "MGET") {
            arity(args, -2, "mget")?;
            Ok(Command::MGet(args[1..].to_vec()))
        } else if is(n, "MSET") {
            arity(args, -3, "mset")?;
            if args.len() % 2 == 0 {
                return Err(CommandError::WrongArity("mset"));
            }
            Ok(Command::MSet(
                args[1..]
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect(),
            ))
        } else if is(n, "INFO") {
            arity(args, -1, "info")?;
            Ok(Command::Info(args[1..].to_vec()))
        } else if is(n, "HELLO") {
            arity(args, -1, "hello")?;
            parse_hello(args)
        } else if is(n, "COMMAND") {
            arity(args, -1, "command")?;
            parse_command_query(args).map(Command::Command)
        } else if is(n, "CLUSTER") {
            arity(args, -2, "cluster")?;
            parse_cluster(args).map(Command::Cluster)
        } else if is(n, "READONLY") {
            arity(args, 1, "readonly")?;
            Ok(Command::ReadOnly)
        } else if is(n, "READWRITE") {
            arity(args, 1, "readwrite")?;
            Ok(Command::ReadWrite)
        } else if is(n, "ASKING") {
            arity(args, 1, "asking")?;
            Ok(Command::Asking)
        } else if is(n, "QUIT") {
            Ok(Command::Quit)
        } else if is(n, "TYNAMO.SESSION") {
            arity(args, 2, "tynamo.session")?;
            match parse_u64(&args[1])? {
                0 => Err(CommandError::Invalid(
                    "TYNAMO.SESSION needs a non-zero client id",
                )),
                id => Ok(Command::Session(id)),
            }
        } else {
            Err(unknown(args))
        }
    }

    /// Whether the command changes data (and so goes through the Raft log, and may be wrapped
    /// in `TYNAMO.SEQ`).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Set(_)
                | Command::Append { .. }
                | Command::Del(_)
                | Command::Incr(_)
                | Command::MSet(_)
        )
    }

    /// The first key, which decides the slot (multi-key commands must stay in one slot).
    pub fn first_key(&self) -> Option<&Bytes> {
        match self {
            Command::Get(k) | Command::Incr(k) | Command::Append { key: k, .. } => Some(k),
            Command::Set(s) => Some(&s.key),
            Command::Del(ks) | Command::Exists(ks) | Command::MGet(ks) => ks.first(),
            Command::MSet(pairs) => pairs.first().map(|(k, _)| k),
            _ => None,
        }
    }

    /// Number of wire arguments, name included.
    pub fn arg_count(&self) -> usize {
        let mut n = 0;
        self.for_each_arg(&mut |_| n += 1);
        n
    }

    /// Calls `f` with each wire argument in order (the inverse of [`Command::parse`]).
    pub fn for_each_arg(&self, f: &mut dyn FnMut(&[u8])) {
        let number = |f: &mut dyn FnMut(&[u8]), v: u64| {
            let mut scratch = [0u8; 20];
            f(format_i64(
                i64::try_from(v).unwrap_or(i64::MAX),
                &mut scratch,
            ));
        };
        match self {
            Command::Ping(msg) => {
                f(b"PING");
                if let Some(m) = msg {
                    f(m);
                }
            }
            Command::Echo(m) => {
                f(b"ECHO");
                f(m);
            }
            Command::Hello {
                protocol,
                auth,
                client_name,
            } => {
                f(b"HELLO");
                if let Some(p) = protocol {
                    f(match p {
                        Protocol::Resp2 => b"2",
                        Protocol::Resp3 => b"3",
                    });
                }
                if let Some((user, pass)) = auth {
                    f(b"AUTH");
                    f(user);
                    f(pass);
                }
                if let Some(name) = client_name {
                    f(b"SETNAME");
                    f(name);
                }
            }
            Command::Command(q) => {
                f(b"COMMAND");
                match q {
                    CommandQuery::List => {}
                    CommandQuery::Count => f(b"COUNT"),
                    CommandQuery::Docs(names) | CommandQuery::Info(names) => {
                        f(if matches!(q, CommandQuery::Docs(_)) {
                            b"DOCS"
                        } else {
                            b"INFO"
                        });
                        names.iter().for_each(|n| f(n));
                    }
                }
            }
            Command::Get(k) => {
                f(b"GET");
                f(k);
            }
            Command::Set(s) => {
                f(b"SET");
                f(&s.key);
                f(&s.value);
                match s.condition {
                    SetCondition::Always => {}
                    SetCondition::IfAbsent => f(b"NX"),
                    SetCondition::IfPresent => f(b"XX"),
                }
                if s.get {
                    f(b"GET");
                }
                match s.expiry {
                    None => {}
                    Some(Expiry::KeepTtl) => f(b"KEEPTTL"),
                    Some(Expiry::Seconds(v)) => {
                        f(b"EX");
                        number(f, v);
                    }
                    Some(Expiry::Millis(v)) => {
                        f(b"PX");
                        number(f, v);
                    }
                    Some(Expiry::UnixSeconds(v)) => {
                        f(b"EXAT");
                        number(f, v);
                    }
                    Some(Expiry::UnixMillis(v)) => {
                        f(b"PXAT");
                        number(f, v);
                    }
                }
            }
            Command::Append { key, value } => {
                f(b"APPEND");
                f(key);
                f(value);
            }
            Command::Del(keys)
            | Command::Exists(keys)
            | Command::MGet(keys)
            | Command::Info(keys) => {
                f(match self {
                    Command::Del(_) => b"DEL",
                    Command::Exists(_) => b"EXISTS",
                    Command::MGet(_) => b"MGET",
                    _ => b"INFO",
                });
                keys.iter().for_each(|k| f(k));
            }
            Command::Incr(k) => {
                f(b"INCR");
                f(k);
            }
            Command::MSet(pairs) => {
                f(b"MSET");
                for (k, v) in pairs {
                    f(k);
                    f(v);
                }
            }
            Command::Cluster(c) => {
                f(b"CLUSTER");
                match c {
                    ClusterCommand::Slots => f(b"SLOTS"),
                    ClusterCommand::Shards => f(b"SHARDS"),
                    ClusterCommand::Nodes => f(b"NODES"),
                    ClusterCommand::MyId => f(b"MYID"),
                    ClusterCommand::Info => f(b"INFO"),
                    ClusterCommand::KeySlot(k) => {
                        f(b"KEYSLOT");
                        f(k);
                    }
                }
            }
            Command::ReadOnly => f(b"READONLY"),
            Command::ReadWrite => f(b"READWRITE"),
            Command::Asking => f(b"ASKING"),
            Command::Quit => f(b"QUIT"),
            Command::Session(id) => {
                f(b"TYNAMO.SESSION");
                number(f, *id);
            }
        }
    }
}

/// As Redis' `parseExtendedStringArgumentsOrReply`: an option may repeat (the last expiry
/// wins) but not conflict (NX with XX, KEEPTTL with an expiry, two kinds of expiry); the expiry
/// value is checked only after every option parsed, so a syntax error is reported first.
fn parse_set(args: &[Bytes]) -> Result<Set, CommandError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Unit {
        Ex,
        Px,
        ExAt,
        PxAt,
    }
    let mut set = Set {
        key: args[1].clone(),
        value: args[2].clone(),
        condition: SetCondition::Always,
        get: false,
        expiry: None,
    };
    let mut keep_ttl = false;
    let mut expire: Option<(Unit, &Bytes)> = None;
    let mut i = 3;
    while i < args.len() {
        let opt = &args[i];
        let next = args.get(i + 1);
        let unit = if is(opt, "EX") {
            Some(Unit::Ex)
        } else if is(opt, "PX") {
            Some(Unit::Px)
        } else if is(opt, "EXAT") {
            Some(Unit::ExAt)
        } else if is(opt, "PXAT") {
            Some(Unit::PxAt)
        } else {
            None
        };
        if is(opt, "NX") && set.condition != SetCondition::IfPresent {
            set.condition = SetCondition::IfAbsent;
        } else if is(opt, "XX") && set.condition != SetCondition::IfAbsent {
            set.condition = SetCondition::IfPresent;
        } else if is(opt, "GET") {
            set.get = true;
        } else if is(opt, "KEEPTTL") && expire.is_none() {
            keep_ttl = true;
        } else if let (Some(unit), Some(value)) = (unit, next) {
            if keep_ttl || expire.is_some_and(|(u, _)| u != unit) {
                return Err(CommandError::Syntax);
            }
            expire = Some((unit, value));
            i += 1;
        } else {
            return Err(CommandError::Syntax);
        }
        i += 1;
    }
    if keep_ttl {
        set.expiry = Some(Expiry::KeepTtl);
    }
    if let Some((unit, raw)) = expire {
        let v = parse_i64(raw).ok_or(CommandError::NotInteger)?;
        let seconds = matches!(unit, Unit::Ex | Unit::ExAt);
        if v <= 0 || (seconds && v > i64::MAX / 1000) {
            return Err(CommandError::InvalidExpire("set"));
        }
        let v = v as u64;
        set.expiry = Some(match unit {
            Unit::Ex => Expiry::Seconds(v),
            Unit::Px => Expiry::Millis(v),
            Unit::ExAt => Expiry::UnixSeconds(v),
            Unit::PxAt => Expiry::UnixMillis(v),
        });
    }
    Ok(set)
}

fn parse_hello(args: &[Bytes]) -> Result<Command, CommandError> {
    let mut protocol = None;
    let mut auth = None;
    let mut client_name = None;
    let mut i = 1;
    if let Some(v) = args.get(1) {
        let v = parse_i64(v).ok_or(CommandError::Invalid(
            "Protocol version is not an integer or out of range",
        ))?;
        protocol = Some(match v {
            2 => Protocol::Resp2,
            3 => Protocol::Resp3,
            _ => return Err(CommandError::NoProto),
        });
        i = 2;
    }
    while i < args.len() {
        if is(&args[i], "AUTH") && i + 2 < args.len() {
            auth = Some((args[i + 1].clone(), args[i + 2].clone()));
            i += 3;
        } else if is(&args[i], "SETNAME") && i + 1 < args.len() {
            client_name = Some(args[i + 1].clone());
            i += 2;
        } else {
            return Err(CommandError::HelloOption(lossy_prefix(
                &args[i],
                ECHO_BYTES_MAX,
            )));
        }
    }
    Ok(Command::Hello {
        protocol,
        auth,
        client_name,
    })
}

fn parse_command_query(args: &[Bytes]) -> Result<CommandQuery, CommandError> {
    let Some(sub) = args.get(1) else {
        return Ok(CommandQuery::List);
    };
    if is(sub, "COUNT") {
        arity(args, 2, "command|count")?;
        Ok(CommandQuery::Count)
    } else if is(sub, "DOCS") {
        Ok(CommandQuery::Docs(args[2..].to_vec()))
    } else if is(sub, "INFO") {
        Ok(CommandQuery::Info(args[2..].to_vec()))
    } else {
        Err(CommandError::UnknownSubcommand {
            sub: lossy_prefix(sub, ECHO_BYTES_MAX),
            command: "COMMAND",
        })
    }
}

fn parse_cluster(args: &[Bytes]) -> Result<ClusterCommand, CommandError> {
    let sub = &args[1];
    let simple = |name: &'static str, c: ClusterCommand| arity(args, 2, name).map(|_| c);
    if is(sub, "SLOTS") {
        simple("cluster|slots", ClusterCommand::Slots)
    } else if is(sub, "SHARDS") {
        simple("cluster|shards", ClusterCommand::Shards)
    } else if is(sub, "NODES") {
        simple("cluster|nodes", ClusterCommand::Nodes)
    } else if is(sub, "MYID") {
        simple("cluster|myid", ClusterCommand::MyId)
    } else if is(sub, "INFO") {
        simple("cluster|info", ClusterCommand::Info)
    } else if is(sub, "KEYSLOT") {
        arity(args, 3, "cluster|keyslot")?;
        Ok(ClusterCommand::KeySlot(args[2].clone()))
    } else {
        Err(CommandError::UnknownSubcommand {
            sub: lossy_prefix(sub, ECHO_BYTES_MAX),
            command: "CLUSTER",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    fn parse(words: &[&str]) -> Result<Request, CommandError> {
        Request::parse(&args(words))
    }

    fn err(words: &[&str]) -> String {
        parse(words).unwrap_err().to_string()
    }

    #[test]
    fn u64_arguments_cover_the_whole_range_and_nothing_else() {
        assert_eq!(parse_u64(b"0"), Ok(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_u64(b"9223372036854775808"), Ok(1 << 63));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"-1",
            b"+1",
            b"01",
            b" 1",
            b"1a",
        ] {
            assert_eq!(parse_u64(bad), Err(CommandError::NotInteger), "{bad:?}");
        }
    }

    #[test]
    fn errors_are_worded_as_redis() {
        assert_eq!(
            err(&["get"]),
            "ERR wrong number of arguments for 'get' command"
        );
        assert_eq!(
            err(&["GET", "a", "b"]),
            "ERR wrong number of arguments for 'get' command"
        );
        assert_eq!(
            err(&["FOO"]),
            "ERR unknown command 'FOO', with args beginning with: "
        );
        assert_eq!(
            err(&["foo", "a", "b"]),
            "ERR unknown command 'foo', with args beginning with: 'a' 'b' "
        );
        assert_eq!(
            err(&["mset", "a", "1", "b"]),
            "ERR wrong number of arguments for 'mset' command"
        );
        assert_eq!(
            err(&["cluster", "keyslot"]),
            "ERR wrong number of arguments for 'cluster|keyslot' command"
        );
        assert_eq!(
            err(&["cluster", "bogus"]),
            "ERR unknown subcommand 'bogus'. Try CLUSTER HELP."
        );
        assert_eq!(err(&["set", "k", "v", "NX", "XX"]), "ERR syntax error");
        assert_eq!(err(&["set", "k", "v", "EX"]), "ERR syntax error");
        assert_eq!(
            err(&["set", "k", "v", "EX", "x"]),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(
            err(&["set", "k", "v", "PX", "0"]),
            "ERR invalid expire time in 'set' command"
        );
        assert_eq!(err(&["hello", "4"]), "NOPROTO unsupported protocol version");
        assert_eq!(
            err(&["hello", "3", "FOO"]),
            "ERR Syntax error in HELLO option 'FOO'"
        );
        assert_eq!(
            err(&["hello", "x"]),
            "ERR Protocol version is not an integer or out of range"
        );
        assert_eq!(
            err(&["ping", "a", "b"]),
            "ERR wrong number of arguments for 'ping' command"
        );
    }

    #[test]
    fn unknown_command_echo_is_capped_like_redis() {
        let long = "x".repeat(300);
        let e = err(&["nope", &long, "second"]);
        // One argument truncated so that the echoed text stops growing at 128 bytes.
        assert_eq!(
            e,
            format!(
                "ERR unknown command 'nope', with args beginning with: '{}' ",
                "x".repeat(128)
            )
        );
    }

    #[test]
    fn set_options_parse() {
        let r = parse(&["set", "k", "v", "nx", "get", "px", "1500"]).unwrap();
        assert_eq!(
            r.command,
            Command::Set(Set {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
                condition: SetCondition::IfAbsent,
                get: true,
                expiry: Some(Expiry::Millis(1500)),
            })
        );
        assert!(r.command.is_write());
        // Repeats are allowed as Redis allows them; the last expiry wins.
        let repeated = parse(&[
            "set", "k", "v", "GET", "GET", "NX", "NX", "EX", "0", "EX", "5",
        ])
        .unwrap();
        let Command::Set(s) = repeated.command else {
            panic!()
        };
        assert_eq!(
            (s.get, s.condition, s.expiry),
            (true, SetCondition::IfAbsent, Some(Expiry::Seconds(5)))
        );
        assert_eq!(r.command.first_key().map(|k| &k[..]), Some(&b"k"[..]));
    }

    #[test]
    fn sequenced_writes_parse_and_reads_are_refused() {
        let r = parse(&["TYNAMO.SEQ", "7", "5", "INCR", "c"]).unwrap();
        assert_eq!(
            r.sequence,
            Some(Sequence {
                seq: 7,
                first_unacked: 5
            })
        );
        assert_eq!(r.command, Command::Incr(Bytes::from_static(b"c")));
        assert_eq!(
            err(&["TYNAMO.SEQ", "7", "5", "GET", "c"]),
            "ERR TYNAMO.SEQ wraps only writes"
        );
        assert_eq!(
            err(&["TYNAMO.SEQ", "5", "7", "INCR", "c"]),
            "ERR TYNAMO.SEQ needs 0 < first-unacked <= seq"
        );
        assert_eq!(
            err(&["TYNAMO.SEQ", "-1", "1", "INCR", "c"]),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(
            parse(&["tynamo.session", "99"]).unwrap().command,
            Command::Session(99)
        );
    }

    #[test]
    fn encode_then_parse_is_identity_for_examples() {
        for words in [
            &["PING"][..],
            &["SET", "k", "v", "XX", "GET", "EX", "10"],
            &["SET", "k", "v", "KEEPTTL"],
            &["MSET", "a", "1", "b", "2"],
            &["CLUSTER", "KEYSLOT", "foo"],
            &["HELLO", "3", "AUTH", "u", "p", "SETNAME", "n"],
            &["COMMAND", "DOCS", "get"],
            &["TYNAMO.SEQ", "3", "1", "DEL", "a", "b"],
        ] {
            let request = parse(words).unwrap();
            let mut out = BytesMut::new();
            request.encode(&mut out);
            let mut decoded = Vec::new();
            let limits = crate::resp::Limits::DEFAULT;
            assert!(crate::resp::frame::decode_request(&mut out, &limits, &mut decoded).unwrap());
            assert_eq!(Request::parse(&decoded).unwrap(), request, "{words:?}");
        }
    }
}
