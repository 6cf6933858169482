//! One glommio executor per core, each running the replica of one group (group `g` on core `g`),
//! its peer transport, its timers and its client listener.
//!
//! Tasks of a core:
//! - the group loop: waits on the group's signal, runs a turn, sends the turn's messages (one
//!   frame per destination core per turn), hands storage writes to the persister;
//! - the persister (`group::persist_loop`);
//! - the ticker: one tick every `tick_ms`, so an idle core wakes `1000 / tick_ms` times a
//!   second and parks in io_uring in between (spinning before parking is off);
//! - the peer listener and one writer per remote host (`transport`);
//! - the client listener and one task per client connection (`server`);
//! - the migration driver (`migrate::drive`): while this core's replica leads its data group,
//!   moves the group through the controller's configurations (AcceptConfig, pulls, confirms);
//!   on core 0 of a host without a controller replica, `migrate::follow_controller` keeps the
//!   host's view of the latest configuration fresh from a controller host;
//! - on core 0 of the first three hosts: the controller group's loop, persister and bootstrap
//!   proposer (`control`), on the same storage and Ready-loop code as the data group, sharing
//!   the core's peer connections (its messages carry group id `CONTROLLER_GROUP_ID`).
//!
//! Measured idle cost (`tools/cluster.sh idle-cpu 10`, release build, 3 hosts x 2 cores on one
//! 2-CPU machine under other load): 3.4% of one CPU for the whole idle cluster (1.0-1.2% per
//! host): 100 ticks/s per core plus 10 heartbeats/s per group. With the controller group on
//! core 0 of each host: 3.6% (one run, same conditions).
//!
//! Groups and peers of a core: `CoreGroups` holds the core's data groups by peer group id and
//! routes every peer message by the group id it carries; `PeerSenders` holds the core's
//! outbound connections by host and opens one on demand to a host a configuration names
//! (hosts that joined after start). A data group replica is a `DataGroupSpec` (ids, node id,
//! members and their hosts), opened by `open_data_group` and run by `run_data_group`. Today
//! only the static map's group `core` is opened, at start: creating the groups a configuration
//! places on this core (Join) and removing those it drops (Leave) are not done yet.
//!
//! Cross-core: the `HostView` below (relaxed atomics each core publishes after a turn: its
//! group's leader, term, indexes; read for `-MOVED`, `CLUSTER SLOTS` and `INFO`), and bounded
//! glommio channels (`CoreMsg`) that carry requests which reached the wrong core of the right
//! host. A cluster client that routes by `CLUSTER SLOTS` never uses them: nothing on its write
//! path crosses cores.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flatbuffers::{FlatBufferBuilder, VerifierOptions};
use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use tynamo_wal::WalOptions;

use crate::controller::{self, Configuration};
use crate::kv::{self, Command as KvCommand, Op};
use crate::raft::{self, Message, NodeId, RawNode, Role};
use crate::shard::migration::{GroupShards, Phase};

use super::codec::{decode_batch, encode_batch, verifier_options, GroupId};
use super::config::{PlacementMode, ServerConfig};
use super::control::{
    ControlPlan, CONTROLLER_ENTRY_BYTES_MAX, CONTROLLER_GROUP_ID, CONTROLLER_SEGMENT_BYTES,
};
use super::group::{persist_loop, Group, GroupReply, ReplySlot, Signal};
use super::machine::{ControllerMachine, KvMachine, Machine};
use super::storage::{save_local_snapshot, GroupStorage};
use super::transport::{
    bind_exclusive, spawn_listener, CoreId, FrameSink, PeerSender, TransportConfig, TransportStats,
};

/// Messages' approximate bytes per peer frame before a turn's messages are cut into another frame.
const FRAME_TARGET_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("core {core}: {why}")]
    Core { core: u16, why: String },
    #[error("cannot start executor for core {core}: {why}")]
    Executor { core: u16, why: String },
}

/// Per-group facts every core can read (relaxed atomics, published after each turn).
pub struct HostView {
    pub leaders: Vec<AtomicU64>,
    pub terms: Vec<AtomicU64>,
    pub commits: Vec<AtomicU64>,
    pub applied: Vec<AtomicU64>,
    /// 0 follower, 1 pre-candidate, 2 candidate, 3 leader.
    pub roles: Vec<AtomicU8>,
    /// The controller replica of this host (core 0), if it runs one.
    pub controller: ControllerView,
    /// Per core: the configuration its data group accepted and its shards in flight
    /// (`tynamo ctl status`), rebuilt when the group applies a migration entry.
    pub migration: Vec<std::sync::Mutex<MigrationView>>,
    /// Per core: the migration applied index `migration` was built at.
    migration_index: Vec<AtomicU64>,
    /// The latest configuration the controller replica of this host applied. Read by
    /// `CLUSTER SLOTS/SHARDS/NODES` and `tynamo ctl`, written when a new configuration is
    /// applied: a lock off the request path (no data command touches it).
    pub config: std::sync::Mutex<Option<Arc<Configuration>>>,
    /// The configurations the controller replica of this host applied, by number (the last
    /// [`HOST_CONFIGS_KEPT`]): what the data groups of this host accept one at a time.
    pub configs: std::sync::Mutex<BTreeMap<u64, Arc<Configuration>>>,
}

/// Configurations a host keeps for its data groups. A group more than this many behind asks
/// another controller host (`TYNAMO.MIGRATE CONFIG`), which keeps the same window.
pub const HOST_CONFIGS_KEPT: usize = 256;

/// One data group's migration state as `tynamo ctl status` shows it.
#[derive(Default, Clone, Debug)]
pub struct MigrationView {
    pub config_num: u64,
    /// Shards not plainly Serving, in shard order (at most the shard count).
    pub in_flight: Vec<(u16, Phase)>,
}

