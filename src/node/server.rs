//! The RESP front door of one core: accepts client connections and maps each command onto the
//! core's group (one command in one place: `handle`).
//!
//! A connection reads what the socket has, parses every whole request in it, submits them all to
//! the group (which proposes them as one batch in its next turn), then writes the replies in
//! request order with one write. Pipelined requests are therefore answered in order and batched
//! into one proposal per loop turn.
//!
//! Routing: key -> slot -> shard -> group (`CoreCtx::target`): a group of this core that holds
//! the shard answers by its own log; a key of a group whose replica on another core of this
//! host leads is forwarded to that core over a glommio channel (`executor::CoreMsg`); one led
//! elsewhere gets `-MOVED` to that leader's core port (each core has its own port, so a cluster
//! client reaches the owning core directly after one `MOVED`). A key of a group of this core
//! on a follower gets `-MOVED` to the leader, or `-TRYAGAIN` while no leader is known.
//! Reads are linearizable (ReadIndex) unless the connection sent `READONLY`, in which case any
//! replica answers from its local state.
//!
//! Exactly-once: `TYNAMO.SESSION id` binds the connection to a client id; a `TYNAMO.SEQ` write
//! carries (id, seq) wherever it goes, forwarded to another core included, and the first one
//! the connection sends to a group is preceded in the same turn by the session's opening there.
//! `TYNAMO.CTL` (operator commands) is handed to `admin`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::kv::{Command as KvCommand, KvError, Op, Outcome};
use crate::raft::NodeId;
use crate::resp::command::{ClusterCommand, CommandQuery, SetCondition};
use crate::resp::frame::{
    decode_request, put_array_len, put_bulk, put_error, put_integer, put_null, put_simple,
};
use crate::resp::reply::{
    cluster_info_text, cluster_nodes_text, put_ask, put_cluster_shards, put_cluster_slots,
    put_hello, put_moved, put_text, NodeInfo, ServerHello, SlotRange, Topology,
    INFO_CLUSTER_SECTION,
};
use crate::resp::{Command, Limits, Protocol, Request};
use crate::shard::{key_slot, shard_slots, slot_shard};

use crate::controller::Configuration;

use super::config::ServerConfig;
use super::control::host_client_addr;
use super::executor::{CoreCtx, Forward, SessionWrite, Target};
use super::group::{GroupReply, ReplySlot};
use super::replica::CoreGroup;
use crate::controller::{GroupId as ConfigGroupId, Slot};
use crate::shard::migration::{Phase, Route};

/// Caps on client requests: values up to the KV's own limit, arrays up to the multi-key limit.
pub const CLIENT_LIMITS: Limits = Limits {
    bulk_bytes_max: 16 << 20,
    array_len_max: 4096,
    depth_max: 4,
    inline_bytes_max: 64 << 10,
};
/// Bytes asked of one read.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Requests answered per write round (pipelines longer than this are split into rounds).
const PIPELINE_MAX: usize = 4096;

/// How a group outcome becomes a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// GET: bulk or null.
    Value,
    /// SET, MSET, session: +OK.
    Ok,
    /// SET NX: +OK when set, null when not.
    OkIfSwapped,
    /// APPEND, INCR: the integer.
    Int,
    /// DEL, EXISTS over several keys: the sum.
    Sum,
    /// MGET: an array.
    Values,
}

enum Pending {
    Now(BytesMut),
    /// A `TYNAMO.CTL` request waiting on the controller group.
    Ctl {
        slot: ReplySlot<crate::controller::Reply>,
        render: super::admin::Render,
    },
    Wait {
        slots: Vec<ReplySlot>,
        shape: Shape,
        slot: u16,
        /// The configuration group that serves the slot, for redirections.
        group: ConfigGroupId,
    },
}

struct Conn {
    id: u64,
    protocol: Protocol,
    readonly: bool,
    /// The session this connection declared with `TYNAMO.SESSION` (0: none).
    client_id: u64,
    /// The groups an `OpenSession` for `client_id` was submitted to from this connection. A
    /// sequenced write to a group not in it is preceded by one in the same turn, so the
    /// session exists in every group the connection writes to, however it was routed (its own
    /// core, forwarded to another core, or a core that led only after the session command was
    /// answered with MOVED). Opening an open session only refreshes it. A handful of groups.
    sessions_opened: Vec<ConfigGroupId>,
    /// The previous command was `ASKING`: the client was sent here by a group that is handing
    /// the key's shard over. Until the shard arrives this host may not know of the move yet
    /// (its view of the configuration lags), and a MOVED back to the old owner would bounce
    /// the client between the two: it gets TRYAGAIN instead. Cleared by the next command.
    asking: bool,
    close: bool,
}

impl Conn {
    fn session_opened(&self, group: ConfigGroupId) -> bool {
        self.sessions_opened.contains(&group)
    }

    fn mark_session_opened(&mut self, group: ConfigGroupId) {
        if !self.session_opened(group) {
            self.sessions_opened.push(group);
        }
    }

    fn forget_session_opened(&mut self, group: ConfigGroupId) {
        self.sessions_opened.retain(|&g| g != group);
    }
}

pub async fn accept_loop(listener: TcpListener, ctx: Rc<CoreCtx>) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning on accept.
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if ctx.connections.get() >= ctx.cfg.connections_max {
            let mut s = stream;
            let _ = s.write_all(b"-ERR max number of clients reached\r\n").await;
            continue;
        }
        ctx.connections.set(ctx.connections.get() + 1);
        let ctx2 = ctx.clone();
        glommio::spawn_local(async move {
            serve_connection(&ctx2, stream).await;
            ctx2.connections.set(ctx2.connections.get() - 1);
        })
        .detach();
    }
}

