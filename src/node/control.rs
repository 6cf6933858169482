//! The controller group inside the server: where its replicas run, the configuration it starts
//! from, and how a host renders configurations for `tynamo ctl` and `CLUSTER SLOTS`.
//!
//! Placement: core 0 of the first [`CONTROLLER_REPLICAS`] hosts of `--initial-cluster` (by host
//! id, so hosts that list the map in another order still agree). Controller node ids are
//! positions in that list + 1, as `Configuration::controller` records them. The group runs on
//! the same WAL, snapshot and Ready loop code as data groups (`Group<ControllerMachine>`), in
//! `<data>/controller/`, and its peer messages share core 0's connections under the group id
//! [`CONTROLLER_GROUP_ID`].
//!
//! Bootstrap: every host derives the same two commands from `--initial-cluster`: `Join` of all
//! initial hosts with their cores, then `SetController` with the controller's slots, under a
//! fixed session ([`BOOTSTRAP_CLIENT_ID`], seqs 1 and 2). Whichever controller replica leads
//! proposes the one still missing; a duplicate (two leaders in a row proposing, or a retry) is
//! answered from the session and changes nothing. With replication = the number of initial hosts
//! the controller's placement puts group k+1 on core k of every host and cuts the shards into
//! the same contiguous blocks as the static map (`ServerConfig::shard_group`), so configuration
//! 1 describes exactly what the data groups serve (`bootstrap_matches_the_static_map` checks it).
//!
//! Configuration group `k + 1` is the static map's data group on core `k` of every initial host
//! ([`core_of_group`]). Data groups follow the configurations (`migrate`): Move moves a shard
//! live between groups, Join creates groups on the new hosts' cores (`replica::walk`), Leave
//! retires the groups with a replica on a leaving host, whose replicas are removed once their
//! shards moved away. A host that joined later knows the controller from the configuration it
//! joined with ([`ControlPlan::from_config`]).

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::controller::{
    self, Command as CtlCommand, Configuration, HostSpec, Op as CtlOp, Settings, Slot,
};

use super::config::{HostAddrs, ServerConfig};

/// Replicas of the controller group (fewer when the cluster has fewer hosts).
pub const CONTROLLER_REPLICAS: usize = 3;
/// The controller's group id on the peer wire (data groups use their core number).
pub const CONTROLLER_GROUP_ID: u64 = u64::MAX;
/// Largest controller log entry: one command, at most a Join of `JOIN_HOSTS_MAX` hosts with
/// addresses of `ADDR_BYTES_MAX` bytes (a few dozen KiB), with a wide margin.
pub const CONTROLLER_ENTRY_BYTES_MAX: u32 = 1 << 20;
const _: () = assert!(
    controller::JOIN_HOSTS_MAX * (8 + 2 + 1 + controller::config::ADDR_BYTES_MAX) + 4096
        < CONTROLLER_ENTRY_BYTES_MAX as usize
);
/// Controller WAL segments: the controller logs a handful of entries a second at most, so a
/// data group's 64 MiB preallocated segments would only waste disk on every controller host.
pub const CONTROLLER_SEGMENT_BYTES: u64 = 4 << 20;

/// The session under which hosts propose the bootstrap commands.
pub const BOOTSTRAP_CLIENT_ID: u64 = 0x7479_6e61_626f_6f74; // "tynaboot"

/// Where the controller runs and what it starts from, derived from the static cluster map.
#[derive(Debug, Clone)]
pub struct ControlPlan {
    /// Controller node id `i + 1` runs on core 0 of host `hosts[i]`.
    pub hosts: Vec<u64>,
    pub settings: Settings,
    /// Join of the initial hosts, then SetController: proposed in this order.
    pub bootstrap: Vec<CtlCommand>,
}

