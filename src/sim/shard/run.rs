//! One seeded run of the sharded world with faults and random Join/Leave/Move, then healing,
//! liveness, final reads of every key and the linearizability checker (`tynamo-sim --workload
//! shard` and the CI test).
//!
//! Drawn from the seed: 4-6 hosts of 1-2 cores, the networks (loss, duplication, delay of Raft
//! messages and of RPCs, lost replies), disk latency, clients and keys, and the schedule: host
//! crashes and restarts, partitions between hosts, and controller operations (Join of a host
//! not in the cluster, Leave of one in it, Move of a random shard to a random group). After
//! the fault phase every fault heals and every host restarts; then within
//! `SHARD_LIVENESS_TICKS_MAX` the admin finishes, every group reaches the latest configuration
//! with nothing in flight (retired groups drained and stopped), and every client completes an
//! operation; the clients drain, one reads every key (a lost acknowledged write shows there),
//! and the whole history goes through the checker.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::app::Breakage;
use super::client::{ClientsConfig, ScriptOp};
use super::world::{World, WorldConfig, ADMINS_MAX};
use crate::check::{ClientId, Record, Status};
use crate::controller::{HostId, HostSpec, Op};
use crate::sim::kv::{check_linearizable, clients_without_ok_since};
use crate::sim::Steps;
use crate::sim::{Failure, Faults, NetConfig, Violation};

/// Ticks after healing within which the world must settle and every client complete an
/// operation (and, separately, drain and read every key).
pub const SHARD_LIVENESS_TICKS_MAX: u64 = 3_000;

#[derive(Clone, Debug)]
pub struct ShardOptions {
    pub faults: Faults,
    pub fault_ticks: u64,
    /// Chance per tick (per million) that the admin issues a Join, Leave or Move.
    pub admin_per_million: u32,
    pub breakage: Breakage,
}

impl ShardOptions {
    pub fn new(faults: Faults) -> ShardOptions {
        ShardOptions {
            faults,
            fault_ticks: 600,
            admin_per_million: 15_000,
            breakage: Breakage::None,
        }
    }
}

/// What one passing seed did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardSummary {
    pub steps: u64,
    pub ops: u64,
    pub ops_ok: u64,
    /// Shard moves between groups over the configuration history.
    pub moves: u64,
    pub configs: u64,
    pub groups_created: u64,
    pub groups_stopped: u64,
    pub snapshots_taken: u64,
    pub check_steps: u64,
}

pub struct ShardRun {
    pub history: Vec<Record>,
    pub result: Result<ShardSummary, Failure>,
}

/// The command that reruns one seed.
pub fn shard_repro_command(seed: u64, opts: &ShardOptions) -> String {
    format!(
        "cargo run --release --bin tynamo-sim -- --workload shard --seeds 1 --seed-start {seed} --faults {} --fault-ticks {}",
        crate::sim::kv::faults_arg(opts.faults),
        opts.fault_ticks
    )
}

/// The world of a seed.
pub fn configure(seed: u64, opts: &ShardOptions) -> WorldConfig {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x05a2_d5e0);
    let hosts = (1..=rng.gen_range(4..=6u64))
        .map(|h| (h, rng.gen_range(1..=2u16)))
        .collect();
    let mut cfg = WorldConfig::new(seed, hosts);
    cfg.shard_count = rng.gen_range(4..=10);
    cfg.disk_ticks_max = rng.gen_range(0..=3);
    if opts.faults.crash {
        cfg.crash_in_ready_per_million = rng.gen_range(0..200);
    }
    if opts.faults.clock {
        // Up to 10% slow, within what the lease tolerates (as in the Raft and kv runs).
        cfg.clock_slow_per_million_max = 100_000;
    }
    cfg.snapshot_threshold_bytes = rng.gen_range(512..=4096);
    let mut clients = ClientsConfig::new(rng.gen_range(3..=5), rng.gen_range(6..=12));
    if opts.faults.lossy_net {
        cfg.raft_net = NetConfig {
            drop_per_million: rng.gen_range(0..50_000),
            dup_per_million: rng.gen_range(0..30_000),
            delay_ticks_min: 1,
            delay_ticks_max: rng.gen_range(1..=4),
        };
        cfg.rpc_net = NetConfig {
            drop_per_million: rng.gen_range(0..150_000),
            dup_per_million: rng.gen_range(0..100_000),
            delay_ticks_min: 1,
            delay_ticks_max: rng.gen_range(1..=8),
        };
        clients.lost_replies_percent = rng.gen_range(0..=15);
    }
    cfg.clients = clients;
    cfg.breakage = opts.breakage;
    cfg
}