async fn serve_connection(ctx: &CoreCtx, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let id = ctx.next_connection_id.get();
    ctx.next_connection_id.set(id + 1);
    let mut conn = Conn {
        id,
        protocol: Protocol::Resp2,
        readonly: false,
        client_id: 0,
        sessions_opened: Vec::new(),
        asking: false,
        close: false,
    };
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut wbuf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut args: Vec<Bytes> = Vec::new();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        rbuf.extend_from_slice(&chunk[..n]);
        loop {
            while pending.len() < PIPELINE_MAX && !conn.close {
                match decode_request(&mut rbuf, &CLIENT_LIMITS, &mut args) {
                    Ok(true) => {
                        let p = handle(ctx, &mut conn, &args);
                        match p {
                            Pending::Now(bytes) if pending.is_empty() => {
                                wbuf.extend_from_slice(&bytes)
                            }
                            other => pending.push_back(other),
                        }
                    }
                    Ok(false) => break,
                    Err(e) => {
                        let mut out = BytesMut::new();
                        put_error(&mut out, format!("ERR Protocol error: {e}").as_bytes());
                        pending.push_back(Pending::Now(out));
                        conn.close = true;
                    }
                }
            }
            let more = pending.len() >= PIPELINE_MAX;
            for p in pending.drain(..) {
                match p {
                    Pending::Now(bytes) => wbuf.extend_from_slice(&bytes),
                    Pending::Wait {
                        slots,
                        shape,
                        slot,
                        group,
                    } => {
                        if let [one] = &slots[..] {
                            let reply = one.wait().await;
                            put_reply(ctx, &mut conn, &mut wbuf, shape, (slot, group), [reply]);
                        } else {
                            let mut replies = Vec::with_capacity(slots.len());
                            for s in &slots {
                                replies.push(s.wait().await);
                            }
                            put_reply(ctx, &mut conn, &mut wbuf, shape, (slot, group), replies);
                        }
                    }
                    Pending::Ctl { slot, render } => {
                        let reply = slot.wait().await;
                        super::admin::render(ctx, render, reply, &mut wbuf);
                    }
                }
            }
            if !wbuf.is_empty() {
                if stream.write_all(&wbuf).await.is_err() {
                    return;
                }
                wbuf.clear();
            }
            if conn.close {
                let _ = stream.close().await;
                return;
            }
            if !more {
                break;
            }
        }
    }
}

fn now(f: impl FnOnce(&mut BytesMut)) -> Pending {
    let mut out = BytesMut::new();
    f(&mut out);
    Pending::Now(out)
}

fn error(text: &str) -> Pending {
    now(|o| put_error(o, text.as_bytes()))
}

fn handle(ctx: &CoreCtx, conn: &mut Conn, args: &[Bytes]) -> Pending {
    // ASKING applies to the command right after it, whatever that is.
    let asking = std::mem::take(&mut conn.asking);
    if args
        .first()
        .is_some_and(|name| name.eq_ignore_ascii_case(b"TYNAMO.CTL"))
    {
        return match super::admin::handle(ctx, &args[1..]) {
            super::admin::CtlPending::Now(out) => Pending::Now(out),
            super::admin::CtlPending::Wait { slot, render } => Pending::Ctl { slot, render },
        };
    }
    if args
        .first()
        .is_some_and(|name| name.eq_ignore_ascii_case(b"TYNAMO.MIGRATE"))
    {
        return Pending::Now(super::migrate::handle(ctx, &args[1..]));
    }
    let request = match Request::parse(args) {
        Ok(r) => r,
        Err(e) => return error(&e.to_string()),
    };
    let protocol = conn.protocol;
    match request.command {
        Command::Ping(None) => now(|o| put_simple(o, b"PONG")),
        Command::Ping(Some(m)) | Command::Echo(m) => now(|o| put_bulk(o, &m)),
        Command::Hello { protocol: p, .. } => {
            if let Some(p) = p {
                conn.protocol = p;
            }
            let leads = ctx
                .groups
                .all()
                .iter()
                .any(|e| e.group.borrow().is_leader());
            let role = if leads { "master" } else { "replica" };
            let hello = ServerHello {
                version: env!("CARGO_PKG_VERSION"),
                connection_id: conn.id,
                mode: "cluster",
                role,
            };
            let proto = conn.protocol;
            now(|o| put_hello(o, &hello, proto))
        }
        Command::Command(q) => match q {
            CommandQuery::Count => now(|o| put_integer(o, 0)),
            _ => now(|o| put_array_len(o, 0)),
        },
        Command::Info(sections) => {
            let text = info_sections(info_text(ctx), &sections);
            now(|o| put_text(o, &text, protocol))
        }
        Command::Cluster(sub) => cluster(ctx, sub, protocol),
        Command::ReadOnly => {
            conn.readonly = true;
            now(|o| put_simple(o, b"OK"))
        }
        Command::ReadWrite => {
            conn.readonly = false;
            now(|o| put_simple(o, b"OK"))
        }
        Command::Asking => {
            conn.asking = true;
            now(|o| put_simple(o, b"OK"))
        }
        Command::Quit => {
            conn.close = true;
            now(|o| put_simple(o, b"OK"))
        }
        Command::Session(client_id) => {
            if client_id == 0 {
                return error("ERR TYNAMO.SESSION needs a non-zero client id");
            }
            if conn.client_id != client_id {
                conn.client_id = client_id;
                conn.sessions_opened.clear();
            }
            // The session opens in this core's first group; a core without a group only binds
            // the id (the first sequenced write to each group opens it there anyway).
            let Some(entry) = ctx.groups.first() else {
                return now(|o| put_simple(o, b"OK"));
            };
            let gid = entry.view.id();
            let first_slot = group_first_slot(ctx, &entry);
            let mut g = entry.group.borrow_mut();
            if !g.is_leader() {
                // The connection keeps the client id: its first sequenced write to any group
                // opens the session there. The redirect names a slot of this core's group, so
                // a client that follows it (or updates its slot map) is sent where that group
                // is led; slot 0 would claim the wrong group for every core but core 0.
                return not_leader(ctx, gid, g.leader(), first_slot);
            }
            conn.mark_session_opened(gid);
            let slot = g.submit_write(KvCommand {
                client_id,
                seq: 0,
                op: Op::OpenSession,
            });
            Pending::Wait {
                slots: vec![slot],
                shape: Shape::Ok,
                slot: first_slot,
                group: gid,
            }
        }
        command => kv_command(ctx, conn, command, request.sequence.map(|s| s.seq), asking),
    }
}