impl ControlPlan {
    pub fn new(cfg: &ServerConfig) -> ControlPlan {
        let ids = cfg.voters();
        let hosts: Vec<u64> = ids.iter().copied().take(CONTROLLER_REPLICAS).collect();
        let settings = Settings {
            shard_count: cfg.shard_count,
            // Every group of the static map has a replica on every host.
            replication: u8::try_from(ids.len()).unwrap_or(u8::MAX),
            ..Settings::default()
        };
        let join = CtlOp::Join {
            hosts: ids
                .iter()
                .filter_map(|&id| cfg.host(id))
                .map(|h| HostSpec {
                    id: h.id,
                    cores: cfg.cores,
                    addr: host_addr_text(h),
                })
                .collect(),
        };
        let set_controller = CtlOp::SetController {
            slots: hosts.iter().map(|&host| Slot { host, core: 0 }).collect(),
        };
        let bootstrap = [join, set_controller]
            .into_iter()
            .zip(1..)
            .map(|(op, seq)| CtlCommand {
                client_id: BOOTSTRAP_CLIENT_ID,
                seq,
                op,
            })
            .collect();
        ControlPlan {
            hosts,
            settings,
            bootstrap,
        }
    }

    /// The controller as a configuration describes it, for a host that is not in
    /// `--initial-cluster` (it joined later, `node::join`): it runs no controller replica and
    /// proposes nothing, it only asks the controller hosts.
    pub fn from_config(config: &Configuration) -> ControlPlan {
        ControlPlan {
            hosts: config.controller.iter().map(|s| s.host).collect(),
            settings: Settings {
                shard_count: config.shard_count(),
                replication: config.replication,
                ..Settings::default()
            },
            bootstrap: Vec::new(),
        }
    }

    /// This host's controller node id, if it runs a controller replica.
    pub fn node_of_host(&self, host: u64) -> Option<u64> {
        self.hosts
            .iter()
            .position(|&h| h == host)
            .map(|i| i as u64 + 1)
    }

    pub fn host_of_node(&self, node: u64) -> Option<u64> {
        let i = usize::try_from(node.checked_sub(1)?).ok()?;
        self.hosts.get(i).copied()
    }

    pub fn voters(&self) -> Vec<u64> {
        (1..=self.hosts.len() as u64).collect()
    }

    /// The next bootstrap command the configuration still lacks, if any.
    pub fn next_bootstrap(&self, latest: &Configuration) -> Option<&CtlCommand> {
        if latest.num == 0 {
            self.bootstrap.first()
        } else if latest.controller.is_empty() {
            self.bootstrap.get(1)
        } else {
            None
        }
    }
}

/// A host's address as the configuration records it: `peer/client` (core 0's), the form
/// `--initial-cluster` and `tynamo ctl join` use.
pub fn host_addr_text(h: &HostAddrs) -> String {
    format!("{}/{}", h.peer, h.client)
}

/// The client address (core 0) of a configuration host, from its `peer/client` text.
pub fn host_client_addr(host: &controller::Host) -> Option<SocketAddr> {
    let (_, client) = host.addr.split_once('/')?;
    client.parse().ok()
}

/// The core of the static map's group `group` (the bootstrap correspondence; groups created
/// later run on whichever slots the configuration gives them).
pub fn core_of_group(group: controller::GroupId) -> Option<u16> {
    u16::try_from(group.checked_sub(1)?).ok()
}

