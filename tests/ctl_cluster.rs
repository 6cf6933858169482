//! Real-process tests of the controller group inside `tynamo server` and of `tynamo ctl`:
//! three hosts of two cores on loopback, the controller on core 0 of each.
//!
//! Every wait is a poll for a condition with a deadline; no sleep synchronises anything.
//!
//! Run: `cargo test --test ctl_cluster -- --nocapture`

use std::time::{Duration, Instant};

use serde_json::Value;
use tynamo::resp::frame::Frame;

mod common;
use common::cluster::Cluster;
use common::{lock, try_call};

const DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval while waiting for a condition (the condition decides, not the interval).
const POLL: Duration = Duration::from_millis(50);

/// Three hosts of two cores, all in `--initial-cluster`.
fn start_cluster() -> Cluster {
    Cluster::start(&[2, 2, 2], 3)
}

impl Cluster {
    /// `ctl --json <args>` once it succeeds and `ready` holds for its document.
    fn ctl_json_until(&self, addr: &str, args: &[&str], ready: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let mut all = vec!["--json"];
            all.extend_from_slice(args);
            let out = self.ctl_at(addr, &all);
            if out.status.success() {
                let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!("--json output does not parse ({e}): {:?}", out.stdout)
                });
                if ready(&doc) {
                    return doc;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ctl {args:?} never got ready: {}\n{}\nlogs:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(POLL);
        }
    }
}

fn call(addr: &str, args: &[&str]) -> Frame {
    try_call(addr, args).unwrap()
}

