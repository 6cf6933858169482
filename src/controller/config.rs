//! A numbered cluster configuration: hosts and their cores, groups and the slots of their
//! replicas, the shard -> group map, and where the controller's own replicas run.
//!
//! Configurations are values: the controller produces configuration n+1 from n by one
//! operation, and every group applies them one number at a time. Everything is kept in
//! `BTreeMap`s and vectors so that iteration order, and therefore the encoding, is the same on
//! every replica: two replicas that applied the same operations hold byte-identical
//! configurations.
//!
//! Binary form (little-endian, canonical: ids strictly increasing, so one configuration has
//! exactly one encoding):
//!
//! ```text
//! config     := version:u8 (=1) num:u64 replication:u8 shard_count:u16 group_id_next:u64
//!               host_count:u32 host*  group_count:u32 group*  owner:u64 * shard_count
//!               controller_count:u32 slot*
//! host       := host_id:u64 cores:u16 addr:(len:u8 utf8)
//! group      := group_id:u64 created_in:u64 replica_count:u32 (node_id:u64 slot)*
//! slot       := host_id:u64 core:u16
//! ```

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::codec::{put_count, put_text8, put_u16, put_u64, put_u8, DecodeError, Reader};
use crate::raft::NodeId;
use crate::shard::SLOT_COUNT;

/// A host's id. 0 is never a valid id.
pub type HostId = u64;
/// A group's id. 0 means "no group" (an unassigned shard).
pub type GroupId = u64;
/// The owner of a shard that no group holds (only before the first group exists).
pub const GROUP_NONE: GroupId = 0;

/// Encoding version of [`Configuration`].
pub const CONFIG_FORMAT_VERSION: u8 = 1;
/// Hosts in one configuration.
pub const HOSTS_MAX: usize = 1_024;
/// Cores (executors) of one host.
pub const CORES_PER_HOST_MAX: u16 = 256;
/// Groups in one configuration.
pub const GROUPS_MAX: usize = 8_192;
/// Replicas of one group (and of the controller).
pub const REPLICATION_MAX: u8 = 7;
/// Bytes of a host address (`host:port`).
pub const ADDR_BYTES_MAX: usize = 255;
/// Default number of shards the 16384 slots are cut into.
pub const SHARD_COUNT_DEFAULT: u16 = 64;
/// Default replicas per group.
pub const REPLICATION_DEFAULT: u8 = 3;

/// A (host, core) pair: the unit replicas are placed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub host: HostId,
    pub core: u16,
}

/// A host of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Executors the host runs (cores 0..cores).
    pub cores: u16,
    /// The host's client/peer address (`host:port` of core 0; core c listens on port + c).
    pub addr: String,
}

/// One replica of a group: its Raft node id inside the group, and where it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    pub node_id: NodeId,
    pub slot: Slot,
}

/// A Raft group as the configuration records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The configuration that created the group. Its replicas start empty and bootstrap their
    /// Raft group (voters = these replicas) when they first see this configuration.
    pub created_in: u64,
    /// In node-id order; every replica on a different host.
    pub replicas: Vec<Replica>,
}

impl Group {
    pub fn hosts(&self) -> impl Iterator<Item = HostId> + '_ {
        self.replicas.iter().map(|r| r.slot.host)
    }

    pub fn voters(&self) -> Vec<NodeId> {
        self.replicas.iter().map(|r| r.node_id).collect()
    }
}

/// One numbered configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configuration {
    pub num: u64,
    /// Replicas per group (R).
    pub replication: u8,
    /// The id the next created group gets: ids are never reused, so a retired group's
    /// replicas that are still handing off shards can never be mistaken for a new group.
    pub group_id_next: GroupId,
    pub hosts: BTreeMap<HostId, Host>,
    pub groups: BTreeMap<GroupId, Group>,
    /// shard -> owning group; `shards.len()` is the shard count, fixed at cluster creation.
    pub shards: Vec<GroupId>,
    /// Where the controller's replicas run (node id = position + 1).
    pub controller: Vec<Slot>,
}

