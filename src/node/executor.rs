//! One glommio executor per core, each running the replicas of the data groups the
//! configurations place on it (one or several per core, or none), its peer transport, its timers
//! and its client listener.
//!
//! Tasks of a core:
//! - per data group replica (`replica`): the group loop (waits on the group's signal, runs a
//!   turn, sends the turn's messages, one frame per destination core per turn, hands storage
//!   writes to the persister) and the persister (`group::persist_loop`), in one task that is
//!   cancelled when the replica is removed; and the replica's migration driver
//!   (`migrate::drive`): while the replica leads its group, moves the group through the
//!   controller's configurations (AcceptConfig, pulls, confirms); on any replica, removes it
//!   once its group has drained;
//! - the configuration walk (`replica::walk`): creates the replicas a configuration places on
//!   this core;
//! - the ticker: one tick every `tick_ms` for every group of the core, so an idle core wakes
//!   `1000 / tick_ms` times a second and parks in io_uring in between (spinning before parking
//!   is off);
//! - the peer listener and one writer per remote (host, core) this core sends to (`transport`);
//! - the client listener and one task per client connection (`server`);
//! - on core 0 of a host without a controller replica, `migrate::follow_controller` keeps the
//!   host's view of the latest configuration fresh from a controller host;
//! - on core 0 of the first three hosts: the controller group's loop, persister and bootstrap
//!   proposer (`control`), on the same storage and Ready-loop code as the data groups, sharing
//!   the core's peer connections (its messages carry group id `CONTROLLER_GROUP_ID`).
//!
//! Measured idle cost (`tools/cluster.sh idle-cpu 10`, release build, 3 hosts x 2 cores on one
//! 2-CPU machine under other load): 3.4% of one CPU for the whole idle cluster (1.0-1.2% per
//! host): 100 ticks/s per core plus 10 heartbeats/s per group. With the controller group on
//! core 0 of each host: 3.6% (one run, same conditions).
//!
//! Groups and peers of a core: `CoreGroups` holds the core's data group replicas by peer group
//! id and routes every peer message by the group id it carries (a message for a group the core
//! does not run is dropped and counted: Raft retries). A replica's members may run on any core
//! of their hosts (a group created by a Join lands on whichever slots the controller chose), so
//! `PeerSenders` keeps one outbound connection per destination (host, core), opened on first
//! use from the static map or the latest configuration's host entry.
//!
//! Cross-core: the `HostView` below (per group replica of this host: its core, its leader, term
//! and indexes, its migration state, as relaxed atomics and small locks each core publishes
//! after a turn; read for `-MOVED`, `CLUSTER SLOTS`, `INFO` and `tynamo ctl status`), and
//! bounded glommio channels (`CoreMsg`) that carry requests which reached the wrong core of the
//! right host. A cluster client that routes by `CLUSTER SLOTS` never uses them: nothing on its
//! write path crosses cores.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flatbuffers::{FlatBufferBuilder, VerifierOptions};
use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use tynamo_wal::WalOptions;

use crate::controller::{self, Configuration, GroupId as ControllerGroupId, Slot};
use crate::kv::{self, Command as KvCommand, Op};
use crate::raft::{self, Message, NodeId, RawNode, Role};
use crate::shard::migration::{GroupShards, Phase, Route};

use super::codec::{decode_batch, encode_batch, verifier_options, GroupId};
use super::config::{PlacementMode, ServerConfig};
use super::control::{
    host_client_addr, ControlPlan, CONTROLLER_ENTRY_BYTES_MAX, CONTROLLER_GROUP_ID,
    CONTROLLER_SEGMENT_BYTES,
};
use super::group::{persist_loop, Group, GroupReply, ReplySlot, Signal};
use super::machine::{ControllerMachine, Machine};
use super::replica::{CoreGroup, DataGroupSpec, DiskGroups};
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
    #[error("data directory: {0}")]
    Data(String),
    #[error("joining the cluster: {0}")]
    Join(String),
}

