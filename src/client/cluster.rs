//! The cluster-aware client: routes each key to the node that owns its slot, pipelines a batch
//! of requests over all owners at once, and hides redirections and transient failures.
//!
//! - Slot map: `CLUSTER SLOTS` from any reachable node (seeds first), 16384 entries of a node
//!   index, so routing a key is one CRC16 and one array load.
//! - `-MOVED slot host:port`: the slot has a new owner; the entry is updated at once and the whole
//!   map refreshed after the batch round (as Redis Cluster clients do), then the request re-sent.
//!   The round's MOVED answers are applied again over the refreshed map: they are fresher than
//!   a map read from a node that may not know who leads that slot's group (a host with no
//!   replica of a group learns its leader with a delay), and a map that undid them would send
//!   the request back to where it was just redirected from, round after round.
//! - `-ASK slot host:port`: one request goes to the importing node preceded by `ASKING`; the map
//!   does not change (the migration is not finished).
//! - `-TRYAGAIN`, `-CLUSTERDOWN`, `-LOADING`, `-MASTERDOWN` and lost connections: re-sent after an
//!   exponential backoff, at most `attempts_max` rounds; redirections at most `redirects_max`.
//! - Exactly-once: with `exactly_once`, each connection opens the session
//!   (`TYNAMO.SESSION <client-id>`) and every write is wrapped in `TYNAMO.SEQ <seq> <first-unacked>`
//!   with a seq drawn once per write: a retry re-sends the *same* seq, so TynamoDB applies it once
//!   (see `resp::command`). A server that does not know the session command (Redis) gets plain
//!   writes: retries of non-idempotent writes (APPEND, INCR) may then apply twice. A TynamoDB
//!   core that does not lead its group answers the session with `-MOVED` (or `-TRYAGAIN`): the
//!   connection stays usable (the core opens the session in whichever group its first
//!   sequenced write reaches), and the redirect updates the slot map like any MOVED.
//!
//! A single (non-cluster) server is the degenerate map where node 0 owns every slot; MOVED is
//! still followed if it ever answers one.
//!
//! Limit: a batch is written to a node in full before its replies are read. A server that
//! stops reading while its replies are not being read could then stall until `io_timeout` once
//! a batch's requests and replies exceed the socket buffers (a few MiB on Linux); Redis keeps
//! reading, and so must a TynamoDB core (bounded by its own per-connection limits).

use super::connection::{ConnectOptions, Connection};
use super::error::{resolve, ClientError};
use crate::resp::command::Request;
use crate::resp::frame::{self, Frame};
use crate::shard::slots::{key_slot, SLOT_COUNT};
use bytes::{BufMut, Bytes, BytesMut};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const NO_NODE: u16 = u16::MAX;
/// Per-node reply order entry for the `ASKING` that precedes a redirected request.
const ASKING_MARK: u32 = u32::MAX;

/// Client behaviour on top of the per-connection options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect: ConnectOptions,
    /// Most MOVED/ASK redirections followed in a row for one batch before the client backs off
    /// as after TRYAGAIN (each back-off counts as one of `attempts_max`).
    pub redirects_max: u32,
    /// Most rounds of re-sending after TRYAGAIN or a lost connection, for one batch. The
    /// defaults (16 rounds, backoff doubling from 10 ms to 500 ms) wait about 5 s in all: a
    /// leader's death costs one to two election timeouts (1-2 s by default) before a new leader
    /// answers, and a client must ride that out rather than fail the write.
    pub attempts_max: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Send `READONLY` on every connection (stale reads allowed).
    pub read_only: bool,
    /// Use the `TYNAMO.SESSION` / `TYNAMO.SEQ` exactly-once extension when the server has it.
    pub exactly_once: bool,
    /// Most distinct nodes the client will track (a bound on what a server can make us open).
    pub nodes_max: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect: ConnectOptions::default(),
            redirects_max: 16,
            attempts_max: 16,
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            read_only: false,
            exactly_once: true,
            nodes_max: 1024,
        }
    }
}

/// A batch of requests executed together; reuse it (clear + push) to avoid allocating.
#[derive(Default)]
pub struct Batch {
    /// Each request's arguments as bulk strings, without the array header (added at send time,
    /// so that a `TYNAMO.SEQ` wrapper can be put in front of a write).
    wire: BytesMut,
    items: Vec<Item>,
    replies: Vec<Frame>,
}

