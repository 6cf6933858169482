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
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{free_base, lock};

/// Generous: five multi-core hosts, the bench and the build share 2 CPUs.
const DEADLINE: Duration = Duration::from_secs(120);
/// Poll interval while waiting for a condition (the condition decides, not the interval).
const POLL: Duration = Duration::from_millis(100);

struct Cluster {
    dir: tempfile::TempDir,
    /// Running hosts by id.
    children: BTreeMap<u16, Child>,
    base: u16,
    /// Cores of host `id` at `cores[id - 1]`; hosts 1..=initial are in `--initial-cluster`.
    cores: Vec<u16>,
    initial: u16,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    /// A cluster of `cores.len()` possible hosts whose first `initial` start now.
    fn start(cores: &[u16], initial: u16) -> Cluster {
        let base = free_base(cores.len() as u16, *cores.iter().max().unwrap());
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            children: BTreeMap::new(),
            base,
            cores: cores.to_vec(),
            initial,
        };
        for id in 1..=initial {
            c.spawn(id, true);
        }
        c
    }

    fn map(&self) -> String {
        (1..=self.initial)
            .map(|h| format!("{h}={}/{}", self.peer(h), self.addr(h, 0)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn addr(&self, host: u16, core: u16) -> String {
        format!("127.0.0.1:{}", self.base + 10 * (host - 1) + core)
    }

    fn peer(&self, host: u16) -> String {
        format!("127.0.0.1:{}", self.base + 100 + 10 * (host - 1))
    }

    fn data(&self, id: u16) -> PathBuf {
        self.dir.path().join(format!("host-{id}"))
    }

    /// Starts host `id` (again) on its data directory; its log is appended to. A host beyond
    /// the initial ones runs with `--join` through host 1 when `seed` is set, and with nothing
    /// but its data directory and addresses when not (a restart).
    fn spawn(&mut self, id: u16, seed: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("host-{id}.log")))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tynamo"));
        cmd.args(["server", "--id", &id.to_string()])
            .arg("--data")
            .arg(self.data(id))
            .args(["--cores", &self.cores[usize::from(id - 1)].to_string()])
            .args(["--placement", "unbound"]);
        if id <= self.initial {
            cmd.args(["--initial-cluster", &self.map()]);
        } else {
            cmd.args(["--peer-addr", &self.peer(id)])
                .args(["--client-addr", &self.addr(id, 0)]);
            if seed {
                cmd.args(["--join", &self.addr(1, 0)]);
            }
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.children.insert(id, child);
    }

    /// SIGKILL: nothing the host did not fsync survives.
    fn kill(&mut self, id: u16) {
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `ID=PEER,CLIENT,CORES` for `tynamo ctl join`.
    fn join_spec(&self, id: u16) -> String {
        format!(
            "{id}={},{},{}",
            self.peer(id),
            self.addr(id, 0),
            self.cores[usize::from(id - 1)]
        )
    }

    /// Client addresses of every core of the initial hosts (the bench's seeds).
    fn seeds(&self) -> String {
        (1..=self.initial)
            .flat_map(|h| (0..self.cores[usize::from(h - 1)]).map(move |c| (h, c)))
            .map(|(h, c)| self.addr(h, c))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn logs(&self) -> String {
        (1..=self.cores.len() as u16)
            .map(|id| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("host-{id}.log")))
                    .unwrap_or_default();
                format!("--- host {id}\n{text}")
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

    /// A change through `tynamo ctl`; returns the configuration it produced.
    fn change(&self, args: &[&str]) -> u64 {
        let out = self.ctl(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.trim()
            .strip_prefix("configuration ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("ctl {args:?} printed {text:?}"))
    }

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

    fn at(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for `seconds` progress lines that report requests being served (a baseline to
    /// compare the seconds around the moves with).
    fn wait_serving(&self, seconds: usize) {
        let start = Instant::now();
        loop {
            let serving = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, l)| ops_per_s(l).is_some_and(|r| r > 0.0))
                .count();
            if serving >= seconds {
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

    /// Waits for the bench to end; prints its progress lines with `marks` in time order and
    /// returns (exit status ok, its stdout).
    fn finish(mut self, marks: &[(Duration, String)]) -> (bool, String) {
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
        let mut timeline = self.lines.lock().unwrap().clone();
        timeline.extend(marks.iter().cloned());
        timeline.sort_by_key(|(t, _)| *t);
        for (t, line) in &timeline {
            eprintln!("{:7.2}s  {line}", t.as_secs_f64());
        }
        let stdout = self.stdout.lock().unwrap().clone();
        eprintln!("{stdout}");
        eprintln!("{}", dip_summary(&timeline, marks));
        (status.success(), stdout)
    }
}

/// The rate of a progress line (`[  1.0s]      5325 ops/s  p50 ...`).
fn ops_per_s(line: &str) -> Option<f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "ops/s")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// One line per move window: the median rate of the seconds before the first mark, and the
/// lowest rate between each mark and the next.
fn dip_summary(timeline: &[(Duration, String)], marks: &[(Duration, String)]) -> String {
    let rates: Vec<(Duration, f64)> = timeline
        .iter()
        .filter_map(|(t, l)| Some((*t, ops_per_s(l)?)))
        .collect();
    let Some(first) = marks.first() else {
        return String::new();
    };
    let mut before: Vec<f64> = rates
        .iter()
        .filter(|(t, _)| *t < first.0)
        .map(|(_, r)| *r)
        .collect();
    before.sort_by(f64::total_cmp);
    let median = before.get(before.len() / 2).copied().unwrap_or(0.0);
    let mut out = format!("throughput before the first move: median {median:.0} ops/s");
    for (i, (at, what)) in marks.iter().enumerate() {
        let end = marks.get(i + 1).map_or(Duration::MAX, |m| m.0);
        let window: Vec<f64> = rates
            .iter()
            .filter(|(t, _)| *t > *at && *t <= end)
            .map(|(_, r)| *r)
            .collect();
        if let Some(low) = window.iter().copied().min_by(f64::total_cmp) {
            out.push_str(&format!(
                "\n  after {what:<40} lowest second {low:.0} ops/s ({:.0}% of before) over {} s",
                if median > 0.0 {
                    100.0 * low / median
                } else {
                    0.0
                },
                window.len()
            ));
        }
    }
    out
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

    let bench = Bench::start(&c.seeds(), 20);
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
    let bench = Bench::start(&c.seeds(), 20);
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
