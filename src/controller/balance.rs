//! Rebalancing shards over groups, and placing group replicas on slots.
//!
//! Both are pure functions of a configuration and give the same answer on every replica: they
//! iterate `BTreeMap`s and break every tie by id, never by hash-map order.
//!
//! Rebalancing. With `n` shards and `g` groups every group should hold `n / g` or `n / g + 1`
//! shards, and exactly `n % g` groups hold the larger count. A shard that stays where it is costs
//! nothing, so the fewest moves is `n` minus the most shards any balanced assignment can keep.
//! A group keeps at most `min(count, target)` of its shards, so the best choice of which groups
//! get the `+1` targets is the groups that hold the most shards now (ties: lower id). Then each
//! group over its target gives up exactly its excess (its highest-numbered shards), shards of
//! groups that no longer exist are freed, and the freed shards fill the groups under their
//! target in group-id order. Every freed shard moves once and no kept shard moves, so the
//! number of moves is the minimum.
//!
//! Placement. A new group takes R slots on R distinct hosts: greedily, each time the slot with
//! the fewest replicas on it, then the host with the fewest replicas, then the lowest (host,
//! core). The controller's own replicas count as load, so groups avoid its cores when they can.
//! The cluster wants one replica per core: `floor(cores / R)` groups.

use std::collections::{BTreeMap, BTreeSet};

use super::config::{Configuration, Group, GroupId, HostId, Replica, Slot, GROUPS_MAX, GROUP_NONE};
use crate::raft::NodeId;

/// Reassigns `shards` (shard -> group) so that every group in `groups` holds `n / g` or
/// `n / g + 1` shards, moving as few shards as possible. Shards owned by a group not in
/// `groups` (or by none) are always reassigned. With no groups, every shard becomes
/// unassigned. Returns the number of shards whose owner changed.
pub fn rebalance(shards: &mut [GroupId], groups: &BTreeSet<GroupId>) -> usize {
    if groups.is_empty() {
        let moved = shards.iter().filter(|&&g| g != GROUP_NONE).count();
        shards.fill(GROUP_NONE);
        return moved;
    }
    let mut held: BTreeMap<GroupId, Vec<usize>> = groups.iter().map(|&g| (g, Vec::new())).collect();
    let mut freed = Vec::new();
    for (shard, owner) in shards.iter().enumerate() {
        match held.get_mut(owner) {
            Some(list) => list.push(shard),
            None => freed.push(shard),
        }
    }
    let base = shards.len() / groups.len();
    let extra = shards.len() % groups.len();
    // The `extra` groups holding the most shards keep the larger target.
    let mut by_count: Vec<(usize, GroupId)> = held.iter().map(|(&g, l)| (l.len(), g)).collect();
    by_count.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let target: BTreeMap<GroupId, usize> = by_count
        .iter()
        .enumerate()
        .map(|(rank, &(_, g))| (g, base + usize::from(rank < extra)))
        .collect();
    for (g, list) in held.iter_mut() {
        while list.len() > target[g] {
            // Lists are in increasing shard order: give up the highest.
            if let Some(shard) = list.pop() {
                freed.push(shard);
            }
        }
    }
    freed.sort_unstable();
    let moved = freed.len();
    let mut freed = freed.into_iter();
    for (&g, list) in &held {
        for _ in list.len()..target[&g] {
            let shard = freed
                .next()
                .expect("freed shards exactly fill the groups under target");
            shards[shard] = g;
        }
    }
    debug_assert!(freed.next().is_none());
    moved
}

/// Replicas on each slot and on each host, counting the controller's replicas.
fn loads(config: &Configuration) -> (BTreeMap<Slot, usize>, BTreeMap<HostId, usize>) {
    let mut slot_load = BTreeMap::new();
    let mut host_load = BTreeMap::new();
    let slots = config
        .groups
        .values()
        .flat_map(|g| g.replicas.iter().map(|r| r.slot))
        .chain(config.controller.iter().copied());
    for slot in slots {
        *slot_load.entry(slot).or_insert(0) += 1;
        *host_load.entry(slot.host).or_insert(0) += 1;
    }
    (slot_load, host_load)
}

/// R slots on distinct hosts for a new group, or None when fewer than R hosts exist.
pub fn place_group(config: &Configuration) -> Option<Vec<Slot>> {
    let replication = usize::from(config.replication);
    if config.hosts.len() < replication {
        return None;
    }
    let (slot_load, host_load) = loads(config);
    let mut chosen: Vec<Slot> = Vec::with_capacity(replication);
    for _ in 0..replication {
        let best = config
            .hosts
            .iter()
            .filter(|(id, _)| !chosen.iter().any(|s| s.host == **id))
            .flat_map(|(&host, h)| (0..h.cores).map(move |core| Slot { host, core }))
            .min_by_key(|slot| {
                (
                    slot_load.get(slot).copied().unwrap_or(0),
                    host_load.get(&slot.host).copied().unwrap_or(0),
                    *slot,
                )
            })?;
        chosen.push(best);
    }
    Some(chosen)
}

/// The number of groups the cluster's cores call for: one replica per core.
pub fn groups_wanted(config: &Configuration) -> usize {
    (config.core_count() / usize::from(config.replication)).min(GROUPS_MAX)
}