/// Builds the KV ops of a data command, with its reply shape.
fn kv_ops(command: Command) -> Result<(Vec<Op>, Shape), String> {
    let unsupported = |what: &str| Err(format!("ERR {what} is not supported by TynamoDB"));
    Ok(match command {
        Command::Get(key) => (vec![Op::Get { key }], Shape::Value),
        Command::Set(set) => {
            if set.expiry.is_some() {
                return unsupported("SET with an expiry");
            }
            if set.get {
                return unsupported("SET ... GET");
            }
            match set.condition {
                SetCondition::Always => (
                    vec![Op::Put {
                        key: set.key,
                        value: set.value,
                    }],
                    Shape::Ok,
                ),
                SetCondition::IfAbsent => (
                    vec![Op::Cas {
                        key: set.key,
                        expected: None,
                        new: Some(set.value),
                    }],
                    Shape::OkIfSwapped,
                ),
                SetCondition::IfPresent => (
                    vec![Op::PutIfPresent {
                        key: set.key,
                        value: set.value,
                    }],
                    Shape::OkIfSwapped,
                ),
            }
        }
        Command::Append { key, value } => (vec![Op::Append { key, value }], Shape::Int),
        Command::Incr(key) => (vec![Op::Incr { key, delta: 1 }], Shape::Int),
        Command::Del(keys) => (
            keys.into_iter().map(|key| Op::Delete { key }).collect(),
            Shape::Sum,
        ),
        Command::Exists(keys) => (
            keys.into_iter().map(|key| Op::Exists { key }).collect(),
            Shape::Sum,
        ),
        Command::MGet(keys) => (vec![Op::MGet { keys }], Shape::Values),
        Command::MSet(pairs) => (vec![Op::MPut { pairs }], Shape::Ok),
        _ => return Err("ERR command not available here".into()),
    })
}

/// The keys an op names, in order.
fn op_keys(op: &Op) -> &[Bytes] {
    match op {
        Op::Get { key }
        | Op::Exists { key }
        | Op::Delete { key }
        | Op::Incr { key, .. }
        | Op::Put { key, .. }
        | Op::Append { key, .. }
        | Op::PutIfPresent { key, .. }
        | Op::Cas { key, .. } => std::slice::from_ref(key),
        Op::MGet { keys } => keys,
        // MPut's keys are checked through `mput_keys` (pairs, not a key slice).
        Op::MPut { .. } | Op::OpenSession | Op::CloseSession => &[],
    }
}

/// Every key of `ops`, in order.
fn all_keys(ops: &[Op]) -> impl Iterator<Item = &Bytes> {
    ops.iter().flat_map(|op| {
        let pairs: &[(Bytes, Bytes)] = match op {
            Op::MPut { pairs } => pairs,
            _ => &[],
        };
        op_keys(op).iter().chain(pairs.iter().map(|(k, _)| k))
    })
}