/// Runs one seed.
pub fn run_shard_seed(seed: u64, opts: &ShardOptions) -> ShardRun {
    let mut world = World::new(configure(seed, opts));
    let outcome = drive(&mut world, opts).and_then(|()| finish(&mut world));
    let history = world.clients.finish_history();
    let result = outcome.and_then(|()| {
        let report = check_linearizable(&history).map_err(|e| {
            Failure::Safety(format!(
                "seed {seed}: {e}\n  reproduce: {}",
                shard_repro_command(seed, opts)
            ))
        })?;
        Ok(summary(&world, &history, report.steps))
    });
    let result = result.map_err(|f| match f {
        Failure::Safety(s) if !s.contains("reproduce:") => Failure::Safety(format!(
            "seed {seed}: {s}\n  reproduce: {}",
            shard_repro_command(seed, opts)
        )),
        Failure::Liveness(s) => Failure::Liveness(format!(
            "seed {seed}: {s}\n  reproduce: {}",
            shard_repro_command(seed, opts)
        )),
        other => other,
    });
    ShardRun { history, result }
}

fn summary(world: &World, history: &[Record], check_steps: u64) -> ShardSummary {
    ShardSummary {
        steps: world.now,
        ops: history.len() as u64,
        ops_ok: world.clients.stats.ops_ok,
        moves: world.moves(),
        configs: world.latest_config().map_or(0, |c| c.num),
        groups_created: world.stats.groups_created,
        groups_stopped: world.stats.groups_stopped,
        snapshots_taken: world.stats.snapshots_taken,
        check_steps,
    }
}

fn host_spec(id: HostId, cores: u16) -> HostSpec {
    HostSpec {
        id,
        cores,
        addr: format!("h{id}:7000"),
    }
}

fn drive(world: &mut World, opts: &ShardOptions) -> Result<(), Failure> {
    let first: Vec<HostSpec> = world.cfg.hosts[..3]
        .iter()
        .map(|&(h, c)| host_spec(h, c))
        .collect();
    world.admin(Op::Join { hosts: first });
    for _ in 0..opts.fault_ticks {
        inject(world, opts)?;
        world.step()?;
    }
    Ok(())
}

fn inject(world: &mut World, opts: &ShardOptions) -> Result<(), Violation> {
    let f = opts.faults;
    // Random operations start once the first Join made a group: a Join of one host racing
    // ahead of it would leave the first Join refused (host exists) and the cluster without
    // any group. After that the controller refuses a Leave that would remove every group.
    let started =
        world.admin_idle_of(0) && world.latest_config().is_some_and(|c| !c.groups.is_empty());
    if started && world.rng.gen_range(0..1_000_000) < opts.admin_per_million {
        // Admins run concurrently: their operations interleave in the controller's log.
        let admin = world.rng.gen_range(0..ADMINS_MAX);
        if world.admin_idle_of(admin) {
            random_admin_op(world, admin);
        }
    }
    if f.crash && world.rng.gen_bool(0.003) {
        let h = world.random_host();
        world.crash_host(h);
    }
    if f.crash {
        for h in world.host_ids() {
            if !world.host_up(h) && world.rng.gen_bool(0.02) {
                world.restart_host(h)?;
            }
        }
        world.restart_lone_crashes(0.03)?;
    }
    if f.slow_disk && world.rng.gen_bool(0.004) {
        world.toggle_slow_disk();
    }
    if f.transfer && world.rng.gen_bool(0.002) {
        world.transfer_leader();
    }
    if f.partition && world.rng.gen_bool(0.004) {
        world.heal();
        let mut hosts = world.host_ids();
        hosts.shuffle(&mut world.rng);
        let k = world.rng.gen_range(1..hosts.len());
        world.partition(&hosts[..k]);
    }
    if f.partition && world.is_partitioned() && world.rng.gen_bool(0.01) {
        world.heal();
    }
    Ok(())
}