/// Creates groups (placed by [`place_group`], created in `config.num`) until the cluster has
/// [`groups_wanted`] of them. Returns the ids created, in order.
pub fn add_groups(config: &mut Configuration) -> Vec<GroupId> {
    let mut created = Vec::new();
    while config.groups.len() < groups_wanted(config) {
        let Some(slots) = place_group(config) else {
            break;
        };
        let id = config.group_id_next;
        config.group_id_next += 1;
        let replicas = slots
            .into_iter()
            .enumerate()
            .map(|(i, slot)| Replica {
                node_id: i as NodeId + 1,
                slot,
            })
            .collect();
        config.groups.insert(
            id,
            Group {
                created_in: config.num,
                replicas,
            },
        );
        created.push(id);
    }
    created
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::config::Host;

    fn groups(ids: &[GroupId]) -> BTreeSet<GroupId> {
        ids.iter().copied().collect()
    }

    fn counts(shards: &[GroupId]) -> BTreeMap<GroupId, usize> {
        let mut c = BTreeMap::new();
        for &g in shards {
            *c.entry(g).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn first_join_spreads_unassigned_shards() {
        let mut shards = vec![GROUP_NONE; 10];
        let moved = rebalance(&mut shards, &groups(&[1, 2, 3]));
        assert_eq!(moved, 10);
        assert_eq!(shards, vec![1, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
    }

    #[test]
    fn a_new_group_takes_only_what_balance_requires() {
        let mut shards = vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 2];
        let moved = rebalance(&mut shards, &groups(&[1, 2, 3]));
        // 10 over 3 groups: 4, 3, 3. Group 3 needs 3, so exactly 3 shards move.
        assert_eq!(moved, 3);
        let c = counts(&shards);
        assert_eq!(c[&3], 3);
        assert_eq!(c[&1] + c[&2], 7);
        assert!(c[&1].abs_diff(c[&2]) <= 1);
    }

    #[test]
    fn the_larger_target_goes_to_the_group_that_already_holds_more() {
        // Group 2 holds 4 after a Move; with 7 shards over 2 groups one keeps 4: group 2, so
        // nothing moves.
        let mut shards = vec![1, 1, 1, 2, 2, 2, 2];
        assert_eq!(rebalance(&mut shards, &groups(&[1, 2])), 0);
        assert_eq!(shards, vec![1, 1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn a_removed_groups_shards_are_spread_over_the_rest() {
        let mut shards = vec![1, 1, 2, 2, 3, 3];
        let moved = rebalance(&mut shards, &groups(&[1, 3]));
        assert_eq!(moved, 2);
        assert_eq!(counts(&shards), BTreeMap::from([(1, 3), (3, 3)]));
        // Group 1 and 3 kept their own shards.
        assert_eq!(&shards[0..2], &[1, 1]);
        assert_eq!(&shards[4..6], &[3, 3]);
    }

    #[test]
    fn no_groups_unassigns_everything() {
        let mut shards = vec![1, 2, 1];
        assert_eq!(rebalance(&mut shards, &BTreeSet::new()), 3);
        assert_eq!(shards, vec![GROUP_NONE; 3]);
    }

    fn cluster(hosts: &[(HostId, u16)]) -> Configuration {
        let mut c = Configuration::initial(64, 3);
        for &(id, cores) in hosts {
            c.hosts.insert(
                id,
                Host {
                    cores,
                    addr: format!("h{id}:7000"),
                },
            );
        }
        c
    }

    #[test]
    fn groups_fill_the_cores_one_replica_each() {
        let mut c = cluster(&[(1, 2), (2, 2), (3, 2)]);
        let created = add_groups(&mut c);
        assert_eq!(created, vec![1, 2]);
        let (slot_load, _) = loads(&c);
        assert_eq!(slot_load.len(), 6);
        assert!(slot_load.values().all(|&n| n == 1));
        let ids: BTreeSet<GroupId> = c.groups.keys().copied().collect();
        rebalance(&mut c.shards, &ids);
        c.validate().unwrap();
    }

    #[test]
    fn too_few_hosts_create_no_group() {
        let mut c = cluster(&[(1, 8), (2, 8)]);
        assert_eq!(place_group(&c), None);
        assert!(add_groups(&mut c).is_empty());
    }

    #[test]
    fn placement_avoids_the_controller_cores_and_loaded_hosts() {
        let mut c = cluster(&[(1, 2), (2, 2), (3, 2), (4, 1)]);
        c.controller = (1..=3).map(|h| Slot { host: h, core: 0 }).collect();
        let slots = place_group(&c).unwrap();
        // Host 4 is empty, so it is chosen first; then core 1 of hosts 1 and 2.
        let chosen: BTreeSet<Slot> = slots.iter().copied().collect();
        let want = BTreeSet::from([
            Slot { host: 1, core: 1 },
            Slot { host: 2, core: 1 },
            Slot { host: 4, core: 0 },
        ]);
        assert_eq!(chosen, want);
        assert_eq!(slots[0], Slot { host: 4, core: 0 });
        let hosts: BTreeSet<HostId> = slots.iter().map(|s| s.host).collect();
        assert_eq!(hosts, BTreeSet::from([1, 2, 4]));
        assert!(slots.iter().all(|s| !(s.core == 0 && s.host <= 3)));
    }
}