#[derive(Clone, Copy)]
struct Item {
    start: u32,
    end: u32,
    args: u32,
    slot: u16,
    write: bool,
    /// 0: not sequenced.
    seq: u64,
    /// Node to ask (after an -ASK), or NO_NODE.
    ask: u16,
    replied_at: Option<Instant>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn clear(&mut self) {
        self.wire.clear();
        self.items.clear();
        self.replies.clear();
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds a request routed by `key` (`None`: slot 0's owner). Returns its index.
    ///
    /// `write` must be true exactly for the writes `Command::is_write` names (SET, APPEND, DEL,
    /// INCR, MSET): those are the ones sent under `TYNAMO.SEQ` for exactly-once, and the server
    /// refuses the wrapper around anything else.
    pub fn push(&mut self, key: Option<&[u8]>, write: bool, args: &[&[u8]]) -> usize {
        self.push_with(key, write, args.len(), |out| {
            for a in args {
                frame::put_bulk(out, a);
            }
        })
    }

    /// Adds a request whose `arg_count` bulk-string arguments `encode` appends (no array
    /// header): lets a caller write a value straight into the batch without building it first.
    pub fn push_with(
        &mut self,
        key: Option<&[u8]>,
        write: bool,
        arg_count: usize,
        encode: impl FnOnce(&mut BytesMut),
    ) -> usize {
        let start = self.wire.len();
        encode(&mut self.wire);
        let item = Item {
            start: u32::try_from(start).unwrap_or(u32::MAX),
            end: u32::try_from(self.wire.len()).unwrap_or(u32::MAX),
            args: u32::try_from(arg_count).unwrap_or(u32::MAX),
            slot: key.map(key_slot).unwrap_or(0),
            write,
            seq: 0,
            ask: NO_NODE,
            replied_at: None,
        };
        assert!(
            self.wire.len() < u32::MAX as usize,
            "batch wire bytes exceed 4 GiB"
        );
        self.items.push(item);
        self.replies.push(Frame::Null);
        self.items.len() - 1
    }

    /// The reply to request `i` (after a successful execute).
    pub fn reply(&self, i: usize) -> &Frame {
        &self.replies[i]
    }

    /// When the reply to request `i` was read.
    pub fn replied_at(&self, i: usize) -> Option<Instant> {
        self.items[i].replied_at
    }
}

struct Node {
    addr: SocketAddr,
    conn: Option<Connection>,
    /// Set when connecting failed in the current round: the round's other requests for this
    /// node wait for the next round instead of each paying a connect timeout.
    down_this_round: bool,
}

struct Session {
    client_id: u64,
    next_seq: u64,
    /// Known after the first connection: whether the server speaks `TYNAMO.SESSION`.
    supported: Option<bool>,
}

/// What to do with one reply.
enum Verdict {
    Done,
    Moved(u16, SocketAddr),
    Ask(SocketAddr),
    Retry(String),
}

/// Counters of what the client had to do beyond sending requests once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Requests re-sent after `-MOVED`.
    pub moved: u64,
    /// Requests re-sent after `-ASK`.
    pub asked: u64,
    /// Requests re-sent after `-TRYAGAIN`-like replies or a lost connection.
    pub retried: u64,
    /// Connections opened (the first ones included).
    pub connects: u64,
}

/// A cluster-aware (or single-server) client for one executor.
pub struct ClusterClient {
    options: ClientOptions,
    stats: ClientStats,
    cluster: bool,
    seeds: Vec<SocketAddr>,
    nodes: Vec<Node>,
    slots: Box<[u16]>,
    session: Session,
    // Scratch reused by every batch so that the hot path does not allocate.
    per_node: Vec<Vec<u32>>,
    pending: Vec<u32>,
    retry: Vec<u32>,
    /// (slot, node) of the `-MOVED` answers of the current round.
    moved_now: Vec<(u16, u16)>,
    header: BytesMut,
    /// A `-MOVED` answer to `TYNAMO.SESSION` not yet applied to the slot map.
    session_redirect: Option<(u16, SocketAddr)>,
}

impl ClusterClient {
    /// Connects to a Redis-Cluster-dialect deployment through any of `seeds`.
    pub async fn connect_cluster(
        seeds: &[SocketAddr],
        options: ClientOptions,
    ) -> Result<ClusterClient, ClientError> {
        let mut client = ClusterClient::new(true, seeds, options);
        client.refresh_slots().await?;
        Ok(client)
    }

