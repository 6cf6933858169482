//! The sharded world: hosts, the controller group, the data groups it creates, the runtime
//! loop of every data group's leader, clients and an admin, one clock.
//!
//! Hosts are physical: host h runs controller replica h (h = 1..=3, the controller's slots
//! are fixed) and every data-group replica the configurations place on it. A host crash
//! crashes all of them at once, a restart restarts them (each from its own disk); a partition
//! between two hosts cuts the Raft links of every group between them and the RPCs between
//! them.
//!
//! What each host's agent does: it learns configurations one number at a time from the
//! controller (Query through the faulty RPC network) and, for each configuration that
//! creates a group, starts that group (all its replicas, bootstrapped with the configuration's
//! voters; a replica on a crashed host starts crashed).
//!
//! What each data group's leader does every tick (`shard::migration`'s runtime contract):
//! - wants configuration n (the one that created it, then `next_config_wanted`): fetches n-1
//!   and n from the controller, proposes `AcceptConfig` once `can_accept`;
//! - for each pull: asks a replica of the old owner (`handle_pull`), proposes `Install`;
//! - for each confirm: asks the old owner (`handle_confirm`; its leader proposes
//!   `DeleteExported`), proposes `ConfirmDone` once it answers Done;
//! - stops once `is_drained` (a stopped group's host answers pulls Gone and confirms Done:
//!   it deleted everything it exported before it stopped).
//!
//! Every request is retried after `RETRY_TICKS` until the log says it is done; duplicates
//! apply as Stale. The runtime's memory (fetched configurations, pulled blobs, confirmations)
//! is kept per group, not per leader: it holds only immutable facts (configuration n, the
//! frozen blob of shard s at n, "s of n was deleted"), true whoever leads.
//!
//! Checks after every tick: the Raft invariants of every group (`sim::Cluster`), the kv /
//! migration agreement of every live replica (`GroupShards::check_against`), and the epoch
//! invariant: no two groups accept writes for one shard in one configuration.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::app::{Breakage, ShardApp};
use super::client::{Clients, ClientsConfig};
use super::rpc::{ConfirmAnswer, Endpoint, Rpc, RpcBody, RpcNet};
use crate::controller::{
    Command, Configuration, ControllerApp, GroupId, HostId, Op, Reply, Settings,
    StateMachine as Controller, GROUP_NONE,
};
use crate::kv;
use crate::raft::{CompactError, NodeId};
use crate::shard::migration::{ConfirmReply, MigrationEntry, PullReply};
use crate::sim::{App, Cluster, ClusterConfig, NetConfig, Outcome, ProposalId, Violation};

/// Ticks before a request or proposal of the runtime is sent again.
pub const RETRY_TICKS: u64 = 8;
/// Replicas of the controller group (on hosts 1..=3).
pub const CONTROLLER_REPLICAS: usize = 3;
/// Hosts of one world.
pub const HOSTS_MAX: usize = 16;
/// Admin clients of one world; admin `i` has session id `i + 1` at the controller.
pub const ADMINS_MAX: usize = 4;

/// Everything a world is made of, drawn from a seed by `run.rs` or written by a test.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    pub seed: u64,
    /// Physical hosts: (id, cores). The first three run the controller.
    pub hosts: Vec<(HostId, u16)>,
    pub shard_count: u16,
    pub replication: u8,
    /// Raft links inside every group.
    pub raft_net: NetConfig,
    /// RPCs between groups, hosts, the controller and clients.
    pub rpc_net: NetConfig,
    pub disk_ticks_max: u64,
    /// Extra latency of a disk marked slow.
    pub slow_disk_ticks: u64,
    /// Chance (per million) that a replica crashes at each step of handling a `Ready`
    /// (`ClusterConfig::crash_in_ready_per_million`), on its own, host still up.
    pub crash_in_ready_per_million: u32,
    /// Replicas' clocks run slow by up to this many ticks per million (0: exact clocks).
    pub clock_slow_per_million_max: u32,
    /// kv log bytes between two snapshots of a data-group replica.
    pub snapshot_threshold_bytes: u64,
    /// Applied entries between two snapshots of a controller replica.
    pub controller_snapshot_entries: u64,
    /// Ticks between two configuration polls of a host agent.
    pub poll_ticks: u64,
    pub clients: ClientsConfig,
    pub breakage: Breakage,
}

impl WorldConfig {
    /// A quiet world: reliable networks, fast disks, three clients over eight keys.
    pub fn new(seed: u64, hosts: Vec<(HostId, u16)>) -> WorldConfig {
        WorldConfig {
            seed,
            hosts,
            shard_count: 8,
            replication: 3,
            raft_net: NetConfig::reliable(),
            rpc_net: NetConfig::reliable(),
            disk_ticks_max: 1,
            slow_disk_ticks: 15,
            crash_in_ready_per_million: 0,
            clock_slow_per_million_max: 0,
            snapshot_threshold_bytes: 2048,
            controller_snapshot_entries: 16,
            poll_ticks: 5,
            clients: ClientsConfig::new(3, 8),
            breakage: Breakage::None,
        }
    }