/// The controller replica's facts, published after each of its turns (relaxed atomics).
#[derive(Default)]
pub struct ControllerView {
    /// Host id of the controller leader as this replica knows it (0: unknown).
    pub leader_host: AtomicU64,
    pub term: AtomicU64,
    pub commit: AtomicU64,
    pub applied: AtomicU64,
    /// The number of the latest configuration applied here.
    pub config_num: AtomicU64,
}

impl HostView {
    pub fn new(groups: usize) -> HostView {
        let v = || (0..groups).map(|_| AtomicU64::new(0)).collect();
        HostView {
            leaders: v(),
            terms: v(),
            commits: v(),
            applied: v(),
            roles: (0..groups).map(|_| AtomicU8::new(0)).collect(),
            controller: ControllerView::default(),
            migration: (0..groups)
                .map(|_| std::sync::Mutex::new(MigrationView::default()))
                .collect(),
            migration_index: v(),
            config: std::sync::Mutex::new(None),
            configs: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Publishes a configuration fetched from a controller host (a host without a controller
    /// replica of its own): newer ones only, so a slow answer never rolls the view back.
    pub fn publish_fetched(&self, config: Configuration) {
        let num = config.num;
        let v = &self.controller;
        if v.config_num.fetch_max(num, Ordering::Relaxed) >= num {
            return;
        }
        let config = Arc::new(config);
        if let Ok(mut c) = self.config.lock() {
            if !matches!(c.as_ref(), Some(c) if c.num >= num) {
                *c = Some(config.clone());
            }
        }
        if let Ok(mut kept) = self.configs.lock() {
            kept.insert(num, config);
            while kept.len() > HOST_CONFIGS_KEPT {
                kept.pop_first();
            }
        }
    }

    /// Configuration `num` as this host's controller replica applied it.
    pub fn config(&self, num: u64) -> Option<Arc<Configuration>> {
        self.configs.lock().ok()?.get(&num).cloned()
    }

    /// The latest configuration this host knows from its controller replica.
    pub fn latest_config(&self) -> Option<Arc<Configuration>> {
        self.config.lock().map_or(None, |c| c.clone())
    }

    fn publish_controller(&self, plan: &ControlPlan, group: &Group<ControllerMachine>) {
        let s = group.raw().status();
        let v = &self.controller;
        v.leader_host
            .store(plan.host_of_node(s.leader).unwrap_or(0), Ordering::Relaxed);
        v.term.store(s.term, Ordering::Relaxed);
        v.commit.store(s.commit, Ordering::Relaxed);
        v.applied.store(s.applied, Ordering::Relaxed);
        let sm = &group.machine().sm;
        let latest = sm.latest();
        let before = v.config_num.swap(latest.num, Ordering::Relaxed);
        if before != latest.num {
            if let Ok(mut c) = self.config.lock() {
                *c = Some(Arc::new(latest.clone()));
            }
            if let Ok(mut kept) = self.configs.lock() {
                // Every number since the last publish (a turn may apply several), not only
                // the latest: groups accept them one at a time.
                let from = latest.num.saturating_sub(HOST_CONFIGS_KEPT as u64 - 1);
                for num in from..=latest.num {
                    if kept.contains_key(&num) {
                        continue;
                    }
                    if let Ok(c) = sm.query(num as i64) {
                        kept.insert(num, Arc::new(c.clone()));
                    }
                }
                while kept.len() > HOST_CONFIGS_KEPT {
                    kept.pop_first();
                }
            }
        }
    }

    /// Republishes core `g`'s migration state when its group applied a migration entry since
    /// the last time (a lock taken a few times per configuration change, not per request).
    fn publish_shards(&self, g: usize, shards: &GroupShards) {
        let index = shards.applied_index();
        if self.migration_index[g].swap(index, Ordering::Relaxed) == index {
            return;
        }
        if let Ok(mut m) = self.migration[g].lock() {
            m.config_num = shards.config_num();
            m.in_flight = shards
                .shards()
                .filter(|(_, p)| *p != Phase::Serving)
                .collect();
        }
    }

    fn publish<M: Machine>(&self, g: usize, group: &Group<M>) {
        let s = group.raw().status();
        self.leaders[g].store(s.leader, Ordering::Relaxed);
        self.terms[g].store(s.term, Ordering::Relaxed);
        self.commits[g].store(s.commit, Ordering::Relaxed);
        self.applied[g].store(s.applied, Ordering::Relaxed);
        let role = match s.role {
            Role::Follower => 0,
            Role::PreCandidate => 1,
            Role::Candidate => 2,
            Role::Leader => 3,
        };
        self.roles[g].store(role, Ordering::Relaxed);
    }
}

/// A sequenced (exactly-once) write's identity: the connection's session and the write's seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionWrite {
    pub client_id: u64,
    pub seq: u64,
}

impl SessionWrite {
    /// The command that opens (or refreshes) this write's session in a group.
    pub fn open(self) -> KvCommand {
        KvCommand {
            client_id: self.client_id,
            seq: 0,
            op: Op::OpenSession,
        }
    }
}

/// One client request handed to the group of another core.
pub struct Forward {
    pub ops: Vec<Op>,
    pub write: bool,
    /// A READONLY read: answered from the replica's applied state.
    pub stale: bool,
    /// Set for a `TYNAMO.SEQ` write (then `ops` holds exactly that one write).
    pub session: Option<SessionWrite>,
    /// Open the session in the target group first (the connection has not written there yet).
    pub open_session: bool,
}

/// Requests forwarded between the cores of one host (a client on core a asked for a key of the
/// group on core b, whose leader is on this host) and their replies. Bounded channels, one per
/// ordered pair of cores.
pub enum CoreMsg {
    Request { id: u64, forward: Forward },
    Reply { id: u64, replies: Vec<GroupReply> },
}

/// Forwarded requests in flight per ordered pair of cores.
pub const FORWARD_CHANNEL_CAPACITY: usize = 4096;

/// What a core's client connections share.
pub struct CoreCtx {
    pub cfg: Arc<ServerConfig>,
    pub core: u16,
    /// The data group this core was started with (the bootstrap's group `core`); client
    /// requests and the migration driver use it.
    pub group: Rc<RefCell<Group>>,
    /// Every data group this core runs, by group id (peer routing, INFO).
    pub groups: Rc<CoreGroups>,
    pub view: Arc<HostView>,
    pub wal: Rc<tynamo_wal::Wal>,
    pub transport_stats: Rc<TransportStats>,
    pub bad_peer_frames: Rc<Cell<u64>>,
    pub next_connection_id: Cell<u64>,
    pub connections: Cell<usize>,
    /// Senders to the other cores of this host, by core.
    pub forward: RefCell<HashMap<u16, Rc<ConnectedSender<CoreMsg>>>>,
    pub forwarded: RefCell<HashMap<u64, Vec<ReplySlot>>>,
    pub next_forward_id: Cell<u64>,
    pub plan: Arc<ControlPlan>,
    /// The controller replica, on core 0 of a controller host.
    pub controller: Option<Rc<RefCell<Group<ControllerMachine>>>>,
}

impl CoreCtx {
    /// Client address of `host`'s core `core`.
    pub fn client_addr(&self, host: u64, core: u16) -> Option<SocketAddr> {
        self.cfg
            .host(host)
            .map(|h| SocketAddr::new(h.client.ip(), h.client.port() + core))
    }

    /// Whether this host runs a controller replica (on core 0).
    pub fn controller_local(&self) -> bool {
        self.plan.node_of_host(self.cfg.id).is_some()
    }

    /// Hands `ops` to the group on `core` (same host) and returns the slots its replies will
    /// fill, or None when that core's queue is full.
    pub fn forward(&self, core: u16, forward: Forward) -> Option<Vec<ReplySlot>> {
        let sender = self.forward.borrow().get(&core).cloned()?;
        let id = self.next_forward_id.get();
        self.next_forward_id.set(id + 1);
        let slots: Vec<ReplySlot> = forward.ops.iter().map(|_| ReplySlot::new()).collect();
        if sender.try_send(CoreMsg::Request { id, forward }).is_err() {
            return None;
        }
        self.forwarded.borrow_mut().insert(id, slots.clone());
        Some(slots)
    }
}

/// Serves what another core of this host sends: requests for this core's group, and replies to
/// requests this core forwarded.
async fn forward_receiver(
    ctx: Rc<CoreCtx>,
    from: u16,
    rx: glommio::channels::shared_channel::ConnectedReceiver<CoreMsg>,
) {
    while let Some(msg) = rx.recv().await {
        match msg {
            CoreMsg::Request { id, forward } => {
                let Forward {
                    ops,
                    write,
                    stale,
                    session,
                    open_session,
                } = forward;
                let slots: Vec<ReplySlot> = {
                    let mut g = ctx.group.borrow_mut();
                    if let (Some(s), true) = (session, open_session) {
                        // Same turn, ahead of the write: the write's reply answers for both.
                        let _ = g.submit_write(s.open());
                    }
                    let (client_id, seq) = session.map_or((0, 0), |s| (s.client_id, s.seq));
                    ops.into_iter()
                        .map(|op| {
                            if stale {
                                ReplySlot::ready(GroupReply::Done(g.stale_read(&op)))
                            } else if write {
                                g.submit_write(KvCommand { client_id, seq, op })
                            } else {
                                g.submit_read(op)
                            }
                        })
                        .collect()
                };
                let Some(back) = ctx.forward.borrow().get(&from).cloned() else {
                    continue;
                };
                glommio::spawn_local(async move {
                    let mut replies = Vec::with_capacity(slots.len());
                    for s in &slots {
                        replies.push(s.wait().await);
                    }
                    let _ = back.send(CoreMsg::Reply { id, replies }).await;
                })
                .detach();
            }
            CoreMsg::Reply { id, replies } => {
                if let Some(slots) = ctx.forwarded.borrow_mut().remove(&id) {
                    for (slot, reply) in slots.iter().zip(replies) {
                        slot.fill(reply);
                    }
                }
            }
        }
    }
}

/// The ends of the forwarding channels one core owns, before connecting on its executor.
struct CoreChannels {
    senders: Vec<(u16, SharedSender<CoreMsg>)>,
    receivers: Vec<(u16, SharedReceiver<CoreMsg>)>,
}

/// The data groups one core runs, keyed by their peer group id: where peer frames are routed.
///
/// Today a core runs one data group fixed at start (the bootstrap's group `core`); the registry
/// is keyed by group id so that groups a configuration creates on this core (Join) can be added
/// and those it no longer lists removed (Leave) while the core runs, without touching routing.
/// Messages for a group this core does not run (not created yet, or already removed) are
/// dropped and counted: Raft retries them from its progress state.
#[derive(Default)]
pub struct CoreGroups {
    groups: RefCell<BTreeMap<GroupId, Rc<RefCell<Group>>>>,
    /// Messages that named a data group this core does not run.
    pub messages_unrouted: Cell<u64>,
}

impl CoreGroups {
    /// Registers `group` under its id. A group id is registered at most once at a time: two
    /// replicas of one group on one core would both answer for the same Raft node.
    pub fn insert(&self, group: Rc<RefCell<Group>>) {
        let id = group.borrow().id;
        let before = self.groups.borrow_mut().insert(id, group);
        assert!(
            before.is_none(),
            "data group {id} registered twice on one core"
        );
    }

    /// Unregisters group `id` (its replica stopped); returns it if it was registered.
    pub fn remove(&self, id: GroupId) -> Option<Rc<RefCell<Group>>> {
        self.groups.borrow_mut().remove(&id)
    }

    pub fn get(&self, id: GroupId) -> Option<Rc<RefCell<Group>>> {
        self.groups.borrow().get(&id).cloned()
    }

    /// The ids of the groups this core runs, ascending.
    pub fn ids(&self) -> Vec<GroupId> {
        self.groups.borrow().keys().copied().collect()
    }

    /// One tick for every group of the core.
    fn tick_due(&self) {
        for g in self.groups.borrow().values() {
            g.borrow_mut().tick_due();
        }
    }

    /// Hands `m` to group `id`'s replica on this core; false (and counted) if it runs none.
    fn deliver(&self, id: GroupId, m: Message) -> bool {
        match self.groups.borrow().get(&id) {
            Some(g) => {
                g.borrow_mut().deliver(m);
                true
            }
            None => {
                self.messages_unrouted.set(self.messages_unrouted.get() + 1);
                false
            }
        }
    }
}

/// The outbound peer connections of one core, by host id: core c of this host talks to core c
/// of every other host.
///
/// The hosts of the static map get a connection at start; a host that joined later is only in
/// the controller's configurations, so its connection is opened on demand from the
/// configuration's host entry (`peer/client`, core 0's addresses; core c uses port + c) the
/// first time a configuration names it ([`PeerSenders::open_config_hosts`]).
pub struct PeerSenders {
    me: CoreId,
    tcfg: Rc<TransportConfig>,
    stats: Rc<TransportStats>,
    senders: RefCell<HashMap<u64, PeerSender>>,
}

impl PeerSenders {
    fn new(me: CoreId, tcfg: Rc<TransportConfig>, stats: Rc<TransportStats>) -> PeerSenders {
        PeerSenders {
            me,
            tcfg,
            stats,
            senders: RefCell::new(HashMap::new()),
        }
    }

    /// Opens a connection to core `self.me.core` of `host` at `core0_peer` (that host's core 0
    /// peer address), unless one is open already (the first address a host is known by wins:
    /// a host keeps its address for life).
    fn open(&self, host: u64, core0_peer: SocketAddr) {
        if host == self.me.host || self.senders.borrow().contains_key(&host) {
            return;
        }
        let core = self.me.core;
        let to = CoreId { host, core };
        let Some(port) = core0_peer.port().checked_add(core) else {
            eprintln!("tynamo: core {core}: host {host}'s peer port {core0_peer} + core overflows");
            return;
        };
        let addr = SocketAddr::new(core0_peer.ip(), port);
        let sender = PeerSender::spawn(self.me, to, addr, self.tcfg.clone(), self.stats.clone());
        self.senders.borrow_mut().insert(host, sender);
    }

    /// Opens connections to the hosts of `config` this core has none to yet (hosts that joined
    /// after start). A host entry whose address does not parse is skipped and said once per
    /// call: the controller only stores addresses `tynamo ctl join` parsed, so it is a bug.
    pub fn open_config_hosts(&self, config: &Configuration) {
        for (&host, h) in &config.hosts {
            if host == self.me.host || self.senders.borrow().contains_key(&host) {
                continue;
            }
            match host_peer_addr(h) {
                Some(peer) => self.open(host, peer),
                None => eprintln!(
                    "tynamo: core {}: configuration {} host {host}: no peer address in {:?}",
                    self.me.core, config.num, h.addr
                ),
            }
        }
    }

    /// Queues `frame` for `host`; false when there is no connection to it or its outbox is full.
    fn send(&self, host: u64, frame: &[u8]) -> bool {
        self.senders
            .borrow()
            .get(&host)
            .is_some_and(|s| s.send(frame))
    }
}

/// The peer address (core 0) of a configuration host, from its `peer/client` text.
pub fn host_peer_addr(host: &controller::Host) -> Option<SocketAddr> {
    let (peer, _) = host.addr.split_once('/')?;
    peer.parse().ok()
}

/// Delivers a core's peer frames to its groups by the group id each message carries: the data
/// groups of the core (`CoreGroups`), and on core 0 of a controller host the controller group.
struct GroupSink {
    groups: Rc<CoreGroups>,
    controller: Option<Rc<RefCell<Group<ControllerMachine>>>>,
    opts: VerifierOptions,
    bad_frames: Rc<Cell<u64>>,
}

impl FrameSink for GroupSink {
    fn deliver(&self, _from: CoreId, frame: bytes::Bytes) {
        match decode_batch(&frame, &self.opts) {
            Ok(messages) => {
                for (group, m) in messages {
                    match (group, &self.controller) {
                        (CONTROLLER_GROUP_ID, Some(c)) => c.borrow_mut().deliver(m),
                        _ => {
                            self.groups.deliver(group, m);
                        }
                    }
                }
            }
            Err(_) => self.bad_frames.set(self.bad_frames.get() + 1),
        }
    }
}

fn placement(cfg: &ServerConfig, core: u16) -> Placement {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = match cfg.placement {
        PlacementMode::Pinned => true,
        PlacementMode::Unbound => false,
        PlacementMode::Auto => {
            // Hosts sharing this machine (same IP in the map) share its CPUs.
            let my_ip = cfg.me().map(|h| h.peer.ip());
            let sharing = cfg
                .hosts
                .iter()
                .filter(|h| Some(h.peer.ip()) == my_ip)
                .count()
                .max(1);
            cpus >= sharing * usize::from(cfg.cores)
        }
    };
    if pinned {
        Placement::Fixed(usize::from(core) % cpus)
    } else {
        Placement::Unbound
    }
}

/// Runs the server until a core fails. Each core is one executor thread.
pub fn run(cfg: ServerConfig) -> Result<(), NodeError> {
    cfg.validate()?;
    let cfg = Arc::new(cfg);
    let view = Arc::new(HostView::new(usize::from(cfg.cores)));
    let plan = Arc::new(ControlPlan::new(&cfg));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<(), NodeError>>();
    let mut channels: Vec<CoreChannels> = (0..cfg.cores)
        .map(|_| CoreChannels {
            senders: Vec::new(),
            receivers: Vec::new(),
        })
        .collect();
    for a in 0..cfg.cores {
        for b in 0..cfg.cores {
            if a != b {
                let (tx, rx) = shared_channel::new_bounded(FORWARD_CHANNEL_CAPACITY);
                channels[usize::from(a)].senders.push((b, tx));
                channels[usize::from(b)].receivers.push((a, rx));
            }
        }
    }
    let mut handles = Vec::new();
    for (core, chans) in (0..cfg.cores).zip(channels) {
        let (cfg2, view2, tx) = (cfg.clone(), view.clone(), done_tx.clone());
        let plan2 = plan.clone();
        let builder = LocalExecutorBuilder::new(placement(&cfg, core))
            .name(&format!("tynamo-core-{core}"))
            .io_memory(cfg.io_memory_bytes)
            .preempt_timer(Duration::from_millis(10));
        let handle = builder
            .spawn(move || async move {
                let r = run_core(cfg2, core, view2, plan2, chans).await;
                let _ = tx.send(r);
            })
            .map_err(|e| NodeError::Executor {
                core,
                why: e.to_string(),
            })?;
        handles.push(handle);
    }
    drop(done_tx);
    // Cores run forever; the first to stop decides the outcome.
    match done_rx.recv() {
        Ok(r) => r,
        Err(_) => Err(NodeError::Core {
            core: 0,
            why: "every core stopped without a result".into(),
        }),
    }
}

fn raft_config(cfg: &ServerConfig, node: NodeId) -> raft::Config {
    let mut rc = raft::Config::new(node);
    rc.heartbeat_ticks = cfg.heartbeat_ticks();
    rc.election_ticks = cfg.election_ticks();
    rc.lease_drift_ticks = (rc.election_ticks / 10).max(1);
    rc.read_mode = cfg.read_mode;
    rc.max_inflight_msgs = cfg.inflight_msgs_max;
    rc.max_entries_per_msg = cfg.entries_per_msg_max;
    rc
}

pub fn kv_config(cfg: &ServerConfig) -> kv::Config {
    kv::Config {
        shard_count: cfg.shard_count,
        value_bytes_max: super::config::COMMAND_BYTES_MAX,
        snapshot_log_bytes_threshold: cfg.snapshot_log_bytes,
        ..kv::Config::default()
    }
}

async fn run_core(
    cfg: Arc<ServerConfig>,
    core: u16,
    view: Arc<HostView>,
    plan: Arc<ControlPlan>,
    channels: CoreChannels,
) -> Result<(), NodeError> {
    let err = |why: String| NodeError::Core { core, why };
    let me = cfg
        .me()
        .cloned()
        .ok_or_else(|| err("this host is not in the cluster map".into()))?;
    let spec = DataGroupSpec::bootstrap(&cfg, core);
    let hosts_by_node = spec.hosts_by_node.clone();
    let opened = open_data_group(&cfg, core, &spec).await.map_err(err)?;
    let (group, wal) = (opened.group.clone(), opened.wal.clone());
    let controller = match (core, plan.node_of_host(cfg.id)) {
        (0, Some(node)) => Some(open_controller(&cfg, &plan, node).await?),
        _ => None,
    };

    // Peers.
    let tcfg = Rc::new(TransportConfig {
        cluster_id: cfg.cluster_id,
        ..TransportConfig::default()
    });
    let tstats = Rc::new(TransportStats::default());
    let me_core = CoreId { host: cfg.id, core };
    let peer_addr = SocketAddr::new(me.peer.ip(), me.peer.port() + core);
    let listener = bind_exclusive(peer_addr).map_err(|e| err(e.to_string()))?;
    let bad_frames = Rc::new(Cell::new(0));
    let groups = Rc::new(CoreGroups::default());
    groups.insert(group.clone());
    let ctx_groups = groups.clone();
    let sink = Rc::new(GroupSink {
        groups: groups.clone(),
        controller: controller.as_ref().map(|c| c.group.clone()),
        opts: verifier_options(tcfg.frame_bytes_max),
        bad_frames: bad_frames.clone(),
    });
    spawn_listener(listener, me_core, tcfg.clone(), tstats.clone(), sink);
    let senders = Rc::new(PeerSenders::new(me_core, tcfg.clone(), tstats.clone()));
    // Core 0's connections also carry the controller's messages to the other controller hosts.
    for h in cfg.hosts.iter().filter(|h| h.id != cfg.id) {
        senders.open(h.id, h.peer);
    }

    // Clients.
    let client_addr = SocketAddr::new(me.client.ip(), me.client.port() + core);
    let client_listener = bind_exclusive(client_addr).map_err(|e| err(e.to_string()))?;
    let ctx = Rc::new(CoreCtx {
        cfg: cfg.clone(),
        core,
        group: group.clone(),
        groups,
        view: view.clone(),
        wal: wal.clone(),
        transport_stats: tstats,
        bad_peer_frames: bad_frames,
        next_connection_id: Cell::new(u64::from(core) << 48),
        connections: Cell::new(0),
        forward: RefCell::new(HashMap::new()),
        forwarded: RefCell::new(HashMap::new()),
        next_forward_id: Cell::new(1),
        plan: plan.clone(),
        controller: controller.as_ref().map(|c| c.group.clone()),
    });
    // Connecting waits for the other end's executor; do it off the start path.
    for (to, tx) in channels.senders {
        let ctx2 = ctx.clone();
        glommio::spawn_local(async move {
            let connected = tx.connect().await;
            ctx2.forward.borrow_mut().insert(to, Rc::new(connected));
        })
        .detach();
    }
    for (from, rx) in channels.receivers {
        let ctx2 = ctx.clone();
        glommio::spawn_local(async move {
            let connected = rx.connect().await;
            forward_receiver(ctx2, from, connected).await;
        })
        .detach();
    }
    glommio::spawn_local(super::migrate::drive(ctx.clone())).detach();
    if core == 0 && !ctx.controller_local() {
        glommio::spawn_local(super::migrate::follow_controller(ctx.clone())).detach();
    }
    glommio::spawn_local(super::server::accept_loop(client_listener, ctx)).detach();

    // Ticker (one for the core's groups: a tick wakes each, including groups registered
    // after start).
    let tick = Duration::from_millis(cfg.tick_ms);
    let tick_groups = ctx_groups.clone();
    let c2 = controller.as_ref().map(|c| c.group.clone());
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(tick).await;
            tick_groups.tick_due();
            if let Some(c) = &c2 {
                c.borrow_mut().tick_due();
            }
        }
    })
    .detach();

    // Connections to hosts that joined after start, once a configuration names them.
    glommio::spawn_local(open_joined_hosts(
        senders.clone(),
        view.clone(),
        cfg.heartbeat_ms,
    ))
    .detach();

    // The group loops; the core stops only on a fatal error of a replica or its storage.
    let view2 = view.clone();
    let g = usize::from(core);
    let data = run_data_group(
        opened,
        senders.clone(),
        move |node| hosts_by_node.get(&node).copied(),
        move |gr: &Group| {
            view2.publish(g, gr);
            view2.publish_shards(g, &gr.machine().shards);
        },
    );
    let why = match controller {
        Some(c) => {
            let control = c.run(senders, view, plan, cfg.heartbeat_ms);
            futures_lite::future::or(data, control).await
        }
        None => data.await,
    };
    Err(err(why))
}