fn kv_command(
    ctx: &CoreCtx,
    conn: &mut Conn,
    command: Command,
    seq: Option<u64>,
    asking: bool,
) -> Pending {
    // After ASKING, "not here" means "not here yet" (see `Conn::asking`).
    let moved = |slot: u16, addr: SocketAddr| {
        if asking {
            error(&format!(
                "TRYAGAIN slot {slot} is on its way to the group that sent you here"
            ))
        } else {
            now(|o| put_moved(o, slot, addr))
        }
    };
    let (ops, shape) = match kv_ops(command) {
        Ok(x) => x,
        Err(e) => return error(&e),
    };
    let Some(first) = all_keys(&ops).next() else {
        return error("ERR wrong number of arguments");
    };
    if all_keys(&ops)
        .nth(crate::kv::MULTI_KEYS_MAX as usize)
        .is_some()
    {
        return error("ERR too many keys in one command");
    }
    let command_bytes: usize = ops.iter().map(op_bytes).sum();
    if command_bytes > super::config::COMMAND_BYTES_MAX as usize {
        return error(&format!(
            "ERR keys and values of one command exceed {} bytes",
            super::config::COMMAND_BYTES_MAX
        ));
    }
    if all_keys(&ops).any(|k| k.len() > KEY_BYTES_MAX) {
        return error(&format!("ERR keys must be at most {KEY_BYTES_MAX} bytes"));
    }
    let slot = key_slot(first);
    if all_keys(&ops).skip(1).any(|k| key_slot(k) != slot) {
        return error("CROSSSLOT Keys in request don't hash to the same slot");
    }
    let cfg = &ctx.cfg;
    let shard = slot_shard(slot, cfg.shard_count);
    let is_write = ops.iter().any(Op::is_write);
    let session = match seq {
        Some(seq) => {
            if conn.client_id == 0 {
                return error("ERR TYNAMO.SEQ needs TYNAMO.SESSION first on this connection");
            }
            if ops.len() != 1 || !is_write {
                return error("ERR TYNAMO.SEQ wraps a write of one key (or one MSET)");
            }
            Some(SessionWrite {
                client_id: conn.client_id,
                seq,
            })
        }
        None => None,
    };
    let entry = match ctx.target(shard) {
        Target::Local(entry) => entry,
        Target::Core {
            core,
            group,
            leader_here,
            leader,
        } => {
            let stale = conn.readonly && !is_write;
            // The group lives on another core of this host: forward when that core can answer
            // (it leads, or the read may be stale). A sequenced write travels with its client
            // id and seq, preceded by the session's opening the first time this connection
            // writes to that group.
            if leader_here || stale {
                let open_session = session.is_some() && !conn.session_opened(group);
                let forward = Forward {
                    group,
                    ops,
                    write: is_write,
                    stale,
                    session,
                    open_session,
                };
                return match ctx.forward(core, forward) {
                    Some(slots) => {
                        if open_session {
                            conn.mark_session_opened(group);
                        }
                        Pending::Wait {
                            slots,
                            shape,
                            slot,
                            group,
                        }
                    }
                    None => error(&format!(
                        "TRYAGAIN core {core} is not accepting forwarded requests now"
                    )),
                };
            }
            // Led elsewhere: MOVED to the leader's core, or, while the leader is unknown, to
            // this host's core of that group, which knows more.
            let to = leader.unwrap_or(Slot { host: cfg.id, core });
            return match ctx.slot_client_addr(to) {
                Some(addr) => moved(slot, addr),
                None => tryagain(slot),
            };
        }
        Target::Remote(addr) => {
            return match addr {
                Some(addr) => moved(slot, addr),
                None => tryagain(slot),
            }
        }
    };
    let own = entry.view.id();
    let mut g = entry.group.borrow_mut();
    if !is_write && conn.readonly {
        let replies: Vec<GroupReply> = ops
            .iter()
            .map(|op| GroupReply::Done(g.stale_read(op)))
            .collect();
        drop(g);
        let mut out = BytesMut::new();
        put_reply(ctx, conn, &mut out, shape, (slot, own), replies);
        return Pending::Now(out);
    }
    if !g.is_leader() {
        // Sent here by an ASK: the shard is not this node's to claim in the client's slot
        // map, so point at this group's leader with another ASK. A MOVED would make the
        // client route the slot to the new group before the move is done, and the old owner
        // would bounce it straight back.
        if asking && g.leader() != 0 {
            if let Some(addr) = ctx.node_addr(own, g.leader()) {
                return now(|o| put_ask(o, slot, addr));
            }
        }
        return not_leader(ctx, own, g.leader(), slot);
    }
    // The leader's applied migration state decides; the KV state machine refuses a write to a
    // shard that is not Serving when it applies, so a route that changes between here and the
    // commit costs the client a retry, never a write in the wrong group.
    match g.machine().shards.route(shard) {
        Route::Serve => {}
        Route::TryAgain => {
            return error(&format!(
                "TRYAGAIN shard {shard} (slot {slot}) is arriving at this group"
            ))
        }
        Route::Ask { group } => {
            return match ctx.group_addr(group, None) {
                Some(addr) => now(|o| put_ask(o, slot, addr)),
                None => tryagain(slot),
            }
        }
        Route::Moved { group } => {
            // The controller already gave this group the shard but the group has not accepted
            // that configuration yet: a MOVED back to the old owner would only bounce the
            // client between the two (and use up its redirections); it should wait instead.
            let coming = ctx
                .view
                .latest_config()
                .is_some_and(|c| c.owner(shard) == Some(own));
            if coming {
                return error(&format!(
                    "TRYAGAIN shard {shard} (slot {slot}) is being handed to this group"
                ));
            }
            return match ctx.group_addr(group, None) {
                Some(addr) if group != own => moved(slot, addr),
                _ => error(&format!(
                    "TRYAGAIN shard {shard} (slot {slot}) has no owner in this group's configuration yet"
                )),
            };
        }
    }
    if let Some(session) = session {
        if !conn.session_opened(own) {
            conn.mark_session_opened(own);
            // Its reply is not awaited: the write behind it in the same turn answers for both.
            let _ = g.submit_write(session.open());
        }
    }
    let (client_id, seq) = session.map_or((0, 0), |s| (s.client_id, s.seq));
    let slots = ops
        .into_iter()
        .map(|op| {
            if is_write {
                g.submit_write(KvCommand { client_id, seq, op })
            } else {
                g.submit_read(op)
            }
        })
        .collect();
    Pending::Wait {
        slots,
        shape,
        slot,
        group: own,
    }
}

