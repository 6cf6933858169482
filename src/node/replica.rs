//! The data group replicas of one core: which groups a configuration places on a slot of this
//! host, how a replica is described on disk, and how replicas come and go while the host runs:
//! created when a configuration places them here (Join), removed once their group has drained
//! (Leave). The rules are the simulator's (`sim::shard::world`), with real files.
//!
//! A replica is a [`DataGroupSpec`]: its group ids, its Raft node id, and the slot (host, core)
//! of every member. A group's replicas are fixed for its life: a configuration creates a group
//! with R replicas on R hosts, and a Leave retires the group (its shards move to others) rather
//! than changing its members. So the spec never changes, and is written once, in
//! `<data>/group-<peer id>/spec`, before the replica's log is created: a restarted host reopens
//! every group directory it finds from its spec alone, including groups the latest
//! configuration no longer names (retired, still handing shards over).
//!
//! Creation. Each core walks the controller's configurations one number at a time (as a
//! simulator host agent does, `HostAgent::known`), remembering the last one it walked in
//! `<data>/core-<c>.walked`. For every group a configuration places on (this host, this core)
//! that the core does not run and never removed, it writes the spec and opens the replica: an
//! empty log bootstrapped with the group's voters, no shard. The group's own log then accepts
//! the configuration that created it and pulls its shards ([`crate::shard::migration`]).
//! Walking every number matters: a group created in n and retired in n+1 must still get its
//! replicas, or the shards it took in n could never leave it. A host that has walked nothing
//! starts at the first configuration of the run of configurations, ending at the latest, that
//! list it (1 for a host of `--initial-cluster`, its Join for a joined host). The static map's
//! groups (created by the bootstrap configuration on the initial hosts) are opened at start
//! from `--initial-cluster` instead, with host ids as Raft node ids, as every log written so
//! far has them.
//!
//! Removal. A replica stops when its own applied state says the group is drained (retired, and
//! every shard it held deleted after the new owner confirmed it: `GroupShards::is_drained`), or
//! when its group is retired in the latest configuration and a member's host answers that it
//! removed its replica (a replica that missed the last entries, whose peers already stopped,
//! would otherwise wait forever for a majority). Removing: the replica is unregistered (peer
//! messages and requests for it no longer find it), its tasks are cancelled, a tombstone
//! `<data>/group-<peer id>.removed` is made durable, then its directory is deleted (disk
//! returns). The tombstone is what a host answers `GONE`/`DONE` from for pulls, confirms and
//! removal questions about that group, and what keeps a walk from creating it again. A crash
//! between the tombstone and the deletion is finished at the next start.
//!
//! Files are written with the standard library (write to a temporary name, fsync, rename, fsync
//! the directory): a few small files per configuration change, off the request path; glommio
//! 0.9 has no directory removal.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tynamo_wal::WalOptions;

use crate::controller::{self, Configuration, Slot};
use crate::kv;
use crate::raft::{NodeId, RawNode};

use super::codec::GroupId;
use super::config::ServerConfig;
use super::control::host_addr_text;
use super::executor::{group_loop, kv_config, now_nanos, raft_config, CoreCtx, GroupView};
use super::group::{persist_loop, Group, Signal};
use super::machine::KvMachine;
use super::storage::GroupStorage;
use super::transport::CoreId;

/// The configuration the bootstrap Join produces: the static map's groups are created in it.
pub const BOOTSTRAP_CONFIG_NUM: u64 = 1;
/// A core looks for configurations to walk every this many heartbeats.
const WALK_PERIOD_HEARTBEATS: u64 = 2;
/// Configurations looked at backwards for the first one that lists a host that walked none.
const WALK_BACK_MAX: u64 = 4096;
/// Bytes of a spec file: a group has at most `REPLICATION_MAX` members.
const SPEC_BYTES_MAX: usize = 4096;
const SPEC_MAGIC: [u8; 4] = *b"TYGS";
const WALKED_MAGIC: [u8; 4] = *b"TYGW";
const TOMBSTONE_MAGIC: [u8; 4] = *b"TYGR";
const RECORD_VERSION: u8 = 1;

/// What one data group replica on a core is: its ids, its Raft node id and members, and the
/// slot (host, core) that runs each member (peer messages go to that core of that host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataGroupSpec {
    /// The group id its peer frames carry; its storage is `group-{peer_id}` in the data dir.
    pub peer_id: GroupId,
    /// The group's id in the controller's configurations (`peer_id + 1`).
    pub config_group: controller::GroupId,
    /// The configuration that created the group: the first one its log accepts.
    pub created_in: u64,
    /// The core of this host that runs this replica.
    pub core: u16,
    /// This replica's Raft node id.
    pub node: NodeId,
    /// Every member's Raft node id -> its slot.
    pub slots_by_node: BTreeMap<NodeId, Slot>,
}

