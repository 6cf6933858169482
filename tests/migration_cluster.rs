//! Real-process tests of live shard migration: four `tynamo server` hosts of two cores on
//! loopback (data groups 1 and 2 on cores 0 and 1 of every host; the controller on core 0 of
//! hosts 1-3, so host 4 follows the configurations from them), `tynamo-bench --verify` load
//! through the cluster client, and `tynamo ctl move` while it runs.
//!
//! What they assert: no verification error (every read sees every write acknowledged before
//! it), every acknowledged write readable at the end (the bench's final scan), each group
//! serving exactly the shards the latest configuration gives it with nothing in flight, the old
//! owner redirecting a moved shard's keys with `-MOVED` to the new owner, and `CLUSTER SLOTS`
//! following the configuration. The bench's one-second progress lines are printed with the
//! moments of the moves, so the throughput dip can be read off (`-- --nocapture`).
//!
//! Every wait is a poll for a condition with a deadline; no sleep synchronises anything.
//!
//! Run: `cargo test --test migration_cluster -- --nocapture`

use std::time::{Duration, Instant};

use serde_json::Value;
use tynamo::resp::frame::Frame;
use tynamo::shard::{key_slot, slot_shard};

mod common;
use common::bench::Bench;
use common::cluster::Cluster;
use common::{lock, try_call};

const DEADLINE: Duration = Duration::from_secs(60);
/// Poll interval while waiting for a condition (the condition decides, not the interval).
const POLL: Duration = Duration::from_millis(50);
const HOSTS: u16 = 4;
const CORES: u16 = 2;
const SHARD_COUNT: u16 = 64;

/// Four hosts of two cores, all in `--initial-cluster`.
fn start_cluster() -> Cluster {
    Cluster::start(&[CORES; HOSTS as usize], HOSTS)
}

impl Cluster {
    /// The host whose core `core` leads its group, once one does.
    fn leader_host(&self, core: u16) -> u16 {
        let start = Instant::now();
        loop {
            for h in 1..=HOSTS {
                if self.running(h)
                    && self
                        .info(h, core)
                        .is_some_and(|i| i.contains("raft_role:Leader"))
                {
                    return h;
                }
            }
            assert!(start.elapsed() < DEADLINE, "no leader on core {core}");
            std::thread::sleep(POLL);
        }
    }