/// What one data group replica on a core is: its ids, its Raft node id and members, and which
/// host runs each member (peer messages go to core `core` of that host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataGroupSpec {
    /// The group id its peer frames carry; its storage is `group-{peer_id}` in the data dir.
    pub peer_id: GroupId,
    /// The group's id in the controller's configurations (`peer_id + 1`).
    pub config_group: controller::GroupId,
    /// This replica's Raft node id.
    pub node: NodeId,
    /// The members a fresh replica bootstraps with (ascending).
    pub voters: Vec<NodeId>,
    /// Raft node id -> host id, for every member.
    pub hosts_by_node: BTreeMap<NodeId, u64>,
}

impl DataGroupSpec {
    /// The static map's group on `core`: a replica on every host, whose Raft node id is its
    /// host id (what every log written so far uses, so it must stay so).
    pub fn bootstrap(cfg: &ServerConfig, core: u16) -> DataGroupSpec {
        let voters = cfg.voters();
        DataGroupSpec {
            peer_id: GroupId::from(core),
            config_group: super::migrate::group_of_core(core),
            node: cfg.id,
            hosts_by_node: voters.iter().map(|&h| (h, h)).collect(),
            voters,
        }
    }

    /// Configuration group `group`'s replica on (`host`, `core`), if `config` places one
    /// there. A group created after the bootstrap uses the configuration's node ids (1, 2, ...
    /// in replica order), the same on every host, whichever hosts joined later.
    pub fn from_config(
        config: &Configuration,
        group: controller::GroupId,
        host: u64,
        core: u16,
    ) -> Option<DataGroupSpec> {
        let g = config.groups.get(&group)?;
        let mine = g
            .replicas
            .iter()
            .find(|r| r.slot.host == host && r.slot.core == core)?;
        let mut voters: Vec<NodeId> = g.replicas.iter().map(|r| r.node_id).collect();
        voters.sort_unstable();
        Some(DataGroupSpec {
            peer_id: group.checked_sub(1)?,
            config_group: group,
            node: mine.node_id,
            voters,
            hosts_by_node: g
                .replicas
                .iter()
                .map(|r| (r.node_id, r.slot.host))
                .collect(),
        })
    }
}