/// What is wrong with a configuration; each variant names the offending numbers.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("shard count {count} should be in 1..={SLOT_COUNT}")]
    ShardCount { count: usize },
    #[error("replication {replication} should be in 1..={REPLICATION_MAX}")]
    Replication { replication: u8 },
    #[error("{what} count {count} exceeds the limit {count_max}")]
    TooMany {
        what: &'static str,
        count: usize,
        count_max: usize,
    },
    #[error("host id 0 is reserved")]
    HostZero,
    #[error("host {host} has {cores} cores, should be in 1..={CORES_PER_HOST_MAX}")]
    HostCores { host: HostId, cores: u16 },
    #[error(
        "host {host} address of {size_bytes} bytes exceeds {ADDR_BYTES_MAX} bytes or is empty"
    )]
    HostAddr { host: HostId, size_bytes: usize },
    #[error("group id 0 is reserved")]
    GroupZero,
    #[error("group {group} id is not below the next group id {group_id_next}")]
    GroupIdNext {
        group: GroupId,
        group_id_next: GroupId,
    },
    #[error("group {group} has {count} replicas, should have {replication}")]
    GroupReplicas {
        group: GroupId,
        count: usize,
        replication: u8,
    },
    #[error("group {group} was created in configuration {created_in}, after {num}")]
    GroupCreatedLater {
        group: GroupId,
        created_in: u64,
        num: u64,
    },
    #[error("group {group} replica {node_id}: node ids should be 1, 2, ... in order")]
    GroupNodeId { group: GroupId, node_id: NodeId },
    #[error(
        "{owner} slot on host {host} core {core} names an unknown host or a core out of range"
    )]
    SlotUnknown {
        owner: String,
        host: HostId,
        core: u16,
    },
    #[error("{owner} has two replicas on host {host}")]
    HostsNotDistinct { owner: String, host: HostId },
    #[error("shard {shard} is owned by unknown group {group}")]
    ShardGroupUnknown { shard: u16, group: GroupId },
    #[error("shard {shard} is unassigned although {groups} groups exist")]
    ShardUnassigned { shard: u16, groups: usize },
}

impl Configuration {
    /// Configuration 0: no hosts, no groups, every shard unassigned.
    pub fn initial(shard_count: u16, replication: u8) -> Configuration {
        Configuration {
            num: 0,
            replication,
            group_id_next: 1,
            hosts: BTreeMap::new(),
            groups: BTreeMap::new(),
            shards: vec![GROUP_NONE; usize::from(shard_count)],
            controller: Vec::new(),
        }
    }

    pub fn shard_count(&self) -> u16 {
        // validate() bounds the length by SLOT_COUNT.
        self.shards.len() as u16
    }

    pub fn owner(&self, shard: u16) -> Option<GroupId> {
        self.shards.get(usize::from(shard)).copied()
    }

    /// The shards of `group`, in increasing order.
    pub fn shards_of(&self, group: GroupId) -> Vec<u16> {
        (0..self.shard_count())
            .filter(|&s| self.shards[usize::from(s)] == group)
            .collect()
    }

    /// Shards per group, for every group (0 for a group that owns none).
    pub fn shard_counts(&self) -> BTreeMap<GroupId, usize> {
        let mut counts: BTreeMap<GroupId, usize> = self.groups.keys().map(|&g| (g, 0)).collect();
        for owner in &self.shards {
            if let Some(c) = counts.get_mut(owner) {
                *c += 1;
            }
        }
        counts
    }

    /// The group replicas a slot runs, as (group, node id inside the group), in group order:
    /// what one core of one host must host under this configuration.
    pub fn replicas_at(&self, slot: Slot) -> Vec<(GroupId, NodeId)> {
        self.groups
            .iter()
            .flat_map(|(&id, g)| {
                g.replicas
                    .iter()
                    .filter(move |r| r.slot == slot)
                    .map(move |r| (id, r.node_id))
            })
            .collect()
    }