    fn kv_config(&self) -> kv::Config {
        kv::Config {
            shard_count: self.shard_count,
            // Sessions never expire within a run: an expired session would turn a retry into
            // SessionUnknown.
            session_ttl_ms: 24 * 3600 * 1000,
            snapshot_log_bytes_threshold: self.snapshot_threshold_bytes,
            ..kv::Config::default()
        }
    }
}

/// One data group: a simulated Raft group of [`ShardApp`] replicas and its runtime's memory.
pub struct DataGroup {
    pub id: GroupId,
    pub cluster: Cluster<ShardApp>,
    /// Host of replica `i + 1`.
    pub hosts: Vec<HostId>,
    pub created_in: u64,
    /// Drained and stopped: its replicas no longer run.
    pub stopped: bool,
    configs: BTreeMap<u64, Configuration>,
    blobs: BTreeMap<(u64, u16), Bytes>,
    deleted: BTreeSet<(u64, u16)>,
    retry_at: BTreeMap<Action, u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Query(u64),
    Accept(u64),
    Pull(u64, u16),
    Install(u64, u16),
    Confirm(u64, u16),
    ConfirmDone(u64, u16),
}

impl Action {
    fn config_num(self) -> u64 {
        match self {
            Action::Query(n) | Action::Accept(n) => n,
            Action::Pull(n, _)
            | Action::Install(n, _)
            | Action::Confirm(n, _)
            | Action::ConfirmDone(n, _) => n,
        }
    }
}

impl DataGroup {
    /// Whether `action` may be tried at `now`; if so, the next try waits RETRY_TICKS.
    fn due(&mut self, action: Action, now: u64) -> bool {
        let at = self.retry_at.entry(action).or_insert(0);
        if *at > now {
            return false;
        }
        *at = now + RETRY_TICKS;
        true
    }

    pub fn host_of(&self, node: NodeId) -> Option<HostId> {
        self.hosts.get((node as usize).wrapping_sub(1)).copied()
    }

    /// The replica that leads, when it is up.
    pub fn leader_app(&self) -> Option<&ShardApp> {
        let l = self.cluster.leader()?;
        Some(&self.cluster.node(l).app)
    }
}

#[derive(Clone, Debug, Default)]
struct HostAgent {
    up: bool,
    /// The last configuration this host learnt.
    known: u64,
    poll_at: u64,
}

/// Admin operations run one at a time with the admin's session (exactly once, retried).
#[derive(Default)]
struct Admin {
    queue: VecDeque<Op>,
    seq: u64,
    current: Option<(Op, Option<ProposalId>, u64)>,
    pub replies: Vec<(Op, Reply)>,
}

/// Counters of one world.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorldStats {
    pub groups_created: u64,
    pub groups_stopped: u64,
    pub snapshots_taken: u64,
    pub installs_proposed: u64,
    pub host_crashes: u64,
}

pub struct World {
    pub cfg: WorldConfig,
    pub now: u64,
    pub rng: ChaCha8Rng,
    pub controller: Cluster<ControllerApp>,
    pub groups: BTreeMap<GroupId, DataGroup>,
    hosts: BTreeMap<HostId, HostAgent>,
    pub rpc: RpcNet,
    pub clients: Clients,
    /// Admin clients, each with its own controller session; their operations interleave.
    admins: Vec<Admin>,
    pub stats: WorldStats,
    /// TEST ONLY: shards whose pulls are not sent (as if every copy were lost), so a test can
    /// hold one shard of a configuration back while the others arrive.
    pub hold_pulls: BTreeSet<u16>,
}