impl DataGroupSpec {
    /// The static map's group on `core`: a replica on core `core` of every initial host, whose
    /// Raft node id is its host id (what every log written so far uses, so it must stay so).
    pub fn bootstrap(cfg: &ServerConfig, core: u16) -> DataGroupSpec {
        DataGroupSpec {
            peer_id: GroupId::from(core),
            config_group: controller::GroupId::from(core) + 1,
            created_in: BOOTSTRAP_CONFIG_NUM,
            core,
            node: cfg.id,
            slots_by_node: cfg
                .voters()
                .into_iter()
                .map(|h| (h, Slot { host: h, core }))
                .collect(),
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
        Some(DataGroupSpec {
            peer_id: group.checked_sub(1)?,
            config_group: group,
            created_in: g.created_in,
            core,
            node: mine.node_id,
            slots_by_node: g.replicas.iter().map(|r| (r.node_id, r.slot)).collect(),
        })
    }

    /// The members a fresh replica bootstraps with (ascending).
    pub fn voters(&self) -> Vec<NodeId> {
        self.slots_by_node.keys().copied().collect()
    }

    pub fn slot_of(&self, node: NodeId) -> Option<Slot> {
        self.slots_by_node.get(&node).copied()
    }

    /// This replica's directory under the data directory.
    pub fn dir(&self, data_dir: &Path) -> PathBuf {
        group_dir(data_dir, self.peer_id)
    }

    /// The spec file's bytes: `magic version crc32 len` + `peer_id config_group created_in
    /// core node count (node host core)*`, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(64 + self.slots_by_node.len() * 18);
        p.extend_from_slice(&self.peer_id.to_le_bytes());
        p.extend_from_slice(&self.config_group.to_le_bytes());
        p.extend_from_slice(&self.created_in.to_le_bytes());
        p.extend_from_slice(&self.core.to_le_bytes());
        p.extend_from_slice(&self.node.to_le_bytes());
        p.extend_from_slice(&(self.slots_by_node.len() as u32).to_le_bytes());
        for (node, slot) in &self.slots_by_node {
            p.extend_from_slice(&node.to_le_bytes());
            p.extend_from_slice(&slot.host.to_le_bytes());
            p.extend_from_slice(&slot.core.to_le_bytes());
        }
        frame_record(SPEC_MAGIC, &p)
    }

    /// Decodes and checks a spec file; never panics on bad bytes.
    pub fn decode(bytes: &[u8]) -> Result<DataGroupSpec, String> {
        let p = unframe_record(SPEC_MAGIC, bytes, SPEC_BYTES_MAX)?;
        let mut r = Cursor { bytes: p, at: 0 };
        let peer_id = r.u64()?;
        let config_group = r.u64()?;
        let created_in = r.u64()?;
        let core = r.u16()?;
        let node = r.u64()?;
        let count = r.u32()? as usize;
        if count == 0 || count > usize::from(controller::config::REPLICATION_MAX) {
            return Err(format!("{count} members"));
        }
        let mut slots_by_node = BTreeMap::new();
        for _ in 0..count {
            let n = r.u64()?;
            let host = r.u64()?;
            let core = r.u16()?;
            if slots_by_node.insert(n, Slot { host, core }).is_some() {
                return Err(format!("node {n} listed twice"));
            }
        }
        if r.at != p.len() {
            return Err(format!("{} bytes after the members", p.len() - r.at));
        }
        if peer_id.checked_add(1) != Some(config_group) {
            return Err(format!(
                "peer id {peer_id} and configuration group {config_group} disagree"
            ));
        }
        if slots_by_node.get(&node).map(|s| s.core) != Some(core) {
            return Err(format!(
                "node {node} on core {core} is not one of the members"
            ));
        }
        Ok(DataGroupSpec {
            peer_id,
            config_group,
            created_in,
            core,
            node,
            slots_by_node,
        })
    }
}

/// The groups `config` places on (`host`, `core`) that this core must create: not running here
/// (`running`), never removed here (`removed`), and not a static-map group of an initial host
/// (those are opened from `--initial-cluster` at start, with host ids as node ids). In group id
/// order.
pub fn groups_to_create(
    config: &Configuration,
    host: u64,
    core: u16,
    initial_host: bool,
    running: &dyn Fn(controller::GroupId) -> bool,
    removed: &BTreeSet<controller::GroupId>,
) -> Vec<DataGroupSpec> {
    config
        .groups
        .iter()
        .filter(|(_, g)| !(initial_host && g.created_in == BOOTSTRAP_CONFIG_NUM))
        .filter(|(id, _)| !running(**id) && !removed.contains(id))
        .filter_map(|(&id, _)| DataGroupSpec::from_config(config, id, host, core))
        .collect()
}

