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
//! - the client listener and one task per client connection (`server`).
//!
//! Measured idle cost (`tools/cluster.sh idle-cpu 10`, release build, 3 hosts x 2 cores on one
//! 2-CPU machine under other load): 3.4% of one CPU for the whole idle cluster (1.0-1.2% per
//! host): 100 ticks/s per core plus 10 heartbeats/s per group.
//!
//! Cross-core state is only the `HostView` below: relaxed atomics each core publishes after a
//! turn (its group's leader, term, indexes) and reads for `-MOVED`, `CLUSTER SLOTS` and `INFO`.
//! Nothing on the write path crosses cores.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flatbuffers::{FlatBufferBuilder, VerifierOptions};
use glommio::{LocalExecutorBuilder, Placement};
use tynamo_wal::WalOptions;

use crate::kv;
use crate::raft::{self, Message, RawNode, Role};

use super::codec::{decode_batch, encode_batch, verifier_options, GroupId};
use super::config::{PlacementMode, ServerConfig};
use super::group::{persist_loop, Group, Signal};
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
        }
    }

    fn publish(&self, g: usize, group: &Group) {
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

/// What a core's client connections share.
pub struct CoreCtx {
    pub cfg: Arc<ServerConfig>,
    pub core: u16,
    pub group: Rc<RefCell<Group>>,
    pub view: Arc<HostView>,
    pub wal: Rc<tynamo_wal::Wal>,
    pub transport_stats: Rc<TransportStats>,
    pub bad_peer_frames: Rc<Cell<u64>>,
    pub next_connection_id: Cell<u64>,
    pub connections: Cell<usize>,
}

impl CoreCtx {
    /// Client address of `host`'s core `core`.
    pub fn client_addr(&self, host: u64, core: u16) -> Option<SocketAddr> {
        self.cfg
            .host(host)
            .map(|h| SocketAddr::new(h.client.ip(), h.client.port() + core))
    }
}

struct GroupSink {
    group_id: GroupId,
    group: Rc<RefCell<Group>>,
    opts: VerifierOptions,
    bad_frames: Rc<Cell<u64>>,
}

impl FrameSink for GroupSink {
    fn deliver(&self, _from: CoreId, frame: bytes::Bytes) {
        match decode_batch(&frame, &self.opts) {
            Ok(messages) => {
                let mut g = self.group.borrow_mut();
                for (group, m) in messages {
                    if group == self.group_id {
                        g.deliver(m);
                    } else {
                        g.stats.messages_dropped += 1;
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
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<(), NodeError>>();
    let mut handles = Vec::new();
    for core in 0..cfg.cores {
        let (cfg2, view2, tx) = (cfg.clone(), view.clone(), done_tx.clone());
        let builder = LocalExecutorBuilder::new(placement(&cfg, core))
            .name(&format!("tynamo-core-{core}"))
            .io_memory(cfg.io_memory_bytes)
            .preempt_timer(Duration::from_millis(10));
        let handle = builder
            .spawn(move || async move {
                let r = run_core(cfg2, core, view2).await;
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

fn raft_config(cfg: &ServerConfig) -> raft::Config {
    let mut rc = raft::Config::new(cfg.id);
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

async fn run_core(cfg: Arc<ServerConfig>, core: u16, view: Arc<HostView>) -> Result<(), NodeError> {
    let err = |why: String| NodeError::Core { core, why };
    let me = cfg
        .me()
        .cloned()
        .ok_or_else(|| err("this host is not in the cluster map".into()))?;
    let group_id = GroupId::from(core);
    let dir = cfg.data_dir.join(format!("group-{core}"));
    let wal_opts = WalOptions {
        segment_bytes: cfg.segment_bytes,
        entry_bytes_max: super::config::ENTRY_BYTES_MAX,
        ..WalOptions::default()
    };
    let kvc = kv_config(&cfg);
    let shards = cfg.group_shards(core);
    let (storage, recovered) = GroupStorage::open(
        group_id,
        &dir,
        wal_opts,
        kvc.clone(),
        &shards,
        &cfg.voters(),
    )
    .await
    .map_err(|e| err(e.to_string()))?;
    let seed = cfg.id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(core) ^ now_nanos();
    let raw = RawNode::new(raft_config(&cfg), recovered.initial, seed)
        .map_err(|e| err(format!("raft config: {e}")))?;
    let group = Rc::new(RefCell::new(Group::new(
        group_id,
        raw,
        recovered.kv,
        kvc,
        u64::from(cfg.election_ticks()),
    )));
    let wake = group.borrow().wake.clone();
    let wal = storage.wal.clone();
    let snapshots = storage.snapshots.clone();

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
    let sink = Rc::new(GroupSink {
        group_id,
        group: group.clone(),
        opts: verifier_options(tcfg.frame_bytes_max),
        bad_frames: bad_frames.clone(),
    });
    spawn_listener(listener, me_core, tcfg.clone(), tstats.clone(), sink);
    let mut senders: HashMap<u64, PeerSender> = HashMap::new();
    for h in cfg.hosts.iter().filter(|h| h.id != cfg.id) {
        let to = CoreId { host: h.id, core };
        let addr = SocketAddr::new(h.peer.ip(), h.peer.port() + core);
        senders.insert(
            h.id,
            PeerSender::spawn(me_core, to, addr, tcfg.clone(), tstats.clone()),
        );
    }

    // Clients.
    let client_addr = SocketAddr::new(me.client.ip(), me.client.port() + core);
    let client_listener = bind_exclusive(client_addr).map_err(|e| err(e.to_string()))?;
    let ctx = Rc::new(CoreCtx {
        cfg: cfg.clone(),
        core,
        group: group.clone(),
        view: view.clone(),
        wal: wal.clone(),
        transport_stats: tstats,
        bad_peer_frames: bad_frames,
        next_connection_id: Cell::new(u64::from(core) << 48),
        connections: Cell::new(0),
    });
    glommio::spawn_local(super::server::accept_loop(client_listener, ctx)).detach();

    // Persister.
    let persist_wake = Rc::new(Signal::default());
    let persister =
        glommio::spawn_local(persist_loop(group.clone(), storage, persist_wake.clone()));

    // Ticker.
    let tick = Duration::from_millis(cfg.tick_ms);
    let g2 = group.clone();
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(tick).await;
            g2.borrow_mut().tick_due();
        }
    })
    .detach();

    // The group loop; it ends only on a fatal error of the replica or its storage.
    let looper = group_loop(
        group.clone(),
        wake,
        persist_wake,
        senders,
        view,
        usize::from(core),
        snapshots,
        wal,
    );
    let why = futures_lite::future::or(looper, async {
        let e = persister.await;
        format!("storage failed: {e}")
    })
    .await;
    Err(err(why))
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[allow(clippy::too_many_arguments)]
async fn group_loop(
    group: Rc<RefCell<Group>>,
    wake: Rc<Signal>,
    persist_wake: Rc<Signal>,
    senders: HashMap<u64, PeerSender>,
    view: Arc<HostView>,
    g: usize,
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
            view.publish(g, &gr);
            (std::mem::take(&mut gr.outbox), gr.snapshot_request.take())
        };
        send_messages(&mut fbb, g as GroupId, &mut messages, &senders);
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
    senders: &HashMap<u64, PeerSender>,
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
        if let Some(sender) = senders.get(&to) {
            let frame = encode_batch(fbb, &refs);
            // A full outbox drops the frame: Raft retries from its progress state.
            let _ = sender.send(frame);
        }
    }
}