    /// Groups this configuration creates: their replicas start empty and bootstrap a Raft group
    /// whose voters are [`Group::voters`] when they first see this configuration.
    pub fn groups_created(&self) -> impl Iterator<Item = (GroupId, &Group)> + '_ {
        self.groups
            .iter()
            .filter(move |(_, g)| g.created_in == self.num)
            .map(|(&id, g)| (id, g))
    }

    /// Total cores over all hosts.
    pub fn core_count(&self) -> usize {
        self.hosts.values().map(|h| usize::from(h.cores)).sum()
    }

    fn slot_known(&self, slot: Slot) -> bool {
        self.hosts
            .get(&slot.host)
            .is_some_and(|h| slot.core < h.cores)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards.is_empty() || self.shards.len() > usize::from(SLOT_COUNT) {
            return Err(ConfigError::ShardCount {
                count: self.shards.len(),
            });
        }
        if self.replication == 0 || self.replication > REPLICATION_MAX {
            return Err(ConfigError::Replication {
                replication: self.replication,
            });
        }
        check_count("group", self.groups.len(), GROUPS_MAX)?;
        check_count(
            "controller replica",
            self.controller.len(),
            usize::from(REPLICATION_MAX),
        )?;
        self.validate_hosts()?;
        for (&group, g) in &self.groups {
            if group == GROUP_NONE {
                return Err(ConfigError::GroupZero);
            }
            if group >= self.group_id_next {
                return Err(ConfigError::GroupIdNext {
                    group,
                    group_id_next: self.group_id_next,
                });
            }
            if g.created_in > self.num {
                return Err(ConfigError::GroupCreatedLater {
                    group,
                    created_in: g.created_in,
                    num: self.num,
                });
            }
            if g.replicas.len() != usize::from(self.replication) {
                return Err(ConfigError::GroupReplicas {
                    group,
                    count: g.replicas.len(),
                    replication: self.replication,
                });
            }
            for (i, r) in g.replicas.iter().enumerate() {
                if r.node_id != i as NodeId + 1 {
                    return Err(ConfigError::GroupNodeId {
                        group,
                        node_id: r.node_id,
                    });
                }
            }
            self.check_slots(&format!("group {group}"), g.replicas.iter().map(|r| r.slot))?;
        }
        self.check_slots("the controller", self.controller.iter().copied())?;
        for (shard, &group) in self.shards.iter().enumerate() {
            let shard = shard as u16;
            if group == GROUP_NONE {
                if !self.groups.is_empty() {
                    return Err(ConfigError::ShardUnassigned {
                        shard,
                        groups: self.groups.len(),
                    });
                }
            } else if !self.groups.contains_key(&group) {
                return Err(ConfigError::ShardGroupUnknown { shard, group });
            }
        }
        Ok(())
    }

    /// Checks the hosts alone (ids, cores, addresses).
    pub fn validate_hosts(&self) -> Result<(), ConfigError> {
        check_count("host", self.hosts.len(), HOSTS_MAX)?;
        for (&host, h) in &self.hosts {
            if host == 0 {
                return Err(ConfigError::HostZero);
            }
            if h.cores == 0 || h.cores > CORES_PER_HOST_MAX {
                return Err(ConfigError::HostCores {
                    host,
                    cores: h.cores,
                });
            }
            if h.addr.is_empty() || h.addr.len() > ADDR_BYTES_MAX {
                return Err(ConfigError::HostAddr {
                    host,
                    size_bytes: h.addr.len(),
                });
            }
        }
        Ok(())
    }

    fn check_slots(
        &self,
        owner: &str,
        slots: impl Iterator<Item = Slot>,
    ) -> Result<(), ConfigError> {
        let mut hosts = BTreeSet::new();
        for slot in slots {
            if !self.slot_known(slot) {
                return Err(ConfigError::SlotUnknown {
                    owner: owner.to_string(),
                    host: slot.host,
                    core: slot.core,
                });
            }
            if !hosts.insert(slot.host) {
                return Err(ConfigError::HostsNotDistinct {
                    owner: owner.to_string(),
                    host: slot.host,
                });
            }
        }
        Ok(())
    }

    /// The canonical encoding. Panics if the configuration is invalid (a programmer error: the
    /// controller validates every configuration it creates).
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.validate() {
            panic!("encoding an invalid configuration {}: {e}", self.num);
        }
        put_u8(out, CONFIG_FORMAT_VERSION);
        put_u64(out, self.num);
        put_u8(out, self.replication);
        put_u16(out, self.shard_count());
        put_u64(out, self.group_id_next);
        put_count(out, self.hosts.len());
        for (&id, h) in &self.hosts {
            put_u64(out, id);
            put_u16(out, h.cores);
            put_text8(out, &h.addr);
        }
        put_count(out, self.groups.len());
        for (&id, g) in &self.groups {
            put_u64(out, id);
            put_u64(out, g.created_in);
            put_count(out, g.replicas.len());
            for r in &g.replicas {
                put_u64(out, r.node_id);
                put_slot(out, r.slot);
            }
        }
        for &owner in &self.shards {
            put_u64(out, owner);
        }
        put_count(out, self.controller.len());
        for &slot in &self.controller {
            put_slot(out, slot);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes a whole buffer holding exactly one configuration.
    pub fn decode(bytes: &[u8]) -> Result<Configuration, DecodeError> {
        let mut r = Reader::new(bytes);
        let config = Configuration::read(&mut r)?;
        r.finish()?;
        Ok(config)
    }

    /// Reads one configuration and checks it is canonical and valid.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Configuration, DecodeError> {
        let start = r.offset();
        let version = r.u8()?;
        if version != CONFIG_FORMAT_VERSION {
            return Err(DecodeError::Unknown {
                offset: start,
                what: "configuration version",
                value: u64::from(version),
            });
        }
        let num = r.u64()?;
        let replication = r.u8()?;
        let shard_count = r.u16()?;
        let group_id_next = r.u64()?;
        let host_count = r.count("host", HOSTS_MAX)?;
        let mut hosts = BTreeMap::new();
        let mut last_host = None;
        for _ in 0..host_count {
            let offset = r.offset();
            let id = r.u64()?;
            if last_host.is_some_and(|l| id <= l) {
                return Err(not_canonical(offset, "host id", id));
            }
            last_host = Some(id);
            let cores = r.u16()?;
            let addr = r.text8()?;
            hosts.insert(id, Host { cores, addr });
        }
        let group_count = r.count("group", GROUPS_MAX)?;
        let mut groups = BTreeMap::new();
        let mut last_group = None;
        for _ in 0..group_count {
            let offset = r.offset();
            let id = r.u64()?;
            if last_group.is_some_and(|l| id <= l) {
                return Err(not_canonical(offset, "group id", id));
            }
            last_group = Some(id);
            let created_in = r.u64()?;
            let replica_count = r.count("replica", usize::from(REPLICATION_MAX))?;
            let mut replicas = Vec::with_capacity(replica_count);
            for _ in 0..replica_count {
                let node_id = r.u64()?;
                let slot = read_slot(r)?;
                replicas.push(Replica { node_id, slot });
            }
            groups.insert(
                id,
                Group {
                    created_in,
                    replicas,
                },
            );
        }
        if r.remaining() / 8 < usize::from(shard_count) {
            return Err(DecodeError::Truncated {
                offset: r.offset(),
                needed_bytes: usize::from(shard_count) * 8 - r.remaining(),
            });
        }
        let mut shards = Vec::with_capacity(usize::from(shard_count));
        for _ in 0..shard_count {
            shards.push(r.u64()?);
        }
        let controller_count = r.count("controller replica", usize::from(REPLICATION_MAX))?;
        let mut controller = Vec::with_capacity(controller_count);
        for _ in 0..controller_count {
            controller.push(read_slot(r)?);
        }
        let config = Configuration {
            num,
            replication,
            group_id_next,
            hosts,
            groups,
            shards,
            controller,
        };
        config.validate().map_err(|e| DecodeError::Invalid {
            offset: start,
            reason: e.to_string(),
        })?;
        Ok(config)
    }
}