/// Whether `config` lists `host` (a walk covers the configurations that do).
pub fn lists_host(config: &Configuration, host: u64) -> bool {
    config.hosts.contains_key(&host)
}

/// `<data>/group-<peer id>`.
pub fn group_dir(data_dir: &Path, peer_id: GroupId) -> PathBuf {
    data_dir.join(format!("group-{peer_id}"))
}

fn tombstone_path(data_dir: &Path, peer_id: GroupId) -> PathBuf {
    data_dir.join(format!("group-{peer_id}.removed"))
}

fn walked_path(data_dir: &Path, core: u16) -> PathBuf {
    data_dir.join(format!("core-{core}.walked"))
}

const SPEC_FILE: &str = "spec";

/// `magic:4 version:u8 len:u32 crc32(payload):u32 payload`.
pub(crate) fn frame_record(magic: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + payload.len());
    out.extend_from_slice(&magic);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

pub(crate) fn unframe_record(
    magic: [u8; 4],
    bytes: &[u8],
    payload_max: usize,
) -> Result<&[u8], String> {
    if bytes.len() < 13 || bytes[..4] != magic {
        return Err(format!(
            "not a {} record ({} bytes)",
            String::from_utf8_lossy(&magic),
            bytes.len()
        ));
    }
    if bytes[4] != RECORD_VERSION {
        return Err(format!("record version {}", bytes[4]));
    }
    let len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    if len > payload_max || bytes.len() != 13 + len {
        return Err(format!(
            "payload of {len} bytes in a record of {} bytes",
            bytes.len()
        ));
    }
    let crc = u32::from_le_bytes([bytes[9], bytes[10], bytes[11], bytes[12]]);
    let payload = &bytes[13..];
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(payload)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let b = self
            .bytes
            .get(self.at..self.at + N)
            .ok_or_else(|| format!("cut short at byte {}", self.at))?;
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.take::<2>().map(u16::from_le_bytes)
    }
}

/// Writes `bytes` to `path` durably and atomically: a temporary file, fsync, rename, fsync of
/// the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no directory", path.display()))?;
    let tmp = path.with_extension("tmp");
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(|e| fail("create", e))?;
    f.write_all(bytes).map_err(|e| fail("write", e))?;
    f.sync_all().map_err(|e| fail("fsync", e))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("rename {} to {}: {e}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("fsync directory {}: {e}", dir.display()))
}

/// Makes a new replica's directory and its spec durable (before its log is created).
pub fn write_spec(data_dir: &Path, spec: &DataGroupSpec) -> Result<(), String> {
    let dir = spec.dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    sync_dir(data_dir)?;
    write_durably(&dir.join(SPEC_FILE), &spec.encode())
}

/// The last configuration core `core` walked, if it walked any.
pub fn read_walked(data_dir: &Path, core: u16) -> Result<Option<u64>, String> {
    let path = walked_path(data_dir, core);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let p = unframe_record(WALKED_MAGIC, &bytes, 8)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let num: [u8; 8] = p
                .try_into()
                .map_err(|_| format!("{}: {} bytes, want 8", path.display(), p.len()))?;
            Ok(Some(u64::from_le_bytes(num)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("read {}: {e}", path.display())),
    }
}

pub fn write_walked(data_dir: &Path, core: u16, num: u64) -> Result<(), String> {
    write_durably(
        &walked_path(data_dir, core),
        &frame_record(WALKED_MAGIC, &num.to_le_bytes()),
    )
}

/// Records durably that this host removed its replica of `spec`'s group (its tombstone).
pub fn write_tombstone(data_dir: &Path, spec: &DataGroupSpec) -> Result<(), String> {
    write_durably(
        &tombstone_path(data_dir, spec.peer_id),
        &frame_record(TOMBSTONE_MAGIC, &spec.config_group.to_le_bytes()),
    )
}

/// Deletes a removed replica's directory; returns the bytes it held.
pub fn delete_replica_dir(data_dir: &Path, spec: &DataGroupSpec) -> Result<u64, String> {
    let dir = spec.dir(data_dir);
    let bytes = dir_bytes(&dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("delete {}: {e}", dir.display())),
    }
    sync_dir(data_dir)?;
    Ok(bytes)
}

/// [`write_tombstone`], then [`delete_replica_dir`].
pub fn remove_replica_files(data_dir: &Path, spec: &DataGroupSpec) -> Result<u64, String> {
    write_tombstone(data_dir, spec)?;
    delete_replica_dir(data_dir, spec)
}

/// Bytes of the files under `dir` (its segments are preallocated: the disk it holds).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// What a host finds in its data directory at start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DiskGroups {
    /// Replicas with a spec, by core.
    pub specs: BTreeMap<u16, Vec<DataGroupSpec>>,
    /// Configuration groups whose replica this host removed.
    pub removed: BTreeSet<controller::GroupId>,
    /// Peer ids of the directories without a spec (a static-map group written before specs
    /// existed, or a creation interrupted before its spec was durable: it holds no log).
    pub without_spec: BTreeSet<GroupId>,
}