/// A data group replica opened from its storage, not yet running.
struct OpenedGroup {
    group: Rc<RefCell<Group>>,
    storage: GroupStorage,
    wal: Rc<tynamo_wal::Wal>,
    snapshots: Rc<tynamo_wal::SnapshotStore>,
}

/// Opens (or, on an empty directory, creates with `spec.voters`) data group `spec` on `core`:
/// its WAL, snapshot and state machine. A new replica holds no shard: the first configuration
/// that names its group gives it its shards.
async fn open_data_group(
    cfg: &ServerConfig,
    core: u16,
    spec: &DataGroupSpec,
) -> Result<OpenedGroup, String> {
    let dir = cfg.data_dir.join(format!("group-{}", spec.peer_id));
    let wal_opts = WalOptions {
        segment_bytes: cfg.segment_bytes,
        entry_bytes_max: super::config::ENTRY_BYTES_MAX,
        ..WalOptions::default()
    };
    let kvc = kv_config(cfg);
    let (storage, recovered) = GroupStorage::open(spec.peer_id, &dir, wal_opts, &spec.voters)
        .await
        .map_err(|e| format!("group {}: {e}", spec.peer_id))?;
    let machine = match recovered.machine_snapshot() {
        Some((index, data)) => KvMachine::restore(kvc.clone(), spec.config_group, data)
            .map_err(|e| format!("snapshot {index} in {}: {e}", dir.display()))?,
        None => KvMachine::new(
            kv::StateMachine::new(kvc.clone(), []),
            kvc,
            spec.config_group,
        ),
    };
    let seed = cfg.id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(core)
        ^ spec.peer_id.rotate_left(32)
        ^ now_nanos();
    let raw = RawNode::new(raft_config(cfg, spec.node), recovered.initial, seed)
        .map_err(|e| format!("group {}: raft config: {e}", spec.peer_id))?;
    let group = Rc::new(RefCell::new(Group::new(
        spec.peer_id,
        raw,
        machine,
        u64::from(cfg.election_ticks()),
    )));
    let (wal, snapshots) = (storage.wal.clone(), storage.snapshots.clone());
    Ok(OpenedGroup {
        group,
        storage,
        wal,
        snapshots,
    })
}