fn check_count(what: &'static str, count: usize, count_max: usize) -> Result<(), ConfigError> {
    if count > count_max {
        return Err(ConfigError::TooMany {
            what,
            count,
            count_max,
        });
    }
    Ok(())
}

fn not_canonical(offset: usize, what: &'static str, value: u64) -> DecodeError {
    DecodeError::NotCanonical {
        offset,
        what,
        value,
    }
}

pub(crate) fn put_slot(out: &mut Vec<u8>, slot: Slot) {
    put_u64(out, slot.host);
    put_u16(out, slot.core);
}

pub(crate) fn read_slot(r: &mut Reader<'_>) -> Result<Slot, DecodeError> {
    Ok(Slot {
        host: r.u64()?,
        core: r.u16()?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Three hosts with two cores each, two groups over them, shards split 0..32 / 32..64.
    pub(crate) fn sample() -> Configuration {
        let mut c = Configuration::initial(64, 3);
        c.num = 1;
        for id in 1..=3 {
            c.hosts.insert(
                id,
                Host {
                    cores: 2,
                    addr: format!("10.0.0.{id}:7000"),
                },
            );
        }
        for (gid, core) in [(1u64, 0u16), (2, 1)] {
            let replicas = (1..=3)
                .map(|h| Replica {
                    node_id: h,
                    slot: Slot { host: h, core },
                })
                .collect();
            c.groups.insert(
                gid,
                Group {
                    created_in: 1,
                    replicas,
                },
            );
        }
        c.group_id_next = 3;
        for s in 0..64 {
            c.shards[s] = if s < 32 { 1 } else { 2 };
        }
        c.controller = (1..=3).map(|h| Slot { host: h, core: 0 }).collect();
        c
    }

    #[test]
    fn slots_know_their_replicas() {
        let c = sample();
        assert_eq!(c.replicas_at(Slot { host: 2, core: 1 }), vec![(2, 2)]);
        assert_eq!(c.replicas_at(Slot { host: 3, core: 0 }), vec![(1, 3)]);
        assert!(c.replicas_at(Slot { host: 4, core: 0 }).is_empty());
        let created: Vec<GroupId> = c.groups_created().map(|(id, _)| id).collect();
        assert_eq!(created, vec![1, 2]);
        let mut later = c.clone();
        later.num = 2;
        assert_eq!(later.groups_created().count(), 0);
    }

    #[test]
    fn round_trips_byte_for_byte() {
        let c = sample();
        c.validate().unwrap();
        let bytes = c.to_bytes();
        let back = Configuration::decode(&bytes).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.to_bytes(), bytes);
        let initial = Configuration::initial(64, 3);
        assert_eq!(Configuration::decode(&initial.to_bytes()).unwrap(), initial);
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let bytes = sample().to_bytes();
        for len in 0..bytes.len() {
            assert!(
                Configuration::decode(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Configuration::decode(&longer),
            Err(DecodeError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn every_single_byte_corruption_is_an_error_or_a_valid_configuration() {
        let bytes = sample().to_bytes();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                // Never a panic; when it decodes, it is valid and re-encodes to the same bytes.
                if let Ok(c) = Configuration::decode(&bad) {
                    assert_eq!(c.to_bytes(), bad, "byte {i}");
                }
            }
        }
    }

    #[test]
    fn validation_names_the_bad_number() {
        let mut c = sample();
        c.shards[5] = 9;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ShardGroupUnknown { shard: 5, group: 9 })
        );
        let mut c = sample();
        c.groups.get_mut(&2).unwrap().replicas[1].slot = Slot { host: 1, core: 1 };
        let e = c.validate().unwrap_err();
        assert_eq!(
            e,
            ConfigError::HostsNotDistinct {
                owner: "group 2".into(),
                host: 1
            }
        );
        assert!(e.to_string().contains("group 2") && e.to_string().contains("host 1"));
        let mut c = sample();
        c.groups.get_mut(&1).unwrap().replicas[0].slot.core = 2;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::SlotUnknown {
                host: 1,
                core: 2,
                ..
            })
        ));
        let mut c = sample();
        c.hosts.get_mut(&3).unwrap().cores = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::HostCores { host: 3, cores: 0 })
        );
        let mut c = sample();
        c.shards[0] = GROUP_NONE;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ShardUnassigned {
                shard: 0,
                groups: 2
            })
        );
        let mut c = sample();
        c.group_id_next = 2;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::GroupIdNext { group: 2, .. })
        ));
    }

    #[test]
    fn a_non_canonical_encoding_is_refused() {
        // Swap the two host records: still well formed, but not in increasing id order.
        let c = sample();
        let bytes = c.to_bytes();
        let hosts_at = 1 + 8 + 1 + 2 + 8 + 4;
        let record = |id: u64| 8 + 2 + 1 + format!("10.0.0.{id}:7000").len();
        let (a, b) = (record(1), record(2));
        let mut swapped = bytes.clone();
        swapped[hosts_at..hosts_at + a + b].copy_from_slice(
            &[
                &bytes[hosts_at + a..hosts_at + a + b],
                &bytes[hosts_at..hosts_at + a],
            ]
            .concat(),
        );
        assert!(matches!(
            Configuration::decode(&swapped),
            Err(DecodeError::NotCanonical {
                what: "host id",
                ..
            })
        ));
    }
}