/// The first slot of a group's shards, for redirections that are about the group, not a key.
fn group_first_slot(ctx: &CoreCtx, entry: &CoreGroup) -> u16 {
    let held = entry
        .group
        .borrow()
        .machine()
        .shards
        .shards()
        .next()
        .map(|(s, _)| s);
    let shard = held.or_else(|| {
        let config = ctx.view.latest_config()?;
        config.shards_of(entry.view.id()).first().copied()
    });
    shard.map_or(0, |s| shard_slots(s, ctx.cfg.shard_count).0)
}

/// The KV's key limit (its default configuration).
const KEY_BYTES_MAX: usize = 64 << 10;

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put { key, value } | Op::Append { key, value } | Op::PutIfPresent { key, value } => {
            key.len() + value.len()
        }
        Op::Cas { key, new, .. } => key.len() + new.as_ref().map_or(0, |v| v.len()),
        Op::MPut { pairs } => pairs.iter().map(|(k, v)| k.len() + v.len()).sum(),
        Op::MGet { keys } => keys.iter().map(|k| k.len()).sum(),
        Op::Get { key } | Op::Exists { key } | Op::Delete { key } | Op::Incr { key, .. } => {
            key.len()
        }
        Op::OpenSession | Op::CloseSession => 0,
    }
}

fn tryagain(slot: u16) -> Pending {
    error(&format!(
        "TRYAGAIN no leader for slot {slot} right now (election in progress)"
    ))
}

/// The reply for a replica of configuration group `group` that does not lead it: MOVED to the
/// leader's core (`leader` is its Raft node id, 0 when unknown).
fn not_leader(ctx: &CoreCtx, group: ConfigGroupId, leader: NodeId, slot: u16) -> Pending {
    if leader == 0 {
        return tryagain(slot);
    }
    match ctx.node_addr(group, leader) {
        Some(addr) => now(|o| put_moved(o, slot, addr)),
        None => tryagain(slot),
    }
}

fn kv_error_text(e: &KvError) -> String {
    match e {
        KvError::NotAnInteger => "ERR value is not an integer or out of range".into(),
        KvError::IntegerOverflow => "ERR increment or decrement would overflow".into(),
        KvError::SessionUnknown { .. } | KvError::SequenceTooOld { .. } => {
            format!("SESSIONEXPIRED {e}")
        }
        KvError::WrongShard { .. } | KvError::ShardNotServing { .. } => format!("TRYAGAIN {e}"),
        other => format!("ERR {other}"),
    }
}

/// Writes the reply of a command whose group replies are `replies`, one per op in op order.
/// The first reply that is not a result decides (an error, a redirection, TRYAGAIN), as a
/// failed op fails the command; otherwise `shape` says how the results make the reply.
fn put_reply(
    ctx: &CoreCtx,
    conn: &mut Conn,
    out: &mut BytesMut,
    shape: Shape,
    (slot, group): (u16, ConfigGroupId),
    replies: impl IntoIterator<Item = GroupReply>,
) {
    let mut first: Option<Outcome> = None;
    let mut sum = 0i64;
    for r in replies {
        match r {
            GroupReply::Done(Outcome::Err(e)) => {
                put_error(out, kv_error_text(&e).as_bytes());
                return;
            }
            GroupReply::Done(o) => {
                if let Outcome::Int(n) = o {
                    sum = sum.wrapping_add(n);
                }
                if first.is_none() {
                    first = Some(o);
                }
            }
            GroupReply::NotLeader { leader } => {
                // The session's opening may have been lost with this proposal: open it again
                // with the next sequenced write to the group (as a new connection would).
                conn.forget_session_opened(group);
                if let Pending::Now(b) = not_leader(ctx, group, leader, slot) {
                    out.extend_from_slice(&b);
                }
                return;
            }
            GroupReply::Unavailable(why) => {
                conn.forget_session_opened(group);
                put_error(out, format!("TRYAGAIN {why}").as_bytes());
                return;
            }
        }
    }
    let protocol = conn.protocol;
    match shape {
        Shape::Ok => put_simple(out, b"OK"),
        Shape::OkIfSwapped => match first {
            Some(Outcome::Bool(true)) => put_simple(out, b"OK"),
            _ => put_null(out, protocol),
        },
        Shape::Value => match first {
            Some(Outcome::Value(Some(v))) => put_bulk(out, &v),
            _ => put_null(out, protocol),
        },
        Shape::Int => match first {
            Some(Outcome::Int(n)) => put_integer(out, n),
            _ => put_error(out, b"ERR unexpected result"),
        },
        Shape::Sum => put_integer(out, sum),
        Shape::Values => match first {
            Some(Outcome::Values(vs)) => {
                put_array_len(out, vs.len());
                for v in vs {
                    match v {
                        Some(v) => put_bulk(out, &v),
                        None => put_null(out, protocol),
                    }
                }
            }
            _ => put_error(out, b"ERR unexpected result"),
        },
    }
}

/// The cluster as clients see it: each group's slot ranges, its leader first. Computed from
/// the latest configuration this host's controller replica applied, or, on a host without one
/// (or before the bootstrap configuration is applied), from the static map it equals.
pub fn topology(ctx: &CoreCtx) -> Topology {
    let view = &ctx.view;
    // The leader's host of every group, as this host knows it (0: unknown).
    let leader_of = |group: ConfigGroupId| view.leader_of(group).map_or(0, |s| s.host);
    let epoch = view.epoch();
    match view.latest_config() {
        Some(config) if !config.groups.is_empty() => {
            topology_from_config(&config, &leader_of, epoch)
        }
        _ => topology_static(
            &ctx.cfg,
            &|core| leader_of(ConfigGroupId::from(core) + 1),
            epoch,
        ),
    }
}