/// Runs an opened data group: its persister and its loop (`host_of` maps its node ids to
/// hosts, `publish` runs after each turn). Returns why it stopped: a fatal error of the replica
/// or of its storage.
async fn run_data_group(
    opened: OpenedGroup,
    senders: Rc<PeerSenders>,
    host_of: impl Fn(NodeId) -> Option<u64>,
    publish: impl Fn(&Group),
) -> String {
    let OpenedGroup {
        group,
        storage,
        wal,
        snapshots,
    } = opened;
    let wake = group.borrow().wake.clone();
    let persist_wake = Rc::new(Signal::default());
    let persister =
        glommio::spawn_local(persist_loop(group.clone(), storage, persist_wake.clone()));
    let looper = group_loop(
        group,
        wake,
        persist_wake,
        senders,
        host_of,
        publish,
        snapshots,
        wal,
    );
    futures_lite::future::or(looper, async {
        let e = persister.await;
        format!("storage failed: {e}")
    })
    .await
}

/// Every heartbeat: when this host knows a newer configuration, opens peer connections to the
/// hosts it names that this core has none to (a few map lookups per configuration change; an
/// unchanged number costs one atomic load).
async fn open_joined_hosts(senders: Rc<PeerSenders>, view: Arc<HostView>, period_ms: u64) {
    let every = Duration::from_millis(period_ms.max(1));
    let mut seen = 0;
    loop {
        glommio::timer::sleep(every).await;
        let num = view.controller.config_num.load(Ordering::Relaxed);
        if num == seen {
            continue;
        }
        if let Some(config) = view.latest_config() {
            senders.open_config_hosts(&config);
            seen = config.num;
        }
    }
}

