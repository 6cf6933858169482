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

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tynamo::resp::frame::Frame;
use tynamo::shard::{key_slot, slot_shard};

mod common;
use common::{free_base, lock, try_call};

const DEADLINE: Duration = Duration::from_secs(60);
/// Poll interval while waiting for a condition (the condition decides, not the interval).
const POLL: Duration = Duration::from_millis(50);
const HOSTS: u16 = 4;
const CORES: u16 = 2;
const SHARD_COUNT: u16 = 64;

struct Cluster {
    dir: tempfile::TempDir,
    /// By host id - 1; None while the host is killed.
    children: Vec<Option<Child>>,
    base: u16,
    map: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn start() -> Cluster {
        let base = free_base(HOSTS, CORES);
        let map = (0..HOSTS)
            .map(|h| {
                format!(
                    "{}=127.0.0.1:{}/127.0.0.1:{}",
                    h + 1,
                    base + 100 + 10 * h,
                    base + 10 * h
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            children: (0..HOSTS).map(|_| None).collect(),
            base,
            map,
        };
        for id in 1..=HOSTS {
            c.spawn(id);
        }
        c
    }

    /// Starts host `id` (again) on its data directory; its log is appended to.
    fn spawn(&mut self, id: u16) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("host-{id}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tynamo"))
            .args(["server", "--id", &id.to_string()])
            .arg("--data")
            .arg(self.dir.path().join(format!("host-{id}")))
            .args([
                "--initial-cluster",
                &self.map,
                "--cores",
                &CORES.to_string(),
            ])
            .args(["--placement", "unbound"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[usize::from(id - 1)] = Some(child);
    }

    /// SIGKILL: nothing the host did not fsync survives.
    fn kill(&mut self, id: u16) {
        if let Some(mut c) = self.children[usize::from(id - 1)].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The host whose core `core` leads its group, once one does.
    fn leader_host(&self, core: u16) -> u16 {
        let start = Instant::now();
        loop {
            for h in 1..=HOSTS {
                if self.children[usize::from(h - 1)].is_some()
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

    fn addr(&self, host: u16, core: u16) -> String {
        format!("127.0.0.1:{}", self.base + 10 * (host - 1) + core)
    }

    fn seeds(&self) -> String {
        (1..=HOSTS)
            .flat_map(|h| (0..CORES).map(move |c| (h, c)))
            .map(|(h, c)| self.addr(h, c))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn logs(&self) -> String {
        (1..=HOSTS)
            .map(|id| {
                std::fs::read_to_string(self.dir.path().join(format!("host-{id}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tynamo"))
            .args([
                "ctl",
                "--cluster",
                &self.addr(1, 0),
                "--timeout-ms",
                "20000",
            ])
            .args(args)
            .output()
            .unwrap()
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

/// The tynamo-bench binary next to the server's (built here if missing: it is another
/// package of the workspace, which `cargo test` of this one does not build).
fn bench_binary() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_tynamo"))
        .parent()
        .unwrap()
        .to_path_buf();
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "tynamo-bench", "--bin", "tynamo-bench"])
        .status()
        .unwrap();
    assert!(status.success(), "cannot build tynamo-bench");
    dir.join("tynamo-bench")
}

/// A running tynamo-bench whose stderr lines are collected with the time they arrived.
struct Bench {
    child: Child,
    started: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    stdout: Arc<Mutex<String>>,
}

impl Bench {
    fn start(seeds: &str, duration_s: u64) -> Bench {
        let mut child = Command::new(bench_binary())
            .args(["--cluster", seeds, "--workload", "a", "--verify"])
            .args(["--keys", "2000", "--connections", "8", "--threads", "1"])
            .args(["--duration", &format!("{duration_s}s"), "--progress-lines"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (l2, err) = (lines.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l2.lock().unwrap().push((started.elapsed(), line));
            }
        });
        let stdout = Arc::new(Mutex::new(String::new()));
        let (s2, mut out) = (stdout.clone(), child.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            *s2.lock().unwrap() = text;
        });
        Bench {
            child,
            started,
            lines,
            stdout,
        }
    }

    /// Waits for a progress line that reports requests being served.
    fn wait_serving(&self) {
        let start = Instant::now();
        loop {
            let serving = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|(_, l)| ops_per_s(l).is_some_and(|r| r > 0.0));
            if serving {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the bench never served: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(POLL);
        }
    }

    fn finish(mut self) -> (bool, Vec<(Duration, String)>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < DEADLINE, "the bench did not finish");
            std::thread::sleep(POLL);
        };
        // The reader threads end with the pipes; give them the last lines.
        let lines_done = Instant::now();
        while self.stdout.lock().unwrap().is_empty()
            && lines_done.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(POLL);
        }
        let lines = self.lines.lock().unwrap().clone();
        let stdout = self.stdout.lock().unwrap().clone();
        (status.success(), lines, stdout)
    }
}

/// The rate of a progress line (`[  1.0s]      5325 ops/s  p50 ...`).
fn ops_per_s(line: &str) -> Option<f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "ops/s")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
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
    let c = Cluster::start();
    let first = c.latest();
    let first_num = first["num"].as_u64().unwrap();
    let (g1, g2) = (shards_of(&first, 1), shards_of(&first, 2));
    assert_eq!(g1.len() + g2.len(), usize::from(SHARD_COUNT));
    c.wait_settled(first_num, &[g1.len() as u64, g2.len() as u64]);

    let bench = Bench::start(&c.seeds(), 12);
    bench.wait_serving();
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
        marks.push((bench.started.elapsed(), format!("ctl move {shard} 2")));
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
    marks.push((bench.started.elapsed(), "every move settled".into()));
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

    let (ok, lines, summary) = bench.finish();
    let mut timeline: Vec<(Duration, String)> = lines;
    timeline.extend(marks.iter().cloned());
    timeline.sort_by_key(|(t, _)| *t);
    for (t, line) in &timeline {
        eprintln!("{:7.2}s  {line}", t.as_secs_f64());
    }
    eprintln!("{summary}");
    assert!(
        ok && summary.contains("verify=ok") && summary.contains("mismatches=0"),
        "tynamo-bench --verify failed:\n{summary}\n{timeline:?}\nlogs:\n{}",
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
    let mut c = Cluster::start();
    let first = c.latest();
    let first_num = first["num"].as_u64().unwrap();
    let (g1, g2) = (shards_of(&first, 1), shards_of(&first, 2));
    c.wait_settled(first_num, &[g1.len() as u64, g2.len() as u64]);

    let bench = Bench::start(&c.seeds(), 12);
    bench.wait_serving();
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
    let killed_at = bench.started.elapsed();
    let new_leader = c.leader_host(0);
    assert_ne!(new_leader, old_leader);
    c.spawn(old_leader);
    let num = first_num + 1;
    c.wait_settled(num, &[g1.len() as u64 - 1, g2.len() as u64 + 1]);
    let settled_at = bench.started.elapsed();

    let (ok, lines, summary) = bench.finish();
    for (t, line) in &lines {
        eprintln!("{:7.2}s  {line}", t.as_secs_f64());
    }
    eprintln!(
        "killed host {old_leader} at {:.2}s, settled at {:.2}s\n{summary}",
        killed_at.as_secs_f64(),
        settled_at.as_secs_f64()
    );
    assert!(
        ok && summary.contains("verify=ok") && summary.contains("mismatches=0"),
        "tynamo-bench --verify failed:\n{summary}\nlogs:\n{}",
        c.logs()
    );
}