    /// Connects to one plain RESP server that owns every slot.
    pub async fn connect_single(
        addr: SocketAddr,
        options: ClientOptions,
    ) -> Result<ClusterClient, ClientError> {
        let mut client = ClusterClient::new(false, &[addr], options);
        client.nodes.push(Node {
            addr,
            conn: None,
            down_this_round: false,
        });
        client.slots.fill(0);
        client.per_node.push(Vec::new());
        client.connection(0).await?;
        Ok(client)
    }

    fn new(cluster: bool, seeds: &[SocketAddr], options: ClientOptions) -> ClusterClient {
        assert!(options.nodes_max > 0 && options.nodes_max < NO_NODE as usize);
        ClusterClient {
            options,
            stats: ClientStats::default(),
            cluster,
            seeds: seeds.to_vec(),
            nodes: Vec::new(),
            slots: vec![NO_NODE; SLOT_COUNT as usize].into_boxed_slice(),
            session: Session {
                client_id: rand::random::<u64>() | 1,
                next_seq: 1,
                supported: None,
            },
            per_node: Vec::new(),
            pending: Vec::new(),
            retry: Vec::new(),
            moved_now: Vec::new(),
            header: BytesMut::with_capacity(64),
            session_redirect: None,
        }
    }

    /// The node that owns `slot`, as far as this client knows.
    pub fn slot_owner(&self, slot: u16) -> Option<SocketAddr> {
        self.nodes
            .get(usize::from(*self.slots.get(usize::from(slot))?))
            .map(|n| n.addr)
    }

    /// What the client did beyond sending each request once.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Every node the client knows.
    pub fn node_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// Whether writes are sent as exactly-once (the server accepted `TYNAMO.SESSION`).
    pub fn exactly_once(&self) -> bool {
        self.session.supported == Some(true)
    }

    /// This client's session id (meaningful when [`exactly_once`](Self::exactly_once)).
    pub fn client_id(&self) -> u64 {
        self.session.client_id
    }

    fn node_index(&mut self, addr: SocketAddr) -> Result<u16, ClientError> {
        if let Some(i) = self.nodes.iter().position(|n| n.addr == addr) {
            return Ok(i as u16);
        }
        if self.nodes.len() >= self.options.nodes_max {
            return Err(ClientError::Server {
                addr,
                message: format!("more than {} nodes in the cluster", self.options.nodes_max),
            });
        }
        self.nodes.push(Node {
            addr,
            conn: None,
            down_this_round: false,
        });
        self.per_node.push(Vec::new());
        Ok((self.nodes.len() - 1) as u16)
    }

    /// The node's connection, opened (and set up: session, READONLY) if needed.
    async fn connection(&mut self, node: u16) -> Result<&mut Connection, ClientError> {
        let i = usize::from(node);
        if self.nodes[i].conn.is_none() {
            let addr = self.nodes[i].addr;
            let mut conn = Connection::connect(addr, &self.options.connect).await?;
            self.stats.connects += 1;
            if self.options.exactly_once && self.session.supported != Some(false) {
                let id = self.session.client_id.to_string();
                let reply = conn.call(&[b"TYNAMO.SESSION", id.as_bytes()]).await?;
                self.session.supported = Some(match reply.as_error() {
                    None => true,
                    // A core that does not lead its group keeps the client id on the
                    // connection and opens the session with the first sequenced write it
                    // serves or forwards; its redirect says where that group is led, which
                    // is taken as a slot-map hint (the map is re-read after the batch).
                    Some(_) if !matches!(classify(&reply), Verdict::Done) => {
                        if let Verdict::Moved(slot, to) = classify(&reply) {
                            self.session_redirect = Some((slot, to));
                        }
                        true
                    }
                    // A server without the extension (Redis) says "unknown command".
                    Some(e)
                        if e.starts_with(b"ERR unknown command")
                            && self.session.supported.is_none() =>
                    {
                        false
                    }
                    Some(e) => {
                        return Err(ClientError::Server {
                            addr,
                            message: String::from_utf8_lossy(e).into_owned(),
                        })
                    }
                });
            }
            if self.options.read_only {
                let reply = conn.call(&[b"READONLY"]).await?;
                // A non-cluster server refuses READONLY; it serves reads itself, so that is fine.
                if let (Some(e), true) = (reply.as_error(), self.cluster) {
                    return Err(ClientError::Server {
                        addr,
                        message: String::from_utf8_lossy(e).into_owned(),
                    });
                }
            }
            self.nodes[i].conn = Some(conn);
        }
        match self.nodes[i].conn.as_mut() {
            Some(c) => Ok(c),
            None => unreachable!("connection was just stored"),
        }
    }