/// Node addresses of `hosts` serving `core`, `leader` first.
fn leader_first(hosts: &mut Vec<(u64, u16, SocketAddr)>, leader: u64) -> Vec<NodeInfo> {
    if let Some(i) = hosts.iter().position(|&(h, _, _)| h == leader) {
        let l = hosts.remove(i);
        hosts.insert(0, l);
    }
    hosts
        .iter()
        .map(|&(h, core, addr)| NodeInfo {
            id: node_id(h, core),
            addr,
        })
        .collect()
}

/// The static map: group g on core g of every host, contiguous blocks of shards.
fn topology_static(cfg: &ServerConfig, leader_of: &dyn Fn(u16) -> u64, epoch: u64) -> Topology {
    let mut ranges = Vec::new();
    for g in 0..cfg.cores {
        let shards = cfg.group_shards(g);
        let (Some(first), Some(last)) = (shards.first(), shards.last()) else {
            continue;
        };
        let start = shard_slots(*first, cfg.shard_count).0;
        let end = shard_slots(*last, cfg.shard_count).1;
        let mut hosts: Vec<(u64, u16, SocketAddr)> = cfg
            .voters()
            .into_iter()
            .filter_map(|h| {
                let a = cfg.host(h)?.client;
                Some((h, g, SocketAddr::new(a.ip(), a.port() + g)))
            })
            .collect();
        let nodes = leader_first(&mut hosts, leader_of(g));
        ranges.push(SlotRange { start, end, nodes });
    }
    Topology { ranges, epoch }
}

/// A configuration's groups: one range per run of consecutive shards of a group, the replica on
/// the leader's host (`leader_of`, 0 when unknown) first.
fn topology_from_config(
    config: &Configuration,
    leader_of: &dyn Fn(ConfigGroupId) -> u64,
    epoch: u64,
) -> Topology {
    let shard_count = config.shard_count();
    let mut ranges = Vec::new();
    for (&gid, group) in &config.groups {
        let leader = leader_of(gid);
        let mut hosts: Vec<(u64, u16, SocketAddr)> = group
            .replicas
            .iter()
            .filter_map(|r| {
                let a = host_client_addr(config.hosts.get(&r.slot.host)?)?;
                let port = a.port().checked_add(r.slot.core)?;
                Some((r.slot.host, r.slot.core, SocketAddr::new(a.ip(), port)))
            })
            .collect();
        let nodes = leader_first(&mut hosts, leader);
        let shards = config.shards_of(gid);
        let mut i = 0;
        while i < shards.len() {
            let mut j = i;
            while j + 1 < shards.len() && shards[j + 1] == shards[j] + 1 {
                j += 1;
            }
            ranges.push(SlotRange {
                start: shard_slots(shards[i], shard_count).0,
                end: shard_slots(shards[j], shard_count).1,
                nodes: nodes.clone(),
            });
            i = j + 1;
        }
    }
    ranges.sort_by_key(|r| r.start);
    Topology { ranges, epoch }
}

fn node_id(host: u64, core: u16) -> String {
    NodeInfo::id_from((u128::from(host) << 16) | u128::from(core))
}

fn cluster(ctx: &CoreCtx, sub: ClusterCommand, protocol: Protocol) -> Pending {
    match sub {
        ClusterCommand::Slots => {
            let t = topology(ctx);
            now(|o| put_cluster_slots(o, &t, protocol))
        }
        ClusterCommand::Shards => {
            let t = topology(ctx);
            now(|o| put_cluster_shards(o, &t, protocol))
        }
        ClusterCommand::Nodes => {
            let text = cluster_nodes_text(&topology(ctx), &node_id(ctx.cfg.id, ctx.core));
            now(|o| put_text(o, &text, protocol))
        }
        ClusterCommand::Info => {
            let text = cluster_info_text(&topology(ctx));
            now(|o| put_text(o, &text, protocol))
        }
        ClusterCommand::KeySlot(key) => now(|o| put_integer(o, i64::from(key_slot(&key)))),
        ClusterCommand::MyId => {
            let id = node_id(ctx.cfg.id, ctx.core);
            now(|o| put_bulk(o, id.as_bytes()))
        }
    }
}