/// A Join of a host outside the cluster, a Leave of one inside, or a Move.
fn random_admin_op(world: &mut World, admin: usize) {
    let Some(latest) = world.latest_config().cloned() else {
        return;
    };
    let inside: Vec<HostId> = latest.hosts.keys().copied().collect();
    let outside: Vec<(HostId, u16)> = world
        .cfg
        .hosts
        .iter()
        .copied()
        .filter(|(h, _)| !latest.hosts.contains_key(h))
        .collect();
    let op = match world.rng.gen_range(0..3) {
        0 if !outside.is_empty() => {
            let &(h, c) = outside.choose(&mut world.rng).unwrap_or(&outside[0]);
            Op::Join {
                hosts: vec![host_spec(h, c)],
            }
        }
        1 if inside.len() > usize::from(latest.replication) => Op::Leave {
            hosts: vec![*inside.choose(&mut world.rng).unwrap_or(&inside[0])],
        },
        _ => {
            let groups: Vec<u64> = latest.groups.keys().copied().collect();
            let Some(&group) = groups.choose(&mut world.rng) else {
                return;
            };
            Op::Move {
                shard: world.rng.gen_range(0..latest.shard_count()),
                group,
            }
        }
    };
    world.admin_as(admin, op);
}

/// Heals everything, demands progress, drains the clients and reads every key.
pub fn finish(world: &mut World) -> Result<(), Failure> {
    world.heal();
    world.set_nets(NetConfig::reliable(), NetConfig::reliable());
    for h in world.host_ids() {
        world.restart_host(h)?;
    }
    world.calm_replicas();
    world.restart_lone_crashes(1.0)?;
    world.clients.set_accepting(true);
    let healed_at = world.now;
    let clients: Vec<u64> = (0..world.clients.len())
        .map(|i| world.clients.client_id(i))
        .collect();
    let unserved = |w: &World| clients_without_ok_since(w.clients.history(), healed_at, &clients);
    let live = world.run_until(SHARD_LIVENESS_TICKS_MAX, |w| {
        w.admin_idle() && w.settled() && unserved(w).is_empty()
    })?;
    if !live {
        return Err(Failure::Liveness(format!(
            "not settled {SHARD_LIVENESS_TICKS_MAX} ticks after healing at {healed_at}: admin idle {}, settled {}, clients without an operation {:?}\n{}{}",
            world.admin_idle(),
            world.settled(),
            unserved(world),
            world.describe(),
            world.clients.describe()
        )));
    }
    world.clients.set_accepting(false);
    let keys = world.cfg.clients.keys;
    let reads: Vec<ScriptOp> = (0..keys).map(ScriptOp::Get).collect();
    let reads_at = world.now;
    world.clients.script(0, &reads);
    if !world.run_until(SHARD_LIVENESS_TICKS_MAX, |w| w.clients.idle())? {
        return Err(Failure::Liveness(format!(
            "clients still busy {SHARD_LIVENESS_TICKS_MAX} ticks after new operations stopped{}",
            world.clients.describe()
        )));
    }
    // The final reads must have answered: a timed-out one proves nothing.
    let reader = world.clients.client_id(0);
    let answered = world
        .clients
        .history()
        .iter()
        .filter(|r| {
            r.invoke >= reads_at
                && r.client == ClientId::Number(reader)
                && r.op == crate::check::OpKind::Get
                && r.status == Status::Ok
        })
        .map(|r| r.key.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if answered != keys {
        return Err(Failure::Liveness(format!(
            "{answered} of the {keys} final reads answered"
        )));
    }
    Ok(())
}
