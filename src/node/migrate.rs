//! Live shard migration in the server: each data group's leader drives its group through the
//! controller's configurations, one number at a time, as `shard::migration` describes (the
//! simulator's `sim::shard::world` drives the same [`GroupShards`] through the same steps).
//!
//! (Core 0 of a host without a controller replica runs [`follow_controller`], which keeps the
//! host's view of the latest configuration fresh from a controller host.)
//!
//! The driver, one task per group replica, every `heartbeat_ms`:
//! 0. on any replica: once the replica's applied state says its group drained (retired, every
//!    shard handed over), or its group is retired in the latest configuration and another
//!    member's host says it removed its replica (`TYNAMO.MIGRATE GROUP`), the replica is
//!    removed (`replica::remove`: tombstone, storage deleted); the rest only while it leads:
//! 1. the configuration the group wants next (`next_config_wanted`, or for a group that has
//!    none yet the one that created it) and the one before it, from this host's view
//!    (`HostView::configs`), else from a controller host with `TYNAMO.MIGRATE CONFIG`;
//!    proposes `AcceptConfig` when `can_accept` says it applies;
//! 2. each pull: asks a replica of the old owner (`TYNAMO.MIGRATE PULL`) and proposes `Install`;
//! 3. each confirm: asks the old owner's leader (`TYNAMO.MIGRATE CONFIRM`, which makes it
//!    propose `DeleteExported`) until it answers DONE, then proposes `ConfirmDone`.
//!
//! A host that removed its replica of a group answers for it from the tombstone, as the
//! simulator's stopped groups do: a pull is GONE and a confirm DONE (the group deleted every
//! shard it exported before it drained), so askers stop retrying.
//!
//! Two runtime policies the simulator does without (neither is needed for safety): an old
//! owner does not accept a configuration that gives its shards to a group that configuration
//! creates until that group has accepted it (`TYNAMO.MIGRATE READY`, bounded by
//! `NEW_OWNER_WAIT_MS_MAX`), so a new group's creation and first election are not part of the
//! moved shards' freeze; and a leader announces itself to the hosts without a replica of its
//! group (`TYNAMO.MIGRATE LEADER`), so their `-MOVED` and `CLUSTER SLOTS` name the leader.
//!
//! Every request is idempotent and every step is retried until the log says it is done (a
//! duplicate entry applies as Stale and changes nothing), with a doubling backoff while a step
//! fails, so a move survives either side's crash or leader change at any step.
//!
//! Group-to-group requests travel over the client port in RESP (one short-lived connection per
//! request; a migration makes a few per shard), not over the peer transport: a request goes to
//! whichever core of the old owner's hosts runs its replica, and is answered at once.
//! A pull may be answered by any replica of the old owner that applied the configuration: the
//! shard is frozen from `AcceptConfig` on, so every such replica holds the same final blob.
//! The blob is bounded by one log entry (`ENTRY_BYTES_MAX`), since `Install` logs it whole.
//!
//! Requests name the cluster id, so a request meant for another cluster (or a stray client)
//! cannot make a group delete a shard.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::controller::{Configuration, GroupId as ControllerGroupId, Slot};
use crate::resp::frame::{decode, put_bulk, put_error, put_request, put_simple, Frame, Limits};
use crate::shard::migration::{
    Confirm, ConfirmReply, GroupShards, MigrationEntry, Pull, PullReply,
};

use super::codec::GroupId;
use super::executor::CoreCtx;
use super::group::GroupReply;
use super::machine::migration_outcome_applied;
use super::replica::{CoreGroup, DataGroupSpec};

/// Longest wait for one group-to-group request (connect, send, answer).
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Longest pause between retries of a failing step.
const BACKOFF_MS_MAX: u64 = 2_000;
/// Largest reply to a migration request: one shard blob, which must fit in one log entry with
/// the Install header (a larger shard cannot move yet: its pull fails, logged, and is retried).
const REPLY_BYTES_MAX: usize = super::config::ENTRY_BYTES_MAX as usize - INSTALL_HEADER_BYTES_MAX;
/// Install entry bytes besides the blob: tag, version, kind, config number, shard, length.
const INSTALL_HEADER_BYTES_MAX: usize = 64;
const READ_CHUNK_BYTES: usize = 64 << 10;
/// A host without a controller replica asks for the latest configuration every this many
/// heartbeats (a configuration change reaches its groups this much later).
const FOLLOW_PERIOD_HEARTBEATS: u64 = 2;
/// A replica of a group retired in the latest configuration asks the other members' hosts
/// whether they removed theirs every this many driver rounds.
const GONE_CHECK_ROUNDS: u64 = 10;
/// A leader announces itself to the hosts without a replica of its group at least every this
/// many driver rounds (and at once when it becomes leader).
const ANNOUNCE_ROUNDS: u64 = 20;
/// Longest an old owner keeps serving a shard that configuration n gives to a group created in
/// n, waiting for that group to accept n, before it accepts n anyway (see `new_owners_ready`).
const NEW_OWNER_WAIT_MS_MAX: u64 = 10_000;