/// Reads the data directory: every replica's spec, every tombstone; finishes removals a crash
/// interrupted (tombstone written, directory not yet deleted). A spec or tombstone that does
/// not decode is an error naming the file: a replica's data is never dropped on a guess.
pub fn scan(data_dir: &Path) -> Result<DiskGroups, String> {
    let mut found = DiskGroups::default();
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(format!("read {}: {e}", data_dir.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", data_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("group-") else {
            continue;
        };
        if let Some(id) = rest.strip_suffix(".removed") {
            let Ok(peer_id) = id.parse::<GroupId>() else {
                continue;
            };
            let path = entry.path();
            let bytes =
                std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
            let p = unframe_record(TOMBSTONE_MAGIC, &bytes, 8)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let group: [u8; 8] = p
                .try_into()
                .map_err(|_| format!("{}: {} bytes, want 8", path.display(), p.len()))?;
            let group = u64::from_le_bytes(group);
            if peer_id.checked_add(1) != Some(group) {
                return Err(format!("{}: names group {group}", path.display()));
            }
            found.removed.insert(group);
        } else if let Ok(peer_id) = rest.parse::<GroupId>() {
            dirs.push((peer_id, entry.path()));
        }
    }
    for (peer_id, dir) in dirs {
        if found.removed.contains(&(peer_id + 1)) {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("finish removing {}: {e}", dir.display()))?;
            continue;
        }
        let spec_path = dir.join(SPEC_FILE);
        match std::fs::read(&spec_path) {
            Ok(bytes) => {
                let spec = DataGroupSpec::decode(&bytes)
                    .map_err(|e| format!("{}: {e}", spec_path.display()))?;
                if spec.peer_id != peer_id {
                    return Err(format!(
                        "{}: describes group {} in the directory of {peer_id}",
                        spec_path.display(),
                        spec.peer_id
                    ));
                }
                found.specs.entry(spec.core).or_default().push(spec);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                found.without_spec.insert(peer_id);
            }
            Err(e) => return Err(format!("read {}: {e}", spec_path.display())),
        }
    }
    for specs in found.specs.values_mut() {
        specs.sort_by_key(|s| s.peer_id);
    }
    Ok(found)
}

/// The replicas core `core` opens at start: the static map's group `core` on an initial host
/// (unless this host removed it), then every other replica with a spec on this core.
pub fn start_specs(cfg: &ServerConfig, core: u16, disk: &DiskGroups) -> Vec<DataGroupSpec> {
    let mut specs = Vec::new();
    if cfg.initial_host() {
        let boot = DataGroupSpec::bootstrap(cfg, core);
        if !disk.removed.contains(&boot.config_group) {
            specs.push(boot);
        }
    }
    for spec in disk.specs.get(&core).into_iter().flatten() {
        if !specs.iter().any(|s| s.peer_id == spec.peer_id) {
            specs.push(spec.clone());
        }
    }
    specs
}

/// One data group replica running on a core: its group, its host-wide view, its log (for
/// INFO), and the task running its loop and persister (cancelled when it is removed).
pub struct CoreGroup {
    pub group: Rc<RefCell<Group>>,
    pub view: Arc<GroupView>,
    pub wal: Rc<tynamo_wal::Wal>,
    runner: RefCell<Option<glommio::Task<()>>>,
}

/// Opens (or, on an empty directory, creates with the spec's voters) data group replica `spec`:
/// its WAL, snapshot and state machine. A new replica holds no shard: the configuration that
/// created its group gives it its shards.
async fn open_data_group(
    cfg: &ServerConfig,
    spec: &DataGroupSpec,
) -> Result<(Rc<RefCell<Group>>, GroupStorage), String> {
    let dir = spec.dir(&cfg.data_dir);
    let wal_opts = WalOptions {
        segment_bytes: cfg.segment_bytes,
        entry_bytes_max: super::config::ENTRY_BYTES_MAX,
        ..WalOptions::default()
    };
    let kvc = kv_config(cfg);
    let (storage, recovered) = GroupStorage::open(spec.peer_id, &dir, wal_opts, &spec.voters())
        .await
        .map_err(|e| format!("group {}: {e}", spec.config_group))?;
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
        ^ u64::from(spec.core)
        ^ spec.peer_id.rotate_left(32)
        ^ now_nanos();
    let raw = RawNode::new(raft_config(cfg, spec.node), recovered.initial, seed)
        .map_err(|e| format!("group {}: raft config: {e}", spec.config_group))?;
    let group = Rc::new(RefCell::new(Group::new(
        spec.peer_id,
        raw,
        machine,
        u64::from(cfg.election_ticks()),
    )));
    Ok((group, storage))
}