    /// The latest configuration, as `tynamo ctl query --json` prints it.
    fn latest(&self) -> Value {
        let start = Instant::now();
        loop {
            let out = self.ctl(&["query", "--json"]);
            if out.status.success() {
                let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
                if doc["num"].as_u64().unwrap_or(0) >= 2 {
                    return doc;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no configuration: {}\nlogs:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(POLL);
        }
    }

    fn info(&self, host: u16, core: u16) -> Option<String> {
        match try_call(&self.addr(host, core), &["INFO"]).ok()? {
            Frame::Bulk(b) | Frame::Verbatim(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            _ => None,
        }
    }

    /// Waits until every replica of every group accepted configuration `num` and has nothing
    /// in flight, and the leader of group `core + 1` serves exactly `shards[core]` shards.
    fn wait_settled(&self, num: u64, shards: &[u64]) {
        let start = Instant::now();
        loop {
            let settled = (1..=HOSTS).all(|h| {
                (0..CORES).all(|c| {
                    self.info(h, c).is_some_and(|i| {
                        info_field(&i, "group_config_num") == num
                            && info_field(&i, "shards_importing") == 0
                            && info_field(&i, "shards_confirming") == 0
                            && info_field(&i, "shards_exporting") == 0
                            && info_field(&i, "shards_serving") == shards[usize::from(c)]
                    })
                })
            });
            if settled {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "configuration {num} not settled: {}\nlogs:\n{}",
                (1..=HOSTS)
                    .flat_map(|h| (0..CORES).map(move |c| (h, c)))
                    .map(|(h, c)| format!(
                        "host {h} core {c}: {:?}",
                        self.info(h, c).map(|i| shards_section(&i))
                    ))
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.logs()
            );
            std::thread::sleep(POLL);
        }
    }
}

fn shards_section(info: &str) -> String {
    info.split("# Shards")
        .nth(1)
        .and_then(|s| s.split("\r\n\r\n").next())
        .unwrap_or("")
        .replace("\r\n", " ")
}

fn info_field(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Shards of group `group` in a configuration document, in shard order.
fn shards_of(doc: &Value, group: u64) -> Vec<u16> {
    doc["shards"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, g)| g.as_u64() == Some(group))
        .map(|(s, _)| s as u16)
        .collect()
}

/// A key whose slot belongs to `shard`.
fn key_in_shard(shard: u16) -> String {
    (0..1_000_000)
        .map(|i| format!("probe:{i}"))
        .find(|k| slot_shard(key_slot(k.as_bytes()), SHARD_COUNT) == shard)
        .unwrap()
}

#[test]
fn moving_shards_under_verified_load_loses_no_write_and_the_old_owner_redirects() {
    let _l = lock();
    let c = start_cluster();
    let first = c.latest();
    let first_num = first["num"].as_u64().unwrap();
    let (g1, g2) = (shards_of(&first, 1), shards_of(&first, 2));
    assert_eq!(g1.len() + g2.len(), usize::from(SHARD_COUNT));
    c.wait_settled(first_num, &[g1.len() as u64, g2.len() as u64]);

    let bench = Bench::start(&c.seeds(), 12, DEADLINE);
    bench.wait_serving(1);
    // Three moves from group 1 to group 2, each its own configuration, issued back to back:
    // the groups take them one number at a time.
    let moved: Vec<u16> = g1.iter().copied().take(3).collect();
    let mut marks = Vec::new();
    for &shard in &moved {
        let out = c.ctl(&["move", &shard.to_string(), "2"]);
        assert!(
            out.status.success(),
            "move {shard}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        marks.push((bench.at(), format!("ctl move {shard} 2")));
    }
    let last = c.latest();
    let last_num = last["num"].as_u64().unwrap();
    assert_eq!(last_num, first_num + moved.len() as u64);
    for &shard in &moved {
        assert_eq!(last["shards"][usize::from(shard)], 2);
    }
    c.wait_settled(
        last_num,
        &[
            (g1.len() - moved.len()) as u64,
            (g2.len() + moved.len()) as u64,
        ],
    );
    marks.push((bench.at(), "every move settled".into()));
    // `tynamo ctl status` agrees: every local group at the latest configuration, nothing in
    // flight.
    let out = c.ctl(&["status", "--json"]);
    assert!(out.status.success());
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["transfers"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    for g in status["groups"].as_array().unwrap() {
        assert_eq!(g["config_num"], last_num, "{status}");
    }

    let (ok, summary) = bench.finish(&marks);
    assert!(
        ok && summary.contains("verify=ok") && summary.contains("mismatches=0"),
        "tynamo-bench --verify failed:\n{summary}\nlogs:\n{}",
        c.logs()
    );

    // A moved shard's key asked at core 0 (group 1, the old owner): forwarded to core 1 on the
    // host where group 2 leads (the probe key was never written: nil), -MOVED to a core 1
    // port elsewhere.
    let key = key_in_shard(moved[0]);
    let slot = key_slot(key.as_bytes());
    let mut redirected = 0;
    for h in 1..=HOSTS {
        match try_call(&c.addr(h, 0), &["GET", &key]).unwrap() {
            Frame::Error(e) => {
                let text = String::from_utf8_lossy(&e).into_owned();
                assert!(text.starts_with(&format!("MOVED {slot} ")), "{text}");
                let port: u16 = text.rsplit(':').next().unwrap().parse().unwrap();
                assert_eq!((port - c.base) % 10, 1, "to a core 1 port: {text}");
                redirected += 1;
            }
            Frame::Null => {}
            other => panic!("GET of a moved shard's key at core 0: {other:?}"),
        }
    }
    assert!(redirected >= 1, "only group 2's leader host forwards");
    // CLUSTER SLOTS on every host (host 4 runs no controller replica) puts the moved shard's slot on a core 1 port.
    for h in 1..=HOSTS {
        let Frame::Array(ranges) = try_call(&c.addr(h, 0), &["CLUSTER", "SLOTS"]).unwrap() else {
            panic!("CLUSTER SLOTS is an array");
        };
        let owner_port = ranges
            .iter()
            .find_map(|r| match r {
                Frame::Array(parts) => {
                    let (Frame::Integer(lo), Frame::Integer(hi)) = (&parts[0], &parts[1]) else {
                        return None;
                    };
                    if i64::from(slot) < *lo || i64::from(slot) > *hi {
                        return None;
                    }
                    match &parts[2] {
                        Frame::Array(node) => match node[1] {
                            Frame::Integer(p) => Some(p as u16),
                            _ => None,
                        },
                        _ => None,
                    }
                }
                _ => None,
            })
            .expect("the slot is in a range");
        assert_eq!((owner_port - c.base) % 10, 1, "host {h}: slot {slot}");
    }
}

#[test]
fn a_move_survives_killing_the_old_owners_leader_host_and_restarting_it() {
    let _l = lock();
    let mut c = start_cluster();
    let first = c.latest();
    let first_num = first["num"].as_u64().unwrap();
    let (g1, g2) = (shards_of(&first, 1), shards_of(&first, 2));
    c.wait_settled(first_num, &[g1.len() as u64, g2.len() as u64]);

    let bench = Bench::start(&c.seeds(), 12, DEADLINE);
    bench.wait_serving(1);
    let shard = g1[0];
    let old_leader = c.leader_host(0);
    let out = c.ctl(&["move", &shard.to_string(), "2"]);
    assert!(
        out.status.success(),
        "move: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old owner's leader host dies with the move in whatever step it reached; the other
    // replicas elect a leader and finish it, and the host catches up when it is back.
    c.kill(old_leader);
    let killed_at = bench.at();
    let new_leader = c.leader_host(0);
    assert_ne!(new_leader, old_leader);
    c.spawn(old_leader, true);
    let num = first_num + 1;
    c.wait_settled(num, &[g1.len() as u64 - 1, g2.len() as u64 + 1]);
    let settled_at = bench.at();

    let marks = [
        (killed_at, format!("host {old_leader} killed")),
        (settled_at, "settled".to_string()),
    ];
    let (ok, summary) = bench.finish(&marks);
    assert!(
        ok && summary.contains("verify=ok") && summary.contains("mismatches=0"),
        "tynamo-bench --verify failed:\n{summary}\nlogs:\n{}",
        c.logs()
    );
}