/// The controller replica of this host, opened but not yet running.
struct ControllerReplica {
    group: Rc<RefCell<Group<ControllerMachine>>>,
    storage: GroupStorage,
}

async fn open_controller(
    cfg: &ServerConfig,
    plan: &ControlPlan,
    node: NodeId,
) -> Result<ControllerReplica, NodeError> {
    let err = |why: String| NodeError::Core {
        core: 0,
        why: format!("controller: {why}"),
    };
    let dir = cfg.data_dir.join("controller");
    let wal_opts = WalOptions {
        segment_bytes: CONTROLLER_SEGMENT_BYTES,
        entry_bytes_max: CONTROLLER_ENTRY_BYTES_MAX,
        staged_bytes_max: CONTROLLER_SEGMENT_BYTES as usize,
        spare_segments_max: 1,
    };
    let (storage, recovered) =
        GroupStorage::open(CONTROLLER_GROUP_ID, &dir, wal_opts, &plan.voters())
            .await
            .map_err(|e| err(e.to_string()))?;
    let sm = match recovered.machine_snapshot() {
        Some((index, data)) => controller::StateMachine::restore(plan.settings.clone(), data)
            .map_err(|e| err(format!("snapshot {index} in {}: {e}", dir.display())))?,
        None => {
            controller::StateMachine::new(plan.settings.clone()).map_err(|e| err(e.to_string()))?
        }
    };
    let seed = cfg.id.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ now_nanos();
    let raw = RawNode::new(raft_config(cfg, node), recovered.initial, seed)
        .map_err(|e| err(format!("raft config: {e}")))?;
    let group = Group::with_machine(
        CONTROLLER_GROUP_ID,
        raw,
        ControllerMachine::new(sm),
        u64::from(cfg.election_ticks()),
    );
    Ok(ControllerReplica {
        group: Rc::new(RefCell::new(group)),
        storage,
    })
}