    /// Re-reads the slot map with `CLUSTER SLOTS` from a known node or a seed.
    pub async fn refresh_slots(&mut self) -> Result<(), ClientError> {
        if !self.cluster {
            return Ok(());
        }
        let mut candidates: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr).collect();
        candidates.extend(self.seeds.iter().copied());
        let mut last = String::from("no seed given");
        for addr in candidates {
            let node = self.node_index(addr)?;
            let reply = match self.connection(node).await {
                Ok(conn) => conn.call_ok(&[b"CLUSTER", b"SLOTS"]).await,
                Err(e) => Err(e),
            };
            match reply.and_then(|r| parse_cluster_slots(&r, addr)) {
                Ok(ranges) => {
                    let mut fresh = vec![NO_NODE; SLOT_COUNT as usize];
                    for (start, end, owner) in ranges {
                        let owner = self.node_index(owner)?;
                        fresh[usize::from(start)..=usize::from(end)].fill(owner);
                    }
                    self.slots.copy_from_slice(&fresh);
                    // The fresh map supersedes a hint gathered while reading it.
                    self.session_redirect = None;
                    return Ok(());
                }
                Err(e) => {
                    if e.is_retryable() {
                        self.nodes[usize::from(node)].conn = None;
                    }
                    last = e.to_string();
                }
            }
        }
        Err(ClientError::NoSlotMap { last })
    }

