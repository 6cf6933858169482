//! Real-process tests of Join and Leave of hosts: `tynamo server` hosts on loopback, the
//! initial ones from `--initial-cluster`, the others started with `--join` and added with
//! `tynamo ctl join`, all under `tynamo-bench --verify` load through the cluster client.
//!
//! What they assert: no verification error and no request error (every read sees every write
//! acknowledged before it, and the bench's final scan finds every acknowledged write), the
//! groups a Join creates running on the joined hosts' cores and on a core of an initial host
//! next to that core's own group, the configuration settling (every group at the latest
//! configuration, nothing in flight, `tynamo ctl status`), a Leave's retired group removed from
//! every host with its directories deleted, and a joined host killed with SIGKILL coming back
//! from its data directory alone (no `--join`) and catching up with its group. The bench's
//! one-second progress lines are printed with the moments of the joins and leaves, so the
//! throughput dip can be read off (`-- --nocapture`).
//!
//! Every wait is a poll for a condition with a deadline; no sleep synchronises anything.
//!
//! Run: `cargo test --test join_cluster -- --nocapture`

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::bench::Bench;
use common::cluster::Cluster;
use common::lock;

/// Generous: five multi-core hosts, the bench and the build share 2 CPUs.
const DEADLINE: Duration = Duration::from_secs(120);
/// Poll interval while waiting for a condition (the condition decides, not the interval).
const POLL: Duration = Duration::from_millis(100);

impl Cluster {
    /// `tynamo ctl status --json` once it answers.
    fn status(&self) -> Option<Value> {
        let out = self.ctl(&["--json", "status"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `ctl status` says the cluster settled at configuration `num` (every group
    /// at `num` with nothing in flight, no group retiring, every host answering) and `check`
    /// holds for the status; returns it.
    fn wait_settled(&self, num: u64, check: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        let mut last = Value::Null;
        loop {
            if let Some(s) = self.status() {
                if s["config"]["num"] == num && s["settled"] == true && check(&s) {
                    return s;
                }
                last = s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "configuration {num} did not settle; last status:\n{last:#}\nlogs:\n{}",
                self.logs()
            );
            std::thread::sleep(POLL);
        }
    }
}

/// The replicas host `id` reports in a status document, as (group, core).
fn replicas_of(status: &Value, id: u64) -> Vec<(u64, u64)> {
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["id"] == id)
        .flat_map(|h| h["replicas"].as_array().cloned().unwrap_or_default())
        .map(|r| (r["group"].as_u64().unwrap(), r["core"].as_u64().unwrap()))
        .collect()
}

/// Shards per group in a status document's configuration.
fn shard_counts(status: &Value) -> BTreeMap<u64, u64> {
    status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["id"].as_u64().unwrap(), g["shards"].as_u64().unwrap()))
        .collect()
}

/// The `group-N` directories under a host's data directory.
fn group_dirs(data: &Path) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(data)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("group-"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

fn assert_bench_clean(ok: bool, summary: &str, c: &Cluster) {
    let result = summary
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or("");
    assert!(
        ok && result.contains(" errors=0 ")
            && result.contains("verify=ok")
            && result.contains("mismatches=0")
            && summary.contains("keys scanned at the end"),
        "tynamo-bench --verify failed:\n{summary}\nlogs:\n{}",
        c.logs()
    );
}

#[test]
fn join_two_hosts_then_leave_one_under_verified_load_loses_nothing() {
    let _l = lock();
    let mut c = Cluster::start(&[2, 2, 2, 2, 2], 3);
    // The bootstrap: groups 1 and 2 on cores 0 and 1 of hosts 1-3, 32 shards each.
    c.wait_settled(2, |s| shard_counts(s) == BTreeMap::from([(1, 32), (2, 32)]));
    // The joining hosts start before the operator adds them: they learn the cluster from
    // host 1 and wait, holding no group.
    c.spawn(4, true);
    c.spawn(5, true);

    let bench = Bench::start(&c.seeds(), 20, DEADLINE);
    bench.wait_serving(3);
    let mut marks = vec![(bench.at(), "ctl join 4 5".to_string())];
    let joined = c.change(&["join", &c.join_spec(4), &c.join_spec(5)]);
    assert_eq!(joined, 3);
    // Ten cores call for three groups: group 3 goes on host 4 core 0, host 5 core 0 and host 1
    // core 1 (next to group 2), and takes 21 of the 64 shards.
    let status = c.wait_settled(joined, |s| {
        shard_counts(s) == BTreeMap::from([(1, 22), (2, 21), (3, 21)])
    });
    marks.push((bench.at(), "join settled".into()));
    assert_eq!(replicas_of(&status, 4), vec![(3, 0)], "{status:#}");
    assert_eq!(replicas_of(&status, 5), vec![(3, 0)], "{status:#}");
    assert_eq!(
        replicas_of(&status, 1),
        vec![(1, 0), (2, 1), (3, 1)],
        "{status:#}"
    );
    // Group 3's peer group id is 2: its directory on each of its hosts.
    for id in [1, 4, 5] {
        assert!(
            group_dirs(&c.data(id)).contains(&"group-2".to_string()),
            "host {id}: {:?}",
            group_dirs(&c.data(id))
        );
    }

    // Host 4 leaves (no controller replica on it): group 3 is retired, its shards go back to
    // groups 1 and 2, then its replicas on hosts 1, 4 and 5 are removed.
    marks.push((bench.at(), "ctl leave 4".into()));
    let left = c.change(&["leave", "4"]);
    assert_eq!(left, joined + 1);
    let status = c.wait_settled(left, |s| {
        shard_counts(s) == BTreeMap::from([(1, 32), (2, 32)])
            && replicas_of(s, 4).is_empty()
            && replicas_of(s, 5).is_empty()
            && replicas_of(s, 1) == vec![(1, 0), (2, 1)]
    });
    marks.push((bench.at(), "leave settled".into()));
    assert!(status["retiring"].as_array().unwrap().is_empty());
    assert!(
        !status["config"]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["id"] == 4),
        "host 4 is no longer in the configuration: {status:#}"
    );
    // Host 4 still runs (a left host is stopped by the operator), status still asks it, and
    // it holds no replica; its directory and group 3's on hosts 1 and 5 are deleted,
    // tombstones remain.
    let left4: Vec<&Value> = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["id"] == 4)
        .collect();
    assert!(
        left4.len() == 1 && left4[0]["left"] == true && left4[0]["reachable"] == true,
        "{status:#}"
    );
    let host4 = c.ctl_groups(4);
    assert_eq!(
        host4["replicas"].as_array().map(Vec::len),
        Some(0),
        "{host4}"
    );
    assert_eq!(host4["removed"], serde_json::json!([3]), "{host4}");
    for id in [1, 4, 5] {
        let dirs = group_dirs(&c.data(id));
        assert!(
            !dirs.contains(&"group-2".to_string()),
            "host {id}: {dirs:?}"
        );
        assert!(c.data(id).join("group-2.removed").exists(), "host {id}");
    }
    assert_eq!(group_dirs(&c.data(4)), Vec::<String>::new());