#[test]
fn ctl_status_and_query_answer_from_any_host_as_tables_and_json() {
    let _l = lock();
    let c = start_cluster();
    // The bootstrap configuration: Join of the three hosts (1), then the controller's slots (2).
    let config = c.ctl_json_until(&c.addr(3, 1), &["query"], |d| d["num"] == 2);
    assert_eq!(config["shard_count"], 64);
    let hosts: Vec<u64> = config["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    assert_eq!(hosts, vec![1, 2, 3]);
    let controller: Vec<(u64, u64)> = config["controller"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["host"].as_u64().unwrap(), s["core"].as_u64().unwrap()))
        .collect();
    assert_eq!(controller, vec![(1, 0), (2, 0), (3, 0)]);
    // The static map: group 1 on core 0 of every host with shards 0-31, group 2 on core 1.
    let groups = config["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    for (i, g) in groups.iter().enumerate() {
        let shards: Vec<u64> = g["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        assert_eq!(
            shards,
            (32 * i as u64..32 * (i as u64 + 1)).collect::<Vec<_>>()
        );
        assert!(g["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["core"] == i as u64));
    }
    let first = c.ctl_json_until(&c.addr(2, 0), &["query", "1"], |_| true);
    assert_eq!(first["num"], 1);
    assert_eq!(first["controller"].as_array().map(Vec::len), Some(0));

    // Status: every group with a leader, term and indexes, from a non-leader's core 1 too.
    let status = c.ctl_json_until(&c.addr(2, 1), &["status"], |d| {
        d["groups"]
            .as_array()
            .is_some_and(|gs| gs.iter().all(|g| g["leader"].as_u64().unwrap_or(0) != 0))
    });
    let ctl = &status["controller"];
    assert!((1..=3).contains(&ctl["leader"].as_u64().unwrap()), "{ctl}");
    assert!(ctl["applied"].as_u64().unwrap() >= 3, "{ctl}");
    for g in status["groups"].as_array().unwrap() {
        assert_eq!(g["shards"], 32);
        assert!(g["term"].as_u64().unwrap() >= 1, "{g}");
        assert!(g["commit"].as_u64().unwrap() >= 1, "{g}");
    }
    let table = c.ctl_at(&c.addr(1, 0), &["status"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("GROUP  LEADER  TERM  COMMIT  APPLIED  SHARDS"),
        "{text}"
    );
    assert!(text.contains("configuration 2"), "{text}");
    assert!(text.contains("transfers in flight: none"), "{text}");
    let table = c.ctl_at(&c.addr(3, 0), &["query"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("0-31") && text.contains("32-63"), "{text}");

    // CLUSTER SLOTS is computed from that configuration and names each group's core ports.
    match call(&c.addr(1, 0), &["CLUSTER", "SLOTS"]) {
        Frame::Array(ranges) => {
            assert_eq!(ranges.len(), 2);
            let ports: Vec<Vec<i64>> = ranges
                .iter()
                .map(|r| match r {
                    Frame::Array(f) => f[2..]
                        .iter()
                        .map(|n| match n {
                            Frame::Array(n) => match n[1] {
                                Frame::Integer(p) => p,
                                _ => panic!("{n:?}"),
                            },
                            other => panic!("{other:?}"),
                        })
                        .collect(),
                    other => panic!("{other:?}"),
                })
                .collect();
            for (core, mut p) in ports.into_iter().enumerate() {
                p.sort_unstable();
                let want: Vec<i64> = (0..3)
                    .map(|h| i64::from(c.base) + 10 * h + core as i64)
                    .collect();
                assert_eq!(p, want);
            }
        }
        other => panic!("{other:?}"),
    }

    // A Leave the controller refuses says why: host 1 runs a controller replica.
    let out = c.ctl_at(&c.addr(1, 0), &["leave", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host 1") && err.contains("controller"),
        "{err}"
    );
    // A malformed host spec is refused before anything is sent.
    let out = c.ctl_at(&c.addr(1, 0), &["join", "4=nonsense"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_ctl_change_is_applied_once_however_often_it_is_sent_and_survives_restarts() {
    let _l = lock();
    let mut c = start_cluster();
    c.ctl_json_until(&c.addr(1, 0), &["query"], |d| d["num"] == 2);
    // Find the controller leader's core 0 by following the redirect by hand.
    let mut addr = c.addr(1, 1);
    let join = [
        "TYNAMO.CTL",
        "JOIN",
        "991",
        "1",
        "4",
        "127.0.0.1:1101",
        "127.0.0.1:1001",
        "2",
    ];
    let start = Instant::now();
    // Host 4 (2 cores) joins on paper only: no process runs it. Eight cores call for two groups
    // of three, which exist already, so no shard moves and nothing waits for host 4.
    let num = loop {
        match call(&addr, &join) {
            Frame::Integer(n) => break n,
            Frame::Error(e) => {
                let text = String::from_utf8_lossy(&e).into_owned();
                if let Some(to) = text.strip_prefix("REDIRECT ") {
                    addr = to.to_string();
                } else {
                    assert!(text.starts_with("TRYAGAIN"), "{text}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < DEADLINE, "no controller leader");
        std::thread::sleep(POLL);
    };
    assert_eq!(num, 3);
    // The same (client id, seq) again: the first answer, and no configuration 4.
    assert_eq!(call(&addr, &join), Frame::Integer(3));
    let latest = c.ctl_json_until(&c.addr(2, 0), &["query"], |_| true);
    assert_eq!(latest["num"], 3);
    assert!(latest["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["id"] == 4 && h["addr"] == "127.0.0.1:1101/127.0.0.1:1001"));
    // Through the tool: a move produces the next configuration; a bad one is refused.
    let out = c.ctl_at(&c.addr(3, 1), &["move", "0", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration 4"
    );
    let out = c.ctl_at(&c.addr(3, 1), &["move", "0", "99"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("group 99 does not exist"), "{err}");
    // Every host killed and restarted: the controller recovers configuration 4 from its log
    // (the bootstrap does not run again), and the change's session still answers its retry.
    c.restart_initial();
    let after = c.ctl_json_until(&c.addr(1, 0), &["query"], |_| true);
    assert_eq!(after["num"], 4);
    assert_eq!(after["shards"][0], 2, "the move survived");
    let start = Instant::now();
    let mut addr = c.addr(2, 0);
    loop {
        // A host still starting refuses the connection: poll again.
        let reply =
            try_call(&addr, &join).unwrap_or_else(|e| Frame::Error(format!("TRYAGAIN {e}").into()));
        match reply {
            Frame::Integer(n) => {
                assert_eq!(n, 3, "a retry after restarts gets the first answer");
                break;
            }
            Frame::Error(e) => {
                let text = String::from_utf8_lossy(&e).into_owned();
                if let Some(to) = text.strip_prefix("REDIRECT ") {
                    addr = to.to_string();
                } else {
                    assert!(text.starts_with("TRYAGAIN"), "{text}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no controller leader after restart"
        );
        std::thread::sleep(POLL);
    }
}