    /// Runs one request (args[0] is the command name) and returns its reply. Convenience path:
    /// it allocates; use [`execute`](Self::execute) with a reused [`Batch`] on hot paths.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Frame, ClientError> {
        let owned: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        let (key, write) = match Request::parse(&owned) {
            Ok(r) => (r.command.first_key().cloned(), r.command.is_write()),
            // Unknown to us: let the server judge it, routed by its first argument.
            Err(_) => (owned.get(1).cloned(), false),
        };
        let mut batch = Batch::new();
        batch.push(key.as_deref(), write, args);
        self.execute(&mut batch).await?;
        Ok(batch.replies.swap_remove(0))
    }

    /// Sends every request of `batch` to its slot's owner (pipelined, one write per node), reads
    /// the replies, and follows redirections and retries until each request has a final reply
    /// (which may be an error reply such as `-ERR wrong type`) or the bounds are hit.
    pub async fn execute(&mut self, batch: &mut Batch) -> Result<(), ClientError> {
        if self.session.supported == Some(true) {
            for item in batch.items.iter_mut().filter(|i| i.write && i.seq == 0) {
                item.seq = self.session.next_seq;
                self.session.next_seq += 1;
            }
        }
        self.pending.clear();
        self.pending.extend(0..batch.items.len() as u32);
        let (mut attempts, mut redirects, mut redirects_waited) = (0u32, 0u32, 0u32);
        let mut backoff = self.options.backoff_initial;
        while !self.pending.is_empty() {
            let (must_wait, stale_map, last) = match self.round(batch, &mut redirects).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    // Requests may be queued or in flight on any node: their replies would be
                    // read as answers to later requests. Drop those connections.
                    for node in &mut self.nodes {
                        if node.conn.as_ref().is_some_and(|c| c.in_flight() > 0) {
                            node.conn = None;
                        }
                    }
                    return Err(e);
                }
            };
            std::mem::swap(&mut self.pending, &mut self.retry);
            if stale_map {
                // Best effort: MOVED entries already point at the new owners, and stay so.
                let _ = self.refresh_slots().await;
                for &(slot, owner) in &self.moved_now {
                    self.slots[usize::from(slot)] = owner;
                }
            }
            if self.pending.is_empty() {
                break;
            }
            // Redirections that do not settle (an ASK answered by a node that has not yet
            // learned of the move, a MOVED to a leader that is stepping down) mean the cluster
            // is mid-change: wait like after TRYAGAIN instead of failing, so one shard move
            // costs the client a pause, not an error. The bound on rounds still holds.
            let bouncing = redirects - redirects_waited > self.options.redirects_max;
            if (must_wait || bouncing) && attempts >= self.options.attempts_max {
                return Err(ClientError::RetriesExhausted {
                    attempts: attempts + 1,
                    redirects,
                    last,
                });
            }
            if must_wait || bouncing {
                attempts += 1;
                redirects_waited = redirects;
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(self.options.backoff_max);
            }
        }
        Ok(())
    }

    /// One send/receive round over `self.pending`; what must be re-sent goes to `self.retry`.
    /// Returns (a backoff is due, the slot map needs a refresh, last failure).
    async fn round(
        &mut self,
        batch: &mut Batch,
        redirects: &mut u32,
    ) -> Result<(bool, bool, String), ClientError> {
        self.retry.clear();
        self.moved_now.clear();
        for list in &mut self.per_node {
            list.clear();
        }
        for node in &mut self.nodes {
            node.down_this_round = false;
        }
        let (mut must_wait, mut moved, mut last) = (false, false, String::new());
        // First unacknowledged seq of this batch: every write before the batch has its reply.
        let first_unacked = batch
            .items
            .iter()
            .filter(|i| i.seq != 0 && i.replied_at.is_none())
            .map(|i| i.seq)
            .min()
            .unwrap_or(self.session.next_seq);

        // Queue every pending request on its node.
        let pending = std::mem::take(&mut self.pending);
        for &i in &pending {
            let item = batch.items[i as usize];
            let node = if item.ask != NO_NODE {
                item.ask
            } else {
                self.slots[usize::from(item.slot)]
            };
            if node == NO_NODE {
                // Part of the cluster is unknown or down: re-read the map, then retry.
                last = ClientError::SlotUnowned { slot: item.slot }.to_string();
                (must_wait, moved) = (true, true);
                self.stats.retried += 1;
                self.retry.push(i);
                continue;
            }
            if self.nodes[usize::from(node)].down_this_round {
                self.stats.retried += 1;
                self.retry.push(i);
                continue;
            }
            match self.connection(node).await {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    self.nodes[usize::from(node)].down_this_round = true;
                    last = e.to_string();
                    // A node that cannot be reached may be a dead leader: its slots move once
                    // a new leader is elected, and only a fresh slot map says where.
                    (must_wait, moved) = (true, true);
                    self.stats.retried += 1;
                    self.retry.push(i);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let Some(conn) = self.nodes[usize::from(node)].conn.as_mut() else {
                unreachable!("connection() stores the connection it returns");
            };
            if item.ask != NO_NODE {
                conn.queue(&[b"ASKING"])?;
                self.per_node[usize::from(node)].push(ASKING_MARK);
            }
            let body = &batch.wire[item.start as usize..item.end as usize];
            let header = &mut self.header;
            header.clear();
            if item.seq != 0 {
                frame::put_array_len(header, item.args as usize + 3);
                frame::put_bulk(header, b"TYNAMO.SEQ");
                frame::put_bulk_decimal(header, i64::try_from(item.seq).unwrap_or(i64::MAX));
                frame::put_bulk_decimal(header, i64::try_from(first_unacked).unwrap_or(i64::MAX));
            } else {
                frame::put_array_len(header, item.args as usize);
            }
            conn.queue_with(|out| {
                out.put_slice(header);
                out.put_slice(body);
            })?;
            self.per_node[usize::from(node)].push(i);
        }
        self.pending = pending;

        // Send everything, then collect each node's replies in order.
        for node in 0..self.nodes.len() {
            if self.per_node[node].is_empty() {
                continue;
            }
            let Some(conn) = self.nodes[node].conn.as_mut() else {
                continue;
            };
            if let Err(e) = conn.flush().await {
                self.fail_node(node, 0, &e)?;
                last = e.to_string();
                (must_wait, moved) = (true, true);
            }
        }
        for node in 0..self.nodes.len() {
            let mut k = 0;
            while k < self.per_node[node].len() {
                let entry = self.per_node[node][k];
                let Some(conn) = self.nodes[node].conn.as_mut() else {
                    break;
                };
                let reply = match conn.read_reply().await {
                    Ok(r) => r,
                    Err(e) => {
                        self.fail_node(node, k, &e)?;
                        last = e.to_string();
                        (must_wait, moved) = (true, true);
                        break;
                    }
                };
                k += 1;
                if entry == ASKING_MARK {
                    continue;
                }
                let i = entry as usize;
                match classify(&reply) {
                    Verdict::Done => {
                        batch.items[i].replied_at = Some(Instant::now());
                        batch.replies[i] = reply;
                    }
                    Verdict::Moved(slot, addr) => {
                        *redirects += 1;
                        self.stats.moved += 1;
                        moved = true;
                        let owner = self.node_index(addr)?;
                        if let Some(entry) = self.slots.get_mut(usize::from(slot)) {
                            *entry = owner;
                            self.moved_now.push((slot, owner));
                        }
                        batch.items[i].ask = NO_NODE;
                        last = format!("{reply}");
                        self.retry.push(i as u32);
                    }
                    Verdict::Ask(addr) => {
                        *redirects += 1;
                        self.stats.asked += 1;
                        batch.items[i].ask = self.node_index(addr)?;
                        last = format!("{reply}");
                        self.retry.push(i as u32);
                    }
                    Verdict::Retry(why) => {
                        must_wait = true;
                        self.stats.retried += 1;
                        batch.items[i].ask = NO_NODE;
                        last = why;
                        self.retry.push(i as u32);
                    }
                }
            }
        }
        if let Some((slot, to)) = self.session_redirect.take() {
            let owner = self.node_index(to)?;
            if let Some(entry) = self.slots.get_mut(usize::from(slot)) {
                *entry = owner;
            }
            moved = true;
        }
        Ok((must_wait, moved, last))
    }

    /// A node's connection broke after `answered` of its queued replies were read: drop it and
    /// queue the unanswered requests for another round. Non-retryable errors end the batch.
    fn fail_node(
        &mut self,
        node: usize,
        answered: usize,
        error: &ClientError,
    ) -> Result<(), ClientError> {
        self.nodes[node].conn = None;
        if !error.is_retryable() {
            return Err(match error {
                ClientError::Protocol { addr, source } => ClientError::Protocol {
                    addr: *addr,
                    source: source.clone(),
                },
                other => ClientError::Server {
                    addr: self.nodes[node].addr,
                    message: other.to_string(),
                },
            });
        }
        let unanswered = self.per_node[node][answered..]
            .iter()
            .filter(|&&e| e != ASKING_MARK);
        let before = self.retry.len();
        self.retry.extend(unanswered);
        self.stats.retried += (self.retry.len() - before) as u64;
        Ok(())
    }
}