/// Opens replica `spec` on this core and runs it: registered (peer routing, requests, the
/// host view), its loop and persister in one task, its migration driver in another. A fatal
/// error of the replica or its storage stops the core (`CoreCtx::fatal`).
pub async fn start(ctx: &Rc<CoreCtx>, spec: DataGroupSpec) -> Result<(), String> {
    assert_eq!(
        spec.core, ctx.core,
        "replica {spec:?} started on core {}",
        ctx.core
    );
    let (group, storage) = open_data_group(&ctx.cfg, &spec).await?;
    let view = Arc::new(GroupView::new(spec.clone()));
    let wal = storage.wal.clone();
    let snapshots = storage.snapshots.clone();
    let entry = Rc::new(CoreGroup {
        group: group.clone(),
        view: view.clone(),
        wal: wal.clone(),
        runner: RefCell::new(None),
    });
    ctx.groups.insert(entry.clone());
    ctx.view.register(view.clone());
    let (ctx2, gid) = (ctx.clone(), spec.config_group);
    let host_of = move |node| {
        spec.slot_of(node).map(|s| CoreId {
            host: s.host,
            core: s.core,
        })
    };
    let runner = glommio::spawn_local(async move {
        let wake = group.borrow().wake.clone();
        let persist_wake = Rc::new(Signal::default());
        let persister =
            glommio::spawn_local(persist_loop(group.clone(), storage, persist_wake.clone()));
        let looper = group_loop(
            group,
            wake,
            persist_wake,
            ctx2.senders.clone(),
            host_of,
            move |gr: &Group| view.publish(gr),
            snapshots,
            wal,
        );
        let why = futures_lite::future::or(looper, async {
            let e = persister.await;
            format!("storage failed: {e}")
        })
        .await;
        *ctx2.fatal.borrow_mut() = Some(format!("group {gid}: {why}"));
        ctx2.fatal_wake.notify();
    });
    *entry.runner.borrow_mut() = Some(runner);
    let peer_id = entry.view.spec.peer_id;
    glommio::spawn_local(super::migrate::drive(ctx.clone(), peer_id)).detach();
    Ok(())
}

/// Removes this core's replica of group `peer_id` for good: unregistered, its clients answered,
/// its tasks cancelled, a durable tombstone, its directory deleted (see the module docs).
pub async fn remove(ctx: &Rc<CoreCtx>, peer_id: GroupId, why: &str) {
    let Some(entry) = ctx.groups.remove(peer_id) else {
        return;
    };
    let spec = entry.view.spec.clone();
    ctx.view.unregister(spec.config_group);
    let runner = entry.runner.borrow_mut().take();
    if let Some(runner) = runner {
        runner.cancel().await;
    }
    entry
        .group
        .borrow_mut()
        .shut_down(&format!("group {} left this host", spec.config_group));
    if let Err(e) = write_tombstone(&ctx.cfg.data_dir, &spec) {
        // Without a durable tombstone a restart would reopen the replica as if nothing
        // happened (harmless: it drains again), but this host could not answer for the group:
        // a disk problem the operator must see, so the core stops rather than guess.
        *ctx.fatal.borrow_mut() = Some(format!(
            "removing group {}'s replica: {e}",
            spec.config_group
        ));
        ctx.fatal_wake.notify();
        return;
    }
    ctx.view.mark_removed(spec.config_group);
    match delete_replica_dir(&ctx.cfg.data_dir, &spec) {
        Ok(bytes) => eprintln!(
            "tynamo: core {}: removed replica {} of group {} ({why}); {bytes} bytes of storage \
             deleted",
            ctx.core, spec.node, spec.config_group
        ),
        // The tombstone is durable: the next start finishes the deletion (`scan`). A snapshot
        // save of the stopped replica still in flight may have raced the deletion.
        Err(e) => eprintln!(
            "tynamo: core {}: removed replica {} of group {} ({why}), but its storage is not \
             deleted yet: {e}",
            ctx.core, spec.node, spec.config_group
        ),
    }
}

/// Walks the controller's configurations one number at a time and creates the replicas they
/// place on this core (see the module docs). Runs for the life of the core.
pub async fn walk(ctx: Rc<CoreCtx>) {
    let period = Duration::from_millis(ctx.cfg.heartbeat_ms.max(1) * WALK_PERIOD_HEARTBEATS);
    let mut walked = match read_walked(&ctx.cfg.data_dir, ctx.core) {
        Ok(w) => w,
        Err(e) => {
            *ctx.fatal.borrow_mut() = Some(format!("configuration walk: {e}"));
            ctx.fatal_wake.notify();
            return;
        }
    };
    let mut last_error = String::new();
    loop {
        glommio::timer::sleep(period).await;
        match walk_once(&ctx, &mut walked).await {
            Ok(()) => last_error.clear(),
            Err(e) => {
                if e != last_error {
                    eprintln!("tynamo: core {}: configuration walk: {e}", ctx.core);
                    last_error = e;
                }
            }
        }
    }
}