/// A configuration as JSON (`tynamo ctl query --json`).
pub fn config_json(c: &Configuration) -> Value {
    let hosts: Vec<Value> = c
        .hosts
        .iter()
        .map(|(id, h)| json!({"id": id, "cores": h.cores, "addr": h.addr}))
        .collect();
    let groups: Vec<Value> = c
        .groups
        .iter()
        .map(|(id, g)| {
            let replicas: Vec<Value> = g
                .replicas
                .iter()
                .map(|r| json!({"node_id": r.node_id, "host": r.slot.host, "core": r.slot.core}))
                .collect();
            json!({
                "id": id,
                "created_in": g.created_in,
                "replicas": replicas,
                "shards": c.shards_of(*id),
            })
        })
        .collect();
    let controller: Vec<Value> = c
        .controller
        .iter()
        .map(|s| json!({"host": s.host, "core": s.core}))
        .collect();
    json!({
        "num": c.num,
        "replication": c.replication,
        "shard_count": c.shard_count(),
        "hosts": hosts,
        "groups": groups,
        "shards": c.shards,
        "controller": controller,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Reply, StateMachine};
    use crate::node::config::parse_initial_cluster;

    fn apply_bootstrap(plan: &ControlPlan) -> StateMachine {
        let mut sm = StateMachine::new(plan.settings.clone()).unwrap();
        let mut index = 1;
        while let Some(c) = plan.next_bootstrap(sm.latest()).cloned() {
            assert!(index < 10, "bootstrap does not converge");
            index += 1;
            let reply = sm.apply(index, &c.encode());
            assert!(matches!(reply, Some(Reply::Ok { .. })), "{reply:?}");
        }
        sm
    }

    #[test]
    fn bootstrap_matches_the_static_map() {
        for (map, cores) in [
            ("1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,3=127.0.0.1:7121/127.0.0.1:7021", 2),
            ("1=127.0.0.1:7101/127.0.0.1:7001", 3),
            ("5=10.0.0.5:7101,9=10.0.0.9:7101,2=10.0.0.2:7101,4=10.0.0.4:7101", 3),
        ] {
            let hosts = parse_initial_cluster(map).unwrap();
            let me = hosts[0].id;
            let cfg = ServerConfig::new(me, "/tmp/x".into(), hosts.clone(), cores);
            cfg.validate().unwrap();
            let plan = ControlPlan::new(&cfg);
            let sm = apply_bootstrap(&plan);
            let c = sm.latest();
            assert_eq!(c.num, 2, "join then set-controller");
            assert_eq!(c.groups.len(), usize::from(cores));
            for (&gid, g) in &c.groups {
                let core = core_of_group(gid).unwrap();
                let mut on: Vec<u64> = g.replicas.iter().map(|r| r.slot.host).collect();
                on.sort_unstable();
                assert_eq!(on, cfg.voters(), "group {gid} has a replica on every host");
                assert!(g.replicas.iter().all(|r| r.slot.core == core), "{g:?}");
            }
            for shard in 0..cfg.shard_count {
                assert_eq!(
                    core_of_group(c.shards[usize::from(shard)]),
                    Some(cfg.shard_group(shard)),
                    "shard {shard}"
                );
            }
            let ctl: Vec<u64> = c.controller.iter().map(|s| s.host).collect();
            assert_eq!(ctl, plan.hosts);
            assert!(plan.hosts.len() <= CONTROLLER_REPLICAS);
            for h in c.hosts.values() {
                assert!(host_client_addr(h).is_some(), "{h:?}");
            }
            // Every host derives the same plan, whatever order the map lists them in.
            let mut reversed = hosts.clone();
            reversed.reverse();
            let other = ServerConfig::new(me, "/tmp/x".into(), reversed, cores);
            assert_eq!(ControlPlan::new(&other).bootstrap, plan.bootstrap);
        }
    }

    #[test]
    fn a_joined_host_knows_the_controller_from_a_configuration_as_the_initial_hosts_do() {
        let map = "5=10.0.0.5:7101,9=10.0.0.9:7101,2=10.0.0.2:7101,4=10.0.0.4:7101";
        let cfg = ServerConfig::new(5, "/tmp/x".into(), parse_initial_cluster(map).unwrap(), 2);
        let plan = ControlPlan::new(&cfg);
        let sm = apply_bootstrap(&plan);
        let joined = ControlPlan::from_config(sm.latest());
        assert_eq!(joined.hosts, plan.hosts);
        for node in 1..=3 {
            assert_eq!(joined.host_of_node(node), plan.host_of_node(node));
        }
        assert_eq!(joined.settings.shard_count, plan.settings.shard_count);
        assert_eq!(joined.settings.replication, plan.settings.replication);
        // It proposes nothing, and runs no controller replica whatever its id.
        assert!(joined
            .next_bootstrap(&Configuration::initial(64, 4))
            .is_none());
        assert_eq!(joined.node_of_host(7), None);
    }

    #[test]
    fn a_repeated_bootstrap_command_changes_nothing() {
        let hosts = parse_initial_cluster("1=127.0.0.1:7101,2=127.0.0.1:7111").unwrap();
        let plan = ControlPlan::new(&ServerConfig::new(1, "/tmp/x".into(), hosts, 2));
        let mut sm = apply_bootstrap(&plan);
        let before = sm.latest().clone();
        // A leader that had not applied the bootstrap yet proposes both again.
        for (i, c) in plan.bootstrap.iter().enumerate() {
            let _ = sm.apply(20 + i as u64, &c.encode());
        }
        assert_eq!(sm.latest(), &before);
        let json = config_json(sm.latest());
        assert_eq!(json["num"], 2);
        assert_eq!(json["groups"].as_array().unwrap().len(), 2);
    }
}