    let (ok, summary) = bench.finish(&marks);
    assert_bench_clean(ok, &summary, &c);
    c.kill(4);
}

#[test]
fn a_joined_host_killed_and_restarted_from_its_data_directory_rejoins_its_group() {
    let _l = lock();
    // Three hosts of one core (group 1 on each, next to the controller); host 4 joins with
    // three cores: six cores call for two groups, and group 2 goes on host 4 core 0, host 1
    // core 0 and host 2 core 0 (cores that already run the controller and group 1).
    let mut c = Cluster::start(&[1, 1, 1, 3], 3);
    c.wait_settled(2, |s| shard_counts(s) == BTreeMap::from([(1, 64)]));
    let bench = Bench::start(&c.seeds(), 20, DEADLINE);
    bench.wait_serving(3);
    // The operator adds the host first, then starts it.
    let mut marks = vec![(bench.at(), "ctl join 4 (not running yet)".to_string())];
    let joined = c.change(&["join", &c.join_spec(4)]);
    c.spawn(4, true);
    marks.push((bench.at(), "host 4 started".into()));
    // Killed as soon as its replica of group 2 exists, whatever step the move reached.
    let start = Instant::now();
    while !group_dirs(&c.data(4)).contains(&"group-1".to_string()) {
        assert!(
            start.elapsed() < DEADLINE,
            "host 4 never created group 2's replica\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.kill(4);
    marks.push((bench.at(), "host 4 killed (SIGKILL)".into()));
    // Restarted with its addresses and data directory only: no --join, no seed.
    c.spawn(4, false);
    marks.push((bench.at(), "host 4 restarted without --join".into()));
    let status = c.wait_settled(joined, |s| {
        shard_counts(s) == BTreeMap::from([(1, 32), (2, 32)]) && replicas_of(s, 4) == vec![(2, 0)]
    });
    marks.push((bench.at(), "settled".into()));
    assert_eq!(replicas_of(&status, 1), vec![(1, 0), (2, 0)], "{status:#}");
    c.wait_caught_up(4, &status);
    // Killed again once it holds its share of the data (and perhaps leads group 2): back from
    // its data directory, it catches up with what the group committed meanwhile.
    c.kill(4);
    marks.push((bench.at(), "host 4 killed again".into()));
    c.spawn(4, false);
    let status = c.wait_settled(joined, |s| replicas_of(s, 4) == vec![(2, 0)]);
    marks.push((bench.at(), "settled again".into()));
    c.wait_caught_up(4, &status);
    let (ok, summary) = bench.finish(&marks);
    assert_bench_clean(ok, &summary, &c);
}

impl Cluster {
    /// Waits until host `id`'s (only) replica applied what its group's leader had committed
    /// when `status` was taken.
    fn wait_caught_up(&self, id: u16, status: &Value) {
        let host = self.ctl_groups(id);
        let group = host["replicas"][0]["group"].clone();
        let leader = status["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == group)
            .unwrap_or_else(|| panic!("group {group} not in {status:#}"))
            .clone();
        let commit = leader["commit"].as_u64().unwrap();
        let start = Instant::now();
        loop {
            let host = self.ctl_groups(id);
            if host["replicas"][0]["applied"].as_u64().unwrap_or(0) >= commit {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "host {id} does not catch up: {host} vs {leader}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// `TYNAMO.CTL GROUPS` of host `id` (its replicas as it sees them).
    fn ctl_groups(&self, id: u16) -> Value {
        let start = Instant::now();
        loop {
            if let Ok(tynamo::resp::frame::Frame::Bulk(b)) =
                common::try_call(&self.addr(id, 0), &["TYNAMO.CTL", "GROUPS"])
            {
                return serde_json::from_slice(&b).unwrap();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "host {id} does not answer GROUPS"
            );
            std::thread::sleep(POLL);
        }
    }
}