/// Bytes of the files in a directory (segments are preallocated: this is the disk the log holds).
/// A few `stat`s of a handful of segment files; INFO is not on the hot path.
fn dir_size_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn info_text(ctx: &CoreCtx) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        "# Server\r\nredis_version:7.0.0\r\ntynamo_version:{}\r\nhost_id:{}\r\ncore:{}\r\nprocess_id:{}\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        ctx.cfg.id,
        ctx.core,
        std::process::id()
    );
    let cfg = &ctx.cfg;
    let _ = write!(
        t,
        "# Config\r\ncores:{}\r\ntick_ms:{}\r\nheartbeat_ms:{}\r\nelection_ms:{}\r\ninflight_msgs_max:{}\r\n\
         entries_per_msg_max:{}\r\nread_mode:{:?}\r\nshard_count:{}\r\njoined:{}\r\n\r\n",
        cfg.cores,
        cfg.tick_ms,
        cfg.heartbeat_ms,
        cfg.election_ms,
        cfg.inflight_msgs_max,
        cfg.entries_per_msg_max,
        cfg.read_mode,
        cfg.shard_count,
        u8::from(cfg.joined),
    );
    // The Raft, Shards and Keyspace sections describe this core's first group (the static
    // map's group on an initial host); `# Groups` lists every group replica of the host.
    let first = ctx.groups.first();
    let leads = first.as_ref().is_some_and(|e| e.group.borrow().is_leader());
    let role = if leads { "master" } else { "slave" };
    let _ = write!(t, "# Replication\r\nrole:{role}\r\n\r\n");
    if let Some(entry) = &first {
        group_sections(entry, &mut t);
    }
    let _ = write!(
        t,
        "# Core\r\npeer_frames_sent:{}\r\npeer_frames_received:{}\r\npeer_frames_bad:{}\r\n\
         peer_messages_unrouted:{}\r\ncore_groups:{}\r\nconnected_clients:{}\r\n\r\n",
        ctx.transport_stats.frames_sent.get(),
        ctx.transport_stats.frames_received.get(),
        ctx.bad_peer_frames.get(),
        ctx.groups.messages_unrouted.get(),
        ctx.groups
            .all()
            .iter()
            .map(|e| e.view.id().to_string())
            .collect::<Vec<_>>()
            .join(","),
        ctx.connections.get(),
    );
    let ctl = &ctx.view.controller;
    let _ = write!(
        t,
        "# Controller\r\ncontroller_node:{}\r\ncontroller_leader_host:{}\r\ncontroller_term:{}\r\n\
         controller_commit:{}\r\ncontroller_applied:{}\r\nconfig_num:{}\r\n\r\n",
        ctx.plan.node_of_host(ctx.cfg.id).unwrap_or(0),
        ctl.leader_host.load(Ordering::Relaxed),
        ctl.term.load(Ordering::Relaxed),
        ctl.commit.load(Ordering::Relaxed),
        ctl.applied.load(Ordering::Relaxed),
        ctl.config_num.load(Ordering::Relaxed),
    );
    t.push_str("# Groups\r\n");
    for v in ctx.view.groups() {
        let m = v.migration();
        let leader = v.leader_slot();
        let _ = write!(
            t,
            "group{}:core={},role={},leader={},leader_core={},term={},commit={},applied={},config={},serving={},in_flight={},retired={}\r\n",
            v.id(),
            v.spec.core,
            v.role_name(),
            leader.map_or(0, |s| s.host),
            leader.map_or(0, |s| s.core),
            v.term.load(Ordering::Relaxed),
            v.commit.load(Ordering::Relaxed),
            v.applied.load(Ordering::Relaxed),
            m.config_num,
            m.serving,
            m.in_flight.len(),
            u8::from(m.retired),
        );
    }
    let removed = ctx.view.removed();
    if !removed.is_empty() {
        let ids: Vec<String> = removed.iter().map(u64::to_string).collect();
        let _ = write!(t, "groups_removed:{}\r\n", ids.join(","));
    }
    t.push_str("\r\n");
    t.push_str(INFO_CLUSTER_SECTION);
    let keys: usize = first.as_ref().map_or(0, |e| {
        let g = e.group.borrow();
        g.kv().shards().map(|(sh, _)| g.kv().key_count(sh)).sum()
    });
    let _ = write!(
        t,
        "\r\n# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n"
    );
    t
}