/// Runs the migration driver of this core's replica of group `peer_id` until the replica is
/// removed.
pub async fn drive(ctx: Rc<CoreCtx>, peer_id: GroupId) {
    let period_ms = ctx.cfg.heartbeat_ms.max(1);
    let mut backoff_ms = period_ms;
    let mut last_error = String::new();
    let mut rounds = 0u64;
    let mut waiting = None;
    let mut announced = (0u64, 0u64); // (term, round)
    let announcing = Rc::new(std::cell::Cell::new(false));
    loop {
        glommio::timer::sleep(Duration::from_millis(backoff_ms)).await;
        let Some(entry) = ctx.groups.get(peer_id) else {
            return;
        };
        let gid = entry.view.id();
        rounds += 1;
        if entry.group.borrow().machine().shards.is_drained() {
            super::replica::remove(&ctx, peer_id, "drained: every shard it held moved away").await;
            return;
        }
        if rounds % GONE_CHECK_ROUNDS == 0 && retired_in_latest(&ctx, &entry.view.spec) {
            if let Some(host) = member_removed(&ctx, &entry.view.spec).await {
                let why = format!("retired, and host {host} already removed its replica");
                super::replica::remove(&ctx, peer_id, &why).await;
                return;
            }
        }
        let term = entry.view.term.load(std::sync::atomic::Ordering::Relaxed);
        if entry.view.is_leader()
            && !announcing.get()
            && (term != announced.0 || rounds >= announced.1 + ANNOUNCE_ROUNDS)
        {
            announced = (term, rounds);
            announcing.set(true);
            let (ctx2, flag, spec) = (ctx.clone(), announcing.clone(), entry.view.spec.clone());
            glommio::spawn_local(async move {
                announce_leader(&ctx2, &spec, term).await;
                flag.set(false);
            })
            .detach();
        }
        match step(&ctx, &entry, &mut waiting).await {
            Ok(_) => {
                backoff_ms = period_ms;
                last_error.clear();
            }
            Err(e) => {
                // One line per new reason: a peer down for a minute must not flood the log.
                if e != last_error {
                    eprintln!(
                        "tynamo: group {gid} (core {}): migration step: {e}",
                        ctx.core
                    );
                    last_error = e;
                }
                backoff_ms = (backoff_ms * 2).min(BACKOFF_MS_MAX);
            }
        }
    }
}

/// Tells every host of the latest configuration without a replica of the group that this
/// replica leads it in `term` (`TYNAMO.MIGRATE LEADER`), so their `-MOVED` and `CLUSTER SLOTS`
/// point at it: the hosts with a replica know it from Raft, the others would otherwise send
/// clients to a follower first. A few requests per group every couple of seconds.
async fn announce_leader(ctx: &CoreCtx, spec: &DataGroupSpec, term: u64) {
    let Some(config) = ctx.view.latest_config() else {
        return;
    };
    let Some(me) = spec.slot_of(spec.node) else {
        return;
    };
    let members: Vec<u64> = spec.slots_by_node.values().map(|s| s.host).collect();
    for (&host, h) in &config.hosts {
        if members.contains(&host) {
            continue;
        }
        let Some(addr) = super::control::host_client_addr(h) else {
            continue;
        };
        let args = request_args(
            ctx,
            "LEADER",
            &[spec.config_group, term, me.host, u64::from(me.core)],
        );
        // Best effort: a host that misses it hears it again at the next announcement.
        let _ = request(addr, &args).await;
    }
}

/// Whether the latest configuration this host knows retired `spec`'s group.
fn retired_in_latest(ctx: &CoreCtx, spec: &DataGroupSpec) -> bool {
    ctx.view.latest_config().is_some_and(|c| retires(&c, spec))
}

/// Whether `config` retired `spec`'s group: it came after the group's creation and no longer
/// lists it.
fn retires(config: &Configuration, spec: &DataGroupSpec) -> bool {
    config.num > spec.created_in && !config.groups.contains_key(&spec.config_group)
}