/// What every core of a host can read about the host's data group replicas and the controller
/// (published by the cores after their turns; read off the request path).
pub struct HostView {
    /// The data group replicas of this host, by configuration group id.
    groups: Mutex<BTreeMap<ControllerGroupId, Arc<GroupView>>>,
    /// Groups whose replica this host removed (their tombstones): a host asked about one of
    /// them answers GONE (pull, removal question) or DONE (confirm).
    removed: Mutex<BTreeSet<ControllerGroupId>>,
    /// The leader of each group without a replica here, as its leaders announce it
    /// (`TYNAMO.MIGRATE LEADER`): (term, slot), the highest term kept. Only a routing hint for
    /// `-MOVED` and `CLUSTER SLOTS`: a stale one costs a client one more redirect.
    leader_hints: Mutex<HashMap<ControllerGroupId, (u64, Slot)>>,
    /// The controller replica of this host (core 0), if it runs one.
    pub controller: ControllerView,
    /// The latest configuration the controller replica of this host applied (or, on a host
    /// without one, fetched). Read by `CLUSTER SLOTS/SHARDS/NODES`, routing and `tynamo ctl`,
    /// written when a new configuration is applied: a lock off the request path.
    pub config: Mutex<Option<Arc<Configuration>>>,
    /// Configurations this host knows, by number (the last [`HOST_CONFIGS_KEPT`]): what the
    /// data groups of this host accept one at a time.
    pub configs: Mutex<BTreeMap<u64, Arc<Configuration>>>,
}

/// Configurations a host keeps for its data groups. A group more than this many behind asks
/// another controller host (`TYNAMO.MIGRATE CONFIG`), which keeps the same window.
pub const HOST_CONFIGS_KEPT: usize = 256;

/// One data group replica's migration state as `tynamo ctl status` shows it.
#[derive(Default, Clone, Debug)]
pub struct MigrationView {
    pub config_num: u64,
    /// The group's current configuration no longer lists it: it hands its shards over, then
    /// its replicas are removed.
    pub retired: bool,
    /// Shards plainly served.
    pub serving: usize,
    /// Shards not plainly Serving, in shard order (at most the shard count).
    pub in_flight: Vec<(u16, Phase)>,
}

/// One data group replica of this host: what it is, and its state as its core last published
/// it (relaxed atomics; a reader may see a mix of two turns, which only costs a redirect).
pub struct GroupView {
    pub spec: DataGroupSpec,
    /// Raft node id of the leader as this replica knows it (0: unknown).
    leader: AtomicU64,
    pub term: AtomicU64,
    pub commit: AtomicU64,
    pub applied: AtomicU64,
    /// 0 follower, 1 pre-candidate, 2 candidate, 3 leader.
    role: AtomicU8,
    migration: Mutex<MigrationView>,
    /// The migration applied index `migration` was built at.
    migration_index: AtomicU64,
}

impl GroupView {
    pub fn new(spec: DataGroupSpec) -> GroupView {
        GroupView {
            spec,
            leader: AtomicU64::new(0),
            term: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            role: AtomicU8::new(0),
            migration: Mutex::new(MigrationView::default()),
            migration_index: AtomicU64::new(u64::MAX),
        }
    }

    /// The configuration group id.
    pub fn id(&self) -> ControllerGroupId {
        self.spec.config_group
    }

    /// The slot of the group's leader, as this replica knows it.
    pub fn leader_slot(&self) -> Option<Slot> {
        self.spec.slot_of(self.leader.load(Ordering::Relaxed))
    }

    pub fn is_leader(&self) -> bool {
        self.role.load(Ordering::Relaxed) == 3
    }

    pub fn role_name(&self) -> &'static str {
        match self.role.load(Ordering::Relaxed) {
            3 => "leader",
            2 => "candidate",
            1 => "precandidate",
            _ => "follower",
        }
    }

    pub fn migration(&self) -> MigrationView {
        self.migration.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub(crate) fn publish(&self, group: &Group) {
        let s = group.raw().status();
        self.leader.store(s.leader, Ordering::Relaxed);
        self.term.store(s.term, Ordering::Relaxed);
        self.commit.store(s.commit, Ordering::Relaxed);
        self.applied.store(s.applied, Ordering::Relaxed);
        let role = match s.role {
            Role::Follower => 0,
            Role::PreCandidate => 1,
            Role::Candidate => 2,
            Role::Leader => 3,
        };
        self.role.store(role, Ordering::Relaxed);
        self.publish_shards(&group.machine().shards);
    }

    /// Republishes the migration state when the group applied a migration entry since the
    /// last time (a lock taken a few times per configuration change, not per request).
    fn publish_shards(&self, shards: &GroupShards) {
        let index = shards.applied_index();
        if self.migration_index.swap(index, Ordering::Relaxed) == index {
            return;
        }
        if let Ok(mut m) = self.migration.lock() {
            m.config_num = shards.config_num();
            m.retired = shards.is_retired();
            m.in_flight = shards
                .shards()
                .filter(|(_, p)| *p != Phase::Serving)
                .collect();
            m.serving = shards.shards().count() - m.in_flight.len();
        }
    }
}