/// What INFO answers for its arguments, as Redis does: no argument, `all`, `everything` or
/// `default` give every section (ours are few and cheap, so `default` is all of them); otherwise
/// the named sections, case-insensitively and in the full text's order. A name that matches no
/// section adds nothing (an empty reply when none matches, as Redis).
fn info_sections(full: String, wanted: &[Bytes]) -> String {
    let every = wanted.is_empty()
        || wanted.iter().any(|w| {
            ["all", "everything", "default"]
                .iter()
                .any(|a| w.eq_ignore_ascii_case(a.as_bytes()))
        });
    if every {
        return full;
    }
    let mut out = String::new();
    let mut keep = false;
    for line in full.split("\r\n") {
        if let Some(name) = line.strip_prefix("# ") {
            keep = wanted
                .iter()
                .any(|w| w.eq_ignore_ascii_case(name.as_bytes()));
            if keep && !out.is_empty() {
                out.push_str("\r\n");
            }
        }
        if keep && !line.is_empty() {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out
}

/// INFO's `# Raft` and `# Shards` sections for one group replica.
fn group_sections(entry: &CoreGroup, t: &mut String) {
    let g = entry.group.borrow();
    let s = g.raw().status();
    let stats = g.stats;
    let wal = entry.wal.stats();
    let _ = write!(
        t,
        "# Raft\r\ngroup:{}\r\nraft_role:{:?}\r\nterm:{}\r\nleader:{}\r\ncommit_index:{}\r\napplied_index:{}\r\n\
         persisted_index:{}\r\nsnapshot_index:{}\r\nlast_index:{}\r\nlog_entries:{}\r\nwal_first_index:{}\r\n\
         wal_last_index:{}\r\nwal_size_bytes:{}\r\nwal_fdatasyncs:{}\r\nwal_bytes_written:{}\r\nproposals:{}\r\ncommands_proposed:{}\r\n\
         entries_applied:{}\r\nreads_served:{}\r\nsnapshots_taken:{}\r\nsnapshots_installed:{}\r\npersist_rounds:{}\r\n\
         persist_round_us:{}\r\npersist_round_entries:{}\r\npersist_wait_us:{}\r\nproposal_commands:{}\r\ncommit_us:{}\r\n\
         turn_us:{}\r\nsnapshot_take_us:{}\r\n\r\n",
        g.id,
        s.role,
        s.term,
        entry.view.spec.slot_of(s.leader).map_or(0, |l| l.host),
        s.commit,
        s.applied,
        s.persisted,
        s.snapshot_index,
        s.last_index,
        s.last_index - s.snapshot_index,
        entry.wal.first_index(),
        entry.wal.last_index(),
        dir_size_bytes(entry.wal.dir()),
        wal.fdatasyncs,
        wal.bytes_written,
        stats.proposals,
        stats.commands_proposed,
        stats.entries_applied,
        stats.reads_served,
        stats.snapshots_taken,
        stats.snapshots_installed,
        stats.persist_rounds,
        stats.persist_round_us.summary(),
        stats.persist_round_entries.summary(),
        stats.persist_wait_us.summary(),
        stats.proposal_commands.summary(),
        stats.commit_us.summary(),
        stats.turn_us.summary(),
        stats.snapshot_take_us.summary(),
    );
    let shards = &g.machine().shards;
    let mut phases = [0usize; 4];
    for (_, phase) in shards.shards() {
        phases[match phase {
            Phase::Serving => 0,
            Phase::Importing { .. } => 1,
            Phase::Confirming { .. } => 2,
            Phase::Exporting { .. } => 3,
        }] += 1;
    }
    let _ = write!(
        t,
        "# Shards\r\ngroup_id:{}\r\ngroup_config_num:{}\r\nshards_serving:{}\r\nshards_importing:{}\r\n\
         shards_confirming:{}\r\nshards_exporting:{}\r\n\r\n",
        shards.group(),
        shards.config_num(),
        phases[0],
        phases[1],
        phases[2],
        phases[3],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::StateMachine;
    use crate::node::config::parse_initial_cluster;
    use crate::node::control::ControlPlan;

    #[test]
    fn info_gives_the_named_sections_case_insensitively_and_every_one_for_all() {
        let full = "# Server\r\nhost_id:1\r\n\r\n# Raft\r\nraft_role:Leader\r\nterm:3\r\n\r\n\
                    # Cluster\r\ncluster_enabled:1\r\n\r\n# Keyspace\r\ndb0:keys=0\r\n";
        let ask = |args: &[&str]| {
            let args: Vec<Bytes> = args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect();
            info_sections(full.to_string(), &args)
        };
        for every in [
            &[][..],
            &["all"],
            &["EVERYTHING"],
            &["Default"],
            &["raft", "all"],
        ] {
            assert_eq!(ask(every), full, "{every:?}");
        }
        assert_eq!(ask(&["raft"]), "# Raft\r\nraft_role:Leader\r\nterm:3\r\n");
        assert_eq!(ask(&["RaFt"]), ask(&["raft"]));
        // Several names: the full text's order, a blank line between sections (as Redis).
        assert_eq!(
            ask(&["keyspace", "server"]),
            "# Server\r\nhost_id:1\r\n\r\n# Keyspace\r\ndb0:keys=0\r\n"
        );
        assert_eq!(ask(&["clients"]), "", "an unknown section selects nothing");
        assert_eq!(
            ask(&["cluster", "nosuch"]),
            "# Cluster\r\ncluster_enabled:1\r\n"
        );
    }

    #[test]
    fn cluster_slots_from_the_bootstrap_configuration_equal_the_static_map() {
        let map = "1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,3=127.0.0.1:7121/127.0.0.1:7021";
        for cores in [1u16, 2, 3] {
            let cfg = ServerConfig::new(
                2,
                "/tmp/x".into(),
                parse_initial_cluster(map).unwrap(),
                cores,
            );
            let plan = ControlPlan::new(&cfg);
            let mut sm = StateMachine::new(plan.settings.clone()).unwrap();
            for (i, c) in plan.bootstrap.iter().enumerate() {
                sm.apply(i as u64 + 1, &c.encode());
            }
            // Leaders differ per group, so the leader-first order is exercised.
            let leader_of = |core: u16| u64::from(core % 3) + 1;
            let live = topology_from_config(sm.latest(), &|g| leader_of(g as u16 - 1), 7);
            let fixed = topology_static(&cfg, &leader_of, 7);
            assert_eq!(live, fixed, "{cores} cores");
            assert_eq!(live.ranges.len(), usize::from(cores));
            assert_eq!(live.ranges[0].nodes[0].addr.port(), 7001);
        }
    }

    #[test]
    fn a_group_with_scattered_shards_gets_one_range_per_run() {
        let map = "1=127.0.0.1:7101/127.0.0.1:7001";
        let cfg = ServerConfig::new(1, "/tmp/x".into(), parse_initial_cluster(map).unwrap(), 2);
        let plan = ControlPlan::new(&cfg);
        let mut sm = StateMachine::new(plan.settings.clone()).unwrap();
        for (i, c) in plan.bootstrap.iter().enumerate() {
            sm.apply(i as u64 + 1, &c.encode());
        }
        let mut config = sm.latest().clone();
        // Shard 5 of group 1 moved to group 2.
        config.shards[5] = 2;
        let t = topology_from_config(&config, &|_| 1, 0);
        let starts: Vec<(u16, u16)> = t.ranges.iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(
            starts,
            vec![(0, 1279), (1280, 1535), (1536, 8191), (8192, 16383)]
        );
        assert_eq!(
            t.ranges[1].nodes[0].addr.port(),
            7002,
            "shard 5 at group 2's core"
        );
    }
}