/// The first other member whose host says it removed its replica of the group (it saw the
/// group drain, so this replica's data is no longer needed by anyone).
async fn member_removed(ctx: &CoreCtx, spec: &DataGroupSpec) -> Option<u64> {
    for (&node, &slot) in &spec.slots_by_node {
        if node == spec.node {
            continue;
        }
        let Some(addr) = ctx.slot_client_addr(slot) else {
            continue;
        };
        let args = request_args(ctx, "GROUP", &[spec.config_group]);
        if let Ok(Frame::Simple(s)) = request(addr, &args).await {
            if &s[..] == b"GONE" {
                return Some(slot.host);
            }
        }
    }
    None
}

/// On core 0 of a host without a controller replica: keeps this host's view of the latest
/// configuration fresh by asking the controller hosts (`TYNAMO.MIGRATE LATEST`), for its data
/// groups (which start at the configuration that created them) and for `CLUSTER SLOTS`.
pub async fn follow_controller(ctx: Rc<CoreCtx>) {
    let period = Duration::from_millis(ctx.cfg.heartbeat_ms.max(1) * FOLLOW_PERIOD_HEARTBEATS);
    let mut last_error = String::new();
    loop {
        glommio::timer::sleep(period).await;
        match fetch_latest(&ctx).await {
            Ok(config) => {
                ctx.view.publish_fetched(config);
                last_error.clear();
            }
            Err(e) => {
                if e != last_error {
                    eprintln!("tynamo: fetching the latest configuration: {e}");
                    last_error = e;
                }
            }
        }
    }
}