impl ControllerReplica {
    /// Runs the controller's loop, persister and bootstrap proposer; returns why it stopped.
    async fn run(
        self,
        senders: Rc<PeerSenders>,
        view: Arc<HostView>,
        plan: Arc<ControlPlan>,
        retry_ms: u64,
    ) -> String {
        let ControllerReplica { group, storage } = self;
        let wake = group.borrow().wake.clone();
        let (wal, snapshots) = (storage.wal.clone(), storage.snapshots.clone());
        let persist_wake = Rc::new(Signal::default());
        let persister =
            glommio::spawn_local(persist_loop(group.clone(), storage, persist_wake.clone()));
        glommio::spawn_local(bootstrap_loop(group.clone(), plan.clone(), retry_ms)).detach();
        let plan2 = plan.clone();
        let looper = group_loop(
            group,
            wake,
            persist_wake,
            senders,
            move |node| plan2.host_of_node(node),
            move |gr: &Group<ControllerMachine>| view.publish_controller(&plan, gr),
            snapshots,
            wal,
        );
        futures_lite::future::or(looper, async {
            let e = persister.await;
            format!("controller storage failed: {e}")
        })
        .await
    }
}

/// While this replica leads the controller, proposes the bootstrap commands the configuration
/// still lacks (one at a time; a duplicate is answered from the bootstrap session).
async fn bootstrap_loop(
    group: Rc<RefCell<Group<ControllerMachine>>>,
    plan: Arc<ControlPlan>,
    retry_ms: u64,
) {
    // Every heartbeat until bootstrapped (the loop then ends): a new cluster gets its first
    // configuration about one election after start.
    let every = Duration::from_millis(retry_ms.max(1));
    loop {
        glommio::timer::sleep(every).await;
        let slot = {
            let mut g = group.borrow_mut();
            let Some(command) = plan.next_bootstrap(g.machine().sm.latest()) else {
                // Bootstrapped (every replica sees it once it applied the commands): nothing
                // more to do here, ever; the history only grows.
                return;
            };
            if !g.is_leader() {
                continue;
            }
            g.submit_write(command.clone())
        };
        // NotLeader and Unavailable are retried on the next round.
        if let GroupReply::Done(controller::Reply::Err(e)) = slot.wait().await {
            eprintln!("tynamo: controller bootstrap command refused: {e}");
        }
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One group's loop: turns, sending (`host_of` maps the group's node ids to hosts), publishing
/// its state after each turn, and saving the snapshots it takes.
#[allow(clippy::too_many_arguments)]
async fn group_loop<M: Machine + 'static>(
    group: Rc<RefCell<Group<M>>>,
    wake: Rc<Signal>,
    persist_wake: Rc<Signal>,
    senders: Rc<PeerSenders>,
    host_of: impl Fn(NodeId) -> Option<u64>,
    publish: impl Fn(&Group<M>),
    snapshots: Rc<tynamo_wal::SnapshotStore>,
    wal: Rc<tynamo_wal::Wal>,
) -> String {
    let mut fbb = FlatBufferBuilder::new();
    loop {
        wake.wait().await;
        let (mut messages, snapshot) = {
            let mut gr = group.borrow_mut();
            gr.turn();
            if let Some(f) = gr.fatal.take() {
                return f;
            }
            if !gr.jobs.is_empty() {
                persist_wake.notify();
            }
            publish(&gr);
            (std::mem::take(&mut gr.outbox), gr.snapshot_request.take())
        };
        let gid = group.borrow().id;
        send_messages(&mut fbb, gid, &mut messages, &senders, &host_of);
        if let Some(snap) = snapshot {
            let (group, snapshots, wal) = (group.clone(), snapshots.clone(), wal.clone());
            glommio::spawn_local(async move {
                let gid = group.borrow().id;
                match save_local_snapshot(gid, &snapshots, &snap.meta, &snap.data).await {
                    Ok(()) => {
                        let compact = group
                            .borrow_mut()
                            .snapshot_saved(snap.meta.index, snap.data.clone());
                        if compact {
                            if let Err(e) = wal.compact_prefix(snap.meta.index).await {
                                eprintln!("tynamo: group {gid}: log compaction failed: {e}");
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("tynamo: group {gid}: snapshot failed: {e}");
                        group.borrow_mut().snapshot_failed();
                    }
                }
            })
            .detach();
        }
    }
}

/// Sends a turn's messages: one frame per destination (cut at `FRAME_TARGET_BYTES`), in order.
fn send_messages(
    fbb: &mut FlatBufferBuilder<'static>,
    group: GroupId,
    messages: &mut [Message],
    senders: &PeerSenders,
    host_of: &impl Fn(NodeId) -> Option<u64>,
) {
    if messages.is_empty() {
        return;
    }
    // Stable: messages to one peer keep their order.
    messages.sort_by_key(|m| m.to);
    let mut refs: Vec<(GroupId, &Message)> = Vec::new();
    let mut at = 0;
    while at < messages.len() {
        let to = messages[at].to;
        let mut bytes = 0u64;
        refs.clear();
        while at < messages.len() && messages[at].to == to {
            let size = messages[at].size_bytes();
            if !refs.is_empty() && bytes + size > FRAME_TARGET_BYTES {
                break;
            }
            bytes += size;
            refs.push((group, &messages[at]));
            at += 1;
        }
        if let Some(host) = host_of(to) {
            let frame = encode_batch(fbb, &refs);
            // A full outbox (or a host not connected yet) drops the frame: Raft retries from
            // its progress state.
            let _ = senders.send(host, frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Reply, StateMachine};
    use crate::node::config::parse_initial_cluster;

    fn bootstrap_config(cfg: &ServerConfig) -> Configuration {
        let plan = ControlPlan::new(cfg);
        let mut sm = StateMachine::new(plan.settings.clone()).unwrap();
        let mut index = 1;
        while let Some(c) = plan.next_bootstrap(sm.latest()).cloned() {
            assert!(index < 10, "bootstrap does not converge");
            index += 1;
            let reply = sm.apply(index, &c.encode());
            assert!(matches!(reply, Some(Reply::Ok { .. })), "{reply:?}");
        }
        sm.latest().clone()
    }

    #[test]
    fn a_configuration_hosts_peer_address_is_its_core_0_peer_address() {
        let host = |addr: &str| controller::Host {
            cores: 2,
            addr: addr.into(),
        };
        assert_eq!(
            host_peer_addr(&host("127.0.0.1:7141/127.0.0.1:7041")),
            Some("127.0.0.1:7141".parse().unwrap())
        );
        // The controller stores what `ctl join` parsed; anything else is refused, not guessed.
        assert_eq!(host_peer_addr(&host("127.0.0.1:7141")), None);
        assert_eq!(host_peer_addr(&host("nowhere/127.0.0.1:7041")), None);
    }

    #[test]
    fn a_configuration_groups_replica_spec_agrees_with_the_bootstrap_on_ids_and_hosts() {
        let map = "5=10.0.0.5:7101,9=10.0.0.9:7101,2=10.0.0.2:7101";
        let hosts = parse_initial_cluster(map).unwrap();
        for me in [2, 5, 9] {
            let cfg = ServerConfig::new(me, "/tmp/unused".into(), hosts.clone(), 2);
            let config = bootstrap_config(&cfg);
            for core in 0..2 {
                let boot = DataGroupSpec::bootstrap(&cfg, core);
                let from = DataGroupSpec::from_config(&config, boot.config_group, me, core)
                    .unwrap_or_else(|| panic!("host {me} core {core}: no replica in {config:?}"));
                // Same group ids, storage and member hosts; the bootstrap keeps host ids as
                // node ids (its logs say so), a configuration numbers nodes 1, 2, 3.
                assert_eq!(from.peer_id, boot.peer_id);
                assert_eq!(from.config_group, boot.config_group);
                let member_hosts = |s: &DataGroupSpec| {
                    let mut h: Vec<u64> = s.hosts_by_node.values().copied().collect();
                    h.sort_unstable();
                    h
                };
                assert_eq!(member_hosts(&from), member_hosts(&boot));
                assert_eq!(from.voters, vec![1, 2, 3]);
                assert_eq!(from.hosts_by_node.get(&from.node), Some(&me));
                assert_eq!(boot.hosts_by_node.get(&boot.node), Some(&me));
            }
            // No replica on a core the host does not have, nor for a group that does not exist.
            assert!(DataGroupSpec::from_config(&config, 1, me, 7).is_none());
            assert!(DataGroupSpec::from_config(&config, 99, me, 0).is_none());
        }
    }
}