async fn walk_once(ctx: &Rc<CoreCtx>, walked: &mut Option<u64>) -> Result<(), String> {
    let latest = ctx.view.controller.config_num.load(Ordering::Relaxed);
    if latest == 0 || walked.is_some_and(|w| w >= latest) {
        return Ok(());
    }
    let from = match *walked {
        Some(w) => w + 1,
        None => match first_listing(ctx, latest).await? {
            Some(first) => first,
            // This host is in no configuration yet (`tynamo ctl join` not run yet).
            None => return Ok(()),
        },
    };
    let me = ctx.cfg.id;
    for num in from..=latest {
        let Some(config) = super::migrate::config(ctx, num).await? else {
            return Ok(());
        };
        if ctx.core == 0 {
            check_host_entry(ctx, &config);
        }
        let running = |g| ctx.groups.by_config(g).is_some();
        let removed = ctx.view.removed();
        let initial = ctx.cfg.initial_host();
        for spec in groups_to_create(&config, me, ctx.core, initial, &running, &removed) {
            let (group, node) = (spec.config_group, spec.node);
            write_spec(&ctx.cfg.data_dir, &spec)?;
            start(ctx, spec).await?;
            eprintln!(
                "tynamo: core {}: created replica {node} of group {group} (configuration {num})",
                ctx.core
            );
        }
        write_walked(&ctx.cfg.data_dir, ctx.core, num)?;
        *walked = Some(num);
    }
    Ok(())
}

/// The first configuration of the run that ends at `latest` and lists this host, or None when
/// `latest` does not list it. A history older than this host's window of configurations ends
/// the search where it is (a host that missed that many configurations while down catches up
/// on the groups of the ones it can still get).
async fn first_listing(ctx: &Rc<CoreCtx>, latest: u64) -> Result<Option<u64>, String> {
    let me = ctx.cfg.id;
    let Some(config) = super::migrate::config(ctx, latest).await? else {
        return Ok(None);
    };
    if !lists_host(&config, me) {
        return Ok(None);
    }
    let mut first = latest;
    while first > 1 && latest - first < WALK_BACK_MAX {
        match super::migrate::config(ctx, first - 1).await {
            Ok(Some(c)) if lists_host(&c, me) => first -= 1,
            Ok(Some(_)) => break,
            Ok(None) | Err(_) => {
                eprintln!(
                    "tynamo: core {}: configuration {} is not available; walking from {first}",
                    ctx.core,
                    first - 1
                );
                break;
            }
        }
    }
    Ok(Some(first))
}