async fn fetch_latest(ctx: &CoreCtx) -> Result<Configuration, String> {
    let mut last = "no controller host is known".to_string();
    for &host in &ctx.plan.hosts {
        let Some(addr) = ctx.client_addr(host, 0) else {
            continue;
        };
        match request(addr, &request_args(ctx, "LATEST", &[])).await {
            Ok(Frame::Bulk(bytes)) => {
                return Configuration::decode(&bytes)
                    .map_err(|e| format!("the latest configuration from {addr}: {e}"))
            }
            Ok(other) => last = format!("latest configuration from {addr}: {}", describe(&other)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One round of the driver; Ok(true) when it proposed something.
/// `waiting`: since when this group waits for the new groups of configuration n (n, start).
async fn step(
    ctx: &CoreCtx,
    entry: &CoreGroup,
    waiting: &mut Option<(u64, Instant)>,
) -> Result<bool, String> {
    let shards = {
        let g = entry.group.borrow();
        if !g.is_leader() {
            return Ok(false);
        }
        g.machine().shards.clone()
    };
    if let Some(num) = config_wanted(&entry.view.spec, &shards) {
        let previous = config(ctx, num - 1).await?;
        let next = config(ctx, num).await?;
        if let (Some(previous), Some(config)) = (previous, next) {
            if shards.can_accept(&previous, &config) {
                let me = entry.view.id();
                if shards.config().is_some() && !new_owners_ready(ctx, me, &previous, &config).await
                {
                    let since = match *waiting {
                        Some((n, since)) if n == num => since,
                        _ => {
                            *waiting = Some((num, Instant::now()));
                            return Ok(false);
                        }
                    };
                    if since.elapsed() < Duration::from_millis(NEW_OWNER_WAIT_MS_MAX) {
                        return Ok(false);
                    }
                    eprintln!(
                        "tynamo: group {me}: the groups configuration {num} creates did not \
                         accept it within {NEW_OWNER_WAIT_MS_MAX} ms; handing them shards anyway"
                    );
                }
                *waiting = None;
                propose(
                    entry,
                    MigrationEntry::AcceptConfig { previous, config }.encode(),
                )
                .await?;
                return Ok(true);
            }
        }
    }
    let mut proposed = false;
    for pull in shards.pulls() {
        if let Some(blob) = pull_shard(ctx, &shards, pull).await? {
            let install = MigrationEntry::Install {
                config_num: pull.config_num,
                shard: pull.shard,
                blob,
            };
            proposed |= propose(entry, install.encode()).await?;
        }
    }
    for confirm in shards.confirms() {
        if confirm_shard(ctx, &shards, confirm).await? {
            let done = MigrationEntry::ConfirmDone {
                config_num: confirm.config_num,
                shard: confirm.shard,
            };
            proposed |= propose(entry, done.encode()).await?;
        }
    }
    Ok(proposed)
}

/// Whether every group that configuration `config` creates and gives shards of group `me` has
/// accepted `config` (one of its replicas says so, `TYNAMO.MIGRATE READY`).
///
/// Why an old owner waits: accepting `config` freezes the shards it hands over until their new
/// owner pulls them, and a group created by `config` first needs its replicas created, a leader
/// elected (an election timeout) and `config` accepted before it can pull. Meanwhile the old
/// owner keeps serving them under the previous configuration, so clients see the freeze of a
/// pull and an install, not of a group's birth. Safety does not depend on it (the simulator
/// accepts at once): a new owner that never gets ready costs at most `NEW_OWNER_WAIT_MS_MAX`.
async fn new_owners_ready(
    ctx: &CoreCtx,
    me: ControllerGroupId,
    previous: &Configuration,
    config: &Configuration,
) -> bool {
    let created = created_taking_from(me, previous, config);
    for group in created {
        let mut ready = false;
        for r in config.groups.get(&group).map_or(&[][..], |g| &g.replicas) {
            let Some(addr) = config
                .hosts
                .get(&r.slot.host)
                .and_then(super::control::host_client_addr)
                .and_then(|a| Some(SocketAddr::new(a.ip(), a.port().checked_add(r.slot.core)?)))
            else {
                continue;
            };
            let args = request_args(ctx, "READY", &[group, config.num]);
            if let Ok(Frame::Simple(s)) = request(addr, &args).await {
                if &s[..] == b"YES" {
                    ready = true;
                    break;
                }
            }
        }
        if !ready {
            return false;
        }
    }
    true
}

/// The groups `config` creates that take shards from group `me` (ascending).
fn created_taking_from(
    me: ControllerGroupId,
    previous: &Configuration,
    config: &Configuration,
) -> Vec<ControllerGroupId> {
    let mut created: Vec<ControllerGroupId> = previous
        .shards
        .iter()
        .zip(&config.shards)
        .filter(|&(&old, &new)| old == me && new != me)
        .map(|(_, &new)| new)
        .filter(|g| {
            config
                .groups
                .get(g)
                .is_some_and(|g| g.created_in == config.num)
        })
        .collect();
    created.sort_unstable();
    created.dedup();
    created
}

/// The configuration this group should accept next, if it may move on: a new replica starts
/// at the configuration that created its group (its spec says which, even once a later one
/// retired the group).
fn config_wanted(spec: &DataGroupSpec, shards: &GroupShards) -> Option<u64> {
    if shards.config().is_some() {
        return shards.next_config_wanted();
    }
    Some(spec.created_in)
}

/// Configuration `num`: from this host's view (its controller replica, or what it fetched),
/// else from a controller host (then kept in the view for the other groups and cores).
/// Ok(None) while nobody knows it yet.
pub(crate) async fn config(ctx: &CoreCtx, num: u64) -> Result<Option<Configuration>, String> {
    if let Some(c) = ctx.view.config(num) {
        return Ok(Some((*c).clone()));
    }
    if ctx.controller_local() {
        // This host's controller replica has not applied it yet: it will.
        return Ok(None);
    }
    let mut last = format!("configuration {num}: no controller host reachable");
    for host in ctx.plan.hosts.iter().filter(|&&h| h != ctx.cfg.id) {
        let Some(addr) = ctx.client_addr(*host, 0) else {
            continue;
        };
        let args = request_args(ctx, "CONFIG", &[num]);
        match request(addr, &args).await {
            Ok(Frame::Bulk(bytes)) => {
                let config = Configuration::decode(&bytes)
                    .map_err(|e| format!("configuration {num} from {addr}: {e}"))?;
                if config.num != num {
                    return Err(format!(
                        "asked {addr} for configuration {num}, got {}",
                        config.num
                    ));
                }
                // Committed, so true for every host: it also moves this host's view of the
                // latest configuration forward when it is newer (hosts without a controller
                // replica otherwise learn it only at their next poll).
                ctx.view.keep(std::sync::Arc::new(config.clone()));
                ctx.view.publish_fetched(config.clone());
                return Ok(Some(config));
            }
            Ok(other) => last = format!("configuration {num} from {addr}: {}", describe(&other)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Commits `payload` through this group's log; Ok(applied) once it applied.
async fn propose(entry: &CoreGroup, payload: Bytes) -> Result<bool, String> {
    let slot = entry.group.borrow_mut().submit_raw(payload);
    match slot.wait().await {
        GroupReply::Done(outcome) => Ok(migration_outcome_applied(&outcome)),
        GroupReply::NotLeader { leader } => Err(format!("no longer leader (leader {leader})")),
        GroupReply::Unavailable(why) => Err(why),
    }
}

/// Client addresses of `group`'s replicas in `config`, the likely leader first.
fn replica_addrs(
    ctx: &CoreCtx,
    config: &Configuration,
    group: ControllerGroupId,
) -> Vec<SocketAddr> {
    let Some(g) = config.groups.get(&group) else {
        return Vec::new();
    };
    // This host knows the leader of every group that has a replica here.
    let leader = ctx.view.group(group).and_then(|gv| gv.leader_slot());
    let mut slots: Vec<_> = g.replicas.iter().map(|r| r.slot).collect();
    slots.sort_by_key(|s| Some(*s) != leader);
    slots
        .into_iter()
        .filter_map(|s| {
            let client = super::control::host_client_addr(config.hosts.get(&s.host)?)?;
            Some(SocketAddr::new(
                client.ip(),
                client.port().checked_add(s.core)?,
            ))
        })
        .collect()
}

/// Asks the old owner for the frozen shard; Ok(None) when nobody has it ready yet.
async fn pull_shard(
    ctx: &CoreCtx,
    shards: &GroupShards,
    pull: Pull,
) -> Result<Option<Bytes>, String> {
    let Some(previous) = shards.previous() else {
        return Err(format!(
            "shard {} is importing without a previous configuration",
            pull.shard
        ));
    };
    let mut last = format!(
        "pull of shard {}: group {} has no replica address",
        pull.shard, pull.from
    );
    for addr in replica_addrs(ctx, previous, pull.from) {
        let args = request_args(
            ctx,
            "PULL",
            &[pull.from, pull.config_num, u64::from(pull.shard)],
        );
        match request(addr, &args).await {
            Ok(Frame::Bulk(blob)) => return Ok(Some(blob)),
            Ok(other) => {
                last = format!(
                    "pull of shard {} of configuration {} from {addr}: {}",
                    pull.shard,
                    pull.config_num,
                    describe(&other)
                )
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Tells the old owner the shard arrived; Ok(true) once it deleted its copy.
async fn confirm_shard(ctx: &CoreCtx, shards: &GroupShards, c: Confirm) -> Result<bool, String> {
    let Some(previous) = shards.previous() else {
        return Err(format!(
            "shard {} is confirming without a previous configuration",
            c.shard
        ));
    };
    let mut last = format!(
        "confirm of shard {}: group {} has no replica address",
        c.shard, c.from
    );
    for addr in replica_addrs(ctx, previous, c.from) {
        let args = request_args(ctx, "CONFIRM", &[c.from, c.config_num, u64::from(c.shard)]);
        match request(addr, &args).await {
            Ok(Frame::Simple(s)) if &s[..] == b"DONE" => return Ok(true),
            // Its leader proposed the delete: ask again next round.
            Ok(Frame::Simple(s)) if &s[..] == b"PENDING" => return Ok(false),
            Ok(other) => {
                last = format!(
                    "confirm of shard {} of configuration {} at {addr}: {}",
                    c.shard,
                    c.config_num,
                    describe(&other)
                )
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn request_args(ctx: &CoreCtx, sub: &str, numbers: &[u64]) -> Vec<Vec<u8>> {
    let mut args = vec![
        b"TYNAMO.MIGRATE".to_vec(),
        sub.as_bytes().to_vec(),
        ctx.cfg.cluster_id.to_string().into_bytes(),
    ];
    args.extend(numbers.iter().map(|n| n.to_string().into_bytes()));
    args
}

fn describe(frame: &Frame) -> String {
    match frame.as_error() {
        Some(e) => String::from_utf8_lossy(e).into_owned(),
        None => format!("unexpected reply {frame:?}"),
    }
}

/// One request on a fresh connection, bounded in time and reply size.
async fn request(addr: SocketAddr, args: &[Vec<u8>]) -> Result<Frame, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        let mut out = BytesMut::new();
        put_request(&mut out, &refs);
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let limits = Limits {
            bulk_bytes_max: REPLY_BYTES_MAX,
            ..Limits::DEFAULT
        };
        let mut buf = BytesMut::new();
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            if let Some(frame) =
                decode(&mut buf, &limits).map_err(|e| format!("reply from {addr}: {e}"))?
            {
                let _ = stream.close().await;
                return Ok(frame);
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read from {addr}: {e}"))?;
            if n == 0 {
                return Err(format!("{addr} closed the connection before answering"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    glommio::timer::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), async {
        Ok(exchange.await)
    })
    .await
    .map_err(|_| format!("{addr} did not answer within {REQUEST_TIMEOUT_MS} ms"))?
}

// ----- the serving side ----------------------------------------------------------------------

/// `TYNAMO.MIGRATE <sub> <cluster-id> <numbers...>`, answered at once:
/// - `PULL <group> <config-num> <shard>`: the frozen shard blob, `-NOTYET n`, or `+GONE`;
/// - `CONFIRM <group> <config-num> <shard>`: `+DONE` once deleted, `+PENDING` when the leader
///   just proposed the delete, `-NOTYET n`, `-NOTLEADER`;
/// - `CONFIG <num>`: configuration `num` (controller encoding) as this host knows it, or
///   `-NOTYET`;
/// - `LATEST`: the latest configuration this host knows (a joining host asks any host);
/// - `GROUP <group>`: `+GONE` when this host removed its replica of the group (it drained),
///   `+RUNNING` when it runs one, `+UNKNOWN` otherwise;
/// - `READY <group> <num>`: `+YES` when this host's replica of the group has accepted
///   configuration `num` or a later one (so the group has), `+NO` otherwise;
/// - `LEADER <group> <term> <host> <core>`: the group's leader announces itself (`+OK`), for
///   the routing of a host without a replica of the group.
///
/// A pull or confirm for a group whose replica this host removed is answered from the
/// tombstone: `+GONE` and `+DONE` (the group deleted every exported shard before it drained).
pub fn handle(ctx: &CoreCtx, args: &[Bytes]) -> BytesMut {
    let mut out = BytesMut::new();
    if let Err(e) = serve(ctx, args, &mut out) {
        out.clear();
        put_error(&mut out, e.as_bytes());
    }
    out
}

/// A `TYNAMO.MIGRATE` request, parsed and checked against this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrateRequest {
    Latest,
    Config {
        num: u64,
    },
    Group {
        group: ControllerGroupId,
    },
    Ready {
        group: ControllerGroupId,
        num: u64,
    },
    Leader {
        group: ControllerGroupId,
        term: u64,
        slot: Slot,
    },
    Pull {
        group: ControllerGroupId,
        config_num: u64,
        shard: u16,
    },
    Confirm {
        group: ControllerGroupId,
        config_num: u64,
        shard: u16,
    },
}

/// Parses `<sub> <cluster-id> <numbers...>`; every malformed or misdirected request is an error
/// reply naming what is wrong.
fn parse(args: &[Bytes], cluster_id_here: u64) -> Result<MigrateRequest, String> {
    let sub = args
        .first()
        .ok_or("ERR TYNAMO.MIGRATE wants a subcommand")?;
    let numbers: Vec<u64> = args[1..]
        .iter()
        .map(|a| {
            std::str::from_utf8(a)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or("ERR TYNAMO.MIGRATE arguments are numbers")
        })
        .collect::<Result<_, _>>()?;
    let (&cluster_id, rest) = numbers
        .split_first()
        .ok_or("ERR TYNAMO.MIGRATE wants the cluster id")?;
    if cluster_id != cluster_id_here {
        return Err(format!(
            "ERR TYNAMO.MIGRATE for cluster {cluster_id}, this is {cluster_id_here}"
        ));
    }
    if sub.eq_ignore_ascii_case(b"LATEST") {
        return match rest {
            [] => Ok(MigrateRequest::Latest),
            _ => Err("ERR TYNAMO.MIGRATE LATEST takes no number".into()),
        };
    }
    if sub.eq_ignore_ascii_case(b"CONFIG") {
        return match rest {
            [num] => Ok(MigrateRequest::Config { num: *num }),
            _ => Err("ERR TYNAMO.MIGRATE CONFIG wants a number".into()),
        };
    }
    if sub.eq_ignore_ascii_case(b"LEADER") {
        return match rest {
            [group, term, host, core] => Ok(MigrateRequest::Leader {
                group: *group,
                term: *term,
                slot: Slot {
                    host: *host,
                    core: u16::try_from(*core)
                        .map_err(|_| format!("ERR core {core} out of range"))?,
                },
            }),
            _ => Err("ERR TYNAMO.MIGRATE LEADER wants a group, a term, a host and a core".into()),
        };
    }
    if sub.eq_ignore_ascii_case(b"READY") {
        return match rest {
            [group, num] => Ok(MigrateRequest::Ready {
                group: *group,
                num: *num,
            }),
            _ => Err("ERR TYNAMO.MIGRATE READY wants a group and a configuration".into()),
        };
    }
    if sub.eq_ignore_ascii_case(b"GROUP") {
        return match rest {
            [group] => Ok(MigrateRequest::Group { group: *group }),
            _ => Err("ERR TYNAMO.MIGRATE GROUP wants a group".into()),
        };
    }
    let pull = sub.eq_ignore_ascii_case(b"PULL");
    if !pull && !sub.eq_ignore_ascii_case(b"CONFIRM") {
        return Err(
            "ERR TYNAMO.MIGRATE subcommands are PULL, CONFIRM, CONFIG, LATEST, GROUP, READY and \
             LEADER"
                .into(),
        );
    }
    let [group, config_num, shard] = rest else {
        return Err("ERR TYNAMO.MIGRATE PULL|CONFIRM want group, configuration and shard".into());
    };
    let shard = u16::try_from(*shard).map_err(|_| format!("ERR shard {shard} out of range"))?;
    let (group, config_num) = (*group, *config_num);
    Ok(if pull {
        MigrateRequest::Pull {
            group,
            config_num,
            shard,
        }
    } else {
        MigrateRequest::Confirm {
            group,
            config_num,
            shard,
        }
    })
}

/// This core's replica of `group`; Err(None) when this host removed its replica (answer from
/// the tombstone), Err(Some(why)) when this core has none.
fn local_replica(ctx: &CoreCtx, group: ControllerGroupId) -> Result<Rc<CoreGroup>, Option<String>> {
    if let Some(entry) = ctx.groups.by_config(group) {
        return Ok(entry);
    }
    if ctx.view.is_removed(group) {
        return Err(None);
    }
    Err(Some(format!(
        "ERR group {group} has no replica on core {} of host {}",
        ctx.core, ctx.cfg.id
    )))
}

fn serve(ctx: &CoreCtx, args: &[Bytes], out: &mut BytesMut) -> Result<(), String> {
    match parse(args, ctx.cfg.cluster_id)? {
        MigrateRequest::Latest => {
            let config = ctx.view.latest_config().ok_or("NOTYET no configuration")?;
            let mut bytes = Vec::new();
            config.encode(&mut bytes);
            put_bulk(out, &bytes);
        }
        MigrateRequest::Config { num } => {
            let config = ctx.view.config(num).ok_or(format!("NOTYET {num}"))?;
            let mut bytes = Vec::new();
            config.encode(&mut bytes);
            put_bulk(out, &bytes);
        }
        MigrateRequest::Group { group } => {
            let answer: &[u8] = if ctx.view.is_removed(group) {
                b"GONE"
            } else if ctx.view.group(group).is_some() {
                b"RUNNING"
            } else {
                b"UNKNOWN"
            };
            put_simple(out, answer);
        }
        MigrateRequest::Leader { group, term, slot } => {
            ctx.view.hint_leader(group, term, slot);
            put_simple(out, b"OK");
        }
        MigrateRequest::Ready { group, num } => {
            let accepted = ctx
                .view
                .group(group)
                .is_some_and(|g| g.migration().config_num >= num);
            put_simple(out, if accepted { b"YES" } else { b"NO" });
        }
        MigrateRequest::Pull {
            group,
            config_num,
            shard,
        } => {
            let entry = match local_replica(ctx, group) {
                Ok(e) => e,
                Err(None) => {
                    put_simple(out, b"GONE");
                    return Ok(());
                }
                Err(Some(e)) => return Err(e),
            };
            let g = entry.group.borrow();
            let m = g.machine();
            match m.shards.handle_pull(&m.sm, shard, config_num) {
                PullReply::Blob(blob) => put_bulk(out, &blob),
                PullReply::NotYet { config_num } => return Err(format!("NOTYET {config_num}")),
                PullReply::Gone => put_simple(out, b"GONE"),
            }
        }
        MigrateRequest::Confirm {
            group,
            config_num,
            shard,
        } => {
            let entry = match local_replica(ctx, group) {
                Ok(e) => e,
                Err(None) => {
                    put_simple(out, b"DONE");
                    return Ok(());
                }
                Err(Some(e)) => return Err(e),
            };
            let mut g = entry.group.borrow_mut();
            if !g.is_leader() {
                return Err("NOTLEADER".into());
            }
            match g.machine().shards.handle_confirm(shard, config_num) {
                ConfirmReply::Done => put_simple(out, b"DONE"),
                ConfirmReply::NotYet { config_num } => return Err(format!("NOTYET {config_num}")),
                ConfirmReply::Propose(entry) => {
                    // Not awaited: the asker asks again until the delete has applied.
                    let _ = g.submit_raw(entry);
                    put_simple(out, b"PENDING");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    /// The bootstrap of 3 hosts x 2 cores (groups 1 and 2), then Join of hosts 4 and 5 with
    /// 2 cores each (group 3), then Leave of host 4 (group 3 retired): configurations 2, 3, 4.
    fn join_then_leave() -> Vec<Configuration> {
        use crate::controller::{Command, HostSpec, Op, StateMachine};
        use crate::node::config::{parse_initial_cluster, ServerConfig};
        use crate::node::control::ControlPlan;
        let map = "1=127.0.0.1:7101,2=127.0.0.1:7111,3=127.0.0.1:7121";
        let cfg = ServerConfig::new(1, "/x".into(), parse_initial_cluster(map).unwrap(), 2);
        let plan = ControlPlan::new(&cfg);
        let mut sm = StateMachine::new(plan.settings.clone()).unwrap();
        let mut commands = plan.bootstrap.clone();
        let host = |id: u64| HostSpec {
            id,
            cores: 2,
            addr: format!("127.0.0.1:{}/127.0.0.1:{}", 7100 + id, 7000 + id),
        };
        for op in [
            Op::Join {
                hosts: vec![host(4), host(5)],
            },
            Op::Leave { hosts: vec![4] },
        ] {
            commands.push(Command {
                client_id: 0,
                seq: 0,
                op,
            });
        }
        for (i, c) in commands.iter().enumerate() {
            sm.apply(i as u64 + 1, &c.encode());
        }
        (2..=4).map(|n| sm.query(n).unwrap().clone()).collect()
    }

    #[test]
    fn an_old_owner_waits_only_for_the_groups_its_configuration_creates() {
        let c = join_then_leave();
        let (boot, joined, left) = (&c[0], &c[1], &c[2]);
        // The Join creates group 3, which takes shards from groups 1 and 2.
        assert_eq!(created_taking_from(1, boot, joined), vec![3]);
        assert_eq!(created_taking_from(2, boot, joined), vec![3]);
        assert!(created_taking_from(3, boot, joined).is_empty());
        // The Leave gives group 3's shards to groups 1 and 2, which exist: nobody waits.
        for g in 1..=3 {
            assert!(created_taking_from(g, joined, left).is_empty(), "group {g}");
        }
        // Group 3 is retired by the Leave, not by the Join that created it; groups 1 and 2 never.
        let spec3 = DataGroupSpec::from_config(joined, 3, 4, 0).unwrap();
        assert!(!retires(joined, &spec3));
        assert!(retires(left, &spec3));
        let spec1 = DataGroupSpec::from_config(joined, 1, 1, 0).unwrap();
        assert!(!retires(joined, &spec1) && !retires(left, &spec1));
        // A new replica of group 3 starts at the configuration that created it, even after
        // the configuration that retired it.
        let fresh = GroupShards::new(3);
        assert_eq!(config_wanted(&spec3, &fresh), Some(joined.num));
    }

    #[test]
    fn requests_parse_and_misdirected_or_malformed_ones_are_refused() {
        let p = |list: &[&str]| parse(&args(list), 7);
        assert_eq!(p(&["LATEST", "7"]), Ok(MigrateRequest::Latest));
        assert_eq!(
            p(&["config", "7", "12"]),
            Ok(MigrateRequest::Config { num: 12 })
        );
        assert_eq!(
            p(&["PULL", "7", "2", "5", "63"]),
            Ok(MigrateRequest::Pull {
                group: 2,
                config_num: 5,
                shard: 63
            })
        );
        assert_eq!(
            p(&["Confirm", "7", "3", "5", "1"]),
            Ok(MigrateRequest::Confirm {
                group: 3,
                config_num: 5,
                shard: 1
            })
        );
        assert_eq!(
            p(&["group", "7", "12"]),
            Ok(MigrateRequest::Group { group: 12 })
        );
        assert_eq!(
            p(&["READY", "7", "3", "9"]),
            Ok(MigrateRequest::Ready { group: 3, num: 9 })
        );
        assert_eq!(
            p(&["LEADER", "7", "3", "4", "5", "1"]),
            Ok(MigrateRequest::Leader {
                group: 3,
                term: 4,
                slot: Slot { host: 5, core: 1 }
            })
        );
        let refused = |list: &[&str], want: &str| {
            let e = p(list).unwrap_err();
            assert!(e.contains(want), "{list:?}: {e}");
        };
        refused(&[], "wants a subcommand");
        refused(&["PULL"], "wants the cluster id");
        refused(&["PULL", "8", "2", "5", "1"], "for cluster 8, this is 7");
        refused(
            &["PULL", "7", "2", "5", "70000"],
            "shard 70000 out of range",
        );
        refused(
            &["PULL", "7", "2", "5"],
            "want group, configuration and shard",
        );
        refused(&["PULL", "7", "2", "x", "1"], "arguments are numbers");
        refused(&["PULL", "7", "2", "-1", "1"], "arguments are numbers");
        refused(&["CONFIG", "7"], "wants a number");
        refused(&["LATEST", "7", "1"], "takes no number");
        refused(&["GROUP", "7"], "wants a group");
        refused(&["READY", "7", "3"], "wants a group and a configuration");
        refused(&["LEADER", "7", "3", "4", "5"], "a host and a core");
        refused(
            &["LEADER", "7", "3", "4", "5", "70000"],
            "core 70000 out of range",
        );
        refused(&["DELETE", "7", "2", "5", "1"], "subcommands are");
    }
}
