//! `tynamo-bench --verify` as load for the real-process tests: its one-second progress lines
//! are collected with the time they arrived, so the throughput around a move can be read off.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(50);

/// The tynamo-bench binary: `$TYNAMO_BENCH_BIN`, or the one next to the server's, built here
/// (it is another package of the workspace, which `cargo test` of this one does not build).
/// The build is up to date after the first test that asks; it compiles the library again with
/// the bench package's own feature set the first time.
pub fn bench_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TYNAMO_BENCH_BIN") {
        return PathBuf::from(p);
    }
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
pub struct Bench {
    child: Child,
    started: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    stdout: Arc<Mutex<String>>,
    /// How long a wait on the bench may take.
    deadline: Duration,
}

impl Bench {
    /// Workload A (50% reads) with --verify on 2000 keys through the cluster client, for
    /// `duration_s` seconds.
    pub fn start(seeds: &str, duration_s: u64, deadline: Duration) -> Bench {
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
            deadline,
        }
    }

    /// Time since the start, for marks on the timeline.
    pub fn at(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for `seconds` progress lines that report requests being served (a baseline to
    /// compare the seconds around the moves with).
    pub fn wait_serving(&self, seconds: usize) {
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
                start.elapsed() < self.deadline,
                "the bench never served: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the bench to end; prints its progress lines with `marks` in time order and
    /// the dips after each mark, and returns (exit status ok, its stdout).
    pub fn finish(mut self, marks: &[(Duration, String)]) -> (bool, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < self.deadline, "the bench did not finish");
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

impl Drop for Bench {
    fn drop(&mut self) {
        // A test that failed while the bench ran must not leave it running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rate of a progress line (`[  1.0s]      5325 ops/s  p50 ...`).
pub fn ops_per_s(line: &str) -> Option<f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "ops/s")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// One line per move window: the median rate of the seconds before the first mark, and the
/// lowest rate between each mark and the next.
pub fn dip_summary(timeline: &[(Duration, String)], marks: &[(Duration, String)]) -> String {
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