/// Says once per configuration when the controller describes this host differently from how
/// it runs (the operator's `tynamo ctl join` named other cores or addresses): replicas on cores
/// it does not have are never created, and peers would dial the wrong address.
fn check_host_entry(ctx: &CoreCtx, config: &Configuration) {
    let Some(h) = config.hosts.get(&ctx.cfg.id) else {
        return;
    };
    let Some(me) = ctx.cfg.me() else {
        return;
    };
    let addr = host_addr_text(me);
    if h.cores != ctx.cfg.cores || h.addr != addr {
        eprintln!(
            "tynamo: configuration {} says host {} has {} cores at {}, but it runs {} cores at \
             {addr}: fix it with `tynamo ctl leave` and `tynamo ctl join`",
            config.num, ctx.cfg.id, h.cores, h.addr, ctx.cfg.cores
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Command, HostSpec, Op, Reply, StateMachine};
    use crate::node::config::parse_initial_cluster;
    use crate::node::control::ControlPlan;

    fn bootstrap_controller(cfg: &ServerConfig) -> (ControlPlan, StateMachine) {
        let plan = ControlPlan::new(cfg);
        let mut sm = StateMachine::new(plan.settings.clone()).unwrap();
        let mut index = 1;
        while let Some(c) = plan.next_bootstrap(sm.latest()).cloned() {
            assert!(index < 10, "bootstrap does not converge");
            index += 1;
            let reply = sm.apply(index, &c.encode());
            assert!(matches!(reply, Some(Reply::Ok { .. })), "{reply:?}");
        }
        (plan, sm)
    }

    fn apply(sm: &mut StateMachine, op: Op) -> Configuration {
        let index = sm.applied_index() + 1;
        let reply = sm.apply(
            index,
            &Command {
                client_id: 0,
                seq: 0,
                op,
            }
            .encode(),
        );
        assert!(matches!(reply, Some(Reply::Ok { .. })), "{reply:?}");
        sm.latest().clone()
    }

    fn join(ids: &[u64], cores: u16) -> Op {
        Op::Join {
            hosts: ids
                .iter()
                .map(|&id| HostSpec {
                    id,
                    cores,
                    addr: format!("127.0.0.1:{}/127.0.0.1:{}", 7100 + id, 7000 + id),
                })
                .collect(),
        }
    }

    fn three_hosts(me: u64, cores: u16) -> ServerConfig {
        let map = "1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,3=127.0.0.1:7121/127.0.0.1:7021";
        ServerConfig::new(
            me,
            "/tmp/unused".into(),
            parse_initial_cluster(map).unwrap(),
            cores,
        )
    }

    #[test]
    fn a_configuration_groups_replica_spec_agrees_with_the_bootstrap_on_ids_and_hosts() {
        let map = "5=10.0.0.5:7101,9=10.0.0.9:7101,2=10.0.0.2:7101";
        let hosts = parse_initial_cluster(map).unwrap();
        for me in [2, 5, 9] {
            let cfg = ServerConfig::new(me, "/tmp/unused".into(), hosts.clone(), 2);
            let (_, sm) = bootstrap_controller(&cfg);
            let config = sm.latest();
            for core in 0..2 {
                let boot = DataGroupSpec::bootstrap(&cfg, core);
                let from = DataGroupSpec::from_config(config, boot.config_group, me, core)
                    .unwrap_or_else(|| panic!("host {me} core {core}: no replica in {config:?}"));
                // Same group ids, storage, creation and member slots; the bootstrap keeps host
                // ids as node ids (its logs say so), a configuration numbers nodes 1, 2, 3.
                assert_eq!(from.peer_id, boot.peer_id);
                assert_eq!(from.config_group, boot.config_group);
                assert_eq!(from.created_in, boot.created_in);
                let slots = |s: &DataGroupSpec| {
                    let mut v: Vec<Slot> = s.slots_by_node.values().copied().collect();
                    v.sort_unstable();
                    v
                };
                assert_eq!(slots(&from), slots(&boot));
                assert_eq!(from.voters(), vec![1, 2, 3]);
                assert_eq!(from.slot_of(from.node), Some(Slot { host: me, core }));
                assert_eq!(boot.slot_of(boot.node), Some(Slot { host: me, core }));
            }
            // No replica on a core the host does not have, nor for a group that does not exist.
            assert!(DataGroupSpec::from_config(config, 1, me, 7).is_none());
            assert!(DataGroupSpec::from_config(config, 99, me, 0).is_none());
        }
    }

    #[test]
    fn a_join_places_a_new_group_on_several_cores_and_a_leave_retires_it() {
        // The example: 3 hosts x 2 cores, then hosts 4 and 5 with 2 cores each. Group 3
        // goes on (4,0), (5,0) and (1,1): host 1 core 1 runs groups 2 and 3.
        let cfg = three_hosts(1, 2);
        let (_, mut sm) = bootstrap_controller(&cfg);
        let none = BTreeSet::new();
        let running_boot = |g: u64| g <= 2;
        let config = sm.latest().clone();
        for host in 1..=3 {
            for core in 0..2 {
                // The static map's groups are never created by a walk on an initial host.
                assert!(
                    groups_to_create(&config, host, core, true, &|_| false, &none).is_empty(),
                    "host {host} core {core}"
                );
            }
        }
        let joined = apply(&mut sm, join(&[4, 5], 2));
        assert_eq!(joined.groups.len(), 3);
        let want = |host: u64, core: u16| -> Vec<(u64, NodeId)> {
            let initial = host <= 3;
            groups_to_create(&joined, host, core, initial, &running_boot, &none)
                .iter()
                .map(|s| (s.config_group, s.node))
                .collect()
        };
        assert_eq!(want(4, 0), vec![(3, 1)]);
        assert_eq!(want(5, 0), vec![(3, 2)]);
        assert_eq!(want(1, 1), vec![(3, 3)]);
        for (host, core) in [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 1), (5, 1)] {
            assert!(want(host, core).is_empty(), "host {host} core {core}");
        }
        // Host 4 core 0's replica talks to host 1 core 1: peers on different cores.
        let spec = DataGroupSpec::from_config(&joined, 3, 4, 0).unwrap();
        assert_eq!(spec.slot_of(3), Some(Slot { host: 1, core: 1 }));
        assert_eq!(spec.created_in, joined.num);
        // Running, or removed earlier: nothing to create.
        assert!(groups_to_create(&joined, 4, 0, false, &|g| g == 3, &none).is_empty());
        assert!(
            groups_to_create(&joined, 4, 0, false, &|_| false, &BTreeSet::from([3])).is_empty()
        );
        // Leave of host 4 retires group 3 (a replica on host 4): nothing is placed on host 4 any
        // more, and no new group takes its place (8 cores, replication 3: two groups).
        let left = apply(&mut sm, Op::Leave { hosts: vec![4] });
        assert!(!left.groups.contains_key(&3));
        assert!(!lists_host(&left, 4) && lists_host(&left, 5));
        assert!(groups_to_create(&left, 5, 0, false, &|_| false, &none).is_empty());
        // A host that walks config `joined` after it was retired still creates its replica:
        // the group holds shards from `joined` on and must hand them over.
        assert_eq!(
            groups_to_create(&joined, 5, 0, false, &|_| false, &none)[0].config_group,
            3
        );
    }

    #[test]
    fn spec_files_round_trip_and_every_corruption_is_refused() {
        let cfg = three_hosts(2, 2);
        let (_, mut sm) = bootstrap_controller(&cfg);
        let joined = apply(&mut sm, join(&[4, 5], 2));
        let spec = DataGroupSpec::from_config(&joined, 3, 1, 1).unwrap();
        let bytes = spec.encode();
        assert_eq!(DataGroupSpec::decode(&bytes), Ok(spec.clone()));
        let boot = DataGroupSpec::bootstrap(&cfg, 1);
        assert_eq!(DataGroupSpec::decode(&boot.encode()), Ok(boot));
        for len in 0..bytes.len() {
            assert!(
                DataGroupSpec::decode(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(DataGroupSpec::decode(&bad).is_err(), "byte {i} flipped");
        }
        // Well framed, but saying something impossible: the error names it.
        let mut wrong = spec.clone();
        wrong.config_group = 9;
        assert!(DataGroupSpec::decode(&wrong.encode())
            .unwrap_err()
            .contains("disagree"));
        let mut wrong = spec;
        wrong.core = 0;
        assert!(DataGroupSpec::decode(&wrong.encode())
            .unwrap_err()
            .contains("not one of the members"));
    }

    #[test]
    fn a_data_directory_is_read_back_and_an_interrupted_removal_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let cfg = three_hosts(1, 2);
        let (_, mut sm) = bootstrap_controller(&cfg);
        let joined = apply(&mut sm, join(&[4, 5], 2));
        let spec3 = DataGroupSpec::from_config(&joined, 3, 1, 1).unwrap();
        assert_eq!(scan(data).unwrap(), DiskGroups::default());
        // A static-map group's directory from before specs existed, and group 3's.
        std::fs::create_dir_all(group_dir(data, 0).join("wal")).unwrap();
        write_spec(data, &spec3).unwrap();
        std::fs::write(spec3.dir(data).join("payload"), vec![7u8; 1000]).unwrap();
        let found = scan(data).unwrap();
        assert_eq!(found.specs.get(&1), Some(&vec![spec3.clone()]));
        assert_eq!(found.without_spec, BTreeSet::from([0]));
        assert!(found.removed.is_empty());
        let starts: Vec<u64> = start_specs(&cfg, 1, &found)
            .iter()
            .map(|s| s.config_group)
            .collect();
        assert_eq!(
            starts,
            vec![2, 3],
            "core 1 runs group 2 (static map) and group 3"
        );
        assert_eq!(walk_start_for_test(data), None);
        write_walked(data, 1, 41).unwrap();
        assert_eq!(read_walked(data, 1), Ok(Some(41)));
        assert_eq!(read_walked(data, 0), Ok(None));
        // Removal: tombstone, directory gone, the disk returned.
        let freed = remove_replica_files(data, &spec3).unwrap();
        assert!(freed >= 1000, "{freed}");
        assert!(!spec3.dir(data).exists());
        let found = scan(data).unwrap();
        assert_eq!(found.removed, BTreeSet::from([3]));
        assert!(found.specs.is_empty());
        // A crash after the tombstone, before the deletion: the next start finishes it.
        write_spec(data, &spec3).unwrap();
        let found = scan(data).unwrap();
        assert!(!spec3.dir(data).exists());
        assert!(found.specs.is_empty() && found.removed.contains(&3));
        // A removed static-map group is not opened again from --initial-cluster.
        let boot = DataGroupSpec::bootstrap(&cfg, 0);
        write_spec(data, &boot).unwrap();
        remove_replica_files(data, &boot).unwrap();
        let found = scan(data).unwrap();
        assert!(start_specs(&cfg, 0, &found).is_empty());
        // A damaged spec stops the start with the file named, rather than dropping the data.
        write_spec(data, &spec3).unwrap();
        std::fs::remove_file(tombstone_path(data, spec3.peer_id)).unwrap();
        std::fs::write(spec3.dir(data).join(SPEC_FILE), b"TYGS garbage").unwrap();
        let e = scan(data).unwrap_err();
        assert!(e.contains("group-2/spec"), "{e}");
    }

    fn walk_start_for_test(data: &Path) -> Option<u64> {
        read_walked(data, 1).unwrap()
    }
}