/// The controller replica's facts, published after each of its turns (relaxed atomics).
#[derive(Default)]
pub struct ControllerView {
    /// Host id of the controller leader as this replica knows it (0: unknown).
    pub leader_host: AtomicU64,
    pub term: AtomicU64,
    pub commit: AtomicU64,
    pub applied: AtomicU64,
    /// The number of the latest configuration known here.
    pub config_num: AtomicU64,
}

impl Default for HostView {
    fn default() -> Self {
        HostView::new()
    }
}

impl HostView {
    pub fn new() -> HostView {
        HostView {
            groups: Mutex::new(BTreeMap::new()),
            removed: Mutex::new(BTreeSet::new()),
            leader_hints: Mutex::new(HashMap::new()),
            controller: ControllerView::default(),
            config: Mutex::new(None),
            configs: Mutex::new(BTreeMap::new()),
        }
    }

    /// The replica of group `id` on this host, if it runs one.
    pub fn group(&self, id: ControllerGroupId) -> Option<Arc<GroupView>> {
        self.groups.lock().ok()?.get(&id).cloned()
    }

    /// Every data group replica of this host, in group order.
    pub fn groups(&self) -> Vec<Arc<GroupView>> {
        self.groups
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn register(&self, group: Arc<GroupView>) {
        if let Ok(mut g) = self.groups.lock() {
            let before = g.insert(group.id(), group);
            assert!(before.is_none(), "a group has one replica per host");
        }
    }

    pub fn unregister(&self, id: ControllerGroupId) {
        if let Ok(mut g) = self.groups.lock() {
            g.remove(&id);
        }
    }

    /// Whether this host removed its replica of group `id` (it drained).
    pub fn is_removed(&self, id: ControllerGroupId) -> bool {
        self.removed.lock().is_ok_and(|r| r.contains(&id))
    }

    pub fn removed(&self) -> BTreeSet<ControllerGroupId> {
        self.removed.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Records that group `id`'s replica here was removed (its tombstone is durable).
    pub fn mark_removed(&self, id: ControllerGroupId) {
        if let Ok(mut r) = self.removed.lock() {
            r.insert(id);
        }
    }

    /// Records that `slot` leads group `group` in `term` (announced by that leader).
    pub fn hint_leader(&self, group: ControllerGroupId, term: u64, slot: Slot) {
        if let Ok(mut hints) = self.leader_hints.lock() {
            let hint = hints.entry(group).or_insert((term, slot));
            if term >= hint.0 {
                *hint = (term, slot);
            }
        }
    }

    /// The leader of group `group` as this host knows it: from its replica here, else from the
    /// group's announcements.
    pub fn leader_of(&self, group: ControllerGroupId) -> Option<Slot> {
        match self.group(group) {
            Some(g) => g.leader_slot(),
            None => self.leader_hints.lock().ok()?.get(&group).map(|h| h.1),
        }
    }

    /// The highest term of any group replica here (the `CLUSTER SLOTS` epoch).
    pub fn epoch(&self) -> u64 {
        self.groups()
            .iter()
            .map(|g| g.term.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
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
        self.keep(config);
    }

    /// Keeps configuration `config` for the groups of this host (one fetched for a walk or a
    /// group's next step): it does not change which one is the latest.
    pub fn keep(&self, config: Arc<Configuration>) {
        if let Ok(mut kept) = self.configs.lock() {
            kept.insert(config.num, config);
            while kept.len() > HOST_CONFIGS_KEPT {
                kept.pop_first();
            }
        }
    }

    /// Configuration `num` as this host knows it.
    pub fn config(&self, num: u64) -> Option<Arc<Configuration>> {
        self.configs.lock().ok()?.get(&num).cloned()
    }

    /// The latest configuration this host knows.
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
    /// The configuration group it is for.
    pub group: ControllerGroupId,
    pub ops: Vec<Op>,
    pub write: bool,
    /// A READONLY read: answered from the replica's applied state.
    pub stale: bool,
    /// Set for a `TYNAMO.SEQ` write (then `ops` holds exactly that one write).
    pub session: Option<SessionWrite>,
    /// Open the session in the target group first (the connection has not written there yet).
    pub open_session: bool,
}

/// Requests forwarded between the cores of one host (a client on core a asked for a key of a
/// group on core b, whose leader is on this host) and their replies. Bounded channels, one per
/// ordered pair of cores.
pub enum CoreMsg {
    Request { id: u64, forward: Forward },
    Reply { id: u64, replies: Vec<GroupReply> },
}

/// Forwarded requests in flight per ordered pair of cores.
pub const FORWARD_CHANNEL_CAPACITY: usize = 4096;

/// Where a request for a shard goes, seen from one core (`CoreCtx::target`).
pub enum Target {
    /// A group of this core decides: it serves the shard, or holds it in some phase and answers
    /// by its own log (TRYAGAIN, ASK, MOVED).
    Local(Rc<CoreGroup>),
    /// The owner's replica on this host runs on core `core`.
    Core {
        core: u16,
        group: ControllerGroupId,
        /// That replica leads its group.
        leader_here: bool,
        /// The leader's slot, when that replica knows it.
        leader: Option<Slot>,
    },
    /// The owner has no replica on this host: a client address of one of its replicas (the
    /// leader's when this host knows it), or None while no configuration names an owner.
    Remote(Option<SocketAddr>),
}

/// What a core's client connections share.
pub struct CoreCtx {
    pub cfg: Arc<ServerConfig>,
    pub core: u16,
    /// Every data group replica this core runs, by group id (peer routing, requests, INFO).
    pub groups: Rc<CoreGroups>,
    pub view: Arc<HostView>,
    /// Outbound peer connections of this core (data groups' and the controller's messages).
    pub senders: Rc<PeerSenders>,
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
    /// Why a replica of this core failed for good (its storage): the core stops.
    pub fatal: RefCell<Option<String>>,
    pub fatal_wake: Signal,
}

impl CoreCtx {
    /// Client address of `host`'s core `core`: from `--initial-cluster`, else from the latest
    /// configuration's host entry (hosts that joined later).
    pub fn client_addr(&self, host: u64, core: u16) -> Option<SocketAddr> {
        let base = match self.cfg.host(host) {
            Some(h) if !self.cfg.joined || host == self.cfg.id => h.client,
            _ => host_client_addr(self.view.latest_config()?.hosts.get(&host)?)?,
        };
        Some(SocketAddr::new(base.ip(), base.port().checked_add(core)?))
    }

    pub fn slot_client_addr(&self, slot: Slot) -> Option<SocketAddr> {
        self.client_addr(slot.host, slot.core)
    }

    /// Whether this host runs a controller replica (on core 0).
    pub fn controller_local(&self) -> bool {
        self.plan.node_of_host(self.cfg.id).is_some()
    }

    /// Hands `forward` to the group on `core` (same host) and returns the slots its replies
    /// will fill, or None when that core's queue is full.
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

    /// Where a request for `shard` goes. A group of this core that holds the shard decides
    /// (one that serves it first, then one importing it, then one exporting it: two groups of
    /// one core may hold the same shard while it moves between them); else the shard's owner in
    /// the latest configuration, wherever its replica on this host runs, or elsewhere.
    pub fn target(&self, shard: u16) -> Target {
        let mut moved_to = None;
        if let Some((group, route)) = self.groups.best_route(shard) {
            match route {
                Route::Moved { group: to } => {
                    let num = group.group.borrow().machine().shards.config_num();
                    moved_to = Some((to, num));
                }
                _ => return Target::Local(group),
            }
        }
        // The owner in the newest configuration at hand: this host's view, or a local group's
        // own (a group may have accepted a configuration this host's view has not caught up
        // with yet: views of hosts without a controller replica are refreshed by polling).
        let latest = self.view.latest_config();
        let assigned = |g: ControllerGroupId| (g != controller::GROUP_NONE).then_some(g);
        let owner = match (latest.as_deref(), moved_to) {
            (Some(c), Some((to, num))) if num > c.num => assigned(to),
            (Some(c), _) => c.owner(shard).and_then(assigned),
            (None, Some((to, _))) => assigned(to),
            // No configuration yet: the static map (group k + 1 on core k).
            (None, None) => Some(ControllerGroupId::from(self.cfg.shard_group(shard)) + 1),
        };
        let Some(owner) = owner else {
            return Target::Remote(None);
        };
        // The owner runs here (it has not accepted the configuration that gives it the shard
        // yet): it decides, by its own log.
        if let Some(group) = self.groups.by_config(owner) {
            return Target::Local(group);
        }
        if let Some(gv) = self.view.group(owner) {
            let leader = gv.leader_slot();
            return Target::Core {
                core: gv.spec.core,
                group: owner,
                leader_here: gv.is_leader(),
                leader,
            };
        }
        Target::Remote(self.group_addr(owner, latest.as_deref()))
    }

    /// A client address for configuration group `group`: its leader's when this host has a
    /// replica that knows it, else this host's replica (which knows more), else the announced
    /// leader if it is one of the group's replicas, else the first replica the latest
    /// configuration lists (it redirects to its leader).
    pub fn group_addr(
        &self,
        group: ControllerGroupId,
        latest: Option<&Configuration>,
    ) -> Option<SocketAddr> {
        if let Some(gv) = self.view.group(group) {
            let slot = gv.leader_slot().unwrap_or(Slot {
                host: self.cfg.id,
                core: gv.spec.core,
            });
            return self.slot_client_addr(slot);
        }
        let owned;
        let config = match latest {
            Some(c) => c,
            None => {
                owned = self.view.latest_config()?;
                &owned
            }
        };
        let replicas = &config.groups.get(&group)?.replicas;
        let hint = self
            .view
            .leader_of(group)
            .filter(|h| replicas.iter().any(|r| r.slot == *h));
        let slot = hint.or(replicas.first().map(|r| r.slot))?;
        self.slot_client_addr(slot)
    }

    /// The client address of node `node` of configuration group `group` (a leader hint).
    pub fn node_addr(&self, group: ControllerGroupId, node: NodeId) -> Option<SocketAddr> {
        let slot = match self.groups.by_config(group) {
            Some(g) => g.view.spec.slot_of(node),
            None => self.view.group(group)?.spec.slot_of(node),
        }?;
        self.slot_client_addr(slot)
    }
}

/// Serves what another core of this host sends: requests for a group of this core, and replies
/// to requests this core forwarded.
async fn forward_receiver(
    ctx: Rc<CoreCtx>,
    from: u16,
    rx: glommio::channels::shared_channel::ConnectedReceiver<CoreMsg>,
) {
    while let Some(msg) = rx.recv().await {
        match msg {
            CoreMsg::Request { id, forward } => {
                let Forward {
                    group,
                    ops,
                    write,
                    stale,
                    session,
                    open_session,
                } = forward;
                let slots: Vec<ReplySlot> = match ctx.groups.by_config(group) {
                    // Removed since the sender looked (it drained): the client retries and
                    // finds the new owner.
                    None => ops
                        .iter()
                        .map(|_| {
                            ReplySlot::ready(GroupReply::Unavailable(format!(
                                "group {group} is not on core {} any more",
                                ctx.core
                            )))
                        })
                        .collect(),
                    Some(entry) => {
                        let mut g = entry.group.borrow_mut();
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
                    }
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

/// The data group replicas one core runs, keyed by their peer group id: where peer frames are
/// routed, and which group a request for a shard goes to.
///
/// Replicas are added when a configuration places a group here (or at start) and removed once
/// their group drained (`replica`), while the core runs. Messages for a group this core does
/// not run (not created yet, or already removed) are dropped and counted: Raft retries them
/// from its progress state.
#[derive(Default)]
pub struct CoreGroups {
    groups: RefCell<BTreeMap<GroupId, Rc<CoreGroup>>>,
    /// Messages that named a data group this core does not run.
    pub messages_unrouted: Cell<u64>,
}

impl CoreGroups {
    /// Registers `entry` under its group id. A group id is registered at most once at a time:
    /// two replicas of one group on one core would both answer for the same Raft node.
    pub fn insert(&self, entry: Rc<CoreGroup>) {
        let id = entry.group.borrow().id;
        let before = self.groups.borrow_mut().insert(id, entry);
        assert!(
            before.is_none(),
            "data group {id} registered twice on one core"
        );
    }

    /// Unregisters group `id` (its replica stops); returns it if it was registered.
    pub fn remove(&self, id: GroupId) -> Option<Rc<CoreGroup>> {
        self.groups.borrow_mut().remove(&id)
    }

    pub fn get(&self, id: GroupId) -> Option<Rc<CoreGroup>> {
        self.groups.borrow().get(&id).cloned()
    }

    /// The replica of configuration group `group`, if this core runs it.
    pub fn by_config(&self, group: ControllerGroupId) -> Option<Rc<CoreGroup>> {
        self.get(group.checked_sub(1)?)
    }

    /// The first replica of this core (lowest group id), for INFO's group sections.
    pub fn first(&self) -> Option<Rc<CoreGroup>> {
        self.groups.borrow().values().next().cloned()
    }

    /// Every replica of this core, in group id order.
    pub fn all(&self) -> Vec<Rc<CoreGroup>> {
        self.groups.borrow().values().cloned().collect()
    }

    /// The ids of the groups this core runs, ascending.
    pub fn ids(&self) -> Vec<GroupId> {
        self.groups.borrow().keys().copied().collect()
    }

    /// The group of this core that holds `shard` in the most useful phase (serving, then
    /// arriving, then leaving), or else any group's idea of the owner (`Route::Moved`).
    pub fn best_route(&self, shard: u16) -> Option<(Rc<CoreGroup>, Route)> {
        let rank = |r: &Route| match r {
            Route::Serve => 0,
            Route::TryAgain => 1,
            Route::Ask { .. } => 2,
            Route::Moved { .. } => 3,
        };
        let groups = self.groups.borrow();
        let mut best: Option<(&Rc<CoreGroup>, Route)> = None;
        for entry in groups.values() {
            let route = entry.group.borrow().machine().shards.route(shard);
            if route == Route::Serve {
                return Some((entry.clone(), route));
            }
            if best.as_ref().map_or(true, |(_, b)| rank(&route) < rank(b)) {
                best = Some((entry, route));
            }
        }
        best.map(|(e, r)| (e.clone(), r))
    }

    /// One tick for every group of the core.
    fn tick_due(&self) {
        for g in self.groups.borrow().values() {
            g.group.borrow_mut().tick_due();
        }
    }

    /// Hands `m` to group `id`'s replica on this core; false (and counted) if it runs none.
    fn deliver(&self, id: GroupId, m: Message) -> bool {
        match self.groups.borrow().get(&id) {
            Some(g) => {
                g.group.borrow_mut().deliver(m);
                true
            }
            None => {
                self.messages_unrouted.set(self.messages_unrouted.get() + 1);
                false
            }
        }
    }
}

/// The outbound peer connections of one core, by destination (host, core): a group's members
/// may run on any core of their hosts, so core c of this host talks to whichever cores its
/// groups' members run on (the static map's groups and the controller keep core c to core c).
///
/// A connection is opened the first time a message goes to a destination, to that host's peer
/// address from `--initial-cluster` or, for a host that joined later, from the latest
/// configuration's host entry (`peer/client`, core 0's addresses; core c uses port + c). A host
/// keeps its address for life, so the first address it is known by is the one used.
pub struct PeerSenders {
    me: CoreId,
    tcfg: Rc<TransportConfig>,
    stats: Rc<TransportStats>,
    cfg: Arc<ServerConfig>,
    view: Arc<HostView>,
    senders: RefCell<HashMap<CoreId, PeerSender>>,
}

impl PeerSenders {
    fn new(
        me: CoreId,
        tcfg: Rc<TransportConfig>,
        stats: Rc<TransportStats>,
        cfg: Arc<ServerConfig>,
        view: Arc<HostView>,
    ) -> PeerSenders {
        PeerSenders {
            me,
            tcfg,
            stats,
            cfg,
            view,
            senders: RefCell::new(HashMap::new()),
        }
    }

    /// The peer address of core `to.core` of host `to.host`, if this host knows the host.
    fn peer_addr(&self, to: CoreId) -> Option<SocketAddr> {
        let base = match self.cfg.host(to.host) {
            Some(h) if !self.cfg.joined => h.peer,
            _ => host_peer_addr(self.view.latest_config()?.hosts.get(&to.host)?)?,
        };
        Some(SocketAddr::new(
            base.ip(),
            base.port().checked_add(to.core)?,
        ))
    }

    /// Opens the connection to `to` now (it connects when there is something to send).
    fn open(&self, to: CoreId) -> bool {
        if to.host == self.me.host {
            return false;
        }
        if self.senders.borrow().contains_key(&to) {
            return true;
        }
        let Some(addr) = self.peer_addr(to) else {
            return false;
        };
        let sender = PeerSender::spawn(self.me, to, addr, self.tcfg.clone(), self.stats.clone());
        self.senders.borrow_mut().insert(to, sender);
        true
    }

    /// Queues `frame` for `to`; false when it has no known address or its outbox is full.
    fn send(&self, to: CoreId, frame: &[u8]) -> bool {
        if let Some(s) = self.senders.borrow().get(&to) {
            return s.send(frame);
        }
        self.open(to)
            && self
                .senders
                .borrow()
                .get(&to)
                .is_some_and(|s| s.send(frame))
    }
}

/// How long a starting core retries a listening address that is still in use.
const BIND_RETRY_MS_MAX: u64 = 5_000;

/// Binds `addr` (refusing to share it, `bind_exclusive`), retrying for a few seconds while it
/// is in use: a host restarted right after a SIGKILL finds its ports still held for a moment
/// (io_uring releases the files of a dead process's pending requests asynchronously), and an
/// operator's immediate restart must not fail on that. Another process that really holds the
/// address is still refused, with the address named, once the time is up.
async fn bind_retrying(addr: SocketAddr) -> Result<glommio::net::TcpListener, String> {
    let start = std::time::Instant::now();
    loop {
        match bind_exclusive(addr) {
            Ok(l) => return Ok(l),
            Err(super::transport::TransportError::AddressInUse { .. })
                if start.elapsed() < Duration::from_millis(BIND_RETRY_MS_MAX) =>
            {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
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
pub fn run(mut cfg: ServerConfig) -> Result<(), NodeError> {
    // A joined host learns the cluster (its first start) or reads what it learnt.
    let joined_config = super::join::prepare(&mut cfg)?;
    cfg.validate()?;
    let disk = super::replica::scan(&cfg.data_dir).map_err(NodeError::Data)?;
    if let Some((&core, _)) = disk.specs.range(cfg.cores..).next() {
        return Err(NodeError::Data(format!(
            "{} holds a group replica of core {core}, but --cores is {}",
            cfg.data_dir.display(),
            cfg.cores
        )));
    }
    let plan = Arc::new(match &joined_config {
        Some(config) => ControlPlan::from_config(config),
        None => ControlPlan::new(&cfg),
    });
    let cfg = Arc::new(cfg);
    let view = Arc::new(HostView::new());
    for &g in &disk.removed {
        view.mark_removed(g);
    }
    if let Some(config) = joined_config {
        view.publish_fetched(config);
    }
    let disk = Arc::new(disk);
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
        let (plan2, disk2) = (plan.clone(), disk.clone());
        let builder = LocalExecutorBuilder::new(placement(&cfg, core))
            .name(&format!("tynamo-core-{core}"))
            .io_memory(cfg.io_memory_bytes)
            .preempt_timer(Duration::from_millis(10));
        let handle = builder
            .spawn(move || async move {
                let r = run_core(cfg2, core, view2, plan2, chans, disk2).await;
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

pub(crate) fn raft_config(cfg: &ServerConfig, node: NodeId) -> raft::Config {
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
    disk: Arc<DiskGroups>,
) -> Result<(), NodeError> {
    let err = |why: String| NodeError::Core { core, why };
    let me = cfg
        .me()
        .cloned()
        .ok_or_else(|| err("this host is not in the cluster map".into()))?;
    let controller = match (core, plan.node_of_host(cfg.id)) {
        (0, Some(node)) if cfg.initial_host() => Some(open_controller(&cfg, &plan, node).await?),
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
    let listener = bind_retrying(peer_addr).await.map_err(err)?;
    let bad_frames = Rc::new(Cell::new(0));
    let groups = Rc::new(CoreGroups::default());
    let sink = Rc::new(GroupSink {
        groups: groups.clone(),
        controller: controller.as_ref().map(|c| c.group.clone()),
        opts: verifier_options(tcfg.frame_bytes_max),
        bad_frames: bad_frames.clone(),
    });
    spawn_listener(listener, me_core, tcfg.clone(), tstats.clone(), sink);
    let senders = Rc::new(PeerSenders::new(
        me_core,
        tcfg.clone(),
        tstats.clone(),
        cfg.clone(),
        view.clone(),
    ));
    // The static map's groups and the controller talk core c to core c of the initial hosts.
    if cfg.initial_host() {
        for h in cfg.hosts.iter().filter(|h| h.id != cfg.id) {
            senders.open(CoreId { host: h.id, core });
        }
    }

    // Clients.
    let client_addr = SocketAddr::new(me.client.ip(), me.client.port() + core);
    let client_listener = bind_retrying(client_addr).await.map_err(err)?;
    let ctx = Rc::new(CoreCtx {
        cfg: cfg.clone(),
        core,
        groups: groups.clone(),
        view: view.clone(),
        senders: senders.clone(),
        transport_stats: tstats,
        bad_peer_frames: bad_frames,
        next_connection_id: Cell::new(u64::from(core) << 48),
        connections: Cell::new(0),
        forward: RefCell::new(HashMap::new()),
        forwarded: RefCell::new(HashMap::new()),
        next_forward_id: Cell::new(1),
        plan: plan.clone(),
        controller: controller.as_ref().map(|c| c.group.clone()),
        fatal: RefCell::new(None),
        fatal_wake: Signal::default(),
    });

    // This core's replicas, as the data directory (and the static map) says.
    for spec in super::replica::start_specs(&cfg, core, &disk) {
        super::replica::start(&ctx, spec).await.map_err(err)?;
    }
    for &peer_id in &disk.without_spec {
        if core == 0 && !(cfg.initial_host() && peer_id < u64::from(cfg.cores)) {
            eprintln!(
                "tynamo: {}: group-{peer_id} has no spec (a creation interrupted before its \
                 log existed); a configuration that places the group here recreates it",
                cfg.data_dir.display()
            );
        }
    }

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
    glommio::spawn_local(super::replica::walk(ctx.clone())).detach();
    if core == 0 && !ctx.controller_local() {
        glommio::spawn_local(super::migrate::follow_controller(ctx.clone())).detach();
    }
    glommio::spawn_local(super::server::accept_loop(client_listener, ctx.clone())).detach();

    // Ticker (one for the core's groups: a tick wakes each, including groups registered
    // after start).
    let tick = Duration::from_millis(cfg.tick_ms);
    let c2 = controller.as_ref().map(|c| c.group.clone());
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(tick).await;
            groups.tick_due();
            if let Some(c) = &c2 {
                c.borrow_mut().tick_due();
            }
        }
    })
    .detach();

    // The core stops only on a fatal error of a replica or its storage.
    let ctx2 = ctx.clone();
    let data = async move {
        loop {
            if let Some(why) = ctx2.fatal.borrow_mut().take() {
                return why;
            }
            ctx2.fatal_wake.wait().await;
        }
    };
    let why = match controller {
        Some(c) => {
            let control = c.run(senders, view, plan, cfg.heartbeat_ms);
            futures_lite::future::or(data, control).await
        }
        None => data.await,
    };
    Err(err(why))
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
            move |node| {
                plan2
                    .host_of_node(node)
                    .map(|host| CoreId { host, core: 0 })
            },
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

pub(crate) fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One group's loop: turns, sending (`host_of` maps the group's node ids to the cores that run
/// them), publishing its state after each turn, and saving the snapshots it takes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn group_loop<M: Machine + 'static>(
    group: Rc<RefCell<Group<M>>>,
    wake: Rc<Signal>,
    persist_wake: Rc<Signal>,
    senders: Rc<PeerSenders>,
    host_of: impl Fn(NodeId) -> Option<CoreId>,
    publish: impl Fn(&Group<M>),
    snapshots: Rc<tynamo_wal::SnapshotStore>,
    wal: Rc<tynamo_wal::Wal>,
) -> String {
    let mut fbb = FlatBufferBuilder::new();
    loop {
        wake.wait().await;
        let started = std::time::Instant::now();
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
        group
            .borrow_mut()
            .stats
            .turn_us
            .record(started.elapsed().as_micros() as u64);
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
    host_of: &impl Fn(NodeId) -> Option<CoreId>,
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
        if let Some(dest) = host_of(to) {
            let frame = encode_batch(fbb, &refs);
            // A full outbox (or a host not known yet) drops the frame: Raft retries from its
            // progress state.
            let _ = senders.send(dest, frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_leader_hint_keeps_the_highest_term_and_a_local_replica_knows_better() {
        let view = HostView::new();
        let slot = |host, core| Slot { host, core };
        assert_eq!(view.leader_of(3), None);
        view.hint_leader(3, 5, slot(4, 0));
        view.hint_leader(3, 4, slot(5, 0)); // a late announcement of an older term
        assert_eq!(view.leader_of(3), Some(slot(4, 0)));
        view.hint_leader(3, 6, slot(1, 1));
        assert_eq!(view.leader_of(3), Some(slot(1, 1)));
        // A replica here: Raft's own knowledge, not the hint (none yet: no turn ran).
        let map = "1=127.0.0.1:7101,2=127.0.0.1:7111,3=127.0.0.1:7121";
        let cfg = ServerConfig::new(
            1,
            "/tmp/unused".into(),
            super::super::config::parse_initial_cluster(map).unwrap(),
            1,
        );
        let mut spec = DataGroupSpec::bootstrap(&cfg, 0);
        spec.config_group = 3;
        view.register(Arc::new(GroupView::new(spec)));
        assert_eq!(view.leader_of(3), None);
        view.unregister(3);
        assert_eq!(view.leader_of(3), Some(slot(1, 1)));
    }
}