fn classify(reply: &Frame) -> Verdict {
    let Some(message) = reply.as_error() else {
        return Verdict::Done;
    };
    let redirect = |rest: &[u8]| -> Option<(u16, SocketAddr)> {
        let text = std::str::from_utf8(rest).ok()?;
        let mut parts = text.split_ascii_whitespace();
        let slot: u16 = parts.next()?.parse().ok().filter(|s| *s < SLOT_COUNT)?;
        let addr = parse_host_port(parts.next()?)?;
        Some((slot, addr))
    };
    if let Some(rest) = message.strip_prefix(b"MOVED ") {
        if let Some((slot, addr)) = redirect(rest) {
            return Verdict::Moved(slot, addr);
        }
    } else if let Some(rest) = message.strip_prefix(b"ASK ") {
        if let Some((_, addr)) = redirect(rest) {
            return Verdict::Ask(addr);
        }
    } else if [&b"TRYAGAIN"[..], b"CLUSTERDOWN", b"LOADING", b"MASTERDOWN"]
        .iter()
        .any(|p| message.starts_with(p))
    {
        return Verdict::Retry(String::from_utf8_lossy(message).into_owned());
    }
    Verdict::Done
}

/// `host:port` or `[v6]:port` from a redirection. Names are resolved (rare: Redis sends IPs).
fn parse_host_port(text: &str) -> Option<SocketAddr> {
    text.parse().ok().or_else(|| resolve(text).ok())
}