impl World {
    pub fn new(cfg: WorldConfig) -> World {
        assert!(
            (CONTROLLER_REPLICAS..=HOSTS_MAX).contains(&cfg.hosts.len()),
            "hosts {} outside {CONTROLLER_REPLICAS}..={HOSTS_MAX}",
            cfg.hosts.len()
        );
        let settings = Settings {
            shard_count: cfg.shard_count,
            replication: cfg.replication,
            ..Settings::default()
        };
        if let Err(e) = settings.validate() {
            panic!("{e}");
        }
        let mut ccfg = cluster_config(&cfg, CONTROLLER_REPLICAS);
        ccfg.snapshot_every_entries = cfg.controller_snapshot_entries;
        let make = move || ControllerApp {
            sm: Controller::new(settings.clone()).expect("validated above"),
        };
        let mut controller = Cluster::with_app(ccfg, cfg.seed ^ 0xc0_47_20_11, Rc::new(make));
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5ba2_d000);
        skew_clocks(&mut controller, cfg.clock_slow_per_million_max, &mut rng);
        let hosts = cfg
            .hosts
            .iter()
            .map(|&(h, _)| {
                (
                    h,
                    HostAgent {
                        up: true,
                        ..HostAgent::default()
                    },
                )
            })
            .collect();
        let clients = Clients::new(cfg.clients.clone(), cfg.seed);
        World {
            rpc: RpcNet::new(cfg.rpc_net),
            cfg,
            now: 0,
            rng,
            controller,
            groups: BTreeMap::new(),
            hosts,
            clients,
            admins: (0..ADMINS_MAX).map(|_| Admin::default()).collect(),
            stats: WorldStats::default(),
            hold_pulls: BTreeSet::new(),
        }
    }

    // ----- hosts and faults ------------------------------------------------------------------

    pub fn host_ids(&self) -> Vec<HostId> {
        self.hosts.keys().copied().collect()
    }

    fn controller_host(&self, node: NodeId) -> Option<HostId> {
        self.cfg
            .hosts
            .get((node as usize).wrapping_sub(1))
            .map(|h| h.0)
    }

    pub fn host_up(&self, host: HostId) -> bool {
        self.hosts.get(&host).is_some_and(|h| h.up)
    }

    /// Power loss on a host: every replica on it (controller and data groups) crashes.
    pub fn crash_host(&mut self, host: HostId) {
        let Some(agent) = self.hosts.get_mut(&host) else {
            return;
        };
        if agent.up {
            self.stats.host_crashes += 1;
        }
        agent.up = false;
        for node in 1..=CONTROLLER_REPLICAS as NodeId {
            if self.controller_host(node) == Some(host) {
                self.controller.crash(node);
            }
        }
        for g in self.groups.values_mut() {
            for (i, &h) in g.hosts.clone().iter().enumerate() {
                if h == host {
                    g.cluster.crash(i as NodeId + 1);
                }
            }
        }
    }

    pub fn restart_host(&mut self, host: HostId) -> Result<(), Violation> {
        let Some(agent) = self.hosts.get_mut(&host) else {
            return Ok(());
        };
        if agent.up {
            return Ok(());
        }
        agent.up = true;
        for node in 1..=CONTROLLER_REPLICAS as NodeId {
            if self.controller_host(node) == Some(host) {
                self.controller.restart(node)?;
            }
        }
        for g in self.groups.values_mut() {
            if g.stopped {
                continue;
            }
            for (i, &h) in g.hosts.clone().iter().enumerate() {
                if h == host {
                    g.cluster
                        .restart(i as NodeId + 1)
                        .map_err(|v| Violation(format!("group {} replica {}: {v}", g.id, i + 1)))?;
                }
            }
        }
        Ok(())
    }

    /// Restarts every replica that is down on a host that is up (replicas crashed on their
    /// own, at a crash point of their Ready loop), each with probability `p`.
    pub fn restart_lone_crashes(&mut self, p: f64) -> Result<(), Violation> {
        for node in 1..=CONTROLLER_REPLICAS as NodeId {
            let host_up = self.controller_host(node).is_some_and(|h| self.host_up(h));
            if host_up && !self.controller.is_up(node) && self.rng.gen_bool(p) {
                self.controller.restart(node)?;
            }
        }
        let hosts_up: BTreeSet<HostId> = self
            .hosts
            .iter()
            .filter(|(_, a)| a.up)
            .map(|(&h, _)| h)
            .collect();
        for g in self.groups.values_mut() {
            if g.stopped {
                continue;
            }
            for (i, h) in g.hosts.iter().enumerate() {
                let id = i as NodeId + 1;
                if hosts_up.contains(h) && !g.cluster.is_up(id) && self.rng.gen_bool(p) {
                    g.cluster
                        .restart(id)
                        .map_err(|v| Violation(format!("group {} replica {id}: {v}", g.id)))?;
                }
            }
        }
        Ok(())
    }

    /// Marks a random replica's disk slow, or fast again.
    pub fn toggle_slow_disk(&mut self) {
        let ids: Vec<GroupId> = self
            .groups
            .values()
            .filter(|g| !g.stopped)
            .map(|g| g.id)
            .collect();
        let Some(&gid) = ids.choose(&mut self.rng) else {
            return;
        };
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        let id = self.rng.gen_range(1..=g.hosts.len() as NodeId);
        let slow = !g.cluster.node(id).slow_disk;
        g.cluster.set_slow_disk(id, slow);
    }

    /// Healing: every disk fast again and no more crashes at Ready-loop crash points (a
    /// replica crashed after the heal would stay down: nothing restarts it any more).
    pub fn calm_replicas(&mut self) {
        self.cfg.crash_in_ready_per_million = 0;
        self.controller.cfg.crash_in_ready_per_million = 0;
        for id in self.controller.ids() {
            self.controller.set_slow_disk(id, false);
        }
        for g in self.groups.values_mut() {
            g.cluster.cfg.crash_in_ready_per_million = 0;
            for id in g.cluster.ids() {
                g.cluster.set_slow_disk(id, false);
            }
        }
    }

    /// Asks a random group's (or the controller's) leader to hand leadership to a random
    /// replica.
    pub fn transfer_leader(&mut self) {
        let ids: Vec<GroupId> = self
            .groups
            .values()
            .filter(|g| !g.stopped)
            .map(|g| g.id)
            .collect();
        let pick = self.rng.gen_range(0..=ids.len());
        let to = self.rng.gen_range(1..=3);
        let cluster_leader = |raft: Option<&mut crate::raft::RawNode>| {
            if let Some(r) = raft {
                let _ = r.transfer_leader(to);
            }
        };
        if pick == ids.len() {
            if let Some(l) = self.controller.leader() {
                cluster_leader(self.controller.raft_mut(l));
            }
        } else if let Some(g) = self.groups.get_mut(&ids[pick]) {
            if let Some(l) = g.cluster.leader() {
                cluster_leader(g.cluster.raft_mut(l));
            }
        }
    }

    /// Cuts the link from `a` to `b` (one direction) for every group and every RPC.
    pub fn cut(&mut self, a: HostId, b: HostId) {
        self.rpc.cut_link(a, b);
        self.apply_cuts();
    }

    /// Cuts `side` from every other host, both directions.
    pub fn partition(&mut self, side: &[HostId]) {
        for a in self.host_ids() {
            for &b in side {
                if !side.contains(&a) {
                    self.rpc.cut_link(a, b);
                    self.rpc.cut_link(b, a);
                }
            }
        }
        self.apply_cuts();
    }

    pub fn heal(&mut self) {
        self.rpc.heal();
        self.apply_cuts();
    }

    pub fn is_partitioned(&self) -> bool {
        !self.rpc.cut_links().is_empty()
    }

    /// Mirrors the host cuts onto every group's Raft network.
    fn apply_cuts(&mut self) {
        let cut = self.rpc.cut_links().clone();
        let controller_hosts: Vec<HostId> = self.cfg.hosts.iter().map(|h| h.0).collect();
        mirror_cuts(&mut self.controller, &controller_hosts, &cut);
        for g in self.groups.values_mut() {
            mirror_cuts(&mut g.cluster, &g.hosts, &cut);
        }
    }

    /// Sets the loss, duplication and delay of every network (Raft and RPC).
    pub fn set_nets(&mut self, raft: NetConfig, rpc: NetConfig) {
        self.cfg.raft_net = raft;
        self.cfg.rpc_net = rpc;
        self.rpc.cfg = rpc;
        self.controller.net.cfg = raft;
        for g in self.groups.values_mut() {
            g.cluster.net.cfg = raft;
        }
    }

    // ----- admin -----------------------------------------------------------------------------

    /// Queues a controller operation for the first admin client.
    pub fn admin(&mut self, op: Op) {
        self.admin_as(0, op);
    }

    /// Queues a controller operation for admin client `admin` (`0..ADMINS_MAX`): admins run
    /// concurrently, each one operation at a time.
    pub fn admin_as(&mut self, admin: usize, op: Op) {
        assert!(admin < ADMINS_MAX, "admin {admin} of {ADMINS_MAX}");
        self.admins[admin].queue.push_back(op);
    }

    pub fn admin_idle(&self) -> bool {
        self.admins
            .iter()
            .all(|a| a.queue.is_empty() && a.current.is_none())
    }

    pub fn admin_idle_of(&self, admin: usize) -> bool {
        let a = &self.admins[admin];
        a.queue.is_empty() && a.current.is_none()
    }

    /// The first admin's answers, in order.
    pub fn admin_replies(&self) -> &[(Op, Reply)] {
        self.admin_replies_of(0)
    }

    pub fn admin_replies_of(&self, admin: usize) -> &[(Op, Reply)] {
        &self.admins[admin].replies
    }

    fn admin_turn(&mut self, i: usize) -> Result<(), Violation> {
        let admin = &mut self.admins[i];
        if admin.current.is_none() {
            let Some(op) = admin.queue.pop_front() else {
                return Ok(());
            };
            admin.seq += 1;
            admin.current = Some((op, None, self.now));
        }
        let Some((op, proposal, at)) = admin.current.clone() else {
            return Ok(());
        };
        if let Some(p) = proposal {
            match self.controller.outcome(p) {
                Outcome::Pending => return Ok(()),
                Outcome::Committed { result, index } => {
                    let reply = Reply::decode(&result).map_err(|e| {
                        Violation(format!("controller reply of entry {index}: {e}"))
                    })?;
                    let admin = &mut self.admins[i];
                    admin.replies.push((op, reply));
                    admin.current = None;
                    return Ok(());
                }
                Outcome::Failed | Outcome::Unknown => {
                    self.admins[i].current = Some((op, None, self.now + 1));
                    return Ok(());
                }
            }
        }
        if self.now < at {
            return Ok(());
        }
        let command = Command {
            client_id: i as u64 + 1,
            seq: self.admins[i].seq,
            op: op.clone(),
        };
        let next = match self.controller.propose(Bytes::from(command.encode())) {
            Ok(p) => (op, Some(p), self.now),
            Err(_) => (op, None, self.now + 2),
        };
        self.admins[i].current = Some(next);
        Ok(())
    }

    // ----- the controller's view -------------------------------------------------------------

    /// The controller's latest configuration as its most advanced live replica applied it.
    pub fn latest_config(&self) -> Option<&Configuration> {
        self.controller
            .nodes
            .iter()
            .filter(|n| n.raft.is_some())
            .map(|n| n.app.sm.latest())
            .max_by_key(|c| c.num)
    }

    /// Configuration `num` from any live controller replica that has it.
    pub fn config(&self, num: u64) -> Option<&Configuration> {
        self.controller
            .nodes
            .iter()
            .filter(|n| n.raft.is_some())
            .find_map(|n| n.app.sm.query(num as i64).ok())
    }

    // ----- running ---------------------------------------------------------------------------

    /// One tick: host agents, group runtimes, the admin and the clients act; RPCs due are
    /// delivered; every Raft group runs one tick; replicas over the threshold snapshot; then
    /// the invariants are checked.
    pub fn step(&mut self) -> Result<(), Violation> {
        self.now += 1;
        self.host_turns();
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for &g in &ids {
            self.group_turn(g)?;
        }
        for i in 0..ADMINS_MAX {
            self.admin_turn(i)?;
        }
        self.client_turns()?;
        while let Some(rpc) = self.rpc.next_due(self.now) {
            self.deliver(rpc)?;
        }
        self.controller.step()?;
        for g in self.groups.values_mut() {
            if g.stopped {
                continue;
            }
            let id = g.id;
            g.cluster
                .step()
                .map_err(|v| Violation(format!("group {id}: {v}")))?;
        }
        self.take_snapshots()?;
        self.check_invariants()
    }
    fn send(&mut self, from: Endpoint, to: Endpoint, body: RpcBody) {
        let from_host = self.endpoint_host(from);
        let to_host = self.endpoint_host(to);
        let now = self.now;
        self.rpc.send(
            Rpc { from, to, body },
            from_host,
            to_host,
            now,
            &mut self.rng,
        );
    }

    fn endpoint_host(&self, e: Endpoint) -> Option<HostId> {
        match e {
            Endpoint::Controller(n) => self.controller_host(n),
            Endpoint::Group(g, n) => self.groups.get(&g).and_then(|g| g.host_of(n)),
            Endpoint::Host(h) => Some(h),
            Endpoint::Client(_) => None,
        }
    }

    fn random_controller(&mut self) -> Endpoint {
        Endpoint::Controller(self.rng.gen_range(1..=CONTROLLER_REPLICAS as NodeId))
    }

    fn host_turns(&mut self) {
        let now = self.now;
        let due: Vec<(HostId, u64)> = self
            .hosts
            .iter_mut()
            .filter(|(_, a)| a.up && a.poll_at <= now)
            .map(|(&h, a)| {
                a.poll_at = now + self.cfg.poll_ticks;
                (h, a.known)
            })
            .collect();
        for (h, known) in due {
            let to = self.random_controller();
            self.send(
                Endpoint::Host(h),
                to,
                RpcBody::Query {
                    num: known as i64 + 1,
                },
            );
        }
    }

    /// A host learnt configuration `config`: the groups it creates start.
    fn host_learns(&mut self, host: HostId, config: Configuration) {
        let Some(agent) = self.hosts.get_mut(&host) else {
            return;
        };
        if !agent.up || config.num != agent.known + 1 {
            return;
        }
        agent.known = config.num;
        // The next one right away: a host catching up walks the history quickly.
        agent.poll_at = self.now;
        for (gid, group) in config.groups_created() {
            if !self.groups.contains_key(&gid) {
                let hosts = group.replicas.iter().map(|r| r.slot.host).collect();
                self.create_group(gid, hosts, config.num);
            }
        }
    }

    fn create_group(&mut self, id: GroupId, hosts: Vec<HostId>, created_in: u64) {
        let mut ccfg = cluster_config(&self.cfg, hosts.len());
        // The world snapshots on the kv threshold, not on an entry count.
        ccfg.snapshot_every_entries = 0;
        let kv_config = self.cfg.kv_config();
        let breakage = self.cfg.breakage;
        let make = move || ShardApp::new(id, kv_config.clone(), breakage);
        let mut cluster = Cluster::with_app(
            ccfg,
            self.cfg.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            Rc::new(make),
        );
        cluster.now = self.now;
        skew_clocks(
            &mut cluster,
            self.cfg.clock_slow_per_million_max,
            &mut self.rng,
        );
        mirror_cuts(&mut cluster, &hosts, self.rpc.cut_links());
        for (i, h) in hosts.iter().enumerate() {
            if !self.host_up(*h) {
                cluster.crash(i as NodeId + 1);
            }
        }
        self.stats.groups_created += 1;
        self.groups.insert(
            id,
            DataGroup {
                id,
                cluster,
                hosts,
                created_in,
                stopped: false,
                configs: BTreeMap::new(),
                blobs: BTreeMap::new(),
                deleted: BTreeSet::new(),
                retry_at: BTreeMap::new(),
            },
        );
    }

    /// One loop turn of group `gid`'s leader (see the module docs).
    fn group_turn(&mut self, gid: GroupId) -> Result<(), Violation> {
        let now = self.now;
        let Some(g) = self.groups.get_mut(&gid) else {
            return Ok(());
        };
        if g.stopped {
            return Ok(());
        }
        let Some(leader) = g.cluster.leader() else {
            return Ok(());
        };
        let shards = g.cluster.node(leader).app.shards().clone();
        if shards.is_drained() {
            g.stopped = true;
            self.stats.groups_stopped += 1;
            return Ok(());
        }
        let mut sends: Vec<(Endpoint, RpcBody)> = Vec::new();
        let wanted = match shards.config() {
            None => Some(g.created_in),
            Some(_) => shards.next_config_wanted(),
        };
        if let Some(n) = wanted {
            let pair = (g.configs.get(&(n - 1)).cloned(), g.configs.get(&n).cloned());
            match pair {
                (Some(previous), Some(config)) => {
                    if shards.can_accept(&previous, &config) && g.due(Action::Accept(n), now) {
                        let entry = MigrationEntry::AcceptConfig { previous, config }.encode();
                        let _ = g.cluster.propose_at(leader, entry);
                    }
                }
                _ => {
                    for num in [n - 1, n] {
                        if !g.configs.contains_key(&num) && g.due(Action::Query(num), now) {
                            sends.push((
                                Endpoint::Controller(0),
                                RpcBody::Query { num: num as i64 },
                            ));
                        }
                    }
                }
            }
        }
        for p in shards.pulls() {
            if let Some(blob) = g.blobs.get(&(p.config_num, p.shard)).cloned() {
                if g.due(Action::Install(p.config_num, p.shard), now) {
                    let entry = MigrationEntry::Install {
                        config_num: p.config_num,
                        shard: p.shard,
                        blob,
                    }
                    .encode();
                    let _ = g.cluster.propose_at(leader, entry);
                    self.stats.installs_proposed += 1;
                }
            } else if !self.hold_pulls.contains(&p.shard)
                && g.due(Action::Pull(p.config_num, p.shard), now)
            {
                sends.push((
                    Endpoint::Group(p.from, 0),
                    RpcBody::Pull {
                        shard: p.shard,
                        config_num: p.config_num,
                    },
                ));
            }
        }
        for c in shards.confirms() {
            if g.deleted.contains(&(c.config_num, c.shard)) {
                if g.due(Action::ConfirmDone(c.config_num, c.shard), now) {
                    let entry = MigrationEntry::ConfirmDone {
                        config_num: c.config_num,
                        shard: c.shard,
                    }
                    .encode();
                    let _ = g.cluster.propose_at(leader, entry);
                }
            } else if g.due(Action::Confirm(c.config_num, c.shard), now) {
                sends.push((
                    Endpoint::Group(c.from, 0),
                    RpcBody::Confirm {
                        shard: c.shard,
                        config_num: c.config_num,
                    },
                ));
            }
        }
        // Drop what the group no longer needs: configurations before the previous one, blobs
        // and deletions of finished moves (bounded memory).
        let num = shards.config_num();
        g.configs.retain(|&n, _| n + 1 >= num);
        let pulls: BTreeSet<(u64, u16)> = shards
            .pulls()
            .iter()
            .map(|p| (p.config_num, p.shard))
            .collect();
        g.blobs.retain(|k, _| pulls.contains(k));
        let confirms: BTreeSet<(u64, u16)> = shards
            .confirms()
            .iter()
            .map(|c| (c.config_num, c.shard))
            .collect();
        g.deleted.retain(|k| confirms.contains(k));
        g.retry_at.retain(|a, _| a.config_num() + 1 >= num);
        for (to, body) in sends {
            // Which replica to ask: any of the old owner's (a follower that applied the
            // configuration answers a pull as well as the leader); the controller: any.
            let to = match to {
                Endpoint::Controller(_) => self.random_controller(),
                Endpoint::Group(other, _) => {
                    let r = self
                        .groups
                        .get(&other)
                        .map_or(1, |o| o.hosts.len().max(1) as NodeId);
                    Endpoint::Group(other, self.rng.gen_range(1..=r))
                }
                e => e,
            };
            self.send(Endpoint::Group(gid, leader), to, body);
        }
        Ok(())
    }

    fn deliver(&mut self, rpc: Rpc) -> Result<(), Violation> {
        let Rpc { from, to, body } = rpc;
        match (to, body) {
            (Endpoint::Controller(node), RpcBody::Query { num }) => {
                if !self.controller.is_up(node) {
                    return Ok(());
                }
                // Configurations are immutable once committed, and a replica applies only
                // committed entries: any replica that has configuration n answers it truly.
                // "Latest" from a lagging replica is merely old, which the asker tolerates.
                let config = self
                    .controller
                    .node(node)
                    .app
                    .sm
                    .query(num)
                    .ok()
                    .cloned()
                    .map(Box::new);
                self.send(to, from, RpcBody::QueryReply { config });
            }
            (Endpoint::Host(h), RpcBody::QueryReply { config: Some(c) }) => {
                self.host_learns(h, *c);
            }
            (Endpoint::Client(i), RpcBody::QueryReply { config: Some(c) }) => {
                self.clients.learn_config(i, *c);
            }
            (Endpoint::Group(gid, node), RpcBody::QueryReply { config: Some(c) }) => {
                if let Some(g) = self.groups.get_mut(&gid) {
                    if g.cluster.is_up(node) {
                        g.configs.insert(c.num, *c);
                    }
                }
            }
            (Endpoint::Group(gid, node), RpcBody::Pull { shard, config_num }) => {
                let Some(g) = self.groups.get(&gid) else {
                    return Ok(());
                };
                let reply = if g.stopped {
                    PullReply::Gone
                } else if g.cluster.is_up(node) {
                    let app = &g.cluster.node(node).app;
                    app.shards().handle_pull(app.kv(), shard, config_num)
                } else {
                    return Ok(());
                };
                self.send(
                    to,
                    from,
                    RpcBody::PullReply {
                        shard,
                        config_num,
                        reply,
                    },
                );
            }
            (
                Endpoint::Group(gid, node),
                RpcBody::PullReply {
                    shard,
                    config_num,
                    reply: PullReply::Blob(blob),
                },
            ) => {
                if let Some(g) = self.groups.get_mut(&gid) {
                    if g.cluster.is_up(node) {
                        g.blobs.insert((config_num, shard), blob);
                    }
                }
            }
            (Endpoint::Group(gid, node), RpcBody::Confirm { shard, config_num }) => {
                let Some(g) = self.groups.get_mut(&gid) else {
                    return Ok(());
                };
                let answer = if g.stopped {
                    ConfirmAnswer::Done
                } else if g.cluster.is_up(node) {
                    let reply = g
                        .cluster
                        .node(node)
                        .app
                        .shards()
                        .handle_confirm(shard, config_num);
                    match reply {
                        ConfirmReply::Done => ConfirmAnswer::Done,
                        ConfirmReply::NotYet { .. } => ConfirmAnswer::Pending,
                        ConfirmReply::Propose(entry) => {
                            // Only a leader can; a follower's refusal costs one retry.
                            let _ = g.cluster.propose_at(node, entry);
                            ConfirmAnswer::Pending
                        }
                    }
                } else {
                    return Ok(());
                };
                self.send(
                    to,
                    from,
                    RpcBody::ConfirmReply {
                        shard,
                        config_num,
                        answer,
                    },
                );
            }
            (
                Endpoint::Group(gid, node),
                RpcBody::ConfirmReply {
                    shard,
                    config_num,
                    answer: ConfirmAnswer::Done,
                },
            ) => {
                if let Some(g) = self.groups.get_mut(&gid) {
                    if g.cluster.is_up(node) {
                        g.deleted.insert((config_num, shard));
                    }
                }
            }
            // Not-yet answers, Gone, and queries for configurations that do not exist yet:
            // the asker retries on its own schedule.
            _ => {}
        }
        Ok(())
    }

    fn client_turns(&mut self) -> Result<(), Violation> {
        let now = self.now;
        let mut asks = Vec::new();
        self.clients.step(now, &mut self.groups, &mut asks)?;
        for i in asks {
            let to = self.random_controller();
            self.send(Endpoint::Client(i), to, RpcBody::Query { num: -1 });
        }
        Ok(())
    }

    fn take_snapshots(&mut self) -> Result<(), Violation> {
        for g in self.groups.values_mut() {
            if g.stopped {
                continue;
            }
            for id in g.cluster.ids() {
                if g.cluster.node(id).app.snapshot_due() && snapshot_now(&mut g.cluster, id)? {
                    self.stats.snapshots_taken += 1;
                }
            }
        }
        Ok(())
    }

    /// The invariants that span groups, after every tick.
    pub fn check_invariants(&self) -> Result<(), Violation> {
        // (shard, configuration) -> the group whose replica accepts writes for it.
        let mut owners: BTreeMap<(u16, u64), GroupId> = BTreeMap::new();
        for g in self.groups.values() {
            if g.stopped {
                continue;
            }
            for n in &g.cluster.nodes {
                if n.raft.is_none() {
                    continue;
                }
                let app = &n.app;
                app.shards().check_against(app.kv()).map_err(|e| {
                    Violation(format!(
                        "t{} group {} replica {}: {e}",
                        self.now, g.id, n.id
                    ))
                })?;
                let num = app.shards().config_num();
                for shard in 0..self.cfg.shard_count {
                    if !app.accepts_writes(shard) {
                        continue;
                    }
                    let owner = owners.entry((shard, num)).or_insert(g.id);
                    if *owner != g.id {
                        return Err(Violation(format!(
                            "t{}: groups {} and {} both accept writes for shard {shard} in configuration {num}",
                            self.now, owner, g.id
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    // ----- progress --------------------------------------------------------------------------

    /// Every running group applied the controller's latest configuration (or is drained) and
    /// has no shard in flight; groups a configuration retired have stopped.
    pub fn settled(&self) -> bool {
        let Some(latest) = self.latest_config() else {
            return false;
        };
        if latest.num == 0 {
            return true;
        }
        for (gid, _) in latest.groups.iter() {
            let Some(g) = self.groups.get(gid) else {
                return false;
            };
            let Some(app) = g.leader_app() else {
                return false;
            };
            if app.shards().config_num() != latest.num
                || app.shards().next_config_wanted().is_none()
            {
                return false;
            }
        }
        self.groups
            .values()
            .all(|g| g.stopped || latest.groups.contains_key(&g.id))
    }

    /// Shard moves between groups over the controller's configuration history (a shard's
    /// first assignment is not a move).
    pub fn moves(&self) -> u64 {
        let Some(latest) = self.latest_config() else {
            return 0;
        };
        let mut moves = 0;
        let mut previous: Option<&Configuration> = self.config(0);
        for num in 1..=latest.num {
            let Some(c) = self.config(num) else {
                previous = None;
                continue;
            };
            if let Some(p) = previous {
                moves += p
                    .shards
                    .iter()
                    .zip(&c.shards)
                    .filter(|(a, b)| **a != GROUP_NONE && a != b)
                    .count() as u64;
            }
            previous = Some(c);
        }
        moves
    }

    /// A one-line picture of every group, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = match self.latest_config() {
            None => format!("t{} controller down", self.now),
            Some(c) => format!(
                "t{} controller latest {} hosts {:?} groups {:?} shards {:?}",
                self.now,
                c.num,
                c.hosts.keys().collect::<Vec<_>>(),
                c.groups.keys().collect::<Vec<_>>(),
                c.shards
            ),
        };
        for g in self.groups.values() {
            out.push_str(&format!("\n  group {} hosts {:?}", g.id, g.hosts));
            if g.stopped {
                out.push_str(" stopped");
                continue;
            }
            match g.leader_app() {
                None => out.push_str(" no leader"),
                Some(app) => out.push_str(&format!(
                    " config {} shards {:?}",
                    app.shards().config_num(),
                    app.shards().shards().collect::<Vec<_>>()
                )),
            }
        }
        out
    }

    /// Picks a random host (for fault injection).
    pub fn random_host(&mut self) -> HostId {
        let ids = self.host_ids();
        *ids.choose(&mut self.rng).unwrap_or(&1)
    }
}

fn cluster_config(cfg: &WorldConfig, nodes: usize) -> ClusterConfig {
    let mut c = ClusterConfig::new(nodes);
    c.net = cfg.raft_net;
    c.disk_ticks_max = cfg.disk_ticks_max;
    c.slow_disk_ticks = cfg.slow_disk_ticks;
    c.crash_in_ready_per_million = cfg.crash_in_ready_per_million;
    c
}

/// Slows each replica's clock by up to `max_per_million` (within the lease's drift bound).
fn skew_clocks<A: App>(cluster: &mut Cluster<A>, max_per_million: u32, rng: &mut ChaCha8Rng) {
    if max_per_million == 0 {
        return;
    }
    for n in &mut cluster.nodes {
        n.tick_skip_per_million = rng.gen_range(0..max_per_million);
    }
}

/// Cuts the Raft links of `cluster` whose hosts are cut (replica i+1 on `hosts[i]`).
fn mirror_cuts<A: App>(
    cluster: &mut Cluster<A>,
    hosts: &[HostId],
    cut: &BTreeSet<(HostId, HostId)>,
) {
    cluster.net.heal();
    for (i, a) in hosts.iter().enumerate() {
        for (j, b) in hosts.iter().enumerate() {
            if a != b && cut.contains(&(*a, *b)) {
                cluster.net.cut_link(i as NodeId + 1, j as NodeId + 1);
            }
        }
    }
}

/// Replica `id` snapshots its state at its applied index, compacts its log and stores the
/// snapshot on its disk, as the node runtime does at the end of a loop turn. Returns whether
/// it did (not when down, or when the applied index is not durable locally yet).
pub fn snapshot_now(cluster: &mut Cluster<ShardApp>, id: NodeId) -> Result<bool, Violation> {
    let i = (id - 1) as usize;
    let node = &mut cluster.nodes[i];
    let Some(raft) = node.raft.as_mut() else {
        return Ok(false);
    };
    let status = raft.status();
    if node.app.applied_index() != status.applied {
        return Err(Violation(format!(
            "replica {id}: kv applied {} but raft handed out {}",
            node.app.applied_index(),
            status.applied
        )));
    }
    if status.persisted < status.applied {
        return Ok(false);
    }
    match raft.compact(status.applied, node.app.snapshot()) {
        Ok(()) => {
            if let Some(s) = raft.snapshot() {
                node.disk.store_snapshot(s.clone());
            }
            node.app.mark_snapshot_taken();
            cluster.checker.on_snapshot_durable(id, status.applied);
            Ok(true)
        }
        Err(CompactError::Stale { .. }) => {
            node.app.mark_snapshot_taken();
            Ok(false)
        }
        Err(CompactError::NotApplied { .. }) => Ok(false),
    }
}

impl crate::sim::Steps for World {
    fn step(&mut self) -> Result<(), Violation> {
        World::step(self)
    }
}