/// The `(start, end, owner)` ranges of a `CLUSTER SLOTS` reply. An empty IP means "the node you
/// asked", as the Redis Cluster specification says.
pub fn parse_cluster_slots(
    reply: &Frame,
    asked: SocketAddr,
) -> Result<Vec<(u16, u16, SocketAddr)>, ClientError> {
    let bad = |why: &str| ClientError::Unexpected {
        addr: asked,
        request: "CLUSTER SLOTS",
        reply: format!("{why}: {reply}"),
    };
    let Frame::Array(ranges) = reply else {
        return Err(bad("not an array"));
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Frame::Array(fields) = range else {
            return Err(bad("range is not an array"));
        };
        let (Some(Frame::Integer(start)), Some(Frame::Integer(end)), Some(Frame::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err(bad("range lacks start, end or master"));
        };
        let slot = |v: i64| u16::try_from(v).ok().filter(|s| *s < SLOT_COUNT);
        let (Some(start), Some(end)) = (slot(*start), slot(*end)) else {
            return Err(bad("slot out of range"));
        };
        if start > end {
            return Err(bad("range start after end"));
        }
        let (Some(host), Some(Frame::Integer(port))) =
            (master.first().and_then(Frame::as_bytes), master.get(1))
        else {
            return Err(bad("master lacks host or port"));
        };
        let port = u16::try_from(*port).map_err(|_| bad("port out of range"))?;
        let host = std::str::from_utf8(host).map_err(|_| bad("host is not UTF-8"))?;
        let addr = if host.is_empty() || host == "?" {
            SocketAddr::new(asked.ip(), port)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            SocketAddr::new(ip, port)
        } else {
            resolve(&format!("{host}:{port}"))?
        };
        out.push((start, end, addr));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn redirections_and_retries_are_recognised() {
        let err = |s: &'static str| Frame::Error(Bytes::from_static(s.as_bytes()));
        assert!(
            matches!(classify(&err("MOVED 3999 127.0.0.1:6381")), Verdict::Moved(3999, a) if a.port() == 6381)
        );
        assert!(
            matches!(classify(&err("ASK 3999 127.0.0.1:6382")), Verdict::Ask(a) if a.port() == 6382)
        );
        assert!(matches!(
            classify(&err(
                "TRYAGAIN Multiple keys request during rehashing of slot"
            )),
            Verdict::Retry(_)
        ));
        assert!(matches!(
            classify(&err("ERR wrong number of arguments")),
            Verdict::Done
        ));
        // A malformed redirection is a final answer, not something to chase.
        assert!(matches!(
            classify(&err("MOVED 99999 127.0.0.1:1")),
            Verdict::Done
        ));
        assert!(matches!(
            classify(&bulk("MOVED 1 127.0.0.1:1")),
            Verdict::Done
        ));
    }

    #[test]
    fn cluster_slots_reply_is_parsed_with_empty_host_meaning_the_asked_node() {
        let asked: SocketAddr = "10.0.0.9:7000".parse().unwrap();
        let reply = Frame::Array(vec![
            Frame::Array(vec![
                Frame::Integer(0),
                Frame::Integer(5460),
                Frame::Array(vec![bulk("127.0.0.1"), Frame::Integer(7001), bulk("id1")]),
            ]),
            Frame::Array(vec![
                Frame::Integer(5461),
                Frame::Integer(16383),
                Frame::Array(vec![bulk(""), Frame::Integer(7002)]),
            ]),
        ]);
        let ranges = parse_cluster_slots(&reply, asked).unwrap();
        assert_eq!(
            ranges,
            vec![
                (0, 5460, "127.0.0.1:7001".parse().unwrap()),
                (5461, 16383, "10.0.0.9:7002".parse().unwrap())
            ]
        );
        let bad = Frame::Array(vec![Frame::Array(vec![
            Frame::Integer(9),
            Frame::Integer(3),
            Frame::Array(vec![]),
        ])]);
        assert!(parse_cluster_slots(&bad, asked).is_err());
    }
}
